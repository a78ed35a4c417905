#![forbid(unsafe_code)]

pub mod pinentry;
