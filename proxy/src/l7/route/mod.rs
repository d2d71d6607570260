//! The route table: every VirtualService, HTTPRoute and GRPCRoute of a snapshot compiled once
//! into per-host rule lists, with DestinationRules and ServiceEntries for [`RouteTable::backend`].
//! Pure: the data path asks [`RouteTable::route`] per request and executes the answer.
//!
//! - [`matching`]: conditions (path, headers, query, method, authority, port, source) and the
//!   path index that keeps matching fast with thousands of rules on one host.
//! - [`action`]: what a rule does (forward, redirect, direct response) and the pure functions
//!   the data path calls on it.
//! - [`istio`]: VirtualService → rules; [`gateway`]: HTTPRoute and GRPCRoute → rules (GAMMA);
//!   [`backend`]: destination → Service port or ServiceEntry, with the DestinationRule in force.
//!
//! Which routes apply to a request, in order:
//! 1. HTTPRoutes/GRPCRoutes attached to the destination Service port: the client's
//!    namespace's consumer routes if it has any, else the Service namespace's producer routes.
//!    On those ports VirtualServices for the host are ignored (a build warning says so): the
//!    Gateway API is the newer mesh API, as GAMMA has it.
//! 2. Else the first VirtualService for the host the client's namespace sees, in Istio's order
//!    (exported only to its namespace, exported to it by name, public; oldest first).
//! 3. Else [`RouteDecision::Default`]: to the host and port as called.
//!
//! When routes apply but no rule matches, the answer is [`RouteDecision::NotFound`] (Envoy's 404
//! `NR`): Istio adds no fallback route to a VirtualService, the Gateway API mandates 404.

pub mod action;
pub mod backend;
pub mod gateway;
pub mod istio;
pub mod matching;

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use crate::registry::{Labels, Service, Snapshot, CLUSTER_DOMAIN};

pub use action::{
    shadow_host, AbortError, Action, DirectResponse, Fault, FaultAbort, FaultDelay, Forward,
    HeaderOps, Injected, Mirror, Outcome, PathRewrite, Redirect, RedirectPort, RetryPolicy,
    Rewrite, TcpMatch, TcpRule, WeightedDestination,
};
pub use backend::{Backend, External, ExternalEndpoint, ExternalPort, Target, TrafficPolicy};
use matching::index::RuleIndex;
use matching::{Conditions, MatchedPath, QueryParams};

/// One request, as the route table sees it.
#[derive(Debug, Clone, Copy)]
pub struct RouteRequest<'a> {
    /// The routing host (FQDN) of the destination the client called
    /// ([`RouteTable::host_of_service`], [`RouteTable::external_by_address`], …).
    pub host: &'a str,
    /// The port the client called.
    pub port: u16,
    pub source_namespace: Option<&'a str>,
    pub source_labels: Option<&'a Labels>,
    pub method: &'a http::Method,
    /// `Host` / `:authority` as sent.
    pub authority: &'a str,
    pub path_and_query: &'a str,
    pub headers: &'a http::HeaderMap,
}

/// What to do with a request.
#[derive(Debug, Clone)]
pub enum RouteDecision {
    /// No VirtualService, HTTPRoute or GRPCRoute applies: send to `host:port` unchanged
    /// (Istio's default route; retries per [`RetryPolicy::istio_default`]).
    Default,
    /// Routes apply but none matched: 404, response flag `NR`.
    NotFound,
    Matched(Matched),
}

/// A matched rule and what its path match covered (for prefix rewrites and redirects).
#[derive(Debug, Clone)]
pub struct Matched {
    pub rule: Arc<Rule>,
    pub matched: MatchedPath,
}

/// A compiled rule: where it came from and what it does.
#[derive(Debug, Clone)]
pub struct Rule {
    pub id: RouteId,
    /// The id as flows name the rule, made once: every request it matches shares it.
    pub label: Arc<str>,
    pub action: Action,
}

impl Rule {
    pub fn new(id: RouteId, action: Action) -> Rule {
        Rule {
            label: id.to_string().into(),
            id,
            action,
        }
    }
}

/// The API a rule came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteKind {
    VirtualService,
    /// A VirtualService's `tcp[]` rule.
    VirtualServiceTcp,
    HttpRoute,
    GrpcRoute,
}

/// Which rule matched: `VirtualService default/reviews http[1]`, `HTTPRoute back/web rules[0]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RouteId {
    pub kind: RouteKind,
    pub namespace: String,
    pub name: String,
    /// Index of the rule (`http[i]`, `rules[i]`).
    pub rule: usize,
    /// The rule's `name`, when it has one.
    pub rule_name: Option<String>,
}

impl fmt::Display for RouteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (kind, list) = match self.kind {
            RouteKind::VirtualService => ("VirtualService", "http"),
            RouteKind::VirtualServiceTcp => ("VirtualService", "tcp"),
            RouteKind::HttpRoute => ("HTTPRoute", "rules"),
            RouteKind::GrpcRoute => ("GRPCRoute", "rules"),
        };
        write!(
            f,
            "{kind} {}/{} {list}[{}]",
            self.namespace, self.name, self.rule
        )?;
        match &self.rule_name {
            Some(name) => write!(f, " ({name})"),
            None => Ok(()),
        }
    }
}

/// A list of rule matches in the order they are tried, with a path index over them.
#[derive(Debug, Default)]
pub(crate) struct RuleSet {
    entries: Vec<Entry>,
    index: RuleIndex,
}

#[derive(Debug)]
pub(crate) struct Entry {
    pub conditions: Conditions,
    pub rule: Arc<Rule>,
}

impl RuleSet {
    pub(crate) fn new(entries: Vec<Entry>) -> RuleSet {
        let index = RuleIndex::new(entries.iter().map(|e| &e.conditions));
        RuleSet { entries, index }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// The first entry `req` satisfies.
    fn first_match<'a>(
        &self,
        req: &RouteRequest<'a>,
        query: &mut QueryParams<'a>,
    ) -> Option<Matched> {
        let mut candidates = Vec::with_capacity(8);
        self.index.candidates(
            matching::path::path_of(req.path_and_query),
            req.headers,
            &mut candidates,
        );
        candidates.into_iter().find_map(|i| {
            let e = &self.entries[i as usize];
            e.conditions.matches(req, query).map(|matched| Matched {
                rule: e.rule.clone(),
                matched,
            })
        })
    }
}

/// What applies to one routing host.
#[derive(Debug, Default)]
struct HostRoutes {
    /// Gateway API routes attached to the Service of this host.
    gateway: Option<gateway::ServiceRoutes>,
    /// VirtualServices naming this host, oldest first.
    virtual_services: Vec<Arc<istio::CompiledVs>>,
}

/// Every route of a snapshot, compiled. `Send + Sync`; build once per snapshot.
#[derive(Debug, Default)]
pub struct RouteTable {
    /// By host: looked up on every request (foldhash: the std hasher costs more than the rest
    /// of the lookup).
    hosts: HashMap<String, HostRoutes, foldhash::fast::RandomState>,
    /// VirtualServices for wildcard hosts (`*.example.com`), longest pattern first.
    wildcard_hosts: Vec<(String, Vec<Arc<istio::CompiledVs>>)>,
    backends: backend::Backends,
    warnings: Vec<String>,
}

/// `name.namespace.svc.cluster.local`.
pub fn service_fqdn(namespace: &str, name: &str) -> String {
    format!("{name}.{namespace}.svc.{CLUSTER_DOMAIN}")
}

/// A routing host's Service, `(namespace, name)`, if it is a Service FQDN.
pub fn parse_service_fqdn(host: &str) -> Option<(&str, &str)> {
    let rest = host.strip_suffix(CLUSTER_DOMAIN)?.strip_suffix(".svc.")?;
    let (name, ns) = rest.split_once('.')?;
    (!ns.contains('.')).then_some((ns, name))
}

/// How Istio objects' hosts resolve against a snapshot.
pub(crate) struct Hosts<'a> {
    snapshot: &'a Snapshot,
}

impl Hosts<'_> {
    pub(crate) fn qualify(&self, host: &str, namespace: &str) -> String {
        crate::registry::kinds::networking::qualify_host(
            host,
            namespace,
            |ns, name| self.snapshot.service(ns, name).is_some(),
            |ip: IpAddr| {
                self.snapshot
                    .service_by_ip(ip)
                    .map(|s| (s.namespace.clone(), s.name.clone()))
            },
        )
    }
}

impl RouteTable {
    /// Compiles every routing object of `snapshot`.
    pub fn build(snapshot: &Snapshot) -> RouteTable {
        let hosts = Hosts { snapshot };
        let mut warnings = Vec::new();
        let mut table = RouteTable {
            backends: backend::Backends::build(snapshot, &hosts),
            ..RouteTable::default()
        };
        let mut wildcards: HashMap<String, Vec<Arc<istio::CompiledVs>>> = HashMap::new();
        for (host, vs) in istio::compile(snapshot, &hosts) {
            if host.starts_with('*') {
                wildcards.entry(host).or_default().push(vs);
            } else {
                table
                    .hosts
                    .entry(host)
                    .or_default()
                    .virtual_services
                    .push(vs);
            }
        }
        for (host, routes) in gateway::compile(snapshot, &mut warnings) {
            table.hosts.entry(host).or_default().gateway = Some(routes);
        }
        let mut names: Vec<&String> = table.hosts.keys().collect();
        names.sort();
        for host in names {
            let routes = &table.hosts[host];
            if let (Some(g), Some(first)) = (&routes.gateway, routes.virtual_services.first()) {
                warnings.push(format!(
                    "VirtualService {}/{} and {} both route {host}: the Gateway API routes apply and the VirtualService is ignored on the ports they attach to",
                    first.namespace,
                    first.name,
                    g.describe()
                ));
            }
            if routes.virtual_services.len() > 1 {
                warnings.push(istio::conflict_warning(host, &routes.virtual_services));
            }
        }
        let mut wildcard_hosts: Vec<_> = wildcards.into_iter().collect();
        wildcard_hosts.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
        for (host, list) in &mut wildcard_hosts {
            list.sort_by(|a, b| a.precedence.cmp(&b.precedence));
            if list.len() > 1 {
                warnings.push(istio::conflict_warning(host, list));
            }
        }
        for routes in table.hosts.values_mut() {
            routes
                .virtual_services
                .sort_by(|a, b| a.precedence.cmp(&b.precedence));
        }
        table.wildcard_hosts = wildcard_hosts;
        table.warnings = warnings;
        table
    }

    /// Conflicts found while compiling, each said once (a VirtualService and an HTTPRoute for
    /// the same Service: the HTTPRoute wins; several VirtualServices for one host: the first in
    /// Istio's order wins).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The routing host of a Service: its FQDN.
    pub fn host_of_service(&self, svc: &Service) -> String {
        service_fqdn(&svc.namespace, &svc.name)
    }

    /// The ServiceEntry host owning `ip:port`: one of its `addresses` (VIP or CIDR) or a STATIC
    /// endpoint's IP.
    pub fn external_by_address(&self, ip: IpAddr, port: u16) -> Option<&External> {
        self.backends.external_by_address(ip, port)
    }

    /// A ServiceEntry host matching an HTTP authority (`host[:port]`) on `port`: the exact host
    /// first, then the longest wildcard.
    pub fn external_by_authority(&self, authority: &str, port: u16) -> Option<&External> {
        self.backends.external_by_authority(authority, port)
    }

    /// What to do with one request.
    pub fn route(&self, req: &RouteRequest<'_>) -> RouteDecision {
        let mut query = QueryParams::default();
        if let Some(routes) = self.hosts.get(req.host) {
            if let Some(g) = &routes.gateway {
                if let Some(decision) = g.route(req, &mut query) {
                    return decision;
                }
            }
            if let Some(vs) = istio::select(&routes.virtual_services, req.source_namespace) {
                return vs.route(req, &mut query);
            }
        }
        for (pattern, list) in &self.wildcard_hosts {
            if crate::registry::kinds::networking::host_matches(pattern, req.host) {
                if let Some(vs) = istio::select(list, req.source_namespace) {
                    return vs.route(req, &mut query);
                }
            }
        }
        RouteDecision::Default
    }

    /// The VirtualService `tcp[]` rule a TCP connection to `host` (at `dst`) matches, for a
    /// client in `source_namespace` with `source_labels`: the first match of the VirtualService
    /// the client sees. `None`: the default route (the called Service itself).
    pub fn route_tcp(
        &self,
        host: &str,
        dst: std::net::SocketAddr,
        source_namespace: Option<&str>,
        source_labels: Option<&Labels>,
    ) -> Option<&TcpRule> {
        let routes = self.hosts.get(host)?;
        let vs = istio::select(&routes.virtual_services, source_namespace)?;
        vs.tcp
            .iter()
            .find(|r| !r.destinations.is_empty() && r.matches(dst, source_namespace, source_labels))
    }

    /// Where a destination (`host`, `port`, `subset`) sends: a Service port with the subset's
    /// labels, or a ServiceEntry; with the DestinationRule settings in force for the client's
    /// namespace (subset over port level over top level, as Istio merges them). `port: None`
    /// takes the destination's only port. `None`: no such Service, port, ServiceEntry or subset.
    pub fn backend(
        &self,
        host: &str,
        port: Option<u16>,
        subset: Option<&str>,
        source_namespace: Option<&str>,
    ) -> Option<Backend> {
        self.backends.backend(host, port, subset, source_namespace)
    }

    /// [`RouteTable::backend`]'s `policy` alone, for a port given (what a TCP connection's
    /// plan needs).
    pub fn policy(
        &self,
        host: &str,
        port: u16,
        subset: Option<&str>,
        source_namespace: Option<&str>,
    ) -> Option<TrafficPolicy> {
        self.backends.policy(host, port, subset, source_namespace)
    }

    /// Number of compiled rule matches (for logs and benchmarks).
    pub fn len(&self) -> usize {
        let vs =
            |list: &[Arc<istio::CompiledVs>]| list.iter().map(|v| v.rules.len()).sum::<usize>();
        self.hosts
            .values()
            .map(|h| vs(&h.virtual_services) + h.gateway.as_ref().map_or(0, |g| g.len()))
            .sum::<usize>()
            + self
                .wildcard_hosts
                .iter()
                .map(|(_, l)| vs(l))
                .sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests;
