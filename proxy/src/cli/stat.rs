//! `weft stat` and `weft graph`: the node's golden signals, as `linkerd viz stat` shows them,
//! and who called whom, as a table, JSON lines, Graphviz DOT or a Mermaid flowchart.

use std::collections::BTreeMap;
use std::io::Write;

use super::table::{json_lines, print_table, yes_no};
use super::{GraphArgs, GraphOutput, Output, StatArgs};
use crate::admin::api::{EdgeProtocol, GraphEdge, StatBy, StatQuery, StatRow};

/// The namespace `weft stat` shows without `-n` or `-A`, as kubectl.
const DEFAULT_NAMESPACE: &str = "default";

pub async fn run_stat(args: StatArgs) -> anyhow::Result<()> {
    let query = StatQuery {
        by: args.resource,
        namespace: match (args.namespace, args.all_namespaces, args.resource) {
            (Some(ns), _, _) => Some(ns),
            (None, true, _) | (None, false, StatBy::Ns) => None,
            (None, false, _) => Some(DEFAULT_NAMESPACE.to_string()),
        },
        window: args.window,
    };
    let rows = args.target.client().stat(&query).await?;
    let mut out = std::io::stdout().lock();
    match args.output {
        Output::Json => json_lines(&mut out, &rows)?,
        Output::Table if rows.is_empty() => eprintln!("{}", no_rows(&query)),
        Output::Table => print_table(&mut out, &stat_table(query.by, &rows))?,
    }
    Ok(())
}

pub async fn run_graph(args: GraphArgs) -> anyhow::Result<()> {
    let edges = args.target.client().graph(args.window).await?;
    let mut out = std::io::stdout().lock();
    match args.output {
        GraphOutput::Json => json_lines(&mut out, &edges)?,
        GraphOutput::Table if edges.is_empty() => eprintln!(
            "this node saw no calls in the last {}",
            humantime::format_duration(args.window)
        ),
        GraphOutput::Table => print_table(&mut out, &graph_table(&edges))?,
        GraphOutput::Dot => out.write_all(dot(&edges).as_bytes())?,
        GraphOutput::Mermaid => out.write_all(mermaid(&edges).as_bytes())?,
    }
    Ok(())
}

/// What an empty table says instead.
fn no_rows(query: &StatQuery) -> String {
    let window = humantime::format_duration(query.window);
    match &query.namespace {
        Some(ns) => format!(
            "this node saw no calls into a {} of namespace {ns} in the last {window} (-A: every namespace)",
            query.by
        ),
        None => format!(
            "this node saw no calls into a {} in the last {window}",
            query.by
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Cells
// ---------------------------------------------------------------------------------------------

const NONE: &str = "-";

/// `98.50%`, `-` for no data.
fn percent(share: Option<f64>) -> String {
    share.map_or_else(|| NONE.into(), |s| format!("{:.2}%", s * 100.0))
}

/// `12.3rps`, `-` without requests.
fn rps(requests: u64, rps: f64) -> String {
    if requests == 0 {
        NONE.into()
    } else {
        format!("{rps:.1}rps")
    }
}

/// `4ms`; `350µs` under a millisecond, `12.5s` from 10 s; `-` for no data.
fn latency(ms: Option<f64>) -> String {
    let Some(ms) = ms else {
        return NONE.into();
    };
    let us = (ms * 1000.0).round();
    if us < 1000.0 {
        format!("{us:.0}µs")
    } else if ms.round() < 10_000.0 {
        format!("{ms:.0}ms")
    } else {
        format!("{:.1}s", ms / 1000.0)
    }
}

/// `512B/s`, `1.5KiB/s`, `2.0MiB/s`.
fn bytes_rate(per_sec: f64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if per_sec.round() < 1024.0 {
        return format!("{per_sec:.0}B/s");
    }
    let mut v = per_sec;
    let mut unit = "B";
    for u in UNITS {
        if v.round() < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1}{unit}/s")
}

/// The bytes columns: `-` for a target of no TCP connection.
fn tcp_bytes(tcp: bool, per_sec: f64) -> String {
    if tcp {
        bytes_rate(per_sec)
    } else {
        NONE.into()
    }
}

// ---------------------------------------------------------------------------------------------
// weft stat
// ---------------------------------------------------------------------------------------------

/// `linkerd viz stat`'s columns, and TCP bytes each way (into the target, out of it); a KIND
/// column for workloads of every kind, no NAMESPACE column for namespaces.
fn stat_table(by: StatBy, rows: &[StatRow]) -> Vec<Vec<String>> {
    let with_namespace = by != StatBy::Ns;
    let with_kind = by == StatBy::Workload;
    let mut header = Vec::new();
    if with_namespace {
        header.push("NAMESPACE");
    }
    header.push("NAME");
    if with_kind {
        header.push("KIND");
    }
    header.extend([
        "SUCCESS",
        "RPS",
        "LATENCY_P50",
        "LATENCY_P95",
        "LATENCY_P99",
        "TCP_CONN",
        "BYTES_IN",
        "BYTES_OUT",
    ]);
    let mut table = vec![header.into_iter().map(String::from).collect::<Vec<_>>()];
    for r in rows {
        let mut cells = Vec::new();
        if with_namespace {
            cells.push(if r.namespace.is_empty() {
                NONE.to_string()
            } else {
                r.namespace.clone()
            });
        }
        cells.push(r.name.clone());
        if with_kind {
            cells.push(r.kind.clone());
        }
        let tcp = r.tcp_opened > 0 || r.tcp_connections > 0 || r.tcp_bytes_sent_per_sec > 0.0;
        cells.extend([
            percent(r.success_rate),
            rps(r.requests, r.rps),
            latency(r.p50_ms),
            latency(r.p95_ms),
            latency(r.p99_ms),
            r.tcp_connections.to_string(),
            tcp_bytes(tcp, r.tcp_bytes_sent_per_sec),
            tcp_bytes(tcp, r.tcp_bytes_received_per_sec),
        ]);
        table.push(cells);
    }
    table
}

// ---------------------------------------------------------------------------------------------
// weft graph
// ---------------------------------------------------------------------------------------------

fn edge_has_tcp(e: &GraphEdge) -> bool {
    e.tcp_opened > 0 || e.tcp_connections > 0 || e.tcp_bytes_sent_per_sec > 0.0
}

fn graph_table(edges: &[GraphEdge]) -> Vec<Vec<String>> {
    let header = [
        "SOURCE",
        "DESTINATION",
        "SERVICE",
        "PROTOCOL",
        "RPS",
        "ERRORS",
        "MTLS",
        "TCP_CONN",
        "BYTES_SENT",
        "BYTES_RECV",
    ];
    let mut table = vec![header.map(String::from).to_vec()];
    for e in edges {
        let tcp = edge_has_tcp(e);
        table.push(vec![
            e.source.clone(),
            e.destination.clone(),
            e.service.clone().unwrap_or_else(|| NONE.into()),
            e.protocol.as_str().into(),
            rps(e.requests, e.rps),
            percent(e.error_rate),
            yes_no(e.mtls).into(),
            e.tcp_connections.to_string(),
            tcp_bytes(tcp, e.tcp_bytes_sent_per_sec),
            tcp_bytes(tcp, e.tcp_bytes_received_per_sec),
        ]);
    }
    table
}

/// An edge's label: `12.3rps, 1.50% errors` for HTTP, `tcp, 2 conn, 1.5KiB/s` (both ways) for
/// TCP, then `lock` when every call was in mutual TLS.
fn edge_label(e: &GraphEdge, lock: &str) -> String {
    let mut parts = match e.protocol {
        EdgeProtocol::Http => vec![
            rps(e.requests, e.rps),
            format!("{} errors", percent(e.error_rate)),
        ],
        EdgeProtocol::Tcp => vec![
            "tcp".to_string(),
            format!("{} conn", e.tcp_connections),
            bytes_rate(e.tcp_bytes_sent_per_sec + e.tcp_bytes_received_per_sec),
        ],
    };
    if e.mtls {
        parts.push(lock.to_string());
    }
    parts.join(", ")
}

/// A DOT double-quoted string.
fn dot_quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                q.push('\\');
                q.push(c);
            }
            '\n' => q.push_str("\\n"),
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

/// Graphviz DOT: left to right, TCP edges dashed, mTLS said in words (fonts without emoji).
fn dot(edges: &[GraphEdge]) -> String {
    let mut out =
        String::from("digraph weft {\n  rankdir=LR;\n  node [shape=box, style=rounded];\n");
    for e in edges {
        let style = match e.protocol {
            EdgeProtocol::Http => "",
            EdgeProtocol::Tcp => ", style=dashed",
        };
        out.push_str(&format!(
            "  {} -> {} [label={}{style}];\n",
            dot_quote(&e.source),
            dot_quote(&e.destination),
            dot_quote(&edge_label(e, "mTLS")),
        ));
    }
    out.push_str("}\n");
    out
}

/// A Mermaid label: in double quotes, which it writes `#quot;`.
fn mermaid_quote(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "#quot;"))
}

/// A Mermaid flowchart: nodes `n0`, `n1`, … (by name) labelled with their names, TCP edges
/// dotted, 🔒 for mTLS.
fn mermaid(edges: &[GraphEdge]) -> String {
    let mut ids = BTreeMap::new();
    for e in edges {
        ids.insert(e.source.as_str(), 0);
        ids.insert(e.destination.as_str(), 0);
    }
    let mut out = String::from("flowchart LR\n");
    for (i, (name, id)) in ids.iter_mut().enumerate() {
        *id = i;
        out.push_str(&format!("    n{i}[{}]\n", mermaid_quote(name)));
    }
    for e in edges {
        let arrow = match e.protocol {
            EdgeProtocol::Http => "-->",
            EdgeProtocol::Tcp => "-.->",
        };
        out.push_str(&format!(
            "    n{} {arrow}|{}| n{}\n",
            ids[e.source.as_str()],
            mermaid_quote(&edge_label(e, "🔒")),
            ids[e.destination.as_str()],
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(ns: &str, name: &str) -> StatRow {
        StatRow {
            namespace: ns.into(),
            name: name.into(),
            kind: "Deployment".into(),
            meshed: true,
            pods: 2,
            requests: 740,
            rps: 12.33,
            success_rate: Some(0.985),
            p50_ms: Some(4.2),
            p95_ms: Some(18.9),
            p99_ms: Some(0.35),
            tcp_connections: 3,
            tcp_opened: 1,
            tcp_bytes_sent_per_sec: 1536.0,
            tcp_bytes_received_per_sec: 200.0,
            window_seconds: 60.0,
        }
    }

    fn idle(ns: &str, name: &str) -> StatRow {
        StatRow {
            requests: 0,
            rps: 0.0,
            success_rate: None,
            p50_ms: None,
            p95_ms: None,
            p99_ms: None,
            tcp_connections: 0,
            tcp_opened: 0,
            tcp_bytes_sent_per_sec: 0.0,
            tcp_bytes_received_per_sec: 0.0,
            ..row(ns, name)
        }
    }

    fn render(table: Vec<Vec<String>>) -> String {
        let mut out = Vec::new();
        print_table(&mut out, &table).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn stat_table_is_linkerd_s() {
        let rows = [row("shop", "web"), idle("shop", "worker")];
        assert_eq!(
            render(stat_table(StatBy::Deploy, &rows)),
            "\
NAMESPACE  NAME    SUCCESS  RPS      LATENCY_P50  LATENCY_P95  LATENCY_P99  TCP_CONN  BYTES_IN  BYTES_OUT
shop       web     98.50%   12.3rps  4ms          19ms         350µs        3         1.5KiB/s  200B/s
shop       worker  -        -        -            -            -            0         -         -
"
        );
        let mut ns = row("shop", "shop");
        ns.kind = "Namespace".into();
        assert_eq!(
            render(stat_table(StatBy::Ns, &[ns])),
            "\
NAME  SUCCESS  RPS      LATENCY_P50  LATENCY_P95  LATENCY_P99  TCP_CONN  BYTES_IN  BYTES_OUT
shop  98.50%   12.3rps  4ms          19ms         350µs        3         1.5KiB/s  200B/s
"
        );
        let mut sts = idle("", "db");
        sts.kind = "StatefulSet".into();
        sts.tcp_connections = 1;
        assert_eq!(
            render(stat_table(StatBy::Workload, &[sts])),
            "\
NAMESPACE  NAME  KIND         SUCCESS  RPS  LATENCY_P50  LATENCY_P95  LATENCY_P99  TCP_CONN  BYTES_IN  BYTES_OUT
-          db    StatefulSet  -        -    -            -            -            1         0B/s      0B/s
"
        );
    }

    #[test]
    fn cells_are_human() {
        assert_eq!(percent(Some(1.0)), "100.00%");
        assert_eq!(percent(Some(0.0)), "0.00%");
        assert_eq!(percent(None), "-");
        assert_eq!(rps(1, 0.016), "0.0rps");
        assert_eq!(rps(0, 0.0), "-");
        assert_eq!(latency(Some(0.0004)), "0µs");
        assert_eq!(latency(Some(0.9994)), "999µs");
        assert_eq!(latency(Some(0.9996)), "1ms");
        assert_eq!(latency(Some(4.4)), "4ms");
        assert_eq!(latency(Some(9999.0)), "9999ms");
        assert_eq!(latency(Some(12_500.0)), "12.5s");
        assert_eq!(bytes_rate(0.0), "0B/s");
        assert_eq!(bytes_rate(1023.4), "1023B/s");
        assert_eq!(bytes_rate(1023.6), "1.0KiB/s");
        assert_eq!(bytes_rate(3.5 * 1024.0 * 1024.0), "3.5MiB/s");
        assert_eq!(bytes_rate(2.0 * 1024.0f64.powi(5)), "2048.0TiB/s");
    }

    #[test]
    fn json_is_one_object_per_line() {
        let mut out = Vec::new();
        json_lines(&mut out, &[row("shop", "web"), idle("shop", "worker")]).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(
            lines[1],
            r#"{"namespace":"shop","name":"worker","kind":"Deployment","meshed":true,"pods":2,"requests":0,"rps":0.0,"success_rate":null,"p50_ms":null,"p95_ms":null,"p99_ms":null,"tcp_connections":0,"tcp_opened":0,"tcp_bytes_sent_per_sec":0.0,"tcp_bytes_received_per_sec":0.0,"window_seconds":60.0}"#
        );
        let back: StatRow = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(back, row("shop", "web"));
    }

    fn edges() -> Vec<GraphEdge> {
        let http = GraphEdge {
            source: "shop/web".into(),
            destination: "shop/api".into(),
            service: Some("shop/api".into()),
            protocol: EdgeProtocol::Http,
            requests: 740,
            rps: 12.33,
            error_rate: Some(0.015),
            mtls: true,
            tcp_connections: 0,
            tcp_opened: 0,
            tcp_bytes_sent_per_sec: 0.0,
            tcp_bytes_received_per_sec: 0.0,
            window_seconds: 60.0,
        };
        let tcp = GraphEdge {
            source: "unknown".into(),
            destination: "db/pg \"main\"".into(),
            service: None,
            protocol: EdgeProtocol::Tcp,
            requests: 0,
            rps: 0.0,
            error_rate: None,
            mtls: false,
            tcp_connections: 2,
            tcp_opened: 1,
            tcp_bytes_sent_per_sec: 1024.0,
            tcp_bytes_received_per_sec: 512.0,
            ..http.clone()
        };
        vec![http, tcp]
    }

    #[test]
    fn graph_table() {
        assert_eq!(
            render(super::graph_table(&edges())),
            "\
SOURCE    DESTINATION   SERVICE   PROTOCOL  RPS      ERRORS  MTLS  TCP_CONN  BYTES_SENT  BYTES_RECV
shop/web  shop/api      shop/api  http      12.3rps  1.50%   yes   0         -           -
unknown   db/pg \"main\"  -         tcp       -        -       no    2         1.0KiB/s    512B/s
"
        );
    }

    #[test]
    fn graph_dot() {
        assert_eq!(
            dot(&edges()),
            r#"digraph weft {
  rankdir=LR;
  node [shape=box, style=rounded];
  "shop/web" -> "shop/api" [label="12.3rps, 1.50% errors, mTLS"];
  "unknown" -> "db/pg \"main\"" [label="tcp, 2 conn, 1.5KiB/s", style=dashed];
}
"#
        );
        assert_eq!(
            dot(&[]),
            "digraph weft {\n  rankdir=LR;\n  node [shape=box, style=rounded];\n}\n"
        );
        assert_eq!(dot_quote(r"a\b"), r#""a\\b""#);
    }

    #[test]
    fn graph_mermaid() {
        assert_eq!(
            mermaid(&edges()),
            "\
flowchart LR
    n0[\"db/pg #quot;main#quot;\"]
    n1[\"shop/api\"]
    n2[\"shop/web\"]
    n3[\"unknown\"]
    n2 -->|\"12.3rps, 1.50% errors, 🔒\"| n1
    n3 -.->|\"tcp, 2 conn, 1.5KiB/s\"| n0
"
        );
    }

    #[test]
    fn empty_answers_say_what_was_asked() {
        let q = StatQuery {
            by: StatBy::Svc,
            namespace: Some("default".into()),
            window: std::time::Duration::from_secs(90),
        };
        assert_eq!(
            no_rows(&q),
            "this node saw no calls into a svc of namespace default in the last 1m 30s (-A: every namespace)"
        );
        let all = StatQuery {
            namespace: None,
            ..q
        };
        assert_eq!(
            no_rows(&all),
            "this node saw no calls into a svc in the last 1m 30s"
        );
    }

    #[test]
    fn stat_arguments_parse() {
        use super::super::{Cli, Command, Query};
        use clap::Parser;
        let parse = |args: &[&str]| {
            let cli = Cli::try_parse_from(args.iter().copied())?;
            let Command::Query(Query::Stat(a)) = cli.command else {
                panic!("not stat");
            };
            Ok::<_, clap::Error>(a)
        };
        let a = parse(&["weft", "stat"]).unwrap();
        assert_eq!((a.resource, a.window.as_secs()), (StatBy::Deploy, 60));
        assert_eq!(
            (a.namespace, a.all_namespaces, a.output),
            (None, false, Output::Table)
        );
        let a = parse(&[
            "weft", "stat", "services", "-n", "shop", "--window", "5m", "-o", "json",
        ])
        .unwrap();
        assert_eq!((a.resource, a.window.as_secs()), (StatBy::Svc, 300));
        assert_eq!(a.namespace.as_deref(), Some("shop"));
        assert_eq!(
            parse(&["weft", "stat", "po", "-A"]).unwrap().resource,
            StatBy::Pod
        );
        assert!(parse(&["weft", "stat", "-n", "a", "-A"]).is_err());
        assert!(parse(&["weft", "stat", "rs"]).is_err());
        let e = parse(&["weft", "stat", "--window", "1h"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("between 10s and 10m"), "{e}");
        let cli =
            Cli::try_parse_from(["weft", "graph", "-o", "mermaid", "--window", "30s"]).unwrap();
        let Command::Query(Query::Graph(g)) = cli.command else {
            panic!("not graph");
        };
        assert_eq!((g.output, g.window.as_secs()), (GraphOutput::Mermaid, 30));
    }
}
