//! Enrollment on an SKF key from end to end, crate level: an SM2 key generated on the soft SKF
//! key through `skf_shim`, a PKCS#10 request for it built by `agent::enroll` and signed on the
//! key, checked by `openssl req -verify`; the SM2 test CA issues a certificate from the request
//! with `openssl x509 -req`; the certificate is imported and listed on its container; a
//! signature with the new key verifies against the imported certificate with OpenSSL and gmssl.
//! (The wire methods, dialogs and CLI around this: daemon_skf_enroll.rs.)

#[path = "../../skf-shim/tests/support/soft_skf.rs"]
mod soft_skf;
#[path = "../../skf-shim/tests/support/verify.rs"]
mod verify;

use std::path::{Path, PathBuf};
use std::process::Command;

use agent::enroll::{self, RequestSignature};
use skf_shim::{
    CertificateId, ImportMode, NewContainer, SecretPin, SignAlgorithm, SignInput, SignRequest,
    Sm2Encoding, DEFAULT_SM2_USER_ID,
};
use soft_skf::{SoftSkf, USER_PIN};

const SUBJECT: &str = "CN=张伟,O=示例银行,C=CN";
const DISTID: &str = "distid:1234567812345678";

fn sign_one(skf: &SoftSkf, id: &CertificateId, message: &[u8]) -> Vec<u8> {
    let mut sigs = skf
        .library
        .sign(
            SignRequest {
                certificate: id.clone(),
                algorithm: SignAlgorithm::sm2(Sm2Encoding::Der),
                inputs: vec![SignInput::Message(message.to_vec())],
                logout_after: false,
            },
            None,
        )
        .expect("sign on the SKF key");
    sigs.pop().expect("one signature")
}

/// `openssl req -verify` over a DER request; (accepted, output).
fn openssl_req_verify(dir: &Path, request: &[u8]) -> (bool, String) {
    let file = dir.join("verify-me.der");
    std::fs::write(&file, request).expect("write request");
    let out = Command::new("openssl")
        .args(["req", "-verify", "-inform", "DER", "-noout", "-subject"])
        .args(["-nameopt", "utf8,sep_comma_plus"])
        .args(["-vfyopt", DISTID, "-in"])
        .arg(&file)
        .output()
        .expect("run openssl req");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && text.contains("verify OK"), text)
}

/// The public key of a DER certificate, PEM, as OpenSSL extracts it.
fn certificate_public_key(dir: &Path, cert: &[u8]) -> PathBuf {
    let (der, pem) = (dir.join("imported.der"), dir.join("imported.pub.pem"));
    std::fs::write(&der, cert).expect("write certificate");
    let out = Command::new("openssl")
        .args(["x509", "-inform", "DER", "-noout", "-pubkey", "-in"])
        .arg(&der)
        .output()
        .expect("run openssl x509");
    assert!(out.status.success(), "openssl x509 -pubkey failed");
    std::fs::write(&pem, out.stdout).expect("write public key");
    pem
}

#[test]
fn generate_request_issue_import_and_sign_on_an_skf_key() {
    let skf = SoftSkf::new();
    let work = skf.dir.path().to_path_buf();

    // 1. The key pair, generated on the key (one PIN verification).
    let key = skf
        .library
        .generate_sm2(
            &skf.app(),
            NewContainer::Generated,
            SecretPin::from(USER_PIN.to_owned()),
        )
        .expect("generate an SM2 key on the SKF key");

    // 2. The request: agent::enroll builds it for the key's SPKI; the key signs it (SM2 over
    //    e = SM3(Z ‖ M), default user ID, DER), as the request says.
    let pending = enroll::request(SUBJECT, &key.public_key_der).expect("request");
    assert_eq!(pending.signature(), RequestSignature::Sm2Sm3);
    let signature = sign_one(&skf, &key.id, pending.message());
    let request = pending.finish(&signature).expect("finish the request");

    // 3. OpenSSL accepts the request, reads the subject and sees the key we generated.
    let (ok, text) = openssl_req_verify(&work, &request);
    assert!(ok, "openssl req -verify: {text}");
    assert!(text.contains("CN=张伟"), "{text}");
    let mut tampered = request.clone();
    let last = tampered.len() - 40; // inside the signature value
    tampered[last] ^= 0x01;
    assert!(
        !openssl_req_verify(&work, &tampered).0,
        "the same check refuses a request with one bit changed"
    );

    // 4. The test CA issues from the request (it checks the request's signature again).
    let certificate = skf.ca_issue_from_request(&request, 4242);
    let cert_public = certificate_public_key(&work, &certificate);
    assert_eq!(
        std::fs::read(&cert_public).expect("read"),
        std::fs::read(skf.spki_pem(&key.public_key_der, "generated")).expect("read"),
        "the CA certified the generated key"
    );

    // 5. Import: listed on the new container with the new holder.
    let imported = skf
        .library
        .import_certificate(&key.id, certificate.clone(), ImportMode::KeepExisting)
        .expect("import the issued certificate");
    assert_eq!(imported.id, key.id);
    let listed = skf
        .library
        .certificates(Some(&skf.token))
        .expect("list certificates");
    let ours = listed
        .iter()
        .find(|c| c.id == key.id)
        .expect("the imported certificate is listed on its container");
    assert_eq!(ours.der, certificate);
    assert_eq!(ours.holder, "张伟");
    assert_eq!(ours.issuer, listed[0].issuer, "issued by the test CA");
    assert!(
        listed.iter().any(|c| c.holder == "张三"),
        "the provisioned certificate is still listed"
    );

    // 6. A document signed with the new key verifies against the imported certificate.
    let doc = "借款合同 No. 7".as_bytes();
    let sig = sign_one(&skf, &ours.id, doc);
    assert!(verify::openssl_sm2(
        &cert_public,
        DEFAULT_SM2_USER_ID,
        doc,
        &sig
    ));
    assert!(verify::gmssl_sm2(
        &cert_public,
        DEFAULT_SM2_USER_ID,
        "der",
        doc,
        &sig
    ));
    assert!(!verify::openssl_sm2(
        &cert_public,
        DEFAULT_SM2_USER_ID,
        b"another document",
        &sig
    ));
    assert!(!verify::gmssl_sm2(
        &cert_public,
        DEFAULT_SM2_USER_ID,
        "der",
        b"another document",
        &sig
    ));

    skf.library.logout(&skf.app()).expect("logout");
}
