//! Endpoint choice: round robin per Service port.

use std::collections::HashMap;

use parking_lot::Mutex;

/// A round-robin position per key (`namespace/service:port`).
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: Mutex<HashMap<String, usize>>,
}

impl RoundRobin {
    /// The index of the endpoint to use among `n` for `key`, `None` when there is none.
    pub fn pick(&self, key: &str, n: usize) -> Option<usize> {
        if n == 0 {
            return None;
        }
        let mut next = self.next.lock();
        let slot = match next.get_mut(key) {
            Some(slot) => slot,
            None => next.entry(key.to_string()).or_insert(0),
        };
        let i = *slot % n;
        *slot = slot.wrapping_add(1);
        Some(i)
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
}
