//! Kubernetes-shaped objects (v1 Namespace, Node, Pod, Service) for weft's file registry.

use anyhow::{Context, Result};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;

pub type Labels = BTreeMap<String, String>;

/// A Service port's `targetPort`: a number or a container port name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

impl From<u16> for TargetPort {
    fn from(p: u16) -> Self {
        TargetPort::Number(p)
    }
}

impl From<&str> for TargetPort {
    fn from(s: &str) -> Self {
        TargetPort::Name(s.to_string())
    }
}

impl From<String> for TargetPort {
    fn from(s: String) -> Self {
        TargetPort::Name(s)
    }
}

impl TargetPort {
    fn to_json(&self) -> Value {
        match self {
            TargetPort::Number(n) => json!(n),
            TargetPort::Name(s) => json!(s),
        }
    }
}

/// One port of a Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    pub target_port: TargetPort,
    /// `appProtocol` (`http`, `http2`, `grpc`, `kubernetes.io/h2c`, `tcp`…), if any.
    pub app_protocol: Option<String>,
}

pub(crate) fn namespace(name: &str, labels: &Labels) -> Value {
    let mut l = labels.clone();
    l.entry("kubernetes.io/metadata.name".into())
        .or_insert_with(|| name.to_string());
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": { "name": name, "labels": l },
    })
}

pub(crate) fn node(name: &str, ip: Ipv4Addr, pod_cidr: &str, extra: Option<&Labels>) -> Value {
    let mut labels = json!({ "kubernetes.io/hostname": name, "kubernetes.io/os": "linux" });
    for (k, v) in extra.into_iter().flatten() {
        labels[k] = json!(v);
    }
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": labels,
        },
        "spec": { "podCIDR": pod_cidr, "podCIDRs": [pod_cidr] },
        "status": {
            "addresses": [
                { "type": "InternalIP", "address": ip.to_string() },
                { "type": "Hostname", "address": name },
            ],
            "conditions": [ { "type": "Ready", "status": "True" } ],
        },
    })
}

pub(crate) struct PodObject<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
    pub labels: &'a Labels,
    pub node_name: &'a str,
    pub host_ip: Ipv4Addr,
    pub service_account: &'a str,
    pub container_ports: &'a [(String, u16)],
    pub readiness_probe: Option<&'a str>,
    /// (kind, name) of the controller that owns the pod.
    pub owner: Option<(&'a str, &'a str)>,
    pub container_id: &'a str,
    pub pod_ip: Ipv4Addr,
    pub qos: &'a str,
    pub ready: bool,
}

pub(crate) fn pod(p: &PodObject<'_>) -> Value {
    let ports: Vec<Value> = p
        .container_ports
        .iter()
        .map(|(name, port)| {
            let mut m = Map::new();
            if !name.is_empty() {
                m.insert("name".into(), json!(name));
            }
            m.insert("containerPort".into(), json!(port));
            m.insert("protocol".into(), json!("TCP"));
            Value::Object(m)
        })
        .collect();
    let ready = if p.ready { "True" } else { "False" };
    let mut container = json!({ "name": "app", "image": "weft-testpod", "ports": ports });
    if let Some(port) = p.readiness_probe {
        let port = port
            .parse::<u16>()
            .map_or_else(|_| json!(port), |n| json!(n));
        container["readinessProbe"] = json!({ "tcpSocket": { "port": port }, "periodSeconds": 10 });
    }
    let mut metadata = json!({
        "name": p.name,
        "namespace": p.namespace,
        "uid": p.uid,
        "labels": p.labels,
    });
    if let Some((kind, name)) = p.owner {
        metadata["generateName"] = json!(format!("{name}-"));
        metadata["ownerReferences"] = json!([{
            "apiVersion": "apps/v1",
            "kind": kind,
            "name": name,
            "uid": format!("{}-owner", p.uid),
            "controller": true,
            "blockOwnerDeletion": true,
        }]);
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {
            "nodeName": p.node_name,
            "serviceAccountName": p.service_account,
            "containers": [ container ],
        },
        "status": {
            "phase": "Running",
            "hostIP": p.host_ip.to_string(),
            "podIP": p.pod_ip.to_string(),
            "podIPs": [ { "ip": p.pod_ip.to_string() } ],
            "qosClass": p.qos,
            "conditions": [
                { "type": "Ready", "status": ready },
                { "type": "ContainersReady", "status": ready },
            ],
            "containerStatuses": [ {
                "name": "app",
                "ready": p.ready,
                "containerID": format!("containerd://{}", p.container_id),
            } ],
        },
    })
}

pub(crate) fn service(
    namespace: &str,
    name: &str,
    cluster_ip: Ipv4Addr,
    selector: &Labels,
    ports: &[ServicePort],
) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|p| {
            let mut m = Map::new();
            if !p.name.is_empty() {
                m.insert("name".into(), json!(p.name));
            }
            m.insert("protocol".into(), json!("TCP"));
            m.insert("port".into(), json!(p.port));
            m.insert("targetPort".into(), p.target_port.to_json());
            if let Some(a) = &p.app_protocol {
                m.insert("appProtocol".into(), json!(a));
            }
            Value::Object(m)
        })
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": name, "namespace": namespace },
        "spec": {
            "type": "ClusterIP",
            "clusterIP": cluster_ip.to_string(),
            "clusterIPs": [cluster_ip.to_string()],
            "selector": selector,
            "ports": ports,
        },
    })
}

/// Parse multi-document YAML into JSON values (empty documents skipped).
pub fn parse_documents(yaml: &str) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(yaml).enumerate() {
        let v = Value::deserialize(doc).with_context(|| format!("YAML document {}", i + 1))?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

/// (kind, namespace, name) of an object.
pub(crate) fn object_key(v: &Value) -> (String, String, String) {
    let s = |p: &str| {
        v.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    (s("/kind"), s("/metadata/namespace"), s("/metadata/name"))
}

/// Multi-document YAML (`---` separated).
pub(crate) fn to_yaml(docs: &[Value]) -> String {
    let mut out = String::new();
    for d in docs {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(d).expect("JSON values always serialize"));
    }
    out
}

/// Write atomically (temp file + rename) so a watcher never reads half a file.
pub(crate) fn write_atomic(path: &Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir)?;
        }
    }
    let file_name = path
        .file_name()
        .context("registry path has no file name")?
        .to_string_lossy();
    let tmp = path.with_file_name(format!(".{file_name}.tmp{}", std::process::id()));
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}
