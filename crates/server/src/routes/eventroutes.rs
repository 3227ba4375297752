//! `/eventroutes`: stored and validated now; delivery comes with the event pipeline.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use twinguard_core::graph::{EventRoute, WriteOp};

use crate::app::AppState;
use crate::error::ApiResult;
use crate::http::{Caller, JsonBody, Path, Query, list_page};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteBody {
    #[serde(default)]
    id: Option<String>,
    endpoint_name: String,
    filter: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListParams {
    continuation_token: Option<String>,
}

fn route_json(route: &EventRoute) -> Value {
    json!({"id": route.id, "endpointName": route.endpoint_name, "filter": route.filter})
}

pub async fn list(
    State(state): State<AppState>,
    Caller(caller): Caller,
    uri: Uri,
    headers: HeaderMap,
    Query(params): Query<ListParams>,
) -> ApiResult<Response> {
    let routes = state.service.routes(&caller)?;
    let token = params.continuation_token.as_deref();
    list_page(
        &routes,
        |r| route_json(r),
        token,
        &state.public_url,
        &uri,
        &headers,
    )
}

pub async fn get(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    Ok(axum::Json(route_json(&*state.service.route(&caller, &id)?)).into_response())
}

pub async fn put(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<RouteBody>,
) -> ApiResult<StatusCode> {
    if body.id.as_ref().is_some_and(|given| given != &id) {
        return Err(crate::error::ApiError::invalid_argument(
            "the route ID in the body does not match the path",
        ));
    }
    let op = WriteOp::PutRoute {
        id,
        endpoint_name: body.endpoint_name,
        filter: body.filter,
    };
    state.service.write(&caller, op).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn delete(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    state
        .service
        .write(&caller, WriteOp::DeleteRoute(id))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
