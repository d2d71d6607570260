//! weft node proxy.
//!
//! The modules, in the order a connection meets them (each module's opening comment says what
//! it owns and what it may import; `docs/architecture.md` has the table):
//!
//! capture → identify ([`workload`]) → [`registry`] → plan ([`outbound`], [`policy`]), route
//! ([`l7`]) →
//! tunnel ([`tunnel`], [`identity`]) | deliver ([`upstream`], [`inbound`]) → [`relay`] →
//! record ([`telemetry`]). [`admin`] serves what the node knows, [`cli`] renders it, [`node`]
//! wires it all together and runs the data path on [`worker`] threads.

pub mod ca;
pub mod config;
pub mod drain;
pub mod exchange;
pub mod limits;

pub mod batch;
pub mod capture;
pub mod identity;
pub mod inbound;
pub mod l7;
pub mod outbound;
pub mod policy;
pub mod registry;
pub mod relay;
pub mod telemetry;
pub mod tunnel;
pub mod upstream;
pub mod worker;
pub mod workload;

pub mod admin;
pub mod cli;
pub mod inputs;
pub mod memory;
pub mod netns;
pub mod node;
