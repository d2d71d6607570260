//! What the capture looks like from outside: programs attached or not, map fill levels and the
//! kernel-side counters (`/status`, `/metrics`).

use std::collections::BTreeMap;

use aya::maps::MapError;
use tracing::warn;
use weft_common::{names, Counter};

use super::attach::map_specs;
use super::maps::count_keys;
use super::Capture;
use crate::admin::api::{CaptureStatus, MapStatus, ProgramStatus};

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
        let counted = [
            entries(names::ENROLLED, count_keys(self.enrolled.lock().keys())),
            1,
            entries(names::EXCL_PORTS, count_keys(self.excl_ports.lock().keys())),
            entries(names::EXCL_CIDRS, count_keys(self.excl_cidrs.lock().keys())),
            entries(names::BY_COOKIE, count_keys(self.by_cookie.lock().keys())),
            entries(names::BY_TUPLE, count_keys(self.by_tuple.lock().keys())),
            0,
            Counter::COUNT as usize,
            entries(names::STRICT, count_keys(self.strict.lock().keys())),
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
