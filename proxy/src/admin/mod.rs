//! The admin API: [`api`] (the typed contract), [`server`] (what the node serves, on a Unix
//! socket and a loopback address) and [`client`] (what the CLI asks with).
//!
//! May import: `limits` (the admin and metrics listeners' connection limits). Data-path
//! modules return [`api`] types from their status queries; the node implements
//! [`server::NodeView`]; the CLI decodes [`api`] types.

pub mod api;
pub mod client;
pub mod server;
