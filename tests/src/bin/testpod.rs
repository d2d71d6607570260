//! weft-testpod: the workload run inside test pods.
//!
//! - `serve --listen ADDR [--listen ADDR…] [--mode echo|whoami] [--name NAME]`: TCP server.
//!   Each connection gets `name=<NAME>\n` (with `--name`), then `peer=<ip:port>\n` (whoami), then
//!   an echo of everything the client sends until it half-closes.
//! - `call ADDR --send TEXT [--timeout-ms N]`: connect, send, half-close, print the response.
//!   Exit 2 on connect failure, 3 on reset/timeout after connecting (error on stderr).
//! - `load ADDR --conns N --parallel P --tag TAG`: N connections (P at a time), each sends
//!   `TAG-<i>-<random>` and checks an echo backend returns exactly it (`name=`/`peer=` header
//!   lines are accepted and counted per backend name). Prints one JSON line
//!   `{"ok":…,"mismatched":…,"failed":…,"backends":{…},"errors":[…]}`; exit 0 iff all ok.

use clap::{Parser, Subcommand, ValueEnum};
use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
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
