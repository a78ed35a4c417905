//! Login, PIN cache, cancel and batches against a real SoftHSM token. C_Login calls are counted
//! with OpenSC's pkcs11-spy between the shim and SoftHSM.

#[path = "support/rig.rs"]
mod rig;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use pkcs11_shim::{
    EcdsaEncoding, Error, HashAlg, LoginKind, LoginState, SignAlgorithm, SignInput, SignRequest,
};
use rig::{no_pin, openssl_verify, Rig, ScriptedPin, SignWith, USER_PIN};

const P256: SignAlgorithm = SignAlgorithm::Ecdsa(HashAlg::Sha256, EcdsaEncoding::Der);

fn p256_request(rig: &Rig, inputs: Vec<SignInput>, logout_after: bool) -> SignRequest {
    SignRequest {
        certificate: rig.certificate("sign-p256").id,
        algorithm: P256,
        inputs,
        logout_after,
    }
}

#[test]
fn wrong_pin_then_right_pin_is_two_questions_and_two_logins() {
    let rig = Rig::with_spy();
    let (pin, asked) = ScriptedPin::new(vec![Some("000000"), Some(USER_PIN)]);
    let sigs = rig
        .module
        .sign_with(
            p256_request(&rig, vec![SignInput::Data(b"doc".to_vec())], true),
            pin,
            None,
            None,
        )
        .expect("sign after one wrong PIN");
    assert!(openssl_verify(
        &rig.cert_pem("sign-p256"),
        "ecdsa",
        "sha256",
        b"doc",
        &sigs[0]
    ));
    let asked = asked.lock().expect("log").clone();
    assert_eq!(asked.len(), 2, "{asked:?}");
    assert_eq!(asked[0].attempt, 1);
    assert_eq!(asked[0].previous_error, None);
    assert_eq!(asked[1].attempt, 2);
    let after = asked[1]
        .previous_error
        .expect("second question carries the failure");
    assert!(after.count_low, "SoftHSM sets COUNT_LOW after a wrong PIN");
    assert!(!after.locked);
    assert!(asked
        .iter()
        .all(|a| a.kind == LoginKind::User && !a.protected_path));
    assert!(asked.iter().all(|a| a.certificate_label == "sign-p256"));
    assert_eq!(rig.spy_logins(), 2, "exactly one C_Login per answer");
}

#[test]
fn cancel_after_a_wrong_pin_is_user_cancelled_without_a_third_login() {
    let rig = Rig::with_spy();
    let (pin, asked) = ScriptedPin::new(vec![Some("999999"), None]);
    let failure = rig
        .module
        .sign_with(
            p256_request(&rig, vec![SignInput::Data(b"doc".to_vec())], true),
            pin,
            None,
            None,
        )
        .expect_err("cancelled");
    assert!(matches!(failure.error, Error::UserCancelled), "{failure:?}");
    assert!(failure.completed.is_empty());
    assert_eq!(asked.lock().expect("log").len(), 2);
    assert_eq!(rig.spy_logins(), 1, "the cancelled answer sends nothing");
}

#[test]
fn cancel_at_the_first_question_signs_nothing_and_never_logs_in() {
    let rig = Rig::with_spy();
    let (pin, asked) = ScriptedPin::new(vec![None]);
    let failure = rig
        .module
        .sign_with(
            p256_request(&rig, vec![SignInput::Data(b"doc".to_vec())], false),
            pin,
            None,
            None,
        )
        .expect_err("cancelled");
    assert!(matches!(failure.error, Error::UserCancelled), "{failure:?}");
    assert!(failure.completed.is_empty());
    assert_eq!(asked.lock().expect("log").len(), 1);
    assert_eq!(rig.spy_logins(), 0);
    assert!(matches!(
        rig.module.login_state(&rig.token).expect("state"),
        LoginState::NeedsPin(_)
    ));
}

#[test]
fn login_is_cached_until_logout_and_logout_after_drops_it() {
    let rig = Rig::with_spy();
    assert!(matches!(
        rig.module.login_state(&rig.token).expect("state"),
        LoginState::NeedsPin(s) if s.initialized && !s.locked
    ));
    let (pin, asked) = ScriptedPin::right();
    rig.module
        .sign_with(
            p256_request(&rig, vec![SignInput::Data(b"1".to_vec())], false),
            pin,
            None,
            None,
        )
        .expect("first");
    assert_eq!(asked.lock().expect("log").len(), 1);
    assert_eq!(
        rig.module.login_state(&rig.token).expect("state"),
        LoginState::LoggedIn
    );
    let token = rig
        .module
        .tokens()
        .expect("tokens")
        .into_iter()
        .find(|t| t.id == rig.token)
        .expect("token");
    assert!(token.logged_in);

    // Cached: the provider must not be called, and no C_Login happens.
    let sig = rig
        .module
        .sign_with(
            p256_request(&rig, vec![SignInput::Data(b"2".to_vec())], true),
            no_pin(),
            None,
            None,
        )
        .expect("second, from the cache");
    assert!(openssl_verify(
        &rig.cert_pem("sign-p256"),
        "ecdsa",
        "sha256",
        b"2",
        &sig[0]
    ));
    assert_eq!(rig.spy_logins(), 1);
    // logout_after ended the login.
    assert!(matches!(
        rig.module.login_state(&rig.token).expect("state"),
        LoginState::NeedsPin(_)
    ));

    let (pin, _) = ScriptedPin::right();
    rig.module
        .sign_with(
            p256_request(&rig, vec![SignInput::Data(b"3".to_vec())], false),
            pin,
            None,
            None,
        )
        .expect("third");
    rig.module.logout(&rig.token).expect("logout");
    assert!(matches!(
        rig.module.login_state(&rig.token).expect("state"),
        LoginState::NeedsPin(_)
    ));
    assert_eq!(rig.spy_logins(), 2);
}

#[test]
fn batch_of_fifty_is_one_login_with_progress_after_each() {
    let rig = Rig::with_spy();
    let msgs: Vec<Vec<u8>> = (0..50)
        .map(|i| format!("document {i}").into_bytes())
        .collect();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let (pin, asked) = ScriptedPin::right();
    let sigs = rig
        .module
        .sign_with(
            p256_request(
                &rig,
                msgs.iter().cloned().map(SignInput::Data).collect(),
                true,
            ),
            pin,
            Some(Box::new(move |done, total| {
                seen2.lock().expect("progress").push((done, total));
            })),
            None,
        )
        .expect("batch");
    assert_eq!(sigs.len(), 50);
    let expected: Vec<(usize, usize)> = (1..=50).map(|i| (i, 50)).collect();
    assert_eq!(*seen.lock().expect("progress"), expected);
    assert_eq!(asked.lock().expect("log").len(), 1);
    assert_eq!(rig.spy_logins(), 1);
    for (m, s) in msgs.iter().zip(&sigs) {
        assert!(openssl_verify(
            &rig.cert_pem("sign-p256"),
            "ecdsa",
            "sha256",
            m,
            s
        ));
    }
}

#[test]
fn cancel_flag_stops_a_batch_between_items_and_keeps_what_was_done() {
    let rig = Rig::new();
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    // Long enough that the batch is still running when the flag, set on the seventh progress
    // message, reaches the worker (progress is a message now, not a call on the worker). With
    // 400 items a loaded 2-core CI machine once finished the batch before the progress thread
    // ran; 4000 give it the time of thousands of signatures.
    let n = 4000;
    let msgs: Vec<Vec<u8>> = (0..n).map(|i| (i as u32).to_be_bytes().to_vec()).collect();
    let (pin, _) = ScriptedPin::right();
    let failure = rig
        .module
        .sign_with(
            p256_request(
                &rig,
                msgs.iter().cloned().map(SignInput::Data).collect(),
                true,
            ),
            pin,
            Some(Box::new(move |done, _| {
                if done == 7 {
                    flag.store(true, Ordering::SeqCst);
                }
            })),
            Some(cancel),
        )
        .expect_err("cancelled");
    assert!(matches!(failure.error, Error::Cancelled), "{failure:?}");
    // Progress is a message from the worker: the flag lands after the seventh signature and
    // before the batch ends, not at an exact item.
    assert!(
        (7..n).contains(&failure.completed.len()),
        "{}",
        failure.completed.len()
    );
    // The first items and the last one kept (one OpenSSL run each; not thousands).
    let done = failure.completed.len();
    for i in (0..7).chain([done - 1]) {
        assert!(openssl_verify(
            &rig.cert_pem("sign-p256"),
            "ecdsa",
            "sha256",
            &msgs[i],
            &failure.completed[i]
        ));
    }
}

#[test]
fn bad_requests_fail_before_any_pin_is_asked() {
    let rig = Rig::new();
    let wrong_len = p256_request(&rig, vec![SignInput::Digest(vec![0; 20])], true);
    let f = rig
        .module
        .sign_with(wrong_len, no_pin(), None, None)
        .expect_err("bad digest");
    assert!(matches!(f.error, Error::InvalidInput(_)), "{f:?}");

    let rsa_on_ec = SignRequest {
        algorithm: SignAlgorithm::RsaPss(HashAlg::Sha256),
        ..p256_request(&rig, vec![SignInput::Data(b"x".to_vec())], true)
    };
    let f = rig
        .module
        .sign_with(rsa_on_ec, no_pin(), None, None)
        .expect_err("wrong key");
    assert!(
        matches!(f.error, Error::MechanismNotSupported { .. }),
        "{f:?}"
    );

    let empty = p256_request(&rig, vec![], true);
    let f = rig
        .module
        .sign_with(empty, no_pin(), None, None)
        .expect_err("empty");
    assert!(matches!(f.error, Error::InvalidInput(_)), "{f:?}");
}
