#![no_main]
use libfuzzer_sys::fuzz_target;

// The Origin header of an upgrade request.
fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        for insecure in [false, true] {
            if let Ok(origin) = browser_bridge::Origin::parse(text, insecure) {
                assert_eq!(origin.as_str(), text);
            }
        }
    }
});
