//! weft's compact view of the cluster: the immutable [`Snapshot`] and its queries.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Serialize, Serializer};

use super::kinds::gateway::{GrpcRoute, HttpRoute};
use super::kinds::networking::{DestinationRule, ServiceEntry, VirtualService};
use super::kinds::security::{AuthorizationPolicy, PeerAuthentication};

/// Namespace label that enrolls a namespace's pods in the mesh (with [`ENROLL_VALUE`]).
pub const ENROLL_LABEL: &str = "weft.dev/mesh";
/// Value of [`ENROLL_LABEL`] that enrolls a namespace.
pub const ENROLL_VALUE: &str = "enabled";

/// The cluster's DNS domain: a Service is `name.namespace.svc.cluster.local` (Kubernetes'
/// default, which Istio assumes too).
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// Labels of an object (also used for selectors).
pub type Labels = BTreeMap<String, String>;

/// Kubernetes QoS class of a pod (`status.qosClass`); decides where the kubelet puts its cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    #[default]
    BestEffort,
}

impl QosClass {
    /// The Kubernetes spelling (`Guaranteed`, `Burstable`, `BestEffort`).
    pub fn as_str(self) -> &'static str {
        match self {
            QosClass::Guaranteed => "Guaranteed",
            QosClass::Burstable => "Burstable",
            QosClass::BestEffort => "BestEffort",
        }
    }

    /// Parses the Kubernetes spelling.
    pub fn parse(s: &str) -> Option<QosClass> {
        match s {
            "Guaranteed" => Some(QosClass::Guaranteed),
            "Burstable" => Some(QosClass::Burstable),
            "BestEffort" => Some(QosClass::BestEffort),
            _ => None,
        }
    }
}

/// A port declared by one of a pod's containers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ContainerPort {
    pub name: Option<String>,
    pub port: u16,
    /// `TCP`, `UDP` or `SCTP` (default `TCP`).
    pub protocol: String,
}

/// A pod, reduced to what the data plane needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub node_name: Option<String>,
    /// Primary pod IP (`status.podIP`, else the first of `status.podIPs`).
    pub ip: Option<IpAddr>,
    /// All pod IPs, primary first (dual stack).
    pub ips: Vec<IpAddr>,
    pub labels: Labels,
    /// `spec.serviceAccountName` (default `default`).
    pub service_account: String,
    /// Ready condition is `True`; without conditions, phase is `Running`.
    pub ready: bool,
    /// `status.phase` as given (`Pending`, `Running`, `Succeeded`, `Failed`, `Unknown`).
    pub phase: Option<String>,
    pub qos: QosClass,
    /// `spec.hostNetwork`: the pod shares its node's network and cgroup identity is not its own IP.
    pub host_network: bool,
    pub ports: Vec<ContainerPort>,
    /// TCP ports the kubelet probes (liveness, readiness, startup: `httpGet`, `tcpSocket`,
    /// `grpc`; named ports resolved in their container), sorted, without duplicates. A STRICT
    /// pod accepts plaintext from its node on these only.
    pub probe_ports: Vec<u16>,
    /// The object that owns the pod (`metadata.ownerReferences`): the one marked
    /// `controller: true`, else the first one; `None` for a pod nothing owns. Its workload
    /// is derived from it (see [`super::workload::workload_of`]).
    pub owner: Option<Owner>,
    /// `metadata.generateName`, when the pod's name was generated: a controller made it
    /// (Istio only looks at the owner of such a pod).
    pub generate_name: Option<String>,
}

/// A pod's owner, from its `metadata.ownerReferences`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Owner {
    /// `ReplicaSet`, `StatefulSet`, `DaemonSet`, `Job`, …, as written.
    pub kind: String,
    pub name: String,
    /// The reference is marked `controller: true` (the object managing the pod, as opposed to
    /// one that merely owns it for garbage collection).
    pub controller: bool,
}

impl Pod {
    /// Phase `Succeeded` or `Failed`: the pod's IP may already belong to another pod.
    pub fn is_terminated(&self) -> bool {
        matches!(self.phase.as_deref(), Some("Succeeded" | "Failed"))
    }

    /// Container port named `name` with protocol `protocol` (Kubernetes named-port lookup).
    pub fn named_port(&self, name: &str, protocol: &str) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.name.as_deref() == Some(name) && p.protocol == protocol)
            .map(|p| p.port)
    }

    /// Whether every `key=value` of `selector` is among the pod's labels.
    pub fn matches(&self, selector: &Labels) -> bool {
        selector.iter().all(|(k, v)| self.labels.get(k) == Some(v))
    }
}

/// Where a service port sends traffic on the selected pods.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(untagged)]
pub enum TargetPort {
    Number(u16),
    /// A container port name, looked up in each endpoint pod.
    Name(String),
}

/// One port of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    /// Absent in the source → `Number(port)`.
    pub target_port: TargetPort,
    /// `TCP`, `UDP` or `SCTP` (default `TCP`).
    pub protocol: String,
    pub app_protocol: Option<String>,
}

/// A service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    /// `None` for headless (`clusterIP: None`) and ExternalName services.
    pub cluster_ip: Option<IpAddr>,
    /// All cluster IPs, primary first (dual stack); empty when `cluster_ip` is `None`.
    pub cluster_ips: Vec<IpAddr>,
    /// `None` when absent or empty: such a service has no automatic endpoints.
    pub selector: Option<Labels>,
    pub ports: Vec<ServicePort>,
}

impl Service {
    /// The service port `port`/`protocol`.
    pub fn port(&self, port: u16, protocol: &str) -> Option<&ServicePort> {
        self.ports
            .iter()
            .find(|p| p.port == port && p.protocol == protocol)
    }
}

/// An EndpointSlice (`discovery.k8s.io/v1`): where present for a Service, its endpoints are
/// the slices' ready addresses of known pods, as kube-proxy takes them, instead of the pods the
/// selector picks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EndpointSlice {
    pub namespace: String,
    pub name: String,
    /// The Service it belongs to (label `kubernetes.io/service-name`).
    pub service: String,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<SliceEndpoint>,
}

/// A port of an EndpointSlice: its name is the Service port's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SlicePort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: String,
}

/// One address of an EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SliceEndpoint {
    pub ip: IpAddr,
    /// `conditions.ready` (absent: ready) and not terminating.
    pub ready: bool,
}

/// A node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Node {
    pub name: String,
    /// IP addresses from `status.addresses`: `InternalIP` ones first, then `ExternalIP`.
    pub addresses: Vec<IpAddr>,
    pub labels: Labels,
}

impl Node {
    /// The node's IPv4 address: its first IPv4 `InternalIP`, else `ExternalIP`. Other nodes
    /// dial HBONE there, and the proxy listens there unless told otherwise.
    pub fn ipv4(&self) -> Option<IpAddr> {
        self.addresses.iter().find(|a| a.is_ipv4()).copied()
    }
}

/// A document of a kind weft does not model (yet): Istio routing, Gateway API, …, kept for later
/// stages.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RawObject {
    pub api_version: String,
    pub kind: String,
    /// `metadata.namespace` as written (absent for cluster-scoped objects or the default namespace).
    pub namespace: Option<String>,
    pub name: String,
    /// The whole document.
    pub value: serde_json::Value,
}

impl RawObject {
    /// The object's namespace, `default` when none is written (as `kubectl apply` does).
    pub fn namespace_or_default(&self) -> &str {
        self.namespace.as_deref().unwrap_or("default")
    }
}

/// A problem with one object of the sources: one left out (invalid, or an unknown kind or
/// version in a group weft reads) or applied with a warning, and why. Shown by `weft status`
/// and `/config_dump`, logged when loaded; the source reports it where the object lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// Where it came from: `file:line: document N`, or `kubernetes` for the API.
    pub origin: String,
    /// `Kind namespace/name`.
    pub object: String,
    pub reason: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.object.is_empty() {
            write!(f, "{}: {}", self.origin, self.reason)
        } else {
            write!(f, "{} ({}): {}", self.origin, self.object, self.reason)
        }
    }
}

/// A security object weft cannot apply (an unknown kind or version in `security.istio.io`, or
/// an invalid AuthorizationPolicy or PeerAuthentication): what it could select fails closed,
/// as [`FailClosed::effect`] says, until it is fixed or removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailClosed {
    /// `Kind`, as written.
    pub kind: String,
    pub namespace: String,
    pub name: String,
    /// `spec.selector.matchLabels` when it could be read; `None`: every pod in scope.
    pub selector: Option<Labels>,
    pub effect: FailEffect,
    pub reason: String,
}

/// How an object weft cannot apply fails closed on the pods it could select.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailEffect {
    /// Every connection denied, plaintext refused as if STRICT: a DENY or CUSTOM policy, an
    /// unknown action or kind — whatever it could have denied, it denies.
    DenyAll,
    /// An ALLOW policy: present but matching nothing, so only what the pods' other ALLOW
    /// policies allow is allowed (nothing, when it was the only one).
    AllowNothing,
    /// A PeerAuthentication: plaintext refused as if STRICT; mesh traffic unaffected.
    Strict,
}

impl FailClosed {
    /// Whether this object could select `pod`: its selector (or every pod) in its namespace, in
    /// every namespace when it lives in the root namespace.
    pub fn could_select(&self, pod: &Pod, root_namespace: &str) -> bool {
        (self.namespace == pod.namespace || self.namespace == root_namespace)
            && self.selector.as_ref().is_none_or(|s| pod.matches(s))
    }

    /// `Kind ns/name` and the workloads it covers, in words: `AuthorisationPolicy
    /// back/deny (the pods labelled app=web in namespace back)`.
    pub fn describe(&self, root_namespace: &str) -> String {
        let namespaces = if self.namespace == root_namespace {
            "in every namespace".to_string()
        } else {
            format!("in namespace {}", self.namespace)
        };
        let pods = match &self.selector {
            Some(labels) if !labels.is_empty() => {
                let sel: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!("the pods labelled {}", sel.join(","))
            }
            _ => "all pods".to_string(),
        };
        format!(
            "{} {}/{} ({pods} {namespaces})",
            self.kind, self.namespace, self.name
        )
    }
}

/// What an original destination is (see [`Snapshot::resolve`]).
#[derive(Debug, Clone)]
pub enum Resolved {
    /// A service VIP and one of its TCP ports.
    Service {
        service: Arc<Service>,
        port: ServicePort,
    },
    /// A pod IP (of a pod that is not terminated and not on the host network).
    Pod(Arc<Pod>),
    /// Anything else (outside the cluster, a node, a service VIP on a port it does not expose, …).
    Passthrough,
}

/// A ready endpoint of a service port.
#[derive(Debug, Clone, Serialize)]
pub struct Endpoint {
    #[serde(serialize_with = "ser_arc")]
    pub pod: Arc<Pod>,
    pub addr: SocketAddr,
}

/// An immutable view of the cluster. Built once (see `SnapshotBuilder`), shared behind an `Arc`, never
/// mutated: a change builds a new snapshot.
#[derive(Debug, Serialize)]
pub struct Snapshot {
    /// Incremented on every successful (re)load that changed something.
    pub generation: u64,
    #[serde(serialize_with = "ser_time")]
    pub loaded_at: SystemTime,
    /// Files the snapshot was read from, in load order.
    pub sources: Vec<PathBuf>,
    /// Namespace name → labels.
    /// Shared by the snapshots after this one while no namespace changes.
    pub namespaces: Arc<BTreeMap<String, Labels>>,
    pub nodes: Arc<BTreeMap<String, Node>>,
    /// Sorted by (namespace, name).
    #[serde(serialize_with = "ser_arc_vec")]
    pub pods: Vec<Arc<Pod>>,
    /// Sorted by (namespace, name).
    #[serde(serialize_with = "ser_arc_vec")]
    pub services: Vec<Arc<Service>>,
    /// Sorted by (namespace, name).
    #[serde(serialize_with = "ser_arc_vec")]
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    /// Sorted by (namespace, name).
    #[serde(serialize_with = "ser_arc_vec")]
    pub authorization_policies: Vec<Arc<AuthorizationPolicy>>,
    /// Sorted by (namespace, name).
    #[serde(serialize_with = "ser_arc_vec")]
    pub peer_authentications: Vec<Arc<PeerAuthentication>>,
    /// Sorted by (namespace, name), as every routing kind below.
    #[serde(serialize_with = "ser_arc_vec")]
    pub virtual_services: Vec<Arc<VirtualService>>,
    #[serde(serialize_with = "ser_arc_vec")]
    pub destination_rules: Vec<Arc<DestinationRule>>,
    #[serde(serialize_with = "ser_arc_vec")]
    pub service_entries: Vec<Arc<ServiceEntry>>,
    #[serde(serialize_with = "ser_arc_vec")]
    pub http_routes: Vec<Arc<HttpRoute>>,
    #[serde(serialize_with = "ser_arc_vec")]
    pub grpc_routes: Vec<Arc<GrpcRoute>>,
    /// Documents of other kinds, in load order.
    pub others: Vec<RawObject>,
    /// Security objects weft cannot apply: what they could select fails closed.
    pub fail_closed: Vec<FailClosed>,
    /// Objects of the sources that were left out, and why.
    pub not_applied: Vec<Problem>,
    /// Objects applied with a field that is likely a mistake (a `targetPort` name no selected
    /// pod declares, …).
    pub warnings: Vec<Problem>,
    #[serde(skip)]
    index: Index,
}

/// The objects a snapshot is built from (see `SnapshotBuilder`).
#[derive(Debug, Default)]
pub(crate) struct Objects {
    pub namespaces: BTreeMap<String, Labels>,
    pub nodes: BTreeMap<String, Node>,
    pub pods: Vec<Arc<Pod>>,
    pub services: Vec<Arc<Service>>,
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    pub authorization_policies: Vec<Arc<AuthorizationPolicy>>,
    pub peer_authentications: Vec<Arc<PeerAuthentication>>,
    pub virtual_services: Vec<Arc<VirtualService>>,
    pub destination_rules: Vec<Arc<DestinationRule>>,
    pub service_entries: Vec<Arc<ServiceEntry>>,
    pub http_routes: Vec<Arc<HttpRoute>>,
    pub grpc_routes: Vec<Arc<GrpcRoute>>,
    pub others: Vec<RawObject>,
    pub fail_closed: Vec<FailClosed>,
    pub not_applied: Vec<Problem>,
    pub warnings: Vec<Problem>,
}

/// The snapshot's indexes: rebuilt on every change, so hashed with foldhash (the keys are the
/// cluster's own addresses and names, and the data path looks them up per connection).
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

#[derive(Debug, Default)]
struct Index {
    /// Pod IP → index in `pods` (pods with an IP, not terminated, not host network).
    pod_by_ip: FastMap<IpAddr, usize>,
    /// Node name → indexes in `pods`, sorted by (namespace, name).
    pods_by_node: FastMap<String, Vec<usize>>,
    /// Whether two indexed pods share an address (only the first is in `pod_by_ip`).
    shared_ips: bool,
    /// (cluster IP, TCP port) → (index in `services`, index in its `ports`).
    service_by_vip: FastMap<(IpAddr, u16), (usize, usize)>,
    /// (index in `services`, index in its `ports`) → the port's ready endpoints, found once
    /// per snapshot instead of per connection or request, shared by the snapshots after it
    /// while its Service and pods stay.
    endpoints: EndpointIndex,
}

/// (index in `services`, index in its `ports`) → the port's ready endpoints.
type EndpointIndex = FastMap<(usize, usize), Arc<[Endpoint]>>;

impl Snapshot {
    /// Builds a snapshot and its indexes. Objects need not be sorted; duplicates are the caller's
    /// business (the first pod/service of a given IP or VIP:port wins in the indexes).
    pub(crate) fn new(generation: u64, sources: Vec<PathBuf>, objects: Objects) -> Snapshot {
        let Objects {
            namespaces,
            nodes,
            mut pods,
            mut services,
            mut endpoint_slices,
            mut authorization_policies,
            mut peer_authentications,
            mut virtual_services,
            mut destination_rules,
            mut service_entries,
            mut http_routes,
            mut grpc_routes,
            others,
            fail_closed,
            not_applied,
            warnings,
        } = objects;
        pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        endpoint_slices.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        authorization_policies
            .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        peer_authentications.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let by_meta = |a: &super::kinds::Meta, b: &super::kinds::Meta| {
            (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name))
        };
        virtual_services.sort_by(|a, b| by_meta(&a.meta, &b.meta));
        destination_rules.sort_by(|a, b| by_meta(&a.meta, &b.meta));
        service_entries.sort_by(|a, b| by_meta(&a.meta, &b.meta));
        http_routes.sort_by(|a, b| by_meta(&a.meta, &b.meta));
        grpc_routes.sort_by(|a, b| by_meta(&a.meta, &b.meta));
        let mut index = Index::default();
        (index.pod_by_ip, index.pods_by_node, index.shared_ips) = index_pods(&pods);
        for (i, svc) in services.iter().enumerate() {
            for ip in &svc.cluster_ips {
                for (j, port) in svc.ports.iter().enumerate() {
                    if port.protocol == "TCP" {
                        index
                            .service_by_vip
                            .entry((*ip, port.port))
                            .or_insert((i, j));
                    }
                }
            }
        }
        let mut snapshot = Snapshot {
            generation,
            loaded_at: SystemTime::now(),
            sources,
            namespaces: Arc::new(namespaces),
            nodes: Arc::new(nodes),
            pods,
            services,
            endpoint_slices,
            authorization_policies,
            peer_authentications,
            virtual_services,
            destination_rules,
            service_entries,
            http_routes,
            grpc_routes,
            others,
            fail_closed,
            not_applied,
            warnings,
            index,
        };
        snapshot.index.endpoints = snapshot.find_endpoints(|_| true);
        snapshot
    }

    /// The pod indexes for `pods`, this snapshot's pods with some of them changed in place
    /// (none added or removed, none moved to another node): this snapshot's indexes with the
    /// changed pods' addresses updated. `None` when that does not give what [`index_pods`]
    /// would (pods added or removed, a pod on another node, an address two pods share).
    fn patch_pod_index(&self, pods: &[Arc<Pod>]) -> Option<PodIndex> {
        if pods.len() != self.pods.len() || self.index.shared_ips {
            return None;
        }
        let indexed = |p: &Pod| -> Vec<IpAddr> {
            if p.is_terminated() || p.host_network {
                Vec::new()
            } else {
                p.ips.clone()
            }
        };
        let mut by_ip = self.index.pod_by_ip.clone();
        for (i, (old, new)) in self.pods.iter().zip(pods).enumerate() {
            if Arc::ptr_eq(old, new) {
                continue;
            }
            if (old.namespace.as_str(), old.name.as_str())
                != (new.namespace.as_str(), new.name.as_str())
                || old.node_name != new.node_name
            {
                return None;
            }
            for ip in indexed(old) {
                // Not indexed at this pod: another pod has the address too.
                if by_ip.remove(&ip) != Some(i) {
                    return None;
                }
            }
            for ip in indexed(new) {
                if by_ip.insert(ip, i).is_some() {
                    return None;
                }
            }
        }
        Some((by_ip, self.index.pods_by_node.clone(), false))
    }

    /// The endpoints of every port of the Services of the namespaces `which` selects.
    fn find_endpoints(&self, which: impl Fn(&str) -> bool) -> EndpointIndex {
        // EndpointSlices by Service (namespace, name), of the namespaces looked at again.
        let mut slices: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
        for slice in &self.endpoint_slices {
            if !slice.service.is_empty() && which(&slice.namespace) {
                slices
                    .entry((slice.namespace.as_str(), slice.service.as_str()))
                    .or_default()
                    .push(slice);
            }
        }
        let mut endpoints = EndpointIndex::default();
        for (i, svc) in self.services.iter().enumerate() {
            if !which(&svc.namespace) {
                continue;
            }
            let of_slices = slices.get(&(svc.namespace.as_str(), svc.name.as_str()));
            for (j, port) in svc.ports.iter().enumerate() {
                let selected = match of_slices {
                    Some(slices) => self.slice_endpoints(slices, port),
                    None => self.select_endpoints(svc, port),
                };
                endpoints.insert((i, j), selected.into());
            }
        }
        endpoints
    }

    /// This snapshot with some pods and EndpointSlices changed: `(namespace, name)` → the new
    /// object, or `None` when it is gone. What a pod's churn costs in a large cluster: the pod
    /// indexes are rebuilt and the endpoints of the Services of the namespaces the changes
    /// touch are found again; everything else is shared with `self`. The warnings about those
    /// Services are found again too (`origin` names the source in them).
    pub(crate) fn with_changes(
        &self,
        generation: u64,
        pods: &[Change<Pod>],
        slices: &[Change<EndpointSlice>],
        origin: &str,
    ) -> Snapshot {
        fn patch<T>(
            list: &mut Vec<Arc<T>>,
            key: impl Fn(&T) -> (&str, &str),
            changes: &[Change<T>],
        ) {
            for ((ns, name), new) in changes {
                let at = list.binary_search_by(|o| key(o).cmp(&(ns.as_str(), name.as_str())));
                match (at, new) {
                    (Ok(i), Some(o)) => list[i] = o.clone(),
                    (Ok(i), None) => {
                        list.remove(i);
                    }
                    (Err(i), Some(o)) => list.insert(i, o.clone()),
                    (Err(_), None) => {}
                }
            }
        }
        let mut new_pods = self.pods.clone();
        patch(
            &mut new_pods,
            |p: &Pod| (p.namespace.as_str(), p.name.as_str()),
            pods,
        );
        let mut new_slices = self.endpoint_slices.clone();
        patch(
            &mut new_slices,
            |s: &EndpointSlice| (s.namespace.as_str(), s.name.as_str()),
            slices,
        );
        let touched: HashSet<&str> = pods
            .iter()
            .map(|((ns, _), _)| ns.as_str())
            .chain(slices.iter().map(|((ns, _), _)| ns.as_str()))
            .collect();
        let (pod_by_ip, pods_by_node, shared_ips) = self
            .patch_pod_index(&new_pods)
            .unwrap_or_else(|| index_pods(&new_pods));
        let mut snapshot = Snapshot {
            generation,
            loaded_at: SystemTime::now(),
            sources: self.sources.clone(),
            namespaces: self.namespaces.clone(),
            nodes: self.nodes.clone(),
            pods: new_pods,
            services: self.services.clone(),
            endpoint_slices: new_slices,
            authorization_policies: self.authorization_policies.clone(),
            peer_authentications: self.peer_authentications.clone(),
            virtual_services: self.virtual_services.clone(),
            destination_rules: self.destination_rules.clone(),
            service_entries: self.service_entries.clone(),
            http_routes: self.http_routes.clone(),
            grpc_routes: self.grpc_routes.clone(),
            others: self.others.clone(),
            fail_closed: self.fail_closed.clone(),
            not_applied: self.not_applied.clone(),
            warnings: Vec::new(),
            index: Index {
                pod_by_ip,
                pods_by_node,
                shared_ips,
                service_by_vip: self.index.service_by_vip.clone(),
                endpoints: FastMap::default(),
            },
        };
        // The Services are the same (same indexes): only those of the touched namespaces are
        // looked at again.
        let mut endpoints = self.index.endpoints.clone();
        endpoints.extend(snapshot.find_endpoints(|ns| touched.contains(ns)));
        snapshot.index.endpoints = endpoints;
        // Warnings about the Services of the touched namespaces, found again.
        let mut warnings: Vec<Problem> = self
            .warnings
            .iter()
            .filter(|w| {
                !w.object
                    .strip_prefix("Service ")
                    .and_then(|o| o.split_once('/'))
                    .is_some_and(|(ns, _)| touched.contains(ns))
            })
            .cloned()
            .collect();
        let services = snapshot
            .services
            .iter()
            .filter(|s| touched.contains(s.namespace.as_str()));
        for (service, error) in target_port_warnings(services, |ns| {
            snapshot.pods_in_namespace(ns).cloned().collect()
        }) {
            warnings.push(Problem {
                origin: origin.to_string(),
                object: format!("Service {}/{}", service.namespace, service.name),
                reason: error,
            });
        }
        snapshot.warnings = warnings;
        snapshot
    }

    /// An empty snapshot (generation 0).
    pub fn empty() -> Snapshot {
        Snapshot::new(0, Vec::new(), Objects::default())
    }

    /// Whether namespace `ns` carries `weft.dev/mesh=enabled`.
    pub fn namespace_enrolled(&self, ns: &str) -> bool {
        self.namespaces
            .get(ns)
            .and_then(|labels| labels.get(ENROLL_LABEL))
            .is_some_and(|v| v == ENROLL_VALUE)
    }

    /// Whether `pod` takes part in the mesh: its namespace is enrolled and it has its own
    /// network (host-network pods share the node's address and are never captured).
    pub fn in_mesh(&self, pod: &Pod) -> bool {
        !pod.host_network && self.namespace_enrolled(&pod.namespace)
    }

    /// The pod `ns/name`.
    pub fn pod(&self, ns: &str, name: &str) -> Option<&Arc<Pod>> {
        self.pods
            .binary_search_by(|p| (p.namespace.as_str(), p.name.as_str()).cmp(&(ns, name)))
            .ok()
            .map(|i| &self.pods[i])
    }

    /// The pod owning `ip`: pods with that IP that are not terminated (`Succeeded`/`Failed`) and
    /// not on the host network.
    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&Arc<Pod>> {
        self.index
            .pod_by_ip
            .get(&ip.to_canonical())
            .map(|&i| &self.pods[i])
    }

    /// Pods scheduled on `node`, by (namespace, name).
    pub fn pods_on_node<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Arc<Pod>> + 'a {
        self.index
            .pods_by_node
            .get(node)
            .into_iter()
            .flatten()
            .map(|&i| &self.pods[i])
    }

    /// Pods of namespace `ns`, by name.
    pub fn pods_in_namespace<'a>(&'a self, ns: &'a str) -> impl Iterator<Item = &'a Arc<Pod>> + 'a {
        let start = self.pods.partition_point(|p| p.namespace.as_str() < ns);
        self.pods[start..]
            .iter()
            .take_while(move |p| p.namespace == ns)
    }

    /// The node `name`.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.get(name)
    }

    /// The service owning cluster IP `ip` (any port).
    pub fn service_by_ip(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        let ip = ip.to_canonical();
        self.services.iter().find(|s| s.cluster_ips.contains(&ip))
    }

    /// The service `ns/name`.
    pub fn service(&self, ns: &str, name: &str) -> Option<&Arc<Service>> {
        self.services
            .binary_search_by(|s| (s.namespace.as_str(), s.name.as_str()).cmp(&(ns, name)))
            .ok()
            .map(|i| &self.services[i])
    }

    /// Classifies an original destination: a service VIP on one of its TCP ports, else a pod IP,
    /// else passthrough. IPv4-mapped IPv6 addresses are treated as IPv4.
    pub fn resolve(&self, dst: SocketAddr) -> Resolved {
        let ip = dst.ip().to_canonical();
        if let Some(&(s, p)) = self.index.service_by_vip.get(&(ip, dst.port())) {
            let service = self.services[s].clone();
            let port = service.ports[p].clone();
            return Resolved::Service { service, port };
        }
        match self.pod_by_ip(ip) {
            Some(pod) => Resolved::Pod(pod.clone()),
            None => Resolved::Passthrough,
        }
    }

    /// Ready endpoints of `port` of `svc`: pods of the service's namespace matching its selector,
    /// ready, not terminated, with an IP. The port is the target port; a named target port is
    /// looked up in each pod's container ports (same protocol) and pods without it are skipped.
    /// Ordered by pod name. A service without selector has no endpoints.
    pub fn endpoints(&self, svc: &Service, port: &ServicePort) -> Vec<Endpoint> {
        // This snapshot's own Service port: found when the snapshot was built.
        let i = self
            .services
            .binary_search_by(|s| (&s.namespace, &s.name).cmp(&(&svc.namespace, &svc.name)));
        if let Ok(i) = i {
            let own = &self.services[i];
            if let Some(j) = own.ports.iter().position(|p| p == port) {
                if own.selector == svc.selector {
                    if let Some(found) = self.index.endpoints.get(&(i, j)) {
                        return found.to_vec();
                    }
                }
            }
        }
        self.select_endpoints(svc, port)
    }

    /// The pods `svc` selects, ready, with the target of `port`.
    /// Whether `other` has the very same security objects (the same `Arc`s: a source that
    /// keeps unchanged objects converted keeps them): the compiled policies still hold.
    pub fn same_policies(&self, other: &Snapshot) -> bool {
        same_arcs(&self.authorization_policies, &other.authorization_policies)
            && same_arcs(&self.peer_authentications, &other.peer_authentications)
            && self.fail_closed == other.fail_closed
    }

    /// Whether `other` has the very same objects routes are compiled from: Services, the Istio
    /// routing kinds, the Gateway API routes, namespaces.
    pub fn same_routes(&self, other: &Snapshot) -> bool {
        same_arcs(&self.services, &other.services)
            && same_arcs(&self.virtual_services, &other.virtual_services)
            && same_arcs(&self.destination_rules, &other.destination_rules)
            && same_arcs(&self.service_entries, &other.service_entries)
            && same_arcs(&self.http_routes, &other.http_routes)
            && same_arcs(&self.grpc_routes, &other.grpc_routes)
            && self.namespaces == other.namespaces
    }

    /// The endpoints of a Service port from its EndpointSlices: the slice port of the same
    /// name (and protocol), at the ready addresses that are pods weft knows (an address of no
    /// pod has no identity to reach it by).
    fn slice_endpoints(&self, slices: &[&EndpointSlice], port: &ServicePort) -> Vec<Endpoint> {
        let mut out: Vec<Endpoint> = Vec::new();
        for slice in slices {
            let Some(sp) = slice
                .ports
                .iter()
                .find(|p| p.name == port.name && p.protocol == port.protocol)
            else {
                continue;
            };
            for e in slice.endpoints.iter().filter(|e| e.ready) {
                let Some(&i) = self.index.pod_by_ip.get(&e.ip) else {
                    continue;
                };
                let addr = SocketAddr::new(e.ip, sp.port);
                if !out.iter().any(|x| x.addr == addr) {
                    out.push(Endpoint {
                        pod: self.pods[i].clone(),
                        addr,
                    });
                }
            }
        }
        out
    }

    fn select_endpoints(&self, svc: &Service, port: &ServicePort) -> Vec<Endpoint> {
        let Some(selector) = &svc.selector else {
            return Vec::new();
        };
        self.pods_in_namespace(&svc.namespace)
            .filter(|pod| pod.ready && !pod.is_terminated() && pod.matches(selector))
            .filter_map(|pod| {
                let ip = pod.ip?;
                let target = match &port.target_port {
                    TargetPort::Number(n) => *n,
                    TargetPort::Name(name) => pod.named_port(name, &port.protocol)?,
                };
                Some(Endpoint {
                    pod: pod.clone(),
                    addr: SocketAddr::new(ip, target),
                })
            })
            .collect()
    }
}

/// A change of one object: `(namespace, name)` → the object now, or `None` when it is gone.
pub type Change<T> = ((String, String), Option<Arc<T>>);

/// Pod IP → index in `pods` (pods with an IP, not terminated, not host network; the first one
/// wins), and node name → indexes of its pods.
fn index_pods(pods: &[Arc<Pod>]) -> PodIndex {
    let mut by_ip = FastMap::with_capacity_and_hasher(pods.len(), Default::default());
    let mut by_node: FastMap<String, Vec<usize>> = FastMap::default();
    let mut shared = false;
    for (i, pod) in pods.iter().enumerate() {
        if let Some(node) = &pod.node_name {
            match by_node.get_mut(node) {
                Some(on_node) => on_node.push(i),
                None => {
                    by_node.insert(node.clone(), vec![i]);
                }
            }
        }
        if pod.is_terminated() || pod.host_network {
            continue;
        }
        for ip in &pod.ips {
            match by_ip.entry(*ip) {
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(i);
                }
                std::collections::hash_map::Entry::Occupied(_) => shared = true,
            }
        }
    }
    (by_ip, by_node, shared)
}

/// Pod IP → index, node → indexes, and whether an address is shared.
type PodIndex = (FastMap<IpAddr, usize>, FastMap<String, Vec<usize>>, bool);

/// What is likely a mistake but applies: a Service port whose `targetPort` names a port that no
/// pod the Service selects declares (every call to it would find no endpoint). `pods_of` gives
/// the pods of a namespace. Each warning: the Service and `field.path: reason`.
pub(crate) fn target_port_warnings<'a>(
    services: impl Iterator<Item = &'a Arc<Service>>,
    pods_of: impl Fn(&str) -> Vec<Arc<Pod>>,
) -> Vec<(&'a Arc<Service>, String)> {
    let mut out = Vec::new();
    let mut in_namespace: HashMap<String, Vec<Arc<Pod>>> = HashMap::new();
    for svc in services {
        let Some(selector) = svc.selector.as_ref() else {
            continue;
        };
        if !svc
            .ports
            .iter()
            .any(|p| matches!(p.target_port, TargetPort::Name(_)))
        {
            continue;
        }
        let pods = in_namespace
            .entry(svc.namespace.clone())
            .or_insert_with(|| pods_of(&svc.namespace));
        let selected: Vec<&Arc<Pod>> = pods.iter().filter(|p| p.matches(selector)).collect();
        if selected.is_empty() {
            continue;
        }
        for (i, port) in svc.ports.iter().enumerate() {
            let TargetPort::Name(name) = &port.target_port else {
                continue;
            };
            if selected
                .iter()
                .any(|p| p.named_port(name, &port.protocol).is_some())
            {
                continue;
            }
            let mut declared: Vec<&str> = selected
                .iter()
                .flat_map(|p| p.ports.iter().filter_map(|c| c.name.as_deref()))
                .collect();
            declared.sort_unstable();
            declared.dedup();
            let declared = if declared.is_empty() {
                "they declare no named port".to_string()
            } else {
                format!("they declare {}", declared.join(", "))
            };
            out.push((
                svc,
                format!(
                    "spec.ports[{i}].targetPort: no pod this Service selects ({} pods) declares a {} port named {name:?} ({declared}): calls to port {} find no endpoint",
                    selected.len(),
                    port.protocol,
                    port.port
                ),
            ));
        }
    }
    out
}

fn same_arcs<T>(a: &[Arc<T>], b: &[Arc<T>]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| Arc::ptr_eq(x, y))
}

pub(crate) fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn ser_time<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339(*t))
}

pub fn ser_arc<T: Serialize, S: Serializer>(v: &Arc<T>, s: S) -> Result<S::Ok, S::Error> {
    T::serialize(v, s)
}

fn ser_arc_vec<T: Serialize, S: Serializer>(v: &[Arc<T>], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|a| &**a))
}
