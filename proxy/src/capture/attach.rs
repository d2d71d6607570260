//! Loading, pinning and attaching the programs, and taking them away again.
//!
//! Pins are re-used when they describe a working attachment of this build's programs; a map of
//! another build's layout is made anew and the programs replaced, the other maps kept; pins
//! that describe no working attachment are removed and everything loaded fresh. bpf(2) is
//! called directly for the two commands aya 0.14 has no API for (`BPF_OBJ_GET` on a link pin,
//! `BPF_LINK_DETACH`).

use std::collections::HashSet;
use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use aya::maps::{lpm_trie::Key as LpmKey, Map, MapError, MapInfo, MapType};
use aya::programs::{
    links::FdLink, loaded_programs, CgroupAttachMode, CgroupSkb, CgroupSockAddr, Program, SockOps,
};
use aya::{Ebpf, EbpfLoader};
use parking_lot::Mutex;
use tokio::sync::watch;
use tracing::{debug, info, warn};
use weft_common::{
    names, Config, Counter, FlowKey, OrigDst, StrictKey, DELIVERIES_ENTRIES, ENROLLED_ENTRIES,
    EVENTS_BYTES, EXCL_CIDRS_ENTRIES, EXCL_PORTS_ENTRIES, NODE_ADDRS_ENTRIES, ORIG_DST_ENTRIES,
    STRICT_ENTRIES, UNCAPTURED_ENTRIES,
};

use super::status::StatusMaps;
use super::{Capture, CaptureConfig};
use crate::config::DEFAULT_BPFFS;
use crate::workload::cgroup_id;

/// The eBPF object built by `build.rs` from `ebpf/`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weft"));

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

// bpf(2) commands and attach types used directly (aya 0.14 has no API for them).
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_DETACH: libc::c_long = 34;
const BPF_CGROUP_INET_INGRESS: u32 = 0;
const BPF_CGROUP_SOCK_OPS: u32 = 3;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
const BPF_CGROUP_INET6_CONNECT: u32 = 11;

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
pub(super) struct MapSpec {
    pub(super) name: &'static str,
    map_type: MapType,
    key_size: u32,
    value_size: u32,
    pub(super) max_entries: u32,
}

pub(super) fn map_specs() -> [MapSpec; 12] {
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
        spec(
            names::DELIVERIES,
            MapType::LruHash,
            size_of::<FlowKey>(),
            size_of::<u64>(),
            DELIVERIES_ENTRIES,
        ),
        spec(
            names::NODE_ADDRS,
            MapType::Hash,
            size_of::<u32>(),
            size_of::<u8>(),
            NODE_ADDRS_ENTRIES,
        ),
        spec(
            names::UNCAPTURED,
            MapType::LruHash,
            size_of::<u64>(),
            size_of::<u64>(),
            UNCAPTURED_ENTRIES,
        ),
    ]
}

impl Capture {
    /// Mounts bpffs at `cfg.bpffs`'s parent if nothing is mounted there, creates the pin
    /// directory, then either re-opens the pinned maps and links of a previous run or loads the
    /// object, pins its maps, attaches the four programs to `cfg.cgroup_root` and pins the
    /// links. Finally writes `CONFIG` and the exclusion maps from `cfg`.
    pub fn attach(cfg: &CaptureConfig) -> anyhow::Result<Capture> {
        check_config(cfg)?;
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
        let cgroup_id = cgroup_id(&cfg.cgroup_root)
            .with_context(|| format!("cgroup id of {}", cfg.cgroup_root.display()))?;

        let pin_dir = cfg.bpffs.clone();
        let Pins {
            links: mut existing,
            remade,
        } = match inspect_pins(&pin_dir, cgroup_id) {
            Ok(pins) => pins,
            Err(err) => {
                warn!(
                    pin_dir = %pin_dir.display(),
                    "pinned capture state is unusable, removing it and loading fresh: {err:#}"
                );
                remove_pins(&pin_dir, false)?;
                Pins {
                    links: no_links(),
                    remade: Vec::new(),
                }
            }
        };
        // A map of another build's layout is made anew (empty); the others, and what they
        // hold (the enrolled pods, STRICT, the original destinations), are kept. The attached
        // programs use the old map until they are replaced below.
        for name in &remade {
            remove_file_if_exists(&pin_dir.join(name))?;
        }

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
            by_tuple: take_map(&mut ebpf, names::BY_TUPLE)?,
            take_in_one_call: true.into(),
            stats: Mutex::new(take_map(&mut ebpf, names::STATS)?),
            strict: Mutex::new(take_map(&mut ebpf, names::STRICT)?),
            deliveries: Mutex::new(take_map(&mut ebpf, names::DELIVERIES)?),
            node_addrs: Mutex::new(take_map(&mut ebpf, names::NODE_ADDRS)?),
            uncaptured: Mutex::new(take_map(&mut ebpf, names::UNCAPTURED)?),
            events: Mutex::new(Some(take_map(&mut ebpf, names::EVENTS)?)),
            status_maps: StatusMaps::open(&pin_dir)?,
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
                // A program's tag does not cover which maps it uses: one that uses a map made
                // anew is replaced even when its code is the same.
                if old_tag == tag && remade.is_empty() {
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
    /// is not an error. Says what it found and did.
    pub fn remove_pins(bpffs: &Path) -> anyhow::Result<Removed> {
        remove_pins(bpffs, true)
    }
}

fn check_config(cfg: &CaptureConfig) -> anyhow::Result<()> {
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
            ids.insert(cgroup_id(&dir).with_context(|| format!("cgroup id of {}", dir.display()))?);
            if dir == mount_point || !dir.pop() {
                break;
            }
        }
        return Ok(ids);
    }
    bail!("no cgroup v2 mount shows this process's cgroup {own}")
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
pub(super) struct LinkHandle {
    pub(super) program: &'static str,
    pub(super) attach_type: u32,
    pin: PathBuf,
    fd: OwnedFd,
}

/// What `/proc/self/fdinfo` says about a link.
#[derive(Debug)]
pub(super) struct LinkFdInfo {
    pub(super) prog_id: u32,
    prog_tag: u64,
    /// 0 once the link is detached or its cgroup is gone.
    pub(super) cgroup_id: u64,
    pub(super) attach_type: u32,
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

    pub(super) fn info(&self) -> anyhow::Result<LinkFdInfo> {
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

/// What [`inspect_pins`] found in a pin directory.
struct Pins {
    /// Per program (in `PROGRAMS` order), its pinned link when all of them form a working
    /// attachment; all `None` when there are no pinned links.
    links: Vec<Option<LinkHandle>>,
    /// Maps pinned with another layout than this build's (another build's): made anew, and
    /// every program replaced to use the new ones.
    remade: Vec<&'static str>,
}

/// Opens the pinned links in `dir` and checks that they form a working attachment to the cgroup
/// `cgroup_id` whose maps are the pinned maps. Maps of another layout (type, key, value or
/// size: another build's) are listed to be made anew. Returns an error when the pins are
/// unusable (the caller removes them all): links missing, detached or attached elsewhere,
/// programs using maps that are not the pinned ones (a build with fewer maps).
fn inspect_pins(dir: &Path, cgroup_id: u64) -> anyhow::Result<Pins> {
    // Which pinned maps have this build's layout, whether or not links are pinned.
    let mut pinned_map_ids = HashSet::new();
    let mut remade = Vec::new();
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
            warn!(
                map = spec.name,
                "pinned map has layout {:?} key {} value {} max {}, this build's is {:?} key {} value {} max {}: made anew, what it held is lost",
                map_type,
                info.key_size(),
                info.value_size(),
                info.max_entries(),
                spec.map_type,
                spec.key_size,
                spec.value_size,
                spec.max_entries
            );
            remade.push(spec.name);
        }
        pinned_map_ids.insert(info.id());
    }

    let pins: Vec<PathBuf> = PROGRAMS
        .iter()
        .map(|spec| link_pin_path(dir, spec.name))
        .collect();
    if pins.iter().all(|p| !p.exists()) {
        return Ok(Pins {
            links: no_links(),
            remade,
        });
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
    Ok(Pins { links, remade })
}

/// One `None` per program: nothing pinned to re-use.
fn no_links() -> Vec<Option<LinkHandle>> {
    PROGRAMS.iter().map(|_| None).collect()
}

/// Detaches pinned links and removes all pins in `dir`, then (if `remove_dir`) `dir` itself.
/// What [`Capture::remove_pins`] found and did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Removed {
    /// Pinned program links found.
    pub links: usize,
    /// Of those, detached from their cgroup (or already detached).
    pub detached: usize,
    /// Pins deleted (links and maps).
    pub pins: usize,
}

/// Detaches pinned links and removes all pins in `dir`, then (if `remove_dir`) `dir` itself.
fn remove_pins(dir: &Path, remove_dir: bool) -> anyhow::Result<Removed> {
    let mut removed = Removed::default();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(removed),
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
            removed.links += 1;
            // Unpinning alone would leave the link attached while anyone holds an fd on it.
            match bpf_obj_get(&path) {
                Ok(fd) => {
                    let handle = LinkHandle {
                        program: "",
                        attach_type: 0,
                        pin: path.clone(),
                        fd,
                    };
                    match handle.detach() {
                        Ok(()) => removed.detached += 1,
                        Err(err) => warn!(pin = %path.display(), "{err:#}"),
                    }
                }
                Err(err) => warn!(pin = %path.display(), "opening pinned link: {err}"),
            }
        }
        remove_file_if_exists(&path)?;
        removed.pins += 1;
    }
    if !remove_dir {
        return Ok(removed);
    }
    match fs::remove_dir(dir) {
        Ok(()) => Ok(removed),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(removed),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_validated() {
        let cfg = CaptureConfig {
            cgroup_root: "/sys/fs/cgroup/unified".into(),
            bpffs: DEFAULT_BPFFS.into(),
            proxy_addr: "0.0.0.0:15001".parse().unwrap(),
            exclude_ports: vec![],
            exclude_cidrs: vec![],
        };
        assert!(check_config(&cfg).is_err());
        let cfg = CaptureConfig {
            proxy_addr: "10.0.0.1:15001".parse().unwrap(),
            ..cfg
        };
        check_config(&cfg).unwrap();
        let cfg = CaptureConfig {
            bpffs: "/".into(),
            ..cfg
        };
        assert!(check_config(&cfg).is_err());
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
            names::DELIVERIES,
            names::NODE_ADDRS,
            names::UNCAPTURED,
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
