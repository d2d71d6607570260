//! `weft flows`: the node's flow log, as a table or JSON lines, once or following.

use std::io::Write;

use anyhow::Context;
use http_body_util::BodyExt;

use super::table::{format_duration, print_table, write_row, yes_no};
use super::{FlowsArgs, Output};
use crate::admin::api::{Flow, LostFlows};

pub async fn run(args: FlowsArgs) -> anyhow::Result<()> {
    let mut query = Vec::new();
    if args.follow {
        query.push(("follow", "1".to_string()));
    }
    for (k, v) in [
        ("namespace", args.namespace),
        ("pod", args.pod),
        ("verdict", args.verdict.map(|v| v.to_string())),
        ("since", args.since),
        ("last", args.last.map(|n| n.to_string())),
        ("http", args.http.then(|| "1".to_string())),
        ("status", args.status.map(|s| s.to_string())),
        ("path", args.path),
        ("method", args.method),
    ] {
        if let Some(v) = v {
            query.push((k, v));
        }
    }
    let path = format!("/flows?{}", encode_query(&query));
    let mut resp = args.target.client().get(&path).await?;
    let mut stdout = std::io::stdout().lock();
    let mut buf = Vec::new();
    // A request filter shows requests, in the request table.
    let http = args.http
        || args.status.is_some()
        || query.iter().any(|(k, _)| *k == "path" || *k == "method");
    let mut table = FlowTable { http };
    if args.output == Output::Table && !args.follow {
        // Widths are fitted to the whole answer.
        let body = resp
            .body_mut()
            .collect()
            .await
            .context("reading flows")?
            .to_bytes();
        let flows = body
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .filter_map(|l| serde_json::from_slice::<Flow>(l).ok())
            .collect::<Vec<_>>();
        table.print_all(&mut stdout, &flows)?;
        return Ok(());
    }
    if args.output == Output::Table {
        table.print_header(&mut stdout)?;
    }
    while let Some(frame) = resp.body_mut().frame().await {
        let frame = frame.context("reading flows")?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            let line = &line[..line.len() - 1];
            if line.is_empty() {
                continue;
            }
            match args.output {
                Output::Json => {
                    stdout.write_all(line)?;
                    stdout.write_all(b"\n")?;
                }
                Output::Table => match serde_json::from_slice::<Flow>(line) {
                    Ok(f) => table.print_row(&mut stdout, &f)?,
                    Err(_) => match serde_json::from_slice::<LostFlows>(line) {
                        Ok(l) => eprintln!(
                            "weft: {} flows were not shown: this reader fell behind the node",
                            l.lost_flows
                        ),
                        Err(_) => eprintln!("weft: {}", String::from_utf8_lossy(line)),
                    },
                },
            }
            stdout.flush()?;
        }
    }
    Ok(())
}

pub(super) fn encode_query(pairs: &[(&str, String)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", percent_encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Flow rows, hubble-style; with `http`, one row per HTTP request.
struct FlowTable {
    http: bool,
}

const FLOW_HEADER: [&str; 8] = [
    "TIME",
    "SOURCE",
    "DESTINATION",
    "SERVICE",
    "MTLS",
    "VERDICT",
    "BYTES (SENT/RECV)",
    "DURATION",
];
/// Column widths for streamed output, where rows are printed as they come.
const FOLLOW_WIDTHS: [usize; 8] = [19, 34, 38, 22, 4, 30, 17, 9];

const HTTP_HEADER: [&str; 10] = [
    "TIME",
    "SOURCE",
    "METHOD",
    "AUTHORITY",
    "PATH",
    "STATUS",
    "FLAGS",
    "ROUTE",
    "UPSTREAM",
    "DURATION",
];
const HTTP_FOLLOW_WIDTHS: [usize; 10] = [19, 24, 7, 28, 24, 6, 5, 34, 21, 9];

const TIME_FORMAT: &[time::format_description::BorrowedFormatItem<'static>] = time::macros::format_description!(
    "[month repr:short] [day] [hour]:[minute]:[second].[subsecond digits:3]"
);

fn source_cell(f: &Flow) -> String {
    let source = match (&f.source.namespace, &f.source.pod) {
        (Some(ns), Some(p)) => format!("{ns}/{p}"),
        _ => "?".into(),
    };
    match f.source.ip {
        Some(ip) if f.source.pod.is_none() => format!("{source} ({ip})"),
        _ => source,
    }
}

impl FlowTable {
    fn header(&self) -> Vec<String> {
        let h: &[&str] = if self.http {
            &HTTP_HEADER
        } else {
            &FLOW_HEADER
        };
        h.iter().map(|s| s.to_string()).collect()
    }

    fn widths(&self) -> &'static [usize] {
        if self.http {
            &HTTP_FOLLOW_WIDTHS
        } else {
            &FOLLOW_WIDTHS
        }
    }

    fn cells(&self, f: &Flow) -> Vec<String> {
        match (&f.http, self.http) {
            (Some(h), true) => {
                let texts = h.texts.get();
                let status = match (h.status, &f.policy) {
                    (0, _) => "-".to_string(),
                    (s, Some(p)) => format!("{s} ({p})"),
                    (s, None) => s.to_string(),
                };
                vec![
                    f.time.format(TIME_FORMAT).unwrap_or_default(),
                    source_cell(f),
                    h.method.to_string(),
                    texts.authority.to_string(),
                    texts.path.to_string(),
                    status,
                    h.response_flags.to_string(),
                    h.route.as_deref().unwrap_or("-").to_string(),
                    h.upstream.as_deref().unwrap_or("-").to_string(),
                    format_duration(h.duration_ms),
                ]
            }
            _ => Self::connection_cells(f),
        }
    }

    fn connection_cells(f: &Flow) -> Vec<String> {
        let fmt = TIME_FORMAT;
        let source = match (&f.source.namespace, &f.source.pod) {
            (Some(ns), Some(p)) => format!("{ns}/{p}"),
            _ => "?".into(),
        };
        let source = match f.source.ip {
            Some(ip) => format!("{source} ({ip})"),
            None => source,
        };
        let dest = match (
            &f.destination.namespace,
            &f.destination.pod,
            &f.destination.address,
        ) {
            (Some(ns), Some(p), Some(a)) => format!("{ns}/{p} ({a})"),
            (_, _, Some(a)) => a.to_string(),
            _ => f.original_destination.to_string(),
        };
        vec![
            f.time.format(fmt).unwrap_or_default(),
            source,
            dest,
            f.destination.service.as_deref().unwrap_or("-").to_string(),
            yes_no(f.mtls).into(),
            match &f.policy {
                Some(p) => format!("{} ({p})", f.verdict.as_str().to_ascii_uppercase()),
                None => f.verdict.as_str().to_ascii_uppercase(),
            },
            format!("{}/{}", f.bytes_sent, f.bytes_received),
            format_duration(f.duration_ms),
        ]
    }

    fn print_header(&mut self, out: &mut impl Write) -> std::io::Result<()> {
        write_row(out, &self.header(), self.widths())
    }

    fn print_row(&mut self, out: &mut impl Write, f: &Flow) -> std::io::Result<()> {
        write_row(out, &self.cells(f), self.widths())
    }

    fn print_all(&mut self, out: &mut impl Write, flows: &[Flow]) -> std::io::Result<()> {
        let mut rows = vec![self.header()];
        rows.extend(flows.iter().map(|f| self.cells(f)));
        print_table(out, &rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_is_encoded() {
        assert_eq!(
            encode_query(&[
                ("pod", "demo/a b".into()),
                ("since", "2026-11-21T12:00:00+01:00".into())
            ]),
            "pod=demo/a%20b&since=2026-11-21T12%3A00%3A00%2B01%3A00"
        );
    }
}
