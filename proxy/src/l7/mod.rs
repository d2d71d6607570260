//! The L7 engine's decisions, pure, with no I/O: what the HTTP data path asks per connection
//! and per request.
//!
//! - [`route`]: the route table compiled once per snapshot from VirtualServices, HTTPRoutes,
//!   GRPCRoutes, DestinationRules and ServiceEntries; per request, what to do.
//! - [`protocol`]: which application protocol a Service or ServiceEntry port declares;
//!   [`sniff`]: what the first bytes of an undeclared one are.
//! - [`hygiene`]: what a request must look like before it goes anywhere.
//! - [`respond`]: the responses weft makes itself, with Envoy's response flags.
//!
//! May import: `registry`, `config`.

pub mod hygiene;
pub mod protocol;
pub mod respond;
pub mod route;
pub mod sniff;
