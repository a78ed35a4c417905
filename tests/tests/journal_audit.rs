//! Audit records reach the system journal with structured fields (issue 14).
//!
//! journald itself cannot run on the CI machines (no systemd as PID 1), so the test listens
//! where journald does: `keyport` runs in a private mount namespace (`unshare --mount`, root)
//! whose `/run/systemd/journal` is this test's folder, holding a datagram socket named
//! `socket`. Every datagram is parsed as journald's native protocol (`FIELD=value\n`, or
//! `FIELD\n` + 64-bit little-endian length + value + `\n`) and its fields are checked against
//! the local audit log's line.

mod cli_common;

use std::collections::BTreeMap;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Output};

use cli_common::{keyport_bin, stderr, Cli};
use keyport_e2e::harness::{Hash, USER_PIN};
use keyport_e2e::pinentry::Step;
use serde_json::Value;
use sha2::Digest as _;

/// Why this test cannot run here, if it cannot.
fn cannot_run() -> Option<&'static str> {
    let root = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false);
    if !root {
        return Some("needs root (a mount namespace)");
    }
    if Command::new("unshare").arg("--version").output().is_err() {
        return Some("needs unshare (util-linux)");
    }
    None
}

/// `keyport ARGS` in a mount namespace where `/run/systemd/journal` is `journal_dir`.
fn keyport_with_journal(cli: &Cli, journal_dir: &Path, args: &[&str]) -> Output {
    let template = cli.command();
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(
            "mkdir -p /run/systemd && mount -t tmpfs tmpfs /run/systemd && \
             mkdir /run/systemd/journal && mount --bind \"$0\" /run/systemd/journal && \
             exec \"$@\"",
        )
        .arg(journal_dir)
        .arg(keyport_bin())
        .arg("--config")
        .arg(&cli.config)
        .args(args)
        .current_dir(cli.dir());
    for (k, v) in template.get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    cmd.output().expect("unshare runs")
}

/// The journal entries received so far (the empty probe datagram skipped).
fn entries(socket: &UnixDatagram) -> Vec<BTreeMap<String, String>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match socket.recv(&mut buf) {
            Ok(0) => continue,
            Ok(n) => out.push(parse_native(&buf[..n])),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return out,
            Err(e) => panic!("recv: {e}"),
        }
    }
}

/// journald's native protocol: fields separated by `\n`, each `NAME=value` or
/// `NAME\n<u64 LE length><value>\n`.
fn parse_native(mut data: &[u8]) -> BTreeMap<String, String> {
    let mut fields = BTreeMap::new();
    while !data.is_empty() {
        let nl = data
            .iter()
            .position(|&b| b == b'\n')
            .expect("every field ends with a newline");
        let head = &data[..nl];
        if let Some(eq) = head.iter().position(|&b| b == b'=') {
            let name = String::from_utf8(head[..eq].to_vec()).expect("name");
            let value = String::from_utf8(head[eq + 1..].to_vec()).expect("value");
            fields.insert(name, value);
            data = &data[nl + 1..];
        } else {
            let name = String::from_utf8(head.to_vec()).expect("name");
            let rest = &data[nl + 1..];
            let len = u64::from_le_bytes(rest[..8].try_into().expect("length")) as usize;
            let value = String::from_utf8(rest[8..8 + len].to_vec()).expect("value");
            assert_eq!(rest[8 + len], b'\n', "{name}: no newline after the value");
            fields.insert(name, value);
            data = &rest[8 + len + 1..];
        }
        let name = fields.keys().last().cloned().unwrap_or_default();
        assert!(
            name.chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
                && !name.starts_with('_'),
            "{name:?} is not a field name journald keeps"
        );
    }
    fields
}

#[test]
fn audit_records_reach_the_journal_with_their_fields() {
    if let Some(why) = cannot_run() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let cli = Cli::new();
    let journal = tempfile::tempdir().expect("tempdir");
    let socket = UnixDatagram::bind(journal.path().join("socket")).expect("bind");
    socket.set_nonblocking(true).expect("nonblocking");
    let id = cli.cert_id("sign-p256");
    let doc = cli.file("contract.txt", b"journaled contract\n");

    // A signature, then a refusal.
    cli.answer(&[Step::pin(USER_PIN), Step::cancel()]);
    let sig = cli.dir().join("contract.sig");
    let sign = |out: &Path| {
        keyport_with_journal(
            &cli,
            journal.path(),
            &[
                "sign",
                "--cert",
                &id,
                "--in",
                &doc.display().to_string(),
                "--out",
                &out.display().to_string(),
            ],
        )
    };
    let out = sign(&sig);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = sign(&cli.dir().join("refused.sig"));
    assert!(!out.status.success());

    let got = entries(&socket);
    assert_eq!(got.len(), 2, "{got:#?}");
    let local: Vec<Value> = std::fs::read_to_string(cli.dir().join("audit.log"))
        .expect("local log")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    let cert_sha256 = hex::encode(sha2::Sha256::digest(
        cli.token().cert_der("sign-p256").expect("cert"),
    ));
    let digest = hex::encode(Hash::Sha256.digest(b"journaled contract\n"));
    for (entry, line) in got.iter().zip(&local) {
        let field = |name: &str| entry.get(name).map(String::as_str).unwrap_or_default();
        assert_eq!(field("KEYPORT_SEQ"), line["seq"].to_string());
        assert_eq!(field("KEYPORT_ORIGIN"), "local");
        assert_eq!(field("KEYPORT_OPERATION"), "sign");
        assert_eq!(
            field("KEYPORT_OUTCOME"),
            line["outcome"].as_str().unwrap_or("?")
        );
        assert_eq!(field("KEYPORT_CERT_SHA256"), cert_sha256);
        assert_eq!(
            field("KEYPORT_CERT_SUBJECT"),
            line["certificate"]["subject"].as_str().unwrap_or("?")
        );
        assert!(field("KEYPORT_CERT_SUBJECT").contains("Test Signer P-256"));
        assert_eq!(field("KEYPORT_DIGESTS"), digest);
        assert_eq!(field("MESSAGE_ID"), agent::journal::MESSAGE_ID);
        assert_eq!(field("SYSLOG_IDENTIFIER"), "keyport");
    }
    assert_eq!(got[0]["PRIORITY"], "5", "granted: notice");
    assert_eq!(
        got[0]["MESSAGE"],
        "keyport audit #1: sign by local: granted"
    );
    assert_eq!(got[1]["PRIORITY"], "4", "refused: warning");
    assert_eq!(got[1]["KEYPORT_OUTCOME"], "refused:USER_CANCELLED");
    // The PIN is nowhere.
    assert!(!format!("{got:?}").contains(USER_PIN));

    // audit_journal = false: the local log only.
    let text = std::fs::read_to_string(&cli.config).expect("config");
    std::fs::write(&cli.config, format!("audit_journal = false\n{text}")).expect("write");
    cli.answer(&[Step::pin(USER_PIN)]);
    let out = sign(&cli.dir().join("quiet.sig"));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(entries(&socket).len(), 0);
    let lines = std::fs::read_to_string(cli.dir().join("audit.log")).expect("log");
    assert_eq!(lines.lines().count(), 3);
}

/// Without a journal socket the records stay local and nothing fails.
#[test]
fn without_a_journal_the_records_stay_local() {
    if let Some(why) = cannot_run() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let cli = Cli::new();
    let empty = tempfile::tempdir().expect("tempdir");
    let id = cli.cert_id("sign-p256");
    let doc = cli.file("doc.txt", b"doc\n");
    cli.answer(&[Step::pin(USER_PIN)]);
    let out = keyport_with_journal(
        &cli,
        empty.path(),
        &[
            "sign",
            "--cert",
            &id,
            "--in",
            &doc.display().to_string(),
            "--out",
            &cli.dir().join("doc.sig").display().to_string(),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = std::fs::read_to_string(cli.dir().join("audit.log")).expect("log");
    assert_eq!(lines.lines().count(), 1);
}
