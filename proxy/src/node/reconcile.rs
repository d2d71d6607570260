//! Keeps the node in step with the registry and with pod cgroups appearing or going away: the
//! compiled policies, the workload index, the identities this node may hold, and the kernel's
//! STRICT and enrolled maps — on every registry change and every second (the kubelet may
//! create a pod's cgroup after the pod appears in the registry).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::NodeProxy;
use crate::capture::StrictMode;
use crate::l7::route::RouteTable;
use crate::policy::{MtlsMode, PolicySet};
use crate::registry::Snapshot;
use crate::workload::WorkloadIndex;

/// How often pod cgroups are re-resolved even without a registry change.
const RESCAN_EVERY: Duration = Duration::from_secs(1);

/// What the kernel maps hold, as last written.
#[derive(Debug, Default)]
pub(super) struct Applied {
    /// Registry generation the policies in force were compiled from.
    generation: u64,
    enrolled: HashSet<u64>,
    strict: HashMap<(u64, u16), StrictMode>,
    /// Route conflicts already logged.
    route_warnings: HashSet<String>,
    /// Enrolled pods without a cgroup found, by uid: since when, and whether reported.
    uncaptured: HashMap<String, (Instant, bool)>,
    /// The namespaces in the mesh at the previous pass: a pod newly enrolled in one of them is
    /// a new pod, not a namespace just labelled.
    meshed_namespaces: HashSet<String>,
    /// The snapshot the policies and routes in force were compiled from: a new snapshot with
    /// the same objects (a pod changed) keeps them.
    compiled_from: Option<Arc<Snapshot>>,
}

/// Applies the workload index and policies in force (compiled from registry `generation`) to
/// the identities and the kernel (at start: a failure here stops the node).
pub(super) fn apply(node: &NodeProxy, generation: u64) -> anyhow::Result<Applied> {
    let inputs = &node.inputs;
    let snapshot = inputs.registry.snapshot();
    let mut applied = Applied {
        generation,
        compiled_from: (snapshot.generation == generation).then_some(snapshot.clone()),
        ..Applied::default()
    };
    let index = inputs.workloads.load();
    node.identity
        .set_local_identities(index.identities(&inputs.trust_domain));
    let strict = strict_entries(&index, &inputs.policies.load());
    node.strict_pods
        .store(Arc::new(strict_pods(&index, &strict)));
    node.capture.set_strict(&strict)?;
    applied.strict = strict;
    let enrolled = index.enrolled_ids();
    node.capture.set_enrolled(&enrolled)?;
    applied.enrolled = enrolled;
    applied.meshed_namespaces = snapshot
        .namespaces
        .keys()
        .filter(|ns| snapshot.namespace_enrolled(ns))
        .cloned()
        .collect();
    Ok(applied)
}

/// The reconcile loop, until the registry goes away.
pub(super) async fn run(node: Arc<NodeProxy>, mut applied: Applied) {
    let inputs = node.inputs.clone();
    let mut changes = inputs.registry.subscribe();
    let mut tick = tokio::time::interval(RESCAN_EVERY);
    loop {
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            _ = tick.tick() => {}
        }
        let snapshot = inputs.registry.snapshot();
        if snapshot.generation != applied.generation {
            applied.generation = snapshot.generation;
            let generation = applied.generation;
            let before = applied.compiled_from.replace(snapshot.clone());
            if !before.as_ref().is_some_and(|b| b.same_policies(&snapshot)) {
                let set = PolicySet::build(&snapshot, &node.cfg.root_namespace);
                info!(
                    generation,
                    authorization_policies = set.len(),
                    peer_authentications = set.peer_authentications(),
                    fail_closed = set.fail_closed().len(),
                    "policies updated"
                );
                inputs.policies.store(Arc::new(set));
                inputs.policy_generation.send_replace(generation);
            }
            if !before.as_ref().is_some_and(|b| b.same_routes(&snapshot)) {
                let routes = RouteTable::build(&snapshot);
                for w in routes.warnings() {
                    // Said once per distinct conflict, not on every change.
                    if applied.route_warnings.insert(w.clone()) {
                        warn!("routes: {w}");
                    }
                }
                info!(generation, rules = routes.len(), "routes updated");
                inputs.routes.store(Arc::new(routes));
            }
        }
        let meshed: HashSet<String> = snapshot
            .namespaces
            .keys()
            .filter(|ns| snapshot.namespace_enrolled(ns))
            .cloned()
            .collect();
        // Resolving cgroups touches the filesystem: keep it off the runtime's workers.
        let n = node.clone();
        let built = tokio::task::spawn_blocking(move || {
            WorkloadIndex::build(&snapshot, &n.cfg.node_name, &n.cfg.cgroup_root)
        });
        let Ok(index) = built.await else { continue };
        report_uncaptured(&node, &index, &mut applied.uncaptured);
        node.identity
            .set_local_identities(index.identities(&inputs.trust_domain));
        // PeerAuthentication first: a pod that becomes STRICT is protected before anything else.
        let want_strict = strict_entries(&index, &inputs.policies.load());
        if want_strict != applied.strict {
            // weft announces its connections to a pod before the pod turns STRICT, and goes
            // on until it no longer is.
            let now = strict_pods(&index, &want_strict);
            let during: HashSet<_> = now.union(&node.strict_pods.load()).copied().collect();
            node.strict_pods.store(Arc::new(during));
            let result = node.capture.set_strict(&want_strict);
            node.strict_pods.store(Arc::new(now));
            match result {
                Ok(()) => {
                    info!(
                        entries = want_strict.len(),
                        "STRICT mTLS enforcement updated"
                    );
                    applied.strict = want_strict;
                }
                Err(e) => error!(error = %format!("{e:#}"), "updating STRICT enforcement"),
            }
        }
        let want = index.enrolled_ids();
        let index = Arc::new(index);
        inputs.workloads.store(index.clone());
        node.networks.retain_current();
        if want != applied.enrolled {
            match node.capture.set_enrolled(&want) {
                Ok(()) => {
                    report_capture_gaps(&node, &index, &want, &applied);
                    info!(
                        enrolled = want.len(),
                        added = want.difference(&applied.enrolled).count(),
                        removed = applied.enrolled.difference(&want).count(),
                        "enrolled cgroups updated"
                    );
                    applied.enrolled = want;
                }
                Err(e) => error!(error = %format!("{e:#}"), "updating enrolled cgroups"),
            }
        }
        applied.meshed_namespaces = meshed;
    }
}

/// A new pod of a namespace already in the mesh whose cgroup was just enrolled, and which
/// connected before that (the kernel records the latest uncaptured connect per cgroup), had
/// those connections go around the mesh: it started connecting before weft found its cgroup.
/// Each such gap is warned about, kept in `weft status` (the last 20) and counted in
/// `weft_capture_gaps_total`. A running pod enrolled by labelling its namespace is not a gap.
fn report_capture_gaps(
    node: &NodeProxy,
    index: &WorkloadIndex,
    want: &HashSet<u64>,
    applied: &Applied,
) {
    for e in index.entries() {
        let (Some(id), Some(path)) = (e.cgroup_id, e.cgroup_path.as_deref()) else {
            continue;
        };
        if !want.contains(&id)
            || applied.enrolled.contains(&id)
            || !applied.meshed_namespaces.contains(&e.pod.namespace)
        {
            continue;
        }
        let ids = crate::workload::cgroup_ids_below(path);
        let Some(ago) = node.capture.connected_uncaptured(&ids) else {
            continue;
        };
        let name = format!("{}/{}", e.pod.namespace, e.pod.name);
        warn!(pod = %name, last_uncaptured_connect_ago = ?ago,
            "pod connected before its cgroup was enrolled: those connections went around the mesh");
        node.capture_gaps_total
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut gaps = node.capture_gaps.lock();
        gaps.push(format!(
            "{name}: connected before its cgroup was enrolled (last {}ms before, at {})",
            ago.as_millis(),
            crate::registry::model::rfc3339(std::time::SystemTime::now() - ago)
        ));
        let excess = gaps.len().saturating_sub(20);
        gaps.drain(..excess);
    }
}

/// Enrolled pods whose cgroup is still not found `--enroll-timeout` after they were first seen
/// without one run uncaptured: their connections bypass the mesh. Each is warned about once,
/// listed in `weft status` and counted in `weft_uncaptured_workloads` until found or gone.
fn report_uncaptured(
    node: &NodeProxy,
    index: &WorkloadIndex,
    tracked: &mut HashMap<String, (Instant, bool)>,
) {
    let now = Instant::now();
    let root = node.cfg.cgroup_root.display();
    let mut seen = HashSet::new();
    let mut report = Vec::new();
    for e in index.entries().iter().filter(|e| e.enrolled) {
        let pod = &e.pod;
        let name = format!("{}/{}", pod.namespace, pod.name);
        if e.cgroup_id.is_some() {
            if tracked.remove(&pod.uid).is_some_and(|(_, warned)| warned) {
                info!(pod = %name, "pod cgroup found: its connections are captured now");
            }
            continue;
        }
        seen.insert(pod.uid.clone());
        let (since, warned) = tracked.entry(pod.uid.clone()).or_insert((now, false));
        let waited = now.duration_since(*since);
        if waited < node.cfg.enroll_timeout {
            continue;
        }
        if !*warned {
            *warned = true;
            warn!(pod = %name, uid = %pod.uid, qos = ?pod.qos, cgroup_root = %root,
                "enrolled pod not captured: no cgroup of it under the cgroup root after {waited:?}; its connections bypass the mesh");
        }
        report.push(format!(
            "{name}: no cgroup for pod uid {} under {root} for {}s: connections not captured",
            pod.uid,
            waited.as_secs()
        ));
    }
    tracked.retain(|uid, _| seen.contains(uid));
    report.sort();
    *node.uncaptured.lock() = report;
}

/// The addresses of the pods with a STRICT or probe-STRICT entry in `strict`.
fn strict_pods(
    index: &WorkloadIndex,
    strict: &HashMap<(u64, u16), StrictMode>,
) -> HashSet<std::net::IpAddr> {
    let ids: HashSet<u64> = strict
        .iter()
        .filter(|(_, m)| **m != StrictMode::NotStrict)
        .map(|((id, _), _)| *id)
        .collect();
    index
        .entries()
        .iter()
        .filter(|e| e.cgroup_id.is_some_and(|id| ids.contains(&id)))
        .flat_map(|e| e.pod.ips.iter().copied())
        .collect()
}

/// Kernel STRICT entries for the mesh pods of this node: `(pod cgroup, 0)` for the pod's
/// PeerAuthentication mode, `(pod cgroup, port)` where `portLevelMtls` overrides it, and
/// [`StrictMode::StrictProbe`] for a STRICT port one of the pod's probes targets.
fn strict_entries(index: &WorkloadIndex, policies: &PolicySet) -> HashMap<(u64, u16), StrictMode> {
    let mut out = HashMap::new();
    for e in index.entries().iter().filter(|e| e.enrolled) {
        let Some(id) = e.cgroup_id else { continue };
        let mtls = policies.mtls(&e.pod);
        let strict = |m: MtlsMode| m == MtlsMode::Strict;
        if strict(mtls.default) {
            out.insert((id, 0), StrictMode::Strict);
        }
        for (port, mode) in &mtls.ports {
            if strict(*mode) != strict(mtls.default) {
                let m = if strict(*mode) {
                    StrictMode::Strict
                } else {
                    StrictMode::NotStrict
                };
                out.insert((id, *port), m);
            }
        }
        // A STRICT port a probe targets also takes plaintext from the node (the kubelet).
        for port in &e.pod.probe_ports {
            let mode = mtls.ports.get(port).copied().unwrap_or(mtls.default);
            if strict(mode) {
                out.insert((id, *port), StrictMode::StrictProbe);
            }
        }
    }
    out
}
