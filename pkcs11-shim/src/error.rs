//! The crate's one error type, and the one place where PKCS#11 return values are translated.

use std::path::PathBuf;

use cryptoki::error::{Error as CkError, RvError};

use crate::certificate::CertificateId;
use crate::pin::LoginKind;
use crate::token::{PinStatus, TokenId};

/// Everything that can go wrong in the shim, shaped so that a caller can act on it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The token rejected the PIN. The flags are the token's state after the failure.
    #[error("incorrect PIN (count low: {count_low}, final try: {final_try})")]
    PinIncorrect {
        /// CKF_USER_PIN_COUNT_LOW after the failure.
        count_low: bool,
        /// CKF_USER_PIN_FINAL_TRY after the failure.
        final_try: bool,
    },
    /// The user PIN is locked; no login was attempted.
    #[error("the user PIN is locked")]
    PinLocked,
    /// The job needs a login its credential cannot serve (none given, or it served its one
    /// signature already): ask the user, then send the rest as a new job.
    #[error("the token asks for a {kind:?} login")]
    LoginRequired {
        /// Which login.
        kind: LoginKind,
        /// The token's PIN flags now (for the dialog's warning).
        pin: PinStatus,
        /// The token has a PIN pad: ask for a confirmation, not a PIN.
        pin_pad: bool,
    },
    /// The PIN-pad reader reported the entry cancelled (the user pressed Cancel on the pad,
    /// or the reader timed out waiting: PKCS#11 modules report both as CKR_FUNCTION_CANCELED).
    #[error("the PIN entry was cancelled on the reader (or it timed out)")]
    CancelledOnReader,
    /// The token has no user PIN set.
    #[error("the user PIN of the token is not initialised")]
    PinNotInitialized,
    /// The PIN provider (the user) cancelled.
    #[error("cancelled by the user")]
    UserCancelled,
    /// The caller's cancel flag was set between two signatures.
    #[error("cancelled")]
    Cancelled,
    /// The token went away (removed, or its session died with it).
    #[error("the token is not present")]
    TokenNotPresent,
    /// No present token has this id.
    #[error("token {0} not found")]
    TokenNotFound(TokenId),
    /// No certificate with this id (with its private key on the token).
    #[error("certificate {0} not found")]
    CertificateNotFound(CertificateId),
    /// The certificate is there but its private key is not.
    #[error("the private key of the certificate was not found on the token")]
    KeyNotFound,
    /// A certificate to import matches no private key on the token (by public key).
    #[error("the certificate's public key matches no private key on the token")]
    NoMatchingKey,
    /// The key has a certificate, so it is not destroyed (the undo of a generation,
    /// [`crate::Module::delete_new_key`]).
    #[error("the key already has a certificate ({existing})")]
    CertificateExists {
        /// The certificate the key has.
        existing: CertificateId,
    },
    /// A key's only certificate, which KeyPort does not delete (the key would be listed no
    /// more).
    #[error("certificate {0} is its key's only certificate; it is not deleted")]
    OnlyCertificate(CertificateId),
    /// Neither the token nor the shim can do what was asked with this key.
    #[error("mechanism not supported: {algorithm} with a {key} key")]
    MechanismNotSupported {
        /// The requested algorithm, e.g. "RSA-PSS-SHA256".
        algorithm: String,
        /// The key, e.g. "EC-P256".
        key: String,
    },
    /// The request itself is malformed (wrong digest length, empty batch…).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The PKCS#11 module could not be loaded or initialised.
    #[error("cannot load PKCS#11 module {}", path.display())]
    ModuleLoad {
        /// The module that failed.
        path: PathBuf,
        /// Why.
        #[source]
        source: CkError,
    },
    /// Any other PKCS#11 failure; names the `C_` function.
    #[error("{function} failed: {rv}")]
    Pkcs11 {
        /// The PKCS#11 function, e.g. "C_Sign".
        function: &'static str,
        /// The return value's name, e.g. "CKR_DEVICE_ERROR", or a short description.
        rv: String,
        /// cryptoki's original error.
        #[source]
        source: CkError,
    },
    /// The module did not answer within the call timeout: it hangs, or is busy with a long
    /// operation (a batch, a PIN pad). The request may still run later; its answer is dropped.
    #[error("the token's module did not answer within {} s", waited.as_secs_f64())]
    Busy {
        /// How long the caller waited.
        waited: std::time::Duration,
    },
    /// The module's worker thread is gone (it panicked or the module was finalised).
    #[error("the PKCS#11 worker thread is gone")]
    WorkerGone,
    /// The module runs in a host process that failed: it crashed, hung past the deadline and
    /// was stopped, is being restarted, or broke the protocol. Nothing of the job's result is
    /// known (a signature may have been made and lost, never returned).
    #[error("the module's host process failed: {0}")]
    ModuleHost(String),
    /// A certificate on the token could not be parsed.
    #[error("certificate could not be parsed")]
    Certificate(#[source] der::Error),
    /// A DER structure the shim builds or converts (DigestInfo, ECDSA signature) was invalid.
    #[error("DER encoding failed")]
    Encoding(#[source] der::Error),
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
    /// True when the error means the token (or its session) went away: caches must be dropped.
    pub fn is_removal(&self) -> bool {
        matches!(self, Error::TokenNotPresent)
    }
}

/// The error and its sources on one line.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        s.push_str(": ");
        s.push_str(&src.to_string());
        cur = src.source();
    }
    s
}

/// True for the return values that mean "the token is gone", as opposed to "it failed".
pub(crate) fn is_removal_rv(rv: RvError) -> bool {
    matches!(
        rv,
        RvError::DeviceRemoved
            | RvError::TokenNotPresent
            | RvError::TokenNotRecognized
            | RvError::SessionHandleInvalid
            | RvError::SessionClosed
    )
}

/// The one translation from a cryptoki error into ours. Login-specific return values
/// (PIN incorrect/locked) are handled by the login loop before it falls back to this.
pub(crate) fn from_cryptoki(err: CkError) -> Error {
    match &err {
        CkError::Pkcs11(rv, _) if is_removal_rv(*rv) => Error::TokenNotPresent,
        CkError::Pkcs11(RvError::PinLocked, _) => Error::PinLocked,
        CkError::Pkcs11(RvError::UserPinNotInitialized, _) => Error::PinNotInitialized,
        CkError::Pkcs11(RvError::FunctionCanceled, cryptoki::context::Function::Login) => {
            Error::CancelledOnReader
        }
        CkError::Pkcs11(rv, function) => Error::Pkcs11 {
            function: function_name(*function),
            rv: rv_name(*rv),
            source: err,
        },
        CkError::NotSupported | CkError::NullFunctionPointer => Error::Pkcs11 {
            function: "(function missing)",
            rv: "CKR_FUNCTION_NOT_SUPPORTED".to_owned(),
            source: err,
        },
        _ => Error::Pkcs11 {
            function: "(cryptoki)",
            rv: err.to_string(),
            source: err,
        },
    }
}

/// `C_Foo` for cryptoki's `Function::Foo`.
pub(crate) fn function_name(f: cryptoki::context::Function) -> &'static str {
    use cryptoki::context::Function as F;
    match f {
        F::Initialize => "C_Initialize",
        F::Finalize => "C_Finalize",
        F::GetInfo => "C_GetInfo",
        F::GetFunctionList => "C_GetFunctionList",
        F::GetSlotList => "C_GetSlotList",
        F::GetSlotInfo => "C_GetSlotInfo",
        F::GetTokenInfo => "C_GetTokenInfo",
        F::GetMechanismList => "C_GetMechanismList",
        F::GetMechanismInfo => "C_GetMechanismInfo",
        F::OpenSession => "C_OpenSession",
        F::CloseSession => "C_CloseSession",
        F::CloseAllSessions => "C_CloseAllSessions",
        F::GetSessionInfo => "C_GetSessionInfo",
        F::Login => "C_Login",
        F::Logout => "C_Logout",
        F::FindObjectsInit => "C_FindObjectsInit",
        F::FindObjects => "C_FindObjects",
        F::FindObjectsFinal => "C_FindObjectsFinal",
        F::GetAttributeValue => "C_GetAttributeValue",
        F::SignInit => "C_SignInit",
        F::Sign => "C_Sign",
        F::SignUpdate => "C_SignUpdate",
        F::SignFinal => "C_SignFinal",
        F::GenerateKeyPair => "C_GenerateKeyPair",
        F::CreateObject => "C_CreateObject",
        F::DestroyObject => "C_DestroyObject",
        F::SetAttributeValue => "C_SetAttributeValue",
        _ => "C_(other)",
    }
}

/// The spec's name of a return value ("CKR_PIN_INCORRECT"), derived from cryptoki's variant.
pub(crate) fn rv_name(rv: RvError) -> String {
    let camel = format!("{rv:?}");
    let mut out = String::from("CKR");
    for ch in camel.chars() {
        if ch.is_ascii_uppercase() {
            out.push('_');
        }
        out.push(ch.to_ascii_uppercase());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use cryptoki::context::Function;

    #[test]
    fn rv_names_follow_the_spec_spelling() {
        assert_eq!(rv_name(RvError::PinIncorrect), "CKR_PIN_INCORRECT");
        assert_eq!(rv_name(RvError::DeviceRemoved), "CKR_DEVICE_REMOVED");
    }

    #[test]
    fn removal_return_values_become_token_not_present() {
        for rv in [
            RvError::DeviceRemoved,
            RvError::TokenNotPresent,
            RvError::SessionHandleInvalid,
            RvError::SessionClosed,
        ] {
            let e = from_cryptoki(CkError::Pkcs11(rv, Function::Sign));
            assert!(matches!(e, Error::TokenNotPresent), "{rv:?} -> {e:?}");
        }
        let e = from_cryptoki(CkError::Pkcs11(RvError::DeviceError, Function::Sign));
        match e {
            Error::Pkcs11 { function, rv, .. } => {
                assert_eq!(function, "C_Sign");
                assert_eq!(rv, "CKR_DEVICE_ERROR");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
