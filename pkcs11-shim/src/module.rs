//! The public handle to one loaded PKCS#11 module, and the messages it sends to the module's
//! worker thread. Every public method is a blocking request/reply over a channel; the same API
//! also drives a module in another process ([`Module::hosted`]: each call a [`Job`] through a
//! [`Transport`]).
//!
//! Each call also has an async form (`*_async`) for callers on an async runtime: the worker
//! answers it through a `tokio` oneshot, so no thread of the caller blocks while the module
//! works and the answer wakes the waiting task directly. A hosted module whose transport has an
//! async form ([`Transport::is_async`], the agent's supervisor) is called the same way: the task
//! sends the job and the transport's reply wakes it; otherwise the blocking call runs on the
//! runtime's blocking pool.
//!
//! A module may hang inside a call (a deadlocked driver, a card that stopped answering). Every
//! call but the signatures themselves therefore waits at most [`LoadOptions::call_timeout`] for
//! its answer and then fails with [`Error::Busy`]; the worker keeps its queue and the late
//! answer is dropped. Until the worker has caught up with a request given up on, no new work is
//! queued behind it: a call waits (within its own deadline) for the worker to catch up.

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify};

use crate::algorithm::SignRequest;
use crate::certificate::CertificateInfo;
use crate::error::{Error, SignFailure};
use crate::keygen::{
    DeleteCertificateRequest, DeleteKeyRequest, EnrolJob, GenerateRequest, GeneratedKey,
    ImportRequest, Imported, KeySignRequest, KeySpec, Removed,
};
use crate::pin::Credential;
use crate::remote::{self, Job, Transport, TransportError};
use crate::token::{LoginState, ModuleInfo, TokenId, TokenInfo};
use crate::worker;

/// How far a signing job is, sent after each signature.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    /// Signatures made by this job so far.
    pub done: usize,
    /// Inputs of this job.
    pub total: usize,
}

/// How long a call waits for the module when nothing else is said.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How a module is loaded and driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// The longest wait for the module's answer to a call (loading included): past it the call
    /// fails with [`Error::Busy`]. A signature waits this long for the worker to *start* it,
    /// then as long as it takes (a batch, or a PIN pad, may take minutes).
    pub call_timeout: Duration,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            call_timeout: DEFAULT_CALL_TIMEOUT,
        }
    }
}

/// A loaded PKCS#11 module. Cheap to clone; all clones talk to the same worker thread, which
/// owns the module's context. The worker finalises the module (C_Finalize) and exits when the
/// last clone is dropped.
#[derive(Clone)]
pub struct Module {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    call_timeout: Duration,
    engine: Engine,
}

/// What answers the calls: a worker thread in this process, or a module host.
enum Engine {
    Thread(ThreadEngine),
    Hosted(Hosted),
}

/// A module in another process, reached through a [`Transport`].
struct Hosted {
    transport: Box<dyn Transport>,
    /// A job that logs in on a PIN pad waits this long for each step.
    pin_pad_wait: Duration,
    /// Token events seen ([`Module::token_event`]), and how many of them the host was told of:
    /// the next job first tells it ([`Job::TokenEvent`]), so that its module probes again.
    token_events: AtomicU64,
    told: AtomicU64,
}

impl Hosted {
    /// Runs `job` on the host, after telling it of token events it has not heard of.
    fn run(
        &self,
        job: Job,
        deadline: Duration,
        cancel: Option<&AtomicBool>,
        interim: &mut dyn FnMut(remote::Reply),
    ) -> Result<remote::Reply, TransportError> {
        let events = self.token_events.load(Ordering::SeqCst);
        if self.told.load(Ordering::SeqCst) < events {
            match self
                .transport
                .run(Job::TokenEvent, deadline, None, &mut |_| {})
            {
                // A host that failed is replaced by one with no probes to forget.
                Ok(_) | Err(TransportError::Failed(_)) => {
                    self.told.fetch_max(events, Ordering::SeqCst);
                }
                Err(TransportError::Busy { .. }) => {}
            }
        }
        self.transport.run(job, deadline, cancel, interim)
    }

    /// [`Hosted::run`] for a task, on a transport that [`Transport::is_async`].
    async fn run_async(
        &self,
        job: Job,
        deadline: Duration,
        cancel: Option<Arc<AtomicBool>>,
        interim: Box<dyn FnMut(remote::Reply) + Send>,
    ) -> Result<remote::Reply, TransportError> {
        let events = self.token_events.load(Ordering::SeqCst);
        if self.told.load(Ordering::SeqCst) < events {
            let told = self
                .transport
                .run_async(Job::TokenEvent, deadline, None, Box::new(|_| {}))
                .await;
            if let Ok(_) | Err(TransportError::Failed(_)) = told {
                self.told.fetch_max(events, Ordering::SeqCst);
            }
        }
        self.transport
            .run_async(job, deadline, cancel, interim)
            .await
    }
}

/// [`on_host!`] for a task: `$module` (owned) must be hosted on an async transport.
macro_rules! on_host_async {
    ($module:expr, $job:expr, $answer:path) => {{
        let Some(h) = $module.host() else {
            return Err(Error::ModuleHost("not a hosted module".into()));
        };
        match h
            .run_async($job, $module.inner.call_timeout, None, Box::new(|_| {}))
            .await
        {
            Ok($answer(r)) => r.map_err(Error::from),
            Ok(other) => Err(remote::unexpected(&other)),
            Err(e) => Err(Error::from(e)),
        }
    }};
}

/// Runs a job on a module host and takes the answer out of the reply variant that answers it.
macro_rules! on_host {
    ($hosted:expr, $deadline:expr, $job:expr, $answer:path) => {
        match $hosted.run($job, $deadline, None, &mut |_| {}) {
            Ok($answer(r)) => r.map_err(Error::from),
            Ok(other) => Err(remote::unexpected(&other)),
            Err(e) => Err(Error::from(e)),
        }
    };
}

struct ThreadEngine {
    path: PathBuf,
    call_timeout: Duration,
    queue: Mutex<Queue>,
    pace: Arc<Pace>,
    thread: Option<JoinHandle<()>>,
    /// Disconnects when the worker thread ends (in a Mutex only to make `Inner` Sync).
    finished: Mutex<mpsc::Receiver<()>>,
    /// [`Module::load_inline`]: no thread; each request runs on its caller's thread.
    inline: Option<Box<Mutex<worker::Worker>>>,
}

/// The way to the worker, and how many requests went down it. Sending and counting happen
/// under one lock, so the n-th request sent is the n-th the worker receives.
struct Queue {
    tx: Option<mpsc::Sender<Request>>,
    sent: u64,
}

impl Module {
    /// Loads the module at `path` (dlopen) and initialises it (C_Initialize with
    /// CKF_OS_LOCKING_OK), both on the new worker thread, with the default options.
    pub fn load(path: &Path) -> Result<Module, Error> {
        Module::load_with(path, LoadOptions::default())
    }

    /// Loads the module at `path` with `options`. A module that does not finish loading within
    /// the call timeout is [`Error::Busy`] (its thread is left to finish or hang alone).
    pub fn load_with(path: &Path, options: LoadOptions) -> Result<Module, Error> {
        let pace = Arc::new(Pace::default());
        let spawned = worker::spawn(path.to_path_buf(), Arc::clone(&pace), options.call_timeout)?;
        Ok(Module {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                call_timeout: options.call_timeout,
                engine: Engine::Thread(ThreadEngine {
                    path: path.to_path_buf(),
                    call_timeout: options.call_timeout,
                    queue: Mutex::new(Queue {
                        tx: Some(spawned.tx),
                        sent: 0,
                    }),
                    pace,
                    thread: Some(spawned.thread),
                    finished: Mutex::new(spawned.finished),
                    inline: None,
                }),
            }),
        })
    }

    /// Loads the module at `path` with no worker thread: each call runs the module on the
    /// caller's thread, one at a time, and waits for it however long it takes (no call
    /// timeout). For a module host, whose one job thread calls the module anyway and whose
    /// deadlines are the agent's: a worker thread there was one more hand-off (two context
    /// switches) per job. A caller that must not wait on a hung module uses [`Module::load_with`].
    pub fn load_inline(path: &Path) -> Result<Module, Error> {
        let pace = Arc::new(Pace::default());
        let worker = worker::open_worker(path.to_path_buf(), Arc::clone(&pace))?;
        // No deadline: a day, as deadlines go (and no overflow when added to an Instant).
        let call_timeout = Duration::from_secs(24 * 60 * 60);
        Ok(Module {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                call_timeout,
                engine: Engine::Thread(ThreadEngine {
                    path: path.to_path_buf(),
                    call_timeout,
                    queue: Mutex::new(Queue { tx: None, sent: 0 }),
                    pace,
                    thread: None,
                    finished: Mutex::new(mpsc::channel().1),
                    inline: Some(Box::new(Mutex::new(worker))),
                }),
            }),
        })
    }

    /// The module at `path`, loaded in a module host that `transport` reaches: the same API,
    /// each call a [`Job`] with the call timeout as its deadline (a signing job: for each of
    /// its steps; `pin_pad_wait` when a job logs in on a PIN pad). Asks the host for the
    /// module's info once, so that a module that does not load fails here, as
    /// [`Module::load_with`] does.
    pub fn hosted(
        path: &Path,
        options: LoadOptions,
        pin_pad_wait: Duration,
        transport: Box<dyn Transport>,
    ) -> Result<Module, Error> {
        let module = Module {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                call_timeout: options.call_timeout,
                engine: Engine::Hosted(Hosted {
                    transport,
                    pin_pad_wait: pin_pad_wait.max(options.call_timeout),
                    token_events: AtomicU64::new(0),
                    told: AtomicU64::new(0),
                }),
            }),
        };
        module.info()?;
        Ok(module)
    }

    /// True when the module runs in a module host.
    pub fn is_hosted(&self) -> bool {
        matches!(self.inner.engine, Engine::Hosted(_))
    }

    /// True when the module runs in a module host reached by an async transport.
    fn hosted_async(&self) -> bool {
        self.host().is_some_and(|h| h.transport.is_async())
    }

    /// The in-process engine; a hosted module has none (its calls never get here).
    fn thread(&self) -> Result<&ThreadEngine, Error> {
        match &self.inner.engine {
            Engine::Thread(t) => Ok(t),
            Engine::Hosted(_) => Err(Error::WorkerGone),
        }
    }

    /// The module host, for a hosted module.
    fn host(&self) -> Option<&Hosted> {
        match &self.inner.engine {
            Engine::Hosted(h) => Some(h),
            Engine::Thread(_) => None,
        }
    }

    /// How long a hosted job with this credential may wait for each of its steps.
    fn host_deadline(&self, h: &Hosted, credential: &Credential) -> Duration {
        if matches!(credential, Credential::PinPad) {
            h.pin_pad_wait
        } else {
            self.inner.call_timeout
        }
    }

    /// The path the module was loaded from.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The longest wait for one of this module's answers.
    pub fn call_timeout(&self) -> Duration {
        self.inner.call_timeout
    }

    /// True while the worker is still behind a request whose caller gave up waiting (the module
    /// hangs, or is busy with a long signature): a call now would wait and likely fail with
    /// [`Error::Busy`]. No PKCS#11 call; for callers that would rather skip such a module.
    pub fn is_behind(&self) -> bool {
        match &self.inner.engine {
            Engine::Thread(t) => t.pace.is_behind(),
            // The host runs a job: a call now would queue behind it.
            Engine::Hosted(h) => h.transport.is_busy(),
        }
    }

    /// A card went in or out of a reader (the PC/SC watcher says so): the next request on
    /// every token of this module probes it again (C_GetTokenInfo) rather than reusing the
    /// last probe of a logged-in token. No PKCS#11 call.
    pub fn token_event(&self) {
        match &self.inner.engine {
            Engine::Thread(t) => t.pace.token_event(),
            Engine::Hosted(h) => {
                h.token_events.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    /// C_GetInfo: the library's description, manufacturer and versions.
    pub fn info(&self) -> Result<ModuleInfo, Error> {
        if let Some(h) = self.host() {
            return on_host!(h, self.inner.call_timeout, Job::Info, remote::Reply::Info);
        }
        self.call(Request::Info)
    }

    /// The tokens present now.
    pub fn tokens(&self) -> Result<Vec<TokenInfo>, Error> {
        if let Some(h) = self.host() {
            return on_host!(
                h,
                self.inner.call_timeout,
                Job::Tokens,
                remote::Reply::Tokens
            );
        }
        self.call(Request::Tokens)
    }

    /// Certificates whose private key is on a token (all tokens, or one).
    pub fn certificates(&self, token: Option<&TokenId>) -> Result<Vec<CertificateInfo>, Error> {
        let token = token.cloned();
        if let Some(h) = self.host() {
            let job = Job::Certificates { token };
            return on_host!(h, self.inner.call_timeout, job, remote::Reply::Certificates);
        }
        self.call(|reply| Request::Certificates { token, reply })
    }

    /// [`Module::certificates`] for a caller on an async runtime.
    pub fn certificates_async(
        &self,
        token: Option<&TokenId>,
    ) -> impl Future<Output = Result<Vec<CertificateInfo>, Error>> + Send + 'static {
        let token = token.cloned();
        let module = self.clone();
        async move {
            if module.hosted_async() {
                return on_host_async!(
                    module,
                    Job::Certificates { token },
                    remote::Reply::Certificates
                );
            }
            if module.is_hosted() {
                return off_thread(move || module.certificates(token.as_ref())).await?;
            }
            module
                .call_async(|reply| Request::Certificates { token, reply })
                .await
        }
    }

    /// Whether signing with this token needs a PIN now.
    pub fn login_state(&self, token: &TokenId) -> Result<LoginState, Error> {
        let token = token.clone();
        if let Some(h) = self.host() {
            let job = Job::LoginState { token };
            return on_host!(h, self.inner.call_timeout, job, remote::Reply::LoginState);
        }
        self.call(|reply| Request::LoginState { token, reply })
    }

    /// [`Module::login_state`] for a caller on an async runtime.
    pub fn login_state_async(
        &self,
        token: &TokenId,
    ) -> impl Future<Output = Result<LoginState, Error>> + Send + 'static {
        let token = token.clone();
        let module = self.clone();
        async move {
            if module.hosted_async() {
                return on_host_async!(
                    module,
                    Job::LoginState { token },
                    remote::Reply::LoginState
                );
            }
            if module.is_hosted() {
                return off_thread(move || module.login_state(&token)).await?;
            }
            module
                .call_async(|reply| Request::LoginState { token, reply })
                .await
        }
    }

    /// Signs the inputs with the certificate's key, in order, logging in with `credential`
    /// where the token asks for a login (see [`Credential`] for how far one credential goes).
    /// `progress` gets a [`Progress`] after each signature; `cancel` is checked before each
    /// one. On failure, the signatures completed before it are in [`SignFailure::completed`];
    /// [`Error::LoginRequired`] and [`Error::PinIncorrect`] mean "ask the user, then send the
    /// rest again".
    ///
    /// The worker must *start* the request within the call timeout, else [`Error::Busy`] (and
    /// the worker drops the request when it reaches it); once started it runs to its end.
    pub fn sign(
        &self,
        req: SignRequest,
        credential: Credential,
        progress: Option<mpsc::Sender<Progress>>,
        cancel: Option<Arc<AtomicBool>>,
    ) -> Result<Vec<Vec<u8>>, SignFailure> {
        if let Some(h) = self.host() {
            return self.sign_hosted(h, req, credential, progress, cancel);
        }
        let deadline = Instant::now() + self.inner.call_timeout;
        let (started, started_rx) = mpsc::channel();
        let (reply, rx) = mpsc::channel();
        let job = SignJob {
            req,
            credential,
            progress,
            cancel,
        };
        let seq = self.send(
            Request::Sign {
                job,
                started: Answer::Blocking(started),
                reply: Answer::Blocking(reply),
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

    /// [`Module::sign`] for a caller on an async runtime: the job goes to the worker's queue at
    /// once and the worker answers through a oneshot, so no thread waits for it. The same
    /// rules: the worker must start the job within the call timeout (else [`Error::Busy`]),
    /// then it runs to its end. Dropping the future before the answer abandons the wait, not
    /// the job (the worker finishes it; its answer is dropped).
    pub fn sign_async(
        &self,
        req: SignRequest,
        credential: Credential,
        progress: Option<mpsc::Sender<Progress>>,
        cancel: Option<Arc<AtomicBool>>,
    ) -> impl Future<Output = Result<Vec<Vec<u8>>, SignFailure>> + Send + 'static {
        let module = self.clone();
        async move {
            if let Some(h) = module.host().filter(|h| h.transport.is_async()) {
                let deadline = module.host_deadline(h, &credential);
                let wants_progress = progress.is_some();
                let interim = Box::new(move |reply: remote::Reply| {
                    if let (remote::Reply::Progress(p), Some(tx)) = (reply, progress.as_ref()) {
                        let _ = tx.send(p);
                    }
                });
                let job = Job::Sign {
                    req,
                    credential,
                    progress: wants_progress,
                };
                let reply = h.run_async(job, deadline, cancel.clone(), interim).await;
                return signed(reply, cancel.as_deref());
            }
            if module.is_hosted() {
                return off_thread(move || module.sign(req, credential, progress, cancel)).await?;
            }
            let deadline = Instant::now() + module.inner.call_timeout;
            let (started, mut started_rx) = oneshot::channel();
            let (reply, mut rx) = oneshot::channel();
            let job = SignJob {
                req,
                credential,
                progress,
                cancel,
            };
            let request = Request::Sign {
                job,
                started: Answer::Async(started),
                reply: Answer::Async(reply),
            };
            let seq = module.send_async(request, deadline).await?;
            // The answer usually comes first; the start matters only when it does not come
            // within the deadline (one wake-up per signature, not two).
            tokio::select! {
                biased;
                answer = &mut rx => return answer.map_err(|_| SignFailure::from(Error::WorkerGone))?,
                () = tokio::time::sleep_until(deadline.into()) => {}
            }
            match started_rx.try_recv() {
                Ok(()) => {}
                Err(oneshot::error::TryRecvError::Empty) => {
                    return Err(module.gave_up(seq, "sign").into())
                }
                Err(oneshot::error::TryRecvError::Closed) => return Err(Error::WorkerGone.into()),
            }
            rx.await.map_err(|_| SignFailure::from(Error::WorkerGone))?
        }
    }

    /// C_Logout on the token (a no-op when not logged in); drops the cached PIN login.
    pub fn logout(&self, token: &TokenId) -> Result<(), Error> {
        let token = token.clone();
        if let Some(h) = self.host() {
            let job = Job::Logout { token };
            return on_host!(h, self.inner.call_timeout, job, remote::Reply::LoggedOut);
        }
        self.call(|reply| Request::Logout { token, reply })
    }

    /// [`Module::sign`] on a module host: progress comes back as interim replies, the cancel
    /// flag is watched and sent as a message.
    fn sign_hosted(
        &self,
        h: &Hosted,
        req: SignRequest,
        credential: Credential,
        progress: Option<mpsc::Sender<Progress>>,
        cancel: Option<Arc<AtomicBool>>,
    ) -> Result<Vec<Vec<u8>>, SignFailure> {
        let deadline = self.host_deadline(h, &credential);
        let mut interim = |reply: remote::Reply| {
            if let (remote::Reply::Progress(p), Some(tx)) = (reply, progress.as_ref()) {
                let _ = tx.send(p);
            }
        };
        let job = Job::Sign {
            req,
            credential,
            progress: progress.is_some(),
        };
        let reply = h.run(job, deadline, cancel.as_deref(), &mut interim);
        signed(reply, cancel.as_deref())
    }

    /// Generates a key pair on the token, logging in with `credential` where the token asks
    /// (see [`crate::keygen`] for what the token holds afterwards). Waits at most the call
    /// timeout; [`Error::LoginRequired`] and [`Error::PinIncorrect`] mean "ask the user, then
    /// send it again".
    pub fn generate_key(
        &self,
        req: GenerateRequest,
        credential: Credential,
    ) -> Result<GeneratedKey, Error> {
        if let Some(h) = self.host() {
            let deadline = self.host_deadline(h, &credential);
            let job = Job::Generate { req, credential };
            return on_host!(h, deadline, job, remote::Reply::Generated);
        }
        let job = EnrolJob { req, credential };
        self.call(|reply| Request::Generate { job, reply })
    }

    /// One signature by the key with this CKA_ID, certificate or not (the certificate request
    /// of a key just generated). Same login rules as [`Module::sign`], one input.
    pub fn sign_with_key(
        &self,
        req: KeySignRequest,
        credential: Credential,
    ) -> Result<Vec<u8>, Error> {
        if let Some(h) = self.host() {
            let deadline = self.host_deadline(h, &credential);
            let job = Job::KeySign { req, credential };
            return on_host!(h, deadline, job, remote::Reply::KeySigned);
        }
        let job = EnrolJob { req, credential };
        self.call(|reply| Request::KeySign { job, reply })
    }

    /// Stores a certificate beside the private key whose public key it carries (the key's
    /// CKA_ID and label). [`Error::NoMatchingKey`] when no key on the token matches. A key
    /// that has another certificate keeps it (both listed, see [`crate::CertificateId`]) unless
    /// the request says [`crate::ImportMode::Replace`].
    pub fn import_certificate(
        &self,
        req: ImportRequest,
        credential: Credential,
    ) -> Result<Imported, Error> {
        if let Some(h) = self.host() {
            let deadline = self.host_deadline(h, &credential);
            let job = Job::Import { req, credential };
            return on_host!(h, deadline, job, remote::Reply::Imported).map(|i| *i);
        }
        let job = EnrolJob { req, credential };
        self.call(|reply| Request::Import { job, reply })
    }

    /// Whether the token can generate keys of this type (its mechanism list, and for RSA the
    /// key sizes C_GetMechanismInfo gives), without a login: [`Error::MechanismNotSupported`]
    /// when it cannot. A token that lists no mechanisms is given the benefit of the doubt.
    pub fn check_generation(&self, token: &TokenId, spec: KeySpec) -> Result<(), Error> {
        let token = token.clone();
        if let Some(h) = self.host() {
            let job = Job::CheckGeneration { token, spec };
            return on_host!(
                h,
                self.inner.call_timeout,
                job,
                remote::Reply::GenerationChecked
            );
        }
        self.call(|reply| Request::CheckGeneration { token, spec, reply })
    }

    /// Destroys a key pair made by [`Module::generate_key`] whose certificate request could
    /// not be made, in the login the generation left open (no credential: without that login it
    /// answers [`Error::LoginRequired`] and destroys nothing).
    pub fn delete_new_key(&self, req: DeleteKeyRequest) -> Result<(), Error> {
        if let Some(h) = self.host() {
            let job = Job::DeleteKey { req };
            return on_host!(h, self.inner.call_timeout, job, remote::Reply::KeyDeleted);
        }
        let job = EnrolJob {
            req,
            credential: Credential::None,
        };
        self.call(|reply| Request::DeleteKey { job, reply })
    }

    /// Deletes one certificate of a key that has another (the old one after a renewal for the
    /// same key), logging in with `credential`. [`Error::OnlyCertificate`] for a key's last
    /// certificate: neither it nor the key is deleted.
    pub fn delete_certificate(
        &self,
        req: DeleteCertificateRequest,
        credential: Credential,
    ) -> Result<Removed, Error> {
        if let Some(h) = self.host() {
            let deadline = self.host_deadline(h, &credential);
            let job = Job::DeleteCertificate { req, credential };
            return on_host!(h, deadline, job, remote::Reply::CertificateDeleted);
        }
        let job = EnrolJob { req, credential };
        self.call(|reply| Request::DeleteCertificate { job, reply })
    }

    /// Sends a request and waits, at most the call timeout, for its answer.
    fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, Error> {
        let deadline = Instant::now() + self.inner.call_timeout;
        let (reply, rx) = mpsc::channel();
        let request = make(Answer::Blocking(reply));
        let what = request.name();
        let seq = self.send(request, deadline)?;
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(answer) => answer,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(self.gave_up(seq, what)),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(Error::WorkerGone),
        }
    }

    /// [`Module::call`] on an async runtime: the same deadline, awaited instead of blocked on.
    async fn call_async<T>(self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, Error> {
        let deadline = Instant::now() + self.inner.call_timeout;
        let (reply, rx) = oneshot::channel();
        let request = make(Answer::Async(reply));
        let what = request.name();
        let seq = self.send_async(request, deadline).await?;
        match tokio::time::timeout_at(deadline.into(), rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(Error::WorkerGone),
            Err(_) => Err(self.gave_up(seq, what)),
        }
    }

    /// Queues a request once the worker has caught up (waiting until `deadline` at most);
    /// returns its sequence number.
    fn send(&self, req: Request, deadline: Instant) -> Result<u64, Error> {
        if !self.thread()?.pace.wait_caught_up(deadline) {
            return Err(self.busy());
        }
        self.enqueue(req)
    }

    /// [`Module::send`] on an async runtime: the wait for the worker to catch up is awaited.
    async fn send_async(&self, req: Request, deadline: Instant) -> Result<u64, Error> {
        if !self.thread()?.pace.caught_up_async(deadline).await {
            return Err(self.busy());
        }
        self.enqueue(req)
    }

    /// Puts a request in the worker's queue; returns its sequence number. An inline module
    /// ([`Module::load_inline`]) runs it now, on this thread.
    fn enqueue(&self, req: Request) -> Result<u64, Error> {
        let engine = self.thread()?;
        if let Some(worker) = &engine.inline {
            let mut worker = lock(worker);
            let seq = {
                let mut queue = lock(&engine.queue);
                queue.sent += 1;
                queue.sent
            };
            worker.handle(req);
            engine.pace.finished_one();
            return Ok(seq);
        }
        let mut queue = lock(&engine.queue);
        queue
            .tx
            .as_ref()
            .ok_or(Error::WorkerGone)?
            .send(req)
            .map_err(|_| Error::WorkerGone)?;
        queue.sent += 1;
        Ok(queue.sent)
    }

    /// Gives up on request `seq`: later calls wait for the worker to get past it.
    fn gave_up(&self, seq: u64, what: &'static str) -> Error {
        if let Ok(t) = self.thread() {
            t.pace.gave_up(seq);
        }
        tracing::warn!(
            path = %self.inner.path.display(),
            request = what,
            timeout_s = self.inner.call_timeout.as_secs_f64(),
            "the PKCS#11 module did not answer in time"
        );
        self.busy()
    }

    fn busy(&self) -> Error {
        Error::Busy {
            waited: self.inner.call_timeout,
        }
    }
}

impl fmt::Debug for Module {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Module")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl Drop for ThreadEngine {
    fn drop(&mut self) {
        if let Some(worker) = self.inline.take() {
            (*worker)
                .into_inner()
                .unwrap_or_else(PoisonError::into_inner)
                .finish();
            return;
        }
        // Closing the channel ends the worker's loop; it then finalises the module.
        drop(lock(&self.queue).tx.take());
        let Some(thread) = self.thread.take() else {
            return;
        };
        // Should the last clone ever be dropped on the worker itself, joining there would wait
        // for ourselves.
        if thread.thread().id() == std::thread::current().id() {
            return;
        }
        // A worker stuck in the module would never end: wait for it a bounded time only.
        match lock(&self.finished).recv_timeout(self.call_timeout) {
            Err(mpsc::RecvTimeoutError::Timeout) => {
                tracing::warn!(
                    path = %self.path.display(),
                    "the PKCS#11 worker did not finish; leaving it behind"
                );
            }
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                if thread.join().is_err() {
                    tracing::error!(path = %self.path.display(), "PKCS#11 worker panicked");
                }
            }
        }
    }
}

/// A hosted signing job's answer as [`Module::sign`] gives it. A job cancelled by its caller
/// whose host then failed (a hang stopped at the deadline) was cancelled, as the in-process
/// module answers it.
fn signed(
    reply: Result<remote::Reply, TransportError>,
    cancel: Option<&AtomicBool>,
) -> Result<Vec<Vec<u8>>, SignFailure> {
    let reply = reply.map_err(|e| {
        let cancelled = cancel.is_some_and(|c| c.load(Ordering::SeqCst));
        SignFailure::from(if cancelled {
            Error::Cancelled
        } else {
            Error::from(e)
        })
    })?;
    match reply {
        remote::Reply::Signed(r) => r.map_err(SignFailure::from),
        other => Err(remote::unexpected(&other).into()),
    }
}

/// Runs a blocking call of a hosted module off the async runtime's workers (on its blocking
/// pool; on a thread of its own outside a runtime).
async fn off_thread<T: Send + 'static>(
    call: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Error> {
    fn gone<E>(_: E) -> Error {
        Error::ModuleHost("the call to the module host was lost".to_owned())
    }
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => runtime.spawn_blocking(call).await.map_err(gone),
        Err(_) => {
            let (tx, rx) = oneshot::channel();
            std::thread::Builder::new()
                .name("pkcs11-hosted-call".into())
                .spawn(move || {
                    let _ = tx.send(call());
                })
                .map_err(|e| Error::ModuleHost(format!("no thread for the call: {e}")))?;
            rx.await.map_err(gone)
        }
    }
}

/// A lock on state that stays consistent after a panic elsewhere (each update is one step).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How far the worker is: requests finished, and the last one a caller gave up waiting for.
/// Shared by the module's handles and its worker.
#[derive(Debug, Default)]
pub(crate) struct Pace {
    counts: Mutex<Counts>,
    changed: Condvar,
    /// The same news for waiters on an async runtime.
    changed_async: Notify,
    /// Token events seen (cards in or out): a probe taken before the last one is not reused.
    token_events: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Default)]
struct Counts {
    /// Requests the worker finished (the n-th received is request n).
    done: u64,
    /// The last request a caller stopped waiting for.
    given_up: u64,
}

impl Pace {
    /// The worker finished one more request.
    pub(crate) fn finished_one(&self) {
        lock(&self.counts).done += 1;
        self.changed.notify_all();
        self.changed_async.notify_waiters();
    }

    fn token_event(&self) {
        self.token_events
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// How many token events were seen so far.
    pub(crate) fn token_events(&self) -> u64 {
        self.token_events.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn gave_up(&self, seq: u64) {
        let mut c = lock(&self.counts);
        c.given_up = c.given_up.max(seq);
    }

    fn is_behind(&self) -> bool {
        let c = lock(&self.counts);
        c.done < c.given_up
    }

    /// Waits until the worker got past every request given up on, or `deadline`; true when it did.
    fn wait_caught_up(&self, deadline: Instant) -> bool {
        let guard = lock(&self.counts);
        let left = deadline.saturating_duration_since(Instant::now());
        let (c, _) = self
            .changed
            .wait_timeout_while(guard, left, |c| c.done < c.given_up)
            .unwrap_or_else(PoisonError::into_inner);
        c.done >= c.given_up
    }

    /// [`Pace::wait_caught_up`] on an async runtime.
    async fn caught_up_async(&self, deadline: Instant) -> bool {
        loop {
            let notified = self.changed_async.notified();
            tokio::pin!(notified);
            // Registered before the check, so a notification after it is not lost.
            notified.as_mut().enable();
            if !self.is_behind() {
                return true;
            }
            if tokio::time::timeout_at(deadline.into(), notified)
                .await
                .is_err()
            {
                return !self.is_behind();
            }
        }
    }
}

/// Where the worker sends one answer.
pub(crate) type Reply<T> = Answer<Result<T, Error>>;

/// The way back for one answer: to a thread that blocks on it, or to a task that awaits it.
pub(crate) enum Answer<T> {
    Blocking(mpsc::Sender<T>),
    Async(oneshot::Sender<T>),
}

impl<T> Answer<T> {
    /// Err when the caller stopped waiting.
    pub(crate) fn send(self, value: T) -> Result<(), T> {
        match self {
            Answer::Blocking(tx) => tx.send(value).map_err(|e| e.0),
            Answer::Async(tx) => tx.send(value),
        }
    }
}

/// One request to the worker thread.
pub(crate) enum Request {
    Info(Reply<ModuleInfo>),
    Tokens(Reply<Vec<TokenInfo>>),
    Certificates {
        token: Option<TokenId>,
        reply: Reply<Vec<CertificateInfo>>,
    },
    LoginState {
        token: TokenId,
        reply: Reply<LoginState>,
    },
    Sign {
        job: SignJob,
        /// Told when the worker takes the job up; a send that fails means the caller gave up
        /// waiting, and the job is dropped unsigned.
        started: Answer<()>,
        reply: Answer<Result<Vec<Vec<u8>>, SignFailure>>,
    },
    Logout {
        token: TokenId,
        reply: Reply<()>,
    },
    Generate {
        job: EnrolJob<GenerateRequest>,
        reply: Reply<GeneratedKey>,
    },
    KeySign {
        job: EnrolJob<KeySignRequest>,
        reply: Reply<Vec<u8>>,
    },
    Import {
        job: EnrolJob<ImportRequest>,
        reply: Reply<Imported>,
    },
    DeleteKey {
        job: EnrolJob<DeleteKeyRequest>,
        reply: Reply<()>,
    },
    DeleteCertificate {
        job: EnrolJob<DeleteCertificateRequest>,
        reply: Reply<Removed>,
    },
    CheckGeneration {
        token: TokenId,
        spec: KeySpec,
        reply: Reply<()>,
    },
}

impl Request {
    /// The operation, for logs.
    fn name(&self) -> &'static str {
        match self {
            Request::Info(_) => "info",
            Request::Tokens(_) => "tokens",
            Request::Certificates { .. } => "certificates",
            Request::LoginState { .. } => "login_state",
            Request::Sign { .. } => "sign",
            Request::Logout { .. } => "logout",
            Request::Generate { .. } => "generate_key",
            Request::KeySign { .. } => "sign_with_key",
            Request::Import { .. } => "import_certificate",
            Request::DeleteKey { .. } => "delete_new_key",
            Request::DeleteCertificate { .. } => "delete_certificate",
            Request::CheckGeneration { .. } => "check_generation",
        }
    }
}

/// A signing request as the worker receives it: the request and its credential (plain data),
/// and the two channels of a running job (progress out, cancel in). No callbacks.
pub(crate) struct SignJob {
    pub(crate) req: SignRequest,
    pub(crate) credential: Credential,
    pub(crate) progress: Option<mpsc::Sender<Progress>>,
    pub(crate) cancel: Option<Arc<AtomicBool>>,
}
