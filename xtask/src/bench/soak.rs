//! `cargo xtask bench --only soak`: weft under a long steady load, to see whether its memory
//! and CPU stay flat.
//!
//! On the one-node cluster of [`super::steady`], `weft-testpod steady` in the enrolled client
//! pod holds `--soak-connections` (10 000) long-lived TCP connections through weft, opened at
//! [`OPEN_RATE`] per second and kept to the end, each sending a 32 B message every 10–30 s
//! (uniformly drawn) and checking its echo; and sends [`HTTP_RATE`] HTTP/1.1 requests per
//! second over `--soak-http-connections` ([`HTTP_CONNS`]) keep-alive connections through weft's
//! L7 engine (each held open between its requests: with many of them, what an idle HTTP/1.1
//! connection costs weft shows; HTTP/2 ones with `--soak-http2`), for
//! `--soak-duration` (600 s). Every [`SAMPLE_EVERY`] the bench reads weft's `VmRSS`
//! (`/proc/<pid>/status`), its CPU time (`utime + stime` of `/proc/<pid>/stat`) and its open
//! descriptors.
//!
//! Reported: the series; over the steady state (after a warm-up: the first minute, or the first
//! third of a run shorter than three minutes) the mean of RSS and of CPU use and their spread,
//! the largest distance of a sample from the mean as ± % of the mean, against the aim "flat
//! ± 10 %"; and every connection that failed or was reset and every request that failed (aim
//! 0). It is a measurement: nothing fails on the aims.
//!
//! Before the load the bench checks the machine can hold it: free memory, and the open-file
//! limit weft will have (weft holds [`FDS_PER_CONNECTION`] descriptors per proxied connection
//! and raises its soft limit to the hard one; the bench raises the hard one to `fs.nr_open`
//! where allowed). One client pod holds every connection, so weft runs with
//! `--max-connections` and `--max-connections-per-pod` at the load's size (its defaults give
//! one pod a quarter of the node's allowance).

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use weft_tests::Weft;

use super::machine::{load_average, proc_cpu_us, proc_status_kib, Machine};
use super::steady::{
    fd_limit, mem_available_kib, weft_has_flag, write_notes, LoadSummary, SteadyCluster, LOADS,
};

/// Held connections opened per second (10 000 in 20 s).
const OPEN_RATE: u64 = 500;
/// HTTP requests per second, fixed, over `--soak-http-connections` keep-alive connections.
const HTTP_RATE: u64 = 500;
/// Keep-alive HTTP connections the requests are spread over, unless told otherwise.
pub(super) const HTTP_CONNS: u64 = 16;
/// Time between two messages of a held connection, drawn in this range.
const HOLD_EVERY_MS: (u64, u64) = (10_000, 30_000);
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// Excluded from the steady state.
const WARM_UP: Duration = Duration::from_secs(60);
/// The aim: every steady-state sample within this many % of the mean.
const AIM_SPREAD_PCT: f64 = 10.0;
/// Memory a held connection may need on the machine, all ends together (client, weft's two
/// sockets and state, the server): a generous bound for the check before the run.
const KIB_PER_CONNECTION: u64 = 64;
/// Descriptors weft holds per idle proxied TCP connection: its two sockets. The relay's
/// `splice(2)` pipes are taken from a per-worker pool only while bytes are in flight.
const FDS_PER_CONNECTION: u64 = 2;
/// Descriptors weft holds besides its connections' (listeners, eBPF maps and links, the
/// registry, its runtime, the pipes of the directions busy at a time and the pooled spares),
/// with a margin.
const FDS_BESIDES: u64 = 1000;
/// Connections weft may hold beyond the load's (the checks before it, a straggler).
const LIMIT_MARGIN: u64 = 64;

/// One sample of weft.
struct Sample {
    t: Duration,
    rss_kib: u64,
    cpu_us: u64,
    fds: usize,
}

/// The soak's load: how long, how many held TCP connections, and over how many keep-alive
/// HTTP connections (HTTP/2 ones when `http2`) its requests go.
pub(super) struct Load {
    pub duration: Duration,
    pub connections: u64,
    pub http_conns: u64,
    pub http2: bool,
}

pub(super) fn run(
    command: &str,
    machine: &Machine,
    output: Option<&Path>,
    load: Load,
    weft_args: &[String],
) -> Result<()> {
    let Load {
        duration,
        connections,
        http_conns,
        http2,
    } = load;
    let started = Instant::now();
    let need_kib = (connections + http_conns) * KIB_PER_CONNECTION + 1024 * 1024;
    if let Some(avail) = mem_available_kib() {
        if avail < need_kib {
            bail!(
                "{connections} connections need about {} MB free; {} MB are",
                need_kib / 1024,
                avail / 1024
            );
        }
    }
    let sc = SteadyCluster::new("bench-soak")?;
    let most = fd_limit().saturating_sub(FDS_BESIDES) / FDS_PER_CONNECTION;
    if connections + http_conns > most {
        bail!(
            "weft would run with an open-file limit of {} (the hard limit here, which this \
             process may not raise), enough for {most} connections, not {}: use fewer \
             (--soak-connections, --soak-http-connections) or raise the hard limit (ulimit -Hn)",
            fd_limit(),
            connections + http_conns
        );
    }
    eprintln!(
        "bench: soak cluster {} up; logs in {}",
        sc.cluster.id(),
        sc.cluster.logs_dir().display()
    );
    let mut extra: Vec<String> = weft_args.to_vec();
    let mut notes = Vec::new();
    // One client pod holds every connection: weft's default limits (a quarter of the node's
    // allowance per pod, the node's derived from the open-file limit) would reset most of them.
    let limit = (connections + http_conns + LIMIT_MARGIN).to_string();
    for flag in ["--max-connections", "--max-connections-per-pod"] {
        let given = extra
            .iter()
            .any(|a| a == flag || a.starts_with(&format!("{flag}=")));
        if !given && weft_has_flag(flag) {
            notes.push(format!("weft ran with `{flag} {limit}`"));
            extra.extend([flag.to_string(), limit.clone()]);
        }
    }
    let extra_refs: Vec<&str> = extra.iter().map(String::as_str).collect();
    let weft = Weft::start_with(&sc.cluster, &sc.node, &extra_refs)?;
    sc.check()?;
    let pid = weft.pid().context("weft is not running")?;
    let args: Vec<String> = [
        ("--hold", connections),
        ("--open-rate", OPEN_RATE),
        ("--hold-min-ms", HOLD_EVERY_MS.0),
        ("--hold-max-ms", HOLD_EVERY_MS.1),
        ("--http-rate", HTTP_RATE),
        ("--http-conns", http_conns),
        ("--duration-s", duration.as_secs()),
    ]
    .iter()
    .flat_map(|(k, v)| [k.to_string(), v.to_string()])
    .chain(http2.then(|| "--http2".to_string()))
    .collect();
    eprintln!(
        "bench: soak: {connections} held connections and {HTTP_RATE} {} requests/s over \
         {http_conns} connections for {} s",
        http_version(http2),
        duration.as_secs()
    );
    let mut client = sc.start_load(&args)?;
    let t0 = Instant::now();
    let mut samples = Vec::new();
    let mut weft_gone = None;
    while client.is_running() {
        let (rss, cpu) = (proc_status_kib(pid, "VmRSS"), proc_cpu_us(pid));
        match rss.zip(cpu) {
            Some((rss_kib, cpu_us)) => {
                let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
                samples.push(Sample {
                    t: t0.elapsed(),
                    rss_kib,
                    cpu_us,
                    fds,
                });
                if let Some(s) = samples.last() {
                    eprintln!(
                        "bench: soak t={:>4}s weft RSS {:.1} MB, CPU {:.2} s, {} fds",
                        s.t.as_secs(),
                        s.rss_kib as f64 / 1024.0,
                        s.cpu_us as f64 / 1e6,
                        s.fds
                    );
                }
            }
            None => {
                weft_gone = Some(t0.elapsed());
                break;
            }
        }
        // Sample on a fixed schedule from the client's start.
        let next = SAMPLE_EVERY * samples.len() as u32;
        while client.is_running() && t0.elapsed() < next {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let summary = LoadSummary::wait(client, duration + Duration::from_secs(60))?;
    if let Some(t) = weft_gone {
        notes.push(format!(
            "weft (pid {pid}) was gone at {} s: its log is in the logs directory",
            t.as_secs()
        ));
    }
    let warnings = weft
        .log()
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .count();
    if warnings > 0 {
        notes.push(format!("weft logged {warnings} warning/error lines"));
    }
    let report = Report {
        command,
        machine,
        duration,
        connections,
        http_conns,
        http2,
        samples: &samples,
        summary: &summary,
        notes: &notes,
        logs: sc.cluster.logs_dir(),
        took: started.elapsed(),
    }
    .markdown();
    print!("{report}");
    if let Some(out) = output {
        std::fs::write(out, &report).with_context(|| format!("writing {}", out.display()))?;
        eprintln!("bench: report written to {}", out.display());
    }
    Ok(())
}

/// The keep-alive connections' protocol, as the report names it.
fn http_version(http2: bool) -> &'static str {
    if http2 {
        "HTTP/2"
    } else {
        "HTTP/1.1"
    }
}

/// The warm-up left out of the steady state: a minute, or a third of a short run.
fn warm_up(duration: Duration) -> Duration {
    WARM_UP.min(duration / 3)
}

/// Mean and the largest distance of a value from it, as % of the mean.
fn spread(v: &[f64]) -> Option<(f64, f64)> {
    if v.is_empty() {
        return None;
    }
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    if mean <= 0.0 {
        return Some((mean, 0.0));
    }
    let dev = v.iter().map(|x| (x - mean).abs()).fold(0.0, f64::max);
    Some((mean, dev / mean * 100.0))
}

/// CPU use between consecutive samples, in % of one core, with the later sample's time.
fn cpu_use(samples: &[Sample]) -> Vec<(Duration, f64)> {
    samples
        .windows(2)
        .filter_map(|w| {
            let dt = w[1].t.checked_sub(w[0].t)?.as_secs_f64();
            let du = w[1].cpu_us.checked_sub(w[0].cpu_us)? as f64 / 1e6;
            (dt > 0.0).then(|| (w[1].t, du / dt * 100.0))
        })
        .collect()
}

struct Report<'a> {
    command: &'a str,
    machine: &'a Machine,
    duration: Duration,
    connections: u64,
    http_conns: u64,
    http2: bool,
    samples: &'a [Sample],
    summary: &'a LoadSummary,
    notes: &'a [String],
    logs: &'a Path,
    took: Duration,
}

fn verdict(pct: Option<f64>) -> String {
    match pct {
        Some(p) if p <= AIM_SPREAD_PCT => "**yes**".into(),
        Some(_) => "**no**".into(),
        None => "n/a (no steady-state samples)".into(),
    }
}

impl Report<'_> {
    fn markdown(&self) -> String {
        let mut s = String::new();
        let m = self.machine;
        let sum = self.summary;
        let warm = warm_up(self.duration);
        let _ = writeln!(s, "## weft soak\n");
        let _ = writeln!(s, "- command: `{}`", self.command);
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
        let _ = writeln!(
            s,
            "- weft {} ({}); `WEFT_LOG={}`; open-file limit {}",
            m.commit,
            if cfg!(debug_assertions) {
                "run from the unoptimized xtask"
            } else {
                "run from target/release/xtask"
            },
            std::env::var("WEFT_LOG").unwrap_or_default(),
            fd_limit()
        );
        let _ = writeln!(
            s,
            "- load, for {} s: {} held TCP connections through weft (opened at {OPEN_RATE}/s, \
             a 32 B echo each every {}–{} s), {HTTP_RATE} {} requests/s over \
             {} keep-alive connections through weft's L7 engine",
            self.duration.as_secs(),
            self.connections,
            HOLD_EVERY_MS.0 / 1000,
            HOLD_EVERY_MS.1 / 1000,
            http_version(self.http2),
            self.http_conns
        );
        let _ = writeln!(
            s,
            "- weft sampled every {} s; steady state from {} s to the load's end ({} s); whole \
             case {:.0} s; logs: `{}`",
            SAMPLE_EVERY.as_secs(),
            warm.as_secs(),
            self.duration.as_secs(),
            self.took.as_secs_f64(),
            self.logs.display()
        );

        // From the warm-up to the load's end (the held connections close at the end, before
        // the client exits).
        let in_steady = |t: Duration| t >= warm && t < self.duration;
        let steady: Vec<&Sample> = self.samples.iter().filter(|x| in_steady(x.t)).collect();
        let rss: Vec<f64> = steady.iter().map(|x| x.rss_kib as f64 / 1024.0).collect();
        let cpu: Vec<f64> = cpu_use(self.samples)
            .into_iter()
            // A CPU interval counts when it lies in the steady state.
            .filter(|(t, _)| t.saturating_sub(SAMPLE_EVERY) >= warm && in_steady(*t))
            .map(|(_, c)| c)
            .collect();
        let fds: Vec<f64> = steady.iter().map(|x| x.fds as f64).collect();
        let (rss_s, cpu_s, fds_s) = (spread(&rss), spread(&cpu), spread(&fds));
        let row =
            |name: &str, unit: &str, sp: Option<(f64, f64)>, v: &[f64], aim: bool| {
                let (lo, hi) = v
                    .iter()
                    .fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
                let unit = if unit.is_empty() {
                    String::new()
                } else {
                    format!(" {unit}")
                };
                match sp {
                    Some((mean, pct)) => format!(
                    "| {name} | {} | {mean:.1}{unit} | {lo:.1}–{hi:.1}{unit} | ±{pct:.1} % | {} |",
                    v.len(),
                    if aim { verdict(Some(pct)) } else { String::new() }
                ),
                    None => format!("| {name} | 0 | | | | {} |", verdict(None)),
                }
            };
        let _ = writeln!(
            s,
            "\n| weft, steady state | samples | mean | min–max | spread | flat ±{AIM_SPREAD_PCT:.0} %? |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---|");
        let _ = writeln!(s, "{}", row("RSS", "MB", rss_s, &rss, true));
        let _ = writeln!(
            s,
            "{}",
            row("CPU (over each interval)", "% of a core", cpu_s, &cpu, true)
        );
        let _ = writeln!(s, "{}", row("open descriptors", "", fds_s, &fds, false));

        let hold_failed = sum.u("/loads/hold/failed");
        let http_failed = sum.u("/loads/http/failed");
        let _ = writeln!(s, "\n| failures (aim 0) | count |");
        let _ = writeln!(s, "|---|---:|");
        let _ = writeln!(
            s,
            "| held connections not opened (refused / other) | {} / {} |",
            sum.failures("hold", "refused"),
            sum.failures("hold", "connect_failed")
        );
        let _ = writeln!(
            s,
            "| held connections broken (reset / closed / no echo / wrong echo) | {} / {} / {} / {} |",
            sum.failures("hold", "reset"),
            sum.failures("hold", "closed"),
            sum.failures("hold", "timeout"),
            sum.failures("hold", "wrong_bytes")
        );
        let _ = writeln!(s, "| held connections failed in all | {hold_failed} |");
        let _ = writeln!(s, "| HTTP requests failed | {http_failed} |");
        let _ = writeln!(
            s,
            "\nHeld: {} opened, {} held unbroken to the end, {} echoes checked. HTTP: {} answered \
             with a 2xx over {} connections (p50 {} ms, p99 {} ms, max {} ms). All aims met: {}.",
            sum.u("/loads/hold/connections"),
            sum.u("/held_to_end"),
            sum.u("/loads/hold/ok"),
            sum.u("/loads/http/ok"),
            sum.u("/loads/http/connections"),
            sum.json["http_latency"]["p50_ms"],
            sum.json["http_latency"]["p99_ms"],
            sum.json["http_latency"]["max_ms"],
            if hold_failed == 0
                && http_failed == 0
                && rss_s.is_some_and(|x| x.1 <= AIM_SPREAD_PCT)
                && cpu_s.is_some_and(|x| x.1 <= AIM_SPREAD_PCT)
            {
                "**yes**"
            } else {
                "**no**"
            }
        );

        let _ = writeln!(
            s,
            "\n<details><summary>weft every {} s</summary>\n",
            SAMPLE_EVERY.as_secs()
        );
        let _ = writeln!(
            s,
            "| t (s) | RSS (MB) | CPU since last (% of a core) | descriptors |"
        );
        let _ = writeln!(s, "|---:|---:|---:|---:|");
        let cpu_all = cpu_use(self.samples);
        for x in self.samples {
            let c = cpu_all
                .iter()
                .find(|(t, _)| *t == x.t)
                .map_or(String::new(), |(_, c)| format!("{c:.1}"));
            let _ = writeln!(
                s,
                "| {} | {:.1} | {c} | {} |",
                x.t.as_secs(),
                x.rss_kib as f64 / 1024.0,
                x.fds
            );
        }
        let _ = writeln!(s, "\n</details>");
        let mut notes: Vec<String> = self.notes.to_vec();
        for l in LOADS {
            if sum.u(&format!("/loads/{l}/failed")) > 0 {
                notes.push(format!("{l}: {}", sum.json["loads"][l]["failures"]));
            }
        }
        notes.extend(sum.event_notes(10));
        write_notes(&mut s, &notes);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spread_is_the_farthest_sample_from_the_mean() {
        let (mean, pct) = spread(&[90.0, 100.0, 110.0]).unwrap();
        assert_eq!(mean, 100.0);
        assert!((pct - 10.0).abs() < 1e-9);
        assert_eq!(spread(&[]), None);
        assert_eq!(spread(&[0.0, 0.0]), Some((0.0, 0.0)));
    }

    #[test]
    fn cpu_use_is_per_interval() {
        let at = |s: u64, cpu_ms: u64| Sample {
            t: Duration::from_secs(s),
            rss_kib: 0,
            cpu_us: cpu_ms * 1000,
            fds: 0,
        };
        let u = cpu_use(&[at(0, 0), at(10, 500), at(20, 1500)]);
        assert_eq!(u.len(), 2);
        assert!((u[0].1 - 5.0).abs() < 1e-9 && (u[1].1 - 10.0).abs() < 1e-9);
    }

    #[test]
    fn a_short_run_warms_up_for_a_third() {
        assert_eq!(warm_up(Duration::from_secs(600)), WARM_UP);
        assert_eq!(warm_up(Duration::from_secs(60)), Duration::from_secs(20));
    }
}
