//! `security.istio.io`: AuthorizationPolicy and PeerAuthentication as Istio's API defines them
//! (`v1` and `v1beta1`), parsed and checked object by object as Istio's validation does (plus
//! wildcard placement), so the snapshot only ever holds valid ones and the policy engine only
//! compiles. Errors carry the field path (`spec.rules[0].from[0].source.principals[1]`).

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use time::OffsetDateTime;

use super::{creation_timestamp, done, field_error, nullable, parse_spec};
use crate::registry::{FieldError, RawObject};

/// An AuthorizationPolicy of the snapshot (valid).
#[derive(Debug, Clone, Serialize)]
pub struct AuthorizationPolicy {
    pub namespace: String,
    pub name: String,
    pub spec: AuthorizationPolicySpec,
}

/// A PeerAuthentication of the snapshot (valid).
#[derive(Debug, Clone, Serialize)]
pub struct PeerAuthentication {
    pub namespace: String,
    pub name: String,
    /// `metadata.creationTimestamp`: the oldest of competing policies wins, as in Istio.
    #[serde(with = "time::serde::rfc3339::option")]
    pub created: Option<OffsetDateTime>,
    pub spec: PeerAuthenticationSpec,
}

/// Parses and checks an AuthorizationPolicy.
pub fn authorization_policy(raw: &RawObject) -> Result<AuthorizationPolicy, Vec<FieldError>> {
    let spec: AuthorizationPolicySpec = parse_spec(raw)?;
    done(check_authorization_policy(&spec))?;
    Ok(AuthorizationPolicy {
        namespace: raw.namespace_or_default().to_string(),
        name: raw.name.clone(),
        spec,
    })
}

/// Parses and checks a PeerAuthentication.
pub fn peer_authentication(raw: &RawObject) -> Result<PeerAuthentication, Vec<FieldError>> {
    let spec: PeerAuthenticationSpec = parse_spec(raw)?;
    done(check_peer_authentication(&spec))?;
    Ok(PeerAuthentication {
        namespace: raw.namespace_or_default().to_string(),
        name: raw.name.clone(),
        created: creation_timestamp(raw),
        spec,
    })
}

// ---------------------------------------------------------------------------------------------
// Istio API types (security.istio.io), camelCase, unknown fields rejected as Istio's schema does.
// ---------------------------------------------------------------------------------------------

/// `spec.selector`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    #[serde(default, deserialize_with = "nullable")]
    pub match_labels: BTreeMap<String, String>,
}

/// `AuthorizationPolicy.spec.action`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PolicyAction {
    #[default]
    Allow,
    Deny,
    Audit,
    Custom,
}

impl PolicyAction {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyAction::Allow => "ALLOW",
            PolicyAction::Deny => "DENY",
            PolicyAction::Audit => "AUDIT",
            PolicyAction::Custom => "CUSTOM",
        }
    }
}

/// `AuthorizationPolicy.spec`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
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
    pub action: PolicyAction,
    #[serde(default)]
    pub provider: Option<Provider>,
}

/// `spec.provider` of a CUSTOM policy.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Provider {
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
}

/// One entry of `spec.rules`: `from`, `to` and `when` are ANDed.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
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
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleFrom {
    #[serde(default)]
    pub source: Option<RuleSource>,
}

/// An entry of `rules[].to`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleTo {
    #[serde(default)]
    pub operation: Option<Operation>,
}

/// `rules[].from[].source`: fields are ANDed, values within a field ORed.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleSource {
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
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
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
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
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
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
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
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MutualTls {
    #[serde(default, deserialize_with = "nullable")]
    pub mode: ModeSetting,
}

/// `mtls.mode` as written; `UNSET` inherits from the enclosing level.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ModeSetting {
    #[default]
    Unset,
    Disable,
    Permissive,
    Strict,
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
// Validation.
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// Validation (Istio's ValidateAuthorizationPolicy, plus wildcard placement).
// ---------------------------------------------------------------------------------------------

/// Every problem of an AuthorizationPolicy spec.
fn check_authorization_policy(spec: &AuthorizationPolicySpec) -> Vec<FieldError> {
    let mut errors = Vec::new();
    check_selector(&spec.selector, &mut errors);
    let has_target =
        spec.target_ref.is_some() || spec.target_refs.as_ref().is_some_and(|t| !t.is_empty());
    if spec.selector.is_some() && has_target {
        let path = if spec.target_ref.is_some() {
            "spec.targetRef"
        } else {
            "spec.targetRefs"
        };
        errors.push(field_error(
            path,
            "only one of targetRefs or selector can be set",
        ));
    }
    let no_rules = spec.rules.as_ref().is_none_or(|r| r.is_empty());
    match spec.action {
        PolicyAction::Custom => {
            if no_rules {
                errors.push(field_error(
                    "spec.rules",
                    "a CUSTOM policy without rules never triggers: add an empty rule `{}` to apply it to every connection",
                ));
            }
            if spec.provider.as_ref().is_none_or(|p| p.name.is_empty()) {
                errors.push(field_error(
                    "spec.provider.name",
                    "is required with action CUSTOM",
                ));
            }
        }
        PolicyAction::Deny if no_rules => errors.push(field_error(
            "spec.rules",
            "a DENY policy without rules never triggers: add an empty rule `{}` to deny every connection",
        )),
        _ => {}
    }
    if spec.provider.is_some() && spec.action != PolicyAction::Custom {
        errors.push(field_error(
            "spec.provider",
            format!(
                "is only allowed with action CUSTOM, found {}",
                spec.action.as_str()
            ),
        ));
    }
    for (i, rule) in spec.rules.iter().flatten().enumerate() {
        check_rule(rule, &format!("spec.rules[{i}]"), spec.action, &mut errors);
    }
    errors
}

fn check_rule(rule: &Rule, path: &str, action: PolicyAction, errors: &mut Vec<FieldError>) {
    if rule.from.as_ref().is_some_and(|f| f.is_empty()) {
        errors.push(field_error(
            format!("{path}.from"),
            "must not be empty (omit `from` to match any source)",
        ));
    }
    for (j, from) in rule.from.iter().flatten().enumerate() {
        let path = format!("{path}.from[{j}].source");
        match &from.source {
            None => errors.push(field_error(path, "is required")),
            Some(src) => check_source(src, &path, action, errors),
        }
    }
    if rule.to.as_ref().is_some_and(|t| t.is_empty()) {
        errors.push(field_error(
            format!("{path}.to"),
            "must not be empty (omit `to` to match any operation)",
        ));
    }
    for (j, to) in rule.to.iter().flatten().enumerate() {
        let path = format!("{path}.to[{j}].operation");
        match &to.operation {
            None => errors.push(field_error(path, "is required")),
            Some(op) => check_operation(op, &path, errors),
        }
    }
    for (j, cond) in rule.when.iter().enumerate() {
        check_condition(cond, &format!("{path}.when[{j}]"), action, errors);
    }
}

fn check_source(src: &RuleSource, path: &str, action: PolicyAction, errors: &mut Vec<FieldError>) {
    let lists: [(&str, &[String]); 12] = [
        ("principals", &src.principals),
        ("notPrincipals", &src.not_principals),
        ("requestPrincipals", &src.request_principals),
        ("notRequestPrincipals", &src.not_request_principals),
        ("namespaces", &src.namespaces),
        ("notNamespaces", &src.not_namespaces),
        ("serviceAccounts", &src.service_accounts),
        ("notServiceAccounts", &src.not_service_accounts),
        ("ipBlocks", &src.ip_blocks),
        ("notIpBlocks", &src.not_ip_blocks),
        ("remoteIpBlocks", &src.remote_ip_blocks),
        ("notRemoteIpBlocks", &src.not_remote_ip_blocks),
    ];
    if lists.iter().all(|(_, l)| l.is_empty()) {
        errors.push(field_error(
            path,
            "must not be empty (omit the `from` entry to match any source)",
        ));
        return;
    }
    let identity = [
        &src.principals,
        &src.not_principals,
        &src.namespaces,
        &src.not_namespaces,
    ];
    let accounts = [&src.service_accounts, &src.not_service_accounts];
    if identity.iter().any(|l| !l.is_empty()) && accounts.iter().any(|l| !l.is_empty()) {
        errors.push(field_error(
            path,
            "serviceAccounts cannot be combined with principals or namespaces",
        ));
    }
    if action == PolicyAction::Custom {
        for (name, list) in &lists[..8] {
            if !list.is_empty() {
                errors.push(field_error(
                    format!("{path}.{name}"),
                    "is not supported with action CUSTOM",
                ));
            }
        }
    }
    for (name, list) in lists.into_iter().filter(|(_, l)| !l.is_empty()) {
        let path = format!("{path}.{name}");
        match name {
            "ipBlocks" | "notIpBlocks" | "remoteIpBlocks" | "notRemoteIpBlocks" => {
                check_values(list, &path, errors, check_ip)
            }
            "serviceAccounts" | "notServiceAccounts" => check_service_accounts(list, &path, errors),
            _ => check_values(list, &path, errors, check_wildcard),
        }
    }
}

fn check_operation(op: &Operation, path: &str, errors: &mut Vec<FieldError>) {
    let lists: [(&str, &[String]); 8] = [
        ("hosts", &op.hosts),
        ("notHosts", &op.not_hosts),
        ("ports", &op.ports),
        ("notPorts", &op.not_ports),
        ("methods", &op.methods),
        ("notMethods", &op.not_methods),
        ("paths", &op.paths),
        ("notPaths", &op.not_paths),
    ];
    if lists.iter().all(|(_, l)| l.is_empty()) {
        errors.push(field_error(
            path,
            "must not be empty (omit the `to` entry to match any operation)",
        ));
        return;
    }
    for (name, list) in lists.into_iter().filter(|(_, l)| !l.is_empty()) {
        let path = format!("{path}.{name}");
        match name {
            "ports" | "notPorts" => check_values(list, &path, errors, check_port),
            "paths" | "notPaths" => check_values(list, &path, errors, check_path),
            _ => check_values(list, &path, errors, check_wildcard),
        }
    }
}

fn check_condition(
    cond: &Condition,
    path: &str,
    action: PolicyAction,
    errors: &mut Vec<FieldError>,
) {
    let key = cond.key.as_str();
    if key.is_empty() {
        errors.push(field_error(format!("{path}.key"), "is required"));
        return;
    }
    if cond.values.is_empty() && cond.not_values.is_empty() {
        errors.push(field_error(
            path,
            format!("at least one of `values` or `notValues` must be set for key {key}"),
        ));
        return;
    }
    let map_key = |prefix: &str| -> Result<(), String> {
        let rest = &key[prefix.len()..];
        match rest.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            Some(inner) if !inner.is_empty() => Ok(()),
            _ => Err(format!(
                "bad key {key:?}: should have the form {prefix}[name]"
            )),
        }
    };
    type Check = fn(&str) -> Result<(), String>;
    let checked: Result<Check, String> = match key {
        "source.ip" | "remote.ip" | "destination.ip" => Ok(check_ip),
        "destination.port" => Ok(check_port),
        "source.namespace" | "source.principal" => Ok(check_wildcard),
        "source.serviceAccount" => Ok(check_service_account),
        "request.auth.principal"
        | "request.auth.audiences"
        | "request.auth.presenter"
        | "connection.sni" => Ok(|_| Ok(())),
        "destination.namespace" => {
            Err(format!("attribute {key} is replaced by metadata.namespace"))
        }
        "destination.name" | "destination.user" => Err(format!(
            "deprecated attribute {key}: only supported in v1alpha1"
        )),
        k if k.starts_with("destination.labels") => Err(format!(
            "attribute {key} is replaced by the workload selector"
        )),
        k if k.starts_with("request.headers") => map_key("request.headers").map(|_| noop as Check),
        k if k.starts_with("request.experimental.inline.headers") => {
            map_key("request.experimental.inline.headers").map(|_| noop as Check)
        }
        k if k.starts_with("request.auth.claims") => {
            map_key("request.auth.claims").map(|_| noop as Check)
        }
        k if k.starts_with("experimental.envoy.filters.") => {
            match k.find('[').filter(|_| k.ends_with(']')) {
                Some(open) if open < k.len() - 2 => Ok(noop),
                _ => Err(format!("bad key {key:?}: should have the form a[b]")),
            }
        }
        _ => Err(format!("unknown attribute {key:?}")),
    };
    let check = match checked {
        Ok(check) => check,
        Err(reason) => {
            errors.push(field_error(format!("{path}.key"), reason));
            return;
        }
    };
    if action == PolicyAction::Custom
        && (matches!(
            key,
            "source.namespace" | "source.principal" | "source.serviceAccount"
        ) || key.starts_with("request.auth."))
    {
        errors.push(field_error(
            format!("{path}.key"),
            format!("{key} is not supported with action CUSTOM"),
        ));
    }
    for (name, list) in [("values", &cond.values), ("notValues", &cond.not_values)] {
        if !list.is_empty() {
            check_values(list, &format!("{path}.{name}"), errors, check);
        }
        if key == "source.serviceAccount" && list.len() > 16 {
            errors.push(field_error(
                format!("{path}.{name}"),
                "may not have more than 16 values",
            ));
        }
    }
}

fn noop(_: &str) -> Result<(), String> {
    Ok(())
}

fn check_values(
    list: &[String],
    path: &str,
    errors: &mut Vec<FieldError>,
    check: impl Fn(&str) -> Result<(), String>,
) {
    for (k, v) in list.iter().enumerate() {
        let reason = if v.is_empty() {
            Err("empty value is not allowed".to_string())
        } else {
            check(v)
        };
        if let Err(reason) = reason {
            errors.push(field_error(format!("{path}[{k}]"), reason));
        }
    }
}

fn check_ip(v: &str) -> Result<(), String> {
    parse_net(v)
        .map(|_| ())
        .ok_or_else(|| format!("invalid IP address or CIDR {v:?}"))
}

fn check_port(v: &str) -> Result<(), String> {
    // Istio accepts 0-65535 (0 never matches).
    match v.parse::<u16>() {
        Ok(_) if v.bytes().all(|b| b.is_ascii_digit()) => Ok(()),
        _ => Err(format!("invalid port {v:?}: expected a number 0-65535")),
    }
}

/// `*` alone, as a prefix or as a suffix; anywhere else it would be compared literally and
/// never match what the author meant.
fn check_wildcard(v: &str) -> Result<(), String> {
    if v == "*" {
        return Ok(());
    }
    let inner = v
        .strip_prefix('*')
        .or_else(|| v.strip_suffix('*'))
        .unwrap_or(v);
    if inner.contains('*') {
        Err(format!(
            "invalid value {v:?}: `*` is only supported alone, as a prefix or as a suffix"
        ))
    } else {
        Ok(())
    }
}

/// A `paths` value: Istio's wildcards, or a URI template whose segments are `{*}`, `{**}` (no
/// operator after it) or literal path characters (Istio's `CheckValidPathTemplate`), starting
/// with `/` (Envoy's template matcher rejects anything else).
fn check_path(v: &str) -> Result<(), String> {
    let template = v.contains("{*}") || v.contains("{**}");
    if !template && !v.contains(['{', '}']) {
        return check_wildcard(v).map_err(|e| {
            format!("{e}; use {{*}} for one path segment or {{**}} for any number of segments")
        });
    }
    if template && !v.starts_with('/') {
        return Err(format!("invalid path template {v:?}: must start with `/`"));
    }
    let mut after_any = false;
    for segment in v.trim_matches('/').split('/') {
        match segment {
            "{*}" | "{**}" if after_any => {
                return Err(format!(
                    "invalid path template {v:?}: {{**}} must be the last operator"
                ))
            }
            "{*}" => {}
            "{**}" => after_any = true,
            s if s.contains(['{', '}']) => {
                return Err(format!(
                    "invalid path {v:?}: `{{` and `}}` are only allowed in the whole-segment operators {{*}} and {{**}}"
                ))
            }
            s if !s.bytes().all(is_literal_path_char) || s.is_empty() => {
                return Err(format!(
                    "invalid path template {v:?}: segment {s:?} is not a valid literal (RFC 3986 path characters)"
                ))
            }
            _ => {}
        }
    }
    Ok(())
}

/// RFC 3986 `pchar` (unreserved, `%`, sub-delims but `*`, `:`, `@`), as Istio checks template
/// literals.
fn is_literal_path_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~%!$&'()+,;:@=".contains(&b)
}

fn check_service_accounts(list: &[String], path: &str, errors: &mut Vec<FieldError>) {
    if list.len() > 16 {
        errors.push(field_error(path, "may not have more than 16 values"));
    }
    check_values(list, path, errors, check_service_account);
}

/// `serviceAccount` or `namespace/serviceAccount`, no wildcard.
fn check_service_account(v: &str) -> Result<(), String> {
    let form = "expected `serviceAccount` or `namespace/serviceAccount`";
    if v.contains('*') {
        return Err(format!("invalid value {v:?}: wildcards are not supported"));
    }
    if v.len() > 320 {
        return Err(format!("invalid value {v:?}: longer than 320 characters"));
    }
    let ok = match v.split_once('/') {
        Some((ns, sa)) => !ns.is_empty() && !sa.is_empty() && !sa.contains('/'),
        None => true,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("invalid value {v:?}: {form}"))
    }
}

/// An IP address (a /32 or /128) or a CIDR; IPv4-mapped IPv6 addresses are taken as IPv4.
pub fn parse_net(v: &str) -> Option<IpNet> {
    if v.contains('/') {
        v.parse::<IpNet>().ok()
    } else {
        v.parse::<IpAddr>()
            .ok()
            .map(|ip| IpNet::from(ip.to_canonical()))
    }
}

/// Every problem of a PeerAuthentication spec (Istio's ValidatePeerAuthentication).
fn check_peer_authentication(spec: &PeerAuthenticationSpec) -> Vec<FieldError> {
    let mut errors = Vec::new();
    check_selector(&spec.selector, &mut errors);
    let Some(ports) = &spec.port_level_mtls else {
        return errors;
    };
    let no_selector = spec
        .selector
        .as_ref()
        .is_none_or(|s| s.match_labels.is_empty());
    if ports.is_empty() {
        errors.push(field_error(
            "spec.portLevelMtls",
            "must have at least one port when present",
        ));
    } else if no_selector {
        errors.push(field_error(
            "spec.portLevelMtls",
            "needs a workload selector: a mesh- or namespace-wide PeerAuthentication cannot set port-level mTLS",
        ));
    }
    for key in ports.keys() {
        if parse_port(key).is_none() {
            errors.push(field_error(
                format!("spec.portLevelMtls.{key}"),
                format!("invalid port {key:?}: expected a number 1-65535"),
            ));
        }
    }
    errors
}

pub fn parse_port(s: &str) -> Option<u16> {
    s.bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| s.parse::<u16>().ok())
        .flatten()
        .filter(|p| *p != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_checks() {
        assert!(check_wildcard("*").is_ok());
        assert!(check_wildcard("*.x").is_ok());
        assert!(check_wildcard("x*").is_ok());
        assert!(check_wildcard("a/*/b").is_err());
        assert!(check_wildcard("*a*").is_err());
        assert!(check_port("0").is_ok());
        assert!(check_port("65535").is_ok());
        assert!(check_port("65536").is_err());
        assert!(check_port("+80").is_err());
        assert!(check_ip("10.0.0.1").is_ok());
        assert!(check_ip("10.0.0.0/8").is_ok());
        assert!(check_ip("fd00::/8").is_ok());
        assert!(check_ip("10.0.0.0/33").is_err());
        assert!(check_ip("10.0.0").is_err());
        assert!(check_service_account("a/b").is_ok());
        assert!(check_service_account("b").is_ok());
        assert!(check_service_account("a/").is_err());
        assert!(check_service_account("a/b/c").is_err());
        assert!(check_service_account("a/*").is_err());
        assert!(check_path("/api/*").is_ok());
        assert!(check_path("*.png").is_ok());
        assert!(check_path("*").is_ok());
        assert!(check_path("/api/*/users")
            .unwrap_err()
            .contains("use {*} for one path segment"));
        assert!(check_path("/users/{*}/posts/{**}").is_ok());
        assert!(check_path("/{**}/edit/").is_ok());
        assert!(check_path("/{**}/{*}")
            .unwrap_err()
            .contains("last operator"));
        assert!(check_path("/{**}/{**}").is_err());
        assert!(check_path("users/{*}")
            .unwrap_err()
            .contains("start with `/`"));
        assert!(check_path("/a/{id}").unwrap_err().contains("whole-segment"));
        assert!(check_path("/a/x{*}").is_err());
        assert!(check_path("/a//{*}").unwrap_err().contains("segment \"\""));
        assert!(check_path("/a b/{*}").is_err());
    }
}
