//! A pod's network namespace: found from the processes in the pod's cgroup, and sockets made in
//! it, so that the connections weft opens for a pod leave with the pod's own address (and come
//! under the pod's NetworkPolicy), as a sidecar's would.
//!
//! A socket belongs to the namespace it was created in for its whole life, whichever thread
//! uses it later: [`PodNetns::run`] enters the pod's namespace on the current thread, creates
//! the socket and comes back at once, before anything else runs on that thread.
//!
//! May import: nothing of weft.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::OnceLock;

use nix::sched::{setns, CloneFlags};

/// An open network namespace of a pod.
#[derive(Debug)]
pub struct PodNetns {
    fd: OwnedFd,
    /// Its inode: the namespace's identity.
    inode: u64,
    /// Whether it is set up for transparent deliveries ([`PodNetns::prepare_transparent`]),
    /// once tried.
    transparent: OnceLock<Result<(), String>>,
    /// Sockets made here and not used yet (see [`SOCKETS_PER_VISIT`]).
    spare_v4: parking_lot::Mutex<Vec<socket2::Socket>>,
    spare_v6: parking_lot::Mutex<Vec<socket2::Socket>>,
}

/// The mark of weft's transparent delivery sockets, and of the pod's side of those connections
/// (`tcp_fwmark_accept`): what the pod namespace's routing rule sends back to weft.
pub const DELIVERY_MARK: u32 = 0x57ef;
const DELIVERY_MARK_MASK: u32 = 0xffff;
/// The routing table of that rule: `local 0.0.0.0/0 dev lo`.
pub const DELIVERY_TABLE: u32 = 0x57ef;
/// The rule's priority: before `main` (32766).
const DELIVERY_RULE_PRIORITY: u32 = 32700;

/// weft's own network namespace, where every thread returns after making a socket elsewhere.
fn home() -> io::Result<&'static OwnedFd> {
    static HOME: OnceLock<Result<OwnedFd, i32>> = OnceLock::new();
    match HOME.get_or_init(|| {
        File::open("/proc/self/ns/net")
            .map(OwnedFd::from)
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))
    }) {
        Ok(fd) => Ok(fd),
        Err(errno) => Err(io::Error::from_raw_os_error(*errno)),
    }
}

fn inode_of(path: &Path) -> io::Result<u64> {
    Ok(std::fs::metadata(path)?.ino())
}

impl PodNetns {
    /// The namespace of a process of `cgroup` (a pod's cgroup directory, searched depth first).
    /// `None` when the cgroup has no process yet, or its processes share weft's namespace (a
    /// host-network pod).
    pub fn of_cgroup(cgroup: &Path) -> io::Result<Option<PodNetns>> {
        let Some(pid) = first_pid(cgroup, 4)? else {
            return Ok(None);
        };
        let path = format!("/proc/{pid}/ns/net");
        let file = match File::open(&path) {
            Ok(f) => f,
            // The process left between reading cgroup.procs and opening its namespace.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let inode = file.metadata()?.ino();
        if inode == inode_of(Path::new("/proc/self/ns/net"))? {
            return Ok(None);
        }
        Ok(Some(PodNetns {
            fd: file.into(),
            inode,
            transparent: OnceLock::new(),
            spare_v4: Default::default(),
            spare_v6: Default::default(),
        }))
    }

    pub fn inode(&self) -> u64 {
        self.inode
    }

    /// Runs `f` in this namespace on the current thread, then returns to weft's. A thread that
    /// could not return would make every later socket of it in the pod's namespace: the
    /// process aborts instead.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> io::Result<T> {
        let home = home()?;
        setns(self.fd.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        let out = f();
        if let Err(e) = setns(home.as_fd(), CloneFlags::CLONE_NEWNET) {
            eprintln!("weft: cannot return to the node's network namespace: {e}");
            std::process::abort();
        }
        Ok(out)
    }
}

/// The first process id in `cgroup.procs` of `dir` or of its sub-cgroups, `depth` levels down.
fn first_pid(dir: &Path, depth: u32) -> io::Result<Option<u32>> {
    match std::fs::read_to_string(dir.join("cgroup.procs")) {
        Ok(procs) => {
            if let Some(pid) = procs.lines().find_map(|l| l.trim().parse().ok()) {
                return Ok(Some(pid));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    }
    if depth == 0 {
        return Ok(None);
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(None);
    };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            if let Some(pid) = first_pid(&e.path(), depth - 1)? {
                return Ok(Some(pid));
            }
        }
    }
    Ok(None)
}

/// Sockets made per visit to a pod's namespace: entering and leaving it (two `setns` calls)
/// is what a socket made there costs, so each visit makes a few and keeps the rest for the
/// next connections.
const SOCKETS_PER_VISIT: usize = 8;

impl PodNetns {
    /// A TCP socket (IPv4 or IPv6, non-blocking) in this namespace.
    pub fn tcp_socket(&self, ipv4: bool) -> io::Result<tokio::net::TcpSocket> {
        let socket = self.raw_socket(ipv4)?;
        Ok(tokio::net::TcpSocket::from_std_stream(socket.into()))
    }

    /// A fresh socket of this namespace: one kept from an earlier visit, or made in a new visit
    /// that keeps a few more.
    fn raw_socket(&self, ipv4: bool) -> io::Result<socket2::Socket> {
        let spare = if ipv4 { &self.spare_v4 } else { &self.spare_v6 };
        if let Some(s) = spare.lock().pop() {
            return Ok(s);
        }
        let domain = if ipv4 {
            socket2::Domain::IPV4
        } else {
            socket2::Domain::IPV6
        };
        let mut made = self.run(|| {
            let mut made = Vec::with_capacity(SOCKETS_PER_VISIT);
            for _ in 0..SOCKETS_PER_VISIT {
                match socket2::Socket::new(
                    domain,
                    socket2::Type::STREAM.nonblocking().cloexec(),
                    Some(socket2::Protocol::TCP),
                ) {
                    Ok(s) => made.push(s),
                    Err(e) if made.is_empty() => return Err(e),
                    Err(_) => break,
                }
            }
            Ok(made)
        })??;
        let first = made
            .pop()
            .ok_or_else(|| io::Error::other("no socket made"))?;
        spare.lock().extend(made);
        Ok(first)
    }
}

impl PodNetns {
    /// Sets this namespace up, once, to take deliveries that keep their real source address
    /// (a client on another node): replies of connections marked [`DELIVERY_MARK`] are routed
    /// back to weft's socket instead of out of the pod. As ztunnel's in-pod mode does, without
    /// iptables: `net.ipv4.tcp_fwmark_accept=1` (the pod's accepted socket takes the SYN's
    /// mark), `net.ipv4.fwmark_reflect=1` (so does the kernel's RST from a closed port), the rule `fwmark 0x57ef/0xffff lookup 22511` and the route `local 0.0.0.0/0 dev lo
    /// table 22511`. Nothing else of the pod's traffic carries that mark.
    pub fn prepare_transparent(&self) -> io::Result<()> {
        self.transparent
            .get_or_init(|| {
                self.run(transparent_routing)
                    .and_then(|r| r)
                    .map_err(|e| e.to_string())
            })
            .clone()
            .map_err(io::Error::other)
    }

    /// A TCP socket in this namespace bound to `source` (not an address of the namespace: the
    /// remote client's) with `IP_TRANSPARENT` and [`DELIVERY_MARK`]. Its port is chosen when it
    /// connects, unless `port_now` (a delivery announced by port before it connects): see
    /// [`bind_source`]. Needs [`PodNetns::prepare_transparent`].
    pub fn transparent_socket(
        &self,
        source: std::net::Ipv4Addr,
        port_now: bool,
    ) -> io::Result<tokio::net::TcpSocket> {
        let socket = self.raw_socket(true)?;
        socket.set_ip_transparent_v4(true)?;
        socket.set_mark(DELIVERY_MARK)?;
        bind_source(&socket, source, port_now)?;
        Ok(tokio::net::TcpSocket::from_std_stream(socket.into()))
    }
}

/// Binds `socket` to `source` with its port left to `connect` (`IP_BIND_ADDRESS_NO_PORT`), as
/// an unbound client's is, unless `port_now`. A bind to port 0 takes a port no other socket of
/// that address holds, whatever its destination, and a closed connection's `TIME_WAIT` holds
/// its port for a minute: deliveries from one caller's address ran out of ports (and the
/// kernel's search for a free one grew with every connection in `TIME_WAIT`), where a port
/// chosen at `connect` need only make the four-tuple unique.
fn bind_source(
    socket: &socket2::Socket,
    source: std::net::Ipv4Addr,
    port_now: bool,
) -> io::Result<()> {
    if !port_now {
        nix::sys::socket::setsockopt(
            socket,
            nix::sys::socket::sockopt::IpBindAddressNoPort,
            &true,
        )
        .map_err(io::Error::from)?;
    }
    socket.bind(&std::net::SocketAddr::from((source, 0)).into())
}

/// In the pod's namespace: the sysctl, the rule and the route of
/// [`PodNetns::prepare_transparent`]. Existing ones (weft restarted) are kept.
fn transparent_routing() -> io::Result<()> {
    use netlink_packet_core::{
        NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL,
        NLM_F_REQUEST,
    };
    use netlink_packet_route::route::{
        RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
    };
    use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleHeader, RuleMessage};
    use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
    use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

    std::fs::write("/proc/sys/net/ipv4/tcp_fwmark_accept", "1")?;
    // The kernel's own replies (a RST from a closed port) carry the mark of what they answer,
    // so a refused delivery is refused at once rather than timing out.
    std::fs::write("/proc/sys/net/ipv4/fwmark_reflect", "1")?;

    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;

    let mut rule = RuleMessage::default();
    rule.header = RuleHeader {
        family: AddressFamily::Inet,
        action: RuleAction::ToTable,
        ..Default::default()
    };
    rule.attributes = vec![
        RuleAttribute::Table(DELIVERY_TABLE),
        RuleAttribute::Priority(DELIVERY_RULE_PRIORITY),
        RuleAttribute::FwMark(DELIVERY_MARK),
        RuleAttribute::FwMask(DELIVERY_MARK_MASK),
    ];
    let mut route = RouteMessage::default();
    route.header = RouteHeader {
        address_family: AddressFamily::Inet,
        destination_prefix_length: 0,
        table: 0,
        protocol: RouteProtocol::Boot,
        scope: RouteScope::Host,
        kind: RouteType::Local,
        ..RouteHeader::default()
    };
    route.attributes = vec![
        RouteAttribute::Table(DELIVERY_TABLE),
        // The loopback interface is 1 in every network namespace.
        RouteAttribute::Oif(1),
    ];
    for (seq, message) in [
        RouteNetlinkMessage::NewRule(rule),
        RouteNetlinkMessage::NewRoute(route),
    ]
    .into_iter()
    .enumerate()
    {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL | NLM_F_ACK;
        header.sequence_number = seq as u32 + 1;
        let mut msg = NetlinkMessage::new(header, NetlinkPayload::from(message));
        msg.finalize();
        let mut buf = vec![0; msg.buffer_len()];
        msg.serialize(&mut buf);
        socket.send(&buf, 0)?;
        let mut answer = vec![0; 4096];
        let n = socket.recv(&mut &mut answer[..], 0)?;
        let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&answer[..n])
            .map_err(|e| io::Error::other(format!("netlink answer: {e}")))?;
        if let NetlinkPayload::Error(e) = reply.payload {
            match e.code {
                None => {}
                Some(code) if -code.get() == libc::EEXIST => {}
                Some(code) => return Err(io::Error::from_raw_os_error(-code.get())),
            }
        }
    }
    Ok(())
}

/// The network namespaces of this node's pods, by pod address.
pub trait PodNetworks: Send + Sync + std::fmt::Debug {
    /// The namespace of the pod of this node at `ip`; `None` when there is no such pod or its
    /// namespace cannot be found (no process yet).
    fn of_pod(&self, ip: std::net::IpAddr) -> Option<std::sync::Arc<PodNetns>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In a network namespace of its own with two ephemeral ports (`connect` takes the even
    /// one, a bind to port 0 either): three connections from one source address to three
    /// destinations all share a port chosen at `connect`; bound to port 0 first, the third
    /// finds none.
    #[test]
    fn deliveries_from_one_address_share_ports_across_destinations() {
        let connections = |port_now: bool| {
            std::thread::spawn(move || -> io::Result<usize> {
                nix::sched::unshare(CloneFlags::CLONE_NEWNET)?;
                // This thread's namespace: what it opens and runs is in it.
                std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "40000 40001")?;
                let up = std::process::Command::new("ip")
                    .args(["link", "set", "lo", "up"])
                    .status()?;
                assert!(up.success());
                let listeners: Vec<_> = (5001..=5003)
                    .map(|port| std::net::TcpListener::bind(("127.0.0.1", port)))
                    .collect::<io::Result<_>>()?;
                let mut open = Vec::new();
                for l in &listeners {
                    let socket =
                        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                    let connected = bind_source(&socket, std::net::Ipv4Addr::LOCALHOST, port_now)
                        .and_then(|()| socket.connect(&l.local_addr()?.into()));
                    match connected {
                        Ok(()) => open.push(socket),
                        Err(e) if e.kind() == io::ErrorKind::AddrInUse => break,
                        Err(e) => return Err(e),
                    }
                }
                Ok(open.len())
            })
            .join()
            .unwrap()
        };
        assert_eq!(connections(false).unwrap(), 3, "port chosen at connect");
        assert_eq!(connections(true).unwrap(), 2, "port chosen at bind");
    }

    #[test]
    fn a_cgroup_without_processes_has_no_namespace() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cgroup.procs"), "").unwrap();
        assert!(PodNetns::of_cgroup(dir.path()).unwrap().is_none());
        let missing = dir.path().join("gone");
        assert!(PodNetns::of_cgroup(&missing).unwrap().is_none());
    }

    #[test]
    fn processes_are_found_in_sub_cgroups_and_weft_own_namespace_is_not_a_pods() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cgroup.procs"), "").unwrap();
        let container = dir.path().join("cri-containerd-abc.scope");
        std::fs::create_dir(&container).unwrap();
        std::fs::write(
            container.join("cgroup.procs"),
            format!("{}\n", std::process::id()),
        )
        .unwrap();
        assert_eq!(first_pid(dir.path(), 4).unwrap(), Some(std::process::id()));
        // This process shares weft's (its own) namespace: not a pod namespace.
        assert!(PodNetns::of_cgroup(dir.path()).unwrap().is_none());
    }
}
