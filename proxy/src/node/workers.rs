//! The data-path threads: each worker runs a single-threaded runtime that accepts from the
//! capture and HBONE listeners and serves what it accepted from start to end, with upstream
//! HTTP connections of its own (Envoy's worker model). A request's tasks never hop between
//! threads; the control plane (registry, reconcile, admin, metrics) stays on the main runtime.
//!
//! Each address is listened on by a group of sockets, one per worker (`SO_REUSEPORT`, as Envoy
//! and nginx's `reuseport` do): the kernel hashes each new connection to one socket, and only
//! that socket's worker wakes for it. A single socket all workers waited on woke every idle
//! worker's epoll for every connection (tokio does not use `EPOLLEXCLUSIVE`), all but one to
//! find nothing: a cost that grows with the number of workers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use socket2::{Domain, Socket, Type};
use tokio::net::TcpListener;
use tracing::{error, info, warn};

use crate::inbound::Inbound;
use crate::outbound::Outbound;
use crate::tunnel::server::Server;

/// How often a worker's timer fires when nothing else is due (see [`heartbeat`]).
const HEARTBEAT: Duration = Duration::from_secs(1);

/// A timer always due within [`HEARTBEAT`], for the whole life of a worker. tokio's timer
/// wakes its runtime's (possibly busy) thread with a `write(2)` to an eventfd whenever a timer
/// is registered that is due before the earliest one the runtime last parked with, and for
/// every timer when it parked with none. Every connection registers a few (connect timeout,
/// idle watch, due seconds to hours away): without this, a `write(2)` and a spurious
/// `epoll_wait(2)` return per connection; with it, none of them is ever the earliest.
///
/// Each beat also looks at how often the worker woke and how long it worked since the last
/// one: the first beat of a quiet spell, and a beat whose load fell to a fraction of its peak,
/// hand what the worker freed back to the system ([`crate::memory::Quiet`]), and the last
/// worker to go quiet the pages of the code the traffic ran ([`crate::memory::Workers`]).
async fn heartbeat(workers: Arc<crate::memory::Workers>) {
    let metrics = tokio::runtime::Handle::current().metrics();
    let mut quiet = crate::memory::Quiet::default();
    loop {
        tokio::time::sleep(HEARTBEAT).await;
        // A current-thread runtime is its one worker, 0.
        workers.beat(quiet.beat(
            metrics.worker_park_count(0),
            metrics.worker_total_busy_duration(0),
        ));
    }
}

/// The most sockets in a group: workers beyond it share them.
pub const MAX_GROUP: usize = 64;
/// Each socket's accept queue (tokio's default for one listener).
const BACKLOG: i32 = 1024;

/// The listening sockets as the node keeps them to hand over (each worker has its own copies).
#[derive(Debug)]
pub struct Listening {
    pub capture: Vec<std::net::TcpListener>,
    pub tunnels: Vec<std::net::TcpListener>,
}

/// The group of sockets listening on `addr` for `workers` workers: the `inherited` ones (a
/// predecessor's, all kept: closing one would drop the connections in its queue), and new ones
/// bound beside them (`SO_REUSEPORT`) up to one per worker.
pub fn listen(
    what: &str,
    addr: SocketAddr,
    workers: usize,
    mut group: Vec<std::net::TcpListener>,
) -> anyhow::Result<Vec<std::net::TcpListener>> {
    let want = workers.clamp(1, MAX_GROUP);
    // A predecessor's single socket without SO_REUSEPORT admits nobody beside it: shared.
    let joinable = group
        .iter()
        .all(|l| socket2::SockRef::from(l).reuse_port().unwrap_or(false));
    while group.len() < want && joinable {
        // Port 0: the rest join the port the first one was given.
        let addr = group
            .first()
            .and_then(|l| l.local_addr().ok())
            .unwrap_or(addr);
        match bind(addr) {
            Ok(l) => group.push(l),
            Err(e) if !group.is_empty() => {
                warn!(listener = what, %addr, error = %format!("{e:#}"), sockets = group.len(),
                    "cannot add a socket to the listener group: its workers share");
                break;
            }
            Err(e) => return Err(e).with_context(|| format!("binding the {what} listener {addr}")),
        }
    }
    for l in &group {
        // Accepted connections inherit them: dead peers are found, no per-connection call.
        crate::upstream::set_listening_options(l)
            .with_context(|| format!("{what} listener options"))?;
    }
    info!(listener = what, %addr, sockets = group.len(), "listening");
    Ok(group)
}

/// One socket of a group on `addr`.
fn bind(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(BACKLOG)?;
    Ok(s.into())
}

/// Which sockets of a group of `sockets` worker `i` of `n` accepts from: its own share when
/// there are enough to go round, else one shared with others.
fn share(i: usize, n: usize, sockets: usize) -> Vec<usize> {
    if sockets >= n {
        (i..sockets).step_by(n).collect()
    } else {
        vec![i % sockets]
    }
}

/// Starts `n` workers serving the `capture` (outbound) and `hbone` (inbound) listener groups. A
/// worker stops accepting once the listeners are handed to a successor, and runs on until the
/// process exits so what it accepted is served to its end.
pub fn start(
    n: usize,
    outbound: Arc<Outbound>,
    hbone: Arc<Server<Inbound>>,
    capture: Vec<std::net::TcpListener>,
    tunnels: Vec<std::net::TcpListener>,
) -> anyhow::Result<Listening> {
    anyhow::ensure!(
        !capture.is_empty() && !tunnels.is_empty(),
        "no listening socket"
    );
    let n = n.max(1);
    let quiet = Arc::new(crate::memory::Workers::new(n));
    for i in 0..n {
        let copies = |group: &[std::net::TcpListener]| {
            share(i, n, group.len())
                .into_iter()
                .map(|j| group[j].try_clone())
                .collect::<std::io::Result<Vec<_>>>()
        };
        let capture = copies(&capture).context("sharing the capture listeners")?;
        let tunnels = copies(&tunnels).context("sharing the HBONE listeners")?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name(format!("weft-worker-{i}"))
            .build()
            .context("starting a worker runtime")?;
        let (outbound, hbone, quiet) = (outbound.clone(), hbone.clone(), quiet.clone());
        std::thread::Builder::new()
            .name(format!("weft-worker-{i}"))
            .spawn(move || {
                crate::worker::enter(i);
                rt.block_on(async move {
                    tokio::spawn(heartbeat(quiet));
                    for l in capture {
                        match TcpListener::from_std(l) {
                            Ok(l) => drop(tokio::spawn(outbound.clone().serve(l))),
                            Err(e) => error!(worker = i, error = %e, "worker cannot listen"),
                        }
                    }
                    for l in tunnels {
                        match TcpListener::from_std(l) {
                            Ok(l) => drop(tokio::spawn(hbone.clone().serve(l))),
                            Err(e) => error!(worker = i, error = %e, "worker cannot listen"),
                        }
                    }
                    // The connections accepted are tasks of this runtime: keep it.
                    std::future::pending::<()>().await
                })
            })
            .context("starting a worker thread")?;
    }
    info!(workers = n, "data-path workers started");
    Ok(Listening { capture, tunnels })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_socket_has_a_worker_and_every_worker_a_socket() {
        for (n, sockets) in [(1, 1), (2, 2), (2, 3), (3, 2), (4, 1), (2, 5)] {
            let shares: Vec<Vec<usize>> = (0..n).map(|i| share(i, n, sockets)).collect();
            assert!(shares.iter().all(|s| !s.is_empty()), "{n} on {sockets}");
            let mut all: Vec<usize> = shares.concat();
            all.sort_unstable();
            all.dedup();
            assert_eq!(all, (0..sockets).collect::<Vec<_>>(), "{n} on {sockets}");
            if sockets >= n {
                assert_eq!(
                    shares.concat().len(),
                    sockets,
                    "none shared: {n} on {sockets}"
                );
            }
        }
    }

    #[tokio::test]
    async fn a_group_spreads_connections_and_grows_beside_inherited_sockets() {
        let group = listen("test", "127.0.0.1:0".parse().unwrap(), 2, Vec::new()).unwrap();
        assert_eq!(group.len(), 2);
        let addr = group[0].local_addr().unwrap();
        assert_eq!(group[1].local_addr().unwrap(), addr, "one address");
        let nodelay = socket2::SockRef::from(&group[1]).tcp_nodelay().unwrap();
        assert!(nodelay, "listening options on every socket");
        // A successor with more workers keeps both and binds a third beside them.
        let inherited: Vec<_> = group.iter().map(|l| l.try_clone().unwrap()).collect();
        let grown = listen("test", addr, 3, inherited).unwrap();
        assert_eq!(grown.len(), 3);
        let clients: Vec<_> = (0..30)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        let mut used = 0;
        let mut accepted = 0;
        for l in &grown {
            let before = accepted;
            while l.accept().is_ok() {
                accepted += 1;
            }
            used += usize::from(accepted > before);
        }
        assert_eq!(accepted, clients.len());
        assert!(used > 1, "the kernel spread the connections");
        // One socket without SO_REUSEPORT (bound alone) is shared, never joined.
        let alone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = alone.local_addr().unwrap();
        assert_eq!(listen("test", addr, 4, vec![alone]).unwrap().len(), 1);
    }
}
