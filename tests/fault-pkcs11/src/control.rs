//! The control file: which faults to inject right now.
//!
//! `key=value` lines; blank lines and lines starting with `#` are ignored. The file is read again
//! on every wrapped call, so a test changes behaviour by rewriting it (write a temporary file and
//! rename it over the old one, so that a call never sees a half-written file).

use std::path::Path;

/// Environment variable naming the control file. Unset, or naming a missing file: no faults.
pub(crate) const CONTROL_ENV: &str = "KEYPORT_FAULT_CONTROL";

/// The faults requested by the control file.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Control {
    /// C_GetTokenInfo adds CKF_USER_PIN_LOCKED; C_Login (user or context-specific) returns CKR_PIN_LOCKED.
    pub(crate) pin_locked: bool,
    /// C_GetTokenInfo adds CKF_USER_PIN_COUNT_LOW.
    pub(crate) pin_count_low: bool,
    /// C_GetTokenInfo adds CKF_USER_PIN_FINAL_TRY.
    pub(crate) pin_final_try: bool,
    /// The token is gone: slot calls return CKR_TOKEN_NOT_PRESENT, session calls CKR_DEVICE_REMOVED.
    pub(crate) token_removed: bool,
    /// Signatures after the first N (counted by the module) fail with CKR_DEVICE_ERROR.
    pub(crate) fail_sign_after: Option<u64>,
    /// C_Sign blocks until the control file no longer says `hang_sign=1`.
    pub(crate) hang_sign: bool,
    /// Abort the process when one of these functions is called (`crash_on=C_Sign,C_Login`).
    pub(crate) crash_on: Vec<String>,
    /// How `crash_on` ends the process: abort (the default), SIGSEGV, or exit(1).
    pub(crate) crash_how: CrashHow,
    /// These functions block until the control file no longer names them (`hang_on=C_GetTokenInfo`).
    pub(crate) hang_on: Vec<String>,
    /// The first call of one of these functions takes a module-wide lock that is never
    /// released, and blocks on it; from then on every wrapped call blocks on that lock, whatever
    /// the control file says later (OpenSC's deadlock after a card removal).
    pub(crate) deadlock_on: Vec<String>,
    /// C_GetTokenInfo fails with CKR_GENERAL_ERROR — and, as SoftHSM does once the process ran
    /// out of descriptors, keeps failing after this is cleared, until the next C_Initialize.
    pub(crate) general_error: bool,
    /// C_GetAttributeValue fails with CKR_OBJECT_HANDLE_INVALID — and, as SoftHSM does for the
    /// object files it could not open when it loaded the token (out of descriptors then), keeps
    /// failing after this is cleared, until the next C_Initialize.
    pub(crate) unreadable_objects: bool,
    /// Stand in for a PIN-pad reader: C_GetTokenInfo adds CKF_PROTECTED_AUTHENTICATION_PATH and
    /// C_Login with no PIN is answered as [`Control::pin_pad_entry`] says.
    pub(crate) pin_pad: bool,
    /// What the user does on the pad: type a PIN, or cancel (the default).
    pub(crate) pin_pad_entry: PadEntry,
    /// How long the user takes on the pad, in milliseconds.
    pub(crate) pin_pad_delay_ms: u64,
    /// Mechanisms the token does not have: left out of C_GetMechanismList, CKR_MECHANISM_INVALID
    /// from C_GetMechanismInfo (`hide_mechanisms=0x1055,0x1040`).
    pub(crate) hide_mechanisms: Vec<u64>,
}

/// How a `crash_on` function ends the process.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CrashHow {
    /// abort(): SIGABRT.
    #[default]
    Abort,
    /// A segmentation fault: SIGSEGV.
    Segv,
    /// exit(1), as a library that gives up would.
    Exit,
}

/// What the user does on a PIN pad.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) enum PadEntry {
    /// Presses Cancel (or lets the reader time out): CKR_FUNCTION_CANCELED.
    #[default]
    Cancel,
    /// Types this PIN: the login goes to the real module with it.
    Pin(String),
}

/// Why a control file could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ControlError(pub(crate) String);

impl Control {
    /// Reads the control file named by [`CONTROL_ENV`]; no variable or no file means no faults.
    pub(crate) fn load() -> Result<Self, ControlError> {
        match std::env::var_os(CONTROL_ENV) {
            Some(path) => Self::load_from(Path::new(&path)),
            None => Ok(Self::default()),
        }
    }

    fn load_from(path: &Path) -> Result<Self, ControlError> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                Self::parse(&text).map_err(|e| ControlError(format!("{}: {}", path.display(), e.0)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(ControlError(format!("cannot read {}: {e}", path.display()))),
        }
    }

    /// Parses the text of a control file. Unknown keys and bad values are errors, so that a typo
    /// in a test fails loudly instead of silently injecting nothing.
    pub(crate) fn parse(text: &str) -> Result<Self, ControlError> {
        let mut control = Self::default();
        for (index, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let line_no = index + 1;
            let (key, value) = line
                .split_once('=')
                .map(|(k, v)| (k.trim(), v.trim()))
                .ok_or_else(|| ControlError(format!("line {line_no}: expected key=value")))?;
            let bad = |what: &str| ControlError(format!("line {line_no}: {key}: {what}"));
            match key {
                "pin_locked" => control.pin_locked = flag(value).ok_or_else(|| bad("not 0/1"))?,
                "pin_count_low" => {
                    control.pin_count_low = flag(value).ok_or_else(|| bad("not 0/1"))?;
                }
                "pin_final_try" => {
                    control.pin_final_try = flag(value).ok_or_else(|| bad("not 0/1"))?;
                }
                "token_removed" => {
                    control.token_removed = flag(value).ok_or_else(|| bad("not 0/1"))?;
                }
                "hang_sign" => control.hang_sign = flag(value).ok_or_else(|| bad("not 0/1"))?,
                "general_error" => {
                    control.general_error = flag(value).ok_or_else(|| bad("not 0/1"))?;
                }
                "unreadable_objects" => {
                    control.unreadable_objects = flag(value).ok_or_else(|| bad("not 0/1"))?;
                }
                "pin_pad" => control.pin_pad = flag(value).ok_or_else(|| bad("not 0/1"))?,
                "pin_pad_entry" => {
                    control.pin_pad_entry = match value {
                        "cancel" => PadEntry::Cancel,
                        pin if !pin.is_empty() && pin.bytes().all(|b| b.is_ascii_graphic()) => {
                            PadEntry::Pin(pin.to_owned())
                        }
                        _ => return Err(bad("expected a PIN or `cancel`")),
                    };
                }
                "pin_pad_delay_ms" => {
                    control.pin_pad_delay_ms = value.parse().map_err(|_| bad("not a number"))?;
                }
                "fail_sign_after" => {
                    let n = value.parse().map_err(|_| bad("not a number"))?;
                    control.fail_sign_after = Some(n);
                }
                "crash_how" => {
                    control.crash_how = match value {
                        "abort" => CrashHow::Abort,
                        "segv" => CrashHow::Segv,
                        "exit" => CrashHow::Exit,
                        _ => return Err(bad("expected abort, segv or exit")),
                    };
                }
                "hang_on" => control.hang_on = function_list(value).map_err(&bad)?,
                "deadlock_on" => control.deadlock_on = function_list(value).map_err(&bad)?,
                "crash_on" => {
                    control.crash_on = value
                        .split(',')
                        .map(str::trim)
                        .filter(|name| !name.is_empty())
                        .map(|name| {
                            if name.starts_with("C_") {
                                Ok(name.to_owned())
                            } else {
                                Err(bad("expected function names like C_Sign"))
                            }
                        })
                        .collect::<Result<_, _>>()?;
                }
                "hide_mechanisms" => {
                    control.hide_mechanisms = value
                        .split(',')
                        .map(str::trim)
                        .filter(|m| !m.is_empty())
                        .map(|m| {
                            m.strip_prefix("0x")
                                .and_then(|hex| u64::from_str_radix(hex, 16).ok())
                                .ok_or_else(|| bad("expected hex mechanism numbers like 0x1055"))
                        })
                        .collect::<Result<_, _>>()?;
                }
                _ => return Err(bad("unknown key")),
            }
        }
        Ok(control)
    }

    /// Whether the process must abort when `function` is called.
    pub(crate) fn crashes_on(&self, function: &str) -> bool {
        self.crash_on.iter().any(|name| name == function)
    }

    /// Whether `function` must block while the control file says so.
    pub(crate) fn hangs_on(&self, function: &str) -> bool {
        self.hang_on.iter().any(|name| name == function)
    }

    /// Whether `function` must deadlock.
    pub(crate) fn deadlocks_on(&self, function: &str) -> bool {
        self.deadlock_on.iter().any(|name| name == function)
    }
}

/// `C_Sign, C_GetTokenInfo` → the names.
fn function_list(value: &str) -> Result<Vec<String>, &'static str> {
    value
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(|name| {
            if name.starts_with("C_") {
                Ok(name.to_owned())
            } else {
                Err("expected function names like C_Sign")
            }
        })
        .collect()
}

fn flag(value: &str) -> Option<bool> {
    match value {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_injects_nothing() {
        assert_eq!(
            Control::parse("\n# only a comment\n"),
            Ok(Control::default())
        );
    }

    #[test]
    fn every_key_parses() {
        let text = "pin_locked=1\npin_count_low = true\npin_final_try=1\ntoken_removed=1\n\
                    fail_sign_after=3\nhang_sign=1\ncrash_on=C_Sign, C_Login\n\
                    pin_pad=1\npin_pad_entry=654321\npin_pad_delay_ms=250\n\
                    crash_how=segv\nhang_on=C_GetTokenInfo\ndeadlock_on=C_Sign\n\
                    hide_mechanisms=0x1055, 0x1040\nunreadable_objects=1\n";
        let control = Control::parse(text).expect("valid control file");
        assert_eq!(
            control,
            Control {
                pin_locked: true,
                pin_count_low: true,
                pin_final_try: true,
                token_removed: true,
                fail_sign_after: Some(3),
                hang_sign: true,
                crash_on: vec!["C_Sign".to_owned(), "C_Login".to_owned()],
                crash_how: CrashHow::Segv,
                hang_on: vec!["C_GetTokenInfo".to_owned()],
                deadlock_on: vec!["C_Sign".to_owned()],
                general_error: false,
                unreadable_objects: true,
                pin_pad: true,
                pin_pad_entry: PadEntry::Pin("654321".to_owned()),
                pin_pad_delay_ms: 250,
                hide_mechanisms: vec![0x1055, 0x1040],
            }
        );
        assert!(control.crashes_on("C_Login"));
        assert!(!control.crashes_on("C_SignInit"));
    }

    #[test]
    fn zero_turns_a_flag_off() {
        let control = Control::parse("pin_locked=0\nhang_sign=off").expect("valid control file");
        assert!(!control.pin_locked);
        assert!(!control.hang_sign);
    }

    #[test]
    fn mistakes_are_errors() {
        for text in [
            "pin_lockd=1",
            "pin_locked",
            "pin_locked=2",
            "fail_sign_after=-1",
            "crash_on=Sign",
            "pin_pad_entry=",
            "pin_pad_delay_ms=soon",
            "crash_how=explode",
            "hang_on=Sign",
            "deadlock_on=C_Sign,x",
        ] {
            assert!(Control::parse(text).is_err(), "{text:?} should be rejected");
        }
    }

    #[test]
    fn missing_file_injects_nothing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let control = Control::load_from(&dir.path().join("absent")).expect("absent file is fine");
        assert_eq!(control, Control::default());
    }
}
