//! The outbox relay of one shard: publishes the shard's committed outbox rows in order and deletes
//! them once the broker confirmed, fenced by the shard's lease, so only its owner relays them. A
//! crash between publish and delete publishes a row again (at-least-once), so consumers dedupe by
//! event id or version.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;

use crate::store::{Fence, JournalError, OutboxMessage, Store};

/// Where outbox messages go (the application maps destinations to logs and queues).
#[async_trait]
pub trait Publisher: Send + Sync {
    /// Publishes a batch, all confirmed, or returns why not (the batch is retried later).
    async fn publish(&self, messages: &[OutboxMessage]) -> Result<(), String>;
}

/// Relays the rows of `fence.shard` until the fence no longer holds (then returns the refusal) or
/// the task is dropped. `wake` (notified with `notify_one` after commits to the shard's outbox)
/// speeds it up; it also polls every `poll`.
pub async fn relay(
    store: Arc<dyn Store>,
    fence: Fence,
    publisher: Arc<dyn Publisher>,
    wake: Arc<Notify>,
    poll: Duration,
) -> JournalError {
    let mut failures = 0u32;
    loop {
        // `wake` keeps a permit for a commit made while the relay was busy (notify_one), so no
        // commit between the read and the wait is missed.
        let rows = match store.outbox(fence, 500).await {
            Ok(rows) => rows,
            Err(e @ JournalError::Refused(_)) => return e,
            Err(e) => {
                tracing::warn!(shard = fence.shard, error = %e, "outbox read failed");
                tokio::time::sleep(poll).await;
                continue;
            }
        };
        if rows.is_empty() {
            let _ = tokio::time::timeout(poll, wake.notified()).await;
            continue;
        }
        let messages: Vec<OutboxMessage> = rows.iter().map(|r| r.message.clone()).collect();
        match publisher.publish(&messages).await {
            Ok(()) => {
                failures = 0;
                // Exactly the rows published: a write that drew a lower seq may commit after the
                // read, and its rows, unpublished, must stay.
                let published: Vec<i64> = rows.iter().map(|r| r.seq).collect();
                match store.outbox_done(fence, &published).await {
                    Ok(()) => {}
                    Err(e @ JournalError::Refused(_)) => return e,
                    Err(e) => {
                        tracing::warn!(error = %e, "outbox cleanup failed; rows will be sent again")
                    }
                }
            }
            Err(e) => {
                failures += 1;
                let wait = Duration::from_millis(100 * 2u64.pow(failures.min(6)));
                tracing::warn!(shard = fence.shard, error = %e, rows = rows.len(), ?wait, "outbox publish failed; will retry");
                tokio::time::sleep(wait).await;
            }
        }
    }
}
