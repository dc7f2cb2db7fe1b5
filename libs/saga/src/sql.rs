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
use sea_orm::sea_query::extension::postgres::PgFunc;
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseConnection, DatabaseTransaction,
    DbBackend, DbErr, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect,
    RuntimeErr, Statement, TransactionTrait,
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

/// The outbox rows `seqs` names, and no other: a row between them (a write that drew a lower seq
/// and committed late, not published yet) stays. Bounded by the lowest and highest seq named, so
/// the statement reads the named rows through a range of either index, never the deleted rows of
/// the shards held: those stay in the table and its indexes until a vacuum, and a delete that
/// found its rows through the shards' index walked all of them (`pg_stat_statements` at 1,000
/// sagas/s in bench-e2e: 17 buffers per row deleted, a fifth of the Scheduler database's
/// statement time).
/// On PostgreSQL the list is one array parameter, so every batch size is the same statement (as
/// an `IN` list each length was a statement of its own, planned anew on every connection).
fn named(seqs: &[i64], backend: DbBackend) -> sea_orm::Condition {
    let low = seqs.iter().copied().min().unwrap_or(0);
    let high = seqs.iter().copied().max().unwrap_or(-1);
    let list = if backend == DbBackend::Postgres {
        Expr::col(outbox::Column::Seq).eq(PgFunc::any(seqs.to_vec()))
    } else {
        outbox::Column::Seq.is_in(seqs.iter().copied())
    };
    sea_orm::Condition::all()
        .add(outbox::Column::Seq.between(low, high))
        .add(list)
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
            .filter(named(seqs, self.db.get_database_backend()))
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
        self.outbox_after(fences, 0, limit).await
    }

    async fn outbox_after(
        &self,
        fences: &[Fence],
        after: i64,
        limit: usize,
    ) -> Result<Vec<OutboxRow>, JournalError> {
        // One statement for every shard held: a replica's relay costs what one relay did. The
        // lower bound keeps the read off the published rows: deleted, they stay in the table
        // and its indexes until a vacuum, and a read from the start walks all of them (bench-e2e
        // at 500 sagas/s: 12 ms a read, most of the Scheduler database's CPU, and growing).
        if fences.is_empty() {
            return Err(JournalError::Refused("no shard is held".into()));
        }
        let rows = outbox::Entity::find()
            .filter(outbox::Column::Shard.in_subquery(held(fences)))
            .filter(outbox::Column::Seq.gt(after))
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
            .filter(named(seqs, self.db.get_database_backend()))
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
    let mut session = Session::default();
    while let Some(first) = rx.recv().await {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(p) => group.push(p),
                Err(_) => break,
            }
        }
        let writes: Vec<&Write> = group.iter().map(|p| &p.write).collect();
        match commit(&db, &mut session, &writes).await {
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
                    let r = commit(&db, &mut session, &[&p.write]).await;
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

/// The writer's own PostgreSQL session, taken from the pool once and kept. The writer commits
/// one group at a time, so one connection serves it, and keeping it saves what taking one from
/// the pool for every group costs: sqlx tests every connection handed back to its pool with a
/// round trip (`Sync`), one per group commit; and the group statement, prepared and planned per
/// session (PostgreSQL plans the first five executions on each session for their parameters),
/// was prepared and planned again on every connection of the pool in turn, one after another on
/// this task, as load began (bench-e2e at 1,000/s: 66–96 plans and 0.08–0.15 s of PostgreSQL's
/// time, against 6 on one session). After any error the session goes back to the pool (which
/// closes it if it broke) and the next commit takes another; a commit that met a session the
/// server ended runs again on the new one ([`session_ended`]). A pool of one connection is not
/// kept between commits: the store's reads would wait for it until they timed out.
#[derive(Default)]
struct Session {
    held: Option<sea_orm::sqlx::pool::PoolConnection<sea_orm::sqlx::Postgres>>,
}

type Results = Vec<Result<Written, JournalError>>;

async fn commit(
    db: &DatabaseConnection,
    session: &mut Session,
    writes: &[&Write],
) -> Result<Results, DbErr> {
    let mut attempt = 0;
    loop {
        let r = match db {
            DatabaseConnection::SqlxPostgresPoolConnection(_) => {
                commit_held(db, session, writes).await
            }
            _ => try_commit(db, writes).await,
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

/// One PostgreSQL group commit on the writer's session (see [`Session`]).
async fn commit_held(
    db: &DatabaseConnection,
    session: &mut Session,
    writes: &[&Write],
) -> Result<Results, DbErr> {
    let pool = db.get_postgres_connection_pool();
    let conn = match &mut session.held {
        Some(conn) => conn,
        None => session
            .held
            .insert(pool.acquire().await.map_err(batched::db_err)?),
    };
    let r = batched::try_commit(conn, writes).await;
    // A pool of one connection is the store's reads' too: it goes back after every commit.
    if r.is_err() || pool.options().get_max_connections() <= 1 {
        session.held = None;
    }
    r
}

fn transient(e: &DbErr) -> bool {
    matches!(e, DbErr::ConnectionAcquire(_) | DbErr::Conn(_))
        || session_ended(e)
        || e.to_string().contains("database is locked")
        || e.to_string().contains("deadlock")
}

/// The server ended the session the statement went to (`57P01` an administrator or a fast
/// shutdown, `57P02` a crash of another backend, `57P03` a server still starting, `08…` a
/// connection exception). Its first answer being that error, the statement did not commit, and
/// the writer, which has let that session go, runs it again on another.
fn session_ended(e: &DbErr) -> bool {
    let (DbErr::Exec(RuntimeErr::SqlxError(sea_orm::sqlx::Error::Database(db)))
    | DbErr::Query(RuntimeErr::SqlxError(sea_orm::sqlx::Error::Database(db)))) = e
    else {
        return false;
    };
    db.code()
        .is_some_and(|c| c.starts_with("08") || matches!(&*c, "57P01" | "57P02" | "57P03"))
}

fn signals_json(s: &[Signal]) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "[]".into())
}

/// A new saga's outputs as stored.
fn outputs_json(r: &SagaRecord) -> Result<String, DbErr> {
    serde_json::to_string(&r.outputs)
        .map_err(|e| DbErr::Custom(format!("saga {} outputs: {e}", r.id)))
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
                        outputs_json(r)?.into(),
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

/// The PostgreSQL group commit. Each column of each kind of row goes in as one typed array
/// parameter (`unnest`), so the statement text never changes (it stays prepared) whatever the
/// number of sagas in the group, and PostgreSQL reads the rows from binary arrays with no parsing:
/// a saga's input and outputs and a message's payload are text elements, stored as the very text
/// the engine encoded. (Rows as JSON parameters, `json_to_recordset`, cost PostgreSQL a parse of
/// every row and a hash table per row object: most of the statement's time.) The statement runs
/// on the sqlx pool under the sea-orm connection, which binds arrays with NULL elements and
/// borrows the writes' strings instead of copying them.
///
/// A group whose sagas are all different (the usual case: a saga's engine waits for each of its
/// writes) is **one statement**, committed on its own: one round trip for the whole group. A
/// group that writes one saga k times is k such statements in one transaction, the saga's writes
/// in their order.
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

    use chrono::{DateTime, Utc};
    use sea_orm::sqlx::{self, postgres::PgRow, Connection as _, PgConnection, Postgres, Row as _};
    use sea_orm::{ConnAcquireErr, DbErr, RuntimeErr};

    use super::{ms, outputs_json, signals_json, Results};
    use crate::store::{Change, JournalError, Write, Written};

    /// A whole group of writes to different sagas in one statement: $1 the shards; $2–$17 the
    /// starts, $18–$33 the updates, $34–$42 the attempts and $43–$48 the outbox messages, a column
    /// per array. Attempts and messages carry the index `w` of their write and land only if that
    /// write did. An update's NULL state, input, outputs, next step or signals leaves the column
    /// as it is (none of them is ever NULL); error and deadline, which may be set to NULL, come
    /// with a flag. It returns the writes that landed (`what` = 'w') and the epoch of each shard
    /// as locked (`what` = 'e').
    ///
    /// The update finds each saga by its primary key whatever the table's statistics say: the
    /// saga's shard is compared with `IS NOT DISTINCT FROM` (the column is never NULL), which no
    /// index serves. With `s.shard = v.shard`, which the fence's join extends to `s.shard =
    /// f.shard`, the generic plan made on a fresh, empty table probed `saga_instances_shard_wake`
    /// by shard and compared the id of every saga of the shard; a session keeps that plan as the
    /// table grows, and the writer's session made it within its first commits: at 1,000/s its
    /// commits then took longer with every saga, and sagas waited seconds for them.
    pub(super) const AT_ONCE: &str = "
WITH fence AS MATERIALIZED (
    SELECT shard, epoch FROM saga_shards
    WHERE shard = ANY($1::int4[])
    ORDER BY shard
    FOR KEY SHARE
),
sv AS MATERIALIZED (
    SELECT * FROM unnest($2::int4[], $3::text[], $4::text[], $5::int4[], $6::text[], $7::text[],
        $8::text[], $9::int4[], $10::int8[], $11::text[], $12::timestamptz[], $13::timestamptz[],
        $14::timestamptz[], $15::int8[], $16::text[], $17::int8[]) WITH ORDINALITY
        AS v(w, id, kind, shard, state, input, outputs, next_step, version, error, deadline,
        created_at, updated_at, wake_at_ms, signals, epoch, ord)
),
started AS (
    INSERT INTO saga_instances (id, kind, shard, state, input, outputs, next_step, version, error,
        deadline, created_at, updated_at, wake_at_ms, signals)
    SELECT v.id, v.kind, v.shard, v.state, v.input, v.outputs, v.next_step, v.version, v.error,
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
        state = COALESCE(v.state, s.state),
        input = COALESCE(v.input, s.input),
        outputs = COALESCE(v.outputs, s.outputs),
        next_step = COALESCE(v.next_step, s.next_step),
        error = CASE WHEN v.set_error THEN v.error ELSE s.error END,
        deadline = CASE WHEN v.set_deadline THEN v.deadline ELSE s.deadline END,
        signals = COALESCE(v.signals, s.signals)
    FROM unnest($18::int4[], $19::text[], $20::int8[], $21::int8[], $22::int4[],
        $23::timestamptz[], $24::int8[], $25::text[], $26::text[], $27::text[], $28::int4[],
        $29::bool[], $30::text[], $31::bool[], $32::timestamptz[], $33::text[])
        AS v(ord, id, expected_version, epoch, shard, updated_at, wake_at_ms, state, input,
        outputs, next_step, set_error, error, set_deadline, deadline, signals)
    JOIN fence f ON f.shard = v.shard AND f.epoch = v.epoch
    WHERE s.id = v.id AND s.version = v.expected_version AND s.shard IS NOT DISTINCT FROM v.shard
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
    FROM unnest($34::int4[], $35::text[], $36::int4[], $37::int4[], $38::text[], $39::text[],
        $40::text[], $41::timestamptz[], $42::timestamptz[])
        AS a(w, saga_id, step_index, attempt, step, outcome, error, started_at, finished_at)
    WHERE a.w IN (SELECT w FROM landed)
    ON CONFLICT (saga_id, step_index, attempt) DO NOTHING
),
outbox AS (
    INSERT INTO saga_outbox (shard, destination, key, payload, created_at)
    SELECT o.shard, o.destination, o.key, o.payload, $48::timestamptz
    FROM unnest($43::int4[], $44::int4[], $45::text[], $46::text[], $47::text[]) WITH ORDINALITY
        AS o(w, shard, destination, key, payload, ord)
    WHERE o.w IN (SELECT w FROM landed)
    ORDER BY o.ord
)
SELECT 'w' AS what, w AS n, 0::bigint AS epoch FROM landed
UNION ALL
SELECT 'e', shard, epoch FROM fence";

    /// A statement's error as sea-orm reports it (pool timeouts as such, so they are retried).
    pub(super) fn db_err(e: sqlx::Error) -> DbErr {
        match e {
            sqlx::Error::PoolTimedOut => DbErr::ConnectionAcquire(ConnAcquireErr::Timeout),
            sqlx::Error::PoolClosed => DbErr::ConnectionAcquire(ConnAcquireErr::ConnectionClosed),
            e @ (sqlx::Error::Io(_) | sqlx::Error::Tls(_)) => DbErr::Conn(RuntimeErr::SqlxError(e)),
            e => DbErr::Exec(RuntimeErr::SqlxError(e)),
        }
    }

    fn index(i: usize) -> i32 {
        i32::try_from(i).unwrap_or(i32::MAX)
    }

    /// The starts of a batch, a column each.
    #[derive(Default)]
    struct Starts<'a> {
        w: Vec<i32>,
        id: Vec<&'a str>,
        kind: Vec<&'a str>,
        shard: Vec<i32>,
        state: Vec<&'a str>,
        input: Vec<String>,
        outputs: Vec<String>,
        next_step: Vec<i32>,
        version: Vec<i64>,
        error: Vec<Option<&'a str>>,
        deadline: Vec<Option<DateTime<Utc>>>,
        created_at: Vec<DateTime<Utc>>,
        updated_at: Vec<DateTime<Utc>>,
        wake_at_ms: Vec<Option<i64>>,
        signals: Vec<String>,
        epoch: Vec<i64>,
    }

    /// The updates of a batch, a column each (`None`: leave the column as it is).
    #[derive(Default)]
    struct Updates<'a> {
        ord: Vec<i32>,
        id: Vec<&'a str>,
        expected_version: Vec<i64>,
        epoch: Vec<i64>,
        shard: Vec<i32>,
        updated_at: Vec<DateTime<Utc>>,
        wake_at_ms: Vec<Option<i64>>,
        state: Vec<Option<&'a str>>,
        input: Vec<Option<String>>,
        outputs: Vec<Option<&'a str>>,
        next_step: Vec<Option<i32>>,
        set_error: Vec<bool>,
        error: Vec<Option<&'a str>>,
        set_deadline: Vec<bool>,
        deadline: Vec<Option<DateTime<Utc>>>,
        signals: Vec<Option<String>>,
    }

    #[derive(Default)]
    struct Attempts<'a> {
        w: Vec<i32>,
        saga_id: Vec<&'a str>,
        step_index: Vec<i32>,
        attempt: Vec<i32>,
        step: Vec<&'a str>,
        outcome: Vec<&'a str>,
        error: Vec<Option<&'a str>>,
        started_at: Vec<DateTime<Utc>>,
        finished_at: Vec<DateTime<Utc>>,
    }

    #[derive(Default)]
    struct Outbox<'a> {
        w: Vec<i32>,
        shard: Vec<i32>,
        destination: Vec<&'a str>,
        key: Vec<&'a str>,
        payload: Vec<&'a str>,
    }

    /// The rows of a batch of writes to different sagas, each tagged with the index of its write.
    #[derive(Default)]
    struct Rows<'a> {
        shards: Vec<i32>,
        starts: Starts<'a>,
        updates: Updates<'a>,
        attempts: Attempts<'a>,
        outbox: Outbox<'a>,
    }

    impl<'a> Rows<'a> {
        fn of(writes: &[&'a Write], batch: &[usize]) -> Result<Self, DbErr> {
            let mut rows = Rows::default();
            for &i in batch {
                let w = writes[i];
                rows.shards.push(w.fence.shard);
                match &w.change {
                    Change::Start(r) => {
                        let s = &mut rows.starts;
                        s.w.push(index(i));
                        s.id.push(&r.id);
                        s.kind.push(&r.kind);
                        s.shard.push(r.shard);
                        s.state.push(&r.state);
                        s.input.push(r.input.to_string());
                        s.outputs.push(outputs_json(r)?);
                        s.next_step
                            .push(i32::try_from(r.next_step).unwrap_or(i32::MAX));
                        s.version.push(r.version);
                        s.error.push(r.error.as_deref());
                        s.deadline.push(r.deadline);
                        s.created_at.push(r.created_at);
                        s.updated_at.push(r.updated_at);
                        s.wake_at_ms.push(r.wake_at.map(ms));
                        s.signals.push(signals_json(&r.signals));
                        s.epoch.push(w.fence.epoch);
                    }
                    Change::Update {
                        id,
                        expected_version,
                        update: u,
                        at,
                    } => {
                        let s = &mut rows.updates;
                        s.ord.push(index(i));
                        s.id.push(id);
                        s.expected_version.push(*expected_version);
                        s.epoch.push(w.fence.epoch);
                        s.shard.push(w.fence.shard);
                        s.updated_at.push(*at);
                        s.wake_at_ms.push(u.wake_at.map(ms));
                        s.state.push(u.state.as_deref());
                        s.input.push(u.input.as_ref().map(ToString::to_string));
                        s.outputs.push(u.outputs.as_ref().map(|o| o.get()));
                        s.next_step.push(u.next_step);
                        s.set_error.push(u.error.is_some());
                        s.error.push(u.error.as_ref().and_then(|e| e.as_deref()));
                        s.set_deadline.push(u.deadline.is_some());
                        s.deadline.push(u.deadline.flatten());
                        s.signals.push(u.signals.as_deref().map(signals_json));
                    }
                }
                for a in &w.attempts {
                    let s = &mut rows.attempts;
                    s.w.push(index(i));
                    s.saga_id.push(&a.saga_id);
                    s.step_index.push(a.step_index);
                    s.attempt.push(a.attempt);
                    s.step.push(&a.step);
                    s.outcome.push(&a.outcome);
                    s.error.push(a.error.as_deref());
                    s.started_at.push(a.started_at);
                    s.finished_at.push(a.finished_at);
                }
                for m in &w.outbox {
                    let s = &mut rows.outbox;
                    s.w.push(index(i));
                    s.shard.push(w.fence.shard);
                    s.destination.push(&m.destination);
                    s.key.push(&m.key);
                    s.payload.push(m.payload.get());
                }
            }
            rows.shards.sort_unstable();
            rows.shards.dedup();
            Ok(rows)
        }

        fn query(
            &self,
            now: DateTime<Utc>,
        ) -> sqlx::query::Query<'_, Postgres, sqlx::postgres::PgArguments> {
            let (s, u, a, o) = (&self.starts, &self.updates, &self.attempts, &self.outbox);
            sqlx::query(AT_ONCE)
                .bind(&self.shards)
                .bind(&s.w)
                .bind(&s.id)
                .bind(&s.kind)
                .bind(&s.shard)
                .bind(&s.state)
                .bind(&s.input)
                .bind(&s.outputs)
                .bind(&s.next_step)
                .bind(&s.version)
                .bind(&s.error)
                .bind(&s.deadline)
                .bind(&s.created_at)
                .bind(&s.updated_at)
                .bind(&s.wake_at_ms)
                .bind(&s.signals)
                .bind(&s.epoch)
                .bind(&u.ord)
                .bind(&u.id)
                .bind(&u.expected_version)
                .bind(&u.epoch)
                .bind(&u.shard)
                .bind(&u.updated_at)
                .bind(&u.wake_at_ms)
                .bind(&u.state)
                .bind(&u.input)
                .bind(&u.outputs)
                .bind(&u.next_step)
                .bind(&u.set_error)
                .bind(&u.error)
                .bind(&u.set_deadline)
                .bind(&u.deadline)
                .bind(&u.signals)
                .bind(&a.w)
                .bind(&a.saga_id)
                .bind(&a.step_index)
                .bind(&a.attempt)
                .bind(&a.step)
                .bind(&a.outcome)
                .bind(&a.error)
                .bind(&a.started_at)
                .bind(&a.finished_at)
                .bind(&o.w)
                .bind(&o.shard)
                .bind(&o.destination)
                .bind(&o.key)
                .bind(&o.payload)
                .bind(now)
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
        conn: &mut PgConnection,
        writes: &[&Write],
    ) -> Result<Results, DbErr> {
        let now = Utc::now();
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
            [batch] => {
                let rows = Rows::of(writes, batch)?;
                let answer = rows
                    .query(now)
                    .fetch_all(&mut *conn)
                    .await
                    .map_err(db_err)?;
                settle(writes, batch, &answer, &mut results)?;
            }
            // Rare (a control write racing the engine, a replayed start beside its saga's next
            // step): the batches in order, in one transaction.
            _ => {
                let mut txn = conn.begin().await.map_err(db_err)?;
                for batch in &batches {
                    let rows = Rows::of(writes, batch)?;
                    let answer = rows.query(now).fetch_all(&mut *txn).await.map_err(db_err)?;
                    settle(writes, batch, &answer, &mut results)?;
                }
                txn.commit().await.map_err(db_err)?;
            }
        }
        Ok(results)
    }

    /// Records the outcome of each write of `batch` from the statement's answer.
    fn settle(
        writes: &[&Write],
        batch: &[usize],
        answer: &[PgRow],
        results: &mut Results,
    ) -> Result<(), DbErr> {
        let mut landed = HashSet::new();
        let mut epochs = HashMap::new();
        for row in answer {
            let n: i32 = row.try_get("n").map_err(db_err)?;
            let what: &str = row.try_get("what").map_err(db_err)?;
            if what == "w" {
                landed.insert(usize::try_from(n).unwrap_or(usize::MAX));
            } else {
                epochs.insert(n, row.try_get::<i64, _>("epoch").map_err(db_err)?);
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

#[cfg(test)]
mod tests {
    struct Migrator;

    impl sea_orm_migration::MigratorTrait for Migrator {
        fn migrations() -> Vec<Box<dyn sea_orm_migration::MigrationTrait>> {
            crate::migrations()
        }
    }

    /// The parameter types of the group statement, in order.
    const AT_ONCE_TYPES: &str = "int4[], int4[], text[], text[], int4[], text[], text[], text[], \
        int4[], int8[], text[], timestamptz[], timestamptz[], timestamptz[], int8[], text[], \
        int8[], int4[], text[], int8[], int8[], int4[], timestamptz[], int8[], text[], text[], \
        text[], int4[], bool[], text[], bool[], timestamptz[], text[], int4[], text[], int4[], \
        int4[], text[], text[], text[], timestamptz[], timestamptz[], int4[], int4[], text[], \
        text[], text[], timestamptz";

    /// The group statement's generic plan (what the writer's session prepares once and keeps
    /// while the journal grows), made on a fresh database whose tables were never analysed: each
    /// update finds its saga by the primary key, never among every saga of its shard.
    #[tokio::test]
    async fn the_group_commit_finds_each_saga_by_its_key_on_a_fresh_table() {
        let args = vec!["NULL"; 48].join(", ");
        let plan =
            test_support::generic_plan::<Migrator>(AT_ONCE_TYPES, super::batched::AT_ONCE, &args)
                .await;
        let update = plan
            .split("CTE updated")
            .nth(1)
            .and_then(|rest| rest.split("CTE landed").next())
            .unwrap_or_default();
        assert!(
            update.contains("using saga_instances_pkey on saga_instances s")
                && !update.contains("saga_instances_shard_wake")
                && !update.contains("Seq Scan on saga_instances"),
            "{plan}"
        );
    }
}
