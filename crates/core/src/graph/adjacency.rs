//! Adjacency lists of the graph: a twin's outgoing relationships and the references to its
//! incoming ones. Most twins have a handful, so each list is a sorted vector behind an `Arc`,
//! copied when a snapshot that shares it changes (ADT caps outgoing lists at 5,000). A B-tree
//! map per twin would spend a 64-slot node on each, ten times the memory of the list itself.

use std::sync::Arc;

use super::types::{Id, Relationship};

/// Outgoing relationships of one twin, sorted by relationship ID.
#[derive(Debug, Clone, Default)]
pub(crate) struct Outgoing(Arc<Vec<Arc<Relationship>>>);

impl Outgoing {
    fn position(&self, id: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|r| r.id.as_ref().cmp(id))
    }

    pub fn get(&self, id: &str) -> Option<&Arc<Relationship>> {
        self.position(id).ok().map(|i| &self.0[i])
    }

    /// Inserts or replaces the relationship with `rel.id`; returns the one replaced.
    pub fn insert(&mut self, rel: Arc<Relationship>) -> Option<Arc<Relationship>> {
        match self.position(&rel.id) {
            Ok(i) => Some(std::mem::replace(&mut Arc::make_mut(&mut self.0)[i], rel)),
            Err(i) => {
                Arc::make_mut(&mut self.0).insert(i, rel);
                None
            }
        }
    }

    pub fn remove(&mut self, id: &str) -> Option<Arc<Relationship>> {
        let i = self.position(id).ok()?;
        Some(Arc::make_mut(&mut self.0).remove(i))
    }

    pub fn values(&self) -> impl Iterator<Item = &Arc<Relationship>> + '_ {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// References `(source, relationship id)` to the relationships that target one twin, sorted.
#[derive(Debug, Clone, Default)]
pub(crate) struct Incoming(Arc<Vec<(Id, Id)>>);

impl Incoming {
    pub fn insert(&mut self, key: (Id, Id)) {
        if let Err(i) = self.0.binary_search(&key) {
            Arc::make_mut(&mut self.0).insert(i, key);
        }
    }

    pub fn remove(&mut self, key: &(Id, Id)) {
        if let Ok(i) = self.0.binary_search(key) {
            Arc::make_mut(&mut self.0).remove(i);
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &(Id, Id)> + '_ {
        self.0.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Map, Value, json};

    use super::*;

    fn rel(id: &str, target: &str) -> Arc<Relationship> {
        let doc: Map<String, Value> = serde_json::from_value(json!({
            "$relationshipId": id, "$sourceId": "s", "$targetId": target,
            "$relationshipName": "r", "$etag": "W/\"1\""
        }))
        .unwrap();
        Arc::new(Relationship::from_doc(&doc, None, None).unwrap())
    }

    #[test]
    fn outgoing_lists_stay_sorted_replace_by_id_and_do_not_leak_into_shared_snapshots() {
        let mut list = Outgoing::default();
        for id in ["c", "a", "b"] {
            assert!(list.insert(rel(id, "t1")).is_none());
        }
        let snapshot = list.clone();
        let replaced = list.insert(rel("b", "t2")).unwrap();
        assert_eq!(replaced.target.as_ref(), "t1");
        assert_eq!(list.remove("a").unwrap().id.as_ref(), "a");
        assert!(list.remove("a").is_none());
        let ids: Vec<&str> = list.values().map(|r| r.id.as_ref()).collect();
        assert_eq!(ids, ["b", "c"]);
        assert_eq!(list.get("b").unwrap().target.as_ref(), "t2");
        // The earlier snapshot still sees the list as it was.
        let before: Vec<&str> = snapshot.values().map(|r| r.id.as_ref()).collect();
        assert_eq!(before, ["a", "b", "c"]);
        assert_eq!(snapshot.get("b").unwrap().target.as_ref(), "t1");
    }

    #[test]
    fn incoming_references_are_a_sorted_set() {
        let mut refs = Incoming::default();
        let key = |s: &str, i: &str| (Id::from(s), Id::from(i));
        refs.insert(key("s2", "x"));
        refs.insert(key("s1", "y"));
        refs.insert(key("s2", "x"));
        assert_eq!(refs.iter().count(), 2);
        refs.remove(&key("s1", "y"));
        assert_eq!(refs.iter().next(), Some(&key("s2", "x")));
        refs.remove(&key("s2", "x"));
        assert!(refs.is_empty());
    }
}
