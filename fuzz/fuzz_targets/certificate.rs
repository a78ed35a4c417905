#![no_main]
use libfuzzer_sys::fuzz_target;

// A certificate as a token hands it over (CKA_VALUE): parsed or refused, never a panic; what
// reaches a dialog is put through the one text cleaning without a line break left in it.
fuzz_target!(|data: &[u8]| {
    if let Ok((subject, holder, _alg)) = pkcs11_shim::parse_certificate_for_fuzzing(data) {
        for text in [subject, holder] {
            let shown = browser_bridge::text::clean(&text);
            assert!(!shown.contains(['\n', '\r', '\u{2028}', '\u{2029}']));
        }
    }
});
