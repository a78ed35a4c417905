#![no_main]
use libfuzzer_sys::fuzz_target;

// A text frame from a page: parsed or refused with a protocol reason, never a panic.
fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = browser_bridge::protocol::parse_request(text);
    }
});
