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
}
