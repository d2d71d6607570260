//! Inbound side of HBONE (`:15008`): the mTLS HTTP/2 `CONNECT` server.
//!
//! Per TCP connection: TLS 1.3 handshake within a timeout, client certificate required and
//! verified against the trust bundle, ALPN `h2`, the client's SPIFFE id read from its
//! certificate. Then an HTTP/2 server with bounded settings. Per stream: only `CONNECT` with an
//! `ip:port` authority (else 400). Every well-formed `CONNECT` goes to the [`Handler`] as a
//! [`Pending`] stream, which it answers: [`Pending::refuse`] (404 not a pod here, 403 denied,
//! 503 unreachable) or [`Pending::accept`] (200, then a [`Stream`] to relay). Anything malformed
//! is refused on its own connection or stream; the listener keeps serving.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::LazyConfigAcceptor;
use tracing::{debug, info, warn};

use super::{
    parse_forwarded_for, Stream, CONNECTION_WINDOW, DENY_REASON_HEADER, MAX_FRAME, MAX_HEADER_LIST,
    POLICY_HEADER, SEND_BUFFER, STREAM_WINDOW,
};
use crate::admin::api::InboundStats;
use crate::identity::{IdentityManager, SpiffeId, ALPN_H2};
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

/// A `CONNECT` stream waiting for its answer. Dropping it unanswered resets the stream.
pub struct Pending {
    request: ConnectRequest,
    body: RecvStream,
    respond: SendResponse<Bytes>,
    telemetry: Arc<Telemetry>,
}

impl Pending {
    pub fn request(&self) -> &ConnectRequest {
        &self.request
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
        if let Err(e) = self.respond.send_response(response, true) {
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
        let send = self.respond.send_response(ok, false)?;
        inc(&self.telemetry.hbone_server.delivered);
        Ok(Stream::new(send, self.body))
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
    /// TLS handshake (and HTTP/2 preface) must complete within this.
    pub handshake_timeout: Duration,
    /// HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS` per connection.
    pub max_concurrent_streams: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            handshake_timeout: Duration::from_secs(10),
            max_concurrent_streams: 1000,
        }
    }
}

/// The HBONE server.
pub struct Server<H> {
    identity: Arc<IdentityManager>,
    handler: Arc<H>,
    config: ServerConfig,
    server_config: Arc<rustls::ServerConfig>,
    telemetry: Arc<Telemetry>,
}

impl<H: Handler> Server<H> {
    /// Counts go to `telemetry`'s HBONE server counters.
    pub fn new(
        identity: Arc<IdentityManager>,
        handler: Arc<H>,
        config: ServerConfig,
        telemetry: Arc<Telemetry>,
    ) -> Arc<Self> {
        Arc::new(Server {
            server_config: identity.server_config(),
            identity,
            handler,
            config,
            telemetry,
        })
    }

    fn counters(&self) -> &ServerCounters {
        &self.telemetry.hbone_server
    }

    pub fn stats(&self) -> InboundStats {
        self.counters().snapshot()
    }

    /// Accepts connections forever.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, "HBONE inbound listener ready");
        }
        loop {
            match listener.accept().await {
                Ok((tcp, peer)) => {
                    inc(&self.counters().tcp_accepted);
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
        // The ClientHello first: a certificate not yet fetched from the CA service is waited for
        // (a new pod's first inbound connection may come before the rotation task fetched it).
        let handshake = async {
            let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp).await?;
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
        let tls = match tokio::time::timeout(timeout, handshake).await {
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
                        inc(&self.counters().h2_failed);
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
        inc(&self.counters().streams_total);
        let _active = Held::up(&self.counters().streams_active);
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
            return;
        };
        let forwarded_for = request
            .headers()
            .get(http::header::FORWARDED)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_forwarded_for);
        let pending = Pending {
            request: ConnectRequest {
                peer,
                peer_addr,
                target,
                forwarded_for,
            },
            body: request.into_body(),
            respond,
            telemetry: self.telemetry.clone(),
        };
        self.handler.clone().serve(pending).await;
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
