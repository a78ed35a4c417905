//! Windows: a scheduled task that starts the agent when the user logs on.

use std::path::Path;

use crate::launchd::xml_escape;
use crate::paths::Dirs;
use crate::plan::{Plan, Step};

/// The task's name in Task Scheduler.
pub const TASK: &str = "KeyPort Agent";

/// Task Scheduler XML (schema 1.2): at `user`'s logon, run `keyport run` from `binary` with
/// the user's normal rights, no time limit, restarted three times a minute apart on failure,
/// also on battery.
pub fn task_xml(binary: &Path, user: &str) -> String {
    let user = xml_escape(user);
    format!(
        r#"<?xml version="1.0" encoding="UTF-16"?>
<Task version="1.2" xmlns="http://schemas.microsoft.com/windows/2004/02/mit/task">
  <RegistrationInfo>
    <Description>KeyPort signing agent for web portals</Description>
    <URI>\{TASK}</URI>
  </RegistrationInfo>
  <Triggers>
    <LogonTrigger>
      <Enabled>true</Enabled>
      <UserId>{user}</UserId>
    </LogonTrigger>
  </Triggers>
  <Principals>
    <Principal id="Author">
      <UserId>{user}</UserId>
      <LogonType>InteractiveToken</LogonType>
      <RunLevel>LeastPrivilege</RunLevel>
    </Principal>
  </Principals>
  <Settings>
    <MultipleInstancesPolicy>IgnoreNew</MultipleInstancesPolicy>
    <DisallowStartIfOnBatteries>false</DisallowStartIfOnBatteries>
    <StopIfGoingOnBatteries>false</StopIfGoingOnBatteries>
    <ExecutionTimeLimit>PT0S</ExecutionTimeLimit>
    <RestartOnFailure>
      <Interval>PT1M</Interval>
      <Count>3</Count>
    </RestartOnFailure>
    <Hidden>true</Hidden>
  </Settings>
  <Actions Context="Author">
    <Exec>
      <Command>{command}</Command>
      <Arguments>run</Arguments>
    </Exec>
  </Actions>
</Task>
"#,
        command = xml_escape(&binary.display().to_string()),
    )
}

/// The XML as schtasks reads it reliably: UTF-16LE with a byte-order mark, CRLF lines.
pub fn utf16le(text: &str) -> Vec<u8> {
    let crlf = text.replace("\r\n", "\n").replace('\n', "\r\n");
    let mut bytes = vec![0xFF, 0xFE];
    bytes.extend(crlf.encode_utf16().flat_map(u16::to_le_bytes));
    bytes
}

/// Install: the task XML beside KeyPort's data, `schtasks /Create /XML`, then start it now.
pub fn install(binary: &Path, dirs: &Dirs, user: &str) -> Plan {
    let xml_path = dirs.windows_task_xml();
    let xml = task_xml(binary, user);
    let path = xml_path.display().to_string();
    Plan {
        steps: vec![
            Step::CreateDir(dirs.keyport_data.clone()),
            Step::WriteFile {
                path: xml_path.clone(),
                bytes: Some(utf16le(&xml)),
                text: xml,
            },
            Step::run(&["schtasks", "/Create", "/TN", TASK, "/XML", &path, "/F"]),
            Step::run(&["schtasks", "/Run", "/TN", TASK]),
        ],
    }
}

/// Uninstall: end the running task, delete it, remove the XML.
pub fn uninstall(dirs: &Dirs) -> Plan {
    Plan {
        steps: vec![
            Step::run_may_fail(&["schtasks", "/End", "/TN", TASK]),
            Step::run_may_fail(&["schtasks", "/Delete", "/TN", TASK, "/F"]),
            Step::RemoveFile(dirs.windows_task_xml()),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Python's XML parser (independent of us) reads the task and finds what we meant.
    #[test]
    fn task_xml_parses_and_names_the_user_and_binary() {
        let text = task_xml(
            Path::new(r"C:\Program Files\KeyPort\keyport.exe"),
            r"CORP\ann&co",
        );
        let bytes = utf16le(&text);
        assert_eq!(&bytes[..2], &[0xFF, 0xFE]);
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("task.xml");
        std::fs::write(&file, &bytes).expect("write");
        let script = concat!(
            "import sys, xml.etree.ElementTree as ET\n",
            "ns = {'t': 'http://schemas.microsoft.com/windows/2004/02/mit/task'}\n",
            "root = ET.parse(sys.argv[1]).getroot()\n",
            "paths = ['t:Triggers/t:LogonTrigger/t:UserId', 't:Principals/t:Principal/t:LogonType',",
            " 't:Actions/t:Exec/t:Command', 't:Actions/t:Exec/t:Arguments',",
            " 't:Settings/t:ExecutionTimeLimit']\n",
            "print('\\n'.join(root.find(p, ns).text for p in paths))\n",
        );
        let out = Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(&file)
            .output()
            .expect("python3 runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8(out.stdout).expect("utf-8"),
            "CORP\\ann&co\nInteractiveToken\nC:\\Program Files\\KeyPort\\keyport.exe\nrun\nPT0S\n"
        );
    }

    #[test]
    fn install_creates_from_the_xml_and_runs_the_task() {
        let dirs = Dirs {
            home: r"C:\Users\ann".into(),
            config_home: r"C:\Users\ann\AppData\Roaming".into(),
            keyport_config: r"C:\Users\ann\AppData\Roaming\KeyPort\keyport\config".into(),
            keyport_data: r"C:\Users\ann\AppData\Roaming\KeyPort\keyport\data".into(),
        };
        let plan = install(Path::new(r"C:\keyport.exe"), &dirs, "ann");
        let text = plan.to_string();
        assert!(
            text.contains("schtasks /Create /TN 'KeyPort Agent' /XML"),
            "{text}"
        );
        assert!(
            text.ends_with("schtasks /Run /TN 'KeyPort Agent'\n"),
            "{text}"
        );
        assert!(uninstall(&dirs)
            .to_string()
            .contains("schtasks /Delete /TN 'KeyPort Agent' /F   # may fail\n"));
    }
}
