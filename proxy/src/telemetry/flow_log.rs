//! The node's flow log: one record per connection (see [`super::record`]), kept in a bounded
//! ring and streamed live to subscribers (`weft flows --follow`, the admin API's
//! `/flows?follow=1`), with totals by verdict for `/status` and `/metrics`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::broadcast;

use crate::admin::api::{Flow, FlowFilter, Verdict};

/// The node's flow log: a bounded ring of recent flows plus a live feed.
pub struct FlowLog {
    ring: Mutex<VecDeque<Arc<Flow>>>,
    capacity: usize,
    next_seq: AtomicU64,
    live: broadcast::Sender<Arc<Flow>>,
    /// Flows recorded per verdict, indexed by `Verdict as usize`.
    by_verdict: [AtomicU64; Verdict::ALL.len()],
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
}

impl FlowLog {
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        let (live, _) = broadcast::channel(4096);
        Self {
            ring: Mutex::new(VecDeque::with_capacity(
                capacity.min(crate::config::DEFAULT_FLOW_CAPACITY),
            )),
            capacity,
            next_seq: AtomicU64::new(1),
            live,
            by_verdict: Default::default(),
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
        self.by_verdict[flow.verdict as usize].fetch_add(1, Ordering::Relaxed);
        // Numbering, keeping and publishing under one lock: the ring is in sequence order and
        // a reader that subscribes under the same lock sees each flow exactly once.
        let mut ring = self.ring.lock();
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
        let ring = self.ring.lock();
        let rx = self.live.subscribe();
        let kept = ring.iter().filter(|f| filter.matches(f)).cloned().collect();
        (kept, rx)
    }

    /// Flows currently kept that match `filter`, oldest first.
    pub fn recent(&self, filter: &FlowFilter) -> Vec<Arc<Flow>> {
        let ring = self.ring.lock();
        ring.iter().filter(|f| filter.matches(f)).cloned().collect()
    }

    /// A live feed of flows recorded from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Flow>> {
        self.live.subscribe()
    }

    pub fn len(&self) -> usize {
        self.ring.lock().len()
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
    /// Flows recorded per verdict (verdicts never seen are left out).
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
            source: FlowSource {
                namespace: Some("a".into()),
                pod: Some(pod.into()),
                ..Default::default()
            },
            verdict,
            bytes_sent: 1,
            bytes_received: 2,
            ..Flow::default()
        }
    }

    #[test]
    fn ring_is_bounded_and_ordered() {
        let store = FlowLog::new(3);
        for i in 0..5 {
            store.record(flow(&format!("p{i}"), Verdict::Forwarded));
        }
        let all = store.recent(&FlowFilter::default());
        assert_eq!(all.len(), 3);
        assert_eq!(all.iter().map(|f| f.seq).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert_eq!(store.totals()[&Verdict::Forwarded], 5);
        assert_eq!(store.bytes_totals(), (5, 10));
    }

    #[test]
    fn follow_has_no_gap_and_no_repeat_under_concurrent_records() {
        let store = Arc::new(FlowLog::new(10_000));
        let writers: Vec<_> = (0..4)
            .map(|_| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        store.record(flow("b", Verdict::Forwarded));
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
        let mut rx = store.subscribe();
        store.record(flow("b", Verdict::NoEndpoint));
        let got = rx.recv().await.unwrap();
        assert_eq!(got.verdict, Verdict::NoEndpoint);
        assert_eq!(got.seq, 1);
    }
}
