//! Wire types shared by the twinguard server and its clients: the Azure Digital Twins error body,
//! the error codes it uses, and the API versions the server accepts.
//!
//! Nothing in here knows about HTTP libraries or storage; it is the vocabulary of the wire.

use serde::{Deserialize, Serialize};

/// The `api-version` query values twinguard accepts, as published for the Azure Digital Twins
/// data plane. A request without one of them is rejected before any handler runs.
pub const API_VERSIONS: &[&str] = &[
    "2020-05-31-preview",
    "2020-10-31",
    "2021-06-30-preview",
    "2022-05-31",
    "2023-02-27-preview",
    "2023-06-30",
    "2023-07-31-preview",
    "2023-10-31",
];

/// Header that carries the correlation ID of every response; the same ID is in the server log.
pub const CORRELATION_HEADER: &str = "x-ms-request-id";

/// The ADT error codes twinguard emits. Clients match on these strings, so they never change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorCode {
    BadRequest,
    InvalidArgument,
    ValidationFailed,
    DtdlParserError,
    SqlQueryError,
    QueryLimitExceeded,
    MissingApiVersion,
    UnsupportedApiVersion,
    Unauthenticated,
    Forbidden,
    MfaRequired,
    StepUpRequired,
    NotFound,
    Conflict,
    DigitalTwinNotFound,
    RelationshipNotFound,
    ModelNotFound,
    EventRouteNotFound,
    ComponentNotFound,
    TargetTwinNotFound,
    ModelDecommissioned,
    EventRouteFilterInvalid,
    ModelAlreadyExists,
    DigitalTwinAlreadyExists,
    RelationshipAlreadyExists,
    ModelReferencesNotDeleted,
    RelationshipsNotDeleted,
    PreconditionFailed,
    PayloadTooLarge,
    TooManyRequests,
    ServiceUnavailable,
    InternalServerError,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "BadRequest",
            Self::InvalidArgument => "InvalidArgument",
            Self::ValidationFailed => "ValidationFailed",
            Self::DtdlParserError => "DTDLParserError",
            Self::SqlQueryError => "SqlQueryError",
            Self::QueryLimitExceeded => "QueryLimitExceeded",
            Self::MissingApiVersion => "MissingApiVersionParameter",
            Self::UnsupportedApiVersion => "InvalidApiVersion",
            Self::Unauthenticated => "Unauthenticated",
            Self::Forbidden => "Forbidden",
            Self::MfaRequired => "MfaRequired",
            Self::StepUpRequired => "StepUpRequired",
            Self::NotFound => "NotFound",
            Self::Conflict => "Conflict",
            Self::DigitalTwinNotFound => "DigitalTwinNotFound",
            Self::RelationshipNotFound => "RelationshipNotFound",
            Self::ModelNotFound => "ModelNotFound",
            Self::EventRouteNotFound => "EventRouteNotFound",
            Self::ComponentNotFound => "ComponentNotFound",
            Self::TargetTwinNotFound => "TargetDigitalTwinNotFound",
            Self::ModelDecommissioned => "ModelDecommissioned",
            Self::EventRouteFilterInvalid => "EventRouteFilterInvalid",
            Self::ModelAlreadyExists => "ModelAlreadyExists",
            Self::DigitalTwinAlreadyExists => "DigitalTwinAlreadyExists",
            Self::RelationshipAlreadyExists => "RelationshipAlreadyExists",
            Self::ModelReferencesNotDeleted => "ModelReferencesNotDeleted",
            Self::RelationshipsNotDeleted => "RelationshipsNotDeleted",
            Self::PreconditionFailed => "PreconditionFailed",
            Self::PayloadTooLarge => "PayloadTooLarge",
            Self::TooManyRequests => "TooManyRequests",
            Self::ServiceUnavailable => "ServiceUnavailable",
            Self::InternalServerError => "InternalServerError",
        }
    }
}

/// `{"error": {"code": ..., "message": ...}}`, the body of every error response.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            error: ErrorDetail {
                code: code.as_str().to_owned(),
                message: message.into(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_has_the_adt_shape() {
        let body = serde_json::to_value(ErrorBody::new(ErrorCode::SqlQueryError, "bad")).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"error": {"code": "SqlQueryError", "message": "bad"}})
        );
    }
}
