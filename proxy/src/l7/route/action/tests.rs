use std::str::FromStr;

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, StatusCode};

use super::*;

fn dest(host: &str, weight: u32) -> WeightedDestination {
    WeightedDestination {
        host: host.into(),
        port: None,
        subset: None,
        weight,
        request_headers: HeaderOps::default(),
        response_headers: HeaderOps::default(),
    }
}

fn forward(destinations: Vec<WeightedDestination>) -> Forward {
    Forward {
        destinations,
        rewrite: None,
        request_headers: HeaderOps::default(),
        response_headers: HeaderOps::default(),
        timeout: None,
        retries: None,
        fault: None,
        mirrors: Vec::new(),
        cors: None,
    }
}

#[test]
fn picks_by_weight_from_the_roll() {
    let f = forward(vec![dest("a", 75), dest("b", 25), dest("never", 0)]);
    assert_eq!(f.pick(0).host, "a");
    assert_eq!(f.pick(74).host, "a");
    assert_eq!(f.pick(75).host, "b");
    assert_eq!(f.pick(99).host, "b");
    assert_eq!(f.pick(100).host, "a", "the roll wraps");
    let mut counts = [0; 2];
    for roll in 0..10_000u32 {
        counts[(f.pick(roll.wrapping_mul(2_654_435_761)).host == "b") as usize] += 1;
    }
    assert!((2300..2700).contains(&counts[1]), "{counts:?}");
    // Relative weights need not sum to 100.
    let f = forward(vec![dest("a", 1), dest("b", 3)]);
    assert_eq!(f.pick(0).host, "a");
    assert_eq!(f.pick(1).host, "b");
}

#[test]
fn a_fault_disables_the_timeouts_and_retries_of_its_rule() {
    let secs = Duration::from_secs;
    let mut f = forward(vec![dest("a", 1)]);
    assert_eq!(f.timeout(), None, "Istio: no route timeout by default");
    f.timeout = Some(secs(1));
    f.retries = Some(Arc::new(RetryPolicy::istio_default()));
    assert_eq!(f.timeout(), Some(secs(1)));
    assert!(f.retry_policy().is_some());
    f.fault = Some(Fault {
        delay: None,
        abort: None,
    });
    assert_eq!(f.timeout(), None, "a fault disables the timeout");
    assert!(f.retry_policy().is_none(), "and the retries");
}

#[test]
fn a_fault_delays_and_aborts_the_share_of_requests_it_names() {
    let fault = Fault {
        delay: Some(FaultDelay {
            delay: Duration::from_millis(300),
            percent: 50.0,
        }),
        abort: Some(FaultAbort {
            error: AbortError::Http(StatusCode::INTERNAL_SERVER_ERROR),
            percent: 10.0,
        }),
    };
    let i = fault.inject(0.0, 99.9);
    assert_eq!(i.delay, Some(Duration::from_millis(300)));
    assert_eq!(i.abort, None);
    let i = fault.inject(50.0, 9.99);
    assert_eq!(i.delay, None, "50 % is the rolls under 50");
    assert_eq!(
        i.abort,
        Some(AbortError::Http(StatusCode::INTERNAL_SERVER_ERROR))
    );
    // Each part draws on its own roll: over an even spread, each hits its own share.
    let (mut delayed, mut aborted) = (0, 0);
    for k in 0..1000 {
        let roll = f64::from(k) / 10.0;
        let i = fault.inject(roll, (roll * 7.0) % 100.0);
        delayed += i.delay.is_some() as u32;
        aborted += i.abort.is_some() as u32;
    }
    assert_eq!(delayed, 500);
    assert!((95..=105).contains(&aborted), "{aborted}");
    // 0 % (an unset percentage) never fires; 100 % always does.
    let never = Fault {
        delay: None,
        abort: Some(FaultAbort {
            error: AbortError::Grpc(14),
            percent: 0.0,
        }),
    };
    assert_eq!(never.inject(0.0, 0.0), Injected::default());
    let always = Fault {
        delay: None,
        abort: Some(FaultAbort {
            error: AbortError::Grpc(14),
            percent: 100.0,
        }),
    };
    assert_eq!(
        always.inject(99.999, 99.999).abort,
        Some(AbortError::Grpc(14))
    );
}

fn name(s: &str) -> HeaderName {
    HeaderName::from_str(s).unwrap()
}

fn value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap()
}

#[test]
fn header_ops_remove_then_set_then_add() {
    let ops = HeaderOps {
        set: vec![
            (name("x-set"), value("new")),
            (name("x-both"), value("set")),
        ],
        add: vec![
            (name("x-add"), value("more")),
            (name("x-both"), value("added")),
        ],
        remove: vec![name("x-gone"), name("x-set")],
    };
    let mut h = HeaderMap::new();
    h.append("x-set", value("old1"));
    h.append("x-set", value("old2"));
    h.insert("x-gone", value("bye"));
    h.insert("x-add", value("first"));
    h.insert("x-both", value("orig"));
    ops.apply(&mut h);
    assert_eq!(
        h.get_all("x-set").iter().collect::<Vec<_>>(),
        ["new"],
        "set after remove"
    );
    assert!(h.get("x-gone").is_none());
    assert_eq!(
        h.get_all("x-add").iter().collect::<Vec<_>>(),
        ["first", "more"]
    );
    assert_eq!(
        h.get_all("x-both").iter().collect::<Vec<_>>(),
        ["set", "added"]
    );
}

#[test]
fn envoy_prefix_rewrites() {
    let rw = Rewrite {
        path: Some(PathRewrite::Prefix("/v2".into())),
        authority: None,
    };
    assert_eq!(
        rw.apply("/v1/users?id=3", MatchedPath::Prefix(3)),
        "/v2/users?id=3"
    );
    // Exact and regex matches cover the whole path.
    assert_eq!(rw.apply("/v1/users", MatchedPath::Full), "/v2");
    // No uri match: the rule matched Envoy's `/` prefix, and that is what is replaced (a known
    // surprise of `rewrite.uri` without a uri match, kept as Envoy has it).
    assert_eq!(rw.apply("/x", MatchedPath::Prefix(1)), "/v2x");
    let rw = Rewrite {
        path: None,
        authority: Some("other".into()),
    };
    assert_eq!(rw.apply("/keep?q", MatchedPath::Full), "/keep?q");
}

#[test]
fn gateway_api_prefix_match_rewrites_follow_the_spec_table() {
    // (request path, prefix match, replacement, result) from httproute_types.go.
    let table = [
        ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
        ("/foo", "/foo", "/xyz", "/xyz"),
        ("/foo/", "/foo", "/xyz", "/xyz/"),
        ("/foo/bar", "/foo", "", "/bar"),
        ("/foo/", "/foo", "", "/"),
        ("/foo", "/foo", "", "/"),
        ("/foo/", "/foo", "/", "/"),
        ("/foo", "/foo", "/", "/"),
    ];
    for (path, prefix, new, want) in table {
        let matched = super::super::matching::PathMatch::segments(prefix)
            .matches(path)
            .unwrap();
        let rw = Rewrite {
            path: Some(PathRewrite::PrefixMatch(new.into())),
            authority: None,
        };
        assert_eq!(rw.apply(path, matched), want, "{path} {prefix} {new:?}");
    }
    let rw = Rewrite {
        path: Some(PathRewrite::Full("/new".into())),
        authority: None,
    };
    assert_eq!(rw.apply("/old/x?a=1", MatchedPath::Prefix(4)), "/new?a=1");
}

#[test]
fn regex_rewrites_replace_every_match_with_envoy_groups() {
    let rw = Rewrite {
        path: Some(PathRewrite::regex(
            regex::Regex::new("^/service/([^/]+)(/.*)$").unwrap(),
            "\\2/instance/\\1",
        )),
        authority: None,
    };
    assert_eq!(
        rw.apply("/service/foo/v1/api?x=1", MatchedPath::Full),
        "/v1/api/instance/foo?x=1"
    );
    let rw = Rewrite {
        path: Some(PathRewrite::regex(regex::Regex::new("a").unwrap(), "$b")),
        authority: None,
    };
    assert_eq!(
        rw.apply("/banana", MatchedPath::Full),
        "/b$bn$bn$b",
        "every match, `$` literal"
    );
}

fn req<'a>(
    method: &'a Method,
    headers: &'a HeaderMap,
    authority: &'a str,
    path: &'a str,
) -> RouteRequest<'a> {
    RouteRequest {
        host: "web.back.svc.cluster.local",
        port: 8080,
        source_namespace: None,
        source_labels: None,
        method,
        authority,
        path_and_query: path,
        headers,
    }
}

#[test]
fn redirect_locations() {
    let m = Method::GET;
    let h = HeaderMap::new();
    let redirect =
        |scheme: Option<&str>, host: Option<&str>, port, path: Option<PathRewrite>| Redirect {
            scheme: scheme.map(str::to_string),
            host: host.map(str::to_string),
            port,
            path,
            status: StatusCode::MOVED_PERMANENTLY,
        };
    let r = req(&m, &h, "web.back:8080", "/old/x?q=1");
    // Envoy keeps the request's host (and port) when nothing replaces them.
    let loc = |rd: Redirect, matched| rd.location(&r, matched).1;
    assert_eq!(
        loc(
            redirect(
                None,
                None,
                RedirectPort::Keep,
                Some(PathRewrite::Full("/new".into()))
            ),
            MatchedPath::Full
        ),
        "http://web.back:8080/new?q=1"
    );
    assert_eq!(
        loc(
            redirect(
                None,
                None,
                RedirectPort::Keep,
                Some(PathRewrite::Full("/new?z=2".into()))
            ),
            MatchedPath::Full
        ),
        "http://web.back:8080/new?z=2",
        "a query in the new path replaces the request's"
    );
    // A new host drops the request's port.
    assert_eq!(
        loc(
            redirect(None, Some("example.com"), RedirectPort::Keep, None),
            MatchedPath::Full
        ),
        "http://example.com/old/x?q=1"
    );
    assert_eq!(
        loc(
            redirect(Some("https"), None, RedirectPort::Port(8443), None),
            MatchedPath::Full
        ),
        "https://web.back:8443/old/x?q=1"
    );
    assert_eq!(
        loc(
            redirect(Some("https"), None, RedirectPort::Port(443), None),
            MatchedPath::Full
        ),
        "https://web.back/old/x?q=1",
        "the scheme's own port is not written"
    );
    assert_eq!(
        loc(
            redirect(Some("https"), None, RedirectPort::SchemeDefault, None),
            MatchedPath::Full
        ),
        "https://web.back/old/x?q=1"
    );
    assert_eq!(
        loc(
            redirect(None, Some("a.example"), RedirectPort::Request, None),
            MatchedPath::Full
        ),
        "http://a.example:8080/old/x?q=1"
    );
    // Scheme change from a default port drops it (Envoy's processRequestHost).
    let r80 = req(&m, &h, "web.back:80", "/p");
    assert_eq!(
        redirect(Some("https"), None, RedirectPort::Keep, None)
            .location(&r80, MatchedPath::Full)
            .1,
        "https://web.back/p"
    );
    // Prefix replacement (Gateway API ReplacePrefixMatch).
    assert_eq!(
        loc(
            redirect(
                None,
                None,
                RedirectPort::Keep,
                Some(PathRewrite::PrefixMatch("/new".into()))
            ),
            MatchedPath::Prefix(4)
        ),
        "http://web.back:8080/new/x?q=1"
    );
    let (status, _) =
        redirect(None, None, RedirectPort::Keep, None).location(&r, MatchedPath::Full);
    assert_eq!(status, StatusCode::MOVED_PERMANENTLY);
    let v6 = req(&m, &h, "[fd00::1]:8080", "/");
    assert_eq!(
        redirect(None, None, RedirectPort::Port(9000), None)
            .location(&v6, MatchedPath::Full)
            .1,
        "http://[fd00::1]:9000/"
    );
}

#[test]
fn istio_retry_policies() {
    let d = RetryPolicy::istio_default();
    assert_eq!(d.attempts, 2);
    assert_eq!(d.retriable_status_codes, [503]);
    assert!(d.retry_on.contains(&"connect-failure".to_string()));
    assert!(RetryPolicy::from_istio(0, "5xx", None, None, None, None).is_none());
    let p = RetryPolicy::from_istio(
        3,
        "gateway-error,503,429",
        Some(Duration::from_secs(2)),
        Some(true),
        Some(false),
        None,
    )
    .unwrap();
    assert_eq!(p.attempts, 3);
    assert_eq!(p.retry_on, ["gateway-error", "retriable-status-codes"]);
    assert_eq!(p.retriable_status_codes, [503, 429]);
    assert_eq!(p.per_try_timeout, Some(Duration::from_secs(2)));
    assert!(p.retry_remote_localities);
    assert!(!p.retry_ignore_previous_hosts);
    // Attempts without conditions keep Istio's default conditions.
    let p = RetryPolicy::from_istio(5, "", None, None, None, None).unwrap();
    assert_eq!(p.retry_on, RetryPolicy::istio_default().retry_on);
}

#[test]
fn a_mirrored_request_carries_the_host_with_shadow_appended() {
    assert_eq!(shadow_host("reviews"), "reviews-shadow");
    assert_eq!(shadow_host("reviews.back:9080"), "reviews.back-shadow:9080");
    assert_eq!(shadow_host("[fd00::1]:80"), "[fd00::1]-shadow:80");
    assert_eq!(shadow_host("[fd00::1]"), "[fd00::1]-shadow");
    let m = Mirror {
        host: "a".into(),
        port: None,
        subset: None,
        percent: 25.0,
    };
    assert!(m.takes(0.0) && m.takes(24.99) && !m.takes(25.0));
    assert!(
        !Mirror {
            percent: 0.0,
            ..m.clone()
        }
        .takes(0.0),
        "explicit 0: off"
    );
}

#[test]
fn retry_conditions_are_envoys() {
    use Outcome::*;
    let policy = |on: &str| RetryPolicy::from_istio(2, on, None, None, None, None).unwrap();
    let status = |s: u16| Response {
        status: s,
        grpc: None,
    };
    let grpc = |c: u32| Response {
        status: 200,
        grpc: Some(c),
    };
    let default = RetryPolicy::istio_default();
    for (o, want) in [
        (ConnectFailure, true),
        (RefusedStream, true),
        (status(503), true),
        (grpc(14), true),
        (grpc(1), true),
        (Reset, false),
        (PerTryTimeout, false),
        (status(500), false),
        (status(502), false),
        (grpc(13), false),
    ] {
        assert_eq!(default.retries_on(o), want, "Istio's default on {o:?}");
    }
    let five = policy("5xx");
    assert!([
        ConnectFailure,
        Reset,
        RefusedStream,
        PerTryTimeout,
        status(500),
        status(599)
    ]
    .into_iter()
    .all(|o| five.retries_on(o)));
    assert!(!five.retries_on(status(404)) && !five.retries_on(status(200)));
    let gw = policy("gateway-error");
    assert!(gw.retries_on(status(502)) && gw.retries_on(status(504)) && gw.retries_on(Reset));
    assert!(!gw.retries_on(status(500)));
    assert!(policy("retriable-4xx").retries_on(status(409)));
    assert!(!policy("retriable-4xx").retries_on(status(404)));
    let codes = policy("418,connect-failure");
    assert!(codes.retries_on(status(418)) && codes.retries_on(ConnectFailure));
    assert!(!codes.retries_on(status(503)) && !codes.retries_on(Reset));
    assert!(policy("internal").retries_on(grpc(13)));
    assert!(
        !policy("internal").retries_on(status(500)),
        "gRPC conditions read grpc-status"
    );
}

#[test]
fn backoff_is_jittered_exponential_and_capped() {
    let p = RetryPolicy::istio_default();
    let ms = Duration::from_millis;
    assert_eq!(p.backoff(1, 0.0), Duration::ZERO);
    assert_eq!(p.backoff(1, 0.5), Duration::from_micros(12_500));
    assert_eq!(p.backoff(2, 0.999_999).as_millis(), 74, "(2^2 - 1) x 25 ms");
    assert_eq!(p.backoff(3, 0.5), ms(87) + Duration::from_micros(500));
    assert_eq!(
        p.backoff(9, 0.999_999).as_millis(),
        249,
        "at most 10 x 25 ms"
    );
    let slow = RetryPolicy {
        backoff: Some(ms(100)),
        ..p
    };
    assert_eq!(slow.backoff(1, 0.5), ms(50));
    assert_eq!(slow.backoff(30, 0.5), ms(500));
}
