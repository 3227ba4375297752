//! `POST /oauth2/token`: the OAuth 2.0 client-credentials grant (RFC 6749 section 4.4), with the
//! client authenticated by form parameters or HTTP Basic (section 2.3.1).

use axum::body::Bytes;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::json;
use zeroize::Zeroizing;

use crate::app::AppState;
use crate::tokens::{TOKEN_LIFETIME_SECS, TokenError};

struct TokenForm {
    grant_type: Option<String>,
    client_id: Option<String>,
    client_secret: Option<Zeroizing<String>>,
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
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Ok(form) = parse_form(&body) else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request");
    };
    if form.grant_type.as_deref() != Some("client_credentials") {
        let error = if form.grant_type.is_none() {
            "invalid_request"
        } else {
            "unsupported_grant_type"
        };
        return oauth_error(StatusCode::BAD_REQUEST, error);
    }
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
    match state
        .tokens
        .issue_from(peer.ip(), &credentials.0, &credentials.1)
    {
        Ok(access_token) => {
            let mut response = axum::Json(json!({
                "access_token": access_token,
                "token_type": "Bearer",
                "expires_in": TOKEN_LIFETIME_SECS,
            }))
            .into_response();
            response
                .headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            response
        }
        Err(TokenError::Throttled(wait)) => {
            tracing::warn!(address = %peer.ip(), "token request refused: backing off after failed attempts");
            let mut response = oauth_error(StatusCode::TOO_MANY_REQUESTS, "slow_down");
            if let Ok(value) = HeaderValue::from_str(&wait.seconds().to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
            response
        }
        Err(TokenError::InvalidClient) => {
            tracing::warn!(address = %peer.ip(), client_id = %credentials.0.chars().take(64).collect::<String>(), "token request with invalid client credentials");
            oauth_error(StatusCode::UNAUTHORIZED, "invalid_client")
        }
        Err(e) => {
            tracing::error!(error = %e, "token issuance failed");
            oauth_error(StatusCode::INTERNAL_SERVER_ERROR, "server_error")
        }
    }
}

fn parse_form(body: &[u8]) -> Result<TokenForm, ()> {
    let mut form = TokenForm {
        grant_type: None,
        client_id: None,
        client_secret: None,
        scope: None,
    };
    for (key, value) in form_urlencoded::parse(body) {
        let value = value.into_owned();
        let slot_taken = match key.as_ref() {
            "grant_type" => form.grant_type.replace(value).is_some(),
            "client_id" => form.client_id.replace(value).is_some(),
            "client_secret" => form.client_secret.replace(Zeroizing::new(value)).is_some(),
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
