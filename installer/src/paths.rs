//! Where things go, per OS, from the `directories` crate.

use std::path::{Path, PathBuf};

use crate::error::Error;

/// The operating systems the installer knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Os {
    Linux,
    Mac,
    Windows,
}

impl Os {
    /// The OS this program runs on, if it is one of the three.
    pub fn host() -> Option<Os> {
        match std::env::consts::OS {
            "linux" => Some(Os::Linux),
            "macos" => Some(Os::Mac),
            "windows" => Some(Os::Windows),
            _ => None,
        }
    }

    /// "Linux", "macOS", "Windows".
    pub fn name(self) -> &'static str {
        match self {
            Os::Linux => "Linux",
            Os::Mac => "macOS",
            Os::Windows => "Windows",
        }
    }
}

/// The directories an install touches. Built from the running user's environment by
/// [`Dirs::discover`], or spelled out (tests, and dry runs for another OS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dirs {
    /// The user's home.
    pub home: PathBuf,
    /// The OS config dir (`~/.config` on Linux): systemd user units live below it.
    pub config_home: PathBuf,
    /// KeyPort's config dir (config.toml, origins.toml), as the agent computes it.
    pub keyport_config: PathBuf,
    /// KeyPort's data dir (audit log), as the agent computes it.
    pub keyport_data: PathBuf,
}

/// The agent's `directories::ProjectDirs` triple; it must stay equal to the agent's.
const QUALIFIER: &str = "org";
const ORGANIZATION: &str = "KeyPort";
const APPLICATION: &str = "keyport";

impl Dirs {
    /// The running user's directories on this OS.
    pub fn discover() -> Result<Dirs, Error> {
        let base = directories::BaseDirs::new().ok_or(Error::NoHome)?;
        let project = directories::ProjectDirs::from(QUALIFIER, ORGANIZATION, APPLICATION)
            .ok_or(Error::NoHome)?;
        Ok(Dirs {
            home: base.home_dir().to_path_buf(),
            config_home: base.config_dir().to_path_buf(),
            keyport_config: project.config_dir().to_path_buf(),
            keyport_data: project.data_dir().to_path_buf(),
        })
    }

    /// `~/.config/systemd/user/keyport.service`.
    pub fn systemd_unit(&self) -> PathBuf {
        self.config_home.join("systemd/user/keyport.service")
    }

    /// `~/Library/LaunchAgents/org.keyport.agent.plist`.
    pub fn launchd_plist(&self) -> PathBuf {
        self.home
            .join("Library/LaunchAgents")
            .join(format!("{}.plist", crate::launchd::LABEL))
    }

    /// `~/Library/Logs/KeyPort`: where launchd sends the agent's output.
    pub fn launchd_logs(&self) -> PathBuf {
        self.home.join("Library/Logs/KeyPort")
    }

    /// The task XML kept beside KeyPort's data (schtasks reads it from a file).
    pub fn windows_task_xml(&self) -> PathBuf {
        // Joined by hand so that a dry run for Windows on another OS shows a Windows path.
        let data = self.keyport_data.display().to_string();
        let sep = if data.contains('\\') {
            '\\'
        } else {
            std::path::MAIN_SEPARATOR
        };
        PathBuf::from(format!("{data}{sep}keyport-task.xml"))
    }

    /// Example directories of a user `user` on `os`, for a dry run on another OS (where the
    /// real ones cannot be computed).
    pub fn example(os: Os, user: &str) -> Dirs {
        match os {
            Os::Linux => Dirs {
                home: format!("/home/{user}").into(),
                config_home: format!("/home/{user}/.config").into(),
                keyport_config: format!("/home/{user}/.config/keyport").into(),
                keyport_data: format!("/home/{user}/.local/share/keyport").into(),
            },
            Os::Mac => {
                let support = format!("/Users/{user}/Library/Application Support");
                Dirs {
                    home: format!("/Users/{user}").into(),
                    config_home: support.clone().into(),
                    keyport_config: format!("{support}/org.KeyPort.keyport").into(),
                    keyport_data: format!("{support}/org.KeyPort.keyport").into(),
                }
            }
            Os::Windows => {
                let roaming = format!(r"C:\Users\{user}\AppData\Roaming");
                Dirs {
                    home: format!(r"C:\Users\{user}").into(),
                    config_home: roaming.clone().into(),
                    keyport_config: format!(r"{roaming}\KeyPort\keyport\config").into(),
                    keyport_data: format!(r"{roaming}\KeyPort\keyport\data").into(),
                }
            }
        }
    }
}

/// The `keyport` binary: `--binary`, else the one beside this program, else the first on PATH.
/// The result is absolute; it must exist unless `dry_run`.
pub fn keyport_binary(explicit: Option<&Path>, dry_run: bool) -> Result<PathBuf, Error> {
    let name = format!("keyport{}", std::env::consts::EXE_SUFFIX);
    let path = match explicit {
        Some(p) => absolute(p),
        None => {
            let beside = std::env::current_exe()
                .ok()
                .and_then(|exe| exe.parent().map(|d| d.join(&name)));
            let on_path = || {
                std::env::var_os("PATH").and_then(|paths| {
                    std::env::split_paths(&paths)
                        .map(|d| d.join(&name))
                        .find(|p| p.is_file())
                })
            };
            beside
                .filter(|p| p.is_file())
                .or_else(on_path)
                .ok_or(Error::BinaryNotFound)?
        }
    };
    if path.is_file() {
        // Resolve symlinks so that the service keeps working if a link is moved.
        Ok(std::fs::canonicalize(&path).unwrap_or(path))
    } else if dry_run {
        Ok(path)
    } else {
        Err(Error::NotAFile(path))
    }
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}
