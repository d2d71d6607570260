//! weft-testpod: the workload run inside test pods.
//!
//! - `serve --listen ADDR [--listen ADDR…] [--mode echo|whoami] [--name NAME]`: TCP server.
//!   Each connection gets `name=<NAME>\n` (with `--name`), then `peer=<ip:port>\n` (whoami), then
//!   an echo of everything the client sends until it half-closes.
//!   `--mode http`: HTTP/1.1 and h2c on one port describing each request (see `Mode::Http` and
//!   `http_server`); `--mode https --cert PEM --key PEM`: the same over TLS.
//! - `http ADDR [--method M] [--path P] [-H 'k: v'] [--data D]`: one HTTP request; prints
//!   `status=<code>` and the body.
//! - `http-load ADDR --count N [--http2] [--interval-ms MS]`: N requests over one keep-alive
//!   connection (MS apart); prints one JSON line with counts per status and per backend (see `http_load`).
//! - `ws ADDR --send TEXT`: a WebSocket upgrade, then TEXT echoed back (see `websocket`).
//! - `call ADDR --send TEXT [--timeout-ms N]`: connect, send, half-close, print the response.
//!   Exit 2 on connect failure, 3 on reset/timeout after connecting (error on stderr).
//! - `load ADDR --conns N --parallel P --tag TAG`: N connections (P at a time), each sends
//!   `TAG-<i>-<random>` and checks an echo backend returns exactly it (`name=`/`peer=` header
//!   lines are accepted and counted per backend name). Prints one JSON line
//!   `{"ok":…,"mismatched":…,"failed":…,"backends":{…},"errors":[…]}`; exit 0 iff all ok.
//! - `bench <connect|rr|stream|connect-latency> ADDR --duration-ms N --parallel P --size BYTES`:
//!   a bounded measurement against an echo (`stream`: a discard) server, after a warm-up; prints
//!   one JSON object (counts, rates, latency percentiles in µs, throughput). See `bench`.
//! - `steady --duration-s N [--tcp ADDR…] [--hold N] [--streams N] [--churn-rate R] [--http ADDR
//!   --http-rate R --http-new-rate R]`: a steady load for a fixed time (long-lived connections
//!   with periodic echoes, streaming connections checking their bytes, new connections, HTTP at
//!   a fixed rate), every failure counted by kind and time; one JSON object. `serve --tasks`
//!   is its echo server for many connections. See `steady`.

mod http_load;
mod http_server;
mod steady;
mod websocket;

use clap::{Parser, Subcommand, ValueEnum};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
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
    /// HTTP/1.1 (keep-alive) and HTTP/2 with prior knowledge on the same port: 200 with a text
    /// body `name=…/peer=…/method=…/path=…/host=…/proto=…/body-bytes=…` and one
    /// `header <name>: <value>` line per request header, response header `x-backend: <name>`;
    /// `/status/<code>` answers with that status, `/delay/<ms>` waits first (at most 60 s),
    /// `/delay-on/<name>/<ms>` and `/status-on/<name>/<code>` only on the server of that
    /// name; a
    /// WebSocket upgrade gets 101, then an echo of the raw bytes.
    Http,
    /// `http` over TLS (`--cert`, `--key`; ALPN h2 and http/1.1), with a `sni=` body line.
    Https,
    /// Read and drop everything; when the client half-closes, answer `bytes=<count>\n` and close
    /// (the sink for `bench stream`).
    Discard,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum BenchKind {
    /// New connections: connect, one `--size` echo round trip, close (`--parallel` loops).
    Connect,
    /// Request/response: `--size` bytes echoed back on one persistent connection per `--parallel`.
    Rr,
    /// Bulk send to a discard server (`--parallel` connections); throughput in Gbit/s.
    Stream,
    /// Time of the `connect()` call alone (blocking, fresh socket each time), then close.
    ConnectLatency,
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
        /// Serve with a fixed pool of N threads per listener, each accepting and serving one
        /// connection at a time (no thread creation per connection; for benchmarks). 0: one new
        /// thread per connection.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=1024))]
        workers: u64,
        /// `--mode echo`: one tokio task per connection on one thread (tens of thousands of
        /// long-lived connections; the open-file limit is raised first).
        #[arg(long, conflicts_with = "workers")]
        tasks: bool,
        /// `--mode https`: the certificate chain (PEM).
        #[arg(long, required_if_eq("mode", "https"))]
        cert: Option<PathBuf>,
        /// `--mode https`: the private key (PEM).
        #[arg(long, required_if_eq("mode", "https"))]
        key: Option<PathBuf>,
    },
    /// N HTTP requests over one keep-alive connection; prints one JSON line
    /// `{"ok","failed","connections","statuses":{code:n},"backends":{name:n},"errors":[…]}`.
    /// Exit 0 iff every request was answered (whatever the status).
    HttpLoad {
        addr: SocketAddr,
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=100_000))]
        count: u64,
        #[arg(long, default_value = "GET")]
        method: String,
        /// Request path; `{i}` in it is the request's number (distinct paths).
        #[arg(long, default_value = "/")]
        path: String,
        /// Extra request header `Name: value` (repeatable).
        #[arg(long = "header", short = 'H')]
        headers: Vec<String>,
        /// Host header (`:authority` with --http2) [default: ADDR].
        #[arg(long)]
        host: Option<String>,
        /// HTTP/2 with prior knowledge (h2c) instead of HTTP/1.1.
        #[arg(long)]
        http2: bool,
        /// Per-request time limit.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
        /// Overall time limit.
        #[arg(long, default_value_t = 120)]
        max_secs: u64,
        /// Pause between one answer and the next request [default: none].
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=10_000))]
        interval_ms: u64,
    },
    /// A WebSocket upgrade (HTTP/1.1), then TEXT sent and read back; prints `status=`, the
    /// response headers and `echo=`. Exit 0 iff the 101 is proper and the echo matches; 2 on
    /// connect failure, 3 otherwise.
    Ws {
        addr: SocketAddr,
        #[arg(long, default_value = "/")]
        path: String,
        /// Host header [default: ADDR].
        #[arg(long)]
        host: Option<String>,
        #[arg(long, default_value = "ping")]
        send: String,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
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
    /// A steady load for a fixed time; prints one JSON object. Exit 1 if anything failed.
    Steady {
        /// Echo server for the held, streaming and new connections (repeatable; used in turn).
        #[arg(long)]
        tcp: Vec<SocketAddr>,
        /// Long-lived connections held to the end.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=200_000))]
        hold: u64,
        /// Least time between two messages of a held connection.
        #[arg(long, default_value_t = 10_000)]
        hold_min_ms: u64,
        /// Most time between two messages of a held connection.
        #[arg(long, default_value_t = 30_000)]
        hold_max_ms: u64,
        /// Held connections opened per second.
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=100_000))]
        open_rate: u64,
        /// Streaming connections at a time.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=1000))]
        streams: u64,
        /// Life of one streaming connection.
        #[arg(long, default_value_t = 3000)]
        stream_life_ms: u64,
        /// Bytes per second written on each streaming connection.
        #[arg(long, default_value_t = 262_144, value_parser = clap::value_parser!(u64).range(4096..=1_000_000_000))]
        stream_rate: u64,
        /// New connections per second (connect, 64 B echoed, close).
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=100_000))]
        churn_rate: u64,
        /// HTTP/1.1 server.
        #[arg(long)]
        http: Option<SocketAddr>,
        /// Requests per second over the keep-alive connections.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=100_000))]
        http_rate: u64,
        /// Keep-alive connections carrying `--http-rate`.
        #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=10_000))]
        http_conns: u64,
        /// The keep-alive connections speak HTTP/2 (prior knowledge), one request at a time.
        #[arg(long)]
        http2: bool,
        /// Requests per second each on a new connection.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=100_000))]
        http_new_rate: u64,
        /// How long the load runs.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=86_400))]
        duration_s: u64,
        /// Time limit of one connect, echo or request.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
        /// Progress line on stderr every this many seconds.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
        report_every_s: u64,
    },
    /// A bounded measurement; prints one JSON object. Exit 1 if any operation failed.
    Bench {
        #[arg(value_enum)]
        kind: BenchKind,
        addr: SocketAddr,
        /// Measured time (after the warm-up).
        #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
        duration_ms: u64,
        /// Same work, not measured, before the measured time.
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(0..=60_000))]
        warmup_ms: u64,
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=256))]
        parallel: u64,
        /// Request (= response) size for connect/rr; write size for stream.
        #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=16 << 20))]
        size: u64,
        /// Upper bound on measured operations (stream: writes) over all workers.
        #[arg(long, default_value_t = 10_000_000, value_parser = clap::value_parser!(u64).range(1..))]
        max_ops: u64,
        /// Per-operation I/O time limit.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
        /// Pace each worker to at most this many operations per second (0: as fast as it can).
        /// Latency under light load rather than at saturation.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
        rate: u64,
    },
}

fn main() -> ExitCode {
    match Cli::parse().cmd {
        Cmd::Serve {
            listen,
            mode,
            name,
            workers,
            tasks,
            cert,
            key,
        } => {
            if tasks {
                return serve_tasks(listen, mode);
            }
            serve(listen, mode, name, workers, cert.zip(key))
        }
        Cmd::Steady {
            tcp,
            hold,
            hold_min_ms,
            hold_max_ms,
            open_rate,
            streams,
            stream_life_ms,
            stream_rate,
            churn_rate,
            http,
            http_rate,
            http_conns,
            http2,
            http_new_rate,
            duration_s,
            timeout_ms,
            report_every_s,
        } => steady::run(steady::Opts {
            tcp,
            hold,
            hold_every: (
                Duration::from_millis(hold_min_ms),
                Duration::from_millis(hold_max_ms.max(hold_min_ms)),
            ),
            open_rate,
            streams,
            stream_life: Duration::from_millis(stream_life_ms),
            stream_rate,
            churn_rate,
            http,
            http_rate,
            http_conns,
            http2,
            http_new_rate,
            duration: Duration::from_secs(duration_s),
            timeout: Duration::from_millis(timeout_ms),
            report_every: Duration::from_secs(report_every_s),
        }),
        Cmd::HttpLoad {
            addr,
            count,
            method,
            path,
            headers,
            host,
            http2,
            timeout_ms,
            max_secs,
            interval_ms,
        } => http_load::run(http_load::Opts {
            addr,
            count,
            method,
            path,
            headers,
            host,
            http2,
            timeout: Duration::from_millis(timeout_ms),
            max: Duration::from_secs(max_secs),
            interval: Duration::from_millis(interval_ms),
        }),
        Cmd::Ws {
            addr,
            path,
            host,
            send,
            timeout_ms,
        } => websocket::client(
            addr,
            &path,
            host.as_deref(),
            &send,
            Duration::from_millis(timeout_ms),
        ),
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
        Cmd::Bench {
            kind,
            addr,
            duration_ms,
            warmup_ms,
            parallel,
            size,
            max_ops,
            timeout_ms,
            rate,
        } => bench::run(
            kind,
            addr,
            &bench::Opts {
                duration: Duration::from_millis(duration_ms),
                warmup: Duration::from_millis(warmup_ms),
                parallel: parallel as usize,
                size: size as usize,
                max_ops,
                timeout: Duration::from_millis(timeout_ms),
                interval: (rate > 0).then(|| Duration::from_nanos(1_000_000_000 / rate)),
            },
        ),
    }
}

/// `serve --tasks`: the echo server of `steady` (see there).
fn serve_tasks(listen: Vec<SocketAddr>, mode: Mode) -> ExitCode {
    if mode != Mode::Echo {
        eprintln!("--tasks serves --mode echo only");
        return ExitCode::from(2);
    }
    let mut listeners = Vec::new();
    for addr in &listen {
        match TcpListener::bind(addr) {
            Ok(l) => {
                println!("listening on {addr}");
                listeners.push(l);
            }
            Err(e) => {
                eprintln!("bind {addr}: {e}");
                return ExitCode::from(1);
            }
        }
    }
    let _ = std::io::stdout().flush();
    steady::serve_echo(listeners)
}

fn serve(
    listen: Vec<SocketAddr>,
    mode: Mode,
    name: Option<String>,
    workers: u64,
    tls: Option<(PathBuf, PathBuf)>,
) -> ExitCode {
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
    match mode {
        Mode::Http => return http_server::run(listeners, name, None),
        Mode::Https => {
            let Some((cert, key)) = &tls else {
                eprintln!("--mode https needs --cert and --key");
                return ExitCode::from(1);
            };
            return http_server::run(listeners, name, Some((cert, key)));
        }
        Mode::Echo | Mode::Whoami | Mode::Discard => {}
    }
    let name = Arc::new(name);
    let mut threads = Vec::new();
    for l in listeners {
        if workers > 0 {
            for _ in 0..workers {
                let Ok(l) = l.try_clone() else {
                    eprintln!("cloning the listener failed");
                    return ExitCode::from(1);
                };
                let name = name.clone();
                threads.push(std::thread::spawn(move || loop {
                    match l.accept() {
                        Ok((s, peer)) => handle(s, peer, mode, name.as_deref()),
                        Err(e) => {
                            eprintln!("accept: {e}");
                            std::thread::sleep(Duration::from_millis(10));
                        }
                    }
                }));
            }
            continue;
        }
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
    if mode == Mode::Discard {
        discard(s);
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

/// Read and count until end of stream, then answer `bytes=<count>\n` and close.
fn discard(mut s: TcpStream) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
    }
    let _ = s.write_all(format!("bytes={total}\n").as_bytes());
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

/// `weft-testpod bench`: bounded client-side measurements, one JSON object on stdout.
///
/// Every worker starts at a common instant, does the same work unmeasured for `--warmup-ms`,
/// then measured for `--duration-ms` (operations *started* in that window count). Latencies are
/// per operation, taken with the monotonic clock around it; rates divide measured operations by
/// the measured window (until the last measured operation finished).
mod bench {
    use super::BenchKind;
    use clap::ValueEnum;
    use std::io::{ErrorKind, Read, Write};
    use std::net::{Shutdown, SocketAddr, TcpStream};
    use std::process::ExitCode;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    pub struct Opts {
        pub duration: Duration,
        pub warmup: Duration,
        pub parallel: usize,
        pub size: usize,
        pub max_ops: u64,
        pub timeout: Duration,
        /// Least time between the starts of two operations of one worker.
        pub interval: Option<Duration>,
    }

    /// The common schedule of all workers.
    #[derive(Clone, Copy)]
    struct Clock {
        start: Instant,
        measure_from: Instant,
        end: Instant,
    }

    /// What one worker saw.
    #[derive(Default)]
    struct Part {
        ops: u64,
        warmup_ops: u64,
        errors: u64,
        error_samples: Vec<String>,
        /// Nanoseconds per measured operation.
        samples: Vec<u64>,
        bytes: u64,
        warmup_bytes: u64,
        /// When this worker's last measured operation finished.
        last: Option<Instant>,
    }

    impl Part {
        fn error(&mut self, e: impl std::fmt::Display) {
            self.errors += 1;
            if self.error_samples.len() < 5 {
                self.error_samples.push(e.to_string());
            }
        }

        fn done(&mut self, began: Instant, clock: &Clock) {
            let now = Instant::now();
            if began >= clock.measure_from {
                self.ops += 1;
                self.samples.push((now - began).as_nanos() as u64);
                self.last = Some(now);
            } else {
                self.warmup_ops += 1;
            }
        }
    }

    /// Request bytes: a fixed binary pattern (never mistaken for HTTP by a sniffing proxy).
    fn payload(size: usize) -> Vec<u8> {
        (0..size).map(|i| ((i * 7 + 3) % 251) as u8).collect()
    }

    /// Whether a worker may start another operation now (`Some(measured)`), or must stop.
    /// With pacing, waits for the worker's next slot first.
    fn next(clock: &Clock, budget: &AtomicU64, pace: &mut Pace) -> Option<bool> {
        if let Some(iv) = pace.interval {
            let slot = pace.next.unwrap_or_else(Instant::now);
            sleep_until(slot);
            // A late slot is not made up for: no bursts after a stall.
            pace.next = Some(slot.max(Instant::now() - iv) + iv);
        }
        let now = Instant::now();
        if now >= clock.end {
            return None;
        }
        let measured = now >= clock.measure_from;
        if measured
            && budget
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(1))
                .is_err()
        {
            return None;
        }
        Some(measured)
    }

    /// One worker's pacing state.
    struct Pace {
        interval: Option<Duration>,
        next: Option<Instant>,
    }

    impl Pace {
        fn new(o: &Opts) -> Pace {
            Pace {
                interval: o.interval,
                next: None,
            }
        }
    }

    fn sleep_until(t: Instant) {
        let now = Instant::now();
        if t > now {
            std::thread::sleep(t - now);
        }
    }

    fn connect(addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
        let s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        Ok(s)
    }

    /// One echo round trip on `s`.
    fn round_trip(s: &mut TcpStream, req: &[u8], buf: &mut [u8]) -> std::io::Result<()> {
        s.write_all(req)?;
        s.read_exact(buf)?;
        if buf != req {
            return Err(std::io::Error::new(
                ErrorKind::InvalidData,
                "echo differs from the request",
            ));
        }
        Ok(())
    }

    fn worker_connect(addr: SocketAddr, o: &Opts, clock: Clock, budget: &AtomicU64) -> Part {
        let mut p = Part::default();
        let req = payload(o.size);
        let mut buf = vec![0u8; o.size];
        sleep_until(clock.start);
        let mut pace = Pace::new(o);
        while next(&clock, budget, &mut pace).is_some() {
            let began = Instant::now();
            let r = connect(addr, o.timeout).and_then(|mut s| round_trip(&mut s, &req, &mut buf));
            match r {
                Ok(()) => p.done(began, &clock),
                Err(e) => {
                    p.error(format!("connect+rr: {e}"));
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        p
    }

    fn worker_rr(addr: SocketAddr, o: &Opts, clock: Clock, budget: &AtomicU64) -> Part {
        let mut p = Part::default();
        let req = payload(o.size);
        let mut buf = vec![0u8; o.size];
        let mut s = match connect(addr, o.timeout) {
            Ok(s) => s,
            Err(e) => {
                p.error(format!("connect: {e}"));
                return p;
            }
        };
        sleep_until(clock.start);
        let mut pace = Pace::new(o);
        while next(&clock, budget, &mut pace).is_some() {
            let began = Instant::now();
            match round_trip(&mut s, &req, &mut buf) {
                Ok(()) => p.done(began, &clock),
                Err(e) => {
                    p.error(format!("rr: {e}"));
                    break;
                }
            }
        }
        p
    }

    fn worker_stream(addr: SocketAddr, o: &Opts, clock: Clock, budget: &AtomicU64) -> Part {
        let mut p = Part::default();
        let chunk = payload(o.size);
        let mut s = match connect(addr, o.timeout) {
            Ok(s) => s,
            Err(e) => {
                p.error(format!("connect: {e}"));
                return p;
            }
        };
        sleep_until(clock.start);
        let mut pace = Pace::new(o);
        while let Some(measured) = next(&clock, budget, &mut pace) {
            if let Err(e) = s.write_all(&chunk) {
                p.error(format!("write: {e}"));
                return p;
            }
            if measured {
                p.bytes += chunk.len() as u64;
                p.ops += 1;
            } else {
                p.warmup_bytes += chunk.len() as u64;
            }
        }
        // The window ends when the server confirms it has received everything.
        let mut resp = String::new();
        let r = s
            .shutdown(Shutdown::Write)
            .and_then(|_| s.read_to_string(&mut resp));
        p.last = Some(Instant::now());
        if let Err(e) = r {
            p.error(format!("waiting for the discard count: {e}"));
            return p;
        }
        let sent = p.bytes + p.warmup_bytes;
        let got = resp
            .trim()
            .strip_prefix("bytes=")
            .and_then(|n| n.parse::<u64>().ok());
        if got != Some(sent) {
            p.error(format!("sent {sent} bytes, server answered {resp:?}"));
        }
        p
    }

    /// The address as a C sockaddr for a raw `connect(2)`.
    fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
        // SAFETY: all-zero is a valid sockaddr_storage.
        let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let len = match addr {
            SocketAddr::V4(a) => {
                // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in.
                let sin = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in) };
                sin.sin_family = libc::AF_INET as libc::sa_family_t;
                sin.sin_port = a.port().to_be();
                sin.sin_addr.s_addr = u32::from(*a.ip()).to_be();
                std::mem::size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(a) => {
                // SAFETY: as above, for sockaddr_in6.
                let sin6 = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in6) };
                sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                sin6.sin6_port = a.port().to_be();
                sin6.sin6_addr.s6_addr = a.ip().octets();
                sin6.sin6_scope_id = a.scope_id();
                std::mem::size_of::<libc::sockaddr_in6>()
            }
        };
        (ss, len as libc::socklen_t)
    }

    /// Times `connect(2)` alone: the socket is made before the clock starts, closed after.
    fn worker_connect_latency(
        addr: SocketAddr,
        o: &Opts,
        clock: Clock,
        budget: &AtomicU64,
    ) -> Part {
        let mut p = Part::default();
        let (sa, len) = sockaddr(addr);
        let family = if addr.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        sleep_until(clock.start);
        let mut pace = Pace::new(o);
        while next(&clock, budget, &mut pace).is_some() {
            // SAFETY: plain socket(2).
            let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
            if fd < 0 {
                p.error(format!("socket: {}", std::io::Error::last_os_error()));
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            let began = Instant::now();
            // SAFETY: sa/len describe a valid sockaddr for this family.
            let r = unsafe { libc::connect(fd, &sa as *const _ as *const libc::sockaddr, len) };
            if r == 0 {
                p.done(began, &clock);
            } else {
                p.error(format!("connect: {}", std::io::Error::last_os_error()));
            }
            // SAFETY: fd is ours.
            unsafe { libc::close(fd) };
            if r != 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        p
    }

    /// Nearest-rank percentile of sorted samples, in µs.
    fn pct(sorted: &[u64], q: f64) -> f64 {
        if sorted.is_empty() {
            return 0.0;
        }
        let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        sorted[rank - 1] as f64 / 1000.0
    }

    fn round(x: f64, digits: i32) -> f64 {
        let m = 10f64.powi(digits);
        (x * m).round() / m
    }

    pub fn run(kind: BenchKind, addr: SocketAddr, o: &Opts) -> ExitCode {
        let start = Instant::now() + Duration::from_millis(20);
        let clock = Clock {
            start,
            measure_from: start + o.warmup,
            end: start + o.warmup + o.duration,
        };
        let budget = Arc::new(AtomicU64::new(o.max_ops));
        let worker = match kind {
            BenchKind::Connect => worker_connect,
            BenchKind::Rr => worker_rr,
            BenchKind::Stream => worker_stream,
            BenchKind::ConnectLatency => worker_connect_latency,
        };
        let parts: Vec<Part> = std::thread::scope(|sc| {
            let handles: Vec<_> = (0..o.parallel)
                .map(|_| {
                    let budget = budget.clone();
                    sc.spawn(move || worker(addr, o, clock, &budget))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_default())
                .collect()
        });
        let mut all = Part::default();
        for p in parts {
            all.ops += p.ops;
            all.warmup_ops += p.warmup_ops;
            all.errors += p.errors;
            for e in p.error_samples {
                if all.error_samples.len() < 5 {
                    all.error_samples.push(e);
                }
            }
            all.samples.extend(p.samples);
            all.bytes += p.bytes;
            all.warmup_bytes += p.warmup_bytes;
            all.last = all.last.max(p.last);
        }
        let window = all
            .last
            .map(|l| l.max(clock.end) - clock.measure_from)
            .unwrap_or(o.duration)
            .as_secs_f64();
        let mut json = serde_json::json!({
            "kind": kind.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default(),
            "addr": addr.to_string(),
            "parallel": o.parallel,
            "size": o.size,
            "warmup_ms": o.warmup.as_millis() as u64,
            "duration_ms": o.duration.as_millis() as u64,
            "window_ms": round(window * 1000.0, 1),
            "ops": all.ops,
            "warmup_ops": all.warmup_ops,
            "errors": all.errors,
            "error_samples": all.error_samples,
            "rate": round(all.ops as f64 / window, 1),
        });
        if kind == BenchKind::Stream {
            json["bytes"] = all.bytes.into();
            json["warmup_bytes"] = all.warmup_bytes.into();
            json["gbit_s"] = round(all.bytes as f64 * 8.0 / window / 1e9, 3).into();
        } else {
            let s = &mut all.samples;
            s.sort_unstable();
            let mean = if s.is_empty() {
                0.0
            } else {
                s.iter().sum::<u64>() as f64 / s.len() as f64 / 1000.0
            };
            json["latency_us"] = serde_json::json!({
                "samples": s.len(),
                "mean": round(mean, 2),
                "p50": round(pct(s, 0.50), 2),
                "p90": round(pct(s, 0.90), 2),
                "p99": round(pct(s, 0.99), 2),
                "p999": round(pct(s, 0.999), 2),
                "max": round(pct(s, 1.0), 2),
            });
        }
        println!("{json}");
        if all.errors == 0 && all.ops > 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        }
    }
}
