//! HBONE end to end over loopback: identity manager + outbound pool + inbound server + a
//! target TCP server, and everything a hostile or broken peer might send.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use weft::drain::Draining;
use weft::identity::{
    init_ca, sni_for, AuthorityConfig, IdentityConfig, IdentityManager, SpiffeId,
};
use weft::telemetry::Telemetry;
use weft::tunnel::client::{Hbone, Pool, PoolConfig, TunnelError};
use weft::tunnel::server::{
    ConnectRequest, Handler as ServerHandler, Pending, Rejection, Server, ServerConfig,
};
use weft::upstream::{Connector, OnBehalfOf};

/// What the test's destination node decides for a `CONNECT` (a node's inbound path decides it
/// from the registry and its policies).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Decision {
    Deliver,
    Deny {
        policy: String,
    },
    NotFound,
    /// Never answers (a target that takes forever to connect to), until dropped.
    Hang,
}

/// How a stream ended, as the test's destination node saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    Delivered,
    Denied,
    NotFound,
    ConnectFailed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Outcome {
    verdict: Ended,
    status: u16,
    bytes_to_target: u64,
    bytes_from_target: u64,
    error: Option<String>,
}

fn telemetry() -> Arc<Telemetry> {
    Arc::new(Telemetry::new("test-node", 100))
}

const TD: &str = "cluster.local";

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(TD, ns, sa).unwrap()
}

fn new_ca(dir: &Path) -> PathBuf {
    init_ca(dir, TD, Duration::from_secs(86400)).unwrap();
    dir.to_path_buf()
}

fn manager(
    ca: &Path,
    bundle: &[&Path],
    ttl: Duration,
    local: &[&SpiffeId],
) -> Arc<IdentityManager> {
    let m = IdentityManager::new(IdentityConfig {
        ca_cert: ca.join("ca.crt"),
        authority: AuthorityConfig::Key(ca.join("ca.key")),
        trust_bundle: bundle.iter().map(|d| d.join("ca.crt")).collect(),
        trust_domain: TD.into(),
        svid_ttl: ttl,
    })
    .unwrap();
    m.set_local_identities(local.iter().map(|i| (*i).clone()).collect::<HashSet<_>>());
    Arc::new(m)
}

type Decide = Box<dyn Fn(&ConnectRequest) -> Decision + Send + Sync>;

struct Handler {
    decide: Decide,
    finished: Mutex<Vec<(ConnectRequest, Outcome)>>,
    /// `Hang` streams started, and those whose work was dropped.
    hanging: AtomicUsize,
    dropped: Arc<AtomicUsize>,
}

/// Counts a handler's work dropped before it finished.
struct CountDrop(Arc<AtomicUsize>);

impl Drop for CountDrop {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl ServerHandler for Handler {
    async fn serve(self: Arc<Self>, pending: Pending) {
        let req = pending.request().clone();
        let mut outcome = Outcome {
            verdict: Ended::Delivered,
            status: 200,
            bytes_to_target: 0,
            bytes_from_target: 0,
            error: None,
        };
        match (self.decide)(&req) {
            Decision::Hang => {
                let _dropped = CountDrop(self.dropped.clone());
                self.hanging.fetch_add(1, Ordering::SeqCst);
                std::future::pending::<()>().await;
                drop(pending);
            }
            Decision::NotFound => {
                pending.refuse(Rejection::NotFound);
                (outcome.verdict, outcome.status) = (Ended::NotFound, 404);
            }
            Decision::Deny { policy } => {
                pending.refuse(Rejection::Denied {
                    policy,
                    reason: "not_allowed".into(),
                });
                (outcome.verdict, outcome.status) = (Ended::Denied, 403);
            }
            Decision::Deliver => {
                let connector = Connector::new(Duration::from_secs(5));
                match connector
                    .connect(
                        OnBehalfOf::Peer {
                            identity: &req.peer,
                            source: None,
                        },
                        req.target,
                    )
                    .await
                {
                    Err(e) => {
                        pending.refuse(Rejection::Unavailable);
                        (outcome.verdict, outcome.status) = (Ended::ConnectFailed, 503);
                        outcome.error = Some(e.to_string());
                    }
                    Ok(upstream) => match pending.accept() {
                        Ok(stream) => {
                            let r = stream.relay(upstream).await;
                            outcome.bytes_to_target = r.received;
                            outcome.bytes_from_target = r.sent;
                            outcome.error = r.error;
                        }
                        Err(e) => outcome.error = Some(e.to_string()),
                    },
                }
            }
        }
        self.finished.lock().unwrap().push((req, outcome));
    }
}

impl Handler {
    /// Deliver to `echo`, 404 for anything else.
    fn deliver_to(addrs: Vec<SocketAddr>) -> Arc<Handler> {
        Handler::with(move |r| {
            if addrs.contains(&r.target) {
                Decision::Deliver
            } else {
                Decision::NotFound
            }
        })
    }

    fn with(f: impl Fn(&ConnectRequest) -> Decision + Send + Sync + 'static) -> Arc<Self> {
        Arc::new(Handler {
            decide: Box::new(f),
            finished: Mutex::new(Vec::new()),
            hanging: AtomicUsize::new(0),
            dropped: Arc::new(AtomicUsize::new(0)),
        })
    }

    async fn wait_finished(&self, n: usize) -> Vec<(ConnectRequest, Outcome)> {
        for _ in 0..500 {
            {
                let f = self.finished.lock().unwrap();
                if f.len() >= n {
                    return f.clone();
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("fewer than {n} streams finished");
    }
}

/// Echo server: writes back what it reads, half-closes after the client's EOF.
async fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A destination node: inbound server on 127.0.0.1 hosting `local`.
async fn node(
    identity: Arc<IdentityManager>,
    handler: Arc<Handler>,
    config: ServerConfig,
) -> (SocketAddr, Arc<Server<Handler>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let inbound = Server::new(identity, handler, config, telemetry(), Draining::never());
    tokio::spawn(inbound.clone().serve(l));
    (addr, inbound)
}

fn hbone(src: &SpiffeId, dst: &SpiffeId, node: SocketAddr, target: SocketAddr) -> Hbone {
    Hbone {
        source: src.clone(),
        destination: dst.clone(),
        node,
        target,
        forwarded_for: "10.244.1.7".parse().unwrap(),
    }
}

/// One CA, a client node hosting `src` and a server node hosting `dst`, an echo target.
struct Setup {
    _dirs: Vec<tempfile::TempDir>,
    ca: PathBuf,
    src: SpiffeId,
    dst: SpiffeId,
    client: Arc<IdentityManager>,
    server: Arc<IdentityManager>,
    handler: Arc<Handler>,
    inbound: Arc<Server<Handler>>,
    node: SocketAddr,
    echo: SocketAddr,
}

async fn setup() -> Setup {
    setup_with(|_| {}).await
}

async fn setup_with(tweak: impl FnOnce(&mut ServerConfig)) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca(dir.path());
    let src = id("client-ns", "sleep");
    let dst = id("server-ns", "httpbin");
    let client = manager(&ca, &[], Duration::from_secs(3600), &[&src]);
    let server = manager(&ca, &[], Duration::from_secs(3600), &[&dst]);
    let echo = echo_server().await;
    let handler = Handler::deliver_to(vec![echo]);
    let mut config = ServerConfig::default();
    tweak(&mut config);
    let (node, inbound) = node(server.clone(), handler.clone(), config).await;
    Setup {
        _dirs: vec![dir],
        ca,
        src,
        dst,
        client,
        server,
        handler,
        inbound,
        node,
        echo,
    }
}

impl Setup {
    fn pool(&self) -> Pool {
        Pool::new(self.client.clone(), PoolConfig::default(), telemetry())
    }

    fn hbone(&self) -> Hbone {
        hbone(&self.src, &self.dst, self.node, self.echo)
    }

    /// A good client still gets through.
    async fn assert_serves(&self) {
        let pool = self.pool();
        let mut t = pool
            .connect(self.hbone())
            .await
            .expect("good client refused");
        assert_eq!(
            echo_round_trip(&mut t, b"still serving").await,
            b"still serving"
        );
    }

    async fn wait_tls_failed(&self, n: u64) {
        for _ in 0..500 {
            if self.inbound.stats().tls_failed >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("tls_failed stayed at {}", self.inbound.stats().tls_failed);
    }
}

async fn echo_round_trip<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    msg: &[u8],
) -> Vec<u8> {
    s.write_all(msg).await.unwrap();
    let mut buf = vec![0u8; msg.len()];
    s.read_exact(&mut buf).await.unwrap();
    buf
}

fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 % 251) as u8).collect()
}

#[tokio::test]
async fn tunnel_bytes_both_ways_with_half_close() {
    let s = setup().await;
    let pool = s.pool();
    let mut t = pool.connect(s.hbone()).await.unwrap();
    assert_eq!(t.connection().peer, s.dst);
    let data = payload(3_000_000);
    let expect = data.clone();
    let (mut rd, mut wr) = tokio::io::split(&mut t);
    let writer = async {
        wr.write_all(&data).await.unwrap();
        wr.shutdown().await.unwrap(); // END_STREAM: the echo server sees EOF
    };
    let reader = async {
        let mut got = Vec::new();
        rd.read_to_end(&mut got).await.unwrap(); // the echo server's FIN: END_STREAM back
        got
    };
    let ((), got) = tokio::join!(writer, reader);
    assert_eq!(got.len(), expect.len());
    assert!(got == expect);
    drop(t);
    let finished = s.handler.wait_finished(1).await;
    let (req, out) = &finished[0];
    assert_eq!(req.peer, s.src);
    assert_eq!(req.target, s.echo);
    assert_eq!(req.forwarded_for, Some("10.244.1.7".parse().unwrap()));
    assert_eq!(out.verdict, Ended::Delivered);
    assert_eq!(out.status, 200);
    assert_eq!(out.bytes_to_target, 3_000_000);
    assert_eq!(out.bytes_from_target, 3_000_000);
    assert_eq!(out.error, None);
    let stats = pool.stats();
    assert_eq!(stats.streams_opened_total, 1);
    assert_eq!(stats.connections, 1);
}

/// A client connection as the capture path holds it: `app` is the application's end.
async fn client_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (proxied, _) = l.accept().await.unwrap();
    (app, proxied)
}

#[tokio::test]
async fn first_bytes_go_with_the_connect_and_refused_ones_are_dropped() {
    let s = setup().await;
    let denied_target: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let echo = s.echo;
    let handler = Handler::with(move |r| {
        if r.target == echo {
            Decision::Deliver
        } else {
            Decision::Deny {
                policy: "server-ns/deny-sleep".into(),
            }
        }
    });
    let (node_addr, _inbound) = node(s.server.clone(), handler.clone(), Default::default()).await;
    let pool = s.pool();

    // Refused with its first bytes on the way: the refusal is what the client gets, and the
    // connection carries the next stream.
    let (mut app, proxied) = client_pair().await;
    app.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let e = pool
        .connect_for(hbone(&s.src, &s.dst, node_addr, denied_target), &proxied)
        .await
        .unwrap_err();
    assert!(e.is_denied(), "{e}");

    // Accepted: the target answers what the client wrote before the tunnel was asked for.
    let (mut app, proxied) = client_pair().await;
    app.write_all(b"early").await.unwrap();
    let tunnel = pool
        .connect_for(hbone(&s.src, &s.dst, node_addr, echo), &proxied)
        .await
        .unwrap();
    let relayed = echoes_what_went_ahead(tunnel, app, proxied, b"early").await;
    assert_eq!(relayed.error, None);
    let finished = handler.wait_finished(2).await;
    let delivered = finished
        .iter()
        .find(|(r, _)| r.target == echo)
        .expect("delivered stream");
    assert_eq!(delivered.1.bytes_to_target, 14);
    let stats = pool.stats();
    assert_eq!(stats.connections_opened_total, 1, "one connection for both");
}

/// A destination node that answers a `CONNECT` only once the stream's first bytes are in, then
/// echoes: a client that held its bytes back until the answer would wait for ever.
async fn node_answering_after_first_bytes(identity: Arc<IdentityManager>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(identity.server_config());
    tokio::spawn(async move {
        let (tcp, _) = l.accept().await.unwrap();
        let tls = acceptor.accept(tcp).await.unwrap();
        let mut conn = h2::server::handshake(tls).await.unwrap();
        while let Some(Ok((request, mut respond))) = conn.accept().await {
            tokio::spawn(async move {
                let mut body = request.into_body();
                let mut answer = None;
                while let Some(Ok(data)) = body.data().await {
                    let _ = body.flow_control().release_capacity(data.len());
                    let send = answer.get_or_insert_with(|| {
                        respond
                            .send_response(http::Response::new(()), false)
                            .unwrap()
                    });
                    send.send_data(data, false).unwrap();
                }
                if let Some(mut send) = answer {
                    let _ = send.send_data(bytes::Bytes::new(), true);
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn what_the_client_sends_before_the_answer_follows_the_connect() {
    let s = setup().await;
    let node = node_answering_after_first_bytes(s.server.clone()).await;
    let pool = s.pool();
    let (mut app, proxied) = client_pair().await;
    let connect = pool.connect_for(hbone(&s.src, &s.dst, node, s.echo), &proxied);
    let write_later = async {
        // Once the `CONNECT` has left with nothing behind it.
        tokio::time::sleep(Duration::from_millis(100)).await;
        app.write_all(b"first").await.unwrap();
    };
    let (tunnel, ()) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(5), connect),
        write_later
    );
    let tunnel = tunnel
        .expect("the client's bytes waited for the CONNECT's answer")
        .unwrap();
    echoes_what_went_ahead(tunnel, app, proxied, b"first").await;
}

/// Relays `tunnel` for `proxied`: `app` gets `ahead` (5 bytes) echoed, then a round trip, and
/// both counts are 14 bytes.
async fn echoes_what_went_ahead(
    tunnel: weft::tunnel::client::Tunnel,
    mut app: TcpStream,
    proxied: TcpStream,
    ahead: &[u8; 5],
) -> weft::relay::Relayed {
    let relay = tokio::spawn(tunnel.relay(proxied));
    let mut got = [0u8; 5];
    app.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, ahead);
    assert_eq!(echo_round_trip(&mut app, b"then more").await, b"then more");
    app.shutdown().await.unwrap();
    let mut rest = Vec::new();
    app.read_to_end(&mut rest).await.unwrap();
    let relayed = relay.await.unwrap();
    assert_eq!((relayed.sent, relayed.received), (14, 14), "{relayed:?}");
    relayed
}

#[tokio::test]
async fn a_first_message_longer_than_what_goes_ahead_arrives_whole_and_in_order() {
    let s = setup().await;
    let node = node_answering_after_first_bytes(s.server.clone()).await;
    let pool = s.pool();
    let (mut app, proxied) = client_pair().await;
    // More than goes ahead of the answer, read a few KiB at a time; the rest waits for it.
    let data = payload(weft::tunnel::client::EARLY_BYTES + 5_000);
    app.write_all(&data).await.unwrap();
    let tunnel = tokio::time::timeout(
        Duration::from_secs(5),
        pool.connect_for(hbone(&s.src, &s.dst, node, s.echo), &proxied),
    )
    .await
    .unwrap()
    .unwrap();
    let relay = tokio::spawn(tunnel.relay(proxied));
    let mut got = vec![0u8; data.len()];
    app.read_exact(&mut got).await.unwrap();
    assert!(got == data, "bytes lost or out of order");
    app.shutdown().await.unwrap();
    let mut rest = Vec::new();
    app.read_to_end(&mut rest).await.unwrap();
    let relayed = relay.await.unwrap();
    assert_eq!(relayed.sent, data.len() as u64, "{relayed:?}");
}

#[tokio::test]
async fn relay_passes_half_close_from_the_target() {
    // The target greets, half-closes, then reads what the client says until EOF.
    let s = setup().await;
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target_addr = target.local_addr().unwrap();
    let (heard_tx, heard_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut c, _) = target.accept().await.unwrap();
        c.write_all(b"hello").await.unwrap();
        c.shutdown().await.unwrap();
        let mut heard = Vec::new();
        c.read_to_end(&mut heard).await.unwrap();
        let _ = heard_tx.send(heard);
    });
    let handler = Handler::deliver_to(vec![target_addr]);
    let (node_addr, _inbound) = node(s.server.clone(), handler.clone(), Default::default()).await;

    // client ⇄ [front listener → Tunnel::relay] ⇄ node ⇄ target
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut client = TcpStream::connect(front.local_addr().unwrap())
        .await
        .unwrap();
    let (accepted, _) = front.accept().await.unwrap();
    let pool = s.pool();
    let tunnel = pool
        .connect(hbone(&s.src, &s.dst, node_addr, target_addr))
        .await
        .unwrap();
    let relay = tokio::spawn(tunnel.relay(accepted));

    let mut greeting = Vec::new();
    client.read_to_end(&mut greeting).await.unwrap(); // EOF: the target's half-close arrived
    assert_eq!(greeting, b"hello");
    client.write_all(b"goodbye").await.unwrap(); // the other direction still flows
    client.shutdown().await.unwrap();
    assert_eq!(heard_rx.await.unwrap(), b"goodbye");
    let r = relay.await.unwrap();
    assert_eq!((r.sent, r.received, r.error), (7, 5, None));
    let (_, out) = handler.wait_finished(1).await.remove(0);
    assert_eq!((out.bytes_to_target, out.bytes_from_target), (7, 5));
}

#[tokio::test]
async fn reset_by_target_reaches_the_client() {
    let s = setup().await;
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target_addr = target.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut c, _) = target.accept().await.unwrap();
        let mut buf = [0u8; 4];
        c.read_exact(&mut buf).await.unwrap();
        weft::relay::reset(&c);
        drop(c); // RST
    });
    let handler = Handler::deliver_to(vec![target_addr]);
    let (node_addr, _inbound) = node(s.server.clone(), handler.clone(), Default::default()).await;
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut client = TcpStream::connect(front.local_addr().unwrap())
        .await
        .unwrap();
    let (accepted, _) = front.accept().await.unwrap();
    let tunnel = s
        .pool()
        .connect(hbone(&s.src, &s.dst, node_addr, target_addr))
        .await
        .unwrap();
    let relay = tokio::spawn(tunnel.relay(accepted));
    client.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 16];
    let e = client.read(&mut buf).await;
    assert!(
        matches!(&e, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{e:?}"
    );
    let r = relay.await.unwrap();
    assert!(r.error.is_some(), "{r:?}");
    let (_, out) = handler.wait_finished(1).await.remove(0);
    assert!(out.error.is_some(), "{out:?}");
}

#[tokio::test]
async fn hundred_concurrent_tunnels_share_connections() {
    let s = setup().await;
    let pool = s.pool();
    let mut tasks = Vec::new();
    for i in 0..100u32 {
        let pool = pool.clone();
        let req = s.hbone();
        tasks.push(tokio::spawn(async move {
            let mut t = pool.connect(req).await.unwrap();
            let msg = format!("tunnel {i}");
            let back = echo_round_trip(&mut t, msg.as_bytes()).await;
            assert_eq!(back, msg.as_bytes());
            t
        }));
    }
    let mut tunnels = Vec::new();
    for t in tasks {
        tunnels.push(t.await.unwrap());
    }
    let stats = pool.stats();
    assert_eq!(stats.streams_active, 100);
    assert!(stats.connections <= 2, "{stats:?}");
    assert!(stats.connections_opened_total <= 2, "{stats:?}");
    assert_eq!(stats.streams_opened_total, 100);
    assert!(s.inbound.stats().tls_accepted <= 2);
    // One more than a connection carries: a second connection.
    let extra = pool.connect(s.hbone()).await.unwrap();
    assert_eq!(pool.stats().connections, 2);
    drop(extra);
    drop(tunnels);
    assert_eq!(pool.stats().streams_active, 0);

    // Another source identity gets its own connection.
    let other = id("client-ns", "other");
    s.client
        .set_local_identities([s.src.clone(), other.clone()].into());
    let mut t = pool
        .connect(hbone(&other, &s.dst, s.node, s.echo))
        .await
        .unwrap();
    assert_eq!(echo_round_trip(&mut t, b"x").await, b"x");
    let stats = pool.stats();
    assert_eq!(stats.keys.len(), 2, "{stats:?}");
    let key = stats
        .keys
        .iter()
        .find(|k| k.source == other.to_string())
        .unwrap();
    assert_eq!((key.connections, key.streams_active), (1, 1));
    assert_eq!(stats.connections, 3);
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let s = setup().await;
    let pool = Pool::new(
        s.client.clone(),
        PoolConfig {
            idle_timeout: Duration::from_millis(300),
            ..Default::default()
        },
        telemetry(),
    );
    let mut t = pool.connect(s.hbone()).await.unwrap();
    assert_eq!(echo_round_trip(&mut t, b"x").await, b"x");
    // Busy connections stay.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(pool.stats().connections, 1);
    drop(t);
    let deadline = Instant::now() + Duration::from_secs(5);
    while pool.stats().connections != 0 {
        assert!(Instant::now() < deadline, "{:?}", pool.stats());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(pool.stats().connections_closed_total, 1);
    // The server sees it go.
    while s.inbound.stats().connections_active != 0 {
        assert!(Instant::now() < deadline, "{:?}", s.inbound.stats());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // And a new tunnel opens a new one.
    let mut t = pool.connect(s.hbone()).await.unwrap();
    assert_eq!(echo_round_trip(&mut t, b"y").await, b"y");
    assert_eq!(pool.stats().connections_opened_total, 2);
}

#[tokio::test]
async fn open_tunnels_outlive_their_pool() {
    let s = setup().await;
    let pool = s.pool();
    let mut t = pool.connect(s.hbone()).await.unwrap();
    drop(pool);
    // Longer than the grace period of a closing connection without streams.
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(5500) {
        assert_eq!(echo_round_trip(&mut t, b"alive").await, b"alive");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    t.shutdown().await.unwrap();
    let mut rest = Vec::new();
    t.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
}

#[tokio::test]
async fn dead_connections_are_evicted() {
    let s = setup().await;
    // A cuttable wire between the pool and the node.
    let wire = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let wire_addr = wire.local_addr().unwrap();
    let node_addr = s.node;
    let (cut_tx, cut_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        loop {
            let (mut a, _) = wire.accept().await.unwrap();
            let mut cut = cut_rx.clone();
            tokio::spawn(async move {
                let mut b = TcpStream::connect(node_addr).await.unwrap();
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
                    _ = cut.wait_for(|c| *c) => {
                        weft::relay::reset(&a);
                        weft::relay::reset(&b);
                    }
                }
            });
        }
    });
    let pool = s.pool();
    let req = hbone(&s.src, &s.dst, wire_addr, s.echo);
    let mut t = pool.connect(req.clone()).await.unwrap();
    assert_eq!(echo_round_trip(&mut t, b"before").await, b"before");
    cut_tx.send(true).unwrap();
    let mut buf = [0u8; 8];
    assert!(
        t.read(&mut buf).await.is_err(),
        "the stream dies with its connection"
    );
    drop(t);
    let deadline = Instant::now() + Duration::from_secs(5);
    while pool.stats().connections != 0 {
        assert!(Instant::now() < deadline, "{:?}", pool.stats());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cut_tx.send(false).unwrap();
    let mut t = pool.connect(req).await.unwrap();
    assert_eq!(echo_round_trip(&mut t, b"after").await, b"after");
    let stats = pool.stats();
    assert_eq!(
        (
            stats.connections,
            stats.connections_opened_total,
            stats.connections_closed_total
        ),
        (1, 2, 1)
    );
}

#[tokio::test]
async fn identity_leaving_the_node_stops_new_tunnels() {
    let s = setup().await;
    let pool = s.pool();
    let mut t = pool.connect(s.hbone()).await.unwrap();
    s.client.set_local_identities(HashSet::new());
    let e = pool.connect(s.hbone()).await.unwrap_err();
    assert!(matches!(e, TunnelError::Identity(_)), "{e}");
    // The open one is not cut.
    assert_eq!(echo_round_trip(&mut t, b"x").await, b"x");
}

#[tokio::test]
async fn deny_not_found_and_connect_failure() {
    let s = setup().await;
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let denied_target: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let echo = s.echo;
    let handler = Handler::with(move |r| {
        if r.target == denied_target {
            Decision::Deny {
                policy: "server-ns/deny-sleep".into(),
            }
        } else if r.target == echo || r.target == closed {
            Decision::Deliver
        } else {
            Decision::NotFound
        }
    });
    let (node_addr, inbound) = node(s.server.clone(), handler.clone(), Default::default()).await;
    let pool = s.pool();

    let e = pool
        .connect(hbone(&s.src, &s.dst, node_addr, denied_target))
        .await
        .unwrap_err();
    assert!(e.is_denied(), "{e}");
    assert_eq!(e.policy(), Some("server-ns/deny-sleep"));
    assert!(e.to_string().contains("server-ns/deny-sleep"), "{e}");

    let e = pool
        .connect(hbone(
            &s.src,
            &s.dst,
            node_addr,
            "10.9.9.9:80".parse().unwrap(),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(404), "{e}");

    let e = pool
        .connect(hbone(&s.src, &s.dst, node_addr, closed))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(503), "{e}");

    // The connection survives refusals.
    let mut t = pool
        .connect(hbone(&s.src, &s.dst, node_addr, echo))
        .await
        .unwrap();
    assert_eq!(echo_round_trip(&mut t, b"ok").await, b"ok");
    let stats = pool.stats();
    assert_eq!(stats.connections_opened_total, 1);
    assert_eq!(stats.streams_rejected_total, 3);

    let finished = handler.wait_finished(3).await;
    let verdicts: Vec<_> = finished
        .iter()
        .map(|(_, o)| (o.verdict, o.status))
        .collect();
    assert_eq!(
        verdicts,
        vec![
            (Ended::Denied, 403),
            (Ended::NotFound, 404),
            (Ended::ConnectFailed, 503),
        ]
    );
    assert!(finished[2].1.error.is_some());
    let st = inbound.stats();
    assert_eq!((st.denied, st.not_found, st.connect_failed), (1, 1, 1));
}

#[tokio::test]
async fn client_from_another_ca_is_refused() {
    let s = setup().await;
    let other_dir = tempfile::tempdir().unwrap();
    let other_ca = new_ca(other_dir.path());
    // Trusts the server's CA, but its own certificate comes from a CA the server does not know.
    let rogue = manager(&other_ca, &[&s.ca], Duration::from_secs(3600), &[&s.src]);
    let pool = Pool::new(rogue, PoolConfig::default(), telemetry());
    let e = pool.connect(s.hbone()).await.unwrap_err();
    assert!(matches!(e, TunnelError::Tls { .. }), "{e}");
    assert_eq!(pool.stats().connections_failed_total, 1);
    s.wait_tls_failed(1).await;
    s.assert_serves().await;
}

#[tokio::test]
async fn server_from_another_ca_is_refused() {
    let s = setup().await;
    let other_dir = tempfile::tempdir().unwrap();
    let other_ca = new_ca(other_dir.path());
    // The server trusts the client's CA but presents a certificate from a CA the client does
    // not trust.
    let rogue = manager(&other_ca, &[&s.ca], Duration::from_secs(3600), &[&s.dst]);
    let handler = Handler::deliver_to(vec![s.echo]);
    let (node_addr, _) = node(rogue, handler, Default::default()).await;
    let e = s
        .pool()
        .connect(hbone(&s.src, &s.dst, node_addr, s.echo))
        .await
        .unwrap_err();
    assert!(matches!(e, TunnelError::Tls { .. }), "{e}");
    assert!(e.to_string().contains("invalid peer certificate"), "{e}");
}

#[tokio::test]
async fn expired_client_certificate_is_refused() {
    let s = setup().await;
    let short = manager(&s.ca, &[], Duration::from_secs(1), &[&s.src]);
    let svid = short.svid(&s.src).unwrap();
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let config = raw_client_config(Some((svid.chain.clone(), svid.key.clone_key())));
    let r = raw_h2_exchange(s.node, config, &s.dst, connect_request(s.echo)).await;
    assert!(r.is_err(), "{r:?}");
    s.wait_tls_failed(1).await;
    s.assert_serves().await;
}

#[tokio::test]
async fn missing_client_certificate_is_refused() {
    let s = setup().await;
    let r = raw_h2_exchange(
        s.node,
        raw_client_config(None),
        &s.dst,
        connect_request(s.echo),
    )
    .await;
    assert!(r.is_err(), "{r:?}");
    s.wait_tls_failed(1).await;
    s.assert_serves().await;
}

#[tokio::test]
async fn server_with_another_identity_is_refused() {
    let s = setup().await;
    // The destination node hosts `dst` but not `ghost`: nothing to present for that SNI.
    let ghost = id("server-ns", "ghost");
    let e = s
        .pool()
        .connect(hbone(&s.src, &ghost, s.node, s.echo))
        .await
        .unwrap_err();
    assert!(matches!(e, TunnelError::Tls { .. }), "{e}");

    // The node hosts both, but serves `dst` where the client expects `ghost`.
    s.server
        .set_local_identities([s.dst.clone(), ghost.clone()].into());
    let config = s.client.client_config(&s.src, &ghost).unwrap();
    let tcp = TcpStream::connect(s.node).await.unwrap();
    let name = ServerName::try_from(sni_for(&s.dst)).unwrap();
    let e = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("expected"), "{e}");
    // Asking for `ghost` by name now works.
    let mut t = s
        .pool()
        .connect(hbone(&s.src, &ghost, s.node, s.echo))
        .await
        .unwrap();
    assert_eq!(echo_round_trip(&mut t, b"boo").await, b"boo");
}

#[tokio::test]
async fn garbage_and_plain_http_are_refused() {
    let s = setup().await;
    let mut failures = 0;
    for junk in [
        &b"\x00\x01\x02garbage\xff\xfe"[..],
        b"GET / HTTP/1.1\r\nHost: example\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    ] {
        let mut c = TcpStream::connect(s.node).await.unwrap();
        c.write_all(junk).await.unwrap();
        let mut buf = Vec::new();
        // The server answers with at most a TLS alert and closes.
        let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut buf))
            .await
            .expect("server closed the connection");
        assert!(!buf.starts_with(b"HTTP/"), "{buf:?}");
        failures += 1;
        s.wait_tls_failed(failures).await;
    }
    // A client that connects and says nothing is cut off by the handshake timeout.
    let s = setup_with(|c| c.handshake_timeout = Duration::from_millis(300)).await;
    let mut silent = TcpStream::connect(s.node).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut buf))
        .await
        .expect("silent client closed by the handshake timeout")
        .ok();
    s.wait_tls_failed(1).await;
    s.assert_serves().await;
}

#[tokio::test]
async fn malformed_requests_get_400_and_oversized_headers_are_refused() {
    let s = setup().await;
    let config = s.client.client_config(&s.src, &s.dst).unwrap();

    let get = http::Request::builder()
        .method("GET")
        .uri("https://example.com/")
        .body(())
        .unwrap();
    let r = raw_h2_exchange(s.node, config.clone(), &s.dst, get).await;
    assert_eq!(r.unwrap(), 400);

    let by_name = http::Request::builder()
        .method("CONNECT")
        .uri("example.com:80")
        .body(())
        .unwrap();
    let r = raw_h2_exchange(s.node, config.clone(), &s.dst, by_name).await;
    assert_eq!(r.unwrap(), 400);

    let mut big = connect_request(s.echo);
    big.headers_mut()
        .insert("x-padding", "a".repeat(64 << 10).parse().unwrap());
    let r = raw_h2_exchange(s.node, config.clone(), &s.dst, big).await;
    assert!(!matches!(r, Ok(200)), "{r:?}");
    assert_eq!(s.inbound.stats().delivered, 0);

    // Many headers adding up to too much, too.
    let mut many = connect_request(s.echo);
    for i in 0..200 {
        many.headers_mut().insert(
            http::HeaderName::from_bytes(format!("x-h{i}").as_bytes()).unwrap(),
            "b".repeat(200).parse().unwrap(),
        );
    }
    let r = raw_h2_exchange(s.node, config, &s.dst, many).await;
    assert!(!matches!(r, Ok(200)), "{r:?}");
    assert_eq!(s.inbound.stats().delivered, 0);
    assert_eq!(s.inbound.stats().bad_requests, 2);
    s.assert_serves().await;
}

#[tokio::test]
async fn rotation_keeps_open_tunnels_and_renews_new_connections() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca(dir.path());
    let src = id("a", "client");
    let dst = id("b", "server");
    let client = manager(&ca, &[], Duration::from_secs(2), &[&src]);
    let server = manager(&ca, &[], Duration::from_secs(2), &[&dst]);
    let _rc = client.clone().spawn_rotation();
    let _rs = server.clone().spawn_rotation();
    let echo = echo_server().await;
    let (node_addr, _) = node(
        server.clone(),
        Handler::deliver_to(vec![echo]),
        Default::default(),
    )
    .await;
    // One stream per connection, so every tunnel makes a handshake.
    let pool = Pool::new(
        client.clone(),
        PoolConfig {
            max_streams_per_conn: 1,
            ..Default::default()
        },
        telemetry(),
    );
    let mut first = pool
        .connect(hbone(&src, &dst, node_addr, echo))
        .await
        .unwrap();
    let first_conn = first.connection().clone();
    let started = Instant::now();
    let mut peer_serials = HashSet::from([first_conn.peer_serial.clone()]);
    let mut local_serials = HashSet::from([first_conn.local_serial.clone()]);
    let mut i = 0u32;
    while started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(700)).await;
        i += 1;
        // The old tunnel keeps working past its certificates' expiry.
        let msg = format!("still here {i}");
        assert_eq!(
            echo_round_trip(&mut first, msg.as_bytes()).await,
            msg.as_bytes()
        );
        // New connections present current certificates.
        let mut t = pool
            .connect(hbone(&src, &dst, node_addr, echo))
            .await
            .unwrap();
        assert_eq!(echo_round_trip(&mut t, b"new").await, b"new");
        peer_serials.insert(t.connection().peer_serial.clone());
        local_serials.insert(t.connection().local_serial.clone());
    }
    assert!(peer_serials.len() >= 3, "{peer_serials:?}");
    assert!(local_serials.len() >= 3, "{local_serials:?}");
    assert_eq!(first.connection().id, first_conn.id);
}

#[tokio::test]
async fn peer_from_a_second_root_in_the_trust_bundle_is_accepted() {
    let d1 = tempfile::tempdir().unwrap();
    let d2 = tempfile::tempdir().unwrap();
    let root1 = new_ca(d1.path());
    let root2 = new_ca(d2.path());
    let src = id("a", "client");
    let dst = id("b", "server");
    // Mid rotation: the client already has SVIDs from root 2, the server still from root 1.
    // Both trust both.
    let client = manager(&root2, &[&root1], Duration::from_secs(600), &[&src]);
    let server = manager(&root1, &[&root2], Duration::from_secs(600), &[&dst]);
    let echo = echo_server().await;
    let (node_addr, _) = node(server, Handler::deliver_to(vec![echo]), Default::default()).await;
    let pool = Pool::new(client, PoolConfig::default(), telemetry());
    let mut t = pool
        .connect(hbone(&src, &dst, node_addr, echo))
        .await
        .unwrap();
    assert_eq!(echo_round_trip(&mut t, b"rotated").await, b"rotated");

    // A server that does not yet list root 2 refuses that client.
    let old_server = manager(&root1, &[], Duration::from_secs(600), &[&dst]);
    let (old_node, old_inbound) = node(
        old_server,
        Handler::deliver_to(vec![echo]),
        Default::default(),
    )
    .await;
    let e = pool
        .connect(hbone(&src, &dst, old_node, echo))
        .await
        .unwrap_err();
    assert!(matches!(e, TunnelError::Tls { .. }), "{e}");
    assert_eq!(old_inbound.stats().tls_failed, 1);
}

#[tokio::test]
async fn intermediate_ca_chains_verify() {
    let root_dir = tempfile::tempdir().unwrap();
    let inter_dir = tempfile::tempdir().unwrap();
    let root = new_ca(root_dir.path());
    weft::identity::init_intermediate_ca(
        &root.join("ca.crt"),
        &root.join("ca.key"),
        inter_dir.path(),
        TD,
        Duration::from_secs(3600),
    )
    .unwrap();
    let src = id("a", "client");
    let dst = id("b", "server");
    // The client mints from the intermediate, the server from the root.
    let client = manager(inter_dir.path(), &[], Duration::from_secs(600), &[&src]);
    let server = manager(&root, &[], Duration::from_secs(600), &[&dst]);
    let echo = echo_server().await;
    let (node_addr, _) = node(server, Handler::deliver_to(vec![echo]), Default::default()).await;
    let pool = Pool::new(client, PoolConfig::default(), telemetry());
    let mut t = pool
        .connect(hbone(&src, &dst, node_addr, echo))
        .await
        .unwrap();
    assert_eq!(echo_round_trip(&mut t, b"chain").await, b"chain");
}

#[tokio::test]
async fn source_not_hosted_here_cannot_tunnel() {
    let s = setup().await;
    let stranger = id("client-ns", "stranger");
    let e = s
        .pool()
        .connect(hbone(&stranger, &s.dst, s.node, s.echo))
        .await
        .unwrap_err();
    assert!(matches!(e, TunnelError::Identity(_)), "{e}");
}

#[tokio::test]
async fn unreachable_node_is_a_connect_error() {
    let s = setup().await;
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let e = s
        .pool()
        .connect(hbone(&s.src, &s.dst, closed, s.echo))
        .await
        .unwrap_err();
    assert!(matches!(e, TunnelError::Connect { .. }), "{e}");
}

/// Throughput of a bulk transfer through the tunnel vs. plain TCP over loopback.
/// `cargo test --release -p weft-proxy --test tunnel -- --ignored --nocapture throughput`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn throughput() {
    const TOTAL: u64 = 2 << 30;
    // A sink that counts.
    let sink = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sink_addr = sink.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut c, _) = sink.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1 << 20];
                while c.read(&mut buf).await.unwrap_or(0) > 0 {}
                let _ = c.shutdown().await;
            });
        }
    });
    /// CPU time (user + system) of this process.
    fn cpu() -> Duration {
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: getrusage fills the struct we own.
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
        let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
        tv(ru.ru_utime) + tv(ru.ru_stime)
    }
    /// (Gbit/s, CPU seconds per GiB)
    async fn pump(mut c: TcpStream) -> (f64, f64) {
        let buf = vec![7u8; 1 << 20];
        let cpu_before = cpu();
        let started = Instant::now();
        let mut sent = 0;
        while sent < TOTAL {
            if let Err(e) = c.write_all(&buf).await {
                eprintln!("pump: {e} after {sent} bytes");
                return (0.0, 0.0);
            }
            sent += buf.len() as u64;
        }
        c.shutdown().await.unwrap();
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).await.unwrap();
        let gbps = TOTAL as f64 / started.elapsed().as_secs_f64() / 1e9 * 8.0;
        let cpu_per_gib = (cpu() - cpu_before).as_secs_f64() / (TOTAL as f64 / (1u64 << 30) as f64);
        (gbps, cpu_per_gib)
    }
    let direct = pump(TcpStream::connect(sink_addr).await.unwrap()).await;

    let s = setup().await;
    let handler = Handler::deliver_to(vec![sink_addr]);
    let (node_addr, _) = node(s.server.clone(), handler, Default::default()).await;
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(front.local_addr().unwrap())
        .await
        .unwrap();
    let (accepted, _) = front.accept().await.unwrap();
    let tunnel = s
        .pool()
        .connect(hbone(&s.src, &s.dst, node_addr, sink_addr))
        .await
        .unwrap();
    let relay = tokio::spawn(tunnel.relay(accepted));
    // On the test's own thread, as a separate client process would be.
    let tunnelled = pump(client).await;
    let r = relay.await.unwrap();
    assert_eq!(r.error, None);
    assert_eq!(r.sent, TOTAL);
    let ((direct, direct_cpu), (tunnelled, tunnel_cpu)) = (direct, tunnelled);
    println!(
        "loopback throughput: direct TCP {direct:.2} Gbit/s ({direct_cpu:.2} CPU s/GiB), \
         HBONE tunnel {tunnelled:.2} Gbit/s ({tunnel_cpu:.2} CPU s/GiB), {:.0}%",
        tunnelled / direct * 100.0
    );
}

// ---- raw clients for misbehaving peers ----

fn connect_request(target: SocketAddr) -> http::Request<()> {
    http::Request::builder()
        .method("CONNECT")
        .uri(target.to_string())
        .header("forwarded", "for=10.0.0.1")
        .body(())
        .unwrap()
}

/// TLS 1.3 + h2 client that does not check the server, with an optional fixed certificate.
fn raw_client_config(
    cert: Option<(
        Vec<CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    )>,
) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let mut config = match cert {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// TLS + HTTP/2 to `node` asking for `sni_id`, one request; the response status.
async fn raw_h2_exchange(
    node: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    sni_id: &SpiffeId,
    request: http::Request<()>,
) -> Result<u16, String> {
    let exchange = async {
        let tcp = TcpStream::connect(node).await.map_err(|e| e.to_string())?;
        let name = ServerName::try_from(sni_for(sni_id)).unwrap();
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("tls: {e}"))?;
        let (mut send, conn) = h2::client::handshake(tls)
            .await
            .map_err(|e| format!("h2 handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let (response, mut stream) = send
            .send_request(request, false)
            .map_err(|e| format!("send: {e}"))?;
        let response = response.await.map_err(|e| format!("response: {e}"))?;
        stream.send_reset(h2::Reason::CANCEL);
        Ok(response.status().as_u16())
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| "timed out".to_string())?
}

#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// An authenticated TLS connection to the setup's node, as its client identity, for frames
/// written by hand or by a bare h2 client.
async fn client_tls(s: &Setup) -> tokio_rustls::client::TlsStream<TcpStream> {
    s.client.ready(&s.src).await.unwrap();
    let config = s.client.client_config(&s.src, &s.dst).unwrap();
    let tcp = TcpStream::connect(s.node).await.unwrap();
    let name = ServerName::try_from(sni_for(&s.dst)).unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .unwrap()
}

/// Waits until `f` holds, for up to 10 s.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// HTTP/2 rapid reset (CVE-2023-44487): each CONNECT is reset by the client once the node works
/// on it. The work is dropped at once (not one connect to the target is left running), and the
/// connection is closed with ENHANCE_YOUR_CALM after Envoy's 250 premature resets; others are
/// served on.
#[tokio::test]
async fn rapid_reset_cancels_the_work_and_closes_the_connection() {
    let s = setup().await;
    let slow: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let handler = Handler::with(|_| Decision::Hang);
    let (node, inbound) = node(s.server.clone(), handler.clone(), ServerConfig::default()).await;
    let s = Setup { node, inbound, ..s };
    let (mut send, mut conn) = h2::client::handshake(client_tls(&s).await).await.unwrap();
    let mut closed_with = None;
    let mut sent = 0;
    for n in 1..=1000 {
        let ready = tokio::select! {
            r = send.clone().ready() => r,
            r = &mut conn => { closed_with = Some(r); break; }
        };
        let Ok(mut ready) = ready else { break };
        let (response, stream) = match ready.send_request(connect_request(slow), false) {
            Ok(x) => x,
            Err(_) => break,
        };
        sent = n;
        // Reset once the node works on it (what the attack's HEADERS + RST_STREAM become when
        // the node is quick).
        let started = async {
            while handler.hanging.load(Ordering::SeqCst) < n {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        tokio::select! {
            () = started => {}
            r = &mut conn => { closed_with = Some(r); break; }
        }
        drop((response, stream));
        send = ready;
    }
    let closed_with = match closed_with {
        Some(r) => r,
        None => tokio::time::timeout(Duration::from_secs(5), conn)
            .await
            .expect("the node closes the connection"),
    };
    // The GOAWAY comes first; a client still writing may see the close before reading it.
    let e = closed_with.expect_err("closed by the node");
    assert!(
        e.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM) || e.is_io(),
        "{e}"
    );
    assert!(
        (250..=260).contains(&sent),
        "closed after {sent} streams; Envoy's rule closes at the 250th premature reset"
    );
    // Every started connect was dropped: nothing left in flight.
    eventually("every reset stream's work dropped", || {
        handler.dropped.load(Ordering::SeqCst) == handler.hanging.load(Ordering::SeqCst)
    })
    .await;
    let stats = s.inbound.stats();
    assert_eq!(stats.reset_floods, 1, "{stats:?}");
    assert!(stats.premature_resets >= 250, "{stats:?}");
    assert_eq!(stats.streams_cancelled, stats.premature_resets, "{stats:?}");
    eventually("no stream left", || s.inbound.stats().streams_active == 0).await;
}

/// Streams that end normally, with a reset now and then, never trip the rule.
#[tokio::test]
async fn occasional_cancellations_keep_the_connection() {
    let s = setup().await;
    let (send, conn) = h2::client::handshake(client_tls(&s).await).await.unwrap();
    let conn = tokio::spawn(conn);
    for n in 0..600 {
        let mut ready = send.clone().ready().await.unwrap();
        let (response, mut stream) = ready.send_request(connect_request(s.echo), false).unwrap();
        let response = response.await.unwrap();
        assert_eq!(response.status(), 200);
        if n % 3 == 0 {
            // Answered, then cancelled: not premature.
            stream.send_reset(h2::Reason::CANCEL);
        } else {
            stream.send_data(bytes::Bytes::new(), true).unwrap();
            let mut body = response.into_body();
            while body.data().await.is_some() {}
        }
    }
    assert!(!conn.is_finished(), "the connection is kept");
    assert_eq!(s.inbound.stats().reset_floods, 0);
}

/// PING and SETTINGS floods from a client that never reads: h2 acknowledges each before it
/// reads the next frame, so the node stops reading instead of queueing acknowledgements.
#[tokio::test]
async fn ping_and_settings_floods_stall_instead_of_queueing() {
    let s = setup().await;
    for (kind, frame) in [
        ("PING", {
            let mut f = vec![0, 0, 8, 0x6, 0, 0, 0, 0, 0];
            f.extend_from_slice(b"flooding");
            f
        }),
        ("SETTINGS", vec![0, 0, 0, 0x4, 0, 0, 0, 0, 0]),
    ] {
        let mut tls = client_tls(&s).await;
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        tls.write_all(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]).await.unwrap();
        let batch: Vec<u8> = frame
            .iter()
            .copied()
            .cycle()
            .take(frame.len() * 4096)
            .collect();
        let mut written = 0usize;
        let limit = 256usize << 20;
        let stalled = loop {
            match tokio::time::timeout(Duration::from_secs(2), tls.write_all(&batch)).await {
                Ok(Ok(())) => written += batch.len(),
                Ok(Err(e)) => panic!("{kind} flood: the node closed the connection: {e}"),
                Err(_) => break true,
            }
            if written > limit {
                break false;
            }
        };
        assert!(
            stalled,
            "{kind} flood: the node read {written} bytes without the client reading an ACK"
        );
        eprintln!("{kind} flood: the node stopped reading after {written} bytes");
        s.assert_serves().await;
    }
}

/// The pool pings its connections: one whose peer stops answering (packets dropped, no FIN, no
/// RST) is closed and leaves the pool within interval + timeout, and the next CONNECT dials a
/// new connection once the peer is reachable again.
#[tokio::test]
async fn unanswered_ping_closes_the_pooled_connection() {
    let s = setup().await;
    // A wire that can black-hole: bytes stop flowing both ways, the sockets stay open.
    let wire = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let wire_addr = wire.local_addr().unwrap();
    let node_addr = s.node;
    let (hole_tx, hole_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        loop {
            let (a, _) = wire.accept().await.unwrap();
            let b = TcpStream::connect(node_addr).await.unwrap();
            let (ar, aw) = a.into_split();
            let (br, bw) = b.into_split();
            for (mut r, mut w) in [(ar, bw), (br, aw)] {
                let mut hole = hole_rx.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        let _ = hole.wait_for(|h| !*h).await;
                        let n = match r.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if *hole.borrow() {
                            continue;
                        }
                        if w.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        }
    });
    let pool = Pool::new(
        s.client.clone(),
        PoolConfig {
            keepalive_interval: Duration::from_millis(200),
            keepalive_timeout: Duration::from_millis(300),
            ..Default::default()
        },
        telemetry(),
    );
    let req = hbone(&s.src, &s.dst, wire_addr, s.echo);
    let mut t = pool.connect(req.clone()).await.unwrap();
    assert_eq!(echo_round_trip(&mut t, b"before").await, b"before");
    drop(t);
    // Pinged and answered: kept.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(pool.stats().connections, 1);
    assert_eq!(pool.stats().keepalive_timeouts_total, 0);
    hole_tx.send(true).unwrap();
    let cut = Instant::now();
    eventually("the dead connection leaves the pool", || {
        pool.stats().connections == 0
    })
    .await;
    let took = cut.elapsed();
    assert!(
        took < Duration::from_millis(1500),
        "noticed after {took:?} (interval 200 ms + timeout 300 ms)"
    );
    assert_eq!(pool.stats().keepalive_timeouts_total, 1);
    hole_tx.send(false).unwrap();
    let mut t = pool.connect(req).await.unwrap();
    assert_eq!(echo_round_trip(&mut t, b"after").await, b"after");
    assert_eq!(pool.stats().connections_opened_total, 2);
}

/// A destination node that restarts: it drains (GOAWAY on its connections, open tunnels run
/// on) while its successor accepts on the same listening socket. No new tunnel fails, the
/// old connection is never used again, and it ends (releasing the drain) with its last
/// tunnel.
#[tokio::test]
async fn draining_node_hands_new_tunnels_to_its_successor() {
    let s = setup().await;
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let addr = std_listener.local_addr().unwrap();
    let successor_socket = std_listener.try_clone().unwrap();
    let (trigger, draining) = weft::drain::channel();
    let old = Server::new(
        s.server.clone(),
        s.handler.clone(),
        ServerConfig::default(),
        telemetry(),
        draining,
    );
    let old_serving = tokio::spawn(
        old.clone()
            .serve(TcpListener::from_std(std_listener).unwrap()),
    );
    let pool = s.pool();
    let req = hbone(&s.src, &s.dst, addr, s.echo);
    let mut open = pool.connect(req.clone()).await.unwrap();
    let old_conn = open.connection().id;
    assert_eq!(echo_round_trip(&mut open, b"before").await, b"before");

    trigger.start();
    eventually("GOAWAY sent", || old.stats().drain_goaways == 1).await;
    trigger.hand_over();
    tokio::time::timeout(Duration::from_secs(5), old_serving)
        .await
        .expect("the old node stops accepting once its socket is handed over")
        .unwrap();
    let successor = Server::new(
        s.server.clone(),
        s.handler.clone(),
        ServerConfig::default(),
        telemetry(),
        Draining::never(),
    );
    tokio::spawn(
        successor
            .clone()
            .serve(TcpListener::from_std(successor_socket).unwrap()),
    );
    // The open tunnel runs on over the old connection.
    assert_eq!(echo_round_trip(&mut open, b"during").await, b"during");
    // New tunnels: never on the old connection, none failing.
    for i in 0..20 {
        let mut t = pool
            .connect(req.clone())
            .await
            .unwrap_or_else(|e| panic!("tunnel {i}: {e}"));
        assert_ne!(t.connection().id, old_conn);
        assert_eq!(echo_round_trip(&mut t, b"new").await, b"new");
    }
    assert_eq!(successor.stats().delivered, 20);
    assert_eq!(old.stats().delivered, 1);
    assert_eq!(trigger.in_flight(), 1, "the old connection holds the drain");
    drop(open);
    tokio::time::timeout(Duration::from_secs(5), trigger.drained())
        .await
        .expect("the old connection ends with its last tunnel");
    assert_eq!(old.stats().connections_active, 0);
}

/// At the drain timeout, connections still open are closed.
#[tokio::test]
async fn drain_timeout_closes_what_is_left() {
    let s = setup().await;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (trigger, draining) = weft::drain::channel();
    let server = Server::new(
        s.server.clone(),
        s.handler.clone(),
        ServerConfig::default(),
        telemetry(),
        draining,
    );
    tokio::spawn(server.clone().serve(l));
    let pool = s.pool();
    let mut open = pool
        .connect(hbone(&s.src, &s.dst, addr, s.echo))
        .await
        .unwrap();
    assert_eq!(echo_round_trip(&mut open, b"x").await, b"x");
    trigger.start();
    eventually("GOAWAY sent", || server.stats().drain_goaways == 1).await;
    assert_eq!(echo_round_trip(&mut open, b"y").await, b"y");
    trigger.close();
    tokio::time::timeout(Duration::from_secs(5), trigger.drained())
        .await
        .expect("closed at the drain timeout");
    let mut buf = [0u8; 1];
    assert!(
        !matches!(open.read(&mut buf).await, Ok(1)),
        "the tunnel is cut with its connection"
    );
}

/// What a node that begins to drain as a CONNECT arrives sends, written frame by frame: its
/// SETTINGS, ACKs for the client's SETTINGS and PINGs, and at the first HEADERS a `GOAWAY` whose
/// last stream id (0) is below it. The connection is then left open.
async fn serve_goaway_below_first_stream<S>(mut io: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
        let len = payload.len() as u32;
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    };
    let mut preface = [0u8; 24];
    io.read_exact(&mut preface).await.unwrap();
    assert_eq!(&preface, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    io.write_all(&frame(0x4, 0, 0, &[])).await.unwrap();
    loop {
        let mut head = [0u8; 9];
        if io.read_exact(&mut head).await.is_err() {
            return;
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        io.read_exact(&mut payload).await.unwrap();
        let reply = match (head[3], head[4] & 1) {
            (0x4, 0) => frame(0x4, 1, 0, &[]),
            (0x6, 0) => frame(0x6, 1, 0, &payload),
            (0x1, _) => frame(0x7, 0, 0, &[0; 8]),
            _ => continue,
        };
        io.write_all(&reply).await.unwrap();
        io.flush().await.unwrap();
    }
}

/// A stream refused because of a GOAWAY (above its last stream id), or with REFUSED_STREAM,
/// was not processed: it is tried once more on a fresh connection.
#[tokio::test]
async fn refused_streams_are_retried_on_a_fresh_connection() {
    for goaway in [false, true] {
        let s = setup().await;
        s.server.ready(&s.dst).await.unwrap();
        // The first connection reaches a node that refuses its first stream; later ones the
        // real node.
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front_addr = front.local_addr().unwrap();
        let (node_addr, server_config) = (s.node, s.server.server_config());
        tokio::spawn(async move {
            let (tcp, _) = front.accept().await.unwrap();
            tokio::spawn(async move {
                let tls = tokio_rustls::TlsAcceptor::from(server_config)
                    .accept(tcp)
                    .await
                    .unwrap();
                if goaway {
                    return serve_goaway_below_first_stream(tls).await;
                }
                let mut conn = h2::server::handshake(tls).await.unwrap();
                if let Some(Ok((_, mut respond))) = conn.accept().await {
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                }
                while let Some(Ok(_)) = conn.accept().await {}
            });
            loop {
                let (mut a, _) = front.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut b = TcpStream::connect(node_addr).await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                });
            }
        });
        let pool = s.pool();
        // The client's first bytes went with the refused stream: they go again with the retry.
        let (mut app, proxied) = client_pair().await;
        app.write_all(b"first, ").await.unwrap();
        let t = pool
            .connect_for(hbone(&s.src, &s.dst, front_addr, s.echo), &proxied)
            .await
            .unwrap_or_else(|e| panic!("goaway={goaway}: {e}"));
        let _relay = tokio::spawn(t.relay(proxied));
        app.write_all(b"retried").await.unwrap();
        let mut got = [0u8; 14];
        tokio::time::timeout(Duration::from_secs(5), app.read_exact(&mut got))
            .await
            .expect("the first bytes were lost with the refused stream")
            .unwrap();
        assert_eq!(&got, b"first, retried", "goaway={goaway}");
        let stats = pool.stats();
        assert_eq!(stats.streams_retried_total, 1, "goaway={goaway}: {stats:?}");
        assert_eq!(
            stats.connections_opened_total, 2,
            "goaway={goaway}: {stats:?}"
        );
    }
}

/// Past the admission limits, new connections are reset at once and counted; within them, a
/// good client is served.
#[tokio::test]
async fn handshakes_held_open_are_limited_per_peer() {
    let s = setup_with(|c| {
        c.admission.max_handshakes_per_peer = 4;
        c.admission.max_connections_per_peer = 6;
    })
    .await;
    // Four connections that never start TLS: all of this address's handshakes.
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(TcpStream::connect(s.node).await.unwrap());
    }
    eventually("four accepted", || s.inbound.stats().tcp_accepted == 4).await;
    let mut fifth = TcpStream::connect(s.node).await.unwrap();
    let mut buf = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(5), fifth.read(&mut buf))
        .await
        .expect("refused at once");
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{r:?}"
    );
    assert_eq!(s.inbound.stats().refused_peer_handshakes, 1);
    // Established connections do not count as handshakes, but towards the address's open
    // connections.
    drop(idle.pop());
    drop(idle.pop());
    eventually("two left", || s.inbound.stats().tls_failed == 2).await;
    let pool = s.pool();
    let mut t = pool
        .connect(s.hbone())
        .await
        .expect("served within the limits");
    assert_eq!(echo_round_trip(&mut t, b"ok").await, b"ok");
    let other = Pool::new(
        s.client.clone(),
        PoolConfig {
            max_streams_per_conn: 1,
            ..Default::default()
        },
        telemetry(),
    );
    let mut tunnels = Vec::new();
    for _ in 0..3 {
        tunnels.push(other.connect(s.hbone()).await.unwrap());
    }
    // 2 idle + 1 + 3 = 6 open from 127.0.0.1: the next is refused.
    let e = other.connect(s.hbone()).await.unwrap_err();
    assert!(
        matches!(e, TunnelError::Tls { .. } | TunnelError::Connect { .. }),
        "{e}"
    );
    assert_eq!(s.inbound.stats().refused_peer_connections, 1);
    drop(tunnels);
    drop(idle);
}
