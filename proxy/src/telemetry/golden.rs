//! Golden signals without Prometheus: the node's own rolling store of who called whom, how
//! often, how well and how fast, behind `/stat`, `/graph`, `weft stat` and `weft graph`.
//!
//! **Keys.** Every finished HTTP request, TCP connection opened and TCP connection closed is
//! added to its key: (reporter, source [`Side`], destination [`Side`], Service, mTLS). A call
//! between two pods of this node is reported twice, once by each reporter; the queries count it
//! once (below).
//!
//! **Time.** A key keeps one slot per [`SLOT`] (10 s) of the longest window ([`SLOTS`] slots,
//! 10 min) and the current one, only the slots it had events in. A slot holds requests,
//! successes, a latency histogram, TCP connections opened and closed and the bytes of those
//! closed. A window of `k` slots (asked for windows are rounded to 10 s, 10 s to 10 min) sums
//! the `k` last full slots and the current partial one, and rates divide by the time those
//! cover: from the start of the oldest slot (or of the store, on a node younger than that) to
//! now, at least 1 s. A node up for 5 s does not report a minute's worth of rate over 5 s,
//! nor 5 s of requests over a minute.
//!
//! **Latency.** Log-spaced buckets, 4 per doubling from 1 µs (each 19% wider than the one
//! before, any latency up to years), stored sparsely (only the buckets hit); a percentile is
//! interpolated linearly inside its bucket as Prometheus' `histogram_quantile` does, then kept
//! within the smallest and largest latency seen.
//!
//! **Counting each call once.** A `/stat` row aggregates calls INTO its target. For each
//! destination pod of the row (or destination, when no pod is known), the calls reported by
//! [`Reporter::Destination`] are used when there are any in the window (this node hosts the
//! pod, and its inbound saw every call to it), else those reported by [`Reporter::Source`]
//! (the pod is on another node or outside the mesh). A `/graph` edge uses, per calling pod,
//! the [`Reporter::Source`] reports when there are any (this node hosts the caller and saw all
//! its calls), else the [`Reporter::Destination`] ones.
//!
//! **Memory.** The keys are spread over 16 shards, each a `Mutex<HashMap>` (a request costs one
//! hash and one uncontended lock, and an HTTP connection keeps the hashes of the keys its
//! requests used ([`KeptKeys`]): its next requests compare instead of hashing; no `Side` is
//! cloned unless the key is new). Keys with no
//! event for longer than the longest window and no TCP connection open are dropped (each shard
//! sweeps itself when a new slot starts, and on queries); beyond [`DEFAULT_MAX_KEYS`] keys, the
//! least recently used key of the shard is dropped to make room ([`Golden::evicted`] counts
//! them). A busy key holds at most 61 slots of 120 bytes and 8 bytes per latency bucket
//! hit (a decade of latencies spans 14 buckets): some 15 KiB.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::admin::api::{
    same_text, EdgeProtocol, GraphEdge, StatBy, StatQuery, StatRow, Text, STAT_WINDOW_MAX,
    STAT_WINDOW_MIN,
};

/// Which proxy saw it: the node of the caller (source) or of the callee (destination); a
/// same-node call is seen by both.
pub use super::istio::Reporter;

/// One side of a call, as the store keys it.
// `==` is written out below to look at pointers first; it says what the derived one would,
// so the derived hash agrees with it.
#[allow(clippy::derived_hash_with_manual_eq)]
#[derive(Clone, Debug, Default, Eq, Hash)]
pub struct Side {
    pub namespace: Option<Text>,
    /// The pod's workload (its Deployment, StatefulSet, … as Istio names it).
    pub workload: Option<Text>,
    /// The workload's kind: `Deployment`, `StatefulSet`, `DaemonSet`, `Job`, `CronJob`,
    /// `ReplicaSet`, `Pod`, …
    pub kind: Option<&'static str>,
    pub pod: Option<Text>,
}

/// Compared on every record against the stored key: the texts by pointer first (a call's
/// sides share their peer's), then by bytes ([`same_text`]). Every field is named, so a new
/// one cannot be left out.
impl PartialEq for Side {
    fn eq(&self, other: &Self) -> bool {
        let Side {
            namespace,
            workload,
            kind,
            pod,
        } = self;
        kind == &other.kind
            && same_text(pod, &other.pod)
            && same_text(workload, &other.workload)
            && same_text(namespace, &other.namespace)
    }
}

/// The time of a slot; windows are whole slots.
pub const SLOT: Duration = STAT_WINDOW_MIN;
/// Slots in the longest window.
pub const SLOTS: u64 = STAT_WINDOW_MAX.as_secs() / STAT_WINDOW_MIN.as_secs();
/// Keys kept at most (about: the cap is shared out between the shards).
pub const DEFAULT_MAX_KEYS: usize = 10_000;

const SLOT_NANOS: u64 = SLOT.as_nanos() as u64;
const SHARDS: usize = 16;
/// Rates never divide by less than this (a store a few milliseconds old).
const MIN_COVERED_SECS: f64 = 1.0;

// ---------------------------------------------------------------------------------------------
// Latency buckets
// ---------------------------------------------------------------------------------------------

/// Upper bound of bucket 0, in milliseconds (1 µs).
const BASE_MS: f64 = 0.001;
const BUCKETS_PER_DOUBLING: f64 = 4.0;
const BUCKETS: usize = 256;

/// The bucket of a latency: 0 holds `[0, 1µs]`, `i` holds `(1µs·2^((i-1)/4), 1µs·2^(i/4)]`.
fn bucket_of(ms: f64) -> u8 {
    // NaN and negative latencies count as 0.
    if ms.is_nan() || ms <= BASE_MS {
        return 0;
    }
    let i = ((ms / BASE_MS).log2() * BUCKETS_PER_DOUBLING).ceil();
    i.clamp(1.0, (BUCKETS - 1) as f64) as u8
}

fn upper_bound(i: usize) -> f64 {
    BASE_MS * (i as f64 / BUCKETS_PER_DOUBLING).exp2()
}

fn bucket_bounds(i: usize) -> (f64, f64) {
    if i == 0 {
        (0.0, BASE_MS)
    } else {
        (upper_bound(i - 1), upper_bound(i))
    }
}

/// A latency distribution, dense: what a query merges slots and keys into.
#[derive(Clone, Debug)]
struct Dist {
    /// Empty until something is added, then one count per bucket.
    counts: Vec<u64>,
    total: u64,
    min: f64,
    max: f64,
}

impl Default for Dist {
    fn default() -> Dist {
        Dist {
            counts: Vec::new(),
            total: 0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        }
    }
}

impl Dist {
    fn add(&mut self, bucket: u8, count: u64) {
        if count == 0 {
            return;
        }
        if self.counts.is_empty() {
            self.counts = vec![0; BUCKETS];
        }
        self.counts[bucket as usize] += count;
        self.total += count;
    }

    fn add_range(&mut self, min: f64, max: f64) {
        self.min = self.min.min(min);
        self.max = self.max.max(max);
    }

    /// The `q` quantile, as Prometheus' `histogram_quantile` (linear inside the bucket), but
    /// within the smallest and largest latency seen; `None` when empty.
    fn quantile(&self, q: f64) -> Option<f64> {
        if self.total == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * self.total as f64;
        let mut below = 0u64;
        let mut estimate = self.max;
        for (i, &c) in self.counts.iter().enumerate() {
            if c == 0 {
                continue;
            }
            if (below + c) as f64 >= rank {
                // The bucket, narrowed to the latencies seen: the first and last buckets
                // are rarely full.
                let (lo, hi) = bucket_bounds(i);
                let (lo, hi) = (lo.max(self.min).min(hi), hi.min(self.max).max(lo));
                estimate = lo + (hi - lo) * ((rank - below as f64) / c as f64);
                break;
            }
            below += c;
        }
        Some(estimate.clamp(self.min, self.max))
    }
}

/// A slot's latencies, sparse: the buckets hit, in order.
#[derive(Clone, Debug)]
struct Hist {
    counts: Vec<(u8, u32)>,
    min: f64,
    max: f64,
}

impl Default for Hist {
    fn default() -> Hist {
        Hist {
            counts: Vec::new(),
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        }
    }
}

impl Hist {
    fn add(&mut self, ms: f64) {
        let ms = if ms.is_nan() || ms < 0.0 { 0.0 } else { ms };
        let b = bucket_of(ms);
        match self.counts.binary_search_by_key(&b, |c| c.0) {
            Ok(i) => self.counts[i].1 = self.counts[i].1.saturating_add(1),
            Err(i) => self.counts.insert(i, (b, 1)),
        }
        self.min = self.min.min(ms);
        self.max = self.max.max(ms);
    }
}

// ---------------------------------------------------------------------------------------------
// Keys, slots, shards
// ---------------------------------------------------------------------------------------------

/// A key, borrowed: what the recording calls pass.
#[derive(Clone, Copy)]
struct Call<'a> {
    reporter: Reporter,
    source: &'a Side,
    destination: &'a Side,
    service: Option<&'a Text>,
    mtls: bool,
}

#[derive(Clone, Copy, Debug)]
enum Event {
    Request { success: bool, duration_ms: f64 },
    Opened,
    Closed { sent: u64, received: u64 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Key {
    reporter: Reporter,
    source: Side,
    destination: Side,
    service: Option<Text>,
    mtls: bool,
}

impl Key {
    fn is(&self, c: &Call<'_>) -> bool {
        self.reporter == c.reporter
            && self.mtls == c.mtls
            && self.service.as_ref() == c.service
            && &self.destination == c.destination
            && &self.source == c.source
    }
}

impl Call<'_> {
    fn to_key(self) -> Key {
        Key {
            reporter: self.reporter,
            source: self.source.clone(),
            destination: self.destination.clone(),
            service: self.service.cloned(),
            mtls: self.mtls,
        }
    }
}

#[derive(Clone, Debug, Default)]
struct Slot {
    /// Slots since the store's epoch.
    n: u64,
    requests: u64,
    successes: u64,
    latency: Hist,
    opened: u64,
    closed: u64,
    sent: u64,
    received: u64,
}

#[derive(Debug)]
struct Entry {
    key: Key,
    /// Nanoseconds since the epoch of the last event (least recent keys go first).
    last: u64,
    /// TCP connections opened and not closed yet.
    open: u64,
    /// Oldest first; only slots with events.
    slots: VecDeque<Slot>,
}

impl Entry {
    fn slot_mut(&mut self, n: u64) -> &mut Slot {
        // Nearly always the last slot, or a new one after it; a late event goes in its place.
        let i = match self.slots.iter().rposition(|s| s.n <= n) {
            Some(i) if self.slots[i].n == n => i,
            Some(i) => {
                self.slots.insert(
                    i + 1,
                    Slot {
                        n,
                        ..Slot::default()
                    },
                );
                i + 1
            }
            None => {
                self.slots.push_front(Slot {
                    n,
                    ..Slot::default()
                });
                0
            }
        };
        &mut self.slots[i]
    }
}

/// The keys a connection's requests were recorded under, with their hashes: a connection
/// mostly repeats a key or two (one per reporter).
#[derive(Default)]
pub struct KeptKeys(Mutex<Vec<(Key, u64)>>);

impl KeptKeys {
    /// How many are kept.
    const KEPT: usize = 4;
}

/// The map's keys are already hashes.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

#[derive(Default)]
struct Shard {
    /// Hash of the key → the keys of that hash (nearly always one).
    map: HashMap<u64, Vec<Entry>, BuildHasherDefault<Prehashed>>,
    len: usize,
    /// The slot of the last sweep.
    swept: u64,
}

impl Shard {
    /// Drops the slots no window reaches any more, and the keys left with none and no TCP
    /// connection open; returns how many keys were dropped.
    fn sweep(&mut self, n: u64) -> usize {
        self.swept = n;
        let oldest = n.saturating_sub(SLOTS);
        let mut dropped = 0;
        self.map.retain(|_, entries| {
            entries.retain_mut(|e| {
                while e.slots.front().is_some_and(|s| s.n < oldest) {
                    e.slots.pop_front();
                }
                let keep = !e.slots.is_empty() || e.open > 0;
                dropped += usize::from(!keep);
                keep
            });
            !entries.is_empty()
        });
        self.len -= dropped;
        dropped
    }

    /// Drops the least recently used key.
    fn evict_oldest(&mut self) -> bool {
        let oldest = self
            .map
            .iter()
            .flat_map(|(h, es)| es.iter().enumerate().map(move |(i, e)| (e.last, *h, i)))
            .min();
        let Some((_, hash, i)) = oldest else {
            return false;
        };
        let entries = self.map.get_mut(&hash).expect("found above");
        entries.swap_remove(i);
        if entries.is_empty() {
            self.map.remove(&hash);
        }
        self.len -= 1;
        true
    }
}

// ---------------------------------------------------------------------------------------------
// The store
// ---------------------------------------------------------------------------------------------

/// The node's golden signals: a rolling window of per-call-key counters.
pub struct Golden {
    epoch: Instant,
    hasher: foldhash::fast::RandomState,
    shards: Box<[Mutex<Shard>]>,
    max_keys_per_shard: usize,
    evicted: AtomicU64,
    expired: AtomicU64,
}

impl Default for Golden {
    fn default() -> Golden {
        Golden::new()
    }
}

impl std::fmt::Debug for Golden {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Golden")
            .field("keys", &self.keys())
            .field("evicted", &self.evicted())
            .finish_non_exhaustive()
    }
}

/// What one key did over a window.
#[derive(Debug)]
struct Summary {
    key: Key,
    requests: u64,
    successes: u64,
    /// The latency buckets hit, in order, and the smallest and largest latency.
    latency: Vec<(u8, u64)>,
    latency_range: (f64, f64),
    opened: u64,
    closed: u64,
    sent: u64,
    received: u64,
    open: u64,
}

/// The sums of a row or an edge.
#[derive(Debug, Default)]
struct Totals {
    requests: u64,
    successes: u64,
    latency: Dist,
    opened: u64,
    sent: u64,
    received: u64,
    open: u64,
}

impl Totals {
    fn add(&mut self, s: &Summary) {
        self.requests += s.requests;
        self.successes += s.successes;
        for &(b, c) in &s.latency {
            self.latency.add(b, c);
        }
        self.latency.add_range(s.latency_range.0, s.latency_range.1);
        self.opened += s.opened;
        self.sent += s.sent;
        self.received += s.received;
        self.open += s.open;
    }

    fn success_rate(&self) -> Option<f64> {
        (self.requests > 0).then(|| self.successes as f64 / self.requests as f64)
    }
}

/// A `/stat` row: (namespace, name, kind).
type RowKey = (String, String, String);

/// The sums of a `/stat` row.
#[derive(Debug, Default)]
struct RowAcc<'a> {
    totals: Totals,
    meshed: bool,
    /// Destination pods.
    pods: BTreeSet<&'a Text>,
}

/// Who a side is, for counting each call once: its pod when known, else what is known.
type SideId = (Option<Text>, Option<Text>, Option<Text>);

fn side_id(side: &Side) -> SideId {
    match &side.pod {
        Some(pod) => (side.namespace.clone(), None, Some(pod.clone())),
        None => (side.namespace.clone(), side.workload.clone(), None),
    }
}

/// `namespace/name`, or `name` without a namespace.
fn qualified(namespace: &Option<Text>, name: &str) -> String {
    match namespace {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_string(),
    }
}

impl Golden {
    /// An empty store, keeping up to [`DEFAULT_MAX_KEYS`] keys.
    pub fn new() -> Golden {
        Golden::with_max_keys(DEFAULT_MAX_KEYS)
    }

    /// An empty store keeping up to about `max_keys` keys (exactly, below 1024: one shard).
    pub fn with_max_keys(max_keys: usize) -> Golden {
        let shards = if max_keys >= 1024 { SHARDS } else { 1 };
        Golden {
            epoch: Instant::now(),
            hasher: foldhash::fast::RandomState::default(),
            shards: (0..shards).map(|_| Mutex::new(Shard::default())).collect(),
            max_keys_per_shard: max_keys.div_ceil(shards).max(1),
            evicted: AtomicU64::new(0),
            expired: AtomicU64::new(0),
        }
    }

    /// One finished HTTP request. `service` is the destination Service as `namespace/name`
    /// when one was called. `success`: not a 5xx and not a connection that ended before a
    /// response (status 0).
    #[allow(clippy::too_many_arguments)]
    pub fn request(
        &self,
        reporter: Reporter,
        source: &Side,
        destination: &Side,
        service: Option<&Text>,
        mtls: bool,
        success: bool,
        duration_ms: f64,
    ) {
        let kept = KeptKeys::default();
        self.request_kept(
            &kept,
            reporter,
            source,
            destination,
            service,
            mtls,
            success,
            duration_ms,
        );
    }

    /// The same, for a connection whose keys' hashes are kept in `kept`: a key it recorded
    /// before is found there by comparing (pointers first), not hashed again.
    #[allow(clippy::too_many_arguments)]
    pub fn request_kept(
        &self,
        kept: &KeptKeys,
        reporter: Reporter,
        source: &Side,
        destination: &Side,
        service: Option<&Text>,
        mtls: bool,
        success: bool,
        duration_ms: f64,
    ) {
        let call = Call {
            reporter,
            source,
            destination,
            service,
            mtls,
        };
        let mut keys = kept.0.lock();
        let hash = match keys.iter().find(|(k, _)| k.is(&call)) {
            Some(&(_, hash)) => hash,
            None => {
                let hash = self.hash(&call);
                keys.truncate(KeptKeys::KEPT - 1);
                keys.insert(0, (call.to_key(), hash));
                hash
            }
        };
        drop(keys);
        let event = Event::Request {
            success,
            duration_ms,
        };
        self.record_hashed(Instant::now(), call, hash, event);
    }

    /// One TCP connection opened.
    pub fn tcp_opened(
        &self,
        reporter: Reporter,
        source: &Side,
        destination: &Side,
        service: Option<&Text>,
        mtls: bool,
    ) {
        let call = Call {
            reporter,
            source,
            destination,
            service,
            mtls,
        };
        self.record(Instant::now(), call, Event::Opened);
    }

    /// One TCP connection closed, with its byte counts (`sent`: source → destination).
    #[allow(clippy::too_many_arguments)]
    pub fn tcp_closed(
        &self,
        reporter: Reporter,
        source: &Side,
        destination: &Side,
        service: Option<&Text>,
        mtls: bool,
        sent: u64,
        received: u64,
    ) {
        let call = Call {
            reporter,
            source,
            destination,
            service,
            mtls,
        };
        self.record(Instant::now(), call, Event::Closed { sent, received });
    }

    /// `/stat`: a row per target of `query.by` with calls into it in the window (or TCP
    /// connections open now), sorted by namespace and name.
    pub fn stat(&self, query: &StatQuery) -> Vec<StatRow> {
        self.stat_at(query, Instant::now())
    }

    /// `/graph`: an edge per (caller, callee) with calls in the window (or TCP connections
    /// open now), sorted by source and destination.
    pub fn graph(&self, window: Duration) -> Vec<GraphEdge> {
        self.graph_at(window, Instant::now())
    }

    /// Keys held now.
    pub fn keys(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len).sum()
    }

    /// Keys dropped to stay within the cap, since start.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    /// Keys dropped for being idle longer than the longest window, since start.
    pub fn expired(&self) -> u64 {
        self.expired.load(Ordering::Relaxed)
    }

    fn nanos(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    fn shard_of(&self, hash: u64) -> &Mutex<Shard> {
        // Not the bits the map indexes with (low) nor tags with (high).
        &self.shards[(hash >> 32) as usize % self.shards.len()]
    }

    fn hash(&self, call: &Call<'_>) -> u64 {
        self.hasher.hash_one((
            call.reporter,
            call.source,
            call.destination,
            call.service,
            call.mtls,
        ))
    }

    fn record(&self, now: Instant, call: Call<'_>, event: Event) {
        self.record_hashed(now, call, self.hash(&call), event);
    }

    fn record_hashed(&self, now: Instant, call: Call<'_>, hash: u64, event: Event) {
        let nanos = self.nanos(now);
        let n = nanos / SLOT_NANOS;
        let mut guard = self.shard_of(hash).lock();
        let shard = &mut *guard;
        if n > shard.swept {
            let dropped = shard.sweep(n);
            self.expired.fetch_add(dropped as u64, Ordering::Relaxed);
        }
        let found = shard
            .map
            .get(&hash)
            .and_then(|es| es.iter().position(|e| e.key.is(&call)));
        let entry = match found {
            Some(i) => &mut shard.map.get_mut(&hash).expect("found above")[i],
            None => {
                while shard.len >= self.max_keys_per_shard && shard.evict_oldest() {
                    self.evicted.fetch_add(1, Ordering::Relaxed);
                }
                shard.len += 1;
                let entries = shard.map.entry(hash).or_default();
                entries.push(Entry {
                    key: call.to_key(),
                    last: nanos,
                    open: 0,
                    slots: VecDeque::new(),
                });
                entries.last_mut().expect("pushed")
            }
        };
        entry.last = entry.last.max(nanos);
        match event {
            Event::Opened => entry.open += 1,
            Event::Closed { .. } => entry.open = entry.open.saturating_sub(1),
            Event::Request { .. } => {}
        }
        let slot = entry.slot_mut(n);
        match event {
            Event::Request {
                success,
                duration_ms,
            } => {
                slot.requests += 1;
                slot.successes += u64::from(success);
                slot.latency.add(duration_ms);
            }
            Event::Opened => slot.opened += 1,
            Event::Closed { sent, received } => {
                slot.closed += 1;
                slot.sent += sent;
                slot.received += received;
            }
        }
    }

    /// What every key did in the window ending `now` (keys that did nothing and hold no
    /// connection open are left out), and the seconds the window covers.
    fn summaries(&self, window: Duration, now: Instant) -> (Vec<Summary>, f64) {
        let nanos = self.nanos(now);
        let n = nanos / SLOT_NANOS;
        let k = ((window.as_secs_f64() / SLOT.as_secs_f64()).round() as u64).clamp(1, SLOTS);
        let first = n.saturating_sub(k);
        let covered = ((n - first) * SLOT_NANOS + nanos % SLOT_NANOS) as f64 / 1e9;
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            if n > shard.swept {
                let dropped = shard.sweep(n);
                self.expired.fetch_add(dropped as u64, Ordering::Relaxed);
            }
            for e in shard.map.values().flatten() {
                let mut s = Summary {
                    key: e.key.clone(),
                    requests: 0,
                    successes: 0,
                    latency: Vec::new(),
                    latency_range: (f64::INFINITY, f64::NEG_INFINITY),
                    opened: 0,
                    closed: 0,
                    sent: 0,
                    received: 0,
                    open: e.open,
                };
                // Events recorded after `now` (by threads that read the clock later) count too.
                let mut latency = [0u64; BUCKETS];
                for slot in e.slots.iter().filter(|s| s.n >= first) {
                    s.requests += slot.requests;
                    s.successes += slot.successes;
                    for &(b, c) in &slot.latency.counts {
                        latency[b as usize] += u64::from(c);
                    }
                    s.latency_range.0 = s.latency_range.0.min(slot.latency.min);
                    s.latency_range.1 = s.latency_range.1.max(slot.latency.max);
                    s.opened += slot.opened;
                    s.closed += slot.closed;
                    s.sent += slot.sent;
                    s.received += slot.received;
                }
                if s.requests > 0 {
                    s.latency = (0..BUCKETS)
                        .filter(|&b| latency[b] > 0)
                        .map(|b| (b as u8, latency[b]))
                        .collect();
                }
                if s.requests + s.opened + s.closed + s.open > 0 {
                    out.push(s);
                }
            }
        }
        (out, covered.max(MIN_COVERED_SECS))
    }

    fn stat_at(&self, query: &StatQuery, now: Instant) -> Vec<StatRow> {
        let (summaries, covered) = self.summaries(query.window, now);
        let by = query.by;
        // (namespace, name, kind) of the row a call goes to.
        let row_of = |s: &Summary| -> Option<RowKey> {
            let d = &s.key.destination;
            let ns = || d.namespace.as_deref().unwrap_or_default().to_string();
            let row = match by {
                StatBy::Svc => {
                    let svc = s.key.service.as_deref()?;
                    let (ns, name) = svc.split_once('/').unwrap_or(("", svc));
                    (ns.to_string(), name.to_string(), "Service".to_string())
                }
                StatBy::Pod => (ns(), d.pod.as_deref()?.to_string(), "Pod".to_string()),
                StatBy::Ns => {
                    let ns = d.namespace.as_deref()?.to_string();
                    (ns.clone(), ns, "Namespace".to_string())
                }
                StatBy::Workload => (
                    ns(),
                    d.workload.as_deref()?.to_string(),
                    d.kind.unwrap_or("Workload").to_string(),
                ),
                kinded => {
                    let kind = kinded.workload_kind()?;
                    if d.kind != Some(kind) {
                        return None;
                    }
                    (ns(), d.workload.as_deref()?.to_string(), kind.to_string())
                }
            };
            match &query.namespace {
                Some(want) if *want != row.0 => None,
                _ => Some(row),
            }
        };
        let tagged: Vec<_> = summaries
            .iter()
            .filter_map(|s| Some((row_of(s)?, side_id(&s.key.destination), s)))
            .collect();
        // The destinations (per row) some of whose calls this node saw as their destination.
        let hosted: HashSet<(&RowKey, &SideId)> = tagged
            .iter()
            .filter(|(_, _, s)| s.key.reporter == Reporter::Destination)
            .map(|(row, id, _)| (row, id))
            .collect();
        let mut rows: BTreeMap<&RowKey, RowAcc> = BTreeMap::new();
        for (row, id, s) in &tagged {
            let by_destination = s.key.reporter == Reporter::Destination;
            if by_destination != hosted.contains(&(row, id)) {
                continue;
            }
            let acc = rows.entry(row).or_default();
            acc.totals.add(s);
            acc.meshed |= by_destination || s.key.mtls;
            acc.pods.extend(s.key.destination.pod.as_ref());
        }
        rows.into_iter()
            .map(
                |(
                    (namespace, name, kind),
                    RowAcc {
                        totals: t,
                        meshed,
                        pods,
                    },
                )| StatRow {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    kind: kind.clone(),
                    meshed,
                    pods: pods.len() as u64,
                    requests: t.requests,
                    rps: t.requests as f64 / covered,
                    success_rate: t.success_rate(),
                    p50_ms: t.latency.quantile(0.50),
                    p95_ms: t.latency.quantile(0.95),
                    p99_ms: t.latency.quantile(0.99),
                    tcp_connections: t.open,
                    tcp_opened: t.opened,
                    tcp_bytes_sent_per_sec: t.sent as f64 / covered,
                    tcp_bytes_received_per_sec: t.received as f64 / covered,
                    window_seconds: covered,
                },
            )
            .collect()
    }

    fn graph_at(&self, window: Duration, now: Instant) -> Vec<GraphEdge> {
        let (summaries, covered) = self.summaries(window, now);
        // The callers this node hosts: it saw all their calls as their source.
        let hosted: HashSet<SideId> = summaries
            .iter()
            .filter(|s| s.key.reporter == Reporter::Source)
            .map(|s| side_id(&s.key.source))
            .collect();
        struct EdgeAcc<'a> {
            totals: Totals,
            mtls: bool,
            services: BTreeSet<&'a Text>,
        }
        let mut edges: BTreeMap<(String, String), EdgeAcc> = BTreeMap::new();
        for s in &summaries {
            let by_source = s.key.reporter == Reporter::Source;
            if by_source != hosted.contains(&side_id(&s.key.source)) {
                continue;
            }
            let src = &s.key.source;
            let source = match (&src.workload, &src.pod) {
                (Some(w), _) | (None, Some(w)) => qualified(&src.namespace, w),
                (None, None) => "unknown".to_string(),
            };
            let dst = &s.key.destination;
            let destination = match (&dst.workload, &dst.pod, &s.key.service) {
                (Some(w), _, _) | (None, Some(w), _) => qualified(&dst.namespace, w),
                (None, None, Some(svc)) => svc.to_string(),
                (None, None, None) => "unknown".to_string(),
            };
            let edge = edges.entry((source, destination)).or_insert(EdgeAcc {
                totals: Totals::default(),
                mtls: true,
                services: BTreeSet::new(),
            });
            edge.totals.add(s);
            edge.mtls &= s.key.mtls;
            edge.services.extend(s.key.service.as_ref());
        }
        edges
            .into_iter()
            .map(|((source, destination), e)| {
                let t = &e.totals;
                GraphEdge {
                    source,
                    destination,
                    service: match e.services.len() {
                        1 => e.services.first().map(|s| s.to_string()),
                        _ => None,
                    },
                    protocol: if t.requests > 0 {
                        EdgeProtocol::Http
                    } else {
                        EdgeProtocol::Tcp
                    },
                    requests: t.requests,
                    rps: t.requests as f64 / covered,
                    error_rate: t.success_rate().map(|s| 1.0 - s),
                    mtls: e.mtls,
                    tcp_connections: t.open,
                    tcp_opened: t.opened,
                    tcp_bytes_sent_per_sec: t.sent as f64 / covered,
                    tcp_bytes_received_per_sec: t.received as f64 / covered,
                    window_seconds: covered,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    /// Sides made from separate texts that say the same are one key; any field that differs
    /// makes another.
    #[test]
    fn sides_are_equal_by_what_they_say() {
        let a = side("default", "reviews-v1", "Deployment", "reviews-v1-abc");
        assert_eq!(
            a,
            side("default", "reviews-v1", "Deployment", "reviews-v1-abc")
        );
        assert_eq!(a, a.clone());
        for other in [
            side("prod", "reviews-v1", "Deployment", "reviews-v1-abc"),
            side("default", "reviews-v2", "Deployment", "reviews-v1-abc"),
            side("default", "reviews-v1", "StatefulSet", "reviews-v1-abc"),
            side("default", "reviews-v1", "Deployment", "reviews-v1-xyz"),
            Side::default(),
        ] {
            assert_ne!(a, other);
        }
    }

    fn side(ns: &str, workload: &str, kind: &'static str, pod: &str) -> Side {
        Side {
            namespace: Some(ns.into()),
            workload: Some(workload.into()),
            kind: Some(kind),
            pod: Some(pod.into()),
        }
    }

    fn deploy(ns: &str, name: &str, pod: &str) -> Side {
        side(ns, name, "Deployment", pod)
    }

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    /// Test helpers: events at a time after the store's epoch.
    impl Golden {
        #[allow(clippy::too_many_arguments)]
        fn req_at(
            &self,
            t: Duration,
            reporter: Reporter,
            source: &Side,
            destination: &Side,
            service: Option<&str>,
            success: bool,
            ms: f64,
        ) {
            let service: Option<Text> = service.map(Into::into);
            let call = Call {
                reporter,
                source,
                destination,
                service: service.as_ref(),
                mtls: false,
            };
            let event = Event::Request {
                success,
                duration_ms: ms,
            };
            self.record(self.epoch + t, call, event);
        }

        fn tcp_at(
            &self,
            t: Duration,
            reporter: Reporter,
            source: &Side,
            destination: &Side,
            mtls: bool,
            event: Event,
        ) {
            let call = Call {
                reporter,
                source,
                destination,
                service: None,
                mtls,
            };
            self.record(self.epoch + t, call, event);
        }

        fn stat_after(&self, t: Duration, by: StatBy, window: Duration) -> Vec<StatRow> {
            let q = StatQuery {
                by,
                namespace: None,
                window,
            };
            self.stat_at(&q, self.epoch + t)
        }
    }

    fn only(rows: Vec<StatRow>) -> StatRow {
        assert_eq!(rows.len(), 1, "{rows:#?}");
        rows.into_iter().next().unwrap()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9 * b.abs().max(1.0)
    }

    #[test]
    fn kept_keys_record_where_hashing_them_does() {
        let g = Golden::new();
        let kept = KeptKeys::default();
        let (c, s) = (deploy("a", "client", "c-1"), deploy("b", "server", "s-1"));
        let other = deploy("b", "server", "s-2");
        let svc: Text = "server.b.svc.cluster.local".into();
        for _ in 0..3 {
            g.request_kept(
                &kept,
                Reporter::Source,
                &c,
                &s,
                Some(&svc),
                false,
                true,
                1.0,
            );
        }
        // The same key in texts of its own, kept or not: one key (a kept hash that was not
        // the key's own would have made another).
        let (c2, s2) = (deploy("a", "client", "c-1"), deploy("b", "server", "s-1"));
        let svc2: Text = "server.b.svc.cluster.local".into();
        g.request_kept(
            &kept,
            Reporter::Source,
            &c2,
            &s2,
            Some(&svc2),
            false,
            false,
            1.0,
        );
        g.request(Reporter::Source, &c2, &s2, Some(&svc2), false, true, 1.0);
        assert_eq!(g.keys(), 1);
        assert_eq!(kept.0.lock().len(), 1, "one key, kept once");
        // Another pod, Service or mTLS: keys apart, more than are kept.
        g.request_kept(
            &kept,
            Reporter::Source,
            &c,
            &other,
            Some(&svc),
            false,
            true,
            1.0,
        );
        g.request_kept(&kept, Reporter::Source, &c, &s, None, false, true, 1.0);
        let other_svc: Text = "other.b.svc.cluster.local".into();
        g.request_kept(
            &kept,
            Reporter::Source,
            &c,
            &s,
            Some(&other_svc),
            false,
            true,
            1.0,
        );
        g.request_kept(
            &kept,
            Reporter::Source,
            &c2,
            &s2,
            Some(&svc2),
            false,
            false,
            1.0,
        );
        g.request(Reporter::Source, &c, &s, Some(&svc), false, true, 1.0);
        assert_eq!(g.keys(), 4);
        assert!(kept.0.lock().len() <= KeptKeys::KEPT);
        let q = StatQuery {
            by: StatBy::Pod,
            namespace: Some("b".into()),
            window: MIN,
        };
        let rows = g.stat(&q);
        let pod = |name: &str| rows.iter().find(|r| r.name == name).expect(name);
        assert_eq!(pod("s-1").requests, 9, "{rows:#?}");
        assert_eq!(pod("s-2").requests, 1, "{rows:#?}");
        assert_eq!(pod("s-1").success_rate, Some(7.0 / 9.0), "{rows:#?}");
    }

    #[test]
    fn a_fresh_node_divides_by_the_time_it_has_been_up() {
        let g = Golden::new();
        let (c, s) = (deploy("a", "client", "c-1"), deploy("b", "server", "s-1"));
        for i in 0..50 {
            g.req_at(
                secs(i as f64 * 0.1),
                Reporter::Source,
                &c,
                &s,
                None,
                true,
                1.0,
            );
        }
        // 50 requests in the first 5 s: 10 rps, not 50/60.
        let row = only(g.stat_after(secs(5.0), StatBy::Deploy, MIN));
        assert!(close(row.window_seconds, 5.0), "{row:?}");
        assert!(close(row.rps, 10.0), "{row:?}");
        assert_eq!(row.requests, 50);
        // A few milliseconds in: never divided by less than a second.
        let g = Golden::new();
        g.req_at(secs(0.001), Reporter::Source, &c, &s, None, true, 1.0);
        let row = only(g.stat_after(secs(0.002), StatBy::Deploy, MIN));
        assert!(
            close(row.rps, 1.0) && close(row.window_seconds, 1.0),
            "{row:?}"
        );
    }

    #[test]
    fn rates_divide_by_the_slots_covered_including_the_current_partial_one() {
        let g = Golden::new();
        let (c, s) = (deploy("a", "client", "c-1"), deploy("b", "server", "s-1"));
        // 2 requests a second for 400 s.
        for i in 0..800 {
            g.req_at(
                secs(i as f64 * 0.5),
                Reporter::Source,
                &c,
                &s,
                None,
                true,
                1.0,
            );
        }
        // At 400 s exactly (a slot boundary): 6 full slots, 60 s, 120 requests.
        let row = only(g.stat_after(secs(400.0), StatBy::Deploy, MIN));
        assert_eq!(row.requests, 120);
        assert!(
            close(row.window_seconds, 60.0) && close(row.rps, 2.0),
            "{row:?}"
        );
        // 4 s later, with 8 more requests: 6 full slots and 4 s of the current one.
        for i in 0..8 {
            g.req_at(
                secs(400.0 + i as f64 * 0.5),
                Reporter::Source,
                &c,
                &s,
                None,
                true,
                1.0,
            );
        }
        let row = only(g.stat_after(secs(404.0), StatBy::Deploy, MIN));
        assert_eq!(row.requests, 128);
        assert!(
            close(row.window_seconds, 64.0) && close(row.rps, 2.0),
            "{row:?}"
        );
        // Windows are rounded to slots: 14s is 10s, 15s is 20s, and at most 10 min.
        let row = only(g.stat_after(secs(404.0), StatBy::Deploy, secs(14.0)));
        assert!(
            close(row.window_seconds, 14.0) && close(row.rps, 2.0),
            "{row:?}"
        );
        let row = only(g.stat_after(secs(404.0), StatBy::Deploy, secs(15.0)));
        assert!(
            close(row.window_seconds, 24.0) && close(row.rps, 2.0),
            "{row:?}"
        );
        let row = only(g.stat_after(secs(404.0), StatBy::Deploy, secs(3600.0)));
        // The node is younger than 10 min: the window is its age.
        assert!(
            close(row.window_seconds, 404.0) && row.requests == 808,
            "{row:?}"
        );
        // Traffic stopped: a minute later the rate has gone to nothing, and the row with it.
        assert!(g.stat_after(secs(475.0), StatBy::Deploy, MIN).is_empty());
    }

    #[test]
    fn success_rate_and_latency_are_none_without_requests() {
        let g = Golden::new();
        let (c, s) = (deploy("a", "client", "c-1"), deploy("b", "db", "db-1"));
        let t = secs(1.0);
        g.tcp_at(t, Reporter::Source, &c, &s, true, Event::Opened);
        g.tcp_at(t, Reporter::Source, &c, &s, true, Event::Opened);
        g.tcp_at(t, Reporter::Source, &c, &s, true, Event::Opened);
        let closed = Event::Closed {
            sent: 1000,
            received: 5000,
        };
        g.tcp_at(secs(2.0), Reporter::Source, &c, &s, true, closed);
        let row = only(g.stat_after(secs(10.0), StatBy::Deploy, MIN));
        assert_eq!(row.success_rate, None);
        assert_eq!((row.p50_ms, row.p95_ms, row.p99_ms), (None, None, None));
        assert_eq!(row.rps, 0.0);
        assert_eq!((row.tcp_connections, row.tcp_opened), (2, 3));
        assert!(close(row.tcp_bytes_sent_per_sec, 100.0), "{row:?}");
        assert!(close(row.tcp_bytes_received_per_sec, 500.0), "{row:?}");
        assert!(row.meshed, "carried in mTLS");
        // Open connections keep the row after the window has passed.
        let row = only(g.stat_after(secs(300.0), StatBy::Deploy, MIN));
        assert_eq!(
            (row.tcp_connections, row.tcp_opened, row.requests),
            (2, 0, 0)
        );
        // Closing more than were opened (a key dropped meanwhile) never goes below zero.
        for _ in 0..3 {
            g.tcp_at(secs(301.0), Reporter::Source, &c, &s, true, closed);
        }
        let row = only(g.stat_after(secs(302.0), StatBy::Deploy, MIN));
        assert_eq!(row.tcp_connections, 0);
    }

    #[test]
    fn success_rate_counts_failures() {
        let g = Golden::new();
        let (c, s) = (deploy("a", "client", "c-1"), deploy("b", "server", "s-1"));
        for i in 0..200 {
            let ok = i % 40 != 0;
            g.req_at(secs(1.0), Reporter::Source, &c, &s, None, ok, 4.0);
        }
        let row = only(g.stat_after(secs(2.0), StatBy::Deploy, MIN));
        assert!(close(row.success_rate.unwrap(), 0.975), "{row:?}");
        // One latency: every percentile is it (kept within the smallest and largest seen).
        assert_eq!(
            (row.p50_ms, row.p95_ms, row.p99_ms),
            (Some(4.0), Some(4.0), Some(4.0))
        );
    }

    /// Exact quantile of sorted samples (nearest rank).
    fn exact(sorted: &[f64], q: f64) -> f64 {
        let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
        sorted[i]
    }

    fn worst_error(samples: &mut [f64]) -> f64 {
        let mut d = Dist::default();
        let mut h = Hist::default();
        for &ms in samples.iter() {
            h.add(ms);
        }
        for &(b, c) in &h.counts {
            d.add(b, u64::from(c));
        }
        d.add_range(h.min, h.max);
        samples.sort_by(f64::total_cmp);
        [0.5, 0.95, 0.99]
            .into_iter()
            .map(|q| {
                let want = exact(samples, q);
                let got = d.quantile(q).unwrap();
                (got - want).abs() / want
            })
            .fold(0.0, f64::max)
    }

    #[test]
    fn percentiles_are_accurate_on_known_distributions() {
        let mut rng = fastrand::Rng::with_seed(7);
        let n = 100_000;
        // Uniform 1..100 ms.
        let mut uniform: Vec<f64> = (0..n).map(|_| 1.0 + 99.0 * rng.f64()).collect();
        // Exponential, mean 20 ms.
        let mut exponential: Vec<f64> = (0..n).map(|_| -20.0 * (1.0 - rng.f64()).ln()).collect();
        // Log-normal around 5 ms (σ = 1): a long tail.
        let mut lognormal: Vec<f64> = (0..n)
            .map(|_| {
                // Box-Muller.
                let (u1, u2) = (1.0 - rng.f64(), rng.f64());
                let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                5.0 * z.exp()
            })
            .collect();
        // Bimodal: 90% fast around 2 ms, 10% slow around 200 ms.
        let mut bimodal: Vec<f64> = (0..n)
            .map(|_| {
                if rng.f64() < 0.9 {
                    1.5 + rng.f64()
                } else {
                    150.0 + 100.0 * rng.f64()
                }
            })
            .collect();
        for (name, samples, bound) in [
            ("uniform", &mut uniform, 0.005),
            ("exponential", &mut exponential, 0.02),
            ("lognormal", &mut lognormal, 0.02),
            ("bimodal", &mut bimodal, 0.005),
        ] {
            let err = worst_error(samples);
            eprintln!("{name}: worst relative error of p50, p95, p99: {err:.4}");
            assert!(err < bound, "{name}: worst relative error {err:.4}");
        }
    }

    #[test]
    fn buckets_cover_every_latency() {
        assert_eq!(bucket_of(f64::NAN), 0);
        assert_eq!(bucket_of(-1.0), 0);
        assert_eq!(bucket_of(0.0), 0);
        assert_eq!(bucket_of(0.001), 0);
        assert_eq!(bucket_of(0.0011), 1);
        assert_eq!(bucket_of(f64::INFINITY), 255);
        for ms in [0.01, 0.5, 1.0, 3.7, 250.0, 60_000.0, 3_600_000.0] {
            let (lo, hi) = bucket_bounds(bucket_of(ms) as usize);
            assert!(lo < ms && ms <= hi * (1.0 + 1e-12), "{ms}: ({lo}, {hi}]");
            assert!(hi / lo < 1.19 + 1e-9, "{ms}: ({lo}, {hi}]");
        }
        // NaN and negative durations are counted, as 0.
        let mut h = Hist::default();
        h.add(f64::NAN);
        h.add(-3.0);
        assert_eq!(h.counts, vec![(0, 2)]);
        assert_eq!((h.min, h.max), (0.0, 0.0));
    }

    #[test]
    fn a_call_between_pods_of_this_node_counts_once() {
        let g = Golden::new();
        let (c, s) = (deploy("a", "client", "c-1"), deploy("b", "server", "s-1"));
        for _ in 0..10 {
            // The same call, reported by both sides (the destination knows no Service).
            g.req_at(
                secs(1.0),
                Reporter::Source,
                &c,
                &s,
                Some("b/server"),
                true,
                2.0,
            );
            g.req_at(secs(1.0), Reporter::Destination, &c, &s, None, true, 1.0);
        }
        let row = only(g.stat_after(secs(10.0), StatBy::Deploy, MIN));
        assert_eq!(row.requests, 10);
        assert_eq!(row.p50_ms, Some(1.0), "the destination's report is used");
        assert!(row.meshed);
        let pod = only(g.stat_after(secs(10.0), StatBy::Pod, MIN));
        assert_eq!((pod.name.as_str(), pod.requests), ("s-1", 10));
        let ns = only(g.stat_after(secs(10.0), StatBy::Ns, MIN));
        assert_eq!((ns.name.as_str(), ns.requests), ("b", 10));
        // The Service row has only the source's reports: those count.
        let svc = only(g.stat_after(secs(10.0), StatBy::Svc, MIN));
        assert_eq!(
            (svc.namespace.as_str(), svc.name.as_str(), svc.kind.as_str()),
            ("b", "server", "Service")
        );
        assert_eq!(svc.requests, 10);
        // And the graph has one edge of 10 requests, from the caller's report.
        let edges = g.graph_at(MIN, g.epoch + secs(10.0));
        assert_eq!(edges.len(), 1, "{edges:?}");
        assert_eq!(edges[0].requests, 10);
        assert_eq!(edges[0].service.as_deref(), Some("b/server"));
    }

    #[test]
    fn destination_reports_are_preferred_per_destination_pod() {
        let g = Golden::new();
        let here = deploy("a", "client", "c-1");
        let remote_client = deploy("a", "client", "c-2");
        let local_pod = deploy("b", "server", "s-1");
        let remote_pod = deploy("b", "server", "s-2");
        let t = secs(1.0);
        // A local client calls both replicas; a remote client calls the local one.
        for _ in 0..3 {
            g.req_at(t, Reporter::Source, &here, &local_pod, None, true, 1.0);
            g.req_at(t, Reporter::Destination, &here, &local_pod, None, true, 1.0);
        }
        for _ in 0..5 {
            g.req_at(t, Reporter::Source, &here, &remote_pod, None, false, 1.0);
        }
        for _ in 0..7 {
            g.req_at(
                t,
                Reporter::Destination,
                &remote_client,
                &local_pod,
                None,
                true,
                1.0,
            );
        }
        let row = only(g.stat_after(secs(10.0), StatBy::Deploy, MIN));
        assert_eq!(
            (row.name.as_str(), row.kind.as_str()),
            ("server", "Deployment")
        );
        assert_eq!(row.requests, 3 + 5 + 7);
        assert_eq!(row.pods, 2);
        assert!(close(row.success_rate.unwrap(), 10.0 / 15.0), "{row:?}");
        let pods = g.stat_after(secs(10.0), StatBy::Pod, MIN);
        let by_pod: Vec<(&str, u64)> = pods.iter().map(|r| (r.name.as_str(), r.requests)).collect();
        assert_eq!(by_pod, [("s-1", 10), ("s-2", 5)]);
        // The workload rows of both namespaces, with their kinds.
        let all = g.stat_after(secs(10.0), StatBy::Workload, MIN);
        assert_eq!(all.len(), 1);
        assert!(g.stat_after(secs(10.0), StatBy::Sts, MIN).is_empty());
    }

    #[test]
    fn graph_edges_come_from_the_caller_s_report_when_it_is_here() {
        let g = Golden::new();
        let here = deploy("a", "client", "c-1");
        let there = deploy("a", "batch", "b-1");
        let local = deploy("b", "server", "s-1");
        let remote = deploy("b", "server", "s-2");
        let t = secs(1.0);
        for _ in 0..4 {
            // here → local: both reports.
            g.req_at(t, Reporter::Source, &here, &local, None, true, 1.0);
            g.req_at(t, Reporter::Destination, &here, &local, None, true, 1.0);
            // here → remote: the source's only.
            g.req_at(t, Reporter::Source, &here, &remote, None, false, 1.0);
            // there → local: the destination's only.
            g.req_at(t, Reporter::Destination, &there, &local, None, true, 1.0);
        }
        // An unknown caller from outside the mesh, over TCP.
        let outside = Side::default();
        g.tcp_at(
            t,
            Reporter::Destination,
            &outside,
            &local,
            false,
            Event::Opened,
        );
        let edges = g.graph_at(MIN, g.epoch + secs(10.0));
        let got: Vec<(&str, &str, u64, Option<f64>, EdgeProtocol)> = edges
            .iter()
            .map(|e| {
                (
                    e.source.as_str(),
                    e.destination.as_str(),
                    e.requests,
                    e.error_rate,
                    e.protocol,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("a/batch", "b/server", 4, Some(0.0), EdgeProtocol::Http),
                ("a/client", "b/server", 8, Some(0.5), EdgeProtocol::Http),
                ("unknown", "b/server", 0, None, EdgeProtocol::Tcp),
            ]
        );
        assert_eq!(edges[2].tcp_connections, 1);
        assert!(!edges[0].mtls);
    }

    #[test]
    fn graph_names_the_service_when_no_pod_was_reached() {
        let g = Golden::new();
        let here = deploy("a", "client", "c-1");
        let nowhere = Side {
            namespace: Some("b".into()),
            ..Side::default()
        };
        let svc: Text = "b/server".into();
        let call = Call {
            reporter: Reporter::Source,
            source: &here,
            destination: &nowhere,
            service: Some(&svc),
            mtls: true,
        };
        let failed = Event::Request {
            success: false,
            duration_ms: 0.5,
        };
        g.record(g.epoch + secs(1.0), call, failed);
        let edges = g.graph_at(MIN, g.epoch + secs(2.0));
        assert_eq!(edges.len(), 1);
        assert_eq!(
            (
                edges[0].destination.as_str(),
                edges[0].error_rate,
                edges[0].mtls
            ),
            ("b/server", Some(1.0), true)
        );
    }

    #[test]
    fn rows_are_filtered_by_namespace_and_kind() {
        let g = Golden::new();
        let c = deploy("a", "client", "c-1");
        let t = secs(1.0);
        let targets = [
            deploy("b", "web", "web-1"),
            side("b", "db", "StatefulSet", "db-0"),
            side("c", "agent", "DaemonSet", "agent-x"),
            side("c", "nightly", "CronJob", "nightly-1-abc"),
        ];
        for d in &targets {
            g.req_at(t, Reporter::Source, &c, d, None, true, 1.0);
        }
        let names = |by, ns: Option<&str>| -> Vec<String> {
            let q = StatQuery {
                by,
                namespace: ns.map(Into::into),
                window: MIN,
            };
            g.stat_at(&q, g.epoch + secs(2.0))
                .into_iter()
                .map(|r| format!("{}/{} {}", r.namespace, r.name, r.kind))
                .collect()
        };
        assert_eq!(names(StatBy::Deploy, None), ["b/web Deployment"]);
        assert_eq!(names(StatBy::Sts, None), ["b/db StatefulSet"]);
        assert_eq!(names(StatBy::Ds, Some("c")), ["c/agent DaemonSet"]);
        assert_eq!(names(StatBy::Cronjob, None), ["c/nightly CronJob"]);
        assert!(names(StatBy::Job, None).is_empty());
        assert_eq!(
            names(StatBy::Workload, Some("b")),
            ["b/db StatefulSet", "b/web Deployment"]
        );
        assert_eq!(names(StatBy::Ns, None), ["b/b Namespace", "c/c Namespace"]);
        assert!(names(StatBy::Svc, None).is_empty(), "no Service was called");
        assert!(
            names(StatBy::Deploy, Some("a")).is_empty(),
            "rows are the callees"
        );
    }

    #[test]
    fn idle_keys_are_dropped_after_the_longest_window() {
        let g = Golden::new();
        let (c, s) = (deploy("a", "client", "c-1"), deploy("b", "server", "s-1"));
        let db = deploy("b", "db", "db-1");
        g.req_at(secs(5.0), Reporter::Source, &c, &s, None, true, 1.0);
        g.tcp_at(secs(5.0), Reporter::Source, &c, &db, false, Event::Opened);
        assert_eq!(g.keys(), 2);
        // Still within the longest window at 10 min.
        assert_eq!(
            g.stat_after(secs(600.0), StatBy::Deploy, STAT_WINDOW_MAX)
                .len(),
            2
        );
        assert_eq!(g.keys(), 2);
        // Past it: the request key goes, the one holding an open connection stays.
        g.stat_after(secs(611.0), StatBy::Deploy, MIN);
        assert_eq!((g.keys(), g.expired()), (1, 1));
        let closed = Event::Closed {
            sent: 1,
            received: 2,
        };
        g.tcp_at(secs(700.0), Reporter::Source, &c, &db, false, closed);
        g.stat_after(secs(1311.0), StatBy::Deploy, MIN);
        assert_eq!((g.keys(), g.expired()), (0, 2));
        // The slots of a key in use go when no window reaches them.
        for t in [1320.0, 1900.0, 1990.0] {
            g.req_at(secs(t), Reporter::Source, &c, &s, None, true, 1.0);
        }
        let shard = g
            .shards
            .iter()
            .map(|s| s.lock())
            .find(|s| s.len > 0)
            .unwrap();
        let e = shard.map.values().flatten().next().unwrap();
        let slots: Vec<u64> = e.slots.iter().map(|s| s.n).collect();
        assert_eq!(slots, [190, 199]);
    }

    #[test]
    fn the_key_cap_drops_the_least_recently_used() {
        let g = Golden::with_max_keys(3);
        let c = deploy("a", "client", "c-1");
        let pods: Vec<Side> = (0..4)
            .map(|i| deploy("b", "s", &format!("s-{i}")))
            .collect();
        for (i, p) in pods.iter().take(3).enumerate() {
            g.req_at(secs(i as f64), Reporter::Source, &c, p, None, true, 1.0);
        }
        // s-0 used again: s-1 is now the least recent.
        g.req_at(secs(3.0), Reporter::Source, &c, &pods[0], None, true, 1.0);
        g.req_at(secs(4.0), Reporter::Source, &c, &pods[3], None, true, 1.0);
        assert_eq!((g.keys(), g.evicted()), (3, 1));
        let names: Vec<String> = g
            .stat_after(secs(5.0), StatBy::Pod, MIN)
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(names, ["s-0", "s-2", "s-3"]);
        // The default cap is shared out between the shards.
        let g = Golden::new();
        assert_eq!(g.shards.len() * g.max_keys_per_shard, DEFAULT_MAX_KEYS);
    }

    #[test]
    fn late_events_land_in_their_own_slot() {
        let g = Golden::new();
        let (c, s) = (deploy("a", "client", "c-1"), deploy("b", "server", "s-1"));
        g.req_at(secs(35.0), Reporter::Source, &c, &s, None, true, 1.0);
        g.req_at(secs(5.0), Reporter::Source, &c, &s, None, true, 1.0);
        g.req_at(secs(25.0), Reporter::Source, &c, &s, None, true, 1.0);
        let shard = g
            .shards
            .iter()
            .map(|s| s.lock())
            .find(|s| s.len > 0)
            .unwrap();
        let e = shard.map.values().flatten().next().unwrap();
        let slots: Vec<u64> = e.slots.iter().map(|s| s.n).collect();
        assert_eq!(slots, [0, 2, 3]);
        drop(shard);
        // A 10 s window at 36 s: slots 2 and 3.
        let row = only(g.stat_after(secs(36.0), StatBy::Deploy, secs(10.0)));
        assert_eq!(row.requests, 2);
    }

    #[test]
    fn many_threads_count_every_event() {
        let g = std::sync::Arc::new(Golden::new());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let g = g.clone();
                std::thread::spawn(move || {
                    let c = deploy("a", "client", &format!("c-{t}"));
                    for i in 0..10_000 {
                        let s = deploy("b", "server", &format!("s-{}", i % 8));
                        g.request(Reporter::Source, &c, &s, None, false, i % 10 != 0, 1.0);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let row = only(g.stat(&StatQuery::default()));
        assert_eq!(row.requests, 40_000);
        assert!(close(row.success_rate.unwrap(), 0.9));
        assert_eq!(g.keys(), 32);
    }

    /// `cargo test -p weft-proxy --release --lib telemetry::golden -- --ignored --nocapture`
    #[test]
    #[ignore = "a measurement"]
    fn measure_recording_cost() {
        for threads in [1, 2, 4] {
            let g = std::sync::Arc::new(Golden::new());
            let per_thread = 1_000_000;
            let start = Instant::now();
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let g = g.clone();
                    std::thread::spawn(move || {
                        let sources: Vec<Side> = (0..10)
                            .map(|i| deploy("a", "client", &format!("c-{t}-{i}")))
                            .collect();
                        let dests: Vec<Side> = (0..10)
                            .map(|i| deploy("b", "server", &format!("s-{i}")))
                            .collect();
                        let svc: Text = "b/server".into();
                        for i in 0..per_thread {
                            g.request(
                                Reporter::Source,
                                &sources[i % 10],
                                &dests[(i / 10) % 10],
                                Some(&svc),
                                true,
                                true,
                                (i % 100) as f64 * 0.37,
                            );
                        }
                    })
                })
                .collect();
            for h in handles {
                h.join().unwrap();
            }
            let took = start.elapsed();
            let q = Instant::now();
            let rows = g.stat(&StatQuery {
                by: StatBy::Pod,
                ..StatQuery::default()
            });
            println!(
                "{threads} threads: {:.0} ns per request per thread, {} keys, stat in {:?} ({} rows)",
                took.as_nanos() as f64 / per_thread as f64,
                g.keys(),
                q.elapsed(),
                rows.len()
            );
        }
    }
}
