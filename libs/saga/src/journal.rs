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
    ActiveValue::Set, ColumnTrait, DatabaseConnection, DatabaseTransaction, DbErr, EntityTrait,
    QueryFilter, QueryOrder, TransactionTrait,
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
    /// Inserts the instance unless one with its id exists; the write reports whether it did.
    Start(Box<instance::Model>),
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
    let txn = db.begin().await?;
    let mut results = Vec::with_capacity(writes.len());
    let mut attempts = Vec::new();
    let mut messages = Vec::new();
    for ops in writes {
        let mut created = Vec::new();
        for op in *ops {
            match op {
                Op::Start(m) => created.push(insert_if_absent(&txn, m).await?),
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
                Op::Outbox(m) => messages.push(outbox::ActiveModel {
                    destination: Set(m.destination.clone()),
                    key: Set(m.key.clone()),
                    payload: Set(m.payload.to_string()),
                    created_at: Set(chrono::Utc::now()),
                    ..Default::default()
                }),
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
