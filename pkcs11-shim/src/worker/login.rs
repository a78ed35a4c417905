//! The login loop: ask the provider, make exactly one C_Login with its answer, and on a wrong
//! PIN ask again with the token's new PIN flags. The shim never re-sends a PIN by itself.

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;

use super::Worker;
use crate::certificate::CertificateInfo;
use crate::error::{from_cryptoki, Error};
use crate::pin::{LoginKind, PinAnswer, PinProvider, PinRequest};
use crate::token::TokenId;

impl Worker {
    /// Makes sure this process is logged in as the user. No provider call when the login is
    /// cached; no C_Login at all when the PIN is locked.
    pub(super) fn ensure_user_login(
        &mut self,
        id: &TokenId,
        certificate: &CertificateInfo,
        provider: &mut dyn PinProvider,
    ) -> Result<(), Error> {
        // Open the session first: a login only lasts while a session is open.
        self.session(id)?;
        if self.logged_in(id) {
            tracing::debug!(token = %id, "already logged in");
            return Ok(());
        }
        let slot = self.slot(id)?;
        let needs_login = self
            .ctx
            .get_token_info(slot)
            .map_err(from_cryptoki)?
            .login_required();
        if !needs_login {
            return Ok(());
        }
        self.login_loop(id, certificate, provider, LoginKind::User)?;
        // Private objects just became visible.
        if let Some(state) = self.tokens.get_mut(id) {
            state.entries = None;
        }
        Ok(())
    }

    /// Asks the provider and logs in until success, cancel, lock or a non-PIN error.
    /// For `ContextSpecific`, the signing operation must already be initialised.
    pub(super) fn login_loop(
        &mut self,
        id: &TokenId,
        certificate: &CertificateInfo,
        provider: &mut dyn PinProvider,
        kind: LoginKind,
    ) -> Result<(), Error> {
        let user_type = match kind {
            LoginKind::User => UserType::User,
            LoginKind::ContextSpecific => UserType::ContextSpecific,
        };
        let mut previous_error = None;
        let mut attempt = 1u32;
        loop {
            let slot = self.slot(id)?;
            let token = self.describe(slot)?;
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
            let session = self.session(id)?;
            let result = session.login(user_type, pin.as_ref());
            drop(pin);
            match result {
                Ok(()) => return Ok(()),
                Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => return Ok(()),
                Err(CkError::Pkcs11(RvError::PinIncorrect, _)) => {
                    let after = self.describe(slot)?.pin;
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
