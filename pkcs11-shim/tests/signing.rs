//! Signing against a real SoftHSM token; every signature is verified with the openssl CLI.

#[path = "support/rig.rs"]
mod rig;

use pkcs11_shim::{
    EcdsaEncoding, Error, HashAlg, LoginKind, SignAlgorithm, SignInput, SignRequest,
};
use rig::{openssl_verify, p1363_to_der_with_openssl, Rig, ScriptedPin, SignWith};

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
        .sign_with(request(rig, label, alg, inputs.clone()), pin, None, None)
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
        .sign_with(
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

/// Every always-authenticate key signs by the specification, for every mechanism the shim
/// offers, raw over a digest and over a message: C_SignInit, C_Login(CKU_CONTEXT_SPECIFIC), one
/// single-part C_Sign. Each signature asks once; the PIN of the first also serves the user
/// login. openssl verifies each signature.
#[test]
fn always_authenticate_keys_sign_every_mechanism_one_pin_per_signature() {
    let rig = Rig::new();
    let ecdsa = |h| SignAlgorithm::Ecdsa(h, EcdsaEncoding::Der);
    let cases: Vec<(&str, SignAlgorithm, &str, &str)> = vec![
        (
            "sign-p256-always",
            ecdsa(HashAlg::Sha256),
            "ecdsa",
            "sha256",
        ),
        (
            "sign-p384-always",
            ecdsa(HashAlg::Sha384),
            "ecdsa",
            "sha384",
        ),
        (
            "sign-rsa2048-always",
            SignAlgorithm::RsaPkcs1v15(HashAlg::Sha256),
            "pkcs1",
            "sha256",
        ),
        (
            "sign-rsa2048-always",
            SignAlgorithm::RsaPss(HashAlg::Sha256),
            "pss",
            "sha256",
        ),
        ("sign-ed25519-always", SignAlgorithm::Ed25519, "ed25519", ""),
    ];
    for (label, alg, mode, digest) in cases {
        let pem = rig.cert_pem(label);
        let msgs = [b"first document".to_vec(), b"second document".to_vec()];
        let mut inputs: Vec<SignInput> = msgs.iter().cloned().map(SignInput::Data).collect();
        if let Some(h) = alg.hash() {
            // A digest as a portal sends it: the raw mechanism, single-part only.
            inputs[1] = SignInput::Digest(h.digest(&msgs[1]));
        }
        let (pin, asked) = ScriptedPin::right();
        let sigs = rig
            .module
            .sign_with(request(&rig, label, alg, inputs), pin, None, None)
            .unwrap_or_else(|f| panic!("{label} {}: {f}", alg.name()));
        let kinds: Vec<LoginKind> = asked.lock().expect("log").iter().map(|a| a.kind).collect();
        // Two signatures, two questions: the first serves the user login and the first
        // context login; the second is the second signature's own.
        assert_eq!(
            kinds.len(),
            2,
            "one question per signature ({label} {})",
            alg.name()
        );
        for (msg, sig) in msgs.iter().zip(&sigs) {
            assert!(
                openssl_verify(&pem, mode, digest, msg, sig),
                "{label} {}",
                alg.name()
            );
            assert!(!openssl_verify(&pem, mode, digest, b"other", sig));
        }
    }
    // Once logged in, the keys are visible and their flag is reported.
    assert!(rig.certificate("sign-p256-always").always_authenticate);
    assert!(rig.certificate("sign-rsa2048-always").always_authenticate);
    assert!(rig.certificate("sign-ed25519-always").always_authenticate);
    assert!(rig.certificate("sign-p384-always").always_authenticate);
    assert!(!rig.certificate("sign-p256").always_authenticate);
}

/// Without a credential, a job on an always-authenticate key signs nothing and says which
/// login it needs; a job that brings one signs exactly one input, then asks for the next.
#[test]
fn always_authenticate_jobs_stop_where_their_credential_ends() {
    use pkcs11_shim::Credential;
    let rig = Rig::new();
    let alg = SignAlgorithm::Ecdsa(HashAlg::Sha256, EcdsaEncoding::Der);
    let inputs = vec![
        SignInput::Data(b"a".to_vec()),
        SignInput::Data(b"b".to_vec()),
        SignInput::Data(b"c".to_vec()),
    ];
    let req = request(&rig, "sign-p256-always", alg, inputs);
    let f = rig
        .module
        .sign(req.clone(), Credential::None, None, None)
        .expect_err("no credential");
    assert!(
        matches!(
            f.error,
            Error::LoginRequired {
                kind: LoginKind::User,
                ..
            }
        ),
        "{f:?}"
    );
    assert!(f.completed.is_empty());
    let pin = || Credential::Pin(pkcs11_shim::SecretPin::from(rig::USER_PIN.to_owned()));
    let f = rig
        .module
        .sign(req, pin(), None, None)
        .expect_err("one signature per credential");
    assert!(
        matches!(
            f.error,
            Error::LoginRequired {
                kind: LoginKind::ContextSpecific,
                ..
            }
        ),
        "{f:?}"
    );
    assert_eq!(f.completed.len(), 1);
    assert!(openssl_verify(
        &rig.cert_pem("sign-p256-always"),
        "ecdsa",
        "sha256",
        b"a",
        &f.completed[0]
    ));
}
