//! The Markdown report: the run's header, one metric table per topology ([`METRICS`]: which
//! number of which case each row shows), the CPU and connect() latency tables, the HTTP tables
//! with their aims and the proxies' memory, every repetition and the notes; medians over
//! repetitions and how numbers are written.

use std::fmt::Write as _;
use std::time::Duration;

use super::cases::{Case, LatCase, Results, Run, CONNECT_ONE_RATE, LATENCY_RATE};
use super::http::{HttpCase, HttpRun, BODY_BYTES};
use super::machine::{load_average, Machine};
use super::topology::Topology;
use super::{fmt_num, Args, PathKind};

/// The whole report of a benchmark run.
pub(super) fn markdown(
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
        load_average()
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
    if !a.no_http {
        let _ = writeln!(
            s,
            "- HTTP cases: {} B responses, keep-alive; wrk (HTTP/1.1) {} connections, h2load \
             (HTTP/2, h2c prior knowledge) {} connections × {} streams; wrk's warm-up and \
             measured times rounded up to whole seconds",
            BODY_BYTES, a.http_connections, a.h2_connections, a.h2_streams
        );
    }
    for (topo, dir) in &res.logs {
        let _ = writeln!(s, "- {} logs: `{}`", topo.name(), dir.display());
    }
    let ran = |t: Topology| res.runs.keys().any(|k| k.0 == t) || res.http.keys().any(|k| k.0 == t);

    if ran(Topology::SingleNode) {
        let _ = writeln!(s, "\n### single node\n");
        if !a.no_tcp {
            metric_table(&mut s, res, Topology::SingleNode, paths, a.parallel, true);
            let _ = writeln!(
                s,
                "\n↑ higher is better, ↓ lower is better. The ratio is path/direct for the number \
                 in that row. \"proxy CPU\" is the CPU time of the node's proxy processes (the \
                 node's system cgroup) over the whole client run, warm-up included, divided by \
                 all operations."
            );
            single_node_latency(&mut s, res);
        }
        http_section(&mut s, res, a, Topology::SingleNode, paths);
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
        if !a.no_tcp {
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
                "\n\"weft CPU\": CPU time of each node's system cgroup (only weft runs there) \
                 over the whole client run, warm-up included, divided by all operations."
            );
        }
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
        http_section(
            &mut s,
            res,
            a,
            Topology::CrossNode,
            &[PathKind::Direct, PathKind::Weft],
        );
    }

    every_repetition(&mut s, res, paths);
    if !res.notes.is_empty() {
        let _ = writeln!(s, "\n### notes\n");
        for n in &res.notes {
            let _ = writeln!(s, "- {n}");
        }
    }
    s
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
            let cell = if metric.cpu && p == PathKind::Direct {
                "—".to_string()
            } else {
                num_or_na(val(p))
            };
            let _ = write!(s, " {cell} |");
        }
        for &p in paths.iter().filter(|p| **p != PathKind::Direct) {
            let cell = if metric.cpu {
                "—".to_string()
            } else {
                ratio(val(p), direct)
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
            num_or_na(med(res, Topology::CrossNode, case, PathKind::Weft, |r| {
                r.cpu_per_op(case, node)
            }))
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
    let lat = |c: LatCase, ptr: &str| median_of(res.lat.get(&c)?, |r| r.f(ptr));
    let base = lat(LatCase::PlainNoBpf, "/latency_us/p50");
    for c in LatCase::ALL {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            c.label(),
            num_or_na(lat(c, "/latency_us/p50")),
            num_or_na(lat(c, "/latency_us/p99")),
            num_or_na(lat(c, "/latency_us/mean")),
            ratio(lat(c, "/latency_us/p50"), base)
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

/// Every repetition's numbers, one line per topology, case and path, then per connect()
/// latency case.
fn every_repetition(s: &mut String, res: &Results, paths: &[PathKind]) {
    // "?" where the client's result has no such number.
    let num = |r: &Run, ptr: &str| r.f(ptr).map_or("?".into(), fmt_num);
    let latency = |r: &Run| {
        format!(
            "p50 {} p99 {} µs",
            num(r, "/latency_us/p50"),
            num(r, "/latency_us/p99")
        )
    };
    let each = |runs: &[Run], one: &dyn Fn(&Run) -> String| {
        runs.iter().map(one).collect::<Vec<_>>().join(" · ")
    };
    let _ = writeln!(s, "\n### every repetition\n");
    for topo in [Topology::SingleNode, Topology::CrossNode] {
        for case in Case::ALL {
            for &p in paths {
                let Some(runs) = res.runs.get(&(topo, case, p)) else {
                    continue;
                };
                let vals = each(runs, &|r| match case {
                    Case::Stream => format!("{} Gbit/s", num(r, "/gbit_s")),
                    _ => format!("{}/s {}", num(r, "/rate"), latency(r)),
                });
                let _ = writeln!(s, "- {} {} {}: {vals}", topo.name(), case.name(), p.name());
            }
        }
    }
    for topo in [Topology::SingleNode, Topology::CrossNode] {
        for case in HttpCase::ALL {
            for &p in paths {
                let Some(runs) = res.http.get(&(topo, case, p)) else {
                    continue;
                };
                let vals = runs
                    .iter()
                    .map(|r| {
                        format!(
                            "{}/s p50 {} p99 {} µs",
                            num_or_na(r.rps()),
                            fmt_num(r.load.p50_us),
                            fmt_num(r.load.p99_us)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(" · ");
                let _ = writeln!(s, "- {} {} {}: {vals}", topo.name(), case.name(), p.name());
            }
        }
    }
    for c in LatCase::ALL {
        if let Some(runs) = res.lat.get(&c) {
            let vals = each(runs, &latency);
            let _ = writeln!(s, "- single-node connect() {}: {vals}", c.label());
        }
    }
}

/// A row of an HTTP table: how to read one number out of a run, and how to show it.
struct HttpMetric {
    label: &'static str,
    get: fn(&HttpRun) -> Option<f64>,
    kind: Row,
}

#[derive(Clone, Copy, PartialEq)]
enum Row {
    /// A number for every path, with path/direct ratios.
    Compared,
    /// The proxies' CPU: nothing on the direct path, no ratios.
    ProxyCpu,
    /// The proxies' memory: nothing on the direct path, no ratios.
    ProxyMemory,
    /// A number for every path, no ratios (what the others spent meanwhile).
    Context,
}

const HTTP_METRICS: &[HttpMetric] = &[
    HttpMetric {
        label: "requests/s ↑",
        get: HttpRun::rps,
        kind: Row::Compared,
    },
    HttpMetric {
        label: "latency p50 µs ↓",
        get: |r| Some(r.load.p50_us),
        kind: Row::Compared,
    },
    HttpMetric {
        label: "latency p99 µs ↓",
        get: |r| Some(r.load.p99_us),
        kind: Row::Compared,
    },
    HttpMetric {
        label: "proxy CPU per 1 000 requests, ms ↓",
        get: |r| r.cpu_per_1k(None),
        kind: Row::ProxyCpu,
    },
    HttpMetric {
        label: "proxy RSS as the run ended, MiB ↓",
        get: |r| r.proxy_rss_kib.map(|k| k as f64 / 1024.0),
        kind: Row::ProxyMemory,
    },
    HttpMetric {
        label: "backend (nginx) CPU, cores busy",
        get: |r| r.busy(r.backend_cpu_us),
        kind: Row::Context,
    },
    HttpMetric {
        label: "backend's busiest worker, cores busy",
        get: |r| r.busy(r.backend_worker_cpu_us),
        kind: Row::Context,
    },
    HttpMetric {
        label: "client CPU, cores busy",
        get: |r| r.busy(r.client_cpu_us),
        kind: Row::Context,
    },
];

/// The median of one number over a path's HTTP runs.
fn http_med(
    res: &Results,
    topo: Topology,
    case: HttpCase,
    p: PathKind,
    get: impl Fn(&HttpRun) -> Option<f64>,
) -> Option<f64> {
    median(
        res.http
            .get(&(topo, case, p))?
            .iter()
            .filter_map(get)
            .collect(),
    )
}

/// A topology's HTTP part: the table, the aims, weft's CPU per node (cross-node), memory.
fn http_section(s: &mut String, res: &Results, a: &Args, topo: Topology, paths: &[PathKind]) {
    let paths: Vec<PathKind> = paths
        .iter()
        .copied()
        .filter(|&p| {
            HttpCase::ALL
                .iter()
                .any(|&c| res.http.contains_key(&(topo, c, p)))
        })
        .collect();
    if paths.is_empty() {
        return;
    }
    let cross = topo == Topology::CrossNode;
    let _ = writeln!(s, "\n#### HTTP ({})\n", topo.name());
    let _ = writeln!(
        s,
        "Keep-alive requests for a {BODY_BYTES} B response from nginx in the server pod. direct: \
         the non-enrolled pod → the server pod. weft: the enrolled pod → the Service clusterIP, \
         port `http` (HTTP/1.1 upstream) or `http2` (HTTP/2 upstream), served per request by \
         weft's L7 engine over reused upstream connections{}.{}\n",
        if cross {
            " carried in HBONE tunnels (mTLS) to node-2's weft"
        } else {
            " (plain, same node)"
        },
        if cross {
            ""
        } else {
            " weft-resilient: the same through a Service whose VirtualService sets a 30 s timeout \
             and 3 retries (10 s per try) and whose DestinationRule sets outlier detection and \
             circuit breakers, none of them triggered. \
             haproxy: `mode http`, `http-reuse always`, HTTP/2 on the frontend with `proto h2` \
             and HTTP/2 to the backend's h2c port. nginx: `proxy_pass` to an upstream with \
             `keepalive 64`; nginx proxies HTTP/2 clients to an HTTP/1.1 upstream (it has no \
             HTTP/2 upstream), so its HTTP/2 column is h2 in front, HTTP/1.1 behind."
        }
    );
    let mut head = String::from("| case | metric |");
    let mut rule = String::from("|---|---|");
    for p in &paths {
        let _ = write!(head, " {} |", p.name());
        rule.push_str("---:|");
    }
    for p in paths.iter().filter(|p| **p != PathKind::Direct) {
        let _ = write!(head, " {}/direct |", p.name());
        rule.push_str("---:|");
    }
    let _ = writeln!(s, "{head}\n{rule}");
    for case in HttpCase::ALL {
        if !res.http.keys().any(|&(t, c, _)| t == topo && c == case) {
            continue;
        }
        for m in HTTP_METRICS {
            let label = match (m.kind, cross) {
                (Row::ProxyCpu, true) => "weft CPU (both nodes) per 1 000 requests, ms ↓",
                _ => m.label,
            };
            let _ = write!(s, "| {} | {label} |", case.label(a));
            let val = |p: PathKind| http_med(res, topo, case, p, m.get);
            for &p in &paths {
                let proxy_only = matches!(m.kind, Row::ProxyCpu | Row::ProxyMemory);
                let cell = if proxy_only && p == PathKind::Direct {
                    "—".to_string()
                } else {
                    num_or_na(val(p))
                };
                let _ = write!(s, " {cell} |");
            }
            for &p in paths.iter().filter(|p| **p != PathKind::Direct) {
                let cell = match m.kind {
                    Row::Compared => ratio(val(p), val(PathKind::Direct)),
                    _ => "—".to_string(),
                };
                let _ = write!(s, " {cell} |");
            }
            let _ = writeln!(s);
        }
    }
    let _ = writeln!(
        s,
        "\nrequests/s counts 2xx responses over the measured time; latencies are the load \
         tool's per request (wrk's histogram; h2load's per-request log). CPU is each cgroup's \
         `cpu.stat` over the measured run alone (the warm-up is a separate run before it): \
         \"proxy CPU\" the node's system cgroup{}, \"cores busy\" CPU seconds per second.",
        if cross {
            " (only weft runs there)"
        } else {
            " (weft, haproxy, nginx; only the measured one is busy)"
        }
    );
    if cross {
        let _ = writeln!(
            s,
            "\n| weft CPU per 1 000 requests, ms | node-1 (client side) | node-2 (server side) |\n\
             |---|---:|---:|"
        );
        for case in HttpCase::ALL {
            let cell = |node| {
                num_or_na(http_med(res, topo, case, PathKind::Weft, |r| {
                    r.cpu_per_1k(Some(node))
                }))
            };
            let _ = writeln!(s, "| {} | {} | {} |", case.label(a), cell(0), cell(1));
        }
    }
    http_aims(s, res, a, topo);
    let rss: Vec<String> = res
        .http_rss
        .iter()
        .filter(|r| r.topo == topo)
        .map(|r| {
            let mib = |k: Option<u64>| k.map_or("n/a".into(), |k| fmt_num(k as f64 / 1024.0));
            format!(
                "- {}: peak {} MiB (RSS {} MiB when the HTTP cases began)",
                r.what,
                mib(r.peak_kib),
                mib(r.before_kib)
            )
        })
        .collect();
    if !rss.is_empty() {
        let _ = writeln!(
            s,
            "\nResident memory over the HTTP cases (`VmHWM` of `/proc/<pid>/status`, reset with \
             `clear_refs` when they began, read when they ended; for several processes the sum of \
             each one's peak):\n"
        );
        for l in rss {
            let _ = writeln!(s, "{l}");
        }
    }
    if let (true, Some(t)) = (cross, res.http_tunnel) {
        let diff = |a: Option<u64>, b: Option<u64>| {
            a.zip(b)
                .map_or("?".into(), |(a, b)| b.saturating_sub(a).to_string())
        };
        let _ = writeln!(
            s,
            "\nHBONE during the HTTP cases (warm-ups included): node-1 opened {} TLS connection(s) \
             and {} tunnels (streams) for {} measured weft requests; node-2 received {} streams.",
            diff(t.before.opened, t.after.opened),
            diff(t.before.streams, t.after.streams),
            t.requests,
            diff(t.before.streams_in, t.after.streams_in)
        );
    }
}

/// What Istio publishes for ztunnel per 1 000 requests/s: 0.06 vCPU and 12 MB.
const ZTUNNEL_VCPU_PER_1K_RPS: f64 = 0.06;
const ZTUNNEL_MB_PER_1K_RPS: f64 = 12.0;

/// The HTTP aims, each with its numbers and whether this run met it: on one node weft's
/// requests/s at least nginx's and haproxy's, and weft-resilient's within 5 % of weft's, and at
/// 1 000 requests/s (`HttpCase::Paced`) no more CPU and memory than Istio publishes for ztunnel; across
/// nodes at least half of direct.
fn http_aims(s: &mut String, res: &Results, a: &Args, topo: Topology) {
    let rps = |case, p| http_med(res, topo, case, p, HttpRun::rps);
    let met = |ok: bool| if ok { "yes" } else { "**no**" };
    let mut rows = Vec::new();
    if topo == Topology::SingleNode {
        let paced = |get: fn(&HttpRun) -> Option<f64>| {
            http_med(res, topo, HttpCase::Paced, PathKind::Weft, get)
        };
        // ms of CPU per 1 000 requests at 1 000 requests/s is ms per second: vCPU × 1 000.
        if let Some(ms) = paced(|r| r.cpu_per_1k(None)) {
            let vcpu = ms / 1000.0;
            rows.push(format!(
                "| weft ≤ {ZTUNNEL_VCPU_PER_1K_RPS} vCPU per 1 000 requests/s (Istio's figure for ztunnel, not scaled to this machine) | {} | {} vCPU per 1 000 requests/s | {} |",
                HttpCase::Paced.label(a),
                fmt_num(vcpu),
                met(vcpu <= ZTUNNEL_VCPU_PER_1K_RPS)
            ));
        }
        if let Some(mib) = paced(|r| r.proxy_rss_kib.map(|k| k as f64 / 1024.0)) {
            let mb = mib * 1.048_576;
            rows.push(format!(
                "| weft ≤ {ZTUNNEL_MB_PER_1K_RPS} MB at 1 000 requests/s (Istio's figure for ztunnel) | {} | {} MB RSS as the run ended | {} |",
                HttpCase::Paced.label(a),
                fmt_num(mb),
                met(mb <= ZTUNNEL_MB_PER_1K_RPS)
            ));
        }
    }
    for case in HttpCase::ALL.into_iter().filter(|c| c.flat_out()) {
        let Some(weft) = rps(case, PathKind::Weft) else {
            continue;
        };
        match topo {
            Topology::SingleNode => {
                if let Some(r) = rps(case, PathKind::WeftResilient) {
                    rows.push(format!(
                        "| weft-resilient ≥ 0.95× weft | {} | {} against {} requests/s: {} | {} |",
                        case.label(a),
                        fmt_num(r),
                        fmt_num(weft),
                        ratio(Some(r), Some(weft)),
                        met(r >= 0.95 * weft)
                    ));
                }
                for other in [PathKind::Nginx, PathKind::Haproxy] {
                    if let Some(o) = rps(case, other) {
                        rows.push(format!(
                            "| weft ≥ {} | {} | {} against {} requests/s: {} | {} |",
                            other.name(),
                            case.label(a),
                            fmt_num(weft),
                            fmt_num(o),
                            ratio(Some(weft), Some(o)),
                            met(weft >= o)
                        ));
                    }
                }
            }
            Topology::CrossNode => {
                if let Some(d) = rps(case, PathKind::Direct) {
                    rows.push(format!(
                        "| weft ≥ 0.5× direct | {} | {} against {} requests/s: {} | {} |",
                        case.label(a),
                        fmt_num(weft),
                        fmt_num(d),
                        ratio(Some(weft), Some(d)),
                        met(weft >= 0.5 * d)
                    ));
                }
            }
        }
    }
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\nAims (medians of this run):\n\n| aim | case | measured | met? |\n|---|---|---|---|"
    );
    for r in rows {
        let _ = writeln!(s, "{r}");
    }
}

/// The median of one number over a path's repetitions.
fn med(
    res: &Results,
    topo: Topology,
    case: Case,
    p: PathKind,
    get: impl Fn(&Run) -> Option<f64>,
) -> Option<f64> {
    median_of(res.runs.get(&(topo, case, p))?, get)
}

/// The median of one number over runs (those that have it).
fn median_of(runs: &[Run], get: impl Fn(&Run) -> Option<f64>) -> Option<f64> {
    median(runs.iter().filter_map(get).collect())
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

/// A table cell: the number, or "n/a".
fn num_or_na(v: Option<f64>) -> String {
    v.map_or("n/a".into(), fmt_num)
}

/// `v / base` as "1.23×", or "n/a" without both numbers (or with a zero base).
fn ratio(v: Option<f64>, base: Option<f64>) -> String {
    match (v, base) {
        (Some(v), Some(b)) if b > 0.0 => format!("{:.2}×", v / b),
        _ => "n/a".into(),
    }
}
