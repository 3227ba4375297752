//! Prometheus metrics, served at `GET /metrics` to callers holding `twinguard/metrics/read`
//! (the built-in Monitoring role: counts only, no data). The recorder is process-wide.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder once per process; later calls reuse it.
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new().set_buckets_for_metric(
                Matcher::Full("twinguard_http_request_duration_seconds".into()),
                &[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
                    0.075, 0.1, 0.25, 0.5, 1.0,
                ],
            );
            match builder.and_then(|b| b.install_recorder()) {
                Ok(handle) => Some(handle),
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed");
                    None
                }
            }
        })
        .as_ref()
}

/// The current metrics in the Prometheus text format, with the audit trail's gauges read now.
pub fn render(audit: &crate::audit::Audit) -> String {
    let head = audit.log().head();
    metrics::gauge!("twinguard_audit_entries").set(head.size as f64);
    metrics::gauge!("twinguard_audit_unsigned_entries").set(audit.unsigned_entries() as f64);
    metrics::gauge!("twinguard_audit_healthy").set(if audit.healthy() { 1.0 } else { 0.0 });
    metrics::gauge!("twinguard_audit_disk_free_bytes").set(audit.disk_free() as f64);
    install().map(PrometheusHandle::render).unwrap_or_default()
}

/// `twinguard_http_requests_total{method,status}` and the request duration histogram.
pub fn request(method: &axum::http::Method, status: u16, elapsed: std::time::Duration) {
    let class = match status {
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    metrics::counter!("twinguard_http_requests_total", "method" => method.as_str().to_owned(), "status" => class)
        .increment(1);
    metrics::histogram!("twinguard_http_request_duration_seconds").record(elapsed.as_secs_f64());
}

/// How a caller tried to authenticate.
#[derive(Debug, Clone, Copy)]
pub enum Method {
    ClientSecret,
    Password,
    RefreshToken,
    ClientAssertion,
    ClientCertificate,
    Bearer,
    ApiKey,
}

impl Method {
    fn label(self) -> &'static str {
        match self {
            Method::ClientSecret => "client_secret",
            Method::Password => "password",
            Method::RefreshToken => "refresh_token",
            Method::ClientAssertion => "client_assertion",
            Method::ClientCertificate => "client_certificate",
            Method::Bearer => "bearer",
            Method::ApiKey => "api_key",
        }
    }
}

/// `twinguard_auth_failures_total{method}`: a credential or token that was checked and refused.
pub fn auth_failure(method: Method) {
    metrics::counter!("twinguard_auth_failures_total", "method" => method.label()).increment(1);
}

/// `twinguard_auth_throttled_total`: attempts refused unchecked while their address or account
/// backs off.
pub fn auth_throttled() {
    metrics::counter!("twinguard_auth_throttled_total").increment(1);
}

/// `twinguard_connections_closed_total{reason}`: connections the server closed itself, for
/// being over a limit (`limit`) or silent too long (`idle`).
pub fn connection_closed(reason: &'static str) {
    metrics::counter!("twinguard_connections_closed_total", "reason" => reason).increment(1);
}
