//! HTTP client connections to upstream endpoints, reused.
//!
//! A connection is opened by the caller (over TCP, an HBONE tunnel or TLS: the pool does not
//! care) and handed to [`Sender::handshake`]; after a request, [`HttpPool::checkin`] keeps it
//! for the next request to the same [`PoolKey`]. HTTP/1.1 connections carry one request at a
//! time, so a checked-in sender is reused only once its previous response has been read;
//! HTTP/2 connections are shared by every request to the key; their requests are sent on
//! `h2` from each request's own task ([`super::http2`]).
//!
//! Each data-path worker ([`crate::worker`]) keeps connections of its own, as Envoy's workers
//! do: a request and its upstream connection are served by the same thread.
//!
//! A connection with no request sent and no byte moved for its idle timeout (DestinationRule
//! `connectionPool.http.idleTimeout`, Istio's default 1 h) is closed by its own task, whether
//! or not another request comes: nothing is kept open for an endpoint nobody calls any more.
//! The pool itself reads no clock: a request hands it its own readings (as it is sent, as its
//! answer came), and a connection kept longer than its idle timeout by them is not handed out.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use super::http2::{self, Failed};
use crate::batch;
use crate::relay::Woken;

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
    Http2(h2::client::SendRequest<Bytes>),
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
/// read, on the data path; [`unused_for`] looks at it on a coarse tick. And whether its task
/// has ended.
#[derive(Debug, Default)]
struct Activity {
    count: AtomicU64,
    ended: AtomicBool,
}

impl Activity {
    fn touch(&self) {
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// Why an upstream request failed.
#[derive(Debug)]
pub enum Error {
    Http1(hyper::Error),
    Http2(Failed),
}

impl Error {
    /// The connection ended before the request was processed: it was closed, or could take
    /// no new stream.
    pub fn is_closed(&self) -> bool {
        match self {
            Error::Http1(e) => e.is_closed() || e.is_incomplete_message() || e.is_canceled(),
            Error::Http2(Failed::Unsent(_)) => true,
            Error::Http2(Failed::Sent(_)) => false,
        }
    }

    /// The server refused the stream (HTTP/2 `REFUSED_STREAM`): the request was never
    /// processed.
    pub fn is_refused(&self) -> bool {
        let reason = match self {
            Error::Http1(e) => http2::reason_of(e),
            Error::Http2(Failed::Sent(e) | Failed::Unsent(e)) => e.reason(),
        };
        reason == Some(h2::Reason::REFUSED_STREAM)
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Http1(e) => e.fmt(f),
            Error::Http2(Failed::Unsent(e)) => {
                write!(f, "connection could not take the request: {e}")
            }
            Error::Http2(Failed::Sent(e)) => e.fmt(f),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Http1(e) => Some(e),
            Error::Http2(Failed::Sent(e) | Failed::Unsent(e)) => Some(e),
        }
    }
}

/// An upstream response's body.
#[derive(Debug)]
pub struct Received(Inner);

#[derive(Debug)]
enum Inner {
    Http1(Incoming),
    Http2(http2::RecvBody),
    /// Taken by [`upgrade`].
    Taken,
}

impl http_body::Body for Received {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Error>>> {
        use std::task::Poll;
        match &mut self.0 {
            Inner::Http1(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|f| f.map_err(Error::Http1))),
            Inner::Http2(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|f| f.map_err(|e| Error::Http2(Failed::Sent(e))))),
            Inner::Taken => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Inner::Http1(b) => b.is_end_stream(),
            Inner::Http2(b) => b.is_end_stream(),
            Inner::Taken => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Inner::Http1(b) => b.size_hint(),
            Inner::Http2(b) => b.size_hint(),
            Inner::Taken => SizeHint::with_exact(0),
        }
    }
}

/// What an exchange that left HTTP (a `101 Switching Protocols`, an answered `CONNECT`) goes
/// on over.
pub enum Upgrade {
    /// The HTTP/1.1 connection itself, once hyper hands it over.
    Http1(hyper::upgrade::OnUpgrade),
    /// The `CONNECT` stream's two halves.
    Http2(h2::SendStream<Bytes>, h2::RecvStream),
    /// Nothing to go on over: not an upgrade hyper or h2 can carry.
    None,
}

/// Takes what `resp` goes on over once it leaves HTTP; its body is left empty.
pub fn upgrade(resp: &mut Response<Received>) -> Upgrade {
    if matches!(resp.body().0, Inner::Http1(_)) {
        return Upgrade::Http1(hyper::upgrade::on(resp));
    }
    match std::mem::replace(&mut resp.body_mut().0, Inner::Taken) {
        Inner::Http2(b) => match b.into_connect() {
            Some((send, recv)) => Upgrade::Http2(send, recv),
            None => Upgrade::None,
        },
        _ => Upgrade::None,
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
    ) -> Result<Sender, Error>
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
                let (send, conn) = http1::Builder::new()
                    .handshake(TokioIo::new(io))
                    .await
                    .map_err(Error::Http1)?;
                let activity = activity.clone();
                tokio::spawn(async move {
                    // Polled only when its tick fires, not at every turn of the connection.
                    let unused = std::pin::pin!(unused_for(&activity, idle));
                    let unused = Woken::new(unused);
                    tokio::select! {
                        r = conn.with_upgrades() => if let Err(e) = r {
                            debug!(error = %e, "upstream HTTP/1.1 connection ended");
                        },
                        () = unused => {
                            debug!(?idle, "upstream HTTP/1.1 connection idle: closed");
                        }
                    }
                    activity.ended.store(true, Ordering::Release);
                    drop(hold);
                });
                Conn::Http1(send)
            }
            Version::Http2 => {
                // The requests of all the streams one turn of the connection sends, in one write.
                let (io, flusher) = batch::batched(io);
                let (send, conn) = http2::builder()
                    .handshake::<_, Bytes>(io)
                    .await
                    .map_err(|e| Error::Http2(Failed::Unsent(e)))?;
                let conn = flusher.around(conn);
                // h2 closes the connection itself once no handle and no stream is left.
                let activity = activity.clone();
                tokio::spawn(async move {
                    let unused = std::pin::pin!(unused_for(&activity, idle));
                    let unused = Woken::new(unused);
                    tokio::select! {
                        r = conn => if let Err(e) = r {
                            debug!(error = %e, "upstream HTTP/2 connection ended");
                        },
                        () = unused => {
                            debug!(?idle, "upstream HTTP/2 connection idle: closed");
                        }
                    }
                    activity.ended.store(true, Ordering::Release);
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
    pub async fn send(&mut self, req: Request<Body>) -> Result<Response<Received>, Error> {
        self.shared.used.fetch_add(1, Ordering::Relaxed);
        self.shared.activity.touch();
        match &mut self.conn {
            Conn::Http1(s) => {
                s.ready().await.map_err(Error::Http1)?;
                let resp = s.send_request(req).await.map_err(Error::Http1)?;
                Ok(resp.map(|b| Received(Inner::Http1(b))))
            }
            Conn::Http2(s) => {
                let resp = http2::send(s, req).await.map_err(Error::Http2)?;
                Ok(resp.map(|b| Received(Inner::Http2(b))))
            }
        }
    }

    fn is_closed(&self) -> bool {
        match &self.conn {
            Conn::Http1(s) => s.is_closed(),
            Conn::Http2(_) => self.shared.activity.ended.load(Ordering::Acquire),
        }
    }

    fn is_ready(&self) -> bool {
        match &self.conn {
            Conn::Http1(s) => s.is_ready(),
            Conn::Http2(_) => !self.is_closed(),
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

    /// A connection for `key` that can take a request `now` (the caller's clock reading, as
    /// it sends), if one is kept by this worker.
    pub fn checkout(&self, key: &PoolKey, now: Instant) -> Option<Sender> {
        self.retire(key);
        let local = Local::here(key);
        Self::take(self.shard(&local), &local, now)
    }

    /// The same from any worker's connections (a request waiting for a connection, when the
    /// destination may open no more, takes the first one free anywhere).
    pub fn checkout_any(&self, key: &PoolKey, now: Instant) -> Option<Sender> {
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
            workers
                .iter()
                .find_map(|local| Self::take(shard, local, now))
        })
    }

    fn take(shard: &Shard, local: &Local, now: Instant) -> Option<Sender> {
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
                // A sender whose response is still being read is not ready: leave it. Only the
                // one handed out is looked at further: one that may not be used again is let
                // go, and the next looked for (the rest are let go at a check-in once closed,
                // or by their own task once idle too long).
                loop {
                    let ready = idle.iter().position(Sender::is_ready)?;
                    let sender = idle.swap_remove(ready);
                    if sender.reusable(now) {
                        return Some(sender);
                    }
                }
            }
        }
    }

    /// Keeps `sender` for the next request to `key` (an HTTP/1.1 one is reused once the
    /// response it is carrying has been read), idle from `now` (the caller's clock reading, as
    /// the response came). `false`: it has carried as many requests as it may, and is let go
    /// (closed once its response is read).
    pub fn checkin(&self, key: &PoolKey, mut sender: Sender, now: Instant) -> bool {
        if sender.spent() {
            return false;
        }
        if sender.is_closed() || key.generation < self.generation.load(Ordering::Acquire) {
            return true;
        }
        sender.idle_since = now;
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
    use hyper_util::rt::TokioExecutor;
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
        let mut sender = match pool.checkout(key, Instant::now()) {
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
        pool.checkin(key, sender, Instant::now());
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
                pool.checkout(&key, Instant::now()).is_none(),
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
            assert!(
                !pool.checkin(&key, once, Instant::now()),
                "{version:?}: spent after one"
            );
            assert!(pool.checkout(&key, Instant::now()).is_none());
            let idle = send(Reuse {
                max_requests: 0,
                idle_timeout: Some(std::time::Duration::from_millis(50)),
            })
            .await;
            assert!(pool.checkin(&key, idle, Instant::now()));
            tokio::task::yield_now().await;
            let again = pool
                .checkout(&key, Instant::now())
                .expect("reused while fresh");
            pool.checkin(&key, again, Instant::now());
            tokio::time::sleep(std::time::Duration::from_millis(120)).await;
            assert!(
                pool.checkout(&key, Instant::now()).is_none(),
                "{version:?}: idle too long, let go"
            );
        }
    }

    #[tokio::test]
    async fn a_connection_kept_too_long_is_passed_over_for_a_fresher_one() {
        let version = Version::Http1;
        let addr = server(version).await;
        let pool = HttpPool::default();
        let key = direct(addr, version);
        let reuse = Reuse {
            max_requests: 0,
            idle_timeout: Some(std::time::Duration::from_secs(10)),
        };
        let used = || async move {
            let io = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut s = Sender::handshake(io, version, reuse, ()).await.unwrap();
            send_one(&mut s, addr).await;
            s
        };
        let (old, fresh) = (used().await, used().await);
        tokio::task::yield_now().await;
        // The clock is the callers' reading: 12 s on, one has been kept 12 s, the other 4 s.
        let t0 = Instant::now();
        let secs = std::time::Duration::from_secs;
        assert!(pool.checkin(&key, old, t0));
        assert!(pool.checkin(&key, fresh, t0 + secs(8)));
        let s = pool.checkout(&key, t0 + secs(12)).expect("the fresher one");
        assert_eq!(s.idle_since, t0 + secs(8), "the one kept 4 s");
        assert_eq!(pool.kept().0, 0, "the one kept 12 s is let go");
        assert!(pool.checkin(&key, s, t0 + secs(12)));
        assert!(
            pool.checkout(&key, t0 + secs(21)).is_some(),
            "9 s: still fresh"
        );
        assert!(pool.checkin(&key, used().await, t0 + secs(21)));
        assert!(
            pool.checkout(&key, t0 + secs(32)).is_none(),
            "11 s: too long"
        );
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
            assert!(pool.checkin(&key, s, Instant::now()));
            let started = Instant::now();
            // The connection's task lets go of what holds it open once it is closed.
            let _ = tokio::time::timeout(Duration::from_secs(3), closed_rx).await;
            let took = started.elapsed();
            assert!(
                took >= Duration::from_millis(250) && took < Duration::from_secs(2),
                "{version:?}: closed after {took:?}"
            );
            assert!(
                pool.checkout(&key, Instant::now()).is_none(),
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
        pool.checkin(&key, sender, Instant::now());
        assert!(
            pool.checkout(&key, Instant::now()).is_none(),
            "the body is still coming"
        );
        resp.into_body().collect().await.unwrap();
        tokio::task::yield_now().await;
        assert!(pool.checkout(&key, Instant::now()).is_some());
    }

    async fn h2_sender(addr: SocketAddr, hold: impl Send + 'static) -> Sender {
        let io = tokio::net::TcpStream::connect(addr).await.unwrap();
        Sender::handshake(io, Version::Http2, Reuse::default(), hold)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn an_http2_request_body_and_trailers_reach_the_server_as_they_come() {
        // The server answers with the body it read and the trailer it got.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let svc = service_fn(|req: Request<Incoming>| async {
                let whole = req.into_body().collect().await.unwrap();
                let trailer = whole
                    .trailers()
                    .and_then(|t| t.get("x-sum"))
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_default();
                let body = format!("{}|{trailer}", String::from_utf8_lossy(&whole.to_bytes()));
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(s), svc)
                .await;
        });
        let mut sender = h2_sender(addr, ()).await;
        // A body that is not there yet when the head goes: sent by a task of its own.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, hyper::Error>>(4);
        let body = http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let req = Request::builder()
            .method("POST")
            .uri(format!("http://{addr}/"))
            .body(body.boxed())
            .unwrap();
        let feed = tokio::spawn(async move {
            for part in ["one ", "two ", "three"] {
                tokio::time::sleep(Duration::from_millis(20)).await;
                tx.send(Ok(Frame::data(Bytes::from(part)))).await.unwrap();
            }
            let mut t = http::HeaderMap::new();
            t.insert("x-sum", http::HeaderValue::from_static("3"));
            tx.send(Ok(Frame::trailers(t))).await.unwrap();
        });
        let resp = sender.send(req).await.unwrap();
        let got = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(got, "one two three|3");
        feed.await.unwrap();

        // A body already whole goes without a task, with its length.
        let req = Request::builder()
            .method("POST")
            .uri(format!("http://{addr}/"))
            .body(
                Full::new(Bytes::from("all at once"))
                    .map_err(|e| match e {})
                    .boxed(),
            )
            .unwrap();
        let got = sender.send(req).await.unwrap().into_body().collect().await;
        assert_eq!(got.unwrap().to_bytes(), "all at once|");
    }

    #[tokio::test]
    async fn a_refused_http2_stream_is_told_from_other_failures() {
        // A server that refuses its first stream and resets its second with an error.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut conn = h2::server::handshake(s).await.unwrap();
            for reason in [h2::Reason::REFUSED_STREAM, h2::Reason::INTERNAL_ERROR] {
                let Some(Ok((_req, mut respond))) = conn.accept().await else {
                    return;
                };
                respond.send_reset(reason);
            }
            std::future::poll_fn(|cx| conn.poll_closed(cx)).await.ok();
        });
        let mut sender = h2_sender(addr, ()).await;
        let get = || {
            Request::builder()
                .uri(format!("http://{addr}/"))
                .body(Empty::new().map_err(|e| match e {}).boxed())
                .unwrap()
        };
        let refused = sender.send(get()).await.unwrap_err();
        assert!(refused.is_refused(), "{refused}");
        assert!(!refused.is_closed(), "{refused}: it was sent");
        let reset = sender.send(get()).await.unwrap_err();
        assert!(!reset.is_refused(), "{reset}");
        assert!(!reset.is_closed(), "{reset}");
    }

    #[tokio::test]
    async fn an_answered_http2_connect_goes_on_as_bytes() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut conn = h2::server::handshake(s).await.unwrap();
            let (req, mut respond) = conn.accept().await.unwrap().unwrap();
            assert_eq!(req.method(), http::Method::CONNECT);
            tokio::spawn(async move {
                let (_, mut recv) = req.into_parts();
                let mut send = respond.send_response(Response::new(()), false).unwrap();
                // Echoes what comes, upper-cased.
                while let Some(Ok(data)) = recv.data().await {
                    let _ = recv.flow_control().release_capacity(data.len());
                    send.send_data(Bytes::from(data.to_ascii_uppercase()), false)
                        .unwrap();
                }
                let _ = send.send_data(Bytes::new(), true);
            });
            std::future::poll_fn(|cx| conn.poll_closed(cx)).await.ok();
        });
        let mut sender = h2_sender(addr, ()).await;
        let req = Request::builder()
            .method("CONNECT")
            .uri("10.0.0.1:443")
            .body(Empty::new().map_err(|e| match e {}).boxed())
            .unwrap();
        let mut resp = sender.send(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let Upgrade::Http2(mut send, mut recv) = upgrade(&mut resp) else {
            panic!("an HTTP/2 CONNECT goes on over its stream");
        };
        send.send_data(Bytes::from_static(b"ping"), false).unwrap();
        let echoed = recv.data().await.unwrap().unwrap();
        assert_eq!(echoed, "PING");
    }

    #[tokio::test]
    async fn an_http2_connection_nobody_holds_any_more_is_closed() {
        // No idle timeout: only its last handle's drop ends it.
        let addr = server(Version::Http2).await;
        let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
        let mut s = h2_sender(addr, closed_tx).await;
        send_one(&mut s, addr).await;
        let shared = s.share().unwrap();
        drop(s);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!shared.is_closed(), "another handle still holds it");
        drop(shared);
        tokio::time::timeout(Duration::from_secs(2), closed_rx)
            .await
            .expect("closed once nobody holds it")
            .unwrap_err();
    }
}
