//! The Debian binary package's control stanza (`DEBIAN/control` for `dpkg-deb --build`).

/// The stanza for version `version` on Debian architecture `arch` (`amd64`, `arm64`, …).
///
/// Depends are what the agent cannot work without (a pinentry for every dialog); Recommends
/// what most users need (PC/SC for smartcards, OpenSC as the generic PKCS#11 module, p11-kit
/// to find registered modules); Suggests the software token for trying it out.
pub fn control(version: &str, arch: &str) -> String {
    format!(
        "\
Package: keyport
Version: {version}
Section: utils
Priority: optional
Architecture: {arch}
Maintainer: KeyPort maintainers <keyport@example.invalid>
Depends: libc6, pinentry-gnome3 | pinentry-qt | pinentry-gtk2 | pinentry-curses | pinentry-tty
Recommends: pcscd, opensc-pkcs11, p11-kit-modules
Suggests: softhsm2
Homepage: {homepage}
Description: local signing agent for web portals (USB tokens, smartcards)
 KeyPort is a small daemon that lets a web portal obtain a signature or a
 login from a key that never leaves a USB token or smartcard. It serves a
 JSON-RPC API over a WebSocket on 127.0.0.1, asks the user for consent and the
 PIN through pinentry, and talks to the token through its PKCS#11 module.
 .
 Run `keyport-install` as the user to start it as a systemd user service.
",
        homepage = env!("CARGO_PKG_REPOSITORY"),
    )
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
    use std::process::Command;

    /// dpkg-deb (the real tool) builds a package from the stanza and reads the fields back.
    #[test]
    fn dpkg_deb_builds_a_package_from_the_stanza() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("pkg");
        std::fs::create_dir_all(root.join("DEBIAN")).expect("mkdir");
        std::fs::create_dir_all(root.join("usr/bin")).expect("mkdir");
        std::fs::write(root.join("usr/bin/keyport"), b"#!/bin/sh\n").expect("write");
        std::fs::write(root.join("DEBIAN/control"), control("0.1.0", host_arch())).expect("write");
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
            .args(["Package", "Version", "Architecture", "Depends"])
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
        assert!(text.contains("pinentry-curses"), "{text}");
    }
}
