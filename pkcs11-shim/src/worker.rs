//! The worker thread that owns one module's cryptoki context, its sessions and caches.
//! Nothing else touches cryptoki.

mod keygen;
mod login;
mod sign;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::MechanismType;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState};
use cryptoki::slot::Slot;

use crate::certificate::{CertificateId, CertificateInfo, ParsedCertificate, PublicKeyMaterial};
use crate::error::{from_cryptoki, Error};
use crate::module::{Pace, Request};
use crate::raw::RawSign;
use crate::token::{LoginState, ModuleInfo, PinStatus, TokenId, TokenInfo};

/// A started worker: its request queue, its thread, and a channel that disconnects when the
/// thread ends.
pub(crate) struct Spawned {
    pub(crate) tx: mpsc::Sender<Request>,
    pub(crate) thread: JoinHandle<()>,
    pub(crate) finished: mpsc::Receiver<()>,
}

/// Starts the worker for the module at `path`; returns once the module is loaded and
/// initialised (or failed to), or [`Error::Busy`] when that takes longer than `load_timeout`.
pub(crate) fn spawn(
    path: PathBuf,
    pace: Arc<Pace>,
    load_timeout: Duration,
) -> Result<Spawned, Error> {
    let (tx, rx) = mpsc::channel::<Request>();
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), Error>>();
    let (finished_tx, finished) = mpsc::channel::<()>();
    let name = format!("pkcs11:{}", path.display());
    let thread = std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            // Dropped when this thread ends, however it ends.
            let _finished = finished_tx;
            let mut worker = match open_worker(path, Arc::clone(&pace)) {
                Ok(worker) => worker,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            worker.run(rx, &pace);
        })
        .map_err(|_| Error::WorkerGone)?;
    match ready_rx.recv_timeout(load_timeout) {
        Ok(Ok(())) => Ok(Spawned {
            tx,
            thread,
            finished,
        }),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        // The thread is left to finish loading (it then finds no requests and finalises) or
        // to hang alone.
        Err(mpsc::RecvTimeoutError::Timeout) => Err(Error::Busy {
            waited: load_timeout,
        }),
        Err(mpsc::RecvTimeoutError::Disconnected) => Err(Error::WorkerGone),
    }
}

/// Loads and initialises the module at `path` on the calling thread: the worker's state,
/// for a worker thread ([`spawn`]) or for a caller that runs requests itself
/// ([`crate::Module::load_inline`]).
pub(crate) fn open_worker(path: PathBuf, pace: Arc<Pace>) -> Result<Worker, Error> {
    let ctx = open(&path)?;
    // Without it the module still signs every key but CKA_ALWAYS_AUTHENTICATE ones.
    let raw = match RawSign::load(&path) {
        Ok(raw) => Some(raw),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e.0,
                "no raw C_Sign: keys that ask for the PIN per signature cannot sign");
            None
        }
    };
    Ok(Worker {
        ctx,
        raw,
        pace,
        path,
        tokens: HashMap::new(),
        needs_reinit: false,
        objects_unreadable: false,
        always_authenticate: HashSet::new(),
    })
}

fn open(path: &std::path::Path) -> Result<Pkcs11, Error> {
    let load_err = |source| Error::ModuleLoad {
        path: path.to_path_buf(),
        source,
    };
    let ctx = Pkcs11::new(path).map_err(load_err)?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(ctx),
        Err(e) => Err(load_err(e)),
    }
}

/// What the worker remembers about one token between requests.
struct TokenState {
    slot: Slot,
    /// Kept open so that a login stays valid between requests (the PIN cache).
    session: Option<Session>,
    mechanisms: Option<Vec<MechanismType>>,
    /// The last scan of certificates and keys; dropped on login and logout because they
    /// change which objects are visible. Shared with the requests that read it (a `sign`
    /// reads one entry of it), so none copies the list and its certificates.
    entries: Option<Arc<[Entry]>>,
    /// The handles of every object our session saw when a listing last looked (see
    /// [`Worker::entries`]): another program may add or destroy objects at any time.
    objects: Option<Vec<ObjectHandle>>,
    /// The last health probe's C_GetTokenInfo, and the count of token events when it was
    /// taken: reused while our session holds a login (see [`Worker::find`]).
    probe: Option<(u64, cryptoki::slot::TokenInfo)>,
}

impl TokenState {
    fn new(slot: Slot) -> Self {
        TokenState {
            slot,
            session: None,
            mechanisms: None,
            entries: None,
            objects: None,
            probe: None,
        }
    }
}

/// One certificate with what was found of its key.
#[derive(Clone, Debug)]
struct Entry {
    info: CertificateInfo,
    private_key: Option<ObjectHandle>,
}

/// One entry of a token's shared scan.
struct EntryRef {
    list: Arc<[Entry]>,
    index: usize,
}

impl std::ops::Deref for EntryRef {
    type Target = Entry;

    fn deref(&self) -> &Entry {
        // `index` was found in `list` (see `Worker::entry_at`).
        &self.list[self.index]
    }
}

/// A token as this request's health probe found it: the slot it is in now and what one
/// C_GetTokenInfo said. Taken once per request and reused within it; taken again after
/// anything that may change it (a PIN dialog, a C_Login that failed).
pub(super) struct Found {
    pub(super) slot: Slot,
    pub(super) info: cryptoki::slot::TokenInfo,
}

pub(crate) struct Worker {
    ctx: Pkcs11,
    /// The module's own C_Sign, for CKA_ALWAYS_AUTHENTICATE keys (see `raw`).
    raw: Option<RawSign>,
    /// Shared with the module's handles; counts token events ([`Pace::token_event`]).
    pace: Arc<Pace>,
    path: PathBuf,
    tokens: HashMap<TokenId, TokenState>,
    /// The module answered CKR_GENERAL_ERROR, CKR_DEVICE_ERROR or CKR_CRYPTOKI_NOT_INITIALIZED:
    /// before the next request it is probed, and finalised and initialised again if it still
    /// fails (SoftHSM, once out of descriptors, fails every call until then).
    needs_reinit: bool,
    /// An object C_FindObjects had just returned could not be read (CKR_OBJECT_HANDLE_INVALID):
    /// the module is finalised and initialised again before the next request, with no probe
    /// (which would pass). SoftHSM, when it opened its token while out of descriptors, keeps
    /// the objects it could not read that way until C_Initialize; another process deleting the
    /// object in between is the other cause, and costs no more than a login.
    objects_unreadable: bool,
    /// Certificates whose key was seen with CKA_ALWAYS_AUTHENTICATE, kept across logouts: a
    /// token that hides private keys until login (SoftHSM) would otherwise hide the flag too,
    /// and the caller could not tell the user before the first PIN that each signature asks
    /// for its own.
    always_authenticate: HashSet<CertificateId>,
}

/// Whether an answer means the module's state is broken until C_Finalize / C_Initialize.
fn breaks_module<T>(result: &Result<T, Error>) -> bool {
    result.as_ref().err().is_some_and(breaks)
}

fn breaks(error: &Error) -> bool {
    matches!(
        error,
        Error::Pkcs11 { rv, .. }
            if matches!(rv.as_str(), "CKR_GENERAL_ERROR" | "CKR_DEVICE_ERROR" | "CKR_CRYPTOKI_NOT_INITIALIZED")
    )
}

impl Worker {
    fn run(&mut self, rx: mpsc::Receiver<Request>, pace: &Pace) {
        while let Ok(req) = rx.recv() {
            self.handle(req);
            pace.finished_one();
        }
        self.finish();
    }

    /// All Module handles are gone: close sessions, then C_Finalize.
    pub(crate) fn finish(&mut self) {
        self.tokens.clear();
        let ctx = self.ctx.clone();
        if let Err(e) = ctx.finalize() {
            tracing::warn!(error = %e, "C_Finalize failed");
        }
    }

    /// After an answer that may mean a broken module: a cheap probe (C_GetSlotList, then
    /// C_GetTokenInfo of each slot with a token). Only when the probe fails the same way is the
    /// module re-initialised: a card pulled in the middle of a command (CKR_DEVICE_ERROR once,
    /// then CKR_TOKEN_NOT_PRESENT) needs no restart of the module; SoftHSM out of descriptors
    /// (CKR_GENERAL_ERROR on every C_GetTokenInfo until C_Initialize) does.
    fn recover(&mut self) {
        let probe = self
            .ctx
            .get_slots_with_token()
            .map_err(from_cryptoki)
            .and_then(|slots| {
                slots.into_iter().try_for_each(|slot| {
                    match self.ctx.get_token_info(slot).map_err(from_cryptoki) {
                        Err(e) if breaks(&e) => Err(e),
                        _ => Ok(()),
                    }
                })
            });
        match probe {
            Err(e) if breaks(&e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "the module keeps failing; re-initialising it");
                self.reinitialise();
            }
            _ => self.needs_reinit = false,
        }
    }

    /// C_Finalize, then C_Initialize; every session, slot and cache is forgotten, so tokens
    /// are listed again by the next request. Tried again before each request until it works.
    fn reinitialise(&mut self) {
        self.tokens.clear();
        if let Err(e) = self.ctx.clone().finalize() {
            tracing::debug!(error = %e, "C_Finalize before re-initialising");
        }
        match self
            .ctx
            .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {
                tracing::info!(path = %self.path.display(), "module re-initialised after it failed");
                self.needs_reinit = false;
            }
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "re-initialising the module failed; trying again at the next request");
            }
        }
    }

    pub(crate) fn handle(&mut self, req: Request) {
        if self.objects_unreadable {
            self.objects_unreadable = false;
            tracing::warn!(path = %self.path.display(), "the module found objects it could not read; re-initialising it");
            self.reinitialise();
        } else if self.needs_reinit {
            self.recover();
        }
        // A send fails only when the caller stopped waiting; nothing to do then.
        match req {
            Request::Info(reply) => {
                let _ = reply.send(self.info());
            }
            Request::Tokens(reply) => {
                let r = self.tokens();
                self.needs_reinit |= breaks_module(&r);
                let _ = reply.send(r);
            }
            Request::Certificates { token, reply } => {
                let r = self.certificates(token.as_ref());
                self.needs_reinit |= breaks_module(&r);
                if r.is_err() {
                    self.drop_probes();
                }
                let _ = reply.send(r);
            }
            Request::LoginState { token, reply } => {
                let r = self.login_state(&token);
                self.needs_reinit |= breaks_module(&r);
                if r.is_err() {
                    self.drop_probes();
                }
                let _ = reply.send(r);
            }
            Request::Sign {
                job,
                started,
                reply,
            } => {
                if started.send(()).is_err() {
                    tracing::debug!("a signing request given up on before it started is dropped");
                    return;
                }
                let r = self.sign(job);
                if let Err(failure) = &r {
                    self.needs_reinit |= breaks(&failure.error);
                    self.drop_probes();
                }
                let _ = reply.send(r);
            }
            Request::Logout { token, reply } => {
                let _ = reply.send(self.logout(&token));
            }
            Request::Generate { job, reply } => {
                let r = self.generate(job);
                self.needs_reinit |= breaks_module(&r);
                let _ = reply.send(r);
            }
            Request::KeySign { job, reply } => {
                let r = self.sign_with_key(job);
                self.needs_reinit |= breaks_module(&r);
                let _ = reply.send(r);
            }
            Request::Import { job, reply } => {
                let r = self.import(job);
                self.needs_reinit |= breaks_module(&r);
                let _ = reply.send(r);
            }
            Request::CheckGeneration { token, spec, reply } => {
                let r = self
                    .find(&token)
                    .and_then(|found| self.check_generation(&token, found.slot, spec));
                self.needs_reinit |= breaks_module(&r);
                let _ = reply.send(r);
            }
            Request::DeleteKey { job, reply } => {
                let r = self.delete_new_key(job);
                self.needs_reinit |= breaks_module(&r);
                let _ = reply.send(r);
            }
            Request::DeleteCertificate { job, reply } => {
                let r = self.delete_certificate(job);
                self.needs_reinit |= breaks_module(&r);
                let _ = reply.send(r);
            }
        }
    }

    fn info(&self) -> Result<ModuleInfo, Error> {
        let info = self.ctx.get_library_info().map_err(from_cryptoki)?;
        let v = |v: cryptoki::types::Version| format!("{}.{}", v.major(), v.minor());
        Ok(ModuleInfo {
            library_description: info.library_description().trim().to_owned(),
            manufacturer: info.manufacturer_id().trim().to_owned(),
            library_version: v(info.library_version()),
            cryptoki_version: v(info.cryptoki_version()),
        })
    }

    fn tokens(&mut self) -> Result<Vec<TokenInfo>, Error> {
        let slots = self.ctx.get_slots_with_token().map_err(from_cryptoki)?;
        let mut out = Vec::with_capacity(slots.len());
        for slot in slots {
            let info = match self.ctx.get_token_info(slot).map_err(from_cryptoki) {
                Ok(info) => info,
                // A token pulled between C_GetSlotList and C_GetTokenInfo is simply not listed.
                Err(Error::TokenNotPresent) => continue,
                Err(e) => return Err(e),
            };
            // A blank token (SoftHSM always offers one in a free slot) holds nothing to use.
            if !info.token_initialized() {
                continue;
            }
            out.push(self.describe_found(&Found { slot, info }));
        }
        Ok(out)
    }

    fn certificates(&mut self, token: Option<&TokenId>) -> Result<Vec<CertificateInfo>, Error> {
        let ids: Vec<TokenId> = match token {
            Some(id) => vec![id.clone()],
            None => self.tokens()?.into_iter().map(|t| t.id).collect(),
        };
        let mut out = Vec::new();
        for id in ids {
            match self.entries(&id) {
                Ok(entries) => out.extend(entries.iter().map(|e| e.info.clone())),
                Err(Error::TokenNotPresent) if token.is_none() => self.forget(&id),
                Err(e) => {
                    if e.is_removal() {
                        self.forget(&id);
                    }
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    fn login_state(&mut self, id: &TokenId) -> Result<LoginState, Error> {
        let found = self.find(id)?;
        let info = self.describe_found(&found);
        Ok(if info.logged_in {
            LoginState::LoggedIn
        } else if info.pin.locked {
            LoginState::Locked
        } else if info.pin_pad {
            LoginState::ProtectedPath
        } else {
            LoginState::NeedsPin(info.pin)
        })
    }

    fn logout(&mut self, id: &TokenId) -> Result<(), Error> {
        let Some(state) = self.tokens.get_mut(id) else {
            return Ok(());
        };
        state.entries = None;
        let Some(session) = state.session.as_ref() else {
            return Ok(());
        };
        match session.logout() {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserNotLoggedIn, _)) => Ok(()),
            Err(e) => {
                let e = from_cryptoki(e);
                if e.is_removal() {
                    self.forget(id);
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }

    // ---- helpers shared by the operations ----

    /// Drops everything cached about a token (its session too).
    fn forget(&mut self, id: &TokenId) {
        if self.tokens.remove(id).is_some() {
            tracing::debug!(token = %id, "token state dropped");
        }
    }

    fn token_id_of(&self, t: &cryptoki::slot::TokenInfo) -> TokenId {
        TokenId::derive(&self.path, t.serial_number(), t.label(), t.model())
    }

    /// Where the token is now, with its C_GetTokenInfo: the health probe, made once per
    /// request (see [`Found`]). A cached slot is re-checked with C_GetTokenInfo, and on a
    /// mismatch all slots are scanned again (slot numbers change on reinsertion).
    ///
    /// While our cached session holds a login (C_GetSessionInfo says so: a session the module
    /// closed, as on a removal, fails it) and no token event ([`Pace::token_event`]: a card in
    /// or out) nor error came since the last probe, that probe's answer is reused: a signature
    /// on a cached login makes no C_GetTokenInfo (SoftHSM opens and locks its token files for
    /// one). Without a login the probe is always made: its PIN flags decide the next dialog.
    pub(super) fn find(&mut self, id: &TokenId) -> Result<Found, Error> {
        let events = self.pace.token_events();
        if let Some(found) = self.cached_probe(id, events) {
            return Ok(found);
        }
        if let Some(state) = self.tokens.get(id) {
            let slot = state.slot;
            match self.ctx.get_token_info(slot) {
                Ok(info) if &self.token_id_of(&info) == id => {
                    self.keep_probe(id, events, &info);
                    return Ok(Found { slot, info });
                }
                _ => self.forget(id),
            }
        }
        let slots = self.ctx.get_slots_with_token().map_err(from_cryptoki)?;
        for slot in slots {
            let Ok(info) = self.ctx.get_token_info(slot) else {
                continue;
            };
            if &self.token_id_of(&info) == id {
                self.tokens.insert(id.clone(), TokenState::new(slot));
                self.keep_probe(id, events, &info);
                return Ok(Found { slot, info });
            }
        }
        Err(Error::TokenNotFound(id.clone()))
    }

    /// The last probe of a logged-in token, when nothing happened since (see [`Worker::find`]).
    fn cached_probe(&mut self, id: &TokenId, events: u64) -> Option<Found> {
        let (slot, info) = {
            let state = self.tokens.get(id)?;
            match &state.probe {
                Some((at, info)) if *at == events => (state.slot, info.clone()),
                _ => return None,
            }
        };
        self.logged_in(id).then_some(Found { slot, info })
    }

    fn keep_probe(&mut self, id: &TokenId, events: u64, info: &cryptoki::slot::TokenInfo) {
        if let Some(state) = self.tokens.get_mut(id) {
            state.probe = Some((events, info.clone()));
        }
    }

    /// Forgets every kept probe: after an error, or a login (its flags may have changed).
    pub(super) fn drop_probes(&mut self) {
        for state in self.tokens.values_mut() {
            state.probe = None;
        }
    }

    /// The token as the public API describes it, from its probe's C_GetTokenInfo.
    pub(super) fn describe_found(&mut self, found: &Found) -> TokenInfo {
        let t = &found.info;
        let slot_description = self
            .ctx
            .get_slot_info(found.slot)
            .map(|s| s.slot_description().trim().to_owned())
            .unwrap_or_default();
        let id = self.token_id_of(t);
        let logged_in = self.logged_in(&id);
        TokenInfo {
            id,
            slot_description,
            label: t.label().trim().to_owned(),
            manufacturer: t.manufacturer_id().trim().to_owned(),
            model: t.model().trim().to_owned(),
            serial: t.serial_number().trim().to_owned(),
            pin_pad: t.protected_authentication_path(),
            pin: pin_status(t),
            logged_in,
        }
    }

    /// Is this process logged in to the token? Only a cached session can carry a login.
    fn logged_in(&mut self, id: &TokenId) -> bool {
        let Some(session) = self.tokens.get(id).and_then(|s| s.session.as_ref()) else {
            return false;
        };
        match session.get_session_info() {
            Ok(info) => matches!(
                info.session_state(),
                SessionState::RoUser | SessionState::RwUser
            ),
            Err(_) => {
                // The session died (token removed?): start over next time.
                self.forget(id);
                false
            }
        }
    }

    /// The token's cached session, opened on first use in `slot` (the request's probe; no
    /// probe of its own). A token whose state was dropped since the probe (its session
    /// died) starts over in that slot.
    pub(super) fn session_at(&mut self, id: &TokenId, slot: Slot) -> Result<&Session, Error> {
        let ctx = self.ctx.clone();
        let state = self
            .tokens
            .entry(id.clone())
            .or_insert_with(|| TokenState::new(slot));
        if state.session.is_none() {
            let session = ctx.open_ro_session(slot).map_err(from_cryptoki)?;
            tracing::debug!(token = %id, "session opened");
            state.session = Some(session);
        }
        state
            .session
            .as_ref()
            .ok_or_else(|| Error::TokenNotFound(id.clone()))
    }

    /// Replaces the token's session with a fresh one without losing the login: the new one
    /// is opened before the old one is closed (login is per application, and lasts while
    /// any session is open). Used after a failed operation that may have left state behind.
    fn renew_session(&mut self, id: &TokenId) {
        let ctx = self.ctx.clone();
        let Some(state) = self.tokens.get_mut(id) else {
            return;
        };
        state.entries = None;
        match ctx.open_ro_session(state.slot) {
            Ok(fresh) => state.session = Some(fresh),
            Err(_) => self.forget(id),
        }
    }

    /// The mechanisms the token in `slot` (the request's probe) offers (cached; empty if the
    /// module will not say).
    fn mechanisms_at(&mut self, id: &TokenId, slot: Slot) -> Result<Vec<MechanismType>, Error> {
        if let Some(m) = self.tokens.get(id).and_then(|s| s.mechanisms.clone()) {
            return Ok(m);
        }
        let list = match self.ctx.get_mechanism_list(slot) {
            Ok(list) => list,
            Err(e) => {
                let e = from_cryptoki(e);
                if e.is_removal() {
                    return Err(e);
                }
                tracing::debug!(token = %id, error = %e, "no mechanism list; trying the basic mechanisms");
                Vec::new()
            }
        };
        if let Some(state) = self.tokens.get_mut(id) {
            state.mechanisms = Some(list.clone());
        }
        Ok(list)
    }

    /// The certificates on the token with their keys, for a listing: the cached scan (see
    /// [`Worker::entries_at`]) while the token holds the same objects as when it was made.
    fn entries(&mut self, id: &TokenId) -> Result<Arc<[Entry]>, Error> {
        // Probe first: a cached scan of a token that is gone must not be served.
        let found = self.find(id)?;
        self.drop_entries_if_objects_changed(id, &found)?;
        self.entries_at(id, &found)
    }

    /// PKCS#11 tells no one when another program (`pkcs11-tool`, `keyport certs` on the
    /// command line, a vendor's tool) stores or destroys an object, but the module shows it
    /// to the next search: SoftHSM re-reads its token folder when its `generation` file moved
    /// (a module that keeps a card's objects in memory shows it only once it reads them again;
    /// nothing here can make it). So a listing compares the handles of every object a search
    /// finds now (one C_FindObjects, no attribute read) with those of the last listing, and
    /// scans again when they differ (a module that gave a destroyed object's handle to a new
    /// one at once would hide that swap). Signing does not check: a key gone fails its
    /// C_SignInit, and the scan is dropped then.
    fn drop_entries_if_objects_changed(
        &mut self,
        id: &TokenId,
        found: &Found,
    ) -> Result<(), Error> {
        let mut now = self
            .session_at(id, found.slot)?
            .find_objects(&[])
            .map_err(from_cryptoki)?;
        now.sort_by_key(|h| h.handle());
        if let Some(state) = self.tokens.get_mut(id) {
            if state.objects.as_ref() != Some(&now) {
                if state.objects.is_some() && state.entries.is_some() {
                    tracing::debug!(token = %id, "the token's objects changed; scanning again");
                }
                state.entries = None;
                state.objects = Some(now);
            }
        }
        Ok(())
    }

    /// [`Worker::entries`] for a token this request has probed already.
    fn entries_at(&mut self, id: &TokenId, found: &Found) -> Result<Arc<[Entry]>, Error> {
        if let Some(e) = self.tokens.get(id).and_then(|s| s.entries.as_ref()) {
            return Ok(Arc::clone(e));
        }
        let logged_in = self.logged_in(id);
        let login_required = found.info.login_required();
        let session = self.session_at(id, found.slot)?;
        let scanned = scan(session, id, !logged_in && login_required);
        if let Err(Error::Pkcs11 { rv, .. }) = &scanned {
            if rv == "CKR_OBJECT_HANDLE_INVALID" {
                self.objects_unreadable = true;
                // Tried again at each request until C_Initialize works.
                self.needs_reinit = true;
            }
        }
        let mut entries = scanned?;
        for e in &mut entries {
            if e.info.always_authenticate {
                self.always_authenticate.insert(e.info.id.clone());
            } else if e.private_key.is_none() && self.always_authenticate.contains(&e.info.id) {
                e.info.always_authenticate = true;
            }
        }
        let entries: Arc<[Entry]> = entries.into();
        if let Some(state) = self.tokens.get_mut(id) {
            state.entries = Some(Arc::clone(&entries));
        }
        Ok(entries)
    }

    /// The entry for one certificate id, on a token this request has probed already.
    fn entry_at(&mut self, cert: &CertificateId, found: &Found) -> Result<EntryRef, Error> {
        let list = self.entries_at(cert.token_id(), found)?;
        let index = list
            .iter()
            .position(|e| cert.names(&e.info.id, &e.info.der))
            .ok_or_else(|| Error::CertificateNotFound(cert.clone()))?;
        Ok(EntryRef { list, index })
    }
}

/// The user PIN's flags in a C_GetTokenInfo answer.
fn pin_status(t: &cryptoki::slot::TokenInfo) -> PinStatus {
    PinStatus {
        initialized: t.user_pin_initialized(),
        count_low: t.user_pin_count_low(),
        final_try: t.user_pin_final_try(),
        locked: t.user_pin_locked(),
    }
}

/// A key object's id and public material.
struct KeyObject {
    handle: ObjectHandle,
    id: Vec<u8>,
    always_authenticate: bool,
    modulus: Option<Vec<u8>>,
    ec_point: Option<Vec<u8>>,
}

impl KeyObject {
    fn matches(&self, cert_id: &[u8], pk: &PublicKeyMaterial) -> bool {
        (!cert_id.is_empty() && self.id == cert_id)
            || self
                .modulus
                .as_deref()
                .is_some_and(|m| pk.matches_modulus(m))
            || self
                .ec_point
                .as_deref()
                .is_some_and(|p| pk.matches_ec_point(p))
    }
}

/// Finds certificates and pairs each with its key: by CKA_ID, else by public key.
/// `keys_may_be_hidden`: not logged in on a token that needs login, so private keys may be
/// invisible; a certificate with a CKA_ID is then listed if no key object contradicts it.
fn scan(session: &Session, token: &TokenId, keys_may_be_hidden: bool) -> Result<Vec<Entry>, Error> {
    let certs = session
        .find_objects(&[Attribute::Class(ObjectClass::CERTIFICATE)])
        .map_err(from_cryptoki)?;
    let private_keys = key_objects(session, ObjectClass::PRIVATE_KEY)?;
    let public_keys = key_objects(session, ObjectClass::PUBLIC_KEY)?;

    let mut out = Vec::new();
    for handle in certs {
        let attrs = session
            .get_attributes(
                handle,
                &[
                    AttributeType::Value,
                    AttributeType::Id,
                    AttributeType::Label,
                ],
            )
            .map_err(from_cryptoki)?;
        let (mut der, mut cka_id, mut label) = (Vec::new(), Vec::new(), Vec::new());
        for a in attrs {
            match a {
                Attribute::Value(v) => der = v,
                Attribute::Id(v) => cka_id = v,
                Attribute::Label(v) => label = v,
                _ => {}
            }
        }
        let parsed = match ParsedCertificate::parse(&der) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(token = %token, error = %e, "skipping a certificate that does not parse");
                continue;
            }
        };
        let private = private_keys
            .iter()
            .find(|k| k.matches(&cka_id, &parsed.public_key));
        let public = public_keys
            .iter()
            .find(|k| k.matches(&cka_id, &parsed.public_key));
        let plausible = keys_may_be_hidden && private_keys.is_empty() && !cka_id.is_empty();
        if private.is_none() && public.is_none() && !plausible {
            continue;
        }
        // A certificate without CKA_ID is named by its hash; one paired by public key still
        // signs with the private key found.
        let info = CertificateInfo {
            id: CertificateId::new(token, &cka_id, &der),
            token_id: token.clone(),
            label: String::from_utf8_lossy(&label).trim().to_owned(),
            der,
            subject: parsed.subject,
            issuer: parsed.issuer,
            serial_hex: parsed.serial_hex,
            not_before: parsed.not_before,
            not_after: parsed.not_after,
            key_algorithm: parsed.key_algorithm,
            key_usage: parsed.key_usage,
            extended_key_usage: parsed.extended_key_usage,
            always_authenticate: private.is_some_and(|k| k.always_authenticate),
            holder: parsed.holder,
        };
        out.push(Entry {
            info,
            private_key: private.map(|k| k.handle),
        });
    }
    name_renewals(token, &mut out);
    Ok(out)
}

/// Several certificates of one key (a renewal stored beside the old one): the one with the
/// earliest notBefore (then the lowest serial number: two issued in the same second by one
/// CA) keeps the key's id, each other one is listed under its exact id (see
/// [`CertificateId`]). The same certificate stored twice for one key is listed once. The order
/// of the list is kept.
fn name_renewals(token: &TokenId, entries: &mut Vec<Entry>) {
    let mut seen = HashSet::new();
    entries.retain(|e| seen.insert((e.info.id.clone(), e.info.der.clone())));
    type Rank<'a> = (time::OffsetDateTime, (usize, &'a str), &'a [u8]);
    fn rank(e: &Entry) -> Rank<'_> {
        let serial = e.info.serial_hex.trim_start_matches('0');
        (
            e.info.not_before,
            (serial.len(), serial),
            e.info.der.as_slice(),
        )
    }
    let mut first: HashMap<CertificateId, Rank<'_>> = HashMap::new();
    for e in entries.iter() {
        if e.info.id.cka_id().is_none() {
            continue; // named by its own hash already
        }
        let candidate = rank(e);
        first
            .entry(e.info.id.clone())
            .and_modify(|f| {
                if candidate < *f {
                    *f = candidate;
                }
            })
            .or_insert(candidate);
    }
    let renewed: Vec<(usize, CertificateId)> = entries
        .iter()
        .enumerate()
        .filter_map(|(i, e)| {
            let keeps = *first.get(&e.info.id)? == rank(e);
            let cka_id = e.info.id.cka_id()?;
            (!keeps).then(|| (i, CertificateId::exact(token, &cka_id, &e.info.der)))
        })
        .collect();
    for (i, id) in renewed {
        if let Some(e) = entries.get_mut(i) {
            e.info.id = id;
        }
    }
}

fn key_objects(session: &Session, class: ObjectClass) -> Result<Vec<KeyObject>, Error> {
    let handles = session
        .find_objects(&[Attribute::Class(class)])
        .map_err(from_cryptoki)?;
    let mut out = Vec::with_capacity(handles.len());
    for handle in handles {
        let mut key = KeyObject {
            handle,
            id: Vec::new(),
            always_authenticate: false,
            modulus: None,
            ec_point: None,
        };
        let mut key_type = None;
        let mut wanted = vec![AttributeType::Id, AttributeType::KeyType];
        if class == ObjectClass::PRIVATE_KEY {
            wanted.push(AttributeType::AlwaysAuthenticate);
        }
        for a in session
            .get_attributes(handle, &wanted)
            .map_err(from_cryptoki)?
        {
            match a {
                Attribute::Id(v) => key.id = v,
                Attribute::KeyType(t) => key_type = Some(t),
                Attribute::AlwaysAuthenticate(b) => key.always_authenticate = b,
                _ => {}
            }
        }
        // The public material is optional (EC private keys rarely carry CKA_EC_POINT); a
        // failure to read it only means no public-key pairing for this object.
        let material = match key_type {
            Some(KeyType::RSA) => Some(AttributeType::Modulus),
            Some(KeyType::EC) | Some(KeyType::EC_EDWARDS) => Some(AttributeType::EcPoint),
            _ => None,
        };
        if let Some(m) = material {
            if let Ok(attrs) = session.get_attributes(handle, &[m]) {
                for a in attrs {
                    match a {
                        Attribute::Modulus(v) => key.modulus = Some(v),
                        Attribute::EcPoint(v) => key.ec_point = Some(v),
                        _ => {}
                    }
                }
            }
        }
        out.push(key);
    }
    Ok(out)
}
