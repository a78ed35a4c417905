//! Keys that ask for the PIN for every signature (CKA_ALWAYS_AUTHENTICATE), through the real
//! `keyport run`, the scripted pinentry and the fault module's call log: every kind of key and
//! mechanism, raw and CMS, one dialog each, signed by the specification (C_SignInit,
//! C_Login(CKU_CONTEXT_SPECIFIC), one single-part C_Sign); a wrong context PIN; a locked PIN;
//! batches with one dialog per document. Every signature is checked by OpenSSL and Python.
#![allow(clippy::unwrap_used)] // a test fails by panicking

use keyport_e2e::harness::{
    b64, certificate_ids, unb64, verify_cms, verify_raw, Agent, AgentOptions, Client, Hash, RawAlg,
    Signed, TestToken, PORTAL, USER_PIN,
};
use keyport_e2e::pinentry::{Command, Step};
use serde_json::{json, Value};

async fn start(
    options: AgentOptions,
) -> (
    TestToken,
    Agent,
    Client,
    std::collections::HashMap<String, String>,
) {
    let tk = TestToken::provision().unwrap();
    let agent = Agent::start(&tk, options.fault()).unwrap();
    let mut client = agent.connect(PORTAL).await.unwrap();
    let ids = certificate_ids(&mut client, &tk).await.unwrap();
    (tk, agent, client, ids)
}

/// The signing calls of the log from line `from` on: C_SignInit, C_Login, C_Sign,
/// C_SignUpdate, C_SignFinal, as logged (user type and result included).
fn signing_calls(agent: &Agent, from: usize) -> Vec<String> {
    agent.fault_log()[from..]
        .iter()
        .filter(|l| {
            [
                "C_SignInit ",
                "C_Login ",
                "C_Sign ",
                "C_SignUpdate ",
                "C_SignFinal ",
            ]
            .iter()
            .any(|f| l.starts_with(f))
        })
        .cloned()
        .collect()
}

/// One `sign` request's case: key, raw algorithm (or CMS), the request's extra fields.
struct Case {
    key: &'static str,
    alg: RawAlg,
    extra: Value,
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            key: "sign-p256-always",
            alg: RawAlg::EcdsaDer(Hash::Sha256),
            extra: json!({}),
        },
        Case {
            key: "sign-p384-always",
            alg: RawAlg::EcdsaDer(Hash::Sha384),
            extra: json!({}),
        },
        Case {
            key: "sign-rsa2048-always",
            alg: RawAlg::RsaPkcs1(Hash::Sha256),
            extra: json!({}),
        },
        Case {
            key: "sign-rsa2048-always",
            alg: RawAlg::RsaPss(Hash::Sha256),
            extra: json!({"signatureAlgorithm": "RSA-PSS"}),
        },
        Case {
            key: "sign-ed25519-always",
            alg: RawAlg::Ed25519,
            extra: json!({}),
        },
    ]
}

fn merge(mut base: Value, extra: &Value) -> Value {
    for (k, v) in extra.as_object().unwrap() {
        base[k] = v.clone();
    }
    base
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_always_authenticate_key_signs_raw_and_cms_with_one_dialog_each() {
    let (tk, agent, mut client, ids) = start(AgentOptions::default()).await;
    let mut shown_sequence = None;
    for case in cases() {
        let doc = format!("a document for {} {:?}", case.key, case.alg).into_bytes();
        // Raw: a digest as a portal sends it (Ed25519 signs the document itself).
        let (input, signed) = match case.alg {
            RawAlg::Ed25519 => (json!({"data": b64(&doc)}), Signed::Data(doc.clone())),
            RawAlg::EcdsaDer(h) | RawAlg::RsaPkcs1(h) | RawAlg::RsaPss(h) => {
                let digest = h.digest(&doc);
                (
                    json!({"digest": {"algorithm": h.wire(), "value": b64(&digest)}}),
                    Signed::Digest(digest),
                )
            }
            other => unreachable!("{other:?}"),
        };
        for format in ["raw", "cms"] {
            let params = if format == "raw" {
                merge(
                    merge(
                        json!({"certificateId": ids[case.key], "format": "raw",
                               "display": {"title": "Qualified signature"}}),
                        &input,
                    ),
                    &case.extra,
                )
            } else {
                let hash = match case.alg {
                    RawAlg::EcdsaDer(h) | RawAlg::RsaPkcs1(h) | RawAlg::RsaPss(h) => {
                        json!({"hash": h.wire()})
                    }
                    _ => json!({}),
                };
                merge(
                    merge(
                        json!({"certificateId": ids[case.key], "format": "cms", "data": b64(&doc),
                               "display": {"title": "Qualified signature"}}),
                        &hash,
                    ),
                    &case.extra,
                )
            };
            let dialogs_before = agent.script().dialogs().unwrap().len();
            let log_before = agent.fault_log().len();
            agent
                .script()
                .push(&Step::pin(USER_PIN).expect(Command::GetPin))
                .unwrap();
            let result = client.call_ok("sign", params).await.unwrap();
            let sig = unb64(&result["signature"]).unwrap();
            let what = format!("{} {:?} {format}", case.key, case.alg);
            if format == "raw" {
                verify_raw(&tk.cert_pem(case.key), &signed, &sig, case.alg)
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
            } else {
                verify_cms(&sig, &doc, &tk.ca_pem(), &tk.cert_pem(case.key))
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
            }
            assert_eq!(
                agent.script().dialogs().unwrap().len(),
                dialogs_before + 1,
                "one dialog: {what}"
            );
            // The token: the user login with the dialog's PIN, then the signature by the
            // specification. The lone C_Sign is called twice (length, then signature).
            let calls = signing_calls(&agent, log_before);
            assert_eq!(
                calls,
                [
                    "C_Login CKU_USER pin rv=0x00000000",
                    "C_SignInit rv=0x00000000",
                    "C_Login CKU_CONTEXT_SPECIFIC pin rv=0x00000000",
                    "C_Sign rv=0x00000000",
                    "C_Sign rv=0x00000000",
                ],
                "{what}"
            );
            if shown_sequence.is_none() {
                shown_sequence = Some(agent.fault_log()[log_before..].join("\n"));
            }
        }
    }
    assert!(
        !agent
            .fault_log()
            .iter()
            .any(|l| l.starts_with("C_SignUpdate") || l.starts_with("C_SignFinal")),
        "never multi-part"
    );
    eprintln!(
        "measured PKCS#11 calls of one always-authenticate signature (P-256, raw):\n{}",
        shown_sequence.unwrap_or_default()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_context_pin_asks_again_with_the_warning_then_signs_once() {
    let options = AgentOptions {
        pin_cache_seconds: 300,
        ..AgentOptions::default()
    };
    let (tk, agent, mut client, ids) = start(options).await;
    let id = &ids["sign-p256-always"];
    let sign = |digest: &[u8]| {
        json!({"certificateId": id, "digest": {"algorithm": "SHA-256", "value": b64(digest)},
               "display": {"title": "Second contract"}})
    };
    // A first signature logs the user in (cached) and shows the agent the key's flag.
    agent.script().push(&Step::pin(USER_PIN)).unwrap();
    client.call_ok("sign", sign(&[1; 32])).await.unwrap();

    // Now only the signature's own login is asked: wrong, then right.
    let log_before = agent.fault_log().len();
    let dialogs_before = agent.script().dialogs().unwrap().len();
    agent
        .script()
        .push_all(&[Step::pin("999999"), Step::pin(USER_PIN)])
        .unwrap();
    let digest = Hash::Sha256.digest(b"second contract");
    let result = client.call_ok("sign", sign(&digest)).await.unwrap();
    verify_raw(
        &tk.cert_pem("sign-p256-always"),
        &Signed::Digest(digest),
        &unb64(&result["signature"]).unwrap(),
        RawAlg::EcdsaDer(Hash::Sha256),
    )
    .unwrap();
    let dialogs = agent.script().dialogs().unwrap();
    assert_eq!(dialogs.len(), dialogs_before + 2, "two dialogs");
    assert_eq!(dialogs[dialogs_before].error, None);
    let warning = dialogs[dialogs_before + 1]
        .error
        .clone()
        .unwrap_or_default();
    assert!(warning.contains("Wrong PIN."), "{warning}");
    let calls = signing_calls(&agent, log_before);
    assert_eq!(
        calls,
        [
            "C_SignInit rv=0x00000000",
            "C_Login CKU_CONTEXT_SPECIFIC pin rv=0x000000A0",
            "C_SignInit rv=0x00000000",
            "C_Login CKU_CONTEXT_SPECIFIC pin rv=0x00000000",
            "C_Sign rv=0x00000000",
            "C_Sign rv=0x00000000",
        ],
        "two context logins (one per dialog), one signature; no user login (cached)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_pin_shows_no_dialog() {
    let (_tk, agent, mut client, ids) = start(AgentOptions::default()).await;
    agent.set_fault("pin_locked=1\n").unwrap();
    let e = client
        .call_err(
            "sign",
            json!({"certificateId": ids["sign-rsa2048-always"],
                   "digest": {"algorithm": "SHA-256", "value": b64(&[3; 32])},
                   "display": {"title": "Locked"}}),
            "PIN_LOCKED",
        )
        .await
        .unwrap();
    assert_eq!(e.code, 1004);
    assert!(agent.script().dialogs().unwrap().is_empty());
    assert_eq!(agent.fault_calls("C_Login"), 0);
}

fn batch(id: &str, docs: &[Vec<u8>]) -> Value {
    json!({
        "certificateId": id,
        "items": docs.iter().map(|d| json!({"data": b64(d), "label": "doc"})).collect::<Vec<_>>(),
        "display": {"title": "Three contracts"},
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_on_an_always_authenticate_key_asks_once_per_document_and_says_so() {
    let (tk, agent, mut client, ids) = start(AgentOptions::default()).await;
    let id = &ids["sign-p384-always"];
    // One signature first: the agent learns the key asks per signature (SoftHSM hides the
    // flag until login), so the batch's first dialog can say so.
    agent.script().push(&Step::pin(USER_PIN)).unwrap();
    client
        .call_ok(
            "sign",
            json!({"certificateId": id, "data": b64(b"warm-up"), "hash": "SHA-384",
                   "display": {"title": "Warm-up"}}),
        )
        .await
        .unwrap();
    let before = agent.script().dialogs().unwrap().len();
    let docs: Vec<Vec<u8>> = (1..=3)
        .map(|i| format!("contract {i}").into_bytes())
        .collect();
    agent
        .script()
        .push_all(&[
            Step::pin(USER_PIN),
            Step::pin(USER_PIN),
            Step::pin(USER_PIN),
        ])
        .unwrap();
    let mut params = batch(id, &docs);
    params["hash"] = json!("SHA-384");
    let result = client.call_ok("sign.batch", params).await.unwrap();
    let results = result["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    for (doc, r) in docs.iter().zip(results) {
        verify_raw(
            &tk.cert_pem("sign-p384-always"),
            &Signed::Data(doc.clone()),
            &unb64(&r["signature"]).unwrap(),
            RawAlg::EcdsaDer(Hash::Sha384),
        )
        .unwrap();
    }
    let dialogs = agent.script().dialogs().unwrap();
    assert_eq!(dialogs.len(), before + 3, "one dialog per document");
    let first = dialogs[before].description.clone().unwrap_or_default();
    assert!(
        first.contains("This key asks for your PIN for each of the 3 documents."),
        "{first}"
    );
    assert!(first.contains("Document 1 of 3"), "{first}");
    for (n, d) in dialogs[before + 1..].iter().enumerate() {
        let text = d.description.clone().unwrap_or_default();
        assert!(text.contains(&format!("Document {} of 3", n + 2)), "{text}");
        assert!(!text.contains("for each of"), "{text}");
    }
    let contexts = agent
        .fault_log()
        .iter()
        .filter(|l| l.starts_with("C_Login CKU_CONTEXT_SPECIFIC pin rv=0x00000000"))
        .count();
    assert_eq!(contexts, 4, "one context login per signature (warm-up + 3)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_at_the_second_document_returns_the_first_signature() {
    let (tk, agent, mut client, ids) = start(AgentOptions::default()).await;
    let id = &ids["sign-rsa2048-always"];
    let docs: Vec<Vec<u8>> = (1..=3)
        .map(|i| format!("contract {i}").into_bytes())
        .collect();
    // A fresh agent: the first dialog is the batch's (the key's flag is hidden until login);
    // the token then asks per signature, so the second document gets its own dialog.
    agent
        .script()
        .push_all(&[Step::pin(USER_PIN), Step::cancel()])
        .unwrap();
    let e = client
        .call_err("sign.batch", batch(id, &docs), "USER_CANCELLED")
        .await
        .unwrap();
    assert_eq!(e.data["completed"], 1, "{e:?}");
    let results = e.data["results"].as_array().unwrap();
    assert_eq!(results.len(), 1);
    verify_raw(
        &tk.cert_pem("sign-rsa2048-always"),
        &Signed::Data(docs[0].clone()),
        &unb64(&results[0]["signature"]).unwrap(),
        RawAlg::RsaPkcs1(Hash::Sha256),
    )
    .unwrap();
    let dialogs = agent.script().dialogs().unwrap();
    assert_eq!(dialogs.len(), 2);
    let second = dialogs[1].description.clone().unwrap_or_default();
    assert!(second.contains("Document 2 of 3"), "{second}");
    // The first per-document dialog says why the PIN is asked again.
    assert!(
        second.contains("This key asks for your PIN for each of the 3 documents."),
        "{second}"
    );
    assert_eq!(
        agent.fault_calls("C_Sign"),
        2,
        "one signature (two C_Sign calls)"
    );
}
