//! The embedded partitioned log: one row per batch, `(log, partition, offset)` with offsets
//! counting batches from 0 in each partition. Appends are micro-batched by the shared
//! [`Batcher`], so the embedded and RabbitMQ logs address events the same way.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::Utc;
use futures::future::BoxFuture;
use sea_orm::Value;
use tokio::sync::{mpsc, Notify};

use super::store::{column, timestamp, Store, FALLBACK_POLL};
use crate::batcher::{BatchSink, Batcher};
use crate::envelope::{Encoded, Envelope};
use crate::error::{MessagingError, Result};
use crate::traits::{Appended, LogReader, LogRecord, PartitionedLog, Position, StartAt};

/// Records buffered between a reader's task and its consumer: enough to keep the consumer busy,
/// few enough that a slow consumer holds the task back (back-pressure) instead of memory.
const READER_BUFFER: usize = 256;

pub(super) struct EmbeddedLog {
    name: String,
    partitions: u32,
    sink: Arc<LogSink>,
    batcher: Batcher,
}

impl EmbeddedLog {
    pub(super) fn new(store: Arc<Store>, name: String, partitions: u32) -> Self {
        let signals = (0..partitions)
            .map(|p| store.signal(&signal_name(&name, p)))
            .collect();
        let sink = Arc::new(LogSink {
            store: store.clone(),
            log: name.clone(),
            signals,
        });
        let batcher = Batcher::spawn(sink.clone(), partitions, &store.settings);
        Self {
            name,
            partitions,
            sink,
            batcher,
        }
    }

    fn check_partition(&self, partition: u32) -> Result<()> {
        if partition < self.partitions {
            Ok(())
        } else {
            Err(MessagingError::Config(format!(
                "log {} has {} partitions, no partition {partition}",
                self.name, self.partitions
            )))
        }
    }
}

fn signal_name(log: &str, partition: u32) -> String {
    format!("log\u{0}{log}\u{0}{partition}")
}

/// Stores sealed batches; the commit is the confirm.
struct LogSink {
    store: Arc<Store>,
    log: String,
    /// Per partition, wakes this process's readers.
    signals: Vec<Arc<Notify>>,
}

impl LogSink {
    /// Inserts one batch at the partition's next offset. One statement, so the offset is taken
    /// and used under SQLite's write lock even if another process appends too.
    async fn insert(&self, partition: u32, payload: Vec<u8>) -> Result<()> {
        self.store
            .execute(
                "INSERT INTO messaging_log_batches (log, \"partition\", \"offset\", payload, appended_at)
                 SELECT ?, ?, COALESCE(MAX(\"offset\") + 1, 0), ?, ?
                 FROM messaging_log_batches WHERE log = ? AND \"partition\" = ?",
                [
                    Value::from(self.log.clone()),
                    Value::from(i64::from(partition)),
                    Value::from(payload),
                    Value::from(timestamp(Utc::now())),
                    Value::from(self.log.clone()),
                    Value::from(i64::from(partition)),
                ],
            )
            .await?;
        if let Some(signal) = self.signals.get(partition as usize) {
            signal.notify_waiters();
        }
        Ok(())
    }
}

#[async_trait]
impl BatchSink for LogSink {
    async fn publish(
        &self,
        partition: u32,
        payload: Vec<u8>,
    ) -> Result<BoxFuture<'static, Result<()>>> {
        // The insert has committed when it returns, so the confirm is already there. Awaiting it
        // here also keeps batches in call order.
        self.insert(partition, payload).await?;
        Ok(Box::pin(futures::future::ready(Ok(()))))
    }
}

#[async_trait]
impl PartitionedLog for EmbeddedLog {
    fn name(&self) -> &str {
        &self.name
    }

    fn partitions(&self) -> u32 {
        self.partitions
    }

    async fn append(&self, event: Envelope) -> Result<Appended> {
        self.batcher.append_event(self.partitions, event).await
    }

    async fn append_batch(&self, events: Vec<Envelope>) -> Result<Vec<Appended>> {
        self.batcher.append_events(self.partitions, events).await
    }

    async fn append_encoded(&self, record: Encoded) -> Result<Appended> {
        self.batcher.append_encoded(self.partitions, record).await
    }

    async fn append_raw(&self, partition: u32, bytes: Vec<u8>) -> Result<()> {
        self.check_partition(partition)?;
        self.sink.insert(partition, bytes).await
    }

    async fn read(&self, partition: u32, from: StartAt) -> Result<LogReader> {
        self.check_partition(partition)?;
        let store = self.sink.store.clone();
        // `Next` is fixed now, so everything appended after `read` returns is seen.
        let next = match from {
            StartAt::First => 0,
            StartAt::Offset(offset) => offset,
            StartAt::Next => next_offset(&store, &self.name, partition).await?,
        };
        let (tx, rx) = mpsc::channel(READER_BUFFER);
        let reader = Reader {
            store: store.clone(),
            log: self.name.clone(),
            partition,
            signal: store.signal(&signal_name(&self.name, partition)),
            page: i64::from(store.settings.log_prefetch.max(1)),
        };
        let task = tokio::spawn(reader.run(next, tx));
        Ok(LogReader::new(rx, task))
    }

    /// Exact: the rows say whether anything is there.
    async fn peek(&self, partition: u32, from: Position) -> Result<Option<LogRecord>> {
        self.check_partition(partition)?;
        let store = self.sink.store.clone();
        let reader = Reader {
            signal: store.signal(&signal_name(&self.name, partition)),
            store,
            log: self.name.clone(),
            partition,
            // The batch at `from.offset` may end before `from.index`; then the next one answers.
            page: 2,
        };
        let mut next = from.offset;
        loop {
            let rows = reader.page_from(next).await?;
            if rows.is_empty() {
                return Ok(None);
            }
            for (offset, payload) in rows {
                let found = reader
                    .records(offset, &payload)
                    .into_iter()
                    .find(|r| r.position >= from);
                if found.is_some() {
                    return Ok(found);
                }
                next = offset + 1;
            }
        }
    }
}

async fn next_offset(store: &Store, log: &str, partition: u32) -> Result<u64> {
    let rows = store
        .query(
            "SELECT COALESCE(MAX(\"offset\") + 1, 0) AS next FROM messaging_log_batches
             WHERE log = ? AND \"partition\" = ?",
            [
                Value::from(log.to_owned()),
                Value::from(i64::from(partition)),
            ],
        )
        .await?;
    match rows.first() {
        Some(row) => Ok(u64::try_from(column::<i64>(row, "next")?).unwrap_or(0)),
        None => Ok(0),
    }
}

struct Reader {
    store: Arc<Store>,
    log: String,
    partition: u32,
    signal: Arc<Notify>,
    page: i64,
}

impl Reader {
    /// Hands out every batch from `next` on, then follows new appends. Ends when the
    /// [`LogReader`] is dropped.
    async fn run(self, mut next: u64, tx: mpsc::Sender<LogRecord>) {
        loop {
            // Registered before the query, so an append committed after the query still wakes us.
            let appended = self.signal.notified();
            tokio::pin!(appended);
            appended.as_mut().enable();
            let rows = match self.page_from(next).await {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::warn!(log = %self.log, partition = self.partition, error = %e, "log read failed; retrying");
                    tokio::time::sleep(FALLBACK_POLL).await;
                    continue;
                }
            };
            let full = rows.len() as i64 >= self.page;
            for (offset, payload) in rows {
                for record in self.records(offset, &payload) {
                    if tx.send(record).await.is_err() {
                        return;
                    }
                }
                next = offset + 1;
            }
            if full {
                continue;
            }
            tokio::select! {
                _ = &mut appended => {}
                _ = tokio::time::sleep(FALLBACK_POLL) => {}
                _ = tx.closed() => return,
            }
        }
    }

    async fn page_from(&self, next: u64) -> Result<Vec<(u64, Vec<u8>)>> {
        let rows = self
            .store
            .query(
                "SELECT \"offset\", payload FROM messaging_log_batches
                 WHERE log = ? AND \"partition\" = ? AND \"offset\" >= ?
                 ORDER BY \"offset\" LIMIT ?",
                [
                    Value::from(self.log.clone()),
                    Value::from(i64::from(self.partition)),
                    Value::from(i64::try_from(next).unwrap_or(i64::MAX)),
                    Value::from(self.page),
                ],
            )
            .await?;
        rows.iter()
            .map(|row| {
                let offset = column::<i64>(row, "offset")?;
                let offset = u64::try_from(offset)
                    .map_err(|_| MessagingError::Storage(format!("negative offset {offset}")))?;
                Ok((offset, column::<Vec<u8>>(row, "payload")?))
            })
            .collect()
    }

    /// The events of one batch, or one poison record when it does not decode.
    fn records(&self, offset: u64, payload: &[u8]) -> Vec<LogRecord> {
        let batch = Envelope::decode_batch(payload);
        if let Err(poison) = &batch {
            tracing::warn!(log = %self.log, partition = self.partition, offset, reason = %poison.reason, "poison record in log");
        }
        LogRecord::batch(self.partition, offset, batch)
    }
}
