//! Issue 11's SKF rows: what hosting an SKF library costs. The same SM2 container of the soft
//! SKF library (tests/soft-skf), through `skf_shim::Library` in this process and through a
//! hosted `Library` (the agent's supervisor starting `keyport host --skf …`): one `sign` per
//! signature with the PIN verified once, and one batch of 1000 e values; then the host's
//! resident memory. The soft library reads its key file for every signature, so the SM2
//! figures are its own, not a USB key's; the hop is the difference.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use agent::host::supervisor::HostCommand;
use agent::host::Supervisor;
use anyhow::{anyhow, bail, Result};
use keyport_e2e::skf::{SoftSkfStore, SKF_SM2_HOLDER, SKF_USER_PIN};
use skf_shim::{
    KeyAlgorithm, Library, LoadOptions, SecretPin, SignAlgorithm, SignInput, SignRequest,
    Sm2Encoding,
};

use super::{median_of, Scale};

const SIGNS: usize = 200;
const BATCH: usize = 1000;

/// The rows as a Markdown table. Sets `KEYPORT_SOFT_SKF_DIR` for this process and its hosts.
pub fn table(keyport: &Path, scale: Scale) -> Result<String> {
    let store = SoftSkfStore::provision()?;
    std::env::set_var("KEYPORT_SOFT_SKF_DIR", store.state());
    let library = store.library();
    let options = LoadOptions::default();
    let in_process = Library::load_with(&library, options)?;
    let supervisor = Arc::new(Supervisor::new(
        HostCommand {
            program: keyport.to_path_buf(),
            args: vec![
                "host".into(),
                "--skf".into(),
                library.clone().into_os_string(),
            ],
            env: Vec::new(),
        },
        None,
    ));
    let hosted = agent::host::skf::hosted_library(&library, options, Arc::clone(&supervisor));
    let mut out = String::from(
        "\n| library isolation (skf-shim, soft SKF library) | value |\n| --- | ---: |\n",
    );
    let mut per_sign = Vec::new();
    for (name, l) in [("in process", &in_process), ("library host", &hosted)] {
        let (sign, batch) = measure(l, scale)?;
        out.push_str(&format!(
            "| one SM2 `sign` per signature, PIN verified once ({name}) | {:.1} µs |\n",
            sign.as_secs_f64() * 1e6
        ));
        out.push_str(&format!(
            "| one batch of {} SM2 e values ({name}) | {:.1} ms |\n",
            scale.of(BATCH),
            batch.as_secs_f64() * 1e3
        ));
        per_sign.push(sign);
    }
    if let [inside, hosted] = per_sign[..] {
        out.push_str(&format!(
            "| the process hop per SM2 `sign` | {:.1} µs |\n",
            (hosted.as_secs_f64() - inside.as_secs_f64()) * 1e6
        ));
    }
    let pid = supervisor
        .status()
        .pid
        .ok_or_else(|| anyhow!("the library host is not running"))?;
    out.push_str(&format!(
        "| library host RSS (soft SKF library loaded, after the batch) | {} |\n",
        super::isolation::rss(pid)?
    ));
    drop(hosted);
    supervisor.stop();
    Ok(out)
}

/// The median time of one `sign` (PIN verified before the clock), and of one batch.
fn measure(l: &Library, scale: Scale) -> Result<(Duration, Duration)> {
    let cert = l
        .certificates(None)?
        .into_iter()
        .find(|c| c.holder == SKF_SM2_HOLDER && c.key_algorithm == KeyAlgorithm::Sm2)
        .ok_or_else(|| anyhow!("no SM2 certificate for {SKF_SM2_HOLDER}"))?;
    let app = cert.id.application().clone();
    l.verify_pin(&app, SecretPin::from(SKF_USER_PIN.to_owned()))?;
    let request = |n: usize| SignRequest {
        certificate: cert.id.clone(),
        algorithm: SignAlgorithm::sm2(Sm2Encoding::Raw),
        inputs: (0..n).map(|i| SignInput::Digest(sha2_32(i))).collect(),
        logout_after: false,
    };
    let signs = scale.of(SIGNS);
    let sign = median_of(scale.runs(), || {
        let start = std::time::Instant::now();
        for _ in 0..signs {
            let sigs = l
                .sign(request(1), None)
                .map_err(|f| anyhow!("sign: {}", f.error))?;
            if sigs.len() != 1 {
                bail!("no signature");
            }
        }
        Ok(start.elapsed().as_secs_f64() / signs as f64)
    })?;
    let n = scale.of(BATCH);
    let batch = median_of(scale.runs(), || {
        let start = std::time::Instant::now();
        let sigs = l
            .sign(request(n), None)
            .map_err(|f| anyhow!("batch: {}", f.error))?;
        if sigs.len() != n {
            bail!("{} signatures for {n}", sigs.len());
        }
        Ok(start.elapsed().as_secs_f64())
    })?;
    l.logout(&app)?;
    Ok((
        Duration::from_secs_f64(sign),
        Duration::from_secs_f64(batch),
    ))
}

/// A 32-byte e value (any 32 bytes sign; the figure is the same).
fn sha2_32(i: usize) -> Vec<u8> {
    use sha2::Digest as _;
    sha2::Sha256::digest(i.to_be_bytes()).to_vec()
}
