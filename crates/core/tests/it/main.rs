//! Integration tests of twinguard-core, in one test binary.

// Test helpers outside `#[test]` functions fail loudly on broken fixtures by design.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

mod door;
mod dtdl_conformance;
mod dtdl_cost;
mod feed;
mod hidden_absent;
mod nodes;
mod query_cost;
mod robustness;
mod scopes;
mod service;
mod store_contract;
