//! The server against a real tokio-tungstenite client and raw HTTP, with a toy backend.
#![allow(clippy::unwrap_used)] // tests panic on purpose

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

use browser_bridge::protocol::{Answer, HelloResult, Reason, Request, RpcError, TokensListResult};
use browser_bridge::{
    bind, Backend, Broadcaster, ConnectionId, Error, Limits, Origin, RequestContext, ServerConfig,
};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Mutex};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const PORTAL: &str = "https://portal.example";
const OTHER: &str = "https://other.example";
/// Every test is bounded; a hang fails instead of blocking CI.
const BOUND: Duration = Duration::from_secs(20);

/// Admits a fixed list of origins; `sign` waits for cancellation like an open dialog would.
struct Toy {
    admitted: Vec<&'static str>,
    started: mpsc::UnboundedSender<Value>,
    cancelled: mpsc::UnboundedSender<Value>,
    closed: mpsc::UnboundedSender<ConnectionId>,
}

impl Backend for Toy {
    fn admit_origin(&self, origin: &Origin) -> bool {
        self.admitted.contains(&origin.as_str())
    }

    /// Only the portal is approved; the other admitted origins are strangers.
    fn is_approved(&self, origin: &Origin) -> bool {
        origin.as_str() == PORTAL
    }

    async fn handle(&self, ctx: RequestContext, request: Request) -> Result<Answer, RpcError> {
        match request {
            Request::Hello(_) => Ok(Answer::of(&HelloResult::new(
                "keyport",
                "0.1.0",
                &ctx.origin,
                false,
            ))),
            Request::TokensList => Ok(Answer::of(&TokensListResult { tokens: vec![] })),
            Request::Sign(_) => {
                ctx.notifier
                    .notify("test.started", json!({"id": ctx.request_id}));
                self.started.send(ctx.request_id.clone()).unwrap();
                ctx.cancel.cancelled().await;
                assert!(ctx.cancel.is_cancelled());
                let _ = self.cancelled.send(ctx.request_id.clone());
                Err(RpcError::user_cancelled())
            }
            _ => Err(RpcError::new(Reason::AlgorithmNotSupported, "toy")),
        }
    }

    fn connection_closed(&self, conn: ConnectionId) {
        let _ = self.closed.send(conn);
    }
}

struct Harness {
    port: u16,
    broadcaster: Broadcaster,
    stop: Option<oneshot::Sender<()>>,
    served: JoinHandle<Result<(), Error>>,
    started: Mutex<mpsc::UnboundedReceiver<Value>>,
    cancelled: Mutex<mpsc::UnboundedReceiver<Value>>,
    closed: Mutex<mpsc::UnboundedReceiver<ConnectionId>>,
}

async fn start(limits: Limits) -> Harness {
    start_with(ServerConfig {
        port: 0,
        limits,
        ..ServerConfig::default()
    })
    .await
}

async fn start_with(config: ServerConfig) -> Harness {
    let (started_tx, started) = mpsc::unbounded_channel();
    let (cancelled_tx, cancelled) = mpsc::unbounded_channel();
    let (closed_tx, closed) = mpsc::unbounded_channel();
    let toy = Toy {
        admitted: vec![
            PORTAL,
            OTHER,
            "https://third.example",
            "http://localhost:3000",
        ],
        started: started_tx,
        cancelled: cancelled_tx,
        closed: closed_tx,
    };
    let bound = bind(config, Arc::new(toy)).await.unwrap();
    let port = bound.port();
    assert_ne!(port, 0);
    assert!(bound.local_addrs().iter().all(|a| a.port() == port));
    let broadcaster = bound.broadcaster();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let served = tokio::spawn(bound.serve(async move {
        let _ = stop_rx.await;
    }));
    Harness {
        port,
        broadcaster,
        stop: Some(stop_tx),
        served,
        started: Mutex::new(started),
        cancelled: Mutex::new(cancelled),
        closed: Mutex::new(closed),
    }
}

/// Opens a WebSocket to `host` (an `ip:port` authority) with an optional Origin and Host.
async fn connect_to(
    authority: &str,
    origin: Option<&str>,
    host: Option<&str>,
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let mut request = format!("ws://{authority}/v1")
        .into_client_request()
        .unwrap();
    if let Some(o) = origin {
        request.headers_mut().insert("Origin", o.parse().unwrap());
    }
    if let Some(h) = host {
        request.headers_mut().insert("Host", h.parse().unwrap());
    }
    tokio_tungstenite::connect_async(request)
        .await
        .map(|(ws, _)| ws)
}

async fn connect(port: u16, origin: &str) -> Ws {
    connect_to(&format!("127.0.0.1:{port}"), Some(origin), None)
        .await
        .unwrap()
}

/// The HTTP status (and body) of a refused upgrade.
async fn refused_status(authority: &str, origin: Option<&str>, host: Option<&str>) -> u16 {
    match connect_to(authority, origin, host).await {
        Ok(_) => panic!("upgrade accepted: origin {origin:?} host {host:?}"),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert!(
                response.body().as_ref().is_none_or(|b| b.is_empty()),
                "refusal has a body"
            );
            response.status().as_u16()
        }
        Err(e) => panic!("unexpected error {e}"),
    }
}

async fn raw_http(port: u16, request: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

async fn next_json(ws: &mut Ws) -> Value {
    loop {
        match ws.next().await.unwrap().unwrap() {
            Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

async fn call(ws: &mut Ws, message: Value) -> Value {
    ws.send(Message::text(message.to_string())).await.unwrap();
    next_json(ws).await
}

async fn close_code(ws: &mut Ws) -> CloseCode {
    loop {
        match ws.next().await {
            Some(Ok(Message::Close(Some(frame)))) => return frame.code,
            Some(Ok(Message::Close(None))) | None => panic!("closed without a code"),
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("error before close: {e}"),
        }
    }
}

fn reason(v: &Value) -> &str {
    v["error"]["data"]["reason"].as_str().unwrap_or("<none>")
}

async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(BOUND, f)
        .await
        .expect("test bound exceeded")
}

#[tokio::test]
async fn host_and_origin_matrix() {
    bounded(async {
        let h = start(Limits::default()).await;
        let p = h.port;
        let v4 = format!("127.0.0.1:{p}");
        let v6 = format!("[::1]:{p}");
        // Accepted: each allowed Host spelling, over both addresses.
        for (authority, host) in [
            (v4.as_str(), None),
            (v4.as_str(), Some(format!("localhost:{p}"))),
            (v4.as_str(), Some(format!("[::1]:{p}"))),
            (v6.as_str(), None),
        ] {
            let mut ws = connect_to(authority, Some(PORTAL), host.as_deref())
                .await
                .unwrap();
            let hello = call(
                &mut ws,
                json!({"jsonrpc":"2.0","id":1,"method":"hello","params":{}}),
            )
            .await;
            assert_eq!(hello["result"]["origin"], PORTAL);
        }
        // Refused with 403 and no body.
        let other_port = format!("127.0.0.1:{}", p.wrapping_add(1));
        let cases: Vec<(Option<&str>, Option<String>)> = vec![
            (Some("https://portal.example.evil.test"), None),
            (Some("https://evil-portal.example"), None),
            (Some("https://portal.example:8443"), None),
            (Some("http://portal.example"), None),
            (Some("https://portal.example/"), None),
            (Some("https://PORTAL.example"), None),
            (Some("null"), None),
            (None, None),
            (Some("http://localhost:3000"), None), // insecure origins are off by default
            (Some(PORTAL), Some(format!("evil.test:{p}"))),
            (Some(PORTAL), Some(other_port)),
            (Some(PORTAL), Some("localhost".into())),
            (Some(PORTAL), Some(format!("127.0.0.1.evil.test:{p}"))),
        ];
        for (origin, host) in cases {
            assert_eq!(
                refused_status(&v4, origin, host.as_deref()).await,
                403,
                "{origin:?} {host:?}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn insecure_localhost_origin_behind_the_flag() {
    bounded(async {
        let h = start_with(ServerConfig {
            port: 0,
            allow_insecure_localhost_origins: true,
            ..ServerConfig::default()
        })
        .await;
        let mut ws = connect(h.port, "http://localhost:3000").await;
        let hello = call(&mut ws, json!({"jsonrpc":"2.0","id":1,"method":"hello"})).await;
        assert_eq!(hello["result"]["origin"], "http://localhost:3000");
        // Still exact: a look-alike http host is refused.
        let status = refused_status(
            &format!("127.0.0.1:{}", h.port),
            Some("http://localhost.evil.test:3000"),
            None,
        )
        .await;
        assert_eq!(status, 403);
    })
    .await;
}

#[tokio::test]
async fn only_the_upgrade_is_served_over_http() {
    bounded(async {
        let h = start(Limits::default()).await;
        let p = h.port;
        let host = format!("Host: 127.0.0.1:{p}\r\n");
        let not_found = raw_http(p, &format!("GET / HTTP/1.1\r\n{host}\r\n")).await;
        assert!(not_found.starts_with("HTTP/1.1 404 "), "{not_found}");
        assert!(not_found.ends_with("\r\n\r\n"), "no body: {not_found:?}");
        let post = raw_http(
            p,
            &format!("POST /v1 HTTP/1.1\r\n{host}Content-Length: 0\r\n\r\n"),
        )
        .await;
        assert!(post.starts_with("HTTP/1.1 404 "), "{post}");
        let plain = raw_http(p, &format!("GET /v1 HTTP/1.1\r\n{host}\r\n")).await;
        assert!(plain.starts_with("HTTP/1.1 426 "), "{plain}");
        // The same answers whoever asks (no Host, hostile Origin).
        let anon = raw_http(p, "GET /v1 HTTP/1.1\r\nOrigin: https://evil.test\r\n\r\n").await;
        assert_eq!(anon, plain);
        let garbage = raw_http(p, "\x16\x03\x01garbage\r\n\r\n").await;
        assert!(garbage.starts_with("HTTP/1.1 400 "), "{garbage}");
    })
    .await;
}

#[tokio::test]
async fn handshake_must_finish_in_time() {
    bounded(async {
        let h = start(Limits {
            handshake_timeout: Duration::from_millis(300),
            ..Limits::default()
        })
        .await;
        let mut s = TcpStream::connect(("127.0.0.1", h.port)).await.unwrap();
        s.write_all(b"GET /v1 HTTP/1.1\r\n").await.unwrap();
        let mut buf = Vec::new();
        // The server hangs up without an answer.
        assert_eq!(s.read_to_end(&mut buf).await.unwrap(), 0);
    })
    .await;
}

#[tokio::test]
async fn oversized_message_closes_1009() {
    bounded(async {
        let h = start(Limits::default()).await;
        let mut ws = connect(h.port, PORTAL).await;
        let big = format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"hello","params":{{}},"x":"{}"}}"#,
            "a".repeat(256 * 1024)
        );
        ws.send(Message::text(big)).await.unwrap();
        assert_eq!(close_code(&mut ws).await, CloseCode::Size);
    })
    .await;
}

#[tokio::test]
async fn binary_frame_closes_1003_and_pings_are_answered() {
    bounded(async {
        let h = start(Limits::default()).await;
        let mut ws = connect(h.port, PORTAL).await;
        ws.send(Message::Ping(b"are you there".to_vec().into()))
            .await
            .unwrap();
        match ws.next().await.unwrap().unwrap() {
            Message::Pong(p) => assert_eq!(p.as_ref(), b"are you there"),
            other => panic!("expected pong, got {other:?}"),
        }
        ws.send(Message::binary(vec![1, 2, 3])).await.unwrap();
        assert_eq!(close_code(&mut ws).await, CloseCode::Unsupported);
    })
    .await;
}

#[tokio::test]
async fn refused_messages_get_the_right_errors_and_the_connection_stays() {
    bounded(async {
        let h = start(Limits::default()).await;
        let mut ws = connect(h.port, PORTAL).await;
        ws.send(Message::text("{not json")).await.unwrap();
        let r = next_json(&mut ws).await;
        assert_eq!((reason(&r), &r["error"]["code"], &r["id"]), ("PARSE_ERROR", &json!(-32700), &Value::Null));

        let r = call(&mut ws, json!({"jsonrpc":"2.0","id":2,"method":"sign.everything","params":{}})).await;
        assert_eq!((reason(&r), &r["error"]["code"], &r["id"]), ("METHOD_NOT_FOUND", &json!(-32601), &json!(2)));

        let r = call(&mut ws, json!({"jsonrpc":"2.0","id":3,"method":"hello","params":{"colour":"red"}})).await;
        assert_eq!((reason(&r), &r["error"]["code"]), ("INVALID_PARAMS", &json!(-32602)));

        let r = call(&mut ws, json!({"jsonrpc":"2.0","id":4,"method":"hello","params":{"client":{"name":"x","version":"1","extra":{"PIN":"1234"}}}})).await;
        assert_eq!((reason(&r), &r["error"]["code"], &r["id"]), ("PIN_FROM_PAGE_REFUSED", &json!(1012), &json!(4)));

        let r = call(&mut ws, json!({"jsonrpc":"2.0","id":5,"method":"sign","params":{
            "certificateId":"c","digest":{"algorithm":"SHA-256","value":"Ilu__OwajK5ONMAQ7m8YIbYZf4_2A5Z9GX5L3Y-PeIw="},
            "display":{"title":"T"}}})).await;
        assert_eq!(reason(&r), "INVALID_PARAMS");

        let items = vec![json!({"data":"AAEC"}); 1001];
        let r = call(&mut ws, json!({"jsonrpc":"2.0","id":6,"method":"sign.batch","params":{
            "certificateId":"c","items":items,"display":{"title":"T"}}})).await;
        assert_eq!(reason(&r), "INVALID_PARAMS");

        let r = call(&mut ws, json!({"jsonrpc":"2.0","method":"hello","params":{}})).await;
        assert_eq!((reason(&r), &r["error"]["code"]), ("INVALID_REQUEST", &json!(-32600)));

        let r = call(&mut ws, json!({"jsonrpc":"2.0","id":"ok","method":"hello","params":{}})).await;
        assert_eq!(r["result"]["agent"], "keyport");
        assert_eq!(r["id"], "ok");
    })
    .await;
}

#[tokio::test]
async fn requests_over_the_rate_are_refused() {
    bounded(async {
        let h = start(Limits {
            requests_per_second: 3,
            ..Limits::default()
        })
        .await;
        let mut ws = connect(h.port, PORTAL).await;
        let n = 30;
        let began = std::time::Instant::now();
        for i in 0..n {
            ws.feed(Message::text(
                json!({"jsonrpc":"2.0","id":i,"method":"tokens.list"}).to_string(),
            ))
            .await
            .unwrap();
        }
        ws.flush().await.unwrap();
        let (mut ok, mut limited) = (0, 0);
        for _ in 0..n {
            let r = next_json(&mut ws).await;
            if r.get("result").is_some() {
                ok += 1;
            } else {
                assert_eq!(
                    (reason(&r), &r["error"]["code"]),
                    ("RATE_LIMITED", &json!(1011))
                );
                assert!(r["id"].is_number());
                limited += 1;
            }
        }
        // A burst of 3, plus at most what refilled (3/s) while the frames were in flight.
        let refilled = (began.elapsed().as_secs_f64() * 3.0).ceil() as usize;
        assert!(
            ok >= 3 && ok <= 3 + refilled,
            "{ok} answered, {refilled} refilled"
        );
        assert!(limited > 0);
        assert_eq!(ok + limited, n);
    })
    .await;
}

#[tokio::test]
async fn per_origin_connection_limit_leaves_other_origins_served() {
    bounded(async {
        let h = start(Limits {
            max_connections_per_origin: 2,
            max_connections: 3,
            ..Limits::default()
        })
        .await;
        let authority = format!("127.0.0.1:{}", h.port);
        let first = connect(h.port, PORTAL).await;
        let _second = connect(h.port, PORTAL).await;
        assert_eq!(refused_status(&authority, Some(PORTAL), None).await, 503);
        let mut other = connect(h.port, OTHER).await;
        let r = call(&mut other, json!({"jsonrpc":"2.0","id":1,"method":"hello"})).await;
        assert_eq!(r["result"]["origin"], OTHER);
        // 3 in all now: a third origin is refused too.
        assert_eq!(
            refused_status(&authority, Some("https://third.example"), None).await,
            503
        );
        // Closing one frees its slot.
        drop(first);
        h.closed.lock().await.recv().await.unwrap();
        let mut again = connect(h.port, PORTAL).await;
        let r = call(&mut again, json!({"jsonrpc":"2.0","id":1,"method":"hello"})).await;
        assert_eq!(r["result"]["origin"], PORTAL);
    })
    .await;
}

fn sign_request(id: Value) -> Value {
    json!({"jsonrpc":"2.0","id":id,"method":"sign","params":{
        "certificateId":"c","data":"AAEC","display":{"title":"Loan contract"}}})
}

#[tokio::test]
async fn cancel_reaches_a_pending_request() {
    bounded(async {
        let h = start(Limits::default()).await;
        let mut ws = connect(h.port, PORTAL).await;
        ws.send(Message::text(sign_request(json!(5)).to_string()))
            .await
            .unwrap();
        assert_eq!(h.started.lock().await.recv().await.unwrap(), json!(5));
        // The backend's notification arrives on this connection.
        let note = next_json(&mut ws).await;
        assert_eq!(
            note,
            json!({"jsonrpc":"2.0","method":"test.started","params":{"id":5}})
        );
        // A second request with the same id while the first is pending is refused.
        let dup = call(&mut ws, sign_request(json!(5))).await;
        assert_eq!(reason(&dup), "INVALID_REQUEST");

        ws.send(Message::text(
            json!({"jsonrpc":"2.0","id":6,"method":"cancel","params":{"requestId":5}}).to_string(),
        ))
        .await
        .unwrap();
        let mut answers = [next_json(&mut ws).await, next_json(&mut ws).await];
        answers.sort_by_key(|a| a["id"].as_i64());
        assert_eq!(reason(&answers[0]), "USER_CANCELLED");
        assert_eq!(answers[0]["error"]["code"], 1002);
        assert_eq!(
            answers[1],
            json!({"jsonrpc":"2.0","id":6,"result":{"cancelled":true}})
        );
        assert_eq!(h.cancelled.lock().await.recv().await.unwrap(), json!(5));

        let r = call(
            &mut ws,
            json!({"jsonrpc":"2.0","id":7,"method":"cancel","params":{"requestId":5}}),
        )
        .await;
        assert_eq!(r["result"], json!({"cancelled": false}));
        let r = call(
            &mut ws,
            json!({"jsonrpc":"2.0","id":8,"method":"cancel","params":{"requestId":"nope"}}),
        )
        .await;
        assert_eq!(r["result"], json!({"cancelled": false}));
    })
    .await;
}

#[tokio::test]
async fn closing_the_connection_cancels_its_pending_requests() {
    bounded(async {
        let h = start(Limits::default()).await;
        let mut ws = connect(h.port, PORTAL).await;
        ws.send(Message::text(sign_request(json!("a")).to_string()))
            .await
            .unwrap();
        assert_eq!(h.started.lock().await.recv().await.unwrap(), json!("a"));
        ws.close(None).await.unwrap();
        assert_eq!(h.cancelled.lock().await.recv().await.unwrap(), json!("a"));
        h.closed.lock().await.recv().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn broadcast_reaches_only_the_filtered_origins() {
    bounded(async {
        let h = start(Limits::default()).await;
        let mut portal = connect(h.port, PORTAL).await;
        let mut other = connect(h.port, OTHER).await;
        // Both connections are registered once they have answered a request.
        call(
            &mut portal,
            json!({"jsonrpc":"2.0","id":1,"method":"hello"}),
        )
        .await;
        call(&mut other, json!({"jsonrpc":"2.0","id":1,"method":"hello"})).await;
        h.broadcaster
            .send("tokens.changed", json!({"tokens": []}), |o| {
                o.as_str() == PORTAL
            });
        let event = next_json(&mut portal).await;
        assert_eq!(
            event,
            json!({"jsonrpc":"2.0","method":"tokens.changed","params":{"tokens":[]}})
        );
        // `other` got nothing: the next thing it reads is the answer to its next request.
        let r = call(
            &mut other,
            json!({"jsonrpc":"2.0","id":2,"method":"tokens.list"}),
        )
        .await;
        assert_eq!(r["id"], 2);
        // A denied origin never gets a connection to receive anything on.
        assert_eq!(
            refused_status(
                &format!("127.0.0.1:{}", h.port),
                Some("https://denied.example"),
                None
            )
            .await,
            403
        );
    })
    .await;
}

#[tokio::test]
async fn shutdown_cancels_and_closes_with_1001() {
    bounded(async {
        let mut h = start(Limits::default()).await;
        let mut ws = connect(h.port, PORTAL).await;
        ws.send(Message::text(sign_request(json!(1)).to_string()))
            .await
            .unwrap();
        h.started.lock().await.recv().await.unwrap();
        h.stop.take().unwrap().send(()).unwrap();
        assert_eq!(close_code(&mut ws).await, CloseCode::Away);
        assert_eq!(h.cancelled.lock().await.recv().await.unwrap(), json!(1));
        h.served.await.unwrap().unwrap();
        // No longer accepting.
        assert!(TcpStream::connect(("127.0.0.1", h.port)).await.is_err());
    })
    .await;
}

#[tokio::test]
async fn bind_refuses_a_port_in_use_and_non_loopback_addresses() {
    bounded(async {
        let h = start(Limits::default()).await;
        let taken = ServerConfig {
            port: h.port,
            ..ServerConfig::default()
        };
        let (tx, _rx) = mpsc::unbounded_channel();
        let (tx2, _rx2) = mpsc::unbounded_channel();
        let (tx3, _rx3) = mpsc::unbounded_channel();
        let toy = Arc::new(Toy {
            admitted: vec![],
            started: tx,
            cancelled: tx2,
            closed: tx3,
        });
        match bind(taken, toy.clone()).await {
            Err(Error::PortInUse { addr, .. }) => {
                assert_eq!(addr.port(), h.port);
                assert_eq!(addr.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
            }
            other => panic!(
                "expected PortInUse, got {:?}",
                other.map(|b| b.local_addrs())
            ),
        }
        for addr in [
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        ] {
            let config = ServerConfig {
                port: 0,
                bind: vec![IpAddr::V4(Ipv4Addr::LOCALHOST), addr],
                ..ServerConfig::default()
            };
            assert!(matches!(
                bind(config, toy.clone()).await,
                Err(Error::NotLoopback { .. })
            ));
        }
        let empty = ServerConfig {
            port: 0,
            bind: vec![],
            ..ServerConfig::default()
        };
        assert!(matches!(bind(empty, toy).await, Err(Error::NoBindAddress)));
    })
    .await;
}

#[tokio::test]
async fn strangers_share_a_pool_the_portal_does_not_and_idle_strangers_close() {
    bounded(async {
        let h = start(Limits {
            max_connections: 6,
            max_unapproved_connections: 2,
            unapproved_idle_timeout: Duration::from_millis(300),
            ..Limits::default()
        })
        .await;
        let authority = format!("127.0.0.1:{}", h.port);
        let mut a = connect(h.port, OTHER).await;
        let mut b = connect(h.port, "https://third.example").await;
        // The pool is full for every stranger; the portal is still served.
        assert_eq!(refused_status(&authority, Some(OTHER), None).await, 503);
        let mut portal = connect(h.port, PORTAL).await;
        let r = call(
            &mut portal,
            json!({"jsonrpc":"2.0","id":1,"method":"hello"}),
        )
        .await;
        assert_eq!(r["result"]["origin"], PORTAL);
        // A stranger with a request pending is not idle; one without is closed with 1000.
        a.send(Message::text(sign_request(json!(9)).to_string()))
            .await
            .unwrap();
        h.started.lock().await.recv().await.unwrap();
        assert_eq!(close_code(&mut b).await, CloseCode::Normal);
        let mut c = connect(h.port, "https://third.example").await;
        let r = call(&mut c, json!({"jsonrpc":"2.0","id":2,"method":"hello"})).await;
        assert_eq!(r["result"]["origin"], "https://third.example");
        // The portal's idle connection stays open.
        let r = call(
            &mut portal,
            json!({"jsonrpc":"2.0","id":3,"method":"hello"}),
        )
        .await;
        assert_eq!(r["result"]["origin"], PORTAL);
    })
    .await;
}

#[tokio::test]
async fn a_flood_of_silent_sockets_evicts_the_oldest_and_a_real_client_gets_through() {
    bounded(async {
        let h = start(Limits {
            max_pending_handshakes: 4,
            handshake_timeout: Duration::from_secs(60),
            ..Limits::default()
        })
        .await;
        let mut silent = Vec::new();
        for _ in 0..12 {
            silent.push(TcpStream::connect(("127.0.0.1", h.port)).await.unwrap());
        }
        // A real client is served at once, long before any handshake timeout.
        let mut ws = connect(h.port, PORTAL).await;
        let r = call(&mut ws, json!({"jsonrpc":"2.0","id":1,"method":"hello"})).await;
        assert_eq!(r["result"]["origin"], PORTAL);
        // The oldest silent sockets were closed by the server (EOF), not left open.
        let mut buf = [0u8; 1];
        for s in silent.iter_mut().take(8) {
            assert_eq!(s.read(&mut buf).await.unwrap(), 0);
        }
    })
    .await;
}
