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

    /// The `weft node` command line this weft runs with (the same for a successor).
    fn command(&self) -> Command {
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
        // Each node hands over through a socket of its own: with weft's default path, a weft
        // starting anywhere on the machine (another test's) would take this one's listeners.
        if supports_handover()
            && !self
                .extra
                .iter()
                .any(|a| a.starts_with("--handover-socket"))
        {
            cmd.arg("--handover-socket").arg(self.handover_socket());
        }
        cmd
    }

    /// Where this node's weft hands its listeners over to a successor: the
    /// `--handover-socket` given in the extra flags, else one in the node's state directory.
    pub fn handover_socket(&self) -> PathBuf {
        let given = self.extra.iter().enumerate().find_map(|(i, a)| {
            if a == "--handover-socket" {
                self.extra.get(i + 1).cloned()
            } else {
                a.strip_prefix("--handover-socket=").map(str::to_string)
            }
        });
        given.map_or_else(
            || self.node.state_dir().join("handover.sock"),
            PathBuf::from,
        )
    }

    fn spawn_command(&self, cmd: &Command) -> Result<Proc> {
        match &self.cgroup {
            Some(cg) => self.node.spawn_in_cgroup(cg, cmd),
            None => self.node.spawn(cmd),
        }
    }

    fn launch(&mut self) -> Result<()> {
        let cmd = self.command();
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

    /// Restarts weft without a gap, as a rolling update of the node does: starts a successor
    /// with the same command line (same flags, cgroup, `WEFT_LOG`), which takes the listening
    /// sockets over from the running weft through the hand-over socket; waits until the
    /// successor has taken over, then until the predecessor, which drains what it still
    /// serves, exits by itself within `exit_within` (its `--drain-timeout` and a margin).
    ///
    /// "Taken over" is read from the kernel, not from a log line: the successor holds a
    /// listening socket on the proxy port (`/proc/<pid>/net/tcp*` against its descriptors),
    /// holds the listening admin socket at this weft's path (`/proc/<pid>/net/unix`), and
    /// answers `/healthz/ready` there.
    ///
    /// On success this `Weft` is the successor ([`Weft::pid`], [`Weft::log`]); the
    /// predecessor's log stays in [`HandOver::old_log`]. If the successor exits or does not
    /// take over within 30 s, it is killed and the predecessor stays in place (an error). If
    /// the predecessor outlives `exit_within`, it is killed and an error says so; the
    /// successor stays in place.
    pub fn hand_over(&mut self, exit_within: Duration) -> Result<HandOver> {
        let old_pid = self
            .pid()
            .context("weft is not running: nothing to hand over")?;
        let proxy_port = self
            .status()
            .ok()
            .and_then(|s| {
                s.pointer("/proxy_address")
                    .and_then(Value::as_str)
                    .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
            })
            .map_or(DEFAULT_PROXY_PORT, |a| a.port());
        let started = Instant::now();
        let mut new = self.spawn_command(&self.command())?;
        let new_pid = new.pid();
        let deadline = started + Duration::from_secs(30);
        let took_over = loop {
            if listens_on(new_pid, proxy_port)
                && serves_unix(new_pid, &self.admin_socket)
                && self.ready()
            {
                break started.elapsed();
            }
            if let Some(status) = new.try_wait()? {
                bail!(
                    "the successor weft on {} exited ({status}) before taking over:\n{}",
                    self.node.name(),
                    new.stderr()
                );
            }
            if Instant::now() > deadline {
                new.kill();
                bail!(
                    "the successor weft on {} did not take over within 30s (listening on \
                     :{proxy_port}, serving {}, ready):\n{}",
                    self.node.name(),
                    self.admin_socket.display(),
                    new.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut old = self
            .proc
            .replace(new)
            .context("weft is not running: nothing to hand over")?;
        let old_log = old.stderr_path().to_path_buf();
        let Some(old_status) = old.wait_timeout(exit_within.saturating_sub(started.elapsed()))?
        else {
            old.kill();
            bail!(
                "the predecessor weft on {} (pid {old_pid}) did not exit within {exit_within:?} \
                 of the hand-over; killed. Its log: {}",
                self.node.name(),
                old_log.display()
            );
        };
        Ok(HandOver {
            old_pid,
            new_pid,
            took_over,
            old_exited: started.elapsed(),
            old_status,
            old_log,
        })
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

/// `weft node`'s default `--proxy-address` port (the captured connections' listener).
const DEFAULT_PROXY_PORT: u16 = 15001;

/// What one [`Weft::hand_over`] took.
#[derive(Debug, Clone)]
pub struct HandOver {
    pub old_pid: u32,
    pub new_pid: u32,
    /// From starting the successor until it had taken over (listening on the proxy port,
    /// serving the admin socket, ready).
    pub took_over: Duration,
    /// From starting the successor until the predecessor had exited.
    pub old_exited: Duration,
    pub old_status: std::process::ExitStatus,
    /// The predecessor's stderr (its log).
    pub old_log: PathBuf,
}

/// Whether the `weft` under test has a hand-over (`weft node --handover-socket`): asked once
/// per binary.
pub fn supports_handover() -> bool {
    static KNOWN: std::sync::Mutex<Vec<(PathBuf, bool)>> = std::sync::Mutex::new(Vec::new());
    let bin = weft_bin();
    let mut known = KNOWN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, yes)) = known.iter().find(|(b, _)| *b == bin) {
        return *yes;
    }
    let yes = Command::new(&bin)
        .args(["node", "--help"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("--handover-socket"))
        .unwrap_or(false);
    known.push((bin, yes));
    yes
}

/// Socket inodes among `pid`'s descriptors.
fn socket_inodes(pid: u32) -> Vec<u64> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    fds.flatten()
        .filter_map(|fd| {
            let link = std::fs::read_link(fd.path()).ok()?;
            let link = link.to_str()?;
            link.strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

/// `pid` holds a TCP socket listening on `port` (any address) in its network namespace.
fn listens_on(pid: u32, port: u16) -> bool {
    let mut listening = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        listening.extend(tcp_listeners(&text, port));
    }
    !listening.is_empty() && socket_inodes(pid).iter().any(|i| listening.contains(i))
}

/// Inodes of the sockets listening on `port` in a `/proc/net/tcp` table.
fn tcp_listeners(table: &str, port: u16) -> Vec<u64> {
    const LISTEN: &str = "0A";
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local_port = f.get(1)?.rsplit_once(':')?.1;
            let ok = u16::from_str_radix(local_port, 16).ok()? == port && *f.get(3)? == LISTEN;
            ok.then(|| f.get(9)?.parse().ok()).flatten()
        })
        .collect()
}

/// `pid` holds a listening Unix socket bound to `path`.
fn serves_unix(pid: u32, path: &Path) -> bool {
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/unix")).unwrap_or_default();
    let inodes = unix_listeners(&text, path);
    !inodes.is_empty() && socket_inodes(pid).iter().any(|i| inodes.contains(i))
}

/// Inodes of the listening sockets bound to `path` in a `/proc/net/unix` table.
fn unix_listeners(table: &str, path: &Path) -> Vec<u64> {
    // Flags: __SO_ACCEPTCON, a socket that listen() was called on.
    const ACCEPTING: u32 = 0x10000;
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let flags = u32::from_str_radix(f.get(3)?, 16).ok()?;
            let ok = flags & ACCEPTING != 0 && Path::new(f.get(7)?) == path;
            ok.then(|| f.get(6)?.parse().ok()).flatten()
        })
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_are_read_from_the_tcp_table() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:3A99 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 41001 1 0000000000000000 100 0 0 10 0
   1: 0100007F:3A98 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 41002 1 0000000000000000 100 0 0 10 0
   2: 0A00000A:3A99 0A00000B:C350 01 00000000:00000000 00:00000000 00000000     0        0 41003 1 0000000000000000 20 4 30 10 -1
";
        assert_eq!(tcp_listeners(table, 15001), vec![41001]);
        assert_eq!(tcp_listeners(table, 15000), vec![41002]);
        assert!(tcp_listeners(table, 80).is_empty());
        assert!(tcp_listeners("garbage\nmore garbage", 15001).is_empty());
    }

    #[test]
    fn the_admin_listener_is_the_accepting_socket_at_the_path() {
        let table = "Num       RefCount Protocol Flags    Type St Inode Path
0000000000000000: 00000002 00000000 00010000 0001 01 52001 /tmp/n/admin.sock
0000000000000000: 00000003 00000000 00000000 0001 03 52002 /tmp/n/admin.sock
0000000000000000: 00000002 00000000 00010000 0001 01 52003 /tmp/n/other.sock
0000000000000000: 00000003 00000000 00000000 0001 03 52004
";
        let admin = Path::new("/tmp/n/admin.sock");
        assert_eq!(unix_listeners(table, admin), vec![52001]);
        assert!(unix_listeners(table, Path::new("/nowhere")).is_empty());
    }
}
