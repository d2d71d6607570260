//! Bodies that count what they carry, and a response body that finishes its request's record
//! when it ends.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context as TaskContext, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};

use crate::admin::api::{Verdict, NO_FLAGS};
use crate::l7::respond::Flag;
use crate::telemetry::RequestRecord;
use crate::upstream::http::Received;

/// Bytes counted as they pass (and, for a gRPC call, its messages).
#[derive(Clone, Default)]
pub struct Counter(Arc<Counts>);

#[derive(Default)]
struct Counts {
    bytes: AtomicU64,
    /// gRPC messages, when `grpc`.
    messages: AtomicU64,
    grpc: bool,
}

impl Counter {
    /// A counter for the body of a request, which counts gRPC messages too when it is a gRPC
    /// call's.
    pub fn for_request(grpc: bool) -> Counter {
        Counter(Arc::new(Counts {
            grpc,
            ..Counts::default()
        }))
    }

    pub fn get(&self) -> u64 {
        self.0.bytes.load(Ordering::Relaxed)
    }

    /// gRPC messages counted (0 unless made for a gRPC call).
    pub fn messages(&self) -> u64 {
        self.0.messages.load(Ordering::Relaxed)
    }
}

/// Counts the messages of a gRPC body as its bytes pass: each is a 5-byte prefix (a flag and
/// a big-endian length) and that many bytes; a message counts when its prefix is complete,
/// as Envoy's gRPC stats count them.
#[derive(Debug, Default, Clone)]
pub struct GrpcFrames {
    prefix: [u8; 5],
    /// Bytes of the prefix read so far.
    have: usize,
    /// Bytes of the current message still to pass.
    remaining: u64,
}

impl GrpcFrames {
    /// Reads `data`; returns how many messages began in it.
    pub fn feed(&mut self, mut data: &[u8]) -> u64 {
        let mut began = 0;
        while !data.is_empty() {
            if self.remaining > 0 {
                let take = (self.remaining.min(data.len() as u64)) as usize;
                self.remaining -= take as u64;
                data = &data[take..];
                continue;
            }
            let take = (5 - self.have).min(data.len());
            self.prefix[self.have..self.have + take].copy_from_slice(&data[..take]);
            self.have += take;
            data = &data[take..];
            if self.have == 5 {
                began += 1;
                self.have = 0;
                let len = [
                    self.prefix[1],
                    self.prefix[2],
                    self.prefix[3],
                    self.prefix[4],
                ];
                self.remaining = u64::from(u32::from_be_bytes(len));
            }
        }
        began
    }
}

/// A request body that counts what it carries.
pub struct Counted<B> {
    pub inner: B,
    pub count: Counter,
    pub frames: GrpcFrames,
}

impl<B> http_body::Body for Counted<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(Ok(f)) = &frame {
            if let Some(d) = f.data_ref() {
                let counts = self.count.0.clone();
                counts.bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
                if counts.grpc {
                    let n = self.frames.feed(d);
                    counts.messages.fetch_add(n, Ordering::Relaxed);
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What a response body holds until it ends (its request counted in flight), told when the
/// route's timeout cut the body.
pub trait Held: Send + Sync + Unpin + 'static {
    fn timed_out(&self);
}

impl Held for () {
    fn timed_out(&self) {}
}

/// Frames a mirror may fall behind the request it copies before its copy is given up.
pub const MIRROR_BACKLOG: usize = 64;

/// A request body passed on as it arrives, each frame copied to mirrors ([`Mirrored`]). A
/// mirror that falls [`MIRROR_BACKLOG`] frames behind, or whose request is gone, is let go
/// (its `cut` is notified): the request it copies never waits for it.
pub struct Teed<B> {
    inner: B,
    copies: Vec<(
        tokio::sync::mpsc::Sender<Frame<Bytes>>,
        Arc<tokio::sync::Notify>,
    )>,
}

/// A copy of a request body for a mirror. It ends when the original ends; `cut` is notified
/// when the copy was given up.
pub struct Mirrored {
    frames: tokio::sync::mpsc::Receiver<Frame<Bytes>>,
    size: SizeHint,
}

/// `body` as sent on, and `n` copies of it, each with the signal that it was given up.
pub fn tee<B: http_body::Body>(
    body: B,
    n: usize,
) -> (Teed<B>, Vec<(Mirrored, Arc<tokio::sync::Notify>)>) {
    let size = body.size_hint();
    let mut copies = Vec::with_capacity(n);
    let mut mirrors = Vec::with_capacity(n);
    for _ in 0..n {
        let (tx, rx) = tokio::sync::mpsc::channel(MIRROR_BACKLOG);
        let cut = Arc::new(tokio::sync::Notify::new());
        copies.push((tx, cut.clone()));
        mirrors.push((Mirrored { frames: rx, size }, cut));
    }
    (
        Teed {
            inner: body,
            copies,
        },
        mirrors,
    )
}

fn copy_of(frame: &Frame<Bytes>) -> Option<Frame<Bytes>> {
    if let Some(d) = frame.data_ref() {
        Some(Frame::data(d.clone()))
    } else {
        frame.trailers_ref().map(|t| Frame::trailers(t.clone()))
    }
}

impl<B> http_body::Body for Teed<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => self.copies.retain(|(tx, cut)| {
                let Some(copy) = copy_of(f) else {
                    return true;
                };
                match tx.try_send(copy) {
                    Ok(()) => true,
                    Err(_) => {
                        cut.notify_one();
                        false
                    }
                }
            }),
            Some(Err(_)) => {
                // The original failed: so do its copies.
                for (_, cut) in self.copies.drain(..) {
                    cut.notify_one();
                }
            }
            // The end: dropping the senders ends the copies.
            None => self.copies.clear(),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Mirrored {
    fn drop(&mut self) {
        self.frames.close();
    }
}

impl http_body::Body for Mirrored {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        self.frames.poll_recv(cx).map(|f| f.map(Ok))
    }

    fn size_hint(&self) -> SizeHint {
        self.size
    }
}

/// An upstream response body that finishes the request's record when it ends (or, dropped
/// early, leaves it to the record's drop: the client went away).
pub struct Recorded<H: Held = ()> {
    inner: Received,
    record: Option<RequestRecord>,
    sent: Counter,
    received: u64,
    /// The response's gRPC messages, for a gRPC call.
    frames: Option<(GrpcFrames, u64)>,
    status: u16,
    /// The route's timeout, when it has one: a body still coming at it is cut.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The request counted in flight on its endpoint until the body ends.
    in_flight: Option<H>,
}

impl<H: Held> Recorded<H> {
    /// `inner`, the body of a response with `status`, finishing `record` when it ends;
    /// `sent` counts the request body. At `deadline` (the route's timeout) a body still
    /// coming is cut, as Envoy resets it: flag `UT`.
    pub fn new(
        inner: Received,
        record: RequestRecord,
        sent: Counter,
        status: u16,
        deadline: Option<tokio::time::Instant>,
        in_flight: Option<H>,
    ) -> Recorded<H> {
        let mut recorded = Recorded {
            inner,
            frames: record.is_grpc().then(|| (GrpcFrames::default(), 0)),
            record: Some(record),
            sent,
            received: 0,
            status,
            deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
            in_flight,
        };
        if http_body::Body::is_end_stream(&recorded.inner) {
            // No body (a gRPC trailers-only answer, a 204, a HEAD): nobody polls it, so the
            // request ends here.
            recorded.finish(None, None);
        }
        recorded
    }
}

impl<H: Held> Recorded<H> {
    fn finish(&mut self, flag: Option<Flag>, error: Option<String>) {
        if let Some(held) = self.in_flight.take() {
            if flag == Some(Flag::UpstreamRequestTimeout) {
                held.timed_out();
            }
        }
        if let Some(mut r) = self.record.take() {
            r.bytes(self.sent.get(), self.received);
            if let Some((_, messages)) = &self.frames {
                r.messages(self.sent.messages(), *messages);
            }
            let flags = flag.map_or(NO_FLAGS, Flag::as_str);
            r.finish(Verdict::Forwarded, self.status, flags, error);
        }
    }
}

/// Trailers with values of their own ([`super::own_values`]): the client's connection may
/// index them.
fn own_trailers(frame: Frame<Bytes>) -> Frame<Bytes> {
    match frame.into_trailers() {
        Ok(mut trailers) => {
            super::own_values(&mut trailers);
            Frame::trailers(trailers)
        }
        Err(frame) => frame,
    }
}

/// What cuts a response body at the route's timeout.
const TIMED_OUT: &str = "upstream request timeout";

impl<H: Held> http_body::Body for Recorded<H> {
    type Data = Bytes;
    type Error = super::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, super::BoxError>>> {
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                let expired = self
                    .deadline
                    .as_mut()
                    .is_some_and(|d| d.as_mut().poll(cx).is_ready());
                if expired && self.record.is_some() {
                    self.finish(Some(Flag::UpstreamRequestTimeout), Some(TIMED_OUT.into()));
                    return Poll::Ready(Some(Err(TIMED_OUT.into())));
                }
                return Poll::Pending;
            }
        };
        let frame = frame.map(|f| f.map(own_trailers));
        match &frame {
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    self.received += d.len() as u64;
                    if let Some((frames, messages)) = &mut self.frames {
                        *messages += frames.feed(d);
                    }
                } else if let Some(trailers) = f.trailers_ref() {
                    let status = super::grpc_status(trailers);
                    if let (Some(r), Some(g)) = (self.record.as_mut(), status) {
                        if r.is_grpc() {
                            r.grpc_status(g);
                        }
                    }
                }
                if self.inner.is_end_stream() {
                    self.finish(None, None);
                }
            }
            Some(Err(e)) => {
                let e = e.to_string();
                self.finish(Some(Flag::UpstreamRemoteReset), Some(e));
            }
            None => self.finish(None, None),
        }
        Poll::Ready(frame.map(|f| f.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};
    use std::convert::Infallible;

    fn message(len: u32) -> Vec<u8> {
        let mut m = vec![0u8];
        m.extend_from_slice(&len.to_be_bytes());
        m.extend(std::iter::repeat_n(7u8, len as usize));
        m
    }

    #[test]
    fn grpc_messages_are_counted_whatever_the_data_frames_cut() {
        let stream: Vec<u8> = [message(3), message(0), message(300), message(1)].concat();
        // Whole, and cut at every size from one byte up.
        for cut in 1..=stream.len() {
            let mut frames = GrpcFrames::default();
            let n: u64 = stream.chunks(cut).map(|c| frames.feed(c)).sum();
            assert_eq!(n, 4, "cut in chunks of {cut}");
        }
        // A message counts when its prefix is complete, before its bytes arrive.
        let mut frames = GrpcFrames::default();
        assert_eq!(frames.feed(&[0, 0, 0, 1]), 0);
        assert_eq!(frames.feed(&[0]), 1);
        assert_eq!(frames.feed(&[9; 256]), 0);
        assert_eq!(frames.feed(&[0, 0, 0, 0, 0]), 1);
    }

    fn frames(n: usize) -> impl http_body::Body<Data = Bytes, Error = Infallible> + Unpin {
        let chunks = (0..n).map(|i| Ok(Frame::data(Bytes::from(format!("{i};")))));
        StreamBody::new(futures::stream::iter(chunks))
    }

    #[tokio::test]
    async fn mirrors_get_each_frame_and_a_lagging_one_is_given_up() {
        let (teed, copies) = tee(frames(3), 2);
        let original = teed.collect().await.unwrap().to_bytes();
        assert_eq!(original, "0;1;2;");
        for (copy, _) in copies {
            assert_eq!(copy.collect().await.unwrap().to_bytes(), original);
        }

        // A copy nobody reads falls behind: it is given up, the original goes on.
        let n = MIRROR_BACKLOG + 10;
        let (teed, mut copies) = tee(frames(n), 1);
        let (copy, cut) = copies.pop().unwrap();
        let original = teed.collect().await.unwrap().to_bytes();
        assert_eq!(original.iter().filter(|b| **b == b';').count(), n);
        tokio::time::timeout(std::time::Duration::from_secs(1), cut.notified())
            .await
            .expect("the lagging copy is cut");
        drop(copy);
    }
}
