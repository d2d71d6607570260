//! The admin API's contract: every type the node serves and the CLI decodes, in one place.
//!
//! The node fills these (the data-path modules return them from their `status()`/`stats()`
//! queries), serde carries them, and `weft …` renders them. A renamed field breaks the build,
//! never silently the output. This module imports nothing from the rest of the crate.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

// ---------------------------------------------------------------------------------------------
// /flows
// ---------------------------------------------------------------------------------------------

/// What weft did with a connection.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Verdict {
    /// Connected to the destination and bytes were relayed.
    Forwarded,
    /// The destination is a Service with no ready endpoint.
    NoEndpoint,
    /// The destination refused, was unreachable, or did not answer in time.
    ConnectFailed,
    /// A connection reached the capture listener without an eBPF redirect record, so its
    /// destination is unknown; it was closed.
    Unidentified,
    /// eBPF redirected a connect() but the connection never reached the proxy (for example
    /// the proxy was down, or the client gave up).
    Unhandled,
    /// Refused by policy: an AuthorizationPolicy, or a security object weft cannot apply that
    /// fails closed (the flow's `policy` names it, its `error` says why).
    Denied,
    /// An HTTP request weft answered itself, as its routes say: a redirect, a direct response,
    /// or 404 when no route matched (`http.response_flags` says which).
    Responded,
    /// The client sent something that is not valid HTTP (a malformed request, a request
    /// smuggling attempt, an oversized header block): answered 400/431, nothing forwarded.
    Malformed,
    /// Refused at once (reset) because the node, or the calling pod, holds as many
    /// connections as weft's limits allow (`--max-connections`, `--max-connections-per-pod`);
    /// the flow's `error` names the limit.
    OverLimit,
}

impl Verdict {
    pub const ALL: [Verdict; 9] = [
        Verdict::Forwarded,
        Verdict::NoEndpoint,
        Verdict::ConnectFailed,
        Verdict::Unidentified,
        Verdict::Unhandled,
        Verdict::Denied,
        Verdict::Responded,
        Verdict::Malformed,
        Verdict::OverLimit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Forwarded => "forwarded",
            Verdict::NoEndpoint => "no_endpoint",
            Verdict::ConnectFailed => "connect_failed",
            Verdict::Unidentified => "unidentified",
            Verdict::Unhandled => "unhandled",
            Verdict::Denied => "denied",
            Verdict::Responded => "responded",
            Verdict::Malformed => "malformed",
            Verdict::OverLimit => "over_limit",
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Verdict {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.to_ascii_lowercase();
        Verdict::ALL
            .into_iter()
            .find(|v| v.as_str() == lower)
            .ok_or_else(|| {
                let all: Vec<&str> = Verdict::ALL.iter().map(|v| v.as_str()).collect();
                format!("unknown verdict {s:?} ({})", all.join(", "))
            })
    }
}

/// Text a flow shares with many others (names, identities, addresses): cloned by reference
/// count, since every request of a connection repeats its connection's.
pub type Text = Arc<str>;

/// Whether two optional [`Text`]s say the same: the same allocation first (what a connection's
/// requests share), then the bytes. `Arc`'s own `==` compares the bytes always: it checks the
/// pointers first only for sized contents.
pub fn same_text(a: &Option<Text>, b: &Option<Text>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b) || a == b,
        (None, None) => true,
        _ => false,
    }
}

/// The calling side of a flow.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowSource {
    pub namespace: Option<Text>,
    pub pod: Option<Text>,
    pub ip: Option<IpAddr>,
    /// SPIFFE id of the calling workload (from its cgroup, or its peer certificate inbound).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<Text>,
    /// The calling pod's workload (its Deployment, StatefulSet, … as Istio names it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<Text>,
}

/// Where the flow went (after Service resolution).
#[derive(Clone, Debug, Default, Eq, Serialize, Deserialize)]
pub struct FlowDestination {
    pub namespace: Option<Text>,
    pub pod: Option<Text>,
    /// `namespace/name` of the Service when the original destination was a Service VIP.
    pub service: Option<Text>,
    /// The `ip:port` weft connected to.
    pub address: Option<Text>,
    /// SPIFFE id of the destination workload, when it is in the mesh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<Text>,
    /// The destination pod's workload (its Deployment, StatefulSet, … as Istio names it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<Text>,
}

/// Compared per request (is a request's destination its connection's?): shared texts by
/// pointer first ([`same_text`]). Every field is named, so a new one cannot be left out.
impl PartialEq for FlowDestination {
    fn eq(&self, other: &Self) -> bool {
        let FlowDestination {
            namespace,
            pod,
            service,
            address,
            identity,
            workload,
        } = self;
        same_text(address, &other.address)
            && same_text(pod, &other.pod)
            && same_text(service, &other.service)
            && same_text(namespace, &other.namespace)
            && same_text(identity, &other.identity)
            && same_text(workload, &other.workload)
    }
}

/// One proxied (or attempted) connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Flow {
    /// Position in this node's flow sequence (monotonic, starts at 1).
    #[serde(default)]
    pub seq: u64,
    /// When the connection was accepted (RFC 3339).
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    pub node: Text,
    /// Shared by every flow of the connection (its requests').
    pub source: Arc<FlowSource>,
    /// The `ip:port` the client asked for, before redirection.
    pub original_destination: Text,
    /// Shared with the flows that went to the same place (a connection's requests, most
    /// often).
    pub destination: Arc<FlowDestination>,
    pub protocol: Text,
    pub verdict: Verdict,
    /// Bytes from the source to the destination.
    pub bytes_sent: u64,
    /// Bytes from the destination back to the source.
    pub bytes_received: u64,
    /// From accept to close (milliseconds, to the microsecond).
    pub duration_ms: f64,
    /// Detail for anything that did not end cleanly (connect error, reset, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Box<str>>,
    /// The pod cgroup the connection was attributed to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_id: Option<u64>,
    /// Carried between nodes in mutual TLS (HBONE).
    #[serde(default)]
    pub mtls: bool,
    /// The policy (`namespace/name`) that denied the connection: an AuthorizationPolicy, or a
    /// security object weft cannot apply that fails closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<Box<str>>,
    /// The HTTP request, when this flow is one request of an HTTP connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpFlow>,
    /// It came in an HBONE tunnel from another node: this node is the destination's (Istio's
    /// inbound side).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub inbound: bool,
}

/// One HTTP request as weft handled it (a flow's `http`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HttpFlow {
    /// `HTTP/1.1` or `HTTP/2`, as the client spoke.
    pub protocol: Text,
    pub method: Text,
    /// `authority`, `path`, `request_id`, `user_agent` and `forwarded_for` (see
    /// [`RequestTexts`]); in the JSON they are the flow's own fields.
    #[serde(flatten)]
    pub texts: RequestTexts,
    /// The status returned to the client (0 when the connection ended before a response).
    pub status: u16,
    /// Envoy response flags (`NR`, `UH`, `UF`, `URX`, `DPE`, …), `-` when none.
    pub response_flags: Text,
    /// The routing rule that matched: `VirtualService ns/name http[1]`, `HTTPRoute ns/name
    /// rules[0]`; absent for the default route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<Text>,
    /// The endpoint the request was sent to (`ip:port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<Text>,
    /// Upstream attempts (0 when weft answered itself).
    pub attempts: u32,
    /// From the request's head to the end of its response (milliseconds, to the microsecond).
    pub duration_ms: f64,
    /// From sending the request upstream to the response's head (Envoy's
    /// `x-envoy-upstream-service-time`); absent when no upstream answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_service_time_ms: Option<f64>,
    /// The gRPC status of a gRPC call (`grpc-status` of the trailers, or of a trailers-only
    /// response); absent for anything else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<u16>,
}

/// The texts of a request its flow keeps, as [`RequestTexts::get`] reads them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Texts<'a> {
    /// `Host` / `:authority` as the client sent it.
    pub authority: &'a str,
    /// Path and query as the client sent them.
    pub path: &'a str,
    /// `x-request-id`: the client's, or the one this hop made.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<&'a str>,
    /// `User-Agent` as the client sent it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<&'a str>,
    /// `X-Forwarded-For` as the client sent it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forwarded_for: Option<&'a str>,
}

/// A request's [`Texts`] in one block: the flow log keeps thousands of requests, and five
/// texts of their own each were five blocks of the allocator and 80 bytes of every flow.
///
/// The block starts with the five texts' lengths, each one more than the length (0: absent),
/// seven bits to a byte, the high bit set on every byte but a length's last; the texts follow
/// in order. Empty (the default), every text is absent and nothing is allocated.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RequestTexts(Box<[u8]>);

impl RequestTexts {
    pub fn new(t: Texts<'_>) -> RequestTexts {
        if t == Texts::default() {
            // As the default is: one value, one block (none), whichever way it was made.
            return RequestTexts::default();
        }
        let texts = [
            Some(t.authority),
            Some(t.path),
            t.request_id,
            t.user_agent,
            t.forwarded_for,
        ];
        let lengths = texts.map(|t| t.map_or(0, |t| t.len() + 1));
        let size: usize = lengths
            .iter()
            .map(|&n| length_bytes(n) + n.saturating_sub(1))
            .sum();
        let mut block = Vec::with_capacity(size);
        for mut n in lengths {
            while n >= 0x80 {
                block.push((n & 0x7f) as u8 | 0x80);
                n >>= 7;
            }
            block.push(n as u8);
        }
        for t in texts.into_iter().flatten() {
            block.extend_from_slice(t.as_bytes());
        }
        RequestTexts(block.into_boxed_slice())
    }

    /// The texts (a text the block cannot give back whole reads as absent, and the authority
    /// and path as empty: never the case for a block [`RequestTexts::new`] made).
    pub fn get(&self) -> Texts<'_> {
        let block = &*self.0;
        let mut at = 0;
        let mut lengths = [0usize; 5];
        for n in &mut lengths {
            let mut shift = 0;
            while let Some(&b) = block.get(at) {
                at += 1;
                *n |= usize::from(b & 0x7f).checked_shl(shift).unwrap_or(0);
                shift += 7;
                if b & 0x80 == 0 {
                    break;
                }
            }
        }
        let mut texts = [None; 5];
        for (text, n) in texts.iter_mut().zip(lengths) {
            let Some(len) = n.checked_sub(1) else {
                continue;
            };
            let end = at.saturating_add(len);
            *text = block.get(at..end).and_then(|b| std::str::from_utf8(b).ok());
            at = end;
        }
        let [authority, path, request_id, user_agent, forwarded_for] = texts;
        Texts {
            authority: authority.unwrap_or(""),
            path: path.unwrap_or(""),
            request_id,
            user_agent,
            forwarded_for,
        }
    }
}

/// Bytes a length takes at the head of a [`RequestTexts`] block.
fn length_bytes(n: usize) -> usize {
    (usize::BITS - n.leading_zeros()).div_ceil(7).max(1) as usize
}

impl std::fmt::Debug for RequestTexts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.get().fmt(f)
    }
}

impl Serialize for RequestTexts {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.get().serialize(s)
    }
}

impl<'de> Deserialize<'de> for RequestTexts {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        /// The texts as JSON gives them (escaped, they cannot be borrowed).
        #[derive(Deserialize)]
        struct Owned {
            #[serde(default)]
            authority: String,
            #[serde(default)]
            path: String,
            #[serde(default)]
            request_id: Option<String>,
            #[serde(default)]
            user_agent: Option<String>,
            #[serde(default)]
            forwarded_for: Option<String>,
        }
        let o = Owned::deserialize(d)?;
        Ok(RequestTexts::new(Texts {
            authority: &o.authority,
            path: &o.path,
            request_id: o.request_id.as_deref(),
            user_agent: o.user_agent.as_deref(),
            forwarded_for: o.forwarded_for.as_deref(),
        }))
    }
}

/// Response flags of a request weft did not have to flag: Envoy's `-`.
pub const NO_FLAGS: &str = "-";

/// A status filter: one code (`404`) or a class (`5xx`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StatusFilter {
    Code(u16),
    Class(u8),
}

impl StatusFilter {
    pub fn matches(self, status: u16) -> bool {
        match self {
            StatusFilter::Code(c) => status == c,
            StatusFilter::Class(c) => status / 100 == u16::from(c),
        }
    }
}

impl std::str::FromStr for StatusFilter {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("status {s:?}: expected a code (404) or a class (2xx, 5xx)");
        let lower = s.to_ascii_lowercase();
        if let Some(class) = lower.strip_suffix("xx") {
            return match class.parse::<u8>() {
                Ok(c @ 1..=5) => Ok(StatusFilter::Class(c)),
                _ => Err(bad()),
            };
        }
        match lower.parse::<u16>() {
            Ok(c @ 100..=599) => Ok(StatusFilter::Code(c)),
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for StatusFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StatusFilter::Code(c) => write!(f, "{c}"),
            StatusFilter::Class(c) => write!(f, "{c}xx"),
        }
    }
}

impl Default for Flow {
    /// A TCP flow at the epoch with nothing known yet; a record fills it in. Allocates
    /// nothing: its empty parts are made once per thread and shared.
    fn default() -> Flow {
        type Empty = (Text, Text, Arc<FlowSource>, Arc<FlowDestination>);
        thread_local! {
            static EMPTY: Empty = ("".into(), "tcp".into(), Arc::default(), Arc::default());
        }
        let (node, protocol, source, destination) = EMPTY.with(Empty::clone);
        Flow {
            seq: 0,
            time: OffsetDateTime::UNIX_EPOCH,
            node: node.clone(),
            source,
            original_destination: node,
            destination,
            protocol,
            verdict: Verdict::Forwarded,
            bytes_sent: 0,
            bytes_received: 0,
            duration_ms: 0.0,
            error: None,
            cgroup_id: None,
            mtls: false,
            policy: None,
            http: None,
            inbound: false,
        }
    }
}

/// A line of the `/flows?follow=1` stream that is not a flow: the reader fell behind and this
/// many flows were skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LostFlows {
    pub lost_flows: u64,
}

/// Which flows a reader wants (`/flows` query). Every set field must match.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FlowFilter {
    /// Source or destination namespace.
    pub namespace: Option<String>,
    /// Source or destination pod name (or `namespace/name`).
    pub pod: Option<String>,
    pub verdict: Option<Verdict>,
    /// Only flows at or after this time.
    #[serde(with = "time::serde::rfc3339::option")]
    pub since: Option<OffsetDateTime>,
    /// Only HTTP requests.
    pub http: bool,
    /// Only HTTP requests answered with this status or class.
    pub status: Option<StatusFilter>,
    /// Only HTTP requests whose path starts with this.
    pub path: Option<String>,
    /// Only HTTP requests with this method (case-insensitive).
    pub method: Option<String>,
}

impl FlowFilter {
    pub fn matches(&self, flow: &Flow) -> bool {
        if let Some(ns) = &self.namespace {
            let hit = flow.source.namespace.as_deref() == Some(ns)
                || flow.destination.namespace.as_deref() == Some(ns);
            if !hit {
                return false;
            }
        }
        if let Some(pod) = &self.pod {
            let matches_pod = |ns: &Option<Text>, name: &Option<Text>| match pod.split_once('/') {
                Some((want_ns, want_name)) => {
                    ns.as_deref() == Some(want_ns) && name.as_deref() == Some(want_name)
                }
                None => name.as_deref() == Some(pod.as_str()),
            };
            if !matches_pod(&flow.source.namespace, &flow.source.pod)
                && !matches_pod(&flow.destination.namespace, &flow.destination.pod)
            {
                return false;
            }
        }
        if self.verdict.is_some_and(|v| flow.verdict != v) {
            return false;
        }
        if self.since.is_some_and(|since| flow.time < since) {
            return false;
        }
        let wants_http =
            self.http || self.status.is_some() || self.path.is_some() || self.method.is_some();
        if wants_http {
            let Some(http) = &flow.http else {
                return false;
            };
            if self.status.is_some_and(|s| !s.matches(http.status)) {
                return false;
            }
            if self
                .path
                .as_ref()
                .is_some_and(|p| !http.texts.get().path.starts_with(p.as_str()))
            {
                return false;
            }
            if self
                .method
                .as_ref()
                .is_some_and(|m| !http.method.eq_ignore_ascii_case(m))
            {
                return false;
            }
        }
        true
    }
}

/// Parses `--since`: a duration before now (`30s`, `5m`, `2h`, `1d`, `1500ms`) or an RFC 3339 time.
pub fn parse_since(s: &str, now: OffsetDateTime) -> Result<OffsetDateTime, String> {
    if let Ok(t) = OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339) {
        return Ok(t);
    }
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("--since {s:?}: missing unit (ms, s, m, h, d)"))?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        format!("--since {s:?}: expected a duration like 30s, 5m, 2h or an RFC 3339 time")
    })?;
    let secs = |mult: u64| n.checked_mul(mult).map(Duration::from_secs);
    let d = match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        "d" => secs(86_400),
        _ => {
            return Err(format!(
                "--since {s:?}: unknown unit {unit:?} (ms, s, m, h, d)"
            ))
        }
    };
    d.and_then(|d| now.checked_sub(time::Duration::try_from(d).ok()?))
        .ok_or_else(|| format!("--since {s:?}: too far back"))
}

// ---------------------------------------------------------------------------------------------
// /workloads, /certs
// ---------------------------------------------------------------------------------------------

/// One row of `/workloads`: a pod scheduled on this node.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct WorkloadInfo {
    pub namespace: String,
    pub pod: String,
    pub ip: Option<IpAddr>,
    pub node: Option<String>,
    pub service_account: String,
    /// SPIFFE id (mesh pods).
    #[serde(default)]
    pub identity: Option<String>,
    pub ready: bool,
    pub enrolled: bool,
    pub cgroup_id: Option<u64>,
    pub cgroup_path: Option<PathBuf>,
}

/// One row of `/certs`: a workload certificate (SVID) this node holds.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub identity: String,
    /// Serial number, lowercase hex.
    pub serial: String,
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
}

// ---------------------------------------------------------------------------------------------
// /status
// ---------------------------------------------------------------------------------------------

/// `/status`: what the node runs and how it is doing.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Status {
    pub node: String,
    pub ready: bool,
    pub proxy_address: SocketAddr,
    pub registry: RegistryStatus,
    pub workloads: WorkloadCounts,
    pub capture: CaptureStatus,
    pub mesh: MeshStatus,
    pub tunnel: TunnelStatus,
    pub flows: FlowCounts,
    #[serde(default)]
    pub limits: LimitsStatus,
}

/// Connection limits and what they refused.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct LimitsStatus {
    /// Connections held on the capture listener now, and its limits.
    pub capture_open: u64,
    pub max_connections: u64,
    pub max_connections_per_pod: u64,
    /// Refused connections by listener (`capture`, `metrics`, `admin`) and reason (`total`,
    /// `per_pod`, `per_source`), since start.
    pub refused: Vec<RefusedCount>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct RefusedCount {
    pub listener: String,
    pub reason: String,
    pub count: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct RegistryStatus {
    pub generation: u64,
    /// RFC 3339.
    pub loaded_at: String,
    pub pods: usize,
    pub services: usize,
    /// The errors of the last reload, one per line, when it failed (the previous snapshot is
    /// in force).
    pub last_error: Option<String>,
    /// Objects of the snapshot in force that were not applied, one line each
    /// (`file:line: … (Kind ns/name): reason`).
    #[serde(default)]
    pub not_applied: Vec<String>,
    /// Objects applied with a likely mistake, one line each.
    #[serde(default)]
    pub warnings: Vec<String>,
    /// `files` or `kubernetes`.
    #[serde(default)]
    pub source: String,
    /// With the Kubernetes API: the watch of each kind.
    #[serde(default)]
    pub watches: Vec<WatchStatus>,
}

/// The Kubernetes API watch of one kind.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct WatchStatus {
    pub kind: String,
    /// `group/version` watched.
    pub api_version: String,
    /// `listing`, `watching`, `retrying` or `not_installed`.
    pub state: String,
    pub objects: usize,
    /// RFC 3339: when the kind was last listed or a change of it arrived.
    pub last_sync: Option<String>,
    /// The last error, while retrying.
    pub error: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct WorkloadCounts {
    /// Pods scheduled on this node.
    pub total: usize,
    /// Of those, the ones whose connections are captured.
    pub enrolled: usize,
    /// Enrolled pods whose cgroup was not found within `--enroll-timeout`: their connections
    /// are NOT captured. `ns/name: why`, one each.
    #[serde(default)]
    pub uncaptured: Vec<String>,
    /// New pods that connected before their cgroup was enrolled (those connections went
    /// around the mesh): `ns/name: connected before its cgroup was enrolled (…)`, the last 20.
    #[serde(default)]
    pub capture_gaps: Vec<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct MeshStatus {
    pub trust_domain: String,
    /// Workload certificates held.
    pub svids: usize,
    pub authorization_policies: usize,
    pub peer_authentications: usize,
    /// Security objects of a kind or version weft does not know, which make the workloads they
    /// could select fail closed (every connection denied, STRICT mTLS): what each covers and
    /// why, one line each.
    #[serde(default)]
    pub fail_closed: Vec<String>,
    /// Who signs this node's certificates: `service https://…` (the CA service) or `key`
    /// (development mode: the node signs itself).
    #[serde(default)]
    pub ca: String,
    /// Requests to the CA service answered with a certificate, and failed (retried).
    #[serde(default)]
    pub ca_issued: u64,
    #[serde(default)]
    pub ca_failed: u64,
    /// The last failed request, if any.
    #[serde(default)]
    pub ca_last_error: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ProgramStatus {
    pub name: String,
    /// The program's link is attached to the capture cgroup.
    pub attached: bool,
    /// Kernel program id (as shown by `bpftool prog`), 0 if unknown.
    pub id: u32,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct MapStatus {
    pub name: String,
    /// Number of entries; for the ring buffer, 0.
    pub entries: usize,
    /// Capacity; for the ring buffer, its size in bytes.
    pub max_entries: u32,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct CaptureStatus {
    pub attach_point: PathBuf,
    pub pin_path: PathBuf,
    pub programs: Vec<ProgramStatus>,
    pub maps: Vec<MapStatus>,
    /// Kernel-side counters (`redirected`, `not_enrolled`, … → sum over CPUs).
    pub counters: BTreeMap<String, u64>,
    /// The links found pinned from a previous run were kept (redirection never stopped).
    pub reused_pins: bool,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct TunnelStatus {
    pub outbound: PoolStats,
    pub inbound: InboundStats,
}

/// The HBONE client pool: totals and per (source, destination, node) key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolStats {
    /// Connections open or being opened.
    pub connections: usize,
    /// Streams open, or waiting for their connection.
    pub streams_active: usize,
    pub connections_opened_total: u64,
    pub connections_failed_total: u64,
    pub connections_closed_total: u64,
    /// Tunnels established (200).
    pub streams_opened_total: u64,
    /// `CONNECT` answered with another status.
    pub streams_rejected_total: u64,
    /// Connections closed because a keepalive PING went unanswered.
    #[serde(default)]
    pub keepalive_timeouts_total: u64,
    /// `CONNECT`s tried again on a fresh connection (`GOAWAY`, `REFUSED_STREAM`, closed).
    #[serde(default)]
    pub streams_retried_total: u64,
    pub keys: Vec<PoolKeyStats>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolKeyStats {
    /// SPIFFE id of the calling workload.
    pub source: String,
    /// SPIFFE id of the destination workload.
    pub destination: String,
    pub node: SocketAddr,
    pub connections: usize,
    pub streams_active: usize,
}

/// The HBONE server (`:15008`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboundStats {
    /// TCP connections accepted on the listener.
    pub tcp_accepted: u64,
    /// TLS handshakes that completed with an acceptable client identity.
    pub tls_accepted: u64,
    /// TLS handshakes refused: not TLS, bad/expired/missing/untrusted client certificate, no
    /// `h2`, no local identity for the SNI, timeout.
    pub tls_failed: u64,
    /// Connections that failed the HTTP/2 preface or broke the protocol.
    pub h2_failed: u64,
    pub connections_active: u64,
    pub streams_total: u64,
    pub streams_active: u64,
    /// Not `CONNECT`, or no `ip:port` authority (400).
    pub bad_requests: u64,
    /// Answered 200 and relayed.
    pub delivered: u64,
    /// Answered 403.
    pub denied: u64,
    /// Answered 404: not a pod of this node.
    pub not_found: u64,
    /// Answered 503: the pod could not be reached.
    pub connect_failed: u64,
    /// Reset at accept: too many TLS handshakes in progress on the node.
    #[serde(default)]
    pub refused_handshakes: u64,
    /// Reset at accept: too many TLS handshakes in progress from that address.
    #[serde(default)]
    pub refused_peer_handshakes: u64,
    /// Reset at accept: too many open HBONE connections from that address.
    #[serde(default)]
    pub refused_peer_connections: u64,
    /// Streams the client reset before they were answered (their connect was dropped).
    #[serde(default)]
    pub streams_cancelled: u64,
    /// Of those, reset within the minimum stream lifetime (HTTP/2 rapid reset).
    #[serde(default)]
    pub premature_resets: u64,
    /// Connections closed (`GOAWAY ENHANCE_YOUR_CALM`) for resetting streams too fast.
    #[serde(default)]
    pub reset_floods: u64,
    /// Connections sent `GOAWAY` because the node drains.
    #[serde(default)]
    pub drain_goaways: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct FlowCounts {
    /// Workload flows kept, of `capacity` (`--flow-capacity`).
    pub kept: usize,
    pub capacity: usize,
    /// Flows recorded since start, by verdict.
    pub totals: BTreeMap<Verdict, u64>,
    /// Flows that name no workload (no redirect record, refused before being identified) or
    /// were refused over a connection limit, kept in a ring of their own so that they never
    /// push a workload's flow out.
    #[serde(default)]
    pub unattributed: UnattributedFlows,
}

/// The ring of flows that name no workload or were refused over a limit (`/status`
/// `flows.unattributed`).
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct UnattributedFlows {
    pub kept: usize,
    pub capacity: usize,
    /// Recorded since start.
    pub seen: u64,
    /// Pushed out of the ring by newer ones.
    pub dropped: u64,
}

// ---------------------------------------------------------------------------------------------
// /config_dump
// ---------------------------------------------------------------------------------------------

/// `/config_dump`: the effective configuration and the registry snapshot in force, as JSON
/// (for people and scripts; the CLI does not render it).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ConfigDump {
    pub config: serde_json::Value,
    pub proxy_address: SocketAddr,
    pub registry: RegistryDump,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct RegistryDump {
    pub generation: u64,
    pub sources: Vec<PathBuf>,
    pub last_error: Option<String>,
    #[serde(default)]
    pub not_applied: Vec<String>,
    #[serde(default)]
    pub warnings: Vec<String>,
    pub snapshot: serde_json::Value,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Texts compare by what they say: the same allocation, or another with the same bytes.
    #[test]
    fn texts_are_the_same_by_pointer_or_by_bytes() {
        let a: Text = "reviews-v1".into();
        let copy: Text = "reviews-v1".into();
        let other: Text = "reviews-v2".into();
        assert!(same_text(&Some(a.clone()), &Some(a.clone())));
        assert!(same_text(&Some(a.clone()), &Some(copy.clone())));
        assert!(!same_text(&Some(a.clone()), &Some(other.clone())));
        assert!(!same_text(&Some(a.clone()), &None));
        assert!(same_text(&None, &None));
        let dest = |pod: &Text| FlowDestination {
            namespace: Some("default".into()),
            pod: Some(pod.clone()),
            service: Some("default/reviews".into()),
            address: Some("10.244.1.7:9080".into()),
            identity: None,
            workload: Some("reviews-v1".into()),
        };
        assert_eq!(dest(&a), dest(&copy), "equal texts in other allocations");
        assert_ne!(dest(&a), dest(&other));
        let mut d = dest(&a);
        d.identity = Some("spiffe://cluster.local/ns/default/sa/reviews".into());
        assert_ne!(d, dest(&a), "every field counts");
    }

    /// The flow log keeps thousands of these (4 096 by default), one per request: with its
    /// reference counts a flow is 320 bytes, one of the allocator's size classes (it was 600,
    /// in 640, then 384). What a connection's requests share is shared: the source, the
    /// destination, the names; what a request owns is one block ([`RequestTexts`]).
    #[test]
    fn a_kept_flow_is_small() {
        assert!(
            std::mem::size_of::<Flow>() + 2 * std::mem::size_of::<usize>() <= 320,
            "a flow is {} bytes",
            std::mem::size_of::<Flow>()
        );
    }

    #[test]
    fn a_requests_texts_come_back_as_they_went_in() {
        let long = "/p".repeat(9_000);
        for t in [
            Texts::default(),
            Texts {
                authority: "web.back:80",
                path: "/",
                request_id: Some("5f1e2d3c-0000-4000-8000-000000000001"),
                user_agent: Some("curl/8.5.0"),
                forwarded_for: Some("10.0.0.1, 10.0.0.2"),
            },
            Texts {
                authority: "",
                path: &long,
                request_id: Some(""),
                user_agent: None,
                forwarded_for: Some("é\u{0}\"x"),
            },
            Texts {
                authority: &long[..127],
                path: &long[..128],
                request_id: None,
                user_agent: Some(&long[..16_384]),
                forwarded_for: None,
            },
        ] {
            let packed = RequestTexts::new(t);
            assert_eq!(packed.get(), t);
            let sum: usize = [t.authority, t.path]
                .into_iter()
                .chain(t.request_id)
                .chain(t.user_agent)
                .chain(t.forwarded_for)
                .map(str::len)
                .sum();
            assert!(
                packed.0.len() <= sum + 5 * 3,
                "{} for {sum}",
                packed.0.len()
            );
        }
        assert_eq!(RequestTexts::default().get(), Texts::default());
        assert_eq!(RequestTexts::new(Texts::default()), RequestTexts::default());
    }

    #[test]
    fn a_requests_json_is_what_it_was_before_its_texts_were_packed() {
        let http = HttpFlow {
            protocol: "HTTP/1.1".into(),
            method: "GET".into(),
            texts: RequestTexts::new(Texts {
                authority: "web.back:80",
                path: "/a?b=1",
                request_id: Some("id-1"),
                user_agent: None,
                forwarded_for: Some(""),
            }),
            status: 200,
            ..HttpFlow::default()
        };
        let json = serde_json::to_value(&http).unwrap();
        assert_eq!(json["authority"], "web.back:80");
        assert_eq!(json["path"], "/a?b=1");
        assert_eq!(json["request_id"], "id-1");
        assert_eq!(json["forwarded_for"], "");
        assert!(json.get("user_agent").is_none(), "{json}");
        assert!(json.get("texts").is_none(), "{json}");
        let back: HttpFlow = serde_json::from_value(json).unwrap();
        assert_eq!(back, http);
        let escaped: HttpFlow =
            serde_json::from_str(r#"{"protocol":"HTTP/2","method":"GET","authority":"a\"b","path":"/\u00e9","status":0,"response_flags":"-","attempts":0,"duration_ms":0.0}"#)
                .unwrap();
        assert_eq!(escaped.texts.get().authority, "a\"b");
        assert_eq!(escaped.texts.get().path, "/é");
        assert_eq!(escaped.texts.get().request_id, None);
    }

    #[test]
    fn http_filters_match_requests_only() {
        let mut f = Flow::default();
        let filter = FlowFilter {
            status: Some("5xx".parse().unwrap()),
            ..FlowFilter::default()
        };
        assert!(!filter.matches(&f), "a TCP flow is no request");
        f.http = Some(HttpFlow {
            method: "POST".into(),
            texts: RequestTexts::new(Texts {
                path: "/api/x",
                ..Texts::default()
            }),
            status: 503,
            ..HttpFlow::default()
        });
        assert!(filter.matches(&f));
        let f404 = FlowFilter {
            status: Some("404".parse().unwrap()),
            path: Some("/api".into()),
            method: Some("post".into()),
            ..FlowFilter::default()
        };
        assert!(!f404.matches(&f));
        f.http.as_mut().unwrap().status = 404;
        assert!(f404.matches(&f));
        let other_path = FlowFilter {
            path: Some("/web".into()),
            ..FlowFilter::default()
        };
        assert!(!other_path.matches(&f));
    }

    fn flow(ns: &str, pod: &str, verdict: Verdict) -> Flow {
        Flow {
            time: OffsetDateTime::now_utc(),
            node: "n1".into(),
            source: Arc::new(FlowSource {
                namespace: Some(ns.into()),
                pod: Some(pod.into()),
                ip: Some("10.244.1.2".parse().unwrap()),
                identity: Some("spiffe://cluster.local/ns/front/sa/default".into()),
                workload: None,
            }),
            original_destination: "10.96.0.10:80".into(),
            destination: Arc::new(FlowDestination {
                namespace: Some("backend".into()),
                pod: Some("web-0".into()),
                service: Some("backend/web".into()),
                address: Some("10.244.1.3:8080".into()),
                identity: None,
                workload: None,
            }),
            verdict,
            bytes_sent: 1,
            bytes_received: 2,
            duration_ms: 0.5,
            cgroup_id: Some(7),
            ..Flow::default()
        }
    }

    #[test]
    fn filters_match_either_side() {
        let f = flow("front", "client", Verdict::ConnectFailed);
        let by_ns = |ns: &str| FlowFilter {
            namespace: Some(ns.into()),
            ..Default::default()
        };
        assert!(by_ns("front").matches(&f));
        assert!(by_ns("backend").matches(&f));
        assert!(!by_ns("other").matches(&f));
        let by_pod = |p: &str| FlowFilter {
            pod: Some(p.into()),
            ..Default::default()
        };
        assert!(by_pod("client").matches(&f));
        assert!(by_pod("web-0").matches(&f));
        assert!(by_pod("backend/web-0").matches(&f));
        assert!(!by_pod("front/web-0").matches(&f));
        let by_verdict = |v| FlowFilter {
            verdict: Some(v),
            ..Default::default()
        };
        assert!(by_verdict(Verdict::ConnectFailed).matches(&f));
        assert!(!by_verdict(Verdict::Forwarded).matches(&f));
        let later = FlowFilter {
            since: Some(f.time + Duration::from_secs(1)),
            ..Default::default()
        };
        assert!(!later.matches(&f));
    }

    #[test]
    fn since_parses_durations_and_times() {
        let now = OffsetDateTime::now_utc();
        assert_eq!(
            parse_since("30s", now).unwrap(),
            now - Duration::from_secs(30)
        );
        assert_eq!(
            parse_since("5m", now).unwrap(),
            now - Duration::from_secs(300)
        );
        assert!(parse_since("2026-11-21T12:00:00Z", now).is_ok());
        assert!(parse_since("5x", now).is_err());
        assert!(parse_since("abc", now).is_err());
        assert!(parse_since("99999999999d", now).is_err());
        assert!(parse_since("18446744073709551615d", now).is_err());
    }

    #[test]
    fn verdict_round_trips() {
        for v in [
            "forwarded",
            "no_endpoint",
            "connect_failed",
            "unidentified",
            "unhandled",
            "denied",
        ] {
            assert_eq!(v.parse::<Verdict>().unwrap().as_str(), v);
        }
        assert!("bogus".parse::<Verdict>().is_err());
        let json = serde_json::to_string(&flow("a", "b", Verdict::Forwarded)).unwrap();
        let back: Flow = serde_json::from_str(&json).unwrap();
        assert_eq!(back.verdict, Verdict::Forwarded);
    }

    #[test]
    fn every_verdict_is_listed_and_spelled_as_serde_does() {
        use clap::ValueEnum;
        for v in Verdict::ALL {
            let json = serde_json::to_value(v).unwrap();
            assert_eq!(json, v.as_str());
            let possible = v.to_possible_value().unwrap();
            assert_eq!(possible.get_name(), v.as_str());
        }
        assert_eq!(Verdict::value_variants().len(), Verdict::ALL.len());
        // The flow log counts verdicts in an array indexed by discriminant.
        for (i, v) in Verdict::ALL.iter().enumerate() {
            assert_eq!(*v as usize, i, "{v:?}");
        }
    }
}

/// `GET /stats?format=json`: the per-destination counters, in Envoy's JSON form
/// (`{"stats":[{"name":"cluster.<cluster>.upstream_rq_retry","value":9},…]}`), sorted by name.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct Stats {
    pub stats: Vec<StatValue>,
}

/// One counter or gauge.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct StatValue {
    pub name: String,
    pub value: u64,
}

impl Stats {
    /// Envoy's text form, `GET /stats`: one `name: value` line each.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for s in &self.stats {
            out.push_str(&s.name);
            out.push_str(": ");
            out.push_str(&s.value.to_string());
            out.push('\n');
        }
        out
    }

    /// Those whose name `keep` accepts; with `used_only`, only those that are not zero.
    pub fn filtered(self, keep: impl Fn(&str) -> bool, used_only: bool) -> Stats {
        Stats {
            stats: self
                .stats
                .into_iter()
                .filter(|s| keep(&s.name) && (!used_only || s.value != 0))
                .collect(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// /stat, /graph: golden signals
// ---------------------------------------------------------------------------------------------

/// The shortest window of `/stat` and `/graph`, and the step windows are rounded to.
pub const STAT_WINDOW_MIN: Duration = Duration::from_secs(10);
/// The longest window of `/stat` and `/graph`.
pub const STAT_WINDOW_MAX: Duration = Duration::from_secs(600);
/// The window when none is asked for.
pub const STAT_WINDOW_DEFAULT: Duration = Duration::from_secs(60);

/// What a `/stat` row aggregates: the calls INTO one workload (of a kind, or of any kind), one
/// pod, one Service or one namespace.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
#[value(rename_all = "lowercase")]
pub enum StatBy {
    /// Deployments.
    #[value(alias = "deployment", alias = "deployments")]
    Deploy,
    /// StatefulSets.
    #[value(alias = "statefulset", alias = "statefulsets")]
    Sts,
    /// DaemonSets.
    #[value(alias = "daemonset", alias = "daemonsets")]
    Ds,
    /// Jobs (not started by a CronJob).
    #[value(alias = "jobs")]
    Job,
    /// CronJobs.
    #[value(alias = "cronjobs")]
    Cronjob,
    /// Workloads of every kind (Deployment, StatefulSet, …, Rollout, bare Pod).
    #[value(alias = "workloads")]
    Workload,
    /// Pods.
    #[value(alias = "pods", alias = "po")]
    Pod,
    /// Services (the calls made to the Service's name or address).
    #[value(alias = "service", alias = "services")]
    Svc,
    /// Namespaces.
    #[value(alias = "namespace", alias = "namespaces")]
    Ns,
}

impl StatBy {
    pub const ALL: [StatBy; 9] = [
        StatBy::Deploy,
        StatBy::Sts,
        StatBy::Ds,
        StatBy::Job,
        StatBy::Cronjob,
        StatBy::Workload,
        StatBy::Pod,
        StatBy::Svc,
        StatBy::Ns,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StatBy::Deploy => "deploy",
            StatBy::Sts => "sts",
            StatBy::Ds => "ds",
            StatBy::Job => "job",
            StatBy::Cronjob => "cronjob",
            StatBy::Workload => "workload",
            StatBy::Pod => "pod",
            StatBy::Svc => "svc",
            StatBy::Ns => "ns",
        }
    }

    /// The workload kind (as Istio names it) of the kind-specific rows.
    pub fn workload_kind(self) -> Option<&'static str> {
        match self {
            StatBy::Deploy => Some("Deployment"),
            StatBy::Sts => Some("StatefulSet"),
            StatBy::Ds => Some("DaemonSet"),
            StatBy::Job => Some("Job"),
            StatBy::Cronjob => Some("CronJob"),
            _ => None,
        }
    }
}

impl std::fmt::Display for StatBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for StatBy {
    type Err = String;
    /// The names and aliases `weft stat` takes (`deploy`, `deployment`, `svc`, `pods`, …).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        <StatBy as clap::ValueEnum>::from_str(s, true).map_err(|_| {
            let all: Vec<&str> = StatBy::ALL.iter().map(|b| b.as_str()).collect();
            format!("unknown resource {s:?} ({})", all.join(", "))
        })
    }
}

/// Parses a `/stat` or `/graph` window (`30s`, `1m`, `2m30s`): 10s to 10m.
pub fn parse_window(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("window {s:?}: {e} (expected a duration like 30s, 1m, 10m)"))?;
    if !(STAT_WINDOW_MIN..=STAT_WINDOW_MAX).contains(&d) {
        return Err(format!("window {s:?}: must be between 10s and 10m"));
    }
    Ok(d)
}

/// A window as a query parameter: whole seconds (`90s`), never with a space.
pub fn window_param(window: Duration) -> String {
    format!("{}s", window.as_secs())
}

/// `GET /stat`: which rows, over how long.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatQuery {
    pub by: StatBy,
    /// Only the rows of this namespace; `None`: every namespace.
    #[serde(default)]
    pub namespace: Option<String>,
    /// How far back: 10s to 10m, rounded to 10 s.
    #[serde(with = "humantime_serde", default = "stat_window_default")]
    pub window: Duration,
}

fn stat_window_default() -> Duration {
    STAT_WINDOW_DEFAULT
}

impl Default for StatQuery {
    fn default() -> StatQuery {
        StatQuery {
            by: StatBy::Deploy,
            namespace: None,
            window: STAT_WINDOW_DEFAULT,
        }
    }
}

impl StatQuery {
    /// The query string of `GET /stat` (without `?`).
    pub fn to_query(&self) -> String {
        let mut q = format!("by={}&window={}", self.by, window_param(self.window));
        if let Some(ns) = &self.namespace {
            q.push_str("&namespace=");
            for b in ns.bytes() {
                match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                        q.push(b as char)
                    }
                    _ => q.push_str(&format!("%{b:02X}")),
                }
            }
        }
        q
    }

    /// A query from `GET /stat`'s parameters (each optional: `deploy`, every namespace, 1m).
    pub fn from_params(
        by: Option<&str>,
        namespace: Option<&str>,
        window: Option<&str>,
    ) -> Result<StatQuery, String> {
        Ok(StatQuery {
            by: by.map(str::parse).transpose()?.unwrap_or(StatBy::Deploy),
            namespace: namespace.filter(|n| !n.is_empty()).map(str::to_string),
            window: window
                .map(parse_window)
                .transpose()?
                .unwrap_or(STAT_WINDOW_DEFAULT),
        })
    }
}

/// One row of `/stat`: the calls INTO one target over the window, as this node saw them (a
/// call is counted once: from the destination's report when this node hosts the destination
/// pod, else from the caller's).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatRow {
    pub namespace: String,
    pub name: String,
    /// `Deployment`, `StatefulSet`, … (the workload's kind), `Pod`, `Service` or `Namespace`.
    pub kind: String,
    /// Some of the calls were received by weft on the destination's side: by this node's
    /// inbound, or in mutual TLS by another node's.
    pub meshed: bool,
    /// Distinct destination pods the calls reached.
    pub pods: u64,
    /// HTTP requests finished in the window.
    pub requests: u64,
    /// Requests per second over the window.
    pub rps: f64,
    /// Share of requests that succeeded (not 5xx, and answered), 0 to 1; `None` without
    /// requests.
    pub success_rate: Option<f64>,
    /// Request latency percentiles (milliseconds); `None` without requests.
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// TCP connections open now (not windowed).
    pub tcp_connections: u64,
    /// TCP connections opened in the window.
    pub tcp_opened: u64,
    /// Bytes per second over the window, from callers to the target and back, of the TCP
    /// connections that closed in it (a connection's bytes count when it closes).
    pub tcp_bytes_sent_per_sec: f64,
    pub tcp_bytes_received_per_sec: f64,
    /// The time the rates are over: the window (rounded to 10 s) and the part of the current
    /// 10 s elapsed, or less on a node younger than that.
    pub window_seconds: f64,
}

/// How the calls of a `/graph` edge spoke.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EdgeProtocol {
    /// Some HTTP requests were seen.
    Http,
    /// TCP connections only.
    Tcp,
}

impl EdgeProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            EdgeProtocol::Http => "http",
            EdgeProtocol::Tcp => "tcp",
        }
    }
}

/// One edge of `/graph`: the calls from one workload to another over the window, each counted
/// once (from the caller's report when this node hosts the caller, else from the callee's).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GraphEdge {
    /// `namespace/workload` of the caller (`namespace/pod` for a pod of no known workload), or
    /// `unknown`.
    pub source: String,
    /// `namespace/workload` of the callee, or the Service called (`namespace/name`) when no
    /// pod was reached, or `unknown`.
    pub destination: String,
    /// The Service the calls were made to (`namespace/name`), when they all named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    pub protocol: EdgeProtocol,
    pub requests: u64,
    pub rps: f64,
    /// Share of requests that failed (5xx, or no answer), 0 to 1; `None` without requests.
    pub error_rate: Option<f64>,
    /// Every call of the edge was carried in mutual TLS.
    pub mtls: bool,
    /// TCP connections open now.
    pub tcp_connections: u64,
    /// TCP connections opened in the window.
    pub tcp_opened: u64,
    /// Bytes per second of the TCP connections closed in the window (as [`StatRow`]'s).
    pub tcp_bytes_sent_per_sec: f64,
    pub tcp_bytes_received_per_sec: f64,
    pub window_seconds: f64,
}

#[cfg(test)]
mod stat_tests {
    use super::*;

    #[test]
    fn stat_queries_round_trip_through_their_query_string() {
        let q = StatQuery {
            by: StatBy::Svc,
            namespace: Some("shop a".into()),
            window: Duration::from_secs(90),
        };
        assert_eq!(q.to_query(), "by=svc&window=90s&namespace=shop%20a");
        let back = StatQuery::from_params(Some("svc"), Some("shop a"), Some("90s")).unwrap();
        assert_eq!(back, q);
        assert_eq!(
            StatQuery::from_params(None, Some(""), None).unwrap(),
            StatQuery::default()
        );
        assert_eq!(
            StatQuery::from_params(Some("Deployments"), None, None)
                .unwrap()
                .by,
            StatBy::Deploy
        );
        let e = StatQuery::from_params(Some("rs"), None, None).unwrap_err();
        assert!(
            e.contains("unknown resource") && e.contains("deploy, sts"),
            "{e}"
        );
        assert!(StatQuery::from_params(None, None, Some("5s")).is_err());
        assert!(StatQuery::from_params(None, None, Some("11m")).is_err());
        assert!(StatQuery::from_params(None, None, Some("soon")).is_err());
        assert_eq!(parse_window("10m").unwrap(), STAT_WINDOW_MAX);
        assert_eq!(parse_window("2m 30s").unwrap(), Duration::from_secs(150));
    }

    #[test]
    fn stat_by_is_spelled_alike_by_serde_clap_and_as_str() {
        use clap::ValueEnum;
        for b in StatBy::ALL {
            assert_eq!(serde_json::to_value(b).unwrap(), b.as_str());
            assert_eq!(b.to_possible_value().unwrap().get_name(), b.as_str());
            assert_eq!(b.as_str().parse::<StatBy>().unwrap(), b);
        }
        assert_eq!(StatBy::value_variants().len(), StatBy::ALL.len());
        let json = serde_json::to_string(&StatQuery::default()).unwrap();
        assert_eq!(json, r#"{"by":"deploy","namespace":null,"window":"1m"}"#);
        let back: StatQuery = serde_json::from_str(r#"{"by":"pod"}"#).unwrap();
        assert_eq!(back.window, STAT_WINDOW_DEFAULT);
    }
}
