//! Event delivery (issue 19): endpoints, the delivery tasks that read the change feed, the
//! dead-letter store, and the trimming of delivered feed records. See `docs/events.md`.

pub mod cloudevent;
pub mod deliver;
pub mod endpoint;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use serde_json::Value;
use twinguard_core::feed::FeedEvent;
use twinguard_core::routes::Filter;
use twinguard_core::service::TwinService;
use twinguard_core::store::{Mutation, Store, StoreError, Table};

pub use cloudevent::EventKey;
use deliver::{MAX_DEAD_LETTERS, Prepared, Sink};
pub use endpoint::{Endpoint, EndpointSpec, MAX_ENDPOINTS};

use crate::egress::Egress;

/// Change-feed records kept for lagging endpoints by default (about 1 GB of store at ADT-sized
/// events); see [`Inner::trim_point`].
pub const DEFAULT_BACKLOG: u64 = 1_000_000;

/// How often delivered feed records are trimmed.
const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

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
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    endpoints: BTreeMap<String, Running>,
    /// Each endpoint's delivery position (also stored in `Table::Deliveries`).
    positions: HashMap<String, u64>,
    /// Compiled route filters, by filter text.
    filters: HashMap<String, Option<Filter>>,
    /// Whether delivery tasks run (after [`Events::start`]).
    started: bool,
    /// Dead letters per endpoint, once counted (see [`Inner::dead_letter`]).
    dead_counts: HashMap<String, usize>,
}

struct Running {
    endpoint: Arc<Endpoint>,
    task: Option<tokio::task::AbortHandle>,
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
        let mut state = State::default();
        for (name, bytes) in store.scan(Table::Deliveries)? {
            let position = std::str::from_utf8(&bytes)
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            state.positions.insert(name, position);
        }
        for (name, bytes) in store.scan(Table::Endpoints)? {
            let spec: EndpointSpec = serde_json::from_slice(&bytes)
                .map_err(|_| StoreError(format!("endpoint record '{name}' is unreadable")))?;
            // Checked again against today's allowlist: an endpoint the operator no longer
            // allows stays stored but does not run.
            let rules = endpoint::Rules {
                egress: egress.policy(),
                credentials: &credentials,
            };
            match Endpoint::check(&name, spec, rules) {
                Ok(endpoint) => {
                    state.endpoints.insert(
                        name,
                        Running {
                            endpoint: Arc::new(endpoint),
                            task: None,
                        },
                    );
                }
                Err(e) => {
                    tracing::error!(endpoint = %name, error = %e, "a stored endpoint is refused now; it does not deliver");
                }
            }
        }
        Ok(Self {
            inner: Arc::new(Inner {
                service,
                store,
                egress,
                key,
                source,
                credentials,
                backlog,
                state: Mutex::new(state),
            }),
        })
    }

    pub fn key(&self) -> &EventKey {
        &self.inner.key
    }

    /// Starts a delivery task for every endpoint, and the trimming of delivered records.
    pub fn start(&self) {
        let mut state = self.inner.lock();
        state.started = true;
        let names: Vec<String> = state.endpoints.keys().cloned().collect();
        for name in names {
            self.inner.spawn(&mut state, &name);
        }
        drop(state);
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(TRIM_EVERY);
            loop {
                every.tick().await;
                let below = inner.trim_point();
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
    pub async fn put(
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
        let mut state = self.inner.lock();
        let created = !state.endpoints.contains_key(name);
        if created && state.endpoints.len() >= MAX_ENDPOINTS {
            return Err(EventsError::TooMany);
        }
        let mut muts = vec![Mutation::put(
            Table::Endpoints,
            name,
            serde_json::to_vec(&endpoint.spec).unwrap_or_default(),
        )];
        let position = match state.positions.get(name) {
            Some(p) if !created => *p,
            _ => self.inner.service.feed_head(),
        };
        muts.push(Mutation::put(
            Table::Deliveries,
            name,
            position.to_string().into_bytes(),
        ));
        self.inner.store.commit(&muts)?;
        state.positions.insert(name.to_owned(), position);
        state.endpoints.insert(
            name.to_owned(),
            Running {
                endpoint: endpoint.clone(),
                task: None,
            },
        );
        if state.started {
            self.inner.spawn(&mut state, name);
        }
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

    /// Deletes endpoint `name`: its delivery stops at once; its dead letters go with it.
    pub fn delete(&self, name: &str) -> Result<(), EventsError> {
        let mut state = self.inner.lock();
        if !state.endpoints.contains_key(name) {
            return Err(EventsError::NotFound(name.to_owned()));
        }
        let mut muts = vec![
            Mutation::delete(Table::Endpoints, name),
            Mutation::delete(Table::Deliveries, name),
        ];
        for (key, _) in self.inner.dead_letter_rows(name, usize::MAX)? {
            muts.push(Mutation::delete(Table::DeadLetters, key));
        }
        self.inner.store.commit(&muts)?;
        state.endpoints.remove(name);
        state.positions.remove(name);
        state.dead_counts.remove(name);
        Ok(())
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

    pub fn dead_letter(&self, name: &str, seq: u64) -> Result<Value, EventsError> {
        self.get(name)?;
        let key = deliver::dead_letter_key(name, seq);
        let rows = self
            .inner
            .store
            .range(Table::DeadLetters, &key, &format!("{key}\0"), 1)?;
        rows.into_iter()
            .next()
            .and_then(|(_, v)| serde_json::from_slice(&v).ok())
            .ok_or(EventsError::DeadLetterNotFound(name.to_owned(), seq))
    }

    /// Sends a dead letter once more, now; on success it leaves the dead-letter store.
    pub async fn replay(&self, name: &str, seq: u64) -> Result<(), EventsError> {
        let endpoint = self.get(name)?;
        let record = self.dead_letter(name, seq)?;
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
        self.discard(name, seq)
    }

    pub fn discard(&self, name: &str, seq: u64) -> Result<(), EventsError> {
        self.dead_letter(name, seq)?;
        self.inner.store.commit(&[Mutation::delete(
            Table::DeadLetters,
            deliver::dead_letter_key(name, seq),
        )])?;
        if let Some(count) = self.inner.lock().dead_counts.get_mut(name) {
            *count = count.saturating_sub(1);
        }
        Ok(())
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn spawn(self: &Arc<Self>, state: &mut State, name: &str) {
        let Some(running) = state.endpoints.get_mut(name) else {
            return;
        };
        if let Some(task) = running.task.take() {
            task.abort();
        }
        let task = tokio::spawn(deliver::run(self.clone(), running.endpoint.clone()));
        running.task = Some(task.abort_handle());
    }

    fn position(&self, name: &str) -> u64 {
        self.lock().positions.get(name).copied().unwrap_or(0)
    }

    /// Moves `name`'s position on (durably, then in memory). A failed store keeps the old
    /// position: the events are sent again later, never skipped. The commit (a group commit of
    /// the writer) runs on the blocking pool, without the state lock.
    async fn set_position(&self, name: &str, position: u64) {
        if !self.lock().endpoints.contains_key(name) {
            return;
        }
        let store = self.store.clone();
        let record = Mutation::put(Table::Deliveries, name, position.to_string().into_bytes());
        let stored = tokio::task::spawn_blocking(move || store.commit(&[record]))
            .await
            .unwrap_or_else(|_| Err(StoreError("the commit task failed".into())));
        match stored {
            Ok(()) => {
                // Deleted meanwhile: its position record goes with it (the deletion's own
                // commit may have run first).
                let kept = {
                    let mut state = self.lock();
                    let kept = state.endpoints.contains_key(name);
                    if kept {
                        state.positions.insert(name.to_owned(), position);
                    }
                    kept
                };
                if !kept {
                    let store = self.store.clone();
                    let name = name.to_owned();
                    let _ = tokio::task::spawn_blocking(move || {
                        store.commit(&[Mutation::delete(Table::Deliveries, name)])
                    })
                    .await;
                }
            }
            Err(e) => {
                tracing::error!(endpoint = %name, error = %e, "a delivery position could not be stored")
            }
        }
    }

    /// The lowest position any endpoint still needs, plus one: records below it can go. At
    /// most [`Self::backlog`] records are kept, though: an endpoint that lags further (its
    /// receiver down for long, its dead letters full) loses the oldest, which its delivery
    /// counts as skipped, rather than the feed growing until the disk is full and every write
    /// stops.
    fn trim_point(&self) -> u64 {
        let state = self.lock();
        let head = self.service.feed_head();
        let needed = state
            .endpoints
            .keys()
            .map(|n| state.positions.get(n).copied().unwrap_or(0))
            .min()
            .unwrap_or(head)
            .min(head)
            + 1;
        let cap = head.saturating_sub(self.backlog) + 1;
        if cap > needed {
            let lagging: Vec<&String> = state
                .endpoints
                .keys()
                .filter(|n| state.positions.get(*n).copied().unwrap_or(0) + 1 < cap)
                .collect();
            tracing::error!(
                ?lagging,
                backlog = self.backlog,
                "event endpoints lag more than the backlog: their oldest events are dropped"
            );
        }
        needed.max(cap)
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
        let from = format!("{name}\u{1f}");
        let to = format!("{name}\u{20}");
        self.store.range(Table::DeadLetters, &from, &to, limit)
    }

    /// Stores `event` as a dead letter of `endpoint`; false when the endpoint's dead letters
    /// are at their limit or the store fails (the event is then retried, not dropped). The
    /// count is read from the store once per endpoint, then kept (replays and discards lower
    /// it), so a dead letter costs one commit, not a read of the others.
    async fn dead_letter(
        &self,
        endpoint: &Endpoint,
        event: &Prepared,
        attempts: u32,
        error: &str,
    ) -> bool {
        let known = self.lock().dead_counts.get(&endpoint.name).copied();
        let count = match known {
            Some(count) => count,
            None => match self.dead_letter_rows(&endpoint.name, MAX_DEAD_LETTERS) {
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
        let store = self.store.clone();
        let stored = tokio::task::spawn_blocking(move || store.commit(&[mutation]))
            .await
            .unwrap_or_else(|_| Err(StoreError("the commit task failed".into())));
        match stored {
            Ok(()) => {
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
