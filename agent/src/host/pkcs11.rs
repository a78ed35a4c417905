//! PKCS#11 modules in hosts: the host mode (`keyport host --pkcs11 PATH`, hidden) that loads
//! one module and answers [`pkcs11_shim::remote::Job`]s, and the agent's [`Transport`] over a
//! [`Supervisor`], which makes a hosted [`Module`] with the in-process module's API.
//!
//! SKF libraries have their own job set beside this one ([`super::skf`], `--skf PATH`); the
//! frames, the supervisor and the sandbox are shared.

use std::ffi::OsString;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use pkcs11_shim::remote::{self, Job, Reply, ReplyFuture, Transport, TransportError, WireError};
use pkcs11_shim::{Credential, Error, LoadOptions, Module};

use super::serve::{confined_socket, serve_with_quick, InterimForwarder, JobContext};
use super::supervisor::{HostCommand, HostError, OnExit, Supervisor};

/// The supervisor of one PKCS#11 module's hosts.
pub type Pkcs11Supervisor = Supervisor<Job, Reply>;

/// The host mode: confine the process, load the module, answer jobs until the agent goes.
/// Returns the process's exit status; the caller exits with it at once (a module thread may
/// still hang in the library, and C_Finalize is not waited for).
pub fn run_host(path: &Path) -> i32 {
    let Some(socket) = confined_socket("module") else {
        return 2;
    };
    // A module that does not load is reported in every answer, so that the agent can tell
    // the user why (as it would for a module loaded in its own process).
    // Inline: the job thread calls the module itself (no worker thread to hand each job to);
    // a hang holds that thread, and the agent's deadline stops the whole host.
    let module = Module::load_inline(path).map_err(|e| WireError::from(&e));
    let progress = match InterimForwarder::start(Reply::Progress) {
        Ok(f) => f,
        Err(e) => {
            tracing::error!(error = %e, "the module host could not start a thread");
            return 2;
        }
    };
    let answer = move |job: Job, ctx: &JobContext<Reply>| {
        let module = match &module {
            Ok(m) => m,
            Err(e) => return failed(&job, e.clone()),
        };
        // Progress only for a caller that asked for it (a `sign.batch` showing
        // `sign.progress`): a forwarded message costs a wake-up on both sides.
        if !matches!(job, Job::Sign { progress: true, .. }) {
            return remote::run(module, job, None, ctx.cancel_flag());
        }
        let (tx, done) = progress.forward(ctx.clone());
        let reply = remote::run(module, job, Some(tx), ctx.cancel_flag());
        // Every progress message goes out before the answer.
        done.finish();
        reply
    };
    let served = serve_with_quick(socket, answer, is_quick);
    match served {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(error = %e, "the module host's connection failed");
            1
        }
    }
}

/// Jobs the host's reader answers itself when nothing else is queued (see
/// [`serve_with_quick`]): the ones a cancel cannot stop midway — a signature of one input
/// (no PIN pad, no progress), and the calls that list or look.
fn is_quick(job: &Job) -> bool {
    match job {
        Job::Sign {
            req,
            credential,
            progress,
        } => !progress && req.inputs.len() == 1 && !matches!(credential, Credential::PinPad),
        Job::Info
        | Job::Tokens
        | Job::Certificates { .. }
        | Job::LoginState { .. }
        | Job::TokenEvent
        | Job::Logout { .. } => true,
        _ => false,
    }
}

/// The answer to `job` when the module did not load.
fn failed(job: &Job, e: WireError) -> Reply {
    match job {
        Job::Info => Reply::Info(Err(e)),
        Job::Tokens => Reply::Tokens(Err(e)),
        Job::Certificates { .. } => Reply::Certificates(Err(e)),
        Job::LoginState { .. } => Reply::LoginState(Err(e)),
        Job::Logout { .. } => Reply::LoggedOut(Err(e)),
        // No module, no probes to forget.
        Job::TokenEvent => Reply::TokenEventSeen,
        Job::Generate { .. } => Reply::Generated(Err(e)),
        Job::KeySign { .. } => Reply::KeySigned(Err(e)),
        Job::Import { .. } => Reply::Imported(Err(e)),
        Job::CheckGeneration { .. } => Reply::GenerationChecked(Err(e)),
        Job::DeleteKey { .. } => Reply::KeyDeleted(Err(e)),
        Job::DeleteCertificate { .. } => Reply::CertificateDeleted(Err(e)),
        Job::Sign { .. } => Reply::Signed(Err(remote::WireFailure {
            error: e,
            completed: Vec::new(),
        })),
    }
}

/// How the agent starts a host for the module at `path`: this same program, `host --pkcs11
/// PATH`, with the agent's environment (SOFTHSM2_CONF, OPENSC_CONF… reach the module).
pub fn host_command(path: &Path) -> std::io::Result<HostCommand> {
    Ok(host_command_with(std::env::current_exe()?, path))
}

/// [`host_command`] with another `keyport` program (a benchmark or test that is not one).
pub fn host_command_with(program: std::path::PathBuf, path: &Path) -> HostCommand {
    HostCommand {
        program,
        args: vec![
            OsString::from("host"),
            OsString::from("--pkcs11"),
            path.as_os_str().to_owned(),
        ],
        env: Vec::new(),
    }
}

/// A supervisor for the module at `path`; `on_exit` runs each time one of its hosts ends.
pub fn supervisor(path: &Path, on_exit: Option<OnExit>) -> std::io::Result<Arc<Pkcs11Supervisor>> {
    Ok(Arc::new(Supervisor::new(host_command(path)?, on_exit)))
}

/// The module at `path` in a host of `supervisor`: the in-process module's API.
pub fn hosted_module(
    path: &Path,
    options: LoadOptions,
    pin_pad_wait: Duration,
    supervisor: Arc<Pkcs11Supervisor>,
) -> Result<Module, Error> {
    Module::hosted(
        path,
        options,
        pin_pad_wait,
        Box::new(SupervisedTransport(supervisor)),
    )
}

/// [`Transport`] over a [`Supervisor`].
struct SupervisedTransport(Arc<Pkcs11Supervisor>);

impl Transport for SupervisedTransport {
    fn run(
        &self,
        job: Job,
        deadline: Duration,
        cancel: Option<&AtomicBool>,
        interim: &mut dyn FnMut(Reply),
    ) -> Result<Reply, TransportError> {
        let what = job.name();
        self.0
            .call_with(job, deadline, cancel, interim)
            .map_err(|e| transport_error(what, e))
    }

    fn run_async(
        &self,
        job: Job,
        deadline: Duration,
        cancel: Option<Arc<AtomicBool>>,
        interim: Box<dyn FnMut(Reply) + Send>,
    ) -> ReplyFuture {
        let what = job.name();
        let call = Arc::clone(&self.0).call_async(job, deadline, cancel, interim);
        Box::pin(async move { call.await.map_err(|e| transport_error(what, e)) })
    }

    fn is_async(&self) -> bool {
        true
    }

    fn is_busy(&self) -> bool {
        self.0.is_busy()
    }
}

fn transport_error(job: &str, e: HostError) -> TransportError {
    tracing::warn!(job, error = %e, "a module host call failed");
    match e {
        HostError::Busy { after } => TransportError::Busy { waited: after },
        other => TransportError::Failed(other.to_string()),
    }
}
