//! An SKF library's calls as plain data, so that it can run in another process (a *library
//! host*, which the agent supervises): [`Job`] in, [`Reply`] out, errors as [`WireError`]. The
//! SKF twin of `pkcs11_shim::remote`.
//!
//! Both ends use [`Library`]: in the host an in-process library answers each job ([`run`]);
//! in the agent [`Library::hosted`] sends every call as a job through a [`Transport`] and so
//! offers the same API. How the bytes travel (frames, socket pair, deadlines, restarts) is the
//! transport's business.
//!
//! The PIN crosses only inside the two jobs that verify it ([`Job::VerifyPin`],
//! [`Job::GenerateSm2`]): it is serialised straight from a [`SecretPin`] and deserialised
//! straight into a new one (both zeroed on drop), and `Debug` never shows it.
//!
//! Device events: [`Job::NextEvent`] waits (at most the time it names) for the host's own
//! SKF_WaitForDevEvent watch, which the host starts at the first such job and keeps for its
//! life. A host answers it beside its other jobs (it never waits behind a signature).

use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::algorithm::SignRequest;
use crate::certificate::{CertificateId, CertificateInfo};
use crate::enroll::{GeneratedKey, ImportMode, NewContainer};
use crate::error::{Error, SignFailure};
use crate::events::{DeviceEvent, DeviceEvents};
use crate::library::Library;
use crate::pin::SecretPin;
use crate::token::{ApplicationId, ApplicationInfo, PinStatus, TokenId, TokenInfo};

/// One call of [`Library`]'s API, as data.
#[derive(Debug, Serialize, Deserialize)]
pub enum Job {
    Tokens,
    Applications {
        token: TokenId,
    },
    Certificates {
        token: Option<TokenId>,
    },
    PinStatus {
        application: ApplicationId,
    },
    /// The PIN's one crossing for a signature: [`Library::verify_pin`].
    VerifyPin {
        application: ApplicationId,
        #[serde(with = "pin_wire")]
        pin: SecretPin,
    },
    /// Progress comes back as [`Reply::Progress`] before [`Reply::Signed`].
    Sign {
        req: SignRequest,
    },
    Logout {
        application: ApplicationId,
    },
    GenerateSm2 {
        application: ApplicationId,
        container: NewContainer,
        #[serde(with = "pin_wire")]
        pin: SecretPin,
    },
    ImportCertificate {
        container: CertificateId,
        der: Vec<u8>,
        mode: ImportMode,
    },
    /// [`Library::key_container`].
    KeyContainer {
        token: TokenId,
        public_key: Vec<u8>,
    },
    /// [`Library::delete_new_container`].
    DeleteNewContainer {
        container: CertificateId,
    },
    MissingFunctions,
    /// The next device event, waiting at most `wait_ms` ([`Reply::Event`] `Ok(None)`: none).
    NextEvent {
        wait_ms: u64,
    },
}

impl Job {
    /// The operation, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Job::Tokens => "tokens",
            Job::Applications { .. } => "applications",
            Job::Certificates { .. } => "certificates",
            Job::PinStatus { .. } => "pin_status",
            Job::VerifyPin { .. } => "verify_pin",
            Job::Sign { .. } => "sign",
            Job::Logout { .. } => "logout",
            Job::GenerateSm2 { .. } => "generate_sm2",
            Job::ImportCertificate { .. } => "import_certificate",
            Job::KeyContainer { .. } => "key_container",
            Job::DeleteNewContainer { .. } => "delete_new_container",
            Job::MissingFunctions => "missing_functions",
            Job::NextEvent { .. } => "next_event",
        }
    }

    /// A job a host answers beside the others, not after them: waiting for a device event.
    pub fn is_side_job(&self) -> bool {
        matches!(self, Job::NextEvent { .. })
    }
}

/// The answer to a [`Job`] (or, for a signing job, an interim [`Reply::Progress`]).
#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    Tokens(Result<Vec<TokenInfo>, WireError>),
    Applications(Result<Vec<ApplicationInfo>, WireError>),
    Certificates(Result<Vec<CertificateInfo>, WireError>),
    PinStatus(Result<PinStatus, WireError>),
    PinVerified(Result<(), WireError>),
    /// Signatures done so far.
    Progress(usize),
    Signed(Result<Vec<Vec<u8>>, WireFailure>),
    LoggedOut(Result<(), WireError>),
    Generated(Result<GeneratedKey, WireError>),
    Imported(Result<Box<CertificateInfo>, WireError>),
    KeyContainer(Result<Option<CertificateId>, WireError>),
    ContainerDeleted(Result<(), WireError>),
    MissingFunctions(Vec<String>),
    Event(Result<Option<DeviceEvent>, WireError>),
}

/// A failed signing job: [`SignFailure`] as data.
#[derive(Debug, Serialize, Deserialize)]
pub struct WireFailure {
    pub error: WireError,
    pub completed: Vec<Vec<u8>>,
}

/// [`Error`] as data. What cannot cross (a loader's or DER error) crosses as its message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum WireError {
    PinIncorrect {
        retries_left: u32,
        count_low: bool,
        final_try: bool,
    },
    PinLocked,
    NotLoggedIn(ApplicationId),
    Cancelled,
    TokenNotPresent,
    TokenNotFound(TokenId),
    ApplicationNotFound(ApplicationId),
    CertificateNotFound(CertificateId),
    ContainerNotFound(CertificateId),
    ContainerExists(CertificateId),
    CertificateNotForKey(CertificateId),
    CertificateSlotTaken {
        container: CertificateId,
        existing: Option<Box<CertificateInfo>>,
    },
    MechanismNotSupported {
        algorithm: String,
        key: String,
    },
    InvalidInput(String),
    /// [`Error::Skf`]: the function's name and the SAR code.
    Skf {
        function: String,
        code: u32,
    },
    AlreadyWatching,
    Busy {
        waited_ms: u64,
    },
    /// The library did not load in the host ([`Error::HostedLoad`] on the agent's side).
    NotLoaded(String),
    /// Anything else (the library did not load, a certificate did not parse…): its message.
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

/// The way to a library host, implemented by whoever runs hosts (the agent's supervisor).
pub trait Transport: Send + Sync + 'static {
    /// Sends `job` and waits for its answer, at most `deadline` from the start and from each
    /// interim reply (which goes to `interim`). Once `cancel` is set the host is told (a
    /// signing job then stops before its next signature) and the wait goes on.
    fn run(
        &self,
        job: Job,
        deadline: Duration,
        cancel: Option<&AtomicBool>,
        interim: &mut dyn FnMut(Reply),
    ) -> Result<Reply, TransportError>;

    /// True while the host runs a job (a call now would queue behind it); no call is made.
    fn is_busy(&self) -> bool {
        false
    }

    /// True while a host is running: a call now would not start one (the event watch waits
    /// for someone else's call to start a host after one ended).
    fn is_up(&self) -> bool {
        true
    }
}

impl From<TransportError> for Error {
    fn from(e: TransportError) -> Self {
        match e {
            TransportError::Busy { waited } => Error::Busy { waited },
            TransportError::Failed(reason) => Error::ModuleHost(reason),
        }
    }
}

/// The agent's side: `job` through `t`, within `deadline`.
pub(crate) fn ask(t: &dyn Transport, job: Job, deadline: Duration) -> Result<Reply, Error> {
    Ok(t.run(job, deadline, None, &mut |_| {})?)
}

/// `$reply` (a `Result<Reply, Error>`) as the `Ok` of variant `$variant`, its wire error
/// converted; any other reply is a host that broke the protocol.
macro_rules! answer {
    ($reply:expr, $variant:path) => {
        crate::remote::answer!($reply, $variant, |v| v)
    };
    ($reply:expr, $variant:path, $map:expr) => {
        match $reply? {
            $variant(r) => r.map($map).map_err(crate::error::Error::from),
            other => Err(crate::remote::unexpected(&other)),
        }
    };
}
pub(crate) use answer;

/// The agent's side of a signature: progress re-arms the deadline and goes to `progress`.
pub(crate) fn sign(
    t: &dyn Transport,
    req: SignRequest,
    cancel: Option<Arc<AtomicBool>>,
    deadline: Duration,
    progress: Option<mpsc::Sender<usize>>,
) -> Result<Vec<Vec<u8>>, SignFailure> {
    let mut interim = |r: Reply| {
        if let (Reply::Progress(n), Some(p)) = (r, &progress) {
            let _ = p.send(n);
        }
    };
    match t.run(Job::Sign { req }, deadline, cancel.as_deref(), &mut interim) {
        Ok(Reply::Signed(r)) => r.map_err(SignFailure::from),
        Ok(other) => Err(unexpected(&other).into()),
        Err(e) => Err(Error::from(e).into()),
    }
}

/// A reply that does not answer its job: the host broke the protocol.
pub(crate) fn unexpected(reply: &Reply) -> Error {
    let what = match reply {
        Reply::Tokens(_) => "tokens",
        Reply::Applications(_) => "applications",
        Reply::Certificates(_) => "certificates",
        Reply::PinStatus(_) => "pin_status",
        Reply::PinVerified(_) => "pin_verified",
        Reply::Progress(_) => "progress",
        Reply::Signed(_) => "signed",
        Reply::LoggedOut(_) => "logged_out",
        Reply::Generated(_) => "generated",
        Reply::Imported(_) => "imported",
        Reply::KeyContainer(_) => "key_container",
        Reply::ContainerDeleted(_) => "container_deleted",
        Reply::MissingFunctions(_) => "missing_functions",
        Reply::Event(_) => "event",
    };
    Error::ModuleHost(format!(
        "the library host answered with an unexpected {what}"
    ))
}

/// The host's side: what one host keeps between jobs (its library and, once asked for, its
/// device watch).
#[derive(Debug)]
pub struct HostState {
    library: Result<Library, WireError>,
    events: std::sync::Mutex<Option<Result<DeviceEvents, WireError>>>,
}

impl HostState {
    /// `library`: the in-process library, or why it did not load (reported in every answer).
    pub fn new(library: Result<Library, Error>) -> HostState {
        HostState {
            library: library.map_err(|e| WireError::from(&e)),
            events: std::sync::Mutex::new(None),
        }
    }

    /// Runs `job` on the calling thread. A signing job sends its progress to `progress` and
    /// stops before its next signature once `cancel` is set.
    pub fn run(
        &self,
        job: Job,
        progress: Option<mpsc::Sender<usize>>,
        cancel: Arc<AtomicBool>,
    ) -> Reply {
        let library = match &self.library {
            Ok(l) => l,
            Err(e) => return failed(job, e.clone()),
        };
        let wire = |e: Error| WireError::from(&e);
        match job {
            Job::Tokens => Reply::Tokens(library.tokens().map_err(wire)),
            Job::Applications { token } => {
                Reply::Applications(library.applications(&token).map_err(wire))
            }
            Job::Certificates { token } => {
                Reply::Certificates(library.certificates(token.as_ref()).map_err(wire))
            }
            Job::PinStatus { application } => {
                Reply::PinStatus(library.pin_status(&application).map_err(wire))
            }
            Job::VerifyPin { application, pin } => {
                Reply::PinVerified(library.verify_pin(&application, pin).map_err(wire))
            }
            Job::Sign { req } => Reply::Signed(
                library
                    .sign_with_progress(req, Some(cancel), progress)
                    .map_err(|f| WireFailure {
                        error: WireError::from(&f.error),
                        completed: f.completed,
                    }),
            ),
            Job::Logout { application } => {
                Reply::LoggedOut(library.logout(&application).map_err(wire))
            }
            Job::GenerateSm2 {
                application,
                container,
                pin,
            } => Reply::Generated(
                library
                    .generate_sm2(&application, container, pin)
                    .map_err(wire),
            ),
            Job::ImportCertificate {
                container,
                der,
                mode,
            } => Reply::Imported(
                library
                    .import_certificate(&container, der, mode)
                    .map(Box::new)
                    .map_err(wire),
            ),
            Job::KeyContainer { token, public_key } => {
                Reply::KeyContainer(library.key_container(&token, public_key).map_err(wire))
            }
            Job::DeleteNewContainer { container } => {
                Reply::ContainerDeleted(library.delete_new_container(&container).map_err(wire))
            }
            Job::MissingFunctions => Reply::MissingFunctions(
                library
                    .missing_functions()
                    .into_iter()
                    .map(str::to_owned)
                    .collect(),
            ),
            Job::NextEvent { wait_ms } => Reply::Event(self.next_event(library, wait_ms)),
        }
    }

    fn next_event(
        &self,
        library: &Library,
        wait_ms: u64,
    ) -> Result<Option<DeviceEvent>, WireError> {
        let mut events = crate::library::lock(&self.events);
        let watch = events.get_or_insert_with(|| library.events().map_err(|e| WireError::from(&e)));
        let watch = watch.as_ref().map_err(Clone::clone)?;
        match watch.recv_timeout(Duration::from_millis(wait_ms)) {
            None => Ok(None),
            Some(Ok(event)) => Ok(Some(event)),
            Some(Err(e)) => {
                let e = WireError::from(&e);
                // The watch ended: every later job answers the same.
                *events = Some(Err(e.clone()));
                Err(e)
            }
        }
    }
}

/// The answer to `job` when the library did not load.
fn failed(job: Job, e: WireError) -> Reply {
    match job {
        Job::Tokens => Reply::Tokens(Err(e)),
        Job::Applications { .. } => Reply::Applications(Err(e)),
        Job::Certificates { .. } => Reply::Certificates(Err(e)),
        Job::PinStatus { .. } => Reply::PinStatus(Err(e)),
        Job::VerifyPin { .. } => Reply::PinVerified(Err(e)),
        Job::Sign { .. } => Reply::Signed(Err(WireFailure {
            error: e,
            completed: Vec::new(),
        })),
        Job::Logout { .. } => Reply::LoggedOut(Err(e)),
        Job::GenerateSm2 { .. } => Reply::Generated(Err(e)),
        Job::ImportCertificate { .. } => Reply::Imported(Err(e)),
        Job::KeyContainer { .. } => Reply::KeyContainer(Err(e)),
        Job::DeleteNewContainer { .. } => Reply::ContainerDeleted(Err(e)),
        Job::MissingFunctions => Reply::MissingFunctions(Vec::new()),
        Job::NextEvent { .. } => Reply::Event(Err(e)),
    }
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
                retries_left,
                count_low,
                final_try,
            } => WireError::PinIncorrect {
                retries_left: *retries_left,
                count_low: *count_low,
                final_try: *final_try,
            },
            Error::PinLocked => WireError::PinLocked,
            Error::NotLoggedIn(a) => WireError::NotLoggedIn(a.clone()),
            Error::Cancelled => WireError::Cancelled,
            Error::TokenNotPresent => WireError::TokenNotPresent,
            Error::TokenNotFound(t) => WireError::TokenNotFound(t.clone()),
            Error::ApplicationNotFound(a) => WireError::ApplicationNotFound(a.clone()),
            Error::CertificateNotFound(c) => WireError::CertificateNotFound(c.clone()),
            Error::ContainerNotFound(c) => WireError::ContainerNotFound(c.clone()),
            Error::ContainerExists(c) => WireError::ContainerExists(c.clone()),
            Error::CertificateNotForKey(c) => WireError::CertificateNotForKey(c.clone()),
            Error::CertificateSlotTaken {
                container,
                existing,
            } => WireError::CertificateSlotTaken {
                container: container.clone(),
                existing: existing.clone(),
            },
            Error::MechanismNotSupported { algorithm, key } => WireError::MechanismNotSupported {
                algorithm: algorithm.clone(),
                key: key.clone(),
            },
            Error::InvalidInput(m) => WireError::InvalidInput(m.clone()),
            Error::Skf { function, code } => WireError::Skf {
                function: (*function).to_owned(),
                code: *code,
            },
            Error::AlreadyWatching => WireError::AlreadyWatching,
            e @ (Error::LibraryLoad { .. } | Error::FunctionsMissing { .. }) => {
                WireError::NotLoaded(chain(e))
            }
            Error::HostedLoad(m) => WireError::NotLoaded(m.clone()),
            Error::Busy { waited } => WireError::Busy {
                waited_ms: u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
            },
            other => WireError::Other(chain(other)),
        }
    }
}

impl From<WireError> for Error {
    fn from(e: WireError) -> Self {
        match e {
            WireError::PinIncorrect {
                retries_left,
                count_low,
                final_try,
            } => Error::PinIncorrect {
                retries_left,
                count_low,
                final_try,
            },
            WireError::PinLocked => Error::PinLocked,
            WireError::NotLoggedIn(a) => Error::NotLoggedIn(a),
            WireError::Cancelled => Error::Cancelled,
            WireError::TokenNotPresent => Error::TokenNotPresent,
            WireError::TokenNotFound(t) => Error::TokenNotFound(t),
            WireError::ApplicationNotFound(a) => Error::ApplicationNotFound(a),
            WireError::CertificateNotFound(c) => Error::CertificateNotFound(c),
            WireError::ContainerNotFound(c) => Error::ContainerNotFound(c),
            WireError::ContainerExists(c) => Error::ContainerExists(c),
            WireError::CertificateNotForKey(c) => Error::CertificateNotForKey(c),
            WireError::CertificateSlotTaken {
                container,
                existing,
            } => Error::CertificateSlotTaken {
                container,
                existing,
            },
            WireError::MechanismNotSupported { algorithm, key } => {
                Error::MechanismNotSupported { algorithm, key }
            }
            WireError::InvalidInput(m) => Error::InvalidInput(m),
            WireError::Skf { function, code } => Error::Skf {
                function: static_name(&function).unwrap_or("SKF_(library host)"),
                code,
            },
            WireError::AlreadyWatching => Error::AlreadyWatching,
            WireError::NotLoaded(m) => Error::HostedLoad(m),
            WireError::Busy { waited_ms } => Error::Busy {
                waited: Duration::from_millis(waited_ms),
            },
            WireError::Other(m) => Error::ModuleHost(m),
        }
    }
}

/// The error and its sources on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        s.push_str(": ");
        s.push_str(&src.to_string());
        cur = src.source();
    }
    s
}

/// The SKF functions KeyPort calls, so that a name that crossed becomes `'static` again.
const FUNCTIONS: [&str; 26] = [
    "SKF_EnumDev",
    "SKF_ConnectDev",
    "SKF_DisConnectDev",
    "SKF_GetDevInfo",
    "SKF_EnumApplication",
    "SKF_OpenApplication",
    "SKF_CloseApplication",
    "SKF_EnumContainer",
    "SKF_OpenContainer",
    "SKF_CloseContainer",
    "SKF_GetContainerType",
    "SKF_ExportCertificate",
    "SKF_ExportPublicKey",
    "SKF_GetPINInfo",
    "SKF_VerifyPIN",
    "SKF_ClearSecureState",
    "SKF_ECCSignData",
    "SKF_RSASignData",
    "SKF_WaitForDevEvent",
    "SKF_CancelWaitForDevEvent",
    "SKF_CreateContainer",
    "SKF_DeleteContainer",
    "SKF_GenECCKeyPair",
    "SKF_ImportCertificate",
    "SKF_GenRandom",
    "SKF_ChangePIN",
];

fn static_name(name: &str) -> Option<&'static str> {
    FUNCTIONS.iter().copied().find(|f| *f == name)
}

/// Names that crossed, as the `'static` names KeyPort knows (others are dropped).
pub(crate) fn static_names(names: &[String]) -> Vec<&'static str> {
    names.iter().filter_map(|n| static_name(n)).collect()
}

/// The PIN's serde form: straight from a [`SecretPin`] into the frame, and from the frame
/// straight into a new [`SecretPin`].
mod pin_wire {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::SecretPin;

    pub(super) fn serialize<S: Serializer>(pin: &SecretPin, s: S) -> Result<S::Ok, S::Error> {
        pin.expose().serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SecretPin, D::Error> {
        Ok(SecretPin::from(String::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_a_caller_acts_on_cross_unchanged() {
        let e = Error::PinIncorrect {
            retries_left: 4,
            count_low: true,
            final_try: false,
        };
        assert!(matches!(
            Error::from(WireError::from(&e)),
            Error::PinIncorrect {
                retries_left: 4,
                count_low: true,
                final_try: false
            }
        ));
        let e = Error::Skf {
            function: "SKF_ECCSignData",
            code: 0x0A00_0001,
        };
        match Error::from(WireError::from(&e)) {
            Error::Skf { function, code } => {
                assert_eq!((function, code), ("SKF_ECCSignData", 0x0A00_0001))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_pin_crosses_inside_its_job_and_debug_hides_it() {
        let token = TokenId::derive(std::path::Path::new("/l.so"), "S", "", "");
        let job = Job::VerifyPin {
            application: ApplicationId::new(token, "APP"),
            pin: SecretPin::from("123456".to_owned()),
        };
        assert!(!format!("{job:?}").contains("123456"));
        let bytes = postcard::to_stdvec(&job).expect("encode");
        assert!(bytes.windows(6).any(|w| w == b"123456"));
        match postcard::from_bytes::<Job>(&bytes).expect("decode") {
            Job::VerifyPin { pin, .. } => assert_eq!(pin.expose(), "123456"),
            other => panic!("{other:?}"),
        }
    }
}
