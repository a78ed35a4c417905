//! The one cleaning of untrusted text before it reaches a native dialog, whatever its source: a
//! page's `display` strings, a token's label, a certificate's names.
//!
//! [`clean`] drops every Unicode default-ignorable code point (zero-width spaces and joiners,
//! word joiner, BOM, soft hyphen, Hangul fillers, tag characters, variation selectors, bidi
//! controls; the table is `icu_properties`' `Default_Ignorable_Code_Point`, not a list kept by
//! hand), drops the line and paragraph separators U+2028/U+2029, and turns every other control
//! character (line feed, tab, C1 controls) into a space, so untrusted text can neither hide
//! characters nor start a new line in a dialog. [`is_blank`] says whether what is left shows
//! nothing: only white space and characters drawn as blanks (U+2800 BRAILLE PATTERN BLANK).
//! Text that is blank after cleaning is refused by [`clean_required`].

use icu_properties::props::{BinaryProperty, DefaultIgnorableCodePoint};

/// Characters that are not default-ignorable but are drawn as nothing.
const BLANK_GLYPHS: [char; 1] = ['\u{2800}'];

/// Why text was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TextError {
    /// Nothing visible is left once invisible characters are removed.
    #[error("blank once invisible characters are removed")]
    Blank,
}

/// Untrusted text made safe to show: invisible characters and line breaks removed.
pub fn clean(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if DefaultIgnorableCodePoint::for_char(c) || matches!(c, '\u{2028}' | '\u{2029}') {
            continue;
        }
        out.push(if c.is_control() { ' ' } else { c });
    }
    out
}

/// True when the text shows nothing: empty, white space, or characters drawn as blanks (after
/// [`clean`], which removes the invisible ones).
pub fn is_blank(text: &str) -> bool {
    text.chars()
        .all(|c| c.is_whitespace() || BLANK_GLYPHS.contains(&c) || is_invisible(c))
}

/// [`clean`], refusing text that is blank afterwards.
pub fn clean_required(text: &str) -> Result<String, TextError> {
    let cleaned = clean(text);
    if is_blank(&cleaned) {
        return Err(TextError::Blank);
    }
    Ok(cleaned)
}

/// Whether [`clean`] removes this character (rather than keeping or replacing it).
pub fn is_invisible(c: char) -> bool {
    DefaultIgnorableCodePoint::for_char(c) || matches!(c, '\u{2028}' | '\u{2029}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invisible_characters_are_dropped() {
        for c in [
            '\u{200B}',
            '\u{200C}',
            '\u{200D}',
            '\u{2060}',
            '\u{FEFF}',
            '\u{00AD}',
            '\u{3164}',
            '\u{115F}',
            '\u{FFA0}',
            '\u{E0041}',
            '\u{E007F}',
            '\u{FE0F}',
            '\u{202E}',
            '\u{2066}',
            '\u{061C}',
            '\u{2028}',
            '\u{2029}',
            '\u{180E}',
        ] {
            assert_eq!(clean(&format!("a{c}b")), "ab", "U+{:04X}", u32::from(c));
        }
    }

    #[test]
    fn controls_become_spaces_and_visible_text_stays() {
        assert_eq!(clean("a\nb\tc\u{85}d"), "a b c d");
        assert_eq!(clean("发票 2026-77 «x»"), "发票 2026-77 «x»");
        assert_eq!(clean("Müller"), "Müller");
    }

    #[test]
    fn blank_text_is_refused() {
        for blank in [
            "",
            " ",
            "\u{3164}",
            "\u{2800}",
            "\u{200B}\u{200C}",
            "\u{E0041}\u{E0042}",
            "\u{00AD}",
            "\u{2800} \u{3164}",
            "\u{2028}",
        ] {
            assert_eq!(clean_required(blank), Err(TextError::Blank), "{blank:?}");
        }
        assert_eq!(clean_required("\u{200B}x").as_deref(), Ok("x"));
    }
}
