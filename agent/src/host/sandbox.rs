//! What a host gives up before it loads a vendor library, where that costs little.
//!
//! On Linux:
//! - `PR_SET_NO_NEW_PRIVS`: nothing the library executes can gain privileges (set-uid
//!   programs, file capabilities);
//! - a seccomp filter on every thread: `socket()` for any family but `AF_UNIX` fails with
//!   `EACCES`, so the library cannot open network sockets (PC/SC and p11-kit talk over Unix
//!   sockets, which stay allowed);
//! - the host is the leader of its own process group (the supervisor starts it so), and the
//!   supervisor kills the whole group.
//!
//! Descriptors: the agent opens everything close-on-exec (Rust's standard library does), and
//! just before it starts a host it marks every other descriptor above 2 close-on-exec too
//! (what it inherited without the flag from whatever started it, such as a jobserver pipe under
//! cargo or a session manager's leak, and what a library opened without it). So a host starts
//! with its standard streams and its socket only; the tests read the host's `/proc/PID/fd` to
//! check it.
//!
//! Elsewhere the host runs unconfined; the threat model says so.

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SandboxError {
    #[error("PR_SET_NO_NEW_PRIVS failed")]
    NoNewPrivs(#[source] std::io::Error),
    #[error("the seccomp filter could not be built")]
    Filter(String),
    #[error("the seccomp filter could not be applied")]
    Apply(String),
}

/// Confines the calling process; call before loading the library.
#[cfg(target_os = "linux")]
pub fn confine() -> Result<(), SandboxError> {
    use std::collections::BTreeMap;

    use seccompiler::{
        BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
        SeccompRule, TargetArch,
    };

    rustix::thread::set_no_new_privs(true)
        .map_err(|e| SandboxError::NoNewPrivs(std::io::Error::from(e)))?;

    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| SandboxError::Filter(e.to_string()))?;
    let not_unix = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Ne,
        libc::AF_UNIX as u64,
    )
    .map_err(|e| SandboxError::Filter(e.to_string()))?;
    let rule = SeccompRule::new(vec![not_unix]).map_err(|e| SandboxError::Filter(e.to_string()))?;
    let mut rules = BTreeMap::new();
    rules.insert(libc::SYS_socket, vec![rule]);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
        arch,
    )
    .map_err(|e| SandboxError::Filter(e.to_string()))?;
    let program: BpfProgram = filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| SandboxError::Filter(e.to_string()))?;
    seccompiler::apply_filter_all_threads(&program).map_err(|e| SandboxError::Apply(e.to_string()))
}

#[cfg(not(target_os = "linux"))]
pub fn confine() -> Result<(), SandboxError> {
    Ok(())
}
