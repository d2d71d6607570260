//! Deliver: the one place weft opens a connection towards a workload or an external address.
//!
//! Every path goes through [`Connector::connect`] and says on whose behalf it connects: a
//! captured pod's outbound connection (same-node delivery, passthrough) or a remote workload's
//! tunnel being delivered to a pod of this node.
//!
//! A captured pod's connection is opened in that pod's network namespace ([`PodNetworks`]), so
//! it leaves with the pod's own address, through the pod's interface, under the pod's
//! NetworkPolicy — as the pod's own connection would have. Where the namespace cannot be found
//! (the pod has no process left), it leaves from the node.
//!
//! A connection to a STRICT pod ([`Deliveries::wanted`]) has its local port and destination
//! announced to [`Deliveries`] (the capture's `DELIVERIES` map) before its SYN leaves: a STRICT
//! pod accepts plaintext only from connections weft announced, not from whatever else shares
//! the node's address. Its port is therefore bound before `connect`, which costs: the kernel
//! searches for a free port per local address rather than per destination (slower with many
//! sockets in TIME_WAIT, and ~28 000 such connections at once per node address). Other
//! connections connect as usual.
//!
//! - [`http`]: HTTP/1.1 and HTTP/2 client connections over any stream (TCP, an HBONE tunnel,
//!   TLS), kept for reuse per endpoint; [`http2`] sends an HTTP/2 one's requests.
//! - [`tls`]: TLS origination towards external services (DestinationRule `tls.mode: SIMPLE`).
//!
//! May import: `batch`, `registry`, `identity`, `worker`, `netns`, `relay`.

pub mod dns;
pub mod http;
mod http2;
pub mod tls;

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsFd, FromRawFd, IntoRawFd};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;
use tracing::{debug, trace, warn};

use crate::identity::SpiffeId;
use crate::netns::PodNetworks;
use crate::registry::Pod;

/// Who a connection is opened for.
#[derive(Debug, Clone, Copy)]
pub enum OnBehalfOf<'a> {
    /// A pod of this node whose connection was captured (identified by its cgroup).
    Pod(&'a Pod),
    /// A connection from a pod weft could not identify.
    Unidentified,
    /// A workload of another node, through an HBONE tunnel: its verified identity and, where
    /// known, its verified address (shown to the pod delivered to).
    Peer {
        identity: &'a SpiffeId,
        source: Option<IpAddr>,
    },
}

impl fmt::Display for OnBehalfOf<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OnBehalfOf::Pod(p) => write!(f, "{}/{}", p.namespace, p.name),
            OnBehalfOf::Unidentified => f.write_str("an unidentified pod"),
            OnBehalfOf::Peer { identity, .. } => write!(f, "{identity}"),
        }
    }
}

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Refused, unreachable, …
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("connect timed out after {0:?}")]
    TimedOut(Duration),
}

/// TCP keepalive for an upstream socket (DestinationRule `tcp.tcpKeepalive`; a field left
/// out: [`KEEPALIVE`]'s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    pub probes: Option<u32>,
    pub time: Option<Duration>,
    pub interval: Option<Duration>,
}

/// TCP keepalive on every socket weft accepts or opens (but one to an address of its own
/// namespace: [`keepalive_for`]), so that a peer that vanished (a node powered off, a pod's
/// network torn down) is found even when nothing is being sent:
/// ztunnel's values, a first probe after 180 s without traffic, then one every 180 s, and the
/// connection dropped after 9 unanswered (about half an hour). The kernel's own defaults
/// (2 h, then 9 × 75 s) would hold a dead peer's descriptors for over two hours.
pub const KEEPALIVE: Keepalive = Keepalive {
    probes: Some(9),
    time: Some(Duration::from_secs(180)),
    interval: Some(Duration::from_secs(180)),
};

/// Turns TCP keepalive on for `socket`: `keepalive`'s fields, [`KEEPALIVE`]'s where it leaves
/// one out. On a listening socket, every connection it accepts inherits the setting (Linux
/// copies it to each accepted socket), so a listener needs this once.
pub fn set_keepalive(socket: &impl AsFd, keepalive: Keepalive) -> io::Result<()> {
    let ka = socket2::TcpKeepalive::new()
        .with_time(keepalive.time.or(KEEPALIVE.time).unwrap_or_default())
        .with_interval(
            keepalive
                .interval
                .or(KEEPALIVE.interval)
                .unwrap_or_default(),
        )
        .with_retries(keepalive.probes.or(KEEPALIVE.probes).unwrap_or_default());
    socket2::SockRef::from(socket).set_tcp_keepalive(&ka)
}

/// The options every connection a listener accepts starts with, set once on the listener
/// (Linux copies them to each accepted socket): [`KEEPALIVE`] and `TCP_NODELAY` (the proxy
/// relays what it reads at once). No accepted connection then needs a `setsockopt(2)` of its
/// own.
pub fn set_listening_options(listener: &impl AsFd) -> io::Result<()> {
    set_keepalive(listener, KEEPALIVE)?;
    socket2::SockRef::from(listener).set_tcp_nodelay(true)
}

/// Told about each IPv4 connection weft opens, after its local port is bound and before its
/// SYN leaves, and again once it is connected or failed.
pub trait Deliveries: Send + Sync + fmt::Debug {
    /// Whether connections to `target` must be announced (it is a STRICT pod's port).
    fn wanted(&self, target: SocketAddrV4) -> bool;
    fn announce(&self, local_port: u16, target: SocketAddrV4) -> anyhow::Result<()>;
    fn delivered(&self, local_port: u16, target: SocketAddrV4);
}

/// Opens upstream connections.
#[derive(Debug, Clone)]
pub struct Connector {
    timeout: Duration,
    deliveries: Option<Arc<dyn Deliveries>>,
    networks: Option<Arc<dyn PodNetworks>>,
}

impl Connector {
    /// Connections that take longer than `timeout` to establish fail.
    pub fn new(timeout: Duration) -> Connector {
        Connector {
            timeout,
            deliveries: None,
            networks: None,
        }
    }

    /// Opens a captured pod's connections in the pod's own network namespace.
    pub fn with_pod_networks(mut self, networks: Arc<dyn PodNetworks>) -> Connector {
        self.networks = Some(networks);
        self
    }

    /// Announces every IPv4 connection to `deliveries` before it is opened.
    pub fn with_deliveries(mut self, deliveries: Arc<dyn Deliveries>) -> Connector {
        self.deliveries = Some(deliveries);
        self
    }

    /// Connects to `target` for `on_behalf`, with `TCP_NODELAY` set (the proxy relays what it
    /// reads at once; batching is the endpoints' business) and [`KEEPALIVE`] where it can
    /// find anything ([`keepalive_for`]).
    pub async fn connect(
        &self,
        on_behalf: OnBehalfOf<'_>,
        target: SocketAddr,
    ) -> Result<TcpStream, ConnectError> {
        self.connect_with(on_behalf, target, None, None).await
    }

    /// The same within `timeout` (`None`: the node's), with `keepalive` on the socket.
    pub async fn connect_with(
        &self,
        on_behalf: OnBehalfOf<'_>,
        target: SocketAddr,
        timeout: Option<Duration>,
        keepalive: Option<Keepalive>,
    ) -> Result<TcpStream, ConnectError> {
        let (stream, owed) = self.open(on_behalf, target, timeout, keepalive).await?;
        if let Some(keepalive) = owed {
            set_keepalive(&stream, keepalive)?;
        }
        Ok(stream)
    }

    /// [`Connector::connect`] for a connection to be relayed: [`KEEPALIVE`] is left to
    /// [`KeepaliveLater::arm`], which sets it only on a relay that lasts
    /// [`KEEPALIVE_AFTER`]. Most relayed connections end sooner, and never pay the four
    /// `setsockopt(2)` calls; a peer that vanishes is still found, at most
    /// [`KEEPALIVE_AFTER`] later than it would have been.
    pub async fn connect_relayed(
        &self,
        on_behalf: OnBehalfOf<'_>,
        target: SocketAddr,
    ) -> Result<(TcpStream, KeepaliveLater), ConnectError> {
        let (stream, owed) = self.open(on_behalf, target, None, None).await?;
        Ok((stream, KeepaliveLater(owed)))
    }

    /// A connection to `target`, with `TCP_NODELAY`, and the keepalive it is owed
    /// ([`keepalive_for`]), not set yet.
    async fn open(
        &self,
        on_behalf: OnBehalfOf<'_>,
        target: SocketAddr,
        timeout: Option<Duration>,
        keepalive: Option<Keepalive>,
    ) -> Result<(TcpStream, Option<Keepalive>), ConnectError> {
        trace!(%target, on_behalf = %on_behalf, "connecting");
        let timeout = timeout.unwrap_or(self.timeout);
        // A delivery the eBPF side is told of by port, before it connects, needs its port now.
        let announced = match (&self.deliveries, target) {
            (Some(deliveries), SocketAddr::V4(v4)) => deliveries.wanted(v4),
            _ => false,
        };
        let (socket, bound, here) = self.socket(on_behalf, target, announced)?;
        let stream = match (&self.deliveries, target) {
            (Some(deliveries), SocketAddr::V4(v4)) if announced => {
                if !bound {
                    socket.bind(SocketAddr::from(([0, 0, 0, 0], 0)))?;
                }
                let port = socket.local_addr()?.port();
                if let Err(e) = deliveries.announce(port, v4) {
                    // A STRICT pod will drop it; anything else is unaffected.
                    warn!(%target, error = %format!("{e:#}"), "cannot announce a delivery");
                }
                let connected = tokio::time::timeout(timeout, connect(socket, target)).await;
                deliveries.delivered(port, v4);
                connected.map_err(|_| ConnectError::TimedOut(timeout))??
            }
            _ => tokio::time::timeout(timeout, connect(socket, target))
                .await
                .map_err(|_| ConnectError::TimedOut(timeout))??,
        };
        let _ = stream.set_nodelay(true);
        Ok((stream, keepalive_for(here, keepalive)))
    }

    /// The socket for a connection to `target` on behalf of `on_behalf`, whether it is bound
    /// already, and whether `target` is an address of the namespace the socket is made in
    /// (loopback, or the pod's own):
    /// - a pod of this node: in its network namespace (its address);
    /// - a workload of another node with a verified address, to a pod of this node: in the
    ///   destination pod's namespace, bound to the caller's address (`IP_TRANSPARENT`), so the
    ///   application sees who called; its port chosen when it connects, unless `port_now`;
    /// - otherwise, and wherever the namespace is not found: in the node's.
    fn socket(
        &self,
        on_behalf: OnBehalfOf<'_>,
        target: SocketAddr,
        port_now: bool,
    ) -> io::Result<(tokio::net::TcpSocket, bool, bool)> {
        let looped = target.ip().is_loopback();
        if let Some(networks) = &self.networks {
            match (on_behalf, target) {
                (OnBehalfOf::Pod(pod), _) => {
                    if let Some(ns) = pod.ip.and_then(|ip| networks.of_pod(ip)) {
                        let own = pod.ip == Some(target.ip());
                        return Ok((ns.tcp_socket(target.is_ipv4())?, false, looped || own));
                    }
                }
                (
                    OnBehalfOf::Peer {
                        source: Some(IpAddr::V4(source)),
                        ..
                    },
                    SocketAddr::V4(v4),
                ) => {
                    if let Some(ns) = networks.of_pod(IpAddr::V4(*v4.ip())) {
                        match ns.prepare_transparent() {
                            Ok(()) => {
                                let socket = ns.transparent_socket(source, port_now)?;
                                return Ok((socket, true, true));
                            }
                            Err(e) => {
                                debug!(%target, error = %e, "no transparent delivery: from the node");
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        let socket = if target.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        Ok((socket, false, looped))
    }
}

/// How long a relay lasts before its upstream socket gets the keepalive it is owed
/// ([`Connector::connect_relayed`]): a first probe then goes at most this much later than
/// [`KEEPALIVE`]'s 180 s of silence.
pub const KEEPALIVE_AFTER: Duration = Duration::from_secs(10);

/// The keepalive a relayed upstream socket is owed, if any ([`Connector::connect_relayed`]).
#[derive(Debug)]
#[must_use = "a relayed socket gets its keepalive only through `arm`"]
pub struct KeepaliveLater(Option<Keepalive>);

impl KeepaliveLater {
    /// Sets the keepalive owed on `socket` once [`KEEPALIVE_AFTER`] has passed; never ends
    /// (race it with the relay, which ends first).
    pub async fn arm(self, socket: &TcpStream) -> String {
        if let Some(keepalive) = self.0 {
            tokio::time::sleep(KEEPALIVE_AFTER).await;
            if let Err(e) = set_keepalive(socket, keepalive) {
                debug!(error = %e, "cannot set keepalive on a relayed connection");
            }
        }
        std::future::pending().await
    }
}

/// Connects `socket` to `target`. What tokio's `TcpSocket::connect` does, but for the
/// `getsockopt(SO_ERROR)` it makes once the socket is writable, on every connection: epoll's
/// own answer tells a failed connection (`EPOLLERR`, `EPOLLHUP`: closed for writing), and the
/// error is read only then. One system call fewer per connection.
pub(crate) async fn connect(
    socket: tokio::net::TcpSocket,
    target: SocketAddr,
) -> io::Result<TcpStream> {
    match socket2::SockRef::from(&socket).connect(&target.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(nix::libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    // SAFETY: the descriptor is `socket`'s, given up by `into_raw_fd`, so owned once.
    let std = unsafe { std::net::TcpStream::from_raw_fd(socket.into_raw_fd()) };
    let stream = TcpStream::from_std(std)?;
    let ready = stream.ready(Interest::WRITABLE).await?;
    if ready.is_write_closed() {
        return Err(stream
            .take_error()?
            .unwrap_or_else(|| io::ErrorKind::ConnectionRefused.into()));
    }
    Ok(stream)
}

/// The keepalive an upstream socket is given: what a DestinationRule asked for, always;
/// otherwise [`KEEPALIVE`], unless the target is an address of the namespace the socket is
/// made in (`here`). Such a peer is this kernel's, reached over the namespace's loopback, and
/// cannot vanish silently: its end is closed, and the FIN or RST sent, when its process exits
/// or is killed, and the namespace lives on while weft's socket holds it. Probes would find
/// nothing, and the four `setsockopt(2)` calls are spared on every connection delivered to a
/// pod from another node.
fn keepalive_for(here: bool, asked: Option<Keepalive>) -> Option<Keepalive> {
    match asked {
        Some(asked) => Some(asked),
        None if here => None,
        None => Some(KEEPALIVE),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connects_and_reports_refusals() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let c = Connector::new(Duration::from_secs(2));
        let s = c.connect(OnBehalfOf::Unidentified, addr).await.unwrap();
        assert!(s.nodelay().unwrap());
        drop(l);
        let e = c.connect(OnBehalfOf::Unidentified, addr).await.unwrap_err();
        assert!(
            matches!(&e, ConnectError::Io(io) if io.kind() == io::ErrorKind::ConnectionRefused),
            "{e}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_relayed_socket_gets_its_keepalive_only_once_the_relay_has_lasted() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let arm = KeepaliveLater(Some(KEEPALIVE)).arm(&s);
        tokio::pin!(arm);
        let short = KEEPALIVE_AFTER - Duration::from_millis(100);
        assert!(tokio::time::timeout(short, &mut arm).await.is_err());
        assert!(
            !socket2::SockRef::from(&s).keepalive().unwrap(),
            "a relay shorter than KEEPALIVE_AFTER pays nothing"
        );
        let more = Duration::from_millis(200);
        assert!(
            tokio::time::timeout(more, &mut arm).await.is_err(),
            "never ends"
        );
        let r = socket2::SockRef::from(&s);
        assert!(r.keepalive().unwrap());
        assert_eq!(r.tcp_keepalive_time().unwrap(), Duration::from_secs(180));
        assert_eq!(r.tcp_keepalive_retries().unwrap(), 9);

        // Nothing owed (a peer in the socket's own namespace): nothing set, ever.
        let s = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let arm = KeepaliveLater(None).arm(&s);
        assert!(tokio::time::timeout(KEEPALIVE_AFTER * 2, arm)
            .await
            .is_err());
        assert!(!socket2::SockRef::from(&s).keepalive().unwrap());
    }

    #[test]
    fn keepalive_unless_the_peer_is_in_the_same_namespace_or_a_rule_asks() {
        let ruled = Keepalive {
            probes: Some(3),
            time: None,
            interval: None,
        };
        assert_eq!(keepalive_for(false, None), Some(KEEPALIVE));
        assert_eq!(keepalive_for(true, None), None);
        assert_eq!(keepalive_for(true, Some(ruled)), Some(ruled));
        assert_eq!(keepalive_for(false, Some(ruled)), Some(ruled));
    }

    #[tokio::test]
    async fn every_socket_has_keepalive_and_accepted_ones_inherit_it() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        set_listening_options(&l).unwrap();
        let addr = l.local_addr().unwrap();
        let c = Connector::new(Duration::from_secs(2));
        let opened = c.connect(OnBehalfOf::Unidentified, addr).await.unwrap();
        let (accepted, _) = l.accept().await.unwrap();
        assert!(opened.nodelay().unwrap(), "no Nagle delay");
        assert!(
            !socket2::SockRef::from(&opened).keepalive().unwrap(),
            "a peer over loopback cannot vanish silently: no probes"
        );
        assert!(accepted.nodelay().unwrap(), "inherited");
        let s = socket2::SockRef::from(&accepted);
        assert!(s.keepalive().unwrap());
        assert_eq!(s.tcp_keepalive_time().unwrap(), Duration::from_secs(180));
        assert_eq!(
            s.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(180)
        );
        assert_eq!(s.tcp_keepalive_retries().unwrap(), 9);
        // A DestinationRule's field wins; the ones it leaves out are weft's.
        let ruled = c
            .connect_with(
                OnBehalfOf::Unidentified,
                addr,
                None,
                Some(Keepalive {
                    probes: None,
                    time: Some(Duration::from_secs(30)),
                    interval: None,
                }),
            )
            .await
            .unwrap();
        let s = socket2::SockRef::from(&ruled);
        assert_eq!(s.tcp_keepalive_time().unwrap(), Duration::from_secs(30));
        assert_eq!(s.tcp_keepalive_retries().unwrap(), 9);
    }

    #[test]
    fn timeouts_say_how_long() {
        assert_eq!(
            ConnectError::TimedOut(Duration::from_millis(1500)).to_string(),
            "connect timed out after 1.5s"
        );
    }
}
