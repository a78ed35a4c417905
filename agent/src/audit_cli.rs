//! `keyport audit [--verify]`: prints the audit log and proves its HMAC chain whole.

use std::process::ExitCode;

use anyhow::Context;

use crate::audit;
use crate::config::{Config, Paths};
use crate::daemon::{audit_head_path, audit_key_source, audit_path};
use crate::secrets;

pub fn run(config: &Config, paths: &Paths, verify: bool) -> anyhow::Result<ExitCode> {
    let path = audit_path(config, paths);
    // A head without its log: lines were written, and the log was removed since.
    let removed = verify && audit_head_path(config, paths).exists();
    if !path.exists() && !removed {
        println!("no audit log yet at {}", path.display());
        return Ok(ExitCode::SUCCESS);
    }
    if !path.exists() {
        // The head says lines were written: a log that is gone was removed.
        println!(
            "audit log {} is missing, but its head says lines were written: it was removed",
            path.display()
        );
        return Ok(ExitCode::FAILURE);
    }
    if !verify {
        for line in
            audit::read_lines(&path).with_context(|| format!("reading {}", path.display()))?
        {
            println!("{}", audit::render_line(&line));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let key = secrets::audit_key(&audit_key_source(config))?;
    let report = audit::verify(&path, &key, &audit_head_path(config, paths))?;
    print!("{report}");
    Ok(if report.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
