//! `serve --mode http|https`: an HTTP server that tells the client what it received.
//!
//! HTTP/1.1 and HTTP/2 with prior knowledge (h2c) on the same port (hyper's auto builder tells
//! them apart by the connection preface); `https` is the same behind TLS (ALPN `h2`,
//! `http/1.1`) and adds the server name the client sent. A WebSocket upgrade is answered with
//! `101` and then an echo of the raw bytes. Everything the L7 tests assert about what a backend
//! saw comes from the body this writes (see [`describe`]).
//!
//! Imports: hyper, hyper-util, tokio, tokio-rustls, and [`crate::websocket`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::Frame;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::websocket;

/// The largest request body read (and counted); a larger one gets 413.
const MAX_BODY: usize = 16 << 20;
/// The longest `/delay/<ms>`.
const MAX_DELAY: Duration = Duration::from_secs(60);

/// What one connection knows besides the request.
struct Conn {
    name: Option<String>,
    peer: SocketAddr,
    /// `Some` on a TLS connection: the SNI the client sent (empty when it sent none).
    sni: Option<String>,
}

/// What the path asks the server to do before answering.
#[derive(Debug, PartialEq, Eq)]
pub enum PathAction {
    /// Answer 200.
    Answer,
    /// `/status/<code>`: answer with that status (a code that is not one: 400).
    Status(u16),
    /// `/status-on/<name>/<code>`: the same on the server named `<name>`; any other answers
    /// 200 (one endpoint of several failing).
    StatusOn(String, u16),
    /// `/delay/<ms>`: wait (at most [`MAX_DELAY`]), then answer 200.
    Delay(Duration),
    /// `/delay-on/<name>/<ms>`: the same on the server named `<name>`; any other answers at
    /// once (one endpoint of several held busy).
    DelayOn(String, Duration),
    /// `/drip/<ms>`: answer 200 at once, send the body after the wait (at most [`MAX_DELAY`]).
    Drip(Duration),
    /// `/fail-first/<n>/<key>`: answer 503 to the first `n` requests for `key` this server
    /// sees, 200 after (a backend that recovers, for retries).
    FailFirst(u32, String),
}

/// The action for a request path (without the query).
pub fn path_action(path: &str) -> PathAction {
    if let Some(code) = path.strip_prefix("/status/") {
        let code = code
            .parse::<u16>()
            .ok()
            .filter(|c| StatusCode::from_u16(*c).is_ok())
            .unwrap_or(400);
        return PathAction::Status(code);
    }
    if let Some(ms) = path.strip_prefix("/delay/") {
        let ms = ms.parse::<u64>().unwrap_or(0);
        return PathAction::Delay(Duration::from_millis(ms).min(MAX_DELAY));
    }
    if let Some(rest) = path.strip_prefix("/status-on/") {
        let (name, code) = rest.split_once('/').unwrap_or((rest, ""));
        let code = code
            .parse::<u16>()
            .ok()
            .filter(|c| StatusCode::from_u16(*c).is_ok())
            .unwrap_or(400);
        return PathAction::StatusOn(name.to_string(), code);
    }
    if let Some(rest) = path.strip_prefix("/delay-on/") {
        let (name, ms) = rest.split_once('/').unwrap_or((rest, ""));
        let ms = ms.parse::<u64>().unwrap_or(0);
        return PathAction::DelayOn(name.to_string(), Duration::from_millis(ms).min(MAX_DELAY));
    }
    if let Some(rest) = path.strip_prefix("/fail-first/") {
        let (n, key) = rest.split_once('/').unwrap_or((rest, ""));
        return PathAction::FailFirst(n.parse().unwrap_or(0), key.to_string());
    }
    if let Some(ms) = path.strip_prefix("/drip/") {
        let ms = ms.parse::<u64>().unwrap_or(0);
        return PathAction::Drip(Duration::from_millis(ms).min(MAX_DELAY));
    }
    PathAction::Answer
}

/// `HTTP/1.1`, `HTTP/2`, …, as the body's `proto=` line says it.
pub fn proto_name(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/?",
    }
}

/// The request as seen, one fact a line: the response body.
pub struct Seen<'a> {
    pub name: Option<&'a str>,
    pub peer: SocketAddr,
    pub method: &'a str,
    /// Path and query as received.
    pub path: &'a str,
    /// The Host header, else the HTTP/2 `:authority`.
    pub host: &'a str,
    pub version: Version,
    pub sni: Option<&'a str>,
    pub body_bytes: usize,
    pub headers: &'a HeaderMap,
}

/// `name=`, `peer=`, `method=`, `path=`, `host=`, `proto=`, `sni=` (TLS only), `body-bytes=`,
/// then `header <name>: <value>` per request header, in the order received.
pub fn describe(s: &Seen<'_>) -> String {
    let mut text = String::new();
    if let Some(n) = s.name {
        text.push_str(&format!("name={n}\n"));
    }
    text.push_str(&format!(
        "peer={}\nmethod={}\npath={}\nhost={}\nproto={}\n",
        s.peer,
        s.method,
        s.path,
        s.host,
        proto_name(s.version)
    ));
    if let Some(sni) = s.sni {
        text.push_str(&format!("sni={sni}\n"));
    }
    text.push_str(&format!("body-bytes={}\n", s.body_bytes));
    for (k, v) in s.headers {
        text.push_str(&format!(
            "header {}: {}\n",
            k.as_str(),
            String::from_utf8_lossy(v.as_bytes())
        ));
    }
    text
}

/// TLS server configuration from PEM files (the chain, then the key), ALPN h2 and http/1.1.
fn tls_config(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use anyhow::Context;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing {}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("{}", key.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serve until killed. `tls`: (certificate chain PEM, key PEM) for `--mode https`.
pub fn run(
    listeners: Vec<std::net::TcpListener>,
    name: Option<String>,
    tls: Option<(&Path, &Path)>,
) -> ExitCode {
    let tls = match tls.map(|(c, k)| tls_config(c, k)).transpose() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("TLS: {e:#}");
            return ExitCode::from(1);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
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
        let mut tasks = Vec::new();
        for l in listeners {
            let l = match l
                .set_nonblocking(true)
                .and_then(|()| TcpListener::from_std(l))
            {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("listener: {e}");
                    return ExitCode::from(1);
                }
            };
            tasks.push(tokio::spawn(accept_loop(l, name.clone(), tls.clone())));
        }
        for t in tasks {
            let _ = t.await;
        }
        ExitCode::SUCCESS
    })
}

async fn accept_loop(l: TcpListener, name: Option<String>, tls: Option<Arc<rustls::ServerConfig>>) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    loop {
        let (tcp, peer) = match l.accept().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let name = name.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            match acceptor {
                None => {
                    serve_conn(
                        tcp,
                        Conn {
                            name,
                            peer,
                            sni: None,
                        },
                    )
                    .await
                }
                Some(a) => match a.accept(tcp).await {
                    Ok(stream) => {
                        let sni = stream.get_ref().1.server_name().unwrap_or("").to_string();
                        serve_conn(
                            stream,
                            Conn {
                                name,
                                peer,
                                sni: Some(sni),
                            },
                        )
                        .await
                    }
                    Err(e) => eprintln!("TLS handshake with {peer}: {e}"),
                },
            }
        });
    }
}

async fn serve_conn<S>(io: S, conn: Conn)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = Arc::new(conn);
    let service = service_fn(move |req| answer(req, conn.clone()));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Clients such as `weft-testpod http` half-close after sending the request: still answer.
    builder.http1().half_close(true);
    if let Err(e) = builder
        .serve_connection_with_upgrades(TokioIo::new(io), service)
        .await
    {
        eprintln!("connection: {e}");
    }
}

/// The body of every answer.
type Body = BoxBody<Bytes, Infallible>;

fn text_response(status: StatusCode, text: String, name: Option<&str>) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(text)).boxed());
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    if let Some(v) = name.and_then(|n| HeaderValue::from_str(n).ok()) {
        h.insert("x-backend", v.clone());
        h.insert("x-testpod-name", v);
    }
    resp
}

async fn answer(mut req: Request<Incoming>, conn: Arc<Conn>) -> Result<Response<Body>, Infallible> {
    let name = conn.name.as_deref();
    if let Some(upgrade) = websocket::upgrade_request(req.headers()) {
        let Ok(key) = upgrade else {
            return Ok(text_response(
                StatusCode::BAD_REQUEST,
                "bad WebSocket upgrade\n".into(),
                name,
            ));
        };
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            match on_upgrade.await {
                Ok(upgraded) => echo(TokioIo::new(upgraded)).await,
                Err(e) => eprintln!("upgrade: {e}"),
            }
        });
        let mut resp = text_response(StatusCode::SWITCHING_PROTOCOLS, String::new(), name);
        let h = resp.headers_mut();
        h.remove(header::CONTENT_TYPE);
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        if let Ok(v) = HeaderValue::from_str(&websocket::accept_key(&key)) {
            h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
        }
        return Ok(resp);
    }
    let (parts, body) = req.into_parts();
    let body_bytes = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes().len(),
        Err(e) => {
            return Ok(text_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("body: {e}\n"),
                name,
            ))
        }
    };
    let mut drip = None;
    let status = match path_action(parts.uri.path()) {
        PathAction::Answer => StatusCode::OK,
        PathAction::Status(code) => StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST),
        PathAction::Delay(d) => {
            tokio::time::sleep(d).await;
            StatusCode::OK
        }
        PathAction::StatusOn(on, code) if name == Some(on.as_str()) => {
            StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST)
        }
        PathAction::StatusOn(..) => StatusCode::OK,
        PathAction::DelayOn(on, d) => {
            if name == Some(on.as_str()) {
                tokio::time::sleep(d).await;
            }
            StatusCode::OK
        }
        PathAction::Drip(d) => {
            drip = Some(d);
            StatusCode::OK
        }
        PathAction::FailFirst(n, key) => {
            static SEEN: std::sync::Mutex<Option<std::collections::HashMap<String, u32>>> =
                std::sync::Mutex::new(None);
            let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
            let count = seen
                .get_or_insert_with(Default::default)
                .entry(key)
                .or_default();
            *count += 1;
            if *count <= n {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::OK
            }
        }
    };
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| parts.uri.authority().map(|a| a.as_str()))
        .unwrap_or("");
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let text = describe(&Seen {
        name,
        peer: conn.peer,
        method: parts.method.as_str(),
        path,
        host,
        version: parts.version,
        sni: conn.sni.as_deref(),
        body_bytes,
        headers: &parts.headers,
    });
    let mut resp = text_response(status, String::new(), name);
    *resp.body_mut() = match drip {
        // The head now, the body later.
        Some(d) => StreamBody::new(futures::stream::once(async move {
            tokio::time::sleep(d).await;
            Ok(Frame::data(Bytes::from(text)))
        }))
        .boxed(),
        None => Full::new(Bytes::from(text)).boxed(),
    };
    Ok(resp)
}

/// After a WebSocket upgrade: send back every byte received until the client closes.
async fn echo<S: AsyncRead + AsyncWrite + Unpin>(mut io: S) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match io.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if io.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = io.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_choose_status_and_delay() {
        assert_eq!(path_action("/"), PathAction::Answer);
        assert_eq!(path_action("/api/status/503"), PathAction::Answer);
        assert_eq!(path_action("/status/503"), PathAction::Status(503));
        assert_eq!(path_action("/status/abc"), PathAction::Status(400));
        assert_eq!(path_action("/status/1000"), PathAction::Status(400));
        assert_eq!(
            path_action("/delay/250"),
            PathAction::Delay(Duration::from_millis(250))
        );
        assert_eq!(
            path_action("/delay/999999999"),
            PathAction::Delay(MAX_DELAY)
        );
        assert_eq!(
            path_action("/status-on/reviews-v1/500"),
            PathAction::StatusOn("reviews-v1".into(), 500)
        );
        assert_eq!(
            path_action("/delay-on/reviews-v1/250"),
            PathAction::DelayOn("reviews-v1".into(), Duration::from_millis(250))
        );
        assert_eq!(
            path_action("/drip/1500"),
            PathAction::Drip(Duration::from_millis(1500))
        );
        assert_eq!(
            path_action("/fail-first/2/abc"),
            PathAction::FailFirst(2, "abc".into())
        );
    }

    #[test]
    fn the_body_lists_what_was_received() {
        let mut headers = HeaderMap::new();
        headers.append("host", HeaderValue::from_static("reviews"));
        headers.append("x-user", HeaderValue::from_static("jason"));
        headers.append("x-user", HeaderValue::from_static("again"));
        let text = describe(&Seen {
            name: Some("reviews-v1"),
            peer: "10.244.1.2:40000".parse().unwrap(),
            method: "POST",
            path: "/a?b=c",
            host: "reviews",
            version: Version::HTTP_2,
            sni: Some("external.example.test"),
            body_bytes: 3,
            headers: &headers,
        });
        assert_eq!(
            text,
            "name=reviews-v1\npeer=10.244.1.2:40000\nmethod=POST\npath=/a?b=c\nhost=reviews\n\
             proto=HTTP/2\nsni=external.example.test\nbody-bytes=3\nheader host: reviews\n\
             header x-user: jason\nheader x-user: again\n"
        );
    }

    #[test]
    fn plain_http_has_no_sni_line() {
        let text = describe(&Seen {
            name: None,
            peer: "10.244.1.2:40000".parse().unwrap(),
            method: "GET",
            path: "/",
            host: "h",
            version: Version::HTTP_11,
            sni: None,
            body_bytes: 0,
            headers: &HeaderMap::new(),
        });
        assert!(!text.contains("sni=") && !text.contains("name="), "{text}");
        assert!(text.contains("proto=HTTP/1.1\n"), "{text}");
    }
}
