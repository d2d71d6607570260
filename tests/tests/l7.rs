//! End-to-end: weft's L7 engine on two simulated nodes — Istio VirtualService, DestinationRule
//! and ServiceEntry routing, Gateway API HTTPRoute and GRPCRoute, rewrites, redirects and header
//! changes, TLS origination to a DNS-resolved external host, gRPC, HTTP/1.1 and HTTP/2 clients and
//! WebSocket on one Service, L7 AuthorizationPolicy, refusal of malformed requests, invalid route
//! objects, route timeouts, fault injection, and one flow record per request with Envoy response
//! flags.
//!
//! Most tests share one cluster (built by the first test that needs it, torn down when the
//! binary exits); each uses Services and routing objects of its own, so they run in parallel.
//! The tests that change what every test depends on (an invalid object in the registry, weft's
//! DNS server) build their own. The tools they use (testpod's HTTP/h2c/TLS/WebSocket server and
//! clients, the gRPC echo, dnsmasq) are checked without weft in `harness.rs`.
//!
//! Topology of the shared cluster:
//! - node-a: `front/client` (sa client), `back/reviews-v3` (app=reviews, version=v3);
//! - node-b: `back/reviews-v1`, `back/reviews-v2` (version v1, v2), `back/ratings-0`
//!   (app=ratings), `back/sink-0` (app=sink, a raw TCP echo: whatever reaches it comes back);
//! - each reviews pod serves HTTP on 9080 (`weft-testpod serve --mode http`) and gRPC on 50051
//!   (`tests/grpc/echo.py`), answering with its name;
//! - `front` and `back` are enrolled (`weft.dev/mesh=enabled`); weft runs on both nodes.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use weft_tests::traffic::{
    grpc_call, http, http_load, json_str as s, serve, serve_grpc, serve_https, testpod, websocket,
    HttpReply, LoadSummary,
};
use weft_tests::*;

const ENROLL: (&str, &str) = ("weft.dev/mesh", "enabled");
/// How long a routing change may take to apply (weft reloads the registry within a second).
const WAIT: Duration = Duration::from_secs(20);
const HTTP_PORT: u16 = 9080;
const GRPC_PORT: u16 = 50051;
/// What Envoy (and so Istio) answers a request an AuthorizationPolicy denies.
const RBAC_DENIED: &str = "RBAC: access denied";

/// YAML written indented in the source: the common leading whitespace removed.
fn dedent(text: &str) -> String {
    let lines: Vec<&str> = text.lines().skip_while(|l| l.trim().is_empty()).collect();
    let indent = lines
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    let mut out = String::new();
    for l in lines {
        out.push_str(l.get(indent..).unwrap_or("").trim_end());
        out.push('\n');
    }
    out
}

#[test]
fn dedent_keeps_relative_indentation() {
    assert_eq!(
        dedent("\n    a:\n      b: 1\n\n    c: 2\n  "),
        "a:\n  b: 1\n\nc: 2\n\n"
    );
}

/// `<svc>.back.svc.cluster.local`: the Host clients send.
fn fqdn(svc: &str) -> String {
    format!("{svc}.back.svc.cluster.local")
}

/// The shared cluster (see the module comment).
struct L7 {
    client: Pod,
    reviews: Vec<Pod>,
    services: BTreeMap<String, Service>,
    weft_a: Weft,
    weft_b: Weft,
    _servers: Vec<Proc>,
    /// Last: dropped after the processes above.
    cluster: Cluster,
}

impl L7 {
    fn svc(&self, name: &str) -> &Service {
        self.services
            .get(name)
            .unwrap_or_else(|| panic!("no Service {name} in the shared cluster"))
    }

    fn apply(&self, yaml: &str) {
        self.cluster.apply_yaml(&dedent(yaml)).unwrap();
    }

    /// `count` requests over one connection from the client to Service `svc` (Host: its FQDN),
    /// with more `http-load` flags.
    fn load(&self, svc: &str, count: u64, args: &[&str]) -> LoadSummary {
        let host = fqdn(svc);
        let mut all = vec!["--host", host.as_str()];
        all.extend_from_slice(args);
        http_load(&self.client, self.svc(svc).addr(HTTP_PORT), count, &all)
    }

    /// One HTTP/1.1 request from the client to Service `svc` (Host: its FQDN).
    fn get(&self, svc: &str, args: &[&str]) -> HttpReply {
        let host = fqdn(svc);
        let mut all = vec!["--host", host.as_str()];
        all.extend_from_slice(args);
        http(&self.client, self.svc(svc).addr(HTTP_PORT), &all)
    }
}

/// The reviews Services of the shared cluster, each for one test, all selecting app=reviews.
const REVIEWS_SERVICES: &[&str] = &[
    "reviews",
    "reviews-match",
    "reviews-gw",
    "reviews-edit",
    "reviews-proto",
    "reviews-flows",
    "reviews-live",
    "reviews-timeout",
    "reviews-timeout-gw",
    "reviews-fault",
    "reviews-mirror",
    "reviews-mirror-gw",
    "reviews-retry",
    "reviews-retry-default",
    "reviews-budget",
    "reviews-retry-gw",
    "reviews-lb",
    "reviews-lb-rr",
    "reviews-lb-random",
    "reviews-cb",
    "reviews-od",
    "reviews-hash",
    "reviews-cookie",
    "reviews-zone",
    "reviews-spread",
    "reviews-pass",
];

fn build_shared() -> L7 {
    let cluster = Cluster::new("l7_shared").unwrap();
    let a = cluster.add_node("node-a").unwrap();
    let b = cluster.add_node("node-b").unwrap();
    // Two zones of one region (locality-aware balancing): the client and reviews-v3 in z1,
    // reviews-v1 and v2 in z2.
    for (node, zone) in [(&a, "z1"), (&b, "z2")] {
        let topology = labels(&[
            ("topology.kubernetes.io/region", "r1"),
            ("topology.kubernetes.io/zone", zone),
        ]);
        cluster.set_node_labels(node, topology).unwrap();
    }
    let client = cluster
        .add_pod(
            &a,
            PodSpec::new("front", "client").service_account("client"),
        )
        .unwrap();
    let mut reviews = Vec::new();
    for (name, node, version, warm) in [
        ("reviews-v1", &b, "v1", "yes"),
        ("reviews-v2", &b, "v2", "yes"),
        ("reviews-v3", &a, "v3", "later"),
    ] {
        reviews.push(
            cluster
                .add_pod(
                    node,
                    PodSpec::new("back", name)
                        .label("app", "reviews")
                        .label("version", version)
                        .label("warm", warm)
                        .service_account("reviews")
                        .port("http", HTTP_PORT)
                        .port("grpc", GRPC_PORT),
                )
                .unwrap(),
        );
    }
    let ratings = cluster
        .add_pod(
            &b,
            PodSpec::new("back", "ratings-0")
                .label("app", "ratings")
                .service_account("ratings")
                .port("http", HTTP_PORT),
        )
        .unwrap();
    let sink = cluster
        .add_pod(
            &b,
            PodSpec::new("back", "sink-0")
                .label("app", "sink")
                .service_account("sink")
                .port("http", HTTP_PORT),
        )
        .unwrap();
    let mut services = BTreeMap::new();
    let mut add = |spec: ServiceSpec| {
        let svc = cluster.add_service(spec).unwrap();
        services.insert(svc.name.clone(), svc);
    };
    for name in REVIEWS_SERVICES {
        add(ServiceSpec::new("back", name)
            .selector("app", "reviews")
            .port("http", HTTP_PORT, HTTP_PORT, None));
    }
    for name in ["reviews-grpc", "reviews-grpc-fault"] {
        add(ServiceSpec::new("back", name)
            .selector("app", "reviews")
            .port("grpc", GRPC_PORT, GRPC_PORT, None));
    }
    for v in ["v1", "v2", "v3"] {
        add(ServiceSpec::new("back", &format!("reviews-{v}"))
            .selector("app", "reviews")
            .selector("version", v)
            .port("http", HTTP_PORT, HTTP_PORT, None)
            .port("grpc", GRPC_PORT, GRPC_PORT, None));
    }
    // Its endpoints: reviews-v1 and v2, then v3 too (the slow start test relabels it).
    add(ServiceSpec::new("back", "reviews-warm")
        .selector("app", "reviews")
        .selector("warm", "yes")
        .port("http", HTTP_PORT, HTTP_PORT, None));
    add(ServiceSpec::new("back", "ratings")
        .selector("app", "ratings")
        .port("http", HTTP_PORT, HTTP_PORT, None));
    add(ServiceSpec::new("back", "sink")
        .selector("app", "sink")
        .port("http", HTTP_PORT, HTTP_PORT, None));
    // Endpoints that refuse connections: nothing listens on 9099.
    add(ServiceSpec::new("back", "closed")
        .selector("app", "reviews")
        .port("http", HTTP_PORT, 9099u16, None));
    cluster
        .set_namespace_labels("front", labels(&[ENROLL]))
        .unwrap();
    cluster
        .set_namespace_labels("back", labels(&[ENROLL]))
        .unwrap();
    let mut servers = Vec::new();
    for p in &reviews {
        servers.push(serve(p, HTTP_PORT, "http"));
        servers.push(serve_grpc(p, GRPC_PORT));
    }
    servers.push(serve(&ratings, HTTP_PORT, "http"));
    servers.push(serve(&sink, HTTP_PORT, "whoami"));
    // Every request is a flow: room for all the tests' requests (a few thousand each).
    let flags = ["--flow-capacity", "50000"];
    let weft_a = Weft::start_with(&cluster, &a, &flags).unwrap();
    let weft_b = Weft::start_with(&cluster, &b, &flags).unwrap();
    L7 {
        client,
        reviews,
        services,
        weft_a,
        weft_b,
        _servers: servers,
        cluster,
    }
}

/// The shared cluster, or why it could not be built.
static SHARED: Mutex<Option<Result<Arc<L7>, String>>> = Mutex::new(None);

/// The shared cluster: built by the first caller, torn down when the test binary exits (a
/// static is never dropped, so an `atexit` hook drops it).
fn shared() -> Arc<L7> {
    let mut slot = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if slot.is_none() {
        let built = std::panic::catch_unwind(build_shared).map_err(|e| {
            e.downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panicked".into())
        });
        *slot = Some(built.map(Arc::new));
        extern "C" fn teardown() {
            let taken = SHARED.lock().unwrap_or_else(|e| e.into_inner()).take();
            drop(taken);
        }
        // SAFETY: registers a plain function without captures; it runs once at exit.
        unsafe { libc::atexit(teardown) };
    }
    let built = slot.as_ref().expect("set above").clone();
    drop(slot);
    built.unwrap_or_else(|e| panic!("the shared L7 cluster could not be built: {e}"))
}

/// Polls the cases until each one's requests all land where it says; panics with the last
/// results otherwise. A case: (what, http-load flags, expected backend or `status=<code>`).
fn wait_for_routes(m: &L7, svc: &str, cases: &[(&str, Vec<&str>, &str)]) {
    let deadline = Instant::now() + WAIT;
    loop {
        let results: Vec<(bool, String)> = cases
            .iter()
            .map(|(what, args, want)| {
                let got = m.load(svc, 6, args);
                let ok = match want.strip_prefix("status=") {
                    Some(code) => got.status(code.parse().unwrap()) == 6,
                    None => got.status(200) == 6 && got.backends.get(*want) == Some(&6),
                };
                (ok, format!("{what}: want {want}, got {got:?}"))
            })
            .collect();
        if results.iter().all(|(ok, _)| *ok) {
            return;
        }
        if Instant::now() > deadline {
            let failed: Vec<&str> = results
                .iter()
                .filter(|(ok, _)| !ok)
                .map(|(_, t)| t.as_str())
                .collect();
            panic!(
                "{svc}: not routed as configured after {WAIT:?}:\n{}",
                failed.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Subsets v1, v2, v3 of a reviews Service by the `version` label.
fn subsets(svc: &str) -> String {
    format!(
        r#"
        apiVersion: networking.istio.io/v1alpha3
        kind: DestinationRule
        metadata:
          name: {svc}
          namespace: back
        spec:
          host: {svc}
          subsets:
          - name: v1
            labels:
              version: v1
          - name: v2
            labels:
              version: v2
          - name: v3
            labels:
              version: v3
        "#
    )
}

/// The canonical VirtualService: `reviews` split between subsets v1 and v2 by weight.
fn weighted(v1: u32, v2: u32) -> String {
    format!(
        r#"
        apiVersion: networking.istio.io/v1alpha3
        kind: VirtualService
        metadata:
          name: reviews
          namespace: back
        spec:
          hosts:
          - reviews
          http:
          - route:
            - destination:
                host: reviews
                subset: v1
              weight: {v1}
            - destination:
                host: reviews
                subset: v2
              weight: {v2}
        "#
    )
}

/// The share of v1 in a 10/90 split over 2 000 requests is 10 ± 3 %.
fn assert_ten_ninety(s: &LoadSummary, n: u64) {
    assert_eq!(s.status(200), n, "{s:?}");
    let (v1, v2) = (s.from_backends("reviews-v1"), s.from_backends("reviews-v2"));
    assert_eq!(v1 + v2, n, "only subsets v1 and v2: {s:?}");
    let share = v1 as f64 / n as f64;
    assert!(
        (0.07..=0.13).contains(&share),
        "v1 got {:.1} % of {n}, not 10 ± 3 %: {s:?}",
        share * 100.0
    );
}

/// 1. The canonical canary as users write it (v1alpha3): requests — not connections — are split
///    10/90; 100/0 sends none to v2, and no weight reaches the unnamed v3.
#[test]
fn weighted_virtual_service_splits_requests_between_subsets() {
    let m = shared();
    m.apply(&subsets("reviews"));
    m.apply(&weighted(10, 90));
    wait_for_route(&m, "reviews", "VirtualService back/reviews http[0]");
    // Over one keep-alive connection: a per-connection balancer answers from one backend only.
    let s = m.load("reviews", 50, &[]);
    assert!(
        s.status(200) == 50 && s.from_backends("reviews-v3") == 0,
        "10/90 not applied: {s:?}"
    );
    assert_ten_ninety(&m.load("reviews", 2000, &[]), 2000);
    // The same over HTTP/2.
    assert_ten_ninety(&m.load("reviews", 2000, &["--http2"]), 2000);

    m.apply(&weighted(100, 0));
    wait_until(WAIT, || {
        m.load("reviews", 50, &[]).backends.get("reviews-v1") == Some(&50)
    })
    .unwrap_or_else(|_| panic!("100/0 not applied: {:?}", m.load("reviews", 50, &[])));
    let s = m.load("reviews", 500, &[]);
    assert_eq!(s.backends.get("reviews-v1"), Some(&500), "{s:?}");
}

/// `reviews-live` routed whole to subset `pick`, which selects `version: {version}`.
fn pick_subset(version: &str) -> String {
    format!(
        r#"
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata:
          name: reviews-live
          namespace: back
        spec:
          host: reviews-live
          subsets:
          - name: pick
            labels:
              version: {version}
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: reviews-live
          namespace: back
        spec:
          hosts:
          - reviews-live
          http:
          - route:
            - destination:
                host: reviews-live
                subset: pick
        "#
    )
}

#[test]
fn a_changed_subset_reaches_requests_on_connections_already_open() {
    // The route stays the same (subset `pick`); what the subset selects changes while a
    // client keeps sending on one connection. Each connection keeps what its requests
    // resolved: it must not outlive the configuration it was resolved under.
    let m = shared();
    m.apply(&pick_subset("v1"));
    for http2 in [false, true] {
        wait_until(WAIT, || {
            m.load("reviews-live", 10, &[]).backends.get("reviews-v1") == Some(&10)
        })
        .unwrap_or_else(|_| panic!("pick=v1 not applied: {:?}", m.load("reviews-live", 10, &[])));
        let host = fqdn("reviews-live");
        let mut cmd = testpod();
        cmd.args([
            "http-load",
            &m.svc("reviews-live").addr(HTTP_PORT).to_string(),
        ])
        .args(["--count", "120", "--interval-ms", "50", "--host", &host]);
        if http2 {
            cmd.arg("--http2");
        }
        let mut load = m.client.spawn(&cmd).unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        m.apply(&pick_subset("v2"));
        load.wait_timeout(Duration::from_secs(60)).unwrap();
        let s: LoadSummary = serde_json::from_str(load.stdout().trim())
            .unwrap_or_else(|e| panic!("no summary ({e}): {}", load.stderr()));
        let what = if http2 { "HTTP/2" } else { "HTTP/1.1" };
        assert_eq!((s.ok, s.connections), (120, 1), "{what}: {s:?}");
        assert_eq!(s.from_backends("reviews-v3"), 0, "{what}: {s:?}");
        assert!(s.from_backends("reviews-v1") > 0, "{what}: {s:?}");
        // The change lands within a second or two of the 6 s of requests.
        assert!(s.from_backends("reviews-v2") >= 40, "{what}: {s:?}");
        m.apply(&pick_subset("v1"));
    }
}

/// The match cases of scenario 2, as (what, flags, backend). A route table that gets them all
/// right honours header, path (exact, prefix, regex), method and query matches, in order.
fn match_cases() -> Vec<(&'static str, Vec<&'static str>, &'static str)> {
    vec![
        (
            "no match: the last route",
            vec!["--path", "/"],
            "reviews-v1",
        ),
        (
            "header exact",
            vec!["--path", "/", "-H", "x-user: jason"],
            "reviews-v2",
        ),
        (
            "header differs",
            vec!["--path", "/", "-H", "x-user: jasonx"],
            "reviews-v1",
        ),
        ("path exact", vec!["--path", "/reviews/exact"], "reviews-v3"),
        (
            "exact is not a prefix",
            vec!["--path", "/reviews/exact/more"],
            "reviews-v1",
        ),
        ("path prefix", vec!["--path", "/reviews/v2/x"], "reviews-v2"),
        ("path regex", vec!["--path", "/ratings/42"], "reviews-v3"),
        (
            "regex matches the whole path",
            vec!["--path", "/ratings/42x"],
            "reviews-v1",
        ),
        (
            "method",
            vec!["--path", "/", "--method", "POST"],
            "reviews-v2",
        ),
        ("query exact", vec!["--path", "/?version=3"], "reviews-v3"),
        (
            "query differs",
            vec!["--path", "/?version=33"],
            "reviews-v1",
        ),
        (
            "first match wins: header before exact path",
            vec!["--path", "/reviews/exact", "-H", "x-user: jason"],
            "reviews-v2",
        ),
    ]
}

/// 2. Header, path (exact/prefix/regex), method and query matches pick the subset; the first
///    matching route wins.
#[test]
fn virtual_service_matches_pick_subsets_first_match_wins() {
    let m = shared();
    m.apply(&subsets("reviews-match"));
    m.apply(
        r#"
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: reviews-match
          namespace: back
        spec:
          hosts:
          - reviews-match
          http:
          - match:
            - headers:
                x-user:
                  exact: jason
            route:
            - destination: {host: reviews-match, subset: v2}
          - match:
            - uri:
                exact: /reviews/exact
            route:
            - destination: {host: reviews-match, subset: v3}
          - match:
            - uri:
                prefix: /reviews/v2/
            route:
            - destination: {host: reviews-match, subset: v2}
          - match:
            - uri:
                regex: "/ratings/[0-9]+"
            route:
            - destination: {host: reviews-match, subset: v3}
          - match:
            - method:
                exact: POST
            route:
            - destination: {host: reviews-match, subset: v2}
          - match:
            - queryParams:
                version:
                  exact: "3"
            route:
            - destination: {host: reviews-match, subset: v3}
          - route:
            - destination: {host: reviews-match, subset: v1}
        "#,
    );
    wait_for_routes(&m, "reviews-match", &match_cases());
}

/// 3. The same with Gateway API: an HTTPRoute attached to the Service (GAMMA) splits by
///    backendRef weight and matches by header, path, method and query — by Gateway API's
///    precedence, not order — and a request no rule matches gets 404, recorded as `NR`.
#[test]
fn httproute_on_a_service_splits_matches_and_answers_no_route() {
    let m = shared();
    m.apply(
        r#"
        apiVersion: gateway.networking.k8s.io/v1
        kind: HTTPRoute
        metadata:
          name: reviews-gw
          namespace: back
        spec:
          parentRefs:
          - group: ""
            kind: Service
            name: reviews-gw
            port: 9080
          rules:
          - matches:
            - path: {type: PathPrefix, value: /split}
            backendRefs:
            - {name: reviews-v1, port: 9080, weight: 10}
            - {name: reviews-v2, port: 9080, weight: 90}
          - matches:
            - headers:
              - {name: x-user, value: jason}
            backendRefs:
            - {name: reviews-v2, port: 9080}
          - matches:
            - path: {type: Exact, value: /reviews/exact}
            backendRefs:
            - {name: reviews-v3, port: 9080}
          - matches:
            - path: {type: PathPrefix, value: /reviews/v2}
            backendRefs:
            - {name: reviews-v2, port: 9080}
          - matches:
            - path: {type: RegularExpression, value: "/ratings/[0-9]+"}
            backendRefs:
            - {name: reviews-v3, port: 9080}
          - matches:
            - method: POST
            backendRefs:
            - {name: reviews-v2, port: 9080}
          - matches:
            - queryParams:
              - {name: version, value: "3"}
            backendRefs:
            - {name: reviews-v3, port: 9080}
          - matches:
            - path: {type: PathPrefix, value: /default}
            backendRefs:
            - {name: reviews-v1, port: 9080}
        "#,
    );
    wait_for_routes(
        &m,
        "reviews-gw",
        &[
            ("path prefix", vec!["--path", "/default/x"], "reviews-v1"),
            (
                "header",
                vec!["--path", "/", "-H", "x-user: jason"],
                "reviews-v2",
            ),
            (
                "an exact path outranks a header match",
                vec!["--path", "/reviews/exact", "-H", "x-user: jason"],
                "reviews-v3",
            ),
            (
                "a longer prefix outranks a method match",
                vec!["--path", "/default", "--method", "POST"],
                "reviews-v1",
            ),
            ("path exact", vec!["--path", "/reviews/exact"], "reviews-v3"),
            (
                "PathPrefix matches whole segments",
                vec!["--path", "/reviews/v2/x"],
                "reviews-v2",
            ),
            (
                "… and not a longer segment",
                vec!["--path", "/reviews/v2x"],
                "status=404",
            ),
            ("path regex", vec!["--path", "/ratings/42"], "reviews-v3"),
            (
                "method",
                vec!["--path", "/x", "--method", "POST"],
                "reviews-v2",
            ),
            ("query", vec!["--path", "/?version=3"], "reviews-v3"),
            (
                "no rule matches",
                vec!["--path", "/nothing-here"],
                "status=404",
            ),
        ],
    );
    assert_ten_ninety(&m.load("reviews-gw", 2000, &["--path", "/split"]), 2000);

    // The refused request is a flow of the client's node, with Envoy's flag for "no route".
    let r = m.get("reviews-gw", &["--path", "/nothing-here/flagged"]);
    assert_eq!(r.status, 404, "{r:?}");
    let f = &last_flow(&m, "/nothing-here/flagged");
    assert_eq!(f["http"]["status"], 404, "{f}");
    assert_eq!(s(f, "/http/response_flags"), "NR", "{f}");
}

/// Route timeouts, as a v1alpha3 VirtualService (`timeout`) and as an HTTPRoute
/// (`timeouts.request`): a backend answering within the timeout passes; one answering after it
/// gets Envoy's `504 upstream request timeout` at the timeout, flag `UT` in the flow; a body
/// still coming at the timeout is cut.
#[test]
fn route_timeouts_answer_504_at_the_timeout_and_let_faster_backends_through() {
    let m = shared();
    m.apply(
        r#"
        apiVersion: networking.istio.io/v1alpha3
        kind: VirtualService
        metadata:
          name: reviews-timeout
          namespace: back
        spec:
          hosts:
          - reviews-timeout
          http:
          - timeout: 1s
            route:
            - destination: {host: reviews-timeout}
        "#,
    );
    m.apply(
        r#"
        apiVersion: gateway.networking.k8s.io/v1
        kind: HTTPRoute
        metadata:
          name: reviews-timeout-gw
          namespace: back
        spec:
          parentRefs:
          - {group: "", kind: Service, name: reviews-timeout-gw, port: 9080}
          rules:
          - timeouts: {request: 1s}
            backendRefs:
            - {name: reviews-timeout-gw, port: 9080}
        "#,
    );
    for svc in ["reviews-timeout", "reviews-timeout-gw"] {
        // Until the route is in force, a slow request is answered by the backend.
        let deadline = Instant::now() + WAIT;
        while m.get(svc, &["--path", "/delay/1800"]).status != 504 {
            assert!(
                Instant::now() < deadline,
                "{svc}: no timeout after {WAIT:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let r = m.get(svc, &["--path", "/delay/300"]);
        assert_eq!(r.status, 200, "{svc}: within the timeout: {r:?}");
        let started = Instant::now();
        let path = format!("/delay/4000?route={svc}");
        let r = m.get(svc, &["--path", &path]);
        let took = started.elapsed();
        assert_eq!(r.status, 504, "{svc}: {r:?}");
        assert_eq!(r.body, "upstream request timeout", "{svc}");
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_millis(3000),
            "{svc}: answered after {took:?}, not at the 1 s timeout"
        );
        let f = &last_flow(&m, &path);
        assert_eq!(f["http"]["status"], 504, "{f}");
        assert_eq!(s(f, "/http/response_flags"), "UT", "{f}");

        // A response whose head came in time but whose body is still coming at the timeout
        // is cut there, as Envoy resets it: the client never gets a complete answer.
        let started = Instant::now();
        let path = format!("/drip/4000?route={svc}");
        let r = m.get(svc, &["--path", &path]);
        let took = started.elapsed();
        assert_ne!(r.exit, 0, "{svc}: the body was cut: {r:?}");
        assert!(
            took < Duration::from_millis(3000),
            "{svc}: cut after {took:?}"
        );
        let f = &last_flow(&m, &path);
        assert_eq!(f["http"]["status"], 200, "the head was sent: {f}");
        assert_eq!(s(f, "/http/response_flags"), "UT", "{f}");
    }
}

/// Fault injection (VirtualService `fault`): an abort at 100 % never reaches a backend, at 50 %
/// about half the requests; a delay holds a request for its time; the deprecated `percent` form
/// works; flows carry `FI` and `DI`.
#[test]
fn faults_abort_and_delay_the_share_of_requests_they_name() {
    let m = shared();
    m.apply(
        r#"
        apiVersion: networking.istio.io/v1alpha3
        kind: VirtualService
        metadata:
          name: reviews-fault
          namespace: back
        spec:
          hosts:
          - reviews-fault
          http:
          - match:
            - uri: {prefix: /abort-all}
            fault:
              abort:
                httpStatus: 500
                percentage: {value: 100}
            route:
            - destination: {host: reviews-fault}
          - match:
            - uri: {prefix: /abort-half}
            fault:
              abort:
                httpStatus: 503
                percentage: {value: 50}
            route:
            - destination: {host: reviews-fault}
          - match:
            - uri: {prefix: /legacy}
            fault:
              abort:
                httpStatus: 418
                percent: 100
            route:
            - destination: {host: reviews-fault}
          - match:
            - uri: {prefix: /delay}
            timeout: 100ms
            fault:
              delay:
                fixedDelay: 600ms
                percentage: {value: 100}
            route:
            - destination: {host: reviews-fault}
          - route:
            - destination: {host: reviews-fault}
        "#,
    );
    let deadline = Instant::now() + WAIT;
    while m.get("reviews-fault", &["--path", "/abort-all"]).status != 500 {
        assert!(Instant::now() < deadline, "no fault after {WAIT:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let all = m.load("reviews-fault", 200, &["--path", "/abort-all"]);
    assert_eq!(all.status(500), 200, "{all:?}");
    assert!(all.backends.is_empty(), "no backend answered: {all:?}");
    let r = m.get("reviews-fault", &["--path", "/abort-all/one"]);
    assert_eq!(r.body, "fault filter abort");
    let f = &last_flow(&m, "/abort-all/one");
    assert_eq!(s(f, "/http/response_flags"), "FI", "{f}");
    assert_eq!(f["verdict"], "responded", "{f}");

    let half = m.load("reviews-fault", 1000, &["--path", "/abort-half"]);
    let (aborted, passed) = (half.status(503), half.status(200));
    assert_eq!(aborted + passed, 1000, "{half:?}");
    assert!(
        (400..=600).contains(&aborted),
        "about half aborted: {half:?}"
    );
    assert_eq!(half.backends.values().sum::<u64>(), passed, "{half:?}");

    assert_eq!(
        m.load("reviews-fault", 20, &["--path", "/legacy"])
            .status(418),
        20
    );

    // A delay holds the request, and the rule's 100 ms timeout is off while it has a fault.
    let started = Instant::now();
    let r = m.get("reviews-fault", &["--path", "/delay/held"]);
    let took = started.elapsed();
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        took >= Duration::from_millis(600),
        "answered after {took:?}"
    );
    let f = &last_flow(&m, "/delay/held");
    assert_eq!(s(f, "/http/response_flags"), "DI", "{f}");
    assert!(f["http"]["duration_ms"].as_f64().unwrap() >= 600.0, "{f}");
}

/// Mirroring (VirtualService `mirror`, `mirrorPercentage`): every request is copied to the
/// mirror with `-shadow` on its Host, the client only ever sees the primary's answers, and a
/// mirror that cannot be reached changes nothing for the client.
#[test]
fn mirrors_get_copies_with_a_shadow_host_and_never_change_the_answer() {
    let m = shared();
    m.apply(
        r#"
        apiVersion: networking.istio.io/v1beta1
        kind: VirtualService
        metadata:
          name: reviews-mirror
          namespace: back
        spec:
          hosts:
          - reviews-mirror
          http:
          - match:
            - uri: {prefix: /failing}
            route:
            - destination: {host: reviews-v1}
            mirror: {host: closed}
          - route:
            - destination: {host: reviews-v1}
            mirror: {host: reviews-v3}
            mirrorPercentage: {value: 100}
        "#,
    );
    let deadline = Instant::now() + WAIT;
    while m
        .load("reviews-mirror", 6, &["--path", "/wait"])
        .from_backends("reviews-v1")
        != 6
    {
        assert!(Instant::now() < deadline, "not routed after {WAIT:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let shadow = format!("{}-shadow", fqdn("reviews-mirror"));
    let n = 20;
    for (path, status, pod) in [("/copied", 200, "reviews-v3"), ("/failing/copied", 503, "")] {
        let got = m.load("reviews-mirror", n, &["--path", path]);
        assert_eq!(got.from_backends("reviews-v1"), n, "{path}: {got:?}");
        assert_eq!(
            got.backends.len(),
            1,
            "{path}: only the primary answers: {got:?}"
        );
        let copies = m
            .weft_a
            .wait_flows(n as usize, WAIT, |f| {
                s(f, "/http/authority") == shadow && s(f, "/http/path") == path
            })
            .unwrap();
        for f in &copies {
            assert_eq!(f["http"]["status"], status, "{path}: {f}");
            if status == 200 {
                assert_eq!(s(f, "/destination/pod"), pod, "{f}");
            } else {
                assert_eq!(s(f, "/http/response_flags"), "UF", "{f}");
            }
        }
    }
    // A body is copied as it passes.
    let r = m.get(
        "reviews-mirror",
        &[
            "--method",
            "POST",
            "--path",
            "/with-body",
            "--data",
            "payload",
        ],
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.contains("reviews-v1"), "{r:?}");
    let f = &m
        .weft_a
        .wait_flows(1, WAIT, |f| {
            s(f, "/http/authority") == shadow && s(f, "/http/path") == "/with-body"
        })
        .unwrap()[0];
    assert_eq!(f["bytes_sent"], 7, "{f}");
    assert_eq!(f["http"]["status"], 200, "{f}");

    // The same as an HTTPRoute `RequestMirror` filter.
    m.apply(
        r#"
        apiVersion: gateway.networking.k8s.io/v1
        kind: HTTPRoute
        metadata:
          name: reviews-mirror-gw
          namespace: back
        spec:
          parentRefs:
          - {group: "", kind: Service, name: reviews-mirror-gw, port: 9080}
          rules:
          - filters:
            - type: RequestMirror
              requestMirror:
                backendRef: {name: reviews-v3, port: 9080}
            backendRefs:
            - {name: reviews-v1, port: 9080}
        "#,
    );
    let deadline = Instant::now() + WAIT;
    while m
        .load("reviews-mirror-gw", 6, &["--path", "/wait"])
        .from_backends("reviews-v1")
        != 6
    {
        assert!(
            Instant::now() < deadline,
            "HTTPRoute not in force after {WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let got = m.load("reviews-mirror-gw", n, &["--path", "/copied-gw"]);
    assert_eq!(got.from_backends("reviews-v1"), n, "{got:?}");
    let shadow = format!("{}-shadow", fqdn("reviews-mirror-gw"));
    let copies = m
        .weft_a
        .wait_flows(n as usize, WAIT, |f| {
            s(f, "/http/authority") == shadow && s(f, "/http/path") == "/copied-gw"
        })
        .unwrap();
    assert!(
        copies
            .iter()
            .all(|f| s(f, "/destination/pod") == "reviews-v3"),
        "{copies:?}"
    );
}

/// The newest flow of a request to `path`.
fn last_flow(m: &L7, path: &str) -> Value {
    m.weft_a
        .wait_flows(1, WAIT, |f| s(f, "/http/path") == path)
        .unwrap()
        .pop()
        .unwrap()
}

/// Sends requests to `svc` (path `path(k)` for the k-th) until the flow of one is `done`;
/// panics saying `what` was waited for after [`WAIT`].
fn wait_for_flow(
    m: &L7,
    svc: &str,
    what: &str,
    path: impl Fn(u64) -> String,
    done: impl Fn(&Value) -> bool,
) {
    let deadline = Instant::now() + WAIT;
    for key in 0.. {
        let path = path(key);
        m.get(svc, &["--path", &path]);
        if done(&last_flow(m, &path)) {
            return;
        }
        assert!(Instant::now() < deadline, "{svc}: {what} after {WAIT:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until requests to `svc` take the route `id` (as flows name it): the configuration
/// applied, not merely a distribution that happens to look like it.
fn wait_for_route(m: &L7, svc: &str, id: &str) {
    let what = format!("not routed by {id}");
    let path = |k| format!("/?route-applied={k}");
    wait_for_flow(m, svc, &what, path, |f| f["http"]["route"] == id);
}

/// Waits until a 500 from `svc` is tried `attempts` times: its VirtualService's retries are in
/// force (Istio's default policy, on the default route, retries 503 only).
fn wait_for_retries(m: &L7, svc: &str, attempts: u64) {
    let path = |k| format!("/status/500?wait={k}");
    wait_for_flow(m, svc, "no retries", path, |f| {
        f["http"]["attempts"] == attempts
    });
}

/// The counters of weft_a's destination `cluster` (its Istio name), by stat name; a
/// destination not sent to yet has none.
fn cluster_stats(m: &L7, cluster: &str) -> BTreeMap<String, u64> {
    // The name as a regular expression (`|` and `.` are its own), percent-encoded.
    let filter: String = cluster
        .chars()
        .flat_map(|c| {
            let escape = "\\.+*?()|[]{}^$".contains(c);
            escape.then_some('\\').into_iter().chain([c])
        })
        .map(|c| format!("%{:02X}", c as u32))
        .collect();
    let (code, text) = m
        .weft_a
        .admin_get(&format!("/stats?filter={filter}"))
        .unwrap();
    assert_eq!(code, 200, "{text}");
    let prefix = format!("cluster.{cluster}.");
    text.lines()
        .filter_map(|l| l.strip_prefix(&prefix)?.rsplit_once(": "))
        .map(|(k, v)| (k.to_string(), v.parse().unwrap()))
        .collect()
}

/// One counter of `cluster_stats` (0 when not there yet).
fn stat(m: &L7, cluster: &str, name: &str) -> u64 {
    cluster_stats(m, cluster).get(name).copied().unwrap_or(0)
}

/// Retries (VirtualService `retries`): a backend failing twice then answering is retried to its
/// answer; an always-failing one is tried 1 + attempts times and its last answer returned with
/// `URX`; a per-try timeout cuts each attempt and is retried; `attempts: 0` sends once; with no
/// `retries` at all, Istio's default policy retries a 503 twice.
#[test]
fn retries_follow_the_policy_and_the_flow_counts_the_attempts() {
    let m = shared();
    m.apply(
        r#"
        apiVersion: networking.istio.io/v1alpha3
        kind: VirtualService
        metadata:
          name: reviews-retry
          namespace: back
        spec:
          hosts:
          - reviews-retry
          http:
          - match:
            - headers: {x-try: {exact: none}}
            retries: {attempts: 0}
            route:
            - destination: {host: reviews-v1}
          - match:
            - headers: {x-try: {exact: per-try}}
            retries: {attempts: 2, perTryTimeout: 300ms, retryOn: 5xx}
            route:
            - destination: {host: reviews-v1}
          - match:
            - headers: {x-try: {exact: counted}}
            retries: {attempts: 3, retryOn: 5xx}
            route:
            - destination: {host: reviews-retry}
          - retries: {attempts: 3, retryOn: 5xx}
            route:
            - destination: {host: reviews-v1}
        "#,
    );
    let flow = |path: &str| last_flow(&m, path);
    wait_for_retries(&m, "reviews-retry", 4);
    let path = "/fail-first/2/recovers";
    let r = m.get("reviews-retry", &["--path", path]);
    assert_eq!(r.status, 200, "the third attempt answers: {r:?}");
    let f = flow(path);
    assert_eq!(f["http"]["attempts"], 3, "{f}");
    assert_eq!(s(&f, "/http/response_flags"), "-", "{f}");
    // A small body is kept and sent again whole.
    let path = "/fail-first/2/with-body";
    let r = m.get(
        "reviews-retry",
        &["--method", "POST", "--path", path, "--data", "payload"],
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.body.contains("body-bytes=7\n"),
        "the third attempt got the body: {r:?}"
    );
    let f = flow(path);
    assert_eq!(f["http"]["attempts"], 3, "{f}");
    assert_eq!(f["bytes_sent"], 7, "the body counted once: {f}");

    // Always failing: 1 + 3 attempts each, the last answer returned, URX; the destination's
    // counters say so in Envoy's names (a destination of this test's only: what reached it
    // before the VirtualService was in force is counted out).
    let cluster = "outbound|9080||reviews-retry.back.svc.cluster.local";
    let before = cluster_stats(&m, cluster);
    let mut hits = 0;
    for i in 0..3 {
        let path = format!("/status/500?always={i}");
        let r = m.get("reviews-retry", &["--path", &path, "-H", "x-try: counted"]);
        assert_eq!(r.status, 500, "{r:?}");
        assert!(
            r.body.contains("name=reviews-v"),
            "the backend's own answer: {r:?}"
        );
        let f = flow(&path);
        assert_eq!(s(&f, "/http/response_flags"), "URX", "{f}");
        hits += f["http"]["attempts"].as_u64().unwrap();
    }
    assert_eq!(hits, 12, "3 requests, 9 retries");
    let after = cluster_stats(&m, cluster);
    for (stat, value) in [
        ("upstream_rq_retry", 9),
        ("upstream_rq_retry_limit_exceeded", 3),
        ("upstream_rq_retry_success", 0),
        ("upstream_rq_total", 12),
        ("upstream_rq_5xx", 12),
        ("upstream_rq_500", 12),
        ("upstream_rq_active", 0),
    ] {
        let delta = after[stat] - before.get(stat).copied().unwrap_or(0);
        assert_eq!(delta, value, "{stat}: before {before:?}, now {after:?}");
    }
    let (_, text) = m
        .weft_a
        .admin_get("/stats?filter=reviews-retry%5C.back")
        .unwrap();
    assert!(
        text.lines()
            .all(|l| l.starts_with(&format!("cluster.{cluster}."))),
        "the filter keeps only matching names:\n{text}"
    );
    // The same from the command line, and as Prometheus series.
    let cli = m
        .weft_a
        .cli(&["stats", "--filter", "reviews-retry\\..*retry"])
        .unwrap();
    let retries = after["upstream_rq_retry"];
    assert!(
        cli.lines()
            .any(|l| l == format!("cluster.{cluster}.upstream_rq_retry: {retries}")),
        "{cli}"
    );
    assert_eq!(
        cli.lines()
            .filter(|l| l.contains(".upstream_rq_retry"))
            .count(),
        5,
        "retry, success, limit exceeded, overflow and active only: {cli}"
    );
    assert_eq!(cli.lines().count(), 5, "{cli}");
    let metrics = m.weft_a.metrics().unwrap();
    let series =
        format!("envoy_cluster_upstream_rq_retry_total{{cluster_name=\"{cluster}\"}} {retries}");
    assert!(
        metrics.lines().any(|l| l == series),
        "no {series} in\n{metrics}"
    );

    // Each attempt gets 300 ms, then the next one; after 1 + 2 of them, 504.
    let started = Instant::now();
    let path = "/delay/1500?per-try";
    let r = m.get("reviews-retry", &["--path", path, "-H", "x-try: per-try"]);
    let took = started.elapsed();
    assert_eq!(r.status, 504, "{r:?}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(1500),
        "three attempts of 300 ms, answered after {took:?}"
    );
    let f = flow(path);
    assert_eq!(f["http"]["attempts"], 3, "{f}");
    assert_eq!(s(&f, "/http/response_flags"), "UT,URX", "{f}");

    // attempts: 0 sends once.
    let path = "/status/503?once";
    let r = m.get("reviews-retry", &["--path", path, "-H", "x-try: none"]);
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(flow(path)["http"]["attempts"], 1);

    // No VirtualService: Istio's default policy retries a 503 twice.
    let path = "/status/503?default";
    let r = m.get("reviews-retry-default", &["--path", path]);
    assert_eq!(r.status, 503, "{r:?}");
    let f = flow(path);
    assert_eq!(f["http"]["attempts"], 3, "{f}");
    assert_eq!(s(&f, "/http/response_flags"), "URX", "{f}");

    // The same policy as an HTTPRoute `retry`.
    m.apply(
        r#"
        apiVersion: gateway.networking.k8s.io/v1
        kind: HTTPRoute
        metadata:
          name: reviews-retry-gw
          namespace: back
        spec:
          parentRefs:
          - {group: "", kind: Service, name: reviews-retry-gw, port: 9080}
          rules:
          - retry: {attempts: 3, codes: [500, 503], backoff: 1ms}
            backendRefs:
            - {name: reviews-v1, port: 9080}
        "#,
    );
    wait_for_retries(&m, "reviews-retry-gw", 4);
    let path = "/fail-first/2/recovers-gw";
    let r = m.get("reviews-retry-gw", &["--path", path]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(flow(path)["http"]["attempts"], 3);
}

/// The retry budget: with every endpoint failing, retries to a destination stay within 20 % of
/// its requests plus 10 a second over ten seconds, however many attempts the policy allows.
#[test]
fn retries_stay_within_the_destinations_budget() {
    let m = shared();
    m.apply(
        r#"
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: reviews-budget
          namespace: back
        spec:
          hosts:
          - reviews-budget
          http:
          - retries: {attempts: 5, retryOn: 5xx, backoff: 1ms}
            route:
            - destination: {host: reviews-budget}
        "#,
    );
    wait_for_retries(&m, "reviews-budget", 6);
    let n = 150;
    let path = "/status/500?budget";
    let got = m.load("reviews-budget", n, &["--path", path]);
    assert_eq!(got.status(500), n, "{got:?}");
    let flows = m
        .weft_a
        .wait_flows(n as usize, WAIT, |f| s(f, "/http/path") == path)
        .unwrap();
    let retries: u64 = flows
        .iter()
        .map(|f| f["http"]["attempts"].as_u64().unwrap() - 1)
        .sum();
    // Unbounded, 5 x 150 = 750. The budget: 100 (the floor) + 20 % of the requests seen,
    // these and the waiting ones, less what the waiting ones retried.
    assert!((100..=150).contains(&retries), "{retries} retries");
    let refused = flows
        .iter()
        .filter(|f| s(f, "/error") == "retry budget exhausted")
        .count();
    assert!(refused > 100, "{refused} requests found the budget spent");
}

/// A gRPC fault: `abort.grpcStatus` answers the call itself with that status (HTTP 200,
/// `grpc-status`), the backend never called; other methods go through.
#[test]
fn grpc_fault_aborts_with_the_grpc_status() {
    let m = shared();
    m.apply(
        r#"
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: reviews-grpc-fault
          namespace: back
        spec:
          hosts:
          - reviews-grpc-fault
          http:
          - match:
            - uri: {prefix: /weft.test.Echo/Say}
            fault:
              abort:
                grpcStatus: UNAVAILABLE
                percentage: {value: 100}
            route:
            - destination: {host: reviews-grpc-fault}
          - route:
            - destination: {host: reviews-grpc-fault}
        "#,
    );
    let addr = m.svc("reviews-grpc-fault").addr(GRPC_PORT);
    let authority = format!("{}:{GRPC_PORT}", fqdn("reviews-grpc-fault"));
    let call =
        |method: &str, data: &str| grpc_call(&m.client, addr, method, data, Some(&authority));
    wait_until(WAIT, || s(&call("Say", "hi"), "/code") == "UNAVAILABLE")
        .unwrap_or_else(|_| panic!("no fault: {}", call("Say", "hi")));
    let r = call("Say", "hello");
    assert_eq!(s(&r, "/details"), "fault filter abort", "{r}");
    assert_eq!(r["messages"], serde_json::json!([]), "{r}");
    let r = call("Count", "2");
    assert_eq!(s(&r, "/code"), "OK", "other methods pass: {r}");
    // The path alone is not this test's: another one calls the same method.
    let f = &m
        .weft_a
        .wait_flows(1, WAIT, |f| {
            s(f, "/http/path") == "/weft.test.Echo/Say" && s(f, "/http/authority") == authority
        })
        .unwrap()
        .pop()
        .unwrap();
    assert_eq!(s(f, "/http/response_flags"), "FI", "{f}");
    assert_eq!(f["http"]["status"], 200, "{f}");
}

/// Circuit breaking (DestinationRule `connectionPool`): past `maxConnections` and
/// `http1MaxPendingRequests`, or `http2MaxRequests`, a request is answered 503 `UO` at once;
/// `maxRequestsPerConnection: 1` opens a connection for every request. The counters say so.
#[test]
fn circuit_breakers_turn_requests_away_at_their_limits() {
    let m = shared();
    m.apply(
        r#"
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata:
          name: reviews-cb
          namespace: back
        spec:
          host: reviews-cb
          subsets:
          - name: v1
            labels: {version: v1}
            trafficPolicy:
              connectionPool:
                tcp: {maxConnections: 1}
                http: {http1MaxPendingRequests: 1}
          - name: v2
            labels: {version: v2}
            trafficPolicy:
              connectionPool:
                http: {http2MaxRequests: 1}
          - name: v3
            labels: {version: v3}
            trafficPolicy:
              connectionPool:
                http: {maxRequestsPerConnection: 1}
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: reviews-cb
          namespace: back
        spec:
          hosts:
          - reviews-cb
          http:
          - match:
            - headers: {x-cb: {exact: requests}}
            route:
            - destination: {host: reviews-cb, subset: v2}
          - match:
            - headers: {x-cb: {exact: per-connection}}
            route:
            - destination: {host: reviews-cb, subset: v3}
          - route:
            - destination: {host: reviews-cb, subset: v1}
        "#,
    );
    wait_for_route(&m, "reviews-cb", "VirtualService back/reviews-cb http[2]");
    // Five slow requests, 100 ms apart, each on a connection of its own: one is sent, one
    // waits for the only connection, three are turned away.
    let burst = |kind: &'static str, n: usize| {
        let calls: Vec<_> = (0..n)
            .map(|i| {
                let m = m.clone();
                let t = std::thread::spawn(move || {
                    let started = Instant::now();
                    let path = format!("/delay/1500?cb={kind}-{i}");
                    let header = format!("x-cb: {kind}");
                    let r = m.get("reviews-cb", &["--path", &path, "-H", &header]);
                    (r, started.elapsed(), path)
                });
                std::thread::sleep(Duration::from_millis(100));
                t
            })
            .collect();
        calls
            .into_iter()
            .map(|c| c.join().unwrap())
            .collect::<Vec<_>>()
    };
    let check = |what: &str, got: &[(HttpReply, Duration, String)], passed: usize| {
        let (ok, turned): (Vec<_>, Vec<_>) = got.iter().partition(|(r, _, _)| r.status == 200);
        let stats = || cluster_stats(&m, "outbound|9080|v1|reviews-cb.back.svc.cluster.local");
        let statuses: Vec<_> = got.iter().map(|(r, t, _)| (r.status, *t)).collect();
        let flows: Vec<_> = got
            .iter()
            .map(|(_, _, p)| last_flow(&m, p).to_string())
            .collect();
        assert_eq!(
            ok.len(),
            passed,
            "{what}: {statuses:?}\n{:?}\n{flows:#?}",
            stats()
        );
        for (r, took, path) in turned {
            assert_eq!(r.status, 503, "{what}: {r:?}");
            assert!(r.body.contains("reset reason: overflow"), "{what}: {r:?}");
            assert!(
                *took < Duration::from_millis(1000),
                "{what}: turned away at once, not after {took:?}"
            );
            let f = last_flow(&m, path);
            assert_eq!(s(&f, "/http/response_flags"), "UO", "{what}: {f}");
        }
    };
    check(
        "maxConnections 1, http1MaxPendingRequests 1",
        &burst("pending", 5),
        2,
    );
    check("http2MaxRequests 1", &burst("requests", 3), 1);

    let stat = |subset: &str, name: &str| {
        let cluster = format!("outbound|9080|{subset}|reviews-cb.back.svc.cluster.local");
        stat(&m, &cluster, name)
    };
    assert!(stat("v1", "upstream_rq_pending_overflow") >= 3);
    assert!(stat("v1", "upstream_cx_overflow") >= 4);
    assert!(stat("v2", "upstream_rq_pending_overflow") >= 2);

    // One connection per request: ten requests on one client connection open ten.
    let before = stat("v3", "upstream_cx_total");
    let got = m.load("reviews-cb", 10, &["-H", "x-cb: per-connection"]);
    assert_eq!(got.status(200), 10, "{got:?}");
    assert_eq!(stat("v3", "upstream_cx_total") - before, 10);
    assert!(stat("v3", "upstream_cx_max_requests") >= 10);
}

/// Consistent hashing (DestinationRule `consistentHash`): requests with one header value keep
/// one endpoint, different values spread; a cookie missing from a request is made, set on the
/// response, and keeps the endpoint when sent back.
#[test]
fn consistent_hash_keeps_a_key_on_one_endpoint() {
    let m = shared();
    m.apply(
        r#"
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata:
          name: reviews-hash
          namespace: back
        spec:
          host: reviews-hash
          trafficPolicy:
            loadBalancer:
              consistentHash: {httpHeaderName: x-user}
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata:
          name: reviews-cookie
          namespace: back
        spec:
          host: reviews-cookie
          trafficPolicy:
            loadBalancer:
              consistentHash:
                httpCookie: {name: session, path: /, ttl: 60s}
                maglev: {tableSize: 65537}
        "#,
    );
    let cookie_made = || {
        let r = m.get("reviews-cookie", &[]);
        r.headers
            .iter()
            .find(|(k, _)| k == "set-cookie")
            .map(|(_, v)| v.clone())
    };
    let set = wait_for(WAIT, cookie_made).unwrap_or_else(|_| {
        panic!(
            "no cookie made: {:?} {}",
            m.get("reviews-cookie", &[]),
            m.weft_a.status().unwrap()["registry"]
        )
    });
    assert!(
        set.starts_with("session=\"") && set.contains("Max-Age=60; Path=/; HttpOnly"),
        "{set}"
    );
    let mut backends = BTreeSet::new();
    for user in ["ann", "bob", "cid", "dan", "eve", "fay", "gus", "hal"] {
        let header = format!("x-user: {user}");
        let got = m.load("reviews-hash", 200, &["-H", &header]);
        assert_eq!(got.status(200), 200, "{got:?}");
        assert_eq!(got.backends.len(), 1, "{user} keeps one endpoint: {got:?}");
        backends.extend(got.backends.keys().cloned());
    }
    assert!(backends.len() >= 2, "keys spread: {backends:?}");
    let value = set.split(';').next().unwrap().to_string();
    let header = format!("cookie: {value}");
    let got = m.load("reviews-cookie", 50, &["-H", &header]);
    assert_eq!(got.status(200), 50, "{got:?}");
    assert_eq!(
        got.backends.len(),
        1,
        "the cookie keeps one endpoint: {got:?}"
    );
}

/// Slow start (DestinationRule `warmup`): an endpoint that joins a destination gets a small
/// share of its requests at first (`minimumPercent` of its weight, growing over `duration`),
/// not a third of them at once.
#[test]
fn a_joining_endpoint_warms_up() {
    let m = shared();
    m.apply(
        r#"
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata:
          name: reviews-warm
          namespace: back
        spec:
          host: reviews-warm
          trafficPolicy:
            loadBalancer:
              simple: ROUND_ROBIN
              warmup: {duration: 60s, minimumPercent: 10}
        "#,
    );
    wait_until(WAIT, || {
        let got = m.load("reviews-warm", 20, &[]);
        got.from_backends("reviews-v1") == 10 && got.from_backends("reviews-v2") == 10
    })
    .expect("round robin over reviews-v1 and v2");
    let v3 = m.reviews[2].clone();
    let mut labels = m.cluster.pod_labels(&v3).unwrap();
    labels.insert("warm".into(), "yes".into());
    m.cluster.set_pod_labels(&v3, labels).unwrap();
    // v3 joins: once it has answered, its share of the next requests is still small.
    wait_until(WAIT, || {
        m.load("reviews-warm", 30, &[]).from_backends("reviews-v3") > 0
    })
    .expect("reviews-v3 never joined");
    let got = m.load("reviews-warm", 600, &[]);
    assert_eq!(got.status(200), 600, "{got:?}");
    let v3 = got.from_backends("reviews-v3");
    assert!(
        (1..=120).contains(&v3),
        "a joining endpoint gets a small share (a third without slow start): {got:?}"
    );
}

/// Locality-aware balancing: with outlier detection on, requests stay in the client's zone
/// (reviews-v3) and fail over to the other zone once it is ejected; `distribute` gives each
/// zone its share.
#[test]
fn requests_stay_in_the_clients_zone_and_fail_over() {
    let m = shared();
    m.apply(
        r#"
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata:
          name: reviews-zone
          namespace: back
        spec:
          host: reviews-zone
          trafficPolicy:
            outlierDetection:
              consecutive5xxErrors: 2
              interval: 1s
              baseEjectionTime: 60s
              maxEjectionPercent: 100
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata:
          name: reviews-spread
          namespace: back
        spec:
          host: reviews-spread
          trafficPolicy:
            loadBalancer:
              localityLbSetting:
                distribute:
                - from: r1/z1/*
                  to: {"r1/z1/*": 15, "r1/z2/*": 85}
        "#,
    );
    wait_until(WAIT, || {
        m.load("reviews-zone", 30, &[]).backends.get("reviews-v3") == Some(&30)
    })
    .unwrap_or_else(|_| panic!("not kept in z1: {:?}", m.load("reviews-zone", 30, &[])));
    // reviews-v3 fails and is ejected: z2 takes over.
    let failing = ["--path", "/status-on/reviews-v3/500"];
    wait_until(WAIT, || {
        m.load("reviews-zone", 4, &failing)
            .from_backends("reviews-v3")
            == 0
    })
    .expect("no failover to z2");
    let got = m.load("reviews-zone", 60, &failing);
    assert_eq!(got.status(200), 60, "{got:?}");
    assert!(
        got.from_backends("reviews-v1") > 0 && got.from_backends("reviews-v2") > 0,
        "both endpoints of z2: {got:?}"
    );
    assert_eq!(
        stat(
            &m,
            "outbound|9080||reviews-zone.back.svc.cluster.local",
            "outlier_detection.ejections_active"
        ),
        1
    );
    // distribute: 15 % to z1, 85 % to z2 (without it, a third to each endpoint).
    wait_until(WAIT, || {
        let got = m.load("reviews-spread", 40, &[]);
        (1..=10).contains(&got.from_backends("reviews-v3"))
    })
    .expect("distribute not applied");
    let got = m.load("reviews-spread", 800, &[]);
    let share = got.from_backends("reviews-v3") as f64 / 800.0;
    assert!((0.10..=0.21).contains(&share), "z1 got {share:.2}: {got:?}");
}

/// `PASSTHROUGH`: a request goes to the address the client called (here the ClusterIP, which
/// no kube-proxy of this cluster resolves: the upstream the flow names is what shows it), not
/// to an endpoint weft chose.
#[test]
fn passthrough_sends_to_the_address_called() {
    let m = shared();
    m.apply(
        r#"
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata:
          name: reviews-pass
          namespace: back
        spec:
          host: reviews-pass
          trafficPolicy:
            loadBalancer: {simple: PASSTHROUGH}
        "#,
    );
    let vip = m.svc("reviews-pass").addr(HTTP_PORT).to_string();
    let what = format!("not sent to {vip}");
    let path = |k| format!("/?passthrough={k}");
    wait_for_flow(&m, "reviews-pass", &what, path, |f| {
        s(f, "/http/upstream") == vip
    });
}

/// Outlier detection: an endpoint answering 5xx `consecutive5xxErrors` times in a row is
/// ejected, gets no requests, and comes back after `baseEjectionTime` (at an `interval` tick);
/// with every endpoint ejected, 503 `UH`.
#[test]
fn outlier_detection_ejects_failing_endpoints_and_brings_them_back() {
    let m = shared();
    m.apply(
        r#"
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata:
          name: reviews-od
          namespace: back
        spec:
          host: reviews-od
          trafficPolicy:
            # Every endpoint, whatever its zone (locality failover would keep to the client's).
            loadBalancer:
              localityLbSetting: {enabled: false}
            outlierDetection:
              consecutive5xxErrors: 3
              interval: 500ms
              baseEjectionTime: 3s
              maxEjectionPercent: 100
        "#,
    );
    let stat = |name: &str| stat(&m, "outbound|9080||reviews-od.back.svc.cluster.local", name);
    // reviews-v1 answers 500 (not retried by Istio's default policy), the others 200.
    wait_until(WAIT, || {
        m.load("reviews-od", 10, &["--path", "/status-on/reviews-v1/500"]);
        stat("outlier_detection.ejections_active") == 1
    })
    .unwrap_or_else(|_| panic!("reviews-v1 never ejected: {}", stat("upstream_rq_5xx")));
    let ejected = Instant::now();
    let got = m.load("reviews-od", 30, &["--path", "/status-on/reviews-v1/500"]);
    assert_eq!(
        got.status(200),
        30,
        "the ejected endpoint gets nothing: {got:?}"
    );
    assert_eq!(got.from_backends("reviews-v1"), 0, "{got:?}");
    assert_eq!(
        stat("outlier_detection.ejections_enforced_consecutive_5xx"),
        1
    );
    // Back after 3 s, at the next 500 ms tick.
    wait_until(Duration::from_secs(15), || {
        m.load("reviews-od", 6, &[]).from_backends("reviews-v1") > 0
    })
    .expect("reviews-v1 back after its ejection");
    let back = ejected.elapsed();
    assert!(
        back >= Duration::from_millis(2500),
        "back after {back:?}, not baseEjectionTime"
    );
    assert_eq!(stat("outlier_detection.ejections_active"), 0);
    // Every endpoint failing: each is ejected in turn, then nothing is left.
    let deadline = Instant::now() + WAIT;
    let mut k = 0;
    let path = loop {
        k += 1;
        let path = format!("/status/500?all-failing={k}");
        let r = m.get("reviews-od", &["--path", &path]);
        if r.status == 503 {
            assert!(r.body.contains("no healthy upstream"), "{r:?}");
            break path;
        }
        assert!(Instant::now() < deadline, "never all ejected: {r:?}");
    };
    assert_eq!(s(&last_flow(&m, &path), "/http/response_flags"), "UH");
    assert_eq!(stat("outlier_detection.ejections_active"), 3);
}

/// Load balancing: by default (Istio's LEAST_REQUEST) an endpoint held busy gets almost no new
/// requests; DestinationRule `ROUND_ROBIN` takes turns exactly, `RANDOM` spreads evenly.
#[test]
fn endpoints_are_chosen_as_the_destination_rule_says_least_request_by_default() {
    let m = shared();
    m.apply(
        r#"
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata:
          name: reviews-lb-rr
          namespace: back
        spec:
          host: reviews-lb-rr
          trafficPolicy:
            loadBalancer: {simple: ROUND_ROBIN}
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata:
          name: reviews-lb-random
          namespace: back
        spec:
          host: reviews-lb-random
          trafficPolicy:
            loadBalancer: {simple: RANDOM}
        "#,
    );
    // reviews-v1 held busy: slow requests in flight on it through this node's weft, in the
    // same destination (requests in flight are counted per destination, as Envoy counts them
    // per cluster). Only reviews-v1 is slow to answer them; once one is held there, least
    // request sends the next ones elsewhere.
    let mut busy = Vec::new();
    for _ in 0..20 {
        let m = m.clone();
        busy.push(std::thread::spawn(move || {
            m.get("reviews-lb", &["--path", "/delay-on/reviews-v1/4000"])
        }));
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    let held = busy.iter().filter(|b| !b.is_finished()).count();
    assert!(held >= 1, "none of 20 requests held on reviews-v1");
    let got = m.load("reviews-lb", 60, &[]);
    assert_eq!(got.status(200), 60, "{got:?}");
    assert!(
        got.from_backends("reviews-v1") <= 3,
        "the busy endpoint is left alone: {got:?}"
    );
    assert!(
        got.from_backends("reviews-v2") >= 15 && got.from_backends("reviews-v3") >= 15,
        "{got:?}"
    );
    for b in busy {
        assert_eq!(b.join().unwrap().status, 200);
    }

    // Until the DestinationRules are in force, turns are not exact.
    let deadline = Instant::now() + WAIT;
    loop {
        let got = m.load("reviews-lb-rr", 300, &[]);
        let counts: Vec<u64> = ["reviews-v1", "reviews-v2", "reviews-v3"]
            .iter()
            .map(|b| got.from_backends(b))
            .collect();
        if counts == [100, 100, 100] {
            break;
        }
        assert!(Instant::now() < deadline, "no round robin: {counts:?}");
    }
    let got = m.load("reviews-lb-random", 300, &[]);
    for b in ["reviews-v1", "reviews-v2", "reviews-v3"] {
        let n = got.from_backends(b);
        assert!((55..=145).contains(&n), "{b}: {n} of 300: {got:?}");
    }
}

/// 4. Rewrites (path prefix and authority), redirects (301, 302), request and response header
///    set/add/remove and a direct response: the backend sees what the VirtualService says, the
///    client sees the response side.
#[test]
fn rewrites_redirects_header_changes_and_direct_responses() {
    let m = shared();
    m.apply(&subsets("reviews-edit"));
    m.apply(
        r#"
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: reviews-edit
          namespace: back
        spec:
          hosts:
          - reviews-edit
          http:
          - name: api
            match:
            - uri:
                prefix: /api/
            - uri:
                prefix: /api
            rewrite:
              uri: /
              authority: reviews-internal.back
            headers:
              request:
                set:
                  x-set: one
                add:
                  x-added: two
                remove:
                - x-remove-me
              response:
                set:
                  x-resp-set: three
                add:
                  x-resp-add: four
                remove:
                - x-testpod-name
            route:
            - destination: {host: reviews-edit, subset: v1}
          - match:
            - uri:
                exact: /old
            redirect:
              uri: /new
          - match:
            - uri:
                exact: /temp
            redirect:
              uri: /temp-new
              authority: other.example
              redirectCode: 302
          - match:
            - uri:
                exact: /teapot
            directResponse:
              status: 418
              body:
                string: short and stout
            headers:
              response:
                set:
                  x-direct: "yes"
          - route:
            - destination: {host: reviews-edit, subset: v2}
        "#,
    );
    let api = |path: &str| {
        m.get(
            "reviews-edit",
            &[
                "--path",
                path,
                "-H",
                "x-set: client",
                "-H",
                "x-added: mine",
                "-H",
                "x-remove-me: gone",
                "-H",
                "x-keep: kept",
            ],
        )
    };
    // Until the VirtualService is in force, default routing may reach v1 too: wait for its
    // response header.
    let r = wait_for(WAIT, || {
        let r = api("/api/items?q=1");
        (r.header("x-resp-set") == Some("three")).then_some(r)
    })
    .unwrap_or_else(|_| panic!("not routed: {:?}", api("/api/items?q=1")));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.seen("path"),
        Some("/items?q=1"),
        "prefix rewritten: {r:?}"
    );
    assert_eq!(r.seen("host"), Some("reviews-internal.back"), "{r:?}");
    assert_eq!(r.seen_header("x-set"), vec!["one"], "set replaces: {r:?}");
    assert_eq!(
        r.seen_header("x-added"),
        vec!["mine", "two"],
        "add appends: {r:?}"
    );
    assert!(r.seen_header("x-remove-me").is_empty(), "removed: {r:?}");
    assert_eq!(r.seen_header("x-keep"), vec!["kept"], "{r:?}");
    assert_eq!(r.header("x-resp-set"), Some("three"), "{r:?}");
    assert_eq!(r.header("x-resp-add"), Some("four"), "{r:?}");
    assert_eq!(
        r.header("x-testpod-name"),
        None,
        "response header removed: {r:?}"
    );
    assert_eq!(r.header("x-backend"), Some("reviews-v1"), "{r:?}");
    assert_eq!(api("/api").seen("path"), Some("/"));

    let r = m.get("reviews-edit", &["--path", "/old"]);
    assert_eq!(r.status, 301, "{r:?}");
    assert_eq!(
        r.header("location"),
        Some(format!("http://{}/new", fqdn("reviews-edit")).as_str()),
        "{r:?}"
    );
    let r = m.get("reviews-edit", &["--path", "/temp"]);
    assert_eq!(r.status, 302, "{r:?}");
    assert_eq!(
        r.header("location"),
        Some("http://other.example/temp-new"),
        "{r:?}"
    );
    let r = m.get("reviews-edit", &["--path", "/teapot"]);
    assert_eq!(r.status, 418, "{r:?}");
    assert_eq!(r.body, "short and stout", "{r:?}");
    assert_eq!(r.header("x-direct"), Some("yes"), "{r:?}");
    let r = m.get("reviews-edit", &["--path", "/other"]);
    assert_eq!(r.seen("name"), Some("reviews-v2"), "{r:?}");
    assert_eq!(r.seen("path"), Some("/other"), "{r:?}");
}

/// 6. gRPC through weft: a GRPCRoute sends one method to v2 and the rest to v1; unary and
///    server-streaming calls, a non-OK status and trailing metadata arrive intact.
#[test]
fn grpc_calls_route_by_method_with_status_and_trailers_intact() {
    let m = shared();
    m.apply(
        r#"
        apiVersion: gateway.networking.k8s.io/v1
        kind: GRPCRoute
        metadata:
          name: reviews-grpc
          namespace: back
        spec:
          parentRefs:
          - group: ""
            kind: Service
            name: reviews-grpc
            port: 50051
          rules:
          - matches:
            - method:
                service: weft.test.Echo
                method: Count
            backendRefs:
            - {name: reviews-v2, port: 50051}
          - backendRefs:
            - {name: reviews-v1, port: 50051}
        "#,
    );
    let addr = m.svc("reviews-grpc").addr(GRPC_PORT);
    let authority = format!("{}:{GRPC_PORT}", fqdn("reviews-grpc"));
    let call =
        |method: &str, data: &str| grpc_call(&m.client, addr, method, data, Some(&authority));
    // Each call is a new connection: only per-request routing sends them all to v1.
    wait_until(WAIT, || {
        (0..4).all(|_| s(&call("Say", "hi"), "/trailing_metadata/x-backend") == "reviews-v1")
    })
    .unwrap_or_else(|_| panic!("GRPCRoute not applied: {}", call("Say", "hi")));

    let r = call("Say", "hello");
    assert_eq!(s(&r, "/code"), "OK", "{r}");
    assert_eq!(
        r["messages"],
        serde_json::json!(["reviews-v1|hello"]),
        "{r}"
    );
    assert_eq!(s(&r, "/trailing_metadata/x-backend"), "reviews-v1", "{r}");

    let r = call("Count", "5");
    assert_eq!(s(&r, "/code"), "OK", "{r}");
    let want: Vec<String> = (1..=5).map(|i| format!("reviews-v2|{i}")).collect();
    assert_eq!(
        r["messages"],
        serde_json::json!(want),
        "streamed in order: {r}"
    );
    assert_eq!(s(&r, "/trailing_metadata/x-backend"), "reviews-v2", "{r}");

    let r = call("Fail", "NOT_FOUND:no such review");
    assert_eq!(s(&r, "/code"), "NOT_FOUND", "{r}");
    assert_eq!(s(&r, "/details"), "no such review", "{r}");
    assert_eq!(
        s(&r, "/trailing_metadata/x-detail"),
        "failed-on-purpose",
        "{r}"
    );
    assert_eq!(s(&r, "/trailing_metadata/x-backend"), "reviews-v1", "{r}");

    // Each call is an HTTP/2 request in the flows.
    let f = &last_flow(&m, "/weft.test.Echo/Count");
    assert_eq!(s(f, "/http/method"), "POST", "{f}");
    assert_eq!(f["http"]["status"], 200, "{f}");
}

/// 7. An HTTP/1.1 client, an HTTP/2 (prior knowledge) client and a WebSocket upgrade on the same
///    Service, all routed by its VirtualService.
#[test]
fn http1_http2_and_websocket_clients_share_a_service() {
    let m = shared();
    m.apply(&subsets("reviews-proto"));
    m.apply(
        r#"
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: reviews-proto
          namespace: back
        spec:
          hosts:
          - reviews-proto
          http:
          - route:
            - destination: {host: reviews-proto, subset: v2}
        "#,
    );
    wait_for_routes(&m, "reviews-proto", &[("all to v2", vec![], "reviews-v2")]);
    let url = format!(
        "http://{}:{HTTP_PORT}/proto",
        m.svc("reviews-proto").cluster_ip
    );
    let host = format!("Host: {}", fqdn("reviews-proto"));
    let curl = |extra: &[&str]| {
        let out = m
            .client
            .output(
                Command::new("curl")
                    .args(["-sS", "-i", "--max-time", "5", "-H", &host])
                    .args(extra)
                    .arg(&url),
            )
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    // Both through weft's HTTP engine: routed, and given a request id on the way.
    let h1 = curl(&["--http1.1"]);
    assert!(h1.starts_with("HTTP/1.1 200"), "{h1}");
    assert!(h1.contains("name=reviews-v2\n"), "{h1}");
    assert!(h1.contains("header x-request-id: "), "{h1}");
    let h2 = curl(&["--http2-prior-knowledge"]);
    assert!(h2.starts_with("HTTP/2 200"), "{h2}");
    assert!(h2.contains("name=reviews-v2\n"), "{h2}");
    assert!(h2.contains("header x-request-id: "), "{h2}");

    for args in [vec![], vec!["--http2"]] {
        let s = m.load("reviews-proto", 200, &args);
        assert_eq!(s.status(200), 200, "{args:?}: {s:?}");
        assert_eq!(s.backends.get("reviews-v2"), Some(&200), "{args:?}: {s:?}");
        assert_eq!(s.connections, 1, "kept alive: {args:?}: {s:?}");
    }

    let (code, out) = websocket(
        &m.client,
        m.svc("reviews-proto").addr(HTTP_PORT),
        &["--path", "/ws", "--host", &fqdn("reviews-proto")],
        "hello over an upgraded connection",
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("status=101\n"), "{out}");
    assert!(out.contains("< x-backend: reviews-v2\n"), "{out}");
    assert!(
        out.contains("echo=hello over an upgraded connection\n"),
        "{out}"
    );
}

/// 8. AuthorizationPolicy with L7 rules at the destination: ALLOW by path and method, DENY by
///    header; a denied request gets Envoy's 403, and the destination node's flow names the
///    policy.
#[test]
fn l7_authorization_allows_by_path_and_method_and_denies_by_header() {
    let m = shared();
    let get = |args: &[&str]| m.get("ratings", args);
    let r = get(&["--path", "/private"]);
    assert_eq!(
        (r.status, r.seen("name")),
        (200, Some("ratings-0")),
        "no policy yet: {r:?}"
    );
    m.apply(
        r#"
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata:
          name: ratings-allow
          namespace: back
        spec:
          selector:
            matchLabels:
              app: ratings
          action: ALLOW
          rules:
          - to:
            - operation:
                methods: ["GET"]
                paths: ["/public/*"]
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata:
          name: ratings-deny
          namespace: back
        spec:
          selector:
            matchLabels:
              app: ratings
          action: DENY
          rules:
          - when:
            - key: request.headers[x-evil]
              values: ["true"]
        "#,
    );
    wait_until(WAIT, || get(&["--path", "/private"]).status == 403)
        .unwrap_or_else(|_| panic!("not denied: {:?}", get(&["--path", "/private"])));

    let r = get(&["--path", "/public/info"]);
    assert_eq!(
        (r.status, r.seen("name")),
        (200, Some("ratings-0")),
        "{r:?}"
    );
    for (what, args, policy) in [
        (
            "path not allowed",
            vec!["--path", "/private"],
            "back/ratings-allow",
        ),
        (
            "method not allowed",
            vec!["--path", "/public/info", "--method", "POST"],
            "back/ratings-allow",
        ),
        (
            "denied header",
            vec!["--path", "/public/evil", "-H", "x-evil: true"],
            "back/ratings-deny",
        ),
    ] {
        let r = get(&args);
        assert_eq!(r.status, 403, "{what}: {r:?}");
        assert_eq!(r.body, RBAC_DENIED, "{what}: {r:?}");
        let path = args[1];
        let flows = m
            .weft_b
            .wait_flows(1, WAIT, |f| {
                s(f, "/http/path") == path && f.to_string().contains(policy)
            })
            .unwrap_or_else(|e| panic!("{what}: no flow naming {policy}: {e}"));
        assert_eq!(flows[0]["http"]["status"], 403, "{what}: {}", flows[0]);
    }
    // A header that is not the denied value passes.
    let r = get(&["--path", "/public/info", "-H", "x-evil: false"]);
    assert_eq!(r.status, 200, "{r:?}");
}

/// The raw answer to `text` sent on one connection to the sink Service (a TCP echo: anything
/// that reaches it comes back after its `name=sink-0` line).
fn raw(m: &L7, text: &str) -> String {
    let out = m
        .client
        .output(testpod().args([
            "call",
            &m.svc("sink").addr(HTTP_PORT).to_string(),
            "--send",
            text,
            "--timeout-ms",
            "5000",
        ]))
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// 9. Bad input on an HTTP port is answered by weft and never forwarded: a malformed request
///    line and Content-Length with chunked Transfer-Encoding get 400 (`DPE`), a header block
///    over the 60 KiB default gets 431.
#[test]
fn malformed_requests_are_refused_and_not_forwarded() {
    let m = shared();
    for (what, text) in [
        (
            "malformed request line",
            "G@T / HTTP/1.1\r\nHost: sink.back\r\n\r\n",
        ),
        (
            "Content-Length with chunked",
            "POST / HTTP/1.1\r\nHost: sink.back\r\nContent-Length: 5\r\n\
             Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
    ] {
        let resp = raw(&m, text);
        assert!(resp.starts_with("HTTP/1.1 400"), "{what}: {resp:?}");
        assert!(
            !resp.contains("name=sink-0"),
            "{what} was forwarded: {resp:?}"
        );
    }
    let big = format!("x-big: {}", "a".repeat(61 * 1024));
    let r = m.get("sink", &["--path", "/big", "-H", &big]);
    assert_eq!(r.status, 431, "{:?}", (r.status, &r.stderr, r.body.len()));
    assert!(!r.body.contains("name=sink-0"), "forwarded");
    m.weft_a
        .wait_flows(1, WAIT, |f| s(f, "/http/response_flags") == "DPE")
        .unwrap();
}

/// 10. Every request is a flow with its HTTP facts; a request id is generated when missing (the
///     backend sees it, the flow carries it) and `x-forwarded-for` names the client; no healthy
///     upstream is `UH`, a refused connection `UF`; `weft flows --http` filters by status class,
///     path prefix and method.
#[test]
fn every_request_is_a_flow_with_http_details_and_filters() {
    let m = shared();
    m.apply(
        r#"
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata:
          name: reviews-flows
          namespace: back
        spec:
          host: reviews-flows
          subsets:
          - name: v1
            labels:
              version: v1
          - name: nobody
            labels:
              version: none
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: reviews-flows
          namespace: back
        spec:
          hosts:
          - reviews-flows
          http:
          - name: to-nobody
            match:
            - uri:
                prefix: /none
            route:
            - destination: {host: reviews-flows, subset: nobody}
          - name: to-v1
            route:
            - destination: {host: reviews-flows, subset: v1}
        "#,
    );
    wait_for_routes(&m, "reviews-flows", &[("all to v1", vec![], "reviews-v1")]);
    let s20 = m.load("reviews-flows", 20, &["--path", "/flows/hello"]);
    assert_eq!(s20.status(200), 20, "{s20:?}");

    // The backend sees one generated request id and the client in x-forwarded-for.
    let r = m.get("reviews-flows", &["--path", "/flows/one"]);
    let ids = r.seen_header("x-request-id");
    assert_eq!(ids.len(), 1, "one x-request-id: {r:?}");
    let id = ids[0].to_string();
    assert!(!id.is_empty(), "{r:?}");
    let xff = r.seen_header("x-forwarded-for");
    assert!(
        xff.iter().any(|v| v.contains(&m.client.ip().to_string())),
        "x-forwarded-for names the client: {r:?}"
    );

    let flows = m
        .weft_a
        .wait_flows(20, WAIT, |f| s(f, "/http/path") == "/flows/hello")
        .unwrap();
    let v1 = m.reviews[0].ip().to_string();
    let mut ids_seen = BTreeSet::new();
    for f in &flows {
        assert_eq!(s(f, "/http/method"), "GET", "{f}");
        assert_eq!(s(f, "/http/authority"), fqdn("reviews-flows"), "{f}");
        assert_eq!(f["http"]["status"], 200, "{f}");
        assert!(f["http"]["response_flags"].is_string(), "{f}");
        assert!(s(f, "/http/route").contains("to-v1"), "{f}");
        assert!(
            s(f, "/http/upstream").contains(&format!("{v1}:{HTTP_PORT}")),
            "{f}"
        );
        assert!(f["http"]["duration_ms"].is_number(), "{f}");
        assert!(!s(f, "/http/request_id").is_empty(), "{f}");
        ids_seen.insert(s(f, "/http/request_id").to_string());
    }
    assert_eq!(ids_seen.len(), flows.len(), "a request id per request");
    m.weft_a
        .wait_flows(1, WAIT, |f| s(f, "/http/request_id") == id)
        .unwrap();

    // Failures with their flags: a subset without endpoints, a port nothing listens on.
    let r = m.get("reviews-flows", &["--path", "/none"]);
    assert_eq!(r.status, 503, "{r:?}");
    let r = m.get("closed", &["--path", "/flows/closed"]);
    assert_eq!(r.status, 503, "{r:?}");
    // Istio's default retry policy tries a refused connection twice more: `URX` joins `UF`.
    for (path, flag, attempts) in [("/none", "UH", 0), ("/flows/closed", "UF,URX", 3)] {
        let f = &last_flow(&m, path);
        assert_eq!(s(f, "/http/response_flags"), flag, "{f}");
        assert_eq!(f["http"]["status"], 503, "{f}");
        assert_eq!(f["http"]["attempts"], attempts, "{f}");
    }

    // The backend's own 503s and two POSTs, then the CLI's filters.
    assert_eq!(
        m.load("reviews-flows", 3, &["--path", "/status/503"])
            .status(503),
        3
    );
    assert_eq!(
        m.load(
            "reviews-flows",
            2,
            &["--path", "/flows/post", "--method", "POST"]
        )
        .status(200),
        2
    );
    m.weft_a
        .wait_flows(2, WAIT, |f| s(f, "/http/path") == "/flows/post")
        .unwrap();
    let status = |f: &Value| f["http"]["status"].as_u64().unwrap_or(0);
    let errors = m.weft_a.flows(&["--http", "--status", "5xx"]).unwrap();
    assert!(
        errors.iter().all(|f| (500..600).contains(&status(f))),
        "{errors:?}"
    );
    let paths: Vec<&str> = errors.iter().map(|f| s(f, "/http/path")).collect();
    assert!(
        paths.iter().filter(|p| **p == "/status/503").count() >= 3
            && paths.contains(&"/none")
            && paths.contains(&"/flows/closed"),
        "{paths:?}"
    );
    let under = m.weft_a.flows(&["--http", "--path", "/flows/"]).unwrap();
    assert!(under.len() >= 24, "{}", under.len());
    assert!(
        under
            .iter()
            .all(|f| s(f, "/http/path").starts_with("/flows/")),
        "{under:?}"
    );
    let posts = m.weft_a.flows(&["--http", "--method", "POST"]).unwrap();
    assert!(
        posts.iter().all(|f| s(f, "/http/method") == "POST"),
        "{posts:?}"
    );
    assert!(
        posts
            .iter()
            .filter(|f| s(f, "/http/path") == "/flows/post")
            .count()
            >= 2,
        "{posts:?}"
    );
    let all = m.weft_a.flows(&["--http"]).unwrap();
    assert!(all.iter().all(|f| f["http"].is_object()), "{all:?}");
}

/// 9b. A route object weft cannot apply — a regex that does not compile, an unknown subset — is
///     reported by `weft status` with its file, line and field path, and the routing in force
///     before stays. Own cluster: the broken object is registry-wide.
#[test]
fn invalid_route_objects_are_reported_and_previous_routing_stays() {
    let cluster = Cluster::new("l7_invalid_routes").unwrap();
    let a = cluster.add_node("node-a").unwrap();
    let b = cluster.add_node("node-b").unwrap();
    let client = cluster
        .add_pod(&a, PodSpec::new("front", "client"))
        .unwrap();
    let mut servers = Vec::new();
    for v in ["v1", "v2"] {
        let p = cluster
            .add_pod(
                &b,
                PodSpec::new("back", &format!("reviews-{v}"))
                    .label("app", "reviews")
                    .label("version", v)
                    .port("http", HTTP_PORT),
            )
            .unwrap();
        servers.push(serve(&p, HTTP_PORT, "http"));
    }
    let svc = cluster
        .add_service(
            ServiceSpec::new("back", "reviews")
                .selector("app", "reviews")
                .port("http", HTTP_PORT, HTTP_PORT, None),
        )
        .unwrap();
    for ns in ["front", "back"] {
        cluster.set_namespace_labels(ns, labels(&[ENROLL])).unwrap();
    }
    let weft_a = Weft::start(&cluster, &a).unwrap();
    let _weft_b = Weft::start(&cluster, &b).unwrap();
    let load = || {
        http_load(
            &client,
            svc.addr(HTTP_PORT),
            20,
            &["--host", &fqdn("reviews")],
        )
    };
    let all_v1 = || load().backends.get("reviews-v1") == Some(&20);
    // JSON is YAML: the objects are built as values, then written into the registry.
    let vs = |route: Value| {
        serde_json::json!({
            "apiVersion": "networking.istio.io/v1",
            "kind": "VirtualService",
            "metadata": {"name": "reviews", "namespace": "back"},
            "spec": {"hosts": ["reviews"], "http": [route]},
        })
        .to_string()
    };
    let to =
        |subset: &str| serde_json::json!([{"destination": {"host": "reviews", "subset": subset}}]);
    cluster.apply_yaml(&dedent(&subsets("reviews"))).unwrap();
    cluster
        .apply_yaml(&vs(serde_json::json!({"route": to("v1")})))
        .unwrap();
    wait_until(WAIT, all_v1).unwrap_or_else(|_| panic!("not routed to v1: {:?}", load()));

    let reported = |needle: &str| {
        let st = weft_a.status().unwrap();
        let text = format!(
            "{} {}",
            st["registry"]["last_error"], st["registry"]["not_applied"]
        );
        (text.contains("registry.yaml:") && text.contains(needle)).then_some(text)
    };
    for (what, route, field) in [
        (
            "a regex that does not compile",
            serde_json::json!({"match": [{"uri": {"regex": "/reviews/(["}}], "route": to("v2")}),
            "http[0].match[0].uri.regex",
        ),
        (
            "an unknown subset",
            serde_json::json!({"route": to("v9")}),
            "http[0].route[0].destination.subset",
        ),
    ] {
        cluster.apply_yaml(&vs(route)).unwrap();
        let text = wait_for(WAIT, || reported(field)).unwrap_or_else(|_| {
            panic!(
                "{what}: weft status does not report {field} with its file and line: {}",
                weft_a.status().unwrap()
            )
        });
        assert!(text.contains("VirtualService"), "{what}: {text}");
        assert!(
            text.contains("its previous version stays in force"),
            "{what}: {text}"
        );
        let s = load();
        assert_eq!(
            s.backends.get("reviews-v1"),
            Some(&20),
            "{what}: the previous routing stays: {s:?}"
        );
    }
}

/// 5. A ServiceEntry with `resolution: DNS` for an external TLS host, answered by the test's DNS
///    server: a VirtualService on a mesh-facing Service rewrites `/api` and the authority and
///    routes there; weft originates TLS (DestinationRule SIMPLE, SNI, CA) and the backend sees
///    the rewritten path, the SNI and the Host. A new DNS answer moves traffic after its TTL.
#[test]
fn service_entry_resolves_by_dns_and_originates_tls() {
    const EXTERNAL: &str = "external.example.test";
    let cluster = Cluster::new("l7_service_entry").unwrap();
    let a = cluster.add_node("node-a").unwrap();
    let b = cluster.add_node("node-b").unwrap();
    let client = cluster
        .add_pod(&a, PodSpec::new("front", "client"))
        .unwrap();
    // Outside the mesh: two TLS backends for the external name, and its DNS server.
    let tls = server_certs(&cluster.logs_dir().join("external-tls"), &[EXTERNAL]).unwrap();
    let ext1 = cluster
        .add_pod(&b, PodSpec::new("external", "ext-1"))
        .unwrap();
    let ext2 = cluster
        .add_pod(&b, PodSpec::new("external", "ext-2"))
        .unwrap();
    let dns_pod = cluster
        .add_pod(&b, PodSpec::new("external", "dns"))
        .unwrap();
    let _servers = [serve_https(&ext1, 443, &tls), serve_https(&ext2, 443, &tls)];
    let ttl = Duration::from_secs(2);
    let dns = Dns::in_pod(&dns_pod, ttl).unwrap();
    dns.set(EXTERNAL, ext1.ip()).unwrap();
    // The mesh-facing name clients call: a Service without endpoints of its own.
    let partner = cluster
        .add_service(
            ServiceSpec::new("front", "partner")
                .selector("app", "partner")
                .port("http", 80, 8080u16, None),
        )
        .unwrap();
    cluster
        .set_namespace_labels("front", labels(&[ENROLL]))
        .unwrap();
    let dns_flag = dns.addr().to_string();
    let _weft_a = Weft::start_with(&cluster, &a, &["--dns-server", &dns_flag]).unwrap();
    let _weft_b = Weft::start_with(&cluster, &b, &["--dns-server", &dns_flag]).unwrap();
    cluster
        .apply_yaml(&dedent(&format!(
            r#"
            apiVersion: networking.istio.io/v1
            kind: ServiceEntry
            metadata:
              name: external
              namespace: front
            spec:
              hosts:
              - {EXTERNAL}
              location: MESH_EXTERNAL
              ports:
              - number: 443
                name: https
                protocol: HTTPS
              resolution: DNS
            ---
            apiVersion: networking.istio.io/v1
            kind: DestinationRule
            metadata:
              name: external
              namespace: front
            spec:
              host: {EXTERNAL}
              trafficPolicy:
                tls:
                  mode: SIMPLE
                  sni: {EXTERNAL}
                  caCertificates: {ca}
            ---
            apiVersion: networking.istio.io/v1
            kind: VirtualService
            metadata:
              name: partner
              namespace: front
            spec:
              hosts:
              - partner.front.svc.cluster.local
              http:
              - match:
                - uri:
                    prefix: /api/
                - uri:
                    prefix: /api
                rewrite:
                  uri: /
                  authority: {EXTERNAL}
                route:
                - destination:
                    host: {EXTERNAL}
                    port:
                      number: 443
            "#,
            ca = tls.ca.display()
        )))
        .unwrap();
    let get = || {
        http(
            &client,
            partner.addr(80),
            &[
                "--path",
                "/api/v1/items",
                "--host",
                "partner.front.svc.cluster.local",
            ],
        )
    };
    let r = wait_for(WAIT, || {
        let r = get();
        (r.status == 200).then_some(r)
    })
    .unwrap_or_else(|_| panic!("not routed to {EXTERNAL}: {:?}", get()));
    assert_eq!(r.seen("name"), Some("ext-1"), "{r:?}");
    assert_eq!(r.seen("path"), Some("/v1/items"), "{r:?}");
    assert_eq!(r.seen("sni"), Some(EXTERNAL), "{r:?}");
    assert_eq!(r.seen("host"), Some(EXTERNAL), "{r:?}");
    assert!(
        dns.log()
            .contains(&format!("query[A] {EXTERNAL} from {}", a.ip())),
        "weft resolved through --dns-server: {}",
        dns.log()
    );

    // A new answer: traffic follows once the old one's TTL has passed.
    dns.set(EXTERNAL, ext2.ip()).unwrap();
    let changed = Instant::now();
    wait_until(ttl + WAIT, || get().seen("name") == Some("ext-2")).unwrap_or_else(|_| {
        panic!(
            "still not on ext-2 {:?} after the change",
            changed.elapsed()
        )
    });
    for _ in 0..5 {
        let r = get();
        assert_eq!(r.seen("name"), Some("ext-2"), "{r:?}");
    }
}
