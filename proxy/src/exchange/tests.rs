//! The guard in front of hyper, against a real socket.

use super::guard::{parser_limit, Guarded};
use super::*;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A guarded HTTP/1 server answering 200 to whatever it accepts, with the path and the length
/// of the body it read; returns its address.
async fn guarded_server(max_head: usize) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let io = Guarded::new(s, max_head, Arc::default());
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let path = req.uri().path().to_string();
                    let body = req.into_body().collect().await.map(|b| b.to_bytes());
                    let said = format!("{path} {}\n", body.map_or(0, |b| b.len()));
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(said))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .max_buf_size(parser_limit(max_head))
                    .serve_connection(TokioIo::new(io), svc)
                    .await;
            });
        }
    });
    addr
}

async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut c = TcpStream::connect(addr).await.unwrap();
    // Written concurrently: the server may answer before it has read everything.
    let (mut r, mut w) = c.split();
    let write = async {
        let _ = w.write_all(request).await;
    };
    let mut out = Vec::new();
    let read = async {
        let _ = r.read_to_end(&mut out).await;
    };
    let both = async {
        tokio::join!(write, read);
    };
    if tokio::time::timeout(Duration::from_secs(10), both)
        .await
        .is_err()
    {
        return format!("timed out; read so far: {}", String::from_utf8_lossy(&out));
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn smuggling_and_oversized_heads_get_answers_not_resets() {
    let addr = guarded_server(60 * 1024).await;
    let resp = exchange(
        addr,
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let ok = exchange(
        addr,
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    let smuggle = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    let resp = exchange(addr, smuggle).await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    for bad in [
        &b"GET / HTTP/1.1\r\nHost: a\r\nX-Folded: one\r\n two\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: a\r\nBad Name: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    ] {
        let resp = exchange(addr, bad).await;
        assert!(
            resp.starts_with("HTTP/1.1 400"),
            "{}: {resp}",
            String::from_utf8_lossy(bad)
        );
    }
    let big = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "a".repeat(61 * 1024)
    );
    let resp = exchange(addr, big.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");
}

/// Reads that stop inside a head, inside a body and between pipelined requests: whatever the
/// guard lets pass in place and whatever it holds and copies, the parser gets every request
/// whole and in order, and a smuggling head that comes after them is still refused.
#[tokio::test]
async fn requests_cut_across_reads_reach_the_parser_whole() {
    let addr = guarded_server(60 * 1024).await;
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.set_nodelay(true).unwrap();
    let pieces: [&[u8]; 6] = [
        b"GET /1 HTTP/1.1\r\nHo",
        b"st: a\r\n\r\nPOST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nhel",
        b"lo",
        b"world",
        b"GET /3 HTTP/1.1\r\nHost: a\r\n\r\nPOST /4 HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n",
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ];
    for piece in pieces {
        c.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "timed out: {}", String::from_utf8_lossy(&out));
    let out = String::from_utf8_lossy(&out);
    let answers: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("HTTP/1.1 ") || l.starts_with('/'))
        .collect();
    assert_eq!(
        answers,
        [
            "HTTP/1.1 200 OK",
            "/1 0",
            "HTTP/1.1 200 OK",
            "/2 10",
            "HTTP/1.1 200 OK",
            "/3 0",
            "HTTP/1.1 400 Bad Request"
        ],
        "{out}"
    );
}

/// What hyper keeps for an HTTP/1.1 connection's lifetime is the service's future, allocated at
/// its size: a handler future of kilobytes is boxed for its request's time, so an idle
/// keep-alive connection holds a pointer, not the handler's state.
#[test]
fn a_connection_keeps_no_handler_state_between_requests() {
    let handle = |_: ()| async {
        let scratch = [0u8; 8192];
        tokio::task::yield_now().await;
        Response::new(ResponseBody::new(
            Full::new(Bytes::copy_from_slice(&scratch[..1])).map_err(|never| match never {}),
        ))
    };
    assert!(std::mem::size_of_val(&handle(())) > 8192);
    let fut = respond(&handle, (), ClientVersion::Http1, Draining::never());
    assert!(
        std::mem::size_of_val(&fut) <= 128,
        "{} bytes",
        std::mem::size_of_val(&fut)
    );
}

#[test]
fn owned_values_keep_no_read_buffer_alive() {
    use std::sync::atomic::{AtomicBool, Ordering};
    /// A connection's read buffer: says when the last slice of it is gone.
    struct ReadBuffer(Arc<AtomicBool>, Vec<u8>);
    impl AsRef<[u8]> for ReadBuffer {
        fn as_ref(&self) -> &[u8] {
            &self.1
        }
    }
    impl Drop for ReadBuffer {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let freed = Arc::new(AtomicBool::new(false));
    let read = Bytes::from_owner(ReadBuffer(
        freed.clone(),
        b"text/plain a=1 b=2 s3cret".to_vec(),
    ));
    let value = |from, to| HeaderValue::from_maybe_shared(read.slice(from..to)).unwrap();
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, value(0, 10));
    headers.append(header::SET_COOKIE, value(11, 14));
    headers.append(header::SET_COOKIE, value(15, 18));
    let mut secret = value(19, 25);
    secret.set_sensitive(true);
    headers.insert(header::AUTHORIZATION, secret);
    headers.insert(header::SERVER, HeaderValue::from_static("weft"));
    drop(read);
    assert!(
        !freed.load(Ordering::SeqCst),
        "the parsed values hold the read buffer"
    );

    own_values(&mut headers);
    assert!(
        freed.load(Ordering::SeqCst),
        "a value still holds the read buffer"
    );
    assert_eq!(headers[header::CONTENT_TYPE], "text/plain");
    let cookies: Vec<_> = headers.get_all(header::SET_COOKIE).iter().collect();
    assert_eq!(cookies, ["a=1", "b=2"]);
    assert_eq!(headers[header::AUTHORIZATION], "s3cret");
    assert!(headers[header::AUTHORIZATION].is_sensitive());
    assert!(!headers[header::CONTENT_TYPE].is_sensitive());
    assert_eq!(headers[header::SERVER], "weft");
    assert_eq!(headers.len(), 5);
}

/// Serves one connection with [`serve`], answering 200 to every request: the client's end of
/// an in-memory stream (no socket: with tokio's clock paused, time moves only when every task
/// waits on a timer, never while bytes are on their way), and how many requests it served and
/// why it was cut once it ends.
fn served_alone(
    version: ClientVersion,
) -> (
    tokio::io::DuplexStream,
    tokio::sync::oneshot::Receiver<(u64, Option<String>)>,
) {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let telemetry = Arc::new(crate::telemetry::Telemetry::new("node-1", 16));
        let mut record = ConnectionRecord::accepted(&telemetry);
        let template = record.requests();
        let served = serve(
            server,
            version,
            60 * 1024,
            &template,
            &mut record,
            &Draining::never(),
            |_req| async { Response::new(empty()) },
        )
        .await;
        let _ = tx.send(served);
    });
    (client, rx)
}

/// Reads one response head (the responses here have no body).
async fn response_head(c: &mut tokio::io::DuplexStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match c.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

#[tokio::test(start_paused = true)]
async fn a_keep_alive_connection_idle_for_minutes_serves_on() {
    let (mut c, served) = served_alone(ClientVersion::Http1);
    let request = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
    c.write_all(request).await.unwrap();
    assert!(response_head(&mut c).await.starts_with("HTTP/1.1 200"));
    // Longer than a request head may take: an idle connection is not a slow head.
    tokio::time::sleep(Duration::from_secs(10 * 60)).await;
    c.write_all(request).await.unwrap();
    let again = response_head(&mut c).await;
    assert!(
        again.starts_with("HTTP/1.1 200"),
        "after 10 minutes idle: {again:?}"
    );
    drop(c);
    assert_eq!(served.await.unwrap(), (2, None));
}

#[tokio::test(start_paused = true)]
async fn a_connection_idle_for_an_hour_is_closed() {
    let (mut c, served) = served_alone(ClientVersion::Http1);
    c.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    assert!(response_head(&mut c).await.starts_with("HTTP/1.1 200"));
    let started = tokio::time::Instant::now();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).await.unwrap();
    let after = started.elapsed();
    assert!(rest.is_empty());
    assert!(
        after >= guard::IDLE_TIMEOUT && after <= guard::IDLE_TIMEOUT * 5 / 4,
        "closed after {after:?}"
    );
    let (requests, why) = served.await.unwrap();
    assert_eq!(requests, 1);
    assert_eq!(why.as_deref(), Some("idle for 3600s"));
}

#[tokio::test(start_paused = true)]
async fn a_trickled_request_head_is_cut_after_its_timeout() {
    let (mut c, served) = served_alone(ClientVersion::Http1);
    // A connection left idle first: the head's time runs from its first bytes.
    tokio::time::sleep(Duration::from_secs(90)).await;
    let started = tokio::time::Instant::now();
    c.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
    tokio::time::sleep(Duration::from_secs(20)).await;
    // More of the head: it is still the same head, its time still runs.
    c.write_all(b"st: a\r\n").await.unwrap();
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest).await;
    let after = started.elapsed();
    assert!(
        after >= guard::HEAD_TIMEOUT && after < guard::HEAD_TIMEOUT + Duration::from_secs(1),
        "closed after {after:?}"
    );
    let (requests, why) = served.await.unwrap();
    assert_eq!(requests, 0);
    assert_eq!(
        why.as_deref(),
        Some("request head not complete within 30s of its first bytes")
    );
}

#[test]
fn a_response_loses_its_hop_by_hop_headers_and_keeps_the_rest() {
    let mut h = HeaderMap::new();
    h.insert(
        header::TRANSFER_ENCODING,
        HeaderValue::from_static("chunked"),
    );
    h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    h.insert("x-app", HeaderValue::from_static("1"));
    assert_eq!(
        crate::l7::hygiene::present(&h, &[header::CONNECTION, header::TRANSFER_ENCODING]),
        0b10
    );
    strip_hop_by_hop(&mut h);
    let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
    left.sort();
    assert_eq!(left, ["content-type", "x-app"]);
    let mut none = HeaderMap::new();
    none.insert("x-app", HeaderValue::from_static("1"));
    strip_hop_by_hop(&mut none);
    assert_eq!(none.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_http2_connection_idle_for_an_hour_is_told_to_go_away() {
    let (c, served) = served_alone(ClientVersion::Http2);
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(c))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let get = || {
        Request::get("http://a/")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap()
    };
    let resp = send.send_request(get()).await.unwrap();
    assert_eq!(resp.status(), 200);
    tokio::time::sleep(Duration::from_secs(10 * 60)).await;
    let resp = send.send_request(get()).await.unwrap();
    assert_eq!(resp.status(), 200, "after 10 minutes idle");
    let idle = tokio::time::Instant::now();
    // The client's connection ends cleanly: told to go away (`GOAWAY`), not cut.
    tokio::time::timeout(guard::IDLE_TIMEOUT * 2, conn)
        .await
        .expect("still open two idle timeouts after its last request")
        .unwrap()
        .unwrap();
    let after = idle.elapsed();
    assert!(
        after >= guard::IDLE_TIMEOUT && after <= guard::IDLE_TIMEOUT * 5 / 4,
        "gone after {after:?}"
    );
    assert_eq!(served.await.unwrap().0, 2);
}
