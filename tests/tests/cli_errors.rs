//! Bad input to `keyport sign`: each case gets one clear line on stderr, a non-zero exit, no
//! panic or backtrace, no output file (nor a temporary one) and no PIN dialog.

mod cli_common;

use std::path::{Path, PathBuf};
use std::process::Output;

use cli_common::{config_text, keyport_bin, one_line_failure, Cli};
use keyport_e2e::harness::SOFTHSM;
use keyport_e2e::pinentry::Step;

/// The checks every case shares; returns the stderr line.
fn refused(cli: &Cli, out: &Output, output: &Path) -> String {
    let line = one_line_failure(out);
    assert!(!output.exists(), "{} was created: {line}", output.display());
    if let Some(parent) = output.parent().filter(|p| p.is_dir()) {
        let temps: Vec<PathBuf> = std::fs::read_dir(parent)
            .expect("read dir")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.to_string_lossy().ends_with(".keyport-tmp"))
            .collect();
        assert!(temps.is_empty(), "temporary files left: {temps:?}");
    }
    assert!(cli.dialogs().is_empty(), "no dialog for: {line}");
    assert_eq!(cli.script.consumed().expect("cursor"), 0);
    assert!(
        String::from_utf8_lossy(&out.stdout).is_empty(),
        "nothing on stdout"
    );
    line
}

#[test]
fn bad_sign_input_is_refused_in_one_line_before_any_dialog() {
    let cli = Cli::new();
    // A PIN is queued so that a wrongly shown dialog would be answered and show in the
    // transcript (rather than hang).
    cli.answer(&[Step::pin("123456")]);
    let p256 = cli.cert_id("sign-p256");
    let rsa = cli.cert_id("sign-rsa2048");
    let token = p256.split('/').next().expect("token part").to_owned();
    let doc = cli.file("doc.txt", b"document");
    let out_file = cli.dir().join("doc.sig");

    // Unknown certificate: a well-formed id that no token has.
    let out = cli.sign(&format!("{token}/99"), &doc, &out_file, &[]);
    let line = refused(&cli, &out, &out_file);
    assert!(line.contains("certificate"), "{line}");
    let out = cli.sign(&format!("tok-{}/03", "ab".repeat(16)), &doc, &out_file, &[]);
    refused(&cli, &out, &out_file);

    // Malformed ids.
    for bad in ["garbage", "tok-xyz/03", "", "tok-/"] {
        let out = cli.sign(bad, &doc, &out_file, &[]);
        let line = refused(&cli, &out, &out_file);
        assert!(line.contains("not a certificate id"), "{bad:?}: {line}");
    }

    // Unreadable input: missing, a directory.
    let missing = cli.dir().join("no-such-file.txt");
    let out = cli.sign(&p256, &missing, &out_file, &[]);
    let line = refused(&cli, &out, &out_file);
    assert!(
        line.contains("cannot read") && line.contains("no-such-file.txt"),
        "{line}"
    );
    let out = cli.sign(&p256, cli.dir(), &out_file, &[]);
    let line = refused(&cli, &out, &out_file);
    assert!(line.contains("cannot read"), "{line}");

    // Unwritable output: a folder that does not exist, a file as the folder, a folder as
    // the output.
    let nowhere = cli.dir().join("no-such-dir").join("doc.sig");
    let out = cli.sign(&p256, &doc, &nowhere, &[]);
    let line = refused(&cli, &out, &nowhere);
    assert!(line.contains("cannot write"), "{line}");
    let under_file = doc.join("doc.sig");
    let out = cli.sign(&p256, &doc, &under_file, &[]);
    let line = refused(&cli, &out, &under_file);
    assert!(line.contains("cannot write"), "{line}");
    let folder = cli.dir().join("a-folder");
    std::fs::create_dir(&folder).expect("mkdir");
    let out = cli.sign(&p256, &doc, &folder, &[]);
    let line = one_line_failure(&out);
    assert!(line.contains("cannot write"), "{line}");
    assert!(cli.dialogs().is_empty());

    // Unsupported algorithms.
    let out = cli.sign(&p256, &doc, &out_file, &["--pss"]);
    let line = refused(&cli, &out, &out_file);
    assert!(line.contains("EC-P256"), "{line}");
    let out = cli.sign(&rsa, &doc, &out_file, &["--ecdsa-encoding", "p1363"]);
    let line = refused(&cli, &out, &out_file);
    assert!(line.contains("ECDSA"), "{line}");
    let ed = cli.cert_id("sign-ed25519");
    let out = cli.sign(&ed, &doc, &out_file, &["--pss"]);
    refused(&cli, &out, &out_file);
}

/// The config problems of cli_listing, seen from `keyport sign`: refused before anything else.
#[test]
fn a_bad_config_stops_sign_before_anything_else() {
    let cli = Cli::new();
    let id = cli.cert_id("sign-p256");
    cli.answer(&[Step::pin("123456")]);
    let doc = cli.file("doc.txt", b"document");
    let out_file = cli.dir().join("doc.sig");
    let modules = [PathBuf::from(SOFTHSM)];
    for (extra, mention) in [
        ("pin = \"123456\"", "pin"),
        ("colour = \"blue\"", "colour"),
        ("port = \"not a port\"", "port"),
    ] {
        std::fs::write(
            &cli.config,
            config_text(cli.dir(), &modules, "non-repudiation", extra),
        )
        .expect("write config");
        let out = cli.sign(&id, &doc, &out_file, &[]);
        let line = refused(&cli, &out, &out_file);
        assert!(line.contains(mention), "{extra}: {line}");
        assert!(line.contains("config.toml"), "names the file: {line}");
        assert!(!line.contains("123456"), "{line}");
    }
    // A config file that cannot be read (a folder).
    let out = std::process::Command::new(keyport_bin())
        .arg("--config")
        .arg(cli.dir())
        .arg("certs")
        .env("SOFTHSM2_CONF", cli.token().conf())
        .env_remove("KEYPORT_LOG")
        .output()
        .expect("run keyport");
    let line = one_line_failure(&out);
    assert!(line.contains("cannot read"), "{line}");
}
