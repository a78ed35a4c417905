//! The running daemon's library hosts, for `keyport doctor` (another process): the daemon
//! writes them to a small JSON file in its runtime folder whenever they change, and `doctor`
//! reads it and says how old it is.
//!
//! - Where: `$XDG_RUNTIME_DIR/keyport/` (the data folder when there is no runtime folder),
//!   folder 0700; one file per configuration file (`hosts-<16 hex of SHA-256 of its absolute
//!   path>.json`), so that two daemons with different `--config` never share one.
//! - How: written to a temporary file created 0600, then renamed over the old one (a reader
//!   sees a whole file or the previous one); removed when the daemon stops.
//! - When: a thread looks at the hosts twice a second and writes only when something changed
//!   (a host started, ended, restarted). The file names the daemon's pid, so a file left by
//!   a daemon that was killed is recognised as such.
//!
//! What it holds is what `doctor` shows of its own hosts: library, pid, restarts, last
//! failure. Never a PIN, a key or a document.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::Paths;
use crate::tokens::TokenSet;

/// How often the writer looks at the hosts.
const LOOK_EVERY: Duration = Duration::from_millis(500);

/// One host as the daemon last saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRow {
    /// "PKCS#11 module" or "SKF library".
    pub kind: String,
    pub library: PathBuf,
    pub pid: Option<u32>,
    pub restarts: u32,
    pub last_failure: Option<String>,
}

/// The file's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostsReport {
    /// The daemon that wrote it.
    pub agent_pid: u32,
    /// When, in milliseconds since the Unix epoch.
    pub written_ms: u64,
    pub hosts: Vec<HostRow>,
}

/// The status file of the daemon that uses `paths`' configuration file.
pub fn status_path(paths: &Paths) -> PathBuf {
    let folder = std::env::var_os("XDG_RUNTIME_DIR")
        .filter(|d| !d.is_empty())
        .map(|d| PathBuf::from(d).join("keyport"))
        .unwrap_or_else(|| paths.data_dir.clone());
    let config = std::path::absolute(&paths.config_file).unwrap_or(paths.config_file.clone());
    let digest = Sha256::digest(config.as_os_str().as_encoded_bytes());
    folder.join(format!("hosts-{}.json", &hex::encode(digest)[..16]))
}

/// The hosts of `tokens` now.
pub fn rows(tokens: &TokenSet) -> Vec<HostRow> {
    tokens
        .modules()
        .iter()
        .filter_map(|m| {
            let path = m.module.path();
            tokens.host_status(path).map(|s| HostRow {
                kind: m.module.kind().to_string(),
                library: path.to_owned(),
                pid: s.pid,
                restarts: s.restarts,
                last_failure: s.last_failure,
            })
        })
        .collect()
}

/// Writes `report` to `path` atomically, the file 0600 and its folder 0700.
pub fn write(path: &Path, report: &HostsReport) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    let folder = path.parent().unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(folder)?;
    let tmp = path.with_extension(format!("json.{}.tmp", std::process::id()));
    let body = serde_json::to_vec_pretty(report).map_err(std::io::Error::other)?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(&body)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// The report at `path`, if there is one; an unreadable one is an error.
pub fn read(path: &Path) -> std::io::Result<Option<HostsReport>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(std::io::Error::other),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// How long ago `report` was written.
pub fn age(report: &HostsReport) -> Duration {
    let now = now_ms();
    Duration::from_millis(now.saturating_sub(report.written_ms))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The daemon's writer thread; removes the file when stopped.
#[derive(Debug)]
pub struct StatusWriter {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
}

impl StatusWriter {
    /// Starts writing `tokens`' hosts to `path` (nothing when no library is hosted).
    pub fn spawn(tokens: TokenSet, path: PathBuf) -> std::io::Result<StatusWriter> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (stop, path) = (Arc::clone(&stop), path.clone());
            std::thread::Builder::new()
                .name("host-status".into())
                .spawn(move || {
                    let mut last: Option<Vec<HostRow>> = None;
                    while !stop.load(Ordering::SeqCst) {
                        let now = rows(&tokens);
                        if !now.is_empty() && last.as_ref() != Some(&now) {
                            let report = HostsReport {
                                agent_pid: std::process::id(),
                                written_ms: now_ms(),
                                hosts: now.clone(),
                            };
                            match write(&path, &report) {
                                Ok(()) => last = Some(now),
                                Err(e) => {
                                    tracing::warn!(path = %path.display(), error = %e, "the host status file could not be written")
                                }
                            }
                        }
                        std::thread::park_timeout(LOOK_EVERY);
                    }
                })?
        };
        Ok(StatusWriter {
            stop,
            thread: Some(thread),
            path,
        })
    }

    /// Stops the thread and removes the file.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
        if let Err(e) = std::fs::remove_file(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::debug!(error = %e, "the host status file could not be removed");
            }
        }
    }
}

impl Drop for StatusWriter {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests panic on purpose
mod tests {
    use super::*;

    #[test]
    fn a_report_round_trips_through_a_private_file() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/keyport/hosts-0.json");
        assert_eq!(read(&path).unwrap(), None);
        let report = HostsReport {
            agent_pid: 42,
            written_ms: now_ms(),
            hosts: vec![HostRow {
                kind: "SKF library".into(),
                library: "/usr/lib/libskf.so".into(),
                pid: Some(43),
                restarts: 2,
                last_failure: Some("killed by signal 11 (SIGSEGV)".into()),
            }],
        };
        write(&path, &report).unwrap();
        assert_eq!(read(&path).unwrap(), Some(report.clone()));
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        assert!(age(&report) < Duration::from_secs(60));
        std::fs::write(&path, b"{not json").unwrap();
        assert!(read(&path).is_err());
    }

    #[test]
    fn each_configuration_has_its_own_file() {
        let paths = |file: &str| Paths {
            config_file: PathBuf::from(file),
            config_dir: PathBuf::from("/c"),
            data_dir: PathBuf::from("/d"),
        };
        assert_ne!(
            status_path(&paths("/a/config.toml")),
            status_path(&paths("/b/config.toml"))
        );
        assert_eq!(
            status_path(&paths("/a/config.toml")),
            status_path(&paths("/a/config.toml"))
        );
    }
}
