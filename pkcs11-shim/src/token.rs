//! Tokens as the rest of KeyPort sees them: a stable id, descriptive fields and PIN state.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use sha2::{Digest, Sha256};

/// A token's stable identity: the same physical token in the same module gets the same id
/// after it is removed and reinserted (slot numbers do not survive that; serials do).
///
/// The string form is `tok-` followed by 32 lowercase hex digits (a SHA-256 prefix over the
/// module path and the token's serial, or its label and model when the serial is empty).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TokenId(String);

const TOKEN_PREFIX: &str = "tok-";
const TOKEN_HEX_LEN: usize = 32;

impl TokenId {
    /// Derives the id of a token from the module that serves it and the token's own fields.
    pub fn derive(module_path: &Path, serial: &str, label: &str, model: &str) -> TokenId {
        let mut h = Sha256::new();
        h.update(b"keyport-token-v1\0");
        h.update(module_path.as_os_str().as_encoded_bytes());
        h.update([0u8]);
        let serial = serial.trim();
        if serial.is_empty() {
            h.update(b"label-model\0");
            h.update(label.trim().as_bytes());
            h.update([0u8]);
            h.update(model.trim().as_bytes());
        } else {
            h.update(b"serial\0");
            h.update(serial.as_bytes());
        }
        let digest = h.finalize();
        let hex = hex::encode(digest);
        TokenId(format!("{TOKEN_PREFIX}{}", &hex[..TOKEN_HEX_LEN]))
    }

    /// The string form.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A string that is not a token or certificate id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed id: {0:?}")]
pub struct ParseIdError(pub String);

impl FromStr for TokenId {
    type Err = ParseIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex = s
            .strip_prefix(TOKEN_PREFIX)
            .ok_or_else(|| ParseIdError(s.to_owned()))?;
        if hex.len() == TOKEN_HEX_LEN
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            Ok(TokenId(s.to_owned()))
        } else {
            Err(ParseIdError(s.to_owned()))
        }
    }
}

/// The user PIN's state as the token reports it (CKF_USER_PIN_* flags).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinStatus {
    /// CKF_USER_PIN_INITIALIZED.
    pub initialized: bool,
    /// CKF_USER_PIN_COUNT_LOW: at least one wrong PIN since the last success.
    pub count_low: bool,
    /// CKF_USER_PIN_FINAL_TRY: one more wrong PIN locks it.
    pub final_try: bool,
    /// CKF_USER_PIN_LOCKED.
    pub locked: bool,
}

/// One present token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    /// Stable id (see [`TokenId`]).
    pub id: TokenId,
    /// The slot's description (the reader, for smartcards).
    pub slot_description: String,
    /// The token label.
    pub label: String,
    /// The token manufacturer.
    pub manufacturer: String,
    /// The token model.
    pub model: String,
    /// The token serial number.
    pub serial: String,
    /// CKF_PROTECTED_AUTHENTICATION_PATH: the PIN is entered on a PIN pad, not given to us.
    pub pin_pad: bool,
    /// The user PIN's state.
    pub pin: PinStatus,
    /// This process is logged in to the token (the PIN cache is warm).
    pub logged_in: bool,
}

/// What signing with a token would need right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LoginState {
    /// Logged in already: no PIN needed (except for always-authenticate keys).
    LoggedIn,
    /// A PIN must be asked for.
    NeedsPin(PinStatus),
    /// The user must confirm on the PIN pad.
    ProtectedPath,
    /// The user PIN is locked.
    Locked,
}

/// The PKCS#11 module's own description (C_GetInfo).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleInfo {
    /// libraryDescription.
    pub library_description: String,
    /// manufacturerID.
    pub manufacturer: String,
    /// libraryVersion as "major.minor".
    pub library_version: String,
    /// cryptokiVersion as "major.minor".
    pub cryptoki_version: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_id_is_stable_and_round_trips() {
        let a = TokenId::derive(Path::new("/usr/lib/x.so"), "0123abcd", "L", "M");
        let b = TokenId::derive(Path::new("/usr/lib/x.so"), "0123abcd", "other", "other");
        assert_eq!(a, b, "the serial alone identifies the token");
        let parsed: TokenId = a.to_string().parse().expect("parse");
        assert_eq!(parsed, a);
        assert!(a.as_str().starts_with("tok-"));
        assert_eq!(a.as_str().len(), 4 + 32);
    }

    #[test]
    fn token_id_depends_on_module_and_falls_back_to_label_and_model() {
        let a = TokenId::derive(Path::new("/a.so"), "1", "L", "M");
        let b = TokenId::derive(Path::new("/b.so"), "1", "L", "M");
        assert_ne!(a, b);
        let c = TokenId::derive(Path::new("/a.so"), "  ", "L", "M");
        let d = TokenId::derive(Path::new("/a.so"), "", "L", "M2");
        assert_ne!(c, d);
        assert_eq!(c, TokenId::derive(Path::new("/a.so"), "", "L ", "M"));
    }

    #[test]
    fn token_id_rejects_malformed_strings() {
        for s in [
            "",
            "tok-",
            "tok-XYZ",
            "tok-0123456789abcdef0123456789ABCDEF",
            "x-0123456789abcdef0123456789abcdef",
        ] {
            assert!(s.parse::<TokenId>().is_err(), "{s}");
        }
    }
}
