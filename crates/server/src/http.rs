//! Request plumbing shared by every route: the authenticated caller, JSON bodies with ADT errors,
//! preconditions, paging, correlation IDs and the `api-version` check.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use tracing::Instrument;
use twinguard_core::auth::Principal;
use twinguard_core::error::DomainError;
use twinguard_core::graph::Precondition;
use twinguard_core::identity::Refusal;
use twinguard_core::paging::{KeyPosition, ListPosition};
use twinguard_proto::{API_VERSIONS, CORRELATION_HEADER, ErrorCode};

use crate::app::AppState;
use crate::error::{ApiError, LoggedError};
use crate::tls::PeerCertificate;

/// Default and largest page sizes for list endpoints and queries.
pub const DEFAULT_PAGE_SIZE: usize = 100;
pub const MAX_PAGE_SIZE: usize = twinguard_core::paging::MAX_PAGE_SIZE;

/// The authenticated caller of a request. Extracting it verifies the bearer token; a route that
/// takes a `Caller` cannot run for an unauthenticated request.
#[derive(Debug, Clone)]
pub struct Caller(pub Arc<Principal>);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        // Already authenticated by a layer (`consistency`): not checked, or counted, twice.
        if let Some(Authenticated(caller)) = parts.extensions.get::<Authenticated>() {
            return Ok(caller.clone());
        }
        if let Some(key) = api_key(&parts.headers) {
            // An API key is a secret like any other: checked behind the one throttle.
            let from = peer_address(parts);
            return match state.tokens.directory().authenticate_api_key(from, key) {
                Ok(p) => {
                    note_principal(parts, &p);
                    Ok(Caller(Arc::new(p)))
                }
                Err(Refusal::Throttled(wait)) => {
                    crate::metrics::auth_throttled();
                    Err(ApiError::from(DomainError::Throttled {
                        retry_after_secs: wait.seconds(),
                    }))
                }
                Err(Refusal::Failed(why)) => {
                    let id: String = key.chars().take(24).collect();
                    tracing::warn!(key = %id, reason = %why, "request with an invalid, revoked or expired API key");
                    crate::metrics::auth_failure(crate::metrics::Method::ApiKey);
                    Err(ApiError::unauthenticated())
                }
            };
        }
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token)
            .ok_or_else(ApiError::unauthenticated)?;
        let session = state.tokens.authenticate(token.trim()).await.map_err(|_| {
            tracing::info!("request with an invalid or expired bearer token");
            crate::metrics::auth_failure(crate::metrics::Method::Bearer);
            ApiError::unauthenticated()
        })?;
        // The grants are read now: a disabled identity, a removed assignment, a credential
        // reset or a revoked refresh family counts at once.
        let certificate = parts
            .extensions
            .get::<PeerCertificate>()
            .and_then(|PeerCertificate(c)| c.clone());
        let principal = state
            .tokens
            .principal(&session, certificate.as_deref().map(|c| c.as_ref()))
            .ok_or_else(ApiError::unauthenticated)?;
        note_principal(parts, &principal);
        Ok(Caller(Arc::new(principal)))
    }
}

/// `Option<Caller>`: `None` for a request that presents no credential at all; one that
/// presents a credential is authenticated as for [`Caller`], and refused if it fails.
impl axum::extract::OptionalFromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Option<Self>, ApiError> {
        let presented = parts.headers.contains_key(header::AUTHORIZATION)
            || parts.headers.contains_key("x-api-key");
        if !presented {
            return Ok(None);
        }
        <Caller as FromRequestParts<AppState>>::from_request_parts(parts, state)
            .await
            .map(Some)
    }
}

/// Authenticates `req`'s caller ahead of its handler, which then reuses the outcome.
async fn authenticate(req: Request, state: &AppState) -> Result<Request, Response> {
    let (mut parts, body) = req.into_parts();
    let caller = Caller::from_request_parts(&mut parts, state)
        .await
        .map_err(IntoResponse::into_response)?;
    parts.extensions.insert(Authenticated(caller));
    Ok(Request::from_parts(parts, body))
}

/// The caller of a request that a layer authenticated before its handler ran.
#[derive(Clone)]
struct Authenticated(Caller);

/// The address a request came from (the unspecified address if the server did not record it).
pub fn peer_address(parts: &Parts) -> IpAddr {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(peer)| peer.ip())
        .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
}

/// The address of the request being served, for handlers that check a secret.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddress(pub IpAddr);

impl<S: Send + Sync> FromRequestParts<S> for PeerAddress {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(PeerAddress(peer_address(parts)))
    }
}

/// Names the caller in the request's audit entry.
fn note_principal(parts: &Parts, principal: &Principal) {
    if let Some(note) = parts.extensions.get::<crate::audit::AuditNote>() {
        note.set("principal", principal.subject.clone());
    }
}

/// An API key from `x-api-key`, or a bearer credential that is one (`tgk_...`).
fn api_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(key) = headers.get("x-api-key") {
        return key.to_str().ok().map(str::trim);
    }
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, token)| {
            scheme.eq_ignore_ascii_case("bearer") && token.trim().starts_with("tgk_")
        })
        .map(|(_, token)| token.trim())
}

/// A JSON request body; malformed or oversize bodies get the ADT error shape.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    ErrorCode::PayloadTooLarge,
                    "the request body is too large",
                )
            } else {
                ApiError::bad_request("the request body could not be read")
            }
        })?;
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|e| {
            ApiError::bad_request(format!(
                "the request body is not valid JSON for this operation: {e}"
            ))
        })
    }
}

/// `If-Match` (any etag or `*`) as a precondition.
pub fn if_match(headers: &HeaderMap) -> Result<Precondition, ApiError> {
    match headers.get(header::IF_MATCH) {
        None => Ok(Precondition::None),
        Some(v) => v
            .to_str()
            .map(|s| Precondition::IfMatch(s.trim().to_owned()))
            .map_err(|_| ApiError::invalid_argument("If-Match is not a valid etag")),
    }
}

/// `If-None-Match: *` as a precondition; other values are not supported by ADT either.
pub fn if_none_match(headers: &HeaderMap) -> Result<Precondition, ApiError> {
    match headers.get(header::IF_NONE_MATCH) {
        None => Ok(Precondition::None),
        Some(v) if v.as_bytes() == b"*" => Ok(Precondition::IfNoneMatch),
        Some(_) => Err(ApiError::invalid_argument(
            "If-None-Match only supports '*'",
        )),
    }
}

pub fn etag_header(etag: &str) -> [(header::HeaderName, HeaderValue); 1] {
    [(
        header::ETAG,
        HeaderValue::from_str(etag).unwrap_or(HeaderValue::from_static("")),
    )]
}

/// The page size a client asked for with `max-items-per-page`, bounded.
pub fn page_size(headers: &HeaderMap) -> Result<usize, ApiError> {
    match headers.get("max-items-per-page") {
        None => Ok(DEFAULT_PAGE_SIZE),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .filter(|n| *n > 0)
            .map(|n| n.min(MAX_PAGE_SIZE))
            .ok_or_else(|| {
                ApiError::invalid_argument("max-items-per-page must be a positive integer")
            }),
    }
}

/// Where a list page starts and how long it is, from the `continuationToken` query parameter
/// (see [`ListPosition`]) or else the request's `max-items-per-page`.
fn list_position(token: Option<&str>, headers: &HeaderMap) -> Result<ListPosition, ApiError> {
    let Some(token) = token else {
        return ListPosition::new(0, page_size(headers)?).ok_or_else(|| {
            ApiError::invalid_argument("max-items-per-page must be a positive integer")
        });
    };
    ListPosition::parse(token).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            "the continuation token is not valid",
        )
    })
}

/// Serialized bytes a list page may hold (the query pages' cap too, `limits::MAX_PAGE_BYTES`):
/// a page ends early, and its next link continues, when its items would pass it.
pub const MAX_LIST_PAGE_BYTES: usize = twinguard_core::query::limits::MAX_PAGE_BYTES;

/// The query of a list request: a continuation token, and for the lists that have one a
/// filter (carried over to the next link as the client wrote it).
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListParams {
    pub continuation_token: Option<String>,
}

/// Renders items one at a time until `size` items or [`MAX_LIST_PAGE_BYTES`] of JSON, whichever
/// comes first (always at least one item); returns the page and how many items it took.
fn render_page<'a, T: 'a>(
    items: impl Iterator<Item = &'a T>,
    render: impl Fn(&T) -> Result<Box<serde_json::value::RawValue>, serde_json::Error>,
    size: usize,
) -> Result<(Vec<Box<serde_json::value::RawValue>>, usize), ApiError> {
    let mut page: Vec<Box<serde_json::value::RawValue>> = Vec::new();
    let mut bytes = 0usize;
    for item in items.take(size) {
        let raw = render(item)
            .map_err(|e| ApiError::internal(format!("a list item did not serialize: {e}")))?;
        bytes = bytes.saturating_add(raw.get().len() + 1);
        if bytes > MAX_LIST_PAGE_BYTES && !page.is_empty() {
            break;
        }
        page.push(raw);
    }
    let taken = page.len();
    Ok((page, taken))
}

/// The request again with `token` as its continuation token (and without the query parameters
/// in `drop`, which the token replaces), on the server's public URL.
fn next_link(
    base: &crate::startup::PublicUrl,
    uri: &axum::http::Uri,
    drop: &[&str],
    token: &str,
) -> String {
    let mut query: Vec<String> = uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| {
            let name = p.split('=').next().unwrap_or("");
            !p.is_empty() && name != "continuationToken" && !drop.contains(&name)
        })
        .map(str::to_owned)
        .collect();
    query.push(format!("continuationToken={token}"));
    format!("{}{}?{}", base.as_str(), uri.path(), query.join("&"))
}

/// `{"nextLink": ..., "value": [...]}` from items that are already JSON: written as they are,
/// not parsed back into a tree. Keys in the order clients have always seen.
fn page_response(next_link: Option<String>, page: &[Box<serde_json::value::RawValue>]) -> Response {
    #[derive(serde::Serialize)]
    struct Page<'a> {
        #[serde(rename = "nextLink")]
        next_link: Option<String>,
        value: &'a [Box<serde_json::value::RawValue>],
    }
    axum::Json(Page {
        next_link,
        value: page,
    })
    .into_response()
}

/// One page of a list, as `{"value": [...], "nextLink": ...}`; the next link repeats the
/// request with a continuation token, on the server's public URL (`base`), never on the host a
/// client named. `render` turns one item into its wire form; only the page's items are
/// rendered, one at a time, and the page stops at `max-items-per-page` items or at
/// [`MAX_LIST_PAGE_BYTES`], whichever comes first (always at least one item), so a list of large
/// models costs at most that much memory per request.
pub fn list_page<T, R: serde::Serialize>(
    items: &[T],
    render: impl Fn(&T) -> R,
    token: Option<&str>,
    base: &crate::startup::PublicUrl,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let render = |item: &T| serde_json::value::to_raw_value(&render(item));
    raw_list_page(items, render, token, base, uri, headers)
}

/// [`list_page`] of items that serialize as they are.
pub fn serialized_list_page<T: serde::Serialize>(
    items: &[T],
    token: Option<&str>,
    base: &crate::startup::PublicUrl,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    raw_list_page(
        items,
        serde_json::value::to_raw_value,
        token,
        base,
        uri,
        headers,
    )
}

fn raw_list_page<T>(
    items: &[T],
    render: impl Fn(&T) -> Result<Box<serde_json::value::RawValue>, serde_json::Error>,
    token: Option<&str>,
    base: &crate::startup::PublicUrl,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let position = list_position(token, headers)?;
    let offset = position.offset().min(items.len());
    let (page, taken) = render_page(
        items.get(offset..).unwrap_or(&[]).iter(),
        render,
        position.size(),
    )?;
    let end = offset + taken;
    let next_link =
        (end < items.len()).then(|| next_link(base, uri, &[], &position.at(end).token()));
    Ok(page_response(next_link, &page))
}

/// A page of a keyed list (see [`KeyPosition`]): where it starts, from the continuation token
/// or else from the request's `max-items-per-page` (a list may also take a legacy size, such as
/// the quarantine's `limit`, when no header is sent).
pub fn key_position(
    token: Option<&str>,
    headers: &HeaderMap,
    legacy_size: Option<usize>,
) -> Result<(Option<String>, usize), ApiError> {
    match token {
        Some(token) => KeyPosition::parse(token)
            .map(|p| (Some(p.after().to_owned()), p.size()))
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    ErrorCode::BadRequest,
                    "the continuation token is not valid",
                )
            }),
        None => {
            let size = match (headers.contains_key("max-items-per-page"), legacy_size) {
                (false, Some(n)) => n.clamp(1, MAX_PAGE_SIZE),
                _ => page_size(headers)?,
            };
            Ok((None, size))
        }
    }
}

/// One page of a keyed list: `items` are the page's candidates in key order, read with one
/// more than `size` so the lister knows whether more follow. The page is cut like
/// [`list_page`]'s; the next link starts after the last item sent, or, when every item fits and
/// the lister stopped reading early (`resume`, the last key it read), after that; it replaces
/// the query parameters in `replaces` (a legacy cursor and size).
pub fn keyed_list_page<T: serde::Serialize>(
    items: &[T],
    key: impl Fn(&T) -> &str,
    resume: Option<&str>,
    size: usize,
    base: &crate::startup::PublicUrl,
    uri: &axum::http::Uri,
    replaces: &[&str],
) -> Result<Response, ApiError> {
    let (page, taken) = render_page(items.iter(), serde_json::value::to_raw_value, size)?;
    let next_link = if taken < items.len() {
        let last = items
            .get(taken.saturating_sub(1))
            .map(&key)
            .and_then(|k| KeyPosition::new(k, size))
            .ok_or_else(|| ApiError::internal("a list item has a key no token can carry"))?;
        Some(next_link(base, uri, replaces, &last.token()))
    } else if let Some(resume) = resume {
        let position = KeyPosition::new(resume, size)
            .ok_or_else(|| ApiError::internal("a list key no token can carry"))?;
        Some(next_link(base, uri, replaces, &position.token()))
    } else {
        None
    };
    Ok(page_response(next_link, &page))
}

#[derive(Debug, serde::Deserialize)]
pub struct ApiVersionQuery {
    #[serde(rename = "api-version")]
    api_version: Option<String>,
}

/// Rejects ADT data-plane requests without a known `api-version`.
pub async fn require_api_version(
    query: Result<axum::extract::Query<ApiVersionQuery>, axum::extract::rejection::QueryRejection>,
    req: Request,
    next: Next,
) -> Response {
    let version = query.ok().and_then(|q| q.0.api_version);
    match version.as_deref() {
        None => ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::MissingApiVersion,
            "the api-version query parameter is required",
        )
        .into_response(),
        Some(v) if API_VERSIONS.contains(&v) => next.run(req).await,
        Some(_) => ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::UnsupportedApiVersion,
            format!(
                "unsupported api-version; supported: {}",
                API_VERSIONS.join(", ")
            ),
        )
        .into_response(),
    }
}

/// A write's answer names the store position that holds it, sealed (on a store that several
/// nodes may share: `crate::positions`); a request that presents one is answered only once this
/// node has applied it.
pub const POSITION_HEADER: &str = "twinguard-position";
pub const MIN_POSITION_HEADER: &str = "twinguard-min-position";
/// How long a request that presents a position waits for this node to apply it.
pub const POSITION_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
/// A node whose snapshot was last known current longer ago than this refuses reads rather than
/// answer them stale, and reports not ready.
pub const MAX_READ_LAG: std::time::Duration = std::time::Duration::from_secs(5);

/// The consistency a client of several nodes relies on (`docs/consistency.md`), on every route
/// of the API plane that reads or changes the store: `Twinguard-Min-Position` is waited for (up
/// to [`POSITION_WAIT`], then 503 with `Retry-After`) by the graph and by the owners of the
/// security records (identities, roles, keys, token families, devices), a read on a node that
/// lags more than [`MAX_READ_LAG`] is refused with 503, and a successful write's answer carries
/// `Twinguard-Position`. On a store of one writer, always current, nothing waits and no
/// position is named.
///
/// A presented position is waited for before the caller is authenticated: the credential may be
/// one the position brought (a token whose refresh family, or an API key, was made on another
/// node), and judging it before would count a legitimate client's request as a failed secret
/// check. Positions are sealed, so a presented one is a position some node has reached, and
/// waiting for it costs no more than this node's real lag, at most [`POSITION_WAIT`]. A caller
/// without a credential can hold one (`/oauth2/revoke`'s answer names one, for any token) and
/// learn from a 503 that this node lags behind it (`/readyz` tells past 5 s); nothing else is
/// told: a position that is not one, and a read refused for lag, are answered 401 as any
/// unauthenticated request.
pub async fn consistency(State(state): State<AppState>, req: Request, next: Next) -> Response {
    follow_positions(state, req, next, true).await
}

/// [`consistency`] for routes whose request is itself the credential: the token endpoints (a
/// client that created an identity on one node logs in with it on another) and the device
/// plane's `/telemetry`, whose messages are signed (a batch presenting the position of a
/// device's registration, key rotation or suspension on another node is decided as that node
/// would decide it, and its 200 or 202 answer names the position holding what it changed).
pub async fn consistency_self_authenticated(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    follow_positions(state, req, next, false).await
}

/// `bearer`: the routes' callers authenticate with a bearer token or an API key (all but the
/// token endpoints).
async fn follow_positions(state: AppState, req: Request, next: Next, bearer: bool) -> Response {
    let service = &state.service;
    let reads = matches!(
        *req.method(),
        axum::http::Method::GET | axum::http::Method::HEAD
    ) || req.uri().path() == "/query";
    // On a store of one writer every position is reached: the header is only checked.
    let presented = req.headers().get(MIN_POSITION_HEADER).map(|value| {
        let value = value.to_str().ok();
        match &state.positions {
            Some(seal) => value.and_then(|v| seal.open(v)),
            None => value.map(|_| 0),
        }
    });
    if presented == Some(None) {
        if bearer && let Err(refused) = authenticate(req, &state).await {
            return refused;
        }
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            "Twinguard-Min-Position must be a position a write was answered with",
        )
        .into_response();
    }
    if let Some(Some(position)) = presented
        && !told(&state, position).await
    {
        return not_current("this node has not applied that position yet");
    }
    if reads && service.lag().is_some_and(|lag| lag > MAX_READ_LAG) {
        if bearer && let Err(refused) = authenticate(req, &state).await {
            return refused;
        }
        return not_current("this node's view of the store is out of date");
    }
    let mut response = next.run(req).await;
    // Only a write that succeeded names a position: a refusal stays the same answer whatever
    // the store holds (a hidden twin is refused as an absent one is, to the byte).
    if !reads
        && response.status().is_success()
        && let (Some(seal), Some(position)) = (&state.positions, service.position())
        && let Some(token) = seal.seal(position)
        && let Ok(value) = axum::http::HeaderValue::from_str(&token)
    {
        response.headers_mut().insert(POSITION_HEADER, value);
    }
    response
}

/// Whether this node's graph and its owners of security records have applied `position`,
/// waiting up to [`POSITION_WAIT`] in all.
async fn told(state: &AppState, position: u64) -> bool {
    let deadline = tokio::time::Instant::now() + POSITION_WAIT;
    if !state
        .service
        .wait_for_position(position, POSITION_WAIT)
        .await
    {
        return false;
    }
    match &state.follower {
        Some(follower) => {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            follower.wait_for(position, left).await
        }
        None => true,
    }
}

fn not_current(message: &'static str) -> Response {
    let mut error = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::ServiceUnavailable,
        message,
    );
    error.retry_after = Some(1);
    error.into_response()
}

/// The correlation ID of the request being served.
#[derive(Debug, Clone)]
pub struct CorrelationId(pub String);

/// Gives every response a correlation ID (`x-ms-request-id`) and logs errors under it. An
/// incoming W3C `traceparent` is logged with the request.
pub async fn correlate(State(_state): State<AppState>, req: Request, next: Next) -> Response {
    let id = uuid::Uuid::new_v4().to_string();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let traceparent = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= 128)
        .map(str::to_owned);
    let started = Instant::now();
    // A request rejected before its body was read (bad token, bad api-version) leaves unread
    // bytes on an HTTP/1 connection, which is then closed; say so, so clients do not reuse it.
    let http1_with_body = req.version() < axum::http::Version::HTTP_2
        && (req.headers().contains_key(header::TRANSFER_ENCODING)
            || req
                .headers()
                .get(header::CONTENT_LENGTH)
                .is_some_and(|v| v.as_bytes() != b"0"));
    // Everything logged while the request runs carries its correlation ID.
    let span = tracing::info_span!("request", correlation_id = %id);
    let mut req = req;
    req.extensions_mut().insert(CorrelationId(id.clone()));
    let mut response = next.run(req).instrument(span).await;
    if http1_with_body && response.status().is_client_error() {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(CORRELATION_HEADER, value);
    }
    let status = response.status();
    crate::metrics::request(&method, status.as_u16(), started.elapsed());
    if let Some(err) = response.extensions().get::<LoggedError>() {
        if status.is_server_error() {
            tracing::error!(correlation_id = %id, %method, %path, status = status.as_u16(), code = err.code, detail = %err.detail, traceparent, "request failed");
        } else {
            tracing::info!(correlation_id = %id, %method, %path, status = status.as_u16(), code = err.code, detail = %err.detail, traceparent, "request rejected");
        }
    } else {
        tracing::debug!(correlation_id = %id, %method, %path, status = status.as_u16(), micros = started.elapsed().as_micros() as u64, "request");
    }
    response
}

/// axum's `Query`, with malformed query strings answered in the ADT error shape (axum's own
/// rejection is plain text that echoes parser internals).
#[derive(Debug)]
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(Query(value)),
            Err(e) => Err(ApiError {
                detail: Some(e.body_text()),
                ..ApiError::invalid_argument("a query parameter is malformed")
            }),
        }
    }
}

/// axum's `Path`, with undecodable path segments answered in the ADT error shape.
#[derive(Debug)]
pub struct Path<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Path(value)),
            Err(e) => Err(ApiError {
                detail: Some(e.body_text()),
                ..ApiError::invalid_argument("a path segment is malformed")
            }),
        }
    }
}
