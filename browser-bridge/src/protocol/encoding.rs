//! Validated scalar types of the wire: strict base64, the authentication nonce, display text and
//! RFC 3339 timestamps. Each one refuses bad input while deserializing ("parse, don't validate").

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Binary data on the wire: standard alphabet, padded, canonical (no stray trailing bits, no
/// whitespace). Anything else is refused while deserializing.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Base64Bytes(pub Vec<u8>);

impl Base64Bytes {
    /// Decodes strictly.
    pub fn decode(text: &str) -> Result<Self, base64::DecodeError> {
        STANDARD.decode(text).map(Base64Bytes)
    }

    /// The standard padded base64 text.
    pub fn encode(&self) -> String {
        STANDARD.encode(&self.0)
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Takes the bytes out.
    pub fn into_vec(self) -> Vec<u8> {
        self.0
    }
}

impl std::fmt::Debug for Base64Bytes {
    // Never prints content: it may be data being signed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Base64Bytes({} bytes)", self.0.len())
    }
}

impl From<Vec<u8>> for Base64Bytes {
    fn from(v: Vec<u8>) -> Self {
        Base64Bytes(v)
    }
}

impl Serialize for Base64Bytes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.encode())
    }
}

impl<'de> Deserialize<'de> for Base64Bytes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Decoded from the text as it is read: no copy of it first (a batch has 1000).
        struct Text;
        impl serde::de::Visitor<'_> for Text {
            type Value = Base64Bytes;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Base64Bytes, E> {
                Base64Bytes::decode(text)
                    .map_err(|e| E::custom(format!("not standard padded base64: {e}")))
            }
        }
        deserializer.deserialize_str(Text)
    }
}

/// The relying party's nonce of `authenticate`, kept as the string received (the signature covers
/// its UTF-8 bytes, not its decoded bytes). 44 to 1024 characters of strict base64 decoding to at
/// least 32 bytes.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Challenge(String);

impl Challenge {
    /// Shortest accepted text.
    pub const MIN_CHARS: usize = 44;
    /// Longest accepted text.
    pub const MAX_CHARS: usize = 1024;
    /// Fewest decoded bytes.
    pub const MIN_BYTES: usize = 32;

    /// Validates a nonce string.
    pub fn parse(text: String) -> Result<Self, String> {
        let len = text.len();
        if !(Self::MIN_CHARS..=Self::MAX_CHARS).contains(&len) {
            return Err(format!(
                "challenge must be {}..={} characters, got {len}",
                Self::MIN_CHARS,
                Self::MAX_CHARS
            ));
        }
        let decoded = STANDARD
            .decode(&text)
            .map_err(|e| format!("challenge is not standard padded base64: {e}"))?;
        if decoded.len() < Self::MIN_BYTES {
            return Err(format!(
                "challenge must decode to at least {} bytes, got {}",
                Self::MIN_BYTES,
                decoded.len()
            ));
        }
        Ok(Challenge(text))
    }

    /// The nonce exactly as received.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Challenge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Challenge({:?})", self.0)
    }
}

impl Serialize for Challenge {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Challenge {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Challenge::parse(String::deserialize(deserializer)?).map_err(D::Error::custom)
    }
}

/// Text a page asks the agent to show in a native dialog: no control characters, no bidi
/// controls (which could make "fdp.exe" read as "exe.pdf"), no line/paragraph separators, and a
/// length cap of `MAX` characters; default-ignorable characters are removed
/// ([`crate::text::clean`]) and a required text (`ALLOW_EMPTY` false, titles) that is blank
/// afterwards is refused.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct DialogText<const MAX: usize, const ALLOW_EMPTY: bool>(String);

/// `display.title`: required, 1..=200 characters.
pub type Title = DialogText<200, false>;
/// `display.summary`: up to 2000 characters.
pub type Summary = DialogText<2000, true>;

impl<const MAX: usize, const ALLOW_EMPTY: bool> DialogText<MAX, ALLOW_EMPTY> {
    /// Validates dialog text.
    pub fn parse(text: String) -> Result<Self, String> {
        let chars = text.chars().count();
        if chars > MAX {
            return Err(format!("at most {MAX} characters, got {chars}"));
        }
        if !ALLOW_EMPTY && text.trim().is_empty() {
            return Err("must not be empty".into());
        }
        if let Some(c) = text.chars().find(|c| is_refused_in_dialog(*c)) {
            return Err(format!(
                "control or bidi character U+{:04X} refused",
                u32::from(c)
            ));
        }
        // The one cleaning of untrusted dialog text (crate::text): invisible characters go, and
        // a required text that shows nothing once they are gone is refused.
        let cleaned = crate::text::clean(&text);
        if !ALLOW_EMPTY && crate::text::is_blank(&cleaned) {
            return Err(
                "must show something: it is blank once invisible characters (zero-width, \
                        filler, tag, braille blank) are removed"
                    .into(),
            );
        }
        Ok(DialogText(cleaned))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Control characters (C0, DEL, C1), bidi embeddings/overrides/isolates and marks, and the
/// Unicode line and paragraph separators.
fn is_refused_in_dialog(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061C}'
                | '\u{200E}'
                | '\u{200F}'
                | '\u{202A}'..='\u{202E}'
                | '\u{2066}'..='\u{2069}'
                | '\u{2028}'
                | '\u{2029}'
        )
}

impl<const MAX: usize, const ALLOW_EMPTY: bool> std::fmt::Debug for DialogText<MAX, ALLOW_EMPTY> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl<const MAX: usize, const ALLOW_EMPTY: bool> Serialize for DialogText<MAX, ALLOW_EMPTY> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de, const MAX: usize, const ALLOW_EMPTY: bool> Deserialize<'de>
    for DialogText<MAX, ALLOW_EMPTY>
{
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Self::parse(String::deserialize(deserializer)?).map_err(D::Error::custom)
    }
}

/// An RFC 3339 timestamp (`notBefore`, `notAfter`, `validAt`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Timestamp(pub OffsetDateTime);

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let text = self
            .0
            .format(&Rfc3339)
            .map_err(|e| serde::ser::Error::custom(format!("timestamp not RFC 3339: {e}")))?;
        serializer.serialize_str(&text)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        OffsetDateTime::parse(&text, &Rfc3339)
            .map(Timestamp)
            .map_err(|e| D::Error::custom(format!("not an RFC 3339 timestamp: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_is_strict() {
        assert_eq!(Base64Bytes::decode("AAEC").unwrap().0, vec![0, 1, 2]);
        for bad in [
            "AAE",
            "AAE=A",
            "AB==",
            "-_8=",
            "AA EC",
            "AAEC\n",
            "AA=="[..3].as_ref(),
        ] {
            assert!(Base64Bytes::decode(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(Base64Bytes(vec![0xfb, 0xff]).encode(), "+/8=");
    }

    #[test]
    fn challenge_bounds() {
        let ok = STANDARD.encode([7u8; 32]);
        assert_eq!(ok.len(), 44);
        assert!(Challenge::parse(ok).is_ok());
        assert!(Challenge::parse(STANDARD.encode([7u8; 31])).is_err());
        assert!(Challenge::parse(STANDARD.encode([7u8; 768])).is_ok()); // 1024 chars
        assert!(Challenge::parse(STANDARD.encode([7u8; 769])).is_err());
    }

    #[test]
    fn dialog_text_refusals() {
        assert!(Title::parse("Loan contract 2026-114 — ünïcödé".into()).is_ok());
        assert!(Title::parse("x".repeat(200)).is_ok());
        assert!(Title::parse("é".repeat(201)).is_err());
        assert!(Title::parse(" ".into()).is_err());
        assert!(Summary::parse(String::new()).is_ok());
        for bad in [
            "a\u{7}",
            "a\tb",
            "a\u{85}",
            "x\u{202E}y",
            "x\u{2067}y",
            "x\u{200F}",
            "a\u{2028}b",
        ] {
            assert!(Summary::parse(bad.into()).is_err(), "{bad:?} accepted");
        }
    }
}
