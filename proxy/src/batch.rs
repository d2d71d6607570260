//! An HTTP/2 connection's writes of one turn of its task, written together.
//!
//! h2 copies a DATA frame's payload into its write buffer only when it is shorter than 256
//! bytes; a longer payload is chained after the buffer, and h2 writes the buffer and that
//! payload out (a `writev` and a flush) before it takes the next frame. A connection answering
//! eight streams with 1 KiB bodies thus makes eight system calls where one would do, and on a
//! node every write runs the whole TCP transmit path (on loopback and veth, the receive path
//! too).
//!
//! [`batched`] puts an I/O object behind a buffer for the connection's engine: while the
//! engine's future is polled through [`Flusher::around`], a flush it asks for is held, what it
//! writes is gathered (a small write copied, a large one written at once behind what is
//! held), and when the poll returns, everything is written out in one call. Outside such a
//! poll (a handshake awaited on its own) and for shutting down, a flush is a flush. The
//! engine sees a socket that takes its writes; back-pressure stays real: once the buffer holds
//! [`HELD`] bytes, a write waits until the socket takes them.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes held before a write waits for the socket.
pub const HELD: usize = 64 * 1024;
/// Writes this long or longer are not copied: they go out at once, behind what is held.
const DIRECT: usize = 8 * 1024;
/// The buffer's capacity when a turn's first write is copied. It is let go once everything
/// held is written, so an idle connection holds none: a turn pays one allocation, not the
/// growth from a few bytes.
const START: usize = 16 * 1024;

/// `io` behind a buffer, and the handle that writes the buffer out after each poll of the
/// connection's engine.
pub fn batched<S>(io: S) -> (Batched<S>, Flusher<S>) {
    let shared = Arc::new(Mutex::new(Held {
        io,
        buf: Vec::new(),
        sent: 0,
        holding: false,
        flush_wanted: false,
        failed: None,
    }));
    (
        Batched {
            shared: shared.clone(),
        },
        Flusher { shared },
    )
}

/// The I/O object the connection's engine is handed.
pub struct Batched<S> {
    shared: Arc<Mutex<Held<S>>>,
}

/// Writes out what the engine's writes left held: see [`Flusher::around`].
pub struct Flusher<S> {
    shared: Arc<Mutex<Held<S>>>,
}

struct Held<S> {
    io: S,
    /// Bytes written by the engine, not yet by the socket; `buf[sent..]` is left.
    buf: Vec<u8>,
    sent: usize,
    /// Inside a poll through [`Flusher::around`]: flushes are held until it returns.
    holding: bool,
    /// The engine asked for a flush the socket has not had yet.
    flush_wanted: bool,
    /// A write out of the buffer failed after the engine was told it went: its next write
    /// or flush fails with it.
    failed: Option<io::ErrorKind>,
}

impl<S: AsyncWrite + Unpin> Held<S> {
    fn held(&self) -> usize {
        self.buf.len() - self.sent
    }

    /// Writes out what is held; `Ready(Ok)` once all of it is gone.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.buf.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.buf[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.buf = Vec::new();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Writes out what is held, then flushes the socket if the engine asked.
    fn poll_flush_all(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_send(cx))?;
        if self.flush_wanted {
            ready!(Pin::new(&mut self.io).poll_flush(cx))?;
            self.flush_wanted = false;
        }
        Poll::Ready(Ok(()))
    }

    /// Takes `bufs` (`len` bytes in all): copied when short and there is room, else written
    /// at once behind what is held.
    fn poll_take(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
        len: usize,
    ) -> Poll<io::Result<usize>> {
        if let Some(kind) = self.failed {
            return Poll::Ready(Err(kind.into()));
        }
        if len < DIRECT {
            if self.held() + len > HELD {
                // Full: what is held goes first; the write waits for room.
                ready!(self.poll_send(cx))?;
            }
            if self.buf.capacity() == 0 {
                self.buf.reserve(START);
            }
            for b in bufs {
                self.buf.extend_from_slice(b);
            }
            return Poll::Ready(Ok(len));
        }
        // Large: written now, in one call with what is held before it.
        loop {
            let held = self.held();
            if held == 0 {
                return Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
            }
            let mut all = Vec::with_capacity(bufs.len() + 1);
            all.push(io::IoSlice::new(&self.buf[self.sent..]));
            all.extend(bufs.iter().map(|b| io::IoSlice::new(b)));
            let n = ready!(Pin::new(&mut self.io).poll_write_vectored(cx, &all))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            if n < held {
                self.sent += n;
                continue;
            }
            self.buf = Vec::new();
            self.sent = 0;
            if n > held {
                return Poll::Ready(Ok(n - held));
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> Flusher<S> {
    /// Polls `engine` with flushes held, then writes out what it wrote. Its output once it has
    /// ended and what it wrote is out (or could not be); while what is held cannot all be
    /// written, the socket wakes the task.
    pub fn around<F: std::future::Future>(self, engine: F) -> Flushing<S, F> {
        Flushing {
            shared: self.shared,
            engine,
            ended: None,
        }
    }
}

pin_project_lite::pin_project! {
    /// The engine's future, its writes written out after each poll: [`Flusher::around`].
    pub struct Flushing<S, F: std::future::Future> {
        shared: Arc<Mutex<Held<S>>>,
        #[pin]
        engine: F,
        ended: Option<F::Output>,
    }
}

impl<S, F: std::future::Future> Flushing<S, F> {
    /// The engine itself (to ask it to shut down gracefully, say).
    pub fn engine(self: Pin<&mut Self>) -> Pin<&mut F> {
        self.project().engine
    }
}

impl<S: AsyncWrite + Unpin, F: std::future::Future> std::future::Future for Flushing<S, F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        if this.ended.is_none() {
            this.shared.lock().holding = true;
            let out = this.engine.poll(cx);
            this.shared.lock().holding = false;
            if let Poll::Ready(out) = out {
                *this.ended = Some(out);
            }
        }
        let mut held = this.shared.lock();
        if held.failed.is_none() {
            match held.poll_flush_all(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Pending if this.ended.is_some() => return Poll::Pending,
                Poll::Pending => {}
                Poll::Ready(Err(e)) => {
                    // The engine meets the error at its next write or flush (it flushes at the
                    // end of every turn): it is polled again to meet it.
                    held.failed = Some(e.kind());
                    held.buf = Vec::new();
                    held.sent = 0;
                    cx.waker().wake_by_ref();
                }
            }
        }
        match this.ended.take() {
            Some(out) => Poll::Ready(out),
            None => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Batched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.shared.lock().io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Batched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.shared
            .lock()
            .poll_take(cx, &[io::IoSlice::new(buf)], buf.len())
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let len = bufs.iter().map(|b| b.len()).sum();
        self.shared.lock().poll_take(cx, bufs, len)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut held = self.shared.lock();
        if let Some(kind) = held.failed {
            return Poll::Ready(Err(kind.into()));
        }
        held.flush_wanted = true;
        if held.holding {
            return Poll::Ready(Ok(()));
        }
        held.poll_flush_all(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut held = self.shared.lock();
        ready!(held.poll_send(cx))?;
        Pin::new(&mut held.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;

    /// A socket that records each write call, taking at most `room` bytes before it is
    /// pending (and woken by `make_room`).
    #[derive(Default)]
    struct Recorder {
        writes: Vec<Vec<u8>>,
        flushes: usize,
        room: Option<usize>,
        waker: Option<std::task::Waker>,
    }

    #[derive(Clone, Default)]
    struct Socket(Arc<Mutex<Recorder>>);

    impl Socket {
        fn writes(&self) -> Vec<Vec<u8>> {
            self.0.lock().writes.clone()
        }
        fn written(&self) -> Vec<u8> {
            self.writes().concat()
        }
        fn make_room(&self, n: usize) {
            let mut r = self.0.lock();
            r.room = Some(n);
            if let Some(w) = r.waker.take() {
                w.wake();
            }
        }
    }

    impl AsyncRead for Socket {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Socket {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
        }
        fn poll_write_vectored(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let mut r = self.0.lock();
            let all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            let n = r.room.map_or(all.len(), |room| room.min(all.len()));
            if n == 0 {
                r.waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            if let Some(room) = &mut r.room {
                *room -= n;
            }
            r.writes.push(all[..n].to_vec());
            Poll::Ready(Ok(n))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.0.lock().flushes += 1;
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Writes each of `frames` and flushes after each, as h2 does with chained DATA frames.
    async fn engine(io: &mut Batched<Socket>, frames: &[Vec<u8>]) {
        use tokio::io::AsyncWriteExt;
        for f in frames {
            io.write_all(f).await.unwrap();
            io.flush().await.unwrap();
        }
    }

    fn frames(n: usize, len: usize) -> Vec<Vec<u8>> {
        (0..n).map(|i| vec![i as u8; len]).collect()
    }

    #[tokio::test]
    async fn what_one_poll_writes_and_flushes_goes_out_in_one_write() {
        let socket = Socket::default();
        let (mut io, flusher) = batched(socket.clone());
        let frames = frames(8, 1033);
        flusher.around(engine(&mut io, &frames)).await;
        assert_eq!(socket.writes().len(), 1, "one write for the whole turn");
        assert_eq!(socket.written(), frames.concat());
        assert_eq!(socket.0.lock().flushes, 1);
    }

    #[tokio::test]
    async fn a_connection_between_turns_holds_no_buffer() {
        let socket = Socket::default();
        let (mut io, flusher) = batched(socket.clone());
        let frames = frames(8, 1000);
        // A turn's writes, then the engine waits for the peer, as an idle connection does.
        let mut run = Box::pin(flusher.around(async {
            engine(&mut io, &frames).await;
            std::future::pending::<()>().await
        }));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(run.as_mut().poll(&mut cx).is_pending());
        assert_eq!(socket.writes().len(), 1);
        assert_eq!(socket.written(), frames.concat());
        assert_eq!(run.shared.lock().buf.capacity(), 0);
    }

    #[tokio::test]
    async fn a_flush_outside_the_engines_poll_is_a_flush() {
        let socket = Socket::default();
        let (mut io, _flusher) = batched(socket.clone());
        let frames = frames(3, 100);
        engine(&mut io, &frames).await;
        assert_eq!(socket.writes(), frames);
        assert_eq!(socket.0.lock().flushes, 3);
    }

    #[tokio::test]
    async fn a_large_write_goes_out_at_once_behind_what_is_held() {
        let socket = Socket::default();
        let (mut io, flusher) = batched(socket.clone());
        let frames = vec![vec![1u8; 100], vec![2u8; DIRECT], vec![3u8; 50]];
        flusher.around(engine(&mut io, &frames)).await;
        let writes = socket.writes();
        assert_eq!(
            writes.len(),
            2,
            "{:?}",
            writes.iter().map(Vec::len).collect::<Vec<_>>()
        );
        assert_eq!(writes[0].len(), 100 + DIRECT);
        assert_eq!(socket.written(), frames.concat());
    }

    #[tokio::test]
    async fn a_full_buffer_waits_for_the_socket_and_loses_nothing() {
        let socket = Socket::default();
        socket.0.lock().room = Some(1000);
        let (mut io, flusher) = batched(socket.clone());
        // More than is held before a write waits, in pieces short enough to be copied.
        let frames = frames(2 * HELD / 4000 + 3, 4000);
        let total: usize = frames.iter().map(Vec::len).sum();
        let mut run = Box::pin(flusher.around(engine(&mut io, &frames)));
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut rounds = 0;
        while run.as_mut().poll(&mut cx).is_pending() {
            rounds += 1;
            assert!(rounds < 10_000, "stuck");
            // The socket takes a little at a time; the engine never holds more than HELD.
            let held = io_held(&run);
            assert!(held <= HELD, "{held} bytes held");
            socket.make_room(3000);
        }
        assert_eq!(socket.written().len(), total);
        assert_eq!(socket.written(), frames.concat());
    }

    fn io_held<F: Future>(run: &Pin<Box<Flushing<Socket, F>>>) -> usize {
        run.shared.lock().held()
    }

    #[tokio::test]
    async fn a_socket_that_fails_fails_the_next_write() {
        struct Broken;
        impl AsyncWrite for Broken {
            fn poll_write(
                self: Pin<&mut Self>,
                _: &mut Context<'_>,
                _: &[u8],
            ) -> Poll<io::Result<usize>> {
                Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()))
            }
            fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
            fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
        }
        use tokio::io::AsyncWriteExt;
        let (mut io, flusher) = batched(Broken);
        // The first write is taken (held), and fails as the poll ends.
        flusher
            .around(async {
                io.write_all(b"hello").await.unwrap();
                io.flush().await.unwrap();
            })
            .await;
        // What comes after meets the broken socket, however short.
        assert!(io.write_all(b"x").await.is_err());
        assert!(io.flush().await.is_err());
        assert!(io.shutdown().await.is_ok(), "nothing held is left to fail");
    }

    /// Counts the writes that reach the socket.
    struct Counted<S> {
        inner: S,
        writes: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let r = Pin::new(&mut self.inner).poll_write(cx, buf);
            if r.is_ready() {
                self.writes
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            r
        }
        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
            if r.is_ready() {
                self.writes
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            r
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// The case this is for: an HTTP/2 server answering eight streams with 1 KiB bodies. h2
    /// alone writes each chained DATA frame out on its own (eight writes or more); batched, the
    /// turn that answers them all writes once.
    #[tokio::test]
    async fn an_http2_server_answers_the_streams_of_one_turn_in_one_write() {
        use http_body_util::{BodyExt, Full};
        use hyper_util::rt::{TokioExecutor, TokioIo};
        use std::sync::atomic::Ordering::Relaxed;

        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        let writes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (io, flusher) = batched(Counted {
            inner: server_io,
            writes: writes.clone(),
        });
        let svc = hyper::service::service_fn(|_req| async {
            Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(bytes::Bytes::from(
                vec![b'x'; 1024],
            ))))
        });
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(io), svc);
        tokio::spawn(flusher.around(conn));

        let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake::<_, Full<bytes::Bytes>>(TokioIo::new(client_io))
            .await
            .unwrap();
        tokio::spawn(conn);
        let get = || hyper::Request::new(Full::new(bytes::Bytes::new()));
        // The handshake and its acknowledgements first.
        let resp = send.send_request(get()).await.unwrap();
        resp.into_body().collect().await.unwrap();
        tokio::task::yield_now().await;
        let before = writes.load(Relaxed);

        let requests: Vec<_> = (0..8).map(|_| send.send_request(get())).collect();
        for resp in futures::future::join_all(requests).await {
            let body = resp
                .unwrap()
                .into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes();
            assert_eq!(body.len(), 1024);
        }
        let burst = writes.load(Relaxed) - before;
        assert!(burst <= 2, "{burst} writes for eight answers");
    }
}
