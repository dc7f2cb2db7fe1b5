//! RabbitMQ backend over lapin: one stream queue per log partition, quorum queues with a
//! dead-letter exchange for work queues, publisher confirms pipelined, and recovery from
//! connection loss (publishers fail fast with an error; readers and consumers reconnect with
//! exponential backoff and jitter and resume where they were).

mod conn;
mod log;
mod queue;

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use lapin::options::QueueDeleteOptions;
use tokio::sync::Mutex;

use crate::error::{MessagingError, Result};
use crate::settings::MessagingSettings;
use crate::traits::{Broker, PartitionedLog, QueueOptions, WorkQueue};

pub(crate) use conn::Connector;

/// Connects to RabbitMQ (failing at once when it cannot be reached).
pub async fn connect(settings: &MessagingSettings) -> Result<Arc<dyn Broker>> {
    Ok(Arc::new(RabbitBroker::connect(settings).await?))
}

/// The RabbitMQ broker: hands out logs and queues declared on first use.
pub struct RabbitBroker {
    connector: Arc<Connector>,
    settings: MessagingSettings,
    logs: Mutex<HashMap<String, Arc<log::RabbitLog>>>,
    queues: Mutex<HashMap<String, Arc<queue::RabbitQueue>>>,
}

impl RabbitBroker {
    pub async fn connect(settings: &MessagingSettings) -> Result<Self> {
        let connector = Arc::new(Connector::new(settings));
        connector.channel().await?;
        Ok(Self {
            connector,
            settings: settings.clone(),
            logs: Mutex::new(HashMap::new()),
            queues: Mutex::new(HashMap::new()),
        })
    }
}

#[async_trait]
impl Broker for RabbitBroker {
    async fn log(&self, name: &str, partitions: u32) -> Result<Arc<dyn PartitionedLog>> {
        if partitions == 0 {
            return Err(MessagingError::Config(
                "a log needs at least one partition".into(),
            ));
        }
        let mut logs = self.logs.lock().await;
        if let Some(existing) = logs.get(name) {
            if existing.partition_count() != partitions {
                return Err(MessagingError::Config(format!(
                    "log {name} has {} partitions, not {partitions}",
                    existing.partition_count()
                )));
            }
            return Ok(existing.clone());
        }
        let log = Arc::new(
            log::RabbitLog::declare(self.connector.clone(), &self.settings, name, partitions)
                .await?,
        );
        logs.insert(name.to_owned(), log.clone());
        Ok(log)
    }

    async fn queue(&self, name: &str, options: QueueOptions) -> Result<Arc<dyn WorkQueue>> {
        let mut queues = self.queues.lock().await;
        if let Some(existing) = queues.get(name) {
            return Ok(existing.clone());
        }
        let q = Arc::new(
            queue::RabbitQueue::declare(self.connector.clone(), &self.settings, name, options)
                .await?,
        );
        queues.insert(name.to_owned(), q.clone());
        Ok(q)
    }

    async fn check(&self) -> Result<()> {
        let channel = self.connector.channel().await?;
        let _ = channel.close(200, "readiness check".into()).await;
        Ok(())
    }

    async fn delete_log(&self, name: &str, partitions: u32) -> Result<()> {
        self.logs.lock().await.remove(name);
        let channel = self.connector.channel().await?;
        for p in 0..partitions {
            let stream = log::stream_name(&self.settings, name, p);
            channel
                .queue_delete(stream.as_str().into(), QueueDeleteOptions::default())
                .await
                .map_err(conn::unavailable)?;
        }
        let _ = channel.close(200, "done".into()).await;
        Ok(())
    }

    async fn delete_queue(&self, name: &str) -> Result<()> {
        self.queues.lock().await.remove(name);
        let channel = self.connector.channel().await?;
        let main = self.settings.qualified(name);
        for q in [main.clone(), queue::parked_name(&main)] {
            channel
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await
                .map_err(conn::unavailable)?;
        }
        let _ = channel.close(200, "done".into()).await;
        Ok(())
    }
}
