//! `keyport-install`: registers the KeyPort agent to start with the user's session.
//!
//! ```text
//! keyport-install [--dry-run] [--uninstall] [--binary PATH] [--target linux|macos|windows]
//! keyport-install --deb-metadata
//! ```
//! Linux is implemented for real (a hardened systemd user unit). For macOS (launchd agent)
//! and Windows (logon scheduled task) the file and the commands are generated and printed
//! with `--dry-run`; carrying them out is not implemented yet. `--target` shows another OS's
//! plan (dry run only).
#![forbid(unsafe_code)]

mod deb;
mod error;
mod launchd;
mod paths;
mod plan;
mod schtasks;
mod systemd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};

use crate::error::Error;
use crate::paths::{Dirs, Os};
use crate::plan::Plan;

#[derive(Debug, Parser)]
#[command(
    name = "keyport-install",
    version,
    about = "Start the KeyPort agent with your session (systemd user unit, launchd agent, logon task)"
)]
struct Cli {
    /// Print the files and commands; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Stop and remove the service (KeyPort's config and audit log stay).
    #[arg(long)]
    uninstall: bool,
    /// The keyport binary (default: beside keyport-install, else on PATH).
    #[arg(long, value_name = "PATH")]
    binary: Option<PathBuf>,
    /// The OS to install for (default: this one); another OS needs --dry-run.
    #[arg(long, value_enum)]
    target: Option<Target>,
    /// Print the Debian package's control stanza and exit.
    #[arg(long, conflicts_with_all = ["dry_run", "uninstall", "binary", "target"])]
    deb_metadata: bool,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.deb_metadata {
        print!(
            "{}",
            deb::control(env!("CARGO_PKG_VERSION"), deb::host_arch())
        );
        return ExitCode::SUCCESS;
    }
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keyport-install: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> Result<(), Error> {
    let host = Os::host();
    let target = match (cli.target, host) {
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
    if !on_host && !cli.dry_run {
        return Err(Error::NotSupportedHere {
            target: target.name(),
            host: host.map_or(std::env::consts::OS, Os::name),
        });
    }
    let user = user_name();
    let dirs = if on_host {
        Dirs::discover()?
    } else {
        Dirs::example(target, &user)
    };
    let plan = if cli.uninstall {
        uninstall_plan(target, &dirs)
    } else {
        let binary = if on_host {
            paths::keyport_binary(cli.binary.as_deref(), cli.dry_run)?
        } else {
            cli.binary.clone().unwrap_or_else(|| example_binary(target))
        };
        install_plan(target, &binary, &dirs, &user)
    };

    if cli.dry_run {
        let what = if cli.uninstall {
            "uninstall"
        } else {
            "install"
        };
        println!("# keyport-install --dry-run: {what} for {}", target.name());
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

fn uninstall_plan(target: Os, dirs: &Dirs) -> Plan {
    match target {
        Os::Linux => systemd::uninstall(dirs),
        Os::Mac => launchd::uninstall(dirs, &uid()),
        Os::Windows => schtasks::uninstall(dirs),
    }
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
