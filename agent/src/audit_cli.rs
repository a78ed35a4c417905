//! `keyport audit [--verify]`: prints the audit log and proves its HMAC chain whole.

use std::process::ExitCode;

use anyhow::Context;

use crate::audit;
use crate::config::{Config, Paths};
use crate::daemon::{audit_key_source, audit_path};
use crate::secrets;

pub fn run(config: &Config, paths: &Paths, verify: bool) -> anyhow::Result<ExitCode> {
    let path = audit_path(config, paths);
    if !path.exists() {
        println!("no audit log yet at {}", path.display());
        return Ok(ExitCode::SUCCESS);
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
    let report = audit::verify(&path, &key)?;
    print!("{report}");
    Ok(if report.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
