//! Enrolment through the running agent (issue 13): `keys.generate` makes a key pair on the
//! SoftHSM token and a PKCS#10 request that `openssl req -verify` accepts, the test CA issues a
//! certificate from that request with `openssl x509 -req`, `certificates.import` stores it,
//! `certificates.list` shows it, and a signature with it verifies with OpenSSL and Python.
#![allow(clippy::unwrap_used)] // a test fails by panicking

use std::path::Path;
use std::process::Command as Process;

use keyport_e2e::harness::{
    b64, unb64, verify_raw, Agent, AgentOptions, Client, Hash, RawAlg, Signed, TestToken, PORTAL,
    USER_PIN,
};
use keyport_e2e::pinentry::{Command, Step};
use serde_json::{json, Value};

fn openssl(args: &[&str], dir: &Path) -> String {
    let out = Process::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "openssl {args:?}: {text}");
    text
}

/// The request verifies with OpenSSL and carries the subject asked for; the test CA issues a
/// document-signing certificate from it (serial `serial`). Returns the certificate's DER; its
/// PEM is `dir/cert.pem`.
fn verify_and_issue(tk: &TestToken, csr: &[u8], cn: &str, serial: u32, dir: &Path) -> Vec<u8> {
    std::fs::write(dir.join("req.der"), csr).unwrap();
    let text = openssl(
        &[
            "req", "-verify", "-inform", "DER", "-in", "req.der", "-noout", "-subject",
        ],
        dir,
    );
    assert!(text.contains("verify OK"), "{text}");
    assert!(text.contains(&format!("CN = {cn}")), "{text}");
    std::fs::write(
        dir.join("ext.cnf"),
        "[ext]\nkeyUsage=critical,digitalSignature,nonRepudiation\n",
    )
    .unwrap();
    let ca_key = tk.dir().join("ca.key");
    openssl(
        &[
            "x509",
            "-req",
            "-inform",
            "DER",
            "-in",
            "req.der",
            "-CA",
            tk.ca_pem().to_str().unwrap(),
            "-CAkey",
            ca_key.to_str().unwrap(),
            "-set_serial",
            &serial.to_string(),
            "-days",
            "30",
            "-extfile",
            "ext.cnf",
            "-extensions",
            "ext",
            "-out",
            "cert.pem",
        ],
        dir,
    );
    openssl(
        &[
            "x509", "-in", "cert.pem", "-outform", "DER", "-out", "cert.der",
        ],
        dir,
    );
    std::fs::read(dir.join("cert.der")).unwrap()
}

fn token_id(tokens: &Value) -> String {
    tokens["tokens"][0]["id"].as_str().unwrap().to_owned()
}

async fn generate(
    client: &mut Client,
    token: &str,
    algorithm: &str,
    cn: &str,
) -> (String, Vec<u8>) {
    let r = client
        .call_ok(
            "keys.generate",
            json!({"tokenId": token, "algorithm": algorithm, "label": format!("{cn} key"),
                   "subject": format!("CN={cn},O=KeyPort Test")}),
        )
        .await
        .unwrap();
    (
        r["keyId"].as_str().unwrap().to_owned(),
        unb64(&r["csr"]).unwrap(),
    )
}

/// The private keys pkcs11-tool sees on the token.
fn private_keys(tk: &TestToken) -> usize {
    let out = Process::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", tk.conf())
        .args([
            "--module",
            keyport_e2e::harness::SOFTHSM,
            "--login",
            "--pin",
            USER_PIN,
        ])
        .args(["--list-objects", "--type", "privkey"])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .matches("Private Key Object")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_request_issue_import_list_and_sign_for_each_key_type() {
    let tk = TestToken::provision().unwrap();
    let agent = Agent::start(&tk, AgentOptions::default()).unwrap();
    let mut client = agent.connect(PORTAL).await.unwrap();
    let token = token_id(&client.call_ok("tokens.list", json!({})).await.unwrap());
    let cases = [
        ("EC-P256", RawAlg::EcdsaDer(Hash::Sha256)),
        // `data` is hashed with SHA-256 unless `hash` says otherwise.
        ("EC-P384", RawAlg::EcdsaDer(Hash::Sha256)),
        ("RSA-2048", RawAlg::RsaPkcs1(Hash::Sha256)),
        ("RSA-3072", RawAlg::RsaPss(Hash::Sha256)),
        ("Ed25519", RawAlg::Ed25519),
    ];
    for (i, (algorithm, raw)) in cases.into_iter().enumerate() {
        let cn = format!("Enrolled {algorithm}");
        // One PIN for the key and its request, one for the import, one for the signature.
        agent
            .script()
            .push_all(&[
                Step::pin(USER_PIN).expect(Command::GetPin),
                Step::pin(USER_PIN).expect(Command::GetPin),
                Step::pin(USER_PIN).expect(Command::GetPin),
            ])
            .unwrap();
        let (key_id, csr) = generate(&mut client, &token, algorithm, &cn).await;
        assert!(key_id.starts_with(&format!("{token}/")), "{key_id}");

        let work = tempfile::tempdir().unwrap();
        let der = verify_and_issue(&tk, &csr, &cn, 1000 + i as u32, work.path());
        // Not listed before the import (a key without a certificate); this listing is what
        // certificates.list's cache (issue 12) holds until the import drops it.
        let before = client
            .call_ok("certificates.list", json!({}))
            .await
            .unwrap();
        assert!(
            !before["certificates"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["id"] == key_id.as_str()),
            "{algorithm}: listed before its import"
        );
        let imported = client
            .call_ok(
                "certificates.import",
                json!({"tokenId": token, "certificate": b64(&der)}),
            )
            .await
            .unwrap();
        assert_eq!(imported["certificateId"], key_id.as_str(), "{algorithm}");

        let list = client
            .call_ok("certificates.list", json!({}))
            .await
            .unwrap();
        let entry = list["certificates"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == key_id.as_str())
            .unwrap_or_else(|| panic!("{algorithm}: not listed in {list}"))
            .clone();
        assert_eq!(unb64(&entry["certificate"]).unwrap(), der);
        assert_eq!(entry["keyAlgorithm"], algorithm);

        let doc = format!("a contract signed with the new {algorithm} key").into_bytes();
        let mut params = json!({"certificateId": key_id, "data": b64(&doc),
                                "display": {"title": format!("Enrolment check {algorithm}")}});
        if matches!(raw, RawAlg::RsaPss(_)) {
            params["signatureAlgorithm"] = json!("RSA-PSS");
        }
        let signed = client.call_ok("sign", params).await.unwrap();
        verify_raw(
            &work.path().join("cert.pem"),
            &Signed::Data(doc),
            &unb64(&signed["signature"]).unwrap(),
            raw,
        )
        .unwrap_or_else(|e| panic!("{algorithm}: {e}"));
    }

    let dialogs = agent.script().dialogs().unwrap();
    assert_eq!(dialogs.len(), 15, "{dialogs:#?}");
    let create = &dialogs[0];
    assert_eq!(create.title.as_deref(), Some("KeyPort: create a key"));
    let text = create.description.as_deref().unwrap();
    assert!(
        text.contains("https://portal.example asks to create a new key on your token."),
        "{text}"
    );
    assert!(
        text.contains("«EC-P256»") && text.contains("«CN=Enrolled EC-P256,O=KeyPort Test»"),
        "{text}"
    );
    let store = &dialogs[1];
    assert_eq!(store.title.as_deref(), Some("KeyPort: store a certificate"));
    let text = store.description.as_deref().unwrap();
    assert!(
        text.contains("«CN=Enrolled EC-P256,O=KeyPort Test»"),
        "{text}"
    );
    assert!(!text.contains("replaced"), "{text}");

    let audit = std::fs::read_to_string(agent.audit_log()).unwrap();
    assert_eq!(audit.matches("\"keys.generate\"").count(), 5, "{audit}");
    assert_eq!(
        audit.matches("\"certificates.import\"").count(),
        5,
        "{audit}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancels_wrong_pins_strangers_and_renewals() {
    let tk = TestToken::provision().unwrap();
    let agent = Agent::start(&tk, AgentOptions::default()).unwrap();
    let mut client = agent.connect(PORTAL).await.unwrap();
    let token = token_id(&client.call_ok("tokens.list", json!({})).await.unwrap());
    let keys_before = private_keys(&tk);

    // A cancelled dialog creates nothing.
    agent.script().push(&Step::cancel()).unwrap();
    client
        .call_err(
            "keys.generate",
            json!({"tokenId": token, "algorithm": "EC-P256", "label": "never", "subject": "CN=Never"}),
            "USER_CANCELLED",
        )
        .await
        .unwrap();
    assert_eq!(private_keys(&tk), keys_before);

    // A wrong PIN is asked again with the warning; the right one then makes the key.
    agent
        .script()
        .push_all(&[Step::pin("000000"), Step::pin(USER_PIN)])
        .unwrap();
    let (key_id, csr) = generate(&mut client, &token, "EC-P256", "Renewed").await;
    assert_eq!(private_keys(&tk), keys_before + 1);
    let dialogs = agent.script().dialogs().unwrap();
    assert_eq!(dialogs.len(), 3);
    assert!(
        dialogs[2]
            .error
            .as_deref()
            .is_some_and(|e| e.starts_with("Wrong PIN.")),
        "{dialogs:#?}"
    );

    // A stranger's certificate (the CA's own): CERTIFICATE_NOT_FOUND, nothing stored.
    let ca_der = {
        let work = tempfile::tempdir().unwrap();
        openssl(
            &[
                "x509",
                "-in",
                tk.ca_pem().to_str().unwrap(),
                "-outform",
                "DER",
                "-out",
                "ca.der",
            ],
            work.path(),
        );
        std::fs::read(work.path().join("ca.der")).unwrap()
    };
    agent.script().push(&Step::pin(USER_PIN)).unwrap();
    let e = client
        .call_err(
            "certificates.import",
            json!({"tokenId": token, "certificate": b64(&ca_der)}),
            "CERTIFICATE_NOT_FOUND",
        )
        .await
        .unwrap();
    assert!(e.message.contains("matches no key"), "{}", e.message);

    // A renewal for the same key replaces nothing silently: stored beside the first, both
    // listed (the first keeps the key's id, the new one gets its exact id), each signs.
    let (w1, w2, w3) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let first = verify_and_issue(&tk, &csr, "Renewed", 7, w1.path());
    let second = verify_and_issue(&tk, &csr, "Renewed", 8, w2.path());
    assert_ne!(first, second);
    agent
        .script()
        .push_all(&[
            Step::pin(USER_PIN),
            Step::pin(USER_PIN),
            Step::pin(USER_PIN),
            Step::pin(USER_PIN),
        ])
        .unwrap();
    let r = client
        .call_ok(
            "certificates.import",
            json!({"tokenId": token, "certificate": b64(&first)}),
        )
        .await
        .unwrap();
    assert_eq!(r["certificateId"], key_id.as_str());
    let r = client
        .call_ok(
            "certificates.import",
            json!({"tokenId": token, "certificate": b64(&second)}),
        )
        .await
        .unwrap();
    let second_id = r["certificateId"].as_str().unwrap().to_owned();
    assert!(
        second_id.starts_with(&format!("{key_id}.")) && second_id.len() == key_id.len() + 17,
        "{second_id}"
    );
    let kept_dialog = agent.script().dialogs().unwrap().pop().unwrap();
    assert!(
        kept_dialog
            .description
            .as_deref()
            .unwrap()
            .contains("it stays, and both are listed until you remove the old one"),
        "{kept_dialog:#?}"
    );
    let listed = |list: &Value| -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<(String, Vec<u8>)> = list["certificates"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["id"].as_str().unwrap().starts_with(key_id.as_str()))
            .map(|c| {
                (
                    c["id"].as_str().unwrap().to_owned(),
                    unb64(&c["certificate"]).unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let list = client
        .call_ok("certificates.list", json!({}))
        .await
        .unwrap();
    assert_eq!(
        listed(&list),
        vec![
            (key_id.clone(), first.clone()),
            (second_id.clone(), second.clone())
        ]
    );
    let doc = b"signed with a renewed key".to_vec();
    for (id, dir) in [(&key_id, &w1), (&second_id, &w2)] {
        let signed = client
            .call_ok(
                "sign",
                json!({"certificateId": id, "data": b64(&doc), "display": {"title": "Renewal"}}),
            )
            .await
            .unwrap();
        // Each id's answer carries its own certificate, and the signature verifies with it.
        let cert = unb64(&signed["certificate"]).unwrap();
        assert_eq!(
            cert,
            if id == &key_id {
                first.clone()
            } else {
                second.clone()
            }
        );
        verify_raw(
            &dir.path().join("cert.pem"),
            &Signed::Data(doc.clone()),
            &unb64(&signed["signature"]).unwrap(),
            RawAlg::EcdsaDer(Hash::Sha256),
        )
        .unwrap();
    }

    // The user removes the old one on the command line (a PIN dialog that says what stays).
    agent
        .script()
        .push(&Step::pin(USER_PIN).expect(Command::GetPin))
        .unwrap();
    let out = agent
        .keyport_with_dialogs(&[
            "certs",
            "remove",
            "--token",
            &token,
            "--certificate",
            &key_id,
        ])
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!("removed certificate {key_id} ")),
        "{text}"
    );
    let remove_dialog = agent.script().dialogs().unwrap().pop().unwrap();
    assert_eq!(
        remove_dialog.title.as_deref(),
        Some("KeyPort: remove a certificate")
    );
    let described = remove_dialog.description.unwrap();
    assert!(
        described.contains("keyport certs remove (command line) asks to remove a certificate")
            && described.contains("Serial number: «07»")
            && described.contains("The key keeps its certificate valid until"),
        "{described}"
    );
    // The renewal is listed under the key's id now; its exact id still signs with it.
    let list = client
        .call_ok("certificates.list", json!({}))
        .await
        .unwrap();
    assert_eq!(listed(&list), vec![(key_id.clone(), second.clone())]);
    agent.script().push(&Step::pin(USER_PIN)).unwrap();
    let signed = client
        .call_ok(
            "sign",
            json!({"certificateId": second_id, "data": b64(&doc), "display": {"title": "Renewal"}}),
        )
        .await
        .unwrap();
    assert_eq!(unb64(&signed["certificate"]).unwrap(), second);
    // The key's last certificate is not removed: refused before any dialog.
    let dialogs_before = agent.script().dialogs().unwrap().len();
    let out = agent
        .keyport_with_dialogs(&[
            "certs",
            "remove",
            "--token",
            &token,
            "--certificate",
            &second_id,
        ])
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("only certificate"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(agent.script().dialogs().unwrap().len(), dialogs_before);

    // "replace": true deletes the key's other certificates once the new one is stored.
    let third = verify_and_issue(&tk, &csr, "Renewed", 9, w3.path());
    agent.script().push(&Step::pin(USER_PIN)).unwrap();
    let r = client
        .call_ok(
            "certificates.import",
            json!({"tokenId": token, "certificate": b64(&third), "replace": true}),
        )
        .await
        .unwrap();
    assert_eq!(r["certificateId"], key_id.as_str());
    let replace_dialog = agent.script().dialogs().unwrap().pop().unwrap();
    assert!(replace_dialog
        .description
        .unwrap()
        .contains("The certificate this key has now is replaced."),);
    let list = client
        .call_ok("certificates.list", json!({}))
        .await
        .unwrap();
    assert_eq!(listed(&list), vec![(key_id.clone(), third)]);
    let audit = std::fs::read_to_string(agent.audit_log()).unwrap();
    assert!(audit.contains("USER_CANCELLED"), "{audit}");
    assert!(audit.contains("CERTIFICATE_NOT_FOUND"), "{audit}");
    assert_eq!(
        audit.matches("\"certificates.remove\"").count(),
        1,
        "{audit}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_always_authenticate_key_asks_again_to_sign_its_request() {
    let tk = TestToken::provision().unwrap();
    let agent = Agent::start(&tk, AgentOptions::default()).unwrap();
    let mut client = agent.connect(PORTAL).await.unwrap();
    let token = token_id(&client.call_ok("tokens.list", json!({})).await.unwrap());
    // The key's PIN dialog, then the request's own (the key asks for its PIN per signature).
    agent
        .script()
        .push_all(&[
            Step::pin(USER_PIN).expect(Command::GetPin),
            Step::pin(USER_PIN).expect(Command::GetPin),
        ])
        .unwrap();
    let r = client
        .call_ok(
            "keys.generate",
            json!({"tokenId": token, "algorithm": "EC-P256", "label": "qualified",
                   "subject": "CN=Qualified Signer", "alwaysAuthenticate": true}),
        )
        .await
        .unwrap();
    let dialogs = agent.script().dialogs().unwrap();
    assert_eq!(dialogs.len(), 2);
    assert_eq!(
        dialogs[1].title.as_deref(),
        Some("KeyPort: sign the certificate request")
    );
    let work = tempfile::tempdir().unwrap();
    let der = verify_and_issue(
        &tk,
        &unb64(&r["csr"]).unwrap(),
        "Qualified Signer",
        42,
        work.path(),
    );
    agent.script().push(&Step::pin(USER_PIN)).unwrap();
    client
        .call_ok(
            "certificates.import",
            json!({"tokenId": token, "certificate": b64(&der)}),
        )
        .await
        .unwrap();
    // The pkcs11-tool view: the private key asks for its PIN per signature.
    let out = Process::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", tk.conf())
        .args([
            "--module",
            keyport_e2e::harness::SOFTHSM,
            "--login",
            "--pin",
            USER_PIN,
        ])
        .args([
            "--list-objects",
            "--type",
            "privkey",
            "--label",
            "qualified",
        ])
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(listing.contains("always authenticate"), "{listing}");
    // And it signs, one dialog for the login and the signature's own PIN.
    agent.script().push(&Step::pin(USER_PIN)).unwrap();
    let doc = b"a qualified signature".to_vec();
    let signed = client
        .call_ok(
            "sign",
            json!({"certificateId": r["keyId"], "data": b64(&doc),
                   "display": {"title": "Qualified"}}),
        )
        .await
        .unwrap();
    verify_raw(
        &work.path().join("cert.pem"),
        &Signed::Data(doc),
        &unb64(&signed["signature"]).unwrap(),
        RawAlg::EcdsaDer(Hash::Sha256),
    )
    .unwrap();
    assert_eq!(agent.script().dialogs().unwrap().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_the_requests_own_pin_dialog_leaves_no_key() {
    let tk = TestToken::provision().unwrap();
    let agent = Agent::start(&tk, AgentOptions::default()).unwrap();
    let mut client = agent.connect(PORTAL).await.unwrap();
    let token = token_id(&client.call_ok("tokens.list", json!({})).await.unwrap());
    let keys_before = private_keys(&tk);
    agent
        .script()
        .push_all(&[Step::pin(USER_PIN), Step::cancel()])
        .unwrap();
    client
        .call_err(
            "keys.generate",
            json!({"tokenId": token, "algorithm": "EC-P384", "label": "undone",
                   "subject": "CN=Undone", "alwaysAuthenticate": true}),
            "USER_CANCELLED",
        )
        .await
        .unwrap();
    assert_eq!(agent.script().dialogs().unwrap().len(), 2);
    assert_eq!(private_keys(&tk), keys_before, "the new key was destroyed");
    // The token is logged out again: the next request asks for the PIN.
    agent
        .script()
        .push(&Step::cancel().expect(Command::GetPin))
        .unwrap();
    client
        .call_err(
            "keys.generate",
            json!({"tokenId": token, "algorithm": "EC-P256", "label": "x", "subject": "CN=X"}),
            "USER_CANCELLED",
        )
        .await
        .unwrap();
    assert!(agent
        .script()
        .dialogs()
        .unwrap()
        .iter()
        .all(|d| d.script_errors.is_empty()));
}

/// A PIN-pad reader (the fault module in front of SoftHSM stands in for it): the enrolment
/// dialog only confirms, and the PIN is typed on the pad, never passing through KeyPort.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pin_pad_token_enrols_with_a_confirm_dialog() {
    use keyport_e2e::pinentry::Button;
    let tk = TestToken::provision().unwrap();
    let agent = Agent::start(&tk, AgentOptions::default().fault()).unwrap();
    agent
        .set_fault(&format!("pin_pad=1\npin_pad_entry={USER_PIN}\n"))
        .unwrap();
    let mut client = agent.connect(PORTAL).await.unwrap();
    let token = token_id(&client.call_ok("tokens.list", json!({})).await.unwrap());
    agent
        .script()
        .push(&Step::confirm(Button::Ok).expect(Command::Confirm))
        .unwrap();
    let (key_id, csr) = generate(&mut client, &token, "EC-P256", "Pad User").await;
    let dialogs = agent.script().dialogs().unwrap();
    assert_eq!(dialogs.len(), 1);
    assert_eq!(
        dialogs[0].command.as_deref(),
        Some("CONFIRM"),
        "no PIN field"
    );
    assert!(dialogs[0]
        .description
        .as_deref()
        .unwrap_or_default()
        .contains("Enter your PIN on the reader's keypad"));
    let logins: Vec<String> = agent
        .fault_log()
        .into_iter()
        .filter(|l| l.starts_with("C_Login "))
        .collect();
    assert_eq!(logins.len(), 1, "{logins:?}");
    let work = tempfile::tempdir().unwrap();
    let der = verify_and_issue(&tk, &csr, "Pad User", 9, work.path());
    agent
        .script()
        .push(&Step::confirm(Button::Ok).expect(Command::Confirm))
        .unwrap();
    let r = client
        .call_ok(
            "certificates.import",
            json!({"tokenId": token, "certificate": b64(&der)}),
        )
        .await
        .unwrap();
    assert_eq!(r["certificateId"], key_id.as_str());
}

/// A token without Ed25519 key generation (the fault module hides CKM_EC_EDWARDS_KEY_PAIR_GEN,
/// 0x1055): ALGORITHM_NOT_SUPPORTED before any dialog; the other types still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_type_the_token_cannot_generate_is_refused_before_any_dialog() {
    let tk = TestToken::provision().unwrap();
    let agent = Agent::start(&tk, AgentOptions::default().fault()).unwrap();
    agent.set_fault("hide_mechanisms=0x1055\n").unwrap();
    let mut client = agent.connect(PORTAL).await.unwrap();
    let token = token_id(&client.call_ok("tokens.list", json!({})).await.unwrap());
    let e = client
        .call_err(
            "keys.generate",
            json!({"tokenId": token, "algorithm": "Ed25519", "label": "ed", "subject": "CN=Ed"}),
            "ALGORITHM_NOT_SUPPORTED",
        )
        .await
        .unwrap();
    assert_eq!(e.message, "this token cannot generate Ed25519 keys");
    assert!(agent.script().dialogs().unwrap().is_empty());
    agent.script().push(&Step::pin(USER_PIN)).unwrap();
    let (_, csr) = generate(&mut client, &token, "EC-P256", "Still Works").await;
    let work = tempfile::tempdir().unwrap();
    verify_and_issue(&tk, &csr, "Still Works", 5, work.path());
}
