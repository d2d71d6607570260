//! weft node proxy.
//!
//! The data path, one module per step: [`capture`] (eBPF redirect and original destination) →
//! identify the source workload by cgroup ([`registry`]) → [`outbound`] (resolve, connect) →
//! [`forward`] (move the bytes) → [`flows`] (what happened). [`admin`] serves it, [`cli`] shows it.

pub mod admin;
pub mod capture;
pub mod cli;
pub mod config;
pub mod flows;
pub mod forward;
pub mod identity;
pub mod inbound;
pub mod metrics;
pub mod node;
pub mod outbound;
pub mod policy;
pub mod registry;
pub mod tunnel;
