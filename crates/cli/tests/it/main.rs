//! Tests of the `twinguard` binary as an operator runs it.

// Test helpers outside `#[test]` functions fail loudly on broken fixtures by design.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

mod admin;
mod audit;
mod backup;
mod crash;
mod demo;
mod kek;
mod ownpg;
mod partition;
mod postgres;
mod power_cut;
mod process;
mod resources;
mod sites;
