//! The telemetry service: the registry, policies, groups and per-stream state in memory, loaded
//! from the store at start, and every change committed through the twin service's writer so that
//! it lands in the same durable transaction as the twin updates it goes with.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use twinguard_core::auth::{Principal, TELEMETRY_WRITER};
use twinguard_core::clock::Clock;
use twinguard_core::error::{DomainError, DomainResult};
use twinguard_core::follow::Follower;
use twinguard_core::graph::{PropertyUpdate, Quality, Skipped, WriteOp, WriteOutcome};
use twinguard_core::service::TwinService;
use twinguard_core::store::{Expect, Mutation, Store, StoreError, Table};

use crate::anomaly::{Detector, DetectorConfig};
use crate::forecast::Forecaster;
use crate::fusion::SensorGroup;
use crate::history::HistoryStore;
use crate::policy::Policy;
use crate::records::StoredReading;
use crate::registry::{Device, DeviceKeys, FirmwareList, Status};
use crate::replay::ReplayWindow;
use crate::writes::{InFlight, Reading, Writes};

/// One device's stream of one name on one twin: what judges its next reading. It is stored
/// (table `Streams`, see [`Telemetry::checkpoint`]) so that a restart neither hands the stream
/// a fresh warmup nor forgets the reading the next one's rate of change is measured from.
#[derive(Debug, Clone)]
pub(crate) struct Sensor {
    pub detector: Detector,
    /// The last accepted reading `(value, time_s)`, for the rate-of-change limit and the order
    /// of readings: one measured before it is late.
    pub last: Option<(f64, f64)>,
    /// Changed since it was last stored.
    pub dirty: bool,
}

/// Good values of a sensor group whose range bounds its estimate.
pub(crate) const RECENT_FUSED: usize = 16;

/// How often the server stores the streams' learned state ([`Telemetry::checkpoint`]).
pub const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Format of a stored [`Sensor`].
const SENSOR_FORMAT: u8 = 1;

impl Sensor {
    pub fn new(config: &DetectorConfig) -> Self {
        Self {
            detector: Detector::new(config),
            last: None,
            dirty: true,
        }
    }

    /// A format byte, whether there is a last reading, its value and time, then the detector.
    fn to_bytes(&self) -> Vec<u8> {
        let (has, (value, time)) = match self.last {
            Some(last) => (1u8, last),
            None => (0, (0.0, 0.0)),
        };
        let mut out = vec![SENSOR_FORMAT, has];
        out.extend_from_slice(&value.to_le_bytes());
        out.extend_from_slice(&time.to_le_bytes());
        out.extend_from_slice(&self.detector.to_bytes());
        out
    }

    /// Reads [`Sensor::to_bytes`]. A detector learned under another configuration starts
    /// afresh; the last reading is kept either way.
    fn from_bytes(config: &DetectorConfig, bytes: &[u8]) -> Option<Self> {
        let (head, detector) = bytes.split_at_checked(18)?;
        if head[0] != SENSOR_FORMAT {
            return None;
        }
        let value = f64::from_le_bytes(head[2..10].try_into().ok()?);
        let time = f64::from_le_bytes(head[10..18].try_into().ok()?);
        let last = match head[1] {
            0 => None,
            1 if value.is_finite() && time.is_finite() => Some((value, time)),
            _ => return None,
        };
        let detector = Detector::from_bytes(config, detector).unwrap_or_else(|| {
            tracing::warn!("a stored anomaly detector was learned under another configuration; it starts afresh");
            Detector::new(config)
        });
        Some(Self {
            detector,
            last,
            dirty: false,
        })
    }
}

/// The key of a stream's stored state.
pub(crate) fn stream_key(device: &str, twin: &str, name: &str) -> String {
    format!("{device}\u{1f}{twin}\u{1f}{name}")
}

/// One property of one twin: what the twin shows and what it falls back to.
#[derive(Debug, Default)]
pub(crate) struct Prop {
    pub forecaster: Forecaster,
    /// Measurement time (ms) of the value the twin shows, so older readings do not overwrite it.
    pub applied_ms: i64,
    /// When the property last got a good value (s).
    pub good_s: f64,
    pub quality: Option<Quality>,
    /// Each group member's latest accepted reading `(device, value, time_s)`.
    pub latest: Vec<(String, Value, f64)>,
    /// A group's last [`RECENT_FUSED`] good values: its estimate stays within their range, so
    /// a liar that agreed within the tolerance for a while cannot have its drift extrapolated.
    pub recent: std::collections::VecDeque<f64>,
    /// The newest reading each device has had applied here: `(time_ms, seq)`.
    pub newest: HashMap<String, (i64, u64)>,
}

#[derive(Debug, Default)]
pub(crate) struct State {
    /// The registry. A record is replaced or removed only through [`State::put_device`] and
    /// [`State::remove_device`], which keep `keys` and `key_holders` with it; an edit in place
    /// never touches a key.
    pub devices: HashMap<String, Device>,
    pub firmware: HashMap<String, FirmwareList>,
    pub policies: HashMap<String, Policy>,
    pub groups: HashMap<String, SensorGroup>,
    pub windows: HashMap<String, ReplayWindow>,
    pub sensors: HashMap<(String, String, String), Sensor>,
    pub props: HashMap<(String, String), Prop>,
    /// Readings quarantined in this run, for the order of their keys.
    pub quarantined: u64,
    /// Readings each device has waiting for review, against its quota: counted from
    /// `pending`, which only [`State::hold`] and [`State::unhold`] change.
    held: HashMap<String, u64>,
    /// The quarantine records waiting for review, by key, and their devices: those this node
    /// held, and on a shared store those other nodes held, as its follower reads them, so
    /// that a device's quota is one count across the nodes and a review anywhere makes room.
    pending: HashMap<String, String>,
    /// Parsed device keys: checking a key (prime order, canonical) costs a scalar
    /// multiplication, so it is done once per device, not per message. Only
    /// [`State::device_keys`] fills it and [`State::put_device`] empties it.
    keys: HashMap<String, DeviceKeys>,
    /// Which devices name each key thumbprint, as their key or their previous one: one each,
    /// unless records stored before key claims shared a key.
    key_holders: HashMap<String, Vec<String>>,
}

impl State {
    /// Makes `device` the registry's record for its ID, forgetting the keys parsed from the
    /// one it replaces: every change of a device record goes through here, so no message is
    /// ever verified with a key the record no longer holds.
    pub fn put_device(&mut self, device: Device) {
        self.keys.remove(&device.id);
        for thumbprint in device.thumbprints() {
            let holders = self.key_holders.entry(thumbprint.to_owned()).or_default();
            if !holders.contains(&device.id) {
                holders.push(device.id.clone());
            }
        }
        if let Some(old) = self.devices.insert(device.id.clone(), device) {
            self.release_keys(&old);
        }
    }

    pub fn remove_device(&mut self, id: &str) {
        self.keys.remove(id);
        if let Some(old) = self.devices.remove(id) {
            self.release_keys(&old);
        }
    }

    /// Forgets that `old`'s device holds the keys `old` names and its current record does not.
    fn release_keys(&mut self, old: &Device) {
        let current = self.devices.get(&old.id);
        for thumbprint in old.thumbprints() {
            if current.is_some_and(|d| d.thumbprints().any(|t| t == thumbprint)) {
                continue;
            }
            if let Some(holders) = self.key_holders.get_mut(thumbprint) {
                holders.retain(|h| *h != old.id);
                if holders.is_empty() {
                    self.key_holders.remove(thumbprint);
                }
            }
        }
    }

    /// Readings `device` has waiting for review.
    pub fn held(&self, device: &str) -> u64 {
        self.held.get(device).copied().unwrap_or(0)
    }

    /// Counts quarantine record `key` of `device` as waiting for review (once, however often
    /// it is seen).
    pub fn hold(&mut self, key: String, device: &str) {
        if self.pending.insert(key, device.to_owned()).is_none() {
            *self.held.entry(device.to_owned()).or_default() += 1;
        }
    }

    /// Counts quarantine record `key` as no longer waiting (reviewed, or never stored).
    pub fn unhold(&mut self, key: &str) {
        if let Some(device) = self.pending.remove(key)
            && let Some(held) = self.held.get_mut(&device)
        {
            *held = held.saturating_sub(1);
            if *held == 0 {
                self.held.remove(&device);
            }
        }
    }

    /// The quarantine records counted as waiting.
    pub fn pending_keys(&self) -> impl Iterator<Item = &String> {
        self.pending.keys()
    }

    /// Whether a device other than `id` names any of `thumbprints` as its key or previous key.
    pub fn key_held_by_another(&self, id: &str, thumbprints: &[String]) -> bool {
        thumbprints.iter().any(|t| {
            self.key_holders
                .get(t)
                .is_some_and(|holders| holders.iter().any(|h| h != id))
        })
    }

    /// The keys of device `id`'s record, parsed once.
    pub fn device_keys(&mut self, id: &str) -> Option<&DeviceKeys> {
        if !self.keys.contains_key(id) {
            let keys = self.devices.get(id)?.keys()?;
            self.keys.insert(id.to_owned(), keys);
        }
        self.keys.get(id)
    }

    pub fn group_for(&self, twin: &str, name: &str) -> Option<&SensorGroup> {
        self.groups
            .values()
            .find(|g| g.twin == twin && g.property == name)
    }

    /// The policy for `name` on a twin of `model` (or of a model it extends).
    pub fn policy_for(&self, models: &[String], name: &str) -> Option<&Policy> {
        self.policies
            .values()
            .find(|p| p.property == name && models.contains(&p.model))
    }
}

/// A decision the pipeline took on its own that belongs in the audit trail (see
/// [`Telemetry::set_audit_sink`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TelemetryEvent {
    pub event: &'static str,
    pub device: String,
    pub detail: Value,
}

type AuditSink = Box<dyn Fn(TelemetryEvent) + Send + Sync>;

pub(crate) struct Inner {
    pub twins: TwinService,
    pub store: Arc<dyn Store>,
    pub history: HistoryStore,
    pub clock: Arc<dyn Clock>,
    /// The pipeline's own principal: telemetry writes at instance scope, nothing else.
    pub system: Principal,
    pub detector: DetectorConfig,
    pub state: Mutex<State>,
    /// History reads running, per principal and in all (see `manage::MAX_HISTORY_READS`).
    pub history_readers: twinguard_core::gate::Gate,
    pub history_slots: twinguard_core::gate::Gate,
    pub audit: std::sync::OnceLock<AuditSink>,
    /// This node's writes to records that other nodes change too (see [`crate::writes`]).
    pub writes: Arc<Mutex<Writes>>,
}

/// The trusted telemetry service. Cheap to clone.
#[derive(Clone)]
pub struct Telemetry {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("stored {0} record '{1}' is unreadable")]
    Corrupt(&'static str, String),
}

fn load<T: DeserializeOwned>(
    store: &dyn Store,
    table: Table,
    kind: &'static str,
) -> Result<Vec<(String, T)>, OpenError> {
    store
        .scan(table)?
        .into_iter()
        .map(|(key, bytes)| {
            serde_json::from_slice(&bytes)
                .map(|v| (key.clone(), v))
                .map_err(|_| OpenError::Corrupt(kind, key))
        })
        .collect()
}

/// Devices stored before keys were claimed in the store ([`Table::DeviceKeys`]) get their
/// claims; of two that shared a key from before, the first in ID order. Another node may claim
/// keys meanwhile (starting too, or registering): then the claims are decided again on what
/// the store holds.
fn claim_device_keys(
    store: &dyn Store,
    devices: &HashMap<String, Device>,
) -> Result<(), StoreError> {
    let mut ids: Vec<&String> = devices.keys().collect();
    ids.sort();
    for _ in 0..8 {
        // Claimed in the store, and then by the devices before in ID order.
        let mut claimed: std::collections::HashSet<String> = store
            .scan(Table::DeviceKeys)?
            .into_iter()
            .map(|(key, _)| key)
            .collect();
        let mut missing: Vec<Mutation> = Vec::new();
        for id in &ids {
            for thumbprint in devices[*id].thumbprints() {
                if claimed.insert(thumbprint.to_owned()) {
                    let holder = id.as_bytes().to_vec();
                    missing.push(Mutation::put(Table::DeviceKeys, thumbprint, holder));
                }
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        let absent: Vec<Expect> = missing
            .iter()
            .map(|m| Expect {
                table: Table::DeviceKeys,
                key: m.key.clone(),
                value: None,
            })
            .collect();
        if store.commit_expecting(&missing, &absent)? {
            tracing::info!(keys = missing.len(), "device keys claimed in the store");
            return Ok(());
        }
    }
    Err(StoreError(
        "the device keys' claims could not be committed: other writers kept committing first"
            .into(),
    ))
}

impl Telemetry {
    /// Loads the registry, policies, groups and replay windows from `store`, which must be the
    /// store `twins` commits to. Accepted readings' history is kept in `history` (see
    /// [`HistoryStore`]), which may be `store` itself; call [`Telemetry::spawn_history_merger`]
    /// to merge it in the background rather than only when it is read.
    pub fn open(
        twins: TwinService,
        store: Arc<dyn Store>,
        history: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, OpenError> {
        let history = HistoryStore::open(store.clone(), history)?;
        let system = Principal::with_roles("system:telemetry", &[TELEMETRY_WRITER]);
        // Merged records leave the log in the twin writer's group commits, beside the telemetry
        // writes, instead of in transactions of their own that those writes would wait behind.
        let (writer, trimmer) = (twins.clone(), system.clone());
        history.trim_through(move |deletes| {
            let op = WriteOp::ApplyReadings {
                updates: Vec::new(),
                records: deletes,
            };
            let trimmed = writer.submit(&trimmer, op).map(futures_executor::block_on);
            match trimmed {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) | Err(e) => Err(StoreError(format!(
                    "the twin writer did not take the history log trim: {e}"
                ))),
            }
        });
        let mut state = State::default();
        for (key, device) in load::<Device>(store.as_ref(), Table::Devices, "device")? {
            debug_assert_eq!(key, device.id);
            state.put_device(device);
        }
        claim_device_keys(store.as_ref(), &state.devices)?;
        for (key, list) in load::<FirmwareList>(store.as_ref(), Table::Firmware, "firmware")? {
            state.firmware.insert(key, list);
        }
        for (key, policy) in load::<Policy>(store.as_ref(), Table::Policies, "policy")? {
            state.policies.insert(key, policy);
        }
        for (key, group) in load::<SensorGroup>(store.as_ref(), Table::SensorGroups, "group")? {
            state.groups.insert(key, group);
        }
        let detector = DetectorConfig::default();
        for (key, bytes) in store.scan(Table::Streams)? {
            let mut parts = key.splitn(3, '\u{1f}');
            let (Some(device), Some(twin), Some(name)) = (parts.next(), parts.next(), parts.next())
            else {
                return Err(OpenError::Corrupt("stream", key));
            };
            let sensor = Sensor::from_bytes(&detector, &bytes)
                .ok_or_else(|| OpenError::Corrupt("stream", key.clone()))?;
            let id = (device.to_owned(), twin.to_owned(), name.to_owned());
            state.sensors.insert(id, sensor);
        }
        for (key, device) in stored_pending(store.as_ref())? {
            state.hold(key, &device);
        }
        for (key, bytes) in store.scan(Table::Replay)? {
            let window = ReplayWindow::from_bytes(&bytes)
                .ok_or_else(|| OpenError::Corrupt("replay", key.clone()))?;
            state.windows.insert(key, window);
        }
        Ok(Self {
            inner: Arc::new(Inner {
                twins,
                store,
                history,
                clock,
                system,
                detector,
                state: Mutex::new(state),
                history_readers: twinguard_core::gate::Gate::new(
                    crate::manage::MAX_HISTORY_READS_PER_PRINCIPAL,
                ),
                history_slots: twinguard_core::gate::Gate::new(crate::manage::MAX_HISTORY_READS),
                audit: std::sync::OnceLock::new(),
                writes: Arc::default(),
            }),
        })
    }

    /// Keeps accepted readings' history for `retention` after their measurement time; the
    /// background merger removes older records (see [`HistoryStore::keep_for`]).
    pub fn keep_history_for(&self, retention: std::time::Duration) {
        self.inner.history.keep_for(retention);
    }

    /// Starts merging the history log in the background (see [`HistoryStore`]).
    pub fn spawn_history_merger(&self) -> std::io::Result<()> {
        self.inner.history.spawn_merger()
    }

    /// The log record of an accepted reading's history (see [`HistoryStore`]).
    pub(crate) fn history_record(&self, key: &str, reading: &StoredReading) -> Mutation {
        self.inner
            .history
            .record(key, &serde_json::to_vec(reading).unwrap_or_default())
    }

    pub(crate) fn state(&self) -> DomainResult<MutexGuard<'_, State>> {
        self.inner
            .state
            .lock()
            .map_err(|_| DomainError::Internal("the telemetry state is poisoned"))
    }

    pub(crate) fn now_ms(&self) -> i64 {
        (self.inner.clock.now().unix_timestamp_nanos() / 1_000_000) as i64
    }

    pub(crate) fn now_rfc3339(&self) -> String {
        twinguard_core::clock::rfc3339(self.inner.clock.now())
    }

    /// The instant `seconds` from now, as [`Telemetry::now_rfc3339`] writes it.
    pub(crate) fn now_rfc3339_after(&self, seconds: u64) -> String {
        let seconds = time::Duration::seconds(i64::try_from(seconds).unwrap_or(i64::MAX));
        let later = self.inner.clock.now().saturating_add(seconds);
        twinguard_core::clock::rfc3339(later)
    }

    /// Queues twin updates and records as one durable write (see [`TwinService::submit`]).
    /// `expect`: the records the write was decided on (see [`Expect`]).
    pub(crate) fn submit(
        &self,
        updates: Vec<PropertyUpdate>,
        records: Vec<Mutation>,
        expect: Vec<Expect>,
    ) -> DomainResult<impl Future<Output = Answer> + Send + 'static> {
        let (pending, in_flight) = self.queue(updates, records, expect)?;
        Ok(async move {
            let answer = pending.await;
            drop(in_flight);
            answer
        })
    }

    /// [`Telemetry::submit`], with the write's mark as in flight (see [`crate::writes`]) handed
    /// to the caller, to drop once what the write changes in memory is changed.
    fn queue(
        &self,
        updates: Vec<PropertyUpdate>,
        records: Vec<Mutation>,
        expect: Vec<Expect>,
    ) -> DomainResult<(impl Future<Output = Answer> + Send + 'static, InFlight)> {
        let tracked: Vec<(Table, String)> = records
            .iter()
            .filter(|m| m.table.followed() || m.table == Table::Replay)
            .map(|m| (m.table, m.key.clone()))
            .collect();
        let pending = self.inner.twins.submit_expecting(
            &self.inner.system,
            WriteOp::ApplyReadings { updates, records },
            expect,
        )?;
        let in_flight = InFlight::track(self.inner.writes.clone(), tracked);
        let answer = async move {
            match pending.await? {
                WriteOutcome::Readings(results) => Ok(results),
                _ => Err(DomainError::Internal(
                    "a telemetry write produced no answer",
                )),
            }
        };
        Ok((answer, in_flight))
    }

    /// Runs a write to its end on a task of its own. The request that asked for it may be
    /// dropped once the write is queued (its client went away), and what follows the commit
    /// must still happen: the write taken into memory once it landed, or what was marked for
    /// it taken back if it failed. Dropped halfway, a node would keep a policy the store does
    /// not hold, or lack one it does, until it restarts.
    pub(crate) async fn to_the_end<T, F>(
        &self,
        write: impl FnOnce(Telemetry) -> F,
    ) -> DomainResult<T>
    where
        T: Send + 'static,
        F: Future<Output = DomainResult<T>> + Send + 'static,
    {
        tokio::spawn(write(self.clone()))
            .await
            .map_err(|_| DomainError::Internal("a telemetry write could not be run"))?
    }

    /// Runs `f` on the blocking pool, for store reads (a device's record, a reread): a read
    /// that waits for a database far away must not hold one of the runtime's threads.
    pub(crate) async fn off_the_runtime<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Self) -> DomainResult<T> + Send + 'static,
    ) -> DomainResult<T> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || f(&this))
            .await
            .map_err(|_| DomainError::Internal("a telemetry task could not be run"))?
    }

    /// Reads the replay windows and registry records of `devices` again from the store, as
    /// another node that shares it may have committed them since this one read them. Read
    /// without the state's lock, which ingestion waits for, and taken under it but for a
    /// record this node wrote since the read began (see [`crate::writes`]); those devices are
    /// returned, to be read again later.
    pub(crate) fn reload_devices(&self, devices: &[String]) -> DomainResult<Vec<String>> {
        let reading = Reading::begin(self.inner.writes.clone());
        let (mut busy, quiet): (Vec<String>, Vec<String>) = devices
            .iter()
            .cloned()
            .partition(|d| reading.in_flight(Table::Replay, d));
        let store = &self.inner.store;
        let windows = store
            .get_many(Table::Replay, &quiet)
            .map_err(reread_failed)?
            .into_iter()
            .zip(&quiet)
            .map(|(bytes, device)| {
                bytes
                    .map(|b| ReplayWindow::from_bytes(&b).ok_or_else(|| corrupt("replay", device)))
                    .transpose()
            })
            .collect::<DomainResult<Vec<_>>>()?;
        let records = parse_devices(
            devices,
            store
                .get_many(Table::Devices, devices)
                .map_err(reread_failed)?,
        )?;
        let mut state = self.state()?;
        for (device, window) in quiet.into_iter().zip(windows) {
            if reading.written_since(Table::Replay, &device) {
                busy.push(device);
                continue;
            }
            match window {
                Some(window) => {
                    state.windows.insert(device, window);
                }
                None => {
                    state.windows.remove(&device);
                }
            }
        }
        busy.extend(take_devices(&mut state, &reading, devices, records));
        busy.sort_unstable();
        busy.dedup();
        Ok(busy)
    }

    /// Reads `keys` of a followed table again from the store (see [`Follower`]) without the
    /// state's lock, and takes them under it; returns the keys this node wrote since the read
    /// began, left for later.
    fn reread(&self, table: Table, keys: &[String]) -> Result<Vec<String>, StoreError> {
        fn parse<T: DeserializeOwned>(
            key: &str,
            value: Option<Vec<u8>>,
        ) -> Result<Option<T>, StoreError> {
            value
                .map(|bytes| {
                    serde_json::from_slice(&bytes).map_err(|_| {
                        StoreError(format!("a stored telemetry record '{key}' is unreadable"))
                    })
                })
                .transpose()
        }
        fn take<T>(map: &mut HashMap<String, T>, key: String, value: Option<T>) {
            match value {
                Some(value) => {
                    map.insert(key, value);
                }
                None => {
                    map.remove(&key);
                }
            }
        }
        let unreadable = |e: DomainError| StoreError(e.to_string());
        let reading = Reading::begin(self.inner.writes.clone());
        if table == Table::Devices {
            let records =
                parse_devices(keys, self.inner.store.get_many(table, keys)?).map_err(unreadable)?;
            let mut state = self.state().map_err(unreadable)?;
            return Ok(take_devices(&mut state, &reading, keys, records));
        }
        let (mut busy, keys): (Vec<String>, Vec<String>) = keys
            .iter()
            .cloned()
            .partition(|k| reading.in_flight(table, k));
        let values = self.inner.store.get_many(table, &keys)?;
        let mut read = Vec::with_capacity(keys.len());
        for (key, value) in keys.into_iter().zip(values) {
            let value = match table {
                Table::Firmware => Read::Firmware(parse(&key, value)?),
                Table::Policies => Read::Policy(parse(&key, value)?),
                Table::SensorGroups => Read::Group(parse(&key, value)?),
                Table::Quarantine => Read::Held(
                    parse::<crate::records::Quarantined>(&key, value)?
                        .filter(|q| q.status == crate::records::Review::Pending)
                        .map(|q| q.device),
                ),
                _ => continue,
            };
            read.push((key, value));
        }
        let mut state = self.state().map_err(unreadable)?;
        for (key, value) in read {
            if reading.written_since(table, &key) {
                busy.push(key);
                continue;
            }
            match value {
                Read::Firmware(v) => take(&mut state.firmware, key, v),
                Read::Policy(v) => take(&mut state.policies, key, v),
                Read::Group(v) => take(&mut state.groups, key, v),
                Read::Held(Some(device)) => state.hold(key, &device),
                Read::Held(None) => state.unhold(&key),
            }
        }
        Ok(busy)
    }

    /// Where the pipeline's own decisions go (the server's audit trail). Called with the
    /// telemetry state locked: the sink must only queue the event. Set once; later calls are
    /// ignored.
    pub fn set_audit_sink(&self, sink: impl Fn(TelemetryEvent) + Send + Sync + 'static) {
        let _ = self.inner.audit.set(Box::new(sink));
    }

    pub(crate) fn report(&self, event: TelemetryEvent) {
        match self.inner.audit.get() {
            Some(sink) => sink(event),
            None => {
                tracing::warn!(event = event.event, device = %event.device, "no audit sink for a telemetry decision")
            }
        }
    }

    /// Stores the state of every stream that changed since the last checkpoint (3.3 KB each).
    /// The server calls it every [`CHECKPOINT_EVERY`] and at shutdown, so a crash costs a
    /// stream at most that much learning, never its whole history.
    pub async fn checkpoint(&self) -> DomainResult<usize> {
        let (pending, n) = {
            let mut state = self.state()?;
            let records: Vec<Mutation> = state
                .sensors
                .iter_mut()
                .filter(|(_, sensor)| sensor.dirty)
                .map(|((device, twin, name), sensor)| {
                    sensor.dirty = false;
                    let key = stream_key(device, twin, name);
                    Mutation::put(Table::Streams, &key, sensor.to_bytes())
                })
                .collect();
            if records.is_empty() {
                return Ok(0);
            }
            let n = records.len();
            (self.submit(Vec::new(), records, Vec::new()), n)
        };
        let stored = match pending {
            Ok(pending) => pending.await.map(|_| ()),
            Err(e) => Err(e),
        };
        if let Err(e) = stored {
            // Which ones did not land is unknown: all are written again next time.
            for sensor in self.state()?.sensors.values_mut() {
                sensor.dirty = true;
            }
            return Err(e);
        }
        Ok(n)
    }

    /// Commits `records` durably (firmware lists, policies, sensor groups) and, once they
    /// landed, applies them to memory with `apply`, under the state's lock and while the write
    /// is still in flight: a reread that began after the write settled then cannot read the
    /// store between the two and have its older view overwritten by `apply` (see
    /// [`crate::writes`]).
    pub(crate) async fn commit(
        &self,
        records: Vec<Mutation>,
        apply: impl FnOnce(&mut State),
    ) -> DomainResult<()> {
        let (pending, in_flight) = self.queue(Vec::new(), records, Vec::new())?;
        pending.await?;
        apply(&mut *self.state()?);
        drop(in_flight);
        Ok(())
    }
}

/// A telemetry write's answer: whether each twin update applied.
type Answer = DomainResult<Vec<Result<(), Skipped>>>;

/// A JSON record for the store.
pub(crate) fn put<T: Serialize>(table: Table, key: &str, value: &T) -> Mutation {
    Mutation::put(table, key, serde_json::to_vec(value).unwrap_or_default())
}

fn reread_failed(e: StoreError) -> DomainError {
    tracing::error!(error = %e, "cannot read telemetry records again");
    DomainError::Unavailable
}

fn corrupt(kind: &str, key: &str) -> DomainError {
    tracing::error!(kind, key, "a stored record read again is unreadable");
    DomainError::Internal("a stored telemetry record is unreadable")
}

/// A followed record as a reread read it.
enum Read {
    Firmware(Option<FirmwareList>),
    Policy(Option<Policy>),
    Group(Option<SensorGroup>),
    /// A quarantine record's device while it waits for review; `None` once reviewed or gone.
    Held(Option<String>),
}

/// Stored device records, parsed.
fn parse_devices(
    devices: &[String],
    records: Vec<Option<Vec<u8>>>,
) -> DomainResult<Vec<Option<Device>>> {
    devices
        .iter()
        .zip(records)
        .map(|(device, record)| {
            record
                .map(|bytes| serde_json::from_slice(&bytes).map_err(|_| corrupt("device", device)))
                .transpose()
        })
        .collect()
}

/// Takes the device records a reread read. A device this node wrote since the read began is
/// returned for later, but a suspension or revocation read for it holds at once: a status
/// that refuses more never waits.
fn take_devices(
    state: &mut State,
    reading: &Reading,
    devices: &[String],
    records: Vec<Option<Device>>,
) -> Vec<String> {
    let mut busy = Vec::new();
    for (device, stored) in devices.iter().zip(records) {
        if reading.written_since(Table::Devices, device) {
            busy.push(device.clone());
            if let (Some(stored), Some(known)) = (&stored, state.devices.get_mut(device))
                && stored.status != Status::Active
                && known.status != Status::Revoked
            {
                known.status = stored.status;
            }
            continue;
        }
        match stored {
            Some(stored) => {
                if state.devices.get(device) != Some(&stored) {
                    state.put_device(stored);
                }
            }
            None => state.remove_device(device),
        }
    }
    busy
}

/// The registry's tables and the replay windows, as other nodes sharing the store change them:
/// a device suspended or revoked on one node is refused on this one once its key is read.
impl Follower for Telemetry {
    fn follows(&self, table: Table) -> bool {
        FOLLOWED.contains(&table)
    }

    fn changed(&self, table: Table, keys: &[String]) -> Result<Vec<String>, StoreError> {
        self.reread(table, keys)
    }

    fn reload(&self) -> Result<Vec<(Table, String)>, StoreError> {
        let mut busy = Vec::new();
        for table in FOLLOWED {
            let stored: Vec<String> = match table {
                // The quarantine keeps every decided record too: only those waiting count.
                Table::Quarantine => stored_pending(self.inner.store.as_ref())?
                    .into_iter()
                    .map(|(key, _)| key)
                    .collect(),
                _ => self
                    .inner
                    .store
                    .scan(table)?
                    .into_iter()
                    .map(|(key, _)| key)
                    .collect(),
            };
            let known: Vec<String> = {
                let state = self.state().map_err(|e| StoreError(e.to_string()))?;
                match table {
                    Table::Devices => state.devices.keys().cloned().collect(),
                    Table::Firmware => state.firmware.keys().cloned().collect(),
                    Table::Policies => state.policies.keys().cloned().collect(),
                    Table::SensorGroups => state.groups.keys().cloned().collect(),
                    Table::Quarantine => state.pending_keys().cloned().collect(),
                    _ => Vec::new(),
                }
            };
            let mut keys = stored;
            keys.extend(known);
            keys.sort_unstable();
            keys.dedup();
            busy.extend(self.reread(table, &keys)?.into_iter().map(|k| (table, k)));
        }
        Ok(busy)
    }
}

/// The quarantine records waiting for review, with their devices, read a page at a time (the
/// table keeps every decided record too).
fn stored_pending(store: &dyn Store) -> Result<Vec<(String, String)>, StoreError> {
    let mut pending = Vec::new();
    twinguard_core::store::for_each_record(store, Table::Quarantine, 1_000, |key, bytes| {
        if let Ok(q) = serde_json::from_slice::<crate::records::Quarantined>(&bytes)
            && q.status == crate::records::Review::Pending
        {
            pending.push((key, q.device));
        }
        Ok::<_, StoreError>(())
    })?;
    Ok(pending)
}

/// The tables the telemetry service keeps in memory and other nodes may change.
const FOLLOWED: [Table; 5] = [
    Table::Devices,
    Table::Firmware,
    Table::Policies,
    Table::SensorGroups,
    Table::Quarantine,
];

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::State;
    use crate::registry::{Device, PreviousKey, Status};

    fn device(id: usize, key: usize, previous: Option<usize>) -> Device {
        Device {
            id: format!("d{id}"),
            public_key: serde_json::Value::Null,
            key_thumbprint: format!("k{key}"),
            previous_key: previous.map(|p| PreviousKey {
                public_key: serde_json::Value::Null,
                key_thumbprint: format!("k{p}"),
                until: String::new(),
            }),
            device_model: "m".into(),
            bindings: Vec::new(),
            status: Status::Active,
            firmware: None,
            suspect: None,
            quarantine_full: None,
            created: String::new(),
        }
    }

    /// What the index replaces: every other device's keys, scanned.
    fn scanned(state: &State, id: &str, thumbprints: &[String]) -> bool {
        state
            .devices
            .values()
            .filter(|d| d.id != id)
            .flat_map(Device::thumbprints)
            .any(|t| thumbprints.iter().any(|mine| mine == t))
    }

    proptest! {
        /// Over any sequence of records put (new keys, rotations with and without a previous
        /// key, two devices sharing a key as records stored before claims may) and removed, the
        /// key index answers exactly what scanning the registry answers, for every device and
        /// key, and holds no key that no record names.
        #[test]
        fn the_key_index_answers_what_a_scan_of_the_registry_answers(
            steps in proptest::collection::vec(
                (0usize..5, 0usize..6, proptest::option::of(0usize..6), any::<bool>()),
                1..40,
            )
        ) {
            let mut state = State::default();
            for (id, key, previous, remove) in steps {
                if remove {
                    state.remove_device(&format!("d{id}"));
                } else {
                    state.put_device(device(id, key, previous));
                }
                for id in (0..5).map(|i| format!("d{i}")) {
                    for key in (0..6).map(|k| vec![format!("k{k}")]) {
                        prop_assert_eq!(
                            state.key_held_by_another(&id, &key),
                            scanned(&state, &id, &key),
                            "{} asking for {:?}", id, key
                        );
                    }
                }
                let named: std::collections::HashSet<&str> =
                    state.devices.values().flat_map(Device::thumbprints).collect();
                prop_assert!(state.key_holders.keys().all(|k| named.contains(k.as_str())));
            }
        }
    }
}
