//! The journal: saga state, every step attempt and the outbox, written with **group commit**.
//!
//! Many sagas run at once and each must have its progress durable before it moves on. Rather than
//! one transaction per step, writers hand their rows to one task that commits whatever has queued
//! up in a single transaction and then wakes every writer of that batch. Under load one commit
//! carries the steps of hundreds of sagas; alone, a write still commits at once.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr,
    EntityTrait, QueryFilter, QueryOrder, TransactionTrait,
};
use tokio::sync::{mpsc, oneshot};

use crate::entities::{attempt, instance, outbox};

/// How many queued writes one transaction takes at most.
const MAX_GROUP: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal database error: {0}")]
    Database(String),
    #[error("journal writer stopped")]
    Stopped,
    #[error("corrupt journal row: {0}")]
    Corrupt(String),
}

impl From<DbErr> for JournalError {
    fn from(e: DbErr) -> Self {
        JournalError::Database(e.to_string())
    }
}

/// A message to publish once the transaction that wrote it has committed.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxMessage {
    pub destination: String,
    pub key: String,
    pub payload: serde_json::Value,
}

/// Changes to a saga instance.
#[derive(Debug, Clone, Default)]
pub struct InstanceUpdate {
    pub state: Option<String>,
    pub input: Option<serde_json::Value>,
    pub outputs: Option<serde_json::Value>,
    pub next_step: Option<i32>,
    pub error: Option<Option<String>>,
    pub deadline: Option<Option<DateTime<Utc>>>,
    pub version: i64,
    pub at: DateTime<Utc>,
}

/// One row-level change.
#[derive(Debug, Clone)]
pub enum Op {
    /// Inserts the instance unless one with its id exists, and with it the messages announcing
    /// it (only if it was inserted); the write reports whether it did.
    Start(Box<instance::Model>, Vec<OutboxMessage>),
    Update {
        id: String,
        update: InstanceUpdate,
    },
    Attempt(attempt::Model),
    Outbox(OutboxMessage),
}

struct Pending {
    ops: Vec<Op>,
    done: oneshot::Sender<Result<Vec<bool>, JournalError>>,
}

/// The journal of one database.
pub struct Journal {
    db: DatabaseConnection,
    tx: mpsc::Sender<Pending>,
}

impl Journal {
    /// Starts the group-commit writer on `db` (migrated with [`crate::migrations`]).
    pub fn start(db: DatabaseConnection) -> Self {
        let (tx, rx) = mpsc::channel(MAX_GROUP * 4);
        tokio::spawn(writer(db.clone(), rx));
        Self { db, tx }
    }

    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    /// Resolves when the group-commit writer has stopped (it only stops by panicking): nothing
    /// can be journaled any more, and the owner should stop so that a restart resumes its sagas.
    pub async fn stopped(&self) {
        self.tx.closed().await;
    }

    /// Commits `ops` atomically (possibly with other writers' ops in the same transaction) and
    /// returns, for each `Start` op in order, whether it created the instance.
    pub async fn write(&self, ops: Vec<Op>) -> Result<Vec<bool>, JournalError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Pending { ops, done })
            .await
            .map_err(|_| JournalError::Stopped)?;
        wait.await.map_err(|_| JournalError::Stopped)?
    }

    pub async fn load(&self, id: &str) -> Result<Option<instance::Model>, JournalError> {
        Ok(instance::Entity::find_by_id(id.to_owned())
            .one(&self.db)
            .await?)
    }

    /// Replaces the input of a saga that is still `running`, leaving its version and everything
    /// else to the task running it; `false` when the saga is no longer running (or unknown). One
    /// conditional statement, so it can neither move a concurrently written version back nor
    /// flag a saga that has just finished.
    pub async fn set_input_while_running(
        &self,
        id: &str,
        input: &serde_json::Value,
        at: chrono::DateTime<chrono::Utc>,
    ) -> Result<bool, JournalError> {
        let done = instance::Entity::update_many()
            .col_expr(instance::Column::Input, Expr::value(input.to_string()))
            .col_expr(instance::Column::UpdatedAt, Expr::value(at))
            .filter(instance::Column::Id.eq(id))
            .filter(instance::Column::State.eq(crate::RUNNING))
            .exec(&self.db)
            .await?;
        Ok(done.rows_affected == 1)
    }

    /// Sagas of `kind` still `running` on the given shards, oldest first.
    pub async fn unfinished(
        &self,
        kind: &str,
        shards: &[i32],
    ) -> Result<Vec<instance::Model>, JournalError> {
        Ok(instance::Entity::find()
            .filter(instance::Column::Kind.eq(kind))
            .filter(instance::Column::State.eq(crate::RUNNING))
            .filter(instance::Column::Shard.is_in(shards.iter().copied()))
            .order_by_asc(instance::Column::CreatedAt)
            .all(&self.db)
            .await?)
    }

    /// Every attempt of a saga, in order.
    pub async fn attempts(&self, id: &str) -> Result<Vec<attempt::Model>, JournalError> {
        Ok(attempt::Entity::find()
            .filter(attempt::Column::SagaId.eq(id))
            .order_by_asc(attempt::Column::StepIndex)
            .order_by_asc(attempt::Column::Attempt)
            .all(&self.db)
            .await?)
    }
}

async fn writer(db: DatabaseConnection, mut rx: mpsc::Receiver<Pending>) {
    while let Some(first) = rx.recv().await {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(p) => group.push(p),
                Err(_) => break,
            }
        }
        let all: Vec<&[Op]> = group.iter().map(|p| p.ops.as_slice()).collect();
        match commit(&db, &all).await {
            Ok(results) => {
                for (p, created) in group.into_iter().zip(results) {
                    let _ = p.done.send(Ok(created));
                }
            }
            Err(e) if group.len() > 1 => {
                // Keep one bad write from failing its neighbours: commit each on its own.
                tracing::warn!(error = %e, writes = group.len(), "group commit failed, retrying one by one");
                for p in group {
                    let r = commit(&db, &[p.ops.as_slice()]).await;
                    let _ = p.done.send(
                        r.map(|mut v| v.pop().unwrap_or_default())
                            .map_err(JournalError::from),
                    );
                }
            }
            Err(e) => {
                for p in group {
                    let _ = p.done.send(Err(JournalError::Database(e.to_string())));
                }
            }
        }
    }
}

async fn commit(db: &DatabaseConnection, writes: &[&[Op]]) -> Result<Vec<Vec<bool>>, DbErr> {
    let mut attempt = 0;
    loop {
        match try_commit(db, writes).await {
            Ok(r) => return Ok(r),
            // Lock timeouts and serialisation failures pass; give them a moment.
            Err(e) if attempt < 3 && transient(&e) => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(20 << attempt)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

fn transient(e: &DbErr) -> bool {
    matches!(e, DbErr::ConnectionAcquire(_) | DbErr::Conn(_))
        || e.to_string().contains("database is locked")
        || e.to_string().contains("deadlock")
}

async fn try_commit(db: &DatabaseConnection, writes: &[&[Op]]) -> Result<Vec<Vec<bool>>, DbErr> {
    if sea_orm::ConnectionTrait::get_database_backend(db) == DbBackend::Postgres {
        return batched::try_commit(db, writes).await;
    }
    let txn = db.begin().await?;
    let mut results = Vec::with_capacity(writes.len());
    let mut attempts = Vec::new();
    let mut messages = Vec::new();
    for ops in writes {
        let mut created = Vec::new();
        for op in *ops {
            match op {
                Op::Start(m, announce) => {
                    let new = insert_if_absent(&txn, m).await?;
                    if new {
                        messages.extend(announce.iter().map(outbox_row));
                    }
                    created.push(new);
                }
                Op::Update { id, update } => apply_update(&txn, id, update).await?,
                Op::Attempt(a) => attempts.push(attempt::ActiveModel {
                    saga_id: Set(a.saga_id.clone()),
                    step_index: Set(a.step_index),
                    attempt: Set(a.attempt),
                    step: Set(a.step.clone()),
                    outcome: Set(a.outcome.clone()),
                    error: Set(a.error.clone()),
                    started_at: Set(a.started_at),
                    finished_at: Set(a.finished_at),
                }),
                Op::Outbox(m) => messages.push(outbox_row(m)),
            }
        }
        results.push(created);
    }
    for chunk in attempts.chunks(500) {
        attempt::Entity::insert_many(chunk.to_vec())
            .on_conflict(
                OnConflict::columns([
                    attempt::Column::SagaId,
                    attempt::Column::StepIndex,
                    attempt::Column::Attempt,
                ])
                .do_nothing()
                .to_owned(),
            )
            .exec_without_returning(&txn)
            .await?;
    }
    for chunk in messages.chunks(500) {
        outbox::Entity::insert_many(chunk.to_vec())
            .exec_without_returning(&txn)
            .await?;
    }
    txn.commit().await?;
    Ok(results)
}

fn outbox_row(m: &OutboxMessage) -> outbox::ActiveModel {
    outbox::ActiveModel {
        destination: Set(m.destination.clone()),
        key: Set(m.key.clone()),
        payload: Set(m.payload.to_string()),
        created_at: Set(chrono::Utc::now()),
        ..Default::default()
    }
}

async fn insert_if_absent(txn: &DatabaseTransaction, m: &instance::Model) -> Result<bool, DbErr> {
    let n = instance::Entity::insert(instance::ActiveModel {
        id: Set(m.id.clone()),
        kind: Set(m.kind.clone()),
        shard: Set(m.shard),
        state: Set(m.state.clone()),
        input: Set(m.input.clone()),
        outputs: Set(m.outputs.clone()),
        next_step: Set(m.next_step),
        version: Set(m.version),
        error: Set(m.error.clone()),
        deadline: Set(m.deadline),
        created_at: Set(m.created_at),
        updated_at: Set(m.updated_at),
    })
    .on_conflict(
        OnConflict::column(instance::Column::Id)
            .do_nothing()
            .to_owned(),
    )
    .exec_without_returning(txn)
    .await?;
    Ok(n == 1)
}

async fn apply_update(
    txn: &DatabaseTransaction,
    id: &str,
    u: &InstanceUpdate,
) -> Result<(), DbErr> {
    let mut q = instance::Entity::update_many()
        .col_expr(instance::Column::Version, Expr::value(u.version))
        .col_expr(instance::Column::UpdatedAt, Expr::value(u.at));
    if let Some(s) = &u.state {
        q = q.col_expr(instance::Column::State, Expr::value(s.clone()));
    }
    if let Some(i) = &u.input {
        q = q.col_expr(instance::Column::Input, Expr::value(i.to_string()));
    }
    if let Some(o) = &u.outputs {
        q = q.col_expr(instance::Column::Outputs, Expr::value(o.to_string()));
    }
    if let Some(n) = u.next_step {
        q = q.col_expr(instance::Column::NextStep, Expr::value(n));
    }
    if let Some(e) = &u.error {
        q = q.col_expr(instance::Column::Error, Expr::value(e.clone()));
    }
    if let Some(d) = &u.deadline {
        q = q.col_expr(instance::Column::Deadline, Expr::value(*d));
    }
    q.filter(instance::Column::Id.eq(id)).exec(txn).await?;
    Ok(())
}

/// The PostgreSQL group commit: a constant number of statements per transaction, whatever the
/// number of sagas in it. Each kind of row goes in one statement that takes the whole batch as
/// one JSON parameter (`jsonb_to_recordset`), so the statement text never changes (it stays
/// prepared) and a group of hundreds of sagas costs four round trips instead of one per row.
/// SQLite runs in process, where a statement per row costs no round trip: it keeps the plain path.
mod batched {
    use std::collections::{HashMap, HashSet};

    use chrono::{DateTime, SecondsFormat, Utc};
    use sea_orm::{
        ConnectionTrait, DatabaseConnection, DbBackend, DbErr, Statement, TransactionTrait,
    };
    use serde::Serialize;

    use super::{InstanceUpdate, Op, OutboxMessage};
    use crate::entities::instance;

    const INSERT_STARTS: &str = "
INSERT INTO saga_instances (id, kind, shard, state, input, outputs, next_step, version, error,
    deadline, created_at, updated_at)
SELECT id, kind, shard, state, input, outputs, next_step, version, error, deadline, created_at,
    updated_at
FROM ROWS FROM (jsonb_to_recordset($1::jsonb) AS (id text, kind text, shard int, state text,
    input text, outputs text, next_step int, version bigint, error text, deadline timestamptz,
    created_at timestamptz, updated_at timestamptz)) WITH ORDINALITY AS v(id, kind, shard, state,
    input, outputs, next_step, version, error, deadline, created_at, updated_at, ord)
ORDER BY ord
ON CONFLICT (id) DO NOTHING
RETURNING id";

    const UPDATE_INSTANCES: &str = "
UPDATE saga_instances AS s SET
    version = v.version,
    updated_at = v.updated_at,
    state = CASE WHEN v.set_state THEN v.state ELSE s.state END,
    input = CASE WHEN v.set_input THEN v.input ELSE s.input END,
    outputs = CASE WHEN v.set_outputs THEN v.outputs ELSE s.outputs END,
    next_step = CASE WHEN v.set_next_step THEN v.next_step ELSE s.next_step END,
    error = CASE WHEN v.set_error THEN v.error ELSE s.error END,
    deadline = CASE WHEN v.set_deadline THEN v.deadline ELSE s.deadline END
FROM jsonb_to_recordset($1::jsonb) AS v(id text, version bigint, updated_at timestamptz,
    set_state bool, state text, set_input bool, input text, set_outputs bool, outputs text,
    set_next_step bool, next_step int, set_error bool, error text, set_deadline bool,
    deadline timestamptz)
WHERE s.id = v.id";

    const INSERT_ATTEMPTS: &str = "
INSERT INTO saga_attempts (saga_id, step_index, attempt, step, outcome, error, started_at,
    finished_at)
SELECT saga_id, step_index, attempt, step, outcome, error, started_at, finished_at
FROM jsonb_to_recordset($1::jsonb) AS v(saga_id text, step_index int, attempt int, step text,
    outcome text, error text, started_at timestamptz, finished_at timestamptz)
ON CONFLICT (saga_id, step_index, attempt) DO NOTHING";

    /// In the batch's order, so the relay publishes in the order the writers wrote.
    const INSERT_OUTBOX: &str = "
INSERT INTO saga_outbox (destination, key, payload, created_at)
SELECT destination, key, payload, created_at
FROM ROWS FROM (jsonb_to_recordset($1::jsonb) AS (destination text, key text, payload text,
    created_at timestamptz)) WITH ORDINALITY AS v(destination, key, payload, created_at, ord)
ORDER BY ord";

    /// Microseconds, which is what PostgreSQL keeps (truncated, as the driver binds them).
    fn ts(t: &DateTime<Utc>) -> String {
        t.to_rfc3339_opts(SecondsFormat::Micros, true)
    }

    #[derive(Serialize)]
    struct StartRow<'a> {
        id: &'a str,
        kind: &'a str,
        shard: i32,
        state: &'a str,
        input: &'a str,
        outputs: &'a str,
        next_step: i32,
        version: i64,
        error: Option<&'a str>,
        deadline: Option<String>,
        created_at: String,
        updated_at: String,
    }

    impl<'a> StartRow<'a> {
        fn new(m: &'a instance::Model) -> Self {
            Self {
                id: &m.id,
                kind: &m.kind,
                shard: m.shard,
                state: &m.state,
                input: &m.input,
                outputs: &m.outputs,
                next_step: m.next_step,
                version: m.version,
                error: m.error.as_deref(),
                deadline: m.deadline.as_ref().map(ts),
                created_at: ts(&m.created_at),
                updated_at: ts(&m.updated_at),
            }
        }
    }

    #[derive(Serialize)]
    struct UpdateRow<'a> {
        id: &'a str,
        version: i64,
        updated_at: String,
        set_state: bool,
        state: Option<&'a str>,
        set_input: bool,
        input: Option<String>,
        set_outputs: bool,
        outputs: Option<String>,
        set_next_step: bool,
        next_step: Option<i32>,
        set_error: bool,
        error: Option<&'a str>,
        set_deadline: bool,
        deadline: Option<String>,
    }

    impl<'a> UpdateRow<'a> {
        fn new(id: &'a str, u: &'a InstanceUpdate) -> Self {
            Self {
                id,
                version: u.version,
                updated_at: ts(&u.at),
                set_state: u.state.is_some(),
                state: u.state.as_deref(),
                set_input: u.input.is_some(),
                input: u.input.as_ref().map(ToString::to_string),
                set_outputs: u.outputs.is_some(),
                outputs: u.outputs.as_ref().map(ToString::to_string),
                set_next_step: u.next_step.is_some(),
                next_step: u.next_step,
                set_error: u.error.is_some(),
                error: u.error.as_ref().and_then(|e| e.as_deref()),
                set_deadline: u.deadline.is_some(),
                deadline: u.deadline.and_then(|d| d.as_ref().map(ts)),
            }
        }
    }

    #[derive(Serialize)]
    struct AttemptRow<'a> {
        saga_id: &'a str,
        step_index: i32,
        attempt: i32,
        step: &'a str,
        outcome: &'a str,
        error: Option<&'a str>,
        started_at: String,
        finished_at: String,
    }

    #[derive(Serialize)]
    struct OutboxRow<'a> {
        destination: &'a str,
        key: &'a str,
        payload: String,
        created_at: String,
    }

    impl<'a> OutboxRow<'a> {
        fn new(m: &'a OutboxMessage, now: &str) -> Self {
            Self {
                destination: &m.destination,
                key: &m.key,
                payload: m.payload.to_string(),
                created_at: now.to_owned(),
            }
        }
    }

    fn statement(sql: &str, rows: &impl Serialize) -> Result<Statement, DbErr> {
        let json = serde_json::to_string(rows)
            .map_err(|e| DbErr::Custom(format!("encoding a journal batch: {e}")))?;
        Ok(Statement::from_sql_and_values(
            DbBackend::Postgres,
            sql,
            [json.into()],
        ))
    }

    pub(super) async fn try_commit(
        db: &DatabaseConnection,
        writes: &[&[Op]],
    ) -> Result<Vec<Vec<bool>>, DbErr> {
        let now = ts(&Utc::now());
        let mut starts = Vec::new();
        // Per update round: the k-th update of a saga in this batch goes in round k, since one
        // `UPDATE ... FROM` changes a row at most once; rounds run in order.
        let mut rounds: Vec<Vec<UpdateRow<'_>>> = Vec::new();
        let mut seen: HashMap<&str, usize> = HashMap::new();
        let mut attempts = Vec::new();
        // Outbox rows in write order; an announcement of a start waits for its verdict (the
        // index of the start in `starts`).
        let mut messages: Vec<(Option<usize>, &OutboxMessage)> = Vec::new();
        for ops in writes {
            for op in *ops {
                match op {
                    Op::Start(m, announce) => {
                        messages.extend(announce.iter().map(|a| (Some(starts.len()), a)));
                        starts.push(StartRow::new(m));
                    }
                    Op::Update { id, update } => {
                        let round = seen.entry(id.as_str()).or_insert(0);
                        if rounds.len() <= *round {
                            rounds.push(Vec::new());
                        }
                        rounds[*round].push(UpdateRow::new(id, update));
                        *round += 1;
                    }
                    Op::Attempt(a) => attempts.push(AttemptRow {
                        saga_id: &a.saga_id,
                        step_index: a.step_index,
                        attempt: a.attempt,
                        step: &a.step,
                        outcome: &a.outcome,
                        error: a.error.as_deref(),
                        started_at: ts(&a.started_at),
                        finished_at: ts(&a.finished_at),
                    }),
                    Op::Outbox(m) => messages.push((None, m)),
                }
            }
        }
        let txn = db.begin().await?;
        // Which starts inserted their row: the first of each id in the batch, if it was new.
        let mut created = vec![false; starts.len()];
        if !starts.is_empty() {
            let inserted: HashSet<String> = txn
                .query_all(statement(INSERT_STARTS, &starts)?)
                .await?
                .iter()
                .map(|row| row.try_get::<String>("", "id"))
                .collect::<Result<_, _>>()?;
            let mut claimed = HashSet::new();
            for (i, row) in starts.iter().enumerate() {
                created[i] = inserted.contains(row.id) && claimed.insert(row.id);
            }
        }
        for round in &rounds {
            txn.execute(statement(UPDATE_INSTANCES, round)?).await?;
        }
        if !attempts.is_empty() {
            txn.execute(statement(INSERT_ATTEMPTS, &attempts)?).await?;
        }
        let outbox: Vec<OutboxRow<'_>> = messages
            .iter()
            .filter(|(start, _)| start.is_none_or(|i| created[i]))
            .map(|(_, m)| OutboxRow::new(m, &now))
            .collect();
        if !outbox.is_empty() {
            txn.execute(statement(INSERT_OUTBOX, &outbox)?).await?;
        }
        txn.commit().await?;
        // Every write's starts, in order.
        let mut next = 0;
        Ok(writes
            .iter()
            .map(|ops| {
                ops.iter()
                    .filter(|op| matches!(op, Op::Start(..)))
                    .map(|_| {
                        next += 1;
                        created[next - 1]
                    })
                    .collect()
            })
            .collect())
    }
}
