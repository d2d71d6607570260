//! `steady`: a steady load held for a fixed time, every failure counted and time-stamped; and
//! `serve --tasks`: the echo server it needs (one tokio task per connection, so tens of
//! thousands of idle connections cost a few MB, not a thread each).
//!
//! Four loads, each off unless asked for, all ending at `--duration-s`:
//!
//! - **held** (`--hold N`): N long-lived connections, opened at `--open-rate` per second and
//!   kept to the end. Each sends a small numbered message every `--hold-min-ms`..`--hold-max-ms`
//!   (uniformly drawn, so the messages spread over time) and checks the echo byte for byte; in
//!   between it watches the socket, so a reset or close while idle is seen when it happens.
//! - **streaming** (`--streams N`): N loops of connections that each live `--stream-life-ms`,
//!   writing a position-dependent byte pattern at `--stream-rate` bytes/s and checking every
//!   echoed byte and the total after a half-close; then the next connection.
//! - **new connections** (`--churn-rate R`): R per second, each connect, 64 B echoed, close.
//! - **HTTP** (`--http ADDR`): `--http-rate` GET/s spread over `--http-conns` keep-alive
//!   HTTP/1.1 connections (HTTP/2 ones with `--http2`, prior knowledge, one stream at a time),
//!   and `--http-new-rate` GET/s each on an HTTP/1.1 connection of its own
//!   (`Connection: close`). A keep-alive connection the server closed between two requests
//!   (`Connection: close`, idle close) is replaced without counting a failure; a request sent
//!   and not answered with a 2xx is a failure.
//!
//! Failures are counted by kind (refused, reset, closed early, time-out, wrong bytes, non-2xx)
//! and the first [`MAX_EVENTS`] are kept with their time since the start (`start_unix_ms` gives
//! the wall clock), so a caller can tell which ones fell into which window. One JSON object is
//! printed at the end; a progress line goes to stderr every `--report-every-s`. Exit 0 iff
//! nothing failed.
//!
//! Both raise their open-file limit to the hard limit (as root, first the hard limit to
//! `fs.nr_open`): 10 000 connections need more descriptors than the usual default.
//!
//! Imports: hyper (client connections), hyper-util, tokio.

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{sleep_until, timeout, MissedTickBehavior};

/// Failure events kept with their time (the counts cover all of them).
const MAX_EVENTS: usize = 500;
/// Bytes written per step of a streaming connection.
const STREAM_CHUNK: usize = 4096;
/// Size of a held connection's message.
const HOLD_MESSAGE: usize = 32;

pub struct Opts {
    pub tcp: Vec<SocketAddr>,
    pub hold: u64,
    pub hold_every: (Duration, Duration),
    pub open_rate: u64,
    pub streams: u64,
    pub stream_life: Duration,
    pub stream_rate: u64,
    pub churn_rate: u64,
    pub http: Option<SocketAddr>,
    pub http_rate: u64,
    pub http_conns: u64,
    /// The keep-alive connections speak HTTP/2 (prior knowledge).
    pub http2: bool,
    pub http_new_rate: u64,
    pub duration: Duration,
    pub timeout: Duration,
    pub report_every: Duration,
}

/// Why an operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Why {
    /// connect() refused (nothing listening).
    Refused,
    /// connect() failed otherwise or timed out.
    ConnectFailed,
    /// The connection was reset.
    Reset,
    /// The peer closed the connection before the work on it was done.
    Closed,
    /// No answer within the time limit.
    Timeout,
    /// The echo differs from what was sent.
    WrongBytes,
    /// An HTTP answer other than 2xx.
    Status,
    /// Another I/O or protocol error.
    Other,
}

impl Why {
    fn name(self) -> &'static str {
        match self {
            Why::Refused => "refused",
            Why::ConnectFailed => "connect_failed",
            Why::Reset => "reset",
            Why::Closed => "closed",
            Why::Timeout => "timeout",
            Why::WrongBytes => "wrong_bytes",
            Why::Status => "status",
            Why::Other => "other",
        }
    }

    fn of_connect(e: &std::io::Error) -> Why {
        match e.kind() {
            ErrorKind::ConnectionRefused => Why::Refused,
            _ => Why::ConnectFailed,
        }
    }

    fn of_io(e: &std::io::Error) -> Why {
        match e.kind() {
            ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => {
                Why::Reset
            }
            ErrorKind::UnexpectedEof => Why::Closed,
            ErrorKind::TimedOut => Why::Timeout,
            _ => Why::Other,
        }
    }
}

/// Which load an event belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Load {
    Hold,
    Stream,
    Churn,
    Http,
    HttpNew,
}

impl Load {
    const ALL: [Load; 5] = [
        Load::Hold,
        Load::Stream,
        Load::Churn,
        Load::Http,
        Load::HttpNew,
    ];

    fn name(self) -> &'static str {
        match self {
            Load::Hold => "hold",
            Load::Stream => "stream",
            Load::Churn => "churn",
            Load::Http => "http",
            Load::HttpNew => "http_new",
        }
    }
}

/// Everything counted, shared by all tasks.
struct Tally {
    started: Instant,
    /// Operations done right, per load: held messages echoed, streaming connections completed,
    /// new connections echoed, HTTP 2xx answers.
    ok: [AtomicU64; 5],
    /// Connections opened, per load.
    opened: [AtomicU64; 5],
    /// Held connections open now.
    holding: AtomicU64,
    /// Held connections that lasted, unbroken, to the end of the run.
    held_to_end: AtomicU64,
    stream_bytes: AtomicU64,
    failures: Mutex<BTreeMap<(Load, Why), u64>>,
    events: Mutex<Vec<serde_json::Value>>,
    /// Microseconds per operation: HTTP requests (both kinds), new connections.
    http_us: Mutex<Vec<u32>>,
    churn_us: Mutex<Vec<u32>>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            started: Instant::now(),
            ok: Default::default(),
            opened: Default::default(),
            holding: AtomicU64::new(0),
            held_to_end: AtomicU64::new(0),
            stream_bytes: AtomicU64::new(0),
            failures: Mutex::new(BTreeMap::new()),
            events: Mutex::new(Vec::new()),
            http_us: Mutex::new(Vec::new()),
            churn_us: Mutex::new(Vec::new()),
        }
    }

    fn ok(&self, l: Load) {
        self.ok[l as usize].fetch_add(1, Ordering::Relaxed);
    }

    fn opened(&self, l: Load) {
        self.opened[l as usize].fetch_add(1, Ordering::Relaxed);
    }

    fn fail(&self, l: Load, why: Why, what: impl std::fmt::Display) {
        *self.failures.lock().unwrap().entry((l, why)).or_default() += 1;
        let mut ev = self.events.lock().unwrap();
        if ev.len() < MAX_EVENTS {
            ev.push(json!({
                "t_ms": self.started.elapsed().as_millis() as u64,
                "load": l.name(),
                "why": why.name(),
                "what": what.to_string(),
            }));
        }
    }

    fn failed(&self, l: Load) -> u64 {
        let f = self.failures.lock().unwrap();
        f.iter().filter(|((k, _), _)| *k == l).map(|(_, n)| n).sum()
    }

    fn elapsed_us(since: Instant) -> u32 {
        since.elapsed().as_micros().min(u32::MAX as u128) as u32
    }
}

/// Raises RLIMIT_NOFILE's soft limit to the hard one; as root first the hard one to
/// `fs.nr_open`. Returns the soft limit in force.
pub fn raise_fd_limit() -> u64 {
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 0;
        }
        if let Some(n) = nr_open.filter(|&n| n > r.rlim_max as u64) {
            let want = libc::rlimit {
                rlim_cur: n as libc::rlim_t,
                rlim_max: n as libc::rlim_t,
            };
            // Fails without CAP_SYS_RESOURCE: the hard limit stays.
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return n;
            }
        }
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur as u64
    }
}

/// A small generator (xorshift64*) per task: no shared state, reproducible per connection.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn between(&mut self, (lo, hi): (Duration, Duration)) -> Duration {
        let span = hi.saturating_sub(lo).as_millis() as u64;
        lo + Duration::from_millis(if span == 0 { 0 } else { self.next() % span })
    }
}

/// The byte at `offset` of a streaming connection: a dropped, repeated or reordered chunk
/// shows (4096 is not a multiple of 251).
fn pattern(offset: u64) -> u8 {
    (offset % 251) as u8
}

async fn connect(addr: SocketAddr, limit: Duration) -> Result<TcpStream, (Why, String)> {
    match timeout(limit, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(e)) => Err((Why::of_connect(&e), format!("connect {addr}: {e}"))),
        // Counted with the connections that could not be opened, not with missing answers.
        Err(_) => Err((Why::ConnectFailed, format!("connect {addr}: timed out"))),
    }
}

/// One held connection, from its open to the end of the run.
async fn hold_one(i: u64, addr: SocketAddr, o: Arc<Opts>, t: Arc<Tally>, end: Instant) {
    let mut s = match connect(addr, o.timeout).await {
        Ok(s) => s,
        Err((why, e)) => return t.fail(Load::Hold, why, format!("held #{i}: {e}")),
    };
    t.opened(Load::Hold);
    t.holding.fetch_add(1, Ordering::Relaxed);
    let mut rng = Rng::new(i + 1);
    let mut idle = [0u8; 64];
    let mut back = [0u8; HOLD_MESSAGE];
    let mut seq = 0u64;
    let broke = loop {
        let at = (Instant::now() + rng.between(o.hold_every)).min(end);
        // Idle until the next message; anything the peer does meanwhile is a failure.
        tokio::select! {
            _ = sleep_until(at.into()) => {}
            r = s.read(&mut idle) => break Some(match r {
                Ok(0) => (Why::Closed, "closed by the peer while idle".to_string()),
                Ok(n) => (Why::WrongBytes, format!("{n} unexpected bytes while idle")),
                Err(e) => (Why::of_io(&e), format!("while idle: {e}")),
            }),
        }
        if at >= end {
            break None;
        }
        seq += 1;
        let msg = format!("{:.<HOLD_MESSAGE$}", format!("hold-{i}-{seq}-"));
        let msg = &msg.as_bytes()[..HOLD_MESSAGE];
        let r = timeout(o.timeout, async {
            s.write_all(msg).await?;
            s.read_exact(&mut back).await
        })
        .await;
        match r {
            Ok(Ok(_)) if back == msg => t.ok(Load::Hold),
            Ok(Ok(_)) => break Some((Why::WrongBytes, "echo differs".to_string())),
            Ok(Err(e)) => break Some((Why::of_io(&e), format!("message {seq}: {e}"))),
            Err(_) => break Some((Why::Timeout, format!("message {seq}: no echo"))),
        }
    };
    t.holding.fetch_sub(1, Ordering::Relaxed);
    match broke {
        Some((why, e)) => t.fail(Load::Hold, why, format!("held #{i}: {e}")),
        None => {
            t.held_to_end.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn hold(o: Arc<Opts>, t: Arc<Tally>, end: Instant) {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / o.open_rate.max(1) as f64));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    for i in 0..o.hold {
        tick.tick().await;
        if Instant::now() >= end {
            break;
        }
        let addr = o.tcp[i as usize % o.tcp.len()];
        tokio::spawn(hold_one(i, addr, o.clone(), t.clone(), end));
    }
}

/// One streaming connection: writes the pattern for `stream_life` at `stream_rate`, half-closes,
/// and checks every echoed byte and the total.
async fn stream_one(addr: SocketAddr, o: &Opts, t: &Tally) -> Result<(), (Why, String)> {
    let s = connect(addr, o.timeout).await?;
    t.opened(Load::Stream);
    let (mut rd, mut wr) = s.into_split();
    let life = o.stream_life;
    let step = Duration::from_secs_f64(STREAM_CHUNK as f64 / o.stream_rate.max(1) as f64);
    let writer = async move {
        let until = Instant::now() + life;
        let mut off = 0u64;
        let mut buf = vec![0u8; STREAM_CHUNK];
        let mut tick = tokio::time::interval(step);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        while Instant::now() < until {
            tick.tick().await;
            for (k, b) in buf.iter_mut().enumerate() {
                *b = pattern(off + k as u64);
            }
            wr.write_all(&buf)
                .await
                .map_err(|e| (Why::of_io(&e), format!("write at {off}: {e}")))?;
            off += STREAM_CHUNK as u64;
        }
        wr.shutdown()
            .await
            .map_err(|e| (Why::of_io(&e), format!("half-close: {e}")))?;
        Ok::<u64, (Why, String)>(off)
    };
    let limit = o.timeout;
    let reader = async move {
        let mut off = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match timeout(limit, rd.read(&mut buf)).await {
                Ok(Ok(n)) => n,
                Ok(Err(e)) => return Err((Why::of_io(&e), format!("read at {off}: {e}"))),
                Err(_) => return Err((Why::Timeout, format!("nothing echoed at {off}"))),
            };
            if n == 0 {
                return Ok(off);
            }
            if let Some(k) = (0..n).find(|&k| buf[k] != pattern(off + k as u64)) {
                return Err((Why::WrongBytes, format!("byte {} differs", off + k as u64)));
            }
            off += n as u64;
        }
    };
    let (sent, got) = tokio::try_join!(writer, reader)?;
    t.stream_bytes.fetch_add(got, Ordering::Relaxed);
    if got != sent {
        return Err((
            Why::Closed,
            format!("sent {sent} bytes, {got} echoed before the close"),
        ));
    }
    Ok(())
}

async fn stream(k: u64, o: Arc<Opts>, t: Arc<Tally>, end: Instant) {
    let mut n = 0u64;
    // A connection that cannot finish before the end is not started.
    while Instant::now() + o.stream_life < end {
        let addr = o.tcp[(k + n) as usize % o.tcp.len()];
        n += 1;
        match stream_one(addr, &o, &t).await {
            Ok(()) => t.ok(Load::Stream),
            Err((why, e)) => {
                t.fail(Load::Stream, why, format!("stream {k}.{n}: {e}"));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn churn_one(i: u64, addr: SocketAddr, o: Arc<Opts>, t: Arc<Tally>) {
    let began = Instant::now();
    let mut s = match connect(addr, o.timeout).await {
        Ok(s) => s,
        Err((why, e)) => return t.fail(Load::Churn, why, format!("new #{i}: {e}")),
    };
    t.opened(Load::Churn);
    let msg: Vec<u8> = (0..64u64).map(|k| pattern(i + k)).collect();
    let mut back = [0u8; 64];
    let r = timeout(o.timeout, async {
        s.write_all(&msg).await?;
        s.read_exact(&mut back).await
    })
    .await;
    match r {
        Ok(Ok(_)) if back[..] == msg[..] => {
            t.churn_us.lock().unwrap().push(Tally::elapsed_us(began));
            t.ok(Load::Churn);
        }
        Ok(Ok(_)) => t.fail(
            Load::Churn,
            Why::WrongBytes,
            format!("new #{i}: echo differs"),
        ),
        Ok(Err(e)) => t.fail(Load::Churn, Why::of_io(&e), format!("new #{i}: {e}")),
        Err(_) => t.fail(Load::Churn, Why::Timeout, format!("new #{i}: no echo")),
    }
}

async fn churn(o: Arc<Opts>, t: Arc<Tally>, end: Instant) {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / o.churn_rate as f64));
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut i = 0u64;
    loop {
        tick.tick().await;
        if Instant::now() >= end {
            break;
        }
        let addr = o.tcp[i as usize % o.tcp.len()];
        tokio::spawn(churn_one(i, addr, o.clone(), t.clone()));
        i += 1;
    }
}

/// A keep-alive connection's request side, HTTP/1.1 or HTTP/2.
enum Sender {
    Http1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

impl Sender {
    /// Ready for a request (`Err`: the connection is gone).
    async fn ready(&mut self) -> hyper::Result<()> {
        match self {
            Sender::Http1(s) => s.ready().await,
            Sender::Http2(s) => s.ready().await,
        }
    }

    async fn send_request(
        &mut self,
        req: Request<Empty<Bytes>>,
    ) -> hyper::Result<hyper::Response<hyper::body::Incoming>> {
        match self {
            Sender::Http1(s) => s.send_request(req).await,
            Sender::Http2(s) => s.send_request(req).await,
        }
    }
}

async fn http_connect(
    addr: SocketAddr,
    http2: bool,
    limit: Duration,
) -> Result<Sender, (Why, String)> {
    let tcp = connect(addr, limit).await?;
    let handshake = |e: hyper::Error| (Why::Other, format!("handshake: {e}"));
    if http2 {
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .map_err(handshake)?;
        tokio::spawn(conn);
        return Ok(Sender::Http2(send));
    }
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(handshake)?;
    tokio::spawn(conn);
    Ok(Sender::Http1(send))
}

fn http_request(addr: SocketAddr, close: bool, http2: bool) -> Request<Empty<Bytes>> {
    let mut b = if http2 {
        Request::get(format!("http://{addr}/steady"))
    } else {
        Request::get("/steady").header(http::header::HOST, addr.to_string())
    };
    if close {
        b = b.header(http::header::CONNECTION, "close");
    }
    b.body(Empty::new()).expect("a static request is valid")
}

/// Sends one request and reads the whole answer: `Ok` for a 2xx.
async fn http_exchange(
    send: &mut Sender,
    addr: SocketAddr,
    close: bool,
    limit: Duration,
) -> Result<(), (Why, String)> {
    let r = timeout(limit, async {
        let resp = send
            .send_request(http_request(addr, close, matches!(send, Sender::Http2(_))))
            .await
            .map_err(|e| (Why::Closed, format!("request: {e}")))?;
        let status = resp.status();
        resp.into_body()
            .collect()
            .await
            .map_err(|e| (Why::Closed, format!("body: {e}")))?;
        if status.is_success() {
            Ok(())
        } else {
            Err((Why::Status, format!("status {status}")))
        }
    })
    .await;
    r.unwrap_or_else(|_| Err((Why::Timeout, "no answer".to_string())))
}

/// One keep-alive connection's share of `--http-rate`, replaced whenever the server closed it
/// between two requests.
async fn http_keepalive(k: u64, addr: SocketAddr, o: Arc<Opts>, t: Arc<Tally>, end: Instant) {
    let per_conn = o.http_rate as f64 / o.http_conns.max(1) as f64;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / per_conn));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Spread the connections' schedules over one period.
    tokio::time::sleep(Duration::from_secs_f64(
        k as f64 / o.http_conns.max(1) as f64 / per_conn,
    ))
    .await;
    let mut sender: Option<Sender> = None;
    let mut i = 0u64;
    loop {
        tick.tick().await;
        if Instant::now() >= end {
            break;
        }
        i += 1;
        let began = Instant::now();
        // A connection closed since the last answer is not a failed request: open another.
        let live = match sender.as_mut() {
            Some(s) => s.ready().await.is_ok(),
            None => false,
        };
        if !live {
            match http_connect(addr, o.http2, o.timeout).await {
                Ok(s) => {
                    t.opened(Load::Http);
                    sender = Some(s);
                }
                Err((why, e)) => {
                    t.fail(Load::Http, why, format!("conn {k} request {i}: {e}"));
                    continue;
                }
            }
        }
        let Some(send) = sender.as_mut() else {
            continue;
        };
        match http_exchange(send, addr, false, o.timeout).await {
            Ok(()) => {
                t.http_us.lock().unwrap().push(Tally::elapsed_us(began));
                t.ok(Load::Http);
            }
            Err((why, e)) => {
                t.fail(Load::Http, why, format!("conn {k} request {i}: {e}"));
                sender = None;
            }
        }
    }
}

async fn http_new_one(i: u64, addr: SocketAddr, o: Arc<Opts>, t: Arc<Tally>) {
    let began = Instant::now();
    let mut send = match http_connect(addr, o.http2, o.timeout).await {
        Ok(s) => s,
        Err((why, e)) => return t.fail(Load::HttpNew, why, format!("request {i}: {e}")),
    };
    t.opened(Load::HttpNew);
    match http_exchange(&mut send, addr, true, o.timeout).await {
        Ok(()) => {
            t.http_us.lock().unwrap().push(Tally::elapsed_us(began));
            t.ok(Load::HttpNew);
        }
        Err((why, e)) => t.fail(Load::HttpNew, why, format!("request {i}: {e}")),
    }
}

async fn http_new(addr: SocketAddr, o: Arc<Opts>, t: Arc<Tally>, end: Instant) {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / o.http_new_rate as f64));
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut i = 0u64;
    loop {
        tick.tick().await;
        if Instant::now() >= end {
            break;
        }
        tokio::spawn(http_new_one(i, addr, o.clone(), t.clone()));
        i += 1;
    }
}

async fn progress(o: Arc<Opts>, t: Arc<Tally>, end: Instant) {
    loop {
        tokio::time::sleep(o.report_every).await;
        if Instant::now() >= end {
            return;
        }
        let counts: Vec<String> = Load::ALL
            .iter()
            .map(|&l| {
                format!(
                    "{} ok={} failed={}",
                    l.name(),
                    t.ok[l as usize].load(Ordering::Relaxed),
                    t.failed(l)
                )
            })
            .collect();
        eprintln!(
            "steady: t={}s holding={} {}",
            t.started.elapsed().as_secs(),
            t.holding.load(Ordering::Relaxed),
            counts.join(" ")
        );
    }
}

/// Nearest-rank percentile in ms.
fn pct_ms(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    (sorted[rank - 1] as f64 / 10.0).round() / 100.0
}

fn latency(v: &Mutex<Vec<u32>>) -> serde_json::Value {
    let mut v = v.lock().unwrap().clone();
    v.sort_unstable();
    json!({
        "samples": v.len(),
        "p50_ms": pct_ms(&v, 0.5),
        "p99_ms": pct_ms(&v, 0.99),
        "p999_ms": pct_ms(&v, 0.999),
        "max_ms": pct_ms(&v, 1.0),
    })
}

async fn steady(o: Arc<Opts>, t: Arc<Tally>) {
    let end = Instant::now() + o.duration;
    let mut tasks = Vec::new();
    if o.hold > 0 {
        tasks.push(tokio::spawn(hold(o.clone(), t.clone(), end)));
    }
    for k in 0..o.streams {
        tasks.push(tokio::spawn(stream(k, o.clone(), t.clone(), end)));
    }
    if o.churn_rate > 0 {
        tasks.push(tokio::spawn(churn(o.clone(), t.clone(), end)));
    }
    if let Some(addr) = o.http {
        if o.http_rate > 0 {
            for k in 0..o.http_conns {
                tasks.push(tokio::spawn(http_keepalive(
                    k,
                    addr,
                    o.clone(),
                    t.clone(),
                    end,
                )));
            }
        }
        if o.http_new_rate > 0 {
            tasks.push(tokio::spawn(http_new(addr, o.clone(), t.clone(), end)));
        }
    }
    let report = tokio::spawn(progress(o.clone(), t.clone(), end));
    for task in tasks {
        let _ = task.await;
    }
    // Held connections and requests started before the end finish within the time limit.
    sleep_until((end + o.timeout + Duration::from_millis(200)).into()).await;
    report.abort();
}

pub fn run(o: Opts) -> ExitCode {
    if (o.hold > 0 || o.streams > 0 || o.churn_rate > 0) && o.tcp.is_empty() {
        eprintln!("--hold, --streams and --churn-rate need --tcp ADDR");
        return ExitCode::from(2);
    }
    let fd_limit = raise_fd_limit();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let start_unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let o = Arc::new(o);
    let t = Arc::new(Tally::new());
    rt.block_on(steady(o.clone(), t.clone()));
    let mut per_load = serde_json::Map::new();
    let failures = t.failures.lock().unwrap().clone();
    let mut total_failed = 0;
    for l in Load::ALL {
        let by_why: serde_json::Map<String, serde_json::Value> = failures
            .iter()
            .filter(|((k, _), _)| *k == l)
            .map(|((_, w), n)| (w.name().to_string(), json!(n)))
            .collect();
        let failed: u64 = by_why.values().filter_map(|v| v.as_u64()).sum();
        total_failed += failed;
        per_load.insert(
            l.name().to_string(),
            json!({
                "ok": t.ok[l as usize].load(Ordering::Relaxed),
                "connections": t.opened[l as usize].load(Ordering::Relaxed),
                "failed": failed,
                "failures": by_why,
            }),
        );
    }
    let summary = json!({
        "start_unix_ms": start_unix_ms,
        "duration_ms": o.duration.as_millis() as u64,
        "fd_limit": fd_limit,
        "held_to_end": t.held_to_end.load(Ordering::Relaxed),
        "stream_bytes": t.stream_bytes.load(Ordering::Relaxed),
        "loads": per_load,
        "failed": total_failed,
        "http_latency": latency(&t.http_us),
        "churn_latency": latency(&t.churn_us),
        "events": *t.events.lock().unwrap(),
    });
    println!("{summary}");
    if total_failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// `serve --mode echo --tasks`: echo on every listener, one tokio task per connection, until
/// the client half-closes (then the echo ends and the connection closes).
pub fn serve_echo(listeners: Vec<std::net::TcpListener>) -> ExitCode {
    raise_fd_limit();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(async move {
        let mut accepts = Vec::new();
        for l in listeners {
            let l = match l
                .set_nonblocking(true)
                .and_then(|_| TcpListener::from_std(l))
            {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("listener: {e}");
                    return ExitCode::from(1);
                }
            };
            accepts.push(tokio::spawn(async move {
                loop {
                    match l.accept().await {
                        Ok((s, _)) => {
                            tokio::spawn(async move {
                                let _ = s.set_nodelay(true);
                                let (mut rd, mut wr) = s.into_split();
                                if tokio::io::copy(&mut rd, &mut wr).await.is_ok() {
                                    let _ = wr.shutdown().await;
                                }
                            });
                        }
                        Err(e) => {
                            // EMFILE and the like: back off instead of spinning.
                            eprintln!("accept: {e}");
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
            }));
        }
        for a in accepts {
            let _ = a.await;
        }
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pattern_shows_a_lost_chunk() {
        let at = |o: u64| pattern(o);
        // A chunk lost at offset 0 makes the next one's bytes arrive where the first's were.
        assert!((0..STREAM_CHUNK as u64).any(|k| at(k) != at(k + STREAM_CHUNK as u64)));
    }

    #[test]
    fn message_times_fall_in_the_range() {
        let mut r = Rng::new(7);
        let range = (Duration::from_secs(10), Duration::from_secs(30));
        for _ in 0..1000 {
            let d = r.between(range);
            assert!(d >= range.0 && d < range.1, "{d:?}");
        }
        assert_eq!(
            r.between((Duration::from_secs(1), Duration::from_secs(1))),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn failures_are_named_by_cause() {
        let e = |k| std::io::Error::new(k, "x");
        assert_eq!(
            Why::of_connect(&e(ErrorKind::ConnectionRefused)),
            Why::Refused
        );
        assert_eq!(
            Why::of_connect(&e(ErrorKind::HostUnreachable)),
            Why::ConnectFailed
        );
        assert_eq!(Why::of_io(&e(ErrorKind::ConnectionReset)), Why::Reset);
        assert_eq!(Why::of_io(&e(ErrorKind::UnexpectedEof)), Why::Closed);
    }
}
