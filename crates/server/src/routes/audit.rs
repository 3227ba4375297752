//! `/audit/...`: the trail's checkpoints, entries and proofs, for callers holding
//! `twinguard/audit/read` (Auditor, Security Admin). Hashes are base64, as in checkpoints.

use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;
use serde_json::{Value, json};
use twinguard_core::auth::Action;

use crate::app::AppState;
use crate::error::{ApiError, ApiResult};
use crate::http::{Caller, Path, Query};

fn b64(hashes: &[[u8; 32]]) -> Vec<String> {
    hashes.iter().map(|h| STANDARD.encode(h)).collect()
}

/// The latest signed checkpoint, as a C2SP signed note.
pub async fn checkpoint(
    State(state): State<AppState>,
    Caller(caller): Caller,
) -> ApiResult<Response> {
    caller.authorize_instance(Action::AuditRead)?;
    let note = state
        .audit
        .log()
        .latest_checkpoint()
        .ok_or_else(|| ApiError::unavailable("no checkpoint has been signed yet"))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        )],
        note,
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
pub struct SizeParam {
    size: Option<u64>,
}

/// Entry `index` as recorded, with its inclusion proof in the tree of `size` entries (default:
/// the current size).
pub async fn entry(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(index): Path<u64>,
    Query(params): Query<SizeParam>,
) -> ApiResult<Response> {
    caller.authorize_instance(Action::AuditRead)?;
    let log = state.audit.log().clone();
    let size = params.size.unwrap_or_else(|| log.head().size);
    let result = tokio::task::spawn_blocking(move || -> Result<Value, String> {
        let entry = log.entry(index).map_err(|e| e.to_string())?;
        let proof = log
            .inclusion_proof(index, size)
            .map_err(|e| e.to_string())?;
        let root = log.root_at(size).map_err(|e| e.to_string())?;
        let parsed: Value = serde_json::from_slice(&entry).unwrap_or(Value::Null);
        Ok(json!({
            "index": index,
            "entry": parsed,
            "leaf": STANDARD.encode(&entry),
            "treeSize": size,
            "root": STANDARD.encode(root),
            "inclusionProof": b64(&proof),
        }))
    })
    .await
    .map_err(|_| ApiError::internal("an audit task failed"))?
    .map_err(|e| ApiError::invalid_argument(format!("no such entry or tree size: {e}")))?;
    Ok(axum::Json(result).into_response())
}

#[derive(Debug, Deserialize)]
pub struct ConsistencyParams {
    old: u64,
    new: Option<u64>,
}

/// The consistency proof from the tree of `old` entries to the tree of `new` (default: now).
pub async fn consistency(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Query(params): Query<ConsistencyParams>,
) -> ApiResult<Response> {
    caller.authorize_instance(Action::AuditRead)?;
    let log = state.audit.log().clone();
    let new = params.new.unwrap_or_else(|| log.head().size);
    let old = params.old;
    let result = tokio::task::spawn_blocking(move || -> Result<Value, String> {
        if old == 0 {
            return Err("every log extends the empty one; ask from a size of at least 1".into());
        }
        let proof = log.consistency_proof(old, new).map_err(|e| e.to_string())?;
        Ok(json!({
            "old": old,
            "new": new,
            "oldRoot": STANDARD.encode(log.root_at(old).map_err(|e| e.to_string())?),
            "newRoot": STANDARD.encode(log.root_at(new).map_err(|e| e.to_string())?),
            "consistencyProof": b64(&proof),
        }))
    })
    .await
    .map_err(|_| ApiError::internal("an audit task failed"))?
    .map_err(ApiError::invalid_argument)?;
    Ok(axum::Json(result).into_response())
}
