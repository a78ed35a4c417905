//! End-to-end harness: a provisioned SoftHSM token, the real `keyport run` process with a
//! written configuration and the scripted pinentry, a WebSocket client with chosen `Origin` and
//! `Host`, a raw-HTTP helper, and signature checks through OpenSSL and Python `cryptography`.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use keyport_e2e::harness::{Agent, AgentOptions, TestToken};
//! use keyport_e2e::pinentry::Step;
//! let token = TestToken::provision()?;
//! let agent = Agent::start(&token, AgentOptions::default().steps([Step::pin("123456")]))?;
//! let mut client = agent.connect("https://portal.example").await?;
//! let hello = client.call("hello", serde_json::json!({})).await;
//! # Ok(()) }
//! ```
//!
//! Binaries are found beside the running test executable (`target/<profile>/`): `keyport`,
//! `keyport-test-pinentry` and, for [`AgentOptions::fault`], `libkeyport_fault_pkcs11.so`
//! (built by `cargo build -p agent -p keyport-e2e -p keyport-fault-pkcs11`).

use std::collections::VecDeque;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream as StdTcpStream;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use sha2::Digest as _;
use tempfile::TempDir;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::pinentry::{Script, Step};

/// The user PIN of the provisioned token.
pub const USER_PIN: &str = "123456";
/// The label of the provisioned token.
pub const TOKEN_LABEL: &str = "KeyPort Test";
/// The origin most tests use, on `allowed_origins` by default.
pub const PORTAL: &str = "https://portal.example";
/// How long the harness waits for the agent to start or stop, or for one message.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// The repository root (the `tests/` crate's parent).
pub fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// `target/<profile>/`: the folder of the running test executable, without `deps/`.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// The built `keyport` binary (`$KEYPORT_BIN` overrides).
pub fn keyport_bin() -> PathBuf {
    std::env::var_os("KEYPORT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| bin_dir().join("keyport"))
}

/// The built fault-injection module.
pub fn fault_module() -> PathBuf {
    let dir = bin_dir();
    let direct = dir.join("libkeyport_fault_pkcs11.so");
    if direct.exists() {
        direct
    } else {
        dir.join("deps").join("libkeyport_fault_pkcs11.so")
    }
}

/// SoftHSM's module.
pub const SOFTHSM: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// A fresh SoftHSM token store from `softhsm-config/provision.sh` (see its README for the keys).
#[derive(Debug)]
pub struct TestToken {
    dir: TempDir,
}

impl TestToken {
    /// Provisions a token in a new temporary folder.
    pub fn provision() -> Result<TestToken> {
        let dir = tempfile::Builder::new()
            .prefix("keyport-e2e-token")
            .tempdir()?;
        let out = Command::new(repo_root().join("softhsm-config/provision.sh"))
            .arg(dir.path())
            .output()
            .context("running softhsm-config/provision.sh")?;
        if !out.status.success() {
            bail!(
                "provision.sh failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(TestToken { dir })
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `SOFTHSM2_CONF` for this store.
    pub fn conf(&self) -> PathBuf {
        self.dir().join("softhsm2.conf")
    }

    /// The test CA's certificate (PEM).
    pub fn ca_pem(&self) -> PathBuf {
        self.dir().join("ca.pem")
    }

    /// `certs/<label>.pem`.
    pub fn cert_pem(&self, label: &str) -> PathBuf {
        self.dir().join("certs").join(format!("{label}.pem"))
    }

    /// The DER bytes of `certs/<label>.der`.
    pub fn cert_der(&self, label: &str) -> Result<Vec<u8>> {
        let path = self.dir().join("certs").join(format!("{label}.der"));
        fs::read(&path).with_context(|| format!("reading {}", path.display()))
    }
}

/// How to configure and drive one agent.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub allowed_origins: Vec<String>,
    pub denied_origins: Vec<String>,
    /// `prompt` or `reject`.
    pub unknown_origins: String,
    pub allow_insecure_localhost_origins: bool,
    pub pin_cache_seconds: u64,
    pub dialog_timeout_seconds: u64,
    /// `non-repudiation` or `any`.
    pub signing_key_usage: String,
    /// Origins with `consent = "session"`.
    pub session_consent_origins: Vec<String>,
    /// Extra `[limits]` lines (`requests_per_second = 5`).
    pub limits: Vec<String>,
    /// Load SoftHSM through the fault module (control file and call log in the agent's folder).
    pub fault: bool,
    /// The scripted user's answers, in order.
    pub steps: Vec<Step>,
    /// Also serve the demo portal (`--demo-port 0`); [`Agent::demo_port`] says where.
    pub demo: bool,
    /// Run the agent under `prlimit --nofile=N:N`: at most N open file descriptors.
    pub max_open_files: Option<u32>,
    /// `token_wait_seconds` when set (else the agent's default).
    pub token_wait_seconds: Option<u64>,
    /// Keep the audit key in the OS keyring under this service name instead of a key file.
    pub os_keyring: Option<String>,
    /// More top-level configuration lines (`dual_use_certificates = […]`).
    pub extra_toml: Vec<String>,
    /// Write the audit log here instead of the agent's folder.
    pub audit_log: Option<PathBuf>,
    /// Set the configuration file's mode to this before the agent starts.
    pub config_mode: Option<u32>,
    /// Also load this soft SKF store's library (`[[skf_modules]]`, `KEYPORT_SOFT_SKF_DIR`).
    pub skf: Option<(PathBuf, PathBuf)>,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            allowed_origins: vec![PORTAL.to_owned()],
            denied_origins: Vec::new(),
            unknown_origins: "prompt".into(),
            allow_insecure_localhost_origins: false,
            pin_cache_seconds: 0,
            dialog_timeout_seconds: 120,
            signing_key_usage: "non-repudiation".into(),
            session_consent_origins: Vec::new(),
            limits: Vec::new(),
            fault: false,
            steps: Vec::new(),
            demo: false,
            max_open_files: None,
            token_wait_seconds: None,
            os_keyring: None,
            extra_toml: Vec::new(),
            audit_log: None,
            config_mode: None,
            skf: None,
        }
    }
}

impl AgentOptions {
    pub fn steps(mut self, steps: impl IntoIterator<Item = Step>) -> Self {
        self.steps.extend(steps);
        self
    }

    pub fn allowed(mut self, origins: &[&str]) -> Self {
        self.allowed_origins = origins.iter().map(|o| (*o).to_owned()).collect();
        self
    }

    pub fn fault(mut self) -> Self {
        self.fault = true;
        self
    }

    /// Loads the soft SKF store's library beside SoftHSM.
    pub fn skf(mut self, store: &crate::skf::SoftSkfStore) -> Self {
        self.skf = Some((store.library(), store.state()));
        self
    }

    fn to_toml(&self, dir: &Path) -> String {
        let list = |v: &[String]| {
            let items: Vec<String> = v.iter().map(|s| toml_str(s)).collect();
            format!("[{}]", items.join(", "))
        };
        let module = if self.fault {
            fault_module()
        } else {
            PathBuf::from(SOFTHSM)
        };
        let mut text = format!(
            "port = 0\n\
             discover_modules = false\n\
             language = \"en\"\n\
             pinentry = {pinentry}\n\
             {key_source}\
             audit_log = {log}\n\
             allowed_origins = {allowed}\n\
             denied_origins = {denied}\n\
             unknown_origins = {unknown}\n\
             allow_insecure_localhost_origins = {insecure}\n\
             pin_cache_seconds = {cache}\n\
             dialog_timeout_seconds = {timeout}\n\
             signing_key_usage = {usage}\n\
             {token_wait}\
             {extra}\
             [[modules]]\n\
             path = {module}\n",
            pinentry = toml_path(&crate::pinentry::program()),
            key_source = match &self.os_keyring {
                Some(service) => format!("keyring_service = {}\n", toml_str(service)),
                None => format!("audit_key_file = {}\n", toml_path(&dir.join("audit.key"))),
            },
            log = toml_path(
                &self
                    .audit_log
                    .clone()
                    .unwrap_or_else(|| dir.join("audit.log"))
            ),
            allowed = list(&self.allowed_origins),
            denied = list(&self.denied_origins),
            unknown = toml_str(&self.unknown_origins),
            insecure = self.allow_insecure_localhost_origins,
            cache = self.pin_cache_seconds,
            timeout = self.dialog_timeout_seconds,
            usage = toml_str(&self.signing_key_usage),
            module = toml_path(&module),
            token_wait = self
                .token_wait_seconds
                .map(|s| format!("token_wait_seconds = {s}\n"))
                .unwrap_or_default(),
            extra = self
                .extra_toml
                .iter()
                .map(|l| format!("{l}\n"))
                .chain(isolation_from_env(&self.extra_toml))
                .collect::<String>(),
        );
        if let Some((library, _)) = &self.skf {
            text.push_str(&format!("[[skf_modules]]\npath = {}\n", toml_path(library)));
        }
        for origin in &self.session_consent_origins {
            text.push_str(&format!(
                "[[origin_policy]]\norigin = {}\nconsent = \"session\"\n",
                toml_str(origin)
            ));
        }
        if !self.limits.is_empty() {
            text.push_str("[limits]\n");
            for line in &self.limits {
                text.push_str(line);
                text.push('\n');
            }
        }
        text
    }
}

/// `KEYPORT_TEST_ISOLATION=1` (or `0`) runs every agent with `module_isolation` on (or off),
/// unless the test sets it itself: how the whole suite is run against module hosts.
fn isolation_from_env(extra: &[String]) -> Option<String> {
    let on = match std::env::var("KEYPORT_TEST_ISOLATION").ok()?.as_str() {
        "1" => true,
        "0" => false,
        _ => return None,
    };
    (!extra
        .iter()
        .any(|l| l.trim_start().starts_with("module_isolation")))
    .then(|| format!("module_isolation = {on}\n"))
}

/// An audit key file as the agent wants it: 32 random bytes, mode 0600 from its creation.
pub fn write_audit_key(path: &Path) -> Result<()> {
    let mut key = [0u8; 32];
    fs::File::open("/dev/urandom")?.read_exact(&mut key)?;
    fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(&key))
        .with_context(|| format!("writing {}", path.display()))
}

fn toml_str(s: &str) -> String {
    // serde_json's string escaping is valid TOML basic-string escaping for these inputs.
    Value::String(s.to_owned()).to_string()
}

fn toml_path(p: &Path) -> String {
    toml_str(&p.to_string_lossy())
}

/// A running `keyport run`.
#[derive(Debug)]
pub struct Agent {
    dir: TempDir,
    child: Option<Child>,
    port: u16,
    demo_port: Option<u16>,
    config: PathBuf,
    script: Script,
    softhsm_conf: PathBuf,
    /// The soft SKF store's state, for the agent and `keyport` commands.
    skf_state: Option<PathBuf>,
    stdout_rest: Option<mpsc::Receiver<String>>,
    audit_log: PathBuf,
}

impl Agent {
    /// Writes the configuration and audit key, spawns the agent and waits for its
    /// `listening on ws://127.0.0.1:PORT/v1` line.
    pub fn start(token: &TestToken, options: AgentOptions) -> Result<Agent> {
        let dir = tempfile::Builder::new()
            .prefix("keyport-e2e-agent")
            .tempdir()?;
        write_audit_key(&dir.path().join("audit.key"))?;
        let config = dir.path().join("config.toml");
        fs::write(&config, options.to_toml(dir.path()))?;
        if let Some(mode) = options.config_mode {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&config, fs::Permissions::from_mode(mode))?;
        }
        let script = Script::new(dir.path())?;
        script.push_all(&options.steps)?;
        if options.fault && !fault_module().exists() {
            bail!(
                "{} is missing: cargo build -p keyport-fault-pkcs11",
                fault_module().display()
            );
        }
        let bin = keyport_bin();
        if !bin.exists() {
            bail!("{} is missing: cargo build -p agent", bin.display());
        }
        let stderr = fs::File::create(dir.path().join("stderr.log"))?;
        let mut cmd = match options.max_open_files {
            // prlimit sets the limit and then runs (execs) the agent: the same process id.
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg("--").arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        cmd.arg("--config").arg(&config).arg("run");
        if options.demo {
            cmd.args(["--demo-port", "0"]);
        }
        cmd.env("SOFTHSM2_CONF", token.conf())
            .env(
                "KEYPORT_LOG",
                std::env::var("KEYPORT_TEST_LOG").unwrap_or_else(|_| "info,cryptoki=off".into()),
            )
            .envs(script.env())
            .env("KEYPORT_FAULT_TARGET", SOFTHSM)
            .env("KEYPORT_FAULT_CONTROL", dir.path().join("fault.control"))
            .env("KEYPORT_FAULT_LOG", dir.path().join("fault.log"))
            .envs(
                options
                    .skf
                    .iter()
                    .map(|(_, state)| ("KEYPORT_SOFT_SKF_DIR", state.as_os_str())),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        let mut child = cmd.spawn().with_context(|| format!("spawning {bin:?}"))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut agent = Agent {
            dir,
            child: Some(child),
            port: 0,
            demo_port: None,
            config,
            script,
            softhsm_conf: token.conf(),
            skf_state: options.skf.as_ref().map(|(_, state)| state.clone()),
            stdout_rest: None,
            audit_log: options.audit_log.clone().unwrap_or_default(),
        };
        if agent.audit_log.as_os_str().is_empty() {
            agent.audit_log = agent.dir().join("audit.log");
        }
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(port) = line
                        .strip_prefix("listening on ws://127.0.0.1:")
                        .and_then(|r| r.strip_suffix("/v1"))
                    {
                        agent.port = port.parse().context("port in the listening line")?;
                        break;
                    }
                }
                Err(_) => bail!(
                    "keyport never said it was listening; stderr:\n{}",
                    agent.stderr()
                ),
            }
        }
        if options.demo {
            // `demo portal on http://127.0.0.1:PORT/?agent=…` comes next.
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx
                .recv_timeout(left)
                .context("keyport never named its demo portal")?;
            let port = line
                .strip_prefix("demo portal on http://127.0.0.1:")
                .and_then(|r| r.split_once('/'))
                .and_then(|(port, _)| port.parse().ok())
                .with_context(|| format!("not the demo portal line: {line:?}"))?;
            agent.demo_port = Some(port);
        }
        agent.stdout_rest = Some(rx);
        Ok(agent)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The demo portal's port, with [`AgentOptions::demo`].
    pub fn demo_port(&self) -> Option<u16> {
        self.demo_port
    }

    /// The agent's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The scripted pinentry's scenario and transcript.
    pub fn script(&self) -> &Script {
        &self.script
    }

    pub fn audit_log(&self) -> PathBuf {
        self.audit_log.clone()
    }

    pub fn origins_file(&self) -> PathBuf {
        self.dir().join("origins.toml")
    }

    /// What the agent wrote on stderr so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(self.dir().join("stderr.log")).unwrap_or_default()
    }

    /// `ws://127.0.0.1:PORT/v1`.
    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/v1", self.port)
    }

    /// Connects with this Origin and the right Host.
    pub async fn connect(&self, origin: &str) -> Result<Client> {
        Client::connect(self.port, Some(origin), None).await
    }

    /// Runs `keyport --config CONFIG ARGS…` with the token's environment.
    pub fn keyport(&self, args: &[&str]) -> Result<Output> {
        self.keyport_command(args)
            .output()
            .context("running keyport")
    }

    /// [`Agent::keyport`] for a command that asks the user: its dialogs take the next steps of
    /// this agent's pinentry script and land in its transcript.
    pub fn keyport_with_dialogs(&self, args: &[&str]) -> Result<Output> {
        self.keyport_command(args)
            .envs(self.script.env())
            .output()
            .context("running keyport")
    }

    fn keyport_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(keyport_bin());
        cmd.arg("--config")
            .arg(&self.config)
            .args(args)
            .env("SOFTHSM2_CONF", &self.softhsm_conf)
            .envs(
                self.skf_state
                    .iter()
                    .map(|state| ("KEYPORT_SOFT_SKF_DIR", state.as_os_str())),
            )
            .stdin(Stdio::null());
        cmd
    }

    /// Replaces the fault module's control file atomically (`pin_locked=1`, …).
    pub fn set_fault(&self, control: &str) -> Result<()> {
        let next = self.dir().join("fault.control.next");
        fs::write(&next, control)?;
        fs::rename(&next, self.dir().join("fault.control"))?;
        Ok(())
    }

    /// How many calls of `function` (e.g. `C_Login`) the fault module logged.
    pub fn fault_calls(&self, function: &str) -> usize {
        let prefix = format!("{function} ");
        fs::read_to_string(self.dir().join("fault.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with(&prefix))
            .count()
    }

    /// The fault module's call log, one line per call (`C_Login CKU_USER pin rv=0x00000000`).
    pub fn fault_log(&self) -> Vec<String> {
        fs::read_to_string(self.dir().join("fault.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Kills the agent with SIGKILL (no clean-up of its own) and reaps it.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("already stopped");
        };
        child.kill()?;
        Ok(child.wait()?)
    }

    /// The agent's child processes (its module hosts, a dialog program) while it runs.
    pub fn children(&self) -> Vec<u32> {
        let Some(pid) = self.pid() else {
            return Vec::new();
        };
        let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
            return Vec::new();
        };
        tasks
            .filter_map(|t| fs::read_to_string(t.ok()?.path().join("children")).ok())
            .flat_map(|c| {
                c.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect::<Vec<u32>>()
            })
            .collect()
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("already stopped");
        };
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -TERM failed");
        }
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("keyport did not exit within {DEADLINE:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Lines the agent printed on stdout after the listening line.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout_rest
            .as_ref()
            .map(|rx| rx.try_iter().collect())
            .unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.is_some() {
            if let Err(e) = self.stop() {
                eprintln!("stopping keyport: {e}");
            }
        }
    }
}

/// A JSON-RPC error as the agent sent it.
#[derive(Debug, Clone, PartialEq)]
pub struct RpcErrorValue {
    pub code: i64,
    pub message: String,
    /// `data.reason`.
    pub reason: String,
    pub data: Value,
}

impl RpcErrorValue {
    fn from_json(error: &Value) -> RpcErrorValue {
        RpcErrorValue {
            code: error["code"].as_i64().unwrap_or_default(),
            message: error["message"].as_str().unwrap_or_default().to_owned(),
            reason: error["data"]["reason"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            data: error["data"].clone(),
        }
    }
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What ended a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Closed {
    /// A close frame with this code.
    Code(u16),
    /// The stream ended without a close frame (or with an error).
    Abrupt(String),
}

/// A WebSocket client of the agent.
#[derive(Debug)]
pub struct Client {
    ws: Ws,
    next_id: u64,
    /// Responses that arrived while waiting for another id.
    responses: VecDeque<Value>,
    /// Notifications (messages without `id`), in arrival order.
    pub notifications: Vec<Value>,
    /// Set once the connection closed.
    pub closed: Option<Closed>,
}

impl Client {
    /// Connects to `/v1` with the given Origin (None: no header) and Host (None:
    /// `127.0.0.1:PORT`). A refused handshake is an error whose text holds the status.
    pub async fn connect(port: u16, origin: Option<&str>, host: Option<&str>) -> Result<Client> {
        match Self::try_connect(port, origin, host).await? {
            Ok(client) => Ok(client),
            Err(status) => bail!("handshake refused with HTTP {status}"),
        }
    }

    /// Like [`Client::connect`] but a refused handshake gives its HTTP status.
    pub async fn try_connect(
        port: u16,
        origin: Option<&str>,
        host: Option<&str>,
    ) -> Result<std::result::Result<Client, u16>> {
        let mut request = format!("ws://127.0.0.1:{port}/v1").into_client_request()?;
        let headers = request.headers_mut();
        if let Some(origin) = origin {
            headers.insert("Origin", HeaderValue::from_str(origin)?);
        }
        if let Some(host) = host {
            headers.insert("Host", HeaderValue::from_str(host)?);
        }
        let connecting = tokio_tungstenite::connect_async_with_config(request, None, false);
        match tokio::time::timeout(DEADLINE, connecting).await {
            Err(_) => bail!("handshake took longer than {DEADLINE:?}"),
            Ok(Ok((ws, _))) => Ok(Ok(Client {
                ws,
                next_id: 1,
                responses: VecDeque::new(),
                notifications: Vec::new(),
                closed: None,
            })),
            Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp))) => {
                Ok(Err(resp.status().as_u16()))
            }
            Ok(Err(e)) => Err(e.into()),
        }
    }

    /// Sends a request and returns its id, without waiting.
    pub async fn send(&mut self, method: &str, params: Value) -> Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        let text = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        self.send_raw(&text.to_string()).await?;
        Ok(id)
    }

    /// Sends one text frame as is.
    pub async fn send_raw(&mut self, text: &str) -> Result<()> {
        self.ws.send(Message::text(text.to_owned())).await?;
        Ok(())
    }

    /// Sends one frame exactly as built (invalid UTF-8 in a text frame, reserved bits …).
    pub async fn send_frame(
        &mut self,
        frame: tokio_tungstenite::tungstenite::protocol::frame::Frame,
    ) -> Result<()> {
        self.ws.send(Message::Frame(frame)).await?;
        Ok(())
    }

    /// Sends one binary frame.
    pub async fn send_binary(&mut self, bytes: Vec<u8>) -> Result<()> {
        self.ws.send(Message::binary(bytes)).await?;
        Ok(())
    }

    /// Sends and waits for the answer.
    pub async fn call(
        &mut self,
        method: &str,
        params: Value,
    ) -> Result<std::result::Result<Value, RpcErrorValue>> {
        let id = self.send(method, params).await?;
        self.response(id).await
    }

    /// Calls and expects an error with this reason; returns it.
    pub async fn call_err(
        &mut self,
        method: &str,
        params: Value,
        reason: &str,
    ) -> Result<RpcErrorValue> {
        match self.call(method, params).await? {
            Ok(v) => bail!("{method}: expected {reason}, got result {v}"),
            Err(e) if e.reason == reason => Ok(e),
            Err(e) => bail!("{method}: expected {reason}, got {e:?}"),
        }
    }

    /// Calls and expects a result.
    pub async fn call_ok(&mut self, method: &str, params: Value) -> Result<Value> {
        match self.call(method, params).await? {
            Ok(v) => Ok(v),
            Err(e) => bail!("{method}: expected a result, got {e:?}"),
        }
    }

    /// Waits for the answer to `id` (other answers are kept, notifications collected).
    pub async fn response(&mut self, id: u64) -> Result<std::result::Result<Value, RpcErrorValue>> {
        let wanted = json!(id);
        loop {
            if let Some(pos) = self.responses.iter().position(|r| r["id"] == wanted) {
                let message = self.responses.remove(pos).unwrap_or_default();
                return Ok(match message.get("error") {
                    Some(error) => Err(RpcErrorValue::from_json(error)),
                    None => Ok(message["result"].clone()),
                });
            }
            let message = self.next_json().await?;
            self.responses.push_back(message);
        }
    }

    /// The next response (a message with `id`), collecting notifications on the way.
    pub async fn next_json(&mut self) -> Result<Value> {
        loop {
            match self.next_message().await? {
                Message::Text(text) => {
                    let value: Value = serde_json::from_str(text.as_str())
                        .with_context(|| format!("agent sent non-JSON {text:?}"))?;
                    if value.get("id").is_some() {
                        return Ok(value);
                    }
                    self.notifications.push(value);
                }
                Message::Close(frame) => {
                    let code = frame.as_ref().map_or(1005, close_code);
                    self.closed = Some(Closed::Code(code));
                    bail!("connection closed with {code}");
                }
                _ => {}
            }
        }
    }

    /// The next frame, within [`DEADLINE`].
    pub async fn next_message(&mut self) -> Result<Message> {
        if let Some(closed) = &self.closed {
            bail!("connection already closed: {closed:?}");
        }
        match tokio::time::timeout(DEADLINE, self.ws.next()).await {
            Err(_) => bail!("no message within {DEADLINE:?}"),
            Ok(None) => {
                self.closed = Some(Closed::Abrupt("end of stream".into()));
                bail!("connection ended")
            }
            Ok(Some(Err(e))) => {
                self.closed = Some(Closed::Abrupt(e.to_string()));
                bail!("connection failed: {e}")
            }
            Ok(Some(Ok(message))) => {
                if let Message::Close(frame) = &message {
                    self.closed = Some(Closed::Code(frame.as_ref().map_or(1005, close_code)));
                }
                Ok(message)
            }
        }
    }

    /// Reads until the connection closes; returns how (responses and notifications on the way
    /// are kept).
    pub async fn wait_closed(&mut self) -> Result<Closed> {
        loop {
            if let Some(closed) = &self.closed {
                return Ok(closed.clone());
            }
            match self.next_message().await {
                Ok(Message::Text(text)) => {
                    let value: Value = serde_json::from_str(text.as_str())?;
                    if value.get("id").is_some() {
                        self.responses.push_back(value);
                    } else {
                        self.notifications.push(value);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if self.closed.is_none() {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// Closes the connection politely.
    pub async fn close(mut self) -> Result<()> {
        self.ws.close(None).await?;
        Ok(())
    }
}

fn close_code(frame: &CloseFrame) -> u16 {
    frame.code.into()
}

/// Sends `request` (a whole HTTP request head) to the agent and returns the response's status
/// and the whole response text.
pub fn http_exchange(port: u16, request: &str) -> Result<(u16, String)> {
    let mut stream = StdTcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(DEADLINE))?;
    stream.write_all(request.as_bytes())?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    // A refusal has no body: the head is everything.
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    return Ok((status_of(&head)?, head));
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    Ok((status_of(&text)?, text))
}

fn status_of(head: &str) -> Result<u16> {
    head.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("no HTTP status in {head:?}"))
}

/// An upgrade request head for `/v1` with these headers (`None` leaves one out).
pub fn upgrade_request(host: Option<&str>, origin: Option<&str>) -> String {
    let mut text = String::from(
        "GET /v1 HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
    );
    if let Some(host) = host {
        text.push_str(&format!("Host: {host}\r\n"));
    }
    if let Some(origin) = origin {
        text.push_str(&format!("Origin: {origin}\r\n"));
    }
    text.push_str("\r\n");
    text
}

// ---------------------------------------------------------------------------------------------
// Verification

/// A hash of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hash {
    Sha256,
    Sha384,
    Sha512,
}

impl Hash {
    pub fn openssl(self) -> &'static str {
        match self {
            Hash::Sha256 => "sha256",
            Hash::Sha384 => "sha384",
            Hash::Sha512 => "sha512",
        }
    }

    /// The protocol's name (`SHA-256`).
    pub fn wire(self) -> &'static str {
        match self {
            Hash::Sha256 => "SHA-256",
            Hash::Sha384 => "SHA-384",
            Hash::Sha512 => "SHA-512",
        }
    }

    pub fn digest(self, data: &[u8]) -> Vec<u8> {
        match self {
            Hash::Sha256 => sha2::Sha256::digest(data).to_vec(),
            Hash::Sha384 => sha2::Sha384::digest(data).to_vec(),
            Hash::Sha512 => sha2::Sha512::digest(data).to_vec(),
        }
    }
}

/// How a raw signature was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawAlg {
    RsaPkcs1(Hash),
    RsaPss(Hash),
    EcdsaDer(Hash),
    EcdsaP1363(Hash),
    /// Over the data itself.
    Ed25519,
}

impl RawAlg {
    fn python_name(self) -> (&'static str, Hash) {
        match self {
            RawAlg::RsaPkcs1(h) => ("rsa-pkcs1", h),
            RawAlg::RsaPss(h) => ("rsa-pss", h),
            RawAlg::EcdsaDer(h) => ("ecdsa-der", h),
            RawAlg::EcdsaP1363(h) => ("ecdsa-p1363", h),
            RawAlg::Ed25519 => ("ed25519", Hash::Sha512),
        }
    }
}

/// What was signed: the document (data) or its digest.
#[derive(Debug, Clone)]
pub enum Signed {
    Data(Vec<u8>),
    Digest(Vec<u8>),
}

/// Checks a raw signature with OpenSSL and with Python `cryptography`; Err says which failed.
pub fn verify_raw(cert_pem: &Path, signed: &Signed, sig: &[u8], alg: RawAlg) -> Result<()> {
    openssl_verify_raw(cert_pem, signed, sig, alg)?;
    python_verify_raw(cert_pem, signed, sig, alg)
}

/// `openssl pkeyutl -verify` over the digest (Ed25519: `-rawin` over the data).
pub fn openssl_verify_raw(cert_pem: &Path, signed: &Signed, sig: &[u8], alg: RawAlg) -> Result<()> {
    let dir = TempDir::new()?;
    let public = public_key_pem(cert_pem, dir.path())?;
    let (_, hash) = alg.python_name();
    let input = match (alg, signed) {
        (RawAlg::Ed25519, Signed::Data(d)) => d.clone(),
        (RawAlg::Ed25519, Signed::Digest(_)) => bail!("Ed25519 signs data"),
        (_, Signed::Data(d)) => hash.digest(d),
        (_, Signed::Digest(d)) => d.clone(),
    };
    let sig = match alg {
        RawAlg::EcdsaP1363(_) => p1363_to_der(sig)?,
        _ => sig.to_vec(),
    };
    fs::write(dir.path().join("in.bin"), &input)?;
    fs::write(dir.path().join("sig.bin"), &sig)?;
    let mut cmd = Command::new("openssl");
    cmd.current_dir(dir.path())
        .args(["pkeyutl", "-verify", "-pubin", "-inkey"])
        .arg(&public)
        .args(["-in", "in.bin", "-sigfile", "sig.bin"]);
    let digest_opt = format!("digest:{}", hash.openssl());
    match alg {
        RawAlg::RsaPkcs1(_) => {
            cmd.args(["-pkeyopt", &digest_opt]);
        }
        RawAlg::RsaPss(_) => {
            cmd.args([
                "-pkeyopt",
                "rsa_padding_mode:pss",
                "-pkeyopt",
                "rsa_pss_saltlen:digest",
                "-pkeyopt",
                &digest_opt,
            ]);
        }
        RawAlg::EcdsaDer(_) | RawAlg::EcdsaP1363(_) => {}
        RawAlg::Ed25519 => {
            cmd.arg("-rawin");
        }
    }
    let out = cmd.output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !stdout.contains("Signature Verified Successfully") {
        bail!(
            "openssl pkeyutl -verify ({alg:?}) failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// `tests/verify/verify.py raw …`: the certificate's public key checks the signature.
pub fn python_verify_raw(cert_pem: &Path, signed: &Signed, sig: &[u8], alg: RawAlg) -> Result<()> {
    let dir = TempDir::new()?;
    let (name, hash) = alg.python_name();
    let (kind, bytes) = match signed {
        Signed::Data(d) => ("data", d),
        Signed::Digest(d) => ("digest", d),
    };
    fs::write(dir.path().join("in.bin"), bytes)?;
    fs::write(dir.path().join("sig.bin"), sig)?;
    python(&[
        "raw",
        &cert_pem.to_string_lossy(),
        name,
        hash.openssl(),
        kind,
        &dir.path().join("in.bin").to_string_lossy(),
        &dir.path().join("sig.bin").to_string_lossy(),
    ])
}

/// A detached CMS SignedData checked over `doc`: `openssl cms -verify` against the CA (not for
/// Ed25519, which OpenSSL 3.0 cannot verify) and Python (signed attributes, messageDigest,
/// signature with the embedded certificate, which must be `cert_pem`'s).
pub fn verify_cms(der: &[u8], doc: &[u8], ca_pem: &Path, cert_pem: &Path) -> Result<()> {
    let dir = TempDir::new()?;
    let (sig, content) = (dir.path().join("sig.der"), dir.path().join("doc.bin"));
    fs::write(&sig, der)?;
    fs::write(&content, doc)?;
    python_verify_cms(&sig, &content, cert_pem)?;
    let is_ed25519 = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(cert_pem)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("ED25519"))
        .unwrap_or(false);
    if !is_ed25519 {
        openssl_verify_cms(&sig, &content, ca_pem)?;
    }
    Ok(())
}

/// `tests/verify/verify.py cms`: signed attributes, messageDigest over `content`, and the
/// signature with the embedded certificate, which must be `cert_pem`'s. Ed25519 too.
pub fn python_verify_cms(sig: &Path, content: &Path, cert_pem: &Path) -> Result<()> {
    python(&[
        "cms",
        &sig.to_string_lossy(),
        &content.to_string_lossy(),
        &cert_pem.to_string_lossy(),
    ])
}

/// `openssl cms -verify` of a detached DER SignedData over `content`, chained to `ca_pem`.
pub fn openssl_verify_cms(sig: &Path, content: &Path, ca_pem: &Path) -> Result<()> {
    let out = Command::new("openssl")
        .args(["cms", "-verify", "-binary", "-inform", "DER", "-in"])
        .arg(sig)
        .arg("-content")
        .arg(content)
        .args(["-purpose", "any", "-out", "/dev/null", "-CAfile"])
        .arg(ca_pem)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || !stderr.contains("Verification successful") {
        bail!("openssl cms -verify failed: {stderr}");
    }
    Ok(())
}

/// Checks a Web eID token as a relying party does (Python) and the signature with OpenSSL.
pub fn verify_webeid(token: &Value, origin: &str, challenge: &str, cert_pem: &Path) -> Result<()> {
    let dir = TempDir::new()?;
    let path = dir.path().join("token.json");
    fs::write(&path, token.to_string())?;
    python(&[
        "webeid",
        &path.to_string_lossy(),
        origin,
        challenge,
        &cert_pem.to_string_lossy(),
    ])?;
    // OpenSSL: the same message, hashed by the algorithm.
    let alg = token["algorithm"].as_str().unwrap_or_default();
    let sig = B64.decode(token["signature"].as_str().unwrap_or_default())?;
    let hash = match alg {
        "ES384" | "RS384" | "PS384" => Hash::Sha384,
        "ES512" | "RS512" | "PS512" => Hash::Sha512,
        _ => Hash::Sha256,
    };
    let eddsa = alg == "EdDSA";
    let inner = if eddsa { Hash::Sha256 } else { hash };
    let mut message = inner.digest(origin.as_bytes());
    message.extend(inner.digest(challenge.as_bytes()));
    let raw = match alg {
        "EdDSA" => RawAlg::Ed25519,
        a if a.starts_with("ES") => RawAlg::EcdsaP1363(hash),
        a if a.starts_with("PS") => RawAlg::RsaPss(hash),
        _ => RawAlg::RsaPkcs1(hash),
    };
    openssl_verify_raw(cert_pem, &Signed::Data(message), &sig, raw)
}

fn python(args: &[&str]) -> Result<()> {
    let script = repo_root().join("tests/verify/verify.py");
    let out = Command::new("python3").arg(&script).args(args).output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !stdout.contains("OK") {
        bail!(
            "verify.py {} failed: {stdout}{}",
            args.first().copied().unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn public_key_pem(cert_pem: &Path, dir: &Path) -> Result<PathBuf> {
    let out = Command::new("openssl")
        .args(["x509", "-pubkey", "-noout", "-in"])
        .arg(cert_pem)
        .output()?;
    if !out.status.success() {
        bail!(
            "openssl x509 -pubkey: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let path = dir.join("pub.pem");
    fs::write(&path, out.stdout)?;
    Ok(path)
}

/// r ‖ s → DER `SEQUENCE { INTEGER r, INTEGER s }`.
pub fn p1363_to_der(sig: &[u8]) -> Result<Vec<u8>> {
    if sig.is_empty() || !sig.len().is_multiple_of(2) {
        bail!("a P1363 signature has an even, non-zero length");
    }
    let (r, s) = sig.split_at(sig.len() / 2);
    let int = |v: &[u8]| {
        let mut v: Vec<u8> = v.iter().copied().skip_while(|b| *b == 0).collect();
        if v.first().is_none_or(|b| b & 0x80 != 0) {
            v.insert(0, 0);
        }
        let mut out = vec![0x02];
        push_len(&mut out, v.len());
        out.extend(v);
        out
    };
    let mut body = int(r);
    body.extend(int(s));
    let mut out = vec![0x30];
    push_len(&mut out, body.len());
    out.extend(body);
    Ok(out)
}

fn push_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else if len < 0x100 {
        out.extend([0x81, len as u8]);
    } else {
        out.extend([0x82, (len >> 8) as u8, len as u8]);
    }
}

/// Standard base64 with padding.
pub fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

/// Decodes a base64 field of a result.
pub fn unb64(value: &Value) -> Result<Vec<u8>> {
    let text = value
        .as_str()
        .ok_or_else(|| anyhow!("not a base64 string: {value}"))?;
    Ok(B64.decode(text)?)
}

/// The id of the certificate whose CKA_LABEL is `label`, from `keyport certs --json`… or from a
/// `certificates.list` result: the entry whose certificate equals the token folder's
/// `certs/<label>.der`.
pub fn certificate_id(list: &Value, der: &[u8]) -> Result<String> {
    let wanted = b64(der);
    list["certificates"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["certificate"] == wanted.as_str())
        .and_then(|c| c["id"].as_str())
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no certificate entry for that DER in {list}"))
}

/// The members of a `tokens.list` entry (docs/protocol.md), sorted; `keyport tokens --json` has
/// the same.
pub const TOKEN_ENTRY_FIELDS: [&str; 8] = [
    "id",
    "label",
    "manufacturer",
    "model",
    "pin",
    "pinPad",
    "reader",
    "serial",
];

/// The key pairs of the provisioned token (softhsm-config/provision.sh): CKA_LABEL, CKA_ID
/// (hex), key algorithm (the protocol's name).
pub const KEYS: [(&str, &str, &str); 10] = [
    ("sign-rsa2048", "01", "RSA-2048"),
    ("sign-rsa3072", "02", "RSA-3072"),
    ("sign-p256", "03", "EC-P256"),
    ("sign-p384", "04", "EC-P384"),
    ("sign-ed25519", "05", "Ed25519"),
    ("auth-p256", "06", "EC-P256"),
    ("sign-p256-always", "07", "EC-P256"),
    ("sign-rsa2048-always", "08", "RSA-2048"),
    ("sign-ed25519-always", "09", "Ed25519"),
    ("sign-p384-always", "0a", "EC-P384"),
];

/// `label → certificateId` from the agent's `certificates.list`, matched by certificate DER.
pub async fn certificate_ids(
    client: &mut Client,
    token: &TestToken,
) -> Result<std::collections::HashMap<String, String>> {
    let list = client
        .call_ok("certificates.list", json!({}))
        .await
        .context("certificates.list")?;
    let mut ids = std::collections::HashMap::new();
    for (label, _, _) in KEYS {
        ids.insert(
            label.to_owned(),
            certificate_id(&list, &token.cert_der(label)?)?,
        );
    }
    Ok(ids)
}

/// `certificates.list` again and again (every 50 ms, at most `deadline`) until `done` holds for
/// the answer, which it returns; an error names `what` did not show. For what no event reports:
/// a change made by another program shows once the agent's cache has aged (1 s).
pub async fn certificates_until(
    client: &mut Client,
    what: &str,
    deadline: Duration,
    done: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let start = Instant::now();
    loop {
        let list = client
            .call_ok("certificates.list", json!({}))
            .await
            .context("certificates.list")?;
        if done(&list) {
            return Ok(list);
        }
        if start.elapsed() >= deadline {
            let n = list["certificates"].as_array().map_or(0, Vec::len);
            bail!("after {deadline:?} certificates.list still shows no change ({what}): {n} certificates");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A base64 nonce of `len` random bytes.
pub fn nonce(len: usize) -> Result<String> {
    let mut bytes = vec![0u8; len];
    fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(b64(&bytes))
}
