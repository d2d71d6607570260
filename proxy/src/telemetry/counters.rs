//! Counters of the HBONE tunnel, both ends: kept here so `/status` and `/metrics` read them
//! from one place; the tunnel code only increments them.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::admin::api::InboundStats;

/// The HBONE client pool's totals (the pool adds its live per-key view).
#[derive(Debug, Default)]
pub struct ClientCounters {
    pub connections_opened: AtomicU64,
    pub connections_failed: AtomicU64,
    pub connections_closed: AtomicU64,
    pub streams_opened: AtomicU64,
    pub streams_rejected: AtomicU64,
    /// Connections closed because a keepalive PING went unanswered (the peer node is gone).
    pub keepalive_timeouts: AtomicU64,
    /// `CONNECT`s tried again on a fresh connection (`GOAWAY`, `REFUSED_STREAM`, closed).
    pub streams_retried: AtomicU64,
}

/// The HBONE server's counters (`:15008`).
#[derive(Debug, Default)]
pub struct ServerCounters {
    pub tcp_accepted: AtomicU64,
    pub tls_accepted: AtomicU64,
    pub tls_failed: AtomicU64,
    pub h2_failed: AtomicU64,
    pub connections_active: AtomicU64,
    pub streams_total: AtomicU64,
    pub streams_active: AtomicU64,
    pub bad_requests: AtomicU64,
    pub delivered: AtomicU64,
    pub denied: AtomicU64,
    pub not_found: AtomicU64,
    pub connect_failed: AtomicU64,
    /// Connections reset at accept: too many TLS handshakes in progress on the node.
    pub refused_handshakes: AtomicU64,
    /// … too many TLS handshakes in progress from that source address.
    pub refused_peer_handshakes: AtomicU64,
    /// … too many open connections from that source address.
    pub refused_peer_connections: AtomicU64,
    /// Streams the client reset before weft answered them (their work was dropped).
    pub streams_cancelled: AtomicU64,
    /// Of those, the ones that count against the connection (reset within the minimum
    /// stream lifetime).
    pub premature_resets: AtomicU64,
    /// Connections closed with `GOAWAY(ENHANCE_YOUR_CALM)` for resetting streams too fast:
    /// weft's premature-reset rule, or h2's own limits (streams reset before they were taken,
    /// streams reset for the client's protocol errors).
    pub reset_floods: AtomicU64,
    /// Connections told to go elsewhere (`GOAWAY`) because the node drains.
    pub drain_goaways: AtomicU64,
}

impl ServerCounters {
    pub fn snapshot(&self) -> InboundStats {
        InboundStats {
            tcp_accepted: read(&self.tcp_accepted),
            tls_accepted: read(&self.tls_accepted),
            tls_failed: read(&self.tls_failed),
            h2_failed: read(&self.h2_failed),
            connections_active: read(&self.connections_active),
            streams_total: read(&self.streams_total),
            streams_active: read(&self.streams_active),
            bad_requests: read(&self.bad_requests),
            delivered: read(&self.delivered),
            denied: read(&self.denied),
            not_found: read(&self.not_found),
            connect_failed: read(&self.connect_failed),
            refused_handshakes: read(&self.refused_handshakes),
            refused_peer_handshakes: read(&self.refused_peer_handshakes),
            refused_peer_connections: read(&self.refused_peer_connections),
            streams_cancelled: read(&self.streams_cancelled),
            premature_resets: read(&self.premature_resets),
            reset_floods: read(&self.reset_floods),
            drain_goaways: read(&self.drain_goaways),
        }
    }
}

/// Adds one.
pub fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// The current value.
pub fn read(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// A gauge held up while this lives.
pub struct Held<'a>(&'a AtomicU64);

impl<'a> Held<'a> {
    pub fn up(gauge: &'a AtomicU64) -> Held<'a> {
        inc(gauge);
        Held(gauge)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
