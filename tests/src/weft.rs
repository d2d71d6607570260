//! Running `weft node` on a simulated node, and reading it through the real `weft` CLI.

use crate::cluster::Cluster;
use crate::node::Node;
use crate::process::Proc;
use crate::weft_bin;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A `weft node` process on a simulated node. Killed on drop (its eBPF pins stay, as on a real
/// node; the cluster's teardown removes them).
pub struct Weft {
    proc: Option<Proc>,
    node: Node,
    registry: PathBuf,
    /// `--ca-cert` and how certificates are signed ([`Cluster::node_ca_args`]).
    ca_args: Vec<String>,
    admin_socket: PathBuf,
    extra: Vec<String>,
    cgroup: Option<PathBuf>,
}

impl Weft {
    /// Starts weft on `node` with the cluster's registry file (written now and on every change)
    /// and waits until it reports ready.
    pub fn start(cluster: &Cluster, node: &Node) -> Result<Weft> {
        Self::start_with(cluster, node, &[])
    }

    /// Like [`Weft::start`] with extra `weft node` flags.
    pub fn start_with(cluster: &Cluster, node: &Node, extra: &[&str]) -> Result<Weft> {
        Self::launched(cluster, node, extra, None)
    }

    /// Starts weft on `node` reading the cluster from its Kubernetes API
    /// ([`Cluster::api_server`]) instead of a file: `--registry kube --kubeconfig …`.
    pub fn start_kube(cluster: &Cluster, node: &Node, extra: &[&str]) -> Result<Weft> {
        cluster.api_server()?;
        let kubeconfig = cluster.kubeconfig_path();
        let mut w = Weft {
            proc: None,
            node: node.clone(),
            registry: PathBuf::from("kube"),
            ca_args: cluster.node_ca_args(node.name())?,
            admin_socket: node.state_dir().join("admin.sock"),
            extra: ["--kubeconfig".to_string(), kubeconfig.display().to_string()]
                .into_iter()
                .chain(extra.iter().map(|s| s.to_string()))
                .collect(),
            cgroup: None,
        };
        w.launch()?;
        Ok(w)
    }

    /// Like [`Weft::start`], but weft runs in `cgroup` (e.g. a pod's container cgroup, as a
    /// DaemonSet pod) instead of the node's system cgroup.
    pub fn start_in_cgroup(cluster: &Cluster, node: &Node, cgroup: &Path) -> Result<Weft> {
        Self::launched(cluster, node, &[], Some(cgroup.to_path_buf()))
    }

    /// [`Weft::start_in_cgroup`] with extra `weft node` flags.
    pub fn start_in_cgroup_with(
        cluster: &Cluster,
        node: &Node,
        cgroup: &Path,
        extra: &[&str],
    ) -> Result<Weft> {
        Self::launched(cluster, node, extra, Some(cgroup.to_path_buf()))
    }

    fn launched(
        cluster: &Cluster,
        node: &Node,
        extra: &[&str],
        cgroup: Option<PathBuf>,
    ) -> Result<Weft> {
        let registry = cluster.default_registry_path();
        cluster.sync_registry_to(&registry)?;
        let mut w = Weft {
            proc: None,
            node: node.clone(),
            registry,
            ca_args: cluster.node_ca_args(node.name())?,
            admin_socket: node.state_dir().join("admin.sock"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            cgroup,
        };
        w.launch()?;
        Ok(w)
    }

    fn launch(&mut self) -> Result<()> {
        let mut cmd = Command::new(weft_bin());
        cmd.arg("node")
            .args(["--node-name", self.node.name()])
            .arg("--registry")
            .arg(&self.registry)
            .arg("--cgroup-root")
            .arg(self.node.cgroup_root())
            .arg("--bpffs")
            .arg(self.node.bpffs_dir())
            .arg("--admin-socket")
            .arg(&self.admin_socket)
            .args(&self.ca_args)
            .args(&self.extra)
            .env(
                "WEFT_LOG",
                std::env::var("WEFT_LOG").unwrap_or_else(|_| "info".into()),
            );
        let mut proc = match &self.cgroup {
            Some(cg) => self.node.spawn_in_cgroup(cg, &cmd)?,
            None => self.node.spawn(&cmd)?,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.ready() {
                break;
            }
            if let Some(status) = proc.try_wait()? {
                bail!(
                    "weft node on {} exited ({status}) before ready:\n{}",
                    self.node.name(),
                    proc.stderr()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "weft node on {} not ready within 30s:\n{}",
                    self.node.name(),
                    proc.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.proc = Some(proc);
        Ok(())
    }

    /// Stops weft (SIGTERM, then SIGKILL after 5 s). Pinned eBPF state stays.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut p) = self.proc.take() {
            p.signal(libc::SIGTERM)?;
            if p.wait_timeout(Duration::from_secs(5))?.is_none() {
                p.kill();
            }
        }
        Ok(())
    }

    /// Starts weft again with the same flags and waits until ready.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.launch()
    }

    pub fn admin_socket(&self) -> &Path {
        &self.admin_socket
    }

    pub fn node(&self) -> &Node {
        &self.node
    }

    /// The weft process's id while it runs (for reading its `/proc` entries).
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(|p| p.pid())
    }

    /// weft's stderr so far (its log).
    pub fn log(&self) -> String {
        self.proc.as_ref().map(|p| p.stderr()).unwrap_or_default()
    }

    /// `GET /healthz/ready` answered 200.
    pub fn ready(&self) -> bool {
        self.admin_get("/healthz/ready")
            .map(|(code, _)| code == 200)
            .unwrap_or(false)
    }

    /// A raw GET on the admin socket: (status code, body).
    pub fn admin_get(&self, path: &str) -> Result<(u16, String)> {
        let mut s = UnixStream::connect(&self.admin_socket)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: weft\r\nConnection: close\r\n\r\n"
        )?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        let code = resp
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .context("malformed admin response")?;
        let body = resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((code, body))
    }

    /// Runs the `weft` CLI against this node: `weft <args> --admin-socket <socket>`.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(weft_bin())
            .args(args)
            .arg("--admin-socket")
            .arg(&self.admin_socket)
            .output()
            .context("running the weft CLI")?;
        if !out.status.success() {
            bail!(
                "weft {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `weft flows -o json` (extra filter flags allowed), one value per flow.
    pub fn flows(&self, filters: &[&str]) -> Result<Vec<Value>> {
        let mut args = vec!["flows", "-o", "json"];
        args.extend_from_slice(filters);
        json_lines(&self.cli(&args)?)
    }

    /// Waits until `weft flows` holds flows for which `pred` is true at least `n` times.
    pub fn wait_flows(
        &self,
        n: usize,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Vec<Value>> {
        let deadline = Instant::now() + timeout;
        loop {
            let all = self.flows(&[])?;
            let hits: Vec<Value> = all.iter().filter(|f| pred(f)).cloned().collect();
            if hits.len() >= n {
                return Ok(hits);
            }
            if Instant::now() > deadline {
                bail!(
                    "only {} of {n} expected flows after {timeout:?}; all flows:\n{}",
                    hits.len(),
                    all.iter()
                        .map(|f| f.to_string())
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The Prometheus text from `<node ip>:15020/metrics`, fetched from inside the node.
    pub fn metrics(&self) -> Result<String> {
        let mut s =
            crate::tcp_connect(&self.node, (self.node.ip(), 15020), Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: weft\r\nConnection: close\r\n\r\n"
        )?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        if !resp.starts_with("HTTP/1.1 200") {
            bail!("metrics: {resp}");
        }
        Ok(resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default())
    }

    /// `weft workloads -o json`.
    pub fn workloads(&self) -> Result<Vec<Value>> {
        json_lines(&self.cli(&["workloads", "-o", "json"])?)
    }

    /// `weft status -o json`.
    pub fn status(&self) -> Result<Value> {
        Ok(serde_json::from_str(&self.cli(&["status", "-o", "json"])?)?)
    }
}

impl Drop for Weft {
    fn drop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }
}

/// The cluster's mesh CA (`weft ca init`, once per cluster), shared by all its nodes.
pub fn mesh_ca(cluster: &Cluster) -> Result<PathBuf> {
    let dir = cluster.logs_dir().join("ca");
    if !dir.join("ca.crt").exists() {
        let out = Command::new(weft_bin())
            .args(["ca", "init", "--out"])
            .arg(&dir)
            .output()
            .context("running weft ca init")?;
        if !out.status.success() {
            bail!("weft ca init: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    Ok(dir)
}

fn json_lines(s: &str) -> Result<Vec<Value>> {
    s.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("bad JSON line {l:?}")))
        .collect()
}
