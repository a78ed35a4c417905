//! Vendor libraries in their own process.
//!
//! KeyPort loads code it did not write: vendor PKCS#11 modules and SKF libraries. A library
//! that crashes must not take the agent with it, and one that hangs or deadlocks must not keep
//! its tokens away until a restart. So each library can run in a *host*: a child process (the
//! same `keyport` binary in host mode) that loads the library and answers jobs, one at a time,
//! over a Unix socket pair.
//!
//! - [`frame`]: the wire between agent and host — length-prefixed, size-limited frames of
//!   `postcard`-encoded messages, opened by a versioned greeting. Buffers that may hold a PIN are
//!   zeroed once used.
//! - [`serve`]: the host's side — sandbox itself ([`sandbox`]), greet, then answer each job; it
//!   exits as soon as the agent's end of the socket closes, even while a job hangs.
//! - [`pkcs11`] and [`skf`]: each kind of library's host mode and its hosted handle (a
//!   `pkcs11_shim::Module`, an `skf_shim::Library`) over the same frames and supervisor.
//! - [`status`]: the running daemon's hosts in a small file, for `keyport doctor`.
//! - [`supervisor`]: the agent's side — start a host, call it with a deadline, notice a crash
//!   (signal, abort, exit) or a hang past the deadline, kill the host's whole process group, and
//!   start a new one on the next call after a backoff (100 ms doubling to 5 s). A call in flight
//!   when its host dies fails with [`HostError`], never with a partial answer.
//!
//! What the guarantees are, and what they are not: a host's death is always noticed (the socket
//! closes); a hang is noticed only by the deadline the caller gives; a job that was running when
//! its host died may or may not have reached the token (a signature may have been made and
//! lost — never returned).

pub mod frame;
pub mod pkcs11;
pub mod sandbox;
pub mod serve;
pub mod skf;
pub mod status;
pub mod supervisor;

pub use frame::{FrameError, MAX_FRAME, PROTOCOL_VERSION};
pub use supervisor::{HostError, HostStatus, Supervisor};
