//! Scenarios and transcripts for the scripted pinentry (`keyport-test-pinentry`).
//!
//! A test writes the answers the "user" will give, one [`Step`] per dialog command
//! (`GETPIN` or `CONFIRM`), points the agent's pinentry at [`program`] with the environment of
//! [`Script::env`], and afterwards reads what every dialog showed with [`Script::dialogs`].
//!
//! Steps are consumed in order across all pinentry processes, even concurrent ones: each process
//! takes the next line under an exclusive lock on `<script>.lock` and advances the cursor kept
//! in `<script>.cursor`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The environment variable naming the scenario file.
pub const SCRIPT_ENV: &str = "KEYPORT_PINENTRY_SCRIPT";
/// The environment variable naming the transcript file.
pub const LOG_ENV: &str = "KEYPORT_PINENTRY_LOG";
/// The name of the scripted pinentry binary.
pub const PROGRAM_NAME: &str = "keyport-test-pinentry";

/// The path of the built scripted pinentry: `$KEYPORT_TEST_PINENTRY` if set, else the binary
/// beside the running test executable (`target/<profile>/`, one level above `deps/`).
pub fn program() -> PathBuf {
    if let Some(path) = std::env::var_os("KEYPORT_TEST_PINENTRY") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(format!("{PROGRAM_NAME}{}", std::env::consts::EXE_SUFFIX))
}

/// The user's answer to one `GETPIN` or `CONFIRM`, one JSON object per scenario line:
/// `{"pin":"123456"}`, `{"confirm":"ok"|"notok"|"cancel"}`, `{"cancel":true}`, `{"hang":true}`,
/// each with an optional `"expect":"GETPIN"|"CONFIRM"`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// Type this PIN (a `GETPIN` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin: Option<String>,
    /// Press this button (a `CONFIRM`; `cancel` also answers a `GETPIN`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirm: Option<Button>,
    /// Cancel whatever dialog this is.
    #[serde(default, skip_serializing_if = "is_false")]
    pub cancel: bool,
    /// Never answer: the dialog stays open until the pinentry is killed (or its stdin closes).
    #[serde(default, skip_serializing_if = "is_false")]
    pub hang: bool,
    /// Fail loudly (an `ERR` answer and a transcript error) if the dialog is of another kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect: Option<Command>,
}

fn is_false(value: &bool) -> bool {
    !value
}

/// A button of a confirm dialog.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Button {
    Ok,
    Notok,
    Cancel,
}

/// The two dialog commands a step answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    #[serde(rename = "GETPIN")]
    GetPin,
    #[serde(rename = "CONFIRM")]
    Confirm,
}

impl Command {
    pub fn as_str(self) -> &'static str {
        match self {
            Command::GetPin => "GETPIN",
            Command::Confirm => "CONFIRM",
        }
    }
}

impl Step {
    pub fn pin(pin: impl Into<String>) -> Self {
        Self {
            pin: Some(pin.into()),
            ..Self::default()
        }
    }

    pub fn confirm(button: Button) -> Self {
        Self {
            confirm: Some(button),
            ..Self::default()
        }
    }

    pub fn cancel() -> Self {
        Self {
            cancel: true,
            ..Self::default()
        }
    }

    pub fn hang() -> Self {
        Self {
            hang: true,
            ..Self::default()
        }
    }

    /// Requires the dialog to be a `GETPIN` or a `CONFIRM`.
    pub fn expect(mut self, command: Command) -> Self {
        self.expect = Some(command);
        self
    }
}

/// One line of the transcript the scripted pinentry appends.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct Entry {
    pub pid: u32,
    /// The command received (`SETDESC`, `GETPIN`, …); absent on a line that only reports an error.
    #[serde(default)]
    pub cmd: Option<String>,
    /// The command's argument, percent-decoded.
    #[serde(default)]
    pub arg: Option<String>,
    /// For `GETPIN`/`CONFIRM`: `pin`, `ok`, `notok`, `cancel` or `hang` (never the PIN itself).
    #[serde(default)]
    pub answered: Option<String>,
    /// A scenario problem: `script exhausted`, an `expect` mismatch, a bad line.
    #[serde(default)]
    pub error: Option<String>,
    /// When the line was written: microseconds since the Unix epoch.
    #[serde(default)]
    pub at_us: Option<u64>,
}

/// Everything one pinentry process (one dialog) was told and answered.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dialog {
    pub pid: u32,
    pub title: Option<String>,
    pub description: Option<String>,
    pub prompt: Option<String>,
    /// The `SETERROR` text.
    pub error: Option<String>,
    pub ok: Option<String>,
    pub cancel: Option<String>,
    pub not_ok: Option<String>,
    pub timeout: Option<String>,
    /// `OPTION` arguments, in order (`ttyname=/dev/pts/1`, …).
    pub options: Vec<String>,
    /// `GETPIN` or `CONFIRM`, if the dialog got that far.
    pub command: Option<String>,
    pub answered: Option<String>,
    /// Scenario errors reported by this process.
    pub script_errors: Vec<String>,
}

/// A scenario file and its transcript, in a directory the test owns.
#[derive(Clone, Debug)]
pub struct Script {
    script: PathBuf,
    log: PathBuf,
}

impl Script {
    /// Creates an empty scenario `pinentry-script.jsonl` and transcript `pinentry-log.jsonl`
    /// in `dir` (replacing earlier ones).
    pub fn new(dir: &Path) -> io::Result<Self> {
        let script = dir.join("pinentry-script.jsonl");
        let log = dir.join("pinentry-log.jsonl");
        File::create(&script)?;
        File::create(&log)?;
        let cursor = cursor_path(&script);
        if cursor.exists() {
            fs::remove_file(cursor)?;
        }
        Ok(Self { script, log })
    }

    /// Appends one step to the scenario (safe while pinentries are consuming it).
    pub fn push(&self, step: &Step) -> io::Result<&Self> {
        let line = serde_json::to_string(step)?;
        let _lock = lock_script(&self.script)?;
        let mut file = OpenOptions::new().append(true).open(&self.script)?;
        writeln!(file, "{line}")?;
        Ok(self)
    }

    /// Appends several steps.
    pub fn push_all<'a>(&self, steps: impl IntoIterator<Item = &'a Step>) -> io::Result<&Self> {
        for step in steps {
            self.push(step)?;
        }
        Ok(self)
    }

    pub fn script_path(&self) -> &Path {
        &self.script
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The variables to give the pinentry (or the agent that spawns it).
    pub fn env(&self) -> [(&'static str, PathBuf); 2] {
        [
            (SCRIPT_ENV, self.script.clone()),
            (LOG_ENV, self.log.clone()),
        ]
    }

    /// How many steps have been consumed so far.
    pub fn consumed(&self) -> io::Result<usize> {
        let _lock = lock_script(&self.script)?;
        read_cursor(&self.script)
    }

    /// Every transcript line so far.
    pub fn transcript(&self) -> io::Result<Vec<Entry>> {
        let text = fs::read_to_string(&self.log)?;
        text.lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| serde_json::from_str(line).map_err(io::Error::from))
            .collect()
    }

    /// The transcript grouped into dialogs, one per pinentry process, in order of first contact.
    pub fn dialogs(&self) -> io::Result<Vec<Dialog>> {
        Ok(group_dialogs(&self.transcript()?))
    }

    /// Polls the transcript until `done` holds (e.g. "a dialog is open and hanging") or
    /// `timeout` passes; returns the transcript that satisfied it.
    pub fn wait_for(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&[Entry]) -> bool,
    ) -> io::Result<Vec<Entry>> {
        let deadline = Instant::now() + timeout;
        loop {
            let entries = self.transcript()?;
            if done(&entries) {
                return Ok(entries);
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("pinentry transcript never matched; it holds {entries:?}"),
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Groups transcript lines by process.
pub fn group_dialogs(entries: &[Entry]) -> Vec<Dialog> {
    let mut dialogs: Vec<Dialog> = Vec::new();
    for entry in entries {
        let index = match dialogs.iter().position(|d| d.pid == entry.pid) {
            Some(index) => index,
            None => {
                dialogs.push(Dialog {
                    pid: entry.pid,
                    ..Dialog::default()
                });
                dialogs.len() - 1
            }
        };
        let dialog = &mut dialogs[index];
        if let Some(error) = &entry.error {
            dialog.script_errors.push(error.clone());
        }
        let arg = entry.arg.clone();
        match entry.cmd.as_deref() {
            Some("SETTITLE") => dialog.title = arg,
            Some("SETDESC") => dialog.description = arg,
            Some("SETPROMPT") => dialog.prompt = arg,
            Some("SETERROR") => dialog.error = arg,
            Some("SETOK") => dialog.ok = arg,
            Some("SETCANCEL") => dialog.cancel = arg,
            Some("SETNOTOK") => dialog.not_ok = arg,
            Some("SETTIMEOUT") => dialog.timeout = arg,
            Some("OPTION") => dialog.options.extend(arg),
            Some(command @ ("GETPIN" | "CONFIRM")) => {
                dialog.command = Some(command.to_owned());
                if entry.answered.is_some() {
                    dialog.answered = entry.answered.clone();
                }
            }
            _ => {}
        }
    }
    dialogs
}

/// Takes the next step of the scenario at `script`, atomically across processes: `None` when
/// every step has been consumed. A line that does not parse is returned as an error message.
pub fn take_step(script: &Path) -> io::Result<Option<Result<Step, String>>> {
    let _lock = lock_script(script)?;
    let cursor = read_cursor(script)?;
    let text = fs::read_to_string(script)?;
    let Some(line) = text.lines().filter(|l| !l.trim().is_empty()).nth(cursor) else {
        return Ok(None);
    };
    fs::write(cursor_path(script), (cursor + 1).to_string())?;
    Ok(Some(
        serde_json::from_str(line).map_err(|e| format!("bad script line {line:?}: {e}")),
    ))
}

/// Appends one JSON line to the transcript under an exclusive lock on the file.
pub fn append_log(log: &Path, line: &serde_json::Value) -> io::Result<()> {
    let mut file = OpenOptions::new().create(true).append(true).open(log)?;
    file.lock()?;
    let mut text = line.to_string();
    text.push('\n');
    file.write_all(text.as_bytes())
    // The lock goes with the file handle.
}

fn cursor_path(script: &Path) -> PathBuf {
    sibling(script, "cursor")
}

fn sibling(script: &Path, extension: &str) -> PathBuf {
    let mut name = script.as_os_str().to_owned();
    name.push(".");
    name.push(extension);
    PathBuf::from(name)
}

/// An exclusive lock on `<script>.lock`, held until the file is dropped.
fn lock_script(script: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(sibling(script, "lock"))?;
    file.lock()?;
    Ok(file)
}

fn read_cursor(script: &Path) -> io::Result<usize> {
    match fs::read_to_string(cursor_path(script)) {
        Ok(text) => text
            .trim()
            .parse()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}
