//! The audit trail at the HTTP edge: every request is recorded (who, what, where from, the
//! answer, the correlation ID) and durable in the Merkle log before its response leaves; if it
//! cannot be recorded, the client gets 503 instead and readiness fails (fail closed). A request
//! that may change state (any method but GET, HEAD and OPTIONS) is recorded twice: its intent
//! is durable *before* the handler runs, so a request the trail cannot record is never applied,
//! and its outcome after. Handlers add security detail (the grant, the identity a token went
//! to) through [`AuditNote`].
//!
//! An entry's size is bounded whatever the request: every text value longer than
//! [`MAX_VALUE_BYTES`] (a 64 KiB path, a long identifier) is cut and followed by the SHA-256 of
//! the whole, so equal values still correlate and nobody grows the log faster than a few
//! hundred bytes a request. The free space of the log's file system is watched: below
//! [`DISK_RESERVE_BYTES`] readiness fails and says so, before appends would.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use aws_lc_rs::hmac;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::{Map, Value};
use sha2::Digest as _;
use twinguard_audit::log::{AuditError, AuditLog, Mirror, MirrorWait, Options};
use twinguard_audit::note::NoteSigner;
use twinguard_proto::ErrorCode;
use twinguard_store_postgres::PgStore;

use crate::app::AppState;
use crate::datadir::{DataDir, write_private};
use crate::error::ApiError;

/// Longest text value an entry keeps whole.
pub const MAX_VALUE_BYTES: usize = 256;
/// Free space on the audit log's file system below which readiness fails.
pub const DISK_RESERVE_BYTES: u64 = 256 * 1024 * 1024;

/// The audit log and the deployment's HMAC key for sensitive values.
#[derive(Clone)]
pub struct Audit {
    log: AuditLog,
    hmac: Arc<hmac::Key>,
    /// Bytes free on the log's file system at the last look (`u64::MAX` before the first).
    disk_free: Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit").finish_non_exhaustive()
    }
}

/// The name of a node's audit log in the database: the first 16 hex digits of the SHA-256 of
/// its checkpoint verifier key, so a log is named by the key that vouches for it, and a node
/// started with a new key (a lost disk) starts a new log beside the old one.
pub fn node_name(verifier_key: &str) -> String {
    let digest = sha2::Sha256::digest(verifier_key.trim().as_bytes());
    hex::encode(&digest[..8])
}

/// This node's audit log in the shared PostgreSQL database.
struct DatabaseMirror {
    store: Arc<PgStore>,
    node: String,
}

impl Mirror for DatabaseMirror {
    fn size(&self) -> Result<u64, String> {
        self.store.audit_size(&self.node).map_err(|e| e.0)
    }

    fn append(&self, first: u64, lines: Vec<Vec<u8>>) -> MirrorWait {
        let wait = self.store.audit_append(&self.node, first, lines);
        Box::new(move || wait().map_err(|e| e.0))
    }

    fn checkpoint(&self, size: u64, note: &str) -> Result<(), String> {
        self.store
            .audit_checkpoint(&self.node, size, note)
            .map_err(|e| e.0)
    }
}

/// Detail a handler adds to its request's audit entry.
#[derive(Debug, Clone, Default)]
pub struct AuditNote(Arc<Mutex<Map<String, Value>>>);

impl AuditNote {
    pub fn set(&self, key: &str, value: impl Into<Value>) {
        if let Ok(mut map) = self.0.lock() {
            map.insert(key.to_owned(), value.into());
        }
    }
}

impl Audit {
    /// Opens `DATA_DIR/audit/`, creating the checkpoint key (`secrets/audit-key`, its public
    /// half in `audit/checkpoint.pub`) and the HMAC key (`secrets/audit-hmac-key`) on first use.
    /// With `database` (the instance's PostgreSQL), every group is also stored there, as this
    /// node's log ([`node_name`]), before it is acknowledged.
    pub fn open(
        data_dir: &DataDir,
        instance: &str,
        witness: Option<&Path>,
        database: Option<Arc<PgStore>>,
    ) -> anyhow::Result<Self> {
        let origin = format!("twinguard/{instance}/audit");
        let key_path = data_dir.root().join("secrets/audit-key");
        let signer = match std::fs::read_to_string(&key_path) {
            Ok(text) => NoteSigner::from_key(&text).map_err(|e| anyhow::anyhow!("{e}"))?,
            Err(_) => {
                let (signer, text) =
                    NoteSigner::generate(&origin).map_err(|e| anyhow::anyhow!("{e}"))?;
                write_private(&key_path, text.as_bytes())?;
                signer
            }
        };
        let hmac_path = data_dir.root().join("secrets/audit-hmac-key");
        let hmac_key = match std::fs::read_to_string(&hmac_path) {
            Ok(text) => STANDARD
                .decode(text.trim())
                .context("reading the audit HMAC key")?,
            Err(_) => {
                let mut raw = vec![0u8; 32];
                rand::RngCore::fill_bytes(&mut rand::rng(), &mut raw);
                write_private(&hmac_path, STANDARD.encode(&raw).as_bytes())?;
                raw
            }
        };
        let mirror = match database {
            Some(store) => {
                let node = node_name(&signer.verifier_key());
                store
                    .audit_register(&node, &signer.verifier_key())
                    .map_err(|e| anyhow::anyhow!("{e}"))
                    .context("registering this node's audit log in PostgreSQL")?;
                tracing::info!(node = %node, "this node's audit log is kept in PostgreSQL too");
                Some(Arc::new(DatabaseMirror { store, node }) as Arc<dyn Mirror>)
            }
            None => None,
        };
        let log = AuditLog::open_mirrored(
            &data_dir.root().join("audit"),
            signer,
            Options {
                origin,
                checkpoint_every: Duration::from_secs(1),
                witness: witness.map(Path::to_owned),
            },
            mirror,
        )
        .context("opening the audit log")?;
        let audit = Self {
            log,
            hmac: Arc::new(hmac::Key::new(hmac::HMAC_SHA256, &hmac_key)),
            disk_free: Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX)),
        };
        audit.measure_disk();
        Ok(audit)
    }

    pub fn log(&self) -> &AuditLog {
        &self.log
    }

    pub fn healthy(&self) -> bool {
        self.log.healthy()
    }

    /// How long the log's writer has been at its current step (see [`AuditLog::busy_for`]).
    pub fn busy_for(&self) -> Option<Duration> {
        self.log.busy_for()
    }

    /// Looks at the free space of the log's file system again (a `statvfs`); the server does
    /// this every few seconds.
    pub fn measure_disk(&self) {
        match rustix::fs::statvfs(self.log.dir()) {
            Ok(stat) => {
                let free = stat.f_bavail.saturating_mul(stat.f_frsize);
                self.disk_free
                    .store(free, std::sync::atomic::Ordering::Relaxed);
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the audit log's free disk space"),
        }
    }

    /// Bytes free for the log at the last look.
    pub fn disk_free(&self) -> u64 {
        self.disk_free.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the log has room to go on: at least [`DISK_RESERVE_BYTES`] free.
    pub fn disk_ok(&self) -> bool {
        self.disk_free() >= DISK_RESERVE_BYTES
    }

    /// Entries recorded but not yet covered by a signed checkpoint (the audit lag).
    pub fn unsigned_entries(&self) -> u64 {
        let signed = self
            .log
            .latest_checkpoint()
            .and_then(|note| note.lines().nth(1).and_then(|l| l.parse::<u64>().ok()))
            .unwrap_or(0);
        self.log.head().size.saturating_sub(signed)
    }

    /// A keyed digest of a sensitive value: equal values give equal digests, nothing else.
    pub fn digest(&self, value: &str) -> String {
        let tag = hmac::sign(&self.hmac, value.as_bytes());
        format!("hmac:{}", URL_SAFE_NO_PAD.encode(&tag.as_ref()[..16]))
    }
}

/// One request's entry, serialized without building a JSON tree (it is on every request's path).
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct RequestEntry<'a> {
    kind: &'static str,
    time: &'a str,
    correlation_id: Option<&'a str>,
    address: Option<&'a str>,
    method: &'a str,
    path: &'a str,
    status: u16,
    outcome: &'static str,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

/// What a state-changing request is about to do, recorded before it runs.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct IntentEntry<'a> {
    kind: &'static str,
    time: &'a str,
    correlation_id: Option<&'a str>,
    address: Option<&'a str>,
    method: &'a str,
    path: &'a str,
}

/// `value` whole if it is at most [`MAX_VALUE_BYTES`] long; otherwise its first bytes (on a
/// character boundary), an ellipsis, its length and the SHA-256 of the whole.
pub fn bounded(value: &str) -> std::borrow::Cow<'_, str> {
    if value.len() <= MAX_VALUE_BYTES {
        return std::borrow::Cow::Borrowed(value);
    }
    let mut cut = MAX_VALUE_BYTES - 96;
    while !value.is_char_boundary(cut) {
        cut -= 1;
    }
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, value.as_bytes());
    let hex = hex::encode(&digest.as_ref()[..16]);
    std::borrow::Cow::Owned(format!(
        "{}\u{2026}[{} bytes, sha256:{hex}]",
        &value[..cut],
        value.len()
    ))
}

/// Every text value of a handler's note, bounded.
fn bounded_values(extra: Map<String, Value>) -> Map<String, Value> {
    extra
        .into_iter()
        .map(|(k, v)| match v {
            Value::String(s) if s.len() > MAX_VALUE_BYTES => {
                let b = bounded(&s).into_owned();
                (k, Value::String(b))
            }
            other => (k, other),
        })
        .collect()
}

/// Whether a request may change state, so its intent must be on the record before it runs.
fn may_change(method: &axum::http::Method) -> bool {
    !matches!(
        *method,
        axum::http::Method::GET | axum::http::Method::HEAD | axum::http::Method::OPTIONS
    )
}

fn outcome(status: StatusCode) -> &'static str {
    match status.as_u16() {
        200..=399 => "ok",
        401 => "unauthenticated",
        403 => "denied",
        429 => "throttled",
        500..=599 => "error",
        _ => "refused",
    }
}

/// How long a request waits for its audit entry to be durable before it is refused (503): a
/// log whose mirror cannot confirm (a database that stopped answering, a synchronous standby
/// that is gone) must not hold requests for ever. The entry may still be recorded later.
pub const AUDIT_WAIT: Duration = twinguard_core::service::WRITE_WAIT;

/// The least time an outcome's entry is given, when the request itself used up
/// [`AUDIT_WAIT`] (a write that waited that long for its commit).
const LAST_ENTRY_WAIT: Duration = Duration::from_secs(2);

/// Appends `entry` to the log, durable by `deadline` (or within [`LAST_ENTRY_WAIT`] if that
/// is sooner than it) or refused.
async fn append_within(
    state: &AppState,
    entry: Vec<u8>,
    deadline: tokio::time::Instant,
) -> Result<(), AuditError> {
    let deadline = deadline.max(tokio::time::Instant::now() + LAST_ENTRY_WAIT);
    match tokio::time::timeout_at(deadline, state.audit.log().append_async(entry)).await {
        Ok(appended) => appended.map(|_| ()),
        Err(_) => Err(AuditError::Unavailable),
    }
}

/// Records every request before its response is sent; refuses the response (503) when the
/// record cannot be made durable.
pub async fn record(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    // Liveness and readiness probes carry no data and run every few seconds; they are not
    // recorded, and readiness must answer exactly when the trail fails.
    if matches!(req.uri().path(), "/healthz" | "/readyz") {
        return next.run(req).await;
    }
    // A log that already failed takes nothing further: the request is refused before it runs.
    if !state.audit.healthy() {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::ServiceUnavailable,
            "the audit trail is unavailable; requests are refused until it is restored",
        )
        .into_response();
    }
    // One budget for the request's entries: a request refused for its intent is refused
    // within it, and one whose write used it up gets its outcome's entry a last short wait.
    let deadline = tokio::time::Instant::now() + AUDIT_WAIT;
    let note = AuditNote::default();
    req.extensions_mut().insert(note.clone());
    let changes = may_change(req.method());
    let method = req.method().to_string();
    let path = bounded(req.uri().path()).into_owned();
    let address = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_string());
    let correlation = req
        .extensions()
        .get::<crate::http::CorrelationId>()
        .map(|c| c.0.clone());
    if changes {
        // Write-ahead: what cannot be recorded is not done.
        let time = twinguard_core::clock::rfc3339(time::OffsetDateTime::now_utc());
        let intent = IntentEntry {
            kind: "intent",
            time: &time,
            correlation_id: correlation.as_deref(),
            address: address.as_deref(),
            method: &method,
            path: &path,
        };
        let recorded = match serde_json::to_vec(&intent) {
            Ok(bytes) => append_within(&state, bytes, deadline).await,
            Err(e) => Err(AuditError::from(std::io::Error::other(e))),
        };
        if let Err(e) = recorded {
            tracing::error!(error = %e, "a request's intent could not be recorded in the audit log; refused, not applied");
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::ServiceUnavailable,
                "the request could not be recorded; it was not applied",
            )
            .into_response();
        }
    }
    let response = next.run(req).await;
    let status = response.status();
    if response
        .extensions()
        .get::<crate::error::ScopeHidden>()
        .is_some()
    {
        note.set("scope", "hidden");
    }
    let time = twinguard_core::clock::rfc3339(time::OffsetDateTime::now_utc());
    let extra = note
        .0
        .lock()
        .map(|mut m| bounded_values(std::mem::take(&mut *m)))
        .unwrap_or_default();
    let entry = RequestEntry {
        kind: "request",
        time: &time,
        correlation_id: correlation.as_deref(),
        address: address.as_deref(),
        method: &method,
        path: &path,
        status: status.as_u16(),
        outcome: outcome(status),
        extra,
    };
    // The entry holds strings, numbers and the note's JSON values only: it always serializes.
    let bytes = match serde_json::to_vec(&entry) {
        Ok(bytes) => bytes,
        Err(e) => {
            tracing::error!(error = %e, "an audit entry did not serialize; refused");
            return ApiError::internal("an audit entry did not serialize").into_response();
        }
    };
    match append_within(&state, bytes, deadline).await {
        Ok(()) => response,
        Err(e) => {
            tracing::error!(error = %e, "a request's outcome could not be recorded in the audit log; refused");
            let message = if changes {
                // Its intent is on the record; the change may have been made.
                "the outcome could not be recorded; the request may have been applied, check before retrying"
            } else {
                "the request could not be recorded; nothing was acknowledged"
            };
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::ServiceUnavailable,
                message,
            )
            .into_response()
        }
    }
}
