//! KeyPort's wire layer: the loopback WebSocket server, the JSON-RPC types of docs/protocol.md v1, and
//! the [`Backend`] trait the agent implements. It knows nothing of tokens.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod origin;
pub mod protocol;
mod server;
pub mod text;

use std::net::{IpAddr, SocketAddr};

pub use origin::{InvalidOrigin, Origin};
pub use server::{
    bind, Backend, BoundServer, Broadcaster, CancelSignal, CancelTrigger, ConnectionId, Limits,
    Notifier, RequestContext, ServerConfig, DEFAULT_PORT,
};
#[doc(hidden)]
pub use server::{judge_handshake, peer_uid_in_table};

/// Errors of the bridge itself (protocol errors towards a page are [`protocol::RpcError`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `ServerConfig::bind` is empty.
    #[error("no address to bind")]
    NoBindAddress,
    /// The bridge serves loopback only.
    #[error("{addr} is not a loopback address; the bridge binds loopback only")]
    NotLoopback {
        /// The refused address.
        addr: IpAddr,
    },
    /// Another process holds the port (the bridge never falls back to another one).
    #[error("{addr} is already in use")]
    PortInUse {
        /// The address that could not be bound.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Binding failed for another reason (e.g. no IPv6 loopback on this host).
    #[error("cannot bind {addr}")]
    Bind {
        /// The address that could not be bound.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}
