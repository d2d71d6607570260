//! The L7 engine's configuration half: what the HTTP data path asks per request, answered by
//! pure functions over a snapshot, with no I/O.
//!
//! - [`route`]: the route table compiled once per snapshot from VirtualServices, HTTPRoutes,
//!   GRPCRoutes, DestinationRules and ServiceEntries; per request, what to do.
//! - [`protocol`]: which application protocol a Service or ServiceEntry port declares.
//!
//! May import: `registry`, `config`.

pub mod protocol;
pub mod route;
