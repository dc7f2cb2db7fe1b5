//! Everything a service needs to be built the same way as every other one: layered settings,
//! problem+json errors, JSON validation, service-token and client-token auth, database connection and
//! migrations, health/readiness/metrics/OpenAPI endpoints, request ids, background tasks under one
//! stop signal and one shutdown order.

pub mod auth;
mod batch;
pub mod db;
mod docs;
mod error;
mod extract;
mod health;
pub mod openapi;
mod server;
pub mod settings;

pub use batch::{parse_batch, Batch, BatchEntry, BatchReply};
pub use error::{ApiError, ApiResult, CannedResponse};
pub use extract::{is_absent, parse_json, valid_id, Json};
pub use health::{DatabaseCheck, ReadinessCheck};
pub use server::{
    main, shutdown_signal, RequestId, RunningService, Service, ServiceBuilder, Shed, StopSignal,
};
pub use settings::{AuthSettings, DatabaseSettings, HttpSettings};

/// Re-exported so service crates name one version.
/// The current time truncated to microseconds, the precision PostgreSQL and SQLite both keep, so a
/// value returned before storing equals the same value read back.
pub fn now() -> chrono::DateTime<chrono::Utc> {
    use chrono::SubsecRound;
    chrono::Utc::now().trunc_subsecs(6)
}

pub use actix_web;
/// The global allocator every service binary declares (`#[global_allocator]` in its `main.rs`):
/// glibc's `malloc`/`free` took about 30 % of the Scheduler's CPU at saturation.
pub use mimalloc::MiMalloc;
pub use prometheus;
pub use utoipa;
