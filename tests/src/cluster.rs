//! The cluster on one machine: a fabric netns with a bridge, nodes (netns + veth on the bridge +
//! a cgroup root), pods (netns + veth to their node + a kubelet-layout cgroup), Services, and the
//! Kubernetes-shaped registry describing them.

use crate::apiserver::ApiServer;
use crate::cgroup;
use crate::cleanup;
use crate::ids;
use crate::netns::{self, InNetns};
use crate::node::{Node, NodeInner};
use crate::pod::{Pod, PodInner};
use crate::process::{self, Logs, Place, Proc};
use crate::registry::{self, Labels};
use crate::spec::{PodSpec, Service, ServiceSpec};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Once};
use std::time::Duration;

/// Gateway address every pod routes through (answered by proxy ARP on the node's host veth).
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// Where the cluster's API server listens, on the fabric bridge (see [`Cluster::api_server`]).
pub const API_SERVER_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 1);
pub const API_SERVER_PORT: u16 = 6443;
/// Where the cluster's CA service (`weft ca serve`) listens, next to the API server: the
/// control plane's address on the fabric.
pub const CA_PORT: u16 = 15012;
/// Name of the bridge in the fabric netns.
pub const FABRIC_BRIDGE: &str = "br0";
const MAX_NODES: usize = 200;

/// 64 random bits (for tokens).
fn rand_u64() -> u64 {
    use aws_lc_rs::rand::SecureRandom;
    let mut b = [0u8; 8];
    aws_lc_rs::rand::SystemRandom::new()
        .fill(&mut b)
        .expect("the kernel's random source");
    u64::from_ne_bytes(b)
}

/// Node `k` (1-based) has IP 172.30.0.<10+k>/16.
pub fn node_ip(k: u8) -> Ipv4Addr {
    Ipv4Addr::new(172, 30, 0, 10 + k)
}

/// Node `k` (1-based) has pod CIDR 10.244.<k>.0/24.
pub fn pod_cidr(k: u8) -> String {
    format!("10.244.{k}.0/24")
}

pub(crate) struct Shared {
    pub(crate) id: String,
    pub(crate) test_name: String,
    pub(crate) cgroup_dir: PathBuf,
    pub(crate) fabric: String,
    pub(crate) logs: Logs,
}

struct PodEntry {
    pod: Pod,
    labels: Labels,
    container_ports: Vec<(String, u16)>,
    readiness_probe: Option<String>,
    owner: Option<(String, String)>,
    ready: bool,
}

#[derive(Default)]
struct State {
    nodes: Vec<Node>,
    /// Next host number per node index.
    next_host: BTreeMap<u8, u8>,
    pods: Vec<PodEntry>,
    services: Vec<Service>,
    next_service_ip: u32,
    namespaces: BTreeMap<String, Labels>,
    /// Labels of nodes besides `kubernetes.io/hostname` and `kubernetes.io/os`.
    node_labels: BTreeMap<String, Labels>,
    extra: Vec<Value>,
    sync_path: Option<PathBuf>,
    /// The cluster's API server, once started: kept equal to the cluster after every change.
    api: Option<Arc<ApiServer>>,
    /// Whether the control plane's address is on the fabric bridge yet.
    control_plane_address: bool,
    /// The cluster's CA service, once started.
    ca: Option<Proc>,
    /// Nodes sign their own certificates (`weft node --ca-key`) instead of asking the CA
    /// service.
    sign_on_nodes: bool,
}

/// A Kubernetes cluster on one machine. Everything it created is removed on drop (also when the
/// test panics, and then the tails of all logs are printed).
pub struct Cluster {
    shared: Arc<Shared>,
    state: Mutex<State>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cluster({} {})", self.shared.id, self.shared.test_name)
    }
}

fn check_name(what: &str, s: &str, max: usize) -> Result<()> {
    let ok = !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !s.starts_with(['-', '.'])
        && !s.ends_with(['-', '.']);
    if !ok {
        bail!("invalid {what} name {s:?} (lowercase RFC 1123, at most {max} chars)");
    }
    Ok(())
}

/// Root of per-test log directories: `$WEFT_TEST_LOGS`, else `<tmp>/weft-tests`.
pub fn logs_root() -> PathBuf {
    std::env::var_os("WEFT_TEST_LOGS")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("weft-tests"))
}

/// Remove per-test log directories older than `age` (logs are kept after each test).
fn prune_old_logs(age: Duration) {
    let Ok(d) = std::fs::read_dir(logs_root()) else {
        return;
    };
    for e in d.flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|el| el > age);
        if old && e.file_type().is_ok_and(|t| t.is_dir()) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

impl Cluster {
    /// A new, empty cluster: fabric netns with a bridge, a test cgroup, a log directory.
    /// The first cluster of a process also removes leftovers of dead runs ([`crate::cleanup_stale`]).
    pub fn new(test_name: &str) -> Result<Cluster> {
        static STALE: Once = Once::new();
        STALE.call_once(|| {
            if let Err(e) = cleanup::cleanup_stale() {
                eprintln!("weft-tests: cleaning up stale clusters: {e:#}");
            }
            prune_old_logs(Duration::from_secs(2 * 24 * 3600));
        });
        let mut id = ids::cluster_id();
        let mut tries = 0;
        while !cleanup::create_marker(&id, test_name)? {
            tries += 1;
            if tries > 100 {
                bail!("could not claim a cluster id");
            }
            id = ids::cluster_id();
        }
        let safe_name: String = test_name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .take(60)
            .collect();
        let logs_dir = logs_root().join(format!("{safe_name}-{id}"));
        let logs = match Logs::new(logs_dir) {
            Ok(l) => l,
            Err(e) => {
                let _ = cleanup::teardown(&id);
                return Err(e);
            }
        };
        let shared = Arc::new(Shared {
            cgroup_dir: cleanup::cgroup_dir(&id),
            fabric: format!("{}fabric", cleanup::netns_prefix(&id)),
            id,
            test_name: test_name.to_string(),
            logs,
        });
        // From here on, Drop cleans up whatever was created.
        let cluster = Cluster {
            shared,
            state: Mutex::new(State {
                next_service_ip: 10,
                ..Default::default()
            }),
        };
        cgroup::create(&cluster.shared.cgroup_dir)?;
        let fab = &cluster.shared.fabric;
        netns::create(fab)?;
        netns::ip(fab, &["link", "set", "lo", "up"])?;
        netns::ip(fab, &["link", "add", FABRIC_BRIDGE, "type", "bridge"])?;
        netns::ip(fab, &["link", "set", FABRIC_BRIDGE, "up"])?;
        Ok(cluster)
    }

    /// Short unique id (6 hex digits) used in every name this cluster owns.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    pub fn test_name(&self) -> &str {
        &self.shared.test_name
    }

    /// `/sys/fs/cgroup/unified/weft-test-<id>`.
    pub fn cgroup_dir(&self) -> &Path {
        &self.shared.cgroup_dir
    }

    /// Netns holding the bridge all nodes are attached to.
    pub fn fabric_netns(&self) -> &str {
        &self.shared.fabric
    }

    /// Where process logs go (kept after the test).
    pub fn logs_dir(&self) -> &Path {
        &self.shared.logs.dir
    }

    /// The last `lines` lines of every log (process stdout/stderr, commands.log).
    pub fn log_tails(&self, lines: usize) -> String {
        self.shared.logs.tails(lines)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Add a node: netns on the fabric with IP 172.30.0.<10+k>/16, forwarding on, routes to
    /// every other node's pod CIDR (and theirs to this one's), a cgroup root and a system cgroup.
    pub fn add_node(&self, name: &str) -> Result<Node> {
        check_name("node", name, 40)?;
        let mut st = self.state();
        if st.nodes.iter().any(|n| n.name() == name) {
            bail!("node {name} already exists");
        }
        if st.nodes.len() >= MAX_NODES {
            bail!("too many nodes");
        }
        let k = (st.nodes.len() + 1) as u8;
        let ip = node_ip(k);
        let ns = format!("{}node-{name}", cleanup::netns_prefix(&self.shared.id));
        let fab = &self.shared.fabric;
        let fab_port = format!("n{k}");
        netns::create(&ns)?;
        netns::ip(
            fab,
            &[
                "link", "add", &fab_port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ],
        )?;
        netns::ip(
            fab,
            &["link", "set", &fab_port, "master", FABRIC_BRIDGE, "up"],
        )?;
        // Deterministic, whatever the root netns has: forwarding on, no reverse-path filter
        // (inherited by veths created later).
        netns::sysctls(
            &ns,
            &[
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.default.rp_filter", "0"),
                ("net.ipv4.conf.eth0.rp_filter", "0"),
            ],
        )?;
        let cidr = format!("{ip}/16");
        netns::ip(&ns, &["link", "set", "lo", "up"])?;
        netns::ip(&ns, &["addr", "add", &cidr, "dev", "eth0"])?;
        netns::ip(&ns, &["link", "set", "eth0", "up"])?;
        // Proxy ARP answers only for targets routed out of another interface: give the pods'
        // gateway address such a route.
        let gw = format!("{POD_GATEWAY}/32");
        netns::ip(&ns, &["route", "add", &gw, "dev", "eth0"])?;
        for other in &st.nodes {
            let (oc, oip) = (other.pod_cidr(), other.ip().to_string());
            netns::ip(&ns, &["route", "add", &oc, "via", &oip, "dev", "eth0"])?;
            let (mc, mip) = (pod_cidr(k), ip.to_string());
            netns::ip(
                other.netns_name(),
                &["route", "add", &mc, "via", &mip, "dev", "eth0"],
            )?;
        }
        let cgroup_root = self.shared.cgroup_dir.join(name);
        let system_cgroup = self.shared.cgroup_dir.join(format!("{name}.system"));
        cgroup::create(&cgroup_root)?;
        cgroup::create(&system_cgroup)?;
        let state_dir = self.shared.logs.dir.join(format!("node-{name}"));
        std::fs::create_dir_all(&state_dir)?;
        let node = Node {
            inner: Arc::new(NodeInner {
                name: name.into(),
                index: k,
                ip,
                netns: ns,
                cgroup_root,
                system_cgroup,
                bpffs_dir: Path::new(cleanup::BPFFS)
                    .join(format!("{}{name}", cleanup::bpffs_prefix(&self.shared.id))),
                state_dir,
                shared: self.shared.clone(),
            }),
        };
        st.nodes.push(node.clone());
        st.next_host.insert(k, 2);
        self.sync(&st)?;
        Ok(node)
    }

    /// Takes `node`'s port on the fabric down (`up: false`) or back up: its packets to and from
    /// other nodes are dropped silently (no FIN, no RST), as when a node loses its link; its
    /// own addresses and routes are left alone, so bringing the port up restores everything.
    pub fn set_node_link(&self, node: &Node, up: bool) -> Result<()> {
        let port = format!("n{}", node.index());
        let state = if up { "up" } else { "down" };
        netns::ip(&self.shared.fabric, &["link", "set", &port, state])?;
        Ok(())
    }

    /// Add a pod on `node`: netns with eth0 = 10.244.<k>.<n>/32, default route via 169.254.1.1
    /// (proxy ARP on the node's host veth), a /32 route on the node, a kubelet-layout cgroup.
    pub fn add_pod(&self, node: &Node, spec: PodSpec) -> Result<Pod> {
        check_name("namespace", &spec.namespace, 63)?;
        check_name("pod", &spec.name, 100)?;
        let mut st = self.state();
        if !st.nodes.iter().any(|n| Arc::ptr_eq(&n.inner, &node.inner)) {
            bail!("node {} is not in this cluster", node.name());
        }
        if st
            .pods
            .iter()
            .any(|p| p.pod.namespace() == spec.namespace && p.pod.name() == spec.name)
        {
            bail!("pod {}/{} already exists", spec.namespace, spec.name);
        }
        let k = node.index();
        let host = *st.next_host.get(&k).unwrap_or(&2);
        if host == 255 {
            bail!("node {} has no pod addresses left", node.name());
        }
        let ip = Ipv4Addr::new(10, 244, k, host);
        let uid = ids::uuid_v4();
        let container_id = ids::container_id();
        let ns = format!(
            "{}pod-{}-{}",
            cleanup::netns_prefix(&self.shared.id),
            spec.namespace,
            spec.name
        );
        let host_veth = format!("cali{}", &uid.replace('-', "")[..11]);
        let node_ns = node.netns_name();
        netns::create(&ns)?;
        netns::ip(
            node_ns,
            &[
                "link", "add", &host_veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ],
        )?;
        let addr = format!("{ip}/32");
        let gw = POD_GATEWAY.to_string();
        netns::ip(&ns, &["link", "set", "lo", "up"])?;
        netns::ip(&ns, &["addr", "add", &addr, "dev", "eth0"])?;
        netns::ip(&ns, &["link", "set", "eth0", "up"])?;
        netns::ip(
            &ns,
            &[
                "route", "add", "default", "via", &gw, "dev", "eth0", "onlink",
            ],
        )?;
        netns::sysctls(
            node_ns,
            &[
                (&format!("net.ipv4.conf.{host_veth}.proxy_arp"), "1"),
                (&format!("net.ipv4.neigh.{host_veth}.proxy_delay"), "0"),
            ],
        )?;
        netns::ip(node_ns, &["link", "set", &host_veth, "up"])?;
        let node_ip = node.ip().to_string();
        netns::ip(
            node_ns,
            &["route", "add", &addr, "dev", &host_veth, "src", &node_ip],
        )?;
        let (pod_rel, ctr_rel) = cgroup::kubelet_layout(spec.driver, spec.qos, &uid, &container_id);
        let pod_cgroup = node.cgroup_root().join(pod_rel);
        let container_cgroup = node.cgroup_root().join(ctr_rel);
        cgroup::create(&container_cgroup)?;
        let service_account = if spec.service_account.is_empty() {
            "default".to_string()
        } else {
            spec.service_account.clone()
        };
        let pod = Pod {
            inner: Arc::new(PodInner {
                label: format!("{}.{}", spec.namespace, spec.name),
                namespace: spec.namespace.clone(),
                name: spec.name.clone(),
                uid,
                ip,
                node: node.clone(),
                netns: ns,
                host_veth,
                pod_cgroup,
                container_cgroup,
                container_id,
                qos: spec.qos,
                driver: spec.driver,
                service_account,
            }),
        };
        st.next_host.insert(k, host + 1);
        st.namespaces.entry(spec.namespace.clone()).or_default();
        st.pods.push(PodEntry {
            pod: pod.clone(),
            labels: spec.labels,
            container_ports: spec.container_ports,
            readiness_probe: spec.readiness_probe,
            owner: spec.owner,
            ready: true,
        });
        self.sync(&st)?;
        Ok(pod)
    }

    /// Delete a pod: kill its processes, remove its netns (and so its veth pair and route) and
    /// its cgroup, drop it from the registry.
    pub fn remove_pod(&self, pod: &Pod) -> Result<()> {
        let mut st = self.state();
        let Some(i) = st
            .pods
            .iter()
            .position(|p| Arc::ptr_eq(&p.pod.inner, &pod.inner))
        else {
            bail!(
                "pod {}/{} is not in this cluster",
                pod.namespace(),
                pod.name()
            );
        };
        st.pods.remove(i);
        cgroup::remove_tree(pod.pod_cgroup())?;
        netns::delete(pod.netns_name())?;
        self.sync(&st)
    }

    /// Add a Service (namespace created implicitly). Cluster IPs are allocated from 10.96.0.0/16
    /// (starting at 10.96.0.10) unless given.
    /// Changes the ports of an existing Service (the same object, modified).
    pub fn set_service_ports(
        &self,
        namespace: &str,
        name: &str,
        ports: Vec<crate::registry::ServicePort>,
    ) -> Result<Service> {
        let mut st = self.state();
        let Some(svc) = st
            .services
            .iter_mut()
            .find(|s| s.namespace == namespace && s.name == name)
        else {
            bail!("no service {namespace}/{name}");
        };
        svc.ports = ports;
        let svc = svc.clone();
        self.sync(&st)?;
        Ok(svc)
    }

    pub fn add_service(&self, spec: ServiceSpec) -> Result<Service> {
        check_name("namespace", &spec.namespace, 63)?;
        check_name("service", &spec.name, 63)?;
        let mut st = self.state();
        if st
            .services
            .iter()
            .any(|s| s.namespace == spec.namespace && s.name == spec.name)
        {
            bail!("service {}/{} already exists", spec.namespace, spec.name);
        }
        let cluster_ip = match spec.cluster_ip {
            Some(ip) => ip,
            None => loop {
                let n = st.next_service_ip;
                if n >= 0xfffe {
                    bail!("out of cluster IPs");
                }
                st.next_service_ip += 1;
                let ip = Ipv4Addr::new(10, 96, (n >> 8) as u8, n as u8);
                if n as u8 != 0 && n as u8 != 255 && !st.services.iter().any(|s| s.cluster_ip == ip)
                {
                    break ip;
                }
            },
        };
        if st.services.iter().any(|s| s.cluster_ip == cluster_ip) {
            bail!("cluster IP {cluster_ip} already in use");
        }
        let svc = Service {
            namespace: spec.namespace,
            name: spec.name,
            cluster_ip,
            selector: spec.selector,
            ports: spec.ports,
        };
        st.namespaces.entry(svc.namespace.clone()).or_default();
        st.services.push(svc.clone());
        self.sync(&st)?;
        Ok(svc)
    }

    pub fn remove_service(&self, namespace: &str, name: &str) -> Result<()> {
        let mut st = self.state();
        let before = st.services.len();
        st.services
            .retain(|s| !(s.namespace == namespace && s.name == name));
        if st.services.len() == before {
            bail!("service {namespace}/{name} not found");
        }
        self.sync(&st)
    }

    /// Replace a namespace's labels (creating the namespace if needed).
    pub fn set_namespace_labels(&self, namespace: &str, labels: Labels) -> Result<()> {
        check_name("namespace", namespace, 63)?;
        let mut st = self.state();
        st.namespaces.insert(namespace.to_string(), labels);
        self.sync(&st)
    }

    /// Set labels of a node besides its hostname and OS ones (e.g. its
    /// `topology.kubernetes.io/region` and `zone`).
    pub fn set_node_labels(&self, node: &Node, labels: Labels) -> Result<()> {
        let mut st = self.state();
        st.node_labels.insert(node.name().to_string(), labels);
        self.sync(&st)
    }

    /// Replace a pod's labels.
    pub fn set_pod_labels(&self, pod: &Pod, labels: Labels) -> Result<()> {
        self.update_pod(pod, |e| e.labels = labels)
    }

    /// Set the pod's Ready condition.
    pub fn set_pod_ready(&self, pod: &Pod, ready: bool) -> Result<()> {
        self.update_pod(pod, |e| e.ready = ready)
    }

    /// Change this cluster's record of `pod`, then rewrite the registry.
    fn update_pod(&self, pod: &Pod, change: impl FnOnce(&mut PodEntry)) -> Result<()> {
        let mut st = self.state();
        let e = st
            .pods
            .iter_mut()
            .find(|p| Arc::ptr_eq(&p.pod.inner, &pod.inner))
            .context("pod not in this cluster")?;
        change(e);
        self.sync(&st)
    }

    /// Add or replace (by kind, namespace, name) arbitrary Kubernetes objects, e.g. Istio
    /// AuthorizationPolicy or Gateway API routes, given as (multi-document) YAML. They are
    /// emitted after the built-in objects.
    pub fn apply_yaml(&self, yaml: &str) -> Result<()> {
        let docs = registry::parse_documents(yaml)?;
        let mut st = self.state();
        for d in docs {
            let key = registry::object_key(&d);
            if key.0.is_empty() || key.2.is_empty() {
                bail!("object without kind or metadata.name: {d}");
            }
            match st.extra.iter_mut().find(|e| registry::object_key(e) == key) {
                Some(e) => *e = d,
                None => st.extra.push(d),
            }
        }
        self.sync(&st)
    }

    /// Remove an object added with [`Cluster::apply_yaml`]. Returns whether it existed.
    pub fn delete_object(&self, kind: &str, namespace: &str, name: &str) -> Result<bool> {
        let mut st = self.state();
        let key = (kind.to_string(), namespace.to_string(), name.to_string());
        let gone: Vec<Value> = st
            .extra
            .iter()
            .filter(|e| registry::object_key(e) == key)
            .cloned()
            .collect();
        st.extra.retain(|e| registry::object_key(e) != key);
        self.sync(&st)?;
        // The last object of a kind leaves no trace in a sync: delete it by name.
        if let Some(api) = &st.api {
            for e in &gone {
                let api_version = e["apiVersion"].as_str().unwrap_or_default();
                api.delete(api_version, kind, namespace, name)?;
            }
        }
        Ok(!gone.is_empty())
    }

    pub fn nodes(&self) -> Vec<Node> {
        self.state().nodes.clone()
    }

    pub fn node(&self, name: &str) -> Option<Node> {
        self.state()
            .nodes
            .iter()
            .find(|n| n.name() == name)
            .cloned()
    }

    pub fn pods(&self) -> Vec<Pod> {
        self.state().pods.iter().map(|p| p.pod.clone()).collect()
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<Pod> {
        self.state()
            .pods
            .iter()
            .find(|p| p.pod.namespace() == namespace && p.pod.name() == name)
            .map(|p| p.pod.clone())
    }

    pub fn services(&self) -> Vec<Service> {
        self.state().services.clone()
    }

    /// The current labels of a pod.
    pub fn pod_labels(&self, pod: &Pod) -> Option<Labels> {
        self.state()
            .pods
            .iter()
            .find(|p| Arc::ptr_eq(&p.pod.inner, &pod.inner))
            .map(|p| p.labels.clone())
    }

    fn objects(st: &State) -> Vec<Value> {
        let mut docs = Vec::new();
        for (name, labels) in &st.namespaces {
            docs.push(registry::namespace(name, labels));
        }
        for n in &st.nodes {
            let extra = st.node_labels.get(n.name());
            docs.push(registry::node(n.name(), n.ip(), &n.pod_cidr(), extra));
        }
        for e in &st.pods {
            let p = &e.pod;
            docs.push(registry::pod(&registry::PodObject {
                namespace: p.namespace(),
                name: p.name(),
                uid: p.uid(),
                labels: &e.labels,
                node_name: p.node().name(),
                host_ip: p.node().ip(),
                service_account: p.service_account(),
                container_ports: &e.container_ports,
                readiness_probe: e.readiness_probe.as_deref(),
                owner: e.owner.as_ref().map(|(k, n)| (k.as_str(), n.as_str())),
                container_id: p.container_id(),
                pod_ip: p.ip(),
                qos: p.qos().as_str(),
                ready: e.ready,
            }));
        }
        for s in &st.services {
            docs.push(registry::service(
                &s.namespace,
                &s.name,
                s.cluster_ip,
                &s.selector,
                &s.ports,
            ));
        }
        docs.extend(st.extra.iter().cloned());
        docs
    }

    /// The whole cluster as Kubernetes-shaped multi-document YAML: Namespaces, Nodes, Pods,
    /// Services, then objects added with [`Cluster::apply_yaml`].
    pub fn registry_yaml(&self) -> String {
        registry::to_yaml(&Self::objects(&self.state()))
    }

    /// Write [`Cluster::registry_yaml`] to `path` (atomically).
    pub fn write_registry(&self, path: &Path) -> Result<()> {
        registry::write_atomic(path, &self.registry_yaml())
    }

    /// Write the registry to `path` now and again after every change to the cluster.
    pub fn sync_registry_to(&self, path: &Path) -> Result<()> {
        let mut st = self.state();
        st.sync_path = Some(path.to_path_buf());
        self.sync(&st)
    }

    /// A default registry path (`<logs>/registry/registry.yaml`), in a directory of its own:
    /// weft watches the registry's directory, and the log files must not wake it.
    pub fn default_registry_path(&self) -> PathBuf {
        self.shared.logs.dir.join("registry").join("registry.yaml")
    }

    fn sync(&self, st: &State) -> Result<()> {
        if let Some(p) = &st.sync_path {
            registry::write_atomic(p, &registry::to_yaml(&Self::objects(st)))?;
        }
        if let Some(api) = &st.api {
            api.sync(Self::objects(st))?;
        }
        Ok(())
    }

    /// The cluster's Kubernetes API server (the stand-in of [`crate::apiserver`]), started on
    /// first use at [`API_SERVER_IP`]`:6443` on the fabric, reachable from every node, and from
    /// then on kept equal to the cluster after every change. Its kubeconfig is
    /// [`Cluster::kubeconfig_path`].
    pub fn api_server(&self) -> Result<Arc<ApiServer>> {
        let mut st = self.state();
        if let Some(api) = &st.api {
            return Ok(api.clone());
        }
        let fab = self.shared.fabric.clone();
        self.control_plane_address(&mut st)?;
        let listener = netns::in_netns(&fab, || {
            std::net::TcpListener::bind((API_SERVER_IP, API_SERVER_PORT))
        })?
        .context("binding the API server")?;
        let api = Arc::new(ApiServer::start(listener)?);
        let kubeconfig = self.kubeconfig_path();
        if let Some(dir) = kubeconfig.parent() {
            std::fs::create_dir_all(dir)?;
        }
        api.write_kubeconfig(&kubeconfig)?;
        api.sync(Self::objects(&st))?;
        st.api = Some(api.clone());
        Ok(api)
    }

    /// Puts [`API_SERVER_IP`], where the control plane (API server, CA service) listens, on the
    /// fabric bridge.
    fn control_plane_address(&self, st: &mut State) -> Result<()> {
        if !st.control_plane_address {
            netns::ip(
                &self.shared.fabric,
                &[
                    "addr",
                    "add",
                    &format!("{API_SERVER_IP}/16"),
                    "dev",
                    FABRIC_BRIDGE,
                ],
            )?;
            st.control_plane_address = true;
        }
        Ok(())
    }

    /// Nodes started from now on sign their own certificates with the CA key (`weft node
    /// --ca-key`, development mode) instead of asking the cluster's CA service.
    pub fn sign_on_nodes(&self) {
        self.state().sign_on_nodes = true;
    }

    /// How nodes get their certificates: `--ca-cert`, then `--ca-address` and `--ca-token` (the
    /// cluster's CA service, started on first use, and `node`'s bootstrap token), or `--ca-key`
    /// after [`Cluster::sign_on_nodes`].
    pub fn node_ca_args(&self, node: &str) -> Result<Vec<String>> {
        let ca = crate::weft::mesh_ca(self)?;
        let mut args = vec![
            "--ca-cert".to_string(),
            ca.join("ca.crt").display().to_string(),
        ];
        if self.state().sign_on_nodes {
            args.extend([
                "--ca-key".to_string(),
                ca.join("ca.key").display().to_string(),
            ]);
            return Ok(args);
        }
        let address = self.ca_service()?;
        let token = self.node_token(node)?;
        args.extend([
            "--ca-address".to_string(),
            address,
            "--ca-token".to_string(),
            token.display().to_string(),
        ]);
        Ok(args)
    }

    /// The bootstrap token file of `node` (made on first use and added to the CA's tokens).
    pub fn node_token(&self, node: &str) -> Result<PathBuf> {
        let dir = self.shared.logs.dir.join("ca-tokens");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{node}.token"));
        let _st = self.state();
        if !path.exists() {
            let token = format!("{}.{:016x}", node, rand_u64());
            std::fs::write(&path, &token)?;
            use std::io::Write;
            let mut all = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.node_tokens_path())?;
            writeln!(all, "{node} {token}")?;
        }
        Ok(path)
    }

    /// The CA service's bootstrap tokens: `NODE TOKEN` lines.
    pub fn node_tokens_path(&self) -> PathBuf {
        self.shared.logs.dir.join("ca-tokens").join("nodes")
    }

    /// The cluster's CA service: `weft ca serve` in the fabric netns at
    /// [`API_SERVER_IP`]`:`[`CA_PORT`], the only holder of the CA key, reading the cluster's
    /// registry file and the nodes' bootstrap tokens. Started on first use; returns the address
    /// nodes dial (`https://…`).
    pub fn ca_service(&self) -> Result<String> {
        let address = format!("https://{API_SERVER_IP}:{CA_PORT}");
        if self.state().ca.is_some() {
            return Ok(address);
        }
        self.start_ca_service()?;
        Ok(address)
    }

    /// Stops the CA service (SIGKILL: as a crashed or unreachable CA). Nodes keep their
    /// certificates; [`Cluster::start_ca_service`] brings it back.
    pub fn stop_ca_service(&self) -> Result<()> {
        let proc = self.state().ca.take();
        if let Some(mut p) = proc {
            p.signal(libc::SIGKILL)?;
            let _ = p.wait_timeout(Duration::from_secs(5));
        }
        Ok(())
    }

    /// Starts the CA service and waits until it serves.
    pub fn start_ca_service(&self) -> Result<()> {
        let ca = crate::weft::mesh_ca(self)?;
        let registry = self.default_registry_path();
        if self.state().sync_path.is_none() {
            self.sync_registry_to(&registry)?;
        }
        let tokens = self.node_tokens_path();
        if let Some(dir) = tokens.parent() {
            std::fs::create_dir_all(dir)?;
        }
        if !tokens.exists() {
            std::fs::write(&tokens, "")?;
        }
        let mut st = self.state();
        if st.ca.is_some() {
            return Ok(());
        }
        self.control_plane_address(&mut st)?;
        let cgroup = self.shared.cgroup_dir.join("control-plane");
        if !cgroup.exists() {
            cgroup::create(&cgroup)?;
        }
        let mut cmd = std::process::Command::new(crate::weft_bin());
        cmd.args(["ca", "serve", "--listen"])
            .arg(format!("{API_SERVER_IP}:{CA_PORT}"))
            .arg("--ca-cert")
            .arg(ca.join("ca.crt"))
            .arg("--ca-key")
            .arg(ca.join("ca.key"))
            .arg("--registry")
            .arg(st.sync_path.clone().unwrap_or(registry))
            .arg("--node-tokens")
            .arg(&tokens)
            .args(["--server-name", &API_SERVER_IP.to_string()])
            .env(
                "WEFT_LOG",
                std::env::var("WEFT_LOG").unwrap_or_else(|_| "info".into()),
            );
        let place = Place {
            cgroup: &cgroup,
            netns: &self.shared.fabric,
            label: "ca",
        };
        let mut proc = process::spawn(&self.shared.logs, &place, &cmd)?;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        // Serving once it accepts (its log may be quieter than info).
        let serving = || {
            netns::in_netns(&self.shared.fabric, || {
                std::net::TcpStream::connect_timeout(
                    &(API_SERVER_IP, CA_PORT).into(),
                    Duration::from_millis(200),
                )
                .is_ok()
            })
            .unwrap_or(false)
        };
        while !serving() {
            if let Some(status) = proc.try_wait()? {
                bail!("weft ca serve exited ({status}):\n{}", proc.stderr());
            }
            if std::time::Instant::now() > deadline {
                bail!("weft ca serve not ready within 20s:\n{}", proc.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        st.ca = Some(proc);
        Ok(())
    }

    /// The kubeconfig of [`Cluster::api_server`].
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.shared.logs.dir.join("kube").join("kubeconfig")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "=== weft-tests: test {:?} failed; cluster {} logs in {} ===\n{}",
                self.shared.test_name,
                self.shared.id,
                self.shared.logs.dir.display(),
                self.shared.logs.tails(40)
            );
        }
        if let Err(e) = cleanup::teardown(&self.shared.id) {
            eprintln!("weft-tests: tearing down cluster {}: {e:#}", self.shared.id);
        }
    }
}
