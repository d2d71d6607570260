//! Moving bytes between two connections: [`relay`] for two TCP sockets, [`both_ways`] for any
//! pair of directions (the HBONE stream ⇄ socket relay uses it too).
//!
//! Each direction is relayed with `splice(2)` through a pipe, so payload bytes stay in the
//! kernel (socket → pipe → socket); the proxy never copies them through user space. End of
//! stream in one direction is passed on as a half-close (`shutdown(SHUT_WR)`) while the other
//! direction keeps flowing. A reset on one side is passed on as a reset on the other.

use std::future::Future;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::fcntl::{splice, OFlag, SpliceFFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Pipe size a direction grows to once it carries bulk data (the kernel caps it at
/// `fs.pipe-max-size`). Pipes start at the default 64 KiB, so short connections never pay for
/// a large buffer.
const BULK_PIPE_SIZE: i32 = 1 << 20;
/// Largest single splice.
const CHUNK: usize = 1 << 20;

/// Bytes moved each way and how the relay ended.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Relayed {
    /// Client → upstream.
    pub sent: u64,
    /// Upstream → client.
    pub received: u64,
    /// The first error seen (e.g. a reset); the relay stops on it.
    pub error: Option<String>,
}

/// Relays `client` ⇄ `upstream` until both directions reach end of stream or one fails.
pub async fn relay(client: TcpStream, upstream: TcpStream) -> Relayed {
    relay_until(client, upstream, std::future::pending()).await
}

/// [`relay`], cut short when `stop` ends first (with why): both peers are then reset, and the
/// bytes moved until then are reported with that reason as the error.
pub async fn relay_until(
    client: TcpStream,
    upstream: TcpStream,
    stop: impl Future<Output = String>,
) -> Relayed {
    // Counted as bytes move, so a direction that is cut short still reports what it moved.
    let (sent, received) = (AtomicU64::new(0), AtomicU64::new(0));
    let up = pump(&client, &upstream, &sent);
    let down = pump(&upstream, &client, &received);
    let error = both_ways(up, "client→upstream", down, "upstream→client", stop).await;
    if error.is_some() {
        // Abort: both peers see a reset rather than a clean close.
        reset(&client);
        reset(&upstream);
    }
    Relayed {
        sent: sent.load(Ordering::Relaxed),
        received: received.load(Ordering::Relaxed),
        error,
    }
}

/// Drives both directions of a relay until both have ended, or until one fails, or until `stop`
/// ends: then the rest is dropped and the failure (named after its direction) or `stop`'s
/// reason is returned.
pub async fn both_ways(
    up: impl Future<Output = io::Result<()>>,
    up_name: &str,
    down: impl Future<Output = io::Result<()>>,
    down_name: &str,
    stop: impl Future<Output = String>,
) -> Option<String> {
    tokio::pin!(up, down, stop);
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        tokio::select! {
            r = &mut up, if !up_done => {
                up_done = true;
                if let Err(e) = r {
                    return Some(format!("{up_name}: {e}"));
                }
            }
            r = &mut down, if !down_done => {
                down_done = true;
                if let Err(e) = r {
                    return Some(format!("{down_name}: {e}"));
                }
            }
            why = &mut stop => return Some(why),
        }
    }
    None
}

/// Arranges for the socket to send RST instead of FIN when it is closed.
pub fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(std::time::Duration::ZERO));
}

/// One direction, `src` → `dst`, adding the bytes it moves to `moved`.
async fn pump(src: &TcpStream, dst: &TcpStream, moved: &AtomicU64) -> io::Result<()> {
    Direction::new()?.run(src, dst, moved).await
}

struct Direction {
    pipe_r: OwnedFd,
    pipe_w: OwnedFd,
    /// Current pipe capacity; a splice that fills it means bulk data.
    capacity: usize,
}

impl Direction {
    fn new() -> io::Result<Self> {
        let (pipe_r, pipe_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        let capacity = nix::fcntl::fcntl(&pipe_w, nix::fcntl::FcntlArg::F_GETPIPE_SZ)
            .map(|n| n as usize)
            .unwrap_or(usize::MAX);
        Ok(Self {
            pipe_r,
            pipe_w,
            capacity,
        })
    }

    /// Best effort: a larger pipe means fewer splice calls for bulk transfers.
    fn grow(&mut self) {
        if let Ok(n) = nix::fcntl::fcntl(
            &self.pipe_w,
            nix::fcntl::FcntlArg::F_SETPIPE_SZ(BULK_PIPE_SIZE),
        ) {
            self.capacity = n as usize;
        } else {
            self.capacity = usize::MAX;
        }
    }

    /// Moves bytes from `src` to `dst` until end of stream, then half-closes `dst`.
    async fn run(mut self, src: &TcpStream, dst: &TcpStream, moved: &AtomicU64) -> io::Result<()> {
        let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
        loop {
            // socket → pipe
            let n = loop {
                src.readable().await?;
                match src.try_io(Interest::READABLE, || {
                    splice(
                        src.as_fd(),
                        None,
                        self.pipe_w.as_fd(),
                        None,
                        CHUNK,
                        flags | SpliceFFlags::SPLICE_F_MORE,
                    )
                    .map_err(io::Error::from)
                }) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            };
            if n == 0 {
                // End of stream from src: pass the half-close on.
                return shutdown_write(dst);
            }
            let bulk = n >= self.capacity;
            // pipe → socket, until the pipe is empty again.
            let mut left = n;
            while left > 0 {
                dst.writable().await?;
                match dst.try_io(Interest::WRITABLE, || {
                    splice(self.pipe_r.as_fd(), None, dst.as_fd(), None, left, flags)
                        .map_err(io::Error::from)
                }) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(m) => {
                        left -= m;
                        moved.fetch_add(m as u64, Ordering::Relaxed);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            }
            if bulk {
                self.grow();
            }
        }
    }
}

fn shutdown_write(s: &TcpStream) -> io::Result<()> {
    // SAFETY: plain shutdown(2) on a descriptor we borrow for the call.
    let r = unsafe { libc::shutdown(s.as_raw_fd(), libc::SHUT_WR) };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    // The peer may already be gone; that is the other direction's problem to report.
    if e.raw_os_error() == Some(libc::ENOTCONN) {
        Ok(())
    } else {
        Err(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// client ⇄ [relay] ⇄ server over loopback; returns (client side, server side, relay task).
    async fn setup() -> (TcpStream, TcpStream, tokio::task::JoinHandle<Relayed>) {
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let back = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front_addr = front.local_addr().unwrap();
        let back_addr = back.local_addr().unwrap();
        let client = TcpStream::connect(front_addr).await.unwrap();
        let (accepted, _) = front.accept().await.unwrap();
        let upstream = TcpStream::connect(back_addr).await.unwrap();
        let (server, _) = back.accept().await.unwrap();
        let task = tokio::spawn(relay(accepted, upstream));
        (client, server, task)
    }

    #[tokio::test]
    async fn relays_both_ways_with_half_close() {
        let (mut client, mut server, task) = setup().await;
        let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let expect = payload.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&payload).await.unwrap();
            client.shutdown().await.unwrap(); // half-close: the server must see EOF
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), expect.len());
        assert!(got == expect);
        // The server can still answer after the client's half-close.
        server.write_all(b"done").await.unwrap();
        server.shutdown().await.unwrap();
        drop(server);
        assert_eq!(writer.await.unwrap(), b"done");
        let r = task.await.unwrap();
        assert_eq!(r.sent, 3_000_000);
        assert_eq!(r.received, 4);
        assert_eq!(r.error, None);
    }

    #[tokio::test]
    async fn bytes_are_counted_when_a_side_resets() {
        let (mut client, mut server, task) = setup().await;
        client.write_all(b"0123456789").await.unwrap();
        let mut got = [0u8; 10];
        server.read_exact(&mut got).await.unwrap();
        server.write_all(&[7u8; 1000]).await.unwrap();
        let mut back = vec![0u8; 1000];
        client.read_exact(&mut back).await.unwrap();
        reset(&client);
        drop(client);
        let r = task.await.unwrap();
        assert!(r.error.is_some(), "{r:?}");
        assert_eq!((r.sent, r.received), (10, 1000));
    }

    #[tokio::test]
    async fn reset_is_passed_on() {
        let (mut client, server, task) = setup().await;
        client.write_all(b"hello").await.unwrap();
        reset(&server);
        drop(server);
        let r = task.await.unwrap();
        assert!(r.error.is_some(), "{r:?}");
        let mut buf = [0u8; 16];
        let e = client.read(&mut buf).await;
        assert!(
            matches!(&e, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
            "{e:?}"
        );
    }
}
