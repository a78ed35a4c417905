#![no_main]
use libfuzzer_sys::fuzz_target;

// The configuration file (an administrator's, but still outside input).
fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = agent::config::Config::parse(text);
    }
});
