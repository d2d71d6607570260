//! Endpoint choice: round robin per Service port, with each destination's retry budget.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::budget::RetryBudget;

/// A round-robin position per key (`namespace/service:port`).
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: Mutex<HashMap<String, Arc<Turn>>>,
}

/// One key's position, and its retry budget: held by whoever picks for that key often, so a
/// pick needs no lookup.
#[derive(Debug, Default)]
pub struct Turn {
    next: AtomicUsize,
    /// How many retries the destination may take now.
    pub budget: RetryBudget,
}

impl Turn {
    /// The index of the endpoint to use among `n`, `None` when there is none.
    pub fn pick(&self, n: usize) -> Option<usize> {
        if n == 0 {
            return None;
        }
        Some(self.next.fetch_add(1, Ordering::Relaxed) % n)
    }
}

impl RoundRobin {
    /// The index of the endpoint to use among `n` for `key`, `None` when there is none.
    pub fn pick(&self, key: &str, n: usize) -> Option<usize> {
        if n == 0 {
            return None;
        }
        self.turn(key).pick(n)
    }

    /// The position of `key`, shared by every picker of that key.
    pub fn turn(&self, key: &str) -> Arc<Turn> {
        let mut next = self.next.lock();
        match next.get(key) {
            Some(turn) => turn.clone(),
            None => next.entry(key.to_string()).or_default().clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turns_per_key() {
        let rr = RoundRobin::default();
        let picks: Vec<_> = (0..5).map(|_| rr.pick("a", 3).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1]);
        assert_eq!(rr.pick("b", 2), Some(0));
        assert_eq!(rr.pick("a", 3), Some(2));
        assert_eq!(rr.pick("c", 0), None);
    }

    #[test]
    fn a_held_turn_is_the_keys_own() {
        let rr = RoundRobin::default();
        let held = rr.turn("a");
        assert_eq!(held.pick(3), Some(0));
        assert_eq!(rr.pick("a", 3), Some(1));
        assert_eq!(held.pick(3), Some(2));
        assert_eq!(rr.turn("b").pick(0), None);
    }
}
