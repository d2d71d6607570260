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

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use super::model::{ser_arc, Pod, QosClass, Snapshot};

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

/// A pod of this node and its cgroup.
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadEntry {
    #[serde(serialize_with = "ser_arc")]
    pub pod: Arc<Pod>,
    /// The existing pod cgroup directory (`None`: not created yet, or not on this machine).
    pub cgroup_path: Option<PathBuf>,
    pub cgroup_id: Option<u64>,
    /// The pod's namespace is enrolled, and the pod is neither on the host network nor
    /// terminated: its connections are to be captured (once its cgroup exists).
    pub enrolled: bool,
}

/// The pods of one node by cgroup id. A point-in-time scan: rebuild it when the snapshot changes
/// and from time to time, since the kubelet creates cgroups after pods appear.
#[derive(Debug, Default, Clone)]
pub struct WorkloadIndex {
    entries: Vec<WorkloadEntry>,
    by_id: HashMap<u64, usize>,
}

impl WorkloadIndex {
    /// Resolves the cgroup of every pod of `snapshot` on `node_name` under `cgroup_root`.
    pub fn build(snapshot: &Snapshot, node_name: &str, cgroup_root: &Path) -> WorkloadIndex {
        let mut index = WorkloadIndex::default();
        for pod in snapshot.pods_on_node(node_name) {
            let cgroup_path = find_pod_cgroup(cgroup_root, &pod.uid, pod.qos);
            let cgroup_id = cgroup_path.as_deref().and_then(|p| cgroup_id(p).ok());
            let enrolled = snapshot.namespace_enrolled(&pod.namespace)
                && !pod.host_network
                && !pod.is_terminated();
            if let Some(id) = cgroup_id {
                index.by_id.entry(id).or_insert(index.entries.len());
            }
            index.entries.push(WorkloadEntry {
                pod: pod.clone(),
                cgroup_path,
                cgroup_id,
                enrolled,
            });
        }
        index
    }

    /// The pod whose cgroup id is `id`.
    pub fn by_cgroup(&self, id: u64) -> Option<&Arc<Pod>> {
        self.by_id.get(&id).map(|&i| &self.entries[i].pod)
    }

    /// Cgroup ids of the enrolled pods whose cgroup exists: the capture map's content.
    pub fn enrolled_ids(&self) -> HashSet<u64> {
        self.entries
            .iter()
            .filter(|e| e.enrolled)
            .filter_map(|e| e.cgroup_id)
            .collect()
    }

    /// Every pod of the node, by (namespace, name).
    pub fn entries(&self) -> &[WorkloadEntry] {
        &self.entries
    }
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

    fn pod_yaml(ns: &str, name: &str, uid: &str, node: &str, qos: &str, extra: &str) -> String {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  namespace: {ns}\n  name: {name}\n  uid: {uid}\nspec:\n  nodeName: {node}\n  containers: []\n{extra}status:\n  phase: Running\n  qosClass: {qos}\n"
        )
    }

    #[test]
    fn workload_index_resolves_both_layouts() {
        let uids = [
            "11111111-1111-1111-1111-111111111111",
            "22222222-2222-2222-2222-222222222222",
            "33333333-3333-3333-3333-333333333333",
            "44444444-4444-4444-4444-444444444444",
            "55555555-5555-5555-5555-555555555555",
            "66666666-6666-6666-6666-666666666666",
        ];
        let mut yaml = String::from(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: mesh\n  labels:\n    weft.dev/mesh: enabled\n---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: plain\n",
        );
        yaml += &pod_yaml(
            "mesh",
            "a-systemd-burstable",
            uids[0],
            "n1",
            "Burstable",
            "",
        );
        yaml += &pod_yaml(
            "mesh",
            "b-cgroupfs-guaranteed",
            uids[1],
            "n1",
            "Guaranteed",
            "",
        );
        yaml += &pod_yaml("plain", "c-not-enrolled", uids[2], "n1", "BestEffort", "");
        yaml += &pod_yaml("mesh", "d-no-cgroup", uids[3], "n1", "BestEffort", "");
        yaml += &pod_yaml("mesh", "e-other-node", uids[4], "n2", "BestEffort", "");
        yaml += &pod_yaml(
            "mesh",
            "f-host-network",
            uids[5],
            "n1",
            "BestEffort",
            "  hostNetwork: true\n",
        );
        let snap = Snapshot::from_yaml(&yaml).unwrap();

        let root = tempfile::tempdir().unwrap();
        let a = pod_cgroup_paths(root.path(), uids[0], QosClass::Burstable)[0].clone();
        let b = pod_cgroup_paths(root.path(), uids[1], QosClass::Guaranteed)[1].clone();
        let c = pod_cgroup_paths(root.path(), uids[2], QosClass::BestEffort)[0].clone();
        let e = pod_cgroup_paths(root.path(), uids[4], QosClass::BestEffort)[1].clone();
        let f = pod_cgroup_paths(root.path(), uids[5], QosClass::BestEffort)[1].clone();
        for dir in [&a, &b, &c, &e, &f] {
            std::fs::create_dir_all(dir.join("container0")).unwrap();
        }
        let id = |p: &Path| cgroup_id(p).unwrap();

        let index = WorkloadIndex::build(&snap, "n1", root.path());
        let names: Vec<&str> = index
            .entries()
            .iter()
            .map(|e| e.pod.name.as_str())
            .collect();
        assert_eq!(
            names,
            [
                "a-systemd-burstable",
                "b-cgroupfs-guaranteed",
                "d-no-cgroup",
                "f-host-network",
                "c-not-enrolled"
            ]
        );
        let entry = |name: &str| index.entries().iter().find(|e| e.pod.name == name).unwrap();
        assert_eq!(
            entry("a-systemd-burstable").cgroup_path.as_deref(),
            Some(a.as_path())
        );
        assert_eq!(
            entry("b-cgroupfs-guaranteed").cgroup_path.as_deref(),
            Some(b.as_path())
        );
        assert_eq!(entry("d-no-cgroup").cgroup_path, None);
        assert_eq!(entry("d-no-cgroup").cgroup_id, None);
        assert!(entry("d-no-cgroup").enrolled);
        assert!(!entry("c-not-enrolled").enrolled);
        assert!(!entry("f-host-network").enrolled);

        assert_eq!(index.enrolled_ids(), HashSet::from([id(&a), id(&b)]));
        assert_eq!(index.by_cgroup(id(&a)).unwrap().name, "a-systemd-burstable");
        assert_eq!(index.by_cgroup(id(&c)).unwrap().name, "c-not-enrolled");
        assert!(index.by_cgroup(id(&e)).is_none(), "other node's pod");
        assert!(index.by_cgroup(id(&a.join("container0"))).is_none());

        let json = serde_json::to_value(index.entries()).unwrap();
        assert_eq!(json[0]["pod"]["name"], "a-systemd-burstable");
        assert_eq!(json[0]["cgroup_id"], id(&a));
        assert_eq!(json[0]["enrolled"], true);
    }
}
