//! The audit log the running agent writes: a line per sign, refusal and login, a chain that
//! `keyport audit --verify` proves whole, and an edited line it names.
#![allow(clippy::unwrap_used)] // a test fails by panicking

use keyport_e2e::harness::{
    b64, certificate_ids, nonce, Agent, AgentOptions, Hash, TestToken, PORTAL, USER_PIN,
};
use keyport_e2e::pinentry::Step;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signs_refusals_and_logins_are_audited_and_the_chain_verifies() {
    let token = TestToken::provision().unwrap();
    let agent = Agent::start(&token, AgentOptions::default()).unwrap();
    let mut client = agent.connect(PORTAL).await.unwrap();
    let ids = certificate_ids(&mut client, &token).await.unwrap();
    let digest = Hash::Sha256.digest(b"audited document");
    let params = json!({
        "certificateId": ids["sign-p256"],
        "digest": {"algorithm": "SHA-256", "value": b64(&digest)},
        "display": {"title": "Audited"},
    });
    // A granted sign, a refused one (the user cancels), a login, and a key-usage refusal.
    agent
        .script()
        .push_all(&[Step::pin(USER_PIN), Step::cancel(), Step::pin(USER_PIN)])
        .unwrap();
    client.call_ok("sign", params.clone()).await.unwrap();
    client
        .call_err("sign", params.clone(), "USER_CANCELLED")
        .await
        .unwrap();
    client
        .call_ok("authenticate", json!({"challenge": nonce(32).unwrap()}))
        .await
        .unwrap();
    client
        .call_err(
            "sign",
            json!({"certificateId": ids["auth-p256"], "digest": {"algorithm": "SHA-256", "value": b64(&digest)}, "display": {"title": "x"}}),
            "KEY_USAGE_NOT_ALLOWED",
        )
        .await
        .unwrap();

    let lines: Vec<Value> = std::fs::read_to_string(agent.audit_log())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4, "{lines:?}");
    let text: Vec<String> = lines.iter().map(Value::to_string).collect();
    for line in &text {
        assert!(line.contains(PORTAL), "{line}");
    }
    let hex_digest = hex::encode(&digest);
    assert!(
        text[0].contains("sign") && text[0].contains(&hex_digest),
        "{}",
        text[0]
    );
    assert!(text[0].contains("Test Signer P-256"), "{}", text[0]);
    assert!(text[0].to_lowercase().contains("granted"), "{}", text[0]);
    assert!(text[1].contains("USER_CANCELLED"), "{}", text[1]);
    assert!(
        text[2].contains("authenticate") && text[2].contains("Test Client P-256"),
        "{}",
        text[2]
    );
    assert!(text[3].contains("KEY_USAGE_NOT_ALLOWED"), "{}", text[3]);
    // The PIN is nowhere.
    let raw = std::fs::read_to_string(agent.audit_log()).unwrap();
    assert!(!raw.contains(USER_PIN));

    // `keyport audit` prints them; `--verify` proves the chain.
    let out = agent.keyport(&["audit"]).unwrap();
    assert!(out.status.success());
    let printed = String::from_utf8_lossy(&out.stdout);
    assert_eq!(printed.lines().count(), 4, "{printed}");
    assert!(printed.lines().all(|l| l.contains(PORTAL)), "{printed}");
    let out = agent.keyport(&["audit", "--verify"]).unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Edit line 2 (the refusal becomes a grant): --verify fails and names line 2.
    let edited: Vec<String> = raw
        .lines()
        .enumerate()
        .map(|(i, l)| {
            if i == 1 {
                l.replace("USER_CANCELLED", "GRANTED_BY_EDIT")
            } else {
                l.to_owned()
            }
        })
        .collect();
    assert_ne!(edited.join("\n"), raw.trim_end());
    std::fs::write(agent.audit_log(), edited.join("\n") + "\n").unwrap();
    let out = agent.keyport(&["audit", "--verify"]).unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(report.contains("line 2"), "{report}");
    assert!(!report.contains("line 1:"), "{report}");
}
