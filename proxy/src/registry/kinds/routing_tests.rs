//! The routing kinds through the whole load: YAML → typed objects, and every refusal with its
//! `file:line: document N (Kind ns/name): field.path: reason`.

use crate::registry::fixtures::CLUSTER;
use crate::registry::kinds::gateway::PathMatchType;
use crate::registry::kinds::networking::{Resolution, TlsMode};
use crate::registry::Snapshot;

fn load(extra: &str) -> Snapshot {
    match Snapshot::from_yaml(&format!("{CLUSTER}---\n{extra}")) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    }
}

/// The errors of loading `extra` after the shared cluster, without the `<inline>:N: ` prefix.
fn errors(extra: &str) -> Vec<String> {
    match Snapshot::from_yaml(&format!("{CLUSTER}---\n{extra}")) {
        Ok(_) => panic!("expected errors for\n{extra}"),
        Err(e) => e
            .iter()
            .map(|e| {
                let s = e.to_string();
                s.split_once(": ").map(|(_, r)| r.to_string()).unwrap_or(s)
            })
            .collect(),
    }
}

fn assert_error(extra: &str, expected: &str) {
    let errs = errors(extra);
    assert!(
        errs.iter().any(|e| e.contains(expected)),
        "expected {expected:?} in {errs:#?}"
    );
}

fn vs(spec: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{namespace: back, name: web}}\nspec:\n{spec}"
    )
}

fn httproute(spec: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{namespace: back, name: web}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: web, port: 80}}]\n{spec}"
    )
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

#[test]
fn every_version_parses_into_typed_objects() {
    for v in ["v1", "v1beta1", "v1alpha3"] {
        let s = load(&format!(
            "apiVersion: networking.istio.io/{v}\nkind: VirtualService\nmetadata: {{namespace: back, name: web, creationTimestamp: '2024-01-02T03:04:05Z'}}\nspec:\n  hosts: [web]\n  http:\n  - timeout: 1.5s\n    route:\n    - destination: {{host: web}}\n"
        ));
        let vs = &s.virtual_services[0];
        assert_eq!(vs.meta.name, "web");
        assert!(vs.meta.creation_timestamp.is_some());
        assert_eq!(
            vs.spec.http[0].timeout.unwrap().0,
            std::time::Duration::from_millis(1500)
        );
    }
    let s = load(&format!(
        "{DR}---\n{}",
        httproute("  rules:\n  - backendRefs: [{name: web, port: 80}]\n")
    ));
    assert_eq!(s.destination_rules[0].spec.subsets.len(), 2);
    let rule = &s.http_routes[0].spec.rules.as_ref().unwrap()[0];
    assert_eq!(rule.matches()[0].path().kind, PathMatchType::PathPrefix);
    assert_eq!(rule.matches()[0].path().value(), "/");
    assert!(s.http_routes[0].spec.parent_refs[0].is_service());
}

#[test]
fn v1alpha3_deprecated_percent_fields_parse() {
    let s = load(
        "apiVersion: networking.istio.io/v1alpha3\nkind: VirtualService\nmetadata: {namespace: back, name: web}\nspec:\n  hosts: [web]\n  http:\n  - fault:\n      delay: {fixedDelay: 5s, percent: 10}\n      abort: {httpStatus: 503, percent: 20}\n    mirror: {host: web}\n    mirrorPercent: 30\n    route:\n    - destination: {host: web}\n"
    );
    let http = &s.virtual_services[0].spec.http[0];
    let fault = http.fault.as_ref().unwrap();
    assert_eq!(fault.delay.as_ref().unwrap().share(), 10.0);
    assert_eq!(fault.abort.as_ref().unwrap().share(), 20.0);
    assert_eq!(http.mirror_percent, Some(30));
}

#[test]
fn service_entry_and_destination_rule_parse_whole() {
    let s = load(
        "\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {namespace: back, name: ext}
spec:
  hosts: [api.example.com]
  ports: [{number: 443, name: https, protocol: HTTPS}, {number: 80, name: http, protocol: HTTP, targetPort: 8080}]
  location: MESH_EXTERNAL
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {namespace: back, name: ext}
spec:
  host: api.example.com
  exportTo: ['.']
  trafficPolicy:
    loadBalancer:
      consistentHash: {httpCookie: {name: user, ttl: 0s}}
    connectionPool:
      tcp: {maxConnections: 10, connectTimeout: 30ms, tcpKeepalive: {time: 7200s, interval: 75s}}
      http: {http2MaxRequests: 1000, maxRequestsPerConnection: 10, h2UpgradePolicy: UPGRADE, idleTimeout: 1m}
    outlierDetection: {consecutive5xxErrors: 7, interval: 5m, baseEjectionTime: 15m, maxEjectionPercent: 50}
    tls: {mode: SIMPLE, sni: api.example.com, caCertificates: /etc/ca.pem, subjectAltNames: [api.example.com]}
    portLevelSettings:
    - port: {number: 80}
      tls: {mode: DISABLE}
",
    );
    let se = &s.service_entries[0];
    assert_eq!(se.spec.resolution, Resolution::Dns);
    assert_eq!(se.spec.ports[1].target_port, 8080);
    let tp = s.destination_rules[0].spec.traffic_policy.as_ref().unwrap();
    assert_eq!(tp.tls.as_ref().unwrap().mode, TlsMode::Simple);
    assert_eq!(
        tp.outlier_detection
            .as_ref()
            .unwrap()
            .consecutive_5xx_errors,
        Some(7)
    );
}

#[test]
fn virtual_service_refusals_name_the_field() {
    let cases: &[(&str, &str)] = &[
        (
            "  hosts: [web]\n  http:\n  - delegate: {name: other}\n",
            "(VirtualService back/web): spec.http[0].delegate: delegate is not supported",
        ),
        (
            "  hosts: [web]\n  http:\n  - rewrite: {uri: /a, uriRegexRewrite: {match: a, rewrite: b}}\n    route: [{destination: {host: web}}]\n",
            "spec.http[0].rewrite: rewrite may only contain one of URI or UriRegexRewrite",
        ),
        (
            "  hosts: [web]\n  http:\n  - route:\n    - {destination: {host: web}, weight: -1}\n    - {destination: {host: web}, weight: 1}\n",
            "spec.http[0].route[0].weight: weight -1 < 0",
        ),
        (
            "  hosts: [web]\n  http:\n  - route:\n    - {destination: {host: web}}\n    - {destination: {host: web}}\n",
            "spec.http[0].route: total destination weight = 0",
        ),
        (
            "  hosts: [web]\n  http:\n  - match: [{uri: {regex: '(a'}}]\n    route: [{destination: {host: web}}]\n",
            "spec.http[0].match[0].uri.regex: invalid regex \"(a\"",
        ),
        (
            "  hosts: [web]\n  http:\n  - match: [{uri: {regex: '(?=a)'}}]\n    route: [{destination: {host: web}}]\n",
            "spec.http[0].match[0].uri.regex: invalid regex",
        ),
        (
            "  hosts: [web]\n  http:\n  - match: [{uri: {exact: /a, prefix: /b}}]\n    route: [{destination: {host: web}}]\n",
            "spec.http[0].match[0].uri: only one of exact, prefix or regex may be set",
        ),
        (
            "  hosts: [web]\n  http:\n  - timeout: 1x\n    route: [{destination: {host: web}}]\n",
            "spec.http[0].timeout: invalid duration \"1x\"",
        ),
        (
            "  hosts: [web]\n  http:\n  - timeout: 500us\n    route: [{destination: {host: web}}]\n",
            "spec.http[0].timeout: duration must be at least 1ms",
        ),
        (
            "  hosts: [web]\n  http:\n  - directResponse: {status: 700}\n",
            "spec.http[0].directResponse.status: HTTP status 700 is not in range 200-599",
        ),
        (
            "  hosts: [web]\n  http:\n  - redirect: {uri: /x, redirectCode: 200}\n",
            "spec.http[0].redirect.redirectCode: 200 is not a valid redirect code, must be 3xx",
        ),
        (
            "  hosts: [web]\n  http:\n  - redirect: {uri: /x}\n    route: [{destination: {host: web}}]\n",
            "spec.http[0].redirect: HTTP route cannot contain both route and redirect",
        ),
        (
            "  hosts: [web]\n  http:\n  - match: [{uri: {prefix: /}}]\n",
            "spec.http[0].route: HTTP route, redirect or direct_response is required",
        ),
        (
            "  hosts: [web]\n  http:\n  - fault: {abort: {httpStatus: 99, percentage: {value: 10}}}\n    route: [{destination: {host: web}}]\n",
            "spec.http[0].fault.abort.httpStatus: HTTP status 99 is not in range 200-599",
        ),
        (
            "  hosts: [web]\n  http:\n  - fault: {abort: {http2Error: REFUSED_STREAM}}\n    route: [{destination: {host: web}}]\n",
            "spec.http[0].fault.abort.http2Error: HTTP/2 abort fault injection not supported yet",
        ),
        (
            "  hosts: [web]\n  http:\n  - fault: {delay: {fixedDelay: 1s, percentage: {value: 101}}}\n    route: [{destination: {host: web}}]\n",
            "spec.http[0].fault.delay.percentage: percentage 101 is neither 0.0, nor in range [0.0001, 100.0]",
        ),
        (
            "  hosts: [web]\n  http:\n  - retries: {attempts: 0, perTryTimeout: 1s}\n    route: [{destination: {host: web}}]\n",
            "spec.http[0].retries.attempts: http retry policy configured when attempts are set to 0 (disabled)",
        ),
        (
            "  hosts: [web]\n  http:\n  - retries: {attempts: 3, retryOn: 'bogus,5xx'}\n    route: [{destination: {host: web}}]\n",
            "spec.http[0].retries.retryOn: \"bogus\" is not a valid retryOn policy",
        ),
        (
            "  hosts: ['*']\n  http:\n  - route: [{destination: {host: web}}]\n",
            "spec.hosts[0]: wildcard host * is not allowed for virtual services bound to the mesh gateway",
        ),
        (
            "  hosts: [web, web]\n  http:\n  - route: [{destination: {host: web}}]\n",
            "spec.hosts[1]: duplicate hosts in virtual service: web & web",
        ),
        (
            "  hosts: [web]\n",
            "spec: http, tcp or tls must be provided in virtual service",
        ),
        (
            "  hosts: [web]\n  http:\n  - headers: {request: {set: {':path': /x}}}\n    route: [{destination: {host: web}}]\n",
            "spec.http[0].headers.request.set.:path: invalid header \":path\": header cannot have \":\" prefix",
        ),
        (
            "  hosts: [web]\n  http:\n  - route: [{destination: {host: web}}]\n    mirror: {host: web}\n    mirrors: [{destination: {host: web}}]\n",
            "spec.http[0].mirrors: HTTP route cannot contain both mirror and mirrors",
        ),
        (
            "  hosts: [web]\n  exportTo: ['*', back]\n  http:\n  - route: [{destination: {host: web}}]\n",
            "spec.exportTo: cannot have both public (*) and non-public exportTo values for a resource",
        ),
        (
            "  hosts: [web]\n  http:\n  - route: [{destination: {host: web}, weight: 100}]\n    bogus: 1\n",
            "spec.http[0].bogus: unknown field `bogus`",
        ),
    ];
    for (spec, expected) in cases {
        assert_error(&vs(spec), expected);
    }
}

#[test]
fn an_unknown_subset_fails_the_load_at_the_route() {
    let errs = errors(&format!(
        "{DR}---\n{}",
        vs("  hosts: [web]\n  http:\n  - route:\n    - {destination: {host: web, subset: v1}, weight: 50}\n    - {destination: {host: web.back.svc.cluster.local, subset: v3}, weight: 50}\n")
    ));
    assert_eq!(
        errs,
        ["document 21 (VirtualService back/web): spec.http[0].route[1].destination.subset: unknown subset \"v3\" of web.back.svc.cluster.local (no DestinationRule defines it)"]
    );
    let full = Snapshot::from_yaml(&format!(
        "{CLUSTER}---\n{}",
        vs("  hosts: [web]\n  http:\n  - route:\n    - destination: {host: web, subset: v9}\n")
    ))
    .unwrap_err()
    .to_string();
    // The line of the field inside the document.
    assert!(full.starts_with("<inline>:"), "{full}");
    let line: usize = full.split(':').nth(1).unwrap().parse().unwrap();
    let text = format!("{CLUSTER}---\n");
    assert_eq!(line, text.lines().count() + 8, "{full}");
    // Subsets of `name.ns` and of the Service VIP resolve to the same host.
    load(&format!(
        "{DR}---\n{}",
        vs("  hosts: [web]\n  http:\n  - route:\n    - {destination: {host: web.back, subset: v1}, weight: 50}\n    - {destination: {host: 10.96.0.10, subset: v2}, weight: 50}\n")
    ));
}

#[test]
fn destination_rule_refusals_name_the_field() {
    let dr = |spec: &str| {
        format!("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{namespace: back, name: web}}\nspec:\n  host: web\n{spec}")
    };
    let cases: &[(&str, &str)] = &[
        (
            "  subsets: [{name: v1}, {name: v1}]\n",
            "spec.subsets[1].name: duplicate subset names: v1",
        ),
        (
            "  subsets: [{name: V1}]\n",
            "spec.subsets[0].name: subset name is invalid: V1",
        ),
        (
            "  trafficPolicy: {}\n",
            "spec.trafficPolicy: traffic policy must have at least one field",
        ),
        (
            "  trafficPolicy: {loadBalancer: {simple: FASTEST}}\n",
            "spec.trafficPolicy.loadBalancer.simple: unknown variant `FASTEST`",
        ),
        (
            "  trafficPolicy: {connectionPool: {http: {h2UpgradePolicy: UPGRADE, useClientProtocol: true}}}\n",
            "spec.trafficPolicy.connectionPool.http.useClientProtocol: use client protocol must not be true when H2UpgradePolicy is UPGRADE",
        ),
        (
            "  trafficPolicy: {tls: {mode: MUTUAL}}\n",
            "spec.trafficPolicy.tls.clientCertificate: client certificate required for mutual tls",
        ),
        (
            "  trafficPolicy: {tls: {mode: SIMPLE, insecureSkipVerify: true, caCertificates: /ca.pem}}\n",
            "spec.trafficPolicy.tls: cannot specify CaCertificates or CredentialName or SubjectAltNames when InsecureSkipVerify is set true",
        ),
        (
            "  trafficPolicy: {outlierDetection: {maxEjectionPercent: 101}}\n",
            "spec.trafficPolicy.outlierDetection.maxEjectionPercent: percentage 101 is not in range 0..100",
        ),
        (
            "  trafficPolicy: {loadBalancer: {consistentHash: {maglev: {tableSize: 100}}}}\n",
            "spec.trafficPolicy.loadBalancer.consistentHash.maglev.tableSize: tableSize must be a prime number for maglev",
        ),
        (
            "  trafficPolicy: {portLevelSettings: [{port: {number: 80}}]}\n",
            "spec.trafficPolicy.portLevelSettings[0]: port traffic policy must have at least one field",
        ),
        (
            "  subsets: [{name: v1, trafficPolicy: {connectionPool: {tcp: {connectTimeout: 0s}}}}]\n",
            "spec.subsets[0].trafficPolicy.connectionPool.tcp.connectTimeout: duration must be at least 1ms",
        ),
    ];
    for (spec, expected) in cases {
        assert_error(&dr(spec), expected);
    }
}

#[test]
fn service_entry_refusals_name_the_field() {
    let se = |spec: &str| {
        format!("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{namespace: back, name: ext}}\nspec:\n{spec}")
    };
    let cases: &[(&str, &str)] = &[
        (
            "  ports: [{number: 80, name: http}]\n",
            "spec.hosts: service entry must have at least one host",
        ),
        (
            "  hosts: ['*']\n",
            "spec.hosts[0]: invalid host *",
        ),
        (
            "  hosts: [a.example.com]\n  resolution: STATIC\n  endpoints: [{address: db.example.com}]\n",
            "spec.endpoints[0].address: endpoint address \"db.example.com\" is not a valid IP address",
        ),
        (
            "  hosts: ['*.example.com']\n  resolution: DNS\n",
            "spec.hosts[0]: hosts must be FQDN if no endpoints are provided for resolution mode DNS",
        ),
        (
            "  hosts: [a.example.com]\n  resolution: DNS_ROUND_ROBIN\n  endpoints: [{address: 1.1.1.1}, {address: 2.2.2.2}]\n",
            "spec.endpoints: there must only be 0 or 1 endpoint for resolution mode DNS_ROUND_ROBIN",
        ),
        (
            "  hosts: [a.example.com]\n  resolution: NONE\n  endpoints: [{address: 1.1.1.1}]\n",
            "spec.endpoints: no endpoints should be provided for resolution type none",
        ),
        (
            "  hosts: [a.example.com]\n  addresses: [10.0.0.0/8]\n  resolution: DNS\n",
            "spec.addresses: CIDR addresses are allowed only for NONE/STATIC resolution types",
        ),
        (
            "  hosts: [a.example.com]\n  ports: [{number: 80, name: http, protocol: QUIC}]\n",
            "spec.ports[0].protocol: unsupported protocol: QUIC",
        ),
        (
            "  hosts: [a.example.com]\n  ports: [{number: 80, name: http}, {number: 80, name: web}]\n",
            "spec.ports[1].number: service entry port 80 already defined",
        ),
        (
            "  hosts: [a.example.com, b.example.com]\n  resolution: DNS\n  ports: [{number: 5432, name: pg, protocol: TCP}]\n",
            "spec.ports[0].protocol: multiple hosts provided with non-HTTP, non-TLS ports",
        ),
        (
            "  hosts: [a.example.com]\n  resolution: STATIC\n  ports: [{number: 80, name: http}]\n  endpoints: [{address: 1.1.1.1, ports: {web: 8080}}]\n",
            "spec.endpoints[0].ports.web: endpoint port 8080 is not defined by the service entry",
        ),
        (
            "  hosts: [a.example.com]\n  location: MESH_OUTSIDE\n",
            "spec.location: unknown variant `MESH_OUTSIDE`",
        ),
    ];
    for (spec, expected) in cases {
        assert_error(&se(spec), expected);
    }
    // NONE with a wildcard, STATIC with IPs: fine.
    load(&se("  hosts: ['*.example.com']\n  ports: [{number: 443, name: tls, protocol: TLS}]\n  resolution: NONE\n"));
    load(&se("  hosts: [db.example.com]\n  addresses: [192.0.2.10]\n  resolution: STATIC\n  endpoints: [{address: 192.0.2.11}]\n"));
}

#[test]
fn http_route_refusals_name_the_field() {
    let cases: &[(&str, &str)] = &[
        (
            "  rules:\n  - matches: [{path: {type: Exact, value: /a}}, {path: {value: /b}}]\n    filters:\n    - type: URLRewrite\n      urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /x}}\n    backendRefs: [{name: web, port: 80}]\n",
            "spec.rules[0].filters: When using URLRewrite filter with path.replacePrefixMatch, exactly one PathPrefix match must be specified",
        ),
        (
            "  rules:\n  - filters:\n    - type: RequestRedirect\n      requestRedirect: {scheme: https}\n    backendRefs: [{name: web, port: 80}]\n",
            "spec.rules[0].filters: RequestRedirect filter must not be used together with backendRefs",
        ),
        (
            "  rules:\n  - filters:\n    - type: RequestRedirect\n      requestRedirect: {statusCode: 305}\n",
            "spec.rules[0].filters[0].requestRedirect.statusCode: unsupported value 305",
        ),
        (
            "  rules:\n  - matches: [{path: {type: PathPrefix, value: 'a/b'}}]\n    backendRefs: [{name: web, port: 80}]\n",
            "spec.rules[0].matches[0].path.value: value must be an absolute path and start with '/'",
        ),
        (
            "  rules:\n  - matches: [{path: {type: RegularExpression, value: '(x'}}]\n    backendRefs: [{name: web, port: 80}]\n",
            "spec.rules[0].matches[0].path.value: invalid regex",
        ),
        (
            "  rules:\n  - matches: [{method: FETCH}]\n    backendRefs: [{name: web, port: 80}]\n",
            "spec.rules[0].matches[0].method: unsupported value \"FETCH\"",
        ),
        (
            "  rules:\n  - backendRefs: [{name: web}]\n",
            "spec.rules[0].backendRefs[0].port: Must have port for Service reference",
        ),
        (
            "  rules:\n  - filters:\n    - type: RequestHeaderModifier\n    backendRefs: [{name: web, port: 80}]\n",
            "spec.rules[0].filters[0]: filter.requestHeaderModifier must be specified for RequestHeaderModifier filter.type",
        ),
        (
            "  rules:\n  - filters:\n    - type: RequestHeaderModifier\n      requestHeaderModifier: {set: [{name: a, value: b}], remove: [A]}\n    backendRefs: [{name: web, port: 80}]\n",
            "spec.rules[0].filters[0].requestHeaderModifier.remove[0]: header \"A\" is modified more than once",
        ),
        (
            "  rules:\n  - timeouts: {request: 1s, backendRequest: 2s}\n    backendRefs: [{name: web, port: 80}]\n",
            "spec.rules[0].timeouts: backendRequest timeout cannot be longer than request timeout",
        ),
        (
            "  rules:\n  - name: a\n    backendRefs: [{name: web, port: 80}]\n  - name: a\n    backendRefs: [{name: web, port: 80}]\n",
            "spec.rules[1].name: Rule name must be unique within the route",
        ),
        (
            "  rules:\n  - matches:\n    - headers: [{name: 'bad header', value: x}]\n    backendRefs: [{name: web, port: 80}]\n",
            "spec.rules[0].matches[0].headers[0].name: header name \"bad header\" is not a valid header name",
        ),
        (
            "  rules:\n  - backendRefs:\n    - name: web\n      port: 80\n      filters: [{type: URLRewrite, urlRewrite: {hostname: x}}]\n",
            "spec.rules[0].backendRefs[0].filters[0].type: URLRewrite filter on a backend is not supported by weft: put it on the rule",
        ),
        (
            "  rules:\n  - filters:\n    - type: ExtensionRef\n      extensionRef: {group: x, kind: y, name: z}\n    backendRefs: [{name: web, port: 80}]\n",
            "spec.rules[0].filters[0].type: ExtensionRef filters are not supported by weft",
        ),
    ];
    for (spec, expected) in cases {
        assert_error(&httproute(spec), expected);
    }
    let too_many: String = (0..65)
        .map(|i| format!("    - path: {{value: /p{i}}}\n"))
        .collect();
    assert_error(
        &httproute(&format!(
            "  rules:\n  - matches:\n{too_many}    backendRefs: [{{name: web, port: 80}}]\n"
        )),
        "spec.rules[0].matches: must have at most 64 items",
    );
}

#[test]
fn grpc_route_refusals_name_the_field() {
    let route = |spec: &str| {
        format!("apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {{namespace: back, name: web}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: web, port: 80}}]\n{spec}")
    };
    assert_error(
        &route("  rules:\n  - matches: [{method: {}}]\n    backendRefs: [{name: web, port: 80}]\n"),
        "spec.rules[0].matches[0].method: One or both of 'service' or 'method' must be specified",
    );
    assert_error(
        &route("  rules:\n  - matches: [{method: {service: 'a b'}}]\n    backendRefs: [{name: web, port: 80}]\n"),
        "spec.rules[0].matches[0].method.service: service must only contain valid characters",
    );
    assert_error(
        &route("  rules:\n  - filters: [{type: URLRewrite, urlRewrite: {hostname: x}}]\n    backendRefs: [{name: web, port: 80}]\n"),
        "spec.rules[0].filters[0].type: unsupported value \"URLRewrite\"",
    );
    let s = load(&route(
        "  rules:\n  - matches: [{method: {service: helloworld.Greeter, method: SayHello}}]\n    backendRefs: [{name: web, port: 80}]\n",
    ));
    assert_eq!(s.grpc_routes.len(), 1);
}

#[test]
fn one_object_whatever_its_version() {
    let a = vs("  hosts: [web]\n  http:\n  - route: [{destination: {host: web}}]\n");
    let b = a.replace("networking.istio.io/v1", "networking.istio.io/v1beta1");
    assert_error(&format!("{a}---\n{b}"), "duplicate VirtualService back/web");
}
