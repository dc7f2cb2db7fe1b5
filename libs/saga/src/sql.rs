//! [`Store`] on PostgreSQL or SQLite through sea-orm, with **group commit**.
//!
//! Many sagas run at once and each must have its progress durable before it moves on. Rather than
//! one transaction per write, writers hand their writes to one task that commits whatever has
//! queued up in a single transaction and then answers every writer of that batch. Each write in
//! the batch still stands alone: it lands only if its fence (shard epoch) and expected version
//! hold, checked by the statements that apply it, and a refused write takes its attempts and
//! outbox rows with it without failing its neighbours.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseConnection, DatabaseTransaction,
    DbBackend, DbErr, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, Statement,
    TransactionTrait,
};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use crate::entities::{attempt, instance, outbox, shard};
use crate::store::{
    Attempt, Change, Fence, JournalError, Lease, LeaseRow, ListFilter, OutboxMessage, OutboxRow,
    Position, RawJson, SagaRecord, Signal, Store, Write, Written,
};

/// How many queued writes one transaction takes at most.
const MAX_GROUP: usize = 512;

struct Pending {
    write: Write,
    done: oneshot::Sender<Result<Written, JournalError>>,
}

/// The store of one database (migrated with [`crate::migrations`]).
pub struct SqlStore {
    db: DatabaseConnection,
    tx: mpsc::Sender<Pending>,
}

impl SqlStore {
    /// Starts the group-commit writer on `db`.
    pub fn start(db: DatabaseConnection) -> Self {
        let (tx, rx) = mpsc::channel(MAX_GROUP * 4);
        tokio::spawn(writer(db.clone(), rx));
        Self { db, tx }
    }
}

pub(crate) fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

pub(crate) fn from_ms(v: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(v).single().unwrap_or_default()
}

fn record(row: instance::Model) -> Result<SagaRecord, JournalError> {
    let input = serde_json::from_str(&row.input)
        .map_err(|e| JournalError::Corrupt(format!("saga {} input: {e}", row.id)))?;
    let outputs = match serde_json::from_str(&row.outputs) {
        Ok(Value::Object(m)) => m,
        _ => return Err(JournalError::Corrupt(format!("saga {} outputs", row.id))),
    };
    let signals: Vec<Signal> = serde_json::from_str(&row.signals)
        .map_err(|e| JournalError::Corrupt(format!("saga {} signals: {e}", row.id)))?;
    Ok(SagaRecord {
        next_step: usize::try_from(row.next_step).unwrap_or(0),
        id: row.id,
        kind: row.kind,
        shard: row.shard,
        state: row.state,
        input,
        outputs,
        version: row.version,
        error: row.error,
        deadline: row.deadline,
        wake_at: row.wake_at_ms.map(from_ms),
        signals,
        created_at: row.created_at,
        updated_at: row.updated_at,
    })
}

/// Outbox rows as messages; an undecodable one is logged and deleted (it can never be sent).
async fn decode_rows(
    db: &DatabaseConnection,
    rows: Vec<outbox::Model>,
) -> Result<Vec<OutboxRow>, JournalError> {
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        match RawJson::parse(r.payload) {
            Ok(payload) => out.push(OutboxRow {
                seq: r.seq,
                message: OutboxMessage {
                    destination: r.destination,
                    key: r.key,
                    payload,
                },
            }),
            Err(e) => {
                tracing::error!(seq = r.seq, error = %e, "dropping undecodable outbox row");
                outbox::Entity::delete_by_id(r.seq).exec(db).await?;
            }
        }
    }
    Ok(out)
}

fn records(rows: Vec<instance::Model>) -> Result<Vec<SagaRecord>, JournalError> {
    rows.into_iter().map(record).collect()
}

fn fenced(fence: Fence) -> sea_orm::Condition {
    sea_orm::Condition::all()
        .add(shard::Column::Shard.eq(fence.shard))
        .add(shard::Column::Epoch.eq(fence.epoch))
}

/// The shards among `fences` whose fence still holds, as a subquery: statements that read or
/// delete a shard's rows check their fence in the statement itself.
fn held(fences: &[Fence]) -> sea_orm::sea_query::SelectStatement {
    sea_orm::sea_query::Query::select()
        .column(shard::Column::Shard)
        .from(shard::Entity)
        .cond_where(
            fences
                .iter()
                .fold(sea_orm::Condition::any(), |c, f| c.add(fenced(*f))),
        )
        .to_owned()
}

/// A stored checkpoint as a position.
fn position(offset: i64, index: i32) -> Position {
    Position {
        offset: u64::try_from(offset).unwrap_or(0),
        index: u32::try_from(index).unwrap_or(0),
    }
}

async fn holds(db: &impl ConnectionTrait, fence: Fence) -> Result<bool, DbErr> {
    Ok(shard::Entity::find()
        .filter(fenced(fence))
        .count(db)
        .await?
        == 1)
}

#[async_trait]
impl Store for SqlStore {
    async fn write(&self, write: Write) -> Result<Written, JournalError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Pending { write, done })
            .await
            .map_err(|_| JournalError::Stopped)?;
        wait.await.map_err(|_| JournalError::Stopped)?
    }

    async fn load(&self, id: &str) -> Result<Option<SagaRecord>, JournalError> {
        instance::Entity::find_by_id(id.to_owned())
            .one(&self.db)
            .await?
            .map(record)
            .transpose()
    }

    async fn attempts(&self, id: &str) -> Result<Vec<Attempt>, JournalError> {
        Ok(attempt::Entity::find()
            .filter(attempt::Column::SagaId.eq(id))
            .order_by_asc(attempt::Column::StepIndex)
            .order_by_asc(attempt::Column::Attempt)
            .all(&self.db)
            .await?
            .into_iter()
            .map(|a| Attempt {
                saga_id: a.saga_id,
                step_index: a.step_index,
                attempt: a.attempt,
                step: a.step,
                outcome: a.outcome,
                error: a.error,
                started_at: a.started_at,
                finished_at: a.finished_at,
            })
            .collect())
    }

    async fn orphans(&self, kind: &str, shard: i32) -> Result<Vec<SagaRecord>, JournalError> {
        records(
            instance::Entity::find()
                .filter(instance::Column::Kind.eq(kind))
                .filter(instance::Column::Shard.eq(shard))
                .filter(instance::Column::State.eq(crate::RUNNING))
                .filter(instance::Column::WakeAtMs.is_null())
                .order_by_asc(instance::Column::CreatedAt)
                .order_by_asc(instance::Column::Id)
                .all(&self.db)
                .await?,
        )
    }

    async fn due(
        &self,
        shard: i32,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<SagaRecord>, JournalError> {
        records(
            instance::Entity::find()
                .filter(instance::Column::Shard.eq(shard))
                .filter(instance::Column::WakeAtMs.lte(ms(now)))
                .order_by_asc(instance::Column::WakeAtMs)
                .order_by_asc(instance::Column::Id)
                .limit(limit as u64)
                .all(&self.db)
                .await?,
        )
    }

    async fn list(&self, f: &ListFilter) -> Result<Vec<SagaRecord>, JournalError> {
        let mut q = instance::Entity::find();
        if let Some(s) = &f.state {
            q = q.filter(instance::Column::State.eq(s.clone()));
        }
        if let Some(s) = f.shard {
            q = q.filter(instance::Column::Shard.eq(s));
        }
        records(
            q.order_by_desc(instance::Column::UpdatedAt)
                .limit(f.limit)
                .all(&self.db)
                .await?,
        )
    }

    async fn acquire(
        &self,
        shard_id: i32,
        owner: &str,
        now: DateTime<Utc>,
        ttl: chrono::Duration,
    ) -> Result<Option<Lease>, JournalError> {
        shard::Entity::insert(shard::ActiveModel {
            shard: Set(shard_id),
            owner: Set(owner.to_owned()),
            epoch: Set(0),
            expires_at_ms: Set(ms(now) - 1000),
            checkpoint_offset: Set(0),
            checkpoint_index: Set(0),
        })
        .on_conflict(
            OnConflict::column(shard::Column::Shard)
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(&self.db)
        .await?;
        // A new epoch waits for every write in flight under the old one (PostgreSQL: each group
        // commit holds its shards' lease rows `FOR KEY SHARE` until it commits, see `batched`;
        // this `FOR UPDATE` is the one row lock that conflicts with it), so no write checked
        // against the old epoch can commit after the new owner starts reading.
        let txn = self.db.begin().await?;
        if self.db.get_database_backend() == DbBackend::Postgres {
            txn.execute(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT 1 FROM saga_shards WHERE shard = $1 FOR UPDATE",
                [shard_id.into()],
            ))
            .await?;
        }
        let taken = shard::Entity::update_many()
            .col_expr(shard::Column::Owner, Expr::value(owner.to_owned()))
            .col_expr(shard::Column::Epoch, Expr::col(shard::Column::Epoch).add(1))
            .col_expr(shard::Column::ExpiresAtMs, Expr::value(ms(now + ttl)))
            .filter(shard::Column::Shard.eq(shard_id))
            .filter(
                shard::Column::ExpiresAtMs
                    .lt(ms(now))
                    .or(shard::Column::Owner.eq(owner)),
            )
            .exec(&txn)
            .await?;
        txn.commit().await?;
        if taken.rows_affected != 1 {
            return Ok(None);
        }
        let row = shard::Entity::find_by_id(shard_id).one(&self.db).await?;
        Ok(row.filter(|r| r.owner == owner).map(|r| Lease {
            shard: shard_id,
            epoch: r.epoch,
            checkpoint: position(r.checkpoint_offset, r.checkpoint_index),
        }))
    }

    async fn renew(
        &self,
        lease: &Lease,
        now: DateTime<Utc>,
        ttl: chrono::Duration,
    ) -> Result<bool, JournalError> {
        let r = shard::Entity::update_many()
            .col_expr(shard::Column::ExpiresAtMs, Expr::value(ms(now + ttl)))
            .filter(fenced(lease.fence()))
            .exec(&self.db)
            .await?;
        Ok(r.rows_affected == 1)
    }

    async fn checkpoint(&self, lease: &Lease, at: Position) -> Result<bool, JournalError> {
        let r = shard::Entity::update_many()
            .col_expr(
                shard::Column::CheckpointOffset,
                Expr::value(i64::try_from(at.offset).unwrap_or(i64::MAX)),
            )
            .col_expr(
                shard::Column::CheckpointIndex,
                Expr::value(i32::try_from(at.index).unwrap_or(i32::MAX)),
            )
            .filter(fenced(lease.fence()))
            .exec(&self.db)
            .await?;
        Ok(r.rows_affected == 1)
    }

    async fn release(&self, lease: &Lease, now: DateTime<Utc>) -> Result<(), JournalError> {
        shard::Entity::update_many()
            .col_expr(shard::Column::ExpiresAtMs, Expr::value(ms(now) - 1000))
            .filter(fenced(lease.fence()))
            .exec(&self.db)
            .await?;
        Ok(())
    }

    async fn leases(&self) -> Result<Vec<LeaseRow>, JournalError> {
        Ok(shard::Entity::find()
            .order_by_asc(shard::Column::Shard)
            .all(&self.db)
            .await?
            .into_iter()
            .map(|r| LeaseRow {
                shard: r.shard,
                owner: r.owner,
                epoch: r.epoch,
                expires_at: from_ms(r.expires_at_ms),
                checkpoint: position(r.checkpoint_offset, r.checkpoint_index),
            })
            .collect())
    }

    async fn outbox(&self, fence: Fence, limit: usize) -> Result<Vec<OutboxRow>, JournalError> {
        self.outbox_of(&[fence], limit).await
    }

    async fn outbox_done(&self, fence: Fence, seqs: &[i64]) -> Result<(), JournalError> {
        // One statement, fenced: a stale relay deletes nothing.
        let r = outbox::Entity::delete_many()
            .filter(outbox::Column::Seq.is_in(seqs.iter().copied()))
            .filter(outbox::Column::Shard.in_subquery(held(&[fence])))
            .exec(&self.db)
            .await?;
        if r.rows_affected == 0 && !seqs.is_empty() && !holds(&self.db, fence).await? {
            return Err(JournalError::stale(fence));
        }
        Ok(())
    }

    async fn outbox_of(
        &self,
        fences: &[Fence],
        limit: usize,
    ) -> Result<Vec<OutboxRow>, JournalError> {
        // One statement for every shard held: a replica's relay costs what one relay did.
        if fences.is_empty() {
            return Err(JournalError::Refused("no shard is held".into()));
        }
        let rows = outbox::Entity::find()
            .filter(outbox::Column::Shard.in_subquery(held(fences)))
            .order_by_asc(outbox::Column::Seq)
            .limit(limit as u64)
            .all(&self.db)
            .await?;
        if rows.is_empty() {
            let any = shard::Entity::find()
                .filter(shard::Column::Shard.in_subquery(held(fences)))
                .count(&self.db)
                .await?;
            if any == 0 {
                return Err(JournalError::Refused("no shard is held any more".into()));
            }
        }
        decode_rows(&self.db, rows).await
    }

    async fn outbox_done_of(&self, fences: &[Fence], seqs: &[i64]) -> Result<(), JournalError> {
        if fences.is_empty() || seqs.is_empty() {
            return Ok(());
        }
        outbox::Entity::delete_many()
            .filter(outbox::Column::Seq.is_in(seqs.iter().copied()))
            .filter(outbox::Column::Shard.in_subquery(held(fences)))
            .exec(&self.db)
            .await?;
        Ok(())
    }

    async fn outbox_backlog(&self) -> Result<u64, JournalError> {
        Ok(outbox::Entity::find().count(&self.db).await?)
    }

    async fn stopped(&self) {
        self.tx.closed().await;
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
        let writes: Vec<&Write> = group.iter().map(|p| &p.write).collect();
        match commit(&db, &writes).await {
            Ok(results) => {
                // The writes go before the answers: a writer then gets back sole hold of what
                // it shared with its write (a start's record) and need not copy it.
                let done: Vec<_> = group.into_iter().map(|p| p.done).collect();
                for (d, r) in done.into_iter().zip(results) {
                    let _ = d.send(r);
                }
            }
            Err(e) if group.len() > 1 => {
                // Keep one bad write from failing its neighbours: commit each on its own.
                tracing::warn!(error = %e, writes = group.len(), "group commit failed, retrying one by one");
                for p in group {
                    let r = commit(&db, &[&p.write]).await;
                    let _ = p.done.send(match r {
                        Ok(mut v) => v.pop().unwrap_or(Err(JournalError::Stopped)),
                        Err(e) => Err(e.into()),
                    });
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

type Results = Vec<Result<Written, JournalError>>;

async fn commit(db: &DatabaseConnection, writes: &[&Write]) -> Result<Results, DbErr> {
    let mut attempt = 0;
    loop {
        let r = if db.get_database_backend() == DbBackend::Postgres {
            batched::try_commit(db, writes).await
        } else {
            try_commit(db, writes).await
        };
        match r {
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

fn signals_json(s: &[Signal]) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "[]".into())
}

/// SQLite runs in process, where a statement per row costs no round trip: each write's
/// conditional statements run first, and its attempts and outbox rows only if they matched.
async fn try_commit(db: &DatabaseConnection, writes: &[&Write]) -> Result<Results, DbErr> {
    let txn = db.begin().await?;
    let mut results = Vec::with_capacity(writes.len());
    for w in writes {
        let r = apply(&txn, w).await?;
        if r.as_ref().is_ok_and(|r| *r != Written::Existed) {
            insert_rows(&txn, w).await?;
        }
        results.push(r);
    }
    txn.commit().await?;
    Ok(results)
}

async fn apply(
    txn: &DatabaseTransaction,
    w: &Write,
) -> Result<Result<Written, JournalError>, DbErr> {
    let backend = txn.get_database_backend();
    match &w.change {
        Change::Start(r) => {
            if r.shard != w.fence.shard {
                return Ok(Err(JournalError::other_shard(w.fence, r.shard)));
            }
            let sql = "INSERT INTO saga_instances (id, kind, shard, state, input, outputs, \
                next_step, version, error, deadline, created_at, updated_at, wake_at_ms, signals) \
                SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ? \
                WHERE EXISTS (SELECT 1 FROM saga_shards WHERE shard = ? AND epoch = ?) \
                ON CONFLICT (id) DO NOTHING";
            let n = txn
                .execute(Statement::from_sql_and_values(
                    backend,
                    sql,
                    [
                        r.id.clone().into(),
                        r.kind.clone().into(),
                        r.shard.into(),
                        r.state.clone().into(),
                        r.input.to_string().into(),
                        serde_json::to_string(&r.outputs)
                            .map_err(|e| DbErr::Custom(format!("saga {} outputs: {e}", r.id)))?
                            .into(),
                        i32::try_from(r.next_step).unwrap_or(i32::MAX).into(),
                        r.version.into(),
                        r.error.clone().into(),
                        r.deadline.into(),
                        r.created_at.into(),
                        r.updated_at.into(),
                        r.wake_at.map(ms).into(),
                        signals_json(&r.signals).into(),
                        w.fence.shard.into(),
                        w.fence.epoch.into(),
                    ],
                ))
                .await?
                .rows_affected();
            if n == 1 {
                return Ok(Ok(Written::Created));
            }
            Ok(if holds(txn, w.fence).await? {
                Ok(Written::Existed)
            } else {
                Err(JournalError::stale(w.fence))
            })
        }
        Change::Update {
            id,
            expected_version,
            update: u,
            at,
        } => {
            let mut q = instance::Entity::update_many()
                .col_expr(instance::Column::Version, Expr::value(expected_version + 1))
                .col_expr(instance::Column::UpdatedAt, Expr::value(*at))
                .col_expr(instance::Column::WakeAtMs, Expr::value(u.wake_at.map(ms)));
            if let Some(s) = &u.state {
                q = q.col_expr(instance::Column::State, Expr::value(s.clone()));
            }
            if let Some(i) = &u.input {
                q = q.col_expr(instance::Column::Input, Expr::value(i.to_string()));
            }
            if let Some(o) = &u.outputs {
                q = q.col_expr(instance::Column::Outputs, Expr::value(o.get()));
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
            if let Some(s) = &u.signals {
                q = q.col_expr(instance::Column::Signals, Expr::value(signals_json(s)));
            }
            let n = q
                .filter(instance::Column::Id.eq(id.clone()))
                .filter(instance::Column::Version.eq(*expected_version))
                .filter(instance::Column::Shard.in_subquery(held(&[w.fence])))
                .exec(txn)
                .await?
                .rows_affected;
            Ok(if n == 1 {
                Ok(Written::Updated)
            } else if holds(txn, w.fence).await? {
                Err(JournalError::Refused(format!(
                    "saga {id} is no longer at version {expected_version}"
                )))
            } else {
                Err(JournalError::stale(w.fence))
            })
        }
    }
}

async fn insert_rows(txn: &DatabaseTransaction, w: &Write) -> Result<(), DbErr> {
    if !w.attempts.is_empty() {
        attempt::Entity::insert_many(w.attempts.iter().map(|a| attempt::ActiveModel {
            saga_id: Set(a.saga_id.clone()),
            step_index: Set(a.step_index),
            attempt: Set(a.attempt),
            step: Set(a.step.clone()),
            outcome: Set(a.outcome.clone()),
            error: Set(a.error.clone()),
            started_at: Set(a.started_at),
            finished_at: Set(a.finished_at),
        }))
        .on_conflict(
            OnConflict::columns([
                attempt::Column::SagaId,
                attempt::Column::StepIndex,
                attempt::Column::Attempt,
            ])
            .do_nothing()
            .to_owned(),
        )
        .exec_without_returning(txn)
        .await?;
    }
    if !w.outbox.is_empty() {
        let now = Utc::now();
        outbox::Entity::insert_many(w.outbox.iter().map(|m| outbox::ActiveModel {
            shard: Set(w.fence.shard),
            destination: Set(m.destination.clone()),
            key: Set(m.key.clone()),
            payload: Set(m.payload.get().to_owned()),
            created_at: Set(now),
            ..Default::default()
        }))
        .exec_without_returning(txn)
        .await?;
    }
    Ok(())
}

/// The PostgreSQL group commit. Each kind of row goes in as one JSON parameter
/// (`json_to_recordset`), so the statement text never changes (it stays prepared) whatever the
/// number of sagas in the group. A saga's input and outputs and a message's payload are JSON values
/// inside that parameter, not strings of JSON: as `json` (not `jsonb`) PostgreSQL hands each one on
/// as the very text the engine wrote, so it is encoded once and never escaped into a string.
///
/// A group whose sagas are all different (the usual case: a saga's engine waits for each of its
/// writes) is **one statement**, committed on its own: one round trip for the whole group. A group that writes one saga k times is k such statements in one
/// transaction, the saga's writes in their order.
///
/// The fence: the group reads the lease rows of its shards `FOR KEY SHARE` and writes only the
/// rows whose fence names the epoch it read. That lock conflicts only with `FOR UPDATE`, which a
/// takeover takes before it raises the epoch (lease renewals and checkpoints change no key column
/// and never wait for it): a takeover waits for a group in flight, and a group that meets a
/// takeover in flight waits for it and then reads the new epoch (PostgreSQL re-reads a locked row
/// that was updated meanwhile), so no write checked against an old epoch commits after the new
/// owner has taken the shard.
mod batched {
    use std::collections::{HashMap, HashSet};

    use chrono::{DateTime, SecondsFormat, Utc};
    use sea_orm::{
        ConnectionTrait, DatabaseConnection, DbBackend, DbErr, Statement, TransactionTrait,
    };
    use serde::Serialize;

    use super::{ms, signals_json, Results};
    use crate::store::{
        Change, InstanceUpdate, JournalError, OutboxMessage, RawJson, SagaRecord, Write, Written,
    };

    /// A whole group of writes to different sagas in one statement: $1 the shards, $2 the starts,
    /// $3 the updates, $4 the attempts and $5 the outbox messages (the last two carry the index
    /// `w` of their write, and land only if that write did). It returns the writes that landed
    /// (`what` = 'w') and the epoch of each shard as locked (`what` = 'e').
    const AT_ONCE: &str = "
WITH fence AS MATERIALIZED (
    SELECT shard, epoch FROM saga_shards
    WHERE shard IN (SELECT value::int FROM json_array_elements_text($1::json))
    ORDER BY shard
    FOR KEY SHARE
),
sv AS MATERIALIZED (
    SELECT * FROM ROWS FROM (json_to_recordset($2::json) AS (w int, id text, kind text,
        shard int, state text, input json, outputs json, next_step int, version bigint,
        error text, deadline timestamptz, created_at timestamptz, updated_at timestamptz,
        wake_at_ms bigint, signals text, epoch bigint)) WITH ORDINALITY AS v(w, id, kind, shard,
        state, input, outputs, next_step, version, error, deadline, created_at, updated_at,
        wake_at_ms, signals, epoch, ord)
),
started AS (
    INSERT INTO saga_instances (id, kind, shard, state, input, outputs, next_step, version, error,
        deadline, created_at, updated_at, wake_at_ms, signals)
    SELECT v.id, v.kind, v.shard, v.state, v.input::text, v.outputs::text, v.next_step,
        v.version, v.error,
        v.deadline, v.created_at, v.updated_at, v.wake_at_ms, v.signals
    FROM sv v JOIN fence f ON f.shard = v.shard AND f.epoch = v.epoch
    ORDER BY v.ord
    ON CONFLICT (id) DO NOTHING
    RETURNING id
),
updated AS (
    UPDATE saga_instances AS s SET
        version = v.expected_version + 1,
        updated_at = v.updated_at,
        wake_at_ms = v.wake_at_ms,
        state = CASE WHEN v.set_state THEN v.state ELSE s.state END,
        input = CASE WHEN v.set_input THEN v.input::text ELSE s.input END,
        outputs = CASE WHEN v.set_outputs THEN v.outputs::text ELSE s.outputs END,
        next_step = CASE WHEN v.set_next_step THEN v.next_step ELSE s.next_step END,
        error = CASE WHEN v.set_error THEN v.error ELSE s.error END,
        deadline = CASE WHEN v.set_deadline THEN v.deadline ELSE s.deadline END,
        signals = CASE WHEN v.set_signals THEN v.signals ELSE s.signals END
    FROM json_to_recordset($3::json) AS v(ord int, id text, expected_version bigint,
        epoch bigint, shard int, updated_at timestamptz, wake_at_ms bigint, set_state bool,
        state text, set_input bool, input json, set_outputs bool, outputs json,
        set_next_step bool, next_step int, set_error bool, error text, set_deadline bool,
        deadline timestamptz, set_signals bool, signals text)
    JOIN fence f ON f.shard = v.shard AND f.epoch = v.epoch
    WHERE s.id = v.id AND s.version = v.expected_version AND s.shard = v.shard
    RETURNING v.ord AS w
),
landed AS (
    SELECT w FROM updated
    UNION ALL
    SELECT v.w FROM sv v JOIN started USING (id)
),
attempts AS (
    INSERT INTO saga_attempts (saga_id, step_index, attempt, step, outcome, error, started_at,
        finished_at)
    SELECT a.saga_id, a.step_index, a.attempt, a.step, a.outcome, a.error, a.started_at,
        a.finished_at
    FROM json_to_recordset($4::json) AS a(w int, saga_id text, step_index int, attempt int,
        step text, outcome text, error text, started_at timestamptz, finished_at timestamptz)
    WHERE a.w IN (SELECT w FROM landed)
    ON CONFLICT (saga_id, step_index, attempt) DO NOTHING
),
outbox AS (
    INSERT INTO saga_outbox (shard, destination, key, payload, created_at)
    SELECT o.shard, o.destination, o.key, o.payload::text, o.created_at
    FROM ROWS FROM (json_to_recordset($5::json) AS (w int, shard int, destination text,
        key text, payload json, created_at timestamptz)) WITH ORDINALITY AS o(w, shard,
        destination, key, payload, created_at, ord)
    WHERE o.w IN (SELECT w FROM landed)
    ORDER BY o.ord
)
SELECT 'w' AS what, w AS n, 0::bigint AS epoch FROM landed
UNION ALL
SELECT 'e', shard, epoch FROM fence";

    fn json(rows: &impl Serialize) -> Result<sea_orm::Value, DbErr> {
        serde_json::to_string(rows)
            .map(Into::into)
            .map_err(|e| DbErr::Custom(format!("encoding a journal batch: {e}")))
    }

    /// Microseconds, which is what PostgreSQL keeps (truncated, as the driver binds them).
    fn ts(t: &DateTime<Utc>) -> String {
        t.to_rfc3339_opts(SecondsFormat::Micros, true)
    }

    #[derive(Serialize)]
    struct StartRow<'a> {
        /// The index of its write in the group.
        w: usize,
        id: &'a str,
        kind: &'a str,
        shard: i32,
        state: &'a str,
        input: &'a serde_json::Value,
        outputs: &'a serde_json::Map<String, serde_json::Value>,
        next_step: i32,
        version: i64,
        error: Option<&'a str>,
        deadline: Option<String>,
        created_at: String,
        updated_at: String,
        wake_at_ms: Option<i64>,
        signals: String,
        epoch: i64,
    }

    impl<'a> StartRow<'a> {
        fn new(w: usize, m: &'a SagaRecord, epoch: i64) -> Self {
            Self {
                w,
                id: &m.id,
                kind: &m.kind,
                shard: m.shard,
                state: &m.state,
                input: &m.input,
                outputs: &m.outputs,
                next_step: i32::try_from(m.next_step).unwrap_or(i32::MAX),
                version: m.version,
                error: m.error.as_deref(),
                deadline: m.deadline.as_ref().map(ts),
                created_at: ts(&m.created_at),
                updated_at: ts(&m.updated_at),
                wake_at_ms: m.wake_at.map(ms),
                signals: signals_json(&m.signals),
                epoch,
            }
        }
    }

    #[derive(Serialize)]
    struct UpdateRow<'a> {
        ord: usize,
        id: &'a str,
        expected_version: i64,
        epoch: i64,
        shard: i32,
        updated_at: String,
        wake_at_ms: Option<i64>,
        set_state: bool,
        state: Option<&'a str>,
        set_input: bool,
        input: Option<&'a serde_json::Value>,
        set_outputs: bool,
        outputs: Option<&'a RawJson>,
        set_next_step: bool,
        next_step: Option<i32>,
        set_error: bool,
        error: Option<&'a str>,
        set_deadline: bool,
        deadline: Option<String>,
        set_signals: bool,
        signals: Option<String>,
    }

    impl<'a> UpdateRow<'a> {
        #[allow(clippy::too_many_arguments)]
        fn new(
            ord: usize,
            id: &'a str,
            expected_version: i64,
            epoch: i64,
            shard: i32,
            at: &DateTime<Utc>,
            u: &'a InstanceUpdate,
        ) -> Self {
            Self {
                ord,
                id,
                expected_version,
                epoch,
                shard,
                updated_at: ts(at),
                wake_at_ms: u.wake_at.map(ms),
                set_state: u.state.is_some(),
                state: u.state.as_deref(),
                set_input: u.input.is_some(),
                input: u.input.as_ref(),
                set_outputs: u.outputs.is_some(),
                outputs: u.outputs.as_ref(),
                set_next_step: u.next_step.is_some(),
                next_step: u.next_step,
                set_error: u.error.is_some(),
                error: u.error.as_ref().and_then(|e| e.as_deref()),
                set_deadline: u.deadline.is_some(),
                deadline: u.deadline.and_then(|d| d.as_ref().map(ts)),
                set_signals: u.signals.is_some(),
                signals: u.signals.as_deref().map(signals_json),
            }
        }
    }

    #[derive(Serialize)]
    struct AttemptRow<'a> {
        w: usize,
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
        w: usize,
        shard: i32,
        destination: &'a str,
        key: &'a str,
        payload: &'a RawJson,
        created_at: String,
    }

    impl<'a> OutboxRow<'a> {
        fn new(w: usize, shard: i32, m: &'a OutboxMessage, now: &str) -> Self {
            Self {
                w,
                shard,
                destination: &m.destination,
                key: &m.key,
                payload: &m.payload,
                created_at: now.to_owned(),
            }
        }
    }

    /// The rows of a batch of writes to different sagas, each tagged with the index of its write.
    #[derive(Default)]
    struct Rows<'a> {
        shards: Vec<i32>,
        starts: Vec<StartRow<'a>>,
        updates: Vec<UpdateRow<'a>>,
        attempts: Vec<AttemptRow<'a>>,
        outbox: Vec<OutboxRow<'a>>,
    }

    impl<'a> Rows<'a> {
        fn of(writes: &[&'a Write], batch: &[usize], now: &str) -> Self {
            let mut rows = Rows::default();
            for &i in batch {
                let w = writes[i];
                rows.shards.push(w.fence.shard);
                match &w.change {
                    Change::Start(r) => rows.starts.push(StartRow::new(i, r, w.fence.epoch)),
                    Change::Update {
                        id,
                        expected_version,
                        update,
                        at,
                    } => rows.updates.push(UpdateRow::new(
                        i,
                        id,
                        *expected_version,
                        w.fence.epoch,
                        w.fence.shard,
                        at,
                        update,
                    )),
                }
                rows.attempts.extend(w.attempts.iter().map(|a| AttemptRow {
                    w: i,
                    saga_id: &a.saga_id,
                    step_index: a.step_index,
                    attempt: a.attempt,
                    step: &a.step,
                    outcome: &a.outcome,
                    error: a.error.as_deref(),
                    started_at: ts(&a.started_at),
                    finished_at: ts(&a.finished_at),
                }));
                rows.outbox.extend(
                    w.outbox
                        .iter()
                        .map(|m| OutboxRow::new(i, w.fence.shard, m, now)),
                );
            }
            rows.shards.sort_unstable();
            rows.shards.dedup();
            rows
        }
    }

    fn saga_of(w: &Write) -> &str {
        match &w.change {
            Change::Start(r) => &r.id,
            Change::Update { id, .. } => id,
        }
    }

    /// What a write that did not land ran into, given the epoch its shard had under the lock.
    fn not_landed(w: &Write, epochs: &HashMap<i32, i64>) -> Result<Written, JournalError> {
        if epochs.get(&w.fence.shard) != Some(&w.fence.epoch) {
            return Err(JournalError::stale(w.fence));
        }
        match &w.change {
            // The saga was there already: a replay.
            Change::Start(_) => Ok(Written::Existed),
            Change::Update {
                id,
                expected_version,
                ..
            } => Err(JournalError::Refused(format!(
                "saga {id} is no longer at version {expected_version}"
            ))),
        }
    }

    pub(super) async fn try_commit(
        db: &DatabaseConnection,
        writes: &[&Write],
    ) -> Result<Results, DbErr> {
        let now = ts(&Utc::now());
        let mut results: Results = vec![Ok(Written::Updated); writes.len()];
        // The k-th write of a saga in this group goes in batch k: one statement changes a row
        // at most once, and a saga's later write must see its earlier one.
        let mut batches: Vec<Vec<usize>> = Vec::new();
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (i, w) in writes.iter().enumerate() {
            if let Change::Start(r) = &w.change {
                if r.shard != w.fence.shard {
                    results[i] = Err(JournalError::other_shard(w.fence, r.shard));
                    continue;
                }
            }
            let k = seen.entry(saga_of(w)).or_insert(0);
            if batches.len() <= *k {
                batches.push(Vec::new());
            }
            batches[*k].push(i);
            *k += 1;
        }
        match batches.as_slice() {
            [] => {}
            [batch] => at_once(db, writes, batch, &now, &mut results).await?,
            // Rare (a control write racing the engine, a replayed start beside its saga's next
            // step): the batches in order, in one transaction.
            _ => {
                let txn = db.begin().await?;
                for batch in &batches {
                    at_once(&txn, writes, batch, &now, &mut results).await?;
                }
                txn.commit().await?;
            }
        }
        Ok(results)
    }

    /// Writes one batch (every write to a different saga) with [`AT_ONCE`] and records each
    /// write's outcome.
    async fn at_once(
        conn: &impl ConnectionTrait,
        writes: &[&Write],
        batch: &[usize],
        now: &str,
        results: &mut Results,
    ) -> Result<(), DbErr> {
        let rows = Rows::of(writes, batch, now);
        let answer = conn
            .query_all(Statement::from_sql_and_values(
                DbBackend::Postgres,
                AT_ONCE,
                [
                    json(&rows.shards)?,
                    json(&rows.starts)?,
                    json(&rows.updates)?,
                    json(&rows.attempts)?,
                    json(&rows.outbox)?,
                ],
            ))
            .await?;
        let mut landed = HashSet::new();
        let mut epochs = HashMap::new();
        for row in &answer {
            let n = row.try_get::<i32>("", "n")?;
            if row.try_get::<String>("", "what")? == "w" {
                landed.insert(usize::try_from(n).unwrap_or(usize::MAX));
            } else {
                epochs.insert(n, row.try_get::<i64>("", "epoch")?);
            }
        }
        for &i in batch {
            let w = writes[i];
            results[i] = if landed.contains(&i) {
                Ok(match w.change {
                    Change::Start(_) => Written::Created,
                    Change::Update { .. } => Written::Updated,
                })
            } else {
                not_landed(w, &epochs)
            };
        }
        Ok(())
    }
}
