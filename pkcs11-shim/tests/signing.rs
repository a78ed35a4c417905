//! Signing against a real SoftHSM token; every signature is verified with the openssl CLI.

#[path = "support/rig.rs"]
mod rig;

use pkcs11_shim::{
    EcdsaEncoding, Error, HashAlg, LoginKind, SignAlgorithm, SignInput, SignRequest,
};
use rig::{openssl_verify, p1363_to_der_with_openssl, Rig, ScriptedPin};

fn request(
    rig: &Rig,
    label: &str,
    algorithm: SignAlgorithm,
    inputs: Vec<SignInput>,
) -> SignRequest {
    SignRequest {
        certificate: rig.certificate(label).id,
        algorithm,
        inputs,
        logout_after: false,
    }
}

fn hash_name(h: HashAlg) -> &'static str {
    match h {
        HashAlg::Sha256 => "sha256",
        HashAlg::Sha384 => "sha384",
        HashAlg::Sha512 => "sha512",
    }
}

/// Signs `msg` as Data and as a Digest, and checks both with openssl (and a tampered message
/// must fail, so the check is not vacuous).
fn sign_and_verify(rig: &Rig, label: &str, alg: SignAlgorithm) {
    let msg = format!("KeyPort test message for {label} with {}", alg.name()).into_bytes();
    let mut inputs = vec![SignInput::Data(msg.clone())];
    if let Some(h) = alg.hash() {
        inputs.push(SignInput::Digest(h.digest(&msg)));
    }
    let (pin, _) = ScriptedPin::right();
    let sigs = rig
        .module
        .sign(request(rig, label, alg, inputs.clone()), pin, None, None)
        .unwrap_or_else(|f| panic!("{label} {}: {f}", alg.name()));
    assert_eq!(sigs.len(), inputs.len());
    let pem = rig.cert_pem(label);
    for sig in sigs {
        let (mode, digest, der_sig) = match alg {
            SignAlgorithm::RsaPkcs1v15(h) => ("pkcs1", hash_name(h), sig.clone()),
            SignAlgorithm::RsaPss(h) => ("pss", hash_name(h), sig.clone()),
            SignAlgorithm::Ecdsa(h, EcdsaEncoding::Der) => ("ecdsa", hash_name(h), sig.clone()),
            SignAlgorithm::Ecdsa(h, EcdsaEncoding::P1363) => {
                ("ecdsa", hash_name(h), p1363_to_der_with_openssl(&sig))
            }
            SignAlgorithm::Ed25519 => ("ed25519", "", sig.clone()),
        };
        assert!(
            openssl_verify(&pem, mode, digest, &msg, &der_sig),
            "openssl rejects the {label} {} signature",
            alg.name()
        );
        assert!(
            !openssl_verify(&pem, mode, digest, b"another message", &der_sig),
            "openssl accepts a {label} signature over the wrong message"
        );
    }
}

#[test]
fn rsa_keys_sign_pkcs1_and_pss_with_every_hash() {
    let rig = Rig::new();
    for label in ["sign-rsa2048", "sign-rsa3072"] {
        for h in [HashAlg::Sha256, HashAlg::Sha384, HashAlg::Sha512] {
            sign_and_verify(&rig, label, SignAlgorithm::RsaPkcs1v15(h));
            sign_and_verify(&rig, label, SignAlgorithm::RsaPss(h));
        }
    }
}

#[test]
fn ec_keys_sign_ecdsa_in_der_and_p1363() {
    let rig = Rig::new();
    for (label, h) in [
        ("sign-p256", HashAlg::Sha256),
        ("sign-p384", HashAlg::Sha384),
        ("auth-p256", HashAlg::Sha256),
        ("sign-p384", HashAlg::Sha512),
    ] {
        sign_and_verify(&rig, label, SignAlgorithm::Ecdsa(h, EcdsaEncoding::Der));
        sign_and_verify(&rig, label, SignAlgorithm::Ecdsa(h, EcdsaEncoding::P1363));
    }
}

#[test]
fn ed25519_signs_messages_and_refuses_digests() {
    let rig = Rig::new();
    sign_and_verify(&rig, "sign-ed25519", SignAlgorithm::Ed25519);
    let (pin, asked) = ScriptedPin::right();
    let failure = rig
        .module
        .sign(
            request(
                &rig,
                "sign-ed25519",
                SignAlgorithm::Ed25519,
                vec![SignInput::Digest(vec![0; 32])],
            ),
            pin,
            None,
            None,
        )
        .expect_err("a digest cannot be signed with Ed25519");
    assert!(
        matches!(failure.error, Error::InvalidInput(_)),
        "{failure:?}"
    );
    assert!(
        asked.lock().expect("log").is_empty(),
        "no PIN asked for a bad request"
    );
}

/// SoftHSM signs CKM_ECDSA single-part only, and cryptoki 0.12 has no bare C_Sign after
/// C_SignInit + context login: the shim does the login dance, then reports the mechanism as
/// unsupported for an always-authenticate key, naming the token's single-part limit. The
/// refusal is remembered: the next request is refused before anyone is asked for a PIN.
#[test]
fn always_authenticate_ec_key_is_refused_naming_the_single_part_limit() {
    let rig = Rig::new();
    let cert = rig.certificate("sign-p256-always");
    let alg = SignAlgorithm::Ecdsa(HashAlg::Sha256, EcdsaEncoding::Der);
    for round in 0..2 {
        let (pin, asked) = ScriptedPin::right();
        let failure = rig
            .module
            .sign(
                SignRequest {
                    certificate: cert.id.clone(),
                    algorithm: alg,
                    inputs: vec![SignInput::Data(b"m".to_vec())],
                    logout_after: false,
                },
                pin,
                None,
                None,
            )
            .expect_err("single-part-only mechanism with an always-authenticate key");
        assert!(
            matches!(failure.error, Error::MechanismNotSupported { .. }),
            "{failure:?}"
        );
        let text = failure.error.to_string();
        assert!(
            text.contains("CKM_ECDSA in one part only") && text.contains("CKA_ALWAYS_AUTHENTICATE"),
            "{text}"
        );
        let kinds: Vec<LoginKind> = asked.lock().expect("log").iter().map(|a| a.kind).collect();
        let expected: &[LoginKind] = if round == 0 {
            &[LoginKind::User, LoginKind::ContextSpecific]
        } else {
            // Logged in (the key's flag is visible) and the refusal is known: no PIN asked.
            &[]
        };
        assert_eq!(kinds, expected, "round {round}");
    }
    // Once logged in, the key is visible and its flag is reported.
    assert!(rig.certificate("sign-p256-always").always_authenticate);
    assert!(rig.certificate("sign-rsa2048-always").always_authenticate);
    assert!(!rig.certificate("sign-p256").always_authenticate);
}

/// The always-authenticate RSA key signs messages through the combined hash-and-sign
/// mechanism in parts: every signature asks a context-specific PIN, and openssl verifies
/// them all. A pre-hashed digest needs single-part CKM_RSA_PKCS and is refused.
#[test]
fn always_authenticate_rsa_key_asks_the_pin_for_every_signature() {
    let rig = Rig::new();
    let label = "sign-rsa2048-always";
    let pem = rig.cert_pem(label);
    for (alg, mode, digest) in [
        (
            SignAlgorithm::RsaPkcs1v15(HashAlg::Sha256),
            "pkcs1",
            "sha256",
        ),
        (SignAlgorithm::RsaPss(HashAlg::Sha384), "pss", "sha384"),
    ] {
        let msgs = [b"first document".to_vec(), b"second document".to_vec()];
        let (pin, asked) = ScriptedPin::right();
        let sigs = rig
            .module
            .sign(
                request(
                    &rig,
                    label,
                    alg,
                    msgs.iter().cloned().map(SignInput::Data).collect(),
                ),
                pin,
                None,
                None,
            )
            .unwrap_or_else(|f| panic!("{}: {f}", alg.name()));
        let contexts = asked
            .lock()
            .expect("log")
            .iter()
            .filter(|a| a.kind == LoginKind::ContextSpecific)
            .count();
        assert_eq!(
            contexts,
            2,
            "one context login per signature ({})",
            alg.name()
        );
        for (msg, sig) in msgs.iter().zip(&sigs) {
            assert!(
                openssl_verify(&pem, mode, digest, msg, sig),
                "{}",
                alg.name()
            );
            assert!(!openssl_verify(&pem, mode, digest, b"other", sig));
        }
    }
    let (pin, _) = ScriptedPin::right();
    let failure = rig
        .module
        .sign(
            request(
                &rig,
                label,
                SignAlgorithm::RsaPkcs1v15(HashAlg::Sha256),
                vec![SignInput::Digest(HashAlg::Sha256.digest(b"m"))],
            ),
            pin,
            None,
            None,
        )
        .expect_err("a digest needs single-part CKM_RSA_PKCS");
    let text = failure.error.to_string();
    assert!(text.contains("CKM_RSA_PKCS in one part only"), "{text}");
}
