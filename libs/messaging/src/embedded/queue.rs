//! The embedded work queue: one row per message, moving `ready` → `inflight` (claimed by one
//! consumer) → deleted (ack), back to `ready` (nack, or its consumer went away), or `parked`
//! (delivery limit, reject, undecodable). A claim is one `UPDATE ... RETURNING`, so competing
//! consumers never hold the same message at once.
//!
//! Parked rows are handed out the same way to whoever keeps them elsewhere (`take_parked`: the
//! row stays `parked`, claimed by that consumer) and deleted when it acks.

use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::Utc;
use sea_orm::{QueryResult, Value};
use tokio::sync::{mpsc, Notify, Semaphore};

use super::store::{column, parse_timestamp, timestamp, Store, FALLBACK_POLL};
use crate::envelope::Envelope;
use crate::error::{MessagingError, Result};
use crate::traits::{
    Acker, Parked, ParkedAcker, ParkedMessage, ParkedReceiver, QueueMessage, QueueOptions,
    QueueReceiver, WorkQueue,
};

/// Most messages claimed by one statement, whatever the prefetch.
const CLAIM_PAGE: usize = 100;

pub(super) struct EmbeddedQueue {
    shared: Arc<Shared>,
}

/// What a queue, its consumers and their unanswered messages share.
struct Shared {
    store: Arc<Store>,
    name: String,
    delivery_limit: u32,
    /// Wakes this process's consumers when a message becomes ready.
    signal: Arc<Notify>,
    /// Wakes this process's takers of parked messages when a message is parked.
    parked_signal: Arc<Notify>,
}

impl EmbeddedQueue {
    pub(super) fn new(store: Arc<Store>, name: String, options: QueueOptions) -> Self {
        let signal = store.signal(&format!("queue\u{0}{name}"));
        let parked_signal = store.signal(&format!("parked\u{0}{name}"));
        Self {
            shared: Arc::new(Shared {
                store,
                name,
                delivery_limit: options.delivery_limit.max(1),
                signal,
                parked_signal,
            }),
        }
    }

    pub(super) fn delivery_limit(&self) -> u32 {
        self.shared.delivery_limit
    }

    /// A new claimant of this queue's rows with `prefetch` slots, and the channel it hands its
    /// messages out through.
    fn claimant<M>(&self, prefetch: u16) -> (Claimant, mpsc::Sender<M>, mpsc::Receiver<M>) {
        // Prefetch 0 means "no limit", as in AMQP.
        let slots = if prefetch == 0 {
            usize::from(u16::MAX)
        } else {
            usize::from(prefetch)
        };
        let claimant = Claimant {
            shared: self.shared.clone(),
            id: uuid::Uuid::new_v4().simple().to_string(),
            slots: Arc::new(Semaphore::new(slots)),
        };
        // Every slot may hold a message waiting in the channel, so sends never wait long.
        let (tx, rx) = mpsc::channel(slots);
        (claimant, tx, rx)
    }

    async fn insert(&self, message_id: String, payload: Vec<u8>) -> Result<()> {
        self.shared
            .store
            .execute(
                "INSERT INTO messaging_queue_messages
                    (queue, message_id, payload, state, delivery_count, enqueued_at)
                 VALUES (?, ?, ?, 'ready', 0, ?)",
                [
                    Value::from(self.shared.name.clone()),
                    Value::from(message_id),
                    Value::from(payload),
                    Value::from(timestamp(Utc::now())),
                ],
            )
            .await?;
        self.shared.signal.notify_waiters();
        Ok(())
    }
}

#[async_trait]
impl WorkQueue for EmbeddedQueue {
    fn name(&self) -> &str {
        &self.shared.name
    }

    async fn publish(&self, event: Envelope) -> Result<()> {
        let payload = event.encode()?;
        self.insert(event.id.to_string(), payload).await
    }

    async fn publish_raw(&self, bytes: Vec<u8>) -> Result<()> {
        // The id is fixed now, so an undecodable message keeps one id to redrive it by.
        let message_id = match Envelope::decode_one(&bytes) {
            Ok(event) => event.id.to_string(),
            Err(_) => uuid::Uuid::new_v4().to_string(),
        };
        self.insert(message_id, bytes).await
    }

    async fn consume(&self, prefetch: u16) -> Result<QueueReceiver> {
        let (consumer, tx, rx) = self.claimant(prefetch);
        Ok(QueueReceiver::new(rx, tokio::spawn(consumer.consume(tx))))
    }

    async fn depth(&self) -> Result<u64> {
        let rows = self
            .shared
            .store
            .query(
                "SELECT COUNT(*) AS n FROM messaging_queue_messages WHERE queue = ? AND state = 'ready'",
                [Value::from(self.shared.name.clone())],
            )
            .await?;
        match rows.first() {
            Some(row) => Ok(u64::try_from(column::<i64>(row, "n")?).unwrap_or(0)),
            None => Ok(0),
        }
    }

    async fn take_parked(&self, prefetch: u16) -> Result<ParkedReceiver> {
        let (taker, tx, rx) = self.claimant(prefetch);
        Ok(ParkedReceiver::new(rx, tokio::spawn(taker.take_parked(tx))))
    }

    async fn republish(&self, message_id: &str, payload: Vec<u8>) -> Result<()> {
        self.insert(message_id.to_owned(), payload).await?;
        tracing::info!(queue = %self.shared.name, message_id, "parked message republished");
        Ok(())
    }
}

fn count(n: i64) -> u32 {
    u32::try_from(n.max(0)).unwrap_or(u32::MAX)
}

/// Claims up to `LIMIT ?` ready rows for a consumer.
const CLAIM_READY: &str = "UPDATE messaging_queue_messages
                 SET state = 'inflight', delivery_count = delivery_count + 1, owner = ?, consumer = ?
                 WHERE seq IN (SELECT seq FROM messaging_queue_messages
                               WHERE queue = ? AND state = 'ready' ORDER BY seq LIMIT ?)
                 RETURNING seq, payload, delivery_count";

/// Claims up to `LIMIT ?` unclaimed parked rows for a taker.
const CLAIM_PARKED: &str = "UPDATE messaging_queue_messages SET owner = ?, consumer = ?
                 WHERE seq IN (SELECT seq FROM messaging_queue_messages
                               WHERE queue = ? AND state = 'parked' AND consumer IS NULL
                               ORDER BY seq LIMIT ?)
                 RETURNING seq, message_id, payload, reason, delivery_count, parked_at";

/// A claimed ready row.
struct Claimed {
    payload: Vec<u8>,
    delivery_count: u32,
}

fn ready_row(_seq: i64, row: &QueryResult) -> Result<Claimed> {
    Ok(Claimed {
        payload: column(row, "payload")?,
        delivery_count: count(column(row, "delivery_count")?),
    })
}

fn parked_row(seq: i64, row: &QueryResult) -> Result<Parked> {
    let payload = column::<Vec<u8>>(row, "payload")?;
    let parked_at = column::<Option<String>>(row, "parked_at")?.unwrap_or_default();
    Ok(Parked {
        // A row is parked once (a redrive is a new row), and the time guards against a
        // recreated file reusing a sequence number.
        park_id: format!("{seq}@{parked_at}"),
        message_id: column(row, "message_id")?,
        event: Envelope::decode_one(&payload).ok(),
        payload,
        reason: column::<Option<String>>(row, "reason")?.unwrap_or_default(),
        delivery_count: count(column(row, "delivery_count")?),
        parked_at: parse_timestamp(&parked_at)?,
    })
}

/// A consumer of the queue's ready rows (`consume`) or a taker of its parked rows
/// (`take_parked`): claims rows under its id and hands them out one slot each.
struct Claimant {
    shared: Arc<Shared>,
    /// Stored on every row this claimant claims.
    id: String,
    /// One permit per unanswered message: taken at claim, given back when the message is
    /// answered (not when it is merely dropped, as with AMQP prefetch).
    slots: Arc<Semaphore>,
}

impl Claimant {
    /// Hands out ready messages, parking the rows that may not be delivered.
    async fn consume(self, tx: mpsc::Sender<QueueMessage>) {
        // Whether this task ends or is aborted (receiver dropped), its unanswered messages go
        // back to the queue.
        let _requeue = RequeueOnDrop {
            shared: self.shared.clone(),
            consumer: self.id.clone(),
        };
        self.claim_loop(
            &self.shared.signal,
            "claiming messages failed; retrying",
            CLAIM_READY,
            ready_row,
            |seq, row| self.deliverable(seq, row),
            tx,
        )
        .await;
    }

    /// Hands out parked rows: each is claimed (`consumer` set, still `parked`) so it goes to one
    /// taker at a time, deleted on ack, and released when the taker goes away unanswered.
    async fn take_parked(self, tx: mpsc::Sender<ParkedMessage>) {
        let _release = ReleaseParkedOnDrop {
            shared: self.shared.clone(),
            taker: self.id.clone(),
        };
        self.claim_loop(
            &self.shared.parked_signal,
            "taking parked messages failed; retrying",
            CLAIM_PARKED,
            parked_row,
            |seq, parked| {
                std::future::ready(Some(ParkedMessage {
                    parked,
                    acker: Box::new(EmbeddedParkedAcker {
                        shared: self.shared.clone(),
                        seq,
                        taker: self.id.clone(),
                        slots: self.slots.clone(),
                    }),
                }))
            },
            tx,
        )
        .await;
    }

    /// Claims a row with `sql` (read by `read`) per free slot, up to [`CLAIM_PAGE`], hands out
    /// what `hand_out` makes of each (`None`: nothing to hand out), and waits on `signal` (or
    /// the fallback poll) when there are none; ends when `tx` closes.
    async fn claim_loop<T, M, H>(
        &self,
        signal: &Notify,
        failed: &str,
        sql: &str,
        read: impl Fn(i64, &QueryResult) -> Result<T>,
        hand_out: impl Fn(i64, T) -> H,
        tx: mpsc::Sender<M>,
    ) where
        H: Future<Output = Option<M>>,
    {
        loop {
            let Ok(first) = self.slots.clone().acquire_owned().await else {
                return;
            };
            let mut permits = vec![first];
            while permits.len() < CLAIM_PAGE {
                match self.slots.clone().try_acquire_owned() {
                    Ok(permit) => permits.push(permit),
                    Err(_) => break,
                }
            }
            // Registered before the claim, so a row made claimable after it still wakes us.
            let signalled = signal.notified();
            tokio::pin!(signalled);
            signalled.as_mut().enable();
            let claimed = match self.claim(sql, permits.len(), &read).await {
                Ok(claimed) => claimed,
                Err(e) => {
                    tracing::warn!(queue = %self.shared.name, error = %e, "{failed}");
                    drop(permits);
                    tokio::time::sleep(FALLBACK_POLL).await;
                    continue;
                }
            };
            if claimed.is_empty() {
                drop(permits);
                tokio::select! {
                    _ = &mut signalled => {}
                    _ = tokio::time::sleep(FALLBACK_POLL) => {}
                    _ = tx.closed() => return,
                }
                continue;
            }
            for (seq, row) in claimed {
                let Some(message) = hand_out(seq, row).await else {
                    continue;
                };
                // The slot now belongs to the message until it is answered.
                if let Some(permit) = permits.pop() {
                    permit.forget();
                }
                if tx.send(message).await.is_err() {
                    return;
                }
            }
        }
    }

    /// Claims up to `n` rows with `sql` (bound to this claimant, the queue and `n`), oldest
    /// first, each with its `seq`.
    async fn claim<T>(
        &self,
        sql: &str,
        n: usize,
        read: impl Fn(i64, &QueryResult) -> Result<T>,
    ) -> Result<Vec<(i64, T)>> {
        let rows = self
            .shared
            .store
            .query(
                sql,
                [
                    Value::from(self.shared.store.instance.clone()),
                    Value::from(self.id.clone()),
                    Value::from(self.shared.name.clone()),
                    Value::from(i64::try_from(n).unwrap_or(i64::MAX)),
                ],
            )
            .await?;
        let mut claimed = rows
            .iter()
            .map(|row| {
                let seq = column(row, "seq")?;
                Ok((seq, read(seq, row)?))
            })
            .collect::<Result<Vec<_>>>()?;
        // RETURNING does not promise an order.
        claimed.sort_by_key(|(seq, _)| *seq);
        Ok(claimed)
    }

    /// The message to hand out, or `None` when the row was parked instead: undecodable, or
    /// already delivered `delivery_limit` times to consumers that went away without answering
    /// (a message that crashes its consumer must not be retried forever).
    async fn deliverable(&self, seq: i64, row: Claimed) -> Option<QueueMessage> {
        let acker = EmbeddedAcker {
            shared: self.shared.clone(),
            seq,
            consumer: self.id.clone(),
            delivery_count: row.delivery_count,
            slots: self.slots.clone(),
        };
        let limit = self.shared.delivery_limit;
        let parked = match Envelope::decode_one(&row.payload) {
            Err(poison) => {
                let detail = poison
                    .reason
                    .strip_prefix("undecodable envelope: ")
                    .unwrap_or(&poison.reason);
                acker
                    .park(&format!("undecodable message: {detail}"), false)
                    .await
            }
            Ok(_) if row.delivery_count > limit => {
                let reason =
                    format!("delivery limit {limit} reached: consumer went away without answering");
                acker.park(&reason, true).await
            }
            Ok(event) => {
                return Some(QueueMessage {
                    event,
                    delivery_count: row.delivery_count,
                    acker: Box::new(acker),
                })
            }
        };
        if let Err(e) = parked {
            // Still in flight for this consumer: it goes back to the queue with the consumer
            // and is parked on a later claim.
            tracing::warn!(queue = %self.shared.name, error = %e, "parking a message failed");
        }
        None
    }
}

/// Returns a consumer's unanswered messages to the queue. `Drop` cannot wait, so it spawns the
/// update; should that fail too, the next open of the file requeues them.
struct RequeueOnDrop {
    shared: Arc<Shared>,
    consumer: String,
}

impl Drop for RequeueOnDrop {
    fn drop(&mut self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let shared = self.shared.clone();
        let consumer = std::mem::take(&mut self.consumer);
        runtime.spawn(async move {
            let requeued = shared
                .store
                .execute(
                    "UPDATE messaging_queue_messages SET state = 'ready', owner = NULL, consumer = NULL
                     WHERE queue = ? AND state = 'inflight' AND consumer = ?",
                    [Value::from(shared.name.clone()), Value::from(consumer)],
                )
                .await;
            match requeued {
                Ok(0) => {}
                Ok(n) => {
                    tracing::debug!(queue = %shared.name, messages = n, "requeued unanswered messages of a closed consumer");
                    shared.signal.notify_waiters();
                }
                Err(e) => {
                    tracing::warn!(queue = %shared.name, error = %e, "requeueing unanswered messages failed")
                }
            }
        });
    }
}

struct EmbeddedAcker {
    shared: Arc<Shared>,
    seq: i64,
    consumer: String,
    /// With `consumer`, identifies this delivery: an answer to a message that has since been
    /// requeued (its consumer went away) must not touch the new delivery.
    delivery_count: u32,
    slots: Arc<Semaphore>,
}

impl EmbeddedAcker {
    /// Applies `set` to the row if this delivery still holds it.
    async fn answer(&self, set: &str, values: Vec<Value>) -> Result<()> {
        let sql = format!(
            "{set} WHERE seq = ? AND state = 'inflight' AND consumer = ? AND delivery_count = ?"
        );
        let mut values = values;
        values.extend([
            Value::from(self.seq),
            Value::from(self.consumer.clone()),
            Value::from(i64::from(self.delivery_count)),
        ]);
        match self.shared.store.execute(&sql, values).await? {
            0 => Err(MessagingError::Closed),
            _ => Ok(()),
        }
    }

    /// `uncount`: the delivery was never handed out, so it does not count.
    async fn park(&self, reason: &str, uncount: bool) -> Result<()> {
        let set = if uncount {
            "UPDATE messaging_queue_messages SET state = 'parked', reason = ?, parked_at = ?,
             owner = NULL, consumer = NULL, delivery_count = delivery_count - 1"
        } else {
            "UPDATE messaging_queue_messages SET state = 'parked', reason = ?, parked_at = ?,
             owner = NULL, consumer = NULL"
        };
        let parked = self
            .answer(
                set,
                vec![
                    Value::from(reason.to_owned()),
                    Value::from(timestamp(Utc::now())),
                ],
            )
            .await;
        if parked.is_ok() {
            tracing::warn!(queue = %self.shared.name, reason, "message parked");
            self.shared.parked_signal.notify_waiters();
        }
        parked
    }

    /// Gives the message's slot back to its consumer, whatever the outcome: a failed answer
    /// leaves the row to be requeued with the consumer.
    fn release<T>(&self, outcome: Result<T>) -> Result<T> {
        self.slots.add_permits(1);
        outcome
    }
}

#[async_trait]
impl Acker for EmbeddedAcker {
    async fn ack(&self) -> Result<()> {
        let outcome = self
            .answer("DELETE FROM messaging_queue_messages", Vec::new())
            .await;
        self.release(outcome)
    }

    async fn nack(&self, _delivery_count: u32, _event: &Envelope, reason: &str) -> Result<()> {
        let limit = self.shared.delivery_limit;
        let outcome = if self.delivery_count >= limit {
            self.park(&format!("delivery limit {limit} reached: {reason}"), false)
                .await
        } else {
            let requeued = self
                .answer(
                    "UPDATE messaging_queue_messages SET state = 'ready', owner = NULL, consumer = NULL",
                    Vec::new(),
                )
                .await;
            if requeued.is_ok() {
                self.shared.signal.notify_waiters();
            }
            requeued
        };
        self.release(outcome)
    }

    async fn reject(&self, _delivery_count: u32, _event: &Envelope, reason: &str) -> Result<()> {
        let outcome = self.park(reason, false).await;
        self.release(outcome)
    }
}

/// Releases a taker's unanswered parked rows for the next taker (see [`RequeueOnDrop`]).
struct ReleaseParkedOnDrop {
    shared: Arc<Shared>,
    taker: String,
}

impl Drop for ReleaseParkedOnDrop {
    fn drop(&mut self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let shared = self.shared.clone();
        let taker = std::mem::take(&mut self.taker);
        runtime.spawn(async move {
            let released = shared
                .store
                .execute(
                    "UPDATE messaging_queue_messages SET owner = NULL, consumer = NULL
                     WHERE queue = ? AND state = 'parked' AND consumer = ?",
                    [Value::from(shared.name.clone()), Value::from(taker)],
                )
                .await;
            match released {
                Ok(0) => {}
                Ok(_) => shared.parked_signal.notify_waiters(),
                Err(e) => {
                    tracing::warn!(queue = %shared.name, error = %e, "releasing taken parked messages failed")
                }
            }
        });
    }
}

struct EmbeddedParkedAcker {
    shared: Arc<Shared>,
    seq: i64,
    taker: String,
    slots: Arc<Semaphore>,
}

#[async_trait]
impl ParkedAcker for EmbeddedParkedAcker {
    async fn ack(&self) -> Result<()> {
        let deleted = self
            .shared
            .store
            .execute(
                "DELETE FROM messaging_queue_messages
                 WHERE seq = ? AND state = 'parked' AND consumer = ?",
                [Value::from(self.seq), Value::from(self.taker.clone())],
            )
            .await;
        self.slots.add_permits(1);
        match deleted? {
            0 => Err(MessagingError::Closed),
            _ => Ok(()),
        }
    }
}
