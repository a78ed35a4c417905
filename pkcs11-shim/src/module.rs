//! The public handle to one loaded PKCS#11 module, and the messages it sends to the module's
//! worker thread. Every public method is a blocking request/reply over a channel, so the worker
//! could later live in a child process without changing this API.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use crate::algorithm::SignRequest;
use crate::certificate::CertificateInfo;
use crate::error::{Error, SignFailure};
use crate::pin::PinProvider;
use crate::token::{LoginState, ModuleInfo, TokenId, TokenInfo};
use crate::worker;

/// A progress callback: `(done, total)` after each signature.
pub type Progress = Box<dyn FnMut(usize, usize) + Send>;

/// A loaded PKCS#11 module. Cheap to clone; all clones talk to the same worker thread, which
/// owns the module's context. The worker finalises the module (C_Finalize) and exits when the
/// last clone is dropped.
#[derive(Clone)]
pub struct Module {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    tx: Option<mpsc::Sender<Request>>,
    thread: Option<JoinHandle<()>>,
}

impl Module {
    /// Loads the module at `path` (dlopen) and initialises it (C_Initialize with
    /// CKF_OS_LOCKING_OK), both on the new worker thread.
    pub fn load(path: &Path) -> Result<Module, Error> {
        let (tx, thread) = worker::spawn(path.to_path_buf())?;
        Ok(Module {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                tx: Some(tx),
                thread: Some(thread),
            }),
        })
    }

    /// The path the module was loaded from.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// C_GetInfo: the library's description, manufacturer and versions.
    pub fn info(&self) -> Result<ModuleInfo, Error> {
        self.call(Request::Info)
    }

    /// The tokens present now.
    pub fn tokens(&self) -> Result<Vec<TokenInfo>, Error> {
        self.call(Request::Tokens)
    }

    /// Certificates whose private key is on a token (all tokens, or one).
    pub fn certificates(&self, token: Option<&TokenId>) -> Result<Vec<CertificateInfo>, Error> {
        let token = token.cloned();
        self.call(|reply| Request::Certificates { token, reply })
    }

    /// Whether signing with this token needs a PIN now.
    pub fn login_state(&self, token: &TokenId) -> Result<LoginState, Error> {
        let token = token.clone();
        self.call(|reply| Request::LoginState { token, reply })
    }

    /// Signs every input with the certificate's key: at most one user login (through `pin`),
    /// then one signature per input, in order. `progress(done, total)` runs after each
    /// signature; `cancel` is checked before each one. On failure, the signatures completed
    /// before it are in [`SignFailure::completed`].
    pub fn sign(
        &self,
        req: SignRequest,
        pin: Box<dyn PinProvider>,
        progress: Option<Progress>,
        cancel: Option<Arc<AtomicBool>>,
    ) -> Result<Vec<Vec<u8>>, SignFailure> {
        let (reply, rx) = mpsc::channel();
        let job = SignJob {
            req,
            pin,
            progress,
            cancel,
        };
        self.send(Request::Sign { job, reply })?;
        rx.recv()
            .map_err(|_| SignFailure::from(Error::WorkerGone))?
    }

    /// C_Logout on the token (a no-op when not logged in); drops the cached PIN login.
    pub fn logout(&self, token: &TokenId) -> Result<(), Error> {
        let token = token.clone();
        self.call(|reply| Request::Logout { token, reply })
    }

    fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, Error> {
        let (reply, rx) = mpsc::channel();
        self.send(make(reply))?;
        rx.recv().map_err(|_| Error::WorkerGone)?
    }

    fn send(&self, req: Request) -> Result<(), Error> {
        self.inner
            .tx
            .as_ref()
            .ok_or(Error::WorkerGone)?
            .send(req)
            .map_err(|_| Error::WorkerGone)
    }
}

impl fmt::Debug for Module {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Module")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel ends the worker's loop; it then finalises the module.
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            // A PinProvider or progress callback could hold the last clone and drop it on the
            // worker itself: joining there would wait for ourselves.
            if thread.thread().id() != std::thread::current().id() && thread.join().is_err() {
                tracing::error!(path = %self.path.display(), "PKCS#11 worker panicked");
            }
        }
    }
}

/// Where the worker sends one answer.
pub(crate) type Reply<T> = mpsc::Sender<Result<T, Error>>;

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
        reply: mpsc::Sender<Result<Vec<Vec<u8>>, SignFailure>>,
    },
    Logout {
        token: TokenId,
        reply: Reply<()>,
    },
}

/// A signing request with its callbacks, as the worker receives it.
pub(crate) struct SignJob {
    pub(crate) req: SignRequest,
    pub(crate) pin: Box<dyn PinProvider>,
    pub(crate) progress: Option<Progress>,
    pub(crate) cancel: Option<Arc<AtomicBool>>,
}
