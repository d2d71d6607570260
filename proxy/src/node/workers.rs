//! The data-path threads: each worker runs a single-threaded runtime that accepts from the
//! capture and HBONE listeners and serves what it accepted from start to end, with upstream
//! HTTP connections of its own (Envoy's worker model). A request's tasks never hop between
//! threads; the control plane (registry, reconcile, admin, metrics) stays on the main runtime.
//!
//! Every worker waits on the same listening sockets: whichever is free first accepts, so a
//! busy worker leaves new connections to the others.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tracing::{error, info};

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
async fn heartbeat() {
    loop {
        tokio::time::sleep(HEARTBEAT).await;
    }
}

/// The listening sockets as the node keeps them to hand over (each worker has its own copy).
#[derive(Debug)]
pub struct Listening {
    pub capture: std::net::TcpListener,
    pub tunnels: std::net::TcpListener,
}

/// Starts `n` workers serving `capture` (outbound) and `hbone` (inbound) connections. A
/// worker stops accepting once the listeners are handed to a successor, and runs on until the
/// process exits so what it accepted is served to its end.
pub fn start(
    n: usize,
    outbound: Arc<Outbound>,
    hbone: Arc<Server<Inbound>>,
    capture: TcpListener,
    tunnels: TcpListener,
) -> anyhow::Result<Listening> {
    let capture = capture.into_std().context("capture listener")?;
    let tunnels = tunnels.into_std().context("HBONE listener")?;
    for i in 0..n {
        let capture = capture
            .try_clone()
            .context("sharing the capture listener")?;
        let tunnels = tunnels.try_clone().context("sharing the HBONE listener")?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name(format!("weft-worker-{i}"))
            .build()
            .context("starting a worker runtime")?;
        let (outbound, hbone) = (outbound.clone(), hbone.clone());
        std::thread::Builder::new()
            .name(format!("weft-worker-{i}"))
            .spawn(move || {
                crate::worker::enter(i);
                rt.block_on(async move {
                    let listeners = TcpListener::from_std(capture)
                        .and_then(|c| Ok((c, TcpListener::from_std(tunnels)?)));
                    tokio::spawn(heartbeat());
                    match listeners {
                        Ok((capture, tunnels)) => {
                            tokio::join!(outbound.serve(capture), hbone.serve(tunnels));
                            // The connections accepted are tasks of this runtime: keep it.
                            std::future::pending::<()>().await;
                        }
                        Err(e) => error!(worker = i, error = %e, "worker cannot listen"),
                    }
                })
            })
            .context("starting a worker thread")?;
    }
    info!(workers = n, "data-path workers started");
    Ok(Listening { capture, tunnels })
}
