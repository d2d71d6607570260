//! Polling helpers.

use crate::netns::{self, InNetns};
use anyhow::{bail, Context, Result};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

const POLL: Duration = Duration::from_millis(20);

/// Poll `cond` until it is true; error after `timeout`.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("condition not met within {timeout:?}");
        }
        std::thread::sleep(POLL);
    }
}

/// Poll `f` until it returns `Some`; error after `timeout`.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("nothing within {timeout:?}");
        }
        std::thread::sleep(POLL);
    }
}

fn resolve(addr: impl ToSocketAddrs) -> Result<SocketAddr> {
    addr.to_socket_addrs()?
        .next()
        .context("address resolves to nothing")
}

/// Connect over TCP from inside `place`'s network namespace.
///
/// The socket belongs to the test process (its cgroup), not to the pod's cgroup: weft's capture
/// does not see it. Use it for readiness probes and plain checks; for traffic "from the pod"
/// start a process with `pod.spawn`/`pod.output` (e.g. `weft-testpod call`).
pub fn tcp_connect(
    place: &(impl InNetns + ?Sized),
    addr: impl ToSocketAddrs,
    timeout: Duration,
) -> Result<TcpStream> {
    let addr = resolve(addr)?;
    let stream = netns::in_netns(place.netns_name(), || {
        TcpStream::connect_timeout(&addr, timeout)
    })?
    .with_context(|| format!("connecting to {addr} from {}", place.netns_name()))?;
    Ok(stream)
}

/// Wait until a TCP connection to `addr` from inside `place`'s netns succeeds (the connection is
/// closed right away). Same caveat as [`tcp_connect`]: not subject to capture.
pub fn wait_for_tcp(
    place: &(impl InNetns + ?Sized),
    addr: impl ToSocketAddrs,
    timeout: Duration,
) -> Result<()> {
    let addr = resolve(addr)?;
    let deadline = Instant::now() + timeout;
    let res = netns::in_netns(place.netns_name(), || loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let attempt = left.clamp(Duration::from_millis(10), Duration::from_millis(500));
        let err = match TcpStream::connect_timeout(&addr, attempt) {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(err);
        }
        std::thread::sleep(POLL);
    })?;
    match res {
        Ok(()) => Ok(()),
        Err(e) => bail!(
            "{addr} not reachable from {} within {timeout:?}: {e}",
            place.netns_name()
        ),
    }
}
