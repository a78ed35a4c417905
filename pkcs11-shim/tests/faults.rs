//! Locked PIN and token removal, injected by the fault module (tests/fault-pkcs11) sitting
//! between the shim and a private SoftHSM copy. The fault module reads its control file and
//! log path from the process environment on every call, so these tests take turns.

#[path = "support/rig.rs"]
mod rig;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use pkcs11_shim::{
    Credential, EcdsaEncoding, Error, HashAlg, LoadOptions, LoginState, Module, SecretPin,
    SignAlgorithm, SignInput, SignRequest,
};
use rig::{no_pin, openssl_verify, ScriptedPin, SignWith, SOFTHSM, TOKEN_LABEL, USER_PIN};

static TURN: Mutex<()> = Mutex::new(());

struct FaultRig {
    // Dropped in this order: the module (C_Finalize) before its directory, the turn last.
    module: Module,
    dir: tempfile::TempDir,
    control: PathBuf,
    log: PathBuf,
    _turn: MutexGuard<'static, ()>,
}

/// The fault module cargo built for this run (a dev-dependency): target/<profile>/deps/.
fn fault_module() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary");
    let deps = exe.parent().expect("deps dir");
    [
        deps.to_path_buf(),
        deps.parent().unwrap_or(deps).to_path_buf(),
    ]
    .into_iter()
    .map(|d| d.join("libkeyport_fault_pkcs11.so"))
    .find(|p| p.exists())
    .expect("libkeyport_fault_pkcs11.so is built as a dev-dependency")
}

impl FaultRig {
    fn new() -> FaultRig {
        FaultRig::with_options(LoadOptions::default())
    }

    fn with_options(options: LoadOptions) -> FaultRig {
        let turn = TURN.lock().unwrap_or_else(PoisonError::into_inner);
        let dir = tempfile::Builder::new()
            .prefix("shim-fault-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .expect("tempdir");
        let out = std::process::Command::new("bash")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../softhsm-config/provision.sh"))
            .arg(dir.path())
            .output()
            .expect("provision");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let softhsm = dir.path().join("libsofthsm2.so");
        std::fs::copy(SOFTHSM, &softhsm).expect("copy softhsm");
        let fault = dir.path().join("fault.so");
        std::fs::copy(fault_module(), &fault).expect("copy fault module");
        let control = dir.path().join("control");
        let log = dir.path().join("calls.log");
        std::env::set_var("SOFTHSM2_CONF", dir.path().join("softhsm2.conf"));
        std::env::set_var("KEYPORT_FAULT_TARGET", &softhsm);
        std::env::set_var("KEYPORT_FAULT_CONTROL", &control);
        std::env::set_var("KEYPORT_FAULT_LOG", &log);
        let module = Module::load_with(&fault, options).expect("load the fault module");
        FaultRig {
            dir,
            module,
            control,
            log,
            _turn: turn,
        }
    }

    fn set_control(control: &Path, text: &str) {
        let next = control.with_extension("next");
        std::fs::write(&next, text).expect("write control");
        std::fs::rename(&next, control).expect("replace control");
    }

    fn calls(&self, function: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.split_whitespace().next() == Some(function))
            .count()
    }

    fn p256(&self, inputs: Vec<SignInput>) -> SignRequest {
        let token = self
            .module
            .tokens()
            .expect("tokens")
            .into_iter()
            .find(|t| t.label == TOKEN_LABEL)
            .expect("token")
            .id;
        let cert = self
            .module
            .certificates(Some(&token))
            .expect("certs")
            .into_iter()
            .find(|c| c.label == "sign-p256")
            .expect("sign-p256");
        SignRequest {
            certificate: cert.id,
            algorithm: SignAlgorithm::Ecdsa(HashAlg::Sha256, EcdsaEncoding::Der),
            inputs,
            logout_after: false,
        }
    }
}

#[test]
fn locked_pin_fails_without_asking_and_without_c_login() {
    let rig = FaultRig::new();
    FaultRig::set_control(&rig.control, "pin_locked=1\n");
    let req = rig.p256(vec![SignInput::Data(b"x".to_vec())]);
    assert_eq!(
        rig.module
            .login_state(req.certificate.token_id())
            .expect("state"),
        LoginState::Locked
    );
    let f = rig
        .module
        .sign_with(req, no_pin(), None, None)
        .expect_err("locked");
    assert!(matches!(f.error, Error::PinLocked), "{f:?}");
    assert_eq!(rig.calls("C_Login"), 0);
}

#[test]
fn removal_mid_batch_keeps_completed_and_recovers_after_reinsertion() {
    let rig = FaultRig::new();
    // Long enough that the batch still runs when the removal, made on the third progress
    // message, lands (progress is a message now, not a call on the worker).
    let n = 200;
    let msgs: Vec<Vec<u8>> = (0..n).map(|i| (i as u32).to_be_bytes().to_vec()).collect();
    let control = rig.control.clone();
    let (pin, _) = ScriptedPin::right();
    let f = rig
        .module
        .sign_with(
            rig.p256(msgs.iter().cloned().map(SignInput::Data).collect()),
            pin,
            Some(Box::new(move |done, _| {
                if done == 3 {
                    FaultRig::set_control(&control, "token_removed=1\n");
                }
            })),
            None,
        )
        .expect_err("removed");
    assert!(matches!(f.error, Error::TokenNotPresent), "{f:?}");
    // Progress is a message from the worker, so the removal lands after the third signature
    // and before the batch ends, not at an exact item.
    assert!((3..n).contains(&f.completed.len()), "{}", f.completed.len());
    let pem = rig.dir.path().join("certs/sign-p256.pem");
    for (m, s) in msgs.iter().zip(&f.completed) {
        assert!(openssl_verify(&pem, "ecdsa", "sha256", m, s));
    }

    // Reinserted: the dropped session is reopened and the next request works.
    FaultRig::set_control(&rig.control, "");
    let (pin, asked) = ScriptedPin::right();
    let sigs = rig
        .module
        .sign_with(
            rig.p256(vec![SignInput::Data(b"after".to_vec())]),
            pin,
            None,
            None,
        )
        .expect("sign after reinsertion");
    assert!(openssl_verify(&pem, "ecdsa", "sha256", b"after", &sigs[0]));
    assert_eq!(
        asked.lock().expect("log").len(),
        1,
        "a new login after removal"
    );
}

#[test]
fn final_try_flag_reaches_the_provider_after_a_wrong_pin() {
    let rig = FaultRig::new();
    FaultRig::set_control(&rig.control, "pin_count_low=1\npin_final_try=1\n");
    let (pin, asked) = ScriptedPin::new(vec![Some("111111"), None]);
    let f = rig
        .module
        .sign_with(
            rig.p256(vec![SignInput::Data(b"x".to_vec())]),
            pin,
            None,
            None,
        )
        .expect_err("cancelled at the second question");
    assert!(matches!(f.error, Error::UserCancelled), "{f:?}");
    let asked = asked.lock().expect("log").clone();
    let prev = asked[1].previous_error.expect("previous error");
    assert!(prev.final_try && prev.count_low);
    assert_eq!(rig.calls("C_Login"), 1);
}

#[test]
fn a_request_on_a_cached_login_probes_the_token_once() {
    let rig = FaultRig::new();
    let (pin, _) = ScriptedPin::right();
    let req = rig.p256(vec![SignInput::Data(b"first".to_vec())]);
    rig.module
        .sign_with(req.clone(), pin, None, None)
        .expect("first sign logs in");
    let before: Vec<usize> = ["C_GetTokenInfo", "C_Login", "C_SignInit", "C_Sign"]
        .iter()
        .map(|f| rig.calls(f))
        .collect();
    let sigs = rig
        .module
        .sign_with(
            SignRequest {
                inputs: vec![SignInput::Data(b"second".to_vec())],
                ..req
            },
            no_pin(),
            None,
            None,
        )
        .expect("second sign on the cached login");
    let pem = rig.dir.path().join("certs/sign-p256.pem");
    assert!(openssl_verify(&pem, "ecdsa", "sha256", b"second", &sigs[0]));
    let after: Vec<usize> = ["C_GetTokenInfo", "C_Login", "C_SignInit", "C_Sign"]
        .iter()
        .map(|f| rig.calls(f))
        .collect();
    let made: Vec<usize> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    // One health probe, no login, C_SignInit and cryptoki's two C_Sign (length, signature).
    assert_eq!(made, vec![1, 0, 1, 2]);
}

#[test]
fn a_hanging_module_answers_busy_within_the_call_timeout_and_recovers() {
    let timeout = Duration::from_millis(500);
    let rig = FaultRig::with_options(LoadOptions {
        call_timeout: timeout,
    });
    let req = rig.p256(vec![SignInput::Data(b"hung".to_vec())]);
    let token = req.certificate.token_id().clone();
    FaultRig::set_control(&rig.control, "hang_sign=1\n");
    // The first signature logs in and hangs in C_Sign: the call log shows its C_SignInit (a
    // call is logged when it returns, so the hanging C_Sign itself is not there yet).
    let module = rig.module.clone();
    let first = req.clone();
    let signer = std::thread::spawn(move || {
        module.sign(
            first,
            Credential::Pin(SecretPin::from(USER_PIN.to_owned())),
            None,
            None,
        )
    });
    let until = Instant::now() + Duration::from_secs(10);
    while rig.calls("C_SignInit") == 0 {
        assert!(
            Instant::now() < until,
            "the worker never reached C_SignInit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // A second signature is queued behind the hung one: BUSY once it is not started in time.
    let t = Instant::now();
    let (second_pin, second_asked) = ScriptedPin::right();
    let f = rig
        .module
        .sign_with(req, second_pin, None, None)
        .expect_err("not started within the timeout");
    let waited = t.elapsed();
    assert!(matches!(f.error, Error::Busy { .. }), "{f:?}");
    assert!(waited >= timeout && waited < timeout * 4, "{waited:?}");
    assert!(rig.module.is_behind());
    assert_eq!(
        f.error.to_string(),
        "the token's module did not answer within 0.5 s"
    );

    // Every other call waits its own deadline for the worker, then BUSY: nothing hangs.
    let t = Instant::now();
    let e = rig.module.tokens().expect_err("the worker is still hung");
    assert!(matches!(e, Error::Busy { .. }), "{e:?}");
    let e = rig.module.login_state(&token).expect_err("still hung");
    assert!(matches!(e, Error::Busy { .. }), "{e:?}");
    let waited = t.elapsed();
    assert!(waited >= timeout * 2 && waited < timeout * 6, "{waited:?}");

    // Released: the hung signature completes, the one given up on is dropped unsigned, and
    // the module answers again.
    FaultRig::set_control(&rig.control, "");
    let sigs = signer
        .join()
        .expect("signer thread")
        .expect("the hung signature completes once released");
    assert_eq!(sigs.len(), 1);
    let tokens = rig.module.tokens().expect("the module answers again");
    assert!(tokens.iter().any(|t| t.id == token));
    assert!(!rig.module.is_behind());
    assert!(second_asked.lock().expect("log").is_empty());
    assert_eq!(rig.calls("C_SignInit"), 1, "the second signature never ran");
}

/// The async calls keep the blocking ones' rules: a signature answered straight to the task
/// (and verifiable), a second one queued behind a hung module is BUSY once not started within
/// the call timeout and never runs, other calls BUSY too, and all answer again once released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_async_calls_answer_the_task_and_keep_the_busy_rules() {
    let timeout = Duration::from_millis(500);
    let rig = FaultRig::with_options(LoadOptions {
        call_timeout: timeout,
    });
    let req = rig.p256(vec![SignInput::Data(b"async".to_vec())]);
    let token = req.certificate.token_id().clone();
    let sigs = rig
        .module
        .sign_async(
            req.clone(),
            Credential::Pin(SecretPin::from(USER_PIN.to_owned())),
            None,
            None,
        )
        .await
        .expect("signed");
    let pem = rig.dir.path().join("certs/sign-p256.pem");
    assert!(openssl_verify(&pem, "ecdsa", "sha256", b"async", &sigs[0]));
    assert_eq!(
        rig.module
            .login_state_async(&token)
            .await
            .expect("login state"),
        LoginState::LoggedIn
    );
    let certs = rig
        .module
        .certificates_async(Some(&token))
        .await
        .expect("certificates");
    assert!(certs.iter().any(|c| c.id == req.certificate));

    FaultRig::set_control(&rig.control, "hang_sign=1\n");
    let signs_before = rig.calls("C_SignInit");
    let hung = tokio::spawn(rig.module.sign_async(
        SignRequest {
            inputs: vec![SignInput::Data(b"hung".to_vec())],
            ..req.clone()
        },
        Credential::None,
        None,
        None,
    ));
    let until = Instant::now() + Duration::from_secs(10);
    while rig.calls("C_SignInit") == signs_before {
        assert!(
            Instant::now() < until,
            "the worker never reached C_SignInit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let f = rig
        .module
        .sign_async(req.clone(), Credential::None, None, None)
        .await
        .expect_err("not started within the timeout");
    assert!(matches!(f.error, Error::Busy { .. }), "{f:?}");
    assert!(rig.module.is_behind());
    let e = rig
        .module
        .login_state_async(&token)
        .await
        .expect_err("still hung");
    assert!(matches!(e, Error::Busy { .. }), "{e:?}");

    FaultRig::set_control(&rig.control, "");
    let sigs = hung
        .await
        .expect("task")
        .expect("the hung signature completes once released");
    assert!(openssl_verify(&pem, "ecdsa", "sha256", b"hung", &sigs[0]));
    assert_eq!(
        rig.module
            .login_state_async(&token)
            .await
            .expect("answers again"),
        LoginState::LoggedIn
    );
    assert!(!rig.module.is_behind());
    assert_eq!(
        rig.calls("C_SignInit"),
        signs_before + 1,
        "the signature given up on never ran"
    );
}

/// A token our session is logged in to is not probed (C_GetTokenInfo) again for each request,
/// until a token event (a card in or out) or an error; without a login it always is.
#[test]
fn a_logged_in_token_is_probed_again_only_after_an_event_or_an_error() {
    let rig = FaultRig::new();
    let req = rig.p256(vec![SignInput::Data(b"probe".to_vec())]);
    let token = req.certificate.token_id().clone();
    let (pin, _) = ScriptedPin::right();
    rig.module
        .sign_with(req.clone(), pin, None, None)
        .expect("first sign logs in");
    let probes = || rig.calls("C_GetTokenInfo");
    let sign = || {
        rig.module
            .sign_with(req.clone(), no_pin(), None, None)
            .expect("sign on the cached login")
    };
    // The request after the login probes once (the login dropped the probe), then none.
    let before = probes();
    sign();
    assert_eq!(probes() - before, 1);
    let before = probes();
    for _ in 0..3 {
        sign();
        assert_eq!(
            rig.module.login_state(&token).expect("state"),
            LoginState::LoggedIn
        );
    }
    assert_eq!(probes() - before, 0, "probed on a cached login");
    // A card event: probed again once.
    rig.module.token_event();
    let before = probes();
    sign();
    sign();
    assert_eq!(probes() - before, 1);
    // An error (an input the token refuses): probed again.
    rig.module
        .sign_with(
            SignRequest {
                inputs: vec![SignInput::Digest(vec![1; 5])],
                ..req.clone()
            },
            no_pin(),
            None,
            None,
        )
        .expect_err("a 5-byte digest is refused");
    let before = probes();
    sign();
    assert_eq!(probes() - before, 1);
    // Logged out: every request probes (the PIN flags decide the dialog).
    rig.module.logout(&token).expect("logout");
    FaultRig::set_control(&rig.control, "pin_locked=1\n");
    assert_eq!(
        rig.module.login_state(&token).expect("state"),
        LoginState::Locked
    );
}
