//! JSON read the strict way: what a plain `serde_json::from_str` would hide — a member
//! repeated in one object (where the last would silently win) and a secret-looking key, also
//! inside a repeated member that the last one replaced — found by a scan that builds nothing,
//! and the request's envelope with its params left as text for their typed parse.
//!
//! Nothing is built as a `serde_json::Value` tree on the way: for a `sign.batch` of 1000 items
//! that tree (2000 maps) cost more than the typed parse itself (issue 12).

use std::borrow::Cow;
use std::fmt;

use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::Value;

/// What the scan saw besides the value.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Scan {
    /// Some object has the same key twice.
    pub duplicate_key: bool,
    /// Some object, at any depth, has a key named like a PIN or password.
    pub secret_key: bool,
}

/// Scans one JSON text (serde_json's own nesting limit applies): an error if it is not JSON.
pub(crate) fn scan(text: &str) -> Result<Scan, serde_json::Error> {
    let mut scan = Scan::default();
    let mut keys = Vec::new();
    let mut de = serde_json::Deserializer::from_str(text);
    Scanner {
        scan: &mut scan,
        keys: &mut keys,
    }
    .deserialize(&mut de)?;
    de.end()?;
    Ok(scan)
}

/// The members of a request object that the envelope checks read, and its params (`P`: as
/// text when read by [`envelope`]). Of a member given twice, the last counts (what a JSON
/// object would keep).
#[derive(Debug)]
pub(crate) struct Envelope<P> {
    /// The text is a JSON object.
    pub object: bool,
    pub jsonrpc: Option<Value>,
    pub id: Option<Value>,
    pub method: Option<Value>,
    pub params: Option<P>,
    /// Of the members that are none of these, the first in sorted order.
    pub unknown: Option<String>,
}

impl<P> Default for Envelope<P> {
    fn default() -> Self {
        Envelope {
            object: false,
            jsonrpc: None,
            id: None,
            method: None,
            params: None,
            unknown: None,
        }
    }
}

impl<P> Envelope<P> {
    /// The same envelope with its params made into `Q`.
    pub fn map_params<Q>(self, f: impl FnOnce(P) -> Q) -> Envelope<Q> {
        Envelope {
            object: self.object,
            jsonrpc: self.jsonrpc,
            id: self.id,
            method: self.method,
            params: self.params.map(f),
            unknown: self.unknown,
        }
    }
}

/// Reads the envelope of one JSON text.
pub(crate) fn envelope(text: &str) -> Result<Envelope<&RawValue>, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(text);
    let envelope = serde::Deserializer::deserialize_any(&mut de, EnvelopeVisitor)?;
    de.end()?;
    Ok(envelope)
}

/// Scans one value. `keys` is a stack shared by the whole scan: an object's keys lie on it,
/// one after the other, from where it starts to its end (a member's value, scanned between two
/// keys, takes its own keys off again), so no object allocates a list of its own.
struct Scanner<'s, 'de> {
    scan: &'s mut Scan,
    keys: &'s mut Vec<Cow<'de, str>>,
}

impl<'de> Scanner<'_, 'de> {
    fn inner(&mut self) -> Scanner<'_, 'de> {
        Scanner {
            scan: &mut *self.scan,
            keys: &mut *self.keys,
        }
    }
}

/// Up to this many members, an object's keys are compared pairwise; more are sorted first.
const PAIRWISE: usize = 16;

fn has_duplicate(keys: &[Cow<'_, str>]) -> bool {
    if keys.len() <= PAIRWISE {
        return keys
            .iter()
            .enumerate()
            .any(|(i, k)| keys[i + 1..].contains(k));
    }
    // Sorted, not compared pairwise: an object of many members costs n log n, not n².
    let mut sorted: Vec<&str> = keys.iter().map(|k| &**k).collect();
    sorted.sort_unstable();
    sorted.windows(2).any(|w| w[0] == w[1])
}

impl<'de> DeserializeSeed<'de> for Scanner<'_, 'de> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Scanner<'_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(self.inner())?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        let start = self.keys.len();
        while let Some(key) = map.next_key_seed(Key)? {
            if super::SECRET_KEYS
                .iter()
                .any(|s| key.eq_ignore_ascii_case(s))
            {
                self.scan.secret_key = true;
            }
            self.keys.push(key);
            map.next_value_seed(self.inner())?;
        }
        if has_duplicate(&self.keys[start..]) {
            self.scan.duplicate_key = true;
        }
        self.keys.truncate(start);
        Ok(())
    }
}

/// An object's key, borrowed from the text where it has no escapes.
struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = Cow<'de, str>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v))
    }
}

struct EnvelopeVisitor;

impl<'de> Visitor<'de> for EnvelopeVisitor {
    type Value = Envelope<&'de RawValue>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Envelope::default())
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Envelope::default())
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Envelope::default())
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Envelope::default())
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Envelope::default())
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Envelope::default())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Envelope::default())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut envelope = Envelope {
            object: true,
            ..Envelope::default()
        };
        while let Some(key) = map.next_key_seed(Key)? {
            match &*key {
                "jsonrpc" => envelope.jsonrpc = Some(map.next_value()?),
                "id" => envelope.id = Some(map.next_value()?),
                "method" => envelope.method = Some(map.next_value()?),
                "params" => envelope.params = Some(map.next_value()?),
                other => {
                    map.next_value::<IgnoredAny>()?;
                    if envelope.unknown.as_deref().is_none_or(|u| other < u) {
                        envelope.unknown = Some(other.to_owned());
                    }
                }
            }
        }
        Ok(envelope)
    }
}

/// The reader this module replaced, which built the whole `Value`: kept for the tests, which
/// check that both read every message alike.
#[cfg(test)]
pub(crate) mod reference {
    use std::fmt;

    use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};
    use serde_json::{Map, Value};

    use super::Scan;

    /// Parses one JSON text (serde_json's own nesting limit applies).
    pub(crate) fn parse(text: &str) -> Result<(Value, Scan), serde_json::Error> {
        let mut scan = Scan::default();
        let mut de = serde_json::Deserializer::from_str(text);
        let value = Seed(&mut scan).deserialize(&mut de)?;
        de.end()?;
        Ok((value, scan))
    }

    struct Seed<'a>(&'a mut Scan);

    impl<'de> DeserializeSeed<'de> for Seed<'_> {
        type Value = Value;
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Seed<'_> {
        type Value = Value;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON value")
        }

        fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
            Ok(Value::Bool(v))
        }
        fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
            Ok(Value::from(v))
        }
        fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
            Ok(Value::from(v))
        }
        fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
            Ok(Value::from(v))
        }
        fn visit_str<E>(self, v: &str) -> Result<Value, E> {
            Ok(Value::String(v.to_owned()))
        }
        fn visit_string<E>(self, v: String) -> Result<Value, E> {
            Ok(Value::String(v))
        }
        fn visit_unit<E>(self) -> Result<Value, E> {
            Ok(Value::Null)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
            let mut items = Vec::new();
            while let Some(v) = seq.next_element_seed(Seed(&mut *self.0))? {
                items.push(v);
            }
            Ok(Value::Array(items))
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
            let mut object = Map::new();
            while let Some(key) = map.next_key::<String>()? {
                if super::super::SECRET_KEYS
                    .iter()
                    .any(|s| key.eq_ignore_ascii_case(s))
                {
                    self.0.secret_key = true;
                }
                let value = map.next_value_seed(Seed(&mut *self.0))?;
                if object.insert(key, value).is_some() {
                    self.0.duplicate_key = true;
                }
            }
            Ok(Value::Object(object))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests panic on purpose
mod tests {
    use super::*;

    #[test]
    fn repeated_members_and_hidden_secrets_are_seen() {
        assert_eq!(
            scan(r#"{"a":1,"b":{"c":[{"d":2}]}}"#).unwrap(),
            Scan::default()
        );
        let scanned = scan(r#"{"params":{"pin":"1"},"params":{}}"#).unwrap();
        assert!(scanned.duplicate_key && scanned.secret_key);
        let scanned = scan(r#"[{"x":1,"x":1}]"#).unwrap();
        assert!(scanned.duplicate_key && !scanned.secret_key);
        // The same key once written with an escape is still the same key.
        assert!(scan(r#"{"a\u0062":1,"ab":2}"#).unwrap().duplicate_key);
        assert!(
            !scan(r#"{"ab":1,"ba":2,"a":{"ab":3}}"#)
                .unwrap()
                .duplicate_key
        );
        assert!(scan(r#"{"a":1} x"#).is_err());
        assert!(scan(&"[".repeat(200)).is_err(), "nesting is bounded");
    }

    #[test]
    fn the_envelope_keeps_the_last_of_a_member_and_the_params_as_text() {
        let e = envelope(r#"{"zz":0,"id":1,"method":"m","id":2,"params": {"a" : [1]},"yy":{}}"#)
            .unwrap();
        assert!(e.object);
        assert_eq!(e.id, Some(Value::from(2)));
        assert_eq!(e.method, Some(Value::from("m")));
        assert_eq!(e.params.map(RawValue::get), Some(r#"{"a" : [1]}"#));
        assert_eq!(e.unknown.as_deref(), Some("yy"));
        assert!(e.jsonrpc.is_none());
        for not_object in ["[1,{}]", "\"a\"", "null", "3"] {
            let e = envelope(not_object).unwrap();
            assert!(!e.object && e.id.is_none(), "{not_object}");
        }
    }
}
