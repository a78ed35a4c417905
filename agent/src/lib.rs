//! KeyPort's agent: the signing service behind the `keyport` binary.
//!
//! Each module holds one concept; `main.rs` is only the command line.
#![forbid(unsafe_code)]

pub mod audit;
pub mod cms;
pub mod config;
pub mod dialog;
pub mod discovery;
pub mod origins;
pub mod pinentry;
pub mod secrets;
