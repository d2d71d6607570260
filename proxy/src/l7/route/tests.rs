//! The route table over whole snapshots: which object and rule answers, precedence, visibility,
//! consumer and producer routes, conflicts, backends.

use std::time::Duration;

use http::{HeaderMap, HeaderValue, Method, StatusCode};

use super::*;
use crate::l7::protocol::AppProtocol;
use crate::registry::fixtures::CLUSTER;
use crate::registry::kinds::networking::TlsMode;

const WEB: &str = "web.back.svc.cluster.local";

fn table(extra: &str) -> RouteTable {
    match Snapshot::from_yaml(&format!("{CLUSTER}---\n{extra}")) {
        Ok(s) => RouteTable::build(&s),
        Err(e) => panic!("{e}"),
    }
}

/// A request description; `route` turns it into a decision.
#[derive(Clone)]
struct Req {
    host: &'static str,
    port: u16,
    ns: Option<&'static str>,
    labels: Option<Labels>,
    method: Method,
    path: &'static str,
    headers: Vec<(&'static str, &'static str)>,
}

fn get(path: &'static str) -> Req {
    Req {
        host: WEB,
        port: 80,
        ns: Some("front"),
        labels: None,
        method: Method::GET,
        path,
        headers: Vec::new(),
    }
}

impl Req {
    fn from(mut self, ns: &'static str) -> Req {
        self.ns = Some(ns);
        self
    }
    fn header(mut self, k: &'static str, v: &'static str) -> Req {
        self.headers.push((k, v));
        self
    }
    fn method(mut self, m: Method) -> Req {
        self.method = m;
        self
    }
    fn host(mut self, h: &'static str) -> Req {
        self.host = h;
        self
    }
}

fn route(t: &RouteTable, r: &Req) -> RouteDecision {
    let mut headers = HeaderMap::new();
    for (k, v) in &r.headers {
        headers.append(
            http::header::HeaderName::from_static(k),
            HeaderValue::from_static(v),
        );
    }
    t.route(&RouteRequest {
        host: r.host,
        port: r.port,
        source_namespace: r.ns,
        source_labels: r.labels.as_ref(),
        method: &r.method,
        authority: "web.back",
        path_and_query: r.path,
        headers: &headers,
    })
}

/// `VirtualService back/web http[1]`, `404` or `default`.
fn who(t: &RouteTable, r: &Req) -> String {
    match route(t, r) {
        RouteDecision::Matched(m) => m.rule.id.to_string(),
        RouteDecision::NotFound => "404".into(),
        RouteDecision::Default => "default".into(),
    }
}

fn forward(t: &RouteTable, r: &Req) -> Forward {
    match route(t, r) {
        RouteDecision::Matched(m) => match &m.rule.action {
            Action::Forward(f) => f.clone(),
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
}

const DR: &str = "\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {namespace: back, name: web}
spec:
  host: web
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
";

const REVIEWS: &str = "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {namespace: back, name: web}
spec:
  hosts: [web]
  http:
  - name: jason
    match:
    - headers: {end-user: {exact: jason}}
    route:
    - destination: {host: web, subset: v2}
  - match:
    - uri: {prefix: /api}
      method: {exact: POST}
    - uri: {exact: /login}
    route:
    - {destination: {host: web, subset: v1}, weight: 90}
    - {destination: {host: web, subset: v2}, weight: 10}
  - match:
    - uri: {regex: '/users/[0-9]+'}
      queryParams: {debug: {exact: '1'}}
    redirect: {uri: /people, authority: people.back}
  - match:
    - withoutHeaders: {x-token: {}}
      uri: {prefix: /private}
    directResponse: {status: 401, body: {string: denied}}
  - match:
    - uri: {prefix: /only-front}
      sourceNamespace: front
    route:
    - destination: {host: web}
";

#[test]
fn virtual_service_rules_in_order_first_match_wins() {
    let t = table(&format!("{DR}---\n{REVIEWS}"));
    assert!(t.warnings().is_empty(), "{:?}", t.warnings());
    assert_eq!(
        who(&t, &get("/x").header("end-user", "jason")),
        "VirtualService back/web http[0] (jason)"
    );
    // The first rule wins even though the second also matches.
    assert_eq!(
        who(&t, &get("/login").header("end-user", "jason")),
        "VirtualService back/web http[0] (jason)"
    );
    assert_eq!(who(&t, &get("/login")), "VirtualService back/web http[1]");
    assert_eq!(
        who(&t, &get("/api/x")),
        "404",
        "GET does not match the POST condition"
    );
    assert_eq!(
        who(&t, &get("/api/x").method(Method::POST)),
        "VirtualService back/web http[1]"
    );
    assert_eq!(
        who(&t, &get("/users/7?debug=1")),
        "VirtualService back/web http[2]"
    );
    assert_eq!(who(&t, &get("/users/7?debug=0")), "404");
    assert_eq!(
        who(&t, &get("/private/a")),
        "VirtualService back/web http[3]"
    );
    assert_eq!(who(&t, &get("/private/a").header("x-token", "t")), "404");
    assert_eq!(
        who(&t, &get("/only-front")),
        "VirtualService back/web http[4]"
    );
    assert_eq!(who(&t, &get("/only-front").from("legacy")), "404");
    // Another host, or no namespace rules at all: Istio's default route.
    assert_eq!(
        who(&t, &get("/x").host("batch.legacy.svc.cluster.local")),
        "default"
    );

    let f = forward(&t, &get("/login"));
    assert_eq!(f.destinations.len(), 2);
    assert_eq!(f.destinations[0].host, WEB);
    assert_eq!(f.destinations[0].subset.as_deref(), Some("v1"));
    assert_eq!(f.pick(95).subset.as_deref(), Some("v2"));
    assert_eq!(f.retries.as_deref(), Some(&RetryPolicy::istio_default()));

    let RouteDecision::Matched(m) = route(&t, &get("/users/7?debug=1")) else {
        panic!()
    };
    let Action::Redirect(r) = &m.rule.action else {
        panic!()
    };
    let method = Method::GET;
    let headers = HeaderMap::new();
    let req = RouteRequest {
        host: WEB,
        port: 80,
        source_namespace: None,
        source_labels: None,
        method: &method,
        authority: "web.back",
        path_and_query: "/users/7?debug=1",
        headers: &headers,
    };
    assert_eq!(
        r.location(&req, m.matched),
        (
            StatusCode::MOVED_PERMANENTLY,
            "http://people.back/people?debug=1".to_string()
        )
    );
    let RouteDecision::Matched(m) = route(&t, &get("/private/a")) else {
        panic!()
    };
    let Action::DirectResponse(d) = &m.rule.action else {
        panic!()
    };
    assert_eq!(
        (d.status, &d.body[..]),
        (StatusCode::UNAUTHORIZED, &b"denied"[..])
    );
    assert_eq!(m.rule.id.rule_name, None);
    let RouteDecision::Matched(m) = route(&t, &get("/").header("end-user", "jason")) else {
        panic!()
    };
    assert_eq!(m.rule.id.rule_name.as_deref(), Some("jason"));
}

#[test]
fn virtual_service_actions_are_typed() {
    let t = table(
        "\
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {namespace: back, name: web}
spec:
  hosts: [web.back.svc.cluster.local]
  http:
  - match: [{uri: {prefix: /v1}}]
    rewrite: {uri: /v2, authority: api.back}
    headers:
      request: {set: {x-a: '1'}, add: {x-b: '2'}, remove: [x-c]}
      response: {set: {x-r: r}}
    timeout: 2s
    retries: {attempts: 3, perTryTimeout: 500ms, retryOn: '5xx,429'}
    fault:
      delay: {fixedDelay: 100ms, percent: 5}
      abort: {grpcStatus: UNAVAILABLE, percentage: {value: 1.5}}
    mirror: {host: lonely}
    mirrorPercent: 20
    route:
    - destination: {host: web, port: {number: 80}}
      weight: 0
      headers: {request: {set: {x-d: d}}}
  - match: [{uri: {prefix: /none}}]
    retries: {attempts: 0}
    route: [{destination: {host: web}}]
",
    );
    let f = forward(&t, &get("/v1/users?x=1"));
    assert_eq!(
        f.destinations[0].weight, 100,
        "a lone destination takes everything"
    );
    assert_eq!(f.destinations[0].port, Some(80));
    assert_eq!(f.destinations[0].request_headers.set.len(), 1);
    let rw = f.rewrite.as_ref().unwrap();
    assert_eq!(rw.authority.as_deref(), Some("api.back"));
    assert_eq!(
        rw.apply("/v1/users?x=1", MatchedPath::Prefix(3)),
        "/v2/users?x=1"
    );
    assert_eq!(f.request_headers.set[0].0, "x-a");
    assert_eq!(f.request_headers.add[0].0, "x-b");
    assert_eq!(f.request_headers.remove[0], "x-c");
    assert_eq!(f.response_headers.set[0].0, "x-r");
    assert_eq!(f.timeout, Some(Duration::from_secs(2)));
    let r = f.retries.as_ref().unwrap();
    assert_eq!(
        (r.attempts, r.retriable_status_codes.as_slice()),
        (3, &[429][..])
    );
    assert_eq!(r.per_try_timeout, Some(Duration::from_millis(500)));
    let fault = f.fault.as_ref().unwrap();
    assert_eq!(
        fault.delay,
        Some(FaultDelay {
            delay: Duration::from_millis(100),
            percent: 5.0
        })
    );
    assert_eq!(
        fault.abort,
        Some(FaultAbort {
            error: AbortError::Grpc(14),
            percent: 1.5
        })
    );
    assert_eq!(
        f.mirrors,
        [Mirror {
            host: "lonely.back.svc.cluster.local".into(),
            port: None,
            subset: None,
            percent: 20.0
        }]
    );
    assert_eq!(
        forward(&t, &get("/none")).retries,
        None,
        "attempts: 0 disables retries"
    );
}

#[test]
fn only_mesh_rules_apply() {
    let t = table(
        "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {namespace: back, name: gw-only}
spec:
  hosts: [web]
  gateways: [back/ingress]
  http:
  - route: [{destination: {host: web}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {namespace: back, name: both}
spec:
  hosts: [lonely]
  gateways: [back/ingress, mesh]
  http:
  - match: [{uri: {prefix: /gw}, gateways: [back/ingress]}]
    route: [{destination: {host: lonely}}]
  - match: [{uri: {prefix: /a}, gateways: [mesh]}, {uri: {prefix: /b}}]
    route: [{destination: {host: lonely}}]
",
    );
    assert_eq!(
        who(&t, &get("/")),
        "default",
        "a gateway-only VirtualService is not for the mesh"
    );
    let lonely = "lonely.back.svc.cluster.local";
    assert_eq!(who(&t, &get("/gw").host(lonely)), "404");
    assert_eq!(
        who(&t, &get("/a").host(lonely)),
        "VirtualService back/both http[1]"
    );
    assert_eq!(
        who(&t, &get("/b").host(lonely)),
        "VirtualService back/both http[1]"
    );
}

fn simple_vs(ns: &str, name: &str, host: &str, export: &str, created: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{namespace: {ns}, name: {name}, creationTimestamp: '{created}'}}\nspec:\n  hosts: [{host}]\n  exportTo: {export}\n  http:\n  - route: [{{destination: {{host: {host}}}}}]\n"
    )
}

#[test]
fn several_virtual_services_for_a_host_follow_istio_order_and_export_to() {
    let t = table(
        &[
            simple_vs("back", "public-new", WEB, "['*']", "2024-02-01T00:00:00Z"),
            simple_vs("back", "public-old", WEB, "['*']", "2024-01-01T00:00:00Z"),
            simple_vs("front", "private", WEB, "['.']", "2024-03-01T00:00:00Z"),
            simple_vs("legacy", "to-back", WEB, "[back]", "2024-03-01T00:00:00Z"),
        ]
        .join("---\n"),
    );
    // Oldest public one for a namespace with nothing of its own.
    assert_eq!(
        who(&t, &get("/").from("legacy")),
        "VirtualService back/public-old http[0]"
    );
    // A namespace's private one first.
    assert_eq!(
        who(&t, &get("/").from("front")),
        "VirtualService front/private http[0]"
    );
    // Exported by name before public.
    assert_eq!(
        who(&t, &get("/").from("back")),
        "VirtualService legacy/to-back http[0]"
    );
    // No client namespace: public ones only.
    let mut unknown = get("/");
    unknown.ns = None;
    assert_eq!(who(&t, &unknown), "VirtualService back/public-old http[0]");
    assert_eq!(t.warnings().len(), 1);
    assert!(
        t.warnings()[0].contains("are not merged"),
        "{:?}",
        t.warnings()
    );
    // Not visible at all: the default route.
    let t = table(&simple_vs(
        "back",
        "private",
        WEB,
        "['.']",
        "2024-01-01T00:00:00Z",
    ));
    assert_eq!(who(&t, &get("/").from("front")), "default");
    assert_eq!(
        who(&t, &get("/").from("back")),
        "VirtualService back/private http[0]"
    );
}

#[test]
fn wildcard_and_external_hosts() {
    let t = table(
        "\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {namespace: back, name: ext}
spec:
  hosts: [api.example.com, '*.wild.example.com']
  addresses: [192.0.2.10, 198.51.100.0/24]
  ports: [{number: 80, name: http, protocol: HTTP}, {number: 443, name: tls, protocol: TLS}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {namespace: back, name: static}
spec:
  hosts: [db.example.com]
  ports: [{number: 5432, name: pg, protocol: TCP, targetPort: 6432}]
  resolution: STATIC
  endpoints: [{address: 203.0.113.5}, {address: 203.0.113.6, ports: {pg: 7000}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {namespace: back, name: wild}
spec:
  hosts: ['*.example.com']
  http:
  - route: [{destination: {host: api.example.com}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {namespace: back, name: exact}
spec:
  hosts: [api.example.com]
  http:
  - route: [{destination: {host: api.example.com}}]
",
    );
    assert_eq!(
        who(&t, &get("/").host("api.example.com")),
        "VirtualService back/exact http[0]"
    );
    assert_eq!(
        who(&t, &get("/").host("x.example.com")),
        "VirtualService back/wild http[0]"
    );
    assert_eq!(who(&t, &get("/").host("example.com")), "default");
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    assert_eq!(
        t.external_by_address(ip("192.0.2.10"), 80).unwrap().host,
        "api.example.com"
    );
    assert_eq!(
        t.external_by_address(ip("198.51.100.7"), 443).unwrap().host,
        "api.example.com"
    );
    assert!(t.external_by_address(ip("198.51.100.7"), 8080).is_none());
    assert_eq!(
        t.external_by_address(ip("203.0.113.5"), 6432).unwrap().host,
        "db.example.com"
    );
    assert_eq!(
        t.external_by_address(ip("203.0.113.6"), 7000).unwrap().host,
        "db.example.com"
    );
    assert_eq!(
        t.external_by_authority("API.example.com:80", 80)
            .unwrap()
            .host,
        "api.example.com"
    );
    assert_eq!(
        t.external_by_authority("a.wild.example.com", 443)
            .unwrap()
            .host,
        "*.wild.example.com"
    );
    assert!(t.external_by_authority("api.example.com", 8080).is_none());
    assert!(t.external_by_authority("other.com", 80).is_none());

    let b = t.backend("api.example.com", None, None, Some("front"));
    assert!(b.is_none(), "two ports: the port must be given");
    let b = t
        .backend("api.example.com", Some(80), None, Some("front"))
        .unwrap();
    assert_eq!(b.protocol, Some(AppProtocol::Http1));
    match b.target {
        Target::External { external, port } => {
            assert_eq!(external.name, "ext");
            assert_eq!(port.number, 80);
        }
        other => panic!("{other:?}"),
    }
    let b = t
        .backend("db.example.com", None, None, Some("front"))
        .unwrap();
    assert_eq!(b.protocol, Some(AppProtocol::Opaque));
    assert!(t
        .backend("x.wild.example.com", Some(443), None, None)
        .is_some());
}

#[test]
fn destination_rules_merge_as_istio_does() {
    let t = table(
        "\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {namespace: back, name: web, creationTimestamp: '2024-01-01T00:00:00Z'}
spec:
  host: web.back.svc.cluster.local
  trafficPolicy:
    loadBalancer: {simple: LEAST_REQUEST}
    connectionPool: {http: {http2MaxRequests: 10}}
    tls: {mode: SIMPLE, sni: web.example}
    portLevelSettings:
    - port: {number: 80}
      loadBalancer: {simple: RANDOM}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      connectionPool: {http: {http2MaxRequests: 99}}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      portLevelSettings:
      - port: {number: 80}
        tls: {mode: ISTIO_MUTUAL}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {namespace: back, name: web-more, creationTimestamp: '2024-02-01T00:00:00Z'}
spec:
  host: web
  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
  subsets: [{name: v1, labels: {version: other}}, {name: v3, labels: {version: v3}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {namespace: front, name: web-for-front}
spec:
  host: web.back.svc.cluster.local
  trafficPolicy: {tls: {mode: DISABLE}}
",
    );
    use crate::registry::kinds::networking::SimpleLb;
    let lb = |b: &Backend| b.policy.load_balancer.as_ref().and_then(|l| l.simple);
    let from_legacy = |subset| t.backend(WEB, Some(80), subset, Some("legacy")).unwrap();
    // Top level, then the port-level entry, which replaces the four together.
    let b = from_legacy(None);
    assert_eq!(lb(&b), Some(SimpleLb::Random));
    assert!(
        b.policy.connection_pool.is_none(),
        "port level does not inherit"
    );
    assert!(b.policy.tls.is_none());
    assert_eq!(b.subset_labels, None);
    assert_eq!(
        b.policy.destination_rule.as_deref(),
        Some("back/web, web-more")
    );
    match &b.target {
        Target::Service { service, port } => {
            assert_eq!((service.name.as_str(), port.port), ("web", 80));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(b.protocol, Some(AppProtocol::Http1), "port name http");
    // The subset overrides field by field.
    let b = from_legacy(Some("v1"));
    assert_eq!(
        b.subset_labels.as_ref().unwrap()["version"],
        "v1",
        "the oldest rule's subset"
    );
    assert_eq!(
        b.policy
            .connection_pool
            .as_ref()
            .unwrap()
            .http
            .as_ref()
            .unwrap()
            .http2_max_requests,
        Some(99)
    );
    assert_eq!(lb(&b), Some(SimpleLb::Random));
    let b = from_legacy(Some("v2"));
    assert_eq!(b.policy.tls.as_ref().unwrap().mode, TlsMode::IstioMutual);
    assert!(
        b.policy.load_balancer.is_none(),
        "the subset's port level replaces the four"
    );
    assert_eq!(
        from_legacy(Some("v3")).subset_labels.unwrap()["version"],
        "v3"
    );
    assert!(t
        .backend(WEB, Some(80), Some("v9"), Some("legacy"))
        .is_none());
    // The client's own namespace first.
    let b = t.backend(WEB, Some(80), None, Some("front")).unwrap();
    assert_eq!(b.policy.tls.as_ref().unwrap().mode, TlsMode::Disable);
    assert_eq!(
        b.policy.destination_rule.as_deref(),
        Some("front/web-for-front")
    );
    // Ports: the only one by default, an unknown one is no backend.
    assert!(t.backend(WEB, None, None, None).is_some());
    assert!(t.backend(WEB, Some(81), None, None).is_none());
    assert!(t
        .backend("nothing.back.svc.cluster.local", None, None, None)
        .is_none());
    // The policy alone is the backend's, for every client namespace, subset and port.
    let json = |p: &TrafficPolicy| serde_json::to_value(p).unwrap();
    for from in [
        None,
        Some("legacy"),
        Some("front"),
        Some("back"),
        Some("other"),
    ] {
        for subset in [None, Some("v1"), Some("v2"), Some("v3"), Some("v9")] {
            for (host, port) in [(WEB, 80), (WEB, 81), ("nothing.back.svc.cluster.local", 80)] {
                let whole = t
                    .backend(host, Some(port), subset, from)
                    .map(|b| json(&b.policy));
                let alone = t.policy(host, port, subset, from).map(|p| json(&p));
                assert_eq!(alone, whole, "{host}:{port} {subset:?} from {from:?}");
            }
        }
    }
}

fn http_route(name: &str, ns: &str, created: &str, rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{namespace: {ns}, name: {name}, creationTimestamp: '{created}'}}\nspec:\n  parentRefs: [{{group: '', kind: Service, name: web, namespace: back, port: 80}}]\n  rules:\n{rules}"
    )
}

const BACKEND: &str = "    backendRefs: [{name: web, namespace: back, port: 80}]\n";

#[test]
fn http_route_precedence_follows_the_spec() {
    let rules = |list: &[&str]| -> String {
        list.iter()
            .map(|m| format!("  - matches: [{m}]\n{BACKEND}"))
            .collect()
    };
    let t = table(&[
        http_route(
            "b-new",
            "back",
            "2024-02-01T00:00:00Z",
            &rules(&[
                "{path: {type: PathPrefix, value: /}}",
                "{path: {type: PathPrefix, value: /api}}",
                "{path: {type: PathPrefix, value: /api}, method: GET}",
                "{path: {type: PathPrefix, value: /api}, method: GET, headers: [{name: x-a, value: '1'}]}",
                "{path: {type: PathPrefix, value: /api}, method: GET, headers: [{name: x-a, value: '1'}], queryParams: [{name: q, value: '1'}]}",
                "{path: {type: RegularExpression, value: '/api/v[0-9]/.*'}}",
            ]),
        ),
        http_route(
            "a-old",
            "back",
            "2024-01-01T00:00:00Z",
            &rules(&[
                "{path: {type: Exact, value: /api/exact}}",
                "{path: {type: PathPrefix, value: /api/longer}}",
                "{path: {type: PathPrefix, value: /api}}",
            ]),
        ),
    ]
    .join("---\n"));
    assert_eq!(who(&t, &get("/api/exact")), "HTTPRoute back/a-old rules[0]");
    assert_eq!(
        who(&t, &get("/api/longer/x")),
        "HTTPRoute back/a-old rules[1]"
    );
    let q = get("/api/x?q=1").header("x-a", "1");
    assert_eq!(
        who(&t, &q),
        "HTTPRoute back/b-new rules[4]",
        "most query params"
    );
    assert_eq!(
        who(&t, &get("/api/x").header("x-a", "1")),
        "HTTPRoute back/b-new rules[3]"
    );
    assert_eq!(
        who(&t, &get("/api/x")),
        "HTTPRoute back/b-new rules[2]",
        "method"
    );
    // Same prefix, no method: the oldest route.
    assert_eq!(
        who(&t, &get("/api/x").method(Method::PUT)),
        "HTTPRoute back/a-old rules[2]"
    );
    // Regex after every prefix but `/`? No: after all prefixes (Istio ranks regex lowest).
    assert_eq!(
        who(&t, &get("/apiz").method(Method::PUT)),
        "HTTPRoute back/b-new rules[0]"
    );
    assert_eq!(who(&t, &get("/other")), "HTTPRoute back/b-new rules[0]");
    // Same timestamp: namespace/name order.
    let t = table(
        &[
            http_route(
                "z",
                "back",
                "2024-01-01T00:00:00Z",
                &rules(&["{path: {value: /p}}"]),
            ),
            http_route(
                "a",
                "back",
                "2024-01-01T00:00:00Z",
                &rules(&["{path: {value: /p}}"]),
            ),
        ]
        .join("---\n"),
    );
    assert_eq!(who(&t, &get("/p")), "HTTPRoute back/a rules[0]");
    assert_eq!(who(&t, &get("/q")), "404", "attached routes, no match: 404");
}

#[test]
fn http_route_filters_and_backends() {
    let t = table(&http_route(
        "web",
        "back",
        "2024-01-01T00:00:00Z",
        "  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters:
    - type: URLRewrite
      urlRewrite: {hostname: new.back, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: X-A, value: a}], add: [{name: x-b, value: b}], remove: [x-c]}
    - type: RequestMirror
      requestMirror: {backendRef: {name: lonely, port: 80}, percent: 25}
    backendRefs:
    - {name: web, port: 80, weight: 3}
    - name: lonely
      port: 80
      filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: x-from, value: lonely}]}}]
    timeouts: {request: 10s, backendRequest: 2s}
    retry: {attempts: 2, codes: [503]}
  - matches: [{path: {value: /redirect}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {scheme: https, statusCode: 301}
  - matches: [{path: {value: /nothing}}]
  - matches: [{path: {value: /zero}}]
    backendRefs: [{name: web, port: 80, weight: 0}]
",
    ));
    let f = forward(&t, &get("/old/x?y=1"));
    assert_eq!(f.destinations.len(), 2);
    assert_eq!((f.destinations[0].weight, f.destinations[1].weight), (3, 1));
    assert_eq!(f.destinations[1].host, "lonely.back.svc.cluster.local");
    assert_eq!(f.destinations[1].response_headers.set[0].0, "x-from");
    assert_eq!(f.pick(3).host, "lonely.back.svc.cluster.local");
    let RouteDecision::Matched(m) = route(&t, &get("/old/x?y=1")) else {
        panic!()
    };
    let rw = f.rewrite.as_ref().unwrap();
    assert_eq!(rw.authority.as_deref(), Some("new.back"));
    assert_eq!(rw.apply("/old/x?y=1", m.matched), "/new/x?y=1");
    assert_eq!(f.request_headers.set[0].0, "x-a");
    assert_eq!(f.mirrors[0].percent, 25.0);
    assert_eq!(f.timeout, Some(Duration::from_secs(10)));
    let r = f.retries.as_ref().unwrap();
    assert_eq!(
        (r.attempts, r.per_try_timeout),
        (2, Some(Duration::from_secs(2)))
    );
    assert_eq!(r.retriable_status_codes, [503]);

    let RouteDecision::Matched(m) = route(&t, &get("/redirect")) else {
        panic!()
    };
    let Action::Redirect(r) = &m.rule.action else {
        panic!()
    };
    assert_eq!(r.status, StatusCode::MOVED_PERMANENTLY);
    assert_eq!(r.port, RedirectPort::SchemeDefault);
    for path in ["/nothing", "/zero"] {
        let RouteDecision::Matched(m) = route(&t, &get(path)) else {
            panic!()
        };
        let Action::DirectResponse(d) = &m.rule.action else {
            panic!()
        };
        assert_eq!(d.status, StatusCode::INTERNAL_SERVER_ERROR, "{path}");
    }
}

#[test]
fn consumer_routes_win_for_their_namespace() {
    let t = table(
        &[
            http_route(
                "producer",
                "back",
                "2024-01-01T00:00:00Z",
                &format!("  - matches: [{{path: {{value: /}}}}]\n{BACKEND}"),
            ),
            http_route(
                "consumer",
                "front",
                "2024-02-01T00:00:00Z",
                &format!("  - matches: [{{path: {{value: /only}}}}]\n{BACKEND}"),
            ),
        ]
        .join("---\n"),
    );
    assert_eq!(
        who(&t, &get("/only").from("front")),
        "HTTPRoute front/consumer rules[0]"
    );
    // For front's clients the producer route no longer applies at all.
    assert_eq!(who(&t, &get("/other").from("front")), "404");
    assert_eq!(
        who(&t, &get("/only").from("legacy")),
        "HTTPRoute back/producer rules[0]"
    );
    assert_eq!(
        who(&t, &get("/other").from("back")),
        "HTTPRoute back/producer rules[0]"
    );
    // Another port of the Service: nothing attached.
    let mut other_port = get("/");
    other_port.port = 8080;
    assert_eq!(who(&t, &other_port), "default");
}

#[test]
fn gateway_api_routes_win_over_a_virtual_service_with_a_warning() {
    let t = table(&format!(
        "{}---\n{}",
        simple_vs("back", "web", WEB, "['*']", "2024-01-01T00:00:00Z"),
        http_route(
            "web",
            "back",
            "2024-01-01T00:00:00Z",
            &format!("  - matches: [{{path: {{value: /}}}}]\n{BACKEND}")
        )
    ));
    assert_eq!(who(&t, &get("/")), "HTTPRoute back/web rules[0]");
    assert_eq!(
        t.warnings(),
        [format!("VirtualService back/web and HTTPRoute back/web both route {WEB}: the Gateway API routes apply and the VirtualService is ignored on the ports they attach to")]
    );
}

#[test]
fn routes_to_gateways_only_are_ignored_with_a_warning() {
    let t = table(
        "\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {namespace: back, name: edge}
spec:
  parentRefs: [{name: ingress}]
  rules: [{backendRefs: [{name: web, port: 80}]}]
",
    );
    assert_eq!(who(&t, &get("/")), "default");
    assert!(
        t.warnings()[0].contains("has no Service parentRef"),
        "{:?}",
        t.warnings()
    );
}

#[test]
fn grpc_routes_match_service_and_method() {
    let t = table(
        "\
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {namespace: back, name: grpc}
spec:
  parentRefs: [{group: '', kind: Service, name: web, port: 80}]
  rules:
  - matches: [{method: {service: pkg.Greeter}}]
    backendRefs: [{name: web, port: 80}]
  - matches: [{method: {service: pkg.Greeter, method: SayHello}}]
    backendRefs: [{name: lonely, port: 80}]
  - matches: [{method: {method: Check}, headers: [{name: x-v, value: '2'}]}]
    backendRefs: [{name: lonely, port: 80}]
  - matches: [{method: {type: RegularExpression, service: 'pkg\\..*', method: 'List.*'}}]
    backendRefs: [{name: lonely, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {namespace: back, name: http}
spec:
  parentRefs: [{group: '', kind: Service, name: web, port: 80}]
  rules: [{backendRefs: [{name: web, port: 80}]}]
",
    );
    let grpc = |path| {
        get(path)
            .method(Method::POST)
            .header("content-type", "application/grpc")
    };
    assert_eq!(
        who(&t, &grpc("/pkg.Greeter/SayHello")),
        "GRPCRoute back/grpc rules[1]",
        "longer method"
    );
    assert_eq!(
        who(&t, &grpc("/pkg.Greeter/Other")),
        "GRPCRoute back/grpc rules[0]"
    );
    assert_eq!(
        who(&t, &grpc("/health.Health/Check").header("x-v", "2")),
        "GRPCRoute back/grpc rules[2]"
    );
    assert_eq!(
        who(&t, &grpc("/pkg.Store/ListItems")),
        "GRPCRoute back/grpc rules[3]"
    );
    // Other gRPC calls fall to the HTTPRoute; plain HTTP never meets the gRPC rules.
    assert_eq!(who(&t, &grpc("/x.Y/Z")), "HTTPRoute back/http rules[0]");
    assert_eq!(
        who(&t, &get("/pkg.Greeter/SayHello")),
        "HTTPRoute back/http rules[0]"
    );
}

#[test]
fn protocol_of_service_ports() {
    let t = table("");
    let b = t
        .backend("batch.legacy.svc.cluster.local", None, None, None)
        .unwrap();
    assert_eq!(
        b.protocol, None,
        "unnamed port without appProtocol: sniffed"
    );
    let svc = match &b.target {
        Target::Service { service, .. } => service.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(t.host_of_service(&svc), "batch.legacy.svc.cluster.local");
}

#[test]
fn route_ids_read_as_the_object_and_rule() {
    let id = RouteId {
        kind: RouteKind::VirtualService,
        namespace: "default".into(),
        name: "reviews".into(),
        rule: 1,
        rule_name: None,
    };
    assert_eq!(id.to_string(), "VirtualService default/reviews http[1]");
    let id = RouteId {
        kind: RouteKind::GrpcRoute,
        ..id
    };
    assert_eq!(id.to_string(), "GRPCRoute default/reviews rules[1]");
    assert!(parse_service_fqdn(WEB) == Some(("back", "web")));
    assert_eq!(parse_service_fqdn("api.example.com"), None);
}

#[test]
fn the_table_is_shared_across_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<RouteTable>();
    send_sync::<Rule>();
}

#[test]
fn export_to_hides_destination_rules_and_service_entries() {
    let t = table(
        "\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {namespace: back, name: private}
spec:
  host: web
  exportTo: ['.']
  trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {namespace: istio-system, name: mesh-wide}
spec:
  host: '*.back.svc.cluster.local'
  trafficPolicy: {tls: {mode: DISABLE}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {namespace: back, name: ext}
spec:
  hosts: [only-back.example.com]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
  exportTo: ['.']
",
    );
    let tls = |ns| {
        let b = t.backend(WEB, Some(80), None, Some(ns)).unwrap();
        (
            b.policy.tls.unwrap().mode,
            b.policy.destination_rule.unwrap(),
        )
    };
    assert_eq!(
        tls("back"),
        (TlsMode::IstioMutual, "back/private".to_string())
    );
    // Not exported to front: the root namespace's rule applies.
    assert_eq!(
        tls("front"),
        (TlsMode::Disable, "istio-system/mesh-wide".to_string())
    );
    assert!(t
        .backend("only-back.example.com", None, None, Some("back"))
        .is_some());
    assert!(t
        .backend("only-back.example.com", None, None, Some("front"))
        .is_none());
}
