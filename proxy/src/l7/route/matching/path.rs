//! Path matching. Envoy's (VirtualService `uri`): `exact`, `prefix` (a string prefix), `regex`
//! (RE2, the whole path), optionally case-insensitive (`ignoreUriCase`, not for regexes). The
//! Gateway API's `PathPrefix` is element-wise: `/abc` matches `/abc`, `/abc/` and `/abc/def`, not
//! `/abcd`; a trailing `/` in the prefix is ignored. Paths are matched without the query string.

use regex::Regex;

/// A compiled path condition.
#[derive(Debug, Clone)]
pub enum PathMatch {
    Exact {
        value: String,
        ignore_case: bool,
    },
    Prefix {
        value: String,
        ignore_case: bool,
    },
    /// The Gateway API's `PathPrefix`, kept without its trailing `/`.
    Segments(String),
    /// Anchored: matches the whole path. `literal`: what every match starts with (for the
    /// index; may be empty).
    Regex {
        regex: Regex,
        literal: String,
    },
}

/// What a path match covered, for prefix rewrites.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchedPath {
    /// The first `n` bytes of the path: a prefix match, or `1` when the rule had no path
    /// condition (Istio gives such a rule Envoy's `/` prefix, and a prefix rewrite replaces it).
    Prefix(usize),
    /// The whole path (exact and regex matches).
    Full,
}

impl PathMatch {
    pub fn exact(value: &str, ignore_case: bool) -> PathMatch {
        PathMatch::Exact {
            value: if ignore_case {
                value.to_ascii_lowercase()
            } else {
                value.to_string()
            },
            ignore_case,
        }
    }

    pub fn prefix(value: &str, ignore_case: bool) -> PathMatch {
        PathMatch::Prefix {
            value: if ignore_case {
                value.to_ascii_lowercase()
            } else {
                value.to_string()
            },
            ignore_case,
        }
    }

    /// The Gateway API's `PathPrefix`.
    pub fn segments(value: &str) -> PathMatch {
        PathMatch::Segments(value.trim_end_matches('/').to_string())
    }

    /// A regex matching the whole path (Envoy's `safe_regex`); the pattern is checked when the
    /// registry loads it.
    pub fn regex(pattern: &str) -> Result<PathMatch, regex::Error> {
        Ok(PathMatch::Regex {
            regex: full_regex(pattern)?,
            literal: literal_prefix(pattern),
        })
    }

    pub fn matches(&self, path: &str) -> Option<MatchedPath> {
        match self {
            PathMatch::Exact { value, ignore_case } => {
                let eq = if *ignore_case {
                    path.eq_ignore_ascii_case(value)
                } else {
                    path == value
                };
                eq.then_some(MatchedPath::Full)
            }
            PathMatch::Prefix { value, ignore_case } => {
                let head = path.get(..value.len())?;
                let eq = if *ignore_case {
                    head.eq_ignore_ascii_case(value)
                } else {
                    head == value
                };
                eq.then_some(MatchedPath::Prefix(value.len()))
            }
            PathMatch::Segments(prefix) => {
                let rest = path.strip_prefix(prefix.as_str())?;
                (rest.is_empty() || rest.starts_with('/'))
                    .then_some(MatchedPath::Prefix(prefix.len()))
            }
            PathMatch::Regex { regex, .. } => regex.is_match(path).then_some(MatchedPath::Full),
        }
    }
}

/// `pattern` anchored at both ends, as Envoy's `safe_regex` matches whole values.
pub fn full_regex(pattern: &str) -> Result<Regex, regex::Error> {
    Regex::new(&format!("^(?:{pattern})$"))
}

/// The plain characters every match of `pattern` starts with: up to the first metacharacter,
/// less a last character a quantifier applies to; empty when the pattern has an alternation
/// (`a|b` may start either way) or starts with anything but a plain character.
pub fn literal_prefix(pattern: &str) -> String {
    const META: &[char] = &[
        '\\', '.', '+', '*', '?', '(', ')', '|', '[', ']', '{', '}', '^', '$',
    ];
    if pattern.contains('|') {
        return String::new();
    }
    let body = pattern.strip_prefix('^').unwrap_or(pattern);
    let end = body.find(META).unwrap_or(body.len());
    let mut literal = body[..end].to_string();
    if matches!(body[end..].chars().next(), Some('?' | '*' | '{')) {
        literal.pop();
    }
    literal
}

/// The path of a request target, without its query string (and fragment).
pub fn path_of(path_and_query: &str) -> &str {
    let end = path_and_query
        .find(['?', '#'])
        .unwrap_or(path_and_query.len());
    &path_and_query[..end]
}
