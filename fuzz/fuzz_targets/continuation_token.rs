#![no_main]
//! The query continuation token decoder on arbitrary text; a token that decodes round-trips
//! through `continuation_token` to the same query text and offset.

use libfuzzer_sys::fuzz_target;
use twinguard_core::query::{continuation_token, decode_continuation};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok((query, offset)) = decode_continuation(text)
    {
        let again = decode_continuation(&continuation_token(&query, offset));
        assert_eq!(again.ok(), Some((query, offset)));
    }
});
