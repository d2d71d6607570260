//! The `weft` command line: `weft node` runs the proxy; `weft flows`, `weft workloads` and
//! `weft status` read a running node's admin API.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use http_body_util::{BodyExt, Empty};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};

use crate::config::{NodeArgs, DEFAULT_ADMIN_SOCKET};
use crate::flows::{Flow, Verdict};

#[derive(Parser, Debug)]
#[command(
    name = "weft",
    version,
    about = "weft: a sidecar-less service mesh data plane"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the node proxy (one per node).
    Node(Box<NodeArgs>),
    /// Show redirected flows: who called whom, verdict, bytes, duration.
    Flows(FlowsArgs),
    /// List the pods this node knows, whether they are enrolled, and their cgroups.
    Workloads(WorkloadsArgs),
    /// Show the node's eBPF programs, maps, counters and readiness.
    Status(StatusArgs),
    /// Manage the mesh certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
    /// List the workload certificates (SVIDs) this node holds, with their expiry.
    Certs(CertsArgs),
    /// Remove weft's capture from this node: detach the eBPF programs and delete the pins.
    /// Stop `weft node` first; enrolled pods then connect directly again.
    Uninstall(UninstallArgs),
}

#[derive(Subcommand, Debug)]
pub enum CaCommand {
    /// Create a mesh root CA: DIR/ca.crt and DIR/ca.key (ECDSA P-256). Refuses to overwrite.
    Init {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        #[arg(long, default_value = crate::config::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// How long the root is valid, e.g. 10y, 365d.
        #[arg(long, default_value = "10y")]
        validity: String,
    },
}

#[derive(clap::Args, Debug)]
pub struct CertsArgs {
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(flatten)]
    pub target: AdminTarget,
}

#[derive(clap::Args, Debug)]
pub struct UninstallArgs {
    /// The pin directory `weft node` used (`--bpffs`).
    #[arg(long, value_name = "PATH", default_value = crate::capture::DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
}

/// Which node to ask.
#[derive(clap::Args, Debug, Clone)]
pub struct AdminTarget {
    /// Admin API Unix socket of the node.
    #[arg(long, value_name = "PATH", global = true, env = "WEFT_ADMIN_SOCKET")]
    pub admin_socket: Option<PathBuf>,
    /// Admin API TCP address of the node (instead of the socket).
    #[arg(
        long,
        value_name = "IP:PORT",
        global = true,
        env = "WEFT_ADMIN_ADDRESS"
    )]
    pub admin_address: Option<SocketAddr>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
}

#[derive(clap::Args, Debug)]
pub struct FlowsArgs {
    /// Keep streaming new flows.
    #[arg(short, long)]
    pub follow: bool,
    /// Only flows from or to this namespace.
    #[arg(short, long)]
    pub namespace: Option<String>,
    /// Only flows from or to this pod (`name` or `namespace/name`).
    #[arg(long)]
    pub pod: Option<String>,
    /// Only flows with this verdict (forwarded, no_endpoint, connect_failed, unidentified, unhandled).
    #[arg(long)]
    pub verdict: Option<Verdict>,
    /// Only flows since this long ago (30s, 5m, 2h) or this RFC 3339 time.
    #[arg(long)]
    pub since: Option<String>,
    /// Only the last N flows from history.
    #[arg(long)]
    pub last: Option<usize>,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(flatten)]
    pub target: AdminTarget,
}

#[derive(clap::Args, Debug)]
pub struct WorkloadsArgs {
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(flatten)]
    pub target: AdminTarget,
}

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(flatten)]
    pub target: AdminTarget,
}

/// One row of `/workloads`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct WorkloadInfo {
    pub namespace: String,
    pub pod: String,
    pub ip: Option<std::net::IpAddr>,
    pub node: Option<String>,
    pub service_account: String,
    /// SPIFFE id (mesh pods).
    #[serde(default)]
    pub identity: Option<String>,
    pub ready: bool,
    pub enrolled: bool,
    pub cgroup_id: Option<u64>,
    pub cgroup_path: Option<PathBuf>,
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Node(args) => crate::node::run(args.resolve()?).await,
        Command::Flows(args) => flows(args).await,
        Command::Workloads(args) => workloads(args).await,
        Command::Status(args) => status(args).await,
        Command::Ca(CaCommand::Init {
            out,
            trust_domain,
            validity,
        }) => {
            let validity = humantime::parse_duration(&validity)
                .with_context(|| format!("--validity {validity:?}: expected e.g. 10y or 365d"))?;
            crate::identity::init_ca(&out, &trust_domain, validity)?;
            println!(
                "mesh CA for trust domain {trust_domain}: {0}/ca.crt, {0}/ca.key",
                out.display()
            );
            Ok(())
        }
        Command::Certs(args) => certs(args).await,
        Command::Uninstall(args) => {
            crate::capture::Capture::remove_pins(&args.bpffs)?;
            println!(
                "weft capture removed ({} detached and unpinned)",
                args.bpffs.display()
            );
            Ok(())
        }
    }
}

async fn flows(args: FlowsArgs) -> anyhow::Result<()> {
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
    ] {
        if let Some(v) = v {
            query.push((k, v));
        }
    }
    let path = format!("/flows?{}", encode_query(&query));
    let mut resp = get(&args.target, &path).await?;
    let mut stdout = std::io::stdout().lock();
    let mut buf = Vec::new();
    let mut table = FlowTable;
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
                    Err(_) => eprintln!("weft: {}", String::from_utf8_lossy(line)),
                },
            }
            stdout.flush()?;
        }
    }
    Ok(())
}

async fn workloads(args: WorkloadsArgs) -> anyhow::Result<()> {
    let body = get_body(&args.target, "/workloads").await?;
    let rows: Vec<WorkloadInfo> = serde_json::from_slice(&body).context("decoding /workloads")?;
    let mut out = std::io::stdout().lock();
    if args.output == Output::Json {
        for r in &rows {
            serde_json::to_writer(&mut out, r)?;
            writeln!(out)?;
        }
        return Ok(());
    }
    let mut t = vec![[
        "NAMESPACE",
        "POD",
        "IP",
        "IDENTITY",
        "READY",
        "ENROLLED",
        "CGROUP ID",
    ]
    .map(String::from)
    .to_vec()];
    for r in &rows {
        t.push(vec![
            r.namespace.clone(),
            r.pod.clone(),
            r.ip.map(|i| i.to_string()).unwrap_or_else(|| "-".into()),
            r.identity.clone().unwrap_or_else(|| "-".into()),
            yes_no(r.ready).into(),
            yes_no(r.enrolled).into(),
            r.cgroup_id
                .map(|i| i.to_string())
                .unwrap_or_else(|| "-".into()),
        ]);
    }
    print_table(&mut out, &t)?;
    Ok(())
}

/// One row of `/certs`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct CertInfo {
    pub identity: String,
    pub serial: String,
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: time::OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: time::OffsetDateTime,
}

async fn certs(args: CertsArgs) -> anyhow::Result<()> {
    let body = get_body(&args.target, "/certs").await?;
    let rows: Vec<CertInfo> = serde_json::from_slice(&body).context("decoding /certs")?;
    let mut out = std::io::stdout().lock();
    if args.output == Output::Json {
        for r in &rows {
            serde_json::to_writer(&mut out, r)?;
            writeln!(out)?;
        }
        return Ok(());
    }
    let now = time::OffsetDateTime::now_utc();
    let fmt = time::format_description::well_known::Rfc3339;
    let mut t = vec![[
        "IDENTITY",
        "SERIAL",
        "NOT BEFORE",
        "NOT AFTER",
        "EXPIRES IN",
    ]
    .map(String::from)
    .to_vec()];
    for r in &rows {
        let left = (r.not_after - now).whole_seconds().max(0) as u64;
        t.push(vec![
            r.identity.clone(),
            r.serial.clone(),
            r.not_before.format(&fmt).unwrap_or_default(),
            r.not_after.format(&fmt).unwrap_or_default(),
            humantime::format_duration(std::time::Duration::from_secs(left)).to_string(),
        ]);
    }
    print_table(&mut out, &t)?;
    Ok(())
}

async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let body = get_body(&args.target, "/status").await?;
    let v: serde_json::Value = serde_json::from_slice(&body).context("decoding /status")?;
    let mut out = std::io::stdout().lock();
    let ready = v.get("ready").and_then(|r| r.as_bool()).unwrap_or(false);
    if args.output == Output::Json {
        serde_json::to_writer(&mut out, &v)?;
        writeln!(out)?;
        return Ok(());
    }
    let s = |p: &str| v.pointer(p).map(display_json).unwrap_or_else(|| "-".into());
    writeln!(out, "Node:        {}", s("/node"))?;
    writeln!(out, "Ready:       {}", yes_no(ready))?;
    writeln!(out, "Proxy:       {}", s("/proxy_address"))?;
    writeln!(
        out,
        "Registry:    generation {} loaded {} ({} pods, {} services){}",
        s("/registry/generation"),
        s("/registry/loaded_at"),
        s("/registry/pods"),
        s("/registry/services"),
        match v.pointer("/registry/last_error") {
            Some(serde_json::Value::String(e)) =>
                format!("\n             last reload FAILED, previous snapshot kept: {e}"),
            _ => String::new(),
        }
    )?;
    writeln!(
        out,
        "Workloads:   {} on this node, {} enrolled",
        s("/workloads/total"),
        s("/workloads/enrolled")
    )?;
    writeln!(
        out,
        "Attach:      {} (pins in {})",
        s("/capture/attach_point"),
        s("/capture/pin_path")
    )?;
    writeln!(out, "Programs:")?;
    for p in v
        .pointer("/capture/programs")
        .and_then(|p| p.as_array())
        .into_iter()
        .flatten()
    {
        writeln!(
            out,
            "  {:<16} attached={} id={}",
            p.get("name").map(display_json).unwrap_or_default(),
            p.get("attached").map(display_json).unwrap_or_default(),
            p.get("id").map(display_json).unwrap_or_default()
        )?;
    }
    writeln!(out, "Maps:")?;
    for m in v
        .pointer("/capture/maps")
        .and_then(|p| p.as_array())
        .into_iter()
        .flatten()
    {
        writeln!(
            out,
            "  {:<16} {} / {}",
            m.get("name").map(display_json).unwrap_or_default(),
            m.get("entries").map(display_json).unwrap_or_default(),
            m.get("max_entries").map(display_json).unwrap_or_default()
        )?;
    }
    writeln!(out, "Counters:")?;
    for (section, ptr) in [("ebpf", "/capture/counters"), ("flows", "/flows/totals")] {
        if let Some(obj) = v.pointer(ptr).and_then(|c| c.as_object()) {
            for (k, val) in obj {
                let name = format!("{section}.{k}");
                writeln!(out, "  {name:<30} {}", display_json(val))?;
            }
        }
    }
    writeln!(
        out,
        "Flows kept:  {} of {}",
        s("/flows/kept"),
        s("/flows/capacity")
    )?;
    writeln!(
        out,
        "Mesh:        trust domain {}, {} SVIDs, {} AuthorizationPolicies, {} PeerAuthentications",
        s("/mesh/trust_domain"),
        s("/mesh/svids"),
        s("/mesh/authorization_policies"),
        s("/mesh/peer_authentications")
    )?;
    writeln!(
        out,
        "HBONE:       outbound {} TLS connections ({} streams active); inbound {} TLS accepted, {} refused",
        s("/tunnel/outbound/connections"),
        s("/tunnel/outbound/streams_active"),
        s("/tunnel/inbound/tls_accepted"),
        s("/tunnel/inbound/tls_failed")
    )?;
    Ok(())
}

fn display_json(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn encode_query(pairs: &[(&str, String)]) -> String {
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

async fn get_body(target: &AdminTarget, path: &str) -> anyhow::Result<Bytes> {
    let resp = get(target, path).await?;
    Ok(resp
        .into_body()
        .collect()
        .await
        .context("reading admin response")?
        .to_bytes())
}

/// GET `path` from the node's admin API; non-2xx answers become errors with the body's text.
pub async fn get(target: &AdminTarget, path: &str) -> anyhow::Result<Response<Incoming>> {
    let req = Request::get(path)
        .header(hyper::header::HOST, "weft-admin")
        .body(Empty::<Bytes>::new())?;
    let (resp, what) = match (&target.admin_address, &target.admin_socket) {
        (Some(addr), _) => {
            let s = tokio::net::TcpStream::connect(addr)
                .await
                .with_context(|| {
                    format!("connecting to the admin API at {addr}: is `weft node` running?")
                })?;
            (send(s, req).await?, addr.to_string())
        }
        (None, sock) => {
            let sock = sock.clone().unwrap_or_else(|| DEFAULT_ADMIN_SOCKET.into());
            let s = tokio::net::UnixStream::connect(&sock)
                .await
                .with_context(|| {
                    format!(
                        "connecting to the admin socket {}: is `weft node` running?",
                        sock.display()
                    )
                })?;
            (send(s, req).await?, sock.display().to_string())
        }
    };
    if resp.status() != StatusCode::OK {
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        bail!(
            "{what}{path}: {status}: {}",
            String::from_utf8_lossy(&body).trim()
        );
    }
    Ok(resp)
}

async fn send<S>(stream: S, req: Request<Empty<Bytes>>) -> anyhow::Result<Response<Incoming>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("admin API handshake")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender.send_request(req).await.context("admin API request")
}

/// Flow rows, hubble-style.
struct FlowTable;

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

impl FlowTable {
    fn cells(f: &Flow) -> Vec<String> {
        let fmt = time::macros::format_description!(
            "[month repr:short] [day] [hour]:[minute]:[second].[subsecond digits:3]"
        );
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
            (_, _, Some(a)) => a.clone(),
            _ => f.original_destination.clone(),
        };
        vec![
            f.time.format(&fmt).unwrap_or_default(),
            source,
            dest,
            f.destination.service.clone().unwrap_or_else(|| "-".into()),
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
        let header = FLOW_HEADER
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>();
        write_row(out, &header, &FOLLOW_WIDTHS)
    }

    fn print_row(&mut self, out: &mut impl Write, f: &Flow) -> std::io::Result<()> {
        write_row(out, &Self::cells(f), &FOLLOW_WIDTHS)
    }

    fn print_all(&mut self, out: &mut impl Write, flows: &[Flow]) -> std::io::Result<()> {
        let mut rows = vec![FLOW_HEADER
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()];
        rows.extend(flows.iter().map(Self::cells));
        print_table(out, &rows)
    }
}

fn format_duration(ms: f64) -> String {
    if ms < 1.0 {
        format!("{:.0}µs", ms * 1000.0)
    } else if ms < 1000.0 {
        format!("{ms:.1}ms")
    } else {
        format!("{:.2}s", ms / 1000.0)
    }
}

fn write_row(out: &mut impl Write, cells: &[String], widths: &[usize]) -> std::io::Result<()> {
    let mut line = String::new();
    for (i, c) in cells.iter().enumerate() {
        if i + 1 == cells.len() {
            line.push_str(c);
        } else {
            let w = widths[i];
            line.push_str(&format!("{c:<w$}  "));
        }
    }
    writeln!(out, "{}", line.trim_end())
}

fn print_table(out: &mut impl Write, rows: &[Vec<String>]) -> std::io::Result<()> {
    let cols = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        write_row(out, r, &widths)?;
    }
    Ok(())
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

    #[test]
    fn table_columns_align() {
        let mut out = Vec::new();
        print_table(
            &mut out,
            &[
                vec!["A".into(), "BB".into(), "C".into()],
                vec!["long".into(), "x".into(), "y".into()],
            ],
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "A     BB  C\nlong  x   y\n"
        );
    }

    #[test]
    fn durations_are_human() {
        assert_eq!(format_duration(0.25), "250µs");
        assert_eq!(format_duration(12.34), "12.3ms");
        assert_eq!(format_duration(2500.0), "2.50s");
    }
}
