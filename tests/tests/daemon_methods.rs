//! Every method of docs/protocol.md through the real `keyport run` over WebSocket, against a
//! provisioned SoftHSM token, every signature verified by OpenSSL and Python `cryptography`.
#![allow(clippy::unwrap_used)] // a test fails by panicking

use std::collections::HashMap;

use keyport_e2e::harness::{
    b64, certificate_ids, nonce, unb64, verify_cms, verify_raw, verify_webeid, Agent, AgentOptions,
    Client, Hash, RawAlg, Signed, TestToken, KEYS, PORTAL, TOKEN_ENTRY_FIELDS, TOKEN_LABEL,
    USER_PIN,
};
use keyport_e2e::pinentry::{Button, Command, Step};
use serde_json::{json, Value};
use sha2::Digest as _;

/// A token per test: agents logging in to one SoftHSM store from several processes at once
/// race on its files (a concurrent listing came back empty), so tests do not share one.
fn new_token() -> TestToken {
    TestToken::provision().expect("provision")
}

fn pins(n: usize) -> Vec<Step> {
    (0..n)
        .map(|_| Step::pin(USER_PIN).expect(Command::GetPin))
        .collect()
}

async fn start(tk: &TestToken, options: AgentOptions) -> (Agent, Client, HashMap<String, String>) {
    let agent = Agent::start(tk, options).expect("agent starts");
    let mut client = agent.connect(PORTAL).await.expect("connect");
    let ids = certificate_ids(&mut client, tk).await.expect("ids");
    (agent, client, ids)
}

fn sign_digest(id: &str, hash: Hash, digest: &[u8], extra: Value) -> Value {
    let mut params = json!({
        "certificateId": id,
        "digest": {"algorithm": hash.wire(), "value": b64(digest)},
        "display": {"title": "Loan contract 2026-114"},
    });
    merge(&mut params, extra);
    params
}

fn merge(params: &mut Value, extra: Value) {
    if let (Some(p), Value::Object(e)) = (params.as_object_mut(), extra) {
        p.extend(e);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_reports_the_origin_and_its_approval() {
    let tk = new_token();
    let agent = Agent::start(&tk, AgentOptions::default()).unwrap();
    let mut approved = agent.connect(PORTAL).await.unwrap();
    let hello = approved
        .call_ok("hello", json!({"client": {"name": "e2e", "version": "1"}}))
        .await
        .unwrap();
    assert_eq!(hello["agent"], "keyport");
    assert_eq!(hello["protocol"], 1);
    assert_eq!(hello["origin"], PORTAL);
    assert_eq!(hello["originApproved"], true);
    assert!(hello["version"].as_str().is_some_and(|v| !v.is_empty()));
    let caps: Vec<&str> = hello["capabilities"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for cap in ["certificates", "sign", "sign.batch", "cms", "authenticate"] {
        assert!(caps.contains(&cap), "{cap} missing from {caps:?}");
    }
    // An unknown origin may say hello (the only method allowed before approval): no dialog.
    let mut unknown = agent.connect("https://new.example").await.unwrap();
    let hello = unknown.call_ok("hello", json!({})).await.unwrap();
    assert_eq!(hello["origin"], "https://new.example");
    assert_eq!(hello["originApproved"], false);
    assert!(agent.script().dialogs().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_list_has_the_documented_shape() {
    let tk = new_token();
    let (agent, mut client, _) = start(&tk, AgentOptions::default()).await;
    let result = client.call_ok("tokens.list", json!({})).await.unwrap();
    let tokens = result["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 1, "{result}");
    let t = &tokens[0];
    assert_eq!(t["label"], TOKEN_LABEL);
    assert_eq!(t["manufacturer"], "SoftHSM project");
    assert_eq!(t["model"], "SoftHSM v2");
    assert!(t["serial"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(t["id"].as_str().is_some_and(|s| s.starts_with("tok-")));
    assert!(t["reader"].is_null());
    assert_eq!(t["pinPad"], false);
    assert_eq!(
        t["pin"],
        json!({"initialized": true, "countLow": false, "finalTry": false, "locked": false})
    );
    let mut keys: Vec<&str> = t.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, TOKEN_ENTRY_FIELDS);
    // The id is stable: a second agent on the same token reports the same one.
    let again = Agent::start(&tk, AgentOptions::default()).unwrap();
    let mut c2 = again.connect(PORTAL).await.unwrap();
    let r2 = c2.call_ok("tokens.list", json!({})).await.unwrap();
    assert_eq!(r2["tokens"][0]["id"], t["id"]);
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_list_honours_every_filter() {
    let tk = new_token();
    let (_agent, mut client, ids) = start(&tk, AgentOptions::default()).await;
    let all = client
        .call_ok("certificates.list", json!({}))
        .await
        .unwrap();
    let certs = all["certificates"].as_array().unwrap();
    assert_eq!(certs.len(), KEYS.len(), "{all}");
    let p384 = certs
        .iter()
        .find(|c| c["id"] == ids["sign-p384"].as_str())
        .unwrap();
    assert_eq!(p384["keyAlgorithm"], "EC-P384");
    assert_eq!(
        p384["subject"], "CN=Test Signer P-384,O=KeyPort Test,C=CN",
        "{p384}"
    );
    assert!(p384["issuer"]
        .as_str()
        .unwrap()
        .contains("CN=KeyPort Test CA"));
    assert_eq!(
        unb64(&p384["certificate"]).unwrap(),
        tk.cert_der("sign-p384").unwrap()
    );
    assert_eq!(
        p384["keyUsage"],
        json!(["digitalSignature", "nonRepudiation"])
    );
    for field in ["serialNumber", "notBefore", "notAfter", "tokenId"] {
        assert!(
            p384[field].as_str().is_some_and(|s| !s.is_empty()),
            "{field}"
        );
    }
    let auth = certs
        .iter()
        .find(|c| c["id"] == ids["auth-p256"].as_str())
        .unwrap();
    assert_eq!(auth["extendedKeyUsage"], json!(["clientAuth"]));
    assert_eq!(auth["keyUsage"], json!(["digitalSignature"]));
    let token_id = p384["tokenId"].as_str().unwrap().to_owned();

    let cases: Vec<(Value, Vec<&str>)> = vec![
        (json!({}), vec![]),
        (
            json!({"keyUsage": ["nonRepudiation"]}),
            vec![
                "sign-rsa2048",
                "sign-rsa3072",
                "sign-p256",
                "sign-p384",
                "sign-ed25519",
                "sign-p256-always",
                "sign-rsa2048-always",
                "sign-ed25519-always",
                "sign-p384-always",
            ],
        ),
        (json!({"keyUsage": ["keyEncipherment"]}), vec!["none"]),
        (json!({"issuer": "CN=KeyPort Test CA"}), vec![]),
        (json!({"issuer": "CN=Some Other CA"}), vec!["none"]),
        (json!({"subject": "Test Client"}), vec!["auth-p256"]),
        (
            json!({"subject": "P-384"}),
            vec!["sign-p384", "sign-p384-always"],
        ),
        (json!({"validAt": "now"}), vec![]),
        (json!({"validAt": "2001-01-01T00:00:00Z"}), vec!["none"]),
        (json!({"validAt": "2090-01-01T00:00:00Z"}), vec!["none"]),
        (
            json!({"keyAlgorithm": ["RSA"]}),
            vec!["sign-rsa2048", "sign-rsa3072", "sign-rsa2048-always"],
        ),
        (json!({"keyAlgorithm": ["RSA-3072"]}), vec!["sign-rsa3072"]),
        (
            json!({"keyAlgorithm": ["EC"]}),
            vec![
                "sign-p256",
                "sign-p384",
                "auth-p256",
                "sign-p256-always",
                "sign-p384-always",
            ],
        ),
        (
            json!({"keyAlgorithm": ["EC-P384", "Ed25519"]}),
            vec![
                "sign-p384",
                "sign-ed25519",
                "sign-ed25519-always",
                "sign-p384-always",
            ],
        ),
        (json!({"tokenId": token_id}), vec![]),
        (
            json!({"tokenId": "tok-00000000000000000000000000000000"}),
            vec!["none"],
        ),
        (
            json!({"keyUsage": ["digitalSignature"], "keyAlgorithm": ["EC-P256"], "subject": "Client", "validAt": "now", "issuer": "KeyPort", "tokenId": token_id}),
            vec!["auth-p256"],
        ),
    ];
    for (filter, want) in cases {
        let result = client
            .call_ok("certificates.list", json!({"filter": filter}))
            .await
            .unwrap();
        let mut got: Vec<String> = result["certificates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["id"].as_str().unwrap().to_owned())
            .collect();
        got.sort();
        let mut expected: Vec<String> = match want.as_slice() {
            [] => ids.values().cloned().collect(),
            ["none"] => Vec::new(),
            labels => labels.iter().map(|l| ids[*l].clone()).collect(),
        };
        expected.sort();
        assert_eq!(got, expected, "filter {filter}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_signatures_of_every_key_type_verify() {
    let tk = new_token();
    // (label, hash, extra params, verification)
    let cases: Vec<(&str, Hash, Value, RawAlg)> = vec![
        (
            "sign-rsa2048",
            Hash::Sha256,
            json!({}),
            RawAlg::RsaPkcs1(Hash::Sha256),
        ),
        (
            "sign-rsa2048",
            Hash::Sha384,
            json!({"signatureAlgorithm": "RSASSA-PKCS1-v1_5"}),
            RawAlg::RsaPkcs1(Hash::Sha384),
        ),
        (
            "sign-rsa2048",
            Hash::Sha512,
            json!({}),
            RawAlg::RsaPkcs1(Hash::Sha512),
        ),
        (
            "sign-rsa2048",
            Hash::Sha256,
            json!({"signatureAlgorithm": "RSA-PSS"}),
            RawAlg::RsaPss(Hash::Sha256),
        ),
        (
            "sign-rsa3072",
            Hash::Sha384,
            json!({"signatureAlgorithm": "RSA-PSS"}),
            RawAlg::RsaPss(Hash::Sha384),
        ),
        (
            "sign-rsa3072",
            Hash::Sha256,
            json!({}),
            RawAlg::RsaPkcs1(Hash::Sha256),
        ),
        (
            "sign-p256",
            Hash::Sha256,
            json!({}),
            RawAlg::EcdsaDer(Hash::Sha256),
        ),
        (
            "sign-p256",
            Hash::Sha256,
            json!({"ecdsaEncoding": "p1363"}),
            RawAlg::EcdsaP1363(Hash::Sha256),
        ),
        (
            "sign-p384",
            Hash::Sha384,
            json!({"signatureAlgorithm": "ECDSA", "ecdsaEncoding": "der"}),
            RawAlg::EcdsaDer(Hash::Sha384),
        ),
        (
            "sign-p384",
            Hash::Sha384,
            json!({"ecdsaEncoding": "p1363"}),
            RawAlg::EcdsaP1363(Hash::Sha384),
        ),
    ];
    let (agent, mut client, ids) = start(&tk, AgentOptions::default()).await;
    for (label, hash, extra, alg) in cases {
        agent.script().push_all(&pins(1)).unwrap();
        let doc = format!("document for {label} {alg:?}").into_bytes();
        let digest = hash.digest(&doc);
        let result = client
            .call_ok("sign", sign_digest(&ids[label], hash, &digest, extra))
            .await
            .unwrap_or_else(|e| panic!("{label} {alg:?}: {e}"));
        assert_eq!(result["format"], "raw");
        assert_eq!(result["digestAlgorithm"], hash.wire());
        assert_eq!(
            unb64(&result["certificate"]).unwrap(),
            tk.cert_der(label).unwrap()
        );
        let sig = unb64(&result["signature"]).unwrap();
        if let RawAlg::EcdsaP1363(_) = alg {
            let want = if label == "sign-p384" { 96 } else { 64 };
            assert_eq!(sig.len(), want, "{label} P1363 length");
        }
        verify_raw(&tk.cert_pem(label), &Signed::Digest(digest), &sig, alg)
            .unwrap_or_else(|e| panic!("{label} {alg:?}: {e}"));
    }
    // SoftHSM signs CKM_ECDSA and CKM_RSA_PKCS in one part only, so an always-auth key cannot
    // sign a page's digest here (checked below).
    // With data the agent hashes: SHA-256 by default, or the named hash.
    for (hash, extra) in [
        (Hash::Sha256, json!({})),
        (Hash::Sha384, json!({"hash": "SHA-384"})),
    ] {
        agent.script().push_all(&pins(1)).unwrap();
        let doc = b"data the agent hashes".to_vec();
        let mut params = json!({"certificateId": ids["sign-p256"], "data": b64(&doc), "display": {"title": "Data"}});
        merge(&mut params, extra);
        let result = client.call_ok("sign", params).await.unwrap();
        assert_eq!(result["digestAlgorithm"], hash.wire());
        assert_eq!(result["signatureAlgorithm"], "ECDSA");
        let sig = unb64(&result["signature"]).unwrap();
        verify_raw(
            &tk.cert_pem("sign-p256"),
            &Signed::Data(doc),
            &sig,
            RawAlg::EcdsaDer(hash),
        )
        .unwrap();
    }
    // Ed25519 signs the data itself.
    agent.script().push_all(&pins(1)).unwrap();
    let doc = b"an Ed25519 document".to_vec();
    let result = client
        .call_ok(
            "sign",
            json!({"certificateId": ids["sign-ed25519"], "data": b64(&doc), "display": {"title": "Ed"}}),
        )
        .await
        .unwrap();
    assert_eq!(result["signatureAlgorithm"], "Ed25519");
    let sig = unb64(&result["signature"]).unwrap();
    verify_raw(
        &tk.cert_pem("sign-ed25519"),
        &Signed::Data(doc),
        &sig,
        RawAlg::Ed25519,
    )
    .unwrap();
    // A digest for Ed25519 is refused before any dialog.
    let before = agent.script().consumed().unwrap();
    let e = client
        .call(
            "sign",
            sign_digest(&ids["sign-ed25519"], Hash::Sha256, &[7; 32], json!({})),
        )
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(e.reason, "INVALID_PARAMS", "{e:?}");
    assert_eq!(agent.script().consumed().unwrap(), before);
    // Always-authenticate keys sign a digest (single-part C_Sign after the context login),
    // one dialog each.
    for (key, alg) in [
        ("sign-p256-always", RawAlg::EcdsaDer(Hash::Sha256)),
        ("sign-rsa2048-always", RawAlg::RsaPkcs1(Hash::Sha256)),
    ] {
        let before = agent.script().dialogs().unwrap().len();
        agent.script().push_all(&pins(1)).unwrap();
        let digest = Hash::Sha256.digest(key.as_bytes());
        let result = client
            .call_ok(
                "sign",
                sign_digest(&ids[key], Hash::Sha256, &digest, json!({})),
            )
            .await
            .unwrap();
        verify_raw(
            &tk.cert_pem(key),
            &Signed::Digest(digest),
            &unb64(&result["signature"]).unwrap(),
            alg,
        )
        .unwrap();
        assert_eq!(agent.script().dialogs().unwrap().len(), before + 1, "{key}");
    }
    let before = agent.script().dialogs().unwrap().len();
    agent.script().push_all(&pins(2)).unwrap();
    let doc = b"always-auth document".to_vec();
    let result = client
        .call_ok(
            "sign",
            json!({"certificateId": ids["sign-rsa2048-always"], "data": b64(&doc), "display": {"title": "Always"}}),
        )
        .await
        .unwrap();
    verify_raw(
        &tk.cert_pem("sign-rsa2048-always"),
        &Signed::Data(doc),
        &unb64(&result["signature"]).unwrap(),
        RawAlg::RsaPkcs1(Hash::Sha256),
    )
    .unwrap();
    let dialogs = agent.script().dialogs().unwrap();
    assert_eq!(
        dialogs.len(),
        before + 1,
        "one dialog: its PIN answers the token login and the signature's context login"
    );
    assert_eq!(agent.script().consumed().unwrap(), dialogs.len());
    assert!(
        dialogs.iter().all(|d| d.script_errors.is_empty()),
        "{dialogs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cms_signatures_verify_with_openssl_and_python() {
    let tk = new_token();
    let (agent, mut client, ids) = start(&tk, AgentOptions::default()).await;
    let cases: Vec<(&str, Value)> = vec![
        ("sign-rsa2048", json!({})),
        ("sign-rsa2048", json!({"signatureAlgorithm": "RSA-PSS"})),
        ("sign-p256", json!({})),
        ("sign-p384", json!({"hash": "SHA-384"})),
        ("sign-ed25519", json!({})),
    ];
    for (label, extra) in cases {
        agent.script().push_all(&pins(1)).unwrap();
        let doc = format!("a contract signed with {label} as CMS").into_bytes();
        let mut params = json!({
            "certificateId": ids[label], "data": b64(&doc), "format": "cms",
            "display": {"title": "CMS document"}
        });
        merge(&mut params, extra.clone());
        let result = client
            .call_ok("sign", params)
            .await
            .unwrap_or_else(|e| panic!("{label} {extra}: {e}"));
        assert_eq!(result["format"], "cms");
        let der = unb64(&result["signature"]).unwrap();
        verify_cms(&der, &doc, &tk.ca_pem(), &tk.cert_pem(label))
            .unwrap_or_else(|e| panic!("{label} {extra}: {e}"));
    }
    // A CMS over a digest sent by the page (P-256, SHA-256).
    agent.script().push_all(&pins(1)).unwrap();
    let doc = b"the page hashed this one".to_vec();
    let result = client
        .call_ok(
            "sign",
            sign_digest(
                &ids["sign-p256"],
                Hash::Sha256,
                &Hash::Sha256.digest(&doc),
                json!({"format": "cms"}),
            ),
        )
        .await
        .unwrap();
    verify_cms(
        &unb64(&result["signature"]).unwrap(),
        &doc,
        &tk.ca_pem(),
        &tk.cert_pem("sign-p256"),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_eid_login_tokens_verify_for_every_algorithm() {
    let tk = new_token();
    // The token has one login certificate (auth-p256); the other algorithms are tried with the
    // document-signing certificates, which the administrator lets log in here too.
    let dual: Vec<String> = ["sign-p384", "sign-rsa2048", "sign-ed25519"]
        .iter()
        .map(|l| {
            format!(
                "\"{}\"",
                hex::encode(sha2::Sha256::digest(tk.cert_der(l).unwrap()))
            )
        })
        .collect();
    let options = AgentOptions {
        extra_toml: vec![format!("dual_use_certificates = [{}]", dual.join(", "))],
        ..AgentOptions::default()
    };
    let (agent, mut client, ids) = start(&tk, options).await;
    // (certificate, asked algorithm, expected algorithm, cert label)
    let cases: Vec<(Option<&str>, Option<&str>, &str, &str)> = vec![
        (None, None, "ES256", "auth-p256"),
        (Some("sign-p384"), None, "ES384", "sign-p384"),
        (Some("sign-rsa2048"), None, "RS256", "sign-rsa2048"),
        (Some("sign-rsa2048"), Some("PS256"), "PS256", "sign-rsa2048"),
        (Some("sign-ed25519"), None, "EdDSA", "sign-ed25519"),
    ];
    for (cert, asked, want, label) in cases {
        agent.script().push_all(&pins(1)).unwrap();
        let challenge = nonce(32).unwrap();
        assert_eq!(challenge.len(), 44);
        let mut params = json!({"challenge": challenge});
        if let Some(cert) = cert {
            params["certificateId"] = json!(ids[cert]);
        }
        if let Some(asked) = asked {
            params["algorithm"] = json!(asked);
        }
        let token_json = client
            .call_ok("authenticate", params)
            .await
            .unwrap_or_else(|e| panic!("{want}: {e}"));
        assert_eq!(token_json["algorithm"], want);
        assert_eq!(token_json["format"], "web-eid:1.0");
        assert!(token_json["appVersion"]
            .as_str()
            .unwrap()
            .starts_with("urn:keyport:"));
        verify_webeid(&token_json, PORTAL, &challenge, &tk.cert_pem(label))
            .unwrap_or_else(|e| panic!("{want}: {e}"));
    }
    // The login dialog names the origin and the holder.
    let dialogs = agent.script().dialogs().unwrap();
    let first = dialogs[0].description.clone().unwrap_or_default();
    assert!(
        first.contains(&format!("Log in to {PORTAL} as «Test Client P-256»")),
        "{first}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sign_dialog_shows_what_is_signed_and_takes_the_pin() {
    let tk = new_token();
    let (agent, mut client, ids) = start(&tk, AgentOptions::default()).await;
    agent.script().push_all(&pins(1)).unwrap();
    let digest = Hash::Sha256.digest(b"shown in the dialog");
    client
        .call_ok(
            "sign",
            sign_digest(
                &ids["sign-p256"],
                Hash::Sha256,
                &digest,
                json!({"display": {"title": "Loan contract 2026-114", "summary": "Amount: 1000"}}),
            ),
        )
        .await
        .unwrap();
    let dialogs = agent.script().dialogs().unwrap();
    assert_eq!(dialogs.len(), 1, "{dialogs:?}");
    let d = &dialogs[0];
    assert_eq!(d.command.as_deref(), Some("GETPIN"));
    let desc = d.description.clone().unwrap_or_default();
    for part in [
        PORTAL,
        "«Loan contract 2026-114»",
        "«Test Signer P-256»",
        "«KeyPort Test CA»",
        &hex::encode(&digest[..8]),
        "«KeyPort Test»",
        "«Amount: 1000»",
    ] {
        assert!(desc.contains(part), "{part:?} not in {desc:?}");
    }
    assert!(d.error.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_100_reports_progress_and_every_signature_verifies() {
    let tk = new_token();
    let (agent, mut client, ids) = start(&tk, AgentOptions::default()).await;
    agent.script().push_all(&pins(1)).unwrap();
    let docs: Vec<Vec<u8>> = (0..100)
        .map(|i| format!("document {i}").into_bytes())
        .collect();
    let items: Vec<Value> = docs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            json!({"digest": {"algorithm": "SHA-256", "value": b64(&Hash::Sha256.digest(d))}, "label": format!("doc {i}")})
        })
        .collect();
    let started = std::time::Instant::now();
    let id = client
        .send(
            "sign.batch",
            json!({"certificateId": ids["sign-rsa2048"], "items": items, "display": {"title": "Batch"}}),
        )
        .await
        .unwrap();
    let result = client.response(id).await.unwrap().unwrap();
    let elapsed = started.elapsed();
    let results = result["results"].as_array().unwrap();
    assert_eq!(results.len(), 100);
    for (doc, r) in docs.iter().zip(results) {
        verify_raw(
            &tk.cert_pem("sign-rsa2048"),
            &Signed::Digest(Hash::Sha256.digest(doc)),
            &unb64(&r["signature"]).unwrap(),
            RawAlg::RsaPkcs1(Hash::Sha256),
        )
        .unwrap();
    }
    // One dialog, one PIN; it says how many documents.
    let dialogs = agent.script().dialogs().unwrap();
    assert_eq!(dialogs.len(), 1);
    assert!(dialogs[0]
        .description
        .as_deref()
        .unwrap_or_default()
        .contains("100"));
    // Progress: for this request, monotonic, ends at total, at most ~10 a second.
    let progress: Vec<&Value> = client
        .notifications
        .iter()
        .filter(|n| n["method"] == "sign.progress")
        .map(|n| &n["params"])
        .collect();
    assert!(!progress.is_empty(), "no sign.progress");
    let mut last = 0;
    for p in &progress {
        assert_eq!(p["requestId"], json!(id));
        assert_eq!(p["total"], 100);
        let done = p["done"].as_u64().unwrap();
        assert!(done >= last, "progress went back: {progress:?}");
        last = done;
    }
    assert_eq!(last, 100);
    // At most ten a second: within the request's whole life (which includes the dialog), the
    // first event and the last are free, every other one needs 100 ms after the one before.
    let allowed = 2 + (elapsed.as_millis() / 100) as usize;
    assert!(
        progress.len() <= allowed,
        "{} progress events in {elapsed:?}",
        progress.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_usage_rules_for_signing_and_login() {
    let tk = new_token();
    let (agent, mut client, ids) = start(&tk, AgentOptions::default()).await;
    // auth-p256 lacks nonRepudiation: no dialog, refused.
    let e = client
        .call_err(
            "sign",
            sign_digest(&ids["auth-p256"], Hash::Sha256, &[1; 32], json!({})),
            "KEY_USAGE_NOT_ALLOWED",
        )
        .await
        .unwrap();
    assert_eq!(e.code, 1007);
    assert!(agent.script().dialogs().unwrap().is_empty());
    drop(agent);
    // signing_key_usage = "any" does not make a clientAuth certificate sign a page's digest
    // (that signature could be a login token elsewhere)…
    let options = AgentOptions {
        signing_key_usage: "any".into(),
        ..AgentOptions::default()
    };
    let (agent, mut client, ids) = start(&tk, options).await;
    client
        .call_err(
            "sign",
            sign_digest(&ids["auth-p256"], Hash::Sha256, &[1; 32], json!({})),
            "KEY_USAGE_NOT_ALLOWED",
        )
        .await
        .unwrap();
    assert!(agent.script().dialogs().unwrap().is_empty());
    drop(agent);
    // …only the administrator's exception for that certificate does.
    let options = AgentOptions {
        extra_toml: vec![format!(
            "dual_use_certificates = [\"{}\"]",
            hex::encode(sha2::Sha256::digest(tk.cert_der("auth-p256").unwrap()))
        )],
        ..AgentOptions::default()
    };
    let (agent, mut client, ids) = start(&tk, options).await;
    agent.script().push_all(&pins(1)).unwrap();
    let digest = Hash::Sha256.digest(b"any usage");
    let result = client
        .call_ok(
            "sign",
            sign_digest(&ids["auth-p256"], Hash::Sha256, &digest, json!({})),
        )
        .await
        .unwrap();
    verify_raw(
        &tk.cert_pem("auth-p256"),
        &Signed::Digest(digest),
        &unb64(&result["signature"]).unwrap(),
        RawAlg::EcdsaDer(Hash::Sha256),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_errors_that_need_no_dialog() {
    let tk = new_token();
    let (agent, mut client, ids) = start(&tk, AgentOptions::default()).await;
    // CERTIFICATE_NOT_FOUND: a well-formed id of no certificate.
    let token_id = ids["sign-p256"].split('/').next().unwrap().to_owned();
    let e = client
        .call_err(
            "sign",
            sign_digest(&format!("{token_id}/99"), Hash::Sha256, &[1; 32], json!({})),
            "CERTIFICATE_NOT_FOUND",
        )
        .await
        .unwrap();
    assert_eq!(e.code, 1006);
    // ALGORITHM_NOT_SUPPORTED: RSA-PSS with an EC key; ECDSA with an RSA key.
    for (label, alg) in [
        ("sign-p256", "RSA-PSS"),
        ("sign-rsa2048", "ECDSA"),
        ("sign-p256", "Ed25519"),
    ] {
        let e = client
            .call_err(
                "sign",
                sign_digest(
                    &ids[label],
                    Hash::Sha256,
                    &[1; 32],
                    json!({"signatureAlgorithm": alg}),
                ),
                "ALGORITHM_NOT_SUPPORTED",
            )
            .await
            .unwrap();
        assert_eq!(e.code, 1008);
    }
    // authenticate: PS256 with an EC key.
    client
        .call_err(
            "authenticate",
            json!({"challenge": nonce(32).unwrap(), "certificateId": ids["auth-p256"], "algorithm": "PS256"}),
            "ALGORITHM_NOT_SUPPORTED",
        )
        .await
        .unwrap();
    // A digest of the wrong length for its algorithm.
    client
        .call_err(
            "sign",
            sign_digest(&ids["sign-p256"], Hash::Sha256, &[1; 20], json!({})),
            "INVALID_PARAMS",
        )
        .await
        .unwrap();
    // Enrolment input that is wrong before any dialog: a subject that is no name, a
    // certificate that is no certificate.
    client
        .call_err(
            "keys.generate",
            json!({"tokenId": token_id, "algorithm": "EC-P256", "label": "new", "subject": "New"}),
            "INVALID_PARAMS",
        )
        .await
        .unwrap();
    client
        .call_err(
            "certificates.import",
            json!({"tokenId": token_id, "certificate": b64(b"not a certificate")}),
            "INVALID_PARAMS",
        )
        .await
        .unwrap();
    assert!(agent.script().dialogs().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_consent_asks_once_per_connection_when_the_pin_is_cached() {
    let tk = new_token();
    let intranet = "https://intranet.example";
    let options = AgentOptions {
        allowed_origins: vec![PORTAL.into(), intranet.into()],
        session_consent_origins: vec![intranet.into()],
        pin_cache_seconds: 300,
        ..AgentOptions::default()
    };
    let agent = Agent::start(&tk, options).unwrap();
    let mut client = agent.connect(intranet).await.unwrap();
    let ids = certificate_ids(&mut client, &tk).await.unwrap();
    agent.script().push_all(&pins(1)).unwrap();
    for i in 0..3 {
        let digest = Hash::Sha256.digest(format!("session {i}").as_bytes());
        let r = client
            .call_ok(
                "sign",
                sign_digest(&ids["sign-p256"], Hash::Sha256, &digest, json!({})),
            )
            .await
            .unwrap();
        verify_raw(
            &tk.cert_pem("sign-p256"),
            &Signed::Digest(digest),
            &unb64(&r["signature"]).unwrap(),
            RawAlg::EcdsaDer(Hash::Sha256),
        )
        .unwrap();
    }
    assert_eq!(
        agent.script().dialogs().unwrap().len(),
        1,
        "one consent for the connection"
    );
    // A new connection of the same origin asks again, with a consent-only dialog (PIN cached).
    let mut second = agent.connect(intranet).await.unwrap();
    agent
        .script()
        .push(&Step::confirm(Button::Ok).expect(Command::Confirm))
        .unwrap();
    second
        .call_ok(
            "sign",
            sign_digest(&ids["sign-p256"], Hash::Sha256, &[3; 32], json!({})),
        )
        .await
        .unwrap();
    // An origin with per-request consent is asked every time, even with the PIN cached.
    let mut portal = agent.connect(PORTAL).await.unwrap();
    agent
        .script()
        .push_all(&[
            Step::confirm(Button::Ok).expect(Command::Confirm),
            Step::confirm(Button::Ok).expect(Command::Confirm),
        ])
        .unwrap();
    for _ in 0..2 {
        portal
            .call_ok(
                "sign",
                sign_digest(&ids["sign-p256"], Hash::Sha256, &[4; 32], json!({})),
            )
            .await
            .unwrap();
    }
    let dialogs = agent.script().dialogs().unwrap();
    assert_eq!(dialogs.len(), 4, "{dialogs:?}");
    assert!(dialogs[1..]
        .iter()
        .all(|d| d.command.as_deref() == Some("CONFIRM")));
    assert!(
        dialogs.iter().all(|d| d.script_errors.is_empty()),
        "{dialogs:?}"
    );
}
