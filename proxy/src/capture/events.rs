//! Redirect events: the ring buffer the programs write one record to per redirected connect,
//! read on readiness and on a short timer and handed to the outbound path on a channel.

use std::io;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use tokio::io::{unix::AsyncFd, Interest};
use tokio::sync::{mpsc, watch};
use tracing::warn;
use weft_common::RedirectEvent as RawEvent;

use super::{redirect_of, Capture, RedirectEvent};

/// Capacity of the channel returned by [`Capture::events`]. When the consumer falls behind, the
/// kernel ring buffer fills up and the programs count `events_dropped`.
const EVENT_CHANNEL: usize = 4096;
/// How often the redirect-event ring buffer is drained when nothing wakes its reader: the
/// programs wake it once a quarter of the ring waits ([`weft_common::EVENTS_WAKE_BYTES`]), so
/// the timer only collects the few records of a quiet node.
const EVENTS_DRAIN_EVERY: Duration = Duration::from_millis(100);

impl Capture {
    /// Redirect events from the ring buffer, delivered on a tokio mpsc channel by a background
    /// task. Must be called from within a tokio runtime, once. The task ends when the receiver
    /// or the `Capture` is dropped.
    pub fn events(&self) -> anyhow::Result<mpsc::Receiver<RedirectEvent>> {
        let handle = tokio::runtime::Handle::try_current()
            .context("Capture::events must be called from within a tokio runtime")?;
        let ring = self
            .events
            .lock()
            .take()
            .context("Capture::events was already called")?;
        let _enter = handle.enter();
        // SAFETY: the RingBuf owns its map fd and returns that same fd for as long as it lives.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(io::Error::from)
            .context("registering the EVENTS ring buffer with tokio")?;
        let (tx, rx) = mpsc::channel(EVENT_CHANNEL);
        let shutdown = self.shutdown.subscribe();
        handle.spawn(pump_events(ring, tx, shutdown));
        Ok(rx)
    }
}

async fn pump_events(
    mut ring: AsyncFd<RingBuf<MapData>>,
    tx: mpsc::Sender<RedirectEvent>,
    mut shutdown: watch::Receiver<()>,
) {
    let mut batch = Vec::new();
    // The programs wake us only when a quarter of the ring waits (a wake-up per connect is
    // costly for the pod that connects), so the ring is drained on a timer as well.
    let drain = tokio::time::sleep(EVENTS_DRAIN_EVERY);
    tokio::pin!(drain);
    loop {
        tokio::select! {
            ready = ring.readable_mut() => {
                let mut guard = match ready {
                    Ok(guard) => guard,
                    Err(err) => {
                        warn!("waiting on the EVENTS ring buffer: {err}");
                        return;
                    }
                };
                drain_ring(guard.get_inner_mut(), &mut batch);
                guard.clear_ready();
            }
            () = &mut drain => {
                drain_ring(ring.get_mut(), &mut batch);
                drain.as_mut().reset(tokio::time::Instant::now() + EVENTS_DRAIN_EVERY);
            }
            _ = shutdown.changed() => return,
            _ = tx.closed() => return,
        }
        let boot = boot_time();
        for raw in batch.drain(..) {
            let event = RedirectEvent {
                redirect: redirect_of(&raw.orig),
                time: boot + Duration::from_nanos(raw.boot_ns),
            };
            if tx.send(event).await.is_err() {
                return;
            }
        }
    }
}

/// Reads every record waiting in the ring.
fn drain_ring(ring: &mut RingBuf<MapData>, batch: &mut Vec<RawEvent>) {
    while let Some(item) = ring.next() {
        if item.len() < std::mem::size_of::<RawEvent>() {
            warn!(len = item.len(), "short record in EVENTS");
            continue;
        }
        // SAFETY: the record holds at least one RawEvent (plain old data).
        batch.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<RawEvent>()) });
    }
}

/// The wall-clock time of boot, to convert `CLOCK_BOOTTIME` stamps (`bpf_ktime_get_boot_ns`).
fn boot_time() -> SystemTime {
    let now = |clock| {
        // SAFETY: clock_gettime writes into `ts`.
        let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
        unsafe { libc::clock_gettime(clock, &mut ts) };
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    };
    let since_boot = now(libc::CLOCK_BOOTTIME);
    let since_epoch = now(libc::CLOCK_REALTIME);
    UNIX_EPOCH + since_epoch.saturating_sub(since_boot)
}
