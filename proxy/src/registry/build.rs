//! From Kubernetes API objects (k8s-openapi types) to the weft model, with semantic checks.
//!
//! Shared by every source: the YAML files ([`super::file`]) today, an API watcher tomorrow. Istio
//! and Gateway API objects are classified by [`super::kinds`]: security and routing kinds are
//! parsed and checked into typed objects, unknown kinds in the groups weft reads are not applied
//! (and, in `security.istio.io`, fail closed). Checks that need more than one object (a route
//! naming a subset no DestinationRule defines) run once every object is in:
//! [`SnapshotBuilder::validate`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::kinds::networking::{host_matches, qualify_host, Destination};
use super::kinds::{self, gateway, networking, security, Class, Kind};
use super::model::{
    ContainerPort, FailClosed, Labels, Node, NotApplied, Objects, Pod, QosClass, RawObject,
    Service, ServicePort, Snapshot, TargetPort,
};

/// A semantic problem in one object: the field path (`spec.ports[0].port`) and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(path: impl Into<String>, reason: impl Into<String>) -> FieldError {
        FieldError {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.reason)
        } else {
            write!(f, "{}: {}", self.path, self.reason)
        }
    }
}

/// One object of a source, as deserialized.
#[derive(Debug, Clone)]
pub enum Object {
    Namespace(Box<core::Namespace>),
    Node(Box<core::Node>),
    Pod(Box<core::Pod>),
    Service(Box<core::Service>),
    Other(RawObject),
}

/// Identity of an object for duplicate detection and messages: `Pod demo/client`, `Node node-1`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub api_version: String,
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {}/{}", self.kind, ns, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

/// What [`SnapshotBuilder::insert`] did with a valid object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inserted {
    Applied(ObjectKey),
    /// An unknown kind or version in a group weft reads: left out (see [`super::kinds`]); the
    /// source reports it with its location ([`SnapshotBuilder::not_applied`]).
    NotApplied {
        key: ObjectKey,
        reason: String,
    },
}

/// Accumulates objects, converting and checking each, then builds a [`Snapshot`].
#[derive(Debug, Default)]
pub struct SnapshotBuilder {
    namespaces: BTreeMap<String, Labels>,
    nodes: BTreeMap<String, Node>,
    pods: BTreeMap<(String, String), Pod>,
    services: BTreeMap<(String, String), Service>,
    objects: Objects,
    other_keys: HashSet<ObjectKey>,
    /// Cluster IP → service `ns/name` owning it.
    vips: HashMap<IpAddr, String>,
}

impl SnapshotBuilder {
    pub fn new() -> SnapshotBuilder {
        SnapshotBuilder::default()
    }

    /// Converts and adds one object. Invalid objects and duplicates (same kind, namespace and
    /// name) are rejected with every problem found.
    pub fn insert(&mut self, object: Object) -> Result<Inserted, Vec<FieldError>> {
        self.insert_from(object, None)
    }

    /// [`SnapshotBuilder::insert`], remembering where the object was read (`file:line`) in the
    /// typed routing objects.
    pub fn insert_from(
        &mut self,
        object: Object,
        origin: Option<String>,
    ) -> Result<Inserted, Vec<FieldError>> {
        let key = object_key(&object);
        let duplicate = || vec![FieldError::new("metadata.name", format!("duplicate {key}"))];
        match object {
            Object::Namespace(ns) => {
                let (name, labels) = namespace(&ns)?;
                if self.namespaces.contains_key(&name) {
                    return Err(duplicate());
                }
                self.namespaces.insert(name, labels);
            }
            Object::Node(n) => {
                let node = node(&n)?;
                if self.nodes.contains_key(&node.name) {
                    return Err(duplicate());
                }
                self.nodes.insert(node.name.clone(), node);
            }
            Object::Pod(p) => {
                let pod = pod(&p)?;
                let k = (pod.namespace.clone(), pod.name.clone());
                if self.pods.contains_key(&k) {
                    return Err(duplicate());
                }
                self.pods.insert(k, pod);
            }
            Object::Service(s) => {
                let svc = service(&s)?;
                let k = (svc.namespace.clone(), svc.name.clone());
                if self.services.contains_key(&k) {
                    return Err(duplicate());
                }
                let owner = format!("{}/{}", svc.namespace, svc.name);
                for ip in &svc.cluster_ips {
                    if let Some(other) = self.vips.get(ip) {
                        return Err(vec![FieldError::new(
                            "spec.clusterIP",
                            format!("cluster IP {ip} is already used by Service {other}"),
                        )]);
                    }
                }
                for ip in &svc.cluster_ips {
                    self.vips.insert(*ip, owner.clone());
                }
                self.services.insert(k, svc);
            }
            Object::Other(raw) => return self.insert_other(key, raw, origin),
        }
        Ok(Inserted::Applied(key))
    }

    fn insert_other(
        &mut self,
        key: ObjectKey,
        raw: RawObject,
        origin: Option<String>,
    ) -> Result<Inserted, Vec<FieldError>> {
        if raw.name.is_empty() {
            return Err(vec![FieldError::new("metadata.name", "is required")]);
        }
        let class = kinds::classify(&raw.api_version, &raw.kind);
        // Checked before the duplicate test, so a bad object does not claim its name.
        enum Typed {
            Authorization(security::AuthorizationPolicy),
            Peer(security::PeerAuthentication),
            VirtualService(Box<networking::VirtualService>),
            DestinationRule(Box<networking::DestinationRule>),
            ServiceEntry(Box<networking::ServiceEntry>),
            HttpRoute(Box<gateway::HttpRoute>),
            GrpcRoute(Box<gateway::GrpcRoute>),
            Raw,
        }
        let typed = match &class {
            Class::Known(Kind::AuthorizationPolicy) => {
                Typed::Authorization(security::authorization_policy(&raw)?)
            }
            Class::Known(Kind::PeerAuthentication) => {
                Typed::Peer(security::peer_authentication(&raw)?)
            }
            Class::Known(Kind::VirtualService) => {
                Typed::VirtualService(Box::new(networking::virtual_service(&raw, origin)?))
            }
            Class::Known(Kind::DestinationRule) => {
                Typed::DestinationRule(Box::new(networking::destination_rule(&raw, origin)?))
            }
            Class::Known(Kind::ServiceEntry) => {
                Typed::ServiceEntry(Box::new(networking::service_entry(&raw, origin)?))
            }
            Class::Known(Kind::HttpRoute) => {
                Typed::HttpRoute(Box::new(gateway::http_route(&raw, origin)?))
            }
            Class::Known(Kind::GrpcRoute) => {
                Typed::GrpcRoute(Box::new(gateway::grpc_route(&raw, origin)?))
            }
            Class::Foreign | Class::Unknown { .. } => Typed::Raw,
        };
        // One object whatever the version it is written in (Kubernetes serves every version of
        // the same object).
        let same_object = match &class {
            Class::Known(_) => ObjectKey {
                api_version: raw
                    .api_version
                    .split_once('/')
                    .map_or(raw.api_version.as_str(), |(g, _)| g)
                    .to_string(),
                ..key.clone()
            },
            _ => key.clone(),
        };
        if !self.other_keys.insert(same_object) {
            return Err(vec![FieldError::new(
                "metadata.name",
                format!("duplicate {key}"),
            )]);
        }
        match (class, typed) {
            (_, Typed::Authorization(p)) => self.objects.authorization_policies.push(Arc::new(p)),
            (_, Typed::Peer(p)) => self.objects.peer_authentications.push(Arc::new(p)),
            (_, Typed::VirtualService(o)) => self.objects.virtual_services.push(Arc::new(*o)),
            (_, Typed::DestinationRule(o)) => self.objects.destination_rules.push(Arc::new(*o)),
            (_, Typed::ServiceEntry(o)) => self.objects.service_entries.push(Arc::new(*o)),
            (_, Typed::HttpRoute(o)) => self.objects.http_routes.push(Arc::new(*o)),
            (_, Typed::GrpcRoute(o)) => self.objects.grpc_routes.push(Arc::new(*o)),
            (Class::Unknown { reason, security }, Typed::Raw) => {
                if security {
                    self.objects.fail_closed.push(FailClosed {
                        kind: raw.kind.clone(),
                        namespace: raw.namespace_or_default().to_string(),
                        name: raw.name.clone(),
                        selector: selector_of(&raw),
                        reason: reason.clone(),
                    });
                }
                return Ok(Inserted::NotApplied { key, reason });
            }
            (_, Typed::Raw) => self.objects.others.push(raw),
        }
        Ok(Inserted::Applied(key))
    }

    /// Records an object the source left out, with where it came from.
    pub fn not_applied(&mut self, item: NotApplied) {
        self.objects.not_applied.push(item);
    }

    /// Checks that need more than one object, once every object is in: each VirtualService
    /// destination naming a subset needs a DestinationRule for its host defining that subset
    /// (Istio's analyzer reports this; weft refuses the load, as traffic to a missing subset
    /// would only fail at request time). Each problem names the object it belongs to.
    pub fn validate(&self) -> Vec<(ObjectKey, FieldError)> {
        let service_exists = |ns: &str, name: &str| {
            self.services
                .contains_key(&(ns.to_string(), name.to_string()))
        };
        let service_of_ip = |ip: IpAddr| {
            self.vips.get(&ip).and_then(|owner| {
                owner
                    .split_once('/')
                    .map(|(ns, n)| (ns.to_string(), n.to_string()))
            })
        };
        // (resolved DR host, subset names)
        let subsets: Vec<(String, Vec<&str>)> = self
            .objects
            .destination_rules
            .iter()
            .map(|dr| {
                let host = qualify_host(
                    &dr.spec.host,
                    &dr.meta.namespace,
                    service_exists,
                    service_of_ip,
                );
                let names = dr.spec.subsets.iter().map(|s| s.name.as_str()).collect();
                (host, names)
            })
            .collect();
        let mut out = Vec::new();
        for vs in &self.objects.virtual_services {
            let key = ObjectKey {
                api_version: kinds::NETWORKING_GROUP.into(),
                kind: "VirtualService".into(),
                namespace: Some(vs.meta.namespace.clone()),
                name: vs.meta.name.clone(),
            };
            let mut check = |d: &Destination, path: String| {
                if d.subset.is_empty() {
                    return;
                }
                let host = qualify_host(&d.host, &vs.meta.namespace, service_exists, service_of_ip);
                let defined = subsets.iter().any(|(dr_host, names)| {
                    (dr_host == &host || host_matches(dr_host, &host))
                        && names.contains(&d.subset.as_str())
                });
                if !defined {
                    out.push((
                        key.clone(),
                        FieldError::new(
                            format!("{path}.subset"),
                            format!(
                                "unknown subset {:?} of {host} (no DestinationRule defines it)",
                                d.subset
                            ),
                        ),
                    ));
                }
            };
            for (i, http) in vs.spec.http.iter().enumerate() {
                for (j, r) in http.route.iter().enumerate() {
                    if let Some(d) = &r.destination {
                        check(d, format!("spec.http[{i}].route[{j}].destination"));
                    }
                }
                if let Some(d) = &http.mirror {
                    check(d, format!("spec.http[{i}].mirror"));
                }
                for (j, m) in http.mirrors.iter().enumerate() {
                    if let Some(d) = &m.destination {
                        check(d, format!("spec.http[{i}].mirrors[{j}].destination"));
                    }
                }
            }
            for (field, routes) in [
                (
                    "tcp",
                    vs.spec.tcp.iter().map(|t| &t.route).collect::<Vec<_>>(),
                ),
                ("tls", vs.spec.tls.iter().map(|t| &t.route).collect()),
            ] {
                for (i, route) in routes.into_iter().enumerate() {
                    for (j, r) in route.iter().enumerate() {
                        if let Some(d) = &r.destination {
                            check(d, format!("spec.{field}[{i}].route[{j}].destination"));
                        }
                    }
                }
            }
        }
        out
    }

    /// The snapshot, with `generation` and the source files it came from.
    pub fn build(self, generation: u64, sources: Vec<PathBuf>) -> Snapshot {
        let objects = Objects {
            namespaces: self.namespaces,
            nodes: self.nodes,
            pods: self.pods.into_values().map(Arc::new).collect(),
            services: self.services.into_values().map(Arc::new).collect(),
            ..self.objects
        };
        Snapshot::new(generation, sources, objects)
    }
}

/// `spec.selector.matchLabels` of an object weft cannot parse, when it reads as labels: `None`
/// (every pod in scope) otherwise, so a garbled selector widens what fails closed.
fn selector_of(raw: &RawObject) -> Option<Labels> {
    let labels = raw.value.get("spec")?.get("selector")?.get("matchLabels")?;
    serde_json::from_value::<Labels>(labels.clone()).ok()
}

/// The key of an object (namespaced kinds default to namespace `default`).
pub fn object_key(object: &Object) -> ObjectKey {
    let core_key = |kind: &str, meta: &ObjectMeta, namespaced: bool| ObjectKey {
        api_version: "v1".into(),
        kind: kind.into(),
        namespace: namespaced.then(|| namespace_of(meta)),
        name: meta.name.clone().unwrap_or_default(),
    };
    match object {
        Object::Namespace(o) => core_key("Namespace", &o.metadata, false),
        Object::Node(o) => core_key("Node", &o.metadata, false),
        Object::Pod(o) => core_key("Pod", &o.metadata, true),
        Object::Service(o) => core_key("Service", &o.metadata, true),
        Object::Other(raw) => ObjectKey {
            api_version: raw.api_version.clone(),
            kind: raw.kind.clone(),
            namespace: raw.namespace.clone(),
            name: raw.name.clone(),
        },
    }
}

fn namespace_of(meta: &ObjectMeta) -> String {
    match meta.namespace.as_deref() {
        Some(ns) if !ns.is_empty() => ns.to_string(),
        _ => "default".to_string(),
    }
}

fn name_of(meta: &ObjectMeta, errors: &mut Vec<FieldError>) -> String {
    match meta.name.as_deref() {
        Some(name) if !name.is_empty() => name.to_string(),
        _ => {
            errors.push(FieldError::new("metadata.name", "is required"));
            String::new()
        }
    }
}

fn done<T>(value: T, errors: Vec<FieldError>) -> Result<T, Vec<FieldError>> {
    if errors.is_empty() {
        Ok(value)
    } else {
        Err(errors)
    }
}

/// Parses an IP address; IPv4-mapped IPv6 becomes IPv4.
fn parse_ip(s: &str) -> Result<IpAddr, String> {
    match s.trim().parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) => Ok(v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6))),
        Ok(ip) => Ok(ip),
        Err(_) => Err(format!("invalid IP address {s:?}")),
    }
}

fn port_number(n: i32) -> Result<u16, String> {
    match u16::try_from(n) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(format!("port {n} out of range 1-65535")),
    }
}

fn protocol(p: &Option<String>, path: String, errors: &mut Vec<FieldError>) -> String {
    match p.as_deref() {
        None | Some("") => "TCP".to_string(),
        Some(p @ ("TCP" | "UDP" | "SCTP")) => p.to_string(),
        Some(other) => {
            errors.push(FieldError::new(
                path,
                format!("unknown protocol {other:?}, expected TCP, UDP or SCTP"),
            ));
            other.to_string()
        }
    }
}

/// Kubernetes port names (IANA_SVC_NAME): 1-15 of `a-z0-9-`, at least one letter, no leading,
/// trailing or double hyphen.
fn check_port_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid port name {name:?}: 1-15 lowercase letters, digits and '-', with at least one letter"
        ))
    }
}

/// Namespace → (name, labels).
pub fn namespace(ns: &core::Namespace) -> Result<(String, Labels), Vec<FieldError>> {
    let mut errors = Vec::new();
    let name = name_of(&ns.metadata, &mut errors);
    let labels = ns.metadata.labels.clone().unwrap_or_default();
    done((name, labels), errors)
}

/// Node → [`Node`]: `InternalIP` addresses first, then `ExternalIP` (other types are not IPs).
pub fn node(n: &core::Node) -> Result<Node, Vec<FieldError>> {
    let mut errors = Vec::new();
    let name = name_of(&n.metadata, &mut errors);
    let mut internal = Vec::new();
    let mut external = Vec::new();
    let addresses = n.status.as_ref().and_then(|s| s.addresses.as_ref());
    for (i, a) in addresses.into_iter().flatten().enumerate() {
        let list = match a.type_.as_str() {
            "InternalIP" => &mut internal,
            "ExternalIP" => &mut external,
            _ => continue,
        };
        match parse_ip(&a.address) {
            Ok(ip) if !list.contains(&ip) => list.push(ip),
            Ok(_) => {}
            Err(e) => errors.push(FieldError::new(format!("status.addresses[{i}].address"), e)),
        }
    }
    internal.extend(
        external
            .into_iter()
            .filter(|ip| !internal.contains(ip))
            .collect::<Vec<_>>(),
    );
    let node = Node {
        name,
        addresses: internal,
        labels: n.metadata.labels.clone().unwrap_or_default(),
    };
    done(node, errors)
}

/// Pod → [`Pod`].
pub fn pod(p: &core::Pod) -> Result<Pod, Vec<FieldError>> {
    let mut errors = Vec::new();
    let name = name_of(&p.metadata, &mut errors);
    let uid = match p.metadata.uid.as_deref() {
        Some(uid) if !uid.is_empty() => {
            // The uid names the pod's cgroup directory: keep it to what a UUID can contain.
            if !uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                errors.push(FieldError::new(
                    "metadata.uid",
                    format!("invalid uid {uid:?}: only letters, digits and '-' are allowed"),
                ));
            }
            uid.to_string()
        }
        _ => {
            errors.push(FieldError::new(
                "metadata.uid",
                "is required for a Pod (it locates the pod's cgroup)",
            ));
            String::new()
        }
    };
    let spec = p.spec.as_ref();
    let status = p.status.as_ref();

    let mut ips = Vec::new();
    if let Some(ip) = status
        .and_then(|s| s.pod_ip.as_deref())
        .filter(|s| !s.is_empty())
    {
        match parse_ip(ip) {
            Ok(ip) => ips.push(ip),
            Err(e) => errors.push(FieldError::new("status.podIP", e)),
        }
    }
    let pod_ips = status.and_then(|s| s.pod_ips.as_ref());
    for (i, ip) in pod_ips.into_iter().flatten().enumerate() {
        match parse_ip(&ip.ip) {
            Ok(ip) if !ips.contains(&ip) => ips.push(ip),
            Ok(_) => {}
            Err(e) => errors.push(FieldError::new(format!("status.podIPs[{i}].ip"), e)),
        }
    }

    let qos = match status.and_then(|s| s.qos_class.as_deref()) {
        None | Some("") => QosClass::BestEffort,
        Some(q) => QosClass::parse(q).unwrap_or_else(|| {
            errors.push(FieldError::new(
                "status.qosClass",
                format!("unknown QoS class {q:?}, expected Guaranteed, Burstable or BestEffort"),
            ));
            QosClass::BestEffort
        }),
    };

    let phase = status
        .and_then(|s| s.phase.clone())
        .filter(|s| !s.is_empty());
    let conditions = status.and_then(|s| s.conditions.as_ref());
    let ready = match conditions {
        Some(c) if !c.is_empty() => c.iter().any(|c| c.type_ == "Ready" && c.status == "True"),
        _ => phase.as_deref() == Some("Running"),
    };

    let mut ports = Vec::new();
    if let Some(spec) = spec {
        // Restartable init containers ("sidecars") serve ports like regular containers.
        let sidecars = spec
            .init_containers
            .iter()
            .flatten()
            .enumerate()
            .filter(|(_, c)| c.restart_policy.as_deref() == Some("Always"));
        let containers = spec
            .containers
            .iter()
            .enumerate()
            .map(|(i, c)| (format!("spec.containers[{i}]"), c))
            .chain(sidecars.map(|(i, c)| (format!("spec.initContainers[{i}]"), c)));
        for (cpath, c) in containers {
            for (j, cp) in c.ports.iter().flatten().enumerate() {
                let path = format!("{cpath}.ports[{j}]");
                let port = port_number(cp.container_port).unwrap_or_else(|e| {
                    errors.push(FieldError::new(format!("{path}.containerPort"), e));
                    0
                });
                let protocol = protocol(&cp.protocol, format!("{path}.protocol"), &mut errors);
                let name = cp.name.clone().filter(|n| !n.is_empty());
                if let Some(n) = &name {
                    if let Err(e) = check_port_name(n) {
                        errors.push(FieldError::new(format!("{path}.name"), e));
                    }
                }
                ports.push(ContainerPort {
                    name,
                    port,
                    protocol,
                });
            }
        }
    }

    let service_account = spec
        .and_then(|s| {
            s.service_account_name
                .as_deref()
                .or(s.service_account.as_deref())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or("default")
        .to_string();

    let pod = Pod {
        namespace: namespace_of(&p.metadata),
        name,
        uid,
        node_name: spec
            .and_then(|s| s.node_name.clone())
            .filter(|s| !s.is_empty()),
        ip: ips.first().copied(),
        ips,
        labels: p.metadata.labels.clone().unwrap_or_default(),
        service_account,
        ready,
        phase,
        qos,
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        ports,
    };
    done(pod, errors)
}

/// Service → [`Service`].
pub fn service(s: &core::Service) -> Result<Service, Vec<FieldError>> {
    let mut errors = Vec::new();
    let name = name_of(&s.metadata, &mut errors);
    let spec = s.spec.as_ref();

    let mut cluster_ips = Vec::new();
    let mut add_ip = |ip: &str, path: String, errors: &mut Vec<FieldError>| {
        if ip.is_empty() || ip == "None" {
            return;
        }
        match parse_ip(ip) {
            Ok(ip) if !cluster_ips.contains(&ip) => cluster_ips.push(ip),
            Ok(_) => {}
            Err(e) => errors.push(FieldError::new(path, e)),
        }
    };
    if let Some(ip) = spec.and_then(|s| s.cluster_ip.as_deref()) {
        add_ip(ip, "spec.clusterIP".into(), &mut errors);
    }
    let ips = spec.and_then(|s| s.cluster_ips.as_ref());
    for (i, ip) in ips.into_iter().flatten().enumerate() {
        add_ip(ip, format!("spec.clusterIPs[{i}]"), &mut errors);
    }
    if spec.and_then(|s| s.type_.as_deref()) == Some("ExternalName") {
        cluster_ips.clear();
    }

    let mut ports: Vec<ServicePort> = Vec::new();
    let spec_ports = spec.and_then(|s| s.ports.as_ref());
    for (i, p) in spec_ports.into_iter().flatten().enumerate() {
        let path = format!("spec.ports[{i}]");
        let port = port_number(p.port).unwrap_or_else(|e| {
            errors.push(FieldError::new(format!("{path}.port"), e));
            0
        });
        let target_port = match &p.target_port {
            None => TargetPort::Number(port),
            Some(IntOrString::Int(n)) => TargetPort::Number(port_number(*n).unwrap_or_else(|e| {
                errors.push(FieldError::new(format!("{path}.targetPort"), e));
                0
            })),
            Some(IntOrString::String(name)) => {
                if let Err(e) = check_port_name(name) {
                    errors.push(FieldError::new(format!("{path}.targetPort"), e));
                }
                TargetPort::Name(name.clone())
            }
        };
        let protocol = protocol(&p.protocol, format!("{path}.protocol"), &mut errors);
        if port != 0
            && ports
                .iter()
                .any(|q| q.port == port && q.protocol == protocol)
        {
            errors.push(FieldError::new(
                format!("{path}.port"),
                format!("duplicate port {port}/{protocol}"),
            ));
        }
        ports.push(ServicePort {
            name: p.name.clone().filter(|n| !n.is_empty()),
            port,
            target_port,
            protocol,
            app_protocol: p.app_protocol.clone().filter(|a| !a.is_empty()),
        });
    }

    let svc = Service {
        namespace: namespace_of(&s.metadata),
        name,
        cluster_ip: cluster_ips.first().copied(),
        cluster_ips,
        selector: spec
            .and_then(|s| s.selector.clone())
            .filter(|s| !s.is_empty()),
        ports,
    };
    done(svc, errors)
}
