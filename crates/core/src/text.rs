//! Text a client chooses that later reaches a person or a log: which characters must never pass
//! unescaped, and the one grammar of identifiers (twin, relationship and event route IDs).
//!
//! The grammar, as documented in `docs/adt-compatibility.md`:
//!
//! - no control character (Unicode category Cc, NEL U+0085 included), no format character (Cf:
//!   zero-width space and joiners, bidi embeddings, overrides and isolates, BOM, soft hyphen),
//!   no line or paragraph separator (Zl, Zp), no private-use (Co) or unassigned (Cn) code point;
//! - no whitespace at either end;
//! - letters from at most one of the Latin, Greek and Cyrillic scripts, whose look-alikes
//!   (Latin `a` and Cyrillic `а`) would let one ID pass for another. Any other script, alone or
//!   mixed (Japanese mixes Han, Hiragana and Katakana; `room-会議室` mixes Latin and Han), stays
//!   valid, as ADT accepts arbitrary Unicode IDs.

use unicode_general_category::{GeneralCategory, get_general_category};
use unicode_script::{Script, UnicodeScript};

/// A character that can split a log record or hide or reorder what a person reads: controls
/// (Cc, with NEL), format characters (Cf, with every bidi control), line and paragraph
/// separators (Zl, Zp).
pub fn is_invisible_or_breaking(c: char) -> bool {
    matches!(
        get_general_category(c),
        GeneralCategory::Control
            | GeneralCategory::Format
            | GeneralCategory::LineSeparator
            | GeneralCategory::ParagraphSeparator
    )
}

/// Why a string is not an identifier; the message names the rule, never the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdentifierError {
    /// A control, format, separator, private-use or unassigned character.
    Character,
    /// Whitespace at the start or the end.
    EdgeWhitespace,
    /// Letters of more than one of Latin, Greek and Cyrillic.
    MixedScripts,
}

impl std::fmt::Display for IdentifierError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Character => {
                "contains a control, format, separator, private-use or unassigned character"
            }
            Self::EdgeWhitespace => "starts or ends with whitespace",
            Self::MixedScripts => "mixes letters of the Latin, Greek and Cyrillic scripts",
        })
    }
}

/// Checks the identifier grammar of this module; lengths and reserved prefixes are the caller's.
pub fn check_identifier(id: &str) -> Result<(), IdentifierError> {
    if id.chars().any(|c| {
        is_invisible_or_breaking(c)
            || matches!(
                get_general_category(c),
                GeneralCategory::PrivateUse
                    | GeneralCategory::Unassigned
                    | GeneralCategory::Surrogate
            )
    }) {
        return Err(IdentifierError::Character);
    }
    if id.starts_with(char::is_whitespace) || id.ends_with(char::is_whitespace) {
        return Err(IdentifierError::EdgeWhitespace);
    }
    let mut alphabet = None;
    for script in id.chars().map(|c| c.script()) {
        if matches!(script, Script::Latin | Script::Greek | Script::Cyrillic) {
            match alphabet {
                None => alphabet = Some(script),
                Some(seen) if seen != script => return Err(IdentifierError::MixedScripts),
                Some(_) => {}
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_identifiers_of_any_single_script_are_valid() {
        for id in [
            "room-1",
            "Room_1.a:b",
            "комната-1",
            "δωμάτιο",
            "会議室-3",
            "room-会議室",
            "会議室かいぎしつカイギシツ",
            "غرفة-1",
            "café",
            "a b",
            "dtmi:com:example:Room;1",
        ] {
            assert_eq!(check_identifier(id), Ok(()), "{id}");
        }
    }

    #[test]
    fn hidden_reordering_and_line_breaking_characters_are_refused() {
        for c in [
            '\u{0}',
            '\n',
            '\r',
            '\u{7f}',
            '\u{85}',
            '\u{ad}',
            '\u{200b}',
            '\u{200d}',
            '\u{200e}',
            '\u{202a}',
            '\u{202e}',
            '\u{2066}',
            '\u{2069}',
            '\u{2028}',
            '\u{2029}',
            '\u{feff}',
            '\u{e000}',
            '\u{f8ff}',
            '\u{e0001}',
            '\u{10ffff}',
        ] {
            assert_eq!(
                check_identifier(&format!("room{c}1")),
                Err(IdentifierError::Character),
                "U+{:04X}",
                c as u32
            );
        }
    }

    #[test]
    fn edge_whitespace_and_latin_mixed_with_cyrillic_or_greek_are_refused() {
        for id in [" room", "room ", "\u{3000}room", "room\u{a0}"] {
            assert_eq!(check_identifier(id), Err(IdentifierError::EdgeWhitespace));
        }
        // Cyrillic 'а' and 'о', Greek 'ο' inside Latin words.
        for id in ["p\u{430}ypal", "r\u{43e}om-1", "r\u{3bf}om", "комнатa"] {
            assert_eq!(
                check_identifier(id),
                Err(IdentifierError::MixedScripts),
                "{id}"
            );
        }
    }
}
