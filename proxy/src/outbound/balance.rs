//! Endpoint choice: how an HTTP request's endpoint is picked among its cluster's (pure).

use std::sync::atomic::{AtomicUsize, Ordering};

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
    /// default `LEAST_REQUEST` (`PASSTHROUGH` is not applied yet). With `consistentHash`,
    /// what a request without a key gets: a random endpoint, as Envoy.
    pub fn of(settings: Option<&LoadBalancerSettings>) -> Lb {
        if settings.is_some_and(|s| s.consistent_hash.is_some()) {
            return Lb::Random;
        }
        match settings.and_then(|s| s.simple.as_ref()) {
            Some(SimpleLb::RoundRobin) => Lb::RoundRobin,
            Some(SimpleLb::Random) => Lb::Random,
            _ => Lb::LeastRequest,
        }
    }

    /// The endpoint among `n` for a request (`None` when there is none): `round` the
    /// round-robin position, `active(i)` the requests in flight on endpoint `i`, `rolls` two
    /// uniform draws.
    pub fn choose(
        self,
        n: usize,
        round: &AtomicUsize,
        active: impl Fn(usize) -> usize,
        rolls: (u32, u32),
    ) -> Option<usize> {
        match (self, n) {
            (_, 0) => None,
            (Lb::RoundRobin, _) => Some(round.fetch_add(1, Ordering::Relaxed) % n),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_request_takes_the_less_busy_of_two_and_the_others_spread() {
        let turn = AtomicUsize::new(0);
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
}
