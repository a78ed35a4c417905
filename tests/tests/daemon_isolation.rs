//! Vendor libraries in their own process (`module_isolation = true`): the fault module crashes
//! (SIGSEGV, abort, exit), hangs (in C_Sign, in C_GetTokenInfo) or deadlocks for good, during
//! `sign`, `sign.batch` and `tokens.list`. The agent answers the documented error within the
//! deadline, stays up and serves another origin meanwhile, restarts the module host, reports
//! the token's going and coming back with `tokens.changed`, and the next request signs and
//! verifies; the audit log records each failure and `keyport audit --verify` passes.
#![allow(clippy::unwrap_used)] // a test fails by panicking

use std::time::{Duration, Instant};

use keyport_e2e::harness::{
    b64, certificate_ids, unb64, verify_raw, Agent, AgentOptions, Client, Hash, RawAlg, Signed,
    TestToken, DEADLINE, PORTAL, TOKEN_LABEL, USER_PIN,
};
use keyport_e2e::pinentry::Step;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// The agent's `token_wait_seconds`: the deadline of each call to a module host.
const TOKEN_WAIT: u64 = 2;
/// A second approved origin, served while the first one's module host fails.
const OTHER: &str = "https://other.example";

fn sign_params(id: &str, digest: &[u8]) -> Value {
    json!({
        "certificateId": id,
        "digest": {"algorithm": "SHA-256", "value": b64(digest)},
        "display": {"title": "Isolation test"},
    })
}

/// An agent with module hosts over the fault module, a portal connection, the P-256 signing
/// certificate's id.
async fn start(tk: &TestToken) -> (Agent, Client, String) {
    let options = AgentOptions {
        token_wait_seconds: Some(TOKEN_WAIT),
        extra_toml: vec!["module_isolation = true".into()],
        ..AgentOptions::default().fault()
    }
    .allowed(&[PORTAL, OTHER]);
    let agent = Agent::start(tk, options).unwrap();
    let mut client = agent.connect(PORTAL).await.unwrap();
    let id = certificate_ids(&mut client, tk).await.unwrap()["sign-p256"].clone();
    (agent, client, id)
}

/// Waits (bounded) for a `tokens.changed` event whose list does (`present`) or does not hold
/// the test token. Call with no request in flight on `client`.
async fn tokens_changed(client: &mut Client, present: bool) {
    let until = Instant::now() + DEADLINE;
    let mut checked = 0;
    loop {
        for e in &client.notifications[checked..] {
            if e["method"] == "tokens.changed" {
                let has = e["params"]["tokens"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|t| t["label"] == TOKEN_LABEL);
                if has == present {
                    client.notifications.clear();
                    return;
                }
            }
        }
        checked = client.notifications.len();
        let left = until.saturating_duration_since(Instant::now());
        let message = tokio::time::timeout(left, client.next_message())
            .await
            .unwrap_or_else(|_| panic!("no tokens.changed with the token present={present}"))
            .unwrap();
        if let Message::Text(text) = message {
            let value: Value = serde_json::from_str(text.as_str()).unwrap();
            assert!(
                value.get("id").is_none(),
                "no request is in flight: {value}"
            );
            client.notifications.push(value);
        }
    }
}

/// The token is gone from `tokens.changed` and comes back (a new module host listed it).
async fn token_goes_and_comes_back(client: &mut Client) {
    tokens_changed(client, false).await;
    tokens_changed(client, true).await;
}

/// The next signature works and verifies with OpenSSL.
async fn next_signature_verifies(agent: &Agent, client: &mut Client, tk: &TestToken, id: &str) {
    agent.set_fault("").unwrap();
    agent.script().push(&Step::pin(USER_PIN)).unwrap();
    let digest = Hash::Sha256.digest(b"after the module host failed");
    let result = client
        .call_ok("sign", sign_params(id, &digest))
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

/// Every failure is in the audit log with its reason, and the chain verifies.
fn audit_has_failures_and_verifies(agent: &Agent, reason: &str, at_least: usize) {
    let log = std::fs::read_to_string(agent.audit_log()).unwrap();
    let failures = log.lines().filter(|l| l.contains(reason)).count();
    assert!(
        failures >= at_least,
        "{failures} lines with {reason}:\n{log}"
    );
    assert!(!log.contains(USER_PIN));
    let out = agent.keyport(&["audit", "--verify"]).unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Sends a sign that fails in the module host; returns its error and how long it took.
async fn failing_sign(agent: &Agent, client: &mut Client, id: &str) -> (String, Duration) {
    agent.script().push(&Step::pin(USER_PIN)).unwrap();
    let t = Instant::now();
    let answer = tokio::time::timeout(DEADLINE, client.call("sign", sign_params(id, &[7; 32])))
        .await
        .expect("the sign is answered")
        .unwrap();
    (answer.unwrap_err().reason, t.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_in_c_sign_fails_the_sign_and_a_new_host_signs() {
    let tk = TestToken::provision().unwrap();
    let (agent, mut client, id) = start(&tk).await;
    let agent_pid = agent.pid();
    for how in ["segv", "abort", "exit"] {
        agent
            .set_fault(&format!("crash_on=C_Sign\ncrash_how={how}\n"))
            .unwrap();
        let (reason, took) = failing_sign(&agent, &mut client, &id).await;
        assert_eq!(reason, "TOKEN_ERROR", "{how}");
        agent.set_fault("").unwrap();
        token_goes_and_comes_back(&mut client).await;
        next_signature_verifies(&agent, &mut client, &tk, &id).await;
        eprintln!("measured: crash ({how}) in C_Sign answered TOKEN_ERROR in {took:?}");
    }
    assert_eq!(agent.pid(), agent_pid, "the agent itself never restarted");
    let stderr = agent.stderr();
    for how in ["SIGSEGV", "SIGABRT", "exited with status 1"] {
        assert!(
            stderr.contains(how),
            "the agent logged how the host ended: {how}\n{stderr}"
        );
    }
    audit_has_failures_and_verifies(&agent, "TOKEN_ERROR", 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_during_a_batch_fails_it_with_no_partial_result_and_a_new_host_signs() {
    let tk = TestToken::provision().unwrap();
    let (agent, mut client, id) = start(&tk).await;
    // The third signature (two C_Sign calls each: length, then signature) crashes the host.
    agent
        .set_fault("crash_on=C_SignInit\ncrash_how=segv\n")
        .unwrap();
    agent.script().push(&Step::pin(USER_PIN)).unwrap();
    let items: Vec<Value> = (0..5u8)
        .map(|i| json!({"digest": {"algorithm": "SHA-256", "value": b64(&[i; 32])}, "label": format!("doc {i}")}))
        .collect();
    let answer = client
        .call(
            "sign.batch",
            json!({"certificateId": id, "items": items, "display": {"title": "Batch"}}),
        )
        .await
        .unwrap();
    let e = answer.unwrap_err();
    assert_eq!(e.reason, "TOKEN_ERROR", "{e:?}");
    // Nothing was signed before the crash (it struck at the first C_SignInit): no results.
    let results = e.data["results"].as_array().map_or(0, Vec::len);
    assert_eq!(results, 0, "{e:?}");
    agent.set_fault("").unwrap();
    token_goes_and_comes_back(&mut client).await;
    next_signature_verifies(&agent, &mut client, &tk, &id).await;
    audit_has_failures_and_verifies(&agent, "TOKEN_ERROR", 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hang_in_c_sign_is_stopped_at_the_deadline_while_another_origin_is_served() {
    let tk = TestToken::provision().unwrap();
    let (agent, mut client, id) = start(&tk).await;
    agent.set_fault("hang_on=C_Sign\n").unwrap();
    agent.script().push(&Step::pin(USER_PIN)).unwrap();
    let t = Instant::now();
    let pending = client
        .send("sign", sign_params(&id, &[3; 32]))
        .await
        .unwrap();
    // Meanwhile another origin is served: hello, and a token listing within the deadline.
    let mut other = agent.connect(OTHER).await.unwrap();
    let hello = other.call_ok("hello", json!({})).await.unwrap();
    assert_eq!(hello["originApproved"], true);
    let listed = tokio::time::timeout(
        Duration::from_secs(3 * TOKEN_WAIT),
        other.call("tokens.list", json!({})),
    )
    .await
    .expect("tokens.list answers within the deadline")
    .unwrap();
    assert!(listed.is_ok() || listed.unwrap_err().reason == "BUSY");
    let answer = client.response(pending).await.unwrap();
    let took = t.elapsed();
    assert_eq!(answer.unwrap_err().reason, "TOKEN_ERROR");
    assert!(
        took < Duration::from_secs(TOKEN_WAIT + 10),
        "answered in {took:?}"
    );
    agent.set_fault("").unwrap();
    token_goes_and_comes_back(&mut client).await;
    next_signature_verifies(&agent, &mut client, &tk, &id).await;
    eprintln!("measured: a hang in C_Sign answered TOKEN_ERROR in {took:?} (token_wait_seconds = {TOKEN_WAIT})");
    audit_has_failures_and_verifies(&agent, "TOKEN_ERROR", 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hang_in_c_get_token_info_during_tokens_list_and_sign_recovers() {
    let tk = TestToken::provision().unwrap();
    let (agent, mut client, id) = start(&tk).await;
    agent.set_fault("hang_on=C_GetTokenInfo\n").unwrap();
    // tokens.list answers within the deadline, without the hung module's token.
    let t = Instant::now();
    let listed = client.call_ok("tokens.list", json!({})).await.unwrap();
    let listed_in = t.elapsed();
    assert!(
        !listed["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["label"] == TOKEN_LABEL),
        "{listed}"
    );
    // A sign on the hung module: TOKEN_ERROR or TOKEN_NOT_PRESENT (its token is gone with the
    // host), within the deadline, no PIN asked.
    let t = Instant::now();
    let answer = client
        .call("sign", sign_params(&id, &[4; 32]))
        .await
        .unwrap();
    let sign_in = t.elapsed();
    let reason = answer.unwrap_err().reason;
    assert!(
        ["TOKEN_ERROR", "TOKEN_NOT_PRESENT"].contains(&reason.as_str()),
        "{reason}"
    );
    agent.set_fault("").unwrap();
    tokens_changed(&mut client, true).await;
    next_signature_verifies(&agent, &mut client, &tk, &id).await;
    eprintln!(
        "measured: hang in C_GetTokenInfo: tokens.list {listed_in:?}, sign {reason} {sign_in:?} \
         (token_wait_seconds = {TOKEN_WAIT})"
    );
    let out = agent.keyport(&["audit", "--verify"]).unwrap();
    assert!(out.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadlock_for_good_in_c_sign_recovers_in_a_new_host() {
    let tk = TestToken::provision().unwrap();
    let (agent, mut client, id) = start(&tk).await;
    // Once deadlocked, the module never answers again in that process, whatever the control
    // file says: only a new host recovers.
    agent.set_fault("deadlock_on=C_Sign\n").unwrap();
    let (reason, took) = failing_sign(&agent, &mut client, &id).await;
    assert_eq!(reason, "TOKEN_ERROR");
    agent.set_fault("").unwrap();
    token_goes_and_comes_back(&mut client).await;
    let t = Instant::now();
    next_signature_verifies(&agent, &mut client, &tk, &id).await;
    eprintln!(
        "measured: deadlock in C_Sign answered TOKEN_ERROR in {took:?}; the next sign took {:?}",
        t.elapsed()
    );
    audit_has_failures_and_verifies(&agent, "TOKEN_ERROR", 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_shows_a_row_per_module_host() {
    let tk = TestToken::provision().unwrap();
    let (agent, _client, _id) = start(&tk).await;
    let out = agent.keyport(&["doctor"]).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let row = stdout
        .lines()
        .skip_while(|l| !l.starts_with("Module hosts"))
        .nth(1)
        .unwrap_or_else(|| panic!("no module host rows:\n{stdout}"));
    assert!(row.contains("libkeyport_fault_pkcs11"), "{row}");
    let pid: u32 = row
        .split_whitespace()
        .skip_while(|w| *w != "pid")
        .nth(1)
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("a pid in {row}"));
    assert!(pid > 0);
    assert!(
        row.contains("restarts 0") && row.contains("last failure: none"),
        "{row}"
    );
}

/// A module host ends with the agent, even when the agent is killed outright (no SIGTERM, no
/// clean-up) while the host is stuck in the module: the host sees its socket close and exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn module_hosts_exit_when_the_agent_is_killed_even_while_a_call_hangs() {
    let tk = TestToken::provision().unwrap();
    let (mut agent, mut client, id) = start(&tk).await;
    let hosts = agent.children();
    assert!(!hosts.is_empty(), "no module host runs");
    agent.set_fault("hang_on=C_Sign\n").unwrap();
    agent.script().push(&Step::pin(USER_PIN)).unwrap();
    let _pending = client
        .send("sign", sign_params(&id, &[9; 32]))
        .await
        .unwrap();
    let until = Instant::now() + DEADLINE;
    while !agent.fault_log().iter().any(|l| l == "C_Sign hang") {
        assert!(Instant::now() < until, "the host never reached C_Sign");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    agent.kill().unwrap();
    let until = Instant::now() + DEADLINE;
    loop {
        let alive: Vec<u32> = hosts.iter().copied().filter(|p| running(*p)).collect();
        if alive.is_empty() {
            break;
        }
        assert!(
            Instant::now() < until,
            "module hosts {alive:?} still run {DEADLINE:?} after the agent was killed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// True while `pid` exists and is not a zombie waiting to be reaped.
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

/// Issue 12: with the session's consent given, a signature asks the module for no login state
/// first (the token says when it is not logged in). A module host that restarted between
/// signatures took its login with it: the next signature is refused by the token with no
/// signature made, asks for the PIN once, logs in once, and signs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consented_session_whose_host_restarted_asks_the_pin_once_and_signs() {
    let tk = TestToken::provision().unwrap();
    let options = AgentOptions {
        token_wait_seconds: Some(TOKEN_WAIT),
        session_consent_origins: vec![PORTAL.to_owned()],
        pin_cache_seconds: 600,
        extra_toml: vec!["module_isolation = true".into()],
        ..AgentOptions::default().fault()
    };
    let agent = Agent::start(&tk, options).unwrap();
    let mut client = agent.connect(PORTAL).await.unwrap();
    let id = certificate_ids(&mut client, &tk).await.unwrap()["sign-p256"].clone();
    // The session's consent and the login: one dialog. The next signatures ask nothing.
    agent.script().push(&Step::pin(USER_PIN)).unwrap();
    for i in 0..3u8 {
        client
            .call_ok("sign", sign_params(&id, &[i; 32]))
            .await
            .unwrap();
    }
    assert_eq!(agent.script().dialogs().unwrap().len(), 1);
    assert_eq!(agent.fault_calls("C_Login"), 1);

    let hosts = agent.children();
    assert_eq!(hosts.len(), 1, "one module host: {hosts:?}");
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &hosts[0].to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    token_goes_and_comes_back(&mut client).await;

    let signs_before = agent.fault_calls("C_SignInit");
    next_signature_verifies(&agent, &mut client, &tk, &id).await;
    let dialogs = agent.script().dialogs().unwrap();
    assert_eq!(dialogs.len(), 2, "one PIN dialog more: {dialogs:?}");
    assert_eq!(
        dialogs[1].command.as_deref(),
        Some("GETPIN"),
        "a PIN dialog: {:?}",
        dialogs[1]
    );
    assert_eq!(agent.fault_calls("C_Login"), 2, "one login more");
    assert_eq!(
        agent.fault_calls("C_SignInit") - signs_before,
        1,
        "no signature before the login"
    );
}
