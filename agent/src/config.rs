//! The agent's configuration: a TOML file read into a strict serde struct (an unknown key, or a
//! PIN, is refused) whose enums and limits are then checked by `Config::validate`. Every default
//! lives in `Config::default()`; nothing else invents one.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use browser_bridge::Origin;
use serde::Deserialize;

/// Where the configuration and the files beside it live.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The configuration file (it may not exist: then every default applies).
    pub config_file: PathBuf,
    /// The folder of the configuration file: the user's origin decisions are kept here.
    pub config_dir: PathBuf,
    /// The folder for the audit log and the demo token.
    pub data_dir: PathBuf,
}

impl Paths {
    /// The OS's per-user folders (`~/.config/keyport`, `~/.local/share/keyport` on Linux). An
    /// explicit `--config FILE` moves the configuration (and the origin decisions beside it),
    /// never the data folder: the audit log and demo token stay where `audit_log` or the OS
    /// put them.
    pub fn resolve(explicit: Option<&Path>) -> Result<Paths, ConfigError> {
        let dirs = directories::ProjectDirs::from("org", "KeyPort", "keyport")
            .ok_or(ConfigError::NoHome)?;
        let data_dir = dirs.data_dir().to_path_buf();
        match explicit {
            Some(file) => {
                let dir = file
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| PathBuf::from("."));
                Ok(Paths {
                    config_file: file.to_path_buf(),
                    config_dir: dir,
                    data_dir,
                })
            }
            None => Ok(Paths {
                config_file: dirs.config_dir().join("config.toml"),
                config_dir: dirs.config_dir().to_path_buf(),
                data_dir,
            }),
        }
    }

    /// The user's persisted origin decisions.
    pub fn origins_file(&self) -> PathBuf {
        self.config_dir.join("origins.toml")
    }
}

/// What the agent does with an origin that is on neither list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownOrigins {
    /// Ask the user (allow once / always / deny).
    Prompt,
    /// Enterprise policy: refuse at the handshake.
    Reject,
    /// Enterprise policy, but let the portal say why: connect, `hello` answers
    /// `originApproved: false`, every other call fails with ORIGIN_NOT_APPROVED and no dialog is
    /// ever shown. (A handshake refusal reaches the page as a failed connection, which reads
    /// like "KeyPort is not running".)
    Unapproved,
}

/// Which certificates may make document signatures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SigningKeyUsage {
    /// keyUsage nonRepudiation, or no keyUsage extension at all.
    NonRepudiation,
    /// Also certificates with digitalSignature only; never a clientAuth one (see purpose.rs).
    Any,
}

/// How often an origin's user is asked to consent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsentMode {
    /// Every request (the default).
    Request,
    /// Once per connection: for an administrator's known internal portal.
    Session,
}

/// A PKCS#11 module (`[[modules]]`) or SKF library (`[[skf_modules]]`) named in the
/// configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModuleConfig {
    pub path: PathBuf,
}

/// Per-origin policy set by an administrator.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OriginPolicy {
    pub origin: String,
    pub consent: ConsentMode,
}

/// An extra ATR pattern → module mapping (added to the shipped table).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AtrEntry {
    /// Hex, spaces or colons allowed.
    pub atr: String,
    /// Hex mask, same length as `atr`; all ones when absent.
    pub mask: Option<String>,
    pub name: String,
    pub module: PathBuf,
}

/// Server limits (docs/protocol.md "Limits").
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub max_message_bytes: usize,
    pub max_connections_per_origin: usize,
    pub max_connections: usize,
    pub requests_per_second: u32,
    pub handshake_timeout_seconds: u64,
    /// Connections of all origins not approved, together (less than `max_connections`, so an
    /// approved origin always finds room).
    pub max_unapproved_connections: usize,
    /// A connection of an origin not approved, idle this long, is closed.
    pub unapproved_idle_seconds: u64,
    /// Accepted connections still in their HTTP handshake.
    pub max_pending_handshakes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_message_bytes: 256 * 1024,
            max_connections_per_origin: 8,
            max_connections: 64,
            requests_per_second: 20,
            handshake_timeout_seconds: 5,
            max_unapproved_connections: 8,
            unapproved_idle_seconds: 30,
            max_pending_handshakes: 16,
        }
    }
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// TCP port on 127.0.0.1 and [::1].
    pub port: u16,
    /// PKCS#11 modules to load before any discovered one.
    pub modules: Vec<ModuleConfig>,
    /// Look for modules beyond `modules` (p11-kit, well-known paths) and SKF libraries beyond
    /// `skf_modules` (the shipped table of vendor libraries).
    pub discover_modules: bool,
    /// SKF (GM/T 0016) libraries to load before the table's.
    pub skf_modules: Vec<ModuleConfig>,
    /// The pinentry program for every dialog.
    pub pinentry: Option<PathBuf>,
    /// `en` or `zh-CN`; otherwise the locale decides.
    pub language: Option<String>,
    /// Keep a token logged in this long after a request; 0 logs out after each request. PKCS#11
    /// only: an SKF key's PIN verification is cleared after every request, since SKF cannot tell
    /// whether a verification still holds.
    pub pin_cache_seconds: u64,
    /// How long a dialog may stay open.
    pub dialog_timeout_seconds: u64,
    /// The longest wait for a token's module to answer (a listing, a login check, the start of
    /// a signature); past it the request is BUSY and a listing goes on without that module.
    pub token_wait_seconds: u64,
    /// Load each PKCS#11 module and SKF library in a host (a child process), so that a
    /// library that crashes, hangs or deadlocks never takes the agent with it. `false`: in the
    /// agent's own process (for debugging, and what the tests compare against).
    pub module_isolation: bool,
    pub allowed_origins: Vec<String>,
    pub denied_origins: Vec<String>,
    pub unknown_origins: UnknownOrigins,
    pub allow_insecure_localhost_origins: bool,
    pub signing_key_usage: SigningKeyUsage,
    /// Certificates (lowercase hex SHA-256 of the DER) that may both sign documents and log in:
    /// any site could then turn a "document" signature into a login elsewhere (see purpose.rs).
    pub dual_use_certificates: Vec<String>,
    pub origin_policy: Vec<OriginPolicy>,
    /// A file of mode 0600 holding at least 32 random bytes: the audit key when no OS keyring exists.
    pub audit_key_file: Option<PathBuf>,
    /// Where the audit log is written; default `DATA_DIR/audit.log`.
    pub audit_log: Option<PathBuf>,
    /// The OS keyring service name under which the agent keeps its own secrets.
    pub keyring_service: String,
    /// Send every audit record to the system journal too, when its socket exists.
    pub audit_journal: bool,
    pub atr: Vec<AtrEntry>,
    pub limits: LimitsConfig,
    /// Set by the administrator's policy (`skf_libraries`), never by the file: `skf_modules` are
    /// the only SKF libraries that load (the vendor table is not searched).
    #[serde(skip)]
    pub skf_libraries_fixed: bool,
    /// Set by the administrator's policy (`crate::policy`), never by the file: the only origins
    /// that may be approved, when the policy says so.
    #[serde(skip)]
    pub origin_ceiling: Option<std::collections::BTreeSet<String>>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            port: 47333,
            modules: Vec::new(),
            discover_modules: true,
            skf_modules: Vec::new(),
            pinentry: None,
            language: None,
            pin_cache_seconds: 0,
            dialog_timeout_seconds: 120,
            token_wait_seconds: 30,
            module_isolation: true,
            allowed_origins: Vec::new(),
            denied_origins: Vec::new(),
            unknown_origins: UnknownOrigins::Prompt,
            allow_insecure_localhost_origins: false,
            signing_key_usage: SigningKeyUsage::NonRepudiation,
            dual_use_certificates: Vec::new(),
            origin_policy: Vec::new(),
            audit_key_file: None,
            audit_log: None,
            keyring_service: "keyport".into(),
            audit_journal: true,
            atr: Vec::new(),
            limits: LimitsConfig::default(),
            skf_libraries_fixed: false,
            origin_ceiling: None,
        }
    }
}

impl Config {
    /// Reads the file; a missing file gives the defaults, anything else wrong is an error.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = match crate::files::read_private_config(path) {
            Ok(text) => text,
            Err(crate::files::ReadError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Config::default())
            }
            Err(crate::files::ReadError::Io(source)) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
            Err(crate::files::ReadError::Unsafe(message)) => {
                return Err(ConfigError::Unsafe(message))
            }
        };
        Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            ConfigError::Pin { key, .. } => ConfigError::Pin {
                path: path.to_path_buf(),
                key,
            },
            other => other,
        })
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        // A PIN is refused as such, before serde would call it an unknown field (and before a
        // parser message could quote the line that holds it).
        if let Ok(table) = text.parse::<toml::Table>() {
            // A misspelt setting is an unknown key with the one meant, even when it holds a
            // word like `pin` (`pin_cache_secs`).
            let known = crate::config_keys::fields::<Config>();
            for key in table.keys().filter(|k| !known.contains(&k.as_str())) {
                if let Some(meant) = crate::config_keys::nearest(key, known) {
                    return Err(ConfigError::Parse {
                        path: PathBuf::new(),
                        message: format!("unknown key `{key}`: did you mean `{meant}`?"),
                    });
                }
            }
            if let Some(key) = pin_key(&table) {
                return Err(ConfigError::Pin {
                    path: PathBuf::new(),
                    key,
                });
            }
        }
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        // The handshake's own parser: an origin written here either is exactly what a browser
        // sends, and so can match, or the agent does not start.
        for origin in self
            .allowed_origins
            .iter()
            .chain(&self.denied_origins)
            .chain(self.origin_policy.iter().map(|p| &p.origin))
        {
            Origin::parse(origin, self.allow_insecure_localhost_origins).map_err(|e| {
                ConfigError::Invalid(format!(
                    "{origin:?} is not an origin as a browser sends it ({e}): write \
                     https://host or https://host:port, the host in lower case (IDNs as \
                     punycode), no default port, nothing after"
                ))
            })?;
        }
        if let Some(bad) = self
            .dual_use_certificates
            .iter()
            .find(|f| f.len() != 64 || !f.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(ConfigError::Invalid(format!(
                "dual_use_certificates: {bad:?} is not a SHA-256 fingerprint (64 hex digits; \
                 openssl x509 -in CERT.pem -outform DER | sha256sum)"
            )));
        }
        if self.limits.max_unapproved_connections >= self.limits.max_connections {
            return Err(ConfigError::Invalid(
                "limits.max_unapproved_connections must be less than limits.max_connections, so \
                 approved origins always find room"
                    .into(),
            ));
        }
        if self.limits.unapproved_idle_seconds == 0 || self.limits.max_pending_handshakes == 0 {
            return Err(ConfigError::Invalid(
                "limits.unapproved_idle_seconds and limits.max_pending_handshakes must be at \
                 least 1"
                    .into(),
            ));
        }
        if self.limits.max_message_bytes < 1024 {
            return Err(ConfigError::Invalid(
                "limits.max_message_bytes must be at least 1024".into(),
            ));
        }
        if self.limits.requests_per_second == 0 || self.limits.max_connections == 0 {
            return Err(ConfigError::Invalid(
                "limits must allow at least one connection and one request per second".into(),
            ));
        }
        if self.dialog_timeout_seconds == 0 {
            return Err(ConfigError::Invalid(
                "dialog_timeout_seconds must be at least 1".into(),
            ));
        }
        if self.token_wait_seconds == 0 {
            return Err(ConfigError::Invalid(
                "token_wait_seconds must be at least 1".into(),
            ));
        }
        Ok(())
    }

    pub fn dialog_timeout(&self) -> Duration {
        Duration::from_secs(self.dialog_timeout_seconds)
    }

    /// How long a call waits for a token's module (`token_wait_seconds`).
    pub fn token_wait(&self) -> Duration {
        Duration::from_secs(self.token_wait_seconds)
    }

    pub fn consent_mode(&self, origin: &str) -> ConsentMode {
        self.origin_policy
            .iter()
            .find(|p| p.origin == origin)
            .map_or(ConsentMode::Request, |p| p.consent)
    }
}

/// The first key, at any depth, that names a PIN, PUK or password (`pin`, `user_pin`, `so-pin`,
/// `puk`), dotted from the top. `pin_cache_seconds` is a duration, not a PIN.
fn pin_key(table: &toml::Table) -> Option<String> {
    const SECRET_WORDS: &[&str] = &["pin", "pins", "pincode", "puk", "password", "passphrase"];
    for (key, value) in table {
        let lower = key.to_ascii_lowercase();
        let secret = lower != "pin_cache_seconds"
            && lower
                .split(['_', '-', '.'])
                .any(|word| SECRET_WORDS.contains(&word));
        if secret {
            return Some(key.clone());
        }
        let nested: Vec<&toml::Table> = match value {
            toml::Value::Table(t) => vec![t],
            toml::Value::Array(items) => items.iter().filter_map(toml::Value::as_table).collect(),
            _ => Vec::new(),
        };
        if let Some(inner) = nested.into_iter().find_map(pin_key) {
            return Some(format!("{key}.{inner}"));
        }
    }
    None
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot find the home directory to place the configuration in")]
    NoHome,
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {message}", DisplayPath(path))]
    Parse { path: PathBuf, message: String },
    /// A PIN (or PUK, or password) written into the file; its value is never repeated.
    #[error(
        "{}: `{key}`: a PIN never belongs in the configuration; KeyPort asks for it in a \
         dialog each time a token needs it",
        DisplayPath(path)
    )]
    Pin { path: PathBuf, key: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// The file could be changed by someone else (see `files::read_private_config`).
    #[error("{0}")]
    Unsafe(String),
}

struct DisplayPath<'a>(&'a Path);

impl fmt::Display for DisplayPath<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.as_os_str().is_empty() {
            f.write_str("configuration")
        } else {
            write!(f, "{}", self.0.display())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_text_gives_the_defaults() {
        let config = Config::parse("").expect("empty config parses");
        assert_eq!(config, Config::default());
        assert_eq!(config.port, 47333);
        assert_eq!(config.unknown_origins, UnknownOrigins::Prompt);
    }

    #[test]
    fn a_full_config_parses() {
        let config = Config::parse(
            r#"
            port = 50000
            pinentry = "/usr/bin/pinentry-tty"
            language = "zh-CN"
            pin_cache_seconds = 60
            allowed_origins = ["https://portal.example"]
            denied_origins = ["https://evil.example"]
            unknown_origins = "reject"
            signing_key_usage = "any"
            [[modules]]
            path = "/usr/lib/softhsm/libsofthsm2.so"
            [[origin_policy]]
            origin = "https://intranet.example"
            consent = "session"
            [limits]
            requests_per_second = 5
            "#,
        )
        .expect("config parses");
        assert_eq!(config.port, 50000);
        assert_eq!(config.modules.len(), 1);
        assert_eq!(config.unknown_origins, UnknownOrigins::Reject);
        assert_eq!(config.signing_key_usage, SigningKeyUsage::Any);
        assert_eq!(config.limits.requests_per_second, 5);
        assert_eq!(config.limits.max_connections, 64);
        assert_eq!(
            config.consent_mode("https://intranet.example"),
            ConsentMode::Session
        );
        assert_eq!(
            config.consent_mode("https://portal.example"),
            ConsentMode::Request
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = Config::parse("prot = 1").expect_err("typo refused");
        assert!(err.to_string().contains("prot"), "{err}");
    }

    #[test]
    fn a_pin_in_config_is_refused() {
        assert!(Config::parse("pin = \"123456\"").is_err());
    }

    #[test]
    fn a_pin_anywhere_is_refused_as_a_pin_without_its_value() {
        for (text, key) in [
            ("pin = \"123456\"", "pin"),
            ("user_pin = 123456", "user_pin"),
            ("[limits]\nso-pin = \"123456\"", "limits.so-pin"),
            ("[[modules]]\npath = \"/m.so\"\nPIN = \"123456\"", "modules.PIN"),
            ("[[origin_policy]]\norigin = \"https://a.example\"\nconsent = \"session\"\npuk = \"12345678\"", "origin_policy.puk"),
        ] {
            let err = Config::parse(text).expect_err(text).to_string();
            assert!(
                err.contains(&format!("`{key}`: a PIN never belongs in the configuration")),
                "{text}: {err}"
            );
            assert!(!err.contains("123456"), "the value is not repeated: {err}");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("config.toml");
        std::fs::write(&file, "pin = \"123456\"").expect("write");
        let err = Config::load(&file).expect_err("refused").to_string();
        assert!(
            err.starts_with(&format!("{}: `pin`", file.display())),
            "{err}"
        );
    }

    #[test]
    fn keys_that_only_look_like_a_pin_are_not_called_one() {
        Config::parse("pin_cache_seconds = 30\npinentry = \"/usr/bin/pinentry\"")
            .expect("pin cache and pinentry are settings");
        let err = Config::parse("mapping = 1")
            .expect_err("unknown")
            .to_string();
        assert!(!err.contains("PIN"), "{err}");
        assert!(err.contains("mapping"), "{err}");
    }

    #[test]
    fn token_wait_is_read_and_must_be_positive() {
        let config = Config::parse("token_wait_seconds = 2").expect("parses");
        assert_eq!(config.token_wait(), Duration::from_secs(2));
        assert_eq!(Config::default().token_wait(), Duration::from_secs(30));
        let err = Config::parse("token_wait_seconds = 0").expect_err("refused");
        assert!(err.to_string().contains("token_wait_seconds"), "{err}");
    }

    #[test]
    fn malformed_origins_are_refused() {
        for bad in [
            "portal.example",
            "https://portal.example/path",
            "https://",
            "https://Evil.example",
            "https://evil.example:443",
            "https://evil.example/",
            "http://evil.example",
        ] {
            for key in ["allowed_origins", "denied_origins"] {
                let text = format!("{key} = [{bad:?}]");
                let err = Config::parse(&text).expect_err(bad).to_string();
                assert!(err.contains(&format!("{bad:?}")), "{err}");
            }
        }
        Config::parse(r#"denied_origins = ["https://evil.example:8443"]"#).expect("canonical");
        Config::parse(
            "allow_insecure_localhost_origins = true
allowed_origins = [\"http://localhost:3000\"]",
        )
        .expect("insecure localhost when allowed");
    }

    #[test]
    fn the_example_config_parses_and_states_the_defaults() {
        let text = include_str!("../../docs/config.example.toml");
        let config = Config::parse(text).expect("example config parses");
        assert_eq!(
            config,
            Config::default(),
            "the example must show the defaults"
        );
    }

    #[test]
    fn a_missing_file_gives_the_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = Config::load(&dir.path().join("none.toml")).expect("defaults");
        assert_eq!(config, Config::default());
    }
}
