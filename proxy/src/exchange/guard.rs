//! The client side of an HTTP/1 connection, read through the [`H1Guard`], and [`Rewind`]: a
//! stream whose first bytes were already read (to detect the protocol) and are replayed.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context as TaskContext, Poll};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::debug;

use crate::l7::hygiene::{self, Feed, H1Guard, Violation};

/// An HTTP/1 client connection read through an [`H1Guard`]: a refused head reaches the server
/// as a request line it answers 400 to, and the violation is kept for the record.
pub struct Guarded<S: AsyncRead + AsyncWrite + Send + Unpin + 'static> {
    /// Taken on drop, to drain it (see `Drop`).
    inner: Option<S>,
    guard: H1Guard,
    /// Bytes released by the guard, not yet read by the server.
    pending: Bytes,
    refusal: Arc<Mutex<Option<Violation>>>,
    /// The HTTP parser's own head limit.
    parser_limit: usize,
}

impl<S: AsyncRead + AsyncWrite + Send + Unpin + 'static> Guarded<S> {
    pub fn new(inner: S, max_head: usize, refusal: Arc<Mutex<Option<Violation>>>) -> Guarded<S> {
        Guarded {
            inner: Some(inner),
            guard: H1Guard::new(max_head),
            pending: Bytes::new(),
            refusal,
            parser_limit: parser_limit(max_head),
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
            if read.is_empty() || this.guard.pass(read) {
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
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Send + Unpin + 'static> Guarded<S> {
    fn stream(&mut self) -> &mut S {
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
