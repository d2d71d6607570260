//! Draining: how a node that stops (SIGTERM, or a successor that took its listeners over) lets
//! what it serves finish instead of cutting it.
//!
//! Three phases, told to every part of the data path through a [`Draining`]:
//! - **serving**: as usual;
//! - **draining** ([`Draining::started`]): accept nothing more, ask clients to go elsewhere
//!   (HTTP/2 `GOAWAY`, HTTP/1 `Connection: close`), let open connections and requests run on;
//! - **closing** ([`Draining::closing`]): the drain timeout is reached; what is still open is
//!   closed cleanly (FIN, not RST) and recorded as cut by the drain.
//!
//! Apart from the phase: whether the listening sockets were handed to a successor
//! ([`Draining::handed_over`]). Only then do the accept loops stop: a node that drains on its own
//! (SIGTERM, nobody to take over) keeps accepting, so no connection is refused while it is the
//! only one listening, and a successor started meanwhile can still take the sockets over.
//!
//! Every connection in flight holds a [`Hold`]: [`Trigger::drained`] ends once none is left,
//! which is when the process may exit early.
//!
//! May import: nothing.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{watch, Notify};

/// Why a connection still open at the drain timeout ended (its flow's error).
pub const CUT: &str = "closed: the node stopped and its drain timeout was reached";

/// Where the node is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Serving,
    Draining,
    Closing,
}

#[derive(Debug)]
struct Shared {
    phase: watch::Sender<Phase>,
    handed_over: watch::Sender<bool>,
    /// Connections in flight ([`Hold`]s alive).
    in_flight: AtomicUsize,
    /// Told when `in_flight` drops to zero.
    idle: Notify,
}

/// What the data path watches. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Draining {
    shared: Arc<Shared>,
}

/// What starts the drain and learns when it is over (the composition root holds it).
#[derive(Debug)]
pub struct Trigger {
    shared: Arc<Shared>,
}

/// A connection (or request) in flight: the drain waits for it until the drain timeout.
#[derive(Debug)]
pub struct Hold {
    shared: Arc<Shared>,
}

/// A new pair: serving until [`Trigger::start`].
pub fn channel() -> (Trigger, Draining) {
    let shared = Arc::new(Shared {
        phase: watch::Sender::new(Phase::Serving),
        handed_over: watch::Sender::new(false),
        in_flight: AtomicUsize::new(0),
        idle: Notify::new(),
    });
    (
        Trigger {
            shared: shared.clone(),
        },
        Draining { shared },
    )
}

impl Draining {
    /// A node that never drains (tests, tools).
    pub fn never() -> Draining {
        channel().1
    }

    /// The phase now.
    pub fn phase(&self) -> Phase {
        *self.shared.phase.borrow()
    }

    pub fn is_draining(&self) -> bool {
        self.phase() >= Phase::Draining
    }

    /// Ends once draining has begun (at once if it has).
    pub async fn started(&self) {
        self.reached(Phase::Draining).await
    }

    /// Ends once the drain timeout is reached (at once if it was).
    pub async fn closing(&self) {
        self.reached(Phase::Closing).await
    }

    pub fn is_handed_over(&self) -> bool {
        *self.shared.handed_over.borrow()
    }

    /// Ends once the listening sockets belong to a successor: stop accepting.
    pub async fn handed_over(&self) {
        let mut rx = self.shared.handed_over.subscribe();
        let _ = rx.wait_for(|h| *h).await;
    }

    /// [`Draining::closing`], as the reason a relay or connection cut by it records.
    pub async fn cut(&self) -> String {
        self.closing().await;
        CUT.to_string()
    }

    async fn reached(&self, phase: Phase) {
        let mut rx = self.shared.phase.subscribe();
        // The sender lives as long as `self`: `wait_for` fails only if it is dropped.
        let _ = rx.wait_for(|p| *p >= phase).await;
    }

    /// Counts one connection in flight until the returned [`Hold`] is dropped.
    pub fn hold(&self) -> Hold {
        self.shared.in_flight.fetch_add(1, Ordering::AcqRel);
        Hold {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if self.shared.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.idle.notify_waiters();
        }
    }
}

impl Trigger {
    /// Serving → draining (no effect if already further).
    pub fn start(&self) {
        self.shared.phase.send_if_modified(|p| {
            let moved = *p < Phase::Draining;
            if moved {
                *p = Phase::Draining;
            }
            moved
        });
    }

    /// The listening sockets are a successor's now: the accept loops stop.
    pub fn hand_over(&self) {
        self.shared.handed_over.send_replace(true);
    }

    /// → closing: the drain timeout is reached.
    pub fn close(&self) {
        self.shared.phase.send_if_modified(|p| {
            let moved = *p < Phase::Closing;
            *p = Phase::Closing;
            moved
        });
    }

    /// Connections still in flight.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::Acquire)
    }

    /// Ends once nothing is in flight.
    pub async fn drained(&self) {
        loop {
            let idle = self.shared.idle.notified();
            tokio::pin!(idle);
            // Registered before the check, so a drop in between is not missed.
            idle.as_mut().enable();
            if self.in_flight() == 0 {
                return;
            }
            idle.await;
        }
    }

    /// What the data path is given.
    pub fn draining(&self) -> Draining {
        Draining {
            shared: self.shared.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn phases_move_forward_only() {
        let (trigger, draining) = channel();
        assert_eq!(draining.phase(), Phase::Serving);
        trigger.close();
        trigger.start();
        assert_eq!(
            draining.phase(),
            Phase::Closing,
            "start after close does not go back"
        );
        draining.started().await;
        draining.closing().await;
    }

    #[tokio::test]
    async fn accepting_stops_only_when_handed_over() {
        let (trigger, draining) = channel();
        trigger.start();
        let stop = tokio::spawn({
            let d = draining.clone();
            async move { d.handed_over().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!stop.is_finished(), "draining alone keeps the listeners");
        trigger.hand_over();
        stop.await.unwrap();
    }

    #[tokio::test]
    async fn started_waits_for_the_trigger() {
        let (trigger, draining) = channel();
        let waiter = tokio::spawn({
            let d = draining.clone();
            async move { d.started().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        trigger.start();
        waiter.await.unwrap();
        assert!(draining.is_draining());
        assert_eq!(draining.phase(), Phase::Draining);
    }

    #[tokio::test]
    async fn drained_waits_for_every_hold() {
        let (trigger, draining) = channel();
        trigger.drained().await;
        let a = draining.hold();
        let b = draining.clone().hold();
        assert_eq!(trigger.in_flight(), 2);
        let done = tokio::spawn(async move { trigger.drained().await });
        drop(a);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!done.is_finished(), "one connection is still in flight");
        drop(b);
        tokio::time::timeout(Duration::from_secs(5), done)
            .await
            .expect("drained once the last hold is dropped")
            .unwrap();
    }
}
