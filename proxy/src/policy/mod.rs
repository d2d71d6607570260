//! The policy engine: Istio `AuthorizationPolicy` and `PeerAuthentication` (security.istio.io
//! v1 and v1beta1) as pure functions over a registry [`Snapshot`].
//!
//! [`PolicySet::build`] compiles the policy objects of a snapshot once (selectors split, CIDRs
//! parsed, wildcards split into prefix/suffix matchers, path templates split, policies indexed
//! by namespace); the queries then only touch the policies that can apply to the destination
//! pod and allocate nothing, except the policy name of a denial (and a header sent more than
//! once, joined to be matched).
//!
//! - [`rbac`]: AuthorizationPolicy: TCP connections as ztunnel, HTTP connections and requests.
//! - [`request`]: the HTTP request a policy sees and the matchers of its HTTP attributes.
//! - [`peerauth`]: PeerAuthentication, mesh → namespace → workload → port.
//!
//! The registry parses and checks every policy object it loads (`registry::kinds::security`), so
//! an invalid policy fails the load with
//! `file:line: document N (AuthorizationPolicy ns/name): spec.rules[0]…: reason` like any other
//! bad document, and [`PolicySet::build`] only ever compiles valid ones.
//!
//! Imports: `registry` (and the `http` crate).
//!
//! # Fail closed
//!
//! A security object weft cannot apply (an unknown kind or version in `security.istio.io`, e.g.
//! `kind: AuthorisationPolicy`) is a policy weft cannot enforce: every workload it could select
//! (its selector, or every pod, in its namespace; in every namespace from the root namespace)
//! is denied every connection and every request ([`DenyReason::FailClosed`], naming the
//! object) and its mTLS mode is STRICT, until the object is fixed or removed.
//!
//! # Authorization
//!
//! Scope: a policy in the root namespace (`istio-system` unless configured) without selector
//! applies to every workload; without selector in namespace N to every workload of N; with
//! `selector.matchLabels` to the matching pods of its namespace, or of every namespace for a
//! root-namespace policy. `targetRef`/`targetRefs` policies are for waypoints and do not apply
//! here. Evaluation: a matching CUSTOM policy denies (there is no external authorizer: fail
//! closed); a matching DENY policy denies; otherwise, with no ALLOW policy for the workload the
//! traffic is allowed, else it is allowed iff an ALLOW policy matches. AUDIT is ignored.
//! `remoteIpBlocks` are taken as `ipBlocks` (the peer is the remote client).
//!
//! Attributes are of three kinds:
//! - **L4**: principals, namespaces, service accounts, ipBlocks, ports, and `when` on
//!   `source.*`, `remote.ip`, `destination.ip`, `destination.port`. Known, except the source
//!   IP of a caller from another node that weft could not verify (`source_ip: None`): then an
//!   IP field holds in DENY and CUSTOM rules and fails in ALLOW rules (fail closed).
//! - **HTTP**: `hosts`, `methods`, `paths` (and their `not…`), `when` on `request.headers[…]`
//!   (see [`request`] for the exact matching). Known per request on HTTP traffic only.
//! - **Unsupported**: `requestPrincipals`, `request.auth.*` (weft has no JWT authentication),
//!   `connection.sni`, `experimental.*`, pseudo-headers other than `:authority`, `:method`,
//!   `:path`. Never known: an ALLOW rule using any never matches; in a DENY rule they are
//!   ignored and the rest of the rule decides (it denies more, never less).
//!
//! Three entry points, by what the data path knows:
//! - [`PolicySet::authorize`] (= [`PolicySet::authorize_connection`] with [`Protocol::Tcp`]): a
//!   TCP connection, ztunnel's semantics — an ALLOW rule with an HTTP attribute never matches,
//!   a DENY rule ignores its HTTP attributes.
//! - [`PolicySet::authorize_connection`] with [`Protocol::Http`]: an HTTP connection when it
//!   opens, before any request. Every rule is evaluated with its HTTP attributes unknown, to
//!   "matches whatever the requests", "matches no request" or "depends". A DENY rule that
//!   matches whatever the requests denies the connection; if no ALLOW rule of the policies
//!   that apply could match any request, it is denied too ([`DenyReason::NotAllowed`]);
//!   otherwise it is [`ConnectionDecision::Allow`] (no rule depends on the request: nothing to
//!   check per request) or [`ConnectionDecision::PerRequest`]. So a policy never denies an HTTP
//!   connection only because it needs HTTP attributes. What it decides holds for every request
//!   on the connection (the deny may name another DENY policy than a request would: the first
//!   that denies everything, not the first that matches).
//! - [`PolicySet::authorize_request`]: one HTTP request; every HTTP attribute is evaluated.
//!   A CUSTOM policy is judged as at L4 on every request (HTTP attributes ignored): without an
//!   authorizer to ask, it fails closed on all it could select.
//!
//! # Naming in a denial
//!
//! `policy` is always `<namespace>/<name>` of an AuthorizationPolicy (or, for
//! [`DenyReason::FailClosed`], of the object weft could not apply):
//! - [`DenyReason::DenyPolicy`] / [`DenyReason::CustomPolicy`]: the policy that matched (root
//!   namespace policies are checked first, then the destination namespace's, each by name).
//! - [`DenyReason::NotAllowed`]: ALLOW policies apply and none matched; `policy` is the most
//!   specific applicable ALLOW policy (selector in the destination's namespace, then
//!   namespace-wide, then root namespace with selector, then mesh-wide; by name within a level),
//!   the one a user most likely has to extend — or replace, when it is an allow-nothing `{}`.
//! - [`DenyReason::NotAllowedHttpRules`] (TCP): as `NotAllowed`, but some applicable ALLOW
//!   policy has rules that need HTTP (or unsupported) attributes, which never match TCP
//!   traffic; `policy` is the most specific of those, as they may be the rules that were meant
//!   to allow the connection.
//! - [`DenyReason::NotAllowedUnsupportedRules`] (HTTP): the same for rules with unsupported
//!   attributes.

pub mod peerauth;
pub mod rbac;
pub mod request;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;

use parking_lot::Mutex;
use serde::Serialize;

use crate::registry::kinds::security::{AuthorizationPolicySpec, WorkloadSelector};
use crate::registry::{FailClosed, FailEffect, Pod, Snapshot};

pub use peerauth::MtlsMode;
pub use request::HttpRequest;

use rbac::{Mode, Verdict};

/// The label pairs a selector requires; empty (absent or `{}`) selects every pod.
fn selector_pairs(selector: &Option<WorkloadSelector>) -> Vec<(String, String)> {
    selector
        .as_ref()
        .map(|s| {
            s.match_labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default()
}

fn selects(selector: &[(String, String)], pod: &Pod) -> bool {
    selector
        .iter()
        .all(|(k, v)| pod.labels.get(k.as_str()) == Some(v))
}

// ---------------------------------------------------------------------------------------------
// The public API.
// ---------------------------------------------------------------------------------------------

/// One connection to authorize, as seen by the destination side.
#[derive(Debug, Clone, Copy)]
pub struct ConnRequest<'a> {
    /// The destination workload.
    pub destination: &'a Pod,
    /// The port connected to on the destination pod (container port).
    pub destination_port: u16,
    pub destination_ip: Option<IpAddr>,
    /// Authenticated source identity `<trust-domain>/ns/<ns>/sa/<sa>` (a `spiffe://` prefix is
    /// accepted); `None` for plaintext or unknown sources.
    pub source_principal: Option<&'a str>,
    /// Namespace of the authenticated source; `None` = taken from `source_principal`. Only set it
    /// for an authenticated source: `namespaces` rules trust it.
    pub source_namespace: Option<&'a str>,
    pub source_ip: Option<IpAddr>,
}

/// Why a connection was denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DenyReason {
    /// A DENY policy matched (on TCP traffic, its HTTP attributes ignored).
    DenyPolicy,
    /// A CUSTOM policy matched: weft has no external authorizer, so it fails closed.
    CustomPolicy,
    /// ALLOW policies apply to the destination and none matched.
    NotAllowed,
    /// TCP traffic: ALLOW policies apply and none matched; some of their rules need HTTP
    /// attributes, which TCP traffic does not have (they never allow it).
    NotAllowedHttpRules,
    /// HTTP traffic: ALLOW policies apply and none matched; some of their rules need attributes
    /// weft cannot evaluate (JWT `requestPrincipals` and `request.auth.*`, `connection.sni`,
    /// `experimental.*`), and never allow.
    NotAllowedUnsupportedRules,
    /// A security object that could select the destination cannot be applied (unknown kind or
    /// version): nothing is allowed until it is fixed.
    FailClosed,
}

impl DenyReason {
    /// A stable snake_case name (`deny_policy`, `custom_policy`, `not_allowed`,
    /// `not_allowed_http_rules`, `not_allowed_unsupported_rules`, `fail_closed`).
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::DenyPolicy => "deny_policy",
            DenyReason::CustomPolicy => "custom_policy",
            DenyReason::NotAllowed => "not_allowed",
            DenyReason::NotAllowedHttpRules => "not_allowed_http_rules",
            DenyReason::NotAllowedUnsupportedRules => "not_allowed_unsupported_rules",
            DenyReason::FailClosed => "fail_closed",
        }
    }
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DenyReason::DenyPolicy => "a DENY policy matched",
            DenyReason::CustomPolicy => {
                "a CUSTOM policy matched and there is no external authorizer (fail closed)"
            }
            DenyReason::NotAllowed => "no ALLOW policy matched",
            DenyReason::NotAllowedHttpRules => {
                "no ALLOW policy matched (this is TCP traffic: rules with HTTP attributes never allow it)"
            }
            DenyReason::NotAllowedUnsupportedRules => {
                "no ALLOW policy matched (rules with attributes weft cannot evaluate, such as JWT claims, never allow)"
            }
            DenyReason::FailClosed => {
                "a security object weft cannot apply selects the destination (fail closed)"
            }
        })
    }
}

/// The outcome of [`PolicySet::authorize`] and [`PolicySet::authorize_request`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum Decision {
    Allow,
    /// `policy` is `<namespace>/<name>` of an AuthorizationPolicy: see the module docs.
    Deny {
        policy: String,
        reason: DenyReason,
    },
}

impl Decision {
    pub fn is_allow(&self) -> bool {
        matches!(self, Decision::Allow)
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Allow => f.write_str("allow"),
            Decision::Deny { policy, reason } => write!(f, "deny: {reason} ({policy})"),
        }
    }
}

/// What the traffic of a connection is, as the data path classified it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Opaque bytes: HTTP attributes never known.
    Tcp,
    /// HTTP: each request is authorized with [`PolicySet::authorize_request`].
    Http,
}

/// The outcome of [`PolicySet::authorize_connection`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum ConnectionDecision {
    /// Every request (or, for TCP, the connection) is allowed: no per-request check needed.
    Allow,
    /// Denied whatever the requests are: refuse the connection. See [`Decision::Deny`].
    Deny { policy: String, reason: DenyReason },
    /// HTTP only: the answer depends on the requests; call
    /// [`PolicySet::authorize_request`] for each.
    PerRequest,
}

impl ConnectionDecision {
    fn from_verdict(v: Verdict) -> ConnectionDecision {
        match v {
            Verdict::Allow => ConnectionDecision::Allow,
            Verdict::Deny { policy, reason } => ConnectionDecision::Deny { policy, reason },
            Verdict::PerRequest => ConnectionDecision::PerRequest,
        }
    }
}

impl Decision {
    /// For the modes in which every attribute is known ([`Mode::Tcp`], [`Mode::Request`]):
    /// there nothing is unknown, so no rule evaluates to "depends" and `PerRequest` cannot
    /// arise.
    fn from_verdict(v: Verdict) -> Decision {
        match v {
            Verdict::Allow => Decision::Allow,
            Verdict::Deny { policy, reason } => Decision::Deny { policy, reason },
            Verdict::PerRequest => unreachable!("only Mode::Connect leaves attributes unknown"),
        }
    }
}

/// The one wording of a denied connection, on every node that records it: `denied by policy
/// <namespace>/<name> (<reason>)`, with [`DenyReason::as_str`] as the reason (the source node of
/// a tunnel learns both from the destination node's answer).
pub fn deny_message(policy: &str, reason: Option<&str>) -> String {
    match reason {
        Some(reason) => format!("denied by policy {policy} ({reason})"),
        None => format!("denied by policy {policy}"),
    }
}

/// mTLS of one pod: the default mode and per-container-port overrides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PodMtls {
    pub default: MtlsMode,
    pub ports: BTreeMap<u16, MtlsMode>,
}

/// The compiled policies of one snapshot. Immutable; rebuild for a new snapshot.
#[derive(Debug, Default)]
pub struct PolicySet {
    root_namespace: String,
    authz: rbac::Index,
    peer: peerauth::Index,
    fail_closed: Vec<FailClosed>,
    warnings: Vec<String>,
}

impl PolicySet {
    /// Compiles the AuthorizationPolicies and PeerAuthentications of `snapshot`. `root_namespace`
    /// is Istio's root namespace (`--root-namespace`). What is not enforced as written is listed
    /// in [`PolicySet::warnings`] and logged (once per process and policy); the security
    /// objects that fail closed are logged the same way.
    pub fn build(snapshot: &Snapshot, root_namespace: &str) -> PolicySet {
        let mut set = PolicySet {
            root_namespace: root_namespace.to_string(),
            fail_closed: snapshot.fail_closed.clone(),
            ..PolicySet::default()
        };
        let mut authz = rbac::Builder::new(root_namespace);
        for p in &snapshot.authorization_policies {
            authz.add(&p.namespace, &p.name, &p.spec, &mut set.warnings);
        }
        // An ALLOW policy weft cannot apply stays present, matching nothing: its pods keep only
        // what their other ALLOW policies allow.
        for f in &snapshot.fail_closed {
            if f.effect == FailEffect::AllowNothing {
                let spec = AuthorizationPolicySpec {
                    selector: f
                        .selector
                        .clone()
                        .map(|match_labels| WorkloadSelector { match_labels }),
                    rules: Some(Vec::new()),
                    ..AuthorizationPolicySpec::default()
                };
                authz.add(&f.namespace, &f.name, &spec, &mut set.warnings);
            }
        }
        let mut peer = peerauth::Builder::new(root_namespace);
        for p in &snapshot.peer_authentications {
            peer.add(&p.namespace, &p.name, p.created, &p.spec);
        }
        for w in &set.warnings {
            warn_once(w);
        }
        for f in &set.fail_closed {
            let how = match f.effect {
                FailEffect::DenyAll => "every connection denied, STRICT mTLS",
                FailEffect::AllowNothing => "an ALLOW policy that allows nothing",
                FailEffect::Strict => "STRICT mTLS",
            };
            warn_once(&format!(
                "{} cannot be applied, so what it covers fails closed ({how}): {}",
                f.describe(root_namespace),
                f.reason
            ));
        }
        set.authz = authz.finish();
        set.peer = peer.finish();
        set
    }

    /// Number of AuthorizationPolicies enforced (ALLOW, DENY, CUSTOM; not AUDIT, not
    /// `targetRef` policies).
    pub fn len(&self) -> usize {
        self.authz.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of PeerAuthentications in effect.
    pub fn peer_authentications(&self) -> usize {
        self.peer.len()
    }

    /// The security objects weft cannot apply, whose workloads fail closed.
    pub fn fail_closed(&self) -> &[FailClosed] {
        &self.fail_closed
    }

    /// Each object that fails closed, what it covers and why, one line each.
    pub fn fail_closed_report(&self) -> Vec<String> {
        self.fail_closed
            .iter()
            .map(|f| format!("{}: {}", f.describe(&self.root_namespace), f.reason))
            .collect()
    }

    /// What is not enforced as written, one line each: HTTP attributes (on TCP traffic),
    /// unsupported attributes, `targetRef`, AUDIT.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Decides whether a TCP connection may reach `req.destination` (ztunnel's L4 semantics:
    /// see the module docs). The same as `authorize_connection(req, Protocol::Tcp)`.
    pub fn authorize(&self, req: &ConnRequest<'_>) -> Decision {
        match self.fail_closed_decision(req.destination) {
            Some(deny) => deny,
            None => Decision::from_verdict(self.authz.evaluate(req, Mode::Tcp)),
        }
    }

    /// Decides a connection when it is opened (the HBONE `CONNECT` or a same-node accept). For
    /// [`Protocol::Http`] only what the connection alone decides is decided: a DENY rule that
    /// matches whatever the requests denies it, no ALLOW rule that could match any request
    /// denies it, and what depends on the requests is [`ConnectionDecision::PerRequest`].
    pub fn authorize_connection(
        &self,
        req: &ConnRequest<'_>,
        protocol: Protocol,
    ) -> ConnectionDecision {
        if let Some(Decision::Deny { policy, reason }) = self.fail_closed_decision(req.destination)
        {
            return ConnectionDecision::Deny { policy, reason };
        }
        let mode = match protocol {
            Protocol::Tcp => Mode::Tcp,
            Protocol::Http => Mode::Connect,
        };
        ConnectionDecision::from_verdict(self.authz.evaluate(req, mode))
    }

    /// Decides one HTTP request on a connection `req` (a denied request gets
    /// `403 RBAC: access denied`). Every HTTP attribute is enforced; unsupported ones fail
    /// closed (see the module docs).
    pub fn authorize_request(&self, req: &ConnRequest<'_>, http: &HttpRequest<'_>) -> Decision {
        match self.fail_closed_decision(req.destination) {
            Some(deny) => deny,
            None => Decision::from_verdict(self.authz.evaluate(req, Mode::Request(http))),
        }
    }

    fn fail_closed_decision(&self, pod: &Pod) -> Option<Decision> {
        self.failing_closed(pod).map(|f| Decision::Deny {
            policy: format!("{}/{}", f.namespace, f.name),
            reason: DenyReason::FailClosed,
        })
    }

    /// The first object weft cannot apply that could select `pod` and denies it everything.
    fn failing_closed(&self, pod: &Pod) -> Option<&FailClosed> {
        self.fail_closed
            .iter()
            .find(|f| f.effect == FailEffect::DenyAll && f.could_select(pod, &self.root_namespace))
    }

    /// Whether an object weft cannot apply makes `pod` STRICT.
    fn strict_closed(&self, pod: &Pod) -> bool {
        self.fail_closed.iter().any(|f| {
            matches!(f.effect, FailEffect::DenyAll | FailEffect::Strict)
                && f.could_select(pod, &self.root_namespace)
        })
    }

    /// AuthorizationPolicies that apply to `pod` (`ns/name`), in evaluation order: root-namespace
    /// ones first, then the pod's namespace's, each by name.
    pub fn applicable(&self, pod: &Pod) -> Vec<String> {
        self.authz.applicable(pod)
    }

    /// The mTLS mode for connections to container port `port` of `pod`.
    pub fn mtls_mode(&self, pod: &Pod, port: u16) -> MtlsMode {
        if self.strict_closed(pod) {
            return MtlsMode::Strict;
        }
        self.peer.mode(pod, port)
    }

    /// The mTLS mode of `pod` and its per-port overrides.
    pub fn mtls(&self, pod: &Pod) -> PodMtls {
        if self.strict_closed(pod) {
            return PodMtls {
                default: MtlsMode::Strict,
                ports: BTreeMap::new(),
            };
        }
        self.peer.pod(pod)
    }
}

/// Logs `msg` as a warning unless it was already logged by this process (policy sets are rebuilt
/// on every registry change; an unchanged policy should not warn again).
fn warn_once(msg: &str) {
    static SEEN: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    let mut seen = SEEN.lock();
    let seen = seen.get_or_insert_with(HashSet::new);
    if seen.contains(msg) {
        return;
    }
    if seen.len() >= 10_000 {
        seen.clear();
    }
    seen.insert(msg.to_string());
    tracing::warn!("policy: {msg}");
}

/// Namespace → value, looked up by `&str`.
type ByNamespace<T> = HashMap<String, T>;

#[cfg(test)]
mod tests;
