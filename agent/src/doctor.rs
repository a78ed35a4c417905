//! `keyport doctor`: what was found, where it came from, and what to fix.

use std::process::ExitCode;

use crate::config::{Config, Paths};
use crate::tokens::TokenSet;

pub fn run(config: &Config, paths: &Paths) -> anyhow::Result<ExitCode> {
    let mut problems: Vec<String> = Vec::new();
    println!("configuration: {}", paths.config_file.display());
    if !paths.config_file.exists() {
        println!("  (no file: defaults apply)");
    }

    crate::pcsc_watch::doctor_readers(config, &mut problems);

    let tokens = TokenSet::load(config);
    let discovery = tokens.discovery();
    println!("\nPKCS#11 modules, in load order:");
    if discovery.candidates.is_empty() {
        println!("  none found");
        problems.push(
            "no PKCS#11 module: install your token's software or OpenSC (apt install opensc-pkcs11), \
             or name the module in the configuration under [[modules]]"
                .into(),
        );
    }
    let loaded = tokens.modules();
    for c in &discovery.candidates {
        let state = if loaded.iter().any(|m| m.module.path() == c.path) {
            "loaded".to_owned()
        } else {
            "NOT LOADED".to_owned()
        };
        println!("  {}  [{}]  from {}", c.path.display(), state, c.source);
    }
    for s in &discovery.skipped {
        println!("  skipped {}: {}", s.what, s.why);
    }
    for f in tokens.failures() {
        problems.push(format!(
            "module {} ({}) failed to load: {} — check the path, or remove it from the configuration",
            f.path.display(),
            f.source,
            f.error
        ));
    }

    println!("\nTokens:");
    let list = tokens.tokens();
    if list.is_empty() {
        println!("  none present");
    }
    for t in &list {
        let i = &t.info;
        println!(
            "  {} \"{}\" ({} {}, serial {}) via {}{}",
            i.id,
            i.label.trim(),
            i.manufacturer.trim(),
            i.model.trim(),
            i.serial.trim(),
            t.module.path().display(),
            t.reader
                .as_ref()
                .map(|r| format!(", reader {r}"))
                .unwrap_or_default()
        );
        if i.pin.locked {
            problems.push(format!(
                "token \"{}\" has its PIN locked: unblock it with the token's PUK or its vendor tool",
                i.label.trim()
            ));
        } else if i.pin.final_try {
            problems.push(format!(
                "token \"{}\": one more wrong PIN locks it",
                i.label.trim()
            ));
        }
    }
    let certs = tokens.certificates();
    println!("\nCertificates with their key on a token: {}", certs.len());
    for c in &certs {
        println!("  {}  {}", c.info.subject, c.info.key_algorithm.wire_name());
    }

    println!("\nProblems:");
    if problems.is_empty() {
        println!("  none");
        Ok(ExitCode::SUCCESS)
    } else {
        for p in &problems {
            println!("  - {p}");
        }
        Ok(ExitCode::from(1))
    }
}
