//! SKF libraries in their own process (`module_isolation = true`): the soft SKF library
//! crashes (SIGSEGV, abort, exit) in SKF_ECCSignData and in SKF_EnumDev, hangs, or deadlocks for
//! good, during `sign`, `sign.batch` and `tokens.list`. The agent answers the documented error
//! within the deadline, stays up and serves another origin meanwhile, restarts the library
//! host, reports the key's going and coming back with `tokens.changed`, and the next request
//! signs an SM2 signature that OpenSSL and gmssl verify; the audit log records each failure and
//! `keyport audit --verify` passes. Repeated crashes leave no zombie and no descriptor behind.
#![allow(clippy::unwrap_used)] // a test fails by panicking

#[path = "../../skf-shim/tests/support/verify.rs"]
mod verify;

use std::time::{Duration, Instant};

use keyport_e2e::harness::{b64, unb64, Agent, AgentOptions, Client, TestToken, DEADLINE, PORTAL};
use keyport_e2e::pinentry::Step;
use keyport_e2e::skf::{SoftSkfStore, SKF_SM2_HOLDER, SKF_USER_PIN};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// The agent's `token_wait_seconds`: the deadline of each call to a library host.
const TOKEN_WAIT: u64 = 2;
/// A second approved origin, served while the first one's library host fails.
const OTHER: &str = "https://other.example";
/// The soft SKF key's label.
const KEY_LABEL: &str = "KeyPort SM2 Key";
const DEFAULT_ID: &str = "1234567812345678";

struct Rig {
    // Fields drop in order: the agent stops before the stores go.
    agent: Agent,
    client: Client,
    store: SoftSkfStore,
    /// The SM2 signing certificate's id.
    id: String,
    _token: TestToken,
}

async fn start() -> Rig {
    let token = TestToken::provision().unwrap();
    let store = SoftSkfStore::provision().unwrap();
    let options = AgentOptions {
        token_wait_seconds: Some(TOKEN_WAIT),
        extra_toml: vec!["module_isolation = true".into()],
        ..AgentOptions::default().skf(&store)
    }
    .allowed(&[PORTAL, OTHER]);
    let agent = Agent::start(&token, options).unwrap();
    let mut client = agent.connect(PORTAL).await.unwrap();
    let list = client
        .call_ok("certificates.list", json!({}))
        .await
        .unwrap();
    let id = list["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| {
            c["subject"]
                .as_str()
                .unwrap()
                .contains(&format!("CN={SKF_SM2_HOLDER},"))
                && c["keyAlgorithm"] == "SM2"
        })
        .unwrap_or_else(|| panic!("no SM2 certificate in {list}"))["id"]
        .as_str()
        .unwrap()
        .to_owned();
    Rig {
        agent,
        client,
        store,
        id,
        _token: token,
    }
}

fn sign_params(id: &str, data: &[u8]) -> Value {
    json!({"certificateId": id, "data": b64(data), "display": {"title": "隔离测试"}})
}

fn has_key(tokens: &Value) -> bool {
    tokens
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["label"] == KEY_LABEL)
}

/// Waits (bounded) for a `tokens.changed` event whose list does (`present`) or does not hold
/// the SKF key. Call with no request in flight on `client`.
async fn tokens_changed(client: &mut Client, present: bool) {
    let until = Instant::now() + DEADLINE;
    let mut checked = 0;
    loop {
        for e in &client.notifications[checked..] {
            if e["method"] == "tokens.changed" && has_key(&e["params"]["tokens"]) == present {
                client.notifications.clear();
                return;
            }
        }
        checked = client.notifications.len();
        let left = until.saturating_duration_since(Instant::now());
        let message = tokio::time::timeout(left, client.next_message())
            .await
            .unwrap_or_else(|_| panic!("no tokens.changed with the key present={present}"))
            .unwrap();
        if let Message::Text(text) = message {
            let value: Value = serde_json::from_str(text.as_str()).unwrap();
            assert!(
                value.get("id").is_none(),
                "no request is in flight: {value}"
            );
            client.notifications.push(value);
        }
    }
}

/// The key is gone from `tokens.changed` and comes back (a new library host listed it).
async fn key_goes_and_comes_back(client: &mut Client) {
    tokens_changed(client, false).await;
    tokens_changed(client, true).await;
}

/// The next signature works and verifies with OpenSSL and gmssl.
async fn next_signature_verifies(rig: &mut Rig) {
    rig.store.set_fault("").unwrap();
    rig.agent.script().push(&Step::pin(SKF_USER_PIN)).unwrap();
    let doc = "主机重启后的合同".as_bytes();
    let res = rig
        .client
        .call_ok("sign", sign_params(&rig.id, doc))
        .await
        .unwrap();
    let der = unb64(&res["signature"]).unwrap();
    let public = rig.store.public_key("sm2-sign");
    assert!(verify::openssl_sm2(&public, DEFAULT_ID, doc, &der));
    assert!(verify::gmssl_sm2(&public, DEFAULT_ID, "der", doc, &der));
}

/// Every failure is in the audit log with its reason, no PIN, and the chain verifies.
fn audit_has_failures_and_verifies(agent: &Agent, reason: &str, at_least: usize) {
    let log = std::fs::read_to_string(agent.audit_log()).unwrap();
    let failures = log.lines().filter(|l| l.contains(reason)).count();
    assert!(
        failures >= at_least,
        "{failures} lines with {reason}:\n{log}"
    );
    assert!(!log.contains(SKF_USER_PIN));
    let out = agent.keyport(&["audit", "--verify"]).unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Sends a sign that fails in the library host; returns its error and how long it took.
async fn failing_sign(rig: &mut Rig) -> (String, Duration) {
    rig.agent.script().push(&Step::pin(SKF_USER_PIN)).unwrap();
    let t = Instant::now();
    let answer = tokio::time::timeout(
        DEADLINE,
        rig.client.call("sign", sign_params(&rig.id, b"doomed")),
    )
    .await
    .expect("the sign is answered")
    .unwrap();
    (answer.unwrap_err().reason, t.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_in_skf_ecc_sign_data_fails_the_sign_and_a_new_host_signs() {
    let mut rig = start().await;
    let agent_pid = rig.agent.pid();
    for how in ["segv", "abort", "exit"] {
        rig.store
            .set_fault(&format!("crash_on=SKF_ECCSignData\ncrash_how={how}\n"))
            .unwrap();
        let (reason, took) = failing_sign(&mut rig).await;
        assert_eq!(reason, "TOKEN_ERROR", "{how}");
        rig.store.set_fault("").unwrap();
        key_goes_and_comes_back(&mut rig.client).await;
        let t = Instant::now();
        next_signature_verifies(&mut rig).await;
        eprintln!(
            "measured: SKF crash ({how}) in SKF_ECCSignData answered TOKEN_ERROR in {took:?}; \
             the next sign took {:?}",
            t.elapsed()
        );
    }
    assert_eq!(
        rig.agent.pid(),
        agent_pid,
        "the agent itself never restarted"
    );
    let stderr = rig.agent.stderr();
    for how in ["SIGSEGV", "SIGABRT", "exited with status 1"] {
        assert!(
            stderr.contains(how),
            "the agent logged how the host ended: {how}\n{stderr}"
        );
    }
    let calls = std::fs::read_to_string(rig.store.state().join("calls.log")).unwrap();
    let crashes = calls
        .lines()
        .filter(|l| *l == "SKF_ECCSignData crash")
        .count();
    assert_eq!(
        crashes, 3,
        "each crash struck in SKF_ECCSignData, in the host"
    );
    audit_has_failures_and_verifies(&rig.agent, "TOKEN_ERROR", 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_during_an_skf_batch_fails_it_with_no_partial_result_and_a_new_host_signs() {
    let mut rig = start().await;
    rig.store
        .set_fault("crash_on=SKF_ECCSignData\ncrash_how=segv\n")
        .unwrap();
    rig.agent.script().push(&Step::pin(SKF_USER_PIN)).unwrap();
    let items: Vec<Value> = (0..5)
        .map(|i| json!({"data": b64(format!("文件 {i}").as_bytes())}))
        .collect();
    let answer = rig
        .client
        .call(
            "sign.batch",
            json!({"certificateId": rig.id, "items": items, "display": {"title": "五份文件"}}),
        )
        .await
        .unwrap();
    let e = answer.unwrap_err();
    assert_eq!(e.reason, "TOKEN_ERROR", "{e:?}");
    let results = e.data["results"].as_array().map_or(0, Vec::len);
    assert_eq!(
        results, 0,
        "the first signature crashed: nothing to return {e:?}"
    );
    rig.store.set_fault("").unwrap();
    key_goes_and_comes_back(&mut rig.client).await;
    next_signature_verifies(&mut rig).await;
    audit_has_failures_and_verifies(&rig.agent, "TOKEN_ERROR", 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hang_in_skf_ecc_sign_data_is_stopped_at_the_deadline_while_another_origin_is_served() {
    let mut rig = start().await;
    rig.store.set_fault("hang_on=SKF_ECCSignData\n").unwrap();
    rig.agent.script().push(&Step::pin(SKF_USER_PIN)).unwrap();
    let t = Instant::now();
    let pending = rig
        .client
        .send("sign", sign_params(&rig.id, b"hangs"))
        .await
        .unwrap();
    // Meanwhile another origin is served: hello, and a token listing within the deadline.
    let mut other = rig.agent.connect(OTHER).await.unwrap();
    let hello = other.call_ok("hello", json!({})).await.unwrap();
    assert_eq!(hello["originApproved"], true);
    let listed = tokio::time::timeout(
        Duration::from_secs(3 * TOKEN_WAIT),
        other.call("tokens.list", json!({})),
    )
    .await
    .expect("tokens.list answers within the deadline")
    .unwrap();
    assert!(listed.is_ok() || listed.unwrap_err().reason == "BUSY");
    let answer = rig.client.response(pending).await.unwrap();
    let took = t.elapsed();
    assert_eq!(answer.unwrap_err().reason, "TOKEN_ERROR");
    assert!(
        took < Duration::from_secs(TOKEN_WAIT + 10),
        "answered in {took:?}"
    );
    rig.store.set_fault("").unwrap();
    key_goes_and_comes_back(&mut rig.client).await;
    next_signature_verifies(&mut rig).await;
    eprintln!("measured: an SKF hang in SKF_ECCSignData answered TOKEN_ERROR in {took:?} (token_wait_seconds = {TOKEN_WAIT})");
    audit_has_failures_and_verifies(&rig.agent, "TOKEN_ERROR", 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadlock_for_good_in_skf_ecc_sign_data_recovers_in_a_new_host() {
    let mut rig = start().await;
    // Once deadlocked, the library never answers again in that process, whatever the file
    // says: only a new host recovers.
    rig.store
        .set_fault("deadlock_on=SKF_ECCSignData\n")
        .unwrap();
    let (reason, took) = failing_sign(&mut rig).await;
    assert_eq!(reason, "TOKEN_ERROR");
    assert!(
        took < Duration::from_secs(TOKEN_WAIT + 10),
        "answered in {took:?}"
    );
    rig.store.set_fault("").unwrap();
    key_goes_and_comes_back(&mut rig.client).await;
    next_signature_verifies(&mut rig).await;
    eprintln!("measured: an SKF deadlock in SKF_ECCSignData answered TOKEN_ERROR in {took:?}");
    audit_has_failures_and_verifies(&rig.agent, "TOKEN_ERROR", 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_or_hang_in_skf_enum_dev_during_tokens_list_leaves_the_key_out_and_it_comes_back() {
    let mut rig = start().await;
    for fault in [
        "crash_on=SKF_EnumDev\ncrash_how=segv\n",
        "crash_on=SKF_EnumDev\ncrash_how=abort\n",
        "crash_on=SKF_EnumDev\ncrash_how=exit\n",
        "hang_on=SKF_EnumDev\n",
    ] {
        rig.store.set_fault(fault).unwrap();
        let t = Instant::now();
        let listed = rig.client.call_ok("tokens.list", json!({})).await.unwrap();
        let took = t.elapsed();
        assert!(!has_key(&listed["tokens"]), "{fault}: {listed}");
        assert!(
            took < Duration::from_secs(TOKEN_WAIT + 10),
            "{fault}: answered in {took:?}"
        );
        // SoftHSM's token, in its own host, is still listed.
        assert!(
            listed["tokens"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["id"].as_str().unwrap().starts_with("tok-")),
            "{listed}"
        );
        rig.store.set_fault("").unwrap();
        key_goes_and_comes_back(&mut rig.client).await;
        eprintln!(
            "measured: {} during tokens.list: answered in {took:?}",
            fault.trim().replace('\n', " ")
        );
    }
    next_signature_verifies(&mut rig).await;
    let out = rig.agent.keyport(&["audit", "--verify"]).unwrap();
    assert!(out.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_skf_host_crashes_leave_no_zombie_and_no_descriptor_behind() {
    let mut rig = start().await;
    let agent_pid = rig.agent.pid().unwrap();
    let listed = rig.client.call_ok("tokens.list", json!({})).await.unwrap();
    assert!(has_key(&listed["tokens"]));
    let fds_before = count_fds(agent_pid);
    const CRASHES: usize = 20;
    let t = Instant::now();
    for i in 0..CRASHES {
        let how = ["segv", "abort", "exit"][i % 3];
        rig.store
            .set_fault(&format!("crash_on=SKF_EnumDev\ncrash_how={how}\n"))
            .unwrap();
        let listed = rig.client.call_ok("tokens.list", json!({})).await.unwrap();
        assert!(!has_key(&listed["tokens"]), "{listed}");
        rig.store.set_fault("").unwrap();
        // Back (a new host) before the next crash.
        key_goes_and_comes_back(&mut rig.client).await;
    }
    let per_crash = t.elapsed() / u32::try_from(CRASHES).unwrap();
    assert_eq!(zombie_children(agent_pid), Vec::<u32>::new());
    assert_eq!(count_fds(agent_pid), fds_before, "no descriptor leaked");
    eprintln!("measured: {CRASHES} SKF host crashes in SKF_EnumDev, crash → tokens.changed with the key again: {per_crash:?} each on average");
    next_signature_verifies(&mut rig).await;
}

fn count_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Children of `parent` in state Z.
fn zombie_children(parent: u32) -> Vec<u32> {
    let parent = parent.to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
                let mut f = rest.split_whitespace();
                let state = f.next();
                let ppid = f.next();
                state == Some("Z") && ppid == Some(parent.as_str())
            })
        })
        .collect()
}

/// SKF_WaitForDevEvent runs in the library host: a key plugged in and pulled out reaches the
/// page, before and after the host is restarted (no PC/SC here, and the agent does not poll a
/// library that has events: only the host's watch can tell).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skf_device_events_reach_the_page_through_the_library_host_and_its_successor() {
    let mut rig = start().await;
    let spare = |tokens: &Value| {
        tokens
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["label"] == "KeyPort Spare Key")
    };
    let present = rig.store.device_dir("SKF-KEY-1").join("present");
    for round in ["first host", "after a crash"] {
        std::fs::write(&present, "insertion-1").unwrap();
        spare_changed(&mut rig.client, &spare, true, round).await;
        std::fs::remove_file(&present).unwrap();
        spare_changed(&mut rig.client, &spare, false, round).await;
        // Crash the host; the next round's events come from its successor.
        rig.store
            .set_fault("crash_on=SKF_EnumDev\ncrash_how=abort\n")
            .unwrap();
        let listed = rig.client.call_ok("tokens.list", json!({})).await.unwrap();
        assert!(!has_key(&listed["tokens"]));
        rig.store.set_fault("").unwrap();
        key_goes_and_comes_back(&mut rig.client).await;
    }
    let stderr = rig.agent.stderr();
    assert!(
        !stderr.contains("polling the library instead"),
        "events came from the host's watch, not from polling:\n{stderr}"
    );
    let calls = std::fs::read_to_string(rig.store.state().join("calls.log")).unwrap();
    assert!(calls.contains("SKF_WaitForDevEvent"), "{calls}");
}

/// Waits (bounded) for a `tokens.changed` whose list does (or not) hold the spare key.
async fn spare_changed(
    client: &mut Client,
    spare: &impl Fn(&Value) -> bool,
    want: bool,
    round: &str,
) {
    let until = Instant::now() + DEADLINE;
    loop {
        if let Some(i) = client
            .notifications
            .iter()
            .position(|e| e["method"] == "tokens.changed" && spare(&e["params"]["tokens"]) == want)
        {
            client.notifications.drain(..=i);
            return;
        }
        let left = until.saturating_duration_since(Instant::now());
        let message = tokio::time::timeout(left, client.next_message())
            .await
            .unwrap_or_else(|_| panic!("{round}: no tokens.changed with the spare key = {want}"))
            .unwrap();
        if let Message::Text(text) = message {
            client
                .notifications
                .push(serde_json::from_str(text.as_str()).unwrap());
        }
    }
}

/// `keyport doctor`, another process, shows the running daemon's hosts: the SKF library's
/// host with its pid (a child of the daemon), its restart and how the last one ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_shows_the_running_daemons_hosts_with_restarts_and_last_failure() {
    let mut rig = start().await;
    let agent_pid = rig.agent.pid().unwrap();
    rig.store
        .set_fault("crash_on=SKF_EnumDev\ncrash_how=abort\n")
        .unwrap();
    let listed = rig.client.call_ok("tokens.list", json!({})).await.unwrap();
    assert!(!has_key(&listed["tokens"]));
    rig.store.set_fault("").unwrap();
    key_goes_and_comes_back(&mut rig.client).await;
    // The daemon writes its file within half a second of a change: read until the restart
    // shows, a bounded number of doctor runs.
    let until = Instant::now() + DEADLINE;
    let row = loop {
        let out = rig.agent.keyport(&["doctor"]).unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let section: Vec<&str> = stdout
            .lines()
            .skip_while(|l| !l.starts_with("The running daemon's hosts"))
            .collect();
        assert!(
            section
                .first()
                .is_some_and(|h| h.contains(&format!("daemon pid {agent_pid};"))),
            "{stdout}"
        );
        let row = section
            .iter()
            .find(|l| l.contains("SKF library") && l.contains("libsoftskf.so"))
            .map(|l| (*l).to_owned());
        if let Some(row) = row.filter(|r| r.contains("restarts 1")) {
            break row;
        }
        assert!(Instant::now() < until, "no restart shown:\n{stdout}");
    };
    assert!(
        row.contains("last failure: killed by signal 6 (SIGABRT)"),
        "{row}"
    );
    let pid: u32 = row
        .split_whitespace()
        .skip_while(|w| *w != "pid")
        .nth(1)
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("a pid in {row}"));
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let ppid = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .nth(1)
        .unwrap();
    assert_eq!(
        ppid,
        agent_pid.to_string(),
        "the host is the daemon's child"
    );
    // Once the daemon stopped, its file is gone: doctor says no daemon runs.
    rig.agent.stop().unwrap();
    let out = rig.agent.keyport(&["doctor"]).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("The running daemon's hosts: no daemon with this configuration is running"),
        "{stdout}"
    );
}
