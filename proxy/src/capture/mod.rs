//! Capture: the eBPF side of the data path, seen from user space.
//!
//! [`Capture::attach`] loads the programs built from `ebpf/` (embedded in this binary by
//! `build.rs`), attaches them to the configured cgroup v2 root and pins maps and links under a
//! bpffs directory, so redirection and STRICT enforcement keep working while the proxy restarts:
//!
//! ```text
//! <bpffs>/ENROLLED CONFIG EXCL_PORTS EXCL_CIDRS BY_COOKIE BY_TUPLE EVENTS STATS STRICT    maps
//! <bpffs>/link_weft_connect4 link_weft_connect6 link_weft_sock_ops link_weft_ingress   cgroup links
//! ```
//!
//! A later `attach` with the same directory re-opens the pins instead of re-attaching. Pins
//! that do not describe a working attachment (links detached or attached elsewhere, maps that
//! are not the ones the programs use) are removed and everything is loaded fresh. When the
//! embedded programs differ from the attached ones (a new build), the new programs are attached
//! first and the old links detached after, so no connect goes unseen. A map whose layout this
//! build changed (its type, key, value or size) is made anew, empty, and every program replaced
//! to use it; the other maps keep what they hold, so the pods stay enrolled and STRICT enforced
//! across the upgrade.
//!
//! What the programs do, and the byte orders of the map records, is described in
//! `weft_common` and `ebpf/src/main.rs`.
//!
//! - [`attach`](self::attach): load, pin, attach, re-use or replace pins; `weft uninstall`.
//! - [`maps`]: keeping `ENROLLED`, `STRICT`, `CONFIG` and the exclusions in step; the original
//!   destination of an accepted connection.
//! - [`events`]: the redirect-event ring buffer.
//! - [`status`]: programs, maps and kernel counters for `/status` and `/metrics`.
//!
//! May import: `admin::api` (status types), `config` (defaults), `workload` (cgroup ids).

mod attach;

pub use attach::Removed;
mod events;
mod maps;
mod status;

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::SystemTime;

use aya::maps::{Array, HashMap as BpfHashMap, LpmTrie, MapData, PerCpuArray, RingBuf};
use ipnet::Ipv4Net;
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::watch;
use weft_common::{strict_mode, Config, FlowKey, OrigDst, StrictKey};

use attach::LinkHandle;

/// Where and how to capture.
#[derive(Clone, Debug)]
pub struct CaptureConfig {
    /// cgroup v2 directory the programs are attached to (e.g. the kubelet's `kubepods.slice`).
    pub cgroup_root: PathBuf,
    /// Pin directory, inside a bpffs (e.g. `/sys/fs/bpf/weft`). If its parent is not a bpffs
    /// mount, one is mounted there.
    pub bpffs: PathBuf,
    /// The outbound capture listener: connections are rewritten to this address. Must be a
    /// concrete address pods can reach (not `0.0.0.0`).
    pub proxy_addr: SocketAddrV4,
    /// Destination ports never redirected.
    pub exclude_ports: Vec<u16>,
    /// Destination networks never redirected.
    pub exclude_cidrs: Vec<Ipv4Net>,
}

/// Where a redirected connection was going and who made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Redirect {
    /// The destination the pod connected to. Always an IPv4 address (`SocketAddr::V4`), also
    /// when the pod used an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`).
    pub original_dst: SocketAddr,
    /// The enrolled (pod) cgroup the connecting process lives in or under.
    pub cgroup_id: u64,
    /// Socket cookie of the pod's socket.
    pub cookie: u64,
}

/// A redirected `connect()`, reported by the kernel whether or not the proxy sees the
/// connection.
#[derive(Clone, Debug, Serialize)]
pub struct RedirectEvent {
    pub redirect: Redirect,
    /// When the `connect()` happened (wall clock).
    pub time: SystemTime,
}

/// PeerAuthentication mode of a pod, or of one of its ports (see [`Capture::set_strict`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum StrictMode {
    /// STRICT: new plaintext TCP connections are dropped unless weft opens them (announced
    /// with [`Capture::announce_delivery`]) or they come from loopback.
    Strict,
    /// STRICT on a port a probe of the pod targets: also accepted from the node's addresses
    /// ([`Capture::set_node_addresses`]), where the kubelet probes from.
    StrictProbe,
    /// An explicit PERMISSIVE or DISABLE: everything is accepted. As a per-port entry it
    /// overrides a STRICT pod default.
    NotStrict,
}

impl StrictMode {
    fn to_raw(self) -> u8 {
        match self {
            StrictMode::Strict => strict_mode::STRICT,
            StrictMode::StrictProbe => strict_mode::STRICT_PROBE,
            StrictMode::NotStrict => strict_mode::NOT_STRICT,
        }
    }
}

/// The attached capture programs and their maps. Dropping it keeps everything attached and
/// pinned; [`Capture::detach_and_unpin`] removes it.
pub struct Capture {
    attach_point: PathBuf,
    pin_dir: PathBuf,
    cgroup_id: u64,
    reused_pins: bool,
    links: Vec<LinkHandle>,
    enrolled: Mutex<BpfHashMap<MapData, u64, u8>>,
    config: Mutex<Array<MapData, Config>>,
    excl_ports: Mutex<BpfHashMap<MapData, u16, u8>>,
    excl_cidrs: Mutex<LpmTrie<MapData, u32, u8>>,
    by_cookie: Mutex<BpfHashMap<MapData, u64, OrigDst>>,
    /// Read and emptied once per accepted connection, by every worker at once: no lock (see
    /// [`Capture::take_redirect`]).
    by_tuple: BpfHashMap<MapData, FlowKey, OrigDst>,
    /// Whether the kernel does `BPF_MAP_LOOKUP_AND_DELETE_ELEM` on hash maps (Linux 5.14).
    take_in_one_call: std::sync::atomic::AtomicBool,
    stats: Mutex<PerCpuArray<MapData, u64>>,
    strict: Mutex<BpfHashMap<MapData, StrictKey, u8>>,
    deliveries: Mutex<BpfHashMap<MapData, FlowKey, u64>>,
    node_addrs: Mutex<BpfHashMap<MapData, u32, u8>>,
    uncaptured: Mutex<BpfHashMap<MapData, u64, u64>>,
    events: Mutex<Option<RingBuf<MapData>>>,
    /// `/status` counts map entries through these, never through the handles above.
    status_maps: status::StatusMaps,
    /// Dropped with the `Capture`, which stops the event pump task.
    shutdown: watch::Sender<()>,
    /// The cgroup this process runs in and its ancestors: never enrolled, or the proxy's own
    /// upstream connections would be redirected back to itself.
    own_cgroups: HashSet<u64>,
}

// Other modules share one `Capture` between tasks.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Capture>()
};

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture")
            .field("attach_point", &self.attach_point)
            .field("pin_dir", &self.pin_dir)
            .field("cgroup_id", &self.cgroup_id)
            .field("reused_pins", &self.reused_pins)
            .finish_non_exhaustive()
    }
}

/// An IPv4 address as the kernel programs store it (octets in memory order).
fn ip4_ne(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

fn redirect_of(orig: &OrigDst) -> Redirect {
    Redirect {
        original_dst: SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(orig.ip4.to_ne_bytes()),
            orig.port,
        )),
        cgroup_id: orig.cgroup_id,
        cookie: orig.cookie,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_decodes_network_order_address() {
        let orig = OrigDst {
            cookie: 7,
            cgroup_id: 42,
            ip4: u32::from_ne_bytes([10, 96, 0, 10]),
            port: 8080,
            family: 2,
        };
        assert_eq!(
            redirect_of(&orig),
            Redirect {
                original_dst: "10.96.0.10:8080".parse().unwrap(),
                cgroup_id: 42,
                cookie: 7,
            }
        );
    }
}
