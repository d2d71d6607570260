//! AuthorizationPolicy at L4: compilation into matchers, evaluation.
//!
//! A compiled policy is a list of rules (ORed); a rule is a list of clauses (ANDed): one for
//! `from`, one for `to`, one per `when` condition; a clause is a list of [`Match`]es (ORed): one
//! per `from`/`to` entry; within a match every field must hold (a field holds when one of its
//! values matches and none of its `not` values does). An empty rule has no clause and matches
//! everything; a policy without rules matches nothing.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;

use super::{selector_pairs, selects, ByNamespace, ConnRequest, Decision, DenyReason};
use crate::registry::kinds::security::{parse_net, AuthorizationPolicySpec, PolicyAction, Rule};
use crate::registry::Pod;

/// `when` keys weft evaluates at L4.
const L4_KEYS: &[&str] = &[
    "source.ip",
    "remote.ip",
    "source.namespace",
    "source.principal",
    "source.serviceAccount",
    "destination.ip",
    "destination.port",
];

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
    /// `remoteIpBlocks`: also the source IP at L4, but ANDed with `ipBlocks`.
    remote_ips: Field<Cidr>,
    destination_ips: Field<Cidr>,
}

impl Match {
    #[inline]
    fn matches(&self, c: &Ctx<'_>) -> bool {
        let in_net = |ip: Option<IpAddr>| move |n: &Cidr| ip.is_some_and(|ip| n.contains(ip));
        self.ports.holds(|p| *p == c.port)
            && self.source_ips.holds(in_net(c.source_ip))
            && self.remote_ips.holds(in_net(c.source_ip))
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
}

/// Rule: clauses ANDed, matches within a clause ORed.
#[derive(Debug, Clone, Default)]
struct CompiledRule {
    clauses: Vec<Vec<Match>>,
}

impl CompiledRule {
    #[inline]
    fn matches(&self, c: &Ctx<'_>) -> bool {
        self.clauses
            .iter()
            .all(|clause| clause.iter().any(|m| m.matches(c)))
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
    rules: Vec<CompiledRule>,
    /// ALLOW: some rules were dropped because they need HTTP attributes.
    http_rules_skipped: bool,
}

impl Policy {
    #[inline]
    fn matches(&self, c: &Ctx<'_>) -> bool {
        self.rules.iter().any(|r| r.matches(c))
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

/// HTTP attributes found in a rule, by field name (for warnings).
fn http_fields(rule: &Rule) -> Vec<&str> {
    let mut out = Vec::new();
    let mut add = |name: &'static str, present: bool| {
        if present && !out.contains(&name) {
            out.push(name);
        }
    };
    for src in rule.from.iter().flatten().filter_map(|f| f.source.as_ref()) {
        add("requestPrincipals", !src.request_principals.is_empty());
        add(
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
        add("hosts", !op.hosts.is_empty());
        add("notHosts", !op.not_hosts.is_empty());
        add("methods", !op.methods.is_empty());
        add("notMethods", !op.not_methods.is_empty());
        add("paths", !op.paths.is_empty());
        add("notPaths", !op.not_paths.is_empty());
    }
    let mut out: Vec<&str> = out;
    for cond in &rule.when {
        if !L4_KEYS.contains(&cond.key.as_str()) && !out.contains(&cond.key.as_str()) {
            out.push(&cond.key);
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

/// Compiles a rule; HTTP attributes are left out (the caller drops ALLOW rules that have any).
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
            // HTTP attribute: ignored (matches everything).
            _ => continue,
        };
        clauses.push(vec![m]);
    }
    CompiledRule { clauses }
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
        let mut rules = Vec::new();
        let mut http: Vec<&str> = Vec::new();
        let mut http_rules_skipped = false;
        for rule in spec.rules.iter().flatten() {
            let found = http_fields(rule);
            for f in &found {
                if !http.contains(f) {
                    http.push(f);
                }
            }
            if spec.action == PolicyAction::Allow && !found.is_empty() {
                http_rules_skipped = true;
                continue;
            }
            rules.push(compile_rule(rule, namespace));
        }
        if !http.is_empty() {
            let effect = if spec.action == PolicyAction::Allow {
                "the rules using them never match (fail closed: they allow nothing)"
            } else {
                "the rules are enforced without them (fail closed: they deny more than written)"
            };
            warnings.push(format!(
                "AuthorizationPolicy {key}: HTTP attributes ({}) are not enforced until the L7 engine lands; {effect}",
                http.join(", ")
            ));
        }
        let policy = Policy {
            key,
            selector: selector_pairs(&spec.selector),
            action: spec.action,
            rules,
            http_rules_skipped,
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

    pub(crate) fn authorize(&self, req: &ConnRequest<'_>) -> Decision {
        let pod = req.destination;
        let buckets = self.buckets(pod);
        let ctx = Ctx::new(req);
        for (bucket, _) in buckets.iter().flatten() {
            for p in &bucket.deny {
                if selects(&p.selector, pod) && p.matches(&ctx) {
                    let reason = if p.action == PolicyAction::Custom {
                        DenyReason::CustomPolicy
                    } else {
                        DenyReason::DenyPolicy
                    };
                    return Decision::Deny {
                        policy: p.key.clone(),
                        reason,
                    };
                }
            }
        }
        let mut best: Option<(u8, &Policy)> = None;
        let mut best_http: Option<(u8, &Policy)> = None;
        for &(bucket, root) in buckets.iter().flatten() {
            for p in &bucket.allow {
                if !selects(&p.selector, pod) {
                    continue;
                }
                if p.matches(&ctx) {
                    return Decision::Allow;
                }
                let rank = self.rank(p, root, pod);
                if best.is_none_or(|(r, _)| rank > r) {
                    best = Some((rank, p));
                }
                if p.http_rules_skipped && best_http.is_none_or(|(r, _)| rank > r) {
                    best_http = Some((rank, p));
                }
            }
        }
        match (best_http, best) {
            (Some((_, p)), _) => Decision::Deny {
                policy: p.key.clone(),
                reason: DenyReason::NotAllowedHttpRules,
            },
            (None, Some((_, p))) => Decision::Deny {
                policy: p.key.clone(),
                reason: DenyReason::NotAllowed,
            },
            (None, None) => Decision::Allow,
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
