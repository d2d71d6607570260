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
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::kinds::networking::{host_matches, qualify_host, Destination};
use super::kinds::{self, gateway, networking, security, Class, Kind};
use super::model::target_port_warnings;
use super::model::{
    ContainerPort, EndpointSlice, FailClosed, FailEffect, Labels, Node, Objects, Owner, Pod,
    Problem, QosClass, RawObject, Service, ServicePort, SliceEndpoint, SlicePort, Snapshot,
    TargetPort,
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
    EndpointSlice(Box<discovery::EndpointSlice>),
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

/// One object converted to the model and checked on its own ([`convert`]): what a source keeps
/// per object, so a change converts only the object that changed and a rebuild only adds.
#[derive(Debug, Clone)]
pub struct Conversion {
    pub key: ObjectKey,
    /// The model object, or every problem found (the object is left out).
    pub result: Result<Converted, Vec<FieldError>>,
    /// A security object that cannot be applied: what it could select fails closed.
    pub fail_closed: Option<FailClosed>,
}

/// A converted object.
#[derive(Debug, Clone)]
pub enum Converted {
    Namespace(String, Labels),
    Node(Node),
    Pod(Arc<Pod>),
    Service(Arc<Service>),
    EndpointSlice(Arc<EndpointSlice>),
    AuthorizationPolicy(Arc<security::AuthorizationPolicy>),
    PeerAuthentication(Arc<security::PeerAuthentication>),
    VirtualService(Arc<networking::VirtualService>),
    DestinationRule(Arc<networking::DestinationRule>),
    ServiceEntry(Arc<networking::ServiceEntry>),
    HttpRoute(Arc<gateway::HttpRoute>),
    GrpcRoute(Arc<gateway::GrpcRoute>),
    /// Of a group weft does not read: kept as it is.
    Other(RawObject),
    /// An unknown kind or version in a group weft reads: not applied.
    NotApplied(String),
}

/// Converts and checks one object on its own (no other object is looked at). `origin`
/// (`file:line`) is kept in the typed routing objects.
pub fn convert(object: &Object, origin: Option<String>) -> Conversion {
    let key = object_key(object);
    let result = match object {
        Object::Namespace(ns) => namespace(ns).map(|(n, l)| Converted::Namespace(n, l)),
        Object::Node(n) => node(n).map(Converted::Node),
        Object::Pod(p) => pod(p).map(|p| Converted::Pod(Arc::new(p))),
        Object::Service(s) => service(s).map(|s| Converted::Service(Arc::new(s))),
        Object::EndpointSlice(s) => {
            endpoint_slice(s).map(|s| Converted::EndpointSlice(Arc::new(s)))
        }
        Object::Other(raw) => return convert_other(key, raw, origin),
    };
    Conversion {
        key,
        result,
        fail_closed: None,
    }
}

fn convert_other(key: ObjectKey, raw: &RawObject, origin: Option<String>) -> Conversion {
    let done = |result, fail_closed| Conversion {
        key: key.clone(),
        result,
        fail_closed,
    };
    if raw.name.is_empty() {
        return done(
            Err(vec![FieldError::new("metadata.name", "is required")]),
            None,
        );
    }
    let kind = match kinds::classify(&raw.api_version, &raw.kind) {
        Class::Known(kind) => kind,
        Class::Foreign => return done(Ok(Converted::Other(raw.clone())), None),
        Class::Unknown { reason, security } => {
            let fail_closed = security.then(|| FailClosed {
                kind: raw.kind.clone(),
                namespace: raw.namespace_or_default().to_string(),
                name: raw.name.clone(),
                selector: selector_of(raw),
                effect: FailEffect::DenyAll,
                reason: reason.clone(),
            });
            return done(Ok(Converted::NotApplied(reason)), fail_closed);
        }
    };
    let parsed =
        check_known(raw).and_then(|()| match kind {
            Kind::AuthorizationPolicy => security::authorization_policy(raw)
                .map(|o| Converted::AuthorizationPolicy(Arc::new(o))),
            Kind::PeerAuthentication => security::peer_authentication(raw)
                .map(|o| Converted::PeerAuthentication(Arc::new(o))),
            Kind::VirtualService => networking::virtual_service(raw, origin)
                .map(|o| Converted::VirtualService(Arc::new(o))),
            Kind::DestinationRule => networking::destination_rule(raw, origin)
                .map(|o| Converted::DestinationRule(Arc::new(o))),
            Kind::ServiceEntry => {
                networking::service_entry(raw, origin).map(|o| Converted::ServiceEntry(Arc::new(o)))
            }
            Kind::HttpRoute => {
                gateway::http_route(raw, origin).map(|o| Converted::HttpRoute(Arc::new(o)))
            }
            Kind::GrpcRoute => {
                gateway::grpc_route(raw, origin).map(|o| Converted::GrpcRoute(Arc::new(o)))
            }
        });
    let fail_closed = match &parsed {
        Err(errors) => fail_closed_of(kind, raw, errors),
        Ok(_) => None,
    };
    done(parsed, fail_closed)
}

/// The top-level and `metadata` fields of an object of a kind weft reads: what the API
/// server's schema would refuse (`sepc:`, `metadata.namepsace:`) is an error, not a silently
/// empty spec.
fn check_known(raw: &RawObject) -> Result<(), Vec<FieldError>> {
    let mut errors = Vec::new();
    if let Some(obj) = raw.value.as_object() {
        for key in obj.keys() {
            if !matches!(
                key.as_str(),
                "apiVersion" | "kind" | "metadata" | "spec" | "status"
            ) {
                errors.push(FieldError::new(
                    key.clone(),
                    format!(
                        "unknown field {key:?} in a {}, expected apiVersion, kind, metadata, spec or status",
                        raw.kind
                    ),
                ));
            }
        }
        if let Some(meta) = obj.get("metadata") {
            errors.extend(unknown_fields::<ObjectMeta>(meta, "metadata"));
        }
    }
    done((), errors)
}

/// A security object that fails its checks must not widen access: what it could select fails
/// closed, by its action (see [`FailEffect`]).
fn fail_closed_of(kind: Kind, raw: &RawObject, errors: &[FieldError]) -> Option<FailClosed> {
    let effect = match kind {
        Kind::AuthorizationPolicy => match raw.value.get("spec").and_then(|s| s.get("action")) {
            None | Some(serde_json::Value::Null) => FailEffect::AllowNothing,
            Some(a) if a == "ALLOW" => FailEffect::AllowNothing,
            // An AUDIT policy decides nothing.
            Some(a) if a == "AUDIT" => return None,
            Some(_) => FailEffect::DenyAll,
        },
        Kind::PeerAuthentication => FailEffect::Strict,
        _ => return None,
    };
    let reason = errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    Some(FailClosed {
        kind: raw.kind.clone(),
        namespace: raw.namespace_or_default().to_string(),
        name: raw.name.clone(),
        selector: selector_of(raw),
        effect,
        reason,
    })
}

/// Accumulates objects, converting and checking each, then builds a [`Snapshot`].
#[derive(Debug, Default)]
pub struct SnapshotBuilder {
    namespaces: BTreeMap<String, Labels>,
    nodes: BTreeMap<String, Node>,
    pods: BTreeMap<(String, String), Arc<Pod>>,
    services: BTreeMap<(String, String), Arc<Service>>,
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
        self.add(convert(&object, origin))
    }

    /// Adds a converted object: a rejected one only leaves its fail-closed effect; a valid one
    /// is checked against those already in (duplicates, a cluster IP used twice).
    pub fn add(&mut self, conversion: Conversion) -> Result<Inserted, Vec<FieldError>> {
        let Conversion {
            key,
            result,
            fail_closed,
        } = conversion;
        if let Some(f) = fail_closed {
            self.objects.fail_closed.push(f);
        }
        let converted = result?;
        let duplicate = || vec![FieldError::new("metadata.name", format!("duplicate {key}"))];
        match converted {
            Converted::Namespace(name, labels) => {
                if self.namespaces.contains_key(&name) {
                    return Err(duplicate());
                }
                self.namespaces.insert(name, labels);
            }
            Converted::Node(node) => {
                if self.nodes.contains_key(&node.name) {
                    return Err(duplicate());
                }
                self.nodes.insert(node.name.clone(), node);
            }
            Converted::Pod(pod) => {
                let k = (pod.namespace.clone(), pod.name.clone());
                if self.pods.contains_key(&k) {
                    return Err(duplicate());
                }
                self.pods.insert(k, pod);
            }
            Converted::Service(svc) => {
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
            Converted::NotApplied(reason) => return Ok(Inserted::NotApplied { key, reason }),
            other => {
                // One object whatever the version it is written in (Kubernetes serves every
                // version of the same object).
                let same_object = match &other {
                    Converted::Other(_) => key.clone(),
                    _ => ObjectKey {
                        api_version: key
                            .api_version
                            .split_once('/')
                            .map_or(key.api_version.as_str(), |(g, _)| g)
                            .to_string(),
                        ..key.clone()
                    },
                };
                if !self.other_keys.insert(same_object) {
                    return Err(duplicate());
                }
                let o = &mut self.objects;
                match other {
                    Converted::EndpointSlice(s) => o.endpoint_slices.push(s),
                    Converted::AuthorizationPolicy(p) => o.authorization_policies.push(p),
                    Converted::PeerAuthentication(p) => o.peer_authentications.push(p),
                    Converted::VirtualService(v) => o.virtual_services.push(v),
                    Converted::DestinationRule(d) => o.destination_rules.push(d),
                    Converted::ServiceEntry(e) => o.service_entries.push(e),
                    Converted::HttpRoute(r) => o.http_routes.push(r),
                    Converted::GrpcRoute(r) => o.grpc_routes.push(r),
                    Converted::Other(raw) => o.others.push(raw),
                    Converted::Namespace(..)
                    | Converted::Node(_)
                    | Converted::Pod(_)
                    | Converted::Service(_)
                    | Converted::NotApplied(_) => unreachable!("handled above"),
                }
            }
        }
        Ok(Inserted::Applied(key))
    }

    /// Records an object the source left out, with where it came from.
    pub fn not_applied(&mut self, item: Problem) {
        self.objects.not_applied.push(item);
    }

    /// Records a warning about an applied object, with where it came from.
    pub fn warning(&mut self, item: Problem) {
        self.objects.warnings.push(item);
    }

    /// What a source could not even read as an object (a YAML syntax error) but that looks
    /// like a security object of `namespace`: every pod there fails closed, since what it
    /// would have denied is unknown.
    pub fn fail_closed_unreadable(
        &mut self,
        kind: &str,
        namespace: &str,
        name: &str,
        reason: &str,
    ) {
        self.objects.fail_closed.push(FailClosed {
            kind: kind.to_string(),
            namespace: namespace.to_string(),
            name: name.to_string(),
            selector: None,
            effect: FailEffect::DenyAll,
            reason: reason.to_string(),
        });
    }

    /// Checks that need more than one object, once every object is in: each VirtualService
    /// destination naming a subset needs a DestinationRule for its host defining that subset
    /// (Istio's analyzer reports this; weft leaves such a VirtualService out, as traffic to a
    /// missing subset would only fail at request time). Each problem names the object it
    /// belongs to; the objects named are removed.
    pub fn validate(&mut self) -> Vec<(ObjectKey, FieldError)> {
        let errors = self.cross_checks();
        if !errors.is_empty() {
            let named = |ns: &str, name: &str| {
                errors.iter().any(|(k, _)| {
                    k.kind == "VirtualService"
                        && k.namespace.as_deref() == Some(ns)
                        && k.name == name
                })
            };
            self.objects
                .virtual_services
                .retain(|vs| !named(&vs.meta.namespace, &vs.meta.name));
            self.other_keys.retain(|k| {
                k.kind != "VirtualService" || !named(k.namespace.as_deref().unwrap_or(""), &k.name)
            });
        }
        errors
    }

    /// What is likely a mistake but applies: a Service port whose `targetPort` names a port
    /// that no pod the Service selects declares (every call to it would find no endpoint).
    pub fn warnings(&self) -> Vec<(ObjectKey, FieldError)> {
        let pods_of = |ns: &str| {
            self.pods
                .range((ns.to_string(), String::new())..)
                .take_while(|((n, _), _)| n == ns)
                .map(|(_, p)| p.clone())
                .collect()
        };
        target_port_warnings(self.services.values(), pods_of)
            .into_iter()
            .map(|(svc, reason)| {
                let (path, reason) = reason.split_once(": ").unwrap_or(("", &reason));
                (
                    ObjectKey {
                        api_version: "v1".into(),
                        kind: "Service".into(),
                        namespace: Some(svc.namespace.clone()),
                        name: svc.name.clone(),
                    },
                    FieldError::new(path, reason),
                )
            })
            .collect()
    }

    fn cross_checks(&self) -> Vec<(ObjectKey, FieldError)> {
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
            pods: self.pods.into_values().collect(),
            services: self.services.into_values().collect(),
            ..self.objects
        };
        Snapshot::new(generation, sources, objects)
    }
}

/// The fields of `value` that `T` does not have (`spec.contianers`, `spec.nodeNmae`), as paths
/// under `prefix`: `T` read from `value` and written back keeps every field it knows, so a key
/// present in `value` but not in the round trip is unknown. Null values are skipped (an absent
/// optional field).
pub fn unknown_fields<T: serde::de::DeserializeOwned + serde::Serialize>(
    value: &serde_json::Value,
    prefix: &str,
) -> Vec<FieldError> {
    let Ok(typed) = serde_json::from_value::<T>(value.clone()) else {
        return Vec::new();
    };
    let Ok(back) = serde_json::to_value(&typed) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    diff_keys(value, &back, prefix, &mut out);
    out
}

fn diff_keys(
    given: &serde_json::Value,
    known: &serde_json::Value,
    path: &str,
    out: &mut Vec<FieldError>,
) {
    use serde_json::Value;
    let join = |k: &str| {
        if path.is_empty() {
            k.to_string()
        } else {
            format!("{path}.{k}")
        }
    };
    match (given, known) {
        (Value::Object(g), Value::Object(k)) => {
            for (key, v) in g {
                if v.is_null() {
                    continue;
                }
                match k.get(key) {
                    Some(kv) => diff_keys(v, kv, &join(key), out),
                    None => {
                        let mut fields: Vec<&str> = k.keys().map(String::as_str).collect();
                        fields.sort_unstable();
                        let hint = strsim_closest(key, &fields)
                            .map(|f| format!(" (did you mean {f:?}?)"))
                            .unwrap_or_default();
                        out.push(FieldError::new(
                            join(key),
                            format!("unknown field {key:?}{hint}"),
                        ));
                    }
                }
            }
        }
        (Value::Array(g), Value::Array(k)) => {
            for (i, (gv, kv)) in g.iter().zip(k).enumerate() {
                diff_keys(gv, kv, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// The known field closest to a misspelt one, when close enough to be the likely meaning.
fn strsim_closest<'a>(key: &str, fields: &[&'a str]) -> Option<&'a str> {
    fields
        .iter()
        .map(|f| (strsim::damerau_levenshtein(key, f), *f))
        .filter(|(d, f)| *d <= 2.max(f.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, f)| f)
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
        Object::EndpointSlice(o) => ObjectKey {
            api_version: "discovery.k8s.io/v1".into(),
            ..core_key("EndpointSlice", &o.metadata, true)
        },
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

/// The TCP ports a container's probes target: `httpGet`, `tcpSocket` and `grpc` of its
/// liveness, readiness and startup probes, a named port resolved among the container's own.
/// Probes that name no port the container declares (or `exec` probes) give none.
fn container_probe_ports(c: &k8s_openapi::api::core::v1::Container) -> Vec<u16> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let named = |n: &str| {
        c.ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(n))
            .and_then(|p| u16::try_from(p.container_port).ok())
    };
    let port = |p: &IntOrString| match p {
        IntOrString::Int(n) => u16::try_from(*n).ok().filter(|n| *n != 0),
        IntOrString::String(n) => named(n),
    };
    [&c.liveness_probe, &c.readiness_probe, &c.startup_probe]
        .into_iter()
        .flatten()
        .flat_map(|p| {
            [
                p.http_get.as_ref().and_then(|h| port(&h.port)),
                p.tcp_socket.as_ref().and_then(|t| port(&t.port)),
                p.grpc
                    .as_ref()
                    .and_then(|g| u16::try_from(g.port).ok().filter(|n| *n != 0)),
            ]
        })
        .flatten()
        .collect()
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
    let mut probe_ports = Vec::new();
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
            probe_ports.extend(container_probe_ports(c));
        }
    }
    probe_ports.sort_unstable();
    probe_ports.dedup();

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
        probe_ports,
        owner: owner_of(&p.metadata),
        generate_name: p.metadata.generate_name.clone().filter(|g| !g.is_empty()),
    };
    done(pod, errors)
}

/// The owner of an object: its reference marked `controller: true`, else its first one.
fn owner_of(meta: &ObjectMeta) -> Option<Owner> {
    let refs = meta.owner_references.as_deref().unwrap_or_default();
    let owner = refs
        .iter()
        .find(|r| r.controller == Some(true))
        .or(refs.first())?;
    Some(Owner {
        kind: owner.kind.clone(),
        name: owner.name.clone(),
        controller: owner.controller == Some(true),
    })
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

/// The label naming the Service an EndpointSlice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// EndpointSlice → [`EndpointSlice`]: its Service (label `kubernetes.io/service-name`), ports
/// and endpoints (every address, with the `ready` condition; absent counts as ready, as
/// kube-proxy reads it).
pub fn endpoint_slice(s: &discovery::EndpointSlice) -> Result<EndpointSlice, Vec<FieldError>> {
    let mut errors = Vec::new();
    let name = name_of(&s.metadata, &mut errors);
    let service = s
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .cloned()
        .unwrap_or_default();
    let mut ports = Vec::new();
    for (i, p) in s.ports.iter().flatten().enumerate() {
        let Some(port) = p.port else { continue };
        match port_number(port) {
            Ok(port) => ports.push(SlicePort {
                name: p.name.clone().filter(|n| !n.is_empty()),
                port,
                protocol: protocol(&p.protocol, format!("ports[{i}].protocol"), &mut errors),
            }),
            Err(e) => errors.push(FieldError::new(format!("ports[{i}].port"), e)),
        }
    }
    let mut endpoints = Vec::new();
    if matches!(s.address_type.as_str(), "IPv4" | "IPv6") {
        for (i, e) in s.endpoints.iter().enumerate() {
            let conditions = e.conditions.as_ref();
            let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
            for (j, a) in e.addresses.iter().enumerate() {
                match parse_ip(a) {
                    Ok(ip) => endpoints.push(SliceEndpoint {
                        ip,
                        ready: ready && !terminating,
                    }),
                    Err(e) => {
                        errors.push(FieldError::new(format!("endpoints[{i}].addresses[{j}]"), e))
                    }
                }
            }
        }
    }
    let slice = EndpointSlice {
        namespace: namespace_of(&s.metadata),
        name,
        service,
        ports,
        endpoints,
    };
    done(slice, errors)
}
