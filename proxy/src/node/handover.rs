//! Handing the listening sockets to a successor: restarts and upgrades without a refused
//! connection.
//!
//! A `weft node` that starts while another runs on the node (a DaemonSet rolling update with
//! `maxSurge`, a restart by hand, an upgrade) first connects to the running one's hand-over
//! socket (`--handover-socket`) and is sent its listening sockets with `SCM_RIGHTS`. They are the
//! same kernel sockets, so their accept queues carry over: connections keep being accepted by
//! whichever process calls `accept` first, and none is refused. Once the successor serves, it
//! says so; only then does the predecessor stop accepting and drain what it has open. A
//! successor that dies before it serves changes nothing: the predecessor never stopped.
//!
//! A name may come several times: the capture and HBONE listeners are groups of sockets on one
//! address (`SO_REUSEPORT`, one per worker), and the whole group changes hands, so no socket
//! with connections in its queue is closed and none is left without a process accepting.
//!
//! The exchange, one line of JSON each way, on one connection:
//! - successor → `{"pid":…,"version":…,"groups":true}`;
//! - predecessor → `{"pid":…,"version":…,"listeners":["capture","capture",…]}` with one
//!   descriptor per name, in that order (a successor that does not say `groups` is refused a
//!   group: it would keep one socket of it and leave the others' connections unaccepted);
//! - successor → `{"serving":true}` once its workers accept;
//! - predecessor → `{"draining":true}`: it no longer accepts.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

/// How long either side waits for the other's next line. A successor may take this long
/// between taking the sockets and serving them (attaching the programs, reading the registry).
const SERVE_WAIT: Duration = Duration::from_secs(120);
/// How long the first lines of the exchange may take.
const EXCHANGE_WAIT: Duration = Duration::from_secs(5);
/// The most descriptors one message may carry (the kernel's `SCM_MAX_FD`): more than a node
/// hands over (two groups of at most `workers::MAX_GROUP`, and two single listeners).
const MAX_FDS: usize = 253;

/// The listeners a node hands over, by name.
pub const CAPTURE: &str = "capture";
pub const HBONE: &str = "hbone";
pub const ADMIN: &str = "admin";
pub const METRICS: &str = "metrics";

#[derive(Debug, Serialize, Deserialize)]
struct Hello {
    pid: u32,
    version: String,
    /// Takes every socket of a listener group (see the module's notes).
    #[serde(default)]
    groups: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct Offer {
    pid: u32,
    version: String,
    listeners: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Serving {
    serving: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct Draining {
    draining: bool,
}

/// The listening sockets a successor was handed, and the line back to its predecessor.
#[derive(Debug)]
pub struct Inherited {
    listeners: HashMap<String, Vec<TcpListener>>,
    predecessor: UnixStream,
    /// The predecessor's process id (logs, status).
    pub pid: u32,
    pub version: String,
}

impl Inherited {
    /// The listeners handed over as `name` (one, or a group), if they are bound to `want`;
    /// none if not (a changed address is bound anew by the caller; the predecessor closes the
    /// old sockets when it exits).
    pub fn take(&mut self, name: &str, want: SocketAddr) -> Vec<TcpListener> {
        let group = self.listeners.remove(name).unwrap_or_default();
        for listener in &group {
            match listener.local_addr() {
                Ok(addr) if same_address(addr, want) => {}
                Ok(addr) => {
                    warn!(listener = name, handed = %addr, configured = %want,
                        "the predecessor's listener is bound elsewhere: binding anew");
                    return Vec::new();
                }
                Err(e) => {
                    warn!(listener = name, error = %e, "a handed-over listener is unusable");
                    return Vec::new();
                }
            }
        }
        group
    }

    /// Tells the predecessor this node serves: it stops accepting and drains. Waits for its
    /// answer.
    pub fn serving(mut self) -> anyhow::Result<()> {
        send_line(&mut self.predecessor, &Serving { serving: true })?;
        self.predecessor.set_read_timeout(Some(EXCHANGE_WAIT))?;
        let mut reader = BufReader::new(&self.predecessor);
        let answer: Draining = read_line(&mut reader).context("the predecessor's answer")?;
        if !answer.draining {
            bail!("the predecessor did not stop accepting");
        }
        Ok(())
    }
}

/// An `ip:port` the way a listener reports it and the way it is configured (the unspecified
/// address matches itself only).
fn same_address(bound: SocketAddr, want: SocketAddr) -> bool {
    bound == want
}

/// Takes the listeners over from the node running on this machine, if one answers at `path`.
/// `Ok(None)`: nobody runs (no socket, or a stale one): bind as usual.
pub fn take_over(path: &Path) -> anyhow::Result<Option<Inherited>> {
    let mut stream = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            debug!(path = %path.display(), "no running node to take over from");
            return Ok(None);
        }
        Err(e) => {
            return Err(e).with_context(|| format!("connecting to {}", path.display()));
        }
    };
    stream.set_read_timeout(Some(EXCHANGE_WAIT))?;
    stream.set_write_timeout(Some(EXCHANGE_WAIT))?;
    send_line(
        &mut stream,
        &Hello {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").into(),
            groups: true,
        },
    )?;
    let (offer, fds) = receive_offer(&stream).context("receiving the listening sockets")?;
    if offer.listeners.len() != fds.len() {
        bail!(
            "the predecessor named {} listeners and sent {} descriptors",
            offer.listeners.len(),
            fds.len()
        );
    }
    let mut listeners: HashMap<String, Vec<TcpListener>> = HashMap::new();
    for (name, fd) in offer.listeners.iter().zip(fds) {
        listeners
            .entry(name.clone())
            .or_default()
            .push(TcpListener::from(fd));
    }
    info!(predecessor = offer.pid, version = %offer.version, listeners = ?offer.listeners,
        "taking the listening sockets over from the running node");
    // From here on the predecessor waits for this node to serve.
    stream.set_read_timeout(None)?;
    Ok(Some(Inherited {
        listeners,
        predecessor: stream,
        pid: offer.pid,
        version: offer.version,
    }))
}

/// The offer line and the descriptors that came with it. The line is read byte by byte up to
/// its newline, so nothing after it is consumed.
fn receive_offer(stream: &UnixStream) -> anyhow::Result<(Offer, Vec<OwnedFd>)> {
    let mut line = Vec::new();
    let mut fds = Vec::new();
    loop {
        let mut byte = [0u8; 1];
        let mut iov = [IoSliceMut::new(&mut byte)];
        let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        for cmsg in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(received) = cmsg {
                // SAFETY: the kernel just installed these descriptors in this process for us.
                fds.extend(
                    received
                        .into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
            bail!("descriptors were cut off");
        }
        if msg.bytes == 0 {
            bail!("the predecessor closed the connection");
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
        if line.len() > 64 * 1024 {
            bail!("the offer is too long");
        }
    }
    Ok((serde_json::from_slice(&line)?, fds))
}

fn send_line<T: Serialize>(stream: &mut UnixStream, value: &T) -> anyhow::Result<()> {
    let mut line = serde_json::to_vec(value)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    Ok(())
}

fn read_line<T: for<'de> Deserialize<'de>>(
    reader: &mut BufReader<&UnixStream>,
) -> anyhow::Result<T> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        bail!("connection closed");
    }
    Ok(serde_json::from_str(&line)?)
}

/// The running node's side: the hand-over socket at a path, and what it offers.
pub struct Offered {
    path: PathBuf,
    listener: UnixListener,
    /// Identifies the socket file this node bound, so it is not removed once a successor
    /// bound its own at the same path.
    inode: (u64, u64),
}

impl std::fmt::Debug for Offered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Offered")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Offered {
    /// Binds the hand-over socket at `path` (a stale file there is replaced: the node that
    /// bound it is gone, or was just taken over from).
    pub fn bind(path: &Path) -> anyhow::Result<Offered> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing stale {}", path.display())),
        }
        let listener = UnixListener::bind(path)
            .with_context(|| format!("binding the hand-over socket {}", path.display()))?;
        // Whoever connects is given the node's listening sockets: this user only.
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .with_context(|| format!("restricting {}", path.display()))?;
        let meta = std::fs::metadata(path)?;
        Ok(Offered {
            path: path.to_path_buf(),
            listener,
            inode: (meta.dev(), meta.ino()),
        })
    }

    /// Serves successors until one of them serves: returns once the listeners are theirs.
    /// `listeners` are sent to each successor that asks; one that fails or dies before it
    /// serves leaves this node as it was. Blocking: run it on a thread of its own.
    pub fn serve_until_taken(&self, listeners: &[(&str, RawFd)]) {
        for conn in self.listener.incoming() {
            let conn = match conn {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "hand-over socket accept failed");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            match hand_over(conn, listeners) {
                Ok(pid) => {
                    info!(
                        successor = pid,
                        "the successor serves: this node stops accepting and drains"
                    );
                    return;
                }
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "a successor did not take over; serving on")
                }
            }
        }
    }

    /// Removes the socket file, if it is still this node's.
    pub fn remove(&self) {
        let ours = std::fs::metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.inode);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// One successor: hello, offer with descriptors, then its word that it serves. Returns its pid.
fn hand_over(mut conn: UnixStream, listeners: &[(&str, RawFd)]) -> anyhow::Result<u32> {
    // The socket file is this user's only; the peer's credentials are checked all the same.
    let peer = nix::sys::socket::getsockopt(&conn, nix::sys::socket::sockopt::PeerCredentials)?;
    if peer.uid() != nix::unistd::geteuid().as_raw() {
        bail!(
            "process {} of user {} may not take the listeners over",
            peer.pid(),
            peer.uid()
        );
    }
    conn.set_read_timeout(Some(EXCHANGE_WAIT))?;
    conn.set_write_timeout(Some(EXCHANGE_WAIT))?;
    let hello: Hello = {
        let mut reader = BufReader::new(&conn);
        read_line(&mut reader).context("the successor's hello")?
    };
    info!(successor = hello.pid, version = %hello.version, "a successor asks for the listening sockets");
    let names: Vec<&str> = listeners.iter().map(|(n, _)| *n).collect();
    if !hello.groups
        && names
            .iter()
            .enumerate()
            .any(|(i, n)| names[..i].contains(n))
    {
        bail!(
            "process {} cannot take a group of listening sockets over (it would leave connections unaccepted)",
            hello.pid
        );
    }
    let offer = Offer {
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").into(),
        listeners: listeners.iter().map(|(n, _)| n.to_string()).collect(),
    };
    let mut line = serde_json::to_vec(&offer)?;
    line.push(b'\n');
    let fds: Vec<RawFd> = listeners.iter().map(|(_, fd)| *fd).collect();
    // The descriptors ride with the first byte; the rest of the line follows.
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let sent = sendmsg::<()>(
        conn.as_raw_fd(),
        &[IoSlice::new(&line[..1])],
        &cmsg,
        MsgFlags::empty(),
        None,
    )?;
    if sent != 1 {
        bail!("could not send the descriptors");
    }
    conn.write_all(&line[1..])?;
    conn.set_read_timeout(Some(SERVE_WAIT))?;
    let serving: Serving = {
        let mut reader = BufReader::new(&conn);
        read_line(&mut reader).context("waiting for the successor to serve")?
    };
    if !serving.serving {
        bail!("the successor does not serve");
    }
    send_line(&mut conn, &Draining { draining: true })?;
    Ok(hello.pid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn socket_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("weft-handover-{}-{name}.sock", std::process::id()))
    }

    #[test]
    fn nobody_to_take_over_from() {
        let path = socket_path("none");
        let _ = std::fs::remove_file(&path);
        assert!(take_over(&path).unwrap().is_none());
        // A stale file nobody listens on.
        drop(UnixListener::bind(&path).unwrap());
        assert!(take_over(&path).unwrap().is_none());
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn the_same_sockets_change_hands_and_keep_their_queue() {
        let path = socket_path("hand");
        let offered = Offered::bind(&path).unwrap();
        let capture = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = capture.local_addr().unwrap();
        // A connection waiting in the accept queue before the hand-over.
        let mut early = std::net::TcpStream::connect(addr).unwrap();
        early.write_all(b"early").unwrap();
        let fd = capture.as_raw_fd();
        let predecessor = std::thread::spawn(move || {
            offered.serve_until_taken(&[(CAPTURE, fd)]);
            offered
        });
        let mut inherited = take_over(&path).unwrap().expect("a running node answers");
        assert_eq!(inherited.pid, std::process::id());
        let wrong = "127.0.0.1:1".parse().unwrap();
        let mut taken = inherited.take(CAPTURE, addr);
        assert_eq!(taken.len(), 1, "handed over");
        let taken = taken.remove(0);
        assert!(inherited.take(CAPTURE, wrong).is_empty(), "taken once");
        inherited.serving().unwrap();
        let offered = predecessor.join().unwrap();
        // The predecessor closes its copy: the queue lives on in the successor's.
        drop(capture);
        let (mut conn, _) = taken.accept().unwrap();
        let mut buf = [0u8; 5];
        conn.read_exact(&mut buf).unwrap();
        assert_eq!(
            &buf, b"early",
            "the connection queued before the hand-over is served"
        );
        // A new connection after the hand-over is accepted by the successor.
        let _late = std::net::TcpStream::connect(addr).unwrap();
        taken.accept().unwrap();
        // The successor's own socket at the path is not removed by the predecessor.
        let successor = Offered::bind(&path).unwrap();
        offered.remove();
        assert!(path.exists());
        successor.remove();
        assert!(!path.exists());
    }

    /// Sockets sharing one address, the kernel spreading connections among them.
    fn group(n: usize) -> Vec<TcpListener> {
        use socket2::{Domain, Socket, Type};
        let mut addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        (0..n)
            .map(|_| {
                let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
                s.set_reuse_port(true).unwrap();
                s.bind(&addr.into()).unwrap();
                s.listen(64).unwrap();
                let l = TcpListener::from(s);
                addr = l.local_addr().unwrap();
                l
            })
            .collect()
    }

    #[test]
    fn a_group_changes_hands_whole_with_every_queued_connection() {
        let path = socket_path("group");
        let offered = Offered::bind(&path).unwrap();
        let capture = group(3);
        let addr = capture[0].local_addr().unwrap();
        // Queued before the hand-over, spread over the group's sockets by the kernel.
        let mut early: Vec<_> = (0..24)
            .map(|i: u8| {
                let mut c = std::net::TcpStream::connect(addr).unwrap();
                c.write_all(&[i]).unwrap();
                c
            })
            .collect();
        let fds: Vec<(&str, RawFd)> = capture.iter().map(|l| (CAPTURE, l.as_raw_fd())).collect();
        let taken = std::thread::scope(|s| {
            let serve = s.spawn(|| offered.serve_until_taken(&fds));
            let mut inherited = take_over(&path).unwrap().expect("a running node answers");
            let taken = inherited.take(CAPTURE, addr);
            inherited.serving().unwrap();
            serve.join().unwrap();
            taken
        });
        assert_eq!(taken.len(), 3, "the whole group");
        drop(capture);
        let mut seen = Vec::new();
        let mut sockets_used = 0;
        for l in &taken {
            l.set_nonblocking(true).unwrap();
            let before = seen.len();
            while let Ok((mut conn, _)) = l.accept() {
                conn.set_nonblocking(false).unwrap();
                let mut b = [0u8; 1];
                conn.read_exact(&mut b).unwrap();
                seen.push(b[0]);
            }
            sockets_used += usize::from(seen.len() > before);
        }
        assert!(
            sockets_used > 1,
            "the kernel spread the connections over the group"
        );
        seen.sort_unstable();
        assert_eq!(
            seen,
            (0..24).collect::<Vec<u8>>(),
            "every queued connection is served"
        );
        early.clear();
        offered.remove();
    }

    #[test]
    fn a_successor_that_cannot_take_a_group_is_refused_it() {
        let path = socket_path("legacy");
        let offered = Offered::bind(&path).unwrap();
        let capture = group(2);
        let fds: Vec<(&str, RawFd)> = capture.iter().map(|l| (CAPTURE, l.as_raw_fd())).collect();
        std::thread::scope(|s| {
            let serve = s.spawn(|| offered.serve_until_taken(&fds));
            // A successor that does not know groups: no descriptors, the connection closed.
            let mut legacy = UnixStream::connect(&path).unwrap();
            legacy
                .write_all(b"{\"pid\":1,\"version\":\"0\"}\n")
                .unwrap();
            let mut rest = Vec::new();
            legacy.read_to_end(&mut rest).unwrap();
            assert!(rest.is_empty(), "offered nothing: {rest:?}");
            // The node still serves, and a successor that takes groups takes it.
            let mut inherited = take_over(&path).unwrap().expect("still offered");
            assert_eq!(
                inherited
                    .take(CAPTURE, capture[0].local_addr().unwrap())
                    .len(),
                2
            );
            inherited.serving().unwrap();
            serve.join().unwrap();
        });
        offered.remove();
    }

    #[test]
    fn only_this_user_may_connect() {
        use std::os::unix::fs::PermissionsExt;
        let path = socket_path("mode");
        let offered = Offered::bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        offered.remove();
    }

    #[test]
    fn a_successor_that_dies_before_serving_changes_nothing() {
        let path = socket_path("dies");
        let offered = Offered::bind(&path).unwrap();
        let capture = TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = capture.as_raw_fd();
        let predecessor = std::thread::spawn(move || {
            offered.serve_until_taken(&[(CAPTURE, fd)]);
        });
        let first = take_over(&path).unwrap().unwrap();
        drop(first); // dies without serving
        let second = take_over(&path)
            .unwrap()
            .expect("the predecessor still offers");
        second.serving().unwrap();
        predecessor.join().unwrap();
        let _ = std::fs::remove_file(&path);
    }
}
