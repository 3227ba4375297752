//! The storage seam. The domain keeps the whole graph in memory as immutable snapshots and asks a
//! store for two things only: every record of a table at start-up, and the atomic, durable commit
//! of a batch of changes. A backend is a durable key-value table set; the embedded redb backend
//! lives in its own crate, and a PostgreSQL one can follow without touching the domain.

#[doc(hidden)]
pub mod contract;
#[doc(hidden)]
pub mod stalling;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// The tables of the store. Keys are UTF-8 strings (any, `""` and U+0000 included) in byte
/// order; values are bytes, mostly JSON documents. Each table has one [`Owner`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    Models,
    Twins,
    /// Keyed by `source \u{1f} relationship id`.
    Relationships,
    EventRoutes,
    /// OAuth clients of format 1 (secret hashes and role IDs); migrated into `Identities`.
    Clients,
    /// Instance settings: format version, instance ID.
    Meta,
    /// Users, groups, applications, service accounts and devices, with credential digests.
    Identities,
    /// Custom role definitions.
    Roles,
    /// Principal x role x scope.
    RoleAssignments,
    /// Refresh token digests and their families.
    RefreshTokens,
    /// IDs of revoked access tokens, until they expire.
    RevokedTokens,
    /// API key digests.
    ApiKeys,
    /// Registered devices: public key, bindings, status, attestation.
    Devices,
    /// Approved firmware digests, per device model.
    Firmware,
    /// Validation policies, per model and property.
    Policies,
    /// Sensor groups: the devices that feed one property together.
    SensorGroups,
    /// Each device's anti-replay window.
    Replay,
    /// Readings held for review, with their reason codes.
    Quarantine,
    /// Accepted readings, keyed by `twin \u{1f} name \u{1f} time`, for range reads.
    History,
    /// Accepted readings in the order they were committed, until they are merged into
    /// `History` (see the telemetry crate's `history` module).
    HistoryLog,
    /// Each sensor stream's learned state (anomaly detector, last accepted reading), keyed by
    /// `device \u{1f} twin \u{1f} name`, so a restart does not start the streams afresh.
    Streams,
    /// The change feed: one record per event, keyed by its zero-padded position (see
    /// [`crate::feed`]).
    Events,
    /// Each twin's last event number in the feed, keyed by twin ID.
    FeedTwins,
    /// Telemetry message IDs seen in the last hour (at most 100,000), keyed by
    /// `len(twin):twin id`, with the Unix time they were committed: `Message-Id`
    /// de-duplication that survives a restart.
    MessageIds,
    /// Event endpoints (destinations of routes), keyed by name.
    Endpoints,
    /// Each endpoint's delivery position in the feed, keyed by endpoint name.
    Deliveries,
    /// Events that exhausted their delivery attempts, keyed by `endpoint \u{1f} position`.
    DeadLetters,
    /// `jti`s of client assertions (RFC 7523) already used, keyed by `client \u{1f} jti`, with
    /// their expiry: an assertion is single-use across restarts and nodes.
    UsedAssertions,
    /// Failed secret checks per account as each node counted them, keyed by
    /// `node \u{1f} account` (on a store several nodes share): the throttle adds them up.
    Backoff,
    /// Which node delivers each endpoint's events, and until when, keyed by endpoint name (on
    /// a store several nodes share; the server's `events::lease`).
    Leases,
    /// The instance's private material (token signing keys, the CA, the event and receipt
    /// keys, the position key), each record sealed with AES-256-GCM under the key-encryption key
    /// each node reads from its own file, keyed by the material's name (on a store several
    /// nodes share; the server's `vault`).
    Secrets,
    /// Claimed identity names, keyed by `identity \u{1f} lower-cased name`, each with the ID of
    /// the identity that holds it: a creation commits its claim expecting none, so one name is
    /// taken once across nodes (the identity directory).
    Names,
    /// Claimed device public keys, keyed by key thumbprint, each with the ID of the device
    /// that holds the key, as its current key or its previous one: a registration or rotation
    /// commits its claim expecting none, so one key is held by one device across nodes (the
    /// telemetry crate's `manage`).
    DeviceKeys,
}

impl Table {
    pub const ALL: [Table; 33] = [
        Table::Models,
        Table::Twins,
        Table::Relationships,
        Table::EventRoutes,
        Table::Clients,
        Table::Meta,
        Table::Identities,
        Table::Roles,
        Table::RoleAssignments,
        Table::RefreshTokens,
        Table::RevokedTokens,
        Table::ApiKeys,
        Table::Devices,
        Table::Firmware,
        Table::Policies,
        Table::SensorGroups,
        Table::Replay,
        Table::Quarantine,
        Table::History,
        Table::HistoryLog,
        Table::Streams,
        Table::Events,
        Table::FeedTwins,
        Table::MessageIds,
        Table::Endpoints,
        Table::Deliveries,
        Table::DeadLetters,
        Table::UsedAssertions,
        Table::Backoff,
        Table::Leases,
        Table::Secrets,
        Table::Names,
        Table::DeviceKeys,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Models => "models",
            Self::Twins => "twins",
            Self::Relationships => "relationships",
            Self::EventRoutes => "eventroutes",
            Self::Clients => "clients",
            Self::Meta => "meta",
            Self::Identities => "identities",
            Self::Roles => "roles",
            Self::RoleAssignments => "roleassignments",
            Self::RefreshTokens => "refreshtokens",
            Self::RevokedTokens => "revokedtokens",
            Self::ApiKeys => "apikeys",
            Self::Devices => "devices",
            Self::Firmware => "firmware",
            Self::Policies => "policies",
            Self::SensorGroups => "sensorgroups",
            Self::Replay => "replay",
            Self::Quarantine => "quarantine",
            Self::History => "history",
            Self::HistoryLog => "historylog",
            Self::Streams => "streams",
            Self::Events => "events",
            Self::FeedTwins => "feedtwins",
            Self::MessageIds => "messageids",
            Self::Endpoints => "endpoints",
            Self::Deliveries => "deliveries",
            Self::DeadLetters => "deadletters",
            Self::UsedAssertions => "usedassertions",
            Self::Backoff => "backoff",
            Self::Leases => "leases",
            Self::Secrets => "secrets",
            Self::Names => "names",
            Self::DeviceKeys => "devicekeys",
        }
    }
}

/// The part of the system that owns a table: the only part that may write it. The twin writer
/// refuses a telemetry write that carries a record of a table telemetry does not own (see
/// `docs/storage.md`, "Table ownership").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Owner {
    /// The twin graph, written only by the twin writer (`service`) from its own operations.
    Graph,
    /// Identities, their credentials and roles, and the tokens issued to them.
    Identity,
    /// The device plane and the telemetry pipeline's own state.
    Telemetry,
    /// Event endpoints and their delivery state (the server's `events` module).
    Events,
}

impl Table {
    /// Who may write this table. Exhaustive on purpose: a new table does not compile until
    /// someone decides who owns it.
    pub fn owner(self) -> Owner {
        match self {
            // `Meta` holds the change feed's position, written by the twin writer with the
            // feed (`crate::feed`), which numbers every event in the graph's commits.
            Self::Models
            | Self::Twins
            | Self::Relationships
            | Self::EventRoutes
            | Self::Meta
            | Self::Events
            | Self::FeedTwins
            | Self::MessageIds => Owner::Graph,
            Self::Clients
            | Self::Identities
            | Self::Roles
            | Self::RoleAssignments
            | Self::RefreshTokens
            | Self::RevokedTokens
            | Self::ApiKeys
            | Self::UsedAssertions
            | Self::Backoff
            | Self::Secrets
            | Self::Names => Owner::Identity,
            Self::Devices
            | Self::Firmware
            | Self::Policies
            | Self::SensorGroups
            | Self::Replay
            | Self::Quarantine
            | Self::History
            | Self::HistoryLog
            | Self::Streams
            | Self::DeviceKeys => Owner::Telemetry,
            Self::Endpoints | Self::Deliveries | Self::DeadLetters | Self::Leases => Owner::Events,
        }
    }
}

impl Table {
    /// Whether a node must learn of other nodes' changes to this table's records: the tables
    /// that an owner keeps in memory and decides security on (identities, roles, keys,
    /// revocations, refresh families, devices, firmware, policies, groups, the quarantine's
    /// pending readings).
    /// A shared store's change log ([`Store::changes_after`]) names the changed keys of these
    /// tables and of the graph's ([`Table::logged`]). Exhaustive on purpose, like
    /// [`Table::owner`].
    pub fn followed(self) -> bool {
        match self {
            Self::Identities
            | Self::Roles
            | Self::RoleAssignments
            | Self::RefreshTokens
            | Self::RevokedTokens
            | Self::ApiKeys
            | Self::Devices
            | Self::Firmware
            | Self::Policies
            | Self::SensorGroups
            | Self::Backoff
            | Self::Secrets => true,
            // Each device's readings waiting for review count against one quota on every node,
            // and a review on one node makes room on all.
            Self::Quarantine => true,
            // The graph is read again whole by the twin writer (`service::catch_up`) after a
            // commit that changed it, which the log marks once ([`GRAPH_CHANGED`]); history,
            // streams' learned state and delivery state are each node's own for now (issue
            // 20); `Clients` is only read by the start-up migration.
            Self::Models
            | Self::Twins
            | Self::Relationships
            | Self::EventRoutes
            | Self::Meta
            | Self::Events
            | Self::FeedTwins
            | Self::MessageIds
            | Self::Clients
            | Self::History
            | Self::HistoryLog
            | Self::Streams
            | Self::Endpoints
            | Self::Deliveries
            | Self::DeadLetters => false,
            // Decided in the store: each write expects what it was decided on (`Expect`), and
            // a node reads them again when it is superseded. Following them would make every
            // node read every device's window after every batch anywhere.
            Self::Replay | Self::UsedAssertions | Self::Names | Self::DeviceKeys => false,
            // Each holder commits its own expecting what it read; every node's delivery rounds
            // read the endpoints, positions and leases whole (`events::lease`).
            Self::Leases => false,
        }
    }
}

impl Table {
    /// Whether a shared store's change log names the keys of this table a commit changed: the
    /// [followed](Table::followed) tables, and the graph's tables that the twin writer keeps in
    /// memory, so that it reads again only the records other nodes changed
    /// (`service::catch_up`). Not the feed's records ([`Table::Events`]), which no node keeps.
    pub fn logged(self) -> bool {
        self.followed()
            || matches!(
                self,
                Self::Models
                    | Self::Twins
                    | Self::Relationships
                    | Self::EventRoutes
                    | Self::Meta
                    | Self::FeedTwins
                    | Self::MessageIds
            )
    }
}

/// Commits a shared store's change log keeps (see [`Store::changes_after`]): a node that falls
/// further behind reads its followed tables whole.
pub const CHANGE_LOG_COMMITS: u64 = 100_000;

/// The key of the change a shared store's log holds, once, for each commit that put or deleted
/// a record of the graph's tables ([`Owner::Graph`]), under [`Table::Meta`], beside the keys.
/// Nodes before the keys were logged read the graph again whole after such a commit; a node
/// that finds the mark of a commit without the keys of any graph table (one such node's
/// commit) does the same (`service::catch_up`).
pub const GRAPH_CHANGED: &str = "graph-changed";

/// The changes a shared store logs for `batch` committed as commit `seq`: the keys of
/// [logged](Table::logged) tables it put or deleted, then [`GRAPH_CHANGED`] if it changed the
/// graph.
pub fn logged_changes(batch: &[Mutation], seq: u64) -> impl Iterator<Item = Change> + '_ {
    let graph = batch.iter().any(|m| m.table.owner() == Owner::Graph);
    batch
        .iter()
        .filter(|m| m.table.logged())
        .map(move |m| Change {
            seq,
            table: m.table,
            key: m.key.clone(),
        })
        .chain(graph.then(|| Change {
            seq,
            table: Table::Meta,
            key: GRAPH_CHANGED.to_owned(),
        }))
}

impl Change {
    /// Whether this is a commit's [`GRAPH_CHANGED`] mark.
    pub fn changed_graph(&self) -> bool {
        self.table == Table::Meta && self.key == GRAPH_CHANGED
    }
}

/// One record of a [followed](Table::followed) table that a commit changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The commit counter after the commit ([`Store::head`]).
    pub seq: u64,
    pub table: Table,
    pub key: String,
}

/// History keys ([`Table::History`]) end in `SEP time SEP device SEP seq`, where `SEP` is
/// U+001F, `time` the measurement time in Unix milliseconds as 16 digits and `seq` 20 digits
/// (`twinguard_telemetry::records::history_key`); a bound of a range of one stream's history
/// ends in `SEP time`. A store may keep history by time with these (PostgreSQL partitions it by
/// day).
const HISTORY_SEP: char = '\u{1f}';

/// The measurement time of history key `key`, if it is one.
pub fn history_key_time(key: &str) -> Option<i64> {
    let mut fields = key.rsplitn(4, HISTORY_SEP);
    let seq = fields.next()?;
    let _device = fields.next()?;
    let time = fields.next()?;
    fields.next()?;
    (seq.len() == 20 && seq.bytes().all(|b| b.is_ascii_digit()))
        .then(|| sixteen_digits(time))
        .flatten()
}

/// The stream and time of a bound of one stream's history: `stream SEP time`, or a history key
/// (with `\0`s after it, as a paged read's next bound is).
fn history_bound(bound: &str) -> Option<(&str, i64)> {
    let key = bound.trim_end_matches('\0');
    if let Some(time) = history_key_time(key) {
        let stream = key.rsplitn(4, HISTORY_SEP).nth(3)?;
        return Some((stream, time));
    }
    let (stream, time) = bound.rsplit_once(HISTORY_SEP)?;
    Some((stream, sixteen_digits(time)?))
}

fn sixteen_digits(field: &str) -> Option<i64> {
    (field.len() == 16 && field.bytes().all(|b| b.is_ascii_digit()))
        .then(|| field.parse().ok())
        .flatten()
}

/// The measurement times that history records with `from <= key < to` can have, when both are
/// bounds of one stream's history: a store may look only there. `None` otherwise.
pub fn history_range_times(from: &str, to: &str) -> Option<(i64, i64)> {
    let (stream, start) = history_bound(from)?;
    let (other, end) = history_bound(to)?;
    // Keys of `end` itself sort after `to` (they go on after it), so `end` is excluded.
    (stream == other).then_some((start, end.saturating_sub(1)))
}

/// The [`Table::Meta`] key of a restore that has not finished (`twinguard restore` writes it in
/// its first commit and deletes it in its last): a server refuses to start on a store that
/// holds it, and a backup refuses to read one.
pub const RESTORE_MARKER: &str = "restore.incomplete";

/// True when `store` holds [`RESTORE_MARKER`].
pub fn restore_unfinished(store: &dyn Store) -> Result<bool, StoreError> {
    let end = format!("{RESTORE_MARKER}\0");
    Ok(!store
        .range(Table::Meta, RESTORE_MARKER, &end, 1)?
        .is_empty())
}

/// One change: `value: None` deletes the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mutation {
    pub table: Table,
    pub key: String,
    pub value: Option<Vec<u8>>,
}

impl Mutation {
    pub fn put(table: Table, key: impl Into<String>, value: Vec<u8>) -> Self {
        Self {
            table,
            key: key.into(),
            value: Some(value),
        }
    }

    pub fn delete(table: Table, key: impl Into<String>) -> Self {
        Self {
            table,
            key: key.into(),
            value: None,
        }
    }
}

/// A record's value that a write was decided on (`value: None`: the record was absent). On a
/// store that several writers share, the writer commits the write only if the record still
/// holds exactly that value; otherwise the decision is [`DomainError::Superseded`] and its
/// owner reads the record again and decides anew. This is how a security decision (a replay
/// window moved, a refresh token spent) is decided in the store, not in one node's memory.
///
/// [`DomainError::Superseded`]: crate::error::DomainError::Superseded
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expect {
    pub table: Table,
    pub key: String,
    pub value: Option<Vec<u8>>,
}

#[derive(Debug, thiserror::Error)]
#[error("store error: {0}")]
pub struct StoreError(pub String);

/// What a fenced commit ([`Store::commit_at`]) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fenced {
    /// Applied; the store's commit counter is now this.
    Committed(u64),
    /// Nothing applied: another writer committed first, and the counter is now this.
    Stale(u64),
}

/// A durable table store. Every backend behaves alike, down to key order and range bounds; the
/// checks in [`contract`] say how, and each backend's tests run them.
pub trait Store: Send + Sync + 'static {
    /// Every record of `table`, in key order.
    fn scan(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError>;

    /// Applies every mutation of `batch` or none, and returns only once the batch is durable.
    fn commit(&self, batch: &[Mutation]) -> Result<(), StoreError>;

    /// The store's commit counter, when several writers may share the store (PostgreSQL, and
    /// [`MemoryStore::shared`] in tests): every commit moves it on by one. `None` for a store
    /// that one process writes alone (the embedded file), which needs no fence.
    fn head(&self) -> Result<Option<u64>, StoreError> {
        Ok(None)
    }

    /// A read-only view of the whole store as of one moment: its reads, and its
    /// [`Store::head`], see every commit made before it was taken and none after, however long
    /// they take. For reading many tables that must agree while other writers go on (a node
    /// loading the graph). `None` where the store has none; the caller then reads the counter
    /// before and after its reads, and reads again if it moved.
    fn snapshot(&self) -> Result<Option<Box<dyn Store>>, StoreError> {
        Ok(None)
    }

    /// [`Store::commit`], only if the commit counter is still `expected`: the compare-and-set
    /// that serialises writers sharing a store, so that a writer whose view of the store is
    /// behind applies nothing ([`Fenced::Stale`]) instead of overwriting what it has not seen.
    /// A store without a counter ([`Store::head`] is `None`) commits unconditionally.
    fn commit_at(&self, batch: &[Mutation], expected: u64) -> Result<Fenced, StoreError> {
        self.commit(batch)?;
        Ok(Fenced::Committed(expected))
    }

    /// Takes the store's commit turn, waiting for it: until this writer's next commit
    /// ([`Store::commit_at`], which is made in the turn and ends it) or [`Store::end_turn`], no
    /// other writer commits, so a commit fenced at the counter read in the turn cannot be
    /// [`Fenced::Stale`]. For a writer that keeps losing the race to writers that commit faster
    /// than it catches up with them. False where the store has no turn to take (a store of one
    /// writer); the caller then commits as it would have.
    fn hold_turn(&self) -> Result<bool, StoreError> {
        Ok(false)
    }

    /// Gives back the commit turn, if this writer still holds it.
    fn end_turn(&self) {}

    /// The records of `table` with `from <= key`, in key order, at most `limit` of them: a page
    /// of a large table. Backends with ordered keys should override this default, which scans
    /// the whole table.
    fn range_from(
        &self,
        table: Table,
        from: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        Ok(self
            .scan(table)?
            .into_iter()
            .filter(|(k, _)| k.as_str() >= from)
            .take(limit)
            .collect())
    }

    /// [`Store::commit`] only if each record of `expect` still holds the value it names (see
    /// [`Expect`]): `Ok(false)`, with nothing applied, when one does not, or when another
    /// writer of a counted store committed between the check and the commit. A store of one
    /// writer checks the records too (a read of each), for callers that keep no memory of them.
    fn commit_expecting(&self, batch: &[Mutation], expect: &[Expect]) -> Result<bool, StoreError> {
        let head = self.head()?;
        for e in expect {
            let found = self.get_many(e.table, std::slice::from_ref(&e.key))?;
            if found.first() != Some(&e.value) {
                return Ok(false);
            }
        }
        match head {
            Some(head) => Ok(matches!(self.commit_at(batch, head)?, Fenced::Committed(_))),
            None => self.commit(batch).map(|()| true),
        }
    }

    /// Removes at once whole days of history ([`Table::History`]) measured before `cutoff_ms`,
    /// where the store keeps history by day (PostgreSQL drops their partitions): the number of
    /// days removed. The caller removes what is left before the cutoff record by record.
    fn drop_history_before(&self, cutoff_ms: i64) -> Result<usize, StoreError> {
        let _ = cutoff_ms;
        Ok(0)
    }

    /// The records of followed tables changed by the commits numbered `after + 1 ..= upto`, in
    /// commit order, when the store keeps a change log that still reaches back to `after`
    /// (the last [`CHANGE_LOG_COMMITS`] commits); `None` otherwise, and always for a store of
    /// one writer: the caller then reads what it follows whole.
    fn changes_after(&self, after: u64, upto: u64) -> Result<Option<Vec<Change>>, StoreError> {
        let _ = (after, upto);
        Ok(None)
    }

    /// The values of `keys` in `table` (`None` for a key that is absent), in the order asked.
    /// Backends that can look keys up together should override this default, one range read
    /// per key.
    fn get_many(&self, table: Table, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        keys.iter()
            .map(|key| {
                let end = format!("{key}\0");
                Ok(self
                    .range(table, key, &end, 1)?
                    .into_iter()
                    .next()
                    .map(|(_, v)| v))
            })
            .collect()
    }

    /// The records of `table` with `from <= key < to`, in key order, at most `limit` of them.
    /// Backends with ordered keys should override this default, which scans the whole table.
    fn range(
        &self,
        table: Table,
        from: &str,
        to: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        Ok(self
            .scan(table)?
            .into_iter()
            .filter(|(k, _)| k.as_str() >= from && k.as_str() < to)
            .take(limit)
            .collect())
    }
}

/// Calls `f` with every record of `table` in key order, reading `page` records at a time, so
/// that a large table is never held in memory twice (once as read, once as built from it).
pub fn for_each_record<E: From<StoreError>>(
    store: &dyn Store,
    table: Table,
    page: usize,
    mut f: impl FnMut(String, Vec<u8>) -> Result<(), E>,
) -> Result<(), E> {
    let page = page.max(1);
    let mut from = String::new();
    loop {
        let rows = store.range_from(table, &from, page)?;
        let full = rows.len() == page;
        let mut next = None;
        for (i, (key, value)) in rows.into_iter().enumerate() {
            if full && i == page - 1 {
                // The smallest key after this one.
                next = Some(format!("{key}\0"));
            }
            f(key, value)?;
        }
        match next {
            Some(key) => from = key,
            None => return Ok(()),
        }
    }
}

/// An in-memory store for tests; `set_failing(true)` makes every commit fail, as a full or broken
/// disk would.
#[derive(Default)]
pub struct MemoryStore {
    tables: Mutex<BTreeMap<(Table, String), Vec<u8>>>,
    failing: AtomicBool,
    /// The commit counter of [`MemoryStore::shared`]; `None` for a store of one writer.
    commits: Option<Mutex<u64>>,
    /// How many times each table was scanned whole (tests: who reads what again).
    scans: Mutex<std::collections::HashMap<Table, u64>>,
    /// Commits "from another writer", each made just before one of the next fenced commits
    /// (tests).
    interposed: Mutex<std::collections::VecDeque<Vec<Mutation>>>,
    /// A shared store's change log, and the counter below which it no longer reaches.
    changes: Mutex<(Vec<Change>, u64)>,
    /// Run on another thread during the next `get_many` (tests: a write racing a read).
    during_next_read: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    /// While true, commits wait (tests: a write queued and not yet committed).
    held: Mutex<bool>,
    released: std::sync::Condvar,
}

impl MemoryStore {
    /// A store that several writers may share, as services on one PostgreSQL database do: it
    /// counts its commits ([`Store::head`]) and fences them ([`Store::commit_at`]).
    pub fn shared() -> Self {
        Self {
            commits: Some(Mutex::new(0)),
            ..Self::default()
        }
    }

    /// How many times `table` was scanned whole ([`Store::scan`]).
    pub fn scans_of(&self, table: Table) -> u64 {
        self.scans
            .lock()
            .map(|scans| scans.get(&table).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Runs `hook` on another thread during the next `get_many`, which answers what it read
    /// before the hook ran, once the hook is done (or after two seconds, should the hook wait
    /// for something the reader holds): a write that races a read.
    pub fn run_during_next_read(&self, hook: impl FnOnce() + Send + 'static) {
        if let Ok(mut next) = self.during_next_read.lock() {
            *next = Some(Box::new(hook));
        }
    }

    /// While `held`, every commit waits: a write that is queued and not yet committed.
    pub fn hold_commits(&self, held: bool) {
        if let Ok(mut h) = self.held.lock() {
            *h = held;
        }
        self.released.notify_all();
    }

    /// Forgets the change log up to the current counter, as a log trimmed past a node that
    /// fell behind would be (tests).
    pub fn forget_changes(&self) {
        let head = self
            .commits
            .as_ref()
            .and_then(|c| c.lock().ok().map(|n| *n))
            .unwrap_or(0);
        if let Ok(mut changes) = self.changes.lock() {
            changes.0.clear();
            changes.1 = head;
        }
    }

    /// The records, counter and change log as they stand, for [`MemoryStore::go_back_to`].
    pub fn copy(&self) -> Self {
        let lock = |what| StoreError(format!("poisoned: {what}"));
        let copy = || -> Result<Self, StoreError> {
            Ok(Self {
                tables: Mutex::new(self.tables.lock().map_err(|_| lock("tables"))?.clone()),
                commits: match &self.commits {
                    Some(c) => Some(Mutex::new(*c.lock().map_err(|_| lock("counter"))?)),
                    None => None,
                },
                changes: Mutex::new(self.changes.lock().map_err(|_| lock("log"))?.clone()),
                ..Self::default()
            })
        };
        copy().unwrap_or_default()
    }

    /// Makes this store answer for `earlier`'s history from now on (its records, counter and
    /// change log): a standby promoted without the last commits, or a recovery to an earlier
    /// point, seen by a writer that read the lost commits (tests).
    pub fn go_back_to(&self, earlier: &Self) {
        let earlier = earlier.copy();
        if let (Ok(mut tables), Ok(from)) = (self.tables.lock(), earlier.tables.into_inner()) {
            *tables = from;
        }
        if let (Some(commits), Some(from)) = (&self.commits, earlier.commits)
            && let (Ok(mut commits), Ok(from)) = (commits.lock(), from.into_inner())
        {
            *commits = from;
        }
        if let (Ok(mut changes), Ok(from)) = (self.changes.lock(), earlier.changes.into_inner()) {
            *changes = from;
        }
    }

    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// Commits `batch` (moving the counter) at the moment the next fenced commit arrives, as
    /// another writer that got there first would: that commit then finds the counter moved.
    /// Called several times, the batches are interposed before that many fenced commits, one
    /// each.
    pub fn interpose_before_next_fenced_commit(&self, batch: Vec<Mutation>) {
        if let Ok(mut interposed) = self.interposed.lock() {
            interposed.push_back(batch);
        }
    }

    /// Puts and deletes `batch`'s records, in order.
    fn write(&self, batch: &[Mutation]) -> Result<(), StoreError> {
        let mut tables = self
            .tables
            .lock()
            .map_err(|_| StoreError("poisoned".into()))?;
        for m in batch {
            let key = (m.table, m.key.clone());
            match &m.value {
                Some(v) => tables.insert(key, v.clone()),
                None => tables.remove(&key),
            };
        }
        Ok(())
    }

    /// Records what `batch` changed in commit `seq` ([`logged_changes`]; a shared store only).
    fn log(&self, batch: &[Mutation], seq: u64) -> Result<(), StoreError> {
        let mut changes = self
            .changes
            .lock()
            .map_err(|_| StoreError("poisoned".into()))?;
        changes.0.extend(logged_changes(batch, seq));
        let floor = seq.saturating_sub(CHANGE_LOG_COMMITS);
        if floor > changes.1 {
            changes.1 = floor;
            changes.0.retain(|c| c.seq > floor);
        }
        Ok(())
    }

    /// Applies `batch` if the counter is `expected` (or unconditionally for `None`); the
    /// counter's lock is held across it, so fenced commits are serialised.
    fn apply(&self, batch: &[Mutation], expected: Option<u64>) -> Result<Fenced, StoreError> {
        let mut held = self
            .held
            .lock()
            .map_err(|_| StoreError("poisoned".into()))?;
        while *held {
            held = self
                .released
                .wait(held)
                .map_err(|_| StoreError("poisoned".into()))?;
        }
        drop(held);
        if self.failing.load(Ordering::SeqCst) {
            return Err(StoreError("commit refused (test failure injection)".into()));
        }
        let mut counter = self
            .commits
            .as_ref()
            .map(|c| c.lock())
            .transpose()
            .map_err(|_| StoreError("poisoned".into()))?;
        if expected.is_some() {
            let interposed = self
                .interposed
                .lock()
                .map_err(|_| StoreError("poisoned".into()))?
                .pop_front();
            if let (Some(batch), Some(n)) = (interposed, counter.as_deref_mut()) {
                self.write(&batch)?;
                *n += 1;
                self.log(&batch, *n)?;
            }
        }
        let head = counter.as_deref().copied().unwrap_or(0);
        if expected.is_some_and(|e| counter.is_some() && e != head) {
            return Ok(Fenced::Stale(head));
        }
        self.write(batch)?;
        match counter.as_deref_mut() {
            Some(n) => {
                *n += 1;
                self.log(batch, *n)?;
                Ok(Fenced::Committed(*n))
            }
            None => Ok(Fenced::Committed(expected.unwrap_or(0))),
        }
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("shared", &self.commits.is_some())
            .finish_non_exhaustive()
    }
}

impl Store for MemoryStore {
    fn scan(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        if let Ok(mut scans) = self.scans.lock() {
            *scans.entry(table).or_default() += 1;
        }
        let tables = self
            .tables
            .lock()
            .map_err(|_| StoreError("poisoned".into()))?;
        Ok(tables
            .iter()
            .filter(|((t, _), _)| *t == table)
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .collect())
    }

    /// Ordered, not a scan of the table: a page costs its own size, so reading a large table a
    /// page at a time (history reads) costs the table once, not once per page.
    fn range_from(
        &self,
        table: Table,
        from: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let tables = self
            .tables
            .lock()
            .map_err(|_| StoreError("poisoned".into()))?;
        Ok(tables
            .range((table, from.to_owned())..)
            .take_while(|((t, _), _)| *t == table)
            .take(limit)
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .collect())
    }

    /// Ordered, as [`MemoryStore::range_from`].
    fn range(
        &self,
        table: Table,
        from: &str,
        to: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        if from >= to {
            return Ok(Vec::new());
        }
        let tables = self
            .tables
            .lock()
            .map_err(|_| StoreError("poisoned".into()))?;
        Ok(tables
            .range((table, from.to_owned())..(table, to.to_owned()))
            .take(limit)
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .collect())
    }

    fn commit(&self, batch: &[Mutation]) -> Result<(), StoreError> {
        self.apply(batch, None).map(|_| ())
    }

    /// Fails with the commits under `set_failing(true)`: a shared store that is unreachable.
    fn head(&self) -> Result<Option<u64>, StoreError> {
        if self.commits.is_some() && self.failing.load(Ordering::SeqCst) {
            return Err(StoreError("unreachable (test failure injection)".into()));
        }
        self.commits
            .as_ref()
            .map(|c| c.lock().map(|n| *n))
            .transpose()
            .map_err(|_| StoreError("poisoned".into()))
    }

    fn commit_at(&self, batch: &[Mutation], expected: u64) -> Result<Fenced, StoreError> {
        self.apply(batch, Some(expected))
    }

    fn get_many(&self, table: Table, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let read = {
            let tables = self
                .tables
                .lock()
                .map_err(|_| StoreError("poisoned".into()))?;
            keys.iter()
                .map(|k| tables.get(&(table, k.clone())).cloned())
                .collect()
        };
        let hook = self
            .during_next_read
            .lock()
            .map_err(|_| StoreError("poisoned".into()))?
            .take();
        if let Some(hook) = hook {
            let (done, finished) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                hook();
                let _ = done.send(());
            });
            let _ = finished.recv_timeout(std::time::Duration::from_secs(2));
        }
        Ok(read)
    }

    fn changes_after(&self, after: u64, upto: u64) -> Result<Option<Vec<Change>>, StoreError> {
        if self.commits.is_none() {
            return Ok(None);
        }
        let changes = self
            .changes
            .lock()
            .map_err(|_| StoreError("poisoned".into()))?;
        if after < changes.1 {
            return Ok(None);
        }
        Ok(Some(
            changes
                .0
                .iter()
                .filter(|c| c.seq > after && c.seq <= upto)
                .cloned()
                .collect(),
        ))
    }
}
