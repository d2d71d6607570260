//! The network namespaces of this node's pods, found from their cgroups and kept while the pods
//! run: what the connector and the tunnel pool open a pod's connections in.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use tracing::debug;

use crate::netns::{PodNetns, PodNetworks};
use crate::workload::WorkloadIndex;

/// Namespaces by pod uid, each with the address it was found for (a pod sandbox made anew gets
/// a new namespace and a new address).
#[derive(Debug)]
pub(super) struct Networks {
    workloads: Arc<ArcSwap<WorkloadIndex>>,
    found: Mutex<HashMap<String, (IpAddr, Arc<PodNetns>)>>,
}

impl Networks {
    pub(super) fn new(workloads: Arc<ArcSwap<WorkloadIndex>>) -> Networks {
        Networks {
            workloads,
            found: Mutex::default(),
        }
    }

    /// Lets go of the namespaces of pods that are no longer on this node.
    pub(super) fn retain_current(&self) {
        let index = self.workloads.load();
        self.found
            .lock()
            .retain(|uid, (ip, _)| index.by_ip(*ip).is_some_and(|e| &e.pod.uid == uid));
    }
}

impl PodNetworks for Networks {
    fn of_pod(&self, ip: IpAddr) -> Option<Arc<PodNetns>> {
        let index = self.workloads.load();
        let entry = index.by_ip(ip)?;
        if let Some((found_ip, ns)) = self.found.lock().get(&entry.pod.uid) {
            if *found_ip == ip {
                return Some(ns.clone());
            }
        }
        let cgroup = entry.cgroup_path.as_deref()?;
        match PodNetns::of_cgroup(cgroup) {
            Ok(Some(ns)) => {
                let ns = Arc::new(ns);
                self.found
                    .lock()
                    .insert(entry.pod.uid.clone(), (ip, ns.clone()));
                Some(ns)
            }
            Ok(None) => None,
            Err(e) => {
                debug!(pod = %format!("{}/{}", entry.pod.namespace, entry.pod.name), error = %e, "no network namespace");
                None
            }
        }
    }
}
