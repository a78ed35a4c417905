//! The Debian package, built by the installer itself with `dpkg-deb` (`keyport-install
//! build-deb`, run by `scripts/build-deb.sh`).
//!
//! Why not `cargo deb`: the package's unit, preset and maintainer scripts are the same text
//! `keyport-install` writes and tests, so they have one owner here; and `dpkg-deb` and
//! `dpkg-shlibdeps` are on every Debian build machine, while `cargo-deb` would have to be
//! compiled first on each. The Depends line comes from `dpkg-shlibdeps` (the libraries the
//! binaries link, as `ldd` shows them, mapped to the packages that ship them with the lowest
//! version the symbols need) plus a pinentry.
//!
//! What the package holds:
//! - `/usr/bin/keyport`, `/usr/bin/keyport-install`;
//! - `/usr/lib/systemd/user/keyport.service` (hardened user unit) and
//!   `/usr/lib/systemd/user-preset/90-keyport.preset` (enables it for every user: `postinst`
//!   runs `systemctl --global preset` on first install, `prerm` `--global disable` on removal);
//! - `/usr/share/keyport/atr.toml` (the ATR table the binary has built in, for reading);
//! - man pages (`clap_mangen`) and bash, zsh and fish completions (`clap_complete`), made by
//!   the `keyport` binary being packaged (`keyport generate-assets`);
//! - `/usr/share/doc/keyport/`: copyright, README, the example configuration and policy.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::Error;
use crate::systemd;

/// The project's home page (the package's Homepage:), from Cargo.toml.
pub const HOMEPAGE: &str = env!("CARGO_PKG_HOMEPAGE");
/// The user documentation (the unit's Documentation=, after the man page); Cargo.toml's
/// `documentation` says the same (Cargo passes no variable for it).
pub const DOCUMENTATION: &str = concat!(env!("CARGO_PKG_REPOSITORY"), "/blob/main/README.md");

/// A dialog program: every consent and PIN needs one.
const PINENTRY: &str =
    "pinentry-gnome3 | pinentry-qt | pinentry-gtk2 | pinentry-curses | pinentry-tty";
const RECOMMENDS: &str = "pcscd, opensc-pkcs11, p11-kit-modules";

const ATR_TABLE: &str = include_str!("../../agent/data/atr.toml");
const EXAMPLE_CONFIG: &str = include_str!("../../docs/config.example.toml");
const EXAMPLE_POLICY: &str = include_str!("../../docs/policy.example.toml");
const README: &str = include_str!("../../README.md");

const POSTINST: &str = "\
#!/bin/sh
set -e
# First install: enable the user unit for every user as its preset says (takes effect at each
# user's next login). Upgrades keep whatever the administrator decided since.
if [ \"$1\" = configure ] && [ -z \"$2\" ] && command -v systemctl >/dev/null; then
    systemctl --global preset keyport.service >/dev/null || true
fi
";

const PRERM: &str = "\
#!/bin/sh
set -e
# Removal: no user manager starts the agent any more (running agents end with their session).
if [ \"$1\" = remove ] && command -v systemctl >/dev/null; then
    systemctl --global disable keyport.service >/dev/null 2>&1 || true
fi
";

const POSTRM: &str = "\
#!/bin/sh
set -e
# The enablement link, should systemctl have been missing at removal.
if [ \"$1\" = remove ] || [ \"$1\" = purge ]; then
    rm -f /etc/systemd/user/default.target.wants/keyport.service
    rmdir --ignore-fail-on-non-empty /etc/systemd/user/default.target.wants /etc/systemd/user 2>/dev/null || true
fi
";

/// What a package is built from.
#[derive(Debug, Clone)]
pub struct DebInputs {
    /// The release `keyport` binary.
    pub keyport: PathBuf,
    /// The release `keyport-install` binary.
    pub installer: PathBuf,
    /// Debian version (the crate's, e.g. `0.1.0`).
    pub version: String,
    /// Debian architecture (`amd64`).
    pub arch: String,
    /// Where the .deb goes (`target/debian`).
    pub out_dir: PathBuf,
    /// `keyport-install(1)`, roff (the keyport binary makes its own pages).
    pub installer_man: Vec<u8>,
}

/// Builds `OUT/keyport_VERSION_ARCH.deb` and returns its path.
pub fn build(inputs: &DebInputs) -> Result<PathBuf, Error> {
    // Absolute, because dpkg-shlibdeps runs in a folder of its own.
    std::fs::create_dir_all(&inputs.out_dir).map_err(|source| Error::Io {
        action: "create directory",
        path: inputs.out_dir.clone(),
        source,
    })?;
    let out_dir = std::fs::canonicalize(&inputs.out_dir).map_err(|source| Error::Io {
        action: "find",
        path: inputs.out_dir.clone(),
        source,
    })?;
    let staging = out_dir.join(format!(
        "keyport_{}_{}.staging",
        inputs.version, inputs.arch
    ));
    let io = |action: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io {
            action,
            path,
            source,
        }
    };
    match std::fs::remove_dir_all(&staging) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("remove", &staging)(e)),
    }
    let root = staging.join("root");
    let put = |rel: &str, bytes: &[u8], mode: u32| -> Result<(), Error> {
        let path = root.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io("create directory", parent))?;
        }
        std::fs::write(&path, bytes).map_err(io("write", &path))?;
        set_mode(&path, mode).map_err(io("chmod", &path))
    };
    let read = |p: &Path| std::fs::read(p).map_err(io("read", p));

    put("usr/bin/keyport", &read(&inputs.keyport)?, 0o755)?;
    put("usr/bin/keyport-install", &read(&inputs.installer)?, 0o755)?;
    for bin in ["usr/bin/keyport", "usr/bin/keyport-install"] {
        run(Command::new("strip")
            .args(["--strip-unneeded", "--remove-section=.comment"])
            .arg(root.join(bin)))?;
    }
    put(
        "usr/lib/systemd/user/keyport.service",
        systemd::shared_unit(Path::new("/usr/bin/keyport"), "keyport package").as_bytes(),
        0o644,
    )?;
    put(
        "usr/lib/systemd/user-preset/90-keyport.preset",
        systemd::preset().as_bytes(),
        0o644,
    )?;
    put("usr/share/keyport/atr.toml", ATR_TABLE.as_bytes(), 0o644)?;
    put(
        "usr/share/doc/keyport/examples/config.toml",
        EXAMPLE_CONFIG.as_bytes(),
        0o644,
    )?;
    put(
        "usr/share/doc/keyport/examples/policy.toml",
        EXAMPLE_POLICY.as_bytes(),
        0o644,
    )?;
    put("usr/share/doc/keyport/README.md", README.as_bytes(), 0o644)?;
    put(
        "usr/share/doc/keyport/copyright",
        copyright().as_bytes(),
        0o644,
    )?;

    // Man pages and completions, from the binary being packaged.
    let assets = staging.join("assets");
    run(Command::new(root.join("usr/bin/keyport"))
        .arg("generate-assets")
        .arg("--out")
        .arg(&assets))?;
    let man_dir = assets.join("man");
    let mut pages: Vec<PathBuf> = std::fs::read_dir(&man_dir)
        .map_err(io("read", &man_dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "1"))
        .collect();
    pages.sort();
    for page in &pages {
        let name = page
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        put(
            &format!("usr/share/man/man1/{name}.gz"),
            &gzip(page)?,
            0o644,
        )?;
    }
    let installer_page = staging.join("keyport-install.1");
    std::fs::write(&installer_page, &inputs.installer_man).map_err(io("write", &installer_page))?;
    put(
        "usr/share/man/man1/keyport-install.1.gz",
        &gzip(&installer_page)?,
        0o644,
    )?;
    let completions = assets.join("completions");
    for (from, to) in [
        (
            "keyport.bash",
            "usr/share/bash-completion/completions/keyport",
        ),
        ("_keyport", "usr/share/zsh/vendor-completions/_keyport"),
        (
            "keyport.fish",
            "usr/share/fish/vendor_completions.d/keyport.fish",
        ),
    ] {
        put(to, &read(&completions.join(from))?, 0o644)?;
    }

    let depends = shlib_depends(
        &staging,
        &[
            root.join("usr/bin/keyport"),
            root.join("usr/bin/keyport-install"),
        ],
    )?;
    let installed_kib = tree_size(&root).map_err(io("read", &root))?.div_ceil(1024);
    put(
        "DEBIAN/control",
        control(&inputs.version, &inputs.arch, &depends, installed_kib).as_bytes(),
        0o644,
    )?;
    put("DEBIAN/postinst", POSTINST.as_bytes(), 0o755)?;
    put("DEBIAN/prerm", PRERM.as_bytes(), 0o755)?;
    put("DEBIAN/postrm", POSTRM.as_bytes(), 0o755)?;

    let deb = out_dir.join(format!("keyport_{}_{}.deb", inputs.version, inputs.arch));
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zxz", "--build"])
        .arg(&root)
        .arg(&deb))?;
    std::fs::remove_dir_all(&staging).map_err(io("remove", &staging))?;
    Ok(deb)
}

/// The control stanza for version `version` on Debian architecture `arch` (`amd64`, `arm64`,
/// …). `shlib_depends` is what the binaries link (from `dpkg-shlibdeps`); a pinentry is added,
/// since every dialog needs one. Recommends what most users need (PC/SC for smartcards, OpenSC
/// as the generic PKCS#11 module, p11-kit to find registered modules); Suggests the software
/// token for trying it out.
pub fn control(version: &str, arch: &str, shlib_depends: &str, installed_kib: u64) -> String {
    let mut depends = shlib_depends.trim().to_owned();
    if !depends.is_empty() {
        depends.push_str(", ");
    }
    depends.push_str(PINENTRY);
    format!(
        "\
Package: keyport
Version: {version}
Section: utils
Priority: optional
Architecture: {arch}
Maintainer: KeyPort maintainers <keyport@example.invalid>
Installed-Size: {installed_kib}
Depends: {depends}
Recommends: {RECOMMENDS}
Suggests: softhsm2
Homepage: {HOMEPAGE}
Description: local signing agent for web portals (USB tokens, smartcards)
 KeyPort is a small daemon that lets a web portal obtain a signature or a
 login from a key that never leaves a USB token or smartcard. It serves a
 JSON-RPC API over a WebSocket on 127.0.0.1, asks the user for consent and the
 PIN through pinentry, and talks to the token through its PKCS#11 module.
 .
 The package starts the agent with every user's session (a systemd user unit
 enabled by a preset); `keyport doctor` shows what it found.
"
    )
}

/// `shlibs:Depends` of `binaries` as `dpkg-shlibdeps` computes it (it wants a `debian/control`
/// in its working directory; a minimal one is written under `staging`).
fn shlib_depends(staging: &Path, binaries: &[PathBuf]) -> Result<String, Error> {
    let work = staging.join("shlibdeps");
    let control = work.join("debian/control");
    let io = |action, path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io {
            action,
            path,
            source,
        }
    };
    if let Some(parent) = control.parent() {
        std::fs::create_dir_all(parent).map_err(io("create directory", parent))?;
    }
    std::fs::write(
        &control,
        "Source: keyport\n\nPackage: keyport\nArchitecture: any\n",
    )
    .map_err(io("write", &control))?;
    let mut cmd = Command::new("dpkg-shlibdeps");
    cmd.arg("-O").current_dir(&work);
    for b in binaries {
        cmd.arg(format!("-e{}", b.display()));
    }
    let out = run(&mut cmd)?;
    let text = String::from_utf8_lossy(&out);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .unwrap_or_default();
    Ok(line.to_owned())
}

/// Debian's machine-readable copyright file.
fn copyright() -> String {
    let mut text = String::new();
    let _ = write!(
        text,
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
         Upstream-Name: keyport\n\
         Source: {HOMEPAGE}\n\n\
         Files: *\n\
         Copyright: KeyPort maintainers\n\
         License: Apache-2.0\n \
         On Debian systems the full text of the Apache License 2.0 is in\n \
         /usr/share/common-licenses/Apache-2.0.\n"
    );
    text
}

/// `gzip -9n` of a file (no name or time stamp inside, so builds are reproducible).
fn gzip(path: &Path) -> Result<Vec<u8>, Error> {
    run(Command::new("gzip").args(["-9n", "-c"]).arg(path))
}

/// Runs a command; its stdout, or the failure with the command line.
fn run(cmd: &mut Command) -> Result<Vec<u8>, Error> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let line = std::iter::once(program.clone())
        .chain(cmd.get_args().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ");
    let out = cmd
        .output()
        .map_err(|source| Error::Spawn { program, source })?;
    if !out.status.success() {
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        return Err(Error::CommandFailed {
            command: line,
            status: out.status,
        });
    }
    Ok(out.stdout)
}

/// The bytes of every file below `dir`.
fn tree_size(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            tree_size(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

#[cfg(not(unix))]
fn set_mode(_path: &Path, _mode: u32) -> std::io::Result<()> {
    Ok(())
}

/// Debian's name for the architecture this program was built for.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "i386",
        "arm" => "armhf",
        "powerpc64" => "ppc64el",
        "riscv64" => "riscv64",
        "s390x" => "s390x",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// dpkg-deb (the real tool) builds a package from the stanza and reads the fields back.
    #[test]
    fn dpkg_deb_builds_a_package_from_the_stanza() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("pkg");
        std::fs::create_dir_all(root.join("DEBIAN")).expect("mkdir");
        std::fs::create_dir_all(root.join("usr/bin")).expect("mkdir");
        std::fs::write(root.join("usr/bin/keyport"), b"#!/bin/sh\n").expect("write");
        std::fs::write(
            root.join("DEBIAN/control"),
            control("0.1.0", host_arch(), "libc6 (>= 2.34), libpcsclite1", 10),
        )
        .expect("write");
        let deb = dir.path().join("keyport.deb");
        let built = Command::new("dpkg-deb")
            .args(["--root-owner-group", "--build"])
            .arg(&root)
            .arg(&deb)
            .output()
            .expect("dpkg-deb runs");
        assert!(
            built.status.success(),
            "{}",
            String::from_utf8_lossy(&built.stderr)
        );
        let fields = Command::new("dpkg-deb")
            .args(["--field"])
            .arg(&deb)
            .args(["Package", "Version", "Architecture", "Depends", "Homepage"])
            .output()
            .expect("dpkg-deb runs");
        assert!(fields.status.success());
        let text = String::from_utf8(fields.stdout).expect("utf-8");
        assert!(text.contains("Package: keyport\n"), "{text}");
        assert!(text.contains("Version: 0.1.0\n"), "{text}");
        assert!(
            text.contains(&format!("Architecture: {}\n", host_arch())),
            "{text}"
        );
        assert!(
            text.contains("Depends: libc6 (>= 2.34), libpcsclite1, pinentry-gnome3 |"),
            "{text}"
        );
        assert!(text.contains("pinentry-curses"), "{text}");
        assert!(text.contains(&format!("Homepage: {HOMEPAGE}\n")), "{text}");
        assert!(!HOMEPAGE.is_empty() && !DOCUMENTATION.is_empty());
    }

    /// `dpkg-shlibdeps` names the package of every library a real binary links.
    #[test]
    fn shlibdeps_names_libc_for_a_linked_binary() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = dir.path().join("true");
        std::fs::copy("/bin/true", &bin).expect("copy");
        let deps = shlib_depends(dir.path(), &[bin]).expect("dpkg-shlibdeps runs");
        assert!(deps.starts_with("libc6 (>= "), "{deps}");
    }
}
