//! A key pulled out mid-batch, and insertion/removal events (SKF_WaitForDevEvent), through the
//! soft SKF library. Tests wait on events, never on time: a timeout only bounds a failure.

#[path = "support/soft_skf.rs"]
mod soft_skf;
#[path = "support/verify.rs"]
mod verify;

use std::time::Duration;

use skf_shim::{
    DeviceEvent, DeviceEventKind, Error, SignAlgorithm, SignInput, SignRequest, Sm2Encoding,
    DEFAULT_SM2_USER_ID,
};
use soft_skf::{SoftSkf, DEVICE, SM2_CONTAINER, SPARE_DEVICE};

/// Upper bound for an event that should come (the library polls every 20 ms).
const EVENT_BOUND: Duration = Duration::from_secs(10);

#[test]
fn removal_mid_batch_is_token_not_present_with_the_finished_signatures() {
    let skf = SoftSkf::new();
    skf.verify_right_pin();
    let cert = skf.certificate(SM2_CONTAINER);
    skf.remove_after_signs(2);
    let docs: Vec<Vec<u8>> = (0..4).map(|i| format!("page {i}").into_bytes()).collect();
    let failure = skf
        .library
        .sign(
            SignRequest {
                certificate: cert.id.clone(),
                algorithm: SignAlgorithm::sm2(Sm2Encoding::Der),
                inputs: docs.iter().cloned().map(SignInput::Message).collect(),
                logout_after: false,
            },
            None,
        )
        .expect_err("pulled out after two");
    assert!(
        matches!(failure.error, Error::TokenNotPresent),
        "{failure:?}"
    );
    assert_eq!(failure.completed.len(), 2);
    let public = skf.public_key_pem("sm2-sign");
    for (doc, sig) in docs.iter().zip(&failure.completed) {
        assert!(verify::openssl_sm2(&public, DEFAULT_SM2_USER_ID, doc, sig));
    }
    // Gone from the list; back after plugging in, with the same id, and the PIN needed again.
    assert!(skf.library.tokens().expect("tokens").is_empty());
    skf.set_present(DEVICE, true);
    let tokens = skf.library.tokens().expect("tokens");
    assert_eq!(tokens.len(), 1);
    assert_eq!(tokens[0].id, skf.token);
    let again = skf
        .library
        .sign(
            SignRequest {
                certificate: cert.id,
                algorithm: SignAlgorithm::sm2(Sm2Encoding::Der),
                inputs: vec![SignInput::Message(b"after".to_vec())],
                logout_after: false,
            },
            None,
        )
        .expect_err("a pulled key forgets its PIN");
    assert!(matches!(again.error, Error::NotLoggedIn(_)), "{again:?}");
}

fn next_event(events: &skf_shim::DeviceEvents) -> DeviceEvent {
    events
        .recv_timeout(EVENT_BOUND)
        .expect("an event within the bound")
        .expect("not an error")
}

#[test]
fn insertion_and_removal_are_delivered_as_events() {
    let skf = SoftSkf::new();
    let events = skf.library.events().expect("events");
    skf.set_present(SPARE_DEVICE, true);
    assert_eq!(
        next_event(&events),
        DeviceEvent {
            device_name: SPARE_DEVICE.to_owned(),
            kind: DeviceEventKind::Inserted,
        }
    );
    assert_eq!(skf.library.tokens().expect("tokens").len(), 2);
    skf.set_present(SPARE_DEVICE, false);
    assert_eq!(
        next_event(&events),
        DeviceEvent {
            device_name: SPARE_DEVICE.to_owned(),
            kind: DeviceEventKind::Removed,
        }
    );
    skf.set_present(DEVICE, false);
    assert_eq!(
        next_event(&events),
        DeviceEvent {
            device_name: DEVICE.to_owned(),
            kind: DeviceEventKind::Removed,
        }
    );
    assert!(events.try_recv().is_none(), "nothing else happened");
    drop(events);
    assert!(
        skf.calls("SKF_CancelWaitForDevEvent") >= 1,
        "dropping the watch cancels the wait"
    );
}

#[test]
fn events_and_signing_run_side_by_side() {
    // The event thread blocks in SKF_WaitForDevEvent while the worker signs.
    let skf = SoftSkf::new();
    let events = skf.library.events().expect("events");
    skf.verify_right_pin();
    let sigs = skf
        .library
        .sign(
            SignRequest {
                certificate: skf.certificate(SM2_CONTAINER).id,
                algorithm: SignAlgorithm::sm2(Sm2Encoding::Raw),
                inputs: vec![SignInput::Message(b"while waiting".to_vec())],
                logout_after: false,
            },
            None,
        )
        .expect("sign while a wait is pending");
    assert_eq!(sigs[0].len(), 64);
    assert!(events.try_recv().is_none());
}

#[test]
fn a_key_plugged_in_again_takes_a_pin_at_once() {
    // The worker holds handles of the first insertion; the PIN after reinsertion must reach
    // the key (one SKF_VerifyPIN), not fail on the dead handles.
    let skf = SoftSkf::new();
    skf.verify_right_pin();
    skf.set_present(DEVICE, false);
    skf.set_present(DEVICE, true);
    let before = skf.calls("SKF_VerifyPIN");
    skf.verify_right_pin();
    assert_eq!(skf.calls("SKF_VerifyPIN"), before + 1);
    let status = skf
        .library
        .pin_status(&skf.app())
        .expect("status after reinsertion");
    assert!(!status.locked);
}
