//! HTTP client connections to upstream endpoints, reused.
//!
//! A connection is opened by the caller (over TCP, an HBONE tunnel or TLS: the pool does not
//! care) and handed to [`Sender::handshake`]; after a request, [`HttpPool::checkin`] keeps it
//! for the next request to the same [`PoolKey`]. HTTP/1.1 connections carry one request at a
//! time, so a checked-in sender is reused only once its previous response has been read;
//! HTTP/2 connections are shared by every request to the key.
//!
//! Each data-path worker ([`crate::worker`]) keeps connections of its own, as Envoy's workers
//! do: a request and its upstream connection are served by the same thread.
//!
//! A connection with no request sent and no byte moved for its idle timeout (DestinationRule
//! `connectionPool.http.idleTimeout`, Istio's default 1 h) is closed by its own task, whether
//! or not another request comes: nothing is kept open for an endpoint nobody calls any more.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use crate::batch;

/// The request body weft sends upstream.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// The HTTP version of an upstream connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    Http1,
    Http2,
}

impl Version {
    pub fn as_str(self) -> &'static str {
        match self {
            Version::Http1 => "HTTP/1.1",
            Version::Http2 => "HTTP/2",
        }
    }
}

/// What makes two connections interchangeable: the endpoint, how it is reached (for whom,
/// through what), and the HTTP version.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub endpoint: SocketAddr,
    /// `direct`, `hbone <source identity>`, `tls <sni>`: connections of different routes are
    /// never shared. Shared text: a key is cloned for every lookup.
    pub via: Arc<str>,
    pub version: Version,
    /// The destination (cluster) it serves: as Envoy keeps a pool per cluster, connections
    /// are counted against one cluster's limits and carry its settings (0: none in
    /// particular).
    pub cluster: u64,
    /// The registry generation the connection was opened under: the destination admitted it
    /// with the policies of then, so after a change no request is sent on it again.
    pub generation: u64,
}

/// One upstream connection's request side, with what it has carried and how long it may be
/// kept.
pub struct Sender {
    conn: Conn,
    shared: Arc<Shared>,
    /// Since when it has been kept without a request.
    idle_since: Instant,
}

enum Conn {
    Http1(http1::SendRequest<Body>),
    Http2(http2::SendRequest<Body>),
}

/// What every handle of one connection shares.
struct Shared {
    /// Requests sent on it.
    used: AtomicU32,
    reuse: Reuse,
    /// Counts its use (a request sent, bytes moved): what tells it idle.
    activity: Arc<Activity>,
}

/// How many times a connection was used (a request sent, bytes moved): a count, not a clock
/// read, on the data path; [`unused_for`] looks at it on a coarse tick.
#[derive(Debug, Default)]
struct Activity(AtomicU64);

impl Activity {
    fn touch(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    fn count(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Ends once the connection has been unused for `timeout` (never with `None`): looked at on a
/// coarse tick, a quarter of the timeout (100 ms to 30 s), so it ends within a tick after.
async fn unused_for(activity: &Activity, timeout: Option<Duration>) {
    let Some(timeout) = timeout else {
        return std::future::pending().await;
    };
    let tick = (timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
    // First tick a period from now: an immediate one would wake the runtime's driver for
    // nothing.
    let mut every = tokio::time::interval_at(tokio::time::Instant::now() + tick, tick);
    let mut seen = activity.count();
    let mut used = tokio::time::Instant::now();
    loop {
        let now = every.tick().await;
        let count = activity.count();
        if count != seen {
            seen = count;
            used = now;
        } else if now.saturating_duration_since(used) >= timeout {
            return;
        }
    }
}

/// A connection's byte stream, noting in its [`Activity`] when bytes move.
struct Watched<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// How long a connection may be reused (DestinationRule `connectionPool.http`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reuse {
    /// `maxRequestsPerConnection`: after this many requests it is let go (0: no limit).
    pub max_requests: u32,
    /// `idleTimeout`: kept unused longer than this, it is let go.
    pub idle_timeout: Option<Duration>,
}

/// Idle HTTP/1.1 connections kept per key.
const MAX_IDLE_PER_KEY: usize = 64;

impl Sender {
    /// Speaks `version` over `io`; the connection is driven by a task of its own until either
    /// side closes it, holding `hold` (what counts it open) until then.
    pub async fn handshake<T>(
        io: T,
        version: Version,
        reuse: Reuse,
        hold: impl Send + 'static,
    ) -> Result<Sender, hyper::Error>
    where
        T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let activity = Arc::new(Activity::default());
        activity.touch();
        let io = Watched {
            inner: io,
            activity: activity.clone(),
        };
        let idle = reuse.idle_timeout;
        let conn = match version {
            Version::Http1 => {
                let (send, conn) = http1::Builder::new().handshake(TokioIo::new(io)).await?;
                let activity = activity.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        r = conn.with_upgrades() => if let Err(e) = r {
                            debug!(error = %e, "upstream HTTP/1.1 connection ended");
                        },
                        () = unused_for(&activity, idle) => {
                            debug!(?idle, "upstream HTTP/1.1 connection idle: closed");
                        }
                    }
                    drop(hold);
                });
                Conn::Http1(send)
            }
            Version::Http2 => {
                // The requests of all the streams one turn of the connection sends, in one write.
                let (io, flusher) = batch::batched(io);
                let (send, conn) = http2::Builder::new(TokioExecutor::new())
                    .timer(hyper_util::rt::TokioTimer::new())
                    .handshake(TokioIo::new(io))
                    .await?;
                let conn = flusher.around(conn);
                let activity = activity.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        r = conn => if let Err(e) = r {
                            debug!(error = %e, "upstream HTTP/2 connection ended");
                        },
                        () = unused_for(&activity, idle) => {
                            debug!(?idle, "upstream HTTP/2 connection idle: closed");
                        }
                    }
                    drop(hold);
                });
                Conn::Http2(send)
            }
        };
        Ok(Sender {
            conn,
            shared: Arc::new(Shared {
                used: AtomicU32::new(0),
                reuse,
                activity,
            }),
            idle_since: Instant::now(),
        })
    }

    /// Whether it has carried as many requests as it may.
    fn spent(&self) -> bool {
        let max = self.shared.reuse.max_requests;
        max > 0 && self.shared.used.load(Ordering::Relaxed) >= max
    }

    /// Whether it has been kept unused for longer than it may.
    fn stale(&self, now: Instant) -> bool {
        self.shared
            .reuse
            .idle_timeout
            .is_some_and(|t| now.saturating_duration_since(self.idle_since) > t)
    }

    /// Whether it can be handed out again at `now` (a busy HTTP/1.1 one later).
    fn reusable(&self, now: Instant) -> bool {
        !self.is_closed() && !self.spent() && !self.stale(now)
    }

    /// Sends a request and waits for the response head.
    pub async fn send(&mut self, req: Request<Body>) -> Result<Response<Incoming>, hyper::Error> {
        self.shared.used.fetch_add(1, Ordering::Relaxed);
        self.shared.activity.touch();
        match &mut self.conn {
            Conn::Http1(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
            Conn::Http2(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
        }
    }

    fn is_closed(&self) -> bool {
        match &self.conn {
            Conn::Http1(s) => s.is_closed(),
            Conn::Http2(s) => s.is_closed(),
        }
    }

    fn is_ready(&self) -> bool {
        match &self.conn {
            Conn::Http1(s) => s.is_ready(),
            Conn::Http2(s) => s.is_ready(),
        }
    }

    /// Another handle of a shared (HTTP/2) connection.
    fn share(&self) -> Option<Sender> {
        match &self.conn {
            Conn::Http1(_) => None,
            Conn::Http2(s) => Some(Sender {
                conn: Conn::Http2(s.clone()),
                shared: self.shared.clone(),
                idle_since: self.idle_since,
            }),
        }
    }
}

/// A pool key on the current worker.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Local {
    worker: usize,
    key: PoolKey,
}

impl Local {
    fn here(key: &PoolKey) -> Local {
        Local {
            worker: crate::worker::current(),
            key: key.clone(),
        }
    }
}

/// Upstream connections kept for reuse: in shards by worker, so that a worker's lookups touch
/// no lock another worker takes (unless there are more workers than shards).
pub struct HttpPool {
    shards: Box<[Shard]>,
    /// The newest generation seen: connections of older ones are let go.
    generation: AtomicU64,
}

/// Shards of a pool: one per worker, up to this many.
const SHARDS: usize = 64;

type Map<V> = HashMap<Local, V, foldhash::fast::RandomState>;

#[derive(Default)]
struct Shard {
    http1: Mutex<Map<Vec<Sender>>>,
    http2: Mutex<Map<Sender>>,
}

impl Default for HttpPool {
    fn default() -> Self {
        HttpPool {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            generation: AtomicU64::new(0),
        }
    }
}

impl HttpPool {
    fn shard(&self, local: &Local) -> &Shard {
        &self.shards[local.worker % SHARDS]
    }

    /// Lets go of the connections of generations before `key`'s, once a newer one shows up.
    fn retire(&self, key: &PoolKey) {
        let seen = self.generation.fetch_max(key.generation, Ordering::AcqRel);
        if key.generation > seen {
            for shard in self.shards.iter() {
                shard
                    .http1
                    .lock()
                    .retain(|k, _| k.key.generation >= key.generation);
                shard
                    .http2
                    .lock()
                    .retain(|k, _| k.key.generation >= key.generation);
            }
        }
    }

    /// A connection for `key` that can take a request now, if one is kept by this worker.
    pub fn checkout(&self, key: &PoolKey) -> Option<Sender> {
        self.retire(key);
        let local = Local::here(key);
        Self::take(self.shard(&local), &local)
    }

    /// The same from any worker's connections (a request waiting for a connection, when the
    /// destination may open no more, takes the first one free anywhere).
    pub fn checkout_any(&self, key: &PoolKey) -> Option<Sender> {
        self.shards.iter().find_map(|shard| {
            let workers: Vec<Local> = match key.version {
                Version::Http1 => shard
                    .http1
                    .lock()
                    .keys()
                    .filter(|l| l.key == *key)
                    .cloned()
                    .collect(),
                Version::Http2 => shard
                    .http2
                    .lock()
                    .keys()
                    .filter(|l| l.key == *key)
                    .cloned()
                    .collect(),
            };
            workers.iter().find_map(|local| Self::take(shard, local))
        })
    }

    fn take(shard: &Shard, local: &Local) -> Option<Sender> {
        let now = Instant::now();
        match local.key.version {
            Version::Http2 => {
                let mut map = shard.http2.lock();
                let kept = map.get_mut(local)?;
                if !kept.reusable(now) {
                    map.remove(local);
                    return None;
                }
                kept.idle_since = now;
                kept.share()
            }
            Version::Http1 => {
                let mut map = shard.http1.lock();
                let idle = map.get_mut(local)?;
                idle.retain(|s| s.reusable(now));
                // A sender whose response is still being read is not ready: leave it.
                let ready = idle.iter().position(Sender::is_ready)?;
                Some(idle.swap_remove(ready))
            }
        }
    }

    /// Keeps `sender` for the next request to `key` (an HTTP/1.1 one is reused once the
    /// response it is carrying has been read). `false`: it has carried as many requests as
    /// it may, and is let go (closed once its response is read).
    pub fn checkin(&self, key: &PoolKey, mut sender: Sender) -> bool {
        if sender.spent() {
            return false;
        }
        if sender.is_closed() || key.generation < self.generation.load(Ordering::Acquire) {
            return true;
        }
        sender.idle_since = Instant::now();
        let local = Local::here(key);
        let shard = self.shard(&local);
        match sender.conn {
            Conn::Http2(_) => {
                shard.http2.lock().entry(local).or_insert(sender);
            }
            Conn::Http1(_) => {
                let mut map = shard.http1.lock();
                let idle = map.entry(local).or_default();
                idle.retain(|s| !s.is_closed());
                if idle.len() < MAX_IDLE_PER_KEY {
                    idle.push(sender);
                }
            }
        }
        true
    }

    /// Connections kept, for `/status`: (HTTP/1.1 idle, HTTP/2 shared).
    pub fn kept(&self) -> (usize, usize) {
        let h1 = self
            .shards
            .iter()
            .map(|s| s.http1.lock().values().map(Vec::len).sum::<usize>())
            .sum();
        let h2 = self.shards.iter().map(|s| s.http2.lock().len()).sum();
        (h1, h2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty, Full};
    use hyper::service::service_fn;
    use std::convert::Infallible;

    async fn server(version: Version) -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (s, peer) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let svc = service_fn(move |_req: Request<Incoming>| async move {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(peer.to_string()))))
                    });
                    let io = TokioIo::new(s);
                    match version {
                        Version::Http1 => {
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(io, svc)
                                .await;
                        }
                        Version::Http2 => {
                            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                                .serve_connection(io, svc)
                                .await;
                        }
                    }
                });
            }
        });
        addr
    }

    /// The key of a direct connection to `addr`.
    fn direct(addr: SocketAddr, version: Version) -> PoolKey {
        PoolKey {
            endpoint: addr,
            via: "direct".into(),
            version,
            cluster: 0,
            generation: 1,
        }
    }

    async fn get(pool: &HttpPool, key: &PoolKey) -> String {
        let mut sender = match pool.checkout(key) {
            Some(s) => s,
            None => {
                let io = tokio::net::TcpStream::connect(key.endpoint).await.unwrap();
                Sender::handshake(io, key.version, Reuse::default(), ())
                    .await
                    .unwrap()
            }
        };
        let req = Request::builder()
            .uri(format!("http://{}/", key.endpoint))
            .body(Empty::new().map_err(|e| match e {}).boxed())
            .unwrap();
        let resp = sender.send(req).await.unwrap();
        pool.checkin(key, sender);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn connections_are_reused_per_key() {
        for version in [Version::Http1, Version::Http2] {
            let addr = server(version).await;
            let pool = HttpPool::default();
            let key = direct(addr, version);
            let first = get(&pool, &key).await;
            tokio::task::yield_now().await;
            let second = get(&pool, &key).await;
            assert_eq!(first, second, "{version:?}: same client connection");
            let other = PoolKey {
                via: "tls x".into(),
                ..key.clone()
            };
            assert_ne!(get(&pool, &other).await, first, "{version:?}: other key");
            let newer = PoolKey {
                generation: 2,
                ..key.clone()
            };
            assert_ne!(
                get(&pool, &newer).await,
                first,
                "{version:?}: after a change"
            );
            assert!(
                pool.checkout(&key).is_none(),
                "{version:?}: older ones let go"
            );
        }
    }

    #[tokio::test]
    async fn connections_are_let_go_after_their_requests_or_when_idle_too_long() {
        for version in [Version::Http1, Version::Http2] {
            let addr = server(version).await;
            let pool = HttpPool::default();
            let key = direct(addr, version);
            let send = |reuse: Reuse| async move {
                let io = tokio::net::TcpStream::connect(addr).await.unwrap();
                let mut s = Sender::handshake(io, version, reuse, ()).await.unwrap();
                send_one(&mut s, addr).await;
                s
            };
            let once = send(Reuse {
                max_requests: 1,
                idle_timeout: None,
            })
            .await;
            assert!(!pool.checkin(&key, once), "{version:?}: spent after one");
            assert!(pool.checkout(&key).is_none());
            let idle = send(Reuse {
                max_requests: 0,
                idle_timeout: Some(std::time::Duration::from_millis(50)),
            })
            .await;
            assert!(pool.checkin(&key, idle));
            tokio::task::yield_now().await;
            let again = pool.checkout(&key).expect("reused while fresh");
            pool.checkin(&key, again);
            tokio::time::sleep(std::time::Duration::from_millis(120)).await;
            assert!(
                pool.checkout(&key).is_none(),
                "{version:?}: idle too long, let go"
            );
        }
    }

    /// A connection of `version` to a test server, idle for 300 ms at most, and what tells
    /// when its task has let go of it.
    async fn idle_after_300ms(
        version: Version,
    ) -> (SocketAddr, Sender, tokio::sync::oneshot::Receiver<()>) {
        let addr = server(version).await;
        let io = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
        let reuse = Reuse {
            max_requests: 0,
            idle_timeout: Some(Duration::from_millis(300)),
        };
        let s = Sender::handshake(io, version, reuse, closed_tx)
            .await
            .unwrap();
        (addr, s, closed_rx)
    }

    async fn send_one(s: &mut Sender, addr: SocketAddr) {
        let req = Request::builder()
            .uri(format!("http://{addr}/"))
            .body(Empty::new().map_err(|e| match e {}).boxed())
            .unwrap();
        let resp = s.send(req).await.unwrap();
        resp.into_body().collect().await.unwrap();
    }

    #[tokio::test]
    async fn an_unused_connection_is_closed_without_another_request() {
        for version in [Version::Http1, Version::Http2] {
            let (addr, mut s, closed_rx) = idle_after_300ms(version).await;
            send_one(&mut s, addr).await;
            let pool = HttpPool::default();
            let key = direct(addr, version);
            assert!(pool.checkin(&key, s));
            let started = Instant::now();
            // The connection's task lets go of what holds it open once it is closed.
            let _ = tokio::time::timeout(Duration::from_secs(3), closed_rx).await;
            let took = started.elapsed();
            assert!(
                took >= Duration::from_millis(250) && took < Duration::from_secs(2),
                "{version:?}: closed after {took:?}"
            );
            assert!(
                pool.checkout(&key).is_none(),
                "{version:?}: closed, not reused"
            );
        }
    }

    #[tokio::test]
    async fn a_connection_in_use_outlives_its_idle_timeout() {
        for version in [Version::Http1, Version::Http2] {
            let (addr, mut s, mut closed_rx) = idle_after_300ms(version).await;
            // A request every 100 ms for three times the timeout: never idle that long.
            for _ in 0..9 {
                send_one(&mut s, addr).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                assert!(
                    closed_rx.try_recv().is_err(),
                    "{version:?}: closed while in use"
                );
            }
            assert!(!s.is_closed(), "{version:?}");
            // Then left alone, it is closed.
            let _ = tokio::time::timeout(Duration::from_secs(3), closed_rx).await;
            assert!(s.is_closed(), "{version:?}: closed once unused");
        }
    }

    #[tokio::test]
    async fn a_busy_http1_connection_is_not_handed_out() {
        // A response whose body ends only after a while keeps its connection busy.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let svc = service_fn(|_req: Request<Incoming>| async {
                let slow = futures::stream::once(async {
                    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                    Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::from_static(b"done")))
                });
                Ok::<_, Infallible>(Response::new(http_body_util::StreamBody::new(slow)))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(s), svc)
                .await;
        });
        let pool = HttpPool::default();
        let key = direct(addr, Version::Http1);
        let io = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut sender = Sender::handshake(io, Version::Http1, Reuse::default(), ())
            .await
            .unwrap();
        let req = Request::builder()
            .uri("/")
            .body(Empty::new().map_err(|e| match e {}).boxed())
            .unwrap();
        let resp = sender.send(req).await.unwrap();
        pool.checkin(&key, sender);
        assert!(pool.checkout(&key).is_none(), "the body is still coming");
        resp.into_body().collect().await.unwrap();
        tokio::task::yield_now().await;
        assert!(pool.checkout(&key).is_some());
    }
}
