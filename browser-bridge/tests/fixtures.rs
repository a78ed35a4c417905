//! The golden messages of `fixtures/` against the Rust types: every valid message parses and
//! re-serializes to the same JSON value, every `invalid/` one is refused with the reason its
//! name gives, and every method, event and error reason has a fixture.
#![allow(clippy::unwrap_used)] // tests panic on purpose

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use browser_bridge::protocol::{
    is_valid_id, parse_request, AuthenticateResult, CancelResult, CertificatesImportResult,
    CertificatesListResult, HelloResult, KeysGenerateResult, Reason, Request, RequestAccessResult,
    RpcError, SignBatchResult, SignProgress, SignResult, TokensChanged, TokensListResult,
    MAX_BATCH_ITEMS,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn json_files(dir: &Path) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let name = p.file_name().unwrap().to_str().unwrap().to_owned();
            (name, std::fs::read_to_string(&p).unwrap())
        })
        .collect();
    out.sort();
    out
}

/// The method a fixture name starts with (the longest match: `sign.batch` before `sign`).
fn method_of(stem: &str) -> &'static str {
    Request::METHODS
        .iter()
        .copied()
        .filter(|m| stem == *m || stem.starts_with(&format!("{m}.")))
        .max_by_key(|m| m.len())
        .unwrap_or_else(|| panic!("no method for fixture {stem}"))
}

fn round_trip<T: DeserializeOwned + Serialize>(value: &Value) -> Value {
    let typed: T = serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("{value}: {e}"));
    serde_json::to_value(&typed).unwrap()
}

fn result_round_trip(method: &str, result: &Value) -> Value {
    match method {
        "hello" => round_trip::<HelloResult>(result),
        "origin.requestAccess" => round_trip::<RequestAccessResult>(result),
        "tokens.list" => round_trip::<TokensListResult>(result),
        "certificates.list" => round_trip::<CertificatesListResult>(result),
        "sign" => round_trip::<SignResult>(result),
        "sign.batch" => round_trip::<SignBatchResult>(result),
        "authenticate" => round_trip::<AuthenticateResult>(result),
        "keys.generate" => round_trip::<KeysGenerateResult>(result),
        "certificates.import" => round_trip::<CertificatesImportResult>(result),
        "cancel" => round_trip::<CancelResult>(result),
        other => panic!("no result type for {other}"),
    }
}

#[test]
fn every_valid_fixture_round_trips() {
    let mut requests = BTreeSet::new();
    let mut responses = BTreeSet::new();
    let mut events = BTreeSet::new();
    let mut reasons = BTreeSet::new();
    for (name, text) in json_files(&fixtures_dir()) {
        let value: Value = serde_json::from_str(&text).unwrap();
        if let Some(stem) = name.strip_suffix(".request.json") {
            let parsed = parse_request(&text).unwrap_or_else(|r| panic!("{name}: {:?}", r.error));
            assert_eq!(parsed.request.method(), method_of(stem), "{name}");
            assert_eq!(parsed.request.to_message(&parsed.id), value, "{name}");
            requests.insert(parsed.request.method());
        } else if let Some(stem) = name.strip_suffix(".response.json") {
            let method = method_of(stem);
            assert_eq!(value["jsonrpc"], "2.0", "{name}");
            assert_eq!(
                result_round_trip(method, &value["result"]),
                value["result"],
                "{name}"
            );
            responses.insert(method);
        } else if name.ends_with(".event.json") {
            let method = value["method"].as_str().unwrap();
            let params = match method {
                "tokens.changed" => round_trip::<TokensChanged>(&value["params"]),
                "sign.progress" => round_trip::<SignProgress>(&value["params"]),
                other => panic!("{name}: unknown event {other}"),
            };
            assert_eq!(
                browser_bridge::protocol::notification(method, params),
                value,
                "{name}"
            );
            events.insert(method.to_owned());
        } else if let Some(stem) = name.strip_prefix("error.") {
            let reason_name = stem.trim_end_matches(".json").rsplit('.').next().unwrap();
            let error: RpcError = serde_json::from_value(value["error"].clone())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(error.reason.as_str(), reason_name, "{name}");
            assert_eq!(
                browser_bridge::protocol::error_response(&value["id"], &error),
                value,
                "{name}"
            );
            reasons.insert(error.reason.as_str());
        } else {
            panic!("fixture {name} does not follow the naming scheme of fixtures/README.md");
        }
    }
    let methods: BTreeSet<&str> = Request::METHODS.into_iter().collect();
    assert_eq!(requests, methods, "a request fixture per method");
    assert_eq!(responses, methods, "a response fixture per method");
    assert_eq!(
        events,
        BTreeSet::from(["sign.progress".to_owned(), "tokens.changed".to_owned()])
    );
    let all: BTreeSet<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(reasons, all, "an error fixture per reason");
}

#[test]
fn every_certificates_list_filter_has_a_fixture() {
    let mut seen = BTreeSet::new();
    for (name, text) in json_files(&fixtures_dir()) {
        if name.starts_with("certificates.list.") && name.ends_with(".request.json") {
            let v: Value = serde_json::from_str(&text).unwrap();
            if let Some(filter) = v["params"]["filter"].as_object() {
                seen.extend(filter.keys().cloned());
            }
        }
    }
    let want = [
        "issuer",
        "keyAlgorithm",
        "keyUsage",
        "subject",
        "tokenId",
        "validAt",
    ];
    assert_eq!(seen, want.iter().map(|s| s.to_string()).collect());
}

#[test]
fn every_invalid_fixture_is_refused_with_its_reason() {
    let files = json_files(&fixtures_dir().join("invalid"));
    assert!(files.len() > 40);
    for (name, text) in files {
        let want = name.split('.').next().unwrap();
        let refusal = match parse_request(&text) {
            Ok(r) => panic!("{name} accepted: {r:?}"),
            Err(r) => r,
        };
        assert_eq!(
            refusal.error.reason.as_str(),
            want,
            "{name}: {}",
            refusal.error
        );
        // The id is echoed when the frame had a usable one: a string or a safe integer, in a
        // frame without a repeated member (where it cannot be trusted).
        if let Ok(Value::Object(m)) = serde_json::from_str::<Value>(&text) {
            match m.get("id") {
                Some(id) if is_valid_id(id) && !name.contains("repeated") => {
                    assert_eq!(&refusal.id, id, "{name}")
                }
                _ => assert_eq!(refusal.id, Value::Null, "{name}"),
            }
        }
    }
}

fn batch(items: usize) -> String {
    let item = json!({"data": "AAEC"});
    json!({"jsonrpc": "2.0", "id": 1, "method": "sign.batch", "params": {
        "certificateId": "c", "items": vec![item; items], "display": {"title": "T"}}})
    .to_string()
}

#[test]
fn batch_size_bounds() {
    assert!(parse_request(&batch(MAX_BATCH_ITEMS)).is_ok());
    let refused = parse_request(&batch(MAX_BATCH_ITEMS + 1)).unwrap_err();
    assert_eq!(refused.error.reason, Reason::InvalidParams);
    assert_eq!(refused.error.reason.code(), -32602);
}

#[test]
fn authenticate_keeps_the_challenge_string_as_received() {
    let text = std::fs::read_to_string(fixtures_dir().join("authenticate.request.json")).unwrap();
    let sent: Value = serde_json::from_str(&text).unwrap();
    let Request::Authenticate(p) = parse_request(&text).unwrap().request else {
        panic!("not authenticate")
    };
    assert_eq!(
        p.challenge.as_str(),
        sent["params"]["challenge"].as_str().unwrap()
    );
}
