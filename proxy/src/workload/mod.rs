//! Identify: which workload a connection belongs to, and who that workload is.
//!
//! The eBPF programs report the pod cgroup a socket lives in; [`cgroup`] knows where the
//! kubelet puts each pod's cgroup and computes cgroup ids (the one place that does);
//! [`WorkloadIndex`] maps the ids back to the pods of this node; [`identity_of`] gives a pod
//! its SPIFFE identity. The source address never decides who is calling.
//!
//! May import: `registry`, `identity`.

pub mod cgroup;
mod index;

pub use cgroup::{cgroup_id, cgroup_ids_below, find_pod_cgroup, pod_cgroup_paths};
pub use index::{WorkloadEntry, WorkloadIndex};

use crate::identity::SpiffeId;
use crate::registry::Pod;

/// The SPIFFE identity of a pod: `spiffe://<td>/ns/<namespace>/sa/<serviceAccount>`.
pub fn identity_of(trust_domain: &str, pod: &Pod) -> Option<SpiffeId> {
    SpiffeId::new(trust_domain, &pod.namespace, &pod.service_account).ok()
}
