//! `keyport doctor`: what was found, where it came from, and what to fix. Exit 0 when nothing
//! needs fixing, 1 otherwise.

use std::process::ExitCode;

use crate::config::{Config, Paths};
use crate::discovery::AtrTable;
use crate::pcsc_watch::{self, hex_spaced, ReaderSnapshot};
use crate::tokens::{TokenSet, TokenView};

pub fn run(config: &Config, paths: &Paths) -> anyhow::Result<ExitCode> {
    let mut problems: Vec<String> = Vec::new();
    println!("configuration: {}", paths.config_file.display());
    if !paths.config_file.exists() {
        println!("  (no file: defaults apply)");
    }
    println!(
        "module discovery: {}",
        if config.discover_modules {
            "on (configuration, p11-kit registrations, well-known paths, ATR table)"
        } else {
            "off (configuration and your own [[atr]] entries only)"
        }
    );

    // `full` (the user's entries + the shipped table) names the card; `atr` is what the agent
    // acts on (the shipped table only with discovery on).
    let (full, atr) = match (AtrTable::load(config), AtrTable::effective(config)) {
        (Ok(full), Ok(atr)) => (full, atr),
        (Err(e), _) | (_, Err(e)) => {
            problems.push(format!(
                "the ATR table did not load ({e}): fix the [[atr]] entry in the configuration"
            ));
            (AtrTable::default(), AtrTable::default())
        }
    };
    let tokens = TokenSet::load(config);
    let readers = match pcsc_watch::scan() {
        Ok(r) => Some(r),
        Err(e) => {
            problems.push(pcsc_problem(&e));
            println!("\nSmartcard readers (PC/SC): not available ({e})");
            None
        }
    };
    if let Some(readers) = &readers {
        // What the running agent does on insertion: load the module the ATR table names.
        pcsc_watch::apply_once(&tokens, &atr, readers);
    }
    let list = tokens.tokens();
    if let Some(readers) = &readers {
        print_readers(readers, &full, &atr, &tokens, &list, &mut problems);
    }

    print_modules(&tokens, &list, &mut problems);

    println!("\nTokens:");
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

    let audit_log = crate::daemon::audit_path(config, paths);
    println!("\nAudit log: {}", audit_log.display());
    problems.extend(crate::audit::write_problem(&audit_log));

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

fn pcsc_problem(e: &pcsc::Error) -> String {
    match e {
        pcsc::Error::NoService | pcsc::Error::ServiceStopped => {
            "pcscd is not running: smartcards and USB keys that use PC/SC will not be seen \
             (apt install pcscd; systemctl start pcscd.socket)"
                .into()
        }
        other => format!(
            "PC/SC failed ({other}): restart pcscd (systemctl restart pcscd) and check that this \
             user may use it (polkit rules of pcsc-lite)"
        ),
    }
}

/// Readers, their cards' ATRs, what the ATR table says, and which token shows each card.
fn print_readers(
    readers: &[ReaderSnapshot],
    full: &AtrTable,
    atr: &AtrTable,
    tokens: &TokenSet,
    list: &[TokenView],
    problems: &mut Vec<String>,
) {
    println!("\nSmartcard readers (PC/SC):");
    if readers.is_empty() {
        println!("  none");
    }
    let modules = tokens.modules();
    for r in readers {
        println!("  {}", r.name);
        let Some(card_atr) = &r.atr else {
            println!("    no card");
            continue;
        };
        println!("    card ATR {}", hex_spaced(card_atr));
        let shown: Vec<&TokenView> = list
            .iter()
            .filter(|t| t.reader.as_deref() == Some(r.name.as_str()))
            .collect();
        match full.module_for(card_atr) {
            Some(rule) => {
                let from = if full.is_users(rule) {
                    "your [[atr]] entry"
                } else if atr.module_for(card_atr).is_some() {
                    "the shipped ATR table"
                } else {
                    "the shipped ATR table (used only with discover_modules = true)"
                };
                let state = match modules.iter().find(|m| m.module.path() == rule.module) {
                    Some(m) => format!("loaded (from {})", m.source),
                    None if !rule.module.exists() => {
                        problems.push(format!(
                            "card \"{}\" in {} needs {}, which is not installed: install the \
                             card's middleware (for OpenSC: apt install opensc-pkcs11), or point an \
                             [[atr]] entry in the configuration at the right module",
                            rule.name,
                            r.name,
                            rule.module.display()
                        ));
                        "NOT INSTALLED".to_owned()
                    }
                    None => "NOT LOADED (see the module's error below)".to_owned(),
                };
                println!(
                    "    matched \"{}\" in {from} → module {} [{state}]",
                    rule.name,
                    rule.module.display()
                );
            }
            None => println!("    not in the ATR table: every loaded module was asked"),
        }
        if shown.is_empty() {
            println!("    no token shows this card");
            problems.push(format!(
                "the card in {} (ATR {}) shows no token: install the card's PKCS#11 module and \
                 name it under [[modules]], or add an [[atr]] entry that maps this ATR to it",
                r.name,
                hex_spaced(card_atr)
            ));
        }
        for t in shown {
            println!(
                "    token \"{}\" via {}",
                t.info.label.trim(),
                t.module.path().display()
            );
        }
    }
}

/// Modules in load order with their discovery source, their tokens, and what did not load.
fn print_modules(tokens: &TokenSet, list: &[TokenView], problems: &mut Vec<String>) {
    let discovery = tokens.discovery();
    let loaded = tokens.modules();
    let failures = tokens.failures();
    println!("\nPKCS#11 modules, in load order:");
    if loaded.is_empty() && failures.is_empty() {
        println!("  none found");
        problems.push(
            "no PKCS#11 module: install your token's software or OpenSC (apt install opensc-pkcs11), \
             or name the module in the configuration under [[modules]]"
                .into(),
        );
    }
    for m in &loaded {
        let n = list
            .iter()
            .filter(|t| t.module.path() == m.module.path())
            .count();
        let description = m
            .module
            .info()
            .map(|i| format!(" — {}", i.library_description.trim()))
            .unwrap_or_default();
        println!(
            "  {}  [loaded, {n} token{}]  from {}{description}",
            m.module.path().display(),
            if n == 1 { "" } else { "s" },
            m.source
        );
    }
    for f in &failures {
        println!(
            "  {}  [NOT LOADED]  from {}: {}",
            f.path.display(),
            f.source,
            f.error
        );
        problems.push(format!(
            "module {} ({}) failed to load: {} — check the path, install the module, or remove \
             it from where it was found",
            f.path.display(),
            f.source,
            f.error
        ));
    }
    for s in &discovery.skipped {
        println!("  skipped {}: {}", s.what, s.why);
    }
}
