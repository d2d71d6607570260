//! The outbound plan: what weft decides for one redirected connection, on a snapshot of 1 000
//! Services with 5 pods each over two nodes and an ALLOW policy per namespace.
//!
//! `cargo bench -p weft-proxy --bench plan`
//!
//! Measured: a Service VIP whose chosen endpoint is on another node (resolve, round robin,
//! identities, the HBONE request), the same on this node (plus AuthorizationPolicy), a pod IP,
//! and an address outside the cluster (passthrough).

use std::fmt::Write as _;
use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{criterion_group, criterion_main, Criterion};
use weft::capture::Redirect;
use weft::outbound::cluster::Clusters;
use weft::outbound::plan::{plan, Action, Context};
use weft::policy::PolicySet;
use weft::registry::Snapshot;

const NAMESPACES: usize = 100;
const SERVICES_PER_NAMESPACE: usize = 10;
const PODS_PER_SERVICE: usize = 5;

fn cluster() -> String {
    let mut y = String::from(
        "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\nstatus: {addresses: [{type: InternalIP, address: 172.30.0.11}]}\n---\napiVersion: v1\nkind: Node\nmetadata: {name: node-b}\nstatus: {addresses: [{type: InternalIP, address: 172.30.0.12}]}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: client, labels: {weft.dev/mesh: enabled}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {namespace: client, name: client, uid: u-client}\nspec: {nodeName: node-a, serviceAccountName: client}\nstatus: {podIP: 10.250.0.2, phase: Running}\n",
    );
    for n in 0..NAMESPACES {
        let ns = format!("ns-{n}");
        write!(
            y,
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{weft.dev/mesh: enabled}}}}\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: allow-client, namespace: {ns}}}\nspec:\n  rules:\n  - from:\n    - source: {{principals: [cluster.local/ns/client/sa/client]}}\n"
        )
        .unwrap();
        for s in 0..SERVICES_PER_NAMESPACE {
            let svc = n * SERVICES_PER_NAMESPACE + s;
            write!(
                y,
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{s}, namespace: {ns}}}\nspec:\n  clusterIP: 10.96.{}.{}\n  selector: {{app: svc-{s}}}\n  ports: [{{port: 80, targetPort: 8080}}]\n",
                svc / 250,
                svc % 250 + 1
            )
            .unwrap();
            for p in 0..PODS_PER_SERVICE {
                let i = svc * PODS_PER_SERVICE + p;
                // Even pods on node-a (this node), odd ones on node-b.
                let node = if p % 2 == 0 { "node-a" } else { "node-b" };
                write!(
                    y,
                    "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: svc-{s}-{p}, namespace: {ns}, uid: u-{i}, labels: {{app: svc-{s}}}}}\nspec: {{nodeName: {node}, serviceAccountName: svc-{s}}}\nstatus: {{podIP: 10.{}.{}.{}, phase: Running}}\n",
                    100 + i / 65_536,
                    (i / 256) % 256,
                    i % 256
                )
                .unwrap();
            }
        }
    }
    y
}

fn bench(c: &mut Criterion) {
    let snapshot = Snapshot::from_yaml(&cluster()).expect("bench cluster loads");
    let policies = PolicySet::build(&snapshot, "istio-system");
    let clusters = Clusters::default();
    let routes = weft::l7::route::RouteTable::build(&snapshot);
    let ctx = Context {
        node: "node-a",
        trust_domain: "cluster.local",
        hbone_port: 15008,
        snapshot: &snapshot,
        policies: &policies,
        clusters: &clusters,
        routes: &routes,
        roll: 0,
    };
    let client = snapshot.pod("client", "client").cloned();
    assert!(client.is_some());
    let peer: SocketAddr = "10.250.0.2:40000".parse().unwrap();
    let redirect = |dst: &str| Redirect {
        original_dst: dst.parse().unwrap(),
        cgroup_id: 1,
        cookie: 1,
    };
    let run = |r: &Redirect| plan(black_box(r), peer, client.clone(), &ctx);

    // Service 500 (ns-50/svc-0) is 10.96.2.1; its pods alternate node-a, node-b.
    let service = redirect("10.96.2.1:80");
    let kinds: Vec<_> = (0..PODS_PER_SERVICE)
        .map(|_| match run(&service).action {
            Action::Tunnel(_) => "tunnel",
            Action::DeliverLocal { .. } => "local",
            other => panic!("{other:?}"),
        })
        .collect();
    assert!(
        kinds.contains(&"tunnel") && kinds.contains(&"local"),
        "{kinds:?}"
    );

    c.bench_function(
        "plan: Service VIP, round robin over 5 endpoints on 2 nodes",
        |b| b.iter(|| run(&service)),
    );
    let remote_pod = redirect("10.100.9.197:8080");
    assert!(matches!(run(&remote_pod).action, Action::Tunnel(_)));
    c.bench_function("plan: pod IP on another node (HBONE)", |b| {
        b.iter(|| run(&remote_pod))
    });
    let local_pod = redirect("10.100.9.196:8080");
    assert!(matches!(
        run(&local_pod).action,
        Action::DeliverLocal { .. }
    ));
    c.bench_function("plan: pod IP on this node (authorized here)", |b| {
        b.iter(|| run(&local_pod))
    });
    let outside = redirect("192.0.2.10:443");
    assert!(matches!(run(&outside).action, Action::Passthrough { .. }));
    c.bench_function("plan: address outside the cluster (passthrough)", |b| {
        b.iter(|| run(&outside))
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(50)
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
