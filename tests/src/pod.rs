//! A simulated pod: a netns with eth0 to its node, and a kubelet-layout cgroup.

use crate::cgroup::{self, CgroupDriver, Qos};
use crate::netns::{self, InNetns};
use crate::node::Node;
use crate::process::{self, Place, Proc};
use anyhow::Result;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

pub(crate) struct PodInner {
    pub(crate) namespace: String,
    pub(crate) name: String,
    pub(crate) uid: String,
    pub(crate) ip: Ipv4Addr,
    pub(crate) node: Node,
    pub(crate) netns: String,
    pub(crate) host_veth: String,
    pub(crate) pod_cgroup: PathBuf,
    pub(crate) container_cgroup: PathBuf,
    pub(crate) container_id: String,
    pub(crate) qos: Qos,
    pub(crate) driver: CgroupDriver,
    pub(crate) service_account: String,
    pub(crate) label: String,
}

/// A simulated pod. Cheap to clone; does not keep the cluster alive.
#[derive(Clone)]
pub struct Pod {
    pub(crate) inner: Arc<PodInner>,
}

impl std::fmt::Debug for Pod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Pod({}/{} {} on {})",
            self.inner.namespace,
            self.inner.name,
            self.inner.ip,
            self.inner.node.name()
        )
    }
}

impl InNetns for Pod {
    fn netns_name(&self) -> &str {
        &self.inner.netns
    }
}

impl Pod {
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// metadata.uid (RFC 4122 v4).
    pub fn uid(&self) -> &str {
        &self.inner.uid
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.inner.ip
    }

    /// `<pod ip>:<port>`.
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.inner.ip, port))
    }

    pub fn node(&self) -> &Node {
        &self.inner.node
    }

    pub fn service_account(&self) -> &str {
        &self.inner.service_account
    }

    /// `spiffe://<trust_domain>/ns/<namespace>/sa/<serviceaccount>`.
    pub fn spiffe_id(&self, trust_domain: &str) -> String {
        format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            self.inner.namespace, self.inner.service_account
        )
    }

    pub fn qos(&self) -> Qos {
        self.inner.qos
    }

    pub fn driver(&self) -> CgroupDriver {
        self.inner.driver
    }

    /// The pod cgroup (absolute path; `…/kubepods-<qos>-pod<uid_>.slice` or `…/pod<uid>`).
    pub fn pod_cgroup(&self) -> &Path {
        &self.inner.pod_cgroup
    }

    /// Id of the pod cgroup (its inode; what `bpf_get_current_ancestor_cgroup_id` returns).
    pub fn pod_cgroup_id(&self) -> Result<u64> {
        cgroup::id(&self.inner.pod_cgroup)
    }

    /// The container cgroup (absolute path) where the pod's processes run.
    pub fn container_cgroup(&self) -> &Path {
        &self.inner.container_cgroup
    }

    /// 64 hex digits (status.containerStatuses[0].containerID without `containerd://`).
    pub fn container_id(&self) -> &str {
        &self.inner.container_id
    }

    /// Name of the pod's veth peer in the node netns.
    pub fn host_veth(&self) -> &str {
        &self.inner.host_veth
    }

    /// Start a process in the pod: it joins the container cgroup, then enters the pod netns.
    pub fn spawn(&self, cmd: &Command) -> Result<Proc> {
        process::spawn(&self.inner.node.inner.shared.logs, &self.place(), cmd)
    }

    /// Like `spawn`, in a process group of its own, killed as a whole on drop (for servers
    /// that fork).
    pub fn spawn_group(&self, cmd: &Command) -> Result<Proc> {
        process::spawn_group(&self.inner.node.inner.shared.logs, &self.place(), cmd)
    }

    /// Run a process to completion in the pod (time limit 60 s).
    pub fn output(&self, cmd: &Command) -> Result<Output> {
        self.output_timeout(cmd, process::DEFAULT_OUTPUT_TIMEOUT)
    }

    pub fn output_timeout(&self, cmd: &Command, timeout: Duration) -> Result<Output> {
        process::output(
            &self.inner.node.inner.shared.logs,
            &self.place(),
            cmd,
            timeout,
        )
    }

    /// `ip <args>` in the pod netns.
    pub fn ip_cmd(&self, args: &[&str]) -> Result<String> {
        netns::ip(&self.inner.netns, args)
    }

    fn place(&self) -> Place<'_> {
        Place {
            cgroup: &self.inner.container_cgroup,
            netns: &self.inner.netns,
            label: &self.inner.label,
        }
    }
}
