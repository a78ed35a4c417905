//! The crate's one error type, and the one place where `SAR_` codes are translated.

use std::path::PathBuf;

use crate::certificate::{CertificateId, CertificateInfo};
use crate::ffi::{Sar, SAR_DEVICE_REMOVED, SAR_PIN_INCORRECT, SAR_PIN_LOCKED};
use crate::token::{ApplicationId, TokenId};

/// Everything that can go wrong in the shim, shaped so that a caller can act on it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The key rejected the PIN (SKF_VerifyPIN → SAR_PIN_INCORRECT) and has tries left.
    #[error("incorrect PIN ({retries_left} tries left)")]
    PinIncorrect {
        /// The retry count SKF_VerifyPIN reported.
        retries_left: u32,
        /// Fewer tries left than a fresh PIN has: at least one wrong PIN since the last right
        /// one (the meaning of PKCS#11's CKF_USER_PIN_COUNT_LOW, so both back ends warn alike).
        count_low: bool,
        /// One try left: the next wrong PIN locks the key.
        final_try: bool,
    },
    /// The user PIN is locked (no tries left). Reported without calling SKF_VerifyPIN when
    /// SKF_GetPINInfo already says so, and after the wrong PIN that used the last try.
    #[error("the user PIN is locked")]
    PinLocked,
    /// Signing needs the user PIN verified first ([`crate::Library::verify_pin`]).
    #[error("the user PIN of application {0} is not verified")]
    NotLoggedIn(ApplicationId),
    /// The cancel flag was set between two signatures.
    #[error("cancelled")]
    Cancelled,
    /// The key went away (pulled out, or its handles died with it).
    #[error("the token is not present")]
    TokenNotPresent,
    /// No present device has this id.
    #[error("token {0} not found")]
    TokenNotFound(TokenId),
    /// No such application on the token.
    #[error("application {0} not found")]
    ApplicationNotFound(ApplicationId),
    /// No container with a usable signing certificate has this id.
    #[error("certificate {0} not found")]
    CertificateNotFound(CertificateId),
    /// No container with this name in the application (import into a container that is gone).
    #[error("container {} not found in application {}", .0.container(), .0.application())]
    ContainerNotFound(CertificateId),
    /// Key generation into a container that already holds a key (or a name the key refused
    /// as existing): KeyPort never overwrites a key.
    #[error("container {} already exists and holds a key", .0.container())]
    ContainerExists(CertificateId),
    /// The certificate's public key is not the signing key of the container it was to be
    /// stored in (a stranger's certificate, or one for another key). Nothing was written.
    #[error("the certificate is not for the key in container {}", .0.container())]
    CertificateNotForKey(CertificateId),
    /// The container already has a different signing certificate, and the import did not ask
    /// to replace it (SKF keeps one per container). Nothing was written.
    #[error("container {} already has a signing certificate; replacing it must be asked for", .container.container())]
    CertificateSlotTaken {
        /// The container.
        container: CertificateId,
        /// The certificate there now, as listed (for the question to the user); `None` when
        /// it is unreadable or not for the container's key (then it is not listed either).
        existing: Option<Box<CertificateInfo>>,
    },
    /// Neither the key nor the shim can do what was asked with this key.
    #[error("not supported: {algorithm} with a {key} key")]
    MechanismNotSupported {
        /// The requested algorithm, e.g. "SM2".
        algorithm: String,
        /// The key, e.g. "RSA-2048".
        key: String,
    },
    /// The request itself is malformed (wrong digest length, empty batch, bad user ID…).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The SKF library could not be loaded.
    #[error("cannot load SKF library {}", path.display())]
    LibraryLoad {
        /// The library that failed.
        path: PathBuf,
        /// Why.
        #[source]
        source: libloading::Error,
    },
    /// The library lacks functions KeyPort needs.
    #[error("SKF library {} lacks {}", path.display(), missing.join(", "))]
    FunctionsMissing {
        /// The library.
        path: PathBuf,
        /// The `SKF_` functions it does not export.
        missing: Vec<&'static str>,
    },
    /// Any other SKF failure; names the `SKF_` function and the `SAR_` code.
    #[error("{function} failed: {} (0x{code:08X})", sar_name(*code))]
    Skf {
        /// The SKF function, e.g. "SKF_ECCSignData".
        function: &'static str,
        /// The return code.
        code: u32,
    },
    /// [`crate::Library::events`] while a watch of the same library runs: SKF has one wait per
    /// library (SKF_CancelWaitForDevEvent would end both), so it has one watcher.
    #[error("device events of this SKF library are already being watched")]
    AlreadyWatching,
    /// The library did not answer within the call timeout.
    #[error("the SKF library did not answer within {} s", waited.as_secs_f64())]
    Busy {
        /// How long the caller waited.
        waited: std::time::Duration,
    },
    /// The library's worker thread is gone.
    #[error("the SKF worker thread is gone")]
    WorkerGone,
    /// The library's host process failed (crashed, hung past its deadline and was stopped,
    /// is being restarted) or broke the protocol: [`crate::Library::hosted`].
    #[error("the SKF library host failed: {0}")]
    ModuleHost(String),
    /// The library did not load in its host (what [`Error::LibraryLoad`] or
    /// [`Error::FunctionsMissing`] said there).
    #[error("the SKF library did not load in its host: {0}")]
    HostedLoad(String),
    /// A certificate on the key could not be parsed.
    #[error("certificate could not be parsed")]
    Certificate(#[source] der::Error),
    /// A DER structure the shim builds (DigestInfo, SM2 signature) was invalid.
    #[error("encoding failed: {0}")]
    Encoding(String),
}

/// A failed `sign` request: the error, and the signatures finished before it (in input order).
#[derive(Debug, thiserror::Error)]
#[error("{error} (after {} completed signatures)", completed.len())]
pub struct SignFailure {
    /// What stopped the batch.
    #[source]
    pub error: Error,
    /// Signatures finished before the error, for inputs `0..completed.len()`.
    pub completed: Vec<Vec<u8>>,
}

impl From<Error> for SignFailure {
    fn from(error: Error) -> Self {
        SignFailure {
            error,
            completed: Vec::new(),
        }
    }
}

impl Error {
    /// True when the error means the key went away: cached handles must be dropped.
    pub fn is_removal(&self) -> bool {
        matches!(self, Error::TokenNotPresent)
    }
}

/// The one translation from an SKF return code into our error. PIN answers are translated by
/// [`pin_failure`]; `SAR_USER_NOT_LOGGED_IN` needs the application and is mapped by the caller.
pub(crate) fn from_sar(sar: Sar) -> Error {
    match sar.code {
        SAR_DEVICE_REMOVED => Error::TokenNotPresent,
        SAR_PIN_LOCKED => Error::PinLocked,
        code => Error::Skf {
            function: sar.function,
            code,
        },
    }
}

/// SKF_VerifyPIN failed with `sar`, reporting `retries_left`.
pub(crate) fn pin_failure(sar: Sar, retries_left: u32, max_retries: u32) -> Error {
    match sar.code {
        SAR_PIN_INCORRECT if retries_left == 0 => Error::PinLocked,
        SAR_PIN_INCORRECT => Error::PinIncorrect {
            retries_left,
            count_low: count_low(retries_left, max_retries),
            final_try: retries_left == 1,
        },
        _ => from_sar(sar),
    }
}

/// "The count is low": fewer tries left than the maximum, i.e. a wrong PIN was entered since the
/// last right one — PKCS#11's CKF_USER_PIN_COUNT_LOW, from SKF's exact counts. A library that
/// reports no maximum (0) is low at 2 tries or fewer.
pub(crate) fn count_low(retries_left: u32, max_retries: u32) -> bool {
    if max_retries == 0 {
        retries_left <= 2
    } else {
        retries_left < max_retries
    }
}

/// The standard's name of a return code ("SAR_PIN_INCORRECT"), or "SAR_(unknown)".
pub fn sar_name(code: u32) -> &'static str {
    match code {
        0x0000_0000 => "SAR_OK",
        0x0A00_0001 => "SAR_FAIL",
        0x0A00_0002 => "SAR_UNKNOWNERR",
        0x0A00_0003 => "SAR_NOTSUPPORTYETERR",
        0x0A00_0004 => "SAR_FILEERR",
        0x0A00_0005 => "SAR_INVALIDHANDLEERR",
        0x0A00_0006 => "SAR_INVALIDPARAMERR",
        0x0A00_0007 => "SAR_READFILEERR",
        0x0A00_0008 => "SAR_WRITEFILEERR",
        0x0A00_0009 => "SAR_NAMELENERR",
        0x0A00_000A => "SAR_KEYUSAGEERR",
        0x0A00_000B => "SAR_MODULUSLENERR",
        0x0A00_000C => "SAR_NOTINITIALIZEERR",
        0x0A00_000D => "SAR_OBJERR",
        0x0A00_000E => "SAR_MEMORYERR",
        0x0A00_000F => "SAR_TIMEOUTERR",
        0x0A00_0010 => "SAR_INDATALENERR",
        0x0A00_0011 => "SAR_INDATAERR",
        0x0A00_0012 => "SAR_GENRANDERR",
        0x0A00_0013 => "SAR_HASHOBJERR",
        0x0A00_0014 => "SAR_HASHERR",
        0x0A00_0015 => "SAR_GENRSAKEYERR",
        0x0A00_0016 => "SAR_RSAMODULUSLENERR",
        0x0A00_0017 => "SAR_CSPIMPRTPUBKEYERR",
        0x0A00_0018 => "SAR_RSAENCERR",
        0x0A00_0019 => "SAR_RSADECERR",
        0x0A00_001A => "SAR_HASHNOTEQUALERR",
        0x0A00_001B => "SAR_KEYNOTFOUNTERR",
        0x0A00_001C => "SAR_CERTNOTFOUNTERR",
        0x0A00_001D => "SAR_NOTEXPORTERR",
        0x0A00_001E => "SAR_DECRYPTPADERR",
        0x0A00_001F => "SAR_MACLENERR",
        0x0A00_0020 => "SAR_BUFFER_TOO_SMALL",
        0x0A00_0021 => "SAR_KEYINFOTYPEERR",
        0x0A00_0022 => "SAR_NOT_EVENTERR",
        0x0A00_0023 => "SAR_DEVICE_REMOVED",
        0x0A00_0024 => "SAR_PIN_INCORRECT",
        0x0A00_0025 => "SAR_PIN_LOCKED",
        0x0A00_0026 => "SAR_PIN_INVALID",
        0x0A00_0027 => "SAR_PIN_LEN_RANGE",
        0x0A00_0028 => "SAR_USER_ALREADY_LOGGED_IN",
        0x0A00_0029 => "SAR_USER_PIN_NOT_INITIALIZED",
        0x0A00_002A => "SAR_USER_TYPE_INVALID",
        0x0A00_002B => "SAR_APPLICATION_NAME_INVALID",
        0x0A00_002C => "SAR_APPLICATION_EXISTS",
        0x0A00_002D => "SAR_USER_NOT_LOGGED_IN",
        0x0A00_002E => "SAR_APPLICATION_NOT_EXISTS",
        0x0A00_002F => "SAR_FILE_ALREADY_EXIST",
        0x0A00_0030 => "SAR_NO_ROOM",
        0x0A00_0031 => "SAR_FILE_NOT_EXIST",
        0x0A00_0032 => "SAR_REACH_MAX_CONTAINER_COUNT",
        _ => "SAR_(unknown)",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sar(code: u32) -> Sar {
        Sar {
            function: "SKF_VerifyPIN",
            code,
        }
    }

    #[test]
    fn a_wrong_pin_reports_what_is_left() {
        match pin_failure(sar(SAR_PIN_INCORRECT), 5, 6) {
            Error::PinIncorrect {
                retries_left: 5,
                count_low: true,
                final_try: false,
            } => {}
            other => panic!("unexpected {other:?}"),
        }
        assert!(!count_low(6, 6), "untouched");
        assert!(!count_low(5, 0) && count_low(2, 0), "no maximum reported");
        match pin_failure(sar(SAR_PIN_INCORRECT), 3, 6) {
            Error::PinIncorrect {
                count_low: true,
                final_try: false,
                ..
            } => {}
            other => panic!("unexpected {other:?}"),
        }
        match pin_failure(sar(SAR_PIN_INCORRECT), 1, 6) {
            Error::PinIncorrect {
                count_low: true,
                final_try: true,
                ..
            } => {}
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            pin_failure(sar(SAR_PIN_INCORRECT), 0, 6),
            Error::PinLocked
        ));
        assert!(matches!(
            pin_failure(sar(SAR_PIN_LOCKED), 0, 6),
            Error::PinLocked
        ));
    }

    #[test]
    fn errors_name_the_function_and_the_code() {
        let e = from_sar(Sar {
            function: "SKF_ECCSignData",
            code: crate::ffi::SAR_INDATALENERR,
        });
        assert_eq!(
            e.to_string(),
            "SKF_ECCSignData failed: SAR_INDATALENERR (0x0A000010)"
        );
        assert!(from_sar(Sar {
            function: "SKF_ECCSignData",
            code: SAR_DEVICE_REMOVED
        })
        .is_removal());
    }
}
