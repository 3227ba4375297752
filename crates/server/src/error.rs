//! The one place where errors become HTTP responses. Clients get the ADT error body with a code
//! and a message about their own request; anything internal gets a generic message, and the
//! detail goes to the log under the response's correlation ID (control AP-4).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use twinguard_core::error::DomainError;
use twinguard_proto::{ErrorBody, ErrorCode};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
    /// Logged, never sent.
    pub detail: Option<String>,
    /// The answer stands for a resource outside the caller's scope (recorded in the audit trail;
    /// the client sees the plain absence).
    pub hidden: bool,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<i64>,
}

/// Carried in the response extensions so the correlation middleware can log it with the ID.
#[derive(Debug, Clone)]
pub struct LoggedError {
    pub code: &'static str,
    pub detail: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            detail: None,
            hidden: false,
            retry_after: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message)
    }

    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorCode::InvalidArgument, message)
    }

    pub fn unauthenticated() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthenticated,
            "a valid bearer access token is required",
        )
    }

    /// A dependency is not ready (503).
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::ServiceUnavailable,
            message,
        )
    }

    /// A server-side failure: the client learns only that it happened.
    pub fn internal(detail: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: ErrorCode::InternalServerError,
            message: "an internal error occurred; quote the request ID to the operator".into(),
            detail: Some(detail.into()),
            hidden: false,
            retry_after: None,
        }
    }
}

impl From<DomainError> for ApiError {
    fn from(e: DomainError) -> Self {
        use DomainError as D;
        if let D::Hidden(absent) = e {
            // Exactly the absence's answer; only the log and the audit trail know more.
            let mut answer = ApiError::from(*absent);
            answer.detail = Some(format!(
                "{} (exists outside the caller's scope)",
                answer.message
            ));
            answer.hidden = true;
            return answer;
        }
        let message = e.to_string();
        let (status, code) = match &e {
            D::Forbidden { .. } => (StatusCode::FORBIDDEN, ErrorCode::Forbidden),
            D::MfaRequired { .. } => (StatusCode::FORBIDDEN, ErrorCode::MfaRequired),
            D::StepUpRequired { .. } => (StatusCode::FORBIDDEN, ErrorCode::StepUpRequired),
            D::NotFound { .. } => (StatusCode::NOT_FOUND, ErrorCode::NotFound),
            D::Conflict(_) => (StatusCode::CONFLICT, ErrorCode::Conflict),
            D::InvalidArgument(_) => (StatusCode::BAD_REQUEST, ErrorCode::InvalidArgument),
            D::ValidationFailed(_) => (StatusCode::BAD_REQUEST, ErrorCode::ValidationFailed),
            D::Dtdl(_) => (StatusCode::BAD_REQUEST, ErrorCode::DtdlParserError),
            D::Query(_) => (StatusCode::BAD_REQUEST, ErrorCode::SqlQueryError),
            D::QueryLimitExceeded(_) => (StatusCode::BAD_REQUEST, ErrorCode::QueryLimitExceeded),
            D::TwinNotFound(_) => (StatusCode::NOT_FOUND, ErrorCode::DigitalTwinNotFound),
            D::RelationshipNotFound(_) => (StatusCode::NOT_FOUND, ErrorCode::RelationshipNotFound),
            D::ModelNotFound(_) => (StatusCode::NOT_FOUND, ErrorCode::ModelNotFound),
            D::RouteNotFound(_) => (StatusCode::NOT_FOUND, ErrorCode::EventRouteNotFound),
            D::ComponentNotFound(_) => (StatusCode::NOT_FOUND, ErrorCode::ComponentNotFound),
            D::ModelExists(_) => (StatusCode::CONFLICT, ErrorCode::ModelAlreadyExists),
            D::TwinExists(_) => (StatusCode::CONFLICT, ErrorCode::DigitalTwinAlreadyExists),
            D::RelationshipExists(_) => {
                (StatusCode::CONFLICT, ErrorCode::RelationshipAlreadyExists)
            }
            D::ModelReferenced(..) => (StatusCode::CONFLICT, ErrorCode::ModelReferencesNotDeleted),
            // ADT answers 400, not 409, for a twin that still has relationships.
            D::RelationshipsExist(_) => {
                (StatusCode::BAD_REQUEST, ErrorCode::RelationshipsNotDeleted)
            }
            D::TargetTwinNotFound(_) => (StatusCode::NOT_FOUND, ErrorCode::TargetTwinNotFound),
            D::ModelDecommissioned(_) => (StatusCode::BAD_REQUEST, ErrorCode::ModelDecommissioned),
            D::RouteFilterInvalid(_) => {
                (StatusCode::BAD_REQUEST, ErrorCode::EventRouteFilterInvalid)
            }
            D::BadRequest(_) => (StatusCode::BAD_REQUEST, ErrorCode::BadRequest),
            D::PreconditionFailed => (
                StatusCode::PRECONDITION_FAILED,
                ErrorCode::PreconditionFailed,
            ),
            D::Unconfirmed => {
                return Self {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    code: ErrorCode::ServiceUnavailable,
                    message: "the store did not confirm the write in time; it may still be \
                              applied: read before retrying a write that is not idempotent"
                        .into(),
                    detail: Some(message),
                    hidden: false,
                    retry_after: None,
                };
            }
            D::Unavailable | D::Superseded => {
                return Self {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    code: ErrorCode::ServiceUnavailable,
                    message: "the service cannot accept writes right now; retry later".into(),
                    detail: Some(message),
                    hidden: false,
                    retry_after: None,
                };
            }
            D::Busy { retry_after_secs } => {
                return Self {
                    retry_after: Some(*retry_after_secs),
                    ..Self::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        ErrorCode::TooManyRequests,
                        "too many requests of this kind by this caller are running; retry \
                         shortly",
                    )
                };
            }
            D::Throttled { retry_after_secs } => {
                return Self {
                    retry_after: Some(*retry_after_secs),
                    ..Self::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        ErrorCode::TooManyRequests,
                        "too many failed attempts; retry later",
                    )
                };
            }
            _ => return Self::internal(message),
        };
        Self {
            status,
            code,
            message,
            detail: None,
            hidden: false,
            retry_after: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let logged = LoggedError {
            code: self.code.as_str(),
            detail: self.detail.unwrap_or_else(|| self.message.clone()),
        };
        let mut response = (
            self.status,
            axum::Json(ErrorBody::new(self.code, self.message)),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(seconds) = self.retry_after
            && let Ok(value) = HeaderValue::from_str(&seconds.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        response.extensions_mut().insert(logged);
        if self.hidden {
            response.extensions_mut().insert(ScopeHidden);
        }
        response
    }
}

/// Marks a response that stands for a resource outside the caller's scope.
#[derive(Debug, Clone, Copy)]
pub struct ScopeHidden;

pub type ApiResult<T> = Result<T, ApiError>;
