//! One connection: handshake, then a reader loop that parses, rate-limits and dispatches
//! requests (each in its own task, so `cancel` can reach a pending one), and a writer task.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::time::Instant as Deadline;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::error::Error as WsError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tracing::Instrument;

use super::handshake::{self, Refuse};
use super::peer::PeerOwner;
use super::{
    Backend, CancelSignal, CancelTrigger, Notifier, Outgoing, PendingHandshake, RequestContext,
    Shared, Slot,
};
use crate::protocol::{self, CancelResult, IncomingRequest, Reason, Request, RpcError};
use crate::Origin;

type Pending = Arc<Mutex<HashMap<String, CancelTrigger>>>;

/// A connection's initial read buffer (tungstenite's default is 128 KiB).
const READ_BUFFER_BYTES: usize = 4096;

/// At shutdown, how long a connection's cancelled requests get to send their answers before the
/// close frame goes out. A dialog closes at once on cancel and a token gets 2 s (the service's
/// cancel grace), so this bound is only reached by a module that ignores both.
const SHUTDOWN_ANSWER_GRACE: Duration = Duration::from_secs(5);

/// A connection's requests: the pending ones by id (for `cancel`), and a sender each running
/// request holds a clone of, so that the receiver sees `None` once all have answered.
struct Requests {
    pending: Pending,
    running: mpsc::Sender<()>,
}

/// Runs one accepted TCP connection to its end.
pub(crate) async fn run<B: Backend>(
    shared: Arc<Shared<B>>,
    mut stream: TcpStream,
    peer: SocketAddr,
    pending: PendingHandshake,
    mut stop: watch::Receiver<bool>,
) {
    let timeout = shared.limits.handshake_timeout;
    let upgraded = tokio::select! {
        r = tokio::time::timeout(timeout, admit(&shared, &mut stream, peer)) => r,
        _ = stop.wait_for(|s| *s) => return,
        () = pending.evicted() => {
            tracing::debug!(%peer, "closed in its handshake to make room for a newer connection");
            return;
        }
    };
    drop(pending);
    let (origin, slot, leftover) = match upgraded {
        Ok(Ok(up)) => up,
        Ok(Err(Some(refusal))) => {
            tracing::debug!(%peer, ?refusal, "upgrade refused");
            handshake::refuse(&mut stream, refusal).await;
            return;
        }
        Ok(Err(None)) => return,
        Err(_elapsed) => {
            tracing::debug!(%peer, "handshake timed out");
            return;
        }
    };
    // tungstenite's defaults give every connection a 128 KiB read buffer up front and gather
    // 128 KiB before a write: requests and answers here are small (a large batch grows the
    // buffer while it lasts), and each answer is sent at once.
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(0)
        .max_message_size(Some(shared.limits.max_message_bytes))
        .max_frame_size(Some(shared.limits.max_message_bytes));
    let ws =
        WebSocketStream::from_partially_read(stream, leftover, Role::Server, Some(config)).await;
    let span = tracing::info_span!("connection", conn = %slot.id, origin = %origin);
    serve_socket(shared, ws, origin, slot, stop)
        .instrument(span)
        .await;
}

/// The peer's user first (another local user's socket gets 403 before its request is read),
/// then the HTTP upgrade.
async fn admit<B: Backend>(
    shared: &Shared<B>,
    stream: &mut TcpStream,
    peer: SocketAddr,
) -> Result<(Origin, Slot, Vec<u8>), Option<Refuse>> {
    if let Some(tables) = &shared.peer_tables {
        let local = stream.local_addr().map_err(|_| None)?;
        let tables = Arc::clone(tables);
        let owner = tokio::task::spawn_blocking(move || {
            // Once more when the peer's row was missing: the kernel prints the table in
            // pieces, and a row can be passed over while other sockets come and go.
            match tables.owner(local, peer) {
                PeerOwner::Unknown => tables.owner(local, peer),
                owner => owner,
            }
        })
        .await
        .unwrap_or(PeerOwner::Unknown);
        match owner {
            PeerOwner::SameUser => {}
            PeerOwner::OtherUser(uid) => {
                tracing::warn!(%peer, uid, "connection from another user's socket refused");
                return Err(Some(Refuse::Forbidden));
            }
            PeerOwner::Unknown => {
                tracing::debug!(%peer, "the peer's socket owner cannot be told; refused");
                return Err(Some(Refuse::Forbidden));
            }
        }
    }
    upgrade(shared, stream).await
}

/// The HTTP part: read, judge, ask the backend, reserve a slot, answer 101. `Err(None)`: the
/// peer went away or sent garbage that deserves no answer.
async fn upgrade<B: Backend>(
    shared: &Shared<B>,
    stream: &mut TcpStream,
) -> Result<(Origin, Slot, Vec<u8>), Option<Refuse>> {
    let buf = match handshake::read_head(stream).await {
        Ok(Ok(buf)) => buf,
        Ok(Err(refusal)) => return Err(Some(refusal)),
        Err(_) => return Err(None),
    };
    let (up, head_len) =
        handshake::judge(&buf, shared.port, shared.allow_insecure_localhost_origins)
            .map_err(Some)?;
    if !shared.backend.admit_origin(&up.origin) {
        return Err(Some(Refuse::Forbidden));
    }
    let approved = shared.backend.is_approved(&up.origin);
    let slot = shared
        .registry
        .reserve(&up.origin, approved, &shared.limits)
        .ok_or(Some(Refuse::Unavailable))?;
    handshake::switch_protocols(stream, &up.key)
        .await
        .map_err(|_| None)?;
    Ok((up.origin, slot, buf[head_len..].to_vec()))
}

/// A token bucket: `rate` requests a second, bursts of `rate`.
struct RateLimiter {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    fn new(rate: u32) -> Self {
        RateLimiter {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            last: Instant::now(),
        }
    }

    fn try_take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

async fn serve_socket<B: Backend>(
    shared: Arc<Shared<B>>,
    ws: WebSocketStream<TcpStream>,
    origin: Origin,
    slot: Slot,
    mut stop: watch::Receiver<bool>,
) {
    tracing::debug!("connection open");
    let (mut sink, mut incoming) = ws.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Outgoing>();
    let (close_tx, mut close_rx) = mpsc::channel::<CloseCode>(1);
    slot.attach(tx.clone());
    let writer = tokio::spawn(async move {
        loop {
            tokio::select! {
                biased;
                out = rx.recv() => match out {
                    Some(Outgoing::Text(text)) => {
                        if sink.send(Message::text(text)).await.is_err() {
                            return;
                        }
                    }
                    None => return,
                },
                code = close_rx.recv() => {
                    if let Some(code) = code {
                        let frame = CloseFrame { code, reason: "".into() };
                        // The peer may be gone already.
                        let _ = sink.send(Message::Close(Some(frame))).await;
                    }
                    let _ = sink.close().await;
                    return;
                }
            }
        }
    });

    let (running, mut all_ended) = mpsc::channel::<()>(1);
    let requests = Requests {
        pending: Arc::default(),
        running,
    };
    let mut limiter = RateLimiter::new(shared.limits.requests_per_second);
    // Connections of the strangers' pool close when idle, so they cannot hold it for good.
    let idle = slot
        .unapproved
        .then_some(shared.limits.unapproved_idle_timeout);
    let mut idle_deadline = idle.map(|d| Deadline::now() + d);
    let close_code = loop {
        let idle_wait = async {
            match idle_deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending::<()>().await,
            }
        };
        let message = tokio::select! {
            _ = stop.wait_for(|s| *s) => break Some(CloseCode::Away),
            m = incoming.next() => m,
            () = idle_wait => {
                if lock(&requests.pending).is_empty() {
                    tracing::debug!("idle connection of an origin not approved closed");
                    break Some(CloseCode::Normal);
                }
                idle_deadline = idle.map(|d| Deadline::now() + d);
                continue;
            }
        };
        idle_deadline = idle.map(|d| Deadline::now() + d);
        match message {
            None => break None,
            Some(Ok(Message::Text(text))) => {
                let allowed = limiter.try_take();
                handle_text(
                    &shared,
                    &origin,
                    slot.id,
                    &tx,
                    &requests,
                    text.as_str(),
                    allowed,
                );
            }
            Some(Ok(Message::Binary(_))) => break Some(CloseCode::Unsupported),
            // Pings are answered by tungstenite while reading; a peer's Close is answered too,
            // and the next read ends the stream.
            Some(Ok(
                Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_),
            )) => {}
            Some(Err(WsError::Capacity(e))) => {
                tracing::debug!(error = %e, "message over the size limit");
                break Some(CloseCode::Size);
            }
            // RFC 6455 §8.1: a text message that is not UTF-8 fails the connection with 1007.
            Some(Err(WsError::Utf8(e))) => {
                tracing::debug!(error = %e, "text frame is not UTF-8");
                break Some(CloseCode::Invalid);
            }
            // §7.4.1: 1002 for a protocol error (reserved bits, unmasked client frame, bad
            // opcode, fragmented or oversized control frame, …).
            Some(Err(WsError::Protocol(e))) => {
                tracing::debug!(error = %e, "WebSocket protocol violation");
                break Some(CloseCode::Protocol);
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "connection error");
                break None;
            }
        }
    };
    cancel_all(&requests.pending);
    drop(requests);
    if close_code == Some(CloseCode::Away) {
        // The agent is stopping: the cancelled requests answer (USER_CANCELLED) before the close,
        // and their dialogs and token jobs have ended before the process exits.
        let _ = tokio::time::timeout(SHUTDOWN_ANSWER_GRACE, all_ended.recv()).await;
    }
    if let Some(code) = close_code {
        let _ = close_tx.send(code).await;
    }
    drop(close_tx);
    // Bounded: a peer that stopped reading must not hold shutdown up.
    let _ = tokio::time::timeout(shared.limits.handshake_timeout, writer).await;
    let conn = slot.id;
    drop(slot);
    shared.backend.connection_closed(conn);
    tracing::debug!(?close_code, "connection closed");
}

fn lock(pending: &Pending) -> std::sync::MutexGuard<'_, HashMap<String, CancelTrigger>> {
    // Each update is a single insert/remove: the map stays consistent after a panic elsewhere.
    pending.lock().unwrap_or_else(PoisonError::into_inner)
}

fn cancel_all(pending: &Pending) {
    for trigger in lock(pending).values() {
        trigger.cancel();
    }
}

fn send_json(tx: &mpsc::UnboundedSender<Outgoing>, value: &Value) {
    // The writer may be gone when the peer left; the answer has nobody to go to.
    let _ = tx.send(Outgoing::Text(value.to_string()));
}

fn handle_text<B: Backend>(
    shared: &Arc<Shared<B>>,
    origin: &Origin,
    conn: super::ConnectionId,
    tx: &mpsc::UnboundedSender<Outgoing>,
    requests: &Requests,
    text: &str,
    allowed: bool,
) {
    let parsed = protocol::parse_request(text);
    if !allowed {
        let id = match &parsed {
            Ok(r) => r.id.clone(),
            Err(r) => r.id.clone(),
        };
        send_json(
            tx,
            &protocol::error_response(&id, &RpcError::rate_limited()),
        );
        return;
    }
    let IncomingRequest { id, request } = match parsed {
        Ok(r) => r,
        Err(refusal) => {
            tracing::debug!(reason = %refusal.error.reason, "request refused");
            send_json(tx, &protocol::error_response(&refusal.id, &refusal.error));
            return;
        }
    };
    let key = id.to_string();
    if let Request::Cancel { request_id } = &request {
        let found = lock(&requests.pending)
            .get(&request_id.to_string())
            .map(CancelTrigger::cancel);
        let result = CancelResult {
            cancelled: found.is_some(),
        };
        send_json(tx, &protocol::response(&id, protocol::to_json(&result)));
        return;
    }
    let (trigger, cancel) = CancelSignal::new();
    {
        let mut map = lock(&requests.pending);
        if map.contains_key(&key) {
            drop(map);
            let error = RpcError::invalid_request("a request with this id is still pending");
            send_json(tx, &protocol::error_response(&id, &error));
            return;
        }
        map.insert(key.clone(), trigger);
    }
    let ctx = RequestContext {
        origin: origin.clone(),
        connection: conn,
        request_id: id.clone(),
        notifier: Notifier { tx: tx.clone() },
        cancel,
    };
    let span = tracing::info_span!("request", id = %key, method = request.method());
    let backend = shared.backend.clone();
    let tx = tx.clone();
    let pending = requests.pending.clone();
    let running = requests.running.clone();
    tokio::spawn(
        async move {
            let _running = running;
            let outcome = backend.handle(ctx, request).await;
            lock(&pending).remove(&key);
            let text = match outcome {
                Ok(result) => protocol::response_text(&id, &result),
                Err(error) if error.reason == Reason::Internal => {
                    // The detail (paths, program names, a bug's text) is for the log only.
                    tracing::warn!(detail = %error.message, "internal error");
                    protocol::error_response(&id, &RpcError::internal_for(&id)).to_string()
                }
                Err(error) => {
                    tracing::debug!(reason = %error.reason, "request failed");
                    protocol::error_response(&id, &error).to_string()
                }
            };
            // The writer may be gone when the peer left; the answer has nobody to go to.
            let _ = tx.send(Outgoing::Text(text));
        }
        .instrument(span),
    );
}
