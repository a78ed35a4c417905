//! A page's parallel requests through the real `keyport run` (docs/protocol.md, "Limits"): a
//! request that needs no dialog never waits for another's dialog; one that needs a dialog while
//! its origin shows one waits its turn in order (at most 4 waiting; the next gets BUSY at once)
//! and can be cancelled while it waits.
#![allow(clippy::unwrap_used)] // a test fails by panicking

use std::time::Duration;

use keyport_e2e::harness::{
    b64, certificate_ids, unb64, verify_raw, Agent, AgentOptions, Client, Hash, RawAlg, Signed,
    TestToken, PORTAL, USER_PIN,
};
use keyport_e2e::pinentry::{Button, Entry, Step};
use serde_json::{json, Value};

fn sign_params(id: &str, digest: &[u8]) -> Value {
    json!({"certificateId": id, "digest": {"algorithm": "SHA-256", "value": b64(digest)},
           "display": {"title": "Parallel"}})
}

fn session_options() -> AgentOptions {
    AgentOptions {
        session_consent_origins: vec![PORTAL.to_owned()],
        pin_cache_seconds: 600,
        limits: vec!["requests_per_second = 1000".to_owned()],
        ..AgentOptions::default()
    }
    .fault()
}

/// Waits until a pinentry answered `hang` (a dialog is open and stays open).
fn wait_for_hanging_dialog(agent: &Agent) {
    agent
        .script()
        .wait_for(Duration::from_secs(30), |e: &[Entry]| {
            e.iter().any(|e| e.answered.as_deref() == Some("hang"))
        })
        .unwrap();
}

/// Signs `n` digests pipelined on one connection; returns every answer with its digest.
async fn sign_many(
    mut client: Client,
    id: String,
    tag: u8,
    n: usize,
) -> (Client, Vec<(Vec<u8>, Result<Value, String>)>) {
    let mut pending = Vec::with_capacity(n);
    for i in 0..n {
        let digest = Hash::Sha256.digest(&[tag, (i % 256) as u8, (i / 256) as u8]);
        let rid = client
            .send("sign", sign_params(&id, &digest))
            .await
            .unwrap();
        pending.push((rid, digest));
    }
    let mut out = Vec::with_capacity(n);
    for (rid, digest) in pending {
        let answer = client.response(rid).await.unwrap();
        out.push((digest, answer.map_err(|e| e.reason)));
    }
    (client, out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_connections_with_session_consent_sign_200_times_each_concurrently() {
    let tk = TestToken::provision().unwrap();
    let agent = Agent::start(&tk, session_options()).unwrap();
    let mut a = agent.connect(PORTAL).await.unwrap();
    let mut b = agent.connect(PORTAL).await.unwrap();
    let ids = certificate_ids(&mut a, &tk).await.unwrap();
    let id = ids["sign-p256"].clone();
    // Consent once per connection (the first also logs in; the second only confirms).
    agent
        .script()
        .push_all(&[Step::pin(USER_PIN), Step::confirm(Button::Ok)])
        .unwrap();
    a.call_ok("sign", sign_params(&id, &[1; 32])).await.unwrap();
    b.call_ok("sign", sign_params(&id, &[2; 32])).await.unwrap();
    assert_eq!(agent.script().dialogs().unwrap().len(), 2);

    let (ra, rb) = tokio::join!(
        sign_many(a, id.clone(), 0xA, 200),
        sign_many(b, id.clone(), 0xB, 200)
    );
    let pem = tk.cert_pem("sign-p256");
    for (who, (_, answers)) in [("a", ra), ("b", rb)] {
        assert_eq!(answers.len(), 200);
        let failed: Vec<&String> = answers
            .iter()
            .filter_map(|(_, r)| r.as_ref().err())
            .collect();
        assert!(failed.is_empty(), "{who}: {failed:?}");
        // OpenSSL and Python check a spread of them (all 400 would only repeat the check).
        for (digest, answer) in answers.iter().step_by(40) {
            let sig = unb64(&answer.as_ref().unwrap()["signature"]).unwrap();
            verify_raw(
                &pem,
                &Signed::Digest(digest.clone()),
                &sig,
                RawAlg::EcdsaDer(Hash::Sha256),
            )
            .unwrap();
        }
    }
    assert_eq!(
        agent.script().dialogs().unwrap().len(),
        2,
        "no dialog after consent"
    );
    assert_eq!(agent.fault_calls("C_Login"), 1, "one login, cached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_a_dialog_is_open_a_dialog_free_request_signs_and_a_third_waits_then_succeeds() {
    let tk = TestToken::provision().unwrap();
    let agent = Agent::start(&tk, session_options()).unwrap();
    let mut a = agent.connect(PORTAL).await.unwrap();
    let mut b = agent.connect(PORTAL).await.unwrap();
    let mut c = agent.connect(PORTAL).await.unwrap();
    let ids = certificate_ids(&mut a, &tk).await.unwrap();
    let id = ids["sign-p256"].clone();
    // `a` consents once and logs in.
    agent.script().push(&Step::pin(USER_PIN)).unwrap();
    a.call_ok("sign", sign_params(&id, &[1; 32])).await.unwrap();

    // `b` has not consented: its dialog opens and stays open.
    agent.script().push(&Step::hang()).unwrap();
    let open = b.send("sign", sign_params(&id, &[2; 32])).await.unwrap();
    wait_for_hanging_dialog(&agent);
    agent.script().push(&Step::confirm(Button::Ok)).unwrap();
    // `c` needs a dialog too: it waits its turn.
    let digest = Hash::Sha256.digest(b"third");
    let waiting = c.send("sign", sign_params(&id, &digest)).await.unwrap();
    // `a` needs none: it signs at once, dialog open or not.
    let quick = tokio::time::timeout(
        Duration::from_secs(10),
        a.call_ok("sign", sign_params(&id, &[3; 32])),
    )
    .await
    .expect("a request with no dialog does not wait for the open one")
    .unwrap();
    assert!(quick["signature"].is_string());
    assert_eq!(agent.script().dialogs().unwrap().len(), 2, "c still waits");

    // The open dialog is cancelled: `c`'s turn comes, its dialog is answered, it signs.
    b.call_ok("cancel", json!({"requestId": open}))
        .await
        .unwrap();
    assert_eq!(
        b.response(open).await.unwrap().unwrap_err().reason,
        "USER_CANCELLED"
    );
    let signed = c.response(waiting).await.unwrap().unwrap();
    verify_raw(
        &tk.cert_pem("sign-p256"),
        &Signed::Digest(digest),
        &unb64(&signed["signature"]).unwrap(),
        RawAlg::EcdsaDer(Hash::Sha256),
    )
    .unwrap();
    assert_eq!(agent.script().dialogs().unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_requests_wait_for_an_open_dialog_and_a_fifth_is_busy_at_once() {
    let tk = TestToken::provision().unwrap();
    let agent = Agent::start(&tk, AgentOptions::default().fault()).unwrap();
    let mut first = agent.connect(PORTAL).await.unwrap();
    let ids = certificate_ids(&mut first, &tk).await.unwrap();
    let id = ids["sign-p256"].clone();
    agent.script().push(&Step::hang()).unwrap();
    let open = first
        .send("sign", sign_params(&id, &[9; 32]))
        .await
        .unwrap();
    wait_for_hanging_dialog(&agent);
    // Answers for the four that will get their turn.
    agent
        .script()
        .push_all(&[
            Step::pin(USER_PIN),
            Step::pin(USER_PIN),
            Step::pin(USER_PIN),
            Step::pin(USER_PIN),
        ])
        .unwrap();

    // Five more requests, each on its own connection, all needing a dialog.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut digests = Vec::new();
    for i in 0..5u8 {
        let mut client = agent.connect(PORTAL).await.unwrap();
        let digest = Hash::Sha256.digest(&[i; 3]);
        digests.push(digest.clone());
        let rid = client
            .send("sign", sign_params(&id, &digest))
            .await
            .unwrap();
        let tx = tx.clone();
        tokio::spawn(async move {
            let answer = client.response(rid).await.unwrap();
            let _ = tx.send((usize::from(i), answer));
            client
        });
    }
    // The one beyond the four waiting is told BUSY at once; the others keep waiting.
    let (busy_index, busy) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("BUSY at once for the fifth waiting request")
        .unwrap();
    assert_eq!(busy.unwrap_err().reason, "BUSY");
    assert!(rx.try_recv().is_err(), "the four others wait");
    assert_eq!(agent.script().dialogs().unwrap().len(), 1);

    // The open dialog's request is cancelled: the four waiting get their turns and sign.
    first
        .call_ok("cancel", json!({"requestId": open}))
        .await
        .unwrap();
    let mut signed = 0;
    while signed < 4 {
        let (i, answer) = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .expect("each waiting request gets its turn")
            .unwrap();
        assert_ne!(i, busy_index);
        let sig = unb64(&answer.unwrap()["signature"]).unwrap();
        verify_raw(
            &tk.cert_pem("sign-p256"),
            &Signed::Digest(digests[i].clone()),
            &sig,
            RawAlg::EcdsaDer(Hash::Sha256),
        )
        .unwrap();
        signed += 1;
    }
    assert_eq!(agent.script().dialogs().unwrap().len(), 5);
}

/// Issue 12: signatures with the session's consent cost the module no search of the token's
/// objects each (the certificate comes from a listing of every certificate, kept for a
/// second, not from a lookup on its token, whose check for changes searches every object) and
/// no probe of the login state (C_GetSlotInfo: the token says if it is not logged in). The
/// login drops the certificate cache, so the signatures after it find none at first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consented_signatures_search_no_objects_and_probe_no_login_state_each() {
    let tk = TestToken::provision().unwrap();
    let agent = Agent::start(&tk, session_options()).unwrap();
    let mut a = agent.connect(PORTAL).await.unwrap();
    let id = certificate_ids(&mut a, &tk).await.unwrap()["sign-p256"].clone();
    agent.script().push(&Step::pin(USER_PIN)).unwrap();
    a.call_ok("sign", sign_params(&id, &[1; 32])).await.unwrap();

    let searches = agent.fault_calls("C_FindObjectsInit");
    let probes = agent.fault_calls("C_GetSlotInfo");
    let signs = 60;
    let started = std::time::Instant::now();
    let (_, answers) = sign_many(a, id.clone(), 0xC, signs).await;
    let elapsed = started.elapsed();
    assert!(answers.iter().all(|(_, r)| r.is_ok()), "{answers:?}");
    // At most one listing a second (each: one search for changes, and after the login one
    // scan of a few searches), whatever the number of signatures.
    let listings = elapsed.as_secs() as usize + 2;
    let searched = agent.fault_calls("C_FindObjectsInit") - searches;
    let probed = agent.fault_calls("C_GetSlotInfo") - probes;
    assert!(
        searched <= 4 * listings && searched < signs / 2,
        "{searched} searches for {signs} signatures in {elapsed:?}"
    );
    assert!(
        probed <= listings && probed < signs / 2,
        "{probed} C_GetSlotInfo for {signs} signatures in {elapsed:?}"
    );
    assert_eq!(agent.script().dialogs().unwrap().len(), 1);
}
