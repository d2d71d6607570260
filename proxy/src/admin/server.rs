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

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

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

use tokio::sync::broadcast;

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

/// Serves `router` on a Unix socket (replacing a stale socket file) until the task is dropped.
pub async fn serve_unix(path: &Path, router: Router) -> anyhow::Result<()> {
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
    axum::serve(listener, router)
        .await
        .context("admin socket server")
}

/// Binds the admin TCP address; the returned future serves it.
pub async fn bind_tcp(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding admin address {addr}"))
}

pub async fn serve_tcp(listener: tokio::net::TcpListener, router: Router) -> anyhow::Result<()> {
    axum::serve(listener, router)
        .await
        .context("admin TCP server")
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
