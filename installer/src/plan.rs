//! An install or uninstall as a list of steps, so that `--dry-run` prints exactly what a real
//! run would do, and a real run does nothing the dry run did not show.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::Error;

/// One step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Create a directory (and its parents) readable by the user only.
    CreateDir(PathBuf),
    /// Write a file (replacing it), readable by the user only.
    WriteFile {
        /// Where.
        path: PathBuf,
        /// What (the text shown by a dry run).
        text: String,
        /// The bytes written, when they differ from `text` (Windows wants UTF-16).
        bytes: Option<Vec<u8>>,
    },
    /// Write a file (replacing it) that every user may read, mode 0644: a machine-wide unit.
    WriteShared {
        /// Where.
        path: PathBuf,
        /// What.
        text: String,
    },
    /// Remove a file if it exists.
    RemoveFile(PathBuf),
    /// Remove a directory and everything in it, if it exists (`uninstall --purge`).
    RemoveDirAll(PathBuf),
    /// Run a command; with `may_fail` its failure is reported and the plan goes on.
    Run {
        /// Program and arguments.
        argv: Vec<String>,
        /// True for steps like "stop the service" during an uninstall, which fail when it
        /// was never started.
        may_fail: bool,
    },
}

impl Step {
    /// A command that must succeed.
    pub fn run(argv: &[&str]) -> Step {
        Step::Run {
            argv: argv.iter().map(|s| (*s).to_owned()).collect(),
            may_fail: false,
        }
    }

    /// A command whose failure does not stop the plan.
    pub fn run_may_fail(argv: &[&str]) -> Step {
        Step::Run {
            argv: argv.iter().map(|s| (*s).to_owned()).collect(),
            may_fail: true,
        }
    }

    /// A text file.
    pub fn write(path: PathBuf, text: String) -> Step {
        Step::WriteFile {
            path,
            text,
            bytes: None,
        }
    }
}

/// The steps of one install or uninstall, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub steps: Vec<Step>,
}

impl fmt::Display for Plan {
    /// The dry-run listing: shell-like lines, and the content of every file written.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for step in &self.steps {
            match step {
                Step::CreateDir(path) => writeln!(f, "mkdir -p -m 0700 {}", quote(path))?,
                Step::WriteFile { path, text, bytes } => {
                    let note = if bytes.is_some() { " (UTF-16LE)" } else { "" };
                    writeln!(f, "write {}{note}, mode 0600:", quote(path))?;
                    for line in text.lines() {
                        writeln!(f, "    {line}")?;
                    }
                }
                Step::WriteShared { path, text } => {
                    writeln!(f, "write {}, mode 0644:", quote(path))?;
                    for line in text.lines() {
                        writeln!(f, "    {line}")?;
                    }
                }
                Step::RemoveFile(path) => writeln!(f, "rm -f {}", quote(path))?,
                Step::RemoveDirAll(path) => writeln!(f, "rm -rf {}", quote(path))?,
                Step::Run { argv, may_fail } => {
                    let line: Vec<String> = argv.iter().map(|a| quote(Path::new(a))).collect();
                    let tail = if *may_fail { "   # may fail" } else { "" };
                    writeln!(f, "{}{tail}", line.join(" "))?;
                }
            }
        }
        Ok(())
    }
}

impl Plan {
    /// Carries the plan out, reporting each command on `log`.
    pub fn execute(&self, log: &mut dyn Write) -> Result<(), Error> {
        for step in &self.steps {
            match step {
                Step::CreateDir(path) => create_private_dir(path)?,
                Step::WriteFile { path, text, bytes } => {
                    write_private_file(path, bytes.as_deref().unwrap_or(text.as_bytes()))?;
                    let _ = writeln!(log, "wrote {}", path.display());
                }
                Step::WriteShared { path, text } => {
                    write_file(path, text.as_bytes(), 0o644)?;
                    let _ = writeln!(log, "wrote {}", path.display());
                }
                Step::RemoveDirAll(path) => match std::fs::remove_dir_all(path) {
                    Ok(()) => {
                        let _ = writeln!(log, "removed {}", path.display());
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => {
                        return Err(Error::Io {
                            action: "remove",
                            path: path.clone(),
                            source,
                        })
                    }
                },
                Step::RemoveFile(path) => match std::fs::remove_file(path) {
                    Ok(()) => {
                        let _ = writeln!(log, "removed {}", path.display());
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => {
                        return Err(Error::Io {
                            action: "remove",
                            path: path.clone(),
                            source,
                        })
                    }
                },
                Step::Run { argv, may_fail } => {
                    let command = argv.join(" ");
                    let _ = writeln!(log, "$ {command}");
                    let (program, args) = argv.split_first().ok_or_else(|| Error::Spawn {
                        program: String::new(),
                        source: std::io::Error::other("empty command"),
                    })?;
                    let status = Command::new(program).args(args).status();
                    match status {
                        Ok(s) if s.success() => {}
                        Ok(status) if !may_fail => {
                            return Err(Error::CommandFailed { command, status })
                        }
                        Err(source) if !may_fail => {
                            return Err(Error::Spawn {
                                program: program.clone(),
                                source,
                            })
                        }
                        Ok(status) => {
                            let _ = writeln!(log, "  (ignored: {status})");
                        }
                        Err(e) => {
                            let _ = writeln!(log, "  (ignored: {e})");
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// Quotes a path or argument for display when it holds anything beyond plain characters.
fn quote(arg: &Path) -> String {
    let s = arg.display().to_string();
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+=:@,%".contains(c));
    if plain {
        s
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn create_private_dir(path: &Path) -> Result<(), Error> {
    let io = |source| Error::Io {
        action: "create directory",
        path: path.to_path_buf(),
        source,
    };
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(path).map_err(io)
}

fn write_private_file(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    write_file(path, bytes, 0o600)
}

/// Writes `bytes` to `path` (parents created) and sets `mode`, also on an existing file.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), Error> {
    let io = |source| Error::Io {
        action: "write",
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    let mut file = options.open(path).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    #[cfg(unix)]
    {
        // An existing file keeps its old mode through open(); tighten it.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dry_run_listing_quotes_and_shows_file_content() {
        let plan = Plan {
            steps: vec![
                Step::CreateDir(PathBuf::from("/home/a b/.config/keyport")),
                Step::write(PathBuf::from("/tmp/x.service"), "[Unit]\nA=1\n".to_owned()),
                Step::run(&["systemctl", "--user", "daemon-reload"]),
                Step::run_may_fail(&["systemctl", "--user", "disable", "--now", "x"]),
                Step::RemoveFile(PathBuf::from("/tmp/it's")),
            ],
        };
        let text = plan.to_string();
        assert_eq!(
            text,
            "mkdir -p -m 0700 '/home/a b/.config/keyport'\n\
             write /tmp/x.service, mode 0600:\n    [Unit]\n    A=1\n\
             systemctl --user daemon-reload\n\
             systemctl --user disable --now x   # may fail\n\
             rm -f '/tmp/it'\\''s'\n"
        );
    }

    #[test]
    fn execute_writes_private_files_and_stops_on_a_failed_command() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("sub/unit");
        let plan = Plan {
            steps: vec![
                Step::write(file.clone(), "hello\n".to_owned()),
                Step::run_may_fail(&["false"]),
                Step::run(&["false"]),
                Step::RemoveFile(file.clone()),
            ],
        };
        let mut log = Vec::new();
        let err = plan
            .execute(&mut log)
            .expect_err("`false` must fail the plan");
        assert!(matches!(err, Error::CommandFailed { ref command, .. } if command == "false"));
        assert_eq!(std::fs::read_to_string(&file).expect("written"), "hello\n");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&file).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let log = String::from_utf8(log).expect("utf-8");
        assert!(
            log.contains("$ false\n  (ignored: exit status: 1)"),
            "{log}"
        );
    }
}
