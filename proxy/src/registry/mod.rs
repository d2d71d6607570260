//! The registry: what weft knows about the cluster.
//!
//! One immutable [`Snapshot`] of Namespaces (labels), Nodes (addresses), Pods, Services, the
//! security policies and the routing kinds (VirtualService, DestinationRule, ServiceEntry,
//! HTTPRoute, GRPCRoute), typed and checked, and, kept raw, every other object. A change builds a whole new snapshot and swaps it in atomically; readers
//! take an `Arc` and never see a half-applied change.
//!
//! - [`model`]: the compact types and the queries the data path asks ([`Snapshot::resolve`],
//!   [`Snapshot::endpoints`], [`Snapshot::pod_by_ip`], …).
//! - [`build`]: Kubernetes objects (k8s-openapi types) → model, with semantic checks. Every source
//!   feeds this same builder.
//! - [`kinds`]: the Istio and Gateway API kinds and versions weft reads, their validation, and
//!   what becomes of unknown ones (not applied; in `security.istio.io`, fail closed).
//! - [`file`]: the YAML source — a file or a directory of `*.yaml`/`*.yml` files, re-read on
//!   change.
//!
//! Objects are checked one by one ([`convert`]): an invalid one is left out and reported
//! (`file:line: document N (Kind ns/name): field.path: reason`, or `Kind ns/name` and the
//! field path from the API) while every other object applies. An invalid edit of an object
//! keeps its previous version in force, except for security kinds: an invalid
//! AuthorizationPolicy or PeerAuthentication fails closed ([`FailEffect`]).
//!
//! [`Registry`] holds the current snapshot, numbers generations, remembers the last failed load
//! (the snapshot in force stays) and tells subscribers about new snapshots.
//!
//! May import: `memory` (the Kubernetes source hands back what its lists freed); nothing else
//! of weft.

pub mod build;
pub mod file;
#[cfg(test)]
pub mod fixtures;
pub mod kinds;
pub mod kube;
pub mod model;
pub mod workload;

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use tokio::sync::watch;

pub use build::{
    convert, Conversion, Converted, FieldError, Inserted, Object, ObjectKey, SnapshotBuilder,
};
pub use file::{FileSource, LoadError, LoadErrors, WatchConfig};
pub use kinds::gateway::{GrpcRoute, HttpRoute};
pub use kinds::networking::{DestinationRule, ServiceEntry, VirtualService};
pub use kinds::security::{AuthorizationPolicy, PeerAuthentication};
pub use kinds::Meta;
pub use model::{
    ser_arc, ContainerPort, Endpoint, EndpointSlice, FailClosed, FailEffect, Labels, Node, Pod,
    Problem, QosClass, RawObject, Resolved, Service, ServicePort, Snapshot, TargetPort,
    CLUSTER_DOMAIN, ENROLL_LABEL, ENROLL_VALUE,
};

/// The current snapshot, its generation, the last failed load and the subscribers.
pub struct Registry {
    current: ArcSwap<Snapshot>,
    tx: watch::Sender<Arc<Snapshot>>,
    state: Mutex<State>,
}

struct State {
    generation: u64,
    /// The most recent failed load, cleared by a good one.
    error: Option<LoadErrors>,
}

impl Registry {
    /// A registry serving `snapshot` (its generation is where numbering continues).
    pub fn new(snapshot: Snapshot) -> Registry {
        let generation = snapshot.generation;
        let snapshot = Arc::new(snapshot);
        Registry {
            current: ArcSwap::new(snapshot.clone()),
            tx: watch::Sender::new(snapshot),
            state: Mutex::new(State {
                generation,
                error: None,
            }),
        }
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// A receiver that sees every new snapshot.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    /// The errors of the most recent load if it failed (one per line); cleared by a good one.
    pub fn last_error(&self) -> Option<String> {
        self.state.lock().error.as_ref().map(|e| e.to_string())
    }

    /// The most recent failed load, if the latest one failed.
    pub fn error(&self) -> Option<LoadErrors> {
        self.state.lock().error.clone()
    }

    /// Records that a load failed (`Some`) or succeeded without a change (`None`).
    pub fn set_error(&self, error: Option<LoadErrors>) {
        self.state.lock().error = error;
    }

    /// Publishes a snapshot built by a source, with the next generation; clears the error.
    pub fn publish(&self, builder: SnapshotBuilder, sources: Vec<PathBuf>) -> Arc<Snapshot> {
        self.publish_with(|_, generation| builder.build(generation, sources))
    }

    /// Publishes the snapshot `make` derives from the one in force, with the next generation
    /// (given to it); clears the error.
    pub fn publish_with(&self, make: impl FnOnce(&Snapshot, u64) -> Snapshot) -> Arc<Snapshot> {
        let mut state = self.state.lock();
        state.generation += 1;
        state.error = None;
        let current = self.current.load_full();
        let snapshot = Arc::new(make(&current, state.generation));
        self.current.store(snapshot.clone());
        self.tx.send_replace(snapshot.clone());
        snapshot
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("generation", &self.current.load().generation)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
