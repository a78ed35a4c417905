#![no_main]
use libfuzzer_sys::fuzz_target;

// The one cleaning of untrusted dialog text: nothing invisible and no line break survives, and
// cleaning twice changes nothing.
fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let once = browser_bridge::text::clean(text);
        assert_eq!(browser_bridge::text::clean(&once), once);
        assert!(!once
            .chars()
            .any(|c| browser_bridge::text::is_invisible(c) || c.is_control()));
    }
});
