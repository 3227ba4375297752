//! The change feed: every change to the graph and every telemetry message, numbered and stored
//! in the same commit as the change itself.
//!
//! Each operation the writer applies reports what it changed ([`Change`]); when the group
//! commits, the writer numbers the changes with a gap-free sequence that starts at 1 and never
//! repeats, gives each one the next number of its twin's own sequence, and stores them in
//! [`Table::Events`] beside the change. A crash between the commit and the delivery of an event
//! therefore loses nothing: the feed is read again from the last position delivered. Numbers
//! are handed out only when a commit succeeds, so a failed group leaves no gap.
//!
//! The feed holds ADT's event types and payloads (see `docs/events.md`); the server turns a
//! record into a CloudEvent, adds `source` and signs it when it delivers.

use std::collections::{HashMap, VecDeque};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::store::{Mutation, Table};

/// A twin was created (data: the twin as `GET` returns it).
pub const TWIN_CREATE: &str = "Microsoft.DigitalTwins.Twin.Create";
/// A twin's properties or metadata changed (data: `{"modelId", "patch"}`).
pub const TWIN_UPDATE: &str = "Microsoft.DigitalTwins.Twin.Update";
/// A twin was deleted (data: the twin as it was).
pub const TWIN_DELETE: &str = "Microsoft.DigitalTwins.Twin.Delete";
/// A relationship was created (data: the relationship as `GET` returns it).
pub const RELATIONSHIP_CREATE: &str = "Microsoft.DigitalTwins.Relationship.Create";
/// A relationship's properties changed (data: `{"modelId", "patch"}`, the source's model).
pub const RELATIONSHIP_UPDATE: &str = "Microsoft.DigitalTwins.Relationship.Update";
/// A relationship was deleted (data: the relationship as it was).
pub const RELATIONSHIP_DELETE: &str = "Microsoft.DigitalTwins.Relationship.Delete";
/// A telemetry message sent to a twin (data: the message body).
pub const TELEMETRY: &str = "microsoft.iot.telemetry";

/// Meta keys of the feed's position.
const NEXT_KEY: &str = "feed.next";
const FIRST_KEY: &str = "feed.first";

/// Feed records one trim deletes at most; a larger trim takes several commits.
pub const MAX_TRIM: u64 = 10_000;

/// Telemetry message IDs remembered for de-duplication, per instance.
const MAX_MESSAGE_IDS: usize = 100_000;
/// How long a telemetry message ID is remembered.
const MESSAGE_ID_SECONDS: i64 = 3_600;
/// Remembered message IDs one group forgets at most (twice the IDs a group can add, so the
/// memory stays bounded): after a restart that finds many expired, the deletes are spread over
/// several commits rather than one large one.
const MAX_FORGET: usize = 8_192;

/// A change one operation made, before the writer numbers it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Change {
    pub event_type: &'static str,
    /// The twin whose sequence orders this change: the twin itself, or a relationship's source.
    pub twin: String,
    /// `twin`, or `twin/relationships/id`.
    pub subject: String,
    pub data: Value,
    /// The model the data conforms to (telemetry: the twin's or the component's model).
    pub dataschema: Option<String>,
    /// The component a telemetry message was sent to.
    pub component: Option<String>,
    /// A telemetry message's `Telemetry-Source-Time`.
    pub source_time: Option<String>,
}

/// One record of the feed, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FeedEvent {
    /// Position in the feed: 1, 2, 3... with no gaps.
    pub seq: u64,
    /// The event's ID (a UUID), the same in every delivery of it.
    pub id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub subject: String,
    /// The twin whose sequence orders this event.
    pub twin: String,
    /// Position among the events of `twin`: 1, 2, 3... with no gaps, surviving the twin's
    /// deletion (a twin created again under the same ID continues its sequence).
    pub twin_seq: u64,
    /// RFC 3339 time of the commit.
    pub time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataschema: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub component: Option<String>,
    /// A telemetry message's `Telemetry-Source-Time`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_time: Option<String>,
    pub data: Value,
}

/// The position of the last feed record committed, as `store` holds it now (0 before the
/// first): on a store several writers share, possibly ahead of a node's own snapshot.
pub fn stored_head(store: &dyn crate::store::Store) -> Result<u64, crate::store::StoreError> {
    let next = store
        .get_many(Table::Meta, &[NEXT_KEY.to_owned()])?
        .pop()
        .flatten()
        .and_then(|v| std::str::from_utf8(&v).ok()?.parse::<u64>().ok())
        .unwrap_or(1);
    Ok(next.saturating_sub(1))
}

/// The store key of feed position `seq`: fixed width, so that key order is number order.
pub fn key(seq: u64) -> String {
    format!("{seq:020}")
}

/// The writer's position in the feed and what it has numbered so far.
#[derive(Debug, Default)]
pub(crate) struct FeedState {
    /// The number the next event gets.
    pub next: u64,
    /// The oldest number still stored.
    pub first: u64,
    /// Each twin's last number.
    twin_seqs: HashMap<String, u64>,
    /// A trim applied in the group being built, published if the group commits.
    pending_first: Option<u64>,
    /// Telemetry message IDs seen recently: `(twin, id)` with the Unix time seen.
    recent: HashMap<(String, String), i64>,
    recent_order: VecDeque<((String, String), i64)>,
    /// Message IDs of the group being built.
    pending_ids: Vec<(String, String)>,
    /// The same, for look-ups.
    pending_set: std::collections::HashSet<(String, String)>,
    /// How many of the oldest remembered IDs the group being built forgets (and deletes).
    pending_evict: usize,
}

impl FeedState {
    /// Reads the feed's position and every twin's sequence from their stored records.
    pub fn from_records(meta: &[(String, Vec<u8>)], twins: Vec<(String, Vec<u8>)>) -> Option<Self> {
        let number = |k: &str| -> Option<Option<u64>> {
            match meta.iter().find(|(key, _)| key == k) {
                None => Some(None),
                Some((_, v)) => std::str::from_utf8(v).ok()?.parse().ok().map(Some),
            }
        };
        let next = number(NEXT_KEY)?.unwrap_or(1).max(1);
        let first = number(FIRST_KEY)?.unwrap_or(1).clamp(1, next);
        let mut twin_seqs = HashMap::with_capacity(twins.len());
        for (twin, v) in twins {
            twin_seqs.insert(twin, std::str::from_utf8(&v).ok()?.parse().ok()?);
        }
        Some(Self {
            next,
            first,
            twin_seqs,
            ..Self::default()
        })
    }

    /// Adds the telemetry message IDs remembered in the store (`Table::MessageIds`), so that
    /// de-duplication holds across a restart. `None` when a record is unreadable.
    pub fn with_message_ids(mut self, records: Vec<(String, Vec<u8>)>) -> Option<Self> {
        let mut remembered = Vec::with_capacity(records.len());
        for (key, value) in records {
            let pair = split_message_id_key(&key)?;
            let seen: i64 = std::str::from_utf8(&value).ok()?.parse().ok()?;
            remembered.push((pair, seen));
        }
        remembered.sort_by_key(|(_, seen)| *seen);
        for (pair, seen) in remembered {
            self.recent.insert(pair.clone(), seen);
            self.recent_order.push_back((pair, seen));
        }
        Some(self)
    }

    /// Brings the state up to the store's after other writers committed (between groups):
    /// `meta`, the feed's position records as they stand; `twins`, each changed twin's last
    /// number (`None`: the record is gone); `ids`, each changed message ID record. `None`,
    /// with nothing changed, when a record is unreadable.
    pub fn refresh(
        &mut self,
        meta: &[(String, Vec<u8>)],
        twins: Vec<crate::service::Changed>,
        ids: Vec<crate::service::Changed>,
    ) -> Option<()> {
        let number = |v: &[u8]| -> Option<u64> { std::str::from_utf8(v).ok()?.parse().ok() };
        let position = Self::from_records(meta, Vec::new())?;
        let twins = twins
            .into_iter()
            .map(|(twin, v)| match v {
                Some(v) => number(&v).map(|seq| (twin, Some(seq))),
                None => Some((twin, None)),
            })
            .collect::<Option<Vec<_>>>()?;
        let ids = ids
            .into_iter()
            .map(|(key, v)| {
                let pair = split_message_id_key(&key)?;
                match v {
                    Some(v) => {
                        let seen: i64 = std::str::from_utf8(&v).ok()?.parse().ok()?;
                        Some((pair, Some(seen)))
                    }
                    None => Some((pair, None)),
                }
            })
            .collect::<Option<Vec<_>>>()?;
        self.next = position.next;
        self.first = position.first;
        for (twin, seq) in twins {
            match seq {
                Some(seq) => self.twin_seqs.insert(twin, seq),
                None => self.twin_seqs.remove(&twin),
            };
        }
        // An ID another writer remembered joins the order at the back (a little later than its
        // time: it is forgotten a little later); one it forgot leaves the map, and its place in
        // the order is skipped when reached.
        for (pair, seen) in ids {
            match seen {
                Some(seen) => {
                    self.recent.insert(pair.clone(), seen);
                    self.recent_order.push_back((pair, seen));
                }
                None => {
                    self.recent.remove(&pair);
                }
            }
        }
        Some(())
    }

    /// Appends to `muts` the records of the message IDs this group remembers, and deletes those
    /// it forgets (older than an hour, or past the most kept): they commit with the group's
    /// telemetry events, so that what is remembered after a restart is what was committed.
    pub fn message_id_records(&mut self, unix_now: i64, muts: &mut Vec<Mutation>) {
        for (twin, id) in &self.pending_ids {
            muts.push(Mutation::put(
                Table::MessageIds,
                message_id_key(twin, id),
                unix_now.to_string().into_bytes(),
            ));
        }
        let total = self.recent_order.len() + self.pending_ids.len();
        let mut evict = 0;
        for (pair, seen) in &self.recent_order {
            if evict == MAX_FORGET
                || (total - evict <= MAX_MESSAGE_IDS && unix_now - seen < MESSAGE_ID_SECONDS)
            {
                break;
            }
            // An entry an ID seen again replaced is not the stored one; an expired ID sent again
            // in this group is stored anew by the put above.
            if self.recent.get(pair) == Some(seen) && !self.pending_set.contains(pair) {
                muts.push(Mutation::delete(
                    Table::MessageIds,
                    message_id_key(&pair.0, &pair.1),
                ));
            }
            evict += 1;
        }
        self.pending_evict = evict;
    }

    /// Numbers `changes` after everything committed so far and appends their records (and the
    /// feed's new position) to `muts`. Returns what to publish once the commit succeeds.
    pub fn number(&self, changes: Vec<Change>, now: &str, muts: &mut Vec<Mutation>) -> Numbered {
        let mut next = self.next;
        let mut twins: HashMap<String, u64> = HashMap::new();
        let count = changes.len();
        for change in changes {
            let twin_seq = twins
                .get(&change.twin)
                .or_else(|| self.twin_seqs.get(&change.twin))
                .copied()
                .unwrap_or(0)
                + 1;
            twins.insert(change.twin.clone(), twin_seq);
            let event = FeedEvent {
                seq: next,
                id: uuid::Uuid::new_v4().to_string(),
                event_type: change.event_type.to_owned(),
                subject: change.subject,
                twin: change.twin,
                twin_seq,
                time: now.to_owned(),
                dataschema: change.dataschema,
                component: change.component,
                source_time: change.source_time,
                data: change.data,
            };
            // A record of plain JSON values always serializes.
            let bytes = serde_json::to_vec(&event).unwrap_or_default();
            muts.push(Mutation::put(Table::Events, key(next), bytes));
            next += 1;
        }
        for (twin, seq) in &twins {
            muts.push(Mutation::put(
                Table::FeedTwins,
                twin.clone(),
                seq.to_string().into_bytes(),
            ));
        }
        if count > 0 {
            muts.push(Mutation::put(
                Table::Meta,
                NEXT_KEY,
                next.to_string().into_bytes(),
            ));
        }
        Numbered { next, twins }
    }

    /// Deletes the records below `below` (at most [`MAX_TRIM`] of them) in the group being
    /// built.
    pub fn trim(&mut self, below: u64, muts: &mut Vec<Mutation>) {
        let first = self.pending_first.unwrap_or(self.first);
        let end = below.min(self.next).min(first.saturating_add(MAX_TRIM));
        if end <= first {
            return;
        }
        for seq in first..end {
            muts.push(Mutation::delete(Table::Events, key(seq)));
        }
        muts.push(Mutation::put(
            Table::Meta,
            FIRST_KEY,
            end.to_string().into_bytes(),
        ));
        self.pending_first = Some(end);
    }

    /// Whether telemetry message `id` for `twin` was seen recently (or earlier in this group);
    /// if not, remembers it for this group.
    /// An ID older than an hour is not seen, even before a commit forgets it.
    pub fn seen_message(&mut self, twin: &str, id: &str, unix_now: i64) -> bool {
        let key = (twin.to_owned(), id.to_owned());
        let recent = self
            .recent
            .get(&key)
            .is_some_and(|seen| unix_now - seen < MESSAGE_ID_SECONDS);
        if recent || self.pending_set.contains(&key) {
            return true;
        }
        self.pending_set.insert(key.clone());
        self.pending_ids.push(key);
        false
    }

    /// The group committed: its numbers, trim and message IDs take effect.
    pub fn committed(&mut self, numbered: Numbered, unix_now: i64) {
        self.next = numbered.next;
        self.twin_seqs.extend(numbered.twins);
        if let Some(first) = self.pending_first.take() {
            self.first = first;
        }
        for _ in 0..std::mem::take(&mut self.pending_evict) {
            if let Some((key, seen)) = self.recent_order.pop_front()
                && self.recent.get(&key) == Some(&seen)
            {
                self.recent.remove(&key);
            }
        }
        self.pending_set.clear();
        for key in self.pending_ids.drain(..) {
            self.recent.insert(key.clone(), unix_now);
            self.recent_order.push_back((key, unix_now));
        }
    }

    /// The group failed: nothing it did takes effect.
    pub fn abandoned(&mut self) {
        self.pending_first = None;
        self.pending_ids.clear();
        self.pending_set.clear();
        self.pending_evict = 0;
    }

    /// Forgets the message IDs a refused write remembered (see [`FeedState::seen_message`]).
    pub fn truncate_ids(&mut self, len: usize) {
        for key in self.pending_ids.drain(len.min(self.pending_ids.len())..) {
            self.pending_set.remove(&key);
        }
    }

    pub fn pending_ids(&self) -> usize {
        self.pending_ids.len()
    }
}

/// The store key of a remembered message ID: the twin's length first, so that no pair of twin
/// and ID can be read as another.
fn message_id_key(twin: &str, id: &str) -> String {
    format!("{}:{twin}{id}", twin.len())
}

fn split_message_id_key(key: &str) -> Option<(String, String)> {
    let (len, rest) = key.split_once(':')?;
    let len: usize = len.parse().ok()?;
    let (twin, id) = (rest.get(..len)?, rest.get(len..)?);
    Some((twin.to_owned(), id.to_owned()))
}

/// What numbering a group's changes produced, to publish once it commits.
#[derive(Debug, Default)]
pub(crate) struct Numbered {
    next: u64,
    twins: HashMap<String, u64>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn change(twin: &str) -> Change {
        Change {
            event_type: TWIN_UPDATE,
            twin: twin.into(),
            subject: twin.into(),
            data: Value::Null,
            dataschema: None,
            component: None,
            source_time: None,
        }
    }

    fn events(muts: &[Mutation]) -> Vec<FeedEvent> {
        muts.iter()
            .filter(|m| m.table == Table::Events)
            .map(|m| serde_json::from_slice(m.value.as_ref().unwrap()).unwrap())
            .collect()
    }

    #[test]
    fn numbers_are_gap_free_per_feed_and_per_twin_and_a_failed_group_leaves_no_gap() {
        let mut feed = FeedState::from_records(&[], Vec::new()).unwrap();
        let mut muts = Vec::new();
        let n = feed.number(vec![change("a"), change("b"), change("a")], "t", &mut muts);
        feed.committed(n, 0);
        let first = events(&muts);
        assert_eq!(
            first
                .iter()
                .map(|e| (e.seq, e.twin_seq))
                .collect::<Vec<_>>(),
            [(1, 1), (2, 1), (3, 2)]
        );
        // A group that fails to commit hands out nothing.
        let _lost = feed.number(vec![change("a")], "t", &mut Vec::new());
        feed.abandoned();
        let mut muts = Vec::new();
        let n = feed.number(vec![change("a")], "t", &mut muts);
        feed.committed(n, 0);
        let e = &events(&muts)[0];
        assert_eq!((e.seq, e.twin_seq), (4, 3));
        // The position survives a restart through the records committed with it.
        let meta: Vec<_> = muts
            .iter()
            .filter(|m| m.table == Table::Meta)
            .map(|m| (m.key.clone(), m.value.clone().unwrap()))
            .collect();
        let twins = vec![
            ("a".to_owned(), b"3".to_vec()),
            ("b".to_owned(), b"1".to_vec()),
        ];
        let reopened = FeedState::from_records(&meta, twins).unwrap();
        let mut muts = Vec::new();
        reopened.number(vec![change("b")], "t", &mut muts);
        let e = &events(&muts)[0];
        assert_eq!((e.seq, e.twin_seq), (5, 2));
    }

    #[test]
    fn a_trim_deletes_only_numbers_handed_out_and_at_most_a_bounded_count() {
        let mut feed = FeedState::from_records(&[], Vec::new()).unwrap();
        let n = feed.number(vec![change("a"); 5], "t", &mut Vec::new());
        feed.committed(n, 0);
        let mut muts = Vec::new();
        feed.trim(100, &mut muts);
        let deleted: Vec<_> = muts
            .iter()
            .filter(|m| m.table == Table::Events)
            .map(|m| m.key.clone())
            .collect();
        assert_eq!(deleted, (1..6).map(key).collect::<Vec<_>>());
        feed.committed(
            Numbered {
                next: 6,
                ..Numbered::default()
            },
            0,
        );
        assert_eq!(feed.first, 6);
        let mut muts = Vec::new();
        feed.trim(100, &mut muts);
        assert!(muts.is_empty(), "nothing left to trim");
    }

    /// Commits a group with no changes at `unix_now`, as the writer does, and returns its
    /// message-ID records.
    fn commit_ids(feed: &mut FeedState, unix_now: i64) -> Vec<Mutation> {
        let mut muts = Vec::new();
        let numbered = feed.number(Vec::new(), "t", &mut muts);
        feed.message_id_records(unix_now, &mut muts);
        feed.committed(numbered, unix_now);
        muts.retain(|m| m.table == Table::MessageIds);
        muts
    }

    #[test]
    fn message_ids_are_remembered_only_once_committed_and_expire() {
        let mut feed = FeedState::default();
        assert!(!feed.seen_message("t", "m1", 0));
        assert!(feed.seen_message("t", "m1", 0), "a repeat within the group");
        feed.abandoned();
        assert!(
            !feed.seen_message("t", "m1", 0),
            "a failed group remembers nothing"
        );
        assert!(!feed.seen_message("u", "m1", 0), "IDs are per twin");
        let stored = commit_ids(&mut feed, 1_000);
        assert_eq!(
            stored.len(),
            2,
            "each remembered ID is committed with its group"
        );
        assert!(feed.seen_message("t", "m1", 1_000));
        feed.abandoned();
        let forgotten = commit_ids(&mut feed, 1_000 + MESSAGE_ID_SECONDS);
        assert!(
            !feed.seen_message("t", "m1", 1_000 + MESSAGE_ID_SECONDS),
            "forgotten after an hour"
        );
        assert_eq!(
            forgotten.iter().filter(|m| m.value.is_none()).count(),
            2,
            "and deleted from the store in the same commit"
        );
    }

    #[test]
    fn the_ids_of_a_refused_write_are_forgotten_within_the_group() {
        let mut feed = FeedState::default();
        assert!(!feed.seen_message("t", "kept", 0));
        let mark = feed.pending_ids();
        assert!(!feed.seen_message("t", "refused", 0));
        feed.truncate_ids(mark);
        assert!(
            !feed.seen_message("t", "refused", 0),
            "the refused write's ID is new again"
        );
        assert!(feed.seen_message("t", "kept", 0));
        let stored = commit_ids(&mut feed, 0);
        assert_eq!(stored.len(), 2);
    }

    #[test]
    fn an_expired_id_is_new_again_and_its_new_record_is_kept() {
        let mut feed = FeedState::default();
        assert!(!feed.seen_message("t", "m", 0));
        commit_ids(&mut feed, 0);
        // An hour later, before any commit forgot it: new again.
        assert!(!feed.seen_message("t", "m", MESSAGE_ID_SECONDS));
        let muts = commit_ids(&mut feed, MESSAGE_ID_SECONDS);
        // The group forgets the old entry and remembers the new one under the same key: the
        // put must win, or the ID would be forgotten at the next restart.
        assert!(
            muts.iter().all(|m| m.value.is_some()),
            "the new record is not deleted by the expiry of the old one: {muts:?}"
        );
        assert!(feed.seen_message("t", "m", MESSAGE_ID_SECONDS + 1));
    }

    #[test]
    fn a_group_forgets_a_bounded_number_of_ids() {
        let records: Vec<_> = (0..MAX_FORGET + 10)
            .map(|i| (message_id_key("t", &i.to_string()), b"0".to_vec()))
            .collect();
        let mut feed = FeedState::default().with_message_ids(records).unwrap();
        let first = commit_ids(&mut feed, MESSAGE_ID_SECONDS);
        assert_eq!(
            first.len(),
            MAX_FORGET,
            "one commit deletes at most MAX_FORGET"
        );
        let second = commit_ids(&mut feed, MESSAGE_ID_SECONDS);
        assert_eq!(second.len(), 10, "the next one the rest");
        assert!(commit_ids(&mut feed, MESSAGE_ID_SECONDS).is_empty());
    }

    #[test]
    fn remembered_message_ids_survive_a_restart_through_their_records() {
        let mut feed = FeedState::default();
        // Twin and ID pairs whose plain concatenation would collide.
        assert!(!feed.seen_message("a:b", "c", 1_000));
        assert!(!feed.seen_message("a", "b:c", 1_000));
        assert!(!feed.seen_message("x", "old", 1_000));
        let mut table: std::collections::BTreeMap<String, Vec<u8>> = Default::default();
        let mut apply = |muts: Vec<Mutation>| {
            for m in muts {
                match m.value {
                    Some(v) => table.insert(m.key, v),
                    None => table.remove(&m.key),
                };
            }
        };
        apply(commit_ids(&mut feed, 1_000));
        assert!(!feed.seen_message("x", "new", 1_000));
        apply(commit_ids(&mut feed, 1_000 + MESSAGE_ID_SECONDS - 1));
        // An hour after the first group: its IDs are forgotten, in memory and in the store.
        apply(commit_ids(&mut feed, 1_000 + MESSAGE_ID_SECONDS));
        let records: Vec<_> = table.into_iter().collect();
        let mut reopened = FeedState::from_records(&[], Vec::new())
            .unwrap()
            .with_message_ids(records)
            .unwrap();
        assert!(reopened.seen_message("x", "new", 1_000 + MESSAGE_ID_SECONDS));
        assert!(!reopened.seen_message("x", "old", 1_000 + MESSAGE_ID_SECONDS));
        assert!(!reopened.seen_message("a:b", "c", 1_000 + MESSAGE_ID_SECONDS));
        assert!(
            FeedState::default()
                .with_message_ids(vec![("no length".into(), b"1".to_vec())])
                .is_none(),
            "an unreadable record is reported, not skipped"
        );
    }
}
