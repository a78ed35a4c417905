//! `keyport keys generate` and `keyport certs import`: a key made on the token, its request
//! checked and certified by OpenSSL, the certificate stored, listed and used by `keyport sign`.
#![allow(clippy::unwrap_used)] // a test fails by panicking

mod cli_common;

use cli_common::{openssl, stderr, stdout, verify_raw, Cli, Scheme};
use keyport_e2e::pinentry::{Command as Dialog, Step};

fn token_id(cli: &Cli) -> String {
    let out = cli.run(&["tokens", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    list[0]["id"].as_str().expect("a token").to_owned()
}

#[test]
fn generate_request_import_and_sign_from_the_command_line() {
    let cli = Cli::new();
    let token = token_id(&cli);
    let req = cli.dir().join("req.pem");
    cli.answer(&[Step::pin("123456").expect(Dialog::GetPin)]);
    let out = cli.run(&[
        "keys",
        "generate",
        "--token",
        &token,
        "--algorithm",
        "EC-P384",
        "--subject",
        "CN=Li Lei,O=Example Bank,C=CN",
        "--out",
        req.to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let key_id = text
        .split_whitespace()
        .find(|w| w.starts_with(&format!("{token}/")))
        .unwrap_or_else(|| panic!("no key id in {text}"))
        .to_owned();
    let dialogs = cli.dialogs();
    assert_eq!(dialogs.len(), 1);
    let description = dialogs[0].description.clone().unwrap_or_default();
    assert!(
        description.contains("keyport keys generate (command line) asks to create a new key"),
        "{description}"
    );

    let (ok, text) = openssl(&[
        "req",
        "-verify",
        "-in",
        req.to_str().unwrap(),
        "-noout",
        "-subject",
    ]);
    assert!(ok && text.contains("verify OK"), "{text}");
    assert!(text.contains("CN = Li Lei"), "{text}");
    let ext = cli.file("ext.cnf", b"[ext]\nkeyUsage=critical,nonRepudiation\n");
    let cert = cli.dir().join("cert.pem");
    let ca_key = cli.token().dir().join("ca.key");
    let (ok, text) = openssl(&[
        "x509",
        "-req",
        "-in",
        req.to_str().unwrap(),
        "-CA",
        cli.ca_pem().to_str().unwrap(),
        "-CAkey",
        ca_key.to_str().unwrap(),
        "-days",
        "30",
        "-extfile",
        ext.to_str().unwrap(),
        "-extensions",
        "ext",
        "-out",
        cert.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");

    // A file that is not a certificate: a usage error before any dialog.
    let junk = cli.file("junk.der", b"junk");
    let out = cli.run(&[
        "certs",
        "import",
        "--token",
        &token,
        "--in",
        junk.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("is not an X.509 certificate"),
        "{}",
        stderr(&out)
    );
    assert_eq!(cli.dialogs().len(), 1);

    cli.answer(&[Step::pin("123456").expect(Dialog::GetPin)]);
    let out = cli.run(&[
        "certs",
        "import",
        "--token",
        &token,
        "--in",
        cert.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains(&key_id), "{}", stdout(&out));
    assert!(cli.certs().iter().any(|c| c["id"] == key_id.as_str()));

    let doc = cli.file("contract.txt", b"Loan contract 2026-114\n");
    let sig = cli.dir().join("contract.sig");
    cli.answer(&[Step::pin("123456").expect(Dialog::GetPin)]);
    let out = cli.sign(&key_id, &doc, &sig, &["--hash", "sha384"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(verify_raw(&cert, Scheme::Ecdsa, "sha384", &doc, &sig));
}
