//! The user PIN through the soft SKF library: one SKF_VerifyPIN per answer, the retry count it
//! reports, and no SKF_VerifyPIN at all once the PIN is locked (counted in the call log).

#[path = "support/soft_skf.rs"]
mod soft_skf;

use skf_shim::{ApplicationId, Error, PinStatus, SecretPin};
use soft_skf::{SoftSkf, MAX_RETRIES, USER_PIN};

fn pin(p: &str) -> SecretPin {
    SecretPin::from(p.to_owned())
}

#[test]
fn wrong_then_right_pin_is_two_verify_calls() {
    let skf = SoftSkf::new();
    let app = skf.app();
    match skf.library.verify_pin(&app, pin("000000")) {
        Err(Error::PinIncorrect {
            retries_left,
            count_low,
            final_try,
        }) => {
            assert_eq!(retries_left, MAX_RETRIES - 1);
            assert!(count_low, "a wrong PIN since the last right one");
            assert!(!final_try);
        }
        other => panic!("expected PinIncorrect, got {other:?}"),
    }
    assert_eq!(
        skf.calls("SKF_VerifyPIN"),
        1,
        "exactly one call for the wrong PIN"
    );
    skf.library
        .verify_pin(&app, pin(USER_PIN))
        .expect("right PIN");
    assert_eq!(
        skf.calls("SKF_VerifyPIN"),
        2,
        "one more for the right one, none by itself"
    );
    // The right PIN resets the counter.
    let status = skf.library.pin_status(&app).expect("status");
    assert_eq!(status.retries_left, MAX_RETRIES);
    assert!(!status.count_low, "a right PIN resets the count");
}

#[test]
fn the_retry_count_goes_low_then_final_then_locked() {
    let skf = SoftSkf::new();
    let app = skf.app();
    let mut seen = Vec::new();
    for _ in 0..MAX_RETRIES {
        match skf.library.verify_pin(&app, pin("999999")) {
            Err(Error::PinIncorrect {
                retries_left,
                count_low,
                final_try,
            }) => seen.push((retries_left, count_low, final_try)),
            Err(Error::PinLocked) => seen.push((0, true, false)),
            other => panic!("unexpected {other:?}"),
        }
    }
    // 6 tries: low from the first wrong PIN, final at 1, locked by the sixth wrong PIN.
    assert_eq!(
        seen,
        vec![
            (5, true, false),
            (4, true, false),
            (3, true, false),
            (2, true, false),
            (1, true, true),
            (0, true, false),
        ]
    );
    let status = skf.library.pin_status(&app).expect("status");
    assert_eq!(
        status,
        PinStatus {
            max_retries: MAX_RETRIES,
            retries_left: 0,
            default_pin: false,
            count_low: false,
            final_try: false,
            locked: true,
        }
    );
    assert_eq!(skf.calls("SKF_VerifyPIN"), MAX_RETRIES as usize);
}

#[test]
fn a_locked_pin_is_refused_without_calling_verify() {
    let skf = SoftSkf::new();
    let app = skf.app();
    for _ in 0..MAX_RETRIES {
        let _ = skf.library.verify_pin(&app, pin("111111"));
    }
    let before = skf.calls("SKF_VerifyPIN");
    // Even the right PIN is not sent: the key says it is locked.
    assert!(matches!(
        skf.library.verify_pin(&app, pin(USER_PIN)),
        Err(Error::PinLocked)
    ));
    assert_eq!(
        skf.calls("SKF_VerifyPIN"),
        before,
        "no SKF_VerifyPIN once locked"
    );
}

#[test]
fn the_retry_counter_is_the_keys_and_survives_a_restart() {
    let skf = SoftSkf::new();
    let app = skf.app();
    let _ = skf.library.verify_pin(&app, pin("000000"));
    let _ = skf.library.verify_pin(&app, pin("000000"));
    // Another instance at another path (token ids include the library path).
    let again = skf.reload("libsoftskf-2.so");
    let token = again
        .tokens()
        .expect("tokens")
        .into_iter()
        .find(|t| t.device_name == soft_skf::DEVICE)
        .expect("present")
        .id;
    let status = again
        .pin_status(&ApplicationId::new(token, soft_skf::APP))
        .expect("status");
    assert_eq!(status.retries_left, MAX_RETRIES - 2);
    assert!(!status.locked);
}
