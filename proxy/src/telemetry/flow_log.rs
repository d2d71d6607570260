//! The node's flow log: one record per connection (see [`super::record`]), kept in bounded
//! rings and streamed live to subscribers (`weft flows --follow`, the admin API's
//! `/flows?follow=1`), with totals by verdict for `/status` and `/metrics`.
//!
//! Flows are kept in two rings ([`kept_in`]): the flows of workloads (`--flow-capacity` of
//! them) and, in a tenth of that ([`unattributed_capacity`]), junk: flows that name no
//! workload (a connection to the capture listener without a redirect record, anything refused
//! before it was identified) and connections refused over a connection limit. Junk pushes out
//! only junk: a flood of it never evicts a workload's flow. Readers see both, in the order
//! they were recorded.
//!
//! Reading never holds up recording: a reader copies the rings' chunk pointers under the lock
//! (a few hundred pointers for the default capacity, never the flows) and filters, merges and
//! serializes from that snapshot after letting go. A chunk a snapshot still holds is copied
//! by the next record that writes to it (at most [`CHUNK`] pointers), not waited for.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use tokio::sync::broadcast;

use crate::admin::api::{Flow, FlowFilter, Verdict};

/// Flows per chunk of a ring: what a snapshot shares, and the most a record copies.
const CHUNK: usize = 64;

/// Which ring keeps a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kept {
    /// It names a workload (calling pod or peer identity, destination pod): `--flow-capacity`.
    Attributed,
    /// It names no workload, or was refused over a limit: kept apart so that it can only push
    /// out its own kind.
    Unattributed,
}

/// Where `flow` is kept: apart when it names no workload on either side, as a connection
/// without a redirect record never does (its caller and destination are unknown), nor a
/// connection refused before it was identified; and apart when it was refused over a
/// connection limit, even one counted per pod: a pod opening connections past its limit, as
/// fast as it can, must not push the node's other flows out. Anything else that names a
/// calling pod, a peer's identity or a destination pod is a workload's flow.
pub fn kept_in(flow: &Flow) -> Kept {
    let names_workload = flow.source.pod.is_some()
        || flow.source.identity.is_some()
        || flow.destination.pod.is_some()
        || flow.destination.identity.is_some();
    let junk = matches!(flow.verdict, Verdict::Unidentified | Verdict::OverLimit);
    if junk || !names_workload {
        Kept::Unattributed
    } else {
        Kept::Attributed
    }
}

/// How many unattributed flows are kept beside `capacity` workload flows: a tenth, at least one.
pub fn unattributed_capacity(capacity: usize) -> usize {
    (capacity / 10).max(1)
}

/// A bounded ring of flows in recording order, as shared chunks.
#[derive(Debug)]
struct Ring {
    /// Full chunks, then the one being filled; flows `skip..` of the first are kept.
    chunks: VecDeque<Arc<Vec<Arc<Flow>>>>,
    skip: usize,
    len: usize,
    capacity: usize,
    /// Flows recorded into this ring since start, and pushed out of it.
    seen: u64,
    dropped: u64,
}

impl Ring {
    fn new(capacity: usize) -> Ring {
        Ring {
            chunks: VecDeque::new(),
            skip: 0,
            len: 0,
            capacity: capacity.max(1),
            seen: 0,
            dropped: 0,
        }
    }

    fn push(&mut self, flow: Arc<Flow>) {
        match self.chunks.back_mut() {
            // Copies the chunk first if a reader's snapshot still holds it.
            Some(last) if last.len() < CHUNK => Arc::make_mut(last).push(flow),
            _ => {
                let mut chunk = Vec::with_capacity(CHUNK.min(self.capacity));
                chunk.push(flow);
                self.chunks.push_back(Arc::new(chunk));
            }
        }
        self.seen += 1;
        if self.len == self.capacity {
            self.skip += 1;
            self.dropped += 1;
            // Only a full chunk can be used up: the newest flow is in a later one.
            if self.chunks.front().is_some_and(|c| self.skip == c.len()) {
                self.chunks.pop_front();
                self.skip = 0;
            }
        } else {
            self.len += 1;
        }
    }

    fn snapshot(&self) -> RingSnapshot {
        RingSnapshot {
            chunks: self.chunks.iter().cloned().collect(),
            skip: self.skip,
        }
    }
}

/// A ring as it was when taken: later records neither change nor wait for it.
#[derive(Debug, Clone)]
struct RingSnapshot {
    chunks: Vec<Arc<Vec<Arc<Flow>>>>,
    skip: usize,
}

impl RingSnapshot {
    fn iter(&self) -> impl Iterator<Item = &Arc<Flow>> {
        self.chunks.iter().flat_map(|c| c.iter()).skip(self.skip)
    }
}

/// The flows kept when [`FlowLog::snapshot`] was taken, both rings.
#[derive(Debug, Clone)]
pub struct FlowSnapshot {
    attributed: RingSnapshot,
    unattributed: RingSnapshot,
}

impl FlowSnapshot {
    /// The flows that match `filter`, in recording order (both rings merged by sequence).
    pub fn matching(&self, filter: &FlowFilter) -> Vec<Arc<Flow>> {
        let mut a = self
            .attributed
            .iter()
            .filter(|f| filter.matches(f))
            .peekable();
        let mut u = self
            .unattributed
            .iter()
            .filter(|f| filter.matches(f))
            .peekable();
        let mut out = Vec::new();
        loop {
            let next = match (a.peek(), u.peek()) {
                (Some(x), Some(y)) if x.seq < y.seq => a.next(),
                (Some(_), Some(_)) => u.next(),
                (Some(_), None) => a.next(),
                (None, Some(_)) => u.next(),
                (None, None) => return out,
            };
            out.extend(next.cloned());
        }
    }
}

/// How full the rings are, and what the unattributed one has seen and pushed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FlowLogCounts {
    pub kept: usize,
    pub capacity: usize,
    pub unattributed_kept: usize,
    pub unattributed_capacity: usize,
    pub unattributed_seen: u64,
    pub unattributed_dropped: u64,
}

#[derive(Debug)]
struct Rings {
    next_seq: u64,
    attributed: Ring,
    unattributed: Ring,
}

/// Flows a follower may fall behind by before it is told it lagged.
const LIVE_CAPACITY: usize = 4096;

/// The node's flow log: bounded rings of recent flows plus a live feed.
pub struct FlowLog {
    rings: Mutex<Rings>,
    /// Made when the first subscriber comes: its 4 096 slots are 128 KiB, which a node that
    /// nobody follows would hold for nothing.
    live: OnceLock<broadcast::Sender<Arc<Flow>>>,
    /// Flows recorded per verdict, indexed by `Verdict as usize`.
    by_verdict: [AtomicU64; Verdict::ALL.len()],
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
}

impl FlowLog {
    /// A log keeping `capacity` workload flows, and [`unattributed_capacity`] others.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            rings: Mutex::new(Rings {
                next_seq: 1,
                attributed: Ring::new(capacity),
                unattributed: Ring::new(unattributed_capacity(capacity)),
            }),
            live: OnceLock::new(),
            by_verdict: Default::default(),
            bytes_sent: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
        }
    }

    /// Records a flow: assigns its sequence number, keeps it in its ring (dropping that ring's
    /// oldest when full) and hands it to live subscribers.
    pub fn record(&self, mut flow: Flow) -> Arc<Flow> {
        self.bytes_sent
            .fetch_add(flow.bytes_sent, Ordering::Relaxed);
        self.bytes_received
            .fetch_add(flow.bytes_received, Ordering::Relaxed);
        self.by_verdict[flow.verdict as usize].fetch_add(1, Ordering::Relaxed);
        let kept = kept_in(&flow);
        // Numbering, keeping and publishing under one lock: the rings are in sequence order
        // and a reader that subscribes under the same lock sees each flow exactly once.
        let mut rings = self.rings.lock();
        flow.seq = rings.next_seq;
        rings.next_seq += 1;
        let flow = Arc::new(flow);
        match kept {
            Kept::Attributed => rings.attributed.push(flow.clone()),
            Kept::Unattributed => rings.unattributed.push(flow.clone()),
        }
        if let Some(live) = self.live.get() {
            // No subscriber (any more) is not an error.
            let _ = live.send(flow.clone());
        }
        flow
    }

    /// The flows kept now, to be read without holding up new records.
    pub fn snapshot(&self) -> FlowSnapshot {
        let rings = self.rings.lock();
        FlowSnapshot {
            attributed: rings.attributed.snapshot(),
            unattributed: rings.unattributed.snapshot(),
        }
    }

    /// The flows kept that match `filter` (in recording order) and a live feed of every flow
    /// recorded after them: no gap and no repeat between the two.
    pub fn follow(&self, filter: &FlowFilter) -> (Vec<Arc<Flow>>, broadcast::Receiver<Arc<Flow>>) {
        let (snapshot, rx) = {
            let rings = self.rings.lock();
            let rx = self.live().subscribe();
            let snapshot = FlowSnapshot {
                attributed: rings.attributed.snapshot(),
                unattributed: rings.unattributed.snapshot(),
            };
            (snapshot, rx)
        };
        (snapshot.matching(filter), rx)
    }

    /// Flows currently kept that match `filter`, in recording order.
    pub fn recent(&self, filter: &FlowFilter) -> Vec<Arc<Flow>> {
        self.snapshot().matching(filter)
    }

    /// A live feed of flows recorded from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Flow>> {
        self.live().subscribe()
    }

    fn live(&self) -> &broadcast::Sender<Arc<Flow>> {
        self.live
            .get_or_init(|| broadcast::channel(LIVE_CAPACITY).0)
    }

    /// Both rings' fill and the unattributed ring's totals, read at once (no flow copied).
    pub fn counts(&self) -> FlowLogCounts {
        let rings = self.rings.lock();
        FlowLogCounts {
            kept: rings.attributed.len,
            capacity: rings.attributed.capacity,
            unattributed_kept: rings.unattributed.len,
            unattributed_capacity: rings.unattributed.capacity,
            unattributed_seen: rings.unattributed.seen,
            unattributed_dropped: rings.unattributed.dropped,
        }
    }

    /// Flows kept, in both rings.
    pub fn len(&self) -> usize {
        let c = self.counts();
        c.kept + c.unattributed_kept
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of all flows recorded since start: (source → destination, back).
    pub fn bytes_totals(&self) -> (u64, u64) {
        (
            self.bytes_sent.load(Ordering::Relaxed),
            self.bytes_received.load(Ordering::Relaxed),
        )
    }

    /// Flows recorded since start per verdict (verdicts never seen are left out).
    pub fn totals(&self) -> BTreeMap<Verdict, u64> {
        Verdict::ALL
            .iter()
            .map(|&v| (v, self.by_verdict[v as usize].load(Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::api::FlowSource;
    use time::OffsetDateTime;

    fn flow(pod: &str, verdict: Verdict) -> Flow {
        Flow {
            time: OffsetDateTime::now_utc(),
            node: "n1".into(),
            source: Arc::new(FlowSource {
                namespace: Some("a".into()),
                pod: Some(pod.into()),
                ..Default::default()
            }),
            verdict,
            bytes_sent: 1,
            bytes_received: 2,
            ..Flow::default()
        }
    }

    /// What a connection to the capture listener without a redirect record records.
    fn unidentified() -> Flow {
        Flow {
            time: OffsetDateTime::now_utc(),
            node: "n1".into(),
            source: Arc::new(FlowSource {
                ip: Some("10.0.0.9".parse().unwrap()),
                ..Default::default()
            }),
            verdict: Verdict::Unidentified,
            error: Some("no eBPF redirect record for this connection".into()),
            ..Flow::default()
        }
    }

    fn seqs(flows: &[Arc<Flow>]) -> Vec<u64> {
        flows.iter().map(|f| f.seq).collect()
    }

    #[test]
    fn ring_is_bounded_and_ordered() {
        let store = FlowLog::new(3);
        for i in 0..5 {
            store.record(flow(&format!("p{i}"), Verdict::Forwarded));
        }
        let all = store.recent(&FlowFilter::default());
        assert_eq!(all.len(), 3);
        assert_eq!(seqs(&all), vec![3, 4, 5]);
        assert_eq!(store.totals()[&Verdict::Forwarded], 5);
        assert_eq!(store.bytes_totals(), (5, 10));
    }

    #[test]
    fn ring_keeps_exactly_its_capacity_across_chunks() {
        for capacity in [1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 7] {
            let store = FlowLog::new(capacity);
            for n in 1..=(5 * CHUNK as u64 + 3) {
                store.record(flow("p", Verdict::Forwarded));
                let kept = seqs(&store.recent(&FlowFilter::default()));
                let first = n.saturating_sub(capacity as u64) + 1;
                assert_eq!(kept, (first..=n).collect::<Vec<_>>(), "capacity {capacity}");
            }
            // Never more than one chunk of flows pushed out and still held.
            let rings = store.rings.lock();
            let held: usize = rings.attributed.chunks.iter().map(|c| c.len()).sum();
            assert!(held < capacity + CHUNK, "capacity {capacity}: {held} held");
        }
    }

    #[test]
    fn flows_naming_no_workload_are_kept_apart() {
        assert_eq!(kept_in(&flow("p", Verdict::Forwarded)), Kept::Attributed);
        assert_eq!(kept_in(&flow("p", Verdict::Denied)), Kept::Attributed);
        assert_eq!(kept_in(&unidentified()), Kept::Unattributed);
        // Refused over a limit, even when the calling pod is known.
        assert_eq!(kept_in(&flow("p", Verdict::OverLimit)), Kept::Unattributed);
        // A peer node's workload, by its certificate only.
        let mut inbound = unidentified();
        inbound.verdict = Verdict::ConnectFailed;
        Arc::make_mut(&mut inbound.source).identity =
            Some("spiffe://cluster.local/ns/a/sa/b".into());
        assert_eq!(kept_in(&inbound), Kept::Attributed);
        // A redirect from a cgroup no pod is known by, refused before anything was identified.
        let mut nobody = unidentified();
        nobody.verdict = Verdict::Unhandled;
        assert_eq!(kept_in(&nobody), Kept::Unattributed);
        Arc::make_mut(&mut nobody.destination).pod = Some("web-0".into());
        assert_eq!(kept_in(&nobody), Kept::Attributed);
        assert_eq!(unattributed_capacity(10_000), 1_000);
        assert_eq!(unattributed_capacity(5), 1);
    }

    #[test]
    fn a_flood_of_unattributed_flows_never_pushes_a_workload_flow_out() {
        let store = FlowLog::new(100);
        let mut real = Vec::new();
        for i in 0..60 {
            real.push(store.record(flow(&format!("p{i}"), Verdict::Forwarded)).seq);
            for _ in 0..1000 {
                store.record(unidentified());
            }
        }
        let all = store.recent(&FlowFilter::default());
        let kept_real: Vec<u64> = all
            .iter()
            .filter(|f| f.verdict == Verdict::Forwarded)
            .map(|f| f.seq)
            .collect();
        assert_eq!(kept_real, real, "every workload flow survives the flood");
        let junk: Vec<&Arc<Flow>> = all
            .iter()
            .filter(|f| f.verdict == Verdict::Unidentified)
            .collect();
        assert_eq!(junk.len(), 10, "a tenth of the capacity, the latest");
        assert_eq!(junk.last().unwrap().seq, 60 * 1001);
        // Both rings, one order.
        assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
        assert_eq!(
            store.counts(),
            FlowLogCounts {
                kept: 60,
                capacity: 100,
                unattributed_kept: 10,
                unattributed_capacity: 10,
                unattributed_seen: 60_000,
                unattributed_dropped: 59_990,
            }
        );
        // Workload flows still push out the oldest of their own, and only those.
        for i in 0..50 {
            store.record(flow(&format!("q{i}"), Verdict::Forwarded));
        }
        let c = store.counts();
        assert_eq!((c.kept, c.unattributed_kept), (100, 10));
    }

    #[test]
    fn recording_goes_on_while_a_reader_iterates_a_snapshot() {
        let store = Arc::new(FlowLog::new(3 * CHUNK));
        for _ in 0..(2 * CHUNK + 5) {
            store.record(flow("p", Verdict::Forwarded));
        }
        store.record(unidentified());
        let snapshot = store.snapshot();
        let mut reading = snapshot.attributed.iter();
        let first = reading.next().unwrap().seq;
        // Records meanwhile neither wait for the reader (no lock is held) nor change what it
        // reads, even once they have pushed everything it holds out of the rings.
        let writer = {
            let store = store.clone();
            std::thread::spawn(move || {
                for _ in 0..(10 * CHUNK) {
                    store.record(flow("p", Verdict::Forwarded));
                    store.record(unidentified());
                }
            })
        };
        writer.join().unwrap();
        let rest: Vec<u64> = reading.map(|f| f.seq).collect();
        assert_eq!(first, 1);
        assert_eq!(rest, (2..=(2 * CHUNK as u64 + 5)).collect::<Vec<_>>());
        let all = seqs(&snapshot.matching(&FlowFilter::default()));
        assert_eq!(all.len(), 2 * CHUNK + 6);
        assert_eq!(*all.last().unwrap(), 2 * CHUNK as u64 + 6);
        // The log itself moved on.
        assert_eq!(
            *seqs(&store.recent(&FlowFilter::default())).last().unwrap(),
            2 * CHUNK as u64 + 6 + 20 * CHUNK as u64
        );
    }

    #[test]
    fn follow_has_no_gap_and_no_repeat_under_concurrent_records() {
        let store = Arc::new(FlowLog::new(10_000));
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        match w {
                            // Some of each ring; the unattributed one (1 000) never fills.
                            0 => store.record(unidentified()),
                            _ => store.record(flow("b", Verdict::Forwarded)),
                        };
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
        let store = FlowLog::new(10);
        store.record(flow("a", Verdict::Forwarded));
        assert!(store.live.get().is_none(), "a feed before anyone follows");
        let mut rx = store.subscribe();
        store.record(flow("b", Verdict::NoEndpoint));
        let got = rx.recv().await.unwrap();
        assert_eq!(got.verdict, Verdict::NoEndpoint);
        assert_eq!(got.seq, 2);
    }
}
