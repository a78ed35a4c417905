//! Enrolment on an SKF key through the running agent (issue 13): `keys.generate` with `SM2`
//! makes a key pair in a new container of the soft SKF key and a PKCS#10 request signed with
//! SM3withSM2 that `openssl req -verify -vfyopt distid:1234567812345678` accepts; the SM2 test CA
//! issues a certificate from it with `openssl x509 -req`; `certificates.import` writes it into
//! the container's signing slot; `certificates.list` shows it; a signature with it verifies
//! with OpenSSL and gmssl. Then the refusals: a cancelled dialog (no container left), key types
//! of the wrong back end, a stranger's certificate, bytes that are no certificate, a container
//! name in use, a renewal for the same key; and the command line.
#![allow(clippy::unwrap_used)] // a test fails by panicking

#[path = "../../skf-shim/tests/support/verify.rs"]
mod verify;

use std::path::{Path, PathBuf};
use std::process::Command as Process;
use std::time::Duration;

use keyport_e2e::harness::{
    b64, certificates_until, unb64, Agent, AgentOptions, Client, TestToken, PORTAL,
};
use keyport_e2e::pinentry::{Command, Step};
use keyport_e2e::skf::{SoftSkfStore, SKF_APP, SKF_DEVICE, SKF_USER_PIN};
use serde_json::{json, Value};

const DISTID: &str = "distid:1234567812345678";
const DEFAULT_ID: &str = "1234567812345678";

struct Rig {
    // Fields drop in order: the agent stops before the stores go.
    agent: Agent,
    client: Client,
    store: SoftSkfStore,
    token: TestToken,
    work: tempfile::TempDir,
}

async fn start() -> Rig {
    let token = TestToken::provision().unwrap();
    let store = SoftSkfStore::provision().unwrap();
    let agent = Agent::start(&token, AgentOptions::default().skf(&store)).unwrap();
    let client = agent.connect(PORTAL).await.unwrap();
    Rig {
        agent,
        client,
        store,
        token,
        work: tempfile::tempdir().unwrap(),
    }
}

impl Rig {
    /// The ids of the SKF key and of the SoftHSM token.
    async fn token_ids(&mut self) -> (String, String) {
        let list = self.client.call_ok("tokens.list", json!({})).await.unwrap();
        let ids: Vec<String> = list["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_str().unwrap().to_owned())
            .collect();
        let skf = ids.iter().find(|i| i.starts_with("skf-")).unwrap().clone();
        let pkcs11 = ids.iter().find(|i| i.starts_with("tok-")).unwrap().clone();
        (skf, pkcs11)
    }

    /// The containers of the plugged-in key's application, by name, sorted.
    fn containers(&self) -> Vec<String> {
        let dir = self
            .store
            .device_dir(SKF_DEVICE)
            .join("apps")
            .join(SKF_APP)
            .join("containers");
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn path(&self, name: &str) -> PathBuf {
        self.work.path().join(name)
    }
}

fn openssl(args: &[&str], dir: &Path) -> (bool, String) {
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
    (out.status.success(), text)
}

/// `openssl req -verify` (with the SM2 default user ID) accepts the request, which carries the
/// subject asked for, an SM2 key and an SM3withSM2 signature; the SM2 test CA issues a
/// document-signing certificate from it (checking the request again). Returns its DER; the
/// certificate's public key is `<name>.pub.pem` in `dir`.
fn verify_and_issue(
    store: &SoftSkfStore,
    csr: &[u8],
    cn: &str,
    serial: u32,
    name: &str,
    dir: &Path,
) -> Vec<u8> {
    let req = format!("{name}.req.der");
    std::fs::write(dir.join(&req), csr).unwrap();
    let (ok, text) = openssl(
        &[
            "req",
            "-verify",
            "-inform",
            "DER",
            "-in",
            &req,
            "-noout",
            "-text",
            "-nameopt",
            "utf8,sep_comma_plus",
            "-vfyopt",
            DISTID,
        ],
        dir,
    );
    assert!(ok && text.contains("verify OK"), "{text}");
    assert!(text.contains(&format!("CN={cn}")), "{text}");
    assert!(text.contains("ASN1 OID: SM2"), "an SM2 key: {text}");
    assert!(
        text.contains("SM2-with-SM3"),
        "an SM3withSM2 signature: {text}"
    );
    // With another user ID, or none, OpenSSL hashes another Z and refuses it: the request is
    // signed over the default one. (OpenSSL 3.0's `req -verify` exits 0 either way: read its
    // words.)
    for other in [&["-vfyopt", "distid:8765432187654321"][..], &[]] {
        let mut args = vec!["req", "-verify", "-inform", "DER", "-in", &req, "-noout"];
        args.extend_from_slice(other);
        let (_, text) = openssl(&args, dir);
        assert!(
            text.contains("verify failure") && !text.contains("verify OK"),
            "{other:?}: {text}"
        );
    }

    std::fs::write(
        dir.join("ext.cnf"),
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,nonRepudiation\n",
    )
    .unwrap();
    let (ca, ca_key) = (store.ca_pem(), store.dir().join("ca.key"));
    let (cert, serial) = (format!("{name}.der"), serial.to_string());
    let (ok, text) = openssl(
        &[
            "x509",
            "-req",
            "-inform",
            "DER",
            "-in",
            &req,
            "-vfyopt",
            DISTID,
            "-CA",
            ca.to_str().unwrap(),
            "-CAkey",
            ca_key.to_str().unwrap(),
            "-sm3",
            "-sigopt",
            DISTID,
            "-days",
            "30",
            "-set_serial",
            &serial,
            "-extfile",
            "ext.cnf",
            "-outform",
            "DER",
            "-out",
            &cert,
        ],
        dir,
    );
    assert!(ok, "the CA issues: {text}");
    let public = format!("{name}.pub.pem");
    let (ok, text) = openssl(
        &[
            "x509", "-inform", "DER", "-in", &cert, "-noout", "-pubkey", "-out", &public,
        ],
        dir,
    );
    assert!(ok, "{text}");
    std::fs::read(dir.join(&cert)).unwrap()
}

async fn generate(
    client: &mut Client,
    token: &str,
    label: &str,
    subject: &str,
) -> (String, Vec<u8>) {
    let r = client
        .call_ok(
            "keys.generate",
            json!({"tokenId": token, "algorithm": "SM2", "label": label, "subject": subject}),
        )
        .await
        .unwrap();
    (
        r["keyId"].as_str().unwrap().to_owned(),
        unb64(&r["csr"]).unwrap(),
    )
}

fn listed(list: &Value, id: &str) -> Vec<Value> {
    list["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["id"] == id)
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sm2_key_is_generated_requested_issued_imported_listed_and_signs() {
    let mut rig = start().await;
    let (skf, _) = rig.token_ids().await;
    let before = rig.containers();
    // One PIN for the key and its request, one for the import, one for the signature.
    rig.agent
        .script()
        .push_all(&[
            Step::pin(SKF_USER_PIN).expect(Command::GetPin),
            Step::pin(SKF_USER_PIN).expect(Command::GetPin),
            Step::pin(SKF_USER_PIN).expect(Command::GetPin),
        ])
        .unwrap();
    let (key_id, csr) = generate(
        &mut rig.client,
        &skf,
        "张伟 2026",
        "CN=张伟,O=示例银行,C=CN",
    )
    .await;
    assert!(key_id.starts_with(&format!("{skf}/")), "{key_id}");
    let mut after = before.clone();
    after.push("张伟 2026".to_owned());
    after.sort();
    assert_eq!(
        rig.containers(),
        after,
        "one new container, named by the label"
    );

    let der = verify_and_issue(&rig.store, &csr, "张伟", 7001, "zhang", rig.work.path());
    let imported = rig
        .client
        .call_ok(
            "certificates.import",
            json!({"tokenId": skf, "certificate": b64(&der)}),
        )
        .await
        .unwrap();
    assert_eq!(imported["certificateId"], key_id.as_str());
    // The very same certificate again changes nothing and answers its id.
    rig.agent.script().push(&Step::pin(SKF_USER_PIN)).unwrap();
    let again = rig
        .client
        .call_ok(
            "certificates.import",
            json!({"tokenId": skf, "certificate": b64(&der)}),
        )
        .await
        .unwrap();
    assert_eq!(again["certificateId"], key_id.as_str());

    let list = rig
        .client
        .call_ok("certificates.list", json!({}))
        .await
        .unwrap();
    let entry = listed(&list, &key_id);
    assert_eq!(entry.len(), 1, "{list}");
    assert_eq!(unb64(&entry[0]["certificate"]).unwrap(), der);
    assert_eq!(entry[0]["keyAlgorithm"], "SM2");
    assert_eq!(entry[0]["tokenId"], skf.as_str());
    assert!(entry[0]["subject"].as_str().unwrap().contains("CN=张伟"));

    let doc = "借款合同 No. 2026-114".as_bytes().to_vec();
    let signed = rig
        .client
        .call_ok(
            "sign",
            json!({"certificateId": key_id, "data": b64(&doc),
                   "display": {"title": "贷款合同 2026-114"}}),
        )
        .await
        .unwrap();
    let sig = unb64(&signed["signature"]).unwrap();
    let public = rig.path("zhang.pub.pem");
    assert!(verify::openssl_sm2(&public, DEFAULT_ID, &doc, &sig));
    assert!(verify::gmssl_sm2(&public, DEFAULT_ID, "der", &doc, &sig));
    assert!(!verify::openssl_sm2(
        &public,
        DEFAULT_ID,
        b"another document",
        &sig
    ));

    let dialogs = rig.agent.script().dialogs().unwrap();
    assert_eq!(dialogs.len(), 4, "{dialogs:#?}");
    assert_eq!(dialogs[0].title.as_deref(), Some("KeyPort: create a key"));
    let text = dialogs[0].description.as_deref().unwrap();
    for part in [
        "https://portal.example asks to create a new key on your token.",
        "«SM2»",
        "«CN=张伟,O=示例银行,C=CN»",
        "Container: «张伟 2026»",
        "KeyPort SM2 Key",
    ] {
        assert!(text.contains(part), "{part:?} in {text}");
    }
    assert_eq!(
        dialogs[1].title.as_deref(),
        Some("KeyPort: store a certificate")
    );
    let text = dialogs[1].description.as_deref().unwrap();
    assert!(text.contains("Container: «张伟 2026»"), "{text}");
    assert!(text.contains("KeyPort SM2 Test CA"), "{text}");

    // One SKF_VerifyPIN per PIN typed, never a retry; the PIN is cleared after each request
    // (SKF keeps no login between requests).
    assert_eq!(rig.store.calls("SKF_VerifyPIN"), 4);
    let cleared = rig.store.calls("SKF_ClearSecureState");
    assert!(cleared >= 4, "{cleared}");
    let audit = std::fs::read_to_string(rig.agent.audit_log()).unwrap();
    assert_eq!(audit.matches("\"keys.generate\"").count(), 1, "{audit}");
    assert_eq!(
        audit.matches("\"certificates.import\"").count(),
        2,
        "{audit}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancels_wrong_types_strangers_names_in_use_and_renewals_on_an_skf_key() {
    let mut rig = start().await;
    let (skf, pkcs11) = rig.token_ids().await;
    let before = rig.containers();

    // A cancelled dialog creates nothing: no container.
    rig.agent.script().push(&Step::cancel()).unwrap();
    rig.client
        .call_err(
            "keys.generate",
            json!({"tokenId": skf, "algorithm": "SM2", "label": "never", "subject": "CN=Never"}),
            "USER_CANCELLED",
        )
        .await
        .unwrap();
    assert_eq!(rig.containers(), before);
    assert_eq!(rig.agent.script().dialogs().unwrap().len(), 1);

    // Key types of the other back end: refused before any dialog.
    let e = rig
        .client
        .call_err(
            "keys.generate",
            json!({"tokenId": skf, "algorithm": "EC-P256", "label": "p", "subject": "CN=P"}),
            "ALGORITHM_NOT_SUPPORTED",
        )
        .await
        .unwrap();
    assert!(e.message.contains("SM2"), "{}", e.message);
    let e = rig
        .client
        .call_err(
            "keys.generate",
            json!({"tokenId": pkcs11, "algorithm": "SM2", "label": "s", "subject": "CN=S"}),
            "ALGORITHM_NOT_SUPPORTED",
        )
        .await
        .unwrap();
    assert!(e.message.contains("cannot generate SM2"), "{}", e.message);
    rig.client
        .call_err(
            "keys.generate",
            json!({"tokenId": skf, "algorithm": "SM2", "label": "q", "subject": "CN=Q",
                   "alwaysAuthenticate": true}),
            "ALGORITHM_NOT_SUPPORTED",
        )
        .await
        .unwrap();
    assert_eq!(
        rig.agent.script().dialogs().unwrap().len(),
        1,
        "no new dialog"
    );

    // A stranger's certificate (the SM2 CA's own), one of another key type (SoftHSM's P-256
    // CA), bytes that are no certificate: refused before any dialog, nothing written.
    let pem_to_der = |pem: &Path, out: &str| {
        let (ok, text) = openssl(
            &[
                "x509",
                "-in",
                pem.to_str().unwrap(),
                "-outform",
                "DER",
                "-out",
                out,
            ],
            rig.work.path(),
        );
        assert!(ok, "{text}");
        std::fs::read(rig.path(out)).unwrap()
    };
    for stranger in [
        pem_to_der(&rig.store.ca_pem(), "sm2-ca.der"),
        pem_to_der(&rig.token.ca_pem(), "p256-ca.der"),
    ] {
        let e = rig
            .client
            .call_err(
                "certificates.import",
                json!({"tokenId": skf, "certificate": b64(&stranger)}),
                "CERTIFICATE_NOT_FOUND",
            )
            .await
            .unwrap();
        assert!(e.message.contains("matches no key"), "{}", e.message);
    }
    rig.client
        .call_err(
            "certificates.import",
            json!({"tokenId": skf, "certificate": b64(b"not a certificate")}),
            "INVALID_PARAMS",
        )
        .await
        .unwrap();
    assert_eq!(
        rig.agent.script().dialogs().unwrap().len(),
        1,
        "no new dialog"
    );
    assert_eq!(rig.containers(), before);

    // The key fails to generate, or to sign the request: TOKEN_ERROR naming the SKF call, and
    // the container made for the key is gone again.
    for (knob, function) in [
        ("fail_keygen", "SKF_GenECCKeyPair"),
        ("fail_sign", "SKF_ECCSignData"),
    ] {
        let switch = rig.store.device_dir(SKF_DEVICE).join(knob);
        std::fs::write(&switch, b"").unwrap();
        rig.agent.script().push(&Step::pin(SKF_USER_PIN)).unwrap();
        let e = rig
            .client
            .call_err(
                "keys.generate",
                json!({"tokenId": skf, "algorithm": "SM2", "label": "doomed", "subject": "CN=D"}),
                "TOKEN_ERROR",
            )
            .await
            .unwrap();
        assert_eq!(e.data["function"], function, "{e:?}");
        assert_eq!(rig.containers(), before, "{knob}: no container left");
        std::fs::remove_file(&switch).unwrap();
    }
    assert_eq!(rig.store.calls("SKF_DeleteContainer"), 2);

    // A label naming a container that holds a key: INVALID_PARAMS, the key untouched. A wrong
    // PIN first is asked again with the key's warning.
    rig.agent
        .script()
        .push_all(&[Step::pin("000000"), Step::pin(SKF_USER_PIN)])
        .unwrap();
    let e = rig
        .client
        .call_err(
            "keys.generate",
            json!({"tokenId": skf, "algorithm": "SM2", "label": "SM2-SIGN", "subject": "CN=X"}),
            "INVALID_PARAMS",
        )
        .await
        .unwrap();
    assert!(e.message.contains("choose another label"), "{}", e.message);
    let dialogs = rig.agent.script().dialogs().unwrap();
    assert_eq!(dialogs.len(), 5);
    assert!(
        dialogs[4]
            .error
            .as_deref()
            .is_some_and(|e| e.starts_with("Wrong PIN.")),
        "{dialogs:#?}"
    );
    assert_eq!(rig.containers(), before);

    // A renewal for the same key: the container has one signing slot, so it is refused
    // without "replace", and replaces the first with it.
    rig.agent
        .script()
        .push_all(&[
            Step::pin(SKF_USER_PIN),
            Step::pin(SKF_USER_PIN),
            Step::pin(SKF_USER_PIN),
            Step::pin(SKF_USER_PIN),
        ])
        .unwrap();
    let (key_id, csr) = generate(&mut rig.client, &skf, "renewed", "CN=Renewed,C=CN").await;
    let first = verify_and_issue(&rig.store, &csr, "Renewed", 8001, "first", rig.work.path());
    let second = verify_and_issue(&rig.store, &csr, "Renewed", 8002, "second", rig.work.path());
    rig.client
        .call_ok(
            "certificates.import",
            json!({"tokenId": skf, "certificate": b64(&first)}),
        )
        .await
        .unwrap();
    let e = rig
        .client
        .call_err(
            "certificates.import",
            json!({"tokenId": skf, "certificate": b64(&second)}),
            "INVALID_PARAMS",
        )
        .await
        .unwrap();
    assert!(e.message.contains("replace"), "{}", e.message);
    let r = rig
        .client
        .call_ok(
            "certificates.import",
            json!({"tokenId": skf, "certificate": b64(&second), "replace": true}),
        )
        .await
        .unwrap();
    assert_eq!(r["certificateId"], key_id.as_str());
    let replace_dialog = rig.agent.script().dialogs().unwrap().pop().unwrap();
    assert!(replace_dialog
        .description
        .unwrap()
        .contains("The certificate this key has now is replaced."));
    let list = rig
        .client
        .call_ok("certificates.list", json!({}))
        .await
        .unwrap();
    let certs: Vec<Vec<u8>> = listed(&list, &key_id)
        .iter()
        .map(|c| unb64(&c["certificate"]).unwrap())
        .collect();
    assert_eq!(certs, vec![second]);

    let audit = std::fs::read_to_string(rig.agent.audit_log()).unwrap();
    assert!(audit.contains("USER_CANCELLED"), "{audit}");
    assert!(audit.contains("CERTIFICATE_NOT_FOUND"), "{audit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_generate_and_certs_import_on_an_skf_key_from_the_command_line() {
    let mut rig = start().await;
    let (skf, _) = rig.token_ids().await;
    // The running agent lists (and caches) the certificates before the command line, in a
    // process of its own, changes the key: it must still see the change.
    let before = rig
        .client
        .call_ok("certificates.list", json!({}))
        .await
        .unwrap();
    let req = rig.path("cli.req.pem");
    rig.agent
        .script()
        .push(&Step::pin(SKF_USER_PIN).expect(Command::GetPin))
        .unwrap();
    let out = rig
        .agent
        .keyport_with_dialogs(&[
            "keys",
            "generate",
            "--token",
            &skf,
            "--algorithm",
            "SM2",
            "--subject",
            "CN=李雷,O=示例银行,C=CN",
            "--label",
            "cli-key",
            "--out",
            req.to_str().unwrap(),
        ])
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key_id = text
        .split_whitespace()
        .find(|w| w.starts_with(&format!("{skf}/")))
        .unwrap_or_else(|| panic!("no key id in {text}"))
        .to_owned();
    assert!(text.contains("SM2"), "{text}");
    assert!(rig.containers().contains(&"cli-key".to_owned()));
    let dialogs = rig.agent.script().dialogs().unwrap();
    let description = dialogs.last().unwrap().description.clone().unwrap();
    assert!(
        description.contains("keyport keys generate (command line) asks to create a new key")
            && description.contains("Container: «cli-key»"),
        "{description}"
    );

    // The PEM request: the same checks and the CA, via DER.
    let (ok, text) = openssl(
        &[
            "req",
            "-in",
            "cli.req.pem",
            "-outform",
            "DER",
            "-out",
            "cli-request.der",
        ],
        rig.work.path(),
    );
    assert!(ok, "{text}");
    let csr = std::fs::read(rig.path("cli-request.der")).unwrap();
    let cert = verify_and_issue(&rig.store, &csr, "李雷", 9001, "cli", rig.work.path());
    assert!(!cert.is_empty());
    let cert_path = rig.path("cli.der");
    rig.agent
        .script()
        .push(&Step::pin(SKF_USER_PIN).expect(Command::GetPin))
        .unwrap();
    let out = rig
        .agent
        .keyport_with_dialogs(&[
            "certs",
            "import",
            "--token",
            &skf,
            "--in",
            cert_path.to_str().unwrap(),
        ])
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(&key_id), "{text}");
    assert!(listed(&before, &key_id).is_empty());
    let list = certificates_until(
        &mut rig.client,
        "the certificate imported on the command line",
        Duration::from_secs(15),
        |list| !listed(list, &key_id).is_empty(),
    )
    .await
    .unwrap();
    assert_eq!(
        unb64(&listed(&list, &key_id)[0]["certificate"]).unwrap(),
        cert
    );
    assert_eq!(
        list["certificates"].as_array().unwrap().len(),
        before["certificates"].as_array().unwrap().len() + 1
    );
}
