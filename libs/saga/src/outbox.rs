//! The outbox relay: publishes the committed outbox rows of the shards its replica holds, in order,
//! and deletes them once the broker confirmed, fenced by each shard's lease, so only a shard's owner
//! relays its rows. A
//! crash between publish and delete publishes a row again (at-least-once), so consumers dedupe by
//! event id or version.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::time::Instant;

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
    // Reads start past the highest seq published (`Store::outbox_after`), from the start again
    // when the shards held change and every `FROM_START_EVERY`: a write that drew a lower seq
    // and committed after the relay moved past it is published then.
    let mut cursor = Cursor::default();
    loop {
        let fences = held();
        if fences.is_empty() {
            let _ = tokio::time::timeout(poll, wake.notified()).await;
            continue;
        }
        let after = cursor.reading(&fences, Instant::now());
        // `wake` keeps a permit for a commit made while the relay was busy (notify_one), so no
        // commit between the read and the wait is missed.
        let rows = match store.outbox_after(&fences, after, BATCH).await {
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
                cursor.published(&published);
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

/// How often the relay reads its shards' rows from the start instead of past what it published.
const FROM_START_EVERY: Duration = Duration::from_secs(1);

/// Where the relay's next read starts: past the highest seq it published, for the same shards.
#[derive(Default)]
struct Cursor {
    after: i64,
    fences: Vec<Fence>,
    from_start: Option<Instant>,
}

impl Cursor {
    /// The seq a read of `fences` at `now` starts after (0: from the start).
    fn reading(&mut self, fences: &[Fence], now: Instant) -> i64 {
        let due = self
            .from_start
            .is_none_or(|at| now.saturating_duration_since(at) >= FROM_START_EVERY);
        if due || self.fences != fences {
            self.after = 0;
            self.fences = fences.to_vec();
            self.from_start = Some(now);
        }
        self.after
    }

    /// `seqs` were published.
    fn published(&mut self, seqs: &[i64]) {
        if let Some(&max) = seqs.iter().max() {
            self.after = self.after.max(max);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fence(shard: i32, epoch: i64) -> Fence {
        Fence { shard, epoch }
    }

    #[test]
    fn the_cursor_reads_past_what_was_published_and_from_the_start_now_and_then() {
        let t0 = Instant::now();
        let mut c = Cursor::default();
        let held = [fence(0, 1), fence(1, 1)];
        assert_eq!(c.reading(&held, t0), 0, "the first read is from the start");
        c.published(&[7, 9, 8]);
        assert_eq!(c.reading(&held, t0), 9);
        c.published(&[]);
        assert_eq!(c.reading(&held, t0), 9);

        // Another shard held (or one lost): from the start, as its rows may be older.
        let more = [fence(0, 1), fence(1, 1), fence(2, 4)];
        assert_eq!(c.reading(&more, t0), 0);
        c.published(&[12]);
        assert_eq!(c.reading(&more, t0 + FROM_START_EVERY / 2), 12);

        // A row that drew a lower seq and committed late is found by the read from the start.
        let later = t0 + FROM_START_EVERY;
        assert_eq!(c.reading(&more, later), 0);
        c.published(&[5]);
        assert_eq!(c.reading(&more, later), 5);
    }
}
