//! Enrollment through the real C interface of the soft SKF library: an SM2 key generated on
//! the key (its public key checked against OpenSSL's reading of what the key stored and by
//! signatures OpenSSL and gmssl verify), a wrong PIN that creates nothing, a failed generation
//! that leaves no container, and certificate import: a stranger's certificate, garbage, and
//! renewal (a second certificate for the same key) refused with nothing changed.

#[path = "support/soft_skf.rs"]
mod soft_skf;
#[path = "support/verify.rs"]
mod verify;

use std::process::Command;

use skf_shim::{
    CertificateId, Error, GeneratedKey, ImportMode, NewContainer, SecretPin, SignAlgorithm,
    SignInput, SignRequest, Sm2Encoding, DEFAULT_SM2_USER_ID,
};
use soft_skf::{SoftSkf, MAX_RETRIES, SM2_CONTAINER, USER_PIN};

fn pin(p: &str) -> SecretPin {
    SecretPin::from(p.to_owned())
}

fn generate(skf: &SoftSkf, container: NewContainer) -> GeneratedKey {
    skf.library
        .generate_sm2(&skf.app(), container, pin(USER_PIN))
        .expect("generate an SM2 key")
}

fn sign_message(skf: &SoftSkf, id: &CertificateId, message: &[u8]) -> Vec<u8> {
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
        .expect("sign with the new key");
    sigs.pop().expect("one signature")
}

/// OpenSSL's SubjectPublicKeyInfo (DER) of the private key the soft library stored.
fn openssl_spki_of_stored_key(skf: &SoftSkf, container: &[u8]) -> Vec<u8> {
    let out = Command::new("openssl")
        .args(["pkey", "-pubout", "-outform", "DER", "-in"])
        .arg(skf.container_file(container, "sign.key.pem"))
        .output()
        .expect("openssl pkey");
    assert!(out.status.success(), "openssl pkey failed");
    out.stdout
}

#[test]
fn a_generated_key_is_the_one_the_key_stored_and_signs_with() {
    let skf = SoftSkf::new();
    let before = skf.container_dirs();
    let key = generate(&skf, NewContainer::Generated);
    assert!(key.created_container);
    let name = key.id.raw_container().to_vec();
    assert!(name.starts_with(b"KeyPort-"), "{}", key.id.container());
    let after = skf.container_dirs();
    assert_eq!(after.len(), before.len() + 1);
    assert!(after.contains(&name));
    // One PIN verification, one container, one key pair.
    assert_eq!(skf.calls("SKF_VerifyPIN"), 1);
    assert_eq!(skf.calls("SKF_CreateContainer"), 1);
    assert_eq!(skf.calls("SKF_GenECCKeyPair"), 1);

    // The SPKI is byte for byte what OpenSSL makes of the stored key.
    assert_eq!(
        key.public_key_der,
        openssl_spki_of_stored_key(&skf, &name),
        "the SubjectPublicKeyInfo is the key's, encoded as OpenSSL encodes SM2 keys"
    );
    let text = Command::new("openssl")
        .args(["pkey", "-pubin", "-noout", "-text", "-in"])
        .arg(skf.spki_pem(&key.public_key_der, "new"))
        .output()
        .expect("openssl pkey -text");
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("ASN1 OID: SM2"),
        "OpenSSL reads the SPKI as an SM2 key"
    );

    // A signature through the shim (Z from SKF_ExportPublicKey, no certificate yet) verifies
    // under the SPKI we handed out, with OpenSSL and gmssl.
    let exports = skf.calls("SKF_ExportPublicKey");
    let sig = sign_message(&skf, &key.id, b"request info");
    assert!(skf.calls("SKF_ExportPublicKey") > exports);
    let public = skf.spki_pem(&key.public_key_der, "new");
    assert!(verify::openssl_sm2(
        &public,
        DEFAULT_SM2_USER_ID,
        b"request info",
        &sig
    ));
    assert!(verify::gmssl_sm2(
        &public,
        DEFAULT_SM2_USER_ID,
        "der",
        b"request info",
        &sig
    ));
    assert!(!verify::openssl_sm2(
        &public,
        DEFAULT_SM2_USER_ID,
        b"other",
        &sig
    ));

    // The key persists: another instance of the library signs with it.
    let again = skf.reload("libsoftskf-2.so");
    let token = again
        .tokens()
        .expect("tokens")
        .into_iter()
        .find(|t| t.device_name == soft_skf::DEVICE)
        .expect("present")
        .id;
    let app = skf_shim::ApplicationId::new(token, soft_skf::APP);
    again.verify_pin(&app, pin(USER_PIN)).expect("PIN");
    let id = CertificateId::from_raw(app, &name);
    let sigs = again
        .sign(
            SignRequest {
                certificate: id,
                algorithm: SignAlgorithm::sm2(Sm2Encoding::Der),
                inputs: vec![SignInput::Message(b"after restart".to_vec())],
                logout_after: true,
            },
            None,
        )
        .expect("sign after a restart");
    assert!(verify::openssl_sm2(
        &public,
        DEFAULT_SM2_USER_ID,
        b"after restart",
        &sigs[0]
    ));
}

#[test]
fn a_named_container_is_created_once_and_a_key_is_never_overwritten() {
    let skf = SoftSkf::new();
    let key = generate(&skf, NewContainer::Named(b"CA-ENROLL-2026".to_vec()));
    assert_eq!(key.id.raw_container(), b"CA-ENROLL-2026");
    let stored = std::fs::read(skf.container_file(b"CA-ENROLL-2026", "sign.key.pem")).expect("key");

    for taken in [b"CA-ENROLL-2026".as_slice(), SM2_CONTAINER.as_bytes()] {
        match skf.library.generate_sm2(
            &skf.app(),
            NewContainer::Named(taken.to_vec()),
            pin(USER_PIN),
        ) {
            Err(Error::ContainerExists(id)) => assert_eq!(id.raw_container(), taken),
            other => panic!("expected ContainerExists, got {other:?}"),
        }
    }
    assert_eq!(skf.calls("SKF_GenECCKeyPair"), 1, "no second generation");
    assert_eq!(
        std::fs::read(skf.container_file(b"CA-ENROLL-2026", "sign.key.pem")).expect("key"),
        stored,
        "the first key is untouched"
    );
    // The provisioned certificate still lists and its key still matches it.
    assert_eq!(skf.certificate(SM2_CONTAINER).holder, "张三");
}

#[test]
fn an_existing_empty_container_is_used_and_a_bad_name_is_the_keys_refusal() {
    let skf = SoftSkf::new();
    // A container a vendor tool made and left empty (written behind the library's back).
    let slot = skf.container_file(b"VENDOR-SLOT", "type");
    std::fs::create_dir_all(slot.parent().expect("dir")).expect("mkdir");
    std::fs::write(&slot, "empty\n").expect("type");
    let key = generate(&skf, NewContainer::Named(b"VENDOR-SLOT".to_vec()));
    assert!(!key.created_container);
    assert_eq!(skf.calls("SKF_CreateContainer"), 0, "opened, not created");
    assert_eq!(
        key.public_key_der,
        openssl_spki_of_stored_key(&skf, b"VENDOR-SLOT")
    );

    // Names are the key's business: one it refuses comes back naming the call and the code.
    match skf.library.generate_sm2(
        &skf.app(),
        NewContainer::Named(vec![b'n'; 65]),
        pin(USER_PIN),
    ) {
        Err(Error::Skf { function, code }) => {
            assert_eq!(function, "SKF_CreateContainer");
            assert_eq!(skf_shim::sar_name(code), "SAR_NAMELENERR");
        }
        other => panic!("expected the key's refusal, got {other:?}"),
    }
    let verifies = skf.calls("SKF_VerifyPIN");
    for bad in [b"a\0b".to_vec(), Vec::new()] {
        assert!(matches!(
            skf.library
                .generate_sm2(&skf.app(), NewContainer::Named(bad), pin(USER_PIN)),
            Err(Error::InvalidInput(_))
        ));
    }
    assert_eq!(
        skf.calls("SKF_VerifyPIN"),
        verifies,
        "refused before the key is asked"
    );
    assert_eq!(
        skf.calls("SKF_GenECCKeyPair"),
        1,
        "only the first one generated"
    );
}

#[test]
fn a_wrong_or_locked_pin_creates_nothing() {
    let skf = SoftSkf::new();
    let before = skf.container_dirs();
    match skf
        .library
        .generate_sm2(&skf.app(), NewContainer::Generated, pin("000000"))
    {
        Err(Error::PinIncorrect { retries_left, .. }) => assert_eq!(retries_left, MAX_RETRIES - 1),
        other => panic!("expected PinIncorrect, got {other:?}"),
    }
    assert_eq!(skf.calls("SKF_VerifyPIN"), 1, "one try, never retried");
    assert_eq!(skf.calls("SKF_CreateContainer"), 0);
    assert_eq!(skf.calls("SKF_GenECCKeyPair"), 0);
    assert_eq!(skf.container_dirs(), before);

    for _ in 1..MAX_RETRIES {
        let _ = skf.library.verify_pin(&skf.app(), pin("000000"));
    }
    let verifies = skf.calls("SKF_VerifyPIN");
    assert!(matches!(
        skf.library
            .generate_sm2(&skf.app(), NewContainer::Generated, pin(USER_PIN)),
        Err(Error::PinLocked)
    ));
    assert_eq!(
        skf.calls("SKF_VerifyPIN"),
        verifies,
        "no PIN sent to a locked key"
    );
    assert_eq!(skf.calls("SKF_CreateContainer"), 0);
    assert_eq!(skf.container_dirs(), before);
}

#[test]
fn a_failed_generation_deletes_the_container_it_made() {
    let skf = SoftSkf::new();
    let before = skf.container_dirs();
    std::fs::write(skf.device_dir(soft_skf::DEVICE).join("fail_keygen"), b"").expect("switch");
    match skf.library.generate_sm2(
        &skf.app(),
        NewContainer::Named(b"DOOMED".to_vec()),
        pin(USER_PIN),
    ) {
        Err(Error::Skf { function, code }) => {
            assert_eq!(function, "SKF_GenECCKeyPair");
            assert_eq!(skf_shim::sar_name(code), "SAR_GENRANDERR");
        }
        other => panic!("expected the SKF_GenECCKeyPair failure, got {other:?}"),
    }
    assert_eq!(skf.calls("SKF_CreateContainer"), 1);
    assert_eq!(skf.calls("SKF_DeleteContainer"), 1);
    assert_eq!(skf.container_dirs(), before, "no container left behind");
}

#[test]
fn import_stores_the_certificate_for_the_key_and_lists_it() {
    let skf = SoftSkf::new();
    let key = generate(&skf, NewContainer::Generated);
    let public = skf.spki_pem(&key.public_key_der, "new");
    let cert = skf.ca_issue_for_key(&public, "/C=CN/O=KeyPort Test/CN=Zhao Liu", 9001);
    let info = skf
        .library
        .import_certificate(&key.id, cert.clone(), ImportMode::KeepExisting)
        .expect("import");
    assert_eq!(info.id, key.id);
    assert_eq!(info.holder, "Zhao Liu");
    assert_eq!(info.der, cert);
    assert_eq!(skf.calls("SKF_ImportCertificate"), 1);
    // Listed like a provisioned one, and what the key stored is the certificate's bytes.
    assert_eq!(skf.certificate(key.id.container().as_str()).der, cert);
    assert_eq!(
        std::fs::read(skf.container_file(key.id.raw_container(), "sign.cert.der")).expect("cert"),
        cert
    );
    // The same certificate again writes nothing.
    skf.library
        .import_certificate(&key.id, cert, ImportMode::KeepExisting)
        .expect("same certificate again");
    assert_eq!(skf.calls("SKF_ImportCertificate"), 1);
}

#[test]
fn a_strangers_certificate_or_garbage_is_refused_and_changes_nothing() {
    let skf = SoftSkf::new();
    let key = generate(&skf, NewContainer::Generated);
    let stranger = skf.cert_der("sm2-sign"); // 张三's, for another key
    match skf
        .library
        .import_certificate(&key.id, stranger, ImportMode::Replace)
    {
        Err(Error::CertificateNotForKey(id)) => assert_eq!(id, key.id),
        other => panic!("expected CertificateNotForKey, got {other:?}"),
    }
    // An RSA certificate cannot be for an SM2 key either.
    assert!(matches!(
        skf.library
            .import_certificate(&key.id, skf.cert_der("rsa-sign"), ImportMode::Replace),
        Err(Error::CertificateNotForKey(_))
    ));
    for garbage in [
        b"".to_vec(),
        b"-----BEGIN CERTIFICATE-----".to_vec(),
        vec![0x30, 0x03, 2, 1, 1],
    ] {
        match skf
            .library
            .import_certificate(&key.id, garbage, ImportMode::Replace)
        {
            Err(Error::InvalidInput(_)) => {}
            other => panic!("expected InvalidInput, got {other:?}"),
        }
    }
    // A certificate for a container that does not exist.
    let missing = CertificateId::new(skf.app(), "NO-SUCH-CONTAINER");
    assert!(matches!(
        skf.library
            .import_certificate(&missing, skf.cert_der("sm2-sign"), ImportMode::Replace),
        Err(Error::ContainerNotFound(_))
    ));
    assert_eq!(skf.calls("SKF_ImportCertificate"), 0, "nothing written");
    assert!(!skf
        .container_file(key.id.raw_container(), "sign.cert.der")
        .exists());
    assert!(
        skf.library
            .certificates(Some(&skf.token))
            .expect("list")
            .iter()
            .all(|c| c.id != key.id),
        "the new container lists no certificate"
    );
    // The provisioned container kept its own.
    assert_eq!(skf.certificate(SM2_CONTAINER).der, skf.cert_der("sm2-sign"));
}

#[test]
fn renewal_for_the_same_key_replaces_only_when_asked() {
    let skf = SoftSkf::new();
    let key = generate(&skf, NewContainer::Generated);
    let public = skf.spki_pem(&key.public_key_der, "new");
    let first = skf.ca_issue_for_key(&public, "/CN=Qian Qi", 101);
    let renewed = skf.ca_issue_for_key(&public, "/CN=Qian Qi", 102);
    skf.library
        .import_certificate(&key.id, first.clone(), ImportMode::KeepExisting)
        .expect("first certificate");
    match skf
        .library
        .import_certificate(&key.id, renewed.clone(), ImportMode::KeepExisting)
    {
        Err(Error::CertificateSlotTaken {
            container,
            existing,
        }) => {
            assert_eq!(container, key.id);
            let existing = existing.expect("the present certificate, as listed");
            assert_eq!(existing.holder, "Qian Qi");
            assert_eq!(
                existing.serial_hex, "65",
                "serial 101, the one already there"
            );
        }
        other => panic!("expected CertificateSlotTaken, got {other:?}"),
    }
    assert_eq!(
        skf.certificate(key.id.container().as_str()).der,
        first,
        "kept"
    );
    let info = skf
        .library
        .import_certificate(&key.id, renewed.clone(), ImportMode::Replace)
        .expect("replace when asked");
    assert_eq!(info.serial_hex, "66");
    assert_eq!(skf.certificate(key.id.container().as_str()).der, renewed);
}

#[test]
fn import_needs_the_pin_verified() {
    let skf = SoftSkf::new();
    let key = generate(&skf, NewContainer::Generated);
    let public = skf.spki_pem(&key.public_key_der, "new");
    let cert = skf.ca_issue_for_key(&public, "/CN=Sun Ba", 5);
    skf.library.logout(&skf.app()).expect("logout");
    match skf
        .library
        .import_certificate(&key.id, cert, ImportMode::KeepExisting)
    {
        Err(Error::NotLoggedIn(app)) => assert_eq!(app, skf.app()),
        other => panic!("expected NotLoggedIn, got {other:?}"),
    }
    assert!(!skf
        .container_file(key.id.raw_container(), "sign.cert.der")
        .exists());
}
