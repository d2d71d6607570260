//! Policy engine tests, with YAML as users write it.

use std::net::IpAddr;

use super::*;
use crate::registry::Snapshot;

const ROOT: &str = "istio-system";

/// Namespaces demo, prod, istio-system and pods demo/server (app=server, version=v1),
/// demo/other (app=other), prod/db (app=db), istio-system/gw (app=gw).
const CLUSTER: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: demo}
---
apiVersion: v1
kind: Namespace
metadata: {name: prod}
---
apiVersion: v1
kind: Namespace
metadata: {name: istio-system}
---
apiVersion: v1
kind: Pod
metadata:
  namespace: demo
  name: server
  uid: u-server
  labels: {app: server, version: v1}
status: {podIP: 10.244.1.10}
---
apiVersion: v1
kind: Pod
metadata:
  namespace: demo
  name: other
  uid: u-other
  labels: {app: other}
---
apiVersion: v1
kind: Pod
metadata:
  namespace: prod
  name: db
  uid: u-db
  labels: {app: db}
---
apiVersion: v1
kind: Pod
metadata:
  namespace: istio-system
  name: gw
  uid: u-gw
  labels: {app: gw}
";

struct Fixture {
    snapshot: Snapshot,
    set: PolicySet,
}

fn fixture(policies: &str) -> Fixture {
    let yaml = format!("{CLUSTER}---\n{policies}");
    let snapshot = match Snapshot::from_yaml(&yaml) {
        Ok(s) => s,
        Err(e) => panic!("load failed:\n{e}"),
    };
    assert!(
        snapshot.not_applied.is_empty() && snapshot.fail_closed.is_empty(),
        "{:?}",
        snapshot.not_applied
    );
    let set = PolicySet::build(&snapshot, ROOT);
    Fixture { snapshot, set }
}

const CLIENT: &str = "cluster.local/ns/demo/sa/client";
const PROD_APP: &str = "cluster.local/ns/prod/sa/app";

/// A connection attempt: `to` is `ns/pod`.
struct Conn<'a> {
    to: &'a str,
    port: u16,
    principal: Option<&'a str>,
    ip: &'a str,
}

fn conn<'a>(to: &'a str, port: u16, principal: Option<&'a str>) -> Conn<'a> {
    Conn {
        to,
        port,
        principal,
        ip: "10.244.2.20",
    }
}

impl Fixture {
    fn pod(&self, key: &str) -> &Pod {
        let (ns, name) = key.split_once('/').unwrap();
        self.snapshot.pod(ns, name).expect("pod")
    }

    fn decide(&self, c: Conn<'_>) -> Decision {
        let pod = self.pod(c.to);
        self.set.authorize(&ConnRequest {
            destination: pod,
            destination_port: c.port,
            destination_ip: pod.ip,
            source_principal: c.principal,
            source_namespace: None,
            source_ip: Some(c.ip.parse::<IpAddr>().unwrap()),
        })
    }

    fn allowed(&self, c: Conn<'_>) -> bool {
        self.decide(c).is_allow()
    }
}

fn deny(policy: &str, reason: DenyReason) -> Decision {
    Decision::Deny {
        policy: policy.to_string(),
        reason,
    }
}

#[test]
fn no_policy_allows_everything() {
    let f = fixture("");
    assert!(f.set.is_empty());
    assert_eq!(f.decide(conn("demo/server", 8080, None)), Decision::Allow);
    assert_eq!(
        f.decide(conn("demo/server", 8080, Some(CLIENT))),
        Decision::Allow
    );
}

#[test]
fn allow_by_principal_exact_prefix_and_suffix() {
    let f = fixture(
        "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: exact
  namespace: demo
spec:
  selector:
    matchLabels:
      app: server
  action: ALLOW
  rules:
  - from:
    - source:
        principals: [\"cluster.local/ns/demo/sa/client\"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: prefix
  namespace: prod
spec:
  rules:
  - from:
    - source:
        principals:
        - \"cluster.local/ns/demo/*\"
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: suffix
  namespace: demo
spec:
  selector:
    matchLabels:
      app: other
  rules:
  - from:
    - source:
        principals: [\"*/sa/monitor\"]
",
    );
    assert_eq!(f.set.len(), 3);
    // exact
    assert!(f.allowed(conn("demo/server", 80, Some(CLIENT))));
    assert!(f.allowed(conn(
        "demo/server",
        80,
        Some("spiffe://cluster.local/ns/demo/sa/client")
    )));
    assert_eq!(
        f.decide(conn(
            "demo/server",
            80,
            Some("cluster.local/ns/demo/sa/client2")
        )),
        deny("demo/exact", DenyReason::NotAllowed)
    );
    // prefix
    assert!(f.allowed(conn("prod/db", 5432, Some(CLIENT))));
    assert!(f.allowed(conn("prod/db", 5432, Some("cluster.local/ns/demo/sa/x"))));
    assert!(!f.allowed(conn("prod/db", 5432, Some("cluster.local/ns/demo2/sa/x"))));
    assert!(!f.allowed(conn("prod/db", 5432, Some(PROD_APP))));
    // suffix
    assert!(f.allowed(conn("demo/other", 80, Some("td/ns/obs/sa/monitor"))));
    assert!(!f.allowed(conn("demo/other", 80, Some("td/ns/obs/sa/monitors"))));
    assert!(!f.allowed(conn("demo/other", 80, Some(CLIENT))));
}

#[test]
fn plaintext_source_against_principal_rules() {
    let f = fixture(
        "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: any-authenticated, namespace: demo}
spec:
  selector: {matchLabels: {app: server}}
  rules:
  - from:
    - source: {principals: [\"*\"]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: plaintext-only, namespace: demo}
spec:
  selector: {matchLabels: {app: other}}
  rules:
  - from:
    - source: {notPrincipals: [\"*\"]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-plaintext, namespace: prod}
spec:
  action: DENY
  rules:
  - from:
    - source: {notPrincipals: [\"*\"]}
",
    );
    assert!(f.allowed(conn("demo/server", 80, Some(CLIENT))));
    assert_eq!(
        f.decide(conn("demo/server", 80, None)),
        deny("demo/any-authenticated", DenyReason::NotAllowed)
    );
    assert!(f.allowed(conn("demo/other", 80, None)));
    assert!(!f.allowed(conn("demo/other", 80, Some(CLIENT))));
    assert_eq!(
        f.decide(conn("prod/db", 80, None)),
        deny("prod/no-plaintext", DenyReason::DenyPolicy)
    );
    assert!(f.allowed(conn("prod/db", 80, Some(CLIENT))));
    // An empty principal is no principal.
    assert!(!f.allowed(conn("prod/db", 80, Some(""))));
}

#[test]
fn deny_by_namespace_and_not_namespaces() {
    let f = fixture(
        "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-demo
  namespace: prod
spec:
  action: DENY
  rules:
  - from:
    - source:
        namespaces: [\"demo\"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: only-from-prod
  namespace: demo
spec:
  action: DENY
  rules:
  - from:
    - source:
        notNamespaces: [\"prod\", \"istio-*\"]
",
    );
    assert_eq!(
        f.decide(conn("prod/db", 5432, Some(CLIENT))),
        deny("prod/deny-demo", DenyReason::DenyPolicy)
    );
    assert!(f.allowed(conn("prod/db", 5432, Some(PROD_APP))));
    // Plaintext has no namespace: `namespaces` does not match it.
    assert!(f.allowed(conn("prod/db", 5432, None)));

    assert!(f.allowed(conn("demo/server", 80, Some(PROD_APP))));
    assert!(f.allowed(conn("demo/server", 80, Some("td/ns/istio-system/sa/gw"))));
    assert_eq!(
        f.decide(conn("demo/server", 80, Some(CLIENT))),
        deny("demo/only-from-prod", DenyReason::DenyPolicy)
    );
    // ... and plaintext is not in prod: denied.
    assert!(!f.allowed(conn("demo/server", 80, None)));

    // An explicit source namespace (an authenticated one) is used as given.
    let pod = f.pod("prod/db");
    let d = f.set.authorize(&ConnRequest {
        destination: pod,
        destination_port: 5432,
        destination_ip: None,
        source_principal: None,
        source_namespace: Some("demo"),
        source_ip: None,
    });
    assert_eq!(d, deny("prod/deny-demo", DenyReason::DenyPolicy));
}

#[test]
fn ip_blocks_with_cidrs() {
    let f = fixture(
        "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: from-node-2, namespace: demo}
spec:
  rules:
  - from:
    - source:
        ipBlocks: [\"10.244.2.0/24\", \"192.0.2.7\"]
        notIpBlocks: [\"10.244.2.128/25\"]
  - from:
    - source:
        remoteIpBlocks: [\"fd00::/64\"]
",
    );
    let at = |ip: &'static str| Conn {
        ip,
        ..conn("demo/server", 80, None)
    };
    assert!(f.allowed(at("10.244.2.20")));
    assert!(f.allowed(at("192.0.2.7")));
    assert!(f.allowed(at("::ffff:10.244.2.5")), "IPv4-mapped");
    assert!(f.allowed(at("fd00::1")), "remoteIpBlocks = ipBlocks at L4");
    assert!(!f.allowed(at("10.244.2.200")), "notIpBlocks");
    assert!(!f.allowed(at("10.244.3.20")));
    assert!(!f.allowed(at("192.0.2.8")));
    assert!(!f.allowed(at("fd01::1")));
    // No source IP: ipBlocks cannot match.
    let pod = f.pod("demo/server");
    let d = f.set.authorize(&ConnRequest {
        destination: pod,
        destination_port: 80,
        destination_ip: None,
        source_principal: None,
        source_namespace: None,
        source_ip: None,
    });
    assert!(!d.is_allow());
}

#[test]
fn an_unknown_source_ip_dodges_no_deny_and_earns_no_allow() {
    let f = fixture(
        "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-range, namespace: demo}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules:
  - from:
    - source:
        ipBlocks: [\"10.244.9.0/24\"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-outside, namespace: prod}
spec:
  action: DENY
  rules:
  - from:
    - source:
        notIpBlocks: [\"10.244.0.0/16\"]
  - when:
    - key: remote.ip
      values: [\"10.244.9.0/24\"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-but-range, namespace: demo}
spec:
  selector: {matchLabels: {app: other}}
  rules:
  - from:
    - source:
        notIpBlocks: [\"10.244.9.0/24\"]
",
    );
    let unknown = |dest: &str| {
        f.set.authorize(&ConnRequest {
            destination: f.pod(dest),
            destination_port: 80,
            destination_ip: None,
            source_principal: Some(CLIENT),
            source_namespace: None,
            source_ip: None,
        })
    };
    let at = |dest: &'static str, ip: &'static str| Conn {
        ip,
        ..conn(dest, 80, Some(CLIENT))
    };
    // Known addresses decide as written.
    assert!(!f.allowed(at("demo/server", "10.244.9.7")));
    assert!(f.allowed(at("demo/server", "10.244.1.7")));
    assert!(f.allowed(at("prod/db", "10.244.1.7")));
    assert!(!f.allowed(at("prod/db", "192.0.2.1")));
    assert!(f.allowed(at("demo/other", "10.244.1.7")));
    assert!(!f.allowed(at("demo/other", "10.244.9.7")));
    // Unknown: every DENY on addresses applies, an ALLOW on addresses does not.
    assert_eq!(
        unknown("demo/server"),
        deny("demo/deny-range", DenyReason::DenyPolicy)
    );
    assert_eq!(
        unknown("prod/db"),
        deny("prod/deny-outside", DenyReason::DenyPolicy)
    );
    assert!(!unknown("demo/other").is_allow());
}

#[test]
fn ports_and_not_ports() {
    let f = fixture(
        "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web, namespace: demo}
spec:
  selector: {matchLabels: {app: server}}
  rules:
  - to:
    - operation:
        ports: [\"8080\", \"8443\"]
  - from:
    - source: {namespaces: [\"prod\"]}
    to:
    - operation:
        notPorts: [\"22\"]
",
    );
    assert!(f.allowed(conn("demo/server", 8080, None)));
    assert!(f.allowed(conn("demo/server", 8443, Some(CLIENT))));
    assert!(!f.allowed(conn("demo/server", 9090, Some(CLIENT))));
    // Second rule: from prod, anything but 22 (from AND to).
    assert!(f.allowed(conn("demo/server", 9090, Some(PROD_APP))));
    assert!(!f.allowed(conn("demo/server", 22, Some(PROD_APP))));
    // The policy selects app=server only.
    assert!(f.allowed(conn("demo/other", 22, None)));
}

#[test]
fn when_conditions() {
    let f = fixture(
        "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: conditions, namespace: demo}
spec:
  selector: {matchLabels: {app: server}}
  rules:
  - when:
    - key: source.ip
      values: [\"10.244.2.0/24\"]
      notValues: [\"10.244.2.99\"]
    - key: destination.port
      values: [\"8080\"]
  - when:
    - key: source.namespace
      values: [\"prod\"]
    - key: source.principal
      notValues: [\"*/sa/batch\"]
  - when:
    - key: destination.ip
      values: [\"10.244.1.0/24\"]
    - key: source.serviceAccount
      values: [\"demo/admin\"]
",
    );
    // Rule 1: both conditions.
    assert!(f.allowed(conn("demo/server", 8080, None)));
    assert!(!f.allowed(conn("demo/server", 9090, None)));
    assert!(!f.allowed(Conn {
        ip: "10.244.2.99",
        ..conn("demo/server", 8080, None)
    }));
    // Rule 2.
    assert!(f.allowed(conn("demo/server", 9090, Some(PROD_APP))));
    assert!(!f.allowed(conn("demo/server", 9090, Some("td/ns/prod/sa/batch"))));
    // Rule 3: destination IP is the pod's (10.244.1.10), service account demo/admin.
    assert!(f.allowed(conn("demo/server", 9090, Some("td/ns/demo/sa/admin"))));
    assert!(!f.allowed(conn("demo/server", 9090, Some(CLIENT))));
}

#[test]
fn service_accounts_default_to_the_policy_namespace() {
    let f = fixture(
        "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: sa, namespace: demo}
spec:
  rules:
  - from:
    - source:
        serviceAccounts: [\"client\", \"prod/app\"]
",
    );
    assert!(f.allowed(conn("demo/server", 80, Some(CLIENT))));
    assert!(f.allowed(conn("demo/server", 80, Some(PROD_APP))));
    assert!(!f.allowed(conn("demo/server", 80, Some("td/ns/prod/sa/client"))));
    assert!(!f.allowed(conn("demo/server", 80, None)));
}

#[test]
fn deny_beats_allow() {
    let f = fixture(
        "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-demo, namespace: demo}
spec:
  action: ALLOW
  rules:
  - from:
    - source: {namespaces: [\"demo\"]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-ssh, namespace: demo}
spec:
  action: DENY
  rules:
  - to:
    - operation: {ports: [\"22\"]}
",
    );
    assert!(f.allowed(conn("demo/server", 80, Some(CLIENT))));
    assert_eq!(
        f.decide(conn("demo/server", 22, Some(CLIENT))),
        deny("demo/no-ssh", DenyReason::DenyPolicy)
    );
    assert_eq!(
        f.decide(conn("demo/server", 80, Some(PROD_APP))),
        deny("demo/allow-demo", DenyReason::NotAllowed)
    );
}

#[test]
fn allow_nothing_and_empty_rule() {
    let f = fixture(
        "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-nothing
  namespace: demo
spec: {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-nothing-either
  namespace: prod
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-all
  namespace: demo
spec:
  selector:
    matchLabels: {app: other}
  rules:
  - {}
",
    );
    assert_eq!(
        f.decide(conn("demo/server", 80, Some(CLIENT))),
        deny("demo/allow-nothing", DenyReason::NotAllowed)
    );
    assert_eq!(
        f.decide(conn("prod/db", 80, Some(CLIENT))),
        deny("prod/allow-nothing-either", DenyReason::NotAllowed)
    );
    // The allow-all rule on app=other wins over the namespace's allow-nothing.
    assert!(f.allowed(conn("demo/other", 80, None)));
    assert!(f.allowed(conn("demo/other", 1, Some(PROD_APP))));
    // Pods outside both namespaces are untouched.
    assert!(f.allowed(conn("istio-system/gw", 80, None)));
}

#[test]
fn scopes_root_namespace_and_selectors() {
    let f = fixture(
        "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: mesh-deny-9999, namespace: istio-system}
spec:
  action: DENY
  rules:
  - to:
    - operation: {ports: [\"9999\"]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: db-everywhere, namespace: istio-system}
spec:
  selector: {matchLabels: {app: db}}
  rules:
  - from:
    - source: {namespaces: [\"demo\"]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: server-only, namespace: demo}
spec:
  selector: {matchLabels: {app: server, version: v1}}
  action: DENY
  rules:
  - to:
    - operation: {ports: [\"7000\"]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: elsewhere, namespace: other-namespace}
spec: {}
",
    );
    assert_eq!(f.set.len(), 4);
    // Mesh-wide: every namespace, including the root one.
    for pod in ["demo/server", "demo/other", "prod/db", "istio-system/gw"] {
        assert_eq!(
            f.decide(conn(pod, 9999, Some(CLIENT))),
            deny("istio-system/mesh-deny-9999", DenyReason::DenyPolicy),
            "{pod}"
        );
    }
    // Root namespace with selector: matching pods of every namespace.
    assert!(f.allowed(conn("prod/db", 5432, Some(CLIENT))));
    assert_eq!(
        f.decide(conn("prod/db", 5432, Some(PROD_APP))),
        deny("istio-system/db-everywhere", DenyReason::NotAllowed)
    );
    assert!(f.allowed(conn("demo/other", 5432, Some(PROD_APP))));
    // Namespace selector: its namespace, matching pods only.
    assert!(!f.allowed(conn("demo/server", 7000, None)));
    assert!(f.allowed(conn("demo/other", 7000, None)));
    // A policy in another namespace (allow-nothing there) does not apply here.
    assert!(f.allowed(conn("demo/server", 80, None)));

    let pod = f.pod("prod/db");
    assert_eq!(
        f.set.applicable(pod),
        vec!["istio-system/db-everywhere", "istio-system/mesh-deny-9999"]
    );
    assert_eq!(
        f.set.applicable(f.pod("demo/server")),
        vec!["istio-system/mesh-deny-9999", "demo/server-only"]
    );
    assert_eq!(
        f.set.applicable(f.pod("demo/other")),
        vec!["istio-system/mesh-deny-9999"]
    );
}

#[test]
fn root_namespace_is_configurable() {
    let yaml = format!(
        "{CLUSTER}---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-all, namespace: mesh-config}}
spec:
  action: DENY
  rules: [{{}}]
"
    );
    let s = Snapshot::from_yaml(&yaml).unwrap();
    let pod = s.pod("demo", "server").unwrap();
    let req = ConnRequest {
        destination: pod,
        destination_port: 80,
        destination_ip: None,
        source_principal: None,
        source_namespace: None,
        source_ip: None,
    };
    assert!(PolicySet::build(&s, ROOT).authorize(&req).is_allow());
    assert_eq!(
        PolicySet::build(&s, "mesh-config").authorize(&req),
        deny("mesh-config/deny-all", DenyReason::DenyPolicy)
    );
}

#[test]
fn deny_names_the_most_specific_allow_policy() {
    let f = fixture(
        "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: a-mesh, namespace: istio-system}
spec:
  rules:
  - from:
    - source: {namespaces: [\"nobody\"]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: b-namespace, namespace: demo}
spec:
  rules:
  - from:
    - source: {namespaces: [\"nobody\"]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: c-workload, namespace: demo}
spec:
  selector: {matchLabels: {app: server}}
  rules:
  - from:
    - source: {namespaces: [\"nobody\"]}
",
    );
    assert_eq!(
        f.decide(conn("demo/server", 80, Some(CLIENT))),
        deny("demo/c-workload", DenyReason::NotAllowed)
    );
    assert_eq!(
        f.decide(conn("demo/other", 80, Some(CLIENT))),
        deny("demo/b-namespace", DenyReason::NotAllowed)
    );
    assert_eq!(
        f.decide(conn("prod/db", 80, Some(CLIENT))),
        deny("istio-system/a-mesh", DenyReason::NotAllowed)
    );
    // For a pod of the root namespace, the mesh-wide policy is its namespace's.
    assert_eq!(
        f.decide(conn("istio-system/gw", 80, Some(CLIENT))),
        deny("istio-system/a-mesh", DenyReason::NotAllowed)
    );
}

#[test]
fn http_attributes_fail_closed_in_allow() {
    let f = fixture(
        "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: http-allow, namespace: demo}
spec:
  selector: {matchLabels: {app: server}}
  rules:
  - from:
    - source: {namespaces: [\"demo\"]}
    to:
    - operation:
        methods: [\"GET\"]
        paths: [\"/api/*\"]
  - from:
    - source: {requestPrincipals: [\"*\"]}
  - when:
    - key: request.headers[x-user]
      values: [\"admin\"]
  - from:
    - source: {namespaces: [\"prod\"]}
",
    );
    // The HTTP rules never allow ...
    assert_eq!(
        f.decide(conn("demo/server", 80, Some(CLIENT))),
        deny("demo/http-allow", DenyReason::NotAllowedHttpRules)
    );
    assert!(!f.allowed(conn("demo/server", 80, None)));
    // ... the L4 rule still does.
    assert!(f.allowed(conn("demo/server", 80, Some(PROD_APP))));
    let w = f.set.warnings();
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(
        w[0].starts_with(
            "AuthorizationPolicy demo/http-allow: requestPrincipals cannot be evaluated"
        ),
        "{w:?}"
    );
    assert!(
        w[1].starts_with("AuthorizationPolicy demo/http-allow: HTTP attributes (methods, paths, request.headers[x-user]) are enforced per request on HTTP traffic; on TCP traffic the rules using them never match"),
        "{w:?}"
    );
}

#[test]
fn http_attributes_widen_deny() {
    let f = fixture(
        "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin-api, namespace: demo}
spec:
  action: DENY
  rules:
  - from:
    - source: {notNamespaces: [\"demo\"]}
    to:
    - operation:
        ports: [\"8080\"]
        paths: [\"/admin/*\"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-jwt-less, namespace: prod}
spec:
  action: DENY
  rules:
  - from:
    - source: {notRequestPrincipals: [\"*\"]}
    when:
    - key: request.auth.claims[iss]
      notValues: [\"https://issuer\"]
",
    );
    // Every path of port 8080 from outside demo is denied, not only /admin/*.
    assert_eq!(
        f.decide(conn("demo/server", 8080, Some(PROD_APP))),
        deny("demo/no-admin-api", DenyReason::DenyPolicy)
    );
    assert!(f.allowed(conn("demo/server", 8080, Some(CLIENT))));
    assert!(f.allowed(conn("demo/server", 9090, Some(PROD_APP))));
    // Only HTTP attributes: the rule matches every connection.
    assert!(!f.allowed(conn("prod/db", 5432, Some(PROD_APP))));
    assert_eq!(f.set.warnings().len(), 2);
    assert!(f.set.warnings()[0].contains("deny more than written"));
}

#[test]
fn custom_fails_closed_and_audit_is_ignored() {
    let f = fixture(
        "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext-authz, namespace: demo}
spec:
  selector: {matchLabels: {app: server}}
  action: CUSTOM
  provider:
    name: my-ext-authz
  rules:
  - to:
    - operation: {paths: [\"/secure/*\"]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit, namespace: demo}
spec:
  action: AUDIT
  rules: [{}]
",
    );
    assert_eq!(f.set.len(), 1);
    assert_eq!(
        f.decide(conn("demo/server", 80, Some(CLIENT))),
        deny("demo/ext-authz", DenyReason::CustomPolicy)
    );
    assert!(f.allowed(conn("demo/other", 80, Some(CLIENT))));
    assert!(f
        .set
        .warnings()
        .iter()
        .any(|w| w.contains("demo/audit: action AUDIT is not supported")));
}

#[test]
fn target_ref_policies_do_not_apply_at_l4() {
    let f = fixture(
        "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: waypoint, namespace: demo}
spec:
  targetRefs:
  - kind: Service
    group: \"\"
    name: server
  action: DENY
  rules: [{}]
",
    );
    assert!(f.set.is_empty());
    assert!(f.allowed(conn("demo/server", 80, None)));
    assert!(f.set.warnings()[0].contains("targetRef"));
}

#[test]
fn v1beta1_and_default_namespace() {
    let f = fixture(
        "\
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: old-api, namespace: demo}
spec:
  action: DENY
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-namespace}
spec: {}
",
    );
    assert_eq!(f.set.len(), 2);
    assert!(!f.allowed(conn("demo/server", 80, None)));
    let policies: Vec<_> = f
        .snapshot
        .authorization_policies
        .iter()
        .map(|p| (p.namespace.as_str(), p.name.as_str()))
        .collect();
    assert_eq!(
        policies,
        vec![("default", "no-namespace"), ("demo", "old-api")]
    );
}

#[test]
fn decisions_display_and_serialize() {
    let d = deny("demo/x", DenyReason::NotAllowed);
    assert_eq!(d.to_string(), "deny: no ALLOW policy matched (demo/x)");
    assert_eq!(
        serde_json::to_value(&d).unwrap(),
        serde_json::json!({"decision": "deny", "policy": "demo/x", "reason": "not_allowed"})
    );
    assert_eq!(DenyReason::CustomPolicy.as_str(), "custom_policy");
    assert_eq!(Decision::Allow.to_string(), "allow");
}

// ---------------------------------------------------------------------------------------------
// PeerAuthentication
// ---------------------------------------------------------------------------------------------

#[test]
fn peer_authentication_defaults_to_permissive() {
    let f = fixture("");
    let pod = f.pod("demo/server");
    assert_eq!(f.set.mtls_mode(pod, 80), MtlsMode::Permissive);
    assert_eq!(
        f.set.mtls(pod),
        PodMtls {
            default: MtlsMode::Permissive,
            ports: BTreeMap::new()
        }
    );
}

#[test]
fn peer_authentication_precedence_and_port_level() {
    let f = fixture(
        "\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: istio-system
spec:
  mtls:
    mode: STRICT
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: prod
spec:
  mtls:
    mode: PERMISSIVE
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: server
  namespace: demo
spec:
  selector:
    matchLabels:
      app: server
  mtls:
    mode: DISABLE
  portLevelMtls:
    8080:
      mode: STRICT
    9090:
      mode: UNSET
    \"15021\":
      mode: PERMISSIVE
",
    );
    assert_eq!(f.set.peer_authentications(), 3);
    // mesh STRICT applies where nothing more specific does
    assert_eq!(f.set.mtls_mode(f.pod("demo/other"), 80), MtlsMode::Strict);
    assert_eq!(
        f.set.mtls_mode(f.pod("istio-system/gw"), 80),
        MtlsMode::Strict
    );
    // namespace beats mesh
    assert_eq!(
        f.set.mtls_mode(f.pod("prod/db"), 5432),
        MtlsMode::Permissive
    );
    // workload beats namespace/mesh; ports override it
    let server = f.pod("demo/server");
    assert_eq!(f.set.mtls_mode(server, 80), MtlsMode::Disable);
    assert_eq!(f.set.mtls_mode(server, 8080), MtlsMode::Strict);
    assert_eq!(
        f.set.mtls_mode(server, 9090),
        MtlsMode::Disable,
        "UNSET port inherits"
    );
    assert_eq!(f.set.mtls_mode(server, 15021), MtlsMode::Permissive);
    assert_eq!(
        f.set.mtls(server),
        PodMtls {
            default: MtlsMode::Disable,
            ports: BTreeMap::from([
                (8080, MtlsMode::Strict),
                (9090, MtlsMode::Disable),
                (15021, MtlsMode::Permissive),
            ]),
        }
    );
}

#[test]
fn peer_authentication_unset_inherits() {
    let f = fixture(
        "\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: mesh, namespace: istio-system}
spec:
  mtls: {mode: STRICT}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: ns, namespace: demo}
spec:
  mtls: {mode: UNSET}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: workload, namespace: demo}
spec:
  selector: {matchLabels: {app: server}}
  portLevelMtls:
    8080: {mode: DISABLE}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: ns, namespace: prod}
spec:
  mtls: {mode: DISABLE}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: db, namespace: prod}
spec:
  selector: {matchLabels: {app: db}}
  mtls: {}
  portLevelMtls:
    5432: {mode: UNSET}
",
    );
    // demo: namespace UNSET → mesh STRICT; the workload policy has no mtls → STRICT too.
    assert_eq!(f.set.mtls_mode(f.pod("demo/other"), 80), MtlsMode::Strict);
    let server = f.pod("demo/server");
    assert_eq!(f.set.mtls_mode(server, 80), MtlsMode::Strict);
    assert_eq!(f.set.mtls_mode(server, 8080), MtlsMode::Disable);
    // prod: workload UNSET → namespace DISABLE, port UNSET → workload's effective mode.
    let db = f.pod("prod/db");
    assert_eq!(
        f.set.mtls(db),
        PodMtls {
            default: MtlsMode::Disable,
            ports: BTreeMap::from([(5432, MtlsMode::Disable)]),
        }
    );
}

#[test]
fn peer_authentication_oldest_wins_and_root_selector_is_local() {
    let f = fixture(
        "\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: newer
  namespace: demo
  creationTimestamp: \"2025-02-01T00:00:00Z\"
spec:
  mtls: {mode: STRICT}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: older
  namespace: demo
  creationTimestamp: \"2025-01-01T00:00:00Z\"
spec:
  mtls: {mode: DISABLE}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: a-undated, namespace: demo}
spec:
  mtls: {mode: PERMISSIVE}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: dbs, namespace: istio-system}
spec:
  selector: {matchLabels: {app: db}}
  mtls: {mode: STRICT}
",
    );
    assert_eq!(f.set.mtls_mode(f.pod("demo/server"), 80), MtlsMode::Disable);
    // A root-namespace selector policy is a workload policy of the root namespace only.
    assert_eq!(f.set.mtls_mode(f.pod("prod/db"), 80), MtlsMode::Permissive);
}

// ---------------------------------------------------------------------------------------------
// Validation through the registry.
// ---------------------------------------------------------------------------------------------

fn load_errors(yaml: &str) -> Vec<String> {
    match Snapshot::from_yaml(yaml) {
        Ok(_) => panic!("expected errors"),
        Err(e) => e.iter().map(|e| e.to_string()).collect(),
    }
}

#[test]
fn invalid_authorization_policies_are_reported_with_file_and_line() {
    let yaml = "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: typo
  namespace: demo
spec:
  rules:
  - from:
    - source:
        principal: [\"cluster.local/ns/demo/sa/client\"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: values
  namespace: demo
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        principals:
        - \"cluster.local/ns/demo/sa/client\"
        - \"cluster.local/ns/*/sa/client\"
        ipBlocks: [\"10.0.0.0/33\"]
    - source: {}
    to:
    - operation:
        ports: [\"http\"]
  - when:
    - key: destination.namespace
      values: [\"demo\"]
    - key: source.ip
  - from: []
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: ports
  namespace: demo
spec:
  rules:
  - to:
    - operation:
        ports: [8080]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny
  namespace: demo
spec:
  action: DENY
  selector:
    matchLabels:
      app: \"*\"
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: action, namespace: demo}
spec:
  action: REJECT
";
    assert_eq!(
        load_errors(yaml),
        vec![
            "<inline>:10: document 1 (AuthorizationPolicy demo/typo): spec.rules[0].from[0].source.principal: unknown field `principal`, expected one of `principals`, `notPrincipals`, `requestPrincipals`, `notRequestPrincipals`, `namespaces`, `notNamespaces`, `serviceAccounts`, `notServiceAccounts`, `ipBlocks`, `notIpBlocks`, `remoteIpBlocks`, `notRemoteIpBlocks`",
            "<inline>:24: document 2 (AuthorizationPolicy demo/values): spec.rules[0].from[0].source.principals[1]: invalid value \"cluster.local/ns/*/sa/client\": `*` is only supported alone, as a prefix or as a suffix",
            "<inline>:25: document 2 (AuthorizationPolicy demo/values): spec.rules[0].from[0].source.ipBlocks[0]: invalid IP address or CIDR \"10.0.0.0/33\"",
            "<inline>:26: document 2 (AuthorizationPolicy demo/values): spec.rules[0].from[1].source: must not be empty (omit the `from` entry to match any source)",
            "<inline>:29: document 2 (AuthorizationPolicy demo/values): spec.rules[0].to[0].operation.ports[0]: invalid port \"http\": expected a number 0-65535",
            "<inline>:31: document 2 (AuthorizationPolicy demo/values): spec.rules[1].when[0].key: attribute destination.namespace is replaced by metadata.namespace",
            "<inline>:33: document 2 (AuthorizationPolicy demo/values): spec.rules[1].when[1]: at least one of `values` or `notValues` must be set for key source.ip",
            "<inline>:34: document 2 (AuthorizationPolicy demo/values): spec.rules[2].from: must not be empty (omit `from` to match any source)",
            "<inline>:45: document 3 (AuthorizationPolicy demo/ports): spec.rules[0].to[0].operation.ports: ports are strings: write \"8080\" (quoted), not 8080",
            "<inline>:56: document 4 (AuthorizationPolicy demo/deny): spec.selector.matchLabels.app: wildcard is not supported in selector: \"app=*\"",
            "<inline>:52: document 4 (AuthorizationPolicy demo/deny): spec.rules: a DENY policy without rules never triggers: add an empty rule `{}` to deny every connection",
            "<inline>:62: document 5 (AuthorizationPolicy demo/action): spec.action: unknown variant `REJECT`, expected one of `ALLOW`, `DENY`, `AUDIT`, `CUSTOM`",
        ]
    );
}

#[test]
fn invalid_peer_authentications_are_reported_with_file_and_line() {
    let yaml = "\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: istio-system
spec:
  mtls:
    mode: STRICT
  portLevelMtls:
    8080:
      mode: DISABLE
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: workload
  namespace: demo
spec:
  selector:
    matchLabels:
      app: server
  portLevelMtls:
    0:
      mode: DISABLE
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata:
  name: mode
  namespace: demo
spec:
  mtls:
    mode: STRIKT
";
    assert_eq!(
        load_errors(yaml),
        vec![
            "<inline>:9: document 1 (PeerAuthentication istio-system/default): spec.portLevelMtls: needs a workload selector: a mesh- or namespace-wide PeerAuthentication cannot set port-level mTLS",
            "<inline>:23: document 2 (PeerAuthentication demo/workload): spec.portLevelMtls.0: invalid port \"0\": expected a number 1-65535",
            "<inline>:33: document 3 (PeerAuthentication demo/mode): spec.mtls.mode: unknown variant `STRIKT`, expected one of `UNSET`, `DISABLE`, `PERMISSIVE`, `STRICT`",
        ]
    );
}

#[test]
fn unknown_security_kinds_load_and_fail_closed_on_what_they_could_select() {
    // A typo in the kind, a version Istio does not serve, a kind weft does not enforce yet: the
    // snapshot loads (the node starts, the rest applies), nothing they could select is allowed.
    let f = |extra: &str| {
        let s = Snapshot::from_yaml(&format!("{CLUSTER}---\n{extra}")).unwrap();
        let set = PolicySet::build(&s, ROOT);
        (s, set)
    };
    let (s, set) = f("apiVersion: security.istio.io/v1
kind: AuthorisationPolicy
metadata: {name: deny-other, namespace: demo}
spec:
  selector: {matchLabels: {app: other}}
  action: DENY
  rules: [{}]
");
    assert_eq!(s.not_applied.len(), 1, "{:?}", s.not_applied);
    assert_eq!(set.len(), 0);
    let fx = Fixture { snapshot: s, set };
    assert_eq!(
        fx.decide(conn("demo/other", 8080, Some(CLIENT))),
        deny("demo/deny-other", DenyReason::FailClosed)
    );
    assert_eq!(
        fx.set.mtls_mode(fx.pod("demo/other"), 8080),
        MtlsMode::Strict
    );
    // Its selector does not reach demo/server, nor other namespaces.
    assert!(fx.allowed(conn("demo/server", 8080, Some(CLIENT))));
    assert!(fx.allowed(conn("prod/db", 5432, Some(CLIENT))));
    assert_eq!(
        fx.set.mtls_mode(fx.pod("demo/server"), 8080),
        MtlsMode::Permissive
    );

    // No selector: the whole namespace.
    let (s, set) = f("apiVersion: security.istio.io/v2
kind: AuthorizationPolicy
metadata: {name: future, namespace: prod}
spec: {whatever: 1}
");
    let fx = Fixture { snapshot: s, set };
    assert_eq!(
        fx.decide(conn("prod/db", 5432, Some(CLIENT))),
        deny("prod/future", DenyReason::FailClosed)
    );
    assert!(fx.allowed(conn("demo/server", 8080, Some(CLIENT))));

    // In the root namespace: every namespace (here through a selector that matches app=server).
    let (s, set) = f("apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: istio-system}
spec:
  selector: {matchLabels: {app: server}}
  jwtRules: [{issuer: x}]
");
    let fx = Fixture { snapshot: s, set };
    assert_eq!(
        fx.decide(conn("demo/server", 8080, Some(CLIENT))),
        deny("istio-system/jwt", DenyReason::FailClosed)
    );
    assert!(fx.allowed(conn("demo/other", 8080, Some(CLIENT))));
    assert_eq!(fx.set.fail_closed().len(), 1);

    // A garbled selector widens the scope to every pod in reach.
    let (s, set) = f("apiVersion: security.istio.io/v1
kind: AuthorizationPolicyy
metadata: {name: odd, namespace: demo}
spec:
  selector: {matchLabels: [app, other]}
");
    let fx = Fixture { snapshot: s, set };
    assert!(!fx.allowed(conn("demo/server", 8080, Some(CLIENT))));
    assert!(!fx.allowed(conn("demo/other", 8080, Some(CLIENT))));
}

#[test]
fn invalid_policies_in_files_fail_closed_while_the_rest_applies() {
    let f = |extra: &str| {
        let parsed = Snapshot::parse_yaml(&format!("{CLUSTER}---\n{extra}"));
        let rejected: Vec<String> = parsed.rejected.iter().map(|e| e.to_string()).collect();
        let snapshot = parsed.builder.build(1, Vec::new());
        let set = PolicySet::build(&snapshot, ROOT);
        (rejected, Fixture { snapshot, set })
    };
    // An ALLOW with a misspelt field is present but allows nothing: the pods it selects keep
    // what their valid ALLOW policies allow, and no more.
    let (rejected, fx) = f("apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-bad, namespace: demo}
spec:
  selector: {matchLabels: {app: server}}
  rules: [{to: [{operation: {portz: [\"8080\"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-9090, namespace: demo}
spec:
  selector: {matchLabels: {app: server}}
  rules: [{to: [{operation: {ports: [\"9090\"]}}]}]
");
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert!(
        rejected[0].contains("(AuthorizationPolicy demo/allow-bad)")
            && rejected[0].contains("portz"),
        "{rejected:?}"
    );
    assert!(fx.allowed(conn("demo/server", 9090, Some(CLIENT))));
    assert!(!fx.allowed(conn("demo/server", 8080, Some(CLIENT))));
    assert!(
        fx.allowed(conn("demo/other", 8080, Some(CLIENT))),
        "not selected"
    );
    assert_eq!(
        fx.set.mtls_mode(fx.pod("demo/server"), 8080),
        MtlsMode::Permissive,
        "an ALLOW does not change mTLS"
    );

    // A DENY that fails its checks denies everything it could have selected.
    let (rejected, fx) = f("apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-bad, namespace: demo}
spec:
  selector: {matchLabels: {app: other}}
  action: DENY
  rules: [{from: [{source: {principal: [x]}}]}]
");
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(
        fx.decide(conn("demo/other", 8080, Some(CLIENT))),
        deny("demo/deny-bad", DenyReason::FailClosed)
    );
    assert!(fx.allowed(conn("demo/server", 8080, Some(CLIENT))));

    // Not even YAML, but it reads as a policy of namespace prod: prod fails closed.
    let (rejected, fx) = f("apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: broken
  namespace: prod
spec:
  action: DENY
  rules: [{from: [{source: {namespaces: [demo]}}]
");
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(
        fx.decide(conn("prod/db", 5432, Some(CLIENT))),
        deny("prod/broken", DenyReason::FailClosed)
    );
    assert!(fx.allowed(conn("demo/server", 8080, Some(CLIENT))));

    // A PeerAuthentication that fails its checks: STRICT for what it selects, connections
    // still allowed.
    let (rejected, fx) = f("apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: pa, namespace: demo}
spec:
  selector: {matchLabels: {app: server}}
  mtls: {mode: PERMISIVE}
");
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(
        fx.set.mtls_mode(fx.pod("demo/server"), 8080),
        MtlsMode::Strict
    );
    assert!(fx.allowed(conn("demo/server", 8080, Some(CLIENT))));
}

#[test]
fn kinds_of_other_groups_are_not_validated() {
    // Unknown fields in kinds of groups weft does not read stay their owners' business.
    let s = Snapshot::from_yaml(
        "apiVersion: example.com/v1\nkind: AuthorizationPolicy\nmetadata: {name: r}\nspec: {whatever: 1}\n",
    )
    .unwrap();
    assert!(s.not_applied.is_empty() && s.fail_closed.is_empty());
    assert_eq!(PolicySet::build(&s, ROOT).len(), 0);
}

#[test]
fn invalid_policies_are_refused_and_fail_closed_by_their_action() {
    // Every source feeds the same builder: an invalid policy is refused there with the field
    // path, so the policy engine only ever compiles valid ones; what the invalid one could
    // select fails closed: a DENY denies everything, an ALLOW allows nothing.
    let raw = |name: &str, spec: serde_json::Value| {
        crate::registry::Object::Other(crate::registry::RawObject {
            api_version: "security.istio.io/v1".into(),
            kind: "AuthorizationPolicy".into(),
            namespace: Some("demo".into()),
            name: name.into(),
            value: serde_json::json!({ "spec": spec }),
        })
    };
    let mut b = crate::registry::SnapshotBuilder::new();
    let errors = |r: Result<_, Vec<crate::registry::FieldError>>| -> Vec<String> {
        r.unwrap_err().iter().map(|e| e.to_string()).collect()
    };
    assert_eq!(
        errors(b.insert(raw("bad", serde_json::json!({"action": "DENY"})))),
        ["spec.rules: a DENY policy without rules never triggers: add an empty rule `{}` to deny every connection"]
    );
    assert_eq!(
        errors(b.insert(raw("typo", serde_json::json!({"rule": []})))),
        ["spec.rule: unknown field `rule`, expected one of `selector`, `targetRef`, `targetRefs`, `rules`, `action`, `provider`"]
    );
    b.insert(raw(
        "good",
        serde_json::json!({"action": "DENY", "rules": [{}]}),
    ))
    .unwrap();
    let snapshot = b.build(1, Vec::new());
    let effects: Vec<(&str, FailEffect)> = snapshot
        .fail_closed
        .iter()
        .map(|f| (f.name.as_str(), f.effect))
        .collect();
    assert_eq!(
        effects,
        [
            ("bad", FailEffect::DenyAll),
            ("typo", FailEffect::AllowNothing)
        ]
    );
    // The valid DENY and the ALLOW that allows nothing in place of `typo`.
    let set = PolicySet::build(&snapshot, ROOT);
    assert_eq!(set.len(), 2);
}

mod l7;
