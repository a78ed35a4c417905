//! The twelve holes of the December 2026 attack review (issue 10), each tried again the way
//! the review tried it: against the real `keyport run` (and the `keyport` CLI), with SoftHSM,
//! the scripted pinentry and, where needed, real processes of another user, a full file system
//! and a process short of descriptors. Each test failed on the agent before its fix.
#![allow(clippy::unwrap_used)] // a test fails by panicking

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use keyport_e2e::harness::{
    b64, certificate_ids, http_exchange, keyport_bin, nonce, upgrade_request, verify_webeid, Agent,
    AgentOptions, Client, Closed, TestToken, PORTAL, SOFTHSM, USER_PIN,
};
use keyport_e2e::pinentry::{Button, Step};
use serde_json::{json, Value};
use sha2::Digest as _;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;

const EVIL: &str = "https://evil.test";

fn new_token() -> TestToken {
    TestToken::provision().expect("provision")
}

fn sign_digest(id: &str, digest: &[u8], title: &str) -> Value {
    json!({
        "certificateId": id,
        "digest": {"algorithm": "SHA-256", "value": b64(digest)},
        "display": {"title": title},
    })
}

fn sha256(data: &[u8]) -> Vec<u8> {
    sha2::Sha256::digest(data).to_vec()
}

fn fingerprint(tk: &TestToken, label: &str) -> String {
    hex::encode(sha256(&tk.cert_der(label).unwrap()))
}

/// Finding 1: a "document" signature from one site must never be a login for another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_01_a_key_signs_documents_or_logs_in_never_both() {
    let tk = new_token();
    for usage in ["non-repudiation", "any"] {
        let options = AgentOptions {
            allowed_origins: vec![PORTAL.into(), EVIL.into()],
            signing_key_usage: usage.into(),
            ..AgentOptions::default()
        };
        let agent = Agent::start(&tk, options).unwrap();
        let mut evil = agent.connect(EVIL).await.unwrap();
        let ids = certificate_ids(&mut evil, &tk).await.unwrap();
        // The review's digest: what a Web eID token for the portal signs.
        let challenge = nonce(32).unwrap();
        let mut forged = sha256(PORTAL.as_bytes());
        forged.extend(sha256(challenge.as_bytes()));
        let forged = sha256(&forged);
        // The login certificate (clientAuth) never signs a page's digest, whatever the policy.
        let e = evil
            .call_err(
                "sign",
                sign_digest(&ids["auth-p256"], &forged, "Invoice 2026-77"),
                "KEY_USAGE_NOT_ALLOWED",
            )
            .await
            .unwrap();
        assert_eq!(e.code, 1007, "{usage}");
        // A document-signing certificate never logs in.
        for label in ["sign-p256", "sign-ed25519"] {
            evil.call_err(
                "authenticate",
                json!({"challenge": challenge, "certificateId": ids[label]}),
                "KEY_USAGE_NOT_ALLOWED",
            )
            .await
            .unwrap_or_else(|e| panic!("{usage} {label}: {e}"));
        }
        assert!(
            agent.script().dialogs().unwrap().is_empty(),
            "{usage}: a dialog was shown"
        );
    }
    // The administrator's exception for one named certificate, with its risk accepted.
    let options = AgentOptions {
        extra_toml: vec![format!(
            "dual_use_certificates = [\"{}\"]",
            fingerprint(&tk, "sign-p256")
        )],
        ..AgentOptions::default()
    }
    .steps([Step::pin(USER_PIN)]);
    let agent = Agent::start(&tk, options).unwrap();
    let mut portal = agent.connect(PORTAL).await.unwrap();
    let ids = certificate_ids(&mut portal, &tk).await.unwrap();
    let challenge = nonce(32).unwrap();
    let token = portal
        .call_ok(
            "authenticate",
            json!({"challenge": challenge, "certificateId": ids["sign-p256"]}),
        )
        .await
        .unwrap();
    verify_webeid(&token, PORTAL, &challenge, &tk.cert_pem("sign-p256")).unwrap();
    // Only that one: sign-ed25519 still may not.
    portal
        .call_err(
            "authenticate",
            json!({"challenge": challenge, "certificateId": ids["sign-ed25519"]}),
            "KEY_USAGE_NOT_ALLOWED",
        )
        .await
        .unwrap();
}

/// A small tmpfs for the audit log; unmounted on drop.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(kib: u32) -> SmallFs {
        let dir = tempfile::Builder::new()
            .prefix("keyport-fullfs")
            .tempdir()
            .unwrap();
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={kib}k,mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .status()
            .expect("mount (the test runs as root, as CI does)");
        assert!(
            status.success(),
            "mount -t tmpfs failed: this test needs root"
        );
        SmallFs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills every free block (the last write fails with ENOSPC).
    fn fill(&self) -> PathBuf {
        let filler = self.path().join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 4096];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
        filler
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Finding 2: with the audit log's file system full, no signature leaves the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_02_no_signature_without_its_durable_audit_record() {
    let tk = new_token();
    let fs = SmallFs::mount(256);
    let log = fs.path().join("audit.log");
    let options = AgentOptions {
        audit_log: Some(log.clone()),
        limits: vec!["requests_per_second = 1000".into()],
        ..AgentOptions::default()
    };
    let agent = Agent::start(&tk, options).unwrap();
    let mut client = agent.connect(PORTAL).await.unwrap();
    let ids = certificate_ids(&mut client, &tk).await.unwrap();
    let id = &ids["sign-p256"];
    agent.script().push(&Step::pin(USER_PIN)).unwrap();
    client
        .call_ok("sign", sign_digest(id, &[1; 32], "Before"))
        .await
        .unwrap();
    let filler = fs.fill();
    // 30 attempts, as in the review. A line may still fit in the log's last block; once none
    // does, every attempt is INTERNAL with no signature and no detail. Every signature that
    // left has its line.
    let mut released = 0;
    let mut refused = 0;
    for i in 0..30u8 {
        agent.script().push(&Step::pin(USER_PIN)).unwrap();
        let id_sent = client
            .send("sign", sign_digest(id, &[i; 32], "Disk full"))
            .await
            .unwrap();
        match client.response(id_sent).await.unwrap() {
            Ok(v) => {
                assert_eq!(refused, 0, "attempt {i}: a signature after a refusal: {v}");
                released += 1;
            }
            Err(e) => {
                assert_eq!(e.reason, "INTERNAL", "{e:?}");
                assert!(e.data.get("results").is_none() && e.data.get("signature").is_none());
                assert!(
                    !e.message.contains('/'),
                    "a path reached the page: {}",
                    e.message
                );
                assert!(e.message.contains(&id_sent.to_string()), "{}", e.message);
                refused += 1;
            }
        }
    }
    assert!(
        refused >= 20,
        "only {refused} of 30 refused ({released} released)"
    );
    let log_text = std::fs::read_to_string(&log).unwrap();
    let granted = log_text
        .lines()
        .filter(|l| l.contains("\"outcome\":\"granted\""))
        .count();
    assert_eq!(granted, 1 + released, "every released signature is logged");
    assert!(
        agent.stderr().contains("audit"),
        "the log says why: {}",
        agent.stderr()
    );
    // `keyport doctor` says why.
    let out = agent.keyport(&["doctor"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("audit log") && text.contains("is full"),
        "doctor: {text}"
    );
    assert_eq!(out.status.code(), Some(1));
    // The chain is whole; with room again, signatures flow and are logged.
    std::fs::remove_file(filler).unwrap();
    let out = agent.keyport(&["audit", "--verify"]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    agent.script().push(&Step::pin(USER_PIN)).unwrap();
    client
        .call_ok("sign", sign_digest(id, &[2; 32], "After"))
        .await
        .unwrap();
    let out = agent.keyport(&["audit", "--verify"]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Finding 3: strangers cannot crowd the approved portal out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_03_strangers_share_a_small_pool_that_idles_out() {
    let tk = new_token();
    let options = AgentOptions {
        limits: vec![
            "max_connections = 8".into(),
            "max_unapproved_connections = 3".into(),
            "unapproved_idle_seconds = 2".into(),
        ],
        ..AgentOptions::default()
    };
    let agent = Agent::start(&tk, options).unwrap();
    let port = agent.port();
    let mut strangers = Vec::new();
    for i in 0..3 {
        let origin = format!("https://stranger{i}.example");
        strangers.push(Client::connect(port, Some(&origin), None).await.unwrap());
    }
    // The pool is full: a fourth stranger (any origin) waits; the portal never does.
    let refused = Client::try_connect(port, Some("https://stranger9.example"), None)
        .await
        .unwrap();
    assert_eq!(refused.err(), Some(503));
    let mut portals = Vec::new();
    for _ in 0..5 {
        let mut c = agent.connect(PORTAL).await.unwrap();
        c.call_ok("hello", json!({})).await.unwrap();
        portals.push(c);
    }
    // Idle strangers are closed (1000) after the idle time, which frees the pool.
    for s in &mut strangers {
        assert_eq!(s.wait_closed().await.unwrap(), Closed::Code(1000));
    }
    let mut late = Client::connect(port, Some("https://stranger9.example"), None)
        .await
        .unwrap();
    late.call_ok("hello", json!({})).await.unwrap();
    // The approved portal's connections are not idled out.
    for p in &mut portals {
        p.call_ok("hello", json!({})).await.unwrap();
    }
    assert!(agent.script().dialogs().unwrap().is_empty());
}

/// Finding 4: a session consent covers its own kind of operation and certificate only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_04_session_consent_is_bound_to_kind_and_certificate() {
    let tk = new_token();
    let options = AgentOptions {
        session_consent_origins: vec![PORTAL.into()],
        pin_cache_seconds: 300,
        ..AgentOptions::default()
    };
    let agent = Agent::start(&tk, options).unwrap();
    let mut client = agent.connect(PORTAL).await.unwrap();
    let ids = certificate_ids(&mut client, &tk).await.unwrap();
    // One "Log in" with the PIN.
    agent.script().push(&Step::pin(USER_PIN)).unwrap();
    client
        .call_ok("authenticate", json!({"challenge": nonce(32).unwrap()}))
        .await
        .unwrap();
    assert_eq!(agent.script().dialogs().unwrap().len(), 1);
    // A signature is another kind: its own consent dialog (the token is still logged in).
    agent.script().push(&Step::confirm(Button::Ok)).unwrap();
    client
        .call_ok(
            "sign",
            sign_digest(&ids["sign-p256"], &[1; 32], "Contract A"),
        )
        .await
        .unwrap();
    let dialogs = agent.script().dialogs().unwrap();
    assert_eq!(dialogs.len(), 2, "{dialogs:?}");
    assert!(dialogs[1]
        .description
        .as_deref()
        .unwrap_or_default()
        .contains("Contract A"));
    // The same kind with the same certificate: the session consent holds.
    client
        .call_ok(
            "sign",
            sign_digest(&ids["sign-p256"], &[2; 32], "Contract B"),
        )
        .await
        .unwrap();
    assert_eq!(agent.script().dialogs().unwrap().len(), 2);
    // Another certificate: asked again, for a signature and for a 1 000-item batch. Declined
    // here, so nothing is signed.
    agent.script().push(&Step::cancel()).unwrap();
    client
        .call_err(
            "sign",
            sign_digest(&ids["sign-rsa2048"], &[3; 32], "Other key"),
            "USER_CANCELLED",
        )
        .await
        .unwrap();
    agent.script().push(&Step::cancel()).unwrap();
    let items: Vec<Value> = (0..1000u32)
        .map(|i| json!({"digest": {"algorithm": "SHA-256", "value": b64(&sha256(&i.to_be_bytes()))}}))
        .collect();
    client
        .call_err(
            "sign.batch",
            json!({"certificateId": ids["sign-rsa2048"], "items": items, "display": {"title": "Batch"}}),
            "USER_CANCELLED",
        )
        .await
        .unwrap();
    assert_eq!(agent.script().dialogs().unwrap().len(), 4);
    // A batch with the certificate the user agreed to is the same kind: covered.
    let items: Vec<Value> = (0..10u32)
        .map(|i| json!({"digest": {"algorithm": "SHA-256", "value": b64(&sha256(&i.to_be_bytes()))}}))
        .collect();
    client
        .call_ok(
            "sign.batch",
            json!({"certificateId": ids["sign-p256"], "items": items, "display": {"title": "Batch"}}),
        )
        .await
        .unwrap();
    assert_eq!(agent.script().dialogs().unwrap().len(), 4);
}

/// Finding 5 (connections): idle TCP connections that never handshake cannot take the
/// descriptors the token's module needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_05_a_flood_of_idle_sockets_before_the_handshake_is_capped() {
    let tk = new_token();
    let options = AgentOptions {
        max_open_files: Some(64),
        // Longer than the test: a socket closed here was closed by the cap, not a timeout.
        limits: vec!["handshake_timeout_seconds = 120".into()],
        ..AgentOptions::default()
    }
    .steps([Step::pin(USER_PIN)]);
    let agent = Agent::start(&tk, options).unwrap();
    let port = agent.port();
    // Twice the descriptors the agent has, all held open, none sending a byte.
    let mut idle = Vec::new();
    for _ in 0..128 {
        idle.push(std::net::TcpStream::connect(("127.0.0.1", port)).unwrap());
    }
    let mut client = agent.connect(PORTAL).await.unwrap();
    let list = client.call_ok("tokens.list", json!({})).await.unwrap();
    assert_eq!(list["tokens"].as_array().map(Vec::len), Some(1), "{list}");
    let ids = certificate_ids(&mut client, &tk).await.unwrap();
    client
        .call_ok(
            "sign",
            sign_digest(&ids["sign-p256"], &[5; 32], "Under flood"),
        )
        .await
        .unwrap();
    // The flood was closed by the agent (the oldest evicted by newer ones), not left to time
    // out: all but the 16 newest read EOF.
    let mut closed = vec![false; idle.len()];
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while closed.iter().filter(|c| **c).count() < 128 - 16 && std::time::Instant::now() < deadline {
        for (s, c) in idle.iter_mut().zip(closed.iter_mut()).filter(|(_, c)| !**c) {
            s.set_read_timeout(Some(Duration::from_millis(5))).unwrap();
            let mut b = [0u8; 1];
            *c = match s.read(&mut b) {
                Ok(0) => true,
                Err(e) => !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                Ok(_) => false,
            };
        }
    }
    let closed = closed.iter().filter(|c| **c).count();
    assert!(
        closed >= 128 - 16,
        "only {closed} of 128 idle sockets were closed"
    );
}

/// Finding 5 (module), deterministic: a module that starts failing with CKR_GENERAL_ERROR is
/// finalised and initialised again, and its token listed again, without a restart. SoftHSM does
/// this once the process ran out of descriptors and keeps failing until C_Initialize
/// (TEST-RIG-FACTS); the fault module reproduces exactly that (`general_error=1`, latched until
/// C_Initialize). The next test reproduces it with SoftHSM itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_05_a_module_failing_with_general_error_is_reinitialised() {
    let tk = new_token();
    let agent = Agent::start(&tk, AgentOptions::default().fault()).unwrap();
    let mut client = agent.connect(PORTAL).await.unwrap();
    let ids = certificate_ids(&mut client, &tk).await.unwrap();
    let inits_before = agent.fault_calls("C_Initialize");
    agent.set_fault("general_error=1\n").unwrap();
    let during = client.call_ok("tokens.list", json!({})).await.unwrap();
    assert_eq!(during["tokens"], json!([]), "{during}");
    // The cause is gone (descriptors free again); the module still fails until re-initialised.
    agent.set_fault("").unwrap();
    let list = client.call_ok("tokens.list", json!({})).await.unwrap();
    assert_eq!(list["tokens"].as_array().map(Vec::len), Some(1), "{list}");
    assert!(agent.fault_calls("C_Initialize") > inits_before);
    assert!(agent.fault_calls("C_Finalize") >= 1);
    agent.script().push(&Step::pin(USER_PIN)).unwrap();
    client
        .call_ok("sign", sign_digest(&ids["sign-p256"], &[6; 32], "After"))
        .await
        .unwrap();
}

/// Finding 5 (module): SoftHSM, initialised again while still out of descriptors, keeps the
/// objects it could not read then: C_FindObjects returns them, C_GetAttributeValue calls them
/// CKR_OBJECT_HANDLE_INVALID until the next C_Initialize. A module answering so is initialised
/// again, and its certificates come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_05_objects_a_module_cannot_read_come_back_after_reinitialising() {
    let tk = new_token();
    let agent = Agent::start(&tk, AgentOptions::default().fault()).unwrap();
    let mut client = agent.connect(PORTAL).await.unwrap();
    agent.set_fault("unreadable_objects=1\n").unwrap();
    let during = client
        .call_ok("certificates.list", json!({}))
        .await
        .unwrap();
    assert_eq!(during["certificates"], json!([]), "{during}");
    let inits_before = agent.fault_calls("C_Initialize");
    // The cause is gone; the module still cannot read them until it is initialised again.
    agent.set_fault("").unwrap();
    let ids = certificate_ids(&mut client, &tk).await.unwrap();
    assert!(agent.fault_calls("C_Initialize") > inits_before);
    assert!(agent
        .stderr()
        .contains("the module found objects it could not read"));
    agent.script().push(&Step::pin(USER_PIN)).unwrap();
    client
        .call_ok("sign", sign_digest(&ids["sign-p256"], &[8; 32], "After"))
        .await
        .unwrap();
}

/// Finding 5 (module), the review's own way: with the handshake cap lifted, a continuous flood
/// of silent sockets under a low descriptor limit makes SoftHSM fail (CKR_GENERAL_ERROR) while it
/// lasts; once it stops, the module is re-initialised and the token is back without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_05_descriptor_exhaustion_then_recovery_without_a_restart() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let tk = new_token();
    let options = AgentOptions {
        max_open_files: Some(48),
        limits: vec![
            "max_pending_handshakes = 10000".into(),
            "handshake_timeout_seconds = 60".into(),
            "requests_per_second = 1000".into(),
        ],
        // The module inside the agent: in a module host it has descriptors of its own, and the
        // agent's running out of them never reaches it (what isolation is for).
        extra_toml: vec!["module_isolation = false".into()],
        ..AgentOptions::default()
    };
    let agent = Agent::start(&tk, options).unwrap();
    let port = agent.port();
    let mut client = agent.connect(PORTAL).await.unwrap();
    let ids = certificate_ids(&mut client, &tk).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let flood = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut held = std::collections::VecDeque::new();
            while !stop.load(Ordering::SeqCst) {
                if let Ok(s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                    held.push_back(s);
                }
                if held.len() > 400 {
                    held.pop_front();
                }
            }
        })
    };
    // While the flood lasts, a listing finds the module failing.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let during = client.call_ok("tokens.list", json!({})).await.unwrap();
        if during["tokens"] == json!([]) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the flood never made the module fail"
        );
    }
    stop.store(true, Ordering::SeqCst);
    flood.join().unwrap();
    // The flood is over: its sockets are closed, and the agent closes its ends as it accepts
    // them and reads their EOF (until then SoftHSM may still find no descriptor to open its
    // files). Only this test's own connection is left then.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while connections_to(port) > 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent kept {} of the flood's connections",
            connections_to(port)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The token and its certificates come back without a restart (SoftHSM, initialised again
    // while still short of descriptors, can keep objects it could not read: the agent then
    // initialises it once more).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let list = client
            .call_ok("certificates.list", json!({}))
            .await
            .unwrap();
        let listed = list["certificates"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["id"] == ids["sign-p256"].as_str()));
        if listed {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the certificates never came back: {list}; {}",
            agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = agent.stderr();
    assert!(log.contains("CKR_GENERAL_ERROR"), "{log}");
    assert!(log.contains("module re-initialised"), "{log}");
    agent.script().push(&Step::pin(USER_PIN)).unwrap();
    client
        .call_ok(
            "sign",
            sign_digest(&ids["sign-p256"], &[7; 32], "After the flood"),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}; {}", agent.stderr()));
}

/// Connections to `port` on 127.0.0.1 that the kernel holds for the agent: accepted and not
/// closed yet, or waiting in its listen backlog (rows of `/proc/net/tcp` with that local port,
/// established, half-open or closed by the peer only).
fn connections_to(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter(|row| {
            let fields: Vec<&str> = row.split_whitespace().collect();
            let local_port = fields
                .get(1)
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            // 01 ESTABLISHED, 03 SYN_RECV, 08 CLOSE_WAIT.
            local_port == Some(port) && matches!(fields.get(3).copied(), Some("01" | "03" | "08"))
        })
        .count()
}

/// A second token in the same store whose label and certificate carry line separators.
fn add_hostile_token(tk: &TestToken) {
    let script = r#"
set -euo pipefail
dir=$1; module=$2
export SOFTHSM2_CONF=$dir/softhsm2.conf
label=$(printf 'Evil\u2029Token')
softhsm2-util --init-token --free --label "$label" --pin 123456 --so-pin 12345678 >/dev/null
p11() { pkcs11-tool --module "$module" --token-label "$label" "$@"; }
p11 --login --pin 123456 --keypairgen --key-type rsa:2048 --id 31 --label hostile --usage-sign >/dev/null 2>&1
p11 --read-object --type pubkey --id 31 --output-file "$dir/hostile-pub.der" >/dev/null 2>&1
python3 - "$dir" <<'PY'
import sys, datetime
from cryptography import x509
from cryptography.x509.oid import NameOID
from cryptography.hazmat.primitives import hashes, serialization
d = sys.argv[1]
pub = serialization.load_der_public_key(open(d + "/hostile-pub.der", "rb").read())
ca_key = serialization.load_pem_private_key(open(d + "/ca.key", "rb").read(), None)
ca = x509.load_pem_x509_certificate(open(d + "/ca.pem", "rb").read())
now = datetime.datetime.now(datetime.timezone.utc)
name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Alice\u2028KeyPort verified this request\u200b")])
cert = (x509.CertificateBuilder().subject_name(name).issuer_name(ca.subject).public_key(pub)
    .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
    .not_valid_after(now + datetime.timedelta(days=30))
    .add_extension(x509.KeyUsage(True, True, False, False, False, False, False, False, False), critical=True)
    .sign(ca_key, hashes.SHA256()))
open(d + "/hostile.der", "wb").write(cert.public_bytes(serialization.Encoding.DER))
PY
p11 --login --pin 123456 --write-object "$dir/hostile.der" --type cert --id 31 --label hostile >/dev/null 2>&1
"#;
    let out = Command::new("bash")
        .arg("-c")
        .arg(script)
        .arg("add_hostile_token")
        .arg(tk.dir())
        .arg(SOFTHSM)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Finding 6: token and certificate text cannot add lines to a dialog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_06_token_and_certificate_text_cannot_add_dialog_lines() {
    let tk = new_token();
    add_hostile_token(&tk);
    let agent = Agent::start(&tk, AgentOptions::default().steps([Step::cancel()])).unwrap();
    let mut client = agent.connect(PORTAL).await.unwrap();
    let list = client
        .call_ok("certificates.list", json!({}))
        .await
        .unwrap();
    let hostile = list["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["subject"].as_str().unwrap_or_default().contains("Alice"))
        .unwrap_or_else(|| panic!("the hostile certificate is listed: {list}"));
    let id = hostile["id"].as_str().unwrap();
    client
        .call_err(
            "sign",
            sign_digest(id, &[6; 32], "Invoice"),
            "USER_CANCELLED",
        )
        .await
        .unwrap();
    let dialogs = agent.script().dialogs().unwrap();
    assert_eq!(dialogs.len(), 1);
    let text = dialogs[0].description.clone().unwrap_or_default();
    for c in ['\u{2028}', '\u{2029}', '\u{200B}'] {
        assert!(
            !text.contains(c),
            "U+{:04X} reached SETDESC: {text:?}",
            u32::from(c)
        );
    }
    assert!(
        text.contains("«AliceKeyPort verified this request»"),
        "{text}"
    );
    assert!(text.contains("«EvilToken»"), "{text}");
}

/// Finding 7: page text that shows nothing is refused; invisible characters never reach a
/// dialog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_07_invisible_page_text_is_refused_or_removed() {
    let tk = new_token();
    let agent = Agent::start(&tk, AgentOptions::default().steps([Step::cancel()])).unwrap();
    let mut client = agent.connect(PORTAL).await.unwrap();
    let ids = certificate_ids(&mut client, &tk).await.unwrap();
    let id = &ids["sign-p256"];
    for blank in [
        "\u{3164}",
        "\u{2800}",
        "\u{200B}\u{200C}\u{200D}",
        "\u{2060}\u{FEFF}\u{00AD}",
        "\u{E0049}\u{E006E}\u{E0076}",
        "\u{3164} \u{2800}",
        "\u{115F}\u{FFA0}",
    ] {
        client
            .call_err("sign", sign_digest(id, &[7; 32], blank), "INVALID_PARAMS")
            .await
            .unwrap_or_else(|e| panic!("{blank:?}: {e}"));
    }
    assert!(agent.script().dialogs().unwrap().is_empty());
    let hidden = "In\u{200B}voi\u{00AD}ce\u{E0041} 7\u{2060}7";
    let mut params = sign_digest(id, &[7; 32], hidden);
    params["display"]["summary"] = json!("\u{FEFF}Loan\u{200D} of 10");
    client
        .call_err("sign", params, "USER_CANCELLED")
        .await
        .unwrap();
    let dialogs = agent.script().dialogs().unwrap();
    assert_eq!(dialogs.len(), 1);
    let text = dialogs[0].description.clone().unwrap_or_default();
    assert!(text.contains("«Invoice 77»"), "{text}");
    assert!(text.contains("«Loan of 10»"), "{text}");
}

fn verify_output(agent: &Agent) -> (Option<i32>, String) {
    let out = agent.keyport(&["audit", "--verify"]).unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Finding 8: cutting or emptying the log shows; nothing after a break passes as verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_08_audit_truncation_and_forgery_after_a_break_show() {
    let tk = new_token();
    let mut agent = Agent::start(&tk, AgentOptions::default()).unwrap();
    let mut client = agent.connect(PORTAL).await.unwrap();
    let ids = certificate_ids(&mut client, &tk).await.unwrap();
    for i in 0..4u8 {
        agent.script().push(&Step::pin(USER_PIN)).unwrap();
        client
            .call_ok("sign", sign_digest(&ids["sign-p256"], &[i; 32], "Logged"))
            .await
            .unwrap();
    }
    agent.stop().unwrap();
    let whole = std::fs::read_to_string(agent.audit_log()).unwrap();
    let lines: Vec<&str> = whole.lines().collect();
    assert_eq!(lines.len(), 4);
    assert_eq!(verify_output(&agent).0, Some(0));

    // The last line cut.
    std::fs::write(agent.audit_log(), lines[..3].join("\n") + "\n").unwrap();
    let (code, report) = verify_output(&agent);
    assert_eq!(code, Some(1), "{report}");
    assert!(
        report.contains("ends at seq 3 but seq 4 was written"),
        "{report}"
    );
    // The agent will not chain on from a cut log.
    let restart = Command::new(keyport_bin())
        .arg("--config")
        .arg(agent.config_path())
        .arg("run")
        .env("SOFTHSM2_CONF", tk.conf())
        .output()
        .unwrap();
    assert!(!restart.status.success());
    assert!(
        String::from_utf8_lossy(&restart.stderr).contains("the end of the log was removed"),
        "{}",
        String::from_utf8_lossy(&restart.stderr)
    );

    // Emptied.
    std::fs::write(agent.audit_log(), "").unwrap();
    let (code, report) = verify_output(&agent);
    assert_eq!(code, Some(1), "{report}");
    assert!(
        report.contains("ends at seq 0 but seq 4 was written"),
        "{report}"
    );
    // Removed.
    std::fs::remove_file(agent.audit_log()).unwrap();
    let (code, report) = verify_output(&agent);
    assert_eq!(code, Some(1), "{report}");

    // One garbage line, then a forged line: the forged one is not passed as verified.
    let forged = lines[2].replace(PORTAL, "https://forged.example");
    let tampered = [lines[0], "garbage", &forged, lines[3]].join("\n") + "\n";
    std::fs::write(agent.audit_log(), tampered).unwrap();
    let (code, report) = verify_output(&agent);
    assert_eq!(code, Some(1), "{report}");
    assert!(
        report.contains("line 2: not a valid audit line"),
        "{report}"
    );
    assert!(
        report.contains("lines 3-4: not verifiable after the break at line 2"),
        "{report}"
    );
}

/// Finding 9: no writing through links, private folders whatever the umask, and no config
/// another user could change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_09_links_modes_and_files_others_may_write() {
    let tk = new_token();
    let scratch = tempfile::tempdir().unwrap();
    let victim = scratch.path().join("victim");
    std::fs::write(&victim, "precious\n").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();

    // A link at audit_log: the agent refuses to start and the target is untouched.
    let link = scratch.path().join("audit.log");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    let options = AgentOptions {
        audit_log: Some(link),
        ..AgentOptions::default()
    };
    let err = Agent::start(&tk, options).unwrap_err().to_string();
    assert!(err.contains("symbolic link"), "{err}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    assert_eq!(
        std::fs::metadata(&victim).unwrap().permissions().mode() & 0o777,
        0o644
    );

    // A link at origins.toml.tmp: `keyport origins allow` writes its own file, not the target.
    let agent = Agent::start(&tk, AgentOptions::default()).unwrap();
    std::os::unix::fs::symlink(&victim, agent.dir().join("origins.toml.tmp")).unwrap();
    let out = agent
        .keyport(&["origins", "allow", "https://a.example"])
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    let origins = std::fs::read_to_string(agent.origins_file()).unwrap();
    assert!(origins.contains("https://a.example"), "{origins}");
    assert_eq!(
        std::fs::metadata(agent.origins_file())
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );

    // umask 000: the configuration folder is still 0700 (the per-user folder, made on first use).
    let xdg = scratch.path().join("xdg");
    let fresh = xdg.join("keyport");
    let out = Command::new("sh")
        .arg("-c")
        .arg("umask 000; exec \"$0\" origins allow https://b.example")
        .arg(keyport_bin())
        .env("XDG_CONFIG_HOME", &xdg)
        .env("XDG_DATA_HOME", scratch.path().join("xdg-data"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777,
        0o700
    );
    assert_eq!(
        std::fs::metadata(fresh.join("origins.toml"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );

    // A configuration file others may write: refused, with the fix.
    for mode in [0o666, 0o646, 0o664] {
        let options = AgentOptions {
            config_mode: Some(mode),
            ..AgentOptions::default()
        };
        let err = Agent::start(&tk, options).unwrap_err().to_string();
        assert!(err.contains("chmod go-w"), "{mode:o}: {err}");
    }
    // And an origins file others may write.
    std::fs::set_permissions(agent.origins_file(), std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = agent.keyport(&["origins", "list"]).unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("chmod go-w"));
}

/// Finding 10: another local user's process cannot use the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_10_a_peer_socket_of_another_user_is_refused() {
    let tk = new_token();
    let agent = Agent::start(&tk, AgentOptions::default()).unwrap();
    let port = agent.port();
    let request = upgrade_request(Some(&format!("127.0.0.1:{port}")), Some(PORTAL));
    // This user: upgraded.
    assert_eq!(http_exchange(port, &request).unwrap().0, 101);
    // uid 1001 (no such account is needed): refused before its request is read.
    let client = r#"
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(sys.argv[2].encode())
data = b""
while b"\r\n\r\n" not in data:
    chunk = s.recv(4096)
    if not chunk:
        break
    data += chunk
print(data.split(b"\r\n")[0].decode() if data else "closed")
"#;
    for (v4, host) in [(true, "127.0.0.1"), (false, "::1")] {
        let code = if v4 {
            client.to_owned()
        } else {
            client.replace("\"127.0.0.1\"", "\"::1\"")
        };
        let out = Command::new("setpriv")
            .args([
                "--reuid=1001",
                "--regid=1001",
                "--clear-groups",
                "/usr/bin/python3",
                "-c",
                &code,
            ])
            .arg(port.to_string())
            .arg(&request)
            .output()
            .unwrap();
        let line = String::from_utf8_lossy(&out.stdout);
        assert!(
            line.contains("403"),
            "{host}: {line} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(
        agent.stderr().contains("another user"),
        "{}",
        agent.stderr()
    );
    assert!(agent.script().dialogs().unwrap().is_empty());
}

/// Finding 11: JSON and wire quirks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_11_json_and_wire_quirks() {
    let tk = new_token();
    let agent = Agent::start(&tk, AgentOptions::default()).unwrap();
    let mut client = agent.connect(PORTAL).await.unwrap();
    let ids = certificate_ids(&mut client, &tk).await.unwrap();
    let sign = sign_digest(&ids["sign-p256"], &[1; 32], "Dup");
    // A PIN in a repeated member that a later one would have replaced.
    client
        .send_raw(&format!(
            r#"{{"jsonrpc":"2.0","id":7,"method":"sign","params":{{"pin":"1"}},"params":{sign}}}"#
        ))
        .await
        .unwrap();
    let answer = client.next_json().await.unwrap();
    assert_eq!(
        answer["error"]["data"]["reason"], "PIN_FROM_PAGE_REFUSED",
        "{answer}"
    );
    // Repeated members: INVALID_REQUEST, and the id is not trusted.
    for text in [
        r#"{"jsonrpc":"2.0","id":8,"method":"hello","method":"tokens.list"}"#.to_owned(),
        r#"{"jsonrpc":"2.0","id":9,"method":"sign","params":{"certificateId":"a","certificateId":"b"}}"#.to_owned(),
        r#"{"jsonrpc":"2.0","id":10,"id":11,"method":"hello"}"#.to_owned(),
    ] {
        client.send_raw(&text).await.unwrap();
        let answer = client.next_json().await.unwrap();
        assert_eq!(
            answer["error"]["data"]["reason"], "INVALID_REQUEST",
            "{text}: {answer}"
        );
        assert_eq!(answer["id"], Value::Null, "{text}: {answer}");
    }
    // Ids beyond ±(2^53 − 1): INVALID_REQUEST; the largest safe one comes back exactly.
    for id in [
        "9007199254740992",
        "-9007199254740992",
        "18446744073709551616",
        "1.5",
    ] {
        client
            .send_raw(&format!(
                r#"{{"jsonrpc":"2.0","id":{id},"method":"hello"}}"#
            ))
            .await
            .unwrap();
        let answer = client.next_json().await.unwrap();
        assert_eq!(
            answer["error"]["data"]["reason"], "INVALID_REQUEST",
            "{id}: {answer}"
        );
        assert_eq!(answer["id"], Value::Null);
    }
    client
        .send_raw(r#"{"jsonrpc":"2.0","id":9007199254740991,"method":"hello"}"#)
        .await
        .unwrap();
    let raw = client.next_message().await.unwrap().into_text().unwrap();
    assert!(raw.contains(r#""id":9007199254740991"#), "{raw}");
    // Ed25519 with a hash: refused, whether the algorithm is named or comes from the key.
    for extra in [json!({}), json!({"signatureAlgorithm": "Ed25519"})] {
        let mut p = json!({
            "certificateId": ids["sign-ed25519"],
            "data": b64(b"document"),
            "hash": "SHA-256",
            "display": {"title": "Ed"},
        });
        p.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        client
            .call_err("sign", p, "INVALID_PARAMS")
            .await
            .unwrap_or_else(|e| panic!("{extra}: {e}"));
    }
    assert!(agent.script().dialogs().unwrap().is_empty());
    // Invalid UTF-8 in a text frame: 1007.
    let mut bad = agent.connect(PORTAL).await.unwrap();
    bad.send_frame(Frame::message(
        vec![b'"', 0xff, 0xfe, b'"'],
        OpCode::Data(Data::Text),
        true,
    ))
    .await
    .unwrap();
    assert_eq!(bad.wait_closed().await.unwrap(), Closed::Code(1007));
    // A protocol violation (a reserved bit with no extension): 1002.
    let mut bad = agent.connect(PORTAL).await.unwrap();
    let mut frame = Frame::message(b"{}".to_vec(), OpCode::Data(Data::Text), true);
    frame.header_mut().rsv1 = true;
    bad.send_frame(frame).await.unwrap();
    assert_eq!(bad.wait_closed().await.unwrap(), Closed::Code(1002));
    // An internal failure reaches the page as fixed text with its request id: here the user's
    // "Allow always" cannot be saved (a folder stands where the temporary file goes).
    std::fs::create_dir(agent.dir().join("origins.toml.tmp")).unwrap();
    std::fs::write(agent.dir().join("origins.toml.tmp/x"), "").unwrap();
    agent.script().push(&Step::confirm(Button::Notok)).unwrap();
    let mut stranger = agent.connect("https://stranger.example").await.unwrap();
    let id = stranger
        .send("origin.requestAccess", json!({}))
        .await
        .unwrap();
    let e = stranger.response(id).await.unwrap().unwrap_err();
    assert_eq!(e.reason, "INTERNAL");
    assert_eq!(
        e.message,
        format!("internal error in the agent (request {id}); its log has the details")
    );
    assert_eq!(e.data, json!({"reason": "INTERNAL"}));
    let dir = agent.dir().to_string_lossy().into_owned();
    assert!(agent.stderr().contains(&dir), "the detail is in the log");
}

/// Finding 12: configured origins are parsed as the handshake parses them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_12_configured_origins_that_could_never_match_are_refused_at_start() {
    let tk = new_token();
    for bad in [
        "https://Evil.example",
        "https://evil.example:443",
        "https://evil.example/",
        "https://evil.example.",
    ] {
        let options = AgentOptions {
            denied_origins: vec![bad.into()],
            ..AgentOptions::default()
        };
        let err = Agent::start(&tk, options).unwrap_err().to_string();
        assert!(
            err.contains(&format!("{bad:?} is not an origin")),
            "{bad}: {err}"
        );
    }
    // The canonical spelling loads, and denies.
    let options = AgentOptions {
        denied_origins: vec!["https://evil.example".into()],
        ..AgentOptions::default()
    };
    let agent = Agent::start(&tk, options).unwrap();
    let refused = Client::try_connect(agent.port(), Some("https://evil.example"), None)
        .await
        .unwrap();
    assert_eq!(refused.err(), Some(403));
}
