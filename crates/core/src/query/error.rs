//! Why a query was rejected or stopped.

use std::fmt;

use twinguard_proto::ErrorCode;

/// What kind of failure a [`QueryError`] is; decides the ADT error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum QueryErrorKind {
    /// The text is not a query twinguard understands (syntax, unknown collection, a parse-time
    /// limit such as text length or `IN` list size).
    Syntax,
    /// The query was valid but needed more work than one query may do.
    WorkLimitExceeded,
    /// A continuation token that this server did not issue, or that was altered.
    InvalidContinuation,
    /// The query ran past its deadline.
    DeadlineExceeded,
    /// A broken invariant of the executor (a row that would not serialize); never the
    /// client's doing.
    Internal,
}

/// A rejected or stopped query. `position` is a character offset into the query text, when the
/// problem has a place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryError {
    pub kind: QueryErrorKind,
    pub message: String,
    pub position: Option<usize>,
}

impl QueryError {
    pub(crate) fn syntax(message: impl Into<String>, position: usize) -> Self {
        Self {
            kind: QueryErrorKind::Syntax,
            message: message.into(),
            position: Some(position),
        }
    }

    pub(crate) fn work_limit(message: impl Into<String>) -> Self {
        Self {
            kind: QueryErrorKind::WorkLimitExceeded,
            message: message.into(),
            position: None,
        }
    }

    pub(crate) fn deadline(message: impl Into<String>) -> Self {
        Self {
            kind: QueryErrorKind::DeadlineExceeded,
            message: message.into(),
            position: None,
        }
    }

    pub(crate) fn internal() -> Self {
        Self {
            kind: QueryErrorKind::Internal,
            message: "a result row could not be serialized".into(),
            position: None,
        }
    }

    pub(crate) fn continuation(message: impl Into<String>) -> Self {
        Self {
            kind: QueryErrorKind::InvalidContinuation,
            message: message.into(),
            position: None,
        }
    }

    /// The ADT error code a client sees for this error.
    pub fn code(&self) -> ErrorCode {
        match self.kind {
            QueryErrorKind::Syntax => ErrorCode::SqlQueryError,
            QueryErrorKind::WorkLimitExceeded | QueryErrorKind::DeadlineExceeded => {
                ErrorCode::QueryLimitExceeded
            }
            QueryErrorKind::Internal => ErrorCode::InternalServerError,
            QueryErrorKind::InvalidContinuation => ErrorCode::BadRequest,
        }
    }
}

impl fmt::Display for QueryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some(p) => write!(f, "{} (at position {p})", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for QueryError {}

/// Shortens user text echoed in an error message.
pub(crate) fn excerpt(s: &str) -> String {
    const MAX: usize = 64;
    if s.chars().count() <= MAX {
        s.to_owned()
    } else {
        let mut out: String = s.chars().take(MAX).collect();
        out.push('…');
        out
    }
}
