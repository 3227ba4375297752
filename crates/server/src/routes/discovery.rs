//! Anonymous discovery documents: the token signing keys as a JWKS (RFC 7517) and the
//! authorization server metadata (RFC 8414 / OpenID Connect Discovery), so other services can
//! verify twinguard's access tokens without a shared secret.
//!
//! The issuer is the instance's `urn:twinguard:<id>` until a public URL is configured, so the
//! metadata is served for tooling and for verifiers; strict OIDC clients that demand an
//! `https` issuer equal to the discovery location need that setting (identity issue).

use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::app::AppState;

fn cacheable(body: serde_json::Value) -> Response {
    let mut response = axum::Json(body).into_response();
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    response
}

pub async fn jwks(State(state): State<AppState>) -> Response {
    cacheable(state.tokens.jwks())
}

/// The endpoints are on the configured public URL, never on the host a client named.
pub async fn metadata(State(state): State<AppState>) -> Response {
    let base = state.public_url.as_str();
    cacheable(json!({
        "issuer": state.tokens.issuer(),
        "token_endpoint": format!("{base}/oauth2/token"),
        "jwks_uri": format!("{base}/.well-known/jwks.json"),
        "revocation_endpoint": format!("{base}/oauth2/revoke"),
        "grant_types_supported": ["client_credentials", "password", "refresh_token"],
        "token_endpoint_auth_methods_supported": [
            "client_secret_basic",
            "client_secret_post",
            "private_key_jwt",
            "tls_client_auth"
        ],
        "token_endpoint_auth_signing_alg_values_supported": ["EdDSA", "ES256", "RS256", "PS256"],
        "revocation_endpoint_auth_methods_supported": ["none"],
        "response_types_supported": ["token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["EdDSA"],
        "amr_values_supported": ["pwd", "otp", "mfa"],
    }))
}
