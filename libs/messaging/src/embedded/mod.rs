//! The embedded broker (one process, `make run`): the partitioned log and the work queues kept in
//! one SQLite file, with the same semantics as RabbitMQ — confirmed appends, offsets per
//! partition, acks and redelivery, a delivery limit and a parked queue — and durable across a
//! restart of the process.
//!
//! A file belongs to one process at a time: opening it requeues the messages that were in flight
//! for consumers of earlier processes. Several brokers on one file within a process are fine.

mod log;
mod queue;
mod store;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::Utc;
use sea_orm::Value;
use tokio::sync::Mutex;

use crate::error::{MessagingError, Result};
use crate::settings::MessagingSettings;
use crate::traits::{Broker, PartitionedLog, QueueOptions, WorkQueue};

use self::log::EmbeddedLog;
use self::queue::EmbeddedQueue;
use self::store::{column, timestamp, Store};

/// Opens the embedded broker on the SQLite file named by `settings.url`
/// (`sqlite://data/messaging.db?mode=rwc`).
pub async fn open(settings: &MessagingSettings) -> Result<Arc<dyn Broker>> {
    Ok(Arc::new(open_broker(settings).await?))
}

/// Opens the embedded broker, typed.
pub async fn open_broker(settings: &MessagingSettings) -> Result<EmbeddedBroker> {
    Ok(EmbeddedBroker {
        store: Store::open(settings).await?,
        logs: Mutex::new(HashMap::new()),
        queues: Mutex::new(HashMap::new()),
    })
}

/// Logs and queues in one SQLite file.
pub struct EmbeddedBroker {
    store: Arc<Store>,
    /// One handle per name, so a log has one batcher per partition in this broker.
    logs: Mutex<HashMap<String, Arc<EmbeddedLog>>>,
    queues: Mutex<HashMap<String, Arc<EmbeddedQueue>>>,
}

impl EmbeddedBroker {
    /// The partition count recorded for `log`, recording `partitions` if it is new: every
    /// process must agree on it, or keys would land on different partitions.
    async fn declare_log(&self, log: &str, partitions: u32) -> Result<()> {
        self.store
            .execute(
                "INSERT INTO messaging_logs (name, partitions, created_at) VALUES (?, ?, ?)
                 ON CONFLICT (name) DO NOTHING",
                [
                    Value::from(log.to_owned()),
                    Value::from(i64::from(partitions)),
                    Value::from(timestamp(Utc::now())),
                ],
            )
            .await?;
        let rows = self
            .store
            .query(
                "SELECT partitions FROM messaging_logs WHERE name = ?",
                [Value::from(log.to_owned())],
            )
            .await?;
        let recorded = match rows.first() {
            Some(row) => column::<i64>(row, "partitions")?,
            None => i64::from(partitions),
        };
        if recorded == i64::from(partitions) {
            Ok(())
        } else {
            Err(partition_mismatch(log, recorded, partitions))
        }
    }
}

fn partition_mismatch(log: &str, recorded: impl std::fmt::Display, asked: u32) -> MessagingError {
    MessagingError::Config(format!("log {log} has {recorded} partitions, not {asked}"))
}

#[async_trait]
impl Broker for EmbeddedBroker {
    async fn log(&self, name: &str, partitions: u32) -> Result<Arc<dyn PartitionedLog>> {
        if partitions == 0 {
            return Err(MessagingError::Config(format!(
                "log {name} needs at least one partition"
            )));
        }
        let qualified = self.store.settings.qualified(name);
        // Held across the declaration so two first uses of a name do not start two batchers.
        let mut logs = self.logs.lock().await;
        if let Some(log) = logs.get(&qualified) {
            if log.partitions() != partitions {
                return Err(partition_mismatch(&qualified, log.partitions(), partitions));
            }
            return Ok(log.clone());
        }
        self.declare_log(&qualified, partitions).await?;
        let log = Arc::new(EmbeddedLog::new(
            self.store.clone(),
            qualified.clone(),
            partitions,
        ));
        logs.insert(qualified, log.clone());
        Ok(log)
    }

    async fn queue(&self, name: &str, options: QueueOptions) -> Result<Arc<dyn WorkQueue>> {
        let qualified = self.store.settings.qualified(name);
        let mut queues = self.queues.lock().await;
        if let Some(queue) = queues.get(&qualified) {
            // As RabbitMQ refuses to redeclare a queue with other arguments.
            if queue.delivery_limit() != options.delivery_limit.max(1) {
                return Err(MessagingError::Config(format!(
                    "queue {qualified} has delivery limit {}, not {}",
                    queue.delivery_limit(),
                    options.delivery_limit
                )));
            }
            return Ok(queue.clone());
        }
        let queue = Arc::new(EmbeddedQueue::new(
            self.store.clone(),
            qualified.clone(),
            options,
        ));
        queues.insert(qualified, queue.clone());
        Ok(queue)
    }

    async fn check(&self) -> Result<()> {
        self.store.query("SELECT 1", []).await.map(|_| ())
    }

    async fn delete_log(&self, name: &str, _partitions: u32) -> Result<()> {
        let qualified = self.store.settings.qualified(name);
        let mut logs = self.logs.lock().await;
        for sql in [
            "DELETE FROM messaging_log_batches WHERE log = ?",
            "DELETE FROM messaging_logs WHERE name = ?",
        ] {
            self.store
                .execute(sql, [Value::from(qualified.clone())])
                .await?;
        }
        logs.remove(&qualified);
        Ok(())
    }

    async fn delete_queue(&self, name: &str) -> Result<()> {
        let qualified = self.store.settings.qualified(name);
        let mut queues = self.queues.lock().await;
        self.store
            .execute(
                "DELETE FROM messaging_queue_messages WHERE queue = ?",
                [Value::from(qualified.clone())],
            )
            .await?;
        queues.remove(&qualified);
        Ok(())
    }
}
