//! `keyport demo`: one command for a newcomer. Provisions a SoftHSM demo token once in the
//! user's data folder, then runs the agent with the demo portal served on 127.0.0.1 and its
//! origin allowed, using the desktop's pinentry.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{bail, Context};

use crate::config::{Config, ModuleConfig, Paths};
use crate::daemon::{self, RunOptions};

/// The provisioning script and its helpers, built into the binary so `keyport demo` works from
/// anywhere.
const PROVISION_SH: &str = include_str!("../../softhsm-config/provision.sh");
const ISSUE_CERTS_PY: &str = include_str!("../../softhsm-config/issue_certs.py");
const CONF_IN: &str = include_str!("../../softhsm-config/softhsm2.conf.in");
const PROVISION_SKF_SH: &str = include_str!("../../softhsm-config/provision-skf.sh");

/// The soft SKF library (tests/soft-skf, a test double speaking GM/T 0016) that gives the demo
/// an SM2 USB key. It is not part of the agent: `scripts/demo.sh` builds it next to the
/// `keyport` binary, and the demo loads it through the real C interface like any vendor's.
const SOFT_SKF_LIBRARY: &str = "libkeyport_soft_skf.so";

/// Where Debian and Ubuntu install SoftHSM's module.
const SOFTHSM_MODULES: &[&str] = &[
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
];

pub fn run(
    mut config: Config,
    paths: Paths,
    port: u16,
    policy: &crate::policy::Loaded,
) -> anyhow::Result<ExitCode> {
    let module = match find_softhsm() {
        Some(m) if have("pkcs11-tool") && have("openssl") => m,
        _ => {
            let apt = "apt-get install -y softhsm2 opensc openssl python3-cryptography";
            if is_root() {
                eprintln!("keyport demo: SoftHSM is missing; running: {apt}");
                let ok = Command::new("sh")
                    .arg("-c")
                    .arg(format!("apt-get update -q && {apt}"))
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false);
                if !ok {
                    bail!("`{apt}` failed");
                }
                find_softhsm().context("SoftHSM installed but its module was not found")?
            } else {
                eprintln!(
                    "keyport demo needs SoftHSM and OpenSC. Install them with:\n\n    sudo {apt}\n"
                );
                return Ok(ExitCode::from(2));
            }
        }
    };
    let token_dir = token_dir(&paths);
    if !token_dir.join("softhsm2.conf").exists() {
        eprintln!(
            "keyport demo: creating the demo token in {}",
            token_dir.display()
        );
        provision(&token_dir)?;
    }
    use_token(&mut config, &token_dir, module)?;
    if config.skf_modules.is_empty() {
        eprintln!(
            "keyport demo: no SM2 USB key in this demo: build the soft SKF library next to \
             keyport (cargo build --release -p keyport-soft-skf, as scripts/demo.sh does)"
        );
    }
    config.allow_insecure_localhost_origins = true;
    let origin = format!("http://127.0.0.1:{port}");
    if !config.allowed_origins.contains(&origin) {
        config.allowed_origins.push(origin);
    }
    if config.pinentry.is_none() && daemon::pinentry_for(&config).is_err() {
        let graphical =
            std::env::var_os("DISPLAY").is_some() || std::env::var_os("WAYLAND_DISPLAY").is_some();
        let package = if graphical {
            "pinentry-gnome3"
        } else {
            "pinentry-curses"
        };
        eprintln!("keyport demo needs a pinentry dialog program. Install one with:\n\n    sudo apt-get install -y {package}\n");
        return Ok(ExitCode::from(2));
    }
    // A terminal pinentry (curses, tty) needs to know the terminal: tell it ours.
    if std::env::var_os("GPG_TTY").is_none() {
        if let Some(tty) = crate::local::terminal_name() {
            std::env::set_var("GPG_TTY", tty);
        }
    }
    eprintln!(
        "keyport demo: open {} in your browser. The demo token's PIN is 123456.",
        portal_url(port, config.port)
    );
    eprintln!(
        "keyport demo: afterwards `keyport --demo tokens`, `keyport --demo certs` and \
         `keyport --demo audit --verify` show the demo token and its audit log."
    );
    // The demo's own settings are the user's: the administrator's policy bounds them too.
    let (config, _) = policy.apply(config);
    let rt = daemon::runtime()?;
    rt.block_on(daemon::run(
        config,
        paths,
        RunOptions {
            demo_port: Some(port),
        },
    ))?;
    Ok(ExitCode::SUCCESS)
}

/// Where `keyport demo` keeps its token, audit key and audit log.
pub fn token_dir(paths: &Paths) -> PathBuf {
    paths.data_dir.join("demo-token")
}

/// The demo portal's address; it names the agent's WebSocket when the agent is not on the
/// port the page assumes (47333).
pub fn portal_url(demo_port: u16, agent_port: u16) -> String {
    if agent_port == 47333 {
        format!("http://127.0.0.1:{demo_port}/")
    } else {
        format!("http://127.0.0.1:{demo_port}/?agent=ws://127.0.0.1:{agent_port}/v1")
    }
}

/// `keyport --demo …`: the demo token (made by `keyport demo`) and its audit log, as the demo
/// uses them, for `tokens`, `certs`, `sign`, `audit` and `doctor`.
pub fn apply(config: &mut Config, paths: &Paths) -> anyhow::Result<()> {
    let dir = token_dir(paths);
    if !dir.join("softhsm2.conf").exists() {
        bail!(
            "no demo token at {}: `keyport demo` makes it the first time it runs",
            dir.display()
        );
    }
    let module = find_softhsm().context("the demo token needs SoftHSM (apt install softhsm2)")?;
    use_token(config, &dir, module)
}

/// Points the configuration at the demo token: SoftHSM alone, and the demo's audit key and log
/// unless the configuration names its own.
fn use_token(config: &mut Config, dir: &Path, module: PathBuf) -> anyhow::Result<()> {
    // SoftHSM reads its configuration from the environment at C_Initialize.
    std::env::set_var("SOFTHSM2_CONF", dir.join("softhsm2.conf"));
    config.modules = vec![ModuleConfig { path: module }];
    config.discover_modules = false;
    use_soft_skf(config, dir)?;
    if config.audit_key_file.is_none() {
        let key = dir.join("audit.key");
        if !key.exists() {
            write_random_key(&key)?;
        }
        config.audit_key_file = Some(key);
    }
    if config.audit_log.is_none() {
        config.audit_log = Some(dir.join("audit.log"));
    }
    Ok(())
}

/// Adds the demo's SM2 USB key when the soft SKF library was built next to this binary: its
/// store (an SM2 test CA, keys and certificates; PIN 123456) is made once in `dir/skf-key`.
fn use_soft_skf(config: &mut Config, dir: &Path) -> anyhow::Result<()> {
    let Some(library) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(SOFT_SKF_LIBRARY)))
        .filter(|p| p.exists())
    else {
        return Ok(());
    };
    let store = dir.join("skf-key");
    if !store.join("skf").exists() {
        let scripts = tempfile::tempdir()?;
        let sh = scripts.path().join("provision-skf.sh");
        std::fs::write(&sh, PROVISION_SKF_SH)?;
        let status = Command::new("bash")
            .arg(&sh)
            .arg(&store)
            .status()
            .context("cannot run bash")?;
        if !status.success() {
            let _ = std::fs::remove_dir_all(&store);
            bail!("provisioning the demo's SM2 USB key failed");
        }
    }
    // The soft library reads its store from the environment at its first call.
    std::env::set_var("KEYPORT_SOFT_SKF_DIR", store.join("skf"));
    config.skf_modules = vec![ModuleConfig { path: library }];
    Ok(())
}

fn provision(dir: &Path) -> anyhow::Result<()> {
    let scripts = tempfile::tempdir()?;
    let sh = scripts.path().join("provision.sh");
    std::fs::write(&sh, PROVISION_SH)?;
    std::fs::write(scripts.path().join("issue_certs.py"), ISSUE_CERTS_PY)?;
    std::fs::write(scripts.path().join("softhsm2.conf.in"), CONF_IN)?;
    std::fs::create_dir_all(dir)?;
    let status = Command::new("bash")
        .arg(&sh)
        .arg(dir)
        .status()
        .context("cannot run bash")?;
    if !status.success() {
        // Leave nothing half-made: the next run starts over.
        let _ = std::fs::remove_dir_all(dir);
        bail!("provisioning the demo token failed");
    }
    Ok(())
}

fn write_random_key(path: &Path) -> anyhow::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut bytes = [0u8; 32];
    rand::fill(&mut bytes);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    opts.mode(0o600);
    let mut f = opts
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(&bytes)?;
    Ok(())
}

fn find_softhsm() -> Option<PathBuf> {
    SOFTHSM_MODULES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

fn have(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.trim_ascii() == b"0")
        .unwrap_or(false)
}
