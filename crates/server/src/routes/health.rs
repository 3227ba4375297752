//! Anonymous probes: `/healthz` (the process runs) and `/readyz` (the store accepts writes and
//! answers the probe every two seconds, no commit of the store or of the audit trail is held,
//! the audit trail records, and its disk has room).
//!
//! Anyone may ask whether a node is ready, since balancers ask without credentials; only a
//! caller holding `twinguard/metrics/read` learns why. For it, `/readyz` says which part
//! fails (the store unreachable, lagging or held, the audit trail failing or held, its disk
//! low) and carries an `mqtt` detail when a broker is configured: connected or not, and any
//! evidence that another client took twinguard's session (informational: the HTTP API stays
//! ready). An anonymous caller, or one without that permission, gets the status alone: the
//! state of the database, the audit disk and the broker tells an attacker when and where to
//! push.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde_json::json;

use crate::app::AppState;

pub async fn healthz() -> impl IntoResponse {
    axum::Json(json!({"status": "ok"}))
}

/// A commit waiting this long (the twin writer's, or any step of the audit trail's writer: a
/// group, a checkpoint, the mirror's catching up) is held, not slow: the database waits for a
/// synchronous standby that is gone, or a disk or a link hangs. Every request waits for the
/// audit trail, and every write for the store, so a node whose commits are held answers
/// nothing in time (each request gets its 503 after 10 s): not ready.
pub const HELD_COMMIT: Duration = Duration::from_secs(5);

pub async fn readyz(
    State(state): State<AppState>,
    caller: Option<crate::http::Caller>,
) -> impl IntoResponse {
    let lagging = state
        .service
        .lag()
        .is_some_and(|lag| lag > crate::http::MAX_READ_LAG);
    let held = |waiting: Option<Duration>| waiting.is_some_and(|w| w >= HELD_COMMIT);
    let store_held = held(state.service.commit_waiting());
    let audit_held = held(state.audit.busy_for());
    let store = state.service.store_healthy() && !lagging && !store_held;
    let audit = state.audit.healthy() && !audit_held;
    // Not ready before the audit log's disk fills: appends would fail closed then.
    let disk = state.audit.disk_ok();
    let word = |ok: bool, held: bool| match (ok, held) {
        (true, _) => "ok",
        (false, true) => "held",
        (false, false) => "failing",
    };
    let store_word = if !state.service.store_reachable() {
        "unreachable"
    } else {
        word(store, store_held)
    };
    let ready = store && audit && disk;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let summary = if ready { "ready" } else { "not ready" };
    let told = caller.is_some_and(|crate::http::Caller(c)| {
        c.authorize_instance(twinguard_core::auth::Action::MetricsRead)
            .is_ok()
    });
    if !told {
        return (status, axum::Json(json!({ "status": summary })));
    }
    let mut body = json!({
        "status": summary,
        "store": store_word,
        "audit": word(audit, audit_held),
        "auditDisk": if disk { "ok" } else { "low" },
    });
    if state.service.position().is_some() {
        body["feed"] = json!(if lagging { "lagging" } else { "ok" });
    }
    if let Some(mqtt) = &state.mqtt {
        body["mqtt"] = mqtt.detail();
    }
    (status, axum::Json(body))
}

/// `GET /metrics`: Prometheus text format, for callers holding `twinguard/metrics/read`.
pub async fn metrics(
    State(state): State<AppState>,
    crate::http::Caller(caller): crate::http::Caller,
) -> crate::error::ApiResult<axum::response::Response> {
    use axum::response::IntoResponse;
    caller.authorize_instance(twinguard_core::auth::Action::MetricsRead)?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        crate::metrics::render(&state.audit),
    )
        .into_response())
}
