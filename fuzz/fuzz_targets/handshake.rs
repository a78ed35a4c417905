#![no_main]
use libfuzzer_sys::fuzz_target;

// The HTTP request head before the upgrade: Host, Origin and the upgrade headers, judged by the
// bridge's own function. An accepted head names an origin the origin parser accepts as is.
fuzz_target!(|data: &[u8]| {
    for insecure in [false, true] {
        match browser_bridge::judge_handshake(data, 47333, insecure) {
            Ok(origin) => {
                let again = browser_bridge::Origin::parse(origin.as_str(), insecure);
                assert_eq!(again.as_ref().map(|o| o.as_str()), Ok(origin.as_str()));
            }
            Err(status) => assert!(matches!(status, 400 | 403 | 404 | 426 | 431 | 503)),
        }
    }
});
