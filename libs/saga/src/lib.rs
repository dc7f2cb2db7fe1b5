//! A small durable-workflow engine. A saga is a list of steps, each an idempotent action with a
//! retry policy; the engine journals every attempt and result, classifies failures as transient
//! (retried with exponential backoff and jitter within a per-step attempt and time budget, and
//! never past the saga's deadline) or permanent, commits state changes together with the messages
//! announcing them (transactional outbox), parks waiting sagas in the journal with a wake-up time
//! (durable timers), applies signals (cancel, change) between steps, and resumes unfinished sagas
//! from their journal. Time comes through [`Clock`], so tests run on virtual time.
//!
//! Storage is the [`Store`] trait: [`SqlStore`] (PostgreSQL or SQLite, group commit) and
//! [`MemoryStore`] (deterministic, for simulations). Every write is fenced by the shard lease's
//! epoch and the saga's version (see [`store`]).

mod clock;
mod engine;
mod entities;
pub mod memory;
mod migration;
pub mod outbox;
mod retry;
mod sql;
pub mod store;

pub use clock::{Clock, ManualClock, SystemClock, TokioClock};
pub use engine::{
    Engine, EngineSettings, Hooks, Inbox, Lifecycle, NoInbox, Saga, SignalAction, Started, Step,
    DEFERRED,
};
pub use memory::MemoryStore;
pub use migration::migrations;
pub use retry::{RetryOverrides, RetryPolicy, StepError};
pub use sql::SqlStore;
pub use store::{
    Attempt, Change, Fence, InstanceUpdate, JournalError, Lease, LeaseRow, ListFilter,
    OutboxMessage, OutboxRow, Position, RawJson, SagaRecord, Signal, Store, Write, Written,
};

/// Engine states of a saga instance.
pub const RUNNING: &str = "running";
pub const COMPLETED: &str = "completed";
pub const FAILED: &str = "failed";
pub const CANCELLED: &str = "cancelled";
