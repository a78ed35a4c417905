//! Mutation tests of the parsers that read what a page sends: every golden fixture, mangled many
//! thousand ways (byte flips, cuts, splices, nesting), must be either accepted or refused with a
//! reason of the protocol's table, never panic. Deterministic: a fixed-seed generator, so a
//! failure reproduces. (`fuzz/` holds the same targets for coverage-guided runs.)

use std::path::Path;

use browser_bridge::protocol::{parse_request, Reason};
use browser_bridge::Origin;

/// xorshift64*: small, deterministic, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

fn fixtures() -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let mut out = Vec::new();
    for sub in [dir.clone(), dir.join("invalid")] {
        let mut entries: Vec<_> = std::fs::read_dir(&sub)
            .expect("fixtures folder")
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        entries.sort();
        for p in entries {
            out.push(std::fs::read(&p).expect("fixture"));
        }
    }
    assert!(
        out.len() > 50,
        "expected the golden fixtures, found {}",
        out.len()
    );
    out
}

const TOKENS: &[&[u8]] = &[
    b"\"pin\"",
    b"\"PassWord\"",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"null",
    b"\"\\u0000\"",
    b"1e999",
    b"-0",
    b"\"\\ud800\"",
    b"\"=\"",
    b"\"AAAA\"",
    b"\"A===\"",
    b"\"id\"",
    b"\"params\"",
    b"\"method\":\"sign\"",
    b"\"\\u202e\"",
    b"9999999999999999999999",
];

fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..=rng.below(4) {
        match rng.below(6) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 => {
                let cut = rng.below(v.len() + 1);
                v.truncate(cut);
            }
            2 => {
                let i = rng.below(v.len() + 1);
                let t = TOKENS[rng.below(TOKENS.len())];
                v.splice(i..i, t.iter().copied());
            }
            3 if v.len() > 2 => {
                let a = rng.below(v.len());
                let b = a + rng.below(v.len() - a);
                let piece = v[a..b].to_vec();
                let at = rng.below(v.len() + 1);
                v.splice(at..at, piece);
            }
            4 => {
                // Deep nesting: a parser must not overflow its stack.
                let depth = 1 + rng.below(2000);
                let mut nested = Vec::with_capacity(depth * 2 + v.len());
                nested.extend(std::iter::repeat_n(b'[', depth));
                nested.extend_from_slice(&v);
                nested.extend(std::iter::repeat_n(b']', depth));
                v = nested;
            }
            _ => {
                if !v.is_empty() {
                    let i = rng.below(v.len());
                    v.remove(i);
                }
            }
        }
    }
    v
}

#[test]
fn mangled_messages_are_refused_with_a_protocol_reason_never_a_panic() {
    let seeds = fixtures();
    let mut rng = Rng(0x6b65_7970_6f72_7421);
    let mut accepted = 0usize;
    let mut refused = 0usize;
    for round in 0..40_000 {
        let base = &seeds[round % seeds.len()];
        let bytes = mutate(&mut rng, base);
        let Ok(text) = std::str::from_utf8(&bytes) else {
            continue;
        };
        match parse_request(text) {
            Ok(_) => accepted += 1,
            Err(refusal) => {
                refused += 1;
                assert!(
                    Reason::ALL.contains(&refusal.error.reason),
                    "reason outside the table for {text:?}"
                );
                let code = refusal.error.reason.code();
                assert!(
                    (-32700..=-32600).contains(&code) || code == 1012,
                    "parsing may only refuse with JSON-RPC's own codes or PIN_FROM_PAGE_REFUSED, got {code} for {text:?}"
                );
            }
        }
    }
    assert!(
        refused > 10_000,
        "mutations should mostly be refused: {refused}"
    );
    assert!(
        accepted > 0,
        "some mutations (e.g. a changed id) stay valid"
    );
}

#[test]
fn any_key_named_pin_is_refused_whatever_else_is_wrong_after_it() {
    let mut rng = Rng(7);
    for _ in 0..2_000 {
        let depth = rng.below(30);
        let mut params = String::from("{\"Pin\":\"1234\"}");
        for _ in 0..depth {
            params = format!("{{\"x\":[{params}]}}");
        }
        let text = format!(
            "{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"nonexistent\",\"params\":{params}}}"
        );
        let refusal = parse_request(&text).expect_err("pin refused");
        assert_eq!(refusal.error.reason, Reason::PinFromPageRefused);
    }
}

#[test]
fn mangled_origins_never_panic_and_only_canonical_ones_pass() {
    let seeds: &[&[u8]] = &[
        b"https://portal.example",
        b"https://portal.example:8443",
        b"http://localhost:3000",
        b"http://127.0.0.1",
        b"https://xn--80ak6aa92e.example",
        b"https://[::1]:8443",
    ];
    let mut rng = Rng(99);
    for round in 0..40_000 {
        let bytes = mutate(&mut rng, seeds[round % seeds.len()]);
        let Ok(text) = std::str::from_utf8(&bytes) else {
            continue;
        };
        for insecure in [false, true] {
            if let Ok(origin) = Origin::parse(text, insecure) {
                let s = origin.as_str();
                assert!(
                    s.starts_with("https://") || (insecure && s.starts_with("http://")),
                    "accepted {s:?}"
                );
                assert!(
                    !s["https://".len().min(s.len())..].contains('/'),
                    "path in {s:?}"
                );
                assert_eq!(s, text, "only canonical origins are accepted");
            }
        }
    }
}
