//! The bridge between the token layer's PIN requests and the user's dialogs: one dialog that
//! shows what is asked (origin, document, certificate, digest) and takes the PIN in the same
//! window. The user's "no", a timeout or a dialog that cannot be shown all end the request;
//! nothing here ever re-sends a PIN.

use std::sync::{Arc, Mutex};

use pkcs11_shim::{LoginKind, PinAnswer, PinProvider, PinRequest, PinStatus, SecretPin};

use crate::dialog::{Consent, Dialog, PinState, Texts, Unlock};
use crate::pinentry::{DialogCancel, DialogError, Pinentry};

/// Builds the consent dialog for one operation, given how the token is unlocked.
pub type DialogBuilder = Arc<dyn Fn(&Texts, Unlock) -> Dialog + Send + Sync>;

/// Why the last dialog gave no answer, kept for the caller to report (TIMEOUT vs
/// USER_CANCELLED vs a pinentry that could not run).
#[derive(Debug, Clone, Default)]
pub struct DialogOutcome {
    inner: Arc<Mutex<Option<Arc<DialogError>>>>,
}

impl DialogOutcome {
    fn set(&self, e: DialogError) {
        if let Ok(mut slot) = self.inner.lock() {
            *slot = Some(Arc::new(e));
        }
    }

    /// The error of the dialog that ended the request, if one did.
    pub fn error(&self) -> Option<Arc<DialogError>> {
        self.inner.lock().ok().and_then(|slot| slot.clone())
    }
}

/// A [`PinProvider`] that asks through pinentry.
pub struct DialogPinProvider {
    pinentry: Pinentry,
    cancel: DialogCancel,
    texts: Texts,
    build: DialogBuilder,
    outcome: DialogOutcome,
}

impl std::fmt::Debug for DialogPinProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DialogPinProvider")
            .field("pinentry", &self.pinentry.program())
            .finish_non_exhaustive()
    }
}

impl DialogPinProvider {
    pub fn new(
        pinentry: Pinentry,
        cancel: DialogCancel,
        texts: Texts,
        build: DialogBuilder,
        outcome: DialogOutcome,
    ) -> Self {
        DialogPinProvider {
            pinentry,
            cancel,
            texts,
            build,
            outcome,
        }
    }
}

impl PinProvider for DialogPinProvider {
    fn request(&mut self, req: &PinRequest<'_>) -> PinAnswer {
        let previous = req.previous_error;
        let state = PinState {
            wrong_pin: previous.is_some(),
            count_low: previous.map_or(req.token.pin.count_low, |p| p.count_low),
            final_try: previous.map_or(req.token.pin.final_try, |p| p.final_try),
        };
        let unlock = if req.protected_path {
            Unlock::PinPad(state)
        } else {
            Unlock::Pin(state)
        };
        let dialog = (self.build)(&self.texts, unlock);
        match dialog.ask(&self.pinentry, &self.cancel) {
            Ok(Consent::Pin(mut pin)) => PinAnswer::Pin(SecretPin::from(std::mem::take(&mut *pin))),
            Ok(Consent::Confirmed) => PinAnswer::Confirmed,
            Err(e) => {
                tracing::info!(error = %e, "dialog ended without an answer");
                self.outcome.set(e);
                PinAnswer::Cancel
            }
        }
    }
}

/// Shows a consent-only dialog (the token needs no PIN now), on the calling thread.
pub fn confirm_only(
    pinentry: &Pinentry,
    cancel: &DialogCancel,
    texts: &Texts,
    build: &DialogBuilder,
) -> Result<(), DialogError> {
    match build(texts, Unlock::LoggedIn).ask(pinentry, cancel)? {
        Consent::Confirmed => Ok(()),
        // A consent-only dialog has no PIN field; a PIN here would be a pinentry's oddity,
        // dropped (and zeroed) unused.
        Consent::Pin(_) => Ok(()),
    }
}

/// A [`PinProvider`] for an answer the user already gave, in a dialog shown *before* the token
/// work started (off the module's worker thread, so one site's open dialog never holds up another
/// site's requests to the same module).
///
/// - The first user login gets that answer (PIN, or "confirmed" for a PIN pad).
/// - A key that wants a context-specific login for its signature (CKA_ALWAYS_AUTHENTICATE) gets
///   the same PIN once: one document, one dialog. Later signatures of such a key ask through
///   `fallback`.
/// - After a wrong PIN it does **not** ask: it records the token's flags and answers Cancel, so
///   the caller shows the next dialog (with the warning) off the worker and starts over. Each
///   C_Login is one entry by the user; nothing is re-sent.
pub struct PreAsked {
    first: Option<PinAnswer>,
    context_copy: Option<SecretPin>,
    wrong: Arc<Mutex<Option<PinStatus>>>,
    fallback: DialogPinProvider,
}

impl std::fmt::Debug for PreAsked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreAsked")
            .field("answered", &self.first.is_some())
            .finish_non_exhaustive()
    }
}

impl PreAsked {
    /// `wrong` receives the token's PIN flags when the answer turns out to be a wrong PIN.
    pub fn new(
        first: PinAnswer,
        wrong: Arc<Mutex<Option<PinStatus>>>,
        fallback: DialogPinProvider,
    ) -> Self {
        let context_copy = match &first {
            PinAnswer::Pin(pin) => Some(pin.duplicate()),
            _ => None,
        };
        PreAsked {
            first: Some(first),
            context_copy,
            wrong,
            fallback,
        }
    }
}

impl PinProvider for PreAsked {
    fn request(&mut self, req: &PinRequest<'_>) -> PinAnswer {
        if let Some(flags) = req.previous_error {
            if req.kind == LoginKind::User {
                if let Ok(mut w) = self.wrong.lock() {
                    *w = Some(flags);
                }
                self.context_copy = None;
                return PinAnswer::Cancel;
            }
            return self.fallback.request(req);
        }
        match req.kind {
            LoginKind::User => match self.first.take() {
                Some(answer) => answer,
                None => self.fallback.request(req),
            },
            LoginKind::ContextSpecific => {
                // The token was logged in already (cache) or the user login just used the
                // answer: the PIN typed for this request also unlocks its one signature.
                if let Some(PinAnswer::Pin(pin)) = self.first.take() {
                    self.context_copy = None;
                    return PinAnswer::Pin(pin);
                }
                match self.context_copy.take() {
                    Some(pin) => PinAnswer::Pin(pin),
                    None => self.fallback.request(req),
                }
            }
        }
    }
}
