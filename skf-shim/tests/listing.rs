//! Devices, applications and certificates as the shim lists them from the soft SKF library.

#[path = "support/soft_skf.rs"]
mod soft_skf;

use skf_shim::{CertificateId, KeyAlgorithm, KeyUsage, Library};
use soft_skf::{
    SoftSkf, APP, DEVICE, GBK_CONTAINER, MAX_RETRIES, RSA_CONTAINER, SM2_CONTAINER, SPARE_DEVICE,
};

#[test]
fn only_the_plugged_in_device_is_a_token() {
    let skf = SoftSkf::new();
    let tokens = skf.library.tokens().expect("tokens");
    assert_eq!(tokens.len(), 1, "{tokens:?}");
    let t = &tokens[0];
    assert_eq!(t.device_name, DEVICE);
    assert_eq!(t.label, "KeyPort SM2 Key");
    assert_eq!(t.serial, "KP-SKF-0001");
    assert_eq!(t.manufacturer, "KeyPort Soft SKF");
    assert_eq!(t.id, skf.token);
    assert!(t.id.as_str().starts_with("skf-"));
    assert!(skf.library.missing_functions().is_empty());
}

#[test]
fn the_application_reports_its_pin_state() {
    let skf = SoftSkf::new();
    let apps = skf.library.applications(&skf.token).expect("applications");
    assert_eq!(apps.len(), 1);
    assert_eq!(apps[0].id.name(), APP);
    assert_eq!(apps[0].pin.max_retries, MAX_RETRIES);
    assert_eq!(apps[0].pin.retries_left, MAX_RETRIES);
    assert!(!apps[0].pin.locked && !apps[0].pin.count_low);
}

#[test]
fn certificates_are_parsed_with_their_key_and_encryption_certificate() {
    let skf = SoftSkf::new();
    let certs = skf.library.certificates(None).expect("certificates");
    let names: Vec<Vec<u8>> = certs
        .iter()
        .map(|c| c.id.raw_container().to_vec())
        .collect();
    assert_eq!(
        names,
        vec![
            RSA_CONTAINER.as_bytes().to_vec(),
            SM2_CONTAINER.as_bytes().to_vec(),
            GBK_CONTAINER.to_vec(),
        ]
    );

    let sm2 = skf.certificate(SM2_CONTAINER);
    assert_eq!(sm2.key_algorithm, KeyAlgorithm::Sm2);
    assert_eq!(sm2.holder, "张三");
    assert!(sm2.subject.contains("CN=张三"), "{}", sm2.subject);
    assert!(sm2.issuer.contains("KeyPort SM2 Test CA"), "{}", sm2.issuer);
    assert_eq!(
        sm2.key_usage,
        vec![KeyUsage::DigitalSignature, KeyUsage::NonRepudiation]
    );
    assert_eq!(sm2.der, skf.cert_der("sm2-sign"));
    assert_eq!(
        sm2.encryption_certificate.as_deref(),
        Some(skf.cert_der("sm2-sign-enc").as_slice()),
        "the dual certificate is exported with bSignFlag = FALSE"
    );
    assert_eq!(sm2.id.application(), &skf.app());

    let rsa = skf.certificate(RSA_CONTAINER);
    assert_eq!(rsa.key_algorithm, KeyAlgorithm::Rsa { bits: 2048 });
    assert_eq!(rsa.encryption_certificate, None);

    // Ids are strings that parse back.
    let parsed: CertificateId = sm2.id.to_string().parse().expect("id parses");
    assert_eq!(parsed, sm2.id);
}

#[test]
fn a_library_without_skf_functions_is_refused() {
    // libc has none of the SKF functions.
    let err = Library::load(std::path::Path::new("libc.so.6")).expect_err("not an SKF library");
    assert!(
        matches!(err, skf_shim::Error::FunctionsMissing { ref missing, .. } if missing.contains(&"SKF_EnumDev")),
        "{err:?}"
    );
    let err = Library::load(std::path::Path::new("/nonexistent/libskf.so")).expect_err("no file");
    assert!(
        matches!(err, skf_shim::Error::LibraryLoad { .. }),
        "{err:?}"
    );
}

#[test]
fn a_plugged_in_spare_key_is_listed_with_its_own_id() {
    let skf = SoftSkf::new();
    skf.set_present(SPARE_DEVICE, true);
    let tokens = skf.library.tokens().expect("tokens");
    assert_eq!(tokens.len(), 2);
    let spare = tokens
        .iter()
        .find(|t| t.device_name == SPARE_DEVICE)
        .expect("spare listed");
    assert_ne!(spare.id, skf.token);
    let certs = skf
        .library
        .certificates(Some(&spare.id))
        .expect("certificates");
    assert_eq!(certs.len(), 1);
    assert_eq!(certs[0].holder, "李四");
}

#[test]
fn a_container_named_in_gbk_keeps_its_bytes_and_has_no_encryption_certificate() {
    let skf = SoftSkf::new();
    let cert = skf
        .library
        .certificates(Some(&skf.token))
        .expect("certificates")
        .into_iter()
        .find(|c| c.holder == "王五")
        .expect("the GBK-named container is listed");
    assert_eq!(cert.id.raw_container(), GBK_CONTAINER);
    assert!(
        cert.id.container().contains('\u{FFFD}'),
        "shown lossily, used exactly"
    );
    assert_eq!(
        cert.encryption_certificate, None,
        "a single-certificate container"
    );
    let parsed: CertificateId = cert.id.to_string().parse().expect("id parses");
    assert_eq!(parsed.raw_container(), GBK_CONTAINER);
}
