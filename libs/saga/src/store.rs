//! What the engine needs from storage, as one trait with two implementations: [`crate::SqlStore`]
//! (PostgreSQL or SQLite through sea-orm, group commit) and [`crate::MemoryStore`] (in process,
//! deterministic, for simulations). One conformance suite (`tests/store.rs`) runs against both.
//!
//! Shards (a log partition, say) are owned through a lease whose **epoch** grows with every change
//! of owner. Every write of saga state carries a [`Fence`] (shard and epoch) and, for an update, the
//! version it expects: the store applies the write only if both still hold, atomically with the
//! attempts and outbox rows that come with it, and refuses it otherwise. So a stale owner's write
//! never lands and a saga's version never goes backwards.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// Why the journal could not do what was asked.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JournalError {
    #[error("journal database error: {0}")]
    Database(String),
    #[error("journal writer stopped")]
    Stopped,
    #[error("corrupt journal row: {0}")]
    Corrupt(String),
    /// The fence no longer holds (another owner took the shard) or the saga moved on since it was
    /// read: nothing was written, and the writer must stop working on the shard.
    #[error("write refused: {0}")]
    Refused(String),
}

impl JournalError {
    /// The fence's epoch is no longer the shard's.
    pub fn stale(fence: Fence) -> Self {
        JournalError::Refused(format!(
            "shard {} is no longer held at epoch {}",
            fence.shard, fence.epoch
        ))
    }

    /// A lease on one shard gives no right to write another shard's sagas.
    pub fn other_shard(fence: Fence, saga_shard: i32) -> Self {
        JournalError::Refused(format!(
            "a lease on shard {} does not fence a saga of shard {saga_shard}",
            fence.shard
        ))
    }
}

impl From<sea_orm::DbErr> for JournalError {
    fn from(e: sea_orm::DbErr) -> Self {
        JournalError::Database(e.to_string())
    }
}

/// The owner's claim a write carries: the shard and the lease epoch it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fence {
    pub shard: i32,
    pub epoch: i64,
}

/// A place in a shard's input: the offset of a broker message and the index of an event in it.
/// A checkpoint is the first position not yet durably recorded.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Position {
    pub offset: u64,
    pub index: u32,
}

/// A lease held: the fence to write with and where reading resumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub shard: i32,
    pub epoch: i64,
    pub checkpoint: Position,
}

impl Lease {
    pub fn fence(&self) -> Fence {
        Fence {
            shard: self.shard,
            epoch: self.epoch,
        }
    }
}

/// A lease as stored (status pages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRow {
    pub shard: i32,
    pub owner: String,
    pub epoch: i64,
    pub expires_at: DateTime<Utc>,
    pub checkpoint: Position,
}

/// A request from outside (cancel, reschedule) that the saga applies itself between steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Signal {
    pub kind: String,
    pub payload: Value,
    pub at: DateTime<Utc>,
    /// Where it came from in the shard's input, so the reader can move its checkpoint once the
    /// signal is durable. Not stored.
    #[serde(skip)]
    pub position: Option<Position>,
}

/// A saga as the engine and its steps see it.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaRecord {
    pub id: String,
    pub kind: String,
    pub shard: i32,
    pub state: String,
    pub input: Value,
    /// Outputs of succeeded steps, by step name.
    pub outputs: Map<String, Value>,
    pub next_step: usize,
    /// Grows by one with every write; lifecycle events carry it.
    pub version: i64,
    pub error: Option<String>,
    /// No step starts after this instant; the saga fails instead.
    pub deadline: Option<DateTime<Utc>>,
    /// A parked saga's wake-up time (a durable timer); also set to "now" when a signal waits.
    pub wake_at: Option<DateTime<Utc>>,
    /// Signals recorded but not yet applied.
    pub signals: Vec<Signal>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl SagaRecord {
    pub fn is_finished(&self) -> bool {
        self.state != crate::RUNNING
    }
}

/// One step attempt, as journaled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub saga_id: String,
    pub step_index: i32,
    pub attempt: i32,
    pub step: String,
    /// `succeeded`, `transient` or `permanent`.
    pub outcome: String,
    pub error: Option<String>,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
}

/// JSON kept as its text: encoded once where it is made and handed on as it is (into the journal's
/// statements, out of the outbox to the broker) instead of as a tree of values that each hop
/// copies and encodes again. Always valid JSON (made by encoding, or checked when read).
#[derive(Debug, Clone, Serialize)]
#[serde(transparent)]
pub struct RawJson(Box<RawValue>);

impl RawJson {
    /// `value` encoded.
    pub fn encode(value: &impl Serialize) -> Result<Self, serde_json::Error> {
        serde_json::value::to_raw_value(value).map(Self)
    }

    /// Text read back (from the journal), checked to be JSON.
    pub fn parse(text: String) -> Result<Self, serde_json::Error> {
        RawValue::from_string(text).map(Self)
    }

    /// The JSON text.
    pub fn get(&self) -> &str {
        self.0.get()
    }

    /// Decoded into a tree of values (for tests and the rare reader that needs one).
    pub fn value(&self) -> Value {
        serde_json::from_str(self.get()).unwrap_or(Value::Null)
    }
}

impl PartialEq for RawJson {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

/// A message to publish once the write that carries it has committed.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxMessage {
    pub destination: String,
    pub key: String,
    /// The message as it goes to the broker (for the application's messages, an encoded
    /// envelope).
    pub payload: RawJson,
}

/// An outbox row waiting for the relay.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRow {
    pub seq: i64,
    pub message: OutboxMessage,
}

/// Fields of a saga instance to change. `wake_at` is always written: a write that does not park
/// the saga clears its timer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InstanceUpdate {
    pub state: Option<String>,
    pub input: Option<Value>,
    /// The saga's outputs (an object), encoded: the engine encodes its record's map once for
    /// the write instead of copying it.
    pub outputs: Option<RawJson>,
    pub next_step: Option<i32>,
    pub error: Option<Option<String>>,
    pub deadline: Option<Option<DateTime<Utc>>>,
    pub signals: Option<Vec<Signal>>,
    pub wake_at: Option<DateTime<Utc>>,
}

/// The change to the saga row a write makes.
#[allow(clippy::large_enum_variant)] // short-lived, one per write
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Inserts the saga unless one with its id exists (a replay: nothing is written then). Shared
    /// with the engine, which takes its record back once the write is done (a store holds on to
    /// it no longer than the write), so a start copies no record.
    Start(Arc<SagaRecord>),
    /// Moves the saga from `expected_version` to `expected_version + 1`.
    Update {
        id: String,
        expected_version: i64,
        update: InstanceUpdate,
        at: DateTime<Utc>,
    },
}

/// One atomic write: the saga change with its attempts and the messages announcing it.
#[derive(Debug, Clone, PartialEq)]
pub struct Write {
    pub fence: Fence,
    pub change: Change,
    pub attempts: Vec<Attempt>,
    pub outbox: Vec<OutboxMessage>,
}

/// What a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    Created,
    /// A start whose saga existed already: nothing written.
    Existed,
    Updated,
}

/// Filter of [`Store::list`].
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub state: Option<String>,
    pub shard: Option<i32>,
    pub limit: u64,
}

/// The journal, the shard leases and the outbox of one database.
#[async_trait]
pub trait Store: Send + Sync {
    /// Applies `write` atomically if its fence holds (and, for an update, the saga is still at the
    /// expected version); [`JournalError::Refused`] otherwise, with nothing written.
    async fn write(&self, write: Write) -> Result<Written, JournalError>;

    async fn load(&self, id: &str) -> Result<Option<SagaRecord>, JournalError>;

    /// Every attempt of a saga, in order.
    async fn attempts(&self, id: &str) -> Result<Vec<Attempt>, JournalError>;

    /// Running sagas of `shard` without a timer: they were running when the shard's previous owner
    /// stopped. Oldest first.
    async fn orphans(&self, kind: &str, shard: i32) -> Result<Vec<SagaRecord>, JournalError>;

    /// Sagas of `shard` whose timer is due at `now` (parked, or with a signal waiting), earliest
    /// first, at most `limit`.
    async fn due(
        &self,
        shard: i32,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<SagaRecord>, JournalError>;

    /// Sagas, most recently updated first.
    async fn list(&self, filter: &ListFilter) -> Result<Vec<SagaRecord>, JournalError>;

    /// Takes the lease of `shard` if it is free, expired, or already `owner`'s; the epoch grows.
    async fn acquire(
        &self,
        shard: i32,
        owner: &str,
        now: DateTime<Utc>,
        ttl: chrono::Duration,
    ) -> Result<Option<Lease>, JournalError>;

    /// Extends the lease; false when another owner has taken it.
    async fn renew(
        &self,
        lease: &Lease,
        now: DateTime<Utc>,
        ttl: chrono::Duration,
    ) -> Result<bool, JournalError>;

    /// Moves the checkpoint, fenced; false when the lease was lost.
    async fn checkpoint(&self, lease: &Lease, at: Position) -> Result<bool, JournalError>;

    /// Gives the lease up (it expires at once), fenced.
    async fn release(&self, lease: &Lease, now: DateTime<Utc>) -> Result<(), JournalError>;

    /// Every lease (status pages, tests).
    async fn leases(&self) -> Result<Vec<LeaseRow>, JournalError>;

    /// Up to `limit` outbox rows of the fence's shard in write order; refused when the fence no
    /// longer holds.
    async fn outbox(&self, fence: Fence, limit: usize) -> Result<Vec<OutboxRow>, JournalError>;

    /// Deletes published rows, fenced.
    async fn outbox_done(&self, fence: Fence, seqs: &[i64]) -> Result<(), JournalError>;

    /// [`Store::outbox`] for several shards at once (one relay for every shard a replica holds):
    /// the rows of the shards whose fence holds, in write order; refused when none holds.
    async fn outbox_of(
        &self,
        fences: &[Fence],
        limit: usize,
    ) -> Result<Vec<OutboxRow>, JournalError> {
        let mut out = Vec::new();
        let mut held = false;
        for f in fences {
            match self.outbox(*f, limit).await {
                Ok(rows) => {
                    held = true;
                    out.extend(rows);
                }
                Err(JournalError::Refused(_)) => {}
                Err(e) => return Err(e),
            }
        }
        if !held {
            return Err(JournalError::Refused("no shard is held".into()));
        }
        out.sort_by_key(|r| r.seq);
        out.truncate(limit);
        Ok(out)
    }

    /// [`Store::outbox_of`] past `after` (the highest seq the caller has published): up to
    /// `limit` rows with a greater seq of the shards whose fence holds, in write order; refused
    /// when none holds. A store whose deleted rows stay behind until they are vacuumed
    /// (PostgreSQL) starts its read at `after` and never walks past them again; the relay also
    /// reads from lower seqs now and then (a second back, and from 0 once a minute), for a row
    /// that drew a lower seq and committed after the relay had moved past it. The default
    /// filters what [`Store::outbox_of`] reads.
    async fn outbox_after(
        &self,
        fences: &[Fence],
        after: i64,
        limit: usize,
    ) -> Result<Vec<OutboxRow>, JournalError> {
        let mut rows = self.outbox_of(fences, limit).await?;
        rows.retain(|r| r.seq > after);
        Ok(rows)
    }

    /// [`Store::outbox_done`] for several shards: deletes the published rows of the shards whose
    /// fence holds.
    async fn outbox_done_of(&self, fences: &[Fence], seqs: &[i64]) -> Result<(), JournalError> {
        for f in fences {
            match self.outbox_done(*f, seqs).await {
                Ok(()) | Err(JournalError::Refused(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Rows waiting to be published, all shards.
    async fn outbox_backlog(&self) -> Result<u64, JournalError>;

    /// Resolves when the store can no longer write (its writer died); never for most stores.
    async fn stopped(&self) {
        std::future::pending::<()>().await
    }
}
