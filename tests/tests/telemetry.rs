//! End-to-end: the telemetry users already know — Istio's standard metrics from both nodes of a
//! call, access logs, traces exported by OTLP, and the golden signals of `weft stat` and
//! `weft graph` — after scripted traffic on two simulated nodes.
//!
//! One cluster, one test: the counts it checks are exact, so nothing else sends traffic in it.
//! node-a: `front/web` (Deployment web), `back/ratings` (Deployment ratings-v1); node-b:
//! `back/reviews` (Deployment reviews-v1: HTTP and gRPC), `back/db-0` (StatefulSet db, TCP
//! echo). An OTLP/gRPC and an OTLP/HTTP receiver (built from the official protos) listen on the
//! fabric: node-a exports to the first, node-b to the second.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use weft_tests::otlp::{OtlpReceiver, Protocol, ReceivedSpan, SpanKind};
use weft_tests::traffic::{call_ok, grpc_call, http, http_load, serve, serve_grpc};
use weft_tests::*;

const ENROLL: (&str, &str) = ("weft.dev/mesh", "enabled");
const HTTP_PORT: u16 = 8080;
const GRPC_PORT: u16 = 9090;
const DB_PORT: u16 = 5432;
const WEB_ID: &str = "spiffe://cluster.local/ns/front/sa/web";
const REVIEWS_ID: &str = "spiffe://cluster.local/ns/back/sa/reviews";
const RATINGS_ID: &str = "spiffe://cluster.local/ns/back/sa/ratings";
const DB_ID: &str = "spiffe://cluster.local/ns/back/sa/db";
const WAIT: Duration = Duration::from_secs(20);

/// The labels of a series, parsed from one line of a scrape.
type Labels = BTreeMap<String, String>;

/// Every sample of `name` in `scrape`: its labels and value.
fn samples(scrape: &str, name: &str) -> Vec<(Labels, f64)> {
    scrape
        .lines()
        .filter_map(|l| l.strip_prefix(name))
        .filter_map(|rest| rest.strip_prefix('{'))
        .filter_map(|rest| rest.rsplit_once("} "))
        .map(|(labels, value)| {
            let mut map = Labels::new();
            // Values here never hold `",` (names, principals, flags).
            for pair in labels.split("\",") {
                if let Some((k, v)) = pair.split_once("=\"") {
                    map.insert(k.to_string(), v.trim_end_matches('"').to_string());
                }
            }
            (map, value.parse().unwrap_or(f64::NAN))
        })
        .collect()
}

/// The value of the one sample of `name` whose labels include every `want`; panics when there
/// is none or more than one.
fn value(scrape: &str, name: &str, want: &[(&str, &str)]) -> f64 {
    let hits: Vec<(Labels, f64)> = samples(scrape, name)
        .into_iter()
        .filter(|(l, _)| {
            want.iter()
                .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "{name} with {want:?}: {} samples match: {hits:#?}\nscrape:\n{}",
        hits.len(),
        scrape
            .lines()
            .filter(|l| l.starts_with("istio_"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    hits[0].1
}

/// Every Istio label of a call from web to `destination` (a workload of `back`).
fn call_labels<'a>(
    reporter: &'a str,
    destination: (&'a str, &'a str, &'a str, &'a str),
    service: &'a str,
    protocol: &'a str,
    security: &'a str,
) -> Vec<(&'a str, &'a str)> {
    let (workload, app, version, principal) = destination;
    vec![
        ("reporter", reporter),
        ("source_workload", "web"),
        ("source_workload_namespace", "front"),
        ("source_principal", WEB_ID),
        ("source_app", "web"),
        ("source_version", "v1"),
        ("source_canonical_service", "web"),
        ("source_canonical_revision", "v1"),
        ("source_cluster", "Kubernetes"),
        ("destination_workload", workload),
        ("destination_workload_namespace", "back"),
        ("destination_principal", principal),
        ("destination_app", app),
        ("destination_version", version),
        ("destination_canonical_service", app),
        // Istio's default revision: `latest`.
        (
            "destination_canonical_revision",
            if version == "unknown" {
                "latest"
            } else {
                version
            },
        ),
        ("destination_cluster", "Kubernetes"),
        ("destination_service", service),
        (
            "destination_service_name",
            service.split('.').next().unwrap(),
        ),
        ("destination_service_namespace", "back"),
        ("request_protocol", protocol),
        ("connection_security_policy", security),
    ]
}

const REVIEWS: (&str, &str, &str, &str) = ("reviews-v1", "reviews", "v1", REVIEWS_ID);
const RATINGS: (&str, &str, &str, &str) = ("ratings-v1", "ratings", "v1", RATINGS_ID);
const DB: (&str, &str, &str, &str) = ("db", "db", "unknown", DB_ID);

fn with<'a>(
    mut labels: Vec<(&'a str, &'a str)>,
    more: &[(&'a str, &'a str)],
) -> Vec<(&'a str, &'a str)> {
    labels.extend_from_slice(more);
    labels
}

/// `promtool check metrics` on a scrape: every family well formed and named as Prometheus
/// wants.
fn promtool_check(scrape: &str, node: &str) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package, installed by cargo xtask setup)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Istio's name, which dashboards query: promtool's unit lint is the one finding allowed.
    let problems: Vec<&str> = said
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| {
            *l != "istio_request_duration_milliseconds use base unit \"seconds\" instead of \"milliseconds\""
        })
        .collect();
    assert!(
        problems.is_empty() && matches!(out.status.code(), Some(0 | 3)),
        "promtool check metrics on {node}'s scrape ({}): {said}",
        out.status
    );
}

/// Waits until `scrape()` holds `name` with `want` at `expected`.
fn wait_value(
    scrape: impl Fn() -> String,
    name: &str,
    want: &[(&str, &str)],
    expected: f64,
) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = scrape();
        let found: Vec<f64> = samples(&s, name)
            .into_iter()
            .filter(|(l, _)| {
                want.iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, v)| v)
            .collect();
        if found == [expected] || Instant::now() > deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The `traceparent` header (a `-H` argument) of a request in `trace` from span `span`.
fn traceparent(trace: &str, span: &str, sampled: bool) -> String {
    format!(
        "traceparent: 00-{trace}-{span}-{}",
        if sampled { "01" } else { "00" }
    )
}

fn spans_of(spans: &[ReceivedSpan], trace: &str) -> Vec<ReceivedSpan> {
    spans
        .iter()
        .filter(|s| s.trace_id == trace)
        .cloned()
        .collect()
}

#[test]
fn istio_metrics_access_logs_traces_and_golden_signals_report_scripted_traffic() {
    let cluster = Cluster::new("telemetry").unwrap();
    let a = cluster.add_node("node-a").unwrap();
    let b = cluster.add_node("node-b").unwrap();
    let web = cluster
        .add_pod(
            &a,
            PodSpec::new("front", "web-6d9f7c8b5-w1")
                .deployment("web")
                .label("app", "web")
                .label("version", "v1")
                .service_account("web"),
        )
        .unwrap();
    let ratings = cluster
        .add_pod(
            &a,
            PodSpec::new("back", "ratings-v1-6d9f7c8b5-q1")
                .deployment("ratings-v1")
                .label("app", "ratings")
                .label("version", "v1")
                .service_account("ratings")
                .port("http", HTTP_PORT),
        )
        .unwrap();
    let reviews = cluster
        .add_pod(
            &b,
            PodSpec::new("back", "reviews-v1-6d9f7c8b5-r1")
                .deployment("reviews-v1")
                .label("app", "reviews")
                .label("version", "v1")
                .service_account("reviews")
                .port("http", HTTP_PORT)
                .port("grpc", GRPC_PORT),
        )
        .unwrap();
    let db = cluster
        .add_pod(
            &b,
            PodSpec {
                owner: Some(("StatefulSet".into(), "db".into())),
                ..PodSpec::new("back", "db-0")
                    .label("app", "db")
                    .service_account("db")
                    .port("tcp", DB_PORT)
            },
        )
        .unwrap();
    let svc = |spec: ServiceSpec| cluster.add_service(spec).unwrap();
    let reviews_svc = svc(ServiceSpec::new("back", "reviews")
        .selector("app", "reviews")
        .port("http", HTTP_PORT, HTTP_PORT, None));
    let grpc_svc = svc(ServiceSpec::new("back", "reviews-grpc")
        .selector("app", "reviews")
        .port("grpc", GRPC_PORT, GRPC_PORT, None));
    let ratings_svc = svc(ServiceSpec::new("back", "ratings")
        .selector("app", "ratings")
        .port("http", HTTP_PORT, HTTP_PORT, None));
    let db_svc = svc(ServiceSpec::new("back", "db")
        .selector("app", "db")
        .port("tcp-db", DB_PORT, DB_PORT, None));
    // Selects nothing: 503 UH from the source node.
    let empty_svc = svc(ServiceSpec::new("back", "empty")
        .selector("app", "nothing")
        .port("http", HTTP_PORT, HTTP_PORT, None));
    for ns in ["front", "back"] {
        cluster.set_namespace_labels(ns, labels(&[ENROLL])).unwrap();
    }
    let _servers = [
        serve(&reviews, HTTP_PORT, "http"),
        serve_grpc(&reviews, GRPC_PORT),
        serve(&ratings, HTTP_PORT, "http"),
        serve(&db, DB_PORT, "echo"),
    ];
    let logs = tempfile::tempdir().unwrap();
    let log_a = logs.path().join("node-a.log");
    let log_b = logs.path().join("node-b.log");
    let weft_a = Weft::start_with(
        &cluster,
        &a,
        &[
            "--access-log",
            log_a.to_str().unwrap(),
            "--access-log-format",
            "json",
            "--otlp-endpoint",
            "http://172.30.0.1:4317",
            "--trace-sampling",
            "0",
        ],
    )
    .unwrap();
    let weft_b = Weft::start_with(
        &cluster,
        &b,
        &[
            "--access-log",
            log_b.to_str().unwrap(),
            "--otlp-endpoint",
            "http://172.30.0.1:4318",
            "--otlp-protocol",
            "http-protobuf",
            "--trace-sampling",
            "0",
        ],
    )
    .unwrap();
    let grpc_collector = OtlpReceiver::start_in(
        cluster.fabric_netns(),
        Protocol::Grpc,
        "172.30.0.1:4317".parse().unwrap(),
    )
    .unwrap();
    let http_collector = OtlpReceiver::start_in(
        cluster.fabric_netns(),
        Protocol::HttpProtobuf,
        "172.30.0.1:4318".parse().unwrap(),
    )
    .unwrap();

    // The scripted traffic.
    let reviews_host = ["--host", "reviews.back.svc.cluster.local"];
    let ok = http_load(&web, reviews_svc.addr(HTTP_PORT), 3, &reviews_host);
    assert_eq!(ok.status(200), 3, "{ok:?}");
    let mut args = reviews_host.to_vec();
    args.extend(["--path", "/status/503"]);
    let failed = http_load(&web, reviews_svc.addr(HTTP_PORT), 1, &args);
    assert_eq!(failed.status(503), 1, "{failed:?}");
    args.extend([
        "-H",
        "x-request-id: tele-req-503",
        "-H",
        "user-agent: telemetry-test",
    ]);
    let r = http(&web, reviews_svc.addr(HTTP_PORT), &args);
    assert_eq!(r.status, 503, "{r:?}");
    let said = grpc_call(&web, grpc_svc.addr(GRPC_PORT), "Say", "hi", None);
    assert_eq!(said["code_number"], 0, "{said}");
    let failed_call = grpc_call(&web, grpc_svc.addr(GRPC_PORT), "Fail", "5", None);
    assert_eq!(failed_call["code_number"], 5, "{failed_call}");
    let echoed = call_ok(&web, db_svc.addr(DB_PORT), "hello");
    assert!(echoed.contains("hello"), "{echoed}");
    let same_node = http(&web, ratings_svc.addr(HTTP_PORT), &[]);
    assert_eq!(same_node.status, 200, "{same_node:?}");
    let none = http(&web, empty_svc.addr(HTTP_PORT), &[]);
    assert_eq!(none.status, 503, "{none:?}");

    // Istio's standard metrics, from both nodes.
    let reviews_fqdn = "reviews.back.svc.cluster.local";
    let grpc_fqdn = "reviews-grpc.back.svc.cluster.local";
    let src = |d, s, p| call_labels("source", d, s, p, "unknown");
    let dst = |d, s, p, sec| call_labels("destination", d, s, p, sec);
    let ok_flags = [("response_code", "200"), ("response_flags", "-")];
    let tcp_src = src(DB, "db.back.svc.cluster.local", "tcp");
    // The TCP connection is counted when it closes: wait for it on both sides.
    wait_value(
        || weft_a.metrics().unwrap(),
        "istio_tcp_connections_closed_total",
        &tcp_src,
        1.0,
    );
    let tcp_dst = dst(DB, "db.back.svc.cluster.local", "tcp", "mutual_tls");
    wait_value(
        || weft_b.metrics().unwrap(),
        "istio_tcp_connections_closed_total",
        &tcp_dst,
        1.0,
    );
    let m_a = weft_a.metrics().unwrap();
    let m_b = weft_b.metrics().unwrap();
    promtool_check(&m_a, "node-a");
    promtool_check(&m_b, "node-b");

    let requests = "istio_requests_total";
    for (scrape, labels) in [
        (&m_a, src(REVIEWS, reviews_fqdn, "http")),
        (&m_b, dst(REVIEWS, reviews_fqdn, "http", "mutual_tls")),
    ] {
        assert_eq!(
            value(scrape, requests, &with(labels.clone(), &ok_flags)),
            3.0
        );
        // Istio's default retry policy retries a 503 twice: the destination answered each
        // attempt, the source answered the client once, retries exhausted.
        let (flags, n) = if labels[0].1 == "source" {
            ("URX", 2.0)
        } else {
            ("-", 6.0)
        };
        let fail = [("response_code", "503"), ("response_flags", flags)];
        assert_eq!(value(scrape, requests, &with(labels.clone(), &fail)), n);
        let ok = with(labels.clone(), &ok_flags);
        assert_eq!(
            value(scrape, "istio_request_duration_milliseconds_count", &ok),
            3.0
        );
        assert_eq!(
            value(
                scrape,
                "istio_request_duration_milliseconds_bucket",
                &with(ok.clone(), &[("le", "+Inf")])
            ),
            3.0
        );
        assert_eq!(value(scrape, "istio_response_bytes_count", &ok), 3.0);
        assert_eq!(value(scrape, "istio_request_bytes_sum", &ok), 0.0, "GETs");
        assert!(value(scrape, "istio_response_bytes_sum", &ok) > 0.0);
    }
    for (scrape, labels) in [
        (&m_a, src(REVIEWS, grpc_fqdn, "grpc")),
        (&m_b, dst(REVIEWS, grpc_fqdn, "grpc", "mutual_tls")),
    ] {
        let said = with(
            labels.clone(),
            &[("response_code", "200"), ("grpc_response_status", "0")],
        );
        assert_eq!(value(scrape, requests, &said), 1.0);
        assert_eq!(value(scrape, "istio_request_messages_total", &said), 1.0);
        assert_eq!(value(scrape, "istio_response_messages_total", &said), 1.0);
        let failed = with(
            labels.clone(),
            &[("response_code", "200"), ("grpc_response_status", "5")],
        );
        assert_eq!(value(scrape, requests, &failed), 1.0);
    }
    // A call to a pod of the same node: that node reports it as both ends.
    let ratings_fqdn = "ratings.back.svc.cluster.local";
    assert_eq!(
        value(
            &m_a,
            requests,
            &with(src(RATINGS, ratings_fqdn, "http"), &ok_flags)
        ),
        1.0
    );
    assert_eq!(
        value(
            &m_a,
            requests,
            &with(dst(RATINGS, ratings_fqdn, "http", "none"), &ok_flags)
        ),
        1.0
    );
    // No endpoint: the source node answers 503 UH, the destination is unknown.
    let uh = [
        ("reporter", "source"),
        ("destination_workload", "unknown"),
        ("destination_principal", "unknown"),
        ("destination_cluster", "unknown"),
        ("destination_service", "empty.back.svc.cluster.local"),
        ("response_code", "503"),
        ("response_flags", "UH"),
    ];
    assert_eq!(value(&m_a, requests, &uh), 1.0);
    // The TCP connection, from both ends, bytes as its flow counted them.
    let flow = weft_a
        .wait_flows(1, WAIT, |f| {
            f["original_destination"] == db_svc.addr(DB_PORT).to_string()
        })
        .unwrap()
        .remove(0);
    for (scrape, labels) in [(&m_a, &tcp_src), (&m_b, &tcp_dst)] {
        let l = with(labels.clone(), &[("response_flags", "-")]);
        assert_eq!(value(scrape, "istio_tcp_connections_opened_total", &l), 1.0);
        assert_eq!(value(scrape, "istio_tcp_connections_closed_total", &l), 1.0);
        assert_eq!(
            value(scrape, "istio_tcp_received_bytes_total", &l),
            flow["bytes_sent"].as_f64().unwrap()
        );
        assert_eq!(
            value(scrape, "istio_tcp_sent_bytes_total", &l),
            flow["bytes_received"].as_f64().unwrap()
        );
    }
    // Nothing else: node-b saw only what came to it.
    let reporters = |scrape: &str| -> Vec<String> {
        samples(scrape, requests)
            .into_iter()
            .map(|(l, _)| l["reporter"].clone())
            .collect()
    };
    assert!(reporters(&m_b).iter().all(|r| r == "destination"), "{m_b}");
    assert_eq!(samples(&m_a, requests).len(), 7, "{m_a}");
    assert_eq!(samples(&m_b, requests).len(), 4, "{m_b}");

    // Access logs: JSON on node-a, Envoy's text on node-b, the same request in both.
    let read_log = |path: &std::path::Path, needle: &str| -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            if let Some(line) = text.lines().find(|l| l.contains(needle)) {
                return line.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no {needle} in {}:\n{text}",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let json: Value = serde_json::from_str(&read_log(&log_a, "tele-req-503")).unwrap();
    assert_eq!(json["request_id"], "tele-req-503", "{json}");
    assert_eq!(json["response_code"], 503, "{json}");
    assert_eq!(json["response_flags"], "URX", "{json}");
    assert_eq!(json["user_agent"], "telemetry-test", "{json}");
    assert_eq!(json["source_workload"], "web", "{json}");
    assert_eq!(json["destination_workload"], "reviews-v1", "{json}");
    assert_eq!(json["source_principal"], WEB_ID, "{json}");
    let text = read_log(&log_b, "tele-req-503");
    assert!(
        text.contains("\"GET /status/503 HTTP/1.1\" 503 - "),
        "Envoy's format: {text}"
    );
    assert!(
        text.contains("\"telemetry-test\" \"tele-req-503\""),
        "{text}"
    );
    let uh_line: Value = serde_json::from_str(&read_log(&log_a, "\"UH\"")).unwrap();
    assert_eq!(uh_line["response_code"], 503, "{uh_line}");
    let tcp_line = read_log(&log_b, "\"- - -\" 0 ");
    assert!(
        tcp_line.contains(DB_ID) || tcp_line.contains("db"),
        "{tcp_line}"
    );

    // Golden signals without Prometheus, from node-a's own view.
    let stat = weft_a
        .cli(&[
            "stat", "deploy", "-n", "back", "--window", "1m", "-o", "json",
        ])
        .unwrap();
    let rows: Vec<Value> = stat
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let row = |name: &str| {
        rows.iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in weft stat:\n{stat}"))
            .clone()
    };
    let reviews_row = row("reviews-v1");
    // 3 + 2 HTTP (2 answered 503 after 2 retries each) and 2 gRPC calls, as the source saw
    // them (reviews runs on node-b).
    assert_eq!(reviews_row["requests"], 7, "{reviews_row}");
    let rate = reviews_row["success_rate"].as_f64().unwrap();
    assert!((rate - 5.0 / 7.0).abs() < 1e-9, "{reviews_row}");
    assert!(
        reviews_row["p99_ms"].as_f64().unwrap() > 0.0,
        "{reviews_row}"
    );
    let ratings_row = row("ratings-v1");
    assert_eq!(ratings_row["requests"], 1, "counted once: {ratings_row}");
    assert_eq!(ratings_row["success_rate"], 1.0, "{ratings_row}");
    let graph = weft_a.cli(&["graph", "-o", "json"]).unwrap();
    let edges: Vec<Value> = graph
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let edge = |to: &str| {
        edges
            .iter()
            .find(|e| e["source"] == "front/web" && e["destination"] == to)
            .unwrap_or_else(|| panic!("no edge web → {to} in weft graph:\n{graph}"))
            .clone()
    };
    assert_eq!(edge("back/reviews-v1")["mtls"], true, "{graph}");
    assert_eq!(edge("back/ratings-v1")["protocol"], "http", "{graph}");
    assert_eq!(edge("back/db")["protocol"], "tcp", "{graph}");
    let dot = weft_a.cli(&["graph", "-o", "dot"]).unwrap();
    assert!(dot.starts_with("digraph"), "{dot}");

    // Traces: the client's traceparent is continued by both proxies, parent to child.
    let client_span = "00f067aa0ba902b7";
    // A GET from web to `to` (with Host `host`), in trace `trace` (sampled or not): answered 200.
    let traced = |to: std::net::SocketAddr, host: &str, trace: &str, sampled: bool| {
        let header = traceparent(trace, client_span, sampled);
        let r = http(&web, to, &["--host", host, "-H", &header]);
        assert_eq!(r.status, 200, "{r:?}");
        r
    };
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let r = traced(reviews_svc.addr(HTTP_PORT), reviews_fqdn, trace, true);
    let from_a = spans_of(&grpc_collector.wait_for(1, WAIT), trace);
    let from_b = spans_of(&http_collector.wait_for(1, WAIT), trace);
    assert_eq!(
        (from_a.len(), from_b.len()),
        (1, 1),
        "{from_a:#?} {from_b:#?}"
    );
    let (client, server) = (&from_a[0], &from_b[0]);
    assert_eq!(client.kind, SpanKind::Client);
    assert_eq!(client.parent_span_id.as_deref(), Some(client_span));
    assert_eq!(client.service_name, "web.front");
    assert_eq!(client.attr("http.status_code"), Some("200"), "{client:#?}");
    assert_eq!(client.attr("http.method"), Some("GET"), "{client:#?}");
    assert_eq!(server.kind, SpanKind::Server);
    assert_eq!(
        server.parent_span_id.as_deref(),
        Some(client.span_id.as_str())
    );
    assert_eq!(server.service_name, "reviews.back");
    assert_eq!(server.attr("node_id"), Some("node-b"), "{server:#?}");
    // The application sees the server span as its parent.
    let seen = r.seen_header("traceparent");
    assert_eq!(seen, [format!("00-{trace}-{}-01", server.span_id)], "{r:?}");
    // Same node: both spans from node-a.
    let trace2 = "5bf92f3577b34da6a3ce929d0e0e4737";
    traced(ratings_svc.addr(HTTP_PORT), ratings_fqdn, trace2, true);
    let deadline = Instant::now() + WAIT;
    let both = loop {
        let s = spans_of(&grpc_collector.spans(), trace2);
        if s.len() >= 2 || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let client = both
        .iter()
        .find(|s| s.kind == SpanKind::Client)
        .expect("client span");
    let server = both
        .iter()
        .find(|s| s.kind == SpanKind::Server)
        .expect("server span");
    assert_eq!(
        server.parent_span_id.as_deref(),
        Some(client.span_id.as_str())
    );
    assert_eq!(server.service_name, "ratings.back");
    // Not sampled: nothing is exported.
    let trace3 = "6bf92f3577b34da6a3ce929d0e0e4738";
    traced(reviews_svc.addr(HTTP_PORT), reviews_fqdn, trace3, false);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(spans_of(&grpc_collector.spans(), trace3).is_empty());
    assert!(spans_of(&http_collector.spans(), trace3).is_empty());
    // A collector that refuses changes nothing for traffic; the loss is counted.
    // node-a's collector refuses, node-b's is down (nothing listens): traffic goes on as
    // before, and what could not be exported is counted.
    grpc_collector.set_refusing(true);
    drop(http_collector);
    for i in 0..5 {
        let trace = format!("7bf92f3577b34da6a3ce929d0e0e47{i:02}");
        traced(ratings_svc.addr(HTTP_PORT), ratings_fqdn, &trace, true);
        let trace = format!("8bf92f3577b34da6a3ce929d0e0e47{i:02}");
        traced(reviews_svc.addr(HTTP_PORT), reviews_fqdn, &trace, true);
    }
    // node-a: 5 same-node calls (a client and a server span each) and 5 client spans;
    // node-b: 5 server spans.
    for (weft, lost) in [(&weft_a, 15.0), (&weft_b, 5.0)] {
        let deadline = Instant::now() + WAIT;
        loop {
            let m = weft.metrics().unwrap();
            let failed = value(&m, "weft_trace_spans_total", &[("result", "failed")]);
            if failed >= lost {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "failed spans not counted: {failed} of {lost}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    // Cardinality: 10 000 requests with distinct paths, from 5 connections (5 client ports),
    // add no series.
    let before = weft_a.metrics().unwrap();
    let series = |s: &str| s.lines().filter(|l| l.starts_with("istio_")).count();
    for _ in 0..5 {
        let s = http_load(
            &web,
            ratings_svc.addr(HTTP_PORT),
            2000,
            &["--path", "/item/{i}"],
        );
        assert_eq!(s.status(200), 2000, "{s:?}");
    }
    let after = wait_value(
        || weft_a.metrics().unwrap(),
        requests,
        &with(src(RATINGS, ratings_fqdn, "http"), &ok_flags),
        10_007.0,
    );
    assert_eq!(series(&after), series(&before), "no new series");
    assert_eq!(
        value(
            &after,
            requests,
            &with(src(RATINGS, ratings_fqdn, "http"), &ok_flags)
        ),
        10_007.0
    );
    drop((weft_a, weft_b));
}
