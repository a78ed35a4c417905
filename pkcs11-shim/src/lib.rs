//! KeyPort's typed, thread-confined layer over PKCS#11 tokens.
//!
//! One [`Module`] per loaded PKCS#11 library. Each module is driven by one dedicated worker
//! thread that owns the cryptoki context, its sessions and its caches; the public methods send
//! a message to that thread and block for the answer (call them from `spawn_blocking` in async
//! code). No cryptoki type appears in this API.
//!
//! A signing job is plain data ([`SignRequest`] and a [`Credential`]): the user's one answer
//! to one dialog. The worker logs in with it at most once per login kind and answers with the
//! signatures, or a typed reason to ask the user again ([`Error::PinIncorrect`],
//! [`Error::LoginRequired`]) or to stop ([`Error::PinLocked`], …). It never asks anyone and
//! never retries a PIN.
//!
//! `unsafe` is denied in the crate and allowed in one module only, `raw` (the lone `C_Sign` that
//! cryptoki 0.12 lacks); every block there says why it is sound.
#![deny(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]

mod algorithm;
mod certificate;
mod error;
mod keygen;
mod module;
mod pin;
mod raw;
pub mod remote;
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
pub use keygen::{
    key_id, DeleteCertificateRequest, DeleteKeyRequest, GenerateRequest, GeneratedKey, ImportMode,
    ImportRequest, Imported, KeySignRequest, KeySpec, Removed,
};
pub use module::{LoadOptions, Module, Progress, DEFAULT_CALL_TIMEOUT};
pub use pin::{Credential, LoginKind, SecretPin};
pub use token::{LoginState, ModuleInfo, ParseIdError, PinStatus, TokenId, TokenInfo};
