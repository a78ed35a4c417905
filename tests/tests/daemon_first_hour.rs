//! What a new user tripped on with the running agent (issue 14, the snags numbered as there).
#![allow(clippy::unwrap_used)] // a test fails by panicking

use keyport_e2e::harness::{b64, certificate_ids, Agent, AgentOptions, Hash, TestToken, USER_PIN};
use keyport_e2e::pinentry::{Button, Command, Step};
use serde_json::json;

const BANK: &str = "https://bank.example";

/// Snag 8: "Deny" in the dialog holds only until the user decides again: `keyport origins
/// allow` (or `revoke`) beside the running agent reaches it at once, and so does `deny`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_decisions_made_on_the_command_line_reach_the_running_agent() {
    let token = TestToken::provision().unwrap();
    let agent = Agent::start(&token, AgentOptions::default().allowed(&[])).unwrap();
    agent
        .script()
        .push(&Step::confirm(Button::Cancel).expect(Command::Confirm))
        .unwrap();
    let mut client = agent.connect(BANK).await.unwrap();
    client
        .call_err("certificates.list", json!({}), "ORIGIN_DENIED")
        .await
        .unwrap();
    // Denied for this run: no second dialog.
    client
        .call_err("certificates.list", json!({}), "ORIGIN_DENIED")
        .await
        .unwrap();
    assert_eq!(agent.script().dialogs().unwrap().len(), 1);

    let out = agent.keyport(&["origins", "allow", BANK]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The same connection, refused a moment ago, is now served.
    client
        .call_ok("certificates.list", json!({}))
        .await
        .unwrap();
    assert_eq!(agent.script().dialogs().unwrap().len(), 1, "no new dialog");
    let mut again = agent.connect(BANK).await.unwrap();
    let hello = again.call_ok("hello", json!({})).await.unwrap();
    assert_eq!(hello["originApproved"], true);

    // A denial on the command line closes the door to new connections.
    let out = agent.keyport(&["origins", "deny", BANK]).unwrap();
    assert!(out.status.success());
    assert!(
        agent.connect(BANK).await.is_err(),
        "a denied origin connected"
    );
    let out = agent.keyport(&["origins", "revoke", BANK]).unwrap();
    assert!(out.status.success());
    let mut third = agent.connect(BANK).await.unwrap();
    let hello = third.call_ok("hello", json!({})).await.unwrap();
    assert_eq!(hello["originApproved"], false, "revoked: asked again");
}

/// Snag 10: the batch dialog names the batch by its title and lists the items' labels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_batch_dialog_shows_the_batch_title_and_the_items_labels() {
    let token = TestToken::provision().unwrap();
    let agent = Agent::start(&token, AgentOptions::default()).unwrap();
    let mut client = agent.connect(keyport_e2e::harness::PORTAL).await.unwrap();
    let ids = certificate_ids(&mut client, &token).await.unwrap();
    agent.script().push(&Step::pin(USER_PIN)).unwrap();
    let items: Vec<_> = ["Loan contract", "Insurance form", "Annex A", "Annex B"]
        .iter()
        .map(|label| {
            json!({"digest": {"algorithm": "SHA-256", "value": b64(&Hash::Sha256.digest(label.as_bytes()))},
                   "label": label})
        })
        .collect();
    client
        .call_ok(
            "sign.batch",
            json!({"certificateId": ids["sign-p256"], "items": items,
                   "display": {"title": "Mortgage 2026-114"}}),
        )
        .await
        .unwrap();
    let dialogs = agent.script().dialogs().unwrap();
    let description = dialogs[0].description.clone().unwrap_or_default();
    for wanted in [
        "asks you to sign 4 documents.",
        "Batch: «Mortgage 2026-114»",
        "Documents: «Loan contract», «Insurance form», «Annex A» and 1 more",
    ] {
        assert!(
            description.contains(wanted),
            "{wanted:?} not in {description}"
        );
    }
    assert!(!description.contains("First document"), "{description}");
}
