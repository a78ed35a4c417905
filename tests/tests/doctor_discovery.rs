//! `keyport doctor` reports modules found through p11-kit `.module` files in the user's config
//! dir (XDG_CONFIG_HOME/pkcs11/modules), with their source, and a module that fails to load with
//! its path, the loader's error and a fix.

use std::process::Command;

use anyhow::{ensure, Result};
use keyport_e2e::harness::{keyport_bin, SOFTHSM};

#[test]
fn a_p11kit_module_file_shows_up_in_doctor_with_its_source() -> Result<()> {
    let softhsm = SOFTHSM;
    ensure!(
        std::path::Path::new(softhsm).exists(),
        "{softhsm} missing (apt install softhsm2)"
    );
    let bin = keyport_bin();
    ensure!(bin.exists(), "build keyport first: cargo build -p agent");
    let dir = tempfile::tempdir()?;
    let modules = dir.path().join("xdg/pkcs11/modules");
    std::fs::create_dir_all(&modules)?;
    // A copy, so the system's own softhsm2.module (same library) does not claim it first.
    let copy = dir.path().join("libkeyport-test-softhsm.so");
    std::fs::copy(softhsm, &copy)?;
    let good = modules.join("keyport-test-softhsm.module");
    std::fs::write(&good, format!("module: {}\n", copy.display()))?;
    let bad = modules.join("keyport-test-missing.module");
    std::fs::write(&bad, "module: /nonexistent/libkeyport-missing.so\n")?;
    // An empty SoftHSM token store: the module loads and shows no token.
    let tokens = dir.path().join("tokens");
    std::fs::create_dir_all(&tokens)?;
    let softhsm_conf = dir.path().join("softhsm2.conf");
    std::fs::write(
        &softhsm_conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\n",
            tokens.display()
        ),
    )?;
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "discover_modules = true\n")?;
    let out = Command::new(bin)
        .arg("--config")
        .arg(&config)
        .arg("doctor")
        .env("XDG_CONFIG_HOME", dir.path().join("xdg"))
        .env("SOFTHSM2_CONF", &softhsm_conf)
        // No pcscd here: that is reported as a problem, not a crash.
        .env("PCSCLITE_CSOCK_NAME", dir.path().join("no-pcscd.comm"))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with(&*copy.to_string_lossy()))
        .unwrap_or_default();
    ensure!(
        line.contains("[loaded")
            && line.contains(&format!("from p11-kit registration {}", good.display())),
        "softhsm line: {line:?}"
    );
    ensure!(
        text.contains(&format!(
            "/nonexistent/libkeyport-missing.so  [NOT LOADED]  from p11-kit registration {}",
            bad.display()
        )),
        "missing module listed"
    );
    ensure!(
        text.contains("module /nonexistent/libkeyport-missing.so (p11-kit registration")
            && text.contains("failed to load"),
        "problem with a fix"
    );
    ensure!(text.contains("pcscd is not running"), "pcscd problem");
    ensure!(out.status.code() == Some(1), "problems give exit 1");
    Ok(())
}
