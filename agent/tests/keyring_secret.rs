//! The audit key from a real Secret Service (gnome-keyring on a private D-Bus session) and
//! from a file.
//!
//! Run with `scripts/with-keyring.sh cargo test -p agent --test keyring_secret`.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use agent::audit::AuditKey;
use agent::secrets::{audit_key, AuditKeySource, SecretsError};

const CHILD_ENV: &str = "KEYPORT_TEST_NO_DBUS_CHILD";

fn require_secret_service() {
    assert!(
        std::env::var_os("DBUS_SESSION_BUS_ADDRESS").is_some(),
        "this test needs a real Secret Service: run it under scripts/with-keyring.sh, e.g. \
         `scripts/with-keyring.sh cargo test -p agent --test keyring_secret`"
    );
}

fn unique_user(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos();
    format!("audit-key-test-{tag}-{}-{nanos}", std::process::id())
}

fn secret_tool_lookup(service: &str, user: &str) -> Option<String> {
    let out = Command::new("secret-tool")
        .args(["lookup", "service", service, "username", user])
        .output()
        .expect("spawn secret-tool");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

#[test]
fn keyring_creates_once_then_returns_the_same_key() {
    require_secret_service();
    let service = "keyport-test".to_owned();
    let user = unique_user("a");
    let source = AuditKeySource::Keyring {
        service: service.clone(),
        user: user.clone(),
    };

    let first = audit_key(&source).expect("first call creates the key");
    let second = audit_key(&source).expect("second call reads it");
    assert_eq!(first.fingerprint(), second.fingerprint());

    // Another user name is another entry, so another key.
    let other_source = AuditKeySource::Keyring {
        service: service.clone(),
        user: unique_user("b"),
    };
    let other = audit_key(&other_source).expect("other user");
    assert_ne!(first.fingerprint(), other.fingerprint());

    // The Secret Service really holds it, as 64 hex digits, and it is the key we were given.
    // (zbus-secret-service-keyring-store stores the attributes `service` and `username`.)
    let stored = secret_tool_lookup(&service, &user);
    let stored = stored.expect("secret-tool finds the entry in the Secret Service");
    assert_eq!(stored.len(), 64, "stored as hex of 32 bytes");
    let from_store = AuditKey::new(hex::decode(&stored).expect("hex")).expect("key");
    assert_eq!(from_store.fingerprint(), first.fingerprint());

    for s in [&source, &other_source] {
        if let AuditKeySource::Keyring { service, user } = s {
            keyring::Entry::new(service, user)
                .and_then(|e| e.delete_credential())
                .expect("clean up");
        }
    }
}

#[test]
fn keyring_entry_with_foreign_content_is_not_overwritten() {
    require_secret_service();
    let service = "keyport-test";
    let user = unique_user("foreign");
    let entry = keyring::Entry::new(service, &user).expect("entry");
    entry.set_password("not a hex key").expect("set");
    let err = audit_key(&AuditKeySource::Keyring {
        service: service.to_owned(),
        user: user.clone(),
    })
    .expect_err("foreign content refused");
    assert!(matches!(err, SecretsError::BadStoredKey { .. }), "{err:?}");
    assert_eq!(entry.get_password().expect("still there"), "not a hex key");
    entry.delete_credential().expect("clean up");
}

/// Without a session bus the keyring store cannot start, and the process remembers that, so
/// this runs in a child process with the bus address removed.
#[test]
fn no_session_bus_gives_no_keyring() {
    let runtime = tempfile::tempdir().expect("tempdir");
    let out = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--ignored", "--exact", "child_without_dbus", "--nocapture"])
        .env_remove("DBUS_SESSION_BUS_ADDRESS")
        // zbus falls back to $XDG_RUNTIME_DIR/bus: point it at an empty directory.
        .env("XDG_RUNTIME_DIR", runtime.path())
        .env(CHILD_ENV, "1")
        .output()
        .expect("spawn child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("1 passed"),
        "the child test did not run:\n{stdout}"
    );
}

#[test]
#[ignore = "run by no_session_bus_gives_no_keyring in a child process"]
fn child_without_dbus() {
    assert_eq!(
        std::env::var(CHILD_ENV).as_deref(),
        Ok("1"),
        "only run as a child"
    );
    assert!(std::env::var_os("DBUS_SESSION_BUS_ADDRESS").is_none());
    let err = audit_key(&AuditKeySource::default()).expect_err("no keyring without a bus");
    assert!(matches!(err, SecretsError::NoKeyring { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("audit_key_file"), "{msg}");
}

fn write_key_file(dir: &std::path::Path, len: usize, mode: u32) -> std::path::PathBuf {
    let path = dir.join(format!("key-{len}-{mode:o}"));
    let bytes: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
    std::fs::write(&path, bytes).expect("write");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    path
}

#[test]
fn key_file_readable_by_others_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    for mode in [0o644, 0o640, 0o604] {
        let path = write_key_file(dir.path(), 32, mode);
        let err = audit_key(&AuditKeySource::File(path)).expect_err("loose mode refused");
        assert!(
            matches!(err, SecretsError::FileMode { mode: m, .. } if m == mode),
            "{err:?}"
        );
        assert!(err.to_string().contains(&format!("{mode:04o}")), "{err}");
    }
}

#[test]
fn short_key_file_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_key_file(dir.path(), 16, 0o600);
    let err = audit_key(&AuditKeySource::File(path)).expect_err("short refused");
    assert!(
        matches!(err, SecretsError::FileTooShort { len: 16, .. }),
        "{err:?}"
    );
}

#[test]
fn key_file_of_32_bytes_mode_0600_is_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_key_file(dir.path(), 32, 0o600);
    let key = audit_key(&AuditKeySource::File(path.clone())).expect("accepted");
    let expected = AuditKey::new(std::fs::read(&path).expect("read")).expect("key");
    assert_eq!(key.fingerprint(), expected.fingerprint());
    let missing = audit_key(&AuditKeySource::File(dir.path().join("absent")));
    assert!(matches!(missing, Err(SecretsError::File { .. })));
}
