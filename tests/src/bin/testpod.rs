//! weft-testpod: the workload run inside test pods.
//!
//! - `serve --listen ADDR [--listen ADDR…] [--mode echo|whoami] [--name NAME]`: TCP server.
//!   Each connection gets `name=<NAME>\n` (with `--name`), then `peer=<ip:port>\n` (whoami), then
//!   an echo of everything the client sends until it half-closes.
//!   `--mode http`: a small HTTP/1.1 server (see `Mode::Http`).
//! - `http ADDR [--method M] [--path P] [-H 'k: v'] [--data D]`: one HTTP request; prints
//!   `status=<code>` and the body.
//! - `call ADDR --send TEXT [--timeout-ms N]`: connect, send, half-close, print the response.
//!   Exit 2 on connect failure, 3 on reset/timeout after connecting (error on stderr).
//! - `load ADDR --conns N --parallel P --tag TAG`: N connections (P at a time), each sends
//!   `TAG-<i>-<random>` and checks an echo backend returns exactly it (`name=`/`peer=` header
//!   lines are accepted and counted per backend name). Prints one JSON line
//!   `{"ok":…,"mismatched":…,"failed":…,"backends":{…},"errors":[…]}`; exit 0 iff all ok.

use clap::{Parser, Subcommand, ValueEnum};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "weft-testpod",
    about = "Test workload for weft's cluster-on-one-machine tests"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Mode {
    /// Echo what the client sends.
    Echo,
    /// Write `peer=<ip:port>` first, then echo.
    Whoami,
    /// HTTP/1.1 (keep-alive): 200 with a text body `name=…/peer=…/method=…/path=…/host=…` and one
    /// `header <name>: <value>` line per request header; `/status/<code>` answers with that
    /// status, `/delay/<ms>` waits first (at most 60 s).
    Http,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve TCP connections until killed.
    Serve {
        /// Address to listen on (repeatable).
        #[arg(long, required = true)]
        listen: Vec<SocketAddr>,
        #[arg(long, value_enum, default_value = "echo")]
        mode: Mode,
        /// Prefix every response with `name=<NAME>`.
        #[arg(long)]
        name: Option<String>,
    },
    /// One connection: send, half-close, print the response.
    Call {
        addr: SocketAddr,
        #[arg(long, default_value = "")]
        send: String,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
    /// One HTTP/1.1 request (Connection: close); prints `status=<code>`, then the body
    /// (`--include`: response headers as `< name: value` lines before the body).
    /// Exit 2 on connect failure, 3 on reset/timeout/malformed response.
    Http {
        addr: SocketAddr,
        #[arg(long, default_value = "GET")]
        method: String,
        #[arg(long, default_value = "/")]
        path: String,
        /// Host header (default: ADDR).
        #[arg(long)]
        host: Option<String>,
        /// Extra request header `Name: value` (repeatable).
        #[arg(long = "header", short = 'H')]
        headers: Vec<String>,
        /// Request body.
        #[arg(long)]
        data: Option<String>,
        #[arg(long)]
        include: bool,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
    /// Many connections against an echo backend; prints a JSON summary.
    Load {
        addr: SocketAddr,
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=100_000))]
        conns: u64,
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=256))]
        parallel: u64,
        #[arg(long, default_value = "load")]
        tag: String,
        /// Per-connection time limit.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
        /// Overall time limit: connections not started by then count as failed.
        #[arg(long, default_value_t = 120)]
        max_secs: u64,
    },
}

fn main() -> ExitCode {
    match Cli::parse().cmd {
        Cmd::Serve { listen, mode, name } => serve(listen, mode, name),
        Cmd::Call {
            addr,
            send,
            timeout_ms,
        } => call(addr, &send, Duration::from_millis(timeout_ms)),
        Cmd::Http {
            addr,
            method,
            path,
            host,
            headers,
            data,
            include,
            timeout_ms,
        } => http(
            addr,
            &method,
            &path,
            host,
            &headers,
            data.as_deref(),
            include,
            Duration::from_millis(timeout_ms),
        ),
        Cmd::Load {
            addr,
            conns,
            parallel,
            tag,
            timeout_ms,
            max_secs,
        } => load(
            addr,
            conns,
            parallel,
            &tag,
            Duration::from_millis(timeout_ms),
            Duration::from_secs(max_secs),
        ),
    }
}

fn serve(listen: Vec<SocketAddr>, mode: Mode, name: Option<String>) -> ExitCode {
    let mut listeners = Vec::new();
    for addr in &listen {
        match TcpListener::bind(addr) {
            Ok(l) => listeners.push(l),
            Err(e) => {
                eprintln!("bind {addr}: {e}");
                return ExitCode::from(1);
            }
        }
    }
    for l in &listeners {
        println!(
            "listening on {}",
            l.local_addr().map(|a| a.to_string()).unwrap_or_default()
        );
    }
    let _ = std::io::stdout().flush();
    let name = Arc::new(name);
    let mut threads = Vec::new();
    for l in listeners {
        let name = name.clone();
        threads.push(std::thread::spawn(move || loop {
            match l.accept() {
                Ok((s, peer)) => {
                    let name = name.clone();
                    std::thread::spawn(move || handle(s, peer, mode, name.as_deref()));
                }
                Err(e) => {
                    eprintln!("accept: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    ExitCode::SUCCESS
}

fn handle(mut s: TcpStream, peer: SocketAddr, mode: Mode, name: Option<&str>) {
    let _ = s.set_nodelay(true);
    if mode == Mode::Http {
        serve_http(s, peer, name);
        return;
    }
    let mut head = String::new();
    if let Some(n) = name {
        head.push_str(&format!("name={n}\n"));
    }
    if mode == Mode::Whoami {
        head.push_str(&format!("peer={peer}\n"));
    }
    if !head.is_empty() && s.write_all(head.as_bytes()).is_err() {
        return;
    }
    let mut buf = [0u8; 16 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
    }
    let _ = s.shutdown(Shutdown::Write);
}

/// Read a line (LF-terminated, CR stripped); None at EOF or error. Bounded to 64 KiB.
fn read_line(r: &mut impl BufRead) -> Option<String> {
    let mut line = String::new();
    match r.take(64 * 1024).read_line(&mut line) {
        Ok(0) | Err(_) => None,
        Ok(_) => Some(line.trim_end_matches(['\r', '\n']).to_string()),
    }
}

/// Read headers up to the empty line.
fn read_headers(r: &mut impl BufRead) -> Option<Vec<(String, String)>> {
    let mut headers = Vec::new();
    loop {
        let line = read_line(r)?;
        if line.is_empty() {
            return Some(headers);
        }
        let (k, v) = line.split_once(':')?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
        if headers.len() > 200 {
            return None;
        }
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Read a message body (Content-Length or chunked); None on a malformed or truncated body.
fn read_body(r: &mut impl BufRead, headers: &[(String, String)]) -> Option<Vec<u8>> {
    let chunked = header(headers, "transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let mut body = Vec::new();
    if chunked {
        loop {
            let size_line = read_line(r)?;
            let size = usize::from_str_radix(size_line.split(';').next()?.trim(), 16).ok()?;
            if size == 0 {
                // Trailers, then the empty line.
                read_headers(r)?;
                return Some(body);
            }
            let start = body.len();
            body.resize(start + size, 0);
            r.read_exact(&mut body[start..]).ok()?;
            read_line(r)?;
        }
    }
    if let Some(len) = header(headers, "content-length") {
        let len: usize = len.parse().ok()?;
        body.resize(len, 0);
        r.read_exact(&mut body).ok()?;
    }
    Some(body)
}

fn serve_http(s: TcpStream, peer: SocketAddr, name: Option<&str>) {
    let Ok(read_half) = s.try_clone() else {
        return;
    };
    let mut r = BufReader::new(read_half);
    let mut w = s;
    loop {
        let Some(line) = read_line(&mut r) else {
            return;
        };
        if line.is_empty() {
            continue;
        }
        let mut parts = line.split(' ');
        let (method, target, version) = (
            parts.next().unwrap_or(""),
            parts.next().unwrap_or("/"),
            parts.next().unwrap_or("HTTP/1.0"),
        );
        let Some(headers) = read_headers(&mut r) else {
            return;
        };
        let Some(body) = read_body(&mut r, &headers) else {
            return;
        };
        let conn = header(&headers, "connection")
            .unwrap_or("")
            .to_ascii_lowercase();
        let keep_alive = if version == "HTTP/1.1" {
            !conn.contains("close")
        } else {
            conn.contains("keep-alive")
        };
        let path = target.split('?').next().unwrap_or("/");
        let mut status = 200u16;
        if let Some(code) = path.strip_prefix("/status/") {
            status = code.parse().unwrap_or(400);
        } else if let Some(ms) = path.strip_prefix("/delay/") {
            let ms: u64 = ms.parse().unwrap_or(0);
            std::thread::sleep(Duration::from_millis(ms.min(60_000)));
        }
        let mut text = String::new();
        if let Some(n) = name {
            text.push_str(&format!("name={n}\n"));
        }
        text.push_str(&format!(
            "peer={peer}\nmethod={method}\npath={target}\nhost={}\nbody-bytes={}\n",
            header(&headers, "host").unwrap_or(""),
            body.len()
        ));
        for (k, v) in &headers {
            text.push_str(&format!("header {}: {v}\n", k.to_ascii_lowercase()));
        }
        let mut resp = format!(
            "HTTP/1.1 {status} {}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n",
            reason(status),
            text.len()
        );
        if let Some(n) = name {
            resp.push_str(&format!("x-testpod-name: {n}\r\n"));
        }
        if !keep_alive {
            resp.push_str("connection: close\r\n");
        }
        resp.push_str("\r\n");
        if method != "HEAD" {
            resp.push_str(&text);
        }
        if w.write_all(resp.as_bytes()).is_err() {
            return;
        }
        if !keep_alive {
            let _ = w.shutdown(Shutdown::Write);
            return;
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

#[allow(clippy::too_many_arguments)]
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    host: Option<String>,
    headers: &[String],
    data: Option<&str>,
    include: bool,
    timeout: Duration,
) -> ExitCode {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nhost: {}\r\n",
        host.unwrap_or_else(|| addr.to_string())
    );
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    let data = data.unwrap_or("");
    if !data.is_empty() || matches!(method, "POST" | "PUT" | "PATCH") {
        req.push_str(&format!("content-length: {}\r\n", data.len()));
    }
    req.push_str("connection: close\r\n\r\n");
    req.push_str(data);
    let resp = match exchange(addr, req.as_bytes(), timeout) {
        Ok(r) => r,
        Err(Failure::Connect(e)) => {
            eprintln!("error: connect {addr}: {e}");
            return ExitCode::from(2);
        }
        Err(Failure::Io(e)) => {
            eprintln!("error: {addr}: {e}");
            return ExitCode::from(3);
        }
    };
    let mut r = BufReader::new(&resp[..]);
    let status = read_line(&mut r).and_then(|l| {
        let mut p = l.split(' ');
        p.next().filter(|v| v.starts_with("HTTP/"))?;
        p.next()?.parse::<u16>().ok()
    });
    let parsed = status.and_then(|s| {
        let h = read_headers(&mut r)?;
        let body = if header(&h, "transfer-encoding").is_some()
            || header(&h, "content-length").is_some()
        {
            read_body(&mut r, &h)?
        } else {
            let mut b = Vec::new();
            r.read_to_end(&mut b).ok()?;
            b
        };
        Some((s, h, body))
    });
    let Some((status, h, body)) = parsed else {
        eprintln!(
            "error: {addr}: malformed response: {:?}",
            String::from_utf8_lossy(&resp)
        );
        return ExitCode::from(3);
    };
    let mut out = format!("status={status}\n");
    if include {
        for (k, v) in &h {
            out.push_str(&format!("< {}: {v}\n", k.to_ascii_lowercase()));
        }
    }
    let mut stdout = std::io::stdout();
    let _ = stdout.write_all(out.as_bytes());
    let _ = stdout.write_all(&body);
    let _ = stdout.flush();
    ExitCode::SUCCESS
}

/// Why one exchange failed.
enum Failure {
    Connect(std::io::Error),
    Io(std::io::Error),
}

/// Connect, send, half-close, read until EOF, all within `timeout`.
fn exchange(addr: SocketAddr, payload: &[u8], timeout: Duration) -> Result<Vec<u8>, Failure> {
    let deadline = Instant::now() + timeout;
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(Failure::Connect)?;
    let _ = s.set_nodelay(true);
    let left = |d: Instant| {
        d.saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    s.set_write_timeout(Some(left(deadline)))
        .map_err(Failure::Io)?;
    s.write_all(payload).map_err(Failure::Io)?;
    s.shutdown(Shutdown::Write).map_err(Failure::Io)?;
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        if Instant::now() >= deadline {
            return Err(Failure::Io(std::io::Error::new(
                ErrorKind::TimedOut,
                format!("no EOF within {timeout:?} (got {} bytes)", out.len()),
            )));
        }
        s.set_read_timeout(Some(left(deadline)))
            .map_err(Failure::Io)?;
        match s.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(Failure::Io(e)),
        }
    }
}

fn call(addr: SocketAddr, send: &str, timeout: Duration) -> ExitCode {
    match exchange(addr, send.as_bytes(), timeout) {
        Ok(resp) => {
            let mut out = std::io::stdout();
            let _ = out.write_all(&resp);
            let _ = out.flush();
            ExitCode::SUCCESS
        }
        Err(Failure::Connect(e)) => {
            eprintln!("error: connect {addr}: {e}");
            ExitCode::from(2)
        }
        Err(Failure::Io(e)) => {
            eprintln!("error: {addr}: {e}");
            ExitCode::from(3)
        }
    }
}

/// Split `name=`/`peer=` header lines off an echo response: (backend name, rest).
fn strip_headers(resp: &str) -> (Option<&str>, &str) {
    let mut name = None;
    let mut rest = resp;
    while let Some((line, after)) = rest.split_once('\n') {
        if let Some(n) = line.strip_prefix("name=") {
            name = Some(n);
        } else if !line.starts_with("peer=") {
            break;
        }
        rest = after;
    }
    (name, rest)
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: writes at most 8 bytes into b.
    let r = unsafe { libc::getrandom(b.as_mut_ptr().cast(), 8, 0) };
    if r == 8 {
        u64::from_le_bytes(b)
    } else {
        Instant::now().elapsed().as_nanos() as u64 ^ u64::from(std::process::id())
    }
}

#[derive(Default)]
struct Summary {
    ok: u64,
    mismatched: u64,
    failed: u64,
    backends: BTreeMap<String, u64>,
    errors: Vec<String>,
}

fn load(
    addr: SocketAddr,
    conns: u64,
    parallel: u64,
    tag: &str,
    timeout: Duration,
    max: Duration,
) -> ExitCode {
    let deadline = Instant::now() + max;
    let next = Arc::new(AtomicU64::new(0));
    let summary = Arc::new(Mutex::new(Summary::default()));
    let mut threads = Vec::new();
    for _ in 0..parallel.min(conns) {
        let (next, summary, tag) = (next.clone(), summary.clone(), tag.to_string());
        threads.push(std::thread::spawn(move || loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= conns {
                return;
            }
            let note_err = |s: &mut Summary, e: String| {
                if s.errors.len() < 10 {
                    s.errors.push(e);
                }
            };
            if Instant::now() >= deadline {
                let mut s = summary.lock().unwrap();
                s.failed += 1;
                note_err(&mut s, format!("#{i}: overall deadline passed"));
                continue;
            }
            let payload = format!("{tag}-{i}-{:016x}", random_u64());
            let r = exchange(addr, payload.as_bytes(), timeout);
            let mut s = summary.lock().unwrap();
            match r {
                Ok(resp) => {
                    let resp = String::from_utf8_lossy(&resp);
                    let (name, body) = strip_headers(&resp);
                    if let Some(n) = name {
                        *s.backends.entry(n.to_string()).or_default() += 1;
                    }
                    if body == payload {
                        s.ok += 1;
                    } else {
                        s.mismatched += 1;
                        note_err(&mut s, format!("#{i}: sent {payload:?}, got {resp:?}"));
                    }
                }
                Err(Failure::Connect(e)) => {
                    s.failed += 1;
                    note_err(&mut s, format!("#{i}: connect: {e}"));
                }
                Err(Failure::Io(e)) => {
                    s.failed += 1;
                    note_err(&mut s, format!("#{i}: {e}"));
                }
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    let s = summary.lock().unwrap();
    let json = serde_json::json!({
        "ok": s.ok,
        "mismatched": s.mismatched,
        "failed": s.failed,
        "backends": s.backends,
        "errors": s.errors,
    });
    println!("{json}");
    if s.ok == conns {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
