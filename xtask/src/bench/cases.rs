//! What the benchmark measures: the throughput and latency cases ([`Case`]), the connect()
//! latency cases ([`LatCase`]), one client run and the numbers read out of it ([`Run`]),
//! everything collected over a whole benchmark ([`Results`], the HTTP cases' too), and how one
//! case is run in its client pod (the `weft-testpod bench` command, CPU sampling and pinning).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;
use weft_tests::{testpod_bin, Pod, Weft};

use super::http::{HttpCase, HttpRun, HttpTunnel, PeakRss};
use super::machine::{bpf_prog_stats, cgroup_cpu_us, online_cpus, pin_cgroup_threads};
use super::topology::{Bench, Topology};
use super::PathKind;

/// Pace of the connect() latency client: light load, well below what every path sustains (a
/// closed loop of bare connects outruns a proxy's accept loop and then measures SYN drops).
pub(super) const LATENCY_RATE: u64 = 2000;
/// Pace of the "one new connection" client: one connect + echo + close at a time, on an
/// otherwise idle path (the latency of a new connection, not of a queue of them).
pub(super) const CONNECT_ONE_RATE: u64 = 1000;

/// A measured case: one `weft-testpod bench` invocation per path and repetition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub(super) enum Case {
    /// connect + 64 B echo + close, `--parallel` clients.
    Connect,
    /// The same with one client paced to [`CONNECT_ONE_RATE`]: one new connection on an idle
    /// path.
    ConnectOne,
    /// `ConnectOne` with the client, the server and the proxies on one CPU: the software path
    /// of a new connection, without cross-CPU wake-ups.
    ConnectOneCpu,
    /// 1 KiB echo round trips on one persistent connection.
    Rr,
    /// The same with the client, the server and the proxies on one CPU: no cross-CPU wake-ups,
    /// so the round trip is the software path alone.
    RrOneCpu,
    /// Bulk send to the discard server on one connection.
    Stream,
}

impl Case {
    pub(super) const ALL: [Case; 6] = [
        Case::Connect,
        Case::ConnectOne,
        Case::ConnectOneCpu,
        Case::Rr,
        Case::RrOneCpu,
        Case::Stream,
    ];

    pub(super) fn name(self) -> &'static str {
        match self {
            Case::Connect => "connect",
            Case::ConnectOne => "connect-one",
            Case::ConnectOneCpu => "connect-one-cpu",
            Case::Rr => "rr",
            Case::RrOneCpu => "rr-one-cpu",
            Case::Stream => "stream",
        }
    }

    /// The `weft-testpod bench` kind.
    fn kind(self) -> &'static str {
        match self {
            Case::Connect | Case::ConnectOne | Case::ConnectOneCpu => "connect",
            Case::Rr | Case::RrOneCpu => "rr",
            Case::Stream => "stream",
        }
    }

    fn size(self) -> u64 {
        match self {
            Case::Connect | Case::ConnectOne | Case::ConnectOneCpu => 64,
            Case::Rr | Case::RrOneCpu => 1024,
            Case::Stream => 128 * 1024,
        }
    }
}

/// connect() latency cases (non-enrolled without/with the eBPF programs, enrolled via weft).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum LatCase {
    PlainNoBpf,
    PlainBpf,
    EnrolledWeft,
}

impl LatCase {
    pub(super) const ALL: [LatCase; 3] = [
        LatCase::PlainNoBpf,
        LatCase::PlainBpf,
        LatCase::EnrolledWeft,
    ];

    pub(super) fn label(self) -> &'static str {
        match self {
            LatCase::PlainNoBpf => "non-enrolled → pod IP, no eBPF programs (weft never started)",
            LatCase::PlainBpf => "non-enrolled → pod IP, eBPF programs attached (weft running)",
            LatCase::EnrolledWeft => "enrolled → Service clusterIP, rewritten to weft :15001",
        }
    }

    /// The path whose client and echo address the case connects with.
    fn path(self) -> PathKind {
        match self {
            LatCase::PlainNoBpf | LatCase::PlainBpf => PathKind::Direct,
            LatCase::EnrolledWeft => PathKind::Weft,
        }
    }
}

/// One run's outcome: the client's JSON and the node-side CPU time spent meanwhile.
#[derive(Clone, Debug)]
pub(super) struct Run {
    pub(super) json: Value,
    /// CPU time (µs) of the processes in each node's system cgroup (the proxies) during the
    /// run, in the topology's node order (cross-node: node-1, node-2).
    pub(super) node_cpu_us: Vec<Option<u64>>,
}

impl Run {
    pub(super) fn f(&self, ptr: &str) -> Option<f64> {
        self.json.pointer(ptr).and_then(Value::as_f64)
    }

    fn errors(&self) -> u64 {
        self.json.get("errors").and_then(Value::as_u64).unwrap_or(0)
    }

    /// CPU µs of node `node`'s proxies during the run, or of all nodes' (`None`).
    fn cpu_us(&self, node: Option<usize>) -> Option<u64> {
        match node {
            Some(i) => self.node_cpu_us.get(i).copied().flatten(),
            None => self.node_cpu_us.iter().copied().sum(),
        }
    }

    /// Node-side CPU µs per operation (warm-up included: the CPU is sampled around the whole
    /// client run). Stream: CPU ms per GB moved. `node`: one node's proxies, or all (`None`).
    pub(super) fn cpu_per_op(&self, case: Case, node: Option<usize>) -> Option<f64> {
        let cpu = self.cpu_us(node)? as f64;
        if case == Case::Stream {
            let bytes = self.f("/bytes")? + self.f("/warmup_bytes")?;
            return (bytes > 0.0).then(|| cpu / 1000.0 / (bytes / 1e9));
        }
        let ops = self.f("/ops")? + self.f("/warmup_ops")?;
        (ops > 0.0).then(|| cpu / ops)
    }
}

/// Everything measured, plus what went wrong.
#[derive(Default)]
pub(super) struct Results {
    pub(super) runs: BTreeMap<(Topology, Case, PathKind), Vec<Run>>,
    pub(super) lat: BTreeMap<LatCase, Vec<Run>>,
    /// eBPF program → (runs, total ns) during each connect() latency case.
    pub(super) bpf: BTreeMap<LatCase, BTreeMap<String, (u64, u64)>>,
    /// HBONE counters of the cross-node run: after the warm-up, and at the end.
    pub(super) tunnel: Option<(TunnelCounts, TunnelCounts)>,
    pub(super) http: BTreeMap<(Topology, HttpCase, PathKind), Vec<HttpRun>>,
    /// The proxies' memory over the HTTP cases, per topology.
    pub(super) http_rss: Vec<PeakRss>,
    /// HBONE counters around the cross-node HTTP cases.
    pub(super) http_tunnel: Option<HttpTunnel>,
    /// Where each topology's cluster kept its logs.
    pub(super) logs: Vec<(Topology, PathBuf)>,
    pub(super) notes: Vec<String>,
}

impl Results {
    /// A client run of `what`, or `None` with a note saying why there is none. A run whose client
    /// counted errors is kept, with a note.
    pub(super) fn checked(&mut self, what: &str, run: Result<Run>) -> Option<Run> {
        match run {
            Ok(r) => {
                if r.errors() > 0 {
                    self.notes.push(format!(
                        "{what}: {} errors, e.g. {}",
                        r.errors(),
                        r.json["error_samples"]
                    ));
                }
                Some(r)
            }
            Err(e) => {
                self.notes.push(format!("{what}: {e:#}"));
                None
            }
        }
    }
}

/// HBONE counters from `weft status` on the two nodes of the cross-node run.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct TunnelCounts {
    /// node-1 (client side): TLS connections its pool opened, and tunnels (streams) opened.
    pub(super) opened: Option<u64>,
    pub(super) streams: Option<u64>,
    /// node-2 (server side): TLS handshakes accepted, streams received.
    pub(super) accepted: Option<u64>,
    pub(super) streams_in: Option<u64>,
}

impl TunnelCounts {
    pub(super) fn read(client: &Weft, server: &Weft) -> TunnelCounts {
        let get = |w: &Weft, ptr: &str| {
            w.status()
                .ok()
                .and_then(|v| v.pointer(ptr).and_then(Value::as_u64))
        };
        TunnelCounts {
            opened: get(client, "/tunnel/outbound/connections_opened_total"),
            streams: get(client, "/tunnel/outbound/streams_opened_total"),
            accepted: get(server, "/tunnel/inbound/tls_accepted"),
            streams_in: get(server, "/tunnel/inbound/streams_total"),
        }
    }
}

impl Bench {
    /// One run of `case` on `path`.
    pub(super) fn case(&self, case: Case, path: PathKind) -> Result<Run> {
        let (pod, echo, discard) = self.target(path);
        let (addr, parallel) = match case {
            Case::Connect => (echo, self.args.parallel),
            Case::ConnectOne | Case::ConnectOneCpu | Case::Rr | Case::RrOneCpu => (echo, 1),
            Case::Stream => (discard, 1),
        };
        let mut cmd = self.bench_cmd(case.kind(), addr, parallel, case.size());
        if matches!(case, Case::ConnectOne | Case::ConnectOneCpu) {
            cmd.args(["--rate", &CONNECT_ONE_RATE.to_string()]);
        }
        if !matches!(case, Case::RrOneCpu | Case::ConnectOneCpu) {
            return self.client(pod, &cmd);
        }
        // Everything on CPU 0.
        self.pinned(pod, &cmd, 0, &[0])
    }

    /// One run of a connect() latency case, with the eBPF program statistics around it, added
    /// to `res`.
    pub(super) fn latency(&self, case: LatCase, res: &mut Results) {
        eprintln!("bench: connect() latency: {}", case.label());
        let (pod, addr, _) = self.target(case.path());
        let mut cmd = self.bench_cmd("connect-latency", addr, 1, 1);
        cmd.args(["--rate", &LATENCY_RATE.to_string()]);
        // The handshake is processed in the client's context (veth → node → veth), so with the
        // client alone on CPU 0 the call is timed without the accepting side's work in it.
        let stats0 = bpf_prog_stats(self.nodes[0].bpffs_dir());
        let r = if online_cpus() >= 2 {
            self.pinned(pod, &cmd, 0, &[1])
        } else {
            self.client(pod, &cmd)
        };
        let stats1 = bpf_prog_stats(self.nodes[0].bpffs_dir());
        let acc = res.bpf.entry(case).or_default();
        for (name, (n1, t1)) in stats1 {
            let (n0, t0) = stats0.get(&name).copied().unwrap_or_default();
            let e = acc.entry(name).or_default();
            e.0 += n1.saturating_sub(n0);
            e.1 += t1.saturating_sub(t0);
        }
        if let Some(r) = res.checked(&format!("connect-latency {}", case.label()), r) {
            res.lat.entry(case).or_default().push(r);
        }
    }

    fn bench_cmd(&self, kind: &str, addr: SocketAddr, parallel: u64, size: u64) -> Command {
        let mut cmd = Command::new(testpod_bin());
        cmd.args(["bench", kind, &addr.to_string()])
            .args(["--duration-ms", &self.args.duration_ms.to_string()])
            .args(["--warmup-ms", &self.args.warmup_ms.to_string()])
            .args(["--parallel", &parallel.to_string()])
            .args(["--size", &size.to_string()]);
        cmd
    }

    /// Runs one client in `pod`, sampling the node-side CPU around it.
    fn client(&self, pod: &Pod, cmd: &Command) -> Result<Run> {
        let limit = Duration::from_millis(self.args.duration_ms + self.args.warmup_ms)
            + Duration::from_secs(30);
        let cpu = || -> Vec<Option<u64>> {
            self.nodes
                .iter()
                .map(|n| cgroup_cpu_us(n.system_cgroup()))
                .collect()
        };
        let cpu0 = cpu();
        let out = pod.output_timeout(cmd, limit)?;
        let cpu1 = cpu();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let json: Value = serde_json::from_str(stdout.trim()).with_context(|| {
            format!(
                "no result from the client ({}): {} {}",
                out.status,
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })?;
        Ok(Run {
            json,
            node_cpu_us: cpu0
                .into_iter()
                .zip(cpu1)
                .map(|(a, b)| a.zip(b).map(|(a, b)| b.saturating_sub(a)))
                .collect(),
        })
    }

    /// Runs the client on CPU `client_cpu` with the server's and the node processes' threads
    /// on `others` (all CPUs again afterwards).
    fn pinned(&self, pod: &Pod, cmd: &Command, client_cpu: usize, others: &[usize]) -> Result<Run> {
        let all: Vec<usize> = (0..online_cpus()).collect();
        let groups: Vec<&Path> = std::iter::once(self.server.container_cgroup())
            .chain(self.nodes.iter().map(|n| n.system_cgroup()))
            .collect();
        for &g in &groups {
            pin_cgroup_threads(g, others)?;
        }
        let mut pinned = Command::new("taskset");
        pinned
            .args(["-c", &client_cpu.to_string()])
            .arg(cmd.get_program())
            .args(cmd.get_args());
        let r = self.client(pod, &pinned);
        for &g in &groups {
            pin_cgroup_threads(g, &all)?;
        }
        r
    }
}
