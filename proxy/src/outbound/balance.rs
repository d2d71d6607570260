//! Endpoint choice: how an HTTP request's endpoint is picked among its cluster's (pure).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

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
    /// default `LEAST_REQUEST` (`PASSTHROUGH` chooses no endpoint: the caller sends to the
    /// address called). With `consistentHash`, what a request without a key gets: a random
    /// endpoint, as Envoy.
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

/// Slow start (DestinationRule `warmupDurationSecs`, or `warmup`): an endpoint that joins a
/// destination gets a share of requests that grows over the window, as Envoy's slow start
/// weighs it. Istio applies it to `ROUND_ROBIN` and `LEAST_REQUEST` only.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Warmup {
    pub window: Duration,
    /// The least share of its weight a new endpoint gets (`minimumPercent`, default 10).
    pub min_percent: f64,
    /// How the share grows: `(age / window)^(1 / aggression)` (default 1: linearly).
    pub aggression: f64,
}

impl Warmup {
    /// The slow start `settings` ask for, if any applies to their policy.
    pub fn of(settings: Option<&LoadBalancerSettings>) -> Option<Warmup> {
        let s = settings?;
        if !matches!(Lb::of(Some(s)), Lb::RoundRobin | Lb::LeastRequest)
            || s.consistent_hash.is_some()
        {
            return None;
        }
        let w = match (&s.warmup, &s.warmup_duration_secs) {
            (Some(w), _) => Warmup {
                window: w.duration.as_ref()?.0,
                min_percent: w.minimum_percent.unwrap_or(10.0).clamp(0.0, 100.0),
                aggression: w.aggression.filter(|a| *a > 0.0).unwrap_or(1.0),
            },
            (None, Some(d)) => Warmup {
                window: d.0,
                min_percent: 10.0,
                aggression: 1.0,
            },
            (None, None) => return None,
        };
        (!w.window.is_zero()).then_some(w)
    }

    /// The share of its weight an endpoint that joined `age` ago gets (1 past the window).
    pub fn factor(&self, age: Duration) -> f64 {
        if age >= self.window {
            return 1.0;
        }
        let t = age.as_secs_f64().max(0.001) / self.window.as_secs_f64();
        t.powf(1.0 / self.aggression).max(self.min_percent / 100.0)
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
    fn a_new_endpoints_share_grows_over_the_warmup_window() {
        let of = |y: &str| Warmup::of(Some(&serde_yaml_ng::from_str(y).unwrap()));
        let w = of("{warmupDurationSecs: 10s}").unwrap();
        assert_eq!((w.min_percent, w.aggression), (10.0, 1.0));
        assert_eq!(w.factor(Duration::ZERO), 0.1, "at least minimumPercent");
        assert!((w.factor(Duration::from_secs(5)) - 0.5).abs() < 1e-9);
        assert_eq!(w.factor(Duration::from_secs(10)), 1.0);
        let w = of("{warmup: {duration: 10s, minimumPercent: 0, aggression: 2}}").unwrap();
        assert!(
            (w.factor(Duration::from_millis(2500)) - 0.5).abs() < 1e-9,
            "sqrt(1/4)"
        );
        assert_eq!(of("{simple: RANDOM, warmupDurationSecs: 10s}"), None);
        assert_eq!(of("{simple: ROUND_ROBIN}"), None);
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
