//! `cargo xtask bench`: weft's data path against a direct connection and two established TCP
//! proxies (haproxy, nginx) on a one-node cluster, and weft's cross-node mesh path (HBONE)
//! against direct TCP between two nodes; clusters built with the weft-tests harness.
//!
//! Single node (all pods on one node):
//!
//! ```text
//! bench-plain/client ──────────────────────────────────────────────▶ bench-srv/server  (direct)
//! bench-mesh/client ──connect(clusterIP)──eBPF──▶ weft :15001 ──────▶ bench-srv/server  (weft)
//! bench-plain/client ──▶ node IP:18080 haproxy (mode tcp) ──────────▶ bench-srv/server  (haproxy)
//! bench-plain/client ──▶ node IP:18180 nginx (stream proxy_pass) ───▶ bench-srv/server  (nginx)
//! ```
//!
//! Cross-node (clients on node-1, the server on node-2; `bench-mesh` and `bench-srv` enrolled):
//!
//! ```text
//! node-1 bench-plain/client ──── node-1 ── fabric ── node-2 ───────────────▶ bench-srv/server  (direct)
//! node-1 bench-mesh/client ──eBPF──▶ weft node-1 :15001 ══ HBONE mTLS h2 ══▶ weft node-2 :15008
//!                                                                   ──────▶ bench-srv/server  (weft)
//! ```
//!
//! Every case runs the same `weft-testpod bench` client against the same `weft-testpod serve`
//! server (echo on 8080, discard on 8081) for the same time, after a warm-up; each case is
//! repeated and the median is reported, with the ratio to the direct path.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use serde_json::Value;
use weft_tests::{
    labels, netns, testpod_bin, wait_for_tcp, Cluster, InNetns, Node, Pod, PodSpec, Proc,
    ServiceSpec, Weft,
};

use crate::{cargo, require_root, workspace_root};

const ECHO_PORT: u16 = 8080;
const DISCARD_PORT: u16 = 8081;
const SVC_ECHO_PORT: u16 = 80;
const SVC_DISCARD_PORT: u16 = 81;
const HAPROXY_PORTS: (u16, u16) = (18080, 18081);
const NGINX_PORTS: (u16, u16) = (18180, 18181);
const NGINX_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";
/// Pace of the connect() latency client: light load, well below what every path sustains (a
/// closed loop of bare connects outruns a proxy's accept loop and then measures SYN drops).
const LATENCY_RATE: u64 = 2000;
/// Server threads per listener (no thread creation per connection on the server side).
const SERVER_WORKERS: &str = "64";
/// Pace of the "one new connection" client: one connect + echo + close at a time, on an
/// otherwise idle path (the latency of a new connection, not of a queue of them).
const CONNECT_ONE_RATE: u64 = 1000;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Measured time of each case, per repetition.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    duration_ms: u64,
    /// Warm-up before each measurement (same work, not counted).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    warmup_ms: u64,
    /// Repetitions of every case; the table shows medians.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=9))]
    reps: u64,
    /// Parallel clients in the new-connections case.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
    parallel: u64,
    /// Paths to measure (comma separated). `direct` is always measured: it is the reference.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "direct,weft,haproxy,nginx"
    )]
    paths: Vec<PathKind>,
    /// Run one topology only (default: both, single node first). Cross-node measures `direct`
    /// and `weft` (haproxy and nginx are single-node only).
    #[arg(long, value_enum)]
    only: Option<Topology>,
    /// Also write the report (Markdown) to this file.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Use target/release as it is instead of running `cargo build --release --bins` first.
    #[arg(long)]
    no_build: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum PathKind {
    Direct,
    Weft,
    Haproxy,
    Nginx,
}

/// A cluster layout measured in the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Topology {
    /// One node: every client, the server and the proxies on it.
    SingleNode,
    /// Two nodes: clients on node-1, the server on node-2, weft on both (HBONE between them).
    CrossNode,
}

impl Topology {
    fn name(self) -> &'static str {
        match self {
            Topology::SingleNode => "single-node",
            Topology::CrossNode => "cross-node",
        }
    }
}

impl PathKind {
    fn name(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::Weft => "weft",
            PathKind::Haproxy => "haproxy",
            PathKind::Nginx => "nginx",
        }
    }
}

/// A measured case: one `weft-testpod bench` invocation per path and repetition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Case {
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
    const ALL: [Case; 6] = [
        Case::Connect,
        Case::ConnectOne,
        Case::ConnectOneCpu,
        Case::Rr,
        Case::RrOneCpu,
        Case::Stream,
    ];

    fn name(self) -> &'static str {
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
enum LatCase {
    PlainNoBpf,
    PlainBpf,
    EnrolledWeft,
}

impl LatCase {
    fn label(self) -> &'static str {
        match self {
            LatCase::PlainNoBpf => "non-enrolled → pod IP, no eBPF programs (weft never started)",
            LatCase::PlainBpf => "non-enrolled → pod IP, eBPF programs attached (weft running)",
            LatCase::EnrolledWeft => "enrolled → Service clusterIP, rewritten to weft :15001",
        }
    }
}

/// One run's outcome: the client's JSON and the node-side CPU time spent meanwhile.
#[derive(Clone, Debug)]
struct Run {
    json: Value,
    /// CPU time (µs) of the processes in each node's system cgroup (the proxies) during the
    /// run, in the topology's node order (cross-node: node-1, node-2).
    node_cpu_us: Vec<Option<u64>>,
}

impl Run {
    fn f(&self, ptr: &str) -> Option<f64> {
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
    fn cpu_per_op(&self, case: Case, node: Option<usize>) -> Option<f64> {
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
struct Results {
    runs: BTreeMap<(Topology, Case, PathKind), Vec<Run>>,
    lat: BTreeMap<LatCase, Vec<Run>>,
    /// eBPF program → (runs, total ns) during each connect() latency case.
    bpf: BTreeMap<LatCase, BTreeMap<String, (u64, u64)>>,
    /// HBONE counters of the cross-node run: after the warm-up, and at the end.
    tunnel: Option<(TunnelCounts, TunnelCounts)>,
    /// Where each topology's cluster kept its logs.
    logs: Vec<(Topology, PathBuf)>,
    notes: Vec<String>,
}

/// HBONE counters from `weft status` on the two nodes of the cross-node run.
#[derive(Clone, Copy, Debug, Default)]
struct TunnelCounts {
    /// node-1 (client side): TLS connections its pool opened, and tunnels (streams) opened.
    opened: Option<u64>,
    streams: Option<u64>,
    /// node-2 (server side): TLS handshakes accepted, streams received.
    accepted: Option<u64>,
    streams_in: Option<u64>,
}

impl TunnelCounts {
    fn read(client: &Weft, server: &Weft) -> TunnelCounts {
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

/// One topology's cluster and what runs in it.
struct Bench {
    topo: Topology,
    cluster: Cluster,
    /// The client node first; the server's node last (the same node in single-node).
    nodes: Vec<Node>,
    server: Pod,
    plain: Pod,
    mesh: Pod,
    svc_ip: std::net::Ipv4Addr,
    procs: Vec<Proc>,
    args: Args,
}

pub fn run(args: Args) -> Result<()> {
    crate::setup::run()?;
    require_root("the benchmark builds a cluster of network namespaces and loads eBPF programs")?;
    if !args.no_build {
        cargo(&["build", "--release", "--bins"])?;
    }
    let release = target_dir().join("release");
    let (weft, testpod) = (release.join("weft"), release.join("weft-testpod"));
    let need_weft = args.paths.contains(&PathKind::Weft);
    for b in [&weft, &testpod] {
        if !b.exists() && (need_weft || *b == testpod) {
            bail!(
                "{} is missing (build with `cargo build --release --bins`)",
                b.display()
            );
        }
    }
    // The harness starts binaries from these (single-threaded here: nothing reads env yet).
    std::env::set_var("WEFT_BIN", &weft);
    std::env::set_var("WEFT_TESTPOD_BIN", &testpod);
    // weft logs one line per flow at info; haproxy and nginx run here without access logs.
    // Compare like with like unless asked otherwise.
    if std::env::var_os("WEFT_LOG").is_none() {
        std::env::set_var("WEFT_LOG", "warn");
    }

    let command = std::iter::once("cargo xtask bench".to_string())
        .chain(std::env::args().skip(2))
        .collect::<Vec<_>>()
        .join(" ");
    let machine = Machine::probe();
    let started = Instant::now();
    let mut paths = args.paths.clone();
    paths.push(PathKind::Direct);
    paths.sort();
    paths.dedup();

    let topos = match args.only {
        Some(t) => vec![t],
        None => vec![Topology::SingleNode, Topology::CrossNode],
    };
    let mut res = Results::default();
    // One topology at a time: the first cluster is gone before the next is built.
    for topo in topos {
        if topo == Topology::CrossNode && !paths.contains(&PathKind::Weft) {
            res.notes.push(
                "cross-node left out: it compares weft with direct, and weft is not in --paths"
                    .into(),
            );
            continue;
        }
        let mut b = match Bench::new(topo, args.clone()) {
            Ok(b) => b,
            Err(e) => {
                res.notes.push(format!(
                    "{} left out: building the cluster: {e:#}",
                    topo.name()
                ));
                continue;
            }
        };
        eprintln!(
            "bench: {} cluster {} up; logs in {}",
            topo.name(),
            b.cluster.id(),
            b.cluster.logs_dir().display()
        );
        res.logs.push((topo, b.cluster.logs_dir().to_path_buf()));
        match topo {
            Topology::SingleNode => b.measure(&paths, &mut res),
            Topology::CrossNode => b.measure_cross(&mut res),
        }
    }
    let report = report(&command, &machine, &args, &paths, &res, started.elapsed());
    print!("{report}");
    if let Some(out) = &args.output {
        std::fs::write(out, &report).with_context(|| format!("writing {}", out.display()))?;
        eprintln!("bench: report written to {}", out.display());
    }
    Ok(())
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| {
            if p.is_absolute() {
                p
            } else {
                workspace_root().join(p)
            }
        })
        .unwrap_or_else(|| workspace_root().join("target"))
}

impl Bench {
    fn new(topo: Topology, args: Args) -> Result<Bench> {
        let (cluster, nodes) = match topo {
            Topology::SingleNode => {
                let c = Cluster::new("bench")?;
                let n = c.add_node("node-a")?;
                (c, vec![n])
            }
            Topology::CrossNode => {
                let c = Cluster::new("bench-cross")?;
                let nodes = vec![c.add_node("node-1")?, c.add_node("node-2")?];
                (c, nodes)
            }
        };
        let (client_node, server_node) = (&nodes[0], &nodes[nodes.len() - 1]);
        let server = cluster.add_pod(
            server_node,
            PodSpec::new("bench-srv", "server")
                .label("app", "bench-srv")
                .port("tcp-echo", ECHO_PORT)
                .port("tcp-discard", DISCARD_PORT),
        )?;
        let svc = cluster.add_service(
            ServiceSpec::new("bench-srv", "bench")
                .selector("app", "bench-srv")
                .port("tcp-echo", SVC_ECHO_PORT, ECHO_PORT, None)
                .port("tcp-discard", SVC_DISCARD_PORT, DISCARD_PORT, None),
        )?;
        let mesh = cluster.add_pod(client_node, PodSpec::new("bench-mesh", "client"))?;
        let plain = cluster.add_pod(client_node, PodSpec::new("bench-plain", "client"))?;
        let enrolled = labels(&[("weft.dev/mesh", "enabled")]);
        cluster.set_namespace_labels("bench-mesh", enrolled.clone())?;
        if topo == Topology::CrossNode {
            // A mesh pod on another node: weft carries the connection over HBONE.
            cluster.set_namespace_labels("bench-srv", enrolled)?;
        }
        cluster.sync_registry_to(&cluster.default_registry_path())?;
        // Tens of thousands of short connections per case: let every side reuse TIME_WAIT ports
        // (these namespaces only; the same for every path).
        let namespaces = nodes.iter().map(|n| n.netns_name()).chain([
            mesh.netns_name(),
            plain.netns_name(),
            server.netns_name(),
        ]);
        for ns in namespaces {
            netns::sysctls(
                ns,
                &[
                    ("net.ipv4.ip_local_port_range", "1024 65535"),
                    ("net.ipv4.tcp_tw_reuse", "1"),
                ],
            )?;
        }
        let mut procs = Vec::new();
        for (port, mode) in [(ECHO_PORT, "echo"), (DISCARD_PORT, "discard")] {
            let listen = format!("0.0.0.0:{port}");
            procs.push(server.spawn(Command::new(testpod_bin()).args([
                "serve",
                "--listen",
                &listen,
                "--mode",
                mode,
                "--workers",
                SERVER_WORKERS,
            ]))?);
            wait_for_tcp(&plain, server.addr(port), Duration::from_secs(10))?;
        }
        Ok(Bench {
            topo,
            svc_ip: svc.cluster_ip,
            cluster,
            nodes,
            server,
            plain,
            mesh,
            procs,
            args,
        })
    }

    /// The client pod and (echo, discard) addresses of a path.
    fn target(&self, path: PathKind) -> (&Pod, SocketAddr, SocketAddr) {
        let ip = self.nodes[0].ip();
        let node = |(e, d): (u16, u16)| (SocketAddr::from((ip, e)), SocketAddr::from((ip, d)));
        let (pod, (echo, discard)) = match path {
            PathKind::Direct => (
                &self.plain,
                (self.server.addr(ECHO_PORT), self.server.addr(DISCARD_PORT)),
            ),
            PathKind::Weft => (
                &self.mesh,
                (
                    SocketAddr::from((self.svc_ip, SVC_ECHO_PORT)),
                    SocketAddr::from((self.svc_ip, SVC_DISCARD_PORT)),
                ),
            ),
            PathKind::Haproxy => (&self.plain, node(HAPROXY_PORTS)),
            PathKind::Nginx => (&self.plain, node(NGINX_PORTS)),
        };
        (pod, echo, discard)
    }

    fn measure(&mut self, paths: &[PathKind], res: &mut Results) {
        let reps = self.args.reps;
        // 1. connect() latency on a fresh node: no weft has run, so no programs are attached.
        for _ in 0..reps {
            let addr = self.server.addr(ECHO_PORT);
            self.latency(LatCase::PlainNoBpf, &self.plain, addr, res);
        }
        // 2. The proxies. A path that does not come up is reported and left out.
        let mut live: Vec<PathKind> = vec![PathKind::Direct];
        let mut weft = None;
        for &p in paths {
            let up = match p {
                PathKind::Direct => continue,
                PathKind::Haproxy => self.start_haproxy(),
                PathKind::Nginx => self.start_nginx(),
                PathKind::Weft => Weft::start(&self.cluster, &self.nodes[0]).map(|w| {
                    weft = Some(w);
                }),
            };
            let up = up.and_then(|_| self.check(p));
            match up {
                Ok(()) => live.push(p),
                Err(e) => res.notes.push(format!("{} left out: {e:#}", p.name())),
            }
        }
        // Weft's programs stay attached when weft runs; the other paths are measured in the
        // same conditions (a non-enrolled connect() runs the program and returns).
        if weft.is_none() && paths.contains(&PathKind::Weft) {
            res.notes.push(
                "weft did not start: the other paths ran without eBPF programs attached".into(),
            );
        }
        // 3. Throughput and latency.
        self.run_cases(&live, res);
        // 4. connect() latency with the programs attached.
        if weft.is_some() {
            let _stats = BpfStats::enable();
            for _ in 0..reps {
                let addr = self.server.addr(ECHO_PORT);
                self.latency(LatCase::PlainBpf, &self.plain, addr, res);
                let addr = SocketAddr::from((self.svc_ip, SVC_ECHO_PORT));
                self.latency(LatCase::EnrolledWeft, &self.mesh, addr, res);
            }
        }
        if let Some(w) = &weft {
            self.note_warnings(w, res);
        }
    }

    /// The cross-node run: weft on both nodes, the pool warmed and checked to be HBONE, then
    /// direct and weft interleaved like the single-node paths.
    fn measure_cross(&mut self, res: &mut Results) {
        let mut wefts = Vec::new();
        for n in &self.nodes {
            match Weft::start(&self.cluster, n) {
                Ok(w) => wefts.push(w),
                Err(e) => res.notes.push(format!(
                    "cross-node weft left out: weft on {}: {e:#}",
                    n.name()
                )),
            }
        }
        let mut live = Vec::new();
        match self.check(PathKind::Direct) {
            Ok(()) => live.push(PathKind::Direct),
            Err(e) => res.notes.push(format!("cross-node direct left out: {e:#}")),
        }
        if let [client, server] = &wefts[..] {
            match self
                .check(PathKind::Weft)
                .and_then(|_| self.check_hbone(client))
            {
                Ok(()) => live.push(PathKind::Weft),
                Err(e) => res.notes.push(format!("cross-node weft left out: {e:#}")),
            }
            let warm = TunnelCounts::read(client, server);
            self.run_cases(&live, res);
            res.tunnel = Some((warm, TunnelCounts::read(client, server)));
        } else {
            self.run_cases(&live, res);
        }
        for w in &wefts {
            self.note_warnings(w, res);
        }
    }

    /// The checks went through the tunnel: node-1 recorded a flow to the server with mTLS. The
    /// pooled TLS connection they opened stays for the measured runs (60 s idle timeout; every
    /// case warms up again first).
    fn check_hbone(&self, client: &Weft) -> Result<()> {
        let server = self.server.ip().to_string();
        client
            .wait_flows(1, Duration::from_secs(10), |f| {
                f.pointer("/mtls").and_then(Value::as_bool) == Some(true)
                    && f.pointer("/destination/address")
                        .and_then(Value::as_str)
                        .is_some_and(|a| a.starts_with(&format!("{server}:")))
            })
            .context("no mTLS flow to the server on node-1: the weft path is not HBONE")?;
        Ok(())
    }

    fn note_warnings(&self, w: &Weft, res: &mut Results) {
        let warnings = w
            .log()
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .count();
        if warnings > 0 {
            res.notes.push(format!(
                "weft on {} logged {warnings} warning/error lines (see {})",
                w.node().name(),
                self.cluster.logs_dir().display()
            ));
        }
    }

    /// Throughput and latency, interleaved: each repetition runs every case on every path, in a
    /// rotated path order, so slow drift (other load, thermal) spreads over all paths.
    fn run_cases(&self, live: &[PathKind], res: &mut Results) {
        let reps = self.args.reps;
        let topo = self.topo;
        if live.is_empty() {
            return;
        }
        for rep in 0..reps as usize {
            for case in Case::ALL {
                let mut order = live.to_vec();
                let n = order.len();
                order.rotate_left(rep % n);
                for p in order {
                    eprintln!(
                        "bench: {} rep {}/{reps} {} {}",
                        topo.name(),
                        rep + 1,
                        case.name(),
                        p.name()
                    );
                    match self.case(case, p) {
                        Ok(r) => {
                            if r.errors() > 0 {
                                res.notes.push(format!(
                                    "{} {} {} rep {}: {} errors, e.g. {}",
                                    topo.name(),
                                    case.name(),
                                    p.name(),
                                    rep + 1,
                                    r.errors(),
                                    r.json["error_samples"]
                                ));
                            }
                            res.runs.entry((topo, case, p)).or_default().push(r);
                        }
                        Err(e) => res.notes.push(format!(
                            "{} {} {} rep {}: {e:#}",
                            topo.name(),
                            case.name(),
                            p.name(),
                            rep + 1
                        )),
                    }
                }
            }
        }
    }

    /// A path works: one echo through it.
    fn check(&self, path: PathKind) -> Result<()> {
        let (pod, echo, discard) = self.target(path);
        let deadline = Instant::now() + Duration::from_secs(15);
        for addr in [echo, discard] {
            loop {
                let out = pod.output_timeout(
                    Command::new(testpod_bin()).args([
                        "call",
                        &addr.to_string(),
                        "--send",
                        "bench-check",
                        "--timeout-ms",
                        "2000",
                    ]),
                    Duration::from_secs(10),
                )?;
                let got = String::from_utf8_lossy(&out.stdout);
                let ok = out.status.success()
                    && (got == "bench-check" || (addr == discard && got.trim() == "bytes=11"));
                if ok {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "{addr} from {}/{} does not answer: {} {}",
                        pod.namespace(),
                        pod.name(),
                        got.trim(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        Ok(())
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

    fn case(&self, case: Case, path: PathKind) -> Result<Run> {
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

    fn latency(&self, case: LatCase, pod: &Pod, addr: SocketAddr, res: &mut Results) {
        eprintln!("bench: connect() latency: {}", case.label());
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
        match r {
            Ok(r) => {
                if r.errors() > 0 {
                    res.notes.push(format!(
                        "connect-latency {}: {} errors, e.g. {}",
                        case.label(),
                        r.errors(),
                        r.json["error_samples"]
                    ));
                }
                res.lat.entry(case).or_default().push(r);
            }
            Err(e) => res
                .notes
                .push(format!("connect-latency {}: {e:#}", case.label())),
        }
    }

    fn proxy_dir(&self) -> Result<PathBuf> {
        let dir = self.cluster.logs_dir().join("proxies");
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    fn start_haproxy(&mut self) -> Result<()> {
        let dir = self.proxy_dir()?;
        let cfg = dir.join("haproxy.cfg");
        let node = self.nodes[0].ip();
        let srv = self.server.ip();
        let text = format!(
            "# generated by cargo xtask bench: plain L4 proxy, defaults otherwise\n\
             global\n    maxconn 4000\n\n\
             defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n\n\
             listen echo\n    bind {node}:{}\n    server pod {srv}:{ECHO_PORT}\n\n\
             listen discard\n    bind {node}:{}\n    server pod {srv}:{DISCARD_PORT}\n",
            HAPROXY_PORTS.0, HAPROXY_PORTS.1
        );
        std::fs::write(&cfg, text)?;
        let cfg = cfg.to_string_lossy().into_owned();
        let ok = self.nodes[0].output(Command::new("haproxy").args(["-c", "-f", &cfg]))?;
        if !ok.status.success() {
            bail!(
                "haproxy -c: {}{}",
                String::from_utf8_lossy(&ok.stdout),
                String::from_utf8_lossy(&ok.stderr)
            );
        }
        let p = self.nodes[0].spawn(Command::new("haproxy").args(["-db", "-f", &cfg]))?;
        self.procs.push(p);
        wait_for_tcp(
            &self.plain,
            (node, HAPROXY_PORTS.0),
            Duration::from_secs(10),
        )?;
        wait_for_tcp(
            &self.plain,
            (node, HAPROXY_PORTS.1),
            Duration::from_secs(10),
        )
    }

    fn start_nginx(&mut self) -> Result<()> {
        if !Path::new(NGINX_STREAM_MODULE).exists() {
            bail!("{NGINX_STREAM_MODULE} is missing (apt-get install libnginx-mod-stream)");
        }
        let dir = self.proxy_dir()?;
        let cfg = dir.join("nginx.conf");
        let d = dir.display();
        let node = self.nodes[0].ip();
        let srv = self.server.ip();
        let cores = online_cpus();
        let text = format!(
            "# generated by cargo xtask bench: plain L4 proxy, defaults otherwise\n\
             load_module {NGINX_STREAM_MODULE};\n\
             worker_processes {cores};\n\
             worker_rlimit_nofile 10000;\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/nginx-error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             stream {{\n    \
                 # pass a client's half-close on (off by default; the discard server needs it)\n    \
                 proxy_half_close on;\n    \
                 server {{ listen {node}:{}; proxy_pass {srv}:{ECHO_PORT}; }}\n    \
                 server {{ listen {node}:{}; proxy_pass {srv}:{DISCARD_PORT}; }}\n\
             }}\n",
            NGINX_PORTS.0, NGINX_PORTS.1
        );
        std::fs::write(&cfg, text)?;
        let (cfg, prefix, err) = (
            cfg.to_string_lossy().into_owned(),
            format!("{d}/"),
            format!("{d}/nginx-error.log"),
        );
        let args = ["-p", &prefix, "-e", &err, "-c", &cfg];
        let ok = self.nodes[0].output(Command::new("nginx").args(args).arg("-t"))?;
        if !ok.status.success() {
            bail!("nginx -t: {}", String::from_utf8_lossy(&ok.stderr));
        }
        let p =
            self.nodes[0].spawn(Command::new("nginx").args(args).args(["-g", "daemon off;"]))?;
        self.procs.push(p);
        wait_for_tcp(&self.plain, (node, NGINX_PORTS.0), Duration::from_secs(10))?;
        wait_for_tcp(&self.plain, (node, NGINX_PORTS.1), Duration::from_secs(10))
    }
}

/// Keeps the kernel's eBPF run-time statistics on while held (`BPF_ENABLE_STATS`; off again
/// when the descriptor is closed, so nothing outlives the benchmark).
struct BpfStats {
    _fd: Option<std::os::fd::OwnedFd>,
}

impl BpfStats {
    fn enable() -> BpfStats {
        const BPF_ENABLE_STATS: libc::c_long = 32;
        const BPF_STATS_RUN_TIME: u32 = 0;
        // union bpf_attr { struct { __u32 type; } enable_stats; … }, zero-padded.
        let attr: [u32; 4] = [BPF_STATS_RUN_TIME, 0, 0, 0];
        // SAFETY: bpf(2) reads `size` bytes of `attr`, which we own.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_ENABLE_STATS,
                attr.as_ptr(),
                std::mem::size_of_val(&attr),
            )
        };
        if fd < 0 {
            return BpfStats { _fd: None };
        }
        // SAFETY: a new descriptor that nothing else owns.
        BpfStats {
            _fd: Some(unsafe {
                <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32)
            }),
        }
    }
}

/// Program name → (run count, total run time ns) of the programs behind the links pinned in
/// `dir` (counts only move while [`BpfStats`] is held). Empty without bpftool or pins.
fn bpf_prog_stats(dir: &Path) -> BTreeMap<String, (u64, u64)> {
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    let json = |args: &[&str]| -> Option<Value> {
        let o = Command::new("bpftool").arg("-j").args(args).output().ok()?;
        o.status
            .success()
            .then(|| serde_json::from_slice(&o.stdout).ok())
            .flatten()
    };
    for e in entries.flatten() {
        let path = e.path().to_string_lossy().into_owned();
        let Some(prog_id) =
            json(&["link", "show", "pinned", &path]).and_then(|l| l.get("prog_id")?.as_u64())
        else {
            continue;
        };
        let Some(p) = json(&["prog", "show", "id", &prog_id.to_string()]) else {
            continue;
        };
        let name = p["name"].as_str().unwrap_or("?").to_string();
        let cnt = p.get("run_cnt").and_then(Value::as_u64).unwrap_or(0);
        let ns = p.get("run_time_ns").and_then(Value::as_u64).unwrap_or(0);
        out.insert(name, (cnt, ns));
    }
    out
}

fn online_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Sets the CPU affinity of every thread in a cgroup (`cgroup.threads`: that cgroup only).
fn pin_cgroup_threads(dir: &Path, cpus: &[usize]) -> Result<()> {
    let threads = std::fs::read_to_string(dir.join("cgroup.threads"))
        .with_context(|| format!("reading {}/cgroup.threads", dir.display()))?;
    // SAFETY: cpu_set_t is a plain bit set; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        // SAFETY: c < online CPUs < CPU_SETSIZE.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    for tid in threads
        .lines()
        .filter_map(|l| l.trim().parse::<libc::pid_t>().ok())
    {
        // SAFETY: plain sched_setaffinity(2) with a valid set; a thread that has exited since
        // the read fails with ESRCH, which is fine.
        unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    }
    Ok(())
}

/// `usage_usec` of a cgroup v2 directory.
fn cgroup_cpu_us(dir: &Path) -> Option<u64> {
    let s = std::fs::read_to_string(dir.join("cpu.stat")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
}

/// Facts about the machine, recorded with the results.
struct Machine {
    date: String,
    cores: usize,
    cpu: String,
    kernel: String,
    mem: String,
    load_before: String,
    haproxy: String,
    nginx: String,
    commit: String,
}

fn first_line(cmd: &mut Command) -> String {
    cmd.output()
        .ok()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_else(|| "?".into())
}

fn read_trim(p: &str) -> String {
    std::fs::read_to_string(p)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

impl Machine {
    fn probe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
            .unwrap_or_else(|| "?".into());
        let mem = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            })
            .map(|kb| format!("{:.1} GiB", kb as f64 / 1024.0 / 1024.0))
            .unwrap_or_else(|| "?".into());
        let root = workspace_root();
        let mut commit = first_line(
            Command::new("git")
                .args(["rev-parse", "--short", "HEAD"])
                .current_dir(&root),
        );
        let dirty = Command::new("git")
            .args(["status", "--porcelain", "--untracked-files=no"])
            .current_dir(&root)
            .output()
            .map(|o| !o.stdout.is_empty())
            .unwrap_or(false);
        if dirty {
            commit.push_str(" (with uncommitted changes)");
        }
        Machine {
            date: first_line(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"])),
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu,
            kernel: read_trim("/proc/sys/kernel/osrelease"),
            mem,
            load_before: read_trim("/proc/loadavg"),
            haproxy: first_line(Command::new("haproxy").arg("-v")),
            nginx: first_line(Command::new("nginx").arg("-v")),
            commit,
        }
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn fmt_num(x: f64) -> String {
    if x >= 1000.0 {
        // Thousands separated by a thin space for readability.
        let s = format!("{:.0}", x);
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                out.push('\u{2009}');
            }
            out.push(c);
        }
        out
    } else if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

/// A table row: how to read one number out of a run.
struct Metric {
    label: &'static str,
    case: Case,
    get: fn(&Run, Case) -> Option<f64>,
    /// Proxy CPU rows have no meaningful direct value and no ratio.
    cpu: bool,
}

const METRICS: &[Metric] = &[
    Metric {
        label: "new connections/s (connect + 64 B echo + close, 4 clients) ↑",
        case: Case::Connect,
        get: |r, _| r.f("/rate"),
        cpu: false,
    },
    Metric {
        label: "connect + echo + close with 4 clients, p50 µs ↓",
        case: Case::Connect,
        get: |r, _| r.f("/latency_us/p50"),
        cpu: false,
    },
    Metric {
        label:
            "one new connection alone (connect + 64 B echo + close, 1 client at 1000/s), p50 µs ↓",
        case: Case::ConnectOne,
        get: |r, _| r.f("/latency_us/p50"),
        cpu: false,
    },
    Metric {
        label: "one new connection alone, p99 µs ↓",
        case: Case::ConnectOne,
        get: |r, _| r.f("/latency_us/p99"),
        cpu: false,
    },
    Metric {
        label: "one new connection alone, one CPU for all, p50 µs ↓",
        case: Case::ConnectOneCpu,
        get: |r, _| r.f("/latency_us/p50"),
        cpu: false,
    },
    Metric {
        label: "1 KiB echo round trip, p50 µs ↓",
        case: Case::Rr,
        get: |r, _| r.f("/latency_us/p50"),
        cpu: false,
    },
    Metric {
        label: "1 KiB echo round trip, p99 µs ↓",
        case: Case::Rr,
        get: |r, _| r.f("/latency_us/p99"),
        cpu: false,
    },
    Metric {
        label: "1 KiB echo, requests/s (1 connection) ↑",
        case: Case::Rr,
        get: |r, _| r.f("/rate"),
        cpu: false,
    },
    Metric {
        label: "1 KiB echo round trip, one CPU for all, p50 µs ↓",
        case: Case::RrOneCpu,
        get: |r, _| r.f("/latency_us/p50"),
        cpu: false,
    },
    Metric {
        label: "1 KiB echo, one CPU for all, requests/s ↑",
        case: Case::RrOneCpu,
        get: |r, _| r.f("/rate"),
        cpu: false,
    },
    Metric {
        label: "single-stream throughput, Gbit/s ↑",
        case: Case::Stream,
        get: |r, _| r.f("/gbit_s"),
        cpu: false,
    },
    Metric {
        label: "proxy CPU per new connection, µs",
        case: Case::Connect,
        get: |r, c| r.cpu_per_op(c, None),
        cpu: true,
    },
    Metric {
        label: "proxy CPU per 1 KiB round trip, µs",
        case: Case::Rr,
        get: |r, c| r.cpu_per_op(c, None),
        cpu: true,
    },
    Metric {
        label: "proxy CPU per GB streamed, ms",
        case: Case::Stream,
        get: |r, c| r.cpu_per_op(c, None),
        cpu: true,
    },
];

/// The median of one number over a path's repetitions.
fn med(
    res: &Results,
    topo: Topology,
    case: Case,
    p: PathKind,
    get: impl Fn(&Run) -> Option<f64>,
) -> Option<f64> {
    let runs = res.runs.get(&(topo, case, p))?;
    median(runs.iter().filter_map(get).collect())
}

/// The metric table of one topology: one column per path, then path/direct ratios.
fn metric_table(
    s: &mut String,
    res: &Results,
    topo: Topology,
    paths: &[PathKind],
    parallel: u64,
    cpu: bool,
) {
    let paths: Vec<PathKind> = paths
        .iter()
        .copied()
        .filter(|&p| {
            Case::ALL
                .iter()
                .any(|&c| res.runs.contains_key(&(topo, c, p)))
        })
        .collect();
    let mut head = String::from("| metric |");
    let mut rule = String::from("|---|");
    for p in &paths {
        let _ = write!(head, " {} |", p.name());
        rule.push_str("---:|");
    }
    for p in paths.iter().filter(|p| **p != PathKind::Direct) {
        let _ = write!(head, " {}/direct |", p.name());
        rule.push_str("---:|");
    }
    let _ = writeln!(s, "{head}\n{rule}");
    for metric in METRICS.iter().filter(|m| cpu || !m.cpu) {
        let label = metric
            .label
            .replace("4 clients", &format!("{parallel} clients"))
            .replace("1000/s", &format!("{CONNECT_ONE_RATE}/s"));
        let _ = write!(s, "| {label} |");
        let val = |p: PathKind| med(res, topo, metric.case, p, |r| (metric.get)(r, metric.case));
        let direct = val(PathKind::Direct);
        for &p in &paths {
            let cell = match val(p) {
                _ if metric.cpu && p == PathKind::Direct => "—".to_string(),
                Some(v) => fmt_num(v),
                None => "n/a".to_string(),
            };
            let _ = write!(s, " {cell} |");
        }
        for &p in paths.iter().filter(|p| **p != PathKind::Direct) {
            let cell = match (val(p), direct) {
                _ if metric.cpu => "—".to_string(),
                (Some(v), Some(d)) if d > 0.0 => format!("{:.2}×", v / d),
                _ => "n/a".to_string(),
            };
            let _ = write!(s, " {cell} |");
        }
        let _ = writeln!(s);
    }
}

/// The cross-node CPU table: each weft process, and both.
fn cross_cpu_table(s: &mut String, res: &Results, parallel: u64) {
    let rows = [
        (
            format!("per new connection ({parallel} clients), µs"),
            Case::Connect,
        ),
        ("per 1 KiB round trip, µs".to_string(), Case::Rr),
        ("per GB streamed, ms".to_string(), Case::Stream),
    ];
    let _ = writeln!(
        s,
        "| weft CPU | node-1 (client side) | node-2 (server side) | both |\n|---|---:|---:|---:|"
    );
    for (label, case) in rows {
        let cell = |node: Option<usize>| {
            med(res, Topology::CrossNode, case, PathKind::Weft, |r| {
                r.cpu_per_op(case, node)
            })
            .map_or("n/a".into(), fmt_num)
        };
        let _ = writeln!(
            s,
            "| {label} | {} | {} | {} |",
            cell(Some(0)),
            cell(Some(1)),
            cell(None)
        );
    }
}

fn report(
    command: &str,
    m: &Machine,
    a: &Args,
    paths: &[PathKind],
    res: &Results,
    took: Duration,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "## weft data path benchmark\n");
    let _ = writeln!(s, "- command: `{command}`");
    let _ = writeln!(s, "- date: {}", m.date);
    let _ = writeln!(
        s,
        "- machine: {} cores ({}), {} RAM, kernel {}",
        m.cores, m.cpu, m.mem, m.kernel
    );
    let _ = writeln!(
        s,
        "- load average before / after: {} / {}",
        m.load_before,
        read_trim("/proc/loadavg")
    );
    let _ = writeln!(s, "- weft {}; {}; {}", m.commit, m.haproxy, m.nginx);
    let _ = writeln!(
        s,
        "- weft log level `WEFT_LOG={}` (info logs one line per flow; haproxy and nginx have no \
         access log here)",
        std::env::var("WEFT_LOG").unwrap_or_default()
    );
    let _ = writeln!(
        s,
        "- each case: {} ms warm-up + {} ms measured, median of {} repetitions; whole run {:.0} s",
        a.warmup_ms,
        a.duration_ms,
        a.reps,
        took.as_secs_f64()
    );
    for (topo, dir) in &res.logs {
        let _ = writeln!(s, "- {} logs: `{}`", topo.name(), dir.display());
    }
    let ran = |t: Topology| res.runs.keys().any(|k| k.0 == t);

    if ran(Topology::SingleNode) {
        let _ = writeln!(s, "\n### single node\n");
        metric_table(&mut s, res, Topology::SingleNode, paths, a.parallel, true);
        let _ = writeln!(
            s,
            "\n↑ higher is better, ↓ lower is better. The ratio is path/direct for the number in \
             that row. \"proxy CPU\" is the CPU time of the node's proxy processes (the node's \
             system cgroup) over the whole client run, warm-up included, divided by all \
             operations."
        );
        single_node_latency(&mut s, res);
    }

    if ran(Topology::CrossNode) {
        let _ = writeln!(s, "\n### cross-node (HBONE)\n");
        let _ = writeln!(
            s,
            "Clients on node-1, the server on node-2. direct: a non-enrolled pod → the server's pod \
             IP (plain TCP routed through both node namespaces). weft: an enrolled pod → the \
             Service clusterIP: eBPF redirect → weft node-1 → HBONE (TLS 1.3 mTLS, HTTP/2 CONNECT, \
             pooled) → weft node-2 :15008 → the server pod.\n"
        );
        metric_table(
            &mut s,
            res,
            Topology::CrossNode,
            &[PathKind::Direct, PathKind::Weft],
            a.parallel,
            false,
        );
        let _ = writeln!(s);
        cross_cpu_table(&mut s, res, a.parallel);
        let _ = writeln!(
            s,
            "\n\"weft CPU\": CPU time of each node's system cgroup (only weft runs there) over the \
             whole client run, warm-up included, divided by all operations."
        );
        if let Some((warm, end)) = res.tunnel {
            let n = |v: Option<u64>| v.map_or("?".into(), |v| v.to_string());
            let diff = |a: Option<u64>, b: Option<u64>| {
                a.zip(b)
                    .map_or("?".into(), |(a, b)| b.saturating_sub(a).to_string())
            };
            let _ = writeln!(
                s,
                "\nHBONE pool: node-1 had opened {} TLS connection(s) after the checks and warm-up, \
                 and opened {} more during the measured runs, which carried {} tunnels (streams); \
                 node-2 accepted {} TLS handshakes in all and received {} streams.",
                n(warm.opened),
                diff(warm.opened, end.opened),
                diff(warm.streams, end.streams),
                n(end.accepted),
                n(end.streams_in)
            );
        }
    }

    let _ = writeln!(s, "\n### every repetition\n");
    for topo in [Topology::SingleNode, Topology::CrossNode] {
        for case in Case::ALL {
            for &p in paths {
                let Some(runs) = res.runs.get(&(topo, case, p)) else {
                    continue;
                };
                let vals: Vec<String> = runs
                    .iter()
                    .map(|r| match case {
                        Case::Stream => {
                            format!("{} Gbit/s", r.f("/gbit_s").map_or("?".into(), fmt_num))
                        }
                        _ => format!(
                            "{}/s p50 {} p99 {} µs",
                            r.f("/rate").map_or("?".into(), fmt_num),
                            r.f("/latency_us/p50").map_or("?".into(), fmt_num),
                            r.f("/latency_us/p99").map_or("?".into(), fmt_num)
                        ),
                    })
                    .collect();
                let _ = writeln!(
                    s,
                    "- {} {} {}: {}",
                    topo.name(),
                    case.name(),
                    p.name(),
                    vals.join(" · ")
                );
            }
        }
    }
    for c in [
        LatCase::PlainNoBpf,
        LatCase::PlainBpf,
        LatCase::EnrolledWeft,
    ] {
        if let Some(runs) = res.lat.get(&c) {
            let vals: Vec<String> = runs
                .iter()
                .map(|r| {
                    format!(
                        "p50 {} p99 {} µs",
                        r.f("/latency_us/p50").map_or("?".into(), fmt_num),
                        r.f("/latency_us/p99").map_or("?".into(), fmt_num)
                    )
                })
                .collect();
            let _ = writeln!(
                s,
                "- single-node connect() {}: {}",
                c.label(),
                vals.join(" · ")
            );
        }
    }
    if !res.notes.is_empty() {
        let _ = writeln!(s, "\n### notes\n");
        for n in &res.notes {
            let _ = writeln!(s, "- {n}");
        }
    }
    s
}

/// The single-node connect() latency table and the eBPF program costs.
fn single_node_latency(s: &mut String, res: &Results) {
    if res.lat.is_empty() {
        return;
    }
    let _ = writeln!(s, "\n#### connect() latency (single node)\n");
    let _ = writeln!(
        s,
        "| case | p50 µs | p99 µs | mean µs | p50 vs. no eBPF |\n|---|---:|---:|---:|---:|"
    );
    let lat = |c: LatCase, ptr: &str| {
        let runs = res.lat.get(&c)?;
        median(runs.iter().filter_map(|r| r.f(ptr)).collect())
    };
    let base = lat(LatCase::PlainNoBpf, "/latency_us/p50");
    for c in [
        LatCase::PlainNoBpf,
        LatCase::PlainBpf,
        LatCase::EnrolledWeft,
    ] {
        let cell = |ptr: &str| lat(c, ptr).map_or("n/a".into(), fmt_num);
        let ratio = match (lat(c, "/latency_us/p50"), base) {
            (Some(v), Some(b)) if b > 0.0 => format!("{:.2}×", v / b),
            _ => "n/a".into(),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {ratio} |",
            c.label(),
            cell("/latency_us/p50"),
            cell("/latency_us/p99"),
            cell("/latency_us/mean")
        );
    }
    let _ = writeln!(
        s,
        "\nThe time of the blocking `connect()` call alone (socket made before, closed after), one \
         client paced to {LATENCY_RATE} connects/s, alone on CPU 0 (server and proxies on the other \
         CPUs). It includes the TCP handshake with whoever accepts: the server pod, or weft on \
         the node for the enrolled client (weft's upstream connect is not in it)."
    );

    let bpf: Vec<String> = [LatCase::PlainBpf, LatCase::EnrolledWeft]
        .iter()
        .filter_map(|c| {
            let progs = res.bpf.get(c)?;
            let lat_ops: f64 = res
                .lat
                .get(c)?
                .iter()
                .filter_map(|r| Some(r.f("/ops")? + r.f("/warmup_ops")?))
                .sum();
            let parts: Vec<String> = progs
                .iter()
                .filter(|(_, (n, _))| *n > 0)
                .map(|(name, (n, ns))| {
                    format!(
                        "`{name}` {:.1} runs/connect × {:.0} ns",
                        *n as f64 / lat_ops.max(1.0),
                        *ns as f64 / *n as f64
                    )
                })
                .collect();
            (!parts.is_empty()).then(|| format!("- {}: {}", c.label(), parts.join(", ")))
        })
        .collect();
    if !bpf.is_empty() {
        let _ = writeln!(
            s,
            "\neBPF programs during these runs (kernel run-time statistics, `BPF_ENABLE_STATS`; \
             runs include every socket event below the node's cgroup root, e.g. the server's):\n"
        );
        for l in bpf {
            let _ = writeln!(s, "{l}");
        }
    }
}
