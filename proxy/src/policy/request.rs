//! The HTTP attributes of AuthorizationPolicy: the request as a policy sees it ([`HttpRequest`])
//! and the matchers for `hosts`, `methods`, `paths` and `request.headers[…]`, with the
//! semantics of the Envoy RBAC configuration Istio generates for them
//! (`pilot/pkg/security/authz/{model/generator.go,matcher/}`):
//!
//! - `hosts` match the `:authority` (the `Host` header of HTTP/1.1) as sent, port included,
//!   ignoring ASCII case: `*` any, `*.example.com` suffix, `example.*` prefix, else exact. So
//!   `example.com` does not match `example.com:8080`, as in Istio.
//! - `methods` and `request.headers[Name]` are Envoy header matchers, case-sensitive: `*` (the
//!   header is present, any value), `*suffix`, `prefix*`, exact. A header sent more than once is
//!   matched as its values joined with `,`. `request.headers[:authority]` and
//!   `request.headers[host]` are the authority, `[:method]` the method, `[:path]` the path with
//!   its query.
//! - `paths` match the path without query string or fragment (Envoy's `url_path`): `*` any
//!   non-empty path, `/api/*` prefix, `*.png` suffix, else exact; with `{*}` (one path segment)
//!   or `{**}` (any number of segments, last operator) a URI template, as Envoy's
//!   `uri_template` matcher.
//!
//! Imports: `http` (the crate) only.

use std::borrow::Cow;

use http::header::HOST;
use http::{HeaderMap, HeaderName};

/// One HTTP request, as the destination node received it (after the source node's routing).
#[derive(Debug, Clone, Copy)]
pub struct HttpRequest<'a> {
    /// `:method`, e.g. `GET`.
    pub method: &'a str,
    /// `:authority` (HTTP/2) or the `Host` header (HTTP/1.1) as sent, port included if the
    /// client wrote one; empty when the request has none.
    pub authority: &'a str,
    /// `:path` as sent (origin form, query included): `paths` ignore what follows `?` or `#`.
    /// Normalization (dot segments) is the HTTP engine's, before it authorizes and forwards.
    pub path: &'a str,
    pub headers: &'a HeaderMap,
}

impl<'a> HttpRequest<'a> {
    /// The request head as hyper hands it over: the authority from the URI (HTTP/2, absolute
    /// form) or else the `Host` header.
    pub fn from_parts(parts: &'a http::request::Parts) -> HttpRequest<'a> {
        let authority = parts
            .uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| parts.headers.get(HOST).and_then(|h| h.to_str().ok()))
            .unwrap_or("");
        HttpRequest {
            method: parts.method.as_str(),
            authority,
            path: parts
                .uri
                .path_and_query()
                .map_or_else(|| parts.uri.path(), |p| p.as_str()),
            headers: &parts.headers,
        }
    }

    /// The path `paths` match: without query string or fragment.
    pub(super) fn url_path(&self) -> &'a str {
        match self.path.find(['?', '#']) {
            Some(end) => &self.path[..end],
            None => self.path,
        }
    }
}

/// A `hosts` value: matched against the authority ignoring ASCII case (stored lowercase).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum HostMatch {
    Present,
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
}

impl HostMatch {
    pub(super) fn new(v: &str) -> HostMatch {
        let v = v.to_ascii_lowercase();
        if v == "*" {
            HostMatch::Present
        } else if let Some(s) = v.strip_prefix('*') {
            HostMatch::Suffix(s.into())
        } else if let Some(p) = v.strip_suffix('*') {
            HostMatch::Prefix(p.into())
        } else {
            HostMatch::Exact(v.into())
        }
    }

    pub(super) fn matches(&self, authority: &str) -> bool {
        let a = authority.as_bytes();
        match self {
            HostMatch::Present => !a.is_empty(),
            HostMatch::Exact(e) => a.eq_ignore_ascii_case(e.as_bytes()),
            HostMatch::Prefix(p) => {
                a.len() >= p.len() && a[..p.len()].eq_ignore_ascii_case(p.as_bytes())
            }
            HostMatch::Suffix(s) => {
                a.len() >= s.len() && a[a.len() - s.len()..].eq_ignore_ascii_case(s.as_bytes())
            }
        }
    }
}

/// An Envoy header matcher's value as Istio writes it: `*` present, `*suffix`, `prefix*`, exact;
/// case-sensitive, on bytes (header values need not be UTF-8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ValueMatch {
    Present,
    Exact(Box<[u8]>),
    Prefix(Box<[u8]>),
    Suffix(Box<[u8]>),
}

impl ValueMatch {
    pub(super) fn new(v: &str) -> ValueMatch {
        if v == "*" {
            ValueMatch::Present
        } else if let Some(s) = v.strip_prefix('*') {
            ValueMatch::Suffix(s.as_bytes().into())
        } else if let Some(p) = v.strip_suffix('*') {
            ValueMatch::Prefix(p.as_bytes().into())
        } else {
            ValueMatch::Exact(v.as_bytes().into())
        }
    }

    /// `value`: the header's value, `None` when the request does not carry it.
    pub(super) fn matches(&self, value: Option<&[u8]>) -> bool {
        let Some(v) = value else { return false };
        match self {
            ValueMatch::Present => true,
            ValueMatch::Exact(e) => **e == *v,
            ValueMatch::Prefix(p) => v.starts_with(p),
            ValueMatch::Suffix(s) => v.ends_with(s),
        }
    }
}

/// The header a `request.headers[Name]` condition reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum HeaderKey {
    /// `:authority` or `host`: Envoy keeps the `Host` of HTTP/1.1 as `:authority`.
    Authority,
    Method,
    /// `:path`, query included.
    Path,
    Name(HeaderName),
    /// Not a valid header name: no request carries it.
    Absent,
}

impl HeaderKey {
    /// `None` for a pseudo-header weft does not see (`:scheme`, `:protocol`, …), which makes
    /// the condition one weft cannot evaluate.
    pub(super) fn new(name: &str) -> Option<HeaderKey> {
        let lower = name.to_ascii_lowercase();
        Some(match lower.as_str() {
            ":authority" | "host" => HeaderKey::Authority,
            ":method" => HeaderKey::Method,
            ":path" => HeaderKey::Path,
            n if n.starts_with(':') => return None,
            n => HeaderName::from_bytes(n.as_bytes()).map_or(HeaderKey::Absent, HeaderKey::Name),
        })
    }

    /// The value Envoy would match: several values joined with `,`.
    pub(super) fn value<'r>(&self, req: &HttpRequest<'r>) -> Option<Cow<'r, [u8]>> {
        let present = |s: &'r str| (!s.is_empty()).then_some(Cow::Borrowed(s.as_bytes()));
        match self {
            HeaderKey::Authority => present(req.authority),
            HeaderKey::Method => present(req.method),
            HeaderKey::Path => present(req.path),
            HeaderKey::Absent => None,
            HeaderKey::Name(name) => {
                let mut values = req.headers.get_all(name).iter();
                let first = values.next()?;
                match values.next() {
                    None => Some(Cow::Borrowed(first.as_bytes())),
                    Some(second) => {
                        let mut joined = first.as_bytes().to_vec();
                        for v in std::iter::once(second).chain(values) {
                            joined.push(b',');
                            joined.extend_from_slice(v.as_bytes());
                        }
                        Some(Cow::Owned(joined))
                    }
                }
            }
        }
    }
}

/// A `paths` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum PathMatch {
    /// `*`: any non-empty path.
    NonEmpty,
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
    Template(Box<[Piece]>),
}

/// A piece of a path template: literal text (slashes included), `{*}` or `{**}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Piece {
    Literal(Box<str>),
    /// `{*}`: one or more path characters, no `/`.
    Segment,
    /// `{**}`: zero or more path characters and `/`.
    Segments,
}

impl PathMatch {
    pub(super) fn new(v: &str) -> PathMatch {
        if v.contains("{*}") || v.contains("{**}") {
            return PathMatch::Template(template(v).into());
        }
        if v == "*" {
            PathMatch::NonEmpty
        } else if let Some(s) = v.strip_prefix('*') {
            PathMatch::Suffix(s.into())
        } else if let Some(p) = v.strip_suffix('*') {
            PathMatch::Prefix(p.into())
        } else {
            PathMatch::Exact(v.into())
        }
    }

    /// `path`: without query or fragment.
    pub(super) fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::NonEmpty => !path.is_empty(),
            PathMatch::Exact(e) => **e == *path,
            PathMatch::Prefix(p) => path.starts_with(&**p),
            PathMatch::Suffix(s) => path.ends_with(&**s),
            PathMatch::Template(pieces) => template_matches(pieces, path.as_bytes()),
        }
    }
}

fn template(v: &str) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let mut rest = v;
    while !rest.is_empty() {
        let (before, op, after) = match (rest.find("{*}"), rest.find("{**}")) {
            (Some(one), Some(any)) if any < one => {
                (&rest[..any], Piece::Segments, &rest[any + 4..])
            }
            (Some(one), _) => (&rest[..one], Piece::Segment, &rest[one + 3..]),
            (None, Some(any)) => (&rest[..any], Piece::Segments, &rest[any + 4..]),
            (None, None) => (rest, Piece::Literal(rest.into()), ""),
        };
        if !before.is_empty() && !matches!(op, Piece::Literal(_)) {
            pieces.push(Piece::Literal(before.into()));
        }
        pieces.push(op);
        rest = after;
    }
    pieces
}

/// Envoy's path characters for template operators (RFC 3986 pchar without `*` and `=`).
fn is_path_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~%!$&'()+,;:@".contains(&b)
}

/// Whether `path` is all of `pieces` (anchored at both ends, as Envoy's full regex match).
/// Backtracks over how much each operator takes; the registry allows at most one `{**}` and no
/// operator after it, so this stays linear in practice.
fn template_matches(pieces: &[Piece], path: &[u8]) -> bool {
    let Some((first, rest)) = pieces.split_first() else {
        return path.is_empty();
    };
    match first {
        Piece::Literal(l) => {
            path.starts_with(l.as_bytes()) && template_matches(rest, &path[l.len()..])
        }
        Piece::Segment => {
            let max = path.iter().take_while(|b| is_path_char(**b)).count();
            (1..=max).rev().any(|n| template_matches(rest, &path[n..]))
        }
        Piece::Segments => {
            let max = path
                .iter()
                .take_while(|b| is_path_char(**b) || **b == b'/')
                .count();
            (0..=max).rev().any(|n| template_matches(rest, &path[n..]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_ignore_case_and_keep_the_port() {
        assert!(HostMatch::new("Shop.Example").matches("shop.EXAMPLE"));
        assert!(!HostMatch::new("shop.example").matches("shop.example:8080"));
        assert!(HostMatch::new("shop.example*").matches("SHOP.example:8080"));
        assert!(HostMatch::new("*.Example").matches("api.example"));
        assert!(!HostMatch::new("*.example").matches("example"));
        assert!(HostMatch::new("*").matches("x"));
        assert!(!HostMatch::new("*").matches(""));
    }

    #[test]
    fn values_are_case_sensitive_and_star_means_present() {
        assert!(ValueMatch::new("GET").matches(Some(b"GET")));
        assert!(!ValueMatch::new("GET").matches(Some(b"get")));
        assert!(ValueMatch::new("P*").matches(Some(b"POST")));
        assert!(ValueMatch::new("*CH").matches(Some(b"PATCH")));
        assert!(ValueMatch::new("*").matches(Some(b"")));
        assert!(!ValueMatch::new("*").matches(None));
        assert!(!ValueMatch::new("x").matches(None));
    }

    #[test]
    fn paths() {
        let m = |p: &str, path: &str| PathMatch::new(p).matches(path);
        assert!(m("/api", "/api"));
        assert!(!m("/api", "/api/"));
        assert!(!m("/API", "/api"));
        assert!(m("/api/*", "/api/"));
        assert!(m("/api/*", "/api/v1/users"));
        assert!(!m("/api/*", "/api"));
        assert!(m("*.png", "/img/a.png"));
        assert!(m("*", "/"));
    }

    #[test]
    fn path_templates() {
        let m = |p: &str, path: &str| PathMatch::new(p).matches(path);
        assert_eq!(
            template("/a/{*}/b/{**}"),
            vec![
                Piece::Literal("/a/".into()),
                Piece::Segment,
                Piece::Literal("/b/".into()),
                Piece::Segments
            ]
        );
        assert!(m("/users/{*}", "/users/42"));
        assert!(!m("/users/{*}", "/users/"));
        assert!(!m("/users/{*}", "/users/42/posts"));
        assert!(m("/users/{*}/posts", "/users/42/posts"));
        assert!(!m("/users/{*}/posts", "/users/42/7/posts"));
        assert!(m("/files/{**}", "/files/"));
        assert!(m("/files/{**}", "/files/a/b/c.txt"));
        assert!(!m("/files/{**}", "/files"));
        assert!(m("/{**}/edit", "/a/b/edit"));
        assert!(m("/{**}/edit", "//edit"));
        assert!(!m("/{**}/edit", "/a/b/edit/x"));
        assert!(m("/{*}/{**}", "/a/b"));
        // Characters outside Envoy's path characters end an operator's match.
        assert!(!m("/users/{*}", "/users/a=b"));
        assert!(!m("/files/{**}", "/files/a*b"));
    }

    #[test]
    fn headers_join_repeated_values_and_read_pseudo_headers() {
        let mut headers = HeaderMap::new();
        headers.append("x-user", "alice".parse().unwrap());
        headers.append("x-user", "bob".parse().unwrap());
        headers.insert("x-one", "1".parse().unwrap());
        let req = HttpRequest {
            method: "GET",
            authority: "shop:8080",
            path: "/a?b=c",
            headers: &headers,
        };
        let value = |name: &str| {
            HeaderKey::new(name)
                .unwrap()
                .value(&req)
                .map(|v| v.to_vec())
        };
        assert_eq!(value("X-User"), Some(b"alice,bob".to_vec()));
        assert_eq!(value("x-one"), Some(b"1".to_vec()));
        assert_eq!(value("x-none"), None);
        assert_eq!(value("Host"), Some(b"shop:8080".to_vec()));
        assert_eq!(value(":method"), Some(b"GET".to_vec()));
        assert_eq!(value(":path"), Some(b"/a?b=c".to_vec()));
        assert_eq!(value("bad name"), None);
        assert_eq!(HeaderKey::new(":scheme"), None);
        assert_eq!(req.url_path(), "/a");
    }

    #[test]
    fn from_parts_takes_the_host_header_without_an_authority() {
        let (parts, ()) = http::Request::get("/x?y")
            .header("host", "Shop:80")
            .body(())
            .unwrap()
            .into_parts();
        let req = HttpRequest::from_parts(&parts);
        assert_eq!(
            (req.method, req.authority, req.path),
            ("GET", "Shop:80", "/x?y")
        );
        let (parts, ()) = http::Request::get("http://api:9/z")
            .header("host", "other")
            .body(())
            .unwrap()
            .into_parts();
        let req = HttpRequest::from_parts(&parts);
        assert_eq!((req.authority, req.path), ("api:9", "/z"));
    }
}
