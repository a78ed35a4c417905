//! The loopback WebSocket server: binding, the accept loop, connection limits, broadcasts and
//! graceful shutdown. One connection's life is in `connection.rs`, the HTTP handshake in
//! `handshake.rs`.

mod connection;
mod handshake;
mod peer;

/// The HTTP handshake judge (Host, Origin, upgrade headers) on a raw request head, for the
/// fuzzer (`fuzz/fuzz_targets/handshake.rs`): `Ok(origin)` when it would upgrade, else the HTTP
/// status it would answer.
#[doc(hidden)]
pub fn judge_handshake(
    head: &[u8],
    port: u16,
    allow_insecure_localhost: bool,
) -> Result<Origin, u16> {
    handshake::judge(head, port, allow_insecure_localhost)
        .map(|(up, _)| up.origin)
        .map_err(|r| r.status())
}

/// The owner uid of the row for `local` → `remote` in a `/proc/net/tcp{,6}` text, for the fuzzer.
#[doc(hidden)]
pub fn peer_uid_in_table(table: &str, local: SocketAddr, remote: SocketAddr) -> Option<u32> {
    peer::find_uid(table, local, remote)
}

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::protocol::{self, Answer, Event, Request, RpcError};
use crate::{Error, Origin};

/// The agent's port unless configured otherwise.
pub const DEFAULT_PORT: u16 = 47333;

/// Where and how the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// TCP port; 0 picks a free one (tests). Every address binds the same port.
    pub port: u16,
    /// Loopback addresses to bind (default `127.0.0.1` and `::1`); any other address is refused.
    pub bind: Vec<IpAddr>,
    /// Frame, connection and rate limits.
    pub limits: Limits,
    /// Also accept `http://localhost[:p]` and `http://127.0.0.1[:p]` origins (development).
    pub allow_insecure_localhost_origins: bool,
    /// Refuse (403) a connection whose peer socket belongs to another user of this machine.
    /// Linux only (the peer is looked up in `/proc/net/tcp{,6}`); elsewhere it has no effect.
    pub same_user_only: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            port: DEFAULT_PORT,
            bind: vec![
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(Ipv6Addr::LOCALHOST),
            ],
            limits: Limits::default(),
            allow_insecure_localhost_origins: false,
            same_user_only: true,
        }
    }
}

/// Resource limits (docs/protocol.md "Limits").
///
/// Connections over `max_connections` in all, over `max_connections_per_origin` for one
/// origin, or — for origins the backend does not call approved ([`Backend::is_approved`]) — over
/// `max_unapproved_connections` for all such origins together, are refused before the upgrade
/// with **503 Service Unavailable** (no body), after the Host/Origin checks. So strangers share
/// one small pool and an approved origin always finds room. A connection of that pool with no
/// request pending and no frame received for `unapproved_idle_timeout` is closed (1000).
/// Connections still in the HTTP handshake are at most `max_pending_handshakes`: accepting one
/// more closes the oldest of them (a flood of sockets that never send a request holds at most
/// that many descriptors, while a real client, which sends its request at once, gets through),
/// and each has `handshake_timeout` to finish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame and message; a bigger one closes the connection with 1009.
    pub max_message_bytes: usize,
    /// Open connections per origin.
    pub max_connections_per_origin: usize,
    /// Open connections in all.
    pub max_connections: usize,
    /// Requests per second per connection (token bucket, burst of the same size); the excess
    /// gets `RATE_LIMITED`.
    pub requests_per_second: u32,
    /// Time from TCP accept to a completed upgrade.
    pub handshake_timeout: Duration,
    /// Open connections of all origins not approved, together.
    pub max_unapproved_connections: usize,
    /// How long a connection of an origin not approved may stay idle.
    pub unapproved_idle_timeout: Duration,
    /// Accepted connections that have not finished their HTTP handshake.
    pub max_pending_handshakes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 256 * 1024,
            max_connections_per_origin: 8,
            max_connections: 64,
            requests_per_second: 20,
            handshake_timeout: Duration::from_secs(5),
            max_unapproved_connections: 8,
            unapproved_idle_timeout: Duration::from_secs(30),
            max_pending_handshakes: 16,
        }
    }
}

/// What the agent plugs into the bridge.
pub trait Backend: Send + Sync + 'static {
    /// Handshake-time policy (denied list, `unknown_origins = "reject"`): false → 403 before the
    /// upgrade. Called for every upgrade attempt whose Host and Origin headers are valid.
    fn admit_origin(&self, origin: &Origin) -> bool;

    /// Whether the origin is approved (listed or remembered), which decides its connection
    /// pool (see [`Limits`]). Called after `admit_origin` said yes. The default, true, puts every
    /// origin in the common pool: a backend with an approval step must answer for itself.
    fn is_approved(&self, _origin: &Origin) -> bool {
        true
    }

    /// Answers one request (never `cancel`, which the bridge answers itself). Requests of one
    /// connection run concurrently. When `ctx.cancel` fires, answer `USER_CANCELLED` soon.
    fn handle(
        &self,
        ctx: RequestContext,
        request: Request,
    ) -> impl Future<Output = Result<Answer, RpcError>> + Send;

    /// A connection ended (its pending requests have been cancelled).
    fn connection_closed(&self, _conn: ConnectionId) {}
}

/// Identifies one WebSocket connection for the life of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionId(pub u64);

impl std::fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "c{}", self.0)
    }
}

/// Everything a backend knows about the request it handles.
#[derive(Debug, Clone)]
pub struct RequestContext {
    /// The connection's Origin header (never a field of a message).
    pub origin: Origin,
    /// The connection.
    pub connection: ConnectionId,
    /// The request's `id` (number or string).
    pub request_id: Value,
    /// Sends notifications (e.g. `sign.progress`) on this connection.
    pub notifier: Notifier,
    /// Fires when `cancel` names this request, the connection closes, or the server shuts down.
    pub cancel: CancelSignal,
}

/// Sends notifications on one connection.
#[derive(Debug, Clone)]
pub struct Notifier {
    tx: mpsc::UnboundedSender<Outgoing>,
}

impl Notifier {
    /// Sends `{"jsonrpc": "2.0", "method", "params"}`; false if the connection is gone.
    pub fn notify(&self, method: &str, params: Value) -> bool {
        let text = protocol::notification(method, params).to_string();
        self.tx.send(Outgoing::Text(text)).is_ok()
    }

    /// Sends an event; false if the connection is gone.
    pub fn send_event<E: Event>(&self, event: &E) -> bool {
        self.notify(E::METHOD, protocol::to_json(event))
    }
}

/// Resolves when a request is cancelled.
#[derive(Debug, Clone)]
pub struct CancelSignal {
    rx: watch::Receiver<bool>,
}

impl CancelSignal {
    /// A signal and the trigger that fires it.
    pub fn new() -> (CancelTrigger, CancelSignal) {
        let (tx, rx) = watch::channel(false);
        (CancelTrigger { tx }, CancelSignal { rx })
    }

    /// Waits until cancelled. Never resolves if the trigger is dropped without firing.
    pub async fn cancelled(&self) {
        let mut rx = self.rx.clone();
        if rx.wait_for(|c| *c).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Whether it has fired.
    pub fn is_cancelled(&self) -> bool {
        *self.rx.borrow()
    }
}

/// Fires a [`CancelSignal`].
#[derive(Debug)]
pub struct CancelTrigger {
    tx: watch::Sender<bool>,
}

impl CancelTrigger {
    /// Fires the signal (idempotent).
    pub fn cancel(&self) {
        self.tx.send_replace(true);
    }
}

/// What the writer half of a connection sends.
#[derive(Debug)]
pub(crate) enum Outgoing {
    Text(String),
}

/// A server with its sockets bound, not yet serving.
#[derive(Debug)]
pub struct BoundServer<B> {
    listeners: Vec<TcpListener>,
    shared: Arc<Shared<B>>,
}

#[derive(Debug)]
pub(crate) struct Shared<B> {
    pub backend: Arc<B>,
    pub limits: Limits,
    pub allow_insecure_localhost_origins: bool,
    /// The socket tables the peer's owner is looked up in; `None`: `same_user_only` is off.
    pub peer_tables: Option<Arc<peer::SocketTables>>,
    pub port: u16,
    pub registry: Arc<Registry>,
    /// Connections accepted whose handshake has not ended, oldest first.
    pub pending_handshakes: Arc<Mutex<PendingQueue>>,
}

/// Binds every configured address on one port. Fails rather than fall back: a port in use is
/// [`Error::PortInUse`], a non-loopback address [`Error::NotLoopback`].
pub async fn bind<B: Backend>(
    config: ServerConfig,
    backend: Arc<B>,
) -> Result<BoundServer<B>, Error> {
    if config.bind.is_empty() {
        return Err(Error::NoBindAddress);
    }
    if let Some(addr) = config.bind.iter().find(|a| !a.is_loopback()) {
        return Err(Error::NotLoopback { addr: *addr });
    }
    // With port 0 the first address picks the port and the others must get the same one; if
    // another process holds it on a later address, pick again (a few times).
    let attempts = if config.port == 0 { 8 } else { 1 };
    let mut last_err = None;
    for _ in 0..attempts {
        match bind_all(&config.bind, config.port).await {
            Ok((listeners, port)) => {
                let shared = Arc::new(Shared {
                    backend,
                    limits: config.limits,
                    allow_insecure_localhost_origins: config.allow_insecure_localhost_origins,
                    peer_tables: config
                        .same_user_only
                        .then(|| Arc::new(peer::SocketTables::open())),
                    port,
                    registry: Arc::new(Registry::default()),
                    pending_handshakes: Arc::default(),
                });
                tracing::info!(port, addrs = ?config.bind, "bridge bound");
                return Ok(BoundServer { listeners, shared });
            }
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err.unwrap_or(Error::NoBindAddress))
}

async fn bind_all(addrs: &[IpAddr], port: u16) -> Result<(Vec<TcpListener>, u16), Error> {
    let mut listeners = Vec::with_capacity(addrs.len());
    let mut port = port;
    for ip in addrs {
        let addr = SocketAddr::new(*ip, port);
        let listener = TcpListener::bind(addr).await.map_err(|source| {
            if source.kind() == std::io::ErrorKind::AddrInUse {
                Error::PortInUse { addr, source }
            } else {
                Error::Bind { addr, source }
            }
        })?;
        port = listener
            .local_addr()
            .map_err(|source| Error::Bind { addr, source })?
            .port();
        listeners.push(listener);
    }
    Ok((listeners, port))
}

impl<B: Backend> BoundServer<B> {
    /// The addresses actually bound (with the real port when 0 was asked).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// The port every address is bound on.
    pub fn port(&self) -> u16 {
        self.shared.port
    }

    /// A handle that sends events to open connections; usable before and after `serve` starts.
    pub fn broadcaster(&self) -> Broadcaster {
        Broadcaster {
            registry: self.shared.registry.clone(),
        }
    }

    /// Serves until `shutdown` resolves, then stops accepting, cancels pending requests, closes
    /// every connection with 1001 (going away) and returns once the connections have ended.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let (accepted_tx, mut accepted_rx) = mpsc::channel(16);
        let mut acceptors = JoinSet::new();
        for listener in self.listeners {
            let tx = accepted_tx.clone();
            acceptors.spawn(async move {
                loop {
                    match listener.accept().await {
                        Ok((stream, peer)) => {
                            if tx.send((stream, peer)).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            // Out of descriptors and the like: wait a little, keep serving.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            });
        }
        drop(accepted_tx);
        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = accepted_rx.recv() => match accepted {
                    Some((stream, peer)) => {
                        let pending = PendingHandshake::claim(&self.shared);
                        let shared = self.shared.clone();
                        let stop = stop_rx.clone();
                        connections.spawn(connection::run(shared, stream, peer, pending, stop));
                    }
                    None => break,
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        tracing::info!("bridge shutting down");
        acceptors.abort_all();
        while acceptors.join_next().await.is_some() {}
        stop_tx.send_replace(true);
        while connections.join_next().await.is_some() {}
        Ok(())
    }
}

/// Sends events to every open connection whose origin passes a filter.
#[derive(Debug, Clone)]
pub struct Broadcaster {
    registry: Arc<Registry>,
}

impl Broadcaster {
    /// Sends the notification `method`/`params` to each open connection whose origin `to` accepts
    /// (e.g. approved origins only, for `tokens.changed`).
    pub fn send(&self, method: &str, params: Value, to: impl Fn(&Origin) -> bool) {
        let text = protocol::notification(method, params).to_string();
        let conns = self.registry.lock();
        for entry in conns.values() {
            if let Some(tx) = &entry.tx {
                if to(&entry.origin) {
                    // A closing connection may have dropped its receiver: nothing to do.
                    let _ = tx.send(Outgoing::Text(text.clone()));
                }
            }
        }
    }

    /// Sends an event, as [`Broadcaster::send`].
    pub fn send_event<E: Event>(&self, event: &E, to: impl Fn(&Origin) -> bool) {
        self.send(E::METHOD, protocol::to_json(event), to);
    }
}

/// Connections in their handshake, oldest first, each with the signal that evicts it.
#[derive(Debug, Default)]
pub(crate) struct PendingQueue {
    next: u64,
    entries: std::collections::VecDeque<(u64, Arc<tokio::sync::Notify>)>,
}

/// One of the `max_pending_handshakes` places; given back on drop (the handshake ended).
#[derive(Debug)]
pub(crate) struct PendingHandshake {
    id: u64,
    evict: Arc<tokio::sync::Notify>,
    queue: Arc<Mutex<PendingQueue>>,
}

impl PendingHandshake {
    /// Takes a place, evicting the oldest connection still in its handshake when all are taken.
    fn claim<B>(shared: &Shared<B>) -> PendingHandshake {
        let queue = Arc::clone(&shared.pending_handshakes);
        let mut q = queue.lock().unwrap_or_else(PoisonError::into_inner);
        while q.entries.len() >= shared.limits.max_pending_handshakes.max(1) {
            if let Some((_, oldest)) = q.entries.pop_front() {
                oldest.notify_one();
                tracing::debug!("too many connections in their handshake; the oldest is closed");
            }
        }
        let id = q.next;
        q.next += 1;
        let evict = Arc::new(tokio::sync::Notify::new());
        q.entries.push_back((id, Arc::clone(&evict)));
        drop(q);
        PendingHandshake { id, evict, queue }
    }

    /// Resolves when a newer connection took this one's place.
    pub(crate) async fn evicted(&self) {
        self.evict.notified().await;
    }
}

impl Drop for PendingHandshake {
    fn drop(&mut self) {
        let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        q.entries.retain(|(id, _)| *id != self.id);
    }
}

/// Open (and opening) connections, for limits and broadcasts.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    conns: Mutex<HashMap<ConnectionId, RegistryEntry>>,
    next_id: AtomicU64,
}

#[derive(Debug)]
struct RegistryEntry {
    origin: Origin,
    /// In the common pool of origins not approved when the connection opened.
    unapproved: bool,
    tx: Option<mpsc::UnboundedSender<Outgoing>>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ConnectionId, RegistryEntry>> {
        // The map stays consistent even if a holder panicked (each update is one insert/remove).
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a connection slot for `origin` (in the common pool of strangers when it is not
    /// `approved`), or None when a limit is reached.
    pub(crate) fn reserve(
        self: &Arc<Self>,
        origin: &Origin,
        approved: bool,
        limits: &Limits,
    ) -> Option<Slot> {
        let mut conns = self.lock();
        let same_origin = conns.values().filter(|e| &e.origin == origin).count();
        let strangers = conns.values().filter(|e| e.unapproved).count();
        if conns.len() >= limits.max_connections
            || same_origin >= limits.max_connections_per_origin
            || (!approved && strangers >= limits.max_unapproved_connections)
        {
            return None;
        }
        let id = ConnectionId(self.next_id.fetch_add(1, Ordering::Relaxed));
        conns.insert(
            id,
            RegistryEntry {
                origin: origin.clone(),
                unapproved: !approved,
                tx: None,
            },
        );
        Some(Slot {
            id,
            unapproved: !approved,
            registry: self.clone(),
        })
    }
}

/// A reserved connection slot; released on drop.
#[derive(Debug)]
pub(crate) struct Slot {
    pub id: ConnectionId,
    /// Taken from the common pool of origins not approved.
    pub unapproved: bool,
    registry: Arc<Registry>,
}

impl Slot {
    /// Makes the connection reachable by broadcasts.
    pub(crate) fn attach(&self, tx: mpsc::UnboundedSender<Outgoing>) {
        if let Some(entry) = self.registry.lock().get_mut(&self.id) {
            entry.tx = Some(tx);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}
