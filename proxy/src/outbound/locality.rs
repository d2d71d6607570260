//! Locality-aware balancing (DestinationRule `localityLbSetting`), as Istio configures
//! Envoy's. An endpoint's locality is its region, zone and subzone, taken from its node's
//! topology labels. Two modes:
//! - **failover** (Istio's default once outlier detection is on): endpoints are ranked by how
//!   close they are to the client, and requests go to the closest healthy rank, spilling to the
//!   next as it loses health (Envoy's priorities, overprovisioned by 1.4);
//! - **distribute**: each locality gets the share of requests the rule gives it.
//!
//! Pure: the caller says which endpoints are healthy and draws the roll.

use crate::registry::kinds::networking::LocalityLbSetting;
use crate::registry::Labels;

/// Where a workload runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

impl Locality {
    /// A pod's locality: its `istio-locality` label (`region.zone.subzone`), else its node's
    /// `topology.kubernetes.io/region` and `/zone` (or the older
    /// `failure-domain.beta.kubernetes.io` ones) and `topology.istio.io/subzone`.
    pub fn of(pod: &Labels, node: Option<&Labels>) -> Locality {
        if let Some(l) = pod.get("istio-locality") {
            let mut parts = l.split('.').map(str::to_string);
            return Locality {
                region: parts.next().unwrap_or_default(),
                zone: parts.next().unwrap_or_default(),
                subzone: parts.next().unwrap_or_default(),
            };
        }
        let label = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| node.and_then(|l| l.get(*n)))
                .cloned()
                .unwrap_or_default()
        };
        Locality {
            region: label(&[
                "topology.kubernetes.io/region",
                "failure-domain.beta.kubernetes.io/region",
            ]),
            zone: label(&[
                "topology.kubernetes.io/zone",
                "failure-domain.beta.kubernetes.io/zone",
            ]),
            subzone: label(&["topology.istio.io/subzone"]),
        }
    }

    /// Whether it is within `pattern`: `region/zone/subzone`, each part a name or `*`; parts
    /// left out match anything.
    pub fn within(&self, pattern: &str) -> bool {
        let mut parts = pattern.split('/');
        [&self.region, &self.zone, &self.subzone]
            .into_iter()
            .all(|mine| match parts.next() {
                None | Some("*") => true,
                Some(p) => p == mine,
            })
    }
}

/// How a destination's endpoints are grouped by locality, and how a group is chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct Spread {
    /// Each endpoint's group.
    pub group: Vec<usize>,
    pub choice: Choice,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Choice {
    /// Groups are priorities, 0 the closest: the closest with health takes the requests.
    Failover,
    /// Each group's share of requests (a locality's weight from `distribute`).
    Weighted(Vec<f64>),
}

/// Envoy's overprovisioning factor: a priority at 72 % health still takes every request.
const OVERPROVISIONING: f64 = 1.4;

/// The spread for a client at `client` over endpoints at `endpoints`: `distribute` when a rule
/// of it is from the client's locality; else failover when outlier detection is on (as Istio
/// requires); none when `enabled: false`, or when every endpoint would be in one group.
pub fn spread(
    setting: Option<&LocalityLbSetting>,
    outlier_detection: bool,
    client: &Locality,
    endpoints: &[Locality],
) -> Option<Spread> {
    if setting.and_then(|s| s.enabled) == Some(false) {
        return None;
    }
    let rule = setting.and_then(|s| s.distribute.iter().find(|d| client.within(&d.from)));
    let spread = match rule {
        Some(rule) => {
            // A locality's weight: that of the first `to` it is within (0: none).
            let mut localities: Vec<&Locality> = endpoints.iter().collect();
            localities.sort();
            localities.dedup();
            let group = endpoints
                .iter()
                .map(|l| localities.binary_search(&l).unwrap_or(0))
                .collect();
            // Each `to` takes the localities it matches that no `to` before took, and shares
            // its weight among them by their endpoints, as Istio does for a wildcard.
            let count = |g: usize| endpoints.iter().filter(|l| *l == localities[g]).count();
            let mut weights = vec![0.0; localities.len()];
            let mut taken = vec![false; localities.len()];
            for (pattern, w) in &rule.to {
                let matched: Vec<usize> = (0..localities.len())
                    .filter(|&g| !taken[g] && localities[g].within(pattern))
                    .collect();
                let total: usize = matched.iter().map(|&g| count(g)).sum();
                for &g in &matched {
                    taken[g] = true;
                    weights[g] = f64::from(*w) * count(g) as f64 / total.max(1) as f64;
                }
            }
            Spread {
                group,
                choice: Choice::Weighted(weights),
            }
        }
        None if outlier_detection => {
            let failover = setting.map_or(&[][..], |s| &s.failover[..]);
            let to = failover
                .iter()
                .find(|f| f.from == client.region)
                .map(|f| f.to.as_str());
            let rank = |l: &Locality| match (
                l.region == client.region,
                l.zone == client.zone,
                l.subzone == client.subzone,
            ) {
                (true, true, true) => 0,
                (true, true, false) => 1,
                (true, false, _) => 2,
                (false, ..) if to == Some(l.region.as_str()) => 3,
                (false, ..) if to.is_some() => 4,
                (false, ..) => 3,
            };
            // Envoy numbers the priorities that have endpoints from 0.
            let mut ranks: Vec<usize> = endpoints.iter().map(rank).collect();
            let mut present = ranks.clone();
            present.sort_unstable();
            present.dedup();
            for r in &mut ranks {
                *r = present.binary_search(r).unwrap_or(0);
            }
            Spread {
                group: ranks,
                choice: Choice::Failover,
            }
        }
        None => return None,
    };
    let first = spread.group.first();
    (!spread.group.iter().all(|g| Some(g) == first) || matches!(spread.choice, Choice::Weighted(_)))
        .then_some(spread)
}

impl Spread {
    /// The group a request goes to, given the healthy endpoints (by index) and a uniform roll
    /// in [0, 1); `None` when no group has a healthy endpoint (or weight).
    pub fn choose(&self, healthy: &[usize], roll: f64) -> Option<usize> {
        let groups = self.group.iter().max().map_or(0, |m| m + 1);
        let mut total = vec![0usize; groups];
        let mut up = vec![0usize; groups];
        for &g in &self.group {
            total[g] += 1;
        }
        for &i in healthy {
            up[self.group[i]] += 1;
        }
        let share: Vec<f64> = match &self.choice {
            Choice::Failover => {
                // Each priority's health, overprovisioned; the closest ones take what they can.
                let health: Vec<f64> = (0..groups)
                    .map(|g| (OVERPROVISIONING * up[g] as f64 / total[g].max(1) as f64).min(1.0))
                    .collect();
                let sum: f64 = health.iter().sum::<f64>().min(1.0);
                if sum <= 0.0 {
                    return None;
                }
                let mut left = 1.0;
                health
                    .iter()
                    .map(|h| {
                        let take = (h / sum).min(left);
                        left -= take;
                        take
                    })
                    .collect()
            }
            Choice::Weighted(w) => (0..groups)
                .map(|g| if up[g] > 0 { w[g] } else { 0.0 })
                .collect(),
        };
        let sum: f64 = share.iter().sum();
        if sum <= 0.0 {
            return None;
        }
        let mut at = roll * sum;
        for (g, s) in share.iter().enumerate() {
            if *s > 0.0 && at < *s {
                return Some(g);
            }
            at -= s;
        }
        share.iter().rposition(|s| *s > 0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(region: &str, zone: &str) -> Locality {
        Locality {
            region: region.into(),
            zone: zone.into(),
            subzone: String::new(),
        }
    }

    fn setting(y: &str) -> LocalityLbSetting {
        serde_yaml_ng::from_str(y).unwrap()
    }

    #[test]
    fn a_locality_comes_from_the_node_or_the_pods_label() {
        let node: Labels = [
            ("topology.kubernetes.io/region", "r1"),
            ("topology.kubernetes.io/zone", "z1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(Locality::of(&Labels::new(), Some(&node)), at("r1", "z1"));
        let pod: Labels = [("istio-locality".to_string(), "r2.z2.s2".to_string())].into();
        assert_eq!(Locality::of(&pod, Some(&node)).subzone, "s2");
        assert!(at("r1", "z1").within("r1/*"));
        assert!(at("r1", "z1").within("r1/z1/*"));
        assert!(!at("r1", "z1").within("r1/z2"));
        assert!(at("r1", "z1").within("*"));
    }

    #[test]
    fn failover_ranks_by_closeness_and_spills_as_health_falls() {
        let eps = [
            at("r1", "z1"),
            at("r1", "z2"),
            at("r1", "z2"),
            at("r2", "z9"),
        ];
        assert_eq!(
            spread(None, false, &at("r1", "z1"), &eps),
            None,
            "needs outlier detection"
        );
        let s = spread(None, true, &at("r1", "z1"), &eps).unwrap();
        assert_eq!(s.group, [0, 1, 1, 2]);
        assert_eq!(
            s.choose(&[0, 1, 2, 3], 0.99),
            Some(0),
            "all healthy: the closest"
        );
        assert_eq!(
            s.choose(&[1, 2, 3], 0.0),
            Some(1),
            "the closest out: the next"
        );
        assert_eq!(s.choose(&[3], 0.5), Some(2));
        assert_eq!(s.choose(&[], 0.5), None);
        // Half of a priority healthy: 70 % stays, 30 % spills.
        let half = spread(None, true, &at("r1", "z2"), &eps).unwrap();
        assert_eq!(half.group, [1, 0, 0, 2]);
        assert_eq!(half.choose(&[0, 1, 3], 0.69), Some(0));
        assert_eq!(half.choose(&[0, 1, 3], 0.71), Some(1));
        let off = setting("{enabled: false}");
        assert_eq!(spread(Some(&off), true, &at("r1", "z1"), &eps), None);
        let same = [at("r1", "z1"), at("r1", "z1")];
        assert_eq!(
            spread(None, true, &at("r1", "z1"), &same),
            None,
            "one group"
        );
    }

    #[test]
    fn failover_to_a_named_region_comes_before_the_others() {
        let eps = [at("r2", "a"), at("r3", "a")];
        let f = setting("{failover: [{from: r1, to: r3}]}");
        let s = spread(Some(&f), true, &at("r1", "z1"), &eps).unwrap();
        assert_eq!(s.group, [1, 0]);
    }

    #[test]
    fn distribute_gives_each_locality_its_share() {
        let d = setting("{distribute: [{from: r1/z1/*, to: {\"r1/z1/*\": 20, \"r1/z2/*\": 80}}]}");
        let eps = [at("r1", "z1"), at("r1", "z2"), at("r1", "z2")];
        let s = spread(Some(&d), false, &at("r1", "z1"), &eps).unwrap();
        let mut seen = [0; 2];
        for k in 0..1000 {
            seen[s.choose(&[0, 1, 2], k as f64 / 1000.0).unwrap()] += 1;
        }
        assert_eq!(seen, [200, 800]);
        assert_eq!(
            s.choose(&[1, 2], 0.1),
            Some(1),
            "a locality without health gets none"
        );
        assert_eq!(
            spread(Some(&d), false, &at("r9", "z"), &eps),
            None,
            "no rule from the client's locality"
        );
        // A wildcard's weight is shared among the localities it matches.
        let wide = setting("{distribute: [{from: \"*\", to: {\"r1/*\": 80, \"r2/*\": 20}}]}");
        let eps = [at("r1", "a"), at("r1", "b"), at("r2", "c")];
        let s = spread(Some(&wide), false, &at("r1", "a"), &eps).unwrap();
        assert_eq!(s.choice, Choice::Weighted(vec![40.0, 40.0, 20.0]));
    }
}
