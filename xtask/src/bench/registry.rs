//! `cargo xtask bench --only registry`: weft's Kubernetes registry source (`weft node
//! --registry kube`) at the scale of a large cluster.
//!
//! One node (node-a) runs the real `weft node --registry kube` against the cluster's API server
//! (the stand-in of `weft_tests::apiserver`, on the fabric). The API server alone also holds a
//! synthetic cluster ([`Synthetic`]): 100 Nodes, 200 Namespaces (half enrolled), 10 000 Pods,
//! 2 000 Services with the EndpointSlices the endpointslice controller would create for them,
//! 1 000 AuthorizationPolicies, 200 VirtualServices and 200 DestinationRules, shaped as a real
//! API server returns them (uids, labels, ownerReferences, managedFields, containers with ports
//! and probes, status with podIP, hostIP, conditions, qosClass). None of those pods run: they
//! are on other nodes, which weft only reads about.
//!
//! Measured, in this order (the whole case takes under three minutes; every series is bounded
//! in time):
//!
//! 1. weft on the empty cluster: sync time and steady RSS, for comparison; stopped.
//! 2. The synthetic cluster loaded into the API server; weft started again: the time from
//!    `weft node` start to ready, weft's own "listed every kind" `after=`, steady RSS (the
//!    maximum of `VmRSS` samples over 5 s, from [`SETTLE`] after ready) and the peak while
//!    syncing (`VmHWM`).
//! 3. [`CHANGES`] single-pod changes (readiness and label flips of pods on other nodes), one at
//!    a time: each waits for the new snapshot (`weft_registry_generation` on `:15020/metrics`,
//!    polled every [`POLL`] on one keep-alive connection), then [`SPACING`] more, so the 100 ms
//!    debounce never merges or delays them. weft's CPU time over the series (`/proc/PID/stat`)
//!    minus what it spends anyway ([`Idle`]: a quiet period as long as the series, and the cost
//!    of the scrapes the polling made) gives CPU per change.
//! 4. The same for AuthorizationPolicy changes (a port added to or removed from a rule).
//!
//! It is a measurement: the aims (≤ 150 MB RSS, ≤ 5 ms of CPU per pod change) are reported as
//! met or not, never failed on.
//!
//! The stand-in runs inside this process: under `cargo xtask` (an unoptimized build) it serves
//! the initial lists several times slower than it does optimized, and that dominates the sync
//! time. `cargo build --release --bins` also builds `target/release/xtask`; run the case from
//! there for the sync time (the per-change numbers are weft's own CPU and hardly move).

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use weft_tests::apiserver::ApiServer;
use weft_tests::{netns, Cluster, InNetns, Node, Weft};

use super::machine::{load_average, proc_cpu_us, proc_status_kib, Machine};

/// Nodes of the synthetic cluster (besides node-a, where weft runs and no synthetic pod is).
const NODES: usize = 100;
/// Namespaces; the even ones are enrolled (`weft.dev/mesh=enabled`).
const NAMESPACES: usize = 200;
/// Services (Deployments) per namespace: 2 000 in all.
const SERVICES_PER_NS: usize = 10;
/// Pods per Service: 10 000 in all.
const REPLICAS: usize = 5;
/// AuthorizationPolicies per namespace: 1 000 in all.
const POLICIES_PER_NS: usize = 5;
/// Services per namespace with a VirtualService and a DestinationRule: 200 of each.
const ROUTED_PER_NS: usize = 1;

/// Changes per series.
const CHANGES: usize = 200;
/// Quiet time after a change's snapshot before the next change (above the 100 ms debounce).
const SPACING: Duration = Duration::from_millis(150);
/// Interval between two reads of `weft_registry_generation` while waiting for a snapshot.
const POLL: Duration = Duration::from_millis(2);
/// A change without a new snapshot after this long is counted as missed.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(3);
/// A series stops early after this long (the case stays within about three minutes).
const SERIES_LIMIT: Duration = Duration::from_secs(45);
/// How long the scrape cost is measured.
const SCRAPE_CALIBRATION: Duration = Duration::from_secs(3);
/// Steady RSS: this many `VmRSS` samples, [`RSS_EVERY`] apart; the maximum is reported.
const RSS_SAMPLES: usize = 6;
const RSS_EVERY: Duration = Duration::from_secs(1);
/// RSS is sampled from this long after the last change: weft hands the memory a list or a
/// rebuild freed back to the system once its registry has been quiet for 2 s
/// (`RELEASE_AFTER` in proxy/src/registry/kube.rs).
const SETTLE: Duration = Duration::from_secs(3);

/// The aims at this size.
const AIM_RSS_MB: f64 = 150.0;
const AIM_POD_CHANGE_MS: f64 = 5.0;

const TEAMS: [&str; 20] = [
    "payments",
    "checkout",
    "catalog",
    "search",
    "identity",
    "orders",
    "shipping",
    "inventory",
    "pricing",
    "reviews",
    "ads",
    "media",
    "messaging",
    "analytics",
    "billing",
    "accounts",
    "support",
    "loyalty",
    "fraud",
    "platform",
];
const ENVS: [&str; 10] = [
    "prod",
    "prod-eu",
    "prod-us",
    "prod-ap",
    "staging",
    "staging-eu",
    "dev",
    "dev-2",
    "qa",
    "perf",
];
const APPS: [&str; SERVICES_PER_NS] = [
    "api", "web", "worker", "auth", "cart", "search", "billing", "notify", "gateway", "catalog",
];
const ZONES: [&str; 3] = ["eu-west-1a", "eu-west-1b", "eu-west-1c"];
/// The characters Kubernetes uses in generated name suffixes.
const NAME_CHARS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

pub(super) fn run(command: &str, machine: &Machine, output: Option<&Path>) -> Result<()> {
    let started = Instant::now();
    let mut notes = Vec::new();
    if !STAND_IN_OPTIMIZED {
        let hint = "the API server stand-in runs in this unoptimized xtask: it serves the lists \
                    several times slower, which dominates the sync time (run \
                    `target/release/xtask bench --only registry` for the sync time)";
        eprintln!("bench: registry: {hint}");
        notes.push(hint.to_string());
    }
    let cluster = Cluster::new("bench-registry")?;
    let node = cluster.add_node("node-a")?;
    let api = cluster.api_server()?;
    eprintln!(
        "bench: registry cluster {} up; logs in {}",
        cluster.id(),
        cluster.logs_dir().display()
    );

    eprintln!("bench: registry: weft on the empty cluster");
    let empty = {
        let (w, started) = start_weft(&cluster, &node)?;
        Started {
            rss: steady_rss(&w)?,
            ..started
        }
    };

    eprintln!("bench: registry: generating the synthetic cluster");
    let mut syn = Synthetic::generate();
    let load = syn.load(&api)?;
    eprintln!(
        "bench: registry: {} objects ({:.0} MB of JSON) in the API server in {:.1} s",
        load.objects,
        load.bytes as f64 / 1e6,
        load.took.as_secs_f64()
    );

    eprintln!("bench: registry: weft on the loaded cluster");
    let (w, mut loaded) = start_weft(&cluster, &node)?;
    let snapshot = SnapshotCounts::read(&w).unwrap_or_else(|e| {
        notes.push(format!("weft status: {e:#}"));
        SnapshotCounts::default()
    });
    loaded.rss = steady_rss(&w)?;

    let pid = w.pid().context("weft is not running")?;
    let mut probe = Probe::new(&node);
    eprintln!("bench: registry: {CHANGES} pod changes");
    let pods = series(&w, &mut probe, |k| syn.change_pod(&api, k))?;
    eprintln!(
        "bench: registry: quiet period ({:.0} s) and scrape cost",
        pods.took.as_secs_f64()
    );
    let idle = Idle::measure(pid, &mut probe, pods.took)?;
    eprintln!("bench: registry: {CHANGES} AuthorizationPolicy changes");
    let policies = series(&w, &mut probe, |k| syn.change_policy(&api, k))?;
    let right_after_kib = proc_status_kib(pid, "VmRSS").unwrap_or(0);
    let after = steady_rss(&w)?;

    let log = strip_ansi(&w.log());
    let rebuilds = rebuild_times(&log);
    for (what, s) in [("pod", &pods), ("AuthorizationPolicy", &policies)] {
        if s.missed > 0 {
            notes.push(format!(
                "{} of {} {what} changes gave no new snapshot within {SNAPSHOT_TIMEOUT:?}",
                s.missed, s.changes
            ));
        }
        if s.extra > 0 {
            notes.push(format!(
                "{what} changes: {} snapshots more than one per change",
                s.extra
            ));
        }
    }
    for (target, (n, example)) in warnings_by_target(&log) {
        notes.push(format!(
            "weft logged {n} warning/error lines from `{target}`, e.g. `{example}` (logs in {})",
            cluster.logs_dir().display()
        ));
    }
    let r = Report {
        command,
        machine,
        load: &load,
        snapshot: &snapshot,
        empty: &empty,
        loaded: &loaded,
        pods: &pods,
        policies: &policies,
        idle: &idle,
        right_after_kib,
        after,
        rebuilds: &rebuilds,
        notes: &notes,
        logs: cluster.logs_dir(),
        took: started.elapsed(),
    };
    let text = r.markdown();
    print!("{text}");
    if let Some(out) = output {
        std::fs::write(out, &text).with_context(|| format!("writing {}", out.display()))?;
        eprintln!("bench: report written to {}", out.display());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The synthetic cluster.
// ---------------------------------------------------------------------------------------------

/// A small deterministic generator (splitmix64): the same cluster on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// A version 4 UUID, as metadata.uid.
    fn uid(&mut self) -> String {
        let (a, b) = (self.next(), self.next());
        format!(
            "{:08x}-{:04x}-4{:03x}-{:x}{:03x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            8 + (b >> 62),
            (b >> 48) & 0xfff,
            b & 0xffff_ffff_ffff
        )
    }

    /// A generated-name suffix (`7d9f8b6c5d`, `x2k4p`).
    fn token(&mut self, n: usize) -> String {
        (0..n)
            .map(|_| NAME_CHARS[self.below(NAME_CHARS.len())] as char)
            .collect()
    }

    fn hex(&mut self, n: usize) -> String {
        (0..n)
            .map(|_| char::from_digit(self.below(16) as u32, 16).unwrap_or('0'))
            .collect()
    }
}

/// RFC 3339 time `secs` after 2026-11-02T00:00:00Z (up to four weeks later).
fn ts(secs: u64) -> String {
    let (d, s) = (secs / 86_400 % 28, secs % 86_400);
    format!(
        "2026-11-{:02}T{:02}:{:02}:{:02}Z",
        2 + d,
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

fn namespace_name(i: usize) -> String {
    format!(
        "{}-{}",
        TEAMS[i % TEAMS.len()],
        ENVS[i / TEAMS.len() % ENVS.len()]
    )
}

fn node_ip(n: usize) -> String {
    format!("10.240.0.{}", n + 10)
}

fn node_name(n: usize) -> String {
    format!("ip-10-240-0-{}.eu-west-1.compute.internal", n + 10)
}

/// The objects of the synthetic cluster, kept to derive the changes from.
struct Synthetic {
    namespaces: Vec<Value>,
    nodes: Vec<Value>,
    pods: Vec<Value>,
    services: Vec<Value>,
    slices: Vec<Value>,
    policies: Vec<Value>,
    virtual_services: Vec<Value>,
    destination_rules: Vec<Value>,
    /// ALLOW and DENY policies.
    allow: usize,
    deny: usize,
}

/// What loading the synthetic cluster into the API server took.
struct Load {
    objects: usize,
    /// ALLOW and DENY AuthorizationPolicies.
    allow: usize,
    deny: usize,
    /// Size of the objects as JSON.
    bytes: usize,
    took: Duration,
}

impl Synthetic {
    fn generate() -> Synthetic {
        let mut rng = Rng(0x5eed_0f3e);
        let nodes = (0..NODES).map(|n| node(&mut rng, n)).collect();
        let mut s = Synthetic {
            namespaces: Vec::new(),
            nodes,
            pods: Vec::new(),
            services: Vec::new(),
            slices: Vec::new(),
            policies: Vec::new(),
            virtual_services: Vec::new(),
            destination_rules: Vec::new(),
            allow: 0,
            deny: 0,
        };
        // Pods per node so far: the next pod IP in the node's pod CIDR.
        let mut on_node = [0usize; NODES];
        for i in 0..NAMESPACES {
            let ns = namespace_name(i);
            s.namespaces.push(namespace(&mut rng, i, &ns));
            for (j, app) in APPS.iter().enumerate() {
                let index = i * SERVICES_PER_NS + j;
                let app = App {
                    ns: &ns,
                    team: TEAMS[i % TEAMS.len()],
                    name: app,
                    uid: rng.uid(),
                    cluster_ip: format!("10.100.{}.{}", index / 250, index % 250 + 1),
                    created: (index as u64) * 97,
                };
                let svc = service(&app);
                let rs_hash = rng.token(10);
                let rs_uid = rng.uid();
                let mut members = Vec::new();
                for r in 0..REPLICAS {
                    // Replicas on different nodes, every node about as full as the others.
                    let n = (index * 13 + r * 20) % NODES;
                    let ip = format!("10.128.{n}.{}", on_node[n] + 2);
                    on_node[n] += 1;
                    let pod = pod(&mut rng, &app, &rs_hash, &rs_uid, r, n, &ip);
                    members.push(Member {
                        name: pod["metadata"]["name"].as_str().unwrap_or_default().into(),
                        uid: pod["metadata"]["uid"].as_str().unwrap_or_default().into(),
                        ip,
                        node: n,
                    });
                    s.pods.push(pod);
                }
                s.slices.push(endpoint_slice(&mut rng, &app, &members));
                s.services.push(svc);
                if j < ROUTED_PER_NS {
                    s.virtual_services.push(virtual_service(&mut rng, &app));
                    s.destination_rules.push(destination_rule(&mut rng, &app));
                }
            }
            for k in 0..POLICIES_PER_NS {
                let p = policy(&mut rng, i, k);
                match p["spec"]["action"].as_str() {
                    Some("DENY") => s.deny += 1,
                    _ => s.allow += 1,
                }
                s.policies.push(p);
            }
        }
        s
    }

    fn all(&self) -> impl Iterator<Item = &Value> {
        self.namespaces
            .iter()
            .chain(&self.nodes)
            .chain(&self.services)
            .chain(&self.pods)
            .chain(&self.slices)
            .chain(&self.policies)
            .chain(&self.destination_rules)
            .chain(&self.virtual_services)
    }

    /// Writes every object to the API server (namespaces first).
    fn load(&self, api: &ApiServer) -> Result<Load> {
        let t = Instant::now();
        let mut objects = 0;
        let mut bytes = 0;
        for obj in self.all() {
            bytes += serde_json::to_vec(obj)?.len();
            api.apply(obj.clone())?;
            objects += 1;
        }
        Ok(Load {
            objects,
            allow: self.allow,
            deny: self.deny,
            bytes,
            took: t.elapsed(),
        })
    }

    /// Change `k` of the pod series: a pod on another node flips its readiness (as its kubelet
    /// writes it) or a label (as a user or controller does), alternately.
    fn change_pod(&mut self, api: &ApiServer, k: usize) -> Result<()> {
        let i = (k * 53) % self.pods.len();
        flip_pod(&mut self.pods[i], k);
        api.apply(self.pods[i].clone())?;
        Ok(())
    }

    /// Change `k` of the policy series: port 8443 added to or removed from the first rule's
    /// first operation of a policy (every policy but the allow-nothing ones has one).
    fn change_policy(&mut self, api: &ApiServer, k: usize) -> Result<()> {
        let n = self.policies.len();
        let mut i = (k * 7) % n;
        while !toggle_port(&mut self.policies[i]) {
            i = (i + 1) % n;
        }
        api.apply(self.policies[i].clone())?;
        Ok(())
    }
}

/// Change `k` of a pod: even `k` flips its readiness (Ready and ContainersReady conditions, the
/// container's `ready`, as the kubelet writes them), odd `k` sets a label.
fn flip_pod(pod: &mut Value, k: usize) {
    let now = ts(27 * 86_400 + k as u64);
    if k.is_multiple_of(2) {
        let ready = pod["status"]["containerStatuses"][0]["ready"] != json!(true);
        let status = if ready { "True" } else { "False" };
        if let Some(conditions) = pod["status"]["conditions"].as_array_mut() {
            for c in conditions {
                if matches!(c["type"].as_str(), Some("Ready" | "ContainersReady")) {
                    c["status"] = json!(status);
                    c["lastTransitionTime"] = json!(now);
                }
            }
        }
        pod["status"]["containerStatuses"][0]["ready"] = json!(ready);
        pod["metadata"]["managedFields"][1]["time"] = json!(now);
    } else {
        pod["metadata"]["labels"]["rollouts.example.com/revision"] = json!(k.to_string());
    }
}

/// Adds port 8443 to the first operation of a policy's first rule, or removes it; false (and
/// unchanged) for a policy without one.
fn toggle_port(policy: &mut Value) -> bool {
    let Some(op) = policy
        .pointer_mut("/spec/rules/0/to/0/operation")
        .and_then(Value::as_object_mut)
    else {
        return false;
    };
    let mut ports: Vec<Value> = op
        .get("ports")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    match ports.iter().position(|p| p == "8443") {
        Some(at) => {
            ports.remove(at);
        }
        None => ports.push(json!("8443")),
    }
    if ports.is_empty() {
        op.remove("ports");
    } else {
        op.insert("ports".into(), Value::Array(ports));
    }
    true
}

/// One Service (a Deployment of [`REPLICAS`] pods) of the synthetic cluster.
struct App<'a> {
    ns: &'a str,
    team: &'a str,
    name: &'a str,
    uid: String,
    cluster_ip: String,
    /// Seconds after the base time it was created.
    created: u64,
}

/// A pod as its EndpointSlice names it.
struct Member {
    name: String,
    uid: String,
    ip: String,
    node: usize,
}

fn namespace(rng: &mut Rng, i: usize, name: &str) -> Value {
    let mut labels = json!({
        "kubernetes.io/metadata.name": name,
        "team": TEAMS[i % TEAMS.len()],
        "environment": ENVS[i / TEAMS.len() % ENVS.len()],
    });
    if i.is_multiple_of(2) {
        labels["weft.dev/mesh"] = json!("enabled");
    }
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": name,
            "uid": rng.uid(),
            "creationTimestamp": ts(i as u64 * 60),
            "labels": labels,
            "managedFields": [{
                "manager": "kubectl-client-side-apply",
                "operation": "Update",
                "apiVersion": "v1",
                "time": ts(i as u64 * 60),
                "fieldsType": "FieldsV1",
                "fieldsV1": {"f:metadata": {"f:labels": {".": {}, "f:environment": {}, "f:team": {}, "f:kubernetes.io/metadata.name": {}}}},
            }],
        },
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    })
}

fn node(rng: &mut Rng, n: usize) -> Value {
    let name = node_name(n);
    let zone = ZONES[n % ZONES.len()];
    let cidr = format!("10.128.{n}.0/24");
    let created = ts(n as u64 * 30);
    let images: Vec<Value> = (0..24)
        .map(|k| {
            json!({
                "names": [
                    format!("registry.example.com/base/image-{k}@sha256:{}", rng.hex(64)),
                    format!("registry.example.com/base/image-{k}:1.{k}.0"),
                ],
                "sizeBytes": 20_000_000 + rng.below(400_000_000),
            })
        })
        .collect();
    let condition = |t: &str, status: &str, reason: &str, message: &str| {
        json!({
            "type": t,
            "status": status,
            "lastHeartbeatTime": ts(27 * 86_400),
            "lastTransitionTime": created,
            "reason": reason,
            "message": message,
        })
    };
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "uid": rng.uid(),
            "creationTimestamp": created,
            "labels": {
                "beta.kubernetes.io/arch": "amd64",
                "beta.kubernetes.io/instance-type": "m6i.2xlarge",
                "beta.kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "node.kubernetes.io/instance-type": "m6i.2xlarge",
                "topology.kubernetes.io/region": "eu-west-1",
                "topology.kubernetes.io/zone": zone,
                "eks.amazonaws.com/nodegroup": format!("workers-{}", n % 4),
            },
            "annotations": {
                "alpha.kubernetes.io/provided-node-ip": node_ip(n),
                "node.alpha.kubernetes.io/ttl": "0",
                "volumes.kubernetes.io/controller-managed-attach-detach": "true",
            },
        },
        "spec": {
            "podCIDR": cidr,
            "podCIDRs": [cidr],
            "providerID": format!("aws:///{zone}/i-0{}", rng.hex(16)),
        },
        "status": {
            "capacity": {"cpu": "8", "ephemeral-storage": "104845292Ki", "hugepages-1Gi": "0", "hugepages-2Mi": "0", "memory": "32386964Ki", "pods": "110"},
            "allocatable": {"cpu": "7910m", "ephemeral-storage": "95551679124", "hugepages-1Gi": "0", "hugepages-2Mi": "0", "memory": "31369108Ki", "pods": "110"},
            "conditions": [
                condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
                condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                condition("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
                condition("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
            ],
            "addresses": [
                {"type": "InternalIP", "address": node_ip(n)},
                {"type": "InternalDNS", "address": name},
                {"type": "Hostname", "address": name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "machineID": rng.hex(32),
                "systemUUID": rng.uid(),
                "bootID": rng.uid(),
                "kernelVersion": "6.1.115-126.197.amzn2023.x86_64",
                "osImage": "Amazon Linux 2023.6.20241121",
                "containerRuntimeVersion": "containerd://1.7.23",
                "kubeletVersion": "v1.31.3-eks-59bf375",
                "kubeProxyVersion": "v1.31.3-eks-59bf375",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
            "images": images,
        },
    })
}

fn pod(
    rng: &mut Rng,
    app: &App<'_>,
    rs_hash: &str,
    rs_uid: &str,
    replica: usize,
    n: usize,
    ip: &str,
) -> Value {
    let rs = format!("{}-{rs_hash}", app.name);
    let name = format!("{rs}-{}", rng.token(5));
    let created = ts(app.created + 3600 + replica as u64);
    let started = ts(app.created + 3605 + replica as u64);
    let version = if replica == REPLICAS - 1 { "v2" } else { "v1" };
    let image = format!(
        "registry.example.com/{}/{}:1.{}.{}",
        app.team,
        app.name,
        rng.below(20),
        rng.below(10)
    );
    let token_volume = format!("kube-api-access-{}", rng.token(5));
    let condition = |t: &str| json!({"type": t, "status": "True", "lastProbeTime": null, "lastTransitionTime": started});
    let port_key = |p: u16| format!("k:{{\"containerPort\":{p},\"protocol\":\"TCP\"}}");
    let port_fields = json!({".": {}, "f:containerPort": {}, "f:name": {}, "f:protocol": {}});
    let condition_fields = json!({".": {}, "f:lastProbeTime": {}, "f:lastTransitionTime": {}, "f:status": {}, "f:type": {}});
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "generateName": format!("{rs}-"),
            "namespace": app.ns,
            "uid": rng.uid(),
            "creationTimestamp": created,
            "labels": {
                "app": app.name,
                "app.kubernetes.io/name": app.name,
                "app.kubernetes.io/part-of": app.team,
                "pod-template-hash": rs_hash,
                "version": version,
            },
            "annotations": {
                "kubectl.kubernetes.io/restartedAt": ts(app.created + 3000),
                "prometheus.io/port": "9102",
                "prometheus.io/scrape": "true",
            },
            "ownerReferences": [{
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "name": rs,
                "uid": rs_uid,
                "controller": true,
                "blockOwnerDeletion": true,
            }],
            "managedFields": [
                {
                    "manager": "kube-controller-manager",
                    "operation": "Update",
                    "apiVersion": "v1",
                    "time": created,
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {
                        "f:metadata": {
                            "f:annotations": {".": {}, "f:kubectl.kubernetes.io/restartedAt": {}, "f:prometheus.io/port": {}, "f:prometheus.io/scrape": {}},
                            "f:generateName": {},
                            "f:labels": {".": {}, "f:app": {}, "f:app.kubernetes.io/name": {}, "f:app.kubernetes.io/part-of": {}, "f:pod-template-hash": {}, "f:version": {}},
                            "f:ownerReferences": {".": {}, format!("k:{{\"uid\":\"{rs_uid}\"}}"): {}},
                        },
                        "f:spec": {
                            "f:containers": {"k:{\"name\":\"app\"}": {
                                ".": {}, "f:env": {}, "f:image": {}, "f:imagePullPolicy": {}, "f:name": {},
                                "f:ports": {".": {}, port_key(8080): port_fields, port_key(9090): port_fields, port_key(9102): port_fields},
                                "f:readinessProbe": {}, "f:livenessProbe": {}, "f:resources": {},
                                "f:terminationMessagePath": {}, "f:terminationMessagePolicy": {},
                            }},
                            "f:dnsPolicy": {}, "f:enableServiceLinks": {}, "f:restartPolicy": {},
                            "f:schedulerName": {}, "f:securityContext": {}, "f:serviceAccount": {},
                            "f:serviceAccountName": {}, "f:terminationGracePeriodSeconds": {},
                        },
                    },
                },
                {
                    "manager": "kubelet",
                    "operation": "Update",
                    "apiVersion": "v1",
                    "time": started,
                    "fieldsType": "FieldsV1",
                    "subresource": "status",
                    "fieldsV1": {
                        "f:status": {
                            "f:conditions": {
                                "k:{\"type\":\"ContainersReady\"}": condition_fields,
                                "k:{\"type\":\"Initialized\"}": condition_fields,
                                "k:{\"type\":\"PodReadyToStartContainers\"}": condition_fields,
                                "k:{\"type\":\"Ready\"}": condition_fields,
                            },
                            "f:containerStatuses": {}, "f:hostIP": {}, "f:hostIPs": {}, "f:phase": {},
                            "f:podIP": {}, "f:podIPs": {".": {}, format!("k:{{\"ip\":\"{ip}\"}}"): {".": {}, "f:ip": {}}},
                            "f:startTime": {},
                        },
                    },
                },
            ],
        },
        "spec": {
            "containers": [{
                "name": "app",
                "image": image,
                "imagePullPolicy": "IfNotPresent",
                "ports": [
                    {"name": "http", "containerPort": 8080, "protocol": "TCP"},
                    {"name": "grpc", "containerPort": 9090, "protocol": "TCP"},
                    {"name": "metrics", "containerPort": 9102, "protocol": "TCP"},
                ],
                "env": [
                    {"name": "SERVICE_NAME", "value": app.name},
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}},
                    {"name": "POD_IP", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "status.podIP"}}},
                ],
                "resources": {"limits": {"memory": "512Mi"}, "requests": {"cpu": "100m", "memory": "256Mi"}},
                "readinessProbe": {
                    "httpGet": {"path": "/ready", "port": 8080, "scheme": "HTTP"},
                    "initialDelaySeconds": 2, "periodSeconds": 5, "timeoutSeconds": 1,
                    "successThreshold": 1, "failureThreshold": 3,
                },
                "livenessProbe": {
                    "httpGet": {"path": "/healthz", "port": 8080, "scheme": "HTTP"},
                    "periodSeconds": 10, "timeoutSeconds": 1, "successThreshold": 1,
                    "failureThreshold": 3,
                },
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
                "volumeMounts": [{
                    "name": token_volume,
                    "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                    "readOnly": true,
                }],
            }],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": app.name,
            "serviceAccount": app.name,
            "nodeName": node_name(n),
            "securityContext": {},
            "schedulerName": "default-scheduler",
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
            ],
            "priority": 0,
            "enableServiceLinks": true,
            "preemptionPolicy": "PreemptLowerPriority",
            "volumes": [{
                "name": token_volume,
                "projected": {
                    "defaultMode": 420,
                    "sources": [
                        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                        {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
                    ],
                },
            }],
        },
        "status": {
            "phase": "Running",
            "conditions": [
                condition("PodReadyToStartContainers"),
                condition("Initialized"),
                condition("Ready"),
                condition("ContainersReady"),
                condition("PodScheduled"),
            ],
            "hostIP": node_ip(n),
            "hostIPs": [{"ip": node_ip(n)}],
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "startTime": created,
            "containerStatuses": [{
                "name": "app",
                "state": {"running": {"startedAt": started}},
                "lastState": {},
                "ready": true,
                "restartCount": 0,
                "image": image,
                "imageID": format!("registry.example.com/{}/{}@sha256:{}", app.team, app.name, rng.hex(64)),
                "containerID": format!("containerd://{}", rng.hex(64)),
                "started": true,
            }],
            "qosClass": "Burstable",
        },
    })
}

fn app_labels(app: &App<'_>) -> Value {
    json!({
        "app": app.name,
        "app.kubernetes.io/name": app.name,
        "app.kubernetes.io/part-of": app.team,
        "app.kubernetes.io/managed-by": "Helm",
        "helm.sh/chart": format!("{}-1.4.2", app.name),
    })
}

fn service(app: &App<'_>) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": app.name,
            "namespace": app.ns,
            "uid": app.uid,
            "creationTimestamp": ts(app.created),
            "labels": app_labels(app),
            "annotations": {
                "meta.helm.sh/release-name": app.name,
                "meta.helm.sh/release-namespace": app.ns,
            },
            "managedFields": [{
                "manager": "helm",
                "operation": "Update",
                "apiVersion": "v1",
                "time": ts(app.created),
                "fieldsType": "FieldsV1",
                "fieldsV1": {
                    "f:metadata": {"f:annotations": {}, "f:labels": {}},
                    "f:spec": {"f:internalTrafficPolicy": {}, "f:ports": {}, "f:selector": {}, "f:sessionAffinity": {}, "f:type": {}},
                },
            }],
        },
        "spec": {
            "type": "ClusterIP",
            "clusterIP": app.cluster_ip,
            "clusterIPs": [app.cluster_ip],
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "internalTrafficPolicy": "Cluster",
            "sessionAffinity": "None",
            "selector": {"app": app.name},
            "ports": [
                {"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http", "appProtocol": "http"},
                {"name": "grpc", "port": 9090, "protocol": "TCP", "targetPort": "grpc", "appProtocol": "grpc"},
                {"name": "metrics", "port": 9102, "protocol": "TCP", "targetPort": 9102},
            ],
        },
        "status": {"loadBalancer": {}},
    })
}

/// The EndpointSlice the endpointslice controller keeps for a Service.
fn endpoint_slice(rng: &mut Rng, app: &App<'_>, members: &[Member]) -> Value {
    let mut labels = app_labels(app);
    labels["endpointslice.kubernetes.io/managed-by"] = json!("endpointslice-controller.k8s.io");
    labels["kubernetes.io/service-name"] = json!(app.name);
    let endpoints: Vec<Value> = members
        .iter()
        .map(|m| {
            json!({
                "addresses": [m.ip],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": node_name(m.node),
                "targetRef": {"kind": "Pod", "namespace": app.ns, "name": m.name, "uid": m.uid},
                "zone": ZONES[m.node % ZONES.len()],
            })
        })
        .collect();
    let changed = ts(app.created + 3610);
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{}-{}", app.name, rng.token(5)),
            "generateName": format!("{}-", app.name),
            "namespace": app.ns,
            "uid": rng.uid(),
            "creationTimestamp": ts(app.created),
            "generation": 1,
            "labels": labels,
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": changed},
            "ownerReferences": [{
                "apiVersion": "v1",
                "kind": "Service",
                "name": app.name,
                "uid": app.uid,
                "controller": true,
                "blockOwnerDeletion": true,
            }],
            "managedFields": [{
                "manager": "kube-controller-manager",
                "operation": "Update",
                "apiVersion": "discovery.k8s.io/v1",
                "time": changed,
                "fieldsType": "FieldsV1",
                "fieldsV1": {
                    "f:addressType": {}, "f:endpoints": {}, "f:ports": {},
                    "f:metadata": {"f:annotations": {}, "f:generateName": {}, "f:labels": {}, "f:ownerReferences": {}},
                },
            }],
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [
            {"name": "http", "protocol": "TCP", "port": 8080, "appProtocol": "http"},
            {"name": "grpc", "protocol": "TCP", "port": 9090, "appProtocol": "grpc"},
            {"name": "metrics", "protocol": "TCP", "port": 9102},
        ],
    })
}

/// Metadata of a custom resource applied with `kubectl apply` (GitOps), with its
/// last-applied-configuration annotation.
fn applied_metadata(
    rng: &mut Rng,
    api_version: &str,
    kind: &str,
    ns: &str,
    name: &str,
    spec: &Value,
) -> Value {
    let last = json!({
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {"annotations": {}, "name": name, "namespace": ns},
        "spec": spec,
    });
    json!({
        "name": name,
        "namespace": ns,
        "uid": rng.uid(),
        "creationTimestamp": ts(rng.below(20 * 86_400) as u64),
        "labels": {"app.kubernetes.io/managed-by": "argocd"},
        "annotations": {"kubectl.kubernetes.io/last-applied-configuration": format!("{last}\n")},
    })
}

fn custom(
    rng: &mut Rng,
    api_version: &str,
    kind: &str,
    ns: &str,
    name: &str,
    spec: Value,
) -> Value {
    let metadata = applied_metadata(rng, api_version, kind, ns, name, &spec);
    json!({"apiVersion": api_version, "kind": kind, "metadata": metadata, "spec": spec})
}

/// Policy `k` of namespace `i`: a mix of the usual shapes (ALLOW by principal with methods,
/// paths and ports; ALLOW by namespace; a namespace-wide DENY of admin paths and of the metrics
/// port from other namespaces; ALLOW of a gRPC service; DENY of writes from other identities, or
/// allow-nothing in one namespace of ten).
fn policy(rng: &mut Rng, i: usize, k: usize) -> Value {
    let ns = namespace_name(i);
    let peer = namespace_name((i + 1 + rng.below(NAMESPACES - 1)) % NAMESPACES);
    let app = APPS[(k * 2 + i) % APPS.len()];
    let principal = |ns: &str, sa: &str| format!("cluster.local/ns/{ns}/sa/{sa}");
    let (name, spec) = match k {
        0 => (
            format!("allow-{app}-from-callers"),
            json!({
                "selector": {"matchLabels": {"app": app}},
                "action": "ALLOW",
                "rules": [{
                    "from": [{"source": {"principals": [principal(&ns, "gateway"), principal(&ns, "web"), principal(&peer, "api")]}}],
                    "to": [{"operation": {"methods": ["GET", "POST"], "paths": ["/api/v1/*", "/api/v2/*"], "ports": ["8080"]}}],
                }],
            }),
        ),
        1 => (
            format!("allow-{app}-same-team"),
            json!({
                "selector": {"matchLabels": {"app": app}},
                "action": "ALLOW",
                "rules": [{
                    "from": [{"source": {"namespaces": [ns, peer]}}],
                    "to": [{"operation": {"ports": ["8080", "9090"]}}],
                }],
            }),
        ),
        2 => (
            "deny-admin-and-foreign-metrics".to_string(),
            json!({
                "action": "DENY",
                "rules": [
                    {"to": [{"operation": {"paths": ["/admin/*", "/debug/*", "/internal/*"]}}]},
                    {
                        "from": [{"source": {"notNamespaces": [ns, "monitoring"]}}],
                        "to": [{"operation": {"ports": ["9102"]}}],
                    },
                ],
            }),
        ),
        3 => (
            format!("allow-{app}-grpc"),
            json!({
                "selector": {"matchLabels": {"app": app}},
                "action": "ALLOW",
                "rules": [{
                    "from": [{"source": {"principals": [principal(&peer, "worker"), format!("cluster.local/ns/{ns}/sa/*")]}}],
                    "to": [{"operation": {"ports": ["9090"], "paths": [format!("/{}.v1.{}/*", TEAMS[i % TEAMS.len()], app)]}}],
                    "when": [{"key": "request.headers[x-tenant]", "values": ["acme", "globex"]}],
                }],
            }),
        ),
        _ if i.is_multiple_of(10) => (
            "allow-nothing".to_string(),
            json!({"selector": {"matchLabels": {"app": app}}}),
        ),
        _ => (
            format!("deny-{app}-foreign-writes"),
            json!({
                "selector": {"matchLabels": {"app": app}},
                "action": "DENY",
                "rules": [{
                    "from": [{"source": {"notPrincipals": [format!("cluster.local/ns/{ns}/sa/*")]}}],
                    "to": [{"operation": {"methods": ["PUT", "PATCH", "DELETE"]}}],
                }],
            }),
        ),
    };
    custom(
        rng,
        "security.istio.io/v1",
        "AuthorizationPolicy",
        &ns,
        &name,
        spec,
    )
}

fn virtual_service(rng: &mut Rng, app: &App<'_>) -> Value {
    let spec = json!({
        "hosts": [app.name],
        "http": [
            {
                "name": "canary-header",
                "match": [{"headers": {"x-canary": {"exact": "true"}}}],
                "route": [{"destination": {"host": app.name, "subset": "v2", "port": {"number": 80}}}],
            },
            {
                "name": "default",
                "route": [
                    {"destination": {"host": app.name, "subset": "v1", "port": {"number": 80}}, "weight": 90},
                    {"destination": {"host": app.name, "subset": "v2", "port": {"number": 80}}, "weight": 10},
                ],
                "timeout": "5s",
                "retries": {"attempts": 3, "perTryTimeout": "2s", "retryOn": "5xx,connect-failure,reset"},
            },
        ],
    });
    custom(
        rng,
        "networking.istio.io/v1",
        "VirtualService",
        app.ns,
        app.name,
        spec,
    )
}

fn destination_rule(rng: &mut Rng, app: &App<'_>) -> Value {
    let spec = json!({
        "host": app.name,
        "trafficPolicy": {
            "loadBalancer": {"simple": "LEAST_REQUEST"},
            "connectionPool": {
                "tcp": {"maxConnections": 1000, "connectTimeout": "2s"},
                "http": {"http1MaxPendingRequests": 1000, "http2MaxRequests": 1000, "maxRetries": 3},
            },
            "outlierDetection": {"consecutive5xxErrors": 5, "interval": "10s", "baseEjectionTime": "30s", "maxEjectionPercent": 50},
        },
        "subsets": [
            {"name": "v1", "labels": {"version": "v1"}},
            {"name": "v2", "labels": {"version": "v2"}},
        ],
    });
    custom(
        rng,
        "networking.istio.io/v1",
        "DestinationRule",
        app.ns,
        app.name,
        spec,
    )
}

// ---------------------------------------------------------------------------------------------
// Measuring weft.
// ---------------------------------------------------------------------------------------------

/// weft after a start: time to ready, its own sync time, memory.
#[derive(Default)]
struct Started {
    /// `weft node` start → `/healthz/ready` answers 200 (polled every 50 ms by the harness).
    ready: Option<Duration>,
    /// The `after=` of weft's "registry: listed every kind from the Kubernetes API".
    listed: Option<Duration>,
    /// weft's CPU time from its start to ready, µs.
    weft_cpu_us: Option<u64>,
    /// The API server stand-in's CPU time (its threads in this process) over the same time, µs.
    api_cpu_us: u64,
    /// Steady RSS (max of the samples) and the peak so far (`VmHWM`), KiB.
    rss: Rss,
}

#[derive(Default, Clone, Copy)]
struct Rss {
    /// The largest sample.
    steady_kib: u64,
    /// The smallest sample.
    low_kib: u64,
    peak_kib: u64,
}

/// Starts `weft node --registry kube` on `node` and waits until it is ready.
fn start_weft(cluster: &Cluster, node: &Node) -> Result<(Weft, Started)> {
    let api0 = threads_cpu_us(API_SERVER_THREADS);
    let t = Instant::now();
    let w = Weft::start_kube(cluster, node, &[])?;
    let ready = t.elapsed();
    let weft_cpu_us = w.pid().and_then(proc_cpu_us);
    let api_cpu_us = threads_cpu_us(API_SERVER_THREADS).saturating_sub(api0);
    let log = strip_ansi(&w.log());
    let started = Started {
        ready: Some(ready),
        listed: log
            .lines()
            .find(|l| l.contains("registry: listed every kind"))
            .and_then(|l| field(l, "after"))
            .and_then(parse_duration),
        weft_cpu_us,
        api_cpu_us,
        rss: Rss::default(),
    };
    Ok((w, started))
}

/// Whether this process (and so the API server stand-in it runs) is an optimized build:
/// `target/release/xtask`, not `cargo xtask` (whose unoptimized stand-in takes several times
/// longer to serve the lists, which then dominates the sync time).
const STAND_IN_OPTIMIZED: bool = !cfg!(debug_assertions);

/// The name of the API server stand-in's runtime threads (`weft_tests::apiserver`).
const API_SERVER_THREADS: &str = "weft-apiserver";

/// CPU time (user + system) of this process's threads named `name`, µs.
fn threads_cpu_us(name: &str) -> u64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    let mut ticks = 0;
    for t in tasks.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        ticks += stat_cpu_ticks(&stat).unwrap_or(0);
    }
    ticks * 1_000_000 / hz
}

/// utime + stime of a `/proc/…/stat` line (fields 14 and 15; the name in parentheses may hold
/// spaces).
fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// The maximum `VmRSS` of [`RSS_SAMPLES`] samples from [`SETTLE`] on, and `VmHWM` at the end.
fn steady_rss(w: &Weft) -> Result<Rss> {
    let pid = w.pid().context("weft is not running")?;
    std::thread::sleep(SETTLE);
    let (mut steady_kib, mut low_kib) = (0, u64::MAX);
    for i in 0..RSS_SAMPLES {
        if i > 0 {
            std::thread::sleep(RSS_EVERY);
        }
        let kib = proc_status_kib(pid, "VmRSS").context("reading weft's VmRSS")?;
        steady_kib = steady_kib.max(kib);
        low_kib = low_kib.min(kib);
    }
    Ok(Rss {
        steady_kib,
        low_kib,
        peak_kib: proc_status_kib(pid, "VmHWM").unwrap_or(0),
    })
}

/// What `weft status` says the snapshot holds.
#[derive(Default)]
struct SnapshotCounts {
    pods: u64,
    services: u64,
    not_applied: Vec<String>,
    warnings: Vec<String>,
    /// (kind, objects) of each watch.
    watches: Vec<(String, u64)>,
}

impl SnapshotCounts {
    fn read(w: &Weft) -> Result<SnapshotCounts> {
        let s = w.status()?;
        let r = &s["registry"];
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .into_iter()
                .flatten()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        };
        Ok(SnapshotCounts {
            pods: r["pods"].as_u64().unwrap_or(0),
            services: r["services"].as_u64().unwrap_or(0),
            not_applied: strings(&r["not_applied"]),
            warnings: strings(&r["warnings"]),
            watches: r["watches"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|w| {
                    (
                        w["kind"].as_str().unwrap_or("?").to_string(),
                        w["objects"].as_u64().unwrap_or(0),
                    )
                })
                .collect(),
        })
    }
}

/// Reads `weft_registry_generation` from weft's `/metrics` on one keep-alive connection, made
/// inside the node's network namespace.
struct Probe {
    netns: String,
    addr: SocketAddr,
    conn: Option<BufReader<TcpStream>>,
}

impl Probe {
    fn new(node: &Node) -> Probe {
        Probe {
            netns: node.netns_name().to_string(),
            addr: SocketAddr::from((node.ip(), 15020)),
            conn: None,
        }
    }

    fn connect(&self) -> Result<BufReader<TcpStream>> {
        let addr = self.addr;
        let s = netns::in_netns(&self.netns, move || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        })?
        .with_context(|| format!("connecting to weft's metrics at {addr}"))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(BufReader::new(s))
    }

    /// One scrape: `weft_registry_generation`.
    fn generation(&mut self) -> Result<u64> {
        let mut last = None;
        for _ in 0..2 {
            let conn = match self.conn.take() {
                Some(c) => c,
                None => self.connect()?,
            };
            let mut conn = conn;
            match get_metrics(&mut conn) {
                Ok(body) => {
                    self.conn = Some(conn);
                    return generation_of(&body).context("no weft_registry_generation in /metrics");
                }
                // The server may close an idle keep-alive connection: connect again once.
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("metrics")))
    }
}

/// `GET /metrics` on a keep-alive connection: the body (Content-Length or chunked).
fn get_metrics(c: &mut BufReader<TcpStream>) -> Result<String> {
    c.get_mut()
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: weft\r\n\r\n")?;
    let mut line = String::new();
    if c.read_line(&mut line)? == 0 {
        bail!("connection closed");
    }
    if !line.starts_with("HTTP/1.1 200") {
        bail!("metrics: {}", line.trim());
    }
    let (mut length, mut chunked) = (None, false);
    loop {
        line.clear();
        if c.read_line(&mut line)? == 0 {
            bail!("connection closed in the headers");
        }
        let h = line.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "content-length" {
                length = v.parse::<usize>().ok();
            } else if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                chunked = true;
            }
        }
    }
    let mut body = Vec::new();
    if let Some(n) = length {
        body.resize(n, 0);
        c.read_exact(&mut body)?;
    } else if chunked {
        loop {
            line.clear();
            c.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .context("chunk size")?;
            let mut chunk = vec![0; size + 2];
            c.read_exact(&mut chunk)?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    } else {
        bail!("metrics: neither Content-Length nor chunked");
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

fn generation_of(metrics: &str) -> Option<u64> {
    metrics.lines().find_map(|l| {
        let v = l.strip_prefix("weft_registry_generation ")?;
        v.trim().parse::<f64>().ok().map(|g| g as u64)
    })
}

/// One series of changes.
#[derive(Default)]
struct Series {
    /// Changes made.
    changes: usize,
    /// Change → the new generation seen, for every change that gave one.
    latencies: Vec<Duration>,
    /// Changes without a new snapshot within [`SNAPSHOT_TIMEOUT`].
    missed: usize,
    /// Generations beyond one per change.
    extra: u64,
    /// Generations before the first and after the last change.
    generations: (u64, u64),
    took: Duration,
    /// weft's CPU time over the series, µs.
    cpu_us: u64,
    /// `/metrics` reads made while waiting for snapshots.
    scrapes: u64,
}

/// Makes [`CHANGES`] changes one at a time (within [`SERIES_LIMIT`]), each followed by its
/// snapshot and [`SPACING`].
fn series(
    w: &Weft,
    probe: &mut Probe,
    mut change: impl FnMut(usize) -> Result<()>,
) -> Result<Series> {
    let pid = w.pid().context("weft is not running")?;
    let mut s = Series::default();
    let mut generation = probe.generation()?;
    s.generations.0 = generation;
    std::thread::sleep(SPACING);
    let started = Instant::now();
    let cpu0 = proc_cpu_us(pid).context("reading weft's CPU time")?;
    for k in 0..CHANGES {
        if started.elapsed() > SERIES_LIMIT {
            break;
        }
        let t = Instant::now();
        change(k)?;
        s.changes += 1;
        loop {
            let g = probe.generation()?;
            s.scrapes += 1;
            if g > generation {
                s.latencies.push(t.elapsed());
                s.extra += g - generation - 1;
                generation = g;
                break;
            }
            if t.elapsed() > SNAPSHOT_TIMEOUT {
                s.missed += 1;
                break;
            }
            std::thread::sleep(POLL);
        }
        std::thread::sleep(SPACING);
    }
    s.cpu_us = proc_cpu_us(pid)
        .context("reading weft's CPU time")?
        .saturating_sub(cpu0);
    s.took = started.elapsed();
    s.generations.1 = probe.generation()?;
    Ok(s)
}

/// What weft spends without changes: its CPU rate when quiet, and one `/metrics` scrape.
struct Idle {
    quiet: Duration,
    quiet_cpu_us: u64,
    scrapes: u64,
    scrape_cpu_us: u64,
    scrape_took: Duration,
}

impl Idle {
    fn measure(pid: u32, probe: &mut Probe, quiet: Duration) -> Result<Idle> {
        let cpu = || proc_cpu_us(pid).context("reading weft's CPU time");
        let c0 = cpu()?;
        let t = Instant::now();
        std::thread::sleep(quiet);
        let quiet = t.elapsed();
        let quiet_cpu_us = cpu()? - c0;
        let c1 = cpu()?;
        let t = Instant::now();
        let mut scrapes = 0;
        while t.elapsed() < SCRAPE_CALIBRATION {
            probe.generation()?;
            scrapes += 1;
            std::thread::sleep(POLL);
        }
        Ok(Idle {
            quiet,
            quiet_cpu_us,
            scrapes,
            scrape_cpu_us: cpu()? - c1,
            scrape_took: t.elapsed(),
        })
    }

    /// CPU µs per second when quiet.
    fn rate(&self) -> f64 {
        self.quiet_cpu_us as f64 / self.quiet.as_secs_f64()
    }

    /// CPU µs of one scrape (beyond the quiet rate).
    fn per_scrape(&self) -> f64 {
        let beyond = self.scrape_cpu_us as f64 - self.rate() * self.scrape_took.as_secs_f64();
        (beyond / self.scrapes.max(1) as f64).max(0.0)
    }

    /// CPU ms per change of a series, the quiet rate and the scrapes taken out.
    fn per_change_ms(&self, s: &Series) -> Option<f64> {
        let n = s.latencies.len();
        if n == 0 {
            return None;
        }
        let base = self.rate() * s.took.as_secs_f64() + self.per_scrape() * s.scrapes as f64;
        Some((s.cpu_us as f64 - base).max(0.0) / n as f64 / 1000.0)
    }
}

/// weft's snapshot rebuild times by generation (its debug line "registry: snapshot rebuilt
/// generation=N took=D", logged with `WEFT_LOG` including `weft::registry::kube=debug`).
fn rebuild_times(log: &str) -> Vec<(u64, Duration)> {
    log.lines()
        .filter(|l| l.contains("registry: snapshot rebuilt"))
        .filter_map(|l| {
            let g = field(l, "generation")?.parse().ok()?;
            Some((g, parse_duration(field(l, "took")?)?))
        })
        .collect()
}

/// The rebuilds of a series' generations.
fn rebuilds_in(all: &[(u64, Duration)], s: &Series) -> Vec<Duration> {
    all.iter()
        .filter(|(g, _)| *g > s.generations.0 && *g <= s.generations.1)
        .map(|(_, d)| *d)
        .collect()
}

/// The value of `name=value` in a log line.
fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let at = line.find(&format!(" {name}="))? + name.len() + 2;
    line[at..].split_whitespace().next()
}

/// A `Debug` duration (`1.5s`, `12.3ms`, `45µs`, `800ns`).
fn parse_duration(s: &str) -> Option<Duration> {
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (n, unit) = s.split_at(split);
    let n: f64 = n.parse().ok()?;
    let secs = match unit {
        "s" => n,
        "ms" => n / 1e3,
        "µs" | "us" => n / 1e6,
        "ns" => n / 1e9,
        _ => return None,
    };
    Some(Duration::from_secs_f64(secs))
}

/// Warning and error lines of a log by target (`weft::policy`): how many, and the first one's
/// message (shortened).
fn warnings_by_target(log: &str) -> std::collections::BTreeMap<String, (usize, String)> {
    let mut out = std::collections::BTreeMap::new();
    for line in log.lines() {
        let Some(rest) = line
            .split_once(" WARN ")
            .or_else(|| line.split_once(" ERROR "))
            .map(|(_, r)| r.trim_start())
        else {
            continue;
        };
        let (target, message) = rest.split_once(": ").unwrap_or(("?", rest));
        let entry = out
            .entry(target.to_string())
            .or_insert_with(|| (0, message.chars().take(160).collect()));
        entry.0 += 1;
    }
    out
}

/// A log line without its terminal colours.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The `p`th percentile (nearest rank) of `v`.
fn percentile(v: &[Duration], p: f64) -> Option<Duration> {
    if v.is_empty() {
        return None;
    }
    let mut v = v.to_vec();
    v.sort();
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

// ---------------------------------------------------------------------------------------------
// The report.
// ---------------------------------------------------------------------------------------------

struct Report<'a> {
    command: &'a str,
    machine: &'a Machine,
    load: &'a Load,
    snapshot: &'a SnapshotCounts,
    empty: &'a Started,
    loaded: &'a Started,
    pods: &'a Series,
    policies: &'a Series,
    idle: &'a Idle,
    /// `VmRSS` as the last change of both series was applied.
    right_after_kib: u64,
    /// Steady RSS and peak RSS after both series.
    after: Rss,
    rebuilds: &'a [(u64, Duration)],
    notes: &'a [String],
    logs: &'a Path,
    took: Duration,
}

fn ms(d: Option<Duration>) -> String {
    match d {
        Some(d) if d >= Duration::from_secs(10) => format!("{:.1} s", d.as_secs_f64()),
        Some(d) if d >= Duration::from_secs(1) => format!("{:.2} s", d.as_secs_f64()),
        Some(d) => format!("{:.1} ms", d.as_secs_f64() * 1e3),
        None => "n/a".into(),
    }
}

fn mb(kib: u64) -> String {
    format!("{:.1} MB", kib as f64 * 1024.0 / 1e6)
}

fn met(ok: bool) -> &'static str {
    if ok {
        "**yes**"
    } else {
        "**no**"
    }
}

impl Report<'_> {
    fn markdown(&self) -> String {
        let mut s = String::new();
        let m = self.machine;
        let _ = writeln!(s, "## weft registry at scale\n");
        let _ = writeln!(s, "- command: `{}`", self.command);
        let _ = writeln!(s, "- date: {}", m.date);
        let _ = writeln!(
            s,
            "- machine: {} cores ({}), {} RAM, kernel {}",
            m.cores, m.cpu, m.mem, m.kernel
        );
        let _ = writeln!(
            s,
            "- load average before / after: {} / {}",
            m.load_before,
            load_average()
        );
        let _ = writeln!(
            s,
            "- weft {}; `WEFT_LOG={}`",
            m.commit,
            std::env::var("WEFT_LOG").unwrap_or_default()
        );
        let _ = writeln!(
            s,
            "- synthetic cluster (in the API server only): {NODES} Nodes, {NAMESPACES} Namespaces \
             ({} enrolled), {} Pods on the {NODES} nodes, {} Services, {} EndpointSlices, {} \
             AuthorizationPolicies ({} ALLOW, {} DENY), {} VirtualServices, {} \
             DestinationRules: {} objects, {:.0} MB of JSON, written in {:.1} s",
            NAMESPACES.div_ceil(2),
            NAMESPACES * SERVICES_PER_NS * REPLICAS,
            NAMESPACES * SERVICES_PER_NS,
            NAMESPACES * SERVICES_PER_NS,
            NAMESPACES * POLICIES_PER_NS,
            self.load.allow,
            self.load.deny,
            NAMESPACES * ROUTED_PER_NS,
            NAMESPACES * ROUTED_PER_NS,
            self.load.objects,
            self.load.bytes as f64 / 1e6,
            self.load.took.as_secs_f64()
        );
        let snap = self.snapshot;
        let watches: Vec<String> = snap
            .watches
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        let _ = writeln!(
            s,
            "- weft's snapshot after the sync: {} pods, {} services, {} not applied, {} \
             warnings; watched objects: {}",
            snap.pods,
            snap.services,
            snap.not_applied.len(),
            snap.warnings.len(),
            watches.join(", ")
        );
        let _ = writeln!(
            s,
            "- whole case {:.0} s; logs: `{}`",
            self.took.as_secs_f64(),
            self.logs.display()
        );

        let (e, l) = (self.empty, self.loaded);
        let rss_ok = l.rss.steady_kib as f64 * 1024.0 / 1e6 <= AIM_RSS_MB;
        let _ = writeln!(
            s,
            "\n| weft node | empty cluster | loaded cluster | aim | met? |"
        );
        let _ = writeln!(s, "|---|---:|---:|---|---|");
        let _ = writeln!(
            s,
            "| initial sync: `weft node` start → ready | {} | {} | | |",
            ms(e.ready),
            ms(l.ready)
        );
        let _ = writeln!(
            s,
            "| weft's own \"listed every kind … after=\" | {} | {} | | |",
            ms(e.listed),
            ms(l.listed)
        );
        let _ = writeln!(
            s,
            "| steady RSS after the sync (max of {RSS_SAMPLES} samples over {} s, from {} s after ready) | {} | {} | ≤ {AIM_RSS_MB:.0} MB | {} |",
            (RSS_SAMPLES - 1) as u64 * RSS_EVERY.as_secs(),
            SETTLE.as_secs(),
            mb(e.rss.steady_kib),
            mb(l.rss.steady_kib),
            met(rss_ok)
        );
        let _ = writeln!(
            s,
            "| the smallest of those samples | {} | {} | | |",
            mb(e.rss.low_kib),
            mb(l.rss.low_kib)
        );
        let _ = writeln!(
            s,
            "| peak RSS since start (VmHWM) | {} | {} | | |",
            mb(e.rss.peak_kib),
            mb(l.rss.peak_kib)
        );
        let _ = writeln!(
            s,
            "| RSS as the last of the {} changes below applied | | {} | | |",
            self.pods.changes + self.policies.changes,
            mb(self.right_after_kib),
        );
        let _ = writeln!(
            s,
            "| steady RSS after those changes (same sampling) / peak (VmHWM) | | {} / {} | ≤ {AIM_RSS_MB:.0} MB | {} |",
            mb(self.after.steady_kib),
            mb(self.after.peak_kib),
            met(self.after.steady_kib as f64 * 1024.0 / 1e6 <= AIM_RSS_MB)
        );
        let cpu = |us: Option<u64>| ms(us.map(Duration::from_micros));
        let _ = writeln!(
            s,
            "| weft's CPU time from start to ready | {} | {} | | |",
            cpu(e.weft_cpu_us),
            cpu(l.weft_cpu_us)
        );
        let _ = writeln!(
            s,
            "| the API server stand-in's CPU time meanwhile (threads of xtask, {} build) | {} | {} | | |",
            if STAND_IN_OPTIMIZED {
                "optimized"
            } else {
                "unoptimized"
            },
            cpu(Some(e.api_cpu_us)),
            cpu(Some(l.api_cpu_us))
        );

        let _ = writeln!(
            s,
            "\n| one change (loaded cluster) | changes | weft CPU per change | change → new snapshot p50 | p99 | snapshot rebuild p50 (weft's log) | aim | met? |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---|---|");
        for (what, series, aim) in [
            (
                "pod: readiness or label flip, on another node",
                self.pods,
                Some(AIM_POD_CHANGE_MS),
            ),
            (
                "AuthorizationPolicy: a port added to or removed from a rule",
                self.policies,
                None,
            ),
        ] {
            let cpu = self.idle.per_change_ms(series);
            let rebuilds = rebuilds_in(self.rebuilds, series);
            let (aim_s, met_s) = match (aim, cpu) {
                (Some(a), Some(c)) => (format!("≤ {a:.0} ms CPU"), met(c <= a).to_string()),
                (Some(a), None) => (format!("≤ {a:.0} ms CPU"), "n/a".into()),
                _ => (String::new(), String::new()),
            };
            let _ = writeln!(
                s,
                "| {what} | {} | {} | {} | {} | {} | {aim_s} | {met_s} |",
                series.latencies.len(),
                cpu.map_or("n/a".into(), |c| format!("{c:.2} ms")),
                ms(percentile(&series.latencies, 50.0)),
                ms(percentile(&series.latencies, 99.0)),
                ms(percentile(&rebuilds, 50.0)),
            );
        }
        let i = self.idle;
        let _ = writeln!(
            s,
            "\nCPU per change = (weft's utime + stime over the series − the quiet rate × the \
             series' length − one scrape's CPU × the scrapes) / changes. Quiet: {:.2} ms of CPU \
             per second over {:.0} s; one `/metrics` scrape: {:.0} µs ({} scrapes over {:.0} s); \
             the pod series: {:.0} s, {} ms of CPU, {} scrapes; the policy series: {:.0} s, {} ms \
             of CPU, {} scrapes. Changes {} ms apart after each snapshot; the generation polled \
             every {} ms.",
            i.rate() / 1000.0,
            i.quiet.as_secs_f64(),
            i.per_scrape(),
            i.scrapes,
            i.scrape_took.as_secs_f64(),
            self.pods.took.as_secs_f64(),
            self.pods.cpu_us / 1000,
            self.pods.scrapes,
            self.policies.took.as_secs_f64(),
            self.policies.cpu_us / 1000,
            self.policies.scrapes,
            SPACING.as_millis(),
            POLL.as_millis(),
        );
        let mut notes: Vec<String> = self.notes.to_vec();
        for line in snap.not_applied.iter().chain(&snap.warnings).take(5) {
            notes.push(format!("weft: {line}"));
        }
        if !notes.is_empty() {
            let _ = writeln!(s, "\nNotes:\n");
            for n in notes {
                let _ = writeln!(s, "- {n}");
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_as_tracing_prints_them() {
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(
            parse_duration("12.5ms"),
            Some(Duration::from_micros(12_500))
        );
        assert_eq!(parse_duration("45µs"), Some(Duration::from_micros(45)));
        assert_eq!(parse_duration("800ns"), Some(Duration::from_nanos(800)));
        assert_eq!(parse_duration("fast"), None);
    }

    #[test]
    fn fields_of_a_log_line() {
        let line = strip_ansi(
            "2026-12-03T07:08:42.123456Z \u{1b}[32m INFO\u{1b}[0m weft::registry::kube: registry: \
             listed every kind from the Kubernetes API \u{1b}[3mpods\u{1b}[0m\u{1b}[2m=\u{1b}[0m10000 \
             \u{1b}[3mafter\u{1b}[0m\u{1b}[2m=\u{1b}[0m2.5s",
        );
        assert_eq!(field(&line, "pods"), Some("10000"));
        assert_eq!(
            field(&line, "after").and_then(parse_duration),
            Some(Duration::from_millis(2500))
        );
        let rebuilt = "2026-12-03T07:08:42Z DEBUG weft::registry::kube: registry: snapshot rebuilt generation=7 took=3.25ms";
        assert_eq!(
            rebuild_times(rebuilt),
            vec![(7, Duration::from_micros(3250))]
        );
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 50.0), Some(Duration::from_millis(50)));
        assert_eq!(percentile(&v, 99.0), Some(Duration::from_millis(99)));
        assert_eq!(percentile(&v[..1], 99.0), Some(Duration::from_millis(1)));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn generation_from_metrics() {
        let text = "# HELP weft_registry_generation x\n# TYPE weft_registry_generation gauge\nweft_registry_generation 42\n";
        assert_eq!(generation_of(text), Some(42));
    }

    #[test]
    fn the_synthetic_cluster_has_its_size_and_unique_addresses() {
        let s = Synthetic::generate();
        assert_eq!(s.nodes.len(), NODES);
        assert_eq!(s.namespaces.len(), NAMESPACES);
        assert_eq!(s.pods.len(), 10_000);
        assert_eq!(s.services.len(), 2_000);
        assert_eq!(s.slices.len(), 2_000);
        assert_eq!(s.policies.len(), 1_000);
        assert_eq!(s.allow + s.deny, 1_000);
        assert!(s.deny > 100 && s.allow > 100);
        let unique = |v: &[Value], p: &str| {
            let mut all: Vec<&str> = v.iter().filter_map(|o| o.pointer(p)?.as_str()).collect();
            all.sort_unstable();
            let n = all.len();
            all.dedup();
            (n, all.len())
        };
        assert_eq!(unique(&s.pods, "/status/podIP"), (10_000, 10_000));
        assert_eq!(unique(&s.pods, "/metadata/uid"), (10_000, 10_000));
        assert_eq!(unique(&s.services, "/spec/clusterIP"), (2_000, 2_000));
        let names: Vec<String> = s
            .pods
            .iter()
            .map(|p| format!("{}/{}", p["metadata"]["namespace"], p["metadata"]["name"]))
            .collect();
        let mut dedup = names.clone();
        dedup.sort();
        dedup.dedup();
        assert_eq!(dedup.len(), names.len());
        // Every node carries about as many pods as the others, none on node-a.
        for n in 0..NODES {
            let on = s
                .pods
                .iter()
                .filter(|p| p["spec"]["nodeName"] == json!(node_name(n)))
                .count();
            assert_eq!(on, 100, "{}", node_name(n));
        }
    }

    #[test]
    fn pod_changes_flip_readiness_then_a_label() {
        let mut pod = Synthetic::generate().pods.swap_remove(0);
        let ready = |p: &Value| {
            p["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|c| matches!(c["type"].as_str(), Some("Ready" | "ContainersReady")))
                .map(|c| c["status"].as_str().unwrap_or("").to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(ready(&pod), ["True", "True"]);
        flip_pod(&mut pod, 0);
        assert_eq!(ready(&pod), ["False", "False"]);
        assert_eq!(pod["status"]["containerStatuses"][0]["ready"], json!(false));
        flip_pod(&mut pod, 2);
        assert_eq!(ready(&pod), ["True", "True"]);
        flip_pod(&mut pod, 3);
        assert_eq!(
            pod["metadata"]["labels"]["rollouts.example.com/revision"],
            json!("3")
        );
    }

    #[test]
    fn policy_changes_toggle_a_port() {
        let policies = Synthetic::generate().policies;
        let mut p = policies
            .iter()
            .find(|p| {
                p["metadata"]["name"] == json!("allow-api-same-team")
                    || p.pointer("/spec/rules/0/to/0/operation/ports").is_some()
            })
            .cloned()
            .expect("a policy with ports");
        let before = p.clone();
        assert!(toggle_port(&mut p));
        let ports = p.pointer("/spec/rules/0/to/0/operation/ports").cloned();
        assert!(ports.is_some_and(|v| v.as_array().is_some_and(|a| a.contains(&json!("8443")))));
        assert!(toggle_port(&mut p));
        assert_eq!(p, before);
        let mut nothing = policies
            .iter()
            .find(|p| p["metadata"]["name"] == json!("allow-nothing"))
            .cloned()
            .expect("an allow-nothing policy");
        assert!(!toggle_port(&mut nothing));
        // A policy without ports gets them and loses them again.
        let mut methods = policies
            .iter()
            .find(|p| {
                p["spec"]["action"] == json!("DENY")
                    && p.pointer("/spec/rules/0/to/0/operation/methods").is_some()
            })
            .cloned()
            .expect("a DENY of methods");
        let before = methods.clone();
        assert!(toggle_port(&mut methods) && toggle_port(&mut methods));
        assert_eq!(methods, before);
    }
}
