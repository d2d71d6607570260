//! Telemetry: what the node records about the traffic it handles, in one place.
//!
//! - [`record`]: one [`ConnectionRecord`] per connection, built when the connection is
//!   accepted, filled as the plan and the relay progress, emitted once (on `finish`, or on drop
//!   if nobody finished it): the flow and the counters come from it, never from anywhere else.
//! - [`flow_log`]: the flow log (bounded ring + live feed) behind `/flows` and `weft flows`.
//! - [`counters`]: the HBONE client and server counters, and the connections being relayed.
//! - [`metrics`]: Prometheus `/metrics`, read from the above at scrape time.
//!
//! May import: `admin::api` (the record types), `registry` (pod and service names), `identity`
//! (SPIFFE ids), `relay` (byte counts), `config` (defaults).

pub mod counters;
pub mod flow_log;
pub mod metrics;
pub mod record;

pub use counters::{ClientCounters, ServerCounters};
pub use flow_log::FlowLog;
pub use record::{shared, ConnectionRecord, Names, RequestRecord, RequestTemplate};

use std::sync::atomic::{AtomicU64, Ordering};

/// The node's telemetry sinks, shared by every path.
pub struct Telemetry {
    node: String,
    pub flows: FlowLog,
    /// HBONE client pool (outbound tunnels).
    pub hbone_client: ClientCounters,
    /// HBONE server (`:15008`).
    pub hbone_server: ServerCounters,
    /// Connections being relayed now.
    active: AtomicU64,
}

impl Telemetry {
    /// Telemetry of node `node`, keeping up to `flow_capacity` flows.
    pub fn new(node: impl Into<String>, flow_capacity: usize) -> Telemetry {
        Telemetry {
            node: node.into(),
            flows: FlowLog::new(flow_capacity),
            hbone_client: ClientCounters::default(),
            hbone_server: ServerCounters::default(),
            active: AtomicU64::new(0),
        }
    }

    /// The node every record is attributed to.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Connections being relayed now.
    pub fn active_connections(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("node", &self.node)
            .field("flows", &self.flows.len())
            .field("active", &self.active_connections())
            .finish_non_exhaustive()
    }
}
