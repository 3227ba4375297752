//! The telemetry plane's HTTP surface: signed message ingestion on the device listener, and on
//! the API listener the device registry, firmware allowlists, validation policies, sensor groups,
//! quarantine review, history and degradation status. Decisions are the telemetry service's.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::Deserialize;
use serde_json::{Value, json};
use twinguard_proto::ErrorCode;
use twinguard_telemetry::fusion::SensorGroup;
use twinguard_telemetry::manage::{
    Decision, HistoryQuery, NewDevice, NewKey, Registered, StatusChange,
};
use twinguard_telemetry::policy::Policy;
use twinguard_telemetry::records::Review;
use twinguard_telemetry::registry::{Binding, FirmwareList};
use twinguard_telemetry::{Transport, Verdict};

use crate::app::AppState;
use crate::error::{ApiError, ApiResult};
use crate::http::{Caller, JsonBody, ListParams, Path, Query, key_position, keyed_list_page};

use super::identity::page;

/// Most messages in one batch request.
pub const MAX_BATCH: usize = 1_000;

// ---- device plane ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Batch {
    /// JWS compact strings, or base64 (standard alphabet) of COSE_Sign1 bytes.
    messages: Vec<String>,
}

/// `POST /telemetry`: one message as `application/cose` (COSE_Sign1 bytes) or
/// `application/jose` (JWS compact), or a batch as `application/json`
/// `{"messages": [...]}`. The signature is the credential: no token is needed or accepted in
/// its place.
pub async fn ingest(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let telemetry = &state.telemetry;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    let batch = match content_type.as_str() {
        "application/cose" | "application/jose" => false,
        "application/json" => true,
        _ => {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                ErrorCode::BadRequest,
                "send application/cose, application/jose, or a JSON batch",
            ));
        }
    };
    if !batch {
        let outcomes = telemetry
            .ingest(vec![body.to_vec()], Transport::Https)
            .await?;
        let Some(outcome) = outcomes.into_iter().next() else {
            return Err(ApiError::internal("the pipeline gave no answer"));
        };
        let status = match outcome.status {
            Verdict::Accepted => StatusCode::OK,
            Verdict::Quarantined => StatusCode::ACCEPTED,
            Verdict::Rejected => StatusCode::BAD_REQUEST,
        };
        return Ok((status, axum::Json(outcome)).into_response());
    }
    let Batch { messages } = serde_json::from_slice(&body)
        .map_err(|_| ApiError::bad_request("the batch must be {\"messages\": [string, ...]}"))?;
    if messages.is_empty() || messages.len() > MAX_BATCH {
        return Err(ApiError::bad_request(format!(
            "a batch holds 1 to {MAX_BATCH} messages"
        )));
    }
    let raw: Vec<Vec<u8>> = messages
        .into_iter()
        .map(|m| {
            if m.contains('.') {
                m.into_bytes()
            } else {
                // Undecodable base64 becomes bytes the decoder refuses as malformed.
                base64::engine::general_purpose::STANDARD
                    .decode(m.as_bytes())
                    .unwrap_or_default()
            }
        })
        .collect();
    let outcomes = telemetry.ingest(raw, Transport::Https).await?;
    Ok(axum::Json(json!({ "results": outcomes })).into_response())
}

// ---- devices ----

pub async fn list_devices(
    State(state): State<AppState>,
    Caller(caller): Caller,
    uri: Uri,
    headers: HeaderMap,
    Query(params): Query<ListParams>,
) -> ApiResult<Response> {
    let all = state.telemetry.devices(&caller)?;
    page(&state, &all, &params, &uri, &headers)
}

pub async fn get_device(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    Ok(axum::Json(state.telemetry.device(&caller, &id)?).into_response())
}

/// 201 with the device; with `"generate": true` also its private key (PKCS#8 PEM), shown this
/// once and kept nowhere.
pub async fn register_device(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    JsonBody(new): JsonBody<NewDevice>,
) -> ApiResult<Response> {
    let registered = state.telemetry.register_device(&caller, &id, new).await?;
    Ok((StatusCode::CREATED, with_private_key(registered)).into_response())
}

pub async fn rotate_device_key(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    JsonBody(new): JsonBody<NewKey>,
) -> ApiResult<Response> {
    let rotated = state.telemetry.rotate_device_key(&caller, &id, new).await?;
    Ok(with_private_key(rotated).into_response())
}

pub async fn retire_previous_key(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let device = state.telemetry.retire_previous_key(&caller, &id).await?;
    Ok(axum::Json(device).into_response())
}

/// `{"device": ..., "privateKey": ...}`, the private key only when it was made here.
fn with_private_key(registered: Registered) -> axum::Json<Value> {
    let mut body = json!({ "device": registered.device });
    if let Some(key) = &registered.private_key {
        body["privateKey"] = Value::String(key.as_str().to_owned());
    }
    axum::Json(body)
}

pub async fn set_bindings(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    JsonBody(bindings): JsonBody<Vec<Binding>>,
) -> ApiResult<Response> {
    let device = state.telemetry.set_bindings(&caller, &id, bindings).await?;
    Ok(axum::Json(device).into_response())
}

pub async fn change_status(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path((id, action)): Path<(String, String)>,
) -> ApiResult<Response> {
    let change = match action.as_str() {
        "suspend" => StatusChange::Suspend,
        "resume" => StatusChange::Resume,
        "revoke" => StatusChange::Revoke,
        _ => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                ErrorCode::BadRequest,
                "no such route",
            ));
        }
    };
    let device = state.telemetry.set_status(&caller, &id, change).await?;
    Ok(axum::Json(device).into_response())
}

// ---- firmware, policies, sensor groups ----

pub async fn list_firmware(
    State(state): State<AppState>,
    Caller(caller): Caller,
    uri: Uri,
    headers: HeaderMap,
    Query(params): Query<ListParams>,
) -> ApiResult<Response> {
    let all = state.telemetry.firmware(&caller)?;
    page(&state, &all, &params, &uri, &headers)
}

pub async fn put_firmware(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(model): Path<String>,
    JsonBody(firmware): JsonBody<FirmwareList>,
) -> ApiResult<Response> {
    let list = state
        .telemetry
        .put_firmware(&caller, &model, firmware)
        .await?;
    Ok(axum::Json(list).into_response())
}

pub async fn list_policies(
    State(state): State<AppState>,
    Caller(caller): Caller,
    uri: Uri,
    headers: HeaderMap,
    Query(params): Query<ListParams>,
) -> ApiResult<Response> {
    let all = state.telemetry.policies(&caller)?;
    page(&state, &all, &params, &uri, &headers)
}

pub async fn put_policy(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    JsonBody(policy): JsonBody<Policy>,
) -> ApiResult<Response> {
    let policy = state.telemetry.put_policy(&caller, &id, policy).await?;
    Ok(axum::Json(policy).into_response())
}

pub async fn delete_policy(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    state.telemetry.delete_policy(&caller, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn list_groups(
    State(state): State<AppState>,
    Caller(caller): Caller,
    uri: Uri,
    headers: HeaderMap,
    Query(params): Query<ListParams>,
) -> ApiResult<Response> {
    let all = state.telemetry.groups(&caller)?;
    page(&state, &all, &params, &uri, &headers)
}

pub async fn put_group(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    JsonBody(group): JsonBody<SensorGroup>,
) -> ApiResult<Response> {
    let group = state.telemetry.put_group(&caller, &id, group).await?;
    Ok(axum::Json(group).into_response())
}

pub async fn delete_group(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    state.telemetry.delete_group(&caller, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- quarantine ----

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QuarantineQuery {
    status: Option<Review>,
    /// Start after this record (the first page of a legacy client; the next link carries a
    /// continuation token instead).
    after: Option<String>,
    /// Records in the page when no `max-items-per-page` is sent (legacy).
    limit: Option<usize>,
    continuation_token: Option<String>,
}

/// Quarantined readings with one status, oldest first, paged by key: a reviewed record leaves
/// the pending list, so the next page starts after the last record sent, not at an offset.
pub async fn list_quarantine(
    State(state): State<AppState>,
    Caller(caller): Caller,
    uri: Uri,
    headers: HeaderMap,
    Query(q): Query<QuarantineQuery>,
) -> ApiResult<Response> {
    let (token_after, size) = key_position(q.continuation_token.as_deref(), &headers, q.limit)?;
    let after = token_after.or(q.after);
    // One more than the page, to know whether another follows.
    let page = state
        .telemetry
        .quarantine_page(&caller, q.status, after.as_deref(), size + 1)?;
    keyed_list_page(
        &page.items,
        |r| r.id.as_str(),
        page.resume_after.as_deref(),
        size,
        &state.public_url,
        &uri,
        &["after", "limit"],
    )
}

pub async fn get_quarantined(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    Ok(axum::Json(state.telemetry.quarantined(&caller, &id)?).into_response())
}

pub async fn review(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path((id, decision)): Path<(String, String)>,
) -> ApiResult<Response> {
    let decision = match decision.as_str() {
        "release" => Decision::Release,
        "discard" => Decision::Discard,
        _ => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                ErrorCode::BadRequest,
                "no such route",
            ));
        }
    };
    let record = state.telemetry.review(&caller, &id, decision).await?;
    Ok(axum::Json(record).into_response())
}

// ---- history and status ----

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryParams {
    /// RFC 3339; default one hour before `to`.
    from: Option<String>,
    /// RFC 3339; default now.
    to: Option<String>,
    /// Bucket width in seconds for downsampling.
    interval: Option<f64>,
    limit: Option<usize>,
    /// Where the page continues (from the page before's `nextLink`).
    continuation_token: Option<String>,
}

fn parse_time(text: &str, name: &str) -> Result<i64, ApiError> {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
        .map_err(|_| ApiError::invalid_argument(format!("{name} must be an RFC 3339 date-time")))
}

pub async fn history(
    State(state): State<AppState>,
    Caller(caller): Caller,
    uri: Uri,
    Path((twin, name)): Path<(String, String)>,
    Query(p): Query<HistoryParams>,
) -> ApiResult<Response> {
    let now_ms = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
    let to_ms = match &p.to {
        Some(t) => parse_time(t, "to")?,
        None => now_ms + 1,
    };
    let from_ms = match &p.from {
        Some(t) => parse_time(t, "from")?,
        None => to_ms - 3_600_000,
    };
    let interval_ms = match p.interval {
        Some(s) if s.is_finite() && s > 0.0 => Some((s * 1000.0).round().max(1.0) as i64),
        Some(_) => {
            return Err(ApiError::invalid_argument(
                "interval must be positive seconds",
            ));
        }
        None => None,
    };
    let query = HistoryQuery {
        from_ms,
        to_ms,
        interval_ms,
        limit: p.limit.unwrap_or(1_000),
    };
    let cursor = match p.continuation_token.as_deref() {
        None => None,
        Some(token) => Some(
            twinguard_telemetry::Telemetry::history_cursor(token, &twin, &name, &query)
                .ok_or_else(|| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        ErrorCode::BadRequest,
                        "the continuation token is not valid",
                    )
                })?,
        ),
    };
    // A history read first merges the log (it may wait for a merge already running).
    let telemetry = state.telemetry.clone();
    let page = tokio::task::spawn_blocking(move || {
        telemetry.history_page(&caller, &twin, &name, query, cursor)
    })
    .await
    .map_err(|e| ApiError::internal(format!("history task failed: {e}")))??;
    // The next link names the window exactly (`to` defaults to now, which moves) and the token.
    let next_link = page.next.map(|cursor| {
        let mut link = format!(
            "{}{}?from={}&to={}&limit={}",
            state.public_url.as_str(),
            uri.path(),
            rfc3339_ms(query.from_ms),
            rfc3339_ms(query.to_ms),
            query.limit,
        );
        if let Some(interval) = query.interval_ms {
            link.push_str(&format!("&interval={}", interval as f64 / 1000.0));
        }
        link.push_str(&format!("&continuationToken={}", cursor.token()));
        link
    });
    #[derive(serde::Serialize)]
    struct Page<'a> {
        #[serde(flatten)]
        history: &'a twinguard_telemetry::manage::History,
        #[serde(rename = "nextLink")]
        next_link: Option<String>,
    }
    Ok(axum::Json(Page {
        history: &page.history,
        next_link,
    })
    .into_response())
}

/// RFC 3339 with milliseconds, UTC, as the history's times are written.
fn rfc3339_ms(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// Properties whose quality is not good, for operators and for command approval.
pub async fn status(State(state): State<AppState>, Caller(caller): Caller) -> ApiResult<Response> {
    caller.authorize(twinguard_core::auth::Action::TwinsRead)?;
    let degraded: Vec<Value> = state
        .telemetry
        .degraded()?
        .into_iter()
        .filter(|(twin, _, _)| state.service.twin(&caller, twin).is_ok())
        .map(|(twin, property, quality)| {
            json!({ "twin": twin, "property": property, "quality": quality })
        })
        .collect();
    Ok(axum::Json(json!({ "degraded": degraded })).into_response())
}
