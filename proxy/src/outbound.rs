//! The outbound path: accept a redirected connection on the capture listener, identify the
//! source workload by its cgroup, resolve the original destination (Service VIP → a ready
//! endpoint, pod IP → that pod, anything else → passthrough), connect, relay, record the flow.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use time::OffsetDateTime;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use crate::capture::{Capture, Redirect, RedirectEvent};
use crate::flows::{Destination as FlowDestination, Flow, FlowStore, Source, Verdict};
use crate::forward;
use crate::identity::SpiffeId;
use crate::policy::{ConnRequest, Decision, PolicySet};
use crate::registry::cgroup::WorkloadIndex;
use crate::registry::{Destination, Pod, Registry, Snapshot};
use crate::tunnel::pool::{Hbone, Pool};

/// How long a redirect event may wait for its connection to reach the listener before it is
/// reported as [`Verdict::Unhandled`].
const UNHANDLED_AFTER: Duration = Duration::from_secs(5);
/// Bound on the redirects (and accepts) waiting to be paired; beyond it they are not tracked
/// (the kernel ring buffer has a similar bound and counts what it drops).
const TRACKED_MAX: usize = 65_536;

/// What the outbound path needs to carry mesh traffic: identities, policies, the HBONE pool.
pub struct Mesh {
    pub trust_domain: String,
    pub policies: Arc<ArcSwap<PolicySet>>,
    pub pool: Arc<Pool>,
    /// HBONE port on every node (`:15008`).
    pub hbone_port: u16,
}

pub struct Outbound {
    node_name: String,
    mesh: Mesh,
    capture: Arc<Capture>,
    registry: Arc<Registry>,
    workloads: Arc<ArcSwap<WorkloadIndex>>,
    flows: Arc<FlowStore>,
    connect_timeout: Duration,
    round_robin: Mutex<HashMap<String, usize>>,
    tracker: RedirectTracker,
    active: AtomicU64,
}

impl Outbound {
    pub fn new(
        node_name: String,
        capture: Arc<Capture>,
        registry: Arc<Registry>,
        workloads: Arc<ArcSwap<WorkloadIndex>>,
        flows: Arc<FlowStore>,
        connect_timeout: Duration,
        mesh: Mesh,
    ) -> Self {
        Self {
            node_name,
            mesh,
            capture,
            registry,
            workloads,
            flows,
            connect_timeout,
            round_robin: Mutex::new(HashMap::new()),
            tracker: RedirectTracker::default(),
            active: AtomicU64::new(0),
        }
    }

    /// Connections being relayed now.
    pub fn active_connections(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    /// Accepts redirected connections forever.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((conn, peer)) => {
                    let this = self.clone();
                    tokio::spawn(async move { this.handle(conn, peer).await });
                }
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn handle(&self, client: TcpStream, peer: SocketAddr) {
        let started = Instant::now();
        let mut flow = Flow {
            seq: 0,
            time: OffsetDateTime::now_utc(),
            node: self.node_name.clone(),
            source: Source {
                ip: Some(peer.ip()),
                ..Default::default()
            },
            original_destination: String::new(),
            destination: FlowDestination::default(),
            protocol: "tcp".into(),
            verdict: Verdict::Forwarded,
            bytes_sent: 0,
            bytes_received: 0,
            duration_ms: 0.0,
            error: None,
            cgroup_id: None,
            mtls: false,
            policy: None,
        };
        let local = match client.local_addr() {
            Ok(a) => a,
            Err(e) => {
                debug!(error = %e, "connection gone before it could be identified");
                return;
            }
        };
        let Some(redirect) = self.capture.take_redirect(peer, local) else {
            debug!(%peer, "connection without a redirect record: original destination unknown, closing");
            let why = "no eBPF redirect record for this connection".to_string();
            return self.refuse(&client, flow, Verdict::Unidentified, why, started);
        };
        self.tracker.accepted(redirect.cookie);
        flow.original_destination = redirect.original_dst.to_string();
        flow.cgroup_id = Some(redirect.cgroup_id);

        // Identify: the cgroup decides who is calling, not the source address.
        let snapshot = self.registry.snapshot();
        let source = self.workloads.load().by_cgroup(redirect.cgroup_id).cloned();
        let source_id = source
            .as_deref()
            .and_then(|p| workload_identity(&self.mesh.trust_domain, p));
        flow.source.identity = source_id.as_ref().map(|id| id.to_string());
        if let Some(pod) = &source {
            flow.source.namespace = Some(pod.namespace.clone());
            flow.source.pod = Some(pod.name.clone());
            if pod.ip.is_some_and(|ip| ip != peer.ip()) {
                warn!(pod = %format!("{}/{}", pod.namespace, pod.name), %peer,
                    "source address differs from the pod's registered IP; identified by cgroup");
            }
        }

        let (target, dest_pod) = match self.pick_target(&snapshot, &redirect, &mut flow.destination)
        {
            Some(t) => t,
            None => {
                let why = "service has no ready endpoint".to_string();
                return self.refuse(&client, flow, Verdict::NoEndpoint, why, started);
            }
        };
        flow.destination.address = Some(target.to_string());

        // A destination in the mesh is authenticated and authorized: across nodes by HBONE
        // (mutual TLS; the destination node decides), on this node right here.
        if let Some(dest) = dest_pod.filter(|p| in_mesh(&snapshot, p)) {
            let dest_id = workload_identity(&self.mesh.trust_domain, &dest);
            flow.destination.identity = dest_id.as_ref().map(|id| id.to_string());
            let (Some(source_id), Some(dest_id)) = (source_id, dest_id) else {
                let why = "no workload identity for the source or the destination".to_string();
                return self.refuse(&client, flow, Verdict::ConnectFailed, why, started);
            };
            if dest.node_name.as_deref() != Some(self.node_name.as_str()) {
                return self
                    .tunnel(
                        client, flow, &snapshot, &dest, source_id, dest_id, target, peer, started,
                    )
                    .await;
            }
            let principal = source_id.principal();
            let decision = self.mesh.policies.load().authorize(&ConnRequest {
                destination: &dest,
                destination_port: target.port(),
                destination_ip: Some(target.ip()),
                source_principal: Some(&principal),
                source_namespace: None,
                source_ip: Some(peer.ip()),
            });
            if let Decision::Deny { policy, reason } = decision {
                flow.policy = Some(policy);
                let why = format!("denied: {}", reason.as_str());
                return self.refuse(&client, flow, Verdict::Denied, why, started);
            }
        }

        let connect = tokio::time::timeout(self.connect_timeout, TcpStream::connect(target));
        let upstream = match connect.await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return self.refuse(
                    &client,
                    flow,
                    Verdict::ConnectFailed,
                    e.to_string(),
                    started,
                )
            }
            Err(_) => {
                let why = format!("connect timed out after {:?}", self.connect_timeout);
                return self.refuse(&client, flow, Verdict::ConnectFailed, why, started);
            }
        };
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        self.relayed(flow, started, forward::relay(client, upstream))
            .await;
    }

    /// Carries the connection to a mesh pod on another node through HBONE.
    #[allow(clippy::too_many_arguments)]
    async fn tunnel(
        &self,
        client: TcpStream,
        mut flow: Flow,
        snapshot: &Snapshot,
        dest: &Pod,
        source: SpiffeId,
        destination: SpiffeId,
        target: SocketAddr,
        peer: SocketAddr,
        started: Instant,
    ) {
        let node_ip = dest
            .node_name
            .as_deref()
            .and_then(|n| snapshot.node(n))
            .and_then(|n| n.addresses.iter().find(|a| a.is_ipv4()).copied());
        let Some(node_ip) = node_ip else {
            let why = format!(
                "no address for node {:?} of the destination",
                dest.node_name
            );
            return self.refuse(&client, flow, Verdict::ConnectFailed, why, started);
        };
        let req = Hbone {
            source,
            destination,
            node: SocketAddr::new(node_ip, self.mesh.hbone_port),
            target,
            forwarded_for: peer.ip(),
        };
        let tunnel = match self.mesh.pool.connect(req).await {
            Ok(t) => t,
            Err(e) if e.is_denied() => {
                flow.mtls = true;
                flow.policy = e.policy().map(str::to_string);
                return self.refuse(&client, flow, Verdict::Denied, e.to_string(), started);
            }
            Err(e) => {
                return self.refuse(
                    &client,
                    flow,
                    Verdict::ConnectFailed,
                    e.to_string(),
                    started,
                )
            }
        };
        flow.mtls = true;
        self.relayed(flow, started, tunnel.relay(client)).await;
    }

    /// Resolves where to connect, filling in the flow's destination. `None` when a Service has
    /// no ready endpoint.
    fn pick_target(
        &self,
        snapshot: &Snapshot,
        redirect: &Redirect,
        dest: &mut FlowDestination,
    ) -> Option<(SocketAddr, Option<Arc<Pod>>)> {
        match snapshot.resolve(redirect.original_dst) {
            Destination::Service { service, port } => {
                dest.service = Some(format!("{}/{}", service.namespace, service.name));
                dest.namespace = Some(service.namespace.clone());
                let endpoints = snapshot.endpoints(&service, &port);
                if endpoints.is_empty() {
                    return None;
                }
                let key = format!("{}/{}:{}", service.namespace, service.name, port.port);
                let i = {
                    let mut rr = self.round_robin.lock().unwrap_or_else(|e| e.into_inner());
                    let next = rr.entry(key).or_insert(0);
                    let i = *next % endpoints.len();
                    *next = next.wrapping_add(1);
                    i
                };
                let ep = &endpoints[i];
                dest.pod = Some(ep.pod.name.clone());
                Some((ep.addr, Some(ep.pod.clone())))
            }
            Destination::Pod(pod) => {
                dest.namespace = Some(pod.namespace.clone());
                dest.pod = Some(pod.name.clone());
                Some((redirect.original_dst, Some(pod)))
            }
            Destination::Passthrough => Some((redirect.original_dst, None)),
        }
    }

    /// Runs a relay (counted as active meanwhile) and records how it went.
    async fn relayed(
        &self,
        mut flow: Flow,
        started: Instant,
        relay: impl std::future::Future<Output = forward::Relayed>,
    ) {
        self.active.fetch_add(1, Ordering::Relaxed);
        let relayed = relay.await;
        self.active.fetch_sub(1, Ordering::Relaxed);
        flow.bytes_sent = relayed.sent;
        flow.bytes_received = relayed.received;
        flow.error = relayed.error;
        self.finish(flow, started);
    }

    /// Resets the client connection and records why.
    fn refuse(
        &self,
        client: &TcpStream,
        mut flow: Flow,
        verdict: Verdict,
        why: String,
        started: Instant,
    ) {
        forward::reset(client);
        flow.verdict = verdict;
        flow.error = Some(why);
        self.finish(flow, started);
    }

    fn finish(&self, mut flow: Flow, started: Instant) {
        flow.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
        debug!(
            source = %flow.source.pod.as_deref().unwrap_or("?"),
            original_destination = %flow.original_destination,
            destination = %flow.destination.address.as_deref().unwrap_or("-"),
            verdict = %flow.verdict,
            sent = flow.bytes_sent,
            received = flow.bytes_received,
            error = flow.error.as_deref().unwrap_or(""),
            "flow"
        );
        self.flows.record(flow);
    }

    /// Consumes eBPF redirect events and records a [`Verdict::Unhandled`] flow for every
    /// redirect whose connection never reached the listener.
    pub async fn watch_redirects(
        self: Arc<Self>,
        mut events: tokio::sync::mpsc::Receiver<RedirectEvent>,
    ) {
        let mut sweep = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(ev) => self.tracker.redirected(ev),
                    None => return,
                },
                _ = sweep.tick() => self.report_unhandled(),
            }
        }
    }

    /// Records one `unhandled` flow per (source cgroup, original destination) for the redirects
    /// that waited too long and whose connection never completed. A connection that completed
    /// its handshake has left `BY_COOKIE` (sock_ops moved it), so it reached a listener even if
    /// its event was read late or after a restart: that is not reported.
    fn report_unhandled(&self) {
        let mut groups: Vec<(RedirectEvent, usize)> = Vec::new();
        for ev in self.tracker.expired() {
            if self.capture.pending_by_cookie(ev.redirect.cookie).is_none() {
                continue;
            }
            let same = |(g, _): &&mut (RedirectEvent, usize)| {
                g.redirect.cgroup_id == ev.redirect.cgroup_id
                    && g.redirect.original_dst == ev.redirect.original_dst
            };
            match groups.iter_mut().find(same) {
                Some((_, n)) => *n += 1,
                None => groups.push((ev, 1)),
            }
        }
        for (ev, count) in groups {
            self.record_unhandled(ev, count);
        }
    }

    fn record_unhandled(&self, ev: RedirectEvent, count: usize) {
        let wl = self.workloads.load();
        let pod = wl.by_cgroup(ev.redirect.cgroup_id);
        let snapshot = self.registry.snapshot();
        let mut destination = FlowDestination::default();
        match snapshot.resolve(ev.redirect.original_dst) {
            Destination::Service { service, .. } => {
                destination.namespace = Some(service.namespace.clone());
                destination.service = Some(format!("{}/{}", service.namespace, service.name));
            }
            Destination::Pod(p) => {
                destination.namespace = Some(p.namespace.clone());
                destination.pod = Some(p.name.clone());
            }
            Destination::Passthrough => {}
        }
        debug!(cookie = ev.redirect.cookie, original_destination = %ev.redirect.original_dst,
            count, "redirected connections never reached the proxy");
        let error = match count {
            1 => "redirected by eBPF but the connection never reached the proxy".to_string(),
            n => format!("{n} connections redirected by eBPF never reached the proxy"),
        };
        self.flows.record(Flow {
            seq: 0,
            time: OffsetDateTime::from(ev.time),
            node: self.node_name.clone(),
            source: Source {
                namespace: pod.map(|p| p.namespace.clone()),
                pod: pod.map(|p| p.name.clone()),
                ip: pod.and_then(|p| p.ip),
                identity: None,
            },
            original_destination: ev.redirect.original_dst.to_string(),
            destination,
            protocol: "tcp".into(),
            verdict: Verdict::Unhandled,
            bytes_sent: 0,
            bytes_received: 0,
            duration_ms: 0.0,
            error: Some(error),
            cgroup_id: Some(ev.redirect.cgroup_id),
            mtls: false,
            policy: None,
        });
    }
}

/// Pairs redirect events (by socket cookie) with accepted connections.
#[derive(Default)]
struct RedirectTracker {
    inner: Mutex<TrackerState>,
}

#[derive(Default)]
struct TrackerState {
    /// Events whose connection has not been accepted yet.
    pending: HashMap<u64, (RedirectEvent, Instant)>,
    /// Accepted connections whose event has not been read yet (the ring buffer can lag).
    accepted: HashMap<u64, Instant>,
}

impl RedirectTracker {
    fn accepted(&self, cookie: u64) {
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if s.pending.remove(&cookie).is_none() && s.accepted.len() < TRACKED_MAX {
            s.accepted.insert(cookie, Instant::now());
        }
    }

    fn redirected(&self, ev: RedirectEvent) {
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let cookie = ev.redirect.cookie;
        if s.accepted.remove(&cookie).is_none() && s.pending.len() < TRACKED_MAX {
            s.pending.insert(cookie, (ev, Instant::now()));
        }
    }

    /// Events that waited too long, oldest first; forgets stale accept marks.
    fn expired(&self) -> Vec<RedirectEvent> {
        let now = Instant::now();
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        s.accepted
            .retain(|_, t| now.duration_since(*t) < Duration::from_secs(60));
        let mut out = Vec::new();
        s.pending.retain(|_, (ev, t)| {
            if now.duration_since(*t) >= UNHANDLED_AFTER {
                out.push(ev.clone());
                false
            } else {
                true
            }
        });
        out.sort_by_key(|e| e.time);
        out
    }
}

/// The SPIFFE identity of a pod: `spiffe://<td>/ns/<namespace>/sa/<serviceAccount>`.
pub fn workload_identity(trust_domain: &str, pod: &Pod) -> Option<SpiffeId> {
    SpiffeId::new(trust_domain, &pod.namespace, &pod.service_account).ok()
}

/// Whether a pod takes part in the mesh: its namespace is enrolled and it has its own network
/// (host-network pods share the node's address and are never captured).
pub fn in_mesh(snapshot: &Snapshot, pod: &Pod) -> bool {
    !pod.host_network && snapshot.namespace_enrolled(&pod.namespace)
}

/// Logs the listener address once bound.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    use anyhow::Context;
    let l = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the capture listener {addr}"))?;
    info!(%addr, "capture listener ready");
    Ok(l)
}
