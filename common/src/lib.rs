//! The ABI shared by weft's eBPF programs (`ebpf/`) and the node proxy (`proxy/`).
//!
//! Everything here is `#[repr(C)]`, plain old data, and laid out without implicit padding so
//! that the kernel side and user space agree byte for byte.
//!
//! Byte-order convention, used everywhere in this crate:
//! * IPv4 addresses are `u32` holding the address octets in memory order (network byte order),
//!   exactly as the kernel exposes `user_ip4`, `local_ip4` and `remote_ip4`. In user space
//!   convert with `u32::from_ne_bytes(addr.octets())` and `Ipv4Addr::from(v.to_ne_bytes())`.
//! * Ports are `u16` in **host** byte order.
#![no_std]

/// Names of the maps and programs in the eBPF object. They are also the file names under the
/// bpffs pin directory (`<bpffs>/<name>`).
pub mod names {
    /// Enrolled pod cgroup ids: `HashMap<u64 cgroup id, u8>`.
    pub const ENROLLED: &str = "ENROLLED";
    /// Redirect configuration: `Array<Config>` with one element.
    pub const CONFIG: &str = "CONFIG";
    /// Destination ports never redirected: `HashMap<u16 port, u8>`.
    pub const EXCL_PORTS: &str = "EXCL_PORTS";
    /// Destination CIDRs never redirected: `LpmTrie<u32 ipv4, u8>`.
    pub const EXCL_CIDRS: &str = "EXCL_CIDRS";
    /// Original destination by socket cookie (written by connect4/6): `LruHashMap<u64, OrigDst>`.
    pub const BY_COOKIE: &str = "BY_COOKIE";
    /// Original destination by client 4-tuple (written by sock_ops): `LruHashMap<FlowKey, OrigDst>`.
    pub const BY_TUPLE: &str = "BY_TUPLE";
    /// Redirect events: `RingBuf` of `RedirectEvent`.
    pub const EVENTS: &str = "EVENTS";
    /// Counters, indexed by `Counter`: `PerCpuArray<u64>`.
    pub const STATS: &str = "STATS";
    /// PeerAuthentication mode of pod cgroups (per port, or 0 for the pod's default):
    /// `HashMap<StrictKey, u8 mode>` with `strict_mode::STRICT` / `strict_mode::NOT_STRICT`.
    pub const STRICT: &str = "STRICT";
    /// `FlowKey` (source address 0) → `bpf_ktime_get_boot_ns()` when weft opened it: the
    /// connections weft itself is opening to a pod of this node, which a STRICT pod accepts.
    pub const DELIVERIES: &str = "DELIVERIES";
    /// The node's own IPv4 addresses (network order) → 1: where kubelet probes come from.
    pub const NODE_ADDRS: &str = "NODE_ADDRS";
    /// Cgroup id → `bpf_ktime_get_boot_ns()` of the latest TCP connect made from it while it
    /// was not enrolled: `LruHashMap<u64, u64>`. How weft tells that a new pod connected
    /// before its cgroup was enrolled.
    pub const UNCAPTURED: &str = "UNCAPTURED";

    pub const PROG_CONNECT4: &str = "weft_connect4";
    pub const PROG_CONNECT6: &str = "weft_connect6";
    pub const PROG_SOCK_OPS: &str = "weft_sock_ops";
    /// `cgroup_skb/ingress`: drops plaintext connection attempts to STRICT pods.
    pub const PROG_INGRESS: &str = "weft_ingress";

    /// Prefix of the pinned link of each program: `<bpffs>/link_<program name>`.
    pub const LINK_PIN_PREFIX: &str = "link_";
}

/// How many cgroup ancestor levels the programs walk looking for an enrolled pod cgroup.
pub const MAX_CGROUP_DEPTH: u32 = 16;
/// Capacity of the LRU maps holding original destinations.
pub const ORIG_DST_ENTRIES: u32 = 65_536;
/// Capacity of the enrolled-cgroup map.
pub const ENROLLED_ENTRIES: u32 = 16_384;
/// Capacity of the excluded-ports map.
pub const EXCL_PORTS_ENTRIES: u32 = 1024;
/// Capacity of the excluded-CIDRs trie.
pub const EXCL_CIDRS_ENTRIES: u32 = 1024;
/// Capacity of the PeerAuthentication map (pod defaults plus per-port overrides).
pub const STRICT_ENTRIES: u32 = 32_768;
/// Capacity of the map of connections weft is opening to local pods (one entry per connect in
/// flight, removed once connected; LRU beyond).
pub const DELIVERIES_ENTRIES: u32 = 16_384;
/// How long a `DELIVERIES` entry vouches for a SYN, in nanoseconds: a connect that has not
/// completed by then has failed, and a stale entry must not let a later SYN in.
pub const DELIVERY_TTL_NS: u64 = 10_000_000_000;
/// Capacity of the node-address map.
pub const NODE_ADDRS_ENTRIES: u32 = 256;
/// Capacity of the map of cgroups that connected while not enrolled (LRU).
pub const UNCAPTURED_ENTRIES: u32 = 16_384;
/// Size of the redirect-event ring buffer, in bytes (a power of two, multiple of the page size):
/// 1 638 records of 40 bytes. The proxy maps its data pages twice (their memory counts twice
/// in its RSS) and drains it every 100 ms, and as soon as it is woken: the programs wake it
/// when [`EVENTS_WAKE_BYTES`] are waiting, so a burst of redirects is read while it lasts.
pub const EVENTS_BYTES: u32 = 64 << 10;
/// Bytes waiting in the redirect-event ring at which a program submitting a record wakes the
/// proxy (a quarter of the ring: 410 records). Below it records are submitted without a
/// wake-up, which would cost the connecting pod tens of microseconds per connect.
pub const EVENTS_WAKE_BYTES: u64 = EVENTS_BYTES as u64 / 4;

/// Redirect configuration written by the proxy (element 0 of `CONFIG`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Outbound capture listener address, network byte order. 0 = redirection disabled.
    pub proxy_ip4: u32,
    /// Outbound capture listener port, host byte order.
    pub proxy_port: u16,
    pub _pad: u16,
}

/// The original destination of a redirected connection and who made it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// Socket cookie of the client socket.
    pub cookie: u64,
    /// The enrolled (pod) cgroup id the connecting socket was found under.
    pub cgroup_id: u64,
    /// Original destination IPv4 address, network byte order.
    pub ip4: u32,
    /// Original destination port, host byte order.
    pub port: u16,
    /// `AF_INET` or `AF_INET6` (an IPv4-mapped IPv6 connect).
    pub family: u16,
}

/// The client side 4-tuple of a redirected connection, as the proxy sees it on accept:
/// `src` is the pod's address and ephemeral port, `dst` is the proxy listener.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Client (pod) IPv4 address, network byte order.
    pub src_ip4: u32,
    /// Proxy IPv4 address, network byte order.
    pub dst_ip4: u32,
    /// Client port, host byte order.
    pub src_port: u16,
    /// Proxy port, host byte order.
    pub dst_port: u16,
}

/// Key of `STRICT`: a pod cgroup and one of its ports, or port 0 for the pod's default mode.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct StrictKey {
    /// The pod cgroup id (the cgroup directory's inode number).
    pub cgroup_id: u64,
    /// Destination (pod) port, host byte order; 0 = every port without an entry of its own.
    pub port: u16,
    /// Always zero (map keys are compared byte for byte).
    pub _pad: [u16; 3],
}

/// Values of `STRICT`.
pub mod strict_mode {
    /// PeerAuthentication STRICT: a new plaintext TCP connection is accepted only when weft
    /// opened it (a `DELIVERIES` entry: a mesh delivery) or from loopback; others are dropped
    /// in the kernel.
    pub const STRICT: u8 = 1;
    /// An explicit PERMISSIVE or DISABLE: everything is accepted. Lets a per-port entry
    /// override a STRICT pod default.
    pub const NOT_STRICT: u8 = 2;
    /// STRICT on a port one of the pod's probes targets: also accepted from the node's own
    /// addresses (`NODE_ADDRS`), where the kubelet probes from.
    pub const STRICT_PROBE: u8 = 3;
}

/// One event per redirected `connect()`, sent on the `EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedirectEvent {
    /// `bpf_ktime_get_boot_ns()` at the time of the connect.
    pub boot_ns: u64,
    pub orig: OrigDst,
}

/// Indexes into the `STATS` per-CPU counter array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// connect() calls seen (TCP, IPv4 or IPv4-mapped).
    ConnectSeen = 0,
    /// connect() calls redirected to the proxy.
    Redirected = 1,
    /// Not redirected: no enrolled ancestor cgroup.
    NotEnrolled = 2,
    /// Not redirected: excluded destination (loopback, proxy itself, excluded port or CIDR).
    Excluded = 3,
    /// sock_ops saw an established redirected connection and recorded its 4-tuple.
    TupleRecorded = 4,
    /// A redirect event could not be written to the ring buffer (full).
    EventsDropped = 5,
    /// A new inbound plaintext TCP connection (SYN) to a STRICT pod was dropped (IPv4 or
    /// IPv6).
    StrictDropped = 6,
    /// A native IPv6 TCP connect() from an enrolled pod was refused (EPERM): the proxy has no
    /// IPv6 address to capture it to, and it must not go around the mesh.
    Ipv6Refused = 7,
}

impl Counter {
    pub const COUNT: u32 = 8;
    pub const ALL: [Counter; Counter::COUNT as usize] = [
        Counter::ConnectSeen,
        Counter::Redirected,
        Counter::NotEnrolled,
        Counter::Excluded,
        Counter::TupleRecorded,
        Counter::EventsDropped,
        Counter::StrictDropped,
        Counter::Ipv6Refused,
    ];
    pub const fn name(self) -> &'static str {
        match self {
            Counter::ConnectSeen => "connect_seen",
            Counter::Redirected => "redirected",
            Counter::NotEnrolled => "not_enrolled",
            Counter::Excluded => "excluded",
            Counter::TupleRecorded => "tuple_recorded",
            Counter::EventsDropped => "events_dropped",
            Counter::StrictDropped => "strict_dropped",
            Counter::Ipv6Refused => "ipv6_refused",
        }
    }
}

// The kernel compares map keys byte for byte: no implicit padding anywhere.
const _: () = assert!(core::mem::size_of::<StrictKey>() == 16);

#[cfg(feature = "user")]
mod user {
    // SAFETY: all types are repr(C) plain data with no padding and no invalid bit patterns.
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::RedirectEvent {}
    unsafe impl aya::Pod for super::StrictKey {}
}
