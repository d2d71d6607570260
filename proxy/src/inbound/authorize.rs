//! The destination side's decision, pure: what an authenticated caller may reach, and whether
//! its policy lets it. One step for both ways a connection reaches a mesh pod: an HBONE tunnel
//! from another node, and a same-node call the source node delivers itself.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::identity::SpiffeId;
use crate::l7::protocol::AppProtocol;
use crate::policy::{
    ConnRequest, ConnectionDecision, Decision, DenyReason, HttpRequest, PolicySet, Protocol,
};
use crate::registry::{Pod, Service, ServicePort, Snapshot, TargetPort};

/// Who is calling, as the destination side knows it.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    /// Verified identity (peer certificate across nodes, cgroup on the same node).
    pub identity: &'a SpiffeId,
    /// The calling pod's address: from the cgroup on the same node; across nodes, the
    /// `Forwarded: for=` address once [`verified_source_ip`] vouched for it, else `None`
    /// (policies then fail closed on addresses).
    pub ip: Option<IpAddr>,
}

/// Whether `caller` may connect to `target` (a port of `destination`): AuthorizationPolicy,
/// with the deciding policy when it denies.
pub fn authorize(
    policies: &PolicySet,
    destination: &Pod,
    target: SocketAddr,
    caller: &Caller<'_>,
) -> Decision {
    let principal = caller.identity.principal();
    policies.authorize(&conn_request(destination, target, caller, &principal))
}

/// Whether `caller` may send the HTTP request `http` to `target` (a port of `destination`).
pub fn authorize_request(
    policies: &PolicySet,
    destination: &Pod,
    target: SocketAddr,
    caller: &Caller<'_>,
    http: &HttpRequest<'_>,
) -> Decision {
    let principal = caller.identity.principal();
    policies.authorize_request(&conn_request(destination, target, caller, &principal), http)
}

fn conn_request<'a>(
    destination: &'a Pod,
    target: SocketAddr,
    caller: &Caller<'_>,
    principal: &'a str,
) -> ConnRequest<'a> {
    ConnRequest {
        destination,
        destination_port: target.port(),
        destination_ip: Some(target.ip()),
        source_principal: Some(principal),
        source_namespace: None,
        source_ip: caller.ip,
    }
}

/// What becomes of an inbound tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Connect to the pod and relay; with `per_request`, what the connection carries decides:
    /// each HTTP request is authorized on its own, anything else as TCP.
    Deliver { pod: Arc<Pod>, per_request: bool },
    /// The target is not a pod hosted on this node: this is no open relay.
    NotHere,
    /// A policy refuses it: the deciding policy and why.
    Denied {
        pod: Arc<Pod>,
        policy: String,
        reason: DenyReason,
    },
}

/// Decides an inbound tunnel to `target` from `caller`, on node `node`.
pub fn admit(
    snapshot: &Snapshot,
    policies: &PolicySet,
    node: &str,
    target: SocketAddr,
    caller: &Caller<'_>,
) -> Admission {
    let Some(pod) = local_pod(snapshot, node, target) else {
        return Admission::NotHere;
    };
    // The tunnel may carry HTTP: decide now only what holds whatever its requests are.
    let principal = caller.identity.principal();
    let req = conn_request(&pod, target, caller, &principal);
    match policies.authorize_connection(&req, Protocol::Http) {
        ConnectionDecision::Allow => Admission::Deliver {
            pod,
            per_request: false,
        },
        ConnectionDecision::PerRequest => Admission::Deliver {
            pod,
            per_request: true,
        },
        ConnectionDecision::Deny { policy, reason } => Admission::Denied {
            pod,
            policy,
            reason,
        },
    }
}

/// The Services selecting `pod` with a TCP port whose target is `port` (the pod's port), and
/// that port of each, in Service order.
pub fn services_of<'a>(
    snapshot: &'a Snapshot,
    pod: &'a Pod,
    port: u16,
) -> impl Iterator<Item = (&'a Arc<Service>, &'a ServicePort)> + 'a {
    let start = snapshot
        .services
        .partition_point(|s| s.namespace.as_str() < pod.namespace.as_str());
    snapshot.services[start..]
        .iter()
        .take_while(|s| s.namespace == pod.namespace)
        .filter(|s| s.selector.as_ref().is_some_and(|sel| pod.matches(sel)))
        .flat_map(|s| s.ports.iter().map(move |p| (s, p)))
        .filter(|(_, p)| p.protocol == "TCP")
        .filter(move |(_, p)| match &p.target_port {
            TargetPort::Number(n) => *n == port,
            TargetPort::Name(name) => pod.named_port(name, "TCP") == Some(port),
        })
}

/// Whether a Service selecting `pod` declares `port` (its target port) as HTTP: then this
/// node serves the tunnel's requests one by one, to report each (Istio's destination-side
/// request metrics, the server span) as a destination sidecar would. Ports declared otherwise,
/// or by no Service, are relayed as bytes (no waiting for a server-first protocol's first
/// bytes).
pub fn declared_http(snapshot: &Snapshot, pod: &Pod, port: u16) -> bool {
    services_of(snapshot, pod, port).any(|(_, p)| {
        matches!(
            crate::l7::protocol::declared(p),
            Some(AppProtocol::Http1 | AppProtocol::Http2 | AppProtocol::Grpc)
        )
    })
}

/// Of `services` (those selecting the pod a request reached), the one the request's
/// `authority` names (`name`, `name.namespace`, `…svc`, `…svc.<domain>`, with or without a
/// port), else the first: the request's `destination_service`.
pub fn service_for_authority<'a>(
    services: &'a [Arc<Service>],
    authority: &str,
) -> Option<&'a Arc<Service>> {
    let host = match authority.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    };
    let names = |s: &Service| {
        let fqdn = format!(
            "{}.{}.svc.{}",
            s.name,
            s.namespace,
            crate::registry::CLUSTER_DOMAIN
        );
        host == s.name
            || fqdn
                .strip_prefix(host)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
                && host.starts_with(&format!("{}.{}", s.name, s.namespace))
    };
    services
        .iter()
        .find(|s| names(s))
        .or_else(|| services.first())
}

/// The pod at `target` if `node` hosts it.
pub fn local_pod(snapshot: &Snapshot, node: &str, target: SocketAddr) -> Option<Arc<Pod>> {
    snapshot
        .pod_by_ip(target.ip())
        .filter(|p| p.node_name.as_deref() == Some(node))
        .cloned()
}

/// The source address of a tunnel from another node, if it can be trusted. The `Forwarded:
/// for=` address is the calling node's claim; it is believed only when the registry has a pod
/// there that runs as the certificate's identity (namespace and service account) and either
/// is hosted on the node the tunnel comes from or is the tunnel's own source address. Anything
/// else (no claim, an address of no pod, a pod of another identity or another node) is unknown:
/// a node cannot lend its callers another address to dodge a DENY on `ipBlocks`.
pub fn verified_source_ip(
    snapshot: &Snapshot,
    peer: &SpiffeId,
    peer_addr: SocketAddr,
    claimed: Option<IpAddr>,
) -> Option<IpAddr> {
    let ip = claimed?.to_canonical();
    let pod = snapshot.pod_by_ip(ip)?;
    if pod.namespace != peer.namespace() || pod.service_account != peer.service_account() {
        return None;
    }
    let from = peer_addr.ip().to_canonical();
    let on_that_node = pod
        .node_name
        .as_deref()
        .and_then(|n| snapshot.node(n))
        .is_some_and(|n| n.addresses.iter().any(|a| a.to_canonical() == from));
    (on_that_node || from == ip).then_some(ip)
}

/// The calling pod, as far as the registry agrees with the verified identity: the pod at the
/// caller's address, if it runs as that identity's namespace and service account.
pub fn calling_pod(snapshot: &Snapshot, caller: &Caller<'_>) -> Option<Arc<Pod>> {
    caller
        .ip
        .and_then(|ip| snapshot.pod_by_ip(ip))
        .filter(|p| {
            p.namespace == caller.identity.namespace()
                && p.service_account == caller.identity.service_account()
        })
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::fixtures::CLUSTER;

    fn setup(extra: &str) -> (Snapshot, PolicySet) {
        let s = Snapshot::from_yaml(&format!("{CLUSTER}---\n{extra}")).unwrap();
        let p = PolicySet::build(&s, "istio-system");
        (s, p)
    }

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    const CLIENT: &str = "spiffe://cluster.local/ns/front/sa/client";
    const ALLOW_CLIENT: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-client, namespace: back}\nspec:\n  rules:\n  - from:\n    - source: {principals: [cluster.local/ns/front/sa/client]}\n";

    #[test]
    fn a_claimed_source_address_must_be_a_pod_of_the_peer_on_the_peer_node() {
        let (s, _) = setup("");
        let client = id(CLIENT);
        let node_a: SocketAddr = "172.30.0.11:40000".parse().unwrap();
        let node_b: SocketAddr = "172.30.0.12:40000".parse().unwrap();
        let check = |peer: &SpiffeId, from: SocketAddr, claim: Option<&str>| {
            verified_source_ip(&s, peer, from, claim.map(|c| c.parse().unwrap()))
        };
        let client_ip = Some("10.244.1.2".parse().unwrap());
        // front/client runs on node-a as front/client.
        assert_eq!(check(&client, node_a, Some("10.244.1.2")), client_ip);
        assert_eq!(
            check(&client, node_a, Some("::ffff:10.244.1.2")),
            client_ip,
            "IPv4-mapped"
        );
        // The tunnel comes from the pod's own address.
        let own: SocketAddr = "10.244.1.2:40000".parse().unwrap();
        assert_eq!(check(&client, own, Some("10.244.1.2")), client_ip);
        // No claim, or a claim for an address of no pod.
        assert_eq!(check(&client, node_a, None), None);
        assert_eq!(check(&client, node_a, Some("10.244.9.9")), None);
        // Another identity's pod (back/web-0, on node-b) claimed by node-b for front/client.
        assert_eq!(check(&client, node_b, Some("10.244.2.2")), None);
        // The right pod, claimed by another node.
        assert_eq!(check(&client, node_b, Some("10.244.1.2")), None);
    }

    #[test]
    fn only_pods_of_this_node_are_reachable() {
        let (s, p) = setup("");
        let caller = Caller {
            identity: &id(CLIENT),
            ip: Some("10.244.1.2".parse().unwrap()),
        };
        let here = "10.244.2.2:8080".parse().unwrap();
        let elsewhere = "10.244.1.3:8080".parse().unwrap();
        let nobody = "10.244.9.9:8080".parse().unwrap();
        assert!(matches!(
            admit(&s, &p, "node-b", here, &caller),
            Admission::Deliver { pod, .. } if pod.name == "web-0"
        ));
        assert_eq!(
            admit(&s, &p, "node-b", elsewhere, &caller),
            Admission::NotHere
        );
        assert_eq!(admit(&s, &p, "node-b", nobody, &caller), Admission::NotHere);
    }

    #[test]
    fn the_deciding_policy_comes_with_the_denial() {
        let (s, p) = setup(ALLOW_CLIENT);
        let other = id("spiffe://cluster.local/ns/front/sa/other");
        let caller = Caller {
            identity: &other,
            ip: None,
        };
        let target = "10.244.2.2:8080".parse().unwrap();
        match admit(&s, &p, "node-b", target, &caller) {
            Admission::Denied {
                pod,
                policy,
                reason,
            } => {
                assert_eq!(pod.name, "web-0");
                assert_eq!(policy, "back/allow-client");
                assert_eq!(reason, DenyReason::NotAllowed);
            }
            other => panic!("{other:?}"),
        }
        let client = id(CLIENT);
        let caller = Caller {
            identity: &client,
            ip: None,
        };
        assert!(matches!(
            admit(&s, &p, "node-b", target, &caller),
            Admission::Deliver { .. }
        ));
    }

    #[test]
    fn same_node_authorization_is_the_same_decision() {
        let (s, p) = setup(ALLOW_CLIENT);
        let web1 = s.pod("back", "web-1").unwrap().clone();
        let target = "10.244.1.3:8080".parse().unwrap();
        let other = id("spiffe://cluster.local/ns/front/sa/other");
        let denied = authorize(
            &p,
            &web1,
            target,
            &Caller {
                identity: &other,
                ip: Some("10.244.1.2".parse().unwrap()),
            },
        );
        assert!(!denied.is_allow());
        let client = id(CLIENT);
        let allowed = authorize(
            &p,
            &web1,
            target,
            &Caller {
                identity: &client,
                ip: Some("10.244.1.2".parse().unwrap()),
            },
        );
        assert!(allowed.is_allow());
    }

    #[test]
    fn the_caller_s_source_ip_reaches_ip_block_rules() {
        let deny_ip = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-ip, namespace: back}\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source: {ipBlocks: [10.244.1.0/24]}\n";
        let (s, p) = setup(deny_ip);
        let client = id(CLIENT);
        let target = "10.244.2.2:8080".parse().unwrap();
        let from = |ip: &str| Caller {
            identity: &client,
            ip: Some(ip.parse().unwrap()),
        };
        assert!(matches!(
            admit(&s, &p, "node-b", target, &from("10.244.1.2")),
            Admission::Denied { .. }
        ));
        assert!(matches!(
            admit(&s, &p, "node-b", target, &from("10.244.3.2")),
            Admission::Deliver { .. }
        ));
    }

    #[test]
    fn the_calling_pod_must_match_the_identity() {
        let (s, _) = setup("");
        let client = id(CLIENT);
        let at = |ip: &str| Caller {
            identity: &client,
            ip: Some(ip.parse().unwrap()),
        };
        assert_eq!(
            calling_pod(&s, &at("10.244.1.2")).map(|p| p.name.clone()),
            Some("client".into())
        );
        // web-1's address with the client's certificate: not believed.
        assert!(calling_pod(&s, &at("10.244.1.3")).is_none());
        assert!(calling_pod(
            &s,
            &Caller {
                identity: &client,
                ip: None
            }
        )
        .is_none());
    }

    #[test]
    fn an_unknown_security_kind_denies_what_it_could_select() {
        let typo = "apiVersion: security.istio.io/v1\nkind: AuthorisationPolicy\nmetadata: {name: deny-legacy, namespace: back}\nspec:\n  selector: {matchLabels: {app: web}}\n  action: DENY\n";
        let (s, p) = setup(typo);
        let client = id(CLIENT);
        let caller = Caller {
            identity: &client,
            ip: None,
        };
        match admit(
            &s,
            &p,
            "node-b",
            "10.244.2.2:8080".parse().unwrap(),
            &caller,
        ) {
            Admission::Denied { policy, reason, .. } => {
                assert_eq!(policy, "back/deny-legacy");
                assert_eq!(reason, DenyReason::FailClosed);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_port_a_selecting_service_declares_http_is_served_request_by_request() {
        let extra = "apiVersion: v1\nkind: Service\nmetadata: {namespace: back, name: web-tcp}\nspec:\n  clusterIP: 10.96.0.13\n  selector: {app: web}\n  ports: [{name: tcp-db, port: 5432, targetPort: 5432}, {port: 9000, targetPort: 9000, appProtocol: grpc}]\n";
        let (s, _) = setup(extra);
        let web0 = s.pod("back", "web-0").unwrap().clone();
        let web1 = s.pod("back", "web-1").unwrap().clone();
        // `targetPort: http`: the container port named http, 8080 on web-0, 9080 on web-1.
        assert!(declared_http(&s, &web0, 8080));
        assert!(!declared_http(&s, &web0, 9080));
        assert!(declared_http(&s, &web1, 9080));
        // A port named tcp-…, and one no Service targets: bytes.
        assert!(!declared_http(&s, &web0, 5432));
        assert!(!declared_http(&s, &web0, 7777));
        // appProtocol grpc.
        assert!(declared_http(&s, &web0, 9000));
        // A pod no Service selects.
        let client = s.pod("front", "client").unwrap().clone();
        assert!(!declared_http(&s, &client, 8080));
        let names: Vec<String> = services_of(&s, &web0, 8080)
            .map(|(svc, _)| svc.name.clone())
            .collect();
        assert_eq!(names, ["web"]);
    }

    #[test]
    fn the_service_a_request_names_is_its_destination_service() {
        let extra = "apiVersion: v1\nkind: Service\nmetadata: {namespace: back, name: web-canary}\nspec:\n  clusterIP: 10.96.0.14\n  selector: {app: web}\n  ports: [{name: http, port: 80, targetPort: http}]\n";
        let (s, _) = setup(extra);
        let web0 = s.pod("back", "web-0").unwrap().clone();
        let services: Vec<Arc<Service>> = services_of(&s, &web0, 8080)
            .map(|(svc, _)| svc.clone())
            .collect();
        assert_eq!(services.len(), 2);
        let pick = |authority: &str| {
            service_for_authority(&services, authority)
                .map(|s| s.name.clone())
                .unwrap_or_default()
        };
        for authority in [
            "web-canary",
            "web-canary:80",
            "web-canary.back",
            "web-canary.back.svc",
            "web-canary.back.svc.cluster.local:80",
        ] {
            assert_eq!(pick(authority), "web-canary", "{authority}");
        }
        assert_eq!(pick("web.back.svc.cluster.local"), "web");
        // Not a name of either (an address, another namespace's): the first.
        assert_eq!(pick("10.96.0.14:80"), "web");
        assert_eq!(pick("web-canary.front"), "web");
        assert_eq!(service_for_authority(&[], "web"), None);
    }
}
