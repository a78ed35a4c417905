//! The bridge between the token layer's PIN requests and the user's dialogs: one dialog that
//! shows what is asked (origin, document, certificate, digest) and takes the PIN in the same
//! window. The user's "no", a timeout or a dialog that cannot be shown all end the request;
//! nothing here ever re-sends a PIN.

use std::sync::{Arc, Mutex};

use pkcs11_shim::{PinAnswer, PinProvider, PinRequest, SecretPin};

use crate::dialog::{Consent, Dialog, PinState, Texts, Unlock};
use crate::pinentry::{DialogCancel, DialogError, Pinentry};

/// Builds the consent dialog for one operation, given how the token is unlocked.
pub type DialogBuilder = Box<dyn Fn(&Texts, Unlock) -> Dialog + Send>;

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
