//! The outbox relay: publishes committed outbox rows in order and deletes them once the broker
//! confirmed. A crash between publish and delete publishes a row again (at-least-once), so
//! consumers dedupe by event id or version.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
use tokio::sync::Notify;

use crate::entities::outbox;
use crate::journal::OutboxMessage;

/// Where outbox messages go (the application maps destinations to logs and queues).
#[async_trait]
pub trait Publisher: Send + Sync {
    /// Publishes a batch, all confirmed, or returns why not (the batch is retried later).
    async fn publish(&self, messages: &[OutboxMessage]) -> Result<(), String>;
}

/// Relays until the task is dropped. `wake` speeds it up after commits; it also polls.
pub async fn relay(
    db: DatabaseConnection,
    publisher: Arc<dyn Publisher>,
    wake: Arc<Notify>,
    poll: Duration,
) {
    let mut failures = 0u32;
    loop {
        let rows = outbox::Entity::find()
            .order_by_asc(outbox::Column::Seq)
            .limit(500)
            .all(&db)
            .await;
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "outbox read failed");
                tokio::time::sleep(poll).await;
                continue;
            }
        };
        if rows.is_empty() {
            let _ = tokio::time::timeout(poll, wake.notified()).await;
            continue;
        }
        let mut messages = Vec::with_capacity(rows.len());
        for r in &rows {
            match serde_json::from_str(&r.payload) {
                Ok(payload) => messages.push(OutboxMessage {
                    destination: r.destination.clone(),
                    key: r.key.clone(),
                    payload,
                }),
                Err(e) => {
                    tracing::error!(seq = r.seq, error = %e, "dropping undecodable outbox row")
                }
            }
        }
        match publisher.publish(&messages).await {
            Ok(()) => {
                failures = 0;
                // Exactly the rows published. Not "every seq up to the last one": a transaction
                // that drew a lower seq may commit after this read, and its rows, unpublished,
                // would go with them.
                let published: Vec<i64> = rows.iter().map(|r| r.seq).collect();
                if let Err(e) = outbox::Entity::delete_many()
                    .filter(outbox::Column::Seq.is_in(published))
                    .exec(&db)
                    .await
                {
                    tracing::warn!(error = %e, "outbox cleanup failed; rows will be sent again");
                }
            }
            Err(e) => {
                failures += 1;
                let wait = Duration::from_millis(100 * 2u64.pow(failures.min(6)));
                tracing::warn!(error = %e, rows = rows.len(), ?wait, "outbox publish failed; will retry");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Rows waiting to be published (for metrics).
pub async fn backlog(db: &DatabaseConnection) -> Result<u64, sea_orm::DbErr> {
    use sea_orm::PaginatorTrait;
    outbox::Entity::find()
        .filter(outbox::Column::Seq.gt(0))
        .count(db)
        .await
}
