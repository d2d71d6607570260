//! The HTTP cases: keep-alive HTTP/1.1 load from `wrk` and HTTP/2 load from `h2load` (h2c,
//! prior knowledge), each as fast as it goes, and HTTP/1.1 paced to [`PACED_RPS`] requests/s
//! (`h2load --h1 --rps`: what a proxy costs at a set load, the figure Istio publishes for
//! ztunnel), 1 KiB responses from an nginx backend in the server pod, on the direct
//! path, through weft's L7 engine (a Service port declared `http` or `http2`), and through nginx
//! and haproxy as HTTP reverse proxies.
//!
//! This module owns the backend's and the reverse proxies' configs, starting them, checking that
//! each path answers HTTP as it should, one measured run ([`HttpRun`]: the load tool's numbers
//! and the CPU time of the proxies, the backend and the client around it), reading wrk's and
//! h2load's output ([`Load`]), and the proxies' peak RSS over the HTTP cases ([`PeakRss`]). It
//! uses the harness, the cluster of `topology`, the host probes of `machine` and `cases`'
//! [`Results`] and HBONE counters.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use weft_tests::{wait_for_tcp, Pod, Weft};

use super::cases::{Results, TunnelCounts};
use super::machine::{
    cgroup_cpu_us, online_cpus, proc_cpu_us, proc_status_kib, reset_peak_rss, with_children,
};
use super::topology::{Bench, Topology};
use super::{fmt_num, Args, PathKind};

/// The backend's ports in the server pod (HTTP/1.1, h2c prior knowledge); the Service exposes
/// the same numbers, named `http` and `http2`.
pub(super) const BACKEND_PORTS: (u16, u16) = (8090, 8091);
/// haproxy's and nginx's HTTP frontends on the node (HTTP/1.1, h2c prior knowledge).
const HAPROXY_PORTS: (u16, u16) = (18090, 18091);
const NGINX_PORTS: (u16, u16) = (18190, 18191);
/// The body of every response.
pub(super) const BODY_BYTES: usize = 1024;
/// nginx ends a keep-alive connection after 1 000 requests by default, on the client side and
/// upstream; a run makes tens of thousands per connection, and reconnecting in the middle of it
/// is not what the cases measure.
const KEEPALIVE_REQUESTS: u64 = 100_000_000;
/// The paced case: [`PACED_CONNECTIONS`] keep-alive connections, each sending
/// `PACED_RPS / PACED_CONNECTIONS` requests a second.
pub(super) const PACED_RPS: u64 = 1000;
const PACED_CONNECTIONS: u64 = 10;
/// wrk prints this as its last line (Lua `done` hook): the numbers, not its text summary.
const WRK_REPORT_LUA: &str = r#"done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
"#;

/// A measured HTTP case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub(super) enum HttpCase {
    /// HTTP/1.1 keep-alive, `wrk` with `--http-connections` connections.
    #[value(name = "http1")]
    Http1,
    /// HTTP/2 over cleartext with prior knowledge, `h2load` with `--h2-connections` connections
    /// of `--h2-streams` concurrent streams.
    #[value(name = "http2")]
    Http2,
    /// HTTP/1.1 keep-alive paced to [`PACED_RPS`] requests/s (`h2load --h1 --rps`): CPU and
    /// memory at a set load rather than the most a path serves.
    #[value(name = "http1-paced")]
    Paced,
}

impl HttpCase {
    pub(super) const ALL: [HttpCase; 3] = [HttpCase::Paced, HttpCase::Http1, HttpCase::Http2];

    pub(super) fn name(self) -> &'static str {
        match self {
            HttpCase::Http1 => "http1",
            HttpCase::Http2 => "http2",
            HttpCase::Paced => "http1-paced",
        }
    }

    /// The case as the report names it, with its load.
    pub(super) fn label(self, a: &Args) -> String {
        match self {
            HttpCase::Http1 => format!("HTTP/1.1 (wrk, {} connections)", a.http_connections),
            HttpCase::Http2 => format!(
                "HTTP/2 h2c (h2load, {} connections × {} streams)",
                a.h2_connections, a.h2_streams
            ),
            HttpCase::Paced => format!(
                "HTTP/1.1 at {} requests/s (h2load --h1, {PACED_CONNECTIONS} connections × {}/s)",
                fmt_num(PACED_RPS as f64),
                PACED_RPS / PACED_CONNECTIONS
            ),
        }
    }

    /// A load as fast as the path goes (not paced): what requests/s compares.
    pub(super) fn flat_out(self) -> bool {
        self != HttpCase::Paced
    }

    /// The port of this case in a (HTTP/1.1, h2c) pair.
    fn port(self, (h1, h2): (u16, u16)) -> u16 {
        match self {
            HttpCase::Http1 | HttpCase::Paced => h1,
            HttpCase::Http2 => h2,
        }
    }

    /// `%{http_version}` as curl reports it.
    fn curl_version(self) -> &'static str {
        match self {
            HttpCase::Http1 | HttpCase::Paced => "1.1",
            HttpCase::Http2 => "2",
        }
    }

    /// The protocol weft records in a flow's `http` part.
    fn flow_protocol(self) -> &'static str {
        match self {
            HttpCase::Http1 | HttpCase::Paced => "HTTP/1.1",
            HttpCase::Http2 => "HTTP/2",
        }
    }

    /// What h2load's `Application protocol:` line says for this case.
    fn h2load_protocol(self) -> &'static str {
        match self {
            HttpCase::Http2 => "h2c",
            HttpCase::Http1 | HttpCase::Paced => "http/1.1",
        }
    }
}

/// What a load tool reports for one measured run.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Load {
    /// Responses with a 2xx status.
    pub(super) ok: u64,
    /// Requests that failed: connection errors, timeouts, other statuses.
    pub(super) errors: u64,
    /// The measured time.
    pub(super) seconds: f64,
    pub(super) p50_us: f64,
    pub(super) p99_us: f64,
}

/// One measured run: the load tool's numbers and CPU time (µs) spent meanwhile.
#[derive(Clone, Debug)]
pub(super) struct HttpRun {
    pub(super) load: Load,
    /// Each node's system cgroup (the proxies), in the topology's node order.
    pub(super) node_cpu_us: Vec<Option<u64>>,
    /// The server pod (the nginx backend; the idle TCP servers there too).
    pub(super) backend_cpu_us: Option<u64>,
    /// The busiest nginx worker of the backend: one worker serves a connection, so this one
    /// near a whole core would make the backend the limit.
    pub(super) backend_worker_cpu_us: Option<u64>,
    /// The client pod (wrk or h2load).
    pub(super) client_cpu_us: Option<u64>,
    /// The path's proxy processes' resident memory as the run ended (`VmRSS`, KiB; the sum
    /// over processes: weft on every node, nginx's master and workers); none on the direct
    /// path.
    pub(super) proxy_rss_kib: Option<u64>,
}

impl HttpRun {
    /// 2xx responses per second.
    pub(super) fn rps(&self) -> Option<f64> {
        (self.load.seconds > 0.0).then(|| self.load.ok as f64 / self.load.seconds)
    }

    /// CPU ms of node `node`'s proxies (all nodes': `None`) per 1 000 responses, which is also
    /// µs per response.
    pub(super) fn cpu_per_1k(&self, node: Option<usize>) -> Option<f64> {
        let cpu = match node {
            Some(i) => self.node_cpu_us.get(i).copied().flatten()?,
            None => self.node_cpu_us.iter().copied().sum::<Option<u64>>()?,
        };
        (self.load.ok > 0).then(|| cpu as f64 / self.load.ok as f64)
    }

    /// How many CPUs `cpu_us` kept busy over the measured time.
    pub(super) fn busy(&self, cpu_us: Option<u64>) -> Option<f64> {
        let cpu = cpu_us? as f64;
        (self.load.seconds > 0.0).then(|| cpu / 1e6 / self.load.seconds)
    }
}

/// A proxy's resident memory over the HTTP cases.
#[derive(Clone, Debug)]
pub(super) struct PeakRss {
    pub(super) topo: Topology,
    /// "weft on node-a", "nginx (HTTP: master + workers)".
    pub(super) what: String,
    /// RSS when the HTTP cases started (KiB).
    pub(super) before_kib: Option<u64>,
    /// The highest RSS since (VmHWM, reset when the HTTP cases started; KiB; for several
    /// processes the sum of each one's peak).
    pub(super) peak_kib: Option<u64>,
}

/// The HBONE counters of node-1's pool around the cross-node HTTP cases, and the requests the
/// weft runs made meanwhile.
#[derive(Clone, Copy, Debug)]
pub(super) struct HttpTunnel {
    pub(super) before: TunnelCounts,
    pub(super) after: TunnelCounts,
    pub(super) requests: u64,
}

/// wrk's numbers from the line [`WRK_REPORT_LUA`] prints.
pub(super) fn parse_wrk(stdout: &str) -> Result<Load> {
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .context("no report line from wrk's done hook")?;
    let v: Value = serde_json::from_str(line.trim()).context("wrk's report line")?;
    let n = |k: &str| {
        v.get(k)
            .and_then(Value::as_u64)
            .with_context(|| format!("wrk's report has no {k}"))
    };
    // wrk counts every response in `requests` and the non-2xx/3xx ones again in `status`.
    let status = n("status")?;
    let failed = n("connect")? + n("read")? + n("write")? + n("timeout")?;
    Ok(Load {
        ok: n("requests")?.saturating_sub(status),
        errors: status + failed,
        seconds: n("duration_us")? as f64 / 1e6,
        p50_us: n("p50_us")? as f64,
        p99_us: n("p99_us")? as f64,
    })
}

/// h2load's numbers: counts from its summary, latencies from its per-request log (start time,
/// status, elapsed µs per line; only the measured requests). `want`: the protocol it must have
/// spoken (`h2c`, `http/1.1`).
pub(super) fn parse_h2load(stdout: &str, log: &str, want: &str) -> Result<Load> {
    let line = |prefix: &str| {
        stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .with_context(|| format!("no `{prefix}` line in h2load's output"))
    };
    let protocol = line("Application protocol:")?.trim();
    if protocol != want {
        bail!("h2load spoke {protocol}, not {want}");
    }
    let finished = line("finished in")?;
    let seconds = parse_h2load_duration(finished.split(',').next().unwrap_or("").trim())
        .with_context(|| format!("h2load's `finished in{finished}`"))?;
    let requests = counts(line("requests:")?);
    let statuses = counts(line("status codes:")?);
    let get = |m: &[(String, u64)], k: &str| {
        m.iter()
            .find(|(name, _)| name == k)
            .map(|(_, n)| *n)
            .with_context(|| format!("h2load's summary has no `{k}` count"))
    };
    let ok = get(&statuses, "2xx")?;
    let done = get(&requests, "done")?;
    let mut elapsed: Vec<f64> = log
        .lines()
        .filter_map(|l| l.split('\t').nth(2)?.trim().parse().ok())
        .collect();
    elapsed.sort_by(f64::total_cmp);
    Ok(Load {
        ok,
        errors: done.saturating_sub(ok),
        seconds,
        p50_us: percentile(&elapsed, 50.0).context("h2load's log has no request")?,
        p99_us: percentile(&elapsed, 99.0).context("h2load's log has no request")?,
    })
}

/// "74824 total, 74824 started, 0 failed" → [("total", 74824), …].
fn counts(list: &str) -> Vec<(String, u64)> {
    list.split(',')
        .filter_map(|part| {
            let (n, name) = part.trim().split_once(' ')?;
            Some((name.trim().to_string(), n.parse().ok()?))
        })
        .collect()
}

/// h2load's durations: "2.00s", "800.13ms", "950us".
fn parse_h2load_duration(s: &str) -> Option<f64> {
    let (num, scale) = if let Some(v) = s.strip_suffix("ms") {
        (v, 1e-3)
    } else if let Some(v) = s.strip_suffix("us") {
        (v, 1e-6)
    } else {
        (s.strip_suffix('s')?, 1.0)
    };
    num.parse::<f64>().ok().map(|v| v * scale)
}

/// The nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// wrk's `-d` takes whole seconds.
fn whole_seconds(ms: u64) -> u64 {
    ms.div_ceil(1000).max(1)
}

/// The backend: nginx answering every request with [`BODY_BYTES`] on both ports.
fn backend_conf(dir: &Path, workers: usize) -> String {
    let d = dir.display();
    let body = "x".repeat(BODY_BYTES);
    let (h1, h2) = BACKEND_PORTS;
    format!(
        "# generated by cargo xtask bench: the HTTP backend\n\
         worker_processes {workers};\n\
         worker_rlimit_nofile 10000;\n\
         pid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n    \
             access_log off;\n    \
             default_type application/octet-stream;\n    \
             keepalive_requests {KEEPALIVE_REQUESTS};\n    \
             keepalive_timeout 300s;\n    \
             # reuseport: a listening socket per worker, connections spread by the kernel\n    \
             server {{ listen {h1} reuseport; location / {{ return 200 \"{body}\"; }} }}\n    \
             # cleartext HTTP/2 with prior knowledge only on this port (nginx < 1.25)\n    \
             server {{ listen {h2} http2 reuseport; location / {{ return 200 \"{body}\"; }} }}\n\
         }}\n"
    )
}

/// nginx as an HTTP reverse proxy: upstream HTTP/1.1 with kept-alive connections for both
/// frontends (nginx proxies HTTP/2 only to HTTP/1.x upstreams).
fn nginx_conf(dir: &Path, workers: usize, node: Ipv4Addr, server: Ipv4Addr) -> String {
    let d = dir.display();
    let (h1, h2) = NGINX_PORTS;
    let backend = BACKEND_PORTS.0;
    format!(
        "# generated by cargo xtask bench: HTTP reverse proxy, upstream keep-alive\n\
         worker_processes {workers};\n\
         worker_rlimit_nofile 10000;\n\
         pid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n    \
             access_log off;\n    \
             keepalive_requests {KEEPALIVE_REQUESTS};\n    \
             keepalive_timeout 300s;\n    \
             upstream backend {{\n        \
                 server {server}:{backend};\n        \
                 keepalive 64;\n        \
                 keepalive_requests {KEEPALIVE_REQUESTS};\n    \
             }}\n    \
             server {{\n        \
                 listen {node}:{h1};\n        \
                 listen {node}:{h2} http2;\n        \
                 location / {{\n            \
                     proxy_pass http://backend;\n            \
                     proxy_http_version 1.1;\n            \
                     proxy_set_header Connection \"\";\n        \
                 }}\n    \
             }}\n\
         }}\n"
    )
}

/// haproxy as an HTTP reverse proxy: HTTP/1.1 to the backend's HTTP/1.1 port, HTTP/2 to its h2c
/// port, idle upstream connections shared between client connections.
fn haproxy_conf(node: Ipv4Addr, server: Ipv4Addr) -> String {
    let (h1, h2) = HAPROXY_PORTS;
    let (b1, b2) = BACKEND_PORTS;
    format!(
        "# generated by cargo xtask bench: HTTP reverse proxy, upstream reuse\n\
         global\n    maxconn 4000\n\n\
         defaults\n    mode http\n    timeout connect 5s\n    timeout client 60s\n    \
         timeout server 60s\n    timeout http-keep-alive 60s\n    http-reuse always\n\n\
         frontend http1\n    bind {node}:{h1}\n    default_backend http1\n\n\
         frontend http2\n    bind {node}:{h2} proto h2\n    default_backend http2\n\n\
         backend http1\n    server pod {server}:{b1}\n\n\
         backend http2\n    server pod {server}:{b2} proto h2\n"
    )
}

/// CPU time (µs) of the cgroups a run is measured by, at one instant.
struct CpuSample {
    nodes: Vec<Option<u64>>,
    backend: Option<u64>,
    /// Each backend process's (pid, µs).
    workers: Vec<(u32, Option<u64>)>,
    client: Option<u64>,
}

fn elapsed(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    a.zip(b).map(|(a, b)| b.saturating_sub(a))
}

impl Bench {
    /// The HTTP part of a topology's run: the backend, the HTTP proxies among `paths`, a check
    /// of every path, the cases, and the proxies' peak RSS. `wefts`: the running weft
    /// processes, the client node's first (none: the weft path is left out).
    pub(super) fn measure_http(&mut self, paths: &[PathKind], wefts: &[&Weft], res: &mut Results) {
        let topo = self.topo;
        // Its checks (a tunnel for the HTTP client's identity) are set-up.
        super::measuring(false);
        if let Err(e) = self
            .start_backend()
            .and_then(|_| self.check_http(PathKind::Direct))
        {
            res.notes.push(format!(
                "{} HTTP cases left out: the backend: {e:#}",
                topo.name()
            ));
            return;
        }
        let mut live = vec![PathKind::Direct];
        // (path, label, pid) of each proxy whose memory is reported.
        let mut watched: Vec<(PathKind, String, u32)> = Vec::new();
        for &p in paths {
            let up = match p {
                PathKind::Direct => continue,
                PathKind::Weft => match wefts.first() {
                    None => continue,
                    Some(w) => self.check_http(p).and_then(|_| self.check_l7(w)).map(|_| {
                        for w in wefts {
                            if let Some(pid) = w.pid() {
                                let what = format!("weft on {}", w.node().name());
                                watched.push((p, what, pid));
                            }
                        }
                    }),
                },
                PathKind::WeftResilient => match wefts.first() {
                    // One node only, like haproxy and nginx.
                    Some(_) if topo == Topology::SingleNode => self.check_http(p),
                    _ => continue,
                },
                PathKind::Haproxy => self.start_http_haproxy().and_then(|pid| {
                    watched.push((p, "haproxy (HTTP)".into(), pid));
                    self.check_http(p)
                }),
                PathKind::Nginx => self.start_http_nginx().and_then(|pid| {
                    watched.push((p, "nginx (HTTP: master + workers)".into(), pid));
                    self.check_http(p)
                }),
            };
            match up {
                Ok(()) => live.push(p),
                Err(e) => {
                    res.notes
                        .push(format!("{} HTTP {} left out: {e:#}", topo.name(), p.name()))
                }
            }
        }

        let mut before = Vec::new();
        for (_, _, pid) in &watched {
            let pids = with_children(*pid);
            for &p in &pids {
                if let Err(e) = reset_peak_rss(p) {
                    res.notes.push(format!("peak RSS of pid {p}: {e:#}"));
                }
            }
            before.push(sum_kib(&pids, "VmRSS"));
        }
        let tunnel = match wefts {
            [client, server] => Some(TunnelCounts::read(client, server)),
            _ => None,
        };

        super::measuring(true);
        self.run_http_cases(&live, &watched, res);

        for ((_, what, pid), before_kib) in watched.into_iter().zip(before) {
            res.http_rss.push(PeakRss {
                topo,
                what,
                before_kib,
                peak_kib: sum_kib(&with_children(pid), "VmHWM"),
            });
        }
        if let (Some(before), [client, server]) = (tunnel, wefts) {
            let requests = HttpCase::ALL
                .iter()
                .filter_map(|&c| res.http.get(&(topo, c, PathKind::Weft)))
                .flatten()
                .map(|r| r.load.ok + r.load.errors)
                .sum();
            res.http_tunnel = Some(HttpTunnel {
                before,
                after: TunnelCounts::read(client, server),
                requests,
            });
        }
    }

    /// Every HTTP case on every live path, interleaved like the TCP cases. `watched`: the
    /// proxies' processes by path.
    fn run_http_cases(
        &self,
        live: &[PathKind],
        watched: &[(PathKind, String, u32)],
        res: &mut Results,
    ) {
        let (topo, reps) = (self.topo, self.args.reps);
        for rep in 0..reps as usize {
            for case in HttpCase::ALL {
                if !self.args.runs_http(case) {
                    continue;
                }
                let mut order = live.to_vec();
                order.rotate_left(rep % live.len());
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
                    // weft-resilient is served by the same weft processes.
                    let proxy = match p {
                        PathKind::WeftResilient => PathKind::Weft,
                        p => p,
                    };
                    let pids: Vec<u32> = watched
                        .iter()
                        .filter(|(q, _, _)| *q == proxy)
                        .map(|(_, _, pid)| *pid)
                        .collect();
                    match self.http_case(case, p, &pids) {
                        Ok(r) => {
                            if r.load.errors > 0 {
                                res.notes.push(format!(
                                    "{what}: {} failed requests ({} answered 2xx)",
                                    r.load.errors, r.load.ok
                                ));
                            }
                            res.http.entry((topo, case, p)).or_default().push(r);
                        }
                        Err(e) => res.notes.push(format!("{what}: {e:#}")),
                    }
                }
            }
        }
    }

    /// One run: a warm-up (not measured), then the measured load with the CPU time sampled
    /// around it, and the resident memory of `proxy` (the path's processes) as it ended.
    fn http_case(&self, case: HttpCase, path: PathKind, proxy: &[u32]) -> Result<HttpRun> {
        let (pod, url) = self.http_target(case, path);
        let log = self.proxy_dir()?.join("h2load-requests.log");
        let run = |ms: u64, log: Option<&Path>| -> Result<String> {
            let cmd = self.load_cmd(case, &url, ms, log)?;
            let limit = Duration::from_millis(ms) + Duration::from_secs(30);
            let out = pod.output_timeout(&cmd, limit)?;
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            if !out.status.success() {
                bail!(
                    "{} ({}): {} {}",
                    cmd.get_program().to_string_lossy(),
                    out.status,
                    stdout.trim(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            Ok(stdout)
        };
        if self.args.warmup_ms > 0 {
            run(self.args.warmup_ms, None).context("warm-up")?;
        }
        let cpu0 = self.cpu_sample(pod);
        let stdout = run(self.args.duration_ms, Some(&log))?;
        let cpu1 = self.cpu_sample(pod);
        let proxy_rss_kib = if proxy.is_empty() {
            None
        } else {
            let pids: Vec<u32> = proxy.iter().flat_map(|&p| with_children(p)).collect();
            sum_kib(&pids, "VmRSS")
        };
        let load = match case {
            HttpCase::Http1 => parse_wrk(&stdout),
            HttpCase::Http2 | HttpCase::Paced => {
                let text = std::fs::read_to_string(&log)
                    .with_context(|| format!("reading {}", log.display()))?;
                let _ = std::fs::remove_file(&log);
                parse_h2load(&stdout, &text, case.h2load_protocol())
            }
        }
        .with_context(|| format!("reading the load tool's output: {}", stdout.trim()))?;
        Ok(HttpRun {
            load,
            node_cpu_us: cpu0
                .nodes
                .iter()
                .zip(&cpu1.nodes)
                .map(|(a, b)| elapsed(*a, *b))
                .collect(),
            backend_cpu_us: elapsed(cpu0.backend, cpu1.backend),
            backend_worker_cpu_us: cpu0
                .workers
                .iter()
                .zip(&cpu1.workers)
                .filter_map(|((p0, a), (p1, b))| (p0 == p1).then(|| elapsed(*a, *b)).flatten())
                .max(),
            client_cpu_us: elapsed(cpu0.client, cpu1.client),
            proxy_rss_kib,
        })
    }

    /// The load tool's command for `ms` of load (`log`: h2load's per-request log).
    fn load_cmd(&self, case: HttpCase, url: &str, ms: u64, log: Option<&Path>) -> Result<Command> {
        let a = &self.args;
        let mut cmd;
        match case {
            HttpCase::Http1 => {
                let script = self.proxy_dir()?.join("wrk-report.lua");
                if !script.exists() {
                    std::fs::write(&script, WRK_REPORT_LUA)?;
                }
                cmd = Command::new("wrk");
                cmd.args(["-t", "1", "-c", &a.http_connections.to_string()])
                    .args(["-d", &format!("{}s", whole_seconds(ms))])
                    .args(["--timeout", "5s", "-s"])
                    .arg(&script)
                    .arg(url);
            }
            HttpCase::Http2 => {
                cmd = Command::new("h2load");
                cmd.args(["-t", "1", "-c", &a.h2_connections.to_string()])
                    .args(["-m", &a.h2_streams.to_string()])
                    .args(["-D", &format!("{ms}ms")]);
                if let Some(log) = log {
                    cmd.arg("--log-file").arg(log);
                }
                cmd.arg(url);
            }
            HttpCase::Paced => {
                cmd = Command::new("h2load");
                cmd.args(["--h1", "-t", "1", "-c", &PACED_CONNECTIONS.to_string()])
                    .args(["--rps", &(PACED_RPS / PACED_CONNECTIONS).to_string()])
                    .args(["-D", &format!("{ms}ms")]);
                if let Some(log) = log {
                    cmd.arg("--log-file").arg(log);
                }
                cmd.arg(url);
            }
        }
        Ok(cmd)
    }

    fn cpu_sample(&self, client: &Pod) -> CpuSample {
        CpuSample {
            nodes: self
                .nodes
                .iter()
                .map(|n| cgroup_cpu_us(n.system_cgroup()))
                .collect(),
            backend: cgroup_cpu_us(self.server.container_cgroup()),
            workers: match self.backend_pid {
                // The master and its workers; the master does nothing while serving.
                Some(master) => with_children(master)
                    .into_iter()
                    .map(|p| (p, proc_cpu_us(p)))
                    .collect(),
                None => Vec::new(),
            },
            client: cgroup_cpu_us(client.container_cgroup()),
        }
    }

    /// The client pod and URL of a path.
    fn http_target(&self, case: HttpCase, path: PathKind) -> (&Pod, String) {
        let node = self.nodes[0].ip();
        let (pod, ip, port) = match path {
            PathKind::Direct => (&self.plain, self.server.ip(), BACKEND_PORTS),
            PathKind::Weft => (&self.mesh, self.svc_ip, BACKEND_PORTS),
            PathKind::WeftResilient => (&self.mesh, self.resilient_ip, BACKEND_PORTS),
            PathKind::Haproxy => (&self.plain, node, HAPROXY_PORTS),
            PathKind::Nginx => (&self.plain, node, NGINX_PORTS),
        };
        (pod, format!("http://{ip}:{}/", case.port(port)))
    }

    /// Both cases' URLs answer 200 with the 1 KiB body in the case's HTTP version.
    fn check_http(&self, path: PathKind) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        for case in [HttpCase::Http1, HttpCase::Http2] {
            let (pod, url) = self.http_target(case, path);
            let want = format!("200 {BODY_BYTES} {}", case.curl_version());
            loop {
                let mut curl = Command::new("curl");
                curl.args(["-sS", "-o", "/dev/null", "--max-time", "2"])
                    .args(["-w", "%{http_code} %{size_download} %{http_version}"]);
                if case == HttpCase::Http2 {
                    curl.arg("--http2-prior-knowledge");
                }
                let out = pod.output_timeout(curl.arg(&url), Duration::from_secs(10))?;
                let got = String::from_utf8_lossy(&out.stdout);
                if got.trim() == want {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "{url} from {}/{}: got `{}` (want `{want}`) {}",
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

    /// weft served the checks per request (a flow with an `http` part for each version), and
    /// across nodes over mTLS.
    fn check_l7(&self, w: &Weft) -> Result<()> {
        let mtls = self.topo == Topology::CrossNode;
        for case in [HttpCase::Http1, HttpCase::Http2] {
            w.wait_flows(1, Duration::from_secs(10), |f| {
                f.pointer("/http/protocol").and_then(Value::as_str) == Some(case.flow_protocol())
                    && (!mtls || f.pointer("/mtls").and_then(Value::as_bool) == Some(true))
            })
            .with_context(|| {
                format!(
                    "weft on {} recorded no {} request{}: the weft path is not L7",
                    w.node().name(),
                    case.flow_protocol(),
                    if mtls { " over mTLS" } else { "" }
                )
            })?;
        }
        Ok(())
    }

    fn start_backend(&mut self) -> Result<()> {
        let dir = self.proxy_dir()?.join("http-backend");
        std::fs::create_dir_all(&dir)?;
        let cfg = dir.join("nginx.conf");
        std::fs::write(&cfg, backend_conf(&dir, online_cpus()))?;
        let mut nginx = nginx_cmd(&dir, &cfg);
        let ok = self
            .server
            .output(Command::new("nginx").args(nginx.get_args()).arg("-t"))?;
        if !ok.status.success() {
            bail!("nginx -t: {}", String::from_utf8_lossy(&ok.stderr));
        }
        let p = self.server.spawn_group(nginx.args(["-g", "daemon off;"]))?;
        self.backend_pid = Some(p.pid());
        self.procs.push(p);
        for port in [BACKEND_PORTS.0, BACKEND_PORTS.1] {
            wait_for_tcp(&self.plain, self.server.addr(port), Duration::from_secs(10))?;
        }
        Ok(())
    }

    /// Starts nginx as an HTTP reverse proxy on the client node; its master's pid.
    fn start_http_nginx(&mut self) -> Result<u32> {
        let dir = self.proxy_dir()?.join("nginx-http");
        std::fs::create_dir_all(&dir)?;
        let cfg = dir.join("nginx.conf");
        let text = nginx_conf(&dir, online_cpus(), self.nodes[0].ip(), self.server.ip());
        std::fs::write(&cfg, text)?;
        let mut nginx = nginx_cmd(&dir, &cfg);
        let ok = self.nodes[0].output(Command::new("nginx").args(nginx.get_args()).arg("-t"))?;
        if !ok.status.success() {
            bail!("nginx -t: {}", String::from_utf8_lossy(&ok.stderr));
        }
        let p = self.nodes[0].spawn_group(nginx.args(["-g", "daemon off;"]))?;
        let pid = p.pid();
        self.procs.push(p);
        self.wait_for_node_ports(NGINX_PORTS)?;
        Ok(pid)
    }

    /// Starts haproxy as an HTTP reverse proxy on the client node; its pid.
    fn start_http_haproxy(&mut self) -> Result<u32> {
        let dir = self.proxy_dir()?;
        let cfg = dir.join("haproxy-http.cfg");
        std::fs::write(&cfg, haproxy_conf(self.nodes[0].ip(), self.server.ip()))?;
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
        let pid = p.pid();
        self.procs.push(p);
        self.wait_for_node_ports(HAPROXY_PORTS)?;
        Ok(pid)
    }

    fn wait_for_node_ports(&self, (a, b): (u16, u16)) -> Result<()> {
        for port in [a, b] {
            wait_for_tcp(
                &self.plain,
                (self.nodes[0].ip(), port),
                Duration::from_secs(10),
            )?;
        }
        Ok(())
    }
}

/// `nginx` with its prefix, error log and config in `dir` (no arguments to run or test yet).
fn nginx_cmd(dir: &Path, cfg: &Path) -> Command {
    let mut cmd = Command::new("nginx");
    cmd.arg("-p")
        .arg(format!("{}/", dir.display()))
        .arg("-e")
        .arg(dir.join("error.log"))
        .arg("-c")
        .arg(cfg);
    cmd
}

/// The sum of one `/proc/<pid>/status` field over processes (KiB), if every one has it.
fn sum_kib(pids: &[u32], key: &str) -> Option<u64> {
    pids.iter().map(|&p| proc_status_kib(p, key)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    const H2LOAD: &str = "starting benchmark...
spawning thread #0: 4 total client(s). 0 total requests
Application protocol: h2c
Main benchmark duration is started for thread #0.

finished in 2.00s, 37412.00 req/s, 39.00MB/s
requests: 74830 total, 74830 started, 74826 done, 74824 succeeded, 2 failed, 2 errored, 0 timeout
status codes: 74820 2xx, 0 3xx, 4 4xx, 0 5xx
traffic: 77.99MB (81782632) total, 5.49MB (5759838) headers (space savings 49.50%)
";

    #[test]
    fn h2load_counts_2xx_as_answered_and_the_rest_of_done_as_failed() {
        let log = "1796208557879159\t200\t5562\n1796208557879159\t200\t300\n\
                   1796208557879160\t200\t800\n1796208557879161\t404\t9000\n";
        let l = parse_h2load(H2LOAD, log, "h2c").unwrap();
        assert_eq!(l.ok, 74820);
        assert_eq!(l.errors, 6);
        assert_eq!(l.seconds, 2.0);
        assert_eq!((l.p50_us, l.p99_us), (800.0, 9000.0));
    }

    #[test]
    fn h2load_that_fell_back_to_http1_is_refused() {
        let out = H2LOAD.replace("h2c", "http/1.1");
        let e = parse_h2load(&out, "1\t200\t5\n", "h2c").unwrap_err();
        assert!(e.to_string().contains("not h2c"), "{e}");
        // The paced case asks for HTTP/1.1, and must get it.
        assert!(parse_h2load(&out, "1\t200\t5\n", "http/1.1").is_ok());
        let e = parse_h2load(H2LOAD, "1\t200\t5\n", "http/1.1").unwrap_err();
        assert!(e.to_string().contains("not http/1.1"), "{e}");
    }

    #[test]
    fn h2load_without_logged_requests_is_an_error() {
        assert!(parse_h2load(H2LOAD, "", "h2c").is_err());
    }

    #[test]
    fn h2load_durations_have_units() {
        assert_eq!(parse_h2load_duration("2.00s"), Some(2.0));
        assert_eq!(parse_h2load_duration("800ms"), Some(0.8));
        assert_eq!(parse_h2load_duration("950us"), Some(0.00095));
        assert_eq!(parse_h2load_duration("2.00"), None);
    }

    #[test]
    fn wrk_reads_the_done_hook_line_and_counts_bad_statuses_as_failed() {
        let out = "Running 2s test @ http://10.0.0.1:8090/\n  95852 requests in 2.01s\n\
            {\"requests\":95852,\"duration_us\":2010765,\"p50_us\":179,\"p99_us\":12145,\
            \"connect\":0,\"read\":1,\"write\":0,\"status\":52,\"timeout\":2}\n";
        let l = parse_wrk(out).unwrap();
        assert_eq!(l.ok, 95800);
        assert_eq!(l.errors, 55);
        assert!((l.seconds - 2.010765).abs() < 1e-9);
        assert_eq!((l.p50_us, l.p99_us), (179.0, 12145.0));
        assert!(parse_wrk("Running 2s test\n").is_err());
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn the_paced_case_is_named_with_its_rate() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: Args,
        }
        let a = <Cli as clap::Parser>::parse_from(["bench"]).args;
        let label = HttpCase::Paced.label(&a);
        assert!(
            label.starts_with("HTTP/1.1 at 1\u{2009}000 requests/s"),
            "{label}"
        );
        assert!(!HttpCase::Paced.flat_out() && HttpCase::Http1.flat_out());
    }

    #[test]
    fn wrk_durations_round_up_to_whole_seconds() {
        assert_eq!(whole_seconds(500), 1);
        assert_eq!(whole_seconds(2000), 2);
        assert_eq!(whole_seconds(2001), 3);
    }

    #[test]
    fn run_numbers_per_request_and_per_second() {
        let r = HttpRun {
            load: Load {
                ok: 40_000,
                errors: 0,
                seconds: 2.0,
                p50_us: 1.0,
                p99_us: 2.0,
            },
            node_cpu_us: vec![Some(600_000), Some(200_000)],
            backend_cpu_us: Some(500_000),
            backend_worker_cpu_us: Some(400_000),
            client_cpu_us: None,
            proxy_rss_kib: Some(20_480),
        };
        assert_eq!(r.rps(), Some(20_000.0));
        assert_eq!(r.cpu_per_1k(None), Some(20.0));
        assert_eq!(r.cpu_per_1k(Some(1)), Some(5.0));
        assert_eq!(r.busy(r.backend_cpu_us), Some(0.25));
        assert_eq!(r.busy(r.backend_worker_cpu_us), Some(0.2));
        assert_eq!(r.busy(r.client_cpu_us), None);
    }

    #[test]
    fn configs_keep_upstream_connections_and_serve_1_kib() {
        let (node, srv) = (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 1, 0, 2));
        let backend = backend_conf(Path::new("/tmp/b"), 2);
        assert_eq!(backend.matches(&"x".repeat(BODY_BYTES)).count(), 2);
        assert!(!backend.contains(&"x".repeat(BODY_BYTES + 1)));
        assert!(backend.contains("listen 8091 http2 reuseport;"));
        let nginx = nginx_conf(Path::new("/tmp/n"), 2, node, srv);
        assert!(nginx.contains("server 10.1.0.2:8090;\n        keepalive 64;"));
        assert!(nginx.contains("proxy_set_header Connection \"\";"));
        assert!(nginx.contains("listen 10.0.0.1:18191 http2;"));
        let haproxy = haproxy_conf(node, srv);
        assert!(haproxy.contains("http-reuse always"));
        assert!(haproxy.contains("bind 10.0.0.1:18091 proto h2"));
        assert!(haproxy.contains("server pod 10.1.0.2:8091 proto h2"));
    }
}
