//! `weft node`: the composition root. Builds every part from the configuration, wires them
//! together, starts the listeners and the background loops, and stops on SIGTERM/Ctrl-C.
//!
//! - [`reconcile`]: keeps the workload index, the identities held, the kernel's enrolled and
//!   STRICT maps and the compiled policies in step with the registry and the cgroups.
//! - [`view`]: what the admin API and `/metrics` read from the running node.
//! - [`workers`]: the data-path threads that accept and serve connections.
//! - [`handover`]: the listening sockets taken over from a running node, and handed to the
//!   next one; then [`crate::drain`] lets what is open finish.
//!
//! May import: everything; nothing imports it.

mod handover;
mod networks;
mod reconcile;
mod view;
mod workers;

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use arc_swap::ArcSwap;
use tracing::{error, info, warn};

use crate::admin;
use crate::capture::{Capture, CaptureConfig};
use crate::config::{NodeConfig, ProxyAddress, SourceAddress};
use crate::identity::{AuthorityConfig, IdentityConfig, IdentityManager};
use crate::inbound::{Inbound, InboundConfig};
use crate::inputs::ProxyInputs;
use crate::l7::route::RouteTable;
use crate::outbound::cluster::Clusters;
use crate::outbound::http::HttpConfig;
use crate::outbound::Outbound;
use crate::policy::PolicySet;
use crate::registry::kube::{KubeOptions, KubeSource};
use crate::registry::{FileSource, Registry};
use crate::telemetry::{metrics, Telemetry};
use crate::tunnel::client::{Pool, PoolConfig};
use crate::tunnel::server::{AdmissionLimits, Server, ServerConfig};
use crate::upstream::dns::Dns;
use crate::upstream::Connector;
use crate::workload::WorkloadIndex;

/// The running node, as the admin API, `/metrics` and the reconcile loop see it.
struct NodeProxy {
    cfg: NodeConfig,
    proxy_addr: SocketAddrV4,
    inputs: Arc<ProxyInputs>,
    capture: Arc<Capture>,
    identity: Arc<IdentityManager>,
    pool: Pool,
    hbone: Arc<Server<Inbound>>,
    /// Every destination's shared state and counters (`/stats`).
    clusters: Arc<Clusters>,
    /// The Kubernetes API source, with `--registry kube`.
    kube: Option<Arc<KubeSource>>,
    ready: AtomicBool,
    /// Enrolled pods not captured for longer than `--enroll-timeout` (`weft status`).
    uncaptured: parking_lot::Mutex<Vec<String>>,
    /// Pods that connected before their cgroup was enrolled (the last 20), and how many ever did.
    capture_gaps: parking_lot::Mutex<Vec<String>>,
    capture_gaps_total: std::sync::atomic::AtomicU64,
    /// Addresses of this node's pods with a STRICT port: weft's connections to them are
    /// announced to the kernel.
    strict_pods: Arc<ArcSwap<HashSet<IpAddr>>>,
    /// The network namespaces of this node's pods.
    networks: Arc<networks::Networks>,
}

impl std::fmt::Debug for NodeProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeProxy")
            .field("node", &self.cfg.node_name)
            .finish_non_exhaustive()
    }
}

pub async fn run(cfg: NodeConfig) -> anyhow::Result<()> {
    // Before anything is bound: a node running here hands its listening sockets over.
    let handover_path = cfg.handover_socket.clone();
    let mut inherited = tokio::task::spawn_blocking(move || handover::take_over(&handover_path))
        .await?
        .unwrap_or_else(|e| {
            warn!(error = %format!("{e:#}"), "could not take the listeners over from the running node; binding them");
            None
        });
    let (trigger, draining) = crate::drain::channel();
    let (registry, kube) = if cfg.kube() {
        let source = KubeSource::start(KubeOptions {
            kubeconfig: cfg.kubeconfig.clone(),
            context: cfg.kube_context.clone(),
            node_name: cfg.node_name.clone(),
        })
        .await
        .context("reading the registry from the Kubernetes API")?;
        (source.registry().clone(), Some(Arc::new(source)))
    } else {
        (FileSource::watched(&cfg.registry)?, None)
    };
    let proxy_addr = proxy_address(&cfg, &registry)?;

    let capture = Arc::new(Capture::attach(&CaptureConfig {
        cgroup_root: cfg.cgroup_root.clone(),
        bpffs: cfg.bpffs.clone(),
        proxy_addr,
        exclude_ports: cfg.exclude_ports.clone(),
        exclude_cidrs: cfg.exclude_cidrs.clone(),
    })?);
    let strict_pods: Arc<ArcSwap<HashSet<IpAddr>>> = Arc::default();
    // Before any STRICT entry is written: where kubelet probes come from.
    refresh_node_addresses(&capture);
    tokio::spawn(keep_node_addresses(capture.clone()));
    let identity = Arc::new(
        IdentityManager::new(IdentityConfig {
            ca_cert: cfg.ca_cert.clone(),
            authority: match (&cfg.ca_address, &cfg.ca_key) {
                (Some(address), _) => AuthorityConfig::Service {
                    address: address.clone(),
                    token: cfg.ca_token.clone(),
                },
                (None, Some(key)) => {
                    warn!(
                        "--ca-key: this node signs workload certificates itself (single-node \
                         and development mode); root on it can mint any identity of the mesh"
                    );
                    AuthorityConfig::Key(key.clone())
                }
                (None, None) => anyhow::bail!("no CA: --ca-address or --ca-key"),
            },
            trust_bundle: cfg.trust_bundle.clone(),
            trust_domain: cfg.trust_domain.clone(),
            svid_ttl: cfg.svid_ttl,
        })
        .context("loading the mesh CA")?,
    );
    identity.clone().spawn_rotation();
    let connect_timeout = Duration::from_millis(cfg.connect_timeout_ms);
    let telemetry = Arc::new(telemetry(&cfg)?.with_admission(capture_admission(&cfg)));
    let (generation, policies, routes, index) = {
        let snapshot = registry.snapshot();
        (
            snapshot.generation,
            PolicySet::build(&snapshot, &cfg.root_namespace),
            RouteTable::build(&snapshot),
            WorkloadIndex::build(&snapshot, &cfg.node_name, &cfg.cgroup_root),
        )
    };
    let workloads = Arc::new(ArcSwap::from_pointee(index));
    // Connections made for a pod leave from its own network namespace (its address).
    let networks = Arc::new(networks::Networks::new(workloads.clone()));
    let pod_networks = match cfg.source_address {
        SourceAddress::Pod => Some(networks.clone() as Arc<dyn crate::netns::PodNetworks>),
        SourceAddress::Node => None,
    };
    let mut connector =
        Connector::new(connect_timeout).with_deliveries(Arc::new(AnnouncedToCapture {
            capture: capture.clone(),
            strict_pods: strict_pods.clone(),
        }));
    if let Some(n) = &pod_networks {
        connector = connector.with_pod_networks(n.clone());
    }
    let inputs = Arc::new(ProxyInputs {
        node: cfg.node_name.clone(),
        trust_domain: cfg.trust_domain.clone(),
        hbone_port: cfg.hbone_port,
        registry: registry.clone(),
        policies: Arc::new(ArcSwap::from_pointee(policies)),
        policy_generation: tokio::sync::watch::Sender::new(generation),
        routes: Arc::new(ArcSwap::from_pointee(routes)),
        workloads: workloads.clone(),
        connector,
        telemetry: telemetry.clone(),
        draining: draining.clone(),
    });
    let pool = Pool::new(
        identity.clone(),
        PoolConfig {
            connect_timeout,
            networks: pod_networks,
            keepalive_interval: cfg.hbone_keepalive_interval,
            keepalive_timeout: cfg.hbone_keepalive_timeout,
            ..PoolConfig::default()
        },
        telemetry.clone(),
    );

    // HBONE inbound: mutual TLS, then only pods hosted here, then AuthorizationPolicy.
    let hbone_addr = SocketAddr::new(hbone_ip(&cfg, &registry)?, cfg.hbone_port);
    let hbone_listeners = workers::listen(
        "HBONE",
        hbone_addr,
        cfg.workers,
        take_group(&mut inherited, handover::HBONE, hbone_addr),
    )?;
    let hbone = Server::new(
        identity.clone(),
        Arc::new(Inbound::new(
            inputs.clone(),
            InboundConfig {
                max_request_headers: cfg.max_request_headers_kb * 1024,
                detection_timeout: Duration::from_millis(
                    cfg.protocol_detection_timeout_ms.max(100),
                ),
                idle_timeout: cfg.idle_timeout,
            },
        )),
        ServerConfig {
            admission: AdmissionLimits {
                max_handshakes: cfg.hbone_max_handshakes,
                max_handshakes_per_peer: cfg.hbone_max_handshakes_per_peer,
                max_connections_per_peer: cfg.hbone_max_connections_per_peer,
            },
            ..ServerConfig::default()
        },
        telemetry.clone(),
        inputs.draining.clone(),
    );

    // Listen before enrolling anyone, so no enrolled connect is redirected to a closed port.
    let capture_listeners = workers::listen(
        "capture",
        SocketAddr::V4(proxy_addr),
        cfg.workers,
        take_group(
            &mut inherited,
            handover::CAPTURE,
            SocketAddr::V4(proxy_addr),
        ),
    )?;
    let node = Arc::new(NodeProxy {
        cfg: cfg.clone(),
        proxy_addr,
        inputs: inputs.clone(),
        capture: capture.clone(),
        identity: identity.clone(),
        pool: pool.clone(),
        hbone: hbone.clone(),
        clusters: Arc::default(),
        kube,
        ready: AtomicBool::new(false),
        uncaptured: parking_lot::Mutex::default(),
        capture_gaps: parking_lot::Mutex::default(),
        capture_gaps_total: std::sync::atomic::AtomicU64::new(0),
        strict_pods,
        networks,
    });
    let kernel = reconcile::apply(&node, generation)?;

    let outbound = Arc::new(
        Outbound::new(
            inputs.clone(),
            capture.clone(),
            pool,
            node.clusters.clone(),
            HttpConfig {
                max_request_headers: cfg.max_request_headers_kb * 1024,
                retry_body: cfg.retry_body_kb * 1024,
                dns: Arc::new(
                    Dns::new(cfg.dns_server).context("setting up DNS for ServiceEntry hosts")?,
                ),
            },
            Duration::from_millis(cfg.protocol_detection_timeout_ms),
        )
        .with_idle_timeout(cfg.idle_timeout),
    );
    let listening = workers::start(
        cfg.workers,
        outbound.clone(),
        hbone.clone(),
        capture_listeners,
        hbone_listeners,
    )?;
    // Kept to hand over, every socket of both groups: the workers' copies are theirs.
    let capture_fds = listening
        .capture
        .iter()
        .map(|l| (handover::CAPTURE, l.as_raw_fd()));
    let hbone_fds = listening
        .tunnels
        .iter()
        .map(|l| (handover::HBONE, l.as_raw_fd()));
    let mut offer: Vec<_> = capture_fds.chain(hbone_fds).collect();
    match capture.events() {
        Ok(events) => {
            tokio::spawn(outbound.clone().watch_redirects(events));
        }
        Err(e) => {
            warn!(error = %format!("{e:#}"), "redirect events unavailable; unhandled redirects will not be reported")
        }
    }
    tokio::spawn(reconcile::run(node.clone(), kernel));

    let router = admin::server::router(node.clone());
    let tcp = match take(&mut inherited, handover::ADMIN, cfg.admin_address)? {
        Some(l) => l,
        None => admin::server::bind_tcp(cfg.admin_address).await?,
    };
    let mut copies = vec![copy(&tcp)?];
    offer.push((handover::ADMIN, copies[0].as_raw_fd()));
    let socket_path = cfg.admin_socket.clone();
    let unix_router = router.clone();
    // The admin API and /metrics serve until a successor serves them (a node draining on its
    // own still answers `weft status`).
    let (d1, d2, d3) = (draining.clone(), draining.clone(), draining.clone());
    // One ceiling for the admin API's two listeners; the metrics listener's is per address too.
    let (admin_gate, metrics_gate, bounds) = control_bounds(&cfg, &telemetry);
    let unix_gate = admin_gate.clone();
    tokio::spawn(async move {
        tokio::select! {
            served = admin::server::serve_unix_bounded(&socket_path, unix_router, unix_gate, bounds) => if let Err(e) = served {
                error!(error = %format!("{e:#}"), "admin socket stopped");
            },
            _ = d1.handed_over() => {}
        }
    });
    tokio::spawn(async move {
        tokio::select! {
            served = admin::server::serve_bounded(tcp, router, admin_gate, bounds) => if let Err(e) = served {
                error!(error = %format!("{e:#}"), "admin TCP listener stopped");
            },
            _ = d2.handed_over() => {}
        }
    });
    let metrics_listener = match take(&mut inherited, handover::METRICS, cfg.metrics_address)? {
        Some(l) => l,
        None => metrics::bind(cfg.metrics_address).await?,
    };
    copies.push(copy(&metrics_listener)?);
    offer.push((handover::METRICS, copies[1].as_raw_fd()));
    let gauges = node.clone();
    tokio::spawn(async move {
        tokio::select! {
            served = metrics::serve(metrics_listener, telemetry, gauges, metrics_gate, bounds) => if let Err(e) = served {
                error!(error = %format!("{e:#}"), "metrics listener stopped");
            },
            _ = d3.handed_over() => {}
        }
    });

    node.ready.store(true, Ordering::Release);
    info!(node = %cfg.node_name, proxy = %proxy_addr, hbone = %hbone_addr, cgroup_root = %cfg.cgroup_root.display(),
        admin_socket = %cfg.admin_socket.display(), admin_address = %cfg.admin_address, "weft node ready");
    // What starting up let go of (the kernel's BTF, read to load the eBPF object; the first
    // registry build) was freed on this thread, which no runtime's park hook visits: handed
    // back now, and by every control-plane thread as it next parks. From here on what is freed
    // goes back after the allocator's delay, as it does on a busy data path.
    crate::memory::release();
    crate::memory::serving();

    // This node serves: the predecessor, if any, stops accepting and drains; then the next
    // node can take over from this one.
    if let Some(predecessor) = inherited {
        let (pid, version) = (predecessor.pid, predecessor.version.clone());
        match tokio::task::spawn_blocking(move || predecessor.serving()).await? {
            Ok(()) => {
                info!(predecessor = pid, predecessor_version = %version, "took over: the predecessor drains")
            }
            Err(e) => {
                warn!(predecessor = pid, error = %format!("{e:#}"), "the predecessor did not confirm it stopped accepting")
            }
        }
    }
    let offered = Arc::new(handover::Offered::bind(&cfg.handover_socket)?);
    let (taken_tx, taken_rx) = tokio::sync::oneshot::channel();
    {
        let offered = offered.clone();
        std::thread::Builder::new()
            .name("weft-handover".into())
            .spawn(move || {
                // These keep the descriptors in `offer` open while they are offered.
                let _kept = (listening, copies);
                offered.serve_until_taken(&offer);
                let _ = taken_tx.send(());
            })
            .context("starting the hand-over thread")?;
    }

    // A successor may take over while this node serves, or while it drains after SIGTERM.
    let trigger = Arc::new(trigger);
    tokio::spawn({
        let trigger = trigger.clone();
        async move {
            if taken_rx.await.is_ok() {
                trigger.hand_over();
                trigger.start();
            }
        }
    });
    tokio::select! {
        _ = shutdown_signal() => {
            info!(drain_timeout = ?cfg.drain_timeout, "stopping: draining (a node started now still takes the listeners over)");
        }
        _ = draining.started() => {}
    }
    node.ready.store(false, Ordering::Release);
    trigger.start();
    drain(&trigger, cfg.drain_timeout).await;
    info!("stopped; eBPF programs stay attached and pinned for the next start");
    offered.remove();
    if !draining.is_handed_over() {
        // Otherwise the socket at that path is the successor's.
        let _ = std::fs::remove_file(&cfg.admin_socket);
    }
    Ok(())
}

/// Lets what is open finish, for at most `timeout`; then closes what is left and gives it a
/// moment to be recorded.
async fn drain(trigger: &crate::drain::Trigger, timeout: Duration) {
    let left = trigger.in_flight();
    info!(in_flight = left, ?timeout, "draining");
    if tokio::time::timeout(timeout, trigger.drained())
        .await
        .is_ok()
    {
        info!("drained: every connection ended");
        return;
    }
    warn!(
        in_flight = trigger.in_flight(),
        "drain timeout reached: closing what is still open"
    );
    trigger.close();
    let _ = tokio::time::timeout(CLOSE_GRACE, trigger.drained()).await;
}

/// How long connections closed at the drain timeout get to record themselves.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// A descriptor of the same listening socket, kept to hand over while the original serves.
fn copy(listener: &tokio::net::TcpListener) -> anyhow::Result<socket2::Socket> {
    Ok(socket2::SockRef::from(listener).try_clone()?)
}

/// The listener handed over as `name` if it is bound where this node listens, as a tokio one.
fn take(
    inherited: &mut Option<handover::Inherited>,
    name: &str,
    addr: SocketAddr,
) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    let Some(listener) = take_group(inherited, name, addr).pop() else {
        return Ok(None);
    };
    Ok(Some(tokio::net::TcpListener::from_std(listener)?))
}

/// The sockets handed over as `name` (a group, or one), if bound where this node listens;
/// non-blocking.
fn take_group(
    inherited: &mut Option<handover::Inherited>,
    name: &str,
    addr: SocketAddr,
) -> Vec<std::net::TcpListener> {
    let group = inherited
        .as_mut()
        .map(|i| i.take(name, addr))
        .unwrap_or_default();
    group
        .into_iter()
        .filter(|l| match l.set_nonblocking(true) {
            Ok(()) => true,
            Err(e) => {
                warn!(listener = name, error = %e, "a handed-over listener is unusable");
                false
            }
        })
        .collect()
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
            let ip = node.ipv4().with_context(|| {
                format!(
                    "node {:?} has no IPv4 address in the registry",
                    cfg.node_name
                )
            })?;
            SocketAddr::new(ip, port)
        }
    };
    match addr {
        SocketAddr::V4(v4) if !v4.ip().is_unspecified() => Ok(v4),
        _ => bail!("--proxy-address {addr}: must be a specific IPv4 address pods can reach"),
    }
}

/// weft's connections to STRICT pods, announced to the kernel's STRICT check.
#[derive(Debug)]
struct AnnouncedToCapture {
    capture: Arc<Capture>,
    /// The addresses of this node's pods with a STRICT port (reconcile keeps it; a superset
    /// while STRICT entries are being written).
    strict_pods: Arc<ArcSwap<HashSet<IpAddr>>>,
}

impl crate::upstream::Deliveries for AnnouncedToCapture {
    fn wanted(&self, target: std::net::SocketAddrV4) -> bool {
        self.strict_pods.load().contains(&IpAddr::V4(*target.ip()))
    }
    fn announce(&self, local_port: u16, target: std::net::SocketAddrV4) -> anyhow::Result<()> {
        self.capture.announce_delivery(local_port, target)
    }
    fn delivered(&self, local_port: u16, target: std::net::SocketAddrV4) {
        self.capture.delivered(local_port, target)
    }
}

/// How often the node's addresses are read again (a bridge brought up later, a new address).
const NODE_ADDRESSES_EVERY: Duration = Duration::from_secs(10);

async fn keep_node_addresses(capture: Arc<Capture>) {
    let mut every = tokio::time::interval(NODE_ADDRESSES_EVERY);
    every.tick().await;
    loop {
        every.tick().await;
        refresh_node_addresses(&capture);
    }
}

/// Writes the IPv4 addresses of this network namespace's interfaces (the node's: its
/// InternalIP, a pod bridge's own address, …) to the capture: kubelet probes come from one of
/// them. Loopback is left out (the programs let it in anyway).
fn refresh_node_addresses(capture: &Capture) {
    let addrs = match nix::ifaddrs::getifaddrs() {
        Ok(list) => list
            .filter_map(|i| i.address?.as_sockaddr_in().map(|a| a.ip()))
            .filter(|ip| !ip.is_loopback())
            .collect::<HashSet<_>>(),
        Err(e) => {
            warn!(error = %e, "cannot list the node's addresses");
            return;
        }
    };
    if let Err(e) = capture.set_node_addresses(&addrs) {
        warn!(error = %format!("{e:#}"), "cannot update the node's addresses for probes");
    }
}

/// Where the HBONE listener binds: `--hbone-address`, else the node's address in the registry,
/// which is where other nodes dial it. A given address other nodes do not dial is warned about.
fn hbone_ip(cfg: &NodeConfig, registry: &Registry) -> anyhow::Result<IpAddr> {
    let dialled = registry
        .snapshot()
        .node(&cfg.node_name)
        .and_then(|n| n.ipv4());
    match (cfg.hbone_address, dialled) {
        (Some(ip), Some(d)) if !ip.is_unspecified() && ip != d => {
            warn!(hbone_address = %ip, peers_dial = %d,
                "--hbone-address is not the node's address in the registry, where other nodes dial HBONE: cross-node traffic will not arrive unless it is forwarded there");
            Ok(ip)
        }
        (Some(ip), _) => Ok(ip),
        (None, Some(d)) => Ok(d),
        (None, None) => bail!(
            "--hbone-address not given and node {:?} has no IPv4 address in the registry to listen on",
            cfg.node_name
        ),
    }
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

/// The node's telemetry as configured: Istio's cluster id, the access log, tracing.
fn telemetry(cfg: &NodeConfig) -> anyhow::Result<Telemetry> {
    use crate::config::{LogFormat, OtlpTransport};
    use crate::telemetry::access_log::{AccessLog, AccessLogFormat, AccessLogTarget};
    use crate::telemetry::trace::{OtlpProtocol, TraceConfig, Tracing};
    let target: AccessLogTarget = cfg
        .access_log
        .parse()
        .map_err(|e| anyhow::anyhow!("--access-log {:?}: {e}", cfg.access_log))?;
    let format = match cfg.access_log_format {
        LogFormat::Text => AccessLogFormat::Text,
        LogFormat::Json => AccessLogFormat::Json,
    };
    let access_log = AccessLog::new(target, format, &cfg.node_name)
        .with_context(|| format!("--access-log {}", cfg.access_log))?;
    let tracing = Tracing::new(
        TraceConfig {
            endpoint: cfg.otlp_endpoint.clone(),
            protocol: match cfg.otlp_protocol {
                OtlpTransport::Grpc => OtlpProtocol::Grpc,
                OtlpTransport::HttpProtobuf => OtlpProtocol::HttpProtobuf,
            },
            sampling_percent: cfg.trace_sampling,
            ..TraceConfig::default()
        },
        &cfg.node_name,
    )
    .context("--otlp-endpoint")?;
    Ok(Telemetry::new(cfg.node_name.clone(), cfg.flow_capacity)
        .with_cluster(&cfg.cluster_id)
        .with_access_log(access_log)
        .with_tracing(tracing))
}

/// The capture listener's limits: RLIMIT_NOFILE raised to its hard limit first, since the
/// defaults are derived from it.
fn capture_admission(cfg: &NodeConfig) -> crate::limits::Admission {
    match crate::limits::raise_nofile() {
        Ok((before, after)) if after > before => {
            info!(before, after, "raised the open file limit (RLIMIT_NOFILE)")
        }
        Ok((_, now)) => info!(limit = now, "open file limit (RLIMIT_NOFILE)"),
        Err(e) => warn!(error = %e, "cannot raise the open file limit (RLIMIT_NOFILE)"),
    }
    let (node, per_pod) = cfg.connection_limits(crate::limits::nofile());
    info!(
        max_connections = node,
        max_connections_per_pod = per_pod,
        "capture listener connection limits"
    );
    crate::limits::Admission::new(node, per_pod)
}

/// The admin API's and the metrics listener's connection limits and timeouts.
fn control_bounds(
    cfg: &NodeConfig,
    telemetry: &Telemetry,
) -> (
    admin::server::Gate,
    admin::server::Gate,
    admin::server::Bounds,
) {
    use crate::limits::Listener;
    let admission = telemetry.admission.clone();
    let admin = admin::server::Gate::new(
        Listener::Admin,
        cfg.admin_max_connections,
        None,
        admission.clone(),
    );
    let metrics = admin::server::Gate::new(
        Listener::Metrics,
        cfg.metrics_max_connections,
        Some(cfg.metrics_max_connections_per_ip),
        admission,
    );
    let bounds = admin::server::Bounds {
        header_timeout: cfg.admin_header_timeout,
        idle_timeout: cfg.admin_idle_timeout,
    };
    (admin, metrics, bounds)
}
