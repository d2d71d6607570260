//! What a matched rule does, typed, with the pure functions the data path calls: pick a
//! weighted destination from a random roll, rewrite a path, edit headers (remove, then set and
//! add, as Envoy's `header_parser` does), build a redirect's `Location`. Resilience settings
//! (timeouts, retries, faults, mirrors) are carried typed for the stage that applies them.

use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, StatusCode};
use regex::Regex;

use super::matching::MatchedPath;
use super::{RouteId, RouteRequest};
use crate::registry::kinds::networking::CorsPolicy;

/// What to do with a matched request.
// Rules are built once per snapshot and shared behind an `Arc`: the size of the largest
// variant costs nothing per request, a box would cost a pointer chase.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Action {
    Forward(Forward),
    Redirect(Redirect),
    DirectResponse(DirectResponse),
}

/// Send the request on, to one of the weighted destinations.
#[derive(Debug, Clone)]
pub struct Forward {
    /// Never empty; weights sum to more than 0.
    pub destinations: Vec<WeightedDestination>,
    pub rewrite: Option<Rewrite>,
    /// Rule-level header edits. Envoy applies a destination's own edits first, then these (so
    /// the rule's win where both touch a header).
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
    /// The whole request (VirtualService `timeout`, HTTPRoute `timeouts.request`); `None`:
    /// none (Istio's default route timeout is disabled).
    pub timeout: Option<Duration>,
    /// `None`: retries disabled (`attempts: 0`); otherwise Istio's policy, its default when
    /// the route says nothing ([`RetryPolicy::istio_default`]).
    pub retries: Option<Arc<RetryPolicy>>,
    pub fault: Option<Fault>,
    pub mirrors: Vec<Mirror>,
    /// VirtualService `corsPolicy`, as written.
    pub cors: Option<CorsPolicy>,
}

impl Forward {
    /// The destination for a uniformly random `roll`: each is chosen with probability
    /// `weight / total` (a deterministic function of `roll`, for tests and replays).
    pub fn pick(&self, roll: u32) -> &WeightedDestination {
        pick_weighted(&self.destinations, roll)
    }

    /// How long the whole exchange may take, from the request's arrival (Envoy's route
    /// `timeout`). `None`: no limit, and none on a rule with a fault (Istio: faults disable
    /// the route's timeouts and retries).
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout.filter(|_| self.fault.is_none())
    }

    /// How a failed attempt is retried, and how long each attempt may take (its per-try
    /// timeout). `None`: not retried, and none on a rule with a fault.
    pub fn retry_policy(&self) -> Option<&Arc<RetryPolicy>> {
        self.retries.as_ref().filter(|_| self.fault.is_none())
    }
}

/// One of `destinations` (not empty) for a uniformly random `roll`, each with probability
/// `weight / total`.
pub fn pick_weighted(destinations: &[WeightedDestination], roll: u32) -> &WeightedDestination {
    let total: u64 = destinations.iter().map(|d| u64::from(d.weight)).sum();
    if total == 0 {
        return &destinations[0];
    }
    let mut x = u64::from(roll) % total;
    for d in destinations {
        let w = u64::from(d.weight);
        if x < w {
            return d;
        }
        x -= w;
    }
    &destinations[destinations.len() - 1]
}

/// A VirtualService `tcp[]` rule: connections matching it go to one of its weighted
/// destinations, chosen per connection.
#[derive(Debug, Clone)]
pub struct TcpRule {
    pub id: RouteId,
    /// `match[].port`, `sourceLabels`, `sourceNamespace`: any of the matches (none: every
    /// connection).
    pub matches: Vec<TcpMatch>,
    pub destinations: Vec<WeightedDestination>,
}

/// One `tcp[].match[]` entry.
#[derive(Debug, Clone, Default)]
pub struct TcpMatch {
    pub port: Option<u16>,
    /// The original destination must be in one of these (none: any).
    pub destination_subnets: Vec<ipnet::IpNet>,
    pub source_labels: crate::registry::Labels,
    pub source_namespace: Option<String>,
}

impl TcpRule {
    /// Whether a connection to `dst` from a pod of `namespace` with `labels` matches.
    pub fn matches(
        &self,
        dst: std::net::SocketAddr,
        namespace: Option<&str>,
        labels: Option<&crate::registry::Labels>,
    ) -> bool {
        self.matches.is_empty()
            || self.matches.iter().any(|m| {
                m.port.is_none_or(|p| p == dst.port())
                    && (m.destination_subnets.is_empty()
                        || m.destination_subnets.iter().any(|n| n.contains(&dst.ip())))
                    && m.source_namespace
                        .as_deref()
                        .is_none_or(|ns| namespace == Some(ns))
                    && m.source_labels
                        .iter()
                        .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
            })
    }

    /// The destination for `roll` (see [`pick_weighted`]).
    pub fn pick(&self, roll: u32) -> &WeightedDestination {
        pick_weighted(&self.destinations, roll)
    }
}

/// One destination of a rule with its share and its own header edits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightedDestination {
    /// The routing host (a Service FQDN, a ServiceEntry host): resolve with
    /// [`super::RouteTable::backend`].
    pub host: String,
    /// `None`: the port the client called (Istio: the destination's only port, else the
    /// request's).
    pub port: Option<u16>,
    pub subset: Option<String>,
    pub weight: u32,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
}

/// Header edits: remove, then set (replace), then add (append another value).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderOps {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderOps {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    /// Applies the edits in Envoy's order: removals first, then each `set` replaces every value
    /// of its header and each `add` appends one. Values are literal (Envoy's `%…%` command
    /// operators are not expanded).
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }
}

/// A path (and authority) rewrite before forwarding.
#[derive(Debug, Clone)]
pub struct Rewrite {
    pub path: Option<PathRewrite>,
    /// The new `Host`/`:authority`.
    pub authority: Option<String>,
}

/// How a path is rewritten; the query string is kept.
#[derive(Debug, Clone)]
pub enum PathRewrite {
    /// Envoy's `prefix_rewrite` (VirtualService `rewrite.uri`): what the match covered (the
    /// prefix; the whole path for exact and regex matches) is replaced by this.
    Prefix(String),
    /// The Gateway API's `ReplacePrefixMatch`: the matched path elements are replaced, with no
    /// doubled or missing `/` at the joint.
    PrefixMatch(String),
    /// The Gateway API's `ReplaceFullPath`.
    Full(String),
    /// Envoy's `regex_rewrite` (VirtualService `uriRegexRewrite`): every match of `pattern` in
    /// the path replaced by `substitution` (`\1` → the first group).
    Regex {
        pattern: Regex,
        substitution: String,
    },
}

impl PathRewrite {
    /// The new path (without query) for `path`, given what the match covered.
    fn rewrite(&self, path: &str, matched: MatchedPath) -> String {
        let covered = match matched {
            MatchedPath::Prefix(n) => n.min(path.len()),
            MatchedPath::Full => path.len(),
        };
        match self {
            PathRewrite::Prefix(new) => format!("{new}{}", &path[covered..]),
            PathRewrite::PrefixMatch(new) => {
                let rest = &path[covered..];
                let new = new.trim_end_matches('/');
                match (new.is_empty(), rest.is_empty()) {
                    (true, true) => "/".to_string(),
                    (true, false) => rest.to_string(),
                    (false, _) => format!("{new}{rest}"),
                }
            }
            PathRewrite::Full(new) => new.clone(),
            PathRewrite::Regex {
                pattern,
                substitution,
            } => pattern
                .replace_all(path, substitution.as_str())
                .into_owned(),
        }
    }

    /// Envoy writes regex substitutions with `\N`; the regex crate with `${N}`.
    pub fn regex(pattern: Regex, envoy_substitution: &str) -> PathRewrite {
        let mut substitution = String::new();
        let mut chars = envoy_substitution.chars().peekable();
        while let Some(c) = chars.next() {
            match (c, chars.peek()) {
                ('\\', Some(d)) if d.is_ascii_digit() => {
                    substitution.push_str(&format!("${{{d}}}"));
                    chars.next();
                }
                ('$', _) => substitution.push_str("$$"),
                (c, _) => substitution.push(c),
            }
        }
        PathRewrite::Regex {
            pattern,
            substitution,
        }
    }
}

impl Rewrite {
    /// The rewritten request target: the new path, the query string kept.
    pub fn apply(&self, path_and_query: &str, matched: MatchedPath) -> String {
        let Some(rewrite) = &self.path else {
            return path_and_query.to_string();
        };
        let (path, query) = split_query(path_and_query);
        let mut out = rewrite.rewrite(path, matched);
        out.push_str(query);
        out
    }
}

fn split_query(path_and_query: &str) -> (&str, &str) {
    let at = path_and_query.find('?').unwrap_or(path_and_query.len());
    path_and_query.split_at(at)
}

/// Which port a redirect's `Location` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedirectPort {
    /// Envoy's default: the request's `Host` as sent, its port dropped when the host is
    /// replaced, or when the scheme changes away from a default port.
    Keep,
    Port(u16),
    /// The port the client called (Istio's `derivePort: FROM_REQUEST_PORT`).
    Request,
    /// The new scheme's well-known port (the Gateway API when only the scheme is set).
    SchemeDefault,
}

/// Answer with a redirect.
#[derive(Debug, Clone)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub host: Option<String>,
    pub port: RedirectPort,
    pub path: Option<PathRewrite>,
    pub status: StatusCode,
}

/// The scheme of requests the node proxy receives (plaintext, captured).
const REQUEST_SCHEME: &str = "http";

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    }
}

/// `host[:port]` → (host, port); IPv6 literals in brackets.
fn split_authority(authority: &str) -> (&str, Option<&str>) {
    if authority.starts_with('[') {
        return match authority.find("]:") {
            Some(i) => (&authority[..=i], Some(&authority[i + 2..])),
            None => (authority, None),
        };
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => (h, Some(p)),
        _ => (authority, None),
    }
}

impl Redirect {
    /// The status and `Location` for `req`, whose path match covered `matched`. A new path
    /// keeps the request's query string unless it carries its own.
    pub fn location(&self, req: &RouteRequest<'_>, matched: MatchedPath) -> (StatusCode, String) {
        let scheme = self.scheme.as_deref().unwrap_or(REQUEST_SCHEME);
        let (req_host, req_port) = split_authority(req.authority);
        let (host, port): (&str, Option<String>) = match (&self.host, self.port) {
            (_, RedirectPort::Port(p)) => (
                self.host.as_deref().unwrap_or(req_host),
                Some(p.to_string()),
            ),
            (_, RedirectPort::Request) => (
                self.host.as_deref().unwrap_or(req_host),
                Some(req.port.to_string()),
            ),
            (_, RedirectPort::SchemeDefault) => (self.host.as_deref().unwrap_or(req_host), None),
            (Some(h), RedirectPort::Keep) => (h.as_str(), None),
            (None, RedirectPort::Keep) => {
                let default_of_old = req_port
                    .and_then(|p| p.parse::<u16>().ok())
                    .is_some_and(|p| default_port(REQUEST_SCHEME) == Some(p));
                let drop = scheme != REQUEST_SCHEME && default_of_old;
                (
                    req_host,
                    if drop {
                        None
                    } else {
                        req_port.map(str::to_string)
                    },
                )
            }
        };
        // The scheme's own port is never written.
        let port = port.filter(|p| p.parse::<u16>().ok() != default_port(scheme));
        let (path, query) = split_query(req.path_and_query);
        let target = match &self.path {
            None => req.path_and_query.to_string(),
            Some(PathRewrite::Full(p)) if p.contains('?') => p.clone(),
            Some(rewrite) => format!("{}{query}", rewrite.rewrite(path, matched)),
        };
        let mut location = format!("{scheme}://{host}");
        if let Some(p) = port {
            location.push(':');
            location.push_str(&p);
        }
        location.push_str(&target);
        (self.status, location)
    }
}

/// Answer directly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectResponse {
    pub status: StatusCode,
    pub body: bytes::Bytes,
    /// The rule's response header edits (Envoy applies them to direct responses too).
    pub response_headers: HeaderOps,
}

/// A retry policy as Istio hands it to Envoy (`pilot/pkg/networking/core/route/retry`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    /// Envoy's `retry_on` conditions (`connect-failure`, `5xx`, `retriable-status-codes`, …).
    pub retry_on: Vec<String>,
    /// With `retriable-status-codes`.
    pub retriable_status_codes: Vec<u16>,
    /// Retry on other localities' hosts (`retryRemoteLocalities`).
    pub retry_remote_localities: bool,
    /// Avoid hosts already tried (Istio's default: yes, up to 5 host selections).
    pub retry_ignore_previous_hosts: bool,
    /// Base interval of the exponential back-off (Envoy's default 25 ms).
    pub backoff: Option<Duration>,
}

impl RetryPolicy {
    /// What Istio applies when a route says nothing about retries: 2 retries on
    /// `connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes` with 503,
    /// other hosts preferred.
    pub fn istio_default() -> RetryPolicy {
        RetryPolicy {
            attempts: 2,
            per_try_timeout: None,
            retry_on: [
                "connect-failure",
                "refused-stream",
                "unavailable",
                "cancelled",
                "retriable-status-codes",
            ]
            .map(str::to_string)
            .to_vec(),
            retriable_status_codes: vec![503],
            retry_remote_localities: false,
            retry_ignore_previous_hosts: true,
            backoff: None,
        }
    }

    /// Istio's `ConvertPolicy` of `attempts`/`retryOn`/…: numbers in `retryOn` are status codes
    /// (and imply `retriable-status-codes`); `attempts: 0` disables retries (`None`).
    pub fn from_istio(
        attempts: i32,
        retry_on: &str,
        per_try_timeout: Option<Duration>,
        retry_remote_localities: Option<bool>,
        retry_ignore_previous_hosts: Option<bool>,
        backoff: Option<Duration>,
    ) -> Option<RetryPolicy> {
        if attempts <= 0 {
            return None;
        }
        let mut out = RetryPolicy::istio_default();
        out.attempts = attempts as u32;
        if !retry_on.is_empty() {
            out.retry_on.clear();
            out.retriable_status_codes.clear();
            for p in retry_on.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                match p.parse::<u16>() {
                    Ok(code) => out.retriable_status_codes.push(code),
                    Err(_) => out.retry_on.push(p.to_string()),
                }
            }
            if !out.retriable_status_codes.is_empty()
                && !out.retry_on.iter().any(|p| p == "retriable-status-codes")
            {
                out.retry_on.push("retriable-status-codes".into());
            }
        }
        out.per_try_timeout = per_try_timeout;
        out.retry_remote_localities = retry_remote_localities.unwrap_or(false);
        out.retry_ignore_previous_hosts = retry_ignore_previous_hosts.unwrap_or(true);
        out.backoff = backoff;
        Some(out)
    }
}

/// How an attempt ended, as retry conditions see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// No connection to the upstream (refused, unreachable, a failed tunnel or TLS handshake).
    ConnectFailure,
    /// The upstream closed or reset before its response head.
    Reset,
    /// The upstream refused the HTTP/2 stream (`REFUSED_STREAM`): it never saw the request.
    RefusedStream,
    /// The per-try timeout expired before the response head.
    PerTryTimeout,
    /// A response head: its status, and for gRPC the `grpc-status` it carries.
    Response { status: u16, grpc: Option<u32> },
}

/// gRPC status codes Envoy's `retry_on` names.
const GRPC_RETRY_ON: [(&str, u32); 5] = [
    ("cancelled", 1),
    ("deadline-exceeded", 4),
    ("resource-exhausted", 8),
    ("internal", 13),
    ("unavailable", 14),
];

impl RetryPolicy {
    /// Whether an attempt that ended so is retried (Envoy's `RetryStateImpl`): `5xx`,
    /// `gateway-error` and `reset` also cover an upstream that never answered (connect
    /// failure, reset, refused stream, per-try timeout); `retriable-4xx` is 409.
    pub fn retries_on(&self, outcome: Outcome) -> bool {
        use Outcome::*;
        self.retry_on.iter().any(|on| match (on.as_str(), outcome) {
            (
                "5xx" | "gateway-error" | "reset",
                ConnectFailure | Reset | RefusedStream | PerTryTimeout,
            ) => true,
            ("connect-failure", ConnectFailure) | ("refused-stream", RefusedStream) => true,
            ("5xx", Response { status, .. }) => status >= 500,
            ("gateway-error", Response { status, .. }) => (502..=504).contains(&status),
            ("retriable-4xx", Response { status, .. }) => status == 409,
            ("retriable-status-codes", Response { status, .. }) => {
                self.retriable_status_codes.contains(&status)
            }
            (
                name,
                Response {
                    grpc: Some(code), ..
                },
            ) => GRPC_RETRY_ON.iter().any(|(n, c)| *n == name && *c == code),
            _ => false,
        })
    }

    /// The wait before retry `n` (1 for the first) for a roll drawn uniformly from `[0, 1)`:
    /// Envoy's fully jittered exponential back-off, up to `(2^n - 1) × base`, at most ten
    /// times the base (25 ms unless the policy says otherwise).
    pub fn backoff(&self, n: u32, roll: f64) -> Duration {
        let base = self.backoff.unwrap_or(Duration::from_millis(25));
        let steps = (1u32 << n.clamp(1, 16)) - 1;
        base.saturating_mul(steps)
            .min(base * 10)
            .mul_f64(roll.clamp(0.0, 1.0))
    }
}

/// Fault injection.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
}

/// What a rule's fault does to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Injected {
    /// Wait this long before going on (flag `DI`).
    pub delay: Option<Duration>,
    /// Answer with this instead of forwarding (flag `FI`): the upstream is never contacted.
    pub abort: Option<AbortError>,
}

impl Fault {
    /// What the fault does to a request, for two rolls drawn uniformly from `[0, 100)`: the
    /// delay applies when `delay_roll` falls under its share, the abort when `abort_roll`
    /// falls under its own (Envoy's fault filter draws each apart; a delayed request may also
    /// be aborted, after the delay).
    pub fn inject(&self, delay_roll: f64, abort_roll: f64) -> Injected {
        Injected {
            delay: self
                .delay
                .as_ref()
                .filter(|d| delay_roll < d.percent)
                .map(|d| d.delay),
            abort: self
                .abort
                .as_ref()
                .filter(|a| abort_roll < a.percent)
                .map(|a| a.error),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct FaultDelay {
    pub delay: Duration,
    /// Share of requests delayed, 0–100.
    pub percent: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FaultAbort {
    pub error: AbortError,
    /// Share of requests aborted, 0–100.
    pub percent: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortError {
    Http(StatusCode),
    /// A gRPC status code (`UNAVAILABLE` = 14).
    Grpc(u32),
}

/// Copy requests to another destination (responses ignored); Envoy adds `-shadow` to the
/// mirrored request's host.
#[derive(Debug, Clone, PartialEq)]
pub struct Mirror {
    pub host: String,
    pub port: Option<u16>,
    pub subset: Option<String>,
    /// Share of requests mirrored, 0–100.
    pub percent: f64,
}

impl Mirror {
    /// Whether a request is mirrored, for a roll drawn uniformly from `[0, 100)`.
    pub fn takes(&self, roll: f64) -> bool {
        roll < self.percent
    }
}

/// The `Host` a mirrored request carries: the request's with `-shadow` appended to the host
/// part, as Envoy's shadowing does (`reviews:9080` → `reviews-shadow:9080`).
pub fn shadow_host(authority: &str) -> String {
    let port_at = match authority.rfind(':') {
        // An IPv6 literal's colons are inside its brackets.
        Some(i) if !authority[i..].contains(']') => i,
        _ => authority.len(),
    };
    format!("{}-shadow{}", &authority[..port_at], &authority[port_at..])
}

#[cfg(test)]
mod tests;
