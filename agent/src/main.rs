//! `keyport`: the local signing agent and its command line.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use agent::config::{Config, Paths};
use agent::daemon::{self, RunOptions};
use agent::dialog::{Language, Texts};
use agent::enroll::NewKeyType;
use agent::local::{self, GenerateKeyRequest, SignFileRequest};
use agent::origins::OriginStore;
use agent::tokens::TokenSet;
use browser_bridge::protocol::{DigestAlgorithm, EcdsaEncoding, SignFormat, SignatureAlgorithm};
use clap::{Parser, Subcommand, ValueEnum};
use pkcs11_shim::KeySpec;

#[derive(Debug, Parser)]
#[command(
    name = "keyport",
    version,
    about = "KeyPort: sign with your USB token or smartcard for web portals"
)]
struct Cli {
    /// The configuration file (default: the OS config dir, e.g. ~/.config/keyport/config.toml).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Use the demo token that `keyport demo` made, and its audit log (for tokens, certs,
    /// sign, audit, doctor).
    #[arg(long, global = true)]
    demo: bool,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the agent: the WebSocket server that portals talk to.
    Run {
        /// Also serve the demo portal on this port of 127.0.0.1.
        #[arg(long)]
        demo_port: Option<u16>,
    },
    /// Provisions a demo token (SoftHSM) once and runs the agent with the demo portal.
    Demo {
        /// The demo portal's port.
        #[arg(long, default_value_t = 47334)]
        port: u16,
    },
    /// Lists the tokens present.
    Tokens {
        #[arg(long)]
        json: bool,
    },
    /// Lists the certificates whose private key is on a token (or imports one: `certs import`).
    #[command(args_conflicts_with_subcommands = true)]
    Certs {
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        action: Option<CertsAction>,
    },
    /// Generates key pairs on a token (enrolment).
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Signs a file with a certificate's key (consent and PIN are asked through pinentry).
    ///
    /// The signature is written to --out only once it is made and its audit record is on disk;
    /// a failed run leaves no file.
    Sign {
        /// The certificate id, as `keyport certs` shows it (e.g. tok-…/03).
        #[arg(long = "cert", value_name = "ID")]
        cert: String,
        /// The file to sign.
        #[arg(long = "in", value_name = "FILE")]
        input: PathBuf,
        /// Where to write the signature (replaced if it exists).
        #[arg(long = "out", value_name = "FILE")]
        output: PathBuf,
        /// raw: the bare signature; cms: a detached CMS SignedData (CAdES-B), DER.
        #[arg(long, value_enum, default_value_t = FormatArg::Raw)]
        format: FormatArg,
        /// The digest (default: the one that suits the key's size).
        #[arg(long, value_enum)]
        hash: Option<HashArg>,
        /// ECDSA keys, raw format: DER (default) or IEEE P1363 r‖s.
        #[arg(long, value_enum)]
        ecdsa_encoding: Option<EncodingArg>,
        /// RSA keys: RSA-PSS instead of PKCS#1 v1.5.
        #[arg(long)]
        pss: bool,
    },
    /// Lists, allows, denies or revokes web origins (changes reach a running agent).
    Origins {
        #[command(subcommand)]
        action: OriginsAction,
    },
    /// Prints the audit log; with --verify, proves it whole.
    Audit {
        /// Check every line's HMAC chain with the audit key; exit 1 if anything is wrong.
        #[arg(long)]
        verify: bool,
    },
    /// Shows readers, cards, modules, tokens, the dialog program, and what to fix.
    Doctor,
    /// A module host: loads one vendor library and answers the agent's jobs on the socket that
    /// is its standard input (the agent starts it; see `module_isolation`).
    #[command(hide = true)]
    Host {
        /// The PKCS#11 module to load.
        #[arg(
            long,
            value_name = "PATH",
            conflicts_with = "skf",
            required_unless_present = "skf"
        )]
        pkcs11: Option<PathBuf>,
        /// The SKF library to load.
        #[arg(long, value_name = "PATH")]
        skf: Option<PathBuf>,
    },
    /// Writes the man pages and shell completions into DIR (used to build packages).
    #[command(hide = true)]
    GenerateAssets {
        /// The output folder: DIR/man/*.1 and DIR/completions/{keyport.bash,_keyport,keyport.fish}.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum KeysAction {
    /// Generates a key pair on the token and writes its certificate request (PKCS#10, signed by
    /// the new key) for your CA. Consent and PIN are asked through pinentry.
    Generate {
        /// The token id, as `keyport tokens` shows it.
        #[arg(long, value_name = "ID")]
        token: String,
        #[arg(long, value_enum, default_value_t = KeyAlgorithmArg::EcP256)]
        algorithm: KeyAlgorithmArg,
        /// The request's subject, e.g. "CN=Li Lei,O=Example Bank,C=CN".
        #[arg(long)]
        subject: String,
        /// The key's label on the token (default: the subject's CN).
        #[arg(long)]
        label: Option<String>,
        /// A key that asks for the PIN at every signature (CKA_ALWAYS_AUTHENTICATE).
        #[arg(long)]
        always_authenticate: bool,
        /// Where to write the request: PEM if the name ends in .pem, else DER.
        #[arg(long = "out", value_name = "FILE")]
        output: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum KeyAlgorithmArg {
    #[value(name = "EC-P256")]
    EcP256,
    #[value(name = "EC-P384")]
    EcP384,
    #[value(name = "RSA-2048")]
    Rsa2048,
    #[value(name = "RSA-3072")]
    Rsa3072,
    #[value(name = "Ed25519")]
    Ed25519,
    /// SM2, on SKF keys.
    #[value(name = "SM2")]
    Sm2,
}

#[derive(Debug, Subcommand)]
enum CertsAction {
    /// Stores a certificate (DER or PEM) beside its key on the token. Consent and PIN are asked
    /// through pinentry.
    Import {
        /// The token id, as `keyport tokens` shows it.
        #[arg(long, value_name = "ID")]
        token: String,
        /// The certificate file.
        #[arg(long = "in", value_name = "FILE")]
        input: PathBuf,
        /// Replace the certificate the key has now (a renewal for the same key); without it
        /// a renewal is stored beside the old certificate and both are listed.
        #[arg(long)]
        replace: bool,
    },
    /// Removes one certificate of a key that has another one (the old one after a renewal for
    /// the same key). The key and its other certificate stay. Consent and PIN are asked through
    /// pinentry.
    Remove {
        /// The token id, as `keyport tokens` shows it.
        #[arg(long, value_name = "ID")]
        token: String,
        /// The certificate id, as `keyport certs` shows it.
        #[arg(long, value_name = "ID")]
        certificate: String,
    },
}

#[derive(Debug, Subcommand)]
enum OriginsAction {
    /// Lists the origins you and the configuration allowed or denied, and where each came from.
    List,
    /// Always allow a web origin (no dialog asks again).
    Allow {
        /// scheme://host[:port], without a path: e.g. https://bank.example
        origin: String,
    },
    /// Always deny a web origin (its pages are refused without a dialog).
    Deny {
        /// scheme://host[:port], without a path: e.g. https://bank.example
        origin: String,
    },
    /// Forgets your decision about an origin (the dialog asks again next time).
    Revoke {
        /// scheme://host[:port], as `keyport origins list` shows it.
        origin: String,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum FormatArg {
    /// The bare signature.
    Raw,
    /// A detached CMS SignedData (CAdES-B), DER.
    Cms,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum HashArg {
    Sha256,
    Sha384,
    Sha512,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum EncodingArg {
    /// An ASN.1 SEQUENCE of r and s (what OpenSSL and X.509 use).
    Der,
    /// r‖s, each as long as the curve's order (WebCrypto's format).
    P1363,
}

/// `println!` that returns the write error (a closed pipe, as in `keyport certs | head`)
/// instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)?
    }};
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The daemon logs its warnings; a one-shot command reports its own failures in one line
    // each, so library warnings would only repeat them.
    let daemon = matches!(cli.command, Command::Run { .. } | Command::Demo { .. });
    init_logging(cli.log_format, if daemon { "warn" } else { "error" });
    match run(cli) {
        Ok(code) => code,
        // The reader went away: nothing is left to tell anyone.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keyport: {}", chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>()
        .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
}

fn chain(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = one_line(&cause.to_string());
        // Some errors already print their source: do not say it twice.
        if !parts.last().is_some_and(|prev| prev.ends_with(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ")
}

/// A message on one line: drops the source snippets some parsers draw under an error (TOML's
/// `13 | colour = "blue"` and `| ^^^`) and joins the rest with ": ".
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| {
            let gutter = l
                .split_once('|')
                .is_some_and(|(left, _)| left.trim().chars().all(|c| c.is_ascii_digit()));
            !l.is_empty() && !gutter
        })
        .collect::<Vec<_>>()
        .join(": ")
}

fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEYPORT_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("{default_level},cryptoki=off"))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// The configuration in force: the user's file (or the defaults), the demo's settings with
/// --demo, then the administrator's policy, which only narrows.
fn load(
    cli_config: Option<&std::path::Path>,
    demo: bool,
) -> anyhow::Result<(
    Config,
    Paths,
    agent::policy::Loaded,
    Vec<agent::policy::Setting>,
)> {
    let paths = Paths::resolve(cli_config)?;
    if cli_config.is_some() && !paths.config_file.exists() {
        anyhow::bail!(
            "{}: no such configuration file (without --config the defaults apply)",
            paths.config_file.display()
        );
    }
    let mut config = Config::load(&paths.config_file)?;
    if demo {
        agent::demo::apply(&mut config, &paths)?;
    }
    let policy = agent::policy::Loaded::system()?;
    let (config, report) = policy.apply(config);
    Ok((config, paths, policy, report))
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Command::GenerateAssets { out } = &cli.command {
        generate_assets(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Command::Host { pkcs11, skf } = &cli.command {
        // No configuration: the host does what the agent's jobs say. It exits at once when
        // done, leaving behind a library thread that may hang in the library.
        std::process::exit(run_host(pkcs11.as_deref(), skf.as_deref()));
    }
    let (config, paths, policy, policy_report) = load(cli.config.as_deref(), cli.demo)?;
    match cli.command {
        Command::Run { demo_port } => {
            let rt = daemon::runtime()?;
            let served = rt.block_on(daemon::run(config, paths, RunOptions { demo_port }));
            // Dropping the runtime would wait without end for blocking work (a module stuck in
            // C_Sign): the connections have had their grace to answer, so exit regardless.
            rt.shutdown_timeout(std::time::Duration::from_secs(3));
            served?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { port } => agent::demo::run(config, paths, port, &policy),
        Command::Tokens { json } => {
            let tokens = TokenSet::load(&config);
            tokens.report_failures();
            if json {
                out!(
                    "{}",
                    serde_json::to_string_pretty(&local::tokens_json(&tokens))?
                );
            } else {
                let list = tokens.tokens();
                if list.is_empty() {
                    out!("no token found (see `keyport doctor`)");
                }
                for t in list {
                    let i = &t.info;
                    out!(
                        "{}  {:<32} {} {} serial {}{}{}",
                        i.id,
                        i.label.trim(),
                        i.manufacturer.trim(),
                        i.model.trim(),
                        i.serial.trim(),
                        t.reader.map(|r| format!(" in {r}")).unwrap_or_default(),
                        if i.pin.locked { "  PIN LOCKED" } else { "" },
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Certs {
            action:
                Some(CertsAction::Import {
                    token,
                    input,
                    replace,
                }),
            ..
        } => {
            let mut audit = daemon::open_audit(&config, &paths)?;
            let tokens = TokenSet::load(&config);
            tokens.report_failures();
            let pinentry = local_pinentry(&config)?;
            let texts = Texts::new(Language::from_config(config.language.as_deref()));
            let imported = local::import_certificate(
                &tokens, &pinentry, texts, &mut audit, &token, &input, replace,
            )?;
            out!(
                "stored {} on the token: certificate {}",
                imported.subject,
                imported.certificate_id
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Certs {
            action: Some(CertsAction::Remove { token, certificate }),
            ..
        } => {
            let mut audit = daemon::open_audit(&config, &paths)?;
            let tokens = TokenSet::load(&config);
            tokens.report_failures();
            let pinentry = local_pinentry(&config)?;
            let texts = Texts::new(Language::from_config(config.language.as_deref()));
            let removed = local::remove_certificate(
                &tokens,
                &pinentry,
                texts,
                &mut audit,
                &token,
                &certificate,
            )?;
            out!(
                "removed certificate {} ({}) from the token; the key's certificate is {}",
                removed.certificate_id,
                removed.subject,
                removed.kept_id
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys {
            action:
                KeysAction::Generate {
                    token,
                    algorithm,
                    subject,
                    label,
                    always_authenticate,
                    output,
                },
        } => {
            let mut audit = daemon::open_audit(&config, &paths)?;
            let tokens = TokenSet::load(&config);
            tokens.report_failures();
            let pinentry = local_pinentry(&config)?;
            let texts = Texts::new(Language::from_config(config.language.as_deref()));
            let key_type = match algorithm {
                KeyAlgorithmArg::EcP256 => NewKeyType::Pkcs11(KeySpec::EcP256),
                KeyAlgorithmArg::EcP384 => NewKeyType::Pkcs11(KeySpec::EcP384),
                KeyAlgorithmArg::Rsa2048 => NewKeyType::Pkcs11(KeySpec::Rsa { bits: 2048 }),
                KeyAlgorithmArg::Rsa3072 => NewKeyType::Pkcs11(KeySpec::Rsa { bits: 3072 }),
                KeyAlgorithmArg::Ed25519 => NewKeyType::Pkcs11(KeySpec::Ed25519),
                KeyAlgorithmArg::Sm2 => NewKeyType::Sm2,
            };
            let req = GenerateKeyRequest {
                token: &token,
                key_type,
                label: label.as_deref(),
                subject: &subject,
                always_authenticate,
                output: &output,
            };
            let key = local::generate_key(&tokens, &pinentry, texts, &mut audit, &req)?;
            out!(
                "generated a {} key on the token: {}\nwrote its certificate request to {} ({}); \
                 import the issued certificate with `keyport certs import --token {token} --in FILE`",
                key_type.wire_name(),
                key.key_id,
                output.display(),
                if key.pem { "PEM" } else { "DER" }
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Certs { json, .. } => {
            let tokens = TokenSet::load(&config);
            tokens.report_failures();
            if json {
                out!(
                    "{}",
                    serde_json::to_string_pretty(&local::certificates_json(&tokens))?
                );
            } else {
                for c in tokens.certificates() {
                    let i = &c.info;
                    let usage: Vec<&str> = i.key_usage.iter().map(|k| k.rfc5280_name()).collect();
                    out!(
                        "{}\n  {}  {}  [{}]  issued by {}  until {}",
                        i.id,
                        i.subject,
                        i.key_algorithm.wire_name(),
                        usage.join(", "),
                        i.issuer,
                        i.not_after.date()
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Sign {
            cert,
            input,
            output,
            format,
            hash,
            ecdsa_encoding,
            pss,
        } => {
            // The log opens first: without it no signature may be released.
            let mut audit = daemon::open_audit(&config, &paths)?;
            let tokens = TokenSet::load(&config);
            tokens.report_failures();
            let pinentry = local_pinentry(&config)?;
            let texts = Texts::new(Language::from_config(config.language.as_deref()));
            let req = SignFileRequest {
                certificate: &cert,
                input: &input,
                output: &output,
                format: match format {
                    FormatArg::Raw => SignFormat::Raw,
                    FormatArg::Cms => SignFormat::Cms,
                },
                hash: hash.map(|h| match h {
                    HashArg::Sha256 => DigestAlgorithm::Sha256,
                    HashArg::Sha384 => DigestAlgorithm::Sha384,
                    HashArg::Sha512 => DigestAlgorithm::Sha512,
                }),
                ecdsa_encoding: ecdsa_encoding.map(|e| match e {
                    EncodingArg::Der => EcdsaEncoding::Der,
                    EncodingArg::P1363 => EcdsaEncoding::P1363,
                }),
                signature_algorithm: pss.then_some(SignatureAlgorithm::RsaPss),
            };
            let signed = local::sign_file(&config, &tokens, &pinentry, texts, &mut audit, &req)?;
            out!(
                "signed {} with {}: wrote {} ({} bytes, {})",
                input.display(),
                signed.holder,
                output.display(),
                signed.bytes,
                match format {
                    FormatArg::Raw => "raw signature",
                    FormatArg::Cms => "detached CMS SignedData",
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Origins { action } => {
            let mut store = OriginStore::open(&paths.origins_file(), &config)?;
            match action {
                OriginsAction::List => {
                    let list = store.list();
                    if list.is_empty() {
                        out!(
                            "no origin is allowed or denied yet: the dialog asks about each new \
                             one (`keyport origins allow URL` allows one ahead)"
                        );
                    }
                    for (origin, standing, source) in list {
                        out!("{origin}\t{standing:?}\t({source})");
                    }
                }
                OriginsAction::Allow { origin } => {
                    check_origin(&origin)?;
                    if !store.may_approve(&origin) {
                        anyhow::bail!(
                            "the administrator's policy ({}) allows only its own origins: \
                             {origin} cannot be allowed",
                            policy
                                .file
                                .as_ref()
                                .map_or_else(String::new, |f| f.display().to_string())
                        );
                    }
                    store.allow(&origin)?;
                    out!("allowed {origin}");
                }
                OriginsAction::Deny { origin } => {
                    check_origin(&origin)?;
                    store.deny(&origin)?;
                    out!("denied {origin}");
                }
                OriginsAction::Revoke { origin } => {
                    if store.revoke(&origin)? {
                        out!("revoked {origin}");
                    } else {
                        out!("{origin} had no decision of yours to revoke");
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit { verify } => agent::audit_cli::run(&config, &paths, verify),
        Command::Doctor => agent::doctor::run(
            &config,
            &paths,
            cli.demo,
            &agent::doctor::PolicyView {
                file: policy.file.as_deref(),
                settings: &policy_report,
            },
        ),
        Command::GenerateAssets { out } => generate_assets(&out).map(|()| ExitCode::SUCCESS),
        Command::Host { pkcs11, skf } => Ok(ExitCode::from(
            u8::try_from(run_host(pkcs11.as_deref(), skf.as_deref())).unwrap_or(1),
        )),
    }
}

/// `keyport host --pkcs11 PATH` or `--skf PATH`: the exit status.
fn run_host(pkcs11: Option<&std::path::Path>, skf: Option<&std::path::Path>) -> i32 {
    match (pkcs11, skf) {
        (Some(path), None) => agent::host::pkcs11::run_host(path),
        (None, Some(path)) => agent::host::skf::run_host(path),
        // clap refuses both and neither; say so anyway rather than guess.
        _ => 2,
    }
}

/// The dialog program for a command run in a terminal. A terminal pinentry (tty, curses)
/// must be told which terminal to use, as GnuPG tells it with GPG_TTY; without one it fails or
/// cancels at once.
fn local_pinentry(config: &Config) -> anyhow::Result<agent::pinentry::Pinentry> {
    let mut pinentry = daemon::pinentry_for(config)?;
    if std::env::var_os("GPG_TTY").is_none() {
        if let Some(tty) = local::terminal_name() {
            pinentry = pinentry.tty_name(tty);
        }
    }
    Ok(pinentry)
}

/// The man pages (one per command, from the same definitions as `--help`) and the shell
/// completions, for a package to install.
fn generate_assets(out: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use clap::CommandFactory as _;
    let man = out.join("man");
    let completions = out.join("completions");
    for dir in [&man, &completions] {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    clap_mangen::generate_to(Cli::command(), &man)
        .with_context(|| format!("writing man pages to {}", man.display()))?;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut Cli::command(), "keyport", &completions)
            .with_context(|| format!("writing {shell} completions"))?;
    }
    Ok(())
}

fn check_origin(origin: &str) -> anyhow::Result<()> {
    // A URL pasted from the address bar is the usual mistake: say what to type instead.
    if let Some((scheme, rest)) = origin.split_once("://") {
        if let Some(cut) = rest.find(['/', '?', '#']) {
            anyhow::bail!(
                "{origin:?} is not an origin: an origin is scheme://host[:port] with no path, \
                 query or fragment; use {scheme}://{}",
                &rest[..cut]
            );
        }
    }
    browser_bridge::Origin::parse(origin, true)
        .map(|_| ())
        .map_err(|e| anyhow::anyhow!("{origin:?} is not an origin: {e}"))
}
