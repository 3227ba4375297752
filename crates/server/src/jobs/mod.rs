//! Import and deletion jobs: ADT's `/jobs/imports` and `/jobs/deletions` (`docs/jobs.md`).
//!
//! A job runs in the background, one job at a time in the order they were created, under the
//! principal that created it: every write it makes goes through [`TwinService::submit`] with
//! that principal, so it is checked like the same write made through the API. Creating a job
//! also requires its actions at instance scope (see [`Jobs::authorize_import`]), so a caller
//! with scoped grants cannot start a job that would fail half-way on its scope.
//!
//! Jobs are kept in memory only: a restart forgets them (and removes their spooled input); a job
//! running at a crash stops where it was, with everything it applied before durable.
//!
//! An import reads its input line by line from a spool file in the data directory, so memory
//! holds one line, one batch of models (the models section as a whole, at most
//! [`MAX_MODELS_SECTION_BYTES`], since models are uploaded in dependency order) and at most
//! [`WINDOW`] twin or relationship writes in flight.

mod deletion;
mod import;

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use serde::Serialize;
use serde_json::{Value, json};
use time::OffsetDateTime;
use tokio::io::AsyncWriteExt;
use twinguard_core::auth::{Action, Principal};
use twinguard_core::error::{DomainError, DomainResult};
use twinguard_core::graph::{WriteOp, WriteOutcome};
use twinguard_core::service::TwinService;
use twinguard_proto::ErrorCode;

use crate::error::ApiError;
use deletion::run_deletion;
use import::{download, run_import};

/// Largest import input (an upload, spooled to the data directory).
pub const MAX_IMPORT_BYTES: u64 = 1024 * 1024 * 1024;
/// Most bytes all spooled inputs (uploading, waiting or running) hold together.
pub const MAX_SPOOL_BYTES: u64 = 4 * MAX_IMPORT_BYTES;
/// Free space an input never takes from the data directory's file system.
pub const DISK_RESERVE_BYTES: u64 = 1024 * 1024 * 1024;
/// How often (in bytes written) the free space is looked at.
const DISK_CHECK_EVERY: u64 = 8 * 1024 * 1024;
/// Longest line of an import file.
pub const MAX_LINE_BYTES: usize = 1024 * 1024;
/// Bytes the models section may hold: it is read whole, to upload it in dependency order.
pub const MAX_MODELS_SECTION_BYTES: usize = 64 * 1024 * 1024;
/// Models per upload (ADT's limit on one upload).
pub const MODEL_BATCH: usize = twinguard_core::graph::ops::MAX_MODELS_PER_UPLOAD;
/// Twin or relationship writes a job has in flight at once (the writer commits them in groups).
pub const WINDOW: usize = 1024;
/// Jobs of one kind kept; finished jobs past their purge time make room first.
pub const MAX_JOBS: usize = 100;
/// Entries of a job's output log kept; later ones are counted, not kept (the last is always).
pub const MAX_LOG_ENTRIES: usize = 10_000;
/// How long a finished job is kept.
pub const RETENTION: time::Duration = time::Duration::hours(24);
/// How often a write turned away because the writer's queue is full is tried again.
const BUSY_RETRIES: u32 = 200;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    NotStarted,
    Running,
    Succeeded,
    Failed,
    Cancelling,
    Cancelled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Import,
    Deletion,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::Import => "Import",
            Self::Deletion => "Delete",
        }
    }

    fn path(self) -> &'static str {
        match self {
            Self::Import => "imports",
            Self::Deletion => "deletions",
        }
    }
}

/// A job's error, as ADT reports it.
#[derive(Debug, Clone, Serialize)]
pub struct JobError {
    pub code: String,
    pub message: String,
}

/// What a job has applied so far.
#[derive(Debug, Clone, Copy, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// Input lines read (imports).
    pub lines: u64,
    pub models: u64,
    pub twins: u64,
    pub relationships: u64,
}

struct Job {
    id: String,
    /// Distinguishes this job from a later one with the same ID.
    run: uuid::Uuid,
    kind: Kind,
    /// Where the input came from: `upload`, or the URL without its query (which may hold a
    /// SAS token) and fragment.
    input: String,
    status: Status,
    created: OffsetDateTime,
    last_action: OffsetDateTime,
    finished: Option<OffsetDateTime>,
    error: Option<JobError>,
    progress: Progress,
    log: Vec<String>,
    log_dropped: u64,
    cancel: Arc<AtomicBool>,
}

fn rfc3339(t: OffsetDateTime) -> String {
    twinguard_core::clock::rfc3339(t)
}

impl Job {
    fn view(&self, base: &str) -> Value {
        let mut v = json!({
            "id": self.id,
            "createdDateTime": rfc3339(self.created),
            "lastActionDateTime": rfc3339(self.last_action),
            "status": self.status,
            "progress": self.progress,
        });
        if let Value::Object(m) = &mut v {
            if self.kind == Kind::Import {
                m.insert("inputBlobUri".into(), json!(self.input));
                m.insert(
                    "outputBlobUri".into(),
                    json!(format!("{base}/jobs/imports/{}/output", self.id)),
                );
            }
            if let Some(f) = self.finished {
                m.insert("finishedDateTime".into(), json!(rfc3339(f)));
                m.insert("purgeDateTime".into(), json!(rfc3339(f + RETENTION)));
            }
            if let Some(e) = &self.error {
                m.insert(
                    "error".into(),
                    json!({"code": e.code, "message": e.message}),
                );
            }
        }
        v
    }

    fn purgeable(&self, now: OffsetDateTime) -> bool {
        self.finished.is_some_and(|f| f + RETENTION <= now)
    }
}

struct Inner {
    jobs: Mutex<BTreeMap<(Kind, String), Job>>,
    /// Where uploads are spooled (`DATA_DIR/jobs`).
    spool: PathBuf,
    spool_budget: Arc<SpoolBudget>,
    /// One job runs at a time, in the order they were created.
    runner: tokio::sync::Mutex<()>,
    audit: Option<crate::audit::Audit>,
    /// How input is fetched from a URL (nothing is reachable until it is set).
    url_input: std::sync::RwLock<UrlInput>,
}

/// How import jobs fetch input from a URL: only through the egress allowlist (NS-4), with the
/// CA roots that https URLs are verified against. The default reaches nothing.
#[derive(Clone, Debug)]
pub struct UrlInput {
    pub egress: crate::egress::Egress,
    /// Roots for https URLs; with none, https input cannot be fetched.
    pub roots: Vec<reqwest::Certificate>,
}

impl Default for UrlInput {
    fn default() -> Self {
        Self {
            egress: crate::egress::Egress::new(crate::egress::EgressPolicy::deny_all()),
            roots: Vec::new(),
        }
    }
}

/// Plain http only to a loopback address (a local file server); everything else is https.
fn is_loopback_http(url: &reqwest::Url) -> bool {
    let host = url.host_str().unwrap_or("");
    let host = host.trim_start_matches('[').trim_end_matches(']');
    url.scheme() == "http"
        && (host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback()))
}

/// The jobs of this process (in memory; see the module documentation).
#[derive(Clone)]
pub struct Jobs {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Jobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jobs").finish_non_exhaustive()
    }
}

fn not_found(kind: Kind) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::NotFound,
        match kind {
            Kind::Import => "the import job was not found",
            Kind::Deletion => "the delete job was not found",
        },
    )
}

fn lock_failed() -> ApiError {
    ApiError::internal("the job table's lock is poisoned")
}

impl Jobs {
    /// Jobs spooling their input under `DATA_DIR/jobs`; what a previous run left there is removed
    /// (its jobs are gone with it). Completions are recorded in `audit` when given.
    pub fn open(data_dir: &Path, audit: Option<crate::audit::Audit>) -> std::io::Result<Self> {
        let spool = data_dir.join("jobs");
        match std::fs::remove_dir_all(&spool) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        // Owner only, whatever the umask: an import file is twin data.
        {
            use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&spool)?;
            std::fs::set_permissions(&spool, std::fs::Permissions::from_mode(0o700))?;
        }
        Ok(Self {
            inner: Arc::new(Inner {
                jobs: Mutex::new(BTreeMap::new()),
                spool,
                spool_budget: Arc::new(SpoolBudget {
                    used: AtomicU64::new(0),
                    limit: AtomicU64::new(MAX_SPOOL_BYTES),
                    reserve: AtomicU64::new(DISK_RESERVE_BYTES),
                }),
                runner: tokio::sync::Mutex::new(()),
                audit,
                url_input: std::sync::RwLock::new(UrlInput::default()),
            }),
        })
    }

    /// Sets the spool's limit (default [`MAX_SPOOL_BYTES`]).
    pub fn set_spool_limit(&self, bytes: u64) {
        self.inner
            .spool_budget
            .limit
            .store(bytes, Ordering::Relaxed);
    }

    /// Sets the free space an input leaves on the file system (default
    /// [`DISK_RESERVE_BYTES`]).
    pub fn set_disk_reserve(&self, bytes: u64) {
        self.inner
            .spool_budget
            .reserve
            .store(bytes, Ordering::Relaxed);
    }

    /// Bytes the spooled inputs hold now.
    pub fn spool_used(&self) -> u64 {
        self.inner.spool_budget.used.load(Ordering::Acquire)
    }

    fn spooled(&self) -> Spooled {
        Spooled::new(
            self.inner
                .spool
                .join(format!("{}.ndjson", uuid::Uuid::new_v4())),
            self.inner.spool_budget.clone(),
        )
    }

    /// An import writes models, twins and relationships: the caller must hold each of them, and
    /// `jobs/write`, for the whole instance.
    pub fn authorize_import(principal: &Principal) -> Result<(), ApiError> {
        for action in [
            Action::JobsWrite,
            Action::ModelsWrite,
            Action::TwinsWrite,
            Action::RelationshipsWrite,
        ] {
            principal.authorize_instance(action)?;
        }
        Ok(())
    }

    /// A deletion deletes every model, twin and relationship: the caller must hold each delete
    /// action, and `jobs/write`, for the whole instance.
    pub fn authorize_deletion(principal: &Principal) -> Result<(), ApiError> {
        for action in [
            Action::JobsWrite,
            Action::ModelsDelete,
            Action::TwinsDelete,
            Action::RelationshipsDelete,
        ] {
            principal.authorize_instance(action)?;
        }
        Ok(())
    }

    /// Lets import jobs fetch input from URLs that `input.egress` admits (`serve`'s egress
    /// allowlist; tests).
    pub fn set_url_input(&self, input: UrlInput) {
        if let Ok(mut slot) = self.inner.url_input.write() {
            *slot = input;
        }
    }

    /// A client for `url`, if the egress allowlist admits it; the refusal's detail goes to the
    /// log only.
    fn input_client(&self, url: &reqwest::Url) -> Result<reqwest::Client, ApiError> {
        let input = self
            .inner
            .url_input
            .read()
            .map_err(|_| lock_failed())?
            .clone();
        if url.scheme() != "https" && !is_loopback_http(url) {
            return Err(ApiError::invalid_argument(
                "inputBlobUri must be an https URL (http only on loopback)",
            ));
        }
        let mut builder = input
            .egress
            .http_client(url)
            .map_err(|e| ApiError {
                detail: Some(format!("inputBlobUri refused: {e}")),
                ..ApiError::invalid_argument("inputBlobUri is not on the egress allowlist")
            })?
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .https_only(url.scheme() == "https")
            .connect_timeout(std::time::Duration::from_secs(10))
            .read_timeout(std::time::Duration::from_secs(60));
        for root in input.roots {
            builder = builder.add_root_certificate(root);
        }
        builder
            .build()
            .map_err(|e| ApiError::internal(format!("building the input client: {e}")))
    }

    /// Creates an import job whose input is fetched from `url` (through the egress allowlist)
    /// when its turn comes, and starts it in the background.
    pub fn start_import_from_url(
        &self,
        service: Arc<TwinService>,
        principal: Arc<Principal>,
        id: &str,
        url: &str,
        base: &str,
    ) -> Result<Value, ApiError> {
        Self::authorize_import(&principal)?;
        let url = reqwest::Url::parse(url)
            .map_err(|_| ApiError::invalid_argument("inputBlobUri is not a URL"))?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err(ApiError::invalid_argument(
                "inputBlobUri must not carry user information",
            ));
        }
        let client = self.input_client(&url)?;
        let mut shown = url.clone();
        shown.set_query(None);
        shown.set_fragment(None);
        let (run, cancel) = self.insert(Kind::Import, id, shown.as_str())?;
        let handle = Handle {
            jobs: self.clone(),
            subject: principal.subject.clone(),
            kind: Kind::Import,
            id: id.to_owned(),
            run,
            cancel,
        };
        let mut input = self.spooled();
        tokio::spawn(async move {
            let _turn = handle.jobs.inner.runner.lock().await;
            if handle.begin() {
                let outcome = match download(&client, url, &mut input, MAX_IMPORT_BYTES).await {
                    Ok(bytes) => {
                        handle.log("Info", json!({"message": format!("fetched {bytes} bytes")}));
                        run_import(&service, &principal, &handle, &input.path).await
                    }
                    Err(e) => {
                        handle.log("Error", json!({"code": e.code, "message": e.message}));
                        Outcome::Failed(e)
                    }
                };
                handle.finish(outcome).await;
            }
        });
        self.get(Kind::Import, id, base)
    }

    fn check_id(id: &str) -> Result<(), ApiError> {
        let ok = !id.is_empty()
            && id.len() <= 128
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if ok {
            Ok(())
        } else {
            Err(ApiError::invalid_argument(
                "a job ID is 1 to 128 letters, digits, '-', '_' or '.'",
            ))
        }
    }

    /// Refuses an ID in use, and a full table.
    fn check_room(
        jobs: &mut BTreeMap<(Kind, String), Job>,
        kind: Kind,
        id: &str,
    ) -> Result<(), ApiError> {
        Self::check_id(id)?;
        let now = OffsetDateTime::now_utc();
        jobs.retain(|_, j| !j.purgeable(now));
        if jobs.contains_key(&(kind, id.to_owned())) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::ValidationFailed,
                "a job with this ID exists; delete it first",
            ));
        }
        if jobs.keys().filter(|(k, _)| *k == kind).count() >= MAX_JOBS {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::ValidationFailed,
                format!("at most {MAX_JOBS} jobs of a kind are kept; delete finished jobs first"),
            ));
        }
        Ok(())
    }

    /// Spools an upload (`chunks` of the request body) to a file of its own; refuses more than
    /// `limit` bytes.
    pub async fn spool_upload(
        &self,
        principal: &Principal,
        id: &str,
        mut body: axum::body::Body,
        limit: u64,
    ) -> Result<Spooled, ApiError> {
        use http_body_util::BodyExt;
        Self::authorize_import(principal)?;
        Self::check_room(
            &mut *self.inner.jobs.lock().map_err(|_| lock_failed())?,
            Kind::Import,
            id,
        )?;
        let mut spooled = self.spooled();
        let mut file = private_file(&spooled.path)
            .await
            .map_err(|e| ApiError::internal(format!("cannot create the job's spool file: {e}")))?;
        let mut written: u64 = 0;
        while let Some(frame) = body.frame().await {
            let frame =
                frame.map_err(|_| ApiError::bad_request("the request body could not be read"))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            written = written.saturating_add(data.len() as u64);
            if written > limit {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    ErrorCode::PayloadTooLarge,
                    format!("an import file holds at most {limit} bytes"),
                ));
            }
            spooled
                .grow(data.len() as u64)
                .map_err(|full| full.to_api())?;
            file.write_all(&data)
                .await
                .map_err(|e| ApiError::internal(format!("cannot spool the import: {e}")))?;
        }
        file.flush()
            .await
            .map_err(|e| ApiError::internal(format!("cannot spool the import: {e}")))?;
        Ok(spooled)
    }

    fn insert(
        &self,
        kind: Kind,
        id: &str,
        input: &str,
    ) -> Result<(uuid::Uuid, Arc<AtomicBool>), ApiError> {
        let mut jobs = self.inner.jobs.lock().map_err(|_| lock_failed())?;
        Self::check_room(&mut jobs, kind, id)?;
        let now = OffsetDateTime::now_utc();
        let run = uuid::Uuid::new_v4();
        let cancel = Arc::new(AtomicBool::new(false));
        jobs.insert(
            (kind, id.to_owned()),
            Job {
                id: id.to_owned(),
                run,
                kind,
                input: input.to_owned(),
                status: Status::NotStarted,
                created: now,
                last_action: now,
                finished: None,
                error: None,
                progress: Progress::default(),
                log: Vec::new(),
                log_dropped: 0,
                cancel: cancel.clone(),
            },
        );
        Ok((run, cancel))
    }

    /// Creates an import job over a spooled upload and starts it in the background.
    pub fn start_import(
        &self,
        service: Arc<TwinService>,
        principal: Arc<Principal>,
        id: &str,
        input: Spooled,
        base: &str,
    ) -> Result<Value, ApiError> {
        Self::authorize_import(&principal)?;
        let (run, cancel) = self.insert(Kind::Import, id, "upload")?;
        let handle = Handle {
            jobs: self.clone(),
            subject: principal.subject.clone(),
            kind: Kind::Import,
            id: id.to_owned(),
            run,
            cancel,
        };
        tokio::spawn(async move {
            let _input = input;
            let _turn = handle.jobs.inner.runner.lock().await;
            if handle.begin() {
                let outcome = run_import(&service, &principal, &handle, &_input.path).await;
                handle.finish(outcome).await;
            }
        });
        self.get(Kind::Import, id, base)
    }

    /// Creates a deletion job and starts it in the background.
    pub fn start_deletion(
        &self,
        service: Arc<TwinService>,
        principal: Arc<Principal>,
        id: &str,
        base: &str,
    ) -> Result<Value, ApiError> {
        Self::authorize_deletion(&principal)?;
        let (run, cancel) = self.insert(Kind::Deletion, id, "")?;
        let handle = Handle {
            jobs: self.clone(),
            subject: principal.subject.clone(),
            kind: Kind::Deletion,
            id: id.to_owned(),
            run,
            cancel,
        };
        tokio::spawn(async move {
            let _turn = handle.jobs.inner.runner.lock().await;
            if handle.begin() {
                let outcome = run_deletion(&service, &principal, &handle).await;
                handle.finish(outcome).await;
            }
        });
        self.get(Kind::Deletion, id, base)
    }

    fn read<T>(&self, kind: Kind, id: &str, f: impl FnOnce(&Job) -> T) -> Result<T, ApiError> {
        let jobs = self.inner.jobs.lock().map_err(|_| lock_failed())?;
        jobs.get(&(kind, id.to_owned()))
            .map(f)
            .ok_or_else(|| not_found(kind))
    }

    pub fn get(&self, kind: Kind, id: &str, base: &str) -> Result<Value, ApiError> {
        self.read(kind, id, |j| j.view(base))
    }

    /// Every job of `kind`, ordered by ID.
    pub fn list(&self, kind: Kind, base: &str) -> Result<Vec<Value>, ApiError> {
        let now = OffsetDateTime::now_utc();
        let mut jobs = self.inner.jobs.lock().map_err(|_| lock_failed())?;
        jobs.retain(|_, j| !j.purgeable(now));
        Ok(jobs
            .values()
            .filter(|j| j.kind == kind)
            .map(|j| j.view(base))
            .collect())
    }

    /// The job's output log, one JSON object a line.
    pub fn output(&self, kind: Kind, id: &str) -> Result<String, ApiError> {
        self.read(kind, id, |j| {
            let mut text = String::new();
            for line in &j.log {
                text.push_str(line);
                text.push('\n');
            }
            text
        })
    }

    /// Asks a job to stop: one not started yet is cancelled at once, a running one stops before
    /// its next write (`cancelling` until it has).
    pub fn cancel(&self, kind: Kind, id: &str, base: &str) -> Result<Value, ApiError> {
        let mut jobs = self.inner.jobs.lock().map_err(|_| lock_failed())?;
        let job = jobs
            .get_mut(&(kind, id.to_owned()))
            .ok_or_else(|| not_found(kind))?;
        let now = OffsetDateTime::now_utc();
        match job.status {
            Status::NotStarted => {
                job.cancel.store(true, Ordering::SeqCst);
                job.status = Status::Cancelled;
                job.last_action = now;
                job.finished = Some(now);
            }
            Status::Running => {
                job.cancel.store(true, Ordering::SeqCst);
                job.status = Status::Cancelling;
                job.last_action = now;
            }
            _ => {}
        }
        Ok(job.view(base))
    }

    /// Forgets a job; a job still running is cancelled first (it stops before its next write).
    pub fn delete(&self, kind: Kind, id: &str) -> Result<(), ApiError> {
        let mut jobs = self.inner.jobs.lock().map_err(|_| lock_failed())?;
        let job = jobs
            .remove(&(kind, id.to_owned()))
            .ok_or_else(|| not_found(kind))?;
        job.cancel.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// Creates a spool file readable by its owner only.
async fn private_file(path: &Path) -> std::io::Result<tokio::fs::File> {
    tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .await
}

/// The bytes every spooled input holds together, against one limit, and the free space the spool
/// must leave on the data directory's file system: however many jobs wait or upload at once,
/// the spool cannot fill the disk the store and the audit trail live on.
#[derive(Debug)]
struct SpoolBudget {
    used: AtomicU64,
    limit: AtomicU64,
    /// Free space left alone ([`DISK_RESERVE_BYTES`]; tests raise it).
    reserve: AtomicU64,
}

/// Why a spooled input cannot grow.
#[derive(Debug, PartialEq, Eq)]
pub enum SpoolFull {
    /// Every input together would pass the spool's limit.
    Budget(u64),
    /// The file system would have less than [`DISK_RESERVE_BYTES`] free.
    Disk,
}

impl SpoolFull {
    fn to_api(&self) -> ApiError {
        match self {
            Self::Budget(limit) => ApiError::unavailable(format!(
                "import inputs waiting or running hold the spool's {limit} bytes; retry when they finish"
            )),
            Self::Disk => ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                ErrorCode::ServiceUnavailable,
                "the server has too little free disk space to take the input",
            ),
        }
    }
}

/// An upload spooled to disk; the file is removed, and its bytes given back to the spool's
/// budget, when this is dropped.
#[derive(Debug)]
pub struct Spooled {
    path: PathBuf,
    budget: Arc<SpoolBudget>,
    reserved: u64,
    /// Where the next free-space check is due.
    next_disk_check: u64,
}

impl Spooled {
    fn new(path: PathBuf, budget: Arc<SpoolBudget>) -> Self {
        Self {
            path,
            budget,
            reserved: 0,
            next_disk_check: 0,
        }
    }

    /// Reserves `n` more bytes, before they are written.
    fn grow(&mut self, n: u64) -> Result<(), SpoolFull> {
        let limit = self.budget.limit.load(Ordering::Relaxed);
        let taken = self
            .budget
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|total| *total <= limit)
            });
        if taken.is_err() {
            return Err(SpoolFull::Budget(limit));
        }
        self.reserved += n;
        if self.reserved >= self.next_disk_check {
            self.next_disk_check = self.reserved + DISK_CHECK_EVERY;
            let dir = self.path.parent().unwrap_or(&self.path);
            let free = rustix::fs::statvfs(dir)
                .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
                .unwrap_or(0);
            let reserve = self.budget.reserve.load(Ordering::Relaxed);
            if free < reserve.saturating_add(n) {
                return Err(SpoolFull::Disk);
            }
        }
        Ok(())
    }
}

impl Drop for Spooled {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        self.budget.used.fetch_sub(self.reserved, Ordering::AcqRel);
    }
}

/// A running job's link to its record.
struct Handle {
    jobs: Jobs,
    /// Who created the job (its audit entry names them).
    subject: String,
    kind: Kind,
    id: String,
    run: uuid::Uuid,
    cancel: Arc<AtomicBool>,
}

/// How a job ended.
enum Outcome {
    Succeeded,
    Cancelled,
    Failed(JobError),
}

impl Handle {
    fn with<T>(&self, f: impl FnOnce(&mut Job) -> T) -> Option<T> {
        let mut jobs = self.jobs.inner.jobs.lock().ok()?;
        jobs.get_mut(&(self.kind, self.id.clone()))
            .filter(|j| j.run == self.run)
            .map(f)
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// Marks the job running; false if it was cancelled or deleted before its turn.
    fn begin(&self) -> bool {
        if self.cancelled() {
            return false;
        }
        let started = self
            .with(|j| {
                j.status = Status::Running;
                j.last_action = OffsetDateTime::now_utc();
            })
            .is_some();
        if started {
            self.log("Info", json!({"status": "Started"}));
        }
        started
    }

    /// Appends an entry to the output log, as ADT writes them.
    fn log(&self, level: &str, details: Value) {
        let entry = json!({
            "timestamp": rfc3339(OffsetDateTime::now_utc()),
            "jobId": self.id,
            "jobType": self.kind.name(),
            "logType": level,
            "details": details,
        })
        .to_string();
        self.with(|j| {
            if j.log.len() < MAX_LOG_ENTRIES - 1 {
                j.log.push(entry);
            } else {
                j.log_dropped += 1;
            }
        });
    }

    fn progress(&self, f: impl FnOnce(&mut Progress)) {
        self.with(|j| {
            f(&mut j.progress);
            j.last_action = OffsetDateTime::now_utc();
        });
    }

    async fn finish(&self, outcome: Outcome) {
        let now = OffsetDateTime::now_utc();
        let (status, error) = match outcome {
            Outcome::Succeeded => (Status::Succeeded, None),
            Outcome::Cancelled => (Status::Cancelled, None),
            Outcome::Failed(e) => (Status::Failed, Some(e)),
        };
        let mut details = json!({"status": status});
        if let (Some(e), Value::Object(m)) = (&error, &mut details) {
            m.insert("code".into(), json!(e.code));
            m.insert("message".into(), json!(e.message));
        }
        let level = if error.is_some() { "Error" } else { "Info" };
        let last = json!({
            "timestamp": rfc3339(now),
            "jobId": self.id,
            "jobType": self.kind.name(),
            "logType": level,
            "details": details,
        })
        .to_string();
        let summary = self.with(|j| {
            if j.log_dropped > 0 {
                j.log.push(
                    json!({
                        "timestamp": rfc3339(now),
                        "jobId": self.id,
                        "jobType": self.kind.name(),
                        "logType": "Warning",
                        "details": {"message": format!("{} log entries were not kept", j.log_dropped)},
                    })
                    .to_string(),
                );
            }
            j.log.push(last);
            j.status = status;
            j.error = error.clone();
            j.last_action = now;
            j.finished = Some(now);
            j.progress
        });
        // A job deleted while it ran has no record left; its end is still audited.
        let subject = &self.subject;
        tracing::info!(job = %self.id, kind = self.kind.name(), status = ?status, "job finished");
        if let Some(audit) = &self.jobs.inner.audit {
            let entry = json!({
                "kind": "job",
                "time": rfc3339(now),
                "jobType": self.kind.path(),
                "jobId": crate::audit::bounded(&self.id),
                "principal": crate::audit::bounded(subject),
                "status": status,
                "progress": summary,
                "deleted": summary.is_none(),
                "error": error.map(|e| e.code),
            });
            match serde_json::to_vec(&entry) {
                Ok(bytes) => {
                    if let Err(e) = audit.log().append_async(bytes).await {
                        tracing::error!(error = %e, job = %self.id, "a job's completion could not be recorded in the audit log");
                    }
                }
                Err(e) => tracing::error!(error = %e, "a job's audit entry did not serialize"),
            }
        }
    }
}

fn malformed(line: u64, what: impl std::fmt::Display) -> JobError {
    JobError {
        code: ErrorCode::ValidationFailed.as_str().to_owned(),
        message: format!("line {line}: {what}"),
    }
}

fn rejected(line: Option<u64>, e: DomainError) -> JobError {
    let api = ApiError::from(e);
    let message = match line.filter(|l| *l > 0) {
        Some(line) => format!("line {line}: {}", api.message),
        None => api.message,
    };
    JobError {
        code: api.code.as_str().to_owned(),
        message,
    }
}

type Pending = Pin<Box<dyn Future<Output = DomainResult<WriteOutcome>> + Send>>;

/// Writes in flight, each with the input line it came from.
struct Pipeline<'a> {
    service: &'a TwinService,
    principal: &'a Principal,
    in_flight: VecDeque<(u64, Pending)>,
}

impl<'a> Pipeline<'a> {
    fn new(service: &'a TwinService, principal: &'a Principal) -> Self {
        Self {
            service,
            principal,
            in_flight: VecDeque::new(),
        }
    }

    /// Queues `op`, waiting for the oldest write when [`WINDOW`] are in flight or the writer's
    /// queue is full. Returns how many writes completed while it waited.
    async fn submit(&mut self, line: u64, op: WriteOp) -> Result<u64, JobError> {
        let mut done = 0;
        if self.in_flight.len() >= WINDOW {
            done += self.complete_one().await?;
        }
        let mut tries = 0;
        loop {
            match self.service.submit(self.principal, op.clone()) {
                Ok(pending) => {
                    self.in_flight.push_back((line, Box::pin(pending)));
                    return Ok(done);
                }
                Err(DomainError::Unavailable) if tries < BUSY_RETRIES => {
                    tries += 1;
                    if self.in_flight.is_empty() {
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    } else {
                        done += self.complete_one().await?;
                    }
                }
                Err(e) => return Err(rejected(Some(line), e)),
            }
        }
    }

    async fn complete_one(&mut self) -> Result<u64, JobError> {
        match self.in_flight.pop_front() {
            Some((line, pending)) => pending
                .await
                .map(|_| 1)
                .map_err(|e| rejected(Some(line), e)),
            None => Ok(0),
        }
    }

    /// Waits for every write in flight; the first error wins, but all are awaited.
    async fn drain(&mut self) -> (u64, Option<JobError>) {
        let mut done = 0;
        let mut first = None;
        while let Some((line, pending)) = self.in_flight.pop_front() {
            match pending.await {
                Ok(_) => done += 1,
                Err(e) => {
                    if first.is_none() {
                        first = Some(rejected(Some(line), e));
                    }
                }
            }
        }
        (done, first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every spooled input counts against one limit, and gives its bytes back when it goes,
    /// however the growing interleaves.
    #[test]
    fn the_spool_budget_bounds_every_input_together() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = Jobs::open(dir.path(), None).unwrap();
        jobs.set_spool_limit(1_000);
        let mut a = jobs.spooled();
        let mut b = jobs.spooled();
        a.grow(700).unwrap();
        assert_eq!(b.grow(400), Err(SpoolFull::Budget(1_000)));
        b.grow(300).unwrap();
        assert_eq!(a.grow(1), Err(SpoolFull::Budget(1_000)));
        assert_eq!(jobs.spool_used(), 1_000);
        drop(a);
        assert_eq!(jobs.spool_used(), 300);
        b.grow(700).unwrap();
        drop(b);
        assert_eq!(jobs.spool_used(), 0, "every byte given back");
    }

    #[test]
    fn an_input_never_takes_the_disks_last_free_space() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = Jobs::open(dir.path(), None).unwrap();
        let free = {
            let s = rustix::fs::statvfs(dir.path()).unwrap();
            s.f_bavail * s.f_frsize
        };
        // A reserve above what is free: the first byte is refused.
        jobs.set_disk_reserve(free + (1 << 30));
        let mut input = jobs.spooled();
        assert_eq!(input.grow(1), Err(SpoolFull::Disk));
        drop(input);
        assert_eq!(jobs.spool_used(), 0);
        jobs.set_disk_reserve(0);
        jobs.spooled().grow(1).unwrap();
    }

    #[test]
    fn a_restart_forgets_the_jobs_and_removes_what_they_spooled() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("jobs");
        std::fs::create_dir(&spool).unwrap();
        std::fs::write(spool.join("left-over.ndjson"), b"{}").unwrap();
        let jobs = Jobs::open(dir.path(), None).unwrap();
        assert_eq!(std::fs::read_dir(&spool).unwrap().count(), 0);
        let mode = std::fs::metadata(&spool).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert!(jobs.list(Kind::Import, "").unwrap().is_empty());
    }

    #[test]
    fn statuses_are_written_as_adt_writes_them() {
        assert_eq!(json!(Status::NotStarted), json!("notstarted"));
        assert_eq!(json!(Status::Cancelling), json!("cancelling"));
    }
}
