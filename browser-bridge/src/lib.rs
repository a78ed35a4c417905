//! KeyPort's wire layer: the loopback WebSocket server, the JSON-RPC types of PROTOCOL.md v1, and
//! the [`Backend`] trait the agent implements. It knows nothing of tokens.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod origin;
pub mod protocol;

pub use origin::{InvalidOrigin, Origin};
