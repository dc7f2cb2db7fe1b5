//! Typed HTTP clients for the four domain services (Account, Package, Drone, Delivery), as the
//! Scheduler's saga steps and the Supervisor's compensations call them.
//!
//! Every call either returns the decoded wire type or a [`CallError`] that says whether trying
//! again can help (DESIGN §6): connect errors, timeouts, `5xx`, `408` and `429` are
//! [`CallError::Transient`] (with the server's `Retry-After` when it sent one); every other `4xx`
//! and every answer that does not decode is [`CallError::Permanent`], carrying the status and the
//! problem+json `code`. Compensating `DELETE`s treat "no such resource" as done, so the Supervisor
//! can replay them freely. The retry policy itself (backoff, budgets) belongs to the caller.
//!
//! [`Domain`] is the same eight calls as a trait, so a simulation can put in-memory services in
//! place of the HTTP client.
//!
//! Every call also passes the target service's circuit breaker and its cap on concurrent calls
//! (module `protection`, settings [`BreakerSettings`]): while a service fails, calls to it are
//! refused at once with [`CallError::Rejected`] and a `retry_after`, never made.
//!
//! Package registrations, drone reservations and delivery creations made at the same time by
//! different callers are coalesced into batch requests (module `batch`, settings
//! [`BatchSettings`]); each caller still gets its own item's result, as from a single call.

#![warn(missing_docs)]

mod batch;
mod client;
mod domain;
mod error;
mod protection;
mod settings;

pub use client::Downstream;
pub use domain::Domain;
pub use error::CallError;
pub use settings::{BatchSettings, BreakerSettings, DownstreamSettings};
