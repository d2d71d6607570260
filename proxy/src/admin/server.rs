//! The admin API server, on a Unix socket and on a loopback TCP address:
//!
//! | path | what |
//! |---|---|
//! | `/flows` | recent flows as NDJSON; `?follow=1` keeps streaming; filters `namespace`, `pod`, `verdict`, `since`, `last`, `http`, `status` (`404`, `5xx`), `path` (prefix), `method` |
//! | `/workloads` | pods known to this node, enrolled or not, with cgroup ids |
//! | `/config_dump` | effective configuration and registry snapshot summary |
//! | `/status` | programs, maps, counters, HBONE connections |
//! | `/certs` | workload certificates (SVIDs) held by this node |
//! | `/stats` | per-destination counters in Envoy's text form (`?format=json`, `?filter=<regex>`, `?usedonly`) |
//! | `/stat` | golden signals of the calls into each target as JSON rows: `by` (`deploy`, `sts`, `ds`, `job`, `cronjob`, `workload`, `pod`, `svc`, `ns`; default `deploy`), `namespace` (default: all), `window` (10s to 10m, default 1m) |
//! | `/graph` | who called whom over `window` (default 1m), as JSON edges |
//! | `/healthz/ready` | 200 once programs are attached and the registry is loaded, else 503 |
//!
//! Both listeners, and the metrics listener ([`serve_bounded`] serves it too), bound what a
//! client can hold: a ceiling of connections open at once (in total and, where clients are
//! pods, per address: more are closed at accept and counted in
//! `weft_connections_refused_total`), a time to send a request head from its first byte
//! ([`Bounds::header_timeout`], against clients that trickle it), and a time a connection may
//! stay open with no request in flight and no byte moving ([`Bounds::idle_timeout`]). A
//! request in flight is never cut: `/flows?follow=1` may wait for flows as long as it likes.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use futures::StreamExt;
use serde::Deserialize;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::broadcast;
use tracing::{debug, warn};

use crate::limits::{Admission, Limit, Listener, Reason, Slot};

use super::api::{
    parse_since, parse_window, CertInfo, ConfigDump, Flow, FlowFilter, GraphEdge, LostFlows,
    StatQuery, StatRow, Stats, Status, StatusFilter, Verdict, WorkloadInfo, STAT_WINDOW_DEFAULT,
};

/// What the admin API asks of the running node.
pub trait NodeView: Send + Sync + 'static {
    fn workloads(&self) -> Vec<WorkloadInfo>;
    fn config_dump(&self) -> ConfigDump;
    fn status(&self) -> Status;
    /// Every destination's counters, sorted by name.
    fn stats(&self) -> Stats;
    /// The workload certificates this node holds.
    fn certs(&self) -> Vec<CertInfo>;
    /// `Err(reason)` while not ready.
    fn ready(&self) -> Result<(), String>;
    /// The flows kept that match `filter`, oldest first.
    fn flows(&self, filter: &FlowFilter) -> Vec<Arc<Flow>>;
    /// The same, and a live feed of every flow recorded after them (no gap, no repeat).
    fn follow_flows(&self, filter: &FlowFilter)
        -> (Vec<Arc<Flow>>, broadcast::Receiver<Arc<Flow>>);
    /// `/stat`: the golden signals of the calls into each target.
    fn stat(&self, query: &StatQuery) -> Vec<StatRow>;
    /// `/graph`: who called whom over `window`.
    fn graph(&self, window: std::time::Duration) -> Vec<GraphEdge>;
}

#[derive(Clone)]
struct AppState {
    view: Arc<dyn NodeView>,
}

/// The admin router, shared by the Unix socket and TCP listeners.
pub fn router(view: Arc<dyn NodeView>) -> Router {
    Router::new()
        .route("/flows", get(flows_handler))
        .route(
            "/workloads",
            get(|State(s): State<AppState>| async move { Json(s.view.workloads()) }),
        )
        .route(
            "/config_dump",
            get(|State(s): State<AppState>| async move { Json(s.view.config_dump()) }),
        )
        .route(
            "/status",
            get(|State(s): State<AppState>| async move { Json(s.view.status()) }),
        )
        .route(
            "/certs",
            get(|State(s): State<AppState>| async move { Json(s.view.certs()) }),
        )
        .route("/stats", get(stats_handler))
        .route("/stat", get(stat_handler))
        .route("/graph", get(graph_handler))
        .route("/healthz/ready", get(ready_handler))
        .with_state(AppState { view })
}

/// Binds the admin TCP address ([`serve_bounded`] serves it).
pub async fn bind_tcp(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding admin address {addr}"))
}

async fn ready_handler(State(s): State<AppState>) -> Response {
    match s.view.ready() {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response(),
    }
}

#[derive(Deserialize, Default)]
struct FlowsQuery {
    namespace: Option<String>,
    pod: Option<String>,
    verdict: Option<String>,
    since: Option<String>,
    http: Option<String>,
    status: Option<String>,
    path: Option<String>,
    method: Option<String>,
    /// Only the last N matching flows from history.
    last: Option<usize>,
    follow: Option<String>,
}

#[derive(Deserialize)]
struct StatsQuery {
    filter: Option<String>,
    format: Option<String>,
    usedonly: Option<String>,
}

async fn stats_handler(State(s): State<AppState>, Query(q): Query<StatsQuery>) -> Response {
    let filter = match q.filter.as_deref().map(regex::Regex::new).transpose() {
        Ok(f) => f,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("filter: {e}\n")).into_response(),
    };
    let stats = s.view.stats().filtered(
        |name| filter.as_ref().is_none_or(|f| f.is_match(name)),
        truthy(&q.usedonly),
    );
    match q.format.as_deref() {
        Some("json") => Json(stats).into_response(),
        None | Some("text") => stats.text().into_response(),
        Some(other) => (
            StatusCode::BAD_REQUEST,
            format!("format: {other:?} is not json or text\n"),
        )
            .into_response(),
    }
}

#[derive(Deserialize)]
struct StatParams {
    by: Option<String>,
    namespace: Option<String>,
    window: Option<String>,
}

async fn stat_handler(State(s): State<AppState>, Query(q): Query<StatParams>) -> Response {
    match StatQuery::from_params(q.by.as_deref(), q.namespace.as_deref(), q.window.as_deref()) {
        Ok(query) => Json(s.view.stat(&query)).into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    }
}

#[derive(Deserialize)]
struct GraphParams {
    window: Option<String>,
}

async fn graph_handler(State(s): State<AppState>, Query(q): Query<GraphParams>) -> Response {
    match q.window.as_deref().map(parse_window).transpose() {
        Ok(window) => Json(s.view.graph(window.unwrap_or(STAT_WINDOW_DEFAULT))).into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    }
}

fn truthy(v: &Option<String>) -> bool {
    matches!(v.as_deref(), Some("1" | "true" | "yes" | ""))
}

async fn flows_handler(State(s): State<AppState>, Query(q): Query<FlowsQuery>) -> Response {
    let verdict = match q.verdict.as_deref().map(str::parse::<Verdict>).transpose() {
        Ok(v) => v,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    let since = match q
        .since
        .as_deref()
        .map(|v| parse_since(v, time::OffsetDateTime::now_utc()))
        .transpose()
    {
        Ok(v) => v,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    let status = match q
        .status
        .as_deref()
        .map(str::parse::<StatusFilter>)
        .transpose()
    {
        Ok(v) => v,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    let filter = FlowFilter {
        namespace: q.namespace,
        pod: q.pod,
        verdict,
        since,
        http: truthy(&q.http),
        status,
        path: q.path,
        method: q.method,
    };
    let (mut history, live) = if truthy(&q.follow) {
        let (kept, rx) = s.view.follow_flows(&filter);
        (kept, Some(rx))
    } else {
        (s.view.flows(&filter), None)
    };
    if let Some(n) = q.last {
        let skip = history.len().saturating_sub(n);
        history.drain(..skip);
    }
    let history = futures::stream::iter(history.into_iter().map(|f| line(&*f)));
    let body = match live {
        None => Body::from_stream(history.map(Ok::<_, Infallible>)),
        Some(rx) => {
            let live = BroadcastStream::new(rx).filter_map(move |r| {
                let out = match r {
                    Ok(f) if filter.matches(&f) => Some(line(&*f)),
                    Ok(_) => None,
                    Err(BroadcastStreamRecvError::Lagged(n)) => {
                        Some(line(&LostFlows { lost_flows: n }))
                    }
                };
                futures::future::ready(out)
            });
            Body::from_stream(history.chain(live).map(Ok::<_, Infallible>))
        }
    };
    ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response()
}

fn line(value: &impl serde::Serialize) -> Bytes {
    let mut v = serde_json::to_vec(value).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

/// How long a client of the admin or metrics listener may take (see the module comment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// From a request's first byte to the end of its head.
    pub header_timeout: Duration,
    /// With no request in flight and no byte moving.
    pub idle_timeout: Duration,
}

impl Bounds {
    /// How often a connection is looked at: a quarter of the shorter timeout, 50 ms to 1 s.
    fn tick(&self) -> Duration {
        (self.header_timeout.min(self.idle_timeout) / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(1))
    }
}

/// Who may connect to one listener: its connection limit (per client address too, where
/// `per_source`), and where refusals are counted.
#[derive(Debug, Clone)]
pub struct Gate {
    limit: Arc<Limit<IpAddr>>,
    per_source: bool,
    listener: Listener,
    admission: Arc<Admission>,
}

impl Gate {
    /// At most `max` connections at once on `listener`, and `max_per_source` from one address
    /// (`None`: no limit per address); refusals counted in `admission`.
    pub fn new(
        listener: Listener,
        max: usize,
        max_per_source: Option<usize>,
        admission: Arc<Admission>,
    ) -> Gate {
        Gate {
            limit: Limit::new(max, max_per_source.unwrap_or(usize::MAX)),
            per_source: max_per_source.is_some(),
            listener,
            admission,
        }
    }

    /// A place for a connection from `source` (`None`: a Unix socket client), or `None`
    /// (counted).
    fn admit(&self, source: Option<IpAddr>) -> Option<Slot<IpAddr>> {
        let admitted = match source.filter(|_| self.per_source) {
            Some(ip) => self.limit.admit_key(ip, Reason::PerSource),
            None => self.limit.admit().ok_or(Reason::Total),
        };
        match admitted {
            Ok(slot) => Some(slot),
            Err(reason) => {
                self.admission.refused.count(self.listener, reason);
                None
            }
        }
    }
}

/// Serves `router` on `listener` within `gate` and `bounds`, until the task is dropped.
pub async fn serve_bounded(
    listener: tokio::net::TcpListener,
    router: Router,
    gate: Gate,
    bounds: Bounds,
) -> anyhow::Result<()> {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                warn!(listener = gate.listener.as_str(), error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(slot) = gate.admit(Some(peer.ip())) else {
            debug!(listener = gate.listener.as_str(), %peer, "connection limit reached: closed");
            // A reset at once: nothing of the refused connection lingers in TIME_WAIT here.
            let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve_connection(stream, router.clone(), bounds, slot));
    }
}

/// [`serve_bounded`] on a Unix socket (replacing a stale socket file).
pub async fn serve_unix_bounded(
    path: &Path,
    router: Router,
    gate: Gate,
    bounds: Bounds,
) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing stale {}", path.display())),
    }
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("binding admin socket {}", path.display()))?;
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(error = %e, "admin socket accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(slot) = gate.admit(None) else {
            debug!("admin socket connection limit reached: closed");
            continue;
        };
        tokio::spawn(serve_connection(stream, router.clone(), bounds, slot));
    }
}

/// One HTTP/1 connection, closed when its head is too slow or it is idle too long.
async fn serve_connection<I>(io: I, router: Router, bounds: Bounds, slot: Slot<IpAddr>)
where
    I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let activity = Arc::new(Activity::new(Instant::now()));
    let io = TokioIo::new(Watched {
        inner: io,
        activity: activity.clone(),
    });
    let service = {
        let activity = activity.clone();
        let inner = TowerToHyperService::new(router);
        hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let in_flight = activity.request();
            let response = hyper::service::Service::call(&inner, req);
            async move {
                let response = response.await?;
                Ok::<_, Infallible>(response.map(|body| {
                    Body::new(Tracked {
                        body,
                        _in_flight: in_flight,
                    })
                }))
            }
        })
    };
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        // Enforced here instead (hyper's runs while a kept-alive connection waits too).
        .header_read_timeout(None)
        .serve_connection(io, service);
    tokio::pin!(conn);
    let mut every = tokio::time::interval(bounds.tick());
    let mut closing = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    debug!(error = %e, "admin/metrics connection ended");
                }
                break;
            }
            _ = every.tick() => match activity.expired(&bounds, Instant::now()) {
                Some(Expired::Header) => {
                    debug!(timeout = ?bounds.header_timeout, "request head too slow: closed");
                    break;
                }
                Some(Expired::Idle) if !closing => {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
                _ => {}
            }
        }
    }
    drop(slot);
}

/// What a connection is doing, as its reads, writes and requests tell it.
#[derive(Debug)]
struct Activity {
    start: Instant,
    /// Milliseconds since `start` of the last byte either way, or of a request's end.
    last: AtomicU64,
    /// Milliseconds since `start` of the first byte of a request head being read
    /// ([`NOT_READING`]: none).
    head_since: AtomicU64,
    in_flight: AtomicUsize,
}

const NOT_READING: u64 = u64::MAX;

/// Why a connection is to be closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expired {
    Header,
    Idle,
}

impl Activity {
    fn new(now: Instant) -> Activity {
        Activity {
            start: now,
            last: AtomicU64::new(0),
            head_since: AtomicU64::new(NOT_READING),
            in_flight: AtomicUsize::new(0),
        }
    }

    fn ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.start).as_millis() as u64
    }

    /// Bytes moved at `now`; `read`: from the client. Bytes read with no request in flight
    /// are a head being sent.
    fn moved(&self, read: bool, now: Instant) {
        let at = self.ms(now);
        self.last.store(at, Ordering::Relaxed);
        if read && self.in_flight.load(Ordering::Acquire) == 0 {
            let _ = self.head_since.compare_exchange(
                NOT_READING,
                at,
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
        }
    }

    /// A request's head is complete: it is in flight until the returned guard (held by its
    /// response body) is dropped.
    fn request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_since.store(NOT_READING, Ordering::Release);
        InFlight(self.clone())
    }

    fn expired(&self, bounds: &Bounds, now: Instant) -> Option<Expired> {
        let at = self.ms(now);
        let head = self.head_since.load(Ordering::Acquire);
        if head != NOT_READING
            && at.saturating_sub(head) >= bounds.header_timeout.as_millis() as u64
        {
            return Some(Expired::Header);
        }
        let idle = at.saturating_sub(self.last.load(Ordering::Relaxed));
        (head == NOT_READING
            && self.in_flight.load(Ordering::Acquire) == 0
            && idle >= bounds.idle_timeout.as_millis() as u64)
            .then_some(Expired::Idle)
    }
}

/// A request in flight.
#[derive(Debug)]
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.moved(false, Instant::now());
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request in flight until it is done or dropped.
struct Tracked {
    body: Body,
    _in_flight: InFlight,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A connection's byte stream, telling [`Activity`] when bytes move.
struct Watched<I> {
    inner: I,
    activity: Arc<Activity>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.moved(true, Instant::now());
        }
        r
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.moved(false, Instant::now());
        }
        r
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod bounded_tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn bounds() -> Bounds {
        Bounds {
            header_timeout: Duration::from_millis(300),
            idle_timeout: Duration::from_millis(600),
        }
    }

    #[test]
    fn a_slow_head_and_an_idle_connection_expire_a_request_in_flight_does_not() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let a = Arc::new(Activity::new(t0));
        let b = bounds();
        assert_eq!(a.expired(&b, t0 + ms(500)), None);
        assert_eq!(a.expired(&b, t0 + ms(600)), Some(Expired::Idle));
        a.moved(true, t0 + ms(100));
        assert_eq!(a.expired(&b, t0 + ms(350)), None);
        assert_eq!(a.expired(&b, t0 + ms(400)), Some(Expired::Header));
        let in_flight = a.request();
        assert_eq!(a.expired(&b, t0 + ms(5000)), None, "in flight: never cut");
        drop(in_flight);
        let now = Instant::now();
        assert_eq!(a.expired(&b, now + ms(100)), None);
        assert_eq!(a.expired(&b, now + ms(700)), Some(Expired::Idle));
    }

    async fn listener(gate: Gate) -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let router = Router::new().route("/", get(|| async { "ok" })).route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(900)).await;
                "slow"
            }),
        );
        tokio::spawn(serve_bounded(l, router, gate, bounds()));
        addr
    }

    /// Reads until the server closes; whether it answered anything.
    async fn until_closed(s: &mut tokio::net::TcpStream) -> String {
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn connections_are_limited_and_bounded_in_time() {
        let admission = Arc::new(Admission::default());
        let gate = Gate::new(Listener::Metrics, 3, Some(2), admission.clone());
        let addr = listener(gate).await;
        // Two from one address are served; a third from it is refused at once.
        let mut a = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _b = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert_eq!(until_closed(&mut c).await, "");
        assert!(admission
            .refused
            .totals()
            .contains(&(Listener::Metrics, Reason::PerSource, 1)));
        // A request in flight outlives the idle timeout; the connection is then closed idle.
        a.write_all(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let started = Instant::now();
        let answer = until_closed(&mut a).await;
        assert!(
            answer.contains("200 OK") && answer.ends_with("slow"),
            "{answer}"
        );
        assert!(
            started.elapsed() >= Duration::from_millis(1400),
            "idle after the response"
        );
        // A head sent too slowly is cut.
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let started = Instant::now();
        assert_eq!(until_closed(&mut slow).await, "");
        assert!(started.elapsed() < Duration::from_millis(550));
    }
}
