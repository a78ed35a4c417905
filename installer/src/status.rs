//! `keyport-install status`: where the agent's unit is, and what systemd says of it.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::Error;
use crate::paths::Dirs;
use crate::systemd::{PACKAGED_UNIT, PRESET, SYSTEM_UNIT, UNIT};

/// Prints the unit files found (the user's own, the machine-wide one, the package's), and
/// `systemctl is-enabled` / `is-active` for the user (or, with `system`, `--global
/// is-enabled`). With `dry_run` the systemctl commands are printed, not run.
pub fn run(system: bool, dry_run: bool) -> Result<(), Error> {
    let dirs = Dirs::discover()?;
    let mut units: Vec<(PathBuf, &str)> = Vec::new();
    if !system {
        units.push((dirs.systemd_unit(), "yours, from keyport-install install"));
    }
    units.push((
        SYSTEM_UNIT.into(),
        "machine-wide, from keyport-install install --system",
    ));
    units.push((PACKAGED_UNIT.into(), "from the keyport package"));
    units.push((
        PRESET.into(),
        "the package's preset: enabled for every user",
    ));
    println!("unit files:");
    for (path, what) in &units {
        let state = if path.exists() { "present" } else { "absent " };
        println!("  {state}  {}  ({what})", path.display());
    }
    let scope = if system { "--global" } else { "--user" };
    let mut checks: Vec<&[&str]> = vec![&["is-enabled", UNIT]];
    if !system {
        checks.push(&["is-active", UNIT]);
    }
    println!("systemd:");
    for args in checks {
        let line = format!("systemctl {scope} {}", args.join(" "));
        if dry_run {
            println!("  would run: {line}");
            continue;
        }
        println!("  {}: {}", args[0], systemctl(scope, args));
    }
    if !system {
        println!("KeyPort's folders:");
        for (dir, what) in [
            (&dirs.keyport_config, "config and origin decisions"),
            (&dirs.keyport_data, "audit log and demo token"),
        ] {
            println!("  {}  {}  ({what})", presence(dir), dir.display());
        }
    }
    Ok(())
}

/// What systemctl answered, on one line (its error when the manager cannot be reached).
fn systemctl(scope: &str, args: &[&str]) -> String {
    match Command::new("systemctl").arg(scope).args(args).output() {
        Ok(out) => {
            let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            let stderr = String::from_utf8_lossy(&out.stderr)
                .trim()
                .replace('\n', " ");
            match (stdout.is_empty(), stderr.is_empty()) {
                (false, _) => stdout,
                (true, false) => stderr,
                (true, true) => format!("(no answer, {})", out.status),
            }
        }
        Err(e) => format!("systemctl could not run ({e})"),
    }
}

fn presence(path: &Path) -> &'static str {
    if path.exists() {
        "present"
    } else {
        "absent "
    }
}

/// Whether this process runs as root (the owner of `/proc/self`).
pub fn is_root() -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
    }
    #[cfg(not(unix))]
    {
        false
    }
}
