//! `POST /query`: one page of an ADT query, with the `query-charge` header.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use twinguard_core::service::QueryRequest;

use crate::app::AppState;
use crate::error::ApiResult;
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
    let page = state.service.query(&caller, &request)?;
    let mut response =
        axum::Json(json!({"value": page.items, "continuationToken": page.continuation}))
            .into_response();
    if let Ok(charge) = HeaderValue::from_str(&page.charge.to_string()) {
        response.headers_mut().insert("query-charge", charge);
    }
    Ok(response)
}
