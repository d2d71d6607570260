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
//!
//! Then, in the same clusters, the HTTP cases (module `http`; off with `--no-http`): keep-alive
//! HTTP/1.1 paced to 1 000 requests/s (`h2load --h1 --rps`), then HTTP/1.1 (`wrk`) and HTTP/2
//! h2c (`h2load`) as fast as they go, against an nginx backend in the server pod
//! returning 1 KiB, direct, through weft's L7 engine (Service ports named `http` / `http2`),
//! and single-node through nginx and haproxy as HTTP reverse proxies.
//!
//! `--only registry` (module `registry`, not part of the default run) measures something else:
//! weft's Kubernetes registry source against an API server holding a synthetic cluster of
//! 10 000 pods (sync time, memory, CPU and latency of one change).
//!
//! `--only soak` (module `soak`) holds 10 000 long-lived connections and a steady HTTP rate
//! through weft for 10 minutes and samples weft's memory and CPU; `--only restart` (module
//! `restart`) restarts weft 5 times under HTTP and TCP load and counts what failed. Both are
//! off the default run and share their one-node cluster and load client (module `steady`).
//!
//! This file holds the command line ([`Args`]), [`run`] and the order of the measurements in
//! each topology; `cases` says what each case measures and runs one, `http` does the same for
//! the HTTP cases, `topology` builds the clusters and the proxies, `machine` probes the host and
//! `report` writes the Markdown.

mod cases;
mod http;
mod machine;
mod registry;
mod report;
mod restart;
mod soak;
mod steady;
mod topology;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use weft_tests::Weft;

use crate::{cargo, release_dir, require_root};
use cases::{Case, LatCase, Results, TunnelCounts};
use http::HttpCase;
use machine::{BpfStats, Machine};
use topology::{Bench, Topology};

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
    /// Leave out the HTTP cases (wrk, h2load) [default: off: run them after the TCP cases].
    #[arg(long)]
    no_http: bool,
    /// Leave out the TCP cases (throughput, request/response, new connections, connect()
    /// latency) and run the HTTP cases only [default: off].
    #[arg(long, conflicts_with = "no_http")]
    no_tcp: bool,
    /// HTTP cases to run (comma separated) [default: all of them]. The report leaves out the
    /// rows of the others.
    #[arg(long, value_enum, value_delimiter = ',')]
    http_cases: Vec<HttpCase>,
    /// Keep-alive connections of the HTTP/1.1 case (`wrk -c`; one request in flight on each).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=256))]
    http_connections: u64,
    /// Connections of the HTTP/2 case (`h2load -c`).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
    h2_connections: u64,
    /// Concurrent streams on each HTTP/2 connection (`h2load -m`).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=128))]
    h2_streams: u64,
    /// Paths to measure (comma separated). `direct` is always measured: it is the reference.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "direct,weft,weft-resilient,haproxy,nginx"
    )]
    paths: Vec<PathKind>,
    /// TCP cases to run (comma separated) [default: all of them]. The report leaves out the
    /// rows of the others.
    #[arg(long, value_enum, value_delimiter = ',')]
    cases: Vec<Case>,
    /// Run one topology only [default: both, single node first]. Cross-node measures `direct`
    /// and `weft` (haproxy and nginx are single-node only). `registry` runs the registry case
    /// instead (weft's Kubernetes registry at 10 000 pods; never part of the default run);
    /// `soak` and `restart` the long-running cases (never part of the default run either).
    #[arg(long, value_enum)]
    only: Option<Only>,
    /// Also write the report (Markdown) to this file [default: none: standard output only].
    #[arg(long)]
    output: Option<PathBuf>,
    /// Use target/release as it is instead of running `cargo build --release --bins` first;
    /// `WEFT_BIN` and `WEFT_TESTPOD_BIN`, when set, then name the binaries [default: off:
    /// build first].
    #[arg(long)]
    no_build: bool,
    /// Measure weft built with profile-guided optimization (`cargo xtask pgo`, which trains it
    /// on this benchmark's cases first): target/pgo/weft; with `--no-build`, as it is [default:
    /// off: the plain release build].
    #[arg(long)]
    pgo: bool,
    /// An extra `weft node` flag for the weft paths, e.g. `--weft-arg=--source-address=node`
    /// (repeatable) [default: none].
    #[arg(long = "weft-arg", allow_hyphen_values = true)]
    weft_args: Vec<String>,
    /// `--only soak`: how long the load runs, in seconds.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(10..=86_400))]
    soak_duration: u64,
    /// `--only soak`: long-lived connections held through weft.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=50_000))]
    soak_connections: u64,
    /// `--only soak`: the keep-alive HTTP/1.1 connections its requests are spread over, each
    /// held open between its requests.
    #[arg(long, default_value_t = soak::HTTP_CONNS, value_parser = clap::value_parser!(u64).range(1..=50_000))]
    soak_http_connections: u64,
    /// `--only soak`: the keep-alive connections speak HTTP/2 (prior knowledge, one request at
    /// a time on each) instead of HTTP/1.1 [default: off].
    #[arg(long)]
    soak_http2: bool,
    /// `--only restart`: how many times weft is restarted under load.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=50))]
    restarts: u64,
}

/// What `--only` runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Only {
    SingleNode,
    CrossNode,
    /// weft's Kubernetes registry source at scale (module `registry`).
    Registry,
    /// Long-lived connections and steady HTTP through weft for `--soak-duration`: weft's
    /// memory and CPU over time (module `soak`).
    Soak,
    /// weft restarted `--restarts` times under load: what failed, how long a hand-over took
    /// (module `restart`).
    Restart,
}

/// A path from a client pod to the server, compared with the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum PathKind {
    Direct,
    Weft,
    /// weft to a Service whose VirtualService sets a timeout and retries and whose
    /// DestinationRule sets outlier detection and circuit breakers, none of them triggered:
    /// what the resilience machinery costs on the hot path (HTTP cases, one node).
    WeftResilient,
    Haproxy,
    Nginx,
}

impl Args {
    /// Whether `--http-cases` asks for `case` (all of them when it names none).
    fn runs_http(&self, case: HttpCase) -> bool {
        self.http_cases.is_empty() || self.http_cases.contains(&case)
    }
}

impl PathKind {
    fn name(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::Weft => "weft",
            PathKind::WeftResilient => "weft-resilient",
            PathKind::Haproxy => "haproxy",
            PathKind::Nginx => "nginx",
        }
    }
}

/// Every case of both topologies on `paths` (or those that the bench flags in `only` leave,
/// e.g. `--only single-node --no-tcp`), one repetition of `duration_ms` (after 300 ms of
/// warm-up), on the release build's weft-testpod and on `weft` (a build of its own, or a
/// wrapper that starts one): how `cargo xtask pgo` trains and `cargo xtask order` counts. Call
/// it while no other thread reads the environment.
pub fn run_short(
    weft: &std::path::Path,
    paths: &str,
    duration_ms: u64,
    only: &[&str],
) -> Result<()> {
    #[derive(clap::Parser)]
    struct Bench {
        #[command(flatten)]
        args: Args,
    }
    let duration = duration_ms.to_string();
    let bench = <Bench as clap::Parser>::try_parse_from(
        [
            "bench",
            "--no-build",
            "--paths",
            paths,
            "--reps",
            "1",
            "--warmup-ms",
            "300",
            "--duration-ms",
            &duration,
        ]
        .iter()
        .chain(only),
    )?;
    // The bench starts the binaries these name.
    std::env::set_var("WEFT_BIN", weft);
    std::env::set_var(
        "WEFT_TESTPOD_BIN",
        crate::release_dir().join("weft-testpod"),
    );
    run(bench.args)
}

pub fn run(args: Args) -> Result<()> {
    crate::setup::run()?;
    require_root("the benchmark builds a cluster of network namespaces and loads eBPF programs")?;
    let pgo = match (args.pgo, args.no_build) {
        (false, _) => None,
        (true, true) => Some(crate::pgo::pgo_dir().join("weft")),
        (true, false) => {
            let train = crate::pgo::Args {
                reuse_profile: false,
                train_ms: crate::pgo::TRAIN_MS,
            };
            Some(crate::pgo::build(&train)?)
        }
    };
    if !args.no_build {
        match pgo {
            Some(_) => cargo(&["build", "--release", "--bin", "weft-testpod"])?,
            None => cargo(&["build", "--release", "--bins"])?,
        }
    }
    let release = release_dir();
    // With --no-build, binaries named by WEFT_BIN / WEFT_TESTPOD_BIN are measured as they are
    // (a debug build to check the tooling, a copy of a release build).
    let from_env = |var: &str, name: &str| match std::env::var_os(var) {
        Some(p) if args.no_build => PathBuf::from(p),
        _ => release.join(name),
    };
    let (weft, testpod) = (
        pgo.unwrap_or_else(|| from_env("WEFT_BIN", "weft")),
        from_env("WEFT_TESTPOD_BIN", "weft-testpod"),
    );
    let registry = args.only == Some(Only::Registry);
    let need_weft = args.paths.contains(&PathKind::Weft) || registry;
    if args.paths.contains(&PathKind::WeftResilient) && !need_weft {
        bail!("--paths: weft-resilient is measured through the weft path's weft: add weft");
    }
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
    // As run: `cargo xtask` is the unoptimized build, `target/release/xtask` the optimized one.
    let program = if cfg!(debug_assertions) {
        "cargo xtask bench"
    } else {
        "target/release/xtask bench"
    };
    let command = std::iter::once(program.to_string())
        .chain(std::env::args().skip(2))
        .collect::<Vec<_>>()
        .join(" ");
    if registry {
        // The registry case reads weft's sync time (info) and snapshot rebuild times (debug)
        // from its log; no traffic flows, so no per-flow lines.
        if std::env::var_os("WEFT_LOG").is_none() {
            std::env::set_var("WEFT_LOG", "info,weft::registry::kube=debug");
        }
        return registry::run(&command, &Machine::probe(), args.output.as_deref());
    }
    // weft logs one line per flow at info; haproxy and nginx run here without access logs.
    // Compare like with like unless asked otherwise.
    if std::env::var_os("WEFT_LOG").is_none() {
        std::env::set_var("WEFT_LOG", "warn");
    }
    let machine = Machine::probe();
    match args.only {
        Some(Only::Soak) => {
            return soak::run(
                &command,
                &machine,
                args.output.as_deref(),
                soak::Load {
                    duration: std::time::Duration::from_secs(args.soak_duration),
                    connections: args.soak_connections,
                    http_conns: args.soak_http_connections,
                    http2: args.soak_http2,
                },
                &args.weft_args,
            )
        }
        Some(Only::Restart) => {
            return restart::run(
                &command,
                &machine,
                args.output.as_deref(),
                args.restarts,
                &args.weft_args,
            )
        }
        _ => {}
    }
    let started = Instant::now();
    let mut res = Results::default();
    if args.paths.contains(&PathKind::Weft) {
        res.notes.extend(crate::order::layout_note(&weft));
    }
    let mut paths = args.paths.clone();
    paths.push(PathKind::Direct);
    paths.sort();
    paths.dedup();

    let topos = match args.only {
        Some(Only::SingleNode) => vec![Topology::SingleNode],
        Some(Only::CrossNode) => vec![Topology::CrossNode],
        Some(Only::Registry | Only::Soak | Only::Restart) | None => {
            vec![Topology::SingleNode, Topology::CrossNode]
        }
    };
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
    let report = report::markdown(&command, &machine, &args, &paths, &res, started.elapsed());
    print!("{report}");
    if let Some(out) = &args.output {
        std::fs::write(out, &report).with_context(|| format!("writing {}", out.display()))?;
        eprintln!("bench: report written to {}", out.display());
    }
    Ok(())
}

/// Stops weft as its DaemonSet pod is stopped (SIGTERM, SIGKILL after 5 s): its shutdown runs,
/// and an instrumented build (`cargo xtask pgo`) writes its profile as it exits.
fn stop(w: &mut Weft, res: &mut Results) {
    if let Err(e) = w.stop() {
        res.notes
            .push(format!("weft on {} did not stop: {e:#}", w.node().name()));
    }
}

impl Bench {
    /// `--weft-arg` flags, as `Weft::start_with` takes them.
    fn weft_args(&self) -> Vec<&str> {
        self.args.weft_args.iter().map(String::as_str).collect()
    }

    /// The single-node run: connect() latency without eBPF programs, the proxies started and
    /// checked, every case on every path that came up, connect() latency with the programs.
    fn measure(&mut self, paths: &[PathKind], res: &mut Results) {
        let reps = self.args.reps;
        let tcp = !self.args.no_tcp;
        // 1. connect() latency on a fresh node: no weft has run, so no programs are attached.
        for _ in 0..reps * u64::from(tcp) {
            self.latency(LatCase::PlainNoBpf, res);
        }
        // 2. The proxies. A path that does not come up is reported and left out.
        let mut live: Vec<PathKind> = vec![PathKind::Direct];
        let mut weft = None;
        for &p in paths {
            let up = match p {
                // HTTP only: its TCP ports are routed as the weft path's.
                PathKind::Direct | PathKind::WeftResilient => continue,
                PathKind::Haproxy => self.start_haproxy(),
                PathKind::Nginx => self.start_nginx(),
                PathKind::Weft => {
                    Weft::start_with(&self.cluster, &self.nodes[0], &self.weft_args()).map(|w| {
                        weft = Some(w);
                    })
                }
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
        if tcp {
            self.run_cases(&live, res);
        }
        // 4. The HTTP cases, with their own backend and proxies.
        if !self.args.no_http {
            let wefts: Vec<&Weft> = weft.iter().collect();
            self.measure_http(paths, &wefts, res);
        }
        // 5. connect() latency with the programs attached.
        if weft.is_some() && tcp {
            let _stats = BpfStats::enable();
            for _ in 0..reps {
                self.latency(LatCase::PlainBpf, res);
                self.latency(LatCase::EnrolledWeft, res);
            }
        }
        if let Some(w) = &mut weft {
            self.note_warnings(w, res);
            stop(w, res);
        }
    }

    /// The cross-node run: weft on both nodes, the pool warmed and checked to be HBONE, then
    /// direct and weft interleaved like the single-node paths.
    fn measure_cross(&mut self, res: &mut Results) {
        let mut wefts = Vec::new();
        for n in &self.nodes {
            match Weft::start_with(&self.cluster, n, &self.weft_args()) {
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
            if !self.args.no_tcp {
                self.run_cases(&live, res);
                res.tunnel = Some((warm, TunnelCounts::read(client, server)));
            }
        } else if !self.args.no_tcp {
            self.run_cases(&live, res);
        }
        if !self.args.no_http {
            // The weft path only with weft on both nodes and the TCP checks through HBONE passed.
            let wefts: Vec<&Weft> = if live.contains(&PathKind::Weft) {
                wefts.iter().collect()
            } else {
                Vec::new()
            };
            self.measure_http(&[PathKind::Direct, PathKind::Weft], &wefts, res);
        }
        for w in &mut wefts {
            self.note_warnings(w, res);
            stop(w, res);
        }
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
        measuring(true);
        for rep in 0..reps as usize {
            for case in Case::ALL {
                if !self.args.cases.is_empty() && !self.args.cases.contains(&case) {
                    continue;
                }
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
                    let what = format!(
                        "{} {} {} rep {}",
                        topo.name(),
                        case.name(),
                        p.name(),
                        rep + 1
                    );
                    if let Some(r) = res.checked(&what, self.case(case, p)) {
                        res.runs.entry((topo, case, p)).or_default().push(r);
                    }
                }
            }
        }
    }
}

/// The environment variable naming a file that is there while the bench runs its cases, and
/// not while it checks its paths ([`measuring`]).
pub const MEASURING_ENV: &str = "WEFT_BENCH_MEASURING";

/// Tells whoever counts the nodes' work (`cargo xtask order`'s wrapper, through the file
/// [`MEASURING_ENV`] names) whether the cases run (`true`) or the paths are checked: what the
/// checks run (a tunnel's first TLS handshake, the first connections) is set-up, not the
/// cases'. Gives the counter two seconds to follow.
fn measuring(on: bool) {
    let Some(path) = std::env::var_os(MEASURING_ENV) else {
        return;
    };
    let changed = if on {
        !std::path::Path::new(&path).exists() && std::fs::write(&path, b"").is_ok()
    } else {
        std::fs::remove_file(&path).is_ok()
    };
    if changed {
        std::thread::sleep(std::time::Duration::from_secs(2));
    }
}

/// A number as the report writes it: thousands grouped by a thin space, fewer decimals the
/// larger it is.
pub(super) fn fmt_num(x: f64) -> String {
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
