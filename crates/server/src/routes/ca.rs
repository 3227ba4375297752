//! The instance's CA and its rotation (`crate::ca`): `GET /admin/ca` shows the ring, and
//! `POST /admin/ca/add`, `/rotate` and `/retire` step it, each with `twinguard/keys/write` at
//! instance scope (step-up for people). Every step is stored before it is answered, and taken
//! by every node without a restart.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use twinguard_core::auth::Action;
use twinguard_core::error::DomainError;

use crate::app::AppState;
use crate::ca::{CaRing, Refused, Step};
use crate::error::{ApiError, ApiResult};
use crate::http::{Caller, Query};
use crate::routes::{NoAnswer, off_the_runtime};

/// The ring: each authority's fingerprint, state (`retiring`, `issuing` or `next`), validity
/// and certificate, and the trust bundle.
pub async fn show(State(state): State<AppState>, Caller(caller): Caller) -> ApiResult<Response> {
    caller.authorize_instance(Action::KeysWrite)?;
    Ok(axum::Json(state.ca.ring().view()).into_response())
}

/// A new authority, trusted at once, issuing nothing yet.
pub async fn add(State(state): State<AppState>, Caller(caller): Caller) -> ApiResult<Response> {
    caller.authorize_instance(Action::KeysWrite)?;
    step(&state, |ring| ring.add()).await
}

/// The newest authority issues from now on.
pub async fn rotate(State(state): State<AppState>, Caller(caller): Caller) -> ApiResult<Response> {
    caller.authorize_instance(Action::KeysWrite)?;
    step(&state, |ring| Ok(ring.rotate())).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetireParams {
    /// Retire even while live client certificates of the retiring authorities are recorded.
    #[serde(default)]
    force: bool,
}

/// The authorities older than the issuing one leave the ring. Refused while live client
/// certificates they issued are recorded (those would fail their next handshake), unless
/// `force=true`.
pub async fn retire(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Query(params): Query<RetireParams>,
) -> ApiResult<Response> {
    caller.authorize_instance(Action::KeysWrite)?;
    let directory = state.tokens.directory().clone();
    let force = params.force;
    step(&state, move |ring| {
        if !force {
            let mut keep = vec![ring.issuing().fingerprint().to_owned()];
            keep.extend(ring.after_issuing());
            let keep: Vec<&str> = keep.iter().map(String::as_str).collect();
            let live = directory.live_certificates_outside(&keep);
            if live > 0 {
                return Ok(Err(Refused::LiveCertificates(live)));
            }
        }
        Ok(ring.retire())
    })
    .await
}

async fn step(
    state: &AppState,
    step: impl Fn(&mut CaRing) -> anyhow::Result<Result<(), Refused>> + Send + 'static,
) -> ApiResult<Response> {
    let ca = state.ca.clone();
    match off_the_runtime(move || ca.change(step)).await {
        Ok(Ok(Step::Done(ring))) => Ok(axum::Json(ring.view()).into_response()),
        Ok(Ok(Step::Refused(refused))) => {
            Err(ApiError::from(DomainError::Conflict(refused.to_string())))
        }
        Ok(Err(e)) => Err(ApiError::internal(format!("changing the CA ring: {e:#}"))),
        Err(NoAnswer::Failed) => Err(ApiError::internal("a CA task failed")),
        Err(NoAnswer::Late) => Err(ApiError::from(DomainError::Unconfirmed)),
    }
}
