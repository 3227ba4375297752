//! The domain's error type. Each variant names what went wrong in terms a client can act on; the
//! server maps variants to HTTP statuses and ADT error codes in one place.

use crate::dtdl::DtdlError;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DomainError {
    #[error("the caller is not allowed to perform {action}")]
    Forbidden { action: &'static str },
    /// A privileged action by a person who logged in without a second factor.
    #[error("{action} needs a login with a second factor; enrol one and log in again")]
    MfaRequired { action: &'static str },
    /// A sensitive action by a person whose last MFA-backed login is not recent enough.
    #[error("{action} needs a recent multi-factor authentication")]
    StepUpRequired { action: &'static str },
    #[error("{0}")]
    InvalidArgument(String),
    /// An identity, role, role assignment or API key that does not exist.
    #[error("there is no {kind} with ID '{id}'")]
    NotFound { kind: &'static str, id: String },
    /// The request conflicts with the current state (a name taken, a role still assigned).
    #[error("{0}")]
    Conflict(String),
    /// Something that exists but lies outside every scope the caller holds: answered exactly as
    /// the wrapped absence, so nothing is revealed, while the log and the audit trail record
    /// the scope decision.
    #[error("{0}")]
    Hidden(Box<DomainError>),
    #[error("{0}")]
    ValidationFailed(String),
    #[error("{0}")]
    Dtdl(#[from] DtdlError),
    /// A query that does not parse or cannot run; the message includes the position.
    #[error("{0}")]
    Query(String),
    #[error("{0}")]
    QueryLimitExceeded(String),
    #[error("there is no digital twin with ID '{0}'")]
    TwinNotFound(String),
    #[error("there is no relationship with ID '{0}'")]
    RelationshipNotFound(String),
    #[error("there is no model with ID '{0}'")]
    ModelNotFound(String),
    #[error("there is no event route with ID '{0}'")]
    RouteNotFound(String),
    #[error("there is no component named '{0}'")]
    ComponentNotFound(String),
    #[error("the target twin '{0}' does not exist")]
    TargetTwinNotFound(String),
    #[error("model {0} is decommissioned; new twins cannot use it")]
    ModelDecommissioned(String),
    #[error("invalid event route filter: {0}")]
    RouteFilterInvalid(String),
    /// A request the server cannot interpret, such as a continuation token it did not issue.
    #[error("{0}")]
    BadRequest(String),
    #[error("a model with ID '{0}' already exists")]
    ModelExists(String),
    #[error("a digital twin with ID '{0}' already exists")]
    TwinExists(String),
    #[error("a relationship with ID '{0}' already exists")]
    RelationshipExists(String),
    #[error("the model '{0}' is still referenced by {1}")]
    ModelReferenced(String, String),
    #[error("the digital twin '{0}' still has relationships; delete them first")]
    RelationshipsExist(String),
    #[error("the entity's etag does not match the precondition")]
    PreconditionFailed,
    #[error("the store is unavailable")]
    Unavailable,
    /// The store did not confirm the write within [`crate::service::WRITE_WAIT`] (a database
    /// that stopped answering, a synchronous standby lost): not acknowledged, and it may still
    /// be applied once the store confirms it.
    #[error("the store did not confirm the write in time; it may still be applied")]
    Unconfirmed,
    /// A write decided on records that another writer of a shared store has changed since
    /// ([`crate::store::Expect`]): nothing of it was stored. Its owner reads the records again
    /// and decides anew; one that gives up answers it as [`DomainError::Unavailable`].
    #[error("the decision was made on records another node has changed since; retry")]
    Superseded,
    /// Too many recent failed secret checks from this address or on this account; nothing was
    /// checked.
    #[error("too many failed attempts; retry in {retry_after_secs} s")]
    Throttled { retry_after_secs: i64 },
    /// The caller already runs as many queries (or history reads) at once as one caller may;
    /// nothing was run.
    #[error(
        "too many requests of this kind by this caller are running; retry in {retry_after_secs} s"
    )]
    Busy { retry_after_secs: i64 },
    /// A broken invariant of the server itself; never the client's doing.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

pub type DomainResult<T> = Result<T, DomainError>;
