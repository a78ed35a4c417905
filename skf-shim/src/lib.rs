//! KeyPort's typed, thread-confined layer over SKF libraries (GM/T 0016-2012, the "smart token
//! crypto application interface" that Chinese USB keys' vendors ship).
//!
//! One [`Library`] per loaded SKF library. Each is driven by one dedicated worker thread that
//! owns every device, application and container handle; the public methods send plain data to
//! that thread and block for the answer (call them from `spawn_blocking` in async code). No
//! SKF type appears in this API.
//!
//! - PIN: [`Library::verify_pin`] makes exactly one `SKF_VerifyPIN` (none when the PIN is
//!   locked); a wrong PIN comes back as [`Error::PinIncorrect`] with the tries left, and the
//!   caller decides whether to ask the user again. The shim never retries a PIN, never logs it,
//!   and wipes its copies.
//! - SM2: `SKF_ECCSignData` signs e = SM3(Z ‖ M); the shim computes Z from the signing
//!   certificate's public key and the user ID (default `1234567812345678`) and e from the
//!   message, or takes e as given. Output is DER `SEQUENCE { r, s }` or `r ‖ s`.
//! - RSA containers: `SKF_RSASignData` over a PKCS#1 DigestInfo.
//! - Device events: [`Library::events`] (`SKF_WaitForDevEvent` on its own thread).
//!
//! Bindings: written here from the standard's header (`ffi.rs`, the crate's only `unsafe`);
//! the crates.io `skf-rs`/`skf-api` were reviewed and not used (see the commit message).
#![deny(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]

mod algorithm;
mod certificate;
mod error;
mod events;
mod ffi;
mod library;
mod pin;
mod token;
mod worker;

pub use algorithm::{
    digest_info, sm2_e, sm2_signature, sm2_z, HashAlg, SignAlgorithm, SignInput, SignRequest,
    Sm2Encoding, DEFAULT_SM2_USER_ID,
};
pub use certificate::{CertificateId, CertificateInfo, KeyAlgorithm, KeyUsage, SM2_CURVE_OID};
pub use error::{sar_name, Error, SignFailure};
pub use events::{DeviceEvent, DeviceEventKind, DeviceEvents};
pub use library::{Library, LoadOptions, DEFAULT_CALL_TIMEOUT};
pub use pin::SecretPin;
pub use token::{ApplicationId, ApplicationInfo, ParseIdError, PinStatus, TokenId, TokenInfo};

#[cfg(test)]
mod tests {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}

    #[test]
    fn handles_cross_threads_as_async_callers_need() {
        send_sync::<crate::Library>();
        send::<crate::DeviceEvents>();
        send_sync::<crate::Error>();
        send_sync::<crate::SignRequest>();
    }
}
