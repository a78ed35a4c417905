//! SKF libraries in hosts: the host mode (`keyport host --skf PATH`, hidden) that loads one
//! library and answers [`skf_shim::remote::Job`]s, and the agent's [`Transport`] over a
//! [`Supervisor`], which makes a hosted [`Library`] with the in-process library's API. The
//! frames, the supervisor and the sandbox are those of PKCS#11 modules ([`super::pkcs11`]).
//!
//! Device events cross as [`Job::NextEvent`], a side job: the host answers it on a thread of
//! its own from its own SKF_WaitForDevEvent watch, never behind a signature.

use std::ffi::OsString;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use skf_shim::remote::{HostState, Job, Reply, Transport, TransportError};
use skf_shim::{Library, LoadOptions};

use super::serve::{
    confined_socket, serve_with_side, InterimForwarder, JobContext, SideJobs, NO_DEADLINE_IN_HOST,
};
use super::supervisor::{HostCommand, HostError, OnExit, Supervisor};

/// The supervisor of one SKF library's hosts.
pub type SkfSupervisor = Supervisor<Job, Reply>;

/// The host mode: confine the process, load the library, answer jobs until the agent goes.
/// Returns the process's exit status; the caller exits with it at once.
pub fn run_host(path: &Path) -> i32 {
    let Some(socket) = confined_socket("SKF library") else {
        return 2;
    };
    // A library that does not load is reported in every answer.
    let state = Arc::new(HostState::new(Library::load_with(
        path,
        LoadOptions {
            call_timeout: NO_DEADLINE_IN_HOST,
        },
    )));
    let side_state = Arc::clone(&state);
    let side = SideJobs {
        is_side: Job::is_side_job,
        handle: Box::new(move |job: Job, _ctx: &JobContext<Reply>| {
            side_state.run(job, None, Arc::new(AtomicBool::new(false)))
        }),
    };
    let progress = match InterimForwarder::start(Reply::Progress) {
        Ok(f) => f,
        Err(e) => {
            tracing::error!(error = %e, "the SKF library host could not start a thread");
            return 2;
        }
    };
    let served = serve_with_side(
        socket,
        move |job: Job, ctx: &JobContext<Reply>| {
            if !matches!(job, Job::Sign { .. }) {
                return state.run(job, None, ctx.cancel_flag());
            }
            // The signatures' progress goes out every 50 ms while they are made (it re-arms
            // the agent's deadline), all of it before the answer.
            let (tx, done) = progress.forward(ctx.clone());
            let reply = state.run(job, Some(tx), ctx.cancel_flag());
            done.finish();
            reply
        },
        side,
    );
    match served {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(error = %e, "the SKF library host's connection failed");
            1
        }
    }
}

/// How the agent starts a host for the library at `path`: this program, `host --skf PATH`.
pub fn host_command(path: &Path) -> std::io::Result<HostCommand> {
    Ok(HostCommand {
        program: std::env::current_exe()?,
        args: vec![
            OsString::from("host"),
            OsString::from("--skf"),
            path.as_os_str().to_owned(),
        ],
        env: Vec::new(),
    })
}

/// A supervisor for the library at `path`; `on_exit` runs each time one of its hosts ends.
pub fn supervisor(path: &Path, on_exit: Option<OnExit>) -> std::io::Result<Arc<SkfSupervisor>> {
    let mut supervisor = Supervisor::new(host_command(path)?, on_exit);
    supervisor.set_side_jobs(Job::is_side_job);
    Ok(Arc::new(supervisor))
}

/// The library at `path` in a host of `supervisor`: the in-process library's API.
pub fn hosted_library(
    path: &Path,
    options: LoadOptions,
    supervisor: Arc<SkfSupervisor>,
) -> Library {
    Library::hosted(path, options, Arc::new(SupervisedTransport(supervisor)))
}

/// [`Transport`] over a [`Supervisor`].
struct SupervisedTransport(Arc<SkfSupervisor>);

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
            .map_err(|e| {
                if what != "next_event" {
                    tracing::warn!(job = what, error = %e, "an SKF library host call failed");
                }
                match e {
                    HostError::Busy { after } => TransportError::Busy { waited: after },
                    other => TransportError::Failed(other.to_string()),
                }
            })
    }

    fn is_busy(&self) -> bool {
        self.0.is_busy()
    }

    fn is_up(&self) -> bool {
        self.0.status().pid.is_some()
    }
}
