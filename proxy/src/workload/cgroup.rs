//! Pod → cgroup: where the kubelet puts a pod's cgroup (cgroup v2) and its cgroup id, which is
//! what the eBPF programs see (`bpf_get_current_ancestor_cgroup_id`).
//!
//! Layouts under the cgroup root, by kubelet cgroup driver (`<uid_>` is the uid with `-` → `_`):
//!
//! | driver   | Guaranteed                                  | Burstable / BestEffort                                                  |
//! |----------|---------------------------------------------|-------------------------------------------------------------------------|
//! | systemd  | `kubepods.slice/kubepods-pod<uid_>.slice`   | `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice`    |
//! | cgroupfs | `kubepods/pod<uid>`                         | `kubepods/<qos>/pod<uid>`                                               |
//!
//! with `<qos>` = `burstable` or `besteffort`. Containers sit below the pod directory.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::registry::QosClass;

/// The QoS directory component (`None` for Guaranteed pods, which sit directly under kubepods).
fn qos_dir(qos: QosClass) -> Option<&'static str> {
    match qos {
        QosClass::Guaranteed => None,
        QosClass::Burstable => Some("burstable"),
        QosClass::BestEffort => Some("besteffort"),
    }
}

/// The pod's cgroup directory under `root` for the systemd driver (`[0]`) and the cgroupfs
/// driver (`[1]`).
pub fn pod_cgroup_paths(root: &Path, uid: &str, qos: QosClass) -> [PathBuf; 2] {
    let uid_ = uid.replace('-', "_");
    match qos_dir(qos) {
        None => [
            root.join("kubepods.slice")
                .join(format!("kubepods-pod{uid_}.slice")),
            root.join("kubepods").join(format!("pod{uid}")),
        ],
        Some(q) => [
            root.join("kubepods.slice")
                .join(format!("kubepods-{q}.slice"))
                .join(format!("kubepods-{q}-pod{uid_}.slice")),
            root.join("kubepods").join(q).join(format!("pod{uid}")),
        ],
    }
}

/// The pod's cgroup directory that exists (systemd layout first), if any.
pub fn find_pod_cgroup(root: &Path, uid: &str, qos: QosClass) -> Option<PathBuf> {
    pod_cgroup_paths(root, uid, qos)
        .into_iter()
        .find(|p| p.is_dir())
}

/// The cgroup v2 id of a cgroup directory: its kernfs node id, read with `name_to_handle_at`
/// on a cgroup2 filesystem; elsewhere (or if that fails) the directory's inode number, which is
/// the same number on 64-bit kernels.
pub fn cgroup_id(path: &Path) -> io::Result<u64> {
    let meta = std::fs::metadata(path)?;
    if !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotADirectory,
            format!("{} is not a directory", path.display()),
        ));
    }
    let on_cgroup2 = nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC);
    if on_cgroup2 {
        if let Ok(id) = kernfs_id(path) {
            return Ok(id);
        }
    }
    Ok(meta.ino())
}

/// `name_to_handle_at` on a kernfs file: the 8-byte handle is the node id.
fn kernfs_id(path: &Path) -> io::Result<u64> {
    #[repr(C)]
    struct Handle {
        handle_bytes: libc::c_uint,
        handle_type: libc::c_int,
        f_handle: [u8; 8],
    }
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let mut handle = Handle {
        handle_bytes: 8,
        handle_type: 0,
        f_handle: [0; 8],
    };
    let mut mount_id: libc::c_int = 0;
    // SAFETY: `c_path` is NUL-terminated; `handle` is a `struct file_handle` header followed by
    // `handle_bytes` (8) bytes of room, and the kernel writes at most that many.
    let rc = unsafe {
        libc::name_to_handle_at(
            libc::AT_FDCWD,
            c_path.as_ptr(),
            (&mut handle as *mut Handle).cast::<libc::file_handle>(),
            &mut mount_id,
            0,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if handle.handle_bytes != 8 {
        return Err(io::Error::other("unexpected cgroup file handle size"));
    }
    Ok(u64::from_ne_bytes(handle.f_handle))
}

/// The ids of `cgroup` and of the cgroups below it (a pod's containers), four levels down.
pub fn cgroup_ids_below(cgroup: &Path) -> Vec<u64> {
    let mut ids = Vec::new();
    let mut dirs = vec![(cgroup.to_path_buf(), 0)];
    while let Some((dir, depth)) = dirs.pop() {
        let Ok(id) = cgroup_id(&dir) else { continue };
        ids.push(id);
        if depth < 4 {
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for e in entries.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        dirs.push((e.path(), depth + 1));
                    }
                }
            }
        }
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0";

    #[test]
    fn layouts() {
        let root = Path::new("/sys/fs/cgroup");
        let [systemd, cgroupfs] = pod_cgroup_paths(root, UID, QosClass::Burstable);
        assert_eq!(
            systemd,
            Path::new("/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0b1c2d3e_4f50_6172_8394_a5b6c7d8e9f0.slice")
        );
        assert_eq!(
            cgroupfs,
            Path::new("/sys/fs/cgroup/kubepods/burstable/pod0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0")
        );
        let [systemd, cgroupfs] = pod_cgroup_paths(root, UID, QosClass::BestEffort);
        assert_eq!(
            systemd,
            Path::new("/sys/fs/cgroup/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0b1c2d3e_4f50_6172_8394_a5b6c7d8e9f0.slice")
        );
        assert_eq!(
            cgroupfs,
            Path::new("/sys/fs/cgroup/kubepods/besteffort/pod0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0")
        );
        let [systemd, cgroupfs] = pod_cgroup_paths(root, UID, QosClass::Guaranteed);
        assert_eq!(
            systemd,
            Path::new("/sys/fs/cgroup/kubepods.slice/kubepods-pod0b1c2d3e_4f50_6172_8394_a5b6c7d8e9f0.slice")
        );
        assert_eq!(
            cgroupfs,
            Path::new("/sys/fs/cgroup/kubepods/pod0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0")
        );
    }

    #[test]
    fn cgroup_id_is_the_inode_outside_cgroupfs() {
        let dir = tempfile::tempdir().unwrap();
        let id = cgroup_id(dir.path()).unwrap();
        assert_eq!(id, std::fs::metadata(dir.path()).unwrap().ino());
        let file = dir.path().join("f");
        std::fs::write(&file, "").unwrap();
        assert!(cgroup_id(&file).is_err());
        assert!(cgroup_id(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn cgroup_id_on_cgroup2_matches_the_inode() {
        // The node's own cgroup2 mount, when there is one: the handle id and the inode agree.
        let root = Path::new("/sys/fs/cgroup");
        let Ok(fs) = nix::sys::statfs::statfs(root) else {
            return;
        };
        if fs.filesystem_type() != nix::sys::statfs::CGROUP2_SUPER_MAGIC {
            return;
        }
        if let Ok(id) = kernfs_id(root) {
            assert_eq!(id, std::fs::metadata(root).unwrap().ino());
        }
    }

    #[test]
    fn a_cgroup_and_the_cgroups_below_it() {
        let dir = tempfile::tempdir().unwrap();
        let container = dir.path().join("cri-containerd-1.scope");
        std::fs::create_dir(&container).unwrap();
        let ids = cgroup_ids_below(dir.path());
        assert_eq!(ids.len(), 2, "{ids:?}");
        assert!(ids.contains(&cgroup_id(dir.path()).unwrap()));
        assert!(ids.contains(&cgroup_id(&container).unwrap()));
        assert!(cgroup_ids_below(&dir.path().join("gone")).is_empty());
    }
}
