//! `keyport-install` as a user runs it: a private HOME per test, and a stand-in `systemctl`
//! on PATH that records its arguments (the real one needs a user manager).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_keyport-install");

struct Home {
    dir: tempfile::TempDir,
}

impl Home {
    fn new() -> Home {
        Home {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `keyport-install ARGS` with HOME here and no XDG overrides; `fake_bin` first on PATH.
    fn run(&self, args: &[&str], fake_bin: Option<&Path>) -> Output {
        let mut path = std::env::var_os("PATH").unwrap_or_default();
        if let Some(bin) = fake_bin {
            let mut dirs = vec![bin.to_path_buf()];
            dirs.extend(std::env::split_paths(&path));
            path = std::env::join_paths(dirs).expect("PATH");
        }
        Command::new(BIN)
            .args(args)
            .env("HOME", self.path())
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("XDG_DATA_HOME")
            .env("PATH", path)
            .output()
            .expect("keyport-install runs")
    }

    fn unit(&self) -> PathBuf {
        self.path().join(".config/systemd/user/keyport.service")
    }
}

/// Every path below `dir`, sorted.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path.clone());
            }
            out.push(path);
        }
    }
    out.sort();
    out
}

/// A `systemctl` that appends its arguments to `systemctl.log` and exits with `status`.
fn fake_systemctl(dir: &Path, status: u8) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir.join("fake-bin");
    std::fs::create_dir_all(&bin).expect("mkdir");
    let script = bin.join("systemctl");
    let log = dir.join("systemctl.log");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$*\" >> '{}'\nexit {status}\n",
            log.display()
        ),
    )
    .expect("write");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    bin
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn dry_run_prints_the_unit_and_commands_and_changes_nothing() {
    let home = Home::new();
    let binary = std::fs::canonicalize("/bin/true").expect("true exists");
    let out = home.run(&["install", "--dry-run", "--binary", "/bin/true"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let h = home.path().display().to_string();
    assert!(
        text.contains(&format!(
            "write {h}/.config/systemd/user/keyport.service, mode 0600:\n"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("    ExecStart={} run\n", binary.display())),
        "{text}"
    );
    assert!(text.contains("    NoNewPrivileges=yes\n"), "{text}");
    assert!(
        text.contains(&format!(
            "    ReadWritePaths=-{h}/.config/keyport -{h}/.local/share/keyport\n"
        )),
        "{text}"
    );
    assert!(
        text.ends_with(
            "systemctl --user daemon-reload\nsystemctl --user enable --now keyport.service\n"
        ),
        "{text}"
    );
    assert_eq!(
        tree(home.path()),
        Vec::<PathBuf>::new(),
        "a dry run wrote files"
    );

    let out = home.run(&["uninstall", "--dry-run"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains(&format!("rm -f {h}/.config/systemd/user/keyport.service\n")));
    assert_eq!(
        tree(home.path()),
        Vec::<PathBuf>::new(),
        "a dry run removed or wrote files"
    );
}

#[test]
fn install_writes_the_unit_enables_it_and_uninstall_removes_it() {
    let home = Home::new();
    let work = tempfile::tempdir().expect("tempdir");
    let bin = fake_systemctl(work.path(), 0);
    let log = work.path().join("systemctl.log");

    let out = home.run(&["install", "--binary", "/bin/true"], Some(&bin));
    assert!(out.status.success(), "{}", stderr(&out));
    let unit = std::fs::read_to_string(home.unit()).expect("unit written");
    let binary = std::fs::canonicalize("/bin/true").expect("true exists");
    assert!(
        unit.contains(&format!("\nExecStart={} run\n", binary.display())),
        "{unit}"
    );
    assert_eq!(mode(&home.unit()), 0o600);
    assert_eq!(mode(&home.path().join(".config/keyport")), 0o700);
    assert_eq!(mode(&home.path().join(".local/share/keyport")), 0o700);
    assert_eq!(
        std::fs::read_to_string(&log).expect("systemctl ran"),
        "--user daemon-reload\n--user enable --now keyport.service\n"
    );

    let out = home.run(&["uninstall"], Some(&bin));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!home.unit().exists(), "unit still there");
    assert!(
        home.path().join(".config/keyport").is_dir(),
        "config must stay"
    );
    assert_eq!(
        std::fs::read_to_string(&log).expect("log"),
        "--user daemon-reload\n--user enable --now keyport.service\n\
         --user disable --now keyport.service\n--user daemon-reload\n"
    );
}

#[test]
fn a_failing_systemctl_fails_the_install_and_says_which_command() {
    let home = Home::new();
    let work = tempfile::tempdir().expect("tempdir");
    let bin = fake_systemctl(work.path(), 1);
    let out = home.run(&["install", "--binary", "/bin/true"], Some(&bin));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("`systemctl --user daemon-reload` failed"),
        "{}",
        stderr(&out)
    );
    // Only the first command ran.
    assert_eq!(
        std::fs::read_to_string(work.path().join("systemctl.log")).expect("log"),
        "--user daemon-reload\n"
    );
}

#[test]
fn a_missing_binary_is_refused_before_anything_is_written() {
    let home = Home::new();
    let out = home.run(&["install", "--binary", "/nonexistent/keyport"], None);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("/nonexistent/keyport is not a file"),
        "{}",
        stderr(&out)
    );
    assert_eq!(tree(home.path()), Vec::<PathBuf>::new());
}

#[test]
fn other_operating_systems_are_dry_run_only() {
    let home = Home::new();
    let out = home.run(&["install", "--target", "macos"], None);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("installing for macOS is not supported on Linux"),
        "{}",
        stderr(&out)
    );

    let out = home.run(&["install", "--target", "macos", "--dry-run"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("<string>org.keyport.agent</string>"),
        "{text}"
    );
    assert!(text.contains("launchctl bootstrap gui/UID "), "{text}");

    let out = home.run(
        &[
            "install",
            "--target",
            "windows",
            "--dry-run",
            "--binary",
            r"D:\kp\keyport.exe",
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains(r"<Command>D:\kp\keyport.exe</Command>"),
        "{text}"
    );
    assert!(
        text.contains("schtasks /Create /TN 'KeyPort Agent' /XML"),
        "{text}"
    );
    assert_eq!(tree(home.path()), Vec::<PathBuf>::new());
}

#[test]
fn purge_removes_config_and_data_and_dry_run_shows_it() {
    let home = Home::new();
    let work = tempfile::tempdir().expect("tempdir");
    let bin = fake_systemctl(work.path(), 0);
    let out = home.run(&["install", "--binary", "/bin/true"], Some(&bin));
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::write(home.path().join(".config/keyport/origins.toml"), "").expect("write");
    std::fs::write(home.path().join(".local/share/keyport/audit.log"), "").expect("write");

    let out = home.run(&["uninstall", "--purge", "--dry-run"], Some(&bin));
    assert!(out.status.success(), "{}", stderr(&out));
    let h = home.path().display().to_string();
    let text = stdout(&out);
    assert!(
        text.contains(&format!(
            "rm -rf {h}/.config/keyport\nrm -rf {h}/.local/share/keyport\n"
        )),
        "{text}"
    );
    assert!(home.path().join(".config/keyport/origins.toml").exists());

    let out = home.run(&["uninstall", "--purge"], Some(&bin));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!home.path().join(".config/keyport").exists());
    assert!(!home.path().join(".local/share/keyport").exists());
    assert!(!home.unit().exists());
}

#[test]
fn system_install_is_for_root_and_dry_run_shows_the_global_unit() {
    let home = Home::new();
    let out = home.run(
        &["install", "--system", "--dry-run", "--binary", "/bin/true"],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("write /etc/systemd/user/keyport.service, mode 0644:\n"),
        "{text}"
    );
    assert!(
        text.contains("    ReadWritePaths=-%E/keyport -%h/.local/share/keyport\n"),
        "{text}"
    );
    assert!(
        text.ends_with("systemctl --global enable keyport.service\n"),
        "{text}"
    );
    let out = home.run(&["uninstall", "--system", "--dry-run"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("systemctl --global disable keyport.service   # may fail\nrm -f /etc/systemd/user/keyport.service\n"),
        "{}",
        stdout(&out)
    );
    assert_eq!(tree(home.path()), Vec::<PathBuf>::new());
    let out = home.run(
        &["install", "--system", "--target", "macos", "--dry-run"],
        None,
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--system is for Linux"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn status_names_the_unit_files_and_asks_systemctl() {
    let home = Home::new();
    let work = tempfile::tempdir().expect("tempdir");
    let bin = fake_systemctl(work.path(), 0);
    let out = home.run(&["install", "--binary", "/bin/true"], Some(&bin));
    assert!(out.status.success(), "{}", stderr(&out));
    let out = home.run(&["status"], Some(&bin));
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let h = home.path().display().to_string();
    assert!(
        text.contains(&format!(
            "  present  {h}/.config/systemd/user/keyport.service  (yours"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("  present  {h}/.local/share/keyport  (audit log")),
        "{text}"
    );
    let log = std::fs::read_to_string(work.path().join("systemctl.log")).expect("log");
    assert!(
        log.ends_with("--user is-enabled keyport.service\n--user is-active keyport.service\n"),
        "{log}"
    );
    let out = home.run(&["status", "--dry-run"], Some(&bin));
    assert!(stdout(&out).contains("would run: systemctl --user is-active keyport.service"));
    let after = std::fs::read_to_string(work.path().join("systemctl.log")).expect("log");
    assert_eq!(log, after, "a dry run ran systemctl");
}
