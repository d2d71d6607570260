//! Bounded resources: how many connections each listener holds, so that one pod (or one
//! scraper) cannot take what every other needs.
//!
//! - [`Limit`]: a count of open connections with a ceiling, node-wide and per key (the calling
//!   pod's cgroup, the client's address). A connection is admitted by taking a [`Slot`], which
//!   gives its place back when dropped, whatever path the connection ends by.
//! - [`Refusals`]: what was refused, by listener and reason (`weft_connections_refused_total`,
//!   `weft status`).
//! - [`raise_nofile`]: the descriptor limit every count is derived from.
//!
//! May import: nothing else of weft.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

/// Descriptors one relayed connection holds: its two sockets and two splice pipes (two ends
/// each).
pub const FDS_PER_RELAY: u64 = 6;

/// The listeners whose connections are counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Listener {
    /// The capture listener (`:15001`).
    Capture,
    /// Prometheus (`:15020`).
    Metrics,
    /// The admin API (TCP and Unix socket).
    Admin,
}

impl Listener {
    pub const ALL: [Listener; 3] = [Listener::Capture, Listener::Metrics, Listener::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Listener::Capture => "capture",
            Listener::Metrics => "metrics",
            Listener::Admin => "admin",
        }
    }
}

/// Which limit refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// The listener holds as many connections as it may (`--max-connections`,
    /// `--metrics-max-connections`, `--admin-max-connections`).
    Total,
    /// The calling pod holds as many as it may (`--max-connections-per-pod`).
    PerPod,
    /// The client's address holds as many as it may (`--metrics-max-connections-per-ip`).
    PerSource,
}

impl Reason {
    pub const ALL: [Reason; 3] = [Reason::Total, Reason::PerPod, Reason::PerSource];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Total => "total",
            Reason::PerPod => "per_pod",
            Reason::PerSource => "per_source",
        }
    }
}

/// Connections refused, by listener and reason.
#[derive(Debug, Default)]
pub struct Refusals {
    counts: [[AtomicU64; Reason::ALL.len()]; Listener::ALL.len()],
}

impl Refusals {
    pub fn count(&self, listener: Listener, reason: Reason) {
        self.counts[listener as usize][reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Every (listener, reason) pair that can happen, with its count (zeros included, so a
    /// series exists before the first refusal).
    pub fn totals(&self) -> Vec<(Listener, Reason, u64)> {
        let mut out = Vec::new();
        for listener in Listener::ALL {
            for reason in Reason::ALL {
                let possible = match (listener, reason) {
                    (Listener::Capture, Reason::PerSource) => false,
                    (Listener::Capture, _) => true,
                    (Listener::Metrics, Reason::PerPod) => false,
                    (Listener::Metrics, _) => true,
                    (Listener::Admin, r) => r == Reason::Total,
                };
                if possible {
                    let n = self.counts[listener as usize][reason as usize].load(Ordering::Relaxed);
                    out.push((listener, reason, n));
                }
            }
        }
        out
    }
}

/// Open connections with a ceiling, in total and per key.
pub struct Limit<K> {
    max: usize,
    max_per_key: usize,
    open: AtomicUsize,
    /// Keys with at least one connection open (entries at zero are removed).
    per_key: Mutex<HashMap<K, usize>>,
}

impl<K> fmt::Debug for Limit<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limit")
            .field("max", &self.max)
            .field("max_per_key", &self.max_per_key)
            .field("open", &self.open.load(Ordering::Relaxed))
            .finish()
    }
}

/// A place held in a [`Limit`]'s total: given back on drop.
#[derive(Debug)]
pub struct Slot<K: Hash + Eq> {
    limit: Arc<Limit<K>>,
    key: Option<K>,
}

impl<K: Hash + Eq + Clone> Limit<K> {
    /// At most `max` connections, and `max_per_key` for each key.
    pub fn new(max: usize, max_per_key: usize) -> Arc<Limit<K>> {
        Arc::new(Limit {
            max,
            max_per_key,
            open: AtomicUsize::new(0),
            per_key: Mutex::default(),
        })
    }

    /// No limit at all (tools and tests).
    pub fn unlimited() -> Arc<Limit<K>> {
        Limit::new(usize::MAX, usize::MAX)
    }

    pub fn max(&self) -> usize {
        self.max
    }

    pub fn max_per_key(&self) -> usize {
        self.max_per_key
    }

    /// Connections holding a slot now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Connections holding a slot under `key` now.
    pub fn open_for(&self, key: &K) -> usize {
        self.per_key.lock().get(key).copied().unwrap_or(0)
    }

    /// A place in the total, if one is free.
    pub fn admit(self: &Arc<Self>) -> Option<Slot<K>> {
        // Never above `max`, even for a moment: a slot is taken only where one is free.
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()?;
        Some(Slot {
            limit: self.clone(),
            key: None,
        })
    }

    /// A place in the total and under `key`, if both are free; otherwise which is full:
    /// [`Reason::Total`], or `over_key`.
    pub fn admit_key(self: &Arc<Self>, key: K, over_key: Reason) -> Result<Slot<K>, Reason> {
        let mut slot = self.admit().ok_or(Reason::Total)?;
        if !slot.join(key) {
            return Err(over_key);
        }
        Ok(slot)
    }
}

impl<K: Hash + Eq + Clone> Slot<K> {
    /// Counts the connection under `key` too, if that key has room (`false` leaves it counted
    /// in the total only). A slot joins one key at most: joining again changes nothing.
    pub fn join(&mut self, key: K) -> bool {
        if self.key.is_some() {
            return true;
        }
        let mut per_key = self.limit.per_key.lock();
        let n = per_key.entry(key.clone()).or_insert(0);
        if *n >= self.limit.max_per_key {
            if *n == 0 {
                per_key.remove(&key);
            }
            return false;
        }
        *n += 1;
        drop(per_key);
        self.key = Some(key);
        true
    }
}

impl<K: Hash + Eq> Drop for Slot<K> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            let mut per_key = self.limit.per_key.lock();
            if let Some(n) = per_key.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    per_key.remove(&key);
                }
            }
        }
        self.limit.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The capture listener's limits and every listener's refusals: what the data path enforces
/// and `/status` and `/metrics` read.
#[derive(Debug)]
pub struct Admission {
    /// Connections on the capture listener, node-wide and per calling pod (by cgroup id).
    pub capture: Arc<Limit<u64>>,
    pub refused: Refusals,
}

impl Admission {
    pub fn new(max_connections: usize, max_connections_per_pod: usize) -> Admission {
        Admission {
            capture: Limit::new(max_connections, max_connections_per_pod),
            refused: Refusals::default(),
        }
    }
}

impl Default for Admission {
    /// No limit.
    fn default() -> Self {
        Admission::new(usize::MAX, usize::MAX)
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (a relayed connection holds two
/// descriptors while idle and up to six while bytes move both ways; the usual soft limit of
/// 1024 would cap the proxy at a few hundred). Returns the soft limit before and after.
pub fn raise_nofile() -> std::io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) writes the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let before = lim.rlim_cur;
    if lim.rlim_cur >= lim.rlim_max {
        return Ok((before, before));
    }
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: setrlimit(2) reads the struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((before, lim.rlim_cur))
}

/// The soft `RLIMIT_NOFILE` in force.
pub fn nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) writes the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    lim.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_is_taken_only_where_one_is_free_and_given_back_on_drop() {
        let limit = Limit::<u64>::new(3, 2);
        let a1 = limit.admit_key(1, Reason::PerPod).unwrap();
        let a2 = limit.admit_key(1, Reason::PerPod).unwrap();
        assert_eq!(
            limit.admit_key(1, Reason::PerPod).unwrap_err(),
            Reason::PerPod,
            "pod 1 is at its limit"
        );
        assert_eq!(limit.open(), 2, "the refused one gave its place back");
        let b = limit.admit_key(2, Reason::PerPod).unwrap();
        assert_eq!(
            limit.admit_key(3, Reason::PerPod).unwrap_err(),
            Reason::Total,
            "the node is full, whoever asks"
        );
        drop(a1);
        assert_eq!((limit.open(), limit.open_for(&1)), (2, 1));
        let again = limit.admit_key(1, Reason::PerPod).unwrap();
        drop((a2, b, again));
        assert_eq!((limit.open(), limit.open_for(&1)), (0, 0));
        assert!(limit.per_key.lock().is_empty(), "no key kept at zero");
    }

    #[test]
    fn a_slot_joins_its_key_later_and_once() {
        let limit = Limit::<&str>::new(10, 1);
        let mut s = limit.admit().unwrap();
        assert!(s.join("pod"));
        assert!(s.join("pod"), "joining again counts nothing");
        assert_eq!(limit.open_for(&"pod"), 1);
        let mut t = limit.admit().unwrap();
        assert!(!t.join("pod"));
        assert_eq!((limit.open(), limit.open_for(&"pod")), (2, 1));
        drop(t);
        drop(s);
        assert_eq!(limit.open(), 0);
    }

    #[test]
    fn slots_are_counted_right_from_many_threads() {
        let limit = Limit::<u8>::new(64, 16);
        let admitted = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for t in 0..8u8 {
                let (limit, admitted) = (&limit, &admitted);
                scope.spawn(move || {
                    let mut held = Vec::new();
                    for _ in 0..1000 {
                        if let Ok(s) = limit.admit_key(t % 4, Reason::PerPod) {
                            admitted.fetch_add(1, Ordering::Relaxed);
                            held.push(s);
                        }
                        assert!(limit.open() <= 64);
                        if held.len() > 5 {
                            held.clear();
                        }
                    }
                });
            }
        });
        assert!(admitted.load(Ordering::Relaxed) > 0);
        assert_eq!(limit.open(), 0);
        assert!(limit.per_key.lock().is_empty());
    }

    #[test]
    fn refusals_list_every_possible_pair() {
        let r = Refusals::default();
        r.count(Listener::Capture, Reason::PerPod);
        r.count(Listener::Capture, Reason::PerPod);
        r.count(Listener::Metrics, Reason::PerSource);
        let totals = r.totals();
        assert!(totals.contains(&(Listener::Capture, Reason::PerPod, 2)));
        assert!(totals.contains(&(Listener::Capture, Reason::Total, 0)));
        assert!(totals.contains(&(Listener::Metrics, Reason::PerSource, 1)));
        assert!(totals.contains(&(Listener::Admin, Reason::Total, 0)));
        assert!(!totals
            .iter()
            .any(|(l, r, _)| *l == Listener::Admin && *r != Reason::Total));
    }

    #[test]
    fn the_descriptor_limit_is_raised_to_the_hard_limit() {
        let (before, after) = raise_nofile().unwrap();
        assert!(after >= before);
        assert_eq!(nofile(), after);
    }
}
