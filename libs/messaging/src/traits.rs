//! The backend-neutral API: a broker hands out partitioned logs and work queues.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::envelope::{Encoded, Envelope, Poison};
use crate::error::Result;
use crate::hash::partition_for;

/// Where an event sits in one partition: the offset of the broker message (batch) that carries it
/// and its index inside that batch. Positions order events within a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Position {
    pub offset: u64,
    pub index: u32,
}

/// A confirmed append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub partition: u32,
}

/// Where a log reader starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// The oldest retained record.
    First,
    /// The record (batch) at this offset, then everything after it.
    Offset(u64),
    /// Only records appended after the reader starts.
    Next,
}

/// One event read from a partition. An undecodable batch is one record whose `event` is the
/// poison with its reason (index 0); readers skip past it.
#[derive(Debug, Clone)]
pub struct LogRecord {
    pub partition: u32,
    pub position: Position,
    pub event: std::result::Result<Envelope, Poison>,
}

impl LogRecord {
    /// The records of the batch stored at `offset`: its events, or one poison record when it
    /// does not decode.
    pub(crate) fn batch(
        partition: u32,
        offset: u64,
        batch: std::result::Result<Vec<Envelope>, Poison>,
    ) -> Vec<LogRecord> {
        match batch {
            Ok(events) => events
                .into_iter()
                .enumerate()
                .map(|(i, e)| LogRecord {
                    partition,
                    position: Position {
                        offset,
                        index: u32::try_from(i).unwrap_or(u32::MAX),
                    },
                    event: Ok(e),
                })
                .collect(),
            Err(poison) => vec![LogRecord {
                partition,
                position: Position { offset, index: 0 },
                event: Err(poison),
            }],
        }
    }
}

/// Reads one partition in order. Dropping it stops the background reader.
pub struct LogReader {
    rx: mpsc::Receiver<LogRecord>,
    _task: AbortOnDrop,
}

impl LogReader {
    pub(crate) fn new(rx: mpsc::Receiver<LogRecord>, task: tokio::task::JoinHandle<()>) -> Self {
        Self {
            rx,
            _task: AbortOnDrop(task.abort_handle()),
        }
    }

    /// The next record; waits for one to be appended. `None` once the broker is gone for good.
    pub async fn next(&mut self) -> Option<LogRecord> {
        self.rx.recv().await
    }

    /// Polls for the next record (a reader among several, waited on by one task); `Ready(None)`
    /// once the broker is gone for good.
    pub fn poll_next(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<LogRecord>> {
        self.rx.poll_recv(cx)
    }

    /// The next record if one has already arrived, without waiting (to take what is there as one
    /// batch).
    pub fn try_next(&mut self) -> Option<LogRecord> {
        self.rx.try_recv().ok()
    }

    /// The next records as one batch: waits for one, then takes those already arrived, `max` at
    /// most (at least 1). `None` once the broker is gone for good. Cancel-safe: a batch not
    /// returned loses nothing.
    pub async fn next_batch(&mut self, max: usize) -> Option<Vec<LogRecord>> {
        let mut records = Vec::new();
        match self.rx.recv_many(&mut records, max.max(1)).await {
            0 => None,
            _ => Some(records),
        }
    }
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// An append-only, partitioned, replayable log.
#[async_trait]
pub trait PartitionedLog: Send + Sync {
    fn name(&self) -> &str;

    fn partitions(&self) -> u32;

    /// The partition `key` maps to; stable across processes and versions.
    fn partition_of(&self, key: &str) -> u32 {
        partition_for(key, self.partitions())
    }

    /// Appends one event to the partition of its key. Returns only once the broker has confirmed
    /// it durably stored; an error means it may not have been stored. Concurrent appends to one
    /// partition are batched into one broker message.
    async fn append(&self, event: Envelope) -> Result<Appended>;

    /// Appends an event encoded by [`crate::Envelope::encoded`] (a typed body, see
    /// [`crate::Envelope::typed`]), as [`PartitionedLog::append`] does.
    async fn append_encoded(&self, record: Encoded) -> Result<Appended>;

    /// Appends several events (any keys); each is confirmed as with [`PartitionedLog::append`].
    async fn append_batch(&self, events: Vec<Envelope>) -> Result<Vec<Appended>>;

    /// Appends raw bytes as one record, unchecked. For tools and tests (poison records).
    async fn append_raw(&self, partition: u32, bytes: Vec<u8>) -> Result<()>;

    /// Reads `partition` from `from`, in order, following new appends. After a connection loss
    /// the reader resumes by itself after the last record it handed out.
    async fn read(&self, partition: u32, from: StartAt) -> Result<LogReader>;

    /// The first record of `partition` at or after `from`, without following the log: `None`
    /// when the partition holds nothing there. Lag probes use it from outside the reader — the
    /// oldest record a consumer whose checkpoint is `from` has not handled yet — so they keep
    /// working while that consumer is stalled. RabbitMQ cannot tell "nothing there" from "not
    /// delivered yet" and answers `None` after [`PEEK_WAIT`] without a delivery.
    async fn peek(&self, partition: u32, from: Position) -> Result<Option<LogRecord>>;
}

/// How long [`PartitionedLog::peek`] waits for a broker to deliver a record before it concludes
/// there is none (RabbitMQ streams deliver an existing record within milliseconds).
pub const PEEK_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// Work-queue options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueOptions {
    /// After this many deliveries without an ack the message is parked.
    pub delivery_limit: u32,
}

impl Default for QueueOptions {
    fn default() -> Self {
        Self { delivery_limit: 5 }
    }
}

/// A message taken from a work queue. Exactly one of `ack`, `nack` or `reject` should be called;
/// dropping it unanswered returns it to the queue when the consumer goes away.
pub struct QueueMessage {
    pub event: Envelope,
    /// 1 on the first delivery, 2 on the first redelivery, ...
    pub delivery_count: u32,
    pub(crate) acker: Box<dyn Acker>,
}

impl std::fmt::Debug for QueueMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueMessage")
            .field("event", &self.event)
            .field("delivery_count", &self.delivery_count)
            .finish()
    }
}

impl QueueMessage {
    /// Done: removes the message.
    pub async fn ack(self) -> Result<()> {
        self.acker.ack().await
    }

    /// Failed this time: the message is delivered again, or parked with `reason` once the
    /// delivery limit is reached.
    pub async fn nack(self, reason: &str) -> Result<()> {
        self.acker
            .nack(self.delivery_count, &self.event, reason)
            .await
    }

    /// Can never succeed: parked at once with `reason`.
    pub async fn reject(self, reason: &str) -> Result<()> {
        self.acker
            .reject(self.delivery_count, &self.event, reason)
            .await
    }
}

/// Backend side of a [`QueueMessage`].
#[async_trait]
pub(crate) trait Acker: Send + Sync {
    async fn ack(&self) -> Result<()>;
    async fn nack(&self, delivery_count: u32, event: &Envelope, reason: &str) -> Result<()>;
    async fn reject(&self, delivery_count: u32, event: &Envelope, reason: &str) -> Result<()>;
}

/// Delivers messages of one queue, at most `prefetch` unanswered at a time. Undecodable messages
/// never reach the caller: they are parked with the reason.
pub struct QueueReceiver {
    rx: mpsc::Receiver<QueueMessage>,
    _task: AbortOnDrop,
}

impl QueueReceiver {
    pub(crate) fn new(rx: mpsc::Receiver<QueueMessage>, task: tokio::task::JoinHandle<()>) -> Self {
        Self {
            rx,
            _task: AbortOnDrop(task.abort_handle()),
        }
    }

    /// The next message; waits for one. `None` once the broker is gone for good.
    pub async fn next(&mut self) -> Option<QueueMessage> {
        self.rx.recv().await
    }
}

/// A message in a queue's parked (dead-letter) queue, waiting for a person.
#[derive(Debug, Clone, PartialEq)]
pub struct Parked {
    /// This parking of the message: the same every time the parked message is handed out again
    /// (so whoever stores it can do so idempotently), new when a redriven message is parked again.
    pub park_id: String,
    /// The event id, or a generated id for an undecodable message. Republish under it.
    pub message_id: String,
    /// The bytes as they were published, kept even when they do not decode.
    pub payload: Vec<u8>,
    /// The event, when it decodes.
    pub event: Option<Envelope>,
    pub reason: String,
    pub delivery_count: u32,
    pub parked_at: DateTime<Utc>,
}

/// A parked message taken out of the parked queue to be kept elsewhere (the Supervisor moves
/// them into its database, where listing them changes nothing). Call `ack` once it is stored:
/// that removes it from the parked queue. Unanswered, it stays parked and is handed out again
/// once the receiver is dropped (or its process is gone).
pub struct ParkedMessage {
    pub parked: Parked,
    pub(crate) acker: Box<dyn ParkedAcker>,
}

impl std::fmt::Debug for ParkedMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParkedMessage")
            .field("parked", &self.parked)
            .finish()
    }
}

impl ParkedMessage {
    /// Stored elsewhere: removes the message from the parked queue.
    pub async fn ack(self) -> Result<()> {
        self.acker.ack().await
    }
}

/// Backend side of a [`ParkedMessage`].
#[async_trait]
pub(crate) trait ParkedAcker: Send + Sync {
    async fn ack(&self) -> Result<()>;
}

/// Hands out the messages of a queue's parked queue, at most `prefetch` unanswered at a time.
pub struct ParkedReceiver {
    rx: mpsc::Receiver<ParkedMessage>,
    _task: AbortOnDrop,
}

impl ParkedReceiver {
    pub(crate) fn new(
        rx: mpsc::Receiver<ParkedMessage>,
        task: tokio::task::JoinHandle<()>,
    ) -> Self {
        Self {
            rx,
            _task: AbortOnDrop(task.abort_handle()),
        }
    }

    /// The next parked message; waits for one. `None` once the broker is gone for good.
    pub async fn next(&mut self) -> Option<ParkedMessage> {
        self.rx.recv().await
    }
}

/// A queue with competing consumers, acks, a delivery limit and a parked queue.
#[async_trait]
pub trait WorkQueue: Send + Sync {
    fn name(&self) -> &str;

    /// Publishes one event; returns once the broker confirmed it.
    async fn publish(&self, event: Envelope) -> Result<()>;

    /// Publishes raw bytes, unchecked. For tools and tests (poison messages).
    async fn publish_raw(&self, bytes: Vec<u8>) -> Result<()>;

    /// Starts consuming with at most `prefetch` unanswered messages.
    async fn consume(&self, prefetch: u16) -> Result<QueueReceiver>;

    /// Messages waiting in the queue (not yet delivered).
    async fn depth(&self) -> Result<u64>;

    /// Takes parked messages out of the parked queue, oldest first, at most `prefetch`
    /// unanswered at a time. There is deliberately no way to list them in place: on RabbitMQ a
    /// look is a delivery (it reorders them, counts towards limits and hides them meanwhile), so
    /// whoever shows them to people moves them into a store of their own first.
    async fn take_parked(&self, prefetch: u16) -> Result<ParkedReceiver>;

    /// Publishes `payload` (a parked message's bytes, decodable or not) under `message_id` and
    /// returns once the broker confirmed it: a redrive. The message starts a fresh delivery count.
    async fn republish(&self, message_id: &str, payload: Vec<u8>) -> Result<()>;
}

/// Hands out logs and queues, declaring them on first use (idempotently).
#[async_trait]
pub trait Broker: Send + Sync {
    /// `name` with `partitions` partitions. Every process must use the same partition count.
    async fn log(&self, name: &str, partitions: u32) -> Result<Arc<dyn PartitionedLog>>;

    async fn queue(&self, name: &str, options: QueueOptions) -> Result<Arc<dyn WorkQueue>>;

    /// Ready to serve (for `/readyz`).
    async fn check(&self) -> Result<()>;

    /// Removes a log and its data (tests, tooling).
    async fn delete_log(&self, name: &str, partitions: u32) -> Result<()>;

    /// Removes a queue, its parked queue and their messages (tests, tooling).
    async fn delete_queue(&self, name: &str) -> Result<()>;
}
