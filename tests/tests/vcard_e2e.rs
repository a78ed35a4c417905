//! The real smartcard stack with only the chip emulated (tests/vcard: pcscd + vpcd + a jcecard PIV
//! card, OpenSC's PKCS#11 module), driven through the real `keyport run` over WebSocket:
//! hot-plug events, always-authenticate signing, removal during a batch, pcscd restarts, and
//! `keyport doctor` on a card.
//!
//! The rig needs root (it makes a private network and mount namespace) and `pip install
//! jcecard==0.1.0`. Without them each test prints why and passes, unless KEYPORT_REQUIRE_VCARD=1
//! (CI), where a missing prerequisite fails the test.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use keyport_e2e::pinentry::{self, Script, Step};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

const OPENSC: &str = "/usr/lib/x86_64-linux-gnu/pkcs11/opensc-pkcs11.so";
const ORIGIN: &str = "https://portal.example";
const READER: &str = "Virtual PCD 00 00";
const PIN: &str = "123456";
/// The promise of the watcher: a card change reaches the page within this.
const EVENT_BOUND: Duration = Duration::from_secs(1);
/// How long any one wait may last before the test gives up.
const DEADLINE: Duration = Duration::from_secs(20);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Why the rig cannot run here, if it cannot.
fn missing_prerequisite() -> Option<String> {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().next().map(str::to_owned))
        })
        .unwrap_or_default();
    if uid != "0" {
        return Some("the virtual card rig needs root (unshare --net --mount)".into());
    }
    for (path, why) in [
        ("/usr/sbin/pcscd", "apt-get install pcscd"),
        (
            "/usr/lib/pcsc/drivers/serial/libifdvpcd.so",
            "apt-get install vsmartcard-vpcd",
        ),
        (OPENSC, "apt-get install opensc-pkcs11"),
    ] {
        if !Path::new(path).exists() {
            return Some(format!("{path} is missing ({why})"));
        }
    }
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let jcecard = Command::new(python)
        .args(["-c", "import jcecard"])
        .stderr(Stdio::null())
        .status();
    if !jcecard.is_ok_and(|s| s.success()) {
        return Some("jcecard is missing (pip install jcecard==0.1.0)".into());
    }
    None
}

/// `Some(rig)`, or `None` when the test must be skipped here.
fn rig_or_skip(test: &str) -> Option<Rig> {
    if let Some(why) = missing_prerequisite() {
        if std::env::var("KEYPORT_REQUIRE_VCARD").is_ok_and(|v| v == "1") {
            panic!("{test}: {why}");
        }
        eprintln!("SKIPPED {test}: {why}");
        return None;
    }
    Some(Rig::start().expect("the virtual card rig starts"))
}

/// One running rig (pcscd + bridge + a provisioned PIV card), stopped on drop.
struct Rig {
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
}

impl Rig {
    fn start() -> Result<Rig> {
        let dir = tempfile::Builder::new()
            .prefix("keyport-vcard-")
            .tempdir()?;
        let mut rig = Rig {
            dir,
            env: Vec::new(),
        };
        rig.run("start")?;
        let env = std::fs::read_to_string(rig.path().join("env"))?;
        rig.env = env
            .lines()
            .filter_map(|l| l.strip_prefix("export "))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let ca = rig.path().join("ca");
        std::fs::create_dir_all(&ca)?;
        let out = Command::new(repo_root().join("tests/vcard/provision-piv.sh"))
            .arg(rig.path())
            .arg(&ca)
            .output()?;
        ensure!(
            out.status.success(),
            "provision-piv.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(rig)
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `rig.sh CMD DIR`; returns when the rig says the new state holds.
    fn run(&self, cmd: &str) -> Result<()> {
        let out = Command::new(repo_root().join("tests/vcard/rig.sh"))
            .arg(cmd)
            .arg(self.path())
            .output()?;
        ensure!(
            out.status.success(),
            "rig.sh {cmd} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// `rig.sh delay DIR MS`: the card waits `ms` before each command APDU (0: no wait).
    fn delay(&self, ms: u32) -> Result<()> {
        let out = Command::new(repo_root().join("tests/vcard/rig.sh"))
            .arg("delay")
            .arg(self.path())
            .arg(ms.to_string())
            .output()?;
        ensure!(
            out.status.success(),
            "rig.sh delay {ms} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    fn cert_9a(&self) -> PathBuf {
        self.path().join("certs/piv-9a.pem")
    }

    fn cert_9c(&self) -> PathBuf {
        self.path().join("certs/piv-9c.pem")
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Err(e) = self.run("stop") {
            eprintln!("{e}");
        }
    }
}

/// `keyport run` on the rig's card, killed on drop.
struct Agent {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    script: Script,
}

/// The config's module part for the usual case: OpenSC named in the configuration.
const OPENSC_MODULE: &str =
    "discover_modules = false\n[[modules]]\npath = \"/usr/lib/x86_64-linux-gnu/pkcs11/opensc-pkcs11.so\"\n";

impl Agent {
    fn start(rig: &Rig, modules: &str, steps: &[Step]) -> Result<Agent> {
        let dir = tempfile::Builder::new()
            .prefix("keyport-agent-")
            .tempdir()?;
        let script = Script::new(dir.path())?;
        script.push_all(steps)?;
        let key = dir.path().join("audit.key");
        let mut random = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut random))?;
        std::fs::write(&key, random)?;
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        let config = dir.path().join("config.toml");
        // The 9A certificate is a PIV authentication one (a login certificate): it signs the
        // batch documents of these tests only because it is listed as dual-use, as an
        // administrator may list one (see the risk in docs/config.example.toml).
        let dual_use = fingerprint(&rig.cert_9a())?;
        std::fs::write(
            &config,
            format!(
                "port = 0\npinentry = {:?}\naudit_key_file = {:?}\naudit_log = {:?}\n\
                 allowed_origins = [\"{ORIGIN}\"]\nunknown_origins = \"reject\"\n\
                 pin_cache_seconds = 0\nsigning_key_usage = \"any\"\n\
                 dual_use_certificates = [\"{dual_use}\"]\n{modules}",
                pinentry::program(),
                key,
                dir.path().join("audit.log"),
            ),
        )?;
        let stderr = std::fs::File::create(dir.path().join("keyport.log"))?;
        let mut child = Command::new(keyport_bin()?)
            .arg("--config")
            .arg(&config)
            .arg("run")
            .envs(rig.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(script.env())
            .env("KEYPORT_LOG", "warn,agent::pcsc_watch=debug,agent::host=debug,agent::tokens=debug,pkcs11_shim=debug,cryptoki=off")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        // The readiness line, read on a thread so a silent agent cannot hang the test.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let port = lines.by_ref().map_while(|l| l.ok()).find_map(|l| {
                l.strip_prefix("listening on ws://127.0.0.1:")
                    .and_then(|r| r.strip_suffix("/v1"))
                    .and_then(|p| p.parse::<u16>().ok())
            });
            let _ = tx.send(port);
            // Keep draining so the agent never blocks on a full pipe.
            for _ in lines {}
        });
        let mut agent = Agent {
            child,
            port: 0,
            dir,
            script,
        };
        match rx.recv_timeout(DEADLINE) {
            Ok(Some(port)) => agent.port = port,
            _ => bail!("keyport did not start: {}", agent.log()),
        }
        Ok(agent)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("keyport.log")).unwrap_or_default()
    }

    async fn connect(&self) -> Result<Client> {
        let mut request = format!("ws://127.0.0.1:{}/v1", self.port).into_client_request()?;
        request
            .headers_mut()
            .insert("Origin", HeaderValue::from_static(ORIGIN));
        let (ws, _) = tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(request))
            .await
            .context("handshake deadline")??;
        Ok(Client {
            ws,
            next_id: 1,
            events: Vec::new(),
        })
    }

    fn getpin_dialogs(&self) -> usize {
        self.script
            .dialogs()
            .map(|d| {
                d.iter()
                    .filter(|d| d.command.as_deref() == Some("GETPIN"))
                    .count()
            })
            .unwrap_or(0)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn keyport_bin() -> Result<PathBuf> {
    let bin =
        pinentry::program().with_file_name(format!("keyport{}", std::env::consts::EXE_SUFFIX));
    ensure!(
        bin.exists(),
        "{} is missing: build it first (cargo build -p agent -p keyport-e2e)",
        bin.display()
    );
    Ok(bin)
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A page's connection: requests, and the events that arrive, with their arrival time.
struct Client {
    ws: Ws,
    next_id: u64,
    events: Vec<(Instant, Value)>,
}

impl Client {
    async fn send(&mut self, method: &str, params: Value) -> Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        let text = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        self.ws.send(Message::text(text.to_string())).await?;
        Ok(id)
    }

    /// The next message; events are also recorded in `events`.
    async fn next(&mut self, until: Instant) -> Result<Value> {
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let msg = tokio::time::timeout(left, self.ws.next())
                .await
                .context("no message before the deadline")?
                .context("connection closed")??;
            if let Message::Text(t) = msg {
                let v: Value = serde_json::from_str(t.as_str())?;
                if v.get("id").is_none() {
                    self.events.push((Instant::now(), v.clone()));
                }
                return Ok(v);
            }
        }
    }

    async fn call(&mut self, method: &str, params: Value) -> Result<Value> {
        let id = self.send(method, params).await?;
        let until = Instant::now() + DEADLINE;
        loop {
            let v = self.next(until).await?;
            if v["id"] == json!(id) {
                return Ok(v);
            }
        }
    }

    async fn result(&mut self, method: &str, params: Value) -> Result<Value> {
        let v = self.call(method, params).await?;
        match v.get("result") {
            Some(r) => Ok(r.clone()),
            None => bail!("{method}: {v}"),
        }
    }

    /// Waits for a `tokens.changed` whose list satisfies `want`, received after `since`;
    /// returns its arrival time and tokens.
    async fn tokens_changed(
        &mut self,
        since: Instant,
        want: impl Fn(&[Value]) -> bool,
    ) -> Result<(Instant, Vec<Value>)> {
        let until = Instant::now() + DEADLINE;
        let mut checked = 0;
        loop {
            for (at, e) in &self.events[checked..] {
                if *at >= since && e["method"] == "tokens.changed" {
                    let tokens = e["params"]["tokens"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default();
                    if want(&tokens) {
                        return Ok((*at, tokens));
                    }
                }
            }
            checked = self.events.len();
            self.next(until).await?;
        }
    }
}

fn card_token(tokens: &[Value]) -> Option<&Value> {
    tokens.iter().find(|t| t["reader"] == READER)
}

/// Runs a rig command on a blocking thread while the caller goes on reading events.
fn rig_async(rig: &Rig, cmd: &'static str) -> tokio::task::JoinHandle<Result<()>> {
    let dir = rig.path().to_path_buf();
    tokio::task::spawn_blocking(move || {
        let out = Command::new(repo_root().join("tests/vcard/rig.sh"))
            .arg(cmd)
            .arg(&dir)
            .output()?;
        ensure!(
            out.status.success(),
            "rig.sh {cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    })
}

/// Removes (or inserts) the card and measures from the command's start to the event that shows
/// the new state.
async fn change_and_time(client: &mut Client, rig: &Rig, cmd: &'static str) -> Result<Duration> {
    let t0 = Instant::now();
    let job = rig_async(rig, cmd);
    let (at, tokens) = if cmd == "remove" {
        client
            .tokens_changed(t0, |t| card_token(t).is_none())
            .await?
    } else {
        client
            .tokens_changed(t0, |t| card_token(t).is_some())
            .await?
    };
    job.await??;
    if cmd == "insert" {
        let t = card_token(&tokens).context("card token")?;
        ensure!(t["label"] == "KeyPort PIV Test", "{t}");
    }
    Ok(at - t0)
}

fn summary(name: &str, times: &mut [Duration]) -> String {
    times.sort();
    format!(
        "{name}: n={} min={:?} median={:?} max={:?}",
        times.len(),
        times[0],
        times[times.len() / 2],
        times[times.len() - 1]
    )
}

/// Certificate id of the 9C key ("PIV Signer P-256").
async fn cert_9c(client: &mut Client) -> Result<String> {
    cert_with(client, "PIV Signer").await
}

/// Lowercase hex SHA-256 of a PEM certificate's DER, as `dual_use_certificates` takes it.
fn fingerprint(pem: &Path) -> Result<String> {
    let out = Command::new("openssl")
        .args(["x509", "-outform", "DER", "-in"])
        .arg(pem)
        .output()?;
    ensure!(out.status.success(), "openssl x509 {}", pem.display());
    Ok(hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
        &out.stdout,
    )))
}

/// Certificate id of the 9A key ("KeyPort PIV Test").
async fn cert_9a(client: &mut Client) -> Result<String> {
    cert_with(client, "CN=KeyPort PIV Test,").await
}

async fn cert_with(client: &mut Client, subject: &str) -> Result<String> {
    let certs = client.result("certificates.list", json!({})).await?;
    certs["certificates"]
        .as_array()
        .and_then(|c| {
            c.iter()
                .find(|c| c["subject"].as_str().is_some_and(|s| s.contains(subject)))
        })
        .and_then(|c| c["id"].as_str())
        .map(str::to_owned)
        .with_context(|| format!("certificate {subject} listed"))
}

fn digest(i: usize) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(format!("keyport vcard document {i}").as_bytes()).to_vec()
}

/// OpenSSL checks a DER ECDSA signature over a SHA-256 digest with the certificate's key.
fn openssl_verifies(cert: &Path, digest: &[u8], sig_der: &[u8]) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (d, s) = (dir.path().join("digest"), dir.path().join("sig"));
    std::fs::write(&d, digest)?;
    std::fs::write(&s, sig_der)?;
    let out = Command::new("openssl")
        .args(["pkeyutl", "-verify", "-certin", "-inkey"])
        .arg(cert)
        .arg("-in")
        .arg(&d)
        .arg("-sigfile")
        .arg(&s)
        .output()?;
    ensure!(
        out.status.success(),
        "openssl refused the signature: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn sign_params(cert: &str, i: usize) -> Value {
    json!({
        "certificateId": cert,
        "digest": {"algorithm": "SHA-256", "value": B64.encode(digest(i))},
        "display": {"title": format!("Virtual card document {i}")},
    })
}

fn pins(n: usize) -> Vec<Step> {
    (0..n).map(|_| Step::pin(PIN)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_and_remove_reach_the_page_within_a_second() -> Result<()> {
    let Some(rig) = rig_or_skip("insert_and_remove_reach_the_page_within_a_second") else {
        return Ok(());
    };
    let agent = Agent::start(&rig, OPENSC_MODULE, &[])?;
    let mut client = agent.connect().await?;
    let list = client.result("tokens.list", json!({})).await?;
    let tokens = list["tokens"].as_array().cloned().unwrap_or_default();
    let token = card_token(&tokens).with_context(|| format!("card token with reader: {list}"))?;
    ensure!(token["label"] == "KeyPort PIV Test", "{token}");

    let (mut inserts, mut removals) = (Vec::new(), Vec::new());
    for _ in 0..10 {
        removals.push(change_and_time(&mut client, &rig, "remove").await?);
        inserts.push(change_and_time(&mut client, &rig, "insert").await?);
    }
    let report = format!(
        "{}\n{}",
        summary("insert -> tokens.changed", &mut inserts),
        summary("remove -> tokens.changed", &mut removals)
    );
    println!("{report}");
    std::io::stdout().flush()?;
    // The promise is one second. On a loaded 2-core machine (CI runs the whole suite at once)
    // one event in twenty has been seen at 1.2 s, with the emulated reader's own 400 ms poll in
    // every figure: so 18 of 20 must be within the second, and none may take twice that.
    let all: Vec<Duration> = inserts.iter().chain(&removals).copied().collect();
    let within = all.iter().filter(|t| **t < EVENT_BOUND).count();
    ensure!(
        within >= all.len() - 2 && all.iter().all(|t| *t < 2 * EVENT_BOUND),
        "only {within} of {} events within a second, or one took two:\n{report}\n{}",
        all.len(),
        agent.log()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_9c_key_asks_the_pin_for_every_signature() -> Result<()> {
    let Some(rig) = rig_or_skip("the_9c_key_asks_the_pin_for_every_signature") else {
        return Ok(());
    };
    let agent = Agent::start(&rig, OPENSC_MODULE, &pins(8))?;
    let mut client = agent.connect().await?;
    let cert = cert_9c(&mut client).await?;
    let mut per_signature = Vec::new();
    for i in 0..3 {
        let before = agent.getpin_dialogs();
        let r = client.result("sign", sign_params(&cert, i)).await?;
        let sig = B64.decode(r["signature"].as_str().context("signature")?)?;
        openssl_verifies(&rig.cert_9c(), &digest(i), &sig)?;
        per_signature.push(agent.getpin_dialogs() - before);
    }
    println!("GETPIN dialogs per 9C signature: {per_signature:?}");
    // Every signature asks again, in one dialog: its PIN answers the user login and the
    // context-specific login the card demands before each signature.
    ensure!(per_signature.iter().all(|n| *n == 1), "{per_signature:?}");
    Ok(())
}

/// Items in the removal batch, and the time the card takes per signature while it runs
/// (`rig.sh delay`): the whole batch would take several seconds, so the removal lands in the
/// middle of it.
const BATCH_ITEMS: usize = 300;
const SIGNATURE_DELAY_MS: u32 = 10;

/// A removal in the middle of a `sign.batch` (9A key: one PIN for the batch) ends it with
/// TOKEN_NOT_PRESENT and the signatures finished before it, at once; the card put back is used
/// by the next `sign` without restarting the agent. The bridge slows the card's signatures down
/// and pulls the card in the middle of one (`rig.sh delay`): timing only, every APDU and answer
/// is the real one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removal_during_a_batch_keeps_finished_signatures_and_reinsertion_recovers() -> Result<()> {
    let Some(rig) = rig_or_skip("removal_during_a_batch") else {
        return Ok(());
    };
    // One dialog for the batch, one for the sign after reinsertion (pin_cache_seconds = 0).
    let agent = Agent::start(&rig, OPENSC_MODULE, &pins(2))?;
    let mut client = agent.connect().await?;
    let cert = cert_9a(&mut client).await?;
    let (sigs, completed, total) =
        removal_during_batch(&rig, &agent, &mut client, &cert, BATCH_ITEMS).await?;
    for (i, sig) in sigs.iter().enumerate() {
        openssl_verifies(&rig.cert_9a(), &digest(i), sig)
            .with_context(|| format!("batch signature {i}"))?;
    }
    println!("9A batch: {completed} of {total} signatures returned, all verified by OpenSSL");
    reinsert_and_sign(&rig, &mut client, &cert, &rig.cert_9a()).await?;
    ensure!(
        agent.getpin_dialogs() == 2,
        "{} GETPIN dialogs",
        agent.getpin_dialogs()
    );
    Ok(())
}

/// The same with the 9C key (CKA_ALWAYS_AUTHENTICATE): a PIN dialog and a context-specific
/// C_Login before every signature, and the card pulled in the middle of one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removal_during_a_9c_batch_keeps_finished_signatures_and_reinsertion_recovers() -> Result<()>
{
    let Some(rig) = rig_or_skip("removal_during_a_9c_batch") else {
        return Ok(());
    };
    let n = 40;
    let agent = Agent::start(&rig, OPENSC_MODULE, &pins(2 * n + 4))?;
    let mut client = agent.connect().await?;
    let cert = cert_9c(&mut client).await?;
    let (sigs, completed, total) =
        removal_during_batch(&rig, &agent, &mut client, &cert, n).await?;
    for (i, sig) in sigs.iter().enumerate() {
        openssl_verifies(&rig.cert_9c(), &digest(i), sig)
            .with_context(|| format!("batch signature {i}"))?;
    }
    println!(
        "9C batch: {completed} of {total} signatures returned, all verified by OpenSSL; {} GETPIN dialogs",
        agent.getpin_dialogs()
    );
    reinsert_and_sign(&rig, &mut client, &cert, &rig.cert_9c()).await?;
    Ok(())
}

/// Slows the card, starts a batch of `n` items, removes the card when the first
/// `sign.progress` arrives, and checks the answer: TOKEN_NOT_PRESENT, `0 < completed < n`,
/// `results` as long as `completed`, the answer promptly after the removal, and a
/// `tokens.changed` without the card. Returns the signatures (DER) and `(completed, n)`.
async fn removal_during_batch(
    rig: &Rig,
    agent: &Agent,
    client: &mut Client,
    cert: &str,
    n: usize,
) -> Result<(Vec<Vec<u8>>, usize, usize)> {
    let items: Vec<Value> = (0..n)
        .map(|i| json!({"digest": {"algorithm": "SHA-256", "value": B64.encode(digest(i))}, "label": format!("doc {i}")}))
        .collect();
    rig.delay(SIGNATURE_DELAY_MS)?;
    let sent = Instant::now();
    let id = client
        .send(
            "sign.batch",
            json!({"certificateId": cert, "items": items, "display": {"title": "Documents"}}),
        )
        .await?;
    let until = Instant::now() + DEADLINE;
    let mut removal: Option<(Instant, tokio::task::JoinHandle<Result<()>>)> = None;
    let mut progress_events = 0usize;
    let answer = loop {
        let v = match client.next(until).await {
            Ok(v) => v,
            Err(e) => bail!(
                "{e:#}; {} GETPIN dialogs; agent log:\n{}\nbridge log:\n{}",
                agent.getpin_dialogs(),
                agent.log(),
                std::fs::read_to_string(rig.path().join("logs/bridge.log")).unwrap_or_default()
            ),
        };
        if v["id"] == json!(id) {
            break v;
        }
        if v["method"] == "sign.progress" && v["params"]["requestId"] == json!(id) {
            progress_events += 1;
            if removal.is_none() {
                removal = Some((Instant::now(), rig_async(rig, "remove")));
            }
        }
    };
    let answered = Instant::now();
    let (removed_at, job) = removal.context("no sign.progress before the batch ended")?;
    job.await??;
    // The card is out; the rest of the test runs at full speed.
    rig.delay(0)?;
    let error = &answer["error"];
    ensure!(
        error["data"]["reason"] == "TOKEN_NOT_PRESENT",
        "{answer}\n{}",
        agent.log()
    );
    let results = error["data"]["results"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let completed = usize::try_from(error["data"]["completed"].as_u64().context("completed")?)?;
    ensure!(
        completed == results.len() && (1..n).contains(&completed),
        "completed {completed}, {} results of {n}",
        results.len()
    );
    ensure!(
        progress_events <= completed,
        "{progress_events} progress events but {completed} signatures returned"
    );
    let after_removal = answered - removed_at;
    println!(
        "batch of {n}: first progress after {:?}, removal started then; the batch ended \
         {after_removal:?} later with {completed} signatures ({progress_events} progress events)",
        removed_at - sent
    );
    ensure!(
        after_removal < EVENT_BOUND,
        "the batch went on for {after_removal:?} after the removal"
    );
    // Events flow after the batch: the removal reaches the page.
    client
        .tokens_changed(removed_at, |t| card_token(t).is_none())
        .await
        .context("tokens.changed without the card after the removal")?;
    let sigs = results
        .iter()
        .map(|r| {
            B64.decode(r["signature"].as_str().context("signature")?)
                .map_err(Into::into)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((sigs, completed, n))
}

/// Puts the card back, waits for the `tokens.changed` that lists it, and signs once more in the
/// same agent; OpenSSL verifies the signature against `cert_pem`.
async fn reinsert_and_sign(
    rig: &Rig,
    client: &mut Client,
    cert: &str,
    cert_pem: &Path,
) -> Result<()> {
    let t0 = Instant::now();
    let job = rig_async(rig, "insert");
    let (at, _) = client
        .tokens_changed(t0, |t| card_token(t).is_some())
        .await?;
    job.await??;
    println!(
        "reinsertion -> tokens.changed with the card after {:?}",
        at - t0
    );
    let r = client.result("sign", sign_params(cert, 5000)).await?;
    let sig = B64.decode(r["signature"].as_str().context("signature")?)?;
    openssl_verifies(cert_pem, &digest(5000), &sig).context("the signature after reinsertion")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_resume_after_pcscd_restarts() -> Result<()> {
    let Some(rig) = rig_or_skip("events_resume_after_pcscd_restarts") else {
        return Ok(());
    };
    let agent = Agent::start(&rig, OPENSC_MODULE, &[])?;
    let mut client = agent.connect().await?;
    for round in 0..2 {
        rig.run("restart-pcscd")?;
        // Let the watcher settle: it reconnects with backoff, and may have reported the card
        // gone meanwhile; the card is back now, so its last word must be that.
        let settle = Instant::now();
        loop {
            let list = client.result("tokens.list", json!({})).await?;
            let tokens = list["tokens"].as_array().cloned().unwrap_or_default();
            let last_event_has_card = client
                .events
                .iter()
                .rev()
                .find(|(_, e)| e["method"] == "tokens.changed")
                .is_none_or(|(_, e)| {
                    card_token(e["params"]["tokens"].as_array().map_or(&[], |v| v)).is_some()
                });
            if card_token(&tokens).is_some() && last_event_has_card && reconnected(&agent, round) {
                break;
            }
            ensure!(settle.elapsed() < DEADLINE, "no recovery: {}", agent.log());
            // Pacing only: the condition above is what is waited for.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let removed = change_and_time(&mut client, &rig, "remove").await?;
        let inserted = change_and_time(&mut client, &rig, "insert").await?;
        println!(
            "after pcscd restart {}: remove -> event {removed:?}, insert -> event {inserted:?}",
            round + 1
        );
        ensure!(removed < EVENT_BOUND && inserted < EVENT_BOUND);
    }
    Ok(())
}

/// Whether the watcher established a new PC/SC context after restart `round`.
fn reconnected(agent: &Agent, round: usize) -> bool {
    agent.log().matches("PC/SC context established").count() >= round + 2
}

#[test]
fn doctor_shows_the_reader_the_atr_and_the_module() -> Result<()> {
    let Some(rig) = rig_or_skip("doctor_shows_the_reader_the_atr_and_the_module") else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("config.toml");
    // The scripted pinentry: doctor also checks the dialog program (a desktop pinentry with no
    // display would be a problem on this headless machine).
    std::fs::write(
        &config,
        format!(
            "pinentry = \"{}\"\n{OPENSC_MODULE}",
            keyport_e2e::pinentry::program().display()
        ),
    )?;
    let out = Command::new(keyport_bin()?)
        .arg("--config")
        .arg(&config)
        .arg("doctor")
        .envs(rig.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    ensure!(out.status.success(), "doctor found problems:\n{text}");
    ensure!(text.contains(&format!("  {READER}\n")), "reader");
    ensure!(
        text.contains("card ATR 3B 88 80 01 00 73 00 00 E0 05 90 00 0F"),
        "ATR"
    );
    ensure!(
        text.contains("matched \"KeyPort test card (jcecard 0.1.0 virtual PIV)\"")
            && text.contains(&format!("→ module {OPENSC} [loaded (from configuration)]")),
        "ATR match"
    );
    ensure!(
        text.contains(&format!("reader {READER}")),
        "token with reader"
    );
    Ok(())
}

/// With no module configured, the card's ATR (a user [[atr]] entry) makes the agent load OpenSC
/// on insertion, and the page sees the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_atr_match_loads_the_module_on_insertion() -> Result<()> {
    let Some(rig) = rig_or_skip("an_atr_match_loads_the_module_on_insertion") else {
        return Ok(());
    };
    rig.run("remove")?;
    let atr = format!(
        "discover_modules = false\n[[atr]]\nname = \"Test PIV\"\natr = \"3B:88:80:01:00:73:00:00:E0:05:90:00:0F\"\nmodule = \"{OPENSC}\"\n"
    );
    let agent = Agent::start(&rig, &atr, &[])?;
    let mut client = agent.connect().await?;
    let list = client.result("tokens.list", json!({})).await?;
    ensure!(
        list["tokens"].as_array().is_some_and(|t| t.is_empty()),
        "{list}"
    );
    let took = change_and_time(&mut client, &rig, "insert").await?;
    println!("insert (module loaded by ATR) -> event {took:?}");
    ensure!(took < EVENT_BOUND, "{took:?}");
    Ok(())
}

/// OpenSC 0.23 deadlocks for good when the card is pulled while its PIV re-SELECT is pending
/// (tests/vcard/README.md). With the module in a host (`module_isolation`), the request is
/// answered at the call deadline with TOKEN_NOT_PRESENT, the host is stopped, and after
/// reinsertion the same agent —
/// never restarted — lists the card again and signs; OpenSSL verifies the signature.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opensc_deadlock_on_card_removal_recovers_without_restarting_the_agent() -> Result<()> {
    let Some(rig) = rig_or_skip("opensc_deadlock_on_card_removal") else {
        return Ok(());
    };
    const TOKEN_WAIT: u64 = 3;
    let modules =
        format!("module_isolation = true\ntoken_wait_seconds = {TOKEN_WAIT}\n{OPENSC_MODULE}");
    let mut agent = Agent::start(&rig, &modules, &pins(3))?;
    let agent_pid = agent.child.id();
    let mut client = agent.connect().await?;
    let cert = cert_9a(&mut client).await?;
    rig.run("pull-at-select")?;
    let t = Instant::now();
    let answer = client.call("sign", sign_params(&cert, 1)).await?;
    let took = t.elapsed();
    // The card is gone: TOKEN_NOT_PRESENT (a new host no longer lists it), not TOKEN_ERROR.
    let reason = answer["error"]["data"]["reason"]
        .as_str()
        .unwrap_or_default();
    ensure!(reason == "TOKEN_NOT_PRESENT", "{answer}\n{}", agent.log());
    ensure!(
        took < Duration::from_secs(TOKEN_WAIT + 10),
        "answered after {took:?}"
    );
    // The deadlock itself (3 of 3 runs in the README, 3 of 3 here): the host did not answer
    // in time and was stopped, rather than OpenSC failing cleanly.
    ensure!(
        agent.log().contains("did not answer in time"),
        "OpenSC did not deadlock this time: {reason} after {took:?}\n{}",
        agent.log()
    );
    println!(
        "card pulled at the PIV SELECT: OpenSC deadlocked; {reason} after {took:?}, host stopped"
    );
    // pcscd has seen the card go (the bridge hung up at the SELECT).
    rig.run("remove")?;
    reinsert_and_sign(&rig, &mut client, &cert, &rig.cert_9a())
        .await
        .with_context(|| agent.log())?;
    ensure!(
        agent.child.id() == agent_pid && agent.child.try_wait()?.is_none(),
        "the agent itself never restarted"
    );
    Ok(())
}
