//! Inbound side of HBONE (`:15008`): the mTLS HTTP/2 `CONNECT` server.
//!
//! Per TCP connection: admission first ([`AdmissionLimits`]: TLS handshakes in progress on the
//! node and per source address, open connections per source address; past a limit the
//! connection is reset at once), then the TLS 1.3 handshake and the HTTP/2 preface within one
//! timeout, client certificate required and verified against the trust bundle, ALPN `h2`, the
//! client's SPIFFE id read from its certificate. Then an HTTP/2 server whose every setting is
//! chosen against abuse ([`h2_server`]). Per stream: only `CONNECT` with an `ip:port` authority
//! (else 400). Every well-formed `CONNECT` goes to the [`Handler`] as a [`Pending`] stream,
//! which it answers: [`Pending::refuse`] (404 not a pod here, 403 denied, 503 unreachable) or
//! [`Pending::accept`] (200, then a [`Stream`] to relay). Anything malformed is refused on its
//! own connection or stream; the listener keeps serving.
//!
//! HTTP/2 rapid reset (CVE-2023-44487): a stream the client resets before it is answered has
//! its work (the connect to the pod) dropped at once, and a connection whose streams are mostly
//! reset that way is closed with `GOAWAY(ENHANCE_YOUR_CALM)`, by Envoy's rule
//! ([`too_many_premature_resets`]).
//!
//! Draining ([`crate::drain`]): every connection is sent a graceful `GOAWAY` and its streams run
//! on; each connection holds the drain open until it ends; at the drain timeout what is left is
//! closed. The listener stops accepting once a successor took its socket over (a node draining
//! on its own keeps accepting: nobody else would).

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::net::{IpAddr, SocketAddr};
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{Reason, RecvStream};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_rustls::LazyConfigAcceptor;
use tracing::{debug, info, warn};

use super::{
    parse_forwarded_for, set_tcp_keepalive, Stream, CONNECTION_WINDOW, DENY_REASON_HEADER,
    HEADER_TABLE, MAX_FRAME, MAX_HEADER_LIST, POLICY_HEADER, SEND_BUFFER, STREAM_WINDOW,
};
use crate::admin::api::InboundStats;
use crate::batch;
use crate::drain::{Draining, Hold};
use crate::identity::{IdentityManager, SpiffeId, ALPN_H2};
use crate::relay::Woken;
use crate::telemetry::counters::{inc, Held};
use crate::telemetry::{ServerCounters, Telemetry};

/// One well-formed `CONNECT`, as the handler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    /// The client's verified identity (the source workload).
    pub peer: SpiffeId,
    /// The remote node.
    pub peer_addr: SocketAddr,
    /// `:authority`: the destination pod `ip:port`.
    pub target: SocketAddr,
    /// The source pod's IP from `Forwarded: for=`.
    pub forwarded_for: Option<IpAddr>,
}

/// Why a `CONNECT` is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// 404: the target is not a pod on this node; nothing is connected.
    NotFound,
    /// 403 with `x-weft-policy: <policy>` and `x-weft-deny-reason: <reason>`.
    Denied { policy: String, reason: String },
    /// 503: the target could not be reached.
    Unavailable,
}

/// A `CONNECT` stream waiting for its answer. Dropping it unanswered resets the stream. If the
/// client resets the stream first, the handler's work on it is dropped (see
/// [`Server`]'s rapid reset defence).
pub struct Pending {
    request: ConnectRequest,
    body: Option<RecvStream>,
    answer: Answer,
    telemetry: Arc<Telemetry>,
}

/// A stream's response handle until it is answered, shared by the handler's [`Pending`] and
/// the server, which watches it for the client's `RST_STREAM` meanwhile.
type Answer = Arc<Mutex<Option<SendResponse<Bytes>>>>;

impl Pending {
    pub fn request(&self) -> &ConnectRequest {
        &self.request
    }

    /// The response handle, taken for answering (once).
    fn respond(&mut self) -> Option<SendResponse<Bytes>> {
        self.answer.lock().take()
    }

    /// Answers with the refusal's status.
    pub fn refuse(mut self, rejection: Rejection) {
        let counters = &self.telemetry.hbone_server;
        let mut response = Response::new(());
        match &rejection {
            Rejection::NotFound => {
                inc(&counters.not_found);
                *response.status_mut() = StatusCode::NOT_FOUND;
            }
            Rejection::Denied { policy, reason } => {
                inc(&counters.denied);
                *response.status_mut() = StatusCode::FORBIDDEN;
                let value = |v: &str| {
                    HeaderValue::from_str(v).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
                };
                let headers = response.headers_mut();
                headers.insert(POLICY_HEADER, value(policy));
                headers.insert(DENY_REASON_HEADER, value(reason));
            }
            Rejection::Unavailable => {
                inc(&counters.connect_failed);
                *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            }
        }
        let Some(mut respond) = self.respond() else {
            return;
        };
        if let Err(e) = respond.send_response(response, true) {
            debug!(error = %e, "could not answer the HBONE request");
        }
    }

    /// Answers 200: from now on bytes flow both ways on the returned stream. Fails when the
    /// client went away meanwhile.
    pub fn accept(mut self) -> Result<Stream, h2::Error> {
        let ok = Response::builder()
            .status(StatusCode::OK)
            .body(())
            .unwrap_or_default();
        let (Some(mut respond), Some(body)) = (self.respond(), self.body.take()) else {
            return Err(h2::Error::from(Reason::CANCEL));
        };
        let send = respond.send_response(ok, false)?;
        inc(&self.telemetry.hbone_server.delivered);
        Ok(Stream::new(send, body))
    }
}

impl Drop for Pending {
    /// Unanswered: the stream is reset (h2 resets a stream whose response handle is dropped).
    fn drop(&mut self) {
        drop(self.respond());
    }
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("request", &self.request)
            .finish_non_exhaustive()
    }
}

/// What answers the `CONNECT`s: the node's inbound path.
pub trait Handler: Send + Sync + 'static {
    /// Answers `pending` and, if it accepts it, relays it until it ends.
    fn serve(self: Arc<Self>, pending: Pending) -> impl Future<Output = ()> + Send;
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// TLS handshake and HTTP/2 preface together must complete within this.
    pub handshake_timeout: Duration,
    /// HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS` per connection.
    pub max_concurrent_streams: u32,
    /// Who may start a connection.
    pub admission: AdmissionLimits,
    /// Envoy's `overload.premature_reset_total_stream_count`: the number of streams after which
    /// the share of premature resets alone decides (see [`too_many_premature_resets`]).
    pub premature_reset_total_stream_count: u64,
    /// Envoy's `overload.premature_reset_min_stream_lifetime_seconds`: a stream reset by the
    /// client before it was answered and within this is a premature reset.
    pub premature_reset_min_stream_lifetime: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            handshake_timeout: Duration::from_secs(10),
            // The pool opens a new connection past 100 streams (as ztunnel's does); the rest is
            // room for streams the client has finished and the server not yet seen end. Each
            // stream is a connection to a pod, so this bounds what one connection costs.
            max_concurrent_streams: 128,
            admission: AdmissionLimits::default(),
            // Envoy's defaults (500 streams, 1 second).
            premature_reset_total_stream_count: 500,
            premature_reset_min_stream_lifetime: Duration::from_secs(1),
        }
    }
}

/// Limits on connections being set up on `:15008`, so that a peer holding TLS handshakes open
/// (or opening connections without end) cannot starve other nodes' tunnels. `0` turns a limit
/// off. Past a limit, a new connection is reset at once and counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// TLS handshakes (and HTTP/2 prefaces) in progress on the node.
    pub max_handshakes: usize,
    /// TLS handshakes in progress from one source address (a pod, or a node whose tunnels
    /// leave from its own address).
    pub max_handshakes_per_peer: usize,
    /// Connections open from one source address, handshaking or established.
    pub max_connections_per_peer: usize,
}

impl Default for AdmissionLimits {
    fn default() -> Self {
        AdmissionLimits {
            // A handshake costs well under a millisecond of CPU: thousands in flight mean a
            // node restarted with many pods re-dialling at once, or an attack.
            max_handshakes: 4096,
            // A node restarting dials each (source, destination) pair once per worker: a
            // busy node leaving from its own address may start a few hundred at once.
            max_handshakes_per_peer: 512,
            // The pool keeps about one connection per (source, destination, worker) and closes
            // idle ones after a minute.
            max_connections_per_peer: 4096,
        }
    }
}

/// Why a new connection was refused at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    Handshakes,
    PeerHandshakes,
    PeerConnections,
}

/// What is being set up and open, per source address.
#[derive(Debug)]
struct Admission {
    limits: AdmissionLimits,
    state: Mutex<AdmissionState>,
}

#[derive(Debug, Default)]
struct AdmissionState {
    handshakes: usize,
    peers: HashMap<IpAddr, PeerCount>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct PeerCount {
    handshakes: usize,
    connections: usize,
}

/// One admitted connection: counted as handshaking until [`Ticket::handshake_done`], as open
/// until dropped.
#[derive(Debug)]
struct Ticket {
    admission: Arc<Admission>,
    ip: IpAddr,
    handshaking: bool,
}

impl Admission {
    fn new(limits: AdmissionLimits) -> Arc<Admission> {
        Arc::new(Admission {
            limits,
            state: Mutex::default(),
        })
    }

    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Ticket, Refusal> {
        let ip = ip.to_canonical();
        let over = |limit: usize, n: usize| limit != 0 && n >= limit;
        let mut state = self.state.lock();
        let peer = state.peers.get(&ip).copied().unwrap_or_default();
        if over(self.limits.max_connections_per_peer, peer.connections) {
            return Err(Refusal::PeerConnections);
        }
        if over(self.limits.max_handshakes_per_peer, peer.handshakes) {
            return Err(Refusal::PeerHandshakes);
        }
        if over(self.limits.max_handshakes, state.handshakes) {
            return Err(Refusal::Handshakes);
        }
        state.handshakes += 1;
        let peer = state.peers.entry(ip).or_default();
        peer.handshakes += 1;
        peer.connections += 1;
        Ok(Ticket {
            admission: self.clone(),
            ip,
            handshaking: true,
        })
    }

    #[cfg(test)]
    fn peer(&self, ip: IpAddr) -> PeerCount {
        self.state
            .lock()
            .peers
            .get(&ip)
            .copied()
            .unwrap_or_default()
    }
}

impl Ticket {
    fn handshake_done(&mut self) {
        if std::mem::take(&mut self.handshaking) {
            let mut state = self.admission.state.lock();
            state.handshakes -= 1;
            if let Some(peer) = state.peers.get_mut(&self.ip) {
                peer.handshakes -= 1;
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.handshake_done();
        let mut state = self.admission.state.lock();
        if let Some(peer) = state.peers.get_mut(&self.ip) {
            peer.connections -= 1;
            if peer.connections == 0 {
                state.peers.remove(&self.ip);
            }
        }
    }
}

/// Envoy's rule for closing a connection whose client resets streams prematurely
/// (`ConnectionManagerImpl::maybeDrainDueToPrematureResets`): once `closed` streams reach
/// `limit`, when at least half of them were premature resets; before that, as soon as the
/// premature resets alone make half of `limit` (so that a connection cannot reset `limit / 2`
/// streams for free before being judged).
pub fn too_many_premature_resets(closed: u64, premature: u64, limit: u64) -> bool {
    if closed == 0 {
        return false;
    }
    let premature = premature.saturating_mul(2);
    if closed < limit {
        premature >= limit
    } else {
        premature >= closed
    }
}

/// Streams of one connection that ended, and how many of them were premature resets.
#[derive(Debug)]
struct ResetTally {
    limit: u64,
    closed: AtomicU64,
    premature: AtomicU64,
    /// Told once the connection has too many premature resets.
    flood: Notify,
}

impl ResetTally {
    fn new(limit: u64) -> ResetTally {
        ResetTally {
            limit,
            closed: AtomicU64::new(0),
            premature: AtomicU64::new(0),
            flood: Notify::new(),
        }
    }

    fn ended(&self, premature: bool) {
        let closed = self.closed.fetch_add(1, Ordering::AcqRel) + 1;
        let resets = if premature {
            self.premature.fetch_add(1, Ordering::AcqRel) + 1
        } else {
            self.premature.load(Ordering::Acquire)
        };
        if too_many_premature_resets(closed, resets, self.limit) {
            self.flood.notify_one();
        }
    }
}

/// The HTTP/2 server's settings, each chosen against a known abuse.
fn h2_server(config: &ServerConfig) -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b
        // What one stream and the whole connection may send before our relay reads it: the
        // connection window bounds the memory one client can fill, whatever its stream count.
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        // The largest frame we buffer whole.
        .max_frame_size(MAX_FRAME)
        // Per stream, what h2 queues towards a client that does not read: our relay reads
        // from the pod only as this drains, so a stalled client holds at most this per stream.
        .max_send_buffer_size(SEND_BUFFER)
        // A CONNECT's headers are a few hundred bytes; a larger block (a CONTINUATION flood
        // included, which h2 counts as it arrives) closes the connection.
        .max_header_list_size(MAX_HEADER_LIST)
        .header_table_size(HEADER_TABLE)
        // Each stream is a connection to a pod.
        .max_concurrent_streams(config.max_concurrent_streams)
        // Streams reset by the client before our accept loop took them (they no longer count
        // as concurrent): h2 closes the connection with ENHANCE_YOUR_CALM past 20 (its
        // default), as a client cancelling faster than we accept is attacking. Those accepted
        // in time are counted by our premature-reset rule; either way the connection counts
        // as a reset flood.
        .max_pending_accept_reset_streams(20)
        // Streams we must reset because of the client's protocol errors: a client causing
        // more than a hundred is broken or hostile (h2 sends GOAWAY ENHANCE_YOUR_CALM).
        .max_local_error_reset_streams(Some(100))
        // State kept to ignore frames of streams we reset, bounded in number and time (h2's
        // defaults).
        .max_concurrent_reset_streams(50)
        .reset_stream_duration(Duration::from_secs(1));
    // SETTINGS and PING floods: h2 answers each before it reads the next frame, so a client
    // that does not read our ACKs stops being read; no ACK queue grows.
    b
}

/// The HBONE server.
pub struct Server<H> {
    identity: Arc<IdentityManager>,
    handler: Arc<H>,
    config: ServerConfig,
    server_config: Arc<rustls::ServerConfig>,
    telemetry: Arc<Telemetry>,
    admission: Arc<Admission>,
    draining: Draining,
}

impl<H: Handler> Server<H> {
    /// Counts go to `telemetry`'s HBONE server counters; `draining` says when to stop.
    pub fn new(
        identity: Arc<IdentityManager>,
        handler: Arc<H>,
        config: ServerConfig,
        telemetry: Arc<Telemetry>,
        draining: Draining,
    ) -> Arc<Self> {
        Arc::new(Server {
            server_config: identity.server_config(),
            identity,
            handler,
            admission: Admission::new(config.admission),
            config,
            telemetry,
            draining,
        })
    }

    fn counters(&self) -> &ServerCounters {
        &self.telemetry.hbone_server
    }

    pub fn stats(&self) -> InboundStats {
        self.counters().snapshot()
    }

    /// Accepts connections until the listening socket is handed to a successor (a node that
    /// drains on its own keeps accepting: nobody else would).
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, "HBONE inbound listener ready");
        }
        loop {
            let accepted = tokio::select! {
                biased;
                () = self.draining.handed_over() => {
                    debug!("HBONE listener stops accepting: a successor took it over");
                    return;
                }
                r = listener.accept() => r,
            };
            match accepted {
                Ok((tcp, peer)) => {
                    inc(&self.counters().tcp_accepted);
                    let ticket = match self.admission.admit(peer.ip()) {
                        Ok(t) => t,
                        Err(refusal) => {
                            self.refuse_connection(&tcp, peer, refusal);
                            continue;
                        }
                    };
                    let this = self.clone();
                    let hold = self.draining.hold();
                    tokio::spawn(async move { this.connection(tcp, peer, ticket, hold).await });
                }
                Err(e) => {
                    warn!(error = %e, "HBONE accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Resets `tcp` at once (no handshake is started) and counts why.
    fn refuse_connection(&self, tcp: &TcpStream, peer: SocketAddr, refusal: Refusal) {
        let counters = self.counters();
        let (counter, why) = match refusal {
            Refusal::Handshakes => (&counters.refused_handshakes, "TLS handshakes in progress"),
            Refusal::PeerHandshakes => (
                &counters.refused_peer_handshakes,
                "TLS handshakes in progress from this address",
            ),
            Refusal::PeerConnections => (
                &counters.refused_peer_connections,
                "connections open from this address",
            ),
        };
        inc(counter);
        debug!(%peer, limit = why, "HBONE connection refused: too many");
        crate::relay::reset(tcp);
    }

    async fn connection(
        self: Arc<Self>,
        tcp: TcpStream,
        peer_addr: SocketAddr,
        mut ticket: Ticket,
        _hold: Hold,
    ) {
        let _ = tcp.set_nodelay(true);
        if let Err(e) = set_tcp_keepalive(&tcp) {
            debug!(peer = %peer_addr, error = %e, "no TCP keepalive on the HBONE connection");
        }
        let timeout = self.config.handshake_timeout;
        let deadline = Instant::now() + timeout;
        // The ClientHello first: a certificate not yet fetched from the CA service is waited for
        // (a new pod's first inbound connection may come before the rotation task fetched it).
        let handshake = async {
            let start = LazyConfigAcceptor::new(
                rustls::server::Acceptor::default(),
                super::tls_transport(tcp),
            )
            .await?;
            let local = start
                .client_hello()
                .server_name()
                .and_then(|name| self.identity.local_by_sni(name));
            if let Some(id) = local {
                if let Err(e) = self.identity.ready(&id).await {
                    debug!(peer = %peer_addr, error = %format!("{e:#}"), "no certificate to serve");
                }
            }
            start.into_stream(self.server_config.clone()).await
        };
        let mut tls = match tokio::time::timeout_at(deadline, handshake).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                inc(&self.counters().tls_failed);
                if is_certificate_problem(&e) {
                    warn!(peer = %peer_addr, error = %e, "HBONE TLS handshake refused");
                } else {
                    // Not TLS at all, or a peer that went away: scanners, probes.
                    debug!(peer = %peer_addr, error = %e, "HBONE TLS handshake failed");
                }
                return;
            }
            Err(_) => {
                inc(&self.counters().tls_failed);
                warn!(peer = %peer_addr, ?timeout, "HBONE TLS handshake timed out");
                return;
            }
        };
        super::set_send_buffer(tls.get_mut().1);
        let (_, session) = tls.get_ref();
        if session.alpn_protocol() != Some(ALPN_H2) {
            inc(&self.counters().tls_failed);
            warn!(peer = %peer_addr, "HBONE client did not negotiate ALPN h2");
            return;
        }
        let peer = match self
            .identity
            .peer_identity(session.peer_certificates().unwrap_or_default())
        {
            Ok(id) => id,
            Err(e) => {
                inc(&self.counters().tls_failed);
                warn!(peer = %peer_addr, error = %e, "HBONE client identity refused");
                return;
            }
        };
        inc(&self.counters().tls_accepted);
        let _active = Held::up(&self.counters().connections_active);
        debug!(peer = %peer_addr, identity = %peer, "HBONE connection accepted");

        let (io, flusher) = batch::batched(tls);
        let handshake = h2_server(&self.config).handshake::<_, Bytes>(io);
        let mut conn = match tokio::time::timeout_at(deadline, handshake).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                inc(&self.counters().h2_failed);
                debug!(peer = %peer_addr, error = %e, "HBONE HTTP/2 handshake failed");
                return;
            }
            Err(_) => {
                inc(&self.counters().h2_failed);
                debug!(peer = %peer_addr, "HBONE HTTP/2 preface timed out");
                return;
            }
        };
        ticket.handshake_done();
        let tally = Arc::new(ResetTally::new(
            self.config.premature_reset_total_stream_count,
        ));
        // The frames of all the streams one turn of the connection answers are written (and
        // encrypted) together.
        let serving = async {
            let mut told_to_go = false;
            // This task runs on every frame of the connection: what it waits on beside the
            // connection is made once and polled only when it wakes ([`Woken`]); a drain watch
            // polled anew takes the lock every connection's receiver shares.
            let flood = pin!(tally.flood.notified());
            let mut flood = Woken::new(flood);
            let started = pin!(self.draining.started());
            let mut started = Woken::new(started);
            let closing = pin!(self.draining.closing());
            let mut closing = Woken::new(closing);
            loop {
                let next = tokio::select! {
                    next = conn.accept() => next,
                    () = &mut flood => {
                        inc(&self.counters().reset_floods);
                        warn!(peer = %peer_addr, identity = %peer,
                            closed = tally.closed.load(Ordering::Relaxed),
                            premature = tally.premature.load(Ordering::Relaxed),
                            "HBONE client resets most of its streams before they are answered: connection closed (ENHANCE_YOUR_CALM)");
                        conn.abrupt_shutdown(Reason::ENHANCE_YOUR_CALM);
                        self.finish(&mut conn, peer_addr).await;
                        break;
                    }
                    () = &mut started, if !told_to_go => {
                        // Streams the client has sent run on; it opens new ones elsewhere.
                        inc(&self.counters().drain_goaways);
                        conn.graceful_shutdown();
                        told_to_go = true;
                        continue;
                    }
                    () = &mut closing => {
                        debug!(peer = %peer_addr, "HBONE connection closed by the drain timeout");
                        conn.abrupt_shutdown(Reason::NO_ERROR);
                        self.finish(&mut conn, peer_addr).await;
                        break;
                    }
                };
                match next {
                    Some(Ok((request, respond))) => {
                        let this = self.clone();
                        let peer = peer.clone();
                        let tally = tally.clone();
                        tokio::spawn(async move {
                            this.stream(peer, peer_addr, request, respond, &tally).await;
                        });
                    }
                    Some(Err(e)) if e.reason() == Some(Reason::ENHANCE_YOUR_CALM) => {
                        // h2's own limits tripped first: streams reset before we could take them,
                        // or too many streams we had to reset for the client's errors.
                        inc(&self.counters().reset_floods);
                        warn!(peer = %peer_addr, identity = %peer, error = %e,
                            "HBONE client flooded the connection with resets: connection closed (ENHANCE_YOUR_CALM)");
                        break;
                    }
                    Some(Err(e)) => {
                        if !(e.is_go_away() && e.reason() == Some(Reason::NO_ERROR)) {
                            inc(&self.counters().h2_failed);
                            debug!(peer = %peer_addr, error = %e, "HBONE connection error");
                        }
                        break;
                    }
                    None => break,
                }
            }
        };
        flusher.around(serving).await;
        debug!(peer = %peer_addr, identity = %peer, "HBONE connection closed");
    }

    /// Drives a connection told to close until its `GOAWAY` is written (bounded: a client that
    /// does not read is not waited for).
    async fn finish<T>(&self, conn: &mut h2::server::Connection<T, Bytes>, peer_addr: SocketAddr)
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let flush = async {
            // Streams that still arrive are dropped unanswered (reset).
            while let Some(Ok(_)) = conn.accept().await {}
        };
        if tokio::time::timeout(Duration::from_secs(1), flush)
            .await
            .is_err()
        {
            debug!(peer = %peer_addr, "HBONE client did not take its GOAWAY in time");
        }
    }

    async fn stream(
        &self,
        peer: SpiffeId,
        peer_addr: SocketAddr,
        request: Request<RecvStream>,
        respond: SendResponse<Bytes>,
        tally: &ResetTally,
    ) {
        let started = Instant::now();
        inc(&self.counters().streams_total);
        let _active = Held::up(&self.counters().streams_active);
        let premature = self.answer_stream(peer, peer_addr, request, respond).await;
        let premature =
            premature && started.elapsed() <= self.config.premature_reset_min_stream_lifetime;
        if premature {
            inc(&self.counters().premature_resets);
        }
        tally.ended(premature);
    }

    /// Hands a well-formed `CONNECT` to the handler and waits for it to finish; returns whether
    /// the client reset the stream before it was answered (the handler's work is then dropped,
    /// so a reset stream never keeps a connect to a pod going).
    async fn answer_stream(
        &self,
        peer: SpiffeId,
        peer_addr: SocketAddr,
        request: Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
    ) -> bool {
        let target = (request.method() == Method::CONNECT)
            .then(|| request.uri().authority())
            .flatten()
            .and_then(|a| a.as_str().parse::<SocketAddr>().ok());
        let Some(target) = target else {
            inc(&self.counters().bad_requests);
            debug!(peer = %peer_addr, method = %request.method(), uri = %request.uri(),
                "HBONE request is not CONNECT ip:port");
            let mut response = Response::new(());
            *response.status_mut() = StatusCode::BAD_REQUEST;
            if let Err(e) = respond.send_response(response, true) {
                debug!(error = %e, "could not answer the HBONE request");
            }
            return false;
        };
        let forwarded_for = request
            .headers()
            .get(http::header::FORWARDED)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_forwarded_for);
        let answer: Answer = Arc::new(Mutex::new(Some(respond)));
        let pending = Pending {
            request: ConnectRequest {
                peer,
                peer_addr,
                target,
                forwarded_for,
            },
            body: Some(request.into_body()),
            answer: answer.clone(),
            telemetry: self.telemetry.clone(),
        };
        let serve = self.handler.clone().serve(pending);
        tokio::pin!(serve);
        // Until the handler answers, the client's RST_STREAM (or the connection's end) cancels
        // it; once answered, the relay hears of resets itself.
        let client_reset = poll_fn(|cx| match answer.lock().as_mut() {
            Some(respond) => respond.poll_reset(cx).map(Some),
            None => Poll::Ready(None),
        });
        let reset = tokio::select! {
            // First: a stream reset before the handler ran never reaches it.
            biased;
            reset = client_reset => reset,
            () = &mut serve => return false,
        };
        match reset {
            Some(reset) => {
                inc(&self.counters().streams_cancelled);
                debug!(peer = %peer_addr, %target, reset = ?reset.map_err(|e| e.to_string()),
                    "HBONE stream reset by the client before it was answered");
                true
            }
            None => {
                serve.await;
                false
            }
        }
    }
}

/// A TLS peer whose certificate (or lack of one) was refused, as opposed to a peer that does not
/// speak TLS or left.
fn is_certificate_problem(e: &std::io::Error) -> bool {
    use rustls::AlertDescription as A;
    use rustls::Error as E;
    matches!(
        e.get_ref().and_then(|i| i.downcast_ref::<E>()),
        Some(
            E::InvalidCertificate(_)
                | E::NoCertificatesPresented
                | E::AlertReceived(
                    A::BadCertificate
                        | A::UnsupportedCertificate
                        | A::CertificateExpired
                        | A::CertificateUnknown
                        | A::CertificateRequired
                        | A::UnknownCA
                )
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn premature_resets_follow_envoys_rule() {
        let limit = 500;
        assert!(!too_many_premature_resets(0, 0, limit));
        // Before `limit` streams: judged once the resets alone make half of it.
        assert!(!too_many_premature_resets(249, 249, limit));
        assert!(too_many_premature_resets(250, 250, limit));
        assert!(too_many_premature_resets(499, 250, limit));
        assert!(!too_many_premature_resets(499, 249, limit));
        // From `limit` on: half of all closed streams.
        assert!(!too_many_premature_resets(1000, 499, limit));
        assert!(too_many_premature_resets(1000, 500, limit));
        // A long-lived connection with a steady trickle of cancellations is never closed.
        assert!(!too_many_premature_resets(1_000_000, 100_000, limit));
        // Every stream reset: closed at the 250th.
        let first = (1..=10_000).find(|&n| too_many_premature_resets(n, n, limit));
        assert_eq!(first, Some(250));
        // Alternating good and reset streams: half are premature, closed at `limit`.
        let first = (1..=10_000u64).find(|&n| too_many_premature_resets(n, n / 2, limit));
        assert_eq!(first, Some(500));
        assert!(!too_many_premature_resets(
            u64::MAX,
            u64::MAX / 2 - 1,
            limit
        ));
    }

    #[test]
    fn reset_tally_tells_once_the_rule_is_met() {
        let tally = ResetTally::new(10);
        for _ in 0..4 {
            tally.ended(true);
        }
        tally.ended(false);
        assert!(
            tokio_test_notified(&tally.flood).is_none(),
            "4 of 10: not yet"
        );
        tally.ended(true);
        assert!(tokio_test_notified(&tally.flood).is_some());
    }

    /// Whether `notify` holds a permit, without waiting.
    fn tokio_test_notified(notify: &Notify) -> Option<()> {
        let notified = notify.notified();
        tokio::pin!(notified);
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        match notified.poll(&mut cx) {
            Poll::Ready(()) => Some(()),
            Poll::Pending => None,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn admission_limits_handshakes_and_connections_per_peer() {
        let a = Admission::new(AdmissionLimits {
            max_handshakes: 3,
            max_handshakes_per_peer: 2,
            max_connections_per_peer: 3,
        });
        let mut t1 = a.admit(ip("10.0.0.1")).unwrap();
        let _t2 = a.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(
            a.admit(ip("10.0.0.1")).unwrap_err(),
            Refusal::PeerHandshakes
        );
        // Another peer is not held up by the first one's handshakes.
        let t3 = a.admit(ip("10.0.0.2")).unwrap();
        // …but the node's total is.
        assert_eq!(a.admit(ip("10.0.0.3")).unwrap_err(), Refusal::Handshakes);
        t1.handshake_done();
        t1.handshake_done();
        assert_eq!(
            a.peer(ip("10.0.0.1")),
            PeerCount {
                handshakes: 1,
                connections: 2
            }
        );
        let mut t4 = a.admit(ip("10.0.0.1")).unwrap();
        t4.handshake_done();
        assert_eq!(
            a.admit(ip("10.0.0.1")).unwrap_err(),
            Refusal::PeerConnections,
            "three open from one address"
        );
        drop(t1);
        let _t5 = a.admit(ip("10.0.0.1")).unwrap();
        drop(t3);
        assert_eq!(a.peer(ip("10.0.0.2")), PeerCount::default());
        assert!(!a.state.lock().peers.contains_key(&ip("10.0.0.2")));
        // IPv4-mapped IPv6 is the same peer (three open again).
        assert_eq!(
            a.admit(ip("::ffff:10.0.0.1")).unwrap_err(),
            Refusal::PeerConnections
        );
    }

    #[test]
    fn zero_turns_a_limit_off() {
        let a = Admission::new(AdmissionLimits {
            max_handshakes: 0,
            max_handshakes_per_peer: 0,
            max_connections_per_peer: 0,
        });
        let tickets: Vec<_> = (0..10_000)
            .map(|_| a.admit(ip("10.0.0.1")).unwrap())
            .collect();
        assert_eq!(a.peer(ip("10.0.0.1")).connections, 10_000);
        drop(tickets);
        assert_eq!(a.state.lock().handshakes, 0);
    }
}
