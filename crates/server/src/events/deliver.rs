//! Delivery: one task per endpoint reads the change feed from the endpoint's position, sends
//! each event that a route to the endpoint matches, and moves the position on.
//!
//! - **At least once.** The stored position only passes an event once the destination
//!   acknowledged it (a JetStream publish acknowledgement, an MQTT PUBACK, a 2xx answer) or it
//!   was dead-lettered; a crash in between sends it again, with the same event ID
//!   (`Nats-Msg-Id`, `webhook-id`).
//! - **Pipelined, in order per twin.** An endpoint keeps several events in flight at once (up
//!   to [`window`] for its kind), but never two of the same twin: the next event of a twin
//!   starts only when the one before it was acknowledged or dead-lettered, so order per twin
//!   holds whatever the transport does with a failure. Order breaks only where an event is
//!   dead-lettered.
//! - **Retries** back off exponentially with full jitter, from the endpoint's first delay up to
//!   a minute, per event; after a failure the whole endpoint also sends one event at a time,
//!   after its own backoff, until a send succeeds again (a destination that is down is probed,
//!   not flooded). After `maxAttempts`, or once it is `maxAgeSeconds` old (from its commit, as
//!   ADT's event time-to-live), an event goes to the dead-letter store; events that age past it
//!   while waiting go there without another attempt.
//! - **Routes are read at each attempt**, so deleting a route or the endpoint stops delivery at
//!   once.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::events::EventSignature;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use futures_util::StreamExt;
use futures_util::future::OptionFuture;
use futures_util::stream::FuturesUnordered;
use rand::Rng;
use serde_json::{Value, json};
use twinguard_core::feed::FeedEvent;
use twinguard_core::store::{Mutation, Table};

use super::endpoint::{Endpoint, Kind};
use super::{Inner, cloudevent};
use crate::egress::Destination;

/// Feed records read at a time.
const READ_BATCH: usize = 256;
/// Feed records read ahead of the oldest unfinished one, at most.
const READ_AHEAD: usize = 2_048;
/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How long one send may take.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// How often, at most, a busy endpoint stores its position (an idle one stores it at once).
const POSITION_EVERY: Duration = Duration::from_millis(50);
/// Most dead letters kept per endpoint; at the limit the endpoint stops (and keeps retrying)
/// rather than drop events.
pub const MAX_DEAD_LETTERS: usize = 10_000;

/// Events an endpoint of `kind` keeps in flight at once. JetStream acknowledges each publish
/// on one connection; a webhook needs one HTTP/1.1 connection per request in flight; MQTT
/// waits for each PUBACK (rumqttc does not say which publish a PUBACK answers).
pub fn window(kind: Kind) -> usize {
    match kind {
        Kind::Nats => 256,
        Kind::Webhook => 16,
        Kind::Mqtt => 1,
    }
}

/// An event ready to send: its CloudEvent bytes and signature.
pub struct Prepared {
    pub seq: u64,
    pub id: String,
    pub time: String,
    /// Shared by every attempt without a copy.
    pub body: bytes::Bytes,
    /// Made once for every attempt, with the key that made it: an attempt after a rotation
    /// still names the key that signed.
    pub signature: EventSignature,
}

impl Prepared {
    pub fn new(event: &FeedEvent, inner: &Inner) -> Self {
        let body = bytes::Bytes::from(cloudevent::cloud_event_bytes(event, &inner.source));
        let signature = inner.key.sign(&body);
        Self {
            seq: event.seq,
            id: event.id.clone(),
            time: event.time.clone(),
            body,
            signature,
        }
    }
}

/// A feed record on its way to one endpoint.
struct Pending {
    event: FeedEvent,
    /// The event's commit time, in Unix seconds (read once from `event.time`).
    committed: f64,
    /// Built at the first attempt, kept for the retries.
    prepared: Option<Arc<Prepared>>,
    attempts: u32,
    /// The next wait after a failure (doubles, up to [`MAX_BACKOFF`]).
    backoff: Duration,
    /// No attempt before this.
    not_before: Option<Instant>,
}

/// What an attempt gives back: the event, the connection it made (if it had none), and the
/// outcome.
type Attempt =
    Pin<Box<dyn Future<Output = (Pending, Option<Arc<Sink>>, Result<(), SendError>)> + Send>>;

/// Runs delivery for `endpoint` until the endpoint is deleted or replaced (the task is aborted
/// then), or, on a shared store, until `lease` (the deadline of this node's delivery lease)
/// passes without a renewal.
pub async fn run(
    inner: Arc<Inner>,
    endpoint: Arc<Endpoint>,
    lease: Option<tokio::sync::watch::Receiver<Instant>>,
) {
    let position = inner.position(&endpoint.name);
    let metrics = Metrics::new(&endpoint.name);
    let mut delivery = Delivery {
        feed: inner.service.watch_feed(),
        window: window(endpoint.kind),
        backoff: endpoint.initial_backoff(),
        inner,
        endpoint,
        sink: None,
        read: position,
        stored: position,
        storing: None,
        confirmed: position,
        last_store: Instant::now(),
        unfinished: BTreeMap::new(),
        metrics,
        queue: VecDeque::new(),
        retry: BTreeMap::new(),
        busy: HashSet::new(),
        in_flight: FuturesUnordered::new(),
        failing: None,
    };
    // The lease's end stops the delivery wherever it is: between two attempts, or in the middle
    // of a dead letter's commit or a send (which are dropped), so nothing starts after it.
    let name = delivery.endpoint.name.clone();
    tokio::select! {
        () = delivery.run() => {}
        () = lease_ends(lease) => {
            tracing::warn!(endpoint = %name, "the delivery lease was not renewed in time: this node stops delivering the endpoint");
        }
    }
}

/// Returns once the lease's deadline passed without a renewal moving it on (or its holder
/// dropped it); never without a lease.
async fn lease_ends(lease: Option<tokio::sync::watch::Receiver<Instant>>) {
    let Some(mut deadline) = lease else {
        return std::future::pending().await;
    };
    loop {
        let at = *deadline.borrow_and_update();
        if at <= Instant::now() {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep_until(at.into()) => {}
            changed = deadline.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

/// One endpoint's delivery state.
struct Delivery {
    inner: Arc<Inner>,
    endpoint: Arc<Endpoint>,
    feed: tokio::sync::watch::Receiver<u64>,
    window: usize,
    sink: Option<Arc<Sink>>,
    /// The last feed position read.
    read: u64,
    /// The last position stored (or being stored).
    stored: u64,
    storing: Option<tokio::task::JoinHandle<bool>>,
    last_store: Instant,
    /// Every event read and not finished (acknowledged, dead-lettered or no longer routed),
    /// with its commit time (Unix seconds): the position is just below the first.
    unfinished: BTreeMap<u64, f64>,
    /// Read, not yet tried, in feed order.
    queue: VecDeque<Pending>,
    /// Tried and failed, waiting for their next attempt, by feed position.
    retry: BTreeMap<u64, Pending>,
    /// Twins with an event in flight or waiting for a retry.
    busy: HashSet<String>,
    in_flight: FuturesUnordered<Attempt>,
    /// Set while the last attempt failed: one attempt at a time, none before this instant.
    failing: Option<Instant>,
    /// The endpoint's next wait while failing.
    backoff: Duration,
    metrics: Metrics,
    /// The last position stored, before the one being stored (`stored`), if that fails.
    confirmed: u64,
}

/// The endpoint's metrics, looked up once rather than at each event.
struct Metrics {
    delivered: metrics::Counter,
    retried: metrics::Counter,
    dead_lettered: metrics::Counter,
    skipped: metrics::Counter,
    lag: metrics::Gauge,
    lag_seconds: metrics::Gauge,
}

impl Metrics {
    fn new(endpoint: &str) -> Self {
        let name = endpoint.to_owned();
        Self {
            delivered: metrics::counter!("twinguard_events_delivered_total", "endpoint" => name.clone()),
            retried: metrics::counter!("twinguard_events_retried_total", "endpoint" => name.clone()),
            dead_lettered: metrics::counter!("twinguard_events_dead_lettered_total", "endpoint" => name.clone()),
            skipped: metrics::counter!("twinguard_events_skipped_total", "endpoint" => name.clone()),
            lag: metrics::gauge!("twinguard_events_lag", "endpoint" => name.clone()),
            lag_seconds: metrics::gauge!("twinguard_events_lag_seconds", "endpoint" => name),
        }
    }
}

impl Delivery {
    async fn run(&mut self) {
        loop {
            if !self.read_feed() {
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            self.expire(READ_BATCH).await;
            self.start_attempts();
            self.store_position();
            self.report_lag();
            let head = *self.feed.borrow();
            let wake = self.next_wake();
            let can_read = self.read < head && self.unfinished.len() < READ_AHEAD;
            tokio::select! {
                Some((pending, sink, result)) = self.in_flight.next(), if !self.in_flight.is_empty() => {
                    self.finished(pending, sink, result).await;
                }
                changed = self.feed.changed(), if !can_read => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = sleep_until(wake), if wake.is_some() => {}
                stored = OptionFuture::from(self.storing.as_mut()), if self.storing.is_some() => {
                    self.storing = None;
                    match stored {
                        Some(Ok(true)) => self.confirmed = self.stored,
                        // Not stored: stored again at the next chance.
                        _ => self.stored = self.confirmed,
                    }
                }
                else => {}
            }
        }
    }

    /// Reads the next records of the feed while the read-ahead allows. False when the feed
    /// cannot be read.
    fn read_feed(&mut self) -> bool {
        let head = *self.feed.borrow_and_update();
        while self.read < head && self.unfinished.len() < READ_AHEAD {
            let events = match self.inner.service.feed_after(self.read, READ_BATCH) {
                Ok(events) => events,
                Err(e) => {
                    tracing::error!(endpoint = %self.endpoint.name, error = %e, "the change feed cannot be read");
                    return false;
                }
            };
            // Records trimmed before this endpoint had them: it lagged past the backlog.
            let next = events.first().map_or(head + 1, |e| e.seq);
            self.skipped(next.saturating_sub(self.read + 1));
            let Some(last) = events.last().map(|e| e.seq) else {
                self.read = head;
                break;
            };
            for event in events {
                let committed = unix_seconds(&event.time);
                self.unfinished.insert(event.seq, committed);
                self.queue.push_back(Pending {
                    event,
                    committed,
                    prepared: None,
                    attempts: 0,
                    backoff: self.endpoint.initial_backoff(),
                    not_before: None,
                });
            }
            self.read = last;
        }
        true
    }

    fn skipped(&self, count: u64) {
        if count > 0 {
            self.metrics.skipped.increment(count);
            tracing::error!(endpoint = %self.endpoint.name, count, after = self.read, "events were dropped from the feed before this endpoint had them (it lagged past the backlog)");
        }
    }

    /// Dead-letters, without another attempt, the oldest waiting events that are older than
    /// `maxAgeSeconds` (counted from their commit): an endpoint that was down for longer than
    /// that drains its backlog into the dead-letter store at once instead of one probe at a
    /// time. At most `limit` per call, so the loop stays responsive.
    async fn expire(&mut self, limit: usize) {
        let max_age = self.endpoint.max_age().as_secs_f64();
        for _ in 0..limit {
            let oldest_retry = self.retry.keys().next().copied();
            let oldest_new = self.queue.front().map(|p| p.event.seq);
            let from_retry = match (oldest_retry, oldest_new) {
                (Some(r), Some(q)) => r < q,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => return,
            };
            let pending = if from_retry {
                self.retry.values().next()
            } else {
                self.queue.front()
            };
            if pending.is_none_or(|p| age_seconds(p.committed) < max_age) {
                return;
            }
            let mut pending = if from_retry {
                match self.retry.pop_first() {
                    Some((_, p)) => p,
                    None => return,
                }
            } else {
                match self.queue.pop_front() {
                    Some(p) => p,
                    None => return,
                }
            };
            let prepared = pending
                .prepared
                .get_or_insert_with(|| Arc::new(Prepared::new(&pending.event, &self.inner)))
                .clone();
            let error = "older than maxAgeSeconds before it could be delivered";
            if self
                .inner
                .dead_letter(&self.endpoint, &prepared, pending.attempts, error)
                .await
            {
                self.metrics.dead_lettered.increment(1);
                self.finish(&pending);
            } else {
                // The dead letters are full: it waits where it was.
                if from_retry {
                    self.retry.insert(pending.event.seq, pending);
                } else {
                    self.queue.push_front(pending);
                }
                return;
            }
        }
    }

    /// Starts every attempt that may start now: retries that are due first, then new events of
    /// twins with nothing in flight, up to the window (one at a time while failing).
    fn start_attempts(&mut self) {
        let now = Instant::now();
        let limit = if self.failing.is_some() || self.sink.is_none() {
            1
        } else {
            self.window
        };
        if self.failing.is_some_and(|until| until > now) {
            return;
        }
        let due: Vec<u64> = if self.failing.is_some() {
            // The probe: the oldest event that failed, whatever its own backoff says (the
            // endpoint's backoff has passed).
            self.retry.keys().next().copied().into_iter().collect()
        } else {
            self.retry
                .iter()
                .filter(|(_, p)| p.not_before.is_none_or(|t| t <= now))
                .map(|(seq, _)| *seq)
                .collect()
        };
        for seq in due {
            if self.in_flight.len() >= limit {
                return;
            }
            if let Some(pending) = self.retry.remove(&seq) {
                // A route or the endpoint deleted meanwhile: the event is no longer wanted.
                if self.inner.routed(&self.endpoint.name, &pending.event) {
                    self.attempt(pending);
                } else {
                    self.finish(&pending);
                }
            }
        }
        let mut blocked = 0;
        while self.in_flight.len() < limit && blocked < self.queue.len() {
            let pending = &self.queue[blocked];
            if self.busy.contains(&pending.event.twin) {
                // An earlier event of this twin is unfinished: this one waits behind it (and
                // so does every later one of the twin, which is further back in the queue).
                blocked += 1;
                continue;
            }
            let Some(pending) = self.queue.remove(blocked) else {
                break;
            };
            if self.inner.routed(&self.endpoint.name, &pending.event) {
                self.busy.insert(pending.event.twin.clone());
                self.attempt(pending);
            } else {
                self.unfinished.remove(&pending.event.seq);
            }
        }
    }

    fn attempt(&mut self, mut pending: Pending) {
        let prepared = pending
            .prepared
            .get_or_insert_with(|| Arc::new(Prepared::new(&pending.event, &self.inner)))
            .clone();
        pending.attempts += 1;
        let inner = self.inner.clone();
        let endpoint = self.endpoint.clone();
        let sink = self.sink.clone();
        self.in_flight.push(Box::pin(async move {
            let (sink, made) = match sink {
                Some(sink) => (sink, None),
                None => match Sink::connect(&endpoint, &inner).await {
                    Ok(sink) => {
                        let sink = Arc::new(sink);
                        (sink.clone(), Some(sink))
                    }
                    Err(e) => return (pending, None, Err(e)),
                },
            };
            let result = sink.send(&endpoint, &inner, &prepared).await;
            (pending, made, result)
        }));
    }

    async fn finished(
        &mut self,
        mut pending: Pending,
        made: Option<Arc<Sink>>,
        result: Result<(), SendError>,
    ) {
        let name = self.endpoint.name.as_str();
        if let Some(sink) = made {
            self.sink = Some(sink);
        }
        match result {
            Ok(()) => {
                self.metrics.delivered.increment(1);
                self.failing = None;
                self.backoff = self.endpoint.initial_backoff();
                self.finish(&pending);
            }
            Err(e) => {
                tracing::warn!(endpoint = %name, event = %pending.event.id, attempt = pending.attempts, error = %e, "an event was not delivered");
                if e.reconnect {
                    self.sink = None;
                }
                let exhausted = pending.attempts >= self.endpoint.max_attempts()
                    || age_seconds(pending.committed) >= self.endpoint.max_age().as_secs_f64();
                if exhausted
                    && let Some(prepared) = pending.prepared.clone()
                    && self
                        .inner
                        .dead_letter(&self.endpoint, &prepared, pending.attempts, &e.message)
                        .await
                {
                    self.metrics.dead_lettered.increment(1);
                    self.finish(&pending);
                    return;
                }
                self.metrics.retried.increment(1);
                let now = Instant::now();
                pending.not_before = Some(now + jitter(pending.backoff));
                pending.backoff = (pending.backoff * 2).min(MAX_BACKOFF);
                if self.failing.is_none_or(|until| until <= now) {
                    // The first failure, or a probe that failed: wait before the next attempt.
                    self.failing = Some(now + jitter(self.backoff));
                    self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                }
                self.retry.insert(pending.event.seq, pending);
            }
        }
    }

    /// `pending` needs nothing more: its twin's next event may go.
    fn finish(&mut self, pending: &Pending) {
        self.busy.remove(&pending.event.twin);
        self.unfinished.remove(&pending.event.seq);
    }

    /// The position every event up to which is finished.
    fn position(&self) -> u64 {
        match self.unfinished.keys().next() {
            Some(first) => first - 1,
            None => self.read,
        }
    }

    /// Stores the position in the background when it moved on: at most one store at a time,
    /// at most every [`POSITION_EVERY`] while events are in flight.
    fn store_position(&mut self) {
        let position = self.position();
        if self.storing.is_some() || position <= self.stored {
            return;
        }
        let idle = self.in_flight.is_empty() && self.queue.is_empty();
        if !idle && self.last_store.elapsed() < POSITION_EVERY {
            return;
        }
        self.stored = position;
        self.last_store = Instant::now();
        let inner = self.inner.clone();
        let name = self.endpoint.name.clone();
        self.storing = Some(tokio::spawn(async move {
            inner.set_position(&name, position).await
        }));
    }

    fn report_lag(&self) {
        let head = *self.feed.borrow();
        self.metrics
            .lag
            .set(head.saturating_sub(self.position()) as f64);
        let age = self
            .unfinished
            .values()
            .next()
            .map(|committed| age_seconds(*committed))
            .unwrap_or(0.0);
        self.metrics.lag_seconds.set(age);
    }

    /// When the loop must look again without anything finishing: a retry or the end of the
    /// endpoint's backoff falling due, or the position waiting to be stored.
    fn next_wake(&self) -> Option<Instant> {
        let mut wake = self.failing;
        if self.failing.is_none() {
            wake = self.retry.values().filter_map(|p| p.not_before).min();
        }
        if self.storing.is_none() && self.position() > self.stored {
            let at = self.last_store + POSITION_EVERY;
            wake = Some(wake.map_or(at, |w| w.min(at)));
        }
        // The oldest waiting event reaching maxAgeSeconds (it is dead-lettered then).
        let oldest = [self.retry.values().next(), self.queue.front()]
            .into_iter()
            .flatten()
            .min_by_key(|p| p.event.seq);
        if let Some(p) = oldest {
            let left = self.endpoint.max_age().as_secs_f64() - age_seconds(p.committed);
            // Already due: `expire` ran just before and left it (its batch was done, or the
            // dead letters are full): look again shortly, not in a busy loop.
            let left = if left <= 0.0 {
                0.05
            } else {
                left.min(86_400.0 * 7.0)
            };
            let at = Instant::now() + Duration::from_secs_f64(left);
            wake = Some(wake.map_or(at, |w| w.min(at)));
        }
        wake
    }
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at.into()).await;
    }
}

/// A wait drawn uniformly from zero to `backoff` ("full jitter").
fn jitter(backoff: Duration) -> Duration {
    rand::rng().random_range(Duration::ZERO..=backoff)
}

/// An RFC 3339 time in Unix seconds; an unreadable one counts as now (age zero).
fn unix_seconds(time: &str) -> f64 {
    time::OffsetDateTime::parse(time, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| time::OffsetDateTime::now_utc())
        .unix_timestamp_nanos() as f64
        / 1e9
}

/// Seconds since `committed` (Unix seconds), never negative.
fn age_seconds(committed: f64) -> f64 {
    let now = time::OffsetDateTime::now_utc().unix_timestamp_nanos() as f64 / 1e9;
    (now - committed).max(0.0)
}

/// Why a send failed, and whether the connection should be made again.
#[derive(Debug)]
pub struct SendError {
    pub message: String,
    pub reconnect: bool,
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

fn failed(message: impl Into<String>, reconnect: bool) -> SendError {
    SendError {
        message: message.into(),
        reconnect,
    }
}

/// A connection to a destination.
pub enum Sink {
    Nats(async_nats::jetstream::Context),
    Mqtt(MqttSink),
    Webhook(reqwest::Client),
}

pub struct MqttSink {
    client: rumqttc::v5::AsyncClient,
    /// One publish at a time waits for its PUBACK.
    acks: tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Result<(), String>>>,
    task: tokio::task::AbortHandle,
}

impl Drop for MqttSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Sink {
    /// Connects to `endpoint`'s destination through the egress check (names resolved now, only
    /// admitted addresses used).
    pub async fn connect(endpoint: &Endpoint, inner: &Inner) -> Result<Self, SendError> {
        let url = &endpoint.url;
        match endpoint.kind {
            Kind::Webhook => {
                let mut builder = inner
                    .egress
                    .http_client(url)
                    .map_err(|e| failed(e.to_string(), true))?
                    .timeout(SEND_TIMEOUT)
                    .use_rustls_tls()
                    .tls_built_in_root_certs(false)
                    .https_only(url.scheme() == "https");
                if let Some(pem) = endpoint.ca_pem().map_err(|e| failed(e, true))? {
                    let certs = reqwest::Certificate::from_pem_bundle(&pem)
                        .map_err(|_| failed("caFile holds no certificate", true))?;
                    for cert in certs {
                        builder = builder.add_root_certificate(cert);
                    }
                }
                let client = builder
                    .build()
                    .map_err(|e| failed(format!("HTTP client: {e}"), true))?;
                Ok(Self::Webhook(client))
            }
            Kind::Nats => {
                let destination =
                    Destination::from_url(url).map_err(|e| failed(e.to_string(), true))?;
                let addrs = inner
                    .egress
                    .resolve(&destination)
                    .await
                    .map_err(|e| failed(e.to_string(), true))?;
                let mut options = endpoint
                    .nats_auth(
                        async_nats::ConnectOptions::new()
                            .connection_timeout(SEND_TIMEOUT)
                            .max_reconnects(Some(0)),
                    )
                    .map_err(|e| failed(e, true))?;
                let addr = addrs
                    .first()
                    .ok_or_else(|| failed("no admitted address", true))?;
                // Only the admitted address is connected to, with TLS too: the certificate is
                // checked for the endpoint's host name whatever address the library dialled.
                let target = if url.scheme() == "tls" {
                    let pem = endpoint
                        .ca_pem()
                        .map_err(|e| failed(e, true))?
                        .unwrap_or_default();
                    options = options
                        .require_tls(true)
                        .tls_client_config(pinned_tls(&pem, url.host_str().unwrap_or_default())?);
                    format!("tls://{addr}")
                } else {
                    format!("nats://{addr}")
                };
                let client = options
                    .connect(target)
                    .await
                    .map_err(|e| failed(format!("NATS connect: {e}"), true))?;
                Ok(Self::Nats(async_nats::jetstream::new(client)))
            }
            Kind::Mqtt => connect_mqtt(endpoint, inner).await,
        }
    }

    pub async fn send(
        &self,
        endpoint: &Endpoint,
        inner: &Inner,
        event: &Prepared,
    ) -> Result<(), SendError> {
        match self {
            Self::Nats(js) => {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-Msg-Id", event.id.as_str());
                headers.insert("Content-Type", "application/cloudevents+json");
                headers.insert("Twinguard-Signature", event.signature.value.as_str());
                headers.insert("Twinguard-Key-Id", event.signature.kid.as_str());
                let subject = endpoint.spec.subject.clone().unwrap_or_default();
                let ack = tokio::time::timeout(SEND_TIMEOUT, async {
                    js.publish_with_headers(subject, headers, event.body.clone())
                        .await
                        .map_err(|e| failed(format!("NATS publish: {e}"), true))?
                        .await
                        .map_err(|e| failed(format!("JetStream acknowledgement: {e}"), false))
                })
                .await
                .map_err(|_| failed("JetStream acknowledgement timed out", true))?;
                ack.map(|_| ())
            }
            Self::Mqtt(mqtt) => {
                use rumqttc::v5::mqttbytes::QoS;
                use rumqttc::v5::mqttbytes::v5::PublishProperties;
                let properties = PublishProperties {
                    content_type: Some("application/cloudevents+json".into()),
                    user_properties: vec![
                        ("twinguard-signature".into(), event.signature.value.clone()),
                        ("twinguard-key-id".into(), event.signature.kid.clone()),
                        ("ce-id".into(), event.id.clone()),
                    ],
                    ..PublishProperties::default()
                };
                let mut acks = mqtt.acks.lock().await;
                while acks.try_recv().is_ok() {}
                let topic = endpoint.spec.topic.clone().unwrap_or_default();
                mqtt.client
                    .publish_with_properties(
                        topic,
                        QoS::AtLeastOnce,
                        false,
                        event.body.clone(),
                        properties,
                    )
                    .await
                    .map_err(|e| failed(format!("MQTT publish: {e}"), true))?;
                match tokio::time::timeout(SEND_TIMEOUT, acks.recv()).await {
                    Ok(Some(Ok(()))) => Ok(()),
                    Ok(Some(Err(e))) => Err(failed(e, true)),
                    Ok(None) => Err(failed("the MQTT connection ended", true)),
                    Err(_) => Err(failed("no PUBACK in time", true)),
                }
            }
            Self::Webhook(client) => {
                let timestamp = time::OffsetDateTime::now_utc().unix_timestamp().to_string();
                let signature = webhook_signature(endpoint, inner, event, &timestamp)
                    .map_err(|e| failed(e, false))?;
                let answer = client
                    .post(endpoint.url.clone())
                    .header("content-type", "application/cloudevents+json")
                    .header("webhook-id", &event.id)
                    .header("webhook-timestamp", &timestamp)
                    .header("webhook-signature", signature)
                    .body(event.body.clone())
                    .send()
                    .await
                    .map_err(|e| failed(format!("webhook: {}", without_url(&e)), false))?;
                let status = answer.status();
                if status.is_success() {
                    Ok(())
                } else {
                    // Redirects are not followed: a 3xx is a failure like any other.
                    Err(failed(
                        format!("webhook answered {}", status.as_u16()),
                        false,
                    ))
                }
            }
        }
    }
}

/// reqwest's error text without the URL (which may carry a token in its path).
fn without_url(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "request failed"
    };
    let mut source = std::error::Error::source(e);
    let mut detail = String::new();
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    if detail.is_empty() {
        kind.to_owned()
    } else {
        format!("{kind}: {}", crate::audit::bounded(&detail))
    }
}

/// The Standard Webhooks `webhook-signature` value: `v1,<HMAC-SHA256>` when the endpoint has a
/// secret, and `v1a,<Ed25519>` with the event key, both over `id.timestamp.body`.
pub fn webhook_signature(
    endpoint: &Endpoint,
    inner: &Inner,
    event: &Prepared,
    timestamp: &str,
) -> Result<String, String> {
    let mut signed = Vec::with_capacity(event.body.len() + 64);
    signed.extend_from_slice(event.id.as_bytes());
    signed.push(b'.');
    signed.extend_from_slice(timestamp.as_bytes());
    signed.push(b'.');
    signed.extend_from_slice(&event.body);
    let mut parts = Vec::new();
    if let Some(secret) = endpoint.webhook_secret()? {
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &secret);
        let tag = aws_lc_rs::hmac::sign(&key, &signed);
        parts.push(format!("v1,{}", STANDARD.encode(tag.as_ref())));
    }
    parts.push(format!("v1a,{}", inner.key.sign(&signed).value));
    Ok(parts.join(" "))
}

async fn connect_mqtt(endpoint: &Endpoint, inner: &Inner) -> Result<Sink, SendError> {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let url = &endpoint.url;
    let destination = Destination::from_url(url).map_err(|e| failed(e.to_string(), true))?;
    let addrs = inner
        .egress
        .resolve(&destination)
        .await
        .map_err(|e| failed(e.to_string(), true))?;
    let tls = url.scheme() == "mqtts";
    // Only the admitted address is connected to (with TLS the certificate is checked for the
    // host name: `pinned_tls`).
    let host = addrs
        .first()
        .map(|a| a.ip().to_string())
        .ok_or_else(|| failed("no admitted address", true))?;
    let client_id = format!("twinguard-events-{}", uuid::Uuid::new_v4().simple());
    let mut options = MqttOptions::new(client_id, host, destination.port());
    options.set_keep_alive(Duration::from_secs(30));
    options.set_clean_start(true);
    if let (Some(user), Some(password)) = (
        &endpoint.spec.username,
        endpoint.password().map_err(|e| failed(e, true))?,
    ) {
        options.set_credentials(user.clone(), password.to_string());
    }
    if tls {
        let pem = endpoint
            .ca_pem()
            .map_err(|e| failed(e, true))?
            .unwrap_or_default();
        let config = pinned_tls(&pem, url.host_str().unwrap_or_default())?;
        options.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(Arc::new(config)),
        ));
    }
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    let (tx, acks) = tokio::sync::mpsc::channel(16);
    let (connected_tx, connected) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut connected_tx = Some(connected_tx);
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    if let Some(c) = connected_tx.take() {
                        let _ = c.send(Ok(()));
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    // A PUBACK with a failure reason code (>= 0x80) is a refusal.
                    let ok = (ack.reason as u8) < 0x80;
                    let _ = tx
                        .send(if ok {
                            Ok(())
                        } else {
                            Err(format!("PUBACK {:?}", ack.reason))
                        })
                        .await;
                }
                Ok(_) => {}
                Err(e) => {
                    let message = format!("MQTT: {e}");
                    if let Some(c) = connected_tx.take() {
                        let _ = c.send(Err(message));
                        return;
                    }
                    let _ = tx.send(Err(message)).await;
                    return;
                }
            }
        }
    })
    .abort_handle();
    match tokio::time::timeout(SEND_TIMEOUT, connected).await {
        Ok(Ok(Ok(()))) => Ok(Sink::Mqtt(MqttSink {
            client,
            acks: tokio::sync::Mutex::new(acks),
            task,
        })),
        Ok(Ok(Err(e))) => {
            task.abort();
            Err(failed(e, true))
        }
        _ => {
            task.abort();
            Err(failed("MQTT connection timed out", true))
        }
    }
}

/// A TLS client configuration trusting only the anchors in `pem` that checks the server's
/// certificate for `host`, whatever name or address the client library connected with. The
/// NATS and MQTT libraries take the certificate's name from the address they dial; twinguard
/// dials the address its egress check admitted (so a DNS answer that changes between the check
/// and the connection, a rebinding, is never followed) and keeps the name check here. The
/// library then sends no SNI for the address: a broker that picks its certificate by SNI needs
/// a default certificate for this name.
fn pinned_tls(pem: &[u8], host: &str) -> Result<rustls::ClientConfig, SendError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem).flatten() {
        let _ = roots.add(cert);
    }
    let name = ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']'))
        .map_err(|_| failed("the host is not a valid TLS name", false))?
        .to_owned();
    let inner = rustls::client::WebPkiServerVerifier::builder(Arc::new(roots))
        .build()
        .map_err(|_| failed("caFile holds no usable trust anchor", false))?;
    Ok(rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedName { inner, name }))
        .with_no_client_auth())
}

/// Checks a certificate for a fixed name (see [`pinned_tls`]); everything else is WebPKI's.
#[derive(Debug)]
struct PinnedName {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    name: rustls::pki_types::ServerName<'static>,
}

impl rustls::client::danger::ServerCertVerifier for PinnedName {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _dialled: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A dead letter as stored and listed.
pub fn dead_letter_record(endpoint: &str, event: &Prepared, attempts: u32, error: &str) -> Value {
    let ce: Value = serde_json::from_slice(&event.body).unwrap_or(Value::Null);
    json!({
        "endpoint": endpoint,
        "sequence": event.seq,
        "id": event.id,
        "eventTime": event.time,
        "deadLetteredTime": twinguard_core::clock::rfc3339(time::OffsetDateTime::now_utc()),
        "attempts": attempts,
        "lastError": crate::audit::bounded(error),
        "event": ce,
    })
}

pub fn dead_letter_key(endpoint: &str, seq: u64) -> String {
    format!("{endpoint}\u{1f}{}", twinguard_core::feed::key(seq))
}

/// Stores a dead letter (the caller checked the per-endpoint limit).
pub fn dead_letter_mutation(endpoint: &str, record: &Value) -> Mutation {
    let seq = record["sequence"].as_u64().unwrap_or(0);
    Mutation::put(
        Table::DeadLetters,
        dead_letter_key(endpoint, seq),
        serde_json::to_vec(record).unwrap_or_default(),
    )
}
