//! The outbound plan, without sockets or privileges: a registry as users write it, a redirect
//! record as the kernel reports it, and the plan that comes out.

use super::*;
use crate::registry::fixtures::CLUSTER;

const CLIENT_ID: &str = "spiffe://cluster.local/ns/front/sa/client";
const WEB_ID: &str = "spiffe://cluster.local/ns/back/sa/web";
const CLIENT_IP: &str = "10.244.1.2";

/// A DestinationRule for `back/web` with `policy` (its `trafficPolicy`, in flow YAML).
fn web_rule(policy: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\n\
         kind: DestinationRule\n\
         metadata: {{name: web, namespace: back}}\n\
         spec:\n  host: web.back.svc.cluster.local\n  trafficPolicy: {policy}\n"
    )
}

/// `back/web` balanced in turns.
fn round_robin() -> String {
    web_rule("{loadBalancer: {simple: ROUND_ROBIN}}")
}

/// A snapshot of [`CLUSTER`] plus `extra` documents, and its policies.
struct World {
    snapshot: Snapshot,
    policies: PolicySet,
    routes: RouteTable,
    clusters: Clusters,
    roll: u32,
    trust_domain: &'static str,
    hbone_port: u16,
}

fn world(extra: &str) -> World {
    let snapshot = match Snapshot::from_yaml(&format!("{CLUSTER}---\n{extra}")) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    };
    let policies = PolicySet::build(&snapshot, "istio-system");
    World {
        routes: RouteTable::build(&snapshot),
        snapshot,
        policies,
        clusters: Clusters::default(),
        roll: 0,
        trust_domain: "cluster.local",
        hbone_port: 15008,
    }
}

impl World {
    fn ctx(&self) -> Context<'_> {
        Context {
            node: "node-a",
            trust_domain: self.trust_domain,
            hbone_port: self.hbone_port,
            snapshot: &self.snapshot,
            policies: &self.policies,
            clusters: &self.clusters,
            routes: &self.routes,
            roll: self.roll,
        }
    }

    fn pod(&self, ns: &str, name: &str) -> Arc<Pod> {
        self.snapshot.pod(ns, name).unwrap().clone()
    }

    /// `front/client` (node-a) connects to `dst`.
    fn call_from_client(&self, dst: &str) -> Plan {
        self.call(Some(self.pod("front", "client")), CLIENT_IP, dst)
    }

    fn call(&self, source: Option<Arc<Pod>>, peer_ip: &str, dst: &str) -> Plan {
        let redirect = Redirect {
            original_dst: dst.parse().unwrap(),
            cgroup_id: 42,
            cookie: 7,
        };
        let peer = SocketAddr::new(peer_ip.parse().unwrap(), 40000);
        plan(&redirect, peer, source, &self.ctx())
    }
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

fn names(p: &Plan) -> (Option<String>, Option<String>) {
    (
        p.destination
            .service
            .as_ref()
            .map(|s| format!("{}/{}", s.namespace, s.name)),
        p.destination
            .pod
            .as_ref()
            .map(|p| format!("{}/{}", p.namespace, p.name)),
    )
}

#[test]
fn a_service_endpoint_on_another_node_is_tunnelled() {
    let w = world("");
    let p = w.call_from_client("10.96.0.10:80");
    assert_eq!(
        p.action,
        Action::Tunnel(Hbone {
            source: id(CLIENT_ID),
            destination: id(WEB_ID),
            node: sa("172.30.0.12:15008"),
            target: sa("10.244.2.2:8080"),
            forwarded_for: CLIENT_IP.parse().unwrap(),
        })
    );
    assert_eq!(
        names(&p),
        (Some("back/web".into()), Some("back/web-0".into()))
    );
    assert_eq!(p.destination.address, Some(sa("10.244.2.2:8080")));
    assert_eq!(p.destination.identity, Some(id(WEB_ID)));
    assert_eq!(p.source.identity, Some(id(CLIENT_ID)));
}

#[test]
fn service_endpoints_take_turns_and_skip_unready_pods() {
    let w = world(&round_robin());
    let picked: Vec<_> = (0..4)
        .map(|_| {
            w.call_from_client("10.96.0.10:80")
                .destination
                .pod
                .unwrap()
                .name
                .clone()
        })
        .collect();
    // web-2 is not ready; web-0 and web-1 alternate.
    assert_eq!(picked, ["web-0", "web-1", "web-0", "web-1"]);
}

#[test]
fn a_named_target_port_is_looked_up_in_each_pod() {
    let w = world(&round_robin());
    let first = w.call_from_client("10.96.0.10:80");
    let second = w.call_from_client("10.96.0.10:80");
    assert_eq!(first.destination.address, Some(sa("10.244.2.2:8080")));
    assert_eq!(second.destination.address, Some(sa("10.244.1.3:9080")));
}

#[test]
fn a_service_without_ready_endpoints_is_refused() {
    let w = world("");
    let p = w.call_from_client("10.96.0.11:80");
    assert_eq!(p.action, Action::Refuse(Refusal::NoEndpoint));
    assert_eq!(names(&p), (Some("back/nobody".into()), None));
    assert_eq!(p.destination.address, None);
    let Action::Refuse(r) = &p.action else {
        unreachable!()
    };
    assert_eq!(r.verdict(), Verdict::NoEndpoint);
    assert_eq!(r.to_string(), "service has no ready endpoint");
}

#[test]
fn a_service_without_selector_has_no_endpoints() {
    let w = world("");
    assert_eq!(
        w.call_from_client("10.96.0.12:80").action,
        Action::Refuse(Refusal::NoEndpoint)
    );
}

#[test]
fn a_mesh_pod_on_this_node_is_delivered_locally() {
    let w = world("");
    let p = w.call_from_client("10.244.1.3:9080");
    assert_eq!(
        p.action,
        Action::DeliverLocal {
            target: sa("10.244.1.3:9080")
        }
    );
    assert_eq!(names(&p), (None, Some("back/web-1".into())));
    assert_eq!(p.destination.identity, Some(id(WEB_ID)));
}

#[test]
fn by_default_the_endpoint_with_fewer_connections_is_chosen_and_counted() {
    let w = world("");
    let first = w.call_from_client("10.96.0.10:80");
    let name = first.destination.cluster.clone().unwrap();
    assert_eq!(name, "outbound|80||web.back.svc.cluster.local");
    // A connection open on that endpoint: the other one is chosen, whatever the draws.
    for roll in [0, 1, 7, u32::MAX] {
        let w2 = World { roll, ..world("") };
        let held = w2.clusters.get(&name);
        let _open = cluster::Open::start(&held, &held.endpoint(first.destination.address.unwrap()));
        let next = w2.call_from_client("10.96.0.10:80");
        assert_ne!(
            next.destination.address, first.destination.address,
            "roll {roll}"
        );
    }
}

#[test]
fn passthrough_goes_to_the_address_called() {
    let w = world(&web_rule("{loadBalancer: {simple: PASSTHROUGH}}"));
    let p = w.call_from_client("10.96.0.10:80");
    assert_eq!(
        p.action,
        Action::Passthrough {
            target: sa("10.96.0.10:80")
        }
    );
    assert_eq!(
        p.destination.cluster.as_deref(),
        Some("outbound|80||web.back.svc.cluster.local")
    );
}

#[test]
fn past_max_connections_a_connection_is_refused() {
    let w = world(&web_rule("{connectionPool: {tcp: {maxConnections: 1}}}"));
    let first = w.call_from_client("10.96.0.10:80");
    let name = first.destination.cluster.clone().unwrap();
    let cluster = w.clusters.get(&name);
    let open = cluster::Open::start(
        &cluster,
        &cluster.endpoint(first.destination.address.unwrap()),
    );
    let p = w.call_from_client("10.96.0.10:80");
    assert_eq!(p.action, Action::Refuse(Refusal::Overflow));
    assert_eq!(
        p.destination.cluster,
        Some(name),
        "the destination it was refused by"
    );
    let Action::Refuse(r) = &p.action else {
        unreachable!()
    };
    assert_eq!(r.verdict(), Verdict::ConnectFailed);
    drop(open);
    assert!(!matches!(
        w.call_from_client("10.96.0.10:80").action,
        Action::Refuse(_)
    ));
}

#[test]
fn a_service_endpoint_on_this_node_is_delivered_locally() {
    let w = world(&round_robin());
    w.call_from_client("10.96.0.10:80");
    assert_eq!(
        w.call_from_client("10.96.0.10:80").action,
        Action::DeliverLocal {
            target: sa("10.244.1.3:9080")
        }
    );
}

const ALLOW_ONLY_OTHER: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-other, namespace: back}
spec:
  selector: {matchLabels: {app: web}}
  rules:
  - from:
    - source: {principals: [cluster.local/ns/front/sa/other]}
";

#[test]
fn same_node_delivery_is_authorized_here_with_the_deciding_policy() {
    let w = world(ALLOW_ONLY_OTHER);
    let p = w.call_from_client("10.244.1.3:9080");
    let refusal = Refusal::Denied {
        policy: "back/allow-other".into(),
        reason: DenyReason::NotAllowed,
    };
    assert_eq!(p.action, Action::Refuse(refusal.clone()));
    assert_eq!(refusal.verdict(), Verdict::Denied);
    assert_eq!(
        refusal.to_string(),
        "denied by policy back/allow-other (not_allowed)"
    );
    // The destination is still named in the plan (and so in the flow).
    assert_eq!(names(&p), (None, Some("back/web-1".into())));
}

#[test]
fn an_open_same_node_connection_is_closed_once_a_policy_denies_it() {
    let before = world("");
    let p = before.call_from_client("10.244.1.3:9080");
    let target = sa("10.244.1.3:9080");
    assert_eq!(p.action, Action::DeliverLocal { target });
    assert_eq!(still_delivered(&p.source, target, &before.ctx()), None);
    let after = world(ALLOW_ONLY_OTHER);
    assert_eq!(
        still_delivered(&p.source, target, &after.ctx()).as_deref(),
        Some("closed: now denied by back/allow-other")
    );
    // An address that is no longer a pod of the cluster is not this node's to enforce.
    assert_eq!(
        still_delivered(&p.source, sa("10.244.9.9:9080"), &after.ctx()),
        None
    );
}

#[test]
fn cross_node_calls_are_left_to_the_destination_node_to_authorize() {
    let w = world(ALLOW_ONLY_OTHER);
    assert!(matches!(
        w.call_from_client("10.244.2.2:8080").action,
        Action::Tunnel(_)
    ));
}

#[test]
fn same_node_authorization_sees_the_caller_address() {
    let deny_range = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-range, namespace: back}
spec:
  action: DENY
  rules:
  - from:
    - source: {ipBlocks: [10.244.1.2/32]}
";
    let w = world(deny_range);
    assert!(matches!(
        w.call_from_client("10.244.1.3:9080").action,
        Action::Refuse(Refusal::Denied { ref policy, reason: DenyReason::DenyPolicy }) if policy == "back/deny-range"
    ));
    // The same pod from another address (identified by its cgroup all the same).
    let p = w.call(
        Some(w.pod("front", "client")),
        "10.244.1.77",
        "10.244.1.3:9080",
    );
    assert!(matches!(p.action, Action::DeliverLocal { .. }));
}

#[test]
fn a_pod_of_an_unenrolled_namespace_is_passed_through() {
    let w = world("");
    let p = w.call_from_client("10.244.1.4:7070");
    assert_eq!(
        p.action,
        Action::Passthrough {
            target: sa("10.244.1.4:7070")
        }
    );
    assert_eq!(names(&p), (None, Some("legacy/batch".into())));
    assert_eq!(p.destination.identity, None);
}

#[test]
fn a_service_of_an_unenrolled_namespace_is_resolved_then_passed_through() {
    let w = world("");
    let p = w.call_from_client("10.96.0.20:80");
    assert_eq!(
        p.action,
        Action::Passthrough {
            target: sa("10.244.1.4:7070")
        }
    );
    assert_eq!(
        names(&p),
        (Some("legacy/batch".into()), Some("legacy/batch".into()))
    );
}

#[test]
fn an_address_outside_the_cluster_is_passed_through_unchanged() {
    let w = world("");
    let p = w.call_from_client("192.0.2.10:443");
    assert_eq!(
        p.action,
        Action::Passthrough {
            target: sa("192.0.2.10:443")
        }
    );
    assert_eq!(names(&p), (None, None));
    assert_eq!(p.destination.address, Some(sa("192.0.2.10:443")));
}

#[test]
fn a_host_network_pod_or_a_finished_pod_is_not_a_destination() {
    let w = world("");
    // The node's address belongs to the node, not to the host-network pod on it.
    assert_eq!(
        names(&w.call_from_client("172.30.0.11:10250")),
        (None, None)
    );
    assert!(matches!(
        w.call_from_client("172.30.0.11:10250").action,
        Action::Passthrough { .. }
    ));
    // A Succeeded pod's IP may already be someone else's.
    assert_eq!(names(&w.call_from_client("10.244.1.9:80")), (None, None));
}

#[test]
fn a_service_vip_on_a_port_it_does_not_expose_is_passed_through() {
    let w = world("");
    let p = w.call_from_client("10.96.0.10:8443");
    assert_eq!(
        p.action,
        Action::Passthrough {
            target: sa("10.96.0.10:8443")
        }
    );
    assert_eq!(names(&p), (None, None));
}

#[test]
fn an_unidentified_caller_cannot_reach_the_mesh() {
    let w = world("");
    let p = w.call(None, "10.244.1.50", "10.96.0.10:80");
    assert_eq!(p.action, Action::Refuse(Refusal::NoIdentity));
    assert_eq!(p.source.identity, None);
    let Action::Refuse(r) = &p.action else {
        unreachable!()
    };
    assert_eq!(r.verdict(), Verdict::ConnectFailed);
}

#[test]
fn an_unidentified_caller_still_reaches_non_mesh_destinations() {
    let w = world("");
    assert!(matches!(
        w.call(None, "10.244.1.50", "192.0.2.10:443").action,
        Action::Passthrough { .. }
    ));
}

#[test]
fn the_cgroup_decides_who_calls_not_the_address() {
    let w = world("");
    // A connection from web-1's cgroup that claims the client's address.
    let p = w.call(Some(w.pod("back", "web-1")), CLIENT_IP, "10.244.2.2:8080");
    let Action::Tunnel(h) = p.action else {
        panic!("{:?}", p.action)
    };
    assert_eq!(h.source, id(WEB_ID));
    assert_eq!(p.source.pod.unwrap().name, "web-1");
    assert_eq!(p.source.ip, CLIENT_IP.parse::<IpAddr>().unwrap());
}

#[test]
fn a_remote_node_without_an_address_is_refused() {
    let w = world("");
    let p = w.call_from_client("10.96.0.30:80");
    assert_eq!(
        p.action,
        Action::Refuse(Refusal::NoNodeAddress {
            node: Some("node-c".into())
        })
    );
    let Action::Refuse(r) = &p.action else {
        unreachable!()
    };
    assert_eq!(r.verdict(), Verdict::ConnectFailed);
    assert_eq!(
        r.to_string(),
        "no address for node Some(\"node-c\") of the destination"
    );
}

#[test]
fn the_trust_domain_and_hbone_port_come_from_the_node() {
    let mut w = world("");
    w.trust_domain = "corp.example";
    w.hbone_port = 16008;
    let Action::Tunnel(h) = w.call_from_client("10.244.2.2:8080").action else {
        panic!()
    };
    assert_eq!(h.source, id("spiffe://corp.example/ns/front/sa/client"));
    assert_eq!(h.destination, id("spiffe://corp.example/ns/back/sa/web"));
    assert_eq!(h.node, sa("172.30.0.12:16008"));
}

#[test]
fn a_security_object_weft_cannot_apply_fails_closed_on_this_node() {
    let typo = "apiVersion: security.istio.io/v1
kind: AuthorisationPolicy
metadata: {name: deny-old, namespace: back}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules: [{}]
";
    let w = world(typo);
    assert_eq!(
        w.call_from_client("10.244.1.3:9080").action,
        Action::Refuse(Refusal::Denied {
            policy: "back/deny-old".into(),
            reason: DenyReason::FailClosed
        })
    );
    // Pods it could not select are not affected.
    assert!(matches!(
        w.call_from_client("10.244.1.4:7070").action,
        Action::Passthrough { .. }
    ));
}

#[test]
fn a_root_namespace_object_weft_cannot_apply_covers_every_namespace() {
    let future = "apiVersion: security.istio.io/v2
kind: AuthorizationPolicy
metadata: {name: mesh-wide, namespace: istio-system}
spec: {}
";
    let w = world(future);
    assert_eq!(
        w.call_from_client("10.244.1.3:9080").action,
        Action::Refuse(Refusal::Denied {
            policy: "istio-system/mesh-wide".into(),
            reason: DenyReason::FailClosed
        })
    );
}

#[test]
fn an_unknown_routing_kind_changes_nothing() {
    let w = world(
        "apiVersion: networking.istio.io/v1\nkind: VirtualServce\nmetadata: {name: web, namespace: back}\nspec: {}\n",
    );
    assert_eq!(w.snapshot.not_applied.len(), 1);
    assert!(matches!(
        w.call_from_client("10.244.1.3:9080").action,
        Action::DeliverLocal { .. }
    ));
}

const TCP_SPLIT: &str = "apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {namespace: back, name: web-tcp}
spec:
  hosts: [web]
  tcp:
  - match: [{port: 80}]
    route:
    - destination: {host: web}
      weight: 50
    - destination: {host: nobody}
      weight: 50
";

#[test]
fn a_virtual_service_tcp_route_picks_a_weighted_destination_per_connection() {
    let mut w = world(TCP_SPLIT);
    w.roll = 10;
    let p = w.call_from_client("10.96.0.10:80");
    assert!(matches!(p.action, Action::Tunnel(_)), "{:?}", p.action);
    assert_eq!(names(&p).0.as_deref(), Some("back/web"));
    w.roll = 60;
    let p = w.call_from_client("10.96.0.10:80");
    assert_eq!(p.action, Action::Refuse(Refusal::NoEndpoint));
    assert_eq!(
        names(&p).0.as_deref(),
        Some("back/nobody"),
        "routed elsewhere"
    );
    // Without the VirtualService, the Service itself.
    let mut plain = world("");
    plain.roll = 60;
    assert!(matches!(
        plain.call_from_client("10.96.0.10:80").action,
        Action::Tunnel(_)
    ));
}
