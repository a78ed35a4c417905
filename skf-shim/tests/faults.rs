//! A library that hangs in a signature, a cancelled batch, and the one-watch rule, through the
//! soft SKF library.

#[path = "support/soft_skf.rs"]
mod soft_skf;
#[path = "support/verify.rs"]
mod verify;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use skf_shim::{
    Error, LoadOptions, SignAlgorithm, SignInput, SignRequest, Sm2Encoding, DEFAULT_SM2_USER_ID,
};
use soft_skf::{SoftSkf, SM2_CONTAINER};

fn one_doc(skf: &SoftSkf, doc: &[u8]) -> SignRequest {
    SignRequest {
        certificate: skf.certificate(SM2_CONTAINER).id,
        algorithm: SignAlgorithm::sm2(Sm2Encoding::Der),
        inputs: vec![SignInput::Message(doc.to_vec())],
        logout_after: false,
    }
}

#[test]
fn a_hanging_signature_makes_other_calls_busy_then_finishes() {
    let skf = SoftSkf::with_options(LoadOptions {
        call_timeout: Duration::from_millis(500),
    });
    skf.verify_right_pin();
    let req = one_doc(&skf, b"slow");
    let hanging = skf.hang_sign();
    let library = skf.library.clone();
    let signer = std::thread::spawn(move || library.sign(req, None));
    hanging.wait(Duration::from_secs(20));

    // The worker is inside SKF_ECCSignData: a listing gives up after the call timeout.
    match skf.library.tokens() {
        Err(Error::Busy { waited }) => assert_eq!(waited, Duration::from_millis(500)),
        other => panic!("expected Busy, got {other:?}"),
    }
    assert!(skf.library.is_behind());

    // Once released, the started signature runs to its end and is valid.
    skf.release_sign();
    let sigs = signer
        .join()
        .expect("signer thread")
        .expect("the started signature finishes");
    let public = skf.public_key_pem("sm2-sign");
    assert!(verify::openssl_sm2(
        &public,
        DEFAULT_SM2_USER_ID,
        b"slow",
        &sigs[0]
    ));
    // The worker catches up with the listing given up on, then answers again.
    assert_eq!(
        skf.library.tokens().expect("tokens after recovery").len(),
        1
    );
    assert!(!skf.library.is_behind());
}

#[test]
fn a_set_cancel_flag_signs_nothing() {
    let skf = SoftSkf::new();
    skf.verify_right_pin();
    let cancel = Arc::new(AtomicBool::new(true));
    let failure = skf
        .library
        .sign(one_doc(&skf, b"never"), Some(cancel))
        .expect_err("cancelled");
    assert!(matches!(failure.error, Error::Cancelled), "{failure:?}");
    assert!(failure.completed.is_empty());
    assert_eq!(skf.calls("SKF_ECCSignData"), 0);
}

#[test]
fn one_event_watch_per_library_and_a_new_one_after_it_ends() {
    let skf = SoftSkf::new();
    let first = skf.library.events().expect("first watch");
    assert!(matches!(skf.library.events(), Err(Error::AlreadyWatching)));
    drop(first);
    // The ended watch left no cancel behind: the next one receives events.
    let second = skf
        .library
        .events()
        .expect("a new watch after the first ended");
    skf.set_present(soft_skf::SPARE_DEVICE, true);
    let event = second
        .recv_timeout(Duration::from_secs(10))
        .expect("an event")
        .expect("not an error");
    assert_eq!(event.device_name, soft_skf::SPARE_DEVICE);
}
