//! Plan (pure): what to do with one redirected connection, decided from the redirect record,
//! the calling workload and the snapshot, before any socket is touched.
//!
//! The original destination is resolved (Service VIP → a ready endpoint, pod IP → that pod,
//! anything else → passthrough). A destination in the mesh is authenticated and authorized:
//! across nodes by HBONE (the destination node decides), on this node right here, with the same
//! step the destination side uses ([`crate::inbound::authorize`]).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use super::balance::Lb;
use super::cluster::{self, Cluster, Clusters, Limits};
use super::hash;
use crate::admin::api::Verdict;
use crate::capture::Redirect;
use crate::identity::SpiffeId;
use crate::inbound::authorize::{authorize, authorize_request, Caller};
use crate::l7::route::{service_fqdn, Backend, RouteTable, Target, TrafficPolicy};
use crate::policy::{deny_message, Decision, DenyReason, HttpRequest, PolicySet};
use crate::registry::kinds::networking::SimpleLb;
use crate::registry::{Endpoint, Labels, Pod, Resolved, Service, ServicePort, Snapshot};
use crate::tunnel::client::Hbone;
use crate::workload::identity_of;

/// What planning reads besides the connection itself.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// This node's name.
    pub node: &'a str,
    pub trust_domain: &'a str,
    /// HBONE port on every node.
    pub hbone_port: u16,
    pub snapshot: &'a Snapshot,
    pub policies: &'a PolicySet,
    pub clusters: &'a Clusters,
    /// VirtualService `tcp[]` rules send a Service's connections elsewhere.
    pub routes: &'a RouteTable,
    /// A uniformly random number for this connection (its weighted TCP route).
    pub roll: u32,
}

/// The calling side, as identified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The pod found from the connection's cgroup.
    pub pod: Option<Arc<Pod>>,
    /// Its SPIFFE identity (every identified pod has one).
    pub identity: Option<SpiffeId>,
    /// The address the connection came from.
    pub ip: IpAddr,
}

/// Where the connection goes, as resolved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Destination {
    /// The Service whose VIP was called.
    pub service: Option<Arc<Service>>,
    /// The pod chosen (a Service endpoint, or the pod whose IP was called).
    pub pod: Option<Arc<Pod>>,
    /// The address to connect to.
    pub address: Option<SocketAddr>,
    /// The destination workload's identity, when it is in the mesh.
    pub identity: Option<SpiffeId>,
    /// The destination (cluster) a Service's endpoint was chosen in, by Istio's name: the
    /// connection is counted there while it lasts.
    pub cluster: Option<String>,
}

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// A mesh pod on this node, and policy allows it: a plain connection (no TLS on the node).
    DeliverLocal { target: SocketAddr },
    /// A mesh pod on another node: a `CONNECT` over mutual TLS to that node's HBONE port.
    Tunnel(Hbone),
    /// Not in the mesh (a pod of an unenrolled namespace, a host-network pod, anything outside
    /// the cluster): a plain connection.
    Passthrough { target: SocketAddr },
    /// Reset the client.
    Refuse(Refusal),
}

/// Why a connection is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The Service has no ready endpoint.
    NoEndpoint,
    /// A mesh destination, but the caller or the destination has no workload identity.
    NoIdentity,
    /// The destination pod's node has no IPv4 address in the registry.
    NoNodeAddress { node: Option<String> },
    /// AuthorizationPolicy of a same-node destination.
    Denied { policy: String, reason: DenyReason },
    /// The destination has as many connections open as its `maxConnections` allows.
    Overflow,
}

impl Refusal {
    /// The flow's verdict.
    pub fn verdict(&self) -> Verdict {
        match self {
            Refusal::NoEndpoint => Verdict::NoEndpoint,
            Refusal::NoIdentity | Refusal::NoNodeAddress { .. } | Refusal::Overflow => {
                Verdict::ConnectFailed
            }
            Refusal::Denied { .. } => Verdict::Denied,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NoEndpoint => f.write_str("service has no ready endpoint"),
            Refusal::NoIdentity => {
                f.write_str("no workload identity for the source or the destination")
            }
            Refusal::NoNodeAddress { node } => {
                write!(f, "no address for node {node:?} of the destination")
            }
            Refusal::Denied { policy, reason } => {
                f.write_str(&deny_message(policy, Some(reason.as_str())))
            }
            Refusal::Overflow => {
                f.write_str("upstream overflow: the destination is at its maxConnections")
            }
        }
    }
}

/// The plan for one connection: who calls, where it goes, what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub source: Source,
    pub destination: Destination,
    pub action: Action,
}

/// Plans a redirected connection from `peer`, attributed to `source` (the pod of its cgroup).
pub fn plan(
    redirect: &Redirect,
    peer: SocketAddr,
    source: Option<Arc<Pod>>,
    ctx: &Context<'_>,
) -> Plan {
    let source = Source {
        identity: source
            .as_deref()
            .and_then(|p| identity_of(ctx.trust_domain, p)),
        pod: source,
        ip: peer.ip(),
    };
    let mut destination = Destination::default();
    let action = decide(redirect, &source, &mut destination, ctx);
    Plan {
        source,
        destination,
        action,
    }
}

fn decide(
    redirect: &Redirect,
    source: &Source,
    dest: &mut Destination,
    ctx: &Context<'_>,
) -> Action {
    let original = redirect.original_dst;
    let (target, pod) = match ctx.snapshot.resolve(original) {
        Resolved::Service { service, port } => {
            let called = service_fqdn(&service.namespace, &service.name);
            let (routed, port, subset, subset_name) =
                match tcp_route(&called, original, source, ctx) {
                    Some(Ok(routed)) => routed,
                    Some(Err(())) => {
                        dest.service = Some(service);
                        return Action::Refuse(Refusal::NoEndpoint);
                    }
                    None => (service.clone(), port, None, None),
                };
            // The host's name is made once, unless a route sent the connection elsewhere.
            let host = if Arc::ptr_eq(&routed, &service) {
                called
            } else {
                service_fqdn(&routed.namespace, &routed.name)
            };
            let service = routed;
            let mut endpoints = ctx.snapshot.endpoints(&service, &port);
            if let Some(labels) = &subset {
                endpoints.retain(|e| e.pod.matches(labels));
            }
            let name = cluster::name(port.port, subset_name.as_deref(), &host);
            dest.service = Some(service);
            // The destination's DestinationRule: how an endpoint is chosen, how many
            // connections it may have.
            let ns = source.pod.as_ref().map(|p| p.namespace.as_str());
            let policy = ctx
                .routes
                .policy(&host, port.port, subset_name.as_deref(), ns)
                .unwrap_or_default();
            let cluster = ctx.clusters.get(&name);
            dest.cluster = Some(name);
            if !cluster.admits_new_connection(&Limits::of(policy.connection_pool.as_ref())) {
                // Counted when carried out (an HTTP connection is served all the same).
                return Action::Refuse(Refusal::Overflow);
            }
            let simple = policy.load_balancer.as_ref().and_then(|l| l.simple);
            if simple == Some(SimpleLb::Passthrough) {
                // Envoy's original destination: the address called, no balancing.
                return to_endpoint(source, original, None, dest, ctx, None);
            }
            let Some(i) = choose_endpoint(&cluster, &endpoints, &policy, source, ctx.roll) else {
                dest.cluster = None;
                return Action::Refuse(Refusal::NoEndpoint);
            };
            let ep = &endpoints[i];
            (ep.addr, Some(ep.pod.clone()))
        }
        Resolved::Pod(pod) => (original, Some(pod)),
        Resolved::Passthrough => (original, None),
    };
    to_endpoint(source, target, pod, dest, ctx, None)
}

/// The endpoint a TCP connection goes to, as the destination's `loadBalancer` says: round
/// robin, random, least connections (`LEAST_REQUEST`, Istio's default: the one with fewer
/// connections open of two drawn), or a consistent hash of the client's address
/// (`useSourceIp`; other keys are HTTP's: random). `roll` draws.
fn choose_endpoint(
    cluster: &Cluster,
    endpoints: &[Endpoint],
    policy: &TrafficPolicy,
    source: &Source,
    roll: u32,
) -> Option<usize> {
    let lb = policy.load_balancer.as_ref();
    let hashing = lb
        .and_then(|l| l.consistent_hash.as_ref())
        .and_then(hash::Policy::of)
        .filter(|p| p.key == hash::Key::SourceIp);
    if let Some(p) = hashing {
        let addrs: Vec<SocketAddr> = endpoints.iter().map(|e| e.addr).collect();
        let table = cluster.table(p.kind, &addrs);
        return table.lookup(hash::hash(source.ip.to_string().as_bytes()));
    }
    let open = |i: usize| {
        cluster
            .endpoint(endpoints[i].addr)
            .connections
            .load(std::sync::atomic::Ordering::Relaxed) as usize
    };
    let second = roll.rotate_left(16) ^ 0x9e37_79b9;
    Lb::of(lb).choose(endpoints.len(), cluster.round_tcp(), open, (roll, second))
}

/// Where a VirtualService `tcp[]` rule sends a connection to the Service `host`: the Service,
/// port and subset (labels and name) of its weighted destination; `Some(Err)` when that
/// destination has no Service port (nothing to connect to); `None` when no rule applies.
#[allow(clippy::type_complexity)]
fn tcp_route(
    host: &str,
    original: SocketAddr,
    source: &Source,
    ctx: &Context<'_>,
) -> Option<Result<(Arc<Service>, ServicePort, Option<Labels>, Option<String>), ()>> {
    let ns = source.pod.as_ref().map(|p| p.namespace.as_str());
    let labels = source.pod.as_ref().map(|p| &p.labels);
    let rule = ctx.routes.route_tcp(host, original, ns, labels)?;
    let d = rule.pick(ctx.roll);
    let backend = ctx.routes.backend(
        &d.host,
        d.port.or(Some(original.port())),
        d.subset.as_deref(),
        ns,
    );
    Some(match backend {
        Some(Backend {
            target: Target::Service { service, port },
            subset_labels,
            ..
        }) => Ok((service, port, subset_labels, d.subset.clone())),
        _ => Err(()),
    })
}

/// What to do to reach `target` (on `pod`, if it is one) for `source`: the step after an
/// endpoint is chosen, shared by a connection's plan and each HTTP request's (`http`: a
/// same-node destination authorizes the request itself). Fills in `dest`'s address, pod and
/// identity.
pub fn to_endpoint(
    source: &Source,
    target: SocketAddr,
    pod: Option<Arc<Pod>>,
    dest: &mut Destination,
    ctx: &Context<'_>,
    http: Option<&HttpRequest<'_>>,
) -> Action {
    dest.address = Some(target);
    dest.pod = pod.clone();
    let Some(pod) = pod.filter(|p| ctx.snapshot.in_mesh(p)) else {
        return Action::Passthrough { target };
    };
    dest.identity = identity_of(ctx.trust_domain, &pod);
    let (Some(source_id), Some(dest_id)) = (&source.identity, &dest.identity) else {
        return Action::Refuse(Refusal::NoIdentity);
    };
    if pod.node_name.as_deref() != Some(ctx.node) {
        let node_ip = pod
            .node_name
            .as_deref()
            .and_then(|n| ctx.snapshot.node(n))
            .and_then(|n| n.ipv4());
        let Some(node_ip) = node_ip else {
            return Action::Refuse(Refusal::NoNodeAddress {
                node: pod.node_name.clone(),
            });
        };
        return Action::Tunnel(Hbone {
            source: source_id.clone(),
            destination: dest_id.clone(),
            node: SocketAddr::new(node_ip, ctx.hbone_port),
            target,
            forwarded_for: source.ip,
        });
    }
    let caller = Caller {
        identity: source_id,
        ip: Some(source.ip),
    };
    let decision = match http {
        Some(http) => authorize_request(ctx.policies, &pod, target, &caller, http),
        None => authorize(ctx.policies, &pod, target, &caller),
    };
    match decision {
        Decision::Allow => Action::DeliverLocal { target },
        Decision::Deny { policy, reason } => Action::Refuse(Refusal::Denied { policy, reason }),
    }
}

/// Whether a same-node connection to `target`, delivered when it opened, may stay open under
/// the snapshot and policies of `ctx` (this node authorized it, so this node re-decides it when
/// they change): `None` if so, else why it is closed. A destination that is gone, or no longer
/// in the mesh, is left alone: there is nothing left to enforce on it.
pub fn still_delivered(source: &Source, target: SocketAddr, ctx: &Context<'_>) -> Option<String> {
    let Resolved::Pod(pod) = ctx.snapshot.resolve(target) else {
        return None;
    };
    let mut dest = Destination::default();
    match to_endpoint(source, target, Some(pod), &mut dest, ctx, None) {
        Action::Refuse(Refusal::Denied { policy, .. }) => {
            Some(format!("closed: now denied by {policy}"))
        }
        Action::Refuse(refusal) => Some(format!("closed: {refusal}")),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
