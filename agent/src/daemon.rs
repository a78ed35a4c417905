//! `keyport run`: wires configuration, tokens, dialogs, audit and the WebSocket server, prints
//! one `listening on ws://127.0.0.1:PORT/v1` line when it accepts connections, and stops cleanly
//! on SIGTERM or SIGINT.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use browser_bridge::{Limits, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::audit::AuditLog;
use crate::config::{Config, Paths};
use crate::dialog::{Language, Texts};
use crate::origins::OriginStore;
use crate::pinentry::Pinentry;
use crate::secrets::{self, AuditKeySource};
use crate::service::Service;
use crate::tokens::TokenSet;

/// The runtime the agent serves on: one worker thread (plus tokio's pool for blocking work),
/// unless `TOKIO_WORKER_THREADS` says otherwise.
///
/// A worker per core (tokio's default) made the two workers of a 2-core machine wake each
/// other for every request: with the request's own thread hops (the module host, the audit
/// writer) that cost more than it brought. Alternated on the benchmark (issue 12, BENCHMARKS
/// §3 "Fifth round"), one worker used a quarter to a third less agent CPU per `sign` with one
/// connection, and reached no lower a rate with 8 or 32. What may take long runs off the
/// worker: a module's calls in its host process, the audit log's `fdatasync` on its writer
/// thread, the rest on tokio's blocking pool; a job's write to its host's socket is bounded
/// (`WRITE_WAIT`).
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        builder.worker_threads(1);
    }
    builder.enable_all().build()
}

/// Options of `keyport run` beyond the configuration.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Also serve the demo portal on this port of 127.0.0.1.
    pub demo_port: Option<u16>,
}

/// The pinentry program: the configured one, else `pinentry` on the PATH.
pub fn pinentry_for(config: &Config) -> anyhow::Result<Pinentry> {
    let program = match &config.pinentry {
        Some(p) => p.clone(),
        None => find_in_path("pinentry").context(
            "no pinentry program found: install one (apt install pinentry-gnome3 or pinentry-tty) \
             or set `pinentry = \"/path/to/pinentry\"` in the configuration",
        )?,
    };
    Ok(Pinentry::new(program)
        .timeout(config.dialog_timeout())
        .terminal_from_env())
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// The audit log's path and key, or why the agent must not start.
pub fn open_audit(config: &Config, paths: &Paths) -> anyhow::Result<AuditLog> {
    let key = secrets::audit_key(&audit_key_source(config)).map_err(|e| match e {
        // Its message already says what to do.
        secrets::SecretsError::NoKeyring { .. } => anyhow::anyhow!(
            "the audit log needs a key: {}",
            crate::tokens::error_chain(&e)
        ),
        other => anyhow::anyhow!(
            "{}\nThe audit log needs a key: KeyPort keeps it in the OS keyring. Without one, set \
             `audit_key_file` in the configuration to a file of mode 0600 holding at least 32 \
             random bytes (head -c 32 /dev/urandom > FILE; chmod 600 FILE).",
            crate::tokens::error_chain(&other)
        ),
    })?;
    let path = audit_path(config, paths);
    let head = audit_head_path(config, paths);
    let journal = if config.audit_journal {
        crate::journal::Journal::connect()
    } else {
        None
    };
    AuditLog::open(&path, key, &head)
        .map(|log| log.with_journal(journal))
        .with_context(|| format!("cannot open the audit log {}", path.display()))
}

/// The audit log's head (its last seq and MAC), kept apart from the log: beside the key file
/// when there is one (`audit_key_file` + `.head`), else in the configuration folder.
pub fn audit_head_path(config: &Config, paths: &Paths) -> PathBuf {
    match &config.audit_key_file {
        Some(file) => {
            let mut name = file.as_os_str().to_owned();
            name.push(".head");
            PathBuf::from(name)
        }
        None => paths.config_dir.join("audit.head"),
    }
}

/// Where the audit key comes from: `audit_key_file` when set, else the OS keyring entry
/// `keyring_service` / `audit-key`.
pub fn audit_key_source(config: &Config) -> AuditKeySource {
    match &config.audit_key_file {
        Some(file) => AuditKeySource::File(file.clone()),
        None => AuditKeySource::Keyring {
            service: config.keyring_service.clone(),
            user: secrets::AUDIT_KEY_USER.to_owned(),
        },
    }
}

/// The audit log: `audit_log` when set, else `DATA_DIR/audit.log`.
pub fn audit_path(config: &Config, paths: &Paths) -> PathBuf {
    config
        .audit_log
        .clone()
        .unwrap_or_else(|| paths.data_dir.join("audit.log"))
}

/// Runs the agent until SIGTERM/SIGINT.
pub async fn run(config: Config, paths: Paths, options: RunOptions) -> anyhow::Result<()> {
    let audit = {
        let (c, p) = (config.clone(), paths.clone());
        tokio::task::spawn_blocking(move || open_audit(&c, &p)).await??
    };
    let audit = crate::audit::AuditWriter::start(audit)?;
    let pinentry = pinentry_for(&config)?;
    let origins = OriginStore::open(&paths.origins_file(), &config)?;
    let tokens = {
        let c = config.clone();
        tokio::task::spawn_blocking(move || TokenSet::load(&c)).await?
    };
    tokens.report_failures();
    let texts = Texts::new(Language::from_config(config.language.as_deref()));
    let server_config = ServerConfig {
        port: config.port,
        bind: vec![
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ],
        limits: Limits {
            max_message_bytes: config.limits.max_message_bytes,
            max_connections_per_origin: config.limits.max_connections_per_origin,
            max_connections: config.limits.max_connections,
            requests_per_second: config.limits.requests_per_second,
            handshake_timeout: Duration::from_secs(config.limits.handshake_timeout_seconds),
            max_unapproved_connections: config.limits.max_unapproved_connections,
            unapproved_idle_timeout: Duration::from_secs(config.limits.unapproved_idle_seconds),
            max_pending_handshakes: config.limits.max_pending_handshakes,
        },
        allow_insecure_localhost_origins: config.allow_insecure_localhost_origins,
        same_user_only: true,
    };
    let service = Arc::new(Service::new(
        config.clone(),
        tokens.clone(),
        origins,
        pinentry,
        texts,
        Some(audit),
    ));
    let server = match browser_bridge::bind(server_config.clone(), Arc::clone(&service)).await {
        Ok(s) => s,
        Err(browser_bridge::Error::Bind { .. }) | Err(browser_bridge::Error::PortInUse { .. })
            if !ipv6_loopback_available() =>
        {
            // A host without ::1: serve 127.0.0.1 alone rather than not at all.
            let mut v4 = server_config;
            v4.bind = vec![IpAddr::V4(Ipv4Addr::LOCALHOST)];
            browser_bridge::bind(v4, Arc::clone(&service)).await?
        }
        Err(e @ browser_bridge::Error::PortInUse { .. }) => {
            bail!("{e}: another program (or another keyport) uses the port; stop it or set `port` in the configuration")
        }
        Err(e) => return Err(e.into()),
    };
    let port = server.port();
    let watcher = {
        let (c, t, s, b) = (
            config.clone(),
            tokens.clone(),
            Arc::clone(&service),
            server.broadcaster(),
        );
        tokio::task::spawn_blocking(move || spawn_watchers(&c, &t, &s, b)).await?
    };

    let demo = match options.demo_port {
        Some(demo_port) => Some(serve_demo(demo_port).await?),
        None => None,
    };

    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on ws://127.0.0.1:{port}/v1")?;
        if let Some((addr, _)) = &demo {
            writeln!(
                out,
                "demo portal on http://{addr}/?agent=ws://127.0.0.1:{port}/v1"
            )?;
        }
        out.flush()?;
    }
    tracing::info!(port, "listening");

    // The hosts, for `keyport doctor` in another process.
    let status = crate::host::status::StatusWriter::spawn(
        tokens.clone(),
        crate::host::status::status_path(&paths),
    )
    .inspect_err(|e| tracing::warn!(error = %e, "no host status file for keyport doctor"))
    .ok();

    server.serve(shutdown_signal()).await?;
    let (pcsc, skf) = watcher;
    // Joining takes at most one wait slice: off the async workers.
    let _ = tokio::task::spawn_blocking(move || {
        if let Some(w) = pcsc {
            w.stop();
        }
        skf.stop();
        if let Some(status) = status {
            status.stop();
        }
    })
    .await;
    if let Some((_, task)) = demo {
        task.abort();
    }
    tracing::info!("stopped");
    Ok(())
}

/// Starts the PC/SC watcher and the SKF libraries' device watchers: `tokens.changed` goes to
/// connections of approved origins, once per change whichever saw it. Without them (a thread
/// could not start) the agent still serves its tokens.
fn spawn_watchers(
    config: &Config,
    tokens: &TokenSet,
    service: &Arc<Service>,
    broadcaster: browser_bridge::Broadcaster,
) -> (
    Option<crate::pcsc_watch::Watcher>,
    crate::skf_watch::SkfWatch,
) {
    let atr = crate::discovery::AtrTable::effective(config).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "the ATR table did not load; cards are not matched to modules");
        crate::discovery::AtrTable::default()
    });
    let service = Arc::clone(service);
    let notifier = crate::skf_watch::Notifier::new(Box::new(
        move |tokens: Vec<browser_bridge::protocol::TokenEntry>| {
            broadcaster.send_event(
                &browser_bridge::protocol::TokensChanged { tokens },
                |origin| service.is_approved_origin(origin.as_str()),
            );
        },
    ));
    let n = Arc::clone(&notifier);
    let on_change = Box::new(move |tokens| n.changed(tokens));
    let pcsc = match crate::pcsc_watch::Watcher::spawn(tokens.clone(), atr, on_change) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "the PC/SC watcher did not start: no card events");
            None
        }
    };
    (pcsc, crate::skf_watch::SkfWatch::spawn(tokens, &notifier))
}

fn ipv6_loopback_available() -> bool {
    std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).is_ok()
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The demo portal's files, built into the binary.
const DEMO_FILES: &[(&str, &str, &str)] = &[
    (
        "/",
        "text/html; charset=utf-8",
        include_str!("../../browser-bridge/js/demo/index.html"),
    ),
    (
        "/index.html",
        "text/html; charset=utf-8",
        include_str!("../../browser-bridge/js/demo/index.html"),
    ),
    (
        "/demo.js",
        "text/javascript; charset=utf-8",
        include_str!("../../browser-bridge/js/demo/demo.js"),
    ),
    (
        "/verify.js",
        "text/javascript; charset=utf-8",
        include_str!("../../browser-bridge/js/demo/verify.js"),
    ),
    (
        "/texts.js",
        "text/javascript; charset=utf-8",
        include_str!("../../browser-bridge/js/demo/texts.js"),
    ),
    (
        "/demo.css",
        "text/css; charset=utf-8",
        include_str!("../../browser-bridge/js/demo/demo.css"),
    ),
    (
        "/src/keyport.js",
        "text/javascript; charset=utf-8",
        include_str!("../../browser-bridge/js/src/keyport.js"),
    ),
];

/// Serves the demo portal on 127.0.0.1 only: a handful of static files, GET only.
pub async fn serve_demo(port: u16) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port))
        .await
        .with_context(|| format!("cannot serve the demo portal on 127.0.0.1:{port}"))?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let mut stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors and the like: the pending connection stays queued, so
                    // accepting again at once would spin a core. Wait a little, as the bridge's
                    // acceptor does, and keep serving.
                    tracing::warn!(error = %e, "demo portal: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut len = 0;
                let head_end = loop {
                    let read =
                        tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf[len..]))
                            .await;
                    match read {
                        Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
                        Ok(Ok(n)) => len += n,
                    }
                    if let Some(i) = buf[..len].windows(4).position(|w| w == b"\r\n\r\n") {
                        break i;
                    }
                    if len == buf.len() {
                        return;
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]);
                let mut parts = head.lines().next().unwrap_or_default().split(' ');
                let (method, target) = (
                    parts.next().unwrap_or_default(),
                    parts.next().unwrap_or_default(),
                );
                let path = target.split('?').next().unwrap_or_default();
                let response = match DEMO_FILES.iter().find(|(p, _, _)| *p == path) {
                    Some((_, kind, body)) if method == "GET" => format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n\
                         Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n\
                         Connection: close\r\n\r\n{body}",
                        body.len()
                    ),
                    Some(_) => "HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_owned(),
                    None => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_owned(),
                };
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    Ok((addr, task))
}
