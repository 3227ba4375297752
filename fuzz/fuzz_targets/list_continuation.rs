#![no_main]
//! The list continuation token (models, relationships, event routes) on arbitrary text: a token
//! that parses has a size a list could produce and round-trips to the same position.

use libfuzzer_sys::fuzz_target;
use twinguard_core::paging::{ListPosition, MAX_PAGE_SIZE};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(position) = ListPosition::parse(text) {
        assert!((1..=MAX_PAGE_SIZE).contains(&position.size()));
        assert_eq!(ListPosition::parse(&position.token()), Some(position));
    }
});
