//! L7 authorization: HTTP requests, HTTP connections before their requests, and the same
//! policies on TCP traffic.

use http::HeaderMap;

use super::*;

/// One HTTP request: `headers` as `name: value` pairs (repeatable).
struct Req<'a> {
    method: &'a str,
    authority: &'a str,
    path: &'a str,
    headers: &'a [(&'a str, &'a str)],
}

fn get(path: &str) -> Req<'_> {
    Req {
        method: "GET",
        authority: "server.demo:8080",
        path,
        headers: &[],
    }
}

impl<'a> Req<'a> {
    fn method(self, method: &'a str) -> Req<'a> {
        Req { method, ..self }
    }

    fn authority(self, authority: &'a str) -> Req<'a> {
        Req { authority, ..self }
    }

    fn headers(self, headers: &'a [(&'a str, &'a str)]) -> Req<'a> {
        Req { headers, ..self }
    }
}

fn conn_request<'a>(f: &'a Fixture, c: &Conn<'a>) -> ConnRequest<'a> {
    let pod = f.pod(c.to);
    ConnRequest {
        destination: pod,
        destination_port: c.port,
        destination_ip: pod.ip,
        source_principal: c.principal,
        source_namespace: None,
        source_ip: Some(c.ip.parse::<IpAddr>().unwrap()),
    }
}

impl Fixture {
    fn request(&self, c: Conn<'_>, r: Req<'_>) -> Decision {
        let mut headers = HeaderMap::new();
        for (name, value) in r.headers {
            headers.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        let http = HttpRequest {
            method: r.method,
            authority: r.authority,
            path: r.path,
            headers: &headers,
        };
        self.set.authorize_request(&conn_request(self, &c), &http)
    }

    fn request_allowed(&self, c: Conn<'_>, r: Req<'_>) -> bool {
        self.request(c, r).is_allow()
    }

    fn connect(&self, c: Conn<'_>, protocol: Protocol) -> ConnectionDecision {
        self.set
            .authorize_connection(&conn_request(self, &c), protocol)
    }
}

fn server() -> Conn<'static> {
    conn("demo/server", 8080, Some(CLIENT))
}

fn policy(name: &str, action: &str, rules: &str) -> String {
    format!(
        "---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: demo}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  action: {action}
  rules:
{rules}"
    )
}

#[test]
fn methods_and_paths_are_anded_values_ored() {
    let f = fixture(&policy(
        "api",
        "ALLOW",
        "  - to:
    - operation:
        methods: [\"GET\", \"HEAD\"]
        paths: [\"/api/*\", \"/health\"]
",
    ));
    assert!(f.request_allowed(server(), get("/api/users")));
    assert!(f.request_allowed(server(), get("/health").method("HEAD")));
    assert_eq!(
        f.request(server(), get("/api/users").method("POST")),
        deny("demo/api", DenyReason::NotAllowed)
    );
    // Methods are case-sensitive, as Envoy's header matcher.
    assert!(!f.request_allowed(server(), get("/api/users").method("get")));
    assert!(!f.request_allowed(server(), get("/healthz")));
    assert!(!f.request_allowed(server(), get("/api")));
}

#[test]
fn operations_are_ored_and_not_fields_exclude() {
    let f = fixture(&policy(
        "ops",
        "ALLOW",
        "  - to:
    - operation:
        notMethods: [\"DELETE\"]
        paths: [\"/items/*\"]
        notPaths: [\"/items/secret\"]
    - operation:
        methods: [\"P*\"]
        notHosts: [\"internal.*\"]
",
    ));
    assert!(f.request_allowed(server(), get("/items/1")));
    assert!(!f.request_allowed(server(), get("/items/1").method("DELETE")));
    assert!(!f.request_allowed(server(), get("/items/secret")));
    // The second operation: any path, methods starting with P, not internal hosts.
    assert!(f.request_allowed(server(), get("/x").method("POST")));
    assert!(f.request_allowed(server(), get("/x").method("PATCH")));
    assert!(!f.request_allowed(server(), get("/x").method("PUT").authority("Internal.shop")));
    assert!(!f.request_allowed(server(), get("/x")));
}

#[test]
fn hosts_ignore_case_keep_the_port_and_take_wildcards() {
    let f = fixture(&policy(
        "hosts",
        "ALLOW",
        "  - to:
    - operation:
        hosts: [\"shop.example\", \"*.shop.example\", \"api.internal*\"]
",
    ));
    let host = |h: &'static str| f.request_allowed(server(), get("/").authority(h));
    assert!(host("shop.example"));
    assert!(host("SHOP.Example"));
    assert!(host("www.shop.example"));
    assert!(host("api.internal:9090"));
    // Exact hosts do not match a host with a port, as in Istio.
    assert!(!host("shop.example:8080"));
    assert!(!host("shop.example.evil"));
    assert!(!host(""));
}

#[test]
fn path_forms_and_templates() {
    let f = fixture(&policy(
        "paths",
        "ALLOW",
        "  - to:
    - operation:
        paths: [\"/exact\", \"/prefix/*\", \"*.png\", \"/users/{*}/posts\", \"/files/{**}\"]
",
    ));
    let path = |p: &'static str| f.request_allowed(server(), get(p));
    assert!(path("/exact"));
    assert!(
        path("/exact?query=1"),
        "the query string is not part of the path"
    );
    assert!(path("/exact#frag"));
    assert!(!path("/exact/"));
    assert!(!path("/Exact"));
    assert!(path("/prefix/"));
    assert!(path("/prefix/a/b"));
    assert!(!path("/prefix"));
    assert!(path("/img/logo.png"));
    assert!(!path("/img/logo.png.bak"));
    assert!(path("/users/42/posts"));
    assert!(!path("/users/42/7/posts"));
    assert!(!path("/users//posts"));
    assert!(path("/files/"));
    assert!(path("/files/a/b/c.txt?download=1"));
    assert!(!path("/files"));

    let f = fixture(&policy(
        "any",
        "ALLOW",
        "  - to:
    - operation:
        paths: [\"*\"]
",
    ));
    assert!(f.request_allowed(server(), get("/")));
}

#[test]
fn header_conditions() {
    let f = fixture(&policy(
        "headers",
        "ALLOW",
        "  - when:
    - key: request.headers[X-User]
      values: [\"alice\", \"team-*\", \"*@example.com\"]
      notValues: [\"team-banned\"]
    - key: request.headers[x-canary]
      notValues: [\"*\"]
",
    ));
    let with = |h: &'static [(&'static str, &'static str)]| {
        f.request_allowed(server(), get("/").headers(h))
    };
    assert!(with(&[("x-user", "alice")]));
    assert!(with(&[("X-USER", "team-blue")]), "header names ignore case");
    assert!(with(&[("x-user", "bob@example.com")]));
    assert!(!with(&[("x-user", "Alice")]), "values are case-sensitive");
    assert!(!with(&[("x-user", "team-banned")]));
    assert!(!with(&[]), "an absent header matches no value");
    assert!(
        !with(&[("x-user", "alice"), ("x-canary", "")]),
        "`*` is presence"
    );
    // A repeated header is matched as its values joined with `,`.
    assert!(!with(&[("x-user", "alice"), ("x-user", "bob")]));
    assert!(with(&[("x-user", "team-a"), ("x-user", "bob")]));
    assert!(with(&[("x-user", "bob"), ("x-user", "carol@example.com")]));

    // notValues alone hold when the header is absent.
    let f = fixture(&policy(
        "no-debug",
        "DENY",
        "  - when:
    - key: request.headers[x-debug]
      values: [\"*\"]
",
    ));
    assert!(f.request_allowed(server(), get("/")));
    assert_eq!(
        f.request(server(), get("/").headers(&[("x-debug", "1")])),
        deny("demo/no-debug", DenyReason::DenyPolicy)
    );
}

#[test]
fn pseudo_headers_in_conditions() {
    let f = fixture(&policy(
        "pseudo",
        "ALLOW",
        "  - when:
    - key: request.headers[:authority]
      values: [\"shop.*\"]
    - key: request.headers[:method]
      values: [\"GET\"]
    - key: request.headers[:path]
      values: [\"*?debug=1\"]
",
    ));
    assert!(f.request_allowed(server(), get("/a?debug=1").authority("shop.example")));
    assert!(!f.request_allowed(server(), get("/a").authority("shop.example")));
    assert!(!f.request_allowed(server(), get("/a?debug=1").authority("other")));
}

#[test]
fn deny_before_allow_with_http_attributes() {
    let f = fixture(&format!(
        "{}{}",
        policy(
            "no-admin",
            "DENY",
            "  - to:
    - operation:
        paths: [\"/admin/*\"]
    when:
    - key: request.headers[x-override]
      notValues: [\"yes\"]
",
        ),
        policy("everything", "ALLOW", "  - {}\n"),
    ));
    assert!(f.request_allowed(server(), get("/shop")));
    assert_eq!(
        f.request(server(), get("/admin/users")),
        deny("demo/no-admin", DenyReason::DenyPolicy)
    );
    assert!(f.request_allowed(
        server(),
        get("/admin/users").headers(&[("x-override", "yes")])
    ));
}

#[test]
fn source_and_destination_attributes_still_apply_per_request() {
    let f = fixture(&policy(
        "mixed",
        "ALLOW",
        "  - from:
    - source: {namespaces: [\"demo\"]}
    to:
    - operation:
        ports: [\"8080\"]
        methods: [\"GET\"]
    when:
    - key: source.ip
      values: [\"10.244.0.0/16\"]
",
    ));
    assert!(f.request_allowed(server(), get("/")));
    assert!(!f.request_allowed(conn("demo/server", 9090, Some(CLIENT)), get("/")));
    assert!(!f.request_allowed(conn("demo/server", 8080, Some(PROD_APP)), get("/")));
    assert!(!f.request_allowed(conn("demo/server", 8080, None), get("/")));
    let mut elsewhere = server();
    elsewhere.ip = "192.0.2.1";
    assert!(!f.request_allowed(elsewhere, get("/")));
    assert!(!f.request_allowed(server(), get("/").method("POST")));
}

/// The policy of `http_attributes_fail_closed_in_allow`: fails closed at L4, exact for HTTP.
const HTTP_ALLOW: &str = "\
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
  - when:
    - key: request.headers[x-user]
      values: [\"admin\"]
  - from:
    - source: {namespaces: [\"prod\"]}
";

#[test]
fn a_policy_that_fails_closed_for_tcp_is_exact_for_http() {
    let f = fixture(HTTP_ALLOW);
    // TCP: the HTTP rules never allow.
    assert_eq!(
        f.decide(server()),
        deny("demo/http-allow", DenyReason::NotAllowedHttpRules)
    );
    assert_eq!(
        f.connect(server(), Protocol::Tcp),
        ConnectionDecision::Deny {
            policy: "demo/http-allow".into(),
            reason: DenyReason::NotAllowedHttpRules
        }
    );
    // HTTP: exactly as written.
    assert!(f.request_allowed(server(), get("/api/orders")));
    assert_eq!(
        f.request(server(), get("/api/orders").method("POST")),
        deny("demo/http-allow", DenyReason::NotAllowed)
    );
    assert!(f.request_allowed(
        conn("demo/server", 8080, None),
        get("/anything")
            .method("DELETE")
            .headers(&[("x-user", "admin")])
    ));
    assert!(!f.request_allowed(conn("demo/server", 8080, None), get("/api/orders")));
    assert!(f.request_allowed(conn("demo/server", 8080, Some(PROD_APP)), get("/x")));
    // At connect time an HTTP connection waits for its requests.
    assert_eq!(
        f.connect(server(), Protocol::Http),
        ConnectionDecision::PerRequest
    );
    assert_eq!(
        f.connect(conn("demo/server", 8080, Some(PROD_APP)), Protocol::Http),
        ConnectionDecision::Allow
    );
}

#[test]
fn deny_with_http_attributes_is_exact_per_request_and_wide_for_tcp() {
    let f = fixture(&policy(
        "no-admin-api",
        "DENY",
        "  - from:
    - source: {notNamespaces: [\"demo\"]}
    to:
    - operation:
        ports: [\"8080\"]
        paths: [\"/admin/*\"]
",
    ));
    let outsider = || conn("demo/server", 8080, Some(PROD_APP));
    // TCP: every connection to 8080 from outside demo.
    assert_eq!(
        f.decide(outsider()),
        deny("demo/no-admin-api", DenyReason::DenyPolicy)
    );
    // HTTP: only /admin/*.
    assert!(f.request_allowed(outsider(), get("/shop")));
    assert_eq!(
        f.request(outsider(), get("/admin/x")),
        deny("demo/no-admin-api", DenyReason::DenyPolicy)
    );
    assert!(f.request_allowed(server(), get("/admin/x")));
    assert_eq!(
        f.connect(outsider(), Protocol::Http),
        ConnectionDecision::PerRequest
    );
    // The L4 part cannot match: nothing to check per request.
    assert_eq!(
        f.connect(server(), Protocol::Http),
        ConnectionDecision::Allow
    );
}

#[test]
fn unsupported_attributes_fail_closed_for_http() {
    // ALLOW rules with JWT, SNI, Envoy metadata or a pseudo-header weft does not see never
    // match; the L4 rule still allows.
    let f = fixture(&policy(
        "jwt-allow",
        "ALLOW",
        "  - from:
    - source: {requestPrincipals: [\"*\"]}
  - when:
    - key: request.auth.claims[groups]
      values: [\"admins\"]
  - when:
    - key: connection.sni
      values: [\"*\"]
  - when:
    - key: experimental.envoy.filters.network.mysql_proxy[db.table]
      values: [\"[update]\"]
  - when:
    - key: request.headers[:scheme]
      values: [\"https\"]
  - to:
    - operation: {paths: [\"/public/*\"]}
",
    ));
    assert_eq!(
        f.request(server(), get("/private")),
        deny("demo/jwt-allow", DenyReason::NotAllowedUnsupportedRules)
    );
    assert!(f.request_allowed(server(), get("/public/x")));
    assert!(f
        .set
        .warnings()
        .iter()
        .any(|w| w.contains("requestPrincipals, request.auth.claims[groups], connection.sni, experimental.envoy.filters.network.mysql_proxy[db.table], request.headers[:scheme] cannot be evaluated")));

    // DENY rules hold without them: the rest of the rule decides.
    let f = fixture(&policy(
        "jwt-deny",
        "DENY",
        "  - from:
    - source: {notRequestPrincipals: [\"*\"]}
    to:
    - operation: {paths: [\"/private/*\"]}
",
    ));
    assert_eq!(
        f.request(server(), get("/private/x")),
        deny("demo/jwt-deny", DenyReason::DenyPolicy)
    );
    assert!(f.request_allowed(server(), get("/public")));
}

#[test]
fn custom_fails_closed_on_what_its_l4_attributes_select() {
    let f = fixture(
        &policy(
            "ext-authz",
            "CUSTOM",
            "  - to:
    - operation: {paths: [\"/secure/*\"]}
",
        )
        .replace(
            "  action: CUSTOM\n",
            "  action: CUSTOM\n  provider: {name: ext}\n",
        ),
    );
    // No external authorizer: every request it could select is denied, as at L4.
    for path in ["/secure/x", "/open"] {
        assert_eq!(
            f.request(server(), get(path)),
            deny("demo/ext-authz", DenyReason::CustomPolicy)
        );
    }
    assert_eq!(
        f.connect(server(), Protocol::Http),
        ConnectionDecision::Deny {
            policy: "demo/ext-authz".into(),
            reason: DenyReason::CustomPolicy
        }
    );
}

#[test]
fn connection_stage() {
    let f = fixture(&format!(
        "{}{}{}",
        policy(
            "deny-prod",
            "DENY",
            "  - from:
    - source: {namespaces: [\"prod\"]}
",
        ),
        policy(
            "deny-post",
            "DENY",
            "  - to:
    - operation: {methods: [\"POST\"]}
    when:
    - key: destination.port
      values: [\"9090\"]
",
        ),
        policy(
            "allow-get",
            "ALLOW",
            "  - to:
    - operation: {ports: [\"8080\", \"9090\"], methods: [\"GET\"]}
",
        ),
    ));
    let http = |c: Conn<'static>| f.connect(c, Protocol::Http);
    // A DENY rule with L4 attributes only: the connection is refused.
    assert_eq!(
        http(conn("demo/server", 8080, Some(PROD_APP))),
        ConnectionDecision::Deny {
            policy: "demo/deny-prod".into(),
            reason: DenyReason::DenyPolicy
        }
    );
    // An ALLOW rule that could match: each request decides.
    assert_eq!(http(server()), ConnectionDecision::PerRequest);
    // No ALLOW rule could match any request on this port: refused at connect.
    assert_eq!(
        http(conn("demo/server", 7070, Some(CLIENT))),
        ConnectionDecision::Deny {
            policy: "demo/allow-get".into(),
            reason: DenyReason::NotAllowed
        }
    );
    // A DENY rule with HTTP attributes: per request.
    assert_eq!(
        http(conn("demo/server", 9090, Some(CLIENT))),
        ConnectionDecision::PerRequest
    );
    assert!(f.request_allowed(conn("demo/server", 9090, Some(CLIENT)), get("/")));
    assert_eq!(
        f.request(
            conn("demo/server", 9090, Some(CLIENT)),
            get("/").method("POST")
        ),
        deny("demo/deny-post", DenyReason::DenyPolicy)
    );
    // The same connection as TCP: the DENY holds without its method; the ALLOW never matches.
    assert_eq!(
        f.connect(conn("demo/server", 9090, Some(CLIENT)), Protocol::Tcp),
        ConnectionDecision::Deny {
            policy: "demo/deny-post".into(),
            reason: DenyReason::DenyPolicy
        }
    );
    assert_eq!(
        f.connect(server(), Protocol::Tcp),
        ConnectionDecision::Deny {
            policy: "demo/allow-get".into(),
            reason: DenyReason::NotAllowedHttpRules
        }
    );
    // Nothing selects demo/other: allowed outright.
    assert_eq!(
        http(conn("demo/other", 80, Some(CLIENT))),
        ConnectionDecision::Allow
    );
}

#[test]
fn allow_nothing_and_allow_everything_for_http() {
    let f = fixture(
        "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: nothing, namespace: demo}
spec:
  selector: {matchLabels: {app: server}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: everything, namespace: demo}
spec:
  selector: {matchLabels: {app: other}}
  rules: [{}]
",
    );
    assert_eq!(
        f.request(server(), get("/")),
        deny("demo/nothing", DenyReason::NotAllowed)
    );
    assert_eq!(
        f.connect(server(), Protocol::Http),
        ConnectionDecision::Deny {
            policy: "demo/nothing".into(),
            reason: DenyReason::NotAllowed
        }
    );
    let other = || conn("demo/other", 80, None);
    assert!(f.request_allowed(other(), get("/")));
    assert_eq!(
        f.connect(other(), Protocol::Http),
        ConnectionDecision::Allow
    );
}

#[test]
fn fail_closed_objects_deny_http_too() {
    let s = Snapshot::from_yaml(&format!(
        "{CLUSTER}---
apiVersion: security.istio.io/v1
kind: AuthorisationPolicy
metadata: {{name: typo, namespace: demo}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  rules: [{{}}]
"
    ))
    .unwrap();
    let set = PolicySet::build(&s, ROOT);
    let f = Fixture { snapshot: s, set };
    let fail = ConnectionDecision::Deny {
        policy: "demo/typo".into(),
        reason: DenyReason::FailClosed,
    };
    assert_eq!(f.connect(server(), Protocol::Http), fail);
    assert_eq!(f.connect(server(), Protocol::Tcp), fail);
    assert_eq!(
        f.request(server(), get("/")),
        deny("demo/typo", DenyReason::FailClosed)
    );
    assert!(f.request_allowed(conn("demo/other", 80, None), get("/")));
}

/// What the connection stage decides must hold for every request on it: `Allow` only if every
/// request is allowed, `Deny` only if every request is denied.
#[test]
fn the_connection_stage_agrees_with_every_request() {
    let f = fixture(&format!(
        "{}{}{}{}",
        policy(
            "deny-admin-outside",
            "DENY",
            "  - from:
    - source: {notNamespaces: [\"demo\"]}
    to:
    - operation: {paths: [\"/admin/*\"]}
",
        ),
        policy(
            "deny-9090",
            "DENY",
            "  - to:
    - operation: {ports: [\"9090\"]}
",
        ),
        policy(
            "allow-reads",
            "ALLOW",
            "  - from:
    - source: {namespaces: [\"demo\", \"prod\"]}
    to:
    - operation: {methods: [\"GET\"], notPaths: [\"/internal/*\"]}
  - from:
    - source: {principals: [\"cluster.local/ns/prod/sa/app\"]}
    when:
    - key: request.headers[x-role]
      values: [\"writer\"]
",
        ),
        policy(
            "allow-health",
            "ALLOW",
            "  - to:
    - operation: {ports: [\"8081\"]}
",
        ),
    ));
    let principals = [
        Some(CLIENT),
        Some(PROD_APP),
        Some("cluster.local/ns/x/sa/y"),
        None,
    ];
    let ports = [8080, 8081, 9090, 7070];
    let requests = || {
        [
            get("/"),
            get("/admin/x"),
            get("/internal/y"),
            get("/").method("POST"),
            get("/").method("POST").headers(&[("x-role", "writer")]),
            get("/admin/x").headers(&[("x-role", "writer")]),
        ]
    };
    let (mut allow, mut deny_, mut per_request) = (0, 0, 0);
    for principal in principals {
        for port in ports {
            let c = || conn("demo/server", port, principal);
            let at_connect = f.connect(c(), Protocol::Http);
            let decisions: Vec<bool> = requests()
                .into_iter()
                .map(|r| f.request_allowed(c(), r))
                .collect();
            match at_connect {
                ConnectionDecision::Allow => {
                    allow += 1;
                    assert!(decisions.iter().all(|a| *a), "{principal:?}:{port}");
                }
                ConnectionDecision::Deny { .. } => {
                    deny_ += 1;
                    assert!(decisions.iter().all(|a| !*a), "{principal:?}:{port}");
                }
                ConnectionDecision::PerRequest => per_request += 1,
            }
        }
    }
    // Every outcome is exercised.
    assert!(
        allow > 0 && deny_ > 0 && per_request > 0,
        "{allow} {deny_} {per_request}"
    );
}

#[test]
fn bad_http_values_fail_the_load_with_their_field_path() {
    let errors = load_errors(&format!(
        "{CLUSTER}{}",
        policy(
            "bad",
            "ALLOW",
            "  - to:
    - operation:
        paths: [\"/users/{*}/x\", \"/api/*/users\", \"/files/{**}/{*}\", \"files/{*}\", \"/a/{id}\"]
        hosts: [\"a.*.example\"]
",
        )
    ));
    let errors: Vec<&str> = errors
        .iter()
        .map(|e| e.split_once("spec.").unwrap().1)
        .collect();
    assert_eq!(
        errors,
        [
            "rules[0].to[0].operation.hosts[0]: invalid value \"a.*.example\": `*` is only supported alone, as a prefix or as a suffix",
            "rules[0].to[0].operation.paths[1]: invalid value \"/api/*/users\": `*` is only supported alone, as a prefix or as a suffix; use {*} for one path segment or {**} for any number of segments",
            "rules[0].to[0].operation.paths[2]: invalid path template \"/files/{**}/{*}\": {**} must be the last operator",
            "rules[0].to[0].operation.paths[3]: invalid path template \"files/{*}\": must start with `/`",
            "rules[0].to[0].operation.paths[4]: invalid path \"/a/{id}\": `{` and `}` are only allowed in the whole-segment operators {*} and {**}",
        ]
    );
}
