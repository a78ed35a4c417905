//! PINs and the callback that asks the user for one.

use std::fmt;

use zeroize::Zeroizing;

use crate::certificate::CertificateInfo;
use crate::token::{PinStatus, TokenInfo};

/// A PIN, wiped from memory on drop. Its `Debug` never shows it and nothing here logs it.
pub struct SecretPin(Zeroizing<String>);

impl SecretPin {
    /// The PIN itself; only the login code needs it.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }

    /// A second, equally zeroizing copy. For a caller that answers two logins of one
    /// signature with one typed PIN (the user login, then the context-specific login of a
    /// CKA_ALWAYS_AUTHENTICATE key); the shim itself never re-sends a PIN.
    pub fn duplicate(&self) -> SecretPin {
        SecretPin(Zeroizing::new(self.0.as_str().to_owned()))
    }
}

impl From<String> for SecretPin {
    fn from(pin: String) -> Self {
        SecretPin(Zeroizing::new(pin))
    }
}

impl fmt::Debug for SecretPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretPin(***)")
    }
}

/// Which login a PIN is asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoginKind {
    /// The normal user login (CKU_USER), once per session/cache.
    User,
    /// A re-authentication for one signature with a CKA_ALWAYS_AUTHENTICATE key
    /// (CKU_CONTEXT_SPECIFIC).
    ContextSpecific,
}

/// What the worker tells the PIN provider when it needs a PIN.
#[derive(Debug)]
pub struct PinRequest<'a> {
    /// The token to log in to.
    pub token: &'a TokenInfo,
    /// The certificate whose key will sign.
    pub certificate: &'a CertificateInfo,
    /// User login or per-signature re-authentication.
    pub kind: LoginKind,
    /// The token has a PIN pad: ask the user to confirm, then answer [`PinAnswer::Confirmed`].
    pub protected_path: bool,
    /// `Some` after a wrong PIN: the token's PIN flags right after the failure.
    pub previous_error: Option<PinStatus>,
    /// 1 for the first request of this login, 2 after one wrong PIN, …
    pub attempt: u32,
}

/// The user's answer.
#[derive(Debug)]
pub enum PinAnswer {
    /// Log in with this PIN.
    Pin(SecretPin),
    /// For a protected authentication path: the user agreed; log in with no PIN (the pad asks).
    Confirmed,
    /// The user declined.
    Cancel,
}

/// Asks the user for a PIN. Called on the module's worker thread; it may block (a dialog).
/// The shim never re-sends a PIN by itself: after a wrong PIN it asks again.
pub trait PinProvider: Send {
    /// One question, one answer.
    fn request(&mut self, req: &PinRequest<'_>) -> PinAnswer;
}

impl<F> PinProvider for F
where
    F: FnMut(&PinRequest<'_>) -> PinAnswer + Send,
{
    fn request(&mut self, req: &PinRequest<'_>) -> PinAnswer {
        self(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_pin() {
        let pin = SecretPin::from("123456".to_owned());
        assert_eq!(format!("{pin:?}"), "SecretPin(***)");
        assert_eq!(format!("{:?}", PinAnswer::Pin(pin)), "Pin(SecretPin(***))");
    }
}
