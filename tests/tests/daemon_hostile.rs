//! Hostile pages and hand-made HTTP against the real `keyport run`: every refusal happens before
//! a dialog or a token is touched.
#![allow(clippy::unwrap_used)] // a test fails by panicking

use std::sync::OnceLock;

use keyport_e2e::harness::{
    b64, certificate_ids, http_exchange, nonce, upgrade_request, Agent, AgentOptions, Client,
    Closed, TestToken, PORTAL,
};
use serde_json::{json, Value};

fn token() -> &'static TestToken {
    static TOKEN: OnceLock<TestToken> = OnceLock::new();
    TOKEN.get_or_init(|| TestToken::provision().expect("provision"))
}

fn status(agent: &Agent, host: Option<&str>, origin: Option<&str>) -> u16 {
    http_exchange(agent.port(), &upgrade_request(host, origin))
        .unwrap()
        .0
}

fn sign_params(id: &str, extra: Value) -> Value {
    let mut p = json!({
        "certificateId": id,
        "digest": {"algorithm": "SHA-256", "value": b64(&[9; 32])},
        "display": {"title": "Hostile"},
    });
    if let (Some(p), Value::Object(e)) = (p.as_object_mut(), extra) {
        p.extend(e);
    }
    p
}

/// Nothing reached the user or the token's login.
fn assert_untouched(agent: &Agent) {
    assert!(
        agent.script().dialogs().unwrap().is_empty(),
        "a dialog was shown: {:?}",
        agent.script().dialogs()
    );
    assert_eq!(
        agent.fault_calls("C_Login"),
        0,
        "the token was logged in to"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_refuses_bad_origins_and_hosts_with_403() {
    let options = AgentOptions {
        denied_origins: vec!["https://evil.example".into()],
        fault: true,
        ..AgentOptions::default()
    };
    let agent = Agent::start(token(), options).unwrap();
    let port = agent.port();
    let host = format!("127.0.0.1:{port}");
    let h = Some(host.as_str());
    // The good case first, so the refusals below are about the header under test.
    assert_eq!(status(&agent, h, Some(PORTAL)), 101);
    let localhost = format!("localhost:{port}");
    assert_eq!(status(&agent, Some(&localhost), Some(PORTAL)), 101);
    let v6 = format!("[::1]:{port}");
    assert_eq!(status(&agent, Some(&v6), Some(PORTAL)), 101);
    // Origin: missing, null, not https, denied, malformed.
    for origin in [
        None,
        Some("null"),
        Some("http://portal.example"),
        Some("https://evil.example"),
        Some("https://portal.example/path"),
        Some("file://"),
        Some(""),
    ] {
        assert_eq!(status(&agent, h, origin), 403, "origin {origin:?}");
    }
    // Host: DNS rebinding, another port, missing.
    let other_port = format!("127.0.0.1:{}", port.wrapping_add(1));
    let rebinding = format!("evil.test:{port}");
    for bad_host in [
        Some(rebinding.as_str()),
        Some(other_port.as_str()),
        Some("127.0.0.1"),
        Some("portal.example"),
        None,
    ] {
        assert_eq!(
            status(&agent, bad_host, Some(PORTAL)),
            403,
            "host {bad_host:?}"
        );
    }
    // Through a real WebSocket client too.
    let refused = Client::try_connect(port, None, None).await.unwrap();
    assert_eq!(refused.err(), Some(403));
    let refused = Client::try_connect(port, Some("null"), None).await.unwrap();
    assert_eq!(refused.err(), Some(403));
    let refused = Client::try_connect(port, Some(PORTAL), Some(&rebinding))
        .await
        .unwrap();
    assert_eq!(refused.err(), Some(403));
    // Other HTTP: 404 for other paths, 426 for a plain GET of /v1.
    let (code, _) =
        http_exchange(port, &format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n")).unwrap();
    assert_eq!(code, 404);
    let (code, _) = http_exchange(
        port,
        &format!("GET /v1 HTTP/1.1\r\nHost: {host}\r\nOrigin: {PORTAL}\r\n\r\n"),
    )
    .unwrap();
    assert_eq!(code, 426);
    let (code, head) = http_exchange(
        port,
        &format!("POST /v1 HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n"),
    )
    .unwrap();
    assert_eq!(code, 404, "{head}");
    assert_untouched(&agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_policy_refuses_every_origin_not_allowed_including_look_alikes() {
    let options = AgentOptions {
        unknown_origins: "reject".into(),
        fault: true,
        ..AgentOptions::default()
    };
    let agent = Agent::start(token(), options).unwrap();
    let host = format!("127.0.0.1:{}", agent.port());
    for origin in [
        "https://portal.example.evil.test",
        "https://portal.example:8443",
        "http://portal.example",
        "https://evil.portal.example",
        "https://PORTAL.example.",
        "https://foreign.example",
    ] {
        assert_eq!(status(&agent, Some(&host), Some(origin)), 403, "{origin}");
    }
    // The allowed origin still connects and works.
    let mut client = agent.connect(PORTAL).await.unwrap();
    let hello = client.call_ok("hello", json!({})).await.unwrap();
    assert_eq!(hello["originApproved"], true);
    assert_untouched(&agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn look_alike_origins_are_strangers_not_the_portal() {
    // With the prompt policy a look-alike may connect, but it is a different origin: not
    // approved, and its requests ask the user about *its* name.
    let agent = Agent::start(token(), AgentOptions::default().fault()).unwrap();
    for origin in [
        "https://portal.example.evil.test",
        "https://portal.example:8443",
    ] {
        let mut client = agent.connect(origin).await.unwrap();
        let hello = client.call_ok("hello", json!({})).await.unwrap();
        assert_eq!(hello["origin"], origin);
        assert_eq!(hello["originApproved"], false, "{origin}");
    }
    // A page cannot claim another origin in a message: an `origin` field is an unknown field.
    let mut client = agent
        .connect("https://portal.example.evil.test")
        .await
        .unwrap();
    let e = client
        .call("hello", json!({"origin": PORTAL}))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(e.reason, "INVALID_PARAMS", "{e:?}");
    assert_untouched(&agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_get_json_rpc_errors() {
    // Many requests in a row: lift the rate limit so each one meets the check under test.
    let options = AgentOptions {
        limits: vec!["requests_per_second = 1000".into()],
        ..AgentOptions::default().fault()
    };
    let agent = Agent::start(token(), options).unwrap();
    let mut client = agent.connect(PORTAL).await.unwrap();
    let ids = certificate_ids(&mut client, token()).await.unwrap();
    let p256 = ids["sign-p256"].clone();

    // Not JSON at all.
    client
        .send_raw("{\"jsonrpc\": \"2.0\", \"id\": 1,")
        .await
        .unwrap();
    let answer = client.next_json().await.unwrap();
    assert_eq!(answer["error"]["code"], -32700, "{answer}");
    assert_eq!(answer["error"]["data"]["reason"], "PARSE_ERROR");
    assert_eq!(answer["id"], Value::Null);
    // JSON, but not a request.
    client
        .send_raw(r#"{"jsonrpc": "1.0", "id": 2, "method": "hello", "params": {}}"#)
        .await
        .unwrap();
    let answer = client.next_json().await.unwrap();
    assert_eq!(
        answer["error"]["data"]["reason"], "INVALID_REQUEST",
        "{answer}"
    );
    assert_eq!(answer["error"]["code"], -32600);
    client
        .send_raw(r#"{"jsonrpc": "2.0", "id": 3, "method": "hello", "params": {}, "extra": 1}"#)
        .await
        .unwrap();
    let answer = client.next_json().await.unwrap();
    assert!(
        answer.get("error").is_some(),
        "unknown top-level field accepted: {answer}"
    );
    // Unknown method.
    let e = client
        .call_err("keys.destroyAll", json!({}), "METHOD_NOT_FOUND")
        .await
        .unwrap();
    assert_eq!(e.code, -32601);
    // Unknown fields in params, anywhere.
    for params in [
        sign_params(&p256, json!({"colour": "red"})),
        sign_params(&p256, json!({"display": {"title": "x", "font": "big"}})),
        json!({"filter": {"keyUsage": ["nonRepudiation"], "owner": "me"}}),
    ] {
        let method = if params.get("filter").is_some() {
            "certificates.list"
        } else {
            "sign"
        };
        let e = client
            .call_err(method, params.clone(), "INVALID_PARAMS")
            .await
            .unwrap();
        assert_eq!(e.code, -32602, "{params}");
    }
    // Bad base64: no padding, URL alphabet, whitespace, not base64.
    for value in [
        "AAAA AAA=",
        "q83vEjRWeJA",
        "-_-_-_-_",
        "not base64!",
        "AAAA=",
    ] {
        let params = json!({
            "certificateId": p256,
            "digest": {"algorithm": "SHA-256", "value": value},
            "display": {"title": "b64"},
        });
        client
            .call_err("sign", params, "INVALID_PARAMS")
            .await
            .unwrap_or_else(|e| panic!("{value:?}: {e}"));
    }
    // The display title: required, at most 200 chars, no control or bidi-override characters.
    for display in [
        json!({}),
        json!({"title": "a".repeat(201)}),
        json!({"title": "Invoice\u{202E}fdp.exe"}),
        json!({"title": "two\nlines"}),
        json!({"title": "ok", "summary": "s".repeat(2001)}),
    ] {
        client
            .call_err(
                "sign",
                sign_params(&p256, json!({"display": display.clone()})),
                "INVALID_PARAMS",
            )
            .await
            .unwrap_or_else(|e| panic!("{display}: {e}"));
    }
    // Batches of 0 and 1001 items.
    for n in [0usize, 1001] {
        let items: Vec<Value> = (0..n)
            .map(|_| json!({"digest": {"algorithm": "SHA-256", "value": b64(&[1; 32])}}))
            .collect();
        let e = client
            .call_err(
                "sign.batch",
                json!({"certificateId": p256, "items": items, "display": {"title": "batch"}}),
                "INVALID_PARAMS",
            )
            .await
            .unwrap_or_else(|e| panic!("batch of {n}: {e}"));
        assert_eq!(e.code, -32602);
    }
    // Nonces: 31 bytes, not base64, too long.
    for challenge in [nonce(31).unwrap(), "!".repeat(44), nonce(769).unwrap()] {
        client
            .call_err(
                "authenticate",
                json!({"challenge": challenge}),
                "INVALID_PARAMS",
            )
            .await
            .unwrap_or_else(|e| panic!("{challenge}: {e}"));
    }
    // `cancel` of nothing pending is answered, not an error.
    let answer = client
        .call("cancel", json!({"requestId": 4242}))
        .await
        .unwrap();
    assert!(
        answer.is_ok() || answer.as_ref().unwrap_err().reason == "INVALID_PARAMS",
        "{answer:?}"
    );
    // The connection is still usable.
    client.call_ok("hello", json!({})).await.unwrap();
    assert_untouched(&agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pin_from_the_page_is_refused_wherever_it_hides() {
    let agent = Agent::start(token(), AgentOptions::default().fault()).unwrap();
    let mut client = agent.connect(PORTAL).await.unwrap();
    let ids = certificate_ids(&mut client, token()).await.unwrap();
    let p256 = ids["sign-p256"].clone();
    let cases = [
        ("sign", sign_params(&p256, json!({"pin": "123456"}))),
        (
            "sign",
            sign_params(
                &p256,
                json!({"display": {"title": "x", "password": "123456"}}),
            ),
        ),
        (
            "authenticate",
            json!({"challenge": nonce(32).unwrap(), "passwd": "123456"}),
        ),
        ("certificates.list", json!({"filter": {"pin": "1"}})),
        (
            "hello",
            json!({"client": {"name": "x", "version": "1", "pin": "123456"}}),
        ),
        (
            "sign.batch",
            json!({"certificateId": p256, "items": [{"data": b64(b"x"), "pin": "1"}], "display": {"title": "t"}}),
        ),
    ];
    for (method, params) in cases {
        let e = client
            .call_err(method, params.clone(), "PIN_FROM_PAGE_REFUSED")
            .await
            .unwrap_or_else(|e| panic!("{params}: {e}"));
        assert_eq!(e.code, 1012);
    }
    // Also at the top level of the request.
    client
        .send_raw(r#"{"jsonrpc": "2.0", "id": 77, "method": "tokens.list", "params": {}, "pin": "123456"}"#)
        .await
        .unwrap();
    let answer = client.next_json().await.unwrap();
    assert_eq!(
        answer["error"]["data"]["reason"], "PIN_FROM_PAGE_REFUSED",
        "{answer}"
    );
    assert_untouched(&agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_frame_closes_with_1009_and_others_stay_served() {
    let agent = Agent::start(token(), AgentOptions::default().fault()).unwrap();
    let mut victim = agent.connect(PORTAL).await.unwrap();
    let mut attacker = agent.connect(PORTAL).await.unwrap();
    let big = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"hello","params":{{"client":{{"name":"{}","version":"1"}}}}}}"#,
        "a".repeat(300 * 1024)
    );
    // The agent may close while the frame is still being written.
    let _ = attacker.send_raw(&big).await;
    let closed = attacker.wait_closed().await.unwrap();
    assert_eq!(closed, Closed::Code(1009));
    // A message just under the limit is fine.
    let fits = format!(
        r#"{{"jsonrpc":"2.0","id":2,"method":"hello","params":{{"client":{{"name":"{}","version":"1"}}}}}}"#,
        "a".repeat(200 * 1024)
    );
    victim.send_raw(&fits).await.unwrap();
    let answer = victim.next_json().await.unwrap();
    assert!(
        answer.get("error").is_some() || answer["result"]["agent"] == "keyport",
        "{answer}"
    );
    victim.call_ok("hello", json!({})).await.unwrap();
    assert_untouched(&agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_rate_and_connection_limits() {
    let options = AgentOptions {
        allowed_origins: vec![PORTAL.into(), "https://other.example".into()],
        limits: vec![
            "requests_per_second = 3".into(),
            "max_connections_per_origin = 2".into(),
        ],
        fault: true,
        ..AgentOptions::default()
    };
    let agent = Agent::start(token(), options).unwrap();
    let mut client = agent.connect(PORTAL).await.unwrap();
    let mut sent = Vec::new();
    for _ in 0..12 {
        sent.push(client.send("hello", json!({})).await.unwrap());
    }
    let mut limited = 0;
    for id in sent {
        match client.response(id).await.unwrap() {
            Ok(_) => {}
            Err(e) => {
                assert_eq!(e.reason, "RATE_LIMITED", "{e:?}");
                assert_eq!(e.code, 1011);
                limited += 1;
            }
        }
    }
    assert!(limited >= 6, "only {limited} of 12 rate-limited at 3/s");
    // Two connections per origin: the third is refused (503), another origin still connects.
    let _second = agent.connect(PORTAL).await.unwrap();
    let third = Client::try_connect(agent.port(), Some(PORTAL), None)
        .await
        .unwrap();
    assert_eq!(third.err(), Some(503));
    let mut other = agent.connect("https://other.example").await.unwrap();
    other.call_ok("hello", json!({})).await.unwrap();
    assert_untouched(&agent);
}

/// CPU time (user + system, clock ticks) the process has used so far.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After `(comm)` comes field 3 (state): utime (field 14) and stime (15) are at 11 and 12.
    let rest = stat.rsplit_once(')').unwrap().1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// A page that opens connections to the demo portal until the agent runs out of descriptors:
/// the portal's accept fails (EMFILE) with connections still queued. The agent waits before
/// accepting again rather than spinning a core, and serves again once descriptors are free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_portal_out_of_descriptors_does_not_spin() {
    let options = AgentOptions {
        demo: true,
        max_open_files: Some(40),
        ..AgentOptions::default()
    };
    let agent = Agent::start(token(), options).unwrap();
    let (pid, demo) = (agent.pid().unwrap(), agent.demo_port().unwrap());
    // More connections than the agent has descriptors; each accepted one waits for a request.
    let held: Vec<std::net::TcpStream> = (0..60)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", demo)).unwrap())
        .collect();
    // Measured over one second: a spinning acceptor uses all of it (100 ticks), measured 99.
    let before = cpu_ticks(pid);
    std::thread::sleep(std::time::Duration::from_secs(1));
    let used = cpu_ticks(pid) - before;
    assert!(used < 30, "{used} ticks of CPU in 1 s with accept failing");
    drop(held);
    let (status, body) = http_exchange(demo, "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(
        agent.stderr().contains("demo portal: accept failed"),
        "{}",
        agent.stderr()
    );
}
