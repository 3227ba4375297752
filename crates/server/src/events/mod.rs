//! Event delivery (issue 19): endpoints, the delivery tasks that read the change feed, the
//! dead-letter store, and the trimming of delivered feed records. See `docs/events.md`.

pub mod cloudevent;
pub mod deliver;
pub mod endpoint;
pub mod lease;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use twinguard_core::feed::FeedEvent;
use twinguard_core::routes::Filter;
use twinguard_core::service::TwinService;
use twinguard_core::store::{Expect, Mutation, Store, StoreError, Table};

pub use cloudevent::{EventKey, EventSignature};
use deliver::{MAX_DEAD_LETTERS, Prepared, Sink};
pub use endpoint::{Endpoint, EndpointSpec, MAX_ENDPOINTS};

use crate::egress::Egress;

/// Change-feed records kept for lagging endpoints by default (about 1 GB of store at ADT-sized
/// events); see [`Inner::trim_point`].
pub const DEFAULT_BACKLOG: u64 = 1_000_000;

/// How often delivered feed records are trimmed.
const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// How many times an endpoint edit on a shared store is decided again when another node changed
/// the endpoint between its read and its commit.
const EDIT_ATTEMPTS: usize = 4;

/// How long a shutdown waits for the store to take this node's leases back.
const RELEASE_WAIT: Duration = Duration::from_secs(5);

const NOT_STORED: &str = "the endpoint is not stored";
const CHANGED_MEANWHILE: &str = "the endpoint was changed on another node meanwhile";

/// Endpoints and their delivery, shared by the routes and the delivery tasks.
#[derive(Clone)]
pub struct Events {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events").finish_non_exhaustive()
    }
}

pub struct Inner {
    service: Arc<TwinService>,
    store: Arc<dyn Store>,
    egress: Egress,
    key: Arc<EventKey>,
    /// The CloudEvents `source`: the instance's host name.
    source: String,
    /// The only directory endpoints' credential files may be in.
    credentials: std::path::PathBuf,
    /// Most feed records kept for lagging endpoints.
    backlog: u64,
    /// On a store several nodes share: this node's name in the delivery leases (new at each
    /// start) and their times. `None` on a store of one node, which delivers every endpoint.
    leases: Option<(String, lease::Times)>,
    /// Serialises endpoint edits with lease rounds: each decides on the stored records, then
    /// updates this node's memory of them; two at once would undo each other (a deleted
    /// endpoint brought back by a round that read it before the deletion).
    edits: tokio::sync::Mutex<()>,
    /// Wakes the lease rounds early: an endpoint made here is taken at once.
    wake: tokio::sync::Notify,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    endpoints: BTreeMap<String, Running>,
    /// Each endpoint's delivery position (also stored in `Table::Deliveries`). On a shared
    /// store: as the last lease round read them, for every stored endpoint (even one this node
    /// refuses), and this node's own for the endpoints it delivers.
    positions: HashMap<String, u64>,
    /// Compiled route filters, by filter text.
    filters: HashMap<String, Option<Filter>>,
    /// Whether delivery tasks run (after [`Events::start`]).
    started: bool,
    /// Dead letters per endpoint, once counted (see [`Inner::dead_letter`]).
    dead_counts: HashMap<String, usize>,
    /// Stored endpoints this node refuses (today's allowlist), with the record refused: each
    /// is logged once, not at every round.
    refused: HashMap<String, Vec<u8>>,
    /// The lease rounds' task (on a shared store, once started).
    rounds: Option<tokio::task::AbortHandle>,
}

struct Running {
    endpoint: Arc<Endpoint>,
    /// The endpoint's record as stored: a round that reads another replaces the endpoint.
    stored: Vec<u8>,
    task: Option<tokio::task::AbortHandle>,
    /// On a shared store: the lease this node holds for the endpoint, if any.
    lease: Option<Held>,
}

/// A delivery lease this node holds.
struct Held {
    /// The lease record as committed: the endpoint's position and dead letters are written
    /// expecting it.
    record: Vec<u8>,
    /// When delivery must stop unless a round renews the lease first.
    deadline: tokio::sync::watch::Sender<Instant>,
}

impl Running {
    /// Stops the delivery of a lease this node no longer holds (another node took it, or a
    /// deletion closed it).
    fn give_up(&mut self, name: &str) {
        if self.lease.take().is_some() {
            if let Some(task) = self.task.take() {
                task.abort();
            }
            tracing::info!(endpoint = %name, "this endpoint's lease changed on another node; this node stops delivering it");
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// A refused endpoint operation.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error("{0}")]
    Invalid(String),
    #[error("endpoint '{0}' was not found")]
    NotFound(String),
    #[error("dead letter {1} of endpoint '{0}' was not found")]
    DeadLetterNotFound(String, u64),
    #[error("an instance holds at most {MAX_ENDPOINTS} endpoints")]
    TooMany,
    #[error("the event could not be delivered: {0}")]
    Undeliverable(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Events {
    /// Loads the stored endpoints and positions. Delivery starts with [`Events::start`].
    pub fn open(
        service: Arc<TwinService>,
        store: Arc<dyn Store>,
        egress: Egress,
        key: Arc<EventKey>,
        source: String,
        credentials: std::path::PathBuf,
        backlog: u64,
    ) -> Result<Self, StoreError> {
        let leases = service
            .shares_store()
            .then(|| (uuid::Uuid::new_v4().to_string(), lease::Times::default()));
        let inner = Inner {
            service,
            store,
            egress,
            key,
            source,
            credentials,
            backlog,
            leases,
            edits: tokio::sync::Mutex::new(()),
            wake: tokio::sync::Notify::new(),
            state: Mutex::new(State::default()),
        };
        let stored = lease::read(inner.store.as_ref())?;
        let inner = Arc::new(inner);
        inner.learn(&mut inner.lock(), &stored);
        Ok(Self { inner })
    }

    /// Other lease times than [`lease::Times::default`] (tests); only before [`Events::start`]
    /// and before `self` is cloned (it panics otherwise, rather than keeping the old times).
    #[cfg(test)]
    #[allow(clippy::expect_used)]
    pub fn with_lease_times(mut self, times: lease::Times) -> Self {
        let inner = Arc::get_mut(&mut self.inner).expect("lease times are set before any clone");
        if let Some((_, t)) = &mut inner.leases {
            *t = times;
        }
        self
    }

    pub fn key(&self) -> &EventKey {
        &self.inner.key
    }

    /// Starts a delivery task for every endpoint, and the trimming of delivered records. On a
    /// shared store, starts the lease rounds instead: a task runs for each endpoint whose lease
    /// this node holds.
    pub fn start(&self) {
        let mut state = self.inner.lock();
        state.started = true;
        let names: Vec<String> = state.endpoints.keys().cloned().collect();
        for name in names {
            self.inner.spawn(&mut state, &name);
        }
        drop(state);
        if let Some((_, times)) = self.inner.leases {
            let inner = self.inner.clone();
            let rounds = tokio::spawn(async move {
                loop {
                    if let Err(e) = inner.round().await {
                        tracing::error!(error = %e, "the event delivery leases could not be read or renewed");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(times.every) => {}
                        _ = inner.wake.notified() => {}
                    }
                }
            });
            self.inner.lock().rounds = Some(rounds.abort_handle());
        }
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(TRIM_EVERY);
            loop {
                every.tick().await;
                let Some(below) = inner.trim_point().await else {
                    continue;
                };
                // One trim removes at most `feed::MAX_TRIM` records: go on until the oldest record
                // still stored is at `below`, so the trim keeps up with any event rate. Nothing
                // below it: no commit made.
                let mut previous = None;
                while let Ok(first) = inner.service.feed_after(0, 1) {
                    let oldest = first.first().map_or(u64::MAX, |e| e.seq);
                    // No progress (records below the writer's own oldest position): stop.
                    if below <= oldest || previous == Some(oldest) {
                        break;
                    }
                    previous = Some(oldest);
                    if let Err(e) = inner.service.trim_feed(below).await {
                        tracing::warn!(error = %e, "delivered feed records could not be trimmed");
                        break;
                    }
                }
            }
        });
    }

    /// Creates or replaces endpoint `name`. A new endpoint delivers the events committed after
    /// it; a replaced one keeps its position. Returns whether it was created.
    ///
    /// The destination is checked against the allowlist as written and, for a name, by
    /// resolving it now: a name that resolves to no admitted address (a private one under a
    /// name rule, say) is refused here, and again at each connection.
    /// Creates or replaces endpoint `name`. Runs to its end on a task of its own, as
    /// [`Events::delete`] does.
    pub async fn put(
        &self,
        name: &str,
        spec: EndpointSpec,
    ) -> Result<(Arc<Endpoint>, bool), EventsError> {
        let (this, name) = (self.clone(), name.to_owned());
        to_the_end(async move { this.put_here(&name, spec).await }).await
    }

    async fn put_here(
        &self,
        name: &str,
        spec: EndpointSpec,
    ) -> Result<(Arc<Endpoint>, bool), EventsError> {
        let endpoint = Arc::new(
            Endpoint::check(
                name,
                spec,
                endpoint::Rules {
                    egress: self.inner.egress.policy(),
                    credentials: &self.inner.credentials,
                },
            )
            .map_err(EventsError::Invalid)?,
        );
        let destination = crate::egress::Destination::from_url(&endpoint.url)
            .map_err(|e| EventsError::Invalid(e.to_string()))?;
        self.inner
            .egress
            .resolve(&destination)
            .await
            .map_err(|e| EventsError::Invalid(e.to_string()))?;
        let stored = serde_json::to_vec(&endpoint.spec).unwrap_or_default();
        let _edits = self.inner.edits.lock().await;
        let (created, position) = match self.inner.leases {
            Some(_) => self.inner.put_shared(name, &stored).await?,
            None => self.inner.put_local(name, &stored).await?,
        };
        let mut state = self.inner.lock();
        // A replaced endpoint keeps its lease, and its holder's position. A created one that
        // this node still delivered was deleted on another node meanwhile: its lease was
        // closed then, and a round takes it again.
        let lease = state
            .endpoints
            .remove(name)
            .and_then(|mut running| running.lease.take())
            .filter(|_| !created);
        if created || lease.is_none() {
            state.positions.insert(name.to_owned(), position);
        }
        state.refused.remove(name);
        state.endpoints.insert(
            name.to_owned(),
            Running {
                endpoint: endpoint.clone(),
                stored,
                task: None,
                lease,
            },
        );
        if state.started {
            self.inner.spawn(&mut state, name);
        }
        drop(state);
        self.inner.wake.notify_one();
        Ok((endpoint, created))
    }

    pub fn get(&self, name: &str) -> Result<Arc<Endpoint>, EventsError> {
        self.inner
            .lock()
            .endpoints
            .get(name)
            .map(|r| r.endpoint.clone())
            .ok_or_else(|| EventsError::NotFound(name.to_owned()))
    }

    pub fn list(&self) -> Vec<Arc<Endpoint>> {
        self.inner
            .lock()
            .endpoints
            .values()
            .map(|r| r.endpoint.clone())
            .collect()
    }

    /// The endpoint's delivery position and the feed's head.
    pub fn progress(&self, name: &str) -> (u64, u64) {
        (self.inner.position(name), self.inner.service.feed_head())
    }

    /// Deletes endpoint `name`: its delivery stops at once (on another node that delivers it,
    /// its writes for the endpoint are refused from now on and its sending stops at its next
    /// lease round); its dead letters go with it.
    ///
    /// Runs to its end on a task of its own: the request that asked for it may be dropped
    /// (its client went away) while the store commits, and the node must still stop
    /// delivering an endpoint whose deletion landed (or, for [`Events::put`], start
    /// delivering one that was stored). Dropped halfway, a deleted endpoint went on receiving
    /// events from this node until it restarted.
    pub async fn delete(&self, name: &str) -> Result<(), EventsError> {
        let (this, name) = (self.clone(), name.to_owned());
        to_the_end(async move { this.delete_here(&name).await }).await
    }

    async fn delete_here(&self, name: &str) -> Result<(), EventsError> {
        let _edits = self.inner.edits.lock().await;
        if self.inner.leases.is_none() && !self.inner.lock().endpoints.contains_key(name) {
            return Err(EventsError::NotFound(name.to_owned()));
        }
        let shared = self.inner.leases.is_some();
        let mut deleted = false;
        for _ in 0..EDIT_ATTEMPTS {
            let key = name.to_owned();
            deleted = self
                .inner
                .blocking(move |store| delete_records(store, &key, shared, lease::now_ms()))
                .await
                .map_err(|e| match e.0.as_str() {
                    NOT_STORED => EventsError::NotFound(name.to_owned()),
                    _ => EventsError::Store(e),
                })?;
            if deleted {
                break;
            }
        }
        if !deleted {
            return Err(EventsError::Store(StoreError(CHANGED_MEANWHILE.into())));
        }
        let mut state = self.inner.lock();
        state.endpoints.remove(name);
        state.positions.remove(name);
        state.dead_counts.remove(name);
        state.refused.remove(name);
        Ok(())
    }

    /// Gives up this node's delivery leases (at shutdown): their delivery stops, and another
    /// node takes them at its next round rather than when they run out.
    pub async fn release(&self) {
        let _edits = self.inner.edits.lock().await;
        let mut batch = Vec::new();
        let mut expect = Vec::new();
        {
            let mut state = self.inner.lock();
            if let Some(rounds) = state.rounds.take() {
                rounds.abort();
            }
            for (name, running) in &mut state.endpoints {
                if let Some(task) = running.task.take() {
                    task.abort();
                }
                if let Some(held) = running.lease.take() {
                    batch.push(Mutation::delete(Table::Leases, name));
                    expect.push(Expect {
                        table: Table::Leases,
                        key: name.clone(),
                        value: Some(held.record),
                    });
                }
            }
        }
        if batch.is_empty() {
            return;
        }
        let given_up = self
            .inner
            .blocking(move |store| store.commit_expecting(&batch, &expect));
        match tokio::time::timeout(RELEASE_WAIT, given_up).await {
            Ok(Ok(true)) => tracing::info!("the event delivery leases were given up"),
            Ok(Ok(false)) => tracing::warn!(
                "the event delivery leases changed before they were given up; they run out instead"
            ),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "the event delivery leases could not be given up; they run out instead")
            }
            Err(_) => tracing::warn!(
                "the store did not answer in time to give the event delivery leases up; they run out instead"
            ),
        }
    }

    /// The dead letters of endpoint `name`, oldest first.
    pub fn dead_letters(&self, name: &str) -> Result<Vec<Value>, EventsError> {
        self.get(name)?;
        Ok(self
            .inner
            .dead_letter_rows(name, MAX_DEAD_LETTERS)?
            .into_iter()
            .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
            .collect())
    }

    pub async fn dead_letter(&self, name: &str, seq: u64) -> Result<Value, EventsError> {
        self.get(name)?;
        let key = deliver::dead_letter_key(name, seq);
        let rows = self
            .inner
            .blocking(move |store| store.range(Table::DeadLetters, &key, &format!("{key}\0"), 1))
            .await?;
        rows.into_iter()
            .next()
            .and_then(|(_, v)| serde_json::from_slice(&v).ok())
            .ok_or(EventsError::DeadLetterNotFound(name.to_owned(), seq))
    }

    /// Sends a dead letter once more, now; on success it leaves the dead-letter store.
    pub async fn replay(&self, name: &str, seq: u64) -> Result<(), EventsError> {
        let endpoint = self.get(name)?;
        let record = self.dead_letter(name, seq).await?;
        let body = serde_json::to_vec(&record["event"]).unwrap_or_default();
        let prepared = Prepared {
            seq,
            id: record["id"].as_str().unwrap_or_default().to_owned(),
            time: record["eventTime"].as_str().unwrap_or_default().to_owned(),
            signature: self.inner.key.sign(&body),
            body: body.into(),
        };
        let sink = Sink::connect(&endpoint, &self.inner)
            .await
            .map_err(|e| EventsError::Undeliverable(e.message))?;
        sink.send(&endpoint, &self.inner, &prepared)
            .await
            .map_err(|e| EventsError::Undeliverable(e.message))?;
        self.discard(name, seq).await
    }

    pub async fn discard(&self, name: &str, seq: u64) -> Result<(), EventsError> {
        self.get(name)?;
        // Read and removed on the blocking pool: a store far away must not hold a runtime
        // thread.
        let key = deliver::dead_letter_key(name, seq);
        let found = self
            .inner
            .blocking(move |store| {
                let rows = store.range(Table::DeadLetters, &key, &format!("{key}\0"), 1)?;
                if rows.is_empty() {
                    return Ok(false);
                }
                store.commit(&[Mutation::delete(Table::DeadLetters, key)])?;
                Ok(true)
            })
            .await?;
        if !found {
            return Err(EventsError::DeadLetterNotFound(name.to_owned(), seq));
        }
        if let Some(count) = self.inner.lock().dead_counts.get_mut(name) {
            *count = count.saturating_sub(1);
        }
        Ok(())
    }
}

/// Runs an edit of the endpoints on a task of its own, so that it ends even if its caller is
/// dropped (see [`Events::delete`]).
async fn to_the_end<T: Send + 'static>(
    edit: impl Future<Output = Result<T, EventsError>> + Send + 'static,
) -> Result<T, EventsError> {
    tokio::spawn(edit)
        .await
        .unwrap_or_else(|_| Err(StoreError("an endpoint edit could not be run".into()).into()))
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `job` on the store on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        job: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || job(store.as_ref()))
            .await
            .unwrap_or_else(|_| Err(StoreError("the store task failed".into())))
    }

    /// (Re)starts delivery of endpoint `name`; on a shared store only while this node holds its
    /// lease, and until the lease's deadline.
    fn spawn(self: &Arc<Self>, state: &mut State, name: &str) {
        let shared = self.leases.is_some();
        let Some(running) = state.endpoints.get_mut(name) else {
            return;
        };
        if let Some(task) = running.task.take() {
            task.abort();
        }
        let deadline = match &running.lease {
            Some(held) => Some(held.deadline.subscribe()),
            None if shared => return,
            None => None,
        };
        let task = tokio::spawn(deliver::run(
            self.clone(),
            running.endpoint.clone(),
            deadline,
        ));
        running.task = Some(task.abort_handle());
    }

    /// Makes this node's endpoints the stored ones: new and changed records are checked
    /// against today's allowlist (an endpoint the operator no longer allows stays stored but
    /// does not run here), deleted ones stop. The positions of endpoints this node does not
    /// deliver are taken as stored.
    fn learn(self: &Arc<Self>, state: &mut State, stored: &lease::Stored) {
        state
            .endpoints
            .retain(|name, _| stored.endpoints.contains_key(name));
        state
            .refused
            .retain(|name, _| stored.endpoints.contains_key(name));
        // A lease stored otherwise than this node holds it was taken by another node, or
        // closed by a deletion: its delivery stops now.
        for (name, running) in &mut state.endpoints {
            if running
                .lease
                .as_ref()
                .is_some_and(|held| stored.leases.get(name) != Some(&held.record))
            {
                running.give_up(name);
            }
        }
        for (name, record) in &stored.endpoints {
            let known = state.endpoints.get(name).map(|r| &r.stored);
            if known == Some(record) || state.refused.get(name) == Some(record) {
                continue;
            }
            let rules = endpoint::Rules {
                egress: self.egress.policy(),
                credentials: &self.credentials,
            };
            let checked = serde_json::from_slice::<EndpointSpec>(record)
                .map_err(|_| "its stored record is unreadable".to_owned())
                .and_then(|spec| Endpoint::check(name, spec, rules));
            let lease = state
                .endpoints
                .remove(name)
                .and_then(|mut running| running.lease.take());
            match checked {
                Ok(endpoint) => {
                    state.refused.remove(name);
                    state.endpoints.insert(
                        name.clone(),
                        Running {
                            endpoint: Arc::new(endpoint),
                            stored: record.clone(),
                            task: None,
                            lease,
                        },
                    );
                    if state.started {
                        self.spawn(state, name);
                    }
                }
                Err(e) => {
                    tracing::error!(endpoint = %name, error = %e, "a stored endpoint is refused now; this node does not deliver it");
                    state.refused.insert(name.clone(), record.clone());
                }
            }
        }
        let held: Vec<String> = state
            .endpoints
            .iter()
            .filter(|(_, r)| r.lease.is_some())
            .map(|(name, _)| name.clone())
            .collect();
        state
            .positions
            .retain(|name, _| held.contains(name) || stored.positions.contains_key(name));
        for (name, position) in &stored.positions {
            if !held.contains(name) {
                state.positions.insert(name.clone(), *position);
            }
        }
    }

    /// One lease round (shared store): reads the endpoints, positions and leases as stored,
    /// learns the endpoints, then takes or renews the leases that are free, its own or run out,
    /// in one commit that expects what it read. Decided again once when another node's commit
    /// came between.
    async fn round(self: &Arc<Self>) -> Result<(), StoreError> {
        let Some((node, times)) = self.leases.clone() else {
            return Ok(());
        };
        let _edits = self.edits.lock().await;
        for _ in 0..2 {
            let started = Instant::now();
            let now_ms = lease::now_ms();
            let stored = self.blocking(lease::read).await?;
            let wanted: Vec<String> = {
                let mut state = self.lock();
                self.learn(&mut state, &stored);
                state.endpoints.keys().cloned().collect()
            };
            let lease::Plan {
                batch,
                expect,
                held,
            } = lease::plan(&stored, &wanted, &node, now_ms, times);
            let committed = batch.is_empty()
                || self
                    .blocking(move |store| store.commit_expecting(&batch, &expect))
                    .await?;
            if committed {
                self.hold(&held, &stored, |until_ms| {
                    // The monotonic deadline: the margin before the wall-clock end, counted
                    // from before the read.
                    let left = Duration::from_millis(until_ms.saturating_sub(now_ms));
                    started + left.saturating_sub(times.margin)
                });
                return Ok(());
            }
        }
        Ok(())
    }

    /// After a round's commit: this node holds the leases in `held`, each until the deadline
    /// `deadline` gives for its wall-clock end, and no other. A lease taken (not held before)
    /// starts delivery from the stored position, with the dead letters counted again (another
    /// node may have added some).
    fn hold(
        self: &Arc<Self>,
        held: &BTreeMap<String, (Vec<u8>, u64)>,
        stored: &lease::Stored,
        deadline: impl Fn(u64) -> Instant,
    ) {
        let mut state = self.lock();
        let names: Vec<String> = state.endpoints.keys().cloned().collect();
        for name in names {
            let Some(running) = state.endpoints.get_mut(&name) else {
                continue;
            };
            let Some((record, until_ms)) = held.get(&name) else {
                running.give_up(&name);
                continue;
            };
            let deadline = deadline(*until_ms);
            let renewed = running
                .lease
                .as_ref()
                .is_some_and(|h| stored.leases.get(&name) == Some(&h.record))
                && running.task.as_ref().is_some_and(|t| !t.is_finished());
            match &mut running.lease {
                Some(lease) => {
                    lease.record = record.clone();
                    lease.deadline.send_replace(deadline);
                }
                None => {
                    running.lease = Some(Held {
                        record: record.clone(),
                        deadline: tokio::sync::watch::channel(deadline).0,
                    });
                }
            }
            if !renewed {
                let position = stored
                    .positions
                    .get(&name)
                    .copied()
                    .unwrap_or_else(|| self.service.feed_head());
                state.positions.insert(name.clone(), position);
                state.dead_counts.remove(&name);
                if state.started {
                    tracing::info!(endpoint = %name, position, "this node delivers this endpoint now");
                    self.spawn(&mut state, &name);
                }
            }
        }
    }

    /// Creates or replaces endpoint `name` on a store of one node, decided on this node's
    /// memory: whether it was created, and its position.
    async fn put_local(&self, name: &str, record: &[u8]) -> Result<(bool, u64), EventsError> {
        let (created, position) = {
            let state = self.lock();
            let created = !state.endpoints.contains_key(name);
            if created && state.endpoints.len() >= MAX_ENDPOINTS {
                return Err(EventsError::TooMany);
            }
            let position = match state.positions.get(name) {
                Some(p) if !created => *p,
                _ => self.service.feed_head(),
            };
            (created, position)
        };
        let batch = vec![
            Mutation::put(Table::Endpoints, name, record.to_vec()),
            Mutation::put(Table::Deliveries, name, position.to_string().into_bytes()),
        ];
        self.blocking(move |store| store.commit(&batch)).await?;
        Ok((created, position))
    }

    /// Creates or replaces endpoint `name` on a shared store, decided on the stored records
    /// and committed expecting the endpoint's record as read: a new endpoint delivers from
    /// the feed's head as stored, a replaced one keeps its stored position (which its holder moves on).
    async fn put_shared(&self, name: &str, record: &[u8]) -> Result<(bool, u64), EventsError> {
        for _ in 0..EDIT_ATTEMPTS {
            let key = name.to_owned();
            let (stored, position, count, head) = self
                .blocking(move |store| {
                    let keys = std::slice::from_ref(&key);
                    let stored = store.get_many(Table::Endpoints, keys)?.pop().flatten();
                    let position = store.get_many(Table::Deliveries, keys)?.pop().flatten();
                    let count = store.scan(Table::Endpoints)?.len();
                    // The feed's head as stored: this node's snapshot may lag other nodes'
                    // commits, whose events came before the endpoint.
                    let head = twinguard_core::feed::stored_head(store)?;
                    Ok((stored, position, count, head))
                })
                .await?;
            let created = stored.is_none();
            if created && count >= MAX_ENDPOINTS {
                return Err(EventsError::TooMany);
            }
            let mut batch = vec![Mutation::put(Table::Endpoints, name, record.to_vec())];
            let position = match position.filter(|_| !created) {
                Some(bytes) => lease::parse_position(&bytes),
                None => {
                    let head = head.max(self.service.feed_head());
                    batch.push(Mutation::put(
                        Table::Deliveries,
                        name,
                        head.to_string().into_bytes(),
                    ));
                    head
                }
            };
            let expect = vec![Expect {
                table: Table::Endpoints,
                key: name.to_owned(),
                value: stored,
            }];
            if !self
                .blocking(move |store| store.commit_expecting(&batch, &expect))
                .await?
            {
                continue;
            }
            if created {
                self.within_cap(name, record).await?;
            }
            return Ok((created, position));
        }
        Err(EventsError::Store(StoreError(CHANGED_MEANWHILE.into())))
    }

    /// After endpoint `name` was created on a shared store as `record`: when endpoints created
    /// on other nodes at the same time took the store past [`MAX_ENDPOINTS`] (each node counted
    /// before its commit), takes it back and refuses it. Of several racing creations all may be
    /// refused; never are more than the cap kept.
    async fn within_cap(&self, name: &str, record: &[u8]) -> Result<(), EventsError> {
        let key = name.to_owned();
        let ours = record.to_vec();
        let over = self
            .blocking(move |store| {
                if store.scan(Table::Endpoints)?.len() <= MAX_ENDPOINTS {
                    return Ok(false);
                }
                store.commit_expecting(
                    &[
                        Mutation::delete(Table::Endpoints, &key),
                        Mutation::delete(Table::Deliveries, &key),
                    ],
                    &[Expect {
                        table: Table::Endpoints,
                        key: key.clone(),
                        value: Some(ours),
                    }],
                )
            })
            .await?;
        match over {
            true => Err(EventsError::TooMany),
            false => Ok(()),
        }
    }

    fn position(&self, name: &str) -> u64 {
        self.lock().positions.get(name).copied().unwrap_or(0)
    }

    /// Commits `batch` for the delivery of endpoint `name`: on a shared store only while this
    /// node holds its lease, expecting the lease record. False when nothing was stored: the
    /// endpoint was deleted, or its lease is no longer this node's, and then this node stops
    /// delivering it at once rather than at its next round.
    async fn commit_delivery(&self, name: &str, batch: Vec<Mutation>) -> Result<bool, StoreError> {
        let held = {
            let state = self.lock();
            let Some(running) = state.endpoints.get(name) else {
                return Ok(false);
            };
            running.lease.as_ref().map(|held| held.record.clone())
        };
        let (node, mut record) = match (&self.leases, held) {
            (None, _) => {
                return self
                    .blocking(move |store| store.commit(&batch))
                    .await
                    .map(|()| true);
            }
            (Some(_), None) => return Ok(false),
            (Some((node, _)), Some(record)) => (node.clone(), record),
        };
        // A round may renew the lease between the read above and the commit, and a busy store
        // may refuse the commit although the lease holds: again with the record stored then,
        // while it is this node's own. Only a lease that is no longer its own stops delivery.
        for _ in 0..2 {
            let batch = batch.clone();
            let key = name.to_owned();
            let expect = vec![Expect {
                table: Table::Leases,
                key: key.clone(),
                value: Some(record),
            }];
            let (stored, now) = self
                .blocking(move |store| {
                    if store.commit_expecting(&batch, &expect)? {
                        return Ok((true, None));
                    }
                    let now = store.get_many(Table::Leases, &[key])?.pop().flatten();
                    Ok((false, now))
                })
                .await?;
            if stored {
                return Ok(true);
            }
            match now {
                Some(now) if lease::is_own(Some(&now), &node) => record = now,
                _ => {
                    self.lose(name);
                    return Ok(false);
                }
            }
        }
        Ok(false)
    }

    /// This node no longer holds `name`'s lease (another node took it, or it was closed by a
    /// deletion): its delivery stops now.
    fn lose(&self, name: &str) {
        if let Some(running) = self.lock().endpoints.get_mut(name) {
            running.give_up(name);
        }
    }

    /// Moves `name`'s position on (durably, then in memory). A failed store keeps the old
    /// position: the events are sent again later, never skipped. The commit (a group commit of
    /// the writer) runs on the blocking pool, without the state lock. False when nothing was
    /// stored.
    async fn set_position(&self, name: &str, position: u64) -> bool {
        let record = Mutation::put(Table::Deliveries, name, position.to_string().into_bytes());
        match self.commit_delivery(name, vec![record]).await {
            Ok(true) => {
                // Deleted meanwhile: its position record goes with it (the deletion's own
                // commit may have run first). On a shared store the deletion took the lease,
                // so the commit above stored nothing.
                let kept = {
                    let mut state = self.lock();
                    let kept = state.endpoints.contains_key(name);
                    if kept {
                        state.positions.insert(name.to_owned(), position);
                    }
                    kept
                };
                if !kept && self.leases.is_none() {
                    let name = name.to_owned();
                    let _ = self
                        .blocking(move |store| {
                            store.commit(&[Mutation::delete(Table::Deliveries, name)])
                        })
                        .await;
                }
                kept
            }
            Ok(false) => false,
            Err(e) => {
                tracing::error!(endpoint = %name, error = %e, "a delivery position could not be stored");
                false
            }
        }
    }

    /// The lowest position any endpoint still needs, plus one: records below it can go. At
    /// most [`Self::backlog`] records are kept, though: an endpoint that lags further (its
    /// receiver down for long, its dead letters full) loses the oldest, which its delivery
    /// counts as skipped, rather than the feed growing until the disk is full and every write
    /// stops.
    ///
    /// On a shared store the positions are those of every stored endpoint, read from the store
    /// now, and this node's own where it delivers (the lower of the two): an endpoint this
    /// node refuses, another node delivers, or another node made since this node's last lease
    /// round keeps its records too. The feed's head is read first: the records up to it were
    /// committed before the positions are read, so an endpoint made after that read (from a
    /// head at least as far) needs none of them. `None` when the positions cannot be read:
    /// nothing is trimmed then.
    async fn trim_point(&self) -> Option<u64> {
        let head = self.service.feed_head();
        let stored = match self.leases {
            Some(_) => match self.blocking(lease::read_positions).await {
                Ok(stored) => Some(stored),
                Err(e) => {
                    tracing::warn!(error = %e, "the delivery positions cannot be read; nothing is trimmed");
                    return None;
                }
            },
            None => None,
        };
        let state = self.lock();
        let mut positions: HashMap<&String, u64> = match &stored {
            Some(stored) => stored.iter().map(|(n, p)| (n, *p)).collect(),
            None => state.endpoints.keys().map(|n| (n, 0)).collect(),
        };
        for (name, position) in &state.positions {
            match stored {
                Some(_) => {
                    let p = positions.entry(name).or_insert(*position);
                    *p = (*p).min(*position);
                }
                None => {
                    if let Some(p) = positions.get_mut(name) {
                        *p = *position;
                    }
                }
            }
        }
        let needed = positions.values().copied().min().unwrap_or(head).min(head) + 1;
        let cap = head.saturating_sub(self.backlog) + 1;
        if cap > needed {
            let lagging: Vec<&&String> = positions
                .iter()
                .filter(|(_, p)| **p + 1 < cap)
                .map(|(n, _)| n)
                .collect();
            tracing::error!(
                ?lagging,
                backlog = self.backlog,
                "event endpoints lag more than the backlog: their oldest events are dropped"
            );
        }
        Some(needed.max(cap))
    }

    /// Whether a route to endpoint `name` matches `event`.
    fn routed(&self, name: &str, event: &FeedEvent) -> bool {
        let graph = self.service.snapshot();
        let mut ce = None;
        let mut state = self.lock();
        if !state.endpoints.contains_key(name) {
            return false;
        }
        for route in graph.routes().filter(|r| r.endpoint_name == name) {
            if !state.filters.contains_key(&route.filter) {
                let parsed = match Filter::parse(&route.filter) {
                    Ok(f) => Some(f),
                    Err(e) => {
                        tracing::error!(route = %route.id, error = %e, "a stored route's filter no longer parses; it matches nothing");
                        None
                    }
                };
                state.filters.insert(route.filter.clone(), parsed);
            }
            let Some(Some(filter)) = state.filters.get(&route.filter) else {
                continue;
            };
            let matched = match filter.constant() {
                // `true` and `false` need no event to look at.
                Some(answer) => answer,
                None => filter.matches(
                    ce.get_or_insert_with(|| cloudevent::to_cloud_event(event, &self.source)),
                ),
            };
            if matched {
                return true;
            }
        }
        false
    }

    fn dead_letter_rows(
        &self,
        name: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        dead_letter_rows(self.store.as_ref(), name, limit)
    }

    /// Stores `event` as a dead letter of `endpoint`; false when the endpoint's dead letters
    /// are at their limit or the store fails (the event is then retried, not dropped). The
    /// count is read from the store once per endpoint, then kept (replays and discards on this
    /// node lower it), so a dead letter costs one commit, not a read of the others; at the
    /// limit it is read again.
    async fn dead_letter(
        &self,
        endpoint: &Endpoint,
        event: &Prepared,
        attempts: u32,
        error: &str,
    ) -> bool {
        // A count at the limit is read again: dead letters replayed or discarded on another
        // node lowered it there, not here.
        let known = self.lock().dead_counts.get(&endpoint.name).copied();
        let count = match known {
            Some(count) if count < MAX_DEAD_LETTERS => count,
            _ => match self.dead_letter_rows(&endpoint.name, MAX_DEAD_LETTERS) {
                Ok(rows) => rows.len(),
                Err(_) => return false,
            },
        };
        if count >= MAX_DEAD_LETTERS {
            tracing::error!(endpoint = %endpoint.name, "the endpoint's dead letters are full; delivery waits");
            return false;
        }
        let record = deliver::dead_letter_record(&endpoint.name, event, attempts, error);
        let mutation = deliver::dead_letter_mutation(&endpoint.name, &record);
        match self.commit_delivery(&endpoint.name, vec![mutation]).await {
            Ok(false) => false,
            Ok(true) => {
                self.lock()
                    .dead_counts
                    .insert(endpoint.name.clone(), count + 1);
                tracing::warn!(endpoint = %endpoint.name, event = %event.id, attempts, "an event was dead-lettered");
                true
            }
            Err(e) => {
                tracing::error!(endpoint = %endpoint.name, error = %e, "a dead letter could not be stored");
                false
            }
        }
    }
}

/// Endpoint `name`'s dead-letter records, oldest first, at most `limit`.
fn dead_letter_rows(
    store: &dyn Store,
    name: &str,
    limit: usize,
) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
    let from = format!("{name}\u{1f}");
    let to = format!("{name}\u{20}");
    store.range(Table::DeadLetters, &from, &to, limit)
}

/// Deletes endpoint `key`'s records: the endpoint, its position and its dead letters. False
/// when the endpoint (or on a shared store its lease) changed meanwhile; nothing is deleted
/// then.
///
/// On a shared store, a lease another node may still deliver under is closed first, in a
/// commit of its own ([`lease::on_delete`]): from then on the holder's writes, which expect
/// the lease as it holds it, store nothing, so no dead letter it adds after the dead letters
/// are read here outlives the endpoint; and the closed lease stays until it runs out, so no
/// other node delivers an endpoint made again under the name while the holder may still send.
fn delete_records(
    store: &dyn Store,
    key: &str,
    shared: bool,
    now_ms: u64,
) -> Result<bool, StoreError> {
    let keys = [key.to_owned()];
    let record = store.get_many(Table::Endpoints, &keys)?.pop().flatten();
    if shared && record.is_none() {
        return Err(StoreError(NOT_STORED.into()));
    }
    let mut expect = vec![Expect {
        table: Table::Endpoints,
        key: key.to_owned(),
        value: record,
    }];
    let mut batch = vec![
        Mutation::delete(Table::Endpoints, key),
        Mutation::delete(Table::Deliveries, key),
    ];
    if shared {
        let lease = store.get_many(Table::Leases, &keys)?.pop().flatten();
        let mut kept = lease.clone();
        match lease::on_delete(lease.as_deref(), now_ms) {
            lease::OnDelete::Delete => batch.push(Mutation::delete(Table::Leases, key)),
            lease::OnDelete::Keep => {}
            lease::OnDelete::Close(closed) => {
                let close = [Mutation::put(Table::Leases, key, closed.clone())];
                let mut expect_open = expect.clone();
                expect_open.push(Expect {
                    table: Table::Leases,
                    key: key.to_owned(),
                    value: lease,
                });
                if !store.commit_expecting(&close, &expect_open)? {
                    return Ok(false);
                }
                kept = Some(closed);
            }
        }
        expect.push(Expect {
            table: Table::Leases,
            key: key.to_owned(),
            value: kept,
        });
    }
    for (row, _) in dead_letter_rows(store, key, usize::MAX)? {
        batch.push(Mutation::delete(Table::DeadLetters, row));
    }
    store.commit_expecting(&batch, &expect)
}
