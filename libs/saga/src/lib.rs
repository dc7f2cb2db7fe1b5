//! A small durable-workflow engine. A saga is a list of steps, each an idempotent action with a
//! retry policy; the engine journals every attempt and result through sea-orm (PostgreSQL or
//! SQLite), classifies failures as transient (retried with exponential backoff and jitter within
//! a per-step attempt and time budget, and never past the saga's deadline) or permanent, commits
//! state changes together with the messages announcing them (transactional outbox), and resumes
//! unfinished sagas from their journal. Time comes through [`Clock`], so tests run retries and
//! deadlines on virtual time.
//!
//! Journal writes use group commit (see [`journal`]): thousands of sagas can make progress per
//! second on a database that manages only a few thousand commits per second.

mod clock;
mod engine;
pub mod entities;
pub mod journal;
mod migration;
pub mod outbox;
mod retry;

pub use clock::{Clock, ManualClock, SystemClock};
pub use engine::{Engine, Hooks, Lifecycle, Saga, SagaRecord, Step};
pub use journal::{InstanceUpdate, Journal, JournalError, Op, OutboxMessage};
pub use migration::migrations;
pub use retry::{RetryPolicy, StepError};

/// Engine states of a saga instance.
pub const RUNNING: &str = "running";
pub const COMPLETED: &str = "completed";
pub const FAILED: &str = "failed";
pub const CANCELLED: &str = "cancelled";
