//! Anonymous probes: `/healthz` (the process runs) and `/readyz` (the store accepts writes).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde_json::json;

use crate::app::AppState;

pub async fn healthz() -> impl IntoResponse {
    axum::Json(json!({"status": "ok"}))
}

pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    if state.service.store_healthy() {
        (
            StatusCode::OK,
            axum::Json(json!({"status": "ready", "store": "ok"})),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "not ready", "store": "failing"})),
        )
    }
}

/// `GET /metrics`: Prometheus text format, for callers holding `twinguard/metrics/read`.
pub async fn metrics(
    crate::http::Caller(caller): crate::http::Caller,
) -> crate::error::ApiResult<axum::response::Response> {
    use axum::response::IntoResponse;
    caller.authorize_instance(twinguard_core::auth::Action::MetricsRead)?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        crate::metrics::render(),
    )
        .into_response())
}
