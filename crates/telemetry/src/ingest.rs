//! The ingestion pipeline: from envelope bytes to twin updates, quarantine and history, in the
//! order the crate documentation gives. Signature checks run outside the state lock and in
//! batches; the decisions that depend on earlier messages (replay windows, rate of change,
//! fusion) run under the lock, and the resulting write is queued before the lock is released,
//! so writes reach the store in decision order.

use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use twinguard_core::dtdl::Interface;
use twinguard_core::error::{DomainError, DomainResult};
use twinguard_core::graph::{Graph, PropertyUpdate, Quality, Skipped};
use twinguard_core::store::{Expect, Mutation, Table};

use crate::envelope::{DeviceKey, Envelope, Reject, Verified, verify_batch};
use crate::fusion::fuse;
use crate::policy::DEFAULT_ANOMALY_THRESHOLD;
use crate::records::{Quarantined, Review, StoredReading, history_key, quarantine_key};
use crate::registry::{QuarantineFull, Status, Suspect};
use crate::replay::{LATE_AFTER_MS, MAX_BACKFILL_MS, READING_AHEAD_MS, check_time};
use crate::service::{Prop, RECENT_FUSED, Sensor, State, Telemetry, TelemetryEvent, put};

/// Readings one device may have waiting for review. Beyond it the device is flagged (audited)
/// and its readings that would be held are refused, not stored, until reviews make room; its
/// good readings still flow.
pub const QUARANTINE_QUOTA: u64 = 1_000;

/// How a message arrived, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Https,
    Mqtt,
}

impl Transport {
    fn as_str(self) -> &'static str {
        match self {
            Self::Https => "https",
            Self::Mqtt => "mqtt",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Every reading was applied or recorded.
    Accepted,
    /// The signature is valid but at least one reading was held for review.
    Quarantined,
    /// The message was refused; nothing of it was stored.
    Rejected,
}

/// The answer for one message.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Outcome {
    pub status: Verdict,
    /// The reason code of a rejection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub readings: Vec<ReadingOutcome>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReadingOutcome {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub twin: Option<String>,
    pub status: Verdict,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
    #[serde(rename = "anomalyScore", skip_serializing_if = "Option::is_none")]
    pub anomaly_score: Option<f64>,
    /// Accepted into the history only: measured too long before its arrival, or before the
    /// stream's last accepted reading.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub late: bool,
}

impl Outcome {
    fn rejected(reason: &'static str, device: Option<String>, seq: Option<u64>) -> Self {
        Self {
            status: Verdict::Rejected,
            reason: Some(reason),
            device,
            seq,
            readings: Vec::new(),
        }
    }
}

/// Counts a batch's outcomes in `twinguard_telemetry_messages_total`: one increment per
/// distinct status and reason rather than one registry lookup per message.
fn count(transport: Transport, outcomes: &[Option<Outcome>]) {
    let mut tally: Vec<((&'static str, &'static str), u64)> = Vec::new();
    for outcome in outcomes.iter().flatten() {
        let status = match outcome.status {
            Verdict::Accepted => "accepted",
            Verdict::Quarantined => "quarantined",
            Verdict::Rejected => "rejected",
        };
        let key = (status, outcome.reason.unwrap_or("none"));
        match tally.iter_mut().find(|(k, _)| *k == key) {
            Some((_, n)) => *n += 1,
            None => tally.push((key, 1)),
        }
    }
    for ((status, reason), n) in tally {
        metrics::counter!(
            "twinguard_telemetry_messages_total",
            "transport" => transport.as_str(),
            "status" => status,
            "reason" => reason
        )
        .increment(n);
    }
}

/// The durable write of a batch's decisions: what each twin update came to.
type Pending = std::pin::Pin<
    Box<dyn std::future::Future<Output = DomainResult<Vec<Result<(), Skipped>>>> + Send>,
>;

/// A batch decided: outcomes so far, the write to wait for, the replay marks it made.
type Decided = (Vec<Option<Outcome>>, Option<Pending>, Marks);

/// How long a batch is decided again, on a store several nodes share, while other writers keep
/// committing first (see [`Telemetry::ingest`]); then it is answered 503. Each time, the
/// windows are read again, so only a device whose window another node keeps moving can run it
/// out. A budget of time, not of tries: two nodes ingesting the same devices (an MQTT shared
/// subscription hands each node every other message) commit over each other all the time, and
/// on a loaded machine a fixed few tries ran out in a burst (issue 20, CI of stop 32).
const SUPERSEDED_PATIENCE: Duration = Duration::from_secs(3);

/// The pause before deciding a superseded batch again: doubling from 1 ms up to 64 ms, each
/// drawn at random between half and all of that, so that nodes which collided do not try again
/// in step and collide again.
fn superseded_backoff(attempt: usize) -> Duration {
    let ceiling = 1u64 << attempt.min(6);
    Duration::from_micros(rand::random_range(ceiling * 500..=ceiling * 1000))
}

/// Everything one batch decides, committed together.
#[derive(Default)]
pub(crate) struct Decisions {
    pub updates: Vec<PropertyUpdate>,
    pub records: Vec<Mutation>,
    /// What the batch counted before its commit, taken back if the commit fails.
    pub marks: Marks,
}

/// What deciding a batch counts in memory before its commit: taken back ([`forget`]) if the
/// commit fails, so a batch decided again is not counted twice.
#[derive(Debug, Default)]
pub(crate) struct Marks {
    /// `(device, seq)` marked in the replay windows.
    pub windows: Vec<(String, u64)>,
    /// The quarantine records held against their devices' quotas.
    pub held: Vec<String>,
}

impl Telemetry {
    /// Ingests signed messages (each a COSE_Sign1 or JWS envelope) and answers each once its
    /// effects are durable. `Err` only when the store cannot take the batch (retry later);
    /// every refusal of a message is in its [`Outcome`].
    ///
    /// On a store that several nodes share, the replay windows are decided in the store: the
    /// write names each window it moved as it was before the batch, and the twin writer commits
    /// it only if the stored window still is that ([`Expect`]). When another node moved one
    /// first, nothing of the batch is stored; the windows and registry records of its devices
    /// are read again and the batch is decided anew, so a message that two nodes receive at
    /// once is accepted by one and refused as replayed by the other.
    ///
    /// Runs to its end even if the caller is dropped (see [`Telemetry::to_the_end`]): the
    /// marks of a batch whose commit failed are taken back, so a device's retry of a message
    /// that was never stored is not refused as a replay.
    pub async fn ingest(
        &self,
        messages: Vec<Vec<u8>>,
        transport: Transport,
    ) -> DomainResult<Vec<Outcome>> {
        self.to_the_end(move |this| async move { this.ingest_batch(messages, transport).await })
            .await
    }

    async fn ingest_batch(
        &self,
        messages: Vec<Vec<u8>>,
        transport: Transport,
    ) -> DomainResult<Vec<Outcome>> {
        let deadline = self
            .inner
            .twins
            .shares_store()
            .then(|| tokio::time::Instant::now() + SUPERSEDED_PATIENCE);
        let mut messages = messages;
        let mut attempt = 0;
        loop {
            let again = deadline
                .is_some_and(|d| tokio::time::Instant::now() < d)
                .then(|| messages.clone());
            // Decoding, verifying and deciding a batch is milliseconds of CPU: on the blocking
            // pool, so that the async workers stay free to read requests and deliver answers.
            let this = self.clone();
            let (outcomes, pending, marks) =
                tokio::task::spawn_blocking(move || this.decide_batch(messages))
                    .await
                    .map_err(|_| {
                        DomainError::Internal("a telemetry batch could not be processed")
                    })??;
            // 5. Answer once durable.
            let settled = match pending {
                None => Ok(()),
                Some(pending) => pending.await.map(|skipped| {
                    for result in skipped {
                        if let Err(skip) = result {
                            tracing::warn!(
                                reason = skip.code(),
                                "an accepted reading could not be applied to its twin"
                            );
                        }
                    }
                }),
            };
            match settled {
                Ok(()) => {
                    count(transport, &outcomes);
                    return Ok(outcomes
                        .into_iter()
                        .map(|o| o.unwrap_or_else(|| Outcome::rejected("internal", None, None)))
                        .collect());
                }
                Err(e) => {
                    forget(&mut *self.state()?, &marks);
                    let (DomainError::Superseded, Some(again)) = (&e, again) else {
                        return Err(match e {
                            DomainError::Superseded => DomainError::Unavailable,
                            e => e,
                        });
                    };
                    let mut devices: Vec<String> =
                        marks.windows.into_iter().map(|(d, _)| d).collect();
                    devices.sort_unstable();
                    devices.dedup();
                    tracing::info!(
                        devices = devices.len(),
                        attempt,
                        "another node moved a replay window first; deciding the batch again"
                    );
                    tokio::time::sleep(superseded_backoff(attempt)).await;
                    self.off_the_runtime(move |this| this.reload_devices(&devices))
                        .await?;
                    messages = again;
                    attempt += 1;
                }
            }
        }
    }

    /// Steps 1 to 4 of [`Telemetry::ingest`]: each message's outcome so far, the durable write
    /// to wait for, and the replay-window marks to take back should that write fail.
    fn decide_batch(&self, messages: Vec<Vec<u8>>) -> DomainResult<Decided> {
        let mut outcomes: Vec<Option<Outcome>> = vec![None; messages.len()];
        // 1. Decode, without the lock: concurrent batches decode side by side.
        let mut decoded = Vec::with_capacity(messages.len());
        for (i, bytes) in messages.iter().enumerate() {
            let envelope = match Envelope::decode(bytes) {
                Ok(e) => e,
                Err(e) => {
                    outcomes[i] = Some(self.refuse(&e, None));
                    continue;
                }
            };
            let claimed = match envelope.kid() {
                Some(kid) => Ok(kid.to_owned()),
                None => envelope.claimed_device(),
            };
            match claimed {
                Ok(id) => decoded.push((i, envelope, id)),
                Err(e) => outcomes[i] = Some(self.refuse(&e, None)),
            }
        }
        // 2. Find each claimed device's keys, under the lock: its current key and, while a
        // rotation's overlap lasts, its previous one.
        let mut to_verify = Vec::with_capacity(decoded.len());
        let mut slots = Vec::with_capacity(decoded.len());
        {
            let now_ms = self.now_ms();
            let mut state = self.state()?;
            for (i, envelope, id) in decoded {
                let refused = status_refusal(&state, &id).or_else(|| {
                    let Some(keys) = state.device_keys(&id) else {
                        return Some("unknown_device");
                    };
                    let previous = keys.previous_at(now_ms).cloned();
                    to_verify.push((envelope, id.clone(), keys.current.clone(), previous));
                    slots.push(i);
                    None
                });
                if let Some(reason) = refused {
                    tracing::warn!(device = %id, reason, "telemetry message refused");
                    outcomes[i] = Some(Outcome::rejected(reason, Some(id), None));
                }
            }
        }
        // 3. Verify signatures, in one batch.
        let verified = verify_batch(to_verify);
        let mut believed: Vec<(usize, Verified)> = Vec::new();
        for (slot, result) in slots.into_iter().zip(verified) {
            match result {
                Ok(v) => believed.push((slot, v)),
                Err(e) => outcomes[slot] = Some(self.refuse(&e, None)),
            }
        }
        // 4. Decide under the lock, queue the write before letting go.
        let mut decisions = Decisions::default();
        let shared = self.inner.twins.shares_store();
        // The time of the decisions, read before the lock is taken.
        let now_ms = self.now_ms();
        let now = self.now_rfc3339();
        let pending = {
            let mut state = self.state()?;
            // On a shared store: each window as this node knows it before the batch, which the
            // store must still hold for the batch to commit.
            let mut before: Vec<Expect> = Vec::new();
            if shared {
                let mut devices: Vec<&str> = believed
                    .iter()
                    .map(|(_, v)| v.message().device.as_str())
                    .collect();
                devices.sort_unstable();
                devices.dedup();
                before.extend(devices.into_iter().map(|device| Expect {
                    table: Table::Replay,
                    key: device.to_owned(),
                    value: state.windows.get(device).map(|w| w.to_bytes()),
                }));
            }
            let graph = self.inner.twins.snapshot();
            for (slot, verified) in believed {
                let outcome =
                    self.decide(&mut state, &graph, verified, now_ms, &now, &mut decisions);
                outcomes[slot] = Some(outcome);
            }
            // Each device's window once, as it stands after the whole batch.
            let mut windows: Vec<&str> = decisions
                .marks
                .windows
                .iter()
                .map(|(d, _)| d.as_str())
                .collect();
            windows.sort_unstable();
            windows.dedup();
            for device in &windows {
                if let Some(window) = state.windows.get(*device) {
                    decisions.records.push(Mutation::put(
                        Table::Replay,
                        *device,
                        window.to_bytes(),
                    ));
                }
            }
            before.retain(|e| windows.binary_search(&e.key.as_str()).is_ok());
            if decisions.records.is_empty() && decisions.updates.is_empty() {
                None
            } else {
                let updates = std::mem::take(&mut decisions.updates);
                let records = std::mem::take(&mut decisions.records);
                match self.submit(updates, records, before) {
                    Ok(p) => Some(Box::pin(p) as Pending),
                    Err(e) => {
                        forget(&mut state, &decisions.marks);
                        return Err(e);
                    }
                }
            }
        };
        Ok((outcomes, pending, decisions.marks))
    }

    /// Flags a device whose readings waiting for review reached [`QUARANTINE_QUOTA`], once,
    /// and reports it to the audit trail.
    fn quarantine_full(&self, state: &mut State, device_id: &str, now: &str, out: &mut Decisions) {
        let Some(device) = state.devices.get_mut(device_id) else {
            return;
        };
        if device.quarantine_full.is_some() {
            return;
        }
        device.quarantine_full = Some(QuarantineFull {
            since: now.to_owned(),
            quota: QUARANTINE_QUOTA,
        });
        out.records.push(put(Table::Devices, device_id, &*device));
        tracing::warn!(device = %device_id, quota = QUARANTINE_QUOTA, "device reached its quarantine quota; its readings that would be held are refused until reviews make room");
        self.report(TelemetryEvent {
            event: "device.quarantineFull",
            device: device_id.to_owned(),
            detail: serde_json::json!({ "quota": QUARANTINE_QUOTA }),
        });
    }

    fn refuse(&self, e: &Reject, device: Option<String>) -> Outcome {
        tracing::warn!(reason = e.code(), "telemetry message refused");
        Outcome::rejected(e.code(), device, None)
    }

    /// Decides one verified message: its device and key as the registry holds them now, time
    /// and replay, firmware, then each reading.
    fn decide(
        &self,
        state: &mut State,
        graph: &Graph,
        verified: Verified,
        now_ms: i64,
        now: &str,
        out: &mut Decisions,
    ) -> Outcome {
        let (message, key) = verified.into_parts();
        let device_id = message.device.clone();
        let rejected =
            |reason| Outcome::rejected(reason, Some(device_id.clone()), Some(message.seq));
        // The signature was checked without the lock, with the keys and status the registry
        // held before: a suspension, revocation or key rotation (of any node) taken since then
        // holds for this message too.
        if let Some(reason) = still_refused(state, &device_id, &key, now_ms) {
            tracing::warn!(device = %device_id, reason, "telemetry message refused");
            return rejected(reason);
        }
        if let Err(e) = check_time(message.time, now_ms) {
            return rejected(e.code());
        }
        let window = state.windows.entry(device_id.clone()).or_default();
        if let Err(e) = window.accept(message.seq) {
            tracing::warn!(device = %device_id, seq = message.seq, reason = e.code(), "replayed telemetry refused");
            return rejected(e.code());
        }
        out.marks.windows.push((device_id.clone(), message.seq));

        // Firmware attestation: a reported digest is remembered; an unapproved one holds back
        // every reading of the device until it reports approved firmware again.
        let Some(device) = state.devices.get_mut(&device_id) else {
            return rejected("unknown_device");
        };
        if message.firmware.is_some() && device.firmware != message.firmware {
            device.firmware = message.firmware.clone();
            out.records.push(put(Table::Devices, &device_id, &*device));
        }
        let firmware_reason = match &device.firmware {
            None => Some("firmware_unattested"),
            Some(digest) => {
                let approved = state
                    .firmware
                    .get(&device.device_model)
                    .is_some_and(|list| list.digests.contains(digest));
                (!approved).then_some("firmware_unknown")
            }
        };
        // Each reading's twin, and whether the device is bound to write the reading there,
        // settled while the device's record is at hand.
        let targets: Vec<(Option<String>, bool)> = message
            .readings
            .iter()
            .map(|reading| {
                let twin =
                    (reading.twin.clone()).or_else(|| device.default_twin().map(str::to_owned));
                let bound = twin
                    .as_deref()
                    .is_some_and(|twin| device.may_write(twin, &reading.name));
                (twin, bound)
            })
            .collect();

        let mut readings = Vec::with_capacity(message.readings.len());
        for (reading, (twin_id, bound)) in message.readings.into_iter().zip(targets) {
            // Time is not a weapon: a reading is judged at the time it claims, but never later
            // than its arrival, so a future time can neither stretch a rate of change nor keep
            // a stream fresh; one measured long before its arrival, or before the stream's last
            // accepted reading, is late and never moves the twin.
            let claimed_ms = reading.time.unwrap_or(message.time);
            let time_ms = claimed_ms.min(now_ms);
            let time_s = time_ms as f64 / 1000.0;
            let mut late = time_ms < now_ms.saturating_sub(LATE_AFTER_MS);
            let mut reasons: Vec<String> = Vec::new();
            if let Some(r) = firmware_reason {
                reasons.push(r.into());
            }
            if claimed_ms > message.time.saturating_add(READING_AHEAD_MS)
                || claimed_ms < now_ms.saturating_sub(MAX_BACKFILL_MS)
            {
                reasons.push("reading_time".into());
            }
            let mut score = None;
            let mut is_property = false;
            // The stream's detector after learning this reading, kept only if it is accepted
            // in time: what is held, refused or late never trains it.
            let mut learned = None;
            match &twin_id {
                None => reasons.push("no_twin".into()),
                Some(_) if !bound => reasons.push("not_bound".into()),
                Some(twin_id) => {
                    match check_schema(graph, twin_id, &reading.name, &reading.value) {
                        Err(code) => reasons.push(code.into()),
                        Ok((property, model)) => {
                            is_property = property;
                            let sensor = state
                                .sensors
                                .entry((device_id.clone(), twin_id.clone(), reading.name.clone()))
                                .or_insert_with(|| Sensor::new(&self.inner.detector));
                            late |= sensor.last.is_some_and(|(_, at)| time_s < at);
                            let policy = state.policies.values().find(|p| {
                                p.property == reading.name && is_of_model(model, &p.model)
                            });
                            if let Some(policy) = policy {
                                reasons.extend(
                                    policy
                                        .check(&reading.value, time_s, sensor.last)
                                        .into_iter()
                                        .map(|v| v.code().to_owned()),
                                );
                            }
                            if let Some(v) = reading.value.as_f64() {
                                let mut trial = sensor.detector.clone();
                                score = trial.score(time_s, v);
                                let threshold = policy
                                    .map_or(DEFAULT_ANOMALY_THRESHOLD, |p| p.anomaly_threshold());
                                if score.is_some_and(|s| s >= threshold) {
                                    reasons.push("anomaly".into());
                                }
                                learned = Some((trial, v));
                            }
                        }
                    }
                }
            }
            if reasons.is_empty() {
                let Some(twin_id) = twin_id.clone() else {
                    continue;
                };
                if !late {
                    let stream = (device_id.clone(), twin_id.clone(), reading.name.clone());
                    if let (Some(sensor), Some((detector, v))) =
                        (state.sensors.get_mut(&stream), learned)
                    {
                        sensor.detector = detector;
                        sensor.last = Some((v, time_s));
                        sensor.dirty = true;
                    }
                }
                out.records.push(self.history_record(
                    &history_key(&twin_id, &reading.name, time_ms, &device_id, message.seq),
                    &StoredReading {
                        value: reading.value.clone(),
                        anomaly_score: score,
                        late,
                    },
                ));
                if is_property && !late {
                    self.apply(
                        state,
                        &twin_id,
                        &reading.name,
                        (&device_id, message.seq),
                        reading.value.clone(),
                        time_ms,
                        now,
                        out,
                    );
                }
                readings.push(ReadingOutcome {
                    name: reading.name,
                    twin: Some(twin_id),
                    status: Verdict::Accepted,
                    reasons: Vec::new(),
                    anomaly_score: score,
                    late,
                });
                continue;
            }
            // Held for review, within the device's quota; beyond it refused and not stored.
            if state.held(&device_id) >= QUARANTINE_QUOTA {
                reasons.push("quarantine_quota".into());
                metrics::counter!("twinguard_telemetry_quota_refused_total").increment(1);
                self.quarantine_full(state, &device_id, now, out);
                readings.push(ReadingOutcome {
                    name: reading.name,
                    twin: twin_id,
                    status: Verdict::Rejected,
                    reasons,
                    anomaly_score: score,
                    late,
                });
                continue;
            }
            let id = uuid::Uuid::new_v4().simple().to_string();
            state.quarantined += 1;
            let key = quarantine_key(now_ms, state.quarantined, &id);
            state.hold(key.clone(), &device_id);
            out.marks.held.push(key.clone());
            out.records.push(put(
                Table::Quarantine,
                &key,
                &Quarantined {
                    id: key.clone(),
                    device: device_id.clone(),
                    seq: message.seq,
                    twin: twin_id.clone(),
                    name: reading.name.clone(),
                    value: reading.value,
                    source_time: rfc3339_ms(time_ms),
                    received: now.to_owned(),
                    reasons: reasons.clone(),
                    anomaly_score: score,
                    status: Review::Pending,
                    decided_by: None,
                    decided_at: None,
                },
            ));
            for r in &reasons {
                metrics::counter!("twinguard_telemetry_quarantined_total", "reason" => r.clone())
                    .increment(1);
            }
            tracing::info!(device = %device_id, seq = message.seq, name = %reading.name, reasons = ?reasons, "reading quarantined");
            readings.push(ReadingOutcome {
                name: reading.name,
                twin: twin_id,
                status: Verdict::Quarantined,
                reasons,
                anomaly_score: score,
                late,
            });
        }
        let status = if readings.iter().all(|r| r.status == Verdict::Accepted) {
            Verdict::Accepted
        } else if readings.iter().all(|r| r.status == Verdict::Rejected) {
            Verdict::Rejected
        } else {
            Verdict::Quarantined
        };
        Outcome {
            status,
            reason: (status == Verdict::Rejected).then_some("quarantine_quota"),
            device: Some(device_id),
            seq: Some(message.seq),
            readings,
        }
    }

    /// The effects of a reading a reviewer released (after [`Telemetry::review`]'s checks): the
    /// stream's detector learns it, and it goes into the history and, unless it is late, to
    /// the twin as an accepted reading would.
    pub(crate) fn accept_released(
        &self,
        state: &mut State,
        twin: &str,
        record: &Quarantined,
        time_ms: i64,
        is_property: bool,
        out: &mut Decisions,
    ) {
        let now_ms = self.now_ms();
        let time_s = time_ms as f64 / 1000.0;
        let stream = (record.device.clone(), twin.to_owned(), record.name.clone());
        let sensor = state
            .sensors
            .entry(stream)
            .or_insert_with(|| Sensor::new(&self.inner.detector));
        let late = time_ms < now_ms.saturating_sub(LATE_AFTER_MS)
            || sensor.last.is_some_and(|(_, at)| time_s < at);
        if let Some(v) = record.value.as_f64() {
            sensor.detector.score(time_s, v);
            if !late {
                sensor.last = Some((v, time_s));
            }
            sensor.dirty = true;
        }
        out.records.push(self.history_record(
            &history_key(twin, &record.name, time_ms, &record.device, record.seq),
            &StoredReading {
                value: record.value.clone(),
                anomaly_score: record.anomaly_score,
                late,
            },
        ));
        if is_property && !late {
            let now = self.now_rfc3339();
            self.apply(
                state,
                twin,
                &record.name,
                (&record.device, record.seq),
                record.value.clone(),
                time_ms,
                &now,
                out,
            );
        }
    }

    /// Moves a property with an accepted reading: directly, or through its sensor group. A
    /// reading older than the one shown goes to the history only; so does one of the same time
    /// from the same device with an earlier sequence number (batches can be decided out of the
    /// order the device sent them, and a device may stamp several readings in one millisecond).
    #[allow(clippy::too_many_arguments)] // the decision's context, spelled out
    fn apply(
        &self,
        state: &mut State,
        twin: &str,
        name: &str,
        (device, seq): (&str, u64),
        value: Value,
        time_ms: i64,
        now: &str,
        out: &mut Decisions,
    ) {
        let time_s = time_ms as f64 / 1000.0;
        let now_s = self.now_ms() as f64 / 1000.0;
        let key = (twin.to_owned(), name.to_owned());
        let group = state.group_for(twin, name).cloned();
        let prop = state.props.entry(key).or_default();
        let overtaken = |&(t, s): &(i64, u64)| t > time_ms || (t == time_ms && s > seq);
        match prop.newest.get_mut(device) {
            Some(newest) if overtaken(newest) => return, // history only
            Some(newest) => *newest = (time_ms, seq),
            None => {
                prop.newest.insert(device.to_owned(), (time_ms, seq));
            }
        }
        let Some(group) = group else {
            if time_ms < prop.applied_ms {
                return; // older than another device's reading: history only
            }
            if let Some(v) = value.as_f64() {
                prop.forecaster.update(time_s, v);
            }
            prop.applied_ms = time_ms;
            prop.good_s = now_s;
            prop.quality = Some(Quality::Good);
            out.updates.push(PropertyUpdate {
                twin: twin.to_owned(),
                name: name.to_owned(),
                value: Some(value),
                source_time: Some(rfc3339_ms(time_ms)),
                quality: Quality::Good,
                sources: vec![device.to_owned()],
            });
            return;
        };
        if !group.devices.iter().any(|d| d == device) {
            return; // bound but not a member: recorded in the history, never fused
        }
        match prop.latest.iter_mut().find(|(d, _, _)| d == device) {
            Some(entry) => *entry = (device.to_owned(), value, time_s),
            None => prop.latest.push((device.to_owned(), value, time_s)),
        }
        let fused = fuse(&group, &prop.latest, now_s);
        if fused.disagreement {
            metrics::counter!("twinguard_telemetry_disagreement_total", "group" => group.id.clone())
                .increment(1);
            tracing::warn!(group = %group.id, twin = %twin, property = %name, "a sensor group's fresh members do not agree; the property shows its estimate");
        }
        let update = match &fused.value {
            Some(v) => {
                if let Some(x) = v.as_f64() {
                    prop.forecaster.update(time_s, x);
                    if prop.recent.len() == RECENT_FUSED {
                        prop.recent.pop_front();
                    }
                    prop.recent.push_back(x);
                }
                prop.good_s = now_s;
                prop.applied_ms = prop.applied_ms.max(time_ms);
                PropertyUpdate {
                    twin: twin.to_owned(),
                    name: name.to_owned(),
                    value: Some(v.clone()),
                    source_time: Some(rfc3339_ms(time_ms)),
                    quality: fused.quality,
                    sources: fused.sources.clone(),
                }
            }
            None => degraded(prop, twin, name, now_s),
        };
        prop.quality = Some(update.quality);
        out.updates.push(update);
        for suspect in &fused.suspects {
            metrics::counter!("twinguard_telemetry_suspect_total", "group" => group.id.clone())
                .increment(1);
            let last_value = prop
                .latest
                .iter()
                .find(|(d, _, _)| d == suspect)
                .map(|(_, v, _)| v.clone())
                .unwrap_or(Value::Null);
            if let Some(d) = state.devices.get_mut(suspect)
                && d.suspect.is_none()
            {
                tracing::warn!(device = %suspect, group = %group.id, "sensor disagrees with its group; marked suspect");
                d.suspect = Some(Suspect {
                    group: group.id.clone(),
                    since: now.to_owned(),
                    last_value,
                    fused_value: fused.value.clone().unwrap_or(Value::Null),
                });
                out.records.push(put(Table::Devices, suspect, &*d));
            }
        }
    }

    /// Marks properties whose stream went stale, or whose group lost quorum, as estimated (with
    /// a forecast) or stale (without one). Run about once a second.
    pub async fn sweep(&self) -> DomainResult<usize> {
        let now_s = self.now_ms() as f64 / 1000.0;
        let pending = {
            let mut state = self.state()?;
            let graph = self.inner.twins.snapshot();
            let mut updates = Vec::new();
            let limits: Vec<((String, String), f64)> = state
                .props
                .keys()
                .filter_map(|(twin, name)| {
                    let limit = match state.group_for(twin, name) {
                        Some(g) => Some(g.fresh_seconds),
                        None => {
                            let models = models_of(&graph, twin)?;
                            state.policy_for(&models, name)?.stale_after_seconds
                        }
                    }?;
                    Some(((twin.clone(), name.clone()), limit))
                })
                .collect();
            for ((twin, name), limit) in limits {
                let Some(prop) = state.props.get_mut(&(twin.clone(), name.clone())) else {
                    continue;
                };
                let fresh = now_s - prop.good_s <= limit;
                if fresh || matches!(prop.quality, Some(Quality::Estimated | Quality::Stale)) {
                    continue;
                }
                let update = degraded(prop, &twin, &name, now_s);
                prop.quality = Some(update.quality);
                tracing::warn!(twin = %twin, property = %name, quality = update.quality.as_str(), "property degraded");
                updates.push(update);
            }
            if updates.is_empty() {
                return Ok(0);
            }
            let n = updates.len();
            (self.submit(updates, Vec::new(), Vec::new())?, n)
        };
        pending.0.await?;
        Ok(pending.1)
    }

    /// The properties not currently good: `(twin, property, quality)`. Commands that depend on
    /// them can require approval (control DI-8, DI-9).
    pub fn degraded(&self) -> DomainResult<Vec<(String, String, Quality)>> {
        let state = self.state()?;
        let mut out: Vec<_> = state
            .props
            .iter()
            .filter_map(|((t, n), p)| match p.quality {
                Some(q) if q != Quality::Good => Some((t.clone(), n.clone(), q)),
                _ => None,
            })
            .collect();
        out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        Ok(out)
    }
}

/// The fallback update for a property without trustworthy input: its forecast, which for a
/// sensor group stays within the range of its recent good values.
fn degraded(prop: &Prop, twin: &str, name: &str, now_s: f64) -> PropertyUpdate {
    let low = prop.recent.iter().copied().fold(f64::INFINITY, f64::min);
    let high = prop
        .recent
        .iter()
        .copied()
        .fold(f64::NEG_INFINITY, f64::max);
    let forecast = prop
        .forecaster
        .forecast(now_s)
        .map(|v| if low <= high { v.clamp(low, high) } else { v });
    match forecast {
        Some(v) => PropertyUpdate {
            twin: twin.to_owned(),
            name: name.to_owned(),
            value: serde_json::Number::from_f64(v).map(Value::Number),
            source_time: Some(rfc3339_ms((now_s * 1000.0) as i64)),
            quality: Quality::Estimated,
            sources: vec!["forecast".into()],
        },
        None => PropertyUpdate {
            twin: twin.to_owned(),
            name: name.to_owned(),
            value: None,
            source_time: None,
            quality: Quality::Stale,
            sources: Vec::new(),
        },
    }
}

/// Why a message whose signature verified with `key` is refused by the registry as it stands
/// at `now_ms`, if it is: the device is gone, suspended or revoked, or no longer holds `key`
/// (a rotation replaced it, or its overlap ended). The last is answered as the bad signature
/// it now is, as for a message the key never signed.
fn still_refused(
    state: &mut State,
    device: &str,
    key: &DeviceKey,
    now_ms: i64,
) -> Option<&'static str> {
    if let Some(reason) = status_refusal(state, device) {
        return Some(reason);
    }
    match state.device_keys(device) {
        Some(keys) if keys.accept(key, now_ms) => None,
        _ => Some(Reject::BadSignature.code()),
    }
}

/// Why the registry refuses every message of `device` whatever its signature, if it does.
fn status_refusal(state: &State, device: &str) -> Option<&'static str> {
    match state.devices.get(device).map(|d| d.status) {
        None => Some("unknown_device"),
        Some(Status::Revoked) => Some("revoked"),
        Some(Status::Suspended) => Some("suspended"),
        Some(Status::Active) => None,
    }
}

fn forget(state: &mut State, marks: &Marks) {
    for (device, seq) in &marks.windows {
        if let Some(w) = state.windows.get_mut(device) {
            w.forget(*seq);
        }
    }
    for key in &marks.held {
        state.unhold(key);
    }
}

/// The twin's model and every model it extends.
pub(crate) fn models_of(graph: &Graph, twin: &str) -> Option<Vec<String>> {
    let twin = graph.twin(twin)?;
    let entry = graph.model(&twin.model)?;
    let mut models = vec![entry.interface.id.to_string()];
    models.extend(entry.interface.ancestors.iter().map(ToString::to_string));
    Some(models)
}

/// Checks a reading against the twin's model: `Ok((is_property, model))` when `name` is a
/// property or telemetry of the twin's model and `value` fits its schema.
pub(crate) fn check_schema<'g>(
    graph: &'g Graph,
    twin: &str,
    name: &str,
    value: &Value,
) -> Result<(bool, &'g Interface), &'static str> {
    let found = graph.twin(twin).and_then(|t| graph.model(&t.model));
    let Some(entry) = found else {
        return Err("twin_missing");
    };
    let iface = &*entry.interface;
    if let Some(p) = iface.properties.get(name) {
        p.schema.check(value).map_err(|_| "schema")?;
        Ok((true, iface))
    } else if let Some(t) = iface.telemetry.get(name) {
        t.schema.check(value).map_err(|_| "schema")?;
        Ok((false, iface))
    } else {
        Err("not_in_model")
    }
}

/// Whether `iface` is the model `model` or extends it.
fn is_of_model(iface: &Interface, model: &str) -> bool {
    iface.id.as_str() == model || iface.ancestors.iter().any(|a| a.as_str() == model)
}

/// RFC 3339 of a millisecond timestamp.
pub(crate) fn rfc3339_ms(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .map(twinguard_core::clock::rfc3339)
        .unwrap_or_else(|_| ms.to_string())
}
