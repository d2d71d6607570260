//! Bodies that count what they carry, and a response body that finishes its request's record
//! when it ends.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context as TaskContext, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;

use crate::admin::api::{Verdict, NO_FLAGS};
use crate::l7::respond::Flag;
use crate::telemetry::RequestRecord;

/// Bytes counted as they pass.
#[derive(Clone, Default)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A request body that counts what it carries.
pub struct Counted<B> {
    pub inner: B,
    pub count: Counter,
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
                self.count.0.fetch_add(d.len() as u64, Ordering::Relaxed);
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

/// An upstream response body that finishes the request's record when it ends (or, dropped
/// early, leaves it to the record's drop: the client went away).
pub struct Recorded {
    inner: Incoming,
    record: Option<RequestRecord>,
    sent: Counter,
    received: u64,
    status: u16,
}

impl Recorded {
    /// `inner`, the body of a response with `status`, finishing `record` when it ends;
    /// `sent` counts the request body.
    pub fn new(inner: Incoming, record: RequestRecord, sent: Counter, status: u16) -> Recorded {
        Recorded {
            inner,
            record: Some(record),
            sent,
            received: 0,
            status,
        }
    }
}

impl Recorded {
    fn finish(&mut self, error: Option<String>) {
        if let Some(mut r) = self.record.take() {
            r.bytes(self.sent.get(), self.received);
            let flags = if error.is_some() {
                Flag::UpstreamRemoteReset.as_str()
            } else {
                NO_FLAGS
            };
            r.finish(Verdict::Forwarded, self.status, flags, error);
        }
    }
}

impl http_body::Body for Recorded {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    self.received += d.len() as u64;
                }
                if self.inner.is_end_stream() {
                    self.finish(None);
                }
            }
            Some(Err(e)) => {
                let e = e.to_string();
                self.finish(Some(e));
            }
            None => self.finish(None),
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
