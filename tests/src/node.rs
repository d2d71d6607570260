//! A simulated node: a netns on the fabric bridge, a cgroup root for its pods and a system
//! cgroup (outside that root) for the processes it runs, such as weft itself.

use crate::cluster::{pod_cidr, Shared};
use crate::netns::{self, InNetns};
use crate::process::{self, Place, Proc};
use anyhow::Result;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

pub(crate) struct NodeInner {
    pub(crate) name: String,
    pub(crate) index: u8,
    pub(crate) ip: Ipv4Addr,
    pub(crate) netns: String,
    pub(crate) cgroup_root: PathBuf,
    pub(crate) system_cgroup: PathBuf,
    pub(crate) bpffs_dir: PathBuf,
    pub(crate) state_dir: PathBuf,
    pub(crate) shared: Arc<Shared>,
}

/// A simulated node. Cheap to clone; does not keep the cluster alive.
#[derive(Clone)]
pub struct Node {
    pub(crate) inner: Arc<NodeInner>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Node({} {} {})",
            self.inner.name, self.inner.ip, self.inner.netns
        )
    }
}

impl InNetns for Node {
    fn netns_name(&self) -> &str {
        &self.inner.netns
    }
}

impl Node {
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// 1-based index k: IP 172.30.0.<10+k>, pod CIDR 10.244.<k>.0/24.
    pub fn index(&self) -> u8 {
        self.inner.index
    }

    /// The node IP (InternalIP).
    pub fn ip(&self) -> Ipv4Addr {
        self.inner.ip
    }

    pub fn pod_cidr(&self) -> String {
        pod_cidr(self.inner.index)
    }

    /// The node's cgroup root (weft's `--cgroup-root`); the kubelet layout lives below it.
    pub fn cgroup_root(&self) -> &Path {
        &self.inner.cgroup_root
    }

    /// The cgroup that `node.spawn` puts processes into (`<test cgroup>/<node>.system`): outside
    /// the cgroup root, so the proxy is never captured.
    pub fn system_cgroup(&self) -> &Path {
        &self.inner.system_cgroup
    }

    /// A bpffs pin directory for this node's weft (`/sys/fs/bpf/weft-<id>-<node>`; not created;
    /// removed at teardown if it exists).
    pub fn bpffs_dir(&self) -> &Path {
        &self.inner.bpffs_dir
    }

    /// A directory for this node's files (admin socket, config, registry…); created.
    pub fn state_dir(&self) -> &Path {
        &self.inner.state_dir
    }

    /// Start a process in the node's netns and system cgroup. stdout/stderr go to the log dir.
    pub fn spawn(&self, cmd: &Command) -> Result<Proc> {
        process::spawn(&self.inner.shared.logs, &self.place(), cmd)
    }

    /// Start a process in the node's netns but in another cgroup: how a `hostNetwork` pod (a
    /// DaemonSet such as weft itself) runs, with the node's network and its own pod cgroup.
    pub fn spawn_in_cgroup(&self, cgroup: &Path, cmd: &Command) -> Result<Proc> {
        let place = Place {
            cgroup,
            netns: &self.inner.netns,
            label: &self.inner.name,
        };
        process::spawn(&self.inner.shared.logs, &place, cmd)
    }

    /// Like `spawn`, in a process group of its own, killed as a whole on drop (for servers
    /// that fork).
    pub fn spawn_group(&self, cmd: &Command) -> Result<Proc> {
        process::spawn_group(&self.inner.shared.logs, &self.place(), cmd)
    }

    /// Run a process to completion on the node (time limit 60 s).
    pub fn output(&self, cmd: &Command) -> Result<Output> {
        self.output_timeout(cmd, process::DEFAULT_OUTPUT_TIMEOUT)
    }

    pub fn output_timeout(&self, cmd: &Command, timeout: Duration) -> Result<Output> {
        process::output(&self.inner.shared.logs, &self.place(), cmd, timeout)
    }

    /// `ip <args>` in the node netns.
    pub fn ip_cmd(&self, args: &[&str]) -> Result<String> {
        netns::ip(&self.inner.netns, args)
    }

    fn place(&self) -> Place<'_> {
        Place {
            cgroup: &self.inner.system_cgroup,
            netns: &self.inner.netns,
            label: &self.inner.name,
        }
    }
}
