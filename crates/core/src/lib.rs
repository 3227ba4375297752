//! twinguard's domain, free of HTTP and of any storage engine.
//!
//! - [`dtdl`]: DTDL v2/v3 parsing and validation.
//! - [`graph`]: the twin graph and the rules for changing it.
//! - [`query`]: the ADT query language.
//! - [`paging`]: the continuation tokens of list endpoints.
//! - [`auth`]: data actions, built-in roles and access decisions.
//! - [`edit`]: owners' memory that requests read while its edits wait for the store.
//! - [`service`]: the one door into the graph: access checks, snapshots, group commit.
//! - [`store`]: the storage seam that backends implement.
//! - [`text`]: characters that must not reach a person or a log unescaped, and the one grammar
//!   of identifiers.

pub mod access;
pub mod auth;
pub mod clock;
pub mod dtdl;
pub mod dtmi;
pub mod edit;
pub mod error;
pub mod feed;
pub mod follow;
pub mod gate;
pub mod graph;
pub mod identity;
pub mod paging;
pub mod query;
pub mod routes;
pub mod service;
pub mod store;
pub mod text;
pub mod throttle;
