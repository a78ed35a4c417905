//! PINs, and what a signing job brings to log in with.

use std::fmt;

use zeroize::Zeroizing;

/// A PIN, wiped from memory on drop. Its `Debug` never shows it and nothing here logs it.
pub struct SecretPin(Zeroizing<String>);

impl SecretPin {
    /// The PIN itself; only the login code needs it.
    pub(crate) fn expose(&self) -> &str {
        &self.0
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

/// Which login a token asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum LoginKind {
    /// The normal user login (CKU_USER), once per session/cache.
    User,
    /// A re-authentication for one signature with a CKA_ALWAYS_AUTHENTICATE key
    /// (CKU_CONTEXT_SPECIFIC, between C_SignInit and C_Sign).
    ContextSpecific,
}

/// What a signing job may log in with: the user's one answer to one dialog. Plain data, so a
/// job can cross a process boundary.
///
/// A credential serves at most one signature's logins: the user login when the token needs
/// one, and the context-specific login of one signature with a CKA_ALWAYS_AUTHENTICATE key
/// (one dialog, one document). When the job needs a login its credential cannot serve, it
/// stops with [`crate::Error::LoginRequired`] and the signatures made so far; the caller asks
/// the user and sends a new job. After a wrong PIN it stops with
/// [`crate::Error::PinIncorrect`]. The shim never sends a PIN twice to the same login.
#[derive(Debug, Default)]
pub enum Credential {
    /// Nothing: the job signs only what needs no login.
    #[default]
    None,
    /// The PIN the user typed.
    Pin(SecretPin),
    /// The user agreed to enter the PIN on the reader's PIN pad: C_Login with no PIN.
    PinPad,
}

impl Credential {
    /// True when there is something to log in with.
    pub fn is_some(&self) -> bool {
        !matches!(self, Credential::None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_pin() {
        let pin = SecretPin::from("123456".to_owned());
        assert_eq!(format!("{pin:?}"), "SecretPin(***)");
        assert_eq!(format!("{:?}", Credential::Pin(pin)), "Pin(SecretPin(***))");
    }
}
