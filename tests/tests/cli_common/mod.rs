//! What the `cli_*` tests share: a provisioned SoftHSM token per test, a config for it, the
//! scripted pinentry, the real `keyport` binary run as a child process, and OpenSSL checks.
//!
//! The binaries are not built by `cargo test -p keyport-e2e` (the agent is only a library
//! dev-dependency): build them first with
//! `cargo build -p agent -p keyport-e2e -p keyport-fault-pkcs11` (scripts/test-all.sh does).
#![allow(dead_code)] // each cli_* test file uses a different part of this module

use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use keyport_e2e::pinentry::{self, Dialog, Script, Step};
use serde_json::Value;
use tempfile::TempDir;

pub const SOFTHSM: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// The eight keys of softhsm-config/provision.sh: label, CKA_ID, key algorithm (wire name).
pub const KEYS: [(&str, &str, &str); 8] = [
    ("sign-rsa2048", "01", "RSA-2048"),
    ("sign-rsa3072", "02", "RSA-3072"),
    ("sign-p256", "03", "EC-P256"),
    ("sign-p384", "04", "EC-P384"),
    ("sign-ed25519", "05", "Ed25519"),
    ("auth-p256", "06", "EC-P256"),
    ("sign-p256-always", "07", "EC-P256"),
    ("sign-rsa2048-always", "08", "RSA-2048"),
];

/// `target/debug` (or whichever profile runs the tests).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

fn built(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build -p agent -p keyport-e2e -p keyport-fault-pkcs11` first",
        path.display()
    );
    path
}

pub fn keyport_bin() -> PathBuf {
    built("keyport")
}

pub fn fault_module() -> PathBuf {
    built("libkeyport_fault_pkcs11.so")
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
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
    pub token_dir: PathBuf,
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
        let token_dir = dir.path().join("token");
        let out = Command::new(repo_root().join("softhsm-config/provision.sh"))
            .arg(&token_dir)
            .output()
            .expect("run provision.sh");
        assert!(
            out.status.success(),
            "provision.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let key = dir.path().join("audit.key");
        let mut random = [0u8; 32];
        fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut random))
            .expect("random bytes");
        write_private(&key, &random);

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
            token_dir,
            config,
            script,
            fault: options.fault,
            dir,
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn ca_pem(&self) -> PathBuf {
        self.token_dir.join("ca.pem")
    }

    pub fn cert_pem(&self, label: &str) -> PathBuf {
        self.token_dir.join("certs").join(format!("{label}.pem"))
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
            .env("SOFTHSM2_CONF", self.token_dir.join("softhsm2.conf"))
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

fn write_private(path: &Path, bytes: &[u8]) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .expect("create key file");
    f.write_all(bytes).expect("write key file");
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

/// The certificate's public key as PEM, in a file beside it.
pub fn public_key(cert_pem: &Path) -> PathBuf {
    let pub_pem = cert_pem.with_extension("pub.pem");
    if !pub_pem.exists() {
        let (ok, text) = openssl(&[
            OsStr::new("x509"),
            OsStr::new("-in"),
            cert_pem.as_os_str(),
            OsStr::new("-pubkey"),
            OsStr::new("-noout"),
            OsStr::new("-out"),
            pub_pem.as_os_str(),
        ]);
        assert!(ok, "openssl x509 -pubkey: {text}");
    }
    pub_pem
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

/// `openssl dgst -verify` (or `pkeyutl -verify -rawin` for Ed25519) of `sig` over `data`.
pub fn verify_raw(cert_pem: &Path, scheme: Scheme, hash: &str, data: &Path, sig: &Path) -> bool {
    let key = public_key(cert_pem);
    let mut args: Vec<&OsStr> = Vec::new();
    let digest_flag = format!("-{hash}");
    match scheme {
        Scheme::Ed25519 => {
            args.extend(["pkeyutl", "-verify", "-pubin", "-rawin", "-inkey"].map(OsStr::new));
            args.extend([key.as_os_str(), OsStr::new("-in"), data.as_os_str()]);
            args.extend([OsStr::new("-sigfile"), sig.as_os_str()]);
        }
        _ => {
            args.extend([OsStr::new("dgst"), OsStr::new(&digest_flag)]);
            if scheme == Scheme::Pss {
                args.extend(
                    [
                        "-sigopt",
                        "rsa_padding_mode:pss",
                        "-sigopt",
                        "rsa_pss_saltlen:digest",
                    ]
                    .map(OsStr::new),
                );
            }
            args.extend([OsStr::new("-verify"), key.as_os_str()]);
            args.extend([OsStr::new("-signature"), sig.as_os_str(), data.as_os_str()]);
        }
    }
    openssl(&args).0
}

/// `openssl cms -verify` of a detached DER SignedData over `content`, chained to `ca`.
pub fn verify_cms(ca: &Path, content: &Path, sig: &Path) -> (bool, String) {
    openssl(&[
        OsStr::new("cms"),
        OsStr::new("-verify"),
        OsStr::new("-binary"),
        OsStr::new("-inform"),
        OsStr::new("DER"),
        OsStr::new("-in"),
        sig.as_os_str(),
        OsStr::new("-content"),
        content.as_os_str(),
        OsStr::new("-CAfile"),
        ca.as_os_str(),
        OsStr::new("-purpose"),
        OsStr::new("any"),
        OsStr::new("-out"),
        OsStr::new("/dev/null"),
    ])
}

/// Turns an r‖s (P1363) signature into DER with `openssl asn1parse -genconf`; writes it beside.
pub fn p1363_to_der(sig: &Path) -> PathBuf {
    let raw = fs::read(sig).expect("read p1363 signature");
    assert!(
        raw.len().is_multiple_of(2) && !raw.is_empty(),
        "odd P1363 length"
    );
    let (r, s) = raw.split_at(raw.len() / 2);
    let conf = sig.with_extension("genconf");
    fs::write(
        &conf,
        format!(
            "asn1=SEQUENCE:sig\n[sig]\nr=INTEGER:0x{}\ns=INTEGER:0x{}\n",
            hex::encode_upper(r),
            hex::encode_upper(s)
        ),
    )
    .expect("write genconf");
    let der = sig.with_extension("der");
    let (ok, text) = openssl(&[
        OsStr::new("asn1parse"),
        OsStr::new("-genconf"),
        conf.as_os_str(),
        OsStr::new("-out"),
        der.as_os_str(),
        OsStr::new("-noout"),
    ]);
    assert!(ok, "asn1parse -genconf: {text}");
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
