//! `keyport doctor`: what was found, where it came from, and what to fix. Exit 0 when nothing
//! needs fixing, 1 otherwise.

use std::process::ExitCode;

use crate::backend::BackendKind;
use crate::config::{Config, Paths};
use crate::discovery::AtrTable;
use crate::pcsc_watch::{self, hex_spaced, ReaderSnapshot};
use crate::tokens::{TokenSet, TokenView};

/// `println!` that returns the write error (a closed pipe, as in `keyport doctor | head -1`)
/// instead of panicking; `main` ends quietly on a broken pipe.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)?
    }};
}

/// The administrator's policy as `doctor` shows it.
#[derive(Debug)]
pub struct PolicyView<'a> {
    pub file: Option<&'a std::path::Path>,
    pub settings: &'a [crate::policy::Setting],
}

pub fn run(
    config: &Config,
    paths: &Paths,
    demo: bool,
    policy: &PolicyView<'_>,
) -> anyhow::Result<ExitCode> {
    let mut problems: Vec<String> = Vec::new();
    say!("configuration: {}", paths.config_file.display());
    if !paths.config_file.exists() {
        say!("  (no file: defaults apply)");
    }
    match policy.file {
        Some(file) => say!(
            "policy: {} (the administrator's; it bounds yours)",
            file.display()
        ),
        None => say!(
            "policy: none ({} does not exist)",
            crate::policy::POLICY_PATH
        ),
    }
    say!("effective settings:");
    for s in policy.settings {
        say!("  {} = {}  ({})", s.key, s.value, s.source);
    }
    say!(
        "data folder: {} (audit log: {})",
        paths.data_dir.display(),
        crate::daemon::audit_path(config, paths).display()
    );
    let demo_token = crate::demo::token_dir(paths);
    if demo {
        say!(
            "demo token: {} (--demo: its module, token and audit log are used)",
            demo_token.display()
        );
    } else if demo_token.join("softhsm2.conf").exists() {
        say!(
            "demo token: {} (made by `keyport demo`; `keyport --demo tokens|certs|audit|doctor` \
             use it and its audit log)",
            demo_token.display()
        );
    }
    print_dialogs(config, &mut problems)?;
    say!(
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
            say!("\nSmartcard readers (PC/SC): not available ({e})");
            None
        }
    };
    if let Some(readers) = &readers {
        // What the running agent does on insertion: load the module the ATR table names.
        pcsc_watch::apply_once(&tokens, &atr, readers);
    }
    let list = tokens.tokens();
    if let Some(readers) = &readers {
        print_readers(readers, &full, &atr, &tokens, &list, &mut problems)?;
    }

    print_modules(&tokens, &list, &mut problems)?;
    print_daemon_hosts(paths)?;

    say!("\nTokens:");
    if list.is_empty() {
        say!("  none present");
    }
    for t in &list {
        let i = &t.info;
        say!(
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
    say!("\nCertificates with their key on a token: {}", certs.len());
    for c in &certs {
        say!("  {}  {}", c.info.subject, c.info.key_algorithm.wire_name());
    }

    let audit_log = crate::daemon::audit_path(config, paths);
    say!(
        "
Audit log: {}",
        audit_log.display()
    );
    problems.extend(crate::audit::write_problem(&audit_log));

    say!(
        "
Problems:"
    );
    if problems.is_empty() {
        say!("  none");
        Ok(ExitCode::SUCCESS)
    } else {
        for p in &problems {
            say!("  - {p}");
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
) -> anyhow::Result<()> {
    say!("\nSmartcard readers (PC/SC):");
    if readers.is_empty() {
        say!("  none");
    }
    let modules = tokens.modules();
    for r in readers {
        say!("  {}", r.name);
        let Some(card_atr) = &r.atr else {
            say!("    no card");
            continue;
        };
        say!("    card ATR {}", hex_spaced(card_atr));
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
                say!(
                    "    matched \"{}\" in {from} → module {} [{state}]",
                    rule.name,
                    rule.module.display()
                );
            }
            None => say!("    not in the ATR table: every loaded module was asked"),
        }
        if shown.is_empty() {
            say!("    no token shows this card");
            problems.push(format!(
                "the card in {} (ATR {}) shows no token: install the card's PKCS#11 module and \
                 name it under [[modules]], or add an [[atr]] entry that maps this ATR to it",
                r.name,
                hex_spaced(card_atr)
            ));
        }
        for t in shown {
            say!(
                "    token \"{}\" via {}",
                t.info.label.trim(),
                t.module.path().display()
            );
        }
    }
    Ok(())
}

/// Modules in load order with their discovery source, their tokens, and what did not load.
fn print_modules(
    tokens: &TokenSet,
    list: &[TokenView],
    problems: &mut Vec<String>,
) -> anyhow::Result<()> {
    let discovery = tokens.discovery();
    let (loaded, skf_loaded): (Vec<_>, Vec<_>) = tokens
        .modules()
        .into_iter()
        .partition(|m| m.module.kind() == BackendKind::Pkcs11);
    let (failures, skf_failures): (Vec<_>, Vec<_>) = tokens
        .failures()
        .into_iter()
        .partition(|f| f.kind == BackendKind::Pkcs11);
    say!("\nPKCS#11 modules, in load order:");
    if loaded.is_empty() && failures.is_empty() {
        say!("  none found");
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
            .description()
            .map(|d| format!(" — {d}"))
            .unwrap_or_default();
        say!(
            "  {}  [loaded, {n} token{}]  from {}{description}",
            m.module.path().display(),
            if n == 1 { "" } else { "s" },
            m.source
        );
    }
    for f in &failures {
        say!(
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
        say!("  skipped {}: {}", s.what, s.why);
    }

    say!("\nSKF libraries (Chinese USB keys, GM/T 0016), in load order:");
    if skf_loaded.is_empty() && skf_failures.is_empty() {
        say!("  none found");
    }
    for m in &skf_loaded {
        let on_it: Vec<&TokenView> = list
            .iter()
            .filter(|t| t.module.path() == m.module.path())
            .collect();
        let description = m
            .module
            .description()
            .map(|d| format!(" — {d}"))
            .unwrap_or_default();
        say!(
            "  {}  [loaded, {} key{}]  from {}{description}",
            m.module.path().display(),
            on_it.len(),
            if on_it.len() == 1 { "" } else { "s" },
            m.source
        );
        // Each key's containers with a signing certificate, as the agent lists them.
        let certs = m.module.certificates(None).unwrap_or_default();
        for t in on_it {
            say!(
                "    key {} \"{}\" (device {})",
                t.info.serial.trim(),
                t.info.label.trim(),
                t.info.slot_description
            );
            for c in certs.iter().filter(|c| c.token_id == t.info.id) {
                say!(
                    "      container {}: {} ({})",
                    c.label,
                    c.holder,
                    c.key_algorithm.wire_name()
                );
            }
        }
    }
    for f in &skf_failures {
        say!(
            "  {}  [NOT LOADED]  from {}: {}",
            f.path.display(),
            f.source,
            f.error
        );
        problems.push(format!(
            "SKF library {} ({}) failed to load: {} — check the path, install the vendor's \
             software, or remove it from [[skf_modules]]",
            f.path.display(),
            f.source,
            f.error
        ));
    }
    for c in &discovery.skf_not_found {
        say!(
            "  looked for {} ({}): not installed",
            c.path.display(),
            c.source
        );
    }
    print_hosts(tokens, &tokens.modules())
}

/// One row per module host (`module_isolation`): module, pid, restarts, last failure.
fn print_hosts(tokens: &TokenSet, loaded: &[crate::tokens::LoadedModule]) -> anyhow::Result<()> {
    let rows: Vec<_> = loaded
        .iter()
        .filter_map(|m| {
            let path = m.module.path();
            tokens.host_status(path).map(|s| (path, s))
        })
        .collect();
    if rows.is_empty() {
        if !loaded.is_empty() {
            say!("\nModule hosts: none (module_isolation = false: modules run inside the agent)");
        }
        return Ok(());
    }
    say!("\nModule hosts (this command's own; module, pid, restarts, last failure):");
    for (path, status) in rows {
        say!(
            "  {}  pid {}  restarts {}  last failure: {}",
            path.display(),
            status
                .pid
                .map_or_else(|| "none".to_owned(), |p| p.to_string()),
            status.restarts,
            status.last_failure.as_deref().unwrap_or("none")
        );
    }
    Ok(())
}

/// The running daemon's library hosts, from the status file it keeps
/// ([`crate::host::status`]): library, pid, restarts, last failure, and how old that is.
fn print_daemon_hosts(paths: &Paths) -> anyhow::Result<()> {
    use crate::host::status;
    let path = status::status_path(paths);
    let report = match status::read(&path) {
        Ok(Some(r)) => r,
        Ok(None) => {
            say!(
                "\nThe running daemon's hosts: no daemon with this configuration is running \
                 ({} does not exist)",
                path.display()
            );
            return Ok(());
        }
        Err(e) => {
            say!(
                "\nThe running daemon's hosts: {} is unreadable: {e}",
                path.display()
            );
            return Ok(());
        }
    };
    let alive = alive(report.agent_pid);
    say!(
        "\nThe running daemon's hosts (daemon pid {}{}; as of {} s ago, from {}):",
        report.agent_pid,
        if alive {
            ""
        } else {
            ", NOT RUNNING: this is what it last wrote"
        },
        status::age(&report).as_secs(),
        path.display()
    );
    for h in &report.hosts {
        say!(
            "  {} {}  pid {}  restarts {}  last failure: {}",
            h.kind,
            h.library.display(),
            h.pid.map_or_else(|| "none".to_owned(), |p| p.to_string()),
            h.restarts,
            h.last_failure.as_deref().unwrap_or("none")
        );
    }
    Ok(())
}

/// True while process `pid` exists (signal 0).
fn alive(pid: u32) -> bool {
    i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .is_some_and(|p| rustix::process::test_kill_process(p).is_ok())
}

/// The dialog program every consent and PIN goes through, and what it needs to show: a display
/// for a graphical one, a terminal for a text one.
fn print_dialogs(config: &Config, problems: &mut Vec<String>) -> anyhow::Result<()> {
    say!("\nDialogs (pinentry):");
    let program = match crate::daemon::pinentry_for(config) {
        Ok(p) => p.program().to_path_buf(),
        Err(e) => {
            say!("  no pinentry program found");
            problems.push(format!("{e:#}"));
            return Ok(());
        }
    };
    let from = if config.pinentry.is_some() {
        "the configuration's `pinentry`"
    } else {
        "PATH"
    };
    let real = std::fs::canonicalize(&program).unwrap_or_else(|_| program.clone());
    let runs = std::process::Command::new(&program)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .output();
    let version = match &runs {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned(),
        Ok(out) => format!("`--version` failed ({})", out.status),
        Err(e) => format!("cannot run: {e}"),
    };
    say!(
        "  {} (from {from}{}): {version}",
        program.display(),
        if real != program {
            format!(", which is {}", real.display())
        } else {
            String::new()
        }
    );
    if let Err(e) = &runs {
        problems.push(format!(
            "the pinentry {} cannot run ({e}): install one (apt install pinentry-gnome3, or \
             pinentry-curses for a terminal) or fix `pinentry` in the configuration",
            program.display()
        ));
        return Ok(());
    }
    let name = real
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let display = ["WAYLAND_DISPLAY", "DISPLAY"].iter().find_map(|v| {
        std::env::var(v)
            .ok()
            .filter(|x| !x.is_empty())
            .map(|x| format!("{v}={x}"))
    });
    let tty = std::env::var("GPG_TTY")
        .ok()
        .filter(|t| !t.is_empty())
        .map(|t| format!("GPG_TTY={t}"))
        .or_else(|| crate::local::terminal_name().map(|t| format!("this terminal, {t}")));
    say!(
        "  display: {}; terminal: {}",
        display
            .as_deref()
            .unwrap_or("none (no DISPLAY or WAYLAND_DISPLAY)"),
        tty.as_deref()
            .unwrap_or("none (no GPG_TTY, not run in a terminal)")
    );
    match pinentry_kind(&name) {
        Kind::Terminal if tty.is_none() => problems.push(format!(
            "{name} draws its dialog in a terminal, but none is known: in a terminal session set \
             GPG_TTY=$(tty); for the desktop service install a graphical pinentry \
             (apt install pinentry-gnome3) and set `pinentry` to it"
        )),
        Kind::Graphical if display.is_none() => problems.push(format!(
            "{name} needs a graphical session (DISPLAY or WAYLAND_DISPLAY), and none is set: \
             dialogs will fail; in a terminal use pinentry-curses (`pinentry = \
             \"/usr/bin/pinentry-curses\"`)"
        )),
        Kind::Either if display.is_none() && tty.is_none() => problems.push(format!(
            "{name} has neither a display nor a terminal to show its dialog on"
        )),
        Kind::Graphical | Kind::Terminal | Kind::Either | Kind::Unknown => {}
    }
    Ok(())
}

/// Where a pinentry draws its dialog, from its program name.
enum Kind {
    Graphical,
    Terminal,
    /// `pinentry-gnome3`, `-gtk2`: a window, else curses in a terminal.
    Either,
    /// A program of another name (a wrapper, a vendor's): nothing is assumed.
    Unknown,
}

fn pinentry_kind(name: &str) -> Kind {
    match name {
        "pinentry-curses" | "pinentry-tty" => Kind::Terminal,
        "pinentry-qt" | "pinentry-qt5" | "pinentry-fltk" | "pinentry-x2go" | "pinentry-mac" => {
            Kind::Graphical
        }
        "pinentry-gnome3" | "pinentry-gtk2" | "pinentry-gtk-2" => Kind::Either,
        _ => Kind::Unknown,
    }
}
