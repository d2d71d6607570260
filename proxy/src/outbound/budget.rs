//! Retry budgets (beyond Istio's defaults, as Linkerd and Envoy keep them): retries to one
//! destination may add at most a share of its requests, plus a floor per second, over the last
//! ten seconds, so that an outage does not become a retry storm.
//!
//! Counts are kept per second in a ring of slots, with atomics only (a request touches one
//! counter); racing updates at a second's turn may lose a count, which a budget tolerates.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Retries may add this share of the requests of the window.
pub const RATIO: f64 = 0.2;
/// And at least this many per second of it.
pub const MIN_PER_SECOND: u64 = 10;
/// The window, in seconds (one slot each).
const WINDOW: usize = 10;

/// One destination's requests and retries over the last [`WINDOW`] seconds.
#[derive(Debug)]
pub struct RetryBudget {
    start: Instant,
    slots: [Slot; WINDOW],
    /// Retries refused by the budget since start.
    overflow: AtomicU64,
}

#[derive(Debug, Default)]
struct Slot {
    /// The second (since `start`) the counts are of.
    second: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget {
            start: Instant::now(),
            slots: Default::default(),
            overflow: AtomicU64::new(0),
        }
    }
}

impl RetryBudget {
    fn now(&self) -> u64 {
        self.start.elapsed().as_secs()
    }

    fn slot(&self, second: u64) -> &Slot {
        let slot = &self.slots[(second % WINDOW as u64) as usize];
        let was = slot.second.load(Ordering::Relaxed);
        if was != second
            && slot
                .second
                .compare_exchange(was, second, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            slot.requests.store(0, Ordering::Relaxed);
            slot.retries.store(0, Ordering::Relaxed);
        }
        slot
    }

    /// A request to the destination.
    pub fn request(&self) {
        self.request_at(self.now());
    }

    /// Whether a retry may be sent now; counts it when it may, and the refusal when not.
    pub fn retry(&self) -> bool {
        self.retry_at(self.now())
    }

    /// Retries refused since start.
    pub fn overflow(&self) -> u64 {
        self.overflow.load(Ordering::Relaxed)
    }

    fn request_at(&self, second: u64) {
        self.slot(second).requests.fetch_add(1, Ordering::Relaxed);
    }

    fn retry_at(&self, second: u64) -> bool {
        let (mut requests, mut retries) = (0, 0);
        for s in &self.slots {
            let at = s.second.load(Ordering::Relaxed);
            if at + (WINDOW as u64) > second && at <= second {
                requests += s.requests.load(Ordering::Relaxed);
                retries += s.retries.load(Ordering::Relaxed);
            }
        }
        let allowed = (requests as f64 * RATIO) as u64 + MIN_PER_SECOND * WINDOW as u64;
        if retries < allowed {
            self.slot(second).retries.fetch_add(1, Ordering::Relaxed);
            true
        } else {
            self.overflow.fetch_add(1, Ordering::Relaxed);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_a_share_of_requests_above_a_floor() {
        let b = RetryBudget::default();
        // The floor: 10 a second over the window, with no requests at all.
        let floor = MIN_PER_SECOND * WINDOW as u64;
        assert_eq!(
            (0..floor + 5).filter(|_| b.retry_at(0)).count() as u64,
            floor
        );
        assert_eq!(b.overflow(), 5);
        // 1 000 requests make room for 200 more.
        for _ in 0..1000 {
            b.request_at(1);
        }
        assert_eq!((0..300).filter(|_| b.retry_at(1)).count(), 200);
        // Ten seconds later the window has moved on: the floor again.
        assert_eq!((0..300).filter(|_| b.retry_at(12)).count() as u64, floor);
    }

    #[test]
    fn old_seconds_leave_the_window() {
        let b = RetryBudget::default();
        for s in 0..5 {
            for _ in 0..100 {
                b.request_at(s);
            }
        }
        // At second 9 all 500 requests count; at 13 only those of seconds 4.. (100).
        let floor = MIN_PER_SECOND * WINDOW as u64;
        assert_eq!(
            (0..1000).filter(|_| b.retry_at(9)).count() as u64,
            floor + 100
        );
        let b2 = RetryBudget::default();
        for s in 0..5 {
            for _ in 0..100 {
                b2.request_at(s);
            }
        }
        assert_eq!(
            (0..1000).filter(|_| b2.retry_at(13)).count() as u64,
            floor + 20
        );
    }
}
