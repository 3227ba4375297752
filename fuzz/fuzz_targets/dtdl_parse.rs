#![no_main]
//! The DTDL parser on arbitrary JSON documents, strict and permissive.

use libfuzzer_sys::fuzz_target;
use twinguard_core::dtdl::{self, ParseOptions};

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    let docs = match value {
        serde_json::Value::Array(items) => items,
        other => vec![other],
    };
    for strict in [true, false] {
        let options = ParseOptions { disallow_undefined_extensions: strict };
        let _ = dtdl::parse(&docs, &|_| None, &options);
    }
});
