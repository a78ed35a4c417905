//! KeyPort's typed, thread-confined layer over PKCS#11 tokens.
//!
//! One [`Module`] per loaded PKCS#11 library. Each module is driven by one dedicated worker
//! thread that owns the cryptoki context, its sessions and its caches; the public methods send
//! a message to that thread and block for the answer (call them from `spawn_blocking` in async
//! code). No cryptoki type appears in this API.
//!
//! Logins follow one rule: the PIN comes from a [`PinProvider`] and goes to exactly one
//! `C_Login`; after a wrong PIN the provider is asked again — the shim never retries a PIN.
#![forbid(unsafe_code)]

mod algorithm;
mod certificate;
mod error;
mod module;
mod pin;
mod token;
mod worker;

pub use algorithm::{
    digest_info, ecdsa_der_to_p1363, ecdsa_p1363_to_der, EcdsaEncoding, HashAlg, SignAlgorithm,
    SignInput, SignRequest,
};
#[doc(hidden)]
pub use certificate::parse_certificate_for_fuzzing;
pub use certificate::{CertificateId, CertificateInfo, KeyAlgorithm, KeyUsage};
pub use error::{Error, SignFailure};
pub use module::{LoadOptions, Module, Progress, DEFAULT_CALL_TIMEOUT};
pub use pin::{LoginKind, PinAnswer, PinProvider, PinRequest, SecretPin};
pub use token::{LoginState, ModuleInfo, ParseIdError, PinStatus, TokenId, TokenInfo};
