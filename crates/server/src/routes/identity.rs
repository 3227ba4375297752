//! twinguard's identity API: `/admin/...` for administrators (identities, roles, role
//! assignments) and `/me/...` for every authenticated caller (who am I, MFA enrolment, password).
//! Access is decided by the directory; these handlers only translate.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;
use serde_json::{Value, json};
use twinguard_core::auth::{Principal, Scope};
use twinguard_core::error::DomainError;
use twinguard_core::identity::apikeys::{CreatedKey, NewApiKey};
use twinguard_core::identity::{Directory, Identity, IdentityPatch, NewIdentity, RoleAssignment};
use zeroize::Zeroizing;

use crate::app::AppState;
use crate::error::{ApiError, ApiResult};
use crate::http::{Caller, JsonBody, ListParams, Path, PeerAddress, Query, serialized_list_page};
use crate::routes::{NoAnswer, off_the_runtime};

/// Runs a directory call that changes it (a commit that waits for the store, perhaps argon2
/// first) off the runtime ([`off_the_runtime`]): after its wait, 503 "may still be applied".
async fn edit<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(&Directory) -> Result<T, DomainError> + Send + 'static,
) -> ApiResult<T> {
    let directory = state.tokens.directory().clone();
    match off_the_runtime(move || f(&directory)).await {
        Ok(answer) => answer.map_err(ApiError::from),
        Err(NoAnswer::Failed) => Err(ApiError::internal("a directory task failed")),
        Err(NoAnswer::Late) => Err(ApiError::from(DomainError::Unconfirmed)),
    }
}

fn to_value<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// One page of an administration list (identity or device plane), cut like the ADT lists
/// (`http::list_page`).
pub(crate) fn page<T: serde::Serialize>(
    state: &AppState,
    items: &[T],
    params: &ListParams,
    uri: &Uri,
    headers: &HeaderMap,
) -> ApiResult<Response> {
    serialized_list_page(
        items,
        params.continuation_token.as_deref(),
        &state.public_url,
        uri,
        headers,
    )
}

// ---- identities ----

pub async fn list_identities(
    State(state): State<AppState>,
    Caller(caller): Caller,
    uri: Uri,
    headers: HeaderMap,
    Query(params): Query<ListParams>,
) -> ApiResult<Response> {
    let all = state.tokens.directory().identities(&caller)?;
    page(&state, &all, &params, &uri, &headers)
}

pub async fn get_identity(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<Identity>> {
    Ok(axum::Json(state.tokens.directory().identity(&caller, &id)?))
}

/// 201 with the identity, and for applications and service accounts the client secret, shown
/// this once.
pub async fn create_identity(
    State(state): State<AppState>,
    Caller(caller): Caller,
    JsonBody(new): JsonBody<NewIdentity>,
) -> ApiResult<Response> {
    let (identity, secret) = edit(&state, move |d| d.create_identity(&caller, new)).await?;
    let mut body = json!({ "identity": identity });
    if let Some(secret) = secret {
        body["clientSecret"] = json!(secret.as_str());
    }
    Ok((StatusCode::CREATED, axum::Json(body)).into_response())
}

pub async fn update_identity(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    JsonBody(patch): JsonBody<IdentityPatch>,
) -> ApiResult<axum::Json<Identity>> {
    Ok(axum::Json(
        edit(&state, move |d| d.update_identity(&caller, &id, patch)).await?,
    ))
}

pub async fn delete_identity(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    edit(&state, move |d| d.delete_identity(&caller, &id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PasswordBody {
    password: Zeroizing<String>,
}

pub async fn set_password(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<PasswordBody>,
) -> ApiResult<StatusCode> {
    edit(&state, move |d| {
        d.set_password(&caller, &id, &body.password)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Issues the one-time code with which a person who holds privileged roles enrols a first
/// authenticator; the administrator hands it over out of band.
pub async fn enrolment_code(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let (code, expires_at) = edit(&state, move |d| d.issue_enrolment_code(&caller, &id)).await?;
    let mut response = (
        StatusCode::CREATED,
        axum::Json(json!({ "enrolmentCode": code.as_str(), "expiresAt": expires_at })),
    )
        .into_response();
    no_store(&mut response);
    Ok(response)
}

pub async fn reset_mfa(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    edit(&state, move |d| d.reset_mfa(&caller, &id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn rotate_secret(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let secret = edit(&state, move |d| d.rotate_client_secret(&caller, &id)).await?;
    Ok(axum::Json(json!({ "clientSecret": secret.as_str() })).into_response())
}

/// Registers the public keys (JWKS) of a workload's `private_key_jwt` assertions.
pub async fn set_client_keys(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    JsonBody(jwks): JsonBody<Value>,
) -> ApiResult<StatusCode> {
    edit(&state, move |d| d.set_client_keys(&caller, &id, jwks)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CsrBody {
    /// A PKCS #10 certificate signing request, PEM.
    csr: String,
}

/// Signs a client certificate for workload `id` with the instance CA and records it.
async fn certify(state: &AppState, caller: &Principal, id: &str, csr: &str) -> ApiResult<Response> {
    // Decide access and the identity's kind before the CA signs anything.
    state.tokens.directory().authorize_certificate(caller, id)?;
    let ring = state.ca.ring();
    let cert = ring
        .issuing()
        .issue_client_cert(id, csr)
        .map_err(|e| ApiError::invalid_argument(e.to_string()))?;
    let issued = twinguard_core::identity::IssuedCertificate {
        serial: cert.serial.clone(),
        not_after: cert.not_after,
        revoked: false,
        issuer: Some(cert.issuer.clone()),
    };
    let (caller, id) = (caller.clone(), id.to_owned());
    edit(state, move |d| d.record_certificate(&caller, &id, issued)).await?;
    // Every authority the instance trusts: a client that trusts the bundle keeps connecting
    // across a rotation of the CA.
    let ca = ring.bundle_pem();
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({
            "certificate": cert.pem,
            "serial": cert.serial,
            "notAfter": cert.not_after,
            "caCertificate": ca,
        })),
    )
        .into_response())
}

/// Issues a client certificate for a workload from its CSR (twinguard/keys/write).
pub async fn issue_certificate(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<CsrBody>,
) -> ApiResult<Response> {
    certify(&state, &caller, &id, &body.csr).await
}

/// A workload renews its own client certificate with a new CSR, with a token its current
/// certificate got it, presenting that certificate in the TLS handshake.
pub async fn renew_certificate(
    State(state): State<AppState>,
    Caller(caller): Caller,
    JsonBody(body): JsonBody<CsrBody>,
) -> ApiResult<Response> {
    let id = caller.subject.clone();
    certify(&state, &caller, &id, &body.csr).await
}

pub async fn revoke_certificate(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path((id, serial)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    edit(&state, move |d| d.revoke_certificate(&caller, &id, &serial)).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- roles ----

pub async fn list_roles(
    State(state): State<AppState>,
    Caller(_): Caller,
    uri: Uri,
    headers: HeaderMap,
    Query(params): Query<ListParams>,
) -> ApiResult<Response> {
    let all = state.tokens.directory().roles()?;
    page(&state, &all, &params, &uri, &headers)
}

pub async fn get_role(
    State(state): State<AppState>,
    Caller(_): Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    Ok(axum::Json(to_value(&state.tokens.directory().role(&id)?)).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RoleBody {
    name: String,
    #[serde(default)]
    description: String,
    actions: Vec<String>,
}

pub async fn create_role(
    State(state): State<AppState>,
    Caller(caller): Caller,
    JsonBody(body): JsonBody<RoleBody>,
) -> ApiResult<Response> {
    let role = edit(&state, move |d| {
        d.create_role(&caller, &body.name, &body.description, &body.actions)
    })
    .await?;
    Ok((StatusCode::CREATED, axum::Json(to_value(&role))).into_response())
}

pub async fn delete_role(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    edit(&state, move |d| d.delete_role(&caller, &id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- role assignments ----

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AssignmentFilter {
    principal_id: Option<String>,
    continuation_token: Option<String>,
}

pub async fn list_assignments(
    State(state): State<AppState>,
    Caller(caller): Caller,
    uri: Uri,
    headers: HeaderMap,
    Query(filter): Query<AssignmentFilter>,
) -> ApiResult<Response> {
    let all = state
        .tokens
        .directory()
        .assignments(&caller, filter.principal_id.as_deref())?;
    let params = ListParams {
        continuation_token: filter.continuation_token,
    };
    page(&state, &all, &params, &uri, &headers)
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AssignmentBody {
    principal_id: String,
    role_id: String,
    #[serde(default = "instance")]
    scope: Scope,
}

fn instance() -> Scope {
    Scope::Instance
}

pub async fn create_assignment(
    State(state): State<AppState>,
    Caller(caller): Caller,
    JsonBody(body): JsonBody<AssignmentBody>,
) -> ApiResult<(StatusCode, axum::Json<RoleAssignment>)> {
    let a = edit(&state, move |d| {
        d.assign(&caller, &body.principal_id, &body.role_id, body.scope)
    })
    .await?;
    Ok((StatusCode::CREATED, axum::Json(a)))
}

pub async fn delete_assignment(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    edit(&state, move |d| d.unassign(&caller, &id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- API keys ----

fn created_key(created: CreatedKey) -> Response {
    let mut response = (
        StatusCode::CREATED,
        axum::Json(json!({"key": created.key, "apiKey": created.secret.as_str()})),
    )
        .into_response();
    no_store(&mut response);
    response
}

pub async fn list_api_keys(
    State(state): State<AppState>,
    Caller(caller): Caller,
    uri: Uri,
    headers: HeaderMap,
    Query(params): Query<ListParams>,
) -> ApiResult<Response> {
    let all = state.tokens.directory().api_keys(&caller)?;
    page(&state, &all, &params, &uri, &headers)
}

/// Keys past their rotation date that still work and have no successor.
pub async fn overdue_api_keys(
    State(state): State<AppState>,
    Caller(caller): Caller,
    uri: Uri,
    headers: HeaderMap,
    Query(params): Query<ListParams>,
) -> ApiResult<Response> {
    let all = state.tokens.directory().overdue_api_keys(&caller)?;
    page(&state, &all, &params, &uri, &headers)
}

/// 201 with the key's description and the key itself, shown this once.
pub async fn create_api_key(
    State(state): State<AppState>,
    Caller(caller): Caller,
    JsonBody(new): JsonBody<NewApiKey>,
) -> ApiResult<Response> {
    Ok(created_key(
        edit(&state, move |d| d.create_api_key(&caller, new)).await?,
    ))
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RotateBody {
    #[serde(default)]
    overlap_seconds: Option<u64>,
}

pub async fn rotate_api_key(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    // The body is optional: empty means the default overlap.
    let overlap = if body.is_empty() {
        None
    } else {
        serde_json::from_slice::<RotateBody>(&body)
            .map_err(|e| ApiError::bad_request(format!("the request body is not valid: {e}")))?
            .overlap_seconds
    };
    Ok(created_key(
        edit(&state, move |d| d.rotate_api_key(&caller, &id, overlap)).await?,
    ))
}

pub async fn revoke_api_key(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let key = edit(&state, move |d| d.revoke_api_key(&caller, &id)).await?;
    Ok(axum::Json(to_value(&key)).into_response())
}

// ---- the caller itself ----

fn grants_json(caller: &Principal) -> Value {
    caller
        .grants()
        .iter()
        .map(|g| json!({"roleId": g.role.as_str(), "actions": g.actions.names(), "scope": g.scope}))
        .collect()
}

pub async fn me(State(state): State<AppState>, Caller(caller): Caller) -> ApiResult<Response> {
    let identity = state
        .tokens
        .directory()
        .identity(&caller, &caller.subject)?;
    Ok(axum::Json(json!({
        "identity": identity,
        "grants": grants_json(&caller),
    }))
    .into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BeginTotp {
    /// The one-time code from an administrator; required of people with privileged roles.
    #[serde(default)]
    enrolment_code: Option<Zeroizing<String>>,
}

/// Starts TOTP enrolment: the secret, the `otpauth://` URI and the QR code (PNG, base64). The
/// body is optional: `{"enrolmentCode": ...}`.
pub async fn begin_totp(
    State(state): State<AppState>,
    Caller(caller): Caller,
    PeerAddress(from): PeerAddress,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    let body: BeginTotp = if body.is_empty() {
        BeginTotp::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("the request body is not valid: {e}")))?
    };
    let enrolment = edit(&state, move |d| {
        let code = body.enrolment_code.as_ref().map(|c| c.as_str());
        d.begin_totp(&caller, from, code, "twinguard")
    })
    .await?;
    let mut response = axum::Json(json!({
        "secret": enrolment.secret.as_str(),
        "otpauthUri": enrolment.uri.as_str(),
        "qrPng": STANDARD.encode(&enrolment.qr_png),
    }))
    .into_response();
    no_store(&mut response);
    Ok(response)
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CodeBody {
    code: Zeroizing<String>,
}

/// Confirms enrolment with a first code; answers the recovery codes, shown this once.
pub async fn confirm_totp(
    State(state): State<AppState>,
    Caller(caller): Caller,
    PeerAddress(from): PeerAddress,
    JsonBody(body): JsonBody<CodeBody>,
) -> ApiResult<Response> {
    let codes = edit(&state, move |d| d.confirm_totp(&caller, from, &body.code)).await?;
    let mut response = axum::Json(json!({ "recoveryCodes": codes })).into_response();
    no_store(&mut response);
    Ok(response)
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ChangePassword {
    current_password: Zeroizing<String>,
    new_password: Zeroizing<String>,
}

pub async fn change_password(
    State(state): State<AppState>,
    Caller(caller): Caller,
    PeerAddress(from): PeerAddress,
    JsonBody(body): JsonBody<ChangePassword>,
) -> ApiResult<StatusCode> {
    edit(&state, move |d| {
        d.change_own_password(&caller, from, &body.current_password, &body.new_password)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

fn no_store(response: &mut Response) {
    response.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-store"),
    );
}
