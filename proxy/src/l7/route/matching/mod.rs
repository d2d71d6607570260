//! Request matchers, compiled once per snapshot: [`path`] (Envoy's exact/prefix/regex, the
//! Gateway API's element-wise `PathPrefix`), [`header`] (string matchers on headers, the method,
//! the authority), [`query`] (query parameters), and [`Conditions`], one match of a rule with
//! everything it requires (AND). [`index`] finds the few rules a request can match among many.

pub mod header;
pub mod index;
pub mod path;
pub mod query;

use crate::registry::Labels;

use super::RouteRequest;
pub use header::{HeaderMatch, StringMatcher};
pub use path::{MatchedPath, PathMatch};
pub use query::{QueryMatch, QueryParams};

/// One match of a rule: every condition must hold.
#[derive(Debug, Clone, Default)]
pub struct Conditions {
    pub path: Option<PathMatch>,
    pub method: Option<StringMatcher>,
    pub authority: Option<StringMatcher>,
    pub scheme: Option<StringMatcher>,
    pub headers: Vec<HeaderMatch>,
    pub query: Vec<QueryMatch>,
    /// The port the client called.
    pub port: Option<u16>,
    pub source_labels: Option<Labels>,
    pub source_namespace: Option<String>,
    /// gRPC routes match gRPC requests only (`content-type: application/grpc…`).
    pub grpc: bool,
}

/// The scheme of requests the node proxy receives: captured connections carry plaintext.
const SCHEME: &str = "http";

impl Conditions {
    /// Whether `req` satisfies every condition; on success, what the path match covered.
    pub fn matches<'a>(
        &self,
        req: &RouteRequest<'a>,
        query: &mut QueryParams<'a>,
    ) -> Option<MatchedPath> {
        if self.port.is_some_and(|p| p != req.port) {
            return None;
        }
        if let Some(ns) = &self.source_namespace {
            if req.source_namespace != Some(ns.as_str()) {
                return None;
            }
        }
        if let Some(want) = &self.source_labels {
            let labels = req.source_labels?;
            if !want.iter().all(|(k, v)| labels.get(k) == Some(v)) {
                return None;
            }
        }
        if self.grpc && !is_grpc(req.headers) {
            return None;
        }
        let path = path::path_of(req.path_and_query);
        let matched = match &self.path {
            Some(p) => p.matches(path)?,
            // Istio's match-all is Envoy's `/` prefix, which a prefix rewrite then replaces.
            None => MatchedPath::Prefix(usize::from(path.starts_with('/'))),
        };
        if let Some(m) = &self.method {
            if !m.matches(req.method.as_str()) {
                return None;
            }
        }
        if let Some(m) = &self.authority {
            if !m.matches(req.authority) {
                return None;
            }
        }
        if let Some(m) = &self.scheme {
            if !m.matches(SCHEME) {
                return None;
            }
        }
        if !self.headers.iter().all(|h| h.matches(req.headers)) {
            return None;
        }
        if !self.query.is_empty() {
            let params = query.get(req.path_and_query);
            if !self.query.iter().all(|q| q.matches(params)) {
                return None;
            }
        }
        Some(matched)
    }
}

/// A gRPC request: `content-type` `application/grpc` or `application/grpc+…`.
pub fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct == "application/grpc"
                || ct.starts_with("application/grpc+")
                || ct.starts_with("application/grpc;")
        })
}

#[cfg(test)]
mod tests;
