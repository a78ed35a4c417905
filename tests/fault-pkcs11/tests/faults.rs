//! Loads the built fault module with `cryptoki`, over a token made by softhsm-config/provision.sh,
//! and checks that each fault the control file asks for reaches the caller.
//!
//! The module is one instance per process (like SoftHSM behind it), so all tests share one
//! loaded module and take turns through a lock; each sets its own control file contents.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

const TOKEN_LABEL: &str = "KeyPort Test";
const USER_PIN: &str = "123456";
const DIGEST: [u8; 32] = [0x5a; 32];

struct Rig {
    pkcs11: Pkcs11,
    slot: Slot,
    dir: PathBuf,
    control: PathBuf,
    log: PathBuf,
}

/// The shared rig, and the lock that gives one test at a time the control file and the log.
fn rig() -> (&'static Rig, MutexGuard<'static, ()>) {
    static RIG: OnceLock<Rig> = OnceLock::new();
    static TURN: Mutex<()> = Mutex::new(());
    let turn = TURN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let rig = RIG.get_or_init(Rig::new);
    rig.clear_control();
    std::fs::write(&rig.log, "").expect("truncate call log");
    (rig, turn)
}

impl Rig {
    fn new() -> Self {
        // Kept for the whole run (the module reads it until the process exits); it lives under
        // cargo's target/tmp, not in the system temp directory.
        let dir = tempfile::Builder::new()
            .prefix("fault-pkcs11-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .expect("temp dir")
            .keep();
        provision(&dir);
        let control = dir.join("control");
        let log = dir.join("calls.log");
        // Set before the module is loaded and before any other test thread gets past the lock.
        std::env::set_var("SOFTHSM2_CONF", dir.join("softhsm2.conf"));
        std::env::set_var("KEYPORT_FAULT_CONTROL", &control);
        std::env::set_var("KEYPORT_FAULT_LOG", &log);

        let pkcs11 = Pkcs11::new(module_path()).expect("load the fault module");
        pkcs11
            .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .expect("C_Initialize through the fault module");
        let slot = find_slot(&pkcs11).expect("the provisioned token is visible");
        Self {
            pkcs11,
            slot,
            dir,
            control,
            log,
        }
    }

    /// Replaces the control file atomically, so the module never reads half a file.
    fn set_control(&self, text: &str) {
        let next = self.dir.join("control.next");
        std::fs::write(&next, text).expect("write control file");
        std::fs::rename(&next, &self.control).expect("replace control file");
    }

    fn clear_control(&self) {
        match std::fs::remove_file(&self.control) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("remove control file: {e}"),
        }
    }

    fn log_lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .expect("read call log")
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// A session logged in as the user. Login is per application, so first undo any login a
    /// failed earlier test may have left behind.
    fn user_session(&self) -> Session {
        let session = self
            .pkcs11
            .open_rw_session(self.slot)
            .expect("open session");
        let _ = session.logout();
        session
            .login(UserType::User, Some(&AuthPin::from(USER_PIN)))
            .expect("log in");
        session
    }
}

fn provision(dir: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../softhsm-config/provision.sh");
    let output = Command::new(&script)
        .arg(dir)
        .output()
        .expect("run provision.sh");
    assert!(
        output.status.success(),
        "provision.sh failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The module cargo built for this test run. `cargo test` leaves it in target/<profile>/deps/,
/// beside this test binary; `cargo build` also places it in target/<profile>/.
fn module_path() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let deps = exe
        .parent()
        .expect("test binary lives in target/<profile>/deps");
    let candidates = [
        deps.to_path_buf(),
        deps.parent().unwrap_or(deps).to_path_buf(),
    ];
    candidates
        .iter()
        .map(|dir| dir.join("libkeyport_fault_pkcs11.so"))
        .find(|module| module.exists())
        .unwrap_or_else(|| {
            panic!(
                "libkeyport_fault_pkcs11.so not found near {}",
                exe.display()
            )
        })
}

fn find_slot(pkcs11: &Pkcs11) -> Option<Slot> {
    pkcs11
        .get_slots_with_token()
        .expect("C_GetSlotList")
        .into_iter()
        .find(|slot| {
            pkcs11
                .get_token_info(*slot)
                .is_ok_and(|info| info.label() == TOKEN_LABEL)
        })
}

fn private_key(session: &Session, label: &str) -> ObjectHandle {
    let found = session
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .expect("find private key");
    assert_eq!(found.len(), 1, "exactly one private key labelled {label}");
    found[0]
}

fn public_key(session: &Session, label: &str) -> ObjectHandle {
    let found = session
        .find_objects(&[
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .expect("find public key");
    assert_eq!(found.len(), 1, "exactly one public key labelled {label}");
    found[0]
}

fn rv_of<T: std::fmt::Debug>(result: Result<T, Error>) -> RvError {
    match result {
        Err(Error::Pkcs11(rv, _)) => rv,
        other => panic!("expected a PKCS#11 error, got {other:?}"),
    }
}

#[test]
fn pin_locked_sets_the_flag_and_refuses_login() {
    let (rig, _turn) = rig();
    let session = rig.pkcs11.open_rw_session(rig.slot).expect("open session");
    let _ = session.logout();

    rig.set_control("pin_locked=1\n");
    let info = rig.pkcs11.get_token_info(rig.slot).expect("token info");
    assert!(info.user_pin_locked());
    let login = session.login(UserType::User, Some(&AuthPin::from(USER_PIN)));
    assert_eq!(rv_of(login), RvError::PinLocked);

    // Re-read on every call: the same process sees the token unlocked again.
    rig.clear_control();
    let info = rig.pkcs11.get_token_info(rig.slot).expect("token info");
    assert!(!info.user_pin_locked());
    session
        .login(UserType::User, Some(&AuthPin::from(USER_PIN)))
        .expect("login once the fault is gone");
    session.logout().expect("logout");
}

#[test]
fn pin_count_low_and_final_try_are_reported() {
    let (rig, _turn) = rig();
    rig.set_control("pin_count_low=1\npin_final_try=1\n");
    let info = rig.pkcs11.get_token_info(rig.slot).expect("token info");
    assert!(info.user_pin_count_low());
    assert!(info.user_pin_final_try());
    assert!(!info.user_pin_locked());

    rig.clear_control();
    let info = rig.pkcs11.get_token_info(rig.slot).expect("token info");
    assert!(!info.user_pin_final_try());
}

#[test]
fn pin_pad_mode_reports_the_flag_and_answers_a_login_with_no_pin() {
    let (rig, _turn) = rig();
    let session = rig.pkcs11.open_rw_session(rig.slot).expect("open session");
    let _ = session.logout();
    std::fs::write(&rig.log, "").expect("truncate call log");

    rig.set_control("pin_pad=1\npin_pad_entry=cancel\n");
    let info = rig.pkcs11.get_token_info(rig.slot).expect("token info");
    assert!(info.protected_authentication_path());
    assert_eq!(
        rv_of(session.login(UserType::User, None)),
        RvError::FunctionCanceled
    );

    rig.set_control("pin_pad=1\npin_pad_entry=000000\n");
    assert_eq!(
        rv_of(session.login(UserType::User, None)),
        RvError::PinIncorrect
    );

    rig.set_control(&format!(
        "pin_pad=1\npin_pad_entry={USER_PIN}\npin_pad_delay_ms=100\n"
    ));
    let t = std::time::Instant::now();
    session
        .login(UserType::User, None)
        .expect("the pad's PIN logs in");
    assert!(t.elapsed() >= Duration::from_millis(100));
    session.logout().expect("logout");

    rig.clear_control();
    let info = rig.pkcs11.get_token_info(rig.slot).expect("token info");
    assert!(!info.protected_authentication_path());
    let logins: Vec<String> = rig
        .log_lines()
        .into_iter()
        .filter(|l| l.starts_with("C_Login "))
        .collect();
    assert_eq!(
        logins,
        [
            "C_Login CKU_USER null-pin rv=0x00000050",
            "C_Login CKU_USER null-pin rv=0x000000A0",
            "C_Login CKU_USER null-pin rv=0x00000000"
        ]
    );
}

#[test]
fn call_log_counts_every_login() {
    let (rig, _turn) = rig();
    let session = rig.pkcs11.open_rw_session(rig.slot).expect("open session");
    let _ = session.logout();
    std::fs::write(&rig.log, "").expect("truncate call log");

    for _ in 0..2 {
        let wrong = session.login(UserType::User, Some(&AuthPin::from("000000")));
        assert_eq!(rv_of(wrong), RvError::PinIncorrect);
    }
    session
        .login(UserType::User, Some(&AuthPin::from(USER_PIN)))
        .expect("login");

    let lines = rig.log_lines();
    let logins: Vec<&str> = lines
        .iter()
        .map(String::as_str)
        .filter(|line| line.starts_with("C_Login "))
        .collect();
    assert_eq!(
        logins,
        [
            "C_Login CKU_USER pin rv=0x000000A0",
            "C_Login CKU_USER pin rv=0x000000A0",
            "C_Login CKU_USER pin rv=0x00000000"
        ]
    );
    assert!(
        !lines.iter().any(|line| line.contains(USER_PIN)),
        "the log never holds a PIN"
    );
    session.logout().expect("logout");
}

#[test]
fn token_removed_hides_the_token_and_fails_sessions() {
    let (rig, _turn) = rig();
    let session = rig.user_session();
    let key = private_key(&session, "sign-p256");

    rig.set_control("token_removed=1\n");
    assert!(!rig
        .pkcs11
        .get_slots_with_token()
        .expect("slot list")
        .contains(&rig.slot));
    assert!(rig
        .pkcs11
        .get_all_slots()
        .expect("all slots")
        .contains(&rig.slot));
    let slot_info = rig.pkcs11.get_slot_info(rig.slot).expect("slot info");
    assert!(!slot_info.token_present());
    assert_eq!(
        rv_of(rig.pkcs11.get_token_info(rig.slot)),
        RvError::TokenNotPresent
    );
    assert_eq!(
        rv_of(rig.pkcs11.open_ro_session(rig.slot)),
        RvError::TokenNotPresent
    );
    assert_eq!(
        rv_of(session.sign(&Mechanism::Ecdsa, key, &DIGEST)),
        RvError::DeviceRemoved
    );
    assert_eq!(rv_of(session.get_session_info()), RvError::DeviceRemoved);

    // "Re-inserted": the slot and the existing session work again.
    rig.clear_control();
    assert_eq!(find_slot(&rig.pkcs11), Some(rig.slot));
    session
        .sign(&Mechanism::Ecdsa, key, &DIGEST)
        .expect("sign after re-insertion");
    session.logout().expect("logout");
}

#[test]
fn fail_sign_after_n_fails_later_signatures_with_device_error() {
    let (rig, _turn) = rig();
    let session = rig.user_session();
    let key = private_key(&session, "sign-p256");
    let public = public_key(&session, "sign-p256");

    rig.set_control("fail_sign_after=2\n");
    for _ in 0..2 {
        let signature = session
            .sign(&Mechanism::Ecdsa, key, &DIGEST)
            .expect("signature within the allowance");
        session
            .verify(&Mechanism::Ecdsa, public, &DIGEST, &signature)
            .expect("a real signature");
    }
    for _ in 0..2 {
        assert_eq!(
            rv_of(session.sign(&Mechanism::Ecdsa, key, &DIGEST)),
            RvError::DeviceError
        );
    }

    // The failed operations were finished in SoftHSM: signing works once the fault is gone.
    rig.clear_control();
    session
        .sign(&Mechanism::Ecdsa, key, &DIGEST)
        .expect("sign after the fault is cleared");
    // Each cryptoki sign is two C_Sign calls: a length query and the signature.
    let failures = rig
        .log_lines()
        .iter()
        .filter(|line| *line == "C_Sign rv=0x00000030")
        .count();
    assert_eq!(failures, 2);
    session.logout().expect("logout");
}

#[test]
fn hang_sign_blocks_until_the_control_file_releases_it() {
    let (rig, _turn) = rig();
    let session = rig.user_session();
    let key = private_key(&session, "sign-p256");

    rig.set_control("hang_sign=1\n");
    let (done, finished) = mpsc::channel();
    let signer = std::thread::spawn(move || {
        let result = session.sign(&Mechanism::Ecdsa, key, &DIGEST);
        done.send(result.is_ok()).expect("report result");
        session
    });
    assert_eq!(
        finished.recv_timeout(Duration::from_millis(500)),
        Err(mpsc::RecvTimeoutError::Timeout),
        "C_Sign returned while hang_sign=1"
    );

    rig.clear_control();
    assert_eq!(finished.recv_timeout(Duration::from_secs(10)), Ok(true));
    let session = signer.join().expect("signer thread");
    session.logout().expect("logout");
}

#[test]
fn crash_on_aborts_the_calling_process() {
    let (rig, _turn) = rig();
    // A separate process, with its own control file and log, so this one survives.
    let control = rig.dir.join("crash.control");
    let log = rig.dir.join("crash.log");
    std::fs::write(&control, "crash_on=C_Login\n").expect("write crash control");
    let status = Command::new("pkcs11-tool")
        .arg("--module")
        .arg(module_path())
        .args([
            "--token-label",
            TOKEN_LABEL,
            "--login",
            "--pin",
            USER_PIN,
            "-O",
        ])
        .env("SOFTHSM2_CONF", rig.dir.join("softhsm2.conf"))
        .env("KEYPORT_FAULT_CONTROL", &control)
        .env("KEYPORT_FAULT_LOG", &log)
        .output()
        .expect("run pkcs11-tool")
        .status;
    use std::os::unix::process::ExitStatusExt as _;
    assert_eq!(status.signal(), Some(6), "SIGABRT, got {status:?}");
    let lines = std::fs::read_to_string(&log).expect("read crash log");
    assert_eq!(lines.lines().last(), Some("C_Login crash"));
}
