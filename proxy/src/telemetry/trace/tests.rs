//! Tests of [`super::Tracing`]: sampling and header rewriting through `start`, the spans
//! `finish` builds, the export queue (grouping by service, drops, failures, timeouts) with a
//! fake exporter, and the real OTLP exporters against a receiver made of the official protos.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry::Key;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::Resource;
use parking_lot::Mutex;

use super::*;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const SPAN: &str = "00f067aa0ba902b7";

/// What a fake exporter was given: (service name of the resource, spans) per call.
type Exports = Arc<Mutex<Vec<(String, Vec<SpanData>)>>>;

/// A span exporter that records what it is given, or fails, or never answers.
#[derive(Debug, Clone, Default)]
struct Fake {
    exports: Exports,
    service: String,
    fail: bool,
    hang: bool,
}

impl SpanExporter for Fake {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        if self.hang {
            std::future::pending::<()>().await;
        }
        if self.fail {
            return Err(OTelSdkError::InternalFailure("refused".into()));
        }
        self.exports.lock().push((self.service.clone(), batch));
        Ok(())
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.service = resource
            .get(&Key::from_static_str("service.name"))
            .map(|v| v.to_string())
            .unwrap_or_default();
    }
}

const FAST: Batching = Batching {
    max_spans: 512,
    delay: Duration::from_millis(10),
    timeout: Duration::from_millis(200),
    warn_every: Duration::from_secs(10),
};

fn config(sampling_percent: f64, queue: usize) -> TraceConfig {
    TraceConfig {
        endpoint: Some("http://collector:4317".into()),
        sampling_percent,
        queue,
        ..TraceConfig::default()
    }
}

fn fake_tracing(fake: Fake, sampling_percent: f64, queue: usize) -> Tracing {
    Tracing::with_exporter(
        fake,
        &config(sampling_percent, queue),
        "node-a",
        FAST,
        "fake".into(),
    )
    .unwrap()
}

fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    pairs
        .iter()
        .map(|(k, v)| {
            (
                http::HeaderName::from_static(k),
                HeaderValue::from_str(v).unwrap(),
            )
        })
        .collect()
}

fn get<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).map(|v| v.to_str().unwrap())
}

fn end(service_name: &str) -> SpanEnd<'_> {
    SpanEnd {
        name: "reviews.back.svc.cluster.local:9080/*",
        service_name,
        method: "GET",
        url: "http://reviews.back.svc.cluster.local:9080/reviews/1",
        status_code: 200,
        upstream_cluster: "outbound|9080||reviews.back.svc.cluster.local",
        peer_address: "10.244.1.7:9080",
        response_flags: "-",
        node_id: "",
        request_id: Some("6f1c2d3e-0000-4000-8000-000000000001"),
        protocol: "HTTP/1.1",
        grpc_status: None,
        error: false,
    }
}

/// Waits (yielding to the export task) until `done`, at most 10 s.
async fn until(mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[test]
fn config_defaults_and_names() {
    let c = TraceConfig::default();
    assert_eq!(c.endpoint, None);
    assert_eq!(c.protocol, OtlpProtocol::Grpc);
    assert_eq!(c.sampling_percent, 1.0);
    assert_eq!(c.queue, 2048);
    let c: TraceConfig = serde_json::from_str(
        r#"{"endpoint":"http://otel:4318","protocol":"http-protobuf","sampling_percent":5}"#,
    )
    .unwrap();
    assert_eq!(c.protocol, OtlpProtocol::HttpProtobuf);
    assert_eq!((c.sampling_percent, c.queue), (5.0, DEFAULT_QUEUE));
    use clap::ValueEnum;
    assert_eq!(
        OtlpProtocol::from_str("http-protobuf", false),
        Ok(OtlpProtocol::HttpProtobuf)
    );
    assert_eq!(
        OtlpProtocol::from_str("grpc", false),
        Ok(OtlpProtocol::Grpc)
    );
}

#[test]
fn collector_urls() {
    let http = OtlpProtocol::HttpProtobuf;
    assert_eq!(
        collector_url("http://otel:4318", http).unwrap(),
        "http://otel:4318/v1/traces"
    );
    assert_eq!(
        collector_url("http://otel:4318/", http).unwrap(),
        "http://otel:4318/v1/traces"
    );
    assert_eq!(
        collector_url("http://otel:4318/custom/traces", http).unwrap(),
        "http://otel:4318/custom/traces"
    );
    assert_eq!(
        collector_url("http://10.0.0.1:4317", OtlpProtocol::Grpc).unwrap(),
        "http://10.0.0.1:4317"
    );
    for bad in [
        "https://otel:4317",
        "otel:4317",
        "http://",
        "not a url",
        "ftp://x",
    ] {
        assert!(collector_url(bad, OtlpProtocol::Grpc).is_err(), "{bad}");
    }
}

#[tokio::test]
async fn new_checks_config() {
    let off = Tracing::new(TraceConfig::default(), "n").unwrap();
    assert!(!off.enabled());
    let empty = TraceConfig {
        endpoint: Some(String::new()),
        ..TraceConfig::default()
    };
    assert!(!Tracing::new(empty, "n").unwrap().enabled());
    for bad in [
        config(-1.0, 10),
        config(100.5, 10),
        config(f64::NAN, 10),
        config(1.0, 0),
        TraceConfig {
            endpoint: Some("https://otel:4317".into()),
            ..TraceConfig::default()
        },
    ] {
        assert!(Tracing::new(bad.clone(), "n").is_err(), "{bad:?}");
    }
    for protocol in [OtlpProtocol::Grpc, OtlpProtocol::HttpProtobuf] {
        let c = TraceConfig {
            protocol,
            ..config(1.0, 10)
        };
        assert!(Tracing::new(c, "n").unwrap().enabled());
    }
}

#[test]
fn new_needs_a_runtime() {
    assert!(Tracing::new(config(1.0, 10), "n").is_err());
    // Off needs none.
    assert!(!Tracing::new(TraceConfig::default(), "n").unwrap().enabled());
}

#[test]
fn disabled_leaves_headers_alone() {
    let t = Tracing::disabled();
    assert!(!t.enabled());
    let mut h = headers(&[("x-b3-sampled", "1")]);
    let before = h.clone();
    assert!(t.start(&mut h, SpanKind::Client).is_none());
    assert_eq!(h, before);
    let mut h = HeaderMap::new();
    assert!(t.start(&mut h, SpanKind::Client).is_none());
    assert!(h.is_empty());
    assert_eq!(t.counts(), TraceCounts::default());
}

#[tokio::test]
async fn new_trace_sampled_or_not() {
    let all = fake_tracing(Fake::default(), 100.0, 10);
    let mut h = HeaderMap::new();
    let span = all.start(&mut h, SpanKind::Client).unwrap();
    assert!(span.sampled);
    assert_eq!(span.parent_span_id, None);
    assert_eq!(span.kind, SpanKind::Client);
    let tp = propagation::parse_traceparent(h["traceparent"].as_bytes()).unwrap();
    assert_eq!(TraceId::from(tp.ids.trace_id), span.trace_id);
    assert_eq!(SpanId::from(tp.ids.span_id), span.span_id);
    assert!(tp.sampled());

    let none = fake_tracing(Fake::default(), 0.0, 10);
    let mut h = HeaderMap::new();
    assert!(none.start(&mut h, SpanKind::Client).is_none());
    // The next hop makes the same decision.
    let tp = propagation::parse_traceparent(h["traceparent"].as_bytes()).unwrap();
    assert!(!tp.sampled());
    assert!(all.start(&mut h, SpanKind::Server).is_none());
}

#[tokio::test]
async fn incoming_decision_wins() {
    let none = fake_tracing(Fake::default(), 0.0, 10);
    let all = fake_tracing(Fake::default(), 100.0, 10);
    let sampled = format!("00-{TRACE}-{SPAN}-01");
    let unsampled = format!("00-{TRACE}-{SPAN}-00");
    assert!(none
        .start(&mut headers(&[("traceparent", &sampled)]), SpanKind::Server)
        .is_some());
    assert!(all
        .start(
            &mut headers(&[("traceparent", &unsampled)]),
            SpanKind::Server
        )
        .is_none());
    // B3: debug is sampled; a sampled flag decides; no flag leaves it to this hop.
    for (pairs, want_none, want_all) in [
        (vec![("x-b3-flags", "1")], true, true),
        (vec![("b3", "d")], true, true),
        (vec![("x-b3-sampled", "0")], false, false),
        (
            vec![("x-b3-traceid", TRACE), ("x-b3-spanid", SPAN)],
            false,
            true,
        ),
        (
            vec![
                ("x-b3-traceid", TRACE),
                ("x-b3-spanid", SPAN),
                ("x-b3-sampled", "1"),
            ],
            true,
            true,
        ),
        (vec![("b3", &format!("{TRACE}-{SPAN}-0"))], false, false),
    ] {
        let n = none.start(&mut headers(&pairs), SpanKind::Server);
        let a = all.start(&mut headers(&pairs), SpanKind::Server);
        assert_eq!(
            (n.is_some(), a.is_some()),
            (want_none, want_all),
            "{pairs:?}"
        );
    }
}

#[tokio::test]
async fn lone_deny_passes_untouched() {
    let all = fake_tracing(Fake::default(), 100.0, 10);
    for pairs in [vec![("b3", "0")], vec![("x-b3-sampled", "0")]] {
        let mut h = headers(&pairs);
        let before = h.clone();
        assert!(all.start(&mut h, SpanKind::Client).is_none());
        assert_eq!(h, before);
    }
}

#[tokio::test]
async fn hops_link_parent_to_child() {
    let t = fake_tracing(Fake::default(), 0.0, 10);
    let mut h = headers(&[
        ("traceparent", &format!("00-{TRACE}-{SPAN}-01")),
        ("tracestate", "congo=t61rcWkgMzE"),
        ("b3", &format!("{TRACE}-{SPAN}-1")),
    ]);
    let client = t.start(&mut h, SpanKind::Client).unwrap();
    assert_eq!(client.trace_id, TraceId::from_hex(TRACE).unwrap());
    assert_eq!(client.parent_span_id, Some(SpanId::from_hex(SPAN).unwrap()));
    assert_eq!(
        get(&h, "traceparent").unwrap(),
        format!("00-{TRACE}-{}-01", client.span_id)
    );
    assert_eq!(
        get(&h, "b3").unwrap(),
        format!("{TRACE}-{}-1-{SPAN}", client.span_id)
    );
    assert_eq!(get(&h, "tracestate"), Some("congo=t61rcWkgMzE"));
    let server = t.start(&mut h, SpanKind::Server).unwrap();
    assert_eq!(server.trace_id, client.trace_id);
    assert_eq!(server.parent_span_id, Some(client.span_id));
    assert_ne!(server.span_id, client.span_id);
    let data = span_data(
        server,
        &end("reviews"),
        "node-b",
        SystemTime::now(),
        InstrumentationScope::builder("weft").build(),
    );
    assert_eq!(
        data.span_context.trace_state().header(),
        "congo=t61rcWkgMzE"
    );
}

fn attrs(data: &SpanData) -> BTreeMap<String, String> {
    data.attributes
        .iter()
        .map(|kv| (kv.key.to_string(), kv.value.to_string()))
        .collect()
}

#[tokio::test]
async fn span_fields_and_attributes() {
    let t = fake_tracing(Fake::default(), 100.0, 10);
    let mut h = headers(&[("x-b3-traceid", TRACE), ("x-b3-spanid", SPAN)]);
    let start = t.start(&mut h, SpanKind::Server).unwrap();
    let (trace_id, span_id, started) = (start.trace_id, start.span_id, start.start);
    let before = started - Duration::from_secs(1);
    let data = span_data(
        start,
        &end("reviews"),
        "node-b",
        before,
        InstrumentationScope::builder("weft").build(),
    );
    assert_eq!(data.span_context.trace_id(), trace_id);
    assert_eq!(data.span_context.span_id(), span_id);
    assert!(data.span_context.is_sampled());
    assert_eq!(data.parent_span_id, SpanId::from_hex(SPAN).unwrap());
    assert!(data.parent_span_is_remote);
    assert_eq!(data.span_kind, opentelemetry::trace::SpanKind::Server);
    assert_eq!(data.name, "reviews.back.svc.cluster.local:9080/*");
    // An end before the start (a clock step) is clamped.
    assert_eq!((data.start_time, data.end_time), (started, started));
    assert_eq!(data.status, Status::Unset);
    let want: BTreeMap<String, String> = [
        ("http.method", "GET"),
        (
            "http.url",
            "http://reviews.back.svc.cluster.local:9080/reviews/1",
        ),
        ("http.status_code", "200"),
        ("http.protocol", "HTTP/1.1"),
        (
            "upstream_cluster",
            "outbound|9080||reviews.back.svc.cluster.local",
        ),
        ("peer.address", "10.244.1.7:9080"),
        ("response_flags", "-"),
        ("node_id", "node-b"),
        ("guid:x-request-id", "6f1c2d3e-0000-4000-8000-000000000001"),
        ("component", "proxy"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(attrs(&data), want);

    // Errors: a 5xx, or the error flag; gRPC status when given.
    let mut h = HeaderMap::new();
    let start = t.start(&mut h, SpanKind::Client).unwrap();
    let failed = SpanEnd {
        status_code: 503,
        request_id: None,
        grpc_status: Some(14),
        ..end("productpage")
    };
    let data = span_data(
        start.clone(),
        &failed,
        "n",
        SystemTime::now(),
        InstrumentationScope::builder("weft").build(),
    );
    assert!(matches!(data.status, Status::Error { .. }));
    assert_eq!(data.parent_span_id, SpanId::INVALID);
    assert!(!data.parent_span_is_remote);
    let a = attrs(&data);
    assert_eq!(a.get("grpc.status_code").map(String::as_str), Some("14"));
    assert!(!a.contains_key("guid:x-request-id"));
    let flagged = SpanEnd {
        error: true,
        ..end("productpage")
    };
    let data = span_data(
        start,
        &flagged,
        "n",
        SystemTime::now(),
        InstrumentationScope::builder("weft").build(),
    );
    assert!(matches!(data.status, Status::Error { .. }));
}

#[tokio::test]
async fn export_groups_by_service() {
    let fake = Fake::default();
    let exports = fake.exports.clone();
    let t = fake_tracing(fake, 100.0, 100);
    let mut ids = HashMap::new();
    for service in ["reviews", "ratings", "reviews", "productpage", "reviews"] {
        let span = t.start(&mut HeaderMap::new(), SpanKind::Client).unwrap();
        ids.insert(span.span_id, service);
        t.finish(span, end(service));
    }
    until(|| t.counts().exported == 5).await;
    assert_eq!(
        t.counts(),
        TraceCounts {
            queued: 5,
            exported: 5,
            dropped: 0,
            failed: 0
        }
    );
    let exports = exports.lock();
    // One batch, one call per service, each with its resource.
    let calls: Vec<(&str, usize)> = exports
        .iter()
        .map(|(s, spans)| (s.as_str(), spans.len()))
        .collect();
    assert_eq!(
        calls,
        [("productpage", 1), ("ratings", 1), ("reviews", 3)],
        "{calls:?}"
    );
    for (service, spans) in exports.iter() {
        for span in spans {
            assert_eq!(ids[&span.span_context.span_id()], service);
            // The node id of `Tracing::new` when the end gives none.
            assert!(span
                .attributes
                .contains(&KeyValue::new("node_id", "node-a")));
        }
    }
}

#[tokio::test]
async fn full_queue_drops_without_waiting() {
    let fake = Fake {
        hang: true,
        ..Fake::default()
    };
    let t = fake_tracing(fake, 100.0, 4);
    let began = Instant::now();
    for _ in 0..100 {
        let span = t.start(&mut HeaderMap::new(), SpanKind::Client).unwrap();
        t.finish(span, end("reviews"));
    }
    assert!(began.elapsed() < Duration::from_millis(100));
    // The task had no chance to run (one thread): the queue holds 4.
    assert_eq!(
        t.counts(),
        TraceCounts {
            queued: 4,
            exported: 0,
            dropped: 96,
            failed: 0
        }
    );
    // The hanging exporter times out: its spans fail.
    until(|| t.counts().failed == 4).await;
}

#[tokio::test]
async fn export_errors_are_counted() {
    let fake = Fake {
        fail: true,
        ..Fake::default()
    };
    let t = fake_tracing(fake, 100.0, 100);
    for service in ["a", "b", "a"] {
        let span = t.start(&mut HeaderMap::new(), SpanKind::Server).unwrap();
        t.finish(span, end(service));
    }
    until(|| t.counts().failed == 3).await;
    assert_eq!(t.counts().exported, 0);
}

#[tokio::test]
async fn unsampled_spans_are_not_queued() {
    let t = fake_tracing(Fake::default(), 100.0, 10);
    let mut start = t.start(&mut HeaderMap::new(), SpanKind::Client).unwrap();
    start.sampled = false;
    t.finish(start, end("a"));
    assert_eq!(t.counts(), TraceCounts::default());
}

/// Our `traceparent` reading accepts nothing opentelemetry's `TraceContextPropagator` rejects,
/// and agrees with it on what both accept (ours is stricter on lengths and hex).
#[test]
fn traceparent_agrees_with_opentelemetry() {
    let propagator = TraceContextPropagator::new();
    let zero_trace = "0".repeat(32);
    let cases = [
        format!("00-{TRACE}-{SPAN}-01"),
        format!("00-{TRACE}-{SPAN}-00"),
        format!("00-{TRACE}-{SPAN}-09"),
        format!("01-{TRACE}-{SPAN}-01"),
        format!("fe-{TRACE}-{SPAN}-01-more"),
        format!("ff-{TRACE}-{SPAN}-01"),
        format!("00-{TRACE}-{SPAN}-01-more"),
        format!("00-{zero_trace}-{SPAN}-01"),
        format!("00-{TRACE}-0000000000000000-01"),
        format!("00-{}-{SPAN}-01", TRACE.to_uppercase()),
        format!("00-{TRACE}-{SPAN}-0A"),
        format!("00-{}-{SPAN}-01", &TRACE[4..]),
        format!("00-{TRACE}-{}-01", &SPAN[2..]),
        format!("00-+{}-{SPAN}-01", &TRACE[1..]),
        format!("00-{TRACE}-{SPAN}"),
        "00".to_string(),
        String::new(),
    ];
    for case in cases {
        let theirs = propagator
            .extract(&HashMap::from([("traceparent".to_string(), case.clone())]))
            .span()
            .span_context()
            .clone();
        let ours = propagation::parse_traceparent(case.as_bytes());
        match ours {
            Some(tp) => {
                assert!(theirs.is_valid(), "{case}: we accept what they reject");
                assert_eq!(TraceId::from(tp.ids.trace_id), theirs.trace_id(), "{case}");
                assert_eq!(SpanId::from(tp.ids.span_id), theirs.span_id(), "{case}");
                assert_eq!(tp.sampled(), theirs.is_sampled(), "{case}");
            }
            None => {
                // Stricter is fine; note the lenient cases so a change shows.
                if theirs.is_valid() {
                    assert!(
                        case.len() != 55 || case.contains('+'),
                        "{case}: they accept a well-formed value we reject"
                    );
                }
            }
        }
    }
}

// An OTLP receiver made of the official protos: what the real exporters send.

type Received = Arc<Mutex<Vec<ExportTraceServiceRequest>>>;

struct Grpc(Received);

#[tonic::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.lock().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn grpc_receiver() -> (SocketAddr, Received) {
    let received = Received::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = TraceServiceServer::new(Grpc(received.clone()));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    (addr, received)
}

async fn http_receiver() -> (SocketAddr, Received) {
    use prost::Message;
    let received = Received::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let store = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |headers: HeaderMap, body: bytes::Bytes| async move {
            assert_eq!(
                get(&headers, "content-type"),
                Some("application/x-protobuf")
            );
            store
                .lock()
                .push(ExportTraceServiceRequest::decode(body).unwrap());
            (
                [("content-type", "application/x-protobuf")],
                ExportTraceServiceResponse::default().encode_to_vec(),
            )
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, received)
}

/// (service name, span) of everything received.
fn flatten(received: &Received) -> Vec<(String, opentelemetry_proto::tonic::trace::v1::Span)> {
    let mut out = Vec::new();
    for request in received.lock().iter() {
        for rs in &request.resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                .map(|v| match v {
                    AnyValue::StringValue(s) => s.clone(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for ss in &rs.scope_spans {
                for span in &ss.spans {
                    out.push((service.clone(), span.clone()));
                }
            }
        }
    }
    out
}

async fn round_trip(protocol: OtlpProtocol) {
    let (addr, received) = match protocol {
        OtlpProtocol::Grpc => grpc_receiver().await,
        OtlpProtocol::HttpProtobuf => http_receiver().await,
    };
    let config = TraceConfig {
        endpoint: Some(format!("http://{addr}")),
        protocol,
        sampling_percent: 100.0,
        queue: 16,
    };
    let t = Tracing::new(config, "node-a").unwrap();
    let mut h = HeaderMap::new();
    let client = t.start(&mut h, SpanKind::Client).unwrap();
    let server = t.start(&mut h, SpanKind::Server).unwrap();
    let (trace_id, client_id, server_id) = (client.trace_id, client.span_id, server.span_id);
    t.finish(server, end("reviews"));
    t.finish(client, end("productpage"));
    until(|| flatten(&received).len() >= 2).await;
    until(|| t.counts().exported == 2).await;
    let spans = flatten(&received);
    assert_eq!(spans.len(), 2, "{spans:?}");
    let by_id: HashMap<Vec<u8>, (String, _)> = spans
        .into_iter()
        .map(|(service, span)| (span.span_id.clone(), (service, span)))
        .collect();
    let (service, span) = &by_id[&client_id.to_bytes().to_vec()];
    assert_eq!(service, "productpage");
    assert_eq!(span.trace_id, trace_id.to_bytes());
    assert!(span.parent_span_id.is_empty());
    assert_eq!(
        span.kind,
        opentelemetry_proto::tonic::trace::v1::span::SpanKind::Client as i32
    );
    assert_eq!(span.name, "reviews.back.svc.cluster.local:9080/*");
    let (service, span) = &by_id[&server_id.to_bytes().to_vec()];
    assert_eq!(service, "reviews");
    assert_eq!(span.trace_id, trace_id.to_bytes());
    assert_eq!(span.parent_span_id, client_id.to_bytes());
    assert_eq!(
        span.kind,
        opentelemetry_proto::tonic::trace::v1::span::SpanKind::Server as i32
    );
    assert!(span.attributes.iter().any(|kv| kv.key == "component"
        && kv.value.as_ref().and_then(|v| v.value.clone())
            == Some(AnyValue::StringValue("proxy".into()))));
    assert_eq!(
        t.counts(),
        TraceCounts {
            queued: 2,
            exported: 2,
            dropped: 0,
            failed: 0
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_over_grpc() {
    round_trip(OtlpProtocol::Grpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_over_http_protobuf() {
    round_trip(OtlpProtocol::HttpProtobuf).await;
}
