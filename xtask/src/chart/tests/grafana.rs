//! deploy/grafana: the weft Grafana dashboard, the Prometheus scrape config and the PodMonitor.
//!
//! The dashboard's PromQL reads only the series weft exports, named and labelled as Istio's
//! standard metrics (`istio_*`), and weft's own (`weft_*`, `envoy_cluster_*`); its data source
//! and selections are template variables. A small PromQL reader below finds every selector,
//! label matcher, grouping label and variable of each query. The scrape config and the
//! PodMonitor are checked against the chart's render: they keep the DaemonSet's pods (and not
//! the CA service's) on the port that serves /metrics.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value as Json;

use super::*;

const DASHBOARD: &str = "deploy/grafana/weft-mesh-dashboard.json";
const SCRAPE_CONFIG: &str = "deploy/grafana/prometheus-scrape.yaml";
const POD_MONITOR: &str = "deploy/grafana/podmonitor.yaml";

/// Istio's standard counters, as weft exports them.
const ISTIO_COUNTERS: &[&str] = &[
    "istio_requests_total",
    "istio_request_messages_total",
    "istio_response_messages_total",
    "istio_tcp_sent_bytes_total",
    "istio_tcp_received_bytes_total",
    "istio_tcp_connections_opened_total",
    "istio_tcp_connections_closed_total",
];
/// Istio's standard histograms (series `<name>_bucket`, `_sum`, `_count`).
const ISTIO_HISTOGRAMS: &[&str] = &[
    "istio_request_duration_milliseconds",
    "istio_request_bytes",
    "istio_response_bytes",
];
/// The labels of Istio's standard metrics.
const ISTIO_LABELS: &[&str] = &[
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_canonical_service",
    "source_canonical_revision",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
];
/// Labels whose values Istio enumerates: a literal compared for (in)equality is one of these.
const ISTIO_LABEL_VALUES: &[(&str, &[&str])] = &[
    ("reporter", &["source", "destination"]),
    ("request_protocol", &["http", "grpc", "tcp"]),
    (
        "connection_security_policy",
        &["mutual_tls", "none", "unknown"],
    ),
];
/// Series the dashboard is expected to chart (a panel dropped by mistake fails here).
const CHARTED: &[&str] = &[
    "istio_requests_total",
    "istio_request_duration_milliseconds_bucket",
    "istio_request_bytes_bucket",
    "istio_response_bytes_bucket",
    "istio_tcp_sent_bytes_total",
    "istio_tcp_received_bytes_total",
    "istio_tcp_connections_opened_total",
    "istio_tcp_connections_closed_total",
    "weft_flows_total",
    "weft_active_connections",
    "weft_svid_earliest_expiry_seconds",
    "weft_capture_gaps_total",
    "weft_registry_reload_failed",
    "weft_access_log_lines_total",
    "weft_trace_spans_total",
];
/// Grafana's global variables a query may use besides the dashboard's own.
const GRAFANA_GLOBALS: &[&str] = &[
    "__rate_interval",
    "__interval",
    "__interval_ms",
    "__range",
    "__range_s",
    "__range_ms",
];
/// The data source every panel, query and query variable names: the `datasource` variable.
const DATASOURCE_UID: &str = "${datasource}";

/// PromQL functions and aggregations (a misspelt one would otherwise read as a metric name).
const FUNCTIONS: &[&str] = &[
    "abs",
    "absent",
    "absent_over_time",
    "avg",
    "avg_over_time",
    "bottomk",
    "ceil",
    "changes",
    "clamp",
    "clamp_max",
    "clamp_min",
    "count",
    "count_over_time",
    "count_values",
    "delta",
    "deriv",
    "exp",
    "floor",
    "group",
    "histogram_quantile",
    "idelta",
    "increase",
    "irate",
    "label_join",
    "label_replace",
    "last_over_time",
    "ln",
    "log2",
    "log10",
    "max",
    "max_over_time",
    "min",
    "min_over_time",
    "quantile",
    "quantile_over_time",
    "rate",
    "resets",
    "round",
    "scalar",
    "sort",
    "sort_desc",
    "sqrt",
    "stddev",
    "sum",
    "sum_over_time",
    "time",
    "timestamp",
    "topk",
    "vector",
];
const GROUPING: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
const KEYWORDS: &[&str] = &["and", "or", "unless", "bool", "offset", "inf", "nan"];

// ------------------------------------------------------------------------------------------
// A PromQL reader: enough of the language to list what a query selects and groups by.
// ------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Var(String),
    Num,
    Op(String),
    Open(char),
    Close(char),
    Comma,
}

/// A Grafana variable reference at `s[i]` (`$name`, `${name}`, `${name:format}`): its name and
/// length.
fn variable_at(s: &str, i: usize) -> Option<(String, usize)> {
    let rest = &s[i..];
    let rest = rest.strip_prefix('$')?;
    if let Some(braced) = rest.strip_prefix('{') {
        let end = braced.find('}')?;
        let name = braced[..end].split(':').next().unwrap_or("");
        return Some((name.to_string(), end + 3));
    }
    let len = rest
        .bytes()
        .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
        .count();
    (len > 0).then(|| (rest[..len].to_string(), len + 1))
}

/// The variables a string refers to.
fn variables_in(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(at) = s[i..].find('$') {
        i += at;
        match variable_at(s, i) {
            Some((name, len)) => {
                out.push(name);
                i += len;
            }
            None => i += 1,
        }
    }
    out
}

fn lex(q: &str) -> Result<Vec<Tok>, String> {
    let b = q.as_bytes();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i] as char;
        match c {
            _ if c.is_whitespace() => i += 1,
            '"' | '\'' | '`' => {
                let mut s = String::new();
                i += 1;
                loop {
                    let Some(&ch) = b.get(i) else {
                        return Err(format!("unterminated string in {q}"));
                    };
                    if ch as char == c {
                        i += 1;
                        break;
                    }
                    if ch == b'\\' && c != '`' {
                        s.push(*b.get(i + 1).ok_or("trailing backslash")? as char);
                        i += 2;
                    } else {
                        s.push(ch as char);
                        i += 1;
                    }
                }
                toks.push(Tok::Str(s));
            }
            '$' => {
                let (name, len) =
                    variable_at(q, i).ok_or_else(|| format!("a lone $ at {i} in {q}"))?;
                toks.push(Tok::Var(name));
                i += len;
            }
            '(' | '{' | '[' => {
                toks.push(Tok::Open(c));
                i += 1;
            }
            ')' | '}' | ']' => {
                toks.push(Tok::Close(c));
                i += 1;
            }
            ',' => {
                toks.push(Tok::Comma);
                i += 1;
            }
            _ if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b':')
                {
                    i += 1;
                }
                toks.push(Tok::Ident(q[start..i].to_string()));
            }
            _ if c.is_ascii_digit() || c == '.' => {
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                    i += 1;
                }
                toks.push(Tok::Num);
            }
            '+' | '-' | '*' | '/' | '%' | '^' | '=' | '!' | '~' | '<' | '>' => {
                let start = i;
                while i < b.len() && b"+-*/%^=!~<>".contains(&b[i]) {
                    i += 1;
                }
                toks.push(Tok::Op(q[start..i].to_string()));
            }
            _ => return Err(format!("unexpected {c:?} at {i} in {q}")),
        }
    }
    Ok(toks)
}

/// A vector selector: `metric{label op "value", ...}`.
#[derive(Debug, Default)]
struct Selector {
    metric: String,
    matchers: Vec<(String, String, String)>,
}

/// What a query selects, groups by (`by`, `without`, `on`, ...) and refers to.
#[derive(Debug, Default)]
struct Query {
    selectors: Vec<Selector>,
    grouping: Vec<String>,
    variables: Vec<String>,
}

fn matchers(toks: &[Tok], i: &mut usize, q: &str) -> Result<Vec<(String, String, String)>, String> {
    let mut out = Vec::new();
    loop {
        match toks.get(*i) {
            Some(Tok::Close('}')) => {
                *i += 1;
                return Ok(out);
            }
            Some(Tok::Comma) => *i += 1,
            Some(Tok::Ident(label)) => {
                let (Some(Tok::Op(op)), Some(Tok::Str(value))) =
                    (toks.get(*i + 1), toks.get(*i + 2))
                else {
                    return Err(format!(
                        "a matcher of {label} without operator and string in {q}"
                    ));
                };
                if !["=", "!=", "=~", "!~"].contains(&op.as_str()) {
                    return Err(format!("matcher operator {op} in {q}"));
                }
                out.push((label.clone(), op.clone(), value.clone()));
                *i += 3;
            }
            other => return Err(format!("unexpected {other:?} in a selector of {q}")),
        }
    }
}

fn parse(q: &str) -> Result<Query, String> {
    let toks = lex(q)?;
    let mut out = Query {
        variables: variables_in(q),
        ..Query::default()
    };
    let mut depth = 0i32;
    let mut i = 0;
    while i < toks.len() {
        match &toks[i] {
            Tok::Ident(name) if toks.get(i + 1) == Some(&Tok::Open('(')) => {
                if GROUPING.contains(&name.as_str()) {
                    i += 2;
                    loop {
                        match toks.get(i) {
                            Some(Tok::Close(')')) => break,
                            Some(Tok::Comma) => {}
                            Some(Tok::Ident(label)) => out.grouping.push(label.clone()),
                            other => return Err(format!("{other:?} in {name}(...) of {q}")),
                        }
                        i += 1;
                    }
                } else if !FUNCTIONS.contains(&name.as_str()) {
                    return Err(format!("unknown function {name} in {q}"));
                }
                i += 1;
            }
            Tok::Ident(name) if KEYWORDS.contains(&name.as_str()) => i += 1,
            // An aggregation with its grouping first: `sum by (le) (...)`.
            Tok::Ident(name)
                if FUNCTIONS.contains(&name.as_str())
                    && matches!(toks.get(i + 1), Some(Tok::Ident(m)) if m == "by" || m == "without") =>
            {
                i += 1
            }
            Tok::Ident(name) if GROUPING.contains(&name.as_str()) => {
                return Err(format!("{name} without a label list in {q}"))
            }
            Tok::Ident(name) => {
                let mut sel = Selector {
                    metric: name.clone(),
                    ..Selector::default()
                };
                i += 1;
                if toks.get(i) == Some(&Tok::Open('{')) {
                    i += 1;
                    sel.matchers = matchers(&toks, &mut i, q)?;
                }
                out.selectors.push(sel);
            }
            Tok::Open('{') => {
                i += 1;
                let m = matchers(&toks, &mut i, q)?;
                let name = m
                    .iter()
                    .find(|(l, op, _)| l == "__name__" && op == "=")
                    .map(|(_, _, v)| v.clone())
                    .ok_or_else(|| format!("a selector without a metric name in {q}"))?;
                out.selectors.push(Selector {
                    metric: name,
                    matchers: m,
                });
            }
            // A range or subquery: a duration or a variable, nothing selected.
            Tok::Open('[') => {
                while toks.get(i).is_some_and(|t| *t != Tok::Close(']')) {
                    i += 1;
                }
                i += 1;
            }
            Tok::Open('(') => {
                depth += 1;
                i += 1;
            }
            Tok::Close(')') => {
                depth -= 1;
                if depth < 0 {
                    return Err(format!("unbalanced ) in {q}"));
                }
                i += 1;
            }
            Tok::Close(c) => return Err(format!("unbalanced {c} in {q}")),
            Tok::Str(_) | Tok::Var(_) | Tok::Num | Tok::Op(_) | Tok::Comma | Tok::Open(_) => i += 1,
        }
    }
    if depth != 0 {
        return Err(format!("unbalanced ( in {q}"));
    }
    Ok(out)
}

fn istio_metric(name: &str) -> bool {
    ISTIO_COUNTERS.contains(&name)
        || ISTIO_HISTOGRAMS.iter().any(|h| {
            name.strip_prefix(h)
                .is_some_and(|s| ["_bucket", "_sum", "_count"].contains(&s))
        })
}

fn weft_metric(name: &str) -> bool {
    (name.starts_with("weft_") || name.starts_with("envoy_cluster_"))
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Every reason `q` reads something weft does not export: unknown metric names, labels that
/// Istio's metrics do not have, values Istio never gives an enumerated label.
fn check_query(q: &str) -> Result<Query, Vec<String>> {
    let parsed = parse(q).map_err(|e| vec![e])?;
    let mut errors = Vec::new();
    if parsed.selectors.is_empty() {
        errors.push(format!("selects no series: {q}"));
    }
    let mut istio = false;
    for sel in &parsed.selectors {
        if istio_metric(&sel.metric) {
            istio = true;
            for (label, op, value) in &sel.matchers {
                if label != "__name__" && !ISTIO_LABELS.contains(&label.as_str()) {
                    errors.push(format!("{} has no label {label}: {q}", sel.metric));
                }
                let allowed = ISTIO_LABEL_VALUES.iter().find(|(l, _)| l == label);
                if let Some((_, values)) = allowed {
                    let literal = (op == "=" || op == "!=") && !value.contains('$');
                    if literal && !values.contains(&value.as_str()) {
                        errors.push(format!("{label} is never {value:?}: {q}"));
                    }
                }
            }
        } else if !weft_metric(&sel.metric) {
            errors.push(format!("{} is not a metric weft exports: {q}", sel.metric));
        }
    }
    if istio {
        for label in &parsed.grouping {
            if label != "le" && !ISTIO_LABELS.contains(&label.as_str()) {
                errors.push(format!(
                    "groups Istio's metrics by {label}, not one of theirs: {q}"
                ));
            }
        }
    }
    if parsed
        .selectors
        .iter()
        .any(|s| s.metric.ends_with("_bucket"))
        && !parsed.grouping.iter().any(|l| l == "le")
    {
        errors.push(format!("a histogram's buckets not grouped by le: {q}"));
    }
    if errors.is_empty() {
        Ok(parsed)
    } else {
        Err(errors)
    }
}

/// `label_values(selector, label)`, as Grafana's Prometheus variables query.
fn label_values(q: &str) -> Option<(&str, &str)> {
    let inner = q.trim().strip_prefix("label_values(")?.strip_suffix(')')?;
    let (selector, label) = inner.rsplit_once(',')?;
    Some((selector.trim(), label.trim()))
}

// ------------------------------------------------------------------------------------------
// The dashboard.
// ------------------------------------------------------------------------------------------

fn dashboard() -> Json {
    let path = workspace_root().join(DASHBOARD);
    let text = std::fs::read_to_string(&path).expect(DASHBOARD);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{DASHBOARD} is not valid JSON: {e}"))
}

/// Every panel, those of collapsed rows included.
fn panels(dash: &Json) -> Vec<&Json> {
    fn walk<'a>(list: &'a Json, out: &mut Vec<&'a Json>) {
        for p in list.as_array().into_iter().flatten() {
            out.push(p);
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dash["panels"], &mut out);
    out
}

fn variables(dash: &Json) -> BTreeMap<String, &Json> {
    dash["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .map(|v| {
            (
                v["name"].as_str().expect("a variable's name").to_string(),
                v,
            )
        })
        .collect()
}

/// A query variable's query: the string, or `{query: ...}` as Grafana 10 writes it.
fn variable_query(v: &Json) -> &str {
    v["query"]
        .as_str()
        .or_else(|| v["query"]["query"].as_str())
        .unwrap_or_else(|| panic!("variable {} has no query", v["name"]))
}

/// Every `datasource` in the document, wherever it is.
fn datasources<'a>(v: &'a Json, path: String, out: &mut Vec<(String, &'a Json)>) {
    match v {
        Json::Object(m) => {
            for (k, v) in m {
                let path = format!("{path}.{k}");
                if k == "datasource" {
                    out.push((path.clone(), v));
                }
                datasources(v, path, out);
            }
        }
        Json::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                datasources(v, format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn dashboard_queries_read_only_what_weft_exports() {
    let dash = dashboard();
    let defined: BTreeSet<String> = variables(&dash).into_keys().collect();
    let mut errors = Vec::new();
    let mut charted = BTreeSet::new();
    let mut queries = 0;
    for panel in panels(&dash) {
        let title = panel["title"].as_str().unwrap_or("?");
        for target in panel["targets"].as_array().into_iter().flatten() {
            let Some(expr) = target["expr"].as_str() else {
                continue;
            };
            queries += 1;
            match check_query(expr) {
                Ok(q) => {
                    for v in &q.variables {
                        if !defined.contains(v) && !GRAFANA_GLOBALS.contains(&v.as_str()) {
                            errors.push(format!("{title}: ${v} is not a variable: {expr}"));
                        }
                    }
                    // A legend names labels the query keeps.
                    let legend = target["legendFormat"].as_str().unwrap_or("");
                    for part in legend.split("{{").skip(1) {
                        let label = part.split("}}").next().unwrap_or("").trim();
                        if !q.grouping.iter().any(|g| g == label) {
                            errors.push(format!(
                                "{title}: the legend's {label} is not a label of {expr}"
                            ));
                        }
                    }
                    charted.extend(q.selectors.into_iter().map(|s| s.metric));
                }
                Err(e) => errors.extend(e.into_iter().map(|e| format!("{title}: {e}"))),
            }
        }
    }
    for (name, v) in variables(&dash) {
        if v["type"] != "query" {
            continue;
        }
        let q = variable_query(v);
        let Some((selector, label)) = label_values(q) else {
            errors.push(format!("variable {name}: not a label_values() query: {q}"));
            continue;
        };
        match check_query(selector) {
            Ok(parsed) => {
                let istio = parsed.selectors.iter().any(|s| istio_metric(&s.metric));
                if istio && !ISTIO_LABELS.contains(&label) {
                    errors.push(format!("variable {name}: Istio's metrics have no {label}"));
                }
                for v in &parsed.variables {
                    if !defined.contains(v) {
                        errors.push(format!("variable {name}: ${v} is not a variable"));
                    }
                }
            }
            Err(e) => errors.extend(e.into_iter().map(|e| format!("variable {name}: {e}"))),
        }
    }
    assert!(errors.is_empty(), "{DASHBOARD}:\n{}", errors.join("\n"));
    assert!(queries >= 20, "only {queries} queries");
    let missing: Vec<&&str> = CHARTED.iter().filter(|m| !charted.contains(**m)).collect();
    assert!(missing.is_empty(), "{DASHBOARD} charts none of {missing:?}");
}

#[test]
fn dashboard_is_templated() {
    let dash = dashboard();
    assert!(
        dash["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "schemaVersion {}",
        dash["schemaVersion"]
    );
    assert!(dash["uid"].as_str().is_some_and(|u| !u.is_empty()));
    assert!(dash["title"].as_str().is_some_and(|t| !t.is_empty()));
    // Exported "for sharing externally" dashboards name their data source through __inputs;
    // this one through the variable.
    assert!(
        dash.get("__inputs").is_none(),
        "__inputs: use ${{datasource}}"
    );

    let vars = variables(&dash);
    let ds = vars.get("datasource").expect("a datasource variable");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    for name in ["namespace", "service", "workload"] {
        let v = vars
            .get(name)
            .unwrap_or_else(|| panic!("no {name} variable"));
        assert_eq!(v["type"], "query", "{name}");
    }
    assert_eq!(
        variable_query(vars["service"]),
        "label_values(istio_requests_total, destination_service)"
    );
    let reporter = vars.get("reporter").expect("a reporter variable");
    assert_eq!(reporter["current"]["value"], "destination");
    let options: BTreeSet<&str> = reporter["options"]
        .as_array()
        .expect("reporter's options")
        .iter()
        .map(|o| o["value"].as_str().unwrap())
        .collect();
    assert_eq!(options, BTreeSet::from(["source", "destination"]));

    // One data source, the variable's: no panel, query or variable names another.
    let mut found = Vec::new();
    datasources(&dash, String::new(), &mut found);
    assert!(!found.is_empty());
    for (path, ds) in &found {
        assert_eq!(ds["type"], "prometheus", "{path}: {ds}");
        assert_eq!(ds["uid"], DATASOURCE_UID, "{path}: {ds}");
    }
    for (name, v) in &vars {
        if v["type"] == "query" {
            assert_eq!(v["datasource"]["uid"], DATASOURCE_UID, "variable {name}");
        }
    }

    let mut ids = BTreeSet::new();
    for panel in panels(&dash) {
        let title = panel["title"].as_str().expect("a title");
        assert!(!title.is_empty());
        let id = panel["id"].as_u64().expect("an id");
        assert!(ids.insert(id), "id {id} twice");
        let grid = &panel["gridPos"];
        let n = |k: &str| {
            grid[k]
                .as_u64()
                .unwrap_or_else(|| panic!("{title}: gridPos.{k}"))
        };
        assert!(
            n("w") > 0 && n("h") > 0 && n("x") + n("w") <= 24,
            "{title}: {grid}"
        );
        if panel["type"] == "row" {
            continue;
        }
        let described = panel["description"].as_str().unwrap_or("").trim();
        assert!(described.len() > 20, "{title}: say what the panel shows");
        assert_eq!(panel["datasource"]["uid"], DATASOURCE_UID, "{title}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], DATASOURCE_UID, "{title}");
            assert!(t["expr"].as_str().is_some_and(|e| !e.is_empty()), "{title}");
        }
    }
}

/// The checks above catch what they claim to.
#[test]
fn promql_checks_refuse_what_weft_does_not_export() {
    let ok = [
        r#"round(sum(irate(istio_requests_total{reporter=~"$reporter",destination_service="$service"}[$__rate_interval])), 0.001)"#,
        r#"sum(irate(istio_requests_total{response_code!~"5.*"}[5m])) / (sum(irate(istio_requests_total[5m])) or on () vector(1))"#,
        r#"histogram_quantile(0.99, sum(irate(istio_request_duration_milliseconds_bucket{reporter="source"}[1m])) by (destination_service, le)) / 1000"#,
        r#"-sum(rate(istio_tcp_connections_closed_total{connection_security_policy!="mutual_tls"}[5m])) by (source_workload)"#,
        r#"sum by (verdict) (rate(weft_flows_total{node=~"$node"}[5m]))"#,
        r#"sum(rate(envoy_cluster_upstream_rq_total{cluster_name=~"outbound.*"}[5m]))"#,
        r#"{__name__="istio_requests_total", reporter="destination"}"#,
    ];
    for q in ok {
        if let Err(e) = check_query(q) {
            panic!("{q}: {e:?}");
        }
    }
    let refused = [
        // Istio's dashboards fall back on this name; weft exports milliseconds only.
        r#"histogram_quantile(0.5, sum(irate(istio_request_duration_seconds_bucket[1m])) by (le))"#,
        r#"sum(rate(istio_requests_total{pod="x"}[5m]))"#,
        r#"sum(rate(istio_requests_total{reporter="client"}[5m]))"#,
        r#"sum(rate(istio_requests_total{connection_security_policy="tls"}[5m]))"#,
        r#"sum(rate(istio_requests_total[5m])) by (instance)"#,
        r#"histogram_quantile(0.5, sum(rate(istio_request_bytes_bucket[5m])))"#,
        r#"rate(container_cpu_usage_seconds_total[5m])"#,
        r#"sum(rat(weft_flows_total[5m]))"#,
        r#"{reporter="destination"}"#,
        r#"sum(rate(istio_requests_total[5m])"#,
    ];
    for q in refused {
        assert!(check_query(q).is_err(), "{q} was accepted");
    }
    assert_eq!(
        label_values(r#"label_values(istio_requests_total{a="b"}, destination_workload)"#),
        Some((r#"istio_requests_total{a="b"}"#, "destination_workload"))
    );
    assert_eq!(
        variables_in("a $x ${y} ${z:csv} $__rate_interval $"),
        ["x", "y", "z", "__rate_interval"]
    );
}

// ------------------------------------------------------------------------------------------
// The scrape config and the PodMonitor.
// ------------------------------------------------------------------------------------------

fn yaml_file(path: &str) -> Yaml {
    let text = std::fs::read_to_string(workspace_root().join(path)).expect(path);
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Kubernetes label names as Prometheus' service discovery writes them in meta labels.
fn sanitize(label: &str) -> String {
    label
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// The targets Prometheus' `role: pod` discovery makes of one running pod of `workload` (a
/// DaemonSet or Deployment of the render): one per container port, one per container without.
fn pod_targets(workload: &Yaml, pod_name: &str, node: &str) -> Vec<BTreeMap<String, String>> {
    let template = &workload["spec"]["template"];
    let mut base = BTreeMap::new();
    base.insert(
        "__meta_kubernetes_namespace".to_string(),
        workload["metadata"]["namespace"]
            .as_str()
            .unwrap()
            .to_string(),
    );
    base.insert("__meta_kubernetes_pod_name".into(), pod_name.into());
    base.insert("__meta_kubernetes_pod_node_name".into(), node.into());
    base.insert("__meta_kubernetes_pod_phase".into(), "Running".into());
    base.insert("__meta_kubernetes_pod_ip".into(), "10.0.0.1".into());
    for (k, v) in template["metadata"]["labels"].as_mapping().unwrap() {
        base.insert(
            format!(
                "__meta_kubernetes_pod_label_{}",
                sanitize(k.as_str().unwrap())
            ),
            v.as_str().unwrap().to_string(),
        );
    }
    let mut out = Vec::new();
    for (kind, init) in [("initContainers", "true"), ("containers", "false")] {
        for c in template["spec"][kind].as_sequence().into_iter().flatten() {
            let mut t = base.clone();
            t.insert(
                "__meta_kubernetes_pod_container_name".into(),
                c["name"].as_str().unwrap().into(),
            );
            t.insert("__meta_kubernetes_pod_container_init".into(), init.into());
            let ports = c["ports"].as_sequence().cloned().unwrap_or_default();
            if ports.is_empty() {
                // A container without ports: one target, at the pod's address alone.
                t.insert("__address__".into(), "10.0.0.1".into());
                out.push(t);
                continue;
            }
            for p in ports {
                let mut t = t.clone();
                let number = p["containerPort"].as_i64().unwrap().to_string();
                t.insert("__address__".into(), format!("10.0.0.1:{number}"));
                t.insert(
                    "__meta_kubernetes_pod_container_port_name".into(),
                    p["name"].as_str().unwrap_or("").into(),
                );
                t.insert("__meta_kubernetes_pod_container_port_number".into(), number);
                out.push(t);
            }
        }
    }
    out
}

/// Whether a relabelling regex (anchored, as Prometheus anchors them) matches: the config's
/// regexes are literals joined by `|`, which this checks first.
fn literal_regex_matches(regex: &str, value: &str) -> bool {
    assert!(
        !regex.contains(['.', '*', '+', '?', '(', ')', '[', ']', '^', '$', '\\']),
        "{regex}: the test reads relabelling regexes as literal alternatives"
    );
    regex.split('|').any(|alt| alt == value)
}

/// Applies `relabel_configs` (keep, drop, replace) to a target; None when dropped.
fn relabel(
    configs: &Yaml,
    mut target: BTreeMap<String, String>,
) -> Option<BTreeMap<String, String>> {
    for c in configs.as_sequence().expect("relabel_configs") {
        let sources: Vec<&str> = c["source_labels"]
            .as_sequence()
            .map(|s| s.iter().map(|l| l.as_str().unwrap()).collect())
            .unwrap_or_default();
        let value: Vec<&str> = sources
            .iter()
            .map(|l| target.get(*l).map(String::as_str).unwrap_or(""))
            .collect();
        let value = value.join(c["separator"].as_str().unwrap_or(";"));
        let regex = c["regex"].as_str().unwrap_or("(.*)");
        match c["action"].as_str().unwrap_or("replace") {
            "keep" if !literal_regex_matches(regex, &value) => return None,
            "drop" if literal_regex_matches(regex, &value) => return None,
            "keep" | "drop" => {}
            "replace" => {
                // `(.+)` does not match an empty value: nothing is replaced then.
                assert!(
                    regex == "(.*)" || regex == "(.+)",
                    "replace with a whole-value regex only"
                );
                if regex == "(.+)" && value.is_empty() {
                    continue;
                }
                let replacement = c["replacement"].as_str().unwrap_or("$1");
                assert_eq!(
                    replacement.matches('$').count(),
                    1,
                    "a replacement using $1 once"
                );
                let value = replacement.replace("$1", &value);
                let to = c["target_label"].as_str().expect("target_label");
                if value.is_empty() {
                    target.remove(to);
                } else {
                    target.insert(to.to_string(), value);
                }
            }
            other => panic!("relabelling action {other} is not simulated"),
        }
    }
    Some(target)
}

#[test]
fn scrape_config_keeps_the_weft_pods_metrics_port() {
    let config = yaml_file(SCRAPE_CONFIG);
    let jobs = config["scrape_configs"]
        .as_sequence()
        .expect("scrape_configs");
    let job = jobs
        .iter()
        .find(|j| j["job_name"] == "weft")
        .expect("a weft job");
    assert_eq!(job["metrics_path"], "/metrics");
    let sd = &job["kubernetes_sd_configs"][0];
    assert_eq!(sd["role"], "pod");
    assert_eq!(strings(&sd["namespaces"]["names"]), [NAMESPACE]);

    let docs = docs(&render_sets(&[]));
    let ds = object(&docs, "DaemonSet", "weft");
    let ca = object(&docs, "Deployment", "weft-ca");
    // The discovery's label selector takes the DaemonSet's pods and not the CA service's.
    let selector = sd["selectors"][0]["label"]
        .as_str()
        .expect("a label selector");
    let selects = |pod: &Yaml| {
        selector.split(',').all(|kv| {
            let (k, v) = kv.split_once('=').expect("equality selectors");
            pod["spec"]["template"]["metadata"]["labels"][k] == v
        })
    };
    assert!(selects(ds), "{selector} misses the DaemonSet's pods");
    assert!(!selects(ca), "{selector} takes the CA service's pods");

    let relabelling = &job["relabel_configs"];
    let kept: Vec<BTreeMap<String, String>> = pod_targets(ds, "weft-abcde", "node-1")
        .into_iter()
        .chain(pod_targets(ca, "weft-ca-12345", "node-1"))
        .filter_map(|t| relabel(relabelling, t))
        .collect();
    assert_eq!(kept.len(), 1, "one target per weft pod: {kept:#?}");
    let target = &kept[0];
    let metrics_port = ds["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str()?.strip_prefix("--metrics-address="))
        .next()
        .expect("--metrics-address")
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    assert_eq!(target["__address__"], format!("10.0.0.1:{metrics_port}"));
    assert_eq!(target["namespace"], NAMESPACE);
    assert_eq!(target["pod"], "weft-abcde");
    assert_eq!(target["node"], "node-1");
    // Not one of Istio's labels, which the istio_* series carry themselves.
    for label in ["namespace", "pod", "node", "container"] {
        assert!(!ISTIO_LABELS.contains(&label));
    }
}

fn promtool() -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("promtool"))
        .find(|p| p.is_file())
}

fn promtool_check_config(promtool: &Path, file: &Path) -> (bool, String) {
    let out = Command::new(promtool)
        .args(["check", "config"])
        .arg(file)
        .output()
        .expect("running promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// promtool checks the scrape config: its YAML, the job, every relabelling (actions, regular
/// expressions, target labels). Debian's promtool (package prometheus, as `cargo xtask setup`
/// installs it) is built without Kubernetes service discovery and refuses
/// `kubernetes_sd_configs` as an unknown field; then the config is checked with the discovery
/// swapped for a static target, and the discovery itself only by
/// `scrape_config_keeps_the_weft_pods_metrics_port` (a promtool with it checks the file as is).
#[test]
fn promtool_accepts_the_scrape_config() {
    let Some(promtool) = promtool() else {
        eprintln!(
            "SKIPPED promtool_accepts_the_scrape_config: promtool is not installed (Debian \
             package prometheus, which `cargo xtask setup` installs)"
        );
        return;
    };
    let file = workspace_root().join(SCRAPE_CONFIG);
    let (ok, text) = promtool_check_config(&promtool, &file);
    if ok {
        return;
    }
    assert!(
        text.contains("field kubernetes_sd_configs not found"),
        "promtool check config {SCRAPE_CONFIG}:\n{text}"
    );
    eprintln!(
        "{}: built without Kubernetes service discovery; checking {SCRAPE_CONFIG} with its \
         kubernetes_sd_configs replaced by a static target",
        promtool.display()
    );
    let mut config = yaml_file(SCRAPE_CONFIG);
    for job in config["scrape_configs"].as_sequence_mut().unwrap() {
        let job = job.as_mapping_mut().unwrap();
        assert!(job.remove("kubernetes_sd_configs").is_some());
        job.insert(
            "static_configs".into(),
            serde_yaml_ng::from_str("[{targets: ['127.0.0.1:15020']}]").unwrap(),
        );
    }
    let dir = scratch_dir("promtool");
    let copy = dir.join("prometheus-scrape-static.yaml");
    std::fs::write(&copy, serde_yaml_ng::to_string(&config).unwrap()).unwrap();
    let (ok, text) = promtool_check_config(&promtool, &copy);
    assert!(
        ok,
        "promtool check config {SCRAPE_CONFIG} (static target):\n{text}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// deploy/grafana/podmonitor.yaml is the chart's PodMonitor, for installs without Helm, and
/// scrapes the port that serves /metrics.
#[test]
fn pod_monitor_is_the_charts() {
    let standalone = yaml_file(POD_MONITOR);
    let docs = docs(&render_sets(&["podMonitor.enabled=true"]));
    let chart = object(&docs, "PodMonitor", "weft");
    for field in ["apiVersion", "kind"] {
        assert_eq!(standalone[field], chart[field], "{field}");
    }
    assert_eq!(standalone["metadata"]["name"], chart["metadata"]["name"]);
    assert_eq!(standalone["metadata"]["namespace"], NAMESPACE);
    assert_eq!(
        standalone["spec"], chart["spec"],
        "{POD_MONITOR} and the chart's differ"
    );

    let endpoint = &chart["spec"]["podMetricsEndpoints"][0];
    assert_eq!(endpoint["path"], "/metrics");
    assert_eq!(
        endpoint["relabelings"][0]["targetLabel"], "node",
        "the dashboard's Node variable"
    );
    let ds = object(&docs, "DaemonSet", "weft");
    let metrics_address = ds["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .find_map(|a| a.as_str()?.strip_prefix("--metrics-address="))
        .expect("--metrics-address");
    assert_eq!(
        metrics_address.rsplit(':').next(),
        endpoint["portNumber"]
            .as_i64()
            .map(|n| n.to_string())
            .as_deref(),
        "the PodMonitor scrapes the port weft serves /metrics on"
    );
    assert_eq!(
        chart["spec"]["selector"]["matchLabels"],
        ds["spec"]["selector"]["matchLabels"]
    );
    // Labels from the values reach the PodMonitor (a Prometheus selects PodMonitors by them).
    let labelled = docs_with(&[
        "podMonitor.enabled=true",
        "podMonitor.labels.release=prometheus",
    ]);
    assert_eq!(
        object(&labelled, "PodMonitor", "weft")["metadata"]["labels"]["release"],
        "prometheus"
    );
    assert!(
        !docs_with(&[]).iter().any(|d| d["kind"] == "PodMonitor"),
        "no PodMonitor by default"
    );
}

fn docs_with(sets: &[&str]) -> Vec<Yaml> {
    docs(&render_sets(sets))
}
