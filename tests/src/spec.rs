//! What tests ask for: pod and Service specs, and the Service as added.

use crate::cgroup::{CgroupDriver, Qos};
use crate::registry::{Labels, ServicePort, TargetPort};
use std::net::{Ipv4Addr, SocketAddr};

/// What a pod is started with. `PodSpec::new(ns, name)` plus the builder methods, or a struct
/// literal with `..Default::default()`.
#[derive(Debug, Clone, Default)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    /// Defaults to `default` when empty.
    pub service_account: String,
    pub qos: Qos,
    /// (name, containerPort); the name may be empty.
    pub container_ports: Vec<(String, u16)>,
    /// A `readinessProbe` with `tcpSocket` on this port (a number or a container port name).
    pub readiness_probe: Option<String>,
    pub driver: CgroupDriver,
    /// The controller that owns it, (kind, name): rendered as its `ownerReferences`
    /// (`controller: true`) and `generateName`.
    pub owner: Option<(String, String)>,
}

/// The `pod-template-hash` of pods made by [`PodSpec::deployment`].
pub const POD_TEMPLATE_HASH: &str = "6d9f7c8b5";

impl PodSpec {
    pub fn new(namespace: &str, name: &str) -> PodSpec {
        PodSpec {
            namespace: namespace.into(),
            name: name.into(),
            ..Default::default()
        }
    }

    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.labels.insert(k.into(), v.into());
        self
    }

    pub fn service_account(mut self, sa: &str) -> Self {
        self.service_account = sa.into();
        self
    }

    pub fn qos(mut self, qos: Qos) -> Self {
        self.qos = qos;
        self
    }

    pub fn port(mut self, name: &str, port: u16) -> Self {
        self.container_ports.push((name.into(), port));
        self
    }

    /// A readiness probe (`tcpSocket`) on `port`: a number or a container port's name.
    pub fn readiness_probe(mut self, port: &str) -> Self {
        self.readiness_probe = Some(port.into());
        self
    }

    pub fn driver(mut self, driver: CgroupDriver) -> Self {
        self.driver = driver;
        self
    }

    /// A pod of Deployment `name`, as Kubernetes makes it: owned by its ReplicaSet
    /// `<name>-<hash>`, labelled `pod-template-hash: <hash>`.
    pub fn deployment(mut self, name: &str) -> Self {
        self.owner = Some(("ReplicaSet".into(), format!("{name}-{POD_TEMPLATE_HASH}")));
        self.label("pod-template-hash", POD_TEMPLATE_HASH)
    }
}

/// A Service to add. `cluster_ip: None` allocates one from 10.96.0.0/16.
#[derive(Debug, Clone, Default)]
pub struct ServiceSpec {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: Option<Ipv4Addr>,
    pub selector: Labels,
    pub ports: Vec<ServicePort>,
}

impl ServiceSpec {
    pub fn new(namespace: &str, name: &str) -> ServiceSpec {
        ServiceSpec {
            namespace: namespace.into(),
            name: name.into(),
            ..Default::default()
        }
    }

    pub fn selector(mut self, k: &str, v: &str) -> Self {
        self.selector.insert(k.into(), v.into());
        self
    }

    pub fn cluster_ip(mut self, ip: Ipv4Addr) -> Self {
        self.cluster_ip = Some(ip);
        self
    }

    /// Add a port: `port("http", 80, 8080, Some("http"))` or `port("web", 80, "web", None)`.
    pub fn port(
        mut self,
        name: &str,
        port: u16,
        target_port: impl Into<TargetPort>,
        app_protocol: Option<&str>,
    ) -> Self {
        self.ports.push(ServicePort {
            name: name.into(),
            port,
            target_port: target_port.into(),
            app_protocol: app_protocol.map(str::to_string),
        });
        self
    }
}

/// A Service as added.
#[derive(Debug, Clone)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub selector: Labels,
    pub ports: Vec<ServicePort>,
}

impl Service {
    /// `<clusterIP>:<port>`.
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.cluster_ip, port))
    }
}
