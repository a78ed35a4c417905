//! Which web origins may use the user's certificates: the administrator's lists in the
//! configuration, and the user's own "allow always" / "deny" decisions, kept in
//! `origins.toml` beside the configuration and edited with `keyport origins`.
//!
//! A running agent sees a `keyport origins` change at its next check: the store re-reads the
//! decisions file whenever the file's modification time, size or inode differ from what it last
//! read or wrote (one `stat` per check). A "Deny" answered in the dialog holds for the agent's
//! run only, until the user's decision about that origin changes in the file.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use browser_bridge::Origin;
use serde::{Deserialize, Serialize};

use crate::config::{Config, UnknownOrigins};
use crate::files::{self, ReadError};

/// What the policy says of one origin, before any dialog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Standing {
    /// Listed as allowed by the administrator or the user.
    Allowed,
    /// Denied by the administrator or the user: refused at the handshake.
    Denied,
    /// Neither: the user is asked (or, with `unknown_origins = "reject"`, refused).
    Unknown,
}

/// An origin's standing and whether a dialog of this run denied it, read together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OriginCheck {
    pub denied_for_now: bool,
    pub standing: Standing,
}

impl OriginCheck {
    /// What a poisoned store answers: denied.
    pub const DENIED: OriginCheck = OriginCheck {
        denied_for_now: true,
        standing: Standing::Denied,
    };

    /// Approved for good: allowed, and not denied in a dialog since.
    pub fn is_approved(&self) -> bool {
        !self.denied_for_now && self.standing == Standing::Allowed
    }
}

/// The user's persisted decisions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Decisions {
    pub allowed: BTreeSet<String>,
    pub denied: BTreeSet<String>,
}

/// The origin store: the configuration's lists plus the user's decisions file.
#[derive(Debug)]
pub struct OriginStore {
    file: PathBuf,
    config_allowed: BTreeSet<String>,
    config_denied: BTreeSet<String>,
    unknown: UnknownOrigins,
    /// The administrator's policy: the only origins the user's approvals count for.
    ceiling: Option<BTreeSet<String>>,
    /// Behind a `RefCell` so that a check (`&self`) can pick up a change of the file; the store
    /// itself lives behind the service's `Mutex`.
    user: RefCell<UserState>,
}

/// The user's decisions as last read or written, and the dialog denials of this run.
#[derive(Debug)]
struct UserState {
    decisions: Decisions,
    stamp: Option<FileStamp>,
    denied_for_now: BTreeSet<String>,
}

/// What tells a changed decisions file from the one last read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

impl FileStamp {
    fn of(file: &Path) -> Option<FileStamp> {
        let meta = std::fs::metadata(file).ok()?;
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(&meta);
        #[cfg(not(unix))]
        let inode = 0;
        Some(FileStamp {
            modified: meta.modified().ok(),
            len: meta.len(),
            inode,
        })
    }
}

impl OriginStore {
    pub fn open(file: &Path, config: &Config) -> Result<OriginStore, OriginsError> {
        let stamp = FileStamp::of(file);
        let decisions = read_decisions(file)?;
        Ok(OriginStore {
            file: file.to_path_buf(),
            config_allowed: config.allowed_origins.iter().cloned().collect(),
            config_denied: config.denied_origins.iter().cloned().collect(),
            unknown: config.unknown_origins,
            ceiling: config.origin_ceiling.clone(),
            user: RefCell::new(UserState {
                decisions,
                stamp,
                denied_for_now: BTreeSet::new(),
            }),
        })
    }

    /// Denials win over approvals; the administrator's lists over the user's.
    pub fn standing(&self, origin: &str) -> Standing {
        self.refresh();
        self.standing_as_read(origin)
    }

    /// What a request of `origin` meets, from one look at the decisions file (a request
    /// asks this once, not once per question: each look is a `stat`).
    pub fn check(&self, origin: &str) -> OriginCheck {
        self.refresh();
        OriginCheck {
            denied_for_now: self.user.borrow().denied_for_now.contains(origin),
            standing: self.standing_as_read(origin),
        }
    }

    fn standing_as_read(&self, origin: &str) -> Standing {
        let user = self.user.borrow();
        if self.config_denied.contains(origin) || user.decisions.denied.contains(origin) {
            Standing::Denied
        } else if self.config_allowed.contains(origin)
            || (user.decisions.allowed.contains(origin) && self.may_approve(origin))
        {
            Standing::Allowed
        } else {
            Standing::Unknown
        }
    }

    /// Whether the administrator's policy lets the user approve this origin.
    pub fn may_approve(&self, origin: &str) -> bool {
        self.ceiling.as_ref().is_none_or(|c| c.contains(origin))
    }

    /// May a connection from this origin be upgraded at all?
    pub fn admits(&self, origin: &str) -> bool {
        match self.standing(origin) {
            Standing::Allowed => true,
            Standing::Denied => false,
            Standing::Unknown => match self.unknown {
                UnknownOrigins::Prompt | UnknownOrigins::Unapproved => true,
                UnknownOrigins::Reject => false,
            },
        }
    }

    /// "Deny" answered in the dialog: refused for the rest of this run, or until the user's
    /// decision about the origin changes (`keyport origins allow|deny|revoke`).
    pub fn deny_for_now(&self, origin: &str) {
        self.user
            .borrow_mut()
            .denied_for_now
            .insert(origin.to_owned());
    }

    /// Whether the user denied this origin in a dialog of this run (and has not decided about
    /// it since).
    pub fn is_denied_for_now(&self, origin: &str) -> bool {
        self.check(origin).denied_for_now
    }

    /// Records "allow always"; removes an earlier user denial.
    pub fn allow(&mut self, origin: &str) -> Result<(), OriginsError> {
        self.refresh();
        let user = self.user.get_mut();
        user.decisions.denied.remove(origin);
        user.decisions.allowed.insert(origin.to_owned());
        user.denied_for_now.remove(origin);
        self.save()
    }

    /// Records "deny"; removes an earlier user approval.
    pub fn deny(&mut self, origin: &str) -> Result<(), OriginsError> {
        self.refresh();
        let user = self.user.get_mut();
        user.decisions.allowed.remove(origin);
        user.decisions.denied.insert(origin.to_owned());
        self.save()
    }

    /// Forgets the user's decision (and a dialog denial of this run); returns whether there
    /// was one.
    pub fn revoke(&mut self, origin: &str) -> Result<bool, OriginsError> {
        self.refresh();
        let user = self.user.get_mut();
        let for_now = user.denied_for_now.remove(origin);
        let had = user.decisions.allowed.remove(origin) | user.decisions.denied.remove(origin);
        if had {
            self.save()?;
        }
        Ok(had || for_now)
    }

    /// Re-reads the decisions file if it changed since it was last read or written. A dialog
    /// denial ends for every origin whose decision changed. A file that cannot be read or
    /// parsed leaves the last good decisions in force (logged).
    fn refresh(&self) {
        let stamp = FileStamp::of(&self.file);
        let mut user = self.user.borrow_mut();
        if stamp == user.stamp {
            return;
        }
        let decisions = match read_decisions(&self.file) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "origin decisions not re-read; the last ones stand");
                user.stamp = stamp;
                return;
            }
        };
        let old = &user.decisions;
        let changed: Vec<String> = old
            .allowed
            .symmetric_difference(&decisions.allowed)
            .chain(old.denied.symmetric_difference(&decisions.denied))
            .cloned()
            .collect();
        for origin in changed {
            user.denied_for_now.remove(&origin);
        }
        user.decisions = decisions;
        user.stamp = stamp;
    }

    /// Every origin with a standing, and where it comes from.
    pub fn list(&self) -> Vec<(String, Standing, &'static str)> {
        let mut out = Vec::new();
        for o in &self.config_allowed {
            out.push((o.clone(), Standing::Allowed, "config"));
        }
        for o in &self.config_denied {
            out.push((o.clone(), Standing::Denied, "config"));
        }
        self.refresh();
        let user = self.user.borrow();
        for o in &user.decisions.allowed {
            out.push((o.clone(), Standing::Allowed, "user"));
        }
        for o in &user.decisions.denied {
            out.push((o.clone(), Standing::Denied, "user"));
        }
        for o in &user.denied_for_now {
            out.push((o.clone(), Standing::Denied, "dialog, until restart"));
        }
        out.sort();
        out
    }

    /// Writes the decisions atomically (a new temporary file, never through a link, then a
    /// rename), mode 0600, in a folder made 0700 if it is missing.
    fn save(&mut self) -> Result<(), OriginsError> {
        let text = toml::to_string(&self.user.get_mut().decisions)
            .map_err(|e| OriginsError::Encode(e.to_string()))?;
        let dir = self
            .file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        files::create_private_dir(dir).map_err(|e| self.io(e))?;
        let tmp = self.file.with_extension("toml.tmp");
        let mut bytes = b"# Origins decided by the user with KeyPort's dialog or `keyport origins`.
"
        .to_vec();
        bytes.extend_from_slice(text.as_bytes());
        files::write_atomic_private(&self.file, &tmp, &bytes).map_err(|e| self.io(e))?;
        self.user.get_mut().stamp = FileStamp::of(&self.file);
        Ok(())
    }

    fn io(&self, source: std::io::Error) -> OriginsError {
        OriginsError::Io {
            path: self.file.clone(),
            source,
        }
    }
}

fn read_decisions(file: &Path) -> Result<Decisions, OriginsError> {
    let text = match files::read_private_config(file) {
        Ok(text) => text,
        Err(ReadError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Decisions::default())
        }
        Err(ReadError::Io(source)) => {
            return Err(OriginsError::Io {
                path: file.to_path_buf(),
                source,
            })
        }
        Err(ReadError::Unsafe(message)) => return Err(OriginsError::Unsafe(message)),
    };
    let decisions: Decisions = toml::from_str(&text).map_err(|e| OriginsError::Parse {
        path: file.to_path_buf(),
        message: e.to_string(),
    })?;
    // The handshake's parser again: a decision that could never match is an edit gone wrong.
    for origin in decisions.allowed.iter().chain(&decisions.denied) {
        Origin::parse(origin, true).map_err(|e| OriginsError::Parse {
            path: file.to_path_buf(),
            message: format!("{origin:?} is not an origin as a browser sends it ({e})"),
        })?;
    }
    Ok(decisions)
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OriginsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Unsafe(String),
    #[error("cannot encode the origin decisions: {0}")]
    Encode(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::parse(text).expect("config")
    }

    #[test]
    fn decisions_persist_and_denials_win() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("origins.toml");
        let cfg = config(r#"denied_origins = ["https://bad.example"]"#);
        let mut store = OriginStore::open(&file, &cfg).expect("open");
        assert_eq!(store.standing("https://portal.example"), Standing::Unknown);
        store.allow("https://portal.example").expect("allow");
        store.allow("https://bad.example").expect("allow");

        let store = OriginStore::open(&file, &cfg).expect("reopen");
        assert_eq!(store.standing("https://portal.example"), Standing::Allowed);
        assert_eq!(store.standing("https://bad.example"), Standing::Denied);
        assert!(!store.admits("https://bad.example"));
        assert!(store.admits("https://unknown.example"));
    }

    #[test]
    fn revoke_forgets_and_reports() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("origins.toml");
        let mut store = OriginStore::open(&file, &Config::default()).expect("open");
        store.deny("https://x.example").expect("deny");
        assert_eq!(store.standing("https://x.example"), Standing::Denied);
        assert!(store.revoke("https://x.example").expect("revoke"));
        assert!(!store.revoke("https://x.example").expect("revoke again"));
        let store = OriginStore::open(&file, &Config::default()).expect("reopen");
        assert_eq!(store.standing("https://x.example"), Standing::Unknown);
    }

    #[test]
    fn reject_policy_refuses_unknown_origins_at_the_door() {
        let cfg = config(
            r#"unknown_origins = "reject"
               allowed_origins = ["https://portal.example"]"#,
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let store = OriginStore::open(&dir.path().join("o.toml"), &cfg).expect("open");
        assert!(store.admits("https://portal.example"));
        assert!(!store.admits("https://other.example"));
    }

    #[test]
    fn unapproved_policy_lets_unknown_origins_connect_but_not_denied_ones() {
        let cfg = config(
            r#"unknown_origins = "unapproved"
               allowed_origins = ["https://portal.example"]
               denied_origins = ["https://bad.example"]"#,
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let store = OriginStore::open(&dir.path().join("o.toml"), &cfg).expect("open");
        assert!(store.admits("https://portal.example"));
        assert!(store.admits("https://other.example"));
        assert_eq!(store.standing("https://other.example"), Standing::Unknown);
        assert!(!store.admits("https://bad.example"));
    }

    /// The agent's store sees what `keyport origins` (another store on the same file) decided,
    /// and a dialog denial ends when the user allows or revokes that origin.
    #[test]
    fn a_running_store_sees_changes_made_by_another() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("origins.toml");
        let agent = OriginStore::open(&file, &Config::default()).expect("open");
        agent.deny_for_now("https://bank.example");
        agent.deny_for_now("https://other.example");
        assert!(agent.is_denied_for_now("https://bank.example"));

        let mut cli = OriginStore::open(&file, &Config::default()).expect("open");
        cli.allow("https://bank.example").expect("allow");
        assert_eq!(agent.standing("https://bank.example"), Standing::Allowed);
        assert!(!agent.is_denied_for_now("https://bank.example"));
        assert!(
            agent.is_denied_for_now("https://other.example"),
            "untouched"
        );

        let mut cli = OriginStore::open(&file, &Config::default()).expect("open");
        cli.deny("https://bank.example").expect("deny");
        assert_eq!(agent.standing("https://bank.example"), Standing::Denied);
        assert!(!agent.admits("https://bank.example"));
        cli.revoke("https://bank.example").expect("revoke");
        assert_eq!(agent.standing("https://bank.example"), Standing::Unknown);

        // A broken edit leaves the last good decisions in force.
        cli.allow("https://kept.example").expect("allow");
        assert_eq!(agent.standing("https://kept.example"), Standing::Allowed);
        std::fs::write(&file, "allowed = 3").expect("write");
        assert_eq!(agent.standing("https://kept.example"), Standing::Allowed);
    }

    /// A request's one look (`check`) answers what the separate questions answer, a change of
    /// the file included.
    #[test]
    fn one_check_answers_as_the_separate_questions_do() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("origins.toml");
        let agent = OriginStore::open(&file, &Config::default()).expect("open");
        let bank = "https://bank.example";
        let same = |agent: &OriginStore| {
            let check = agent.check(bank);
            assert_eq!(check.standing, agent.standing(bank));
            assert_eq!(check.denied_for_now, agent.is_denied_for_now(bank));
            check
        };
        assert!(!same(&agent).is_approved());
        agent.deny_for_now(bank);
        assert!(same(&agent).denied_for_now);

        let mut cli = OriginStore::open(&file, &Config::default()).expect("open");
        cli.allow(bank).expect("allow");
        let check = same(&agent);
        assert_eq!(check.standing, Standing::Allowed);
        assert!(check.is_approved(), "the allow ended the dialog's denial");
        cli.deny(bank).expect("deny");
        assert!(!same(&agent).is_approved());
        assert_eq!(agent.check(bank).standing, Standing::Denied);
    }

    #[test]
    fn a_corrupt_file_is_an_error_not_an_empty_list() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("origins.toml");
        std::fs::write(&file, "allowed = 3").expect("write");
        assert!(matches!(
            OriginStore::open(&file, &Config::default()),
            Err(OriginsError::Parse { .. })
        ));
    }
}
