//! `keyport-install`: registers the KeyPort agent to start with the user's session.
//!
//! ```text
//! keyport-install install   [--dry-run] [--system] [--binary PATH] [--target linux|macos|windows]
//! keyport-install uninstall [--dry-run] [--system] [--purge]       [--target …]
//! keyport-install status    [--dry-run] [--system]
//! keyport-install build-deb --keyport PATH --out DIR      (hidden: scripts/build-deb.sh)
//! ```
//! Linux is implemented for real (a hardened systemd user unit; `--system` for every user of
//! the machine). For macOS (launchd agent) and Windows (logon scheduled task) the file and the
//! commands are generated and printed with `--dry-run`; carrying them out is not implemented
//! and untested here. `--target` shows another OS's plan (dry run only).
#![forbid(unsafe_code)]

mod deb;
mod error;
mod launchd;
mod paths;
mod plan;
mod schtasks;
mod status;
mod systemd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::error::Error;
use crate::paths::{Dirs, Os};
use crate::plan::Plan;

#[derive(Debug, Parser)]
#[command(
    name = "keyport-install",
    version,
    about = "Start the KeyPort agent with your session (systemd user unit, launchd agent, logon task)",
    long_about = "Start the KeyPort agent with your session (systemd user unit, launchd agent, \
                  logon task).\n\nThe keyport .deb needs none of this: its preset starts the \
                  agent for every user. keyport-install is for a binary installed by hand, for \
                  one user or (--system) for all."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Registers the agent and starts it now (--system: for every user, at their next login).
    Install {
        #[command(flatten)]
        common: Common,
        /// The keyport binary (default: beside keyport-install, else on PATH).
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
    },
    /// Stops the agent and removes its registration; config, origins and audit log stay.
    Uninstall {
        #[command(flatten)]
        common: Common,
        /// Also delete your KeyPort config, origin decisions, audit log and demo token.
        #[arg(long)]
        purge: bool,
    },
    /// Shows where the agent is registered, whether it is enabled and running.
    Status {
        #[command(flatten)]
        common: Common,
    },
    /// Builds the Debian package (used by scripts/build-deb.sh).
    #[command(hide = true)]
    BuildDeb {
        /// The release keyport binary.
        #[arg(long, value_name = "PATH")]
        keyport: PathBuf,
        /// The folder for the .deb.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

#[derive(Debug, Args)]
struct Common {
    /// Print the files and commands; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Machine-wide (Linux, as root): the unit in /etc/systemd/user, for every user.
    #[arg(long)]
    system: bool,
    /// The OS to act for (default: this one); another OS needs --dry-run.
    #[arg(long, value_enum)]
    target: Option<Target>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Target {
    Linux,
    Macos,
    Windows,
}

impl From<Target> for Os {
    fn from(t: Target) -> Os {
        match t {
            Target::Linux => Os::Linux,
            Target::Macos => Os::Mac,
            Target::Windows => Os::Windows,
        }
    }
}

/// What an install or uninstall is asked.
#[derive(Debug)]
enum Action {
    Install(Option<PathBuf>),
    Uninstall { purge: bool },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Install { common, binary } => change(&common, Action::Install(binary)),
        Cmd::Uninstall { common, purge } => change(&common, Action::Uninstall { purge }),
        Cmd::Status { common } => status::run(common.system, common.dry_run),
        Cmd::BuildDeb { keyport, out } => build_deb(keyport, out),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keyport-install: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn build_deb(keyport: PathBuf, out: PathBuf) -> Result<(), Error> {
    let installer = std::env::current_exe().map_err(|source| Error::Io {
        action: "find",
        path: PathBuf::from("keyport-install"),
        source,
    })?;
    let mut installer_man = Vec::new();
    clap_mangen::Man::new(<Cli as clap::CommandFactory>::command())
        .render(&mut installer_man)
        .map_err(|source| Error::Io {
            action: "render the man page of",
            path: PathBuf::from("keyport-install"),
            source,
        })?;
    let deb = deb::build(&deb::DebInputs {
        keyport,
        installer,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        arch: deb::host_arch().to_owned(),
        out_dir: out,
        installer_man,
    })?;
    println!("{}", deb.display());
    Ok(())
}

fn change(common: &Common, action: Action) -> Result<(), Error> {
    let host = Os::host();
    let target = match (common.target, host) {
        (Some(t), _) => Os::from(t),
        (None, Some(h)) => h,
        (None, None) => {
            return Err(Error::NotSupportedHere {
                target: "this OS",
                host: std::env::consts::OS,
            })
        }
    };
    let on_host = host == Some(target);
    if !on_host && !common.dry_run {
        return Err(Error::NotSupportedHere {
            target: target.name(),
            host: host.map_or(std::env::consts::OS, Os::name),
        });
    }
    if common.system && target != Os::Linux {
        return Err(Error::SystemOnlyLinux);
    }
    if common.system && !common.dry_run && !status::is_root() {
        return Err(Error::NeedsRoot);
    }
    let user = user_name();
    let dirs = if on_host {
        Dirs::discover()?
    } else {
        Dirs::example(target, &user)
    };
    let plan = match &action {
        Action::Uninstall { purge } if common.system => {
            if *purge {
                eprintln!(
                    "keyport-install: --purge with --system removes no user's files: each user \
                     runs `keyport-install uninstall --purge` for their own"
                );
            }
            systemd::uninstall_system()
        }
        Action::Uninstall { purge } => uninstall_plan(target, &dirs, *purge),
        Action::Install(explicit) => {
            let binary = if on_host {
                paths::keyport_binary(explicit.as_deref(), common.dry_run)?
            } else {
                explicit.clone().unwrap_or_else(|| example_binary(target))
            };
            if common.system {
                systemd::install_system(&binary)
            } else {
                install_plan(target, &binary, &dirs, &user)
            }
        }
    };

    if common.dry_run {
        let what = match action {
            Action::Install(_) => "install",
            Action::Uninstall { purge: true } => "uninstall --purge",
            Action::Uninstall { purge: false } => "uninstall",
        };
        let scope = if common.system { " --system" } else { "" };
        println!(
            "# keyport-install {what}{scope} --dry-run: for {}",
            target.name()
        );
        if !on_host {
            println!(
                "# (example paths: this is not {}; run it there for the real ones)",
                target.name()
            );
        }
        print!("{plan}");
        return Ok(());
    }
    match target {
        Os::Linux => plan.execute(&mut std::io::stdout()),
        other => Err(Error::NotImplemented(other.name())),
    }
}

fn install_plan(target: Os, binary: &std::path::Path, dirs: &Dirs, user: &str) -> Plan {
    match target {
        Os::Linux => systemd::install(binary, dirs),
        Os::Mac => launchd::install(binary, dirs, &uid()),
        Os::Windows => schtasks::install(binary, dirs, user),
    }
}

fn uninstall_plan(target: Os, dirs: &Dirs, purge: bool) -> Plan {
    match target {
        Os::Linux => systemd::uninstall(dirs, purge),
        Os::Mac => with_purge(launchd::uninstall(dirs, &uid()), dirs, purge),
        Os::Windows => with_purge(schtasks::uninstall(dirs), dirs, purge),
    }
}

/// `--purge`: KeyPort's config and data folders go too.
fn with_purge(mut plan: Plan, dirs: &Dirs, purge: bool) -> Plan {
    if purge {
        plan.steps
            .push(plan::Step::RemoveDirAll(dirs.keyport_config.clone()));
        if dirs.keyport_data != dirs.keyport_config {
            plan.steps
                .push(plan::Step::RemoveDirAll(dirs.keyport_data.clone()));
        }
    }
    plan
}

/// Where the binary usually lives on another OS, for a dry run.
fn example_binary(target: Os) -> PathBuf {
    match target {
        Os::Linux => PathBuf::from("/usr/bin/keyport"),
        Os::Mac => PathBuf::from("/usr/local/bin/keyport"),
        Os::Windows => PathBuf::from(r"C:\Program Files\KeyPort\keyport.exe"),
    }
}

/// The login name (`DOMAIN\user` on Windows) for the logon task and example paths.
fn user_name() -> String {
    let name = std::env::var("USERNAME")
        .or_else(|_| std::env::var("USER"))
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "user".to_owned());
    match std::env::var("USERDOMAIN") {
        Ok(domain) if cfg!(windows) => format!(r"{domain}\{name}"),
        _ => name,
    }
}

/// The numeric user id for launchd's `gui/UID` domain; the word `UID` when it cannot be known
/// (a dry run on another OS: `id -u` there gives it).
fn uid() -> String {
    if cfg!(target_os = "macos") {
        if let Ok(out) = std::process::Command::new("id").arg("-u").output() {
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).trim().to_owned();
            }
        }
    }
    "UID".to_owned()
}

/// The error and its sources, "a: b: c".
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
