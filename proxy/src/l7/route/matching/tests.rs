use http::{HeaderMap, HeaderValue, Method};

use super::index::RuleIndex;
use super::query::parse;
use super::*;
use crate::registry::Labels;

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            http::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

#[test]
fn envoy_paths() {
    let exact = PathMatch::exact("/a/b", false);
    assert_eq!(exact.matches("/a/b"), Some(MatchedPath::Full));
    assert_eq!(exact.matches("/a/b/"), None);
    assert_eq!(exact.matches("/A/b"), None);
    assert_eq!(
        PathMatch::exact("/A/b", true).matches("/a/B"),
        Some(MatchedPath::Full)
    );

    let prefix = PathMatch::prefix("/api", false);
    assert_eq!(prefix.matches("/api"), Some(MatchedPath::Prefix(4)));
    assert_eq!(
        prefix.matches("/apis/x"),
        Some(MatchedPath::Prefix(4)),
        "a string prefix"
    );
    assert_eq!(prefix.matches("/ap"), None);
    assert_eq!(
        PathMatch::prefix("/API", true).matches("/api/v1"),
        Some(MatchedPath::Prefix(4))
    );
    assert_eq!(
        PathMatch::prefix("", false).matches("/x"),
        Some(MatchedPath::Prefix(0))
    );

    let re = PathMatch::regex("/users/[0-9]+").unwrap();
    assert_eq!(re.matches("/users/42"), Some(MatchedPath::Full));
    assert_eq!(
        re.matches("/users/42/x"),
        None,
        "a regex matches the whole path"
    );
    assert_eq!(re.matches("x/users/42"), None);
}

#[test]
fn gateway_api_prefixes_match_whole_elements() {
    let p = PathMatch::segments("/abc");
    for ok in ["/abc", "/abc/", "/abc/def"] {
        assert_eq!(p.matches(ok), Some(MatchedPath::Prefix(4)), "{ok}");
    }
    assert_eq!(p.matches("/abcd"), None);
    // A trailing slash in the prefix is ignored.
    let p = PathMatch::segments("/abc/");
    assert_eq!(p.matches("/abc"), Some(MatchedPath::Prefix(4)));
    let root = PathMatch::segments("/");
    assert_eq!(root.matches("/anything"), Some(MatchedPath::Prefix(0)));
    assert_eq!(root.matches("/"), Some(MatchedPath::Prefix(0)));
}

#[test]
fn regex_literal_prefixes() {
    use super::path::literal_prefix;
    assert_eq!(literal_prefix("/api/v[0-9]+/.*"), "/api/v");
    assert_eq!(literal_prefix("^/users/.*"), "/users/");
    assert_eq!(
        literal_prefix("/users?"),
        "/user",
        "an optional last character is not required"
    );
    assert_eq!(literal_prefix("/ab{2}"), "/a");
    assert_eq!(literal_prefix("/a|/b"), "");
    assert_eq!(literal_prefix("[/]x"), "");
    assert_eq!(literal_prefix("/pkg\\.Svc/.*"), "/pkg");
    assert_eq!(literal_prefix("/plain"), "/plain");
}

#[test]
fn paths_are_matched_without_the_query() {
    assert_eq!(path::path_of("/a?b=c"), "/a");
    assert_eq!(path::path_of("/a#frag"), "/a");
    assert_eq!(path::path_of("/a"), "/a");
}

#[test]
fn header_conditions() {
    let m = |name: &str, matcher: StringMatcher, invert: bool| HeaderMatch {
        name: http::header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
        matcher,
        invert,
    };
    let h = headers(&[("x-user", "jason"), ("x-multi", "a"), ("x-multi", "b")]);
    assert!(m("x-user", StringMatcher::Exact("jason".into()), false).matches(&h));
    assert!(!m("x-user", StringMatcher::Exact("Jason".into()), false).matches(&h));
    assert!(m("x-user", StringMatcher::Prefix("ja".into()), false).matches(&h));
    assert!(m("x-user", StringMatcher::regex("j.*n").unwrap(), false).matches(&h));
    assert!(
        !m("x-user", StringMatcher::regex("j").unwrap(), false).matches(&h),
        "whole value"
    );
    assert!(m("x-user", StringMatcher::Present, false).matches(&h));
    assert!(!m("x-none", StringMatcher::Present, false).matches(&h));
    // Repeated headers: values joined with a comma.
    assert!(m("x-multi", StringMatcher::Exact("a,b".into()), false).matches(&h));
    // withoutHeaders.
    assert!(m("x-none", StringMatcher::Present, true).matches(&h));
    assert!(!m("x-user", StringMatcher::Exact("jason".into()), true).matches(&h));
    assert!(m("x-user", StringMatcher::Exact("other".into()), true).matches(&h));
}

#[test]
fn query_parameters_are_decoded_and_the_first_counts() {
    let p = parse("/x?a=1&b=hello%20world&a=2&flag&c=%zz");
    let q = |name: &str, m: StringMatcher| {
        QueryMatch {
            name: name.into(),
            matcher: m,
        }
        .matches(&p)
    };
    assert!(q("a", StringMatcher::Exact("1".into())));
    assert!(!q("a", StringMatcher::Exact("2".into())));
    assert!(q("b", StringMatcher::Exact("hello world".into())));
    assert!(q("flag", StringMatcher::Present));
    assert!(q("flag", StringMatcher::Exact("".into())));
    assert!(
        q("c", StringMatcher::Exact("%zz".into())),
        "an invalid escape is kept"
    );
    assert!(!q("A", StringMatcher::Present), "names are case-sensitive");
    assert!(parse("/x").is_empty());
}

fn hm(name: &str, value: &str, invert: bool) -> HeaderMatch {
    HeaderMatch {
        name: http::header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
        matcher: StringMatcher::Exact(value.into()),
        invert,
    }
}

#[test]
fn the_index_yields_every_candidate_in_order() {
    let with_path = |p: Option<PathMatch>| Conditions {
        path: p,
        ..Conditions::default()
    };
    let entries = [
        with_path(Some(PathMatch::exact("/a", false))),
        with_path(Some(PathMatch::prefix("/a", false))),
        with_path(None),
        with_path(Some(PathMatch::prefix("/b", false))),
        with_path(Some(PathMatch::regex("/a.*").unwrap())),
        with_path(Some(PathMatch::segments("/a"))),
        with_path(Some(PathMatch::prefix("/A/B", true))),
        with_path(Some(PathMatch::exact("/A", true))),
        // Filed under their header: a `/` prefix or no path says nothing.
        Conditions {
            path: Some(PathMatch::prefix("/", false)),
            headers: vec![hm("x-v", "1", false)],
            ..Conditions::default()
        },
        Conditions {
            headers: vec![hm("x-v", "2", false)],
            ..Conditions::default()
        },
        Conditions {
            headers: vec![hm("x-v", "3", true)],
            ..Conditions::default()
        },
        Conditions {
            headers: vec![hm("x-v", "1,2", false)],
            ..Conditions::default()
        },
        // A regex without a literal start: a candidate when it matches (run with the others
        // like it as one set).
        with_path(Some(PathMatch::regex("[/]c").unwrap())),
    ];
    let ix = RuleIndex::new(entries.iter());
    let none = headers(&[]);
    let mut out = Vec::new();
    ix.candidates("/a", &none, &mut out);
    assert_eq!(out, [0, 1, 2, 4, 5, 7, 10]);
    ix.candidates("/a/b/c", &none, &mut out);
    assert_eq!(out, [1, 2, 4, 5, 6, 10]);
    ix.candidates("/c", &headers(&[("x-v", "2")]), &mut out);
    assert_eq!(
        out,
        [2, 9, 10, 12],
        "the regex /a.* counts by its literal /a"
    );
    ix.candidates("/c", &headers(&[("x-v", "1"), ("x-v", "2")]), &mut out);
    assert_eq!(
        out,
        [2, 10, 11, 12],
        "a repeated header is looked up joined"
    );
    // The index only narrows: every true match is among the candidates.
    let method = Method::GET;
    for h in [
        headers(&[]),
        headers(&[("x-v", "1")]),
        headers(&[("x-v", "2")]),
        headers(&[("x-v", "1"), ("x-v", "2")]),
    ] {
        for path in ["/a", "/ab", "/a/b", "/b", "/B", "/a/B/x", "/", "/c", "/c/"] {
            ix.candidates(path, &h, &mut out);
            let req = RouteRequest {
                host: "h",
                port: 80,
                source_namespace: None,
                source_labels: None,
                method: &method,
                authority: "h",
                path_and_query: path,
                headers: &h,
            };
            let mut q = QueryParams::default();
            for (i, c) in entries.iter().enumerate() {
                if c.matches(&req, &mut q).is_some() {
                    assert!(
                        out.contains(&(i as u32)),
                        "{path} {h:?}: {i} missing from {out:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn conditions_cover_port_source_and_grpc() {
    let method = Method::POST;
    let mut labels = Labels::new();
    labels.insert("app".into(), "client".into());
    let plain = headers(&[]);
    let grpc = headers(&[("content-type", "application/grpc+proto")]);
    fn request<'a>(method: &'a Method, h: &'a HeaderMap) -> RouteRequest<'a> {
        RouteRequest {
            host: "web.back.svc.cluster.local",
            port: 80,
            source_namespace: Some("front"),
            source_labels: None,
            method,
            authority: "web.back:80",
            path_and_query: "/x?y=1",
            headers: h,
        }
    }
    let req = |h| request(&method, h);
    let (plain, grpc) = (&plain, &grpc);
    let mut q = QueryParams::default();
    let any = Conditions::default();
    // Istio's match-all is Envoy's `/` prefix: one byte covered.
    assert_eq!(
        any.matches(&req(plain), &mut q),
        Some(MatchedPath::Prefix(1))
    );
    let port = Conditions {
        port: Some(8080),
        ..Conditions::default()
    };
    assert_eq!(port.matches(&req(plain), &mut q), None);
    let ns = Conditions {
        source_namespace: Some("back".into()),
        ..Conditions::default()
    };
    assert_eq!(ns.matches(&req(plain), &mut q), None);
    let by_labels = Conditions {
        source_labels: Some(labels.clone()),
        ..Conditions::default()
    };
    assert_eq!(
        by_labels.matches(&req(plain), &mut q),
        None,
        "unknown source labels"
    );
    let mut with_labels = req(plain);
    with_labels.source_labels = Some(&labels);
    assert!(by_labels.matches(&with_labels, &mut q).is_some());
    let g = Conditions {
        grpc: true,
        ..Conditions::default()
    };
    assert_eq!(g.matches(&req(plain), &mut q), None);
    assert!(g.matches(&req(grpc), &mut q).is_some());
    let m = Conditions {
        method: Some(StringMatcher::Exact("GET".into())),
        ..Conditions::default()
    };
    assert_eq!(m.matches(&req(plain), &mut q), None);
    let scheme = Conditions {
        scheme: Some(StringMatcher::Exact("http".into())),
        ..Conditions::default()
    };
    assert!(scheme.matches(&req(plain), &mut q).is_some());
    let authority = Conditions {
        authority: Some(StringMatcher::Prefix("web.back".into())),
        ..Conditions::default()
    };
    assert!(authority.matches(&req(plain), &mut q).is_some());
    let query = Conditions {
        query: vec![QueryMatch {
            name: "y".into(),
            matcher: StringMatcher::Exact("1".into()),
        }],
        ..Conditions::default()
    };
    assert!(query.matches(&req(plain), &mut q).is_some());
}

#[test]
fn regexes_without_a_literal_start_are_candidates_when_they_match() {
    let with_path = |p: &str| Conditions {
        path: Some(PathMatch::regex(p).unwrap()),
        ..Conditions::default()
    };
    let entries = [
        with_path("[/]a.*"),
        with_path(".*b"),
        with_path("[/]a/b"),
        with_path(".*\\bq\\b.*"),
        // Filed by its literal start, not in the set.
        with_path("/lit.*"),
    ];
    let ix = RuleIndex::new(entries.iter());
    let none = headers(&[]);
    let mut out = Vec::new();
    ix.candidates("/a/b", &none, &mut out);
    assert_eq!(out, [0, 1, 2], "every pattern that matches, each once");
    ix.candidates("/xb", &none, &mut out);
    assert_eq!(out, [1]);
    ix.candidates("/x q y", &none, &mut out);
    assert_eq!(out, [3], "an ASCII word boundary");
    ix.candidates("/z", &none, &mut out);
    assert!(out.is_empty(), "{out:?}");
    ix.candidates("/lit/x", &none, &mut out);
    assert_eq!(out, [4]);
    // A Unicode word boundary on a non-ASCII path: the search gives up, and every one of them
    // is a candidate (the full conditions decide).
    ix.candidates("/é q", &none, &mut out);
    assert_eq!(out, [0, 1, 2, 3]);
}
