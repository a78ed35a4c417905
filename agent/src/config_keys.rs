//! The configuration's key names, read from the serde definitions themselves, and the nearest
//! one to a misspelt key (`pin_cache_secs` → `pin_cache_seconds`), so that a typo is reported
//! as a typo with the key meant.

use serde::de::{self, Visitor};
use serde::Deserialize;

/// The field names `T`'s derived `Deserialize` expects (empty if `T` is not a struct).
pub fn fields<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    let mut found: &'static [&'static str] = &[];
    // The probe fails every deserialisation after noting the fields it was asked for.
    let _ = T::deserialize(FieldProbe(&mut found));
    found
}

/// The known key most like `key`: one at most two edits away (a third of its length for long
/// keys), or that one begins with the other. `None` if nothing is close.
pub fn nearest<'a>(key: &str, known: &[&'a str]) -> Option<&'a str> {
    let key = key.to_ascii_lowercase();
    known
        .iter()
        .map(|k| (edit_distance(&key, k), *k))
        .filter(|(d, k)| {
            *d <= (k.len() / 3).max(2)
                || (key.len() >= 4 && (k.starts_with(key.as_str()) || key.starts_with(k)))
        })
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Levenshtein distance over bytes (keys are ASCII).
fn edit_distance(a: &str, b: &str) -> usize {
    let b = b.as_bytes();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.bytes().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb {
                prev
            } else {
                1 + prev.min(cur).min(row[j])
            };
            prev = cur;
        }
    }
    row[b.len()]
}

struct FieldProbe<'a>(&'a mut &'static [&'static str]);

impl<'de> de::Deserializer<'de> for FieldProbe<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("field probe"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = fields;
        Err(de::Error::custom("field probe"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn the_config_keys_come_from_the_struct() {
        let keys = fields::<Config>();
        assert!(keys.contains(&"pin_cache_seconds"), "{keys:?}");
        assert!(keys.contains(&"limits"), "{keys:?}");
    }

    #[test]
    fn typos_find_the_key_meant_and_strangers_find_none() {
        let keys = fields::<Config>();
        for (typo, meant) in [
            ("pin_cache_secs", "pin_cache_seconds"),
            ("pin_cache_second", "pin_cache_seconds"),
            ("prot", "port"),
            ("alowed_origins", "allowed_origins"),
            ("Dialog_Timeout_Seconds", "dialog_timeout_seconds"),
        ] {
            assert_eq!(nearest(typo, keys), Some(meant), "{typo}");
        }
        for stranger in ["pin", "user_pin", "mapping", "colour"] {
            assert_eq!(nearest(stranger, keys), None, "{stranger}");
        }
    }
}
