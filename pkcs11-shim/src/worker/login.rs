//! The login loop: ask the provider, make exactly one C_Login with its answer, and on a wrong
//! PIN ask again with the token's new PIN flags. The shim never re-sends a PIN by itself.

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;

use super::{Found, Worker};
use crate::certificate::CertificateInfo;
use crate::error::{from_cryptoki, Error};
use crate::pin::{LoginKind, PinAnswer, PinProvider, PinRequest};
use crate::token::TokenId;

impl Worker {
    /// Makes sure this process is logged in as the user. No provider call when the login is
    /// cached; no C_Login at all when the PIN is locked. `found` is the request's probe;
    /// returned is the latest one (a PIN dialog is followed by a new probe).
    pub(super) fn ensure_user_login(
        &mut self,
        id: &TokenId,
        found: Found,
        certificate: &CertificateInfo,
        provider: &mut dyn PinProvider,
    ) -> Result<Found, Error> {
        // Open the session first: a login only lasts while a session is open.
        self.session_at(id, found.slot)?;
        if self.logged_in(id) {
            tracing::debug!(token = %id, "already logged in");
            return Ok(found);
        }
        // A session that died took the token's state with it: probe again.
        let found = if self.tokens.contains_key(id) {
            found
        } else {
            self.find(id)?
        };
        if !found.info.login_required() {
            return Ok(found);
        }
        let found = self.login_loop(id, found, certificate, provider, LoginKind::User)?;
        // Private objects just became visible.
        if let Some(state) = self.tokens.get_mut(id) {
            state.entries = None;
        }
        Ok(found)
    }

    /// Asks the provider and logs in until success, cancel, lock or a non-PIN error.
    /// For `ContextSpecific`, the signing operation must already be initialised. `found` is
    /// a fresh probe (no dialog since); returned is the probe the successful C_Login used.
    pub(super) fn login_loop(
        &mut self,
        id: &TokenId,
        mut found: Found,
        certificate: &CertificateInfo,
        provider: &mut dyn PinProvider,
        kind: LoginKind,
    ) -> Result<Found, Error> {
        let user_type = match kind {
            LoginKind::User => UserType::User,
            LoginKind::ContextSpecific => UserType::ContextSpecific,
        };
        let mut previous_error = None;
        let mut attempt = 1u32;
        loop {
            let token = self.describe_found(&found);
            if token.pin.locked {
                return Err(Error::PinLocked);
            }
            if !token.pin.initialized {
                return Err(Error::PinNotInitialized);
            }
            let answer = provider.request(&PinRequest {
                token: &token,
                certificate,
                kind,
                protected_path: token.pin_pad,
                previous_error,
                attempt,
            });
            let pin = match answer {
                PinAnswer::Cancel => return Err(Error::UserCancelled),
                PinAnswer::Confirmed if token.pin_pad => None,
                PinAnswer::Confirmed => {
                    return Err(Error::InvalidInput(
                        "the token has no PIN pad: a PIN is needed, not a confirmation".to_owned(),
                    ))
                }
                PinAnswer::Pin(pin) => Some(AuthPin::from(pin.expose())),
            };
            tracing::debug!(token = %id, ?kind, attempt, pin_pad = token.pin_pad, "C_Login");
            // The dialog took the user's time: find the token again before the PIN goes to it.
            found = self.find(id)?;
            let session = self.session_at(id, found.slot)?;
            let result = session.login(user_type, pin.as_ref());
            drop(pin);
            match result {
                Ok(()) => return Ok(found),
                Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => return Ok(found),
                Err(CkError::Pkcs11(RvError::PinIncorrect, _)) => {
                    // The PIN flags changed: read them again (this answer serves the next
                    // round's lock check and dialog).
                    found.info = self.ctx.get_token_info(found.slot).map_err(from_cryptoki)?;
                    let after = super::pin_status(&found.info);
                    tracing::info!(
                        token = %id,
                        count_low = after.count_low,
                        final_try = after.final_try,
                        locked = after.locked,
                        "wrong PIN"
                    );
                    if after.locked {
                        return Err(Error::PinLocked);
                    }
                    previous_error = Some(after);
                    attempt += 1;
                }
                Err(CkError::Pkcs11(RvError::PinLocked, _)) => return Err(Error::PinLocked),
                Err(e) => return Err(from_cryptoki(e)),
            }
        }
    }
}
