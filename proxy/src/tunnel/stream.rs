//! A `CONNECT` stream as a byte stream, and its relay to a TCP socket.

use std::future::poll_fn;
use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::relay::{both_ways, either, idle, reset, shutdown_read, Ending, Relayed};

/// The read buffer allocated at a time: many small reads share one allocation.
const CHUNK: usize = 256 << 10;
/// The least room a read is given: below it, a new [`CHUNK`] is allocated.
const MIN_READ: usize = 16 << 10;

/// Relays `tcp` ⇄ an HTTP/2 stream until both directions have ended or one fails. End of
/// stream is passed on as a half-close each way; a failure resets both (TCP RST,
/// `RST_STREAM(CANCEL)`). Idle for `idle_timeout`, it is closed cleanly: reading the socket is
/// shut down, so `END_STREAM` goes to the tunnel, and the peer's end of stream (once it
/// closes in turn) becomes the socket's FIN. `sent` counts TCP → stream bytes, `received`
/// stream → TCP.
async fn relay(
    mut tcp: TcpStream,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
    pending: Bytes,
    stop: impl Future<Output = String>,
    close: impl Future<Output = String>,
    idle_timeout: Option<Duration>,
) -> Relayed {
    let to_h2 = AtomicU64::new(0);
    let from_h2 = AtomicU64::new(0);
    let ending = {
        let fd = tcp.as_raw_fd();
        let (mut rd, mut wr) = tcp.split();
        let up = pin!(tcp_to_h2(&mut rd, &mut send, &to_h2));
        let down = pin!(h2_to_tcp(&mut recv, &mut wr, pending, &from_h2));
        let idle = pin!(either(close, idle(&to_h2, &from_h2, idle_timeout)));
        let close = || shutdown_read(&fd);
        both_ways(
            up,
            "client→tunnel",
            down,
            "tunnel→client",
            pin!(stop),
            idle,
            close,
        )
        .await
    };
    if let Ending::Failed(_) = ending {
        send.send_reset(Reason::CANCEL);
        reset(&tcp);
    }
    Relayed {
        sent: to_h2.load(Ordering::Relaxed),
        received: from_h2.load(Ordering::Relaxed),
        error: ending.error(),
    }
}

async fn tcp_to_h2<R: AsyncRead + Unpin>(
    rd: &mut R,
    send: &mut SendStream<Bytes>,
    count: &AtomicU64,
) -> io::Result<()> {
    let mut buf = BytesMut::with_capacity(CHUNK);
    loop {
        // Each read goes after the previous one in the same allocation (the chunks sent are
        // views of it); a new one is made only when little room is left, and the old one is
        // freed once h2 has written out every chunk of it.
        if buf.capacity() < MIN_READ {
            buf.reserve(CHUNK);
        }
        let n = tokio::select! {
            r = rd.read_buf(&mut buf) => r?,
            r = poll_fn(|cx| send.poll_reset(cx)) => return Err(reset_error(r)),
        };
        if n == 0 {
            send.send_data(Bytes::new(), true).map_err(h2_io)?;
            return Ok(());
        }
        let mut data = buf.split().freeze();
        while !data.is_empty() {
            let cap = wait_capacity(send, data.len()).await?;
            let chunk = data.split_to(cap.min(data.len()));
            let len = chunk.len() as u64;
            send.send_data(chunk, false).map_err(h2_io)?;
            count.fetch_add(len, Ordering::Relaxed);
        }
    }
}

/// Waits for HTTP/2 send capacity (flow control window and send buffer) for up to `want`
/// bytes; returns how much is available.
async fn wait_capacity(send: &mut SendStream<Bytes>, want: usize) -> io::Result<usize> {
    send.reserve_capacity(want);
    loop {
        let cap = send.capacity();
        if cap > 0 {
            return Ok(cap);
        }
        match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(h2_io(e)),
            None => return Err(io::Error::new(io::ErrorKind::BrokenPipe, "stream closed")),
        }
    }
}

async fn h2_to_tcp<W: AsyncWrite + Unpin>(
    recv: &mut RecvStream,
    wr: &mut W,
    pending: Bytes,
    count: &AtomicU64,
) -> io::Result<()> {
    if !pending.is_empty() {
        wr.write_all(&pending).await?;
        count.fetch_add(pending.len() as u64, Ordering::Relaxed);
    }
    loop {
        match poll_fn(|cx| recv.poll_data(cx)).await {
            Some(Ok(data)) => {
                let len = data.len();
                wr.write_all(&data).await?;
                count.fetch_add(len as u64, Ordering::Relaxed);
                // Open the window only for what has left: the TCP peer's pace is the tunnel's.
                recv.flow_control().release_capacity(len).map_err(h2_io)?;
            }
            Some(Err(e)) => return Err(h2_io(e)),
            None => {
                return match wr.shutdown().await {
                    Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(e),
                    _ => Ok(()),
                };
            }
        }
    }
}

pub(super) fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().unwrap_or_else(|| io::ErrorKind::Other.into());
    }
    let kind = if e.is_reset() || e.is_go_away() {
        io::ErrorKind::ConnectionReset
    } else {
        io::ErrorKind::Other
    };
    io::Error::new(kind, e)
}

fn reset_error(r: Result<Reason, h2::Error>) -> io::Error {
    match r {
        Ok(reason) => io::Error::new(
            io::ErrorKind::ConnectionReset,
            format!("stream reset by peer: {reason}"),
        ),
        Err(e) => h2_io(e),
    }
}

/// One tunnelled connection (an open `CONNECT` stream, either end), usable as a byte stream
/// ([`AsyncRead`] + [`AsyncWrite`]: `shutdown` sends `END_STREAM`) or relayed to a socket with
/// [`Stream::relay`] (faster: no copy on the way in, half-close and resets passed on).
/// Dropping it before both sides ended resets the stream.
pub struct Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received, not yet read.
    pending: Bytes,
    write_closed: bool,
}

impl Stream {
    pub(crate) fn new(send: SendStream<Bytes>, recv: RecvStream) -> Stream {
        Stream {
            send,
            recv,
            pending: Bytes::new(),
            write_closed: false,
        }
    }

    /// Relays `socket` ⇄ the stream until both directions end or one fails.
    /// `sent` = socket → stream bytes, `received` = stream → socket.
    pub fn relay(self, socket: TcpStream) -> impl Future<Output = Relayed> {
        self.relay_until(socket, std::future::pending())
    }

    /// [`Stream::relay`], cut short when `stop` ends first (with why): the stream is then
    /// cancelled and the socket reset, and the bytes moved until then are reported with that
    /// reason as the error.
    pub fn relay_until(
        self,
        socket: TcpStream,
        stop: impl Future<Output = String>,
    ) -> impl Future<Output = Relayed> {
        self.relay_bounded(socket, stop, std::future::pending(), None)
    }

    /// [`Stream::relay_until`], and closed cleanly once `close` ends (with why, e.g. the
    /// node's drain timeout) or no byte has moved either way for `idle_timeout` (`None`:
    /// never): `END_STREAM` to the tunnel, FIN to the socket, and the error says why
    /// (`closed: idle for …`).
    ///
    /// These return the relay's own future (not an `async fn` around it, which would hold
    /// its arguments twice): what a tunnelled connection's task holds while it lasts.
    pub fn relay_bounded(
        self,
        socket: TcpStream,
        stop: impl Future<Output = String>,
        close: impl Future<Output = String>,
        idle_timeout: Option<Duration>,
    ) -> impl Future<Output = Relayed> {
        // `socket` has TCP_NODELAY already: inherited from weft's listeners, or set by the
        // connector.
        relay(
            socket,
            self.send,
            self.recv,
            self.pending,
            stop,
            close,
            idle_timeout,
        )
    }
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("id", &self.send.stream_id().as_u32())
            .finish()
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.pending.is_empty() {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    this.pending = data;
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending[..n]);
        this.pending.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = &mut *self;
        if this.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        this.send.reserve_capacity(buf.len());
        let cap = loop {
            let cap = this.send.capacity();
            if cap > 0 {
                break cap;
            }
            match ready!(this.send.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        };
        let n = cap.min(buf.len());
        this.send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(h2_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection task writes queued frames out on its own.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.write_closed {
            this.write_closed = true;
            this.send.send_data(Bytes::new(), true).map_err(h2_io)?;
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A `CONNECT` stream relayed to a socket whose peer is `tcp_peer`; the tunnel's other end
    /// is (`send`, `recv`), as the other node holds it.
    async fn relayed(
        idle_timeout: Duration,
    ) -> (
        TcpStream,
        SendStream<Bytes>,
        RecvStream,
        tokio::task::JoinHandle<Relayed>,
    ) {
        let (c_io, s_io) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(s_io).await.unwrap();
            let (request, mut respond) = conn.accept().await.unwrap().unwrap();
            let send = respond
                .send_response(http::Response::new(()), false)
                .unwrap();
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            Stream::new(send, request.into_body())
        });
        let (mut client, conn) = h2::client::handshake(c_io).await.unwrap();
        tokio::spawn(conn);
        let request = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri("10.0.0.1:80")
            .body(())
            .unwrap();
        let (response, peer_send) = client.send_request(request, false).unwrap();
        let stream = server.await.unwrap();
        let peer_recv = response.await.unwrap().into_body();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp_peer = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (socket, _) = l.accept().await.unwrap();
        let task = tokio::spawn(stream.relay_bounded(
            socket,
            std::future::pending(),
            std::future::pending(),
            Some(idle_timeout),
        ));
        (tcp_peer, peer_send, peer_recv, task)
    }

    #[tokio::test]
    async fn an_idle_stream_is_ended_cleanly_both_ways() {
        let (mut tcp_peer, mut peer_send, mut peer_recv, task) =
            relayed(Duration::from_millis(300)).await;
        tcp_peer.write_all(b"hi").await.unwrap();
        let got = poll_fn(|cx| peer_recv.poll_data(cx))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&got[..], b"hi");
        let _ = peer_recv.flow_control().release_capacity(got.len());
        // Idle: END_STREAM comes through the tunnel (no reset) ...
        let started = std::time::Instant::now();
        // (an empty DATA frame carries the END_STREAM flag)
        while let Some(frame) = poll_fn(|cx| peer_recv.poll_data(cx)).await {
            assert!(frame.unwrap().is_empty());
        }
        assert!(started.elapsed() >= Duration::from_millis(250));
        // ... the other node ends its side in turn, and the socket's peer gets a FIN.
        peer_send.send_data(Bytes::new(), true).unwrap();
        let mut rest = Vec::new();
        assert_eq!(tcp_peer.read_to_end(&mut rest).await.unwrap(), 0);
        let r = task.await.unwrap();
        assert_eq!((r.sent, r.received), (2, 0));
        let error = r.error.unwrap();
        assert!(error.starts_with("closed: idle for "), "{error}");
    }
}
