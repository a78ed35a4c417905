//! PIN-pad readers (CKF_PROTECTED_AUTHENTICATION_PATH) through the real `keyport run`: the
//! fault module stands in for the reader (`pin_pad=1`: the flag in C_GetTokenInfo, C_Login with
//! no PIN answered by what `pin_pad_entry` says the user does on the keypad). The dialog only
//! confirms, and shows what is signed; the PIN never passes through KeyPort.
#![allow(clippy::unwrap_used)] // a test fails by panicking

use std::time::{Duration, Instant};

use keyport_e2e::harness::{
    b64, certificate_ids, unb64, verify_raw, Agent, AgentOptions, Client, Hash, RawAlg, Signed,
    TestToken, PORTAL, USER_PIN,
};
use keyport_e2e::pinentry::{Button, Command, Step};
use serde_json::{json, Value};

async fn start(
    options: AgentOptions,
    pad: &str,
) -> (
    TestToken,
    Agent,
    Client,
    std::collections::HashMap<String, String>,
) {
    let tk = TestToken::provision().unwrap();
    let agent = Agent::start(&tk, options.fault()).unwrap();
    agent.set_fault(pad).unwrap();
    let mut client = agent.connect(PORTAL).await.unwrap();
    let ids = certificate_ids(&mut client, &tk).await.unwrap();
    (tk, agent, client, ids)
}

fn sign_params(id: &str, digest: &[u8]) -> Value {
    json!({"certificateId": id, "digest": {"algorithm": "SHA-256", "value": b64(digest)},
           "display": {"title": "Loan contract 2026-114"}})
}

fn logins(agent: &Agent) -> Vec<String> {
    agent
        .fault_log()
        .into_iter()
        .filter(|l| l.starts_with("C_Login "))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pin_pad_signature_is_a_confirm_dialog_and_a_login_with_no_pin() {
    let pad = format!("pin_pad=1\npin_pad_entry={USER_PIN}\npin_pad_delay_ms=200\n");
    let (tk, agent, mut client, ids) = start(AgentOptions::default(), &pad).await;
    let tokens = client.call_ok("tokens.list", json!({})).await.unwrap();
    assert_eq!(tokens["tokens"][0]["pinPad"], true, "{tokens}");

    agent
        .script()
        .push(&Step::confirm(Button::Ok).expect(Command::Confirm))
        .unwrap();
    let digest = Hash::Sha256.digest(b"loan contract");
    let result = client
        .call_ok("sign", sign_params(&ids["sign-p256"], &digest))
        .await
        .unwrap();
    verify_raw(
        &tk.cert_pem("sign-p256"),
        &Signed::Digest(digest.clone()),
        &unb64(&result["signature"]).unwrap(),
        RawAlg::EcdsaDer(Hash::Sha256),
    )
    .unwrap();
    let dialogs = agent.script().dialogs().unwrap();
    assert_eq!(dialogs.len(), 1);
    let d = &dialogs[0];
    assert_eq!(d.command.as_deref(), Some("CONFIRM"), "no PIN field");
    assert_eq!(d.prompt, None);
    let text = d.description.clone().unwrap_or_default();
    for part in [
        PORTAL,
        "«Loan contract 2026-114»",
        "«Test Signer P-256»",
        &hex::encode(&digest[..8]),
        "Enter your PIN on the reader's keypad after you choose Sign.",
    ] {
        assert!(text.contains(part), "{part:?} missing from {text}");
    }
    assert_eq!(logins(&agent), ["C_Login CKU_USER null-pin rv=0x00000000"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_always_authenticate_key_on_a_pin_pad_logs_in_twice_with_no_pin() {
    let pad = format!("pin_pad=1\npin_pad_entry={USER_PIN}\n");
    let (tk, agent, mut client, ids) = start(AgentOptions::default(), &pad).await;
    agent
        .script()
        .push(&Step::confirm(Button::Ok).expect(Command::Confirm))
        .unwrap();
    let digest = Hash::Sha256.digest(b"qualified");
    let result = client
        .call_ok("sign", sign_params(&ids["sign-p256-always"], &digest))
        .await
        .unwrap();
    verify_raw(
        &tk.cert_pem("sign-p256-always"),
        &Signed::Digest(digest),
        &unb64(&result["signature"]).unwrap(),
        RawAlg::EcdsaDer(Hash::Sha256),
    )
    .unwrap();
    assert_eq!(agent.script().dialogs().unwrap().len(), 1);
    assert_eq!(
        logins(&agent),
        [
            "C_Login CKU_USER null-pin rv=0x00000000",
            "C_Login CKU_CONTEXT_SPECIFIC null-pin rv=0x00000000",
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_pin_on_the_pad_asks_again_with_the_warning() {
    let (_tk, agent, mut client, ids) =
        start(AgentOptions::default(), "pin_pad=1\npin_pad_entry=999999\n").await;
    agent
        .script()
        .push_all(&[
            Step::confirm(Button::Ok).expect(Command::Confirm),
            Step::confirm(Button::Cancel).expect(Command::Confirm),
        ])
        .unwrap();
    let e = client
        .call_err(
            "sign",
            sign_params(&ids["sign-p256"], &[1; 32]),
            "USER_CANCELLED",
        )
        .await
        .unwrap();
    assert_eq!(e.code, 1002);
    let dialogs = agent.script().dialogs().unwrap();
    assert_eq!(dialogs.len(), 2);
    // The warning is in the description, once (not again as the dialog's SETERROR).
    let warning = dialogs[1].description.clone().unwrap_or_default();
    assert!(warning.contains("Wrong PIN."), "{warning}");
    assert_eq!(dialogs[1].error, None);
    assert_eq!(logins(&agent), ["C_Login CKU_USER null-pin rv=0x000000A0"]);
    assert_eq!(agent.fault_calls("C_Sign"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_on_the_pad_is_user_cancelled() {
    let (_tk, agent, mut client, ids) =
        start(AgentOptions::default(), "pin_pad=1\npin_pad_entry=cancel\n").await;
    agent.script().push(&Step::confirm(Button::Ok)).unwrap();
    let e = client
        .call_err(
            "sign",
            sign_params(&ids["sign-p256"], &[2; 32]),
            "USER_CANCELLED",
        )
        .await
        .unwrap();
    assert!(e.message.contains("reader"), "{e:?}");
    assert_eq!(
        agent.script().dialogs().unwrap().len(),
        1,
        "no second dialog"
    );
    assert_eq!(logins(&agent), ["C_Login CKU_USER null-pin rv=0x00000050"]);
    assert_eq!(agent.fault_calls("C_Sign"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_pin_pad_token_shows_no_dialog() {
    let (_tk, agent, mut client, ids) =
        start(AgentOptions::default(), "pin_pad=1\npin_locked=1\n").await;
    let e = client
        .call_err(
            "sign",
            sign_params(&ids["sign-p256"], &[3; 32]),
            "PIN_LOCKED",
        )
        .await
        .unwrap();
    assert_eq!(e.code, 1004);
    assert!(agent.script().dialogs().unwrap().is_empty());
    assert!(logins(&agent).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_never_answers_is_a_timeout() {
    let options = AgentOptions {
        dialog_timeout_seconds: 1,
        ..AgentOptions::default()
    };
    let pad = format!("pin_pad=1\npin_pad_entry={USER_PIN}\npin_pad_delay_ms=4000\n");
    let (_tk, agent, mut client, ids) = start(options, &pad).await;
    agent.script().push(&Step::confirm(Button::Ok)).unwrap();
    let t = Instant::now();
    let e = client
        .call_err("sign", sign_params(&ids["sign-p256"], &[4; 32]), "TIMEOUT")
        .await
        .unwrap();
    assert_eq!(e.code, 1010);
    let took = t.elapsed();
    assert!(took < Duration::from_millis(3500), "answered in {took:?}");
}
