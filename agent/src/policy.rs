//! The administrator's machine-wide policy: `/etc/keyport/policy.toml` (the path is fixed when
//! the binary is built: `KEYPORT_POLICY_PATH=… cargo build`). It bounds the user's own
//! configuration and approvals: they can narrow it, never widen it.
//!
//! ```toml
//! allowed_origins = ["https://portal.example.gov"]   # approved for every user, no dialog
//! denied_origins = ["https://old.example.gov"]       # refused, whatever a user says
//! unknown_origins = "reject"     # the most a user may allow for other origins: prompt > unapproved > reject
//! signing_key_usage = "non-repudiation"              # the widest a user may allow: any > non-repudiation
//! session_consent_origins = ["https://intranet.example.gov"]  # the only origins that may use consent = "session"
//! max_pin_cache_seconds = 0                          # a user's pin_cache_seconds is cut to this
//! modules = ["/usr/lib/x86_64-linux-gnu/pkcs11/opensc-pkcs11.so"]  # the only PKCS#11 modules that load
//! skf_libraries = []                                 # the only SKF libraries that may load
//! ```
//! Every key is optional; a key that is absent bounds nothing. With `unknown_origins` other
//! than `prompt`, only the policy's `allowed_origins` can be approved: a user's
//! `allowed_origins` and "allow always" decisions for other origins are ignored.
//!
//! The file must be a regular file owned by root and writable by nobody else, in a folder that
//! is likewise root's: otherwise KeyPort refuses to run (a policy a user could edit would bound
//! nothing). A missing file is no policy. `KEYPORT_POLICY_FILE` names another file, honoured
//! only for root (tests; an administrator trying a draft with `sudo KEYPORT_POLICY_FILE=draft
//! keyport doctor`): a user cannot point KeyPort at a policy of their own.
//!
//! [`Policy::apply`] turns the user's configuration into the effective one and records where
//! each bounded value came from, which `keyport doctor` prints.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::{Config, ConsentMode, ModuleConfig, SigningKeyUsage, UnknownOrigins};

/// Where the policy is read from, fixed at build time.
pub const POLICY_PATH: &str = match option_env!("KEYPORT_POLICY_PATH") {
    Some(p) => p,
    None => "/etc/keyport/policy.toml",
};

/// The environment variable that names another policy file (root only).
pub const POLICY_FILE_ENV: &str = "KEYPORT_POLICY_FILE";

/// The policy file's contents.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub allowed_origins: Option<Vec<String>>,
    pub denied_origins: Option<Vec<String>>,
    pub unknown_origins: Option<UnknownOrigins>,
    pub signing_key_usage: Option<SigningKeyUsage>,
    pub session_consent_origins: Option<Vec<String>>,
    pub max_pin_cache_seconds: Option<u64>,
    pub modules: Option<Vec<PathBuf>>,
    pub skf_libraries: Option<Vec<PathBuf>>,
}

/// The policy in force and the file it came from.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    /// `None` when there is no policy file.
    pub file: Option<PathBuf>,
    pub policy: Policy,
}

/// One bounded setting as `keyport doctor` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    pub key: &'static str,
    pub value: String,
    /// "policy", "your configuration", "default", or what was overridden.
    pub source: String,
}

/// Why a policy cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    #[error("cannot read the policy {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the policy {path} {problem}: refusing to run under a policy another user could change (chown root:root; chmod 644 the file, 755 its folder)")]
    Unsafe { path: PathBuf, problem: String },
    #[error("the policy {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0} is honoured only for root: a user cannot choose the policy that bounds them")]
    OverrideNotRoot(&'static str),
}

impl Loaded {
    /// The machine's policy: `POLICY_PATH`, or `KEYPORT_POLICY_FILE` when run as root.
    pub fn system() -> Result<Loaded, PolicyError> {
        let path = match std::env::var_os(POLICY_FILE_ENV) {
            Some(p) if is_root() => PathBuf::from(p),
            Some(_) => return Err(PolicyError::OverrideNotRoot(POLICY_FILE_ENV)),
            None => PathBuf::from(POLICY_PATH),
        };
        Loaded::from_file(&path)
    }

    /// The policy at `path` (none if the file does not exist), after the ownership checks.
    pub fn from_file(path: &Path) -> Result<Loaded, PolicyError> {
        let meta = match std::fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Loaded::default()),
            Err(source) => {
                return Err(PolicyError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        check_owner(path, &meta, "is")?;
        if !meta.is_file() {
            return Err(PolicyError::Unsafe {
                path: path.to_path_buf(),
                problem: "is not a regular file".into(),
            });
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            let dir_meta = std::fs::metadata(dir).map_err(|source| PolicyError::Read {
                path: dir.to_path_buf(),
                source,
            })?;
            check_owner(path, &dir_meta, "is in a folder that is")?;
        }
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let policy = Policy::parse(&text).map_err(|message| PolicyError::Parse {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(Loaded {
            file: Some(path.to_path_buf()),
            policy,
        })
    }

    /// The effective configuration: `config` bounded by the policy, with where each bounded
    /// value came from.
    pub fn apply(&self, mut config: Config) -> (Config, Vec<Setting>) {
        let p = &self.policy;
        let mut report = Vec::new();
        let user_or_default = |is_default: bool| {
            if is_default {
                "default".to_owned()
            } else {
                "your configuration".to_owned()
            }
        };
        let defaults = Config::default();

        // unknown_origins: the narrower of the two.
        let unknown = match p.unknown_origins {
            Some(limit) if rank_unknown(limit) < rank_unknown(config.unknown_origins) => {
                let source = format!(
                    "policy (your configuration said {:?})",
                    name_unknown(config.unknown_origins)
                );
                config.unknown_origins = limit;
                source
            }
            _ => user_or_default(config.unknown_origins == defaults.unknown_origins),
        };
        report.push(Setting {
            key: "unknown_origins",
            value: name_unknown(config.unknown_origins).into(),
            source: unknown,
        });

        // Origins: the policy's denials always; its approvals for everyone; the user's own
        // approvals only while unknown origins may still be asked about.
        if let Some(denied) = &p.denied_origins {
            for o in denied {
                if !config.denied_origins.contains(o) {
                    config.denied_origins.push(o.clone());
                }
            }
        }
        let policy_allowed: BTreeSet<String> = p
            .allowed_origins
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        if self.file.is_some()
            && p.unknown_origins
                .is_some_and(|u| u != UnknownOrigins::Prompt)
        {
            let dropped: Vec<String> = config
                .allowed_origins
                .iter()
                .filter(|o| !policy_allowed.contains(*o))
                .cloned()
                .collect();
            config
                .allowed_origins
                .retain(|o| policy_allowed.contains(o));
            config.origin_ceiling = Some(policy_allowed.clone());
            if !dropped.is_empty() {
                report.push(Setting {
                    key: "allowed_origins (yours, ignored)",
                    value: dropped.join(", "),
                    source: "policy: only its allowed_origins can be approved".into(),
                });
            }
        }
        for o in &policy_allowed {
            if !config.allowed_origins.contains(o) {
                config.allowed_origins.push(o.clone());
            }
        }
        if let Some(list) = &p.allowed_origins {
            report.push(Setting {
                key: "allowed_origins (policy)",
                value: list.join(", "),
                source: "policy".into(),
            });
        }
        if let Some(list) = &p.denied_origins {
            report.push(Setting {
                key: "denied_origins (policy)",
                value: list.join(", "),
                source: "policy".into(),
            });
        }

        // signing_key_usage: non-repudiation is narrower than any.
        let usage = match p.signing_key_usage {
            Some(SigningKeyUsage::NonRepudiation)
                if config.signing_key_usage == SigningKeyUsage::Any =>
            {
                config.signing_key_usage = SigningKeyUsage::NonRepudiation;
                "policy (your configuration said \"any\")".to_owned()
            }
            _ => user_or_default(config.signing_key_usage == defaults.signing_key_usage),
        };
        report.push(Setting {
            key: "signing_key_usage",
            value: match config.signing_key_usage {
                SigningKeyUsage::NonRepudiation => "non-repudiation".into(),
                SigningKeyUsage::Any => "any".into(),
            },
            source: usage,
        });

        // Session consent only for the origins the policy names.
        if let Some(allowed) = &p.session_consent_origins {
            let (kept, dropped): (Vec<_>, Vec<_>) = config
                .origin_policy
                .drain(..)
                .partition(|e| e.consent != ConsentMode::Session || allowed.contains(&e.origin));
            config.origin_policy = kept;
            for e in dropped {
                report.push(Setting {
                    key: "origin_policy consent",
                    value: format!("{}: request", e.origin),
                    source: "policy (your configuration said \"session\"; \
                             session_consent_origins does not name it)"
                        .into(),
                });
            }
        }

        // pin_cache_seconds: at most the policy's.
        let cache = match p.max_pin_cache_seconds {
            Some(max) if config.pin_cache_seconds > max => {
                let source = format!(
                    "policy max_pin_cache_seconds (your configuration said {})",
                    config.pin_cache_seconds
                );
                config.pin_cache_seconds = max;
                source
            }
            _ => user_or_default(config.pin_cache_seconds == defaults.pin_cache_seconds),
        };
        report.push(Setting {
            key: "pin_cache_seconds",
            value: config.pin_cache_seconds.to_string(),
            source: cache,
        });

        // Modules: only the policy's; no discovery beyond them.
        if let Some(allowed) = &p.modules {
            let user: Vec<PathBuf> = config.modules.iter().map(|m| m.path.clone()).collect();
            // The user's allowed ones first, in their order, then the rest of the policy's.
            let mut kept: Vec<PathBuf> = user
                .iter()
                .filter(|m| allowed.contains(m))
                .cloned()
                .collect();
            for m in allowed {
                if !kept.contains(m) {
                    kept.push(m.clone());
                }
            }
            let dropped: Vec<String> = user
                .iter()
                .filter(|m| !allowed.contains(m))
                .map(|m| m.display().to_string())
                .collect();
            config.modules = kept
                .iter()
                .map(|path| ModuleConfig { path: path.clone() })
                .collect();
            config.discover_modules = false;
            // A user's [[atr]] entry loads its module when the card goes in: only allowed ones.
            let atr_dropped: Vec<String> = config
                .atr
                .iter()
                .filter(|a| !allowed.contains(&a.module))
                .map(|a| a.module.display().to_string())
                .collect();
            config.atr.retain(|a| allowed.contains(&a.module));
            if !atr_dropped.is_empty() {
                report.push(Setting {
                    key: "atr (yours, ignored)",
                    value: atr_dropped.join(", "),
                    source: "policy: the module is not among its modules".into(),
                });
            }
            report.push(Setting {
                key: "modules",
                value: kept
                    .iter()
                    .map(|m| m.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                source: if dropped.is_empty() {
                    "policy (discovery off)".into()
                } else {
                    format!(
                        "policy (discovery off; yours not allowed: {})",
                        dropped.join(", ")
                    )
                },
            });
        }
        if let Some(allowed) = &p.skf_libraries {
            // As for modules: the user's allowed ones first, then the rest of the policy's; the
            // shipped vendor table is not searched.
            let user: Vec<PathBuf> = config.skf_modules.iter().map(|m| m.path.clone()).collect();
            let mut kept: Vec<PathBuf> = user
                .iter()
                .filter(|m| allowed.contains(m))
                .cloned()
                .collect();
            for m in allowed {
                if !kept.contains(m) {
                    kept.push(m.clone());
                }
            }
            let dropped: Vec<String> = user
                .iter()
                .filter(|m| !allowed.contains(m))
                .map(|m| m.display().to_string())
                .collect();
            config.skf_modules = kept
                .iter()
                .map(|path| ModuleConfig { path: path.clone() })
                .collect();
            config.skf_libraries_fixed = true;
            report.push(Setting {
                key: "skf_libraries",
                value: kept
                    .iter()
                    .map(|m| m.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                source: if dropped.is_empty() {
                    "policy (vendor table off)".into()
                } else {
                    format!(
                        "policy (vendor table off; yours not allowed: {})",
                        dropped.join(", ")
                    )
                },
            });
        }
        (config, report)
    }
}

impl Policy {
    /// Parses the policy's TOML (unknown keys refused, with the key meant).
    pub fn parse(text: &str) -> Result<Policy, String> {
        if let Ok(table) = text.parse::<toml::Table>() {
            let known = crate::config_keys::fields::<Policy>();
            if let Some(key) = table.keys().find(|k| !known.contains(&k.as_str())) {
                return Err(match crate::config_keys::nearest(key, known) {
                    Some(meant) => format!("unknown key `{key}`: did you mean `{meant}`?"),
                    None => format!("unknown key `{key}` (known: {})", known.join(", ")),
                });
            }
        }
        toml::from_str(text).map_err(|e| e.to_string())
    }
}

/// prompt (widest) > unapproved > reject (narrowest).
fn rank_unknown(u: UnknownOrigins) -> u8 {
    match u {
        UnknownOrigins::Prompt => 2,
        UnknownOrigins::Unapproved => 1,
        UnknownOrigins::Reject => 0,
    }
}

fn name_unknown(u: UnknownOrigins) -> &'static str {
    match u {
        UnknownOrigins::Prompt => "prompt",
        UnknownOrigins::Unapproved => "unapproved",
        UnknownOrigins::Reject => "reject",
    }
}

#[cfg(unix)]
fn check_owner(path: &Path, meta: &std::fs::Metadata, what: &str) -> Result<(), PolicyError> {
    use std::os::unix::fs::MetadataExt;
    let problem = if meta.uid() != 0 {
        Some(format!("{what} owned by uid {}, not root", meta.uid()))
    } else if meta.mode() & 0o022 != 0 {
        Some(format!(
            "{what} writable by its group or everyone (mode {:o})",
            meta.mode() & 0o777
        ))
    } else {
        None
    };
    match problem {
        Some(problem) => Err(PolicyError::Unsafe {
            path: path.to_path_buf(),
            problem,
        }),
        None => Ok(()),
    }
}

#[cfg(not(unix))]
fn check_owner(_path: &Path, _meta: &std::fs::Metadata, _what: &str) -> Result<(), PolicyError> {
    Ok(())
}

fn is_root() -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
    }
    #[cfg(not(unix))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loaded(text: &str) -> Loaded {
        Loaded {
            file: Some(PathBuf::from("/etc/keyport/policy.toml")),
            policy: Policy::parse(text).expect("policy parses"),
        }
    }

    #[test]
    fn each_widening_user_setting_is_cut_to_the_policy() {
        let user = Config::parse(
            r#"
            unknown_origins = "prompt"
            signing_key_usage = "any"
            pin_cache_seconds = 600
            allowed_origins = ["https://mine.example"]
            denied_origins = []
            [[origin_policy]]
            origin = "https://mine.example"
            consent = "session"
            [[modules]]
            path = "/home/ann/evil.so"
            [[atr]]
            atr = "3B 88"
            name = "my card"
            module = "/home/ann/evil.so"
            [[skf_modules]]
            path = "/home/ann/evil-skf.so"
            [[skf_modules]]
            path = "/opt/lm-gm3000user/lib/libgm3000.1.0.so"
            "#,
        )
        .expect("config");
        let policy = loaded(
            r#"
            skf_libraries = ["/opt/lm-gm3000user/lib/libgm3000.1.0.so", "/opt/other/libskf.so"]
            allowed_origins = ["https://portal.example.gov"]
            denied_origins = ["https://old.example.gov"]
            unknown_origins = "reject"
            signing_key_usage = "non-repudiation"
            session_consent_origins = ["https://portal.example.gov"]
            max_pin_cache_seconds = 30
            modules = ["/usr/lib/x86_64-linux-gnu/pkcs11/opensc-pkcs11.so"]
            "#,
        );
        let (eff, report) = policy.apply(user);
        assert_eq!(eff.unknown_origins, UnknownOrigins::Reject);
        assert_eq!(eff.signing_key_usage, SigningKeyUsage::NonRepudiation);
        assert_eq!(eff.pin_cache_seconds, 30);
        assert_eq!(eff.allowed_origins, ["https://portal.example.gov"]);
        assert_eq!(eff.denied_origins, ["https://old.example.gov"]);
        assert!(eff.origin_policy.is_empty(), "session consent dropped");
        assert_eq!(
            eff.modules,
            [ModuleConfig {
                path: "/usr/lib/x86_64-linux-gnu/pkcs11/opensc-pkcs11.so".into()
            }]
        );
        assert!(!eff.discover_modules);
        assert!(
            eff.atr.is_empty(),
            "an [[atr]] entry cannot load a module off the list"
        );
        assert_eq!(
            eff.origin_ceiling,
            Some(BTreeSet::from(["https://portal.example.gov".to_owned()]))
        );
        let source = |key: &str| {
            report
                .iter()
                .find(|s| s.key == key)
                .map(|s| s.source.clone())
                .unwrap_or_default()
        };
        assert!(
            source("unknown_origins").starts_with("policy"),
            "{report:?}"
        );
        assert!(
            source("pin_cache_seconds").contains("said 600"),
            "{report:?}"
        );
        assert!(
            source("modules").contains("/home/ann/evil.so"),
            "{report:?}"
        );
        let skf: Vec<&str> = eff
            .skf_modules
            .iter()
            .filter_map(|m| m.path.to_str())
            .collect();
        assert_eq!(
            skf,
            [
                "/opt/lm-gm3000user/lib/libgm3000.1.0.so",
                "/opt/other/libskf.so"
            ],
            "the user's allowed library first, the stranger gone"
        );
        assert!(eff.skf_libraries_fixed, "the vendor table is not searched");
        assert!(
            source("skf_libraries").contains("/home/ann/evil-skf.so"),
            "{report:?}"
        );
    }

    #[test]
    fn a_narrower_user_setting_stands() {
        let user = Config::parse(
            r#"
            unknown_origins = "reject"
            pin_cache_seconds = 5
            denied_origins = ["https://portal.example.gov"]
            "#,
        )
        .expect("config");
        let policy = loaded(
            r#"
            unknown_origins = "unapproved"
            max_pin_cache_seconds = 30
            allowed_origins = ["https://portal.example.gov"]
            "#,
        );
        let (eff, report) = policy.apply(user);
        assert_eq!(eff.unknown_origins, UnknownOrigins::Reject);
        assert_eq!(eff.pin_cache_seconds, 5);
        // The user's denial of a policy-allowed origin narrows: it stays (denials win).
        assert!(eff
            .denied_origins
            .contains(&"https://portal.example.gov".to_owned()));
        assert!(report
            .iter()
            .any(|s| s.key == "pin_cache_seconds" && s.source == "your configuration"));
    }

    #[test]
    fn the_example_policy_parses() {
        let policy = Policy::parse(include_str!("../../docs/policy.example.toml"))
            .expect("the example parses");
        assert_eq!(policy.unknown_origins, Some(UnknownOrigins::Reject));
        assert_eq!(policy.max_pin_cache_seconds, Some(0));
    }

    #[test]
    fn no_policy_changes_nothing() {
        let user = Config::parse("signing_key_usage = \"any\"").expect("config");
        let (eff, _) = Loaded::default().apply(user.clone());
        assert_eq!(eff, user);
    }

    #[test]
    fn unknown_keys_and_unsafe_files_are_refused() {
        let err = Policy::parse("max_pin_cache_secs = 3").expect_err("typo");
        assert!(
            err.contains("did you mean `max_pin_cache_seconds`"),
            "{err}"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("policy.toml");
        std::fs::write(&file, "max_pin_cache_seconds = 0\n").expect("write");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        let err = Loaded::from_file(&file)
            .expect_err("world-writable")
            .to_string();
        assert!(err.contains("writable by its group or everyone"), "{err}");
        assert!(Loaded::from_file(&dir.path().join("none.toml"))
            .expect("missing is no policy")
            .file
            .is_none());
    }
}
