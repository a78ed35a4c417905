//! The agent under load: throughput and latency with 1, 8 and 32 connections (from 8 origins
//! and from one), the agent's own CPU per signature (from `/proc/PID/stat`), the token's own
//! rate measured in the same run before and after, the time from a request to its dialog, RSS
//! after many signatures and with many open connections, and `certificates.list` over 5 tokens
//! × 20 certificates.
//!
//! Every signature the load rows time is verified afterwards (Python `cryptography`, one process
//! for all of them) and one of each row again with OpenSSL: a row whose signatures do not all
//! verify, or that saw a failed request, makes the benchmark fail.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use keyport_e2e::harness::{TestToken, USER_PIN};
use keyport_e2e::pinentry::{Button, Command as Dialog, Script, Step};
use serde_json::{json, Value};
use sha2::Digest as _;

use super::{ms, percentile, rate, sign_params, verify_agent_signature, Client, Scale, B64};

/// Origins with `consent = "session"` that the load rows spread their connections over.
pub const LOAD_ORIGINS: [&str; 8] = [
    "https://load-1.example",
    "https://load-2.example",
    "https://load-3.example",
    "https://load-4.example",
    "https://load-5.example",
    "https://load-6.example",
    "https://load-7.example",
    "https://load-8.example",
];

/// The load scenarios: connections, origins they come from.
const SCENARIOS: [(usize, usize); 5] = [(1, 1), (8, 8), (8, 1), (32, 8), (32, 1)];

/// The load rows to run: every one of [`SCENARIOS`], or (to profile one of them) those that
/// `KEYPORT_BENCH_ROWS` names, as `CONNECTIONSxORIGINS` separated by commas (`1x1,8x8`).
/// `KEYPORT_BENCH_SIGNATURES` sets the signatures per row (4000).
fn scenarios() -> Vec<(usize, usize)> {
    let Ok(wanted) = std::env::var("KEYPORT_BENCH_ROWS") else {
        return SCENARIOS.to_vec();
    };
    let wanted: Vec<&str> = wanted.split(',').map(str::trim).collect();
    SCENARIOS
        .into_iter()
        .filter(|(c, o)| wanted.contains(&format!("{c}x{o}").as_str()))
        .collect()
}

/// A row of the table: what, value.
pub type Row = (String, String);

/// What the load rows need of the running agent.
pub struct Target<'a> {
    pub pid: u32,
    pub port: u16,
    pub script: &'a Script,
    pub token: &'a TestToken,
    /// The agent's id of the token's `sign-p256` certificate.
    pub cert_id: &'a str,
    /// That certificate, base64, as the agent answers it.
    pub cert_b64: &'a str,
    /// Per-request consent origin (a CONFIRM dialog for every request).
    pub request_origin: &'a str,
    pub scale: Scale,
}

/// The token's own P-256 rate on one session: `C_SignInit` + `C_Sign` in a loop.
#[derive(Debug, Clone, Copy)]
pub struct TokenRate {
    pub per_s: f64,
    pub p50: Duration,
}

pub fn token_rate(count: usize) -> Result<TokenRate> {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::mechanism::Mechanism;
    use cryptoki::object::{Attribute, ObjectClass};
    use cryptoki::session::UserType;
    use cryptoki::types::AuthPin;

    let pkcs11 = Pkcs11::new(super::MODULE)?;
    pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))?;
    let measured = (|| -> Result<TokenRate> {
        let slot = pkcs11
            .get_slots_with_token()?
            .into_iter()
            .find(|s| {
                pkcs11
                    .get_token_info(*s)
                    .is_ok_and(|t| t.label().trim() == super::TOKEN_LABEL)
            })
            .ok_or_else(|| anyhow!("token {:?} not found", super::TOKEN_LABEL))?;
        let session = pkcs11.open_ro_session(slot)?;
        session.login(UserType::User, Some(&AuthPin::new(USER_PIN.into())))?;
        let key = *session
            .find_objects(&[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::Label(b"sign-p256".to_vec()),
            ])?
            .first()
            .ok_or_else(|| anyhow!("no private key sign-p256"))?;
        let digests: Vec<Vec<u8>> = (0..count)
            .map(|i| sha2::Sha256::digest(format!("token rate {i}")).to_vec())
            .collect();
        session.sign(&Mechanism::Ecdsa, key, &digests[0])?;
        let mut times = Vec::with_capacity(count);
        let start = Instant::now();
        for digest in &digests {
            let one = Instant::now();
            session.sign(&Mechanism::Ecdsa, key, digest)?;
            times.push(one.elapsed());
        }
        let elapsed = start.elapsed();
        session.logout()?;
        times.sort();
        Ok(TokenRate {
            per_s: rate(count, elapsed),
            p50: percentile(&times, 50.0),
        })
    })();
    pkcs11.finalize()?;
    measured
}

/// The agent's user + system CPU time so far, from `/proc/PID/stat` (fields 14 and 15).
fn cpu_time(pid: u32, ticks_per_s: u64) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow!("unreadable /proc/{pid}/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state), so field N is at index N - 3.
    let ticks = |n: usize| -> Result<u64> {
        fields
            .get(n - 3)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| anyhow!("no field {n} in /proc/{pid}/stat"))
    };
    let total = ticks(14)? + ticks(15)?;
    Ok(Duration::from_micros(total * 1_000_000 / ticks_per_s))
}

/// The CPU time so far of the agent's live child processes (its module hosts, with
/// `module_isolation`: the token's own work runs there), from `/proc/PID/task/*/children`.
/// Zero where the kernel does not list children.
fn children_cpu_time(pid: u32, ticks_per_s: u64) -> Duration {
    super::memory::children(pid)
        .into_iter()
        .map(|child| cpu_time(child, ticks_per_s).unwrap_or_default())
        .sum()
}

fn clock_ticks() -> Result<u64> {
    let out = Command::new("getconf").arg("CLK_TCK").output()?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("getconf CLK_TCK")
}

/// One signature a load row got: the digest signed and the DER signature.
struct Signed {
    digest: Vec<u8>,
    signature: Vec<u8>,
}

/// What one load run measured.
struct LoadRun {
    signatures: Vec<Signed>,
    elapsed: Duration,
    latencies: Vec<Duration>,
    cpu: Duration,
    /// The agent's module hosts' CPU over the same run.
    hosts_cpu: Duration,
    /// This process's CPU over the same run: the clients (WebSocket, JSON), which share the
    /// machine's cores with the agent and its hosts.
    clients_cpu: Duration,
    failures: Vec<String>,
}

/// Opens `conns` connections from the first `origins` load origins, gives each its session
/// consent (one scripted CONFIRM each, one connection at a time), then lets all of them sign
/// `per_conn` digests back to back at once.
async fn load_run(
    target: &Target<'_>,
    conns: usize,
    origins: usize,
    per_conn: usize,
    ticks: u64,
    tag: &str,
) -> Result<LoadRun> {
    let mut clients = Vec::with_capacity(conns);
    for i in 0..conns {
        clients.push(Client::connect(target.port, LOAD_ORIGINS[i % origins]).await?);
    }
    let steps = vec![Step::confirm(Button::Ok).expect(Dialog::Confirm); conns];
    target.script.push_all(&steps)?;
    for (i, client) in clients.iter_mut().enumerate() {
        let digest = sha2::Sha256::digest(format!("{tag} consent {i}")).to_vec();
        client
            .call("sign", sign_params(target.cert_id, &digest))
            .await
            .with_context(|| format!("{tag}: the consent request of connection {i}"))?;
    }

    let cpu_before = cpu_time(target.pid, ticks)?;
    let hosts_before = children_cpu_time(target.pid, ticks);
    let clients_before = cpu_time(std::process::id(), ticks)?;
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(conns);
    for (c, mut client) in clients.into_iter().enumerate() {
        let cert_id = target.cert_id.to_owned();
        let tag = tag.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::with_capacity(per_conn);
            let mut failures = Vec::new();
            for i in 0..per_conn {
                let digest = sha2::Sha256::digest(format!("{tag} {c} {i}")).to_vec();
                let one = Instant::now();
                match client.call("sign", sign_params(&cert_id, &digest)).await {
                    Ok(result) => {
                        let took = one.elapsed();
                        let signature = result
                            .get("signature")
                            .and_then(Value::as_str)
                            .map(|s| B64.decode(s));
                        match signature {
                            Some(Ok(signature)) => got.push((took, Signed { digest, signature })),
                            _ => failures.push(format!("no signature in {result}")),
                        }
                    }
                    Err(e) => failures.push(e.to_string()),
                }
            }
            (got, failures)
        }));
    }
    let mut signatures = Vec::new();
    let mut latencies = Vec::new();
    let mut failures = Vec::new();
    for task in tasks {
        let (got, failed) = task.await?;
        for (took, signed) in got {
            latencies.push(took);
            signatures.push(signed);
        }
        failures.extend(failed);
    }
    let elapsed = start.elapsed();
    let cpu = cpu_time(target.pid, ticks)?.saturating_sub(cpu_before);
    let hosts_cpu = children_cpu_time(target.pid, ticks).saturating_sub(hosts_before);
    let clients_cpu = cpu_time(std::process::id(), ticks)?.saturating_sub(clients_before);
    latencies.sort();
    Ok(LoadRun {
        signatures,
        elapsed,
        latencies,
        cpu,
        hosts_cpu,
        clients_cpu,
        failures,
    })
}

/// Verifies every signature with Python `cryptography` in one process (ECDSA P-256 over the
/// SHA-256 digest, DER), and the first with OpenSSL.
fn verify_all(target: &Target<'_>, work: &Path, signatures: &[Signed]) -> Result<()> {
    let first = signatures
        .first()
        .ok_or_else(|| anyhow!("no signature to verify"))?;
    verify_agent_signature(
        target.token,
        target.cert_b64,
        &first.digest,
        &first.signature,
    )?;
    let list = work.join("signatures.txt");
    let mut file = std::fs::File::create(&list)?;
    for s in signatures {
        writeln!(
            file,
            "{} {}",
            hex::encode(&s.digest),
            hex::encode(&s.signature)
        )?;
    }
    drop(file);
    const CHECK: &str = r#"
import sys
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils
key = x509.load_pem_x509_certificate(open(sys.argv[1], "rb").read()).public_key()
n = 0
for line in open(sys.argv[2]):
    digest, sig = (bytes.fromhex(x) for x in line.split())
    key.verify(sig, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    n += 1
print(n)
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(CHECK)
        .arg(target.token.cert_pem("sign-p256"))
        .arg(&list)
        .output()?;
    if !out.status.success() {
        bail!(
            "Python cryptography rejects a signature the agent returned: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let checked: usize = String::from_utf8_lossy(&out.stdout).trim().parse()?;
    if checked != signatures.len() {
        bail!(
            "Python checked {checked} of {} signatures",
            signatures.len()
        );
    }
    Ok(())
}

/// The load rows, in order, and the problems seen (failed requests): a row with a problem is
/// printed with it, and the benchmark fails at the end. `before` is the token's rate measured
/// just before.
pub async fn rows(
    target: &Target<'_>,
    work: &Path,
    before: TokenRate,
) -> Result<(Vec<Row>, Vec<String>)> {
    let ticks = clock_ticks()?;
    let mut rows = Vec::new();
    let mut problems = Vec::new();
    let per_row = std::env::var("KEYPORT_BENCH_SIGNATURES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(4000);
    let total = target.scale.of(per_row);
    let mut signed_so_far = 0usize;
    let mut one_conn_p50 = None;

    for (conns, origins) in scenarios() {
        let per_conn = total.div_ceil(conns);
        let tag = format!("{conns}x{origins}");
        let run = load_run(target, conns, origins, per_conn, ticks, &tag).await?;
        let failed = if run.failures.is_empty() {
            String::new()
        } else {
            let problem = format!(
                "{} of {} requests failed, first: {}",
                run.failures.len(),
                conns * per_conn,
                run.failures[0]
            );
            problems.push(format!(
                "{conns} connections from {origins} origin(s): {problem}"
            ));
            format!("; FAILED: {problem}")
        };
        if !run.signatures.is_empty() {
            verify_all(target, work, &run.signatures)?;
        }
        signed_so_far += run.signatures.len() + conns;
        let n = run.signatures.len();
        let per_s = rate(n, run.elapsed);
        let cpu_per = run.cpu.as_secs_f64() * 1e6 / n as f64;
        let hosts_per = run.hosts_cpu.as_secs_f64() * 1e6 / n as f64;
        let clients_per = run.clients_cpu.as_secs_f64() * 1e6 / n as f64;
        // How many cores the agent, its hosts and the clients kept busy together.
        let busy =
            (run.cpu + run.hosts_cpu + run.clients_cpu).as_secs_f64() / run.elapsed.as_secs_f64();
        let from = if origins == 1 {
            "1 origin".to_owned()
        } else {
            format!("{origins} origins")
        };
        rows.push((
            format!(
                "{conns} connection{} ({from}), session consent: `sign` P-256 rate (× the token's), p50 / p99, agent CPU per `sign` (+ its module host's, where the token signs; the benchmark's clients'), cores kept busy by the three ({n} signatures)",
                if conns == 1 { "" } else { "s" }
            ),
            format!(
                "{per_s:.0}/s (× {:.2}), {} / {}, {cpu_per:.0} µs (+ {hosts_per:.0} µs; clients {clients_per:.0} µs), {busy:.2} cores{failed}",
                per_s / before.per_s,
                ms(percentile(&run.latencies, 50.0)),
                ms(percentile(&run.latencies, 99.0)),
            ),
        ));
        if conns == 1 {
            one_conn_p50 = Some(percentile(&run.latencies, 50.0));
        }
    }
    if let Some(p50) = one_conn_p50 {
        let added = p50.as_secs_f64() - before.p50.as_secs_f64();
        rows.push((
            "1 connection: added latency over the token's own p50 (agent p50 − token p50)".into(),
            format!("{:.0} µs ({} − {})", added * 1e6, ms(p50), ms(before.p50)),
        ));
    }

    if target.scale.load_only {
        return Ok((rows, problems));
    }

    // Time from a request's arrival to its dialog: the scripted pinentry stamps its first
    // Assuan command; the request's send time is taken just before it leaves.
    let dialogs = target.scale.of(20).max(3);
    let mut portal = Client::connect(target.port, target.request_origin).await?;
    let mut waits = Vec::with_capacity(dialogs);
    for i in 0..dialogs {
        target
            .script
            .push(&Step::confirm(Button::Ok).expect(Dialog::Confirm))?;
        let digest = sha2::Sha256::digest(format!("dialog {i}")).to_vec();
        let sent_us = now_us();
        portal
            .call("sign", sign_params(target.cert_id, &digest))
            .await?;
        let first = target
            .script
            .transcript()?
            .iter()
            .filter_map(|e| e.at_us)
            .filter(|&at| at >= sent_us)
            .min()
            .ok_or_else(|| anyhow!("no dialog was stamped after request {i}"))?;
        waits.push(Duration::from_micros(first - sent_us));
    }
    signed_so_far += dialogs;
    waits.sort();
    rows.push((
        format!("time from a `sign` request to its dialog's first Assuan command (p50 / max of {dialogs})"),
        format!(
            "{} / {}",
            ms(percentile(&waits, 50.0)),
            ms(percentile(&waits, 100.0))
        ),
    ));

    // RSS across two rounds of signatures on 8 connections from 8 origins.
    let soak = target.scale.of(10_000);
    for round in ["first", "second"] {
        let run = load_run(target, 8, 8, soak.div_ceil(8), ticks, round).await?;
        if !run.failures.is_empty() {
            problems.push(format!(
                "soak: {} requests failed, first: {}",
                run.failures.len(),
                run.failures[0]
            ));
        }
        verify_all(target, work, &run.signatures)?;
        signed_so_far += run.signatures.len() + 8;
        rows.push((
            format!(
                "RSS after the {round} {} signatures on 8 connections ({signed_so_far} signed since start)",
                run.signatures.len()
            ),
            super::memory::Footprint::of(target.pid, &format!("soak-{round}"))?.to_string(),
        ));
    }

    // RSS with 200 open connections (each has said `hello`).
    let open = 200;
    let mut held = Vec::with_capacity(open);
    for i in 0..open {
        let mut client = Client::connect(target.port, LOAD_ORIGINS[i % LOAD_ORIGINS.len()]).await?;
        client.call("hello", json!({})).await?;
        held.push(client);
    }
    rows.push((
        format!("RSS with {open} open connections"),
        super::memory::Footprint::of(target.pid, "connections")?.to_string(),
    ));
    drop(held);
    Ok((rows, problems))
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

// ---------------------------------------------------------------------------------------------
// certificates.list over 5 tokens × 20 certificates

pub const LIST_TOKENS: usize = 5;
pub const LIST_CERTS: usize = 20;

/// Makes a SoftHSM configuration in `dir` with 5 tokens of 20 P-256 keys and certificates
/// each (OpenSSL makes them, softhsm2-util and pkcs11-tool put them on the tokens). Returns
/// the `SOFTHSM2_CONF` path.
pub fn provision_many(dir: &Path) -> Result<std::path::PathBuf> {
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens)?;
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )?;
    let run = |cmd: &mut Command| -> Result<()> {
        let out = cmd.env("SOFTHSM2_CONF", &conf).output()?;
        if !out.status.success() {
            bail!(
                "{cmd:?} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    };
    for t in 0..LIST_TOKENS {
        let label = format!("bench-{t}");
        run(Command::new("softhsm2-util").args([
            "--init-token",
            "--free",
            "--label",
            &label,
            "--pin",
            USER_PIN,
            "--so-pin",
            "12345678",
        ]))?;
        for c in 0..LIST_CERTS {
            let key = dir.join(format!("k{t}-{c}.pem"));
            let cert = dir.join(format!("c{t}-{c}.der"));
            let id = format!("{:02x}{:02x}", t + 1, c + 1);
            run(Command::new("openssl")
                .args([
                    "genpkey",
                    "-algorithm",
                    "EC",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-out",
                ])
                .arg(&key))?;
            run(Command::new("openssl")
                .args([
                    "req", "-x509", "-new", "-days", "30", "-outform", "DER", "-subj",
                ])
                .arg(format!("/CN=Bench holder {t}-{c}/O=KeyPort bench"))
                .arg("-key")
                .arg(&key)
                .arg("-out")
                .arg(&cert))?;
            run(Command::new("softhsm2-util")
                .arg("--import")
                .arg(&key)
                .args([
                    "--token",
                    &label,
                    "--label",
                    &format!("key-{c}"),
                    "--id",
                    &id,
                    "--pin",
                    USER_PIN,
                ]))?;
            run(Command::new("pkcs11-tool")
                .args([
                    "--module",
                    super::MODULE,
                    "--token-label",
                    &label,
                    "--login",
                    "--pin",
                    USER_PIN,
                    "--type",
                    "cert",
                    "--id",
                    &id,
                    "--label",
                    &format!("key-{c}"),
                    "--write-object",
                ])
                .arg(&cert))?;
        }
    }
    Ok(conf)
}

/// `certificates.list` latencies (sorted) from an agent over the 5 × 20 tokens; checks every
/// answer lists all 100 certificates.
pub async fn list_latencies(port: u16, origin: &str, calls: usize) -> Result<Vec<Duration>> {
    let mut client = Client::connect(port, origin).await?;
    let mut times = Vec::with_capacity(calls);
    let mut per_token: HashMap<String, usize> = HashMap::new();
    for i in 0..calls {
        let start = Instant::now();
        let list = client.call("certificates.list", json!({})).await?;
        times.push(start.elapsed());
        let certs = list
            .get("certificates")
            .and_then(Value::as_array)
            .ok_or_else(|| anyhow!("certificates.list without certificates: {list}"))?;
        if certs.len() != LIST_TOKENS * LIST_CERTS {
            bail!(
                "certificates.list call {i} listed {} certificates, not {}",
                certs.len(),
                LIST_TOKENS * LIST_CERTS
            );
        }
        if i == 0 {
            for c in certs {
                let token = c.get("tokenId").and_then(Value::as_str).unwrap_or("?");
                *per_token.entry(token.to_owned()).or_default() += 1;
            }
        }
    }
    if per_token.len() != LIST_TOKENS || per_token.values().any(|&n| n != LIST_CERTS) {
        bail!("certificates per token: {per_token:?}");
    }
    times.sort();
    Ok(times)
}
