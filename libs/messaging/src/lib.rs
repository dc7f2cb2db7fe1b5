//! The channels every service talks over: a **partitioned log** (an ordered, replayable stream per
//! partition; `delivery-requests`, `workflow-events`) and **work queues** (competing consumers with
//! acks, a delivery limit and a parked dead-letter queue; `supervisor.compensations`).
//!
//! Two backends keep the same semantics and pass the same conformance suite:
//! - RabbitMQ (production): one stream queue per partition, quorum queues with a dead-letter
//!   exchange, publisher confirms pipelined, reconnection with backoff.
//! - Embedded (one process, `make run`): SQLite, durable across restarts.
//!
//! [`memory::MemoryLog`] is a third, in-memory log for deterministic simulations (no durability).
//!
//! Log appends are micro-batched: concurrent appends to one partition travel in one broker message,
//! and each event is addressed by its [`Position`] (the message's offset and the index inside it).

mod batcher;
mod envelope;
mod error;
mod hash;
mod settings;
mod traits;

pub mod embedded;
pub mod memory;
pub mod rabbitmq;

pub use envelope::{Encoded, Envelope, Poison};
pub use error::{MessagingError, Result};
pub use hash::{partition_for, stable_hash};
pub use settings::MessagingSettings;
pub use traits::{
    Appended, Broker, LogReader, LogRecord, Parked, ParkedMessage, ParkedReceiver, PartitionedLog,
    Position, QueueMessage, QueueOptions, QueueReceiver, StartAt, WorkQueue, PEEK_WAIT,
};

use std::sync::Arc;

use futures::future::BoxFuture;

/// Ready when the broker answers (a `/readyz` check of every service that uses one).
pub struct BrokerCheck(pub Arc<dyn Broker>);

impl service_kit::ReadinessCheck for BrokerCheck {
    fn name(&self) -> &'static str {
        "broker"
    }

    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move { self.0.check().await.map_err(|e| e.to_string()) })
    }
}

/// Opens the broker named by `settings.url`: `amqp://...` (RabbitMQ) or `sqlite://...` (embedded).
pub async fn connect(settings: &MessagingSettings) -> Result<Arc<dyn Broker>> {
    let url = secrecy::ExposeSecret::expose_secret(&settings.url);
    if url.starts_with("amqp://") || url.starts_with("amqps://") {
        rabbitmq::connect(settings).await
    } else if url.starts_with("sqlite:") {
        embedded::open(settings).await
    } else {
        Err(MessagingError::Config(
            "messaging url must start with amqp://, amqps:// or sqlite:".into(),
        ))
    }
}
