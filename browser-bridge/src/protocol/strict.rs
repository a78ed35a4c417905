//! JSON read the strict way: the value as `serde_json` builds it, plus what a plain
//! `serde_json::from_str` would hide — a member repeated in one object (where the last would
//! silently win) and a secret-looking key inside a repeated member that the last one replaced.

use std::fmt;

use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// What the scan saw besides the value.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Scan {
    /// Some object has the same key twice.
    pub duplicate_key: bool,
    /// Some object, at any depth, has a key named like a PIN or password.
    pub secret_key: bool,
}

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
            if super::SECRET_KEYS
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_members_and_hidden_secrets_are_seen() {
        let (v, scan) = parse(r#"{"a":1,"b":{"c":[{"d":2}]}}"#).unwrap();
        assert_eq!(v, serde_json::json!({"a":1,"b":{"c":[{"d":2}]}}));
        assert_eq!(scan, Scan::default());
        let (_, scan) = parse(r#"{"params":{"pin":"1"},"params":{}}"#).unwrap();
        assert!(scan.duplicate_key && scan.secret_key);
        let (_, scan) = parse(r#"[{"x":1,"x":1}]"#).unwrap();
        assert!(scan.duplicate_key && !scan.secret_key);
        assert!(parse(r#"{"a":1} x"#).is_err());
        assert!(parse(&"[".repeat(200)).is_err(), "nesting is bounded");
    }
}
