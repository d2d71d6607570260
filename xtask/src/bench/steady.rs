//! What the soak and restart cases share: a one-node cluster with weft, a server pod behind a
//! Service, an enrolled client pod running `weft-testpod steady` (the load, bounded in time),
//! and what the client reports ([`LoadSummary`]).
//!
//! ```text
//! steady-mesh/client ──connect(clusterIP:80|81)──eBPF──▶ weft :15001 ──▶ steady-srv/server echo :8080|:8081
//! steady-mesh/client ──clusterIP:8090 `http`────eBPF──▶ weft (L7) ────▶ steady-srv/server HTTP :8090
//! ```
//!
//! The echo server is `weft-testpod serve --tasks` (one tokio task per connection: tens of
//! thousands of idle connections on one thread); the HTTP server is `serve --mode http`. The
//! bench raises its open-file limit (soft and hard) to `fs.nr_open` where it may, as a
//! container runtime gives a DaemonSet, else the soft one to the hard one; weft and the pods'
//! processes inherit it (10 000 proxied connections are 60 000 descriptors in weft).

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;
use weft_tests::{
    labels, netns, testpod_bin, wait_for_tcp, Cluster, InNetns, Node, Pod, PodSpec, Proc,
    ServiceSpec,
};

/// The echo server's ports (two, so connections spread over two upstream addresses) and the
/// HTTP server's.
const ECHO_PORTS: [u16; 2] = [8080, 8081];
const HTTP_PORT: u16 = 8090;
/// The Service's ports for the echo server.
const SVC_ECHO_PORTS: [u16; 2] = [80, 81];
/// Kept out of the ephemeral range: tens of thousands of connections must not take them.
const LISTEN_PORTS: &str = "8080-8091";

/// A one-node cluster for a long-running load through weft.
pub(super) struct SteadyCluster {
    pub(super) cluster: Cluster,
    pub(super) node: Node,
    pub(super) client: Pod,
    pub(super) echo: Vec<SocketAddr>,
    pub(super) http: SocketAddr,
    /// The servers, killed with the cluster.
    _servers: Vec<Proc>,
}

impl SteadyCluster {
    pub(super) fn new(name: &str) -> Result<SteadyCluster> {
        raise_fd_limit()?;
        let cluster = Cluster::new(name)?;
        let node = cluster.add_node("node-a")?;
        let server = cluster.add_pod(
            &node,
            PodSpec::new("steady-srv", "server")
                .label("app", "steady-srv")
                .port("tcp-echo", ECHO_PORTS[0])
                .port("tcp-echo-2", ECHO_PORTS[1])
                .port("http", HTTP_PORT),
        )?;
        let svc = cluster.add_service(
            ServiceSpec::new("steady-srv", "steady")
                .selector("app", "steady-srv")
                .port("tcp-echo", SVC_ECHO_PORTS[0], ECHO_PORTS[0], None)
                .port("tcp-echo-2", SVC_ECHO_PORTS[1], ECHO_PORTS[1], None)
                // Named `http`: weft serves it per request (L7).
                .port("http", HTTP_PORT, HTTP_PORT, None),
        )?;
        let client = cluster.add_pod(&node, PodSpec::new("steady-mesh", "client"))?;
        cluster.set_namespace_labels("steady-mesh", labels(&[("weft.dev/mesh", "enabled")]))?;
        cluster.sync_registry_to(&cluster.default_registry_path())?;
        for ns in [node.netns_name(), client.netns_name(), server.netns_name()] {
            netns::sysctls(
                ns,
                &[
                    ("net.ipv4.ip_local_port_range", "1024 65535"),
                    ("net.ipv4.tcp_tw_reuse", "1"),
                    ("net.ipv4.ip_local_reserved_ports", LISTEN_PORTS),
                ],
            )?;
        }
        let mut servers = Vec::new();
        let mut echo = vec!["serve", "--mode", "echo", "--tasks"];
        let listen: Vec<String> = ECHO_PORTS.iter().map(|p| format!("0.0.0.0:{p}")).collect();
        for l in &listen {
            echo.extend(["--listen", l.as_str()]);
        }
        servers.push(server.spawn(Command::new(testpod_bin()).args(&echo))?);
        let http_listen = format!("0.0.0.0:{HTTP_PORT}");
        servers.push(server.spawn(Command::new(testpod_bin()).args([
            "serve",
            "--listen",
            &http_listen,
            "--mode",
            "http",
            "--name",
            "steady-srv",
        ]))?);
        for port in ECHO_PORTS.into_iter().chain([HTTP_PORT]) {
            wait_for_tcp(&client, server.addr(port), Duration::from_secs(10))?;
        }
        Ok(SteadyCluster {
            echo: SVC_ECHO_PORTS
                .iter()
                .map(|&p| SocketAddr::from((svc.cluster_ip, p)))
                .collect(),
            http: SocketAddr::from((svc.cluster_ip, HTTP_PORT)),
            cluster,
            node,
            client,
            _servers: servers,
        })
    }

    /// Starts `weft-testpod steady` in the client pod with the echo and HTTP addresses and
    /// `args` (the loads and the duration).
    pub(super) fn start_load(&self, args: &[String]) -> Result<Proc> {
        let mut cmd = Command::new(testpod_bin());
        cmd.arg("steady");
        for a in &self.echo {
            cmd.args(["--tcp", &a.to_string()]);
        }
        cmd.args(["--http", &self.http.to_string()]).args(args);
        self.client.spawn(&cmd)
    }

    /// One echo and one HTTP request through weft, retried for a few seconds: the paths work
    /// before the load starts.
    pub(super) fn check(&self) -> Result<()> {
        let mut last = String::new();
        for _ in 0..20 {
            let out = self.client.output_timeout(
                Command::new(testpod_bin())
                    .arg("steady")
                    .args(["--tcp", &self.echo[0].to_string()])
                    .args(["--http", &self.http.to_string()])
                    .args(["--churn-rate", "5", "--http-new-rate", "5"])
                    .args(["--duration-s", "1", "--timeout-ms", "2000"]),
                Duration::from_secs(20),
            )?;
            if out.status.success() {
                return Ok(());
            }
            last = format!(
                "{} {}",
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        bail!("the paths through weft do not answer: {last}")
    }
}

/// Raises this process's open-file limit to `fs.nr_open` (soft and hard), or where that is not
/// allowed (no `CAP_SYS_RESOURCE`) the soft limit to the hard one: weft and the pods' processes
/// inherit it.
fn raise_fd_limit() -> Result<()> {
    let nr_open: libc::rlim_t = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20);
    let all = libc::rlimit {
        rlim_cur: nr_open,
        rlim_max: nr_open,
    };
    // SAFETY: getrlimit/setrlimit with valid structs.
    unsafe {
        if libc::setrlimit(libc::RLIMIT_NOFILE, &all) == 0 {
            return Ok(());
        }
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &r) == 0 {
                return Ok(());
            }
        }
    }
    bail!(
        "raising the open-file limit: {}",
        std::io::Error::last_os_error()
    )
}

/// Whether `weft node` under test takes `flag` (its `--help` names it).
pub(super) fn weft_has_flag(flag: &str) -> bool {
    Command::new(weft_tests::weft_bin())
        .args(["node", "--help"])
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                .any(|w| w == flag)
        })
}

/// Open-file limit in force for this process (what weft inherits).
pub(super) fn fd_limit() -> u64 {
    // SAFETY: getrlimit into a local struct.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 0;
        }
        r.rlim_cur as u64
    }
}

/// The load client's JSON (see `weft-testpod steady`).
pub(super) struct LoadSummary {
    pub(super) json: Value,
}

/// The loads of `weft-testpod steady`, by their JSON name.
pub(super) const LOADS: [&str; 5] = ["hold", "stream", "churn", "http", "http_new"];

/// A report's closing "Notes:" list, if there is anything to note.
pub(super) fn write_notes(s: &mut String, notes: &[String]) {
    use std::fmt::Write as _;
    if !notes.is_empty() {
        let _ = writeln!(s, "\nNotes:\n");
        for n in notes {
            let _ = writeln!(s, "- {n}");
        }
    }
}

impl LoadSummary {
    /// Waits for the client to exit (at most `limit`) and reads its JSON.
    pub(super) fn wait(mut client: Proc, limit: Duration) -> Result<LoadSummary> {
        if client.wait_timeout(limit)?.is_none() {
            client.kill();
            bail!(
                "the load client did not end within {limit:?}; stderr: {}",
                client.stderr()
            );
        }
        let out = client.stdout();
        let json: Value = serde_json::from_str(out.trim()).with_context(|| {
            format!(
                "no summary from the load client: {} {}",
                out.trim(),
                client.stderr()
            )
        })?;
        Ok(LoadSummary { json })
    }

    pub(super) fn u(&self, ptr: &str) -> u64 {
        self.json.pointer(ptr).and_then(Value::as_u64).unwrap_or(0)
    }

    /// Failures of one load for one cause (`refused`, `reset`, …).
    pub(super) fn failures(&self, load: &str, why: &str) -> u64 {
        self.u(&format!("/loads/{load}/failures/{why}"))
    }

    /// Failure events: (ms since the client's start, load, cause, text).
    pub(super) fn events(&self) -> Vec<(u64, String, String, String)> {
        let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        self.json
            .get("events")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|e| {
                (
                    e.get("t_ms").and_then(Value::as_u64).unwrap_or(0),
                    s(e, "load"),
                    s(e, "why"),
                    s(e, "what"),
                )
            })
            .collect()
    }

    /// The first `most` failure events as report notes, and how many more there were.
    pub(super) fn event_notes(&self, most: usize) -> Vec<String> {
        let events = self.events();
        let mut notes: Vec<String> = events
            .iter()
            .take(most)
            .map(|(t, load, why, what)| {
                format!("at {:.2} s {load} {why}: {what}", *t as f64 / 1000.0)
            })
            .collect();
        if events.len() > most {
            notes.push(format!(
                "… {} more failure events in the client's output",
                events.len() - most
            ));
        }
        notes
    }

    /// The client's start, as milliseconds since the Unix epoch.
    pub(super) fn start_unix_ms(&self) -> u64 {
        self.u("/start_unix_ms")
    }
}

/// Milliseconds since the Unix epoch now.
pub(super) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `MemAvailable` of `/proc/meminfo`, KiB.
pub(super) fn mem_available_kib() -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
