//! `weft node`: wires capture, registry, the outbound path, flows and the admin API together
//! and keeps the kernel's enrolled-cgroup map in step with the registry.

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use arc_swap::ArcSwap;
use serde_json::json;
use tracing::{error, info, warn};

use crate::admin::{self, NodeView};
use crate::capture::{Capture, CaptureConfig, StrictMode};
use crate::cli::WorkloadInfo;
use crate::config::{NodeConfig, ProxyAddress};
use crate::flows::FlowStore;
use crate::identity::{IdentityConfig, IdentityManager, SpiffeId};
use crate::inbound::InboundPolicy;
use crate::metrics::{self, MetricsSnapshot, MetricsSource};
use crate::outbound::{self, workload_identity, Mesh, Outbound};
use crate::policy::{MtlsMode, PolicySet};
use crate::registry::cgroup::WorkloadIndex;
use crate::registry::Registry;
use crate::tunnel::inbound::{Inbound, InboundConfig};
use crate::tunnel::pool::{Pool, PoolConfig};

/// How often pod cgroups are re-resolved even without a registry change (the kubelet may
/// create a pod's cgroup after the pod appears in the registry).
const RESCAN_EVERY: Duration = Duration::from_secs(1);

struct NodeState {
    cfg: NodeConfig,
    proxy_addr: SocketAddrV4,
    registry: Arc<Registry>,
    capture: Arc<Capture>,
    workloads: Arc<ArcSwap<WorkloadIndex>>,
    flows: Arc<FlowStore>,
    outbound: Arc<Outbound>,
    identity: Arc<IdentityManager>,
    policies: Arc<ArcSwap<PolicySet>>,
    pool: Arc<Pool>,
    inbound: Arc<Inbound>,
    ready: AtomicBool,
}

impl std::fmt::Debug for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeState")
            .field("node", &self.cfg.node_name)
            .finish_non_exhaustive()
    }
}

pub async fn run(cfg: NodeConfig) -> anyhow::Result<()> {
    let registry = Arc::new(
        Registry::load(&cfg.registry)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("loading the registry {}", cfg.registry.display()))?,
    );
    registry.clone().spawn_watcher();
    let proxy_addr = proxy_address(&cfg, &registry)?;

    let capture = Arc::new(Capture::attach(&CaptureConfig {
        cgroup_root: cfg.cgroup_root.clone(),
        bpffs: cfg.bpffs.clone(),
        proxy_addr,
        exclude_ports: cfg.exclude_ports.clone(),
        exclude_cidrs: cfg.exclude_cidrs.clone(),
    })?);
    let identity = Arc::new(
        IdentityManager::new(IdentityConfig {
            ca_cert: cfg.ca_cert.clone(),
            ca_key: cfg.ca_key.clone(),
            trust_bundle: cfg.trust_bundle.clone(),
            trust_domain: cfg.trust_domain.clone(),
            svid_ttl: cfg.svid_ttl,
        })
        .context("loading the mesh CA")?,
    );
    identity.clone().spawn_rotation();
    let policies = Arc::new(ArcSwap::from_pointee(PolicySet::build(
        &registry.snapshot(),
        &cfg.root_namespace,
    )));
    let pool = Arc::new(Pool::new(
        identity.clone(),
        PoolConfig {
            connect_timeout: Duration::from_millis(cfg.connect_timeout_ms),
            ..PoolConfig::default()
        },
    ));

    let flows = Arc::new(FlowStore::new(cfg.flow_capacity));
    // HBONE inbound: mutual TLS, then only pods hosted here, then AuthorizationPolicy.
    let hbone_addr = SocketAddr::new((*proxy_addr.ip()).into(), cfg.hbone_port);
    let hbone_listener = tokio::net::TcpListener::bind(hbone_addr)
        .await
        .with_context(|| format!("binding the HBONE listener {hbone_addr}"))?;
    let inbound = Inbound::new(
        identity.clone(),
        Arc::new(InboundPolicy::new(
            cfg.node_name.clone(),
            cfg.trust_domain.clone(),
            registry.clone(),
            policies.clone(),
            flows.clone(),
        )),
        InboundConfig {
            connect_timeout: Duration::from_millis(cfg.connect_timeout_ms),
            ..InboundConfig::default()
        },
    );
    tokio::spawn(inbound.clone().serve(hbone_listener));
    // Listen before enrolling anyone, so no enrolled connect is redirected to a closed port.
    let listener = outbound::bind(SocketAddr::V4(proxy_addr)).await?;
    let index = WorkloadIndex::build(&registry.snapshot(), &cfg.node_name, &cfg.cgroup_root);
    identity.set_local_identities(local_identities(&index, &cfg.trust_domain));
    capture.set_strict(&strict_entries(&index, &policies.load()))?;
    capture.set_enrolled(&index.enrolled_ids())?;
    let workloads = Arc::new(ArcSwap::from_pointee(index));

    let outbound = Arc::new(Outbound::new(
        cfg.node_name.clone(),
        capture.clone(),
        registry.clone(),
        workloads.clone(),
        flows.clone(),
        Duration::from_millis(cfg.connect_timeout_ms),
        Mesh {
            trust_domain: cfg.trust_domain.clone(),
            policies: policies.clone(),
            pool: pool.clone(),
            hbone_port: cfg.hbone_port,
        },
    ));
    tokio::spawn(outbound.clone().serve(listener));
    match capture.events() {
        Ok(events) => {
            tokio::spawn(outbound.clone().watch_redirects(events));
        }
        Err(e) => {
            warn!(error = %format!("{e:#}"), "redirect events unavailable; unhandled redirects will not be reported")
        }
    }

    let state = Arc::new(NodeState {
        cfg: cfg.clone(),
        proxy_addr,
        registry: registry.clone(),
        capture: capture.clone(),
        workloads: workloads.clone(),
        flows: flows.clone(),
        outbound: outbound.clone(),
        identity: identity.clone(),
        policies: policies.clone(),
        pool: pool.clone(),
        inbound: inbound.clone(),
        ready: AtomicBool::new(false),
    });
    tokio::spawn(reconcile(state.clone()));

    let router = admin::router(flows.clone(), state.clone());
    let tcp = admin::bind_tcp(cfg.admin_address).await?;
    let socket_path = cfg.admin_socket.clone();
    let unix_router = router.clone();
    tokio::spawn(async move {
        if let Err(e) = admin::serve_unix(&socket_path, unix_router).await {
            error!(error = %format!("{e:#}"), "admin socket stopped");
        }
    });
    tokio::spawn(async move {
        if let Err(e) = admin::serve_tcp(tcp, router).await {
            error!(error = %format!("{e:#}"), "admin TCP listener stopped");
        }
    });

    let metrics_addr = cfg.metrics_address;
    let metrics_source = state.clone();
    tokio::spawn(async move {
        if let Err(e) = metrics::serve(metrics_addr, metrics_source).await {
            error!(error = %format!("{e:#}"), "metrics listener stopped");
        }
    });

    state.ready.store(true, Ordering::Release);
    info!(node = %cfg.node_name, proxy = %proxy_addr, hbone = %hbone_addr, cgroup_root = %cfg.cgroup_root.display(),
        admin_socket = %cfg.admin_socket.display(), admin_address = %cfg.admin_address, "weft node ready");

    shutdown_signal().await;
    info!("shutting down; eBPF programs stay attached and pinned for the next start");
    let _ = std::fs::remove_file(&cfg.admin_socket);
    Ok(())
}

fn proxy_address(cfg: &NodeConfig, registry: &Registry) -> anyhow::Result<SocketAddrV4> {
    let addr = match cfg.proxy_address {
        ProxyAddress::Given(a) => a,
        ProxyAddress::FromNode(port) => {
            let snap = registry.snapshot();
            let node = snap.node(&cfg.node_name).with_context(|| {
                format!(
                    "--proxy-address not given and node {:?} is not in the registry to take its address from",
                    cfg.node_name
                )
            })?;
            let ip = node
                .addresses
                .iter()
                .find(|a| a.is_ipv4())
                .with_context(|| {
                    format!(
                        "node {:?} has no IPv4 address in the registry",
                        cfg.node_name
                    )
                })?;
            SocketAddr::new(*ip, port)
        }
    };
    match addr {
        SocketAddr::V4(v4) if !v4.ip().is_unspecified() => Ok(v4),
        _ => bail!("--proxy-address {addr}: must be a specific IPv4 address pods can reach"),
    }
}

/// Keeps the workload index and the kernel's enrolled set in step with the registry and with
/// pod cgroups appearing or going away.
async fn reconcile(state: Arc<NodeState>) {
    let mut changes = state.registry.subscribe();
    let mut tick = tokio::time::interval(RESCAN_EVERY);
    let mut enrolled: HashSet<u64> = state.workloads.load().enrolled_ids();
    let mut strict = strict_entries(&state.workloads.load(), &state.policies.load());
    let mut generation = state.registry.snapshot().generation;
    loop {
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            _ = tick.tick() => {}
        }
        let snapshot = state.registry.snapshot();
        if snapshot.generation != generation {
            generation = snapshot.generation;
            let set = PolicySet::build(&snapshot, &state.cfg.root_namespace);
            info!(
                generation,
                authorization_policies = set.len(),
                peer_authentications = set.peer_authentications(),
                "policies updated"
            );
            state.policies.store(Arc::new(set));
        }
        // Resolving cgroups touches the filesystem: keep it off the runtime's workers.
        let st = state.clone();
        let built = tokio::task::spawn_blocking(move || {
            WorkloadIndex::build(&snapshot, &st.cfg.node_name, &st.cfg.cgroup_root)
        });
        let Ok(index) = built.await else { continue };
        state
            .identity
            .set_local_identities(local_identities(&index, &state.cfg.trust_domain));
        // PeerAuthentication first: a pod that becomes STRICT is protected before anything else.
        let want_strict = strict_entries(&index, &state.policies.load());
        if want_strict != strict {
            match state.capture.set_strict(&want_strict) {
                Ok(()) => {
                    info!(
                        entries = want_strict.len(),
                        "STRICT mTLS enforcement updated"
                    );
                    strict = want_strict;
                }
                Err(e) => error!(error = %format!("{e:#}"), "updating STRICT enforcement"),
            }
        }
        let want = index.enrolled_ids();
        state.workloads.store(Arc::new(index));
        if want != enrolled {
            match state.capture.set_enrolled(&want) {
                Ok(()) => {
                    info!(
                        enrolled = want.len(),
                        added = want.difference(&enrolled).count(),
                        removed = enrolled.difference(&want).count(),
                        "enrolled cgroups updated"
                    );
                    enrolled = want;
                }
                Err(e) => error!(error = %format!("{e:#}"), "updating enrolled cgroups"),
            }
        }
    }
}

/// The identities of the mesh pods hosted on this node: the only SVIDs it may hold.
fn local_identities(index: &WorkloadIndex, trust_domain: &str) -> HashSet<SpiffeId> {
    index
        .entries()
        .iter()
        .filter(|e| e.enrolled)
        .filter_map(|e| workload_identity(trust_domain, &e.pod))
        .collect()
}

/// Kernel STRICT entries for the mesh pods of this node: `(pod cgroup, 0)` for the pod's
/// PeerAuthentication mode and `(pod cgroup, port)` where `portLevelMtls` overrides it.
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
    }
    out
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

impl NodeView for NodeState {
    fn workloads(&self) -> serde_json::Value {
        let index = self.workloads.load();
        let rows: Vec<WorkloadInfo> = index
            .entries()
            .iter()
            .map(|e| WorkloadInfo {
                namespace: e.pod.namespace.clone(),
                pod: e.pod.name.clone(),
                ip: e.pod.ip,
                node: e.pod.node_name.clone(),
                service_account: e.pod.service_account.clone(),
                identity: e
                    .enrolled
                    .then(|| workload_identity(&self.cfg.trust_domain, &e.pod))
                    .flatten()
                    .map(|id| id.to_string()),
                ready: e.pod.ready,
                enrolled: e.enrolled,
                cgroup_id: e.cgroup_id,
                cgroup_path: e.cgroup_path.clone(),
            })
            .collect();
        serde_json::to_value(rows).unwrap_or_default()
    }

    fn config_dump(&self) -> serde_json::Value {
        let snap = self.registry.snapshot();
        json!({
            "config": self.cfg,
            "proxy_address": self.proxy_addr,
            "registry": {
                "generation": snap.generation,
                "sources": snap.sources,
                "last_error": self.registry.last_error(),
                "snapshot": &*snap,
            },
        })
    }

    fn status(&self) -> serde_json::Value {
        let snap = self.registry.snapshot();
        let index = self.workloads.load();
        let loaded_at = time::OffsetDateTime::from(snap.loaded_at)
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        json!({
            "node": self.cfg.node_name,
            "ready": self.ready().is_ok(),
            "proxy_address": self.proxy_addr,
            "registry": {
                "generation": snap.generation,
                "loaded_at": loaded_at,
                "pods": snap.pods.len(),
                "services": snap.services.len(),
                "last_error": self.registry.last_error(),
            },
            "workloads": {
                "total": index.entries().len(),
                "enrolled": index.entries().iter().filter(|e| e.enrolled).count(),
            },
            "capture": self.capture.status(),
            "mesh": {
                "trust_domain": self.cfg.trust_domain,
                "svids": self.identity.certs().len(),
                "authorization_policies": self.policies.load().len(),
                "peer_authentications": self.policies.load().peer_authentications(),
            },
            "tunnel": {
                "outbound": self.pool.stats(),
                "inbound": self.inbound.stats(),
            },
            "flows": {
                "kept": self.flows.len(),
                "capacity": self.flows.capacity(),
                "totals": self.flows.totals(),
            },
        })
    }

    fn certs(&self) -> serde_json::Value {
        serde_json::to_value(self.identity.certs()).unwrap_or_default()
    }

    fn ready(&self) -> Result<(), String> {
        if !self.ready.load(Ordering::Acquire) {
            return Err("starting".into());
        }
        if let Some(p) = self.capture.programs().iter().find(|p| !p.attached) {
            return Err(format!("eBPF program {} is not attached", p.name));
        }
        Ok(())
    }
}

impl MetricsSource for NodeState {
    fn metrics(&self) -> MetricsSnapshot {
        let index = self.workloads.load();
        let (bytes_sent, bytes_received) = self.flows.bytes_totals();
        MetricsSnapshot {
            flows_by_verdict: self.flows.totals(),
            bytes_sent,
            bytes_received,
            active_connections: self.outbound.active_connections(),
            ebpf: self.capture.counters(),
            workloads: index.entries().len() as u64,
            enrolled_workloads: index.entries().iter().filter(|e| e.enrolled).count() as u64,
            registry_generation: self.registry.snapshot().generation,
            registry_reload_failed: self.registry.last_error().is_some(),
        }
    }
}
