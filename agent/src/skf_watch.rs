//! SKF keys plugged in and pulled out: one thread per SKF library waits on its device events
//! (`SKF_WaitForDevEvent`, through [`Backend::device_events`]) and, after each, lists the tokens
//! again and reports the list, as the PC/SC watcher does for cards. A library that cannot wait
//! for events (it lacks the function, or the wait failed) is polled once a second instead.
//!
//! Both watchers report through one [`Notifier`], which sends a list only when it differs from
//! the last one sent, so a change seen by both is one `tokens.changed`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use browser_bridge::protocol::TokenEntry;

use crate::backend::Backend;
use crate::tokens::{TokenSet, WhenBehind};

/// A wait for an event ends at least this often, so a stop never waits longer; also the poll
/// interval of a library without events.
const WAIT_SLICE: Duration = Duration::from_secs(1);

/// Sends the token list to pages when it changed since the last one sent.
pub struct Notifier {
    last: Mutex<Option<Vec<TokenEntry>>>,
    send: Box<dyn Fn(Vec<TokenEntry>) + Send + Sync>,
}

impl Notifier {
    pub fn new(send: Box<dyn Fn(Vec<TokenEntry>) + Send + Sync>) -> Arc<Notifier> {
        Arc::new(Notifier {
            last: Mutex::new(None),
            send,
        })
    }

    /// Records `tokens` as what pages know, without sending (the list at start).
    pub fn baseline(&self, tokens: Vec<TokenEntry>) {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if last.is_none() {
            *last = Some(tokens);
        }
    }

    /// Sends `tokens` unless they are what was sent last.
    pub fn changed(&self, tokens: Vec<TokenEntry>) {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if last.as_ref() == Some(&tokens) {
            return;
        }
        *last = Some(tokens.clone());
        (self.send)(tokens);
    }
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier").finish_non_exhaustive()
    }
}

/// The running watch threads; stopped (and joined) on drop.
#[derive(Debug)]
pub struct SkfWatch {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl SkfWatch {
    /// Starts one thread per loaded SKF library.
    pub fn spawn(tokens: &TokenSet, notifier: &Arc<Notifier>) -> SkfWatch {
        let stop = Arc::new(AtomicBool::new(false));
        notifier.baseline(entries(tokens));
        let mut threads = Vec::new();
        for m in tokens.modules() {
            let Some(events) = m.module.device_events() else {
                continue;
            };
            let events = events
                .inspect_err(|e| {
                    tracing::info!(path = %m.module.path().display(), error = %e, "no SKF device events; polling the library instead");
                })
                .ok();
            let (tokens, notifier, stop) =
                (tokens.clone(), Arc::clone(notifier), Arc::clone(&stop));
            let path = m.module.path().to_owned();
            let spawned = std::thread::Builder::new()
                .name("skf-watch".into())
                .spawn(move || watch(&tokens, &notifier, &stop, events));
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "the SKF watcher did not start: no device events")
                }
            }
        }
        SkfWatch { stop, threads }
    }

    /// Stops the threads (each within one wait slice) and joins them.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::warn!("an SKF watcher thread panicked");
            }
        }
    }
}

impl Drop for SkfWatch {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn watch(
    tokens: &TokenSet,
    notifier: &Notifier,
    stop: &AtomicBool,
    mut events: Option<skf_shim::DeviceEvents>,
) {
    while !stop.load(Ordering::SeqCst) {
        match events.as_ref().map(|e| e.recv_timeout(WAIT_SLICE)) {
            Some(None) => continue,
            Some(Some(Ok(event))) => {
                tracing::debug!(device = %event.device_name, kind = ?event.kind, "SKF device event");
            }
            Some(Some(Err(e))) => {
                tracing::info!(error = %e, "SKF device events ended; polling the library instead");
                events = None;
            }
            None => std::thread::sleep(WAIT_SLICE),
        }
        notifier.changed(entries(tokens));
    }
    // Dropping the events cancels the library's wait.
    drop(events);
}

fn entries(tokens: &TokenSet) -> Vec<TokenEntry> {
    tokens
        .listing(WhenBehind::Skip)
        .tokens
        .iter()
        .map(crate::service::token_entry)
        .collect()
}

impl Backend {
    /// The library's own device events, when it has them (SKF libraries; PKCS#11 tokens' events
    /// come from PC/SC): `None` for a back end without its own.
    pub fn device_events(&self) -> Option<Result<skf_shim::DeviceEvents, skf_shim::Error>> {
        match self {
            Backend::Pkcs11(_) => None,
            Backend::Skf(l) => Some(l.events()),
        }
    }
}
