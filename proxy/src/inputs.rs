//! What both directions of the data path read, in one bundle built by `node`: the node's
//! identity in the mesh, the registry and the policies in force, the workloads of this node,
//! the upstream connector and the telemetry sinks. Functions take the bundle, not seven
//! arguments.
//!
//! May import: `drain`, `registry`, `policy`, `l7`, `workload`, `upstream`, `telemetry`.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::drain::Draining;
use crate::l7::route::RouteTable;
use crate::policy::PolicySet;
use crate::registry::Registry;
use crate::telemetry::Telemetry;
use crate::upstream::Connector;
use crate::workload::WorkloadIndex;

pub struct ProxyInputs {
    /// This node's name (pods are hosted here when `spec.nodeName` matches).
    pub node: String,
    /// SPIFFE trust domain of the mesh.
    pub trust_domain: String,
    /// HBONE port on every node.
    pub hbone_port: u16,
    pub registry: Arc<Registry>,
    /// Compiled from the registry's snapshot on every change.
    pub policies: Arc<ArcSwap<PolicySet>>,
    /// The registry generation `policies` were compiled from, told to whoever holds a
    /// connection admitted under older ones.
    pub policy_generation: tokio::sync::watch::Sender<u64>,
    /// Compiled from the registry's snapshot on every change.
    pub routes: Arc<ArcSwap<RouteTable>>,
    /// The pods of this node by cgroup, rescanned as cgroups appear.
    pub workloads: Arc<ArcSwap<WorkloadIndex>>,
    pub connector: Connector,
    pub telemetry: Arc<Telemetry>,
    /// Whether the node is draining (it stops: finish what is open, accept nothing new).
    pub draining: Draining,
}

impl std::fmt::Debug for ProxyInputs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyInputs")
            .field("node", &self.node)
            .field("trust_domain", &self.trust_domain)
            .field("hbone_port", &self.hbone_port)
            .finish_non_exhaustive()
    }
}
