//! `cargo xtask bench --only restart`: `weft node` restarted under load, `--restarts` times (5).
//!
//! On the one-node cluster of [`super::steady`], `weft-testpod steady` in the enrolled client
//! pod runs, through weft and for the whole case:
//!
//! - HTTP/1.1 at a fixed rate: [`HTTP_RATE`] requests/s over [`HTTP_CONNS`] keep-alive
//!   connections and [`HTTP_NEW_RATE`] requests/s each on a new connection;
//! - TCP: [`CHURN_RATE`] new connections/s (connect, 64 B echoed, close) and [`STREAMS`]
//!   streaming connections at a time, each living [`STREAM_LIFE`] (shorter than the drain
//!   timeout, so one open at a hand-over can finish on the predecessor) and checking every byte
//!   echoed.
//!
//! After [`LEAD`], and then every [`INTERVAL`], weft is restarted the way a DaemonSet rolling
//! update does: a successor with the same command line takes the listening sockets over
//! ([`Weft::hand_over`]); the predecessor drains (`--drain-timeout` [`DRAIN_TIMEOUT`], passed
//! unless `--weft-arg` sets it) and exits. A weft without a hand-over (no
//! `--handover-socket`) is restarted cold instead (stopped, then started: [`Weft::restart`]),
//! and the report says so: that run shows what a restart costs without one.
//!
//! Reported: each restart's hand-over time (successor start → taken over, → predecessor
//! exited), and failed requests, refused connections and broken streaming connections, in all
//! and within each restart's window (from 1 s before it to 2 s after the predecessor exited),
//! against the aim: all 0. It is a measurement: nothing fails on the aims.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use weft_tests::{supports_handover, Weft};

use super::machine::{load_average, Machine};
use super::steady::{unix_ms, write_notes, LoadSummary, SteadyCluster, LOADS};

const HTTP_RATE: u64 = 200;
const HTTP_CONNS: u64 = 8;
const HTTP_NEW_RATE: u64 = 50;
const CHURN_RATE: u64 = 100;
const STREAMS: u64 = 4;
const STREAM_LIFE: Duration = Duration::from_secs(3);
/// The predecessor's drain timeout: longer than a streaming connection lives.
const DRAIN_TIMEOUT: &str = "5s";
/// Load before the first restart, time between restarts, and load after the last.
const LEAD: Duration = Duration::from_secs(10);
const INTERVAL: Duration = Duration::from_secs(12);
const TAIL: Duration = Duration::from_secs(8);
/// A failure this long before a restart began, or after its predecessor exited, still counts
/// in its window.
const BEFORE: Duration = Duration::from_secs(1);
const AFTER: Duration = Duration::from_secs(2);

/// One restart as done.
struct Restart {
    /// Wall clock at its start, ms since the epoch.
    at_unix_ms: u64,
    how: &'static str,
    /// Successor start (or, cold, the stop) → serving again.
    took_over: Option<Duration>,
    /// → the predecessor exited.
    old_exited: Option<Duration>,
    error: Option<String>,
}

pub(super) fn run(
    command: &str,
    machine: &Machine,
    output: Option<&Path>,
    restarts: u64,
    weft_args: &[String],
) -> Result<()> {
    let started = Instant::now();
    let sc = SteadyCluster::new("bench-restart")?;
    eprintln!(
        "bench: restart cluster {} up; logs in {}",
        sc.cluster.id(),
        sc.cluster.logs_dir().display()
    );
    let handover = supports_handover();
    let mut extra: Vec<String> = weft_args.to_vec();
    if handover && !extra.iter().any(|a| a.starts_with("--drain-timeout")) {
        extra.extend(["--drain-timeout".to_string(), DRAIN_TIMEOUT.to_string()]);
    }
    let drain = drain_timeout(&extra);
    let extra_refs: Vec<&str> = extra.iter().map(String::as_str).collect();
    let mut weft = Weft::start_with(&sc.cluster, &sc.node, &extra_refs)?;
    sc.check()?;
    let duration = LEAD + INTERVAL * restarts as u32 + TAIL;
    let args: Vec<String> = [
        ("--http-rate", HTTP_RATE),
        ("--http-conns", HTTP_CONNS),
        ("--http-new-rate", HTTP_NEW_RATE),
        ("--churn-rate", CHURN_RATE),
        ("--streams", STREAMS),
        ("--stream-life-ms", STREAM_LIFE.as_millis() as u64),
        ("--duration-s", duration.as_secs()),
        ("--report-every-s", 5),
    ]
    .iter()
    .flat_map(|(k, v)| [k.to_string(), v.to_string()])
    .collect();
    eprintln!(
        "bench: restart: {restarts} restarts ({}) under load for {} s",
        if handover {
            "hand-over"
        } else {
            "cold: this weft has no hand-over"
        },
        duration.as_secs()
    );
    let client = sc.start_load(&args)?;
    let t0 = Instant::now();
    let mut done = Vec::new();
    for k in 0..restarts as u32 {
        let at = LEAD + INTERVAL * k;
        if let Some(wait) = at.checked_sub(t0.elapsed()) {
            std::thread::sleep(wait);
        }
        let at_unix_ms = unix_ms();
        let begun = Instant::now();
        let r = if handover {
            match weft.hand_over(drain + Duration::from_secs(10)) {
                Ok(h) => Restart {
                    at_unix_ms,
                    how: "hand-over",
                    took_over: Some(h.took_over),
                    old_exited: Some(h.old_exited),
                    error: None,
                },
                Err(e) => Restart {
                    at_unix_ms,
                    how: "hand-over",
                    took_over: None,
                    old_exited: None,
                    error: Some(format!("{e:#}")),
                },
            }
        } else {
            let r = weft.restart();
            Restart {
                at_unix_ms,
                how: "cold",
                took_over: r.is_ok().then(|| begun.elapsed()),
                old_exited: None,
                error: r.err().map(|e| format!("{e:#}")),
            }
        };
        eprintln!(
            "bench: restart {}: {} taken over after {} ms, predecessor exited after {} ms{}",
            k + 1,
            r.how,
            r.took_over
                .map_or("?".into(), |d| d.as_millis().to_string()),
            r.old_exited
                .map_or("-".into(), |d| d.as_millis().to_string()),
            r.error
                .as_deref()
                .map_or(String::new(), |e| format!(": {e}"))
        );
        done.push(r);
    }
    let summary = LoadSummary::wait(client, duration + Duration::from_secs(60))?;
    let report = Report {
        command,
        machine,
        drain: if handover { Some(drain) } else { None },
        restarts: &done,
        summary: &summary,
        logs: sc.cluster.logs_dir(),
        took: started.elapsed(),
        duration,
    }
    .markdown();
    print!("{report}");
    if let Some(out) = output {
        std::fs::write(out, &report).with_context(|| format!("writing {}", out.display()))?;
        eprintln!("bench: report written to {}", out.display());
    }
    Ok(())
}

/// The `--drain-timeout` among weft's flags (weft's default, 30 s, without one).
fn drain_timeout(flags: &[String]) -> Duration {
    let value = flags.iter().enumerate().find_map(|(i, a)| {
        if a == "--drain-timeout" {
            flags.get(i + 1).cloned()
        } else {
            a.strip_prefix("--drain-timeout=").map(str::to_string)
        }
    });
    value
        .and_then(|v| parse_secs(&v))
        .unwrap_or(Duration::from_secs(30))
}

/// `5s`, `500ms`, `1m` (the forms the bench passes; weft reads any humantime duration).
fn parse_secs(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Some(ms) = v.strip_suffix("ms") {
        return ms.parse().ok().map(Duration::from_millis);
    }
    if let Some(s) = v.strip_suffix('s') {
        return s.parse().ok().map(Duration::from_secs);
    }
    if let Some(m) = v.strip_suffix('m') {
        return m.parse::<u64>().ok().map(|m| Duration::from_secs(m * 60));
    }
    None
}

/// What failed, counted one way.
#[derive(Default, Clone, Copy)]
struct Failed {
    /// HTTP requests without a 2xx answer (both kinds), connections that could not be opened
    /// excepted.
    requests: u64,
    /// Connections refused (any load).
    refused: u64,
    /// Connections not opened otherwise (time-out, unreachable).
    not_opened: u64,
    /// Streaming connections reset, cut early, stalled or with wrong bytes.
    streams: u64,
    /// New connections whose echo failed after connecting.
    churn: u64,
}

impl Failed {
    fn add(&mut self, load: &str, why: &str, n: u64) {
        match (load, why) {
            (_, "refused") => self.refused += n,
            (_, "connect_failed") => self.not_opened += n,
            ("http" | "http_new", _) => self.requests += n,
            ("stream" | "hold", _) => self.streams += n,
            ("churn", _) => self.churn += n,
            _ => {}
        }
    }

    fn any(&self) -> bool {
        self.requests + self.refused + self.not_opened + self.streams + self.churn > 0
    }
}

struct Report<'a> {
    command: &'a str,
    machine: &'a Machine,
    /// The predecessor's drain timeout (none: cold restarts).
    drain: Option<Duration>,
    restarts: &'a [Restart],
    summary: &'a LoadSummary,
    logs: &'a Path,
    took: Duration,
    duration: Duration,
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("n/a".into(), |d| format!("{:.0}", d.as_secs_f64() * 1e3))
}

impl Report<'_> {
    /// All failures, counted from the client's totals.
    fn total(&self) -> Failed {
        let mut f = Failed::default();
        for load in LOADS {
            let Some(by_why) = self.summary.json["loads"][load]["failures"].as_object() else {
                continue;
            };
            for (why, n) in by_why {
                f.add(load, why, n.as_u64().unwrap_or(0));
            }
        }
        f
    }

    /// Failures within each restart's window (from the client's time-stamped events), and
    /// those outside every window.
    fn by_restart(&self) -> (Vec<Failed>, Failed) {
        let start = self.summary.start_unix_ms();
        let mut per = vec![Failed::default(); self.restarts.len()];
        let mut outside = Failed::default();
        for (t, load, why, _) in self.summary.events() {
            let at = start + t;
            let window = self.restarts.iter().position(|r| {
                let end = r.at_unix_ms
                    + r.old_exited.or(r.took_over).unwrap_or_default().as_millis() as u64
                    + AFTER.as_millis() as u64;
                at + BEFORE.as_millis() as u64 >= r.at_unix_ms && at <= end
            });
            match window {
                Some(k) => per[k].add(&load, &why, 1),
                None => outside.add(&load, &why, 1),
            }
        }
        (per, outside)
    }

    fn markdown(&self) -> String {
        let mut s = String::new();
        let m = self.machine;
        let sum = self.summary;
        let _ = writeln!(s, "## weft restarts under load\n");
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
            "- weft {} ({}); `WEFT_LOG={}`",
            m.commit,
            if cfg!(debug_assertions) {
                "run from the unoptimized xtask"
            } else {
                "run from target/release/xtask"
            },
            std::env::var("WEFT_LOG").unwrap_or_default()
        );
        match self.drain {
            Some(d) => {
                let _ = writeln!(
                    s,
                    "- restarts: {} hand-overs (a successor with the same command line takes the \
                     listening sockets over; the predecessor drains, `--drain-timeout {}s`), the \
                     first after {} s, then every {} s",
                    self.restarts.len(),
                    d.as_secs(),
                    LEAD.as_secs(),
                    INTERVAL.as_secs()
                );
            }
            None => {
                let _ = writeln!(
                    s,
                    "- restarts: {} **cold** restarts (this weft has no `--handover-socket`: \
                     stopped with SIGTERM, then started again), the first after {} s, then \
                     every {} s",
                    self.restarts.len(),
                    LEAD.as_secs(),
                    INTERVAL.as_secs()
                );
            }
        }
        let _ = writeln!(
            s,
            "- load through weft for {} s: HTTP/1.1 {HTTP_RATE} requests/s over {HTTP_CONNS} \
             keep-alive connections and {HTTP_NEW_RATE} requests/s on a new connection each; \
             {CHURN_RATE} new TCP connections/s (64 B echoed); {STREAMS} streaming connections \
             at a time, {} s each, every echoed byte checked",
            self.duration.as_secs(),
            STREAM_LIFE.as_secs()
        );
        let _ = writeln!(
            s,
            "- whole case {:.0} s; logs: `{}`",
            self.took.as_secs_f64(),
            self.logs.display()
        );

        let (per, outside) = self.by_restart();
        let _ = writeln!(
            s,
            "\n| restart | how | taken over (ms) | predecessor exited (ms) | failed requests | \
             refused connections | not opened otherwise | broken streams | new connections \
             failed |"
        );
        let _ = writeln!(s, "|---:|---|---:|---:|---:|---:|---:|---:|---:|");
        for (k, (r, f)) in self.restarts.iter().zip(&per).enumerate() {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                k + 1,
                r.how,
                ms(r.took_over),
                ms(r.old_exited),
                f.requests,
                f.refused,
                f.not_opened,
                f.streams,
                f.churn
            );
        }
        let o = outside;
        let _ = writeln!(
            s,
            "| outside the restarts | | | | {} | {} | {} | {} | {} |",
            o.requests, o.refused, o.not_opened, o.streams, o.churn
        );
        let t = self.total();
        let _ = writeln!(
            s,
            "| **all** (client's totals) | | | | {} | {} | {} | {} | {} |",
            t.requests, t.refused, t.not_opened, t.streams, t.churn
        );
        let _ = writeln!(
            s,
            "\nDone right: {} keep-alive and {} new-connection HTTP requests (p50 {} ms, p99 {} \
             ms, max {} ms), {} new TCP connections (p99 {} ms, max {} ms), {} streaming \
             connections ({:.0} MB checked). Aim: no failed request, no refused connection, no \
             broken streaming connection: **{}**.",
            sum.u("/loads/http/ok"),
            sum.u("/loads/http_new/ok"),
            sum.json["http_latency"]["p50_ms"],
            sum.json["http_latency"]["p99_ms"],
            sum.json["http_latency"]["max_ms"],
            sum.u("/loads/churn/ok"),
            sum.json["churn_latency"]["p99_ms"],
            sum.json["churn_latency"]["max_ms"],
            sum.u("/loads/stream/ok"),
            sum.u("/stream_bytes") as f64 / 1e6,
            if t.any() || self.restarts.iter().any(|r| r.error.is_some()) {
                "missed"
            } else {
                "met"
            }
        );
        let mut notes = Vec::new();
        for (k, r) in self.restarts.iter().enumerate() {
            if let Some(e) = &r.error {
                notes.push(format!("restart {}: {e}", k + 1));
            }
        }
        notes.extend(sum.event_notes(12));
        write_notes(&mut s, &notes);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_drain_timeout_is_read_from_the_flags() {
        let f = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            drain_timeout(&f(&["--drain-timeout", "5s"])),
            Duration::from_secs(5)
        );
        assert_eq!(
            drain_timeout(&f(&["--x", "--drain-timeout=1500ms"])),
            Duration::from_millis(1500)
        );
        assert_eq!(drain_timeout(&f(&[])), Duration::from_secs(30));
    }

    #[test]
    fn failures_are_sorted_by_what_they_cost() {
        let mut f = Failed::default();
        f.add("http_new", "refused", 2);
        f.add("http", "closed", 1);
        f.add("stream", "reset", 3);
        f.add("churn", "timeout", 4);
        f.add("churn", "connect_failed", 5);
        assert_eq!(
            (f.refused, f.requests, f.streams, f.churn, f.not_opened),
            (2, 1, 3, 4, 5)
        );
        assert!(f.any());
        assert!(!Failed::default().any());
    }
}
