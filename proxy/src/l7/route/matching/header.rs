//! String matchers (Envoy's `StringMatcher`: exact, prefix, RE2 regex on the whole value,
//! presence) and header conditions. A header sent more than once is matched against its values
//! joined with `,`, as Envoy does; an absent header matches nothing but an inverted condition.

use http::header::HeaderName;
use http::HeaderMap;
use regex::Regex;

use super::path::full_regex;

/// A condition on one string value.
#[derive(Debug, Clone)]
pub enum StringMatcher {
    Exact(String),
    Prefix(String),
    Regex(Regex),
    /// The value exists (any content).
    Present,
}

impl StringMatcher {
    /// Envoy's `safe_regex` matches the whole value.
    pub fn regex(pattern: &str) -> Result<StringMatcher, regex::Error> {
        Ok(StringMatcher::Regex(full_regex(pattern)?))
    }

    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatcher::Exact(s) => value == s,
            StringMatcher::Prefix(s) => value.starts_with(s.as_str()),
            StringMatcher::Regex(re) => re.is_match(value),
            StringMatcher::Present => true,
        }
    }
}

/// A condition on a request header.
#[derive(Debug, Clone)]
pub struct HeaderMatch {
    pub name: HeaderName,
    pub matcher: StringMatcher,
    /// `withoutHeaders`: the request must not match.
    pub invert: bool,
}

impl HeaderMatch {
    pub fn matches(&self, headers: &HeaderMap) -> bool {
        let mut values = headers.get_all(&self.name).iter();
        let hit = match (values.next(), values.next()) {
            (None, _) => false,
            (Some(one), None) => one.to_str().is_ok_and(|v| self.matcher.matches(v)),
            (Some(first), Some(second)) => {
                let mut joined = String::new();
                for v in [first, second].into_iter().chain(values) {
                    let Ok(v) = v.to_str() else {
                        return self.invert;
                    };
                    if !joined.is_empty() {
                        joined.push(',');
                    }
                    joined.push_str(v);
                }
                self.matcher.matches(&joined)
            }
        };
        hit != self.invert
    }
}
