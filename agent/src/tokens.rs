//! The token libraries the agent has loaded (PKCS#11 modules and SKF libraries, each a
//! [`Backend`]) and the tokens and certificates they show, as one set.
//!
//! Every call here blocks (it waits on a module's worker thread): async code reaches it through
//! `tokio::task::spawn_blocking`.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use crate::backend::{
    Backend, BackendKind, CertificateId, CertificateInfo, TokenError, TokenId, TokenInfo,
};
use crate::config::Config;
use crate::discovery::{self, Candidate, Discovery, Source};
use crate::host::supervisor::Supervisor;
use crate::host::HostStatus;

/// What the token set asks of a library's supervisor, whatever the library's kind.
trait HostView: Send + Sync + std::fmt::Debug {
    fn status(&self) -> HostStatus;
}

impl<J: Send, A: Send> HostView for Supervisor<J, A> {
    fn status(&self) -> HostStatus {
        Supervisor::status(self)
    }
}

/// A library that loaded (a PKCS#11 module or an SKF library), and why it was chosen.
#[derive(Debug, Clone)]
pub struct LoadedModule {
    pub module: Backend,
    pub source: Source,
}

/// A library that did not load: its path and the loader's error.
#[derive(Debug, Clone)]
pub struct LoadFailure {
    pub kind: BackendKind,
    pub path: PathBuf,
    pub source: Source,
    pub error: String,
}

/// A token, the library that shows it, and the reader it sits in when known.
#[derive(Debug, Clone)]
pub struct TokenView {
    pub info: TokenInfo,
    pub module: Backend,
    pub reader: Option<String>,
}

/// A certificate and the library that holds its key.
#[derive(Debug, Clone)]
pub struct CertificateView {
    pub info: CertificateInfo,
    pub module: Backend,
}

/// Every module the agent uses. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct TokenSet {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// How long a library may take to answer (`token_wait_seconds`).
    call_timeout: CallTimeout,
    modules: RwLock<Vec<LoadedModule>>,
    failures: RwLock<Vec<LoadFailure>>,
    discovery: RwLock<Discovery>,
    /// Reader name per token serial, filled by the PC/SC watcher.
    readers: RwLock<HashMap<String, String>>,
    /// The readers holding a card, as the PC/SC watcher last saw them, and its wake-up.
    cards: Mutex<Cards>,
    cards_changed: Condvar,
    /// Each module's last answer to a token listing, shown while it does not answer.
    last_tokens: Mutex<HashMap<PathBuf, Vec<TokenInfo>>>,
    /// Modules that did not answer their last call in time (each is logged once).
    unanswered: Mutex<HashSet<PathBuf>>,
    /// `module_isolation`: each module in a module host; `None`: in this process.
    isolation: Option<Isolation>,
    /// The supervisor of each hosted library.
    hosts: Mutex<HashMap<PathBuf, Arc<dyn HostView>>>,
    /// Set when a module host ended: the token list is worth reading again.
    hosts_changed: Arc<AtomicBool>,
    /// `certificates.list`'s cache (issue 12): see [`TokenSet::certificates_cached`].
    certificate_cache: Mutex<Option<CertificateCache>>,
    /// Counts the events after which the certificate cache may be wrong.
    certificate_generation: AtomicU64,
    /// When the last listing of every certificate that some module did not answer started:
    /// after one, a signature's lookup lists them all again only [`CERTIFICATES_FRESH`] later.
    certificates_incomplete_at: Mutex<Option<Instant>>,
}

/// Every certificate as one complete listing saw it, and what it depended on.
#[derive(Debug)]
struct CertificateCache {
    /// [`Inner::certificate_generation`] read before that listing started.
    generation: u64,
    /// When that listing started: it is served for [`CERTIFICATES_FRESH`] from then.
    listed_at: Instant,
    /// Each hosted module's host process then: a host that ended or restarted since (a crash,
    /// a hang) makes the listing stale.
    hosts: Vec<Option<u32>>,
    certificates: Arc<Vec<CertificateView>>,
}

/// How modules run in hosts.
#[derive(Debug, Clone, Copy)]
struct Isolation {
    /// A signature that logs in on a PIN pad waits this long (the dialog timeout).
    pin_pad_wait: Duration,
}

/// The libraries' call deadline; the shims' default unless the configuration says.
#[derive(Debug, Clone, Copy)]
struct CallTimeout(Duration);

impl Default for CallTimeout {
    fn default() -> Self {
        CallTimeout(pkcs11_shim::DEFAULT_CALL_TIMEOUT)
    }
}

/// What a listing does with a library whose worker is still behind a call given up on (see
/// [`Backend::is_behind`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenBehind {
    /// Wait for it, at most the call deadline (a request from a page).
    Wait,
    /// Skip it at once (the PC/SC watcher, which serves every module's events).
    Skip,
}

/// Every present token, and how many modules did not answer in time.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    /// A module that did not answer is represented by the tokens of its last answer.
    pub tokens: Vec<TokenView>,
    pub unanswered: usize,
    /// Modules whose host failed (crashed, hung and was stopped, is restarting): their tokens
    /// are left out until a new host lists them, a listing worth repeating.
    pub hosts_down: usize,
}

/// How long a complete listing of certificates answers `certificates.list` (and a signature's
/// lookup) without asking the modules again. Events drop it sooner; this bound is for what no
/// event reports: another program (`pkcs11-tool`, `keyport certs` or `keys` on the command
/// line, a vendor's tool) storing or removing a certificate while the daemon runs. The listing
/// after it asks each module, whose worker rescans a token only when its objects changed.
pub const CERTIFICATES_FRESH: Duration = Duration::from_secs(1);

/// How long [`TokenSet::card_was_pulled`] waits for PC/SC to report a removal (pcscd polls
/// some readers every 400 ms; the watcher's promise is one second).
pub const CARD_REMOVAL_GRACE: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
struct Cards {
    with_card: HashSet<String>,
    /// Counts the times a reader was seen losing its card.
    removals: u64,
}

/// What [`TokenSet::card_mark`] saw: a wait for a removal starts from here.
#[derive(Debug, Clone, Copy)]
pub struct CardMark {
    removals: u64,
    any_card: bool,
}

impl TokenSet {
    /// Discovers and loads modules; one that fails is recorded and the others still load.
    pub fn load(config: &Config) -> TokenSet {
        let found = discovery::discover(config);
        let set = if config.module_isolation {
            TokenSet::isolated(config.token_wait(), config.dialog_timeout())
        } else {
            TokenSet::with_timeout(config.token_wait())
        };
        for candidate in &found.candidates {
            set.add(candidate.clone());
        }
        for candidate in &found.skf_candidates {
            set.add_library(BackendKind::Skf, candidate.clone());
        }
        if let Ok(mut d) = set.inner.discovery.write() {
            *d = found;
        }
        set
    }

    /// An empty set whose libraries answer within `call_timeout`.
    pub fn with_timeout(call_timeout: Duration) -> TokenSet {
        TokenSet {
            inner: Arc::new(Inner {
                call_timeout: CallTimeout(call_timeout),
                ..Inner::default()
            }),
        }
    }

    /// An empty set whose libraries (PKCS#11 modules and SKF libraries) will each run in a
    /// host of their own (`module_isolation`); `pin_pad_wait`: how long a PIN-pad login may
    /// take.
    pub fn isolated(call_timeout: Duration, pin_pad_wait: Duration) -> TokenSet {
        TokenSet {
            inner: Arc::new(Inner {
                call_timeout: CallTimeout(call_timeout),
                isolation: Some(Isolation { pin_pad_wait }),
                ..Inner::default()
            }),
        }
    }

    /// Loads the library: in a host of its own with isolation, else in this process.
    fn load_library(
        &self,
        kind: BackendKind,
        path: &std::path::Path,
    ) -> Result<Backend, TokenError> {
        let call_timeout = self.inner.call_timeout.0;
        let Some(isolation) = self.inner.isolation else {
            return Backend::load(kind, path, call_timeout);
        };
        let changed = Arc::clone(&self.inner.hosts_changed);
        let on_exit: crate::host::supervisor::OnExit = Arc::new(move |_how: &str| {
            changed.store(true, Ordering::SeqCst);
        });
        if kind == BackendKind::Skf {
            let supervisor = crate::host::skf::supervisor(path, Some(on_exit))
                .map_err(|e| skf_shim::Error::ModuleHost(format!("no host program: {e}")))?;
            let library = crate::host::skf::hosted_library(
                path,
                skf_shim::LoadOptions { call_timeout },
                Arc::clone(&supervisor),
            );
            // Loaded (or not) in the host: its first answer says which, as a load would.
            if let Err(e @ skf_shim::Error::HostedLoad(_)) = library.tokens() {
                supervisor.stop();
                return Err(e.into());
            }
            lock(&self.inner.hosts).insert(path.to_owned(), supervisor);
            return Ok(Backend::Skf(library));
        }
        let supervisor = crate::host::pkcs11::supervisor(path, Some(on_exit))
            .map_err(|e| pkcs11_shim::Error::ModuleHost(format!("no host program: {e}")))?;
        let module = crate::host::pkcs11::hosted_module(
            path,
            pkcs11_shim::LoadOptions { call_timeout },
            isolation.pin_pad_wait,
            Arc::clone(&supervisor),
        )?;
        lock(&self.inner.hosts).insert(path.to_owned(), supervisor);
        Ok(Backend::Pkcs11(module))
    }

    /// The host of a hosted module, for `keyport doctor`: pid, restarts, last failure.
    pub fn host_status(&self, path: &std::path::Path) -> Option<HostStatus> {
        lock(&self.inner.hosts).get(path).map(|s| s.status())
    }

    /// True (once) when a module host ended since the last call: list the tokens again.
    pub fn take_hosts_changed(&self) -> bool {
        self.inner.hosts_changed.swap(false, Ordering::SeqCst)
    }

    /// Loads one more PKCS#11 module (an ATR match, say) unless it is loaded already. Returns
    /// whether it is loaded now.
    pub fn add(&self, candidate: Candidate) -> bool {
        self.add_library(BackendKind::Pkcs11, candidate)
    }

    /// Loads one more library of `kind` unless it is loaded already. Returns whether it is
    /// loaded now.
    pub fn add_library(&self, kind: BackendKind, candidate: Candidate) -> bool {
        if self
            .modules()
            .iter()
            .any(|m| m.module.path() == candidate.path)
        {
            return true;
        }
        match self.load_library(kind, &candidate.path) {
            Ok(module) => {
                tracing::info!(path = %candidate.path.display(), source = %candidate.source, %kind, "library loaded");
                if let Ok(mut m) = self.inner.modules.write() {
                    m.push(LoadedModule {
                        module,
                        source: candidate.source,
                    });
                }
                true
            }
            Err(e) => {
                tracing::warn!(path = %candidate.path.display(), error = %e, %kind, "library failed to load");
                let error = error_chain(&e);
                if let Ok(mut f) = self.inner.failures.write() {
                    f.retain(|x| x.path != candidate.path);
                    f.push(LoadFailure {
                        kind,
                        path: candidate.path,
                        source: candidate.source,
                        error,
                    });
                }
                false
            }
        }
    }

    pub fn modules(&self) -> Vec<LoadedModule> {
        self.inner
            .modules
            .read()
            .map(|m| m.clone())
            .unwrap_or_default()
    }

    pub fn failures(&self) -> Vec<LoadFailure> {
        self.inner
            .failures
            .read()
            .map(|f| f.clone())
            .unwrap_or_default()
    }

    /// Tells the user on stderr, a line each, which modules did not load (the others still
    /// serve their tokens).
    pub fn report_failures(&self) {
        for f in self.failures() {
            eprintln!(
                "keyport: {} {} ({}) did not load: {}",
                f.kind,
                f.path.display(),
                f.source,
                f.error
            );
        }
    }

    pub fn discovery(&self) -> Discovery {
        self.inner
            .discovery
            .read()
            .map(|d| d.clone())
            .unwrap_or_default()
    }

    /// Tells which reader holds the token with this serial (from PC/SC).
    pub fn set_readers(&self, readers: HashMap<String, String>) {
        if let Ok(mut r) = self.inner.readers.write() {
            *r = readers;
        }
    }

    /// The PC/SC watcher's view of which readers hold a card now; wakes [`Self::wait_card_removal`].
    pub fn set_cards(&self, with_card: HashSet<String>) {
        let Ok(mut c) = self.inner.cards.lock() else {
            return;
        };
        if c.with_card != with_card {
            // A card went in or out: no module reuses its last probe of a token (issue 12),
            // nor `certificates.list` its cached answer.
            for m in self.modules() {
                m.module.token_event();
            }
            self.certificates_changed();
        }
        if c.with_card.iter().any(|r| !with_card.contains(r)) {
            c.removals += 1;
        }
        c.with_card = with_card;
        self.inner.cards_changed.notify_all();
    }

    /// A mark to wait for a card removal from (no PKCS#11 call).
    pub fn card_mark(&self) -> CardMark {
        self.inner.cards.lock().map_or(
            CardMark {
                removals: 0,
                any_card: false,
            },
            |c| CardMark {
                removals: c.removals,
                any_card: !c.with_card.is_empty(),
            },
        )
    }

    /// Waits, at most `bound`, until the PC/SC watcher sees a card leave its reader after
    /// `mark`; true when one did. A card pulled in the middle of a command makes the module
    /// fail with a device error before pcscd notices (it polls some readers, every 400 ms):
    /// this tells that apart from a token that failed. Returns at once when no reader held a
    /// card at `mark` (no PC/SC card involved).
    pub fn wait_card_removal(&self, mark: CardMark, bound: Duration) -> bool {
        if !mark.any_card {
            return false;
        }
        let Ok(guard) = self.inner.cards.lock() else {
            return false;
        };
        match self
            .inner
            .cards_changed
            .wait_timeout_while(guard, bound, |c| c.removals == mark.removals)
        {
            Ok((c, _)) => c.removals != mark.removals,
            Err(_) => false,
        }
    }

    /// After a device error on `token`: was its card pulled out? A card removed in the middle
    /// of a command fails that command before pcscd notices (it polls some readers every
    /// 400 ms), so this waits, at most [`CARD_REMOVAL_GRACE`], for the watcher to see a card
    /// leave its reader, then asks the module whether the token is still there. Blocking.
    ///
    /// After a module host failed (a card pulled can deadlock a module: OpenSC 0.23), the
    /// module is asked through a new host, once its restart backoff has passed (at most
    /// [`CARD_REMOVAL_GRACE`] more): a card did leave its reader, so the token's going is
    /// what the pages learn either way.
    pub fn card_was_pulled(&self, mark: CardMark, module: &Backend, token: &TokenId) -> bool {
        if !self.wait_card_removal(mark, CARD_REMOVAL_GRACE) {
            return false;
        }
        let until = std::time::Instant::now() + CARD_REMOVAL_GRACE;
        loop {
            match module.tokens() {
                Ok(list) => return list.iter().all(|t| &t.id != token),
                Err(TokenError::ModuleHost(_)) if std::time::Instant::now() < until => {
                    // Restarting: the supervisor's first backoff is 100 ms.
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(_) => return false,
            }
        }
    }

    /// [`Self::card_was_pulled`] when the module is not known (a certificate lookup failed):
    /// true when a card left its reader after `mark` and no module lists `token` any more.
    pub fn token_was_pulled(&self, mark: CardMark, token: &TokenId) -> bool {
        let modules = self.modules();
        !modules.is_empty()
            && modules
                .iter()
                .all(|m| self.card_was_pulled(mark, &m.module, token))
    }

    /// Every present token of every module. A module that fails to answer is skipped (and
    /// logged): one broken module must not hide the others. One that does not answer in time
    /// shows its last known tokens. Waits for a module that is behind (see [`Self::listing`]).
    pub fn tokens(&self) -> Vec<TokenView> {
        self.listing(WhenBehind::Wait).tokens
    }

    /// Every present token of every module, and how many modules did not answer in time (a
    /// listing then worth repeating). A module that does not answer within its deadline is
    /// represented by its last answer, and logged once until it answers again.
    pub fn listing(&self, when_behind: WhenBehind) -> Listing {
        self.listing_with(when_behind, true)
    }

    /// [`Self::listing`]; with `start_hosts` false, a hosted module whose host is down is left
    /// out without a call (which would start a new host): the watcher's first look after a
    /// host ended, so that the tokens' going is reported before their coming back.
    pub fn listing_with(&self, when_behind: WhenBehind, start_hosts: bool) -> Listing {
        let readers = self
            .inner
            .readers
            .read()
            .map(|r| r.clone())
            .unwrap_or_default();
        let mut listing = Listing::default();
        for m in self.modules() {
            let module = &m.module;
            if !start_hosts
                && self
                    .host_status(module.path())
                    .is_some_and(|s| s.pid.is_none())
            {
                listing.hosts_down += 1;
                continue;
            }
            let answer = if when_behind == WhenBehind::Skip && module.is_behind() {
                Err(TokenError::Busy {
                    waited: module.call_timeout(),
                })
            } else {
                module.tokens()
            };
            let tokens = match answer {
                Ok(tokens) => {
                    self.answered(module);
                    let before = lock(&self.inner.last_tokens)
                        .insert(module.path().to_owned(), tokens.clone());
                    if before.as_ref() != Some(&tokens) {
                        // A token came, went or changed (its PIN flags, say): the certificates
                        // of the cache may have too.
                        self.certificates_changed();
                    }
                    tokens
                }
                Err(e @ TokenError::Busy { .. }) => {
                    self.not_answered(module, &e);
                    listing.unanswered += 1;
                    lock(&self.inner.last_tokens)
                        .get(module.path())
                        .cloned()
                        .unwrap_or_default()
                }
                Err(e) => {
                    if matches!(e, TokenError::ModuleHost(_)) {
                        listing.hosts_down += 1;
                    }
                    self.certificates_changed();
                    tracing::warn!(path = %module.path().display(), error = %e, "listing tokens failed");
                    continue;
                }
            };
            listing
                .tokens
                .extend(tokens.into_iter().map(|info| TokenView {
                    reader: reader_for(&readers, &info),
                    info,
                    module: module.clone(),
                }));
        }
        listing
    }

    /// Every certificate with its key on a present token. A module that does not answer in
    /// time is left out.
    pub fn certificates(&self) -> Vec<CertificateView> {
        self.certificates_complete().0
    }

    /// [`Self::certificates`], whether every module answered, and the first
    /// [`TokenError::Busy`] of a module that did not answer in time.
    fn certificates_complete(&self) -> (Vec<CertificateView>, bool, Option<TokenError>) {
        let mut out = Vec::new();
        let mut complete = true;
        let mut busy = None;
        for m in self.modules() {
            match m.module.certificates(None) {
                Ok(certs) => {
                    self.answered(&m.module);
                    out.extend(certs.into_iter().map(|info| CertificateView {
                        info,
                        module: m.module.clone(),
                    }));
                }
                Err(e @ TokenError::Busy { .. }) => {
                    complete = false;
                    self.not_answered(&m.module, &e);
                    busy.get_or_insert(e);
                }
                Err(e) => {
                    complete = false;
                    tracing::warn!(path = %m.module.path().display(), error = %e, "listing certificates failed")
                }
            }
        }
        (out, complete, busy)
    }

    /// The certificates of the last complete listing, when nothing happened since that could
    /// change them (issue 12: `certificates.list` answers from here, with no module call).
    /// What drops it: a card in or out (PC/SC), a listing of tokens that differs from the one
    /// before (the SKF and PC/SC watchers, `tokens.list`) or fails, a module host that ended
    /// or restarted, [`Self::certificates_changed`] (a login or logout, an enrolment, a
    /// token that went away under a request), and age: a listing older than
    /// [`CERTIFICATES_FRESH`] (another program may have changed a token). No call: `None`.
    pub fn cached_certificates(&self) -> Option<Arc<Vec<CertificateView>>> {
        self.unchanged_cache(|c| {
            (c.listed_at.elapsed() < CERTIFICATES_FRESH).then(|| Arc::clone(&c.certificates))
        })
        .flatten()
    }

    /// Worth listing every certificate for a signature's lookup (the signatures after it then
    /// find theirs in the cache, with no module call): the cache is right as far as any event
    /// knows, only older than [`CERTIFICATES_FRESH`]; or there is none (never filled, or
    /// dropped by an event: a login drops it) and no listing that a module left incomplete
    /// started within [`CERTIFICATES_FRESH`]. That bound keeps a library that does not answer
    /// from costing every signature a listing; meanwhile they look their certificate up on its
    /// own token.
    pub fn certificate_listing_due(&self) -> bool {
        match self.unchanged_cache(|c| c.listed_at.elapsed() >= CERTIFICATES_FRESH) {
            Some(aged) => aged,
            None => lock(&self.inner.certificates_incomplete_at)
                .is_none_or(|at| at.elapsed() >= CERTIFICATES_FRESH),
        }
    }

    /// `f` of the certificate cache, when nothing that drops it happened since it was filled.
    fn unchanged_cache<R>(&self, f: impl FnOnce(&CertificateCache) -> R) -> Option<R> {
        let generation = self.inner.certificate_generation.load(Ordering::SeqCst);
        let hosts = self.host_pids();
        lock(&self.inner.certificate_cache)
            .as_ref()
            .filter(|c| c.generation == generation && c.hosts == hosts)
            .map(f)
    }

    /// The certificate with this id in [`Self::cached_certificates`], when there is a cache:
    /// the signing path's lookup with no module call (the module's worker finds the key again
    /// when it signs, so a key gone since is still refused there).
    pub fn cached_certificate(&self, id: &CertificateId) -> Option<CertificateView> {
        self.cached_certificates()?
            .iter()
            .find(|c| id.names(&c.info))
            .cloned()
    }

    /// [`Self::cached_certificates`], else a listing now (blocking), kept for the next call
    /// when every module answered.
    pub fn certificates_cached(&self) -> Arc<Vec<CertificateView>> {
        self.certificates_cached_or_busy().0
    }

    /// [`Self::certificates_cached`], and the first [`TokenError::Busy`] of a module that did
    /// not answer the listing in time (it was waited for once already).
    pub fn certificates_cached_or_busy(&self) -> (Arc<Vec<CertificateView>>, Option<TokenError>) {
        if let Some(certs) = self.cached_certificates() {
            return (certs, None);
        }
        // Read before the listing: an event during it leaves the cache stale, not wrong.
        let generation = self.inner.certificate_generation.load(Ordering::SeqCst);
        let hosts = self.host_pids();
        let listed_at = Instant::now();
        let (list, complete, busy) = self.certificates_complete();
        let certificates = Arc::new(list);
        if complete {
            *lock(&self.inner.certificate_cache) = Some(CertificateCache {
                generation,
                listed_at,
                hosts,
                certificates: Arc::clone(&certificates),
            });
        } else {
            *lock(&self.inner.certificates_incomplete_at) = Some(listed_at);
        }
        (certificates, busy)
    }

    /// Something may have changed the certificates of a token (a login can reveal private
    /// keys, an enrolment adds a certificate): the next `certificates.list` lists them again.
    pub fn certificates_changed(&self) {
        self.inner
            .certificate_generation
            .fetch_add(1, Ordering::SeqCst);
    }

    /// The process id of each module's host (`None` for a module in this process or a host
    /// that is down), in module order.
    fn host_pids(&self) -> Vec<Option<u32>> {
        let hosts = lock(&self.inner.hosts);
        if hosts.is_empty() {
            return Vec::new();
        }
        self.modules()
            .iter()
            .map(|m| hosts.get(m.module.path()).and_then(|s| s.status().pid))
            .collect()
    }

    /// The certificate with this id, looked up on its own token only. [`TokenError::Busy`]
    /// when it was not found and a library did not answer in time.
    pub fn certificate(&self, id: &CertificateId) -> Result<CertificateView, TokenError> {
        let token = id.token_id();
        let mut last_err = None;
        let mut busy = None;
        for m in self.modules() {
            let answer = m.module.certificates(Some(&token));
            if let Some(found) = self.look_in(&m.module, answer, id, &mut busy, &mut last_err) {
                return Ok(found);
            }
        }
        Err(not_found(id, busy, last_err))
    }

    /// One library's answer to a certificate lookup (shared by the blocking and the async
    /// lookup): the certificate if it is there, else the answer kept for [`not_found`].
    fn look_in(
        &self,
        module: &Backend,
        answer: Result<Vec<CertificateInfo>, TokenError>,
        id: &CertificateId,
        busy: &mut Option<TokenError>,
        last_err: &mut Option<TokenError>,
    ) -> Option<CertificateView> {
        match answer {
            Ok(certs) => {
                self.answered(module);
                let info = certs.into_iter().find(|c| id.names(c))?;
                Some(CertificateView {
                    info,
                    module: module.clone(),
                })
            }
            Err(TokenError::TokenNotFound(_)) => None,
            Err(e @ TokenError::Busy { .. }) => {
                self.not_answered(module, &e);
                *busy = Some(e);
                None
            }
            Err(e) => {
                *last_err = Some(e);
                None
            }
        }
    }

    /// A module answered: if it had not before, say so once.
    fn answered(&self, module: &Backend) {
        if lock(&self.inner.unanswered).remove(module.path()) {
            tracing::info!(path = %module.path().display(), "the library answers again");
        }
    }

    /// A module did not answer in time: say so once, until it answers again.
    fn not_answered(&self, module: &Backend, e: &TokenError) {
        if lock(&self.inner.unanswered).insert(module.path().to_owned()) {
            tracing::warn!(
                path = %module.path().display(),
                error = %e,
                "the library does not answer; going on without it until it does"
            );
        }
    }

    /// The token with this id.
    pub fn token(&self, id: &TokenId) -> Option<TokenView> {
        self.tokens().into_iter().find(|t| &t.info.id == id)
    }

    // ---- the signing hot path (issue 12): no blocking thread, no listing ----

    /// [`Self::certificate`] on an async runtime: each module's worker answers this task.
    pub async fn certificate_async(
        &self,
        id: &CertificateId,
    ) -> Result<CertificateView, TokenError> {
        let token = id.token_id();
        let mut last_err = None;
        let mut busy = None;
        for m in self.modules() {
            let answer = m.module.certificates_async(Some(&token)).await;
            if let Some(found) = self.look_in(&m.module, answer, id, &mut busy, &mut last_err) {
                return Ok(found);
            }
        }
        Err(not_found(id, busy, last_err))
    }

    /// The token's label as the last listing saw it (no module call); None when no listing
    /// has shown it yet.
    pub fn known_label(&self, id: &TokenId) -> Option<String> {
        lock(&self.inner.last_tokens)
            .values()
            .flatten()
            .find(|t| &t.id == id)
            .map(|t| t.label.trim().to_owned())
    }
}

/// Why a certificate lookup found nothing: a module that did not answer in time, a token
/// removed, or a module host that failed (TOKEN_ERROR, rather than "no such certificate");
/// else the certificate is not there.
fn not_found(
    id: &CertificateId,
    busy: Option<TokenError>,
    last_err: Option<TokenError>,
) -> TokenError {
    match (busy, last_err) {
        (Some(e), _) => e,
        (None, Some(e)) if e.is_removal() || matches!(e, TokenError::ModuleHost(_)) => e,
        _ => TokenError::CertificateNotFound(id.clone()),
    }
}

/// A lock on state that stays consistent after a panic elsewhere (each update is one step).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn reader_for(readers: &HashMap<String, String>, info: &TokenInfo) -> Option<String> {
    readers
        .get(info.serial.trim())
        .or_else(|| readers.get(info.slot_description.trim()))
        .cloned()
        .or_else(|| {
            // OpenSC names the slot after the reader: "Virtual PCD 00 00". The longest name
            // wins, so "Reader 1" never claims the slot of "Reader 10".
            readers
                .values()
                .filter(|r| info.slot_description.starts_with(r.as_str()))
                .max_by_key(|r| r.len())
                .cloned()
        })
}

/// The error and its sources on one line: what a user or `keyport doctor` shows.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        s.push_str(": ");
        s.push_str(&src.to_string());
        cur = src.source();
    }
    s
}
