//! Administration of the telemetry plane: devices, firmware allowlists, validation policies,
//! sensor groups, quarantine review and history reads. Every operation authorizes the caller
//! here, in the domain; changes are committed durably before they take effect or are answered.

use ed25519_dalek::pkcs8::spki::der::zeroize::Zeroizing;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use twinguard_core::auth::{Action, Principal};
use twinguard_core::error::{DomainError, DomainResult};
use twinguard_core::store::{Expect, Mutation, Table};

use crate::envelope::{DeviceKey, generate_key};
use crate::fusion::SensorGroup;
use crate::history_page::{HistoryCursor, HistoryWindow, OpenBucket};
use crate::ingest::rfc3339_ms;
use crate::policy::Policy;
use crate::records::{Bucket, HistoryEntry, Quarantined, Review, history_bound, history_entry};
use crate::registry::{Binding, Device, FirmwareList, PreviousKey, Status, check_device_id};
use crate::service::{State, Telemetry, put};

/// A device to register: either its public key (a JWK object or an SPKI PEM string) or
/// `"generate": true` for a key pair made here, whose private key is handed out once.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewDevice {
    #[serde(default)]
    pub public_key: Option<Value>,
    #[serde(default)]
    pub generate: bool,
    pub device_model: String,
    #[serde(default)]
    pub bindings: Vec<Binding>,
}

/// A device's new key (see [`Telemetry::rotate_device_key`]): its public key or
/// `"generate": true`, and how long the old key stays accepted.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewKey {
    #[serde(default)]
    pub public_key: Option<Value>,
    #[serde(default)]
    pub generate: bool,
    /// Seconds the old key stays accepted; 0 (the default) refuses it at once.
    #[serde(default)]
    pub overlap_seconds: u64,
}

/// The longest a rotated-out device key stays accepted: 30 days.
pub const MAX_KEY_OVERLAP_SECONDS: u64 = 30 * 24 * 3600;

#[derive(Debug)]
pub struct Registered {
    pub device: Device,
    /// PKCS#8 PEM, present only when the key pair was generated here; shown once, kept nowhere.
    pub private_key: Option<Zeroizing<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusChange {
    Suspend,
    /// Back to active; also clears a suspect mark.
    Resume,
    Revoke,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    Release,
    Discard,
}

/// A history read: raw readings, or buckets when an interval is given.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct History {
    pub twin: String,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub readings: Option<Vec<HistoryEntry>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub buckets: Option<Vec<Bucket>>,
    /// True when `limit` cut the answer short.
    pub truncated: bool,
}

/// Which part of a history to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryQuery {
    pub from_ms: i64,
    pub to_ms: i64,
    /// Bucket width for downsampling; `None` returns raw readings.
    pub interval_ms: Option<i64>,
    /// Most raw readings returned.
    pub limit: usize,
}

/// Most readings one history page returns (and the largest `limit`).
pub const MAX_HISTORY: usize = 10_000;
/// Most buckets one summarised history page returns: with about 150 bytes a bucket, well under
/// [`MAX_HISTORY_PAGE_BYTES`].
pub const MAX_HISTORY_BUCKETS: usize = 10_000;
/// Most stored readings one history page reads; the next page continues after them.
pub const MAX_HISTORY_SCAN: usize = 100_000;
/// Serialized bytes of one history page's readings: the page ends before they would pass it
/// (it always holds one reading).
pub const MAX_HISTORY_PAGE_BYTES: usize = 4 * 1024 * 1024;
/// Stored readings read from the history store at a time, within a page.
const HISTORY_CHUNK: usize = 1_000;

/// Times a device change is decided again after another node changed the device first.
const CHANGE_ATTEMPTS: usize = 4;
/// History reads one principal may run at once; one more is refused with `Busy` (429).
pub const MAX_HISTORY_READS_PER_PRINCIPAL: usize = 2;
/// History reads the server runs at once in all: each holds at most a page
/// ([`MAX_HISTORY_PAGE_BYTES`] of readings or [`MAX_HISTORY_BUCKETS`] buckets, and a chunk of
/// [`HISTORY_CHUNK`] stored rows).
pub const MAX_HISTORY_READS: usize = 4;

/// Most quarantine records one quarantine page reads, whatever their status.
pub const MAX_QUARANTINE_SCAN: usize = 10_000;

/// A page of the quarantine list.
#[derive(Debug)]
pub struct QuarantinePage {
    /// The records found, in key order.
    pub items: Vec<Quarantined>,
    /// Set when the scan bound ended the page before `limit` records were found: the last key
    /// read, after which the next page starts.
    pub resume_after: Option<String>,
}

/// One page of a history read and where the next continues (`None` on the last page).
#[derive(Debug)]
pub struct HistoryPage {
    pub history: History,
    pub next: Option<HistoryCursor>,
    /// Stored readings this page read.
    pub scanned: usize,
}

fn not_found(kind: &'static str, id: &str) -> DomainError {
    DomainError::NotFound {
        kind,
        id: id.to_owned(),
    }
}

fn check_name(kind: &str, id: &str) -> DomainResult<()> {
    check_device_id(id).map_err(|_| {
        DomainError::InvalidArgument(format!(
            "a {kind} ID is 1 to 128 characters of A-Z, a-z, 0-9, '.', '_', ':' and '-'"
        ))
    })
}

impl Telemetry {
    // ---- devices ----

    pub async fn register_device(
        &self,
        caller: &Principal,
        id: &str,
        new: NewDevice,
    ) -> DomainResult<Registered> {
        caller.authorize_instance(Action::DevicesWrite)?;
        check_name("device", id)?;
        check_name("device model", &new.device_model)?;
        let (key, private_key) = new_key(new.public_key, new.generate)?;
        check_bindings(&new.bindings)?;
        self.authorize_feeding(caller, new.bindings.iter().map(|b| b.twin.as_str()))?;
        let device = Device {
            id: id.to_owned(),
            public_key: key.to_jwk(),
            key_thumbprint: key.thumbprint(),
            previous_key: None,
            device_model: new.device_model,
            bindings: new.bindings,
            status: Status::Active,
            firmware: None,
            suspect: None,
            quarantine_full: None,
            created: self.now_rfc3339(),
        };
        let claims = self.key_claims(id, None, &device).await?;
        let pending = {
            let mut state = self.state()?;
            if state.devices.contains_key(id) {
                return Err(already_registered(id));
            }
            keys_unused(&state, id, &claims.claimed)?;
            let mut expect = claims.expect;
            expect.push(Expect {
                table: Table::Devices,
                key: id.to_owned(),
                value: None,
            });
            let mut records = claims.records;
            records.push(put(Table::Devices, id, &device));
            let pending = self.submit(Vec::new(), records, expect)?;
            state.put_device(device.clone());
            pending
        };
        let (key, claimed) = (id.to_owned(), claims.claimed);
        self.to_the_end(move |this| async move {
            let Err(e) = pending.await else {
                return Ok(());
            };
            this.state()?.remove_device(&key);
            if !matches!(e, DomainError::Superseded) {
                return Err(e);
            }
            // Another node registered this ID or claimed this key first (this node had not
            // followed it yet): say which.
            let stored = this.stored(Table::Devices, vec![key.clone()]).await?;
            if stored.first().is_some_and(Option::is_some) {
                return Err(already_registered(&key));
            }
            if this.claimed_by_another(&key, claimed).await? {
                return Err(key_taken());
            }
            Err(e)
        })
        .await?;
        tracing::info!(device = %id, "device registered");
        Ok(Registered {
            device,
            private_key,
        })
    }

    /// The devices the caller may see (see [`Scoped::device`]), ordered by ID.
    pub fn devices(&self, caller: &Principal) -> DomainResult<Vec<Device>> {
        caller.authorize(Action::DevicesRead)?;
        let scoped = self.scoped(caller);
        let mut all: Vec<Device> = self
            .state()?
            .devices
            .values()
            .filter_map(|d| scoped.device(d))
            .collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(all)
    }

    /// A device the caller may see; one it may not is answered as absent.
    pub fn device(&self, caller: &Principal, id: &str) -> DomainResult<Device> {
        caller.authorize(Action::DevicesRead)?;
        let scoped = self.scoped(caller);
        let state = self.state()?;
        let device = state
            .devices
            .get(id)
            .ok_or_else(|| not_found("device", id))?;
        scoped
            .device(device)
            .ok_or_else(|| DomainError::Hidden(Box::new(not_found("device", id))))
    }

    /// A device bound to a twin, or a sensor group on it, feeds that twin signed readings that
    /// move its properties. So the devices permission alone must not bind one: whoever does must
    /// also hold `twinguard/telemetry/write` on every twin fed (instance-wide, or in a scope that
    /// covers the twin as it is now). A twin that does not exist, or lies outside the caller's
    /// scope, is refused alike.
    fn authorize_feeding<'t>(
        &self,
        caller: &Principal,
        twins: impl Iterator<Item = &'t str>,
    ) -> DomainResult<()> {
        if caller.holds_everywhere(Action::TelemetryWrite) {
            return caller.authorize(Action::TelemetryWrite);
        }
        let graph = self.inner.twins.snapshot();
        for twin in twins {
            let writable = graph
                .twin(twin)
                .is_some_and(|t| caller.may_twin(&graph, Action::TelemetryWrite, t));
            if !writable {
                return Err(DomainError::Forbidden {
                    action: Action::TelemetryWrite.as_str(),
                });
            }
        }
        Ok(())
    }

    fn scoped<'a>(&self, caller: &'a Principal) -> Scoped<'a> {
        Scoped {
            caller,
            graph: (!caller.holds_everywhere(Action::DevicesRead))
                .then(|| self.inner.twins.snapshot()),
        }
    }

    pub async fn set_bindings(
        &self,
        caller: &Principal,
        id: &str,
        bindings: Vec<Binding>,
    ) -> DomainResult<Device> {
        caller.authorize_instance(Action::DevicesWrite)?;
        check_bindings(&bindings)?;
        self.authorize_feeding(caller, bindings.iter().map(|b| b.twin.as_str()))?;
        self.change_device(id, move |d| {
            d.bindings = bindings.clone();
            Ok(())
        })
        .await
    }

    /// Suspends, resumes or revokes a device. The change applies to the next message the
    /// device sends, on every transport; a revocation cannot be undone.
    pub async fn set_status(
        &self,
        caller: &Principal,
        id: &str,
        change: StatusChange,
    ) -> DomainResult<Device> {
        caller.authorize_instance(Action::DevicesWrite)?;
        let device = self
            .change_device(id, move |d| {
                refuse_revoked(d)?;
                match change {
                    StatusChange::Suspend => d.status = Status::Suspended,
                    StatusChange::Resume => {
                        d.status = Status::Active;
                        d.suspect = None;
                        d.quarantine_full = None;
                    }
                    StatusChange::Revoke => d.status = Status::Revoked,
                }
                Ok(())
            })
            .await?;
        tracing::warn!(device = %id, status = ?device.status, "device status changed");
        Ok(device)
    }

    /// Gives a device a new key (control DI-3): one generated here, whose private key is handed
    /// out once, or the public half of one the device made. The old key stays accepted for
    /// `overlap_seconds` (at most [`MAX_KEY_OVERLAP_SECONDS`]; 0 refuses it from the next
    /// message on, for a key that may have leaked), so a device that switches keys loses no
    /// message; a rotation during an overlap ends the older key's at once, and a rotation back
    /// to the previous key is a rotation like any other. The replay window
    /// is the device's, not the key's, so no message counts twice across the change. A revoked
    /// device keeps its refusal; a suspended one may be rotated before it is resumed.
    pub async fn rotate_device_key(
        &self,
        caller: &Principal,
        id: &str,
        new: NewKey,
    ) -> DomainResult<Registered> {
        caller.authorize_instance(Action::DevicesWrite)?;
        if new.overlap_seconds > MAX_KEY_OVERLAP_SECONDS {
            return Err(DomainError::InvalidArgument(format!(
                "overlapSeconds is at most {MAX_KEY_OVERLAP_SECONDS} (30 days)"
            )));
        }
        let (key, private_key) = new_key(new.public_key, new.generate)?;
        let thumbprint = key.thumbprint();
        let until = self.now_rfc3339_after(new.overlap_seconds);
        let jwk = key.to_jwk();
        let device = self
            .change_device(id, move |d| {
                refuse_revoked(d)?;
                if d.key_thumbprint == thumbprint {
                    return Err(DomainError::Conflict(
                        "this is the device's key already; a rotation needs a new key".into(),
                    ));
                }
                let old = std::mem::replace(&mut d.public_key, jwk.clone());
                let old_thumbprint = std::mem::replace(&mut d.key_thumbprint, thumbprint.clone());
                d.previous_key = (new.overlap_seconds > 0).then(|| PreviousKey {
                    public_key: old,
                    key_thumbprint: old_thumbprint,
                    until: until.clone(),
                });
                Ok(())
            })
            .await?;
        tracing::warn!(device = %id, overlap_seconds = new.overlap_seconds, "device key rotated");
        Ok(Registered {
            device,
            private_key,
        })
    }

    /// Ends a key rotation's overlap now: the device's previous key is refused from the next
    /// message on. A device without one is answered as it is.
    pub async fn retire_previous_key(&self, caller: &Principal, id: &str) -> DomainResult<Device> {
        caller.authorize_instance(Action::DevicesWrite)?;
        let device = self
            .change_device(id, |d| {
                refuse_revoked(d)?;
                d.previous_key = None;
                Ok(())
            })
            .await?;
        tracing::warn!(device = %id, "device's previous key retired");
        Ok(device)
    }

    /// Applies `f` to a device, commits it, and makes it current; the lock is held while the
    /// write is queued so the store sees changes in the order the state does. Decided on the
    /// record as the store holds it and committed only if the store still holds that (on a
    /// store several nodes share, another node may have changed it: then it is read and
    /// decided again), so a change made here never undoes one made there, such as a
    /// suspension.
    /// Runs to its end even if the request is dropped (see [`Telemetry::to_the_end`]): a
    /// change that failed is read again from the store, not left in memory.
    async fn change_device(
        &self,
        id: &str,
        f: impl Fn(&mut Device) -> DomainResult<()> + Send + 'static,
    ) -> DomainResult<Device> {
        let id = id.to_owned();
        self.to_the_end(move |this| async move { this.change_device_here(&id, f).await })
            .await
    }

    async fn change_device_here(
        &self,
        id: &str,
        f: impl Fn(&mut Device) -> DomainResult<()>,
    ) -> DomainResult<Device> {
        for _ in 0..CHANGE_ATTEMPTS {
            // Read and decided before the lock, which ingestion waits for: a change of this
            // node landing in between breaks the expectation below, and the change is decided
            // again.
            let stored = self
                .stored(Table::Devices, vec![id.to_owned()])
                .await?
                .pop()
                .flatten()
                .ok_or_else(|| not_found("device", id))?;
            let before: Device = serde_json::from_slice(&stored)
                .map_err(|_| DomainError::Internal("a stored device record is unreadable"))?;
            let mut after = before.clone();
            f(&mut after)?;
            let claims = self.key_claims(id, Some(&before), &after).await?;
            let pending = {
                let mut state = self.state()?;
                keys_unused(&state, id, &claims.claimed)?;
                let mut records = claims.records;
                records.push(put(Table::Devices, id, &after));
                let mut expect = claims.expect;
                expect.push(Expect {
                    table: Table::Devices,
                    key: id.to_owned(),
                    value: Some(stored),
                });
                let pending = self.submit(Vec::new(), records, expect)?;
                state.put_device(after.clone());
                pending
            };
            match pending.await {
                Ok(_) => return Ok(after),
                Err(e) => {
                    // What the store holds now, rather than what this node believed before:
                    // another node may have changed the device meanwhile.
                    let key = id.to_owned();
                    let reloaded = self
                        .off_the_runtime(move |this| this.reload_devices(&[key]))
                        .await;
                    if let Err(read) = reloaded {
                        tracing::warn!(error = %read, device = %id, "a device change failed and the device could not be read again; it is as the store last held it");
                        self.state()?.put_device(before);
                    }
                    if !matches!(e, DomainError::Superseded) {
                        return Err(e);
                    }
                    if self.claimed_by_another(id, claims.claimed).await? {
                        return Err(key_taken());
                    }
                }
            }
        }
        Err(DomainError::Unavailable)
    }

    /// What changing device `id`'s record from `before` (`None` for a registration) to
    /// `after` does to the store's key claims ([`Table::DeviceKeys`]): a key the record comes
    /// to name is claimed expecting no claim, so no two devices hold one key even when two
    /// nodes decide at once and neither has followed the other; a key it no longer names is
    /// released if this device holds its claim (a key two devices shared before keys were
    /// claimed stays with the one that got the claim).
    async fn key_claims(
        &self,
        id: &str,
        before: Option<&Device>,
        after: &Device,
    ) -> DomainResult<KeyClaims> {
        let held: Vec<&str> = before.map_or_else(Vec::new, |d| d.thumbprints().collect());
        let named: Vec<&str> = after.thumbprints().collect();
        let fresh = |of: &[&str], not_in: &[&str]| -> Vec<String> {
            of.iter()
                .filter(|t| !not_in.contains(t))
                .map(|t| t.to_string())
                .collect()
        };
        let (claimed, released) = (fresh(&named, &held), fresh(&held, &named));
        let mut claims = KeyClaims {
            records: Vec::new(),
            expect: Vec::new(),
            claimed: claimed.clone(),
        };
        for thumbprint in claimed {
            let holder = id.as_bytes().to_vec();
            claims
                .records
                .push(Mutation::put(Table::DeviceKeys, thumbprint.clone(), holder));
            claims.expect.push(Expect {
                table: Table::DeviceKeys,
                key: thumbprint,
                value: None,
            });
        }
        if released.is_empty() {
            return Ok(claims);
        }
        let holders = self.stored(Table::DeviceKeys, released.clone()).await?;
        for (thumbprint, holder) in released.into_iter().zip(holders) {
            if holder.as_deref() == Some(id.as_bytes()) {
                claims
                    .records
                    .push(Mutation::delete(Table::DeviceKeys, thumbprint.clone()));
                claims.expect.push(Expect {
                    table: Table::DeviceKeys,
                    key: thumbprint,
                    value: holder,
                });
            }
        }
        Ok(claims)
    }

    /// Whether the store holds a claim on one of `thumbprints` for a device other than `id`.
    async fn claimed_by_another(&self, id: &str, thumbprints: Vec<String>) -> DomainResult<bool> {
        if thumbprints.is_empty() {
            return Ok(false);
        }
        let holders = self.stored(Table::DeviceKeys, thumbprints).await?;
        Ok(holders.iter().flatten().any(|h| h != id.as_bytes()))
    }

    /// Records `keys` of `table` as the store holds them, read on the blocking pool: a
    /// database read that takes long must not hold one of the runtime's threads.
    async fn stored(&self, table: Table, keys: Vec<String>) -> DomainResult<Vec<Option<Vec<u8>>>> {
        self.off_the_runtime(move |this| {
            this.inner.store.get_many(table, &keys).map_err(|e| {
                tracing::error!(error = %e, table = table.name(), "cannot read a record");
                DomainError::Unavailable
            })
        })
        .await
    }

    // ---- firmware ----

    pub async fn put_firmware(
        &self,
        caller: &Principal,
        device_model: &str,
        mut list: FirmwareList,
    ) -> DomainResult<FirmwareList> {
        caller.authorize_instance(Action::DevicesWrite)?;
        check_name("device model", device_model)?;
        list.device_model = device_model.to_owned();
        list.check_definition()
            .map_err(DomainError::InvalidArgument)?;
        let key = device_model.to_owned();
        self.to_the_end(move |this| async move {
            this.commit(vec![put(Table::Firmware, &key, &list)], |state| {
                state.firmware.insert(key.clone(), list.clone());
            })
            .await?;
            Ok(list)
        })
        .await
    }

    /// Firmware allowlists; for a scoped caller, those of the device models of devices it may
    /// see.
    pub fn firmware(&self, caller: &Principal) -> DomainResult<Vec<FirmwareList>> {
        caller.authorize(Action::DevicesRead)?;
        let scoped = self.scoped(caller);
        let state = self.state()?;
        let models: Option<std::collections::HashSet<&str>> = scoped.graph.is_some().then(|| {
            state
                .devices
                .values()
                .filter(|d| scoped.device(d).is_some())
                .map(|d| d.device_model.as_str())
                .collect()
        });
        let mut all: Vec<_> = state
            .firmware
            .values()
            .filter(|f| {
                models
                    .as_ref()
                    .is_none_or(|m| m.contains(f.device_model.as_str()))
            })
            .cloned()
            .collect();
        all.sort_by(|a, b| a.device_model.cmp(&b.device_model));
        Ok(all)
    }

    // ---- policies ----

    pub async fn put_policy(
        &self,
        caller: &Principal,
        id: &str,
        mut policy: Policy,
    ) -> DomainResult<Policy> {
        caller.authorize_instance(Action::DevicesWrite)?;
        check_name("policy", id)?;
        policy.id = id.to_owned();
        policy
            .check_definition()
            .map_err(DomainError::InvalidArgument)?;
        {
            let state = self.state()?;
            if state
                .policies
                .values()
                .any(|p| p.id != id && p.model == policy.model && p.property == policy.property)
            {
                return Err(DomainError::Conflict(
                    "another policy already covers this model and property".into(),
                ));
            }
        }
        let key = id.to_owned();
        self.to_the_end(move |this| async move {
            this.commit(vec![put(Table::Policies, &key, &policy)], |state| {
                state.policies.insert(key.clone(), policy.clone());
            })
            .await?;
            Ok(policy)
        })
        .await
    }

    /// Validation policies; for a scoped caller, those whose model it may see.
    pub fn policies(&self, caller: &Principal) -> DomainResult<Vec<Policy>> {
        caller.authorize(Action::DevicesRead)?;
        let scoped = self.scoped(caller);
        let mut all: Vec<_> = self
            .state()?
            .policies
            .values()
            .filter(|p| scoped.model(&p.model))
            .cloned()
            .collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(all)
    }

    pub async fn delete_policy(&self, caller: &Principal, id: &str) -> DomainResult<()> {
        caller.authorize_instance(Action::DevicesWrite)?;
        if !self.state()?.policies.contains_key(id) {
            return Err(not_found("policy", id));
        }
        let key = id.to_owned();
        self.to_the_end(move |this| async move {
            this.commit(vec![Mutation::delete(Table::Policies, &key)], |state| {
                state.policies.remove(&key);
            })
            .await
        })
        .await
    }

    // ---- sensor groups ----

    pub async fn put_group(
        &self,
        caller: &Principal,
        id: &str,
        mut group: SensorGroup,
    ) -> DomainResult<SensorGroup> {
        caller.authorize_instance(Action::DevicesWrite)?;
        check_name("sensor group", id)?;
        self.authorize_feeding(caller, std::iter::once(group.twin.as_str()))?;
        group.id = id.to_owned();
        group
            .check_definition()
            .map_err(DomainError::InvalidArgument)?;
        {
            let state = self.state()?;
            if state
                .groups
                .values()
                .any(|g| g.id != id && g.twin == group.twin && g.property == group.property)
            {
                return Err(DomainError::Conflict(
                    "another sensor group already feeds this property".into(),
                ));
            }
        }
        let key = id.to_owned();
        self.to_the_end(move |this| async move {
            this.commit(vec![put(Table::SensorGroups, &key, &group)], |state| {
                state.groups.insert(key.clone(), group.clone());
            })
            .await?;
            Ok(group)
        })
        .await
    }

    /// Sensor groups; for a scoped caller, those feeding a twin it may see.
    pub fn groups(&self, caller: &Principal) -> DomainResult<Vec<SensorGroup>> {
        caller.authorize(Action::DevicesRead)?;
        let scoped = self.scoped(caller);
        let mut all: Vec<_> = self
            .state()?
            .groups
            .values()
            .filter(|g| scoped.twin(&g.twin))
            .cloned()
            .collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(all)
    }

    pub async fn delete_group(&self, caller: &Principal, id: &str) -> DomainResult<()> {
        caller.authorize_instance(Action::DevicesWrite)?;
        if !self.state()?.groups.contains_key(id) {
            return Err(not_found("sensor group", id));
        }
        let key = id.to_owned();
        self.to_the_end(move |this| async move {
            this.commit(vec![Mutation::delete(Table::SensorGroups, &key)], |state| {
                state.groups.remove(&key);
            })
            .await
        })
        .await
    }

    // ---- quarantine ----

    /// Quarantined readings in arrival order, `status` only (pending by default), at most
    /// `limit`, starting after the key `after`.
    pub fn quarantine(
        &self,
        caller: &Principal,
        status: Option<Review>,
        after: Option<&str>,
        limit: usize,
    ) -> DomainResult<Vec<Quarantined>> {
        Ok(self.quarantine_page(caller, status, after, limit)?.items)
    }

    /// Up to `limit` quarantined readings with `status` (default pending) after the key
    /// `after`, in key (arrival) order, reading at most [`MAX_QUARANTINE_SCAN`] records: decided
    /// records are read and skipped, so a long history of them does not make one page read them
    /// all. When the scan bound ends the page, `resume_after` is the last key read.
    pub fn quarantine_page(
        &self,
        caller: &Principal,
        status: Option<Review>,
        after: Option<&str>,
        limit: usize,
    ) -> DomainResult<QuarantinePage> {
        caller.authorize_instance(Action::QuarantineReview)?;
        let status = status.unwrap_or(Review::Pending);
        let mut from = after.map(|a| format!("{a}\u{0}")).unwrap_or_default();
        let mut items = Vec::new();
        let mut scanned = 0usize;
        // Read in store pages so a long history of decided records does not load at once.
        while scanned < MAX_QUARANTINE_SCAN {
            let page = self
                .inner
                .store
                .range(
                    Table::Quarantine,
                    &from,
                    "\u{7f}",
                    1_000.min(MAX_QUARANTINE_SCAN - scanned),
                )
                .map_err(|_| DomainError::Unavailable)?;
            let Some((last, _)) = page.last() else {
                return Ok(QuarantinePage {
                    items,
                    resume_after: None,
                });
            };
            from = format!("{last}\u{0}");
            for (key, bytes) in &page {
                scanned += 1;
                if let Ok(q) = serde_json::from_slice::<Quarantined>(bytes)
                    && q.status == status
                {
                    items.push(q);
                    if items.len() >= limit {
                        return Ok(QuarantinePage {
                            items,
                            resume_after: None,
                        });
                    }
                }
                if scanned == MAX_QUARANTINE_SCAN {
                    return Ok(QuarantinePage {
                        items,
                        resume_after: Some(key.clone()),
                    });
                }
            }
        }
        Ok(QuarantinePage {
            items,
            resume_after: None,
        })
    }

    pub fn quarantined(&self, caller: &Principal, id: &str) -> DomainResult<Quarantined> {
        caller.authorize_instance(Action::QuarantineReview)?;
        self.read_quarantined(id)
    }

    fn read_quarantined(&self, id: &str) -> DomainResult<Quarantined> {
        self.read_quarantined_stored(id).map(|(record, _)| record)
    }

    /// A quarantine record and its bytes as stored.
    fn read_quarantined_stored(&self, id: &str) -> DomainResult<(Quarantined, Vec<u8>)> {
        let found = self
            .inner
            .store
            .range(Table::Quarantine, id, &format!("{id}\u{0}"), 1)
            .map_err(|_| DomainError::Unavailable)?;
        found
            .into_iter()
            .find(|(k, _)| k == id)
            .and_then(|(_, bytes)| Some((serde_json::from_slice(&bytes).ok()?, bytes)))
            .ok_or_else(|| not_found("quarantined reading", id))
    }

    /// Releases a held reading or discards it. Either way the record stays, with who decided
    /// and when, and the device's quota gets the room back.
    ///
    /// A release cannot launder a reading: it is checked again as the pipeline would check a
    /// new one, now. The device must still be bound to write the name on the twin, the name
    /// must be a property or telemetry of the twin's model with a value that fits its schema,
    /// and the reviewer must hold the right to write that twin (`digitaltwins/write` or
    /// `twinguard/telemetry/write` covering it), not only the review permission. A reading
    /// that fails any of these can only be discarded. A released reading then goes the way of
    /// an accepted one: into the history, to its sensor group's fusion or to the twin unless a
    /// newer reading is shown, and into the stream's detector (a reviewer vouched for it).
    pub async fn review(
        &self,
        caller: &Principal,
        id: &str,
        decision: Decision,
    ) -> DomainResult<Quarantined> {
        caller.authorize_instance(Action::QuarantineReview)?;
        let (caller, id) = (caller.clone(), id.to_owned());
        self.to_the_end(move |this| async move { this.review_here(&caller, &id, decision).await })
            .await
    }

    /// [`Telemetry::review`], once the task runs to its end. A reading is reviewed once: the
    /// commit expects the record as it was read (pending), so of two reviews that both read it
    /// pending, on one node or on nodes sharing the store, the second to commit is refused as
    /// already reviewed and none of its effects reach the store. The device's quota gets its
    /// room back once the review is durable.
    async fn review_here(
        &self,
        caller: &Principal,
        id: &str,
        decision: Decision,
    ) -> DomainResult<Quarantined> {
        let reviewed = || DomainError::Conflict("the reading was already reviewed".into());
        let key = id.to_owned();
        let (mut record, stored) = self
            .off_the_runtime(move |this| this.read_quarantined_stored(&key))
            .await?;
        if record.status != Review::Pending {
            return Err(reviewed());
        }
        record.status = match decision {
            Decision::Release => Review::Released,
            Decision::Discard => Review::Discarded,
        };
        record.decided_by = Some(caller.subject.clone());
        record.decided_at = Some(self.now_rfc3339());
        let pending = {
            let mut state = self.state()?;
            let mut out = crate::ingest::Decisions::default();
            if decision == Decision::Release {
                self.release(caller, &mut state, &record, &mut out)?;
            }
            out.records.push(put(Table::Quarantine, id, &record));
            let expect = vec![Expect {
                table: Table::Quarantine,
                key: id.to_owned(),
                value: Some(stored),
            }];
            self.submit(std::mem::take(&mut out.updates), out.records, expect)?
        };
        let results = match pending.await {
            Ok(results) => results,
            Err(DomainError::Superseded) => return Err(reviewed()),
            Err(e) => return Err(e),
        };
        self.state()?.unhold(id);
        for skip in results.into_iter().filter_map(Result::err) {
            tracing::warn!(id = %id, reason = skip.code(), "a released reading could not be applied");
        }
        tracing::info!(id = %id, decision = ?decision, by = %caller.subject, "quarantined reading reviewed");
        Ok(record)
    }

    /// The checks and effects of releasing `record` (see [`Telemetry::review`]).
    fn release(
        &self,
        caller: &Principal,
        state: &mut crate::service::State,
        record: &Quarantined,
        out: &mut crate::ingest::Decisions,
    ) -> DomainResult<()> {
        let refuse =
            |why: &str| DomainError::Conflict(format!("{why}; the reading can only be discarded"));
        let Some(twin) = record.twin.as_deref() else {
            return Err(refuse("the reading names no twin"));
        };
        let graph = self.inner.twins.snapshot();
        let may_write = graph.twin(twin).is_some_and(|t| {
            caller.may_twin(&graph, Action::TwinsWrite, t)
                || caller.may_twin(&graph, Action::TelemetryWrite, t)
        });
        if !may_write {
            return Err(DomainError::Forbidden {
                action: Action::TwinsWrite.as_str(),
            });
        }
        let bound = state
            .devices
            .get(&record.device)
            .is_some_and(|d| d.status == Status::Active && d.may_write(twin, &record.name));
        if !bound {
            return Err(refuse(
                "the device is not active and bound to write this name on the twin",
            ));
        }
        let (is_property, _) =
            crate::ingest::check_schema(&graph, twin, &record.name, &record.value)
                .map_err(|_| refuse("the twin's model does not define this name for this value"))?;
        let time_ms = time::OffsetDateTime::parse(
            &record.source_time,
            &time::format_description::well_known::Rfc3339,
        )
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
        .map_err(|_| refuse("the reading's time is unreadable"))?;
        self.accept_released(state, twin, record, time_ms, is_property, out);
        Ok(())
    }

    // ---- history ----

    /// The first page of the accepted readings of `twin`'s `name` with
    /// `from_ms <= time < to_ms`, raw or in buckets of `interval_ms` (see
    /// [`Telemetry::history_page`]); `truncated` says whether more pages follow.
    pub fn history(
        &self,
        caller: &Principal,
        twin: &str,
        name: &str,
        query: HistoryQuery,
    ) -> DomainResult<History> {
        Ok(self.history_page(caller, twin, name, query, None)?.history)
    }

    /// One page of a history read, continuing after `cursor` (from the page before, checked with
    /// [`HistoryCursor::parse`]). A page reads at most [`MAX_HISTORY_SCAN`] stored readings, an
    /// ordered range read a chunk at a time, and returns at most `limit` readings (at most
    /// [`MAX_HISTORY`]) in at most [`MAX_HISTORY_PAGE_BYTES`] of JSON, or at most
    /// [`MAX_HISTORY_BUCKETS`] finished buckets; a bucket still open when the page ends travels
    /// in the cursor and is returned whole by the page that finishes it. The caller must be
    /// allowed to read the twin.
    pub fn history_page(
        &self,
        caller: &Principal,
        twin: &str,
        name: &str,
        query: HistoryQuery,
        cursor: Option<HistoryCursor>,
    ) -> DomainResult<HistoryPage> {
        let HistoryQuery {
            from_ms,
            to_ms,
            interval_ms,
            limit,
        } = query;
        self.inner.twins.twin(caller, twin)?;
        let busy = DomainError::Busy {
            retry_after_secs: 1,
        };
        let _mine = self
            .inner
            .history_readers
            .enter(&caller.subject)
            .ok_or(DomainError::Busy {
                retry_after_secs: 1,
            })?;
        let _slot = self.inner.history_slots.enter("").ok_or(busy)?;
        if from_ms >= to_ms {
            return Err(DomainError::InvalidArgument(
                "from must be earlier than to".into(),
            ));
        }
        if matches!(interval_ms, Some(i) if i <= 0) {
            return Err(DomainError::InvalidArgument(
                "interval must be positive".into(),
            ));
        }
        let limit = limit.clamp(1, MAX_HISTORY);
        let end = history_bound(twin, name, to_ms);
        let (mut from, mut open) = match cursor {
            Some(c) => (format!("{}\u{0}", c.after), c.bucket),
            None => (history_bound(twin, name, from_ms), None),
        };
        let unavailable = |_| DomainError::Unavailable;
        // Every reading committed before the read is in the history store from here on.
        self.inner.history.merge().map_err(unavailable)?;
        let mut readings: Vec<HistoryEntry> = Vec::new();
        let mut buckets: Vec<Bucket> = Vec::new();
        let (mut scanned, mut bytes, mut more) = (0usize, 0usize, false);
        let mut last: Option<String> = None;
        'read: loop {
            // One row past the scan bound, to know whether the history goes on.
            let chunk = HISTORY_CHUNK.min(MAX_HISTORY_SCAN - scanned + 1);
            let rows = self
                .inner
                .history
                .merged_range(&from, &end, chunk)
                .map_err(unavailable)?;
            let Some((tail, _)) = rows.last() else {
                break;
            };
            from = format!("{tail}\u{0}");
            for (key, value) in rows {
                if scanned == MAX_HISTORY_SCAN {
                    more = true;
                    break 'read;
                }
                let entry = history_entry(&key, &value);
                match (interval_ms, entry) {
                    (None, Some((_, entry))) => {
                        if readings.len() == limit {
                            more = true;
                            break 'read;
                        }
                        let size = serde_json::to_vec(&entry).map_or(0, |b| b.len() + 1);
                        if bytes + size > MAX_HISTORY_PAGE_BYTES && !readings.is_empty() {
                            more = true;
                            break 'read;
                        }
                        bytes += size;
                        readings.push(entry);
                    }
                    (Some(interval), Some((time_ms, entry))) => {
                        if let Some(v) = entry.value.as_f64() {
                            let start =
                                from_ms + (time_ms - from_ms).div_euclid(interval) * interval;
                            match &mut open {
                                Some(b) if b.start_ms == start => b.add(v),
                                _ => {
                                    if buckets.len() == MAX_HISTORY_BUCKETS {
                                        more = true;
                                        break 'read;
                                    }
                                    if let Some(done) = open.replace(OpenBucket::new(start, v)) {
                                        buckets.push(done.finish(rfc3339_ms));
                                    }
                                }
                            }
                        }
                    }
                    // An unreadable record is read, counted and left out.
                    (_, None) => {}
                }
                scanned += 1;
                last = Some(key);
            }
        }
        let next = match (more, last) {
            (true, Some(after)) => Some(HistoryCursor {
                after,
                bucket: open.take(),
            }),
            _ => None,
        };
        if let Some(done) = open {
            buckets.push(done.finish(rfc3339_ms));
        }
        let history = History {
            twin: twin.to_owned(),
            name: name.to_owned(),
            readings: interval_ms.is_none().then_some(readings),
            buckets: interval_ms.is_some().then_some(buckets),
            truncated: next.is_some(),
        };
        Ok(HistoryPage {
            history,
            next,
            scanned,
        })
    }

    /// Checks a history continuation token against the read it continues.
    pub fn history_cursor(
        token: &str,
        twin: &str,
        name: &str,
        query: &HistoryQuery,
    ) -> Option<HistoryCursor> {
        HistoryCursor::parse(
            token,
            HistoryWindow {
                twin,
                name,
                from_ms: query.from_ms,
                to_ms: query.to_ms,
                interval_ms: query.interval_ms,
            },
        )
    }
}

/// What of the telemetry plane a caller holding `devices/read` may see. Hidden equals absent,
/// as in the twin API: a twin outside the caller's `devices/read` scopes, and everything that
/// names it, is left out as if the twin did not exist.
/// - A device is shown with the bindings to twins the caller may see, and only those; a device
///   with none is absent for that caller. So a device bound to a visible and a hidden twin
///   shows its visible binding only, exactly as if the hidden twin did not exist (a binding to
///   a twin that does not exist is shown to instance-wide callers only).
/// - A sensor group is shown when its twin is visible; its members are the devices that feed
///   that visible twin's property, so they are shown as they are.
/// - A validation policy is shown when the caller may see its model, a firmware allowlist when
///   the caller sees a device of its device model.
struct Scoped<'a> {
    caller: &'a Principal,
    /// `None` for a caller that holds `devices/read` instance-wide: it sees everything.
    graph: Option<std::sync::Arc<twinguard_core::graph::Graph>>,
}

impl Scoped<'_> {
    fn twin(&self, id: &str) -> bool {
        match &self.graph {
            None => true,
            Some(graph) => graph
                .twin(id)
                .is_some_and(|t| self.caller.may_twin(graph, Action::DevicesRead, t)),
        }
    }

    fn model(&self, id: &str) -> bool {
        match &self.graph {
            None => true,
            Some(graph) => twinguard_core::dtmi::Dtmi::parse(id)
                .ok()
                .and_then(|m| graph.model(&m))
                .is_some_and(|entry| self.caller.may_model(Action::DevicesRead, entry)),
        }
    }

    /// The device as this caller may see it, or `None` when it is absent for the caller.
    fn device(&self, device: &Device) -> Option<Device> {
        if self.graph.is_none() {
            return Some(device.clone());
        }
        let bindings: Vec<Binding> = device
            .bindings
            .iter()
            .filter(|b| self.twin(&b.twin))
            .cloned()
            .collect();
        if bindings.is_empty() {
            return None;
        }
        Some(Device {
            bindings,
            ..device.clone()
        })
    }
}

/// A device's new key: the public key given (a JWK object or an SPKI PEM string), or one made
/// here with its private key.
fn new_key(
    public_key: Option<Value>,
    generate: bool,
) -> DomainResult<(DeviceKey, Option<Zeroizing<String>>)> {
    match (public_key, generate) {
        (Some(_), true) | (None, false) => Err(DomainError::InvalidArgument(
            "give either publicKey or \"generate\": true".into(),
        )),
        (None, true) => {
            let (key, pem) = generate_key()
                .map_err(|_| DomainError::Internal("a device key pair could not be made"))?;
            Ok((key, Some(pem)))
        }
        (Some(Value::String(pem)), false) => Ok((parse_key(DeviceKey::from_pem(&pem))?, None)),
        (Some(jwk), false) => Ok((parse_key(DeviceKey::from_jwk(&jwk))?, None)),
    }
}

/// The records and expectations a device change commits for its key claims (see
/// [`Telemetry::key_claims`]).
struct KeyClaims {
    records: Vec<Mutation>,
    expect: Vec<Expect>,
    /// The thumbprints newly claimed.
    claimed: Vec<String>,
}

/// Refuses keys in `thumbprints` that a device other than `id` holds in this node's memory,
/// as its key or its previous one. Checked under the state's lock as the change is queued, so
/// two changes on one node cannot both take a key (on a store of one writer, where the store
/// does not read the claims' expectations, this check is the whole rule).
fn keys_unused(state: &State, id: &str, thumbprints: &[String]) -> DomainResult<()> {
    if state.key_held_by_another(id, thumbprints) {
        return Err(key_taken());
    }
    Ok(())
}

fn already_registered(id: &str) -> DomainError {
    DomainError::Conflict(format!("a device with ID '{id}' is already registered"))
}

/// A key another device holds, as its key or its previous one: every device has its own key.
fn key_taken() -> DomainError {
    DomainError::Conflict(
        "this public key is registered to another device; every device needs its own key".into(),
    )
}

fn refuse_revoked(device: &Device) -> DomainResult<()> {
    if device.status == Status::Revoked {
        return Err(DomainError::Conflict(
            "the device is revoked; register a new device".into(),
        ));
    }
    Ok(())
}

fn parse_key<E: std::fmt::Display>(key: Result<DeviceKey, E>) -> DomainResult<DeviceKey> {
    key.map_err(|e| DomainError::InvalidArgument(format!("the public key is not usable: {e}")))
}

fn check_bindings(bindings: &[Binding]) -> DomainResult<()> {
    if bindings.len() > 64
        || bindings
            .iter()
            .any(|b| b.names.is_empty() || b.names.len() > 256)
    {
        return Err(DomainError::InvalidArgument(
            "a device has at most 64 bindings, each naming 1 to 256 properties or telemetry".into(),
        ));
    }
    Ok(())
}
