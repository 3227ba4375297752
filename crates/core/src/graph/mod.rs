//! The twin graph: models, twins, relationships and event routes, and the rules for changing them.

mod snapshot;
mod types;

pub use snapshot::Graph;
pub use types::{EventRoute, Id, ModelEntry, Relationship, Twin};
