//! `/digitaltwins/{id}/relationships` and `/incomingrelationships`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use twinguard_core::graph::{Relationship, WriteOp};

use crate::app::AppState;
use crate::error::ApiResult;
use crate::http::{Caller, JsonBody, Path, Query, etag_header, if_match, if_none_match, list_page};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListParams {
    relationship_name: Option<String>,
    continuation_token: Option<String>,
}

pub async fn list(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    Query(params): Query<ListParams>,
) -> ApiResult<Response> {
    let rels = state
        .service
        .outgoing(&caller, &id, params.relationship_name.as_deref())?;
    let token = params.continuation_token.as_deref();
    list_page(
        &rels,
        |r| r.json().to_owned(),
        token,
        &state.public_url,
        &uri,
        &headers,
    )
}

pub async fn incoming(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    Query(params): Query<ListParams>,
) -> ApiResult<Response> {
    let rels = state.service.incoming(&caller, &id)?;
    let render = |r: &Arc<Relationship>| {
        json!({
            "$relationshipId": r.id,
            "$sourceId": r.source,
            "$relationshipName": r.name,
            "$relationshipLink": format!(
                "/digitaltwins/{}/relationships/{}",
                encode_segment(&r.source),
                encode_segment(&r.id)
            ),
        })
    };
    list_page(
        &rels,
        render,
        params.continuation_token.as_deref(),
        &state.public_url,
        &uri,
        &headers,
    )
}

pub async fn get(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path((id, rel)): Path<(String, String)>,
) -> ApiResult<Response> {
    let rel = state.service.relationship(&caller, &id, &rel)?;
    Ok((etag_header(&rel.etag), axum::Json(rel.json())).into_response())
}

pub async fn put(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path((source, id)): Path<(String, String)>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<Map<String, Value>>,
) -> ApiResult<Response> {
    let precondition = if_none_match(&headers)?;
    let rel = state
        .service
        .write(
            &caller,
            WriteOp::PutRelationship {
                source,
                id,
                body,
                precondition,
            },
        )
        .await?
        .into_relationship()?;
    Ok((etag_header(&rel.etag), axum::Json(rel.json())).into_response())
}

pub async fn patch(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path((source, id)): Path<(String, String)>,
    headers: HeaderMap,
    JsonBody(patch): JsonBody<Value>,
) -> ApiResult<Response> {
    let precondition = if_match(&headers)?;
    let rel = state
        .service
        .write(
            &caller,
            WriteOp::PatchRelationship {
                source,
                id,
                patch,
                precondition,
            },
        )
        .await?
        .into_relationship()?;
    Ok((StatusCode::NO_CONTENT, etag_header(&rel.etag)).into_response())
}

pub async fn delete(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path((source, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<StatusCode> {
    let precondition = if_match(&headers)?;
    state
        .service
        .write(
            &caller,
            WriteOp::DeleteRelationship {
                source,
                id,
                precondition,
            },
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Percent-encodes a path segment (RFC 3986 unreserved characters stay as they are).
fn encode_segment(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::encode_segment;

    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(encode_segment("room 1/ä"), "room%201%2F%C3%A4");
        assert_eq!(encode_segment("a-b_c.d~e"), "a-b_c.d~e");
    }
}
