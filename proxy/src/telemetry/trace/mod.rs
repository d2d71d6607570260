//! Distributed tracing: one span per request and proxy hop, exported over OTLP (gRPC or
//! HTTP/protobuf) to a collector (Jaeger, Tempo, the OpenTelemetry Collector), in the shape
//! Istio's proxies report them.
//!
//! - [`Tracing::start`], when a request's head arrives: reads the incoming trace context,
//!   decides sampling, makes this hop's span id and rewrites the context headers so the next
//!   hop sees this span as its parent ([`propagation`], pure).
//! - [`Tracing::finish`], when it ends: builds the span (an `opentelemetry_sdk` `SpanData`:
//!   the proxy knows ids and times itself, no tracer is involved) and queues it for export
//!   without ever waiting; a full queue drops it and counts it.
//! - `export`: the task that takes queued spans in batches to an `opentelemetry_otlp`
//!   `SpanExporter`, grouped by service name (the OTLP resource's `service.name`).
//!
//! Without an endpoint tracing is off: headers pass through untouched and nothing is
//! recorded.
//!
//! May import: `http`, `opentelemetry`, `opentelemetry_sdk`, `opentelemetry_otlp`, `tokio`,
//! `tracing`, `fastrand` (ids, sampling), `serde`/`clap` (the config). Nothing of the crate:
//! the paths that handle requests call in.

mod export;
pub mod propagation;

use std::borrow::Cow;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::{bail, Context};
use http::{HeaderMap, HeaderValue, Uri};
use opentelemetry::trace::{SpanContext, SpanId, Status, TraceFlags, TraceId, TraceState};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter, SpanLinks};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use export::{Batching, Counters, Queued};
use propagation::{Outgoing, Sampling};

/// Percent of new traces sampled by default (Istio's default).
pub const DEFAULT_SAMPLING_PERCENT: f64 = 1.0;
/// Spans held for export by default.
pub const DEFAULT_QUEUE: usize = 2048;

/// How spans reach the collector.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
#[value(rename_all = "kebab-case")]
pub enum OtlpProtocol {
    /// OTLP/gRPC, `http://host:4317`.
    #[default]
    Grpc,
    /// OTLP/HTTP with protobuf bodies, `http://host:4318/v1/traces` (`/v1/traces` is added to
    /// an endpoint without a path).
    HttpProtobuf,
}

/// Tracing settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TraceConfig {
    /// OTLP collector: `http://host:4317` (gRPC) or `http://host:4318/v1/traces` style
    /// (HTTP/protobuf). None: tracing off (propagation still passes headers through
    /// untouched).
    pub endpoint: Option<String>,
    pub protocol: OtlpProtocol,
    /// Percent of new traces (requests without an incoming sampling decision) sampled,
    /// 0.0..=100.0.
    pub sampling_percent: f64,
    /// Spans held while waiting for export; when full, new spans are dropped and counted.
    /// (The batch being exported, at most as many again, is held besides.)
    pub queue: usize,
}

impl Default for TraceConfig {
    fn default() -> Self {
        TraceConfig {
            endpoint: None,
            protocol: OtlpProtocol::Grpc,
            sampling_percent: DEFAULT_SAMPLING_PERCENT,
            queue: DEFAULT_QUEUE,
        }
    }
}

/// Which side of a call a span reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanKind {
    /// The source side (outbound).
    Client,
    /// The destination side (inbound).
    Server,
}

/// A sampled span, started when a request's head arrived at this hop (see [`Tracing::start`]).
#[derive(Clone, Debug)]
pub struct SpanStart {
    pub trace_id: TraceId,
    /// This hop's span.
    pub span_id: SpanId,
    /// The span the request came from, if it came with a trace context.
    pub parent_span_id: Option<SpanId>,
    pub start: SystemTime,
    pub kind: SpanKind,
    pub sampled: bool,
    /// The `tracestate` of a W3C parent.
    trace_state: Option<HeaderValue>,
}

/// What is known when the request ends.
#[derive(Clone, Copy, Debug)]
pub struct SpanEnd<'a> {
    /// The operation, as Istio names it: `<authority><path>`-like, e.g.
    /// `reviews.back.svc.cluster.local:9080/*`.
    pub name: &'a str,
    /// The canonical service of the reporting side (the source workload's for
    /// [`SpanKind::Client`], the destination's for [`SpanKind::Server`]).
    pub service_name: &'a str,
    pub method: &'a str,
    pub url: &'a str,
    pub status_code: u16,
    pub upstream_cluster: &'a str,
    pub peer_address: &'a str,
    pub response_flags: &'a str,
    /// Empty: the node id given to [`Tracing::new`].
    pub node_id: &'a str,
    pub request_id: Option<&'a str>,
    /// `HTTP/1.1` or `HTTP/2`.
    pub protocol: &'a str,
    pub grpc_status: Option<u16>,
    pub error: bool,
}

/// Span counts, for `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TraceCounts {
    /// Spans queued for export.
    pub queued: u64,
    /// Spans the collector accepted.
    pub exported: u64,
    /// Spans dropped because the queue was full.
    pub dropped: u64,
    /// Spans lost to export errors (collector down, refused, timed out).
    pub failed: u64,
}

/// The node's tracing: propagation, sampling and the export queue. Shared by `Arc`.
#[derive(Debug)]
pub struct Tracing {
    inner: Option<Inner>,
}

#[derive(Debug)]
struct Inner {
    queue: mpsc::Sender<Queued>,
    counters: Arc<Counters>,
    sampling_percent: f64,
    node_id: Box<str>,
    scope: InstrumentationScope,
}

/// The collector URL the exporter is given: plain `http://` only; `/v1/traces` added to an
/// OTLP/HTTP endpoint without a path.
fn collector_url(endpoint: &str, protocol: OtlpProtocol) -> anyhow::Result<String> {
    let uri: Uri = endpoint
        .parse()
        .with_context(|| format!("trace endpoint {endpoint:?}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => bail!("trace endpoint {endpoint}: https is not supported, use http://"),
        _ => bail!("trace endpoint {endpoint}: expected http://host:port"),
    }
    if uri.authority().is_none_or(|a| a.host().is_empty()) {
        bail!("trace endpoint {endpoint}: no host");
    }
    let bare = matches!(uri.path(), "" | "/") && uri.query().is_none();
    Ok(match protocol {
        OtlpProtocol::HttpProtobuf if bare => {
            format!("{}/v1/traces", endpoint.trim_end_matches('/'))
        }
        _ => endpoint.to_string(),
    })
}

/// The runtime to export from, if `config` is valid.
fn check(config: &TraceConfig) -> anyhow::Result<tokio::runtime::Handle> {
    if !(0.0..=100.0).contains(&config.sampling_percent) {
        bail!(
            "trace sampling percent {} is not within 0..=100",
            config.sampling_percent
        );
    }
    if config.queue == 0 {
        bail!("trace queue must hold at least one span");
    }
    tokio::runtime::Handle::try_current().context("tracing needs a tokio runtime to export from")
}

fn otlp_exporter(
    url: String,
    protocol: OtlpProtocol,
) -> anyhow::Result<opentelemetry_otlp::SpanExporter> {
    let timeout = Batching::DEFAULT.timeout;
    let exporter = match protocol {
        OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_protocol(Protocol::Grpc)
            .with_endpoint(url)
            .with_timeout(timeout)
            .build(),
        OtlpProtocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(url)
            .with_timeout(timeout)
            .build(),
    };
    exporter.context("OTLP span exporter")
}

impl Tracing {
    /// Tracing as configured. Must be called inside a tokio runtime: starts the exporter task
    /// when an endpoint is set (without one, the same as [`Tracing::disabled`]).
    pub fn new(config: TraceConfig, node_id: &str) -> anyhow::Result<Tracing> {
        let Some(endpoint) = config.endpoint.as_deref().filter(|e| !e.is_empty()) else {
            return Ok(Tracing::disabled());
        };
        // Before the exporter: the gRPC one needs the runtime as it is built.
        check(&config)?;
        let url = collector_url(endpoint, config.protocol)?;
        let exporter = otlp_exporter(url.clone(), config.protocol)?;
        Tracing::with_exporter(exporter, &config, node_id, Batching::DEFAULT, url)
    }

    /// Tracing that exports to `exporter` (a fake one in tests).
    fn with_exporter<E: SpanExporter + 'static>(
        exporter: E,
        config: &TraceConfig,
        node_id: &str,
        batching: Batching,
        endpoint: String,
    ) -> anyhow::Result<Tracing> {
        let runtime = check(config)?;
        let (queue, spans) = mpsc::channel(config.queue);
        let counters = Arc::new(Counters::default());
        let batching = Batching {
            max_spans: batching.max_spans.min(config.queue),
            ..batching
        };
        runtime.spawn(export::run(
            exporter,
            spans,
            counters.clone(),
            batching,
            endpoint,
        ));
        Ok(Tracing {
            inner: Some(Inner {
                queue,
                counters,
                sampling_percent: config.sampling_percent,
                node_id: node_id.into(),
                scope: InstrumentationScope::builder("weft")
                    .with_version(env!("CARGO_PKG_VERSION"))
                    .build(),
            }),
        })
    }

    /// Tracing off: [`Tracing::start`] leaves headers alone and returns None.
    pub fn disabled() -> Tracing {
        Tracing { inner: None }
    }

    /// Whether spans are recorded (an endpoint is set).
    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// One hop of a request: reads the incoming trace context from `headers` (W3C
    /// `traceparent`/`tracestate` first, else B3 multi-header, else single-header `b3`),
    /// decides sampling (an incoming decision wins, B3 debug is sampled; otherwise
    /// `sampling_percent` of new traces), makes this hop's span id and rewrites the headers so
    /// the next hop sees this span as its parent, in every format the request came with (a
    /// `traceparent` when it came with none). See [`propagation`] for the details.
    ///
    /// Some only when sampled. Disabled: None, headers untouched. A lone B3 "do not sample"
    /// (`b3: 0`, `x-b3-sampled: 0` without ids) is passed on untouched.
    pub fn start(&self, headers: &mut HeaderMap, kind: SpanKind) -> Option<SpanStart> {
        let inner = self.inner.as_ref()?;
        let incoming = propagation::extract(headers);
        if incoming.ids.is_none() && incoming.sampling == Sampling::Deny {
            return None;
        }
        let sampled = incoming
            .sampling
            .decision()
            .unwrap_or_else(|| fastrand::f64() * 100.0 < inner.sampling_percent);
        let out = Outgoing {
            trace_id: incoming
                .ids
                .map_or_else(|| fastrand::u128(1..), |ids| ids.trace_id),
            span_id: fastrand::u64(1..),
            parent_span_id: incoming.ids.map(|ids| ids.span_id),
            sampled,
            debug: incoming.sampling == Sampling::Debug,
        };
        propagation::inject(headers, &out, &incoming);
        if !sampled {
            return None;
        }
        let trace_state = incoming
            .w3c
            .and_then(|_| headers.get(propagation::TRACESTATE).cloned());
        Some(SpanStart {
            trace_id: TraceId::from(out.trace_id),
            span_id: SpanId::from(out.span_id),
            parent_span_id: out.parent_span_id.map(SpanId::from),
            start: SystemTime::now(),
            kind,
            sampled,
            trace_state,
        })
    }

    /// Ends a sampled span now and queues it for export, never waiting: a full queue drops
    /// it (counted in [`TraceCounts::dropped`]).
    pub fn finish(&self, span: SpanStart, end: SpanEnd<'_>) {
        let Some(inner) = self.inner.as_ref() else {
            return;
        };
        if !span.sampled {
            return;
        }
        let node_id = if end.node_id.is_empty() {
            &inner.node_id
        } else {
            end.node_id
        };
        let queued = Queued {
            service: end.service_name.into(),
            span: span_data(span, &end, node_id, SystemTime::now(), inner.scope.clone()),
        };
        let counter = match inner.queue.try_send(queued) {
            Ok(()) => &inner.counters.queued,
            // Full, or the exporter task is gone with its runtime.
            Err(_) => &inner.counters.dropped,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Span counts so far.
    pub fn counts(&self) -> TraceCounts {
        let Some(inner) = self.inner.as_ref() else {
            return TraceCounts::default();
        };
        let c = &inner.counters;
        TraceCounts {
            queued: c.queued.load(Ordering::Relaxed),
            exported: c.exported.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
        }
    }
}

/// The span a hop reports, ending at `end_time`.
fn span_data(
    start: SpanStart,
    end: &SpanEnd<'_>,
    node_id: &str,
    end_time: SystemTime,
    scope: InstrumentationScope,
) -> SpanData {
    let trace_state = start
        .trace_state
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(TraceState::NONE);
    let mut attributes = Vec::with_capacity(11);
    attributes.extend([
        KeyValue::new("http.method", end.method.to_string()),
        KeyValue::new("http.url", end.url.to_string()),
        KeyValue::new("http.status_code", i64::from(end.status_code)),
        KeyValue::new("http.protocol", end.protocol.to_string()),
        KeyValue::new("upstream_cluster", end.upstream_cluster.to_string()),
        KeyValue::new("peer.address", end.peer_address.to_string()),
        KeyValue::new("response_flags", end.response_flags.to_string()),
        KeyValue::new("node_id", node_id.to_string()),
        KeyValue::new("component", "proxy"),
    ]);
    if let Some(id) = end.request_id {
        attributes.push(KeyValue::new("guid:x-request-id", id.to_string()));
    }
    if let Some(status) = end.grpc_status {
        attributes.push(KeyValue::new("grpc.status_code", i64::from(status)));
    }
    SpanData {
        span_context: SpanContext::new(
            start.trace_id,
            start.span_id,
            TraceFlags::SAMPLED,
            false,
            trace_state,
        ),
        parent_span_id: start.parent_span_id.unwrap_or(SpanId::INVALID),
        parent_span_is_remote: start.parent_span_id.is_some(),
        span_kind: match start.kind {
            SpanKind::Client => opentelemetry::trace::SpanKind::Client,
            SpanKind::Server => opentelemetry::trace::SpanKind::Server,
        },
        name: Cow::Owned(end.name.to_string()),
        start_time: start.start,
        end_time: end_time.max(start.start),
        attributes,
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: if end.error || end.status_code >= 500 {
            Status::error("")
        } else {
            Status::Unset
        },
        instrumentation_scope: scope,
    }
}

#[cfg(test)]
mod tests;
