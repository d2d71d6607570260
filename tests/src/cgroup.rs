//! cgroup v2 (unified hierarchy) helpers and the kubelet pod cgroup layouts.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where the unified (v2) hierarchy is mounted: `/sys/fs/cgroup` on a pure cgroup v2 host,
/// `/sys/fs/cgroup/unified` on a hybrid one. The v1 hierarchies are never used.
pub fn unified_root() -> &'static Path {
    static ROOT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| {
        let pure = Path::new("/sys/fs/cgroup");
        if pure.join("cgroup.controllers").exists() {
            pure.to_path_buf()
        } else {
            pure.join("unified")
        }
    })
}

/// Quality-of-service class of a pod (decides the kubelet cgroup parent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Qos {
    #[default]
    BestEffort,
    Burstable,
    Guaranteed,
}

impl Qos {
    /// As in `status.qosClass`.
    pub fn as_str(self) -> &'static str {
        match self {
            Qos::BestEffort => "BestEffort",
            Qos::Burstable => "Burstable",
            Qos::Guaranteed => "Guaranteed",
        }
    }

    fn lower(self) -> &'static str {
        match self {
            Qos::BestEffort => "besteffort",
            Qos::Burstable => "burstable",
            Qos::Guaranteed => "guaranteed",
        }
    }
}

/// The kubelet's cgroup driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CgroupDriver {
    #[default]
    Systemd,
    Cgroupfs,
}

/// Relative paths (below the node's cgroup root) of a pod's cgroup and of its container's cgroup,
/// exactly as the kubelet + containerd lay them out.
///
/// systemd: `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice/cri-containerd-<id>.scope`
/// (Guaranteed: `kubepods.slice/kubepods-pod<uid_>.slice/…`);
/// cgroupfs: `kubepods/<qos>/pod<uid>/<id>` (Guaranteed: `kubepods/pod<uid>/<id>`).
pub fn kubelet_layout(
    driver: CgroupDriver,
    qos: Qos,
    uid: &str,
    container_id: &str,
) -> (PathBuf, PathBuf) {
    let pod = match driver {
        CgroupDriver::Systemd => {
            let u = uid.replace('-', "_");
            match qos {
                Qos::Guaranteed => PathBuf::from(format!("kubepods.slice/kubepods-pod{u}.slice")),
                q => {
                    let q = q.lower();
                    PathBuf::from(format!(
                        "kubepods.slice/kubepods-{q}.slice/kubepods-{q}-pod{u}.slice"
                    ))
                }
            }
        }
        CgroupDriver::Cgroupfs => match qos {
            Qos::Guaranteed => PathBuf::from(format!("kubepods/pod{uid}")),
            q => PathBuf::from(format!("kubepods/{}/pod{uid}", q.lower())),
        },
    };
    let container = match driver {
        CgroupDriver::Systemd => pod.join(format!("cri-containerd-{container_id}.scope")),
        CgroupDriver::Cgroupfs => pod.join(container_id),
    };
    (pod, container)
}

/// `mkdir -p` below the unified root.
pub fn create(path: &Path) -> Result<()> {
    if !path.starts_with(unified_root()) {
        bail!(
            "{} is not below {}",
            path.display(),
            unified_root().display()
        );
    }
    std::fs::create_dir_all(path).with_context(|| format!("creating cgroup {}", path.display()))
}

/// The path of a cgroup as its members see it in `/proc/<pid>/cgroup` (`0::<this>`).
pub fn relative(path: &Path) -> String {
    let rel = path.strip_prefix(unified_root()).unwrap_or(path);
    format!("/{}", rel.display())
}

/// The unified-hierarchy path of a process (`0::/…` line of /proc/<pid>/cgroup).
pub fn of_pid(pid: u32) -> Result<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .with_context(|| format!("reading /proc/{pid}/cgroup"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
        .context("no unified (0::) entry in /proc/<pid>/cgroup")
}

/// The cgroup id (inode of the cgroup directory), as `bpf_get_current_cgroup_id` reports it.
pub fn id(path: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .ino())
}

/// Pids directly in this cgroup.
pub fn procs(path: &Path) -> Vec<u32> {
    std::fs::read_to_string(path.join("cgroup.procs"))
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

fn populated(path: &Path) -> bool {
    match std::fs::read_to_string(path.join("cgroup.events")) {
        Ok(s) => s.lines().any(|l| l.trim() == "populated 1"),
        Err(_) => false,
    }
}

/// Kill every process in the subtree (cgroup.kill, with a per-pid fallback) and wait until it is
/// empty.
pub fn kill_all(path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    if std::fs::write(path.join("cgroup.kill"), "1").is_err() {
        kill_each(path);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while populated(path) {
        if Instant::now() > deadline {
            bail!("cgroup {} still populated after kill", path.display());
        }
        kill_each(path);
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn kill_each(path: &Path) {
    for pid in procs(path) {
        // SAFETY: plain kill(2).
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    if let Ok(d) = std::fs::read_dir(path) {
        for e in d.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                kill_each(&e.path());
            }
        }
    }
}

/// Kill everything in the subtree, then remove it bottom-up. A missing cgroup is not an error.
pub fn remove_tree(path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    if !path.starts_with(unified_root()) || path == unified_root() {
        bail!("refusing to remove {}", path.display());
    }
    kill_all(path)?;
    rmdir_bottom_up(path)
}

fn rmdir_bottom_up(path: &Path) -> Result<()> {
    if let Ok(d) = std::fs::read_dir(path) {
        for e in d.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                rmdir_bottom_up(&e.path())?;
            }
        }
    }
    let mut tries = 0;
    loop {
        match std::fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if tries < 200 => {
                tries += 1;
                if tries % 20 == 0 {
                    kill_each(path);
                }
                let _ = e;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e).with_context(|| format!("rmdir {}", path.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts() {
        let uid = "0f1e2d3c-aaaa-4bbb-8ccc-0123456789ab";
        let (p, c) = kubelet_layout(CgroupDriver::Systemd, Qos::Burstable, uid, "ab");
        assert_eq!(
            p,
            Path::new("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0f1e2d3c_aaaa_4bbb_8ccc_0123456789ab.slice")
        );
        assert_eq!(c, p.join("cri-containerd-ab.scope"));
        let (p, _) = kubelet_layout(CgroupDriver::Systemd, Qos::Guaranteed, uid, "ab");
        assert_eq!(
            p,
            Path::new("kubepods.slice/kubepods-pod0f1e2d3c_aaaa_4bbb_8ccc_0123456789ab.slice")
        );
        let (p, c) = kubelet_layout(CgroupDriver::Cgroupfs, Qos::BestEffort, uid, "ab");
        assert_eq!(
            p,
            Path::new("kubepods/besteffort/pod0f1e2d3c-aaaa-4bbb-8ccc-0123456789ab")
        );
        assert_eq!(c, p.join("ab"));
        let (p, _) = kubelet_layout(CgroupDriver::Cgroupfs, Qos::Guaranteed, uid, "ab");
        assert_eq!(
            p,
            Path::new("kubepods/pod0f1e2d3c-aaaa-4bbb-8ccc-0123456789ab")
        );
    }
}
