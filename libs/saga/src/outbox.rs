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

/// How a relay paces its reads.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// How often an idle relay looks for rows; a commit wakes it sooner.
    pub poll: Duration,
    /// How long a relay woken by a commit waits before it reads, so that the commits right
    /// behind it join the read: under load each read, publish and delete then carries many
    /// sagas' rows (fewer, fuller broker messages, and fewer deliveries for every reader of the
    /// log). Events reach the broker that much later; no saga waits for it (a saga's steps wait
    /// only for its journal writes).
    pub linger: Duration,
}

/// Relays the rows of `fence.shard` until the fence no longer holds (then returns the refusal) or
/// the task is dropped. `wake` (notified with `notify_one` after commits to the outbox) speeds it
/// up; it also polls, as `pace` says.
pub async fn relay(
    store: Arc<dyn Store>,
    fence: Fence,
    publisher: Arc<dyn Publisher>,
    wake: Arc<Notify>,
    pace: Pace,
) -> JournalError {
    run(
        store,
        Arc::new(move || vec![fence]),
        publisher,
        wake,
        pace,
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
    pace: Pace,
) {
    run(store, held, publisher, wake, pace, false).await;
}

async fn run(
    store: Arc<dyn Store>,
    held: Held,
    publisher: Arc<dyn Publisher>,
    wake: Arc<Notify>,
    pace: Pace,
    stop_when_refused: bool,
) -> JournalError {
    const BATCH: usize = 500;
    let poll = pace.poll;
    let mut failures = 0u32;
    // Reads start past the highest seq published (`Store::outbox_after`); see `Cursor` for the
    // reads that look back, for a write that drew a lower seq and committed after the relay had
    // moved past it.
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
                tokio::time::sleep(pace.linger).await;
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
                    tokio::time::sleep(pace.linger).await;
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

/// How often the relay looks back (see [`Cursor`]).
const LOOK_BACK_EVERY: Duration = Duration::from_secs(1);

/// Every how many looks back one reads from the very start.
const FROM_START_EVERY: u32 = 60;

/// Where the relay's next read starts: past the highest seq it published, for the same shards.
///
/// A write draws its seqs in its statement and commits a moment later, so a write that drew a
/// lower seq may commit after the relay has read (and moved past) a higher one. Every
/// [`LOOK_BACK_EVERY`] a read therefore starts where the cursor stood one look back earlier,
/// which finds any row that committed within that long of drawing its seq (a write commits
/// within milliseconds), and every [`FROM_START_EVERY`] looks back a read starts from the very
/// start, for a write that took longer. The look back reads only the last second's deleted
/// rows; a read from the start walks all of them (PostgreSQL keeps them until a vacuum), once a
/// minute. Reads start from the start also when the shards held change (a shard taken over
/// brings older rows).
#[derive(Default)]
struct Cursor {
    after: i64,
    fences: Vec<Fence>,
    /// When the cursor last looked back, and where it stood then.
    looked_back: Option<(Instant, i64)>,
    looks_back: u32,
}

impl Cursor {
    /// The seq a read of `fences` at `now` starts after (0: from the start).
    fn reading(&mut self, fences: &[Fence], now: Instant) -> i64 {
        match self.looked_back {
            Some(_) if self.fences != fences => self.restart(fences, now),
            None => self.restart(fences, now),
            Some((at, before)) if now.saturating_duration_since(at) >= LOOK_BACK_EVERY => {
                self.looks_back += 1;
                let from = if self.looks_back.is_multiple_of(FROM_START_EVERY) {
                    0
                } else {
                    before
                };
                self.looked_back = Some((now, self.after));
                self.after = self.after.min(from);
            }
            Some(_) => {}
        }
        self.after
    }

    fn restart(&mut self, fences: &[Fence], now: Instant) {
        self.after = 0;
        self.fences = fences.to_vec();
        self.looked_back = Some((now, 0));
        self.looks_back = 0;
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
    fn the_cursor_reads_past_what_was_published_and_looks_back_now_and_then() {
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
        assert_eq!(c.reading(&more, t0 + LOOK_BACK_EVERY / 2), 12);

        // Looking back: from where the cursor stood at the last look back (here the start), then
        // on from the highest seq published again.
        let mut now = t0 + LOOK_BACK_EVERY;
        assert_eq!(
            c.reading(&more, now),
            0,
            "a row committed late is read again"
        );
        c.published(&[5]);
        assert_eq!(c.reading(&more, now), 5);
        c.published(&[20, 21]);
        assert_eq!(c.reading(&more, now), 21);
        now += LOOK_BACK_EVERY;
        assert_eq!(
            c.reading(&more, now),
            12,
            "back to where it stood a look back ago"
        );
        assert_eq!(c.reading(&more, now), 12);
        c.published(&[22]);
        assert_eq!(c.reading(&more, now), 22);

        // One look back in every FROM_START_EVERY is from the very start.
        let mut froms = Vec::new();
        for _ in 0..FROM_START_EVERY {
            now += LOOK_BACK_EVERY;
            froms.push(c.reading(&more, now));
            c.published(&[30]);
        }
        assert_eq!(froms.iter().filter(|&&f| f == 0).count(), 1);
    }
}
