//! Logins: one C_Login per login the token asks for, with the job's credential, never twice
//! with the same PIN for the same login. A wrong PIN, a lock, a missing credential or a cancel on
//! the reader ends the job with its typed error; the caller decides whether to ask again.

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;

use super::{pin_status, Found, Worker};
use crate::error::{from_cryptoki, Error};
use crate::pin::{Credential, LoginKind};
use crate::token::TokenId;

impl Worker {
    /// Makes sure this process is logged in as the user. No C_Login when the login is cached
    /// or the token needs none; none either when the PIN is locked. `found` is the request's
    /// probe; returned is the latest one.
    pub(super) fn ensure_user_login(
        &mut self,
        id: &TokenId,
        found: Found,
        credential: &Credential,
    ) -> Result<Found, Error> {
        // Open the session first: a login only lasts while a session is open.
        self.session_at(id, found.slot)?;
        if self.logged_in(id) {
            tracing::debug!(token = %id, "already logged in");
            return Ok(found);
        }
        // A session that died took the token's state with it: probe again.
        let mut found = if self.tokens.contains_key(id) {
            found
        } else {
            self.find(id)?
        };
        if !found.info.login_required() {
            return Ok(found);
        }
        self.login(id, &mut found, LoginKind::User, credential)?;
        // Private objects just became visible.
        if let Some(state) = self.tokens.get_mut(id) {
            state.entries = None;
        }
        Ok(found)
    }

    /// One C_Login of `kind` with `credential` on the token's session (for `ContextSpecific`
    /// the signing operation must be initialised). `found` is updated after a wrong PIN.
    pub(super) fn login(
        &mut self,
        id: &TokenId,
        found: &mut Found,
        kind: LoginKind,
        credential: &Credential,
    ) -> Result<(), Error> {
        // A login changes the token's flags (PIN counters): the next request probes again.
        self.drop_probes();
        let status = pin_status(&found.info);
        let pin_pad = found.info.protected_authentication_path();
        if status.locked {
            return Err(Error::PinLocked);
        }
        if !status.initialized {
            return Err(Error::PinNotInitialized);
        }
        let pin = match credential {
            Credential::None => {
                return Err(Error::LoginRequired {
                    kind,
                    pin: status,
                    pin_pad,
                })
            }
            Credential::PinPad if pin_pad => None,
            Credential::PinPad => {
                return Err(Error::InvalidInput(
                    "the token has no PIN pad: a PIN is needed, not a confirmation".to_owned(),
                ))
            }
            Credential::Pin(pin) => Some(AuthPin::from(pin.expose())),
        };
        let user_type = match kind {
            LoginKind::User => UserType::User,
            LoginKind::ContextSpecific => UserType::ContextSpecific,
        };
        tracing::debug!(token = %id, ?kind, pin_pad, "C_Login");
        let session = self.session_at(id, found.slot)?;
        let result = session.login(user_type, pin.as_ref());
        drop(pin);
        match result {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
            Err(CkError::Pkcs11(RvError::PinIncorrect, _)) => {
                // The PIN flags changed: read them again for the caller's next dialog.
                found.info = self.ctx.get_token_info(found.slot).map_err(from_cryptoki)?;
                let after = pin_status(&found.info);
                tracing::info!(
                    token = %id,
                    ?kind,
                    count_low = after.count_low,
                    final_try = after.final_try,
                    locked = after.locked,
                    "wrong PIN"
                );
                if after.locked {
                    Err(Error::PinLocked)
                } else {
                    Err(Error::PinIncorrect {
                        count_low: after.count_low,
                        final_try: after.final_try,
                    })
                }
            }
            Err(e) => Err(from_cryptoki(e)),
        }
    }
}
