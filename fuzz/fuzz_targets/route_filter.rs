#![no_main]
//! The event route filter checker on arbitrary text.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = twinguard_core::routes::check_filter(text);
    }
});
