//! twinguard's domain, free of HTTP and of any storage engine.
//!
//! - [`dtdl`]: DTDL v2/v3 parsing and validation.
//! - [`graph`]: the twin graph and the rules for changing it.
//! - [`query`]: the ADT query language.

pub mod dtdl;
pub mod dtmi;
pub mod graph;
pub mod query;
