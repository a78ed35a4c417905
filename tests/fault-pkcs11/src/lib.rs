//! keyport-fault-pkcs11: a test-only PKCS#11 module that forwards every call to a real module
//! (SoftHSM by default) and injects faults on command. See README.md beside this crate.
//!
//! - `KEYPORT_FAULT_TARGET`: the real module (default `/usr/lib/softhsm/libsofthsm2.so`).
//! - `KEYPORT_FAULT_CONTROL`: the control file, re-read on every wrapped call (see [`control`]).
//! - `KEYPORT_FAULT_LOG`: if set, one line `C_Name rv=0x000000A0` is appended per wrapped call.
//!
//! This crate is a C ABI module, so unlike the rest of the workspace it uses `unsafe`; every
//! unsafe block states why it is sound (`clippy::undocumented_unsafe_blocks` is denied).

mod control;
mod functions;

use std::ffi::OsString;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use cryptoki_sys::{CKR_ARGUMENTS_BAD, CKR_GENERAL_ERROR, CKR_OK, CK_FUNCTION_LIST, CK_RV};

use crate::control::{Control, CrashHow};

const TARGET_ENV: &str = "KEYPORT_FAULT_TARGET";
const LOG_ENV: &str = "KEYPORT_FAULT_LOG";
const DEFAULT_TARGET: &str = "/usr/lib/softhsm/libsofthsm2.so";
const MESSAGE_PREFIX: &str = "keyport-fault-pkcs11";

/// Returns this module's function list: the target's list with some entries wrapped.
///
/// # Safety
/// `list` must be null or valid for writing one pointer (the PKCS#11 contract).
#[no_mangle]
pub unsafe extern "C" fn C_GetFunctionList(list: *mut *mut CK_FUNCTION_LIST) -> CK_RV {
    if list.is_null() {
        return CKR_ARGUMENTS_BAD;
    }
    match target() {
        Ok(target) => {
            // SAFETY: `list` is non-null and, by the caller's contract, valid for one write. The
            // list we hand out lives in a static for the rest of the process; PKCS#11 callers
            // only read it, so exposing it as `*mut` (the C signature) is sound.
            unsafe { *list = std::ptr::from_ref(&target.ours).cast_mut() };
            CKR_OK
        }
        Err(message) => {
            eprintln!("{MESSAGE_PREFIX}: {message}");
            CKR_GENERAL_ERROR
        }
    }
}

/// The loaded real module.
struct Target {
    /// Keeps the real module mapped for as long as the copied function pointers are used.
    _library: libloading::Library,
    /// The real module's own function list.
    real: CK_FUNCTION_LIST,
    /// The list handed to callers: `real` with the wrapped entries replaced.
    ours: CK_FUNCTION_LIST,
}

/// The real module, loaded on first use and kept for the life of the process.
fn target() -> Result<&'static Target, &'static str> {
    static TARGET: OnceLock<Result<Target, String>> = OnceLock::new();
    TARGET
        .get_or_init(load_target)
        .as_ref()
        .map_err(String::as_str)
}

fn load_target() -> Result<Target, String> {
    let path = std::env::var_os(TARGET_ENV).unwrap_or_else(|| OsString::from(DEFAULT_TARGET));
    let shown = path.to_string_lossy().into_owned();
    // SAFETY: loading a shared library runs its initialisers. The target is a PKCS#11 module
    // chosen by the test that loaded us; such modules are made to be dlopen()ed.
    let library = unsafe { libloading::Library::new(&path) }
        .map_err(|e| format!("cannot load target module {shown}: {e}"))?;
    type GetFunctionList = unsafe extern "C" fn(*mut *mut CK_FUNCTION_LIST) -> CK_RV;
    // SAFETY: every PKCS#11 module exports C_GetFunctionList with exactly this signature.
    let get_function_list = unsafe { library.get::<GetFunctionList>(b"C_GetFunctionList\0") }
        .map_err(|e| format!("{shown} has no C_GetFunctionList: {e}"))?;
    let mut list: *mut CK_FUNCTION_LIST = std::ptr::null_mut();
    // SAFETY: `list` is a valid out-pointer for the duration of the call.
    let rv = unsafe { get_function_list(&mut list) };
    if rv != CKR_OK || list.is_null() {
        return Err(format!(
            "C_GetFunctionList of {shown} failed: rv=0x{rv:08X}"
        ));
    }
    // SAFETY: the module returned a non-null pointer to its function list, which stays valid
    // while the library is loaded; we copy it out immediately.
    let real = unsafe { *list };
    Ok(Target {
        _library: library,
        real,
        ours: functions::wrap(real),
    })
}

/// What a wrapper works with: the real functions and the faults asked for right now.
pub(crate) struct Call {
    pub(crate) real: &'static CK_FUNCTION_LIST,
    pub(crate) control: Control,
}

/// Runs one wrapped call: loads the control file, aborts if asked to, lets `body` decide the
/// result (inject or forward), and logs `name rv=0x...`.
pub(crate) fn call(name: &'static str, body: impl FnOnce(&mut Call) -> CK_RV) -> CK_RV {
    call_noted(name, "", body)
}

/// [`call`] with a note logged between the name and the result (`C_Login CKU_USER null-pin
/// rv=…`); never a PIN.
pub(crate) fn call_noted(
    name: &'static str,
    note: &str,
    body: impl FnOnce(&mut Call) -> CK_RV,
) -> CK_RV {
    let rv = match (target(), Control::load()) {
        (Err(message), _) => {
            eprintln!("{MESSAGE_PREFIX}: {message}");
            CKR_GENERAL_ERROR
        }
        (_, Err(error)) => {
            eprintln!("{MESSAGE_PREFIX}: bad control file: {}", error.0);
            CKR_GENERAL_ERROR
        }
        (Ok(target), Ok(control)) => {
            if DEADLOCKED.load(Ordering::SeqCst) || control.deadlocks_on(name) {
                deadlock(name);
            }
            if control.crashes_on(name) {
                log_line(&format!("{name} crash"));
                crash(control.crash_how);
            }
            let control = if control.hangs_on(name) {
                log_line(&format!("{name} hang"));
                wait_while_hanging_on(name)
            } else {
                control
            };
            observe_sign_setting(&control);
            body(&mut Call {
                real: &target.real,
                control,
            })
        }
    };
    if note.is_empty() {
        log_line(&format!("{name} rv=0x{rv:08X}"));
    } else {
        log_line(&format!("{name} {note} rv=0x{rv:08X}"));
    }
    rv
}

/// Set once a `deadlock_on` function ran: every wrapped call blocks on [`DEADLOCK`] from then on.
static DEADLOCKED: AtomicBool = AtomicBool::new(false);
/// The lock held forever by a thread of its own once the deadlock happened.
static DEADLOCK: Mutex<()> = Mutex::new(());

/// Takes the module-wide lock on a thread that keeps it forever, then blocks on it: a driver
/// that deadlocked. Never returns.
fn deadlock(name: &str) -> ! {
    log_line(&format!("{name} deadlock"));
    if !DEADLOCKED.swap(true, Ordering::SeqCst) {
        let (held, is_held) = std::sync::mpsc::channel();
        let holder = std::thread::Builder::new()
            .name("fault-deadlock".into())
            .spawn(move || {
                let _guard = DEADLOCK.lock();
                let _ = held.send(());
                loop {
                    std::thread::park();
                }
            });
        if holder.is_ok() {
            let _ = is_held.recv();
        }
    }
    loop {
        // Blocks for good: the holder never lets go. (The loop only satisfies `!`.)
        let _guard = DEADLOCK.lock();
        std::thread::park();
    }
}

/// Ends the process the way `crash_how` says.
fn crash(how: CrashHow) -> ! {
    match how {
        CrashHow::Abort => std::process::abort(),
        CrashHow::Exit => std::process::exit(1),
        CrashHow::Segv => {
            // SAFETY: signal() puts back SIGSEGV's default action (the Rust runtime of the
            // host installs a handler for stack overflows that would return from a raised
            // signal); raise() then ends the process with SIGSEGV, exactly as a stray pointer
            // in a driver would. No memory is touched.
            unsafe {
                libc::signal(libc::SIGSEGV, libc::SIG_DFL);
                libc::raise(libc::SIGSEGV);
            }
            // Should a handler have caught it, end anyway.
            std::process::abort()
        }
    }
}

/// Blocks until the control file no longer names `function` in `hang_on`; returns the control
/// then in force.
fn wait_while_hanging_on(function: &str) -> Control {
    loop {
        std::thread::sleep(std::time::Duration::from_millis(50));
        match Control::load() {
            Ok(control) if control.hangs_on(function) => {}
            Ok(control) => return control,
            // A broken control file ends the hang; the next call reports it.
            Err(_) => return Control::default(),
        }
    }
}

/// Signatures produced since `fail_sign_after` last changed, and the setting they count for.
struct SignCount {
    setting: Option<u64>,
    produced: u64,
}

static SIGN_COUNT: Mutex<SignCount> = Mutex::new(SignCount {
    setting: None,
    produced: 0,
});

fn sign_count() -> std::sync::MutexGuard<'static, SignCount> {
    // A panic while holding this lock cannot leave the two integers inconsistent.
    SIGN_COUNT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Restarts the signature count whenever the `fail_sign_after` setting changes.
fn observe_sign_setting(control: &Control) {
    let mut count = sign_count();
    if count.setting != control.fail_sign_after {
        count.setting = control.fail_sign_after;
        count.produced = 0;
    }
}

/// Counts one produced signature; true if it is beyond the `fail_sign_after` allowance.
pub(crate) fn signature_fails(control: &Control) -> bool {
    let mut count = sign_count();
    count.produced = count.produced.saturating_add(1);
    control
        .fail_sign_after
        .is_some_and(|allowed| count.produced > allowed)
}

/// Appends one line to the call log, if `KEYPORT_FAULT_LOG` names one.
fn log_line(line: &str) {
    let Some(path) = std::env::var_os(LOG_ENV) else {
        return;
    };
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        // One write per line: O_APPEND keeps lines from concurrent callers whole.
        .and_then(|mut file| file.write_all(format!("{line}\n").as_bytes()));
    if let Err(e) = written {
        eprintln!(
            "{MESSAGE_PREFIX}: cannot append to {}: {e}",
            path.to_string_lossy()
        );
    }
}
