//! KeyPort's agent: the signing service behind the `keyport` binary.
//!
//! Each module holds one concept; `main.rs` is only the command line.
#![forbid(unsafe_code)]

pub mod audit;
pub mod audit_cli;
pub mod backend;
pub mod cms;
pub mod config;
pub mod config_keys;
pub mod consent;
pub mod daemon;
pub mod demo;
pub mod dialog;
pub mod discovery;
pub mod doctor;
pub mod enroll;
pub mod files;
pub mod host;
pub mod journal;
pub mod local;
pub mod origins;
pub mod pcsc_watch;
pub mod pinentry;
pub mod policy;
pub mod purpose;
pub mod secrets;
pub mod service;
pub mod skf_watch;
pub mod tokens;
pub mod webeid;
