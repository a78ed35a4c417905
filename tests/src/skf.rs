//! The soft SKF key for tests of the running agent: a store provisioned by
//! softhsm-config/provision-skf.sh and a private copy of the soft SKF library (tests/soft-skf)
//! that the agent loads through `[[skf_modules]]`, its state directory named in the agent's
//! environment (`KEYPORT_SOFT_SKF_DIR`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The user PIN the store is provisioned with (6 tries).
pub const SKF_USER_PIN: &str = "123456";
/// Subjects' CNs of the provisioned containers of the plugged-in key.
pub const SKF_SM2_HOLDER: &str = "张三";
pub const SKF_RSA_HOLDER: &str = "张三 RSA";
pub const SKF_DEVICE: &str = "SKF-KEY-0";
pub const SKF_APP: &str = "KEYPORT_APP";

/// A provisioned soft SKF store and its library copy; removed on drop.
#[derive(Debug)]
pub struct SoftSkfStore {
    dir: tempfile::TempDir,
}

impl SoftSkfStore {
    pub fn provision() -> Result<SoftSkfStore> {
        let dir = tempfile::Builder::new()
            .prefix("keyport-e2e-skf")
            .tempdir()?;
        let script = crate::harness::repo_root().join("softhsm-config/provision-skf.sh");
        let out = Command::new("bash").arg(&script).arg(dir.path()).output()?;
        if !out.status.success() {
            bail!(
                "provision-skf.sh failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let built = soft_skf_library()?;
        std::fs::copy(&built, dir.path().join("libsoftskf.so"))
            .with_context(|| format!("copying {}", built.display()))?;
        Ok(SoftSkfStore { dir })
    }

    /// The library the agent loads.
    pub fn library(&self) -> PathBuf {
        self.dir.path().join("libsoftskf.so")
    }

    /// `KEYPORT_SOFT_SKF_DIR` for the agent.
    pub fn state(&self) -> PathBuf {
        self.dir.path().join("skf")
    }

    /// The SM2 test CA (PEM).
    pub fn ca_pem(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A container's signing public key (PEM): `sm2-sign`, `rsa-sign`, `gbk-sm2-sign`.
    pub fn public_key(&self, name: &str) -> PathBuf {
        self.dir.path().join("pub").join(format!("{name}.pem"))
    }

    /// A container's signing certificate (PEM).
    pub fn cert_pem(&self, name: &str) -> PathBuf {
        self.dir.path().join("certs").join(format!("{name}.pem"))
    }

    pub fn device_dir(&self, device: &str) -> PathBuf {
        self.state().join("devices").join(device)
    }

    /// The application's PIN file (`remaining=` is the retry counter).
    pub fn pin_conf(&self) -> PathBuf {
        self.device_dir(SKF_DEVICE)
            .join("apps")
            .join(SKF_APP)
            .join("pin.conf")
    }

    /// Sets the retry counter of the user PIN.
    pub fn set_remaining(&self, n: u32) -> Result<()> {
        let text = std::fs::read_to_string(self.pin_conf())?;
        let out: Vec<String> = text
            .lines()
            .map(|l| {
                if l.starts_with("remaining=") {
                    format!("remaining={n}")
                } else {
                    l.to_owned()
                }
            })
            .collect();
        std::fs::write(self.pin_conf(), out.join("\n") + "\n")?;
        Ok(())
    }

    /// How many times the library was called with `function` (its call log).
    pub fn calls(&self, function: &str) -> usize {
        let log = std::fs::read_to_string(self.state().join("calls.log")).unwrap_or_default();
        let prefix = format!("{function} ");
        log.lines().filter(|l| l.starts_with(&prefix)).count()
    }

    /// The key is pulled out after `n` more signatures.
    pub fn remove_after_signs(&self, n: u32) -> Result<()> {
        std::fs::write(
            self.device_dir(SKF_DEVICE).join("remove_after_signs"),
            n.to_string(),
        )?;
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Replaces the library's `fault.conf` atomically (`crash_on=SKF_ECCSignData`, …; see
    /// tests/soft-skf/src/fault.rs); "" clears every fault.
    pub fn set_fault(&self, faults: &str) -> Result<()> {
        let next = self.state().join("fault.conf.next");
        std::fs::write(&next, faults)?;
        std::fs::rename(&next, self.state().join("fault.conf"))?;
        Ok(())
    }
}

/// The soft SKF library cargo built (a dev-dependency of this crate), next to the test binary.
fn soft_skf_library() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut candidates = Vec::new();
    if let Some(deps) = exe.parent() {
        candidates.push(deps.join("libkeyport_soft_skf.so"));
        if let Some(profile) = deps.parent() {
            candidates.push(profile.join("libkeyport_soft_skf.so"));
        }
    }
    candidates.push(crate::harness::repo_root().join("target/debug/libkeyport_soft_skf.so"));
    candidates
        .into_iter()
        .find(|p| p.exists())
        .context("libkeyport_soft_skf.so not built: cargo build -p keyport-soft-skf")
}
