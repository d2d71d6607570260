//! Access logs: one line per HTTP request and per TCP connection, from the flow each record
//! emits, written off the data path.
//!
//! [`AccessLog::log`] formats the line on the caller's thread and hands it to a writer thread
//! over a bounded queue ([`QUEUE_LINES`] lines); it never waits. When the queue is full (the
//! file or the reader of stdout is slower than the traffic) the line is dropped and counted
//! ([`AccessLog::dropped`]), and so is a line the writer failed to write.
//!
//! # Text format
//!
//! Envoy's default format, so that what reads Envoy's (and Istio's) access logs reads weft's,
//! followed by weft's fields, in Istio's order where Istio has them:
//!
//! ```text
//! [%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" %RESPONSE_CODE%
//! %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%
//! "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" "%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%"
//! "%UPSTREAM_HOST%" %UPSTREAM_CLUSTER% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS%
//! %SOURCE_WORKLOAD% %SOURCE_PRINCIPAL% %DESTINATION_WORKLOAD% %DESTINATION_PRINCIPAL%
//! %CONNECTION_SECURITY_POLICY% "%ROUTE_NAME%" %VERDICT% "%POLICY%" "%ERROR%"
//! ```
//!
//! on one line, for example (an HTTP request, then a TCP connection):
//!
//! ```text
//! [2024-05-01T12:34:56.789Z] "GET /api/items?page=2 HTTP/1.1" 200 - 17 1234 12 9 "-" "curl/8.5.0" "7f0c6a1e" "web.back:80" "10.244.2.2:8080" outbound|80||web.back.svc.cluster.local 10.96.0.10:80 10.244.1.2 front/client spiffe://cluster.local/ns/front/sa/client back/web spiffe://cluster.local/ns/back/sa/web mutual_tls "VirtualService back/web http[0]" forwarded "-" "-"
//! [2024-05-01T12:34:56.789Z] "- - -" 0 UF 120 0 3001 - "-" "-" "-" "-" "10.244.2.7:5432" outbound|5432||db.back.svc.cluster.local 10.96.0.40:5432 10.244.1.2 front/client spiffe://cluster.local/ns/front/sa/client back/db - none "-" connect_failed "-" "connection refused"
//! ```
//!
//! | Field | HTTP request | TCP connection |
//! |---|---|---|
//! | `START_TIME` | the request's head arrived (UTC, `%Y-%m-%dT%H:%M:%S.%3fZ`) | the connection was accepted |
//! | method, path, protocol | as the client sent them (`HTTP/1.1`, `HTTP/2`) | `- - -` |
//! | `RESPONSE_CODE` | the status the client got, `0` when none | `0` |
//! | `RESPONSE_FLAGS` | Envoy's flags (`NR`, `UH`, `UF`, `URX`, `DC`, …) | from the verdict, below |
//! | `BYTES_RECEIVED` | request body bytes from the client | bytes from the client |
//! | `BYTES_SENT` | response body bytes to the client | bytes to the client |
//! | `DURATION` | whole ms, head to end of response | whole ms, accept to close |
//! | `X-ENVOY-UPSTREAM-SERVICE-TIME` | whole ms, request sent upstream to response head | `-` |
//! | `X-FORWARDED-FOR`, `USER-AGENT`, `X-REQUEST-ID`, `:AUTHORITY` | as the client sent them | `"-"` |
//! | `UPSTREAM_HOST` | the endpoint (`ip:port`) of the last attempt | the address weft connected to |
//! | `UPSTREAM_CLUSTER` | the Service called, named as Istio names its clusters: `outbound\|<port>\|\|<name>.<namespace>.svc.cluster.local` (the port the client called) | same |
//! | `DOWNSTREAM_LOCAL_ADDRESS` | the `ip:port` the client called, before redirection | same |
//! | `DOWNSTREAM_REMOTE_ADDRESS` | the client's IP (weft does not keep its port) | same |
//! | `SOURCE_WORKLOAD`, `DESTINATION_WORKLOAD` | `<namespace>/<workload>`, the workload as Istio names it | same |
//! | `SOURCE_PRINCIPAL`, `DESTINATION_PRINCIPAL` | SPIFFE ids | same |
//! | `CONNECTION_SECURITY_POLICY` | `mutual_tls` (carried over HBONE), else `none` | same |
//! | `ROUTE_NAME` | the rule that matched (`VirtualService ns/name http[1]`) | `-` |
//! | `VERDICT` | what weft did ([`Verdict`]: `forwarded`, `denied`, …) | same |
//! | `POLICY` | the policy that denied it (`namespace/name`) | same |
//! | `ERROR` | what went wrong, for anything that did not end cleanly | same |
//!
//! Whatever is not known is `-` (Envoy's rule). A value with a `"`, a `\` or a control
//! character is escaped as in JSON (`\"`, `\\`, `\n`, `\r`, `\t`, `\u0001`), so a line is one
//! line and its quoted fields end where they seem to: what a client sends cannot forge fields.
//!
//! ## Response flags of a connection
//!
//! An HTTP request carries the flags weft set when it answered (`http.response_flags`). A TCP
//! connection's come from its verdict, as Istio's `istio_tcp_*` metrics label them (see
//! [`super::tcp_flags`]): Envoy's flags, and ztunnel's `DENY` where Envoy has none.
//!
//! | Verdict | Flag | Why |
//! |---|---|---|
//! | `forwarded` | `-` | relayed |
//! | `responded` | `-` | weft answered (HTTP; the request's own flags say how) |
//! | `no_endpoint` | `UH` | Envoy: no healthy upstream host |
//! | `connect_failed` | `UF` | Envoy: upstream connection failure (refused, unreachable, timed out) |
//! | `denied` | `DENY` | ztunnel's flag for a connection an AuthorizationPolicy denied (Envoy's RBAC filter sets none); `POLICY` names the policy |
//! | `malformed` | `DPE` | Envoy: downstream protocol error |
//! | `over_limit` | `OM` | Envoy: the overload manager refused it; here a connection limit of weft's (`--max-connections`, `--max-connections-per-pod`) |
//! | `unidentified` | `NR` | Envoy: no route (no filter chain) for the connection; its destination is unknown |
//! | `unhandled` | `NR` | the connection never reached the proxy: nothing routed it |
//!
//! # JSON format
//!
//! One object per line, with the same fields under stable snake_case names: `start_time`,
//! `method`, `path`, `protocol`, `response_code`, `response_flags`, `bytes_received`,
//! `bytes_sent`, `duration`, `upstream_service_time`, `x_forwarded_for`, `user_agent`,
//! `request_id`, `authority`, `upstream_host`, `upstream_cluster`, `downstream_local_address`,
//! `downstream_remote_address`, `source_workload`, `source_namespace`, `source_principal`,
//! `destination_workload`, `destination_namespace`, `destination_principal`,
//! `destination_service` (the Service's host name, `web.back.svc.cluster.local`),
//! `connection_security_policy`, `grpc_status`, `route_name`, `node` (the reporting node),
//! `verdict`, `policy`, `error`. Numbers are numbers (durations in whole ms), what is not known
//! is `null`; workloads are names, without their namespace.

use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use time::format_description::BorrowedFormatItem;
use time::macros::format_description;
use time::UtcOffset;
use tracing::{info, warn};

use crate::admin::api::{Flow, Text, Verdict, NO_FLAGS};
use crate::registry::CLUSTER_DOMAIN;

/// Lines the queue to the writer holds; beyond them, lines are dropped.
pub const QUEUE_LINES: usize = 8192;

/// Lines the writer gathers into one write (at most, and while the queue has them).
const BATCH_LINES: usize = 256;
/// Bytes past which the writer stops gathering and writes.
const BATCH_BYTES: usize = 64 * 1024;

/// Envoy's `%START_TIME%`: `%Y-%m-%dT%H:%M:%S.%3fZ`, in UTC.
const START_TIME: &[BorrowedFormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");

/// How each line is written.
#[derive(clap::ValueEnum, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum AccessLogFormat {
    /// Envoy's default format, then weft's fields.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl std::fmt::Display for AccessLogFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AccessLogFormat::Text => "text",
            AccessLogFormat::Json => "json",
        })
    }
}

/// Where the lines go: `off`, `stdout`, or a file (any other value: its path).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccessLogTarget {
    Off,
    Stdout,
    /// Appended to (created if need be); a file named `off` or `stdout` is `./off`.
    Path(PathBuf),
}

impl std::str::FromStr for AccessLogTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "" => Err("access log: expected off, stdout or a file path".to_string()),
            "off" => Ok(AccessLogTarget::Off),
            "stdout" => Ok(AccessLogTarget::Stdout),
            path => Ok(AccessLogTarget::Path(PathBuf::from(path))),
        }
    }
}

impl std::fmt::Display for AccessLogTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AccessLogTarget::Off => f.write_str("off"),
            AccessLogTarget::Stdout => f.write_str("stdout"),
            AccessLogTarget::Path(p) => write!(f, "{}", p.display()),
        }
    }
}

/// The node's access log: a queue to a writer thread, or nothing (`off`).
pub struct AccessLog {
    sink: Option<Sink>,
}

struct Sink {
    tx: SyncSender<String>,
    format: AccessLogFormat,
    /// The node a flow without one is attributed to.
    node: Text,
    counts: Arc<Counts>,
}

#[derive(Default)]
struct Counts {
    written: AtomicU64,
    dropped: AtomicU64,
}

/// Where the writer writes.
enum Output {
    /// The process's stdout, locked for each write: lines never interleave with other
    /// writers' there.
    Stdout,
    /// A file opened for appending (or, in tests, any writer).
    Writer(Box<dyn Write + Send>),
}

impl Output {
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Output::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(bytes)?;
                out.flush()
            }
            Output::Writer(w) => {
                w.write_all(bytes)?;
                w.flush()
            }
        }
    }
}

impl AccessLog {
    /// An access log writing to `target` in `format`; flows without a node are attributed to
    /// `reporter_node`. A file is opened (for appending, created if need be) now, so a path
    /// that cannot be written to is an error here rather than lines lost later.
    pub fn new(
        target: AccessLogTarget,
        format: AccessLogFormat,
        reporter_node: &str,
    ) -> anyhow::Result<AccessLog> {
        let output = match target {
            AccessLogTarget::Off => return Ok(AccessLog::off()),
            AccessLogTarget::Stdout => Output::Stdout,
            AccessLogTarget::Path(path) => {
                let file = OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(&path)
                    .with_context(|| {
                        format!("access log {}: cannot open it to append", path.display())
                    })?;
                Output::Writer(Box::new(file))
            }
        };
        AccessLog::start(output, format, reporter_node, QUEUE_LINES)
    }

    /// No access log: [`AccessLog::log`] does nothing.
    pub fn off() -> AccessLog {
        AccessLog { sink: None }
    }

    /// Starts the writer thread, with a queue of `capacity` lines.
    fn start(
        output: Output,
        format: AccessLogFormat,
        reporter_node: &str,
        capacity: usize,
    ) -> anyhow::Result<AccessLog> {
        let (tx, rx) = sync_channel(capacity);
        let counts = Arc::new(Counts::default());
        let written = counts.clone();
        std::thread::Builder::new()
            .name("weft-access-log".into())
            .spawn(move || write_lines(rx, output, &written))
            .context("access log: cannot start its writer thread")?;
        Ok(AccessLog {
            sink: Some(Sink {
                tx,
                format,
                node: reporter_node.into(),
                counts,
            }),
        })
    }

    /// Whether lines are written anywhere.
    pub fn enabled(&self) -> bool {
        self.sink.is_some()
    }

    /// Never blocks: formats the line on the caller's thread and hands it to a dedicated writer
    /// thread over a bounded channel (capacity [`QUEUE_LINES`] lines); when full, the line is
    /// dropped and counted.
    pub fn log(&self, flow: &Flow) {
        let Some(sink) = &self.sink else { return };
        let line = match sink.format {
            AccessLogFormat::Text => text_line(flow),
            AccessLogFormat::Json => {
                let node = if flow.node.is_empty() {
                    &*sink.node
                } else {
                    &*flow.node
                };
                json_line_of(flow, node)
            }
        };
        if sink.tx.try_send(line).is_err() {
            let before = sink.counts.dropped.fetch_add(1, Ordering::Relaxed);
            if before == 0 {
                warn!("access log: the writer falls behind, lines are dropped (and counted)");
            }
        }
    }

    /// Lines dropped: the queue was full, or the writer could not write them.
    pub fn dropped(&self) -> u64 {
        self.sink
            .as_ref()
            .map_or(0, |s| s.counts.dropped.load(Ordering::Relaxed))
    }

    /// Lines written.
    pub fn written(&self) -> u64 {
        self.sink
            .as_ref()
            .map_or(0, |s| s.counts.written.load(Ordering::Relaxed))
    }
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("format", &self.sink.as_ref().map(|s| s.format))
            .field("written", &self.written())
            .field("dropped", &self.dropped())
            .finish()
    }
}

/// The writer thread: writes the lines as they come, several at once when they queue up, until
/// every [`AccessLog`] sending to it is gone and the queue is empty.
fn write_lines(rx: Receiver<String>, mut output: Output, counts: &Counts) {
    let mut batch = String::with_capacity(BATCH_BYTES);
    let mut failing = false;
    while let Ok(line) = rx.recv() {
        batch.clear();
        batch.push_str(&line);
        batch.push('\n');
        let mut lines = 1u64;
        while (lines as usize) < BATCH_LINES && batch.len() < BATCH_BYTES {
            let Ok(line) = rx.try_recv() else { break };
            batch.push_str(&line);
            batch.push('\n');
            lines += 1;
        }
        match output.write_all(batch.as_bytes()) {
            Ok(()) => {
                counts.written.fetch_add(lines, Ordering::Relaxed);
                if failing {
                    failing = false;
                    info!("access log: writing again");
                }
            }
            Err(e) => {
                counts.dropped.fetch_add(lines, Ordering::Relaxed);
                if !failing {
                    failing = true;
                    warn!(error = %e, "access log: cannot write, lines are dropped until it can");
                }
            }
        }
    }
}

/// A connection's response flags, from its verdict (see the module documentation).
pub fn tcp_response_flags(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Forwarded | Verdict::Responded => NO_FLAGS,
        Verdict::NoEndpoint => "UH",
        Verdict::ConnectFailed => "UF",
        Verdict::Denied => "DENY",
        Verdict::Malformed => "DPE",
        // Envoy's overload flag: the proxy itself had no room for the connection.
        Verdict::OverLimit => "OM",
        Verdict::Unidentified | Verdict::Unhandled => "NR",
    }
}

/// The flow's line in the text format (without the newline). Pure.
pub fn text_line(flow: &Flow) -> String {
    let mut out = String::with_capacity(512);
    out.push('[');
    push_start_time(&mut out, flow);
    out.push_str("] ");
    match &flow.http {
        Some(h) => {
            let texts = h.texts.get();
            out.push('"');
            push_field(&mut out, &h.method);
            out.push(' ');
            push_field(&mut out, texts.path);
            out.push(' ');
            push_field(&mut out, &h.protocol);
            out.push('"');
            let _ = write!(out, " {} ", h.status);
            push_field(&mut out, &h.response_flags);
            let _ = write!(
                out,
                " {} {} {} ",
                flow.bytes_sent,
                flow.bytes_received,
                whole_ms(flow.duration_ms)
            );
            match h.upstream_service_time_ms {
                Some(ms) => {
                    let _ = write!(out, "{}", whole_ms(ms));
                }
                None => out.push('-'),
            }
            for value in [
                texts.forwarded_for,
                texts.user_agent,
                texts.request_id,
                Some(texts.authority),
                h.upstream.as_deref(),
            ] {
                out.push(' ');
                push_quoted(&mut out, value);
            }
        }
        None => {
            let _ = write!(
                out,
                "\"- - -\" 0 {} {} {} {} - \"-\" \"-\" \"-\" \"-\" ",
                tcp_response_flags(flow.verdict),
                flow.bytes_sent,
                flow.bytes_received,
                whole_ms(flow.duration_ms)
            );
            push_quoted(&mut out, flow.destination.address.as_deref());
        }
    }
    let (source, destination) = (&flow.source, &flow.destination);
    out.push(' ');
    push_opt(&mut out, upstream_cluster(flow).as_deref());
    out.push(' ');
    push_field(&mut out, &flow.original_destination);
    out.push(' ');
    match source.ip {
        Some(ip) => {
            let _ = write!(out, "{ip}");
        }
        None => out.push('-'),
    }
    out.push(' ');
    push_workload(&mut out, &source.namespace, &source.workload);
    out.push(' ');
    push_opt(&mut out, source.identity.as_deref());
    out.push(' ');
    push_workload(&mut out, &destination.namespace, &destination.workload);
    out.push(' ');
    push_opt(&mut out, destination.identity.as_deref());
    out.push(' ');
    out.push_str(security_policy(flow));
    out.push(' ');
    push_quoted(
        &mut out,
        flow.http.as_ref().and_then(|h| h.route.as_deref()),
    );
    out.push(' ');
    out.push_str(flow.verdict.as_str());
    out.push(' ');
    push_quoted(&mut out, flow.policy.as_deref());
    out.push(' ');
    push_quoted(&mut out, flow.error.as_deref());
    out
}

/// The flow's line in the JSON format (one object, without the newline). Pure.
pub fn json_line(flow: &Flow) -> String {
    json_line_of(flow, &flow.node)
}

/// The JSON line, attributed to `node`.
fn json_line_of(flow: &Flow, node: &str) -> String {
    // Unknown and empty are both `null`, as both are `-` in the text format.
    fn text(s: &str) -> Option<&str> {
        Some(s).filter(|s| !s.is_empty())
    }
    fn known(s: Option<&str>) -> Option<&str> {
        s.filter(|s| !s.is_empty())
    }
    let mut start_time = String::with_capacity(24);
    push_start_time(&mut start_time, flow);
    let http = flow.http.as_ref();
    let texts = http.map(|h| h.texts.get());
    let line = JsonLine {
        start_time,
        method: http.and_then(|h| text(&h.method)),
        path: texts.and_then(|t| text(t.path)),
        protocol: http.and_then(|h| text(&h.protocol)),
        response_code: http.map_or(0, |h| h.status),
        response_flags: match http {
            Some(h) if !h.response_flags.is_empty() => h.response_flags.as_ref(),
            Some(_) => NO_FLAGS,
            None => tcp_response_flags(flow.verdict),
        },
        bytes_received: flow.bytes_sent,
        bytes_sent: flow.bytes_received,
        duration: whole_ms(flow.duration_ms),
        upstream_service_time: http.and_then(|h| h.upstream_service_time_ms.map(whole_ms)),
        x_forwarded_for: known(texts.and_then(|t| t.forwarded_for)),
        user_agent: known(texts.and_then(|t| t.user_agent)),
        request_id: known(texts.and_then(|t| t.request_id)),
        authority: texts.and_then(|t| text(t.authority)),
        upstream_host: match http {
            Some(h) => known(h.upstream.as_deref()),
            None => known(flow.destination.address.as_deref()),
        },
        upstream_cluster: upstream_cluster(flow),
        downstream_local_address: text(&flow.original_destination),
        downstream_remote_address: flow.source.ip.map(|ip| ip.to_string()),
        source_workload: known(flow.source.workload.as_deref()),
        source_namespace: known(flow.source.namespace.as_deref()),
        source_principal: known(flow.source.identity.as_deref()),
        destination_workload: known(flow.destination.workload.as_deref()),
        destination_namespace: known(flow.destination.namespace.as_deref()),
        destination_principal: known(flow.destination.identity.as_deref()),
        destination_service: destination_service(flow).map(service_host),
        connection_security_policy: security_policy(flow),
        grpc_status: http.and_then(|h| h.grpc_status),
        route_name: known(http.and_then(|h| h.route.as_deref())),
        node,
        verdict: flow.verdict.as_str(),
        policy: known(flow.policy.as_deref()),
        error: known(flow.error.as_deref()),
    };
    // Every field is a string, a number or null: serializing cannot fail.
    serde_json::to_string(&line).unwrap_or_default()
}

/// One line of the JSON format (see the module documentation).
#[derive(Serialize)]
struct JsonLine<'a> {
    start_time: String,
    method: Option<&'a str>,
    path: Option<&'a str>,
    protocol: Option<&'a str>,
    response_code: u16,
    response_flags: &'a str,
    bytes_received: u64,
    bytes_sent: u64,
    duration: u64,
    upstream_service_time: Option<u64>,
    x_forwarded_for: Option<&'a str>,
    user_agent: Option<&'a str>,
    request_id: Option<&'a str>,
    authority: Option<&'a str>,
    upstream_host: Option<&'a str>,
    upstream_cluster: Option<String>,
    downstream_local_address: Option<&'a str>,
    downstream_remote_address: Option<String>,
    source_workload: Option<&'a str>,
    source_namespace: Option<&'a str>,
    source_principal: Option<&'a str>,
    destination_workload: Option<&'a str>,
    destination_namespace: Option<&'a str>,
    destination_principal: Option<&'a str>,
    destination_service: Option<String>,
    connection_security_policy: &'static str,
    grpc_status: Option<u16>,
    route_name: Option<&'a str>,
    node: &'a str,
    verdict: &'static str,
    policy: Option<&'a str>,
    error: Option<&'a str>,
}

/// Istio's `connection_security_policy`.
fn security_policy(flow: &Flow) -> &'static str {
    if flow.mtls {
        "mutual_tls"
    } else {
        "none"
    }
}

/// Milliseconds, whole (truncated, as Envoy's `%DURATION%`).
fn whole_ms(ms: f64) -> u64 {
    // `as` saturates: negative and NaN are 0.
    ms as u64
}

/// The Service's host name: `namespace/name` → `name.namespace.svc.cluster.local`; anything
/// else (a host already) as it is.
fn service_host(service: &str) -> String {
    match service.split_once('/') {
        Some((namespace, name)) if !name.contains('.') => {
            format!("{name}.{namespace}.svc.{CLUSTER_DOMAIN}")
        }
        Some((_, host)) => host.to_string(),
        None => service.to_string(),
    }
}

/// The Service called (`namespace/name`), if any.
fn destination_service(flow: &Flow) -> Option<&str> {
    flow.destination
        .service
        .as_deref()
        .filter(|s| !s.is_empty())
}

/// Istio's name of the cluster of the Service called: `outbound|<port>||<host>`, the port the
/// client called; `None` when no Service was. On the destination's node (a call that came in a
/// tunnel), Istio's inbound cluster: `inbound|<pod port>||`.
fn upstream_cluster(flow: &Flow) -> Option<String> {
    if flow.inbound {
        let port = flow
            .destination
            .address
            .as_deref()
            .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
            .map(|a| a.port().to_string())
            .unwrap_or_default();
        return Some(format!("inbound|{port}||"));
    }
    let host = service_host(destination_service(flow)?);
    let port = flow
        .original_destination
        .parse::<std::net::SocketAddr>()
        .ok()
        .map(|a| a.port());
    Some(match port {
        Some(port) => format!("outbound|{port}||{host}"),
        None => format!("outbound|||{host}"),
    })
}

fn push_start_time(out: &mut String, flow: &Flow) {
    let utc = flow.time.to_offset(UtcOffset::UTC);
    match utc.format(START_TIME) {
        Ok(t) => out.push_str(&t),
        Err(_) => out.push('-'),
    }
}

/// `namespace/workload`, `-` when neither is known.
fn push_workload(out: &mut String, namespace: &Option<Text>, workload: &Option<Text>) {
    if namespace.is_none() && workload.is_none() {
        out.push('-');
        return;
    }
    push_opt(out, namespace.as_deref());
    out.push('/');
    push_opt(out, workload.as_deref());
}

/// `value` in quotes, `"-"` when unknown or empty.
fn push_quoted(out: &mut String, value: Option<&str>) {
    out.push('"');
    push_opt(out, value);
    out.push('"');
}

fn push_opt(out: &mut String, value: Option<&str>) {
    push_field(out, value.unwrap_or(""));
}

/// `value`, escaped; `-` when empty.
fn push_field(out: &mut String, value: &str) {
    if value.is_empty() {
        out.push('-');
    } else {
        push_escaped(out, value);
    }
}

/// `value` with `"`, `\` and control characters escaped as JSON escapes them.
fn push_escaped(out: &mut String, value: &str) {
    let plain = |c: char| c != '"' && c != '\\' && !c.is_control();
    if value.chars().all(plain) {
        out.push_str(value);
        return;
    }
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use time::macros::datetime;

    use super::*;
    use crate::admin::api::{FlowDestination, FlowSource, HttpFlow, RequestTexts, Texts};

    fn request() -> Flow {
        Flow {
            seq: 7,
            time: datetime!(2024-05-01 12:34:56.789654 UTC),
            node: "node-a".into(),
            source: Arc::new(FlowSource {
                namespace: Some("front".into()),
                pod: Some("client-5d8f7-x2kqp".into()),
                ip: Some("10.244.1.2".parse().unwrap()),
                identity: Some("spiffe://cluster.local/ns/front/sa/client".into()),
                workload: Some("client".into()),
            }),
            original_destination: "10.96.0.10:80".into(),
            destination: Arc::new(FlowDestination {
                namespace: Some("back".into()),
                pod: Some("web-0".into()),
                service: Some("back/web".into()),
                address: Some("10.244.2.2:8080".into()),
                identity: Some("spiffe://cluster.local/ns/back/sa/web".into()),
                workload: Some("web".into()),
            }),
            protocol: "http".into(),
            verdict: Verdict::Forwarded,
            bytes_sent: 17,
            bytes_received: 1234,
            duration_ms: 12.999,
            error: None,
            cgroup_id: Some(42),
            mtls: true,
            policy: None,
            http: Some(HttpFlow {
                protocol: "HTTP/1.1".into(),
                method: "GET".into(),
                texts: RequestTexts::new(Texts {
                    authority: "web.back:80",
                    path: "/api/items?page=2",
                    request_id: Some("7f0c6a1e"),
                    user_agent: Some("curl/8.5.0"),
                    forwarded_for: None,
                }),
                status: 200,
                response_flags: "-".into(),
                route: Some("VirtualService back/web http[0]".into()),
                upstream: Some("10.244.2.2:8080".into()),
                attempts: 1,
                duration_ms: 12.999,
                upstream_service_time_ms: Some(9.6),
                grpc_status: None,
            }),
            inbound: false,
        }
    }

    fn connection() -> Flow {
        Flow {
            time: datetime!(2024-05-01 14:34:56.789 +2),
            node: "node-a".into(),
            source: Arc::new(FlowSource {
                namespace: Some("front".into()),
                pod: Some("client-5d8f7-x2kqp".into()),
                ip: Some("10.244.1.2".parse().unwrap()),
                identity: Some("spiffe://cluster.local/ns/front/sa/client".into()),
                workload: Some("client".into()),
            }),
            original_destination: "10.96.0.40:5432".into(),
            destination: Arc::new(FlowDestination {
                namespace: Some("back".into()),
                pod: Some("db-0".into()),
                service: Some("back/db".into()),
                address: Some("10.244.2.7:5432".into()),
                identity: None,
                workload: Some("db".into()),
            }),
            verdict: Verdict::ConnectFailed,
            bytes_sent: 120,
            bytes_received: 0,
            duration_ms: 3001.4,
            error: Some("connection refused".into()),
            ..Flow::default()
        }
    }

    #[test]
    fn the_destinations_node_logs_istios_inbound_cluster() {
        let flow = Flow {
            inbound: true,
            ..request()
        };
        let line = text_line(&flow);
        assert!(line.contains(" inbound|8080|| "), "{line}");
        let json: serde_json::Value = serde_json::from_str(&json_line(&flow)).unwrap();
        assert_eq!(json["upstream_cluster"], "inbound|8080||");
    }

    #[test]
    fn an_http_request_is_envoys_default_line_then_wefts_fields() {
        assert_eq!(
            text_line(&request()),
            "[2024-05-01T12:34:56.789Z] \"GET /api/items?page=2 HTTP/1.1\" 200 - 17 1234 12 9 \
             \"-\" \"curl/8.5.0\" \"7f0c6a1e\" \"web.back:80\" \"10.244.2.2:8080\" \
             outbound|80||web.back.svc.cluster.local 10.96.0.10:80 10.244.1.2 front/client \
             spiffe://cluster.local/ns/front/sa/client back/web \
             spiffe://cluster.local/ns/back/sa/web mutual_tls \
             \"VirtualService back/web http[0]\" forwarded \"-\" \"-\""
        );
    }

    #[test]
    fn a_tcp_connection_is_envoys_tcp_line_then_wefts_fields() {
        assert_eq!(
            text_line(&connection()),
            "[2024-05-01T12:34:56.789Z] \"- - -\" 0 UF 120 0 3001 - \"-\" \"-\" \"-\" \"-\" \
             \"10.244.2.7:5432\" outbound|5432||db.back.svc.cluster.local 10.96.0.40:5432 \
             10.244.1.2 front/client spiffe://cluster.local/ns/front/sa/client back/db - none \
             \"-\" connect_failed \"-\" \"connection refused\""
        );

        // Nothing known (a connection without a redirect record): every field is `-`.
        let unknown = Flow {
            verdict: Verdict::Unidentified,
            ..Flow::default()
        };
        assert_eq!(
            text_line(&unknown),
            "[1970-01-01T00:00:00.000Z] \"- - -\" 0 NR 0 0 0 - \"-\" \"-\" \"-\" \"-\" \"-\" \
             - - - - - - - none \"-\" unidentified \"-\" \"-\""
        );
    }

    #[test]
    fn a_connections_flags_come_from_its_verdict_as_in_the_metrics() {
        for verdict in Verdict::ALL {
            let flow = Flow {
                verdict,
                ..connection()
            };
            let flags = tcp_response_flags(verdict);
            assert_eq!(flags, super::super::tcp_flags(verdict), "{verdict}");
            let line = text_line(&flow);
            let fields: Vec<&str> = line.split(' ').collect();
            assert_eq!(fields[5], flags, "{verdict}");
        }
        let denied = Flow {
            verdict: Verdict::Denied,
            policy: Some("back/deny-front".into()),
            ..connection()
        };
        assert!(
            text_line(&denied).ends_with(" denied \"back/deny-front\" \"connection refused\""),
            "{}",
            text_line(&denied)
        );
    }

    #[test]
    fn json_has_every_field() {
        let v: serde_json::Value = serde_json::from_str(&json_line(&request())).unwrap();
        let want = serde_json::json!({
            "start_time": "2024-05-01T12:34:56.789Z",
            "method": "GET",
            "path": "/api/items?page=2",
            "protocol": "HTTP/1.1",
            "response_code": 200,
            "response_flags": "-",
            "bytes_received": 17,
            "bytes_sent": 1234,
            "duration": 12,
            "upstream_service_time": 9,
            "x_forwarded_for": null,
            "user_agent": "curl/8.5.0",
            "request_id": "7f0c6a1e",
            "authority": "web.back:80",
            "upstream_host": "10.244.2.2:8080",
            "upstream_cluster": "outbound|80||web.back.svc.cluster.local",
            "downstream_local_address": "10.96.0.10:80",
            "downstream_remote_address": "10.244.1.2",
            "source_workload": "client",
            "source_namespace": "front",
            "source_principal": "spiffe://cluster.local/ns/front/sa/client",
            "destination_workload": "web",
            "destination_namespace": "back",
            "destination_principal": "spiffe://cluster.local/ns/back/sa/web",
            "destination_service": "web.back.svc.cluster.local",
            "connection_security_policy": "mutual_tls",
            "grpc_status": null,
            "route_name": "VirtualService back/web http[0]",
            "node": "node-a",
            "verdict": "forwarded",
            "policy": null,
            "error": null,
        });
        assert_eq!(v, want);

        // A connection: no request fields, its flags from the verdict.
        let v: serde_json::Value = serde_json::from_str(&json_line(&connection())).unwrap();
        let obj = v.as_object().unwrap();
        assert_eq!(obj.len(), want.as_object().unwrap().len());
        for key in ["method", "path", "protocol", "user_agent", "route_name"] {
            assert!(obj[key].is_null(), "{key}");
        }
        assert_eq!(obj["response_code"], 0);
        assert_eq!(obj["response_flags"], "UF");
        assert_eq!(obj["upstream_host"], "10.244.2.7:5432");
        assert_eq!(obj["connection_security_policy"], "none");
        assert_eq!(obj["error"], "connection refused");
        assert_eq!(obj["duration"], 3001);
    }

    /// The fields of a text line: separated by spaces, a quoted one ending at the first quote
    /// no backslash escapes.
    fn fields_of(line: &str) -> Vec<String> {
        let mut fields = Vec::new();
        let mut chars = line.chars().peekable();
        while chars.peek().is_some() {
            let mut field = String::new();
            if chars.peek() == Some(&'"') {
                field.push(chars.next().unwrap());
                while let Some(c) = chars.next() {
                    field.push(c);
                    match c {
                        '\\' => field.extend(chars.next()),
                        '"' => break,
                        _ => {}
                    }
                }
            } else {
                while let Some(c) = chars.next_if(|c| *c != ' ') {
                    field.push(c);
                }
            }
            chars.next_if_eq(&' ');
            fields.push(field);
        }
        fields
    }

    #[test]
    fn what_a_client_sends_cannot_break_a_line() {
        let mut flow = request();
        let h = flow.http.as_mut().unwrap();
        h.texts = RequestTexts::new(Texts {
            user_agent: Some("evil\" 500 - \"x\\y\nforged line\r\t\u{1}\u{7f}é"),
            forwarded_for: Some(""),
            ..h.texts.get()
        });
        let line = text_line(&flow);
        assert!(!line.contains('\n') && !line.contains('\r'), "{line}");
        assert!(
            line.contains(
                " \"-\" \"evil\\\" 500 - \\\"x\\\\y\\nforged line\\r\\t\\u0001\\u007fé\" "
            ),
            "{line}"
        );
        // Read as Envoy's lines are read (quoted fields end at an unescaped quote), the line
        // has its 25 fields, the user agent still the 10th.
        let fields = fields_of(&line);
        assert_eq!(fields.len(), 25, "{fields:?}");
        assert!(fields[9].starts_with("\"evil\\\""), "{}", fields[9]);
        assert_eq!(fields[10], "\"7f0c6a1e\"");
        assert_eq!(fields_of(&text_line(&request())).len(), 25);

        // JSON escapes as JSON does, and reads back the very same value.
        let json = json_line(&flow);
        assert!(!json.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(
            v["user_agent"],
            "evil\" 500 - \"x\\y\nforged line\r\t\u{1}\u{7f}é"
        );
        // Empty is unknown.
        assert!(v["x_forwarded_for"].is_null());
    }

    #[test]
    fn targets_and_formats_parse_and_print() {
        for (s, target) in [
            ("off", AccessLogTarget::Off),
            ("stdout", AccessLogTarget::Stdout),
            (
                "/var/log/weft/access.log",
                AccessLogTarget::Path("/var/log/weft/access.log".into()),
            ),
            ("./off", AccessLogTarget::Path("./off".into())),
        ] {
            assert_eq!(s.parse::<AccessLogTarget>().unwrap(), target);
            assert_eq!(target.to_string(), s);
        }
        assert!("".parse::<AccessLogTarget>().is_err());
        use clap::ValueEnum;
        assert_eq!(
            AccessLogFormat::from_str("json", false),
            Ok(AccessLogFormat::Json)
        );
        assert_eq!(AccessLogFormat::default().to_string(), "text");
        assert_eq!(
            serde_json::to_string(&AccessLogFormat::Json).unwrap(),
            "\"json\""
        );
    }

    #[test]
    fn off_logs_nothing_and_a_path_that_cannot_be_opened_is_an_error() {
        fn shared_by_threads<T: Send + Sync>() {}
        shared_by_threads::<AccessLog>();

        let off = AccessLog::new(AccessLogTarget::Off, AccessLogFormat::Text, "n").unwrap();
        assert!(!off.enabled());
        off.log(&request());
        assert_eq!((off.written(), off.dropped()), (0, 0));

        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no/such/dir/access.log");
        let err = AccessLog::new(
            AccessLogTarget::Path(missing.clone()),
            AccessLogFormat::Text,
            "n",
        )
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains(&missing.display().to_string()), "{msg}");
        assert!(msg.contains("No such file"), "{msg}");
    }

    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn the_writer_appends_lines_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        std::fs::write(&path, "kept\n").unwrap();
        let log = AccessLog::new(
            AccessLogTarget::Path(path.clone()),
            AccessLogFormat::Json,
            "node-z",
        )
        .unwrap();
        assert!(log.enabled());
        let n = 2000u64;
        for i in 0..n {
            let flow = Flow {
                bytes_sent: i,
                // A flow without a node: the log's.
                node: "".into(),
                ..connection()
            };
            log.log(&flow);
        }
        wait_for("the lines", || log.written() + log.dropped() == n);
        assert_eq!(log.dropped(), 0);
        let text = std::fs::read_to_string(&path).unwrap();
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("kept"));
        for (i, line) in lines.enumerate() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["bytes_received"], i as u64);
            assert_eq!(v["node"], "node-z");
        }
        assert_eq!(text.lines().count() as u64, n + 1);
    }

    #[test]
    fn a_full_queue_drops_and_counts_without_blocking() {
        // A pipe nobody reads: the writer blocks once the pipe's buffer is full.
        let (read, write) = nix::unistd::pipe().unwrap();
        let output = Output::Writer(Box::new(std::fs::File::from(write)));
        let log = AccessLog::start(output, AccessLogFormat::Text, "n", QUEUE_LINES).unwrap();
        let flow = request();
        let n = 3 * QUEUE_LINES as u64;
        let started = Instant::now();
        for _ in 0..n {
            log.log(&flow);
        }
        let took = started.elapsed();
        // The queue, what the pipe holds and the batch being written are all that got in.
        let most = QUEUE_LINES as u64 + 2 * BATCH_LINES as u64;
        assert!(log.dropped() >= n - most, "dropped {}", log.dropped());
        assert!(log.written() + log.dropped() <= n);
        assert!(took < Duration::from_secs(10), "logging took {took:?}");

        // Once nobody can read the pipe, the writer fails, drops what is left and ends.
        drop(read);
        wait_for("the writer to drop the rest", || {
            log.dropped() + log.written() == n
        });
    }
}
