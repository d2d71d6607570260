//! Query parameter conditions. Parameters are parsed once per request, only when a candidate
//! rule needs them, and percent-decoded; a parameter given more than once is matched by its
//! first value (Envoy's and the Gateway API's recommendation).

use std::borrow::Cow;

use super::header::StringMatcher;

/// A condition on a query parameter (its name is compared exactly).
#[derive(Debug, Clone)]
pub struct QueryMatch {
    pub name: String,
    pub matcher: StringMatcher,
}

impl QueryMatch {
    pub fn matches(&self, params: &[(Cow<'_, str>, Cow<'_, str>)]) -> bool {
        params
            .iter()
            .find(|(k, _)| *k == self.name)
            .is_some_and(|(_, v)| self.matcher.matches(v))
    }
}

/// The query parameters of one request, parsed on first use.
#[derive(Debug, Default)]
pub struct QueryParams<'a> {
    parsed: Option<Vec<(Cow<'a, str>, Cow<'a, str>)>>,
}

impl<'a> QueryParams<'a> {
    pub fn get(&mut self, path_and_query: &'a str) -> &[(Cow<'a, str>, Cow<'a, str>)] {
        self.parsed.get_or_insert_with(|| parse(path_and_query))
    }
}

/// `name=value` pairs of the query string (`a=1&b&c=%20`), decoded.
pub fn parse(path_and_query: &str) -> Vec<(Cow<'_, str>, Cow<'_, str>)> {
    let Some((_, query)) = path_and_query.split_once('?') else {
        return Vec::new();
    };
    let query = query.split('#').next().unwrap_or("");
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// Percent-decoding (`%20` → space); invalid escapes are kept as written.
fn decode(s: &str) -> Cow<'_, str> {
    if !s.contains('%') {
        return Cow::Borrowed(s);
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        match (
            b[i],
            b.get(i + 1).and_then(|c| hex(*c)),
            b.get(i + 2).and_then(|c| hex(*c)),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push(h * 16 + l);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}
