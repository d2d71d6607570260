//! The route table: matching a request at 10, 1 000 and 10 000 rules, and compiling 10 000.
//!
//! `cargo bench -p weft-proxy --bench route`
//!
//! - `spread N`: N rules over N/10 hosts, one VirtualService of 10 rules per host (prefix, exact,
//!   header and method conditions); the request matches the 6th rule of one host.
//! - `one host N`: one VirtualService with N rules (`uri.prefix /route-i`) on one host; the
//!   request matches the last rule (the path index finds it without trying the others).
//! - `one host, same path N`: N rules that all share the prefix `/` and differ by an exact
//!   header; the request matches the last (the index files such rules by that header).
//! - `one host, regex N`: N rules with regex paths (`/route-i/.*`) on one host; the request
//!   matches the last (the index files a regex by its literal start, `/route-i/`).
//! - `one host, regex without literal N`: the same with `[/]route-i/.*`: nothing can be
//!   indexed, every rule is tried in order — the worst case.
//! - `httproute one host N`: N HTTPRoute rules (16 per route) attached to one Service, sorted by
//!   the Gateway API's precedence; the request matches the last route's last rule.
//! - `build 10k`: `RouteTable::build` over a snapshot of 10 000 VirtualService rules (the
//!   objects already parsed and checked by the registry); `load and build 10k`: YAML →
//!   snapshot → table, what a registry change costs end to end.

use std::fmt::Write as _;
use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue, Method};
use weft::l7::route::{RouteDecision, RouteRequest, RouteTable};
use weft::registry::Snapshot;

const NS: &str = "bench";

fn header(y: &mut String) {
    write!(
        y,
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{namespace: {NS}, name: svc}}\nspec: {{clusterIP: 10.96.0.1, ports: [{{name: http, port: 80}}]}}\n"
    )
    .unwrap();
}

/// N rules over N/10 hosts.
fn spread(n: usize) -> String {
    let mut y = String::new();
    header(&mut y);
    for h in 0..n / 10 {
        write!(
            y,
            "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{namespace: {NS}, name: vs-{h}}}\nspec:\n  hosts: [host-{h}]\n  http:\n"
        )
        .unwrap();
        for r in 0..10 {
            let m = match r % 4 {
                0 => format!("[{{uri: {{exact: /exact-{r}}}}}]"),
                1 => format!("[{{uri: {{prefix: /api/v{r}}}, method: {{exact: POST}}}}]"),
                2 => format!("[{{uri: {{prefix: /p{r}}}, headers: {{x-user: {{exact: u{r}}}}}}}]"),
                _ => format!("[{{uri: {{prefix: /r{r}/}}}}]"),
            };
            write!(
                y,
                "  - match: {m}\n    route: [{{destination: {{host: svc}}}}]\n"
            )
            .unwrap();
        }
    }
    y
}

/// How the rules of [`one_host`] differ.
#[derive(Clone, Copy)]
enum Shape {
    Prefix,
    SamePath,
    Regex,
    RegexWithoutLiteral,
}

/// One host, N rules.
fn one_host(n: usize, shape: Shape) -> String {
    let mut y = String::new();
    header(&mut y);
    write!(
        y,
        "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{namespace: {NS}, name: big}}\nspec:\n  hosts: [svc]\n  http:\n"
    )
    .unwrap();
    for i in 0..n {
        let m = match shape {
            Shape::Prefix => format!("{{uri: {{prefix: /route-{i}/}}}}"),
            Shape::SamePath => {
                format!("{{uri: {{prefix: /}}, headers: {{x-rule: {{exact: '{i}'}}}}}}")
            }
            Shape::Regex => format!("{{uri: {{regex: '/route-{i}/.*'}}}}"),
            Shape::RegexWithoutLiteral => format!("{{uri: {{regex: '[/]route-{i}/.*'}}}}"),
        };
        write!(
            y,
            "  - match: [{m}]\n    route: [{{destination: {{host: svc}}}}]\n"
        )
        .unwrap();
    }
    y
}

/// N HTTPRoute rules on one Service, 16 per route.
fn httproutes(n: usize) -> String {
    let mut y = String::new();
    header(&mut y);
    for r in 0..n.div_ceil(16) {
        write!(
            y,
            "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{namespace: {NS}, name: r-{r:05}}}\nspec:\n  parentRefs: [{{group: '', kind: Service, name: svc, port: 80}}]\n  rules:\n"
        )
        .unwrap();
        for i in 0..16.min(n - r * 16) {
            write!(y, "  - matches: [{{path: {{type: PathPrefix, value: /r{r}/rule-{i}}}, headers: [{{name: x-a, value: b}}]}}]\n    backendRefs: [{{name: svc, port: 80}}]\n").unwrap();
        }
    }
    y
}

fn table(yaml: &str) -> RouteTable {
    let snapshot = Snapshot::from_yaml(yaml).expect("valid bench registry");
    RouteTable::build(&snapshot)
}

fn matched(t: &RouteTable, host: &str, path: &str, headers: &HeaderMap, method: &Method) -> bool {
    let req = RouteRequest {
        host,
        port: 80,
        source_namespace: Some("client"),
        source_labels: None,
        method,
        authority: host,
        path_and_query: path,
        headers,
    };
    matches!(t.route(black_box(&req)), RouteDecision::Matched(_))
}

fn bench(c: &mut Criterion) {
    let get = Method::GET;
    let mut user = HeaderMap::new();
    user.insert("x-user", HeaderValue::from_static("u6"));
    user.insert("x-a", HeaderValue::from_static("b"));
    for n in [10, 1_000, 10_000] {
        let t = table(&spread(n));
        let host = format!("host-{}.{NS}.svc.cluster.local", n / 20);
        assert!(matched(&t, &host, "/p6/items?id=3", &user, &get));
        c.bench_function(&format!("spread {n}"), |b| {
            b.iter(|| matched(&t, &host, "/p6/items?id=3", &user, &get))
        });

        let t = table(&one_host(n, Shape::Prefix));
        let host = format!("svc.{NS}.svc.cluster.local");
        let path = format!("/route-{}/x", n - 1);
        assert!(matched(&t, &host, &path, &user, &get));
        c.bench_function(&format!("one host {n}"), |b| {
            b.iter(|| matched(&t, &host, &path, &user, &get))
        });

        let t = table(&one_host(n, Shape::SamePath));
        let mut last = HeaderMap::new();
        last.insert(
            "x-rule",
            HeaderValue::from_str(&(n - 1).to_string()).unwrap(),
        );
        assert!(matched(&t, &host, "/x", &last, &get));
        c.bench_function(&format!("one host, same path {n}"), |b| {
            b.iter(|| matched(&t, &host, "/x", &last, &get))
        });

        let t = table(&one_host(n, Shape::Regex));
        assert!(matched(&t, &host, &path, &user, &get));
        c.bench_function(&format!("one host, regex {n}"), |b| {
            b.iter(|| matched(&t, &host, &path, &user, &get))
        });

        let t = table(&one_host(n, Shape::RegexWithoutLiteral));
        assert!(matched(&t, &host, &path, &user, &get));
        c.bench_function(&format!("one host, regex without literal {n}"), |b| {
            b.iter(|| matched(&t, &host, &path, &user, &get))
        });

        let t = table(&httproutes(n));
        let last_route = n.div_ceil(16) - 1;
        let path = format!("/r{last_route}/rule-{}/x", (n - 1) % 16);
        assert!(matched(&t, &host, &path, &user, &get));
        c.bench_function(&format!("httproute one host {n}"), |b| {
            b.iter(|| matched(&t, &host, &path, &user, &get))
        });
    }
    let yaml = spread(10_000);
    let snapshot = Snapshot::from_yaml(&yaml).unwrap();
    assert_eq!(RouteTable::build(&snapshot).len(), 10_000);
    c.bench_function("build 10k", |b| {
        b.iter(|| RouteTable::build(black_box(&snapshot)))
    });
    c.bench_function("load and build 10k", |b| b.iter(|| table(black_box(&yaml))));
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
