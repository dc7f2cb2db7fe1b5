//! One AMQP connection per broker, re-established on demand after it is lost.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use secrecy::ExposeSecret;
use tokio::sync::Mutex;

use crate::error::{MessagingError, Result};
use crate::settings::MessagingSettings;

pub(crate) struct Connector {
    url: String,
    name: String,
    current: Mutex<Option<Arc<Connection>>>,
}

pub(crate) fn unavailable(e: lapin::Error) -> MessagingError {
    MessagingError::Unavailable(e.to_string())
}

/// How long an ack or nack may take before its consumer takes the channel for lost. lapin
/// resolves one through its connection task; one queued just as that task ends on a dropped
/// connection is never resolved, and an unbounded wait would stall the consumer for good without
/// a word. On a live connection it resolves in microseconds.
pub(crate) const ACK_WAIT: Duration = Duration::from_secs(10);

/// Waits for an ack or nack at most [`ACK_WAIT`]: the reason when it fails or never resolves
/// (the broker then delivers the message again once the channel is gone).
pub(crate) async fn settle<T>(
    op: impl std::future::Future<Output = lapin::Result<T>>,
) -> std::result::Result<(), String> {
    match tokio::time::timeout(ACK_WAIT, op).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("the broker did not settle it within {ACK_WAIT:?}")),
    }
}

impl Connector {
    pub(crate) fn new(settings: &MessagingSettings) -> Self {
        Self {
            url: settings.url.expose_secret().to_owned(),
            name: settings.connection_name.clone(),
            current: Mutex::new(None),
        }
    }

    /// The live connection, connecting (once, without retrying) when there is none.
    pub(crate) async fn connection(&self) -> Result<Arc<Connection>> {
        let mut current = self.current.lock().await;
        if let Some(c) = current.as_ref() {
            if c.status().connected() {
                return Ok(c.clone());
            }
        }
        let props = ConnectionProperties::default()
            .with_connection_name(format!("{}-{}", self.name, std::process::id()).into());
        let conn = tokio::time::timeout(
            Duration::from_secs(5),
            Connection::connect(&self.url, props),
        )
        .await
        .map_err(|_| MessagingError::Unavailable("connecting to RabbitMQ timed out".into()))?
        .map_err(unavailable)?;
        tracing::info!(connection = %self.name, "connected to rabbitmq");
        let conn = Arc::new(conn);
        *current = Some(conn.clone());
        Ok(conn)
    }

    /// A new channel on the live connection.
    pub(crate) async fn channel(&self) -> Result<Channel> {
        let conn = self.connection().await?;
        conn.create_channel().await.map_err(unavailable)
    }

    /// A channel for a consumer, closed when the guard is dropped: guarded as soon as it exists,
    /// so a subscribe cut short (its task aborted when the receiver is dropped, or an error) does
    /// not leave a consumer on it holding its prefetch of unacked deliveries for as long as the
    /// connection lives.
    pub(crate) async fn guarded_channel(&self) -> Result<ChannelGuard> {
        Ok(ChannelGuard(self.channel().await?, None))
    }
}

/// Delays for reconnect loops: exponential from 100 ms to 5 s, with jitter, forever.
pub(crate) fn reconnect_delays() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Closes its channel when dropped (a reader or consumer going away, even by task abort), so the
/// broker requeues whatever that consumer held unanswered.
///
/// It also holds a handle on the channel's consumer ([`ChannelGuard::hold`]) until the channel
/// is closed. lapin cancels a consumer when its last handle is dropped, in a task of its own;
/// a cancel that finds the channel already closing fails, and lapin takes that failure for the
/// connection's and closes the connection — every other consumer and publisher of the process
/// on it. Dropped only after the close, the consumer finds its channel closed and sends nothing.
pub(crate) struct ChannelGuard(pub(crate) Channel, Option<lapin::Consumer>);

impl ChannelGuard {
    /// Keeps a handle on `consumer` until the channel is closed (see the type's docs).
    pub(crate) fn hold(&mut self, consumer: &lapin::Consumer) {
        self.1 = Some(consumer.clone());
    }
}

impl Drop for ChannelGuard {
    fn drop(&mut self) {
        let channel = self.0.clone();
        let consumer = self.1.take();
        if channel.status().connected() {
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move {
                    let _ = channel.close(200, "consumer gone".into()).await;
                    drop(consumer);
                });
            }
        }
    }
}

/// Checks that `queue` is up (a passive declare) before a new channel publishes to it. Right after
/// a broker restart a stream or quorum queue exists before its leader runs, and a message
/// published to it then can be confirmed without being stored: publishing waits until it runs.
pub(crate) async fn ensure_available(channel: &Channel, queue: &str) -> Result<()> {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map(|_| ())
        .map_err(unavailable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_ack_that_never_resolves_fails_after_the_wait_instead_of_stalling() {
        let started = tokio::time::Instant::now();
        let outcome = settle(std::future::pending::<lapin::Result<()>>()).await;
        assert!(
            outcome
                .as_ref()
                .is_err_and(|why| why.contains("did not settle")),
            "{outcome:?}"
        );
        assert_eq!(started.elapsed(), ACK_WAIT);
        assert!(settle(async { Ok::<_, lapin::Error>(true) }).await.is_ok());
    }
}
