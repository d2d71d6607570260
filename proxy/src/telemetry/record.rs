//! One record per connection: the only place a [`Flow`] is built.
//!
//! A [`ConnectionRecord`] is created when a connection is accepted (or, for a redirect that
//! never reached the proxy, at the time the kernel reported it), filled as the path learns who
//! called whom and what it decided, counted as active while it relays, and emitted exactly once:
//! by [`ConnectionRecord::finish`], or by `Drop` when the task handling it ended without
//! finishing (then with an error saying so). Emitting stores the flow in the flow log, which
//! keeps the totals `/status` and `/metrics` report.

use std::fmt::Display;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Instant, SystemTime};

use time::OffsetDateTime;
use tracing::debug;

use super::counters::Held;
use super::istio::{CallLabels, Peer, Protocol, Reporter, Security, ServiceLabels};
use super::names;
use super::trace::{SpanEnd, SpanKind, SpanStart};
use super::{Kept, Telemetry};
use crate::admin::api::{Flow, FlowDestination, HttpFlow, Text, Verdict};
use crate::identity::SpiffeId;
use crate::registry::{Pod, Service};
use crate::relay::Relayed;

/// The record of one connection, from accept to close.
pub struct ConnectionRecord {
    telemetry: Arc<Telemetry>,
    flow: Flow,
    /// `None` for records of connections the proxy never held (their duration is 0).
    started: Option<Instant>,
    /// A relay started: what a record dropped unfinished was doing.
    relaying: bool,
    emitted: bool,
    report: Report,
}

/// Who reports a call, and the labels of both its sides (Istio's standard metrics, the golden
/// signals): made once per connection, shared by the records of its requests.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// This node is the caller's (`reporter="source"`).
    pub by_source: bool,
    /// This node is the callee's (`reporter="destination"`): inbound tunnels.
    pub by_destination: bool,
    /// A connection this node delivers to a pod it hosts: it reports as the destination too
    /// (requests of an HTTP connection each decide this for themselves).
    pub delivered_here: bool,
    pub source: Option<Arc<Peer>>,
    pub destination: Option<Arc<Peer>>,
    pub service: Option<Arc<ServiceLabels>>,
    /// The TCP connection was counted opened (when its relay started).
    pub opened: bool,
}

impl Report {
    /// The reporters of this call, in order.
    pub fn reporters(&self) -> impl Iterator<Item = Reporter> {
        let source = self.by_source.then_some(Reporter::Source);
        let destination =
            (self.by_destination || self.delivered_here).then_some(Reporter::Destination);
        source.into_iter().chain(destination)
    }

    /// The labels `reporter` gives the call `flow` describes.
    pub fn labels(&self, reporter: Reporter, flow: &Flow) -> CallLabels {
        CallLabels {
            reporter,
            source: self.source.clone().unwrap_or_else(Peer::unknown),
            source_principal: flow.source.identity.clone(),
            destination: self.destination.clone().unwrap_or_else(Peer::unknown),
            destination_principal: flow.destination.identity.clone(),
            service: self.service.clone().unwrap_or_else(ServiceLabels::unknown),
            security: Security::reported(reporter, flow.mtls),
        }
    }
}

impl ConnectionRecord {
    /// A connection accepted now.
    pub fn accepted(telemetry: &Arc<Telemetry>) -> ConnectionRecord {
        let mut r = ConnectionRecord::at(telemetry, SystemTime::now());
        r.started = Some(Instant::now());
        r
    }

    /// A connection the proxy never held, seen at `time` (a redirect reported by the kernel).
    pub fn at(telemetry: &Arc<Telemetry>, time: SystemTime) -> ConnectionRecord {
        ConnectionRecord {
            telemetry: telemetry.clone(),
            flow: Flow {
                time: OffsetDateTime::from(time),
                node: telemetry.node().clone(),
                ..Flow::default()
            },
            started: None,
            relaying: false,
            emitted: false,
            report: Report::default(),
        }
    }

    /// Reported as seen by `reporter`'s proxy (this node is the caller's, or the callee's).
    pub fn reporter(&mut self, reporter: Reporter) -> &mut Self {
        match reporter {
            Reporter::Source => self.report.by_source = true,
            Reporter::Destination => self.report.by_destination = true,
        }
        self
    }

    /// The address the connection came from.
    pub fn source_ip(&mut self, ip: IpAddr) -> &mut Self {
        Arc::make_mut(&mut self.flow.source).ip = Some(ip);
        self
    }

    /// The calling pod (its address too, when none was seen on the wire).
    pub fn source_pod(&mut self, pod: &Arc<Pod>) -> &mut Self {
        let names = names::pod(pod);
        let s = Arc::make_mut(&mut self.flow.source);
        s.namespace = Some(names.namespace.clone());
        s.pod = Some(names.name.clone());
        if s.ip.is_none() {
            s.ip = pod.ip;
        }
        s.workload = Some(names.peer.workload.clone());
        self.report.source = Some(names.peer.clone());
        self
    }

    /// The calling workload's identity (and its namespace, when no pod is known).
    pub fn source_identity(&mut self, id: &SpiffeId) -> &mut Self {
        let s = Arc::make_mut(&mut self.flow.source);
        s.identity = Some(id.uri().into());
        if s.namespace.is_none() {
            s.namespace = Some(id.namespace().into());
        }
        self
    }

    /// Where the client wanted to go, before redirection.
    pub fn original_destination(&mut self, dst: SocketAddr) -> &mut Self {
        self.flow.original_destination = names::address(dst);
        self
    }

    /// The pod cgroup the connection was attributed to.
    pub fn cgroup(&mut self, id: u64) -> &mut Self {
        self.flow.cgroup_id = Some(id);
        self
    }

    /// The Service whose VIP was called.
    pub fn service(&mut self, service: &Arc<Service>) -> &mut Self {
        let names = names::service(service);
        let d = Arc::make_mut(&mut self.flow.destination);
        d.service = names.name.clone();
        d.namespace = names.namespace.clone();
        self.report.service = names.service.clone();
        self
    }

    /// The destination pod.
    pub fn destination_pod(&mut self, pod: &Arc<Pod>) -> &mut Self {
        let names = names::pod(pod);
        let d = Arc::make_mut(&mut self.flow.destination);
        d.namespace = Some(names.namespace.clone());
        d.pod = Some(names.name.clone());
        d.workload = Some(names.peer.workload.clone());
        self.report.destination = Some(names.peer.clone());
        self
    }

    /// Delivered to a pod this node hosts: reported by this node as the destination too.
    pub fn delivered_here(&mut self) -> &mut Self {
        self.report.delivered_here = true;
        self
    }

    /// The address the proxy connects (or connected) to.
    pub fn destination_address(&mut self, addr: SocketAddr) -> &mut Self {
        Arc::make_mut(&mut self.flow.destination).address = Some(names::address(addr));
        self
    }

    /// The destination workload's identity.
    pub fn destination_identity(&mut self, id: &SpiffeId) -> &mut Self {
        Arc::make_mut(&mut self.flow.destination).identity = Some(id.uri().into());
        self
    }

    /// Carried between nodes in mutual TLS.
    pub fn mtls(&mut self) -> &mut Self {
        self.flow.mtls = true;
        self
    }

    /// The connection's protocol (`tcp` unless said otherwise).
    pub fn protocol(&mut self, protocol: &str) -> &mut Self {
        self.flow.protocol = protocol.into();
        self
    }

    /// The AuthorizationPolicy (`namespace/name`) that decided.
    pub fn policy(&mut self, policy: impl Into<String>) -> &mut Self {
        self.flow.policy = Some(policy.into().into_boxed_str());
        self
    }

    /// Runs `relay`, counted among the active connections meanwhile, and keeps its byte counts
    /// and error. Cancellation-safe: the active count is given back on drop.
    ///
    /// A future of its own rather than an `async fn`: an `async fn` would hold `relay` twice
    /// (its argument, then the awaited value), and the relay is most of a connection's task.
    pub fn relay<F: Future<Output = Relayed>>(&mut self, relay: F) -> Relaying<'_, F> {
        self.relaying = true;
        self.report.opened = true;
        self.telemetry.tcp_opened(&self.flow, &self.report);
        Relaying {
            relay,
            flow: &mut self.flow,
            active: Some(Held::up(&self.telemetry.active)),
        }
    }

    /// Emits the record with `verdict` and, for anything that did not end cleanly, `error`.
    /// Returns the flow as stored.
    pub fn finish(mut self, verdict: Verdict, error: Option<impl Display>) -> Arc<Flow> {
        self.flow.verdict = verdict;
        if let Some(e) = error {
            self.flow.error = Some(e.to_string().into_boxed_str());
        }
        self.emit()
    }

    /// What every request of this (HTTP) connection starts from: who calls, and what was
    /// called. See [`RequestRecord`].
    pub fn requests(&self) -> RequestTemplate {
        let mut flow = self.flow.clone();
        flow.protocol = "http".into();
        RequestTemplate {
            telemetry: self.telemetry.clone(),
            flow: Arc::new(flow),
            destinations: Arc::default(),
            kept: Arc::default(),
            report: Arc::new(Report {
                delivered_here: false,
                ..self.report.clone()
            }),
        }
    }

    /// Ends an HTTP connection whose requests were each recorded on their own: nothing more is
    /// emitted, unless no request was (then the connection itself is the flow, with `error`).
    pub fn finish_http(mut self, requests: u64, error: Option<impl Display>) {
        if requests > 0 {
            self.emitted = true;
            return;
        }
        self.flow.protocol = "http".into();
        let verdict = if self.relaying {
            Verdict::Forwarded
        } else {
            Verdict::ConnectFailed
        };
        self.finish(verdict, error);
    }

    /// Marks the connection as being served (for the active gauge and the verdict on drop)
    /// while `serving` runs; a future of its own for the reason [`ConnectionRecord::relay`] is.
    pub fn serve<F: Future>(&mut self, serving: F) -> Serving<'_, F> {
        self.relaying = true;
        Serving {
            serving,
            _active: Held::up(&self.telemetry.active),
        }
    }

    fn emit(&mut self) -> Arc<Flow> {
        self.emitted = true;
        let mut flow = std::mem::take(&mut self.flow);
        if let Some(started) = self.started {
            // Microseconds are what a flow's duration can mean; more digits are noise.
            let us = started.elapsed().as_micros() as f64;
            flow.duration_ms = us / 1000.0;
        }
        debug!(
            source = %flow.source.pod.as_deref().unwrap_or("?"),
            original_destination = %flow.original_destination,
            destination = %flow.destination.address.as_deref().unwrap_or("-"),
            verdict = %flow.verdict,
            sent = flow.bytes_sent,
            received = flow.bytes_received,
            error = flow.error.as_deref().unwrap_or(""),
            "flow"
        );
        self.telemetry.connection(flow, &self.report)
    }
}

pin_project_lite::pin_project! {
    /// [`ConnectionRecord::relay`]: the relay, then its counts into the record.
    #[must_use = "futures do nothing unless polled"]
    pub struct Relaying<'a, F> {
        #[pin]
        relay: F,
        flow: &'a mut Flow,
        active: Option<Held<'a>>,
    }
}

impl<F: Future<Output = Relayed>> Future for Relaying<'_, F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        let relayed = ready!(this.relay.poll(cx));
        this.active.take();
        this.flow.bytes_sent = relayed.sent;
        this.flow.bytes_received = relayed.received;
        if let Some(e) = relayed.error {
            this.flow.error = Some(e.into_boxed_str());
        }
        Poll::Ready(())
    }
}

pin_project_lite::pin_project! {
    /// [`ConnectionRecord::serve`]: what serves the connection, counted active meanwhile.
    #[must_use = "futures do nothing unless polled"]
    pub struct Serving<'a, F> {
        #[pin]
        serving: F,
        _active: Held<'a>,
    }
}

impl<F: Future> Future for Serving<'_, F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.project().serving.poll(cx)
    }
}

/// What a flow calls a Service or an endpoint, made once and shared by the records of every
/// request sent there (a record then copies no text).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Names {
    /// `ip:port` (endpoints).
    pub address: Option<Text>,
    pub namespace: Option<Text>,
    /// The Service's `namespace/name`, or the endpoint's pod.
    pub name: Option<Text>,
    /// The endpoint's workload, as Istio's labels name it.
    pub peer: Option<Arc<Peer>>,
    /// The Service, as Istio's labels name it.
    pub service: Option<Arc<ServiceLabels>>,
}

impl Names {
    pub fn service(service: &Service) -> Names {
        Names {
            address: None,
            namespace: Some(service.namespace.as_str().into()),
            name: Some(format!("{}/{}", service.namespace, service.name).into()),
            peer: None,
            service: Some(Arc::new(ServiceLabels::service(
                &service.namespace,
                &service.name,
            ))),
        }
    }

    pub fn endpoint(addr: SocketAddr, pod: Option<&Arc<Pod>>) -> Names {
        let pod = pod.map(names::pod);
        Names {
            address: Some(names::address(addr)),
            namespace: pod.as_ref().map(|p| p.namespace.clone()),
            name: pod.as_ref().map(|p| p.name.clone()),
            peer: pod.map(|p| p.peer.clone()),
            service: None,
        }
    }
}

/// `flags` with `flag` where Envoy lists it: before the first of `before` (the flags Envoy
/// lists after it), else last.
fn with_flag(flags: &str, flag: &str, before: &[&str]) -> Text {
    if flags.is_empty() || flags == "-" {
        return shared(flag);
    }
    let mut all: Vec<&str> = flags.split(',').collect();
    let at = all
        .iter()
        .position(|f| before.contains(f))
        .unwrap_or(all.len());
    all.insert(at, flag);
    all.join(",").into()
}

/// The text of the values most requests share (HTTP versions, methods, response flags): one
/// allocation each per thread, made once; anything else is copied.
pub fn shared(s: &str) -> Text {
    const COMMON: [&str; 16] = [
        "HTTP/1.1", "HTTP/2", "GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS",
        "CONNECT", "-", "NR", "UH", "UF", "DC", "UT",
    ];
    thread_local! {
        static TEXT: [Text; 16] = COMMON.map(Text::from);
    }
    match COMMON.iter().position(|c| *c == s) {
        Some(i) => TEXT.with(|t| t[i].clone()),
        None => s.into(),
    }
}

/// The part of a connection's flow every request of it shares.
#[derive(Clone)]
pub struct RequestTemplate {
    telemetry: Arc<Telemetry>,
    flow: Arc<Flow>,
    report: Arc<Report>,
    destinations: Arc<Destinations>,
    kept: Arc<Kept>,
}

/// The last few different destinations a connection's requests went to, the newest first:
/// the flows of requests sent to the same place share one, so that a flow the log keeps holds
/// a pointer to it instead of a copy (a connection's requests mostly go to one place, or to a
/// few).
#[derive(Default)]
struct Destinations(parking_lot::Mutex<Vec<Arc<FlowDestination>>>);

impl Destinations {
    /// How many are kept.
    const KEPT: usize = 4;

    /// The kept one equal to `d`, else `d`, kept from now on.
    fn shared(&self, d: FlowDestination) -> Arc<FlowDestination> {
        let mut kept = self.0.lock();
        if let Some(same) = kept.iter().find(|k| ***k == d) {
            return same.clone();
        }
        let d = Arc::new(d);
        kept.truncate(Self::KEPT - 1);
        kept.insert(0, d.clone());
        d
    }
}

impl RequestTemplate {
    /// A record for a request whose head just arrived.
    pub fn start(&self, http: HttpFlow) -> RequestRecord {
        let mut flow = (*self.flow).clone();
        flow.time = OffsetDateTime::now_utc();
        flow.http = Some(http);
        // Written into its allocation, not made and then copied there.
        RequestRecord(Box::write(
            Box::new_uninit(),
            Requested {
                telemetry: self.telemetry.clone(),
                flow,
                report: self.report.clone(),
                destinations: self.destinations.clone(),
                kept: self.kept.clone(),
                to: None,
                destination: None,
                service: None,
                delivered_here: false,
                grpc: false,
                messages: (0, 0),
                spans: Vec::new(),
                started: Instant::now(),
                emitted: false,
                delay_injected: false,
                retries_exhausted: false,
            },
        ))
    }
}

/// One record per HTTP request: a flow whose `http` says what was asked and answered, emitted
/// once, by [`RequestRecord::finish`] or on drop (the client went away before the answer).
///
/// Boxed: a request's record goes with it through routing, each attempt and the response's
/// body, and a pointer moves where half a kilobyte would be copied at every step (and held
/// twice in the futures that take it).
pub struct RequestRecord(Box<Requested>);

impl std::ops::Deref for RequestRecord {
    type Target = Requested;

    fn deref(&self) -> &Requested {
        &self.0
    }
}

impl std::ops::DerefMut for RequestRecord {
    fn deref_mut(&mut self) -> &mut Requested {
        &mut self.0
    }
}

/// What a [`RequestRecord`] holds.
pub struct Requested {
    telemetry: Arc<Telemetry>,
    flow: Flow,
    /// The connection's report; the destination and Service this request went to replace
    /// the connection's.
    report: Arc<Report>,
    /// Where the connection's requests went, for this one's flow to share.
    destinations: Arc<Destinations>,
    /// What the connection's requests were counted under.
    kept: Arc<Kept>,
    /// Where this request went, once it differs from the connection's destination (the
    /// flow's until then).
    to: Option<FlowDestination>,
    destination: Option<Arc<Peer>>,
    service: Option<Arc<ServiceLabels>>,
    /// This node delivered it to a pod it hosts: it reports as the destination too.
    delivered_here: bool,
    /// A gRPC call (`content-type: application/grpc…`).
    grpc: bool,
    /// gRPC messages each way.
    messages: (u64, u64),
    /// Sampled spans of this request at this node: the client's, and (a call to a pod of this
    /// node, or one that came in a tunnel) the server's.
    spans: Vec<SpanStart>,
    started: Instant,
    emitted: bool,
    /// A fault delay held the request: Envoy's `DI`, joined to whatever flags it ends with.
    delay_injected: bool,
    /// It was retried as often as its policy allows and still failed: `URX`.
    retries_exhausted: bool,
}

impl RequestRecord {
    /// The request was retried as often as its policy allows and its last attempt failed too.
    pub fn retries_exhausted(&mut self) -> &mut Self {
        self.retries_exhausted = true;
        self
    }

    /// Why the request ended as it did, when no error says so (an error given at the finish
    /// replaces it).
    pub fn note(&mut self, why: &str) -> &mut Self {
        self.flow.error = Some(why.into());
        self
    }

    /// A rule's fault delay held the request before it went on.
    pub fn delay_injected(&mut self) -> &mut Self {
        self.delay_injected = true;
        self
    }

    /// The request's method.
    pub fn method(&self) -> &str {
        self.flow.http.as_ref().map(|h| &*h.method).unwrap_or("")
    }

    fn http(&mut self) -> &mut HttpFlow {
        self.flow.http.get_or_insert_with(HttpFlow::default)
    }

    /// Where this request went, to change (see [`RequestRecord::to`]).
    fn to(&mut self) -> &mut FlowDestination {
        let r = &mut *self.0;
        r.to.get_or_insert_with(|| (*r.flow.destination).clone())
    }

    /// The routing rule that matched.
    pub fn route(&mut self, route: &Text) -> &mut Self {
        self.http().route = Some(route.clone());
        self
    }

    /// From sending the request upstream to its response's head.
    pub fn upstream_service_time(&mut self, took: std::time::Duration) -> &mut Self {
        self.http().upstream_service_time_ms = Some(took.as_micros() as f64 / 1000.0);
        self
    }

    /// The Service the request was sent to (after routing, it may differ from the one called).
    pub fn service(&mut self, service: &Names) -> &mut Self {
        let d = self.to();
        d.service = service.name.clone();
        d.namespace = service.namespace.clone();
        self.service = service.service.clone();
        self
    }

    /// The request was delivered to a pod of this node (this node reports as its destination
    /// too), or not (after a retry elsewhere).
    pub fn delivered_here(&mut self, here: bool) -> &mut Self {
        self.delivered_here = here;
        self
    }

    /// A gRPC call.
    pub fn grpc(&mut self) -> &mut Self {
        self.grpc = true;
        self
    }

    /// gRPC messages sent by the client and by the server.
    pub fn messages(&mut self, request: u64, response: u64) -> &mut Self {
        self.messages = (request, response);
        self
    }

    /// The gRPC status the call ended with.
    pub fn grpc_status(&mut self, status: u16) -> &mut Self {
        self.http().grpc_status = Some(status);
        self
    }

    /// Whether the request is gRPC.
    pub fn is_grpc(&self) -> bool {
        self.grpc
    }

    /// Starts this node's span of `kind` for the request whose headers are `headers` (when
    /// tracing samples it), and passes the trace on in them. See [`super::trace::Tracing::start`].
    pub fn trace(&mut self, headers: &mut http::HeaderMap, kind: SpanKind) -> &mut Self {
        if let Some(span) = self.telemetry.tracing.start(headers, kind) {
            self.spans.push(span);
        }
        self
    }

    /// A client span is out and no server span yet: what a delivery on this node should add.
    pub fn wants_server_span(&self) -> bool {
        !self.spans.is_empty() && self.spans.iter().all(|s| s.kind == SpanKind::Client)
    }

    /// An upstream attempt to `endpoint` (with `identity`, over HBONE when `mtls`).
    pub fn upstream(&mut self, endpoint: &Names, identity: Option<Text>, mtls: bool) -> &mut Self {
        let d = self.to();
        d.address = endpoint.address.clone();
        if endpoint.name.is_some() {
            d.namespace = endpoint.namespace.clone();
            d.pod = endpoint.name.clone();
        }
        d.workload = endpoint.peer.as_ref().map(|p| p.workload.clone());
        d.identity = identity;
        self.destination = endpoint.peer.clone();
        self.flow.mtls = mtls;
        let h = self.http();
        h.upstream = endpoint.address.clone();
        h.attempts += 1;
        self
    }

    pub fn policy(&mut self, policy: impl Into<String>) -> &mut Self {
        self.flow.policy = Some(policy.into().into_boxed_str());
        self
    }

    /// Bytes of the request and response bodies.
    pub fn bytes(&mut self, sent: u64, received: u64) -> &mut Self {
        self.flow.bytes_sent = sent;
        self.flow.bytes_received = received;
        self
    }

    /// Emits the request: its verdict, the status the client got, Envoy's response flags
    /// (`-` for none) and what went wrong.
    pub fn finish(
        mut self,
        verdict: Verdict,
        status: u16,
        flags: &str,
        error: Option<impl Display>,
    ) -> Arc<Flow> {
        self.flow.verdict = verdict;
        if let Some(e) = error {
            self.flow.error = Some(e.to_string().into_boxed_str());
        }
        let h = self.http();
        h.status = status;
        h.response_flags = shared(flags);
        self.emit()
    }

    fn emit(&mut self) -> Arc<Flow> {
        self.emitted = true;
        let us = self.started.elapsed().as_micros() as f64;
        let mut flow = std::mem::take(&mut self.flow);
        flow.duration_ms = us / 1000.0;
        if let Some(to) = self.to.take() {
            if to != *flow.destination {
                flow.destination = self.destinations.shared(to);
            }
        }
        if let Some(h) = &mut flow.http {
            h.duration_ms = us / 1000.0;
            if self.retries_exhausted {
                h.response_flags =
                    with_flag(&h.response_flags, "URX", &["NR", "DI", "FI", "DC", "DPE"]);
            }
            if self.delay_injected {
                h.response_flags = with_flag(&h.response_flags, "DI", &["FI", "DC", "DPE"]);
            }
        }
        debug!(
            source = %flow.source.pod.as_deref().unwrap_or("?"),
            method = %flow.http.as_ref().map(|h| &*h.method).unwrap_or(""),
            path = %flow.http.as_ref().map_or("", |h| h.texts.get().path),
            status = flow.http.as_ref().map(|h| h.status).unwrap_or(0),
            verdict = %flow.verdict,
            "request"
        );
        let mut report = (*self.report).clone();
        if let Some(d) = self.destination.take() {
            report.destination = Some(d);
        }
        if let Some(s) = self.service.take() {
            report.service = Some(s);
        }
        report.delivered_here = self.delivered_here;
        let protocol = if self.grpc {
            Protocol::Grpc
        } else {
            Protocol::Http
        };
        for span in std::mem::take(&mut self.spans) {
            self.finish_span(span, &flow, &report);
        }
        self.telemetry
            .request(flow, &report, protocol, self.messages, &self.kept)
    }
}

impl RequestRecord {
    /// Ends `span` with what the request's flow says, named as Istio's proxies name theirs.
    fn finish_span(&self, span: SpanStart, flow: &Flow, report: &Report) {
        let Some(h) = &flow.http else {
            return;
        };
        let texts = h.texts.get();
        let port = |addr: &str| addr.rsplit_once(':').map_or("", |(_, p)| p).to_string();
        let (peer, port, cluster_prefix) = match span.kind {
            SpanKind::Client => (
                report.source.as_deref(),
                port(&flow.original_destination),
                "outbound",
            ),
            SpanKind::Server => (
                report.destination.as_deref(),
                port(flow.destination.address.as_deref().unwrap_or("")),
                "inbound",
            ),
        };
        let host = match &report.service {
            Some(s) => s.host.to_string(),
            None => texts
                .authority
                .rsplit_once(':')
                .map_or(texts.authority, |(host, _)| host)
                .to_string(),
        };
        let service_name = match peer {
            Some(p) if p.known => format!("{}.{}", p.canonical_service, p.namespace),
            _ => super::istio::UNKNOWN.to_string(),
        };
        let upstream_cluster = match span.kind {
            SpanKind::Client => format!("{cluster_prefix}|{port}||{host}"),
            SpanKind::Server => format!("{cluster_prefix}|{port}||"),
        };
        let peer_address = match span.kind {
            SpanKind::Client => flow
                .destination
                .address
                .as_deref()
                .unwrap_or("")
                .to_string(),
            SpanKind::Server => flow.source.ip.map(|ip| ip.to_string()).unwrap_or_default(),
        };
        let name = format!("{host}:{port}/*");
        let url = format!("http://{}{}", texts.authority, texts.path);
        self.telemetry.tracing.finish(
            span,
            SpanEnd {
                name: &name,
                service_name: &service_name,
                method: &h.method,
                url: &url,
                status_code: h.status,
                upstream_cluster: &upstream_cluster,
                peer_address: &peer_address,
                response_flags: &h.response_flags,
                node_id: "",
                request_id: texts.request_id,
                protocol: &h.protocol,
                grpc_status: h.grpc_status,
                error: h.status == 0 || h.status >= 500 || h.grpc_status.is_some_and(|g| g != 0),
            },
        );
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        if !self.emitted {
            let h = self.http();
            if h.response_flags.is_empty() {
                // Envoy's DC: the downstream connection ended before the response did.
                h.response_flags = shared("DC");
            }
            self.flow.error = Some("the client went away before the response ended".into());
            self.emit();
        }
    }
}

impl Drop for ConnectionRecord {
    /// A record nobody finished: the task handling the connection ended early (it panicked, or
    /// was cancelled). What it relayed is lost with the relay; what it was doing is kept.
    fn drop(&mut self) {
        if !self.emitted {
            self.flow.verdict = if self.relaying {
                Verdict::Forwarded
            } else {
                Verdict::ConnectFailed
            };
            self.flow.error = Some("the proxy stopped handling the connection".into());
            self.emit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::api::FlowFilter;
    use crate::telemetry::istio::Reporter;

    fn telemetry() -> Arc<Telemetry> {
        Arc::new(Telemetry::new("node-1", 100))
    }

    #[test]
    fn a_request_record_moves_as_a_pointer() {
        // It goes by value through routing, every attempt and the response body, and is held
        // in the futures that take it: half a kilobyte there would be copied at every step.
        assert_eq!(
            std::mem::size_of::<RequestRecord>(),
            std::mem::size_of::<usize>()
        );
    }

    #[test]
    fn finish_emits_once_with_what_was_filled_in() {
        let t = telemetry();
        let mut r = ConnectionRecord::accepted(&t);
        r.source_ip("10.244.1.2".parse().unwrap())
            .original_destination("10.96.0.10:80".parse().unwrap())
            .cgroup(42)
            .destination_address("10.244.1.3:8080".parse().unwrap())
            .policy("back/deny");
        let flow = r.finish(Verdict::Denied, Some("denied"));
        assert_eq!(&*flow.node, "node-1");
        assert_eq!(flow.verdict, Verdict::Denied);
        assert_eq!(flow.error.as_deref(), Some("denied"));
        assert_eq!(flow.policy.as_deref(), Some("back/deny"));
        assert_eq!(flow.cgroup_id, Some(42));
        assert_eq!(flow.destination.address.as_deref(), Some("10.244.1.3:8080"));
        assert_eq!(t.flows.recent(&FlowFilter::default()).len(), 1);
        assert_eq!(t.flows.totals()[&Verdict::Denied], 1);
    }

    #[test]
    fn requests_sent_to_the_same_place_share_its_record() {
        let t = telemetry();
        let mut conn = ConnectionRecord::accepted(&t);
        conn.source_ip("10.244.1.2".parse().unwrap())
            .destination_address("10.96.0.10:80".parse().unwrap());
        let requests = conn.requests();
        let service = Names {
            namespace: Some("back".into()),
            name: Some("back/web".into()),
            ..Names::default()
        };
        let endpoint = |ip: &str| Names::endpoint(ip.parse().unwrap(), None);
        let sent = |to: Option<&Names>| {
            let mut r = requests.start(HttpFlow::default());
            if let Some(to) = to {
                r.service(&service).upstream(to, None, false);
            }
            r.finish(Verdict::Forwarded, 200, "-", None::<&str>)
        };
        let (a, b) = (endpoint("10.244.2.1:8080"), endpoint("10.244.2.2:8080"));
        let (one, two, other, three) = (
            sent(Some(&a)),
            sent(Some(&a)),
            sent(Some(&b)),
            sent(Some(&a)),
        );
        assert_eq!(one.destination.address.as_deref(), Some("10.244.2.1:8080"));
        assert_eq!(one.destination.service.as_deref(), Some("back/web"));
        assert!(Arc::ptr_eq(&one.destination, &two.destination));
        assert!(Arc::ptr_eq(&one.destination, &three.destination));
        assert_eq!(
            other.destination.address.as_deref(),
            Some("10.244.2.2:8080")
        );
        assert!(!Arc::ptr_eq(&one.destination, &other.destination));
        // Every request shares the connection's source; one that went nowhere else, its
        // destination too.
        assert!(Arc::ptr_eq(&one.source, &other.source));
        let answered_here = sent(None);
        assert_eq!(
            answered_here.destination.address.as_deref(),
            Some("10.96.0.10:80")
        );
        assert!(Arc::ptr_eq(&answered_here.source, &one.source));
    }

    #[test]
    fn injected_delays_and_exhausted_retries_join_the_flags_where_envoy_lists_them() {
        let t = telemetry();
        let requests = ConnectionRecord::accepted(&t).requests();
        // The flags a request ends with, after `mark` on its record.
        let ended = |mark: fn(&mut RequestRecord) -> &mut RequestRecord, end: &str| {
            let mut r = requests.start(HttpFlow::default());
            mark(&mut r);
            let flow = r.finish(Verdict::Forwarded, 200, end, None::<&str>);
            flow.http.as_ref().unwrap().response_flags.to_string()
        };
        let delayed = RequestRecord::delay_injected;
        assert_eq!(ended(delayed, "-"), "DI");
        assert_eq!(ended(delayed, "FI"), "DI,FI");
        assert_eq!(ended(delayed, "UF"), "UF,DI");
        assert_eq!(ended(delayed, "UH,DC"), "UH,DI,DC");
        let exhausted = RequestRecord::retries_exhausted;
        assert_eq!(ended(exhausted, "-"), "URX");
        assert_eq!(ended(exhausted, "UF"), "UF,URX");
        assert_eq!(ended(exhausted, "UT"), "UT,URX");
        let r = requests.start(HttpFlow::default());
        let flow = r.finish(Verdict::Forwarded, 200, "-", None::<&str>);
        assert_eq!(
            &*flow.http.as_ref().unwrap().response_flags,
            "-",
            "no delay"
        );
    }

    #[test]
    fn a_dropped_record_is_emitted_with_an_error() {
        let t = telemetry();
        let mut r = ConnectionRecord::accepted(&t);
        r.source_ip("10.244.1.2".parse().unwrap());
        drop(r);
        let flows = t.flows.recent(&FlowFilter::default());
        assert_eq!(flows.len(), 1);
        assert!(flows[0].error.as_deref().unwrap().contains("stopped"));
        assert_eq!(flows[0].verdict, Verdict::ConnectFailed, "never connected");
    }

    #[test]
    fn duration_is_whole_microseconds() {
        let t = telemetry();
        let r = ConnectionRecord::accepted(&t);
        std::thread::sleep(std::time::Duration::from_micros(1500));
        let flow = r.finish(Verdict::Forwarded, None::<&str>);
        let us = flow.duration_ms * 1000.0;
        assert!(flow.duration_ms >= 1.5, "{}", flow.duration_ms);
        assert!((us - us.round()).abs() < 1e-6, "{}", flow.duration_ms);
        // A record of a connection the proxy never held has no duration.
        let r = ConnectionRecord::at(&t, SystemTime::now());
        assert_eq!(r.finish(Verdict::Unhandled, Some("x")).duration_ms, 0.0);
    }

    #[test]
    fn a_relay_is_held_once() {
        async fn relaying() -> Relayed {
            let held = [0u8; 4096];
            tokio::task::yield_now().await;
            Relayed {
                sent: held.len() as u64,
                ..Relayed::default()
            }
        }
        let t = telemetry();
        let mut r = ConnectionRecord::accepted(&t);
        let alone = std::mem::size_of_val(&relaying());
        let wrapped = std::mem::size_of_val(&r.relay(relaying()));
        // An `async fn` held the relay twice (its argument, then the awaited value): the
        // connection's task, allocated per connection, was that much larger.
        assert!(wrapped <= alone + 64, "{wrapped} for {alone}");
        let served = std::mem::size_of_val(&r.serve(relaying()));
        assert!(served <= alone + 64, "{served} for {alone}");
    }

    #[tokio::test]
    async fn relay_counts_as_active_and_keeps_bytes() {
        let t = telemetry();
        let mut r = ConnectionRecord::accepted(&t);
        let t2 = t.clone();
        r.relay(async move {
            assert_eq!(t2.active_connections(), 1);
            Relayed {
                sent: 5,
                received: 7,
                error: Some("reset".into()),
            }
        })
        .await;
        assert_eq!(t.active_connections(), 0);
        let flow = r.finish(Verdict::Forwarded, None::<&str>);
        assert_eq!((flow.bytes_sent, flow.bytes_received), (5, 7));
        assert_eq!(flow.error.as_deref(), Some("reset"));
        assert_eq!(t.flows.bytes_totals(), (5, 7));
    }

    #[test]
    fn identities_and_pods_fill_both_sides() {
        let t = telemetry();
        let mut r = ConnectionRecord::accepted(&t);
        let id: SpiffeId = "spiffe://cluster.local/ns/front/sa/client".parse().unwrap();
        r.source_identity(&id).mtls();
        let flow = r.finish(Verdict::Forwarded, None::<&str>);
        assert_eq!(flow.source.namespace.as_deref(), Some("front"));
        assert_eq!(
            flow.source.identity.as_deref(),
            Some("spiffe://cluster.local/ns/front/sa/client")
        );
        assert!(flow.mtls);
    }

    #[test]
    fn a_request_is_reported_by_each_proxy_it_passes() {
        use crate::telemetry::istio::tests::pod;
        let t = telemetry();
        let client = Arc::new(pod("front", "web-6d9f7c8b5-a", "web", &[("app", "web")]));
        let server = Arc::new(pod(
            "back",
            "ratings-v1-6d9f7c8b5-b",
            "ratings-v1",
            &[("app", "ratings")],
        ));
        let mut conn = ConnectionRecord::accepted(&t);
        conn.reporter(Reporter::Source).source_pod(&client);
        let requests = conn.requests();
        let endpoint = Names::endpoint("10.244.1.3:8080".parse().unwrap(), Some(&server));
        // A pod of this node: reported as source and as destination.
        let mut r = requests.start(HttpFlow::default());
        r.upstream(&endpoint, None, false).delivered_here(true);
        let flow = r.finish(Verdict::Forwarded, 200, "-", None::<&str>);
        assert_eq!(flow.source.workload.as_deref(), Some("web"));
        assert_eq!(flow.destination.workload.as_deref(), Some("ratings-v1"));
        assert_eq!(t.istio.series_count(), (2, 0));
        // Counted once in the golden signals, though reported twice.
        let rows = t.golden.stat(&crate::admin::api::StatQuery {
            by: crate::admin::api::StatBy::Pod,
            namespace: None,
            window: std::time::Duration::from_secs(60),
        });
        let row = rows
            .iter()
            .find(|r| r.name == "ratings-v1-6d9f7c8b5-b")
            .unwrap();
        assert_eq!(row.requests, 1, "{rows:?}");
        // Another node's: the source only (a new series: 503).
        let mut r = requests.start(HttpFlow::default());
        r.upstream(&endpoint, None, true).delivered_here(false);
        r.finish(Verdict::Forwarded, 503, "-", None::<&str>);
        assert_eq!(t.istio.series_count(), (3, 0));
        // The connection itself adds no TCP series: its requests were its report.
        conn.finish_http(2, None::<&str>);
        assert_eq!(t.istio.series_count(), (3, 0));
    }

    #[test]
    fn a_tcp_connection_is_counted_open_while_it_relays_and_closed_with_its_bytes() {
        use crate::telemetry::istio::tests::pod;
        let t = telemetry();
        let client = Arc::new(pod("front", "web-6d9f7c8b5-a", "web", &[("app", "web")]));
        let server = Arc::new(pod("back", "db-6d9f7c8b5-b", "db", &[("app", "db")]));
        let mut r = ConnectionRecord::accepted(&t);
        r.reporter(Reporter::Destination)
            .source_pod(&client)
            .destination_pod(&server)
            .mtls();
        let t2 = t.clone();
        futures::executor::block_on(r.relay(async move {
            assert_eq!(
                t2.istio.series_count(),
                (0, 1),
                "opened when the relay starts"
            );
            Relayed {
                sent: 5,
                received: 7,
                error: None,
            }
        }));
        r.finish(Verdict::Forwarded, None::<&str>);
        assert_eq!(t.istio.series_count(), (0, 1), "closed on the same series");
        // A refused one: opened and closed at once, with its flag.
        let mut r = ConnectionRecord::accepted(&t);
        r.reporter(Reporter::Destination)
            .source_pod(&client)
            .destination_pod(&server);
        r.finish(Verdict::Denied, Some("denied"));
        assert_eq!(t.istio.series_count(), (0, 2));
        // One the proxy could not attribute: a flow only.
        ConnectionRecord::accepted(&t).finish(Verdict::Unidentified, Some("no redirect"));
        assert_eq!(t.istio.series_count(), (0, 2));
    }
}
