//! Outbound side of HBONE: a pool of mTLS HTTP/2 connections to other nodes, and one
//! `CONNECT` stream per tunnelled connection.
//!
//! Connections are keyed by (source identity, destination identity, destination node): a
//! connection authenticates exactly one identity pair, so it can only carry streams of that
//! pair. Each carries up to `max_streams_per_conn` streams; when all of a key's connections are
//! full a new one is dialled, and callers arriving while it is being dialled wait for it instead
//! of dialling their own. Connections idle for `idle_timeout` are closed; dead ones (closed by
//! the peer, failed, `GOAWAY`) take no new stream, and a `CONNECT` refused because of that
//! (`GOAWAY` past its stream, `REFUSED_STREAM`, the connection gone) is tried once more on a
//! fresh connection, so a destination node that restarts (and says `GOAWAY`) fails no new
//! tunnel. Every connection is pinged (HTTP/2 `PING`) every `keepalive_interval`; one whose
//! `PING` is not answered within `keepalive_timeout` is closed and leaves the pool, so a peer
//! node that vanished (link cut, powered off) is noticed without waiting for TCP. A connection
//! takes no new streams once its own or its peer's certificate has expired (rotation gives new
//! connections new certificates; open streams are never cut).
//!
//! Each data-path worker ([`crate::worker`]) streams over the connections it dialled itself,
//! as Envoy's workers do: a stream's bytes never hop between threads.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::FutureExt as _;
use h2::client::SendRequest;
use http::{Method, Request, StatusCode};
use parking_lot::Mutex;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};
use tokio_rustls::TlsConnector;
use tracing::{debug, info, warn};

use super::{
    forwarded_for, set_tcp_keepalive, Stream, CONNECTION_WINDOW, DENY_REASON_HEADER, HEADER_TABLE,
    MAX_FRAME, MAX_HEADER_LIST, POLICY_HEADER, SEND_BUFFER, STREAM_WINDOW,
};
use crate::admin::api::{PoolKeyStats, PoolStats};
use crate::batch;
use crate::identity::{sni_for, IdentityManager, SpiffeId, ALPN_H2};
use crate::netns::PodNetworks;
use crate::relay::{Relayed, Woken};
use crate::telemetry::counters::{inc, read};
use crate::telemetry::Telemetry;

/// A stream is tried on a pooled connection, then once on a fresh one if that one turned out
/// unusable (`GOAWAY`, `REFUSED_STREAM`, closed): the server did not process it, so trying again
/// is safe.
const ATTEMPTS: usize = 2;
/// How long a closing connection without streams may take to finish its in-flight frames.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Streams multiplexed on one connection before another is opened.
    pub max_streams_per_conn: usize,
    /// A connection without streams for this long is closed.
    pub idle_timeout: Duration,
    /// TCP connect + TLS handshake + HTTP/2 handshake.
    pub connect_timeout: Duration,
    /// From sending `CONNECT` to the response (the destination node connects to the pod
    /// meanwhile).
    pub response_timeout: Duration,
    /// A `PING` is sent on every connection this often (zero: never).
    pub keepalive_interval: Duration,
    /// A connection whose `PING` is not answered within this is closed and leaves the pool.
    pub keepalive_timeout: Duration,
    /// Where the calling pods' network namespaces are: a tunnel's TCP connection is opened in
    /// its source pod's, so it leaves with the pod's address (and connections are pooled per
    /// source pod). `None`: from the node.
    pub networks: Option<Arc<dyn PodNetworks>>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_streams_per_conn: 100,
            idle_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            response_timeout: Duration::from_secs(15),
            // ztunnel's HBONE pool's values: a dead peer is noticed within 30 seconds.
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(20),
            networks: None,
        }
    }
}

/// Where and as whom to open one tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hbone {
    /// The calling workload's identity (its SVID is presented).
    pub source: SpiffeId,
    /// The destination workload's identity (the only server identity accepted).
    pub destination: SpiffeId,
    /// The destination node's HBONE address (`node ip:15008`).
    pub node: SocketAddr,
    /// Destination pod `ip:port` (the `:authority`).
    pub target: SocketAddr,
    /// Source pod IP (`Forwarded: for=`).
    pub forwarded_for: IpAddr,
}

/// Why a tunnel could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TunnelError {
    /// No SVID or TLS configuration for the source identity (e.g. not hosted on this node).
    #[error("identity: {0}")]
    Identity(String),
    /// TCP connect to the node failed or timed out.
    #[error("connecting to {node}: {message}")]
    Connect { node: SocketAddr, message: String },
    /// TLS handshake failed (certificate refused either way, wrong server identity, ...).
    #[error("TLS handshake with {node}: {message}")]
    Tls { node: SocketAddr, message: String },
    /// HTTP/2 failure on the connection or the stream.
    #[error("HTTP/2 with {node}: {message}")]
    Http2 { node: SocketAddr, message: String },
    /// No response to `CONNECT` in time.
    #[error("no response from {node} within {timeout:?}")]
    Timeout { node: SocketAddr, timeout: Duration },
    /// The destination node answered with a status other than 200.
    #[error("{}", rejected_message(*.status, .policy.as_deref(), .reason.as_deref()))]
    Rejected {
        status: u16,
        /// With 403: the AuthorizationPolicy that denied.
        policy: Option<String>,
        /// With 403: why it denied (`not_allowed`, `deny_policy`, …).
        reason: Option<String>,
    },
}

fn rejected_message(status: u16, policy: Option<&str>, reason: Option<&str>) -> String {
    match status {
        403 => format!(
            "denied by the destination: policy {} ({})",
            policy.unwrap_or("(unnamed)"),
            reason.unwrap_or("no reason given")
        ),
        404 => "the destination node does not host the target (404)".into(),
        502 | 503 => format!("the destination node could not reach the target ({status})"),
        400 => "the destination node refused the request as malformed (400)".into(),
        _ => format!("the destination node answered {status}"),
    }
}

impl TunnelError {
    /// The HTTP status the destination node answered, if it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            TunnelError::Rejected { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The policy that denied the tunnel (403 with `x-weft-policy`).
    pub fn policy(&self) -> Option<&str> {
        match self {
            TunnelError::Rejected { policy, .. } => policy.as_deref(),
            _ => None,
        }
    }

    /// Why the destination's policy denied the tunnel (403 with `x-weft-deny-reason`).
    pub fn deny_reason(&self) -> Option<&str> {
        match self {
            TunnelError::Rejected { reason, .. } => reason.as_deref(),
            _ => None,
        }
    }

    /// Denied by the destination's authorization (403).
    pub fn is_denied(&self) -> bool {
        self.status() == Some(403)
    }
}

/// An open tunnel on a pooled connection: a [`Stream`] that holds its place on the connection
/// until it is dropped.
pub struct Tunnel {
    stream: Stream,
    info: Arc<ConnectionInfo>,
    /// Bytes sent ahead of the `CONNECT`'s answer ([`Pool::connect_for`]).
    early: u64,
    _slot: Slot,
}

impl Tunnel {
    /// The TLS connection this stream runs on.
    pub fn connection(&self) -> &ConnectionInfo {
        &self.info
    }

    /// Relays `client` ⇄ the tunnel until both directions end or one fails.
    /// `sent` = client → tunnel bytes, `received` = tunnel → client.
    pub fn relay(self, client: TcpStream) -> impl std::future::Future<Output = Relayed> {
        self.relay_bounded(client, std::future::pending(), None)
    }

    /// [`Tunnel::relay`], closed cleanly once `close` ends (with why) or nothing has moved
    /// for `idle_timeout`. The stream's relay itself, its count mapped (not an `async fn`
    /// around it, which would hold it twice).
    pub fn relay_bounded(
        self,
        client: TcpStream,
        close: impl std::future::Future<Output = String>,
        idle_timeout: Option<std::time::Duration>,
    ) -> impl std::future::Future<Output = Relayed> {
        let Tunnel {
            stream,
            early,
            _slot,
            ..
        } = self;
        stream
            .relay_bounded(client, std::future::pending(), close, idle_timeout)
            .map(move |mut relayed| {
                drop(_slot);
                relayed.sent += early;
                relayed
            })
    }
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("connection", &self.info.id)
            .field("stream", &self.stream)
            .finish()
    }
}

impl AsyncRead for Tunnel {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// One pooled TLS connection, as seen by its streams.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    /// Unique within the pool.
    pub id: u64,
    pub node: SocketAddr,
    /// The server's SPIFFE id (verified).
    pub peer: SpiffeId,
    /// Serial number of the server's certificate (lowercase hex).
    pub peer_serial: String,
    /// Serial number of the certificate this side presented.
    pub local_serial: String,
    /// The earlier of both certificates' notAfter: no new streams after that.
    pub expires: SystemTime,
}

/// Pool key: connections are never shared across identity pairs, nodes, or (when opened in
/// pods' namespaces) source pods.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolKey {
    pub source: SpiffeId,
    pub destination: SpiffeId,
    pub node: SocketAddr,
    /// The source pod whose namespace the connection is opened in.
    pub source_ip: Option<IpAddr>,
}

/// Shared handle; clones use the same connections.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    identity: Arc<IdentityManager>,
    config: PoolConfig,
    conns: Mutex<HashMap<PoolKey, Vec<Arc<Conn>>>>,
    next_id: AtomicU64,
    telemetry: Arc<Telemetry>,
}

struct Conn {
    id: u64,
    key: PoolKey,
    /// The worker that dialled it (and drives it).
    worker: usize,
    state: watch::Receiver<ConnState>,
    /// Streams on it, open or about to be.
    streams: AtomicUsize,
    idle_since: Mutex<Instant>,
    dead: AtomicBool,
    /// The server said `GOAWAY` (or closed cleanly) while it was being dialled: a node that
    /// began draining as it accepted; a stream waiting for it may go to a fresh one.
    went_away: AtomicBool,
    close: Notify,
}

#[derive(Clone)]
enum ConnState {
    Connecting,
    Ready(Arc<Ready>),
    Failed(TunnelError),
    Closed,
}

struct Ready {
    send: SendRequest<Bytes>,
    info: Arc<ConnectionInfo>,
}

/// A stream's claim on a connection; given back on drop.
struct Slot {
    conn: Arc<Conn>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.conn.streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.conn.idle_since.lock() = Instant::now();
        }
    }
}

impl Conn {
    fn usable(&self, now: SystemTime) -> bool {
        if self.dead.load(Ordering::Acquire) {
            return false;
        }
        match &*self.state.borrow() {
            ConnState::Connecting => true,
            ConnState::Ready(r) => now < r.info.expires && !told_to_go(&r.send),
            ConnState::Failed(_) | ConnState::Closed => false,
        }
    }

    fn kill(&self) {
        self.dead.store(true, Ordering::Release);
        self.close.notify_one();
    }

    async fn ready(&self) -> Result<Arc<Ready>, Option<TunnelError>> {
        let mut rx = self.state.clone();
        loop {
            match &*rx.borrow_and_update() {
                ConnState::Connecting => {}
                ConnState::Ready(r) => return Ok(r.clone()),
                ConnState::Failed(e) => return Err(Some(e.clone())),
                ConnState::Closed => return Err(None),
            }
            if rx.changed().await.is_err() {
                return Err(None);
            }
        }
    }
}

impl Pool {
    /// Must be called within a Tokio runtime (starts the idle reaper). Counts go to
    /// `telemetry`'s HBONE client counters.
    pub fn new(
        identity: Arc<IdentityManager>,
        config: PoolConfig,
        telemetry: Arc<Telemetry>,
    ) -> Pool {
        let inner = Arc::new(Inner {
            identity,
            config,
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            telemetry,
        });
        tokio::spawn(reap(Arc::downgrade(&inner)));
        Pool { inner }
    }

    /// Opens a tunnel: a `CONNECT` stream on a pooled (or new) connection, answered 200.
    pub async fn connect(&self, req: Hbone) -> Result<Tunnel, TunnelError> {
        self.open(req, None).await
    }

    /// [`Pool::connect`] for `client`'s connection, whose bytes follow the `CONNECT` without
    /// waiting for its answer: what the client has sent already goes in the same write as the
    /// `HEADERS`, and what it sends while the answer is on its way goes as it comes (HTTP/2
    /// lets a stream's DATA follow its HEADERS at once; the destination node reads them only
    /// once it has connected to the pod, and drops them with the stream if it refuses it). A
    /// request/response protocol's first answer then comes a node-to-node round trip sooner,
    /// whenever the client writes first. At most [`EARLY_BYTES`] go ahead of the answer; they
    /// are kept, and sent again if the `CONNECT` is retried on another connection (it was not
    /// processed). Counted in the relay's `sent`.
    pub async fn connect_for(&self, req: Hbone, client: &TcpStream) -> Result<Tunnel, TunnelError> {
        self.open(req, Some(client)).await
    }

    async fn open(&self, req: Hbone, client: Option<&TcpStream>) -> Result<Tunnel, TunnelError> {
        // A connection authenticated as an identity that has left this node carries no more
        // streams.
        if !self.inner.identity.is_local(&req.source) {
            return Err(TunnelError::Identity(format!(
                "{} is not an identity hosted on this node",
                req.source
            )));
        }
        let key = PoolKey {
            source: req.source.clone(),
            destination: req.destination.clone(),
            node: req.node,
            source_ip: self
                .inner
                .config
                .networks
                .as_ref()
                .map(|_| req.forwarded_for),
        };
        let mut early = Early::new(client);
        let mut last = None;
        for attempt in 0..ATTEMPTS {
            let fresh = attempt > 0;
            if fresh {
                inc(&self.inner.telemetry.hbone_client.streams_retried);
            }
            let slot = self.checkout(&key, fresh);
            let ready = match slot.conn.ready().await {
                Ok(r) => r,
                Err(Some(e)) if slot.conn.went_away.load(Ordering::Acquire) => {
                    last = Some(e);
                    continue;
                }
                Err(Some(e)) => return Err(e),
                // Closed before it could be used: try a fresh one.
                Err(None) => continue,
            };
            match self.open_stream(&ready, &req, &mut early).await {
                Ok((send, recv)) => {
                    inc(&self.inner.telemetry.hbone_client.streams_opened);
                    return Ok(Tunnel {
                        stream: Stream::new(send, recv),
                        info: ready.info.clone(),
                        early: early.sent,
                        _slot: slot,
                    });
                }
                Err(Open::Retry(e)) => {
                    debug!(conn = slot.conn.id, error = %e, "connection unusable, retrying on another");
                    slot.conn.kill();
                    last = Some(e);
                }
                Err(Open::Fail(e)) => {
                    if e.status().is_some() {
                        inc(&self.inner.telemetry.hbone_client.streams_rejected);
                    }
                    return Err(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| TunnelError::Http2 {
            node: req.node,
            message: "connections kept closing".into(),
        }))
    }

    /// Totals and per-key counts.
    pub fn stats(&self) -> PoolStats {
        let i = &self.inner;
        let c = &i.telemetry.hbone_client;
        let mut out = PoolStats {
            connections_opened_total: read(&c.connections_opened),
            connections_failed_total: read(&c.connections_failed),
            connections_closed_total: read(&c.connections_closed),
            streams_opened_total: read(&c.streams_opened),
            streams_rejected_total: read(&c.streams_rejected),
            keepalive_timeouts_total: read(&c.keepalive_timeouts),
            streams_retried_total: read(&c.streams_retried),
            ..Default::default()
        };
        // `checkout` takes `conns` for every tunnelled connection: only count and clone the
        // ids under it, the (slower) formatting happens after.
        let counted: Vec<(SpiffeId, SpiffeId, SocketAddr, usize, usize)> = {
            let conns = i.conns.lock();
            conns
                .iter()
                .filter_map(|(key, list)| {
                    let (live, streams) = list
                        .iter()
                        .filter(|c| !c.dead.load(Ordering::Acquire))
                        .fold((0, 0), |(n, s), c| {
                            (n + 1, s + c.streams.load(Ordering::Relaxed))
                        });
                    (live > 0).then(|| {
                        let PoolKey {
                            source,
                            destination,
                            node,
                            ..
                        } = key;
                        (source.clone(), destination.clone(), *node, live, streams)
                    })
                })
                .collect()
        };
        for (source, destination, node, live, streams) in counted {
            out.connections += live;
            out.streams_active += streams;
            out.keys.push(PoolKeyStats {
                source: source.to_string(),
                destination: destination.to_string(),
                node,
                connections: live,
                streams_active: streams,
            });
        }
        out.keys.sort_by(|a, b| {
            (&a.source, &a.destination, a.node).cmp(&(&b.source, &b.destination, b.node))
        });
        out
    }

    /// Picks a connection of `key` with a free stream slot, or starts dialling a new one
    /// (always, if `fresh`).
    fn checkout(&self, key: &PoolKey, fresh: bool) -> Slot {
        let max = self.inner.config.max_streams_per_conn.max(1);
        let now = SystemTime::now();
        let worker = crate::worker::current();
        let mut conns = self.inner.conns.lock();
        let list = conns.entry(key.clone()).or_default();
        list.retain(|c| !c.dead.load(Ordering::Acquire));
        for c in list.iter().filter(|_| !fresh) {
            if c.worker != worker || !c.usable(now) {
                continue;
            }
            let mut n = c.streams.load(Ordering::Acquire);
            while n < max {
                match c
                    .streams
                    .compare_exchange(n, n + 1, Ordering::AcqRel, Ordering::Acquire)
                {
                    Ok(_) => return Slot { conn: c.clone() },
                    Err(m) => n = m,
                }
            }
        }
        let (tx, rx) = watch::channel(ConnState::Connecting);
        let conn = Arc::new(Conn {
            id: self.inner.next_id.fetch_add(1, Ordering::Relaxed),
            key: key.clone(),
            worker,
            state: rx,
            streams: AtomicUsize::new(1),
            idle_since: Mutex::new(Instant::now()),
            dead: AtomicBool::new(false),
            went_away: AtomicBool::new(false),
            close: Notify::new(),
        });
        list.push(conn.clone());
        tokio::spawn(run_connection(self.inner.clone(), conn.clone(), tx));
        Slot { conn }
    }

    async fn open_stream(
        &self,
        ready: &Ready,
        req: &Hbone,
        early: &mut Early<'_>,
    ) -> Result<(h2::SendStream<Bytes>, h2::RecvStream), Open> {
        let node = req.node;
        let h2_err = |e: h2::Error| {
            let retry = not_processed(&e);
            let e = TunnelError::Http2 {
                node,
                message: e.to_string(),
            };
            if retry {
                Open::Retry(e)
            } else {
                Open::Fail(e)
            }
        };
        let timeout = self.inner.config.response_timeout;
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri(req.target.to_string())
            .header(http::header::FORWARDED, forwarded_for(req.forwarded_for))
            .body(())
            .map_err(|e| {
                Open::Fail(TunnelError::Http2 {
                    node,
                    message: e.to_string(),
                })
            })?;
        let exchange = async {
            let mut send = ready.send.clone().ready().await.map_err(h2_err)?;
            early.read_now();
            let (response, mut stream) = send.send_request(request, false).map_err(h2_err)?;
            for chunk in &early.chunks {
                stream.send_data(chunk.clone(), false).map_err(h2_err)?;
            }
            // While the answer is on its way, what the client sends follows.
            let mut response = std::pin::pin!(response);
            let response = loop {
                let Some(client) = early.client else {
                    break response.await;
                };
                tokio::select! {
                    biased;
                    answer = &mut response => break answer,
                    Ok(()) = client.readable() => {
                        if let Some(chunk) = early.read_now() {
                            stream.send_data(chunk, false).map_err(h2_err)?;
                        }
                    }
                }
            }
            .map_err(h2_err)?;
            Ok::<_, Open>((response, stream))
        };
        let (response, stream) = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| Open::Fail(TunnelError::Timeout { node, timeout }))??;
        if response.status() != StatusCode::OK {
            let header = |name: &str| {
                response
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            return Err(Open::Fail(TunnelError::Rejected {
                status: response.status().as_u16(),
                policy: header(POLICY_HEADER),
                reason: header(DENY_REASON_HEADER),
            }));
        }
        Ok((stream, response.into_body()))
    }
}

/// At most this much of a client's bytes goes ahead of its `CONNECT`'s answer: a request
/// head, a TLS ClientHello; the rest waits for the answer.
pub const EARLY_BYTES: usize = 16 << 10;

/// What one readiness of the client is read with before the answer: a request head, a TLS
/// ClientHello; more is read on the next turn.
const EARLY_READ: usize = 4 << 10;

/// A client's bytes read before its `CONNECT` is answered ([`Pool::connect_for`]).
struct Early<'a> {
    /// Read from while more of its bytes may go ahead: there is room, and it has neither
    /// ended nor failed.
    client: Option<&'a TcpStream>,
    /// What was read, in order: sent again on a retried `CONNECT`.
    chunks: Vec<Bytes>,
    sent: u64,
}

impl<'a> Early<'a> {
    fn new(client: Option<&'a TcpStream>) -> Early<'a> {
        Early {
            client,
            chunks: Vec::new(),
            sent: 0,
        }
    }

    /// What the client has sent and no earlier call read, without waiting (`None`: nothing
    /// yet), at most [`EARLY_READ`] at a time. Its end or an error stops the reading: the
    /// relay finds them again.
    fn read_now(&mut self) -> Option<Bytes> {
        let client = self.client?;
        let mut buf = [0u8; EARLY_READ];
        let room = EARLY_READ.min(EARLY_BYTES - self.sent as usize);
        // A short read leaves the socket's readiness cleared: the next wait goes to epoll.
        match crate::relay::read_drained(client, &mut buf[..room]) {
            Ok(n) if n > 0 => {
                let chunk = Bytes::copy_from_slice(&buf[..n]);
                self.sent += n as u64;
                if self.sent as usize == EARLY_BYTES {
                    self.client = None;
                }
                self.chunks.push(chunk.clone());
                Some(chunk)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            _ => {
                self.client = None;
                None
            }
        }
    }
}

enum Open {
    /// The connection is unusable; another may work.
    Retry(TunnelError),
    Fail(TunnelError),
}

/// Whether a `CONNECT` that failed with `e` was certainly not processed by the server (RFC 9113
/// §8.7: refused with `REFUSED_STREAM`, or above the last stream id of a `GOAWAY`), or failed
/// because its connection is gone before any answer: it may be sent again elsewhere.
fn not_processed(e: &h2::Error) -> bool {
    e.is_go_away() || e.is_io() || e.reason() == Some(h2::Reason::REFUSED_STREAM)
}

/// Whether the server told this connection to go away (`GOAWAY`) or it is closed: h2 then
/// refuses new streams on it.
fn told_to_go(send: &SendRequest<Bytes>) -> bool {
    let waker = futures::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    // A fresh handle has no stream pending, so this only reads the connection's state.
    matches!(send.clone().poll_ready(&mut cx), Poll::Ready(Err(_)))
}

/// Pings the peer every `interval`; returns why the connection must be given up once a
/// `PING` is not answered within `timeout`. Never returns with a zero `interval`.
async fn keepalive(ping: &mut h2::PingPong, interval: Duration, timeout: Duration) -> String {
    if interval.is_zero() {
        return std::future::pending().await;
    }
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return format!("PING failed: {e}"),
            Err(_) => return format!("PING not answered within {timeout:?}"),
        }
    }
}

/// Dials one connection, publishes it, drives it until it ends or is asked to close, then
/// takes it out of the pool.
async fn run_connection(inner: Arc<Inner>, conn: Arc<Conn>, tx: watch::Sender<ConnState>) {
    let timeout = inner.config.connect_timeout;
    let node = conn.key.node;
    let dialled = tokio::time::timeout(timeout, dial(&inner, &conn)).await;
    let weak = Arc::downgrade(&inner);
    // The connection task must not keep the pool alive.
    drop(inner);
    let (ready, connection, mut ping) = match dialled {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => return fail(&weak, &conn, &tx, e),
        Err(_) => {
            let e = TunnelError::Connect {
                node,
                message: format!("timed out after {timeout:?}"),
            };
            return fail(&weak, &conn, &tx, e);
        }
    };
    if let Some(inner) = weak.upgrade() {
        inc(&inner.telemetry.hbone_client.connections_opened);
    }
    info!(conn = conn.id, %node, source = %conn.key.source, destination = %conn.key.destination,
        peer_serial = %ready.info.peer_serial, "HBONE connection open");
    let _ = tx.send(ConnState::Ready(ready));
    tokio::pin!(connection);
    let (interval, timeout) = match weak.upgrade() {
        Some(i) => (i.config.keepalive_interval, i.config.keepalive_timeout),
        None => (Duration::ZERO, Duration::ZERO),
    };
    // Polled on every frame of the connection: what waits beside it is polled only when it
    // wakes ([`Woken`]).
    let close = pin!(conn.close.notified());
    let mut close = Woken::new(close);
    let keepalive = pin!(keepalive(&mut ping, interval, timeout));
    let mut keepalive = Woken::new(keepalive);
    let closing = tokio::select! {
        r = &mut connection => {
            if let Err(e) = r {
                debug!(conn = conn.id, %node, error = %e, "HBONE connection ended");
            }
            false
        }
        _ = &mut close => true,
        why = &mut keepalive => {
            // The peer is gone: its streams are cut (dropping the connection), and the next
            // CONNECT dials anew.
            warn!(conn = conn.id, %node, reason = %why, "HBONE peer not answering: connection closed");
            if let Some(inner) = weak.upgrade() {
                inc(&inner.telemetry.hbone_client.keepalive_timeouts);
            }
            false
        }
    };
    conn.dead.store(true, Ordering::Release);
    // Dropping the last request handle lets h2 close the connection (GOAWAY) once its streams
    // are done.
    let _ = tx.send(ConnState::Closed);
    if closing {
        // Open streams run to their end (closing only stops new ones); a connection without
        // streams gets a short grace period to say goodbye.
        loop {
            tokio::select! {
                _ = &mut connection => break,
                _ = tokio::time::sleep(CLOSE_GRACE) => {
                    if conn.streams.load(Ordering::Acquire) == 0 {
                        break;
                    }
                }
            }
        }
    }
    if let Some(inner) = weak.upgrade() {
        inc(&inner.telemetry.hbone_client.connections_closed);
        inner.remove(&conn);
    }
    debug!(conn = conn.id, %node, "HBONE connection closed");
}

fn fail(weak: &Weak<Inner>, conn: &Arc<Conn>, tx: &watch::Sender<ConnState>, e: TunnelError) {
    debug!(conn = conn.id, error = %e, "HBONE connection failed");
    conn.dead.store(true, Ordering::Release);
    let _ = tx.send(ConnState::Failed(e));
    if let Some(inner) = weak.upgrade() {
        inc(&inner.telemetry.hbone_client.connections_failed);
        inner.remove(conn);
    }
}

type Tls = tokio_rustls::client::TlsStream<super::TlsTransport>;
/// The connection's engine, the frames of all the streams one turn of it sends written (and
/// encrypted) together.
type Connection = batch::Flushing<Tls, h2::client::Connection<batch::Batched<Tls>, Bytes>>;

async fn dial(
    inner: &Inner,
    conn: &Conn,
) -> Result<(Arc<Ready>, Connection, h2::PingPong), TunnelError> {
    let key = &conn.key;
    let node = key.node;
    let config = inner
        .identity
        .client_config(&key.source, &key.destination)
        .map_err(|e| TunnelError::Identity(format!("{e:#}")))?;
    let local = inner
        .identity
        .ready(&key.source)
        .await
        .map_err(|e| TunnelError::Identity(format!("{e:#}")))?;
    let name = ServerName::try_from(sni_for(&key.destination)).map_err(|e| {
        TunnelError::Identity(format!("no server name for {}: {e}", key.destination))
    })?;
    let netns = match (&inner.config.networks, key.source_ip) {
        (Some(networks), Some(ip)) => networks.of_pod(ip),
        _ => None,
    };
    let connected = match netns {
        Some(ns) => match ns.tcp_socket(node.is_ipv4()) {
            Ok(socket) => crate::upstream::connect(socket, node).await,
            Err(e) => Err(e),
        },
        None => TcpStream::connect(node).await,
    };
    let tcp = connected.map_err(|e| TunnelError::Connect {
        node,
        message: e.to_string(),
    })?;
    let _ = tcp.set_nodelay(true);
    if let Err(e) = set_tcp_keepalive(&tcp) {
        debug!(%node, error = %e, "no TCP keepalive on the HBONE connection");
    }
    let mut tls = TlsConnector::from(config)
        .connect(name, super::tls_transport(tcp))
        .await
        .map_err(|e| TunnelError::Tls {
            node,
            message: e.to_string(),
        })?;
    super::set_send_buffer(tls.get_mut().1);
    let (_, session) = tls.get_ref();
    if session.alpn_protocol() != Some(ALPN_H2) {
        return Err(TunnelError::Tls {
            node,
            message: "server did not agree to ALPN h2".into(),
        });
    }
    let (peer_serial, peer_not_after) = session
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|leaf| {
            let (_, x) = x509_parser::parse_x509_certificate(leaf).ok()?;
            let serial: String = x.raw_serial().iter().map(|b| format!("{b:02x}")).collect();
            let not_after =
                UNIX_EPOCH + Duration::from_secs(x.validity().not_after.timestamp().max(0) as u64);
            Some((serial, not_after))
        })
        .ok_or_else(|| TunnelError::Tls {
            node,
            message: "server certificate unreadable".into(),
        })?;
    let (io, flusher) = batch::batched(tls);
    let (send, mut connection) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(SEND_BUFFER)
        .max_header_list_size(MAX_HEADER_LIST)
        .header_table_size(HEADER_TABLE)
        .enable_push(false)
        .handshake(io)
        .await
        .map_err(|e| TunnelError::Http2 {
            node,
            message: e.to_string(),
        })?;
    // In TLS 1.3 the client finishes its handshake before the server has judged the client
    // certificate; a refusal arrives as an alert afterwards. One PING round trip makes sure
    // the server took us (and speaks HTTP/2) before streams are queued on the connection.
    let mut ping = connection.ping_pong().ok_or_else(|| TunnelError::Http2 {
        node,
        message: "no PING handle".into(),
    })?;
    let accepted = tokio::select! {
        r = ping.ping(h2::Ping::opaque()) => r,
        r = &mut connection => r.and_then(|()| Err(h2::Error::from(h2::Reason::NO_ERROR))),
    };
    if let Err(e) = accepted {
        if e.is_go_away() || e.reason() == Some(h2::Reason::NO_ERROR) {
            conn.went_away.store(true, Ordering::Release);
        }
        return Err(if e.is_io() {
            TunnelError::Tls {
                node,
                message: e.to_string(),
            }
        } else {
            TunnelError::Http2 {
                node,
                message: e.to_string(),
            }
        });
    }
    let info = Arc::new(ConnectionInfo {
        id: conn.id,
        node,
        peer: key.destination.clone(),
        peer_serial,
        local_serial: local.serial.clone(),
        expires: peer_not_after.min(local.not_after),
    });
    Ok((
        Arc::new(Ready { send, info }),
        flusher.around(connection),
        ping,
    ))
}

impl Inner {
    fn remove(&self, conn: &Arc<Conn>) {
        let mut conns = self.conns.lock();
        if let Some(list) = conns.get_mut(&conn.key) {
            list.retain(|c| !Arc::ptr_eq(c, conn));
            if list.is_empty() {
                conns.remove(&conn.key);
            }
        }
    }

    /// Closes connections idle for longer than the idle timeout, and ones that can take no
    /// new streams and have none left.
    fn reap(&self) {
        let now = Instant::now();
        let wall = SystemTime::now();
        let conns = self.conns.lock();
        for c in conns.values().flatten() {
            if c.streams.load(Ordering::Acquire) != 0 || c.dead.load(Ordering::Acquire) {
                continue;
            }
            let idle = now.duration_since(*c.idle_since.lock());
            let ready = matches!(&*c.state.borrow(), ConnState::Ready(_));
            if ready && (idle >= self.config.idle_timeout || !c.usable(wall)) {
                debug!(conn = c.id, ?idle, "closing idle HBONE connection");
                c.kill();
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        for c in self.conns.lock().values().flatten() {
            c.kill();
        }
    }
}

async fn reap(inner: Weak<Inner>) {
    let period = match inner.upgrade() {
        Some(i) => {
            (i.config.idle_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(5))
        }
        None => return,
    };
    loop {
        tokio::time::sleep(period).await;
        match inner.upgrade() {
            Some(i) => i.reap(),
            None => return,
        }
    }
}
