//! `keyport sign` with every key of the test token and every option, each signature verified
//! by OpenSSL (and a tampered document must fail, so the check is not vacuous).

mod cli_common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use cli_common::{
    one_line_failure, openssl, p1363_to_der, stderr, verify_cms, verify_raw, Cli, Options, Scheme,
};
use keyport_e2e::pinentry::{Command as Dialog, Step};

/// What one `keyport sign` run is expected to produce.
#[derive(Clone, Copy, Debug)]
enum Check {
    /// A raw signature: scheme, hash, and for P1363 the size of one ECDSA half.
    Raw(Scheme, &'static str),
    P1363(&'static str, usize),
    Cms,
    /// A CMS SignedData with an Ed25519 signer.
    Ed25519Cms,
}

/// Signs a fresh document with `label` and `args`, answering one PIN dialog, and verifies.
fn sign_and_verify(cli: &Cli, label: &str, id: &str, args: &[&str], check: Check) {
    let tag = format!("{label}{}", args.join("")).replace(['-', ' '], "_");
    let doc = cli.file(
        &format!("{tag}.txt"),
        format!("Contract for {label} signed with {args:?}\n").as_bytes(),
    );
    let sig = cli.dir().join(format!("{tag}.sig"));
    let before = cli.dialogs().len();
    cli.answer(&[Step::pin("123456").expect(Dialog::GetPin)]);
    let out = cli.sign(id, &doc, &sig, args);
    assert!(out.status.success(), "{label} {args:?}: {}", stderr(&out));
    assert_eq!(stderr(&out), "", "{label} {args:?}: nothing on stderr");
    assert_eq!(
        cli.dialogs().len(),
        before + 1,
        "{label} {args:?}: one dialog"
    );
    let tampered = cli.file(&format!("{tag}.tampered"), b"Contract for somebody else\n");
    let pem = cli.cert_pem(label);
    match check {
        Check::Raw(scheme, hash) => {
            assert!(
                verify_raw(&pem, scheme, hash, &doc, &sig),
                "openssl rejects {label} {args:?}"
            );
            assert!(
                !verify_raw(&pem, scheme, hash, &tampered, &sig),
                "openssl accepts {label} {args:?} over another document"
            );
        }
        Check::P1363(hash, half) => {
            let len = std::fs::metadata(&sig).expect("signature").len();
            assert_eq!(len, 2 * half as u64, "{label} {args:?}: r‖s length");
            let der = p1363_to_der(&sig);
            assert!(
                verify_raw(&pem, Scheme::Ecdsa, hash, &doc, &der),
                "openssl rejects {label} {args:?}"
            );
            assert!(!verify_raw(&pem, Scheme::Ecdsa, hash, &tampered, &der));
        }
        Check::Cms => {
            let (ok, text) = verify_cms(&cli.ca_pem(), &doc, &sig);
            assert!(ok, "openssl cms rejects {label} {args:?}: {text}");
            let (ok, _) = verify_cms(&cli.ca_pem(), &tampered, &sig);
            assert!(
                !ok,
                "openssl cms accepts {label} {args:?} over another document"
            );
        }
        Check::Ed25519Cms => {
            // OpenSSL 3.0 cannot verify (or make) Ed25519 SignedData: its EdDSA refuses the
            // SHA-512 digest CMS hands it ("eddsa_digest_signverify_init: invalid digest").
            // Python's `cryptography` checks the structure and the signature (RFC 8419), and
            // OpenSSL the certificate's chain to the test CA.
            let (ok, text) = verify_py_cms(&sig, &doc, &pem);
            assert!(ok, "{label} {args:?}: {text}");
            let (ok, _) = verify_py_cms(&sig, &tampered, &pem);
            assert!(!ok, "{label} {args:?} verifies over another document");
            let (ok, text) = openssl(&[
                OsStr::new("verify"),
                OsStr::new("-CAfile"),
                cli.ca_pem().as_os_str(),
                pem.as_os_str(),
            ]);
            assert!(ok, "{text}");
        }
    }
}

/// tests/verify/verify.py cms SIG DOC CERT.
fn verify_py_cms(sig: &Path, doc: &Path, cert: &Path) -> (bool, String) {
    match keyport_e2e::harness::python_verify_cms(sig, doc, cert) {
        Ok(()) => (true, String::new()),
        Err(e) => (false, format!("{e:#}")),
    }
}

fn rsa_cases() -> Vec<(Vec<&'static str>, Check)> {
    vec![
        (vec![], Check::Raw(Scheme::Pkcs1, "sha256")),
        (vec!["--format", "raw"], Check::Raw(Scheme::Pkcs1, "sha256")),
        (
            vec!["--hash", "sha384"],
            Check::Raw(Scheme::Pkcs1, "sha384"),
        ),
        (
            vec!["--hash", "sha512"],
            Check::Raw(Scheme::Pkcs1, "sha512"),
        ),
        (vec!["--pss"], Check::Raw(Scheme::Pss, "sha256")),
        (
            vec!["--pss", "--hash", "sha384"],
            Check::Raw(Scheme::Pss, "sha384"),
        ),
        (
            vec!["--pss", "--hash", "sha512"],
            Check::Raw(Scheme::Pss, "sha512"),
        ),
        (vec!["--format", "cms"], Check::Cms),
        (vec!["--format", "cms", "--hash", "sha512"], Check::Cms),
        (vec!["--format", "cms", "--pss"], Check::Cms),
    ]
}

fn ec_cases(half: usize) -> Vec<(Vec<&'static str>, Check)> {
    vec![
        (vec![], Check::Raw(Scheme::Ecdsa, "sha256")),
        (
            vec!["--ecdsa-encoding", "der"],
            Check::Raw(Scheme::Ecdsa, "sha256"),
        ),
        (
            vec!["--hash", "sha384"],
            Check::Raw(Scheme::Ecdsa, "sha384"),
        ),
        (
            vec!["--hash", "sha512"],
            Check::Raw(Scheme::Ecdsa, "sha512"),
        ),
        (
            vec!["--ecdsa-encoding", "p1363"],
            Check::P1363("sha256", half),
        ),
        (
            vec!["--ecdsa-encoding", "p1363", "--hash", "sha384"],
            Check::P1363("sha384", half),
        ),
        (
            vec!["--ecdsa-encoding", "p1363", "--hash", "sha512"],
            Check::P1363("sha512", half),
        ),
        (vec!["--format", "cms"], Check::Cms),
        (vec!["--format", "cms", "--hash", "sha384"], Check::Cms),
    ]
}

fn run_cases(cli: &Cli, label: &str, cases: &[(Vec<&'static str>, Check)]) {
    let id = cli.cert_id(label);
    for (args, check) in cases {
        sign_and_verify(cli, label, &id, args, *check);
    }
}

#[test]
fn rsa2048_every_option() {
    let cli = Cli::new();
    run_cases(&cli, "sign-rsa2048", &rsa_cases());
}

#[test]
fn rsa3072_every_option() {
    let cli = Cli::new();
    run_cases(&cli, "sign-rsa3072", &rsa_cases());
}

#[test]
fn p256_every_option() {
    let cli = Cli::new();
    run_cases(&cli, "sign-p256", &ec_cases(32));
}

#[test]
fn p384_every_option() {
    let cli = Cli::new();
    run_cases(&cli, "sign-p384", &ec_cases(48));
}

#[test]
fn ed25519_raw_and_cms() {
    let cli = Cli::new();
    run_cases(
        &cli,
        "sign-ed25519",
        &[
            (vec![], Check::Raw(Scheme::Ed25519, "")),
            (vec!["--format", "raw"], Check::Raw(Scheme::Ed25519, "")),
            (vec!["--format", "cms"], Check::Ed25519Cms),
        ],
    );
}

/// auth-p256 has no nonRepudiation: refused by the default policy (no dialog, one line),
/// signed with every option under `signing_key_usage = "any"`.
#[test]
fn auth_key_needs_the_any_policy_then_signs_every_option() {
    let strict = Cli::new();
    let doc = strict.file("doc.txt", b"document");
    let sig = strict.dir().join("doc.sig");
    let out = strict.sign(&strict.cert_id("auth-p256"), &doc, &sig, &[]);
    let line = one_line_failure(&out);
    assert!(line.contains("nonRepudiation"), "{line}");
    assert!(!sig.exists());
    assert!(strict.dialogs().is_empty(), "refused before any dialog");

    let any = Cli::with(Options {
        signing_key_usage: "any",
        ..Options::default()
    });
    run_cases(&any, "auth-p256", &ec_cases(32));
}

/// The always-authenticate RSA key: every `keyport sign` asks one PIN (the user login's PIN
/// also answers the context-specific login of that one signature), and the token gets a
/// context-specific login each time (proved by the fault module's call log).
#[test]
fn always_authenticate_rsa_asks_one_pin_per_run() {
    let cli = Cli::with(Options {
        fault: true,
        ..Options::default()
    });
    let label = "sign-rsa2048-always";
    let id = cli.cert_id(label);
    let mut runs = 0;
    for (args, check) in [
        (vec![], Check::Raw(Scheme::Pkcs1, "sha256")),
        (vec![], Check::Raw(Scheme::Pkcs1, "sha256")),
        (
            vec!["--pss", "--hash", "sha384"],
            Check::Raw(Scheme::Pss, "sha384"),
        ),
        (vec!["--format", "cms"], Check::Cms),
    ] {
        let tag = format!("run{runs}");
        let doc = cli.file(&format!("{tag}.txt"), format!("{tag} {args:?}").as_bytes());
        let sig = cli.dir().join(format!("{tag}.sig"));
        let logins_before = cli.fault_calls("C_Login");
        cli.answer(&[Step::pin("123456").expect(Dialog::GetPin)]);
        let out = cli.sign(&id, &doc, &sig, &args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        runs += 1;
        let dialogs = cli.dialogs();
        assert_eq!(dialogs.len(), runs, "one dialog per run: {dialogs:#?}");
        let last = dialogs.last().expect("dialog");
        assert_eq!(last.command.as_deref(), Some("GETPIN"));
        let desc = last.description.as_deref().unwrap_or_default();
        assert!(
            desc.contains("Test Signer RSA-2048 Always-Auth") && desc.contains("KeyPort Test"),
            "{desc}"
        );
        // A user login and a context-specific login: two C_Login for one typed PIN.
        assert_eq!(cli.fault_calls("C_Login") - logins_before, 2, "{args:?}");
        match check {
            Check::Raw(scheme, hash) => {
                assert!(verify_raw(&cli.cert_pem(label), scheme, hash, &doc, &sig))
            }
            Check::Cms => {
                let (ok, text) = verify_cms(&cli.ca_pem(), &doc, &sig);
                assert!(ok, "{text}");
            }
            other => unreachable!("{other:?}"),
        }
    }
    let log = std::fs::read_to_string(cli.fault_log()).expect("fault log");
    assert_eq!(
        log.lines()
            .filter(|l| l.starts_with("C_Login CKU_CONTEXT_SPECIFIC pin rv=0x00000000"))
            .count(),
        runs,
        "one context-specific login per signature: {log}"
    );
    assert!(
        !log.lines()
            .any(|l| l.starts_with("C_SignUpdate") || l.starts_with("C_SignFinal")),
        "always-authenticate signatures are single-part: {log}"
    );
}

/// The always-authenticate P-256 key signs a file with one dialog (CKM_ECDSA over the digest,
/// single-part, after the context login); openssl verifies it.
#[test]
fn always_authenticate_p256_signs_with_one_dialog() {
    let cli = Cli::new();
    let doc = cli.file("doc.txt", b"document");
    let sig = cli.dir().join("doc.sig");
    cli.answer(&[Step::pin("123456")]);
    let out = cli.sign(&cli.cert_id("sign-p256-always"), &doc, &sig, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(verify_raw(
        &cli.cert_pem("sign-p256-always"),
        Scheme::Ecdsa,
        "sha256",
        &doc,
        &sig
    ));
    assert_eq!(cli.dialogs().len(), 1);
    assert_no_temp_left(cli.dir());
}

fn assert_no_temp_left(dir: &Path) {
    let leftovers: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".keyport-tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
