//! Telemetry: what the node records about the traffic it handles, in one place.
//!
//! - [`record`]: one [`ConnectionRecord`] per connection, built when the connection is
//!   accepted, filled as the plan and the relay progress, emitted once (on `finish`, or on drop
//!   if nobody finished it): the flow and the counters come from it, never from anywhere else.
//! - [`flow_log`]: the flow log (bounded ring + live feed) behind `/flows` and `weft flows`.
//! - [`counters`]: the HBONE client and server counters, and the connections being relayed.
//! - [`istio`]: Istio's standard metrics (`istio_requests_total`, `istio_tcp_*`, …), kept
//!   per label set as records are emitted.
//! - [`access_log`]: one line per request and per connection, written off the data path.
//! - [`trace`]: W3C / B3 trace propagation, spans exported by OTLP.
//! - [`golden`]: rolling windows of each call's rate, success and latency, behind `weft stat`
//!   and `weft graph`.
//! - [`metrics`]: Prometheus `/metrics`, read from the above at scrape time.
//!
//! May import: `admin::api` (the record types), `registry` (pod and service names), `identity`
//! (SPIFFE ids), `relay` (byte counts), `config` (defaults), `limits` (what the limits refused).

pub mod access_log;
pub mod counters;
pub mod flow_log;
pub mod golden;
pub mod istio;
pub mod metrics;
pub mod names;
pub mod record;
pub mod trace;

pub use counters::{ClientCounters, ServerCounters};
pub use flow_log::FlowLog;
pub use record::{shared, ConnectionRecord, Names, Report, RequestRecord, RequestTemplate};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use access_log::AccessLog;
use istio::{IstioMetrics, Protocol, RequestLabels, RequestSample, TcpLabels};
use trace::Tracing;

use crate::admin::api::{Flow, Text, Verdict};
use crate::limits::Admission;

/// The node's telemetry sinks, shared by every path.
pub struct Telemetry {
    /// Shared by every flow this node records.
    node: Text,
    pub flows: FlowLog,
    /// HBONE client pool (outbound tunnels).
    pub hbone_client: ClientCounters,
    /// HBONE server (`:15008`).
    pub hbone_server: ServerCounters,
    /// Connections being relayed now.
    active: AtomicU64,
    /// Istio's standard metrics.
    pub istio: IstioMetrics,
    pub tracing: Tracing,
    pub access_log: AccessLog,
    /// Golden signals per caller and callee over the last minutes (`/stat`, `/graph`).
    pub golden: golden::Golden,
    /// Connection limits and what they refused.
    pub admission: Arc<Admission>,
}

impl Telemetry {
    /// Telemetry of node `node`, keeping up to `flow_capacity` flows.
    pub fn new(node: impl Into<String>, flow_capacity: usize) -> Telemetry {
        Telemetry {
            node: node.into().into(),
            flows: FlowLog::new(flow_capacity),
            hbone_client: ClientCounters::default(),
            hbone_server: ServerCounters::default(),
            active: AtomicU64::new(0),
            istio: IstioMetrics::new(crate::config::DEFAULT_CLUSTER_ID),
            tracing: Tracing::disabled(),
            access_log: AccessLog::off(),
            golden: golden::Golden::new(),
            admission: Arc::default(),
        }
    }

    /// Counts connections against `admission`'s limits.
    pub fn with_admission(mut self, admission: Admission) -> Telemetry {
        self.admission = Arc::new(admission);
        self
    }

    /// Labels peers of this cluster with `cluster` (Istio's cluster id).
    pub fn with_cluster(mut self, cluster: &str) -> Telemetry {
        self.istio = IstioMetrics::new(cluster);
        self
    }

    pub fn with_access_log(mut self, log: AccessLog) -> Telemetry {
        self.access_log = log;
        self
    }

    pub fn with_tracing(mut self, tracing: Tracing) -> Telemetry {
        self.tracing = tracing;
        self
    }

    /// A TCP connection's relay started: counted opened by each reporter.
    fn tcp_opened(&self, flow: &Flow, report: &Report) {
        for reporter in report.reporters() {
            let labels = TcpLabels {
                call: report.labels(reporter, flow),
                flags: tcp_flags(flow.verdict).into(),
            };
            self.istio.tcp_opened(&labels);
            let (src, dst) = sides(flow, report);
            self.golden.tcp_opened(
                reporter,
                &src,
                &dst,
                flow.destination.service.as_ref(),
                flow.mtls,
            );
        }
    }

    /// Emits a connection's record: flows, Istio's TCP metrics (HTTP connections are counted
    /// by their requests), the access log.
    fn connection(&self, mut flow: Flow, report: &Report) -> Arc<Flow> {
        flow.inbound = report.by_destination && !report.by_source;
        if flow.http.is_none() && flow.protocol.as_ref() != "http" && labelled(&flow) {
            let flags = tcp_flags(flow.verdict);
            for reporter in report.reporters() {
                let labels = TcpLabels {
                    call: report.labels(reporter, &flow),
                    flags: flags.into(),
                };
                let (src, dst) = sides(&flow, report);
                let service = flow.destination.service.as_ref();
                if !report.opened {
                    // Never relayed (refused, failed): opened and closed at once, as its flags say.
                    self.istio.tcp_opened(&labels);
                    self.golden
                        .tcp_opened(reporter, &src, &dst, service, flow.mtls);
                }
                self.istio
                    .tcp_closed(&labels, flow.bytes_sent, flow.bytes_received);
                self.golden.tcp_closed(
                    reporter,
                    &src,
                    &dst,
                    service,
                    flow.mtls,
                    flow.bytes_sent,
                    flow.bytes_received,
                );
            }
        }
        self.access_log.log(&flow);
        self.flows.record(flow)
    }

    /// Emits a request's record: flows, Istio's request metrics, the access log.
    fn request(
        &self,
        mut flow: Flow,
        report: &Report,
        protocol: Protocol,
        messages: (u64, u64),
        kept: &Kept,
    ) -> Arc<Flow> {
        flow.inbound = report.by_destination && !report.by_source;
        if let Some(http) = &flow.http {
            let sample = RequestSample {
                duration_ms: http.duration_ms,
                request_bytes: flow.bytes_sent,
                response_bytes: flow.bytes_received,
                request_messages: messages.0,
                response_messages: messages.1,
            };
            for reporter in report.reporters() {
                let labels = RequestLabels {
                    call: report.labels(reporter, &flow),
                    protocol,
                    response_code: http.status,
                    grpc_status: match protocol {
                        Protocol::Grpc => http.grpc_status,
                        Protocol::Http => None,
                    },
                    flags: http.response_flags.clone(),
                };
                self.istio.request_kept(&kept.series, labels, sample);
            }
            let (src, dst) = sides(&flow, report);
            let success = http.status != 0 && http.status < 500;
            for reporter in report.reporters() {
                self.golden.request_kept(
                    &kept.keys,
                    reporter,
                    &src,
                    &dst,
                    flow.destination.service.as_ref(),
                    flow.mtls,
                    success,
                    http.duration_ms,
                );
            }
        }
        self.access_log.log(&flow);
        self.flows.record(flow)
    }

    /// The node every record is attributed to.
    pub fn node(&self) -> &Text {
        &self.node
    }

    /// Connections being relayed now.
    pub fn active_connections(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("node", &self.node)
            .field("flows", &self.flows.len())
            .field("active", &self.active_connections())
            .finish_non_exhaustive()
    }
}

/// Envoy's response flags of a TCP connection that ended with `verdict` (ztunnel's `DENY` for
/// a connection refused by policy, which Envoy has no flag for).
pub fn tcp_flags(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Forwarded | Verdict::Responded => "-",
        Verdict::NoEndpoint => "UH",
        Verdict::ConnectFailed => "UF",
        Verdict::Denied => "DENY",
        Verdict::Malformed => "DPE",
        // Envoy's overload flag: the proxy itself had no room for the connection.
        Verdict::OverLimit => "OM",
        Verdict::Unidentified | Verdict::Unhandled => "NR",
    }
}

/// Whether a connection has the labels of a call: its caller is known. Connections the proxy
/// could not attribute (no redirect record, never reached it) are flows only.
fn labelled(flow: &Flow) -> bool {
    !matches!(flow.verdict, Verdict::Unidentified | Verdict::Unhandled)
}

/// Both sides of a call as the golden signals key them.
/// What one connection's requests were last counted under (Istio's series, the golden signals'
/// keys): found again by comparison, the labels not hashed again for every request.
#[derive(Default)]
pub struct Kept {
    series: istio::KeptSeries,
    keys: golden::KeptKeys,
}

fn sides(flow: &Flow, report: &Report) -> (golden::Side, golden::Side) {
    let side = |peer: Option<&Arc<istio::Peer>>, pod: &Option<crate::admin::api::Text>| {
        let peer = peer.filter(|p| p.known);
        golden::Side {
            namespace: peer.map(|p| p.namespace.clone()),
            workload: peer.map(|p| p.workload.clone()),
            kind: peer.and_then(|p| p.kind),
            pod: pod.clone(),
        }
    };
    (
        side(report.source.as_ref(), &flow.source.pod),
        side(report.destination.as_ref(), &flow.destination.pod),
    )
}
