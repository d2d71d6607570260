//! Istio's standard metrics, with Istio's names, labels and buckets, so the dashboards, alerts
//! and Kiali graphs users already have read weft's node proxies unchanged.
//!
//! - HTTP and gRPC: `istio_requests_total`, `istio_request_duration_milliseconds`,
//!   `istio_request_bytes`, `istio_response_bytes`, and for gRPC `istio_request_messages_total`
//!   / `istio_response_messages_total`;
//! - TCP: `istio_tcp_connections_opened_total`, `istio_tcp_connections_closed_total`,
//!   `istio_tcp_sent_bytes_total`, `istio_tcp_received_bytes_total`.
//!
//! Every series is one label set ([`RequestLabels`], [`TcpLabels`]) kept in a map: a request
//! costs one hash of its label set and a few atomic adds. Labels never carry a path, a pod
//! address or a client port: the number of series is bounded by who talks to whom, and how
//! they answer. Values missing are `unknown`, as Istio's are.
//!
//! May import: `registry` (pods, for [`Peer::of_pod`]), `admin::api` (`Text`).

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::Arc;

use parking_lot::RwLock;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;

use crate::admin::api::{same_text, Text};
use crate::registry::workload::workload_of;
use crate::registry::Pod;

/// Envoy's default histogram buckets, which Istio's histograms use (milliseconds for
/// durations, bytes for sizes).
pub const BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// What a missing label value reads.
pub const UNKNOWN: &str = "unknown";

/// Which proxy reports: the caller's (`source`) or the callee's (`destination`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reporter {
    Source,
    Destination,
}

impl Reporter {
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

/// `connection_security_policy`: the reporting proxy's view of how the connection was secured.
/// A source reports `unknown` (Istio's: the client side cannot know the server's policy); a
/// destination reports `mutual_tls` when the call came in an HBONE tunnel, `none` otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Security {
    Unknown,
    MutualTls,
    None,
}

impl Security {
    pub fn as_str(self) -> &'static str {
        match self {
            Security::Unknown => UNKNOWN,
            Security::MutualTls => "mutual_tls",
            Security::None => "none",
        }
    }

    /// What `reporter` says of a call that came (or went) in mutual TLS or not.
    pub fn reported(reporter: Reporter, mtls: bool) -> Security {
        match (reporter, mtls) {
            (Reporter::Source, _) => Security::Unknown,
            (Reporter::Destination, true) => Security::MutualTls,
            (Reporter::Destination, false) => Security::None,
        }
    }
}

/// One side of a call as Istio's labels name it (without its principal, which comes from the
/// connection: a certificate or the caller's cgroup). Made by its constructors only, and not
/// changed after: its hash is made once, from the labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// The workload (Deployment, StatefulSet, …) the pod belongs to.
    pub workload: Text,
    pub namespace: Text,
    pub app: Text,
    pub version: Text,
    pub canonical_service: Text,
    pub canonical_revision: Text,
    /// The workload's kind (`Deployment`, `StatefulSet`, …, `Pod`); not a label.
    pub kind: Option<&'static str>,
    /// Part of this cluster (its `*_cluster` is the node's cluster id), or unknown.
    pub known: bool,
    /// The hash of the fields above: a series lookup hashes this instead of every label.
    key: u64,
}

impl Hash for Peer {
    fn hash<H: Hasher>(&self, h: &mut H) {
        h.write_u64(self.key);
    }
}

impl Peer {
    /// A side nothing is known of (outside the mesh, or not found).
    pub fn unknown() -> Arc<Peer> {
        thread_local! {
            static UNKNOWN_PEER: Arc<Peer> = Arc::new(Peer {
                workload: UNKNOWN.into(),
                namespace: UNKNOWN.into(),
                app: UNKNOWN.into(),
                version: UNKNOWN.into(),
                canonical_service: UNKNOWN.into(),
                canonical_revision: UNKNOWN.into(),
                kind: None,
                known: false,
                key: 0,
            }.keyed());
        }
        UNKNOWN_PEER.with(Arc::clone)
    }

    /// A pod of this cluster, named as Istio names it (see [`workload_of`]).
    pub fn of_pod(pod: &Pod) -> Peer {
        let w = workload_of(pod);
        let text = |v: Option<String>| -> Text { v.as_deref().unwrap_or(UNKNOWN).into() };
        Peer {
            workload: w.name.into(),
            namespace: pod.namespace.as_str().into(),
            app: text(w.app),
            version: text(w.version),
            canonical_service: w.canonical_service.into(),
            canonical_revision: w.canonical_revision.into(),
            kind: Some(w.kind),
            known: true,
            key: 0,
        }
        .keyed()
    }

    fn keyed(mut self) -> Peer {
        self.key = fixed_hash((
            &self.workload,
            &self.namespace,
            &self.app,
            &self.version,
            &self.canonical_service,
            &self.canonical_revision,
            self.kind,
            self.known,
        ));
        self
    }
}

/// The Service a call was for: `destination_service` (its host), `_name`, `_namespace`. Made
/// by its constructors only (its hash is made once, as a [`Peer`]'s).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceLabels {
    pub host: Text,
    pub name: Text,
    pub namespace: Text,
    key: u64,
}

impl Hash for ServiceLabels {
    fn hash<H: Hasher>(&self, h: &mut H) {
        h.write_u64(self.key);
    }
}

impl ServiceLabels {
    pub fn unknown() -> Arc<ServiceLabels> {
        thread_local! {
            static UNKNOWN_SERVICE: Arc<ServiceLabels> =
                Arc::new(ServiceLabels::new(UNKNOWN, UNKNOWN, UNKNOWN));
        }
        UNKNOWN_SERVICE.with(Arc::clone)
    }

    /// A Kubernetes Service: host `name.namespace.svc.<domain>`.
    pub fn service(namespace: &str, name: &str) -> ServiceLabels {
        let host = format!("{name}.{namespace}.svc.{}", crate::config::CLUSTER_DOMAIN);
        ServiceLabels::new(&host, name, namespace)
    }

    /// A host of a ServiceEntry (name and host are the host, as Istio reports them).
    pub fn external(host: &str, namespace: &str) -> ServiceLabels {
        ServiceLabels::new(host, host, namespace)
    }

    fn new(host: &str, name: &str, namespace: &str) -> ServiceLabels {
        ServiceLabels {
            host: host.into(),
            name: name.into(),
            namespace: namespace.into(),
            key: fixed_hash((host, name, namespace)),
        }
    }
}

/// A hash of `parts` that is the same in every process (series keys only: never exposed).
fn fixed_hash(parts: impl Hash) -> u64 {
    foldhash::fast::FixedState::with_seed(0x5745_4654).hash_one(parts)
}

/// Who called whom, as both HTTP and TCP series are labelled.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CallLabels {
    pub reporter: Reporter,
    pub source: Arc<Peer>,
    pub source_principal: Option<Text>,
    pub destination: Arc<Peer>,
    pub destination_principal: Option<Text>,
    pub service: Arc<ServiceLabels>,
    pub security: Security,
}

/// `request_protocol` of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http,
    Grpc,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Grpc => "grpc",
        }
    }
}

/// One series of the HTTP family.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RequestLabels {
    pub call: CallLabels,
    pub protocol: Protocol,
    /// `0` when the client got no response.
    pub response_code: u16,
    /// gRPC calls only.
    pub grpc_status: Option<u16>,
    /// Envoy's response flags, `-` for none.
    pub flags: Text,
}

impl RequestLabels {
    /// The same labels, the texts compared by pointer first: a connection's requests label
    /// with its own texts (and the worker's shared flags), so the bytes are rarely looked at.
    fn same(&self, other: &RequestLabels) -> bool {
        let (a, b) = (&self.call, &other.call);
        self.response_code == other.response_code
            && self.protocol == other.protocol
            && self.grpc_status == other.grpc_status
            && (Arc::ptr_eq(&self.flags, &other.flags) || self.flags == other.flags)
            && a.reporter == b.reporter
            && a.security == b.security
            && a.source == b.source
            && a.destination == b.destination
            && a.service == b.service
            && same_text(&a.source_principal, &b.source_principal)
            && same_text(&a.destination_principal, &b.destination_principal)
    }
}

/// The series a connection's requests were last counted in, with their labels: looked up
/// again by comparing labels, without hashing them or taking the family's lock. A connection
/// mostly repeats one outcome per reporter; a few are kept (series are never removed, so a
/// kept one is always the family's own).
#[derive(Default)]
pub struct KeptSeries(parking_lot::Mutex<Vec<(RequestLabels, Arc<RequestSeries>)>>);

impl KeptSeries {
    /// How many are kept.
    const KEPT: usize = 4;
}

/// One series of the TCP family.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TcpLabels {
    pub call: CallLabels,
    pub flags: Text,
}

/// What one finished request adds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RequestSample {
    pub duration_ms: f64,
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// gRPC messages each way (0 for plain HTTP).
    pub request_messages: u64,
    pub response_messages: u64,
}

#[derive(Debug)]
struct RequestSeries {
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
    request_messages: Counter,
    response_messages: Counter,
}

impl Default for RequestSeries {
    fn default() -> Self {
        RequestSeries {
            requests: Counter::default(),
            duration: Histogram::new(BUCKETS),
            request_bytes: Histogram::new(BUCKETS),
            response_bytes: Histogram::new(BUCKETS),
            request_messages: Counter::default(),
            response_messages: Counter::default(),
        }
    }
}

#[derive(Debug, Default)]
struct TcpSeries {
    opened: Counter,
    closed: Counter,
    sent: Counter,
    received: Counter,
}

/// The label sets seen, and their series.
pub struct IstioMetrics {
    /// `source_cluster` / `destination_cluster` of peers in this cluster.
    cluster: Text,
    requests: RwLock<HashMap<RequestLabels, Arc<RequestSeries>, foldhash::fast::RandomState>>,
    tcp: RwLock<HashMap<TcpLabels, Arc<TcpSeries>, foldhash::fast::RandomState>>,
}

impl std::fmt::Debug for IstioMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IstioMetrics")
            .field("cluster", &self.cluster)
            .field("request_series", &self.requests.read().len())
            .field("tcp_series", &self.tcp.read().len())
            .finish()
    }
}

/// The series of `key` in `map`, made on first use (the common case takes the read lock only).
fn series<K: Hash + Eq + Clone, V: Default>(
    map: &RwLock<HashMap<K, Arc<V>, foldhash::fast::RandomState>>,
    key: &K,
) -> Arc<V> {
    if let Some(s) = map.read().get(key) {
        return s.clone();
    }
    map.write().entry(key.clone()).or_default().clone()
}

impl IstioMetrics {
    /// Metrics of a node in cluster `cluster` (Istio's cluster id, `Kubernetes` by default).
    pub fn new(cluster: &str) -> IstioMetrics {
        IstioMetrics {
            cluster: cluster.into(),
            requests: RwLock::default(),
            tcp: RwLock::default(),
        }
    }

    /// One finished request.
    pub fn request(&self, labels: &RequestLabels, sample: RequestSample) {
        Self::count(&series(&self.requests, labels), labels, sample);
    }

    /// One finished request of a connection whose series are kept in `kept`.
    pub fn request_kept(&self, kept: &KeptSeries, labels: RequestLabels, sample: RequestSample) {
        let mut kept = kept.0.lock();
        let s = match kept.iter().find(|(l, _)| l.same(&labels)) {
            Some((_, s)) => s.clone(),
            None => {
                let s = series(&self.requests, &labels);
                kept.truncate(KeptSeries::KEPT - 1);
                kept.insert(0, (labels.clone(), s.clone()));
                s
            }
        };
        drop(kept);
        Self::count(&s, &labels, sample);
    }

    fn count(s: &RequestSeries, labels: &RequestLabels, sample: RequestSample) {
        s.requests.inc();
        s.duration.observe(sample.duration_ms);
        s.request_bytes.observe(sample.request_bytes as f64);
        s.response_bytes.observe(sample.response_bytes as f64);
        if labels.protocol == Protocol::Grpc {
            s.request_messages.inc_by(sample.request_messages);
            s.response_messages.inc_by(sample.response_messages);
        }
    }

    /// A TCP connection opened.
    pub fn tcp_opened(&self, labels: &TcpLabels) {
        series(&self.tcp, labels).opened.inc();
    }

    /// A TCP connection closed, with the bytes it carried each way (`sent`: source to
    /// destination, Istio's "received during request").
    pub fn tcp_closed(&self, labels: &TcpLabels, sent: u64, received: u64) {
        let s = series(&self.tcp, labels);
        s.closed.inc();
        s.received.inc_by(sent);
        s.sent.inc_by(received);
    }

    /// How many series there are (HTTP, TCP).
    pub fn series_count(&self) -> (usize, usize) {
        (self.requests.read().len(), self.tcp.read().len())
    }

    /// Writes every family, in Istio's label order.
    pub fn encode(&self, enc: &mut DescriptorEncoder) -> std::fmt::Result {
        let requests: Vec<(RequestLabels, Arc<RequestSeries>)> = self
            .requests
            .read()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let tcp: Vec<(TcpLabels, Arc<TcpSeries>)> = self
            .tcp
            .read()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let request_labels: Vec<Vec<(&str, String)>> = requests
            .iter()
            .map(|(k, _)| self.request_label_set(k))
            .collect();
        type Pick = fn(&RequestSeries) -> &dyn EncodeMetric;
        let families: [(&str, &str, MetricType, Pick, bool); 6] = [
            (
                "istio_requests",
                "Requests handled, by who called whom and how it was answered",
                MetricType::Counter,
                |s| &s.requests,
                false,
            ),
            (
                "istio_request_duration_milliseconds",
                "Request durations, from the request's head to the end of its response",
                MetricType::Histogram,
                |s| &s.duration,
                false,
            ),
            (
                "istio_request_bytes",
                "Request body sizes",
                MetricType::Histogram,
                |s| &s.request_bytes,
                false,
            ),
            (
                "istio_response_bytes",
                "Response body sizes",
                MetricType::Histogram,
                |s| &s.response_bytes,
                false,
            ),
            (
                "istio_request_messages",
                "gRPC messages sent by clients",
                MetricType::Counter,
                |s| &s.request_messages,
                true,
            ),
            (
                "istio_response_messages",
                "gRPC messages sent by servers",
                MetricType::Counter,
                |s| &s.response_messages,
                true,
            ),
        ];
        for (name, help, metric_type, pick, grpc_only) in families {
            let mut family = enc.encode_descriptor(name, help, None, metric_type)?;
            for ((k, s), labels) in requests.iter().zip(&request_labels) {
                if grpc_only && k.protocol != Protocol::Grpc {
                    continue;
                }
                let labels: Vec<(&str, &str)> =
                    labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
                pick(s).encode(family.encode_family(&labels)?)?;
            }
        }
        let tcp_labels: Vec<Vec<(&str, String)>> =
            tcp.iter().map(|(k, _)| self.tcp_label_set(k)).collect();
        type TcpPick = fn(&TcpSeries) -> u64;
        let families: [(&str, &str, TcpPick); 4] = [
            (
                "istio_tcp_connections_opened",
                "TCP connections opened",
                |s| s.opened.get(),
            ),
            (
                "istio_tcp_connections_closed",
                "TCP connections closed",
                |s| s.closed.get(),
            ),
            (
                "istio_tcp_sent_bytes",
                "Bytes sent to the client (the response side) of TCP connections, counted when they close",
                |s| s.sent.get(),
            ),
            (
                "istio_tcp_received_bytes",
                "Bytes received from the client (the request side) of TCP connections, counted when they close",
                |s| s.received.get(),
            ),
        ];
        for (name, help, pick) in families {
            let mut family = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for ((_, s), labels) in tcp.iter().zip(&tcp_labels) {
                let labels: Vec<(&str, &str)> =
                    labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
                ConstCounter::new(pick(s)).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }

    fn call_label_set(&self, c: &CallLabels, protocol: &str) -> Vec<(&'static str, String)> {
        let cluster = |p: &Peer| {
            if p.known {
                self.cluster.to_string()
            } else {
                UNKNOWN.to_string()
            }
        };
        let principal = |p: &Option<Text>| p.as_deref().unwrap_or(UNKNOWN).to_string();
        let (s, d) = (&c.source, &c.destination);
        vec![
            ("reporter", c.reporter.as_str().into()),
            ("source_workload", s.workload.to_string()),
            ("source_canonical_service", s.canonical_service.to_string()),
            (
                "source_canonical_revision",
                s.canonical_revision.to_string(),
            ),
            ("source_workload_namespace", s.namespace.to_string()),
            ("source_principal", principal(&c.source_principal)),
            ("source_app", s.app.to_string()),
            ("source_version", s.version.to_string()),
            ("source_cluster", cluster(s)),
            ("destination_workload", d.workload.to_string()),
            ("destination_workload_namespace", d.namespace.to_string()),
            ("destination_principal", principal(&c.destination_principal)),
            ("destination_app", d.app.to_string()),
            ("destination_version", d.version.to_string()),
            ("destination_service", c.service.host.to_string()),
            (
                "destination_canonical_service",
                d.canonical_service.to_string(),
            ),
            (
                "destination_canonical_revision",
                d.canonical_revision.to_string(),
            ),
            ("destination_service_name", c.service.name.to_string()),
            (
                "destination_service_namespace",
                c.service.namespace.to_string(),
            ),
            ("destination_cluster", cluster(d)),
            ("request_protocol", protocol.into()),
        ]
    }

    fn request_label_set(&self, k: &RequestLabels) -> Vec<(&'static str, String)> {
        let mut l = self.call_label_set(&k.call, k.protocol.as_str());
        l.push(("response_code", k.response_code.to_string()));
        l.push((
            "grpc_response_status",
            k.grpc_status.map(|g| g.to_string()).unwrap_or_default(),
        ));
        l.push(("response_flags", k.flags.to_string()));
        l.push((
            "connection_security_policy",
            k.call.security.as_str().into(),
        ));
        l
    }

    fn tcp_label_set(&self, k: &TcpLabels) -> Vec<(&'static str, String)> {
        let mut l = self.call_label_set(&k.call, "tcp");
        l.push(("response_flags", k.flags.to_string()));
        l.push((
            "connection_security_policy",
            k.call.security.as_str().into(),
        ));
        l
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::registry::model::{Labels, Owner, QosClass};
    use prometheus_client::collector::Collector;
    use prometheus_client::registry::Registry;

    pub(crate) fn pod(ns: &str, name: &str, deployment: &str, labels: &[(&str, &str)]) -> Pod {
        Pod {
            namespace: ns.into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            node_name: Some("node-1".into()),
            ip: None,
            ips: Vec::new(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .chain([("pod-template-hash".to_string(), "5d8f9c7b6".to_string())])
                .collect::<Labels>(),
            service_account: "default".into(),
            ready: true,
            phase: Some("Running".into()),
            qos: QosClass::BestEffort,
            host_network: false,
            ports: Vec::new(),
            probe_ports: Vec::new(),
            owner: Some(Owner {
                kind: "ReplicaSet".into(),
                name: format!("{deployment}-5d8f9c7b6"),
                controller: true,
            }),
            generate_name: Some(format!("{deployment}-5d8f9c7b6-")),
        }
    }

    #[derive(Debug)]
    struct Families(Arc<IstioMetrics>);
    impl Collector for Families {
        fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
            self.0.encode(&mut enc)
        }
    }

    fn scrape(m: &Arc<IstioMetrics>) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Families(m.clone())));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        out
    }

    fn call(reporter: Reporter, mtls: bool) -> CallLabels {
        let client = pod(
            "front",
            "web-5d8f9c7b6-abcde",
            "web",
            &[("app", "web"), ("version", "v1")],
        );
        let server = pod(
            "back",
            "reviews-v2-5d8f9c7b6-xyz12",
            "reviews-v2",
            &[("app", "reviews"), ("version", "v2")],
        );
        CallLabels {
            reporter,
            source: Arc::new(Peer::of_pod(&client)),
            source_principal: Some("spiffe://cluster.local/ns/front/sa/default".into()),
            destination: Arc::new(Peer::of_pod(&server)),
            destination_principal: Some("spiffe://cluster.local/ns/back/sa/default".into()),
            service: Arc::new(ServiceLabels::service("back", "reviews")),
            security: Security::reported(reporter, mtls),
        }
    }

    #[test]
    fn equal_labels_hash_alike_and_any_label_tells_them_apart() {
        let hash = |v: &dyn Fn(&mut std::collections::hash_map::DefaultHasher)| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            v(&mut h);
            h.finish()
        };
        let a = Peer::of_pod(&pod("front", "web-1", "web", &[("app", "web")]));
        let same = Peer::of_pod(&pod("front", "web-2", "web", &[("app", "web")]));
        assert_eq!(a, same);
        assert_eq!(hash(&|h| a.hash(h)), hash(&|h| same.hash(h)));
        for other in [
            pod(
                "front",
                "web-1",
                "web",
                &[("app", "web"), ("version", "v2")],
            ),
            pod("back", "web-1", "web", &[("app", "web")]),
            pod("front", "web-1", "api", &[("app", "web")]),
        ] {
            let other = Peer::of_pod(&other);
            assert_ne!(a, other);
            assert_ne!(hash(&|h| a.hash(h)), hash(&|h| other.hash(h)));
        }
        assert_ne!(Peer::unknown().key, a.key);
        let s = ServiceLabels::service("back", "reviews");
        assert_eq!(s, ServiceLabels::service("back", "reviews"));
        assert_eq!(s.host.as_ref(), "reviews.back.svc.cluster.local");
        assert_ne!(s.key, ServiceLabels::service("back", "ratings").key);
        assert_ne!(
            s.key,
            ServiceLabels::external("reviews.back.svc.cluster.local", "back").key
        );
    }

    #[test]
    fn kept_series_count_where_the_family_does() {
        let m = Arc::new(IstioMetrics::new("Kubernetes"));
        let kept = KeptSeries::default();
        let labels = |code: u16, flags: &str| RequestLabels {
            call: call(Reporter::Source, true),
            protocol: Protocol::Http,
            response_code: code,
            grpc_status: None,
            flags: flags.into(),
        };
        let ok = labels(200, "-");
        for _ in 0..3 {
            m.request_kept(&kept, ok.clone(), RequestSample::default());
        }
        {
            let kept = kept.0.lock();
            assert_eq!(kept.len(), 1, "one outcome, one series kept");
            assert!(Arc::ptr_eq(&kept[0].1, &series(&m.requests, &ok)));
        }
        // Equal labels in texts of their own: the same series, kept or not.
        m.request_kept(&kept, labels(200, "-"), RequestSample::default());
        m.request(&labels(200, "-"), RequestSample::default());
        // Any label apart is a series apart, however many are kept.
        for (code, flags) in [
            (503, "UF"),
            (200, "URX"),
            (404, "NR"),
            (500, "-"),
            (503, "UF"),
        ] {
            m.request_kept(&kept, labels(code, flags), RequestSample::default());
        }
        m.request_kept(&kept, ok.clone(), RequestSample::default());
        assert_eq!(m.series_count().0, 5);
        let out = scrape(&m);
        let total = |code: &str, flags: &str| {
            let l = out
                .lines()
                .find(|l| {
                    l.starts_with("istio_requests_total{")
                        && l.contains(&format!("response_code=\"{code}\""))
                        && l.contains(&format!("response_flags=\"{flags}\""))
                })
                .unwrap_or_else(|| panic!("no series {code} {flags} in\n{out}"));
            l.rsplit(' ').next().unwrap().to_string()
        };
        assert_eq!(total("200", "-"), "6");
        assert_eq!(total("503", "UF"), "2");
        assert_eq!(total("200", "URX"), "1");
        assert_eq!(total("404", "NR"), "1");
        assert_eq!(total("500", "-"), "1");
        assert!(kept.0.lock().len() <= KeptSeries::KEPT);
    }

    #[test]
    fn a_request_is_one_series_with_istios_labels_in_istios_order() {
        let m = Arc::new(IstioMetrics::new("Kubernetes"));
        let labels = RequestLabels {
            call: call(Reporter::Destination, true),
            protocol: Protocol::Http,
            response_code: 200,
            grpc_status: None,
            flags: "-".into(),
        };
        let sample = RequestSample {
            duration_ms: 7.5,
            request_bytes: 0,
            response_bytes: 120,
            ..Default::default()
        };
        m.request(&labels, sample);
        m.request(&labels, sample);
        let out = scrape(&m);
        let set = r#"reporter="destination",source_workload="web",source_canonical_service="web",source_canonical_revision="v1",source_workload_namespace="front",source_principal="spiffe://cluster.local/ns/front/sa/default",source_app="web",source_version="v1",source_cluster="Kubernetes",destination_workload="reviews-v2",destination_workload_namespace="back",destination_principal="spiffe://cluster.local/ns/back/sa/default",destination_app="reviews",destination_version="v2",destination_service="reviews.back.svc.cluster.local",destination_canonical_service="reviews",destination_canonical_revision="v2",destination_service_name="reviews",destination_service_namespace="back",destination_cluster="Kubernetes",request_protocol="http",response_code="200",grpc_response_status="",response_flags="-",connection_security_policy="mutual_tls""#;
        for line in [
            format!("istio_requests_total{{{set}}} 2"),
            format!("istio_request_duration_milliseconds_bucket{{le=\"5.0\",{set}}} 0"),
            format!("istio_request_duration_milliseconds_bucket{{le=\"10.0\",{set}}} 2"),
            format!("istio_request_duration_milliseconds_count{{{set}}} 2"),
            format!("istio_request_duration_milliseconds_sum{{{set}}} 15.0"),
            format!("istio_response_bytes_sum{{{set}}} 240.0"),
            format!("istio_request_bytes_bucket{{le=\"0.5\",{set}}} 2"),
        ] {
            assert!(out.lines().any(|l| l == line), "missing {line}\nin\n{out}");
        }
        // Every bucket of Envoy's defaults, and +Inf.
        let buckets = out
            .lines()
            .filter(|l| l.starts_with("istio_request_duration_milliseconds_bucket"))
            .count();
        assert_eq!(buckets, BUCKETS.len() + 1);
        assert!(!out.contains("istio_request_messages_total{"), "gRPC only");
    }

    #[test]
    fn grpc_calls_count_messages_and_carry_their_status() {
        let m = Arc::new(IstioMetrics::new("Kubernetes"));
        let labels = RequestLabels {
            call: call(Reporter::Source, true),
            protocol: Protocol::Grpc,
            response_code: 200,
            grpc_status: Some(14),
            flags: "-".into(),
        };
        m.request(
            &labels,
            RequestSample {
                request_messages: 3,
                response_messages: 5,
                ..Default::default()
            },
        );
        let out = scrape(&m);
        let line = |name: &str| {
            out.lines()
                .find(|l| l.starts_with(&format!("{name}{{")))
                .unwrap_or_else(|| panic!("no {name} in {out}"))
                .to_string()
        };
        let requests = line("istio_requests_total");
        assert!(
            requests.contains(r#"request_protocol="grpc""#),
            "{requests}"
        );
        assert!(
            requests.contains(r#"grpc_response_status="14""#),
            "{requests}"
        );
        // A source cannot know how the server secured the call.
        assert!(
            requests.contains(r#"connection_security_policy="unknown""#),
            "{requests}"
        );
        assert!(line("istio_request_messages_total").ends_with(" 3"));
        assert!(line("istio_response_messages_total").ends_with(" 5"));
    }

    #[test]
    fn tcp_connections_count_opened_closed_and_bytes_each_way() {
        let m = Arc::new(IstioMetrics::new("east"));
        let labels = TcpLabels {
            call: CallLabels {
                destination: Peer::unknown(),
                destination_principal: None,
                service: ServiceLabels::unknown(),
                ..call(Reporter::Source, false)
            },
            flags: "-".into(),
        };
        m.tcp_opened(&labels);
        m.tcp_closed(&labels, 100, 2000);
        m.tcp_opened(&labels);
        let out = scrape(&m);
        let find = |name: &str| {
            out.lines()
                .find(|l| l.starts_with(&format!("{name}{{")))
                .unwrap_or_else(|| panic!("no {name} in {out}"))
                .to_string()
        };
        assert!(find("istio_tcp_connections_opened_total").ends_with("} 2"));
        assert!(find("istio_tcp_connections_closed_total").ends_with("} 1"));
        // Received: from the client (request side); sent: to it.
        assert!(find("istio_tcp_received_bytes_total").ends_with("} 100"));
        assert!(find("istio_tcp_sent_bytes_total").ends_with("} 2000"));
        let opened = find("istio_tcp_connections_opened_total");
        for label in [
            r#"source_cluster="east""#,
            r#"destination_workload="unknown""#,
            r#"destination_cluster="unknown""#,
            r#"destination_principal="unknown""#,
            r#"destination_service="unknown""#,
            r#"request_protocol="tcp""#,
            r#"response_flags="-""#,
        ] {
            assert!(opened.contains(label), "{label} in {opened}");
        }
        assert!(
            !opened.contains("response_code"),
            "TCP series have no response code"
        );
    }

    #[test]
    fn label_sets_are_bounded_by_who_calls_whom_not_by_requests() {
        let m = IstioMetrics::new("Kubernetes");
        for i in 0..10_000u32 {
            let labels = RequestLabels {
                call: call(Reporter::Source, true),
                protocol: Protocol::Http,
                response_code: if i % 10 == 0 { 503 } else { 200 },
                grpc_status: None,
                flags: if i % 10 == 0 { "UF".into() } else { "-".into() },
            };
            m.request(&labels, RequestSample::default());
        }
        assert_eq!(m.series_count(), (2, 0));
    }

    #[test]
    fn security_policy_is_the_destinations_to_tell() {
        assert_eq!(
            Security::reported(Reporter::Source, true).as_str(),
            "unknown"
        );
        assert_eq!(
            Security::reported(Reporter::Destination, true).as_str(),
            "mutual_tls"
        );
        assert_eq!(
            Security::reported(Reporter::Destination, false).as_str(),
            "none"
        );
    }
}
