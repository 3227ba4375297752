//! `/models`: upload, list, get, decommission and delete DTDL models.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use twinguard_core::dtmi::Dtmi;
use twinguard_core::graph::{ModelEntry, WriteOp};

use crate::app::AppState;
use crate::error::{ApiError, ApiResult};
use crate::http::{Caller, JsonBody, Path, Query, list_page};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListParams {
    #[serde(default)]
    include_model_definition: bool,
    continuation_token: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GetParams {
    #[serde(default)]
    include_model_definition: bool,
}

/// ADT's `DigitalTwinsModelData`.
fn model_data(entry: &ModelEntry, include_definition: bool) -> Value {
    let language_map = |key: &str| match entry.definition.get(key) {
        Some(Value::String(s)) => json!({"en": s}),
        Some(Value::Object(m)) => Value::Object(m.clone()),
        _ => Value::Object(Map::new()),
    };
    let mut data = json!({
        "id": entry.id,
        "displayName": language_map("displayName"),
        "description": language_map("description"),
        "uploadTime": entry.upload_time,
        "decommissioned": entry.decommissioned,
    });
    if include_definition && let Value::Object(m) = &mut data {
        m.insert("model".into(), entry.definition.clone());
    }
    data
}

pub async fn list(
    State(state): State<AppState>,
    Caller(caller): Caller,
    uri: Uri,
    headers: HeaderMap,
    Query(params): Query<ListParams>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> ApiResult<Response> {
    let dependencies_for: Vec<String> = pairs
        .into_iter()
        .filter(|(k, _)| k == "dependenciesFor")
        .map(|(_, v)| v)
        .collect();
    let models = state.service.models(&caller, &dependencies_for)?;
    let token = params.continuation_token.as_deref();
    let render = |m: &Arc<ModelEntry>| model_data(m, params.include_model_definition);
    list_page(&models, render, token, &state.public_url, &uri, &headers)
}

pub async fn upload(
    State(state): State<AppState>,
    Caller(caller): Caller,
    JsonBody(models): JsonBody<Vec<Value>>,
) -> ApiResult<Response> {
    let entries = state
        .service
        .write(&caller, WriteOp::UploadModels(models))
        .await?
        .into_models()?;
    let body: Vec<Value> = entries.iter().map(|e| model_data(e, true)).collect();
    Ok((StatusCode::CREATED, axum::Json(body)).into_response())
}

pub async fn get(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    Query(params): Query<GetParams>,
) -> ApiResult<Response> {
    let entry: Arc<ModelEntry> = state.service.model(&caller, &id)?;
    Ok(axum::Json(model_data(&entry, params.include_model_definition)).into_response())
}

/// `PATCH /models/{id}` with `[{"op": "replace", "path": "/decommissioned", "value": true}]`, the
/// only change ADT allows on a model.
pub async fn patch(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    JsonBody(patch): JsonBody<Vec<Value>>,
) -> ApiResult<StatusCode> {
    let dtmi = Dtmi::parse(&id).map_err(|e| ApiError::invalid_argument(e.to_string()))?;
    let [op] = patch.as_slice() else {
        return Err(ApiError::invalid_argument(
            "the patch must hold exactly one operation on /decommissioned",
        ));
    };
    let decommissioned = match (
        op.get("op").and_then(Value::as_str),
        op.get("path").and_then(Value::as_str),
        op.get("value"),
    ) {
        (Some("replace" | "add"), Some("/decommissioned"), Some(Value::Bool(b))) => *b,
        _ => {
            return Err(ApiError::invalid_argument(
                "only replacing /decommissioned with a boolean is supported",
            ));
        }
    };
    state
        .service
        .write(
            &caller,
            WriteOp::SetModelDecommissioned {
                id: dtmi,
                decommissioned,
            },
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn delete(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let dtmi = Dtmi::parse(&id).map_err(|e| ApiError::invalid_argument(e.to_string()))?;
    state
        .service
        .write(&caller, WriteOp::DeleteModel(dtmi))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
