//! An immutable, cheaply cloned view of the whole graph. Writers build the next snapshot from the
//! current one; readers (GETs and queries) hold one snapshot for their whole run, so a query never
//! sees half of a write.

use std::sync::Arc;

use imbl::OrdMap;
use imbl::shared_ptr::DefaultSharedPtr;

use super::adjacency::{Incoming, Outgoing};
use super::order::OrderHasher;

/// The graph's hash maps: hashed under the instance's order key, so that every node iterates
/// alike (`order`).
pub(crate) type HashMap<K, V> = imbl::GenericHashMap<K, V, OrderHasher, DefaultSharedPtr>;

use super::types::{EventRoute, Id, ModelEntry, Relationship, Twin};
use crate::dtmi::Dtmi;

#[derive(Debug, Clone, Default)]
pub struct Graph {
    pub(crate) models: HashMap<Dtmi, Arc<ModelEntry>>,
    pub(crate) twins: HashMap<Id, Arc<Twin>>,
    /// source -> its relationships, by relationship id
    pub(crate) outgoing: HashMap<Id, Outgoing>,
    /// target -> (source, relationship id) of the relationships that point at it
    pub(crate) incoming: HashMap<Id, Incoming>,
    pub(crate) routes: OrdMap<String, Arc<EventRoute>>,
    pub(crate) relationship_count: usize,
}

impl Graph {
    pub fn twin(&self, id: &str) -> Option<&Arc<Twin>> {
        self.twins.get(id)
    }

    /// Every twin, in the instance's order (`order`).
    pub fn twins(&self) -> impl Iterator<Item = &Arc<Twin>> + '_ {
        self.twins.values()
    }

    pub fn twin_count(&self) -> usize {
        self.twins.len()
    }

    pub fn relationship_count(&self) -> usize {
        self.relationship_count
    }

    pub fn relationship(&self, source: &str, id: &str) -> Option<&Arc<Relationship>> {
        self.outgoing.get(source)?.get(id)
    }

    /// Relationships whose source is `source`, ordered by relationship ID.
    pub fn outgoing(&self, source: &str) -> impl Iterator<Item = &Arc<Relationship>> + '_ {
        self.outgoing
            .get(source)
            .into_iter()
            .flat_map(|m| m.values())
    }

    pub fn outgoing_count(&self, source: &str) -> usize {
        self.outgoing.get(source).map_or(0, |m| m.len())
    }

    /// Relationships whose target is `target`, ordered by (source, relationship ID).
    pub fn incoming(&self, target: &str) -> impl Iterator<Item = &Arc<Relationship>> + '_ {
        self.incoming
            .get(target)
            .into_iter()
            .flat_map(|set| set.iter())
            .filter_map(|(source, id)| self.relationship(source, id))
    }

    /// Every relationship, in no particular order.
    pub fn relationships(&self) -> impl Iterator<Item = &Arc<Relationship>> + '_ {
        self.outgoing.values().flat_map(|m| m.values())
    }

    pub fn model(&self, id: &Dtmi) -> Option<&Arc<ModelEntry>> {
        self.models.get(id)
    }

    pub fn models(&self) -> impl Iterator<Item = &Arc<ModelEntry>> + '_ {
        self.models.values()
    }

    /// `IS_OF_MODEL` semantics: the twin's model is `model`, or (unless `exact`) extends it.
    pub fn is_of_model(&self, twin: &Twin, model: &Dtmi, exact: bool) -> bool {
        if &twin.model == model {
            return true;
        }
        !exact
            && self
                .models
                .get(&twin.model)
                .is_some_and(|m| m.interface.is_a(model))
    }

    pub fn route(&self, id: &str) -> Option<&Arc<EventRoute>> {
        self.routes.get(id)
    }

    pub fn routes(&self) -> impl Iterator<Item = &Arc<EventRoute>> + '_ {
        self.routes.values()
    }
}
