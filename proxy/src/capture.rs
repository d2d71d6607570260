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
//! that do not describe a working attachment (links detached or attached elsewhere, maps with
//! another layout, maps that are not the ones the programs use) are removed and everything is
//! loaded fresh. When the embedded programs differ from the attached ones (a new build), the new
//! programs are attached first and the old links detached after, so no connect goes unseen.
//!
//! What the programs do, and the byte orders of the map records, is described in
//! `weft_common` and `ebpf/src/main.rs`.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    ffi::CString,
    fs::{self, File},
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    os::{
        fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::{ffi::OsStrExt, fs::MetadataExt},
    },
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard, PoisonError},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context as _};
use aya::{
    maps::{
        lpm_trie::Key as LpmKey, Array, HashMap as BpfHashMap, LpmTrie, Map, MapData, MapError,
        MapInfo, MapType, PerCpuArray, RingBuf,
    },
    programs::{
        links::FdLink, loaded_programs, CgroupAttachMode, CgroupSkb, CgroupSockAddr, Program,
        SockOps,
    },
    Ebpf, EbpfLoader,
};
use ipnet::Ipv4Net;
use serde::Serialize;
use tokio::{
    io::{unix::AsyncFd, Interest},
    sync::{mpsc, watch},
};
use tracing::{debug, info, warn};
use weft_common::{
    names, strict_mode, Config, Counter, FlowKey, OrigDst, RedirectEvent as RawEvent, StrictKey,
    ENROLLED_ENTRIES, EVENTS_BYTES, EXCL_CIDRS_ENTRIES, EXCL_PORTS_ENTRIES, ORIG_DST_ENTRIES,
    STRICT_ENTRIES,
};

/// The eBPF object built by `build.rs` from `ebpf/`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weft"));

/// Default pin directory (a bpffs is mounted on its parent if needed).
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/weft";

/// Capacity of the channel returned by [`Capture::events`]. When the consumer falls behind, the
/// kernel ring buffer fills up and the programs count `events_dropped`.
const EVENT_CHANNEL: usize = 4096;
/// How often the redirect-event ring buffer is drained.
const EVENTS_DRAIN_EVERY: Duration = Duration::from_millis(100);

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

// bpf(2) commands and attach types used directly (aya 0.14 has no API for them).
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_DETACH: libc::c_long = 34;
const BPF_CGROUP_INET_INGRESS: u32 = 0;
const BPF_CGROUP_SOCK_OPS: u32 = 3;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
const BPF_CGROUP_INET6_CONNECT: u32 = 11;

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
    /// STRICT: new plaintext TCP connections from anywhere but the node's own address (the
    /// proxy's address: mesh deliveries and kubelet probes) or loopback are dropped.
    Strict,
    /// An explicit PERMISSIVE or DISABLE: everything is accepted. As a per-port entry it
    /// overrides a STRICT pod default.
    NotStrict,
}

impl StrictMode {
    fn to_raw(self) -> u8 {
        match self {
            StrictMode::Strict => strict_mode::STRICT,
            StrictMode::NotStrict => strict_mode::NOT_STRICT,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ProgramStatus {
    pub name: String,
    /// The program's link is attached to the capture cgroup.
    pub attached: bool,
    /// Kernel program id (as shown by `bpftool prog`), 0 if unknown.
    pub id: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct MapStatus {
    pub name: String,
    /// Number of entries; for the ring buffer, 0.
    pub entries: usize,
    /// Capacity; for the ring buffer, its size in bytes.
    pub max_entries: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct CaptureStatus {
    pub attach_point: PathBuf,
    pub pin_path: PathBuf,
    pub programs: Vec<ProgramStatus>,
    pub maps: Vec<MapStatus>,
    /// Kernel-side counters (`Counter::name()` → sum over CPUs).
    pub counters: BTreeMap<String, u64>,
    /// The links found pinned from a previous run were kept (redirection never stopped).
    pub reused_pins: bool,
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
    by_tuple: Mutex<BpfHashMap<MapData, FlowKey, OrigDst>>,
    stats: Mutex<PerCpuArray<MapData, u64>>,
    strict: Mutex<BpfHashMap<MapData, StrictKey, u8>>,
    events: Mutex<Option<RingBuf<MapData>>>,
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

/// One program of the object and how it is attached.
struct ProgSpec {
    name: &'static str,
    /// `enum bpf_attach_type` value of its cgroup link.
    attach_type: u32,
}

const PROGRAMS: [ProgSpec; 4] = [
    ProgSpec {
        name: names::PROG_CONNECT4,
        attach_type: BPF_CGROUP_INET4_CONNECT,
    },
    ProgSpec {
        name: names::PROG_CONNECT6,
        attach_type: BPF_CGROUP_INET6_CONNECT,
    },
    ProgSpec {
        name: names::PROG_SOCK_OPS,
        attach_type: BPF_CGROUP_SOCK_OPS,
    },
    ProgSpec {
        name: names::PROG_INGRESS,
        attach_type: BPF_CGROUP_INET_INGRESS,
    },
];

/// The layout every map must have, checked before re-using a pinned map.
struct MapSpec {
    name: &'static str,
    map_type: MapType,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
}

fn map_specs() -> [MapSpec; 9] {
    use std::mem::size_of;
    let spec = |name, map_type, key_size: usize, value_size: usize, max_entries| MapSpec {
        name,
        map_type,
        key_size: key_size as u32,
        value_size: value_size as u32,
        max_entries,
    };
    [
        spec(
            names::ENROLLED,
            MapType::Hash,
            size_of::<u64>(),
            size_of::<u8>(),
            ENROLLED_ENTRIES,
        ),
        spec(names::CONFIG, MapType::Array, 4, size_of::<Config>(), 1),
        spec(
            names::EXCL_PORTS,
            MapType::Hash,
            size_of::<u16>(),
            size_of::<u8>(),
            EXCL_PORTS_ENTRIES,
        ),
        spec(
            names::EXCL_CIDRS,
            MapType::LpmTrie,
            size_of::<LpmKey<u32>>(),
            size_of::<u8>(),
            EXCL_CIDRS_ENTRIES,
        ),
        spec(
            names::BY_COOKIE,
            MapType::LruHash,
            size_of::<u64>(),
            size_of::<OrigDst>(),
            ORIG_DST_ENTRIES,
        ),
        spec(
            names::BY_TUPLE,
            MapType::LruHash,
            size_of::<FlowKey>(),
            size_of::<OrigDst>(),
            ORIG_DST_ENTRIES,
        ),
        spec(names::EVENTS, MapType::RingBuf, 0, 0, EVENTS_BYTES),
        spec(
            names::STATS,
            MapType::PerCpuArray,
            4,
            size_of::<u64>(),
            Counter::COUNT,
        ),
        spec(
            names::STRICT,
            MapType::Hash,
            size_of::<StrictKey>(),
            size_of::<u8>(),
            STRICT_ENTRIES,
        ),
    ]
}

impl Capture {
    /// Mounts bpffs at `cfg.bpffs`'s parent if nothing is mounted there, creates the pin
    /// directory, then either re-opens the pinned maps and links of a previous run or loads the
    /// object, pins its maps, attaches the four programs to `cfg.cgroup_root` and pins the
    /// links. Finally writes `CONFIG` and the exclusion maps from `cfg`.
    pub fn attach(cfg: &CaptureConfig) -> anyhow::Result<Capture> {
        validate(cfg)?;
        ensure_bpffs(&cfg.bpffs)?;
        fs::create_dir_all(&cfg.bpffs)
            .with_context(|| format!("creating pin directory {}", cfg.bpffs.display()))?;
        // Serialise attaches sharing one pin directory.
        let _lock = DirLock::exclusive(&cfg.bpffs)?;

        let cgroup = File::open(&cfg.cgroup_root)
            .with_context(|| format!("opening cgroup {}", cfg.cgroup_root.display()))?;
        if fs_magic(&cfg.cgroup_root)? != CGROUP2_SUPER_MAGIC {
            bail!(
                "{} is not a cgroup v2 directory (only the unified hierarchy is supported)",
                cfg.cgroup_root.display()
            );
        }
        let cgroup_id = cgroup
            .metadata()
            .with_context(|| format!("stat {}", cfg.cgroup_root.display()))?
            .ino();

        let pin_dir = cfg.bpffs.clone();
        let mut existing = match inspect_pins(&pin_dir, cgroup_id) {
            Ok(existing) => existing,
            Err(err) => {
                warn!(
                    pin_dir = %pin_dir.display(),
                    "pinned capture state is unusable, removing it and loading fresh: {err:#}"
                );
                remove_pins(&pin_dir, false)?;
                no_links()
            }
        };

        let mut loader = EbpfLoader::new();
        let specs = map_specs();
        let map_pins: Vec<PathBuf> = specs.iter().map(|s| pin_dir.join(s.name)).collect();
        for (spec, path) in specs.iter().zip(&map_pins) {
            loader.map_pin_path(spec.name, path.as_path());
        }
        let mut ebpf = loader.load(EBPF_OBJECT).with_context(|| {
            format!(
                "loading the eBPF object (maps pinned in {})",
                pin_dir.display()
            )
        })?;

        let mut capture = Capture {
            attach_point: cfg.cgroup_root.clone(),
            pin_dir: pin_dir.clone(),
            cgroup_id,
            reused_pins: false,
            links: Vec::with_capacity(PROGRAMS.len()),
            enrolled: Mutex::new(take_map(&mut ebpf, names::ENROLLED)?),
            config: Mutex::new(take_map(&mut ebpf, names::CONFIG)?),
            excl_ports: Mutex::new(take_map(&mut ebpf, names::EXCL_PORTS)?),
            excl_cidrs: Mutex::new(take_map(&mut ebpf, names::EXCL_CIDRS)?),
            by_cookie: Mutex::new(take_map(&mut ebpf, names::BY_COOKIE)?),
            by_tuple: Mutex::new(take_map(&mut ebpf, names::BY_TUPLE)?),
            stats: Mutex::new(take_map(&mut ebpf, names::STATS)?),
            strict: Mutex::new(take_map(&mut ebpf, names::STRICT)?),
            events: Mutex::new(Some(take_map(&mut ebpf, names::EVENTS)?)),
            shutdown: watch::channel(()).0,
            own_cgroups: own_cgroup_ids().unwrap_or_else(|err| {
                warn!("cannot tell which cgroup this process is in: {err:#}");
                HashSet::new()
            }),
        };

        // Configuration first: a freshly attached program must not redirect before the
        // exclusions are in place.
        capture.write_config(cfg)?;

        let mut reused = 0;
        for (spec, old) in PROGRAMS.iter().zip(existing.iter_mut()) {
            let pin = link_pin_path(&pin_dir, spec.name);
            let program = ebpf
                .program_mut(spec.name)
                .with_context(|| format!("program {} missing from the eBPF object", spec.name))?;
            load_program(program).with_context(|| format!("loading program {}", spec.name))?;
            let tag = program
                .info()
                .with_context(|| format!("reading info of program {}", spec.name))?
                .tag();
            if let Some(old) = old.take() {
                let old_tag = old.info()?.prog_tag;
                if old_tag == tag {
                    debug!(program = spec.name, pin = %pin.display(), "re-using pinned link");
                    capture.links.push(old);
                    reused += 1;
                    continue;
                }
                info!(
                    program = spec.name,
                    "attached program differs from this build ({old_tag:016x} != {tag:016x}), replacing it"
                );
                // Attach the new program before detaching the old one.
                let new_link = attach_program(program, &cgroup).with_context(|| {
                    format!(
                        "attaching program {} to {}",
                        spec.name,
                        cfg.cgroup_root.display()
                    )
                })?;
                old.detach()
                    .with_context(|| format!("detaching old link {}", pin.display()))?;
                remove_file_if_exists(&pin)?;
                capture.links.push(pin_link(new_link, &pin, spec)?);
            } else {
                remove_file_if_exists(&pin)?;
                let new_link = attach_program(program, &cgroup).with_context(|| {
                    format!(
                        "attaching program {} to {}",
                        spec.name,
                        cfg.cgroup_root.display()
                    )
                })?;
                capture.links.push(pin_link(new_link, &pin, spec)?);
            }
        }
        capture.reused_pins = reused == PROGRAMS.len();
        let reused_pins = capture.reused_pins;
        // The programs stay loaded through their links; the rest of the object can go.
        drop(ebpf);
        for link in &capture.links {
            let info = link.info()?;
            if info.cgroup_id != cgroup_id {
                bail!(
                    "link {} is not attached to {} after attach",
                    link.pin.display(),
                    cfg.cgroup_root.display()
                );
            }
        }
        info!(
            cgroup = %cfg.cgroup_root.display(),
            pin_dir = %pin_dir.display(),
            proxy = %cfg.proxy_addr,
            reused_pins,
            "capture attached"
        );
        Ok(capture)
    }

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
        let mut map = lock(&self.enrolled);
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
        let mut map = lock(&self.strict);
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
                if (raw == strict_mode::STRICT) == strict && !entries.contains_key(k) {
                    ignore_missing(map.remove(&key(k))).with_context(|| {
                        format!("removing cgroup {} port {} from STRICT", k.0, k.1)
                    })?;
                }
            }
            anyhow::Ok(())
        };
        // Tighten first, then loosen.
        upsert(&mut map, StrictMode::Strict)?;
        remove_stale(&mut map, false)?;
        upsert(&mut map, StrictMode::NotStrict)?;
        remove_stale(&mut map, true)?;
        Ok(())
    }

    /// On accept: `peer` = client (pod) address, `local` = our listener address. Looks the
    /// connection up in `BY_TUPLE` and deletes the entry. `None` if unknown.
    pub fn take_redirect(&self, peer: SocketAddr, local: SocketAddr) -> Option<Redirect> {
        let key = FlowKey {
            src_ip4: ip4_ne(v4(peer.ip())?),
            dst_ip4: ip4_ne(v4(local.ip())?),
            src_port: peer.port(),
            dst_port: local.port(),
        };
        let mut map = lock(&self.by_tuple);
        let orig = match map.get(&key, 0) {
            Ok(orig) => orig,
            Err(MapError::KeyNotFound) => return None,
            Err(err) => {
                warn!(%peer, %local, "BY_TUPLE lookup failed: {err}");
                return None;
            }
        };
        if let Err(err) = ignore_missing(map.remove(&key)) {
            warn!(%peer, %local, "BY_TUPLE delete failed: {err}");
        }
        Some(redirect_of(&orig))
    }

    /// Redirect events from the ring buffer, delivered on a tokio mpsc channel by a background
    /// task. Must be called from within a tokio runtime, once. The task ends when the receiver
    /// or the `Capture` is dropped.
    pub fn events(&self) -> anyhow::Result<mpsc::Receiver<RedirectEvent>> {
        let handle = tokio::runtime::Handle::try_current()
            .context("Capture::events must be called from within a tokio runtime")?;
        let ring = lock(&self.events)
            .take()
            .context("Capture::events was already called")?;
        let _enter = handle.enter();
        // SAFETY: the RingBuf owns its map fd and returns that same fd for as long as it lives.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(io::Error::from)
            .context("registering the EVENTS ring buffer with tokio")?;
        let (tx, rx) = mpsc::channel(EVENT_CHANNEL);
        let shutdown = self.shutdown.subscribe();
        handle.spawn(pump_events(ring, tx, shutdown));
        Ok(rx)
    }

    /// Whether each program is still attached where it should be (cheap: reads link info only).
    pub fn programs(&self) -> Vec<ProgramStatus> {
        self.links
            .iter()
            .map(|link| match link.info() {
                Ok(info) => ProgramStatus {
                    name: link.program.to_owned(),
                    attached: info.cgroup_id == self.cgroup_id
                        && info.attach_type == link.attach_type,
                    id: info.prog_id,
                },
                Err(err) => {
                    warn!(program = link.program, "reading link info: {err:#}");
                    ProgramStatus {
                        name: link.program.to_owned(),
                        attached: false,
                        id: 0,
                    }
                }
            })
            .collect()
    }

    pub fn status(&self) -> CaptureStatus {
        let programs = self.programs();
        let entries = |name: &str, n: Result<usize, MapError>| {
            n.unwrap_or_else(|err| {
                warn!(map = name, "counting entries: {err}");
                0
            })
        };
        let counted = [
            entries(names::ENROLLED, count_keys(lock(&self.enrolled).keys())),
            1,
            entries(names::EXCL_PORTS, count_keys(lock(&self.excl_ports).keys())),
            entries(names::EXCL_CIDRS, count_keys(lock(&self.excl_cidrs).keys())),
            entries(names::BY_COOKIE, count_keys(lock(&self.by_cookie).keys())),
            entries(names::BY_TUPLE, count_keys(lock(&self.by_tuple).keys())),
            0,
            Counter::COUNT as usize,
            entries(names::STRICT, count_keys(lock(&self.strict).keys())),
        ];
        let maps = map_specs()
            .iter()
            .zip(counted)
            .map(|(spec, entries)| MapStatus {
                name: spec.name.to_owned(),
                entries,
                max_entries: spec.max_entries,
            })
            .collect();
        CaptureStatus {
            attach_point: self.attach_point.clone(),
            pin_path: self.pin_dir.clone(),
            programs,
            maps,
            counters: self.counters(),
            reused_pins: self.reused_pins,
        }
    }

    /// Kernel-side counters: `Counter::name()` → sum over CPUs.
    pub fn counters(&self) -> BTreeMap<String, u64> {
        let stats = lock(&self.stats);
        Counter::ALL
            .iter()
            .map(|&c| {
                let total = match stats.get(&(c as u32), 0) {
                    Ok(values) => values.iter().copied().fold(0u64, u64::wrapping_add),
                    Err(err) => {
                        warn!(counter = c.name(), "reading STATS: {err}");
                        0
                    }
                };
                (c.name().to_owned(), total)
            })
            .collect()
    }

    /// The cgroup id of the attach point.
    pub fn cgroup_id(&self) -> u64 {
        self.cgroup_id
    }

    /// Detach everything and remove the pins (tests; `weft uninstall` for a node without a running proxy); normal shutdown
    /// keeps pins.
    pub fn detach_and_unpin(self) -> anyhow::Result<()> {
        for link in &self.links {
            link.detach()
                .with_context(|| format!("detaching program {}", link.program))?;
        }
        remove_pins(&self.pin_dir, true)?;
        info!(pin_dir = %self.pin_dir.display(), "capture detached and unpinned");
        Ok(())
    }

    /// Detaches the links pinned in `bpffs` and removes every pin there, without loading
    /// anything (`weft uninstall`, when no `Capture` can be built). A missing directory
    /// is not an error.
    pub fn remove_pins(bpffs: &Path) -> anyhow::Result<()> {
        remove_pins(bpffs, true)
    }

    /// Writes the exclusion maps, then `CONFIG` (which turns redirection on).
    fn write_config(&self, cfg: &CaptureConfig) -> anyhow::Result<()> {
        let mut ports = lock(&self.excl_ports);
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

        let mut cidrs = lock(&self.excl_cidrs);
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
        lock(&self.config)
            .set(0, config, 0)
            .context("writing CONFIG")?;

        Ok(())
    }

    /// Looks up the original destination saved by connect4/6 for a socket that has not reached
    /// `ESTABLISHED` yet (diagnostics).
    pub fn pending_by_cookie(&self, cookie: u64) -> Option<Redirect> {
        lock(&self.by_cookie)
            .get(&cookie, 0)
            .ok()
            .map(|orig| redirect_of(&orig))
    }
}

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

fn validate(cfg: &CaptureConfig) -> anyhow::Result<()> {
    let ip = cfg.proxy_addr.ip();
    if ip.is_unspecified() || ip.is_loopback() || ip.is_broadcast() || ip.is_multicast() {
        bail!(
            "capture proxy address {} must be a unicast address pods can reach \
             (not 0.0.0.0, loopback or multicast)",
            cfg.proxy_addr
        );
    }
    if cfg.proxy_addr.port() == 0 {
        bail!("capture proxy address {} has port 0", cfg.proxy_addr);
    }
    if cfg.exclude_ports.len() > EXCL_PORTS_ENTRIES as usize {
        bail!(
            "{} excluded ports, at most {EXCL_PORTS_ENTRIES} are supported",
            cfg.exclude_ports.len()
        );
    }
    if cfg.exclude_cidrs.len() > EXCL_CIDRS_ENTRIES as usize {
        bail!(
            "{} excluded CIDRs, at most {EXCL_CIDRS_ENTRIES} are supported",
            cfg.exclude_cidrs.len()
        );
    }
    if cfg.bpffs.parent().is_none_or(|p| p.as_os_str().is_empty()) {
        bail!(
            "bpffs pin directory {} must be a directory inside a bpffs mount (e.g. {DEFAULT_BPFFS})",
            cfg.bpffs.display()
        );
    }
    Ok(())
}

/// Ids of the cgroup (v2) this process is in and of all its ancestors.
fn own_cgroup_ids() -> anyhow::Result<HashSet<u64>> {
    let cgroup = fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
    let own = cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .context("no cgroup v2 entry in /proc/self/cgroup")?
        .trim();
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    for line in mountinfo.lines() {
        // <id> <parent> <dev> <root> <mount point> <options> [optional...] - <fstype> ...
        let Some((mount, fs_part)) = line.split_once(" - ") else {
            continue;
        };
        if fs_part.split(' ').next() != Some("cgroup2") {
            continue;
        }
        let fields: Vec<&str> = mount.split(' ').collect();
        let (Some(root), Some(mount_point)) = (fields.get(3), fields.get(4)) else {
            continue;
        };
        let Ok(below) = Path::new(own).strip_prefix(root) else {
            continue;
        };
        let mount_point = Path::new(mount_point);
        let mut ids = HashSet::new();
        let mut dir = mount_point.join(below);
        loop {
            let meta = fs::metadata(&dir).with_context(|| format!("stat {}", dir.display()))?;
            ids.insert(meta.ino());
            if dir == mount_point || !dir.pop() {
                break;
            }
        }
        return Ok(ids);
    }
    bail!("no cgroup v2 mount shows this process's cgroup {own}")
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound | MapError::ElementNotFound) => Ok(()),
        r => r,
    }
}

fn count_keys<K>(keys: impl Iterator<Item = Result<K, MapError>>) -> Result<usize, MapError> {
    let mut n = 0;
    for key in keys {
        key?;
        n += 1;
    }
    Ok(n)
}

fn v4(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V4(ip) => Some(ip),
        IpAddr::V6(ip) => ip.to_ipv4_mapped(),
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

fn take_map<T>(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<T>
where
    T: TryFrom<Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("map {name} missing from the eBPF object"))?;
    T::try_from(map).with_context(|| format!("opening map {name}"))
}

fn load_program(program: &mut Program) -> anyhow::Result<()> {
    match program {
        Program::CgroupSockAddr(p) => p.load()?,
        Program::SockOps(p) => p.load()?,
        Program::CgroupSkb(p) => p.load()?,
        other => bail!("unexpected program type {:?}", other.prog_type()),
    }
    Ok(())
}

fn attach_program(program: &mut Program, cgroup: &File) -> anyhow::Result<FdLink> {
    let link = match program {
        Program::CgroupSockAddr(p) => {
            let p: &mut CgroupSockAddr = p;
            let id = p.attach(cgroup.as_fd(), CgroupAttachMode::Single)?;
            FdLink::try_from(p.take_link(id)?)?
        }
        Program::SockOps(p) => {
            let p: &mut SockOps = p;
            let id = p.attach(cgroup.as_fd(), CgroupAttachMode::Single)?;
            FdLink::try_from(p.take_link(id)?)?
        }
        Program::CgroupSkb(p) => {
            let p: &mut CgroupSkb = p;
            // The direction comes from the program's ELF section (`cgroup_skb/ingress`).
            let attach_type =
                (*p.expected_attach_type()).context("cgroup_skb program without a direction")?;
            let id = p.attach(cgroup.as_fd(), attach_type, CgroupAttachMode::Single)?;
            FdLink::try_from(p.take_link(id)?)?
        }
        other => bail!("unexpected program type {:?}", other.prog_type()),
    };
    Ok(link)
}

fn pin_link(link: FdLink, pin: &Path, spec: &ProgSpec) -> anyhow::Result<LinkHandle> {
    let pinned = link
        .pin(pin)
        .with_context(|| format!("pinning link of {} at {}", spec.name, pin.display()))?;
    // Our own handle on the link, through its pin; `pinned` (aya's fd) can go.
    let handle = LinkHandle::open(pin, spec)?;
    drop(pinned);
    Ok(handle)
}

fn link_pin_path(dir: &Path, program: &str) -> PathBuf {
    dir.join(format!("{}{program}", names::LINK_PIN_PREFIX))
}

/// A cgroup link, opened from its pin.
struct LinkHandle {
    program: &'static str,
    attach_type: u32,
    pin: PathBuf,
    fd: OwnedFd,
}

/// What `/proc/self/fdinfo` says about a link.
#[derive(Debug)]
struct LinkFdInfo {
    prog_id: u32,
    prog_tag: u64,
    /// 0 once the link is detached or its cgroup is gone.
    cgroup_id: u64,
    attach_type: u32,
}

impl LinkHandle {
    fn open(pin: &Path, spec: &ProgSpec) -> anyhow::Result<LinkHandle> {
        let fd =
            bpf_obj_get(pin).with_context(|| format!("opening pinned link {}", pin.display()))?;
        Ok(LinkHandle {
            program: spec.name,
            attach_type: spec.attach_type,
            pin: pin.to_owned(),
            fd,
        })
    }

    fn info(&self) -> anyhow::Result<LinkFdInfo> {
        let path = format!("/proc/self/fdinfo/{}", self.fd.as_raw_fd());
        let text = fs::read_to_string(&path)
            .with_context(|| format!("reading {path} (link {})", self.pin.display()))?;
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
        };
        if field("link_type") != Some("cgroup") {
            bail!(
                "{} is not a cgroup link (fdinfo: {:?})",
                self.pin.display(),
                text.trim()
            );
        }
        let num = |name: &str| -> anyhow::Result<u64> {
            field(name)
                .with_context(|| format!("no {name} in fdinfo of link {}", self.pin.display()))?
                .parse()
                .with_context(|| format!("bad {name} in fdinfo of link {}", self.pin.display()))
        };
        let prog_tag = field("prog_tag")
            .and_then(|t| u64::from_str_radix(t, 16).ok())
            .with_context(|| format!("no prog_tag in fdinfo of link {}", self.pin.display()))?;
        Ok(LinkFdInfo {
            prog_id: num("prog_id")? as u32,
            prog_tag,
            cgroup_id: num("cgroup_id")?,
            attach_type: num("attach_type")? as u32,
        })
    }

    fn detach(&self) -> anyhow::Result<()> {
        #[repr(C)]
        struct LinkDetachAttr {
            link_fd: u32,
        }
        let attr = LinkDetachAttr {
            link_fd: self.fd.as_raw_fd() as u32,
        };
        // SAFETY: bpf(BPF_LINK_DETACH) reads `size_of(attr)` bytes from `attr`.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_LINK_DETACH,
                &attr as *const LinkDetachAttr,
                std::mem::size_of::<LinkDetachAttr>(),
            )
        };
        if ret < 0 {
            let err = io::Error::last_os_error();
            // Already detached (its cgroup went away, or detached before).
            if err.raw_os_error() != Some(libc::ENOLINK) {
                return Err(err).with_context(|| format!("BPF_LINK_DETACH {}", self.pin.display()));
            }
        }
        Ok(())
    }
}

/// Opens the pinned links in `dir` and checks that they form a working attachment to the cgroup
/// `cgroup_id` whose maps are the pinned maps with the expected layout. Returns the links (per
/// program, in `PROGRAMS` order) when all of them are fine, all `None` when there are no pinned
/// links, and an error when the pins are unusable (the caller removes them). Pins of a build
/// with fewer programs or maps are unusable: everything is loaded fresh.
fn inspect_pins(dir: &Path, cgroup_id: u64) -> anyhow::Result<Vec<Option<LinkHandle>>> {
    // Pinned maps must have this build's layout, whether or not links are pinned.
    let mut pinned_map_ids = HashSet::new();
    for spec in map_specs() {
        let path = dir.join(spec.name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path)
            .with_context(|| format!("opening pinned map {}", path.display()))?;
        let map_type = info
            .map_type()
            .with_context(|| format!("type of pinned map {}", path.display()))?;
        if map_type != spec.map_type
            || info.key_size() != spec.key_size
            || info.value_size() != spec.value_size
            || info.max_entries() != spec.max_entries
        {
            bail!(
                "pinned map {} has layout {:?} key {} value {} max {}, expected {:?} key {} value {} max {}",
                path.display(),
                map_type,
                info.key_size(),
                info.value_size(),
                info.max_entries(),
                spec.map_type,
                spec.key_size,
                spec.value_size,
                spec.max_entries
            );
        }
        pinned_map_ids.insert(info.id());
    }

    let pins: Vec<PathBuf> = PROGRAMS
        .iter()
        .map(|spec| link_pin_path(dir, spec.name))
        .collect();
    if pins.iter().all(|p| !p.exists()) {
        return Ok(no_links());
    }
    if pinned_map_ids.len() != map_specs().len() {
        bail!(
            "links are pinned in {} but some maps are not",
            dir.display()
        );
    }
    let mut links = Vec::with_capacity(PROGRAMS.len());
    let mut used_maps = HashSet::new();
    for (spec, pin) in PROGRAMS.iter().zip(&pins) {
        let link = LinkHandle::open(pin, spec)?;
        let info = link.info()?;
        if info.cgroup_id != cgroup_id || info.attach_type != spec.attach_type {
            bail!(
                "pinned link {} is attached to cgroup id {} (attach type {}), expected cgroup id {} (attach type {})",
                pin.display(),
                info.cgroup_id,
                info.attach_type,
                cgroup_id,
                spec.attach_type
            );
        }
        let prog = loaded_programs()
            .filter_map(Result::ok)
            .find(|p| p.id() == info.prog_id)
            .with_context(|| {
                format!(
                    "program {} of link {} not found",
                    info.prog_id,
                    pin.display()
                )
            })?;
        if let Some(ids) = prog
            .map_ids()
            .with_context(|| format!("maps of program {} ({})", info.prog_id, spec.name))?
        {
            used_maps.extend(ids);
        }
        links.push(Some(link));
    }
    if used_maps != pinned_map_ids {
        bail!(
            "the attached programs use maps {used_maps:?}, but the maps pinned in {} are {pinned_map_ids:?}",
            dir.display()
        );
    }
    Ok(links)
}

/// One `None` per program: nothing pinned to re-use.
fn no_links() -> Vec<Option<LinkHandle>> {
    PROGRAMS.iter().map(|_| None).collect()
}

/// Detaches pinned links and removes all pins in `dir`, then (if `remove_dir`) `dir` itself.
fn remove_pins(dir: &Path, remove_dir: bool) -> anyhow::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(err).with_context(|| format!("listing {}", dir.display())),
    };
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let path = entry.path();
        let is_link = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(names::LINK_PIN_PREFIX));
        if is_link {
            // Unpinning alone would leave the link attached while anyone holds an fd on it.
            match bpf_obj_get(&path) {
                Ok(fd) => {
                    let handle = LinkHandle {
                        program: "",
                        attach_type: 0,
                        pin: path.clone(),
                        fd,
                    };
                    if let Err(err) = handle.detach() {
                        warn!(pin = %path.display(), "{err:#}");
                    }
                }
                Err(err) => warn!(pin = %path.display(), "opening pinned link: {err}"),
            }
        }
        remove_file_if_exists(&path)?;
    }
    if !remove_dir {
        return Ok(());
    }
    match fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err).with_context(|| format!("removing {}", dir.display())),
    }
}

fn remove_file_if_exists(path: &Path) -> anyhow::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err).with_context(|| format!("removing {}", path.display())),
    }
}

/// `bpf(BPF_OBJ_GET)`: an fd on a pinned object.
fn bpf_obj_get(path: &Path) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct ObjGetAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    let cpath = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let attr = ObjGetAttr {
        pathname: cpath.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    // SAFETY: bpf(BPF_OBJ_GET) reads `attr` and the NUL-terminated path it points to.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &attr as *const ObjGetAttr,
            std::mem::size_of::<ObjGetAttr>(),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as RawFd) })
}

fn fs_magic(path: &Path) -> anyhow::Result<i64> {
    let cpath = CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("bad path {}", path.display()))?;
    // SAFETY: statfs writes into `buf`.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(cpath.as_ptr(), &mut buf) } != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("statfs {}", path.display()));
    }
    #[allow(
        clippy::unnecessary_cast,
        reason = "f_type's width differs across targets"
    )]
    Ok(buf.f_type as i64)
}

/// Makes sure `pin_dir` can be created on a bpffs: if neither it nor its parent is on one,
/// mounts a bpffs on the parent (like cilium-agent does for `/sys/fs/bpf`).
fn ensure_bpffs(pin_dir: &Path) -> anyhow::Result<()> {
    if pin_dir.is_dir() && fs_magic(pin_dir)? == BPF_FS_MAGIC {
        return Ok(());
    }
    let mount_point = pin_dir
        .parent()
        .with_context(|| format!("{} has no parent directory", pin_dir.display()))?;
    fs::create_dir_all(mount_point)
        .with_context(|| format!("creating bpffs mount point {}", mount_point.display()))?;
    if fs_magic(mount_point)? == BPF_FS_MAGIC {
        return Ok(());
    }
    // Two processes may race to mount; a second bpffs on top would hide the first one's pins.
    let _lock = DirLock::exclusive(mount_point)?;
    if fs_magic(mount_point)? == BPF_FS_MAGIC {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpffs"),
        mount_point,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| format!("mounting bpffs on {}", mount_point.display()))?;
    info!(mount_point = %mount_point.display(), "mounted bpffs");
    Ok(())
}

/// An exclusive `flock` on a directory, released on drop.
struct DirLock(File);

impl DirLock {
    fn exclusive(dir: &Path) -> anyhow::Result<DirLock> {
        let file = File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("locking {}", dir.display()));
        }
        Ok(DirLock(file))
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        // SAFETY: flock on an fd we own.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

async fn pump_events(
    mut ring: AsyncFd<RingBuf<MapData>>,
    tx: mpsc::Sender<RedirectEvent>,
    mut shutdown: watch::Receiver<()>,
) {
    let mut batch = Vec::new();
    // The programs submit without waking us (a wake-up per connect is costly for the pod that
    // connects), so the ring is drained on a short timer as well as on readiness.
    let mut drain = tokio::time::interval(EVENTS_DRAIN_EVERY);
    drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            ready = ring.readable_mut() => {
                let mut guard = match ready {
                    Ok(guard) => guard,
                    Err(err) => {
                        warn!("waiting on the EVENTS ring buffer: {err}");
                        return;
                    }
                };
                drain_ring(guard.get_inner_mut(), &mut batch);
                guard.clear_ready();
            }
            _ = drain.tick() => drain_ring(ring.get_mut(), &mut batch),
            _ = shutdown.changed() => return,
            _ = tx.closed() => return,
        }
        let boot = boot_time();
        for raw in batch.drain(..) {
            let event = RedirectEvent {
                redirect: redirect_of(&raw.orig),
                time: boot + Duration::from_nanos(raw.boot_ns),
            };
            if tx.send(event).await.is_err() {
                return;
            }
        }
    }
}

/// Reads every record waiting in the ring.
fn drain_ring(ring: &mut RingBuf<MapData>, batch: &mut Vec<RawEvent>) {
    while let Some(item) = ring.next() {
        if item.len() < std::mem::size_of::<RawEvent>() {
            warn!(len = item.len(), "short record in EVENTS");
            continue;
        }
        // SAFETY: the record holds at least one RawEvent (plain old data).
        batch.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<RawEvent>()) });
    }
}

/// The wall-clock time of boot, to convert `CLOCK_BOOTTIME` stamps (`bpf_ktime_get_boot_ns`).
fn boot_time() -> SystemTime {
    let now = |clock| {
        // SAFETY: clock_gettime writes into `ts`.
        let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
        unsafe { libc::clock_gettime(clock, &mut ts) };
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    };
    let since_boot = now(libc::CLOCK_BOOTTIME);
    let since_epoch = now(libc::CLOCK_REALTIME);
    UNIX_EPOCH + since_epoch.saturating_sub(since_boot)
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

    #[test]
    fn mapped_addresses_are_ipv4() {
        assert_eq!(
            v4("::ffff:10.0.0.1".parse().unwrap()),
            Some(Ipv4Addr::new(10, 0, 0, 1))
        );
        assert_eq!(v4("fd00::1".parse().unwrap()), None);
    }

    #[test]
    fn config_is_validated() {
        let cfg = CaptureConfig {
            cgroup_root: "/sys/fs/cgroup/unified".into(),
            bpffs: DEFAULT_BPFFS.into(),
            proxy_addr: "0.0.0.0:15001".parse().unwrap(),
            exclude_ports: vec![],
            exclude_cidrs: vec![],
        };
        assert!(validate(&cfg).is_err());
        let cfg = CaptureConfig {
            proxy_addr: "10.0.0.1:15001".parse().unwrap(),
            ..cfg
        };
        validate(&cfg).unwrap();
        let cfg = CaptureConfig {
            bpffs: "/".into(),
            ..cfg
        };
        assert!(validate(&cfg).is_err());
    }

    #[test]
    fn the_object_has_the_programs_and_maps() {
        let obj = aya_obj_names();
        for spec in PROGRAMS {
            assert!(obj.contains(&spec.name), "{} missing", spec.name);
        }
        for spec in map_specs() {
            assert!(obj.contains(&spec.name), "{} missing", spec.name);
        }
    }

    /// Symbol names in the embedded object (a crude check that build.rs embedded the right
    /// thing, without needing privileges).
    fn aya_obj_names() -> Vec<&'static str> {
        let all = [
            names::PROG_CONNECT4,
            names::PROG_CONNECT6,
            names::PROG_SOCK_OPS,
            names::PROG_INGRESS,
            names::ENROLLED,
            names::CONFIG,
            names::EXCL_PORTS,
            names::EXCL_CIDRS,
            names::BY_COOKIE,
            names::BY_TUPLE,
            names::EVENTS,
            names::STATS,
            names::STRICT,
        ];
        all.into_iter()
            .filter(|name| {
                EBPF_OBJECT
                    .windows(name.len() + 1)
                    .any(|w| &w[..name.len()] == name.as_bytes() && w[name.len()] == 0)
            })
            .collect()
    }
}
