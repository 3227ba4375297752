//! Trusted telemetry: what a device sends, how twinguard decides whether to believe it, and what
//! the twin shows when it cannot.
//!
//! A reading reaches the twin only after each of these steps, in this order:
//! 1. [`envelope`]: the message is a COSE_Sign1 or JWS envelope signed with Ed25519 by a
//!    registered, active device (DI-1, DI-3).
//! 2. [`replay`]: its sequence number is new to the device's sliding window and its timestamp is
//!    within the acceptance window (DI-2).
//! 3. firmware attestation: the digest the device reports is on its model's allowlist (DI-4).
//! 4. validation: the value fits the DTDL schema, then the property's [`policy`] (limits, rate of
//!    change, staleness), then the stream's [`anomaly`] detector (DI-5, DI-6).
//! 5. [`fusion`]: a property fed by a sensor group takes the median or majority of its members,
//!    and a member that disagrees is marked suspect (DI-7).
//!
//! A reading with a valid signature that fails a later step is kept in quarantine with its reason
//! codes; nothing a device sent with a valid signature is dropped. Properties carry a quality in
//! `$metadata`, and a stale stream or a group without quorum falls back to a [`forecast`] marked
//! estimated (DI-8).

pub mod anomaly;
pub mod envelope;
pub mod forecast;
pub mod fusion;
pub mod history;
pub mod history_page;
pub mod ingest;
pub mod manage;
pub mod nab;
pub mod policy;
pub mod records;
pub mod registry;
pub mod replay;
pub mod service;
mod writes;

pub use ingest::{Outcome, Transport, Verdict};
pub use service::Telemetry;
