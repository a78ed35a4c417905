//! `keyport demo` as a new user meets it (issue 14, snags 3 and 6): the link it prints reaches
//! the agent on whatever port the configuration gives it, and afterwards `keyport --demo …`
//! sees the demo token and its audit log, and `doctor` mentions them.

mod cli_common;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use cli_common::{keyport_bin, stderr, stdout};
use keyport_e2e::harness::http_exchange;
use keyport_e2e::pinentry;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn keyport(home: &Path, config: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(keyport_bin());
    cmd.arg("--config")
        .arg(config)
        .args(args)
        .env("HOME", home)
        .env_remove("XDG_DATA_HOME")
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("SOFTHSM2_CONF")
        .stdin(Stdio::null());
    cmd
}

fn run(home: &Path, config: &Path, args: &[&str]) -> Output {
    keyport(home, config, args).output().expect("keyport runs")
}

#[test]
fn the_demo_link_reaches_the_agent_and_the_demo_token_stays_usable() {
    let home = tempfile::tempdir().expect("home");
    let agent_port = free_port();
    let portal_port = free_port();
    let config = home.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "port = {agent_port}\npinentry = \"{}\"\n",
            pinentry::program().display()
        ),
    )
    .expect("config");

    let mut child = keyport(
        home.path(),
        &config,
        &["demo", "--port", &portal_port.to_string()],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("keyport demo starts");
    // The agent says `listening on ws://127.0.0.1:PORT/v1` once both it and the portal serve.
    let (ready_tx, ready_rx) = mpsc::channel();
    let out = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if ready_tx.send(line).is_err() {
                break;
            }
        }
    });
    let (tx, rx) = mpsc::channel();
    let err = child.stderr.take().expect("stderr");
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Provisioning the token takes a few seconds the first time.
    let mut seen = Vec::new();
    let link = loop {
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(line) if line.contains("open http://") => break line,
            Ok(line) => seen.push(line),
            Err(e) => panic!("no link printed ({e}): {seen:?}"),
        }
    };
    assert!(
        link.contains(&format!(
            "open http://127.0.0.1:{portal_port}/?agent=ws://127.0.0.1:{agent_port}/v1 "
        )),
        "{link}"
    );
    // The agent listens on the port the link names, and the page is served.
    let listening = ready_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the agent says it listens");
    assert_eq!(
        listening,
        format!("listening on ws://127.0.0.1:{agent_port}/v1")
    );
    let page = http_exchange(portal_port, "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .expect("the demo portal answers");
    assert_eq!(page.0, 200);
    let _ = child.kill();
    let _ = child.wait();

    // Snag 6: the demo token and its audit log, from the command line.
    let out = run(home.path(), &config, &["--demo", "tokens"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("KeyPort"), "{}", stdout(&out));
    let out = run(home.path(), &config, &["--demo", "certs"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("CN="), "{}", stdout(&out));
    let out = run(home.path(), &config, &["--demo", "audit", "--verify"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let token_dir = home.path().join(".local/share/keyport/demo-token");
    let out = run(home.path(), &config, &["doctor"]);
    assert!(
        stdout(&out).contains(&format!(
            "demo token: {} (made by `keyport demo`; `keyport --demo tokens|certs|audit|doctor` use it",
            token_dir.display()
        )),
        "{}",
        stdout(&out)
    );
    // Without --demo the demo token is not in the way.
    let out = run(home.path(), &config, &["tokens"]);
    assert!(!stdout(&out).contains("KeyPort Demo"), "{}", stdout(&out));
}
