//! HTTPRoute and GRPCRoute → rules, for the mesh (GAMMA): a route applies through a `parentRef`
//! to a core Service (optionally one `port`, or the port named by `sectionName`). A route in the
//! Service's namespace is a producer route, for every client; a route in another namespace is a
//! consumer route, for that namespace's clients only, and for them it replaces the producer
//! routes of that Service port. parentRefs to Gateways are ignored (weft runs no gateway), and
//! so are `hostnames` (meaningless for a Service parent).
//!
//! Precedence across every rule attached to a Service port, as the Gateway API specifies it:
//! HTTPRoute: exact path, then the longest prefix (RegularExpression paths after prefixes,
//! longest pattern first, as Istio orders them), a method match, the most header matches, the
//! most query parameter matches; GRPCRoute: the longest service, the longest method, the most
//! header matches; then the oldest route (`creationTimestamp`), then `namespace/name`, then rule
//! and match order. GRPCRoute rules match gRPC requests only and are tried before HTTPRoute
//! rules.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::StatusCode;

use super::action::{
    Action, DirectResponse, Forward, HeaderOps, Mirror, PathRewrite, Redirect, RedirectPort,
    RetryPolicy, Rewrite, WeightedDestination,
};
use super::matching::{
    is_grpc, Conditions, HeaderMatch, PathMatch, QueryMatch, QueryParams, StringMatcher,
};
use super::{service_fqdn, Entry, RouteDecision, RouteId, RouteKind, RouteRequest, Rule, RuleSet};
use crate::registry::kinds::gateway::{
    BackendRef, GrpcRouteRule, HeaderFilter, HttpRouteFilter, HttpRouteMatch, HttpRouteRule,
    ParentReference, PathMatchType, ValueMatch, ValueMatchType,
};
use crate::registry::{Meta, Service, Snapshot};

/// The rules attached to one Service port.
#[derive(Debug, Default)]
pub(crate) struct PortRules {
    grpc: RuleSet,
    http: RuleSet,
}

impl PortRules {
    fn route<'a>(&self, req: &RouteRequest<'a>, query: &mut QueryParams<'a>) -> RouteDecision {
        if !self.grpc.is_empty() && is_grpc(req.headers) {
            if let Some(m) = self.grpc.first_match(req, query) {
                return RouteDecision::Matched(m);
            }
        }
        match self.http.first_match(req, query) {
            Some(m) => RouteDecision::Matched(m),
            None => RouteDecision::NotFound,
        }
    }
}

/// The Gateway API routes of one Service.
#[derive(Debug, Default)]
pub(crate) struct ServiceRoutes {
    producer: HashMap<u16, PortRules>,
    /// Client namespace → its consumer routes.
    consumers: HashMap<String, HashMap<u16, PortRules>>,
    /// `Kind ns/name` of every route attached, for warnings.
    names: Vec<String>,
}

impl ServiceRoutes {
    /// `None` when no route is attached to the port the client called.
    pub(crate) fn route<'a>(
        &self,
        req: &RouteRequest<'a>,
        query: &mut QueryParams<'a>,
    ) -> Option<RouteDecision> {
        let consumer = req
            .source_namespace
            .and_then(|ns| self.consumers.get(ns))
            .and_then(|ports| ports.get(&req.port));
        let rules = consumer.or_else(|| self.producer.get(&req.port))?;
        Some(rules.route(req, query))
    }

    pub(crate) fn describe(&self) -> String {
        self.names.join(", ")
    }

    pub(crate) fn len(&self) -> usize {
        let count = |m: &HashMap<u16, PortRules>| {
            m.values()
                .map(|r| r.grpc.len() + r.http.len())
                .sum::<usize>()
        };
        count(&self.producer) + self.consumers.values().map(count).sum::<usize>()
    }
}

/// An entry with its precedence key.
type Keyed = (Vec<i64>, Entry);

/// Where entries go: (service FQDN, consumer namespace or `None` for producers, port).
type Bucket = (String, Option<String>, u16);

#[derive(Default)]
struct Buckets {
    http: HashMap<Bucket, Vec<Keyed>>,
    grpc: HashMap<Bucket, Vec<Keyed>>,
    names: HashMap<String, Vec<String>>,
}

/// The Service ports a parentRef of a route in `route_ns` attaches to: `(service, consumer
/// namespace, ports)`.
fn attach<'s>(
    snapshot: &'s Snapshot,
    parent: &ParentReference,
    route_ns: &str,
) -> Option<(&'s Service, Option<String>, Vec<u16>)> {
    if !parent.is_service() {
        return None;
    }
    let ns = parent.namespace.as_deref().unwrap_or(route_ns);
    let svc = snapshot.service(ns, &parent.name)?;
    let ports: Vec<u16> = svc
        .ports
        .iter()
        .filter(|p| p.protocol == "TCP")
        .filter(|p| parent.port.is_none_or(|want| u32::from(p.port) == want))
        .filter(|p| {
            parent
                .section_name
                .as_ref()
                .is_none_or(|s| p.name.as_deref() == Some(s.as_str()))
        })
        .map(|p| p.port)
        .collect();
    let consumer = (ns != route_ns).then(|| route_ns.to_string());
    Some((svc, consumer, ports))
}

/// Every HTTPRoute and GRPCRoute attached to a Service, by Service FQDN.
pub(crate) fn compile(
    snapshot: &Snapshot,
    warnings: &mut Vec<String>,
) -> Vec<(String, ServiceRoutes)> {
    let mut b = Buckets::default();
    // Route precedence: oldest first, then namespace/name, across both kinds.
    let mut order: Vec<(&Meta, bool, usize)> = snapshot
        .http_routes
        .iter()
        .enumerate()
        .map(|(i, r)| (&r.meta, false, i))
        .chain(
            snapshot
                .grpc_routes
                .iter()
                .enumerate()
                .map(|(i, r)| (&r.meta, true, i)),
        )
        .collect();
    order.sort_by(|a, b| a.0.precedence().cmp(&b.0.precedence()));
    for (rank, (meta, grpc, i)) in order.into_iter().enumerate() {
        let (parents, kind) = if grpc {
            (&snapshot.grpc_routes[i].spec.parent_refs, "GRPCRoute")
        } else {
            (&snapshot.http_routes[i].spec.parent_refs, "HTTPRoute")
        };
        let mut attached = false;
        for parent in parents {
            let Some((svc, consumer, ports)) = attach(snapshot, parent, &meta.namespace) else {
                if parent.is_service() {
                    warnings.push(format!(
                        "{kind} {}/{}: parentRef Service {}/{} does not exist: not applied to it",
                        meta.namespace,
                        meta.name,
                        parent.namespace.as_deref().unwrap_or(&meta.namespace),
                        parent.name
                    ));
                }
                continue;
            };
            attached = true;
            let host = service_fqdn(&svc.namespace, &svc.name);
            b.names
                .entry(host.clone())
                .or_default()
                .push(format!("{kind} {}/{}", meta.namespace, meta.name));
            for port in ports {
                let bucket = (host.clone(), consumer.clone(), port);
                if grpc {
                    let route = &snapshot.grpc_routes[i];
                    for (r, rule) in route.spec.rules.iter().flatten().enumerate() {
                        grpc_entries(rule, r, meta, rank, &mut b.grpc, &bucket);
                    }
                } else {
                    let route = &snapshot.http_routes[i];
                    match &route.spec.rules {
                        Some(rules) => {
                            for (r, rule) in rules.iter().enumerate() {
                                http_entries(rule, r, meta, rank, &mut b.http, &bucket);
                            }
                        }
                        // No rules: the API's default, one rule matching everything with no
                        // backend (500).
                        None => http_entries(
                            &HttpRouteRule::default(),
                            0,
                            meta,
                            rank,
                            &mut b.http,
                            &bucket,
                        ),
                    }
                }
            }
        }
        if !attached && !parents.iter().any(ParentReference::is_service) {
            warnings.push(format!(
                "{kind} {}/{} has no Service parentRef: weft applies Gateway API routes to Services only (GAMMA), not to Gateways",
                meta.namespace, meta.name
            ));
        }
    }
    let mut out: HashMap<String, ServiceRoutes> = HashMap::new();
    for (grpc, map) in [(false, b.http), (true, b.grpc)] {
        for ((host, consumer, port), mut entries) in map {
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            let set = RuleSet::new(entries.into_iter().map(|(_, e)| e).collect());
            let routes = out.entry(host).or_default();
            let ports = match consumer {
                Some(ns) => routes.consumers.entry(ns).or_default(),
                None => &mut routes.producer,
            };
            let rules = ports.entry(port).or_default();
            if grpc {
                rules.grpc = set;
            } else {
                rules.http = set;
            }
        }
    }
    for (host, names) in b.names {
        let routes = out.entry(host).or_default();
        routes.names = names;
        routes.names.dedup();
    }
    out.into_iter().collect()
}

fn value_matcher(m: &ValueMatch) -> StringMatcher {
    match m.kind {
        ValueMatchType::Exact => StringMatcher::Exact(m.value.clone()),
        ValueMatchType::RegularExpression => {
            StringMatcher::regex(&m.value).unwrap_or(StringMatcher::Exact(m.value.clone()))
        }
    }
}

/// Header matches; of several with one name (any case), the first counts.
fn header_matches(list: &[ValueMatch]) -> Vec<HeaderMatch> {
    let mut out: Vec<HeaderMatch> = Vec::new();
    for m in list {
        let Ok(name) = HeaderName::from_bytes(m.name.to_ascii_lowercase().as_bytes()) else {
            continue;
        };
        if out.iter().any(|h| h.name == name) {
            continue;
        }
        out.push(HeaderMatch {
            name,
            matcher: value_matcher(m),
            invert: false,
        });
    }
    out
}

fn route_id(kind: RouteKind, meta: &Meta, rule: usize, name: &Option<String>) -> RouteId {
    RouteId {
        kind,
        namespace: meta.namespace.clone(),
        name: meta.name.clone(),
        rule,
        rule_name: name.clone(),
    }
}

fn http_entries(
    rule: &HttpRouteRule,
    index: usize,
    meta: &Meta,
    rank: usize,
    out: &mut HashMap<Bucket, Vec<Keyed>>,
    bucket: &Bucket,
) {
    let matches = rule.matches();
    let prefix = match matches.as_slice() {
        [m] if m.path().kind == PathMatchType::PathPrefix => Some(m.path().value().to_string()),
        _ => None,
    };
    let compiled = Arc::new(Rule::new(
        route_id(RouteKind::HttpRoute, meta, index, &rule.name),
        http_action(
            &rule.filters,
            &rule.backend_refs,
            &meta.namespace,
            prefix.is_some(),
            rule.timeouts.as_ref().and_then(|t| t.request).map(|d| d.0),
            rule.timeouts
                .as_ref()
                .and_then(|t| t.backend_request)
                .map(|d| d.0),
            rule.retry.as_ref(),
        ),
    ));
    for (j, m) in matches.iter().enumerate() {
        let (conditions, key) = http_conditions(m);
        let mut key = key;
        key.extend([rank as i64, index as i64, j as i64]);
        out.entry(bucket.clone()).or_default().push((
            key,
            Entry {
                conditions,
                rule: compiled.clone(),
            },
        ));
    }
}

/// Conditions and the precedence key of one match (smaller sorts first).
fn http_conditions(m: &HttpRouteMatch) -> (Conditions, Vec<i64>) {
    let path = m.path();
    let value = path.value();
    let (path_match, rank) = match path.kind {
        PathMatchType::Exact => (Some(PathMatch::exact(value, false)), 3),
        PathMatchType::PathPrefix => (Some(PathMatch::segments(value)), 2),
        PathMatchType::RegularExpression => (PathMatch::regex(value).ok(), 1),
    };
    let mut query: Vec<QueryMatch> = Vec::new();
    for q in &m.query_params {
        if !query.iter().any(|x| x.name == q.name) {
            query.push(QueryMatch {
                name: q.name.clone(),
                matcher: value_matcher(q),
            });
        }
    }
    let headers = header_matches(&m.headers);
    let key = vec![
        -rank,
        -(value.len() as i64),
        -(m.method.is_some() as i64),
        -(headers.len() as i64),
        -(query.len() as i64),
    ];
    let conditions = Conditions {
        path: path_match,
        method: m.method.clone().map(StringMatcher::Exact),
        headers,
        query,
        ..Conditions::default()
    };
    (conditions, key)
}

fn grpc_entries(
    rule: &GrpcRouteRule,
    index: usize,
    meta: &Meta,
    rank: usize,
    out: &mut HashMap<Bucket, Vec<Keyed>>,
    bucket: &Bucket,
) {
    let compiled = Arc::new(Rule::new(
        route_id(RouteKind::GrpcRoute, meta, index, &rule.name),
        http_action(
            &rule.filters,
            &rule.backend_refs,
            &meta.namespace,
            false,
            None,
            None,
            None,
        ),
    ));
    let matches = if rule.matches.is_empty() {
        vec![Default::default()]
    } else {
        rule.matches.clone()
    };
    for (j, m) in matches.iter().enumerate() {
        let method = m.method.as_ref();
        let service = method.and_then(|x| x.service.as_deref());
        let name = method.and_then(|x| x.method.as_deref());
        let regex = method.is_some_and(|x| x.kind == ValueMatchType::RegularExpression);
        // gRPC requests are `POST /package.Service/Method`.
        let path = match (service, name, regex) {
            (None, None, _) => None,
            (Some(s), Some(n), false) => Some(PathMatch::exact(&format!("/{s}/{n}"), false)),
            (Some(s), None, false) => Some(PathMatch::prefix(&format!("/{s}/"), false)),
            (s, n, _) => {
                let s = match (s, regex) {
                    (Some(s), true) => s.to_string(),
                    (Some(s), false) => regex::escape(s),
                    (None, _) => "[^/]+".to_string(),
                };
                let n = match (n, regex) {
                    (Some(n), true) => n.to_string(),
                    (Some(n), false) => regex::escape(n),
                    (None, _) => "[^/]+".to_string(),
                };
                PathMatch::regex(&format!("/{s}/{n}")).ok()
            }
        };
        let headers = header_matches(&m.headers);
        let key = vec![
            -(service.map_or(0, str::len) as i64),
            -(name.map_or(0, str::len) as i64),
            -(headers.len() as i64),
            rank as i64,
            index as i64,
            j as i64,
        ];
        out.entry(bucket.clone()).or_default().push((
            key,
            Entry {
                conditions: Conditions {
                    path,
                    headers,
                    grpc: true,
                    ..Conditions::default()
                },
                rule: compiled.clone(),
            },
        ));
    }
}

fn header_filter(f: Option<&HeaderFilter>) -> HeaderOps {
    let mut out = HeaderOps::default();
    let Some(f) = f else { return out };
    let pair = |name: &str, value: &str| {
        Some((
            HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).ok()?,
            HeaderValue::from_str(value).ok()?,
        ))
    };
    out.set = f
        .set
        .iter()
        .filter_map(|h| pair(&h.name, &h.value))
        .collect();
    out.add = f
        .add
        .iter()
        .filter_map(|h| pair(&h.name, &h.value))
        .collect();
    out.remove = f
        .remove
        .iter()
        .filter_map(|h| HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).ok())
        .collect();
    out
}

fn filter_of<'a, T>(
    filters: &'a [HttpRouteFilter],
    get: impl Fn(&'a HttpRouteFilter) -> Option<&'a T>,
) -> Option<&'a T> {
    filters.iter().find_map(get)
}

fn backend_host(name: &str, namespace: &Option<String>, route_ns: &str) -> String {
    service_fqdn(namespace.as_deref().unwrap_or(route_ns), name)
}

fn http_action(
    filters: &[HttpRouteFilter],
    backends: &[BackendRef],
    ns: &str,
    single_prefix: bool,
    request_timeout: Option<Duration>,
    backend_timeout: Option<Duration>,
    retry: Option<&crate::registry::kinds::gateway::HttpRouteRetry>,
) -> Action {
    let path_rewrite = |m: &crate::registry::kinds::gateway::PathModifier| match m.kind.as_str() {
        "ReplaceFullPath" => m.replace_full_path.clone().map(PathRewrite::Full),
        "ReplacePrefixMatch" if single_prefix => {
            m.replace_prefix_match.clone().map(PathRewrite::PrefixMatch)
        }
        _ => None,
    };
    if let Some(r) = filter_of(filters, |f| f.request_redirect.as_ref()) {
        let port = match (r.port, &r.scheme) {
            (Some(p), _) => RedirectPort::Port(p as u16),
            (None, Some(_)) => RedirectPort::SchemeDefault,
            (None, None) => RedirectPort::Request,
        };
        return Action::Redirect(Redirect {
            scheme: r.scheme.clone(),
            host: r.hostname.clone(),
            port,
            path: r.path.as_ref().and_then(path_rewrite),
            status: StatusCode::from_u16(r.status_code.unwrap_or(302) as u16)
                .unwrap_or(StatusCode::FOUND),
        });
    }
    let destinations: Vec<WeightedDestination> = backends
        .iter()
        .map(|b| WeightedDestination {
            host: backend_host(&b.name, &b.namespace, ns),
            port: b.port.map(|p| p as u16),
            subset: None,
            weight: b.weight(),
            request_headers: header_filter(filter_of(&b.filters, |f| {
                f.request_header_modifier.as_ref()
            })),
            response_headers: header_filter(filter_of(&b.filters, |f| {
                f.response_header_modifier.as_ref()
            })),
        })
        .collect();
    // No backend, or none with a weight: the API mandates 500.
    if destinations.iter().all(|d| d.weight == 0) {
        return Action::DirectResponse(DirectResponse {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            body: bytes::Bytes::new(),
            response_headers: HeaderOps::default(),
        });
    }
    let rewrite = filter_of(filters, |f| f.url_rewrite.as_ref()).map(|r| Rewrite {
        path: r.path.as_ref().and_then(path_rewrite),
        authority: r.hostname.clone(),
    });
    let mirrors = filters
        .iter()
        .filter_map(|f| f.request_mirror.as_ref())
        .filter_map(|m| {
            let b = m.backend_ref.as_ref()?;
            Some(Mirror {
                host: backend_host(&b.name, &b.namespace, ns),
                port: b.port.map(|p| p as u16),
                subset: None,
                percent: m.share(),
            })
        })
        .collect();
    // Istio's conversion: `retry` with `attempts: 0` (or none) disables retries, `codes` are
    // retried status codes; without `retry`, Istio's default policy.
    let mut retries = match retry {
        None => Some(RetryPolicy::istio_default()),
        Some(r) => {
            let codes: Vec<String> = r.codes.iter().map(u32::to_string).collect();
            RetryPolicy::from_istio(
                r.attempts.unwrap_or(0),
                &codes.join(","),
                None,
                None,
                None,
                r.backoff.map(|d| d.0),
            )
        }
    };
    if let (Some(policy), Some(t)) = (&mut retries, backend_timeout) {
        policy.per_try_timeout = Some(t).filter(|t| !t.is_zero());
    }
    Action::Forward(Forward {
        destinations,
        rewrite,
        request_headers: header_filter(filter_of(filters, |f| f.request_header_modifier.as_ref())),
        response_headers: header_filter(filter_of(filters, |f| {
            f.response_header_modifier.as_ref()
        })),
        timeout: request_timeout.filter(|t| !t.is_zero()),
        retries: retries.map(Arc::new),
        fault: None,
        mirrors,
        cors: None,
    })
}
