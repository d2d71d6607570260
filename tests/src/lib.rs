//! weft-tests: a Kubernetes cluster on one machine, for weft's end-to-end tests.
//!
//! - a **fabric** network namespace holds a bridge (nothing is added to the root netns);
//! - a **node** is a netns on that bridge (node IP 172.30.0.<10+k>/16, pod CIDR 10.244.<k>.0/24,
//!   routes to every other node's pod CIDR) with a cgroup root `<test cgroup>/<node>` (weft's
//!   `--cgroup-root`) and a separate system cgroup for processes run on the node (the proxy);
//! - a **pod** is a netns with `eth0` (Calico-style: /32 address, default route via 169.254.1.1,
//!   proxy ARP on the host veth) and a kubelet-layout cgroup below its node's cgroup root;
//! - processes start in a pod by joining its container cgroup first, then entering its netns;
//! - the cluster is described as Kubernetes-shaped YAML for weft's file registry.
//!
//! Everything is owned by a per-cluster id and removed on drop, even when the test panics.
//! Requires root, cgroup v2 (at /sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid hosts) and iproute2.

pub mod apiserver;
pub mod certs;
pub mod cgroup;
mod cleanup;
mod cluster;
pub mod dns;
pub mod ids;
pub mod netns;
mod node;
pub mod otlp;
mod pod;
mod process;
pub mod registry;
mod spec;
pub mod traffic;
mod wait;
mod weft;

pub use certs::{server_certs, TlsFiles};
pub use cgroup::{CgroupDriver, Qos};
pub use cleanup::{cleanup_stale, StaleReport};
pub use cluster::{
    logs_root, node_ip, pod_cidr, Cluster, API_SERVER_IP, CA_PORT, FABRIC_BRIDGE, POD_GATEWAY,
};
pub use dns::Dns;
pub use netns::InNetns;
pub use node::Node;
pub use pod::Pod;
pub use process::Proc;
pub use registry::{Labels, ServicePort, TargetPort};
pub use spec::{PodSpec, Service, ServiceSpec};
pub use wait::{tcp_connect, wait_for, wait_for_tcp, wait_until};
pub use weft::{mesh_ca, supports_handover, HandOver, Weft};

use std::path::PathBuf;

/// Labels from pairs: `labels(&[("app", "web")])`.
pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `target/<profile>/` of the running test binary (test binaries live in `target/<profile>/deps/`).
pub fn target_profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("exe has a parent").to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("deps has a parent").to_path_buf()
    } else {
        dir
    }
}

/// The `weft` binary: `$WEFT_BIN`, else `target/<profile>/weft` next to the test binary.
///
/// Cargo does not rebuild another package's binary before running this package's tests, so
/// the default path is checked against the sources: a `weft` older than `proxy/`, `ebpf/` or
/// `common/` is refused rather than silently tested (`cargo build --bins` or `cargo xtask test`).
pub fn weft_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("WEFT_BIN") {
        return PathBuf::from(bin);
    }
    let bin = target_profile_dir().join("weft");
    let built = std::fs::metadata(&bin)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("{}: {e}: run `cargo build --bins` first", bin.display()));
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    if let Some(newer) = ["proxy/src", "ebpf/src", "common/src"]
        .iter()
        .find_map(|d| newer_file(&root.join(d), built))
    {
        panic!(
            "{} is older than {}: run `cargo build --bins` (or `cargo xtask test`)",
            bin.display(),
            newer.display()
        );
    }
    bin
}

/// A file below `dir` modified after `than`.
fn newer_file(dir: &std::path::Path, than: std::time::SystemTime) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let meta = entry.metadata().ok()?;
        if meta.is_dir() {
            if let Some(p) = newer_file(&path, than) {
                return Some(p);
            }
        } else if meta.modified().is_ok_and(|m| m > than) {
            return Some(path);
        }
    }
    None
}

/// The `weft-testpod` binary: `$WEFT_TESTPOD_BIN`, else `target/<profile>/weft-testpod`
/// (cargo builds it before running this package's integration tests).
pub fn testpod_bin() -> PathBuf {
    std::env::var_os("WEFT_TESTPOD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_profile_dir().join("weft-testpod"))
}
