//! `http-load ADDR --count N`: N requests one after another over one keep-alive connection
//! (HTTP/1.1, or HTTP/2 with prior knowledge), counted by status and by the backend that
//! answered. A proxy that balances per connection sends them all to one backend; one that
//! balances per request spreads them — which is what the L7 tests measure.
//!
//! A broken connection is noted and replaced (counted in `connections`), so one refusal does not
//! hide the rest. Bounded by `--max-secs` overall and `--timeout-ms` per request.
//!
//! Imports: hyper (client connections), hyper-util, tokio.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use tokio::net::TcpStream;

pub struct Opts {
    pub addr: SocketAddr,
    pub count: u64,
    pub method: String,
    pub path: String,
    /// `Name: value` lines.
    pub headers: Vec<String>,
    /// The Host header (HTTP/1.1) or `:authority` (HTTP/2); default ADDR.
    pub host: Option<String>,
    pub http2: bool,
    pub timeout: Duration,
    pub max: Duration,
    /// Pause between one answer and the next request.
    pub interval: Duration,
}

/// The one JSON line printed.
#[derive(Serialize, Default, Debug, PartialEq)]
pub struct Summary {
    /// Requests answered (any status).
    pub ok: u64,
    /// Requests without an answer (connect failure, reset, timeout, deadline).
    pub failed: u64,
    /// Connections opened (1 when keep-alive held throughout).
    pub connections: u64,
    pub statuses: BTreeMap<String, u64>,
    /// By `x-backend` response header, else the body's `name=` line.
    pub backends: BTreeMap<String, u64>,
    /// The first few errors.
    pub errors: Vec<String>,
}

impl Summary {
    fn error(&mut self, e: String) {
        self.failed += 1;
        if self.errors.len() < 10 {
            self.errors.push(e);
        }
    }
}

/// `Name: value` → a header; the name is checked by `http`.
pub fn parse_header(line: &str) -> Result<(HeaderName, HeaderValue), String> {
    let (k, v) = line
        .split_once(':')
        .ok_or_else(|| format!("header {line:?}: expected `Name: value`"))?;
    let name = HeaderName::from_bytes(k.trim().as_bytes())
        .map_err(|e| format!("header name {k:?}: {e}"))?;
    let value = HeaderValue::from_str(v.trim()).map_err(|e| format!("header {k:?}: {e}"))?;
    Ok((name, value))
}

/// Which backend answered: the `x-backend` header, else a `name=` line of the body.
pub fn backend_of(header: Option<&HeaderValue>, body: &[u8]) -> Option<String> {
    if let Some(v) = header.and_then(|v| v.to_str().ok()) {
        return Some(v.to_string());
    }
    String::from_utf8_lossy(body)
        .lines()
        .find_map(|l| l.strip_prefix("name="))
        .map(str::to_string)
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

async fn connect(o: &Opts) -> Result<Sender, String> {
    let tcp = tokio::time::timeout(o.timeout, TcpStream::connect(o.addr))
        .await
        .map_err(|_| format!("connect {}: timed out", o.addr))?
        .map_err(|e| format!("connect {}: {e}", o.addr))?;
    let _ = tcp.set_nodelay(true);
    let io = TokioIo::new(tcp);
    if o.http2 {
        let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| format!("h2 handshake: {e}"))?;
        tokio::spawn(conn);
        Ok(Sender::H2(send))
    } else {
        let (send, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        Ok(Sender::H1(send))
    }
}

/// Request `i` of the run: `{i}` in the path is its number (distinct paths).
fn request(
    o: &Opts,
    headers: &[(HeaderName, HeaderValue)],
    i: u64,
) -> Result<Request<Empty<Bytes>>, String> {
    let path = o.path.replace("{i}", &i.to_string());
    let method = Method::from_bytes(o.method.as_bytes()).map_err(|e| format!("method: {e}"))?;
    let authority = o.host.clone().unwrap_or_else(|| o.addr.to_string());
    // HTTP/2 takes `:authority` from the URI; HTTP/1.1 sends the URI as the request target.
    let uri = if o.http2 {
        format!("http://{authority}{path}")
    } else {
        path
    };
    let mut b = Request::builder().method(method).uri(uri);
    if !o.http2 {
        b = b.header(http::header::HOST, authority);
    }
    for (k, v) in headers {
        b = b.header(k, v);
    }
    b.body(Empty::new()).map_err(|e| format!("request: {e}"))
}

async fn one(send: &mut Sender, req: Request<Empty<Bytes>>, s: &mut Summary) -> Result<(), String> {
    let resp = match send {
        Sender::H1(h) => {
            h.ready().await.map_err(|e| format!("connection: {e}"))?;
            h.send_request(req).await
        }
        Sender::H2(h) => {
            h.ready().await.map_err(|e| format!("connection: {e}"))?;
            h.send_request(req).await
        }
    }
    .map_err(|e| format!("request: {e}"))?;
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    s.ok += 1;
    *s.statuses
        .entry(parts.status.as_u16().to_string())
        .or_default() += 1;
    if let Some(b) = backend_of(parts.headers.get("x-backend"), &body) {
        *s.backends.entry(b).or_default() += 1;
    }
    Ok(())
}

async fn load(o: &Opts) -> Summary {
    let mut s = Summary::default();
    let headers: Vec<_> = match o.headers.iter().map(|h| parse_header(h)).collect() {
        Ok(h) => h,
        Err(e) => {
            s.error(e);
            s.failed = o.count;
            return s;
        }
    };
    let deadline = Instant::now() + o.max;
    let mut sender: Option<Sender> = None;
    for i in 0..o.count {
        if i > 0 && !o.interval.is_zero() {
            tokio::time::sleep(o.interval).await;
        }
        if Instant::now() >= deadline {
            s.error(format!("#{i}: overall deadline passed"));
            s.failed = o.count - s.ok;
            break;
        }
        let req = match request(o, &headers, i) {
            Ok(r) => r,
            Err(e) => {
                s.error(e);
                continue;
            }
        };
        if sender.is_none() {
            s.connections += 1;
            match connect(o).await {
                Ok(c) => sender = Some(c),
                Err(e) => {
                    s.error(format!("#{i}: {e}"));
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            }
        }
        let Some(send) = sender.as_mut() else {
            continue;
        };
        let r = tokio::time::timeout(o.timeout, one(send, req, &mut s)).await;
        let err = match r {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e,
            Err(_) => format!("no answer within {:?}", o.timeout),
        };
        s.error(format!("#{i}: {err}"));
        sender = None;
    }
    s
}

pub fn run(o: Opts) -> ExitCode {
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
    let s = rt.block_on(load(&o));
    println!(
        "{}",
        serde_json::to_string(&s).expect("a summary always serializes")
    );
    if s.ok == o.count {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_parse_and_refuse_nonsense() {
        let (k, v) = parse_header("X-User:  jason ").unwrap();
        assert_eq!((k.as_str(), v.to_str().unwrap()), ("x-user", "jason"));
        assert!(parse_header("no colon").is_err());
        assert!(parse_header("bad name: v").is_err());
    }

    #[test]
    fn the_backend_comes_from_the_header_first() {
        let v = HeaderValue::from_static("reviews-v2");
        assert_eq!(
            backend_of(Some(&v), b"name=other\n").as_deref(),
            Some("reviews-v2")
        );
        assert_eq!(
            backend_of(None, b"peer=1.2.3.4:5\nname=reviews-v1\n").as_deref(),
            Some("reviews-v1")
        );
        assert_eq!(backend_of(None, b"RBAC: access denied"), None);
    }

    #[test]
    fn http2_requests_carry_the_authority_in_the_uri() {
        let mut o = Opts {
            addr: "10.96.0.10:9080".parse().unwrap(),
            count: 1,
            method: "GET".into(),
            path: "/p?q=1".into(),
            headers: vec![],
            host: Some("reviews".into()),
            http2: true,
            timeout: Duration::from_secs(1),
            max: Duration::from_secs(1),
            interval: Duration::ZERO,
        };
        let r = request(&o, &[], 0).unwrap();
        assert_eq!(r.uri().to_string(), "http://reviews/p?q=1");
        assert!(r.headers().get("host").is_none());
        o.http2 = false;
        o.host = None;
        let r = request(&o, &[], 0).unwrap();
        assert_eq!(r.uri().to_string(), "/p?q=1");
        assert_eq!(r.headers()["host"], "10.96.0.10:9080");
    }
}
