//! The partitioned log on RabbitMQ streams: partition `p` of log `name` is the stream queue
//! `<prefix.>name.<p>`. Batches are published on one confirm-mode channel per partition (which
//! keeps their order) and confirmed asynchronously; readers consume with `basic.qos`, manual acks
//! and `x-stream-offset`, and after a connection loss resume from their last record.

use std::sync::Arc;

use async_trait::async_trait;
use backon::{ExponentialBuilder, Retryable};
use futures::future::BoxFuture;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation};
use tokio::sync::{mpsc, Mutex};

use super::conn::{
    ensure_available, reconnect_delays, settle, unavailable, ChannelGuard, Connector,
};
use crate::batcher::{BatchSink, Batcher};
use crate::envelope::{Encoded, Envelope};
use crate::error::{MessagingError, Result};
use crate::settings::MessagingSettings;
use crate::traits::{Appended, LogReader, LogRecord, PartitionedLog, Position, StartAt, PEEK_WAIT};

pub(crate) fn stream_name(settings: &MessagingSettings, log: &str, partition: u32) -> String {
    format!("{}.{partition}", settings.qualified(log))
}

pub(crate) struct RabbitLog {
    name: String,
    partitions: u32,
    streams: Vec<String>,
    connector: Arc<Connector>,
    batcher: Batcher,
    sink: Arc<StreamSink>,
    prefetch: u16,
}

impl RabbitLog {
    pub(crate) async fn declare(
        connector: Arc<Connector>,
        settings: &MessagingSettings,
        name: &str,
        partitions: u32,
    ) -> Result<Self> {
        let streams: Vec<String> = (0..partitions)
            .map(|p| stream_name(settings, name, p))
            .collect();
        let channel = connector.channel().await?;
        for stream in &streams {
            let mut args = FieldTable::default();
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("stream".into()),
            );
            args.insert(
                "x-max-length-bytes".into(),
                AMQPValue::LongLongInt(
                    i64::try_from(settings.stream_max_bytes).unwrap_or(i64::MAX),
                ),
            );
            args.insert(
                "x-max-age".into(),
                AMQPValue::LongString(settings.stream_max_age.as_str().into()),
            );
            channel
                .queue_declare(
                    stream.as_str().into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..QueueDeclareOptions::default()
                    },
                    args,
                )
                .await
                .map_err(unavailable)?;
        }
        let _ = channel.close(200, "declared".into()).await;
        let sink = Arc::new(StreamSink {
            connector: connector.clone(),
            streams: streams.clone(),
            channels: (0..partitions).map(|_| Mutex::new(None)).collect(),
        });
        let batcher = Batcher::spawn(sink.clone(), partitions, settings);
        Ok(Self {
            name: name.to_owned(),
            partitions,
            streams,
            connector,
            batcher,
            sink,
            prefetch: settings.log_prefetch.max(1),
        })
    }

    pub(crate) fn partition_count(&self) -> u32 {
        self.partitions
    }
}

#[async_trait]
impl PartitionedLog for RabbitLog {
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
        if partition >= self.partitions {
            return Err(MessagingError::Config(format!("no partition {partition}")));
        }
        self.sink.publish(partition, bytes).await?.await
    }

    async fn read(&self, partition: u32, from: StartAt) -> Result<LogReader> {
        let stream = self
            .streams
            .get(partition as usize)
            .cloned()
            .ok_or_else(|| MessagingError::Config(format!("no partition {partition}")))?;
        // Subscribe once here so an unreachable broker is reported to the caller.
        let since = u64::try_from(chrono::Utc::now().timestamp() - 1).unwrap_or(0);
        // A few quick retries: a channel can be refused for a moment (seen: "invalid channel
        // state: Closing" right after another reader let its channel go).
        let first = (|| subscribe(&self.connector, &stream, Start::At(from), self.prefetch))
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(std::time::Duration::from_millis(50))
                    .with_max_delay(std::time::Duration::from_secs(1))
                    .with_jitter()
                    .with_max_times(3),
            )
            .when(|e| matches!(e, MessagingError::Unavailable(_)))
            .await?;
        let (tx, rx) = mpsc::channel(usize::from(self.prefetch) * 4);
        let task = tokio::spawn(read_loop(
            self.connector.clone(),
            stream,
            partition,
            from,
            since,
            self.prefetch,
            first,
            tx,
        ));
        Ok(LogReader::new(rx, task))
    }

    async fn peek(&self, partition: u32, from: Position) -> Result<Option<LogRecord>> {
        let stream = self
            .streams
            .get(partition as usize)
            .ok_or_else(|| MessagingError::Config(format!("no partition {partition}")))?;
        peek_stream(&self.connector, stream, partition, from).await
    }
}

/// Stream messages a peek's consumer may hold unacknowledged: the first one usually answers.
const PEEK_PREFETCH: u16 = 4;

/// Acks `delivery` (flow control only for a stream), bounded by [`super::conn::ACK_WAIT`].
async fn ack(delivery: &lapin::message::Delivery) -> std::result::Result<(), String> {
    settle(delivery.ack(BasicAckOptions::default())).await
}

/// Publishes batches, one confirm-mode channel per partition (re-opened after a loss).
struct StreamSink {
    connector: Arc<Connector>,
    streams: Vec<String>,
    channels: Vec<Mutex<Option<Channel>>>,
}

#[async_trait]
impl BatchSink for StreamSink {
    async fn publish(
        &self,
        partition: u32,
        payload: Vec<u8>,
    ) -> Result<BoxFuture<'static, Result<()>>> {
        let (Some(slot), Some(stream)) = (
            self.channels.get(partition as usize),
            self.streams.get(partition as usize),
        ) else {
            return Err(MessagingError::Config(format!("no partition {partition}")));
        };
        let mut slot = slot.lock().await;
        let channel = match slot.as_ref() {
            Some(c) if c.status().connected() => c.clone(),
            _ => {
                let c = self.connector.channel().await?;
                c.confirm_select(ConfirmSelectOptions::default())
                    .await
                    .map_err(unavailable)?;
                ensure_available(&c, stream).await?;
                *slot = Some(c.clone());
                c
            }
        };
        let confirm = channel
            .basic_publish(
                "".into(),
                stream.as_str().into(),
                // Returned (not silently dropped) when it reaches no queue.
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &payload,
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/json".into()),
            )
            .await;
        let confirm = match confirm {
            Ok(c) => c,
            Err(e) => {
                *slot = None;
                return Err(unavailable(e));
            }
        };
        Ok(Box::pin(async move {
            match confirm.await {
                Ok(Confirmation::Ack(Some(returned))) => Err(MessagingError::Unavailable(format!(
                    "the broker returned the batch: {} {}",
                    returned.reply_code, returned.reply_text
                ))),
                Ok(Confirmation::Ack(None)) => Ok(()),
                Ok(Confirmation::Nack(_)) => Err(MessagingError::Nacked(
                    "the broker did not store the batch".into(),
                )),
                Ok(Confirmation::NotRequested) => Err(MessagingError::Nacked(
                    "publisher confirms are off on this channel".into(),
                )),
                Err(e) => Err(unavailable(e)),
            }
        }))
    }
}

/// Where a (re)subscription starts.
#[derive(Debug, Clone, Copy)]
enum Start {
    At(StartAt),
    /// Messages stored since this Unix time (seconds): resuming a reader that started at `Next`
    /// and had not seen a record yet. May replay a few older records; never skips one.
    Since(u64),
}

async fn subscribe(
    connector: &Connector,
    stream: &str,
    from: Start,
    prefetch: u16,
) -> Result<(ChannelGuard, lapin::Consumer)> {
    let mut guard = connector.guarded_channel().await?;
    let channel = &guard.0;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .map_err(unavailable)?;
    let offset = match from {
        Start::At(StartAt::First) => AMQPValue::LongString("first".into()),
        Start::At(StartAt::Next) => AMQPValue::LongString("next".into()),
        Start::At(StartAt::Offset(o)) => {
            AMQPValue::LongLongInt(i64::try_from(o).unwrap_or(i64::MAX))
        }
        Start::Since(t) => AMQPValue::Timestamp(t),
    };
    let mut args = FieldTable::default();
    args.insert("x-stream-offset".into(), offset);
    let consumer = channel
        .basic_consume(
            stream.into(),
            "".into(),
            BasicConsumeOptions::default(),
            args,
        )
        .await
        .map_err(unavailable)?;
    guard.hold(&consumer);
    Ok((guard, consumer))
}

fn stream_offset(delivery: &lapin::message::Delivery) -> Option<u64> {
    let headers = delivery.properties.headers().as_ref()?;
    match headers.inner().get("x-stream-offset")? {
        AMQPValue::LongLongInt(o) => u64::try_from(*o).ok(),
        AMQPValue::LongUInt(o) => Some(u64::from(*o)),
        AMQPValue::LongInt(o) => u64::try_from(*o).ok(),
        _ => None,
    }
}

/// The events of one stream message (a batch), or one poison record when it does not decode.
fn batch_records(partition: u32, offset: u64, data: &[u8]) -> Vec<LogRecord> {
    LogRecord::batch(partition, offset, Envelope::decode_batch(data))
}

/// [`PartitionedLog::peek`]: a consumer of its own from `from.offset` with a small prefetch,
/// dropped (its channel closed) as soon as the answer is known.
async fn peek_stream(
    connector: &Connector,
    stream: &str,
    partition: u32,
    from: Position,
) -> Result<Option<LogRecord>> {
    let (_guard, mut consumer) = subscribe(
        connector,
        stream,
        Start::At(StartAt::Offset(from.offset)),
        PEEK_PREFETCH,
    )
    .await?;
    loop {
        let delivery = match tokio::time::timeout(PEEK_WAIT, consumer.next()).await {
            // Nothing delivered in time: nothing is there (see `PEEK_WAIT`).
            Err(_) => return Ok(None),
            Ok(None) => {
                return Err(MessagingError::Unavailable(format!(
                    "the consumer of {stream} ended"
                )))
            }
            Ok(Some(Err(e))) => return Err(unavailable(e)),
            Ok(Some(Ok(d))) => d,
        };
        let Some(offset) = stream_offset(&delivery) else {
            continue;
        };
        // A stream may start a consumer at the beginning of the chunk holding `from.offset`.
        let found = batch_records(partition, offset, &delivery.data)
            .into_iter()
            .find(|r| r.position >= from);
        if found.is_some() {
            return Ok(found);
        }
        // Credit for the next delivery.
        ack(&delivery).await.map_err(MessagingError::Unavailable)?;
    }
}

/// Forwards records in order; on any consumer failure re-subscribes (with backoff) at the offset
/// of the last record handed out and skips what was already handed out, so nothing is lost or
/// repeated.
#[allow(clippy::too_many_arguments)] // one task's whole state, passed once
async fn read_loop(
    connector: Arc<Connector>,
    stream: String,
    partition: u32,
    from: StartAt,
    since: u64,
    prefetch: u16,
    first: (ChannelGuard, lapin::Consumer),
    tx: mpsc::Sender<LogRecord>,
) {
    let mut last: Option<Position> = None;
    let mut consumer = Some(first);
    let mut delays = reconnect_delays();
    loop {
        let (_guard, mut current) = match consumer.take() {
            Some(c) => c,
            None => {
                let start = match (last, from) {
                    (Some(p), _) => Start::At(StartAt::Offset(p.offset)),
                    (None, StartAt::Next) => Start::Since(since),
                    (None, from) => Start::At(from),
                };
                match subscribe(&connector, &stream, start, prefetch).await {
                    Ok(c) => {
                        tracing::info!(stream = %stream, ?start, "log reader resumed");
                        c
                    }
                    Err(e) => {
                        let wait = delays.next().unwrap_or(std::time::Duration::from_secs(5));
                        tracing::warn!(stream = %stream, error = %e, ?wait, "log reader reconnecting");
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                }
            }
        };
        while let Some(delivery) = current.next().await {
            let delivery = match delivery {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(stream = %stream, error = %e, "log reader lost its consumer");
                    break;
                }
            };
            delays = reconnect_delays();
            let Some(offset) = stream_offset(&delivery) else {
                tracing::error!(stream = %stream, "stream delivery without x-stream-offset");
                let _ = ack(&delivery).await;
                continue;
            };
            for record in batch_records(partition, offset, &delivery.data) {
                if last.is_some_and(|l| record.position <= l) {
                    continue;
                }
                let position = record.position;
                if tx.send(record).await.is_err() {
                    return; // the reader was dropped
                }
                last = Some(position);
            }
            // The ack is flow control only (credit for the next deliveries); progress is `last`.
            if let Err(e) = ack(&delivery).await {
                tracing::warn!(stream = %stream, error = %e, "log reader lost its consumer");
                break;
            }
        }
        if tx.is_closed() {
            return;
        }
    }
}
