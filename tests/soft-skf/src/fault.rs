//! Faults a test asks for, in `ROOT/fault.conf` (read again at every SKF call, so a test
//! changes them while the library runs), `key=value` lines like the fault PKCS#11 module's
//! control file:
//!
//! ```text
//! crash_on=SKF_ECCSignData,SKF_EnumDev   these calls end the process …
//! crash_how=segv | abort | exit          … with SIGSEGV, abort() (the default) or exit(1)
//! hang_on=SKF_EnumDev                    these calls block while the line is in the file
//! deadlock_on=SKF_ECCSignData            this call takes a library-wide lock that a thread
//!                                        of its own holds forever: every later call of this
//!                                        library instance blocks too, whatever the file says
//! ```
//!
//! Each fault is logged to `ROOT/calls.log` (`SKF_EnumDev crash`) before it strikes.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// How often a hanging call reads the file again.
const HANG_POLL: Duration = Duration::from_millis(20);

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum CrashHow {
    #[default]
    Abort,
    Segv,
    Exit,
}

#[derive(Debug, Default)]
struct Faults {
    crash_on: Vec<String>,
    crash_how: CrashHow,
    hang_on: Vec<String>,
    deadlock_on: Vec<String>,
}

impl Faults {
    /// The file's faults; none when it is absent. A line it does not understand is reported
    /// on stderr and ignored (the test then sees the fault not happen).
    fn load(root: &Path) -> Faults {
        let mut faults = Faults::default();
        let Ok(text) = std::fs::read_to_string(root.join("fault.conf")) else {
            return faults;
        };
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let Some((key, value)) = line.split_once('=') else {
                eprintln!("keyport-soft-skf: fault.conf: no '=' in {line:?}");
                continue;
            };
            let names = || {
                value
                    .split(',')
                    .map(|n| n.trim().to_owned())
                    .filter(|n| !n.is_empty())
                    .collect()
            };
            match key.trim() {
                "crash_on" => faults.crash_on = names(),
                "hang_on" => faults.hang_on = names(),
                "deadlock_on" => faults.deadlock_on = names(),
                "crash_how" => {
                    faults.crash_how = match value.trim() {
                        "abort" => CrashHow::Abort,
                        "segv" => CrashHow::Segv,
                        "exit" => CrashHow::Exit,
                        other => {
                            eprintln!("keyport-soft-skf: fault.conf: crash_how={other:?}?");
                            CrashHow::Abort
                        }
                    }
                }
                other => eprintln!("keyport-soft-skf: fault.conf: unknown key {other:?}"),
            }
        }
        faults
    }
}

/// Set once a `deadlock_on` call ran: every call blocks on [`DEADLOCK`] from then on.
static DEADLOCKED: AtomicBool = AtomicBool::new(false);
/// The lock a thread of its own holds forever once the deadlock happened.
static DEADLOCK: Mutex<()> = Mutex::new(());

/// Runs before SKF function `name`: crashes, hangs or deadlocks when `ROOT/fault.conf` says so;
/// `log` appends a line to calls.log.
pub(crate) fn before(root: &Path, name: &str, log: impl Fn(&str)) {
    if DEADLOCKED.load(Ordering::SeqCst) {
        deadlock(name, &log);
    }
    let faults = Faults::load(root);
    let named = |list: &[String]| list.iter().any(|n| n == name);
    if named(&faults.deadlock_on) {
        deadlock(name, &log);
    }
    if named(&faults.crash_on) {
        log(&format!("{name} crash"));
        crash(faults.crash_how);
    }
    if named(&faults.hang_on) {
        log(&format!("{name} hang"));
        while named(&Faults::load(root).hang_on) {
            std::thread::sleep(HANG_POLL);
        }
    }
}

/// A library that deadlocked: the lock is taken by a thread that keeps it, then waited for.
fn deadlock(name: &str, log: &impl Fn(&str)) -> ! {
    log(&format!("{name} deadlock"));
    if !DEADLOCKED.swap(true, Ordering::SeqCst) {
        let (held, is_held) = std::sync::mpsc::channel();
        let holder = std::thread::Builder::new()
            .name("soft-skf-deadlock".into())
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

/// Ends the process as `how` says.
fn crash(how: CrashHow) -> ! {
    match how {
        CrashHow::Abort => std::process::abort(),
        CrashHow::Exit => std::process::exit(1),
        CrashHow::Segv => {
            // SAFETY: signal() puts back SIGSEGV's default action (Rust's runtime installs a
            // handler for stack overflows); raise() then ends the process with SIGSEGV, as a
            // stray pointer in a driver would. No memory is touched.
            unsafe {
                libc::signal(libc::SIGSEGV, libc::SIG_DFL);
                libc::raise(libc::SIGSEGV);
            }
            // raise() returns only if the signal was blocked; end anyway.
            std::process::abort()
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests panic on purpose
mod tests {
    use super::*;

    #[test]
    fn the_file_names_faults_per_function() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Faults::load(dir.path()).crash_on.is_empty());
        std::fs::write(
            dir.path().join("fault.conf"),
            "crash_on=SKF_ECCSignData, SKF_EnumDev\ncrash_how=segv\nhang_on=SKF_GetDevInfo\n",
        )
        .unwrap();
        let f = Faults::load(dir.path());
        assert_eq!(f.crash_on, ["SKF_ECCSignData", "SKF_EnumDev"]);
        assert_eq!(f.crash_how, CrashHow::Segv);
        assert_eq!(f.hang_on, ["SKF_GetDevInfo"]);
        assert!(f.deadlock_on.is_empty());
    }
}
