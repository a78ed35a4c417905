//! macOS: a launchd agent in `~/Library/LaunchAgents`, started at login.

use std::path::Path;

use crate::paths::Dirs;
use crate::plan::{Plan, Step};

/// The job's label (also the plist's file name).
pub const LABEL: &str = "org.keyport.agent";

/// The property list for `keyport run` from `binary`: started at load and at login,
/// restarted when it exits with a failure, output to `~/Library/Logs/KeyPort`.
pub fn plist(binary: &Path, dirs: &Dirs) -> String {
    let logs = dirs.launchd_logs();
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0">
<dict>
    <key>Label</key>
    <string>{LABEL}</string>
    <key>ProgramArguments</key>
    <array>
        <string>{binary}</string>
        <string>run</string>
    </array>
    <key>RunAtLoad</key>
    <true/>
    <key>KeepAlive</key>
    <dict>
        <key>SuccessfulExit</key>
        <false/>
    </dict>
    <key>ProcessType</key>
    <string>Interactive</string>
    <key>Umask</key>
    <integer>63</integer>
    <key>StandardOutPath</key>
    <string>{out}</string>
    <key>StandardErrorPath</key>
    <string>{err}</string>
</dict>
</plist>
"#,
        binary = xml_escape(&binary.display().to_string()),
        out = xml_escape(&logs.join("keyport.out.log").display().to_string()),
        err = xml_escape(&logs.join("keyport.err.log").display().to_string()),
    )
}

/// Install: the plist, then `launchctl bootstrap gui/UID PLIST`.
pub fn install(binary: &Path, dirs: &Dirs, uid: &str) -> Plan {
    let plist_path = dirs.launchd_plist();
    let domain = format!("gui/{uid}");
    let path = plist_path.display().to_string();
    Plan {
        steps: vec![
            Step::CreateDir(dirs.launchd_logs()),
            Step::write(plist_path.clone(), plist(binary, dirs)),
            Step::run(&["launchctl", "bootstrap", &domain, &path]),
        ],
    }
}

/// Uninstall: `launchctl bootout gui/UID/LABEL`, then remove the plist.
pub fn uninstall(dirs: &Dirs, uid: &str) -> Plan {
    let target = format!("gui/{uid}/{LABEL}");
    Plan {
        steps: vec![
            Step::run_may_fail(&["launchctl", "bootout", &target]),
            Step::RemoveFile(dirs.launchd_plist()),
        ],
    }
}

/// Escapes text for an XML element.
pub(crate) fn xml_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::process::Command;

    fn dirs() -> Dirs {
        Dirs {
            home: PathBuf::from("/Users/ann"),
            config_home: PathBuf::from("/Users/ann/Library/Application Support"),
            keyport_config: PathBuf::from(
                "/Users/ann/Library/Application Support/org.KeyPort.keyport",
            ),
            keyport_data: PathBuf::from(
                "/Users/ann/Library/Application Support/org.KeyPort.keyport",
            ),
        }
    }

    /// The plist parses with Python's plistlib (an independent reader) to what we meant.
    #[test]
    fn plist_parses_with_plistlib() {
        let text = plist(Path::new("/Applications/Key & Port.app/keyport"), &dirs());
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("agent.plist");
        std::fs::write(&file, &text).expect("write");
        let out = Command::new("python3")
            .arg("-c")
            .arg(
                "import json, plistlib, sys\n\
                 print(json.dumps(plistlib.load(open(sys.argv[1], 'rb')), sort_keys=True))",
            )
            .arg(&file)
            .output()
            .expect("python3 runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let parsed = String::from_utf8(out.stdout).expect("utf-8");
        let expected = concat!(
            r#"{"KeepAlive": {"SuccessfulExit": false}, "Label": "org.keyport.agent", "#,
            r#""ProcessType": "Interactive", "#,
            r#""ProgramArguments": ["/Applications/Key & Port.app/keyport", "run"], "#,
            r#""RunAtLoad": true, "#,
            r#""StandardErrorPath": "/Users/ann/Library/Logs/KeyPort/keyport.err.log", "#,
            r#""StandardOutPath": "/Users/ann/Library/Logs/KeyPort/keyport.out.log", "#,
            r#""Umask": 63}"#,
            "\n"
        );
        assert_eq!(parsed, expected);
    }

    #[test]
    fn install_bootstraps_into_the_gui_domain() {
        let text = install(Path::new("/usr/local/bin/keyport"), &dirs(), "501").to_string();
        assert!(text.contains(
            "launchctl bootstrap gui/501 /Users/ann/Library/LaunchAgents/org.keyport.agent.plist\n"
        ));
        let text = uninstall(&dirs(), "501").to_string();
        assert!(text.starts_with("launchctl bootout gui/501/org.keyport.agent   # may fail\n"));
    }
}
