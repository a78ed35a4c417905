//! Native dialogs through the pinentry programs GnuPG uses (pinentry-tty, -curses, -gtk, -qt,
//! -mac, -w32), spoken over their Assuan protocol.
//!
//! The client is blocking: run it on a worker thread or in `spawn_blocking`. One pinentry
//! process shows one dialog. A dialog ends in one of four ways:
//!
//! - the user answers (a PIN, OK, or the third button of a confirm dialog);
//! - the user cancels or closes it → [`DialogError::Cancelled`];
//! - the deadline passes → the child is killed, [`DialogError::Timeout`];
//! - [`DialogCancel::cancel`] is called from another thread → the child is killed,
//!   [`DialogError::Cancelled`].
//!
//! A pinentry that exits or crashes before it answers is **not** taken as the user's "no": it is
//! reported as [`DialogError::Program`] (an `UnexpectedEof` I/O error naming the exit status), so
//! a broken dialog program shows up as a fault rather than as a refusal.
//!
//! The PIN only ever lives in [`Zeroizing`] buffers, the read buffer included, and is never
//! logged: `D` lines are traced as `[redacted]`.

use std::ffi::OsString;
use std::fmt;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use zeroize::{Zeroize, Zeroizing};

/// How long a dialog may stay open when the caller does not say.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// Assuan's line limit, in bytes, without the line feed.
const MAX_LINE: usize = 1000;
/// The longest PIN accepted, in bytes after percent-decoding.
const MAX_PIN: usize = 1024;
/// How long to wait for a pinentry to exit after `BYE` before it is killed.
const BYE_GRACE: Duration = Duration::from_secs(2);

/// libgpg-error codes pinentry answers with (the low 16 bits of an `ERR` value; the high bits
/// name the source, 5 = pinentry): `ERR 83886179` is cancelled, `ERR 83886194` not confirmed.
const GPG_ERR_TIMEOUT: u32 = 62;
const GPG_ERR_CANCELED: u32 = 99;
const GPG_ERR_NOT_CONFIRMED: u32 = 114;
const GPG_ERR_FULLY_CANCELED: u32 = 198;

/// One pinentry program and how to run it.
#[derive(Clone, Debug)]
pub struct Pinentry {
    program: PathBuf,
    args: Vec<OsString>,
    timeout: Duration,
    env: Vec<(OsString, OsString)>,
    tty_name: Option<String>,
    tty_type: Option<String>,
    lc_ctype: Option<String>,
}

/// A dialog that asks for a PIN (`GETPIN`).
///
/// Empty strings are not sent, so the pinentry shows its own default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PinDialog {
    pub title: String,
    pub description: String,
    pub prompt: String,
    /// Shown prominently above the field: the previous PIN was wrong, few tries are left.
    pub error: Option<String>,
    pub ok: String,
    pub cancel: String,
}

/// A dialog with two or three buttons (`CONFIRM`).
///
/// Empty strings are not sent, so the pinentry shows its own default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfirmDialog {
    pub title: String,
    pub description: String,
    pub error: Option<String>,
    pub ok: String,
    pub cancel: String,
    /// The third button; `None` shows only OK and Cancel.
    pub not_ok: Option<String>,
}

/// The button the user chose in a confirm dialog. Cancel (or closing the dialog) is
/// `Err(DialogError::Cancelled)`, not a choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    /// The OK button.
    Ok,
    /// The third button ([`ConfirmDialog::not_ok`]).
    NotOk,
}

/// Why a dialog gave no answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DialogError {
    /// The user said no or closed the dialog, or [`DialogCancel::cancel`] closed it.
    #[error("the user cancelled the dialog")]
    Cancelled,
    /// The user did not answer before the deadline; the dialog was closed.
    #[error("the user did not answer in time")]
    Timeout,
    /// The pinentry program could not be started, or exited or failed before it answered.
    #[error("pinentry program {}: {source}", program.display())]
    Program {
        program: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The pinentry answered with an error other than cancel or timeout, e.g. it found no
    /// display or terminal to show the dialog on.
    #[error("pinentry could not show the dialog: {message} (error {code})")]
    Pinentry { code: u32, message: String },
    /// The pinentry said something the Assuan protocol does not allow here.
    #[error("pinentry protocol error: {0}")]
    Protocol(String),
}

/// A handle that closes an open dialog from another thread.
///
/// Clone it, hand one clone to the code that shows the dialog and keep the other. After
/// [`cancel`](Self::cancel) every dialog shown with this handle, open or later, ends with
/// [`DialogError::Cancelled`]: use one handle per request.
#[derive(Clone, Default)]
pub struct DialogCancel {
    inner: Arc<Mutex<CancelState>>,
}

#[derive(Default)]
struct CancelState {
    cancelled: bool,
    open: Vec<mpsc::Sender<Event>>,
}

impl fmt::Debug for DialogCancel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DialogCancel")
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

impl DialogCancel {
    pub fn new() -> Self {
        Self::default()
    }

    /// Closes the dialogs open under this handle (their pinentry is killed) and makes any later
    /// dialog under it end at once.
    pub fn cancel(&self) {
        let mut state = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        state.cancelled = true;
        for waiter in state.open.drain(..) {
            // A closed receiver means that dialog has already ended: nothing to wake.
            let _ = waiter.send(Event::Cancelled);
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .cancelled
    }

    /// Registers an open dialog; `false` if the handle is already cancelled.
    fn register(&self, waiter: mpsc::Sender<Event>) -> bool {
        let mut state = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if state.cancelled {
            return false;
        }
        state.open.push(waiter);
        true
    }
}

impl Pinentry {
    /// A pinentry at `program` (a path, or a name looked up in `PATH`), with the default
    /// 120 s timeout, inheriting the agent's environment.
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Self {
            program: program.into(),
            args: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            env: Vec::new(),
            tty_name: None,
            tty_type: None,
            lc_ctype: None,
        }
    }

    /// Adds a command-line argument for the program (e.g. `--display`); none by default.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// How long a dialog may stay open, from the start of the program to the answer.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets one more environment variable for the pinentry (e.g. `DISPLAY`).
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// The terminal a text pinentry should use (`OPTION ttyname`).
    pub fn tty_name(mut self, tty: impl Into<String>) -> Self {
        self.tty_name = Some(tty.into());
        self
    }

    /// The terminal's type (`OPTION ttytype`), e.g. `xterm-256color`.
    pub fn tty_type(mut self, kind: impl Into<String>) -> Self {
        self.tty_type = Some(kind.into());
        self
    }

    /// The character set of the terminal (`OPTION lc-ctype`), e.g. `C.UTF-8`.
    pub fn lc_ctype(mut self, ctype: impl Into<String>) -> Self {
        self.lc_ctype = Some(ctype.into());
        self
    }

    /// Fills the terminal options from this process's environment, as GnuPG does:
    /// `GPG_TTY`, `TERM`, and `LC_ALL`/`LC_CTYPE`/`LANG`. Variables that are unset are skipped.
    pub fn terminal_from_env(mut self) -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        if let Some(tty) = var("GPG_TTY") {
            self.tty_name = Some(tty);
        }
        if let Some(term) = var("TERM") {
            self.tty_type = Some(term);
        }
        if let Some(ctype) = var("LC_ALL")
            .or_else(|| var("LC_CTYPE"))
            .or_else(|| var("LANG"))
        {
            self.lc_ctype = Some(ctype);
        }
        self
    }

    pub fn program(&self) -> &Path {
        &self.program
    }

    /// Shows `dialog` and returns the PIN the user typed.
    pub fn get_pin(
        &self,
        dialog: &PinDialog,
        cancel: &DialogCancel,
    ) -> Result<Zeroizing<String>, DialogError> {
        let mut session = self.open(cancel)?;
        session.set("SETTITLE", &dialog.title)?;
        session.set("SETDESC", &dialog.description)?;
        session.set("SETPROMPT", &dialog.prompt)?;
        if let Some(error) = &dialog.error {
            session.set("SETERROR", error)?;
        }
        session.set("SETOK", &dialog.ok)?;
        session.set("SETCANCEL", &dialog.cancel)?;

        let mut pin = Zeroizing::new(Vec::with_capacity(MAX_PIN));
        session.send("GETPIN", None)?;
        match session.reply(Some(&mut pin))? {
            Reply::Ok => {}
            Reply::Err { code, message } => return Err(error_for(code, message)),
        }
        session.bye();
        let bytes = std::mem::take(&mut *pin);
        match String::from_utf8(bytes) {
            Ok(pin) => Ok(Zeroizing::new(pin)),
            Err(not_utf8) => {
                not_utf8.into_bytes().zeroize();
                Err(DialogError::Protocol("the PIN is not UTF-8".into()))
            }
        }
    }

    /// Shows `dialog` and returns the button chosen; Cancel is `Err(DialogError::Cancelled)`.
    pub fn confirm(
        &self,
        dialog: &ConfirmDialog,
        cancel: &DialogCancel,
    ) -> Result<Choice, DialogError> {
        let mut session = self.open(cancel)?;
        session.set("SETTITLE", &dialog.title)?;
        session.set("SETDESC", &dialog.description)?;
        if let Some(error) = &dialog.error {
            session.set("SETERROR", error)?;
        }
        session.set("SETOK", &dialog.ok)?;
        session.set("SETCANCEL", &dialog.cancel)?;
        if let Some(not_ok) = &dialog.not_ok {
            session.set("SETNOTOK", not_ok)?;
        }
        session.send("CONFIRM", None)?;
        let choice = match session.reply(None)? {
            Reply::Ok => Choice::Ok,
            Reply::Err { code, .. } if gpg_code(code) == GPG_ERR_NOT_CONFIRMED => Choice::NotOk,
            Reply::Err { code, message } => return Err(error_for(code, message)),
        };
        session.bye();
        Ok(choice)
    }

    /// Starts the program, reads its greeting and sends the options and the timeout.
    fn open<'a>(&'a self, cancel: &DialogCancel) -> Result<Session<'a>, DialogError> {
        let deadline = Instant::now() + self.timeout;
        let (events_tx, events) = mpsc::channel();
        if !cancel.register(events_tx.clone()) {
            return Err(DialogError::Cancelled);
        }
        let program_error = |source| DialogError::Program {
            program: self.program.clone(),
            source,
        };
        let mut child = Command::new(&self.program)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(program_error)?;
        tracing::debug!(program = %self.program.display(), pid = child.id(), "pinentry started");
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            kill(&mut child);
            return Err(program_error(io::Error::other("no pipes to the child")));
        };
        let mut session = Session {
            program: &self.program,
            child,
            stdin,
            events,
            deadline,
            ended: false,
        };
        if let Err(source) = spawn_reader(stdout, events_tx) {
            return Err(program_error(source));
        }

        match session.reply(None)? {
            Reply::Ok => {}
            Reply::Err { code, message } => return Err(DialogError::Pinentry { code, message }),
        }
        let options = [
            ("ttyname", &self.tty_name),
            ("ttytype", &self.tty_type),
            ("lc-ctype", &self.lc_ctype),
        ];
        for (name, value) in options {
            if let Some(value) = value {
                // An option the pinentry does not know is no reason to show no dialog.
                session.send("OPTION", Some(&format!("{name}={value}")))?;
                if let Reply::Err { message, .. } = session.reply(None)? {
                    tracing::debug!(option = name, %message, "pinentry refused an option");
                }
            }
        }
        let seconds = self.timeout.as_secs() + u64::from(self.timeout.subsec_nanos() > 0);
        session.send("SETTIMEOUT", Some(&seconds.to_string()))?;
        if let Reply::Err { message, .. } = session.reply(None)? {
            tracing::debug!(%message, "pinentry refused SETTIMEOUT; the agent's deadline still holds");
        }
        Ok(session)
    }
}

/// What the thread reading the pinentry's stdout reports, and what [`DialogCancel`] sends.
enum Event {
    Line(Zeroizing<Vec<u8>>),
    Closed(Option<io::Error>),
    Cancelled,
}

/// One line of the server's answer, parsed.
enum Reply {
    Ok,
    Err { code: u32, message: String },
}

/// One running pinentry. Dropping it kills the child unless it already ended cleanly.
struct Session<'a> {
    program: &'a Path,
    child: Child,
    stdin: ChildStdin,
    events: mpsc::Receiver<Event>,
    deadline: Instant,
    ended: bool,
}

impl Session<'_> {
    /// Sends `CMD text` unless `text` is empty, and requires OK.
    fn set(&mut self, command: &str, text: &str) -> Result<(), DialogError> {
        if text.is_empty() {
            return Ok(());
        }
        self.send(command, Some(text))?;
        match self.reply(None)? {
            Reply::Ok => Ok(()),
            Reply::Err { code, message } => Err(DialogError::Protocol(format!(
                "{command} refused: {message} (error {code})"
            ))),
        }
    }

    fn send(&mut self, command: &str, arg: Option<&str>) -> Result<(), DialogError> {
        let mut line = String::with_capacity(MAX_LINE + 1);
        line.push_str(command);
        if let Some(arg) = arg {
            line.push(' ');
            escape_into(&mut line, arg, MAX_LINE);
        }
        tracing::trace!(">>> {line}");
        line.push('\n');
        let written = self
            .stdin
            .write_all(line.as_bytes())
            .and_then(|()| self.stdin.flush());
        written.map_err(|source| self.died(source))
    }

    /// Reads until the answer to the last command. `D` lines go into `data` (percent-decoded)
    /// when the command expects data, and are a protocol error otherwise.
    fn reply(&mut self, mut data: Option<&mut Zeroizing<Vec<u8>>>) -> Result<Reply, DialogError> {
        loop {
            let now = Instant::now();
            let event = match self
                .events
                .recv_timeout(self.deadline.saturating_duration_since(now))
            {
                Ok(event) => event,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    tracing::debug!("pinentry deadline passed; closing the dialog");
                    self.kill();
                    return Err(DialogError::Timeout);
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(self.died(io::Error::other("reader thread ended")));
                }
            };
            let line = match event {
                Event::Line(line) => line,
                Event::Cancelled => {
                    tracing::debug!("dialog cancelled by the agent");
                    self.kill();
                    return Err(DialogError::Cancelled);
                }
                Event::Closed(error) => {
                    let error = error.unwrap_or_else(|| {
                        io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "pinentry exited before answering",
                        )
                    });
                    return Err(self.died(error));
                }
            };
            if line.as_slice() == b"OK" || line.starts_with(b"OK ") {
                tracing::trace!("<<< {}", String::from_utf8_lossy(&line));
                return Ok(Reply::Ok);
            }
            if let Some(rest) = line.strip_prefix(b"ERR ") {
                tracing::trace!("<<< {}", String::from_utf8_lossy(&line));
                return parse_err(rest);
            }
            if let Some(encoded) = line.strip_prefix(b"D ") {
                tracing::trace!("<<< D [redacted]");
                let Some(data) = data.as_deref_mut() else {
                    return Err(DialogError::Protocol(
                        "data line where none was expected".into(),
                    ));
                };
                percent_decode_into(encoded, data)?;
                continue;
            }
            if line.starts_with(b"S ") || line.starts_with(b"#") || line.as_slice() == b"S" {
                tracing::trace!("<<< {}", String::from_utf8_lossy(&line));
                continue;
            }
            if line.starts_with(b"INQUIRE ") {
                // We set nothing that asks back (no quality bar): decline.
                tracing::trace!("<<< {}", String::from_utf8_lossy(&line));
                self.send("CAN", None)?;
                continue;
            }
            return Err(DialogError::Protocol(format!(
                "unexpected line from pinentry: {:?}",
                String::from_utf8_lossy(&line[..line.len().min(80)])
            )));
        }
    }

    /// Says goodbye and lets the pinentry exit by itself, killing it only if it lingers.
    fn bye(mut self) {
        if self.send("BYE", None).is_ok() {
            let grace = Instant::now() + BYE_GRACE;
            loop {
                let wait = grace.saturating_duration_since(Instant::now());
                match self.events.recv_timeout(wait) {
                    Ok(Event::Line(_)) | Ok(Event::Cancelled) => continue,
                    Ok(Event::Closed(_)) | Err(_) => break,
                }
            }
        }
        // After EOF on its stdout the child has exited or is about to; kill() is a no-op for a
        // child that already exited, and wait() reaps it.
        self.kill();
    }

    /// The I/O error of a dead pinentry, with its exit status when it has one.
    fn died(&mut self, source: io::Error) -> DialogError {
        // A child that already exited keeps its own status: SIGKILL does not change the code
        // of a process that is exiting.
        let source = match self.kill() {
            Some(status) => io::Error::new(source.kind(), format!("{source} ({status})")),
            None => source,
        };
        DialogError::Program {
            program: self.program.to_path_buf(),
            source,
        }
    }

    fn kill(&mut self) -> Option<ExitStatus> {
        if self.ended {
            return None;
        }
        self.ended = true;
        kill(&mut self.child)
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// Reads a pinentry's whole answer stream the way a session does — lines split by
/// [`LineReader`], `D` lines percent-decoded, `ERR` lines parsed — and returns the first final
/// answer. For the fuzzer (`fuzz/fuzz_targets/pinentry_reply.rs`): the same parsers, no process.
#[doc(hidden)]
pub fn parse_reply_stream(stream: &[u8]) -> Result<Option<(bool, u32)>, DialogError> {
    let mut reader = LineReader::new(stream);
    let mut data = Zeroizing::new(Vec::with_capacity(MAX_PIN));
    while let Some(line) = reader
        .next_line()
        .map_err(|e| DialogError::Protocol(e.to_string()))?
    {
        if line.as_slice() == b"OK" || line.starts_with(b"OK ") {
            return Ok(Some((true, 0)));
        }
        if let Some(rest) = line.strip_prefix(b"ERR ") {
            return match parse_err(rest)? {
                Reply::Err { code, .. } => Ok(Some((false, gpg_code(code)))),
                Reply::Ok => Ok(Some((true, 0))),
            };
        }
        if let Some(encoded) = line.strip_prefix(b"D ") {
            percent_decode_into(encoded, &mut data)?;
        }
    }
    Ok(None)
}

/// Kills (if still running) and reaps the child.
fn kill(child: &mut Child) -> Option<ExitStatus> {
    if let Err(error) = child.kill() {
        tracing::debug!(%error, "could not kill pinentry");
    }
    match child.wait() {
        Ok(status) => Some(status),
        Err(error) => {
            tracing::debug!(%error, "could not reap pinentry");
            None
        }
    }
}

/// Reads the pinentry's stdout on its own thread, so the session can wait for a line, a
/// cancel or the deadline at once. The thread ends at EOF (the child exited or was killed) or
/// when the session is gone.
fn spawn_reader(stdout: ChildStdout, events: mpsc::Sender<Event>) -> io::Result<()> {
    thread::Builder::new()
        .name("pinentry-reader".into())
        .spawn(move || {
            let mut reader = LineReader::new(stdout);
            loop {
                let event = match reader.next_line() {
                    Ok(Some(line)) => Event::Line(line),
                    Ok(None) => Event::Closed(None),
                    Err(error) => Event::Closed(Some(error)),
                };
                let last = matches!(event, Event::Closed(_));
                if events.send(event).is_err() || last {
                    return;
                }
            }
        })
        .map(drop)
}

/// Splits a byte stream into Assuan lines without ever copying them into memory that is not
/// wiped: both the buffer and every line handed out are [`Zeroizing`].
struct LineReader<R> {
    inner: R,
    buf: Zeroizing<Vec<u8>>,
    start: usize,
    end: usize,
}

impl<R: Read> LineReader<R> {
    fn new(inner: R) -> Self {
        Self {
            inner,
            // A full line, its LF and a CR some peers add; fixed size so it never reallocates.
            buf: Zeroizing::new(vec![0; MAX_LINE + 24]),
            start: 0,
            end: 0,
        }
    }

    /// The next line without its line ending; `None` at a clean EOF.
    fn next_line(&mut self) -> io::Result<Option<Zeroizing<Vec<u8>>>> {
        loop {
            let pending = &self.buf[self.start..self.end];
            if let Some(newline) = pending.iter().position(|&b| b == b'\n') {
                let mut line = &pending[..newline];
                if let Some(without_cr) = line.strip_suffix(b"\r") {
                    line = without_cr;
                }
                let line = Zeroizing::new(line.to_vec());
                self.start += newline + 1;
                return Ok(Some(line));
            }
            if pending.len() > MAX_LINE + 1 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "pinentry sent a line longer than Assuan allows",
                ));
            }
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let read = match self.inner.read(&mut self.buf[self.end..]) {
                Ok(read) => read,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(error),
            };
            if read == 0 {
                return if self.end == 0 {
                    Ok(None)
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "pinentry exited in the middle of a line",
                    ))
                };
            }
            self.end += read;
        }
    }
}

/// Appends `text` to `line`, percent-escaping `%`, CR and LF, and cutting it (at a character
/// boundary, ending in `…`) so the whole line stays within `limit` bytes.
fn escape_into(line: &mut String, text: &str, limit: usize) {
    const ELLIPSIS: &str = "…";
    let escaped_len = |c: char| match c {
        '%' | '\r' | '\n' => 3,
        c => c.len_utf8(),
    };
    let full: usize = text.chars().map(escaped_len).sum();
    let budget = limit.saturating_sub(line.len());
    let (budget, cut) = if full <= budget {
        (budget, false)
    } else {
        (budget.saturating_sub(ELLIPSIS.len()), true)
    };
    let mut used = 0;
    for c in text.chars() {
        used += escaped_len(c);
        if used > budget {
            break;
        }
        match c {
            '%' => line.push_str("%25"),
            '\r' => line.push_str("%0D"),
            '\n' => line.push_str("%0A"),
            c => line.push(c),
        }
    }
    if cut {
        line.push_str(ELLIPSIS);
    }
}

/// Decodes `%XX` escapes of a data line into `out`, which never grows past [`MAX_PIN`] (so it
/// never reallocates and leaves no unwiped copy behind).
fn percent_decode_into(encoded: &[u8], out: &mut Zeroizing<Vec<u8>>) -> Result<(), DialogError> {
    let mut i = 0;
    while i < encoded.len() {
        let byte = if encoded[i] == b'%' {
            let hex = encoded
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| DialogError::Protocol("bad percent escape in a data line".into()))?;
            i += 3;
            hex
        } else {
            i += 1;
            encoded[i - 1]
        };
        if out.len() >= MAX_PIN {
            return Err(DialogError::Protocol("the PIN is too long".into()));
        }
        out.push(byte);
    }
    Ok(())
}

/// Parses what follows `ERR `: a decimal error value, then a (percent-escaped) description.
fn parse_err(rest: &[u8]) -> Result<Reply, DialogError> {
    let text = String::from_utf8_lossy(rest);
    let (code, message) = text.split_once(' ').unwrap_or((&text, ""));
    let code = code
        .parse()
        .map_err(|_| DialogError::Protocol(format!("bad error line: ERR {text}")))?;
    let mut decoded = Zeroizing::new(Vec::with_capacity(MAX_PIN));
    let message = match percent_decode_into(message.as_bytes(), &mut decoded) {
        Ok(()) => String::from_utf8_lossy(&decoded).into_owned(),
        Err(_) => message.to_owned(),
    };
    Ok(Reply::Err { code, message })
}

/// The libgpg-error code in an Assuan error value (its low 16 bits; the rest is the source).
fn gpg_code(value: u32) -> u32 {
    value & 0xFFFF
}

/// The dialog outcome an `ERR` answer to `GETPIN` or `CONFIRM` means.
fn error_for(value: u32, message: String) -> DialogError {
    match gpg_code(value) {
        GPG_ERR_CANCELED | GPG_ERR_FULLY_CANCELED | GPG_ERR_NOT_CONFIRMED => DialogError::Cancelled,
        GPG_ERR_TIMEOUT => DialogError::Timeout,
        _ => DialogError::Pinentry {
            code: value,
            message,
        },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test fails by panicking
mod tests {
    use super::*;

    fn escaped(text: &str, limit: usize) -> String {
        let mut line = String::from("SETDESC ");
        escape_into(&mut line, text, limit);
        line
    }

    #[test]
    fn escapes_percent_cr_lf_only() {
        assert_eq!(
            escaped("100% «sure»\r\nnext", MAX_LINE),
            "SETDESC 100%25 «sure»%0D%0Anext"
        );
    }

    #[test]
    fn long_text_is_cut_within_the_line_limit_at_a_char_boundary() {
        let text = "签".repeat(400) + "%";
        let line = escaped(&text, MAX_LINE);
        assert!(line.len() <= MAX_LINE, "{} bytes", line.len());
        assert!(line.ends_with('…'));
        assert!(!line.contains('%'), "an escape must not be cut in half");
        // Short text is untouched.
        assert_eq!(escaped("abc", MAX_LINE), "SETDESC abc");
    }

    #[test]
    fn decodes_data_lines() {
        let mut out = Zeroizing::new(Vec::with_capacity(MAX_PIN));
        percent_decode_into(b"12%2534%0A%0d", &mut out).unwrap();
        assert_eq!(out.as_slice(), b"12%34\n\r");
        let mut out = Zeroizing::new(Vec::with_capacity(MAX_PIN));
        assert!(percent_decode_into(b"12%2", &mut out).is_err());
        assert!(percent_decode_into(b"%zz", &mut out).is_err());
    }

    #[test]
    fn decoding_refuses_an_overlong_pin_without_reallocating() {
        let mut out = Zeroizing::new(Vec::with_capacity(MAX_PIN));
        let capacity = out.capacity();
        let long = vec![b'1'; MAX_PIN + 1];
        assert!(percent_decode_into(&long, &mut out).is_err());
        assert_eq!(out.capacity(), capacity);
    }

    #[test]
    fn error_values_map_to_outcomes() {
        assert!(matches!(
            error_for(83886179, String::new()),
            DialogError::Cancelled
        ));
        assert!(matches!(
            error_for(83886142, String::new()),
            DialogError::Timeout
        ));
        assert!(matches!(
            error_for(83918950, "Inappropriate ioctl for device".into()),
            DialogError::Pinentry { code: 83918950, .. }
        ));
        assert_eq!(gpg_code(83886194), GPG_ERR_NOT_CONFIRMED);
        let Ok(Reply::Err { code, message }) =
            parse_err(b"83886179 Operation cancelled%0A<Pinentry>")
        else {
            panic!("not parsed");
        };
        assert_eq!(code, 83886179);
        assert_eq!(message, "Operation cancelled\n<Pinentry>");
    }

    #[test]
    fn line_reader_splits_lines_and_strips_cr() {
        let input: &[u8] = b"OK hello\r\nD 1234\nOK";
        let mut reader = LineReader::new(input);
        assert_eq!(reader.next_line().unwrap().unwrap().as_slice(), b"OK hello");
        assert_eq!(reader.next_line().unwrap().unwrap().as_slice(), b"D 1234");
        // A partial last line is an error, not an answer.
        assert!(reader.next_line().is_err());
        let mut reader = LineReader::new(&b"OK\n"[..]);
        assert!(reader.next_line().unwrap().is_some());
        assert!(reader.next_line().unwrap().is_none());
    }

    #[test]
    fn line_reader_refuses_overlong_lines() {
        let input = vec![b'x'; 5000];
        let mut reader = LineReader::new(&input[..]);
        assert_eq!(
            reader.next_line().unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }

    /// A fake pinentry written in sh, fed the protocol on its stdin.
    fn sh_pinentry(body: &str) -> Pinentry {
        Pinentry::new("/bin/sh")
            .arg("-c")
            .arg(body)
            .timeout(Duration::from_secs(10))
    }

    const ANSWER_OK: &str = r#"echo "OK hi"
while read -r cmd arg; do
  case "$cmd" in
    GETPIN) printf 'S PASSWORD_FROM_CACHE\n# comment\nD 12%%2534\nOK\n' ;;
    CONFIRM) echo "ERR 83886194 Not confirmed <Pinentry>" ;;
    BYE) echo "OK closing connection"; exit 0 ;;
    *) echo OK ;;
  esac
done"#;

    #[test]
    fn talks_to_a_fake_peer_over_pipes() {
        let pinentry = sh_pinentry(ANSWER_OK).tty_name("/dev/null");
        let pin = pinentry
            .get_pin(&PinDialog::default(), &DialogCancel::new())
            .unwrap();
        assert_eq!(pin.as_str(), "12%34");
        let choice = pinentry
            .confirm(&ConfirmDialog::default(), &DialogCancel::new())
            .unwrap();
        assert_eq!(choice, Choice::NotOk);
    }

    #[test]
    fn a_peer_that_exits_early_is_a_program_error() {
        let pinentry = sh_pinentry("echo 'OK hi'; read -r line; exit 3");
        let err = pinentry
            .confirm(
                &ConfirmDialog {
                    title: "t".into(),
                    ..ConfirmDialog::default()
                },
                &DialogCancel::new(),
            )
            .unwrap_err();
        let DialogError::Program { source, .. } = err else {
            panic!("{err:?}");
        };
        assert_eq!(source.kind(), io::ErrorKind::UnexpectedEof);
        assert!(source.to_string().contains("exit status: 3"), "{source}");
    }

    #[test]
    fn a_missing_program_is_a_program_error() {
        let err = Pinentry::new("/nonexistent/pinentry")
            .confirm(&ConfirmDialog::default(), &DialogCancel::new())
            .unwrap_err();
        assert!(matches!(err, DialogError::Program { .. }), "{err:?}");
    }

    #[test]
    fn a_cancelled_handle_shows_no_dialog() {
        let cancel = DialogCancel::new();
        cancel.cancel();
        let err = Pinentry::new("/nonexistent/pinentry")
            .get_pin(&PinDialog::default(), &cancel)
            .unwrap_err();
        assert!(matches!(err, DialogError::Cancelled));
    }
}
