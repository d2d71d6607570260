//! Inbound side of HBONE (`:15008`): mTLS HTTP/2 `CONNECT` server that delivers tunnels to the
//! pods of this node.
//!
//! Per TCP connection: TLS 1.3 handshake within a timeout, client certificate required and
//! verified against the trust bundle, ALPN `h2`, the client's SPIFFE id read from its
//! certificate. Then an HTTP/2 server with bounded settings. Per stream: only `CONNECT` with an
//! `ip:port` authority (else 400); the [`InboundHandler`] decides: not a pod here → 404 (this is
//! no open relay), denied → 403 with `x-weft-policy`, deliver → connect to the pod (503 if that
//! fails), 200 and relay. Anything malformed is refused on its own connection or stream; the
//! listener keeps serving.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::{
    parse_forwarded_for, relay, CONNECTION_WINDOW, MAX_FRAME, MAX_HEADER_LIST, POLICY_HEADER,
    SEND_BUFFER, STREAM_WINDOW,
};
use crate::identity::{IdentityManager, SpiffeId, ALPN_H2};

/// One `CONNECT` stream, as the handler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundRequest {
    /// The client's verified identity (the source workload).
    pub peer: SpiffeId,
    /// The remote node.
    pub peer_addr: SocketAddr,
    /// `:authority`: the destination pod `ip:port`.
    pub target: SocketAddr,
    /// The source pod's IP from `Forwarded: for=`.
    pub forwarded_for: Option<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InboundDecision {
    /// Connect to the target and relay.
    Deliver,
    /// 403 with `x-weft-policy: <policy>`.
    Deny { policy: String },
    /// The target is not a pod on this node: 404, nothing is connected.
    NotFound,
}

/// How a stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InboundVerdict {
    Delivered,
    Denied,
    NotFound,
    /// Deliver was decided but connecting to the target failed (503).
    ConnectFailed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundOutcome {
    pub verdict: InboundVerdict,
    /// The status answered to the `CONNECT`.
    pub status: u16,
    /// Tunnel → target (bytes the source sent).
    pub bytes_to_target: u64,
    /// Target → tunnel (bytes the source received).
    pub bytes_from_target: u64,
    pub duration: Duration,
    /// Why connecting failed, or the first relay error (e.g. a reset).
    pub error: Option<String>,
}

/// The node's policy for inbound tunnels.
pub trait InboundHandler: Send + Sync + 'static {
    /// Whether to deliver this stream to its target.
    fn decide(&self, req: &InboundRequest) -> InboundDecision;
    /// Called once per well-formed `CONNECT` stream when it ends (for flows).
    fn finished(&self, req: &InboundRequest, outcome: InboundOutcome);
}

#[derive(Debug, Clone)]
pub struct InboundConfig {
    /// TLS handshake (and HTTP/2 preface) must complete within this.
    pub handshake_timeout: Duration,
    /// Connecting to the target pod.
    pub connect_timeout: Duration,
    /// HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS` per connection.
    pub max_concurrent_streams: u32,
}

impl Default for InboundConfig {
    fn default() -> Self {
        InboundConfig {
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            max_concurrent_streams: 1000,
        }
    }
}

/// Counters of the inbound server.
#[derive(Debug, Default)]
pub struct Stats {
    tcp_accepted: AtomicU64,
    tls_accepted: AtomicU64,
    tls_failed: AtomicU64,
    h2_failed: AtomicU64,
    connections_active: AtomicU64,
    streams_total: AtomicU64,
    streams_active: AtomicU64,
    bad_requests: AtomicU64,
    delivered: AtomicU64,
    denied: AtomicU64,
    not_found: AtomicU64,
    connect_failed: AtomicU64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StatsSnapshot {
    /// TCP connections accepted on the listener.
    pub tcp_accepted: u64,
    /// TLS handshakes that completed with an acceptable client identity.
    pub tls_accepted: u64,
    /// TLS handshakes refused: not TLS, bad/expired/missing/untrusted client certificate, no
    /// `h2`, no local identity for the SNI, timeout.
    pub tls_failed: u64,
    /// Connections that failed the HTTP/2 preface or broke the protocol.
    pub h2_failed: u64,
    pub connections_active: u64,
    pub streams_total: u64,
    pub streams_active: u64,
    /// Not `CONNECT`, or no `ip:port` authority (400).
    pub bad_requests: u64,
    pub delivered: u64,
    pub denied: u64,
    pub not_found: u64,
    pub connect_failed: u64,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            tcp_accepted: l(&self.tcp_accepted),
            tls_accepted: l(&self.tls_accepted),
            tls_failed: l(&self.tls_failed),
            h2_failed: l(&self.h2_failed),
            connections_active: l(&self.connections_active),
            streams_total: l(&self.streams_total),
            streams_active: l(&self.streams_active),
            bad_requests: l(&self.bad_requests),
            delivered: l(&self.delivered),
            denied: l(&self.denied),
            not_found: l(&self.not_found),
            connect_failed: l(&self.connect_failed),
        }
    }
}

fn inc(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

/// Decrements a gauge when dropped.
struct Gauge<'a>(&'a AtomicU64);

impl<'a> Gauge<'a> {
    fn up(a: &'a AtomicU64) -> Self {
        inc(a);
        Gauge(a)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves HBONE on `listener` forever with default settings.
pub async fn serve(
    listener: TcpListener,
    identity: Arc<IdentityManager>,
    handler: Arc<dyn InboundHandler>,
) {
    Inbound::new(identity, handler, InboundConfig::default())
        .serve(listener)
        .await
}

/// The HBONE inbound server.
pub struct Inbound {
    identity: Arc<IdentityManager>,
    handler: Arc<dyn InboundHandler>,
    config: InboundConfig,
    acceptor: TlsAcceptor,
    stats: Stats,
}

impl Inbound {
    pub fn new(
        identity: Arc<IdentityManager>,
        handler: Arc<dyn InboundHandler>,
        config: InboundConfig,
    ) -> Arc<Self> {
        let acceptor = TlsAcceptor::from(identity.server_config());
        Arc::new(Inbound {
            identity,
            handler,
            config,
            acceptor,
            stats: Stats::default(),
        })
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// Accepts connections forever.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, "HBONE inbound listener ready");
        }
        loop {
            match listener.accept().await {
                Ok((tcp, peer)) => {
                    inc(&self.stats.tcp_accepted);
                    let this = self.clone();
                    tokio::spawn(async move { this.connection(tcp, peer).await });
                }
                Err(e) => {
                    warn!(error = %e, "HBONE accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn connection(self: Arc<Self>, tcp: TcpStream, peer_addr: SocketAddr) {
        let _ = tcp.set_nodelay(true);
        let timeout = self.config.handshake_timeout;
        let tls = match tokio::time::timeout(timeout, self.acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                inc(&self.stats.tls_failed);
                if is_certificate_problem(&e) {
                    warn!(peer = %peer_addr, error = %e, "HBONE TLS handshake refused");
                } else {
                    // Not TLS at all, or a peer that went away: scanners, probes.
                    debug!(peer = %peer_addr, error = %e, "HBONE TLS handshake failed");
                }
                return;
            }
            Err(_) => {
                inc(&self.stats.tls_failed);
                warn!(peer = %peer_addr, ?timeout, "HBONE TLS handshake timed out");
                return;
            }
        };
        let (_, session) = tls.get_ref();
        if session.alpn_protocol() != Some(ALPN_H2) {
            inc(&self.stats.tls_failed);
            warn!(peer = %peer_addr, "HBONE client did not negotiate ALPN h2");
            return;
        }
        let peer = match self
            .identity
            .peer_identity(session.peer_certificates().unwrap_or_default())
        {
            Ok(id) => id,
            Err(e) => {
                inc(&self.stats.tls_failed);
                warn!(peer = %peer_addr, error = %e, "HBONE client identity refused");
                return;
            }
        };
        inc(&self.stats.tls_accepted);
        let _active = Gauge::up(&self.stats.connections_active);
        debug!(peer = %peer_addr, identity = %peer, "HBONE connection accepted");

        let handshake = h2::server::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_send_buffer_size(SEND_BUFFER)
            .max_header_list_size(MAX_HEADER_LIST)
            .max_concurrent_streams(self.config.max_concurrent_streams)
            .handshake::<_, Bytes>(tls);
        let mut conn = match tokio::time::timeout(timeout, handshake).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                inc(&self.stats.h2_failed);
                debug!(peer = %peer_addr, error = %e, "HBONE HTTP/2 handshake failed");
                return;
            }
            Err(_) => {
                inc(&self.stats.h2_failed);
                debug!(peer = %peer_addr, "HBONE HTTP/2 preface timed out");
                return;
            }
        };
        while let Some(next) = conn.accept().await {
            match next {
                Ok((request, respond)) => {
                    let this = self.clone();
                    let peer = peer.clone();
                    tokio::spawn(async move {
                        this.stream(peer, peer_addr, request, respond).await;
                    });
                }
                Err(e) => {
                    if !(e.is_go_away() && e.reason() == Some(h2::Reason::NO_ERROR)) {
                        inc(&self.stats.h2_failed);
                        debug!(peer = %peer_addr, error = %e, "HBONE connection error");
                    }
                    break;
                }
            }
        }
        debug!(peer = %peer_addr, identity = %peer, "HBONE connection closed");
    }

    async fn stream(
        &self,
        peer: SpiffeId,
        peer_addr: SocketAddr,
        request: Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
    ) {
        let started = Instant::now();
        inc(&self.stats.streams_total);
        let _active = Gauge::up(&self.stats.streams_active);
        let target = (request.method() == Method::CONNECT)
            .then(|| request.uri().authority())
            .flatten()
            .and_then(|a| a.as_str().parse::<SocketAddr>().ok());
        let Some(target) = target else {
            inc(&self.stats.bad_requests);
            debug!(peer = %peer_addr, method = %request.method(), uri = %request.uri(),
                "HBONE request is not CONNECT ip:port");
            reply(&mut respond, StatusCode::BAD_REQUEST, None);
            return;
        };
        let forwarded_for = request
            .headers()
            .get(http::header::FORWARDED)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_forwarded_for);
        let req = InboundRequest {
            peer,
            peer_addr,
            target,
            forwarded_for,
        };
        let mut outcome = InboundOutcome {
            verdict: InboundVerdict::Delivered,
            status: 200,
            bytes_to_target: 0,
            bytes_from_target: 0,
            duration: Duration::ZERO,
            error: None,
        };
        match self.handler.decide(&req) {
            InboundDecision::NotFound => {
                inc(&self.stats.not_found);
                outcome.verdict = InboundVerdict::NotFound;
                outcome.status = 404;
                reply(&mut respond, StatusCode::NOT_FOUND, None);
            }
            InboundDecision::Deny { policy } => {
                inc(&self.stats.denied);
                outcome.verdict = InboundVerdict::Denied;
                outcome.status = 403;
                reply(&mut respond, StatusCode::FORBIDDEN, Some(&policy));
            }
            InboundDecision::Deliver => {
                let timeout = self.config.connect_timeout;
                let connected = tokio::time::timeout(timeout, TcpStream::connect(target)).await;
                let upstream = match connected {
                    Ok(Ok(s)) => Some(s),
                    Ok(Err(e)) => {
                        outcome.error = Some(e.to_string());
                        None
                    }
                    Err(_) => {
                        outcome.error = Some(format!("connect timed out after {timeout:?}"));
                        None
                    }
                };
                match upstream {
                    None => {
                        inc(&self.stats.connect_failed);
                        outcome.verdict = InboundVerdict::ConnectFailed;
                        outcome.status = 503;
                        reply(&mut respond, StatusCode::SERVICE_UNAVAILABLE, None);
                    }
                    Some(upstream) => {
                        let _ = upstream.set_nodelay(true);
                        let ok = Response::builder()
                            .status(StatusCode::OK)
                            .body(())
                            .unwrap_or_default();
                        match respond.send_response(ok, false) {
                            Ok(send) => {
                                inc(&self.stats.delivered);
                                let r =
                                    relay(upstream, send, request.into_body(), Bytes::new()).await;
                                outcome.bytes_to_target = r.received;
                                outcome.bytes_from_target = r.sent;
                                outcome.error = r.error;
                            }
                            Err(e) => {
                                // The client went away meanwhile.
                                outcome.error = Some(e.to_string());
                            }
                        }
                    }
                }
            }
        }
        outcome.duration = started.elapsed();
        debug!(peer = %req.peer, target = %req.target, verdict = ?outcome.verdict,
            to_target = outcome.bytes_to_target, from_target = outcome.bytes_from_target,
            error = outcome.error.as_deref().unwrap_or(""), "HBONE stream done");
        self.handler.finished(&req, outcome);
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

fn reply(respond: &mut SendResponse<Bytes>, status: StatusCode, policy: Option<&str>) {
    let mut response = Response::new(());
    *response.status_mut() = status;
    if let Some(policy) = policy {
        let value = HeaderValue::from_str(policy)
            .unwrap_or_else(|_| HeaderValue::from_static("invalid-policy-name"));
        response.headers_mut().insert(POLICY_HEADER, value);
    }
    if let Err(e) = respond.send_response(response, true) {
        debug!(error = %e, "could not answer the HBONE request");
    }
}
