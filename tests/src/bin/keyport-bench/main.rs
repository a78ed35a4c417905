//! `keyport-bench`: the figures in BENCHMARKS.md, measured on this machine.
//!
//! ```text
//! cargo build --release -p agent -p keyport-e2e
//! cargo run --release -p keyport-e2e --bin keyport-bench
//! cargo run -p keyport-e2e --bin keyport-bench -- --short   # CI: every row, small counts
//! ```
//!
//! Provisions a fresh SoftHSM token (softhsm-config/provision.sh) in a temporary directory, then
//! measures, printing one markdown table:
//! 1. raw cryptoki signing on one session (the baseline TEST-RIG-FACTS quotes);
//! 2. `pkcs11_shim::Module::sign` with N digests in one request (one login), and with one
//!    request per signature on a cached login (`logout_after = false`);
//! 3. the release `keyport` agent over WebSocket on loopback: start-up time to the `listening`
//!    line, `sign` round-trip latency (session consent, and per-request consent through the
//!    scripted pinentry), `sign.batch` of 1000 P-256 digests, RSS, and binary size;
//! 4. the agent under load ([`load`]): 1, 8 and 32 connections from 8 origins and from one,
//!    the agent's CPU per signature, the token's own rate before and after in the same run,
//!    time to dialog, RSS after many signatures and with 200 connections, and
//!    `certificates.list` over 5 tokens × 20 certificates.
//!
//! `--load-only` runs only section 4's signing rows under load (1, 8 and 32 connections) and
//! the token's rate around them: the quick before/after comparison of a change on the sign path.
//!
//! `--short` runs every row with small counts and debug binaries if no release build is there:
//! CI runs it to check that every row is measured and every signature verifies; its timings
//! mean nothing.
//!
//! One signature of every kind measured is checked with `openssl pkeyutl -verify`, so the
//! figures are for real signatures. This is a program, not a test: nothing here is timed inside
//! `cargo test`.
#![forbid(unsafe_code)]

mod isolation;
mod isolation_skf;
mod load;
mod memory;

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use keyport_e2e::harness::{
    self, repo_root, Hash, RawAlg, Signed, TestToken, SOFTHSM as MODULE, TOKEN_LABEL, USER_PIN,
};
use pkcs11_shim::{
    CertificateInfo, Credential, EcdsaEncoding, HashAlg, Module, SecretPin, SignAlgorithm,
    SignInput, SignRequest,
};
use serde_json::{json, Value};
use sha2::Digest as _;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

/// Origin with `consent = "session"`: one dialog per connection, none after.
const SESSION_ORIGIN: &str = "https://intranet.example";
/// Origin of the agent over 5 tokens × 20 certificates (`certificates.list`).
const LIST_ORIGIN: &str = "https://list.example";
/// Origin with the default per-request consent: a CONFIRM dialog for every request.
const REQUEST_ORIGIN: &str = "https://portal.example";
const SIGN_REQUESTS: usize = 200;
const BATCH_SIZE: usize = 1000;
/// Session-consent batches the batch row times, one after the other.
const BATCHES: usize = 7;
const STARTS: usize = 5;
/// Each signing rate is measured this many times; the median is reported.
const RUNS: usize = 3;
const SPY: &str = "/usr/lib/x86_64-linux-gnu/pkcs11/pkcs11-spy.so";
/// One-signature requests traced through pkcs11-spy to count the PKCS#11 calls of each.
const SPY_REQUESTS: usize = 10;

/// How many of each count to use: all of it, or a short run's share.
#[derive(Debug, Clone, Copy)]
struct Scale {
    short: bool,
    /// `--load-only`: the load rows alone (no shim, batch, soak, RSS or isolation rows).
    load_only: bool,
}

impl Scale {
    /// `n`, or a twentieth of it (at least 2) in a short run.
    fn of(self, n: usize) -> usize {
        if self.short {
            (n / 20).max(2)
        } else {
            n
        }
    }

    /// Timed runs per figure (the median is reported).
    fn runs(self) -> usize {
        if self.short {
            1
        } else {
            RUNS
        }
    }

    /// Release binaries only for the full run; a short run takes what was built.
    fn profiles(self) -> &'static [&'static str] {
        if self.short {
            &["release", "debug"]
        } else {
            &["release"]
        }
    }
}

/// One key type of the provisioned token and how many signatures to time for it.
#[derive(Debug, Clone, Copy)]
struct KeyCase {
    name: &'static str,
    label: &'static str,
    algorithm: SignAlgorithm,
    /// Signatures per measurement, sized so each takes roughly a second here.
    count: usize,
    /// TEST-RIG-FACTS' raw cryptoki figure, signatures/s.
    facts: u32,
}

const CASES: [KeyCase; 5] = [
    KeyCase {
        name: "RSA-2048 (PKCS#1 v1.5, SHA-256)",
        label: "sign-rsa2048",
        algorithm: SignAlgorithm::RsaPkcs1v15(HashAlg::Sha256),
        count: 600,
        facts: 660,
    },
    KeyCase {
        name: "RSA-3072 (PKCS#1 v1.5, SHA-256)",
        label: "sign-rsa3072",
        algorithm: SignAlgorithm::RsaPkcs1v15(HashAlg::Sha256),
        count: 250,
        facts: 290,
    },
    KeyCase {
        name: "P-256 (ECDSA, SHA-256)",
        label: "sign-p256",
        algorithm: SignAlgorithm::Ecdsa(HashAlg::Sha256, EcdsaEncoding::P1363),
        count: 6000,
        facts: 9000,
    },
    KeyCase {
        name: "P-384 (ECDSA, SHA-384)",
        label: "sign-p384",
        algorithm: SignAlgorithm::Ecdsa(HashAlg::Sha384, EcdsaEncoding::P1363),
        count: 800,
        facts: 800,
    },
    KeyCase {
        name: "Ed25519 (32-byte message)",
        label: "sign-ed25519",
        algorithm: SignAlgorithm::Ed25519,
        count: 2500,
        facts: 2900,
    },
];

fn main() -> Result<()> {
    let scale = Scale {
        short: std::env::args().skip(1).any(|a| a == "--short"),
        load_only: std::env::args().skip(1).any(|a| a == "--load-only"),
    };
    if std::env::args().skip(1).any(|a| a == "--help" || a == "-h") {
        println!("keyport-bench [--short] [--load-only] [--isolation-only]\n  --short           every row, small counts (CI; timings meaningless)\n  --load-only       the signing rows under load only (1, 8, 32 connections) and the token's rate around them\n  --isolation-only  issue 11's module-isolation rows only");
        return Ok(());
    }
    let root = repo_root();
    let work = tempfile::tempdir()?;
    let token = TestToken::provision()?;
    let softhsm_conf = token.conf();
    // Set before any thread exists and before SoftHSM is loaded, which reads it in C_Initialize.
    std::env::set_var("SOFTHSM2_CONF", &softhsm_conf);
    if std::env::args().skip(1).any(|a| a == "--isolation-only") {
        // Issue 11's rows alone (isolation.rs).
        // Whatever keyport was built: the hop is the figure here, not the signing speed.
        let keyport = binary(&root, "keyport", &["release", "debug"])?;
        print!("{}", isolation::table(&keyport, scale)?);
        print!("{}", isolation_skf::table(&keyport, scale)?);
        return Ok(());
    }
    let spy_log = work.path().join("spy.log");
    std::env::set_var("PKCS11SPY", MODULE);
    std::env::set_var("PKCS11SPY_OUTPUT", &spy_log);

    let mut out = String::new();
    writeln!(out, "{}", machine_line())?;
    writeln!(out)?;

    if scale.load_only {
        return load_only(&root, work.path(), &token, scale);
    }
    eprintln!("raw cryptoki baseline …");
    let (raw, probes) = raw_cryptoki_rates(scale)?;
    eprintln!("pkcs11-shim …");
    let shim = shim_rates(&token, scale)?;
    eprintln!("PKCS#11 calls of one shim request (pkcs11-spy) …");
    let calls = spy_calls_per_request(&spy_log)?;
    writeln!(
        out,
        "| key (SoftHSM 2.6.1) | raw cryptoki, 1 session | shim: batch of N, 1 login | shim: 1 `sign` per signature, cached login | TEST-RIG-FACTS raw | N |"
    )?;
    writeln!(out, "| --- | ---: | ---: | ---: | ---: | ---: |")?;
    for ((case, raw), shim) in CASES.iter().zip(&raw).zip(&shim) {
        writeln!(
            out,
            "| {} | {:.0}/s | {:.0}/s | {:.0}/s | ≈ {}/s | {} |",
            case.name,
            raw,
            shim.batch,
            shim.per_call,
            case.facts,
            scale.of(case.count)
        )?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "PKCS#11 calls in one one-signature shim request on a cached login (pkcs11-spy, {SPY_REQUESTS} requests): {calls}"
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "| raw cost of the calls around C_Sign (one session) | calls/s |"
    )?;
    writeln!(out, "| --- | ---: |")?;
    for (name, per_s) in probes {
        writeln!(out, "| {name} | {per_s:.0}/s |")?;
    }
    writeln!(out)?;

    eprintln!("agent over WebSocket …");
    let (agent, problems) = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(agent_bench(&root, work.path(), &token, scale))?;
    writeln!(
        out,
        "| agent (`{}`, loopback WebSocket) | value |",
        binary(&root, "keyport", scale.profiles())?.display()
    )?;
    writeln!(out, "| --- | ---: |")?;
    for (what, value) in agent {
        writeln!(out, "| {what} | {value} |")?;
    }
    // Issue 11: module isolation's process hop (isolation.rs).
    eprintln!("module isolation (in process vs module host) …");
    out.push_str(&isolation::table(
        &binary(&root, "keyport", scale.profiles())?,
        scale,
    )?);
    print!("{out}");
    if !problems.is_empty() {
        bail!(
            "{} row(s) saw failed requests:\n{}",
            problems.len(),
            problems.join("\n")
        );
    }
    Ok(())
}

/// `--load-only`: the agent's signing rows under load and the token's rate around them.
fn load_only(root: &Path, work: &Path, token: &TestToken, scale: Scale) -> Result<()> {
    let (rows, problems) = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(agent_bench(root, work, token, scale))?;
    let mut out = String::new();
    writeln!(out, "{}", machine_line())?;
    writeln!(out)?;
    writeln!(
        out,
        "| agent (`{}`) | value |",
        binary(root, "keyport", scale.profiles())?.display()
    )?;
    writeln!(out, "| --- | ---: |")?;
    for (what, value) in rows {
        writeln!(out, "| {what} | {value} |")?;
    }
    print!("{out}");
    if !problems.is_empty() {
        bail!(
            "{} row(s) saw failed requests:\n{}",
            problems.len(),
            problems.join("\n")
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Token and machine

fn machine_line() -> String {
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned());
    format!("Machine: {cores} cores available, {cpu}; 1-minute load average at start: {load}")
}

/// The input of one signature for `case`: a digest of the algorithm's hash, or (Ed25519) a
/// 32-byte message. Different for every `i`.
fn input_for(case: &KeyCase, i: usize) -> (SignInput, Vec<u8>) {
    let message = format!("keyport-bench document {i}").into_bytes();
    match case.algorithm.hash() {
        Some(hash) => {
            let digest = hash.digest(&message);
            (SignInput::Digest(digest.clone()), digest)
        }
        None => {
            let data = HashAlg::Sha256.digest(&message);
            (SignInput::Data(data.clone()), data)
        }
    }
}

/// Runs a measurement `runs` times and returns the median.
fn median_of(runs: usize, mut measure: impl FnMut() -> Result<f64>) -> Result<f64> {
    let mut values = (0..runs).map(|_| measure()).collect::<Result<Vec<f64>>>()?;
    values.sort_by(f64::total_cmp);
    values
        .get(values.len() / 2)
        .copied()
        .ok_or_else(|| anyhow!("no measurement"))
}

fn rate(count: usize, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64()
}

// ---------------------------------------------------------------------------------------------
// Raw cryptoki baseline

/// A PKCS#11 call and how many times a second it runs.
type Probe = (&'static str, f64);

/// C_Sign in a loop on one logged-in session, the way TEST-RIG-FACTS measured it; the inputs
/// are what the shim hands the token (DigestInfo for RSA, the digest for ECDSA, the message
/// for EdDSA).
fn raw_cryptoki_rates(scale: Scale) -> Result<(Vec<f64>, Vec<Probe>)> {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
    use cryptoki::mechanism::Mechanism;
    use cryptoki::object::{Attribute, ObjectClass};
    use cryptoki::session::UserType;
    use cryptoki::types::AuthPin;

    let pkcs11 = Pkcs11::new(MODULE)?;
    pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))?;
    let mut rates = Vec::new();
    let mut probes = Vec::new();
    {
        let slot = pkcs11
            .get_slots_with_token()?
            .into_iter()
            .find(|s| {
                pkcs11
                    .get_token_info(*s)
                    .is_ok_and(|t| t.label().trim() == TOKEN_LABEL)
            })
            .ok_or_else(|| anyhow!("token {TOKEN_LABEL:?} not found"))?;
        let session = pkcs11.open_ro_session(slot)?;
        session.login(UserType::User, Some(&AuthPin::new(USER_PIN.into())))?;
        for case in &CASES {
            let key = *session
                .find_objects(&[
                    Attribute::Class(ObjectClass::PRIVATE_KEY),
                    Attribute::Label(case.label.as_bytes().to_vec()),
                ])?
                .first()
                .ok_or_else(|| anyhow!("no private key {}", case.label))?;
            let eddsa = EddsaParams::new(EddsaSignatureScheme::Pure);
            let mechanism = match case.algorithm {
                SignAlgorithm::Ed25519 => Mechanism::Eddsa(eddsa),
                SignAlgorithm::Ecdsa(..) => Mechanism::Ecdsa,
                _ => Mechanism::RsaPkcs,
            };
            let inputs: Vec<Vec<u8>> = (0..scale.of(case.count))
                .map(|i| match (case.algorithm, input_for(case, i)) {
                    (SignAlgorithm::RsaPkcs1v15(h), (_, digest)) => {
                        pkcs11_shim::digest_info(h, &digest).map_err(anyhow::Error::from)
                    }
                    (_, (_, bytes)) => Ok(bytes),
                })
                .collect::<Result<_>>()?;
            session.sign(&mechanism, key, &inputs[0])?;
            rates.push(median_of(scale.runs(), || {
                let start = Instant::now();
                for input in &inputs {
                    session.sign(&mechanism, key, input)?;
                }
                Ok(rate(inputs.len(), start.elapsed()))
            })?);
        }
        // What the shim calls besides C_Sign (its health probe and login check).
        let probe_count = scale.of(20_000);
        probes.push((
            "C_GetTokenInfo",
            median_of(scale.runs(), || {
                let start = Instant::now();
                for _ in 0..probe_count {
                    pkcs11.get_token_info(slot)?;
                }
                Ok(rate(probe_count, start.elapsed()))
            })?,
        ));
        probes.push((
            "C_GetSessionInfo",
            median_of(scale.runs(), || {
                let start = Instant::now();
                for _ in 0..probe_count {
                    session.get_session_info()?;
                }
                Ok(rate(probe_count, start.elapsed()))
            })?,
        ));
        session.logout()?;
    }
    // The shim loads the same library next; it must be finalised first.
    pkcs11.finalize()?;
    Ok((rates, probes))
}

// ---------------------------------------------------------------------------------------------
// pkcs11-shim

#[derive(Debug)]
struct ShimRate {
    batch: f64,
    per_call: f64,
}

fn shim_rates(token: &TestToken, scale: Scale) -> Result<Vec<ShimRate>> {
    let module = Module::load(Path::new(MODULE))?;
    let certs = module.certificates(None)?;
    let mut rates = Vec::new();
    for case in &CASES {
        let cert = certs
            .iter()
            .find(|c| c.label == case.label)
            .ok_or_else(|| anyhow!("no certificate {}", case.label))?;
        let inputs: Vec<(SignInput, Vec<u8>)> = (0..scale.of(case.count))
            .map(|i| input_for(case, i))
            .collect();

        // Warm the shim's caches (certificate/key scan, mechanism list) and check one
        // signature with OpenSSL.
        let first = sign_once(&module, cert, case, vec![inputs[0].0.clone()], true)?;
        verify_with_openssl(token, case, &inputs[0].1, &first[0])?;

        // N digests, one request: login, N × C_Sign, logout — all inside the timed call.
        let batch = median_of(scale.runs(), || {
            let batch_inputs = inputs.iter().map(|(i, _)| i.clone()).collect();
            let start = Instant::now();
            let sigs = sign_once(&module, cert, case, batch_inputs, true)?;
            let elapsed = start.elapsed();
            if sigs.len() != inputs.len() {
                bail!(
                    "{}: {} signatures for {} inputs",
                    case.name,
                    sigs.len(),
                    inputs.len()
                );
            }
            Ok(rate(sigs.len(), elapsed))
        })?;

        // One request per signature on a cached login: the login happens before the clock.
        sign_once(&module, cert, case, vec![inputs[0].0.clone()], false)?;
        let per_call = median_of(scale.runs(), || {
            let start = Instant::now();
            for (input, _) in &inputs {
                let sig = sign_no_pin(&module, cert, case, input.clone())?;
                if sig.is_empty() {
                    bail!("{}: empty signature", case.name);
                }
            }
            Ok(rate(inputs.len(), start.elapsed()))
        })?;
        module.logout(&cert.token_id)?;
        rates.push(ShimRate { batch, per_call });
    }
    Ok(rates)
}

/// Loads the shim over pkcs11-spy (which forwards to SoftHSM and logs every call), makes
/// `SPY_REQUESTS` one-signature P-256 requests on a cached login, and counts the calls they
/// made: "C_GetTokenInfo ×4, …" per request.
fn spy_calls_per_request(spy_log: &Path) -> Result<String> {
    let module = Module::load(Path::new(SPY))?;
    let case = CASES
        .iter()
        .find(|c| c.label == "sign-p256")
        .ok_or_else(|| anyhow!("no P-256 case"))?;
    let cert = module
        .certificates(None)?
        .into_iter()
        .find(|c| c.label == case.label)
        .ok_or_else(|| anyhow!("no certificate {}", case.label))?;
    sign_once(&module, &cert, case, vec![input_for(case, 0).0], false)?;
    let before = std::fs::read_to_string(spy_log)?.len();
    for i in 0..SPY_REQUESTS {
        sign_no_pin(&module, &cert, case, input_for(case, i).0)?;
    }
    let log = std::fs::read_to_string(spy_log)?;
    module.logout(&cert.token_id)?;
    drop(module);
    let mut counts: Vec<(String, usize)> = Vec::new();
    for line in log[before..].lines() {
        // Call headers look like "123: C_Sign".
        let Some((n, name)) = line.split_once(": ") else {
            continue;
        };
        if !n.chars().all(|c| c.is_ascii_digit()) || !name.starts_with("C_") {
            continue;
        }
        match counts.iter_mut().find(|(c, _)| c == name) {
            Some((_, k)) => *k += 1,
            None => counts.push((name.to_owned(), 1)),
        }
    }
    if counts.is_empty() {
        bail!("pkcs11-spy logged no calls");
    }
    let total: usize = counts.iter().map(|(_, k)| k).sum();
    let parts: Vec<String> = counts
        .iter()
        .map(|(name, k)| format!("{name} ×{}", fmt_per_request(*k)))
        .collect();
    Ok(format!(
        "{} ({} calls per request)",
        parts.join(", "),
        fmt_per_request(total)
    ))
}

fn fmt_per_request(count: usize) -> String {
    let per = count as f64 / SPY_REQUESTS as f64;
    if per.fract() == 0.0 {
        format!("{per:.0}")
    } else {
        format!("{per:.1}")
    }
}

/// One `Module::sign` request that logs in with the PIN if asked.
fn sign_once(
    module: &Module,
    cert: &CertificateInfo,
    case: &KeyCase,
    inputs: Vec<SignInput>,
    logout_after: bool,
) -> Result<Vec<Vec<u8>>> {
    let req = SignRequest {
        certificate: cert.id.clone(),
        algorithm: case.algorithm,
        inputs,
        logout_after,
    };
    let pin = Credential::Pin(SecretPin::from(USER_PIN.to_owned()));
    module
        .sign(req, pin, None, None)
        .map_err(|f| anyhow!("{}: {}", case.name, f.error))
}

/// One signature on a login that must already be cached: a PIN request is an error.
fn sign_no_pin(
    module: &Module,
    cert: &CertificateInfo,
    case: &KeyCase,
    input: SignInput,
) -> Result<Vec<u8>> {
    let req = SignRequest {
        certificate: cert.id.clone(),
        algorithm: case.algorithm,
        inputs: vec![input],
        logout_after: false,
    };
    let mut sigs = module
        .sign(req, Credential::None, None, None)
        .map_err(|f| anyhow!("{} (cached login expected): {}", case.name, f.error))?;
    sigs.pop()
        .ok_or_else(|| anyhow!("{}: no signature", case.name))
}

/// `openssl pkeyutl -verify` (`harness::openssl_verify_raw`) with the certificate of the
/// case's key. `signed` is the digest (or the Ed25519 message); ECDSA signatures arrive as P1363.
fn verify_with_openssl(token: &TestToken, case: &KeyCase, signed: &[u8], sig: &[u8]) -> Result<()> {
    let hash = |h: HashAlg| match h {
        HashAlg::Sha256 => Hash::Sha256,
        HashAlg::Sha384 => Hash::Sha384,
        HashAlg::Sha512 => Hash::Sha512,
    };
    let (alg, signed) = match case.algorithm {
        SignAlgorithm::RsaPkcs1v15(h) => {
            (RawAlg::RsaPkcs1(hash(h)), Signed::Digest(signed.to_vec()))
        }
        SignAlgorithm::RsaPss(h) => (RawAlg::RsaPss(hash(h)), Signed::Digest(signed.to_vec())),
        SignAlgorithm::Ecdsa(h, EcdsaEncoding::P1363) => {
            (RawAlg::EcdsaP1363(hash(h)), Signed::Digest(signed.to_vec()))
        }
        SignAlgorithm::Ecdsa(h, EcdsaEncoding::Der) => {
            (RawAlg::EcdsaDer(hash(h)), Signed::Digest(signed.to_vec()))
        }
        SignAlgorithm::Ed25519 => (RawAlg::Ed25519, Signed::Data(signed.to_vec())),
    };
    harness::openssl_verify_raw(&token.cert_pem(case.label), &signed, sig, alg)
        .with_context(|| format!("OpenSSL rejects the {} signature", case.name))
}

// ---------------------------------------------------------------------------------------------
// The agent

/// A `keyport run` child that is killed when dropped.
struct Agent {
    child: Child,
    port: u16,
    started_in: Duration,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn binary(root: &Path, name: &str, profiles: &[&str]) -> Result<PathBuf> {
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    profiles
        .iter()
        .map(|p| target.join(p).join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            anyhow!(
                "{name} not built in {} ({}): run `cargo build --release -p agent -p keyport-e2e`",
                target.display(),
                profiles.join(", ")
            )
        })
}

/// The agent's configuration: every origin allowed, the session-consent ones with
/// `consent = "session"`, limits wide enough for the load rows (512 connections, 64 from one
/// origin, no practical request rate limit).
fn write_config(dir: &Path, pinentry: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let session_origins: Vec<&str> = std::iter::once(SESSION_ORIGIN)
        .chain(load::LOAD_ORIGINS)
        .chain([LIST_ORIGIN])
        .collect();
    let origins: Vec<&str> = std::iter::once(REQUEST_ORIGIN)
        .chain(session_origins.iter().copied())
        .collect();
    let key_file = dir.join("audit.key");
    harness::write_audit_key(&key_file)?;
    let config = format!(
        r#"port = 0
discover_modules = false
pinentry = {pinentry:?}
audit_key_file = {key:?}
audit_log = {log:?}
allowed_origins = [{allowed}]
unknown_origins = "reject"
pin_cache_seconds = 600
signing_key_usage = "non-repudiation"
[[modules]]
path = "{MODULE}"
{policies}
[limits]
requests_per_second = 100000
max_connections = 512
max_connections_per_origin = 64
"#,
        pinentry = pinentry.display().to_string(),
        key = key_file.display().to_string(),
        log = dir.join("audit.log").display().to_string(),
        allowed = origins
            .iter()
            .map(|o| format!("{o:?}"))
            .collect::<Vec<_>>()
            .join(", "),
        policies = session_origins
            .iter()
            .map(|o| format!("[[origin_policy]]\norigin = {o:?}\nconsent = \"session\"\n"))
            .collect::<String>(),
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, config)?;
    Ok(path)
}

fn start_agent(
    keyport: &Path,
    config: &Path,
    softhsm_conf: &Path,
    script: &keyport_e2e::pinentry::Script,
    stderr_log: &Path,
) -> Result<Agent> {
    let mut cmd = Command::new(keyport);
    cmd.arg("--config")
        .arg(config)
        .arg("run")
        .env("SOFTHSM2_CONF", softhsm_conf)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(stderr_log)?);
    for (k, v) in script.env() {
        cmd.env(k, v);
    }
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("spawning {}", keyport.display()))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("no stdout pipe"))?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(port) = line
                .strip_prefix("listening on ws://127.0.0.1:")
                .and_then(|rest| rest.strip_suffix("/v1"))
                .and_then(|p| p.parse::<u16>().ok())
            {
                let _ = tx.send((port, Instant::now()));
            }
        }
    });
    let mut agent = Agent {
        child,
        port: 0,
        started_in: Duration::ZERO,
    };
    let (port, at) = rx.recv_timeout(Duration::from_secs(30)).map_err(|_| {
        let log = std::fs::read_to_string(stderr_log).unwrap_or_default();
        anyhow!("keyport printed no listening line in 30 s; stderr:\n{log}")
    })?;
    agent.port = port;
    agent.started_in = at - start;
    Ok(agent)
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A JSON-RPC connection from one origin.
struct Client {
    ws: Ws,
    next_id: u64,
}

impl Client {
    async fn connect(port: u16, origin: &str) -> Result<Client> {
        let mut request = format!("ws://127.0.0.1:{port}/v1").into_client_request()?;
        request
            .headers_mut()
            .insert("Origin", HeaderValue::from_str(origin)?);
        let (ws, _) = tokio_tungstenite::connect_async(request).await?;
        Ok(Client { ws, next_id: 1 })
    }

    /// Sends a request and waits for its answer, skipping events; an error answer is an error.
    async fn call(&mut self, method: &str, params: Value) -> Result<Value> {
        Ok(self.call_timed(method, params).await?.0)
    }

    /// [`Self::call`], and the time from the request's first byte sent to its answer's last
    /// byte received: the client's own JSON work (encoding the request, decoding the answer)
    /// left out.
    async fn call_timed(&mut self, method: &str, params: Value) -> Result<(Value, Duration)> {
        let id = self.next_id;
        self.next_id += 1;
        let request = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        let text = Message::text(request.to_string());
        let start = Instant::now();
        self.ws.send(text).await?;
        loop {
            let msg = self
                .ws
                .next()
                .await
                .ok_or_else(|| anyhow!("connection closed waiting for {method}"))??;
            let received = start.elapsed();
            let Message::Text(text) = msg else { continue };
            let value: Value = serde_json::from_str(text.as_str())?;
            if value.get("id").and_then(Value::as_u64) != Some(id) {
                continue; // an event such as sign.progress
            }
            if let Some(error) = value.get("error") {
                bail!("{method} failed: {error}");
            }
            let result = value
                .get("result")
                .cloned()
                .ok_or_else(|| anyhow!("{method}: answer without result"))?;
            return Ok((result, received));
        }
    }
}

fn sign_params(cert_id: &str, digest: &[u8]) -> Value {
    json!({
        "certificateId": cert_id,
        "digest": {"algorithm": "SHA-256", "value": B64.encode(digest)},
        "display": {"title": "keyport-bench"},
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// 200 `sign` requests one after the other; the latencies, sorted.
async fn sign_latencies(client: &mut Client, cert_id: &str) -> Result<Vec<Duration>> {
    let mut times = Vec::with_capacity(SIGN_REQUESTS);
    for i in 0..SIGN_REQUESTS {
        let digest = sha2::Sha256::digest(format!("latency {i}")).to_vec();
        let start = Instant::now();
        let result = client.call("sign", sign_params(cert_id, &digest)).await?;
        times.push(start.elapsed());
        if result.get("signature").and_then(Value::as_str).is_none() {
            bail!("sign answered without a signature: {result}");
        }
    }
    times.sort();
    Ok(times)
}

/// How many session-consent batches the batch row times: `KEYPORT_BENCH_BATCHES`, else
/// [`BATCHES`] (1 in a short run). Set it high to profile the batch path.
fn batch_count(scale: Scale) -> Result<usize> {
    match std::env::var("KEYPORT_BENCH_BATCHES") {
        Ok(n) => match n.parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => bail!("KEYPORT_BENCH_BATCHES must be a positive count, not {n:?}"),
        },
        Err(_) if scale.short => Ok(1),
        Err(_) => Ok(BATCHES),
    }
}

/// One `sign.batch` of [`BATCH_SIZE`] digests: the time from sending it to its answer received
/// (the client's JSON work left out), the time with that work, and the first digest and its
/// signature.
async fn batch(client: &mut Client, cert_id: &str) -> Result<(Duration, Duration, Vec<Vec<u8>>)> {
    let digests: Vec<Vec<u8>> = (0..BATCH_SIZE)
        .map(|i| sha2::Sha256::digest(format!("batch {i}")).to_vec())
        .collect();
    let items: Vec<Value> = digests
        .iter()
        .map(|d| json!({"digest": {"algorithm": "SHA-256", "value": B64.encode(d)}}))
        .collect();
    let params = json!({
        "certificateId": cert_id,
        "items": items,
        "display": {"title": "keyport-bench batch"},
    });
    let start = Instant::now();
    let (result, answered) = client.call_timed("sign.batch", params).await?;
    let elapsed = start.elapsed();
    let results = result
        .get("results")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("sign.batch answered without results"))?;
    if results.len() != BATCH_SIZE {
        bail!("sign.batch returned {} of {BATCH_SIZE}", results.len());
    }
    let first = results[0]
        .get("signature")
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("no signature in the batch result"))?;
    Ok((
        answered,
        elapsed,
        vec![digests[0].clone(), B64.decode(first)?],
    ))
}

/// Checks a DER ECDSA signature over a SHA-256 digest: the answer's certificate must be the
/// token's `sign-p256`, whose public key OpenSSL verifies it with.
fn verify_agent_signature(
    token: &TestToken,
    cert_b64: &str,
    digest: &[u8],
    sig_der: &[u8],
) -> Result<()> {
    if B64.decode(cert_b64)? != token.cert_der("sign-p256")? {
        bail!("the agent answered with another certificate than sign-p256's");
    }
    harness::openssl_verify_raw(
        &token.cert_pem("sign-p256"),
        &Signed::Digest(digest.to_vec()),
        sig_der,
        RawAlg::EcdsaDer(Hash::Sha256),
    )
    .context("OpenSSL rejects a signature the agent returned")
}

async fn agent_bench(
    root: &Path,
    work: &Path,
    token: &TestToken,
    scale: Scale,
) -> Result<(Vec<(String, String)>, Vec<String>)> {
    let softhsm_conf = &token.conf();
    use keyport_e2e::pinentry::{Button, Command as Dialog, Script, Step};

    let keyport = binary(root, "keyport", scale.profiles())?;
    let pinentry = binary(
        root,
        keyport_e2e::pinentry::PROGRAM_NAME,
        &["release", "debug"],
    )?;
    let dir = work.join("agent");
    let config = write_config(&dir, &pinentry)?;
    let script = Script::new(&dir)?;
    let stderr_log = dir.join("keyport.stderr");
    let mut rows = Vec::new();
    let mut problems = Vec::new();

    // Start-up: spawn → `listening` line, a few times; the last agent stays up.
    let mut starts = Vec::new();
    let mut agent = None;
    for _ in 0..STARTS {
        drop(agent.take());
        let a = start_agent(&keyport, &config, softhsm_conf, &script, &stderr_log)?;
        starts.push(a.started_in);
        agent = Some(a);
    }
    let agent = agent.ok_or_else(|| anyhow!("no agent started"))?;
    starts.sort();
    rows.push((
        format!("start-up to the `listening` line (median of {STARTS}, min–max)"),
        format!(
            "{} ({}–{})",
            ms(starts[STARTS / 2]),
            ms(starts[0]),
            ms(starts[STARTS - 1])
        ),
    ));
    rows.push((
        "RSS after start: the agent (its anonymous pages) + its module host(s) = sum; PSS (pages shared with other processes counted in part)".into(),
        memory::Footprint::of(agent.child.id(), "start")?.to_string(),
    ));

    // The P-256 signing certificate's id, as the agent names it.
    let certs = Command::new(&keyport)
        .arg("--config")
        .arg(&config)
        .args(["certs", "--json"])
        .env("SOFTHSM2_CONF", softhsm_conf)
        .output()?;
    let certs: Value = serde_json::from_slice(&certs.stdout).with_context(|| {
        format!(
            "keyport certs --json: {}",
            String::from_utf8_lossy(&certs.stderr)
        )
    })?;
    let cert_id = certs
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|c| c.get("label").and_then(Value::as_str) == Some("sign-p256"))
        })
        .and_then(|c| c.get("id").and_then(Value::as_str))
        .ok_or_else(|| anyhow!("sign-p256 not in keyport certs --json: {certs}"))?
        .to_owned();

    // Session consent: the first request asks consent + PIN (one GETPIN), later ones nothing.
    script.push(&Step::pin(USER_PIN).expect(Dialog::GetPin))?;
    let mut session = Client::connect(agent.port, SESSION_ORIGIN).await?;
    let first_digest = sha2::Sha256::digest(b"first").to_vec();
    let first = session
        .call("sign", sign_params(&cert_id, &first_digest))
        .await?;
    verify_agent_signature(
        token,
        first["certificate"].as_str().unwrap_or_default(),
        &first_digest,
        &B64.decode(first["signature"].as_str().unwrap_or_default())?,
    )?;
    let cert_b64 = first["certificate"].as_str().unwrap_or_default().to_owned();
    let consumed = script.consumed()?;
    let times = sign_latencies(&mut session, &cert_id).await?;
    if script.consumed()? != consumed {
        bail!("session consent still opened dialogs");
    }
    rows.push((
        format!(
            "`sign` P-256 round trip, session consent, no dialog (p50 / p95 of {SIGN_REQUESTS})"
        ),
        format!(
            "{} / {}",
            ms(percentile(&times, 50.0)),
            ms(percentile(&times, 95.0))
        ),
    ));

    let mut portal = Client::connect(agent.port, REQUEST_ORIGIN).await?;
    if !scale.load_only {
        // Per-request consent: the token is logged in (PIN cache), so each request is a CONFIRM.
        let steps = vec![Step::confirm(Button::Ok).expect(Dialog::Confirm); SIGN_REQUESTS];
        script.push_all(&steps)?;
        let before = script.consumed()?;
        let times = sign_latencies(&mut portal, &cert_id).await?;
        let dialogs = script.consumed()? - before;
        if dialogs != SIGN_REQUESTS {
            bail!("{dialogs} dialogs for {SIGN_REQUESTS} per-request-consent signatures");
        }
        rows.push((
        format!(
            "`sign` P-256 round trip, per-request consent: 1 scripted CONFIRM (a pinentry process) each (p50 / p95 of {SIGN_REQUESTS})"
        ),
        format!("{} / {}", ms(percentile(&times, 50.0)), ms(percentile(&times, 95.0))),
    ));
    }
    // The token's own rate, measured now and again after the load rows (the machine is shared).
    let token_before = load::token_rate(scale.of(6000))?;
    rows.push((
        "the token's own P-256 rate, one session, `C_SignInit` + `C_Sign` in a loop (before the agent rows below): rate, p50".into(),
        format!("{:.0}/s, {:.0} µs", token_before.per_s, token_before.p50.as_secs_f64() * 1e6),
    ));

    if !scale.load_only {
        // sign.batch of 1000 digests: session consent (no dialog), then per-request (one CONFIRM).
        // One batch moves by ±25 % from one to the next: the row times several.
        let batches = batch_count(scale)?;
        let mut times = Vec::with_capacity(batches);
        let mut totals = Vec::with_capacity(batches);
        eprintln!("{batches} batches …");
        for _ in 0..batches {
            let (answered, total, check) = batch(&mut session, &cert_id).await?;
            verify_agent_signature(token, &cert_b64, &check[0], &check[1])?;
            times.push(answered);
            totals.push(total);
        }
        times.sort();
        totals.sort();
        let (fastest, median, slowest) = (times[0], times[batches / 2], times[batches - 1]);
        rows.push((
        format!("`sign.batch` {BATCH_SIZE} P-256 digests, session consent, {batches} batches one after the other, request sent → answer received: median (min–max), signatures/s of the median (× the token's); in brackets the median with the client's JSON encoding and decoding"),
        format!(
            "{} ({}–{}), {:.0}/s (× {:.2}) [{}]",
            ms(median),
            ms(fastest),
            ms(slowest),
            rate(BATCH_SIZE, median),
            rate(BATCH_SIZE, median) / token_before.per_s,
            ms(totals[batches / 2]),
        ),
    ));
        script.push(&Step::confirm(Button::Ok).expect(Dialog::Confirm))?;
        let (_, elapsed, check) = batch(&mut portal, &cert_id).await?;
        verify_agent_signature(token, &cert_b64, &check[0], &check[1])?;
        rows.push((
        format!("`sign.batch` {BATCH_SIZE} P-256 digests, per-request consent (1 CONFIRM): total, signatures/s"),
        format!("{}, {:.0}/s", ms(elapsed), rate(BATCH_SIZE, elapsed)),
    ));
        rows.push((
            "RSS after the batches".into(),
            memory::Footprint::of(agent.child.id(), "batches")?.to_string(),
        ));
    }

    eprintln!("agent under load …");
    let target = load::Target {
        pid: agent.child.id(),
        port: agent.port,
        script: &script,
        token,
        cert_id: &cert_id,
        cert_b64: &cert_b64,
        request_origin: REQUEST_ORIGIN,
        scale,
    };
    let (load_rows, load_problems) = load::rows(&target, &dir, token_before).await?;
    rows.extend(load_rows);
    problems.extend(load_problems);
    let token_after = load::token_rate(scale.of(6000))?;
    rows.push((
        "the token's own P-256 rate again, after the load rows: rate, p50".into(),
        format!(
            "{:.0}/s, {:.0} µs",
            token_after.per_s,
            token_after.p50.as_secs_f64() * 1e6
        ),
    ));

    if scale.load_only {
        return Ok((rows, problems));
    }
    eprintln!(
        "certificates.list over {} tokens × {} certificates …",
        load::LIST_TOKENS,
        load::LIST_CERTS
    );
    let many = work.join("many");
    let many_conf = load::provision_many(&many)?;
    let list_dir = work.join("list-agent");
    let list_config = write_config(&list_dir, &pinentry)?;
    let list_script = Script::new(&list_dir)?;
    let list_agent = start_agent(
        &keyport,
        &list_config,
        &many_conf,
        &list_script,
        &list_dir.join("keyport.stderr"),
    )?;
    let calls = scale.of(100).max(5);
    let times = load::list_latencies(list_agent.port, LIST_ORIGIN, calls).await?;
    rows.push((
        format!(
            "`certificates.list`, {} tokens × {} certificates (p50 / p99 of {calls})",
            load::LIST_TOKENS,
            load::LIST_CERTS
        ),
        format!(
            "{} / {}",
            ms(percentile(&times, 50.0)),
            ms(percentile(&times, 99.0))
        ),
    ));
    drop(list_agent);

    let size = std::fs::metadata(&keyport)?.len();
    rows.push((
        format!("binary size, {}", keyport.display()),
        format!("{:.1} MiB ({size} bytes)", size as f64 / 1_048_576.0),
    ));
    drop(session);
    drop(portal);
    drop(agent);
    Ok((rows, problems))
}
