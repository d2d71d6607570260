//! Flow records: one per redirected connection, kept in a bounded ring and streamed live to
//! subscribers (`weft flows --follow`, the admin API's `/flows?follow=1`).

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::broadcast;

/// Default number of flows kept in memory per node.
pub const DEFAULT_CAPACITY: usize = 10_000;

/// What weft did with a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Connected to the destination and bytes were relayed.
    Forwarded,
    /// The destination is a Service with no ready endpoint.
    NoEndpoint,
    /// The destination refused, was unreachable, or did not answer in time.
    ConnectFailed,
    /// A connection reached the capture listener without an eBPF redirect record, so its
    /// destination is unknown; it was closed.
    Unidentified,
    /// eBPF redirected a connect() but the connection never reached the proxy (for example
    /// the proxy was down, or the client gave up).
    Unhandled,
    /// Refused by an AuthorizationPolicy (see the flow's `policy`).
    Denied,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Forwarded => "forwarded",
            Verdict::NoEndpoint => "no_endpoint",
            Verdict::ConnectFailed => "connect_failed",
            Verdict::Unidentified => "unidentified",
            Verdict::Unhandled => "unhandled",
            Verdict::Denied => "denied",
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Verdict {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        serde_json::from_value(serde_json::Value::String(s.to_ascii_lowercase()))
            .map_err(|_| format!("unknown verdict {s:?} (forwarded, no_endpoint, connect_failed, unidentified, unhandled, denied)"))
    }
}

/// The calling side of a flow.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub ip: Option<IpAddr>,
    /// SPIFFE id of the calling workload (from its cgroup, or its peer certificate inbound).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

/// Where the flow went (after Service resolution).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Destination {
    pub namespace: Option<String>,
    pub pod: Option<String>,
    /// `namespace/name` of the Service when the original destination was a Service VIP.
    pub service: Option<String>,
    /// The `ip:port` weft connected to.
    pub address: Option<String>,
    /// SPIFFE id of the destination workload, when it is in the mesh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

/// One proxied (or attempted) connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Flow {
    /// Position in this node's flow sequence (monotonic, starts at 1).
    #[serde(default)]
    pub seq: u64,
    /// When the connection was accepted (RFC 3339).
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    pub node: String,
    pub source: Source,
    /// The `ip:port` the client asked for, before redirection.
    pub original_destination: String,
    pub destination: Destination,
    pub protocol: String,
    pub verdict: Verdict,
    /// Bytes from the source to the destination.
    pub bytes_sent: u64,
    /// Bytes from the destination back to the source.
    pub bytes_received: u64,
    /// From accept to close (milliseconds).
    pub duration_ms: f64,
    /// Detail for anything that did not end cleanly (connect error, reset, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The pod cgroup the connection was attributed to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_id: Option<u64>,
    /// Carried between nodes in mutual TLS (HBONE).
    #[serde(default)]
    pub mtls: bool,
    /// The AuthorizationPolicy (`namespace/name`) that denied the connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
}

/// Which flows a reader wants. Every set field must match.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct FlowFilter {
    /// Source or destination namespace.
    pub namespace: Option<String>,
    /// Source or destination pod name (or `namespace/name`).
    pub pod: Option<String>,
    pub verdict: Option<Verdict>,
    /// Only flows at or after this time.
    #[serde(with = "time::serde::rfc3339::option")]
    pub since: Option<OffsetDateTime>,
}

impl FlowFilter {
    pub fn matches(&self, flow: &Flow) -> bool {
        if let Some(ns) = &self.namespace {
            let hit = flow.source.namespace.as_deref() == Some(ns)
                || flow.destination.namespace.as_deref() == Some(ns);
            if !hit {
                return false;
            }
        }
        if let Some(pod) = &self.pod {
            let matches_pod = |ns: &Option<String>, name: &Option<String>| match pod.split_once('/')
            {
                Some((want_ns, want_name)) => {
                    ns.as_deref() == Some(want_ns) && name.as_deref() == Some(want_name)
                }
                None => name.as_deref() == Some(pod.as_str()),
            };
            if !matches_pod(&flow.source.namespace, &flow.source.pod)
                && !matches_pod(&flow.destination.namespace, &flow.destination.pod)
            {
                return false;
            }
        }
        if let Some(v) = self.verdict {
            if flow.verdict != v {
                return false;
            }
        }
        if let Some(since) = self.since {
            if flow.time < since {
                return false;
            }
        }
        true
    }
}

/// Parses `--since`: a duration before now (`30s`, `5m`, `2h`, `1d`, `1500ms`) or an RFC 3339 time.
pub fn parse_since(s: &str, now: OffsetDateTime) -> Result<OffsetDateTime, String> {
    if let Ok(t) = OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339) {
        return Ok(t);
    }
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("--since {s:?}: missing unit (ms, s, m, h, d)"))?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        format!("--since {s:?}: expected a duration like 30s, 5m, 2h or an RFC 3339 time")
    })?;
    let secs = |mult: u64| n.checked_mul(mult).map(Duration::from_secs);
    let d = match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        "d" => secs(86_400),
        _ => {
            return Err(format!(
                "--since {s:?}: unknown unit {unit:?} (ms, s, m, h, d)"
            ))
        }
    };
    d.and_then(|d| now.checked_sub(time::Duration::try_from(d).ok()?))
        .ok_or_else(|| format!("--since {s:?}: too far back"))
}

/// The node's flow log: a bounded ring of recent flows plus a live feed.
pub struct FlowStore {
    ring: Mutex<VecDeque<Arc<Flow>>>,
    capacity: usize,
    next_seq: AtomicU64,
    live: broadcast::Sender<Arc<Flow>>,
    by_verdict: Mutex<std::collections::BTreeMap<Verdict, u64>>,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
}

impl FlowStore {
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        let (live, _) = broadcast::channel(4096);
        Self {
            ring: Mutex::new(VecDeque::with_capacity(capacity.min(DEFAULT_CAPACITY))),
            capacity,
            next_seq: AtomicU64::new(1),
            live,
            by_verdict: Mutex::new(Default::default()),
            bytes_sent: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
        }
    }

    /// Records a flow: assigns its sequence number, keeps it in the ring (dropping the oldest
    /// when full) and hands it to live subscribers.
    pub fn record(&self, mut flow: Flow) -> Arc<Flow> {
        self.bytes_sent
            .fetch_add(flow.bytes_sent, Ordering::Relaxed);
        self.bytes_received
            .fetch_add(flow.bytes_received, Ordering::Relaxed);
        *self
            .by_verdict
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(flow.verdict)
            .or_default() += 1;
        // Numbering, keeping and publishing under one lock: the ring is in sequence order and
        // a reader that subscribes under the same lock sees each flow exactly once.
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        flow.seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let flow = Arc::new(flow);
        if ring.len() == self.capacity {
            ring.pop_front();
        }
        ring.push_back(flow.clone());
        // No subscriber is not an error.
        let _ = self.live.send(flow.clone());
        flow
    }

    /// The flows kept that match `filter` (oldest first) and a live feed of every flow
    /// recorded after them: no gap and no repeat between the two.
    pub fn follow(&self, filter: &FlowFilter) -> (Vec<Arc<Flow>>, broadcast::Receiver<Arc<Flow>>) {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let rx = self.live.subscribe();
        let kept = ring.iter().filter(|f| filter.matches(f)).cloned().collect();
        (kept, rx)
    }

    /// Flows currently kept that match `filter`, oldest first.
    pub fn recent(&self, filter: &FlowFilter) -> Vec<Arc<Flow>> {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        ring.iter().filter(|f| filter.matches(f)).cloned().collect()
    }

    /// A live feed of flows recorded from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Flow>> {
        self.live.subscribe()
    }

    pub fn len(&self) -> usize {
        self.ring.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes of all flows recorded since start: (source → destination, back).
    pub fn bytes_totals(&self) -> (u64, u64) {
        (
            self.bytes_sent.load(Ordering::Relaxed),
            self.bytes_received.load(Ordering::Relaxed),
        )
    }

    /// Total flows recorded since start, by verdict.
    pub fn totals(&self) -> std::collections::BTreeMap<Verdict, u64> {
        self.by_verdict
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(ns: &str, pod: &str, verdict: Verdict) -> Flow {
        Flow {
            seq: 0,
            time: OffsetDateTime::now_utc(),
            node: "n1".into(),
            source: Source {
                namespace: Some(ns.into()),
                pod: Some(pod.into()),
                ip: Some("10.244.1.2".parse().unwrap()),
                identity: Some("spiffe://cluster.local/ns/front/sa/default".into()),
            },
            original_destination: "10.96.0.10:80".into(),
            destination: Destination {
                namespace: Some("backend".into()),
                pod: Some("web-0".into()),
                service: Some("backend/web".into()),
                address: Some("10.244.1.3:8080".into()),
                identity: None,
            },
            protocol: "tcp".into(),
            verdict,
            bytes_sent: 1,
            bytes_received: 2,
            duration_ms: 0.5,
            error: None,
            cgroup_id: Some(7),
            mtls: false,
            policy: None,
        }
    }

    #[test]
    fn ring_is_bounded_and_ordered() {
        let store = FlowStore::new(3);
        for i in 0..5 {
            store.record(flow("a", &format!("p{i}"), Verdict::Forwarded));
        }
        let all = store.recent(&FlowFilter::default());
        assert_eq!(all.len(), 3);
        assert_eq!(all.iter().map(|f| f.seq).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert_eq!(store.totals()[&Verdict::Forwarded], 5);
    }

    #[test]
    fn filters_match_either_side() {
        let f = flow("front", "client", Verdict::ConnectFailed);
        let by_ns = |ns: &str| FlowFilter {
            namespace: Some(ns.into()),
            ..Default::default()
        };
        assert!(by_ns("front").matches(&f));
        assert!(by_ns("backend").matches(&f));
        assert!(!by_ns("other").matches(&f));
        let by_pod = |p: &str| FlowFilter {
            pod: Some(p.into()),
            ..Default::default()
        };
        assert!(by_pod("client").matches(&f));
        assert!(by_pod("web-0").matches(&f));
        assert!(by_pod("backend/web-0").matches(&f));
        assert!(!by_pod("front/web-0").matches(&f));
        let by_verdict = |v| FlowFilter {
            verdict: Some(v),
            ..Default::default()
        };
        assert!(by_verdict(Verdict::ConnectFailed).matches(&f));
        assert!(!by_verdict(Verdict::Forwarded).matches(&f));
        let later = FlowFilter {
            since: Some(f.time + Duration::from_secs(1)),
            ..Default::default()
        };
        assert!(!later.matches(&f));
    }

    #[test]
    fn follow_has_no_gap_and_no_repeat_under_concurrent_records() {
        let store = Arc::new(FlowStore::new(10_000));
        let writers: Vec<_> = (0..4)
            .map(|_| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        store.record(flow("a", "b", Verdict::Forwarded));
                    }
                })
            })
            .collect();
        while store.len() < 1500 {
            std::thread::yield_now();
        }
        let (kept, mut rx) = store.follow(&FlowFilter::default());
        for w in writers {
            w.join().unwrap();
        }
        let mut seqs: Vec<u64> = kept.iter().map(|f| f.seq).collect();
        while let Ok(f) = rx.try_recv() {
            seqs.push(f.seq);
        }
        assert_eq!(seqs, (1..=4000).collect::<Vec<u64>>());
    }

    #[tokio::test]
    async fn live_subscribers_see_new_flows() {
        let store = FlowStore::new(10);
        let mut rx = store.subscribe();
        store.record(flow("a", "b", Verdict::NoEndpoint));
        let got = rx.recv().await.unwrap();
        assert_eq!(got.verdict, Verdict::NoEndpoint);
        assert_eq!(got.seq, 1);
    }

    #[test]
    fn since_parses_durations_and_times() {
        let now = OffsetDateTime::now_utc();
        assert_eq!(
            parse_since("30s", now).unwrap(),
            now - Duration::from_secs(30)
        );
        assert_eq!(
            parse_since("5m", now).unwrap(),
            now - Duration::from_secs(300)
        );
        assert!(parse_since("2026-11-21T12:00:00Z", now).is_ok());
        assert!(parse_since("5x", now).is_err());
        assert!(parse_since("abc", now).is_err());
        assert!(parse_since("99999999999d", now).is_err());
        assert!(parse_since("18446744073709551615d", now).is_err());
    }

    #[test]
    fn verdict_round_trips() {
        for v in [
            "forwarded",
            "no_endpoint",
            "connect_failed",
            "unidentified",
            "unhandled",
            "denied",
        ] {
            assert_eq!(v.parse::<Verdict>().unwrap().as_str(), v);
        }
        assert!("bogus".parse::<Verdict>().is_err());
        let json = serde_json::to_string(&flow("a", "b", Verdict::Forwarded)).unwrap();
        let back: Flow = serde_json::from_str(&json).unwrap();
        assert_eq!(back.verdict, Verdict::Forwarded);
    }
}
