//! Prometheus metrics, served at `GET /metrics` to callers holding `twinguard/metrics/read`
//! (the built-in Monitoring role: counts only, no data). The recorder is process-wide.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder once per process; later calls reuse it.
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| match PrometheusBuilder::new().install_recorder() {
            Ok(handle) => Some(handle),
            Err(e) => {
                tracing::warn!(error = %e, "metrics recorder not installed");
                None
            }
        })
        .as_ref()
}

/// The current metrics in the Prometheus text format.
pub fn render() -> String {
    install().map(PrometheusHandle::render).unwrap_or_default()
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
