//! HBONE: TCP tunnelled between nodes as HTTP/2 `CONNECT` streams over mutual TLS 1.3.
//!
//! The source node's [`pool::Pool`] opens (and shares) one TLS + HTTP/2 connection per
//! (source identity, destination identity, destination node) to the destination node's
//! `:15008`, and one `CONNECT <pod ip:port>` stream per proxied connection. The destination
//! node's [`inbound`] server checks the client certificate, asks its [`inbound::InboundHandler`]
//! whether to deliver, connects to the pod and relays.
//!
//! Wire contract (both directions of weft speak it):
//! - TLS 1.3 only, ALPN `h2`, client certificate required; both certificates are SVIDs
//!   ([`crate::identity`]). The client sends the destination identity as SNI
//!   ([`crate::identity::sni_for`]) and accepts only that identity from the server.
//! - `CONNECT` with `:authority` = destination pod `ip:port`, header `Forwarded: for=<source pod
//!   ip>` (RFC 7239; IPv6 as `for="[v6]"`).
//! - Response `200`: bytes flow both ways; `END_STREAM` is a half-close (`shutdown(SHUT_WR)`)
//!   and `RST_STREAM` a reset, each way. `400` malformed request; `403` denied, with the policy
//!   in `x-weft-policy`; `404` the target is not a pod on that node; `503` the node could not
//!   connect to the target.

pub mod inbound;
pub mod pool;

use std::future::poll_fn;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

pub use crate::forward::Relayed;

/// Response header naming the policy that denied a tunnel (with status 403).
pub const POLICY_HEADER: &str = "x-weft-policy";
/// Port of the HBONE inbound listener.
pub const HBONE_PORT: u16 = 15008;

/// HTTP/2 receive window of one stream: enough to keep a fast link busy across a node hop.
pub(crate) const STREAM_WINDOW: u32 = 4 << 20;
/// HTTP/2 receive window of a connection (shared by its streams).
pub(crate) const CONNECTION_WINDOW: u32 = 16 << 20;
/// Largest DATA frame we accept.
pub(crate) const MAX_FRAME: u32 = 256 << 10;
/// Per-stream send buffer before the sender waits for the connection to drain.
pub(crate) const SEND_BUFFER: usize = 1 << 20;
/// Largest header block accepted (a CONNECT needs a few hundred bytes).
pub(crate) const MAX_HEADER_LIST: u32 = 16 << 10;
/// One read from a TCP socket.
const CHUNK: usize = 256 << 10;

/// `Forwarded` header value for `ip` (RFC 7239: IPv6 quoted in brackets).
pub fn forwarded_for(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("for={v4}"),
        IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
    }
}

/// The first `for=` address of a `Forwarded` header value (a port, if present, is dropped).
pub fn parse_forwarded_for(value: &str) -> Option<IpAddr> {
    let pair = value.split([',', ';']).map(str::trim).find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim().eq_ignore_ascii_case("for").then_some(v.trim())
    })?;
    let v = pair.trim_matches('"');
    if let Some(rest) = v.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok();
    }
    if let Ok(ip) = v.parse() {
        return Some(ip);
    }
    v.parse::<SocketAddr>().ok().map(|s| s.ip())
}

/// Relays `tcp` ⇄ an HTTP/2 stream until both directions have ended or one fails. End of
/// stream is passed on as a half-close each way; a failure resets both (TCP RST,
/// `RST_STREAM(CANCEL)`). `sent` counts TCP → stream bytes, `received` stream → TCP.
pub(crate) async fn relay(
    mut tcp: TcpStream,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
    pending: Bytes,
) -> Relayed {
    let to_h2 = AtomicU64::new(0);
    let from_h2 = AtomicU64::new(0);
    let mut error = None;
    {
        let (mut rd, mut wr) = tcp.split();
        let up = tcp_to_h2(&mut rd, &mut send, &to_h2);
        let down = h2_to_tcp(&mut recv, &mut wr, pending, &from_h2);
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        while !(up_done && down_done) {
            tokio::select! {
                r = &mut up, if !up_done => {
                    up_done = true;
                    if let Err(e) = r {
                        error = Some(format!("client→tunnel: {e}"));
                        break;
                    }
                }
                r = &mut down, if !down_done => {
                    down_done = true;
                    if let Err(e) = r {
                        error = Some(format!("tunnel→client: {e}"));
                        break;
                    }
                }
            }
        }
    }
    if error.is_some() {
        send.send_reset(Reason::CANCEL);
        crate::forward::reset(&tcp);
    }
    Relayed {
        sent: to_h2.load(Ordering::Relaxed),
        received: from_h2.load(Ordering::Relaxed),
        error,
    }
}

async fn tcp_to_h2<R: AsyncRead + Unpin>(
    rd: &mut R,
    send: &mut SendStream<Bytes>,
    count: &AtomicU64,
) -> io::Result<()> {
    let mut buf = BytesMut::with_capacity(CHUNK);
    loop {
        // Re-uses the allocation once h2 has written the previous chunks out.
        buf.reserve(CHUNK);
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

fn h2_io(e: h2::Error) -> io::Error {
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

/// One tunnelled connection (an open `CONNECT` stream), usable as a byte stream
/// ([`AsyncRead`] + [`AsyncWrite`]: `shutdown` sends `END_STREAM`) or relayed to a socket with
/// [`Tunnel::relay`] (faster: no copy on the way in, half-close and resets passed on).
/// Dropping it before both sides ended resets the stream.
pub struct Tunnel {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received, not yet read.
    pending: Bytes,
    write_closed: bool,
    info: std::sync::Arc<pool::ConnectionInfo>,
    _slot: pool::Slot,
}

impl Tunnel {
    /// The TLS connection this stream runs on.
    pub fn connection(&self) -> &pool::ConnectionInfo {
        &self.info
    }

    /// Relays `client` ⇄ the tunnel until both directions end or one fails.
    /// `sent` = client → tunnel bytes, `received` = tunnel → client.
    pub async fn relay(self, client: TcpStream) -> Relayed {
        let Tunnel {
            send,
            recv,
            pending,
            _slot,
            ..
        } = self;
        let _ = client.set_nodelay(true);
        relay(client, send, recv, pending).await
    }
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("connection", &self.info.id)
            .field("stream", &self.send.stream_id().as_u32())
            .finish()
    }
}

impl AsyncRead for Tunnel {
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

impl AsyncWrite for Tunnel {
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

    #[test]
    fn forwarded_round_trip() {
        for ip in ["10.1.2.3", "2001:db8::1", "::ffff:1.2.3.4"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(parse_forwarded_for(&forwarded_for(ip)), Some(ip));
        }
        assert_eq!(forwarded_for("10.0.0.1".parse().unwrap()), "for=10.0.0.1");
        assert_eq!(
            forwarded_for("2001:db8::1".parse().unwrap()),
            "for=\"[2001:db8::1]\""
        );
        assert_eq!(
            parse_forwarded_for("proto=https; For=\"[::1]:4711\", for=1.1.1.1"),
            Some("::1".parse().unwrap())
        );
        assert_eq!(
            parse_forwarded_for("for=\"192.0.2.43:47011\""),
            Some("192.0.2.43".parse().unwrap())
        );
        assert_eq!(parse_forwarded_for("for=_hidden"), None);
        assert_eq!(parse_forwarded_for("by=1.2.3.4"), None);
        assert_eq!(parse_forwarded_for(""), None);
    }
}
