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
