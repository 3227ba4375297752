//! Integration tests of twinguard-telemetry, in one test binary.

// Test helpers outside `#[test]` functions fail loudly on broken fixtures by design.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

mod attacks;
mod dropped;
mod history_pages;
mod keys;
mod nodes;
mod pipeline;
mod poisoning;
mod wycheproof_ed25519;
