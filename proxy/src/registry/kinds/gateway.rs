//! `gateway.networking.k8s.io`: HTTPRoute (`v1`, `v1beta1`) and GRPCRoute (`v1`, `v1alpha2`) as
//! the Gateway API defines them (`apis/v1/httproute_types.go`, `grpcroute_types.go`), parsed and
//! checked with the API's own validation (its OpenAPI limits and CEL rules), so the route table
//! only compiles valid ones. weft is a mesh (GAMMA) implementation: a route applies through a
//! `parentRef` to a Service (`group: ""` or `core`, `kind: Service`); parentRefs to Gateways are
//! accepted and ignored (weft runs no gateway).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::networking::{check_header_name, check_regex, is_dns1123_label, Duration};
use super::{done, field_error, nullable, parse_spec, Meta};
use crate::registry::{FieldError, RawObject};

/// An HTTPRoute of the snapshot (valid).
#[derive(Debug, Clone, Serialize)]
pub struct HttpRoute {
    #[serde(flatten)]
    pub meta: Meta,
    pub spec: HttpRouteSpec,
}

/// A GRPCRoute of the snapshot (valid).
#[derive(Debug, Clone, Serialize)]
pub struct GrpcRoute {
    #[serde(flatten)]
    pub meta: Meta,
    pub spec: GrpcRouteSpec,
}

/// Parses and checks an HTTPRoute.
pub fn http_route(raw: &RawObject, origin: Option<String>) -> Result<HttpRoute, Vec<FieldError>> {
    let spec: HttpRouteSpec = parse_spec(raw)?;
    done(check_http_route(&spec))?;
    Ok(HttpRoute {
        meta: Meta::of(raw, origin),
        spec,
    })
}

/// Parses and checks a GRPCRoute.
pub fn grpc_route(raw: &RawObject, origin: Option<String>) -> Result<GrpcRoute, Vec<FieldError>> {
    let spec: GrpcRouteSpec = parse_spec(raw)?;
    done(check_grpc_route(&spec))?;
    Ok(GrpcRoute {
        meta: Meta::of(raw, origin),
        spec,
    })
}

// ---------------------------------------------------------------------------------------------
// Types.
// ---------------------------------------------------------------------------------------------

/// `ParentReference`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ParentReference {
    /// Default `gateway.networking.k8s.io`.
    #[serde(default)]
    pub group: Option<String>,
    /// Default `Gateway`.
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
    #[serde(default)]
    pub section_name: Option<String>,
    #[serde(default)]
    pub port: Option<u32>,
}

impl ParentReference {
    /// A Service (`group: ""` or `core`, `kind: Service`): the route is a mesh (GAMMA) route.
    pub fn is_service(&self) -> bool {
        self.kind.as_deref() == Some("Service")
            && matches!(self.group.as_deref(), Some("" | "core"))
    }
}

/// `BackendObjectReference` (with `weight` and `filters` for an `HTTPBackendRef`).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendRef {
    /// Default `""` (core).
    #[serde(default)]
    pub group: Option<String>,
    /// Default `Service`.
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub port: Option<u32>,
    /// Default 1.
    #[serde(default)]
    pub weight: Option<i32>,
    #[serde(default, deserialize_with = "nullable")]
    pub filters: Vec<HttpRouteFilter>,
}

impl BackendRef {
    /// A core Service (the defaults).
    pub fn is_service(&self) -> bool {
        matches!(self.group.as_deref(), None | Some("" | "core"))
            && matches!(self.kind.as_deref(), None | Some("Service"))
    }

    /// `weight`, default 1.
    pub fn weight(&self) -> u32 {
        self.weight.map_or(1, |w| w.max(0) as u32)
    }
}

/// A backend reference without weight or filters (mirror targets).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendObjectReference {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub port: Option<u32>,
}

/// `HTTPRoute.spec`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteSpec {
    #[serde(default, deserialize_with = "nullable")]
    pub parent_refs: Vec<ParentReference>,
    #[serde(default, deserialize_with = "nullable")]
    pub hostnames: Vec<String>,
    /// Absent: one rule matching every request (the API's default).
    #[serde(default)]
    pub rules: Option<Vec<HttpRouteRule>>,
}

/// `HTTPRouteRule`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteRule {
    #[serde(default)]
    pub name: Option<String>,
    /// Absent: one `PathPrefix /` match.
    #[serde(default)]
    pub matches: Option<Vec<HttpRouteMatch>>,
    #[serde(default, deserialize_with = "nullable")]
    pub filters: Vec<HttpRouteFilter>,
    #[serde(default, deserialize_with = "nullable")]
    pub backend_refs: Vec<BackendRef>,
    #[serde(default)]
    pub timeouts: Option<HttpRouteTimeouts>,
    #[serde(default)]
    pub retry: Option<HttpRouteRetry>,
    #[serde(default)]
    pub session_persistence: Option<serde_json::Value>,
}

impl HttpRouteRule {
    /// The matches in force: those written, or the default `PathPrefix /`.
    pub fn matches(&self) -> Vec<HttpRouteMatch> {
        match &self.matches {
            Some(m) if !m.is_empty() => m.clone(),
            _ => vec![HttpRouteMatch::default()],
        }
    }
}

/// `HTTPRouteTimeouts`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteTimeouts {
    #[serde(default)]
    pub request: Option<Duration>,
    #[serde(default)]
    pub backend_request: Option<Duration>,
}

/// `HTTPRouteRetry`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteRetry {
    #[serde(default, deserialize_with = "nullable")]
    pub codes: Vec<u32>,
    #[serde(default)]
    pub attempts: Option<i32>,
    #[serde(default)]
    pub backoff: Option<Duration>,
}

/// `PathMatchType`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum PathMatchType {
    Exact,
    #[default]
    PathPrefix,
    RegularExpression,
}

/// `HTTPPathMatch`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpPathMatch {
    #[serde(default, rename = "type", deserialize_with = "nullable")]
    pub kind: PathMatchType,
    /// Default `/`.
    #[serde(default)]
    pub value: Option<String>,
}

impl HttpPathMatch {
    pub fn value(&self) -> &str {
        self.value.as_deref().unwrap_or("/")
    }
}

/// `HeaderMatchType` / `QueryParamMatchType`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum ValueMatchType {
    #[default]
    Exact,
    RegularExpression,
}

/// `HTTPHeaderMatch` / `HTTPQueryParamMatch` / `GRPCHeaderMatch`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ValueMatch {
    #[serde(default, rename = "type", deserialize_with = "nullable")]
    pub kind: ValueMatchType,
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
    #[serde(default, deserialize_with = "nullable")]
    pub value: String,
}

/// `HTTPRouteMatch`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteMatch {
    #[serde(default)]
    pub path: Option<HttpPathMatch>,
    #[serde(default, deserialize_with = "nullable")]
    pub headers: Vec<ValueMatch>,
    #[serde(default, deserialize_with = "nullable")]
    pub query_params: Vec<ValueMatch>,
    #[serde(default)]
    pub method: Option<String>,
}

impl HttpRouteMatch {
    /// The path match in force (default `PathPrefix /`).
    pub fn path(&self) -> HttpPathMatch {
        self.path.clone().unwrap_or_default()
    }
}

/// `HTTPRouteFilter` (and `GRPCRouteFilter`, a subset).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteFilter {
    #[serde(default, rename = "type", deserialize_with = "nullable")]
    pub kind: String,
    #[serde(default)]
    pub request_header_modifier: Option<HeaderFilter>,
    #[serde(default)]
    pub response_header_modifier: Option<HeaderFilter>,
    #[serde(default)]
    pub request_mirror: Option<RequestMirrorFilter>,
    #[serde(default)]
    pub request_redirect: Option<RequestRedirectFilter>,
    #[serde(default)]
    pub url_rewrite: Option<UrlRewriteFilter>,
    #[serde(default)]
    pub cors: Option<serde_json::Value>,
    #[serde(default)]
    pub external_auth: Option<serde_json::Value>,
    #[serde(default)]
    pub extension_ref: Option<serde_json::Value>,
}

/// `HTTPHeader`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpHeader {
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
    #[serde(default, deserialize_with = "nullable")]
    pub value: String,
}

/// `HTTPHeaderFilter`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderFilter {
    #[serde(default, deserialize_with = "nullable")]
    pub set: Vec<HttpHeader>,
    #[serde(default, deserialize_with = "nullable")]
    pub add: Vec<HttpHeader>,
    #[serde(default, deserialize_with = "nullable")]
    pub remove: Vec<String>,
}

/// `HTTPRequestMirrorFilter`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestMirrorFilter {
    #[serde(default)]
    pub backend_ref: Option<BackendObjectReference>,
    #[serde(default)]
    pub percent: Option<i32>,
    #[serde(default)]
    pub fraction: Option<Fraction>,
}

impl RequestMirrorFilter {
    /// The share of requests mirrored, 0–100 (default all).
    pub fn share(&self) -> f64 {
        match (&self.percent, &self.fraction) {
            (Some(p), _) => f64::from(*p),
            (None, Some(f)) if f.denominator > 0 => {
                100.0 * f64::from(f.numerator) / f64::from(f.denominator)
            }
            _ => 100.0,
        }
    }
}

/// `Fraction`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Fraction {
    #[serde(default, deserialize_with = "nullable")]
    pub numerator: i32,
    /// Default 100.
    #[serde(default = "hundred")]
    pub denominator: i32,
}

fn hundred() -> i32 {
    100
}

/// `HTTPPathModifier`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathModifier {
    #[serde(default, rename = "type", deserialize_with = "nullable")]
    pub kind: String,
    #[serde(default)]
    pub replace_full_path: Option<String>,
    #[serde(default)]
    pub replace_prefix_match: Option<String>,
}

/// `HTTPRequestRedirectFilter`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestRedirectFilter {
    #[serde(default)]
    pub scheme: Option<String>,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub path: Option<PathModifier>,
    #[serde(default)]
    pub port: Option<u32>,
    /// Default 302.
    #[serde(default)]
    pub status_code: Option<u32>,
}

/// `HTTPURLRewriteFilter`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UrlRewriteFilter {
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub path: Option<PathModifier>,
}

/// `GRPCRoute.spec`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteSpec {
    #[serde(default, deserialize_with = "nullable")]
    pub parent_refs: Vec<ParentReference>,
    #[serde(default, deserialize_with = "nullable")]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Option<Vec<GrpcRouteRule>>,
}

/// `GRPCRouteRule`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteRule {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub matches: Vec<GrpcRouteMatch>,
    #[serde(default, deserialize_with = "nullable")]
    pub filters: Vec<HttpRouteFilter>,
    #[serde(default, deserialize_with = "nullable")]
    pub backend_refs: Vec<BackendRef>,
    #[serde(default)]
    pub session_persistence: Option<serde_json::Value>,
}

/// `GRPCRouteMatch`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteMatch {
    #[serde(default)]
    pub method: Option<GrpcMethodMatch>,
    #[serde(default, deserialize_with = "nullable")]
    pub headers: Vec<ValueMatch>,
}

/// `GRPCMethodMatch`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcMethodMatch {
    #[serde(default, rename = "type", deserialize_with = "nullable")]
    pub kind: ValueMatchType,
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub method: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Validation: the API's OpenAPI limits and CEL rules.
// ---------------------------------------------------------------------------------------------

const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

fn check_parent_refs(refs: &[ParentReference], errors: &mut Vec<FieldError>) {
    if refs.len() > 32 {
        errors.push(field_error("spec.parentRefs", "must have at most 32 items"));
    }
    for (i, p) in refs.iter().enumerate() {
        let path = format!("spec.parentRefs[{i}]");
        if p.name.is_empty() {
            errors.push(field_error(format!("{path}.name"), "is required"));
        }
        if let Some(port) = p.port {
            if !(1..=65535).contains(&port) {
                errors.push(field_error(
                    format!("{path}.port"),
                    format!("port {port} out of range 1-65535"),
                ));
            }
        }
        if let Some(ns) = &p.namespace {
            if !is_dns1123_label(ns) {
                errors.push(field_error(
                    format!("{path}.namespace"),
                    format!("invalid namespace {ns:?}"),
                ));
            }
        }
    }
    // CEL on CommonRouteSpec: sectionName/port combinations must be unique per parent.
    let mut seen = BTreeSet::new();
    for (i, p) in refs.iter().enumerate() {
        let key = (
            p.group
                .clone()
                .unwrap_or_else(|| "gateway.networking.k8s.io".into()),
            p.kind.clone().unwrap_or_else(|| "Gateway".into()),
            p.namespace.clone(),
            p.name.clone(),
            p.section_name.clone(),
            p.port,
        );
        if !seen.insert(key) {
            errors.push(field_error(
                format!("spec.parentRefs[{i}]"),
                "sectionName or port must be unique when parentRefs includes 2 or more references to the same parent",
            ));
        }
    }
}

fn check_hostnames(hostnames: &[String], errors: &mut Vec<FieldError>) {
    if hostnames.len() > 16 {
        errors.push(field_error("spec.hostnames", "must have at most 16 items"));
    }
    for (i, h) in hostnames.iter().enumerate() {
        let rest = h.strip_prefix("*.").unwrap_or(h);
        let ok = h.len() <= 253
            && h.parse::<std::net::IpAddr>().is_err()
            && !rest.is_empty()
            && rest.split('.').all(is_dns1123_label);
        if !ok {
            errors.push(field_error(
                format!("spec.hostnames[{i}]"),
                format!("invalid hostname {h:?}: an RFC 1123 hostname, optionally prefixed by `*.`; no IP addresses"),
            ));
        }
    }
}

fn check_value_matches(
    list: &[ValueMatch],
    path: &str,
    header: bool,
    errors: &mut Vec<FieldError>,
) {
    if list.len() > 16 {
        errors.push(field_error(path, "must have at most 16 items"));
    }
    for (k, m) in list.iter().enumerate() {
        let p = format!("{path}[{k}]");
        if header {
            if let Err(e) = check_header_name(&m.name) {
                errors.push(field_error(format!("{p}.name"), e));
            }
        } else if m.name.is_empty() {
            errors.push(field_error(format!("{p}.name"), "is required"));
        }
        if m.value.is_empty() {
            errors.push(field_error(format!("{p}.value"), "must not be empty"));
        }
        if m.kind == ValueMatchType::RegularExpression && !m.value.is_empty() {
            if let Err(e) = check_regex(&m.value) {
                errors.push(field_error(format!("{p}.value"), e));
            }
        }
    }
}

/// The characters a path value may hold (the API's pattern for Exact and PathPrefix).
fn path_chars_ok(v: &str) -> bool {
    let b = v.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'%' {
            let hex = |j: usize| b.get(j).is_some_and(|h| h.is_ascii_hexdigit());
            if !(hex(i + 1) && hex(i + 2)) {
                return false;
            }
            i += 3;
            continue;
        }
        if !(c.is_ascii_alphanumeric() || b"-/._~!$&'()*+,;=:@".contains(&c)) {
            return false;
        }
        i += 1;
    }
    !b.is_empty()
}

fn check_path_match(p: &HttpPathMatch, path: &str, errors: &mut Vec<FieldError>) {
    let v = p.value();
    if v.len() > 1024 {
        errors.push(field_error(
            format!("{path}.value"),
            "must be at most 1024 characters",
        ));
    }
    match p.kind {
        PathMatchType::RegularExpression => {
            if let Err(e) = check_regex(v) {
                errors.push(field_error(format!("{path}.value"), e));
            }
        }
        PathMatchType::Exact | PathMatchType::PathPrefix => {
            let rules: [(bool, &str); 10] = [
                (
                    !v.starts_with('/'),
                    "value must be an absolute path and start with '/' when type one of ['Exact', 'PathPrefix']",
                ),
                (v.contains("//"), "must not contain '//' when type one of ['Exact', 'PathPrefix']"),
                (v.contains("/./"), "must not contain '/./' when type one of ['Exact', 'PathPrefix']"),
                (v.contains("/../"), "must not contain '/../' when type one of ['Exact', 'PathPrefix']"),
                (v.contains("%2f"), "must not contain '%2f' when type one of ['Exact', 'PathPrefix']"),
                (v.contains("%2F"), "must not contain '%2F' when type one of ['Exact', 'PathPrefix']"),
                (v.contains('#'), "must not contain '#' when type one of ['Exact', 'PathPrefix']"),
                (v.ends_with("/.."), "must not end with '/..' when type one of ['Exact', 'PathPrefix']"),
                (v.ends_with("/."), "must not end with '/.' when type one of ['Exact', 'PathPrefix']"),
                (
                    !path_chars_ok(v),
                    "must only contain valid characters (matching ^(?:[-A-Za-z0-9/._~!$&'()*+,;=:@]|[%][0-9a-fA-F]{2})+$) for types ['Exact', 'PathPrefix']",
                ),
            ];
            for (bad, reason) in rules {
                if bad {
                    errors.push(field_error(format!("{path}.value"), reason));
                }
            }
        }
    }
}

fn check_header_filter(f: &HeaderFilter, path: &str, errors: &mut Vec<FieldError>) {
    let mut names = BTreeSet::new();
    for (field, list) in [("set", &f.set), ("add", &f.add)] {
        if list.len() > 16 {
            errors.push(field_error(
                format!("{path}.{field}"),
                "must have at most 16 items",
            ));
        }
        for (k, h) in list.iter().enumerate() {
            let p = format!("{path}.{field}[{k}]");
            if let Err(e) = check_header_name(&h.name) {
                errors.push(field_error(format!("{p}.name"), e));
            }
            if h.value.is_empty() || h.value.len() > 4096 {
                errors.push(field_error(
                    format!("{p}.value"),
                    "must be 1-4096 characters",
                ));
            }
            if !names.insert(h.name.to_ascii_lowercase()) {
                errors.push(field_error(
                    format!("{p}.name"),
                    format!("header {:?} is modified more than once: only one action per header name is allowed", h.name),
                ));
            }
        }
    }
    for (k, h) in f.remove.iter().enumerate() {
        let p = format!("{path}.remove[{k}]");
        if let Err(e) = check_header_name(h) {
            errors.push(field_error(p.clone(), e));
        }
        if !names.insert(h.to_ascii_lowercase()) {
            errors.push(field_error(
                p,
                format!("header {h:?} is modified more than once: only one action per header name is allowed"),
            ));
        }
    }
}

fn check_backend_object(
    group: &Option<String>,
    kind: &Option<String>,
    name: &str,
    namespace: &Option<String>,
    port: Option<u32>,
    path: &str,
    errors: &mut Vec<FieldError>,
) {
    if name.is_empty() {
        errors.push(field_error(format!("{path}.name"), "is required"));
    }
    let service = matches!(group.as_deref(), None | Some("" | "core"))
        && matches!(kind.as_deref(), None | Some("Service"));
    if service && port.is_none() {
        errors.push(field_error(
            format!("{path}.port"),
            "Must have port for Service reference",
        ));
    }
    if !service {
        errors.push(field_error(
            format!("{path}.kind"),
            format!(
                "unsupported backend {}/{}: weft routes to core Services only",
                group.as_deref().unwrap_or(""),
                kind.as_deref().unwrap_or("Service")
            ),
        ));
    }
    if let Some(p) = port {
        if !(1..=65535).contains(&p) {
            errors.push(field_error(
                format!("{path}.port"),
                format!("port {p} out of range 1-65535"),
            ));
        }
    }
    if let Some(ns) = namespace {
        if !is_dns1123_label(ns) {
            errors.push(field_error(
                format!("{path}.namespace"),
                format!("invalid namespace {ns:?}"),
            ));
        }
    }
}

fn check_path_modifier(m: &PathModifier, path: &str, errors: &mut Vec<FieldError>) {
    match m.kind.as_str() {
        "ReplaceFullPath" => {
            if m.replace_full_path.is_none() {
                errors.push(field_error(
                    path,
                    "replaceFullPath must be specified when type is set to 'ReplaceFullPath'",
                ));
            }
            if m.replace_prefix_match.is_some() {
                errors.push(field_error(
                    path,
                    "type must be 'ReplacePrefixMatch' when replacePrefixMatch is set",
                ));
            }
        }
        "ReplacePrefixMatch" => {
            if m.replace_prefix_match.is_none() {
                errors.push(field_error(
                    path,
                    "replacePrefixMatch must be specified when type is set to 'ReplacePrefixMatch'",
                ));
            }
            if m.replace_full_path.is_some() {
                errors.push(field_error(
                    path,
                    "type must be 'ReplaceFullPath' when replaceFullPath is set",
                ));
            }
        }
        other => errors.push(field_error(
            format!("{path}.type"),
            format!("unsupported value {other:?}: expected ReplaceFullPath or ReplacePrefixMatch"),
        )),
    }
}

/// Checks a list of filters; `grpc` restricts the types to GRPCRoute's.
fn check_filters(
    filters: &[HttpRouteFilter],
    path: &str,
    grpc: bool,
    errors: &mut Vec<FieldError>,
) {
    if filters.len() > 16 {
        errors.push(field_error(path, "must have at most 16 items"));
    }
    let count = |t: &str| filters.iter().filter(|f| f.kind == t).count();
    for t in [
        "CORS",
        "RequestHeaderModifier",
        "ResponseHeaderModifier",
        "RequestRedirect",
        "URLRewrite",
    ] {
        if count(t) > 1 {
            errors.push(field_error(path, format!("{t} filter cannot be repeated")));
        }
    }
    if count("RequestRedirect") > 0 && count("URLRewrite") > 0 {
        errors.push(field_error(
            path,
            "May specify either httpRouteFilterRequestRedirect or httpRouteFilterRequestRewrite, but not both",
        ));
    }
    for (k, f) in filters.iter().enumerate() {
        let p = format!("{path}[{k}]");
        let fields: [(&str, &str, bool); 8] = [
            (
                "RequestHeaderModifier",
                "requestHeaderModifier",
                f.request_header_modifier.is_some(),
            ),
            (
                "ResponseHeaderModifier",
                "responseHeaderModifier",
                f.response_header_modifier.is_some(),
            ),
            ("RequestMirror", "requestMirror", f.request_mirror.is_some()),
            (
                "RequestRedirect",
                "requestRedirect",
                f.request_redirect.is_some(),
            ),
            ("URLRewrite", "urlRewrite", f.url_rewrite.is_some()),
            ("CORS", "cors", f.cors.is_some()),
            ("ExternalAuth", "externalAuth", f.external_auth.is_some()),
            ("ExtensionRef", "extensionRef", f.extension_ref.is_some()),
        ];
        let allowed: &[&str] = if grpc {
            &[
                "RequestHeaderModifier",
                "ResponseHeaderModifier",
                "RequestMirror",
                "ExtensionRef",
            ]
        } else {
            &[
                "RequestHeaderModifier",
                "ResponseHeaderModifier",
                "RequestMirror",
                "RequestRedirect",
                "URLRewrite",
                "ExtensionRef",
                "CORS",
                "ExternalAuth",
            ]
        };
        if !allowed.contains(&f.kind.as_str()) {
            errors.push(field_error(
                format!("{p}.type"),
                format!(
                    "unsupported value {:?}: supported values: {}",
                    f.kind,
                    allowed.join(", ")
                ),
            ));
            continue;
        }
        for (t, field, set) in fields {
            if set && f.kind != t {
                errors.push(field_error(
                    format!("{p}.{field}"),
                    format!("filter.{field} must be nil if the filter.type is not {t}"),
                ));
            }
            if !set && f.kind == t {
                errors.push(field_error(
                    p.clone(),
                    format!("filter.{field} must be specified for {t} filter.type"),
                ));
            }
        }
        match f.kind.as_str() {
            // weft has no extension filters, no CORS and no external authorization yet: the API
            // says such a filter must not be skipped, so the route is refused.
            "ExtensionRef" | "CORS" | "ExternalAuth" => errors.push(field_error(
                format!("{p}.type"),
                format!("{} filters are not supported by weft", f.kind),
            )),
            _ => {}
        }
        if let Some(h) = &f.request_header_modifier {
            check_header_filter(h, &format!("{p}.requestHeaderModifier"), errors);
        }
        if let Some(h) = &f.response_header_modifier {
            check_header_filter(h, &format!("{p}.responseHeaderModifier"), errors);
        }
        if let Some(m) = &f.request_mirror {
            let mp = format!("{p}.requestMirror");
            match &m.backend_ref {
                None => errors.push(field_error(format!("{mp}.backendRef"), "is required")),
                Some(b) => check_backend_object(
                    &b.group,
                    &b.kind,
                    &b.name,
                    &b.namespace,
                    b.port,
                    &format!("{mp}.backendRef"),
                    errors,
                ),
            }
            if m.percent.is_some() && m.fraction.is_some() {
                errors.push(field_error(
                    mp.clone(),
                    "Only one of percent or fraction may be specified in HTTPRequestMirrorFilter",
                ));
            }
            if m.percent.is_some_and(|p| !(0..=100).contains(&p)) {
                errors.push(field_error(format!("{mp}.percent"), "must be 0-100"));
            }
            if let Some(fr) = &m.fraction {
                if fr.numerator < 0 || fr.denominator <= 0 || fr.numerator > fr.denominator {
                    errors.push(field_error(
                        format!("{mp}.fraction"),
                        "numerator must be 0 or more and at most the denominator, which must be 1 or more",
                    ));
                }
            }
        }
        if let Some(r) = &f.request_redirect {
            let rp = format!("{p}.requestRedirect");
            if let Some(s) = &r.scheme {
                if s != "http" && s != "https" {
                    errors.push(field_error(
                        format!("{rp}.scheme"),
                        format!("unsupported value {s:?}: supported values: \"http\", \"https\""),
                    ));
                }
            }
            if let Some(c) = r.status_code {
                if ![301, 302, 303, 307, 308].contains(&c) {
                    errors.push(field_error(
                        format!("{rp}.statusCode"),
                        format!("unsupported value {c}: supported values: 301, 302, 303, 307, 308"),
                    ));
                }
            }
            if let Some(port) = r.port {
                if !(1..=65535).contains(&port) {
                    errors.push(field_error(format!("{rp}.port"), "must be 1-65535"));
                }
            }
            if let Some(m) = &r.path {
                check_path_modifier(m, &format!("{rp}.path"), errors);
            }
        }
        if let Some(r) = &f.url_rewrite {
            if let Some(m) = &r.path {
                check_path_modifier(m, &format!("{p}.urlRewrite.path"), errors);
            }
        }
    }
}

/// The rule's filters (and those of its backends) that replace a prefix need exactly one
/// `PathPrefix` match (CEL on HTTPRouteRule).
fn check_prefix_rewrites(rule: &HttpRouteRule, path: &str, errors: &mut Vec<FieldError>) {
    let one_prefix = match &rule.matches {
        Some(m) if m.len() == 1 => m[0]
            .path
            .as_ref()
            .is_some_and(|p| p.kind == PathMatchType::PathPrefix),
        _ => false,
    };
    if one_prefix {
        return;
    }
    let uses = |filters: &[HttpRouteFilter], redirect: bool| {
        filters.iter().any(|f| {
            let m = if redirect {
                f.request_redirect.as_ref().and_then(|r| r.path.as_ref())
            } else {
                f.url_rewrite.as_ref().and_then(|r| r.path.as_ref())
            };
            m.is_some_and(|m| m.kind == "ReplacePrefixMatch" && m.replace_prefix_match.is_some())
        })
    };
    if uses(&rule.filters, true) {
        errors.push(field_error(
            format!("{path}.filters"),
            "When using RequestRedirect filter with path.replacePrefixMatch, exactly one PathPrefix match must be specified",
        ));
    }
    if uses(&rule.filters, false) {
        errors.push(field_error(
            format!("{path}.filters"),
            "When using URLRewrite filter with path.replacePrefixMatch, exactly one PathPrefix match must be specified",
        ));
    }
    if rule.backend_refs.iter().any(|b| uses(&b.filters, true)) {
        errors.push(field_error(
            format!("{path}.backendRefs"),
            "Within backendRefs, when using RequestRedirect filter with path.replacePrefixMatch, exactly one PathPrefix match must be specified",
        ));
    }
    if rule.backend_refs.iter().any(|b| uses(&b.filters, false)) {
        errors.push(field_error(
            format!("{path}.backendRefs"),
            "Within backendRefs, When using URLRewrite filter with path.replacePrefixMatch, exactly one PathPrefix match must be specified",
        ));
    }
}

fn check_backend_refs(refs: &[BackendRef], path: &str, grpc: bool, errors: &mut Vec<FieldError>) {
    if refs.len() > 16 {
        errors.push(field_error(path, "must have at most 16 items"));
    }
    for (k, b) in refs.iter().enumerate() {
        let p = format!("{path}[{k}]");
        check_backend_object(&b.group, &b.kind, &b.name, &b.namespace, b.port, &p, errors);
        if let Some(w) = b.weight {
            if !(0..=1_000_000).contains(&w) {
                errors.push(field_error(
                    format!("{p}.weight"),
                    format!("weight {w} out of range 0-1000000"),
                ));
            }
        }
        check_filters(&b.filters, &format!("{p}.filters"), grpc, errors);
        // weft edits headers per backend; the other filters act on the whole rule.
        for (k, f) in b.filters.iter().enumerate() {
            if matches!(
                f.kind.as_str(),
                "RequestRedirect" | "URLRewrite" | "RequestMirror"
            ) {
                errors.push(field_error(
                    format!("{p}.filters[{k}].type"),
                    format!(
                        "{} filter on a backend is not supported by weft: put it on the rule",
                        f.kind
                    ),
                ));
            }
        }
    }
}

fn check_rule_names<'a>(
    names: impl Iterator<Item = &'a Option<String>>,
    errors: &mut Vec<FieldError>,
) {
    let mut seen = BTreeSet::new();
    for (i, n) in names.enumerate() {
        if let Some(n) = n {
            if !seen.insert(n.clone()) {
                errors.push(field_error(
                    format!("spec.rules[{i}].name"),
                    "Rule name must be unique within the route",
                ));
            }
        }
    }
}

fn check_http_route(spec: &HttpRouteSpec) -> Vec<FieldError> {
    let mut errors = Vec::new();
    check_parent_refs(&spec.parent_refs, &mut errors);
    check_hostnames(&spec.hostnames, &mut errors);
    let rules = spec.rules.as_deref().unwrap_or_default();
    if spec.rules.as_ref().is_some_and(|r| r.is_empty()) {
        errors.push(field_error("spec.rules", "must have at least 1 item"));
    }
    if rules.len() > 16 {
        errors.push(field_error("spec.rules", "must have at most 16 items"));
    }
    let total: usize = rules
        .iter()
        .map(|r| r.matches.as_ref().map_or(1, |m| m.len()))
        .sum();
    if total > 128 {
        errors.push(field_error(
            "spec.rules",
            "While 16 rules and 64 matches per rule are allowed, the total number of matches across all rules in a route must be less than 128",
        ));
    }
    check_rule_names(rules.iter().map(|r| &r.name), &mut errors);
    for (i, rule) in rules.iter().enumerate() {
        let path = format!("spec.rules[{i}]");
        let matches = rule.matches.as_deref().unwrap_or_default();
        if matches.len() > 64 {
            errors.push(field_error(
                format!("{path}.matches"),
                "must have at most 64 items",
            ));
        }
        for (j, m) in matches.iter().enumerate() {
            let mp = format!("{path}.matches[{j}]");
            if let Some(p) = &m.path {
                check_path_match(p, &format!("{mp}.path"), &mut errors);
            }
            check_value_matches(&m.headers, &format!("{mp}.headers"), true, &mut errors);
            check_value_matches(
                &m.query_params,
                &format!("{mp}.queryParams"),
                false,
                &mut errors,
            );
            if let Some(method) = &m.method {
                if !METHODS.contains(&method.as_str()) {
                    errors.push(field_error(
                        format!("{mp}.method"),
                        format!(
                            "unsupported value {method:?}: supported values: {}",
                            METHODS.join(", ")
                        ),
                    ));
                }
            }
        }
        check_filters(
            &rule.filters,
            &format!("{path}.filters"),
            false,
            &mut errors,
        );
        if !rule.backend_refs.is_empty()
            && rule.filters.iter().any(|f| f.request_redirect.is_some())
        {
            errors.push(field_error(
                format!("{path}.filters"),
                "RequestRedirect filter must not be used together with backendRefs",
            ));
        }
        check_prefix_rewrites(rule, &path, &mut errors);
        check_backend_refs(
            &rule.backend_refs,
            &format!("{path}.backendRefs"),
            false,
            &mut errors,
        );
        if let Some(t) = &rule.timeouts {
            if let (Some(req), Some(backend)) = (&t.request, &t.backend_request) {
                if !req.0.is_zero() && backend.0 > req.0 {
                    errors.push(field_error(
                        format!("{path}.timeouts"),
                        "backendRequest timeout cannot be longer than request timeout",
                    ));
                }
            }
        }
        if let Some(r) = &rule.retry {
            for (k, c) in r.codes.iter().enumerate() {
                if !(400..=599).contains(c) {
                    errors.push(field_error(
                        format!("{path}.retry.codes[{k}]"),
                        format!("status code {c} out of range 400-599"),
                    ));
                }
            }
            if r.attempts.is_some_and(|a| a < 0) {
                errors.push(field_error(
                    format!("{path}.retry.attempts"),
                    "must not be negative",
                ));
            }
        }
        if rule.session_persistence.is_some() {
            errors.push(field_error(
                format!("{path}.sessionPersistence"),
                "session persistence is not supported by weft",
            ));
        }
    }
    errors
}

fn check_grpc_route(spec: &GrpcRouteSpec) -> Vec<FieldError> {
    let mut errors = Vec::new();
    check_parent_refs(&spec.parent_refs, &mut errors);
    check_hostnames(&spec.hostnames, &mut errors);
    let rules = spec.rules.as_deref().unwrap_or_default();
    if rules.len() > 16 {
        errors.push(field_error("spec.rules", "must have at most 16 items"));
    }
    let total: usize = rules.iter().map(|r| r.matches.len().max(1)).sum();
    if total > 128 {
        errors.push(field_error(
            "spec.rules",
            "While 16 rules and 64 matches per rule are allowed, the total number of matches across all rules in a route must be less than 128",
        ));
    }
    check_rule_names(rules.iter().map(|r| &r.name), &mut errors);
    let service_re = |s: &str| {
        let mut parts = s.split('.');
        parts.all(|p| {
            !p.is_empty()
                && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                && !p.as_bytes()[0].is_ascii_digit()
        })
    };
    let method_re = |s: &str| {
        !s.is_empty()
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && !s.as_bytes()[0].is_ascii_digit()
    };
    for (i, rule) in rules.iter().enumerate() {
        let path = format!("spec.rules[{i}]");
        if rule.matches.len() > 64 {
            errors.push(field_error(
                format!("{path}.matches"),
                "must have at most 64 items",
            ));
        }
        for (j, m) in rule.matches.iter().enumerate() {
            let mp = format!("{path}.matches[{j}]");
            if let Some(mm) = &m.method {
                let p = format!("{mp}.method");
                if mm.service.is_none() && mm.method.is_none() {
                    errors.push(field_error(
                        p.clone(),
                        "One or both of 'service' or 'method' must be specified",
                    ));
                }
                for (field, v, exact_ok) in [
                    ("service", &mm.service, service_re as fn(&str) -> bool),
                    ("method", &mm.method, method_re),
                ] {
                    let Some(v) = v else { continue };
                    match mm.kind {
                        ValueMatchType::Exact if !exact_ok(v) => errors.push(field_error(
                            format!("{p}.{field}"),
                            format!(
                                "{field} must only contain valid characters (matching {})",
                                if field == "service" {
                                    "^(?i)\\.?[a-z_][a-z_0-9]*(\\.[a-z_][a-z_0-9]*)*$"
                                } else {
                                    "^[A-Za-z_][A-Za-z_0-9]*$"
                                }
                            ),
                        )),
                        ValueMatchType::RegularExpression => {
                            if let Err(e) = check_regex(v) {
                                errors.push(field_error(format!("{p}.{field}"), e));
                            }
                        }
                        _ => {}
                    }
                }
            }
            check_value_matches(&m.headers, &format!("{mp}.headers"), true, &mut errors);
        }
        check_filters(&rule.filters, &format!("{path}.filters"), true, &mut errors);
        check_backend_refs(
            &rule.backend_refs,
            &format!("{path}.backendRefs"),
            true,
            &mut errors,
        );
        if rule.session_persistence.is_some() {
            errors.push(field_error(
                format!("{path}.sessionPersistence"),
                "session persistence is not supported by weft",
            ));
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_characters() {
        assert!(path_chars_ok("/a/b-c_d.e~f"));
        assert!(path_chars_ok("/a%20b"));
        assert!(!path_chars_ok("/a%2"));
        assert!(!path_chars_ok("/a b"));
        assert!(!path_chars_ok("/a%zz"));
    }

    #[test]
    fn mirror_shares() {
        let m = RequestMirrorFilter::default();
        assert_eq!(m.share(), 100.0);
        let m = RequestMirrorFilter {
            fraction: Some(Fraction {
                numerator: 1,
                denominator: 4,
            }),
            ..Default::default()
        };
        assert_eq!(m.share(), 25.0);
    }
}
