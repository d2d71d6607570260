//! What the capture looks like from outside: programs attached or not, map fill levels and the
//! kernel-side counters (`/status`, `/metrics`).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context as _;
use aya::maps::{HashMap as BpfHashMap, LpmTrie, Map, MapData, MapError};
use tracing::warn;
use weft_common::{names, Counter, FlowKey, OrigDst, StrictKey};

use super::attach::map_specs;
use super::maps::count_keys;
use super::Capture;
use crate::admin::api::{CaptureStatus, MapStatus, ProgramStatus};

/// Handles of their own on the maps `/status` counts, opened from the pins. Counting walks
/// every key, one bpf(2) call each and up to 65 536 of them: through the data path's handles
/// that would hold the mutex [`Capture::take_redirect`] takes on every accepted connection (and
/// the ones enrolment and STRICT updates take). Walking keys only reads (`keys()` takes `&self`,
/// the kernel keeps no cursor per fd), so these need no lock at all and readers never wait on
/// each other either.
pub(super) struct StatusMaps {
    enrolled: BpfHashMap<MapData, u64, u8>,
    excl_ports: BpfHashMap<MapData, u16, u8>,
    excl_cidrs: LpmTrie<MapData, u32, u8>,
    by_cookie: BpfHashMap<MapData, u64, OrigDst>,
    by_tuple: BpfHashMap<MapData, FlowKey, OrigDst>,
    strict: BpfHashMap<MapData, StrictKey, u8>,
}

impl StatusMaps {
    /// Opens the maps pinned in `pin_dir`: call after the object is loaded, when the pins are
    /// the maps the programs use.
    pub(super) fn open(pin_dir: &Path) -> anyhow::Result<StatusMaps> {
        Ok(StatusMaps {
            enrolled: open_pinned(pin_dir, names::ENROLLED)?,
            excl_ports: open_pinned(pin_dir, names::EXCL_PORTS)?,
            excl_cidrs: open_pinned(pin_dir, names::EXCL_CIDRS)?,
            by_cookie: open_pinned(pin_dir, names::BY_COOKIE)?,
            by_tuple: open_pinned(pin_dir, names::BY_TUPLE)?,
            strict: open_pinned(pin_dir, names::STRICT)?,
        })
    }
}

fn open_pinned<T>(pin_dir: &Path, name: &str) -> anyhow::Result<T>
where
    T: TryFrom<Map, Error = MapError>,
{
    let pin = pin_dir.join(name);
    let data = MapData::from_pin(&pin)
        .with_context(|| format!("opening pinned map {} for status", pin.display()))?;
    Map::from_map_data(data)
        .and_then(T::try_from)
        .with_context(|| format!("opening pinned map {} for status", pin.display()))
}

impl Capture {
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
        let maps = &self.status_maps;
        let counted = [
            entries(names::ENROLLED, count_keys(maps.enrolled.keys())),
            1,
            entries(names::EXCL_PORTS, count_keys(maps.excl_ports.keys())),
            entries(names::EXCL_CIDRS, count_keys(maps.excl_cidrs.keys())),
            entries(names::BY_COOKIE, count_keys(maps.by_cookie.keys())),
            entries(names::BY_TUPLE, count_keys(maps.by_tuple.keys())),
            0,
            Counter::COUNT as usize,
            entries(names::STRICT, count_keys(maps.strict.keys())),
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
        let stats = self.stats.lock();
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
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};
    use std::fs;
    use std::path::PathBuf;
    use std::sync::{mpsc, Arc};
    use std::time::Duration;

    use super::*;
    use crate::capture::{CaptureConfig, StrictMode};

    /// Attaches to an empty cgroup of its own (nothing in it connects) and pins under a
    /// directory of its own; both go away on drop.
    struct Attached {
        capture: Option<Arc<Capture>>,
        cgroup: PathBuf,
    }

    impl Attached {
        fn new(test: &str) -> Attached {
            assert!(
                nix::unistd::geteuid().is_root(),
                "this test needs root (eBPF, cgroups)"
            );
            let name = format!("weft-unit-{test}-{}", std::process::id());
            let v2 = PathBuf::from("/sys/fs/cgroup");
            let v2 = if v2.join("cgroup.controllers").exists() {
                v2
            } else {
                v2.join("unified")
            };
            let cgroup = v2.join(&name);
            fs::create_dir_all(&cgroup).unwrap();
            let cfg = CaptureConfig {
                cgroup_root: cgroup.clone(),
                bpffs: PathBuf::from("/sys/fs/bpf").join(&name),
                proxy_addr: "10.250.9.1:15001".parse().unwrap(),
                exclude_ports: vec![22, 15008],
                exclude_cidrs: vec!["10.250.9.0/24".parse().unwrap()],
            };
            let mut attached = Attached {
                capture: None,
                cgroup,
            };
            attached.capture = Some(Arc::new(Capture::attach(&cfg).unwrap()));
            attached
        }
    }

    impl Drop for Attached {
        fn drop(&mut self) {
            if let Some(capture) = self.capture.take().and_then(Arc::into_inner) {
                let _ = capture.detach_and_unpin();
            }
            let _ = fs::remove_dir(&self.cgroup);
        }
    }

    #[test]
    fn status_counts_without_the_data_paths_locks() {
        let attached = Attached::new("status-locks");
        let capture = attached.capture.clone().unwrap();
        capture
            .set_enrolled(&HashSet::from([101, 102, 103]))
            .unwrap();
        capture
            .set_strict(&HashMap::from([((101, 0), StrictMode::Strict)]))
            .unwrap();
        let counted_by_data_path = |name: &str| match name {
            names::ENROLLED => count_keys(capture.enrolled.lock().keys()).unwrap(),
            names::EXCL_PORTS => count_keys(capture.excl_ports.lock().keys()).unwrap(),
            names::EXCL_CIDRS => count_keys(capture.excl_cidrs.lock().keys()).unwrap(),
            names::BY_COOKIE => count_keys(capture.by_cookie.lock().keys()).unwrap(),
            names::BY_TUPLE => count_keys(capture.by_tuple.keys()).unwrap(),
            names::STRICT => count_keys(capture.strict.lock().keys()).unwrap(),
            _ => usize::MAX,
        };
        let expected: Vec<(String, usize)> = capture
            .status()
            .maps
            .iter()
            .filter(|m| counted_by_data_path(&m.name) != usize::MAX)
            .map(|m| (m.name.clone(), counted_by_data_path(&m.name)))
            .collect();
        assert_eq!(expected.len(), 6, "{expected:?}");
        assert!(expected.contains(&(names::ENROLLED.to_owned(), 3)));
        assert!(expected.contains(&(names::EXCL_PORTS.to_owned(), 2)));
        assert!(expected.contains(&(names::STRICT.to_owned(), 1)));

        // What enrolment and STRICT updates hold while `/status` is read (accepts hold no
        // lock).
        let held = (
            capture.by_cookie.lock(),
            capture.enrolled.lock(),
            capture.strict.lock(),
            capture.excl_ports.lock(),
            capture.excl_cidrs.lock(),
        );
        let (tx, rx) = mpsc::channel();
        let reader = {
            let capture = capture.clone();
            std::thread::spawn(move || {
                let _ = tx.send(capture.status());
            })
        };
        let status = rx.recv_timeout(Duration::from_secs(10));
        // Let a blocked reader finish either way, so the capture is detached on drop.
        drop(held);
        reader.join().unwrap();
        let status = status.expect("status() waited for a lock the data path holds");
        let counted: Vec<(String, usize)> = status
            .maps
            .iter()
            .filter(|m| expected.iter().any(|(name, _)| *name == m.name))
            .map(|m| (m.name.clone(), m.entries))
            .collect();
        assert_eq!(counted, expected);
        drop(capture);
    }
}
