//! Outlier detection (DestinationRule `outlierDetection`), as Istio configures Envoy's: an
//! endpoint that fails too many times in a row is ejected from its destination's balancing for
//! `baseEjectionTime` × the times it has been ejected, and comes back at the first `interval`
//! tick after that. Decisions only (pure); the endpoints' state lives with their cluster.

use std::time::{Duration, Instant};

use crate::registry::kinds::networking::OutlierDetection;

/// A destination's outlier detection, with Istio's and Envoy's defaults for what the rule
/// leaves out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Detection {
    /// Ejects after this many 5xx answers in a row (`consecutive5xxErrors`, default 5;
    /// `None`: not enforced).
    pub consecutive_5xx: Option<u32>,
    /// Ejects after this many 502, 503 or 504 in a row (`consecutiveGatewayErrors`, or the
    /// deprecated `consecutiveErrors`; default not enforced).
    pub consecutive_gateway: Option<u32>,
    /// With `splitExternalLocalOriginErrors`: failures to connect, resets and timeouts are
    /// counted apart from answers, ejecting after this many in a row (default 5); without it
    /// they count as 503 answers.
    pub consecutive_local_origin: Option<u32>,
    pub split_local_origin: bool,
    pub interval: Duration,
    pub base_ejection_time: Duration,
    /// At most this share of the endpoints ejected at once (at least one always may be).
    pub max_ejection_percent: u32,
    /// Below this share of healthy endpoints, balancing ignores ejections (Istio's default 0:
    /// never; every endpoint ejected means no healthy upstream).
    pub min_health_percent: u32,
}

/// Envoy's cap on an ejection's length.
pub const MAX_EJECTION_TIME: Duration = Duration::from_secs(300);

impl Detection {
    /// The detection a DestinationRule's `outlierDetection` asks for; `None` without one.
    pub fn of(rule: Option<&OutlierDetection>) -> Option<Detection> {
        let o = rule?;
        let mut d = Detection {
            consecutive_5xx: Some(5),
            consecutive_gateway: None,
            consecutive_local_origin: None,
            split_local_origin: o.split_external_local_origin_errors == Some(true),
            interval: o.interval.as_ref().map_or(Duration::from_secs(10), |d| d.0),
            base_ejection_time: o
                .base_ejection_time
                .as_ref()
                .map_or(Duration::from_secs(30), |d| d.0),
            max_ejection_percent: o
                .max_ejection_percent
                .filter(|p| *p > 0)
                .map_or(10, |p| p.min(100) as u32),
            min_health_percent: o.min_health_percent.map_or(0, |p| p.clamp(0, 100) as u32),
        };
        if o.consecutive_errors > 0 {
            // Istio: the deprecated field counts gateway errors only.
            d.consecutive_gateway = Some(o.consecutive_errors as u32);
            d.consecutive_5xx = None;
        }
        if let Some(n) = o.consecutive_5xx_errors {
            d.consecutive_5xx = (n > 0).then_some(n);
        }
        if let Some(n) = o.consecutive_gateway_errors {
            d.consecutive_gateway = (n > 0).then_some(n);
        }
        if d.split_local_origin {
            d.consecutive_local_origin = Some(
                o.consecutive_local_origin_failures
                    .filter(|n| *n > 0)
                    .unwrap_or(5),
            );
        }
        if d.interval.is_zero() {
            d.interval = Duration::from_secs(10);
        }
        Some(d)
    }
}

/// What an attempt to an endpoint came to, as outlier detection sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// An answer with this status.
    Answer(u16),
    /// No answer: the connection failed, was reset, or timed out.
    LocalFailure,
}

/// Why an endpoint was ejected (Envoy's `ejections_enforced_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Consecutive5xx,
    ConsecutiveGateway,
    ConsecutiveLocalOrigin,
}

/// One endpoint's record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    consecutive_local: u32,
    /// Since when it is ejected.
    pub ejected_at: Option<Instant>,
    /// Times it has been ejected (the next ejection lasts this many base times more); one
    /// less for each interval it stays in.
    pub ejections: u32,
    /// Since when it is back from its last ejection.
    returned_at: Option<Instant>,
    /// When its ejection is over (set by whoever ejects it).
    pub until: Option<Instant>,
}

impl Health {
    /// Counts `seen`; the reason to eject the endpoint when a count reached its threshold.
    pub fn record(&mut self, d: &Detection, seen: Observed) -> Option<Reason> {
        let status = match seen {
            Observed::LocalFailure if d.split_local_origin => {
                self.consecutive_local += 1;
                return reached(d.consecutive_local_origin, self.consecutive_local)
                    .then_some(Reason::ConsecutiveLocalOrigin);
            }
            // Not split: a failure to reach the endpoint counts as a 503.
            Observed::LocalFailure => 503,
            Observed::Answer(s) => {
                self.consecutive_local = 0;
                s
            }
        };
        if status >= 500 {
            self.consecutive_5xx += 1;
        } else {
            self.consecutive_5xx = 0;
        }
        if matches!(status, 502..=504) {
            self.consecutive_gateway += 1;
        } else {
            self.consecutive_gateway = 0;
        }
        if reached(d.consecutive_5xx, self.consecutive_5xx) {
            Some(Reason::Consecutive5xx)
        } else if reached(d.consecutive_gateway, self.consecutive_gateway) {
            Some(Reason::ConsecutiveGateway)
        } else {
            None
        }
    }

    /// Ejects it at `now` (its counts start again). Each interval it stayed in since its last
    /// ejection took one off the count, as Envoy's backoff does.
    pub fn eject(&mut self, d: &Detection, now: Instant) {
        if let Some(back) = self.returned_at.take() {
            let stayed =
                now.saturating_duration_since(back).as_nanos() / d.interval.as_nanos().max(1);
            self.ejections = self
                .ejections
                .saturating_sub(u32::try_from(stayed).unwrap_or(u32::MAX));
        }
        self.ejected_at = Some(now);
        self.ejections = self.ejections.saturating_add(1);
        self.consecutive_5xx = 0;
        self.consecutive_gateway = 0;
        self.consecutive_local = 0;
    }

    /// When an ejected endpoint comes back: the first interval tick (counted from `start`) at
    /// or after `baseEjectionTime` × its ejections (at most [`MAX_EJECTION_TIME`], or
    /// `baseEjectionTime` when that is longer, as Envoy).
    pub fn returns_at(&self, d: &Detection, start: Instant) -> Option<Instant> {
        let at = self.ejected_at?;
        let cap = MAX_EJECTION_TIME.max(d.base_ejection_time);
        let length = d
            .base_ejection_time
            .checked_mul(self.ejections.max(1))
            .map_or(cap, |l| l.min(cap));
        Some(next_tick(start, d.interval, at + length))
    }

    /// Brings it back when its time is over at `now`; whether it did.
    pub fn unejects(&mut self, d: &Detection, start: Instant, now: Instant) -> bool {
        match self.returns_at(d, start) {
            Some(at) if now >= at => {
                self.ejected_at = None;
                self.until = None;
                self.returned_at = Some(now);
                true
            }
            _ => false,
        }
    }
}

fn reached(threshold: Option<u32>, count: u32) -> bool {
    threshold.is_some_and(|t| count >= t)
}

/// The first tick of `interval` from `start` at or after `t`.
fn next_tick(start: Instant, interval: Duration, t: Instant) -> Instant {
    let since = t.saturating_duration_since(start).as_nanos();
    let step = interval.as_nanos().max(1);
    let ticks = since.div_ceil(step);
    start + Duration::from_nanos(u64::try_from(ticks * step).unwrap_or(u64::MAX))
}

/// Whether one more of `total` endpoints may be ejected with `ejected` out already: while the
/// ejected share is under `max_percent`, and always the first (as Envoy).
pub fn may_eject(ejected: usize, total: usize, max_percent: u32) -> bool {
    ejected == 0 || (total > 0 && (100 * ejected / total) < max_percent as usize)
}

/// Whether balancing ignores ejections: fewer than `min_percent` of `total` are healthy
/// (Envoy's panic threshold; 0 never).
pub fn panics(healthy: usize, total: usize, min_percent: u32) -> bool {
    total > 0 && min_percent > 0 && (100 * healthy) < (min_percent as usize * total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(yaml: &str) -> Option<Detection> {
        Detection::of(Some(&serde_yaml_ng::from_str(yaml).unwrap()))
    }

    #[test]
    fn defaults_are_istios() {
        assert_eq!(Detection::of(None), None);
        let d = rule("{}").unwrap();
        assert_eq!(d.consecutive_5xx, Some(5));
        assert_eq!(d.consecutive_gateway, None);
        assert_eq!(d.consecutive_local_origin, None);
        assert_eq!(d.interval, Duration::from_secs(10));
        assert_eq!(d.base_ejection_time, Duration::from_secs(30));
        assert_eq!((d.max_ejection_percent, d.min_health_percent), (10, 0));
        let old = rule("{consecutiveErrors: 3}").unwrap();
        assert_eq!(
            (old.consecutive_5xx, old.consecutive_gateway),
            (None, Some(3)),
            "the deprecated field counts gateway errors only"
        );
        let off = rule("{consecutive5xxErrors: 0, consecutiveGatewayErrors: 2}").unwrap();
        assert_eq!(
            (off.consecutive_5xx, off.consecutive_gateway),
            (None, Some(2))
        );
        let split = rule("{splitExternalLocalOriginErrors: true}").unwrap();
        assert_eq!(split.consecutive_local_origin, Some(5));
    }

    #[test]
    fn consecutive_failures_eject_and_any_success_starts_again() {
        let d = rule("{consecutive5xxErrors: 3}").unwrap();
        let mut h = Health::default();
        assert_eq!(h.record(&d, Observed::Answer(500)), None);
        assert_eq!(h.record(&d, Observed::Answer(503)), None);
        assert_eq!(
            h.record(&d, Observed::Answer(200)),
            None,
            "a success resets"
        );
        assert_eq!(h.record(&d, Observed::Answer(500)), None);
        assert_eq!(
            h.record(&d, Observed::LocalFailure),
            None,
            "counts as a 503"
        );
        assert_eq!(
            h.record(&d, Observed::Answer(502)),
            Some(Reason::Consecutive5xx)
        );
        let g = rule("{consecutive5xxErrors: 0, consecutiveGatewayErrors: 2}").unwrap();
        let mut h = Health::default();
        assert_eq!(
            h.record(&g, Observed::Answer(500)),
            None,
            "not a gateway error"
        );
        assert_eq!(h.record(&g, Observed::Answer(504)), None);
        assert_eq!(
            h.record(&g, Observed::Answer(502)),
            Some(Reason::ConsecutiveGateway)
        );
        let s = rule("{splitExternalLocalOriginErrors: true, consecutiveLocalOriginFailures: 2}")
            .unwrap();
        let mut h = Health::default();
        assert_eq!(h.record(&s, Observed::LocalFailure), None);
        assert_eq!(
            h.record(&s, Observed::LocalFailure),
            Some(Reason::ConsecutiveLocalOrigin)
        );
    }

    #[test]
    fn an_ejection_lasts_its_base_time_times_its_count_to_the_next_interval() {
        let d = rule("{interval: 1s, baseEjectionTime: 3s}").unwrap();
        let start = Instant::now();
        let mut h = Health::default();
        h.eject(&d, start + Duration::from_millis(500));
        assert_eq!(
            h.returns_at(&d, start),
            Some(start + Duration::from_secs(4)),
            "3.5 s, then the tick at 4 s"
        );
        assert!(!h.unejects(&d, start, start + Duration::from_millis(3900)));
        assert!(h.unejects(&d, start, start + Duration::from_secs(4)));
        assert_eq!(h.ejected_at, None);
        h.eject(
            &d,
            start + Duration::from_secs(4) + Duration::from_millis(500),
        );
        assert_eq!(
            h.returns_at(&d, start),
            Some(start + Duration::from_secs(11)),
            "the second ejection, soon after, lasts twice as long"
        );
        assert!(h.unejects(&d, start, start + Duration::from_secs(11)));
        h.eject(&d, start + Duration::from_secs(20));
        assert_eq!(h.ejections, 1, "nine intervals in took the count back down");
        assert_eq!(
            h.returns_at(&d, start),
            Some(start + Duration::from_secs(23))
        );
        h.ejections = 1000;
        assert_eq!(
            h.returns_at(&d, start),
            Some(start + Duration::from_secs(320)),
            "at most 300 s"
        );
    }

    #[test]
    fn ejections_are_capped_by_share_and_health_by_panic_threshold() {
        assert!(may_eject(0, 3, 10), "the first always");
        assert!(!may_eject(1, 3, 10));
        assert!(may_eject(1, 3, 50));
        assert!(!may_eject(2, 3, 50));
        assert!(may_eject(2, 3, 100));
        assert!(!panics(0, 3, 0), "Istio's default: never");
        assert!(panics(1, 3, 50));
        assert!(!panics(2, 3, 50));
    }
}
