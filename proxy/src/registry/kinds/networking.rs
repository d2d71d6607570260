//! `networking.istio.io` (`v1`, `v1beta1`, `v1alpha3`: one schema): VirtualService,
//! DestinationRule and ServiceEntry as Istio's API defines them, parsed and checked object by
//! object as Istio's validation does (`pkg/config/validation`), so the snapshot only holds valid
//! ones and the route table only compiles. Errors carry the field path
//! (`spec.http[0].route[1].weight`).
//!
//! What weft does with each field is in `docs/routing.md`; a few things are refused here with a
//! clear error rather than silently ignored (`delegate`, HTTP/2 error aborts).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{done, field_error, nullable, parse_spec, Meta};
use crate::registry::{FieldError, RawObject};

// ---------------------------------------------------------------------------------------------
// Objects of the snapshot.
// ---------------------------------------------------------------------------------------------

/// A VirtualService of the snapshot (valid).
#[derive(Debug, Clone, Serialize)]
pub struct VirtualService {
    #[serde(flatten)]
    pub meta: Meta,
    pub spec: VirtualServiceSpec,
}

/// A DestinationRule of the snapshot (valid).
#[derive(Debug, Clone, Serialize)]
pub struct DestinationRule {
    #[serde(flatten)]
    pub meta: Meta,
    pub spec: DestinationRuleSpec,
}

/// A ServiceEntry of the snapshot (valid).
#[derive(Debug, Clone, Serialize)]
pub struct ServiceEntry {
    #[serde(flatten)]
    pub meta: Meta,
    pub spec: ServiceEntrySpec,
}

/// Parses and checks a VirtualService.
pub fn virtual_service(
    raw: &RawObject,
    origin: Option<String>,
) -> Result<VirtualService, Vec<FieldError>> {
    let spec: VirtualServiceSpec = parse_spec(raw)?;
    done(check_virtual_service(&spec, raw.namespace_or_default()))?;
    Ok(VirtualService {
        meta: Meta::of(raw, origin),
        spec,
    })
}

/// Parses and checks a DestinationRule.
pub fn destination_rule(
    raw: &RawObject,
    origin: Option<String>,
) -> Result<DestinationRule, Vec<FieldError>> {
    let spec: DestinationRuleSpec = parse_spec(raw)?;
    done(check_destination_rule(&spec, raw.namespace_or_default()))?;
    Ok(DestinationRule {
        meta: Meta::of(raw, origin),
        spec,
    })
}

/// Parses and checks a ServiceEntry.
pub fn service_entry(
    raw: &RawObject,
    origin: Option<String>,
) -> Result<ServiceEntry, Vec<FieldError>> {
    let spec: ServiceEntrySpec = parse_spec(raw)?;
    done(check_service_entry(&spec, raw.namespace_or_default()))?;
    Ok(ServiceEntry {
        meta: Meta::of(raw, origin),
        spec,
    })
}

// ---------------------------------------------------------------------------------------------
// Shared value types.
// ---------------------------------------------------------------------------------------------

/// A duration as Istio's CRDs accept it: Go duration syntax (`1s`, `0.5s`, `100ms`, `1m30s`),
/// which includes the protobuf JSON form (`1.5s`). Keeps the text for display.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    /// Go's `time.ParseDuration`: a sequence of decimal numbers with an optional fraction and a
    /// unit (`ns`, `us`, `µs`, `ms`, `s`, `m`, `h`); `0` alone; no sign (a negative duration is
    /// never valid in these APIs).
    pub fn parse(s: &str) -> Result<Duration, String> {
        let bad = || format!("invalid duration {s:?}: expected e.g. \"1s\", \"100ms\", \"1m30s\"");
        if s == "0" {
            return Ok(Duration(std::time::Duration::ZERO));
        }
        if s.is_empty() {
            return Err(bad());
        }
        let mut rest = s;
        let mut nanos: u128 = 0;
        while !rest.is_empty() {
            let num_end = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .ok_or_else(bad)?;
            let (num, tail) = rest.split_at(num_end);
            if num.is_empty() || num == "." || num.matches('.').count() > 1 {
                return Err(bad());
            }
            let unit_end = tail
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(tail.len());
            let (unit, tail) = tail.split_at(unit_end);
            let scale: u128 = match unit {
                "ns" => 1,
                "us" | "µs" | "μs" => 1_000,
                "ms" => 1_000_000,
                "s" => 1_000_000_000,
                "m" => 60_000_000_000,
                "h" => 3_600_000_000_000,
                _ => return Err(bad()),
            };
            let (int, frac) = num.split_once('.').unwrap_or((num, ""));
            let int: u128 = if int.is_empty() {
                0
            } else {
                int.parse().map_err(|_| bad())?
            };
            let mut value = int.checked_mul(scale).ok_or_else(bad)?;
            let mut div = 1u128;
            for d in frac.bytes().take(18) {
                div *= 10;
                value += u128::from(d - b'0') * scale / div;
            }
            nanos = nanos.checked_add(value).ok_or_else(bad)?;
            rest = tail;
        }
        let secs = u64::try_from(nanos / 1_000_000_000).map_err(|_| bad())?;
        Ok(Duration(std::time::Duration::new(
            secs,
            (nanos % 1_000_000_000) as u32,
        )))
    }

    /// Istio's `ValidateDuration`: at least 1 ms, whole milliseconds.
    pub fn check(&self) -> Result<(), String> {
        if self.0 < std::time::Duration::from_millis(1) {
            Err("duration must be at least 1ms".into())
        } else if !self.0.subsec_nanos().is_multiple_of(1_000_000) {
            Err("only durations to ms precision are supported".into())
        } else {
            Ok(())
        }
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if !self.0.subsec_nanos().is_multiple_of(1_000_000) {
            write!(f, "{}ns", self.0.as_nanos())
        } else if ms.is_multiple_of(1000) {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Duration::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// `StringMatch`: exactly one of `exact`, `prefix`, `regex` (RE2, full match); none at all
/// means "present" where Istio allows it (header and query parameter matches).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StringMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

/// `Percent`: a double 0–100.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Percent {
    #[serde(default, deserialize_with = "nullable")]
    pub value: f64,
}

/// `PortSelector`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortSelector {
    #[serde(default, deserialize_with = "nullable")]
    pub number: u32,
}

/// `Destination`: a host (short name, `name.ns`, FQDN, ServiceEntry host), subset and port.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Destination {
    #[serde(default, deserialize_with = "nullable")]
    pub host: String,
    #[serde(default, deserialize_with = "nullable")]
    pub subset: String,
    #[serde(default)]
    pub port: Option<PortSelector>,
}

/// `Headers.HeaderOperations`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderOperations {
    #[serde(default, deserialize_with = "nullable")]
    pub set: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    pub add: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    pub remove: Vec<String>,
}

/// `Headers`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Headers {
    #[serde(default)]
    pub request: Option<HeaderOperations>,
    #[serde(default)]
    pub response: Option<HeaderOperations>,
}

/// `WorkloadSelector` of DestinationRule (`matchLabels`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MatchLabelsSelector {
    #[serde(default, deserialize_with = "nullable")]
    pub match_labels: BTreeMap<String, String>,
}

/// `WorkloadSelector` of ServiceEntry (`labels`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelsSelector {
    #[serde(default, deserialize_with = "nullable")]
    pub labels: BTreeMap<String, String>,
}

// ---------------------------------------------------------------------------------------------
// VirtualService.
// ---------------------------------------------------------------------------------------------

/// `VirtualService.spec`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualServiceSpec {
    #[serde(default, deserialize_with = "nullable")]
    pub hosts: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub gateways: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub http: Vec<HttpRoute>,
    #[serde(default, deserialize_with = "nullable")]
    pub tls: Vec<TlsRoute>,
    #[serde(default, deserialize_with = "nullable")]
    pub tcp: Vec<TcpRoute>,
    #[serde(default, deserialize_with = "nullable")]
    pub export_to: Vec<String>,
}

/// The gateway name that means "the sidecars (here: weft's node proxies) of the mesh".
pub const MESH_GATEWAY: &str = "mesh";

impl VirtualServiceSpec {
    /// Whether the object applies to the mesh: no `gateways`, or `mesh` among them.
    pub fn applies_to_mesh(&self) -> bool {
        self.gateways.is_empty() || self.gateways.iter().any(|g| g == MESH_GATEWAY)
    }
}

/// `HTTPRoute` of a VirtualService.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRoute {
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
    #[serde(default, deserialize_with = "nullable", rename = "match")]
    pub matches: Vec<HttpMatchRequest>,
    #[serde(default, deserialize_with = "nullable")]
    pub route: Vec<HttpRouteDestination>,
    #[serde(default)]
    pub redirect: Option<HttpRedirect>,
    #[serde(default)]
    pub direct_response: Option<HttpDirectResponse>,
    #[serde(default)]
    pub delegate: Option<serde_json::Value>,
    #[serde(default)]
    pub rewrite: Option<HttpRewrite>,
    #[serde(default)]
    pub timeout: Option<Duration>,
    #[serde(default)]
    pub retries: Option<HttpRetry>,
    #[serde(default)]
    pub fault: Option<HttpFaultInjection>,
    #[serde(default)]
    pub mirror: Option<Destination>,
    #[serde(default, deserialize_with = "nullable")]
    pub mirrors: Vec<HttpMirrorPolicy>,
    /// Deprecated `mirrorPercent` (an integer percentage).
    #[serde(default)]
    pub mirror_percent: Option<u32>,
    #[serde(default)]
    pub mirror_percentage: Option<Percent>,
    #[serde(default)]
    pub cors_policy: Option<CorsPolicy>,
    #[serde(default)]
    pub headers: Option<Headers>,
}

/// `HTTPMatchRequest`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpMatchRequest {
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
    #[serde(default)]
    pub uri: Option<StringMatch>,
    #[serde(default)]
    pub scheme: Option<StringMatch>,
    #[serde(default)]
    pub method: Option<StringMatch>,
    #[serde(default)]
    pub authority: Option<StringMatch>,
    #[serde(default, deserialize_with = "nullable")]
    pub headers: BTreeMap<String, StringMatch>,
    #[serde(default, deserialize_with = "nullable")]
    pub port: u32,
    #[serde(default, deserialize_with = "nullable")]
    pub source_labels: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    pub gateways: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub query_params: BTreeMap<String, StringMatch>,
    #[serde(default, deserialize_with = "nullable")]
    pub ignore_uri_case: bool,
    #[serde(default, deserialize_with = "nullable")]
    pub without_headers: BTreeMap<String, StringMatch>,
    #[serde(default, deserialize_with = "nullable")]
    pub source_namespace: String,
    #[serde(default, deserialize_with = "nullable")]
    pub stat_prefix: String,
}

/// `HTTPRouteDestination`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteDestination {
    #[serde(default)]
    pub destination: Option<Destination>,
    #[serde(default, deserialize_with = "nullable")]
    pub weight: i32,
    #[serde(default)]
    pub headers: Option<Headers>,
}

/// `RouteDestination` (TCP and TLS routes).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteDestination {
    #[serde(default)]
    pub destination: Option<Destination>,
    #[serde(default, deserialize_with = "nullable")]
    pub weight: i32,
}

/// `HTTPRedirect.derivePort`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RedirectPortSelection {
    FromProtocolDefault,
    FromRequestPort,
}

/// `HTTPRedirect`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRedirect {
    #[serde(default, deserialize_with = "nullable")]
    pub uri: String,
    #[serde(default, deserialize_with = "nullable")]
    pub authority: String,
    #[serde(default)]
    pub port: Option<u32>,
    #[serde(default)]
    pub derive_port: Option<RedirectPortSelection>,
    #[serde(default, deserialize_with = "nullable")]
    pub scheme: String,
    #[serde(default, deserialize_with = "nullable")]
    pub redirect_code: u32,
}

/// `HTTPDirectResponse`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpDirectResponse {
    #[serde(default, deserialize_with = "nullable")]
    pub status: u32,
    #[serde(default)]
    pub body: Option<HttpBody>,
}

/// `HTTPBody`: `string` or `bytes` (base64, as protobuf JSON writes bytes).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpBody {
    #[serde(default)]
    pub string: Option<String>,
    #[serde(default)]
    pub bytes: Option<String>,
}

/// `HTTPRewrite`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRewrite {
    #[serde(default, deserialize_with = "nullable")]
    pub uri: String,
    #[serde(default, deserialize_with = "nullable")]
    pub authority: String,
    #[serde(default)]
    pub uri_regex_rewrite: Option<RegexRewrite>,
}

/// `RegexRewrite`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegexRewrite {
    #[serde(default, rename = "match", deserialize_with = "nullable")]
    pub pattern: String,
    #[serde(default, deserialize_with = "nullable")]
    pub rewrite: String,
}

/// `HTTPRetry`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRetry {
    #[serde(default, deserialize_with = "nullable")]
    pub attempts: i32,
    #[serde(default)]
    pub per_try_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "nullable")]
    pub retry_on: String,
    #[serde(default)]
    pub retry_remote_localities: Option<bool>,
    #[serde(default)]
    pub retry_ignore_previous_hosts: Option<bool>,
    #[serde(default)]
    pub backoff: Option<Duration>,
}

/// `HTTPFaultInjection`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpFaultInjection {
    #[serde(default)]
    pub delay: Option<FaultDelay>,
    #[serde(default)]
    pub abort: Option<FaultAbort>,
}

/// `HTTPFaultInjection.Delay`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultDelay {
    #[serde(default)]
    pub fixed_delay: Option<Duration>,
    #[serde(default)]
    pub exponential_delay: Option<Duration>,
    #[serde(default)]
    pub percentage: Option<Percent>,
    /// Deprecated integer percentage (v1alpha3), used when `percentage` is absent.
    #[serde(default)]
    pub percent: Option<i32>,
}

/// `HTTPFaultInjection.Abort`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultAbort {
    #[serde(default)]
    pub http_status: Option<i32>,
    #[serde(default)]
    pub grpc_status: Option<String>,
    #[serde(default)]
    pub http2_error: Option<String>,
    #[serde(default)]
    pub percentage: Option<Percent>,
    /// Deprecated integer percentage (v1alpha3), used when `percentage` is absent.
    #[serde(default)]
    pub percent: Option<i32>,
}

impl FaultDelay {
    /// The share of requests delayed, 0–100: `percentage`, else the deprecated `percent`, else
    /// none (Istio hands Envoy a zero fraction then).
    pub fn share(&self) -> f64 {
        percent_share(&self.percentage, self.percent)
    }
}

impl FaultAbort {
    /// The share of requests aborted, as [`FaultDelay::share`].
    pub fn share(&self) -> f64 {
        percent_share(&self.percentage, self.percent)
    }
}

fn percent_share(percentage: &Option<Percent>, percent: Option<i32>) -> f64 {
    match (percentage, percent) {
        (Some(p), _) => p.value,
        (None, Some(p)) => f64::from(p),
        (None, None) => 0.0,
    }
}

/// `HTTPMirrorPolicy`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpMirrorPolicy {
    #[serde(default)]
    pub destination: Option<Destination>,
    #[serde(default)]
    pub percentage: Option<Percent>,
}

/// `CorsPolicy`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CorsPolicy {
    #[serde(default, deserialize_with = "nullable")]
    pub allow_origins: Vec<StringMatch>,
    /// Deprecated exact origins.
    #[serde(default, deserialize_with = "nullable")]
    pub allow_origin: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub allow_methods: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub allow_headers: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub expose_headers: Vec<String>,
    #[serde(default)]
    pub max_age: Option<Duration>,
    #[serde(default)]
    pub allow_credentials: Option<bool>,
    #[serde(default)]
    pub unmatched_preflights: Option<String>,
}

/// `TLSRoute`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsRoute {
    #[serde(default, deserialize_with = "nullable", rename = "match")]
    pub matches: Vec<TlsMatchAttributes>,
    #[serde(default, deserialize_with = "nullable")]
    pub route: Vec<RouteDestination>,
}

/// `TLSMatchAttributes`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsMatchAttributes {
    #[serde(default, deserialize_with = "nullable")]
    pub sni_hosts: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub destination_subnets: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub port: u32,
    #[serde(default, deserialize_with = "nullable")]
    pub source_labels: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    pub gateways: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub source_namespace: String,
}

/// `TCPRoute`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpRoute {
    #[serde(default, deserialize_with = "nullable", rename = "match")]
    pub matches: Vec<L4MatchAttributes>,
    #[serde(default, deserialize_with = "nullable")]
    pub route: Vec<RouteDestination>,
}

/// `L4MatchAttributes`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct L4MatchAttributes {
    #[serde(default, deserialize_with = "nullable")]
    pub destination_subnets: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub port: u32,
    #[serde(default, deserialize_with = "nullable")]
    pub source_labels: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    pub gateways: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub source_namespace: String,
}

// ---------------------------------------------------------------------------------------------
// DestinationRule.
// ---------------------------------------------------------------------------------------------

/// `DestinationRule.spec`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestinationRuleSpec {
    #[serde(default, deserialize_with = "nullable")]
    pub host: String,
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicy>,
    #[serde(default, deserialize_with = "nullable")]
    pub subsets: Vec<Subset>,
    #[serde(default, deserialize_with = "nullable")]
    pub export_to: Vec<String>,
    #[serde(default)]
    pub workload_selector: Option<MatchLabelsSelector>,
}

/// `Subset`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Subset {
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
    #[serde(default, deserialize_with = "nullable")]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicy>,
}

/// `TrafficPolicy` (also the subset level).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicy {
    #[serde(default)]
    pub load_balancer: Option<LoadBalancerSettings>,
    #[serde(default)]
    pub connection_pool: Option<ConnectionPoolSettings>,
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(default)]
    pub tls: Option<ClientTlsSettings>,
    #[serde(default, deserialize_with = "nullable")]
    pub port_level_settings: Vec<PortTrafficPolicy>,
    #[serde(default)]
    pub tunnel: Option<TunnelSettings>,
    #[serde(default)]
    pub proxy_protocol: Option<ProxyProtocol>,
}

/// `TrafficPolicy.PortTrafficPolicy`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortTrafficPolicy {
    #[serde(default)]
    pub port: Option<PortSelector>,
    #[serde(default)]
    pub load_balancer: Option<LoadBalancerSettings>,
    #[serde(default)]
    pub connection_pool: Option<ConnectionPoolSettings>,
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(default)]
    pub tls: Option<ClientTlsSettings>,
}

/// `TrafficPolicy.TunnelSettings`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TunnelSettings {
    #[serde(default, deserialize_with = "nullable")]
    pub protocol: String,
    #[serde(default, deserialize_with = "nullable")]
    pub target_host: String,
    #[serde(default, deserialize_with = "nullable")]
    pub target_port: u32,
}

/// `TrafficPolicy.ProxyProtocol`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxyProtocol {
    #[serde(default)]
    pub version: Option<ProxyProtocolVersion>,
}

/// `ProxyProtocol.VERSION`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum ProxyProtocolVersion {
    V1,
    V2,
}

/// `LoadBalancerSettings.SimpleLB`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SimpleLb {
    #[default]
    Unspecified,
    LeastConn,
    Random,
    Passthrough,
    RoundRobin,
    LeastRequest,
}

/// `LoadBalancerSettings`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancerSettings {
    #[serde(default)]
    pub simple: Option<SimpleLb>,
    #[serde(default)]
    pub consistent_hash: Option<ConsistentHashLb>,
    #[serde(default)]
    pub locality_lb_setting: Option<LocalityLbSetting>,
    #[serde(default)]
    pub warmup_duration_secs: Option<Duration>,
    #[serde(default)]
    pub warmup: Option<WarmupConfiguration>,
}

/// `LoadBalancerSettings.ConsistentHashLB`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConsistentHashLb {
    #[serde(default)]
    pub http_header_name: Option<String>,
    #[serde(default)]
    pub http_cookie: Option<HttpCookie>,
    #[serde(default)]
    pub use_source_ip: Option<bool>,
    #[serde(default)]
    pub http_query_parameter_name: Option<String>,
    #[serde(default)]
    pub ring_hash: Option<RingHash>,
    #[serde(default)]
    pub maglev: Option<MagLev>,
    /// Deprecated: use `ringHash.minimumRingSize`.
    #[serde(default, deserialize_with = "nullable")]
    pub minimum_ring_size: u64,
}

/// `ConsistentHashLB.HTTPCookie`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpCookie {
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
    #[serde(default, deserialize_with = "nullable")]
    pub path: String,
    #[serde(default)]
    pub ttl: Option<Duration>,
}

/// `ConsistentHashLB.RingHash`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RingHash {
    #[serde(default, deserialize_with = "nullable")]
    pub minimum_ring_size: u64,
}

/// `ConsistentHashLB.MagLev`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MagLev {
    #[serde(default, deserialize_with = "nullable")]
    pub table_size: u64,
}

/// `WarmupConfiguration`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WarmupConfiguration {
    #[serde(default)]
    pub duration: Option<Duration>,
    #[serde(default)]
    pub minimum_percent: Option<f64>,
    #[serde(default)]
    pub aggression: Option<f64>,
}

/// `LocalityLoadBalancerSetting`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalityLbSetting {
    #[serde(default, deserialize_with = "nullable")]
    pub distribute: Vec<LocalityDistribute>,
    #[serde(default, deserialize_with = "nullable")]
    pub failover: Vec<LocalityFailover>,
    #[serde(default, deserialize_with = "nullable")]
    pub failover_priority: Vec<String>,
    #[serde(default)]
    pub enabled: Option<bool>,
}

/// `LocalityLoadBalancerSetting.Distribute`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalityDistribute {
    #[serde(default, deserialize_with = "nullable")]
    pub from: String,
    #[serde(default, deserialize_with = "nullable")]
    pub to: BTreeMap<String, u32>,
}

/// `LocalityLoadBalancerSetting.Failover`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalityFailover {
    #[serde(default, deserialize_with = "nullable")]
    pub from: String,
    #[serde(default, deserialize_with = "nullable")]
    pub to: String,
}

/// `ConnectionPoolSettings`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectionPoolSettings {
    #[serde(default)]
    pub tcp: Option<TcpSettings>,
    #[serde(default)]
    pub http: Option<HttpSettings>,
}

/// `ConnectionPoolSettings.TCPSettings`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpSettings {
    #[serde(default)]
    pub max_connections: Option<i32>,
    #[serde(default)]
    pub connect_timeout: Option<Duration>,
    #[serde(default)]
    pub tcp_keepalive: Option<TcpKeepalive>,
    #[serde(default)]
    pub max_connection_duration: Option<Duration>,
    #[serde(default)]
    pub idle_timeout: Option<Duration>,
}

/// `TCPSettings.TcpKeepalive`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpKeepalive {
    #[serde(default)]
    pub probes: Option<u32>,
    #[serde(default)]
    pub time: Option<Duration>,
    #[serde(default)]
    pub interval: Option<Duration>,
}

/// `HTTPSettings.H2UpgradePolicy`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum H2UpgradePolicy {
    #[default]
    Default,
    DoNotUpgrade,
    Upgrade,
}

/// `ConnectionPoolSettings.HTTPSettings`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpSettings {
    #[serde(default)]
    pub http1_max_pending_requests: Option<i32>,
    #[serde(default)]
    pub http2_max_requests: Option<i32>,
    #[serde(default)]
    pub max_requests_per_connection: Option<i32>,
    #[serde(default)]
    pub max_retries: Option<i32>,
    #[serde(default)]
    pub idle_timeout: Option<Duration>,
    #[serde(default)]
    pub h2_upgrade_policy: Option<H2UpgradePolicy>,
    #[serde(default)]
    pub use_client_protocol: Option<bool>,
    #[serde(default)]
    pub max_concurrent_streams: Option<i32>,
}

/// `OutlierDetection`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetection {
    /// Deprecated: Envoy's gateway errors.
    #[serde(default, deserialize_with = "nullable")]
    pub consecutive_errors: i32,
    #[serde(default)]
    pub split_external_local_origin_errors: Option<bool>,
    #[serde(default)]
    pub consecutive_local_origin_failures: Option<u32>,
    #[serde(default)]
    pub consecutive_gateway_errors: Option<u32>,
    #[serde(default, rename = "consecutive5xxErrors")]
    pub consecutive_5xx_errors: Option<u32>,
    #[serde(default)]
    pub interval: Option<Duration>,
    #[serde(default)]
    pub base_ejection_time: Option<Duration>,
    #[serde(default)]
    pub max_ejection_percent: Option<i32>,
    #[serde(default)]
    pub min_health_percent: Option<i32>,
}

/// `ClientTLSSettings.TLSmode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TlsMode {
    #[default]
    Disable,
    Simple,
    Mutual,
    IstioMutual,
}

/// `ClientTLSSettings`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientTlsSettings {
    #[serde(default, deserialize_with = "nullable")]
    pub mode: TlsMode,
    #[serde(default, deserialize_with = "nullable")]
    pub client_certificate: String,
    #[serde(default, deserialize_with = "nullable")]
    pub private_key: String,
    #[serde(default, deserialize_with = "nullable")]
    pub ca_certificates: String,
    #[serde(default, deserialize_with = "nullable")]
    pub credential_name: String,
    #[serde(default)]
    pub subject_alt_names: Option<Vec<String>>,
    #[serde(default, deserialize_with = "nullable")]
    pub sni: String,
    #[serde(default)]
    pub insecure_skip_verify: Option<bool>,
    #[serde(default, deserialize_with = "nullable")]
    pub ca_crl: String,
}

// ---------------------------------------------------------------------------------------------
// ServiceEntry.
// ---------------------------------------------------------------------------------------------

/// `ServiceEntry.spec`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceEntrySpec {
    #[serde(default, deserialize_with = "nullable")]
    pub hosts: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub addresses: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub ports: Vec<SePort>,
    #[serde(default, deserialize_with = "nullable")]
    pub location: Location,
    #[serde(default, deserialize_with = "nullable")]
    pub resolution: Resolution,
    #[serde(default)]
    pub endpoints: Option<Vec<WorkloadEntry>>,
    #[serde(default)]
    pub workload_selector: Option<LabelsSelector>,
    #[serde(default, deserialize_with = "nullable")]
    pub export_to: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub subject_alt_names: Vec<String>,
}

/// `ServiceEntry.Location`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Location {
    #[default]
    MeshExternal,
    MeshInternal,
}

/// `ServiceEntry.Resolution`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Resolution {
    #[default]
    None,
    Static,
    Dns,
    DnsRoundRobin,
}

/// `ServicePort` of a ServiceEntry.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SePort {
    #[serde(default, deserialize_with = "nullable")]
    pub number: u32,
    #[serde(default, deserialize_with = "nullable")]
    pub protocol: String,
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
    #[serde(default, deserialize_with = "nullable")]
    pub target_port: u32,
}

/// `WorkloadEntry` (a ServiceEntry endpoint).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadEntry {
    #[serde(default, deserialize_with = "nullable")]
    pub address: String,
    #[serde(default, deserialize_with = "nullable")]
    pub ports: BTreeMap<String, u32>,
    #[serde(default, deserialize_with = "nullable")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    pub network: String,
    #[serde(default, deserialize_with = "nullable")]
    pub locality: String,
    #[serde(default, deserialize_with = "nullable")]
    pub weight: u32,
    #[serde(default, deserialize_with = "nullable")]
    pub service_account: String,
}

// ---------------------------------------------------------------------------------------------
// Host names.
// ---------------------------------------------------------------------------------------------

/// The routing host an Istio object means by `host`, written in `namespace`, as Istio resolves
/// short names (`ResolveShortnameToFQDN`): `reviews` → `reviews.<namespace>.svc.cluster.local`.
/// weft also reads `name.ns` as the Service `ns/name` when that Service exists (Istio would
/// keep it as written, a name no Service has) and a Service VIP as that Service. Wildcards,
/// FQDNs and other addresses are kept as written.
pub fn qualify_host(
    host: &str,
    namespace: &str,
    service_exists: impl Fn(&str, &str) -> bool,
    service_of_ip: impl Fn(IpAddr) -> Option<(String, String)>,
) -> String {
    let fqdn =
        |name: &str, ns: &str| format!("{name}.{ns}.svc.{}", crate::registry::CLUSTER_DOMAIN);
    if host == "*" || host.starts_with("*.") {
        return host.to_string();
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return match service_of_ip(ip) {
            Some((ns, name)) => fqdn(&name, &ns),
            None => host.to_string(),
        };
    }
    match host.split_once('.') {
        None => fqdn(host, namespace),
        Some((name, ns)) if !ns.contains('.') && service_exists(ns, name) => fqdn(name, ns),
        Some(_) => host.to_string(),
    }
}

/// Whether `pattern` (a host or a `*.`/`*` wildcard) covers `host` (a host, no wildcard).
pub fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some("") => true,
        Some(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
        None => pattern == host,
    }
}

// ---------------------------------------------------------------------------------------------
// Value checks shared with the Gateway API kinds.
// ---------------------------------------------------------------------------------------------

/// RFC 1123 label: 1–63 of `a-z0-9-`, starting and ending with a letter or digit.
pub fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Istio's `ValidateWildcardDomain`: a DNS name whose labels are RFC 1123 labels, optionally
/// starting with `*` or `*.` (`*` alone is a wildcard for everything).
pub fn check_wildcard_domain(host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err("empty host is not allowed".into());
    }
    if host.len() > 255 {
        return Err(format!("domain name {host:?} too long (max 255)"));
    }
    let rest = match host.strip_prefix('*') {
        Some("") => return Ok(()),
        Some(r) => match r.strip_prefix('.') {
            Some(r) => r,
            None => {
                return Err(format!(
                    "domain name {host:?} invalid: a wildcard is only allowed as the whole first label (`*.example.com`)"
                ))
            }
        },
        None => host,
    };
    check_dns_labels(host, rest)
}

/// Istio's `ValidateFQDN`: a DNS name of RFC 1123 labels (a trailing dot allowed), no wildcard.
pub fn check_fqdn(host: &str) -> Result<(), String> {
    if host.len() > 255 {
        return Err(format!("domain name {host:?} too long (max 255)"));
    }
    check_dns_labels(host, host.strip_suffix('.').unwrap_or(host))
}

fn check_dns_labels(whole: &str, labels: &str) -> Result<(), String> {
    if labels.is_empty() {
        return Err(format!("domain name {whole:?} invalid: empty"));
    }
    for label in labels.split('.') {
        if !is_dns1123_label(label) {
            return Err(format!(
                "domain name {whole:?} invalid (label {label:?} invalid: lowercase letters, digits and '-', 1-63 characters)"
            ));
        }
    }
    Ok(())
}

/// An IP address or a CIDR (`ValidateIPSubnet`).
pub fn check_ip_subnet(s: &str) -> Result<(), String> {
    let ok = if s.contains('/') {
        s.parse::<ipnet::IpNet>().is_ok()
    } else {
        s.parse::<IpAddr>().is_ok()
    };
    if ok {
        Ok(())
    } else {
        Err(format!("{s:?} is not a valid IP address or CIDR"))
    }
}

/// An RE2 regular expression as Istio checks it (at most 1024 characters, compiles).
pub fn check_regex(re: &str) -> Result<(), String> {
    if re.is_empty() {
        return Err("regex must not be empty".into());
    }
    if re.len() > 1024 {
        return Err("regex is too large, max length allowed is 1024".into());
    }
    regex::Regex::new(re).map(|_| ()).map_err(|e| {
        format!(
            "invalid regex {re:?}: {}; weft uses RE2 syntax, as Istio does",
            e.to_string().lines().last().unwrap_or("")
        )
    })
}

/// An HTTP header name (RFC 7230 token).
pub fn check_header_name(name: &str) -> Result<(), String> {
    const TCHARS: &[u8] = b"!#$%&'*+-.^_`|~";
    if name.is_empty() {
        return Err("header name cannot be empty".into());
    }
    if name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || TCHARS.contains(&b))
    {
        Ok(())
    } else {
        Err(format!("header name {name:?} is not a valid header name"))
    }
}

/// A header value: no control characters but tab.
pub fn check_header_value(value: &str) -> Result<(), String> {
    if value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        Err(format!(
            "header value {value:?} contains control characters"
        ))
    } else {
        Ok(())
    }
}

/// Kubernetes label keys and values (`labels.Instance.Validate`).
pub fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), String> {
    fn name_ok(s: &str) -> bool {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()
    }
    for (k, v) in labels {
        let key_ok = match k.split_once('/') {
            Some((prefix, name)) => check_fqdn(prefix).is_ok() && name_ok(name),
            None => name_ok(k),
        };
        if !key_ok {
            return Err(format!("invalid label key {k:?}"));
        }
        if !v.is_empty() && !name_ok(v) {
            return Err(format!("invalid label value {v:?} of {k:?}"));
        }
    }
    Ok(())
}

fn check_port(n: u32) -> Result<(), String> {
    if (1..=65535).contains(&n) {
        Ok(())
    } else {
        Err(format!("port number {n} must be in the range 1..65535"))
    }
}

/// Istio's `validateExportTo`.
fn check_export_to(
    namespace: &str,
    export_to: &[String],
    service_entry: bool,
    errors: &mut Vec<FieldError>,
) {
    let mut seen = BTreeSet::new();
    for (i, e) in export_to.iter().enumerate() {
        let path = format!("spec.exportTo[{i}]");
        let key = if e == "." { namespace } else { e.as_str() };
        if !seen.insert(key.to_string()) {
            let reason = if key != e {
                format!("duplicate entries in exportTo: . and current namespace {namespace}")
            } else {
                format!("duplicate entries in exportTo for entry {e}")
            };
            errors.push(field_error(path, reason));
            continue;
        }
        let valid = e == "*" || e == "." || (service_entry && e == "~") || is_dns1123_label(e);
        if !valid {
            errors.push(field_error(
                path,
                format!("{e:?} is not a valid exportTo value: `.`, `*` or a namespace name"),
            ));
        }
    }
    if seen.contains("*") && export_to.len() > 1 {
        errors.push(field_error(
            "spec.exportTo",
            "cannot have both public (*) and non-public exportTo values for a resource",
        ));
    }
    if seen.contains("~") && export_to.len() > 1 {
        errors.push(field_error(
            "spec.exportTo",
            "cannot export service entry to no one (~) and someone",
        ));
    }
}

/// Whether an object with `export_to` in `namespace` is visible from `from` (`*` and empty:
/// everyone; `.`: its own namespace; `~`: no one).
pub fn exported_to(namespace: &str, export_to: &[String], from: &str) -> bool {
    export_to.is_empty()
        || export_to
            .iter()
            .any(|e| e == "*" || e == from || (e == "." && namespace == from))
}

fn check_string_match(m: &StringMatch, path: &str, allow_empty_prefix: bool) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let set = [m.exact.is_some(), m.prefix.is_some(), m.regex.is_some()]
        .iter()
        .filter(|s| **s)
        .count();
    if set > 1 {
        errors.push(field_error(
            path,
            "only one of exact, prefix or regex may be set",
        ));
    }
    if m.prefix.as_deref() == Some("") && !allow_empty_prefix {
        errors.push(field_error(
            format!("{path}.prefix"),
            "prefix string match should not be empty",
        ));
    }
    if let Some(re) = &m.regex {
        if let Err(e) = check_regex(re) {
            errors.push(field_error(format!("{path}.regex"), e));
        }
    }
    errors
}

fn check_duration(d: &Option<Duration>, path: String, errors: &mut Vec<FieldError>) {
    if let Some(d) = d {
        if let Err(e) = d.check() {
            errors.push(field_error(path, e));
        }
    }
}

fn check_percentage(p: &Option<Percent>, path: String, errors: &mut Vec<FieldError>) {
    if let Some(p) = p {
        let v = p.value;
        if !(0.0..=100.0).contains(&v) || (v > 0.0 && v < 0.0001) {
            errors.push(field_error(
                path,
                format!("percentage {v} is neither 0.0, nor in range [0.0001, 100.0]"),
            ));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// VirtualService validation (Istio's ValidateVirtualService).
// ---------------------------------------------------------------------------------------------

fn check_virtual_service(spec: &VirtualServiceSpec, namespace: &str) -> Vec<FieldError> {
    let mut errors = Vec::new();
    if spec.hosts.is_empty() {
        errors.push(field_error(
            "spec.hosts",
            "is required: a VirtualService without hosts is a delegate, and delegation is not supported",
        ));
    }
    for (i, g) in spec.gateways.iter().enumerate() {
        if let Err(e) = check_gateway_name(g) {
            errors.push(field_error(format!("spec.gateways[{i}]"), e));
        }
    }
    let mesh = spec.applies_to_mesh();
    let mut valid_hosts = true;
    for (i, host) in spec.hosts.iter().enumerate() {
        let path = format!("spec.hosts[{i}]");
        match check_wildcard_domain(host) {
            Err(e) if host.parse::<IpAddr>().is_err() => {
                errors.push(field_error(path, e));
                valid_hosts = false;
            }
            Ok(()) if mesh && host == "*" => {
                errors.push(field_error(
                    path,
                    "wildcard host * is not allowed for virtual services bound to the mesh gateway",
                ));
                valid_hosts = false;
            }
            _ => {}
        }
    }
    if valid_hosts {
        for i in 0..spec.hosts.len() {
            for j in i + 1..spec.hosts.len() {
                let (a, b) = (&spec.hosts[i], &spec.hosts[j]);
                if hosts_overlap(a, b) {
                    errors.push(field_error(
                        format!("spec.hosts[{j}]"),
                        format!("duplicate hosts in virtual service: {a} & {b}"),
                    ));
                }
            }
        }
    }
    if spec.http.is_empty() && spec.tcp.is_empty() && spec.tls.is_empty() {
        errors.push(field_error(
            "spec",
            "http, tcp or tls must be provided in virtual service",
        ));
    }
    for (i, http) in spec.http.iter().enumerate() {
        check_http_route(http, &format!("spec.http[{i}]"), mesh, &mut errors);
    }
    for (i, tls) in spec.tls.iter().enumerate() {
        let path = format!("spec.tls[{i}]");
        if tls.matches.is_empty() {
            errors.push(field_error(
                format!("{path}.match"),
                "TLS route must have at least one match condition",
            ));
        }
        for (j, m) in tls.matches.iter().enumerate() {
            let mpath = format!("{path}.match[{j}]");
            if m.sni_hosts.is_empty() {
                errors.push(field_error(
                    format!("{mpath}.sniHosts"),
                    "TLS match must have at least one SNI host",
                ));
            }
            for (k, sni) in m.sni_hosts.iter().enumerate() {
                let p = format!("{mpath}.sniHosts[{k}]");
                if let Err(e) = check_wildcard_domain(sni) {
                    if sni.parse::<IpAddr>().is_err() {
                        errors.push(field_error(p, e));
                    }
                } else if !spec.hosts.iter().any(|h| host_subset_of(sni, h)) {
                    errors.push(field_error(
                        p,
                        format!(
                            "SNI host {sni:?} is not a compatible subset of any of the virtual service hosts: [{}]",
                            spec.hosts.join(", ")
                        ),
                    ));
                }
            }
            check_l4_match(
                &m.destination_subnets,
                m.port,
                &m.source_labels,
                &m.gateways,
                &mpath,
                &mut errors,
            );
        }
        if tls.route.is_empty() {
            errors.push(field_error(
                format!("{path}.route"),
                "TLS route is required",
            ));
        }
        check_route_destinations(&tls.route, &path, &mut errors);
    }
    for (i, tcp) in spec.tcp.iter().enumerate() {
        let path = format!("spec.tcp[{i}]");
        for (j, m) in tcp.matches.iter().enumerate() {
            check_l4_match(
                &m.destination_subnets,
                m.port,
                &m.source_labels,
                &m.gateways,
                &format!("{path}.match[{j}]"),
                &mut errors,
            );
        }
        if tcp.route.is_empty() {
            errors.push(field_error(
                format!("{path}.route"),
                "TCP route is required",
            ));
        }
        check_route_destinations(&tcp.route, &path, &mut errors);
    }
    check_export_to(namespace, &spec.export_to, false, &mut errors);
    errors
}

/// `namespace/name` or a (legacy) FQDN, or `mesh`.
fn check_gateway_name(g: &str) -> Result<(), String> {
    match g.split_once('/') {
        None => check_fqdn(g),
        Some((ns, name)) => {
            if ns.is_empty() || name.is_empty() {
                Err("config namespace and gateway name cannot be empty".into())
            } else if !is_dns1123_label(ns) {
                Err(format!("invalid value for namespace: {ns:?}"))
            } else if !is_dns1123_label(name) {
                Err(format!("invalid value for gateway name: {name:?}"))
            } else {
                Ok(())
            }
        }
    }
}

/// Istio's `host.Name.Matches`: equal, or one wildcard covers the other.
fn hosts_overlap(a: &str, b: &str) -> bool {
    host_subset_of(a, b) || host_subset_of(b, a)
}

/// Istio's `host.Name.SubsetOf`: every name `a` covers is covered by `b`.
fn host_subset_of(a: &str, b: &str) -> bool {
    if a == b || b == "*" {
        return true;
    }
    match (a.strip_prefix('*'), b.strip_prefix('*')) {
        (Some(sa), Some(sb)) => sa.ends_with(sb),
        (None, Some(sb)) => a.ends_with(sb),
        _ => false,
    }
}

fn check_l4_match(
    subnets: &[String],
    port: u32,
    source_labels: &BTreeMap<String, String>,
    gateways: &[String],
    path: &str,
    errors: &mut Vec<FieldError>,
) {
    for (k, s) in subnets.iter().enumerate() {
        if let Err(e) = check_ip_subnet(s) {
            errors.push(field_error(format!("{path}.destinationSubnets[{k}]"), e));
        }
    }
    if port != 0 {
        if let Err(e) = check_port(port) {
            errors.push(field_error(format!("{path}.port"), e));
        }
    }
    if let Err(e) = check_labels(source_labels) {
        errors.push(field_error(format!("{path}.sourceLabels"), e));
    }
    for (k, g) in gateways.iter().enumerate() {
        if let Err(e) = check_gateway_name(g) {
            errors.push(field_error(format!("{path}.gateways[{k}]"), e));
        }
    }
}

fn check_route_destinations(route: &[RouteDestination], path: &str, errors: &mut Vec<FieldError>) {
    let mut total = 0i64;
    for (j, r) in route.iter().enumerate() {
        let rpath = format!("{path}.route[{j}]");
        match &r.destination {
            None => errors.push(field_error(
                format!("{rpath}.destination"),
                "destination is required",
            )),
            Some(d) => check_destination(d, &format!("{rpath}.destination"), errors),
        }
        check_weight(r.weight, &rpath, errors);
        total += i64::from(r.weight);
    }
    if route.len() > 1 && total == 0 {
        errors.push(field_error(
            format!("{path}.route"),
            "total destination weight = 0",
        ));
    }
}

fn check_weight(weight: i32, path: &str, errors: &mut Vec<FieldError>) {
    if weight < 0 {
        errors.push(field_error(
            format!("{path}.weight"),
            format!("weight {weight} < 0"),
        ));
    }
}

fn check_destination(d: &Destination, path: &str, errors: &mut Vec<FieldError>) {
    if d.host == "*" {
        errors.push(field_error(
            format!("{path}.host"),
            "invalid destination host *",
        ));
    } else if let Err(e) = check_wildcard_domain(&d.host) {
        errors.push(field_error(format!("{path}.host"), e));
    }
    if !d.subset.is_empty() && !is_dns1123_label(&d.subset) {
        errors.push(field_error(
            format!("{path}.subset"),
            format!("subset name is invalid: {}", d.subset),
        ));
    }
    if let Some(p) = &d.port {
        if let Err(e) = check_port(p.number) {
            errors.push(field_error(format!("{path}.port.number"), e));
        }
    }
}

fn check_header_operations(
    ops: &HeaderOperations,
    path: &str,
    request: bool,
    errors: &mut Vec<FieldError>,
) {
    // Envoy's `:authority` is set through `host`/`:authority` on requests (an authority
    // rewrite); other pseudo headers, and `Host` on responses, cannot be changed.
    let check_name = |name: &str, removing: bool| -> Result<(), String> {
        if name.is_empty() {
            return Err("header name cannot be empty".into());
        }
        let authority =
            name.eq_ignore_ascii_case(":authority") || name.eq_ignore_ascii_case("host");
        if request && !removing && authority {
            return Ok(());
        }
        if name.eq_ignore_ascii_case("host") {
            return Err(format!("invalid header {name:?}: cannot set Host header"));
        }
        if name.starts_with(':') {
            return Err(format!(
                "invalid header {name:?}: header cannot have \":\" prefix"
            ));
        }
        check_header_name(name)
    };
    for (field, map) in [("set", &ops.set), ("add", &ops.add)] {
        for (name, value) in map {
            let p = format!("{path}.{field}.{name}");
            if let Err(e) = check_name(name, false).and_then(|_| check_header_value(value)) {
                errors.push(field_error(p, e));
            }
        }
    }
    for (k, name) in ops.remove.iter().enumerate() {
        if let Err(e) = check_name(name, true) {
            errors.push(field_error(format!("{path}.remove[{k}]"), e));
        }
    }
}

fn check_headers(headers: &Option<Headers>, path: &str, errors: &mut Vec<FieldError>) {
    let Some(h) = headers else { return };
    if let Some(r) = &h.request {
        check_header_operations(r, &format!("{path}.headers.request"), true, errors);
    }
    if let Some(r) = &h.response {
        check_header_operations(r, &format!("{path}.headers.response"), false, errors);
    }
}

/// The gRPC status names Istio accepts for `abort.grpcStatus` (and their numbers).
pub const GRPC_STATUSES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The retry conditions Envoy knows (`x-envoy-retry-on` and `x-envoy-retry-grpc-on`).
pub const RETRY_ON: [&str; 16] = [
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "retriable-headers",
    "envoy-ratelimited",
    "http3-post-connect-failure",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

fn check_http_route(http: &HttpRoute, path: &str, mesh: bool, errors: &mut Vec<FieldError>) {
    let err = |errors: &mut Vec<FieldError>, field: &str, reason: &str| {
        let p = if field.is_empty() {
            path.to_string()
        } else {
            format!("{path}.{field}")
        };
        errors.push(field_error(p, reason));
    };
    if http.delegate.is_some() {
        err(errors, "delegate", "delegate is not supported");
    }
    // Conflicts (validateHTTPRouteConflict).
    if http.redirect.is_some() {
        if !http.route.is_empty() {
            err(
                errors,
                "redirect",
                "HTTP route cannot contain both route and redirect",
            );
        }
        if http.fault.is_some() {
            err(
                errors,
                "redirect",
                "HTTP route cannot contain both fault and redirect",
            );
        }
        if http.rewrite.is_some() {
            err(
                errors,
                "redirect",
                "HTTP route rule cannot contain both rewrite and redirect",
            );
        }
        if http.direct_response.is_some() {
            err(
                errors,
                "redirect",
                "HTTP route rule cannot contain both direct_response and redirect",
            );
        }
    } else if http.direct_response.is_some() {
        if !http.route.is_empty() {
            err(
                errors,
                "directResponse",
                "HTTP route cannot contain both route and direct_response",
            );
        }
        if http.fault.is_some() {
            err(
                errors,
                "directResponse",
                "HTTP route cannot contain both fault and direct_response",
            );
        }
        if http.rewrite.is_some() {
            err(
                errors,
                "directResponse",
                "HTTP route rule cannot contain both rewrite and direct_response",
            );
        }
    } else if http.route.is_empty() && http.delegate.is_none() {
        err(
            errors,
            "route",
            "HTTP route, redirect or direct_response is required",
        );
    }
    if http.mirror.is_some() && !http.mirrors.is_empty() {
        err(
            errors,
            "mirrors",
            "HTTP route cannot contain both mirror and mirrors",
        );
    }

    // Matches (validateHTTPRouteMatchRequest).
    for (j, m) in http.matches.iter().enumerate() {
        let mpath = format!("{path}.match[{j}]");
        for (name, sm) in &m.headers {
            let p = format!("{mpath}.headers.{name}");
            if name.starts_with("@request.auth.claims") {
                if mesh {
                    errors.push(field_error(
                        p.clone(),
                        format!(
                            "JWT claim based routing (key: {name}) is only supported for gateway"
                        ),
                    ));
                }
            } else if !matches!(
                name.as_str(),
                ":method" | ":scheme" | ":authority" | ":path" | ":status"
            ) {
                if let Err(e) = check_header_name(name) {
                    errors.push(field_error(p.clone(), e));
                }
            }
            errors.extend(check_string_match(sm, &p, false));
        }
        for (name, sm) in &m.without_headers {
            let p = format!("{mpath}.withoutHeaders.{name}");
            if !name.starts_with(':') {
                if let Err(e) = check_header_name(name) {
                    errors.push(field_error(p.clone(), e));
                }
            }
            // `regex: "*"` is Istio's way of writing "present", not an RE2 regex.
            if sm.regex.as_deref() != Some("*") {
                errors.extend(check_string_match(sm, &p, false));
            }
        }
        // Envoy allows an empty URI prefix, not an empty scheme/method/authority one.
        if let Some(u) = &m.uri {
            errors.extend(check_string_match(u, &format!("{mpath}.uri"), true));
        }
        for (field, sm) in [
            ("scheme", &m.scheme),
            ("method", &m.method),
            ("authority", &m.authority),
        ] {
            if let Some(sm) = sm {
                errors.extend(check_string_match(sm, &format!("{mpath}.{field}"), false));
            }
        }
        for (name, sm) in &m.query_params {
            errors.extend(check_string_match(
                sm,
                &format!("{mpath}.queryParams.{name}"),
                false,
            ));
        }
        if m.port != 0 {
            if let Err(e) = check_port(m.port) {
                errors.push(field_error(format!("{mpath}.port"), e));
            }
        }
        if let Err(e) = check_labels(&m.source_labels) {
            errors.push(field_error(format!("{mpath}.sourceLabels"), e));
        }
        for (k, g) in m.gateways.iter().enumerate() {
            if let Err(e) = check_gateway_name(g) {
                errors.push(field_error(format!("{mpath}.gateways[{k}]"), e));
            }
        }
        if !m.source_namespace.is_empty() && !is_dns1123_label(&m.source_namespace) {
            errors.push(field_error(
                format!("{mpath}.sourceNamespace"),
                format!("sourceNamespace match {} is invalid", m.source_namespace),
            ));
        }
    }

    check_headers(&http.headers, path, errors);

    if let Some(cors) = &http.cors_policy {
        let cpath = format!("{path}.corsPolicy");
        for (k, o) in cors.allow_origins.iter().enumerate() {
            let p = format!("{cpath}.allowOrigins[{k}]");
            let value = o.exact.as_ref().or(o.prefix.as_ref()).or(o.regex.as_ref());
            if value.is_none_or(|v| v.is_empty()) {
                errors.push(field_error(
                    p,
                    "'' is not a valid match type for CORS allow origins",
                ));
            } else {
                errors.extend(check_string_match(o, &p, false));
            }
        }
        const METHODS: [&str; 10] = [
            "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "CONNECT", "OPTIONS", "TRACE", "*",
        ];
        for (k, m) in cors.allow_methods.iter().enumerate() {
            if !METHODS.contains(&m.as_str()) {
                errors.push(field_error(
                    format!("{cpath}.allowMethods[{k}]"),
                    format!("{m:?} is not a supported HTTP method"),
                ));
            }
        }
        for (field, list) in [
            ("allowHeaders", &cors.allow_headers),
            ("exposeHeaders", &cors.expose_headers),
        ] {
            for (k, h) in list.iter().enumerate() {
                if h != "*" {
                    if let Err(e) = check_header_name(h) {
                        errors.push(field_error(format!("{cpath}.{field}[{k}]"), e));
                    }
                }
            }
        }
        if let Some(age) = &cors.max_age {
            check_duration(&Some(*age), format!("{cpath}.maxAge"), errors);
            if age.0.subsec_nanos() != 0 {
                errors.push(field_error(
                    format!("{cpath}.maxAge"),
                    "max_age duration is accurate only to seconds precision",
                ));
            }
        }
        if let Some(u) = &cors.unmatched_preflights {
            if !matches!(u.as_str(), "UNSPECIFIED" | "FORWARD" | "IGNORE") {
                errors.push(field_error(
                    format!("{cpath}.unmatchedPreflights"),
                    format!("unknown value {u:?}, expected FORWARD or IGNORE"),
                ));
            }
        }
    }

    if let Some(fault) = &http.fault {
        let fpath = format!("{path}.fault");
        if fault.abort.is_none() && fault.delay.is_none() {
            errors.push(field_error(
                fpath.clone(),
                "HTTP fault injection must have an abort and/or a delay",
            ));
        }
        if let Some(abort) = &fault.abort {
            let apath = format!("{fpath}.abort");
            check_percentage(&abort.percentage, format!("{apath}.percentage"), errors);
            check_deprecated_percent(abort.percent, &format!("{apath}.percent"), errors);
            let kinds = [
                abort.http_status.is_some(),
                abort.grpc_status.is_some(),
                abort.http2_error.is_some(),
            ];
            match kinds.iter().filter(|k| **k).count() {
                0 => errors.push(field_error(
                    apath.clone(),
                    "one of httpStatus, grpcStatus or http2Error is required",
                )),
                1 => {}
                _ => errors.push(field_error(
                    apath.clone(),
                    "only one of httpStatus, grpcStatus or http2Error may be set",
                )),
            }
            if let Some(s) = abort.http_status {
                if !(200..=600).contains(&s) {
                    errors.push(field_error(
                        format!("{apath}.httpStatus"),
                        format!("HTTP status {s} is not in range 200-599"),
                    ));
                }
            }
            if let Some(g) = &abort.grpc_status {
                if !GRPC_STATUSES.contains(&g.as_str()) {
                    errors.push(field_error(
                        format!("{apath}.grpcStatus"),
                        format!("gRPC status {g:?} is not supported: use a name such as NOT_FOUND or UNAVAILABLE"),
                    ));
                }
            }
            if abort.http2_error.is_some() {
                errors.push(field_error(
                    format!("{apath}.http2Error"),
                    "HTTP/2 abort fault injection not supported yet",
                ));
            }
        }
        if let Some(delay) = &fault.delay {
            let dpath = format!("{fpath}.delay");
            check_percentage(&delay.percentage, format!("{dpath}.percentage"), errors);
            check_deprecated_percent(delay.percent, &format!("{dpath}.percent"), errors);
            match (&delay.fixed_delay, &delay.exponential_delay) {
                (Some(_), None) => {
                    check_duration(&delay.fixed_delay, format!("{dpath}.fixedDelay"), errors)
                }
                (None, Some(_)) => errors.push(field_error(
                    format!("{dpath}.exponentialDelay"),
                    "exponentialDelay not supported yet",
                )),
                (None, None) => {
                    errors.push(field_error(format!("{dpath}.fixedDelay"), "is required"))
                }
                (Some(_), Some(_)) => errors.push(field_error(
                    dpath.clone(),
                    "only one of fixedDelay or exponentialDelay may be set",
                )),
            }
        }
    }

    if let Some(p) = http.mirror_percent {
        if p > 100 {
            errors.push(field_error(
                format!("{path}.mirrorPercent"),
                format!("mirror_percent must have a max value of 100 (it has {p})"),
            ));
        }
    }
    if let Some(p) = &http.mirror_percentage {
        if p.value > 100.0 {
            errors.push(field_error(
                format!("{path}.mirrorPercentage.value"),
                format!(
                    "mirror_percentage must have a max value of 100 (it has {})",
                    p.value
                ),
            ));
        }
        if p.value < 0.0 {
            errors.push(field_error(
                format!("{path}.mirrorPercentage.value"),
                format!(
                    "mirror_percentage must have a min value of 0 (it has {})",
                    p.value
                ),
            ));
        }
    }
    if let Some(m) = &http.mirror {
        check_destination(m, &format!("{path}.mirror"), errors);
    }
    for (k, m) in http.mirrors.iter().enumerate() {
        let mpath = format!("{path}.mirrors[{k}]");
        match &m.destination {
            None => errors.push(field_error(
                format!("{mpath}.destination"),
                "destination is required for mirrors",
            )),
            Some(d) => check_destination(d, &format!("{mpath}.destination"), errors),
        }
        if let Some(p) = &m.percentage {
            if !(0.0..=100.0).contains(&p.value) {
                errors.push(field_error(
                    format!("{mpath}.percentage.value"),
                    format!(
                        "mirror percentage must be in range 0-100 (it has {})",
                        p.value
                    ),
                ));
            }
        }
    }

    if let Some(r) = &http.redirect {
        let rpath = format!("{path}.redirect");
        if r.uri.is_empty()
            && r.authority.is_empty()
            && r.port.is_none()
            && r.derive_port.is_none()
            && r.scheme.is_empty()
        {
            errors.push(field_error(
                rpath.clone(),
                "redirect must specify URI, authority, scheme, or port",
            ));
        }
        if r.port.is_some() && r.derive_port.is_some() {
            errors.push(field_error(
                rpath.clone(),
                "only one of port or derivePort may be set",
            ));
        }
        if r.redirect_code != 0 && !(300..=399).contains(&r.redirect_code) {
            errors.push(field_error(
                format!("{rpath}.redirectCode"),
                format!(
                    "{} is not a valid redirect code, must be 3xx",
                    r.redirect_code
                ),
            ));
        }
        if !r.scheme.is_empty() && r.scheme != "http" && r.scheme != "https" {
            errors.push(field_error(
                format!("{rpath}.scheme"),
                "invalid redirect scheme, must be \"http\" or \"https\"",
            ));
        }
        if let Some(p) = r.port {
            if let Err(e) = check_port(p) {
                errors.push(field_error(format!("{rpath}.port"), e));
            }
        }
    }

    if let Some(d) = &http.direct_response {
        let dpath = format!("{path}.directResponse");
        if !(200..=600).contains(&d.status) {
            errors.push(field_error(
                format!("{dpath}.status"),
                format!("HTTP status {} is not in range 200-599", d.status),
            ));
        }
        if let Some(body) = &d.body {
            match (&body.string, &body.bytes) {
                (Some(_), Some(_)) => errors.push(field_error(
                    format!("{dpath}.body"),
                    "only one of string or bytes may be set",
                )),
                (None, Some(b)) if base64_decode(b).is_none() => errors.push(field_error(
                    format!("{dpath}.body.bytes"),
                    "is not valid base64",
                )),
                _ => {}
            }
            let size = body
                .string
                .as_ref()
                .or(body.bytes.as_ref())
                .map_or(0, |s| s.len());
            if size > 1024 * 1024 {
                errors.push(field_error(
                    format!("{dpath}.body"),
                    "large direct_responses may impact control plane performance, must be less than 1MB",
                ));
            }
        }
    }

    if let Some(r) = &http.retries {
        let rpath = format!("{path}.retries");
        if r.attempts < 0 {
            errors.push(field_error(
                format!("{rpath}.attempts"),
                "attempts cannot be negative",
            ));
        }
        if r.attempts == 0
            && (r.per_try_timeout.is_some()
                || !r.retry_on.is_empty()
                || r.retry_remote_localities.is_some())
        {
            errors.push(field_error(
                format!("{rpath}.attempts"),
                "http retry policy configured when attempts are set to 0 (disabled)",
            ));
        }
        check_duration(&r.per_try_timeout, format!("{rpath}.perTryTimeout"), errors);
        check_duration(&r.backoff, format!("{rpath}.backoff"), errors);
        if !r.retry_on.is_empty() {
            for policy in r.retry_on.split(',') {
                let status = policy
                    .parse::<u16>()
                    .ok()
                    .and_then(|c| http::StatusCode::from_u16(c).ok())
                    .and_then(|c| c.canonical_reason());
                if status.is_none() && !RETRY_ON.contains(&policy) {
                    errors.push(field_error(
                        format!("{rpath}.retryOn"),
                        format!("{policy:?} is not a valid retryOn policy"),
                    ));
                }
            }
        }
    }

    if let Some(rw) = &http.rewrite {
        let wpath = format!("{path}.rewrite");
        if !rw.uri.is_empty() && rw.uri_regex_rewrite.is_some() {
            errors.push(field_error(
                wpath.clone(),
                "rewrite may only contain one of URI or UriRegexRewrite",
            ));
        } else if rw.uri.is_empty() && rw.uri_regex_rewrite.is_none() && rw.authority.is_empty() {
            errors.push(field_error(
                wpath.clone(),
                "rewrite must specify at least one of URI, UriRegexRewrite, or authority",
            ));
        }
        if let Some(re) = &rw.uri_regex_rewrite {
            let p = format!("{wpath}.uriRegexRewrite");
            if re.pattern.is_empty() || re.rewrite.is_empty() {
                errors.push(field_error(
                    p.clone(),
                    "UriRegexRewrite requires both Rewrite and Match fields to be specified",
                ));
            }
            if !re.pattern.is_empty() {
                if let Err(e) = check_regex(&re.pattern) {
                    errors.push(field_error(format!("{p}.match"), e));
                }
            }
        }
    }
    // Authority set once only (validateAuthorityRewrite).
    let mut authority = http
        .rewrite
        .as_ref()
        .map(|r| r.authority.clone())
        .unwrap_or_default();
    if let Some(req) = http.headers.as_ref().and_then(|h| h.request.as_ref()) {
        for (field, map) in [("set", &req.set), ("add", &req.add)] {
            for (k, v) in map {
                if k.eq_ignore_ascii_case(":authority") || k.eq_ignore_ascii_case("host") {
                    if !authority.is_empty() {
                        errors.push(field_error(
                            format!("{path}.headers.request.{field}.{k}"),
                            format!("authority header cannot be set multiple times: have {authority:?}, attempting to set {v:?}"),
                        ));
                    }
                    authority = v.clone();
                }
            }
        }
    }

    // Destinations (validateHTTPRouteDestinations).
    let mut total = 0i64;
    for (k, r) in http.route.iter().enumerate() {
        let rpath = format!("{path}.route[{k}]");
        match &r.destination {
            None => errors.push(field_error(
                format!("{rpath}.destination"),
                "destination is required",
            )),
            Some(d) => check_destination(d, &format!("{rpath}.destination"), errors),
        }
        check_headers(&r.headers, &rpath, errors);
        check_weight(r.weight, &rpath, errors);
        total += i64::from(r.weight);
    }
    if http.route.len() > 1 && total == 0 {
        errors.push(field_error(
            format!("{path}.route"),
            "total destination weight = 0",
        ));
    }
    check_duration(&http.timeout, format!("{path}.timeout"), errors);
}

fn check_deprecated_percent(p: Option<i32>, path: &str, errors: &mut Vec<FieldError>) {
    if let Some(p) = p {
        if !(0..=100).contains(&p) {
            errors.push(field_error(
                path,
                format!("percentage {p} is not in range 0..100"),
            ));
        }
    }
}

/// Standard base64 (protobuf JSON `bytes`), padding optional.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

// ---------------------------------------------------------------------------------------------
// DestinationRule validation (Istio's ValidateDestinationRule).
// ---------------------------------------------------------------------------------------------

fn check_destination_rule(spec: &DestinationRuleSpec, namespace: &str) -> Vec<FieldError> {
    let mut errors = Vec::new();
    if let Err(e) = check_wildcard_domain(&spec.host) {
        errors.push(field_error("spec.host", e));
    }
    if let Some(tp) = &spec.traffic_policy {
        check_traffic_policy(tp, "spec.trafficPolicy", &mut errors);
    }
    let mut names = BTreeSet::new();
    for (i, s) in spec.subsets.iter().enumerate() {
        let path = format!("spec.subsets[{i}]");
        if !names.insert(s.name.as_str()) {
            errors.push(field_error(
                format!("{path}.name"),
                format!("duplicate subset names: {}", s.name),
            ));
        }
        if s.name.is_empty() {
            errors.push(field_error(
                format!("{path}.name"),
                "subset name cannot be empty",
            ));
        } else if !is_dns1123_label(&s.name) {
            errors.push(field_error(
                format!("{path}.name"),
                format!("subset name is invalid: {}", s.name),
            ));
        }
        if let Err(e) = check_labels(&s.labels) {
            errors.push(field_error(format!("{path}.labels"), e));
        }
        if let Some(tp) = &s.traffic_policy {
            check_traffic_policy(tp, &format!("{path}.trafficPolicy"), &mut errors);
        }
    }
    check_export_to(namespace, &spec.export_to, false, &mut errors);
    if let Some(sel) = &spec.workload_selector {
        for (k, v) in &sel.match_labels {
            if k.is_empty() {
                errors.push(field_error(
                    "spec.workloadSelector.matchLabels",
                    "empty key is not supported in selector",
                ));
            } else if k.contains('*') || v.contains('*') {
                errors.push(field_error(
                    format!("spec.workloadSelector.matchLabels.{k}"),
                    format!("wildcard is not supported in selector: \"{k}={v}\""),
                ));
            }
        }
        let own = spec.export_to.iter().all(|e| e == "." || e == namespace);
        if !spec.export_to.is_empty() && !own {
            errors.push(field_error(
                "spec.exportTo",
                "destination rule with workload selector cannot have exportTo beyond current namespace",
            ));
        }
    }
    errors
}

fn check_traffic_policy(tp: &TrafficPolicy, path: &str, errors: &mut Vec<FieldError>) {
    if tp.outlier_detection.is_none()
        && tp.connection_pool.is_none()
        && tp.load_balancer.is_none()
        && tp.tls.is_none()
        && tp.port_level_settings.is_empty()
        && tp.tunnel.is_none()
        && tp.proxy_protocol.is_none()
    {
        errors.push(field_error(
            path,
            "traffic policy must have at least one field",
        ));
        return;
    }
    if tp.tunnel.is_some() && tp.proxy_protocol.is_some() {
        errors.push(field_error(
            path,
            "tunnel and proxyProtocol must not be set together",
        ));
    }
    check_policy_parts(
        &tp.load_balancer,
        &tp.connection_pool,
        &tp.outlier_detection,
        &tp.tls,
        path,
        errors,
    );
    for (i, p) in tp.port_level_settings.iter().enumerate() {
        let ppath = format!("{path}.portLevelSettings[{i}]");
        match &p.port {
            None => errors.push(field_error(
                format!("{ppath}.port"),
                "portTrafficPolicy must have valid port",
            )),
            Some(port) => {
                if let Err(e) = check_port(port.number) {
                    errors.push(field_error(format!("{ppath}.port.number"), e));
                }
            }
        }
        if p.outlier_detection.is_none()
            && p.connection_pool.is_none()
            && p.load_balancer.is_none()
            && p.tls.is_none()
        {
            errors.push(field_error(
                ppath,
                "port traffic policy must have at least one field",
            ));
        } else {
            check_policy_parts(
                &p.load_balancer,
                &p.connection_pool,
                &p.outlier_detection,
                &p.tls,
                &ppath,
                errors,
            );
        }
    }
    if let Some(t) = &tp.tunnel {
        let tpath = format!("{path}.tunnel");
        if !t.protocol.is_empty() && t.protocol != "CONNECT" && t.protocol != "POST" {
            errors.push(field_error(
                format!("{tpath}.protocol"),
                "tunnel protocol must be \"CONNECT\" or \"POST\"",
            ));
        }
        if check_fqdn(&t.target_host).is_err() && t.target_host.parse::<IpAddr>().is_err() {
            errors.push(field_error(
                format!("{tpath}.targetHost"),
                "tunnel target host must be valid FQDN or IP address",
            ));
        }
        if let Err(e) = check_port(t.target_port) {
            errors.push(field_error(format!("{tpath}.targetPort"), e));
        }
    }
}

fn check_policy_parts(
    lb: &Option<LoadBalancerSettings>,
    pool: &Option<ConnectionPoolSettings>,
    outlier: &Option<OutlierDetection>,
    tls: &Option<ClientTlsSettings>,
    path: &str,
    errors: &mut Vec<FieldError>,
) {
    if let Some(o) = outlier {
        let opath = format!("{path}.outlierDetection");
        check_duration(
            &o.base_ejection_time,
            format!("{opath}.baseEjectionTime"),
            errors,
        );
        check_duration(&o.interval, format!("{opath}.interval"), errors);
        if !o.split_external_local_origin_errors.unwrap_or(false)
            && o.consecutive_local_origin_failures.unwrap_or(0) > 0
        {
            errors.push(field_error(
                format!("{opath}.consecutiveLocalOriginFailures"),
                "outlier detection consecutive local origin failures is specified, but split external local origin errors is set to false",
            ));
        }
        for (field, v) in [
            ("maxEjectionPercent", o.max_ejection_percent),
            ("minHealthPercent", o.min_health_percent),
        ] {
            if let Some(v) = v {
                if !(0..=100).contains(&v) {
                    errors.push(field_error(
                        format!("{opath}.{field}"),
                        format!("percentage {v} is not in range 0..100"),
                    ));
                }
            }
        }
    }
    if let Some(p) = pool {
        let cpath = format!("{path}.connectionPool");
        if p.http.is_none() && p.tcp.is_none() {
            errors.push(field_error(
                cpath.clone(),
                "connection pool must have at least one field",
            ));
        }
        if let Some(h) = &p.http {
            let hpath = format!("{cpath}.http");
            for (field, v) in [
                ("http1MaxPendingRequests", h.http1_max_pending_requests),
                ("http2MaxRequests", h.http2_max_requests),
                ("maxRequestsPerConnection", h.max_requests_per_connection),
                ("maxRetries", h.max_retries),
                ("maxConcurrentStreams", h.max_concurrent_streams),
            ] {
                if v.is_some_and(|v| v < 0) {
                    errors.push(field_error(
                        format!("{hpath}.{field}"),
                        "must be non-negative",
                    ));
                }
            }
            check_duration(&h.idle_timeout, format!("{hpath}.idleTimeout"), errors);
            if h.h2_upgrade_policy == Some(H2UpgradePolicy::Upgrade)
                && h.use_client_protocol == Some(true)
            {
                errors.push(field_error(
                    format!("{hpath}.useClientProtocol"),
                    "use client protocol must not be true when H2UpgradePolicy is UPGRADE",
                ));
            }
        }
        if let Some(t) = &p.tcp {
            let tpath = format!("{cpath}.tcp");
            if t.max_connections.is_some_and(|v| v < 0) {
                errors.push(field_error(
                    format!("{tpath}.maxConnections"),
                    "max connections must be non-negative",
                ));
            }
            check_duration(
                &t.connect_timeout,
                format!("{tpath}.connectTimeout"),
                errors,
            );
            check_duration(
                &t.max_connection_duration,
                format!("{tpath}.maxConnectionDuration"),
                errors,
            );
            // 0s disables the idle timeout.
            if t.idle_timeout.is_some_and(|d| !d.0.is_zero()) {
                check_duration(&t.idle_timeout, format!("{tpath}.idleTimeout"), errors);
            }
            if let Some(ka) = &t.tcp_keepalive {
                check_duration(&ka.time, format!("{tpath}.tcpKeepalive.time"), errors);
                check_duration(
                    &ka.interval,
                    format!("{tpath}.tcpKeepalive.interval"),
                    errors,
                );
            }
        }
    }
    if let Some(lb) = lb {
        let lpath = format!("{path}.loadBalancer");
        if lb.simple.is_some() && lb.consistent_hash.is_some() {
            errors.push(field_error(
                lpath.clone(),
                "only one of simple or consistentHash may be set",
            ));
        }
        if let Some(ch) = &lb.consistent_hash {
            let hpath = format!("{lpath}.consistentHash");
            let keys = [
                ch.http_header_name.is_some(),
                ch.http_cookie.is_some(),
                ch.use_source_ip.is_some(),
                ch.http_query_parameter_name.is_some(),
            ];
            if keys.iter().filter(|k| **k).count() > 1 {
                errors.push(field_error(
                    hpath.clone(),
                    "only one of httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName may be set",
                ));
            }
            if ch.http_cookie.as_ref().is_some_and(|c| c.name.is_empty()) {
                errors.push(field_error(
                    format!("{hpath}.httpCookie.name"),
                    "name required for HttpCookie",
                ));
            }
            if ch.ring_hash.is_some() && ch.maglev.is_some() {
                errors.push(field_error(
                    hpath.clone(),
                    "only one of ringHash or maglev may be set",
                ));
            }
            if ch.minimum_ring_size != 0 && (ch.ring_hash.is_some() || ch.maglev.is_some()) {
                errors.push(field_error(
                    format!("{hpath}.minimumRingSize"),
                    "only one of MinimumRingSize or Maglev/Ringhash can be specified",
                ));
            }
            if let Some(m) = &ch.maglev {
                let t = m.table_size;
                let reason = if t == 0 {
                    Some("tableSize must be set for maglev")
                } else if t >= 5_000_011 {
                    Some("tableSize must be less than 5000011 for maglev")
                } else if !is_prime(t) {
                    Some("tableSize must be a prime number for maglev")
                } else {
                    None
                };
                if let Some(r) = reason {
                    errors.push(field_error(format!("{hpath}.maglev.tableSize"), r));
                }
            }
        }
        if let Some(l) = &lb.locality_lb_setting {
            let p = format!("{lpath}.localityLbSetting");
            if !l.distribute.is_empty() && !l.failover.is_empty() {
                errors.push(field_error(
                    p.clone(),
                    "can not simultaneously specify 'distribute' and 'failover'",
                ));
            }
            for (i, d) in l.distribute.iter().enumerate() {
                let total: u64 = d.to.values().map(|v| u64::from(*v)).sum();
                if total != 100 {
                    errors.push(field_error(
                        format!("{p}.distribute[{i}].to"),
                        format!("total weight {total} of locality {} is not 100", d.from),
                    ));
                }
            }
            for (i, f) in l.failover.iter().enumerate() {
                if f.from == f.to {
                    errors.push(field_error(
                        format!("{p}.failover[{i}]"),
                        "locality lb failover settings must specify different regions",
                    ));
                }
                if f.to.contains('*') {
                    errors.push(field_error(
                        format!("{p}.failover[{i}].to"),
                        "locality lb failover region should not contain '*' wildcard",
                    ));
                }
            }
        }
        if let Some(w) = &lb.warmup {
            let wpath = format!("{lpath}.warmup");
            match &w.duration {
                None => errors.push(field_error(
                    format!("{wpath}.duration"),
                    "duration is required",
                )),
                Some(_) => check_duration(&w.duration, format!("{wpath}.duration"), errors),
            }
            if w.minimum_percent.is_some_and(|v| v > 100.0) {
                errors.push(field_error(
                    format!("{wpath}.minimumPercent"),
                    "minimumPercent value should be less than or equal to 100",
                ));
            }
            if w.aggression.is_some_and(|v| v < 1.0) {
                errors.push(field_error(
                    format!("{wpath}.aggression"),
                    "aggression should be greater than or equal to 1",
                ));
            }
        }
        check_duration(
            &lb.warmup_duration_secs,
            format!("{lpath}.warmupDurationSecs"),
            errors,
        );
    }
    if let Some(t) = tls {
        check_client_tls(t, &format!("{path}.tls"), errors);
    }
}

fn is_prime(x: u64) -> bool {
    if x != 0 && x < 4 {
        return true;
    }
    if x.is_multiple_of(2) {
        return false;
    }
    let mut f = 3;
    while f * f <= x {
        if x.is_multiple_of(f) {
            return false;
        }
        f += 2;
    }
    true
}

/// Istio's `ValidateTLS` for client (origination) settings.
fn check_client_tls(t: &ClientTlsSettings, path: &str, errors: &mut Vec<FieldError>) {
    if t.insecure_skip_verify == Some(true) {
        match t.mode {
            TlsMode::Simple
                if !t.ca_certificates.is_empty()
                    || !t.credential_name.is_empty()
                    || t.subject_alt_names.is_some() =>
            {
                errors.push(field_error(
                    path,
                    "cannot specify CaCertificates or CredentialName or SubjectAltNames when InsecureSkipVerify is set true",
                ))
            }
            TlsMode::Mutual
                if !t.ca_certificates.is_empty() || t.subject_alt_names.is_some() =>
            {
                errors.push(field_error(
                    path,
                    "cannot specify CaCertificates or SubjectAltNames when InsecureSkipVerify is set true",
                ))
            }
            _ => {}
        }
    }
    if matches!(t.mode, TlsMode::Simple | TlsMode::Mutual) && !t.credential_name.is_empty() {
        if !t.client_certificate.is_empty()
            || !t.ca_certificates.is_empty()
            || !t.private_key.is_empty()
            || !t.ca_crl.is_empty()
        {
            errors.push(field_error(
                path,
                "cannot specify client certificates or CA certificate or CA CRL If credentialName is set",
            ));
        }
        return;
    }
    if t.mode == TlsMode::Mutual {
        if t.client_certificate.is_empty() {
            errors.push(field_error(
                format!("{path}.clientCertificate"),
                "client certificate required for mutual tls",
            ));
        }
        if t.private_key.is_empty() {
            errors.push(field_error(
                format!("{path}.privateKey"),
                "private key required for mutual tls",
            ));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// ServiceEntry validation (Istio's ValidateServiceEntry).
// ---------------------------------------------------------------------------------------------

/// Istio's `protocol.Parse` names (case-insensitive); `None` for one Istio does not know.
pub fn parse_protocol(p: &str) -> Option<&'static str> {
    const KNOWN: [&str; 12] = [
        "TCP",
        "UDP",
        "GRPC",
        "GRPC-WEB",
        "HTTP",
        "HTTP_PROXY",
        "HTTP2",
        "HTTPS",
        "TLS",
        "MONGO",
        "REDIS",
        "MYSQL",
    ];
    KNOWN.iter().find(|k| k.eq_ignore_ascii_case(p)).copied()
}

fn is_http_protocol(p: &str) -> bool {
    matches!(
        parse_protocol(p),
        Some("HTTP" | "HTTP2" | "GRPC" | "GRPC-WEB" | "HTTP_PROXY")
    )
}

fn check_service_entry(spec: &ServiceEntrySpec, namespace: &str) -> Vec<FieldError> {
    let mut errors = Vec::new();
    if let Some(sel) = &spec.workload_selector {
        for (k, v) in &sel.labels {
            if k.is_empty() {
                errors.push(field_error(
                    "spec.workloadSelector.labels",
                    "empty key is not supported in selector",
                ));
            } else if k.contains('*') || v.contains('*') {
                errors.push(field_error(
                    format!("spec.workloadSelector.labels.{k}"),
                    format!("wildcard is not supported in selector: \"{k}={v}\""),
                ));
            }
        }
        if spec.endpoints.is_some() {
            errors.push(field_error(
                "spec.workloadSelector",
                "only one of WorkloadSelector or Endpoints is allowed in Service Entry",
            ));
        }
    }
    if spec.hosts.is_empty() {
        errors.push(field_error(
            "spec.hosts",
            "service entry must have at least one host",
        ));
    }
    for (i, h) in spec.hosts.iter().enumerate() {
        let path = format!("spec.hosts[{i}]");
        if h == "*" {
            errors.push(field_error(path, "invalid host *"));
        } else if let Err(e) = check_wildcard_domain(h) {
            errors.push(field_error(path, e));
        }
    }
    let mut cidr = false;
    for (i, a) in spec.addresses.iter().enumerate() {
        cidr |= a.contains('/');
        if let Err(e) = check_ip_subnet(a) {
            errors.push(field_error(format!("spec.addresses[{i}]"), e));
        }
    }
    if cidr && !matches!(spec.resolution, Resolution::None | Resolution::Static) {
        errors.push(field_error(
            "spec.addresses",
            "CIDR addresses are allowed only for NONE/STATIC resolution types",
        ));
    }
    let mut names = BTreeSet::new();
    let mut numbers = BTreeSet::new();
    for (i, p) in spec.ports.iter().enumerate() {
        let path = format!("spec.ports[{i}]");
        if !names.insert(p.name.as_str()) {
            errors.push(field_error(
                format!("{path}.name"),
                format!("service entry port name {:?} already defined", p.name),
            ));
        }
        if !numbers.insert(p.number) {
            errors.push(field_error(
                format!("{path}.number"),
                format!("service entry port {} already defined", p.number),
            ));
        }
        if p.target_port != 0 {
            if let Err(e) = check_port(p.target_port) {
                errors.push(field_error(format!("{path}.targetPort"), e));
            }
        }
        if !is_dns1123_label(&p.name) {
            errors.push(field_error(
                format!("{path}.name"),
                format!("invalid port name: {:?}", p.name),
            ));
        }
        if !p.protocol.is_empty() && parse_protocol(&p.protocol).is_none() {
            errors.push(field_error(
                format!("{path}.protocol"),
                format!(
                    "unsupported protocol: {}; expected HTTP, HTTPS, HTTP2, GRPC, GRPC-WEB, TLS, TCP, MONGO, REDIS or MYSQL",
                    p.protocol
                ),
            ));
        }
        if let Err(e) = check_port(p.number) {
            errors.push(field_error(format!("{path}.number"), e));
        }
    }
    let endpoints = spec.endpoints.as_deref().unwrap_or_default();
    let check_endpoint_ports = |e: &WorkloadEntry, path: &str, errors: &mut Vec<FieldError>| {
        for (name, port) in &e.ports {
            if !names.contains(name.as_str()) {
                errors.push(field_error(
                    format!("{path}.ports.{name}"),
                    format!("endpoint port {port} is not defined by the service entry"),
                ));
            }
            if let Err(err) = check_port(*port) {
                errors.push(field_error(format!("{path}.ports.{name}"), err));
            }
        }
        if let Err(err) = check_labels(&e.labels) {
            errors.push(field_error(format!("{path}.labels"), err));
        }
    };
    match spec.resolution {
        Resolution::None => {
            if !endpoints.is_empty() {
                errors.push(field_error(
                    "spec.endpoints",
                    "no endpoints should be provided for resolution type none",
                ));
            }
        }
        Resolution::Static => {
            for (i, e) in endpoints.iter().enumerate() {
                let path = format!("spec.endpoints[{i}]");
                if e.address.is_empty() {
                    errors.push(field_error(
                        format!("{path}.address"),
                        "address is required",
                    ));
                } else if e.address.starts_with("unix://") {
                    errors.push(field_error(
                        format!("{path}.address"),
                        "unix domain socket endpoints are not supported by weft",
                    ));
                } else if e.address.parse::<IpAddr>().is_err() {
                    errors.push(field_error(
                        format!("{path}.address"),
                        format!("endpoint address {:?} is not a valid IP address", e.address),
                    ));
                }
                check_endpoint_ports(e, &path, &mut errors);
            }
        }
        Resolution::Dns | Resolution::DnsRoundRobin => {
            let mode = if spec.resolution == Resolution::Dns {
                "DNS"
            } else {
                "DNS_ROUND_ROBIN"
            };
            if endpoints.is_empty() {
                for (i, h) in spec.hosts.iter().enumerate() {
                    if check_fqdn(h).is_err() {
                        errors.push(field_error(
                            format!("spec.hosts[{i}]"),
                            format!("hosts must be FQDN if no endpoints are provided for resolution mode {mode}"),
                        ));
                    }
                }
            }
            if spec.resolution == Resolution::DnsRoundRobin && endpoints.len() > 1 {
                errors.push(field_error(
                    "spec.endpoints",
                    format!("there must only be 0 or 1 endpoint for resolution mode {mode}"),
                ));
            }
            for (i, e) in endpoints.iter().enumerate() {
                let path = format!("spec.endpoints[{i}]");
                if e.address.parse::<IpAddr>().is_err() && check_fqdn(&e.address).is_err() {
                    errors.push(field_error(
                        format!("{path}.address"),
                        format!(
                            "endpoint address {:?} is not a valid FQDN or an IP address",
                            e.address
                        ),
                    ));
                }
                check_endpoint_ports(e, &path, &mut errors);
            }
        }
    }
    if spec.resolution != Resolution::None && spec.hosts.len() > 1 {
        if let Some(i) = spec.ports.iter().position(|p| {
            !is_http_protocol(&p.protocol)
                && !matches!(parse_protocol(&p.protocol), Some("HTTPS" | "TLS"))
        }) {
            errors.push(field_error(
                format!("spec.ports[{i}].protocol"),
                "multiple hosts provided with non-HTTP, non-TLS ports",
            ));
        }
    }
    check_export_to(namespace, &spec.export_to, true, &mut errors);
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        let d = |s: &str| Duration::parse(s).map(|d| d.0);
        use std::time::Duration as D;
        assert_eq!(d("1s"), Ok(D::from_secs(1)));
        assert_eq!(d("0.5s"), Ok(D::from_millis(500)));
        assert_eq!(d("1.5s"), Ok(D::from_millis(1500)));
        assert_eq!(d("100ms"), Ok(D::from_millis(100)));
        assert_eq!(d("1m30s"), Ok(D::from_secs(90)));
        assert_eq!(d("2h"), Ok(D::from_secs(7200)));
        assert_eq!(d("10us"), Ok(D::from_micros(10)));
        assert_eq!(d("0"), Ok(D::ZERO));
        for bad in ["", "1", "s", "1x", "-1s", "1..5s", ".s"] {
            assert!(d(bad).is_err(), "{bad}");
        }
        assert!(Duration::parse("500us").unwrap().check().is_err());
        assert!(Duration::parse("1500us").unwrap().check().is_err());
        assert!(Duration::parse("1ms").unwrap().check().is_ok());
        assert_eq!(Duration::parse("1500ms").unwrap().to_string(), "1500ms");
        assert_eq!(Duration::parse("2m").unwrap().to_string(), "120s");
    }

    #[test]
    fn domains_and_hosts() {
        assert!(check_wildcard_domain("*").is_ok());
        assert!(check_wildcard_domain("*.example.com").is_ok());
        assert!(check_wildcard_domain("reviews").is_ok());
        assert!(check_wildcard_domain("foo*.example.com").is_err());
        assert!(check_wildcard_domain("*example.com").is_err());
        assert!(check_wildcard_domain("Upper.com").is_err());
        assert!(check_fqdn("api.example.com").is_ok());
        assert!(check_fqdn("*.example.com").is_err());
        assert!(host_subset_of("a.example.com", "*.example.com"));
        assert!(host_subset_of("*.a.example.com", "*.example.com"));
        assert!(!host_subset_of("*.example.com", "a.example.com"));
        assert!(hosts_overlap("*.com", "*.foo.com"));
        assert!(exported_to("a", &[], "b"));
        assert!(exported_to("a", &[".".into()], "a"));
        assert!(!exported_to("a", &[".".into()], "b"));
        assert!(exported_to("a", &["b".into()], "b"));
        assert!(!exported_to("a", &["~".into()], "a"));
    }

    #[test]
    fn base64() {
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("aGVsbG8").unwrap(), b"hello");
        assert!(base64_decode("a*b").is_none());
    }

    #[test]
    fn fault_shares() {
        let delay = FaultDelay {
            percent: Some(10),
            ..Default::default()
        };
        assert_eq!(delay.share(), 10.0);
        let delay = FaultDelay {
            percent: Some(10),
            percentage: Some(Percent { value: 2.5 }),
            ..Default::default()
        };
        assert_eq!(delay.share(), 2.5);
        assert_eq!(FaultAbort::default().share(), 0.0);
    }
}
