//! weft's kernel side: transparent redirection of enrolled pods' outbound TCP connections to the
//! node proxy, and the bookkeeping that lets the proxy recover where each connection was going.
//!
//! * `weft_connect4` / `weft_connect6` (cgroup `connect4` / `connect6`): for a TCP `connect()` made
//!   by a process below an enrolled pod cgroup, remember the original destination by socket
//!   cookie, emit a redirect event and rewrite the destination to the proxy listener. The proxy
//!   listens on IPv4: a native IPv6 connect from an enrolled pod (other than to `::1`) is refused
//!   with EPERM rather than let around the mesh.
//! * `weft_sock_ops` (`sock_ops`, `ACTIVE_ESTABLISHED`): once the redirected connection is up,
//!   re-key the record by the client 4-tuple, which is what the proxy sees on `accept()`.
//! * `weft_ingress` (`cgroup_skb/ingress`): PeerAuthentication STRICT. Drops the SYN of a new
//!   inbound TCP connection to a STRICT pod unless weft itself is opening it (user space lists
//!   each delivery it is connecting in `DELIVERIES`), it comes from loopback, or it comes from
//!   one of the node's addresses to a port a probe of the pod targets (kubelet probes). The
//!   node's address as such earns nothing: hostNetwork pods and node processes are refused.
//!   Over IPv6, where the proxy never delivers, every SYN but loopback's is dropped.
//!
//! The shared ABI (map names, value layouts, byte orders) lives in `weft-common`.
#![no_std]
#![no_main]

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    bindings::{bpf_sock_addr, bpf_sock_ops, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB},
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_socket_cookie,
        bpf_ktime_get_boot_ns, bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id,
    },
    macros::{cgroup_skb, cgroup_sock_addr, map, sock_ops},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    programs::{SkBuffContext, SockAddrContext, SockOpsContext},
    EbpfContext,
};
use weft_common::{
    strict_mode, Config, Counter, FlowKey, OrigDst, RedirectEvent, StrictKey, DELIVERIES_ENTRIES,
    DELIVERY_TTL_NS, ENROLLED_ENTRIES, EVENTS_BYTES, EVENTS_WAKE_BYTES, EXCL_CIDRS_ENTRIES,
    EXCL_PORTS_ENTRIES, MAX_CGROUP_DEPTH, NODE_ADDRS_ENTRIES, ORIG_DST_ENTRIES, STRICT_ENTRIES,
    UNCAPTURED_ENTRIES,
};

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;

/// Word 2 of an IPv4-mapped IPv6 address (`::ffff:0:0/96`) as the kernel stores it: bytes
/// `00 00 ff ff` in memory order.
const V4MAPPED_WORD2: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// Values returned by cgroup sock_addr programs: 1 lets the `connect()` proceed, 0 fails it
/// with EPERM.
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;

/// Values returned by cgroup_skb programs.
const SKB_PASS: i32 = 1;
const SKB_DROP: i32 = 0;

/// `skb->protocol` of IPv4 packets (also those delivered to AF_INET6 sockets as IPv4-mapped).
const ETH_P_IP: u16 = 0x0800;
/// `skb->protocol` of native IPv6 packets.
const ETH_P_IPV6: u16 = 0x86DD;
/// IPv6 extension headers a TCP header may follow (hop-by-hop, routing, destination options);
/// fragments are reassembled before socket delivery.
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_DEST_OPTS: u8 = 60;
/// Extension headers walked at most before giving up (and dropping, for a STRICT pod).
const IPV6_MAX_EXT: usize = 4;
const IPPROTO_TCP_U8: u8 = 6;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;

/// `BPF_RB_NO_WAKEUP`: submit a ring-buffer record without waking its reader.
const BPF_RB_NO_WAKEUP: u64 = 1;
/// `BPF_RB_FORCE_WAKEUP`: submit a ring-buffer record and wake its reader.
const BPF_RB_FORCE_WAKEUP: u64 = 2;
/// `BPF_RB_AVAIL_DATA`: ask a ring buffer how many bytes wait to be read.
const BPF_RB_AVAIL_DATA: u64 = 0;
#[map(name = "ENROLLED")]
static ENROLLED: HashMap<u64, u8> = HashMap::with_max_entries(ENROLLED_ENTRIES, 0);

#[map(name = "CONFIG")]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map(name = "EXCL_PORTS")]
static EXCL_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(EXCL_PORTS_ENTRIES, 0);

#[map(name = "EXCL_CIDRS")]
static EXCL_CIDRS: LpmTrie<u32, u8> = LpmTrie::with_max_entries(EXCL_CIDRS_ENTRIES, 0);

#[map(name = "BY_COOKIE")]
static BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::with_max_entries(ORIG_DST_ENTRIES, 0);

#[map(name = "BY_TUPLE")]
static BY_TUPLE: LruHashMap<FlowKey, OrigDst> = LruHashMap::with_max_entries(ORIG_DST_ENTRIES, 0);

#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

#[map(name = "STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

#[map(name = "STRICT")]
static STRICT: HashMap<StrictKey, u8> = HashMap::with_max_entries(STRICT_ENTRIES, 0);

#[map(name = "DELIVERIES")]
static DELIVERIES: LruHashMap<FlowKey, u64> = LruHashMap::with_max_entries(DELIVERIES_ENTRIES, 0);

#[map(name = "NODE_ADDRS")]
static NODE_ADDRS: HashMap<u32, u8> = HashMap::with_max_entries(NODE_ADDRS_ENTRIES, 0);

#[map(name = "UNCAPTURED")]
static UNCAPTURED: LruHashMap<u64, u64> = LruHashMap::with_max_entries(UNCAPTURED_ENTRIES, 0);

#[inline(always)]
fn count(counter: Counter) {
    if let Some(slot) = STATS.get_ptr_mut(counter as u32) {
        // SAFETY: the pointer comes from a successful map lookup and stays valid for the whole
        // program run. The slot is this CPU's own (the bpfel target has no atomic RMW in core;
        // a preempted concurrent run on the same CPU could at worst lose one increment).
        unsafe { write_volatile(slot, read_volatile(slot).wrapping_add(1)) };
    }
}

/// The enrolled pod cgroup the current task lives under, if any.
///
/// Walks the ancestors of the task's cgroup from the root down (the helper returns 0 past the
/// task's own level), then the task's own cgroup in case it sits deeper than the walk reaches.
#[inline(always)]
fn enrolled_cgroup() -> Option<u64> {
    // SAFETY: helpers without pointer arguments.
    let current = unsafe { bpf_get_current_cgroup_id() };
    let mut level: u32 = 0;
    while level < MAX_CGROUP_DEPTH {
        // SAFETY: as above.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if id == 0 {
            break;
        }
        if ENROLLED.get_ptr(id).is_some() {
            return Some(id);
        }
        if id == current {
            return None;
        }
        level += 1;
    }
    if ENROLLED.get_ptr(current).is_some() {
        return Some(current);
    }
    None
}

/// Why a destination is not redirected, or `None` to redirect it.
#[inline(always)]
fn excluded(cfg: &Config, ip4: u32, port: u16) -> bool {
    let first_octet = ip4.to_ne_bytes()[0];
    // 127.0.0.0/8 and 0.0.0.0 (which means "this host") never leave the pod.
    if first_octet == 127 || ip4 == 0 {
        return true;
    }
    // The proxy itself (any port): admin, HBONE and the capture listener are reached directly.
    if ip4 == cfg.proxy_ip4 {
        return true;
    }
    if EXCL_PORTS.get_ptr(port).is_some() {
        return true;
    }
    EXCL_CIDRS.get(Key::new(32, ip4)).is_some()
}

/// Decides whether to redirect a TCP connect to `ip4:port`; on success records the original
/// destination and returns the proxy address to rewrite to.
#[inline(always)]
fn redirect<C: EbpfContext>(ctx: &C, ip4: u32, port: u16, family: u16) -> Option<Config> {
    let cfg = *CONFIG.get(0)?;
    if cfg.proxy_ip4 == 0 {
        return None;
    }
    count(Counter::ConnectSeen);
    let Some(cgroup_id) = enrolled_cgroup() else {
        count(Counter::NotEnrolled);
        // When: a new pod that connects before weft has enrolled its cgroup is reported.
        // SAFETY: helpers without pointer arguments.
        let (current, now) = unsafe { (bpf_get_current_cgroup_id(), bpf_ktime_get_boot_ns()) };
        let _ = UNCAPTURED.insert(&current, &now, 0);
        return None;
    };
    if excluded(&cfg, ip4, port) {
        count(Counter::Excluded);
        return None;
    }
    // SAFETY: ctx is the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst {
        cookie,
        cgroup_id,
        ip4,
        port,
        family,
    };
    // If the record cannot be saved the proxy could not tell where the connection was going:
    // leave such a connection alone rather than break it.
    BY_COOKIE.insert(cookie, orig, 0).ok()?;
    match EVENTS.reserve::<RedirectEvent>(0) {
        Some(mut entry) => {
            entry.write(RedirectEvent {
                // SAFETY: helper without arguments.
                boot_ns: unsafe { bpf_ktime_get_boot_ns() },
                orig,
            });
            // Waking the reader on every connect would cost the connecting pod tens of
            // microseconds: the proxy drains the ring on a timer, and is woken only when a
            // burst has filled a quarter of it (the record just reserved counts).
            let wake = if EVENTS.query(BPF_RB_AVAIL_DATA) >= EVENTS_WAKE_BYTES {
                BPF_RB_FORCE_WAKEUP
            } else {
                BPF_RB_NO_WAKEUP
            };
            entry.submit(wake);
        }
        None => count(Counter::EventsDropped),
    }
    count(Counter::Redirected);
    Some(cfg)
}

#[inline(always)]
fn is_tcp(sa: *const bpf_sock_addr) -> bool {
    // SAFETY: `sa` is the context pointer; 32-bit loads of documented fields.
    unsafe {
        read_volatile(addr_of!((*sa).type_)) == SOCK_STREAM
            && read_volatile(addr_of!((*sa).protocol)) == IPPROTO_TCP
    }
}

#[cgroup_sock_addr(connect4)]
pub fn weft_connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    if !is_tcp(sa) {
        return ALLOW;
    }
    // SAFETY: context field loads and stores, one 32-bit access at a time.
    unsafe {
        let ip4 = read_volatile(addr_of!((*sa).user_ip4));
        // user_port holds the port in network order in its low 16 bits.
        let port = u16::from_be(read_volatile(addr_of!((*sa).user_port)) as u16);
        if let Some(cfg) = redirect(&ctx, ip4, port, AF_INET) {
            write_volatile(addr_of_mut!((*sa).user_ip4), cfg.proxy_ip4);
            write_volatile(
                addr_of_mut!((*sa).user_port),
                u32::from(cfg.proxy_port.to_be()),
            );
        }
    }
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn weft_connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    if !is_tcp(sa) {
        return ALLOW;
    }
    // SAFETY: context field loads and stores, one 32-bit access at a time.
    unsafe {
        let w0 = read_volatile(addr_of!((*sa).user_ip6[0]));
        let w1 = read_volatile(addr_of!((*sa).user_ip6[1]));
        let w2 = read_volatile(addr_of!((*sa).user_ip6[2]));
        if w0 != 0 || w1 != 0 || w2 != V4MAPPED_WORD2 {
            // Native IPv6: the proxy listens on IPv4 only, so an enrolled pod's connection
            // cannot be captured; refused rather than let around the mesh.
            let w3 = read_volatile(addr_of!((*sa).user_ip6[3]));
            return native_ipv6_connect(w0, w1, w2, w3);
        }
        let ip4 = read_volatile(addr_of!((*sa).user_ip6[3]));
        let port = u16::from_be(read_volatile(addr_of!((*sa).user_port)) as u16);
        if let Some(cfg) = redirect(&ctx, ip4, port, AF_INET6) {
            // Words 0..2 already hold ::ffff: — only the IPv4 part and the port change.
            write_volatile(addr_of_mut!((*sa).user_ip6[3]), cfg.proxy_ip4);
            write_volatile(
                addr_of_mut!((*sa).user_port),
                u32::from(cfg.proxy_port.to_be()),
            );
        }
    }
    ALLOW
}

/// A native IPv6 `connect()` to `w0:w1:w2:…` (words in memory order): refused for an enrolled
/// pod once the proxy is configured, except to loopback (`::1`), which never leaves the pod.
#[inline(always)]
fn native_ipv6_connect(w0: u32, w1: u32, w2: u32, w3: u32) -> i32 {
    // `::1` (last word's bytes 00 00 00 01) and `::` (this host) never leave the pod.
    let local =
        w0 == 0 && w1 == 0 && w2 == 0 && (w3 == 0 || w3 == u32::from_ne_bytes([0, 0, 0, 1]));
    if local {
        return ALLOW;
    }
    if !CONFIG.get(0).is_some_and(|cfg| cfg.proxy_ip4 != 0) {
        return ALLOW;
    }
    if enrolled_cgroup().is_none() {
        return ALLOW;
    }
    count(Counter::Ipv6Refused);
    REFUSE
}

/// The IPv4 address of one end of a sock_ops socket: `ip4` for AF_INET, the embedded IPv4 of an
/// IPv4-mapped address for AF_INET6.
#[inline(always)]
fn sock_ops_ip4(family: u32, ip4: u32, ip6: [u32; 4]) -> Option<u32> {
    if family == u32::from(AF_INET) {
        return Some(ip4);
    }
    if family == u32::from(AF_INET6) && ip6[0] == 0 && ip6[1] == 0 && ip6[2] == V4MAPPED_WORD2 {
        return Some(ip6[3]);
    }
    None
}

#[sock_ops]
pub fn weft_sock_ops(ctx: SockOpsContext) -> u32 {
    let ops: *const bpf_sock_ops = ctx.ops;
    // SAFETY: `ops` is the context pointer.
    if unsafe { read_volatile(addr_of!((*ops).op)) } != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        return 1;
    }
    // SAFETY: ctx is the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the map value is copied out right away.
    let Some(orig) = (unsafe { BY_COOKIE.get(cookie) }).copied() else {
        return 1;
    };
    // Every field is read with its own fixed-offset 32-bit load, whatever the family: the
    // verifier rejects context accesses through a computed pointer, which is what the compiler
    // makes of "read this field or that one".
    // SAFETY: context field loads.
    let (family, local_ip4, remote_ip4, local_ip6, remote_ip6, local_port, remote_port) = unsafe {
        (
            read_volatile(addr_of!((*ops).family)),
            read_volatile(addr_of!((*ops).local_ip4)),
            read_volatile(addr_of!((*ops).remote_ip4)),
            [
                read_volatile(addr_of!((*ops).local_ip6[0])),
                read_volatile(addr_of!((*ops).local_ip6[1])),
                read_volatile(addr_of!((*ops).local_ip6[2])),
                read_volatile(addr_of!((*ops).local_ip6[3])),
            ],
            [
                read_volatile(addr_of!((*ops).remote_ip6[0])),
                read_volatile(addr_of!((*ops).remote_ip6[1])),
                read_volatile(addr_of!((*ops).remote_ip6[2])),
                read_volatile(addr_of!((*ops).remote_ip6[3])),
            ],
            read_volatile(addr_of!((*ops).local_port)),
            read_volatile(addr_of!((*ops).remote_port)),
        )
    };
    let (Some(src_ip4), Some(dst_ip4)) = (
        sock_ops_ip4(family, local_ip4, local_ip6),
        sock_ops_ip4(family, remote_ip4, remote_ip6),
    ) else {
        return 1;
    };
    let key = FlowKey {
        src_ip4,
        dst_ip4,
        // local_port is in host order; remote_port carries the network-order port in its upper
        // 16 bits on little-endian kernels (the 16-bit field is shifted into place).
        src_port: local_port as u16,
        dst_port: u16::from_be(remote_port_be(remote_port)),
    };
    if BY_TUPLE.insert(key, orig, 0).is_ok() {
        let _ = BY_COOKIE.remove(cookie);
        count(Counter::TupleRecorded);
    }
    1
}

/// The network-order port out of `bpf_sock_ops.remote_port`.
#[inline(always)]
fn remote_port_be(v: u32) -> u16 {
    #[cfg(target_endian = "little")]
    {
        (v >> 16) as u16
    }
    #[cfg(target_endian = "big")]
    {
        v as u16
    }
}

#[cgroup_skb(ingress)]
pub fn weft_ingress(ctx: SkBuffContext) -> i32 {
    if strict_refused(&ctx) {
        count(Counter::StrictDropped);
        return SKB_DROP;
    }
    SKB_PASS
}

/// Whether an inbound packet opens a plaintext connection that a STRICT pod must refuse: an
/// IPv4 TCP SYN (ACK clear, so replies to the pod's own connections never qualify) to a pod
/// whose effective mode for the destination port is STRICT, that weft is not opening itself
/// (`DELIVERIES`), not from loopback, and not a probe (from a node address to a probe port).
/// Anything that cannot be parsed passes.
#[inline(always)]
fn strict_refused(ctx: &SkBuffContext) -> bool {
    // IPv4 packets, whatever the socket family: IPv4-mapped traffic on AF_INET6 sockets too.
    let protocol = u16::from_be(ctx.skb.protocol() as u16);
    if protocol == ETH_P_IPV6 {
        return strict_refused_ipv6(ctx);
    }
    if protocol != ETH_P_IP {
        return false;
    }
    // At cgroup ingress the packet starts at the network header.
    let Ok(ip) = ctx.load::<[u8; 20]>(0) else {
        return false;
    };
    if ip[0] >> 4 != 4 || ip[9] != IPPROTO_TCP_U8 {
        return false;
    }
    // Fragments are reassembled before socket delivery; a non-first one has no TCP header.
    if (ip[6] & 0x1f) != 0 || ip[7] != 0 {
        return false;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ihl < 20 {
        return false;
    }
    // Ports (bytes 0..4) and flags (byte 13) of the TCP header.
    let Ok(tcp) = ctx.load::<[u8; 14]>(ihl) else {
        return false;
    };
    if tcp[13] & (TCP_FLAG_SYN | TCP_FLAG_ACK) != TCP_FLAG_SYN {
        return false;
    }
    let src = u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]);
    if ip[12] == 127 {
        return false;
    }
    let port = u16::from_be_bytes([tcp[2], tcp[3]]);
    let mode = match strict_mode_of(ctx, port) {
        Some(m) if m == strict_mode::STRICT || m == strict_mode::STRICT_PROBE => m,
        _ => return false,
    };
    // weft's own delivery, announced before its connect.
    let key = FlowKey {
        src_ip4: 0,
        dst_ip4: u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]),
        src_port: u16::from_be_bytes([tcp[0], tcp[1]]),
        dst_port: port,
    };
    // SAFETY: the map value is copied out right away.
    if let Some(opened) = unsafe { DELIVERIES.get(&key) }.copied() {
        // SAFETY: helper without arguments.
        let now = unsafe { bpf_ktime_get_boot_ns() };
        if now.wrapping_sub(opened) < DELIVERY_TTL_NS {
            return false;
        }
    }
    // A kubelet probe: from the node, to a port a probe targets.
    if mode == strict_mode::STRICT_PROBE && NODE_ADDRS.get_ptr(&src).is_some() {
        return false;
    }
    true
}

/// [`strict_refused`] for native IPv6: the proxy never delivers over IPv6, so any SYN from
/// elsewhere than loopback to a STRICT port is plaintext from outside the mesh. A TCP header
/// behind more extension headers than are walked counts as a SYN (fail closed).
#[inline(always)]
fn strict_refused_ipv6(ctx: &SkBuffContext) -> bool {
    let Ok(ip) = ctx.load::<[u8; 40]>(0) else {
        return false;
    };
    if ip[0] >> 4 != 6 {
        return false;
    }
    // Source ::1.
    if ip[8..23].iter().all(|b| *b == 0) && ip[23] == 1 {
        return false;
    }
    let mut next = ip[6];
    let mut offset = 40usize;
    let mut ext = 0;
    while next != IPPROTO_TCP_U8 {
        if ext == IPV6_MAX_EXT
            || !(next == IPV6_HOP_BY_HOP || next == IPV6_ROUTING || next == IPV6_DEST_OPTS)
        {
            // Not TCP (or not found): only TCP is refused.
            return ext == IPV6_MAX_EXT
                && matches!(
                    strict_mode_of(ctx, 0),
                    Some(strict_mode::STRICT | strict_mode::STRICT_PROBE)
                );
        }
        let Ok(h) = ctx.load::<[u8; 2]>(offset) else {
            return false;
        };
        next = h[0];
        offset += (usize::from(h[1]) + 1) * 8;
        ext += 1;
    }
    let Ok(tcp) = ctx.load::<[u8; 14]>(offset) else {
        return false;
    };
    if tcp[13] & (TCP_FLAG_SYN | TCP_FLAG_ACK) != TCP_FLAG_SYN {
        return false;
    }
    let port = u16::from_be_bytes([tcp[2], tcp[3]]);
    matches!(
        strict_mode_of(ctx, port),
        Some(strict_mode::STRICT | strict_mode::STRICT_PROBE)
    )
}

/// The PeerAuthentication mode for `port` of the pod the receiving socket lives under: the first
/// ancestor of the socket's cgroup, from the root down, with an entry for that port or a default
/// (port 0) entry. `None` when no ancestor has one.
#[inline(always)]
fn strict_mode_of(ctx: &SkBuffContext, port: u16) -> Option<u8> {
    let skb = ctx.skb.skb;
    // SAFETY: helpers taking the program's own context.
    let current = unsafe { bpf_skb_cgroup_id(skb) };
    if current == 0 {
        return None;
    }
    let mut level: u32 = 0;
    while level < MAX_CGROUP_DEPTH {
        // SAFETY: as above.
        let id = unsafe { bpf_skb_ancestor_cgroup_id(skb, level as i32) };
        if id == 0 {
            break;
        }
        if let Some(mode) = strict_entry(id, port) {
            return Some(mode);
        }
        if id == current {
            return None;
        }
        level += 1;
    }
    strict_entry(current, port)
}

/// The `STRICT` entry of `cgroup_id` for `port`, else its default (port 0) entry.
#[inline(always)]
fn strict_entry(cgroup_id: u64, port: u16) -> Option<u8> {
    let mut key = StrictKey {
        cgroup_id,
        port,
        _pad: [0; 3],
    };
    // SAFETY: the map values are copied out right away.
    if let Some(mode) = unsafe { STRICT.get(&key) } {
        return Some(*mode);
    }
    key.port = 0;
    unsafe { STRICT.get(&key) }.copied()
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// Only helpers without GPL restrictions are used; the object carries the project's license.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 11] = *b"Apache-2.0\0";
