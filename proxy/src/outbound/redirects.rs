//! Redirects that never became connections: the kernel reports every redirected `connect()`
//! on a ring buffer; the ones whose connection never reached the capture listener (the proxy
//! was down, the client gave up) become `unhandled` flows.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tracing::debug;

use crate::admin::api::Verdict;
use crate::capture::{Capture, RedirectEvent};
use crate::inputs::ProxyInputs;
use crate::registry::Resolved;
use crate::telemetry::ConnectionRecord;

/// How long a redirect event may wait for its connection to reach the listener before it is
/// reported as [`Verdict::Unhandled`].
const UNHANDLED_AFTER: Duration = Duration::from_secs(5);
/// Bound on the redirects (and accepts) waiting to be paired; beyond it they are not tracked
/// (the kernel ring buffer has a similar bound and counts what it drops).
const TRACKED_MAX: usize = 65_536;

/// Consumes eBPF redirect events and records a [`Verdict::Unhandled`] flow for every redirect
/// whose connection never reached the listener.
pub async fn watch(
    inputs: Arc<ProxyInputs>,
    capture: Arc<Capture>,
    tracker: Arc<RedirectTracker>,
    mut events: tokio::sync::mpsc::Receiver<RedirectEvent>,
) {
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            ev = events.recv() => match ev {
                Some(ev) => tracker.redirected(ev),
                None => return,
            },
            _ = sweep.tick() => report_unhandled(&inputs, &capture, &tracker),
        }
    }
}

/// Records one `unhandled` flow per (source cgroup, original destination) for the redirects
/// that waited too long and whose connection never completed. A connection that completed its
/// handshake has left `BY_COOKIE` (sock_ops moved it), so it reached a listener even if its
/// event was read late or after a restart: that is not reported.
fn report_unhandled(inputs: &ProxyInputs, capture: &Capture, tracker: &RedirectTracker) {
    let mut groups: Vec<(RedirectEvent, usize)> = Vec::new();
    for ev in tracker.expired() {
        if capture.pending_by_cookie(ev.redirect.cookie).is_none() {
            continue;
        }
        let same = |(g, _): &&mut (RedirectEvent, usize)| {
            g.redirect.cgroup_id == ev.redirect.cgroup_id
                && g.redirect.original_dst == ev.redirect.original_dst
        };
        match groups.iter_mut().find(same) {
            Some((_, n)) => *n += 1,
            None => groups.push((ev, 1)),
        }
    }
    for (ev, count) in groups {
        record_unhandled(inputs, ev, count);
    }
}

fn record_unhandled(inputs: &ProxyInputs, ev: RedirectEvent, count: usize) {
    let mut record = ConnectionRecord::at(&inputs.telemetry, ev.time);
    record
        .original_destination(ev.redirect.original_dst)
        .cgroup(ev.redirect.cgroup_id);
    if let Some(pod) = inputs.workloads.load().by_cgroup(ev.redirect.cgroup_id) {
        record.source_pod(pod);
    }
    match inputs.registry.snapshot().resolve(ev.redirect.original_dst) {
        Resolved::Service { service, .. } => {
            record.service(&service);
        }
        Resolved::Pod(p) => {
            record.destination_pod(&p);
        }
        Resolved::Passthrough => {}
    }
    debug!(cookie = ev.redirect.cookie, original_destination = %ev.redirect.original_dst,
        count, "redirected connections never reached the proxy");
    let error = match count {
        1 => "redirected by eBPF but the connection never reached the proxy".to_string(),
        n => format!("{n} connections redirected by eBPF never reached the proxy"),
    };
    record.finish(Verdict::Unhandled, Some(error));
}

/// Pairs redirect events (by socket cookie) with accepted connections.
#[derive(Default)]
pub struct RedirectTracker {
    inner: Mutex<TrackerState>,
}

#[derive(Default)]
struct TrackerState {
    /// Events whose connection has not been accepted yet.
    pending: HashMap<u64, (RedirectEvent, Instant)>,
    /// Accepted connections whose event has not been read yet (the ring buffer can lag).
    accepted: HashMap<u64, Instant>,
}

impl RedirectTracker {
    pub fn accepted(&self, cookie: u64) {
        let mut s = self.inner.lock();
        if s.pending.remove(&cookie).is_none() && s.accepted.len() < TRACKED_MAX {
            s.accepted.insert(cookie, Instant::now());
        }
    }

    pub fn redirected(&self, ev: RedirectEvent) {
        let mut s = self.inner.lock();
        let cookie = ev.redirect.cookie;
        if s.accepted.remove(&cookie).is_none() && s.pending.len() < TRACKED_MAX {
            s.pending.insert(cookie, (ev, Instant::now()));
        }
    }

    /// Events that waited too long, oldest first; forgets stale accept marks.
    pub fn expired(&self) -> Vec<RedirectEvent> {
        let now = Instant::now();
        let mut s = self.inner.lock();
        s.accepted
            .retain(|_, t| now.duration_since(*t) < Duration::from_secs(60));
        let mut out = Vec::new();
        s.pending.retain(|_, (ev, t)| {
            if now.duration_since(*t) >= UNHANDLED_AFTER {
                out.push(ev.clone());
                false
            } else {
                true
            }
        });
        out.sort_by_key(|e| e.time);
        out
    }
}
