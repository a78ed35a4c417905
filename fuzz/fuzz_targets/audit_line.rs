#![no_main]
use libfuzzer_sys::fuzz_target;

// One line of the audit log as `keyport audit --verify` reads it (a file anyone with the
// user's rights may have edited): parsed or skipped, and rendered, never a panic.
fuzz_target!(|data: &[u8]| {
    if let Some((line, _mac_ok)) = agent::audit::parse_line_for_fuzzing(data) {
        let _ = agent::audit::render_line(&line);
    }
});
