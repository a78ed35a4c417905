//! The PIN dialog of `keyport sign`: what it shows, wrong PINs, a locked token, a cancel.
//! C_Login calls are counted in the fault module's call log (tests/fault-pkcs11).

mod cli_common;

use cli_common::{one_line_failure, stderr, verify_raw, Cli, Options, Scheme};
use keyport_e2e::pinentry::{Command as Dialog, Step};

fn with_fault() -> Cli {
    Cli::with(Options {
        fault: true,
        ..Options::default()
    })
}

#[test]
fn the_pin_dialog_names_the_token_and_the_certificate_holder() {
    let cli = Cli::new();
    let doc = cli.file("loan-contract.txt", b"Loan contract 2026-114\n");
    let sig = cli.dir().join("loan-contract.sig");
    cli.answer(&[Step::pin("123456").expect(Dialog::GetPin)]);
    let out = cli.sign(&cli.cert_id("sign-p384"), &doc, &sig, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let dialogs = cli.dialogs();
    assert_eq!(dialogs.len(), 1, "{dialogs:#?}");
    let d = &dialogs[0];
    assert_eq!(d.command.as_deref(), Some("GETPIN"));
    assert_eq!(d.answered.as_deref(), Some("pin"));
    assert!(d.script_errors.is_empty(), "{:?}", d.script_errors);
    let desc = d.description.as_deref().expect("SETDESC");
    for shown in [
        "«KeyPort Test»",      // the token label
        "«Test Signer P-384»", // the certificate holder
        "«KeyPort Test CA»",   // the issuer
        "loan-contract.txt",   // the document
    ] {
        assert!(desc.contains(shown), "{shown:?} not in {desc:?}");
    }
    assert!(!desc.contains("123456"));
    assert!(
        d.prompt.as_deref().is_some_and(|p| p.contains("PIN")),
        "{d:?}"
    );
    assert!(d.error.is_none(), "no error text on a first try");
    assert!(verify_raw(
        &cli.cert_pem("sign-p384"),
        Scheme::Ecdsa,
        "sha256",
        &doc,
        &sig
    ));
}

/// Wrong PIN, then the right one: exactly two dialogs (the second says the PIN was wrong)
/// and exactly two C_Login.
#[test]
fn wrong_then_right_pin_is_two_dialogs_and_two_logins() {
    let cli = with_fault();
    let id = cli.cert_id("sign-rsa2048");
    let doc = cli.file("doc.txt", b"document");
    let sig = cli.dir().join("doc.sig");
    cli.answer(&[
        Step::pin("000000").expect(Dialog::GetPin),
        Step::pin("123456").expect(Dialog::GetPin),
    ]);
    let out = cli.sign(&id, &doc, &sig, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stderr(&out), "");
    let dialogs = cli.dialogs();
    assert_eq!(dialogs.len(), 2, "{dialogs:#?}");
    assert!(dialogs[0].error.is_none());
    let said = format!(
        "{} {}",
        dialogs[1].error.as_deref().unwrap_or_default(),
        dialogs[1].description.as_deref().unwrap_or_default()
    );
    assert!(
        said.to_lowercase().contains("wrong") || said.to_lowercase().contains("incorrect"),
        "{said}"
    );
    assert_eq!(cli.fault_calls("C_Login"), 2);
    let log = std::fs::read_to_string(cli.fault_log()).expect("fault log");
    let logins: Vec<&str> = log.lines().filter(|l| l.starts_with("C_Login ")).collect();
    assert_eq!(
        logins,
        [
            "C_Login CKU_USER pin rv=0x000000A0",
            "C_Login CKU_USER pin rv=0x00000000"
        ],
        "CKR_PIN_INCORRECT, then CKR_OK"
    );
    assert!(verify_raw(
        &cli.cert_pem("sign-rsa2048"),
        Scheme::Pkcs1,
        "sha256",
        &doc,
        &sig
    ));
}

/// A locked token: no dialog, no C_Login, one line that mentions the lock, no output.
#[test]
fn a_locked_token_fails_without_dialog_or_login() {
    let cli = with_fault();
    let id = cli.cert_id("sign-p256");
    cli.set_fault("pin_locked=1\n");
    // The listing shows the lock too.
    let out = cli.run(&["tokens", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let tokens: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(tokens[0]["pin"]["locked"], true, "{tokens:#}");

    let doc = cli.file("doc.txt", b"document");
    let sig = cli.dir().join("doc.sig");
    cli.answer(&[Step::pin("123456")]);
    let out = cli.sign(&id, &doc, &sig, &[]);
    let line = one_line_failure(&out);
    assert!(line.to_lowercase().contains("lock"), "{line}");
    assert_eq!(cli.fault_calls("C_Login"), 0);
    assert!(cli.dialogs().is_empty(), "no dialog for a locked token");
    assert_eq!(cli.script.consumed().expect("cursor"), 0);
    assert!(!sig.exists());
}

/// The user cancels the PIN dialog: one line, no C_Login, no output file.
#[test]
fn a_cancelled_dialog_signs_nothing() {
    let cli = with_fault();
    let id = cli.cert_id("sign-ed25519");
    let doc = cli.file("doc.txt", b"document");
    let sig = cli.dir().join("doc.sig");
    cli.answer(&[Step::cancel().expect(Dialog::GetPin)]);
    let out = cli.sign(&id, &doc, &sig, &[]);
    let line = one_line_failure(&out);
    assert!(line.contains("cancel"), "{line}");
    assert_eq!(cli.fault_calls("C_Login"), 0);
    assert_eq!(cli.fault_calls("C_Sign"), 0);
    assert_eq!(cli.dialogs().len(), 1);
    assert!(!sig.exists());

    // Cancel after a wrong PIN: still nothing, and only the one wrong C_Login.
    cli.answer(&[Step::pin("999999"), Step::cancel()]);
    let out = cli.sign(&id, &doc, &sig, &[]);
    one_line_failure(&out);
    assert_eq!(cli.fault_calls("C_Login"), 1);
    assert_eq!(cli.dialogs().len(), 3);
    assert!(!sig.exists());
}
