//! The span queue's consumer: one task takes the spans [`super::Tracing::finish`] queued, in
//! batches (up to [`Batching::max_spans`], or what came within [`Batching::delay`] of the
//! first), and hands them to an OTLP span exporter, one call per service name.
//!
//! The OTLP exporter sends one resource per call (`set_resource` applies to every span of the
//! next `export`), and the service name is a resource attribute that differs from span to
//! span here (the reporting workload's service): a batch is grouped by service name and each
//! group is exported after `set_resource` with its `service.name`.
//!
//! Each call has a deadline ([`Batching::timeout`]); a failed or timed-out call counts its
//! spans as failed and warns at most once per [`Batching::warn_every`]. Traffic never waits
//! for any of this: the queue is bounded and `finish` only `try_send`s into it.
//!
//! May import: `opentelemetry_sdk`, `tokio`, `tracing`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use opentelemetry_sdk::Resource;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// A finished span waiting for export, with the service it is reported for.
#[derive(Debug)]
pub(super) struct Queued {
    pub service: Box<str>,
    pub span: SpanData,
}

/// Span counts, shared by the proxy's side and the exporter task.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub queued: AtomicU64,
    pub exported: AtomicU64,
    pub dropped: AtomicU64,
    pub failed: AtomicU64,
}

/// How the task batches and calls the exporter.
#[derive(Clone, Copy, Debug)]
pub(super) struct Batching {
    /// Spans per batch, at most.
    pub max_spans: usize,
    /// How long a batch waits for more spans after its first.
    pub delay: Duration,
    /// Deadline of one export call (retries included).
    pub timeout: Duration,
    /// Export errors are logged at most this often.
    pub warn_every: Duration,
}

impl Batching {
    pub const DEFAULT: Batching = Batching {
        max_spans: 512,
        delay: Duration::from_millis(200),
        timeout: Duration::from_secs(5),
        warn_every: Duration::from_secs(10),
    };
}

/// Rate-limited warnings about failed exports.
struct Warnings {
    every: Duration,
    last: Option<Instant>,
    /// Spans failed since the last warning.
    failed: u64,
}

impl Warnings {
    fn failed(&mut self, endpoint: &str, spans: u64, error: &str) {
        self.failed += spans;
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < self.every)
        {
            return;
        }
        tracing::warn!(
            endpoint,
            spans_lost = self.failed,
            error,
            "trace export failed"
        );
        self.last = Some(now);
        self.failed = 0;
    }
}

/// Exports what arrives on `queue` until every sender is gone and the queue is empty, then
/// shuts the exporter down.
pub(super) async fn run<E: SpanExporter + 'static>(
    mut exporter: E,
    mut queue: mpsc::Receiver<Queued>,
    counters: Arc<Counters>,
    batching: Batching,
    endpoint: String,
) {
    let max = batching.max_spans.max(1);
    let mut warnings = Warnings {
        every: batching.warn_every,
        last: None,
        failed: 0,
    };
    let mut batch = Vec::with_capacity(max);
    loop {
        if queue.recv_many(&mut batch, max).await == 0 {
            break;
        }
        let deadline = Instant::now() + batching.delay;
        while batch.len() < max {
            let room = max - batch.len();
            let more = queue.recv_many(&mut batch, room);
            match tokio::time::timeout_at(deadline, more).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let spans = std::mem::replace(&mut batch, Vec::with_capacity(max));
        export(
            &mut exporter,
            spans,
            &counters,
            &batching,
            &mut warnings,
            &endpoint,
        )
        .await;
    }
    let _ = exporter.shutdown();
}

/// Exports `batch`, one call per service name.
async fn export<E: SpanExporter>(
    exporter: &mut E,
    mut batch: Vec<Queued>,
    counters: &Counters,
    batching: &Batching,
    warnings: &mut Warnings,
    endpoint: &str,
) {
    batch.sort_by(|a, b| a.service.cmp(&b.service));
    let mut spans = batch.into_iter().peekable();
    while let Some(first) = spans.next() {
        let mut group = vec![first.span];
        while let Some(next) = spans.next_if(|q| q.service == first.service) {
            group.push(next.span);
        }
        let n = group.len() as u64;
        exporter.set_resource(
            &Resource::builder_empty()
                .with_service_name(String::from(first.service))
                .build(),
        );
        let result = match tokio::time::timeout(batching.timeout, exporter.export(group)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {:?}", batching.timeout)),
        };
        match result {
            Ok(()) => counters.exported.fetch_add(n, Ordering::Relaxed),
            Err(e) => {
                warnings.failed(endpoint, n, &e);
                counters.failed.fetch_add(n, Ordering::Relaxed)
            }
        };
    }
}
