//! `POST /oauth2/token` and `POST /oauth2/revoke`.
//!
//! Grants: client credentials (RFC 6749 4.4, the client authenticated by form parameters or HTTP
//! Basic, 2.3.1); a person's password (4.3) with the TOTP or recovery code in the extension
//! parameter `otp`, answered with a short-lived access token and a rotating refresh token; and
//! refresh tokens (6). Every failure of a person's login answers `invalid_grant` alike, whatever
//! was wrong. Revocation follows RFC 7009.

use axum::body::Bytes;
use std::net::SocketAddr;

use axum::Extension;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::json;
use twinguard_core::store::StoreError;
use zeroize::Zeroizing;

use crate::app::AppState;
use crate::audit::AuditNote;
use crate::routes::{self, NoAnswer};
use crate::tls::PeerCertificate;
use crate::tokens::{Issued, TokenError};

#[derive(Default)]
struct TokenForm {
    grant_type: Option<String>,
    client_id: Option<String>,
    client_secret: Option<Zeroizing<String>>,
    username: Option<String>,
    password: Option<Zeroizing<String>>,
    otp: Option<Zeroizing<String>>,
    refresh_token: Option<Zeroizing<String>>,
    token: Option<Zeroizing<String>>,
    client_assertion_type: Option<String>,
    client_assertion: Option<String>,
    #[allow(dead_code)] // accepted as ADT clients send it; every token carries both audiences
    scope: Option<String>,
}

fn oauth_error(status: StatusCode, error: &str) -> Response {
    let mut response = (status, axum::Json(json!({"error": error}))).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"twinguard\""),
        );
    }
    response
}

/// Client ID and secret from `Authorization: Basic` (form-urlencoded, per RFC 6749 2.3.1).
fn basic_credentials(headers: &HeaderMap) -> Option<(String, Zeroizing<String>)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    // The scheme name is case-insensitive (RFC 9110 11.1).
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = Zeroizing::new(String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?);
    let (id, secret) = decoded.split_once(':')?;
    Some((
        form_urlencoded_decode(id)?,
        Zeroizing::new(form_urlencoded_decode(secret)?),
    ))
}

fn form_urlencoded_decode(s: &str) -> Option<String> {
    form_urlencoded::parse(format!("v={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
}

pub async fn token(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    certificate: Option<Extension<PeerCertificate>>,
    note: Option<Extension<AuditNote>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Ok(form) = parse_form(&body) else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request");
    };
    let address = peer.ip();
    // The audit entry names the grant, the outcome and, only when a token was issued, the
    // identity it was issued to. Nothing derived from the account a failed or throttled attempt
    // named is recorded: a keyed digest of it would let whoever reads the trail confirm
    // guessed account names (or passwords typed into the user-name field) by comparison, and
    // throttled attempts cost the guesser nothing.
    let note = note.map(|Extension(n)| n).unwrap_or_default();
    note.set("event", "token");
    note.set("grant", grant_name(form.grant_type.as_deref()));
    let issued = match form.grant_type.as_deref() {
        Some("client_credentials") if form.client_assertion.is_some() => {
            // RFC 7523 2.2: private_key_jwt; no other client authentication may be combined.
            let jwt_bearer = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
            if form.client_assertion_type.as_deref() != Some(jwt_bearer)
                || form.client_secret.is_some()
                || basic_credentials(&headers).is_some()
            {
                return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client");
            }
            let assertion = form.client_assertion.unwrap_or_default();
            let (tokens, client_id) = (state.tokens.clone(), form.client_id);
            // Recording the assertion's jti is a durable commit: off the async threads.
            off_the_runtime(move || {
                tokens.issue_for_assertion(address, client_id.as_deref(), &assertion)
            })
            .await
        }
        Some("client_credentials")
            if form.client_secret.is_none() && basic_credentials(&headers).is_none() =>
        {
            // No secret: the client authenticates with the certificate it presented in the
            // TLS handshake (workload identity), or not at all.
            let cert = certificate.and_then(|Extension(PeerCertificate(c))| c);
            match (form.client_id, cert) {
                (Some(id), Some(cert)) => state.tokens.issue_for_certificate(address, &id, &cert),
                _ => return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client"),
            }
        }
        Some("client_credentials") => {
            let credentials = match (
                basic_credentials(&headers),
                form.client_id,
                form.client_secret,
            ) {
                (Some(basic), None, None) => basic,
                (None, Some(id), Some(secret)) => (id, secret),
                // Two authentication methods at once, or none, is refused (RFC 6749 2.3).
                _ => return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client"),
            };
            state
                .tokens
                .issue_for_client(address, &credentials.0, &credentials.1)
        }
        Some("password") => {
            let (Some(username), Some(password)) = (form.username, form.password) else {
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_request");
            };
            let tokens = state.tokens.clone();
            let otp = form.otp;
            // argon2 takes tens of milliseconds of CPU: keep it off the async threads.
            off_the_runtime(move || {
                tokens.issue_for_user(
                    address,
                    &username,
                    &password,
                    otp.as_deref().map(|s| s.as_str()),
                )
            })
            .await
        }
        Some("refresh_token") => {
            let Some(refresh) = form.refresh_token else {
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_request");
            };
            // Spending the token is a durable commit: off the async threads.
            let tokens = state.tokens.clone();
            off_the_runtime(move || tokens.refresh(address, &refresh)).await
        }
        Some(_) => return oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type"),
        None => return oauth_error(StatusCode::BAD_REQUEST, "invalid_request"),
    };
    note.set(
        "authResult",
        match &issued {
            Ok(_) => "issued",
            Err(TokenError::Throttled(_)) => "throttled",
            Err(TokenError::InvalidClient | TokenError::InvalidGrant) => "failed",
            Err(_) => "error",
        },
    );
    match issued {
        Ok(issued) => {
            note.set("principal", issued.subject.clone());
            token_response(issued)
        }
        Err(TokenError::Throttled(wait)) => {
            tracing::warn!(%address, "token request refused: backing off after failed attempts");
            crate::metrics::auth_throttled();
            let mut response = oauth_error(StatusCode::TOO_MANY_REQUESTS, "slow_down");
            if let Ok(value) = HeaderValue::from_str(&wait.seconds().to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
            response
        }
        Err(e) => refusal(e),
    }
}

/// The answer to a token request that failed for a reason other than throttling.
fn refusal(error: TokenError) -> Response {
    match error {
        TokenError::InvalidClient => oauth_error(StatusCode::UNAUTHORIZED, "invalid_client"),
        TokenError::InvalidGrant => oauth_error(StatusCode::BAD_REQUEST, "invalid_grant"),
        // A store that cannot commit now (a full writer queue, a database away) is transient:
        // the client may try again (RFC 6749 5.2 has the code for it).
        TokenError::Unavailable | TokenError::Store(_) => {
            if let TokenError::Store(e) = &error {
                tracing::warn!(error = %e, "token issuance could not be recorded");
            }
            oauth_error(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable")
        }
        e => {
            tracing::error!(error = %e, "token issuance failed");
            oauth_error(StatusCode::INTERNAL_SERVER_ERROR, "server_error")
        }
    }
}

/// The grant type as recorded: one of the names the endpoint knows, never the client's text.
fn grant_name(grant: Option<&str>) -> &'static str {
    match grant {
        Some("client_credentials") => "client_credentials",
        Some("password") => "password",
        Some("refresh_token") => "refresh_token",
        Some(_) => "unsupported",
        None => "missing",
    }
}

fn token_response(issued: Issued) -> Response {
    let mut body = json!({
        "access_token": issued.access_token,
        "token_type": "Bearer",
        "expires_in": issued.expires_in,
    });
    if let Some(refresh) = &issued.refresh_token {
        body["refresh_token"] = json!(refresh.as_str());
    }
    let mut response = axum::Json(body).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// RFC 7009: `token` (and an optional `token_type_hint`, not needed: the two kinds of token
/// cannot be confused). Answers 200 whether or not the token was valid.
pub async fn revoke(State(state): State<AppState>, body: Bytes) -> Response {
    let Ok(form) = parse_form(&body) else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request");
    };
    let Some(token) = form.token else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request");
    };
    let tokens = state.tokens.clone();
    match off_the_runtime(move || tokens.revoke(&token)).await {
        Ok(()) => {
            let mut response = StatusCode::OK.into_response();
            response
                .headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            response
        }
        Err(e) => {
            tracing::error!(error = %e, "revocation failed");
            oauth_error(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable")
        }
    }
}

fn parse_form(body: &[u8]) -> Result<TokenForm, ()> {
    let mut form = TokenForm::default();
    for (key, value) in form_urlencoded::parse(body) {
        let value = value.into_owned();
        let secret = |v: String| Zeroizing::new(v);
        let slot_taken = match key.as_ref() {
            "grant_type" => form.grant_type.replace(value).is_some(),
            "client_id" => form.client_id.replace(value).is_some(),
            "client_secret" => form.client_secret.replace(secret(value)).is_some(),
            "username" => form.username.replace(value).is_some(),
            "password" => form.password.replace(secret(value)).is_some(),
            "otp" => form.otp.replace(secret(value)).is_some(),
            "refresh_token" => form.refresh_token.replace(secret(value)).is_some(),
            "token" => form.token.replace(secret(value)).is_some(),
            "client_assertion_type" => form.client_assertion_type.replace(value).is_some(),
            "client_assertion" => form.client_assertion.replace(value).is_some(),
            "scope" => form.scope.replace(value).is_some(),
            _ => false,
        };
        // RFC 6749 3.2: parameters must not be repeated.
        if slot_taken {
            return Err(());
        }
    }
    Ok(form)
}

/// Runs `call` off the runtime ([`routes::off_the_runtime`]): for grants that hash a password
/// or wait for a durable commit, and for revocations. After its wait, 503
/// `temporarily_unavailable`, while the call runs on (what it commits holds).
async fn off_the_runtime<T: Send + 'static>(
    call: impl FnOnce() -> Result<T, TokenError> + Send + 'static,
) -> Result<T, TokenError> {
    match routes::off_the_runtime(call).await {
        Ok(answer) => answer,
        Err(NoAnswer::Failed) => Err(TokenError::Signing),
        Err(NoAnswer::Late) => Err(TokenError::Store(StoreError(
            "the store did not confirm the write in time; it may still be applied".into(),
        ))),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_store_failure_is_temporarily_unavailable_not_a_server_error() {
        let response = refusal(TokenError::Store(twinguard_core::store::StoreError(
            "the writer's queue is full".into(),
        )));
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"], "temporarily_unavailable");
        // What is not transient stays a server error.
        assert_eq!(
            refusal(TokenError::Signing).status(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
}
