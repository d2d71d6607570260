//! AuthorizationPolicy: compilation into matchers, evaluation for TCP connections, HTTP
//! connections and HTTP requests.
//!
//! A compiled policy is a list of rules (ORed); a rule is a list of clauses (ANDed): one for
//! `from`, one for `to`, one per `when` condition; a clause is a list of [`Match`]es (ORed): one
//! per `from`/`to` entry; within a match every field must hold (a field holds when one of its
//! values matches and none of its `not` values does). An empty rule has no clause and matches
//! everything; a policy without rules matches nothing.
//!
//! Attributes come in three kinds: L4 (identities, addresses, ports), HTTP (`hosts`,
//! `methods`, `paths`, `request.headers[…]`: known per request only) and unsupported (JWT
//! `requestPrincipals` and `request.auth.*`, `connection.sni`, `experimental.*`: weft never
//! knows them). A rule is evaluated in a [`Mode`] with three-valued logic: an HTTP field is
//! unknown while an HTTP connection waits for its requests ([`Mode::Connect`]), so a rule can
//! be "yes whatever the requests", "no whatever the requests" or "depends on the request".

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;

use super::request::{HeaderKey, HostMatch, HttpRequest, PathMatch, ValueMatch};
use super::{selector_pairs, selects, ByNamespace, ConnRequest, DenyReason};
use crate::registry::kinds::security::{parse_net, AuthorizationPolicySpec, PolicyAction, Rule};
use crate::registry::Pod;

/// `when` keys of L4 attributes.
const L4_KEYS: &[&str] = &[
    "source.ip",
    "remote.ip",
    "source.namespace",
    "source.principal",
    "source.serviceAccount",
    "destination.ip",
    "destination.port",
];

/// How the traffic being judged can be seen.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Mode<'r> {
    /// TCP: no HTTP attribute will ever be known (ztunnel's L4 semantics).
    Tcp,
    /// An HTTP connection before its requests: HTTP attributes are not known yet.
    Connect,
    /// One HTTP request.
    Request(&'r HttpRequest<'r>),
}

/// Three-valued truth: `Maybe` only in [`Mode::Connect`], for what depends on the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tri {
    No,
    Maybe,
    Yes,
}

/// The outcome of an evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    Allow,
    Deny {
        policy: String,
        reason: DenyReason,
    },
    /// Only in [`Mode::Connect`]: some request may be allowed and some denied.
    PerRequest,
}

// ---------------------------------------------------------------------------------------------
// Compiled form.
// ---------------------------------------------------------------------------------------------

/// A string matcher: Istio's `*`, `prefix*`, `*suffix` and exact values.
#[derive(Debug, Clone, PartialEq, Eq)]
enum StrMatch {
    /// `*`: any non-empty value (so never an absent identity).
    Present,
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
}

impl StrMatch {
    fn new(v: &str) -> StrMatch {
        if v == "*" {
            StrMatch::Present
        } else if let Some(s) = v.strip_prefix('*') {
            StrMatch::Suffix(s.into())
        } else if let Some(p) = v.strip_suffix('*') {
            StrMatch::Prefix(p.into())
        } else {
            StrMatch::Exact(v.into())
        }
    }

    fn matches(&self, v: &str) -> bool {
        match self {
            StrMatch::Present => !v.is_empty(),
            StrMatch::Exact(e) => **e == *v,
            StrMatch::Prefix(p) => v.starts_with(&**p),
            StrMatch::Suffix(s) => v.ends_with(&**s),
        }
    }
}

/// `namespace/serviceAccount` of the source identity.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SaMatch {
    namespace: Box<str>,
    account: Box<str>,
}

/// A CIDR as integers: `ip & mask == network`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cidr {
    V4 { network: u32, mask: u32 },
    V6 { network: u128, mask: u128 },
}

impl Cidr {
    fn new(net: IpNet) -> Cidr {
        match net {
            IpNet::V4(n) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(n.prefix_len()))
                    .unwrap_or(0);
                Cidr::V4 {
                    network: u32::from(n.addr()) & mask,
                    mask,
                }
            }
            IpNet::V6(n) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(n.prefix_len()))
                    .unwrap_or(0);
                Cidr::V6 {
                    network: u128::from(n.addr()) & mask,
                    mask,
                }
            }
        }
    }

    #[inline]
    fn contains(&self, ip: IpAddr) -> bool {
        match (*self, ip) {
            (Cidr::V4 { network, mask }, IpAddr::V4(a)) => u32::from(a) & mask == network,
            (Cidr::V6 { network, mask }, IpAddr::V6(a)) => u128::from(a) & mask == network,
            _ => false,
        }
    }
}

/// Values (ORed) and not-values (none may match) of one attribute.
#[derive(Debug, Clone)]
struct Field<T> {
    pos: Box<[T]>,
    neg: Box<[T]>,
}

impl<T> Default for Field<T> {
    fn default() -> Self {
        Field {
            pos: Box::new([]),
            neg: Box::new([]),
        }
    }
}

impl<T> Field<T> {
    fn is_empty(&self) -> bool {
        self.pos.is_empty() && self.neg.is_empty()
    }

    fn new(pos: impl IntoIterator<Item = T>, neg: impl IntoIterator<Item = T>) -> Field<T> {
        Field {
            pos: pos.into_iter().collect(),
            neg: neg.into_iter().collect(),
        }
    }

    #[inline]
    fn holds(&self, f: impl Fn(&T) -> bool) -> bool {
        (self.pos.is_empty() || self.pos.iter().any(&f)) && !self.neg.iter().any(&f)
    }
}

/// One `from`/`to` entry or `when` condition: every field must hold.
#[derive(Debug, Clone, Default)]
struct Match {
    ports: Field<u16>,
    principals: Field<StrMatch>,
    namespaces: Field<StrMatch>,
    service_accounts: Field<SaMatch>,
    source_ips: Field<Cidr>,
    /// `remoteIpBlocks`: also the source IP, but ANDed with `ipBlocks`.
    remote_ips: Field<Cidr>,
    destination_ips: Field<Cidr>,
    /// HTTP fields, when any is set (boxed: the L4 matches stay small and quick to scan).
    http: Option<Box<HttpMatch>>,
}

/// The HTTP fields of one `to` entry or `request.headers[…]` condition.
#[derive(Debug, Clone, Default)]
struct HttpMatch {
    hosts: Field<HostMatch>,
    methods: Field<ValueMatch>,
    paths: Field<PathMatch>,
    /// One `request.headers[…]` condition (every value names the same header).
    headers: Field<(HeaderKey, ValueMatch)>,
}

impl HttpMatch {
    /// `None` when no field is set.
    fn boxed(self) -> Option<Box<HttpMatch>> {
        let empty = self.hosts.is_empty()
            && self.methods.is_empty()
            && self.paths.is_empty()
            && self.headers.is_empty();
        (!empty).then(|| Box::new(self))
    }

    fn holds(&self, r: &HttpRequest<'_>) -> bool {
        let path = r.url_path();
        self.hosts.holds(|m| m.matches(r.authority))
            && self.methods.holds(|m| m.matches(Some(r.method.as_bytes())))
            && self.paths.holds(|m| m.matches(path))
            && self
                .headers
                .holds(|(key, m)| m.matches(key.value(r).as_deref()))
    }
}

impl Match {
    /// `denying`: the rule denies (DENY, CUSTOM). When the source IP is unknown (a caller from
    /// another node whose address could not be verified), a source IP field holds in a rule that
    /// denies and fails in one that allows, whether it lists blocks or excludes them: an
    /// unknown address never dodges a DENY nor earns an ALLOW.
    #[inline]
    fn l4_holds(&self, c: &Ctx<'_>, denying: bool) -> bool {
        let in_net = |ip: Option<IpAddr>| move |n: &Cidr| ip.is_some_and(|ip| n.contains(ip));
        let source = |f: &Field<Cidr>| match c.source_ip {
            Some(ip) => f.holds(|n| n.contains(ip)),
            None => f.is_empty() || denying,
        };
        self.ports.holds(|p| *p == c.port)
            && source(&self.source_ips)
            && source(&self.remote_ips)
            && self.destination_ips.holds(in_net(c.destination_ip))
            && self
                .principals
                .holds(|m| c.principal.is_some_and(|p| m.matches(p)))
            && self
                .namespaces
                .holds(|m| c.namespace.is_some_and(|n| m.matches(n)))
            && self.service_accounts.holds(|m| {
                c.identity
                    .is_some_and(|(ns, sa)| *m.namespace == *ns && *m.account == *sa)
            })
    }

    /// In [`Mode::Tcp`] HTTP fields hold (only DENY and CUSTOM rules get here with any: they
    /// deny more, never less); in [`Mode::Connect`] they are unknown.
    #[inline]
    fn eval(&self, c: &Ctx<'_>, mode: Mode<'_>, denying: bool) -> Tri {
        if !self.l4_holds(c, denying) {
            return Tri::No;
        }
        let Some(http) = &self.http else {
            return Tri::Yes;
        };
        match mode {
            Mode::Tcp => Tri::Yes,
            Mode::Connect => Tri::Maybe,
            Mode::Request(r) if http.holds(r) => Tri::Yes,
            Mode::Request(_) => Tri::No,
        }
    }
}

/// Rule: clauses ANDed, matches within a clause ORed.
#[derive(Debug, Clone, Default)]
struct CompiledRule {
    clauses: Vec<Vec<Match>>,
    /// Some match has HTTP fields.
    http: bool,
}

impl CompiledRule {
    #[inline]
    fn eval(&self, c: &Ctx<'_>, mode: Mode<'_>, denying: bool) -> Tri {
        let mut rule = Tri::Yes;
        for clause in &self.clauses {
            let mut any = Tri::No;
            for m in clause {
                match m.eval(c, mode, denying) {
                    Tri::Yes => {
                        any = Tri::Yes;
                        break;
                    }
                    Tri::Maybe => any = Tri::Maybe,
                    Tri::No => {}
                }
            }
            match any {
                Tri::No => return Tri::No,
                Tri::Maybe => rule = Tri::Maybe,
                Tri::Yes => {}
            }
        }
        rule
    }
}

/// An AuthorizationPolicy ready to evaluate.
#[derive(Debug, Clone)]
struct Policy {
    /// `ns/name`.
    key: String,
    /// Required labels (empty: every pod in scope).
    selector: Vec<(String, String)>,
    action: PolicyAction,
    /// ALLOW: without the rules that use unsupported attributes (they never match).
    rules: Vec<CompiledRule>,
    /// ALLOW: some rules never match TCP traffic (HTTP or unsupported attributes).
    tcp_skipped: bool,
    /// ALLOW: some rules were dropped for unsupported attributes.
    unsupported_skipped: bool,
}

impl Policy {
    /// Whether the policy matches: ALLOW rules with HTTP fields never match TCP traffic; a
    /// CUSTOM policy is always judged as at L4 (no external authorizer to ask: it fails closed
    /// on everything its L4 attributes select).
    #[inline]
    fn eval(&self, c: &Ctx<'_>, mode: Mode<'_>) -> Tri {
        let mode = if self.action == PolicyAction::Custom {
            Mode::Tcp
        } else {
            mode
        };
        let skip_http = matches!(mode, Mode::Tcp) && self.action == PolicyAction::Allow;
        let denying = self.action != PolicyAction::Allow;
        let mut out = Tri::No;
        for r in &self.rules {
            if skip_http && r.http {
                continue;
            }
            match r.eval(c, mode, denying) {
                Tri::Yes => return Tri::Yes,
                Tri::Maybe => out = Tri::Maybe,
                Tri::No => {}
            }
        }
        out
    }
}

/// The attributes of a connection, computed once per evaluation.
struct Ctx<'a> {
    /// Without `spiffe://`; `None` when absent or empty.
    principal: Option<&'a str>,
    namespace: Option<&'a str>,
    /// (namespace, service account) parsed from the principal.
    identity: Option<(&'a str, &'a str)>,
    source_ip: Option<IpAddr>,
    destination_ip: Option<IpAddr>,
    port: u16,
}

impl<'a> Ctx<'a> {
    fn new(req: &ConnRequest<'a>) -> Ctx<'a> {
        let principal = req
            .source_principal
            .map(|p| p.strip_prefix("spiffe://").unwrap_or(p))
            .filter(|p| !p.is_empty());
        let identity = principal.and_then(parse_identity);
        Ctx {
            principal,
            namespace: req
                .source_namespace
                .filter(|n| !n.is_empty())
                .or(identity.map(|(ns, _)| ns)),
            identity,
            source_ip: req.source_ip.map(|ip| ip.to_canonical()),
            destination_ip: req.destination_ip.map(|ip| ip.to_canonical()),
            port: req.destination_port,
        }
    }
}

/// `<td>/ns/<ns>/sa/<sa>` → (ns, sa).
fn parse_identity(p: &str) -> Option<(&str, &str)> {
    let mut parts = p.splitn(5, '/');
    let _trust_domain = parts.next()?;
    (parts.next()? == "ns").then_some(())?;
    let ns = parts.next()?;
    (parts.next()? == "sa").then_some(())?;
    let sa = parts.next()?;
    (!ns.is_empty() && !sa.is_empty()).then_some((ns, sa))
}

/// What a rule's attributes need, by field name (for warnings).
#[derive(Debug, Default)]
struct Needs<'a> {
    /// HTTP attributes, known per request.
    http: Vec<&'a str>,
    /// Attributes weft never knows.
    unsupported: Vec<&'a str>,
}

/// Whether weft can evaluate `when` key `key` on an HTTP request (L4 keys aside).
fn http_key(key: &str) -> bool {
    header_condition(key).is_some_and(|name| HeaderKey::new(name).is_some())
}

/// `Name` of a `request.headers[Name]` key.
fn header_condition(key: &str) -> Option<&str> {
    key.strip_prefix("request.headers[")?.strip_suffix(']')
}

fn needs(rule: &Rule) -> Needs<'_> {
    let mut out = Needs::default();
    let add = |list: &mut Vec<&str>, name: &'static str, present: bool| {
        if present && !list.contains(&name) {
            list.push(name);
        }
    };
    for src in rule.from.iter().flatten().filter_map(|f| f.source.as_ref()) {
        add(
            &mut out.unsupported,
            "requestPrincipals",
            !src.request_principals.is_empty(),
        );
        add(
            &mut out.unsupported,
            "notRequestPrincipals",
            !src.not_request_principals.is_empty(),
        );
    }
    for op in rule
        .to
        .iter()
        .flatten()
        .filter_map(|t| t.operation.as_ref())
    {
        add(&mut out.http, "hosts", !op.hosts.is_empty());
        add(&mut out.http, "notHosts", !op.not_hosts.is_empty());
        add(&mut out.http, "methods", !op.methods.is_empty());
        add(&mut out.http, "notMethods", !op.not_methods.is_empty());
        add(&mut out.http, "paths", !op.paths.is_empty());
        add(&mut out.http, "notPaths", !op.not_paths.is_empty());
    }
    for cond in &rule.when {
        let key = cond.key.as_str();
        if L4_KEYS.contains(&key) {
            continue;
        }
        let list = if http_key(key) {
            &mut out.http
        } else {
            &mut out.unsupported
        };
        if !list.contains(&key) {
            list.push(key);
        }
    }
    out
}

fn str_field(pos: &[String], neg: &[String]) -> Field<StrMatch> {
    Field::new(
        pos.iter().map(|v| StrMatch::new(v)),
        neg.iter().map(|v| StrMatch::new(v)),
    )
}

fn net_field(pos: &[String], neg: &[String]) -> Field<Cidr> {
    let cidr = |v: &String| parse_net(v).map(Cidr::new);
    Field::new(pos.iter().filter_map(cidr), neg.iter().filter_map(cidr))
}

fn port_field(pos: &[String], neg: &[String]) -> Field<u16> {
    Field::new(
        pos.iter().filter_map(|v| v.parse().ok()),
        neg.iter().filter_map(|v| v.parse().ok()),
    )
}

fn sa_field(pos: &[String], neg: &[String], policy_ns: &str) -> Field<SaMatch> {
    let one = |v: &String| {
        let (ns, sa) = v.split_once('/').unwrap_or((policy_ns, v));
        SaMatch {
            namespace: ns.into(),
            account: sa.into(),
        }
    };
    Field::new(pos.iter().map(one), neg.iter().map(one))
}

fn host_field(pos: &[String], neg: &[String]) -> Field<HostMatch> {
    Field::new(
        pos.iter().map(|v| HostMatch::new(v)),
        neg.iter().map(|v| HostMatch::new(v)),
    )
}

fn value_field(pos: &[String], neg: &[String]) -> Field<ValueMatch> {
    Field::new(
        pos.iter().map(|v| ValueMatch::new(v)),
        neg.iter().map(|v| ValueMatch::new(v)),
    )
}

fn path_field(pos: &[String], neg: &[String]) -> Field<PathMatch> {
    Field::new(
        pos.iter().map(|v| PathMatch::new(v)),
        neg.iter().map(|v| PathMatch::new(v)),
    )
}

fn header_field(key: &HeaderKey, pos: &[String], neg: &[String]) -> Field<(HeaderKey, ValueMatch)> {
    let one = |v: &String| (key.clone(), ValueMatch::new(v));
    Field::new(pos.iter().map(one), neg.iter().map(one))
}

/// Compiles a rule. Unsupported attributes are left out (the rule holds without them: the
/// caller drops ALLOW rules that have any).
fn compile_rule(rule: &Rule, policy_ns: &str) -> CompiledRule {
    let mut clauses = Vec::new();
    if let Some(from) = &rule.from {
        let clause = from
            .iter()
            .filter_map(|f| f.source.as_ref())
            .map(|s| Match {
                principals: str_field(&s.principals, &s.not_principals),
                namespaces: str_field(&s.namespaces, &s.not_namespaces),
                service_accounts: sa_field(&s.service_accounts, &s.not_service_accounts, policy_ns),
                source_ips: net_field(&s.ip_blocks, &s.not_ip_blocks),
                remote_ips: net_field(&s.remote_ip_blocks, &s.not_remote_ip_blocks),
                ..Match::default()
            })
            .collect();
        clauses.push(clause);
    }
    if let Some(to) = &rule.to {
        let clause = to
            .iter()
            .filter_map(|t| t.operation.as_ref())
            .map(|o| Match {
                ports: port_field(&o.ports, &o.not_ports),
                http: HttpMatch {
                    hosts: host_field(&o.hosts, &o.not_hosts),
                    methods: value_field(&o.methods, &o.not_methods),
                    paths: path_field(&o.paths, &o.not_paths),
                    ..HttpMatch::default()
                }
                .boxed(),
                ..Match::default()
            })
            .collect();
        clauses.push(clause);
    }
    for cond in &rule.when {
        let (v, n) = (&cond.values[..], &cond.not_values[..]);
        let m = match cond.key.as_str() {
            "source.ip" | "remote.ip" => Match {
                source_ips: net_field(v, n),
                ..Match::default()
            },
            "destination.ip" => Match {
                destination_ips: net_field(v, n),
                ..Match::default()
            },
            "destination.port" => Match {
                ports: port_field(v, n),
                ..Match::default()
            },
            "source.namespace" => Match {
                namespaces: str_field(v, n),
                ..Match::default()
            },
            "source.principal" => Match {
                principals: str_field(v, n),
                ..Match::default()
            },
            "source.serviceAccount" => Match {
                service_accounts: sa_field(v, n, policy_ns),
                ..Match::default()
            },
            key => match header_condition(key).and_then(HeaderKey::new) {
                Some(header) => Match {
                    http: HttpMatch {
                        headers: header_field(&header, v, n),
                        ..HttpMatch::default()
                    }
                    .boxed(),
                    ..Match::default()
                },
                // Unsupported: left out (holds).
                None => continue,
            },
        };
        clauses.push(vec![m]);
    }
    let http = clauses.iter().flatten().any(|m| m.http.is_some());
    CompiledRule { clauses, http }
}

// ---------------------------------------------------------------------------------------------
// Index and evaluation.
// ---------------------------------------------------------------------------------------------

/// The policies of one scope, CUSTOM and DENY apart from ALLOW.
#[derive(Debug, Default)]
struct Bucket {
    /// CUSTOM then DENY, each by key.
    deny: Vec<Policy>,
    /// By key.
    allow: Vec<Policy>,
}

impl Bucket {
    fn sort(&mut self) {
        self.deny.sort_by(|a, b| {
            (a.action != PolicyAction::Custom, &a.key)
                .cmp(&(b.action != PolicyAction::Custom, &b.key))
        });
        self.allow.sort_by(|a, b| a.key.cmp(&b.key));
    }
}

/// Compiled AuthorizationPolicies by scope.
#[derive(Debug, Default)]
pub(crate) struct Index {
    root_namespace: String,
    /// Root-namespace policies: with a selector they apply in every namespace.
    global: Bucket,
    /// Other namespaces.
    namespaces: ByNamespace<Bucket>,
    count: usize,
}

pub(crate) struct Builder {
    index: Index,
}

impl Builder {
    pub(crate) fn new(root_namespace: &str) -> Builder {
        Builder {
            index: Index {
                root_namespace: root_namespace.to_string(),
                global: Bucket::default(),
                namespaces: HashMap::new(),
                count: 0,
            },
        }
    }

    /// Adds a policy the registry checked; notes what is not enforced at L4 in `warnings`.
    pub(crate) fn add(
        &mut self,
        namespace: &str,
        name: &str,
        spec: &AuthorizationPolicySpec,
        warnings: &mut Vec<String>,
    ) {
        let key = format!("{namespace}/{name}");
        if spec.target_ref.is_some() || spec.target_refs.as_ref().is_some_and(|t| !t.is_empty()) {
            warnings.push(format!(
                "AuthorizationPolicy {key}: targetRef policies are enforced by waypoints, not at L4: ignored"
            ));
            return;
        }
        if spec.action == PolicyAction::Audit {
            warnings.push(format!(
                "AuthorizationPolicy {key}: action AUDIT is not supported: ignored"
            ));
            return;
        }
        let allow = spec.action == PolicyAction::Allow;
        let mut rules = Vec::new();
        let (mut http, mut unsupported): (Vec<&str>, Vec<&str>) = (Vec::new(), Vec::new());
        let (mut tcp_skipped, mut unsupported_skipped) = (false, false);
        for rule in spec.rules.iter().flatten() {
            let found = needs(rule);
            for (all, new) in [
                (&mut http, &found.http),
                (&mut unsupported, &found.unsupported),
            ] {
                for f in new {
                    if !all.contains(f) {
                        all.push(f);
                    }
                }
            }
            if allow {
                tcp_skipped |= !found.http.is_empty() || !found.unsupported.is_empty();
                if !found.unsupported.is_empty() {
                    unsupported_skipped = true;
                    continue;
                }
            }
            rules.push(compile_rule(rule, namespace));
        }
        const NO_ALLOW: &str = "the rules using them never match (fail closed: they allow nothing)";
        const WIDER_DENY: &str =
            "the rules are enforced without them (fail closed: they deny more than written)";
        if spec.action == PolicyAction::Custom {
            http.append(&mut unsupported);
            if !http.is_empty() {
                warnings.push(format!(
                    "AuthorizationPolicy {key}: {} not evaluated in a CUSTOM policy (there is no external authorizer): {WIDER_DENY}",
                    http.join(", ")
                ));
            }
        } else {
            let effect = if allow { NO_ALLOW } else { WIDER_DENY };
            if !unsupported.is_empty() {
                warnings.push(format!(
                    "AuthorizationPolicy {key}: {} cannot be evaluated (weft has no JWT authentication, TLS SNI or Envoy metadata); {effect}",
                    unsupported.join(", ")
                ));
            }
            if !http.is_empty() {
                warnings.push(format!(
                    "AuthorizationPolicy {key}: HTTP attributes ({}) are enforced per request on HTTP traffic; on TCP traffic {effect}",
                    http.join(", ")
                ));
            }
        }
        let policy = Policy {
            key,
            selector: selector_pairs(&spec.selector),
            action: spec.action,
            rules,
            tcp_skipped,
            unsupported_skipped,
        };
        let bucket = if namespace == self.index.root_namespace {
            &mut self.index.global
        } else {
            self.index
                .namespaces
                .entry(namespace.to_string())
                .or_default()
        };
        match policy.action {
            PolicyAction::Allow => bucket.allow.push(policy),
            _ => bucket.deny.push(policy),
        }
        self.index.count += 1;
    }

    pub(crate) fn finish(mut self) -> Index {
        self.index.global.sort();
        for b in self.index.namespaces.values_mut() {
            b.sort();
        }
        self.index
    }
}

impl Index {
    pub(crate) fn len(&self) -> usize {
        self.count
    }

    /// The buckets that can apply to `pod`, root first, with "is the root bucket".
    #[inline]
    fn buckets<'s>(&'s self, pod: &Pod) -> [Option<(&'s Bucket, bool)>; 2] {
        let ns = if pod.namespace == self.root_namespace {
            None
        } else {
            self.namespaces.get(pod.namespace.as_str())
        };
        [Some((&self.global, true)), ns.map(|b| (b, false))]
    }

    /// How specific an applicable policy is for `pod` (higher = more).
    #[inline]
    fn rank(&self, p: &Policy, root_bucket: bool, pod: &Pod) -> u8 {
        let own_namespace = !root_bucket || pod.namespace == self.root_namespace;
        match (own_namespace, p.selector.is_empty()) {
            (true, false) => 3,
            (true, true) => 2,
            (false, false) => 1,
            (false, true) => 0,
        }
    }

    /// CUSTOM, then DENY, then ALLOW, as Istio. In [`Mode::Connect`] a DENY rule that depends
    /// on the request defers the decision to each request unless the connection is denied
    /// anyway, and an ALLOW rule that depends on it is enough to let the connection in.
    pub(crate) fn evaluate(&self, req: &ConnRequest<'_>, mode: Mode<'_>) -> Verdict {
        let pod = req.destination;
        let buckets = self.buckets(pod);
        let ctx = Ctx::new(req);
        let mut deny_pending = false;
        for (bucket, _) in buckets.iter().flatten() {
            for p in &bucket.deny {
                if !selects(&p.selector, pod) {
                    continue;
                }
                match p.eval(&ctx, mode) {
                    Tri::Yes => {
                        let reason = if p.action == PolicyAction::Custom {
                            DenyReason::CustomPolicy
                        } else {
                            DenyReason::DenyPolicy
                        };
                        return Verdict::Deny {
                            policy: p.key.clone(),
                            reason,
                        };
                    }
                    Tri::Maybe => deny_pending = true,
                    Tri::No => {}
                }
            }
        }
        let allowed = if deny_pending {
            Verdict::PerRequest
        } else {
            Verdict::Allow
        };
        let tcp = matches!(mode, Mode::Tcp);
        let mut allow_pending = false;
        let mut best: Option<(u8, &Policy)> = None;
        let mut best_skipped: Option<(u8, &Policy)> = None;
        for &(bucket, root) in buckets.iter().flatten() {
            for p in &bucket.allow {
                if !selects(&p.selector, pod) {
                    continue;
                }
                match p.eval(&ctx, mode) {
                    Tri::Yes => return allowed,
                    Tri::Maybe => allow_pending = true,
                    Tri::No => {}
                }
                let rank = self.rank(p, root, pod);
                if best.is_none_or(|(r, _)| rank > r) {
                    best = Some((rank, p));
                }
                let skipped = if tcp {
                    p.tcp_skipped
                } else {
                    p.unsupported_skipped
                };
                if skipped && best_skipped.is_none_or(|(r, _)| rank > r) {
                    best_skipped = Some((rank, p));
                }
            }
        }
        if allow_pending {
            return Verdict::PerRequest;
        }
        let skipped_reason = if tcp {
            DenyReason::NotAllowedHttpRules
        } else {
            DenyReason::NotAllowedUnsupportedRules
        };
        match (best_skipped, best) {
            (Some((_, p)), _) => Verdict::Deny {
                policy: p.key.clone(),
                reason: skipped_reason,
            },
            (None, Some((_, p))) => Verdict::Deny {
                policy: p.key.clone(),
                reason: DenyReason::NotAllowed,
            },
            (None, None) => allowed,
        }
    }

    pub(crate) fn applicable(&self, pod: &Pod) -> Vec<String> {
        let mut out = Vec::new();
        for (bucket, _) in self.buckets(pod).into_iter().flatten() {
            let mut keys: Vec<&str> = bucket
                .deny
                .iter()
                .chain(&bucket.allow)
                .filter(|p| selects(&p.selector, pod))
                .map(|p| p.key.as_str())
                .collect();
            keys.sort_unstable();
            out.extend(keys.into_iter().map(str::to_string));
        }
        out
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn string_matchers() {
        assert!(StrMatch::new("*").matches("x"));
        assert!(!StrMatch::new("*").matches(""));
        assert!(StrMatch::new("cluster.local/ns/a/*").matches("cluster.local/ns/a/sa/b"));
        assert!(!StrMatch::new("cluster.local/ns/a/*").matches("cluster.local/ns/ab/sa/b"));
        assert!(StrMatch::new("*/sa/b").matches("cluster.local/ns/a/sa/b"));
        assert!(StrMatch::new("a").matches("a"));
        assert!(!StrMatch::new("a").matches("ab"));
    }

    #[test]
    fn cidrs() {
        let c = |s: &str| Cidr::new(parse_net(s).unwrap());
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(c("10.1.2.0/24").contains(ip("10.1.2.255")));
        assert!(!c("10.1.2.0/24").contains(ip("10.1.3.0")));
        assert!(
            c("10.1.2.3/8").contains(ip("10.200.0.1")),
            "host bits ignored"
        );
        assert!(c("0.0.0.0/0").contains(ip("192.0.2.1")));
        assert!(!c("0.0.0.0/0").contains(ip("::1")));
        assert!(c("10.0.0.1").contains(ip("10.0.0.1")));
        assert!(!c("10.0.0.1").contains(ip("10.0.0.2")));
        assert!(c("::ffff:10.0.0.1").contains(ip("10.0.0.1")), "mapped");
        assert!(c("fd00::/8").contains(ip("fdff::1")));
        assert!(!c("fd00::/8").contains(ip("fe00::1")));
        assert!(c("::/0").contains(ip("2001:db8::1")));
        assert!(c("2001:db8::1/128").contains(ip("2001:db8::1")));
    }

    #[test]
    fn identities() {
        assert_eq!(
            parse_identity("cluster.local/ns/demo/sa/client"),
            Some(("demo", "client"))
        );
        assert_eq!(parse_identity("cluster.local/ns/demo"), None);
        assert_eq!(parse_identity("cluster.local/x/demo/sa/c"), None);
        assert_eq!(parse_identity("td/ns//sa/c"), None);
    }
}
