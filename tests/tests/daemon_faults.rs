//! A PKCS#11 module that hangs (the fault module's `hang_sign=1`: C_Sign blocks until the
//! control file changes) must not hang the agent: the page's `cancel` is answered, other
//! requests answer within `token_wait_seconds`, the token works again once the module does,
//! and SIGTERM still ends the agent.
#![allow(clippy::unwrap_used)] // a test fails by panicking

use std::time::{Duration, Instant};

use keyport_e2e::harness::{
    b64, certificate_ids, unb64, verify_raw, Agent, AgentOptions, Client, Hash, RawAlg, Signed,
    TestToken, PORTAL, TOKEN_LABEL, USER_PIN,
};
use keyport_e2e::pinentry::Step;
use serde_json::{json, Value};

/// The agent's `token_wait_seconds` in these tests.
const TOKEN_WAIT: u64 = 2;

fn sign_params(id: &str, digest: &[u8]) -> Value {
    json!({
        "certificateId": id,
        "digest": {"algorithm": "SHA-256", "value": b64(digest)},
        "display": {"title": "Fault test"},
    })
}

/// An agent over the fault module with a short token wait, a portal connection, and the id of
/// the P-256 signing certificate.
async fn start(tk: &TestToken) -> (Agent, Client, String) {
    let options = AgentOptions {
        token_wait_seconds: Some(TOKEN_WAIT),
        // The module inside the agent, where a hung C_Sign can only be waited out (BUSY);
        // daemon_isolation.rs has the same faults with module hosts, which are stopped.
        extra_toml: vec!["module_isolation = false".into()],
        ..AgentOptions::default().fault()
    };
    let agent = Agent::start(tk, options).unwrap();
    let mut client = agent.connect(PORTAL).await.unwrap();
    let id = certificate_ids(&mut client, tk).await.unwrap()["sign-p256"].clone();
    (agent, client, id)
}

/// Waits (bounded) until the fault module logged a return from `function`. The log is the only
/// witness of how far a hanging signature got: after C_SignInit returns, the next call is the
/// C_Sign that hangs (the cancel flag is checked before C_SignInit).
async fn wait_for_fault_call(agent: &Agent, function: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while agent.fault_calls(function) == 0 {
        assert!(
            Instant::now() < deadline,
            "the fault module never logged {function}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Starts a signature that hangs in C_Sign; returns its request id.
async fn hang_a_signature(agent: &Agent, client: &mut Client, id: &str) -> u64 {
    agent.set_fault("hang_sign=1\n").unwrap();
    agent.script().push(&Step::pin(USER_PIN)).unwrap();
    let pending = client
        .send("sign", sign_params(id, &[1; 32]))
        .await
        .unwrap();
    wait_for_fault_call(agent, "C_SignInit").await;
    pending
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_signature_is_cancelled_in_bounded_time_and_the_token_recovers() {
    let tk = TestToken::provision().unwrap();
    let (agent, mut client, id) = start(&tk).await;
    let pending = hang_a_signature(&agent, &mut client, &id).await;

    // The page cancels: USER_CANCELLED comes while C_Sign still hangs.
    let t = Instant::now();
    let cancel = client
        .call("cancel", json!({"requestId": pending}))
        .await
        .unwrap();
    assert!(cancel.is_ok(), "{cancel:?}");
    let answer = tokio::time::timeout(Duration::from_secs(5), client.response(pending))
        .await
        .expect("USER_CANCELLED within 5 s of the cancel")
        .unwrap();
    let cancelled_in = t.elapsed();
    assert_eq!(answer.unwrap_err().reason, "USER_CANCELLED");
    assert_eq!(agent.fault_calls("C_Sign"), 0, "C_Sign is still hanging");

    // tokens.list answers within the token wait (the hung module's last known tokens), and
    // a new signature on the hung token is BUSY at once, with no dialog.
    let t = Instant::now();
    let listed = tokio::time::timeout(
        Duration::from_secs(2 * TOKEN_WAIT),
        client.call("tokens.list", json!({})),
    )
    .await
    .expect("tokens.list answers within the token wait")
    .unwrap();
    let listed_in = t.elapsed();
    match listed {
        Ok(v) => assert!(
            v["tokens"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["label"] == TOKEN_LABEL),
            "{v}"
        ),
        Err(e) => assert_eq!(e.reason, "BUSY", "{e:?}"),
    }
    let t = Instant::now();
    let e = tokio::time::timeout(
        Duration::from_secs(2 * TOKEN_WAIT),
        client.call_err("sign", sign_params(&id, &[2; 32]), "BUSY"),
    )
    .await
    .expect("a sign on the hung token answers within the token wait")
    .unwrap();
    let busy_in = t.elapsed();
    assert_eq!(e.code, 1009);
    assert_eq!(
        agent.script().dialogs().unwrap().len(),
        1,
        "no second dialog"
    );
    eprintln!(
        "measured: USER_CANCELLED {cancelled_in:?} after the cancel; tokens.list {listed_in:?}; \
         BUSY sign {busy_in:?} (token_wait_seconds = {TOKEN_WAIT})"
    );

    // The module answers again: the next signature works and verifies.
    agent.set_fault("").unwrap();
    agent.script().push(&Step::pin(USER_PIN)).unwrap();
    let digest = Hash::Sha256.digest(b"after the hang");
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_a_module_hangs_exits_zero() {
    let tk = TestToken::provision().unwrap();
    let (mut agent, mut client, id) = start(&tk).await;
    let _pending = hang_a_signature(&agent, &mut client, &id).await;
    let t = Instant::now();
    // `stop` sends SIGTERM and fails if the agent is not gone within 30 s.
    let status = agent.stop().unwrap();
    let stopped_in = t.elapsed();
    assert!(status.success(), "keyport exited with {status}");
    assert!(
        stopped_in < Duration::from_secs(10),
        "SIGTERM took {stopped_in:?}"
    );
    assert_eq!(agent.fault_calls("C_Sign"), 0, "C_Sign hung to the end");
    eprintln!("measured: exit {stopped_in:?} after SIGTERM with C_Sign hanging");
}
