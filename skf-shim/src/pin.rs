//! The PIN, as a secret that is wiped and never shown.

use std::fmt;

use zeroize::Zeroizing;

/// A PIN, wiped from memory on drop. Its `Debug` never shows it and nothing here logs it.
/// It reaches the library once, in one SKF_VerifyPIN, through a zeroizing C copy.
pub struct SecretPin(Zeroizing<String>);

impl SecretPin {
    /// The PIN itself; only the verify call needs it.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_pin() {
        let pin = SecretPin::from("123456".to_owned());
        assert_eq!(format!("{pin:?}"), "SecretPin(***)");
    }
}
