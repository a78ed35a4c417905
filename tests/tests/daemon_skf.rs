//! Chinese USB keys through the running agent: the soft SKF library (tests/soft-skf, the GM/T
//! 0016 C interface) loaded by `keyport run` through `[[skf_modules]]` beside SoftHSM. SM2 keys
//! are listed like any other and sign over the wire; every signature is verified with OpenSSL 3
//! (`openssl dgst -sm3 -sigopt distid:…`, `openssl cms -verify`) and with Python gmssl, never
//! with KeyPort's own SM2 code.
#![allow(clippy::unwrap_used)] // a test fails by panicking

#[path = "../../skf-shim/tests/support/verify.rs"]
mod verify;

use std::process::Command as Process;

use keyport_e2e::harness::{b64, unb64, Agent, AgentOptions, Client, TestToken, PORTAL};
use keyport_e2e::pinentry::{Command, Step};
use keyport_e2e::skf::{SoftSkfStore, SKF_SM2_HOLDER, SKF_USER_PIN};
use serde_json::{json, Value};

const DEFAULT_ID: &str = "1234567812345678";

struct Rig {
    // Fields drop in order: the agent stops before the stores go.
    agent: Agent,
    client: Client,
    store: SoftSkfStore,
    _token: TestToken,
}

async fn start(steps: Vec<Step>) -> Rig {
    let token = TestToken::provision().unwrap();
    let store = SoftSkfStore::provision().unwrap();
    let agent = Agent::start(&token, AgentOptions::default().skf(&store).steps(steps)).unwrap();
    let client = agent.connect(PORTAL).await.unwrap();
    Rig {
        agent,
        client,
        store,
        _token: token,
    }
}

fn pins(n: usize) -> Vec<Step> {
    (0..n)
        .map(|_| Step::pin(SKF_USER_PIN).expect(Command::GetPin))
        .collect()
}

/// The certificate entry whose subject's CN is `cn`.
async fn certificate(client: &mut Client, cn: &str) -> Value {
    let list = client
        .call_ok("certificates.list", json!({}))
        .await
        .unwrap();
    list["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| {
            c["subject"]
                .as_str()
                .unwrap()
                .contains(&format!("CN={cn},"))
        })
        .unwrap_or_else(|| panic!("no certificate for {cn} in {list}"))
        .clone()
}

fn sign_data(id: &str, data: &[u8], extra: Value) -> Value {
    let mut p = json!({
        "certificateId": id,
        "data": b64(data),
        "display": {"title": "贷款合同 2026-114"},
    });
    if let (Some(p), Value::Object(e)) = (p.as_object_mut(), extra) {
        p.extend(e);
    }
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skf_keys_and_sm2_certificates_are_listed_beside_pkcs11_ones() {
    let mut rig = start(Vec::new()).await;
    let tokens = rig.client.call_ok("tokens.list", json!({})).await.unwrap();
    let tokens = tokens["tokens"].as_array().unwrap();
    let skf = tokens
        .iter()
        .find(|t| t["label"] == "KeyPort SM2 Key")
        .unwrap_or_else(|| panic!("no SKF key in {tokens:?}"));
    assert!(skf["id"].as_str().unwrap().starts_with("skf-"), "{skf}");
    assert_eq!(skf["serial"], "KP-SKF-0001");
    assert_eq!(skf["pin"]["locked"], false);
    assert!(
        tokens
            .iter()
            .any(|t| t["id"].as_str().unwrap().starts_with("tok-")),
        "SoftHSM's token is still listed: {tokens:?}"
    );
    // The spare key is not plugged in: not listed.
    assert!(!tokens.iter().any(|t| t["label"] == "KeyPort Spare Key"));

    let sm2 = certificate(&mut rig.client, SKF_SM2_HOLDER).await;
    assert_eq!(sm2["keyAlgorithm"], "SM2");
    assert_eq!(sm2["tokenId"], skf["id"]);
    assert_eq!(
        unb64(&sm2["certificate"]).unwrap(),
        std::fs::read(rig.store.dir().join("certs/sm2-sign.der")).unwrap()
    );
    let rsa = certificate(&mut rig.client, "张三 RSA").await;
    assert_eq!(rsa["keyAlgorithm"], "RSA-2048");

    // The SM2 filter keeps the two SM2 containers (one named in GBK bytes) and nothing else.
    let only = rig
        .client
        .call_ok(
            "certificates.list",
            json!({"filter": {"keyAlgorithm": ["SM2"]}}),
        )
        .await
        .unwrap();
    let only = only["certificates"].as_array().unwrap();
    assert_eq!(only.len(), 2, "{only:?}");
    assert!(only.iter().all(|c| c["keyAlgorithm"] == "SM2"));
    assert!(only
        .iter()
        .any(|c| c["subject"].as_str().unwrap().contains("CN=王五")));

    // The command line lists them too.
    let out = rig.agent.keyport(&["certs", "--json"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("\"SM2\"") && text.contains(SKF_SM2_HOLDER),
        "{text}"
    );
    let out = rig.agent.keyport(&["tokens", "--json"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("KeyPort SM2 Key"), "{text}");

    // keyport doctor: the library, its key and containers, under their own heading.
    let out = rig.agent.keyport(&["doctor"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let skf = text
        .split_once("SKF libraries")
        .unwrap_or_else(|| panic!("no SKF section: {text}"))
        .1;
    let library = rig.store.library().display().to_string();
    assert!(
        skf.contains(&format!("{library}  [loaded, 1 key]")),
        "{skf}"
    );
    assert!(skf.contains("key KP-SKF-0001 \"KeyPort SM2 Key\""), "{skf}");
    assert!(skf.contains("container SM2-SIGN: 张三 (SM2)"), "{skf}");
    assert!(
        skf.contains("container RSA-SIGN: 张三 RSA (RSA-2048)"),
        "{skf}"
    );
    let pkcs11 = text.split_once("SKF libraries").unwrap().0;
    assert!(!pkcs11.contains(&library), "not among the PKCS#11 modules");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sm2_signatures_over_data_verify_with_openssl_and_gmssl_with_their_user_id() {
    let mut rig = start(pins(3)).await;
    let id = certificate(&mut rig.client, SKF_SM2_HOLDER).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let public = rig.store.public_key("sm2-sign");
    let doc = "贷款合同 2026-114: 本金 100000 元".as_bytes();

    // Default: DER SEQUENCE { r, s }, SM3 with the default user ID.
    let res = rig
        .client
        .call_ok("sign", sign_data(&id, doc, json!({})))
        .await
        .unwrap();
    assert_eq!(res["signatureAlgorithm"], "SM2");
    assert_eq!(res["digestAlgorithm"], "SM3");
    let der = unb64(&res["signature"]).unwrap();
    assert!(verify::openssl_sm2(&public, DEFAULT_ID, doc, &der));
    assert!(verify::gmssl_sm2(&public, DEFAULT_ID, "der", doc, &der));
    assert!(!verify::openssl_sm2(
        &public,
        DEFAULT_ID,
        b"another document",
        &der
    ));

    // r || s with another user ID: verifies with that ID only.
    let alice = "ALICE123@YAHOO.COM";
    let res = rig
        .client
        .call_ok(
            "sign",
            sign_data(
                &id,
                doc,
                json!({"ecdsaEncoding": "p1363", "sm2UserId": alice, "signatureAlgorithm": "SM2"}),
            ),
        )
        .await
        .unwrap();
    let raw = unb64(&res["signature"]).unwrap();
    assert_eq!(raw.len(), 64);
    assert!(verify::gmssl_sm2(&public, alice, "raw", doc, &raw));
    let as_der = verify::raw_to_der_with_openssl(&raw);
    assert!(verify::openssl_sm2(&public, alice, doc, &as_der));
    assert!(!verify::openssl_sm2(&public, DEFAULT_ID, doc, &as_der));
    assert!(!verify::gmssl_sm2(&public, DEFAULT_ID, "raw", doc, &raw));

    // A digest is e = SM3(Z ‖ M), computed here by gmssl: the key signs it as it is.
    let e = verify::gmssl_e(&public, DEFAULT_ID, doc);
    let res = rig
        .client
        .call_ok(
            "sign",
            json!({"certificateId": id, "digest": {"algorithm": "SM3", "value": b64(&e)},
                   "display": {"title": "e"}}),
        )
        .await
        .unwrap();
    let der = unb64(&res["signature"]).unwrap();
    assert!(verify::openssl_sm2(&public, DEFAULT_ID, doc, &der));

    // One SKF_VerifyPIN per request (3 dialogs), and each request ended the verification.
    assert_eq!(rig.store.calls("SKF_VerifyPIN"), 3);
    assert_eq!(rig.store.calls("SKF_ClearSecureState"), 3);
    // Audited, with the SM2 certificate's subject.
    let audit = std::fs::read_to_string(rig.agent.audit_log()).unwrap();
    assert!(
        audit.lines().filter(|l| l.contains("CN=张三")).count() >= 3,
        "{audit}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sm2_batch_is_one_pin_and_an_rsa_container_signs_too() {
    let mut rig = start(pins(2)).await;
    let id = certificate(&mut rig.client, SKF_SM2_HOLDER).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let public = rig.store.public_key("sm2-sign");
    let docs: Vec<Vec<u8>> = (0..5).map(|i| format!("文件 {i}").into_bytes()).collect();
    let res = rig
        .client
        .call_ok(
            "sign.batch",
            json!({"certificateId": id,
                   "items": docs.iter().map(|d| json!({"data": b64(d)})).collect::<Vec<_>>(),
                   "display": {"title": "五份文件"}}),
        )
        .await
        .unwrap();
    let results = res["results"].as_array().unwrap();
    assert_eq!(results.len(), docs.len());
    for (doc, r) in docs.iter().zip(results) {
        let sig = unb64(&r["signature"]).unwrap();
        assert!(verify::openssl_sm2(&public, DEFAULT_ID, doc, &sig));
        assert!(verify::gmssl_sm2(&public, DEFAULT_ID, "der", doc, &sig));
    }
    assert_eq!(rig.store.calls("SKF_VerifyPIN"), 1, "one PIN for the batch");

    // The RSA container: RSASSA-PKCS1-v1_5 with SHA-256, checked by OpenSSL.
    let rsa = certificate(&mut rig.client, "张三 RSA").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let res = rig
        .client
        .call_ok("sign", sign_data(&rsa, b"RSA on an SKF key", json!({})))
        .await
        .unwrap();
    assert_eq!(res["signatureAlgorithm"], "RSASSA-PKCS1-v1_5");
    let sig = unb64(&res["signature"]).unwrap();
    assert!(verify::openssl_rsa_sha256(
        &rig.store.public_key("rsa-sign"),
        b"RSA on an SKF key",
        &sig
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_skf_pin_asks_again_with_the_warning_and_a_locked_one_asks_nothing() {
    let steps = vec![
        Step::pin("000000").expect(Command::GetPin),
        Step::pin(SKF_USER_PIN).expect(Command::GetPin),
        Step::pin(SKF_USER_PIN).expect(Command::GetPin),
    ];
    let mut rig = start(steps).await;
    let id = certificate(&mut rig.client, SKF_SM2_HOLDER).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let res = rig
        .client
        .call_ok("sign", sign_data(&id, b"wrong then right", json!({})))
        .await
        .unwrap();
    let der = unb64(&res["signature"]).unwrap();
    assert!(verify::openssl_sm2(
        &rig.store.public_key("sm2-sign"),
        DEFAULT_ID,
        b"wrong then right",
        &der
    ));
    let dialogs = rig.agent.script().dialogs().unwrap();
    assert_eq!(dialogs.len(), 2, "{dialogs:?}");
    assert!(dialogs[0].error.is_none());
    assert!(
        dialogs[1].error.is_some(),
        "the second dialog says the PIN was wrong"
    );
    assert_eq!(
        rig.store.calls("SKF_VerifyPIN"),
        2,
        "never a retry of our own"
    );

    // One try left (the key's own count, from SKF_GetPINInfo): the first dialog warns.
    rig.store.set_remaining(1).unwrap();
    rig.client
        .call_ok("sign", sign_data(&id, b"final try", json!({})))
        .await
        .unwrap();
    let dialogs = rig.agent.script().dialogs().unwrap();
    assert_eq!(dialogs.len(), 3);
    let warning = format!("{:?} {:?}", dialogs[2].error, dialogs[2].description);
    assert!(warning.contains("FINAL TRY"), "{warning}");
    assert_eq!(rig.store.calls("SKF_VerifyPIN"), 3);

    // Locked: no dialog, no SKF_VerifyPIN.
    rig.store.set_remaining(0).unwrap();
    let e = rig
        .client
        .call_err("sign", sign_data(&id, b"locked", json!({})), "PIN_LOCKED")
        .await
        .unwrap();
    assert_eq!(e.reason, "PIN_LOCKED");
    assert_eq!(rig.agent.script().dialogs().unwrap().len(), 3);
    assert_eq!(rig.store.calls("SKF_VerifyPIN"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_skf_key_pulled_mid_batch_returns_the_finished_signatures() {
    let mut rig = start(pins(1)).await;
    let id = certificate(&mut rig.client, SKF_SM2_HOLDER).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    rig.store.remove_after_signs(2).unwrap();
    let docs: Vec<Vec<u8>> = (0..4).map(|i| format!("doc {i}").into_bytes()).collect();
    let e = rig
        .client
        .call_err(
            "sign.batch",
            json!({"certificateId": id,
                   "items": docs.iter().map(|d| json!({"data": b64(d)})).collect::<Vec<_>>(),
                   "display": {"title": "four"}}),
            "TOKEN_NOT_PRESENT",
        )
        .await
        .unwrap();
    let data = e.data;
    assert_eq!(data["completed"], 2, "{data}");
    let results = data["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for (doc, r) in docs.iter().zip(results) {
        let sig = unb64(&r["signature"]).unwrap();
        assert!(verify::openssl_sm2(
            &rig.store.public_key("sm2-sign"),
            DEFAULT_ID,
            doc,
            &sig
        ));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sm2_cms_carries_gmt0010_oids_and_its_signature_verifies_with_openssl_and_gmssl() {
    let mut rig = start(pins(1)).await;
    let id = certificate(&mut rig.client, SKF_SM2_HOLDER).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let doc = "签署的文件内容".as_bytes();
    let res = rig
        .client
        .call_ok("sign", sign_data(&id, doc, json!({"format": "cms"})))
        .await
        .unwrap();
    assert_eq!(res["format"], "cms");
    assert_eq!(res["digestAlgorithm"], "SM3");
    let cms = unb64(&res["signature"]).unwrap();
    let work = tempfile::tempdir().unwrap();
    let (sig, content) = (work.path().join("sig.der"), work.path().join("doc"));
    std::fs::write(&sig, &cms).unwrap();
    std::fs::write(&content, doc).unwrap();
    // The GM/T 0010 identifiers are in the SignerInfo.
    let parsed = Process::new("openssl")
        .args(["asn1parse", "-inform", "DER", "-in"])
        .arg(&sig)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&parsed.stdout);
    assert!(
        text.contains("1.2.156.10197.1.401") || text.contains("sm3"),
        "{text}"
    );
    assert!(
        text.contains("1.2.156.10197.1.501") || text.contains("SM2-with-SM3"),
        "{text}"
    );
    // OpenSSL 3.0 can neither make an SM2 CMS (`cms -sign` with an SM2 key writes an empty
    // signature) nor check one (its CMS_SignerInfo_verify does not use the SM2 user ID). So
    // the SignedData is read apart with the `cms` crate and its parts checked by independent
    // tools: the messageDigest is OpenSSL's SM3 of the document, and the signature over the DER
    // signed attributes verifies with `openssl dgst -sm3 -sigopt distid:…` and with gmssl.
    let (attrs, signature, message_digest) = cms_parts(&cms);
    let sm3 = Process::new("openssl")
        .args(["dgst", "-sm3", "-binary"])
        .arg(&content)
        .output()
        .unwrap();
    assert_eq!(message_digest, sm3.stdout, "messageDigest is SM3(document)");
    let public = rig.store.public_key("sm2-sign");
    assert!(verify::openssl_sm2(&public, DEFAULT_ID, &attrs, &signature));
    assert!(verify::gmssl_sm2(
        &public, DEFAULT_ID, "der", &attrs, &signature
    ));
    assert!(!verify::openssl_sm2(
        &public, DEFAULT_ID, b"other", &signature
    ));
    // The signer's certificate is in it. (Its chain is not checked here: OpenSSL 3.0's
    // `verify` fails SM2 certificate signatures, "certificate signature failure".)
    let listed = std::fs::read(rig.store.dir().join("certs/sm2-sign.der")).unwrap();
    assert!(cms.windows(listed.len()).any(|w| w == listed.as_slice()));
}

/// The DER signed attributes (as signed: a SET), the signature and the messageDigest of the
/// one SignerInfo of a DER ContentInfo.
fn cms_parts(der_bytes: &[u8]) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    use der::{Decode as _, Encode as _};
    let ci = cms::content_info::ContentInfo::from_der(der_bytes).unwrap();
    let sd: cms::signed_data::SignedData = ci.content.decode_as().unwrap();
    let si = sd.signer_infos.0.iter().next().unwrap();
    assert_eq!(si.digest_alg.oid.to_string(), "1.2.156.10197.1.401");
    assert_eq!(
        si.signature_algorithm.oid.to_string(),
        "1.2.156.10197.1.501"
    );
    let attrs = si.signed_attrs.as_ref().unwrap();
    let md = attrs
        .iter()
        .find(|a| a.oid.to_string() == "1.2.840.113549.1.9.4")
        .unwrap()
        .values
        .iter()
        .next()
        .unwrap()
        .decode_as::<der::asn1::OctetString>()
        .unwrap()
        .as_bytes()
        .to_vec();
    (
        attrs.to_der().unwrap(),
        si.signature.as_bytes().to_vec(),
        md,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sm2_login_token_signs_sm3_of_origin_and_challenge() {
    let token = TestToken::provision().unwrap();
    let store = SoftSkfStore::provision().unwrap();
    // The provisioned SM2 certificate signs documents (nonRepudiation); the administrator lets
    // it log in too.
    let der = std::fs::read(store.dir().join("certs/sm2-sign.der")).unwrap();
    let fingerprint = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&der));
    let mut options = AgentOptions::default().skf(&store).steps(pins(1));
    options
        .extra_toml
        .push(format!("dual_use_certificates = [\"{fingerprint}\"]"));
    let agent = Agent::start(&token, options).unwrap();
    let mut client = agent.connect(PORTAL).await.unwrap();
    let id = certificate(&mut client, SKF_SM2_HOLDER).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let challenge = keyport_e2e::harness::nonce(32).unwrap();
    let res = client
        .call_ok(
            "authenticate",
            json!({"challenge": challenge, "certificateId": id}),
        )
        .await
        .unwrap();
    assert_eq!(res["algorithm"], "SM2");
    assert_eq!(res["format"], "web-eid:1.0");
    assert_eq!(unb64(&res["unverifiedCertificate"]).unwrap(), der);
    let sig = unb64(&res["signature"]).unwrap();
    assert_eq!(sig.len(), 64, "r || s");
    // The signed message, made with OpenSSL's SM3.
    let sm3 = |data: &[u8]| {
        let mut child = Process::new("openssl")
            .args(["dgst", "-sm3", "-binary"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), data).unwrap();
        child.wait_with_output().unwrap().stdout
    };
    let mut message = sm3(PORTAL.as_bytes());
    message.extend(sm3(challenge.as_bytes()));
    let public = store.public_key("sm2-sign");
    assert!(verify::gmssl_sm2(
        &public, DEFAULT_ID, "raw", &message, &sig
    ));
    let as_der = verify::raw_to_der_with_openssl(&sig);
    assert!(verify::openssl_sm2(&public, DEFAULT_ID, &message, &as_der));
    // Bound to the origin: not a signature for another site's message.
    let mut other = sm3(b"https://other.example");
    other.extend(sm3(challenge.as_bytes()));
    assert!(!verify::openssl_sm2(&public, DEFAULT_ID, &other, &as_der));
    drop(agent);
}

/// The first `tokens.changed` not seen before (`seen` of the client's notifications) whose list
/// satisfies `want`, within 20 s (frames are read as they come; no polling).
async fn tokens_changed(
    client: &mut Client,
    agent: &Agent,
    seen: &mut usize,
    want: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    use tokio_tungstenite::tungstenite::Message;
    let wait = async {
        loop {
            while *seen < client.notifications.len() {
                let n = client.notifications[*seen].clone();
                *seen += 1;
                if n["method"] == "tokens.changed" {
                    let list = n["params"]["tokens"].as_array().unwrap().clone();
                    if want(&list) {
                        return list;
                    }
                }
            }
            if let Message::Text(text) = client.next_message().await.unwrap() {
                client
                    .notifications
                    .push(serde_json::from_str(text.as_str()).unwrap());
            }
        }
    };
    match tokio::time::timeout(std::time::Duration::from_secs(20), wait).await {
        Ok(list) => list,
        Err(_) => panic!("no tokens.changed within 20 s; agent: {}", agent.stderr()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugging_an_skf_key_in_and_out_reaches_an_approved_page() {
    let mut rig = start(Vec::new()).await;
    // Before: the spare key is not listed.
    let tokens = rig.client.call_ok("tokens.list", json!({})).await.unwrap();
    let spare = |list: &[Value]| list.iter().any(|t| t["label"] == "KeyPort Spare Key");
    assert!(!spare(tokens["tokens"].as_array().unwrap()));
    // certificates.list answers from a cache (issue 12), filled here: the plug must drop it.
    let spare_cert = "CN=李四,";
    assert!(!listed_subjects(&mut rig.client)
        .await
        .iter()
        .any(|s| s.contains(spare_cert)));

    let mut seen = rig.client.notifications.len();
    let present = rig.store.device_dir("SKF-KEY-1").join("present");
    std::fs::write(&present, "insertion-1").unwrap();
    let list = tokens_changed(&mut rig.client, &rig.agent, &mut seen, spare).await;
    assert!(list.iter().any(|t| t["label"] == "KeyPort SM2 Key"));
    // Its certificate is there to use at once.
    certificate(&mut rig.client, "李四").await;

    std::fs::remove_file(&present).unwrap();
    let list = tokens_changed(&mut rig.client, &rig.agent, &mut seen, |l| !spare(l)).await;
    assert!(list.iter().any(|t| t["label"] == "KeyPort SM2 Key"));
    // Gone from the certificates too, and the other key's are still there.
    let subjects = listed_subjects(&mut rig.client).await;
    assert!(
        !subjects.iter().any(|s| s.contains(spare_cert)),
        "{subjects:?}"
    );
    assert!(subjects
        .iter()
        .any(|s| s.contains(&format!("CN={SKF_SM2_HOLDER},"))));
}

/// The subject of every certificate `certificates.list` shows.
async fn listed_subjects(client: &mut Client) -> Vec<String> {
    let list = client
        .call_ok("certificates.list", json!({}))
        .await
        .unwrap();
    list["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["subject"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyport_sign_signs_a_file_with_the_sm2_key() {
    let mut rig = start(pins(1)).await;
    let id = certificate(&mut rig.client, SKF_SM2_HOLDER).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let work = tempfile::tempdir().unwrap();
    let (input, output) = (work.path().join("合同.txt"), work.path().join("合同.sig"));
    std::fs::write(&input, "命令行签署的文件").unwrap();
    // The one-shot command beside the running agent: the same store, dialog script and audit log.
    let out = Process::new(keyport_e2e::harness::keyport_bin())
        .arg("--config")
        .arg(rig.agent.config_path())
        .args(["sign", "--cert", &id, "--in"])
        .arg(&input)
        .arg("--out")
        .arg(&output)
        .env("KEYPORT_SOFT_SKF_DIR", rig.store.state())
        .envs(rig.agent.script().env())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "keyport sign: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sig = std::fs::read(&output).unwrap();
    let data = std::fs::read(&input).unwrap();
    let public = rig.store.public_key("sm2-sign");
    assert!(verify::openssl_sm2(&public, DEFAULT_ID, &data, &sig));
    assert!(verify::gmssl_sm2(&public, DEFAULT_ID, "der", &data, &sig));
    assert_eq!(rig.store.calls("SKF_VerifyPIN"), 1);
}
