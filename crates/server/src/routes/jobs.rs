//! `/jobs/imports` and `/jobs/deletions`: ADT's bulk jobs (`docs/jobs.md`). The work is in
//! [`crate::jobs`]; these handlers only extract and answer.

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::Value;

use crate::app::AppState;
use crate::audit::AuditNote;
use crate::error::{ApiError, ApiResult};
use crate::http::{Caller, ListParams, Path, Query, list_page};
use crate::jobs::{Jobs, Kind, MAX_IMPORT_BYTES};

/// The job routes, to merge into the ADT data plane (which checks `api-version`).
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/jobs/imports", get(list_imports))
        .route(
            "/jobs/imports/{id}",
            get(get_import).put(create_import).delete(delete_import),
        )
        .route("/jobs/imports/{id}/cancel", post(cancel_import))
        .route("/jobs/imports/{id}/output", get(import_output))
        .route("/jobs/deletions", get(list_deletions).post(add_deletion))
        .route(
            "/jobs/deletions/{id}",
            get(get_deletion).put(create_deletion),
        )
}

fn note(req_note: Option<&AuditNote>, id: &str) {
    if let Some(n) = req_note {
        n.set("job", id.to_owned());
    }
}

fn base(state: &AppState) -> String {
    state.public_url.as_str().trim_end_matches('/').to_owned()
}

/// ADT's import job body. Its `outputBlobUri` (and any other field) is ignored: the output log
/// is read at `/jobs/imports/{id}/output`.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct ImportBody {
    input_blob_uri: String,
}

/// `PUT /jobs/imports/{id}` with the import file as the body (`application/x-ndjson`), or with
/// ADT's JSON body naming an `inputBlobUri` that the egress allowlist admits (see
/// `docs/jobs.md`).
pub async fn create_import(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    request: Request,
) -> ApiResult<Response> {
    note(request.extensions().get::<AuditNote>(), &id);
    let content_type = request
        .headers()
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
    match content_type.as_str() {
        "application/x-ndjson" | "application/jsonl" | "application/x-jsonlines" => {}
        "application/json" => {
            // Authorization first: an unauthorized caller learns nothing about the body.
            Jobs::authorize_import(&caller)?;
            let bytes = axum::body::to_bytes(request.into_body(), crate::app::ADMIN_BODY_LIMIT)
                .await
                .map_err(|_| ApiError::bad_request("the request body could not be read"))?;
            let body: ImportBody = serde_json::from_slice(&bytes).map_err(|e| {
                ApiError::bad_request(format!(
                    "the request body is not valid JSON for this operation: {e}"
                ))
            })?;
            let job = state.jobs.start_import_from_url(
                state.service.clone(),
                caller,
                &id,
                &body.input_blob_uri,
                &base(&state),
            )?;
            return Ok((StatusCode::CREATED, axum::Json(job)).into_response());
        }
        _ => {
            Jobs::authorize_import(&caller)?;
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                twinguard_proto::ErrorCode::BadRequest,
                "the import file is sent with Content-Type application/x-ndjson",
            ));
        }
    }
    let spooled = state
        .jobs
        .spool_upload(&caller, &id, request.into_body(), MAX_IMPORT_BYTES)
        .await?;
    let job =
        state
            .jobs
            .start_import(state.service.clone(), caller, &id, spooled, &base(&state))?;
    Ok((StatusCode::CREATED, axum::Json(job)).into_response())
}

fn authorize_read(caller: &twinguard_core::auth::Principal) -> ApiResult<()> {
    caller.authorize_instance(twinguard_core::auth::Action::JobsRead)?;
    Ok(())
}

pub async fn get_import(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    authorize_read(&caller)?;
    Ok(axum::Json(state.jobs.get(Kind::Import, &id, &base(&state))?).into_response())
}

async fn list(
    state: &AppState,
    caller: &twinguard_core::auth::Principal,
    kind: Kind,
    uri: &Uri,
    headers: &HeaderMap,
    params: &ListParams,
) -> ApiResult<Response> {
    authorize_read(caller)?;
    let jobs = state.jobs.list(kind, &base(state))?;
    list_page(
        &jobs,
        |j: &Value| j.clone(),
        params.continuation_token.as_deref(),
        &state.public_url,
        uri,
        headers,
    )
}

pub async fn list_imports(
    State(state): State<AppState>,
    Caller(caller): Caller,
    uri: Uri,
    headers: HeaderMap,
    Query(params): Query<ListParams>,
) -> ApiResult<Response> {
    list(&state, &caller, Kind::Import, &uri, &headers, &params).await
}

pub async fn cancel_import(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    request: Request,
) -> ApiResult<Response> {
    note(request.extensions().get::<AuditNote>(), &id);
    caller.authorize_instance(twinguard_core::auth::Action::JobsWrite)?;
    Ok(axum::Json(state.jobs.cancel(Kind::Import, &id, &base(&state))?).into_response())
}

pub async fn delete_import(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    request: Request,
) -> ApiResult<StatusCode> {
    note(request.extensions().get::<AuditNote>(), &id);
    caller.authorize_instance(twinguard_core::auth::Action::JobsDelete)?;
    state.jobs.delete(Kind::Import, &id)?;
    Ok(StatusCode::NO_CONTENT)
}

/// The import's output log: one JSON object a line, as ADT writes its output blob.
pub async fn import_output(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    authorize_read(&caller)?;
    let text = state.jobs.output(Kind::Import, &id)?;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-ndjson"),
        )],
        text,
    )
        .into_response())
}

/// `PUT /jobs/deletions/{id}`: a deletion job with the ID the caller chose.
pub async fn create_deletion(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    request: Request,
) -> ApiResult<Response> {
    note(request.extensions().get::<AuditNote>(), &id);
    let job = state
        .jobs
        .start_deletion(state.service.clone(), caller, &id, &base(&state))?;
    Ok((StatusCode::CREATED, axum::Json(job)).into_response())
}

/// `POST /jobs/deletions` as ADT: the ID from the `operation-id` header or a new one; 202 with
/// an `Operation-Location` to poll.
pub async fn add_deletion(
    State(state): State<AppState>,
    Caller(caller): Caller,
    request: Request,
) -> ApiResult<Response> {
    let id = match request.headers().get("operation-id") {
        Some(v) => v
            .to_str()
            .map(str::to_owned)
            .map_err(|_| ApiError::invalid_argument("operation-id is not a valid job ID"))?,
        None => uuid::Uuid::new_v4().to_string(),
    };
    note(request.extensions().get::<AuditNote>(), &id);
    let job = state
        .jobs
        .start_deletion(state.service.clone(), caller, &id, &base(&state))?;
    let location = format!(
        "{}/jobs/deletions/{id}?api-version={}",
        base(&state),
        twinguard_proto::API_VERSIONS
            .last()
            .copied()
            .unwrap_or("2023-10-31")
    );
    let mut response = (StatusCode::ACCEPTED, axum::Json(job)).into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        response.headers_mut().insert("operation-location", v);
    }
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("operation-id", v);
    }
    Ok(response)
}

pub async fn get_deletion(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    authorize_read(&caller)?;
    Ok(axum::Json(state.jobs.get(Kind::Deletion, &id, &base(&state))?).into_response())
}

pub async fn list_deletions(
    State(state): State<AppState>,
    Caller(caller): Caller,
    uri: Uri,
    headers: HeaderMap,
    Query(params): Query<ListParams>,
) -> ApiResult<Response> {
    list(&state, &caller, Kind::Deletion, &uri, &headers, &params).await
}
