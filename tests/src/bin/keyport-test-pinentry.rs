//! A pinentry for tests: speaks real Assuan on stdin/stdout and answers `GETPIN`/`CONFIRM`
//! from the scenario named by `KEYPORT_PINENTRY_SCRIPT`, logging every command it receives to
//! `KEYPORT_PINENTRY_LOG` (see `keyport_e2e::pinentry`). The PIN itself is never logged.
#![forbid(unsafe_code)]

use std::io::{self, BufRead, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use keyport_e2e::pinentry::{append_log, take_step, Button, Command, Step, LOG_ENV, SCRIPT_ENV};
use serde_json::json;

/// Assuan error values pinentry uses (source 5 = pinentry, then the libgpg-error code).
const ERR_CANCELED: &str = "ERR 83886179 Operation cancelled <Pinentry>";
const ERR_NOT_CONFIRMED: &str = "ERR 83886194 Not confirmed <Pinentry>";
const ERR_UNKNOWN_COMMAND: &str = "ERR 83886355 Unknown IPC command <Pinentry>";
/// GPG_ERR_GENERAL: a scenario mistake, so that the test sees it.
const ERR_SCRIPT: u32 = 83886081;

/// Commands that only set something; they are logged and acknowledged.
const SETTERS: &[&str] = &[
    "OPTION",
    "SETTITLE",
    "SETDESC",
    "SETPROMPT",
    "SETERROR",
    "SETOK",
    "SETCANCEL",
    "SETNOTOK",
    "SETTIMEOUT",
    "SETKEYINFO",
    "SETREPEAT",
    "SETREPEATERROR",
    "SETQUALITYBAR",
    "SETQUALITYBAR_TT",
    "SETGENPIN",
    "SETGENPIN_TT",
    "NOP",
    "RESET",
];

fn main() -> ExitCode {
    match serve() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("keyport-test-pinentry: {error}");
            ExitCode::FAILURE
        }
    }
}

struct Pinentry {
    pid: u32,
    script: Option<PathBuf>,
    log: Option<PathBuf>,
}

fn serve() -> io::Result<()> {
    let me = Pinentry {
        pid: std::process::id(),
        script: std::env::var_os(SCRIPT_ENV).map(PathBuf::from),
        log: std::env::var_os(LOG_ENV).map(PathBuf::from),
    };
    let mut stdin = io::stdin().lock();
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "OK Pleased to meet you (keyport-test-pinentry)")?;
    stdout.flush()?;

    let mut line = String::new();
    loop {
        line.clear();
        if stdin.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let text = line.trim_end_matches(['\n', '\r']);
        let (cmd, arg) = match text.split_once(' ') {
            Some((cmd, arg)) => (cmd, Some(percent_decode(arg))),
            None => (text, None),
        };
        let answer = match cmd {
            "GETPIN" => me.dialog(Command::GetPin, &mut stdin)?,
            "CONFIRM" => me.dialog(Command::Confirm, &mut stdin)?,
            "BYE" => {
                me.log(json!({"pid": me.pid, "cmd": cmd}))?;
                writeln!(stdout, "OK closing connection")?;
                stdout.flush()?;
                return Ok(());
            }
            _ => {
                me.log(json!({"pid": me.pid, "cmd": cmd, "arg": arg}))?;
                if SETTERS.contains(&cmd) {
                    vec!["OK".to_owned()]
                } else {
                    vec![ERR_UNKNOWN_COMMAND.to_owned()]
                }
            }
        };
        for reply in answer {
            writeln!(stdout, "{reply}")?;
        }
        stdout.flush()?;
    }
}

impl Pinentry {
    /// Appends a transcript line, stamped with the wall clock (`at_us`, microseconds since the
    /// Unix epoch) so a benchmark can tell when the dialog began.
    fn log(&self, mut entry: serde_json::Value) -> io::Result<()> {
        let Some(log) = &self.log else {
            return Ok(());
        };
        if let Some(fields) = entry.as_object_mut() {
            let at_us = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros());
            fields.insert("at_us".into(), serde_json::Value::from(at_us as u64));
        }
        append_log(log, &entry)
    }

    /// Answers one `GETPIN` or `CONFIRM` from the next scenario step: the reply lines.
    fn dialog(&self, command: Command, stdin: &mut impl Read) -> io::Result<Vec<String>> {
        let cmd = command.as_str();
        let step = match &self.script {
            Some(script) => take_step(script)?,
            None => None,
        };
        let step = match step {
            None => {
                self.log(json!({"pid": self.pid, "cmd": cmd, "answered": "cancel",
                                "error": "script exhausted"}))?;
                return Ok(vec![ERR_CANCELED.to_owned()]);
            }
            Some(Err(problem)) => return self.script_error(cmd, problem),
            Some(Ok(step)) => step,
        };
        if let Some(expected) = step.expect {
            if expected != command {
                let problem = format!("expected {}, got {cmd}", expected.as_str());
                return self.script_error(cmd, problem);
            }
        }
        let (answered, reply) = match answer(command, &step) {
            Ok(answer) => answer,
            Err(problem) => return self.script_error(cmd, problem),
        };
        self.log(json!({"pid": self.pid, "cmd": cmd, "answered": answered}))?;
        match reply {
            Some(lines) => Ok(lines),
            None => {
                // Hang: never answer. Leave once the client closes our stdin (it died), so a
                // crashed test leaves no process behind.
                io::copy(stdin, &mut io::sink())?;
                std::process::exit(0);
            }
        }
    }

    fn script_error(&self, cmd: &str, problem: String) -> io::Result<Vec<String>> {
        eprintln!("keyport-test-pinentry: {problem}");
        self.log(json!({"pid": self.pid, "cmd": cmd, "answered": "error", "error": problem}))?;
        Ok(vec![format!(
            "ERR {ERR_SCRIPT} keyport-test-pinentry: {}",
            percent_encode(&problem)
        )])
    }
}

/// What a step answers to `command`: the transcript word and the reply lines (`None`: hang).
fn answer(command: Command, step: &Step) -> Result<(&'static str, Option<Vec<String>>), String> {
    if step.hang {
        return Ok(("hang", None));
    }
    if step.cancel || step.confirm == Some(Button::Cancel) {
        return Ok(("cancel", Some(vec![ERR_CANCELED.to_owned()])));
    }
    match (command, &step.pin, step.confirm) {
        (Command::GetPin, Some(pin), None) => Ok((
            "pin",
            Some(vec![format!("D {}", percent_encode(pin)), "OK".to_owned()]),
        )),
        (Command::Confirm, None, Some(Button::Ok)) => Ok(("ok", Some(vec!["OK".to_owned()]))),
        (Command::Confirm, None, Some(Button::Notok)) => {
            Ok(("notok", Some(vec![ERR_NOT_CONFIRMED.to_owned()])))
        }
        _ => Err(format!(
            "script step {} cannot answer {}",
            serde_json::to_string(step).unwrap_or_default(),
            command.as_str()
        )),
    }
}

fn percent_encode(text: &str) -> String {
    text.replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

/// Decodes `%XX`; a malformed escape is kept as is.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match hex {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
