//! VirtualService → rules, as Istio's `pilot/pkg/networking/core/route` translates them: each
//! `http[]` rule, each of its matches an entry, in order (first match wins); a rule without
//! matches matches everything. Only VirtualServices that apply to the mesh (no `gateways`, or
//! `mesh` among them) are compiled, and of their matches only those whose own `gateways` (if
//! any) name `mesh`; a rule whose every match is for gateways is left out.
//!
//! Several VirtualServices for one host are not merged (Istio merges them for gateways only):
//! a client uses the first one its namespace sees ([`select`]).

use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::StatusCode;

use super::action::{
    AbortError, Action, DirectResponse, Fault, FaultAbort, FaultDelay, Forward, HeaderOps, Mirror,
    PathRewrite, Redirect, RedirectPort, RetryPolicy, Rewrite, TcpMatch, TcpRule,
    WeightedDestination,
};
use super::matching::{Conditions, HeaderMatch, PathMatch, QueryMatch, QueryParams, StringMatcher};
use super::{Entry, Hosts, RouteDecision, RouteId, RouteKind, RouteRequest, Rule, RuleSet};
use crate::registry::kinds::networking::{
    base64_decode, Destination, HeaderOperations, Headers, HttpMatchRequest, HttpRoute,
    RedirectPortSelection, StringMatch, TcpRoute, VirtualService, GRPC_STATUSES, MESH_GATEWAY,
};
use crate::registry::Snapshot;

/// One VirtualService's HTTP rules.
#[derive(Debug)]
pub(crate) struct CompiledVs {
    pub namespace: String,
    pub name: String,
    pub export_to: Vec<String>,
    /// Oldest first, then `namespace/name`.
    pub precedence: (bool, Option<time::OffsetDateTime>, String, String),
    pub rules: RuleSet,
    /// The object has HTTP rules (one with only TCP/TLS rules leaves HTTP to the default route).
    pub has_http: bool,
    /// `tcp[]`, in order.
    pub tcp: Vec<TcpRule>,
}

impl CompiledVs {
    pub(crate) fn route<'a>(
        &self,
        req: &RouteRequest<'a>,
        query: &mut QueryParams<'a>,
    ) -> RouteDecision {
        if !self.has_http {
            return RouteDecision::Default;
        }
        match self.rules.first_match(req, query) {
            Some(m) => RouteDecision::Matched(m),
            None => RouteDecision::NotFound,
        }
    }

    /// Istio's order for a client in `from`: 0 exported only to its own namespace (`.`), 1
    /// exported to it by name, 2 public (`*` or no `exportTo`); `None`: not visible.
    fn visibility(&self, from: Option<&str>) -> Option<u8> {
        if self.export_to.is_empty() || self.export_to.iter().any(|e| e == "*") {
            return Some(2);
        }
        let from = from?;
        if self.namespace == from && self.export_to.iter().any(|e| e == ".") {
            return Some(0);
        }
        self.export_to.iter().any(|e| e == from).then_some(1)
    }
}

/// The VirtualService a client in `from` uses among those for one host (sorted oldest first).
pub(crate) fn select<'a>(
    list: &'a [Arc<CompiledVs>],
    from: Option<&str>,
) -> Option<&'a CompiledVs> {
    list.iter()
        .filter_map(|vs| vs.visibility(from).map(|rank| (rank, vs)))
        .min_by_key(|(rank, _)| *rank)
        .map(|(_, vs)| &**vs)
}

/// Said once per host that several VirtualServices name.
pub(crate) fn conflict_warning(host: &str, list: &[Arc<CompiledVs>]) -> String {
    let names: Vec<String> = list
        .iter()
        .map(|v| format!("{}/{}", v.namespace, v.name))
        .collect();
    format!(
        "VirtualServices {} all route {host}: they are not merged; a client uses the first its namespace sees (exported only to it, exported to it by name, public; oldest first)",
        names.join(", ")
    )
}

/// Every VirtualService that applies to the mesh, once per host it names (qualified).
pub(crate) fn compile(snapshot: &Snapshot, hosts: &Hosts<'_>) -> Vec<(String, Arc<CompiledVs>)> {
    let mut out = Vec::new();
    for vs in &snapshot.virtual_services {
        if !vs.spec.applies_to_mesh() {
            continue;
        }
        let compiled = Arc::new(compile_one(vs, hosts));
        let mut seen = Vec::new();
        for h in &vs.spec.hosts {
            let host = hosts.qualify(h, &vs.meta.namespace);
            if !seen.contains(&host) {
                seen.push(host.clone());
                out.push((host, compiled.clone()));
            }
        }
    }
    out
}

fn compile_one(vs: &VirtualService, hosts: &Hosts<'_>) -> CompiledVs {
    let ns = &vs.meta.namespace;
    let mut entries = Vec::new();
    for (i, http) in vs.spec.http.iter().enumerate() {
        let rule = Arc::new(Rule::new(
            RouteId {
                kind: RouteKind::VirtualService,
                namespace: ns.clone(),
                name: vs.meta.name.clone(),
                rule: i,
                rule_name: (!http.name.is_empty()).then(|| http.name.clone()),
            },
            action(http, ns, hosts),
        ));
        if http.matches.is_empty() {
            entries.push(Entry {
                conditions: Conditions::default(),
                rule: rule.clone(),
            });
            continue;
        }
        for m in &http.matches {
            if !m.gateways.is_empty() && !m.gateways.iter().any(|g| g == MESH_GATEWAY) {
                continue;
            }
            entries.push(Entry {
                conditions: conditions(m),
                rule: rule.clone(),
            });
        }
    }
    CompiledVs {
        namespace: ns.clone(),
        name: vs.meta.name.clone(),
        export_to: vs.spec.export_to.clone(),
        precedence: {
            let (a, b, c, d) = vs.meta.precedence();
            (a, b, c.to_string(), d.to_string())
        },
        rules: RuleSet::new(entries),
        has_http: !vs.spec.http.is_empty(),
        tcp: vs
            .spec
            .tcp
            .iter()
            .enumerate()
            .map(|(i, t)| tcp_rule(vs, i, t, hosts))
            .collect(),
    }
}

fn tcp_rule(vs: &VirtualService, i: usize, t: &TcpRoute, hosts: &Hosts<'_>) -> TcpRule {
    let ns = &vs.meta.namespace;
    let single = t.route.len() == 1;
    TcpRule {
        id: RouteId {
            kind: RouteKind::VirtualServiceTcp,
            namespace: ns.clone(),
            name: vs.meta.name.clone(),
            rule: i,
            rule_name: None,
        },
        matches: t
            .matches
            .iter()
            .filter(|m| m.gateways.is_empty() || m.gateways.iter().any(|g| g == MESH_GATEWAY))
            .map(|m| TcpMatch {
                port: u16::try_from(m.port).ok().filter(|p| *p != 0),
                destination_subnets: m
                    .destination_subnets
                    .iter()
                    .filter_map(|n| {
                        n.parse::<ipnet::IpNet>()
                            .ok()
                            .or_else(|| n.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from))
                    })
                    .collect(),
                source_labels: m.source_labels.clone(),
                source_namespace: (!m.source_namespace.is_empty())
                    .then(|| m.source_namespace.clone()),
            })
            .collect(),
        destinations: t
            .route
            .iter()
            .filter_map(|r| {
                let d = r.destination.as_ref()?;
                let (host, port, subset) = destination(d, ns, hosts);
                Some(WeightedDestination {
                    host,
                    port,
                    subset,
                    weight: if single { 100 } else { r.weight.max(0) as u32 },
                    request_headers: HeaderOps::default(),
                    response_headers: HeaderOps::default(),
                })
            })
            .collect(),
    }
}

/// A `StringMatch` as a matcher; none of exact/prefix/regex means "present". The registry has
/// checked the regexes.
fn matcher(m: &StringMatch) -> StringMatcher {
    if let Some(e) = &m.exact {
        StringMatcher::Exact(e.clone())
    } else if let Some(p) = &m.prefix {
        StringMatcher::Prefix(p.clone())
    } else if let Some(r) = &m.regex {
        StringMatcher::regex(r).unwrap_or(StringMatcher::Present)
    } else {
        StringMatcher::Present
    }
}

fn conditions(m: &HttpMatchRequest) -> Conditions {
    let path = m.uri.as_ref().and_then(|u| {
        if let Some(e) = &u.exact {
            Some(PathMatch::exact(e, m.ignore_uri_case))
        } else if let Some(p) = &u.prefix {
            Some(PathMatch::prefix(p, m.ignore_uri_case))
        } else {
            u.regex.as_ref().and_then(|r| PathMatch::regex(r).ok())
        }
    });
    let mut headers = Vec::new();
    let mut method = m.method.as_ref().map(matcher);
    let mut authority = m.authority.as_ref().map(matcher);
    let mut scheme = m.scheme.as_ref().map(matcher);
    for (name, sm, invert) in m
        .headers
        .iter()
        .map(|(n, s)| (n, s, false))
        .chain(m.without_headers.iter().map(|(n, s)| (n, s, true)))
    {
        // `regex: "*"` in withoutHeaders means "present".
        let mm = if invert && sm.regex.as_deref() == Some("*") {
            StringMatcher::Present
        } else {
            matcher(sm)
        };
        // Pseudo headers are the request line's parts.
        match (name.as_str(), invert) {
            (":method", false) => method = Some(mm),
            (":authority", false) => authority = Some(mm),
            (":scheme", false) => scheme = Some(mm),
            (":path", false) => {}
            _ => {
                if let Ok(name) = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()) {
                    headers.push(HeaderMatch {
                        name,
                        matcher: mm,
                        invert,
                    });
                }
            }
        }
    }
    let mut conditions = Conditions {
        path,
        method,
        authority,
        scheme,
        headers,
        query: m
            .query_params
            .iter()
            .map(|(name, sm)| QueryMatch {
                name: name.clone(),
                // Istio: an empty exact value means "present".
                matcher: match &sm.exact {
                    Some(e) if e.is_empty() => StringMatcher::Present,
                    _ => matcher(sm),
                },
            })
            .collect(),
        port: u16::try_from(m.port).ok().filter(|p| *p != 0),
        source_labels: (!m.source_labels.is_empty()).then(|| m.source_labels.clone()),
        source_namespace: (!m.source_namespace.is_empty()).then(|| m.source_namespace.clone()),
        grpc: false,
    };
    // `:path` as a header condition is the path.
    if let Some(sm) = m.headers.get(":path") {
        if conditions.path.is_none() {
            conditions.path = if let Some(e) = &sm.exact {
                Some(PathMatch::exact(e, false))
            } else if let Some(p) = &sm.prefix {
                Some(PathMatch::prefix(p, false))
            } else {
                sm.regex.as_ref().and_then(|r| PathMatch::regex(r).ok())
            };
        }
    }
    conditions
}

/// Header edits; `host`/`:authority` in request `set`/`add` is an authority rewrite, returned
/// apart.
pub(crate) fn header_ops(ops: Option<&HeaderOperations>) -> (HeaderOps, Option<String>) {
    let mut out = HeaderOps::default();
    let mut authority = None;
    let Some(ops) = ops else {
        return (out, None);
    };
    let pair = |k: &str, v: &str| {
        Some((
            HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes()).ok()?,
            HeaderValue::from_str(v).ok()?,
        ))
    };
    for (k, v) in &ops.set {
        if k.eq_ignore_ascii_case("host") || k.eq_ignore_ascii_case(":authority") {
            authority = Some(v.clone());
        } else if let Some(p) = pair(k, v) {
            out.set.push(p);
        }
    }
    for (k, v) in &ops.add {
        if k.eq_ignore_ascii_case("host") || k.eq_ignore_ascii_case(":authority") {
            authority = Some(v.clone());
        } else if let Some(p) = pair(k, v) {
            out.add.push(p);
        }
    }
    out.remove = ops
        .remove
        .iter()
        .filter_map(|k| HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes()).ok())
        .collect();
    (out, authority)
}

fn headers_of(h: &Option<Headers>) -> (HeaderOps, HeaderOps, Option<String>) {
    let h = h.as_ref();
    let (request, authority) = header_ops(h.and_then(|h| h.request.as_ref()));
    let (response, _) = header_ops(h.and_then(|h| h.response.as_ref()));
    (request, response, authority)
}

fn destination(
    d: &Destination,
    ns: &str,
    hosts: &Hosts<'_>,
) -> (String, Option<u16>, Option<String>) {
    (
        hosts.qualify(&d.host, ns),
        d.port.and_then(|p| u16::try_from(p.number).ok()),
        (!d.subset.is_empty()).then(|| d.subset.clone()),
    )
}

fn action(http: &HttpRoute, ns: &str, hosts: &Hosts<'_>) -> Action {
    let (request_headers, response_headers, header_authority) = headers_of(&http.headers);
    if let Some(r) = &http.redirect {
        return Action::Redirect(Redirect {
            scheme: (!r.scheme.is_empty()).then(|| r.scheme.clone()),
            host: (!r.authority.is_empty()).then(|| r.authority.clone()),
            port: match (r.port, r.derive_port) {
                (Some(p), _) => RedirectPort::Port(p as u16),
                (None, Some(RedirectPortSelection::FromRequestPort)) => RedirectPort::Request,
                // FROM_PROTOCOL_DEFAULT: Istio sets no port; Envoy keeps the request's host.
                _ => RedirectPort::Keep,
            },
            path: (!r.uri.is_empty()).then(|| PathRewrite::Full(r.uri.clone())),
            status: StatusCode::from_u16(if r.redirect_code == 0 {
                301
            } else {
                r.redirect_code as u16
            })
            .unwrap_or(StatusCode::MOVED_PERMANENTLY),
        });
    }
    if let Some(d) = &http.direct_response {
        let body = d
            .body
            .as_ref()
            .map(|b| match (&b.string, &b.bytes) {
                (Some(s), _) => bytes::Bytes::from(s.clone()),
                (None, Some(b64)) => bytes::Bytes::from(base64_decode(b64).unwrap_or_default()),
                (None, None) => bytes::Bytes::new(),
            })
            .unwrap_or_default();
        let (_, response_headers, _) = headers_of(&http.headers);
        return Action::DirectResponse(DirectResponse {
            status: StatusCode::from_u16(d.status as u16).unwrap_or(StatusCode::OK),
            body,
            response_headers,
        });
    }
    let single = http.route.len() == 1;
    let destinations = http
        .route
        .iter()
        .filter_map(|r| {
            let d = r.destination.as_ref()?;
            let (host, port, subset) = destination(d, ns, hosts);
            let (request_headers, response_headers, _) = headers_of(&r.headers);
            Some(WeightedDestination {
                host,
                port,
                subset,
                // A lone destination takes all traffic whatever its weight.
                weight: if single { 100 } else { r.weight.max(0) as u32 },
                request_headers,
                response_headers,
            })
        })
        .collect();
    let rewrite = {
        let rw = http.rewrite.as_ref();
        let path = rw.and_then(|r| {
            if let Some(re) = &r.uri_regex_rewrite {
                regex::Regex::new(&re.pattern)
                    .ok()
                    .map(|p| PathRewrite::regex(p, &re.rewrite))
            } else {
                (!r.uri.is_empty()).then(|| PathRewrite::Prefix(r.uri.clone()))
            }
        });
        let authority = rw
            .map(|r| r.authority.clone())
            .filter(|a| !a.is_empty())
            .or(header_authority);
        (path.is_some() || authority.is_some()).then_some(Rewrite { path, authority })
    };
    let retries = match &http.retries {
        None => Some(RetryPolicy::istio_default()),
        Some(r) => RetryPolicy::from_istio(
            r.attempts,
            &r.retry_on,
            r.per_try_timeout.map(|d| d.0),
            r.retry_remote_localities,
            r.retry_ignore_previous_hosts,
            r.backoff.map(|d| d.0),
        ),
    };
    let fault = http.fault.as_ref().map(|f| Fault {
        delay: f.delay.as_ref().and_then(|d| {
            Some(FaultDelay {
                delay: d.fixed_delay?.0,
                percent: d.share(),
            })
        }),
        abort: f.abort.as_ref().and_then(|a| {
            let error = match (a.http_status, &a.grpc_status) {
                (Some(s), _) => AbortError::Http(StatusCode::from_u16(s as u16).ok()?),
                (None, Some(g)) => {
                    AbortError::Grpc(GRPC_STATUSES.iter().position(|s| s == g)? as u32)
                }
                _ => return None,
            };
            Some(FaultAbort {
                error,
                percent: a.share(),
            })
        }),
    });
    let mut mirrors = Vec::new();
    if let Some(m) = &http.mirror {
        let (host, port, subset) = destination(m, ns, hosts);
        let percent = match (&http.mirror_percentage, http.mirror_percent) {
            (Some(p), _) => p.value,
            (None, Some(p)) => f64::from(p),
            (None, None) => 100.0,
        };
        mirrors.push(Mirror {
            host,
            port,
            subset,
            percent,
        });
    }
    for m in &http.mirrors {
        if let Some(d) = &m.destination {
            let (host, port, subset) = destination(d, ns, hosts);
            mirrors.push(Mirror {
                host,
                port,
                subset,
                percent: m.percentage.map_or(100.0, |p| p.value),
            });
        }
    }
    Action::Forward(Forward {
        destinations,
        rewrite,
        request_headers,
        response_headers,
        timeout: http.timeout.map(|d| d.0).filter(|d| *d > Duration::ZERO),
        retries: retries.map(Arc::new),
        fault,
        mirrors,
        cors: http.cors_policy.clone(),
    })
}
