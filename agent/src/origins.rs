//! Which web origins may use the user's certificates: the administrator's lists in the
//! configuration, and the user's own "allow always" / "deny" decisions, kept in
//! `origins.toml` beside the configuration and edited with `keyport origins`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

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
    decisions: Decisions,
}

impl OriginStore {
    pub fn open(file: &Path, config: &Config) -> Result<OriginStore, OriginsError> {
        let decisions = read_decisions(file)?;
        Ok(OriginStore {
            file: file.to_path_buf(),
            config_allowed: config.allowed_origins.iter().cloned().collect(),
            config_denied: config.denied_origins.iter().cloned().collect(),
            unknown: config.unknown_origins,
            decisions,
        })
    }

    /// Denials win over approvals; the administrator's lists over the user's.
    pub fn standing(&self, origin: &str) -> Standing {
        if self.config_denied.contains(origin) || self.decisions.denied.contains(origin) {
            Standing::Denied
        } else if self.config_allowed.contains(origin) || self.decisions.allowed.contains(origin) {
            Standing::Allowed
        } else {
            Standing::Unknown
        }
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

    /// Records "allow always"; removes an earlier user denial.
    pub fn allow(&mut self, origin: &str) -> Result<(), OriginsError> {
        self.decisions.denied.remove(origin);
        self.decisions.allowed.insert(origin.to_owned());
        self.save()
    }

    /// Records "deny"; removes an earlier user approval.
    pub fn deny(&mut self, origin: &str) -> Result<(), OriginsError> {
        self.decisions.allowed.remove(origin);
        self.decisions.denied.insert(origin.to_owned());
        self.save()
    }

    /// Forgets the user's decision; returns whether there was one.
    pub fn revoke(&mut self, origin: &str) -> Result<bool, OriginsError> {
        let had = self.decisions.allowed.remove(origin) | self.decisions.denied.remove(origin);
        if had {
            self.save()?;
        }
        Ok(had)
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
        for o in &self.decisions.allowed {
            out.push((o.clone(), Standing::Allowed, "user"));
        }
        for o in &self.decisions.denied {
            out.push((o.clone(), Standing::Denied, "user"));
        }
        out.sort();
        out
    }

    /// Writes the decisions atomically (a new temporary file, never through a link, then a
    /// rename), mode 0600, in a folder made 0700 if it is missing.
    fn save(&self) -> Result<(), OriginsError> {
        let text =
            toml::to_string(&self.decisions).map_err(|e| OriginsError::Encode(e.to_string()))?;
        let dir = self
            .file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        files::create_private_dir(dir).map_err(|e| self.io(e))?;
        let tmp = self.file.with_extension("toml.tmp");
        let mut bytes =
            b"# Origins decided by the user with KeyPort's dialog or `keyport origins`.\n".to_vec();
        bytes.extend_from_slice(text.as_bytes());
        files::write_atomic_private(&self.file, &tmp, &bytes).map_err(|e| self.io(e))
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
