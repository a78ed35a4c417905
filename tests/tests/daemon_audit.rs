//! The audit log the running agent writes: a line per sign, refusal and login, a chain that
//! `keyport audit --verify` proves whole, and an edited line it names.
#![allow(clippy::unwrap_used)] // a test fails by panicking

use keyport_e2e::harness::{
    b64, certificate_ids, nonce, unb64, verify_raw, Agent, AgentOptions, Hash, RawAlg, Signed,
    TestToken, PORTAL, USER_PIN,
};
use keyport_e2e::pinentry::{Button, Step};
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

/// Many signatures at once (4 connections, 50 requests each in flight together): their
/// records share groups (one write and one `fdatasync` each), and still every signature that
/// left has exactly one granted line, in one unbroken chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_signatures_are_each_recorded_once_in_a_valid_chain() {
    let token = TestToken::provision().unwrap();
    let options = AgentOptions {
        session_consent_origins: vec![PORTAL.to_owned()],
        pin_cache_seconds: 600,
        limits: vec!["requests_per_second = 10000".to_owned()],
        ..AgentOptions::default()
    };
    let agent = Agent::start(&token, options).unwrap();
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(agent.connect(PORTAL).await.unwrap());
    }
    let ids = certificate_ids(&mut clients[0], &token).await.unwrap();
    let id = ids["sign-p256"].clone();
    let params = move |digest: &[u8]| {
        json!({"certificateId": id.clone(), "digest": {"algorithm": "SHA-256", "value": b64(digest)},
               "display": {"title": "Concurrent"}})
    };
    // Session consent per connection: the first also logs in, the others only confirm.
    let mut steps = vec![Step::pin(USER_PIN)];
    steps.extend((1..clients.len()).map(|_| Step::confirm(Button::Ok)));
    agent.script().push_all(&steps).unwrap();
    let mut signed = Vec::new();
    for (c, client) in clients.iter_mut().enumerate() {
        let digest = Hash::Sha256.digest(format!("consent {c}").as_bytes());
        client.call_ok("sign", params(&digest)).await.unwrap();
        signed.push(digest);
    }

    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(c, mut client)| {
            let params = params.clone();
            tokio::spawn(async move {
                let mut sent = Vec::new();
                for i in 0..50 {
                    let digest = Hash::Sha256.digest(format!("load {c} {i}").as_bytes());
                    let rid = client.send("sign", params(&digest)).await.unwrap();
                    sent.push((rid, digest));
                }
                let mut got = Vec::new();
                for (rid, digest) in sent {
                    let answer = client.response(rid).await.unwrap();
                    let sig = unb64(&answer.unwrap()["signature"]).unwrap();
                    got.push((digest, sig));
                }
                got
            })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.extend(task.await.unwrap());
    }
    assert_eq!(answers.len(), 200);
    let pem = token.cert_pem("sign-p256");
    for (digest, sig) in answers.iter().step_by(25) {
        verify_raw(
            &pem,
            &Signed::Digest(digest.clone()),
            sig,
            RawAlg::EcdsaDer(Hash::Sha256),
        )
        .unwrap();
    }
    signed.extend(answers.into_iter().map(|(d, _)| d));

    let lines: Vec<Value> = std::fs::read_to_string(agent.audit_log())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let seqs: Vec<u64> = lines.iter().map(|l| l["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=204).collect::<Vec<u64>>());
    let mut logged: Vec<String> = lines
        .iter()
        .map(|l| {
            assert_eq!(l["operation"], "sign", "{l}");
            assert_eq!(l["outcome"], "granted", "{l}");
            assert_eq!(l["digests"].as_array().unwrap().len(), 1, "{l}");
            l["digests"][0].as_str().unwrap().to_owned()
        })
        .collect();
    let mut wanted: Vec<String> = signed.iter().map(hex::encode).collect();
    logged.sort();
    wanted.sort();
    assert_eq!(logged, wanted, "each signature has exactly one line");
    let out = agent.keyport(&["audit", "--verify"]).unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
