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
//! - Enrollment: [`Library::generate_sm2`] makes an SM2 signing key pair in a new container
//!   (`SKF_CreateContainer`, `SKF_GenECCKeyPair`) and gives its SubjectPublicKeyInfo for the
//!   certificate request; [`Library::import_certificate`] checks the issued certificate against
//!   the container's key and writes it (`SKF_ImportCertificate`), never replacing one silently.
//! - Device events: [`Library::events`] (`SKF_WaitForDevEvent` on its own thread).
//!
//! Bindings: written here from the standard's header (`ffi.rs`, the crate's only `unsafe`);
//! the crates.io `skf-rs`/`skf-api` were reviewed and not used (see the commit message).
#![deny(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]

mod algorithm;
mod certificate;
mod enroll;
mod error;
mod events;
mod ffi;
mod library;
mod pin;
pub mod remote;
mod token;
mod worker;

pub use algorithm::{
    digest_info, sm2_e, sm2_signature, sm2_z, HashAlg, SignAlgorithm, SignInput, SignRequest,
    Sm2Encoding, DEFAULT_SM2_USER_ID,
};
pub use certificate::{CertificateId, CertificateInfo, KeyAlgorithm, KeyUsage, SM2_CURVE_OID};
pub use enroll::{sm2_spki, GeneratedKey, ImportMode, NewContainer};
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

    /// Jobs and answers cross the host process's postcard frames (issue 11) unchanged, and an
    /// id that arrives malformed is refused, not trusted.
    #[test]
    fn jobs_and_answers_round_trip_through_postcard() {
        use crate::*;
        let token = TokenId::derive(std::path::Path::new("/l.so"), "S", "", "");
        let app = ApplicationId::from_raw(token.clone(), b"\xd3\xa6\xd3\xc3");
        let req = SignRequest {
            certificate: CertificateId::new(app.clone(), "SM2/签名"),
            algorithm: SignAlgorithm::sm2(Sm2Encoding::Raw),
            inputs: vec![
                SignInput::Message(b"m".to_vec()),
                SignInput::Digest(vec![7; 32]),
            ],
            logout_after: true,
        };
        let bytes = postcard::to_allocvec(&req).expect("encode");
        assert_eq!(
            postcard::from_bytes::<SignRequest>(&bytes).expect("decode"),
            req
        );
        let status = PinStatus::from_counts(6, 5, false);
        let bytes = postcard::to_allocvec(&status).expect("encode");
        assert_eq!(
            postcard::from_bytes::<PinStatus>(&bytes).expect("decode"),
            status
        );
        let forged = postcard::to_allocvec("skf-NOT-HEX").expect("encode");
        assert!(postcard::from_bytes::<TokenId>(&forged).is_err());
    }
}
