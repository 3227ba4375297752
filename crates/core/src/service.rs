//! The twin service: the one door into the graph. Every operation checks the caller's access
//! first; reads run on an immutable snapshot; writes go through a single writer that validates
//! them in order, commits them to the store in groups (one durable commit for every write that
//! arrived meanwhile), and only then publishes the new snapshot and acknowledges. A write that is
//! acknowledged is durable and visible to every later read and query.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;

use arc_swap::ArcSwap;
use serde_json::{Map, Value};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::access::hidden;
use crate::auth::{Action, Principal};
use crate::clock::{Clock, rfc3339};
use crate::dtdl::{self, ParseOptions};
use crate::dtmi::Dtmi;
use crate::error::{DomainError, DomainResult};
use crate::feed::{self, FeedEvent, FeedState};
use crate::graph::ops::{self, WriteContext, WriteOp, WriteOutcome};
use crate::graph::{EventRoute, Graph, ModelEntry, PropertyUpdate, Relationship, Twin};
use crate::query;
use crate::store::{Expect, Fenced, Mutation, Owner, Store, StoreError, Table, for_each_record};

/// Twins or relationships read from the store at a time while the graph is loaded.
const LOAD_PAGE: usize = 10_000;
/// Most writes grouped into one commit.
const MAX_GROUP: usize = 4_096;
/// How many times a group whose fenced commit found that another writer of a shared store
/// committed first is decided again, on a state that includes that commit, before its writes
/// are answered [`DomainError::Superseded`] (503).
const REDECIDE: usize = 3;
/// Writes waiting for the writer before new ones are turned away with 503. Twin and relationship
/// bodies are at most 32 KiB, so a full queue of them stays well under 200 MiB.
const QUEUE_DEPTH: usize = 4_096;
/// Model uploads (up to 1 MiB each, compiled before they enter the writer's queue) in flight at
/// once; more get 503.
const MAX_UPLOADS_IN_FLIGHT: usize = 2;
/// How long a write waits for its commit to be confirmed before it is answered
/// [`DomainError::Unconfirmed`]. A store that cannot confirm commits (a database that stopped
/// answering, a synchronous standby that is gone) must not hold requests for ever; the write
/// may still be applied once the store confirms it. The same bound as a silent link's
/// (`TCP_USER_TIMEOUT` in the PostgreSQL store) and the audit trail's.
pub const WRITE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// A submitted write: queued, or an upload still to compile.
enum Pending {
    Queued(oneshot::Receiver<DomainResult<WriteOutcome>>),
    Upload {
        docs: Vec<Value>,
        permit: tokio::sync::OwnedSemaphorePermit,
        service: TwinService,
        scoped: Option<Principal>,
    },
}

/// Where a write's answer goes: an async caller's future, or a thread blocked in
/// [`Door::commit`].
enum Reply {
    Async(oneshot::Sender<DomainResult<WriteOutcome>>),
    Blocking(std::sync::mpsc::SyncSender<DomainResult<WriteOutcome>>),
}

impl Reply {
    fn send(self, answer: DomainResult<WriteOutcome>) -> Result<(), ()> {
        match self {
            Self::Async(tx) => tx.send(answer).map_err(|_| ()),
            Self::Blocking(tx) => tx.send(answer).map_err(|_| ()),
        }
    }
}

struct Job {
    op: WriteOp,
    /// The caller, when it does not hold the action instance-wide: its scopes are checked on
    /// the working graph, in order with the writes before it.
    scoped: Option<Principal>,
    reply: Reply,
    /// A model upload's slot, held until the writer has dealt with it.
    _upload: Option<tokio::sync::OwnedSemaphorePermit>,
    /// The records the write was decided on (see [`Expect`]); checked only on a shared store.
    expect: Vec<Expect>,
}

/// Shared by the service handle and the writer thread.
struct Shared {
    published: ArcSwap<Graph>,
    store_healthy: AtomicBool,
    /// False while [`TwinService::probe_store`] cannot reach the store.
    store_reachable: AtomicBool,
    writer_alive: AtomicBool,
    /// Run on the compiling thread before each model upload compiles (tests only).
    compile_hook: std::sync::RwLock<Option<CompileHook>>,
    /// Units of DTDL compilation work the start-up did (`dtdl::Compiled::work`).
    load_work: usize,
    /// Read by the change feed's readers; the writer commits through its own handle.
    store: Arc<dyn Store>,
    /// The last feed position committed (0 before the first event); changes wake readers.
    feed_head: tokio::sync::watch::Sender<u64>,
    /// On a store that other writers share: the store's commit counter that the published
    /// snapshot reflects (its position), and when the snapshot was last known to be current
    /// (milliseconds since `epoch`). `None` for a store of one writer, always current.
    position: Option<Position>,
    /// When the writer's commit now waiting for the store began; `None` between commits.
    commit_began: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Shared {
    /// Marks the writer's commit as waiting for the store since `began`, or as done.
    fn waiting_for_the_store(&self, began: Option<std::time::Instant>) {
        *self.commit_began.lock().unwrap_or_else(|e| e.into_inner()) = began;
    }
}

/// Where a shared store's snapshot stands (see `Shared::position`).
struct Position {
    applied: tokio::sync::watch::Sender<u64>,
    confirmed_ms: AtomicU64,
    epoch: std::time::Instant,
    /// A refresh is queued for the writer and not yet run: one is enough, however many
    /// requests wait for a position.
    refresh_queued: AtomicBool,
}

impl Position {
    /// The snapshot reflects `head`, which the store had a moment ago. Only ever raised: a
    /// follower that read an older head races the writer's confirmation of a newer one.
    fn confirm(&self, head: u64) {
        self.applied.send_if_modified(|a| {
            let moved = head > *a;
            if moved {
                *a = head;
            }
            moved
        });
        let now = self.epoch.elapsed().as_millis() as u64;
        self.confirmed_ms.fetch_max(now, Ordering::Relaxed);
    }

    /// The snapshot was read whole at `head`, which may be below the position it had: the
    /// store's counter went back (see `catch_up`). Only the writer calls it.
    fn restart(&self, head: u64) {
        self.applied.send_replace(head);
        let now = self.epoch.elapsed().as_millis() as u64;
        self.confirmed_ms.fetch_max(now, Ordering::Relaxed);
    }
}

type CompileHook = Arc<dyn Fn() + Send + Sync>;

/// Marks the writer as gone when its thread ends, however it ends.
struct WriterAlive<'a>(&'a AtomicBool);

impl Drop for WriterAlive<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

#[derive(Clone)]
pub struct TwinService {
    shared: Arc<Shared>,
    jobs: mpsc::Sender<Job>,
    uploads: Arc<Semaphore>,
    /// Queries running per principal.
    queries: Arc<crate::gate::Gate>,
    /// Reads query deadlines.
    clock: Arc<dyn Clock>,
    /// Set only by [`TwinService::dangerous_unbounded_queries`].
    unbounded_queries: bool,
}

impl std::fmt::Debug for TwinService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TwinService").finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("stored {0} record '{1}' is unreadable")]
    Corrupt(&'static str, String),
    #[error("stored models no longer validate: {0}")]
    Models(dtdl::DtdlError),
    #[error("cannot start the writer thread: {0}")]
    Thread(std::io::Error),
}

impl TwinService {
    /// Loads the graph from `store` and starts the writer.
    pub fn open(store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Result<Self, OpenError> {
        let Loaded {
            graph,
            feed,
            work: load_work,
            head,
        } = Loaded::read(store.as_ref())?;
        tracing::info!(work = load_work, "stored models compiled");
        let (feed_head, _) = tokio::sync::watch::channel(feed.next - 1);
        let shared = Arc::new(Shared {
            published: ArcSwap::from_pointee(graph),
            store_healthy: AtomicBool::new(true),
            store_reachable: AtomicBool::new(true),
            writer_alive: AtomicBool::new(true),
            compile_hook: std::sync::RwLock::new(None),
            load_work,
            store: store.clone(),
            feed_head,
            position: head.map(|head| Position {
                applied: tokio::sync::watch::channel(head).0,
                confirmed_ms: AtomicU64::new(0),
                epoch: std::time::Instant::now(),
                refresh_queued: AtomicBool::new(false),
            }),
            commit_began: std::sync::Mutex::new(None),
        });
        let (jobs, rx) = mpsc::channel(QUEUE_DEPTH);
        let writer_shared = shared.clone();
        let writer_clock = clock.clone();
        thread::Builder::new()
            .name("twinguard-writer".into())
            .spawn(move || writer(rx, writer_shared, store, writer_clock, feed, head))
            .map_err(OpenError::Thread)?;
        Ok(Self {
            uploads: Arc::new(Semaphore::new(MAX_UPLOADS_IN_FLIGHT)),
            queries: Arc::new(crate::gate::Gate::new(MAX_QUERIES_PER_PRINCIPAL)),
            clock,
            shared,
            jobs,
            unbounded_queries: false,
        })
    }

    /// Lifts issue 17's query limits: no work budget, no page byte cap, no deadline and no cap
    /// per principal. Dangerous: one query can then take the server's memory and CPU for as
    /// long as it likes. It exists for one caller, the benchmark's reference run
    /// (`twinguard serve --dangerous-unbounded-resources`, `bench/protections.sh`), which
    /// measures what the limits cost. The executor still counts work and page bytes (the
    /// counters are in its inner loop), so the reference pays for the counting, not for the
    /// limits.
    pub fn dangerous_unbounded_queries(mut self) -> Self {
        self.unbounded_queries = true;
        self
    }

    /// Units of DTDL compilation work the start-up did to compile the stored models again
    /// (`dtdl::Compiled::work`).
    pub fn load_work(&self) -> usize {
        self.shared.load_work
    }

    /// The way into the writer for `owner`'s records (not the graph's: those change only
    /// through [`WriteOp`]s).
    pub fn door(&self, owner: Owner) -> Door {
        Door {
            owner,
            jobs: self.jobs.clone(),
        }
    }

    /// True on a store that other writers share (its commits are counted and fenced): there a
    /// write decided on owner records should name them ([`TwinService::submit_expecting`]).
    pub fn shares_store(&self) -> bool {
        self.shared.position.is_some()
    }

    /// The last position of the change feed that is committed (0 before the first event).
    pub fn feed_head(&self) -> u64 {
        *self.shared.feed_head.borrow()
    }

    /// A receiver that sees the feed's head move: what delivery waits on.
    pub fn watch_feed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.feed_head.subscribe()
    }

    /// Up to `limit` feed records after position `after`, in order. Records below the oldest
    /// kept position were trimmed and are not returned.
    pub fn feed_after(&self, after: u64, limit: usize) -> Result<Vec<FeedEvent>, StoreError> {
        let from = feed::key(after.saturating_add(1));
        let to = feed::key(self.feed_head().saturating_add(1));
        self.shared
            .store
            .range(Table::Events, &from, &to, limit)?
            .into_iter()
            .map(|(key, bytes)| {
                serde_json::from_slice(&bytes)
                    .map_err(|_| StoreError(format!("feed record {key} is unreadable")))
            })
            .collect()
    }

    /// Deletes the feed records below position `below` (every reader has passed them), at
    /// most [`feed::MAX_TRIM`] a call, through the writer like every other change.
    pub async fn trim_feed(&self, below: u64) -> DomainResult<()> {
        let answer = self.enqueue(
            WriteOp::TrimFeed(ops::FeedTrim { below }),
            None,
            None,
            Vec::new(),
        )?;
        answer
            .await
            .map_err(|_| DomainError::Unavailable)?
            .map(|_| ())
    }

    /// The current snapshot. It reflects every acknowledged write.
    pub fn snapshot(&self) -> Arc<Graph> {
        self.shared.published.load_full()
    }

    /// False after a commit failed, until one succeeds again, or when the writer has stopped;
    /// readiness reports it.
    pub fn store_healthy(&self) -> bool {
        self.shared.store_healthy.load(Ordering::Relaxed)
            && self.shared.writer_alive.load(Ordering::SeqCst)
            && self.store_reachable()
    }

    /// How long the writer's commit has been waiting for the store, while one is: a commit
    /// that waits for seconds is held (a database waiting for a synchronous standby that is
    /// gone, or a link that hangs), and no write is acknowledged meanwhile.
    pub fn commit_waiting(&self) -> Option<std::time::Duration> {
        self.shared
            .commit_began
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|began| began.elapsed())
    }

    /// On a store that other writers share (PostgreSQL): the store's commit counter that the
    /// published snapshot reflects. Every write this node acknowledged is at or below it, so a
    /// client that presents it to another node ([`TwinService::wait_for_position`]) reads its
    /// own writes there. `None` on a store of one writer.
    pub fn position(&self) -> Option<u64> {
        self.shared.position.as_ref().map(|p| *p.applied.borrow())
    }

    /// How long ago the snapshot was last known to be current (`None` on a store of one
    /// writer, which is always current). [`TwinService::follow`] keeps it small while the store
    /// answers.
    pub fn lag(&self) -> Option<std::time::Duration> {
        self.shared.position.as_ref().map(|p| {
            let now = p.epoch.elapsed().as_millis() as u64;
            std::time::Duration::from_millis(
                now.saturating_sub(p.confirmed_ms.load(Ordering::Relaxed)),
            )
        })
    }

    /// Follows the other writers of a shared store: reads its commit counter and, if it moved
    /// past the snapshot, wakes the writer to read what they committed (it does so before its
    /// next group anyway). Blocking: call it off the async threads, every so often. Returns
    /// the counter it read (for the owners' [`crate::follow::ChangeFollower`]); nothing on a
    /// store of one writer.
    pub fn follow(&self) -> Result<Option<u64>, StoreError> {
        let Some(position) = &self.shared.position else {
            return Ok(None);
        };
        let head = self.shared.store.head()?.unwrap_or(0);
        if head == *position.applied.borrow() {
            position.confirm(head);
        } else {
            self.request_refresh();
        }
        Ok(Some(head))
    }

    /// Waits up to `within` until the snapshot reflects `position` (a position another node
    /// answered a write with); true once it does. Always true on a store of one writer.
    pub async fn wait_for_position(&self, position: u64, within: std::time::Duration) -> bool {
        let Some(shared) = &self.shared.position else {
            return true;
        };
        let mut applied = shared.applied.subscribe();
        if *applied.borrow() >= position {
            return true;
        }
        // Ask the writer to look now rather than at the next follow.
        self.request_refresh();
        tokio::time::timeout(within, applied.wait_for(|a| *a >= position))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Queues one [`WriteOp::Refresh`] unless one is already waiting. A full queue needs
    /// none: the writer is about to run a group, which catches up first.
    fn request_refresh(&self) {
        let Some(position) = &self.shared.position else {
            return;
        };
        if !position.refresh_queued.swap(true, Ordering::AcqRel)
            && self
                .enqueue(WriteOp::Refresh, None, None, Vec::new())
                .is_err()
        {
            position.refresh_queued.store(false, Ordering::Release);
        }
    }

    /// False while the last [`TwinService::probe_store`] could not reach the store.
    pub fn store_reachable(&self) -> bool {
        self.shared.store_reachable.load(Ordering::Relaxed)
    }

    /// Asks the store for its commit counter (a query to PostgreSQL; nothing for a store of
    /// one writer) and records whether it answered: a node that cannot reach its database
    /// reports not ready even while no write comes to find out. Blocking: call it off the
    /// async threads.
    pub fn probe_store(&self) -> bool {
        let reachable = match self.shared.store.head() {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(error = %e, "the store does not answer");
                false
            }
        };
        self.shared
            .store_reachable
            .store(reachable, Ordering::Relaxed);
        // A shared store that failed a commit and answers again: have the writer look, which
        // marks it healthy, rather than wait for a write that a balancer may no longer send.
        if reachable && !self.shared.store_healthy.load(Ordering::Relaxed) {
            self.request_refresh();
        }
        reachable
    }

    /// Marks the store unreachable: its probe did not answer in time.
    pub fn mark_store_unreachable(&self) {
        self.shared.store_reachable.store(false, Ordering::Relaxed);
    }

    /// Performs a write for `principal` and returns once it is durable and visible, or
    /// [`DomainError::Unconfirmed`] after [`WRITE_WAIT`].
    pub async fn write(&self, principal: &Principal, op: WriteOp) -> DomainResult<WriteOutcome> {
        self.submit(principal, op)?.await
    }

    /// Queues a write for `principal` and returns what waits for its answer. Writes are
    /// applied in the order they were queued, so a caller that queues while holding its own
    /// lock gets its writes applied in its lock order.
    ///
    /// A model upload is the exception: it is compiled first, against the current snapshot and
    /// on a blocking thread of the runtime (or the caller's thread outside one), and queued
    /// only then, so that the writer never compiles DTDL. The writer adds the compiled models
    /// after checking that the stored models they used are still there.
    pub fn submit(
        &self,
        principal: &Principal,
        op: WriteOp,
    ) -> DomainResult<impl Future<Output = DomainResult<WriteOutcome>> + Send + 'static> {
        self.submit_expecting(principal, op, Vec::new())
    }

    /// [`TwinService::submit`] of a write decided on the records `expect` names: on a store that
    /// other writers share, it is answered [`DomainError::Superseded`], and nothing of it is
    /// stored, unless each of them still holds the value expected when the writer commits it.
    /// On a store of one writer the expectations are not read (nothing else writes it). Not for
    /// model uploads.
    pub fn submit_expecting(
        &self,
        principal: &Principal,
        op: WriteOp,
        expect: Vec<Expect>,
    ) -> DomainResult<impl Future<Output = DomainResult<WriteOutcome>> + Send + 'static> {
        principal.authorize(op.action())?;
        if !expect.is_empty() && matches!(op, WriteOp::UploadModels(_)) {
            return Err(DomainError::Internal(
                "a model upload cannot expect records",
            ));
        }
        let scoped = (!principal.holds_everywhere(op.action())).then(|| principal.clone());
        let pending = match op {
            WriteOp::UploadModels(docs) => {
                if let Some(principal) = &scoped {
                    principal.check_write(&self.snapshot(), &WriteOp::UploadModels(Vec::new()))?;
                }
                let permit = self
                    .uploads
                    .clone()
                    .try_acquire_owned()
                    .map_err(|_| DomainError::Unavailable)?;
                Pending::Upload {
                    docs,
                    permit,
                    service: self.clone(),
                    scoped,
                }
            }
            op => Pending::Queued(self.enqueue(op, scoped, None, expect)?),
        };
        Ok(async move {
            let answer = match pending {
                Pending::Queued(answer) => answer,
                Pending::Upload {
                    docs,
                    permit,
                    service,
                    scoped,
                } => {
                    let compiled = service.compile_upload(docs).await?;
                    service.enqueue(
                        WriteOp::AddCompiledModels(compiled),
                        scoped,
                        Some(permit),
                        Vec::new(),
                    )?
                }
            };
            // Bounded where a runtime's timer drives the future; a thread that blocks on it
            // (the history's merger) waits for the writer as before.
            let answer = match tokio::runtime::Handle::try_current() {
                Ok(_) => tokio::time::timeout(WRITE_WAIT, answer)
                    .await
                    .map_err(|_| DomainError::Unconfirmed)?,
                Err(_) => answer.await,
            };
            answer.map_err(|_| DomainError::Unavailable)?
        })
    }

    fn enqueue(
        &self,
        op: WriteOp,
        scoped: Option<Principal>,
        _upload: Option<tokio::sync::OwnedSemaphorePermit>,
        expect: Vec<Expect>,
    ) -> DomainResult<oneshot::Receiver<DomainResult<WriteOutcome>>> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .try_send(Job {
                op,
                scoped,
                reply: Reply::Async(reply),
                _upload,
                expect,
            })
            .map_err(|_| DomainError::Unavailable)?;
        Ok(answer)
    }

    /// Compiles an upload off the writer: on a blocking thread when a runtime is running.
    async fn compile_upload(&self, docs: Vec<Value>) -> DomainResult<ops::CompiledModels> {
        let snapshot = self.snapshot();
        let hook = self.shared.compile_hook.read().ok().and_then(|h| h.clone());
        let compile = move || {
            if let Some(hook) = hook {
                hook();
            }
            ops::compile_upload(&snapshot, docs)
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => runtime
                .spawn_blocking(compile)
                .await
                .map_err(|_| DomainError::Internal("the upload could not be compiled"))?,
            Err(_) => compile(),
        }
    }

    /// Runs `hook` on the thread that compiles each later model upload, just before it
    /// compiles. For tests that hold an upload in compilation; nothing in configuration sets it.
    #[doc(hidden)]
    pub fn set_compile_hook(&self, hook: Arc<dyn Fn() + Send + Sync>) {
        if let Ok(mut slot) = self.shared.compile_hook.write() {
            *slot = Some(hook);
        }
    }

    pub fn twin(&self, principal: &Principal, id: &str) -> DomainResult<Arc<Twin>> {
        principal.authorize(Action::TwinsRead)?;
        let graph = self.snapshot();
        principal.twin_for(&graph, Action::TwinsRead, id).cloned()
    }

    /// A component of a twin and the twin's etag, from one snapshot, as ADT's
    /// `GET /digitaltwins/{id}/components/{name}` returns them.
    pub fn component(
        &self,
        principal: &Principal,
        id: &str,
        name: &str,
    ) -> DomainResult<(Value, String)> {
        principal.authorize(Action::TwinsRead)?;
        let graph = self.snapshot();
        let twin = principal.twin_for(&graph, Action::TwinsRead, id)?;
        let is_component = graph
            .model(&twin.model)
            .is_some_and(|m| m.interface.components.contains_key(name));
        match twin.doc().remove(name) {
            Some(v) if is_component => Ok((v, twin.etag.clone())),
            _ => Err(DomainError::ComponentNotFound(name.to_owned())),
        }
    }

    pub fn relationship(
        &self,
        principal: &Principal,
        source: &str,
        id: &str,
    ) -> DomainResult<Arc<Relationship>> {
        principal.authorize(Action::RelationshipsRead)?;
        let graph = self.snapshot();
        principal.source_for(&graph, Action::RelationshipsRead, source)?;
        let rel = graph
            .relationship(source, id)
            .ok_or_else(|| DomainError::RelationshipNotFound(id.to_owned()))?;
        if principal.may_relationship(&graph, Action::RelationshipsRead, rel) {
            Ok(rel.clone())
        } else {
            Err(hidden(DomainError::RelationshipNotFound(id.to_owned())))
        }
    }

    /// Outgoing relationships of `source`, optionally only those named `name`.
    pub fn outgoing(
        &self,
        principal: &Principal,
        source: &str,
        name: Option<&str>,
    ) -> DomainResult<Vec<Arc<Relationship>>> {
        principal.authorize(Action::RelationshipsRead)?;
        let graph = self.snapshot();
        principal.source_for(&graph, Action::RelationshipsRead, source)?;
        Ok(graph
            .outgoing(source)
            .filter(|r| name.is_none_or(|n| r.name.as_ref() == n))
            .filter(|r| principal.may_relationship(&graph, Action::RelationshipsRead, r))
            .cloned()
            .collect())
    }

    pub fn incoming(
        &self,
        principal: &Principal,
        target: &str,
    ) -> DomainResult<Vec<Arc<Relationship>>> {
        principal.authorize(Action::RelationshipsRead)?;
        let graph = self.snapshot();
        principal.source_for(&graph, Action::RelationshipsRead, target)?;
        Ok(graph
            .incoming(target)
            .filter(|r| principal.may_relationship(&graph, Action::RelationshipsRead, r))
            .cloned()
            .collect())
    }

    pub fn model(&self, principal: &Principal, id: &str) -> DomainResult<Arc<ModelEntry>> {
        principal.authorize(Action::ModelsRead)?;
        let dtmi = Dtmi::parse(id).map_err(|e| DomainError::InvalidArgument(e.to_string()))?;
        let graph = self.snapshot();
        let entry = graph
            .model(&dtmi)
            .ok_or_else(|| DomainError::ModelNotFound(id.to_owned()))?;
        if principal.may_model(Action::ModelsRead, entry) {
            Ok(entry.clone())
        } else {
            Err(hidden(DomainError::ModelNotFound(id.to_owned())))
        }
    }

    /// Every model, or with `dependencies_for` those models and everything they depend on
    /// (`extends` and component schemas, transitively), ordered by ID.
    pub fn models(
        &self,
        principal: &Principal,
        dependencies_for: &[String],
    ) -> DomainResult<Vec<Arc<ModelEntry>>> {
        principal.authorize(Action::ModelsRead)?;
        let graph = self.snapshot();
        let mut out: Vec<Arc<ModelEntry>> = if dependencies_for.is_empty() {
            graph.models().cloned().collect()
        } else {
            let mut wanted = std::collections::BTreeSet::new();
            for id in dependencies_for {
                let dtmi =
                    Dtmi::parse(id).map_err(|e| DomainError::InvalidArgument(e.to_string()))?;
                let entry = graph
                    .model(&dtmi)
                    .ok_or_else(|| DomainError::ModelNotFound(id.clone()))?;
                if !principal.may_model(Action::ModelsRead, entry) {
                    return Err(hidden(DomainError::ModelNotFound(id.clone())));
                }
                collect_dependencies(&entry.interface, &mut wanted);
            }
            wanted
                .iter()
                .filter_map(|id| graph.model(id).cloned())
                .collect()
        };
        out.retain(|m| principal.may_model(Action::ModelsRead, m));
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    pub fn route(&self, principal: &Principal, id: &str) -> DomainResult<Arc<EventRoute>> {
        principal.authorize(Action::EventRoutesRead)?;
        let route = self
            .snapshot()
            .route(id)
            .cloned()
            .ok_or_else(|| DomainError::RouteNotFound(id.to_owned()))?;
        if principal.may_route(Action::EventRoutesRead, id) {
            Ok(route)
        } else {
            Err(hidden(DomainError::RouteNotFound(id.to_owned())))
        }
    }

    pub fn routes(&self, principal: &Principal) -> DomainResult<Vec<Arc<EventRoute>>> {
        principal.authorize(Action::EventRoutesRead)?;
        Ok(self
            .snapshot()
            .routes()
            .filter(|r| principal.may_route(Action::EventRoutesRead, &r.id))
            .cloned()
            .collect())
    }
}

fn collect_dependencies(iface: &dtdl::Interface, out: &mut std::collections::BTreeSet<Dtmi>) {
    out.insert(iface.id.clone());
    out.extend(iface.ancestors.iter().cloned());
    for component in iface.components.values() {
        collect_dependencies(&component.schema, out);
    }
}

/// What the writer builds on: the graph and the change feed's state as the store holds them,
/// and the store's commit counter they reflect (`None` for a store of one writer).
struct Loaded {
    graph: Graph,
    feed: FeedState,
    work: usize,
    head: Option<u64>,
}

/// Times [`Loaded::read`] reads a shared store again when another writer committed while it
/// read, before it gives up.
const LOAD_ATTEMPTS: usize = 8;

impl Loaded {
    /// Reads the graph and the feed's state as one consistent state of the store: from a
    /// snapshot of it where the store has one ([`Store::snapshot`], PostgreSQL); otherwise the
    /// commit counter is read before and after, and equal, no commit fell between the tables'
    /// reads, else it reads again. (Without a snapshot a node could not start, or catch up,
    /// while other writers committed faster than it read: CI saw a restart under load fail.)
    fn read(store: &dyn Store) -> Result<Self, OpenError> {
        if let Some(snapshot) = store.snapshot()? {
            let (loaded, _) = Self::read_between(snapshot.as_ref())?;
            return Ok(loaded);
        }
        for _ in 0..LOAD_ATTEMPTS {
            let (loaded, before) = Self::read_between(store)?;
            if loaded.head == before {
                return Ok(loaded);
            }
        }
        Err(OpenError::Store(StoreError(
            "other writers kept committing while the graph was read".into(),
        )))
    }

    /// Reads once; also answers the commit counter read before (`head` is the one after).
    fn read_between(store: &dyn Store) -> Result<(Self, Option<u64>), OpenError> {
        let before = store.head()?;
        let mut work = 0;
        let graph = load(store, &mut work)?;
        let feed =
            FeedState::from_records(&store.scan(Table::Meta)?, store.scan(Table::FeedTwins)?)
                .ok_or(OpenError::Corrupt("change feed", "position".into()))?
                .with_message_ids(store.scan(Table::MessageIds)?)
                .ok_or(OpenError::Corrupt("change feed", "message IDs".into()))?;
        let head = store.head()?;
        let loaded = Self {
            graph,
            feed,
            work,
            head,
        };
        Ok((loaded, before))
    }
}

fn writer(
    mut rx: mpsc::Receiver<Job>,
    shared: Arc<Shared>,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    feed: FeedState,
    mut applied: Option<u64>,
) {
    let _alive = WriterAlive(&shared.writer_alive);
    let mut batch = Vec::with_capacity(MAX_GROUP);
    let mut ctx = WriteContext {
        feed: std::cell::RefCell::new(feed),
        ..WriteContext::default()
    };
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let now = clock.now();
        ctx.now = rfc3339(now);
        ctx.unix_now = now.unix_timestamp();
        if catch_up(&shared, store.as_ref(), &mut ctx, &mut applied) {
            // Checked before the group is decided and at the counter it commits at: a record
            // another writer changes from here on moves the counter, and the fenced commit
            // then applies nothing.
            if applied.is_some() {
                check_expectations(&mut batch, store.as_ref());
            }
            let merged = merge_readings(&mut batch);
            let mut tries_left = REDECIDE;
            let mut turn = None;
            // Another writer committed between the catch-up and the group's commit: the group
            // is decided again on what that writer committed, rather than answered 503.
            while let Some(again) = commit_group(
                &mut batch,
                &shared,
                store.as_ref(),
                &ctx,
                &mut applied,
                tries_left > 0,
            ) {
                tries_left -= 1;
                metrics::counter!("twinguard_store_groups_decided_again_total").increment(1);
                batch = again;
                if tries_left == 0 {
                    // The last try is made in the store's commit turn: a node that catches up
                    // more slowly than a busier one commits (every try lost, it would refuse
                    // every write while the other writes on; CI saw that after a failover).
                    turn = Turn::take(store.as_ref());
                }
                if !catch_up(&shared, store.as_ref(), &mut ctx, &mut applied) {
                    for job in batch.drain(..) {
                        let _ = job.reply.send(Err(DomainError::Unavailable));
                    }
                    break;
                }
                check_expectations(&mut batch, store.as_ref());
            }
            drop(turn);
            answer_merged(merged);
        } else {
            for job in batch.drain(..) {
                let _ = job.reply.send(Err(DomainError::Unavailable));
            }
        }
    }
}

/// The store's commit turn while the writer holds it ([`Store::hold_turn`]), given back when
/// dropped (a commit in it has ended it already).
struct Turn<'a>(&'a dyn Store);

impl<'a> Turn<'a> {
    fn take(store: &'a dyn Store) -> Option<Self> {
        match store.hold_turn() {
            Ok(true) => {
                metrics::counter!("twinguard_store_commit_turns_total").increment(1);
                Some(Self(store))
            }
            Ok(false) => None,
            Err(e) => {
                tracing::warn!(error = %e, "the commit turn could not be taken; the group is tried once more without it");
                None
            }
        }
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.0.end_turn();
    }
}

/// Before a group is decided on a store that other writers share: if the store's commit
/// counter moved past what the writer has applied, reads the graph and the feed again and
/// publishes them, so every decision (a precondition, a refusal, a feed position) is taken on
/// a state that includes every commit acknowledged before the group began. False when that
/// state cannot be had now (the group is then answered 503 and applies nothing).
fn catch_up(
    shared: &Shared,
    store: &dyn Store,
    ctx: &mut WriteContext,
    applied: &mut Option<u64>,
) -> bool {
    let Some(current) = *applied else {
        return true;
    };
    // Any refresh queued before this point is served by this look at the store.
    if let Some(position) = &shared.position {
        position.refresh_queued.store(false, Ordering::Release);
    }
    let current_at = |head: u64, applied: &mut Option<u64>| {
        *applied = Some(head);
        if let Some(position) = &shared.position {
            position.confirm(head);
        }
        // The store answers and nothing was missed: a commit that failed before no longer
        // keeps the node not ready.
        shared.store_healthy.store(true, Ordering::Relaxed);
        true
    };
    match store.head() {
        Ok(Some(head)) if head == current => return current_at(head, applied),
        // Other writers committed: what they changed of the graph and the feed's state is read
        // from the change log (nothing, when they changed only other owners' records). A
        // counter that went back (a store that answers for another history: a standby promoted
        // without commits this writer applied, a recovery to an earlier point) is read whole:
        // what was applied may not exist any more.
        Ok(Some(head)) if head > current => match follow_changes(shared, store, ctx, current, head)
        {
            Ok(Some(head)) => return current_at(head, applied),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "what other writers changed could not be read from the change log; the graph is read again whole");
            }
        },
        Ok(_) => {}
        Err(e) => {
            tracing::error!(error = %e, "cannot read the store's commit counter; writes refused");
            shared.store_healthy.store(false, Ordering::Relaxed);
            return false;
        }
    }
    metrics::counter!("twinguard_store_catch_ups_total").increment(1);
    match Loaded::read(store) {
        Ok(loaded) => {
            shared.published.store(Arc::new(loaded.graph));
            let head = loaded.feed.next - 1;
            *ctx.feed.borrow_mut() = loaded.feed;
            *ctx.parsed.borrow_mut() = Default::default();
            publish_feed_head(shared, head);
            *applied = loaded.head;
            if let (Some(position), Some(head)) = (&shared.position, loaded.head) {
                if head < current {
                    tracing::warn!(
                        from = current,
                        head,
                        "the store's commit counter went back (a failover or a recovery); the graph was read again whole"
                    );
                }
                position.restart(head);
            }
            shared.store_healthy.store(true, Ordering::Relaxed);
            true
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot read what other writers committed; writes refused");
            shared.store_healthy.store(false, Ordering::Relaxed);
            false
        }
    }
}

/// A record another writer changed, as it stands now (`None`: deleted).
pub(crate) type Changed = (String, Option<Vec<u8>>);

/// Most commits of other writers [`follow_changes`] reads one by one; a writer further behind
/// reads the graph whole.
const MAX_FOLLOWED_COMMITS: u64 = 4_096;
/// Most changed records of the graph's tables it reads one by one.
const MAX_FOLLOWED_RECORDS: usize = 20_000;
/// Commits of the change log read at a time, so that what is held before the bound above is
/// checked stays small.
const LOG_STEP: u64 = 256;

/// What the change log says other writers changed of the graph.
#[derive(Default)]
struct GraphChanges {
    /// The keys of the graph's tables, by table.
    keys: std::collections::BTreeMap<Table, std::collections::BTreeSet<String>>,
    /// The commits that logged the graph's mark, and those that logged a key of its tables.
    marked: std::collections::BTreeSet<u64>,
    keyed: std::collections::BTreeSet<u64>,
    records: usize,
}

impl GraphChanges {
    /// Adds what `view`'s log says of the commits `after + 1 ..= upto`. False when the log does
    /// not reach back, or names more than [`MAX_FOLLOWED_RECORDS`] records.
    fn read(&mut self, view: &dyn Store, after: u64, upto: u64) -> Result<bool, StoreError> {
        let mut at = after;
        while at < upto {
            let to = upto.min(at.saturating_add(LOG_STEP));
            let Some(changes) = view.changes_after(at, to)? else {
                return Ok(false);
            };
            for change in changes {
                if change.changed_graph() {
                    self.marked.insert(change.seq);
                } else if change.table.owner() == Owner::Graph {
                    self.keyed.insert(change.seq);
                    let added = self
                        .keys
                        .entry(change.table)
                        .or_default()
                        .insert(change.key);
                    self.records += usize::from(added);
                }
            }
            if self.records > MAX_FOLLOWED_RECORDS {
                return Ok(false);
            }
            at = to;
        }
        Ok(true)
    }

    /// Whether only a whole read will do: a model or an event route changed (models are
    /// compiled together), or a commit logged the graph's mark without its keys (a node of an
    /// earlier version).
    fn need_whole(&self) -> bool {
        !self.marked.is_subset(&self.keyed)
            || self.keys.contains_key(&Table::Models)
            || self.keys.contains_key(&Table::EventRoutes)
    }
}

/// Brings the published graph and the feed's state up to what other writers committed after
/// `current` (the store's counter was `head` a moment ago), reading only the records the change
/// log names. The log up to `head` is read as it is (its rows do not change); only if it says
/// the graph changed does the writer open a snapshot of the store, read the rest of the log and
/// the records in it, so that the state published is exactly one commit's. Returns the counter
/// it now reflects; `None` when only a whole read will do (see [`GraphChanges`]; also more than
/// [`MAX_FOLLOWED_COMMITS`] behind, or a counter that went back).
fn follow_changes(
    shared: &Shared,
    store: &dyn Store,
    ctx: &WriteContext,
    current: u64,
    head: u64,
) -> Result<Option<u64>, OpenError> {
    let mut changes = GraphChanges::default();
    if head - current > MAX_FOLLOWED_COMMITS || !changes.read(store, current, head)? {
        return Ok(None);
    }
    if changes.marked.is_empty() {
        // Only other owners' records changed (delivery positions and leases, tokens, replay
        // windows): the graph and the feed are as applied, at the new counter.
        metrics::counter!("twinguard_store_catch_ups_skipped_total").increment(1);
        return Ok(Some(head));
    }
    if changes.need_whole() {
        return Ok(None);
    }
    let snapshot = store.snapshot()?;
    let view: &dyn Store = snapshot.as_deref().unwrap_or(store);
    let Some(at) = view.head()? else {
        return Ok(None);
    };
    if at < head
        || at - current > MAX_FOLLOWED_COMMITS
        || !changes.read(view, head, at)?
        || changes.need_whole()
    {
        return Ok(None);
    }
    let mut keys = changes.keys;
    let mut read = |table: Table| -> Result<Vec<Changed>, StoreError> {
        let asked: Vec<String> = keys
            .remove(&table)
            .unwrap_or_default()
            .into_iter()
            .collect();
        let values = view.get_many(table, &asked)?;
        Ok(asked.into_iter().zip(values).collect())
    };
    let (twins, relationships) = (read(Table::Twins)?, read(Table::Relationships)?);
    let (feed_twins, message_ids) = (read(Table::FeedTwins)?, read(Table::MessageIds)?);
    let meta = view.scan(Table::Meta)?;

    // Twins first (a relationship names its twins), then relationships, then the twins that are
    // gone (a twin is deleted only once its relationships are).
    let mut graph: Graph = (**shared.published.load()).clone();
    let mut scratch = Vec::new();
    let mut gone = Vec::new();
    for (key, value) in twins {
        match value {
            Some(bytes) => graph.insert_twin(twin_record(key, bytes)?),
            None => gone.push(key),
        }
    }
    for (key, value) in relationships {
        match value {
            Some(bytes) => {
                let rel = relationship_record(&graph, key, &bytes)?;
                graph.insert_relationship(rel);
            }
            None => {
                let (source, id) = crate::graph::records::split_relationship_key(&key)
                    .ok_or(OpenError::Corrupt("relationship", key.clone()))?;
                graph.remove_relationship(source, id, &mut scratch);
            }
        }
    }
    for key in gone {
        graph.remove_twin(&key, &mut scratch);
    }
    ctx.feed
        .borrow_mut()
        .refresh(&meta, feed_twins, message_ids)
        .ok_or(OpenError::Corrupt("change feed", "position".into()))?;
    metrics::counter!("twinguard_store_catch_ups_incremental_total").increment(1);
    shared.published.store(Arc::new(graph));
    *ctx.parsed.borrow_mut() = Default::default();
    publish_feed_head(shared, ctx.feed.borrow().next - 1);
    Ok(Some(at))
}

/// Answers [`DomainError::Superseded`] to each write of `batch` that expects a record to hold
/// what it no longer holds, and takes it out of the group. A record is judged as the group
/// would leave it up to that write: the store's value, then the records carried by every write
/// before it that is kept, expecting something or not (an owner decides its writes in order,
/// each on the one before). A store that cannot be read refuses the writes that expect
/// something, 503.
fn check_expectations(batch: &mut Vec<Job>, store: &dyn Store) {
    use std::collections::HashMap;
    if batch.iter().all(|job| job.expect.is_empty()) {
        return;
    }
    let mut wanted: HashMap<Table, Vec<String>> = HashMap::new();
    for job in batch.iter() {
        for e in &job.expect {
            wanted.entry(e.table).or_default().push(e.key.clone());
        }
    }
    let mut current: HashMap<(Table, String), Option<Vec<u8>>> = HashMap::new();
    let mut unreadable = false;
    for (table, mut keys) in wanted {
        keys.sort_unstable();
        keys.dedup();
        match store.get_many(table, &keys) {
            Ok(values) if values.len() == keys.len() => {
                current.extend(keys.into_iter().map(|k| (table, k)).zip(values));
            }
            Ok(_) => {
                tracing::error!("the store answered a different number of records than asked");
                unreadable = true;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot read the records writes were decided on; they are refused");
                unreadable = true;
            }
        }
    }
    let mut kept = Vec::with_capacity(batch.len());
    for job in batch.drain(..) {
        if !job.expect.is_empty() {
            if unreadable {
                let _ = job.reply.send(Err(DomainError::Unavailable));
                continue;
            }
            let holds = job
                .expect
                .iter()
                .all(|e| current.get(&(e.table, e.key.clone())) == Some(&e.value));
            if !holds {
                metrics::counter!("twinguard_store_superseded_total").increment(1);
                let _ = job.reply.send(Err(DomainError::Superseded));
                continue;
            }
        }
        // The records this write will commit, if the writer keeps it (it refuses records
        // outside their owner's tables, and a scoped caller's write it may refuse, before
        // writing anything of the write).
        let carried = match &job.op {
            _ if job.scoped.is_some() => None,
            WriteOp::Commit(owned)
                if owned.owner != Owner::Graph
                    && owned.records.iter().all(|r| r.table.owner() == owned.owner) =>
            {
                Some(&owned.records)
            }
            WriteOp::ApplyReadings { records, .. }
                if crate::graph::readings::telemetry_owns(records) =>
            {
                Some(records)
            }
            _ => None,
        };
        for m in carried.into_iter().flatten() {
            let key = (m.table, m.key.clone());
            if let Some(value) = current.get_mut(&key) {
                *value = m.value.clone();
            }
        }
        kept.push(job);
    }
    *batch = kept;
}

/// Moves the feed's head to `head`, waking its readers only if it moved.
fn publish_feed_head(shared: &Shared, head: u64) {
    shared.feed_head.send_if_modified(|h| {
        let moved = *h != head;
        *h = head;
        moved
    });
}

/// Telemetry writes merged into one for a group's commit: the merged write's answer, and each
/// original write's reply with how many updates it had.
struct Merged {
    answer: oneshot::Receiver<DomainResult<WriteOutcome>>,
    parts: Vec<(Reply, usize)>,
}

/// Merges each run of consecutive telemetry writes (from the pipeline's instance-wide
/// principal) into one, so that a twin that several of them move is parsed and written once per
/// commit rather than once per write. Applying the merged updates in order leaves the graph and
/// the store as applying the writes one after another would: each twin's updates keep their
/// order, and the records of a later write still come after those of an earlier one. A write
/// that the writer will refuse for its records (see `readings::check_records`) stays apart, so
/// that it is refused alone.
///
/// A merged write expects what each of its writes expected (checked, in order, before the
/// merge). Should the group be decided again (its commit was stale), they are judged together
/// on the state before the merged write: each of them holding there implies each held in turn
/// (every write was kept by the check in order), while the converse may fail, superseding the
/// merged write, which its owner then decides again: never accepted on a broken expectation.
fn merge_readings(batch: &mut Vec<Job>) -> Vec<Merged> {
    type Part = (Vec<PropertyUpdate>, Vec<Mutation>, Reply, Vec<Expect>);
    fn job(
        updates: Vec<PropertyUpdate>,
        records: Vec<Mutation>,
        reply: Reply,
        expect: Vec<Expect>,
    ) -> Job {
        Job {
            op: WriteOp::ApplyReadings { updates, records },
            scoped: None,
            reply,
            _upload: None,
            expect,
        }
    }
    fn flush(run: &mut Vec<Part>, out: &mut Vec<Job>, merged: &mut Vec<Merged>) {
        if run.len() < 2 {
            out.extend(run.drain(..).map(|(u, r, reply, e)| job(u, r, reply, e)));
            return;
        }
        let (reply, answer) = oneshot::channel();
        let (mut updates, mut records, mut parts, mut expect) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (u, r, part_reply, e) in run.drain(..) {
            parts.push((part_reply, u.len()));
            updates.extend(u);
            records.extend(r);
            expect.extend(e);
        }
        out.push(job(updates, records, Reply::Async(reply), expect));
        merged.push(Merged { answer, parts });
    }
    let mut out = Vec::with_capacity(batch.len());
    let mut merged = Vec::new();
    let mut run = Vec::new();
    for job in batch.drain(..) {
        match job {
            Job {
                op: WriteOp::ApplyReadings { updates, records },
                scoped: None,
                reply,
                expect,
                ..
            } if crate::graph::readings::telemetry_owns(&records) => {
                run.push((updates, records, reply, expect))
            }
            job => {
                flush(&mut run, &mut out, &mut merged);
                out.push(job);
            }
        }
    }
    flush(&mut run, &mut out, &mut merged);
    *batch = out;
    merged
}

/// Hands each merged write's part of the answer to the write it came from.
fn answer_merged(merged: Vec<Merged>) {
    for Merged { mut answer, parts } in merged {
        match answer.try_recv() {
            Ok(Ok(WriteOutcome::Readings(results))) => {
                let mut results = results.into_iter();
                for (reply, n) in parts {
                    let part = results.by_ref().take(n).collect();
                    let _ = reply.send(Ok(WriteOutcome::Readings(part)));
                }
            }
            Ok(Err(e @ (DomainError::Unavailable | DomainError::Superseded))) => {
                let superseded = matches!(e, DomainError::Superseded);
                for (reply, _) in parts {
                    let _ = reply.send(Err(if superseded {
                        DomainError::Superseded
                    } else {
                        DomainError::Unavailable
                    }));
                }
            }
            _ => {
                for (reply, _) in parts {
                    let _ = reply.send(Err(DomainError::Internal(
                        "the write could not be processed",
                    )));
                }
            }
        }
    }
}

/// A write as it came, kept to decide it again when its group's commit is stale.
struct Again {
    op: WriteOp,
    scoped: Option<Principal>,
    expect: Vec<Expect>,
    upload: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Validates and applies each job in order on a working copy of the graph, commits all their
/// mutations at once, then publishes and answers. Refusals are answered only once the group's
/// fate is known, because they were decided against earlier writes of the same group that were
/// not yet durable: if the group fails, its refusals fail with it (503, retryable).
///
/// On a store that other writers share, the commit is fenced at `applied`, the commit counter
/// the group was decided on: if another writer committed since, nothing is applied. Then, when
/// `may_retry`, no write is answered and the writes are given back, to be decided again after
/// another catch-up; otherwise each is answered `Superseded` (503, retryable).
fn commit_group(
    batch: &mut Vec<Job>,
    shared: &Shared,
    store: &dyn Store,
    ctx: &WriteContext,
    applied: &mut Option<u64>,
    may_retry: bool,
) -> Option<Vec<Job>> {
    let mut working: Graph = (**shared.published.load()).clone();
    let mut muts: Vec<Mutation> = Vec::new();
    let keep = may_retry && applied.is_some();
    // Each write's answer, in the group's order, with what deciding it again takes.
    let mut decided: Vec<(Reply, DomainResult<WriteOutcome>, Option<Again>)> =
        Vec::with_capacity(batch.len());
    let mut torn = false;
    for Job {
        op,
        scoped,
        reply,
        _upload,
        expect,
    } in batch.drain(..)
    {
        // The upload's permit is held while the write is decided, and with the write when it
        // may be decided again.
        let (again, _upload) = match keep {
            true => (
                Some(Again {
                    op: op.clone(),
                    scoped: scoped.clone(),
                    expect,
                    upload: _upload,
                }),
                None,
            ),
            false => (None, _upload),
        };
        let mark = muts.len();
        let changes_mark = ctx.changes.borrow().len();
        let ids_mark = ctx.feed.borrow().pending_ids();
        // A panic inside an operation (a parser bug hit by some input) must not take the
        // writer down with it; the job is refused and the group treated as torn.
        let applied = catch_unwind(AssertUnwindSafe(|| {
            if let Some(principal) = &scoped {
                principal.check_write(&working, &op)?;
            }
            op.apply(&mut working, ctx, &mut muts)
        }));
        match applied {
            Ok(Ok(outcome)) => decided.push((reply, Ok(outcome), again)),
            Ok(Err(e)) => {
                // Operations check everything before their first change (see `WriteOp::apply`),
                // so a refused one has changed nothing. Should one ever break that rule, the
                // working copy can no longer be trusted and the whole group is refused.
                torn |= muts.len() != mark || ctx.changes.borrow().len() != changes_mark;
                ctx.feed.borrow_mut().truncate_ids(ids_mark);
                decided.push((reply, Err(e), again));
            }
            Err(_) => {
                tracing::error!("a write panicked in the writer; refusing its group");
                torn = true;
                decided.push((
                    reply,
                    Err(DomainError::Internal("the write could not be processed")),
                    None,
                ));
            }
        }
    }
    let done = decided
        .iter()
        .filter(|(_, answer, _)| answer.is_ok())
        .count();
    let changes = std::mem::take(&mut *ctx.changes.borrow_mut());
    // What the group's writes are answered when it is not committed.
    let failed = if torn {
        tracing::error!("the working graph of a write group is torn; refusing the group");
        Some(DomainError::Unavailable)
    } else if done == 0 {
        None
    } else {
        let started = std::time::Instant::now();
        let numbered = ctx.feed.borrow().number(changes, &ctx.now, &mut muts);
        ctx.feed
            .borrow_mut()
            .message_id_records(ctx.unix_now, &mut muts);
        keep_last_per_key(&mut muts);
        // Nothing to make durable (a refresh, a trim with nothing to trim): no commit, so a
        // shared store's counter moves only for changes.
        shared.waiting_for_the_store(Some(started));
        let result = match *applied {
            _ if muts.is_empty() => Ok(Fenced::Committed(applied.unwrap_or(0))),
            Some(expected) => store.commit_at(&muts, expected),
            None => store.commit(&muts).map(|()| Fenced::Committed(0)),
        };
        shared.waiting_for_the_store(None);
        let elapsed = started.elapsed();
        metrics::histogram!("twinguard_store_commit_seconds").record(elapsed.as_secs_f64());
        tracing::debug!(
            writes = done,
            records = muts.len(),
            micros = elapsed.as_micros() as u64,
            "group committed"
        );
        match result {
            Ok(Fenced::Stale(head)) => {
                metrics::counter!("twinguard_store_commit_conflicts_total").increment(1);
                tracing::warn!(
                    writes = done,
                    head,
                    "another writer committed first; writes refused (retryable)"
                );
                Some(DomainError::Superseded)
            }
            Ok(Fenced::Committed(head)) => {
                if applied.is_some() {
                    *applied = Some(head);
                }
                // Published first, then the position: a reader that sees the position sees
                // the snapshot that reflects it.
                let publish_position = shared.position.as_ref().map(|p| (p, head));
                shared.store_healthy.store(true, Ordering::Relaxed);
                shared.published.store(Arc::new(working));
                let mut feed = ctx.feed.borrow_mut();
                feed.committed(numbered, ctx.unix_now);
                publish_feed_head(shared, feed.next - 1);
                if let Some((position, head)) = publish_position {
                    position.confirm(head);
                }
                None
            }
            Err(e) => {
                tracing::error!(error = %e, writes = done, "store commit failed; writes refused");
                shared.store_healthy.store(false, Ordering::Relaxed);
                Some(DomainError::Unavailable)
            }
        }
    };
    if failed.is_some() || done == 0 {
        ctx.feed.borrow_mut().abandoned();
    }
    if keep && matches!(failed, Some(DomainError::Superseded)) {
        return Some(
            decided
                .into_iter()
                .filter_map(|(reply, _, again)| {
                    let Again {
                        op,
                        scoped,
                        expect,
                        upload,
                    } = again?;
                    Some(Job {
                        op,
                        scoped,
                        reply,
                        _upload: upload,
                        expect,
                    })
                })
                .collect(),
        );
    }
    // A group that another writer's commit made stale (again and again) is answered
    // `Superseded`: 503 to a client, and for an owner that decided on its own records, the cue
    // to read them again.
    let answer_failed = |failed: &DomainError| match failed {
        DomainError::Superseded => DomainError::Superseded,
        _ => DomainError::Unavailable,
    };
    for (reply, answer, _) in decided {
        let answer = match (answer, &failed) {
            (Ok(outcome), None) => Ok(outcome),
            (Err(e @ DomainError::Internal(_)), _) | (Err(e), None) => Err(e),
            (_, Some(f)) => Err(answer_failed(f)),
        };
        let _ = reply.send(answer);
    }
    None
}

/// Drops every change that a later change of the same key in the batch overrides. A group often
/// rewrites one record many times (a twin moved by several readings, a device's replay window);
/// the store needs only the last version, which is what the whole batch leaves behind anyway.
fn keep_last_per_key(muts: &mut Vec<Mutation>) {
    let mut keep = vec![false; muts.len()];
    let mut seen = std::collections::HashSet::with_capacity(muts.len());
    for (i, m) in muts.iter().enumerate().rev() {
        keep[i] = seen.insert((m.table, m.key.as_str()));
    }
    drop(seen);
    let mut kept = keep.into_iter();
    muts.retain(|_| kept.next().unwrap_or(true));
}

fn load(store: &dyn Store, load_work: &mut usize) -> Result<Graph, OpenError> {
    let mut graph = Graph::default();
    let mut muts = Vec::new();

    let mut definitions = Vec::new();
    let mut records = Vec::new();
    for (key, bytes) in store.scan(Table::Models)? {
        let record: Value =
            serde_json::from_slice(&bytes).map_err(|_| OpenError::Corrupt("model", key.clone()))?;
        let definition = record
            .get("definition")
            .cloned()
            .ok_or_else(|| OpenError::Corrupt("model", key.clone()))?;
        definitions.push(definition);
        records.push(record);
    }
    if !definitions.is_empty() {
        // No work limit here: every stored model was accepted within `MAX_STORED_EXPANSION`,
        // and compiling them all again costs about their stored expansion and their size, never
        // more (memoised compilation); refusing them now would keep the server from starting.
        let compiled = dtdl::compile(&definitions, &|_| None, &ParseOptions::strict(), usize::MAX)
            .map_err(OpenError::Models)?;
        *load_work = compiled.work;
        let interfaces = compiled.interfaces;
        for ((definition, record), interface) in
            definitions.into_iter().zip(records).zip(interfaces)
        {
            let entry = ModelEntry {
                id: interface.id.clone(),
                definition,
                upload_time: record
                    .get("uploadTime")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                decommissioned: record
                    .get("decommissioned")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
                interface,
            };
            graph.put_model(Arc::new(entry), &mut muts);
        }
    }
    for_each_record(store, Table::Twins, LOAD_PAGE, |key, bytes| {
        graph.insert_twin(twin_record(key, bytes)?);
        Ok::<_, OpenError>(())
    })?;
    for_each_record(store, Table::Relationships, LOAD_PAGE, |key, bytes| {
        let rel = relationship_record(&graph, key, &bytes)?;
        graph.insert_relationship(rel);
        Ok::<_, OpenError>(())
    })?;
    for (key, bytes) in store.scan(Table::EventRoutes)? {
        let record: Value = serde_json::from_slice(&bytes)
            .map_err(|_| OpenError::Corrupt("event route", key.clone()))?;
        let field = |name: &str| record.get(name).and_then(Value::as_str).map(str::to_owned);
        let (Some(endpoint_name), Some(filter)) = (field("endpointName"), field("filter")) else {
            return Err(OpenError::Corrupt("event route", key));
        };
        graph.put_route(
            Arc::new(EventRoute {
                id: key,
                endpoint_name,
                filter,
            }),
            &mut muts,
        );
    }
    Ok(graph)
}

/// The twin stored under `key`.
fn twin_record(key: String, bytes: Vec<u8>) -> Result<Arc<Twin>, OpenError> {
    String::from_utf8(bytes)
        .ok()
        .and_then(Twin::from_json)
        .filter(|twin| *twin.id == *key)
        .map(Arc::new)
        .ok_or(OpenError::Corrupt("twin", key))
}

/// The relationship stored under `key`, between twins of `graph`.
fn relationship_record(
    graph: &Graph,
    key: String,
    bytes: &[u8],
) -> Result<Arc<Relationship>, OpenError> {
    let doc: Map<String, Value> = serde_json::from_slice(bytes)
        .map_err(|_| OpenError::Corrupt("relationship", key.clone()))?;
    let twin_id = |field: &str| {
        let id = doc.get(field).and_then(Value::as_str)?;
        graph.twin(id).map(|t| t.id.clone())
    };
    let (source, target) = (twin_id("$sourceId"), twin_id("$targetId"));
    Relationship::from_doc(&doc, source.as_ref(), target.as_ref())
        .map(Arc::new)
        .ok_or(OpenError::Corrupt("relationship", key))
}

/// How long [`Door::commit`] waits for room in the writer's queue before it gives up: long
/// enough to ride out a burst, short enough that a stuck writer does not hold the calling
/// threads (then it fails, as an async write into a full queue does at once).
const DOOR_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// One owner's way into the writer (see [`TwinService::door`]): its records are committed in
/// the writer's groups, checked against the tables it owns. Synchronous, for the owners whose
/// code is (the identity directory, token revocation): it blocks the calling thread for one
/// group commit, as a direct commit to the store blocked it for one fsync.
#[derive(Clone)]
pub struct Door {
    owner: Owner,
    jobs: mpsc::Sender<Job>,
}

impl std::fmt::Debug for Door {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Door").field("owner", &self.owner).finish()
    }
}

impl Door {
    /// Commits `records` durably, all or none, in the writer's order. Refused when a record is
    /// outside the owner's tables.
    pub fn commit(&self, records: Vec<Mutation>) -> Result<(), StoreError> {
        self.commit_expecting(records, Vec::new())
            .map_err(|e| StoreError(e.to_string()))
    }

    /// [`Door::commit`] of records decided on the records `expect` names (see [`Expect`]):
    /// [`DomainError::Superseded`], with nothing stored, when another writer of a shared store
    /// has changed one of them; [`DomainError::Unavailable`] when the writer cannot take it.
    pub fn commit_expecting(
        &self,
        records: Vec<Mutation>,
        expect: Vec<Expect>,
    ) -> DomainResult<()> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let mut job = Job {
            op: WriteOp::Commit(ops::OwnedRecords {
                owner: self.owner,
                records,
            }),
            scoped: None,
            reply: Reply::Blocking(tx),
            _upload: None,
            expect,
        };
        let deadline = std::time::Instant::now() + DOOR_WAIT;
        loop {
            match self.jobs.try_send(job) {
                Ok(()) => break,
                Err(mpsc::error::TrySendError::Full(back))
                    if std::time::Instant::now() < deadline =>
                {
                    job = back;
                    thread::sleep(std::time::Duration::from_millis(1));
                }
                Err(_) => {
                    tracing::warn!(owner = ?self.owner, "the writer is busy or has stopped; an owner's commit is refused");
                    return Err(DomainError::Unavailable);
                }
            }
        }
        rx.recv().map_err(|_| DomainError::Unavailable)?.map(|_| ())
    }
}

/// A store that an owner's code reads and writes as before, whose commits go straight to the
/// store until [`OwnerStore::connect`] hands it a [`Door`] (start-up and migrations run before
/// the writer), then through the writer. Either way a record outside the owner's tables is
/// refused.
pub struct OwnerStore {
    owner: Owner,
    store: Arc<dyn Store>,
    door: std::sync::OnceLock<Door>,
}

impl std::fmt::Debug for OwnerStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnerStore")
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

impl OwnerStore {
    pub fn new(owner: Owner, store: Arc<dyn Store>) -> Self {
        Self {
            owner,
            store,
            door: std::sync::OnceLock::new(),
        }
    }

    /// From now on, commits go through the writer.
    pub fn connect(&self, door: Door) {
        let _ = self.door.set(door);
    }
}

impl Store for OwnerStore {
    fn scan(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.store.scan(table)
    }

    /// Not a commit: history is the telemetry owner's, and no node keeps it in memory.
    fn drop_history_before(&self, cutoff_ms: i64) -> Result<usize, StoreError> {
        if self.owner != Owner::Telemetry {
            return Err(StoreError(format!(
                "the {:?} owner may not remove history",
                self.owner
            )));
        }
        self.store.drop_history_before(cutoff_ms)
    }

    fn range_from(
        &self,
        table: Table,
        from: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.store.range_from(table, from, limit)
    }

    fn range(
        &self,
        table: Table,
        from: &str,
        to: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.store.range(table, from, to, limit)
    }

    fn commit(&self, batch: &[Mutation]) -> Result<(), StoreError> {
        match self.door.get() {
            Some(door) => door.commit(batch.to_vec()),
            None => {
                ops::check_owned(self.owner, batch).map_err(|e| StoreError(e.to_string()))?;
                self.store.commit(batch)
            }
        }
    }

    fn head(&self) -> Result<Option<u64>, StoreError> {
        self.store.head()
    }

    fn get_many(&self, table: Table, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        self.store.get_many(table, keys)
    }

    /// Through the door once it is connected (the writer checks `expect` on a shared store
    /// only: an owner's memory is the truth on a store of one writer); before, the store's own.
    fn commit_expecting(&self, batch: &[Mutation], expect: &[Expect]) -> Result<bool, StoreError> {
        match self.door.get() {
            Some(door) => match door.commit_expecting(batch.to_vec(), expect.to_vec()) {
                Ok(()) => Ok(true),
                Err(DomainError::Superseded) => Ok(false),
                Err(e) => Err(StoreError(e.to_string())),
            },
            None => {
                ops::check_owned(self.owner, batch).map_err(|e| StoreError(e.to_string()))?;
                self.store.commit_expecting(batch, expect)
            }
        }
    }

    fn changes_after(
        &self,
        after: u64,
        upto: u64,
    ) -> Result<Option<Vec<crate::store::Change>>, StoreError> {
        self.store.changes_after(after, upto)
    }

    /// Only before the door is connected: once it is, the writer fences its own commits.
    fn commit_at(&self, batch: &[Mutation], expected: u64) -> Result<Fenced, StoreError> {
        if self.door.get().is_some() {
            return Err(StoreError(
                "a fenced commit goes through the writer, not its door".into(),
            ));
        }
        ops::check_owned(self.owner, batch).map_err(|e| StoreError(e.to_string()))?;
        self.store.commit_at(batch, expected)
    }
}

/// A query request: new query text, or a continuation token from a previous page.
#[derive(Debug, Clone, Default)]
pub struct QueryRequest {
    pub query: Option<String>,
    pub continuation_token: Option<String>,
    pub page_size: usize,
}

/// Queries one principal may run at once; one more is refused with [`DomainError::Busy`]. Two
/// lets a client fetch the next page while it reads one, and keeps one caller to a quarter of
/// the server's query slots.
pub const MAX_QUERIES_PER_PRINCIPAL: usize = 2;

impl TwinService {
    /// Runs one page of an ADT query on the current snapshot, within the query limits
    /// (`query::limits`): the work budget, the page byte cap, [`query::limits::QUERY_DEADLINE`]
    /// read on the service's clock, and [`MAX_QUERIES_PER_PRINCIPAL`].
    pub fn query(
        &self,
        principal: &Principal,
        request: &QueryRequest,
    ) -> DomainResult<query::QueryPage> {
        principal.authorize(Action::Query)?;
        let _running = if self.unbounded_queries {
            None
        } else {
            Some(
                self.queries
                    .enter(&principal.subject)
                    .ok_or(DomainError::Busy {
                        retry_after_secs: 1,
                    })?,
            )
        };
        let (text, offset) = match (&request.continuation_token, &request.query) {
            (Some(token), _) => query::decode_continuation(token).map_err(query_error)?,
            (None, Some(text)) => (text.clone(), 0),
            (None, None) => {
                return Err(DomainError::InvalidArgument(
                    "the request holds no query".into(),
                ));
            }
        };
        let parsed = query::parse(&text).map_err(query_error)?;
        let graph = self.snapshot();
        let unbounded = self.unbounded_queries;
        let deadline = self.clock.now() + query::limits::QUERY_DEADLINE;
        let expired = || !unbounded && self.clock.now() >= deadline;
        let limits = if unbounded {
            query::Bounds {
                max_work: u64::MAX,
                max_page_bytes: usize::MAX,
                ..query::Bounds::default()
            }
        } else {
            query::Bounds::default()
        };
        let size = request.page_size;
        let page = match principal.query_scope(&graph) {
            None => {
                let bounds = query::Bounds {
                    expired: &expired,
                    ..limits
                };
                query::execute_bounded(&graph, &parsed, &text, offset, size, &|_| true, &bounds)
            }
            Some(scope) => {
                // Each twin's visibility is decided once per page, and the subtree walks that
                // place the twins the page examines as visible are charged to the work budget.
                let steps = |t: &crate::graph::Twin| scope.charge(t);
                let bounds = query::Bounds {
                    expired: &expired,
                    scope_steps: &steps,
                    ..limits
                };
                let visible = |t: &crate::graph::Twin| scope.visible(t);
                query::execute_bounded(&graph, &parsed, &text, offset, size, &visible, &bounds)
            }
        };
        page.map_err(query_error)
    }
}

fn query_error(e: query::QueryError) -> DomainError {
    match e.code() {
        twinguard_proto::ErrorCode::QueryLimitExceeded => {
            DomainError::QueryLimitExceeded(e.to_string())
        }
        twinguard_proto::ErrorCode::BadRequest => DomainError::BadRequest(e.to_string()),
        twinguard_proto::ErrorCode::InternalServerError => {
            DomainError::Internal("a query result row could not be serialized")
        }
        _ => DomainError::Query(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{Quality, Skipped};
    use crate::store::MemoryStore;

    type Answer = oneshot::Receiver<DomainResult<WriteOutcome>>;

    fn readings_job(names: &[&str], record: &str) -> (Job, Answer) {
        let updates = names
            .iter()
            .map(|name| PropertyUpdate {
                twin: "t".into(),
                name: (*name).into(),
                value: Some(Value::from(1)),
                source_time: None,
                quality: Quality::Good,
                sources: Vec::new(),
            })
            .collect();
        let records = vec![Mutation::put(
            Table::Replay,
            "d",
            record.as_bytes().to_vec(),
        )];
        let (reply, answer) = oneshot::channel();
        let op = WriteOp::ApplyReadings { updates, records };
        let job = Job {
            op,
            scoped: None,
            reply: Reply::Async(reply),
            _upload: None,
            expect: Vec::new(),
        };
        (job, answer)
    }

    #[test]
    fn consecutive_telemetry_writes_are_merged_in_order_and_each_gets_its_own_answer() {
        let (a, mut answer_a) = readings_job(&["x", "y"], "a");
        let (route_reply, mut route_answer) = oneshot::channel();
        let route = Job {
            op: WriteOp::DeleteRoute("r".into()),
            scoped: None,
            reply: Reply::Async(route_reply),
            _upload: None,
            expect: Vec::new(),
        };
        let (c, mut answer_c) = readings_job(&["x"], "c");
        let (d, mut answer_d) = readings_job(&["y", "z", "x"], "d");
        let (e, mut answer_e) = readings_job(&["z"], "e");
        let mut batch = vec![a, route, c, d];
        let merged = merge_readings(&mut batch);
        // A lone telemetry write stays as it is; the run of two after the route is merged.
        assert_eq!(batch.len(), 3);
        assert_eq!(merged.len(), 1);
        assert!(matches!(batch[1].op, WriteOp::DeleteRoute(_)));
        let WriteOp::ApplyReadings { updates, records } = &batch[2].op else {
            panic!("not merged");
        };
        let names: Vec<&str> = updates.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["x", "y", "z", "x"]);
        assert_eq!(
            records,
            &[
                Mutation::put(Table::Replay, "d", b"c".to_vec()),
                Mutation::put(Table::Replay, "d", b"d".to_vec()),
            ]
        );
        // As the writer would answer: the merged write's results, split back in order.
        let mut jobs = batch.into_iter();
        let _ = jobs.next().unwrap().reply.send(Ok(WriteOutcome::Done));
        let _ = jobs.next().unwrap().reply.send(Ok(WriteOutcome::Done));
        let results = vec![Ok(()), Ok(()), Err(Skipped::Schema), Ok(())];
        let _ = jobs
            .next()
            .unwrap()
            .reply
            .send(Ok(WriteOutcome::Readings(results)));
        answer_merged(merged);
        let readings = |answer: &mut Answer| match answer.try_recv() {
            Ok(Ok(WriteOutcome::Readings(r))) => r,
            _ => panic!("no readings answer"),
        };
        assert!(matches!(answer_a.try_recv(), Ok(Ok(WriteOutcome::Done))));
        assert!(matches!(
            route_answer.try_recv(),
            Ok(Ok(WriteOutcome::Done))
        ));
        assert_eq!(readings(&mut answer_c), vec![Ok(())]);
        assert_eq!(
            readings(&mut answer_d),
            vec![Ok(()), Err(Skipped::Schema), Ok(())]
        );
        // A failed commit fails every merged write, retryably.
        let (f, mut answer_f) = readings_job(&["x"], "f");
        let mut batch = vec![e, f];
        let merged = merge_readings(&mut batch);
        let job = batch.pop().unwrap();
        let _ = job.reply.send(Err(DomainError::Unavailable));
        answer_merged(merged);
        for answer in [&mut answer_e, &mut answer_f] {
            assert!(matches!(
                answer.try_recv(),
                Ok(Err(DomainError::Unavailable))
            ));
        }
    }

    #[test]
    fn a_batch_keeps_only_each_keys_last_change_and_leaves_the_same_store() {
        let batch = vec![
            Mutation::put(Table::Twins, "a", b"1".to_vec()),
            Mutation::put(Table::Replay, "a", b"w1".to_vec()),
            Mutation::put(Table::Twins, "b", b"1".to_vec()),
            Mutation::put(Table::Twins, "a", b"2".to_vec()),
            Mutation::delete(Table::Twins, "b"),
            Mutation::put(Table::Replay, "a", b"w2".to_vec()),
            Mutation::put(Table::History, "h1", b"x".to_vec()),
            Mutation::delete(Table::Twins, "c"),
            Mutation::put(Table::Twins, "c", b"3".to_vec()),
        ];
        let mut kept = batch.clone();
        keep_last_per_key(&mut kept);
        assert_eq!(
            kept,
            vec![
                Mutation::put(Table::Twins, "a", b"2".to_vec()),
                Mutation::delete(Table::Twins, "b"),
                Mutation::put(Table::Replay, "a", b"w2".to_vec()),
                Mutation::put(Table::History, "h1", b"x".to_vec()),
                Mutation::put(Table::Twins, "c", b"3".to_vec()),
            ]
        );
        let (whole, trimmed) = (MemoryStore::default(), MemoryStore::default());
        whole.commit(&batch).unwrap();
        trimmed.commit(&kept).unwrap();
        for table in Table::ALL {
            assert_eq!(whole.scan(table).unwrap(), trimmed.scan(table).unwrap());
        }
    }
}
