//! Route handlers: each extracts, calls one domain function and maps the result.

pub mod audit;
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
