//! The outbox relay: publishes the committed outbox rows of the shards its replica holds, in order,
//! and deletes them once the broker confirmed, fenced by each shard's lease, so only a shard's owner
//! relays its rows. A
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

/// The shards a relay works for, as their fences, asked before every read.
pub type Held = Arc<dyn Fn() -> Vec<Fence> + Send + Sync>;

/// Relays the rows of `fence.shard` until the fence no longer holds (then returns the refusal) or
/// the task is dropped. `wake` (notified with `notify_one` after commits to the outbox) speeds it
/// up; it also polls every `poll`.
pub async fn relay(
    store: Arc<dyn Store>,
    fence: Fence,
    publisher: Arc<dyn Publisher>,
    wake: Arc<Notify>,
    poll: Duration,
) -> JournalError {
    run(
        store,
        Arc::new(move || vec![fence]),
        publisher,
        wake,
        poll,
        true,
    )
    .await
}

/// One relay for every shard a replica holds (`held`, asked before every read): the rows of the
/// shards whose lease it holds, fenced by their epochs in the statements that read and delete
/// them. Runs until the task is dropped; a shard whose lease went elsewhere simply drops out.
pub async fn relay_held(
    store: Arc<dyn Store>,
    held: Held,
    publisher: Arc<dyn Publisher>,
    wake: Arc<Notify>,
    poll: Duration,
) {
    run(store, held, publisher, wake, poll, false).await;
}

async fn run(
    store: Arc<dyn Store>,
    held: Held,
    publisher: Arc<dyn Publisher>,
    wake: Arc<Notify>,
    poll: Duration,
    stop_when_refused: bool,
) -> JournalError {
    const BATCH: usize = 500;
    const LINGER: Duration = Duration::from_millis(5);
    let mut failures = 0u32;
    loop {
        let fences = held();
        if fences.is_empty() {
            let _ = tokio::time::timeout(poll, wake.notified()).await;
            continue;
        }
        // `wake` keeps a permit for a commit made while the relay was busy (notify_one), so no
        // commit between the read and the wait is missed.
        let rows = match store.outbox_of(&fences, BATCH).await {
            Ok(rows) => rows,
            Err(e @ JournalError::Refused(_)) if stop_when_refused => return e,
            Err(JournalError::Refused(_)) => {
                let _ = tokio::time::timeout(poll, wake.notified()).await;
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "outbox read failed");
                tokio::time::sleep(poll).await;
                continue;
            }
        };
        if rows.is_empty() {
            if tokio::time::timeout(poll, wake.notified()).await.is_ok() {
                // Woken by a commit: let the commits right behind it join this batch (one read,
                // one publish and one delete for many sagas instead of one each).
                tokio::time::sleep(LINGER).await;
            }
            continue;
        }
        // Exactly the rows published are deleted after: a write that drew a lower seq may commit
        // after the read, and its rows, unpublished, must stay.
        let (published, messages): (Vec<i64>, Vec<OutboxMessage>) =
            rows.into_iter().map(|r| (r.seq, r.message)).unzip();
        match publisher.publish(&messages).await {
            Ok(()) => {
                failures = 0;
                match store.outbox_done_of(&fences, &published).await {
                    Ok(()) => {}
                    Err(e @ JournalError::Refused(_)) if stop_when_refused => return e,
                    Err(e) => {
                        tracing::warn!(error = %e, "outbox cleanup failed; rows will be sent again")
                    }
                }
                // A full batch: more are waiting. Otherwise the next commit wakes the relay (or
                // has already left its permit).
                if published.len() < BATCH
                    && tokio::time::timeout(poll, wake.notified()).await.is_ok()
                {
                    tokio::time::sleep(LINGER).await;
                }
            }
            Err(e) => {
                failures += 1;
                let wait = Duration::from_millis(100 * 2u64.pow(failures.min(6)));
                tracing::warn!(error = %e, rows = published.len(), ?wait, "outbox publish failed; will retry");
                tokio::time::sleep(wait).await;
            }
        }
    }
}
