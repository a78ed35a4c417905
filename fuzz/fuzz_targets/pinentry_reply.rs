#![no_main]
use libfuzzer_sys::fuzz_target;

// What a pinentry program writes back (Assuan lines: OK, ERR, D with percent escapes, S, #):
// parsed or refused, never a panic or an unbounded buffer.
fuzz_target!(|data: &[u8]| {
    let _ = agent::pinentry::parse_reply_stream(data);
});
