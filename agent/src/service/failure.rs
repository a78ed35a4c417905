//! What can end a request, and its one mapping to the wire (docs/protocol.md's reasons) and to
//! the audit outcome.

use std::sync::Arc;

use browser_bridge::protocol::{Base64Bytes, BatchSignature, Reason, RpcError};

use crate::audit::Outcome;
use crate::backend::TokenError;
use crate::pinentry::DialogError;

/// Everything that can end a request, mapped to the wire in one place: [`Failure::to_rpc`].
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error(transparent)]
    Token(#[from] TokenError),
    /// A request that stopped after some of its signatures: `error` says why, the page gets
    /// the finished ones in `data.results`.
    #[error("{error} after {} signatures", completed.len())]
    Batch {
        error: Box<Failure>,
        completed: Vec<Vec<u8>>,
    },
    #[error(transparent)]
    Dialog(Arc<DialogError>),
    #[error("the origin is not approved and no dialog could ask")]
    OriginNotApproved,
    #[error("the origin was denied")]
    OriginDenied,
    #[error(
        "a dialog for this origin is already open and {} more wait",
        super::origin::MAX_WAITING
    )]
    Busy,
    /// A PIN-pad login that outlasted the dialog timeout (the reader never answered).
    #[error("the PIN pad did not answer in time")]
    PinPadTimeout,
    #[error("{0}")]
    KeyUsage(String),
    #[error("{0}")]
    Algorithm(String),
    #[error("{0}")]
    InvalidParams(String),
    /// `certificates.import` of a certificate whose public key is no key on the token.
    #[error("the certificate's public key matches no key on this token")]
    NoMatchingKey,
    #[error("{0} is not built yet in this agent")]
    NotBuilt(&'static str),
    #[error("internal error: {0}")]
    Internal(String),
}

impl Failure {
    /// The one mapping from internal errors to docs/protocol.md's reasons. The page learns what it
    /// needs to act, never internal detail.
    pub fn to_rpc(&self) -> RpcError {
        use TokenError as E;
        match self {
            Failure::Batch { error, completed } => {
                let results: Vec<BatchSignature> = completed
                    .iter()
                    .map(|s| BatchSignature {
                        signature: Base64Bytes(s.clone()),
                    })
                    .collect();
                error.to_rpc().batch_failed(&results)
            }
            Failure::Token(e) => match e {
                E::PinIncorrect {
                    count_low,
                    final_try,
                } => RpcError::pin_incorrect(*count_low, *final_try),
                E::PinLocked => RpcError::new(Reason::PinLocked, "the token's PIN is locked"),
                E::PinNotInitialized => {
                    RpcError::new(Reason::PinLocked, "the token's PIN is not initialised")
                }
                E::UserCancelled | E::Cancelled => RpcError::user_cancelled(),
                E::CancelledOnReader => RpcError::new(
                    Reason::UserCancelled,
                    "the PIN entry was cancelled on the reader, or the reader timed out",
                ),
                E::LoginRequired { .. } => {
                    RpcError::internal("the token asked for a login no dialog answered")
                }
                E::TokenNotPresent | E::TokenNotFound(_) => {
                    RpcError::new(Reason::TokenNotPresent, "the token is not present")
                }
                E::Pkcs11(pkcs11_shim::Error::NoMatchingKey)
                | E::Skf(skf_shim::Error::CertificateNotForKey(_)) => {
                    Failure::NoMatchingKey.to_rpc()
                }
                E::Pkcs11(pkcs11_shim::Error::CertificateExists { existing }) => {
                    RpcError::invalid_params(format!(
                    "this key already has a certificate ({existing}); send \"replace\": true to \
                     replace it"
                    ))
                }
                E::Pkcs11(pkcs11_shim::Error::OnlyCertificate(id)) => {
                    RpcError::invalid_params(format!(
                        "{id} is its key's only certificate; KeyPort removes only a certificate \
                         the key has another one beside"
                    ))
                }
                E::Skf(skf_shim::Error::CertificateSlotTaken { container, .. }) => {
                    RpcError::invalid_params(format!(
                        "this key already has a certificate ({}); send \"replace\": true to \
                         replace it",
                        crate::backend::CertificateId::Skf(container.clone())
                    ))
                }
                E::Skf(skf_shim::Error::ContainerExists(c)) => RpcError::invalid_params(format!(
                    "the SKF key already has a key in a container named {:?}: choose another label",
                    c.container()
                )),
                E::Pkcs11(pkcs11_shim::Error::Certificate(_)) => {
                    RpcError::invalid_params("certificate is not an X.509 certificate")
                }
                E::CertificateNotFound(_) | E::KeyNotFound => RpcError::new(
                    Reason::CertificateNotFound,
                    "no such certificate with its key on a present token",
                ),
                E::MechanismNotSupported { algorithm, key } => RpcError::new(
                    Reason::AlgorithmNotSupported,
                    format!(
                        "{algorithm} is not possible with {} on this token",
                        a_key(key)
                    ),
                ),
                E::InvalidInput(m) => RpcError::invalid_params(m.clone()),
                E::Pkcs11(_) | E::Skf(_) => match e.failed_function() {
                    Some(function) => RpcError::token_error(function, e.to_string()),
                    None => RpcError::new(Reason::TokenError, e.to_string()),
                },
                E::Busy { .. } => RpcError::new(
                    Reason::Busy,
                    "the token is busy: its module did not answer in time",
                ),
                E::NotWorking(_) => {
                    RpcError::new(Reason::TokenError, "the token's module is not working")
                }
                E::ModuleHost(_) => RpcError::new(
                    Reason::TokenError,
                    "the token's module failed; it is being restarted",
                ),
            },
            Failure::Dialog(e) => match e.as_ref() {
                DialogError::Cancelled => RpcError::user_cancelled(),
                DialogError::Timeout => {
                    RpcError::new(Reason::Timeout, "the user did not answer in time")
                }
                other => RpcError::internal(format!("no dialog could be shown: {other}")),
            },
            Failure::OriginNotApproved => RpcError::new(
                Reason::OriginNotApproved,
                "this origin is not approved and no approval dialog was shown",
            ),
            Failure::OriginDenied => RpcError::new(Reason::OriginDenied, "this origin was denied"),
            Failure::Busy => RpcError::new(
                Reason::Busy,
                "this origin already has a dialog open and the most requests waiting for it",
            ),
            Failure::PinPadTimeout => RpcError::new(
                Reason::Timeout,
                "the PIN was not entered on the reader in time",
            ),
            Failure::KeyUsage(m) => RpcError::new(Reason::KeyUsageNotAllowed, m.clone()),
            Failure::Algorithm(m) => RpcError::new(Reason::AlgorithmNotSupported, m.clone()),
            Failure::InvalidParams(m) => RpcError::invalid_params(m.clone()),
            Failure::NotBuilt(method) => RpcError::new(
                Reason::MethodNotFound,
                format!("{method} is not built yet in this agent"),
            ),
            Failure::NoMatchingKey => RpcError::new(
                Reason::CertificateNotFound,
                "the certificate's public key matches no key on this token",
            ),
            Failure::Internal(m) => RpcError::internal(m.clone()),
        }
    }

    /// The audit outcome of a failed request.
    pub fn outcome(&self) -> Outcome {
        let reason = self.to_rpc().reason;
        match reason {
            Reason::UserCancelled | Reason::OriginDenied | Reason::Timeout | Reason::Busy => {
                Outcome::Refused(reason.as_str().to_owned())
            }
            _ => Outcome::Error(reason.as_str().to_owned()),
        }
    }
}

/// "an RSA-2048 key": every key name the protocol has (RSA-…, EC-…, Ed25519) is read with a
/// vowel sound first.
pub(super) fn a_key(name: &str) -> String {
    format!("an {name} key")
}
