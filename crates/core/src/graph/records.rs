//! Encoding of graph records for the store, and the in-memory index updates that go with them.
//! Every change to a [`Graph`] goes through here, so the snapshot and the store never disagree on
//! what a record looks like.

use std::sync::Arc;

use serde_json::json;

use super::Graph;
use super::types::{EventRoute, ModelEntry, Relationship, Twin};
use crate::dtmi::Dtmi;
use crate::store::{Mutation, Table};

const KEY_SEPARATOR: char = '\u{1f}';

pub(crate) fn relationship_key(source: &str, id: &str) -> String {
    format!("{source}{KEY_SEPARATOR}{id}")
}

/// The source and relationship ID of a [`relationship_key`].
pub(crate) fn split_relationship_key(key: &str) -> Option<(&str, &str)> {
    key.split_once(KEY_SEPARATOR)
}

fn to_bytes(value: &impl serde::Serialize) -> Vec<u8> {
    // Serialising a serde_json Map or Value cannot fail: keys are strings and there are no
    // non-finite floats in a Value.
    serde_json::to_vec(value).unwrap_or_default()
}

impl Graph {
    pub(crate) fn put_model(&mut self, entry: Arc<ModelEntry>, muts: &mut Vec<Mutation>) {
        let record = json!({
            "definition": entry.definition,
            "uploadTime": entry.upload_time,
            "decommissioned": entry.decommissioned,
        });
        muts.push(Mutation::put(
            Table::Models,
            entry.id.as_str(),
            to_bytes(&record),
        ));
        self.models.insert(entry.id.clone(), entry);
    }

    pub(crate) fn remove_model(&mut self, id: &Dtmi, muts: &mut Vec<Mutation>) {
        muts.push(Mutation::delete(Table::Models, id.as_str()));
        self.models.remove(id);
    }

    pub(crate) fn put_twin(&mut self, twin: Arc<Twin>, muts: &mut Vec<Mutation>) {
        muts.push(Mutation::put(
            Table::Twins,
            twin.id.as_ref(),
            twin.json().get().as_bytes().to_vec(),
        ));
        self.insert_twin(twin);
    }

    pub(crate) fn insert_twin(&mut self, twin: Arc<Twin>) {
        self.twins.insert(twin.id.clone(), twin);
    }

    pub(crate) fn remove_twin(&mut self, id: &str, muts: &mut Vec<Mutation>) {
        muts.push(Mutation::delete(Table::Twins, id));
        self.twins.remove(id);
        self.outgoing.remove(id);
        self.incoming.remove(id);
    }

    pub(crate) fn put_relationship(&mut self, rel: Arc<Relationship>, muts: &mut Vec<Mutation>) {
        muts.push(Mutation::put(
            Table::Relationships,
            relationship_key(&rel.source, &rel.id),
            rel.json().get().as_bytes().to_vec(),
        ));
        self.insert_relationship(rel);
    }

    pub(crate) fn insert_relationship(&mut self, rel: Arc<Relationship>) {
        let previous = self
            .outgoing
            .entry(rel.source.clone())
            .or_default()
            .insert(rel.clone());
        match previous {
            Some(old) if old.target != rel.target => {
                self.unlink_incoming(&old);
            }
            Some(_) => {}
            None => self.relationship_count += 1,
        }
        self.incoming
            .entry(rel.target.clone())
            .or_default()
            .insert((rel.source.clone(), rel.id.clone()));
    }

    pub(crate) fn remove_relationship(&mut self, source: &str, id: &str, muts: &mut Vec<Mutation>) {
        muts.push(Mutation::delete(
            Table::Relationships,
            relationship_key(source, id),
        ));
        let Some(map) = self.outgoing.get_mut(source) else {
            return;
        };
        if let Some(old) = map.remove(id) {
            if map.is_empty() {
                self.outgoing.remove(source);
            }
            self.relationship_count -= 1;
            self.unlink_incoming(&old);
        }
    }

    fn unlink_incoming(&mut self, rel: &Relationship) {
        if let Some(set) = self.incoming.get_mut(&rel.target) {
            set.remove(&(rel.source.clone(), rel.id.clone()));
            if set.is_empty() {
                self.incoming.remove(&rel.target);
            }
        }
    }

    pub(crate) fn put_route(&mut self, route: Arc<EventRoute>, muts: &mut Vec<Mutation>) {
        let record = json!({"endpointName": route.endpoint_name, "filter": route.filter});
        muts.push(Mutation::put(
            Table::EventRoutes,
            route.id.as_str(),
            to_bytes(&record),
        ));
        self.routes.insert(route.id.clone(), route);
    }

    pub(crate) fn remove_route(&mut self, id: &str, muts: &mut Vec<Mutation>) {
        muts.push(Mutation::delete(Table::EventRoutes, id));
        self.routes.remove(id);
    }
}
