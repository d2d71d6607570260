//! An OTLP trace receiver stand-in (what Jaeger or the OpenTelemetry Collector is to weft's
//! tracing), made of the official protobuf definitions (`opentelemetry-proto`):
//!
//! - OTLP/gRPC: `opentelemetry.proto.collector.trace.v1.TraceService/Export` (tonic);
//! - OTLP/HTTP: `POST /v1/traces` with an `application/x-protobuf` `ExportTraceServiceRequest`
//!   body, answered with an `ExportTraceServiceResponse` (400 for a body that does not decode,
//!   415 for another content type, 404 elsewhere, 405 for another method).
//!
//! It serves from a tokio runtime of its own, so sync test code can drive it (the shape of
//! [`crate::apiserver::ApiServer`]), on a listener bound at the address the caller gives: in
//! the caller's network namespace ([`OtlpReceiver::start_grpc`], [`OtlpReceiver::start_http`]),
//! in a named one ([`OtlpReceiver::start_in`]), or bound by the caller
//! ([`OtlpReceiver::start`]). Every span received is kept flattened as a [`ReceivedSpan`].
//! [`OtlpReceiver::set_refusing`] makes it answer errors (gRPC `UNAVAILABLE`, HTTP 503) to
//! test an exporter's failure path with the collector up. Dropping it stops it.
//!
//! Imports: `opentelemetry-proto` (messages and the tonic server), tonic, hyper, tokio, and
//! [`crate::netns`].

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use prost::Message;

/// The OTLP transport a receiver serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP/gRPC (the collector's port 4317).
    Grpc,
    /// OTLP/HTTP with protobuf bodies at `/v1/traces` (the collector's port 4318).
    HttpProtobuf,
}

/// The OTLP span kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SpanKind {
    Unspecified,
    Internal,
    Server,
    Client,
    Producer,
    Consumer,
}

impl SpanKind {
    fn from_otlp(kind: i32) -> SpanKind {
        use opentelemetry_proto::tonic::trace::v1::span::SpanKind as K;
        match K::try_from(kind).unwrap_or(K::Unspecified) {
            K::Unspecified => SpanKind::Unspecified,
            K::Internal => SpanKind::Internal,
            K::Server => SpanKind::Server,
            K::Client => SpanKind::Client,
            K::Producer => SpanKind::Producer,
            K::Consumer => SpanKind::Consumer,
        }
    }
}

/// One span as received, flattened: ids in lower-case hex, the resource's `service.name`,
/// attribute values as text (strings as they are, numbers and booleans as Rust prints them,
/// arrays and maps in a debug form).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceivedSpan {
    /// 32 hex.
    pub trace_id: String,
    /// 16 hex.
    pub span_id: String,
    /// 16 hex; None for a root span.
    pub parent_span_id: Option<String>,
    pub name: String,
    pub kind: SpanKind,
    pub service_name: String,
    pub attributes: BTreeMap<String, String>,
    /// The span's status is `Error`.
    pub error: bool,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
}

impl ReceivedSpan {
    /// An attribute's value.
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(value: Option<&AnyValue>) -> String {
    use any_value::Value;
    match value.and_then(|v| v.value.as_ref()) {
        None => String::new(),
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(Value::BytesValue(b)) => hex(b),
        Some(Value::ArrayValue(a)) => format!(
            "[{}]",
            a.values
                .iter()
                .map(|v| text(Some(v)))
                .collect::<Vec<_>>()
                .join(",")
        ),
        Some(Value::KvlistValue(kv)) => format!("{:?}", flatten_attributes(&kv.values)),
        Some(other) => format!("{other:?}"),
    }
}

fn flatten_attributes(attributes: &[KeyValue]) -> BTreeMap<String, String> {
    attributes
        .iter()
        .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
        .collect()
}

/// The spans of one export request, flattened.
pub fn flatten(request: &ExportTraceServiceRequest) -> Vec<ReceivedSpan> {
    let mut out = Vec::new();
    for rs in &request.resource_spans {
        let resource = rs
            .resource
            .as_ref()
            .map(|r| flatten_attributes(&r.attributes))
            .unwrap_or_default();
        let service_name = resource.get("service.name").cloned().unwrap_or_default();
        for span in rs.scope_spans.iter().flat_map(|ss| &ss.spans) {
            out.push(ReceivedSpan {
                trace_id: hex(&span.trace_id),
                span_id: hex(&span.span_id),
                parent_span_id: (!span.parent_span_id.is_empty())
                    .then(|| hex(&span.parent_span_id)),
                name: span.name.clone(),
                kind: SpanKind::from_otlp(span.kind),
                service_name: service_name.clone(),
                attributes: flatten_attributes(&span.attributes),
                error: span
                    .status
                    .as_ref()
                    .is_some_and(|s| s.code == StatusCode::Error as i32),
                start_unix_nanos: span.start_time_unix_nano,
                end_unix_nanos: span.end_time_unix_nano,
            });
        }
    }
    out
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the servers and the control side share.
#[derive(Default)]
struct Shared {
    spans: Mutex<Vec<ReceivedSpan>>,
    arrived: Condvar,
    requests: AtomicU64,
    refusing: AtomicBool,
}

impl Shared {
    fn receive(&self, request: &ExportTraceServiceRequest) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        lock(&self.spans).extend(flatten(request));
        self.arrived.notify_all();
    }
}

struct Grpc(Arc<Shared>);

#[tonic::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        if self.0.refusing.load(Ordering::Relaxed) {
            return Err(tonic::Status::unavailable("refusing (test)"));
        }
        self.0.receive(request.get_ref());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn answer(status: u16, content_type: &str, body: Vec<u8>) -> hyper::Response<Full<Bytes>> {
    hyper::Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("valid response")
}

fn plain(status: u16, message: &str) -> hyper::Response<Full<Bytes>> {
    answer(status, "text/plain", message.as_bytes().to_vec())
}

/// `POST /v1/traces`.
async fn http_export(
    shared: Arc<Shared>,
    req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<Full<Bytes>> {
    if req.uri().path() != "/v1/traces" {
        return plain(404, "not found");
    }
    if req.method() != hyper::Method::POST {
        return plain(405, "method not allowed");
    }
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if content_type != "application/x-protobuf" {
        return plain(415, "expected application/x-protobuf");
    }
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return plain(400, &e.to_string()),
    };
    let request = match ExportTraceServiceRequest::decode(body) {
        Ok(r) => r,
        Err(e) => return plain(400, &e.to_string()),
    };
    if shared.refusing.load(Ordering::Relaxed) {
        return plain(503, "refusing (test)");
    }
    shared.receive(&request);
    answer(
        200,
        "application/x-protobuf",
        ExportTraceServiceResponse::default().encode_to_vec(),
    )
}

async fn serve_http(shared: Arc<Shared>, listener: tokio::net::TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(http_export(shared, req).await) }
            });
            let builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            let _ = builder
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// The OTLP receiver stand-in. Dropping it stops it.
pub struct OtlpReceiver {
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
    addr: SocketAddr,
    protocol: Protocol,
}

impl OtlpReceiver {
    /// Serves OTLP/gRPC at `addr` (in the caller's network namespace; port 0: any).
    pub fn start_grpc(addr: SocketAddr) -> Result<OtlpReceiver> {
        Self::start(Protocol::Grpc, bind(addr)?)
    }

    /// Serves OTLP/HTTP (protobuf) at `addr` (in the caller's network namespace; port 0: any).
    pub fn start_http(addr: SocketAddr) -> Result<OtlpReceiver> {
        Self::start(Protocol::HttpProtobuf, bind(addr)?)
    }

    /// Serves `protocol` at `addr` in network namespace `netns` (a name under /run/netns, as
    /// [`crate::InNetns::netns_name`] gives).
    pub fn start_in(netns: &str, protocol: Protocol, addr: SocketAddr) -> Result<OtlpReceiver> {
        let listener = crate::netns::in_netns(netns, || bind(addr))??;
        Self::start(protocol, listener)
    }

    /// Serves `protocol` on `listener` (bound by the caller, possibly inside another network
    /// namespace) from a runtime of its own.
    pub fn start(protocol: Protocol, listener: TcpListener) -> Result<OtlpReceiver> {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("weft-otlp")
            .enable_all()
            .build()
            .context("tokio runtime")?;
        let listener = {
            let _guard = runtime.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let shared = Arc::new(Shared::default());
        match protocol {
            Protocol::Grpc => {
                let server = tonic::transport::Server::builder()
                    .add_service(TraceServiceServer::new(Grpc(shared.clone())))
                    .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
                runtime.spawn(server);
            }
            Protocol::HttpProtobuf => {
                runtime.spawn(serve_http(shared.clone(), listener));
            }
        }
        Ok(OtlpReceiver {
            shared,
            runtime: Some(runtime),
            addr,
            protocol,
        })
    }

    /// The address served.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// The endpoint an exporter is given: `http://IP:PORT` for gRPC,
    /// `http://IP:PORT/v1/traces` for HTTP.
    pub fn endpoint(&self) -> String {
        match self.protocol {
            Protocol::Grpc => format!("http://{}", self.addr),
            Protocol::HttpProtobuf => format!("http://{}/v1/traces", self.addr),
        }
    }

    /// Every span received so far, in arrival order.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        lock(&self.shared.spans).clone()
    }

    /// Waits until at least `n` spans have arrived, at most `timeout`; returns every span
    /// received by then (fewer than `n` if the time ran out).
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<ReceivedSpan> {
        let deadline = Instant::now() + timeout;
        let mut spans = lock(&self.shared.spans);
        while spans.len() < n {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            spans = self
                .shared
                .arrived
                .wait_timeout(spans, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        spans.clone()
    }

    /// Export requests accepted so far.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::Relaxed)
    }

    /// Forgets the spans received so far.
    pub fn clear(&self) {
        lock(&self.shared.spans).clear();
    }

    /// While refusing, exports are answered with an error (gRPC `UNAVAILABLE`, HTTP 503) and
    /// nothing is kept.
    pub fn set_refusing(&self, refusing: bool) {
        self.shared.refusing.store(refusing, Ordering::Relaxed);
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            // Does not block: fine from async code too. The listener closes with its task.
            rt.shutdown_background();
        }
    }
}

fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).with_context(|| format!("bind {addr}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{span, ResourceSpans, ScopeSpans, Span, Status};
    use weft::telemetry::trace::{
        OtlpProtocol, SpanEnd, SpanKind as Kind, TraceConfig, TraceCounts, Tracing,
    };

    const WAIT: Duration = Duration::from_secs(10);

    fn local() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    fn kv(key: &str, value: any_value::Value) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(value) }),
            ..Default::default()
        }
    }

    /// Two services, a root span and a child with every kind of attribute value.
    fn request() -> ExportTraceServiceRequest {
        use any_value::Value;
        let resource = |service: &str| Resource {
            attributes: vec![kv("service.name", Value::StringValue(service.into()))],
            ..Default::default()
        };
        let root = Span {
            trace_id: vec![0xab; 16],
            span_id: vec![1; 8],
            name: "root".into(),
            kind: span::SpanKind::Client as i32,
            start_time_unix_nano: 10,
            end_time_unix_nano: 20,
            attributes: vec![
                kv("s", Value::StringValue("text".into())),
                kv("i", Value::IntValue(-3)),
                kv("b", Value::BoolValue(true)),
                kv("d", Value::DoubleValue(0.5)),
            ],
            ..Default::default()
        };
        let child = Span {
            trace_id: vec![0xab; 16],
            span_id: vec![2; 8],
            parent_span_id: vec![1; 8],
            name: "child".into(),
            kind: span::SpanKind::Server as i32,
            status: Some(Status {
                code: StatusCode::Error as i32,
                ..Default::default()
            }),
            ..Default::default()
        };
        let spans = |service: &str, span: Span| ResourceSpans {
            resource: Some(resource(service)),
            scope_spans: vec![ScopeSpans {
                spans: vec![span],
                ..Default::default()
            }],
            ..Default::default()
        };
        ExportTraceServiceRequest {
            resource_spans: vec![spans("front", root), spans("back", child)],
        }
    }

    fn check_flattened(spans: &[ReceivedSpan]) {
        assert_eq!(spans.len(), 2, "{spans:?}");
        let root = &spans[0];
        assert_eq!(root.trace_id, "ab".repeat(16));
        assert_eq!(root.span_id, "0101010101010101");
        assert_eq!(root.parent_span_id, None);
        assert_eq!((root.name.as_str(), root.kind), ("root", SpanKind::Client));
        assert_eq!(root.service_name, "front");
        assert_eq!(
            (
                root.attr("s"),
                root.attr("i"),
                root.attr("b"),
                root.attr("d")
            ),
            (Some("text"), Some("-3"), Some("true"), Some("0.5"))
        );
        assert_eq!((root.start_unix_nanos, root.end_unix_nanos), (10, 20));
        assert!(!root.error);
        let child = &spans[1];
        assert_eq!(child.parent_span_id.as_deref(), Some("0101010101010101"));
        assert_eq!(child.service_name, "back");
        assert_eq!(child.kind, SpanKind::Server);
        assert!(child.error);
    }

    #[test]
    fn receives_grpc() {
        let rx = OtlpReceiver::start_grpc(local()).unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let mut client = TraceServiceClient::connect(rx.endpoint()).await.unwrap();
            client.export(request()).await.unwrap();
            rx.set_refusing(true);
            let refused = client.export(request()).await.unwrap_err();
            assert_eq!(refused.code(), tonic::Code::Unavailable);
        });
        check_flattened(&rx.wait_for(2, WAIT));
        assert_eq!(rx.requests(), 1);
        rx.clear();
        assert!(rx.spans().is_empty());
    }

    /// POSTs `body` to the receiver: (status, body).
    async fn post(addr: SocketAddr, path: &str, content_type: &str, body: Vec<u8>) -> (u16, Bytes) {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = hyper::Request::post(path)
            .header("host", addr.to_string())
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.into_body().collect().await.unwrap().to_bytes())
    }

    #[test]
    fn receives_http() {
        let rx = OtlpReceiver::start_http(local()).unwrap();
        assert_eq!(rx.endpoint(), format!("http://{}/v1/traces", rx.addr()));
        let rt = tokio::runtime::Runtime::new().unwrap();
        let addr = rx.addr();
        let proto = "application/x-protobuf";
        rt.block_on(async {
            let (status, body) = post(addr, "/v1/traces", proto, request().encode_to_vec()).await;
            assert_eq!(status, 200);
            ExportTraceServiceResponse::decode(body).unwrap();
            let bad = vec![0xff; 3];
            assert_eq!(post(addr, "/v1/traces", proto, bad).await.0, 400);
            let json = b"{}".to_vec();
            assert_eq!(
                post(addr, "/v1/traces", "application/json", json).await.0,
                415
            );
            let elsewhere = request().encode_to_vec();
            assert_eq!(post(addr, "/v1/logs", proto, elsewhere).await.0, 404);
            rx.set_refusing(true);
            assert_eq!(
                post(addr, "/v1/traces", proto, request().encode_to_vec())
                    .await
                    .0,
                503
            );
        });
        check_flattened(&rx.wait_for(2, WAIT));
        assert_eq!(rx.requests(), 1);
    }

    /// Served inside a network namespace: reachable there, at the address asked for.
    #[test]
    fn serves_in_a_network_namespace() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root for a network namespace");
            return;
        }
        struct Netns(String);
        impl Drop for Netns {
            fn drop(&mut self) {
                let _ = crate::netns::delete(&self.0);
            }
        }
        let ns = Netns(format!("weft-otlp-{}", crate::ids::random_hex(4)));
        crate::netns::create(&ns.0).unwrap();
        crate::netns::ip(&ns.0, &["link", "set", "lo", "up"]).unwrap();
        let rx = OtlpReceiver::start_in(&ns.0, Protocol::Grpc, "127.0.0.1:4317".parse().unwrap())
            .unwrap();
        assert_eq!(rx.addr(), "127.0.0.1:4317".parse().unwrap());
        let endpoint = rx.endpoint();
        crate::netns::in_netns(&ns.0, || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let mut client = TraceServiceClient::connect(endpoint).await.unwrap();
                client.export(request()).await.unwrap();
            });
        })
        .unwrap();
        check_flattened(&rx.wait_for(2, WAIT));
    }

    #[test]
    fn wait_for_gives_up() {
        let rx = OtlpReceiver::start_grpc(local()).unwrap();
        let began = Instant::now();
        assert!(rx.wait_for(1, Duration::from_millis(100)).is_empty());
        assert!(began.elapsed() >= Duration::from_millis(100));
    }

    fn end<'a>(name: &'a str, service_name: &'a str) -> SpanEnd<'a> {
        SpanEnd {
            name,
            service_name,
            method: "GET",
            url: "http://reviews.back.svc.cluster.local:9080/reviews/1",
            status_code: 200,
            upstream_cluster: "outbound|9080||reviews.back.svc.cluster.local",
            peer_address: "10.244.1.7:9080",
            response_flags: "-",
            node_id: "",
            request_id: Some("req-1"),
            protocol: "HTTP/1.1",
            grpc_status: None,
            error: false,
        }
    }

    /// Weft's exporter to this receiver: a request through two hops (client at the source,
    /// server at the destination) reports two spans linked parent to child, each with its
    /// service name.
    fn from_weft(protocol: Protocol) {
        let rx = match protocol {
            Protocol::Grpc => OtlpReceiver::start_grpc(local()),
            Protocol::HttpProtobuf => OtlpReceiver::start_http(local()),
        }
        .unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let _guard = rt.enter();
        let config = TraceConfig {
            endpoint: Some(rx.endpoint()),
            protocol: match protocol {
                Protocol::Grpc => OtlpProtocol::Grpc,
                Protocol::HttpProtobuf => OtlpProtocol::HttpProtobuf,
            },
            sampling_percent: 100.0,
            queue: 64,
        };
        let tracing = Tracing::new(config, "node-a").unwrap();
        let mut headers = http::HeaderMap::new();
        let client = tracing.start(&mut headers, Kind::Client).unwrap();
        let server = tracing.start(&mut headers, Kind::Server).unwrap();
        let (trace, client_id, server_id) = (
            client.trace_id.to_string(),
            client.span_id.to_string(),
            server.span_id.to_string(),
        );
        let name = "reviews.back.svc.cluster.local:9080/*";
        tracing.finish(server, end(name, "reviews"));
        tracing.finish(client, end(name, "productpage"));
        let spans = rx.wait_for(2, WAIT);
        assert_eq!(spans.len(), 2, "{spans:?}");
        let by_id = |id: &str| spans.iter().find(|s| s.span_id == id).unwrap();
        let c = by_id(&client_id);
        assert_eq!(
            (c.kind, c.service_name.as_str()),
            (SpanKind::Client, "productpage")
        );
        assert_eq!(c.trace_id, trace);
        assert_eq!(c.parent_span_id, None);
        let s = by_id(&server_id);
        assert_eq!(
            (s.kind, s.service_name.as_str()),
            (SpanKind::Server, "reviews")
        );
        assert_eq!(s.trace_id, trace);
        assert_eq!(s.parent_span_id.as_deref(), Some(client_id.as_str()));
        assert_eq!(s.name, name);
        for (key, value) in [
            ("http.method", "GET"),
            ("http.status_code", "200"),
            ("http.protocol", "HTTP/1.1"),
            (
                "upstream_cluster",
                "outbound|9080||reviews.back.svc.cluster.local",
            ),
            ("peer.address", "10.244.1.7:9080"),
            ("response_flags", "-"),
            ("node_id", "node-a"),
            ("guid:x-request-id", "req-1"),
            ("component", "proxy"),
        ] {
            assert_eq!(s.attr(key), Some(value), "{key}");
        }
        // The next hop's headers carry the server span as parent.
        let tp = headers["traceparent"].to_str().unwrap();
        assert_eq!(tp, format!("00-{trace}-{server_id}-01"));
        let deadline = Instant::now() + WAIT;
        while tracing.counts().exported < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            tracing.counts(),
            TraceCounts {
                queued: 2,
                exported: 2,
                dropped: 0,
                failed: 0
            }
        );
    }

    #[test]
    fn weft_exports_over_grpc() {
        from_weft(Protocol::Grpc);
    }

    #[test]
    fn weft_exports_over_http_protobuf() {
        from_weft(Protocol::HttpProtobuf);
    }

    /// With the collector down (nothing listens) or refusing, `finish` returns at once: spans
    /// beyond the queue are dropped, the rest fail when their export does.
    fn collector_down(protocol: Protocol, refusing: bool) {
        let (endpoint, _up) = if refusing {
            let rx = match protocol {
                Protocol::Grpc => OtlpReceiver::start_grpc(local()),
                Protocol::HttpProtobuf => OtlpReceiver::start_http(local()),
            }
            .unwrap();
            rx.set_refusing(true);
            (rx.endpoint(), Some(rx))
        } else {
            // A port nobody listens on.
            let addr = bind(local()).unwrap().local_addr().unwrap();
            (format!("http://{addr}"), None)
        };
        let rt = tokio::runtime::Runtime::new().unwrap();
        let _guard = rt.enter();
        let config = TraceConfig {
            endpoint: Some(endpoint),
            protocol: match protocol {
                Protocol::Grpc => OtlpProtocol::Grpc,
                Protocol::HttpProtobuf => OtlpProtocol::HttpProtobuf,
            },
            sampling_percent: 100.0,
            queue: 8,
        };
        let tracing = Tracing::new(config, "node-a").unwrap();
        let began = Instant::now();
        for _ in 0..1000 {
            let span = tracing
                .start(&mut http::HeaderMap::new(), Kind::Client)
                .unwrap();
            tracing.finish(span, end("op", "svc"));
        }
        let spent = began.elapsed();
        assert!(
            spent < Duration::from_millis(500),
            "finish waited: {spent:?}"
        );
        let counts = tracing.counts();
        assert_eq!(counts.queued + counts.dropped, 1000, "{counts:?}");
        assert!(counts.dropped > 0, "{counts:?}");
        // Everything queued fails (the exporter retries within its 5 s deadline).
        let deadline = Instant::now() + Duration::from_secs(20);
        while tracing.counts().failed < counts.queued && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let after = tracing.counts();
        assert_eq!(after.failed, after.queued, "{after:?}");
        assert_eq!(after.exported, 0);
    }

    #[test]
    fn collector_down_grpc() {
        collector_down(Protocol::Grpc, false);
    }

    #[test]
    fn collector_down_http() {
        collector_down(Protocol::HttpProtobuf, false);
    }

    #[test]
    fn collector_refusing_grpc() {
        collector_down(Protocol::Grpc, true);
    }

    #[test]
    fn collector_refusing_http() {
        collector_down(Protocol::HttpProtobuf, true);
    }
}
