//! twinguard's tamper-evident audit trail.
//!
//! - [`merkle`]: RFC 9162 tree hashing, inclusion and consistency proofs.
//! - [`note`]: Ed25519 signed checkpoints in the C2SP `signed-note` and `tlog-checkpoint` formats.
//! - [`log`]: the append-only log on disk with group commit and periodic checkpoints.
//! - [`verify`]: the offline verifier behind `twinguard audit verify`.

pub mod log;
pub mod merkle;
pub mod note;
pub mod verify;
