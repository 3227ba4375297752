//! `/digitaltwins/{id}/relationships` and `/incomingrelationships`.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use twinguard_core::graph::WriteOp;

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
    let items: Vec<&RawValue> = rels.iter().map(|r| r.json()).collect();
    list_page(&items, params.continuation_token.as_deref(), &uri, &headers)
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
    let items: Vec<Value> = rels
        .iter()
        .map(|r| {
            json!({
                "$relationshipId": r.id,
                "$sourceId": r.source,
                "$relationshipName": r.name,
                "$relationshipLink": format!("{}/relationships/{}", r.source, r.id),
            })
        })
        .collect();
    list_page(&items, params.continuation_token.as_deref(), &uri, &headers)
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
