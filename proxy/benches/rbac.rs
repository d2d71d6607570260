//! AuthorizationPolicy engine: 10 000 policies over 1 000 namespaces.
//!
//! `cargo bench -p weft-proxy --bench rbac`
//!
//! Every namespace `ns-N` (999 of them) holds 10 policies — ALLOW by principal (exact and
//! prefix), by namespace (with a wildcard) and port, by principal suffix with a `when` on the
//! port; DENY by CIDR and port, and by namespace with `notPorts` — two of them behind a selector
//! that the benchmarked pods do not match; the root namespace holds 10 mesh-wide ones. Each
//! namespace has one pod. Measured: `PolicySet::build` over the snapshot (the policies already
//! parsed and checked by the registry), loading the YAML and building (what a registry change
//! costs end to end), and `authorize` for an
//! allowed connection (hit), one no ALLOW policy matches (miss, so every applicable policy is
//! evaluated) and one a DENY policy matches.
//!
//! L7: 100 and 10 000 policies (10 and 1 000 namespaces of 10, 10 in the root namespace) whose
//! rules combine methods, paths (prefix, suffix, `{*}` template), hosts and `request.headers`
//! conditions with L4 attributes. Measured: `authorize_request` for an allowed request (hit),
//! one no ALLOW rule matches (miss), one a DENY rule matches, and `authorize_connection` of an
//! HTTP connection (the connect stage).

use std::fmt::Write as _;
use std::hint::black_box;
use std::net::IpAddr;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use http::HeaderMap;
use weft::policy::{
    ConnRequest, ConnectionDecision, Decision, DenyReason, HttpRequest, PolicySet, Protocol,
};
use weft::registry::Snapshot;

const NAMESPACES: usize = 999;
const PER_NAMESPACE: usize = 10;
const ROOT: &str = "istio-system";

fn policy(out: &mut String, ns: &str, j: usize, action: &str, body: &str) {
    write!(
        out,
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p-{j:02}\n  namespace: {ns}\nspec:\n  action: {action}\n{body}"
    )
    .unwrap();
}

fn cluster() -> String {
    let mut y = String::new();
    for i in 0..NAMESPACES {
        let ns = format!("ns-{i}");
        write!(
            y,
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: app\n  namespace: {ns}\n  uid: uid-{i}\n  labels: {{app: app-0}}\nstatus: {{podIP: 10.{}.{}.10}}\n",
            100 + i / 256,
            i % 256
        )
        .unwrap();
        let (n1, n2, n3) = (
            (i + 1) % NAMESPACES,
            (i + 2) % NAMESPACES,
            (i + 3) % NAMESPACES,
        );
        for j in 0..PER_NAMESPACE {
            let (action, body) = match j % 5 {
                0 => ("ALLOW", format!(
                    "  selector:\n    matchLabels: {{app: app-{j}}}\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/ns-{n1}/sa/sa-{j}\", \"cluster.local/ns/ns-{n2}/*\"]\n"
                )),
                1 => ("ALLOW", format!(
                    "  rules:\n  - from:\n    - source:\n        namespaces: [\"ns-{n3}\", \"team-{j}-*\"]\n    to:\n    - operation:\n        ports: [\"8080\", \"8443\"]\n"
                )),
                2 => ("DENY", format!(
                    "  rules:\n  - from:\n    - source:\n        ipBlocks: [\"10.{j}.{}.0/24\", \"172.31.{j}.0/24\"]\n    to:\n    - operation:\n        ports: [\"22\", \"2222\"]\n",
                    i % 256
                )),
                3 => ("ALLOW", format!(
                    "  rules:\n  - from:\n    - source:\n        principals: [\"*/sa/monitor-{j}\"]\n    when:\n    - key: destination.port\n      values: [\"9090\"]\n"
                )),
                _ => ("DENY", format!(
                    "  selector:\n    matchLabels: {{app: app-{j}}}\n  rules:\n  - from:\n    - source:\n        namespaces: [\"blocked-{i}\"]\n    to:\n    - operation:\n        notPorts: [\"80\"]\n"
                )),
            };
            policy(&mut y, &ns, j, action, &body);
        }
    }
    for j in 0..PER_NAMESPACE {
        let (action, body) = match j % 2 {
            0 => ("DENY", format!(
                "  rules:\n  - from:\n    - source:\n        ipBlocks: [\"192.0.{j}.0/24\"]\n  - to:\n    - operation:\n        ports: [\"{}\"]\n",
                9990 + j
            )),
            _ => ("ALLOW", format!(
                "  selector:\n    matchLabels: {{app: gateway-{j}}}\n  rules:\n  - from:\n    - source:\n        notPrincipals: [\"*\"]\n"
            )),
        };
        policy(&mut y, ROOT, j, action, &body);
    }
    y
}

fn bench(c: &mut Criterion) {
    let snapshot = Snapshot::from_yaml(&cluster()).expect("bench cluster loads");
    let set = PolicySet::build(&snapshot, ROOT);
    assert_eq!(set.len(), NAMESPACES * PER_NAMESPACE + PER_NAMESPACE);
    assert!(snapshot.not_applied.is_empty() && snapshot.fail_closed.is_empty());

    c.bench_function("build 10k policies", |b| {
        b.iter(|| PolicySet::build(black_box(&snapshot), ROOT))
    });

    // What a registry change costs end to end: the YAML read into a snapshot (every policy
    // parsed and checked by the registry), then the policies compiled.
    let yaml = cluster();
    c.bench_function("load and build 10k policies", |b| {
        b.iter(|| {
            let snapshot = Snapshot::from_yaml(black_box(&yaml)).unwrap();
            PolicySet::build(&snapshot, ROOT)
        })
    });

    let pod = snapshot.pod("ns-500", "app").unwrap();
    let request = |principal: &'static str, port: u16, ip: &str| ConnRequest {
        destination: pod,
        destination_port: port,
        destination_ip: pod.ip,
        source_principal: Some(principal),
        source_namespace: None,
        source_ip: Some(ip.parse::<IpAddr>().unwrap()),
    };
    let hit = request("cluster.local/ns/ns-503/sa/web", 8080, "10.50.0.7");
    let miss = request("cluster.local/ns/elsewhere/sa/web", 8080, "10.50.0.7");
    let deny = request("cluster.local/ns/ns-7/sa/web", 22, "10.2.244.9");
    assert_eq!(set.authorize(&hit), Decision::Allow);
    assert!(matches!(
        set.authorize(&miss),
        Decision::Deny {
            reason: DenyReason::NotAllowed,
            ..
        }
    ));
    assert_eq!(
        set.authorize(&deny),
        Decision::Deny {
            policy: "ns-500/p-02".into(),
            reason: DenyReason::DenyPolicy
        }
    );

    c.bench_function("authorize hit", |b| {
        b.iter(|| set.authorize(black_box(&hit)))
    });
    c.bench_function("authorize miss", |b| {
        b.iter(|| set.authorize(black_box(&miss)))
    });
    c.bench_function("authorize deny", |b| {
        b.iter(|| set.authorize(black_box(&deny)))
    });
}

/// `namespaces` namespaces of 10 policies with HTTP attributes, and 10 in the root namespace.
fn http_cluster(namespaces: usize) -> String {
    let mut y = String::new();
    for i in 0..namespaces {
        let ns = format!("ns-{i}");
        write!(
            y,
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: app\n  namespace: {ns}\n  uid: uid-{i}\n  labels: {{app: app-0}}\nstatus: {{podIP: 10.{}.{}.10}}\n",
            100 + i / 256,
            i % 256
        )
        .unwrap();
        let n1 = (i + 1) % namespaces;
        for j in 0..PER_NAMESPACE {
            let (action, body) = match j % 5 {
                0 => ("ALLOW", format!(
                    "  selector:\n    matchLabels: {{app: app-{j}}}\n  rules:\n  - from:\n    - source:\n        namespaces: [\"ns-{n1}\"]\n    to:\n    - operation:\n        methods: [\"GET\", \"HEAD\"]\n        paths: [\"/api/v{j}/*\", \"*.css\"]\n    when:\n    - key: request.headers[X-Tenant]\n      values: [\"tenant-{i}\", \"team-*\"]\n"
                )),
                1 => ("ALLOW", format!(
                    "  rules:\n  - to:\n    - operation:\n        methods: [\"POST\"]\n        paths: [\"/orders/{{*}}/items\"]\n        hosts: [\"shop-{i}.example\", \"*.shop-{i}.internal\"]\n"
                )),
                2 => ("DENY", format!(
                    "  rules:\n  - from:\n    - source:\n        notNamespaces: [\"{ns}\", \"ns-{n1}\"]\n    to:\n    - operation:\n        paths: [\"/admin/*\"]\n"
                )),
                3 => ("ALLOW", format!(
                    "  rules:\n  - from:\n    - source:\n        principals: [\"*/sa/monitor-{j}\"]\n    to:\n    - operation:\n        paths: [\"/metrics\"]\n"
                )),
                _ => ("DENY", format!(
                    "  selector:\n    matchLabels: {{app: app-{j}}}\n  rules:\n  - when:\n    - key: request.headers[x-debug-{j}]\n      values: [\"*\"]\n"
                )),
            };
            policy(&mut y, &ns, j, action, &body);
        }
    }
    for j in 0..PER_NAMESPACE {
        let (action, body) = match j % 2 {
            0 => ("DENY", format!(
                "  rules:\n  - when:\n    - key: request.headers[x-blocked-{j}]\n      values: [\"*\"]\n  - to:\n    - operation:\n        methods: [\"TRACE\"]\n        notPaths: [\"/debug/{j}\"]\n"
            )),
            _ => ("ALLOW", format!(
                "  selector:\n    matchLabels: {{app: gateway-{j}}}\n  rules:\n  - to:\n    - operation:\n        hosts: [\"*\"]\n"
            )),
        };
        policy(&mut y, ROOT, j, action, &body);
    }
    y
}

fn bench_http(c: &mut Criterion) {
    for namespaces in [10, 1000] {
        let snapshot = Snapshot::from_yaml(&http_cluster(namespaces)).expect("bench cluster loads");
        let set = PolicySet::build(&snapshot, ROOT);
        let policies = namespaces * PER_NAMESPACE + PER_NAMESPACE;
        assert_eq!(set.len(), policies);
        assert!(snapshot.not_applied.is_empty() && snapshot.fail_closed.is_empty());
        let i = namespaces / 2;
        let pod = snapshot.pod(&format!("ns-{i}"), "app").unwrap();
        let friend_principal = format!("cluster.local/ns/ns-{}/sa/web", i + 1);
        let conn = |principal| ConnRequest {
            destination: pod,
            destination_port: 8080,
            destination_ip: pod.ip,
            source_principal: Some(principal),
            source_namespace: None,
            source_ip: Some("10.50.0.7".parse::<IpAddr>().unwrap()),
        };
        let friend = conn(friend_principal.as_str());
        let stranger = conn("cluster.local/ns/elsewhere/sa/web");
        let mut headers = HeaderMap::new();
        headers.insert("x-tenant", "team-blue".parse().unwrap());
        headers.insert("user-agent", "bench".parse().unwrap());
        headers.insert("accept", "*/*".parse().unwrap());
        let request = |path: &'static str| HttpRequest {
            method: "GET",
            authority: "app.ns:8080",
            path,
            headers: &headers,
        };
        let (hit, miss, denied) = (
            request("/api/v0/users?page=2"),
            request("/nothing"),
            request("/admin/users"),
        );
        assert_eq!(set.authorize_request(&friend, &hit), Decision::Allow);
        assert!(matches!(
            set.authorize_request(&friend, &miss),
            Decision::Deny {
                reason: DenyReason::NotAllowed,
                ..
            }
        ));
        assert_eq!(
            set.authorize_request(&stranger, &denied),
            Decision::Deny {
                policy: format!("ns-{i}/p-02"),
                reason: DenyReason::DenyPolicy
            }
        );
        assert_eq!(
            set.authorize_connection(&friend, Protocol::Http),
            ConnectionDecision::PerRequest
        );

        c.bench_function(
            &format!("authorize_request hit, {policies} policies"),
            |b| b.iter(|| set.authorize_request(black_box(&friend), black_box(&hit))),
        );
        c.bench_function(
            &format!("authorize_request miss, {policies} policies"),
            |b| b.iter(|| set.authorize_request(black_box(&friend), black_box(&miss))),
        );
        c.bench_function(
            &format!("authorize_request deny, {policies} policies"),
            |b| b.iter(|| set.authorize_request(black_box(&stranger), black_box(&denied))),
        );
        c.bench_function(
            &format!("authorize_connection http, {policies} policies"),
            |b| b.iter(|| set.authorize_connection(black_box(&friend), Protocol::Http)),
        );
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = bench, bench_http
}
criterion_main!(benches);
