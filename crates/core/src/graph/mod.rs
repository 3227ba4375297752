//! The twin graph: models, twins, relationships and event routes, and the rules for changing them.

mod adjacency;
pub mod ops;
pub mod order;
pub mod readings;
pub(crate) mod records;
mod snapshot;
mod types;
pub mod validate;

pub use ops::{Precondition, WriteOp, WriteOutcome};
pub use readings::{PropertyUpdate, Quality, Skipped};
pub use snapshot::Graph;
pub use types::{EventRoute, Id, ModelEntry, Relationship, Twin};
