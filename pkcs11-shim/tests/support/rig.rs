//! Test rig: a SoftHSM token provisioned per test by softhsm-config/provision.sh, loaded
//! through a private copy of libsofthsm2.so so that every test has its own SoftHSM instance
//! (SoftHSM reads SOFTHSM2_CONF once, at C_Initialize; copies of the library from different
//! paths are independent instances — softhsm-config/README.md).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, PoisonError};

use pkcs11_shim::{
    CertificateInfo, Credential, Error, LoginKind, Module, PinStatus, Progress, SecretPin,
    SignFailure, SignRequest, TokenId,
};

pub const SOFTHSM: &str = "/usr/lib/softhsm/libsofthsm2.so";
pub const SPY: &str = "/usr/lib/x86_64-linux-gnu/pkcs11/pkcs11-spy.so";
pub const USER_PIN: &str = "123456";
pub const TOKEN_LABEL: &str = "KeyPort Test";

/// Serialises "set the environment, then C_Initialize".
static LOAD_LOCK: Mutex<()> = Mutex::new(());

pub struct Rig {
    pub dir: tempfile::TempDir,
    pub module: Module,
    pub token: TokenId,
    /// The spy's log when loaded through pkcs11-spy.
    pub spy_log: Option<PathBuf>,
}

impl Rig {
    /// A fresh token, loaded directly.
    pub fn new() -> Rig {
        Rig::build(false)
    }

    /// A fresh token, loaded through OpenSC's pkcs11-spy (to count C_ calls).
    pub fn with_spy() -> Rig {
        Rig::build(true)
    }

    fn build(spy: bool) -> Rig {
        let dir = tempfile::Builder::new()
            .prefix("shim-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .expect("tempdir");
        provision(dir.path());
        let (module, spy_log) = load(dir.path(), spy);
        let tokens = module.tokens().expect("tokens");
        let token = tokens
            .iter()
            .find(|t| t.label == TOKEN_LABEL)
            .expect("provisioned token is present")
            .id
            .clone();
        Rig {
            dir,
            module,
            token,
            spy_log,
        }
    }

    /// Loads the same token store again as a new module instance (a new private copy).
    pub fn reload(&self, copy_name: &str) -> Module {
        load_copy(self.dir.path(), copy_name)
    }

    /// Loads `module_path` (an existing copy) over the token store in `dir`.
    pub fn reload_path(dir: &Path, module_path: &Path) -> Module {
        let _turn = LOAD_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
        std::env::set_var("SOFTHSM2_CONF", dir.join("softhsm2.conf"));
        Module::load(module_path).expect("reload")
    }

    pub fn cert_pem(&self, label: &str) -> PathBuf {
        self.dir.path().join("certs").join(format!("{label}.pem"))
    }

    pub fn cert_der(&self, label: &str) -> Vec<u8> {
        std::fs::read(self.dir.path().join("certs").join(format!("{label}.der"))).expect("der")
    }

    pub fn certificate(&self, label: &str) -> CertificateInfo {
        self.module
            .certificates(Some(&self.token))
            .expect("certificates")
            .into_iter()
            .find(|c| c.label == label)
            .unwrap_or_else(|| panic!("no certificate {label}"))
    }

    /// How many times C_Login went through the spy so far.
    pub fn spy_logins(&self) -> usize {
        let log = self.spy_log.as_ref().expect("loaded with the spy");
        let text = std::fs::read_to_string(log).unwrap_or_default();
        text.lines()
            .filter(|l| {
                l.split_once(": ")
                    .is_some_and(|(n, f)| n.chars().all(|c| c.is_ascii_digit()) && f == "C_Login")
            })
            .count()
    }
}

fn provision(dir: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../softhsm-config/provision.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(dir)
        .output()
        .expect("run provision.sh");
    assert!(
        out.status.success(),
        "provision.sh failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn load(dir: &Path, spy: bool) -> (Module, Option<PathBuf>) {
    if !spy {
        return (load_copy(dir, "libsofthsm2.so"), None);
    }
    let softhsm = dir.join("libsofthsm2.so");
    std::fs::copy(SOFTHSM, &softhsm).expect("copy softhsm");
    let spy_copy = dir.join("pkcs11-spy.so");
    std::fs::copy(SPY, &spy_copy).expect("copy spy");
    let log = dir.join("spy.log");
    let _turn = LOAD_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
    std::env::set_var("SOFTHSM2_CONF", dir.join("softhsm2.conf"));
    std::env::set_var("PKCS11SPY", &softhsm);
    std::env::set_var("PKCS11SPY_OUTPUT", &log);
    let module = Module::load(&spy_copy).expect("load spy");
    (module, Some(log))
}

fn load_copy(dir: &Path, name: &str) -> Module {
    let copy = dir.join(name);
    if !copy.exists() {
        std::fs::copy(SOFTHSM, &copy).expect("copy softhsm");
    }
    let _turn = LOAD_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
    std::env::set_var("SOFTHSM2_CONF", dir.join("softhsm2.conf"));
    Module::load(&copy).expect("load softhsm copy")
}

/// What the scripted user was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Asked {
    pub kind: LoginKind,
    pub attempt: u32,
    pub previous_error: Option<PinStatus>,
    pub protected_path: bool,
    pub certificate_label: String,
}

/// A scripted user, and the loop every caller of the shim runs (the agent's is in its
/// service): send the job; on `LoginRequired` or `PinIncorrect` ask the user (the next scripted
/// answer) and send the rest again; stop at the first cancel. Every question is recorded.
pub struct ScriptedPin {
    answers: std::vec::IntoIter<Option<&'static str>>,
    /// Asking at all is a test failure.
    forbidden: bool,
    pub log: std::sync::Arc<Mutex<Vec<Asked>>>,
}

pub type AskedLog = std::sync::Arc<Mutex<Vec<Asked>>>;

impl ScriptedPin {
    /// `Some(pin)` answers with a PIN, `None` cancels. Running out of answers cancels.
    pub fn new(answers: Vec<Option<&'static str>>) -> (Box<ScriptedPin>, AskedLog) {
        let log = std::sync::Arc::new(Mutex::new(Vec::new()));
        (
            Box::new(ScriptedPin {
                answers: answers.into_iter(),
                forbidden: false,
                log: log.clone(),
            }),
            log,
        )
    }

    /// Always answers the right PIN.
    pub fn right() -> (Box<ScriptedPin>, AskedLog) {
        ScriptedPin::new(vec![Some(USER_PIN); 100])
    }
}

/// A user who must not be asked.
pub fn no_pin() -> Box<ScriptedPin> {
    let mut p = ScriptedPin::new(Vec::new()).0;
    p.forbidden = true;
    p
}

/// [`Module::sign`] driven by a scripted user.
pub trait SignWith {
    fn sign_with(
        &self,
        req: SignRequest,
        user: Box<ScriptedPin>,
        progress: Option<Box<dyn FnMut(usize, usize) + Send>>,
        cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    ) -> Result<Vec<Vec<u8>>, SignFailure>;
}

impl SignWith for Module {
    fn sign_with(
        &self,
        req: SignRequest,
        mut user: Box<ScriptedPin>,
        mut progress: Option<Box<dyn FnMut(usize, usize) + Send>>,
        cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    ) -> Result<Vec<Vec<u8>>, SignFailure> {
        let total = req.inputs.len();
        let mut done: Vec<Vec<u8>> = Vec::new();
        let mut credential = Credential::None;
        let mut attempt = 1;
        loop {
            let rest = SignRequest {
                inputs: req.inputs[done.len()..].to_vec(),
                ..req.clone()
            };
            let (tx, rx) = std::sync::mpsc::channel::<Progress>();
            let offset = done.len();
            let mut callback = progress.take();
            let forward = std::thread::spawn(move || {
                for p in rx {
                    if let Some(f) = callback.as_mut() {
                        f(offset + p.done, total);
                    }
                }
                callback
            });
            let result = self.sign(
                rest,
                std::mem::take(&mut credential),
                Some(tx),
                cancel.clone(),
            );
            // A job the worker never started (BUSY) still holds the sender in its queue: the
            // forwarder is left to end when the worker drops it.
            let started = !matches!(&result, Err(f) if matches!(f.error, Error::Busy { .. }));
            if started {
                progress = forward.join().expect("progress forwarder");
            }
            let (kind, pin, pad, previous) = match result {
                Ok(sigs) => {
                    done.extend(sigs);
                    return Ok(done);
                }
                Err(SignFailure { error, completed }) => {
                    let signed = !completed.is_empty();
                    done.extend(completed);
                    match error {
                        Error::LoginRequired { kind, pin, pin_pad } => {
                            if signed {
                                attempt = 1;
                            }
                            (kind, pin, pin_pad, None)
                        }
                        Error::PinIncorrect {
                            count_low,
                            final_try,
                        } => {
                            attempt += 1;
                            let flags = PinStatus {
                                initialized: true,
                                count_low,
                                final_try,
                                locked: false,
                            };
                            (LoginKind::User, flags, false, Some(flags))
                        }
                        error => {
                            return Err(SignFailure {
                                error,
                                completed: done,
                            })
                        }
                    }
                }
            };
            let _ = pin;
            assert!(!user.forbidden, "the user was asked unexpectedly: {kind:?}");
            let label = self
                .certificates(Some(req.certificate.token_id()))
                .ok()
                .and_then(|c| c.into_iter().find(|c| c.id == req.certificate))
                .map(|c| c.label)
                .unwrap_or_default();
            user.log.lock().expect("log").push(Asked {
                kind,
                attempt,
                previous_error: previous,
                protected_path: pad,
                certificate_label: label,
            });
            credential = match user.answers.next().flatten() {
                Some(pin) => Credential::Pin(SecretPin::from(pin.to_owned())),
                None => {
                    return Err(SignFailure {
                        error: Error::UserCancelled,
                        completed: done,
                    })
                }
            };
        }
    }
}

/// Verifies a signature with the openssl CLI, using the public key from the certificate.
/// `mode`: "pkcs1", "pss", "ecdsa" (DER), "ed25519"; `digest`: "sha256"… (ignored for Ed25519).
pub fn openssl_verify(cert_pem: &Path, mode: &str, digest: &str, data: &[u8], sig: &[u8]) -> bool {
    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tmp");
    let pubkey = work.path().join("pub.pem");
    let out = Command::new("openssl")
        .args(["x509", "-pubkey", "-noout", "-in"])
        .arg(cert_pem)
        .output()
        .expect("openssl x509");
    assert!(out.status.success(), "openssl x509 failed");
    std::fs::write(&pubkey, &out.stdout).expect("write pub");
    let data_path = work.path().join("data");
    let sig_path = work.path().join("sig");
    std::fs::write(&data_path, data).expect("write data");
    std::fs::write(&sig_path, sig).expect("write sig");
    let mut cmd = Command::new("openssl");
    match mode {
        "ed25519" => {
            cmd.args(["pkeyutl", "-verify", "-pubin", "-rawin", "-inkey"])
                .arg(&pubkey)
                .arg("-in")
                .arg(&data_path)
                .arg("-sigfile")
                .arg(&sig_path);
        }
        _ => {
            cmd.arg("dgst").arg(format!("-{digest}"));
            if mode == "pss" {
                cmd.args([
                    "-sigopt",
                    "rsa_padding_mode:pss",
                    "-sigopt",
                    "rsa_pss_saltlen:digest",
                ]);
            }
            cmd.arg("-verify")
                .arg(&pubkey)
                .arg("-signature")
                .arg(&sig_path)
                .arg(&data_path);
        }
    }
    let out = cmd.output().expect("run openssl");
    out.status.success()
}

/// Re-encodes an r‖s signature as DER with openssl's own ASN.1 generator, so that P1363
/// output is checked without the shim's converter.
pub fn p1363_to_der_with_openssl(sig: &[u8]) -> Vec<u8> {
    let half = sig.len() / 2;
    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tmp");
    let conf = work.path().join("sig.cnf");
    let hexs = |b: &[u8]| b.iter().map(|x| format!("{x:02X}")).collect::<String>();
    std::fs::write(
        &conf,
        format!(
            "asn1=SEQUENCE:sig\n[sig]\nr=INTEGER:0x{}\ns=INTEGER:0x{}\n",
            hexs(&sig[..half]),
            hexs(&sig[half..])
        ),
    )
    .expect("write conf");
    let der = work.path().join("sig.der");
    let out = Command::new("openssl")
        .args(["asn1parse", "-noout", "-genconf"])
        .arg(&conf)
        .arg("-out")
        .arg(&der)
        .output()
        .expect("openssl asn1parse");
    assert!(
        out.status.success(),
        "asn1parse: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(der).expect("read der")
}
