//! Destinations as Envoy calls them, clusters: a Service port and subset, a ServiceEntry port,
//! or the passthrough of what no route names. What every connection sending to one shares is
//! kept here: the round-robin position, the requests in flight on each endpoint, the retry
//! budget, and the counters `/stats` and `/metrics` show (Envoy's names, so dashboards and
//! habits carry over).
//!
//! Names follow Istio's: `outbound|<port>|<subset>|<host>`, and `PassthroughCluster`.
//!
//! Circuit breaking (DestinationRule `connectionPool`) is decided here too, from the cluster's
//! gauges and its [`Limits`], as Envoy's circuit breakers decide it per cluster.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::Notify;

use super::budget::RetryBudget;
use super::hash;
use super::outlier::{self, Detection, Health, Observed, Reason};
use crate::registry::kinds::networking::ConnectionPoolSettings;
use crate::upstream::http::Reuse;
use crate::upstream::Keepalive;

/// Where connections and requests no route names go (Istio's name for it).
pub const PASSTHROUGH: &str = "PassthroughCluster";

/// Istio's name of the cluster of `host` (an FQDN), `port` and `subset`.
pub fn name(port: u16, subset: Option<&str>, host: &str) -> String {
    format!("outbound|{port}|{}|{host}", subset.unwrap_or(""))
}

/// Every cluster this node has sent to.
#[derive(Debug, Default)]
pub struct Clusters {
    all: Mutex<HashMap<String, Arc<Cluster>, foldhash::fast::RandomState>>,
}

/// The next cluster's id (0 is no cluster's).
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

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
            .map(|c| (c.name.clone(), c.read_stats()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

/// One destination's shared state.
#[derive(Debug)]
pub struct Cluster {
    pub name: String,
    /// Unique in this process: what upstream connections are kept by.
    pub id: u64,
    next: AtomicUsize,
    /// The round-robin position of TCP connections (planned for every connection, HTTP ones
    /// included: kept apart so that those take no turn from the requests).
    next_tcp: AtomicUsize,
    /// How many retries it may take now.
    pub budget: RetryBudget,
    pub stats: ClusterStats,
    endpoints: Mutex<Endpoints>,
    /// Woken when a connection may have become free: requests wait on it while the cluster
    /// may open no more connections.
    freed: Notify,
    /// When it was first sent to: outlier detection's intervals count from here.
    start: Instant,
    /// The consistent-hash table last built, with what it was built for.
    table: Mutex<Option<KeptTable>>,
    /// Its first endpoints are known: any endpoint from now on joins it (slow start).
    settled: AtomicBool,
    /// Held while an ejection is decided (`maxEjectionPercent` holds under races).
    ejecting: Mutex<()>,
}

/// A cluster's endpoints, and the size at which those nobody holds are let go.
#[derive(Debug)]
struct Endpoints {
    all: HashMap<SocketAddr, Arc<EndpointState>, foldhash::fast::RandomState>,
    prune_at: usize,
}

impl Default for Endpoints {
    fn default() -> Self {
        Endpoints {
            all: HashMap::default(),
            prune_at: PRUNE_AT,
        }
    }
}

/// The fewest endpoints a cluster keeps before letting go of those nobody holds.
const PRUNE_AT: usize = 4096;

/// A consistent-hash table with the kind and endpoints it was built for.
type KeptTable = (hash::Kind, Vec<SocketAddr>, Arc<hash::Table>);

/// One endpoint of a cluster, as every sender there sees it.
#[derive(Debug, Default)]
pub struct EndpointState {
    /// Requests in flight on it (LEAST_REQUEST compares them).
    pub active: AtomicUsize,
    /// Connections open to it.
    pub connections: AtomicU64,
    /// HTTP connections open to it, by how they are reached and their version (Envoy's
    /// connection pools: a pool without a connection may always open one).
    pools: Mutex<HashMap<Pool, usize>>,
    /// Ejected by outlier detection (what balancing reads; `health` says until when).
    ejected: AtomicBool,
    /// Some count of failures in a row is not zero (a success must clear it).
    failing: AtomicBool,
    health: Mutex<Health>,
    /// When it joined the cluster, if after the cluster's first endpoints.
    pub joined: Option<Instant>,
}

impl Cluster {
    fn new(name: &str) -> Cluster {
        Cluster {
            name: name.to_string(),
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            next: AtomicUsize::new(0),
            next_tcp: AtomicUsize::new(0),
            budget: RetryBudget::default(),
            stats: ClusterStats::default(),
            endpoints: Mutex::default(),
            freed: Notify::new(),
            start: Instant::now(),
            table: Mutex::default(),
            settled: AtomicBool::new(false),
            ejecting: Mutex::new(()),
        }
    }

    /// Its first endpoints are known (called once a target of it is resolved).
    pub fn settle(&self) {
        self.settled.store(true, Ordering::Relaxed);
    }

    /// The consistent-hash table of `kind` for `endpoints`: the one kept while they stay the
    /// same (every connection's targets share it), else a new one.
    pub fn table(&self, kind: hash::Kind, endpoints: &[SocketAddr]) -> Arc<hash::Table> {
        let mut kept = self.table.lock();
        if let Some((k, eps, t)) = kept.as_ref() {
            if *k == kind && eps == endpoints {
                return t.clone();
            }
        }
        let t = Arc::new(hash::Table::build(kind, endpoints));
        *kept = Some((kind, endpoints.to_vec(), t.clone()));
        t
    }

    /// Counts what an attempt to `endpoint` (one of `total`) came to, and ejects it when
    /// `detection` says it has failed too many times in a row.
    /// `ejected_now` counts the destination's endpoints ejected now (of `total`), to keep
    /// within `maxEjectionPercent`; ejections are decided one at a time.
    pub fn observe(
        &self,
        detection: &Detection,
        endpoint: &EndpointState,
        seen: Observed,
        total: usize,
        ejected_now: impl Fn() -> usize,
    ) {
        let success = matches!(seen, Observed::Answer(s) if s < 500);
        if success && !endpoint.failing.load(Ordering::Relaxed) {
            return;
        }
        let mut health = endpoint.health.lock();
        let reason = health.record(detection, seen);
        endpoint.failing.store(!success, Ordering::Relaxed);
        let Some(reason) = reason else { return };
        if health.ejected_at.is_some() {
            return;
        }
        let _one_at_a_time = self.ejecting.lock();
        if !outlier::may_eject(ejected_now(), total, detection.max_ejection_percent) {
            inc(&self.stats.ejections_overflow);
            return;
        }
        health.eject(detection, Instant::now());
        health.until = health.returns_at(detection, self.start);
        endpoint.ejected.store(true, Ordering::Relaxed);
        endpoint.failing.store(false, Ordering::Relaxed);
        inc(&self.stats.ejections_total);
        inc(&self.stats.ejections_enforced_total);
        inc(match reason {
            Reason::Consecutive5xx => &self.stats.ejections_enforced_consecutive_5xx,
            Reason::ConsecutiveGateway => &self.stats.ejections_enforced_consecutive_gateway,
            Reason::ConsecutiveLocalOrigin => &self.stats.ejections_enforced_consecutive_local,
        });
    }

    /// Whether `endpoint` is ejected at `now`; one whose time is over comes back.
    pub fn is_ejected(
        &self,
        detection: &Detection,
        endpoint: &EndpointState,
        now: Instant,
    ) -> bool {
        if !endpoint.ejected.load(Ordering::Relaxed) {
            return false;
        }
        let mut health = endpoint.health.lock();
        if health.ejected_at.is_some() && health.unejects(detection, self.start, now) {
            endpoint.ejected.store(false, Ordering::Relaxed);
            return false;
        }
        health.ejected_at.is_some()
    }

    /// Its counters, `outlier_detection.ejections_active` counted now: the endpoints whose
    /// ejection is not over (one that left the registry while out is not counted past it).
    pub fn read_stats(&self) -> Vec<Stat> {
        let now = Instant::now();
        let out = self
            .endpoints
            .lock()
            .all
            .values()
            .filter(|e| e.is_out() && e.health.lock().until.is_some_and(|t| t > now))
            .count() as u64;
        let mut stats = self.stats.read();
        for s in &mut stats {
            if s.name == "outlier_detection.ejections_active" {
                s.value = out;
            }
        }
        stats
    }

    /// Whether another request may be sent now (`http2MaxRequests`, which Istio applies to
    /// every HTTP version): Envoy's `max_requests` circuit breaker.
    pub fn admits_request(&self, limits: &Limits) -> bool {
        self.stats.rq_active.load(Ordering::Relaxed) < limits.max_requests
    }

    /// Whether an HTTP connection of `pool` may be opened to `endpoint` now
    /// (`tcp.maxConnections`). As in Envoy, a pool with no connection at all may always get
    /// one: no endpoint, and no client, is left waiting on the others' connections.
    pub fn admits_connection(
        &self,
        limits: &Limits,
        endpoint: &EndpointState,
        pool: &Pool,
    ) -> bool {
        self.stats.cx_active.load(Ordering::Relaxed) < limits.max_connections
            || endpoint.pools.lock().get(pool).copied().unwrap_or(0) == 0
    }

    /// Whether a TCP connection may be opened now: fewer than `tcp.maxConnections` are open
    /// (Envoy's TCP proxy refuses the connection past it).
    pub fn admits_new_connection(&self, limits: &Limits) -> bool {
        self.stats.cx_active.load(Ordering::Relaxed) < limits.max_connections
    }

    /// Whether another request may wait for a connection (`http1MaxPendingRequests`).
    pub fn admits_pending(&self, limits: &Limits) -> bool {
        self.stats.rq_pending_active.load(Ordering::Relaxed) < limits.max_pending
    }

    /// Whether another retry may be out now (`maxRetries`).
    pub fn admits_retry(&self, limits: &Limits) -> bool {
        self.stats.rq_retry_active.load(Ordering::Relaxed) < limits.max_retries
    }

    /// Resolves when a connection may have become free (a response ended, a connection was
    /// kept or closed).
    pub async fn freed(&self) {
        self.freed.notified().await
    }

    /// Wakes the requests waiting for a connection, if any.
    pub fn free(&self) {
        if self.stats.rq_pending_active.load(Ordering::Relaxed) > 0 {
            self.freed.notify_waiters();
        }
    }

    /// The round-robin position of requests.
    pub fn round(&self) -> &AtomicUsize {
        &self.next
    }

    /// The round-robin position of TCP connections.
    pub fn round_tcp(&self) -> &AtomicUsize {
        &self.next_tcp
    }

    /// The index of the next endpoint among `n` in turn, `None` when there is none.
    pub fn pick(&self, n: usize) -> Option<usize> {
        (n > 0).then(|| self.next.fetch_add(1, Ordering::Relaxed) % n)
    }

    /// The state of endpoint `addr` in this cluster.
    pub fn endpoint(&self, addr: SocketAddr) -> Arc<EndpointState> {
        let mut kept = self.endpoints.lock();
        if kept.all.len() >= kept.prune_at {
            // Endpoints no target holds any more (an ejected one stays: its record counts).
            kept.all
                .retain(|_, e| Arc::strong_count(e) > 1 || e.is_out());
            kept.prune_at = (kept.all.len() * 2).max(PRUNE_AT);
        }
        let all = &mut kept.all;
        let joined = self.settled.load(Ordering::Relaxed).then(Instant::now);
        all.entry(addr)
            .or_insert_with(|| {
                Arc::new(EndpointState {
                    joined,
                    ..EndpointState::default()
                })
            })
            .clone()
    }
}

impl EndpointState {
    /// Whether outlier detection has it out (until `Cluster::is_ejected` finds its time over).
    pub fn is_out(&self) -> bool {
        self.ejected.load(Ordering::Relaxed)
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
    pub name: Cow<'static, str>,
    pub kind: StatKind,
    pub value: u64,
}

macro_rules! cluster_stats {
    ($($(#[$doc:meta])* $field:ident: $kind:ident = $name:literal,)*) => {
        /// A cluster's counters and gauges (Envoy's `cluster.<name>.*`).
        #[derive(Debug, Default)]
        pub struct ClusterStats {
            $($(#[$doc])* pub $field: AtomicU64,)*
            /// Responses by status code (`upstream_rq_<code>`, those seen only).
            codes: Codes,
        }

        impl ClusterStats {
            /// Every stat, in Envoy's names.
            pub fn read(&self) -> Vec<Stat> {
                let mut all = vec![$(Stat {
                    name: Cow::Borrowed($name),
                    kind: StatKind::$kind,
                    value: self.$field.load(Ordering::Relaxed),
                },)*];
                all.extend(self.codes.read());
                all
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
    /// Requests that found the cluster at a circuit breaker's limit (`http2MaxRequests`,
    /// `http1MaxPendingRequests`) and were answered 503 `UO`.
    rq_pending_overflow: Counter = "upstream_rq_pending_overflow",
    /// Requests waiting for a connection now.
    rq_pending_active: Gauge = "upstream_rq_pending_active",
    /// Retries out now (`maxRetries` limits them).
    rq_retry_active: Gauge = "upstream_rq_retry_active",
    /// Connections opened.
    cx_total: Counter = "upstream_cx_total",
    /// Connections open now.
    cx_active: Gauge = "upstream_cx_active",
    /// Connections that could not be opened.
    cx_connect_fail: Counter = "upstream_cx_connect_fail",
    /// Connections not opened within the connect timeout.
    cx_connect_timeout: Counter = "upstream_cx_connect_timeout",
    /// Times a request found the cluster at `maxConnections`.
    cx_overflow: Counter = "upstream_cx_overflow",
    /// Connections let go after `maxRequestsPerConnection` requests.
    cx_max_requests: Counter = "upstream_cx_max_requests",
    /// Endpoints ejected now.
    ejections_active: Gauge = "outlier_detection.ejections_active",
    /// Ejections, ever.
    ejections_total: Counter = "outlier_detection.ejections_total",
    ejections_enforced_total: Counter = "outlier_detection.ejections_enforced_total",
    ejections_enforced_consecutive_5xx: Counter = "outlier_detection.ejections_enforced_consecutive_5xx",
    ejections_enforced_consecutive_gateway: Counter = "outlier_detection.ejections_enforced_consecutive_gateway_failure",
    ejections_enforced_consecutive_local: Counter = "outlier_detection.ejections_enforced_consecutive_local_origin_failure",
    /// Ejections not made: as many endpoints were out as `maxEjectionPercent` allows.
    ejections_overflow: Counter = "outlier_detection.ejections_overflow",
}

/// Adds one.
pub fn inc(stat: &AtomicU64) {
    stat.fetch_add(1, Ordering::Relaxed);
}

impl ClusterStats {
    /// A response with `status` from an attempt.
    pub fn response(&self, status: u16) {
        inc(&self.rq_completed);
        self.codes.count(status);
        match status / 100 {
            1 => inc(&self.rq_1xx),
            2 => inc(&self.rq_2xx),
            3 => inc(&self.rq_3xx),
            4 => inc(&self.rq_4xx),
            _ => inc(&self.rq_5xx),
        }
    }
}

/// Responses by status code, 100 to 599.
#[derive(Debug)]
struct Codes(Box<[AtomicU64]>);

impl Default for Codes {
    fn default() -> Self {
        Codes((100..600).map(|_| AtomicU64::new(0)).collect())
    }
}

impl Codes {
    fn count(&self, status: u16) {
        if let Some(c) = status
            .checked_sub(100)
            .and_then(|i| self.0.get(usize::from(i)))
        {
            inc(c);
        }
    }

    /// `upstream_rq_<code>` of every code seen.
    fn read(&self) -> impl Iterator<Item = Stat> + '_ {
        self.0.iter().enumerate().filter_map(|(i, c)| {
            let value = c.load(Ordering::Relaxed);
            (value > 0).then(|| Stat {
                name: Cow::Owned(format!("upstream_rq_{}", i + 100)),
                kind: StatKind::Counter,
                value,
            })
        })
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
        self.cluster.free();
    }
}

/// An HTTP connection pool of an endpoint: how it is reached (`direct`, `hbone <source>`,
/// `tls <sni>`) and the HTTP version.
pub type Pool = (Arc<str>, crate::upstream::http::Version);

/// An open connection of a cluster to an endpoint, counted while it lives.
pub struct Open {
    cluster: Arc<Cluster>,
    endpoint: Arc<EndpointState>,
    pool: Option<Pool>,
}

impl Open {
    /// A TCP connection.
    pub fn start(cluster: &Arc<Cluster>, endpoint: &Arc<EndpointState>) -> Open {
        inc(&cluster.stats.cx_total);
        inc(&cluster.stats.cx_active);
        endpoint.connections.fetch_add(1, Ordering::Relaxed);
        Open {
            cluster: cluster.clone(),
            endpoint: endpoint.clone(),
            pool: None,
        }
    }

    /// An HTTP connection of `pool`.
    pub fn start_in(cluster: &Arc<Cluster>, endpoint: &Arc<EndpointState>, pool: Pool) -> Open {
        *endpoint.pools.lock().entry(pool.clone()).or_default() += 1;
        let mut open = Open::start(cluster, endpoint);
        open.pool = Some(pool);
        open
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            let mut pools = self.endpoint.pools.lock();
            if let Some(n) = pools.get_mut(&pool) {
                *n -= 1;
                if *n == 0 {
                    pools.remove(&pool);
                }
            }
        }
        self.endpoint.connections.fetch_sub(1, Ordering::Relaxed);
        self.cluster.stats.cx_active.fetch_sub(1, Ordering::Relaxed);
        self.cluster.free();
    }
}

/// A cluster's circuit breakers and connection settings: DestinationRule
/// `trafficPolicy.connectionPool`, with Istio's defaults for what it leaves out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// `tcp.maxConnections`.
    pub max_connections: u64,
    /// `http.http1MaxPendingRequests`.
    pub max_pending: u64,
    /// `http.http2MaxRequests`.
    pub max_requests: u64,
    /// `http.maxRetries`.
    pub max_retries: u64,
    /// `http.maxRequestsPerConnection` and `http.idleTimeout`.
    pub reuse: Reuse,
    /// `tcp.connectTimeout` (`None`: the node's `--connect-timeout-ms`).
    pub connect_timeout: Option<Duration>,
    /// `tcp.tcpKeepalive`.
    pub keepalive: Option<Keepalive>,
}

/// Istio's default for every circuit breaker: 2^32 - 1, in effect none.
pub const UNLIMITED: u64 = u32::MAX as u64;
/// Istio's default `http.idleTimeout`.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

impl Default for Limits {
    fn default() -> Self {
        Limits::of(None)
    }
}

impl Limits {
    /// The limits a DestinationRule's `connectionPool` sets (`0` or unset: Istio's default).
    pub fn of(pool: Option<&ConnectionPoolSettings>) -> Limits {
        let tcp = pool.and_then(|p| p.tcp.as_ref());
        let http = pool.and_then(|p| p.http.as_ref());
        let limit = |v: Option<i32>| match v {
            Some(n) if n > 0 => n as u64,
            _ => UNLIMITED,
        };
        Limits {
            max_connections: limit(tcp.and_then(|t| t.max_connections)),
            max_pending: limit(http.and_then(|h| h.http1_max_pending_requests)),
            max_requests: limit(http.and_then(|h| h.http2_max_requests)),
            max_retries: limit(http.and_then(|h| h.max_retries)),
            reuse: Reuse {
                max_requests: http
                    .and_then(|h| h.max_requests_per_connection)
                    .filter(|n| *n > 0)
                    .map_or(0, |n| n as u32),
                idle_timeout: Some(
                    http.and_then(|h| h.idle_timeout.as_ref())
                        .map_or(DEFAULT_IDLE_TIMEOUT, |d| d.0),
                )
                .filter(|d| !d.is_zero()),
            },
            connect_timeout: tcp
                .and_then(|t| t.connect_timeout.as_ref())
                .map(|d| d.0)
                .filter(|d| !d.is_zero()),
            keepalive: tcp
                .and_then(|t| t.tcp_keepalive.as_ref())
                .map(|k| Keepalive {
                    probes: k.probes.filter(|n| *n > 0),
                    time: k.time.as_ref().map(|d| d.0).filter(|d| !d.is_zero()),
                    interval: k.interval.as_ref().map(|d| d.0).filter(|d| !d.is_zero()),
                }),
        }
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
    fn limits_are_istios_defaults_unless_the_destination_rule_sets_them() {
        let d = Limits::default();
        assert_eq!(
            (
                d.max_connections,
                d.max_pending,
                d.max_requests,
                d.max_retries
            ),
            (UNLIMITED, UNLIMITED, UNLIMITED, UNLIMITED)
        );
        assert_eq!(d.reuse.max_requests, 0);
        assert_eq!(d.reuse.idle_timeout, Some(DEFAULT_IDLE_TIMEOUT));
        assert_eq!((d.connect_timeout, d.keepalive), (None, None));
        let pool: ConnectionPoolSettings = serde_yaml_ng::from_str(
            "tcp: {maxConnections: 1, connectTimeout: 250ms, tcpKeepalive: {time: 30s, probes: 0}}\n\
             http: {http1MaxPendingRequests: 2, http2MaxRequests: 3, maxRetries: 4,\n\
             maxRequestsPerConnection: 5, idleTimeout: 0s}",
        )
        .unwrap();
        let l = Limits::of(Some(&pool));
        assert_eq!(
            (
                l.max_connections,
                l.max_pending,
                l.max_requests,
                l.max_retries
            ),
            (1, 2, 3, 4)
        );
        assert_eq!(l.reuse.max_requests, 5);
        assert_eq!(l.reuse.idle_timeout, None, "0s: never closed for idleness");
        assert_eq!(l.connect_timeout, Some(Duration::from_millis(250)));
        assert_eq!(
            l.keepalive,
            Some(Keepalive {
                probes: None,
                time: Some(Duration::from_secs(30)),
                interval: None
            })
        );
    }

    #[test]
    fn circuit_breakers_admit_up_to_their_limits() {
        let all = Clusters::default();
        let c = all.get("outbound|80||x");
        let limits = Limits {
            max_connections: 1,
            max_pending: 1,
            max_requests: 2,
            max_retries: 1,
            ..Limits::default()
        };
        let a = c.endpoint("10.0.0.1:80".parse().unwrap());
        let b = c.endpoint("10.0.0.2:80".parse().unwrap());
        let direct: Pool = ("direct".into(), crate::upstream::http::Version::Http1);
        let other: Pool = ("hbone x".into(), crate::upstream::http::Version::Http1);
        assert!(c.admits_connection(&limits, &a, &direct));
        let open = Open::start_in(&c, &a, direct.clone());
        assert!(
            !c.admits_connection(&limits, &a, &direct),
            "at maxConnections"
        );
        assert!(
            c.admits_connection(&limits, &b, &direct),
            "an endpoint without a connection may always get one"
        );
        assert!(
            c.admits_connection(&limits, &a, &other),
            "and so may a pool without one"
        );
        drop(open);
        assert!(c.admits_connection(&limits, &a, &direct));
        let r1 = InFlight::start(&c, &a);
        let r2 = InFlight::start(&c, &a);
        assert!(!c.admits_request(&limits), "at http2MaxRequests");
        drop((r1, r2));
        assert!(c.admits_request(&limits));
        let waiting = Up::new(&c, |s| &s.rq_pending_active);
        assert!(!c.admits_pending(&limits));
        drop(waiting);
        assert!(c.admits_pending(&limits));
        let retry = Up::new(&c, |s| &s.rq_retry_active);
        assert!(!c.admits_retry(&limits));
        drop(retry);
        assert!(c.admits_retry(&limits));
    }

    #[test]
    fn ejections_are_counted_while_they_last_and_kept_within_their_share() {
        let all = Clusters::default();
        let c = all.get("outbound|80||x");
        let d = Detection::of(Some(
            &serde_yaml_ng::from_str("{consecutive5xxErrors: 1, maxEjectionPercent: 50}").unwrap(),
        ))
        .unwrap();
        let a = c.endpoint("10.0.0.1:80".parse().unwrap());
        let b = c.endpoint("10.0.0.2:80".parse().unwrap());
        let out = || [&a, &b].iter().filter(|e| e.is_out()).count();
        c.observe(&d, &a, Observed::Answer(503), 2, out);
        assert!(a.is_out());
        c.observe(&d, &b, Observed::Answer(503), 2, out);
        assert!(!b.is_out(), "half of the endpoints out already");
        let active = |name: &str| {
            c.read_stats()
                .into_iter()
                .find(|s| s.name == name)
                .unwrap()
                .value
        };
        assert_eq!(active("outlier_detection.ejections_active"), 1);
        assert_eq!(active("outlier_detection.ejections_overflow"), 1);
        assert_eq!(
            active("outlier_detection.ejections_enforced_consecutive_5xx"),
            1
        );
        // Its time over (here, pretended), it is not counted even if nobody picked since.
        a.health.lock().until = Some(Instant::now() - Duration::from_secs(1));
        assert_eq!(active("outlier_detection.ejections_active"), 0);
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
        assert_eq!((value("upstream_rq_200"), value("upstream_rq_503")), (1, 1));
        assert!(
            all.stats()[0].1.iter().all(|s| s.name != "upstream_rq_404"),
            "codes not seen are not listed"
        );
        assert_eq!(value("upstream_rq_retry"), 1);
        assert_eq!(value("upstream_rq_active"), 1);
        drop(held);
        assert_eq!(value("upstream_rq_active"), 0);
        assert_eq!(all.stats()[0].0, "outbound|80||x");
    }
}
