#![forbid(unsafe_code)]

pub mod harness;
pub mod pinentry;
pub mod skf;
