//! Enrolment against a real SoftHSM token: keys generated on the token (inspected with OpenSC's
//! pkcs11-tool), a signature by the new key before it has a certificate, a certificate issued
//! by the test CA with openssl over the token's public key, its import beside the key, and a
//! signature with it verified by openssl.
#![allow(clippy::unwrap_used)]

#[path = "support/rig.rs"]
mod rig;

use std::path::Path;
use std::process::Command;

use pkcs11_shim::{
    CertificateId, Credential, DeleteCertificateRequest, DeleteKeyRequest, EcdsaEncoding, Error,
    GenerateRequest, GeneratedKey, HashAlg, ImportMode, ImportRequest, KeySignRequest, KeySpec,
    SecretPin, SignAlgorithm, SignInput, SignRequest,
};
use rig::{openssl_verify, Rig, SOFTHSM, USER_PIN};

fn pin() -> Credential {
    Credential::Pin(SecretPin::from(USER_PIN.to_owned()))
}

fn generate(rig: &Rig, spec: KeySpec, label: &str, always: bool) -> GeneratedKey {
    rig.module
        .generate_key(
            GenerateRequest {
                token: rig.token.clone(),
                spec,
                label: label.to_owned(),
                always_authenticate: always,
                logout_after: true,
            },
            pin(),
        )
        .unwrap_or_else(|e| panic!("generate {}: {e}", spec.wire_name()))
}

/// pkcs11-tool's listing of one object class on the rig's token, logged in.
fn pkcs11_tool_list(rig: &Rig, kind: &str) -> String {
    let out = Command::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", rig.dir.path().join("softhsm2.conf"))
        .args(["--module", SOFTHSM, "--token-label", rig::TOKEN_LABEL])
        .args([
            "--login",
            "--pin",
            USER_PIN,
            "--list-objects",
            "--type",
            kind,
        ])
        .output()
        .expect("pkcs11-tool");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The block of a pkcs11-tool listing that names this label.
fn object_block<'a>(listing: &'a str, label: &str) -> &'a str {
    let start = listing
        .find(&format!("label:      {label}\n"))
        .unwrap_or_else(|| panic!("no object labelled {label} in\n{listing}"));
    let head = listing[..start].rfind("Object;").unwrap_or(0);
    let end = listing[start..]
        .find("Object;")
        .map_or(listing.len(), |e| start + e);
    &listing[head..end]
}

/// The test CA issues a certificate over the token's public key (openssl, not our code).
fn issue(rig: &Rig, key: &GeneratedKey, cn: &str, work: &Path) -> Vec<u8> {
    issue_serial(rig, key, cn, work, None)
}

/// [`issue`] with this serial number (else OpenSSL's random one).
fn issue_serial(
    rig: &Rig,
    key: &GeneratedKey,
    cn: &str,
    work: &Path,
    serial: Option<u32>,
) -> Vec<u8> {
    std::fs::write(work.join("pub.der"), &key.public_key_der).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(work)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "pkey", "-pubin", "-inform", "DER", "-in", "pub.der", "-out", "pub.pem",
    ]);
    std::fs::write(
        work.join("ext.cnf"),
        "[ext]\nkeyUsage=critical,digitalSignature,nonRepudiation\n",
    )
    .unwrap();
    let ca = rig.dir.path();
    let serial = serial.map(|s| s.to_string());
    let serial_args: Vec<&str> = match &serial {
        Some(s) => vec!["-set_serial", s],
        None => Vec::new(),
    };
    run(&[
        &["x509", "-new"][..],
        &serial_args,
        &[
            "-subj",
            &format!("/CN={cn}"),
            "-force_pubkey",
            "pub.pem",
            "-CA",
            ca.join("ca.pem").to_str().unwrap(),
            "-CAkey",
            ca.join("ca.key").to_str().unwrap(),
            "-days",
            "30",
            "-extfile",
            "ext.cnf",
            "-extensions",
            "ext",
            "-outform",
            "DER",
            "-out",
            "cert.der",
        ][..],
    ]
    .concat());
    run(&[
        "x509", "-inform", "DER", "-in", "cert.der", "-out", "cert.pem",
    ]);
    std::fs::read(work.join("cert.der")).unwrap()
}

fn sign_algorithm(spec: KeySpec) -> (SignAlgorithm, &'static str, &'static str) {
    match spec {
        KeySpec::EcP256 => (
            SignAlgorithm::Ecdsa(HashAlg::Sha256, EcdsaEncoding::Der),
            "ecdsa",
            "sha256",
        ),
        KeySpec::EcP384 => (
            SignAlgorithm::Ecdsa(HashAlg::Sha384, EcdsaEncoding::Der),
            "ecdsa",
            "sha384",
        ),
        KeySpec::Rsa { .. } => (
            SignAlgorithm::RsaPkcs1v15(HashAlg::Sha256),
            "pkcs1",
            "sha256",
        ),
        KeySpec::Ed25519 => (SignAlgorithm::Ed25519, "ed25519", ""),
    }
}

#[test]
fn every_key_type_is_generated_unextractable_then_certified_imported_and_signs() {
    let rig = Rig::new();
    let specs = [
        KeySpec::EcP256,
        KeySpec::EcP384,
        KeySpec::Rsa { bits: 2048 },
        KeySpec::Rsa { bits: 3072 },
        KeySpec::Ed25519,
    ];
    for spec in specs {
        let name = spec.wire_name();
        let label = format!("enrolled {name}");
        let key = generate(&rig, spec, &label, false);
        assert_eq!(key.id.token_id(), &rig.token);
        assert_eq!(key.id.cka_id().as_deref(), Some(key.cka_id.as_slice()));
        assert_eq!(key.cka_id.len(), 20, "SHA-1 of the public key");
        assert!(!key.always_authenticate);

        // OpenSC's view of the new private key: ours, not extractable, sensitive, signs.
        let privs = pkcs11_tool_list(&rig, "privkey");
        let block = object_block(&privs, &label);
        let id_line = format!("ID:         {}", hex::encode(&key.cka_id));
        assert!(block.contains(&id_line), "{name}: {block}");
        assert!(block.contains("sign"), "{name}: {block}");
        assert!(block.contains("never extractable"), "{name}: {block}");
        assert!(block.contains("sensitive"), "{name}: {block}");
        assert!(block.contains("local"), "{name}: {block}");
        let pubs = pkcs11_tool_list(&rig, "pubkey");
        assert!(object_block(&pubs, &label).contains(&id_line), "{name}");

        // The key signs before it has a certificate (the certificate request's signature);
        // openssl checks it against the public key the token gave.
        let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let message = format!("request info for {name}").into_bytes();
        let (alg, mode, digest) = sign_algorithm(spec);
        let sig = rig
            .module
            .sign_with_key(
                KeySignRequest {
                    key: key.id.clone(),
                    algorithm: alg,
                    input: SignInput::Data(message.clone()),
                    logout_after: true,
                },
                pin(),
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"));

        let der = issue(&rig, &key, &format!("Enrolled {name}"), work.path());
        let pem = work.path().join("cert.pem");
        assert!(
            openssl_verify(&pem, mode, digest, &message, &sig),
            "{name}: openssl rejects the new key's signature"
        );
        let imported = rig
            .module
            .import_certificate(
                ImportRequest {
                    token: rig.token.clone(),
                    der: der.clone(),
                    mode: ImportMode::KeepExisting,
                    logout_after: true,
                },
                pin(),
            )
            .unwrap_or_else(|e| panic!("import {name}: {e}"));
        assert!(imported.stored && !imported.replaced);
        assert_eq!(imported.certificate.id, key.id, "{name}");
        assert_eq!(imported.certificate.label, label);

        // Listed with its key, and it signs through the normal signing path.
        let listed = rig
            .module
            .certificates(Some(&rig.token))
            .unwrap()
            .into_iter()
            .find(|c| c.id == key.id)
            .unwrap_or_else(|| panic!("{name} not listed"));
        assert_eq!(listed.der, der);
        let doc = format!("a document signed by the enrolled {name} key").into_bytes();
        let sigs = rig
            .module
            .sign(
                SignRequest {
                    certificate: key.id.clone(),
                    algorithm: alg,
                    inputs: vec![SignInput::Data(doc.clone())],
                    logout_after: true,
                },
                pin(),
                None,
                None,
            )
            .unwrap_or_else(|f| panic!("{name}: {f}"));
        assert!(openssl_verify(&pem, mode, digest, &doc, &sigs[0]), "{name}");
        // The certificate object OpenSC sees carries the key's id and label.
        let certs = pkcs11_tool_list(&rig, "cert");
        assert!(object_block(&certs, &label).contains(&id_line), "{name}");
    }
}

#[test]
fn an_always_authenticate_key_asks_for_the_pin_per_signature() {
    let rig = Rig::new();
    let key = generate(&rig, KeySpec::EcP256, "always", true);
    assert!(key.always_authenticate);
    let privs = pkcs11_tool_list(&rig, "privkey");
    assert!(
        object_block(&privs, "always").contains("always authenticate"),
        "{privs}"
    );
    let req = |logout_after| KeySignRequest {
        key: key.id.clone(),
        algorithm: SignAlgorithm::Ecdsa(HashAlg::Sha256, EcdsaEncoding::Der),
        input: SignInput::Data(b"m".to_vec()),
        logout_after,
    };
    // Logged in but without a credential for the signature itself: the context login is asked.
    rig.module
        .generate_key(
            GenerateRequest {
                token: rig.token.clone(),
                spec: KeySpec::EcP256,
                label: "another".into(),
                always_authenticate: false,
                logout_after: false,
            },
            pin(),
        )
        .unwrap();
    assert!(matches!(
        rig.module.sign_with_key(req(true), Credential::None),
        Err(Error::LoginRequired {
            kind: pkcs11_shim::LoginKind::ContextSpecific,
            ..
        })
    ));
    let sig = rig.module.sign_with_key(req(true), pin()).unwrap();
    assert!(!sig.is_empty());

    // A generation whose request could not be made is undone in the same login; without a
    // login nothing is destroyed, and a key with a certificate never is.
    let undone = rig
        .module
        .generate_key(
            GenerateRequest {
                token: rig.token.clone(),
                spec: KeySpec::EcP256,
                label: "undone".into(),
                always_authenticate: true,
                logout_after: false,
            },
            pin(),
        )
        .unwrap();
    assert!(pkcs11_tool_list(&rig, "privkey").contains("undone"));
    rig.module
        .delete_new_key(DeleteKeyRequest {
            key: undone.id.clone(),
            logout_after: true,
        })
        .unwrap();
    assert!(!pkcs11_tool_list(&rig, "privkey").contains("undone"));
    assert!(!pkcs11_tool_list(&rig, "pubkey").contains("undone"));
    assert!(matches!(
        rig.module.delete_new_key(DeleteKeyRequest {
            key: key.id.clone(),
            logout_after: true,
        }),
        Err(Error::LoginRequired { .. })
    ));
    assert!(pkcs11_tool_list(&rig, "privkey").contains("label:      always"));
    let certified = rig.certificate("sign-p256");
    rig.module
        .generate_key(
            GenerateRequest {
                token: rig.token.clone(),
                spec: KeySpec::EcP256,
                label: "login only".into(),
                always_authenticate: false,
                logout_after: false,
            },
            pin(),
        )
        .unwrap();
    assert!(matches!(
        rig.module.delete_new_key(DeleteKeyRequest {
            key: certified.id.clone(),
            logout_after: true,
        }),
        Err(Error::CertificateExists { .. })
    ));
    assert!(pkcs11_tool_list(&rig, "privkey").contains("sign-p256"));
}

#[test]
fn wrong_pins_strangers_renewals_and_garbage_are_typed_errors() {
    let rig = Rig::new();
    // A wrong PIN creates nothing.
    let before = pkcs11_tool_list(&rig, "privkey");
    let wrong = rig.module.generate_key(
        GenerateRequest {
            token: rig.token.clone(),
            spec: KeySpec::EcP256,
            label: "never".into(),
            always_authenticate: false,
            logout_after: true,
        },
        Credential::Pin(SecretPin::from("000000".to_owned())),
    );
    assert!(
        matches!(wrong, Err(Error::PinIncorrect { .. })),
        "{wrong:?}"
    );
    assert!(matches!(
        rig.module.generate_key(
            GenerateRequest {
                token: rig.token.clone(),
                spec: KeySpec::EcP256,
                label: "never".into(),
                always_authenticate: false,
                logout_after: true,
            },
            Credential::None,
        ),
        Err(Error::LoginRequired { .. })
    ));
    assert_eq!(pkcs11_tool_list(&rig, "privkey"), before);

    let import = |der: Vec<u8>, mode| {
        rig.module.import_certificate(
            ImportRequest {
                token: rig.token.clone(),
                der,
                mode,
                logout_after: true,
            },
            pin(),
        )
    };
    // Not a certificate.
    assert!(matches!(
        import(b"not a certificate".to_vec(), ImportMode::KeepExisting),
        Err(Error::Certificate(_))
    ));
    // A stranger's certificate: the CA's own, whose key is not on the token.
    let ca_pem = std::fs::read_to_string(rig.dir.path().join("ca.pem")).unwrap();
    let out = Command::new("openssl")
        .args(["x509", "-outform", "DER"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write as _;
            c.stdin.take().unwrap().write_all(ca_pem.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(matches!(
        import(out.stdout, ImportMode::KeepExisting),
        Err(Error::NoMatchingKey)
    ));

    // A renewal for a key with a certificate: stored beside it, both listed, the first under
    // the key's id and the new one under its exact id; removed by the user, the old one goes
    // and the key's last certificate stays; `Replace` deletes the others once it is stored.
    let key = generate(&rig, KeySpec::EcP256, "renewed", false);
    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    // Issued in the same second: the serial number orders them.
    let first = issue_serial(&rig, &key, "First", work.path(), Some(0x100));
    assert!(
        import(first.clone(), ImportMode::KeepExisting)
            .unwrap()
            .stored
    );
    // The same certificate again changes nothing.
    let again = import(first.clone(), ImportMode::KeepExisting).unwrap();
    assert!(!again.stored && !again.replaced);
    let second = issue_serial(&rig, &key, "Second", work.path(), Some(0x2000));
    let renewal = import(second.clone(), ImportMode::KeepExisting).unwrap();
    assert!(renewal.stored && !renewal.replaced);
    let exact = CertificateId::exact(&rig.token, &key.cka_id, &second);
    assert_eq!(renewal.certificate.id, exact);
    let listed = |rig: &Rig| {
        let mut v: Vec<(CertificateId, Vec<u8>)> = rig
            .module
            .certificates(Some(&rig.token))
            .unwrap()
            .into_iter()
            .filter(|c| c.id.key() == key.id)
            .map(|c| (c.id, c.der))
            .collect();
        v.sort();
        v
    };
    let mut both = vec![
        (key.id.clone(), first.clone()),
        (exact.clone(), second.clone()),
    ];
    both.sort();
    assert_eq!(listed(&rig), both);
    // Each id signs with the key, and names its own certificate.
    for id in [&key.id, &exact] {
        rig.module
            .sign(
                SignRequest {
                    certificate: id.clone(),
                    algorithm: SignAlgorithm::Ecdsa(HashAlg::Sha256, EcdsaEncoding::Der),
                    inputs: vec![SignInput::Data(b"renewal".to_vec())],
                    logout_after: true,
                },
                pin(),
                None,
                None,
            )
            .unwrap_or_else(|f| panic!("{id}: {f}"));
    }
    let remove = |id: &CertificateId| {
        rig.module.delete_certificate(
            DeleteCertificateRequest {
                certificate: id.clone(),
                logout_after: true,
            },
            pin(),
        )
    };
    let removed = remove(&key.id).unwrap();
    assert_eq!(removed.certificate, key.id);
    // The renewal is listed under the key's id now; its exact id still names it.
    assert_eq!(removed.kept, key.id);
    assert_eq!(listed(&rig), vec![(key.id.clone(), second.clone())]);
    assert!(matches!(remove(&exact), Err(Error::OnlyCertificate(_))));
    assert!(matches!(remove(&key.id), Err(Error::OnlyCertificate(_))));
    assert_eq!(listed(&rig), vec![(key.id.clone(), second.clone())]);

    let third = issue_serial(&rig, &key, "Third", work.path(), Some(0x30000));
    import(first.clone(), ImportMode::KeepExisting).unwrap();
    assert_eq!(listed(&rig).len(), 2);
    let replaced = import(third.clone(), ImportMode::Replace).unwrap();
    assert!(replaced.stored && replaced.replaced);
    assert_eq!(listed(&rig), vec![(key.id.clone(), third)]);
}
