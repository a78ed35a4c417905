//! Issue 11's rows: what module isolation costs. The same P-256 key on the same SoftHSM token,
//! through `pkcs11_shim::Module` in this process and through a hosted `Module` (the agent's
//! supervisor starting `keyport host --pkcs11 …`, the frames over a socket pair): one `sign`
//! per signature on a cached login, and one batch of 1000 digests; then the module host's
//! resident memory (VmRSS of /proc/PID/status) after the batch. The agent's WebSocket rows
//! are the same plus this hop.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent::host::pkcs11::{host_command_with, hosted_module};
use agent::host::Supervisor;
use anyhow::{anyhow, bail, Result};
use pkcs11_shim::{
    Credential, EcdsaEncoding, HashAlg, LoadOptions, Module, SecretPin, SignAlgorithm, SignInput,
    SignRequest,
};

use super::{median_of, Scale, MODULE, USER_PIN};

const LABEL: &str = "sign-p256";
const SIGNS: usize = 500;
const BATCH: usize = 1000;

/// The rows as a Markdown table.
pub fn table(keyport: &Path, scale: Scale) -> Result<String> {
    let mut out =
        String::from("\n| module isolation (pkcs11-shim, SoftHSM) | value |\n| --- | ---: |\n");
    for (what, value) in isolation_rows(keyport, scale)? {
        out.push_str(&format!("| {what} | {value} |\n"));
    }
    Ok(out)
}

/// `(what, value)` rows for the benchmark's table.
fn isolation_rows(keyport: &Path, scale: Scale) -> Result<Vec<(String, String)>> {
    let options = LoadOptions::default();
    let in_process = Module::load_with(Path::new(MODULE), options)?;
    let supervisor = Arc::new(Supervisor::new(
        host_command_with(keyport.to_path_buf(), Path::new(MODULE)),
        None,
    ));
    let hosted = hosted_module(
        Path::new(MODULE),
        options,
        Duration::from_secs(120),
        Arc::clone(&supervisor),
    )?;
    let mut rows = Vec::new();
    let mut per_sign = Vec::new();
    for (name, module) in [("in process", &in_process), ("module host", &hosted)] {
        let (sign, batch) = measure(module, scale)?;
        rows.push((
            format!("isolation: one `sign` per signature, P-256, cached login ({name})"),
            format!("{:.1} µs", sign.as_secs_f64() * 1e6),
        ));
        rows.push((
            format!(
                "isolation: one batch of {} P-256 digests ({name})",
                scale.of(BATCH)
            ),
            format!("{:.1} ms", batch.as_secs_f64() * 1e3),
        ));
        per_sign.push(sign);
    }
    for (name, module) in [("in process", &in_process), ("module host", &hosted)] {
        let calls = scale.of(SIGNS);
        let info = median_of(scale.runs(), || {
            let start = Instant::now();
            for _ in 0..calls {
                module.info()?;
            }
            Ok(start.elapsed().as_secs_f64() / calls as f64)
        })?;
        rows.push((
            format!("isolation: one C_GetInfo round trip ({name})"),
            format!("{:.1} µs", info * 1e6),
        ));
    }
    if let [inside, hosted] = per_sign[..] {
        rows.push((
            "isolation: the process hop per `sign`".into(),
            format!(
                "{:.1} µs",
                (hosted.as_secs_f64() - inside.as_secs_f64()) * 1e6
            ),
        ));
    }
    let pid = supervisor
        .status()
        .pid
        .ok_or_else(|| anyhow!("the module host is not running"))?;
    rows.push((
        "isolation: module host RSS (SoftHSM loaded, after the batch)".into(),
        rss(pid)?,
    ));
    Ok(rows)
}

/// The median time of one cached-login `sign`, and of one batch.
fn measure(module: &Module, scale: Scale) -> Result<(Duration, Duration)> {
    let cert = module
        .certificates(None)?
        .into_iter()
        .find(|c| c.label == LABEL)
        .ok_or_else(|| anyhow!("no certificate {LABEL}"))?;
    let alg = SignAlgorithm::Ecdsa(HashAlg::Sha256, EcdsaEncoding::P1363);
    let request = |n: usize, logout_after: bool| SignRequest {
        certificate: cert.id.clone(),
        algorithm: alg,
        inputs: (0..n)
            .map(|i| SignInput::Digest(HashAlg::Sha256.digest(&i.to_be_bytes())))
            .collect(),
        logout_after,
    };
    let pin = || Credential::Pin(SecretPin::from(USER_PIN.to_owned()));
    // Log in once (cached) before the clock.
    module
        .sign(request(1, false), pin(), None, None)
        .map_err(|f| anyhow!("first sign: {}", f.error))?;
    let signs = scale.of(SIGNS);
    let sign = median_of(scale.runs(), || {
        let start = Instant::now();
        for _ in 0..signs {
            let sigs = module
                .sign(request(1, false), Credential::None, None, None)
                .map_err(|f| anyhow!("sign: {}", f.error))?;
            if sigs.len() != 1 {
                bail!("no signature");
            }
        }
        Ok(start.elapsed().as_secs_f64() / signs as f64)
    })?;
    let n = scale.of(BATCH);
    let batch = median_of(scale.runs(), || {
        let start = Instant::now();
        let sigs = module
            .sign(request(n, false), Credential::None, None, None)
            .map_err(|f| anyhow!("batch: {}", f.error))?;
        if sigs.len() != n {
            bail!("{} signatures for {n}", sigs.len());
        }
        Ok(start.elapsed().as_secs_f64())
    })?;
    module.logout(&cert.token_id)?;
    Ok((
        Duration::from_secs_f64(sign),
        Duration::from_secs_f64(batch),
    ))
}

/// "12.3 MiB" from /proc/PID/status.
pub(super) fn rss(pid: u32) -> Result<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS for {pid}"))?;
    Ok(format!("{:.1} MiB", kib / 1024.0))
}
