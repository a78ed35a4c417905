//! The public handle to one loaded SKF library, and the messages it sends to the library's
//! worker thread. Every public method is a blocking request/reply of plain data over a channel,
//! so the worker could later live in a child process without changing this API.
//!
//! A library may hang inside a call. Every call but a signature waits at most
//! [`LoadOptions::call_timeout`] for its answer and then fails with [`Error::Busy`]; the worker
//! keeps its queue and the late answer is dropped. Until the worker has caught up with a request
//! given up on, no new work is queued behind it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::algorithm::SignRequest;
use crate::certificate::{CertificateId, CertificateInfo};
use crate::enroll::{GeneratedKey, ImportMode, NewContainer};
use crate::error::{Error, SignFailure};
use crate::events::DeviceEvents;
use crate::ffi::Skf;
use crate::pin::SecretPin;
use crate::remote::{self, Job, Reply as HostReply, Transport};
use crate::token::{ApplicationId, ApplicationInfo, PinStatus, TokenId, TokenInfo};
use crate::worker;

/// How long a call waits for the library when nothing else is said.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How a library is loaded and driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// The longest wait for the library's answer to a call (loading included): past it the call
    /// fails with [`Error::Busy`]. A signature waits this long for the worker to *start* it,
    /// then as long as it takes.
    pub call_timeout: Duration,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            call_timeout: DEFAULT_CALL_TIMEOUT,
        }
    }
}

/// A loaded SKF library. Cheap to clone; all clones talk to the same worker thread, which
/// owns every device, application and container handle. The worker disconnects its devices and
/// exits when the last clone is dropped.
#[derive(Clone)]
pub struct Library {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    call_timeout: Duration,
    /// Set while a [`DeviceEvents`] of this library lives.
    watching: Arc<AtomicBool>,
    engine: Engine,
}

/// Where the library runs: on a worker thread of this process, or in a host process
/// ([`Library::hosted`]).
enum Engine {
    Local(Local),
    Hosted(Arc<dyn Transport>),
}

struct Local {
    path: PathBuf,
    call_timeout: Duration,
    skf: Arc<Skf>,
    queue: Mutex<Queue>,
    pace: Arc<Pace>,
    thread: Option<JoinHandle<()>>,
    /// Disconnects when the worker thread ends (in a Mutex only to make `Local` Sync).
    finished: Mutex<mpsc::Receiver<()>>,
}

struct Queue {
    tx: Option<mpsc::Sender<Request>>,
    sent: u64,
}

impl Library {
    /// Loads the SKF library at `path` on a new worker thread, with the default options.
    pub fn load(path: &Path) -> Result<Library, Error> {
        Library::load_with(path, LoadOptions::default())
    }

    /// Loads the SKF library at `path` with `options`. A library without the functions KeyPort
    /// needs is [`Error::FunctionsMissing`]; one that does not finish loading within the call
    /// timeout is [`Error::Busy`].
    pub fn load_with(path: &Path, options: LoadOptions) -> Result<Library, Error> {
        let pace = Arc::new(Pace::default());
        let spawned = worker::spawn(path.to_path_buf(), Arc::clone(&pace), options.call_timeout)?;
        Ok(Library {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                call_timeout: options.call_timeout,
                watching: Arc::new(AtomicBool::new(false)),
                engine: Engine::Local(Local {
                    path: path.to_path_buf(),
                    call_timeout: options.call_timeout,
                    skf: spawned.skf,
                    queue: Mutex::new(Queue {
                        tx: Some(spawned.tx),
                        sent: 0,
                    }),
                    pace,
                    thread: Some(spawned.thread),
                    finished: Mutex::new(spawned.finished),
                }),
            }),
        })
    }

    /// The library at `path` in another process: every call becomes a [`remote::Job`] sent
    /// through `transport` (the agent's module host), with the in-process library's API. The
    /// library is loaded by the host; a failure to load shows in the first call's answer.
    pub fn hosted(path: &Path, options: LoadOptions, transport: Arc<dyn Transport>) -> Library {
        Library {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                call_timeout: options.call_timeout,
                watching: Arc::new(AtomicBool::new(false)),
                engine: Engine::Hosted(transport),
            }),
        }
    }

    /// True for a library in a host process.
    pub fn is_hosted(&self) -> bool {
        matches!(self.inner.engine, Engine::Hosted(_))
    }

    fn local(&self) -> Result<&Local, &Arc<dyn Transport>> {
        match &self.inner.engine {
            Engine::Local(l) => Ok(l),
            Engine::Hosted(t) => Err(t),
        }
    }

    /// Runs `job` in the host within the call deadline.
    fn remote(&self, job: Job) -> Result<HostReply, Error> {
        match &self.inner.engine {
            Engine::Hosted(t) => remote::ask(t.as_ref(), job, self.inner.call_timeout),
            Engine::Local(_) => Err(Error::WorkerGone),
        }
    }

    /// The path the library was loaded from.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The longest wait for one of this library's answers.
    pub fn call_timeout(&self) -> Duration {
        self.inner.call_timeout
    }

    /// The optional SKF functions this library lacks (SKF_WaitForDevEvent and
    /// SKF_CancelWaitForDevEvent: no events, poll the token list instead; SKF_RSASignData: no RSA
    /// containers; SKF_CreateContainer, SKF_DeleteContainer, SKF_GenECCKeyPair,
    /// SKF_ImportCertificate: no enrollment). For `keyport doctor`; the required ones are
    /// checked at load.
    pub fn missing_functions(&self) -> Vec<&'static str> {
        match self.local() {
            Ok(l) => l.skf.missing(),
            Err(_) => match self.remote(Job::MissingFunctions) {
                Ok(HostReply::MissingFunctions(names)) => remote::static_names(&names),
                Ok(other) => {
                    tracing::debug!(error = %remote::unexpected(&other), "missing functions");
                    Vec::new()
                }
                Err(e) => {
                    tracing::debug!(error = %e, "the SKF host did not say which functions it lacks");
                    Vec::new()
                }
            },
        }
    }

    /// True while the worker is still behind a request whose caller gave up waiting (for a
    /// hosted library: while its host runs a job).
    pub fn is_behind(&self) -> bool {
        match self.local() {
            Ok(l) => l.pace.is_behind(),
            Err(t) => t.is_busy(),
        }
    }

    /// The devices present now (SKF_EnumDev, SKF_ConnectDev, SKF_GetDevInfo).
    pub fn tokens(&self) -> Result<Vec<TokenInfo>, Error> {
        if self.is_hosted() {
            return remote::answer!(self.remote(Job::Tokens), HostReply::Tokens);
        }
        self.call(Request::Tokens)
    }

    /// A token's applications with their PIN state (SKF_EnumApplication, SKF_GetPINInfo).
    pub fn applications(&self, token: &TokenId) -> Result<Vec<ApplicationInfo>, Error> {
        let token = token.clone();
        if self.is_hosted() {
            return remote::answer!(
                self.remote(Job::Applications { token }),
                HostReply::Applications
            );
        }
        self.call(|reply| Request::Applications { token, reply })
    }

    /// Signing certificates of every container (of all tokens, or one) whose certificate
    /// parses and, for SM2, matches the container's signing key.
    pub fn certificates(&self, token: Option<&TokenId>) -> Result<Vec<CertificateInfo>, Error> {
        let token = token.cloned();
        if self.is_hosted() {
            return remote::answer!(
                self.remote(Job::Certificates { token }),
                HostReply::Certificates
            );
        }
        self.call(|reply| Request::Certificates { token, reply })
    }

    /// The user PIN's state (SKF_GetPINInfo).
    pub fn pin_status(&self, application: &ApplicationId) -> Result<PinStatus, Error> {
        let application = application.clone();
        if self.is_hosted() {
            return remote::answer!(
                self.remote(Job::PinStatus { application }),
                HostReply::PinStatus
            );
        }
        self.call(|reply| Request::PinStatus { application, reply })
    }

    /// Verifies the user PIN with exactly one SKF_VerifyPIN — or none, when SKF_GetPINInfo
    /// says the PIN is locked ([`Error::PinLocked`]). A wrong PIN is
    /// [`Error::PinIncorrect`] with the tries left; the shim never tries again by itself.
    /// The verification lasts until [`Library::logout`], a `logout_after` signature, or the
    /// key's removal.
    pub fn verify_pin(&self, application: &ApplicationId, pin: SecretPin) -> Result<(), Error> {
        let application = application.clone();
        if self.is_hosted() {
            return remote::answer!(
                self.remote(Job::VerifyPin { application, pin }),
                HostReply::PinVerified
            );
        }
        self.call(|reply| Request::VerifyPin {
            application,
            pin,
            reply,
        })
    }

    /// Signs every input with the container's key, in order (the PIN must be verified).
    /// `cancel` is checked before each signature. On failure, the signatures completed before
    /// it are in [`SignFailure::completed`].
    ///
    /// The worker must *start* the request within the call timeout, else [`Error::Busy`] (and
    /// the worker drops it unsigned); once started it runs to its end.
    pub fn sign(
        &self,
        req: SignRequest,
        cancel: Option<Arc<AtomicBool>>,
    ) -> Result<Vec<Vec<u8>>, SignFailure> {
        self.sign_with_progress(req, cancel, None)
    }

    /// [`Library::sign`], telling `progress` the number of signatures done after each one.
    /// In a host, each signature re-arms the call deadline: a batch may take as long as it
    /// needs, one signature at most the call timeout.
    pub fn sign_with_progress(
        &self,
        req: SignRequest,
        cancel: Option<Arc<AtomicBool>>,
        progress: Option<mpsc::Sender<usize>>,
    ) -> Result<Vec<Vec<u8>>, SignFailure> {
        if let Err(t) = self.local() {
            return remote::sign(t.as_ref(), req, cancel, self.inner.call_timeout, progress);
        }
        let deadline = Instant::now() + self.inner.call_timeout;
        let (started, started_rx) = mpsc::channel();
        let (reply, rx) = mpsc::channel();
        let seq = self.send(
            Request::Sign {
                req,
                cancel,
                progress,
                started,
                reply,
            },
            deadline,
        )?;
        match started_rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(()) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => return Err(self.gave_up(seq, "sign").into()),
            Err(mpsc::RecvTimeoutError::Disconnected) => return Err(Error::WorkerGone.into()),
        }
        rx.recv()
            .map_err(|_| SignFailure::from(Error::WorkerGone))?
    }

    /// Generates an SM2 signing key pair on the key (SGD_SM2_1) in a new container, or in the
    /// named one if it exists and is empty. The user PIN is verified first with exactly one
    /// SKF_VerifyPIN (as [`Library::verify_pin`]: a wrong PIN is [`Error::PinIncorrect`] and
    /// nothing is created; never retried). Then SKF_CreateContainer (or SKF_OpenContainer),
    /// SKF_GenECCKeyPair; if generation fails in a container made for it, the container is
    /// deleted again (SKF_DeleteContainer).
    ///
    /// The PIN stays verified, so that the certificate request can be signed next
    /// ([`Library::sign`] with a [`crate::SignInput::Message`]: Z comes from the container's
    /// key, no certificate needed); end with [`Library::logout`].
    pub fn generate_sm2(
        &self,
        application: &ApplicationId,
        container: NewContainer,
        pin: SecretPin,
    ) -> Result<GeneratedKey, Error> {
        let application = application.clone();
        if self.is_hosted() {
            return remote::answer!(
                self.remote(Job::GenerateSm2 {
                    application,
                    container,
                    pin
                }),
                HostReply::Generated
            );
        }
        self.call(|reply| Request::GenerateSm2 {
            application,
            container,
            pin,
            reply,
        })
    }

    /// Stores `der`, a certificate issued for the key in `container`, in its signing slot
    /// (SKF_ImportCertificate, bSignFlag TRUE) and returns it as listed. The PIN must be
    /// verified ([`Error::NotLoggedIn`] otherwise, from the key).
    ///
    /// Refused before anything is written: bytes that are not an X.509 certificate
    /// ([`Error::InvalidInput`]); a certificate whose public key is not the container's
    /// signing key ([`Error::CertificateNotForKey`]); a container that already has another
    /// signing certificate, unless `mode` is [`ImportMode::Replace`]
    /// ([`Error::CertificateSlotTaken`]). The same certificate again is a success that
    /// writes nothing.
    pub fn import_certificate(
        &self,
        container: &CertificateId,
        der: Vec<u8>,
        mode: ImportMode,
    ) -> Result<CertificateInfo, Error> {
        let container = container.clone();
        if self.is_hosted() {
            return remote::answer!(
                self.remote(Job::ImportCertificate {
                    container,
                    der,
                    mode
                }),
                HostReply::Imported,
                |b| *b
            );
        }
        self.call(|reply| Request::ImportCertificate {
            container,
            der,
            mode,
            reply,
        })
    }

    /// The container whose SM2 signing key is `public_key` (`04 ‖ X ‖ Y`), in any application
    /// of the token, certificate or not: where a certificate issued for that key belongs
    /// (SKF_EnumApplication, SKF_EnumContainer, SKF_GetContainerType, SKF_ExportPublicKey; no
    /// PIN). `None`: no container holds that key.
    pub fn key_container(
        &self,
        token: &TokenId,
        public_key: Vec<u8>,
    ) -> Result<Option<CertificateId>, Error> {
        let token = token.clone();
        if self.is_hosted() {
            return remote::answer!(
                self.remote(Job::KeyContainer { token, public_key }),
                HostReply::KeyContainer
            );
        }
        self.call(|reply| Request::KeyContainer {
            token,
            public_key,
            reply,
        })
    }

    /// Deletes a container [`Library::generate_sm2`] made whose certificate request could not
    /// be made (SKF_DeleteContainer; the PIN must still be verified). A container with a
    /// signing certificate is never deleted ([`Error::CertificateSlotTaken`]).
    pub fn delete_new_container(&self, container: &CertificateId) -> Result<(), Error> {
        let container = container.clone();
        if self.is_hosted() {
            return remote::answer!(
                self.remote(Job::DeleteNewContainer { container }),
                HostReply::ContainerDeleted
            );
        }
        self.call(|reply| Request::DeleteNewContainer { container, reply })
    }

    /// SKF_ClearSecureState: the PIN must be verified again before the next signature.
    pub fn logout(&self, application: &ApplicationId) -> Result<(), Error> {
        let application = application.clone();
        if self.is_hosted() {
            return remote::answer!(
                self.remote(Job::Logout { application }),
                HostReply::LoggedOut
            );
        }
        self.call(|reply| Request::Logout { application, reply })
    }

    /// Starts watching device insertion and removal (SKF_WaitForDevEvent on a thread of its
    /// own); dropping the returned value cancels the wait (SKF_CancelWaitForDevEvent). One
    /// watch per library at a time ([`Error::AlreadyWatching`]): the cancel is library-wide.
    pub fn events(&self) -> Result<DeviceEvents, Error> {
        if self.inner.watching.swap(true, Ordering::SeqCst) {
            return Err(Error::AlreadyWatching);
        }
        match self.local() {
            Ok(l) => DeviceEvents::start(
                Arc::clone(&l.skf),
                Arc::clone(&self.inner.watching),
                self.inner.call_timeout,
            ),
            Err(t) => DeviceEvents::start_remote(
                Arc::clone(t),
                Arc::clone(&self.inner.watching),
                self.inner.call_timeout,
            ),
        }
        .inspect_err(|_| self.inner.watching.store(false, Ordering::SeqCst))
    }

    fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, Error> {
        let deadline = Instant::now() + self.inner.call_timeout;
        let (reply, rx) = mpsc::channel();
        let request = make(reply);
        let what = request.name();
        let seq = self.send(request, deadline)?;
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(answer) => answer,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(self.gave_up(seq, what)),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(Error::WorkerGone),
        }
    }

    fn send(&self, req: Request, deadline: Instant) -> Result<u64, Error> {
        let local = self.local().map_err(|_| Error::WorkerGone)?;
        if !local.pace.wait_caught_up(deadline) {
            return Err(self.busy());
        }
        let mut queue = lock(&local.queue);
        queue
            .tx
            .as_ref()
            .ok_or(Error::WorkerGone)?
            .send(req)
            .map_err(|_| Error::WorkerGone)?;
        queue.sent += 1;
        Ok(queue.sent)
    }

    fn gave_up(&self, seq: u64, what: &'static str) -> Error {
        if let Ok(local) = self.local() {
            local.pace.gave_up(seq);
        }
        tracing::warn!(
            path = %self.inner.path.display(),
            request = what,
            timeout_s = self.inner.call_timeout.as_secs_f64(),
            "the SKF library did not answer in time"
        );
        self.busy()
    }

    fn busy(&self) -> Error {
        Error::Busy {
            waited: self.inner.call_timeout,
        }
    }
}

impl fmt::Debug for Library {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Library")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        // Closing the channel ends the worker's loop; it then closes its handles.
        drop(lock(&self.queue).tx.take());
        let Some(thread) = self.thread.take() else {
            return;
        };
        if thread.thread().id() == std::thread::current().id() {
            return;
        }
        match lock(&self.finished).recv_timeout(self.call_timeout) {
            Err(mpsc::RecvTimeoutError::Timeout) => {
                tracing::warn!(path = %self.path.display(), "the SKF worker did not finish; leaving it behind");
            }
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                if thread.join().is_err() {
                    tracing::error!(path = %self.path.display(), "SKF worker panicked");
                }
            }
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How far the worker is: requests finished, and the last one a caller gave up waiting for.
#[derive(Debug, Default)]
pub(crate) struct Pace {
    counts: Mutex<Counts>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct Counts {
    done: u64,
    given_up: u64,
}

impl Pace {
    pub(crate) fn finished_one(&self) {
        lock(&self.counts).done += 1;
        self.changed.notify_all();
    }

    fn gave_up(&self, seq: u64) {
        let mut c = lock(&self.counts);
        c.given_up = c.given_up.max(seq);
    }

    fn is_behind(&self) -> bool {
        let c = lock(&self.counts);
        c.done < c.given_up
    }

    fn wait_caught_up(&self, deadline: Instant) -> bool {
        let guard = lock(&self.counts);
        let left = deadline.saturating_duration_since(Instant::now());
        let (c, _) = self
            .changed
            .wait_timeout_while(guard, left, |c| c.done < c.given_up)
            .unwrap_or_else(PoisonError::into_inner);
        c.done >= c.given_up
    }
}

pub(crate) type Reply<T> = mpsc::Sender<Result<T, Error>>;

/// One request to the worker thread: plain data and a reply channel.
pub(crate) enum Request {
    Tokens(Reply<Vec<TokenInfo>>),
    Applications {
        token: TokenId,
        reply: Reply<Vec<ApplicationInfo>>,
    },
    Certificates {
        token: Option<TokenId>,
        reply: Reply<Vec<CertificateInfo>>,
    },
    PinStatus {
        application: ApplicationId,
        reply: Reply<PinStatus>,
    },
    VerifyPin {
        application: ApplicationId,
        pin: SecretPin,
        reply: Reply<()>,
    },
    Sign {
        req: SignRequest,
        cancel: Option<Arc<AtomicBool>>,
        /// Told the number of signatures done after each one.
        progress: Option<mpsc::Sender<usize>>,
        /// Told when the worker takes the job up; a failed send means the caller gave up.
        started: mpsc::Sender<()>,
        reply: mpsc::Sender<Result<Vec<Vec<u8>>, SignFailure>>,
    },
    Logout {
        application: ApplicationId,
        reply: Reply<()>,
    },
    GenerateSm2 {
        application: ApplicationId,
        container: NewContainer,
        pin: SecretPin,
        reply: Reply<GeneratedKey>,
    },
    ImportCertificate {
        container: CertificateId,
        der: Vec<u8>,
        mode: ImportMode,
        reply: Reply<CertificateInfo>,
    },
    KeyContainer {
        token: TokenId,
        public_key: Vec<u8>,
        reply: Reply<Option<CertificateId>>,
    },
    DeleteNewContainer {
        container: CertificateId,
        reply: Reply<()>,
    },
}

impl Request {
    fn name(&self) -> &'static str {
        match self {
            Request::Tokens(_) => "tokens",
            Request::Applications { .. } => "applications",
            Request::Certificates { .. } => "certificates",
            Request::PinStatus { .. } => "pin_status",
            Request::VerifyPin { .. } => "verify_pin",
            Request::Sign { .. } => "sign",
            Request::Logout { .. } => "logout",
            Request::GenerateSm2 { .. } => "generate_sm2",
            Request::ImportCertificate { .. } => "import_certificate",
            Request::KeyContainer { .. } => "key_container",
            Request::DeleteNewContainer { .. } => "delete_new_container",
        }
    }
}
