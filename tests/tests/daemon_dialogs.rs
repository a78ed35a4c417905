//! Dialogs, PIN handling, origin approval and token faults through the real `keyport run`, the
//! scripted pinentry and (where the token must misbehave) the fault-injection module.
#![allow(clippy::unwrap_used)] // a test fails by panicking

use std::process::Command as Process;
use std::time::{Duration, Instant};

use keyport_e2e::harness::{
    b64, certificate_ids, unb64, verify_raw, Agent, AgentOptions, Client, Closed, Hash, RawAlg,
    Signed, TestToken, PORTAL, USER_PIN,
};
use keyport_e2e::pinentry::{Button, Command, Entry, Step};
use serde_json::{json, Value};

/// A token per test: agents logging in to one SoftHSM store from several processes at once
/// race on its files (a concurrent listing came back empty), so tests do not share one.
fn new_token() -> TestToken {
    TestToken::provision().expect("provision")
}

fn sign_params(id: &str, digest: &[u8]) -> Value {
    json!({
        "certificateId": id,
        "digest": {"algorithm": "SHA-256", "value": b64(digest)},
        "display": {"title": "Dialog test"},
    })
}

/// Waits until a pinentry answered `hang` (a dialog is open and stays open); returns its pid.
fn wait_for_hanging_dialog(agent: &Agent) -> u32 {
    let entries = agent
        .script()
        .wait_for(Duration::from_secs(30), |e: &[Entry]| {
            e.iter().any(|e| e.answered.as_deref() == Some("hang"))
        })
        .unwrap();
    entries
        .iter()
        .find(|e| e.answered.as_deref() == Some("hang"))
        .unwrap()
        .pid
}

/// Waits (bounded) until process `pid` is gone.
fn assert_process_ends(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let alive = Process::new("kill")
            .args(["-0", &pid.to_string()])
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
            .success();
        // A zombie still answers kill -0: look at its state too.
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.split(") ").nth(1).is_some_and(|r| r.starts_with('Z')))
            .unwrap_or(true);
        if !alive || zombie {
            return;
        }
        assert!(Instant::now() < deadline, "pinentry {pid} is still open");
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn portal(agent: &Agent, tk: &TestToken) -> (Client, String) {
    let mut client = agent.connect(PORTAL).await.unwrap();
    let ids = certificate_ids(&mut client, tk).await.unwrap();
    let id = ids["sign-p256"].clone();
    (client, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_dialog_is_user_cancelled_and_signs_nothing() {
    let tk = new_token();
    let agent = Agent::start(&tk, AgentOptions::default().fault()).unwrap();
    let (mut client, id) = portal(&agent, &tk).await;
    agent.script().push(&Step::cancel()).unwrap();
    let e = client
        .call_err("sign", sign_params(&id, &[1; 32]), "USER_CANCELLED")
        .await
        .unwrap();
    assert_eq!(e.code, 1002);
    assert_eq!(agent.fault_calls("C_Login"), 0);
    assert_eq!(agent.fault_calls("C_Sign"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_dialog_for_the_origin_waits_its_turn_and_cancel_closes_the_first() {
    let tk = new_token();
    let agent = Agent::start(
        &tk,
        AgentOptions::default()
            .allowed(&[PORTAL, "https://other.example"])
            .fault(),
    )
    .unwrap();
    let (mut first, id) = portal(&agent, &tk).await;
    let mut second = agent.connect(PORTAL).await.unwrap();
    agent.script().push(&Step::hang()).unwrap();
    let pending = first
        .send("sign", sign_params(&id, &[2; 32]))
        .await
        .unwrap();
    let pid = wait_for_hanging_dialog(&agent);
    // The answer for the next dialog (the waiting request's, once its turn comes).
    agent.script().push(&Step::pin(USER_PIN)).unwrap();
    // Same origin, another connection: it waits for the open dialog, no second dialog yet.
    let waiting = second
        .send("sign", sign_params(&id, &[3; 32]))
        .await
        .unwrap();
    // Another origin is still served while the dialog is open, token requests included: the
    // dialog runs before the token work, never on the module's worker thread.
    let mut other = agent.connect("https://other.example").await.unwrap();
    other.call_ok("hello", json!({})).await.unwrap();
    let listed = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        other.call_ok("certificates.list", json!({})),
    )
    .await
    .expect("another origin's certificates.list must not wait for the open dialog")
    .unwrap();
    assert!(!listed["certificates"].as_array().unwrap().is_empty());
    assert_eq!(agent.script().dialogs().unwrap().len(), 1);
    // `cancel` ends the pending sign with USER_CANCELLED and closes its dialog.
    let cancel = first
        .call("cancel", json!({"requestId": pending}))
        .await
        .unwrap();
    assert!(cancel.is_ok(), "{cancel:?}");
    let answer = first.response(pending).await.unwrap();
    assert_eq!(answer.unwrap_err().reason, "USER_CANCELLED");
    assert_process_ends(pid);
    // The waiting request's turn: its dialog, its signature.
    let signed = second.response(waiting).await.unwrap();
    assert!(signed.is_ok(), "{signed:?}");
    assert_eq!(agent.script().dialogs().unwrap().len(), 2);
    // One login: the cancelled request never reached the token.
    assert_eq!(agent.fault_calls("C_Login"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_dialog_times_out() {
    let tk = new_token();
    let options = AgentOptions {
        dialog_timeout_seconds: 1,
        ..AgentOptions::default().fault()
    };
    let agent = Agent::start(&tk, options).unwrap();
    let (mut client, id) = portal(&agent, &tk).await;
    agent.script().push(&Step::hang()).unwrap();
    let started = Instant::now();
    let e = client
        .call_err("sign", sign_params(&id, &[5; 32]), "TIMEOUT")
        .await
        .unwrap();
    assert_eq!(e.code, 1010);
    assert!(started.elapsed() >= Duration::from_millis(900));
    let pid = agent.script().dialogs().unwrap()[0].pid;
    assert_process_ends(pid);
    assert_eq!(agent.fault_calls("C_Login"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_pin_then_the_right_one_logs_in_twice_and_the_second_dialog_says_so() {
    let tk = new_token();
    let agent = Agent::start(&tk, AgentOptions::default().fault()).unwrap();
    let (mut client, id) = portal(&agent, &tk).await;
    agent
        .script()
        .push_all(&[
            Step::pin("000000").expect(Command::GetPin),
            Step::pin(USER_PIN).expect(Command::GetPin),
        ])
        .unwrap();
    let digest = Hash::Sha256.digest(b"wrong then right");
    let result = client
        .call_ok("sign", sign_params(&id, &digest))
        .await
        .unwrap();
    verify_raw(
        &tk.cert_pem("sign-p256"),
        &Signed::Digest(digest),
        &unb64(&result["signature"]).unwrap(),
        RawAlg::EcdsaDer(Hash::Sha256),
    )
    .unwrap();
    assert_eq!(
        agent.fault_calls("C_Login"),
        2,
        "one C_Login per user entry"
    );
    let dialogs = agent.script().dialogs().unwrap();
    assert_eq!(dialogs.len(), 2);
    assert!(dialogs[0].error.is_none());
    let error = dialogs[1].error.clone().unwrap_or_default();
    assert!(
        error.contains("Wrong PIN"),
        "second dialog error: {error:?}"
    );

    // Wrong PIN, then the user cancels the second dialog: no third login, nothing re-sent.
    agent
        .script()
        .push_all(&[Step::pin("000000"), Step::cancel()])
        .unwrap();
    let answer = client
        .call("sign", sign_params(&id, &[6; 32]))
        .await
        .unwrap();
    let e = answer.unwrap_err();
    assert!(
        e.reason == "USER_CANCELLED" || e.reason == "PIN_INCORRECT",
        "{e:?}"
    );
    assert_eq!(agent.fault_calls("C_Login"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_warns_of_a_low_count_in_the_first_dialog() {
    let tk = new_token();
    let agent = Agent::start(&tk, AgentOptions::default().fault()).unwrap();
    let (mut client, id) = portal(&agent, &tk).await;
    agent.set_fault("pin_final_try=1\n").unwrap();
    agent.script().push(&Step::pin(USER_PIN)).unwrap();
    client
        .call_ok("sign", sign_params(&id, &[7; 32]))
        .await
        .unwrap();
    let dialogs = agent.script().dialogs().unwrap();
    let error = dialogs[0].error.clone().unwrap_or_default();
    assert!(error.contains("FINAL TRY"), "{error:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_token_is_pin_locked_without_a_dialog_or_a_login() {
    let tk = new_token();
    let agent = Agent::start(&tk, AgentOptions::default().fault()).unwrap();
    let (mut client, id) = portal(&agent, &tk).await;
    agent.set_fault("pin_locked=1\n").unwrap();
    let e = client
        .call_err("sign", sign_params(&id, &[8; 32]), "PIN_LOCKED")
        .await
        .unwrap();
    assert_eq!(e.code, 1004);
    let e = client
        .call_err(
            "authenticate",
            json!({"challenge": keyport_e2e::harness::nonce(32).unwrap()}),
            "PIN_LOCKED",
        )
        .await
        .unwrap();
    assert_eq!(e.code, 1004);
    assert_eq!(agent.fault_calls("C_Login"), 0);
    assert!(agent.script().dialogs().unwrap().is_empty());
    let tokens = client.call_ok("tokens.list", json!({})).await.unwrap();
    assert_eq!(tokens["tokens"][0]["pin"]["locked"], true, "{tokens}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absent_token_and_a_failing_token() {
    let tk = new_token();
    let agent = Agent::start(&tk, AgentOptions::default().fault()).unwrap();
    let (mut client, id) = portal(&agent, &tk).await;
    agent.set_fault("token_removed=1\n").unwrap();
    let e = client
        .call("sign", sign_params(&id, &[9; 32]))
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        e.reason == "TOKEN_NOT_PRESENT" || e.reason == "CERTIFICATE_NOT_FOUND",
        "{e:?}"
    );
    assert!(agent.script().dialogs().unwrap().is_empty());
    let tokens = client.call_ok("tokens.list", json!({})).await.unwrap();
    assert_eq!(tokens["tokens"], json!([]), "{tokens}");
    // Re-inserted: it works again.
    agent.set_fault("").unwrap();
    agent.script().push(&Step::pin(USER_PIN)).unwrap();
    client
        .call_ok("sign", sign_params(&id, &[10; 32]))
        .await
        .unwrap();
    // A device error on C_Sign: TOKEN_ERROR naming the function.
    agent.set_fault("fail_sign_after=0\n").unwrap();
    agent.script().push(&Step::pin(USER_PIN)).unwrap();
    let e = client
        .call_err("sign", sign_params(&id, &[11; 32]), "TOKEN_ERROR")
        .await
        .unwrap();
    assert_eq!(e.code, 1013);
    assert_eq!(e.data["function"], "C_Sign", "{e:?}");
}

fn batch_items(docs: &[Vec<u8>]) -> Vec<Value> {
    docs.iter()
        .map(|d| json!({"digest": {"algorithm": "SHA-256", "value": b64(&Hash::Sha256.digest(d))}}))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_fails_mid_way_returns_what_it_signed() {
    let tk = new_token();
    let agent = Agent::start(&tk, AgentOptions::default().fault()).unwrap();
    let (mut client, id) = portal(&agent, &tk).await;
    let docs: Vec<Vec<u8>> = (0..20)
        .map(|i| format!("batch doc {i}").into_bytes())
        .collect();
    agent.set_fault("fail_sign_after=5\n").unwrap();
    agent.script().push(&Step::pin(USER_PIN)).unwrap();
    let e = client
        .call(
            "sign.batch",
            json!({"certificateId": id, "items": batch_items(&docs), "display": {"title": "Twenty"}}),
        )
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(e.reason, "TOKEN_ERROR", "{e:?}");
    assert_eq!(e.data["completed"], 5, "{e:?}");
    let results = e.data["results"].as_array().unwrap();
    assert_eq!(results.len(), 5);
    for (doc, r) in docs.iter().zip(results) {
        verify_raw(
            &tk.cert_pem("sign-p256"),
            &Signed::Digest(Hash::Sha256.digest(doc)),
            &unb64(&r["signature"]).unwrap(),
            RawAlg::EcdsaDer(Hash::Sha256),
        )
        .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_removed_during_a_batch_is_token_not_present_with_the_finished_signatures() {
    let tk = new_token();
    let agent = Agent::start(&tk, AgentOptions::default().fault()).unwrap();
    let mut client = agent.connect(PORTAL).await.unwrap();
    let ids = certificate_ids(&mut client, &tk).await.unwrap();
    // RSA-3072 signs slowly enough (a few ms each) for the removal to land mid-way.
    let id = ids["sign-rsa3072"].clone();
    let docs: Vec<Vec<u8>> = (0..1000)
        .map(|i| format!("long batch {i}").into_bytes())
        .collect();
    agent.script().push(&Step::pin(USER_PIN)).unwrap();
    let request = client
        .send(
            "sign.batch",
            json!({"certificateId": id, "items": batch_items(&docs), "display": {"title": "Thousand"}}),
        )
        .await
        .unwrap();
    // Pull the token out at the first progress event.
    loop {
        let message = client.next_message().await.unwrap();
        if let tokio_tungstenite::tungstenite::Message::Text(text) = message {
            let v: Value = serde_json::from_str(text.as_str()).unwrap();
            if v["method"] == "sign.progress" {
                agent.set_fault("token_removed=1\n").unwrap();
                break;
            }
            assert!(v.get("id").is_none(), "answered before any progress: {v}");
        }
    }
    let e = client.response(request).await.unwrap().unwrap_err();
    assert_eq!(e.reason, "TOKEN_NOT_PRESENT", "{e:?}");
    let completed = e.data["completed"].as_u64().unwrap() as usize;
    let results = e.data["results"].as_array().unwrap();
    assert!((1..1000).contains(&completed), "{completed}");
    assert_eq!(results.len(), completed);
    // Check the first, the last and every 50th (each check runs OpenSSL and Python).
    for (i, r) in results.iter().enumerate() {
        if i == 0 || i + 1 == completed || i % 50 == 0 {
            verify_raw(
                &tk.cert_pem("sign-rsa3072"),
                &Signed::Digest(Hash::Sha256.digest(&docs[i])),
                &unb64(&r["signature"]).unwrap(),
                RawAlg::RsaPkcs1(Hash::Sha256),
            )
            .unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_always_persists_and_shows_in_origins_list() {
    let tk = new_token();
    let newcomer = "https://newcomer.example";
    let agent = Agent::start(&tk, AgentOptions::default()).unwrap();
    let mut client = agent.connect(newcomer).await.unwrap();
    // "Allow always" is the third button: remembering takes a deliberate choice.
    agent
        .script()
        .push_all(&[Step::confirm(Button::Notok).expect(Command::Confirm)])
        .unwrap();
    let access = client
        .call_ok("origin.requestAccess", json!({}))
        .await
        .unwrap();
    assert_eq!(access, json!({"approved": true, "remembered": true}));
    let dialog = &agent.script().dialogs().unwrap()[0];
    assert!(dialog
        .description
        .as_deref()
        .unwrap_or_default()
        .contains(newcomer));
    let stored = std::fs::read_to_string(agent.origins_file()).unwrap();
    assert!(stored.contains(newcomer), "{stored}");
    let out = agent.keyport(&["origins", "list"]).unwrap();
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with(newcomer) && l.contains("Allowed")),
        "{listed}"
    );
    // A new connection is approved without asking.
    let mut again = agent.connect(newcomer).await.unwrap();
    let hello = again.call_ok("hello", json!({})).await.unwrap();
    assert_eq!(hello["originApproved"], true);
    again.call_ok("tokens.list", json!({})).await.unwrap();
    assert_eq!(agent.script().dialogs().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_once_lasts_for_the_connection_only() {
    let tk = new_token();
    let newcomer = "https://once.example";
    let agent = Agent::start(&tk, AgentOptions::default()).unwrap();
    let mut client = agent.connect(newcomer).await.unwrap();
    // A method that needs approval asks for it first; OK (Enter) allows this connection only.
    agent
        .script()
        .push(&Step::confirm(Button::Ok).expect(Command::Confirm))
        .unwrap();
    client.call_ok("tokens.list", json!({})).await.unwrap();
    let hello = client.call_ok("hello", json!({})).await.unwrap();
    assert_eq!(hello["originApproved"], true);
    let access = client
        .call_ok("origin.requestAccess", json!({}))
        .await
        .unwrap();
    assert_eq!(access, json!({"approved": true, "remembered": false}));
    let stored = std::fs::read_to_string(agent.origins_file()).unwrap_or_default();
    assert!(!stored.contains(newcomer), "{stored}");
    let mut again = agent.connect(newcomer).await.unwrap();
    let hello = again.call_ok("hello", json!({})).await.unwrap();
    assert_eq!(hello["originApproved"], false);
    // Asked again on the new connection; this time the user closes the dialog.
    agent.script().push(&Step::cancel()).unwrap();
    let e = again
        .call("tokens.list", json!({}))
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        e.reason == "ORIGIN_DENIED" || e.reason == "USER_CANCELLED",
        "{e:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_is_origin_denied_and_remembered_until_restart() {
    let tk = new_token();
    let stranger = "https://stranger.example";
    let agent = Agent::start(&tk, AgentOptions::default()).unwrap();
    let mut client = agent.connect(stranger).await.unwrap();
    agent
        .script()
        .push(&Step::confirm(Button::Cancel).expect(Command::Confirm))
        .unwrap();
    let e = client
        .call_err("origin.requestAccess", json!({}), "ORIGIN_DENIED")
        .await
        .unwrap();
    assert_eq!(e.code, 1001);
    // The same connection gets ORIGIN_DENIED without asking again.
    client
        .call_err("certificates.list", json!({}), "ORIGIN_DENIED")
        .await
        .unwrap();
    // A new connection (since aaf1ff9 the user's denial is not a 403, so the page can tell it
    // from a stopped agent) is refused every method, again without a dialog.
    match Client::try_connect(agent.port(), Some(stranger), None)
        .await
        .unwrap()
    {
        Err(status) => assert_eq!(status, 403),
        Ok(mut again) => {
            let hello = again.call_ok("hello", json!({})).await.unwrap();
            assert_eq!(hello["originApproved"], false);
            for method in ["tokens.list", "certificates.list", "origin.requestAccess"] {
                again
                    .call_err(method, json!({}), "ORIGIN_DENIED")
                    .await
                    .unwrap();
            }
        }
    }
    assert_eq!(agent.script().dialogs().unwrap().len(), 1);
    let stored = std::fs::read_to_string(agent.origins_file()).unwrap_or_default();
    assert!(
        !stored.contains(stranger),
        "a dialog denial is not persisted: {stored}"
    );
    // Other origins are unaffected.
    let mut portal = agent.connect(PORTAL).await.unwrap();
    portal.call_ok("tokens.list", json!({})).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_whose_dialog_cannot_be_answered_is_not_approved() {
    let tk = new_token();
    let agent = Agent::start(&tk, AgentOptions::default()).unwrap();
    let mut client = agent.connect("https://noanswer.example").await.unwrap();
    // An empty script: the scripted pinentry reports "script exhausted" and fails the dialog.
    let e = client
        .call("tokens.list", json!({}))
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        ["ORIGIN_NOT_APPROVED", "USER_CANCELLED", "ORIGIN_DENIED"].contains(&e.reason.as_str()),
        "{e:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_events_go_only_to_the_requesting_connection() {
    let tk = new_token();
    let agent = Agent::start(
        &tk,
        AgentOptions::default().allowed(&[PORTAL, "https://other.example"]),
    )
    .unwrap();
    let (mut client, id) = portal(&agent, &tk).await;
    let mut same_origin = agent.connect(PORTAL).await.unwrap();
    let mut other = agent.connect("https://other.example").await.unwrap();
    let mut stranger = agent.connect("https://stranger.example").await.unwrap();
    agent.script().push(&Step::pin(USER_PIN)).unwrap();
    let docs: Vec<Vec<u8>> = (0..30).map(|i| format!("p {i}").into_bytes()).collect();
    client
        .call_ok(
            "sign.batch",
            json!({"certificateId": id, "items": batch_items(&docs), "display": {"title": "P"}}),
        )
        .await
        .unwrap();
    assert!(client
        .notifications
        .iter()
        .any(|n| n["method"] == "sign.progress"));
    // A round trip on each other connection: anything sent to them before it has arrived.
    for c in [&mut same_origin, &mut other, &mut stranger] {
        c.call_ok("hello", json!({})).await.unwrap();
        assert!(c.notifications.is_empty(), "{:?}", c.notifications);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_dialog_open_exits_zero_and_closes_the_connection() {
    let tk = new_token();
    let mut agent = Agent::start(&tk, AgentOptions::default()).unwrap();
    let (mut client, id) = portal(&agent, &tk).await;
    agent.script().push(&Step::hang()).unwrap();
    let pending = client
        .send("sign", sign_params(&id, &[12; 32]))
        .await
        .unwrap();
    let pid = wait_for_hanging_dialog(&agent);
    let status = agent.stop().unwrap();
    assert!(status.success(), "keyport exited with {status}");
    let closed = client.wait_closed().await.unwrap();
    assert!(
        matches!(closed, Closed::Code(1001) | Closed::Code(1000))
            || matches!(closed, Closed::Abrupt(_)),
        "{closed:?}"
    );
    // The pending request was answered (cancelled) before the close frame.
    let answer = client.response(pending).await.unwrap();
    assert_eq!(answer.unwrap_err().reason, "USER_CANCELLED");
    assert_process_ends(pid);
}
