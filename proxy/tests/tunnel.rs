//! HBONE end to end over loopback: identity manager + outbound pool + inbound server + a
//! target TCP server, and everything a hostile or broken peer might send.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

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
    Deny { policy: String },
    NotFound,
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
    let inbound = Server::new(identity, handler, config, telemetry());
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
    let provider = Arc::new(rustls::crypto::ring::default_provider());
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
