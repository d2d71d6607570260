//! Destinations as Envoy calls them, clusters: a Service port and subset, a ServiceEntry port,
//! or the passthrough of what no route names. What every connection sending to one shares is
//! kept here: the round-robin position, the requests in flight on each endpoint, the retry
//! budget, and the counters `/stats` and `/metrics` show (Envoy's names, so dashboards and
//! habits carry over).
//!
//! Names follow Istio's: `outbound|<port>|<subset>|<host>`, and `PassthroughCluster`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::budget::RetryBudget;

/// Where connections and requests no route names go (Istio's name for it).
pub const PASSTHROUGH: &str = "PassthroughCluster";

/// Istio's name of the cluster of `host` (an FQDN), `port` and `subset`.
pub fn name(port: u16, subset: Option<&str>, host: &str) -> String {
    format!("outbound|{port}|{}|{host}", subset.unwrap_or(""))
}

/// Every cluster this node has sent to.
#[derive(Debug, Default)]
pub struct Clusters {
    all: Mutex<HashMap<String, Arc<Cluster>>>,
}

impl Clusters {
    /// The cluster named `name`, shared by every sender.
    pub fn get(&self, name: &str) -> Arc<Cluster> {
        let mut all = self.all.lock();
        match all.get(name) {
            Some(c) => c.clone(),
            None => all
                .entry(name.to_string())
                .or_insert_with(|| Arc::new(Cluster::new(name)))
                .clone(),
        }
    }

    /// Every cluster's counters, by cluster name.
    pub fn stats(&self) -> Vec<(String, Vec<Stat>)> {
        let all: Vec<Arc<Cluster>> = self.all.lock().values().cloned().collect();
        let mut out: Vec<(String, Vec<Stat>)> = all
            .iter()
            .map(|c| (c.name.clone(), c.stats.read()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

/// One destination's shared state.
#[derive(Debug)]
pub struct Cluster {
    pub name: String,
    next: AtomicUsize,
    /// How many retries it may take now.
    pub budget: RetryBudget,
    pub stats: ClusterStats,
    endpoints: Mutex<HashMap<SocketAddr, Arc<EndpointState>>>,
}

/// One endpoint of a cluster, as every sender there sees it.
#[derive(Debug, Default)]
pub struct EndpointState {
    /// Requests in flight on it (LEAST_REQUEST compares them).
    pub active: AtomicUsize,
}

impl Cluster {
    fn new(name: &str) -> Cluster {
        Cluster {
            name: name.to_string(),
            next: AtomicUsize::new(0),
            budget: RetryBudget::default(),
            stats: ClusterStats::default(),
            endpoints: Mutex::default(),
        }
    }

    /// The round-robin position.
    pub fn round(&self) -> &AtomicUsize {
        &self.next
    }

    /// The index of the next endpoint among `n` in turn, `None` when there is none.
    pub fn pick(&self, n: usize) -> Option<usize> {
        (n > 0).then(|| self.next.fetch_add(1, Ordering::Relaxed) % n)
    }

    /// The state of endpoint `addr` in this cluster.
    pub fn endpoint(&self, addr: SocketAddr) -> Arc<EndpointState> {
        let mut all = self.endpoints.lock();
        if all.len() >= 4096 {
            // Endpoints no target holds any more.
            all.retain(|_, e| Arc::strong_count(e) > 1);
        }
        all.entry(addr).or_default().clone()
    }
}

/// Whether a stat only grows, or goes up and down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatKind {
    Counter,
    Gauge,
}

/// One stat's value, named as Envoy names it within its cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    pub name: &'static str,
    pub kind: StatKind,
    pub value: u64,
}

macro_rules! cluster_stats {
    ($($(#[$doc:meta])* $field:ident: $kind:ident = $name:literal,)*) => {
        /// A cluster's counters and gauges (Envoy's `cluster.<name>.*`).
        #[derive(Debug, Default)]
        pub struct ClusterStats {
            $($(#[$doc])* pub $field: AtomicU64,)*
        }

        impl ClusterStats {
            /// Every stat, in Envoy's names.
            pub fn read(&self) -> Vec<Stat> {
                vec![$(Stat {
                    name: $name,
                    kind: StatKind::$kind,
                    value: self.$field.load(Ordering::Relaxed),
                },)*]
            }
        }
    };
}

cluster_stats! {
    /// Requests sent upstream, each attempt counted.
    rq_total: Counter = "upstream_rq_total",
    /// Responses received, each attempt counted.
    rq_completed: Counter = "upstream_rq_completed",
    rq_1xx: Counter = "upstream_rq_1xx",
    rq_2xx: Counter = "upstream_rq_2xx",
    rq_3xx: Counter = "upstream_rq_3xx",
    rq_4xx: Counter = "upstream_rq_4xx",
    rq_5xx: Counter = "upstream_rq_5xx",
    /// Requests waiting for an answer now.
    rq_active: Gauge = "upstream_rq_active",
    /// Requests whose route timeout expired.
    rq_timeout: Counter = "upstream_rq_timeout",
    /// Attempts whose per-try timeout expired.
    rq_per_try_timeout: Counter = "upstream_rq_per_try_timeout",
    /// Retries sent.
    rq_retry: Counter = "upstream_rq_retry",
    /// Requests that succeeded on a retry.
    rq_retry_success: Counter = "upstream_rq_retry_success",
    /// Requests that would have been retried again but had no attempt left.
    rq_retry_limit_exceeded: Counter = "upstream_rq_retry_limit_exceeded",
    /// Retries not sent: the retry budget or circuit breaker was spent.
    rq_retry_overflow: Counter = "upstream_rq_retry_overflow",
    /// Connections opened.
    cx_total: Counter = "upstream_cx_total",
    /// Connections that could not be opened.
    cx_connect_fail: Counter = "upstream_cx_connect_fail",
}

/// Adds one.
pub fn inc(stat: &AtomicU64) {
    stat.fetch_add(1, Ordering::Relaxed);
}

impl ClusterStats {
    /// A response with `status` from an attempt.
    pub fn response(&self, status: u16) {
        inc(&self.rq_completed);
        match status / 100 {
            1 => inc(&self.rq_1xx),
            2 => inc(&self.rq_2xx),
            3 => inc(&self.rq_3xx),
            4 => inc(&self.rq_4xx),
            _ => inc(&self.rq_5xx),
        }
    }
}

/// A request out on an endpoint of a cluster: counted in flight there (LEAST_REQUEST) and in
/// the cluster's `upstream_rq_active` until its response ends.
pub struct InFlight {
    cluster: Arc<Cluster>,
    endpoint: Arc<EndpointState>,
}

impl InFlight {
    pub fn start(cluster: &Arc<Cluster>, endpoint: &Arc<EndpointState>) -> InFlight {
        endpoint.active.fetch_add(1, Ordering::Relaxed);
        inc(&cluster.stats.rq_active);
        InFlight {
            cluster: cluster.clone(),
            endpoint: endpoint.clone(),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.endpoint.active.fetch_sub(1, Ordering::Relaxed);
        self.cluster.stats.rq_active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl crate::exchange::body::Held for InFlight {
    fn timed_out(&self) {
        inc(&self.cluster.stats.rq_timeout);
    }
}

/// Holds a gauge up while it lives.
pub struct Up(Arc<Cluster>, fn(&ClusterStats) -> &AtomicU64);

impl Up {
    pub fn new(cluster: &Arc<Cluster>, gauge: fn(&ClusterStats) -> &AtomicU64) -> Up {
        inc(gauge(&cluster.stats));
        Up(cluster.clone(), gauge)
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        (self.1)(&self.0.stats).fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_istios() {
        assert_eq!(
            name(9080, Some("v2"), "reviews.back.svc.cluster.local"),
            "outbound|9080|v2|reviews.back.svc.cluster.local"
        );
        assert_eq!(
            name(443, None, "api.example.com"),
            "outbound|443||api.example.com"
        );
    }

    #[test]
    fn a_cluster_is_shared_by_name_and_turns_in_order() {
        let all = Clusters::default();
        let a = all.get("a");
        let picks: Vec<_> = (0..4).map(|_| a.pick(3).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0]);
        assert_eq!(all.get("a").pick(3), Some(1));
        assert_eq!(all.get("b").pick(2), Some(0));
        assert_eq!(all.get("b").pick(0), None);
    }

    #[test]
    fn endpoints_are_counted_per_cluster() {
        let all = Clusters::default();
        let addr: SocketAddr = "10.0.0.1:80".parse().unwrap();
        all.get("a")
            .endpoint(addr)
            .active
            .fetch_add(1, Ordering::Relaxed);
        assert_eq!(
            all.get("a").endpoint(addr).active.load(Ordering::Relaxed),
            1
        );
        assert_eq!(
            all.get("b").endpoint(addr).active.load(Ordering::Relaxed),
            0
        );
    }

    #[test]
    fn stats_read_back_in_envoys_names_and_gauges_fall_when_released() {
        let all = Clusters::default();
        let c = all.get("outbound|80||x");
        c.stats.response(200);
        c.stats.response(503);
        inc(&c.stats.rq_retry);
        let held = Up::new(&c, |s| &s.rq_active);
        let value = |name: &str| {
            all.stats()[0]
                .1
                .iter()
                .find(|s| s.name == name)
                .unwrap()
                .value
        };
        assert_eq!(value("upstream_rq_completed"), 2);
        assert_eq!((value("upstream_rq_2xx"), value("upstream_rq_5xx")), (1, 1));
        assert_eq!(value("upstream_rq_retry"), 1);
        assert_eq!(value("upstream_rq_active"), 1);
        drop(held);
        assert_eq!(value("upstream_rq_active"), 0);
        assert_eq!(all.stats()[0].0, "outbound|80||x");
    }
}
