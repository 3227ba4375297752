//! Integration tests of the HTTPS API against a real server on port 0, in one test binary.

// Test helpers outside `#[test]` functions fail loudly on broken fixtures by design.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

mod api;
mod attacks;
mod audit;
mod auth;
mod ca;
mod connections;
mod consistency;
mod device_keys;
mod events;
mod identity;
mod jobs;
mod kit;
mod mqtt;
mod outputs;
