//! The router: every route, its body limit, and the layers around it.

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderValue, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use twinguard_core::service::TwinService;

use crate::http::{correlate, require_api_version};
use crate::routes::{
    audit, ca, discovery, endpoints, eventroutes, health, identity, models, query, relationships,
    telemetry, token, twins,
};
use crate::tokens::TokenService;

/// ADT's limit on a twin or relationship body.
pub const TWIN_BODY_LIMIT: usize = 32 * 1024;
/// ADT's limit on one model upload request.
pub const MODEL_UPLOAD_LIMIT: usize = 1024 * 1024;
/// Query bodies: the query text (at most 8,000 characters in ADT) or a continuation token.
pub const QUERY_BODY_LIMIT: usize = 64 * 1024;
pub const TOKEN_BODY_LIMIT: usize = 8 * 1024;
/// Identity administration bodies: small JSON documents.
pub const ADMIN_BODY_LIMIT: usize = 16 * 1024;

/// Shared by every request. Each request clones it several times (each layer with state, each
/// `State` extractor), so it is one `Arc`: a clone is one reference count, not one per part.
#[derive(Clone)]
pub struct AppState(Arc<AppParts>);

impl AppState {
    pub fn new(parts: AppParts) -> Self {
        Self(Arc::new(parts))
    }
}

impl std::ops::Deref for AppState {
    type Target = AppParts;

    fn deref(&self) -> &AppParts {
        &self.0
    }
}

/// What [`AppState`] holds.
pub struct AppParts {
    pub service: Arc<TwinService>,
    pub tokens: Arc<TokenService>,
    /// Queries running at once; more are answered 429.
    pub query_slots: Arc<tokio::sync::Semaphore>,
    /// The instance's CA ring, which signs workloads' client certificates and follows
    /// rotations.
    pub ca: Arc<crate::ca::Authority>,
    /// The tamper-evident audit trail every request is recorded in.
    pub audit: crate::audit::Audit,
    /// Signed telemetry: device registry, ingestion, quarantine, history.
    pub telemetry: twinguard_telemetry::Telemetry,
    /// Where clients reach the API; every link handed out is built from it, never from a
    /// request's `Host` or `:authority`.
    pub public_url: Arc<crate::startup::PublicUrl>,
    /// The MQTT link's state (takeover evidence), when a broker is configured.
    pub mqtt: Option<Arc<crate::mqtt::MqttStatus>>,
    /// Event endpoints and the delivery of the change feed to them.
    pub events: crate::events::Events,
    /// Import and deletion jobs (in memory; `docs/jobs.md`).
    pub jobs: crate::jobs::Jobs,
    /// Seals the store positions clients are given, on a store that nodes may share.
    pub positions: Option<Arc<crate::positions::PositionSeal>>,
    /// On a store that nodes may share, what tells this node's owners (identities, tokens,
    /// devices) of other nodes' commits; a request that presents a position waits for it too.
    pub follower: Option<Arc<twinguard_core::follow::ChangeFollower>>,
}

/// Queries that may run at once; the blocking pool runs them beside the async threads.
pub const QUERY_SLOTS: usize = 8;

const OPENAPI: &str = include_str!("openapi.json");

async fn openapi() -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        OPENAPI,
    )
}

/// A batch on the device plane: up to 1,000 messages, as JWS text or base64 COSE.
pub const DEVICE_BATCH_LIMIT: usize = 4 * 1024 * 1024;

/// The device plane: signed telemetry only, on its own listener. The signature is each
/// message's credential, so no route here takes a token.
pub fn device_router(state: AppState) -> Router {
    let devices = Router::new()
        .route(
            "/telemetry",
            post(telemetry::ingest).layer(DefaultBodyLimit::max(DEVICE_BATCH_LIMIT)),
        )
        // `/telemetry` only: routes added after a route layer are not wrapped by it.
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            crate::http::consistency_self_authenticated,
        ))
        .route("/healthz", get(health::healthz))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(no_route);
    with_production_layers(devices, state)
}

async fn no_route() -> crate::error::ApiError {
    crate::error::ApiError::new(
        axum::http::StatusCode::NOT_FOUND,
        twinguard_proto::ErrorCode::BadRequest,
        "no such route",
    )
}

async fn method_not_allowed() -> crate::error::ApiError {
    crate::error::ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        twinguard_proto::ErrorCode::BadRequest,
        "the route does not support this method",
    )
}

/// Every request is recorded in the audit trail (inside), carries a correlation ID, and every
/// answer, errors and fallbacks included, carries the security headers (outermost).
fn with_production_layers(routes: Router<AppState>, state: AppState) -> Router {
    routes
        .layer(middleware::from_fn_with_state(
            state.clone(),
            crate::audit::record,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), correlate))
        .layer(middleware::from_fn(security_headers))
        .with_state(state)
}

/// Headers every answer carries, on both listeners.
const SECURITY_HEADERS: [(header::HeaderName, &str); 6] = [
    // HTTPS only, for a year; a browser that once reached the server never tries plaintext.
    (header::STRICT_TRANSPORT_SECURITY, "max-age=31536000"),
    // JSON is never sniffed into HTML or script.
    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    // Nothing here is a page: no script, style, frame or subresource may load from an answer.
    (
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; frame-ancestors 'none'",
    ),
    (header::X_FRAME_OPTIONS, "DENY"),
    (header::REFERRER_POLICY, "no-referrer"),
    // Secrets (client secrets, device keys, recovery codes, API keys) and twin data alike.
    (header::CACHE_CONTROL, "no-store"),
];

/// Sets [`SECURITY_HEADERS`] on every answer. A route may choose its own `Cache-Control` (only
/// the public discovery documents do: the JWKS and the server metadata); every other header
/// overrides whatever a handler set.
async fn security_headers(req: axum::extract::Request, next: middleware::Next) -> Response {
    let mut response = next.run(req).await;
    let headers = response.headers_mut();
    for (name, value) in SECURITY_HEADERS {
        if name == header::CACHE_CONTROL && headers.contains_key(&name) {
            continue;
        }
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// Builds the router with the production layers.
pub fn router(state: AppState) -> Router {
    let adt = Router::new()
        .route(
            "/models",
            get(models::list)
                .post(models::upload)
                .layer(DefaultBodyLimit::max(MODEL_UPLOAD_LIMIT)),
        )
        .route(
            "/models/{id}",
            get(models::get).patch(models::patch).delete(models::delete),
        )
        .route(
            "/digitaltwins/{id}",
            get(twins::get)
                .put(twins::put)
                .patch(twins::patch)
                .delete(twins::delete),
        )
        .route(
            "/digitaltwins/{id}/components/{component}",
            get(twins::get_component).patch(twins::patch_component),
        )
        .route("/digitaltwins/{id}/telemetry", post(endpoints::publish))
        .route(
            "/digitaltwins/{id}/components/{component}/telemetry",
            post(endpoints::publish_component),
        )
        .route("/digitaltwins/{id}/relationships", get(relationships::list))
        .route(
            "/digitaltwins/{id}/relationships/{rel}",
            get(relationships::get)
                .put(relationships::put)
                .patch(relationships::patch)
                .delete(relationships::delete),
        )
        .route(
            "/digitaltwins/{id}/incomingrelationships",
            get(relationships::incoming),
        )
        .route(
            "/query",
            post(query::query).layer(DefaultBodyLimit::max(QUERY_BODY_LIMIT)),
        )
        .route("/eventroutes", get(eventroutes::list))
        .route(
            "/eventroutes/{id}",
            get(eventroutes::get)
                .put(eventroutes::put)
                .delete(eventroutes::delete),
        )
        .merge(crate::routes::jobs::router())
        .layer(middleware::from_fn_with_state(
            state.clone(),
            crate::http::consistency,
        ))
        .layer(middleware::from_fn(require_api_version))
        .layer(DefaultBodyLimit::max(TWIN_BODY_LIMIT));

    let admin = Router::new()
        .route("/admin/endpoints", get(endpoints::list))
        .route(
            "/admin/endpoints/{name}",
            get(endpoints::get)
                .put(endpoints::put)
                .delete(endpoints::delete),
        )
        .route(
            "/admin/endpoints/{name}/deadletters",
            get(endpoints::dead_letters),
        )
        .route(
            "/admin/endpoints/{name}/deadletters/{seq}",
            get(endpoints::dead_letter).delete(endpoints::discard_dead_letter),
        )
        .route(
            "/admin/endpoints/{name}/deadletters/{seq}/replay",
            post(endpoints::replay_dead_letter),
        )
        .route(
            "/admin/identities",
            get(identity::list_identities).post(identity::create_identity),
        )
        .route(
            "/admin/identities/{id}",
            get(identity::get_identity)
                .patch(identity::update_identity)
                .delete(identity::delete_identity),
        )
        .route(
            "/admin/identities/{id}/password",
            put(identity::set_password),
        )
        .route("/admin/identities/{id}/mfa", delete(identity::reset_mfa))
        .route(
            "/admin/identities/{id}/mfa/enrolmentcode",
            post(identity::enrolment_code),
        )
        .route(
            "/admin/identities/{id}/keys",
            put(identity::set_client_keys),
        )
        .route("/admin/ca", get(ca::show))
        .route("/admin/ca/add", post(ca::add))
        .route("/admin/ca/rotate", post(ca::rotate))
        .route("/admin/ca/retire", post(ca::retire))
        .route(
            "/admin/identities/{id}/certificates",
            post(identity::issue_certificate),
        )
        .route(
            "/admin/identities/{id}/certificates/{serial}",
            delete(identity::revoke_certificate),
        )
        .route(
            "/admin/identities/{id}/secret",
            post(identity::rotate_secret),
        )
        .route(
            "/admin/roles",
            get(identity::list_roles).post(identity::create_role),
        )
        .route(
            "/admin/roles/{id}",
            get(identity::get_role).delete(identity::delete_role),
        )
        .route(
            "/admin/roleassignments",
            get(identity::list_assignments).post(identity::create_assignment),
        )
        .route(
            "/admin/roleassignments/{id}",
            delete(identity::delete_assignment),
        )
        .route(
            "/admin/apikeys",
            get(identity::list_api_keys).post(identity::create_api_key),
        )
        .route("/admin/apikeys/overdue", get(identity::overdue_api_keys))
        .route("/admin/apikeys/{id}", delete(identity::revoke_api_key))
        .route("/admin/apikeys/{id}/rotate", post(identity::rotate_api_key))
        .route("/audit/checkpoint", get(audit::checkpoint))
        .route("/audit/entries/{index}", get(audit::entry))
        .route("/audit/proofs/consistency", get(audit::consistency))
        .route("/me", get(identity::me))
        .route("/me/mfa/totp", post(identity::begin_totp))
        .route("/me/mfa/totp/confirm", post(identity::confirm_totp))
        .route("/me/password", put(identity::change_password))
        .route("/me/certificate", post(identity::renew_certificate))
        .route("/devices", get(telemetry::list_devices))
        .route(
            "/devices/{id}",
            get(telemetry::get_device).put(telemetry::register_device),
        )
        .route("/devices/{id}/bindings", put(telemetry::set_bindings))
        .route("/devices/{id}/key", put(telemetry::rotate_device_key))
        .route(
            "/devices/{id}/key/previous",
            delete(telemetry::retire_previous_key),
        )
        .route("/devices/{id}/{action}", post(telemetry::change_status))
        .route("/firmware", get(telemetry::list_firmware))
        .route("/firmware/{model}", put(telemetry::put_firmware))
        .route("/policies", get(telemetry::list_policies))
        .route(
            "/policies/{id}",
            put(telemetry::put_policy).delete(telemetry::delete_policy),
        )
        .route("/sensorgroups", get(telemetry::list_groups))
        .route(
            "/sensorgroups/{id}",
            put(telemetry::put_group).delete(telemetry::delete_group),
        )
        .route("/quarantine", get(telemetry::list_quarantine))
        .route("/quarantine/{id}", get(telemetry::get_quarantined))
        .route("/quarantine/{id}/{decision}", post(telemetry::review))
        .route("/history/{twin}/{name}", get(telemetry::history))
        .route("/telemetry/status", get(telemetry::status))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            crate::http::consistency,
        ))
        .layer(DefaultBodyLimit::max(ADMIN_BODY_LIMIT));

    let tokens = Router::new()
        .route("/oauth2/token", post(token::token))
        .route("/oauth2/revoke", post(token::revoke))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            crate::http::consistency_self_authenticated,
        ))
        .layer(DefaultBodyLimit::max(TOKEN_BODY_LIMIT));

    let routes = Router::new()
        .merge(adt)
        .merge(admin)
        .merge(tokens)
        .route("/.well-known/jwks.json", get(discovery::jwks))
        .route("/.well-known/event-keys.json", get(endpoints::event_keys))
        .route(
            "/.well-known/openid-configuration",
            get(discovery::metadata),
        )
        .route(
            "/.well-known/oauth-authorization-server",
            get(discovery::metadata),
        )
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .route("/openapi.json", get(openapi))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(no_route);
    with_production_layers(routes, state)
}
