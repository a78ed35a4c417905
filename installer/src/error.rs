//! The installer's errors.

use std::path::PathBuf;

/// Everything that can stop an install or uninstall.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No home directory could be found (no `$HOME`, no passwd entry).
    #[error("no home directory: set HOME")]
    NoHome,
    /// The `keyport` binary was not found.
    #[error(
        "the keyport binary was not found beside keyport-install or on PATH: pass --binary PATH"
    )]
    BinaryNotFound,
    /// `--binary` names something that is not a file.
    #[error("{0} is not a file: pass the path of the keyport binary")]
    NotAFile(PathBuf),
    /// The target OS is not the one running, and `--dry-run` was not given.
    #[error("installing for {target} is not supported on {host}; use --dry-run to see what would be done")]
    NotSupportedHere {
        /// The OS asked for.
        target: &'static str,
        /// The OS running.
        host: &'static str,
    },
    /// The OS matches, but only a dry run is implemented for it.
    #[error("installing on {0} is not implemented yet; --dry-run prints the file and the commands to run by hand")]
    NotImplemented(&'static str),
    /// `--system` asked on macOS or Windows.
    #[error("--system is for Linux (a unit in /etc/systemd/user for every user)")]
    SystemOnlyLinux,
    /// `--system` without root.
    #[error("--system changes /etc/systemd/user: run it as root (sudo), or add --dry-run to see what it would do")]
    NeedsRoot,
    /// A file-system step failed.
    #[error("{action} {}", path.display())]
    Io {
        /// What was being done ("write", "remove", "create directory").
        action: &'static str,
        /// On which path.
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A command could not be started.
    #[error("cannot run {program}")]
    Spawn {
        /// The program.
        program: String,
        #[source]
        source: std::io::Error,
    },
    /// A command ran and failed.
    #[error("`{command}` failed ({status})")]
    CommandFailed {
        /// The command line, for the user to re-run.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
    },
}
