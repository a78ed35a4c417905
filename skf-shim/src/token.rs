//! Tokens (SKF devices), their applications and PIN state, as the rest of KeyPort sees them.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use sha2::{Digest, Sha256};

/// A token's stable identity: the same key in the same library gets the same id after it is
/// pulled out and plugged in again (device names may change; serials do not).
///
/// The string form is `skf-` followed by 32 lowercase hex digits (a SHA-256 prefix over the
/// library path and the device serial, or its label and manufacturer when the serial is empty).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TokenId(String);

const TOKEN_PREFIX: &str = "skf-";
const TOKEN_HEX_LEN: usize = 32;

impl TokenId {
    /// Derives the id of a device from the library that serves it and the device's DEVINFO.
    pub fn derive(library: &Path, serial: &str, label: &str, manufacturer: &str) -> TokenId {
        let mut h = Sha256::new();
        h.update(b"keyport-skf-token-v1\0");
        h.update(library.as_os_str().as_encoded_bytes());
        h.update([0u8]);
        let serial = serial.trim();
        if serial.is_empty() {
            h.update(b"label-manufacturer\0");
            h.update(label.trim().as_bytes());
            h.update([0u8]);
            h.update(manufacturer.trim().as_bytes());
        } else {
            h.update(b"serial\0");
            h.update(serial.as_bytes());
        }
        let hex = hex::encode(h.finalize());
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

impl TryFrom<String> for TokenId {
    type Error = ParseIdError;

    /// Parsed, so a deserialized id is as valid as one the shim made.
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<TokenId> for String {
    fn from(id: TokenId) -> String {
        id.0
    }
}

/// A string that is not a token, application or certificate id.
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

/// An application on a token: the unit an SKF user PIN belongs to.
/// String form: `skf-…/<hex of the application name's bytes>`. The name is kept as the library
/// gave it (ASCII, UTF-8 or GBK), so it goes back to the library byte for byte.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ApplicationId {
    token: TokenId,
    name: Vec<u8>,
}

impl ApplicationId {
    /// The application `name` on `token`.
    pub fn new(token: TokenId, name: &str) -> ApplicationId {
        ApplicationId::from_raw(token, name.as_bytes())
    }

    /// The application whose name is these bytes.
    pub fn from_raw(token: TokenId, name: &[u8]) -> ApplicationId {
        ApplicationId {
            token,
            name: name.to_vec(),
        }
    }

    /// The token.
    pub fn token(&self) -> &TokenId {
        &self.token
    }

    /// The application's name for display (non-UTF-8 bytes replaced).
    pub fn name(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }

    /// The name's bytes, as the library reported them.
    pub fn raw_name(&self) -> &[u8] {
        &self.name
    }
}

impl fmt::Display for ApplicationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.token, hex::encode(&self.name))
    }
}

impl FromStr for ApplicationId {
    type Err = ParseIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseIdError(s.to_owned());
        let (token, name) = s.split_once('/').ok_or_else(bad)?;
        Ok(ApplicationId {
            token: token.parse()?,
            name: hex_name(name).ok_or_else(bad)?,
        })
    }
}

/// Decodes a hex-encoded, non-empty name (lowercase hex, as we write it).
pub(crate) fn hex_name(h: &str) -> Option<Vec<u8>> {
    if h.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    let bytes = hex::decode(h).ok()?;
    (!bytes.is_empty()).then_some(bytes)
}

/// A device as SKF_GetDevInfo describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    /// Stable id.
    pub id: TokenId,
    /// The device name SKF_EnumDev gave, for display (may change between insertions).
    pub device_name: String,
    /// DEVINFO.Label.
    pub label: String,
    /// DEVINFO.Manufacturer.
    pub manufacturer: String,
    /// DEVINFO.Issuer.
    pub issuer: String,
    /// DEVINFO.SerialNumber.
    pub serial: String,
}

/// The user PIN of an application, as SKF_GetPINInfo reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinStatus {
    /// Tries a fresh PIN has.
    pub max_retries: u32,
    /// Tries left now.
    pub retries_left: u32,
    /// The PIN is still the issuer's default.
    pub default_pin: bool,
    /// A wrong PIN was entered since the last right one (see [`crate::Error::PinIncorrect`]).
    pub count_low: bool,
    /// One try left.
    pub final_try: bool,
    /// No tries left: SKF_VerifyPIN will not be called.
    pub locked: bool,
}

impl PinStatus {
    pub(crate) fn from_counts(max_retries: u32, retries_left: u32, default_pin: bool) -> Self {
        PinStatus {
            max_retries,
            retries_left,
            default_pin,
            count_low: retries_left > 0 && crate::error::count_low(retries_left, max_retries),
            final_try: retries_left == 1,
            locked: retries_left == 0,
        }
    }
}

/// An application and its PIN state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplicationInfo {
    /// Stable id.
    pub id: ApplicationId,
    /// The user PIN's state.
    pub pin: PinStatus,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_ids_are_stable_and_parse_back() {
        let a = TokenId::derive(Path::new("/usr/lib/libskf.so"), "KP-1", "L", "M");
        let b = TokenId::derive(Path::new("/usr/lib/libskf.so"), " KP-1 ", "other", "x");
        assert_eq!(a, b, "the serial alone names the device");
        assert_ne!(a, TokenId::derive(Path::new("/other.so"), "KP-1", "L", "M"));
        assert_eq!(a.as_str().parse::<TokenId>(), Ok(a.clone()));
        assert!("tok-00".parse::<TokenId>().is_err());
    }

    #[test]
    fn application_ids_round_trip_any_name() {
        let t = TokenId::derive(Path::new("/l.so"), "S", "", "");
        let app = ApplicationId::new(t.clone(), "应用/1");
        assert_eq!(app.to_string().parse::<ApplicationId>(), Ok(app));
        // GBK bytes (not UTF-8) survive the round trip exactly.
        let gbk = ApplicationId::from_raw(t, b"\xd3\xa6\xd3\xc3");
        assert_eq!(gbk.to_string().parse::<ApplicationId>(), Ok(gbk.clone()));
        assert_eq!(gbk.raw_name(), b"\xd3\xa6\xd3\xc3");
    }
}
