//! HTTP/2 upstream requests on `h2` itself, sent and answered from the request's own task.
//!
//! hyper's HTTP/2 client hands each request to its connection's task over a channel; that task
//! opens the stream and spawns one more task per request, to wait for the response and hand it
//! back over a second channel. Here the request's task opens the stream on the shared
//! connection and waits on it itself; the connection's task only reads and writes the socket.
//! A request body that is not complete when the head is sent is still sent by a task of its
//! own, as hyper does: the response may come before the body ends.
//!
//! What hyper's client did on the way, done here too: connection-specific headers are removed
//! (RFC 9113 §8.2.2), a body of known length gets its `content-length`, flow control is
//! released as the response body is read, a `CONNECT` that is answered 2xx leaves both of its
//! stream's halves to the caller ([`super::http::Upgrade`]), and the connection is configured
//! with hyper's defaults.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{Reason, RecvStream, SendStream};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response};
use http_body::{Body as _, Frame, SizeHint};
use tracing::debug;

use super::http::Body;

/// A client connection's settings: hyper's client defaults (windows of 2 MiB per stream and
/// 5 MiB per connection, 16 KiB frames and header lists, 100 streams before the server's
/// SETTINGS, no push).
pub(super) fn builder() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_max_send_streams(100)
        .initial_window_size(2 << 20)
        .initial_connection_window_size(5 << 20)
        .max_frame_size(16 << 10)
        .max_header_list_size(16 << 10)
        .max_send_buffer_size(1 << 20)
        .max_local_error_reset_streams(Some(1024))
        .enable_push(false);
    b
}

/// Why an HTTP/2 request failed: before it was sent (the connection could take no stream), or
/// after.
#[derive(Debug)]
pub enum Failed {
    Unsent(h2::Error),
    Sent(h2::Error),
}

/// Sends `req` on `conn` (a handle of the connection this task may use) and waits for the
/// response's head.
pub(super) async fn send(
    conn: &mut SendRequest<Bytes>,
    req: Request<Body>,
) -> Result<Response<RecvBody>, Failed> {
    std::future::poll_fn(|cx| conn.poll_ready(cx))
        .await
        .map_err(Failed::Unsent)?;
    let (parts, body) = req.into_parts();
    let mut head = Request::from_parts(parts, ());
    strip_connection_headers(head.headers_mut());
    if let Some(len) = body.size_hint().exact() {
        if len != 0
            || !matches!(
                *head.method(),
                Method::GET | Method::HEAD | Method::DELETE | Method::CONNECT
            )
        {
            head.headers_mut()
                .entry(header::CONTENT_LENGTH)
                .or_insert_with(|| HeaderValue::from(len));
        }
    }
    let connect = head.method() == Method::CONNECT;
    let ends = body.is_end_stream() && !connect;
    let (response, stream) = conn.send_request(head, ends).map_err(Failed::Unsent)?;
    let held = if connect {
        Some(stream)
    } else {
        if !ends {
            let mut pipe = Pipe {
                body,
                send: stream,
                held: None,
            };
            // A body already whole (a retry's replay, a small one read first) goes now,
            // without a task.
            if futures::FutureExt::now_or_never(&mut pipe).is_none() {
                tokio::spawn(pipe);
            }
        }
        None
    };
    let resp = response.await.map_err(Failed::Sent)?;
    let length = content_length(resp.headers());
    Ok(resp.map(|recv| RecvBody {
        recv,
        length,
        data_done: false,
        connect: held,
    }))
}

/// Removes the headers HTTP/2 forbids in a request (RFC 9113 §8.2.2): `connection` and those
/// it names, `keep-alive`, `proxy-connection`, `transfer-encoding`, `upgrade`, and `te` other
/// than `trailers`.
fn strip_connection_headers(headers: &mut HeaderMap) {
    const NAMES: [HeaderName; 6] = [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::TE,
    ];
    if !headers.keys().any(|k| NAMES.contains(k)) {
        return;
    }
    if headers.get(header::TE).is_some_and(|te| te != "trailers") {
        headers.remove(header::TE);
    }
    if let Some(named) = headers.remove(header::CONNECTION) {
        if let Ok(named) = named.to_str() {
            for name in named.split(',') {
                headers.remove(name.trim());
            }
        }
    }
    for name in &NAMES[1..5] {
        headers.remove(name);
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// A response's body read from its stream, flow control released as it is read.
#[derive(Debug)]
pub struct RecvBody {
    recv: RecvStream,
    /// What is left of a declared `content-length` (h2 resets a stream that breaks it).
    length: Option<u64>,
    data_done: bool,
    /// The request's half of a `CONNECT` stream.
    connect: Option<SendStream<Bytes>>,
}

impl RecvBody {
    /// Both halves of a `CONNECT` stream, once answered.
    pub(super) fn into_connect(self) -> Option<(SendStream<Bytes>, RecvStream)> {
        Some((self.connect?, self.recv))
    }
}

impl http_body::Body for RecvBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if !self.data_done {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    if let Some(left) = &mut self.length {
                        *left = left.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                // The server ended the stream early on purpose, its response complete.
                Some(Err(e)) if matches!(e.reason(), Some(Reason::NO_ERROR | Reason::CANCEL)) => {
                    return Poll::Ready(None)
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => self.data_done = true,
            }
        }
        match ready!(self.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.length {
            Some(left) => SizeHint::with_exact(left),
            None => SizeHint::default(),
        }
    }
}

/// A request body sent on its stream, as the stream's flow control allows; reset when the body
/// fails, ended when the server resets the stream.
struct Pipe {
    body: Body,
    send: SendStream<Bytes>,
    /// Data taken from the body, waiting for the stream's capacity (and whether it ends it).
    held: Option<(Bytes, bool)>,
}

impl Future for Pipe {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let me = &mut *self;
        loop {
            // Woken by the server's RST_STREAM while waiting for the body or for capacity.
            if let Poll::Ready(r) = me.send.poll_reset(cx) {
                debug!(reason = ?r, "upstream stream reset while its request body was sent");
                return Poll::Ready(());
            }
            if let Some((data, ends)) = me.held.take() {
                while me.send.capacity() == 0 {
                    match me.send.poll_capacity(cx) {
                        Poll::Ready(Some(Ok(0))) => {}
                        Poll::Ready(Some(Ok(_))) => break,
                        Poll::Ready(Some(Err(_)) | None) => return Poll::Ready(()),
                        Poll::Pending => {
                            me.held = Some((data, ends));
                            return Poll::Pending;
                        }
                    }
                }
                if me.send.send_data(data, ends).is_err() || ends {
                    return Poll::Ready(());
                }
                continue;
            }
            // The next frame first, then capacity: a claim on the window before any data is
            // in hand could hold it against other streams.
            match ready!(Pin::new(&mut me.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let ends = me.body.is_end_stream();
                        if data.is_empty() {
                            if me.send.send_data(data, ends).is_err() || ends {
                                return Poll::Ready(());
                            }
                        } else {
                            // h2 raises the claim to what is buffered once it is sent.
                            me.send.reserve_capacity(1);
                            me.held = Some((data, ends));
                        }
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            me.send.reserve_capacity(0);
                            let _ = me.send.send_trailers(trailers);
                            return Poll::Ready(());
                        }
                    }
                },
                Some(Err(e)) => {
                    let reason = reason_of(&e).unwrap_or(Reason::INTERNAL_ERROR);
                    debug!(error = %e, "request body failed: upstream stream reset");
                    me.send.send_reset(reason);
                    return Poll::Ready(());
                }
                None => {
                    let _ = me.send.send_data(Bytes::new(), true);
                    return Poll::Ready(());
                }
            }
        }
    }
}

/// The HTTP/2 reason somewhere in `e`'s causes (a client's own reset, passed on).
pub(super) fn reason_of(e: &(dyn std::error::Error + 'static)) -> Option<Reason> {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(h2) = c.downcast_ref::<h2::Error>() {
            return h2.reason();
        }
        cause = c.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_specific_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("x-hop, close"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        strip_connection_headers(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-kept"], "yes");

        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_connection_headers(&mut h);
        assert_eq!(h[header::TE], "trailers", "gRPC's te: trailers stays");
    }
}
