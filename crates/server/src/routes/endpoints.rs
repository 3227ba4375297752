//! `/admin/endpoints`: where event routes deliver (Security Admins), their dead letters, the
//! public event key, and ADT's telemetry publishing (`POST /digitaltwins/{id}/telemetry`).

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use twinguard_core::auth::Action;
use twinguard_core::graph::WriteOp;
use twinguard_core::graph::ops::TelemetryMessage;
use twinguard_proto::ErrorCode;

use crate::app::AppState;
use crate::audit::AuditNote;
use crate::error::{ApiError, ApiResult};
use crate::events::{Endpoint, EndpointSpec, EventsError};
use crate::http::{Caller, JsonBody, ListParams, Path, Query};

impl From<EventsError> for ApiError {
    fn from(e: EventsError) -> Self {
        match e {
            EventsError::Invalid(message) => ApiError::invalid_argument(message),
            EventsError::TooMany => ApiError::invalid_argument(e.to_string()),
            EventsError::NotFound(_) | EventsError::DeadLetterNotFound(..) => {
                ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, e.to_string())
            }
            EventsError::Undeliverable(detail) => {
                let mut answer = ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    ErrorCode::ServiceUnavailable,
                    "the destination did not accept the event",
                );
                answer.detail = Some(detail);
                answer
            }
            EventsError::Store(e) => {
                tracing::error!(error = %e, "endpoint store failure");
                ApiError::unavailable("the endpoint could not be stored; retry")
            }
        }
    }
}

fn endpoint_json(state: &AppState, endpoint: &Endpoint) -> Value {
    let mut body = serde_json::to_value(&endpoint.spec).unwrap_or(Value::Null);
    let (position, head) = state.events.progress(&endpoint.name);
    body["name"] = endpoint.name.clone().into();
    body["deliveredThrough"] = position.into();
    body["lag"] = head.saturating_sub(position).into();
    body
}

pub async fn put(
    State(state): State<AppState>,
    Caller(caller): Caller,
    note: Option<axum::Extension<AuditNote>>,
    Path(name): Path<String>,
    JsonBody(spec): JsonBody<EndpointSpec>,
) -> ApiResult<Response> {
    caller.authorize(Action::EndpointsWrite)?;
    let note = note.map(|n| n.0).unwrap_or_default();
    note.set("event", "endpoint_put");
    note.set("endpoint", name.clone());
    note.set("endpointType", spec.kind.clone());
    let (endpoint, created) = state.events.put(&name, spec).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(endpoint_json(&state, &endpoint))).into_response())
}

pub async fn get(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(name): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    caller.authorize(Action::EndpointsRead)?;
    let endpoint = state.events.get(&name)?;
    Ok(axum::Json(endpoint_json(&state, &endpoint)))
}

pub async fn list(
    State(state): State<AppState>,
    Caller(caller): Caller,
    uri: Uri,
    headers: HeaderMap,
    Query(params): Query<ListParams>,
) -> ApiResult<Response> {
    caller.authorize(Action::EndpointsRead)?;
    let items: Vec<Value> = state
        .events
        .list()
        .iter()
        .map(|e| endpoint_json(&state, e))
        .collect();
    super::identity::page(&state, &items, &params, &uri, &headers)
}

pub async fn delete(
    State(state): State<AppState>,
    Caller(caller): Caller,
    note: Option<axum::Extension<AuditNote>>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    caller.authorize(Action::EndpointsWrite)?;
    let note = note.map(|n| n.0).unwrap_or_default();
    note.set("event", "endpoint_delete");
    note.set("endpoint", name.clone());
    state.events.delete(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn dead_letters(
    State(state): State<AppState>,
    Caller(caller): Caller,
    uri: Uri,
    headers: HeaderMap,
    Path(name): Path<String>,
    Query(params): Query<ListParams>,
) -> ApiResult<Response> {
    caller.authorize(Action::EndpointsRead)?;
    let items = state.events.dead_letters(&name)?;
    super::identity::page(&state, &items, &params, &uri, &headers)
}

pub async fn dead_letter(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path((name, seq)): Path<(String, u64)>,
) -> ApiResult<axum::Json<Value>> {
    caller.authorize(Action::EndpointsRead)?;
    Ok(axum::Json(state.events.dead_letter(&name, seq).await?))
}

pub async fn replay_dead_letter(
    State(state): State<AppState>,
    Caller(caller): Caller,
    note: Option<axum::Extension<AuditNote>>,
    Path((name, seq)): Path<(String, u64)>,
) -> ApiResult<StatusCode> {
    caller.authorize(Action::EndpointsWrite)?;
    let note = note.map(|n| n.0).unwrap_or_default();
    note.set("event", "dead_letter_replay");
    note.set("endpoint", name.clone());
    note.set("sequence", seq);
    state.events.replay(&name, seq).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn discard_dead_letter(
    State(state): State<AppState>,
    Caller(caller): Caller,
    note: Option<axum::Extension<AuditNote>>,
    Path((name, seq)): Path<(String, u64)>,
) -> ApiResult<StatusCode> {
    caller.authorize(Action::EndpointsWrite)?;
    let note = note.map(|n| n.0).unwrap_or_default();
    note.set("event", "dead_letter_discard");
    note.set("endpoint", name.clone());
    note.set("sequence", seq);
    state.events.discard(&name, seq).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The public half of the event key, as a JWKS: what consumers verify signatures with.
pub async fn event_keys(State(state): State<AppState>) -> axum::Json<Value> {
    axum::Json(state.events.key().jwks())
}

/// ADT's `POST /digitaltwins/{id}/telemetry`: the body becomes a `microsoft.iot.telemetry`
/// event. `Message-Id` is required; a repeat within an hour is acknowledged and not sent again.
pub async fn publish(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<Value>,
) -> ApiResult<StatusCode> {
    publish_telemetry(state, caller, id, None, &headers, body).await
}

/// ADT's `POST /digitaltwins/{id}/components/{path}/telemetry`.
pub async fn publish_component(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path((id, component)): Path<(String, String)>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<Value>,
) -> ApiResult<StatusCode> {
    publish_telemetry(state, caller, id, Some(component), &headers, body).await
}

async fn publish_telemetry(
    state: AppState,
    caller: std::sync::Arc<twinguard_core::auth::Principal>,
    twin: String,
    component: Option<String>,
    headers: &HeaderMap,
    body: Value,
) -> ApiResult<StatusCode> {
    let header = |name: &str| {
        headers
            .get(name)
            .map(|v| {
                v.to_str()
                    .map(str::to_owned)
                    .map_err(|_| ApiError::invalid_argument(format!("{name} is not text")))
            })
            .transpose()
    };
    let message_id = header("Message-Id")?
        .ok_or_else(|| ApiError::invalid_argument("Message-Id is required"))?;
    let source_time = header("Telemetry-Source-Time")?;
    if let Some(time) = &source_time
        && time::OffsetDateTime::parse(time, &time::format_description::well_known::Rfc3339)
            .is_err()
    {
        return Err(ApiError::invalid_argument(
            "Telemetry-Source-Time must be an RFC 3339 time",
        ));
    }
    let message = TelemetryMessage {
        twin,
        component,
        message_id,
        source_time,
        body,
    };
    state
        .service
        .write(&caller, WriteOp::PublishTelemetry(message))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
