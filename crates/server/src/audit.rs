//! The audit trail at the HTTP edge: every request is recorded (who, what, where from, the
//! answer, the correlation ID) and durable in the Merkle log before its response leaves; if it
//! cannot be recorded, the client gets 503 instead and readiness fails (fail closed). Handlers
//! add security detail (the authentication method, an attempted account) through
//! [`AuditNote`]; sensitive values are HMAC'd with the deployment's key, so equal values can be
//! correlated without being revealed.

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
use twinguard_audit::log::{AuditLog, Options};
use twinguard_audit::note::NoteSigner;
use twinguard_proto::ErrorCode;

use crate::app::AppState;
use crate::datadir::{DataDir, write_private};
use crate::error::ApiError;

/// The audit log and the deployment's HMAC key for sensitive values.
#[derive(Clone)]
pub struct Audit {
    log: AuditLog,
    hmac: Arc<hmac::Key>,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit").finish_non_exhaustive()
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
    pub fn open(
        data_dir: &DataDir,
        instance: &str,
        witness: Option<&Path>,
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
        let log = AuditLog::open(
            &data_dir.root().join("audit"),
            signer,
            Options {
                origin,
                checkpoint_every: Duration::from_secs(1),
                witness: witness.map(Path::to_owned),
            },
        )
        .context("opening the audit log")?;
        Ok(Self {
            log,
            hmac: Arc::new(hmac::Key::new(hmac::HMAC_SHA256, &hmac_key)),
        })
    }

    pub fn log(&self) -> &AuditLog {
        &self.log
    }

    pub fn healthy(&self) -> bool {
        self.log.healthy()
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
    let note = AuditNote::default();
    req.extensions_mut().insert(note.clone());
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let address = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_string());
    let correlation = req
        .extensions()
        .get::<crate::http::CorrelationId>()
        .map(|c| c.0.clone());
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
        .map(|mut m| std::mem::take(&mut *m))
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
    let bytes = serde_json::to_vec(&entry).unwrap_or_default();
    match state.audit.log().append_async(bytes).await {
        Ok(_) => response,
        Err(e) => {
            tracing::error!(error = %e, "a request could not be recorded in the audit log; refused");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::ServiceUnavailable,
                "the request could not be recorded; nothing was acknowledged",
            )
            .into_response()
        }
    }
}
