//! The maps user space writes and reads while the programs run: who is enrolled, which pods are
//! STRICT, the proxy address and the exclusions, and the original destination of each
//! redirected connection.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::atomic::Ordering;

use anyhow::Context as _;
use aya::maps::{lpm_trie::Key as LpmKey, HashMap as BpfHashMap, IterableMap, MapData, MapError};
use tracing::warn;
use weft_common::{strict_mode, Config, FlowKey, OrigDst, StrictKey};

use super::{ip4_ne, redirect_of, Capture, CaptureConfig, Redirect, StrictMode};

impl Capture {
    /// Make `ENROLLED` contain exactly `ids` (insert missing, delete extra).
    ///
    /// The cgroup this process runs in and its ancestors are never enrolled (they are left out
    /// with a warning): the proxy's own connections must not be redirected to itself.
    pub fn set_enrolled(&self, ids: &HashSet<u64>) -> anyhow::Result<()> {
        let refused: HashSet<u64> = ids.intersection(&self.own_cgroups).copied().collect();
        for id in &refused {
            warn!(
                cgroup_id = id,
                "not enrolling cgroup {id}: this proxy runs in it or below it"
            );
        }
        let ids: HashSet<u64> = ids.difference(&refused).copied().collect();
        let ids = &ids;
        let mut map = self.enrolled.lock();
        let current: HashSet<u64> = map
            .keys()
            .collect::<Result<_, _>>()
            .context("listing ENROLLED")?;
        for id in current.difference(ids) {
            ignore_missing(map.remove(id))
                .with_context(|| format!("removing cgroup {id} from ENROLLED"))?;
        }
        for id in ids.difference(&current) {
            map.insert(id, 1, 0)
                .with_context(|| format!("adding cgroup {id} to ENROLLED"))?;
        }
        Ok(())
    }

    /// Make `STRICT` contain exactly `entries`: `(pod cgroup id, port)` → mode, where port 0 is
    /// the pod's default and a non-zero port overrides it for that port. A pod without entries,
    /// or whose effective mode for a port is [`StrictMode::NotStrict`], accepts everything.
    ///
    /// Tightening changes (new or changed STRICT entries, stale NotStrict overrides) are
    /// applied before loosening ones, so while the map is being updated a connection is never
    /// let through that neither the old nor the new setting would accept. (The other way round,
    /// a dropped SYN is retransmitted by the client; a plaintext connection accepted cannot be
    /// taken back.)
    pub fn set_strict(&self, entries: &HashMap<(u64, u16), StrictMode>) -> anyhow::Result<()> {
        let mut map = self.strict.lock();
        let current: HashMap<(u64, u16), u8> = map
            .iter()
            .map(|kv| kv.map(|(k, v)| ((k.cgroup_id, k.port), v)))
            .collect::<Result<_, _>>()
            .context("listing STRICT")?;
        let key = |&(cgroup_id, port): &(u64, u16)| StrictKey {
            cgroup_id,
            port,
            _pad: [0; 3],
        };
        let upsert = |map: &mut BpfHashMap<MapData, StrictKey, u8>, mode: StrictMode| {
            for (k, m) in entries.iter().filter(|(_, &m)| m == mode) {
                if current.get(k) != Some(&m.to_raw()) {
                    map.insert(key(k), m.to_raw(), 0).with_context(|| {
                        format!("setting cgroup {} port {} to {m:?} in STRICT", k.0, k.1)
                    })?;
                }
            }
            anyhow::Ok(())
        };
        let remove_stale = |map: &mut BpfHashMap<MapData, StrictKey, u8>, strict: bool| {
            for (k, &raw) in &current {
                if (raw != strict_mode::NOT_STRICT) == strict && !entries.contains_key(k) {
                    ignore_missing(map.remove(&key(k))).with_context(|| {
                        format!("removing cgroup {} port {} from STRICT", k.0, k.1)
                    })?;
                }
            }
            anyhow::Ok(())
        };
        // Tighten first, then loosen.
        upsert(&mut map, StrictMode::Strict)?;
        upsert(&mut map, StrictMode::StrictProbe)?;
        remove_stale(&mut map, false)?;
        upsert(&mut map, StrictMode::NotStrict)?;
        remove_stale(&mut map, true)?;
        Ok(())
    }

    /// Makes `NODE_ADDRS` hold exactly `addrs`: the node's own IPv4 addresses, from which a
    /// STRICT pod accepts plaintext on its probe ports ([`StrictMode::StrictProbe`]).
    pub fn set_node_addresses(&self, addrs: &HashSet<Ipv4Addr>) -> anyhow::Result<()> {
        let want: HashSet<u32> = addrs.iter().map(|a| ip4_ne(*a)).collect();
        let mut map = self.node_addrs.lock();
        let current: HashSet<u32> = map
            .keys()
            .collect::<Result<_, _>>()
            .context("listing NODE_ADDRS")?;
        for a in want.difference(&current) {
            map.insert(a, 1, 0).context("adding to NODE_ADDRS")?;
        }
        for a in current.difference(&want) {
            ignore_missing(map.remove(a)).context("removing from NODE_ADDRS")?;
        }
        Ok(())
    }

    /// Tells the ingress program that the socket bound to `local_port` is weft's own
    /// connection to `target` (a pod of this node): a STRICT pod lets its SYN in. Called
    /// between `bind` and `connect`; [`Capture::delivered`] once connected (or failed). The
    /// entry vouches for [`weft_common::DELIVERY_TTL_NS`] at most.
    pub fn announce_delivery(&self, local_port: u16, target: SocketAddrV4) -> anyhow::Result<()> {
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
            .context("reading CLOCK_BOOTTIME")?;
        let ns = now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64;
        self.deliveries
            .lock()
            .insert(delivery_key(local_port, target), ns, 0)
            .context("adding to DELIVERIES")
    }

    /// Removes what [`Capture::announce_delivery`] added.
    pub fn delivered(&self, local_port: u16, target: SocketAddrV4) {
        let _ = self
            .deliveries
            .lock()
            .remove(&delivery_key(local_port, target));
    }

    /// How long ago the latest connect not captured from any of `cgroups` was (the kernel
    /// records one per cgroup while it is not enrolled), forgetting those records. `None`: none
    /// of them connected uncaptured.
    pub fn connected_uncaptured(&self, cgroups: &[u64]) -> Option<std::time::Duration> {
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).ok()?;
        let now = now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64;
        let mut map = self.uncaptured.lock();
        let mut latest: Option<u64> = None;
        for id in cgroups {
            if let Ok(at) = map.get(id, 0) {
                latest = Some(latest.map_or(at, |l| l.max(at)));
                let _ = map.remove(id);
            }
        }
        latest.map(|at| std::time::Duration::from_nanos(now.saturating_sub(at)))
    }

    /// On accept: `peer` = client (pod) address, `local` = our listener address. Takes the
    /// connection's entry out of `BY_TUPLE`: one `BPF_MAP_LOOKUP_AND_DELETE_ELEM` call, without
    /// a lock (the kernel looks up and deletes under the bucket's lock), where a lookup and a
    /// delete would cost two calls per connection. `None` if unknown.
    pub fn take_redirect(&self, peer: SocketAddr, local: SocketAddr) -> Option<Redirect> {
        let key = FlowKey {
            src_ip4: ip4_ne(v4(peer.ip())?),
            dst_ip4: ip4_ne(v4(local.ip())?),
            src_port: peer.port(),
            dst_port: local.port(),
        };
        let fd = self.by_tuple.map().fd().as_fd();
        let taken = if self.take_in_one_call.load(Ordering::Relaxed) {
            match bpf_elem::<FlowKey, OrigDst>(BPF_MAP_LOOKUP_AND_DELETE_ELEM, fd, &key) {
                Err(e) if unsupported(&e) => {
                    warn!("this kernel cannot look up and delete in one call (Linux < 5.14): two calls per connection");
                    self.take_in_one_call.store(false, Ordering::Relaxed);
                    return self.take_redirect(peer, local);
                }
                taken => taken,
            }
        } else {
            bpf_elem::<FlowKey, OrigDst>(BPF_MAP_LOOKUP_ELEM, fd, &key).inspect(|found| {
                if found.is_some() {
                    if let Err(err) = bpf_elem::<FlowKey, OrigDst>(BPF_MAP_DELETE_ELEM, fd, &key) {
                        warn!(%peer, %local, "BY_TUPLE delete failed: {err}");
                    }
                }
            })
        };
        match taken {
            Ok(orig) => orig.map(|orig| redirect_of(&orig)),
            Err(err) => {
                warn!(%peer, %local, "BY_TUPLE lookup failed: {err}");
                None
            }
        }
    }

    /// Writes the exclusion maps, then `CONFIG` (which turns redirection on).
    pub(super) fn write_config(&self, cfg: &CaptureConfig) -> anyhow::Result<()> {
        let mut ports = self.excl_ports.lock();
        let want: HashSet<u16> = cfg.exclude_ports.iter().copied().collect();
        let have: HashSet<u16> = ports
            .keys()
            .collect::<Result<_, _>>()
            .context("listing EXCL_PORTS")?;
        for port in have.difference(&want) {
            ignore_missing(ports.remove(port))
                .with_context(|| format!("removing port {port} from EXCL_PORTS"))?;
        }
        for port in want.difference(&have) {
            ports
                .insert(port, 1, 0)
                .with_context(|| format!("adding port {port} to EXCL_PORTS"))?;
        }
        drop(ports);

        let mut cidrs = self.excl_cidrs.lock();
        let want: HashSet<(u32, u32)> = cfg
            .exclude_cidrs
            .iter()
            .map(|net| {
                let net = net.trunc();
                (u32::from(net.prefix_len()), ip4_ne(net.network()))
            })
            .collect();
        let have: HashSet<(u32, u32)> = cidrs
            .keys()
            .map(|k| k.map(|k| (k.prefix_len(), k.data())))
            .collect::<Result<_, _>>()
            .context("listing EXCL_CIDRS")?;
        for &(len, ip) in have.difference(&want) {
            ignore_missing(cidrs.remove(&LpmKey::new(len, ip))).with_context(|| {
                format!(
                    "removing {}/{len} from EXCL_CIDRS",
                    Ipv4Addr::from(ip.to_ne_bytes())
                )
            })?;
        }
        for &(len, ip) in want.difference(&have) {
            cidrs.insert(&LpmKey::new(len, ip), 1, 0).with_context(|| {
                format!(
                    "adding {}/{len} to EXCL_CIDRS",
                    Ipv4Addr::from(ip.to_ne_bytes())
                )
            })?;
        }
        drop(cidrs);

        let config = Config {
            proxy_ip4: ip4_ne(*cfg.proxy_addr.ip()),
            proxy_port: cfg.proxy_addr.port(),
            _pad: 0,
        };
        self.config
            .lock()
            .set(0, config, 0)
            .context("writing CONFIG")?;

        Ok(())
    }

    /// Looks up the original destination saved by connect4/6 for a socket that has not reached
    /// `ESTABLISHED` yet (diagnostics).
    pub fn pending_by_cookie(&self, cookie: u64) -> Option<Redirect> {
        self.by_cookie
            .lock()
            .get(&cookie, 0)
            .ok()
            .map(|orig| redirect_of(&orig))
    }
}

pub(super) fn delivery_key(local_port: u16, target: SocketAddrV4) -> FlowKey {
    FlowKey {
        src_ip4: 0,
        dst_ip4: ip4_ne(*target.ip()),
        src_port: local_port,
        dst_port: target.port(),
    }
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;

/// The `bpf(2)` attribute of the element commands (`union bpf_attr`'s first variant).
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `bpf(2)` with `attr` as its attribute block: its result, or -1 with `errno` set.
///
/// # Safety
/// Every pointer in `attr` must be valid for what `cmd` reads and writes through it.
unsafe fn sys_bpf<A>(cmd: libc::c_long, attr: &A) -> libc::c_long {
    // SAFETY: the caller vouches for the pointers in `attr`; the kernel reads `size_of::<A>()`
    // bytes of it.
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const A,
            std::mem::size_of::<A>() as libc::c_uint,
        )
    }
}

/// One element command on the map `fd` with `key`: the value it returned (lookups), `None`
/// where the key is not in the map. aya keeps `BPF_MAP_LOOKUP_AND_DELETE_ELEM` to queues and
/// stacks; the kernel does it for hash maps too.
fn bpf_elem<K: Copy, V: Copy>(
    cmd: libc::c_long,
    fd: BorrowedFd<'_>,
    key: &K,
) -> io::Result<Option<V>> {
    let mut value = std::mem::MaybeUninit::<V>::uninit();
    let attr = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        _pad: 0,
        key: key as *const K as u64,
        value: if cmd == BPF_MAP_DELETE_ELEM {
            0
        } else {
            value.as_mut_ptr() as u64
        },
        flags: 0,
    };
    // SAFETY: `attr` points at a key of the map's key size and room for a value of its value
    // size (the map was opened with these types, which aya checks); the kernel reads the key
    // and writes the value before returning.
    let r = unsafe { sys_bpf(cmd, &attr) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOENT) => Ok(None),
            _ => Err(e),
        };
    }
    if cmd == BPF_MAP_DELETE_ELEM {
        return Ok(None);
    }
    // SAFETY: the kernel wrote the value (the call succeeded).
    Ok(Some(unsafe { value.assume_init() }))
}

/// An error saying the kernel does not know the command for this map type.
fn unsupported(e: &io::Error) -> bool {
    // 524: the kernel's ENOTSUPP, which it returns for map types without the operation.
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | 524)
    )
}

fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound | MapError::ElementNotFound) => Ok(()),
        r => r,
    }
}

pub(super) fn count_keys<K>(
    keys: impl Iterator<Item = Result<K, MapError>>,
) -> Result<usize, MapError> {
    let mut n = 0;
    for key in keys {
        key?;
        n += 1;
    }
    Ok(n)
}

/// The IPv4 address of `ip`, also when written IPv4-mapped (a dual-stack socket reports IPv4
/// peers that way).
fn v4(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip.to_canonical() {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hash map of the kernel's, made for the test alone (needs root, like the capture).
    fn hash_map(key_size: u32, value_size: u32) -> std::os::fd::OwnedFd {
        #[repr(C)]
        struct CreateAttr {
            map_type: u32,
            key_size: u32,
            value_size: u32,
            max_entries: u32,
            map_flags: u32,
        }
        let attr = CreateAttr {
            map_type: 1, // BPF_MAP_TYPE_HASH
            key_size,
            value_size,
            max_entries: 16,
            map_flags: 0,
        };
        // SAFETY: BPF_MAP_CREATE reads `attr`; it returns a new descriptor or -1.
        let fd = unsafe { sys_bpf(0, &attr) };
        assert!(fd >= 0, "BPF_MAP_CREATE: {}", io::Error::last_os_error());
        // SAFETY: a descriptor the kernel just returned, owned by nobody else.
        unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) }
    }

    fn insert(fd: BorrowedFd<'_>, key: &FlowKey, value: &OrigDst) {
        let attr = ElemAttr {
            map_fd: fd.as_raw_fd() as u32,
            _pad: 0,
            key: key as *const FlowKey as u64,
            value: value as *const OrigDst as u64,
            flags: 0,
        };
        // SAFETY: BPF_MAP_UPDATE_ELEM reads a key and a value of the map's sizes.
        let r = unsafe { sys_bpf(2, &attr) };
        assert_eq!(r, 0, "BPF_MAP_UPDATE_ELEM: {}", io::Error::last_os_error());
    }

    #[test]
    fn an_entry_is_taken_once_in_one_call_or_two() {
        let map = hash_map(
            std::mem::size_of::<FlowKey>() as u32,
            std::mem::size_of::<OrigDst>() as u32,
        );
        let key = FlowKey {
            src_ip4: 1,
            dst_ip4: 2,
            src_port: 3,
            dst_port: 4,
        };
        let orig = OrigDst {
            cookie: 9,
            cgroup_id: 42,
            ip4: 7,
            port: 80,
            family: 2,
        };
        for take in [BPF_MAP_LOOKUP_AND_DELETE_ELEM, BPF_MAP_LOOKUP_ELEM] {
            insert(map.as_fd(), &key, &orig);
            let taken = bpf_elem::<FlowKey, OrigDst>(take, map.as_fd(), &key).unwrap();
            assert_eq!(taken, Some(orig));
            if take == BPF_MAP_LOOKUP_ELEM {
                // The fallback's second call.
                bpf_elem::<FlowKey, OrigDst>(BPF_MAP_DELETE_ELEM, map.as_fd(), &key).unwrap();
            }
            assert_eq!(
                bpf_elem::<FlowKey, OrigDst>(take, map.as_fd(), &key).unwrap(),
                None,
                "taken once"
            );
        }
        assert!(unsupported(&io::Error::from_raw_os_error(libc::EINVAL)));
        assert!(!unsupported(&io::Error::from_raw_os_error(libc::EPERM)));
    }

    #[test]
    fn mapped_addresses_are_ipv4() {
        assert_eq!(
            v4("::ffff:10.0.0.1".parse().unwrap()),
            Some(Ipv4Addr::new(10, 0, 0, 1))
        );
        assert_eq!(v4("fd00::1".parse().unwrap()), None);
    }
}
