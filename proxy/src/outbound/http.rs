//! The outbound HTTP path: a captured connection whose destination speaks HTTP is served here
//! instead of being relayed as bytes. Each request is routed on its own (the route table in
//! force when its head arrived), sent to an endpoint chosen for it over a reused upstream
//! connection — an HBONE tunnel to the endpoint's node, a plain connection on this node, or
//! egress with TLS origination — and recorded as one flow with its `http` part.
//!
//! - HTTP/1.1 clients are read through the [`H1Guard`]; HTTP/2 (h2c prior knowledge) clients
//!   are served as such. WebSocket upgrades and `CONNECT` are passed through as bytes once the
//!   upstream agrees.
//! - What weft answers itself carries Envoy's response flags (see [`crate::l7::respond`]).

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context as TaskContext, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{
    header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version as HttpVersion,
};
use http_body::{Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tracing::debug;

use super::balance::RoundRobin;
use super::plan::{self, Action, Context, Destination, Refusal, Source};
use crate::admin::api::{HttpFlow, Verdict, NO_FLAGS};
use crate::inputs::ProxyInputs;
use crate::l7::hygiene::{self, Feed, H1Guard, Violation};
use crate::l7::respond::{self, Flag};
use crate::registry::{Pod, Service, ServicePort};
use crate::telemetry::{ConnectionRecord, RequestRecord, RequestTemplate};
use crate::tunnel::client::Pool;
use crate::upstream::http::{Body, HttpPool, PoolKey, Sender, Version};
use crate::upstream::tls::{Origination, Originator};
use crate::upstream::OnBehalfOf;

/// The body of a response weft returns to the client.
pub type ResponseBody = Body;

/// Limits and timings of the HTTP path.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Largest request head (request line and headers) accepted; larger gets 431.
    pub max_request_headers: usize,
}

/// HTTP the client speaks on this connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientVersion {
    Http1,
    Http2,
}

impl ClientVersion {
    fn as_version(self) -> Version {
        match self {
            ClientVersion::Http1 => Version::Http1,
            ClientVersion::Http2 => Version::Http2,
        }
    }
}

/// What the client called, as its connection's plan resolved it.
#[derive(Debug, Clone)]
pub enum Called {
    /// A Service VIP and port.
    Service {
        service: Arc<Service>,
        port: ServicePort,
    },
    /// A pod's address.
    Pod { pod: Arc<Pod>, addr: SocketAddr },
    /// Anything else.
    Other { addr: SocketAddr },
}

/// The HTTP protocol a destination port declares (Service `appProtocol` or port name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Declared {
    Http1,
    Http2,
}

/// One HTTP connection's shared state.
struct Conn {
    source: Source,
    called: Called,
    declared: Option<Declared>,
    client: ClientVersion,
    template: RequestTemplate,
    requests: AtomicU64,
}

/// Serves HTTP connections of the capture listener.
pub struct HttpPath {
    inputs: Arc<ProxyInputs>,
    tunnels: Pool,
    clients: HttpPool,
    tls: Originator,
    balancer: RoundRobin,
    config: HttpConfig,
}

impl HttpPath {
    pub fn new(inputs: Arc<ProxyInputs>, tunnels: Pool, config: HttpConfig) -> HttpPath {
        HttpPath {
            inputs,
            tunnels,
            clients: HttpPool::default(),
            tls: Originator::default(),
            balancer: RoundRobin::default(),
            config,
        }
    }

    /// Serves `client` until it closes; every request is a flow of its own.
    pub async fn serve(
        self: &Arc<Self>,
        client: TcpStream,
        version: ClientVersion,
        source: Source,
        called: Called,
        declared: Option<Declared>,
        mut record: ConnectionRecord,
    ) {
        let _ = client.set_nodelay(true);
        let conn = Arc::new(Conn {
            template: record.requests(),
            source,
            called,
            declared,
            client: version,
            requests: AtomicU64::new(0),
        });
        let this = self.clone();
        let c = conn.clone();
        let svc = service_fn(move |req| {
            let this = this.clone();
            let conn = c.clone();
            async move { Ok::<_, Infallible>(this.request(req, &conn).await) }
        });
        let refusal = Arc::new(Mutex::new(None));
        let served = match version {
            ClientVersion::Http1 => {
                let io = Guarded::new(client, self.config.max_request_headers, refusal.clone());
                let conn = hyper::server::conn::http1::Builder::new()
                    .max_buf_size(parser_limit(self.config.max_request_headers))
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(30))
                    .serve_connection(TokioIo::new(io), svc)
                    .with_upgrades();
                record.serve(conn).await
            }
            ClientVersion::Http2 => {
                let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .max_header_list_size(self.config.max_request_headers as u32)
                    .serve_connection(TokioIo::new(client), svc);
                record.serve(conn).await
            }
        };
        let requests = conn.requests.load(Ordering::Relaxed);
        match served {
            Ok(()) => record.finish_http(requests, None::<&str>),
            Err(e) if e.is_parse() || e.is_parse_too_large() || refusal.lock().is_some() => {
                // The client sent something that is not HTTP: it was answered 400/431 by the
                // server, and is recorded as a request that went nowhere.
                let status = if e.is_parse_too_large() { 431 } else { 400 };
                let why = match refusal.lock().take() {
                    Some(v) => v.to_string(),
                    None => e.to_string(),
                };
                let mut r = conn.template.start(HttpFlow {
                    protocol: version.as_version().as_str().into(),
                    ..HttpFlow::default()
                });
                r.bytes(0, 0);
                r.finish(
                    Verdict::Malformed,
                    status,
                    Flag::DownstreamProtocolError.as_str(),
                    Some(why),
                );
                record.finish_http(1, None::<&str>);
            }
            Err(e) => {
                debug!(error = %e, "HTTP connection ended with an error");
                record.finish_http(requests, Some(e));
            }
        }
    }

    async fn request(&self, mut req: Request<Incoming>, conn: &Conn) -> Response<ResponseBody> {
        conn.requests.fetch_add(1, Ordering::Relaxed);
        let authority = authority_of(&req);
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| req.uri().to_string());
        let mut record = conn.template.start(HttpFlow {
            protocol: conn.client.as_version().as_str().into(),
            method: req.method().to_string(),
            authority: authority.clone(),
            path,
            ..HttpFlow::default()
        });
        let upgrade = conn.client == ClientVersion::Http1 && is_upgrade(&req);
        let id = hygiene::prepare(req.headers_mut(), conn.source.ip, upgrade);
        record.request_id(&id);

        let (service, endpoints, balance_key) = match &conn.called {
            Called::Service { service, port } => {
                record.service(service);
                let snapshot = self.inputs.registry.snapshot();
                let eps: Vec<(SocketAddr, Option<Arc<Pod>>)> = snapshot
                    .endpoints(service, port)
                    .into_iter()
                    .map(|e| (e.addr, Some(e.pod)))
                    .collect();
                let key = format!("{}/{}:{}", service.namespace, service.name, port.port);
                (Some(service.clone()), eps, key)
            }
            Called::Pod { pod, addr } => (None, vec![(*addr, Some(pod.clone()))], addr.to_string()),
            Called::Other { addr } => (None, vec![(*addr, None)], addr.to_string()),
        };
        let _ = service;
        let version = upstream_version(conn.declared, conn.client);
        let target = Target {
            endpoints,
            balance_key,
            version,
            authority,
            tls: None,
        };
        self.forward(req, conn, record, target, upgrade).await
    }

    /// Sends `req` to an endpoint of `target` and returns its response (or weft's own).
    async fn forward(
        &self,
        mut req: Request<Incoming>,
        conn: &Conn,
        mut record: RequestRecord,
        target: Target,
        upgrade: bool,
    ) -> Response<ResponseBody> {
        let Some(i) = self
            .balancer
            .pick(&target.balance_key, target.endpoints.len())
        else {
            return own(record, Verdict::NoEndpoint, Flag::NoHealthyUpstream, None);
        };
        let (addr, pod) = target.endpoints[i].clone();
        let snapshot = self.inputs.registry.snapshot();
        let policies = self.inputs.policies.load();
        let mut dest = Destination::default();
        let action = plan::to_endpoint(
            &conn.source,
            addr,
            pod.clone(),
            &mut dest,
            &Context {
                node: &self.inputs.node,
                trust_domain: &self.inputs.trust_domain,
                hbone_port: self.inputs.hbone_port,
                snapshot: &snapshot,
                policies: &policies,
                balancer: &self.balancer,
            },
        );
        drop((snapshot, policies));
        let mtls = matches!(action, Action::Tunnel(_));
        record.upstream(addr, pod.as_deref(), dest.identity.as_ref(), mtls);
        let (via, connect): (String, Connect) = match action {
            Action::Refuse(Refusal::Denied { policy, .. }) => {
                record.policy(policy);
                return denied(record);
            }
            Action::Refuse(Refusal::NoEndpoint) => {
                return own(record, Verdict::NoEndpoint, Flag::NoHealthyUpstream, None);
            }
            Action::Refuse(r) => {
                return own(
                    record,
                    Verdict::ConnectFailed,
                    Flag::UpstreamConnectionFailure,
                    Some(r.to_string()),
                );
            }
            Action::Tunnel(hbone) => (format!("hbone {}", hbone.source), Connect::Tunnel(hbone)),
            Action::DeliverLocal { target: t } | Action::Passthrough { target: t } => {
                match &target.tls {
                    Some(o) => (format!("tls {}", o.sni), Connect::Tls(t, o.clone())),
                    None => ("direct".to_string(), Connect::Direct(t)),
                }
            }
        };
        let key = PoolKey {
            endpoint: addr,
            via,
            version: target.version,
        };
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let sent = Counter::default();
        let req = upstream_request(req, target.version, &target.authority, &sent);
        let mut sender = match self.clients.checkout(&key) {
            Some(s) => s,
            None => match self
                .open(&connect, conn.source.pod.as_deref(), target.version)
                .await
            {
                Ok(s) => s,
                Err(Opened::Denied(policy)) => {
                    if let Some(p) = policy {
                        record.policy(p);
                    }
                    return denied(record);
                }
                Err(Opened::Failed(e)) => {
                    return own(
                        record,
                        Verdict::ConnectFailed,
                        Flag::UpstreamConnectionFailure,
                        Some(e),
                    );
                }
            },
        };
        let resp = match sender.send(req).await {
            Ok(r) => r,
            Err(e) => {
                let flag = if e.is_closed() || e.is_incomplete_message() || e.is_canceled() {
                    Flag::UpstreamConnectionTermination
                } else {
                    Flag::UpstreamRemoteReset
                };
                return own(record, Verdict::ConnectFailed, flag, Some(e.to_string()));
            }
        };
        let mut resp = resp;
        let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS
            || (upgrade && resp.status().is_success() && is_connect_response(&record));
        if let (true, Some(client_upgrade)) = (switching, client_upgrade) {
            // Both sides agreed to leave HTTP: from now on, bytes.
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                match tokio::try_join!(client_upgrade, upstream_upgrade) {
                    Ok((c, u)) => {
                        let mut c = TokioIo::new(c);
                        let mut u = TokioIo::new(u);
                        let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
                    }
                    Err(e) => debug!(error = %e, "upgrade did not complete"),
                }
            });
            let status = resp.status().as_u16();
            let (parts, _) = resp.into_parts();
            record.finish(Verdict::Forwarded, status, NO_FLAGS, None::<&str>);
            return Response::from_parts(parts, empty());
        }
        self.clients.checkin(key, sender);
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        parts.version = match conn.client {
            ClientVersion::Http1 => HttpVersion::HTTP_11,
            ClientVersion::Http2 => HttpVersion::HTTP_2,
        };
        let status = parts.status.as_u16();
        let body = Recorded {
            inner: body,
            record: Some(record),
            sent,
            received: 0,
            status,
        };
        Response::from_parts(parts, body.boxed())
    }

    /// Opens a new upstream connection for the calling `pod` and speaks `version` on it.
    async fn open(
        &self,
        connect: &Connect,
        pod: Option<&Pod>,
        version: Version,
    ) -> Result<Sender, Opened> {
        let failed = |e: &dyn std::fmt::Display| Opened::Failed(e.to_string());
        let on_behalf = match pod {
            Some(p) => OnBehalfOf::Pod(p),
            None => OnBehalfOf::Unidentified,
        };
        match connect {
            Connect::Tunnel(hbone) => {
                let tunnel = self.tunnels.connect(hbone.clone()).await.map_err(|e| {
                    if e.is_denied() {
                        Opened::Denied(e.policy().map(str::to_string))
                    } else {
                        failed(&e)
                    }
                })?;
                Sender::handshake(tunnel, version)
                    .await
                    .map_err(|e| failed(&e))
            }
            Connect::Direct(addr) => {
                let tcp = self
                    .inputs
                    .connector
                    .connect(on_behalf, *addr)
                    .await
                    .map_err(|e| failed(&e))?;
                Sender::handshake(tcp, version)
                    .await
                    .map_err(|e| failed(&e))
            }
            Connect::Tls(addr, o) => {
                let tcp = self
                    .inputs
                    .connector
                    .connect(on_behalf, *addr)
                    .await
                    .map_err(|e| failed(&e))?;
                let tls = self.tls.connect(tcp, o).await.map_err(|e| failed(&e))?;
                Sender::handshake(tls, version)
                    .await
                    .map_err(|e| failed(&e))
            }
        }
    }
}

/// Where a request may go: endpoints to choose from and how to speak to them.
struct Target {
    endpoints: Vec<(SocketAddr, Option<Arc<Pod>>)>,
    balance_key: String,
    version: Version,
    /// The authority the upstream sees.
    authority: String,
    tls: Option<Origination>,
}

enum Connect {
    Tunnel(crate::tunnel::client::Hbone),
    Direct(SocketAddr),
    Tls(SocketAddr, Origination),
}

enum Opened {
    /// The destination node's policy refused the tunnel (the deciding policy, if named).
    Denied(Option<String>),
    Failed(String),
}

/// Istio's choice of upstream HTTP version: HTTP/2 to ports that declare it (`http2`, `grpc`,
/// `h2c`), HTTP/1.1 to `http` ports, the client's own version where nothing is declared.
pub fn upstream_version(declared: Option<Declared>, client: ClientVersion) -> Version {
    match declared {
        Some(Declared::Http2) => Version::Http2,
        Some(Declared::Http1) => Version::Http1,
        None => client.as_version(),
    }
}

fn authority_of<B>(req: &Request<B>) -> String {
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

fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.method() == Method::CONNECT || req.headers().contains_key(header::UPGRADE)
}

fn is_connect_response(record: &RequestRecord) -> bool {
    record.method() == "CONNECT"
}

/// The request as the upstream gets it: origin-form with `Host` for HTTP/1.1, absolute with
/// the authority for HTTP/2.
fn upstream_request(
    req: Request<Incoming>,
    version: Version,
    authority: &str,
    sent: &Counter,
) -> Request<Body> {
    let (mut parts, body) = req.into_parts();
    if parts.method != Method::CONNECT {
        let pq = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .to_string();
        match version {
            Version::Http1 => {
                parts.version = HttpVersion::HTTP_11;
                if let Ok(uri) = pq.parse() {
                    parts.uri = uri;
                }
                if let Ok(h) = HeaderValue::from_str(authority) {
                    parts.headers.insert(header::HOST, h);
                }
            }
            Version::Http2 => {
                parts.version = HttpVersion::HTTP_2;
                if let Ok(uri) = format!("http://{authority}{pq}").parse() {
                    parts.uri = uri;
                }
                parts.headers.remove(header::HOST);
            }
        }
    }
    let body = Counted {
        inner: body,
        count: sent.clone(),
    };
    Request::from_parts(parts, body.boxed())
}

/// Response headers that belong to the upstream connection, not the message.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
    ] {
        headers.remove(name);
    }
}

fn empty() -> ResponseBody {
    Full::new(Bytes::new()).map_err(|e| match e {}).boxed()
}

fn body_of(resp: Response<Bytes>) -> Response<ResponseBody> {
    resp.map(|b| Full::new(b).map_err(|e| match e {}).boxed())
}

/// A response weft makes itself, recorded with its flag.
fn own(
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
fn denied(record: RequestRecord) -> Response<ResponseBody> {
    let resp = respond::denied();
    record.finish(Verdict::Denied, 403, NO_FLAGS, Some(respond::RBAC_DENIED));
    body_of(resp)
}

/// Bytes counted as they pass.
#[derive(Clone, Default)]
struct Counter(Arc<AtomicU64>);

impl Counter {
    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A request body that counts what it carries.
struct Counted<B> {
    inner: B,
    count: Counter,
}

impl<B> http_body::Body for Counted<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(Ok(f)) = &frame {
            if let Some(d) = f.data_ref() {
                self.count.0.fetch_add(d.len() as u64, Ordering::Relaxed);
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An upstream response body that finishes the request's record when it ends (or, dropped
/// early, leaves it to the record's drop: the client went away).
struct Recorded {
    inner: Incoming,
    record: Option<RequestRecord>,
    sent: Counter,
    received: u64,
    status: u16,
}

impl Recorded {
    fn finish(&mut self, error: Option<String>) {
        if let Some(mut r) = self.record.take() {
            r.bytes(self.sent.get(), self.received);
            let flags = if error.is_some() {
                Flag::UpstreamRemoteReset.as_str()
            } else {
                NO_FLAGS
            };
            r.finish(Verdict::Forwarded, self.status, flags, error);
        }
    }
}

impl http_body::Body for Recorded {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    self.received += d.len() as u64;
                }
                if self.inner.is_end_stream() {
                    self.finish(None);
                }
            }
            Some(Err(e)) => {
                let e = e.to_string();
                self.finish(Some(e));
            }
            None => self.finish(None),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An HTTP/1 client connection read through an [`H1Guard`]: a refused head reaches the server
/// as a request line it answers 400 to, and the violation is kept for the record.
struct Guarded {
    /// Taken on drop, to drain it (see `Drop`).
    inner: Option<TcpStream>,
    guard: H1Guard,
    /// Bytes released by the guard, not yet read by the server.
    pending: Bytes,
    scratch: Box<[u8]>,
    refusal: Arc<Mutex<Option<Violation>>>,
    /// The HTTP parser's own head limit.
    parser_limit: usize,
}

impl Guarded {
    fn new(inner: TcpStream, max_head: usize, refusal: Arc<Mutex<Option<Violation>>>) -> Guarded {
        Guarded {
            inner: Some(inner),
            guard: H1Guard::new(max_head),
            pending: Bytes::new(),
            scratch: vec![0u8; 16 * 1024].into_boxed_slice(),
            refusal,
            parser_limit: parser_limit(max_head),
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending.split_to(n));
                return Poll::Ready(Ok(()));
            }
            let mut rb = ReadBuf::new(&mut this.scratch);
            let stream = this.inner.as_mut().expect("present until dropped");
            ready!(Pin::new(stream).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            if n == 0 {
                return Poll::Ready(Ok(()));
            }
            match this.guard.feed(&this.scratch[..n]) {
                Feed::Release(bytes) => this.pending = Bytes::from(bytes),
                Feed::Refuse(v) => {
                    debug!(violation = %v, "refusing an HTTP/1 request");
                    this.pending = Bytes::from(hygiene::poison(&v, this.parser_limit));
                    *this.refusal.lock() = Some(v);
                }
            }
        }
    }
}

impl Guarded {
    fn stream(&mut self) -> &mut TcpStream {
        self.inner.as_mut().expect("present until dropped")
    }
}

/// hyper's read buffer limit for a head limit (hyper needs at least 8 KiB).
fn parser_limit(max_head: usize) -> usize {
    max_head.max(8192)
}

/// How long the rest of a refused client's bytes are drained before the socket is closed.
const LINGER: Duration = Duration::from_secs(2);

impl Drop for Guarded {
    fn drop(&mut self) {
        // Closing a socket with unread input resets it, and the reset can overtake the 400/431
        // just written: drain what the client still sends for a moment (a lingering close).
        let (Some(mut s), true) = (self.inner.take(), self.guard.gave_up()) else {
            return;
        };
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let _ = s.shutdown().await;
                let mut sink = vec![0u8; 16 * 1024];
                let drain = async {
                    let mut total = 0usize;
                    while let Ok(n) = s.read(&mut sink).await {
                        total += n;
                        if n == 0 || total > 1 << 20 {
                            break;
                        }
                    }
                };
                let _ = tokio::time::timeout(LINGER, drain).await;
            });
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.stream()).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.stream()).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.stream()).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.stream()).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A guarded HTTP/1 server answering 200 to whatever it accepts; returns its address.
    async fn guarded_server(max_head: usize) -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let io = Guarded::new(s, max_head, Arc::default());
                    let svc = service_fn(|_req: Request<Incoming>| async {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .max_buf_size(parser_limit(max_head))
                        .serve_connection(TokioIo::new(io), svc)
                        .await;
                });
            }
        });
        addr
    }

    async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut c = TcpStream::connect(addr).await.unwrap();
        // Written concurrently: the server may answer before it has read everything.
        let (mut r, mut w) = c.split();
        let write = async {
            let _ = w.write_all(request).await;
        };
        let mut out = Vec::new();
        let read = async {
            let _ = r.read_to_end(&mut out).await;
        };
        let both = async {
            tokio::join!(write, read);
        };
        if tokio::time::timeout(Duration::from_secs(10), both)
            .await
            .is_err()
        {
            return format!("timed out; read so far: {}", String::from_utf8_lossy(&out));
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn smuggling_and_oversized_heads_get_answers_not_resets() {
        let addr = guarded_server(60 * 1024).await;
        let resp = exchange(addr, b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        let ok = exchange(
            addr,
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        let smuggle = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        let resp = exchange(addr, smuggle).await;
        assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
        let big = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
            "a".repeat(61 * 1024)
        );
        let resp = exchange(addr, big.as_bytes()).await;
        assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");
    }

    #[test]
    fn the_upstream_version_follows_what_the_port_declares() {
        use ClientVersion as C;
        assert_eq!(
            upstream_version(Some(Declared::Http2), C::Http1),
            Version::Http2
        );
        assert_eq!(
            upstream_version(Some(Declared::Http1), C::Http2),
            Version::Http1
        );
        assert_eq!(upstream_version(None, C::Http2), Version::Http2);
        assert_eq!(upstream_version(None, C::Http1), Version::Http1);
    }
}
