//! The L7 engine's decisions, pure: which connections are HTTP ([`sniff`]), what a request
//! must look like before it goes anywhere ([`hygiene`]), and the responses weft makes itself
//! ([`respond`]).
//!
//! May import: `registry`, `config`.

pub mod hygiene;
pub mod respond;
pub mod sniff;
