//! What the `cli_*` tests share: a provisioned SoftHSM token per test, a config for it, the
//! scripted pinentry, the real `keyport` binary run as a child process, and OpenSSL checks of
//! files. The token, the binaries' places and the signature checks are the harness's
//! (`keyport_e2e::harness`); this module adds the one-shot command's side.
//!
//! The binaries are not built by `cargo test -p keyport-e2e` (the agent is only a library
//! dev-dependency): build them first with
//! `cargo build -p agent -p keyport-e2e -p keyport-fault-pkcs11` (scripts/test-all.sh does).
#![allow(dead_code)] // each cli_* test file uses a different part of this module

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use keyport_e2e::harness::{self, Hash, RawAlg, Signed, TestToken, SOFTHSM};
use keyport_e2e::pinentry::{self, Dialog, Script, Step};
use serde_json::Value;
use tempfile::TempDir;

fn built(path: PathBuf) -> PathBuf {
    assert!(
        path.exists(),
        "{} is missing: run `cargo build -p agent -p keyport-e2e -p keyport-fault-pkcs11` first",
        path.display()
    );
    path
}

pub fn keyport_bin() -> PathBuf {
    built(harness::keyport_bin())
}

pub fn fault_module() -> PathBuf {
    built(harness::fault_module())
}

/// How a test's `keyport` is set up.
#[derive(Clone, Debug)]
pub struct Options {
    /// Load SoftHSM through the fault module (its call log and control file are then used).
    pub fault: bool,
    /// `signing_key_usage` in the config.
    pub signing_key_usage: &'static str,
    /// Extra `[[modules]]` paths, listed before the token's module.
    pub extra_modules: Vec<PathBuf>,
    /// Leave the token's module out of the config (only `extra_modules`).
    pub no_token_module: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            fault: false,
            signing_key_usage: "non-repudiation",
            extra_modules: Vec::new(),
            no_token_module: false,
        }
    }
}

/// One test's world: a token, a config, a pinentry script, a work folder.
pub struct Cli {
    dir: TempDir,
    token: TestToken,
    pub config: PathBuf,
    pub script: Script,
    fault: bool,
}

impl Cli {
    pub fn new() -> Cli {
        Cli::with(Options::default())
    }

    pub fn with(options: Options) -> Cli {
        let dir = tempfile::Builder::new()
            .prefix("keyport-cli-")
            .tempdir()
            .expect("tempdir");
        let token = TestToken::provision().expect("provision a token");
        harness::write_audit_key(&dir.path().join("audit.key")).expect("audit key");

        let mut modules: Vec<PathBuf> = options.extra_modules.clone();
        if !options.no_token_module {
            modules.push(if options.fault {
                fault_module()
            } else {
                PathBuf::from(SOFTHSM)
            });
        }
        let config = dir.path().join("config.toml");
        fs::write(
            &config,
            config_text(dir.path(), &modules, options.signing_key_usage, ""),
        )
        .expect("write config");
        let script = Script::new(dir.path()).expect("pinentry script");
        Cli {
            token,
            config,
            script,
            fault: options.fault,
            dir,
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The provisioned token (its folder, `SOFTHSM2_CONF`, certificates).
    pub fn token(&self) -> &TestToken {
        &self.token
    }

    pub fn ca_pem(&self) -> PathBuf {
        self.token.ca_pem()
    }

    pub fn cert_pem(&self, label: &str) -> PathBuf {
        self.token.cert_pem(label)
    }

    pub fn fault_log(&self) -> PathBuf {
        self.dir.path().join("fault.log")
    }

    pub fn fault_control(&self) -> PathBuf {
        self.dir.path().join("fault.control")
    }

    /// Rewrites the fault module's control file atomically.
    pub fn set_fault(&self, control: &str) {
        let next = self.dir.path().join("fault.control.next");
        fs::write(&next, control).expect("write control");
        fs::rename(&next, self.fault_control()).expect("rename control");
    }

    /// How many calls of `function` the fault module logged.
    pub fn fault_calls(&self, function: &str) -> usize {
        let log = fs::read_to_string(self.fault_log()).unwrap_or_default();
        let prefix = format!("{function} ");
        log.lines().filter(|l| l.starts_with(&prefix)).count()
    }

    /// `keyport` as this test's user runs it: `--config`, the token's SOFTHSM2_CONF, the scripted
    /// pinentry's environment, and (with the fault module) its variables.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(keyport_bin());
        cmd.arg("--config")
            .arg(&self.config)
            .env("SOFTHSM2_CONF", self.token.conf())
            .env("RUST_BACKTRACE", "1")
            .env_remove("KEYPORT_LOG")
            .current_dir(self.dir.path());
        for (k, v) in self.script.env() {
            cmd.env(k, v);
        }
        if self.fault {
            cmd.env("KEYPORT_FAULT_TARGET", SOFTHSM)
                .env("KEYPORT_FAULT_LOG", self.fault_log())
                .env("KEYPORT_FAULT_CONTROL", self.fault_control());
        }
        cmd
    }

    pub fn run<S: AsRef<OsStr>>(&self, args: &[S]) -> Output {
        self.command().args(args).output().expect("run keyport")
    }

    /// `keyport certs --json`, which must succeed.
    pub fn certs(&self) -> Vec<Value> {
        let out = self.run(&["certs", "--json"]);
        assert!(out.status.success(), "certs --json: {}", stderr(&out));
        match serde_json::from_slice(&out.stdout).expect("certs --json is JSON") {
            Value::Array(list) => list,
            other => panic!("certs --json is not an array: {other}"),
        }
    }

    /// The certificate id of the key with this CKA_LABEL.
    pub fn cert_id(&self, label: &str) -> String {
        self.certs()
            .iter()
            .find(|c| c["label"] == label)
            .and_then(|c| c["id"].as_str())
            .unwrap_or_else(|| panic!("no certificate labelled {label}"))
            .to_owned()
    }

    /// Writes `content` to a file in the work folder.
    pub fn file(&self, name: &str, content: &[u8]) -> PathBuf {
        let path = self.dir.path().join(name);
        fs::write(&path, content).expect("write file");
        path
    }

    /// Queues answers for the next dialogs.
    pub fn answer(&self, steps: &[Step]) {
        self.script.push_all(steps).expect("push steps");
    }

    pub fn dialogs(&self) -> Vec<Dialog> {
        self.script.dialogs().expect("pinentry transcript")
    }

    /// `keyport sign --cert ID --in IN --out OUT EXTRA…`.
    pub fn sign(&self, id: &str, input: &Path, output: &Path, extra: &[&str]) -> Output {
        let mut cmd = self.command();
        cmd.args(["sign", "--cert", id, "--in"])
            .arg(input)
            .arg("--out")
            .arg(output)
            .args(extra);
        cmd.output().expect("run keyport sign")
    }
}

/// A config as common.md shows it, for `dir`, with these modules and extra top-level lines.
pub fn config_text(dir: &Path, modules: &[PathBuf], key_usage: &str, extra: &str) -> String {
    let mut text = format!(
        r#"port = 0
discover_modules = false
pinentry = "{pinentry}"
audit_key_file = "{dir}/audit.key"
audit_log = "{dir}/audit.log"
allowed_origins = ["https://portal.example"]
denied_origins = []
unknown_origins = "prompt"
allow_insecure_localhost_origins = false
pin_cache_seconds = 0
dialog_timeout_seconds = 120
signing_key_usage = "{key_usage}"
{extra}
"#,
        pinentry = pinentry::program().display(),
        dir = dir.display(),
    );
    for m in modules {
        text.push_str(&format!("[[modules]]\npath = \"{}\"\n", m.display()));
    }
    text.push_str(
        r#"[[origin_policy]]
origin = "https://intranet.example"
consent = "session"
[limits]
max_message_bytes = 262144
max_connections_per_origin = 8
max_connections = 64
requests_per_second = 20
handshake_timeout_seconds = 5
"#,
    );
    text
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A failure as the issue wants it: non-zero exit, exactly one non-empty line on stderr, no
/// panic or backtrace text. Returns that line.
pub fn one_line_failure(out: &Output) -> String {
    let err = stderr(out);
    assert!(
        !out.status.success(),
        "expected a failure; stdout {:?} stderr {err:?}",
        stdout(out)
    );
    for bad in ["panicked", "backtrace", "RUST_BACKTRACE", "stack backtrace"] {
        assert!(!err.contains(bad), "{bad:?} on stderr: {err}");
    }
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line on stderr, got {err:?}");
    assert!(lines[0].starts_with("keyport: "), "{err}");
    lines[0].to_owned()
}

// ---- OpenSSL ----------------------------------------------------------------------------

/// Runs openssl; returns (success, stdout+stderr).
pub fn openssl<S: AsRef<OsStr>>(args: &[S]) -> (bool, String) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("run openssl");
    let mut text = stdout(&out);
    text.push_str(&stderr(&out));
    (out.status.success(), text)
}

/// How a raw signature is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Pkcs1,
    Pss,
    /// DER-encoded ECDSA.
    Ecdsa,
    Ed25519,
}

/// OpenSSL's check of a raw signature in `sig` over the document in `data` (hashed with `hash`,
/// `sha256`…, except Ed25519); `harness::openssl_verify_raw` runs it. A rejection is printed.
pub fn verify_raw(cert_pem: &Path, scheme: Scheme, hash: &str, data: &Path, sig: &Path) -> bool {
    let hash = || match hash {
        "sha256" => Hash::Sha256,
        "sha384" => Hash::Sha384,
        "sha512" => Hash::Sha512,
        other => panic!("no such hash in the tests: {other:?}"),
    };
    let alg = match scheme {
        Scheme::Pkcs1 => RawAlg::RsaPkcs1(hash()),
        Scheme::Pss => RawAlg::RsaPss(hash()),
        Scheme::Ecdsa => RawAlg::EcdsaDer(hash()),
        // Ed25519 signs the document itself: no hash.
        Scheme::Ed25519 => RawAlg::Ed25519,
    };
    let data = Signed::Data(fs::read(data).expect("read the signed document"));
    let sig = fs::read(sig).expect("read the signature");
    harness::openssl_verify_raw(cert_pem, &data, &sig, alg)
        .inspect_err(|e| eprintln!("{e:#}"))
        .is_ok()
}

/// `openssl cms -verify` of a detached DER SignedData over `content`, chained to `ca`; the
/// failure's text when it fails.
pub fn verify_cms(ca: &Path, content: &Path, sig: &Path) -> (bool, String) {
    match harness::openssl_verify_cms(sig, content, ca) {
        Ok(()) => (true, String::new()),
        Err(e) => (false, format!("{e:#}")),
    }
}

/// Turns an r‖s (P1363) signature file into DER; writes it beside, returns its path.
pub fn p1363_to_der(sig: &Path) -> PathBuf {
    let raw = fs::read(sig).expect("read p1363 signature");
    let der = sig.with_extension("der");
    fs::write(&der, harness::p1363_to_der(&raw).expect("r‖s")).expect("write DER signature");
    der
}

/// One field of `openssl x509 -noout -FIELD -nameopt RFC2253 -dateopt iso_8601`, without the
/// `name=` prefix.
pub fn x509_field(cert_pem: &Path, field: &str) -> String {
    let (ok, text) = openssl(&[
        OsStr::new("x509"),
        OsStr::new("-in"),
        cert_pem.as_os_str(),
        OsStr::new("-noout"),
        OsStr::new(&format!("-{field}")),
        OsStr::new("-nameopt"),
        OsStr::new("RFC2253"),
        OsStr::new("-dateopt"),
        OsStr::new("iso_8601"),
    ]);
    assert!(ok, "openssl x509 -{field}: {text}");
    let line = text.lines().next().unwrap_or_default();
    line.split_once('=')
        .map(|(_, v)| v.to_owned())
        .unwrap_or_default()
}
