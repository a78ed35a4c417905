//! Linux: a hardened systemd user unit.

use std::path::Path;

use crate::paths::Dirs;
use crate::plan::{Plan, Step};

/// The unit's name.
pub const UNIT: &str = "keyport.service";

/// Where the packaged unit lives (the .deb installs it; the preset enables it for every user).
pub const PACKAGED_UNIT: &str = "/usr/lib/systemd/user/keyport.service";
/// Where `keyport-install install --system` writes the machine-wide unit.
pub const SYSTEM_UNIT: &str = "/etc/systemd/user/keyport.service";
/// The preset that enables the packaged unit (systemd.preset(5)).
pub const PRESET: &str = "/usr/lib/systemd/user-preset/90-keyport.preset";

/// The unit file for `keyport run` from `binary`, allowed to write only KeyPort's config and
/// data directories.
///
/// Every hardening option here works in a *user* manager: the seccomp-based ones
/// (`NoNewPrivileges`, `RestrictAddressFamilies`, `LockPersonality`,
/// `MemoryDenyWriteExecute`, `RestrictRealtime`, `RestrictSUIDSGID`,
/// `SystemCallArchitectures`) need no privilege, and the mount-namespace ones (`PrivateTmp`,
/// `ProtectSystem`, `ReadWritePaths`) use an unprivileged user namespace where the kernel
/// allows one. `MemoryDenyWriteExecute` suits every PKCS#11 module we know (SoftHSM, OpenSC,
/// vendor middleware does not JIT); a module that maps W+X memory would fail to load, and
/// that line is the one to drop for it.
pub fn unit(binary: &Path, dirs: &Dirs) -> String {
    let rw = |p: &Path| escape(&format!("-{}", p.display()));
    let mkdir = |p: &Path| escape(&p.display().to_string());
    render(
        "written by keyport-install; `keyport-install uninstall` removes it",
        &escape(&binary.display().to_string()),
        &format!(
            "{} {}",
            mkdir(&dirs.keyport_config),
            mkdir(&dirs.keyport_data)
        ),
        &format!("{} {}", rw(&dirs.keyport_config), rw(&dirs.keyport_data)),
    )
}

/// The same unit for every user, as the package and `install --system` ship it: the folders
/// are named with systemd's specifiers (`%E` is `$XDG_CONFIG_HOME`, else `~/.config`; `%h` the
/// home; the agent's data folder is `~/.local/share/keyport`).
pub fn shared_unit(binary: &Path, written_by: &str) -> String {
    render(
        written_by,
        &escape(&binary.display().to_string()),
        "%E/keyport %h/.local/share/keyport",
        "-%E/keyport -%h/.local/share/keyport",
    )
}

/// The preset file: enable the unit for every user (systemd.preset(5)).
pub fn preset() -> String {
    format!(
        "# KeyPort's agent starts with every user's session (keyport package).\nenable {UNIT}\n"
    )
}

fn render(written_by: &str, exec: &str, mkdir: &str, rw: &str) -> String {
    format!(
        "\
# KeyPort signing agent ({written_by}).
[Unit]
Description=KeyPort signing agent for web portals
Documentation=man:keyport(1) {docs}
After=pcscd.socket

[Service]
Type=simple
# The folders must exist before ProtectSystem makes everything else read-only; `+` runs this
# one command outside the sandbox (still as the user).
ExecStartPre=+/bin/mkdir -p -m 0700 {mkdir}
ExecStart={exec} run
Restart=on-failure
RestartSec=2
UMask=0077
NoNewPrivileges=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
PrivateTmp=yes
ProtectSystem=strict
ReadWritePaths={rw}
LockPersonality=yes
MemoryDenyWriteExecute=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
SystemCallArchitectures=native

[Install]
WantedBy=default.target
",
        docs = crate::deb::DOCUMENTATION,
    )
}

/// Install: the directories the unit may write, the unit, then
/// `systemctl --user daemon-reload` and `enable --now`.
pub fn install(binary: &Path, dirs: &Dirs) -> Plan {
    Plan {
        steps: vec![
            Step::CreateDir(dirs.keyport_config.clone()),
            Step::CreateDir(dirs.keyport_data.clone()),
            Step::write(dirs.systemd_unit(), unit(binary, dirs)),
            Step::run(&["systemctl", "--user", "daemon-reload"]),
            Step::run(&["systemctl", "--user", "enable", "--now", UNIT]),
        ],
    }
}

/// Uninstall: stop and disable (fails harmlessly if it never ran), remove the unit, reload.
/// KeyPort's config and data (origins, audit log) stay unless `purge`.
pub fn uninstall(dirs: &Dirs, purge: bool) -> Plan {
    let mut steps = vec![
        Step::run_may_fail(&["systemctl", "--user", "disable", "--now", UNIT]),
        Step::RemoveFile(dirs.systemd_unit()),
        Step::run(&["systemctl", "--user", "daemon-reload"]),
    ];
    if purge {
        steps.push(Step::RemoveDirAll(dirs.keyport_config.clone()));
        steps.push(Step::RemoveDirAll(dirs.keyport_data.clone()));
    }
    Plan { steps }
}

/// Machine-wide install: the unit in `/etc/systemd/user`, enabled for every user
/// (`systemctl --global enable`); each user's manager starts it at their next login.
pub fn install_system(binary: &Path) -> Plan {
    Plan {
        steps: vec![
            Step::WriteShared {
                path: SYSTEM_UNIT.into(),
                text: shared_unit(
                    binary,
                    "written by keyport-install --system; `keyport-install uninstall --system` removes it",
                ),
            },
            Step::run(&["systemctl", "--global", "enable", UNIT]),
        ],
    }
}

/// Machine-wide uninstall: disabled for every user, the unit removed. Each user's config and
/// data are theirs (`keyport-install uninstall --purge` as that user).
pub fn uninstall_system() -> Plan {
    Plan {
        steps: vec![
            Step::run_may_fail(&["systemctl", "--global", "disable", UNIT]),
            Step::RemoveFile(SYSTEM_UNIT.into()),
        ],
    }
}

/// Quotes one word for a unit file: `%` is a specifier and `$` a variable to systemd, and a
/// word with blanks, quotes or backslashes needs C-style double quotes.
fn escape(word: &str) -> String {
    let word = word.replace('%', "%%").replace('$', "$$");
    if word
        .chars()
        .any(|c| c.is_whitespace() || c == '"' || c == '\'' || c == '\\')
    {
        format!("\"{}\"", word.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        word
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn dirs() -> Dirs {
        Dirs {
            home: PathBuf::from("/home/ann"),
            config_home: PathBuf::from("/home/ann/.config"),
            keyport_config: PathBuf::from("/home/ann/.config/keyport"),
            keyport_data: PathBuf::from("/home/ann/.local/share/keyport"),
        }
    }

    #[test]
    fn unit_is_hardened_and_runs_the_agent() {
        let text = unit(Path::new("/opt/keyport/bin/keyport"), &dirs());
        let lines: Vec<&str> = text.lines().collect();
        for wanted in [
            "ExecStart=/opt/keyport/bin/keyport run",
            "UMask=0077",
            "NoNewPrivileges=yes",
            "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
            "PrivateTmp=yes",
            "ProtectSystem=strict",
            "ReadWritePaths=-/home/ann/.config/keyport -/home/ann/.local/share/keyport",
            "LockPersonality=yes",
            "MemoryDenyWriteExecute=yes",
            "WantedBy=default.target",
        ] {
            assert!(lines.contains(&wanted), "missing {wanted:?} in\n{text}");
        }
        // Exactly one of each section, in order.
        let sections: Vec<&&str> = lines.iter().filter(|l| l.starts_with('[')).collect();
        assert_eq!(sections, [&"[Unit]", &"[Service]", &"[Install]"]);
    }

    /// systemd's own checker accepts the unit (every directive known, the binary executable).
    #[test]
    fn systemd_analyze_verify_accepts_the_unit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut d = dirs();
        d.keyport_config = dir.path().join("config dir");
        d.keyport_data = dir.path().join("data");
        let file = dir.path().join(UNIT);
        let binary = std::fs::canonicalize("/bin/true").expect("true exists");
        std::fs::write(&file, unit(&binary, &d)).expect("write");
        // --man=no: keyport(1) is installed by the package, not on a build machine (CI checks
        // the installed unit with the man page).
        let out = std::process::Command::new("systemd-analyze")
            .args(["--man=no", "verify"])
            .arg(&file)
            .output()
            .expect("systemd-analyze runs (apt-get install systemd)");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && stderr.trim().is_empty(), "{stderr}");
    }

    /// The unit the package ships passes systemd's checker too, specifiers and all.
    #[test]
    fn systemd_analyze_verify_accepts_the_shared_unit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join(UNIT);
        let binary = std::fs::canonicalize("/bin/true").expect("true exists");
        let text = shared_unit(&binary, "test");
        assert!(
            text.contains("\nReadWritePaths=-%E/keyport -%h/.local/share/keyport\n"),
            "{text}"
        );
        std::fs::write(&file, text).expect("write");
        // A user manager's view (where %E and %h mean the user's folders); it needs a
        // runtime folder, which a build machine's root session may not have.
        let runtime = tempfile::tempdir().expect("tempdir");
        let out = std::process::Command::new("systemd-analyze")
            .args(["--user", "--man=no", "verify"])
            .arg(&file)
            .env("XDG_RUNTIME_DIR", runtime.path())
            .output()
            .expect("systemd-analyze runs (apt-get install systemd)");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && stderr.trim().is_empty(), "{stderr}");
    }

    #[test]
    fn odd_paths_are_quoted_and_specifiers_escaped() {
        let mut d = dirs();
        d.keyport_data = PathBuf::from("/home/ann/My Data/keyport");
        let text = unit(Path::new("/home/ann/100%/key port"), &d);
        assert!(
            text.contains("ExecStart=\"/home/ann/100%%/key port\" run\n"),
            "{text}"
        );
        assert!(text.contains(" \"-/home/ann/My Data/keyport\"\n"), "{text}");
        assert_eq!(escape("a$b\\c"), "\"a$$b\\\\c\"");
    }

    #[test]
    fn install_and_uninstall_steps() {
        let plan = install(Path::new("/usr/bin/keyport"), &dirs());
        let unit_path = PathBuf::from("/home/ann/.config/systemd/user/keyport.service");
        assert!(matches!(&plan.steps[2], Step::WriteFile { path, .. } if *path == unit_path));
        let text = plan.to_string();
        assert!(text.ends_with(
            "systemctl --user daemon-reload\nsystemctl --user enable --now keyport.service\n"
        ));
        let plan = uninstall(&dirs(), false);
        assert_eq!(plan.steps[1], Step::RemoveFile(unit_path));
        assert_eq!(plan.steps.len(), 3, "config and data stay");
        let plan = uninstall(&dirs(), true);
        assert_eq!(
            plan.steps[3..],
            [
                Step::RemoveDirAll("/home/ann/.config/keyport".into()),
                Step::RemoveDirAll("/home/ann/.local/share/keyport".into())
            ]
        );
    }
}
