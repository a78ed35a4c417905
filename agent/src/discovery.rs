//! Finding PKCS#11 modules the way a user's machine has them: the configuration first, then the
//! system's own registry (p11-kit's `.module` files on Linux), then the well-known install paths
//! of OpenSC and common vendor clients; and an ATR table that names the module for a card in a
//! reader. Every step is recorded, so `keyport doctor` can say why each module was chosen.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::{AtrEntry, Config};

/// Where a candidate module came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `[[modules]]` in the configuration.
    Config,
    /// A p11-kit registration file.
    P11Kit { file: PathBuf },
    /// A path where a known product installs its module.
    WellKnown { product: &'static str },
    /// The ATR table matched a card in a reader.
    Atr { card: String, reader: String },
    /// `[[skf_modules]]` in the configuration.
    SkfConfig,
    /// KeyPort's table of vendor SKF libraries (`agent/data/skf.toml`).
    SkfTable { vendor: String, product: String },
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Config => f.write_str("configuration"),
            Source::P11Kit { file } => write!(f, "p11-kit registration {}", file.display()),
            Source::WellKnown { product } => write!(f, "well-known path of {product}"),
            Source::Atr { card, reader } => write!(f, "ATR table: {card} in {reader}"),
            Source::SkfConfig => f.write_str("configuration [[skf_modules]]"),
            Source::SkfTable { vendor, product } => {
                write!(f, "SKF library table: {vendor} {product}")
            }
        }
    }
}

/// A module to load, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub path: PathBuf,
    pub source: Source,
}

/// A step of discovery that found nothing usable, for `keyport doctor`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub what: String,
    pub why: String,
}

/// The outcome of discovery: modules in load order, and what was passed over.
#[derive(Debug, Clone, Default)]
pub struct Discovery {
    /// PKCS#11 modules.
    pub candidates: Vec<Candidate>,
    /// SKF libraries: the configuration's, then the shipped table's that are installed.
    pub skf_candidates: Vec<Candidate>,
    /// Table entries looked for and not found (for `keyport doctor`).
    pub skf_not_found: Vec<Candidate>,
    pub skipped: Vec<Skipped>,
}

/// The shipped table of vendor SKF libraries.
const SKF_TABLE: &str = include_str!("../data/skf.toml");

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SkfTable {
    skf_library: Vec<SkfTableEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // `source` is documentation: where the entry was seen.
struct SkfTableEntry {
    vendor: String,
    product: String,
    os: String,
    path: PathBuf,
    source: String,
}

/// Where the loader finds a bare library name, for telling whether it is installed.
const LIBRARY_DIRS: &[&str] = &[
    "/usr/local/lib",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/lib",
];

/// SKF libraries to load: `[[skf_modules]]` first, then (with discovery on) the shipped table's
/// entries for this OS that are installed: an absolute path that exists, or a bare file name
/// found on `LD_LIBRARY_PATH` or in the usual library folders. Returns (to load, looked for and
/// not found).
fn discover_skf(config: &Config, table: &str) -> (Vec<Candidate>, Vec<Candidate>) {
    let mut found: Vec<Candidate> = config
        .skf_modules
        .iter()
        .map(|m| Candidate {
            path: m.path.clone(),
            source: Source::SkfConfig,
        })
        .collect();
    let mut missing = Vec::new();
    if !config.discover_modules || config.skf_libraries_fixed {
        return (found, missing);
    }
    let entries = match toml::from_str::<SkfTable>(table) {
        Ok(t) => t.skf_library,
        Err(e) => {
            tracing::error!(error = %e, "the shipped SKF library table does not parse");
            Vec::new()
        }
    };
    let search: Vec<PathBuf> = std::env::var_os("LD_LIBRARY_PATH")
        .map(|v| std::env::split_paths(&v).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(LIBRARY_DIRS.iter().map(PathBuf::from))
        .collect();
    for e in entries.into_iter().filter(|e| e.os == std::env::consts::OS) {
        let source = Source::SkfTable {
            vendor: e.vendor,
            product: e.product,
        };
        let installed = if e.path.is_absolute() {
            e.path.exists().then(|| e.path.clone())
        } else {
            search.iter().map(|d| d.join(&e.path)).find(|p| p.exists())
        };
        match installed {
            Some(path) if !found.iter().any(|c| c.path == path) => {
                found.push(Candidate { path, source });
            }
            Some(_) => {}
            None => missing.push(Candidate {
                path: e.path,
                source,
            }),
        }
    }
    (found, missing)
}

/// Folders where p11-kit looks for `.module` files: the system's, then the user's.
pub fn p11kit_module_dirs() -> Vec<PathBuf> {
    let mut dirs = vec![
        PathBuf::from("/usr/share/p11-kit/modules"),
        PathBuf::from("/etc/pkcs11/modules"),
    ];
    let user_config = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")));
    if let Some(base) = user_config {
        dirs.push(base.join("pkcs11").join("modules"));
    }
    dirs
}

/// Where p11-kit resolves a module named without a folder.
const P11KIT_DEFAULT_MODULE_DIRS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/pkcs11",
    "/usr/lib/aarch64-linux-gnu/pkcs11",
    "/usr/lib64/pkcs11",
    "/usr/lib/pkcs11",
];

/// Install paths of modules users commonly have, per OS.
const WELL_KNOWN: &[(&str, &str)] = &[
    ("OpenSC", "/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so"),
    (
        "OpenSC",
        "/usr/lib/x86_64-linux-gnu/pkcs11/opensc-pkcs11.so",
    ),
    ("OpenSC", "/usr/lib64/opensc-pkcs11.so"),
    ("OpenSC", "/usr/lib/opensc-pkcs11.so"),
    ("OpenSC", "/Library/OpenSC/lib/opensc-pkcs11.so"),
    ("OpenSC", "C:\\Windows\\System32\\opensc-pkcs11.dll"),
    ("SoftHSM", "/usr/lib/softhsm/libsofthsm2.so"),
    (
        "SoftHSM",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    ),
    ("SoftHSM", "/usr/local/lib/softhsm/libsofthsm2.so"),
    (
        "YubiKey PIV (ykcs11)",
        "/usr/lib/x86_64-linux-gnu/libykcs11.so.2",
    ),
    ("YubiKey PIV (ykcs11)", "/usr/local/lib/libykcs11.dylib"),
    ("SafeNet Authentication Client", "/usr/lib/libeToken.so"),
    (
        "SafeNet Authentication Client",
        "C:\\Windows\\System32\\eTPKCS11.dll",
    ),
    ("Gemalto IDPrime", "/usr/lib/libIDPrimePKCS11.so"),
    ("Feitian ePass", "/usr/lib/libshuttle_p11v220.so"),
    ("Watchdata", "/usr/lib/libWDPKCS.so"),
];

/// Runs the configuration, p11-kit and well-known steps (the ATR step needs readers: see
/// [`AtrTable::module_for`]).
pub fn discover(config: &Config) -> Discovery {
    let mut d = discover_in(config, &p11kit_module_dirs(), WELL_KNOWN);
    (d.skf_candidates, d.skf_not_found) = discover_skf(config, SKF_TABLE);
    d
}

fn discover_in(
    config: &Config,
    p11kit_dirs: &[PathBuf],
    well_known: &[(&'static str, &str)],
) -> Discovery {
    let mut out = Discovery::default();
    let mut seen = HashSet::new();
    let mut push = |out: &mut Discovery, path: PathBuf, source: Source| {
        let key = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
        if seen.insert(key) {
            out.candidates.push(Candidate { path, source });
        }
    };
    for m in &config.modules {
        push(&mut out, m.path.clone(), Source::Config);
    }
    if !config.discover_modules {
        return out;
    }
    for dir in p11kit_dirs {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(_) => continue,
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "module"))
            .collect();
        files.sort();
        for file in files {
            match read_p11kit_module(&file) {
                Ok(Some(path)) => push(&mut out, path, Source::P11Kit { file }),
                Ok(None) => {}
                Err(why) => out.skipped.push(Skipped {
                    what: file.display().to_string(),
                    why,
                }),
            }
        }
    }
    for (product, path) in well_known {
        let path = PathBuf::from(path);
        if path.exists() {
            push(&mut out, path, Source::WellKnown { product });
        }
    }
    out
}

/// Reads one p11-kit `.module` file. `Ok(None)`: a module not meant for signing agents (a trust
/// store, or one enabled only in named programs).
fn read_p11kit_module(file: &Path) -> Result<Option<PathBuf>, String> {
    let text = std::fs::read_to_string(file).map_err(|e| e.to_string())?;
    let mut module = None;
    let mut skip = None;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key.trim() {
            "module" => module = Some(value.to_owned()),
            "trust-policy" if value == "yes" => skip = Some("a trust-policy module"),
            "enable-in" if !value.split(',').any(|p| p.trim() == "keyport") => {
                skip = Some("enabled only in other programs")
            }
            "disable-in" if value.split(',').any(|p| p.trim() == "keyport") => {
                skip = Some("disabled for keyport")
            }
            _ => {}
        }
    }
    if skip.is_some() {
        return Ok(None);
    }
    let name = module.ok_or_else(|| "no `module:` line".to_owned())?;
    let path = PathBuf::from(&name);
    if path.is_absolute() {
        return Ok(Some(path));
    }
    Ok(Some(
        P11KIT_DEFAULT_MODULE_DIRS
            .iter()
            .map(|d| Path::new(d).join(&name))
            .find(|p| p.exists())
            .unwrap_or_else(|| Path::new(P11KIT_DEFAULT_MODULE_DIRS[0]).join(&name)),
    ))
}

/// ATR pattern → card name and module. The shipped table is `agent/data/atr.toml`; the user's
/// `[[atr]]` entries come first, so they can override it.
#[derive(Debug, Clone, Default)]
pub struct AtrTable {
    entries: Vec<AtrRule>,
    /// How many of `entries`, from the start, are the user's.
    users: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AtrRule {
    pub atr: Vec<u8>,
    pub mask: Vec<u8>,
    pub name: String,
    pub module: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AtrFile {
    atr: Vec<AtrEntry>,
}

/// The table shipped with the agent.
pub const SHIPPED_ATR_TABLE: &str = include_str!("../data/atr.toml");

impl AtrTable {
    /// The user's entries first, then the shipped table.
    pub fn load(config: &Config) -> Result<AtrTable, String> {
        let shipped: AtrFile =
            toml::from_str(SHIPPED_ATR_TABLE).map_err(|e| format!("shipped ATR table: {e}"))?;
        let mut entries = Vec::new();
        for e in config.atr.iter().chain(shipped.atr.iter()) {
            entries.push(AtrRule::parse(e)?);
        }
        Ok(AtrTable {
            entries,
            users: config.atr.len(),
        })
    }

    /// The table the agent uses: the user's `[[atr]]` entries always (they are configuration,
    /// like `[[modules]]`); the shipped table only with `discover_modules`.
    pub fn effective(config: &Config) -> Result<AtrTable, String> {
        if config.discover_modules {
            return AtrTable::load(config);
        }
        let entries = config
            .atr
            .iter()
            .map(AtrRule::parse)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(AtrTable {
            users: entries.len(),
            entries,
        })
    }

    /// Whether this rule came from the user's configuration rather than the shipped table.
    pub fn is_users(&self, rule: &AtrRule) -> bool {
        self.users > 0
            && self.entries[..self.users]
                .iter()
                .any(|r| std::ptr::eq(r, rule))
    }

    /// The first rule whose masked pattern equals the masked ATR.
    pub fn module_for(&self, atr: &[u8]) -> Option<&AtrRule> {
        self.entries.iter().find(|r| r.matches(atr))
    }

    pub fn rules(&self) -> &[AtrRule] {
        &self.entries
    }
}

impl AtrRule {
    fn parse(e: &AtrEntry) -> Result<AtrRule, String> {
        let atr = parse_hex(&e.atr).ok_or_else(|| format!("ATR {:?} is not hex", e.atr))?;
        let mask = match &e.mask {
            Some(m) => parse_hex(m).ok_or_else(|| format!("mask {m:?} is not hex"))?,
            None => vec![0xff; atr.len()],
        };
        if mask.len() != atr.len() {
            return Err(format!("ATR {:?}: mask and ATR differ in length", e.name));
        }
        Ok(AtrRule {
            atr,
            mask,
            name: e.name.clone(),
            module: e.module.clone(),
        })
    }

    pub fn matches(&self, atr: &[u8]) -> bool {
        atr.len() == self.atr.len()
            && atr
                .iter()
                .zip(&self.mask)
                .zip(&self.atr)
                .all(|((a, m), p)| a & m == p & m)
    }
}

/// Hex with optional spaces or colons between bytes.
pub fn parse_hex(s: &str) -> Option<Vec<u8>> {
    let clean: String = s.chars().filter(|c| !matches!(c, ' ' | ':')).collect();
    hex::decode(clean).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModuleConfig;

    #[test]
    fn skf_libraries_come_from_the_config_then_the_installed_table_entries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let installed = dir.path().join("libvendor-skf.so");
        std::fs::write(&installed, b"").expect("write");
        let table = format!(
            "[[skf_library]]\nvendor = \"V\"\nproduct = \"P\"\nos = \"{os}\"\npath = \"{}\"\nsource = \"s\"\n\
             [[skf_library]]\nvendor = \"W\"\nproduct = \"Q\"\nos = \"{os}\"\npath = \"/nowhere/libq.so\"\nsource = \"s\"\n\
             [[skf_library]]\nvendor = \"X\"\nproduct = \"R\"\nos = \"plan9\"\npath = \"{}\"\nsource = \"s\"\n",
            installed.display(),
            installed.display(),
            os = std::env::consts::OS
        );
        let config = Config {
            skf_modules: vec![ModuleConfig {
                path: PathBuf::from("/configured/libskf.so"),
            }],
            ..Config::default()
        };
        let (found, missing) = discover_skf(&config, &table);
        let paths: Vec<&Path> = found.iter().map(|c| c.path.as_path()).collect();
        assert_eq!(
            paths,
            [Path::new("/configured/libskf.so"), installed.as_path()]
        );
        assert_eq!(found[0].source, Source::SkfConfig);
        assert_eq!(
            missing.len(),
            1,
            "the absent library is reported, the other OS's is not"
        );
        let off = Config {
            discover_modules: false,
            ..config
        };
        assert_eq!(discover_skf(&off, &table).0.len(), 1);
        // The shipped table parses.
        assert!(toml::from_str::<SkfTable>(SKF_TABLE).is_ok());
    }

    #[test]
    fn config_modules_come_first_and_duplicates_are_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let so = dir.path().join("libexample.so");
        std::fs::write(&so, b"").expect("write");
        let modules_dir = dir.path().join("modules");
        std::fs::create_dir(&modules_dir).expect("mkdir");
        std::fs::write(
            modules_dir.join("example.module"),
            format!("module: {}\n", so.display()),
        )
        .expect("write");
        std::fs::write(
            modules_dir.join("trust.module"),
            "module: p11-kit-trust.so\ntrust-policy: yes\n",
        )
        .expect("write");
        let mut config = Config::default();
        config.modules.push(ModuleConfig { path: so.clone() });
        let found = discover_in(&config, std::slice::from_ref(&modules_dir), &[]);
        assert_eq!(found.candidates.len(), 1, "{found:?}");
        assert_eq!(found.candidates[0].source, Source::Config);

        let found = discover_in(&Config::default(), std::slice::from_ref(&modules_dir), &[]);
        assert_eq!(
            found.candidates,
            vec![Candidate {
                path: so,
                source: Source::P11Kit {
                    file: modules_dir.join("example.module")
                }
            }]
        );
    }

    #[test]
    fn discovery_off_keeps_only_the_configuration() {
        let config = Config {
            discover_modules: false,
            ..Config::default()
        };
        let found = discover_in(
            &config,
            &[PathBuf::from("/usr/share/p11-kit/modules")],
            WELL_KNOWN,
        );
        assert!(found.candidates.is_empty());
    }

    #[test]
    fn a_module_file_without_module_line_is_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("bad.module"), "priority: 1\n").expect("write");
        let found = discover_in(&Config::default(), &[dir.path().to_path_buf()], &[]);
        assert!(found.candidates.is_empty());
        assert_eq!(found.skipped.len(), 1);
        assert!(found.skipped[0].why.contains("module:"));
    }

    #[test]
    fn the_shipped_atr_table_parses_and_masks_match() {
        let table = AtrTable::load(&Config::default()).expect("table");
        assert!(!table.rules().is_empty());
        let rule = AtrRule::parse(&AtrEntry {
            atr: "3B:8F:80:01".into(),
            mask: Some("FF FF 00 FF".into()),
            name: "Example".into(),
            module: PathBuf::from("/x.so"),
        })
        .expect("rule");
        assert!(rule.matches(&[0x3b, 0x8f, 0x42, 0x01]));
        assert!(!rule.matches(&[0x3b, 0x8e, 0x42, 0x01]));
        assert!(!rule.matches(&[0x3b, 0x8f, 0x42]));
    }

    #[test]
    fn without_discovery_only_the_users_atr_entries_apply() {
        let shipped = AtrTable::load(&Config::default()).expect("table");
        let atr = shipped.rules()[0].atr.clone();
        let mut config = Config {
            discover_modules: false,
            ..Config::default()
        };
        assert!(AtrTable::effective(&config)
            .expect("table")
            .module_for(&atr)
            .is_none());
        config.atr.push(AtrEntry {
            atr: hex::encode(&atr),
            mask: None,
            name: "Mine".into(),
            module: PathBuf::from("/opt/mine.so"),
        });
        let table = AtrTable::effective(&config).expect("table");
        let rule = table.module_for(&atr).expect("match");
        assert!(table.is_users(rule));
    }

    #[test]
    fn user_atr_entries_win() {
        let mut config = Config::default();
        let shipped = AtrTable::load(&config).expect("table");
        let first = &shipped.rules()[0];
        config.atr.push(AtrEntry {
            atr: hex::encode(&first.atr),
            mask: None,
            name: "Mine".into(),
            module: PathBuf::from("/opt/mine.so"),
        });
        let table = AtrTable::load(&config).expect("table");
        let rule = table.module_for(&first.atr).expect("match");
        assert_eq!(rule.name, "Mine");
    }
}
