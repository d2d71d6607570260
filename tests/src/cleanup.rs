//! Ownership markers and teardown of everything a cluster id owns, including leftovers of runs
//! that were killed before they could clean up.
//!
//! Names owned by cluster `<id>` (6 hex digits):
//! - network namespaces `/run/netns/wt<id>-*`
//! - the cgroup `/sys/fs/cgroup/unified/weft-test-<id>`
//! - bpffs pin directories `/sys/fs/bpf/weft-<id>-*`
//! - the marker `/run/weft-tests/<id>` (`pid=<pid> start=<starttime> test=<name>`), written before
//!   anything else and removed last: a name whose marker is missing or whose owner is dead is stale.

use crate::{cgroup, ids, netns};
use anyhow::{Context, Result};
use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const MARKER_DIR: &str = "/run/weft-tests";
pub const BPFFS: &str = "/sys/fs/bpf";

pub fn netns_prefix(id: &str) -> String {
    format!("wt{id}-")
}

pub fn cgroup_dir(id: &str) -> PathBuf {
    cgroup::unified_root().join(format!("weft-test-{id}"))
}

pub fn bpffs_prefix(id: &str) -> String {
    format!("weft-{id}-")
}

fn marker_path(id: &str) -> PathBuf {
    Path::new(MARKER_DIR).join(id)
}

/// Start time (clock ticks since boot) of a process, to tell a live owner from a reused pid.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields restart after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    // rest starts at field 3 (state); starttime is field 22.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Claim `id` for this process. Ok(false) if another run holds it.
pub(crate) fn create_marker(id: &str, test_name: &str) -> Result<bool> {
    std::fs::create_dir_all(MARKER_DIR).with_context(|| format!("creating {MARKER_DIR}"))?;
    let pid = std::process::id();
    let start = start_time(pid).unwrap_or(0);
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(marker_path(id))
    {
        Ok(mut f) => {
            writeln!(f, "pid={pid} start={start} test={test_name}")?;
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e).context("creating marker"),
    }
}

/// Is the run that owns `id` still alive?
fn owner_alive(id: &str) -> bool {
    let Ok(text) = std::fs::read_to_string(marker_path(id)) else {
        return false;
    };
    let field = |k: &str| {
        text.split_whitespace()
            .find_map(|f| f.strip_prefix(k))
            .and_then(|v| v.parse::<u64>().ok())
    };
    let (Some(pid), Some(start)) = (field("pid="), field("start=")) else {
        // Being written right now (the marker is created, then filled): treat as alive.
        return true;
    };
    match start_time(pid as u32) {
        Some(s) => start == 0 || s == start,
        None => false,
    }
}

/// Remove everything `id` owns: kill its processes, delete its network namespaces, its cgroup
/// tree and its bpffs pins, then its marker. Best effort; returns the first error.
pub(crate) fn teardown(id: &str) -> Result<()> {
    let mut first_err: Option<anyhow::Error> = None;
    let mut note = |r: Result<()>| {
        if let Err(e) = r {
            if first_err.is_none() {
                first_err = Some(e);
            }
        }
    };
    let cg = cgroup_dir(id);
    note(cgroup::kill_all(&cg));
    let prefix = netns_prefix(id);
    let mut names: Vec<String> = netns::list()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    // Pods first, then nodes, then the fabric (not required, but tidy).
    names.sort_by_key(|n| (!n.contains("-pod-"), !n.contains("-node-"), n.to_string()));
    for n in &names {
        note(netns::delete(n));
    }
    note(cgroup::remove_tree(&cg));
    let bp = bpffs_prefix(id);
    if let Ok(d) = std::fs::read_dir(BPFFS) {
        for e in d.flatten() {
            if e.file_name().to_string_lossy().starts_with(&bp) {
                let p = e.path();
                let r = if p.is_dir() {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
                note(r.with_context(|| format!("removing {}", p.display())));
            }
        }
    }
    let _ = std::fs::remove_file(marker_path(id));
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// What [`cleanup_stale`] removed.
#[derive(Debug, Default, Clone)]
pub struct StaleReport {
    /// Cluster ids torn down.
    pub ids: Vec<String>,
}

/// Remove leftovers of runs that died without cleaning up: every cluster id (from markers,
/// `wt<id>-*` network namespaces, `weft-test-<id>` cgroups, `weft-<id>-*` bpffs dirs) whose
/// owning process is gone. Ids of live runs (this one included) are left alone.
pub fn cleanup_stale() -> Result<StaleReport> {
    let mut candidates = BTreeSet::new();
    if let Ok(d) = std::fs::read_dir(MARKER_DIR) {
        for e in d.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if ids::is_cluster_id(&n) {
                candidates.insert(n);
            }
        }
    }
    for n in netns::list() {
        if let Some(id) = n.strip_prefix("wt").and_then(|r| r.get(..6)) {
            if ids::is_cluster_id(id) && n.as_bytes().get(8) == Some(&b'-') {
                candidates.insert(id.to_string());
            }
        }
    }
    if let Ok(d) = std::fs::read_dir(cgroup::unified_root()) {
        for e in d.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if let Some(id) = n.strip_prefix("weft-test-") {
                if ids::is_cluster_id(id) {
                    candidates.insert(id.to_string());
                }
            }
        }
    }
    if let Ok(d) = std::fs::read_dir(BPFFS) {
        for e in d.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if let Some(id) = n.strip_prefix("weft-").and_then(|r| r.get(..6)) {
                if ids::is_cluster_id(id) && n.as_bytes().get(11) == Some(&b'-') {
                    candidates.insert(id.to_string());
                }
            }
        }
    }
    let mut report = StaleReport::default();
    let mut first_err = None;
    for id in candidates {
        if owner_alive(&id) {
            continue;
        }
        if let Err(e) = teardown(&id) {
            first_err.get_or_insert(e);
        }
        report.ids.push(id);
    }
    match first_err {
        Some(e) => Err(e.context("cleaning up stale test clusters")),
        None => Ok(report),
    }
}
