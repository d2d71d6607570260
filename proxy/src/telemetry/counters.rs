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
