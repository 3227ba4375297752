//! `POST /query`: one page of an ADT query, with the `query-charge` header.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use twinguard_core::service::QueryRequest;
use twinguard_proto::ErrorCode;

use crate::app::AppState;
use crate::error::{ApiError, ApiResult};
use crate::http::{Caller, JsonBody, page_size};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QueryBody {
    query: Option<String>,
    continuation_token: Option<String>,
}

pub async fn query(
    State(state): State<AppState>,
    Caller(caller): Caller,
    headers: HeaderMap,
    JsonBody(body): JsonBody<QueryBody>,
) -> ApiResult<Response> {
    let request = QueryRequest {
        query: body.query,
        continuation_token: body.continuation_token,
        page_size: page_size(&headers)?,
    };
    // Queries are CPU-bound (up to the work budget each): they run on the blocking pool, a few
    // at a time, so heavy ones cannot starve the async threads that serve tokens and probes.
    let _permit = state.query_slots.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::TooManyRequests,
            "too many queries are running; retry shortly",
        )
    })?;
    let service = state.service.clone();
    let page = tokio::task::spawn_blocking(move || service.query(&caller, &request))
        .await
        .map_err(|e| ApiError::internal(format!("query task failed: {e}")))??;
    let mut response =
        axum::Json(json!({"value": page.items, "continuationToken": page.continuation}))
            .into_response();
    if let Ok(charge) = HeaderValue::from_str(&page.charge.to_string()) {
        response.headers_mut().insert("query-charge", charge);
    }
    Ok(response)
}
