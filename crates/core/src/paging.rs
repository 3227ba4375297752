//! Where a list page starts: the continuation token of the list endpoints (models,
//! relationships, event routes). The token is URL-safe base64 of `o:<offset>:n:<size>`; the size
//! travels in it because clients send `max-items-per-page` only with the first request.
//!
//! The token is not secret and not signed: a client may write any offset or size it likes, so
//! [`ListPosition::parse`] only accepts what a list could have produced (a size from 1 to
//! [`MAX_PAGE_SIZE`]) and the lister clamps the offset to the list.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Most items in one list page.
pub const MAX_PAGE_SIZE: usize = 1_000;

/// Longest token accepted: `o:` and `:n:` around two `usize` values, base64 encoded, with room.
const MAX_TOKEN: usize = 64;

/// A list page's first item and size, as a continuation token carries them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListPosition {
    offset: usize,
    size: usize,
}

impl ListPosition {
    /// The page of `size` items (1 to [`MAX_PAGE_SIZE`]) after `offset` items; `None` for a size
    /// out of range.
    #[must_use]
    pub fn new(offset: usize, size: usize) -> Option<Self> {
        (1..=MAX_PAGE_SIZE)
            .contains(&size)
            .then_some(Self { offset, size })
    }

    /// Parses a continuation token from [`ListPosition::token`]; `None` for anything else.
    #[must_use]
    pub fn parse(token: &str) -> Option<Self> {
        if token.len() > MAX_TOKEN {
            return None;
        }
        let bytes = URL_SAFE_NO_PAD.decode(token).ok()?;
        let text = std::str::from_utf8(&bytes).ok()?;
        let mut parts = text.split(':');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some("o"), Some(offset), Some("n"), Some(size), None) => {
                Self::new(offset.parse().ok()?, size.parse().ok()?)
            }
            _ => None,
        }
    }

    /// The page of the same size after `offset` items.
    #[must_use]
    pub fn at(self, offset: usize) -> Self {
        Self { offset, ..self }
    }

    /// The continuation token for this position.
    #[must_use]
    pub fn token(&self) -> String {
        URL_SAFE_NO_PAD.encode(format!("o:{}:n:{}", self.offset, self.size))
    }

    /// Items to skip.
    #[must_use]
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Items in the page.
    #[must_use]
    pub fn size(&self) -> usize {
        self.size
    }
}

/// Longest key a [`KeyPosition`] carries.
pub const MAX_KEY: usize = 128;

/// Where a keyed list page starts: after the key of the last item of the page before, with the
/// page size. For lists whose items leave as others arrive (the quarantine: a reviewed reading
/// leaves the pending list), where an offset would skip items. The token is URL-safe base64 of
/// `k:<key>:n:<size>`; [`KeyPosition::parse`] accepts only keys a list could have produced
/// (1 to [`MAX_KEY`] ASCII letters, digits, `-`, `_` and `.`) and sizes from 1 to
/// [`MAX_PAGE_SIZE`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPosition {
    after: String,
    size: usize,
}

fn is_key(key: &str) -> bool {
    (1..=MAX_KEY).contains(&key.len())
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl KeyPosition {
    /// The page of `size` items after `after`; `None` for a key or size out of range.
    #[must_use]
    pub fn new(after: &str, size: usize) -> Option<Self> {
        ((1..=MAX_PAGE_SIZE).contains(&size) && is_key(after)).then(|| Self {
            after: after.to_owned(),
            size,
        })
    }

    /// Parses a continuation token from [`KeyPosition::token`]; `None` for anything else.
    #[must_use]
    pub fn parse(token: &str) -> Option<Self> {
        if token.len() > 2 * MAX_KEY {
            return None;
        }
        let bytes = URL_SAFE_NO_PAD.decode(token).ok()?;
        let text = std::str::from_utf8(&bytes).ok()?;
        let mut parts = text.split(':');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some("k"), Some(after), Some("n"), Some(size), None) => {
                Self::new(after, size.parse().ok()?)
            }
            _ => None,
        }
    }

    /// The continuation token for this position.
    #[must_use]
    pub fn token(&self) -> String {
        URL_SAFE_NO_PAD.encode(format!("k:{}:n:{}", self.after, self.size))
    }

    /// The key after which the page starts.
    #[must_use]
    pub fn after(&self) -> &str {
        &self.after
    }

    /// Items in the page.
    #[must_use]
    pub fn size(&self) -> usize {
        self.size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_round_trips_to_the_same_position() {
        for (offset, size) in [(0, 1), (100, 100), (usize::MAX, MAX_PAGE_SIZE)] {
            let position = ListPosition::new(offset, size);
            assert!(position.is_some());
            let parsed = position.and_then(|p| ListPosition::parse(&p.token()));
            assert_eq!(parsed, position);
        }
    }

    #[test]
    fn tokens_a_list_could_not_have_produced_are_refused() {
        let encode = |s: &str| URL_SAFE_NO_PAD.encode(s);
        for token in [
            String::new(),
            "not base64!".to_owned(),
            encode("o:1:n:0"),
            encode("o:1:n:1001"),
            encode("o:-1:n:10"),
            encode("o:1:n:10:x"),
            encode("n:10:o:1"),
            encode("o:99999999999999999999999:n:10"),
            URL_SAFE_NO_PAD.encode([0xff, 0xfe]),
            "A".repeat(MAX_TOKEN + 1),
        ] {
            assert_eq!(ListPosition::parse(&token), None, "{token}");
        }
    }

    #[test]
    fn a_key_token_round_trips_and_refuses_what_a_list_could_not_have_produced() {
        let position = KeyPosition::new("0000000000000001-000000000001-abc", 10);
        assert!(position.is_some());
        let parsed = position
            .as_ref()
            .and_then(|p| KeyPosition::parse(&p.token()));
        assert_eq!(parsed, position);
        let encode = |s: &str| URL_SAFE_NO_PAD.encode(s);
        for token in [
            String::new(),
            encode("k::n:10"),
            encode("k:a:n:0"),
            encode("k:a:n:1001"),
            encode("k:a/b:n:10"),
            encode("k:a\u{0}:n:10"),
            encode(&format!("k:{}:n:10", "a".repeat(MAX_KEY + 1))),
            encode("k:a:n:10:x"),
            encode("o:1:n:10"),
            "A".repeat(2 * MAX_KEY + 1),
        ] {
            assert_eq!(KeyPosition::parse(&token), None, "{token}");
        }
    }
}
