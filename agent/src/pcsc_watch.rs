//! PC/SC: readers and cards. A dedicated thread waits on `SCardGetStatusChange` over every reader
//! plus the PnP pseudo-reader; a card inserted or removed, or a reader added or removed, refreshes
//! the token list (loading the module the ATR table names for a new card) and reports the new
//! list when it differs from the last one reported.
//!
//! A module that does not answer in time is left out of a round (its last known tokens stand)
//! and asked again at the next wait slice, so one hung module never stops the others' events.
//!
//! pcscd may be absent, killed or restarted: the watcher then retries with exponential backoff
//! (100 ms doubling to 5 s) and recovers by itself; PKCS#11 tokens are served all the while.

use std::collections::HashMap;
use std::ffi::CString;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use browser_bridge::protocol::TokenEntry;
use pcsc::{Context, ReaderState, Scope, State};

use crate::discovery::{AtrTable, Candidate, Source};
use crate::tokens::{TokenSet, TokenView, WhenBehind};

/// First wait after pcscd failed; doubled after each failure up to [`BACKOFF_MAX`].
pub const BACKOFF_START: Duration = Duration::from_millis(100);
/// Longest wait between two attempts to reach pcscd.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A wait on pcscd ends at least this often, so a stop request never waits longer, even in the
/// instant between checking the stop flag and entering `SCardGetStatusChange`.
const WAIT_SLICE: Duration = Duration::from_secs(1);
/// How long [`Watcher::spawn`] waits for the first look at PC/SC.
const FIRST_LOOK: Duration = Duration::from_secs(2);
/// After a card goes in, how long the watcher lists again (each wait slice) while no library
/// shows a token in that reader: a module may list the reader's slot empty for a moment after
/// PC/SC reported the card (OpenSC in a module host started while the card was out does), and
/// no further PC/SC event would come to list it again. A card no library knows (a bank card)
/// stops the relisting once this has passed.
const CARD_ARRIVAL_GRACE: Duration = Duration::from_secs(5);

/// What PC/SC says about one reader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReaderSnapshot {
    pub name: String,
    /// The card's ATR when one is present.
    pub atr: Option<Vec<u8>>,
    /// pcscd's insert/remove counter for the reader (catches a quick remove + insert).
    pub events: u32,
}

/// Called with the full token list each time it changes.
pub type OnChange = Box<dyn Fn(Vec<TokenEntry>) + Send + 'static>;

/// The running watcher; stops (and joins its thread) on [`Watcher::stop`] or drop.
pub struct Watcher {
    stop_flag: Arc<AtomicBool>,
    context: Arc<Mutex<Option<Context>>>,
    wake: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field("stopping", &self.stop_flag.load(Ordering::SeqCst))
            .finish_non_exhaustive()
    }
}

impl Watcher {
    /// Starts the watcher thread, and returns after its first look at PC/SC (at most 2 s):
    /// blocks, so async code calls it through `spawn_blocking`. `on_change` runs on that thread.
    pub fn spawn(tokens: TokenSet, atr: AtrTable, on_change: OnChange) -> std::io::Result<Watcher> {
        let stop_flag = Arc::new(AtomicBool::new(false));
        let context = Arc::new(Mutex::new(None));
        let (wake, wake_rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let state = Loop {
            ready: Some(ready_tx),
            last: Vec::new(),
            retry: false,
            arrived: HashMap::new(),
            tokens,
            atr,
            on_change,
            stop_flag: Arc::clone(&stop_flag),
            context: Arc::clone(&context),
            wake: wake_rx,
        };
        let thread = std::thread::Builder::new()
            .name("pcsc-watch".into())
            .spawn(move || state.run())?;
        // Readers are known once the first look at PC/SC is done (or failed): wait for it a
        // little, so the first `tokens.list` already names them.
        let _ = ready_rx.recv_timeout(FIRST_LOOK);
        Ok(Watcher {
            stop_flag,
            context,
            wake: Some(wake),
            thread: Some(thread),
        })
    }

    /// Stops the thread: sets the flag, cancels a pending `SCardGetStatusChange`, ends a backoff
    /// wait, and joins.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop_flag.store(true, Ordering::SeqCst);
        if let Ok(slot) = self.context.lock() {
            if let Some(ctx) = slot.as_ref() {
                if let Err(e) = ctx.cancel() {
                    tracing::debug!(error = %e, "SCardCancel");
                }
            }
        }
        // Dropping the sender ends a backoff wait at once.
        self.wake.take();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::warn!("the PC/SC watcher thread panicked");
            }
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct Loop {
    tokens: TokenSet,
    atr: AtrTable,
    on_change: OnChange,
    last: Vec<TokenEntry>,
    /// A module did not answer in the last round, or a card that went in lately shows no
    /// token yet: list again at the next wait slice.
    retry: bool,
    /// When each reader's card went in (with pcscd's event counter then, so that a quick
    /// remove and insert counts as a new arrival).
    arrived: HashMap<String, (u32, Instant)>,
    stop_flag: Arc<AtomicBool>,
    context: Arc<Mutex<Option<Context>>>,
    wake: mpsc::Receiver<()>,
    /// Told once, after the first look at PC/SC.
    ready: Option<mpsc::Sender<()>>,
}

/// Why a session with pcscd ended.
enum End {
    Stopped,
    Failed(pcsc::Error),
}

impl Loop {
    fn run(mut self) {
        // The list as it is now: only a difference from it is reported.
        let listing = self.tokens.listing(WhenBehind::Skip);
        self.retry = listing.unanswered > 0 || listing.hosts_down > 0;
        self.last = token_entries(&listing.tokens);
        let mut backoff = BACKOFF_START;
        loop {
            if self.stopped() {
                break;
            }
            let end = match Context::establish(Scope::User) {
                Ok(ctx) => {
                    tracing::debug!("PC/SC context established");
                    self.session(ctx, &mut backoff)
                }
                Err(e) => End::Failed(e),
            };
            if let Ok(mut slot) = self.context.lock() {
                *slot = None;
            }
            match end {
                End::Stopped => break,
                End::Failed(e) => {
                    tracing::debug!(error = %e, retry_in_ms = backoff.as_millis() as u64, "PC/SC unavailable");
                    // Readers are gone with pcscd: tokens in them are too.
                    self.refresh(&[]);
                    self.first_look_done();
                    if !self.wait_backoff(backoff) {
                        break;
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
        tracing::debug!("PC/SC watcher stopped");
    }

    /// Waits `backoff` before trying pcscd again, in slices, listing the tokens again after a
    /// slice when a module host ended or a module did not answer (no PC/SC event will come to
    /// say so). False when the watcher is told to stop.
    fn wait_backoff(&mut self, backoff: Duration) -> bool {
        let end = std::time::Instant::now() + backoff;
        loop {
            let left = end.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return true;
            }
            match self.wake.recv_timeout(left.min(WAIT_SLICE)) {
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => return false,
            }
            if self.tokens.take_hosts_changed() {
                self.refresh_with(&[], false);
            } else if self.retry {
                self.refresh(&[]);
            }
        }
    }

    fn first_look_done(&mut self) {
        if let Some(tx) = self.ready.take() {
            let _ = tx.send(());
        }
    }

    fn stopped(&self) -> bool {
        self.stop_flag.load(Ordering::SeqCst)
    }

    /// Watches with one context until pcscd fails or the watcher stops.
    fn session(&mut self, ctx: Context, backoff: &mut Duration) -> End {
        {
            let Ok(mut slot) = self.context.lock() else {
                return End::Stopped;
            };
            *slot = Some(ctx.clone());
            // Checked under the lock `Watcher::stop` takes to cancel: no stop is missed.
            if self.stopped() {
                return End::Stopped;
            }
        }
        let mut states = vec![ReaderState::new(pcsc::PNP_NOTIFICATION(), State::UNAWARE)];
        let mut seen: Option<Vec<ReaderSnapshot>> = None;
        loop {
            // Keep the reader list in step with pcscd (the PnP entry stays first).
            let names = match ctx.list_readers_owned() {
                Ok(names) => names,
                Err(pcsc::Error::NoReadersAvailable) => Vec::new(),
                Err(e) => return End::Failed(e),
            };
            states.retain(|s| {
                s.name() == pcsc::PNP_NOTIFICATION()
                    || names.iter().any(|n| n.as_c_str() == s.name())
            });
            for n in &names {
                if !states.iter().any(|s| s.name() == n.as_c_str()) {
                    states.push(ReaderState::new(n.clone(), State::UNAWARE));
                }
            }
            if self.stopped() {
                return End::Stopped;
            }
            match ctx.get_status_change(WAIT_SLICE, &mut states) {
                Ok(()) => {}
                Err(pcsc::Error::Timeout) => {}
                Err(pcsc::Error::Cancelled) if self.stopped() => return End::Stopped,
                Err(pcsc::Error::Cancelled) => continue,
                // A reader vanished between listing and waiting: list again.
                Err(pcsc::Error::UnknownReader) => continue,
                Err(e) => return End::Failed(e),
            }
            *backoff = BACKOFF_START;
            for s in states.iter_mut() {
                s.sync_current_state();
            }
            let now: Vec<ReaderSnapshot> = states
                .iter()
                .filter(|s| s.name() != pcsc::PNP_NOTIFICATION())
                .map(snapshot)
                .collect();
            if seen.as_ref() != Some(&now) {
                tracing::debug!(readers = ?now.iter().map(|r| (&r.name, r.atr.is_some())).collect::<Vec<_>>(), "PC/SC change");
                self.refresh(&now);
                seen = Some(now);
            } else if self.tokens.take_hosts_changed() {
                self.refresh_with(&now, false);
            } else if self.retry {
                self.refresh(&now);
            }
            self.first_look_done();
        }
    }

    /// Loads the modules the ATR table names for present cards, maps readers onto tokens, and
    /// reports the token list when it changed.
    fn refresh(&mut self, readers: &[ReaderSnapshot]) {
        self.refresh_with(readers, true);
    }

    /// [`Self::refresh`]; `start_hosts` false after a module host ended (see
    /// [`TokenSet::listing_with`]): the next round lists with a new host.
    fn refresh_with(&mut self, readers: &[ReaderSnapshot], start_hosts: bool) {
        for r in readers {
            let Some(atr) = &r.atr else { continue };
            load_atr_module(&self.tokens, &self.atr, &r.name, atr);
        }
        self.tokens.set_readers(reader_map(readers));
        self.tokens.set_cards(
            readers
                .iter()
                .filter(|r| r.atr.is_some())
                .map(|r| r.name.clone())
                .collect(),
        );
        let listing = self.tokens.listing_with(WhenBehind::Skip, start_hosts);
        let now = Instant::now();
        self.arrived
            .retain(|name, _| readers.iter().any(|r| &r.name == name && r.atr.is_some()));
        for r in readers.iter().filter(|r| r.atr.is_some()) {
            let arrival = self
                .arrived
                .entry(r.name.clone())
                .or_insert((r.events, now));
            if arrival.0 != r.events {
                *arrival = (r.events, now);
            }
        }
        let card_without_token = readers.iter().any(|r| {
            r.atr.is_some()
                && !listing
                    .tokens
                    .iter()
                    .any(|t| t.reader.as_deref() == Some(r.name.as_str()))
                && self
                    .arrived
                    .get(&r.name)
                    .is_some_and(|(_, at)| now.duration_since(*at) < CARD_ARRIVAL_GRACE)
        });
        self.retry = listing.unanswered > 0 || listing.hosts_down > 0 || card_without_token;
        let entries = token_entries(&listing.tokens);
        if entries != self.last {
            tracing::debug!(tokens = entries.len(), "tokens changed");
            (self.on_change)(entries.clone());
            self.last = entries;
        }
    }
}

fn snapshot(s: &ReaderState) -> ReaderSnapshot {
    let present = s.event_state().contains(State::PRESENT)
        && !s.event_state().contains(State::MUTE)
        && !s.atr().is_empty();
    ReaderSnapshot {
        name: s.name().to_string_lossy().into_owned(),
        atr: present.then(|| s.atr().to_vec()),
        events: s.event_count(),
    }
}

/// Loads the module the ATR table names for this card, unless it is loaded already. Returns
/// the rule that matched.
pub fn load_atr_module<'t>(
    tokens: &TokenSet,
    table: &'t AtrTable,
    reader: &str,
    atr: &[u8],
) -> Option<&'t crate::discovery::AtrRule> {
    let rule = table.module_for(atr)?;
    let loaded = tokens
        .modules()
        .iter()
        .any(|m| m.module.path() == rule.module);
    if !loaded {
        tracing::debug!(card = %rule.name, reader, module = %rule.module.display(), "ATR matched; loading the module");
        tokens.add(Candidate {
            path: rule.module.clone(),
            source: Source::Atr {
                card: rule.name.clone(),
                reader: reader.to_owned(),
            },
        });
    }
    Some(rule)
}

/// Reader names for [`TokenSet::set_readers`]: OpenSC names a slot after its reader.
fn reader_map(readers: &[ReaderSnapshot]) -> HashMap<String, String> {
    readers
        .iter()
        .map(|r| (r.name.clone(), r.name.clone()))
        .collect()
}

fn token_entries(tokens: &[TokenView]) -> Vec<TokenEntry> {
    tokens.iter().map(crate::service::token_entry).collect()
}

/// One look at PC/SC, for `keyport doctor`: the readers and their cards, or why there are none.
pub fn scan() -> Result<Vec<ReaderSnapshot>, pcsc::Error> {
    let ctx = Context::establish(Scope::User)?;
    let names = match ctx.list_readers_owned() {
        Ok(names) => names,
        Err(pcsc::Error::NoReadersAvailable) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut states: Vec<ReaderState> = names
        .into_iter()
        .map(|n: CString| ReaderState::new(n, State::UNAWARE))
        .collect();
    if states.is_empty() {
        return Ok(Vec::new());
    }
    ctx.get_status_change(Duration::ZERO, &mut states)?;
    Ok(states.iter().map(snapshot).collect())
}

/// Sets the reader names on `tokens` and loads ATR-matched modules, as the watcher would; for
/// `keyport doctor`, which runs once.
pub fn apply_once(tokens: &TokenSet, table: &AtrTable, readers: &[ReaderSnapshot]) {
    for r in readers {
        if let Some(atr) = &r.atr {
            load_atr_module(tokens, table, &r.name, atr);
        }
    }
    tokens.set_readers(reader_map(readers));
}

/// Hex with spaces, the way ATRs are usually written.
pub fn hex_spaced(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_upper_case_and_spaced() {
        assert_eq!(hex_spaced(&[0x3b, 0x88, 0x0f]), "3B 88 0F");
    }

    #[test]
    fn watcher_without_pcscd_backs_off_and_stops_promptly() {
        // A socket path where nothing listens: pcscd is "absent".
        let dir = tempfile::tempdir().expect("tempdir");
        std::env::set_var("PCSCLITE_CSOCK_NAME", dir.path().join("none.comm"));
        let calls = Arc::new(Mutex::new(0usize));
        let c = Arc::clone(&calls);
        let w = Watcher::spawn(
            TokenSet::default(),
            AtrTable::default(),
            Box::new(move |_| {
                if let Ok(mut n) = c.lock() {
                    *n += 1;
                }
            }),
        )
        .expect("spawn");
        // Stop must return promptly whether the thread is connecting or in a backoff wait.
        let t = std::time::Instant::now();
        w.stop();
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
        // No tokens ever: nothing to report.
        assert_eq!(*calls.lock().expect("lock"), 0);
    }
}
