//! One HTTP exchange, as both directions of the data path serve it: a client connection served
//! with hyper (HTTP/1.1 through the [`guard::Guarded`] smuggling guard, or HTTP/2), each request
//! shaped for its upstream, each response recorded when its body ends ([`body::Recorded`]), and
//! the responses weft makes itself.
//!
//! May import: `admin::api`, `drain`, `l7`, `relay` (`Woken`: the drain's watch polled only
//! when it wakes), `telemetry`, `upstream`, `tunnel` (an HTTP/2 `CONNECT` stream as bytes, for
//! an upgrade).

pub mod body;
pub mod guard;

use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::uri::{PathAndQuery, Scheme};
use http::{
    header, HeaderMap, HeaderValue, Method, Request, Response, Uri, Version as HttpVersion,
};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use self::body::{Counted, Counter};
use self::guard::{parser_limit, Guarded};
use crate::admin::api::{HttpFlow, RequestTexts, Texts, Verdict, NO_FLAGS};
use crate::batch;
use crate::drain::Draining;
use crate::l7::hygiene;
use crate::l7::respond::{self, Flag};
use crate::relay::Woken;
use crate::telemetry::{ConnectionRecord, RequestRecord, RequestTemplate};
use crate::upstream::http::{Body, Received, Upgrade, Version};

/// The body of a response weft returns to the client: an error ends it abruptly (hyper closes
/// an HTTP/1.1 connection, resets an HTTP/2 stream).
pub type ResponseBody = BoxBody<Bytes, BoxError>;

/// Why a response body ended abruptly.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// HTTP the client speaks on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientVersion {
    Http1,
    Http2,
}

impl ClientVersion {
    pub fn as_version(self) -> Version {
        match self {
            ClientVersion::Http1 => Version::Http1,
            ClientVersion::Http2 => Version::Http2,
        }
    }
}

/// Serves one client connection: `handle` answers each request. HTTP/1.1 is read through the
/// guard (refusals are answered 400/431); a connection that ends in a protocol error is
/// recorded as a `DPE` request. Returns how many requests were served.
///
/// While the node drains, an HTTP/1.1 client is answered `Connection: close` (the connection
/// ends after the response, so an idle keep-alive connection is never closed under a request
/// on its way, as Envoy drains), an HTTP/2 client is sent `GOAWAY` and its open streams are
/// served to their end; at the drain timeout the connection is closed.
pub async fn serve<S, F, Fut>(
    io: S,
    version: ClientVersion,
    max_head: usize,
    template: &RequestTemplate,
    record: &mut ConnectionRecord,
    draining: &Draining,
    handle: F,
) -> (u64, Option<String>)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<ResponseBody>> + Send + 'static,
{
    let requests = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = requests.clone();
    let drain = draining.clone();
    let svc = service_fn(move |req| {
        counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        respond(&handle, req, version, drain.clone())
    });
    let refusal = Arc::new(Mutex::new(None));
    let served = match version {
        ClientVersion::Http1 => {
            let io = Guarded::new(io, max_head, refusal.clone());
            let progress = io.progress();
            let conn = hyper::server::conn::http1::Builder::new()
                // A client may half-close after its request and still wait for the answer.
                .half_close(true)
                .max_buf_size(parser_limit(max_head))
                .timer(TokioTimer::new())
                // Timed by the guard's watcher instead (`guard::watch`).
                .header_read_timeout(None)
                .serve_connection(TokioIo::new(io), svc)
                .with_upgrades();
            // Closed by its responses while draining (above): only the deadline is watched.
            // The drain and the watcher are polled only when they wake, not at every turn of
            // the connection.
            record
                .serve(async {
                    let cut = std::pin::pin!(draining.cut());
                    let cut = Woken::new(cut);
                    let watch = std::pin::pin!(guard::watch(&progress));
                    let watch = Woken::new(watch);
                    tokio::select! {
                        served = conn => Ok(served),
                        why = cut => Err(why),
                        why = watch => Err(why),
                    }
                })
                .await
        }
        ClientVersion::Http2 => {
            let io = guard::Moving::new(io);
            let progress = io.progress();
            // The frames of all the streams one turn of the connection answers, in one write.
            let (io, flusher) = batch::batched(io);
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_header_list_size(max_head as u32)
                .serve_connection(TokioIo::new(io), svc);
            let conn = flusher.around(conn);
            record
                .serve(async {
                    tokio::pin!(conn);
                    let started = std::pin::pin!(draining.started());
                    let started = Woken::new(started);
                    // Idle (no byte either way for the idle timeout): told to go away as when
                    // the node drains; its open streams, if any, are served to their end.
                    let watch = std::pin::pin!(guard::watch(&progress));
                    let watch = Woken::new(watch);
                    tokio::select! {
                        served = conn.as_mut() => return Ok(served),
                        _ = started => conn.as_mut().engine().graceful_shutdown(),
                        why = watch => {
                            debug!(%why, "HTTP/2 client connection: GOAWAY");
                            conn.as_mut().engine().graceful_shutdown();
                        }
                    }
                    let cut = std::pin::pin!(draining.cut());
                    let cut = Woken::new(cut);
                    tokio::select! {
                        served = conn => Ok(served),
                        why = cut => Err(why),
                    }
                })
                .await
        }
    };
    let requests = requests.load(std::sync::atomic::Ordering::Relaxed);
    let served = match served {
        Ok(served) => served,
        Err(cut) => return (requests, Some(cut)),
    };
    match served {
        Ok(()) => (requests, None),
        Err(e) if e.is_parse() || e.is_parse_too_large() || refusal.lock().is_some() => {
            // Not HTTP: answered 400/431 by the server, recorded as a request that went nowhere.
            let refused = refusal.lock().take();
            let status = match &refused {
                Some(hygiene::Violation::HeadTooLarge(_)) => 431,
                _ if e.is_parse_too_large() => 431,
                _ => 400,
            };
            let why = match refused {
                Some(v) => v.to_string(),
                None => e.to_string(),
            };
            let r = template.start(HttpFlow {
                protocol: crate::telemetry::shared(version.as_version().as_str()),
                ..HttpFlow::default()
            });
            r.finish(
                Verdict::Malformed,
                status,
                Flag::DownstreamProtocolError.as_str(),
                Some(why),
            );
            (requests + 1, None)
        }
        Err(e) => {
            debug!(error = %e, "HTTP connection ended with an error");
            (requests, Some(e.to_string()))
        }
    }
}

/// One request's answer from `handle`, closed (`Connection: close`) when the node drains an
/// HTTP/1.1 client. The handler's future (routing, retries, the upstream exchange, the record:
/// kilobytes) is boxed here, once, for the request's time only: hyper moves the future it is
/// handed, and keeps an HTTP/1.1 connection's service future in an allocation of that future's
/// size for as long as the connection lives, which an idle keep-alive connection would hold for
/// nothing.
fn respond<R, F, Fut>(
    handle: &F,
    req: R,
    version: ClientVersion,
    drain: Draining,
) -> impl Future<Output = Result<Response<ResponseBody>, Infallible>> + Send + 'static
where
    F: Fn(R) -> Fut,
    Fut: Future<Output = Response<ResponseBody>> + Send + 'static,
{
    // Written into its allocation where the compiler can: boxing a future already made copies
    // all of it.
    let fut = Box::into_pin(Box::write(Box::<Fut>::new_uninit(), handle(req)));
    async move {
        let mut response = fut.await;
        if version == ClientVersion::Http1
            && drain.is_draining()
            && response.status() != http::StatusCode::SWITCHING_PROTOCOLS
        {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        Ok(response)
    }
}

/// Both sides of an exchange that left HTTP (a WebSocket or other upgrade, a `CONNECT`), as
/// bytes until either ends. Counted in flight while the node drains, and closed at its drain
/// timeout.
pub async fn splice_upgraded(
    client: hyper::upgrade::OnUpgrade,
    upstream: Upgrade,
    draining: Draining,
) {
    let _hold = draining.hold();
    let client = match client.await {
        Ok(c) => TokioIo::new(c),
        Err(e) => return debug!(error = %e, "upgrade did not complete"),
    };
    match upstream {
        Upgrade::Http1(u) => match u.await {
            Ok(u) => splice(client, TokioIo::new(u), &draining).await,
            Err(e) => debug!(error = %e, "upgrade did not complete"),
        },
        Upgrade::Http2(send, recv) => {
            splice(client, crate::tunnel::Stream::new(send, recv), &draining).await;
        }
        Upgrade::None => debug!("upgrade did not complete: the upstream carries none"),
    }
}

/// Copies both ways until both end, or until weft drains.
async fn splice<C, U>(mut c: C, mut u: U, draining: &Draining)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let closing = std::pin::pin!(draining.closing());
    let closing = Woken::new(closing);
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut c, &mut u) => {}
        _ = closing => {
            use tokio::io::AsyncWriteExt;
            let _ = tokio::join!(c.shutdown(), u.shutdown());
        }
    }
}

/// The response the client gets from an upstream's: hop-by-hop headers dropped, in the
/// client's HTTP version, recorded when its body ends.
pub fn client_response<H: body::Held>(
    resp: Response<Received>,
    client: ClientVersion,
    record: RequestRecord,
    sent: Counter,
    deadline: Option<tokio::time::Instant>,
    in_flight: Option<H>,
) -> Response<ResponseBody> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.version = match client {
        ClientVersion::Http1 => HttpVersion::HTTP_11,
        ClientVersion::Http2 => {
            own_values(&mut parts.headers);
            HttpVersion::HTTP_2
        }
    };
    let status = parts.status.as_u16();
    let mut record = record;
    if record.is_grpc() {
        // A trailers-only response carries its status in the head.
        if let Some(g) = grpc_status(&parts.headers) {
            record.grpc_status(g);
        }
    }
    let body = body::Recorded::new(body, record, sent, status, deadline, in_flight);
    Response::from_parts(parts, body.boxed())
}

/// Copies each value of `headers` into an allocation of its own.
///
/// A parsed header value is a slice of the buffer its connection read it into (hyper's HTTP/1.1
/// read buffer, an HTTP/2 frame's), and keeps all of that buffer alive. An HTTP/2 connection's
/// HPACK encoder keeps the values it indexes until newer ones push them out of its 4 KiB table:
/// a value passed from one connection to another's HTTP/2 encoder as it was would hold a read
/// buffer of the first (8 KiB or more) for each entry of the second's table, for as long as that
/// connection lives. Each value its own (not all of a message's in one buffer), an entry holds
/// its own bytes only, and a full table about what it counts. Done once per message headed for
/// an HTTP/2 peer.
pub fn own_values(headers: &mut HeaderMap) {
    for v in headers.values_mut() {
        // The same bytes as a value they were: they cannot fail to be one.
        if let Ok(mut own) = HeaderValue::from_bytes(v.as_bytes()) {
            own.set_sensitive(v.is_sensitive());
            *v = own;
        }
    }
}

/// What a request's flow keeps of its headers as the client sent them: `User-Agent` and
/// `X-Forwarded-For` (taken before this hop appends its client to the latter). The values are
/// the header map's own (cloning one copies no bytes), until [`ClientHeaders::texts`] packs them
/// with the rest.
pub struct ClientHeaders {
    user_agent: Option<HeaderValue>,
    forwarded_for: Option<HeaderValue>,
}

impl ClientHeaders {
    pub fn of(headers: &HeaderMap) -> ClientHeaders {
        ClientHeaders {
            user_agent: headers.get(header::USER_AGENT).cloned(),
            forwarded_for: headers.get(hygiene::X_FORWARDED_FOR).cloned(),
        }
    }

    /// The request's texts for its flow: these headers with what else it was asked with.
    pub fn texts(&self, authority: &str, path: &str, request_id: Option<&str>) -> RequestTexts {
        fn text(v: Option<&HeaderValue>) -> Option<Cow<'_, str>> {
            v.map(|v| String::from_utf8_lossy(v.as_bytes()))
        }
        let user_agent = text(self.user_agent.as_ref());
        let forwarded_for = text(self.forwarded_for.as_ref());
        RequestTexts::new(Texts {
            authority,
            path,
            request_id,
            user_agent: user_agent.as_deref(),
            forwarded_for: forwarded_for.as_deref(),
        })
    }
}

/// `content-type: application/grpc` (or `application/grpc+proto`, `;…`).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("application/grpc"))
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('+') || rest.starts_with(';'))
}

/// A header name looked up by a `HeaderName` already made: a `&str` is parsed and checked
/// at every lookup.
const GRPC_STATUS: header::HeaderName = header::HeaderName::from_static("grpc-status");

/// The `grpc-status` of a response head or trailers.
pub fn grpc_status(headers: &HeaderMap) -> Option<u16> {
    headers
        .get(GRPC_STATUS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

pub fn authority_of<B>(req: &Request<B>) -> String {
    req.uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default()
}

pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.method() == Method::CONNECT || req.headers().contains_key(header::UPGRADE)
}

/// The request as the upstream gets it: origin-form with `Host` for HTTP/1.1, absolute with
/// the authority for HTTP/2.
pub fn upstream_request<B>(
    req: Request<B>,
    version: Version,
    authority: &str,
    sent: &Counter,
) -> Request<Body>
where
    B: http_body::Body<Data = Bytes, Error = hyper::Error> + Send + Sync + Unpin + 'static,
{
    let (mut parts, body) = req.into_parts();
    if parts.method != Method::CONNECT {
        let pq = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        match version {
            Version::Http1 => {
                parts.version = HttpVersion::HTTP_11;
                if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
                    parts.uri = Uri::from(pq);
                }
                if let Ok(h) = HeaderValue::from_str(authority) {
                    parts.headers.insert(header::HOST, h);
                }
            }
            Version::Http2 => {
                parts.version = HttpVersion::HTTP_2;
                if let Ok(uri) = Uri::builder()
                    .scheme(Scheme::HTTP)
                    .authority(authority)
                    .path_and_query(pq)
                    .build()
                {
                    parts.uri = uri;
                }
                parts.headers.remove(header::HOST);
                own_values(&mut parts.headers);
            }
        }
    }
    let body = Counted {
        inner: body,
        count: sent.clone(),
        frames: body::GrpcFrames::default(),
    };
    Request::from_parts(parts, body.boxed())
}

/// Response headers that belong to the upstream connection, not the message.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let names = &hygiene::HOP_BY_HOP[..hygiene::CONNECTION_OWN];
    // Only those present are looked up again: most responses carry one or none.
    let present = hygiene::present(headers, names);
    if present != 0 {
        for (i, name) in names.iter().enumerate() {
            if present & (1 << i) != 0 {
                headers.remove(name);
            }
        }
    }
}

pub fn empty() -> ResponseBody {
    Full::new(Bytes::new()).map_err(|e| match e {}).boxed()
}

pub fn body_of(resp: Response<Bytes>) -> Response<ResponseBody> {
    resp.map(|b| Full::new(b).map_err(|e| match e {}).boxed())
}

/// A response weft makes itself, recorded with its flag.
pub fn own(
    record: RequestRecord,
    verdict: Verdict,
    flag: Flag,
    error: Option<String>,
) -> Response<ResponseBody> {
    let resp = flag.response();
    record.finish(verdict, resp.status().as_u16(), flag.as_str(), error);
    body_of(resp)
}

/// `403 RBAC: access denied` (no flag, as Envoy's RBAC filter; the policy is on the record).
pub fn denied(record: RequestRecord) -> Response<ResponseBody> {
    let resp = respond::denied();
    record.finish(Verdict::Denied, 403, NO_FLAGS, Some(respond::RBAC_DENIED));
    body_of(resp)
}

#[cfg(test)]
mod tests;
