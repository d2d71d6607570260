//! The outbound path, on the source node: accept a redirected connection on the capture
//! listener, find its original destination and its calling workload, [`plan::plan`] it (pure),
//! then do what the plan says — deliver on this node, tunnel to another node over HBONE, pass
//! through, or refuse — and record it.
//!
//! - [`plan`]: the decision, unit-tested without sockets.
//! - [`cluster`]: what every sender to a destination shares (balancing, budget, counters);
//!   [`balance`]: endpoint choice; [`budget`]: each destination's retry budget;
//!   [`outlier`]: outlier detection's decisions; [`hash`]: consistent-hash tables;
//!   [`locality`]: locality failover and distribution.
//! - [`redirects`]: redirects that never became connections (`unhandled` flows).
//!
//! May import: `inputs`, `capture`, `workload`, `registry`, `policy`, `identity`, `inbound`
//! (the shared authorization step), `tunnel` (client), `upstream`, `relay`, `telemetry`, `limits`,
//! `admin::api`.

mod admission;
pub mod balance;
pub mod budget;
pub mod cluster;
pub mod hash;
pub mod http;
pub mod locality;
pub mod outlier;
pub mod plan;
pub mod redirects;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, warn};

use self::cluster::Clusters;
use self::http::{declared_http, Called, Declared, HttpConfig, HttpPath};
use self::plan::{Action, Context, Plan, Refusal};
use self::redirects::RedirectTracker;
use crate::admin::api::Verdict;
use crate::capture::{Capture, RedirectEvent};
use crate::exchange::ClientVersion;
use crate::inputs::ProxyInputs;
use crate::l7::protocol::{self, AppProtocol};
use crate::l7::route::RouteTable;
use crate::l7::sniff::{sniff, Sniffed};
use crate::limits::Slot;
use crate::policy::{deny_message, PolicySet};
use crate::registry::{Resolved, Snapshot};
use crate::relay::{either, relay_between, reset, Relayed};
use crate::telemetry::istio::Reporter;
use crate::telemetry::ConnectionRecord;
use crate::tunnel::client::Pool;
use crate::upstream::{KeepaliveLater, OnBehalfOf};

/// The capture listener's side of the data path.
pub struct Outbound {
    inputs: Arc<ProxyInputs>,
    capture: Arc<Capture>,
    pool: Pool,
    clusters: Arc<Clusters>,
    tracker: Arc<RedirectTracker>,
    http: Arc<HttpPath>,
    /// Wait for the first bytes of a connection to a port that declares no protocol.
    detection_timeout: Duration,
    /// A relay that moves nothing for this long is closed (`None`: never), unless its
    /// destination's DestinationRule says otherwise.
    idle_timeout: Option<Duration>,
}

/// How long a client of a port declared HTTP may take to send its first bytes (hyper's own
/// header timeout takes over from there).
const DECLARED_HTTP_FIRST_BYTES: Duration = Duration::from_secs(30);

impl Outbound {
    pub fn new(
        inputs: Arc<ProxyInputs>,
        capture: Arc<Capture>,
        pool: Pool,
        clusters: Arc<Clusters>,
        http: HttpConfig,
        detection_timeout: Duration,
    ) -> Outbound {
        Outbound {
            http: Arc::new(HttpPath::new(
                inputs.clone(),
                pool.clone(),
                clusters.clone(),
                http,
            )),
            inputs,
            capture,
            pool,
            clusters,
            tracker: Arc::default(),
            detection_timeout,
            idle_timeout: None,
        }
    }

    /// Closes relays idle for `timeout` (`--idle-timeout`).
    pub fn with_idle_timeout(mut self, timeout: Option<Duration>) -> Outbound {
        self.idle_timeout = timeout;
        self
    }

    /// Accepts redirected connections until the listening socket is handed to a successor
    /// (what was accepted is served on, to its end or the drain timeout).
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let draining = self.inputs.draining.clone();
        // Bound to one address (the capture address), every accepted connection's local
        // address is the listener's: no getsockname(2) per connection.
        let bound = listener
            .local_addr()
            .ok()
            .filter(|a| !a.ip().is_unspecified());
        let handed_over = draining.handed_over();
        tokio::pin!(handed_over);
        loop {
            let accepted = tokio::select! {
                biased;
                _ = &mut handed_over => return,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((conn, peer)) => {
                    let this = self.clone();
                    let hold = draining.hold();
                    // Counted from accept: none left, it is refused once identified.
                    let slot = self.inputs.telemetry.admission.capture.admit();
                    tokio::spawn(async move {
                        this.handle(conn, peer, bound, slot).await;
                        drop(hold);
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Reports the redirects whose connection never arrived, from the kernel's events.
    pub async fn watch_redirects(
        self: Arc<Self>,
        events: tokio::sync::mpsc::Receiver<RedirectEvent>,
    ) {
        redirects::watch(
            self.inputs.clone(),
            self.capture.clone(),
            self.tracker.clone(),
            events,
        )
        .await
    }

    async fn handle(
        &self,
        client: TcpStream,
        peer: SocketAddr,
        bound: Option<SocketAddr>,
        slot: Option<Slot<u64>>,
    ) {
        let local = match bound.map_or_else(|| client.local_addr(), Ok) {
            Ok(a) => a,
            Err(e) => {
                debug!(error = %e, "connection gone before it could be identified");
                return;
            }
        };
        let inputs = &self.inputs;
        let mut record = ConnectionRecord::accepted(&inputs.telemetry);
        record.reporter(Reporter::Source).source_ip(peer.ip());
        let Some(redirect) = self.capture.take_redirect(peer, local) else {
            debug!(%peer, "connection without a redirect record: original destination unknown, closing");
            reset(&client);
            record.finish(
                Verdict::Unidentified,
                Some("no eBPF redirect record for this connection"),
            );
            return;
        };
        self.tracker.accepted(redirect.cookie);
        record
            .original_destination(redirect.original_dst)
            .cgroup(redirect.cgroup_id);

        // Identify: the cgroup decides who is calling, not the source address.
        let source = inputs
            .workloads
            .load()
            .by_cgroup(redirect.cgroup_id)
            .cloned();
        if let Some(pod) = &source {
            if pod.ip.is_some_and(|ip| ip != peer.ip()) {
                warn!(pod = %format!("{}/{}", pod.namespace, pod.name), %peer,
                    "source address differs from the pod's registered IP; identified by cgroup");
            }
        }
        let _slot = match self.admit(slot, redirect.cgroup_id, source.as_deref()) {
            Ok(slot) => slot,
            Err(why) => {
                reset(&client);
                if let Some(pod) = &source {
                    record.source_pod(pod);
                }
                record.finish(Verdict::OverLimit, Some(why));
                return;
            }
        };
        // Heard from before the decision: a same-node connection is decided again on each change.
        let policy_changes = inputs.policy_generation.subscribe();
        let snapshot = inputs.registry.snapshot();
        let policies = inputs.policies.load();
        let routes = inputs.routes.load();
        let plan = plan::plan(
            &redirect,
            peer,
            source,
            &context(
                inputs,
                &self.clusters,
                &snapshot,
                &policies,
                &routes,
                fastrand::u32(..),
            ),
        );
        let called = match snapshot.resolve(redirect.original_dst) {
            Resolved::Service { service, port } => Called::Service { service, port },
            Resolved::Pod(pod) => Called::Pod {
                pod,
                addr: redirect.original_dst,
            },
            Resolved::Passthrough => Called::Other {
                addr: redirect.original_dst,
            },
        };
        drop((snapshot, policies, routes));
        fill(&mut record, &plan);
        if !matches!(plan.action, Action::Refuse(Refusal::NoIdentity)) {
            if let Some((version, declared)) = self.http_version(&client, &called).await {
                record.protocol("http");
                // Each path boxed, at its own size: a connection's task is allocated (and moved)
                // at the size of its largest, so inline they would make every TCP connection
                // carry the HTTP server's state and every HTTP connection the relay's (kilobytes
                // an idle keep-alive connection holds for its life).
                Box::pin(
                    self.http
                        .serve(client, version, plan.source, called, declared, record),
                )
                .await;
                return;
            }
        }
        Box::pin(self.execute(client, plan, record, policy_changes)).await;
    }

    /// Waits until the snapshot and policies in force would no longer deliver a same-node
    /// connection from `source` to `target`; returns why.
    async fn revoked(
        &self,
        source: &plan::Source,
        target: SocketAddr,
        mut changes: watch::Receiver<u64>,
    ) -> String {
        let inputs = &self.inputs;
        loop {
            if changes.changed().await.is_err() {
                return std::future::pending().await;
            }
            let snapshot = inputs.registry.snapshot();
            let policies = inputs.policies.load();
            let routes = inputs.routes.load();
            let ctx = context(inputs, &self.clusters, &snapshot, &policies, &routes, 0);
            if let Some(why) = plan::still_delivered(source, target, &ctx) {
                return why;
            }
        }
    }

    /// Whether the connection is HTTP, and which: the port's declared protocol, else the
    /// client's first bytes.
    async fn http_version(
        &self,
        client: &TcpStream,
        called: &Called,
    ) -> Option<(ClientVersion, Option<Declared>)> {
        let declared = match called {
            Called::Service { port, .. } => protocol::declared(port),
            Called::Other { addr } => {
                let routes = self.inputs.routes.load();
                routes
                    .external_by_address(addr.ip(), addr.port())
                    .and_then(|e| e.ports.iter().find(|p| p.number == addr.port()))
                    .and_then(|p| protocol::declared_by_name(&p.protocol))
            }
            Called::Pod { .. } => None,
        };
        let (wait, declared) = match declared {
            Some(AppProtocol::Opaque) => return None,
            Some(p) => (DECLARED_HTTP_FIRST_BYTES, declared_http(p)),
            None if self.detection_timeout.is_zero() => return None,
            None => (self.detection_timeout, None),
        };
        match detect(client, wait).await {
            Sniffed::Http2 => Some((ClientVersion::Http2, declared)),
            Sniffed::Http1 => Some((ClientVersion::Http1, declared)),
            // A port declared HTTP is served as HTTP even so: garbage gets 400.
            _ if declared.is_some() => Some((ClientVersion::Http1, declared)),
            _ => None,
        }
    }

    /// Does what `plan` says, and finishes the record.
    async fn execute(
        &self,
        client: TcpStream,
        plan: Plan,
        mut record: ConnectionRecord,
        policy_changes: watch::Receiver<u64>,
    ) {
        let on_behalf = match &plan.source.pod {
            Some(pod) => OnBehalfOf::Pod(pod),
            None => OnBehalfOf::Unidentified,
        };
        // Counted open in its destination while it lasts (`maxConnections`, least connections).
        let _open = match (&plan.destination.cluster, plan.destination.address) {
            (Some(name), Some(addr)) if !matches!(plan.action, Action::Refuse(_)) => {
                let cluster = self.clusters.get(name);
                let endpoint = cluster.endpoint(addr);
                Some(cluster::Open::start(&cluster, &endpoint))
            }
            _ => None,
        };
        let idle = self.idle_timeout(&plan);
        let (target, local) = match plan.action {
            Action::Refuse(refusal) => {
                reset(&client);
                if let (plan::Refusal::Overflow, Some(name)) = (&refusal, &plan.destination.cluster)
                {
                    cluster::inc(&self.clusters.get(name).stats.cx_overflow);
                }
                if let plan::Refusal::Denied { policy, .. } = &refusal {
                    record.policy(policy.clone());
                }
                record.finish(refusal.verdict(), Some(refusal));
                return;
            }
            Action::Tunnel(hbone) => {
                match self.pool.connect_for(hbone, &client).await {
                    Ok(tunnel) => {
                        let cut = self.inputs.draining.cut();
                        record
                            .mtls()
                            .relay(tunnel.relay_bounded(client, cut, idle))
                            .await;
                        record.finish(Verdict::Forwarded, None::<&str>);
                    }
                    Err(e) if e.is_denied() => {
                        reset(&client);
                        let message =
                            deny_message(e.policy().unwrap_or("(unnamed)"), e.deny_reason());
                        record.mtls();
                        if let Some(policy) = e.policy() {
                            record.policy(policy);
                        }
                        record.finish(Verdict::Denied, Some(message));
                    }
                    Err(e) => {
                        reset(&client);
                        record.finish(Verdict::ConnectFailed, Some(e));
                    }
                }
                return;
            }
            Action::DeliverLocal { target } => (target, true),
            Action::Passthrough { target } => (target, false),
        };
        match self
            .inputs
            .connector
            .connect_relayed(on_behalf, target)
            .await
        {
            Ok((upstream, keepalive)) if local => {
                // This node authorized it: when the policies change so that it would not be
                // authorized now, it is closed (the client's next connection is decided anew).
                let revoked = self.revoked(&plan.source, target, policy_changes);
                let cut = self.inputs.draining.cut();
                record
                    .relay(relay(client, upstream, keepalive, revoked, cut, idle))
                    .await;
                record.finish(Verdict::Forwarded, None::<&str>);
            }
            Ok((upstream, keepalive)) => {
                let cut = self.inputs.draining.cut();
                let never = std::future::pending();
                record
                    .relay(relay(client, upstream, keepalive, never, cut, idle))
                    .await;
                record.finish(Verdict::Forwarded, None::<&str>);
            }
            Err(e) => {
                reset(&client);
                record.finish(Verdict::ConnectFailed, Some(e));
            }
        }
    }
}

/// Relays `client` ⇄ `upstream` ([`relay_between`]) with the upstream's keepalive armed, and
/// closes both as it returns: a FIN left to the close goes before the flow is recorded.
async fn relay(
    client: TcpStream,
    upstream: TcpStream,
    keepalive: KeepaliveLater,
    stop: impl Future<Output = String>,
    close: impl Future<Output = String>,
    idle: Option<Duration>,
) -> Relayed {
    let stop = pin!(either(stop, keepalive.arm(&upstream)));
    relay_between(&client, &upstream, stop, pin!(close), idle).await
}

/// What a plan is decided with: this node's inputs and the tables in force.
fn context<'a>(
    inputs: &'a ProxyInputs,
    clusters: &'a Clusters,
    snapshot: &'a Snapshot,
    policies: &'a PolicySet,
    routes: &'a RouteTable,
    roll: u32,
) -> Context<'a> {
    Context {
        node: &inputs.node,
        trust_domain: &inputs.trust_domain,
        hbone_port: inputs.hbone_port,
        snapshot,
        policies,
        clusters,
        routes,
        roll,
    }
}

/// What the plan knows about both ends, into the record.
fn fill(record: &mut ConnectionRecord, plan: &Plan) {
    if let Some(pod) = &plan.source.pod {
        record.source_pod(pod);
    }
    if let Some(id) = &plan.source.identity {
        record.source_identity(id);
    }
    let d = &plan.destination;
    if let Some(service) = &d.service {
        record.service(service);
    }
    if let Some(pod) = &d.pod {
        record.destination_pod(pod);
    }
    if let Some(addr) = d.address {
        record.destination_address(addr);
    }
    if let Some(id) = &d.identity {
        record.destination_identity(id);
    }
    if matches!(plan.action, Action::DeliverLocal { .. }) {
        record.delivered_here();
    }
}

/// Reads (without consuming) the client's first bytes until they tell HTTP from anything else,
/// for at most `wait`.
async fn detect(client: &TcpStream, wait: Duration) -> Sniffed {
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = vec![0u8; 8192];
    loop {
        let n = match tokio::time::timeout_at(deadline, client.peek(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => return Sniffed::Other,
        };
        match sniff(&buf[..n]) {
            Sniffed::NeedMore if n < buf.len() => {
                // Part of a request line: wait a little for the rest.
                if tokio::time::Instant::now() >= deadline {
                    return Sniffed::Other;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Sniffed::NeedMore => return Sniffed::Other,
            decided => return decided,
        }
    }
}
