//! `/digitaltwins/{id}` and its components.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};
use twinguard_core::graph::WriteOp;

use crate::app::AppState;
use crate::error::ApiResult;
use crate::http::{Caller, JsonBody, Path, etag_header, if_match, if_none_match};

pub async fn get(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let twin = state.service.twin(&caller, &id)?;
    Ok((etag_header(&twin.etag), axum::Json(twin.json())).into_response())
}

pub async fn put(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<Map<String, Value>>,
) -> ApiResult<Response> {
    let precondition = if_none_match(&headers)?;
    let twin = state
        .service
        .write(
            &caller,
            WriteOp::PutTwin {
                id,
                body,
                precondition,
            },
        )
        .await?
        .into_twin()?;
    Ok((etag_header(&twin.etag), axum::Json(twin.json())).into_response())
}

async fn patch_twin(
    state: AppState,
    caller: Caller,
    id: String,
    component: Option<String>,
    headers: &HeaderMap,
    patch: Value,
) -> ApiResult<Response> {
    let precondition = if_match(headers)?;
    let twin = state
        .service
        .write(
            &caller.0,
            WriteOp::PatchTwin {
                id,
                component,
                patch,
                precondition,
            },
        )
        .await?
        .into_twin()?;
    Ok((StatusCode::NO_CONTENT, etag_header(&twin.etag)).into_response())
}

pub async fn patch(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(patch): JsonBody<Value>,
) -> ApiResult<Response> {
    patch_twin(state, caller, id, None, &headers, patch).await
}

pub async fn delete(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<StatusCode> {
    let precondition = if_match(&headers)?;
    state
        .service
        .write(&caller, WriteOp::DeleteTwin { id, precondition })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn get_component(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path((id, component)): Path<(String, String)>,
) -> ApiResult<Response> {
    let (value, etag) = state.service.component(&caller, &id, &component)?;
    Ok((etag_header(&etag), axum::Json(value)).into_response())
}

pub async fn patch_component(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, component)): Path<(String, String)>,
    headers: HeaderMap,
    JsonBody(patch): JsonBody<Value>,
) -> ApiResult<Response> {
    patch_twin(state, caller, id, Some(component), &headers, patch).await
}
