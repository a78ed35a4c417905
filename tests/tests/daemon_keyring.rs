//! The audit key in the OS keyring, end to end: `keyport run` with no `audit_key_file` keeps the
//! key in a real Secret Service (the suite runs under `scripts/with-keyring.sh`) and `keyport
//! audit --verify` proves the log with it; without any keyring the agent refuses to start and
//! says what to do.
#![allow(clippy::unwrap_used)] // a test fails by panicking

use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use keyport_e2e::harness::{
    b64, certificate_ids, keyport_bin, Agent, AgentOptions, Hash, TestToken, PORTAL, USER_PIN,
};
use keyport_e2e::pinentry::Step;
use serde_json::json;

/// A keyring service name of this test run only, so runs never share a key.
fn unique_service() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("keyport-e2e-{}-{nanos}", std::process::id())
}

fn require_secret_service() {
    assert!(
        std::env::var_os("DBUS_SESSION_BUS_ADDRESS").is_some(),
        "this test needs a Secret Service: run it under scripts/with-keyring.sh"
    );
}

fn secret_tool_lookup(service: &str) -> Option<String> {
    let out = Command::new("secret-tool")
        .args(["lookup", "service", service, "username", "audit-key"])
        .output()
        .expect("secret-tool (apt install libsecret-tools)");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_keeps_its_audit_key_in_the_os_keyring_and_the_log_verifies() {
    require_secret_service();
    let service = unique_service();
    assert_eq!(secret_tool_lookup(&service), None, "a fresh service name");
    let token = TestToken::provision().unwrap();
    let options = AgentOptions {
        os_keyring: Some(service.clone()),
        ..AgentOptions::default()
    }
    .steps([Step::pin(USER_PIN)]);
    let mut agent = Agent::start(&token, options).unwrap();

    // The first start created the key in the Secret Service: 32 random bytes, as hex.
    let stored = secret_tool_lookup(&service).expect("the agent stored its audit key");
    assert_eq!(stored.len(), 64, "{stored}");
    assert!(stored.bytes().all(|b| b.is_ascii_hexdigit()));

    let mut client = agent.connect(PORTAL).await.unwrap();
    let ids = certificate_ids(&mut client, &token).await.unwrap();
    let digest = Hash::Sha256.digest(b"keyring-audited document");
    client
        .call_ok(
            "sign",
            json!({
                "certificateId": ids["sign-p256"],
                "digest": {"algorithm": "SHA-256", "value": b64(&digest)},
                "display": {"title": "Keyring"},
            }),
        )
        .await
        .unwrap();

    let verify = agent.keyport(&["audit", "--verify"]).unwrap();
    let text = String::from_utf8_lossy(&verify.stdout);
    assert!(
        verify.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(text.contains("OK"), "{text}");

    // The key stays the same across restarts: a second verify after the agent stopped still
    // proves the chain, and the stored key did not change.
    drop(client);
    agent.stop().unwrap();
    assert_eq!(
        secret_tool_lookup(&service).as_deref(),
        Some(stored.as_str())
    );
    let again = agent.keyport(&["audit", "--verify"]).unwrap();
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stdout)
    );

    // Tidy the test's entry away.
    let _ = Command::new("secret-tool")
        .args(["clear", "service", &service, "username", "audit-key"])
        .status();
}

#[test]
fn without_a_keyring_or_key_file_the_agent_refuses_to_start_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "port = 0\ndiscover_modules = false\nkeyring_service = {:?}\naudit_log = {:?}\n",
            unique_service(),
            dir.path().join("audit.log")
        ),
    )
    .unwrap();
    let out = Command::new(keyport_bin())
        .arg("--config")
        .arg(&config)
        .arg("run")
        // A bus the process cannot reach: no Secret Service anywhere.
        .env(
            "DBUS_SESSION_BUS_ADDRESS",
            "unix:path=/nonexistent/keyport-test-bus",
        )
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "it must not start: {stdout}");
    assert!(
        !stdout.contains("listening on"),
        "it must never listen without an audit key: {stdout}"
    );
    assert!(stderr.contains("audit_key_file"), "{stderr}");
    // Issue 14, snag 12: the advice is given once.
    assert_eq!(
        stderr.matches("audit_key_file").count(),
        1,
        "the advice repeats: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!dir.path().join("audit.log").exists());
}
