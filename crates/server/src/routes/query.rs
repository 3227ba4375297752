//! `POST /query`: one page of an ADT query, with the `query-charge` header.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
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

/// The response body; items go out as the executor serialized them.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct QueryAnswer<'a> {
    // In this order, as before: the body used to be a sorted JSON map.
    continuation_token: &'a Option<String>,
    value: &'a [Box<RawValue>],
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
    // The permit moves into the blocking task: a client that hangs up does not free its slot
    // while its query still runs. The domain adds a cap per principal and a deadline.
    let permit = state
        .query_slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError {
            retry_after: Some(1),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::TooManyRequests,
                "too many queries are running; retry shortly",
            )
        })?;
    let service = state.service.clone();
    let page = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        service.query(&caller, &request)
    })
    .await
    .map_err(|e| ApiError::internal(format!("query task failed: {e}")))??;
    let body = serde_json::to_vec(&QueryAnswer {
        value: &page.items,
        continuation_token: &page.continuation,
    })
    .map_err(|e| ApiError::internal(format!("query answer not serialized: {e}")))?;
    let mut response = (
        [(
            axum::http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response();
    if let Ok(charge) = HeaderValue::from_str(&page.charge.to_string()) {
        response.headers_mut().insert("query-charge", charge);
    }
    Ok(response)
}
