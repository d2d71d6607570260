//! The pods of this node by cgroup id: how a connection's cgroup (reported by the eBPF
//! programs) becomes a workload.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use super::cgroup::{cgroup_id, find_pod_cgroup};
use super::identity_of;
use crate::identity::SpiffeId;
use crate::registry::{ser_arc, Pod, Snapshot};

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
    by_ip: HashMap<std::net::IpAddr, usize>,
}

impl WorkloadIndex {
    /// Resolves the cgroup of every pod of `snapshot` on `node_name` under `cgroup_root`.
    pub fn build(snapshot: &Snapshot, node_name: &str, cgroup_root: &Path) -> WorkloadIndex {
        let mut index = WorkloadIndex::default();
        for pod in snapshot.pods_on_node(node_name) {
            let cgroup_path = find_pod_cgroup(cgroup_root, &pod.uid, pod.qos);
            let cgroup_id = cgroup_path.as_deref().and_then(|p| cgroup_id(p).ok());
            let enrolled = snapshot.in_mesh(pod) && !pod.is_terminated();
            if let Some(id) = cgroup_id {
                index.by_id.entry(id).or_insert(index.entries.len());
            }
            if !pod.host_network && !pod.is_terminated() {
                for ip in &pod.ips {
                    index.by_ip.entry(*ip).or_insert(index.entries.len());
                }
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

    /// The running pod (not on the host network) of this node at `ip`.
    pub fn by_ip(&self, ip: std::net::IpAddr) -> Option<&WorkloadEntry> {
        self.by_ip.get(&ip).map(|&i| &self.entries[i])
    }

    /// Cgroup ids of the enrolled pods whose cgroup exists: the capture map's content.
    pub fn enrolled_ids(&self) -> HashSet<u64> {
        self.entries
            .iter()
            .filter(|e| e.enrolled)
            .filter_map(|e| e.cgroup_id)
            .collect()
    }

    /// The identities of the enrolled pods: the only SVIDs this node may hold.
    pub fn identities(&self, trust_domain: &str) -> HashSet<SpiffeId> {
        self.entries
            .iter()
            .filter(|e| e.enrolled)
            .filter_map(|e| identity_of(trust_domain, &e.pod))
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
    use crate::registry::QosClass;
    use crate::workload::cgroup::pod_cgroup_paths;

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
