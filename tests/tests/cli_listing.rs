//! `keyport tokens` and `keyport certs`, checked against the provisioned token and OpenSSL.

mod cli_common;

use std::process::{Command, Stdio};

use base64::Engine as _;
use cli_common::{one_line_failure, stderr, stdout, x509_field, Cli, Options};
use keyport_e2e::harness::{KEYS, SOFTHSM, TOKEN_ENTRY_FIELDS};
use serde_json::{json, Value};

/// The token's serial as pkcs11-tool sees it.
fn serial_from_pkcs11_tool(cli: &Cli) -> String {
    let out = Command::new("pkcs11-tool")
        .args(["--module", SOFTHSM, "-L"])
        .env("SOFTHSM2_CONF", cli.token().conf())
        .output()
        .expect("pkcs11-tool -L");
    let text = stdout(&out);
    text.lines()
        .find_map(|l| l.trim().strip_prefix("serial num"))
        .and_then(|rest| rest.split(':').nth(1))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| panic!("no serial in {text}"))
}

#[test]
fn certs_json_lists_every_certificate_as_openssl_reads_them() {
    let cli = Cli::new();
    let certs = cli.certs();
    assert_eq!(certs.len(), KEYS.len(), "{certs:#?}");
    let token_id = certs[0]["tokenId"].as_str().expect("tokenId").to_owned();
    assert!(
        token_id.starts_with("tok-") && token_id.len() == 4 + 32,
        "{token_id}"
    );
    for (label, cka_id, key_alg) in KEYS {
        let c = certs
            .iter()
            .find(|c| c["label"] == label)
            .unwrap_or_else(|| panic!("{label} missing"));
        let pem = cli.cert_pem(label);
        assert_eq!(c["id"], format!("{token_id}/{cka_id}"), "{label}");
        assert_eq!(c["tokenId"], token_id.as_str());
        assert_eq!(c["keyAlgorithm"], key_alg, "{label}");
        let der = cli.token().cert_der(label).expect("certificate DER");
        assert_eq!(
            c["certificate"],
            base64::engine::general_purpose::STANDARD.encode(der),
            "{label}"
        );
        assert_eq!(c["subject"], x509_field(&pem, "subject"), "{label}");
        assert_eq!(c["issuer"], x509_field(&pem, "issuer"), "{label}");
        assert_eq!(c["issuer"], "CN=KeyPort Test CA,O=KeyPort Test");
        // openssl -dateopt iso_8601 prints "2026-01-02 03:04:05Z": RFC 3339 with a 'T'.
        assert_eq!(
            c["notBefore"],
            x509_field(&pem, "startdate").replacen(' ', "T", 1),
            "{label}"
        );
        assert_eq!(
            c["notAfter"],
            x509_field(&pem, "enddate").replacen(' ', "T", 1),
            "{label}"
        );
        let serial = c["serialNumber"].as_str().expect("serialNumber");
        assert_eq!(
            serial.trim_start_matches('0').to_ascii_uppercase(),
            x509_field(&pem, "serial").trim_start_matches('0'),
            "{label}"
        );
        if label == "auth-p256" {
            assert_eq!(c["keyUsage"], json!(["digitalSignature"]), "{label}");
            assert_eq!(c["extendedKeyUsage"], json!(["clientAuth"]), "{label}");
        } else {
            assert_eq!(
                c["keyUsage"],
                json!(["digitalSignature", "nonRepudiation"]),
                "{label}"
            );
            assert_eq!(c["extendedKeyUsage"], json!([]), "{label}");
        }
    }
    // The same ids in the text listing.
    let out = cli.run(&["certs"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for c in &certs {
        assert!(text.contains(c["id"].as_str().expect("id")), "{text}");
    }
}

#[test]
fn tokens_json_has_the_fields_of_tokens_list() {
    let cli = Cli::new();
    let out = cli.run(&["tokens", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stderr(&out), "", "nothing on stderr");
    let tokens: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let list = tokens.as_array().expect("array");
    assert_eq!(list.len(), 1, "only the initialised token: {tokens:#}");
    let t = &list[0];
    let mut keys: Vec<&str> = t
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(keys, TOKEN_ENTRY_FIELDS);
    assert_eq!(t["label"], "KeyPort Test");
    assert_eq!(t["manufacturer"], "SoftHSM project");
    assert_eq!(t["model"], "SoftHSM v2");
    assert_eq!(t["serial"], serial_from_pkcs11_tool(&cli));
    assert_eq!(t["reader"], Value::Null);
    assert_eq!(t["pinPad"], false);
    assert_eq!(
        t["pin"],
        json!({"initialized": true, "countLow": false, "finalTry": false, "locked": false})
    );
    // The certificates name this token.
    let certs = cli.certs();
    assert!(certs.iter().all(|c| c["tokenId"] == t["id"]));
    // The text listing shows the label and serial.
    let out = cli.run(&["tokens"]);
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(
        text.contains("KeyPort Test") && text.contains(t["serial"].as_str().expect("serial")),
        "{text}"
    );
}

/// A module that does not exist: tokens and certs still run, list what the other modules have,
/// and say on stderr (one line) which module failed.
#[test]
fn a_missing_module_is_reported_and_the_others_still_listed() {
    let missing = std::path::PathBuf::from("/nonexistent/keyport/libmissing-pkcs11.so");
    let cli = Cli::with(Options {
        extra_modules: vec![missing.clone()],
        ..Options::default()
    });
    for args in [["tokens", "--json"], ["certs", "--json"]] {
        let out = cli.run(&args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: {err}");
        assert!(
            lines[0].contains(&*missing.to_string_lossy()) && lines[0].contains("did not load"),
            "{err}"
        );
        assert!(!err.contains("panicked"));
        let list: Value = serde_json::from_slice(&out.stdout).expect("JSON");
        let expected = if args[0] == "tokens" { 1 } else { KEYS.len() };
        assert_eq!(list.as_array().map(Vec::len), Some(expected), "{args:?}");
    }

    // Only the missing module: empty lists, still exit 0, still the one line.
    let only = Cli::with(Options {
        extra_modules: vec![missing.clone()],
        no_token_module: true,
        ..Options::default()
    });
    let out = only.run(&["certs", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "[]");
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    // Signing then fails with one line per problem: the module, and the missing certificate.
    let doc = only.file("doc.txt", b"document");
    let out_file = only.dir().join("doc.sig");
    let out = only.sign(&format!("tok-{}/03", "0".repeat(32)), &doc, &out_file, &[]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("did not load"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out_file.exists());
    assert!(only.dialogs().is_empty(), "no dialog");
}

/// `keyport certs --json | head -1` must not panic when the reader goes away.
#[test]
fn a_closed_stdout_pipe_is_not_a_panic() {
    let cli = Cli::new();
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader); // every write to the pipe now fails with EPIPE
    let out = cli
        .command()
        .args(["certs", "--json"])
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .expect("run keyport");
    let err = stderr(&out);
    assert!(!err.contains("panicked"), "{err}");
    assert!(out.status.success(), "{err}");
}

/// A config with a key keyport does not know, or with a PIN in it, is refused in one line.
#[test]
fn config_with_an_unknown_key_or_a_pin_is_refused() {
    let cli = Cli::new();
    let modules = [std::path::PathBuf::from(SOFTHSM)];
    for (extra, must_mention) in [("colour = \"blue\"", "colour"), ("pin = \"123456\"", "pin")] {
        std::fs::write(
            &cli.config,
            cli_common::config_text(cli.dir(), &modules, "non-repudiation", extra),
        )
        .expect("write config");
        for args in [&["certs", "--json"][..], &["tokens"][..]] {
            let out = cli.run(args);
            let line = one_line_failure(&out);
            assert!(line.contains(must_mention), "{extra}: {line}");
            assert!(!line.contains("123456"), "the PIN is not echoed: {line}");
            assert_eq!(stdout(&out), "", "{extra}");
        }
    }
}
