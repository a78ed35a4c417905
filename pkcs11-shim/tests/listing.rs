//! Module, token and certificate listing against a real SoftHSM token.

#[path = "support/rig.rs"]
mod rig;

use pkcs11_shim::{CertificateId, KeyAlgorithm, KeyUsage, TokenId};
use rig::{Rig, TOKEN_LABEL};

/// The RFC 2253/4514 form of a certificate name, as openssl prints it.
fn openssl_name(pem: &std::path::Path, which: &str) -> String {
    let out = std::process::Command::new("openssl")
        .args(["x509", "-noout", which, "-nameopt", "RFC2253", "-in"])
        .arg(pem)
        .output()
        .expect("openssl");
    let text = String::from_utf8(out.stdout).expect("utf8");
    let (_, name) = text.trim().split_once('=').expect("name=...");
    name.to_owned()
}

#[test]
fn module_and_token_are_described() {
    let rig = Rig::new();
    let info = rig.module.info().expect("info");
    assert_eq!(info.manufacturer, "SoftHSM", "{info:?}");
    assert!(!info.library_version.is_empty());
    let tokens = rig.module.tokens().expect("tokens");
    let t = tokens.iter().find(|t| t.id == rig.token).expect("token");
    assert_eq!(t.label, TOKEN_LABEL);
    assert!(!t.serial.is_empty());
    assert!(t.pin.initialized && !t.pin.locked && !t.pin_pad && !t.logged_in);
    assert_eq!(t.id.to_string().parse::<TokenId>().expect("parse"), t.id);
}

#[test]
fn certificates_are_paired_parsed_and_stable() {
    let rig = Rig::new();
    let certs = rig
        .module
        .certificates(Some(&rig.token))
        .expect("certificates");
    let mut labels: Vec<&str> = certs.iter().map(|c| c.label.as_str()).collect();
    labels.sort_unstable();
    assert_eq!(
        labels,
        [
            "auth-p256",
            "sign-ed25519",
            "sign-ed25519-always",
            "sign-p256",
            "sign-p256-always",
            "sign-p384",
            "sign-p384-always",
            "sign-rsa2048",
            "sign-rsa2048-always",
            "sign-rsa3072"
        ]
    );
    let expected = [
        ("sign-rsa2048", KeyAlgorithm::Rsa { bits: 2048 }, "01"),
        ("sign-rsa3072", KeyAlgorithm::Rsa { bits: 3072 }, "02"),
        ("sign-p256", KeyAlgorithm::EcP256, "03"),
        ("sign-p384", KeyAlgorithm::EcP384, "04"),
        ("sign-ed25519", KeyAlgorithm::Ed25519, "05"),
        ("auth-p256", KeyAlgorithm::EcP256, "06"),
        ("sign-p256-always", KeyAlgorithm::EcP256, "07"),
        (
            "sign-rsa2048-always",
            KeyAlgorithm::Rsa { bits: 2048 },
            "08",
        ),
        ("sign-ed25519-always", KeyAlgorithm::Ed25519, "09"),
        ("sign-p384-always", KeyAlgorithm::EcP384, "0a"),
    ];
    for (label, alg, id_hex) in expected {
        let c = certs.iter().find(|c| c.label == label).expect(label);
        assert_eq!(c.key_algorithm, alg, "{label}");
        assert_eq!(c.der, rig.cert_der(label), "{label}");
        assert_eq!(c.token_id, rig.token);
        assert_eq!(c.id.cka_id(), Some(hex::decode(id_hex).expect("hex")));
        assert!(c.id.to_string().ends_with(&format!("/{id_hex}")));
        assert_eq!(
            c.id.to_string().parse::<CertificateId>().expect("parse"),
            c.id
        );
        assert!(c.issuer.contains("CN=KeyPort Test CA"), "{}", c.issuer);
        assert_eq!(
            c.subject,
            openssl_name(&rig.cert_pem(label), "-subject"),
            "{label}"
        );
        assert_eq!(
            c.issuer,
            openssl_name(&rig.cert_pem(label), "-issuer"),
            "{label}"
        );
        assert!(c.not_before < c.not_after);
        assert!(!c.serial_hex.is_empty());
    }
    let rsa = certs
        .iter()
        .find(|c| c.label == "sign-rsa2048")
        .expect("rsa");
    assert_eq!(rsa.holder, "Test Signer RSA-2048");
    assert_eq!(
        rsa.key_usage,
        [KeyUsage::DigitalSignature, KeyUsage::NonRepudiation]
    );
    assert!(rsa.extended_key_usage.is_empty());
    let auth = certs.iter().find(|c| c.label == "auth-p256").expect("auth");
    assert_eq!(auth.key_usage, [KeyUsage::DigitalSignature]);
    assert_eq!(auth.extended_key_usage, ["clientAuth"]);

    // Stable ids: the same token store through a second, independent module instance at a
    // different path gets a different token id (the module path is part of it), and the same
    // module path reloaded after C_Finalize gets the same ids.
    let path = rig.module.path().to_path_buf();
    let other = rig.reload("second-copy.so");
    let other_tokens = other.tokens().expect("tokens");
    assert!(other_tokens.iter().all(|t| t.id != rig.token));
    drop(other);
    let Rig {
        dir, module, token, ..
    } = rig;
    drop(module);
    let again = rig::Rig::reload_path(dir.path(), &path);
    let certs_again = again
        .certificates(Some(&token))
        .expect("same token id after reload");
    let mut ids: Vec<_> = certs.iter().map(|c| c.id.clone()).collect();
    let mut ids_again: Vec<_> = certs_again.iter().map(|c| c.id.clone()).collect();
    ids.sort();
    ids_again.sort();
    assert_eq!(ids, ids_again);
}

/// `pkcs11-tool` (another process) on the rig's token.
fn pkcs11_tool(rig: &Rig, args: &[&str]) {
    let out = std::process::Command::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", rig.dir.path().join("softhsm2.conf"))
        .args(["--module", rig::SOFTHSM, "--login", "--pin", rig::USER_PIN])
        .args(args)
        .output()
        .expect("pkcs11-tool");
    assert!(
        out.status.success(),
        "pkcs11-tool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_certificate_another_process_removes_or_stores_shows_in_the_next_listing() {
    let rig = Rig::new();
    let labels = |rig: &Rig| -> Vec<String> {
        let certs = rig
            .module
            .certificates(Some(&rig.token))
            .expect("certificates");
        certs.into_iter().map(|c| c.label).collect()
    };
    // Twice: the second listing is the worker's cached scan.
    assert_eq!(labels(&rig), labels(&rig));
    let before = labels(&rig);
    assert!(before.contains(&"sign-p256".to_owned()));

    pkcs11_tool(&rig, &["--delete-object", "--type", "cert", "--id", "03"]);
    let after = labels(&rig);
    assert!(!after.contains(&"sign-p256".to_owned()), "{after:?}");
    assert_eq!(after.len(), before.len() - 1);

    let der = rig.dir.path().join("certs").join("sign-p256.der");
    pkcs11_tool(
        &rig,
        &[
            "--write-object",
            der.to_str().expect("utf-8"),
            "--type",
            "cert",
            "--id",
            "03",
            "--label",
            "sign-p256",
        ],
    );
    let back = rig.certificate("sign-p256");
    assert_eq!(back.der, rig.cert_der("sign-p256"));
    assert_eq!(back.id, CertificateId::new(&rig.token, &[3], &back.der));
    assert_eq!(labels(&rig).len(), before.len());
}
