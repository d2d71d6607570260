//! The client side of an HTTP/1 connection, read through the [`H1Guard`] and timed by
//! [`watch`], and [`Rewind`]: a stream whose first bytes were already read (to detect the
//! protocol) and are replayed.
//!
//! A client has [`HEAD_TIMEOUT`] to finish a request head once its first bytes have arrived (a
//! client that trickles a head, slowloris, holds a connection no longer), and a connection with
//! no byte either way for [`IDLE_TIMEOUT`] is closed (Envoy's HTTP connection manager's
//! `idle_timeout` default); an HTTP/2 client's connection ([`Moving`]) is told to go away
//! (`GOAWAY`) then, its open streams served to their end. Both are timed here rather than by hyper: hyper's header read timeout
//! runs from the end of one exchange to the next head, so it closed every keep-alive connection
//! left idle 30 s, and it armed a timer for every request. Here nothing is done per request: the
//! guard counts what moves and notes when a head arrives in pieces, and the watcher wakes only
//! for that and on a coarse tick.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context as TaskContext, Poll};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::debug;

use crate::l7::hygiene::{self, Feed, H1Guard, Violation};

/// An HTTP/1 client connection read through an [`H1Guard`]: a refused head reaches the server
/// as a request line it answers 400 to, and the violation is kept for the record.
pub struct Guarded<S: AsyncRead + AsyncWrite + Send + Unpin + 'static> {
    /// Taken on drop, to drain it (see `Drop`).
    inner: Option<Moving<S>>,
    guard: H1Guard,
    /// Bytes released by the guard, not yet read by the server.
    pending: Bytes,
    refusal: Arc<Mutex<Option<Violation>>>,
    /// The HTTP parser's own head limit.
    parser_limit: usize,
    /// What [`watch`] reads (the stream's [`Moving`] counts what moves).
    progress: Arc<Progress>,
    /// Whether the guard held part of a head after the last read.
    holding: bool,
}

/// How long a request head may take once its first bytes have arrived (hyper's default header
/// read timeout, which this replaces).
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// A client connection with no byte either way for this long is closed: Envoy's HTTP connection
/// manager's `idle_timeout` default, which Istio keeps.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// What a guarded connection tells its [`watch`]er. Written by the connection's reads and
/// writes only (one writer: plain loads and stores, no read-modify-write per call).
#[derive(Debug, Default)]
pub struct Progress {
    /// Reads and writes that moved bytes.
    moved: AtomicU64,
    /// Heads that arrived in pieces: counted as the guard starts holding one.
    pieces: AtomicU64,
    /// Whether the guard holds part of a head now.
    holding: AtomicBool,
    /// Woken as the guard starts holding part of a head.
    began: Notify,
}

impl Progress {
    fn moved(&self) {
        let n = self.moved.load(Ordering::Relaxed);
        self.moved.store(n.wrapping_add(1), Ordering::Relaxed);
    }

    fn holding(&self, holding: bool) {
        if holding {
            let n = self.pieces.load(Ordering::Relaxed);
            self.pieces.store(n.wrapping_add(1), Ordering::Relaxed);
        }
        self.holding.store(holding, Ordering::Release);
        if holding {
            self.began.notify_one();
        }
    }

    fn seen(&self) -> Seen {
        Seen {
            moved: self.moved.load(Ordering::Relaxed),
            holding: self
                .holding
                .load(Ordering::Acquire)
                .then(|| self.pieces.load(Ordering::Relaxed)),
        }
    }
}

/// A connection's [`Progress`] as a watcher reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    moved: u64,
    /// The number of the head held in part, if one is.
    holding: Option<u64>,
}

/// Why a watched connection is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    HeadTimeout,
    Idle,
}

impl std::fmt::Display for Cut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cut::HeadTimeout => write!(
                f,
                "request head not complete within {}s of its first bytes",
                HEAD_TIMEOUT.as_secs()
            ),
            Cut::Idle => write!(f, "idle for {}s", IDLE_TIMEOUT.as_secs()),
        }
    }
}

/// The watcher's decisions, apart from its timers. Pure: fed what it reads and the time.
#[derive(Debug)]
struct Clock {
    /// What was read last, and since when the bytes moved count has not changed.
    seen: Seen,
    still_since: Instant,
    /// The head held in part, and when it was first seen held.
    head: Option<(u64, Instant)>,
}

impl Clock {
    fn new(now: Instant) -> Clock {
        Clock {
            seen: Seen {
                moved: 0,
                holding: None,
            },
            still_since: now,
            head: None,
        }
    }

    /// Looks at the connection at `now`: a cut, or when to look again.
    fn look(&mut self, now: Instant, seen: Seen) -> Result<Instant, Cut> {
        if seen.moved != self.seen.moved {
            self.still_since = now;
        }
        self.seen = seen;
        self.head = match (seen.holding, self.head) {
            (Some(n), Some((m, since))) if n == m => Some((m, since)),
            (Some(n), _) => Some((n, now)),
            (None, _) => None,
        };
        if let Some((_, since)) = self.head {
            let due = since + HEAD_TIMEOUT;
            return if now >= due {
                Err(Cut::HeadTimeout)
            } else {
                Ok(due)
            };
        }
        let due = self.still_since + IDLE_TIMEOUT;
        if now >= due {
            return Err(Cut::Idle);
        }
        // Activity is read on a coarse tick, never per exchange: closed within a quarter of
        // the timeout after it is due.
        Ok(due.min(now + IDLE_TIMEOUT / 4))
    }
}

/// Ends, with the reason, when the guarded connection of `progress` must be closed: a head
/// begun [`HEAD_TIMEOUT`] ago and not complete, or no byte either way for [`IDLE_TIMEOUT`].
/// Wakes when a head starts to arrive in pieces and on its own deadlines, nothing else: polled
/// beside the connection through [`crate::relay::Woken`], it costs the exchanges nothing.
pub async fn watch(progress: &Progress) -> String {
    let mut clock = Clock::new(Instant::now());
    loop {
        let next = match clock.look(Instant::now(), progress.seen()) {
            Ok(next) => next,
            Err(cut) => return cut.to_string(),
        };
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            () = progress.began.notified() => {}
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Send + Unpin + 'static> Guarded<S> {
    pub fn new(inner: S, max_head: usize, refusal: Arc<Mutex<Option<Violation>>>) -> Guarded<S> {
        let inner = Moving::new(inner);
        Guarded {
            progress: inner.progress(),
            inner: Some(inner),
            guard: H1Guard::new(max_head),
            pending: Bytes::new(),
            refusal,
            parser_limit: parser_limit(max_head),
            holding: false,
        }
    }

    /// What [`watch`] reads of it.
    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }

    fn note_holding(&mut self) {
        let holding = self.guard.holding_head();
        if holding != self.holding {
            self.holding = holding;
            self.progress.holding(holding);
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Send + Unpin + 'static> AsyncRead for Guarded<S> {
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
            // Read straight into the parser's buffer: what the guard lets pass as it is (whole
            // heads, bodies) stays there, uncopied.
            let before = buf.filled().len();
            let stream = this.inner.as_mut().expect("present until dropped");
            ready!(Pin::new(stream).poll_read(cx, buf))?;
            let read = &buf.filled()[before..];
            if read.is_empty() {
                return Poll::Ready(Ok(()));
            }
            if this.guard.pass(read) {
                // Nothing was held (or it would not pass), and nothing is now.
                return Poll::Ready(Ok(()));
            }
            // A head cut short, a refusal, or what follows a held head: take the read back and
            // hand the parser what the guard releases instead.
            let read = read.to_vec();
            buf.set_filled(before);
            match this.guard.feed(&read) {
                Feed::Release(bytes) => this.pending = Bytes::from(bytes),
                Feed::Refuse(v) => {
                    debug!(violation = %v, "refusing an HTTP/1 request");
                    this.pending = Bytes::from(hygiene::poison(&v, this.parser_limit));
                    *this.refusal.lock() = Some(v);
                }
            }
            this.note_holding();
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Send + Unpin + 'static> Guarded<S> {
    fn stream(&mut self) -> &mut Moving<S> {
        self.inner.as_mut().expect("present until dropped")
    }
}

/// hyper's read buffer limit for a head limit (hyper needs at least 8 KiB).
pub fn parser_limit(max_head: usize) -> usize {
    max_head.max(8192)
}

/// How long the rest of a refused client's bytes are drained before the socket is closed.
pub const LINGER: Duration = Duration::from_secs(2);

impl<S: AsyncRead + AsyncWrite + Send + Unpin + 'static> Drop for Guarded<S> {
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

impl<S: AsyncRead + AsyncWrite + Send + Unpin + 'static> AsyncWrite for Guarded<S> {
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

/// A client connection's stream, counting what moves for [`watch`]: under the HTTP/1.1 guard,
/// and on its own for an HTTP/2 client (with no guard to note heads, closed only for idleness).
pub struct Moving<S> {
    inner: S,
    progress: Arc<Progress>,
}

impl<S> Moving<S> {
    pub fn new(inner: S) -> Moving<S> {
        Moving {
            inner,
            progress: Arc::default(),
        }
    }

    /// What [`watch`] reads of it.
    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Moving<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.progress.moved();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Moving<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.progress.moved();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.progress.moved();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A stream whose first bytes were read already: they are read again first.
pub struct Rewind<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(prefix: Bytes, inner: S) -> Rewind<S> {
        Rewind { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let part = self.prefix.split_to(n);
            buf.put_slice(&part);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(moved: u64, holding: Option<u64>) -> Seen {
        Seen { moved, holding }
    }

    #[test]
    fn a_head_held_in_part_is_cut_at_its_timeout_and_a_new_one_starts_again() {
        let t0 = Instant::now();
        let mut clock = Clock::new(t0);
        assert_eq!(clock.look(t0, seen(1, Some(1))), Ok(t0 + HEAD_TIMEOUT));
        // More bytes of the same head: its time still runs from its first bytes.
        let t1 = t0 + Duration::from_secs(20);
        assert_eq!(clock.look(t1, seen(2, Some(1))), Ok(t0 + HEAD_TIMEOUT));
        assert_eq!(
            clock.look(t0 + HEAD_TIMEOUT, seen(2, Some(1))),
            Err(Cut::HeadTimeout)
        );

        let mut clock = Clock::new(t0);
        clock.look(t0, seen(1, Some(1))).unwrap();
        // That head completed and another began in pieces: its own time.
        let t2 = t0 + Duration::from_secs(25);
        assert_eq!(clock.look(t2, seen(3, Some(2))), Ok(t2 + HEAD_TIMEOUT));
        assert_eq!(
            clock.look(t0 + HEAD_TIMEOUT, seen(3, Some(2))),
            Ok(t2 + HEAD_TIMEOUT)
        );
    }

    #[test]
    fn a_connection_is_idle_once_nothing_moved_for_the_idle_timeout() {
        let t0 = Instant::now();
        let mut clock = Clock::new(t0);
        // Looked at on a coarse tick, not at the deadline only.
        assert_eq!(clock.look(t0, seen(0, None)), Ok(t0 + IDLE_TIMEOUT / 4));
        let t1 = t0 + IDLE_TIMEOUT / 2;
        assert_eq!(clock.look(t1, seen(0, None)), Ok(t1 + IDLE_TIMEOUT / 4));
        let t2 = t0 + IDLE_TIMEOUT * 7 / 8;
        assert_eq!(clock.look(t2, seen(0, None)), Ok(t0 + IDLE_TIMEOUT));
        assert_eq!(clock.look(t0 + IDLE_TIMEOUT, seen(0, None)), Err(Cut::Idle));

        // Bytes moved in between: idle from when that was seen.
        let mut clock = Clock::new(t0);
        clock.look(t0, seen(0, None)).unwrap();
        let t3 = t0 + IDLE_TIMEOUT / 4;
        assert_eq!(clock.look(t3, seen(5, None)), Ok(t3 + IDLE_TIMEOUT / 4));
        assert_eq!(
            clock.look(t0 + IDLE_TIMEOUT, seen(5, None)),
            Ok(t3 + IDLE_TIMEOUT)
        );
        assert_eq!(clock.look(t3 + IDLE_TIMEOUT, seen(5, None)), Err(Cut::Idle));
    }

    #[test]
    fn a_head_completed_in_pieces_leaves_the_connection_to_its_idle_timeout() {
        let t0 = Instant::now();
        let mut clock = Clock::new(t0);
        clock.look(t0, seen(1, Some(1))).unwrap();
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(clock.look(t1, seen(2, None)), Ok(t1 + IDLE_TIMEOUT / 4));
    }

    #[test]
    fn the_progress_counts_heads_held_in_part() {
        let p = Progress::default();
        assert_eq!(p.seen(), seen(0, None));
        p.moved();
        p.holding(true);
        assert_eq!(p.seen(), seen(1, Some(1)));
        p.holding(false);
        p.holding(true);
        assert_eq!(p.seen(), seen(1, Some(2)));
    }
}
