//! What a new user tripped on in their first hour with the command line (issue 14, the snags
//! numbered as there), each against the real `keyport` binary.

mod cli_common;

use std::process::{Command, Stdio};

use cli_common::{keyport_bin, one_line_failure, stderr, stdout, Cli};
use keyport_e2e::harness::{self, Agent, AgentOptions, Hash, TestToken, PORTAL, USER_PIN};
use keyport_e2e::pinentry::{Command as Dialog, Step};
use serde_json::{json, Value};

/// Snag 1: `keyport sign` in a terminal tells a terminal pinentry which terminal to use (as
/// GnuPG does with GPG_TTY), without the user setting GPG_TTY.
#[test]
fn sign_in_a_terminal_tells_the_pinentry_its_tty() {
    let cli = Cli::new();
    let id = cli.cert_id("sign-p256");
    let doc = cli.file("doc.txt", b"signed in a terminal\n");
    let sig = cli.dir().join("doc.sig");
    cli.answer(&[Step::pin(USER_PIN).expect(Dialog::GetPin)]);
    // util-linux `script` runs the command on a new pseudo-terminal, as a user's shell would.
    let line = format!(
        "{} --config {} sign --cert {} --in {} --out {}",
        keyport_bin().display(),
        cli.config.display(),
        id,
        doc.display(),
        sig.display()
    );
    let template = cli.command();
    let mut cmd = Command::new("script");
    cmd.args(["-qec", &line, "/dev/null"])
        .env_remove("GPG_TTY")
        .stdin(Stdio::null());
    for (k, v) in template.get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let out = cmd.output().expect("script runs");
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let dialogs = cli.dialogs();
    assert_eq!(dialogs.len(), 1, "{dialogs:?}");
    assert!(
        dialogs[0]
            .options
            .iter()
            .any(|o| o.starts_with("ttyname=/dev/pts/")),
        "no ttyname given to the pinentry: {:?}",
        dialogs[0].options
    );
    assert!(sig.exists());
}

/// Snag 2: every command-line signature (and refusal) is in the audit log, chained with the
/// agent's records when both write to it, and `keyport audit --verify` proves it; the success
/// line says what was written (snag 12).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_line_signatures_are_audited_with_the_agents() {
    let token = TestToken::provision().expect("token");
    let agent = Agent::start(&token, AgentOptions::default()).expect("agent");
    let mut client = agent.connect(PORTAL).await.expect("connect");
    let ids = harness::certificate_ids(&mut client, &token)
        .await
        .expect("ids");
    let sign_over_ws = |n: u8| {
        let digest = Hash::Sha256.digest(&[n]);
        json!({
            "certificateId": ids["sign-p256"],
            "digest": {"algorithm": "SHA-256", "value": harness::b64(&digest)},
            "display": {"title": format!("page document {n}")},
        })
    };
    let doc = agent.dir().join("contract.txt");
    std::fs::write(&doc, b"signed on the command line\n").expect("write");
    let cli_sign = |out: &str| {
        let mut cmd = Command::new(keyport_bin());
        cmd.arg("--config")
            .arg(agent.config_path())
            .args(["sign", "--cert", &ids["sign-p256"], "--in"])
            .arg(&doc)
            .arg("--out")
            .arg(agent.dir().join(out))
            .env("SOFTHSM2_CONF", token.conf())
            .stdin(Stdio::null());
        for (k, v) in agent.script().env() {
            cmd.env(k, v);
        }
        cmd.output().expect("keyport sign runs")
    };

    agent
        .script()
        .push_all(&[
            Step::pin(USER_PIN),
            Step::pin(USER_PIN),
            Step::pin(USER_PIN),
            Step::cancel(),
            Step::pin(USER_PIN),
        ])
        .expect("steps");
    client.call_ok("sign", sign_over_ws(1)).await.expect("sign");
    let out = cli_sign("one.sig");
    assert!(out.status.success(), "{}", stderr(&out));
    let said = stdout(&out);
    assert!(
        said.starts_with(&format!(
            "signed {} with Test Signer P-256: wrote ",
            doc.display()
        )) && said.contains("one.sig (")
            && said.contains("bytes, raw signature)"),
        "{said}"
    );
    let out = cli_sign("two.sig");
    assert!(out.status.success(), "{}", stderr(&out));
    let out = cli_sign("refused.sig");
    assert!(!out.status.success(), "the user cancelled");
    client.call_ok("sign", sign_over_ws(2)).await.expect("sign");

    let lines: Vec<Value> = std::fs::read_to_string(agent.audit_log())
        .expect("log")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    let summary: Vec<(u64, String, String)> = lines
        .iter()
        .map(|l| {
            (
                l["seq"].as_u64().unwrap_or_default(),
                l["origin"].as_str().unwrap_or_default().to_owned(),
                l["outcome"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let row = |seq, origin: &str, outcome: &str| (seq, origin.to_owned(), outcome.to_owned());
    assert_eq!(
        summary,
        [
            row(1, PORTAL, "granted"),
            row(2, "local", "granted"),
            row(3, "local", "granted"),
            row(4, "local", "refused:USER_CANCELLED"),
            row(5, PORTAL, "granted"),
        ]
    );
    let file_digest = hex::encode(Hash::Sha256.digest(b"signed on the command line\n"));
    assert_eq!(lines[1]["digests"], json!([file_digest]));
    let out = agent.keyport(&["audit", "--verify"]).expect("audit");
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
}

/// Snag 4: a misspelt setting is an unknown key with the one meant, not "a PIN never belongs
/// in the configuration".
#[test]
fn a_misspelt_setting_names_the_setting_meant() {
    let cli = Cli::new();
    std::fs::write(&cli.config, "pin_cache_secs = 30\n").expect("write");
    let line = one_line_failure(&cli.run(&["tokens"]));
    assert!(
        line.contains("unknown key `pin_cache_secs`: did you mean `pin_cache_seconds`?"),
        "{line}"
    );
    assert!(!line.contains("PIN never"), "{line}");
    // A PIN is still called one.
    std::fs::write(&cli.config, "user_pin = \"123456\"\n").expect("write");
    let line = one_line_failure(&cli.run(&["tokens"]));
    assert!(line.contains("a PIN never belongs"), "{line}");
}

/// Snag 5: `keyport doctor | head -1` ends quietly when the reader goes away (no panic, no
/// exit 101).
#[test]
fn doctor_into_a_closed_pipe_ends_quietly() {
    let cli = Cli::new();
    let mut cmd = cli.command();
    cmd.arg("doctor")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("doctor runs");
    // Close the pipe before doctor writes (it loads the token first).
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("doctor ends");
    let err = stderr(&out);
    assert!(!err.contains("panicked"), "{err}");
    assert_ne!(out.status.code(), Some(101), "{err}");
    assert!(err.is_empty(), "{err}");
}

/// Snag 7: `--config FILE` does not move the data folder; a `--config` that does not exist is
/// an error, not the defaults.
#[test]
fn config_flag_keeps_the_data_folder_and_a_missing_file_is_an_error() {
    let cli = Cli::new();
    let home = tempfile::tempdir().expect("home");
    let run = |args: &[&str]| {
        let mut cmd = cli.command();
        cmd.args(args)
            .env("HOME", home.path())
            .env_remove("XDG_DATA_HOME")
            .env_remove("XDG_CONFIG_HOME");
        cmd.output().expect("keyport runs")
    };
    // A config without audit_log: the log's default is in the OS data folder.
    let bare = cli.dir().join("bare.toml");
    std::fs::write(&bare, "discover_modules = false\n").expect("write");
    let mut cmd = Command::new(keyport_bin());
    cmd.arg("--config")
        .arg(&bare)
        .arg("audit")
        .env("HOME", home.path())
        .env_remove("XDG_DATA_HOME");
    let out = cmd.output().expect("keyport runs");
    assert!(out.status.success(), "{}", stderr(&out));
    let expected = home.path().join(".local/share/keyport/audit.log");
    assert_eq!(
        stdout(&out),
        format!("no audit log yet at {}\n", expected.display())
    );

    let missing = cli.dir().join("no-such.toml");
    let mut cmd = Command::new(keyport_bin());
    cmd.arg("--config").arg(&missing).arg("tokens");
    let line = one_line_failure(&cmd.output().expect("keyport runs"));
    assert!(
        line.contains(&format!(
            "{}: no such configuration file",
            missing.display()
        )),
        "{line}"
    );
    // doctor names both folders.
    let out = run(&["doctor"]);
    let text = stdout(&out);
    assert!(
        text.contains(&format!(
            "data folder: {} (audit log: {})",
            home.path().join(".local/share/keyport").display(),
            cli.dir().join("audit.log").display()
        )),
        "{text}"
    );
}

/// Snag 14: doctor checks the dialog program (a missing one is a problem), and what it needs
/// to show a dialog: a display, or a terminal (GPG_TTY).
#[test]
fn doctor_checks_the_pinentry_the_display_and_the_terminal() {
    let cli = Cli::new();
    let text = std::fs::read_to_string(&cli.config).expect("config");
    let run = |config: &str, env: &[(&str, &str)]| {
        std::fs::write(&cli.config, config).expect("write");
        let mut cmd = cli.command();
        cmd.arg("doctor")
            .env_remove("DISPLAY")
            .env_remove("WAYLAND_DISPLAY")
            .env_remove("GPG_TTY")
            .stdin(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().expect("doctor runs")
    };
    let with = |program: &str| {
        text.lines()
            .map(|l| {
                if l.starts_with("pinentry = ") {
                    format!("pinentry = \"{program}\"")
                } else {
                    l.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    };

    // A pinentry that does not exist.
    let out = run(&with("/nonexistent/pinentry-gnome3"), &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let report = stdout(&out);
    assert!(report.contains("\nDialogs (pinentry):\n"), "{report}");
    assert!(
        report.contains("- the pinentry /nonexistent/pinentry-gnome3 cannot run"),
        "{report}"
    );

    // A terminal pinentry with no terminal, then with GPG_TTY.
    let out = run(&with("/usr/bin/pinentry-tty"), &[]);
    let report = stdout(&out);
    assert!(
        report
            .contains("/usr/bin/pinentry-tty (from the configuration's `pinentry`): pinentry-tty"),
        "{report}"
    );
    assert!(
        report.contains("terminal: none (no GPG_TTY, not run in a terminal)"),
        "{report}"
    );
    assert!(
        report.contains("- pinentry-tty draws its dialog in a terminal, but none is known"),
        "{report}"
    );
    let out = run(&with("/usr/bin/pinentry-tty"), &[("GPG_TTY", "/dev/pts/7")]);
    let report = stdout(&out);
    assert!(report.contains("terminal: GPG_TTY=/dev/pts/7"), "{report}");
    assert!(
        !report.contains("draws its dialog in a terminal"),
        "{report}"
    );
    assert!(report.contains("display: none"), "{report}");
}

/// Snag 13: the JS guide's first step works from the repository (the package is not
/// published): `npm pack` there and `npm install` of the tarball, offline, in a fresh project,
/// after which `import { KeyPort } from '@keyport/client'` loads.
#[test]
fn the_js_client_installs_from_the_repository_as_the_guide_says() {
    let js = harness::repo_root().join("browser-bridge/js");
    let guide = std::fs::read_to_string(js.join("README.md")).expect("guide");
    assert!(
        guide.contains("is not on the npm\n   registry yet"),
        "{guide}"
    );
    assert!(guide.contains("npm pack"), "{guide}");
    let work = tempfile::tempdir().expect("tempdir");
    let npm = |dir: &std::path::Path, args: &[&str]| {
        let out = Command::new("npm")
            .args(args)
            .current_dir(dir)
            .env("npm_config_cache", work.path().join("npm-cache"))
            .output()
            .expect("npm runs");
        assert!(out.status.success(), "npm {args:?}: {}", stderr(&out));
        stdout(&out)
    };
    let packed = npm(
        &js,
        &[
            "pack",
            "--pack-destination",
            &work.path().display().to_string(),
        ],
    );
    let tarball = work.path().join(
        packed
            .lines()
            .last()
            .expect("npm pack names the file")
            .trim(),
    );
    assert!(tarball.exists(), "{packed}");
    let project = work.path().join("portal");
    std::fs::create_dir(&project).expect("mkdir");
    std::fs::write(
        project.join("package.json"),
        r#"{"name":"portal","private":true}"#,
    )
    .expect("write");
    npm(
        &project,
        &[
            "install",
            "--offline",
            "--no-audit",
            "--no-fund",
            &tarball.display().to_string(),
        ],
    );
    let out = Command::new("node")
        .args([
            "--input-type=module",
            "-e",
            "import { KeyPort, KeyPortError } from '@keyport/client'; \
             console.log(typeof KeyPort.connect, typeof KeyPortError)",
        ])
        .current_dir(&project)
        .output()
        .expect("node runs");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "function function\n");
}
