//! Endpoint choice: round robin per Service port, with each destination's retry budget.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::budget::RetryBudget;
use crate::registry::kinds::networking::{LoadBalancerSettings, SimpleLb};

/// How an HTTP request's endpoint is chosen (DestinationRule `loadBalancer.simple`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Lb {
    RoundRobin,
    /// Istio's default: of two endpoints drawn at random, the one with fewer requests in
    /// flight (Envoy's power of two choices).
    #[default]
    LeastRequest,
    Random,
}

impl Lb {
    /// The policy a DestinationRule's settings ask for: `ROUND_ROBIN`, `RANDOM`,
    /// `LEAST_REQUEST` (and its old name `LEAST_CONN`); anything else, or nothing, Istio's
    /// default `LEAST_REQUEST` (`PASSTHROUGH` and `consistentHash` are not applied yet).
    pub fn of(settings: Option<&LoadBalancerSettings>) -> Lb {
        match settings.and_then(|s| s.simple.as_ref()) {
            Some(SimpleLb::RoundRobin) => Lb::RoundRobin,
            Some(SimpleLb::Random) => Lb::Random,
            _ => Lb::LeastRequest,
        }
    }

    /// The endpoint among `n` for a request (`None` when there is none): `turn` for round
    /// robin, `active(i)` the requests in flight on endpoint `i`, `rolls` two uniform draws.
    pub fn choose(
        self,
        n: usize,
        turn: &Turn,
        active: impl Fn(usize) -> usize,
        rolls: (u32, u32),
    ) -> Option<usize> {
        match (self, n) {
            (_, 0) => None,
            (Lb::RoundRobin, _) => turn.pick(n),
            (_, 1) => Some(0),
            (Lb::Random, _) => Some(rolls.0 as usize % n),
            (Lb::LeastRequest, _) => {
                let a = rolls.0 as usize % n;
                let mut b = rolls.1 as usize % (n - 1);
                if b >= a {
                    b += 1;
                }
                Some(if active(b) < active(a) { b } else { a })
            }
        }
    }
}

/// A round-robin position per key (`namespace/service:port`), and the requests in flight on
/// each endpoint (shared by every destination it serves).
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: Mutex<HashMap<String, Arc<Turn>>>,
    in_flight: Mutex<HashMap<SocketAddr, Arc<AtomicUsize>>>,
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

    /// The count of requests in flight on `endpoint`, shared by everyone sending there.
    pub fn in_flight(&self, endpoint: SocketAddr) -> Arc<AtomicUsize> {
        let mut all = self.in_flight.lock();
        if all.len() >= 4096 {
            // Endpoints nobody holds any more.
            all.retain(|_, n| Arc::strong_count(n) > 1);
        }
        all.entry(endpoint).or_default().clone()
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
    fn least_request_takes_the_less_busy_of_two_and_the_others_spread() {
        let turn = Turn::default();
        let busy = [5usize, 0, 0];
        let lr = Lb::LeastRequest;
        // Two distinct draws; the less busy wins, the first on a tie.
        assert_eq!(lr.choose(3, &turn, |i| busy[i], (0, 0)), Some(1));
        assert_eq!(lr.choose(3, &turn, |i| busy[i], (2, 0)), Some(2));
        assert_eq!(lr.choose(3, &turn, |i| busy[i], (1, 1)), Some(1));
        let picks = (0..3000u32)
            .filter_map(|k| {
                lr.choose(
                    3,
                    &turn,
                    |i| busy[i],
                    (k.wrapping_mul(2_654_435_761), k / 3),
                )
            })
            .filter(|i| *i == 0)
            .count();
        assert_eq!(
            picks, 0,
            "the busy one only when drawn twice, which never happens"
        );
        assert_eq!(lr.choose(1, &turn, |_| 9, (7, 7)), Some(0));
        assert_eq!(lr.choose(0, &turn, |_| 0, (0, 0)), None);
        let mut seen = [0; 3];
        for k in 0..3000u32 {
            seen[Lb::Random.choose(3, &turn, |_| 0, (k, 0)).unwrap()] += 1;
        }
        assert_eq!(seen, [1000; 3]);
        let rr: Vec<_> = (0..4)
            .map(|_| Lb::RoundRobin.choose(3, &turn, |_| 0, (0, 0)).unwrap())
            .collect();
        assert_eq!(rr, [0, 1, 2, 0]);
    }

    #[test]
    fn the_policy_follows_the_destination_rule_with_istios_default() {
        let with = |simple| LoadBalancerSettings {
            simple: Some(simple),
            ..LoadBalancerSettings::default()
        };
        assert_eq!(Lb::of(None), Lb::LeastRequest);
        assert_eq!(Lb::of(Some(&with(SimpleLb::RoundRobin))), Lb::RoundRobin);
        assert_eq!(Lb::of(Some(&with(SimpleLb::Random))), Lb::Random);
        assert_eq!(Lb::of(Some(&with(SimpleLb::LeastConn))), Lb::LeastRequest);
        assert_eq!(Lb::of(Some(&with(SimpleLb::Unspecified))), Lb::LeastRequest);
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
