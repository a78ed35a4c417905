//! Certificates stored or removed by another program while the agent runs: `pkcs11-tool`, and
//! `keyport certs import` / `keyport certs remove` on the command line beside the daemon. PKCS#11
//! reports no such change, so the agent's listing must notice it by itself: after a listing has
//! filled the agent's cache (and the module worker's scan), `certificates.list` shows the change
//! once its cache has aged (`CERTIFICATES_FRESH`, 1 s), with no event, login or restart. Before
//! that bound existed the old list was served for as long as the agent ran.
#![allow(clippy::unwrap_used)] // a test fails by panicking

use std::path::Path;
use std::process::Command as Process;
use std::time::Duration;

use keyport_e2e::harness::{
    certificates_until, unb64, Agent, AgentOptions, Client, TestToken, PORTAL, SOFTHSM, USER_PIN,
};
use keyport_e2e::pinentry::{Command, Step};
use serde_json::{json, Value};

/// Far beyond the agent's 1 s bound; the poll below ends as soon as the list shows the change.
const DEADLINE: Duration = Duration::from_secs(15);

/// The DER of every listed certificate.
fn listed(list: &Value) -> Vec<Vec<u8>> {
    list["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| unb64(&c["certificate"]).unwrap())
        .collect()
}

/// Lists until `done` holds for the DER of the listed certificates; returns that list.
async fn list_until(client: &mut Client, what: &str, done: impl Fn(&[Vec<u8>]) -> bool) -> Value {
    certificates_until(client, what, DEADLINE, |list| done(&listed(list)))
        .await
        .unwrap()
}

fn pkcs11_tool(tk: &TestToken, args: &[&str]) {
    let out = Process::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", tk.conf())
        .args(["--module", SOFTHSM, "--login", "--pin", USER_PIN])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pkcs11-tool {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn openssl(args: &[&str], dir: &Path) {
    let out = Process::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Lists twice, so that the second answer comes from the agent's cache.
async fn list_twice(client: &mut Client) -> Vec<Vec<u8>> {
    client
        .call_ok("certificates.list", json!({}))
        .await
        .unwrap();
    listed(
        &client
            .call_ok("certificates.list", json!({}))
            .await
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_pkcs11_tool_removes_or_stores_leaves_or_joins_the_list() {
    let tk = TestToken::provision().unwrap();
    let agent = Agent::start(&tk, AgentOptions::default()).unwrap();
    let mut client = agent.connect(PORTAL).await.unwrap();
    let p256 = tk.cert_der("sign-p256").unwrap();
    let before = list_twice(&mut client).await;
    assert!(before.contains(&p256));
    let tokens = client.call_ok("tokens.list", json!({})).await.unwrap();
    let p256_id = format!("{}/03", tokens["tokens"][0]["id"].as_str().unwrap());

    pkcs11_tool(&tk, &["--delete-object", "--type", "cert", "--id", "03"]);
    let list = list_until(&mut client, "certificate removed", |l| !l.contains(&p256)).await;
    // Only that one went, and a signature with it is refused as the list says, before any
    // dialog.
    assert_eq!(listed(&list).len(), before.len() - 1);
    client
        .call_err(
            "sign",
            json!({"certificateId": p256_id, "data": "AA==", "display": {"title": "Gone"}}),
            "CERTIFICATE_NOT_FOUND",
        )
        .await
        .unwrap();
    assert!(agent.script().dialogs().unwrap().is_empty());

    let der = tk.dir().join("certs").join("sign-p256.der");
    pkcs11_tool(
        &tk,
        &[
            "--write-object",
            der.to_str().unwrap(),
            "--type",
            "cert",
            "--id",
            "03",
            "--label",
            "sign-p256",
        ],
    );
    let list = list_until(&mut client, "certificate stored", |l| l.contains(&p256)).await;
    assert_eq!(listed(&list).len(), before.len());
    // Under its old id: the key is paired with the certificate stored again.
    let id = list["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| unb64(&c["certificate"]).unwrap() == p256)
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .unwrap();
    assert_eq!(id, p256_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyport_certs_import_and_remove_beside_the_daemon_show_in_its_list() {
    let tk = TestToken::provision().unwrap();
    let agent = Agent::start(&tk, AgentOptions::default()).unwrap();
    let mut client = agent.connect(PORTAL).await.unwrap();
    let tokens = client.call_ok("tokens.list", json!({})).await.unwrap();
    let token = tokens["tokens"][0]["id"].as_str().unwrap().to_owned();
    let old = tk.cert_der("sign-p256").unwrap();
    let before = list_twice(&mut client).await;
    assert!(before.contains(&old));

    // A renewal for the same key: the test CA certifies the old certificate's public key again
    // (a throwaway key's request carries the subject; -force_pubkey puts the token's key in).
    let work = tempfile::tempdir().unwrap();
    std::fs::write(
        work.path().join("ext.cnf"),
        "[ext]\nkeyUsage=critical,digitalSignature,nonRepudiation\n",
    )
    .unwrap();
    let (ca, ca_key) = (tk.ca_pem(), tk.dir().join("ca.key"));
    let old_pem = tk.cert_pem("sign-p256");
    openssl(
        &[
            "x509",
            "-in",
            old_pem.to_str().unwrap(),
            "-pubkey",
            "-noout",
            "-out",
            "pub.pem",
        ],
        work.path(),
    );
    openssl(
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "throwaway.key",
            "-subj",
            "/CN=Test Signer P-256/O=KeyPort Test",
            "-out",
            "req.pem",
        ],
        work.path(),
    );
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            "req.pem",
            "-force_pubkey",
            "pub.pem",
            "-CA",
            ca.to_str().unwrap(),
            "-CAkey",
            ca_key.to_str().unwrap(),
            "-set_serial",
            "77",
            "-days",
            "30",
            "-extfile",
            "ext.cnf",
            "-extensions",
            "ext",
            "-outform",
            "DER",
            "-out",
            "renewed.der",
        ],
        work.path(),
    );
    let renewed_path = work.path().join("renewed.der");
    let renewed = std::fs::read(&renewed_path).unwrap();

    // `keyport certs import` in its own process, beside the running daemon.
    agent
        .script()
        .push(&Step::pin(USER_PIN).expect(Command::GetPin))
        .unwrap();
    let out = agent
        .keyport_with_dialogs(&[
            "certs",
            "import",
            "--token",
            &token,
            "--in",
            renewed_path.to_str().unwrap(),
        ])
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = list_until(&mut client, "renewal imported", |l| {
        l.contains(&renewed) && l.contains(&old)
    })
    .await;
    assert_eq!(listed(&list).len(), before.len() + 1);
    let old_id = list["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| unb64(&c["certificate"]).unwrap() == old)
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .unwrap();

    // `keyport certs remove` of the old one: the daemon stops listing it.
    agent
        .script()
        .push(&Step::pin(USER_PIN).expect(Command::GetPin))
        .unwrap();
    let out = agent
        .keyport_with_dialogs(&[
            "certs",
            "remove",
            "--token",
            &token,
            "--certificate",
            &old_id,
        ])
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = list_until(&mut client, "old certificate removed", |l| {
        !l.contains(&old) && l.contains(&renewed)
    })
    .await;
    assert_eq!(listed(&list).len(), before.len());
    // The renewal now carries the key's id, as `certificates.import` promises.
    let renewed_id = list["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| unb64(&c["certificate"]).unwrap() == renewed)
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .unwrap();
    assert_eq!(renewed_id, old_id);
}
