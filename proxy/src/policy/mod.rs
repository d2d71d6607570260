//! The policy engine: Istio `AuthorizationPolicy` and `PeerAuthentication` (security.istio.io
//! v1 and v1beta1) as pure functions over a registry [`Snapshot`].
//!
//! [`PolicySet::build`] compiles the policy objects of a snapshot once (selectors split, CIDRs
//! parsed, wildcards split into prefix/suffix matchers, policies indexed by namespace); the
//! queries ([`PolicySet::authorize`], [`PolicySet::mtls_mode`], [`PolicySet::mtls`]) then only
//! touch the policies that can apply to the destination pod and allocate nothing, except the
//! policy name of a [`Decision::Deny`].
//!
//! - [`rbac`]: AuthorizationPolicy, enforced at L4 as ztunnel does (HTTP attributes fail closed).
//! - [`peerauth`]: PeerAuthentication, mesh → namespace → workload → port.
//!
//! The registry calls [`validate`] for every document it loads, so an invalid policy fails the
//! load with `file:line: document N (AuthorizationPolicy ns/name): spec.rules[0]…: reason` like
//! any other bad document; [`PolicySet::build`] therefore normally sees only valid objects (it
//! skips invalid ones and lists them in [`PolicySet::errors`]).
//!
//! # Authorization at L4
//!
//! Scope: a policy in the root namespace (`istio-system` unless configured) without selector
//! applies to every workload; without selector in namespace N to every workload of N; with
//! `selector.matchLabels` to the matching pods of its namespace, or of every namespace for a
//! root-namespace policy. `targetRef`/`targetRefs` policies are for waypoints and do not apply
//! here. Evaluation: a matching CUSTOM policy denies (there is no external authorizer: fail
//! closed); a matching DENY policy denies; otherwise, with no ALLOW policy for the workload the
//! connection is allowed, else it is allowed iff an ALLOW policy matches. AUDIT is ignored.
//!
//! HTTP attributes (`hosts`, `methods`, `paths`, `requestPrincipals`, `request.*` and
//! `connection.sni` conditions, …) cannot be seen at L4: in an ALLOW policy a rule that uses any
//! never matches (it cannot allow), in DENY and CUSTOM policies they are ignored and the rest of
//! the rule decides (it denies more, never less). A warning is logged once per policy.
//! `remoteIpBlocks` are taken as `ipBlocks` (at L4 the peer is the remote client).
//!
//! # Naming in [`Decision::Deny`]
//!
//! `policy` is always `<namespace>/<name>` of an AuthorizationPolicy:
//! - [`DenyReason::DenyPolicy`] / [`DenyReason::CustomPolicy`]: the policy that matched (root
//!   namespace policies are checked first, then the destination namespace's, each by name).
//! - [`DenyReason::NotAllowed`]: ALLOW policies apply and none matched; `policy` is the most
//!   specific applicable ALLOW policy (selector in the destination's namespace, then
//!   namespace-wide, then root namespace with selector, then mesh-wide; by name within a level),
//!   the one a user most likely has to extend — or replace, when it is an allow-nothing `{}`.
//! - [`DenyReason::NotAllowedHttpRules`]: as `NotAllowed`, but some applicable ALLOW policy has
//!   rules that need HTTP attributes and were skipped at L4; `policy` is the most specific of
//!   those, as they may be the rules that were meant to allow the connection.

pub mod peerauth;
pub mod rbac;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::Mutex;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::registry::{FieldError, Pod, RawObject, Snapshot};

pub use peerauth::MtlsMode;

/// The default Istio root namespace.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// API group of the policy kinds.
pub const SECURITY_GROUP: &str = "security.istio.io";

/// Whether `api_version`/`kind` is an AuthorizationPolicy or PeerAuthentication this engine reads
/// (`security.istio.io/v1` or `/v1beta1`).
pub fn is_policy_kind(api_version: &str, kind: &str) -> bool {
    policy_kind(api_version, kind).is_some()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Authorization,
    PeerAuthentication,
}

fn policy_kind(api_version: &str, kind: &str) -> Option<Kind> {
    let version = api_version
        .strip_prefix(SECURITY_GROUP)?
        .strip_prefix('/')?;
    if !matches!(version, "v1" | "v1beta1") {
        return None;
    }
    match kind {
        "AuthorizationPolicy" => Some(Kind::Authorization),
        "PeerAuthentication" => Some(Kind::PeerAuthentication),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Istio API types (security.istio.io), camelCase, unknown fields rejected as Istio's schema does.
// ---------------------------------------------------------------------------------------------

/// `spec.selector`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    #[serde(default, deserialize_with = "nullable")]
    pub match_labels: BTreeMap<String, String>,
}

/// `AuthorizationPolicy.spec.action`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    #[default]
    Allow,
    Deny,
    Audit,
    Custom,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
            Action::Custom => "CUSTOM",
        }
    }
}

/// `AuthorizationPolicy.spec`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub target_ref: Option<Value>,
    #[serde(default)]
    pub target_refs: Option<Vec<Value>>,
    /// `None` (absent) and `Some([])` differ only for validation (DENY needs rules).
    #[serde(default)]
    pub rules: Option<Vec<Rule>>,
    #[serde(default, deserialize_with = "nullable")]
    pub action: Action,
    #[serde(default)]
    pub provider: Option<Provider>,
}

/// `spec.provider` of a CUSTOM policy.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Provider {
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
}

/// One entry of `spec.rules`: `from`, `to` and `when` are ANDed.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub from: Option<Vec<RuleFrom>>,
    #[serde(default)]
    pub to: Option<Vec<RuleTo>>,
    #[serde(default, deserialize_with = "nullable")]
    pub when: Vec<Condition>,
}

/// An entry of `rules[].from`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleFrom {
    #[serde(default)]
    pub source: Option<Source>,
}

/// An entry of `rules[].to`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleTo {
    #[serde(default)]
    pub operation: Option<Operation>,
}

/// `rules[].from[].source`: fields are ANDed, values within a field ORed.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    #[serde(default, deserialize_with = "nullable")]
    pub principals: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_principals: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub request_principals: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_request_principals: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub namespaces: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_namespaces: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub service_accounts: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_service_accounts: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub ip_blocks: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_ip_blocks: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_remote_ip_blocks: Vec<String>,
}

/// `rules[].to[].operation`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    #[serde(default, deserialize_with = "nullable")]
    pub hosts: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_hosts: Vec<String>,
    #[serde(default, deserialize_with = "port_strings")]
    pub ports: Vec<String>,
    #[serde(default, deserialize_with = "port_strings")]
    pub not_ports: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub methods: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_methods: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub paths: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_paths: Vec<String>,
}

/// `rules[].when[]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    #[serde(default, deserialize_with = "nullable")]
    pub key: String,
    #[serde(default, deserialize_with = "nullable")]
    pub values: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_values: Vec<String>,
}

/// `PeerAuthentication.spec`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub mtls: Option<MutualTls>,
    /// Container port (as written: YAML keys arrive as strings) → mode.
    #[serde(default)]
    pub port_level_mtls: Option<BTreeMap<String, MutualTls>>,
}

/// `spec.mtls` / a `spec.portLevelMtls` value.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MutualTls {
    #[serde(default, deserialize_with = "nullable")]
    pub mode: ModeSetting,
}

/// `mtls.mode` as written; `UNSET` inherits from the enclosing level.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ModeSetting {
    #[default]
    Unset,
    Disable,
    Permissive,
    Strict,
}

impl ModeSetting {
    fn mode(self) -> Option<MtlsMode> {
        match self {
            ModeSetting::Unset => None,
            ModeSetting::Disable => Some(MtlsMode::Disable),
            ModeSetting::Permissive => Some(MtlsMode::Permissive),
            ModeSetting::Strict => Some(MtlsMode::Strict),
        }
    }
}

/// `null` (a key with nothing after it in YAML) as the default value.
fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// A list of port strings (`ports: ["8080"]`), with a hint when a number is written unquoted, as
/// Istio's schema rejects that.
fn port_strings<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Item {
        Str(String),
        Num(serde_json::Number),
    }
    let items: Option<Vec<Item>> = Option::deserialize(d)?;
    let mut out = Vec::new();
    for item in items.unwrap_or_default() {
        match item {
            Item::Str(s) => out.push(s),
            Item::Num(n) => {
                return Err(serde::de::Error::custom(format!(
                    "ports are strings: write \"{n}\" (quoted), not {n}"
                )))
            }
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Validation (called by the registry for every document) and parsing.
// ---------------------------------------------------------------------------------------------

pub(crate) fn field_error(path: impl Into<String>, reason: impl Into<String>) -> FieldError {
    FieldError {
        path: path.into(),
        reason: reason.into(),
    }
}

/// Deserializes `spec` of `raw` (absent or `null` = `{}`), with the field path of a type error.
fn parse_spec<T: DeserializeOwned + Default>(raw: &RawObject) -> Result<T, Vec<FieldError>> {
    match raw.value.get("spec") {
        None | Some(Value::Null) => Ok(T::default()),
        // The path-tracking deserializer is slower: only for the error message.
        Some(spec) => T::deserialize(spec)
            .or_else(|_| serde_path_to_error::deserialize(spec))
            .map_err(|e| {
                let path = e.path().to_string();
                let path = if path.is_empty() || path == "." {
                    "spec".to_string()
                } else {
                    format!("spec.{path}")
                };
                vec![field_error(path, e.into_inner().to_string())]
            }),
    }
}

/// Checks a document the registry keeps as a raw object: AuthorizationPolicy and
/// PeerAuthentication (`security.istio.io/v1`, `/v1beta1`) must be valid; anything else passes.
/// Errors carry the field path (`spec.rules[0].from[0].source.principals[1]`).
pub fn validate(raw: &RawObject) -> Result<(), Vec<FieldError>> {
    let errors = match policy_kind(&raw.api_version, &raw.kind) {
        None => return Ok(()),
        Some(Kind::Authorization) => {
            let spec: AuthorizationPolicySpec = parse_spec(raw)?;
            rbac::check(&spec)
        }
        Some(Kind::PeerAuthentication) => {
            let spec: PeerAuthenticationSpec = parse_spec(raw)?;
            peerauth::check(&spec)
        }
    };
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// Selector checks shared by both kinds (Istio's `validateWorkloadSelector`).
fn check_selector(selector: &Option<WorkloadSelector>, errors: &mut Vec<FieldError>) {
    let Some(selector) = selector else { return };
    for (k, v) in &selector.match_labels {
        let path = format!("spec.selector.matchLabels.{k}");
        if k.is_empty() {
            errors.push(field_error(
                "spec.selector.matchLabels",
                "empty label key is not supported",
            ));
        } else if k.contains('*') || v.contains('*') {
            errors.push(field_error(
                path,
                format!("wildcard is not supported in selector: \"{k}={v}\""),
            ));
        }
    }
}

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
    /// A DENY policy matched (HTTP-only conditions in it are ignored at L4).
    DenyPolicy,
    /// A CUSTOM policy matched: weft has no external authorizer, so it fails closed.
    CustomPolicy,
    /// ALLOW policies apply to the destination and none matched.
    NotAllowed,
    /// ALLOW policies apply and none matched; some of their rules need HTTP attributes and are
    /// not enforced at L4 (they never allow).
    NotAllowedHttpRules,
}

impl DenyReason {
    /// A stable snake_case name (`deny_policy`, `custom_policy`, `not_allowed`,
    /// `not_allowed_http_rules`).
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::DenyPolicy => "deny_policy",
            DenyReason::CustomPolicy => "custom_policy",
            DenyReason::NotAllowed => "not_allowed",
            DenyReason::NotAllowedHttpRules => "not_allowed_http_rules",
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
                "no ALLOW policy matched (rules with HTTP attributes are not enforced at L4 and never allow)"
            }
        })
    }
}

/// The outcome of [`PolicySet::authorize`].
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
    errors: Vec<String>,
    warnings: Vec<String>,
}

impl PolicySet {
    /// Compiles the AuthorizationPolicies and PeerAuthentications of `snapshot`. `root_namespace`
    /// is Istio's root namespace (usually [`DEFAULT_ROOT_NAMESPACE`]). Invalid objects are skipped
    /// and listed in [`PolicySet::errors`]; the policies that are only partly enforced at L4 are
    /// listed in [`PolicySet::warnings`] and logged (once per process and policy).
    pub fn build(snapshot: &Snapshot, root_namespace: &str) -> PolicySet {
        let mut set = PolicySet {
            root_namespace: root_namespace.to_string(),
            ..PolicySet::default()
        };
        let mut authz = rbac::Builder::new(root_namespace);
        let mut peer = peerauth::Builder::new(root_namespace);
        for raw in &snapshot.others {
            let Some(kind) = policy_kind(&raw.api_version, &raw.kind) else {
                continue;
            };
            let namespace = raw.namespace.as_deref().unwrap_or("default");
            let result = match kind {
                Kind::Authorization => parse_spec::<AuthorizationPolicySpec>(raw).and_then(|s| {
                    let errors = rbac::check(&s);
                    if errors.is_empty() {
                        authz.add(namespace, &raw.name, &s, &mut set.warnings);
                        Ok(())
                    } else {
                        Err(errors)
                    }
                }),
                Kind::PeerAuthentication => {
                    parse_spec::<PeerAuthenticationSpec>(raw).and_then(|s| {
                        let errors = peerauth::check(&s);
                        if errors.is_empty() {
                            peer.add(namespace, &raw.name, creation_timestamp(raw), &s);
                            Ok(())
                        } else {
                            Err(errors)
                        }
                    })
                }
            };
            if let Err(errors) = result {
                for e in errors {
                    let msg = format!("{} {namespace}/{}: {e}", raw.kind, raw.name);
                    warn_once(&format!("skipping invalid {msg}"));
                    set.errors.push(msg);
                }
            }
        }
        for w in &set.warnings {
            warn_once(w);
        }
        set.authz = authz.finish();
        set.peer = peer.finish();
        set
    }

    /// The root namespace the set was built with.
    pub fn root_namespace(&self) -> &str {
        &self.root_namespace
    }

    /// Number of AuthorizationPolicies enforced at L4 (ALLOW, DENY, CUSTOM; not AUDIT, not
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

    /// Objects skipped as invalid: `AuthorizationPolicy ns/name: path: reason`.
    pub fn errors(&self) -> &[String] {
        &self.errors
    }

    /// Policies only partly enforced at L4 (HTTP attributes, `targetRef`, AUDIT), one line each.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Decides whether a connection may reach `req.destination`.
    pub fn authorize(&self, req: &ConnRequest<'_>) -> Decision {
        self.authz.authorize(req)
    }

    /// AuthorizationPolicies that apply to `pod` (`ns/name`), in evaluation order: root-namespace
    /// ones first, then the pod's namespace's, each by name.
    pub fn applicable(&self, pod: &Pod) -> Vec<String> {
        self.authz.applicable(pod)
    }

    /// The mTLS mode for connections to container port `port` of `pod`.
    pub fn mtls_mode(&self, pod: &Pod, port: u16) -> MtlsMode {
        self.peer.mode(pod, port)
    }

    /// The mTLS mode of `pod` and its per-port overrides.
    pub fn mtls(&self, pod: &Pod) -> PodMtls {
        self.peer.pod(pod)
    }
}

/// `metadata.creationTimestamp` (RFC 3339), used to pick the oldest of competing
/// PeerAuthentications as Istio does.
fn creation_timestamp(raw: &RawObject) -> Option<time::OffsetDateTime> {
    let s = raw
        .value
        .get("metadata")?
        .get("creationTimestamp")?
        .as_str()?;
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
}

/// Logs `msg` as a warning unless it was already logged by this process (policy sets are rebuilt
/// on every registry change; an unchanged policy should not warn again).
fn warn_once(msg: &str) {
    static SEEN: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
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
