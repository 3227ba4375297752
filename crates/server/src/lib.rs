//! twinguard's HTTPS API server: an Azure Digital Twins-compatible data plane.
//!
//! - [`app`]: the router and its layers.
//! - [`http`]: the authenticated caller, bodies, paging, correlation IDs.
//! - [`routes`]: thin handlers, one domain call each.
//! - [`jobs`]: ADT's import and deletion jobs, run in the background.
//! - [`tokens`]: the OAuth 2.0 grants, JWT access tokens and revocation; [`refresh`]: rotating
//!   refresh tokens.
//! - [`datadir`]: what first start generates (CA, keys, the first admin credential).
//! - [`egress`]: the allowlist every outbound connection goes through (NS-4).
//! - [`events`]: event endpoints and the delivery of the change feed to them.
//! - [`mqtt`]: the MQTT subscriber feeding signed telemetry; the device plane's HTTPS
//!   listener is [`app::device_router`].
//! - [`positions`]: store positions as clients see them, sealed.
//! - [`startup`]: [`startup::Application`], the wiring the binary and the tests share;
//!   [`connections`]: how long and how many connections every listener keeps.

pub mod app;
pub mod audit;
pub mod ca;
pub mod connections;
pub mod datadir;
pub mod egress;
pub mod error;
pub mod events;
pub mod external;
pub mod http;
pub mod jobs;
pub mod logging;
pub mod metrics;
pub mod mqtt;
pub mod positions;
pub mod refresh;
pub mod routes;
pub mod siem;
pub mod signing_keys;
pub mod startup;
pub mod tls;
pub mod tokens;
pub mod vault;
