//! Route handlers: each extracts, calls one domain function and maps the result.

pub mod audit;
pub mod ca;
pub mod discovery;
pub mod endpoints;
pub mod eventroutes;
pub mod health;
pub mod identity;
pub mod jobs;
pub mod models;
pub mod query;
pub mod relationships;
pub mod telemetry;
pub mod token;
pub mod twins;

/// Why [`off_the_runtime`] gave no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NoAnswer {
    /// The call panicked.
    Failed,
    /// Not done within [`WRITE_WAIT`](twinguard_core::service::WRITE_WAIT): the call runs on,
    /// and what it commits holds ("may still be applied").
    Late,
}

/// Runs `call` (one that hashes a password or waits for the store) on the blocking pool, in the
/// request's span, so the runtime's threads go on serving whatever the store does; waits for
/// it at most [`WRITE_WAIT`](twinguard_core::service::WRITE_WAIT), the one bound on an
/// unconfirmed write.
pub(crate) async fn off_the_runtime<T: Send + 'static>(
    call: impl FnOnce() -> T + Send + 'static,
) -> Result<T, NoAnswer> {
    let span = tracing::Span::current();
    let task = tokio::task::spawn_blocking(move || {
        let _in_request = span.enter();
        call()
    });
    match tokio::time::timeout(twinguard_core::service::WRITE_WAIT, task).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(_)) => Err(NoAnswer::Failed),
        Err(_) => Err(NoAnswer::Late),
    }
}
