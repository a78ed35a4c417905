//! The agent's own secrets: the key that chains the audit log, kept in the OS keyring.
//!
//! The `keyring` crate (4.x, `v1` feature) picks the platform store once per process: the
//! Secret Service over D-Bus on Linux and the BSDs, Keychain on macOS, Credential Manager on
//! Windows. On Linux it connects to the session bus when the first entry is made; if that
//! fails (no `DBUS_SESSION_BUS_ADDRESS`, no Secret Service daemon) the failure is remembered for
//! the life of the process and [`audit_key`] answers [`SecretsError::NoKeyring`], telling the
//! user to set `audit_key_file` instead. Headless machines can run the agent under
//! `dbus-run-session` with `gnome-keyring-daemon` (see `scripts/with-keyring.sh`).
//!
//! The calls block on D-Bus: call [`audit_key`] at start-up or from `spawn_blocking`, not on a
//! tokio worker.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use rand::TryRng;
use zeroize::Zeroizing;

use crate::audit::AuditKey;

/// Bytes of a newly created audit key.
const KEY_LEN: usize = 32;

/// Errors getting a secret.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    /// No OS keyring can be reached.
    #[error("no OS keyring is available ({reason}); set `audit_key_file` in the config to a file of at least 32 random bytes with mode 0600 (for example: head -c 32 /dev/urandom > FILE && chmod 600 FILE)")]
    NoKeyring {
        /// What the keyring layer said.
        reason: String,
    },
    /// The keyring was reached but refused or failed the operation (locked, platform error).
    #[error("the OS keyring failed to {action} the entry {service}/{user}")]
    Keyring {
        /// `read` or `store`.
        action: &'static str,
        /// The entry's service name.
        service: String,
        /// The entry's user name.
        user: String,
        /// The keyring error.
        #[source]
        source: keyring::Error,
    },
    /// The keyring entry exists but does not hold a key this agent wrote (not hex, or short).
    /// It is not overwritten, since the audit log already written is chained with the old key.
    #[error("the OS keyring entry {service}/{user} does not hold a hex key of at least 32 bytes; delete it only if you accept that the existing audit log can no longer be verified")]
    BadStoredKey {
        /// The entry's service name.
        service: String,
        /// The entry's user name.
        user: String,
    },
    /// The key file may be read by group or others.
    #[error("audit key file {path} has mode {mode:04o}; it must not be readable by group or others (chmod 600 {path})", path = path.display())]
    FileMode {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key file holds fewer than 32 bytes.
    #[error("audit key file {path} holds {len} bytes; at least 32 are needed", path = path.display())]
    FileTooShort {
        /// The file.
        path: PathBuf,
        /// How many bytes it holds.
        len: usize,
    },
    /// The key file cannot be read.
    #[error("cannot read audit key file {path}", path = path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The system random generator failed.
    #[error("the system random generator failed")]
    Random(#[source] rand::rngs::SysError),
}

/// The keyring entry's user name for the audit key.
pub const AUDIT_KEY_USER: &str = "audit-key";

/// Where the audit key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditKeySource {
    /// An OS keyring entry, created with 32 random bytes (stored as hex) if absent.
    Keyring {
        /// The entry's service name (`keyport`).
        service: String,
        /// The entry's user name (`audit-key`).
        user: String,
    },
    /// A file of at least 32 bytes, mode 0600 (no group or other bits); all of it is the key.
    File(PathBuf),
}

impl Default for AuditKeySource {
    /// The keyring entry `keyport` / `audit-key`.
    fn default() -> Self {
        AuditKeySource::Keyring {
            service: "keyport".to_owned(),
            user: AUDIT_KEY_USER.to_owned(),
        }
    }
}

/// Get the audit key from `source`, creating it in the keyring on first use.
pub fn audit_key(source: &AuditKeySource) -> Result<AuditKey, SecretsError> {
    match source {
        AuditKeySource::Keyring { service, user } => keyring_key(service, user),
        AuditKeySource::File(path) => file_key(path),
    }
}

fn keyring_key(service: &str, user: &str) -> Result<AuditKey, SecretsError> {
    let keyring_err = |action, source| SecretsError::Keyring {
        action,
        service: service.to_owned(),
        user: user.to_owned(),
        source,
    };
    let entry = keyring::Entry::new(service, user).map_err(|e| match e {
        keyring::Error::NoDefaultStore => SecretsError::NoKeyring {
            reason: match keyring::Entry::store_status() {
                Err(why) => why.to_string(),
                Ok(()) => e.to_string(),
            },
        },
        other => keyring_err("open", other),
    })?;
    let bad = || SecretsError::BadStoredKey {
        service: service.to_owned(),
        user: user.to_owned(),
    };
    match entry.get_password() {
        Ok(stored) => {
            let stored = Zeroizing::new(stored);
            let bytes = hex::decode(stored.trim()).map_err(|_| bad())?;
            AuditKey::new(bytes).map_err(|_| bad())
        }
        Err(keyring::Error::NoEntry) => {
            let mut bytes = Zeroizing::new(vec![0u8; KEY_LEN]);
            rand::rngs::SysRng
                .try_fill_bytes(&mut bytes)
                .map_err(SecretsError::Random)?;
            let encoded = Zeroizing::new(hex::encode(&*bytes));
            entry
                .set_password(&encoded)
                .map_err(|e| keyring_err("store", e))?;
            tracing::info!(service, user, "created the audit key in the OS keyring");
            // Read back, so that of two agents starting at once both use what is stored.
            let stored = Zeroizing::new(entry.get_password().map_err(|e| keyring_err("read", e))?);
            let bytes = hex::decode(stored.trim()).map_err(|_| bad())?;
            AuditKey::new(bytes).map_err(|_| bad())
        }
        Err(e) => Err(keyring_err("read", e)),
    }
}

fn file_key(path: &std::path::Path) -> Result<AuditKey, SecretsError> {
    let io = |source| SecretsError::File {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mode = file.metadata().map_err(io)?.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(SecretsError::FileMode {
            path: path.to_path_buf(),
            mode,
        });
    }
    let mut bytes = Zeroizing::new(Vec::new());
    file.read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() < KEY_LEN {
        return Err(SecretsError::FileTooShort {
            path: path.to_path_buf(),
            len: bytes.len(),
        });
    }
    // At least 32 bytes, checked above.
    AuditKey::new(bytes.to_vec()).map_err(|_| SecretsError::FileTooShort {
        path: path.to_path_buf(),
        len: bytes.len(),
    })
}
