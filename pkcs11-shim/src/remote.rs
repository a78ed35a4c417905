//! A module's jobs as plain data, so that its worker can run in another process (a *module
//! host*, which the agent supervises): [`Job`] in, [`Reply`] out, errors as [`WireError`].
//!
//! Both ends use [`crate::Module`]: in the host, an in-process module answers each job
//! ([`run`]); in the agent, [`crate::Module::hosted`] sends every call as a job through a
//! [`Transport`] and so offers the same API as the in-process module. How the bytes travel
//! (frames, a socket pair, a versioned greeting, deadlines, restarts) is the transport's
//! business, not this crate's.
//!
//! The PIN crosses only inside a job that logs in ([`Job::Sign`], and the enrolment jobs
//! [`Job::Generate`], [`Job::KeySign`], [`Job::Import`]; a credential is the user's one answer to one
//! dialog); it is serialised straight from and into a [`SecretPin`], never into any other
//! string, and `Debug` never shows it. The cancel flag of the in-process API becomes a message
//! of the transport (see [`Transport::run`]).

use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use cryptoki::context::Function;
use cryptoki::error::{Error as CkError, Rv, RvError};
use serde::{Deserialize, Serialize};

use crate::algorithm::SignRequest;
use crate::certificate::{CertificateId, CertificateInfo};
use crate::error::{function_name, Error, SignFailure};
use crate::keygen::{
    DeleteCertificateRequest, DeleteKeyRequest, GenerateRequest, GeneratedKey, ImportRequest,
    Imported, KeySignRequest, KeySpec, Removed,
};
use crate::module::{Module, Progress};
use crate::pin::{Credential, LoginKind, SecretPin};
use crate::token::{LoginState, ModuleInfo, PinStatus, TokenId, TokenInfo};

/// One call of [`Module`]'s API, as data.
#[derive(Debug, Serialize, Deserialize)]
pub enum Job {
    Info,
    Tokens,
    Certificates {
        token: Option<TokenId>,
    },
    LoginState {
        token: TokenId,
    },
    /// A signing job; with `progress`, its progress comes back as [`Reply::Progress`] before
    /// [`Reply::Signed`] (a caller that shows none asks for none: each message is a write, a
    /// wake-up and a context switch on both sides).
    Sign {
        req: SignRequest,
        #[serde(with = "credential_wire")]
        credential: Credential,
        progress: bool,
    },
    Logout {
        token: TokenId,
    },
    /// A card went in or out ([`Module::token_event`]); answered [`Reply::TokenEventSeen`].
    TokenEvent,
    /// [`Module::generate_key`].
    Generate {
        req: GenerateRequest,
        #[serde(with = "credential_wire")]
        credential: Credential,
    },
    /// [`Module::sign_with_key`].
    KeySign {
        req: KeySignRequest,
        #[serde(with = "credential_wire")]
        credential: Credential,
    },
    /// [`Module::import_certificate`].
    Import {
        req: ImportRequest,
        #[serde(with = "credential_wire")]
        credential: Credential,
    },
    /// [`Module::check_generation`].
    CheckGeneration {
        token: TokenId,
        spec: KeySpec,
    },
    /// [`Module::delete_new_key`] (no credential: it uses the generation's login).
    DeleteKey {
        req: DeleteKeyRequest,
    },
    /// [`Module::delete_certificate`].
    DeleteCertificate {
        req: DeleteCertificateRequest,
        #[serde(with = "credential_wire")]
        credential: Credential,
    },
}

impl Job {
    /// The operation, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Job::Info => "info",
            Job::Tokens => "tokens",
            Job::Certificates { .. } => "certificates",
            Job::LoginState { .. } => "login_state",
            Job::Sign { .. } => "sign",
            Job::Logout { .. } => "logout",
            Job::TokenEvent => "token_event",
            Job::Generate { .. } => "generate_key",
            Job::KeySign { .. } => "sign_with_key",
            Job::Import { .. } => "import_certificate",
            Job::CheckGeneration { .. } => "check_generation",
            Job::DeleteKey { .. } => "delete_new_key",
            Job::DeleteCertificate { .. } => "delete_certificate",
        }
    }
}

/// The answer to a [`Job`] (or, for a signing job, an interim [`Reply::Progress`]).
#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    Info(Result<ModuleInfo, WireError>),
    Tokens(Result<Vec<TokenInfo>, WireError>),
    Certificates(Result<Vec<CertificateInfo>, WireError>),
    LoginState(Result<LoginState, WireError>),
    Progress(Progress),
    Signed(Result<Vec<Vec<u8>>, WireFailure>),
    LoggedOut(Result<(), WireError>),
    TokenEventSeen,
    Generated(Result<GeneratedKey, WireError>),
    KeySigned(Result<Vec<u8>, WireError>),
    /// Boxed: a certificate is far larger than the other answers.
    Imported(Result<Box<Imported>, WireError>),
    GenerationChecked(Result<(), WireError>),
    KeyDeleted(Result<(), WireError>),
    CertificateDeleted(Result<Removed, WireError>),
}

/// A failed signing job: [`SignFailure`] as data.
#[derive(Debug, Serialize, Deserialize)]
pub struct WireFailure {
    pub error: WireError,
    pub completed: Vec<Vec<u8>>,
}

/// [`Error`] as data. What cannot cross (a cryptoki or DER error value) crosses as its names
/// and is rebuilt on the other side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum WireError {
    PinIncorrect {
        count_low: bool,
        final_try: bool,
    },
    PinLocked,
    LoginRequired {
        kind: LoginKind,
        pin: PinStatus,
        pin_pad: bool,
    },
    CancelledOnReader,
    PinNotInitialized,
    UserCancelled,
    Cancelled,
    TokenNotPresent,
    TokenNotFound(TokenId),
    CertificateNotFound(CertificateId),
    KeyNotFound,
    NoMatchingKey,
    CertificateExists {
        existing: CertificateId,
    },
    OnlyCertificate(CertificateId),
    MechanismNotSupported {
        algorithm: String,
        key: String,
    },
    InvalidInput(String),
    /// [`Error::Pkcs11`]: the function's name, the return value's name, and its CK_RV when
    /// there is one.
    Pkcs11 {
        function: String,
        rv: String,
        code: Option<u64>,
    },
    Busy {
        waited_ms: u64,
    },
    /// Anything else (the module did not load, a certificate did not parse…): its message.
    Other(String),
}

/// Why a [`Transport`] has no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransportError {
    /// The host is busy with another job still within its deadline; this one was given up.
    Busy { waited: Duration },
    /// The host crashed, hung past the deadline and was stopped, is being restarted, or could
    /// not be started.
    Failed(String),
}

/// The way to a module host, implemented by whoever runs hosts (the agent's supervisor).
pub trait Transport: Send + Sync + 'static {
    /// Sends `job` and waits for its answer, at most `deadline` from the start and from each
    /// interim reply (which goes to `interim`). Once `cancel` is set, the host is told (a
    /// signing job then stops before its next signature) and the wait goes on.
    fn run(
        &self,
        job: Job,
        deadline: Duration,
        cancel: Option<&AtomicBool>,
        interim: &mut dyn FnMut(Reply),
    ) -> Result<Reply, TransportError>;

    /// [`Transport::run`] for a task on an async runtime, when [`Transport::is_async`]: the
    /// answer wakes the task itself, with no thread of the caller's waiting on the host.
    /// Interim replies go to `interim`; a set `cancel` is sent as in [`Transport::run`]. The
    /// default answers [`TransportError::Failed`]: callers ask [`Transport::is_async`] first
    /// (and otherwise run [`Transport::run`] on a blocking thread).
    fn run_async(
        &self,
        job: Job,
        deadline: Duration,
        cancel: Option<Arc<AtomicBool>>,
        interim: Box<dyn FnMut(Reply) + Send>,
    ) -> ReplyFuture {
        let _ = (job, deadline, cancel, interim);
        Box::pin(std::future::ready(Err(TransportError::Failed(
            "this transport has no async form".into(),
        ))))
    }

    /// True when [`Transport::run_async`] works.
    fn is_async(&self) -> bool {
        false
    }

    /// True while the host runs a job (a call now would queue behind it); no call is made.
    fn is_busy(&self) -> bool {
        false
    }
}

/// The answer of [`Transport::run_async`].
pub type ReplyFuture =
    Pin<Box<dyn std::future::Future<Output = Result<Reply, TransportError>> + Send + 'static>>;

impl From<TransportError> for Error {
    fn from(e: TransportError) -> Self {
        match e {
            TransportError::Busy { waited } => Error::Busy { waited },
            TransportError::Failed(reason) => Error::ModuleHost(reason),
        }
    }
}

/// The host's side: runs `job` on an in-process `module`, on the calling thread. A signing
/// job sends each [`Progress`] to `progress` (whoever reads it must do so while this runs; the
/// sender is dropped when the job ends) and stops before its next signature once `cancel` is
/// set.
pub fn run(
    module: &Module,
    job: Job,
    progress: Option<mpsc::Sender<Progress>>,
    cancel: Arc<AtomicBool>,
) -> Reply {
    let wire = |e: Error| WireError::from(&e);
    match job {
        Job::Info => Reply::Info(module.info().map_err(wire)),
        Job::Tokens => Reply::Tokens(module.tokens().map_err(wire)),
        Job::Certificates { token } => {
            Reply::Certificates(module.certificates(token.as_ref()).map_err(wire))
        }
        Job::LoginState { token } => Reply::LoginState(module.login_state(&token).map_err(wire)),
        Job::Logout { token } => Reply::LoggedOut(module.logout(&token).map_err(wire)),
        Job::TokenEvent => {
            module.token_event();
            Reply::TokenEventSeen
        }
        Job::Generate { req, credential } => {
            Reply::Generated(module.generate_key(req, credential).map_err(wire))
        }
        Job::KeySign { req, credential } => {
            Reply::KeySigned(module.sign_with_key(req, credential).map_err(wire))
        }
        Job::Import { req, credential } => Reply::Imported(
            module
                .import_certificate(req, credential)
                .map(Box::new)
                .map_err(wire),
        ),
        Job::CheckGeneration { token, spec } => {
            Reply::GenerationChecked(module.check_generation(&token, spec).map_err(wire))
        }
        Job::DeleteKey { req } => Reply::KeyDeleted(module.delete_new_key(req).map_err(wire)),
        Job::DeleteCertificate { req, credential } => {
            Reply::CertificateDeleted(module.delete_certificate(req, credential).map_err(wire))
        }
        Job::Sign {
            req, credential, ..
        } => Reply::Signed(
            module
                .sign(req, credential, progress, Some(cancel))
                .map_err(|f| WireFailure {
                    error: WireError::from(&f.error),
                    completed: f.completed,
                }),
        ),
    }
}

/// A reply that does not answer its job: the host broke the protocol.
pub(crate) fn unexpected(reply: &Reply) -> Error {
    Error::ModuleHost(format!(
        "the module host answered with an unexpected {}",
        match reply {
            Reply::Info(_) => "info",
            Reply::Tokens(_) => "tokens",
            Reply::Certificates(_) => "certificates",
            Reply::LoginState(_) => "login_state",
            Reply::Progress(_) => "progress",
            Reply::Signed(_) => "signed",
            Reply::LoggedOut(_) => "logged_out",
            Reply::TokenEventSeen => "token_event_seen",
            Reply::Generated(_) => "generated",
            Reply::KeySigned(_) => "key_signed",
            Reply::Imported(_) => "imported",
            Reply::GenerationChecked(_) => "generation_checked",
            Reply::KeyDeleted(_) => "key_deleted",
            Reply::CertificateDeleted(_) => "certificate_deleted",
        }
    ))
}

impl From<WireFailure> for SignFailure {
    fn from(f: WireFailure) -> Self {
        SignFailure {
            error: f.error.into(),
            completed: f.completed,
        }
    }
}

impl From<&Error> for WireError {
    fn from(e: &Error) -> Self {
        match e {
            Error::PinIncorrect {
                count_low,
                final_try,
            } => WireError::PinIncorrect {
                count_low: *count_low,
                final_try: *final_try,
            },
            Error::PinLocked => WireError::PinLocked,
            Error::LoginRequired { kind, pin, pin_pad } => WireError::LoginRequired {
                kind: *kind,
                pin: *pin,
                pin_pad: *pin_pad,
            },
            Error::CancelledOnReader => WireError::CancelledOnReader,
            Error::PinNotInitialized => WireError::PinNotInitialized,
            Error::UserCancelled => WireError::UserCancelled,
            Error::Cancelled => WireError::Cancelled,
            Error::TokenNotPresent => WireError::TokenNotPresent,
            Error::TokenNotFound(id) => WireError::TokenNotFound(id.clone()),
            Error::CertificateNotFound(id) => WireError::CertificateNotFound(id.clone()),
            Error::KeyNotFound => WireError::KeyNotFound,
            Error::NoMatchingKey => WireError::NoMatchingKey,
            Error::CertificateExists { existing } => WireError::CertificateExists {
                existing: existing.clone(),
            },
            Error::OnlyCertificate(id) => WireError::OnlyCertificate(id.clone()),
            Error::MechanismNotSupported { algorithm, key } => WireError::MechanismNotSupported {
                algorithm: algorithm.clone(),
                key: key.clone(),
            },
            Error::InvalidInput(m) => WireError::InvalidInput(m.clone()),
            Error::Pkcs11 {
                function,
                rv,
                source,
            } => WireError::Pkcs11 {
                function: (*function).to_owned(),
                rv: rv.clone(),
                code: match source {
                    CkError::Pkcs11(rv, _) => rv_code(*rv),
                    _ => None,
                },
            },
            Error::Busy { waited } => WireError::Busy {
                waited_ms: u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
            },
            other => WireError::Other(crate::error::chain(other)),
        }
    }
}

impl From<WireError> for Error {
    fn from(e: WireError) -> Self {
        match e {
            WireError::PinIncorrect {
                count_low,
                final_try,
            } => Error::PinIncorrect {
                count_low,
                final_try,
            },
            WireError::PinLocked => Error::PinLocked,
            WireError::LoginRequired { kind, pin, pin_pad } => {
                Error::LoginRequired { kind, pin, pin_pad }
            }
            WireError::CancelledOnReader => Error::CancelledOnReader,
            WireError::PinNotInitialized => Error::PinNotInitialized,
            WireError::UserCancelled => Error::UserCancelled,
            WireError::Cancelled => Error::Cancelled,
            WireError::TokenNotPresent => Error::TokenNotPresent,
            WireError::TokenNotFound(id) => Error::TokenNotFound(id),
            WireError::CertificateNotFound(id) => Error::CertificateNotFound(id),
            WireError::KeyNotFound => Error::KeyNotFound,
            WireError::NoMatchingKey => Error::NoMatchingKey,
            WireError::CertificateExists { existing } => Error::CertificateExists { existing },
            WireError::OnlyCertificate(id) => Error::OnlyCertificate(id),
            WireError::MechanismNotSupported { algorithm, key } => {
                Error::MechanismNotSupported { algorithm, key }
            }
            WireError::InvalidInput(m) => Error::InvalidInput(m),
            WireError::Pkcs11 { function, rv, code } => {
                let known = KNOWN_FUNCTIONS
                    .iter()
                    .copied()
                    .find(|f| function_name(*f) == function);
                let source = match (known, code.map(Rv::from)) {
                    (Some(f), Some(Rv::Error(rv))) => CkError::Pkcs11(rv, f),
                    _ => CkError::NotSupported,
                };
                Error::Pkcs11 {
                    function: known.map_or("(module host)", function_name),
                    rv,
                    source,
                }
            }
            WireError::Busy { waited_ms } => Error::Busy {
                waited: Duration::from_millis(waited_ms),
            },
            WireError::Other(m) => Error::ModuleHost(m),
        }
    }
}

/// The functions [`function_name`] names (the ones the shim calls).
const KNOWN_FUNCTIONS: [Function; 27] = [
    Function::Initialize,
    Function::Finalize,
    Function::GetInfo,
    Function::GetFunctionList,
    Function::GetSlotList,
    Function::GetSlotInfo,
    Function::GetTokenInfo,
    Function::GetMechanismList,
    Function::GetMechanismInfo,
    Function::OpenSession,
    Function::CloseSession,
    Function::CloseAllSessions,
    Function::GetSessionInfo,
    Function::Login,
    Function::Logout,
    Function::FindObjectsInit,
    Function::FindObjects,
    Function::FindObjectsFinal,
    Function::GetAttributeValue,
    Function::SignInit,
    Function::Sign,
    Function::SignUpdate,
    Function::SignFinal,
    Function::GenerateKeyPair,
    Function::CreateObject,
    Function::DestroyObject,
    Function::SetAttributeValue,
];

/// The CK_RV of a return value. cryptoki 0.12 converts CK_RV → RvError only, so the spec's
/// range (and the vendor-defined code itself) is searched.
fn rv_code(rv: RvError) -> Option<u64> {
    match rv {
        RvError::VendorDefined(code) | RvError::UnknownErrorCode(code) => Some(code),
        rv => (1..=0x2ff).find(|&c| Rv::from(c) == Rv::Error(rv)),
    }
}

/// The credential's serde form: the PIN goes from the [`SecretPin`] straight into the frame
/// and from the frame straight into a new [`SecretPin`] (both zeroed on drop).
mod credential_wire {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::{Credential, SecretPin};

    #[derive(Serialize)]
    enum Out<'a> {
        None,
        Pin(&'a str),
        PinPad,
    }

    #[derive(Deserialize)]
    enum In {
        None,
        Pin(String),
        PinPad,
    }

    pub(super) fn serialize<S: Serializer>(c: &Credential, s: S) -> Result<S::Ok, S::Error> {
        match c {
            Credential::None => Out::None,
            Credential::Pin(pin) => Out::Pin(pin.expose()),
            Credential::PinPad => Out::PinPad,
        }
        .serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Credential, D::Error> {
        Ok(match In::deserialize(d)? {
            In::None => Credential::None,
            In::Pin(pin) => Credential::Pin(SecretPin::from(pin)),
            In::PinPad => Credential::PinPad,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pkcs11_error_crosses_with_its_function_and_return_value() {
        let e = crate::error::from_cryptoki(CkError::Pkcs11(RvError::DeviceError, Function::Sign));
        let back = Error::from(WireError::from(&e));
        match back {
            Error::Pkcs11 {
                function,
                rv,
                source,
            } => {
                assert_eq!(function, "C_Sign");
                assert_eq!(rv, "CKR_DEVICE_ERROR");
                assert!(matches!(
                    source,
                    CkError::Pkcs11(RvError::DeviceError, Function::Sign)
                ));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(rv_code(RvError::PinIncorrect), Some(0xa0));
        assert_eq!(
            rv_code(RvError::VendorDefined(0x8000_0001)),
            Some(0x8000_0001)
        );
    }

    #[test]
    fn errors_a_caller_acts_on_cross_unchanged() {
        let e = Error::PinIncorrect {
            count_low: true,
            final_try: false,
        };
        assert!(matches!(
            Error::from(WireError::from(&e)),
            Error::PinIncorrect {
                count_low: true,
                final_try: false
            }
        ));
        assert!(matches!(
            Error::from(WireError::from(&Error::TokenNotPresent)),
            Error::TokenNotPresent
        ));
    }

    #[test]
    fn the_credential_crosses_inside_a_sign_job_and_debug_hides_it() {
        #[derive(Serialize, Deserialize)]
        struct Holder(#[serde(with = "credential_wire")] Credential);
        let pin = Holder(Credential::Pin(SecretPin::from("123456".to_owned())));
        let bytes = encode(&pin);
        assert!(bytes.windows(6).any(|w| w == b"123456"));
        let back: Holder = postcard::from_bytes(&bytes).expect("decode");
        match &back.0 {
            Credential::Pin(p) => assert_eq!(p.expose(), "123456"),
            other => panic!("{other:?}"),
        }
        assert!(!format!("{:?}", back.0).contains("123456"));
    }

    fn encode<T: Serialize>(v: &T) -> Vec<u8> {
        postcard::to_stdvec(v).expect("encode")
    }
}
