//! Work queues on RabbitMQ quorum queues. `<name>` has a delivery limit and dead-letters
//! (at-least-once, with `reject-publish` overflow) to `<name>.parked`. Consumers park a message
//! themselves, with the reason in its headers, when it is rejected, undecodable, or nacked for the
//! last allowed time; the broker's own delivery limit is the safety net for consumers that die
//! without answering. Both queues declare their delivery limit explicitly, so no broker version's
//! default applies.
//!
//! Parked messages are never looked at in place (a `basic.get` is a delivery: it reorders them,
//! counts towards the limit and hides them meanwhile); they are consumed by whoever keeps them
//! (`take_parked`) and acked once stored there.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation};
use tokio::sync::{mpsc, Mutex};

use super::conn::{
    ensure_available, reconnect_delays, settle, unavailable, ChannelGuard, Connector,
};
use crate::envelope::Envelope;
use crate::error::{MessagingError, Result};
use crate::settings::MessagingSettings;
use crate::traits::{
    Acker, Parked, ParkedAcker, ParkedMessage, ParkedReceiver, QueueMessage, QueueOptions,
    QueueReceiver, WorkQueue,
};

const PARK_REASON: &str = "x-park-reason";
const MESSAGE_ID: &str = "x-message-id";
const DELIVERIES: &str = "x-deliveries";
const PARKED_AT: &str = "x-parked-at";
const PARK_ID: &str = "x-park-id";

pub(crate) fn parked_name(queue: &str) -> String {
    format!("{queue}.parked")
}

pub(crate) struct RabbitQueue {
    name: String,
    queue: String,
    parked: String,
    options: QueueOptions,
    connector: Arc<Connector>,
    publisher: Arc<Publisher>,
}

impl RabbitQueue {
    pub(crate) async fn declare(
        connector: Arc<Connector>,
        settings: &MessagingSettings,
        name: &str,
        options: QueueOptions,
    ) -> Result<Self> {
        let queue = settings.qualified(name);
        let parked = parked_name(&queue);
        let channel = connector.channel().await?;
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let mut parked_args = FieldTable::default();
        parked_args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        parked_args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(settings.parked_delivery_limit.max(1))),
        );
        let channel = match channel
            .queue_declare(parked.as_str().into(), durable, parked_args)
            .await
        {
            Ok(_) => channel,
            // Declared by an earlier version without a delivery limit. RabbitMQ cannot change a
            // queue's arguments, and refusing to start would turn an upgrade into an outage;
            // the queue is drained continuously by the Supervisor, so the broker's default limit
            // only matters for a message handed out again and again by crashing Supervisors.
            Err(e) if e.to_string().contains("PRECONDITION_FAILED") => {
                tracing::error!(
                    queue = %parked,
                    error = %e,
                    "the parked queue exists with other arguments (an earlier version declared it \
                     without x-delivery-limit); kept as it is, so the broker's default delivery \
                     limit applies to it: once it is empty, delete it to have it declared anew"
                );
                // The refused declaration closed the channel.
                connector.channel().await?
            }
            Err(e) => return Err(unavailable(e)),
        };
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(options.delivery_limit.max(1))),
        );
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(parked.as_str().into()),
        );
        args.insert(
            "x-dead-letter-strategy".into(),
            AMQPValue::LongString("at-least-once".into()),
        );
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
        channel
            .queue_declare(queue.as_str().into(), durable, args)
            .await
            .map_err(unavailable)?;
        let _ = channel.close(200, "declared".into()).await;
        Ok(Self {
            name: name.to_owned(),
            publisher: Arc::new(Publisher {
                connector: connector.clone(),
                channel: Mutex::new(None),
            }),
            queue,
            parked,
            options,
            connector,
        })
    }
}

/// A shared confirm-mode channel; concurrent publishes pipeline on it.
struct Publisher {
    connector: Arc<Connector>,
    channel: Mutex<Option<OpenChannel>>,
}

/// The publishing channel and the queues known to be running since it was opened (a broker
/// restart means a new channel, so every queue is checked again).
struct OpenChannel {
    channel: Channel,
    checked: HashSet<String>,
}

impl Publisher {
    async fn publish(&self, queue: &str, payload: &[u8], props: BasicProperties) -> Result<()> {
        let confirm = {
            let mut slot = self.channel.lock().await;
            let mut open = match slot.take() {
                Some(open) if open.channel.status().connected() => open,
                _ => {
                    let channel = self.connector.channel().await?;
                    channel
                        .confirm_select(ConfirmSelectOptions::default())
                        .await
                        .map_err(unavailable)?;
                    OpenChannel {
                        channel,
                        checked: HashSet::new(),
                    }
                }
            };
            if !open.checked.contains(queue) {
                ensure_available(&open.channel, queue).await?;
                open.checked.insert(queue.to_owned());
            }
            let channel = open.channel.clone();
            *slot = Some(open);
            match channel
                .basic_publish(
                    "".into(),
                    queue.into(),
                    // Returned (not silently dropped) when it reaches no queue.
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    payload,
                    props.with_delivery_mode(2),
                )
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    *slot = None;
                    return Err(unavailable(e));
                }
            }
        };
        match confirm.await.map_err(unavailable)? {
            Confirmation::Ack(Some(returned)) => Err(MessagingError::Unavailable(format!(
                "the broker returned the message for {queue}: {} {}",
                returned.reply_code, returned.reply_text
            ))),
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Nack(_) => Err(MessagingError::Nacked(format!(
                "{queue} refused the message (full?)"
            ))),
            Confirmation::NotRequested => Err(MessagingError::Nacked("confirms are off".into())),
        }
    }
}

fn header<'a>(props: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    props.headers().as_ref()?.inner().get(name)
}

fn header_text(props: &BasicProperties, name: &str) -> Option<String> {
    match header(props, name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

fn header_int(props: &BasicProperties, name: &str) -> Option<i64> {
    match header(props, name)? {
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::LongUInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortUInt(v) => Some(i64::from(*v)),
        _ => None,
    }
}

/// Quorum queues count earlier deliveries in `x-delivery-count` (absent on the first).
fn delivery_count(props: &BasicProperties) -> u32 {
    let earlier = header_int(props, "x-delivery-count").unwrap_or(0);
    u32::try_from(earlier.max(0))
        .unwrap_or(u32::MAX)
        .saturating_add(1)
}

fn message_id_of(props: &BasicProperties) -> Option<String> {
    header_text(props, MESSAGE_ID)
        .or_else(|| props.message_id().as_ref().map(|m| m.as_str().to_owned()))
}

/// Moves a message to the parked queue with its reason; the caller acks the original after.
async fn park(
    publisher: &Publisher,
    parked: &str,
    payload: &[u8],
    message_id: &str,
    deliveries: u32,
    reason: &str,
) -> Result<()> {
    let mut headers = FieldTable::default();
    headers.insert(PARK_REASON.into(), AMQPValue::LongString(reason.into()));
    headers.insert(MESSAGE_ID.into(), AMQPValue::LongString(message_id.into()));
    headers.insert(
        DELIVERIES.into(),
        AMQPValue::LongLongInt(i64::from(deliveries)),
    );
    headers.insert(
        PARKED_AT.into(),
        AMQPValue::LongString(Utc::now().to_rfc3339().into()),
    );
    // One id per parking, carried by every redelivery of the parked copy.
    headers.insert(
        PARK_ID.into(),
        AMQPValue::LongString(uuid::Uuid::new_v4().to_string().into()),
    );
    let props = BasicProperties::default()
        .with_headers(headers)
        .with_message_id(ShortString::from(message_id.to_owned()));
    publisher.publish(parked, payload, props).await?;
    tracing::warn!(queue = parked, message_id, reason, "message parked");
    Ok(())
}

struct RabbitAcker {
    acker: lapin::Acker,
    publisher: Arc<Publisher>,
    parked: String,
    payload: Vec<u8>,
    limit: u32,
}

#[async_trait]
impl Acker for RabbitAcker {
    async fn ack(&self) -> Result<()> {
        settle(self.acker.ack(BasicAckOptions::default()))
            .await
            .map_err(MessagingError::Unavailable)
    }

    async fn nack(&self, delivery_count: u32, event: &Envelope, reason: &str) -> Result<()> {
        if delivery_count >= self.limit {
            let reason = format!("delivery limit {} reached: {reason}", self.limit);
            return self.reject(delivery_count, event, &reason).await;
        }
        settle(self.acker.nack(BasicNackOptions {
            requeue: true,
            multiple: false,
        }))
        .await
        .map_err(MessagingError::Unavailable)
    }

    async fn reject(&self, delivery_count: u32, event: &Envelope, reason: &str) -> Result<()> {
        park(
            &self.publisher,
            &self.parked,
            &self.payload,
            &event.id.to_string(),
            delivery_count,
            reason,
        )
        .await?;
        self.ack().await
    }
}

#[async_trait]
impl WorkQueue for RabbitQueue {
    fn name(&self) -> &str {
        &self.name
    }

    async fn publish(&self, event: Envelope) -> Result<()> {
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id(ShortString::from(event.id.to_string()));
        self.publisher
            .publish(&self.queue, &event.encode()?, props)
            .await
    }

    async fn publish_raw(&self, bytes: Vec<u8>) -> Result<()> {
        self.publisher
            .publish(&self.queue, &bytes, BasicProperties::default())
            .await
    }

    async fn consume(&self, prefetch: u16) -> Result<QueueReceiver> {
        let first = subscribe(&self.connector, &self.queue, prefetch).await?;
        let (tx, rx) = mpsc::channel(usize::from(prefetch.max(1)));
        let task = tokio::spawn(consume_loop(
            self.connector.clone(),
            self.publisher.clone(),
            self.queue.clone(),
            self.parked.clone(),
            self.options.delivery_limit.max(1),
            prefetch,
            first,
            tx,
        ));
        Ok(QueueReceiver::new(rx, task))
    }

    async fn depth(&self) -> Result<u64> {
        let channel = self.connector.channel().await?;
        let q = channel
            .queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(unavailable)?;
        let _ = channel.close(200, "done".into()).await;
        Ok(u64::from(q.message_count()))
    }

    async fn take_parked(&self, prefetch: u16) -> Result<ParkedReceiver> {
        let first = subscribe(&self.connector, &self.parked, prefetch).await?;
        let (tx, rx) = mpsc::channel(usize::from(prefetch.max(1)));
        let task = tokio::spawn(take_parked_loop(
            self.connector.clone(),
            self.parked.clone(),
            prefetch,
            first,
            tx,
        ));
        Ok(ParkedReceiver::new(rx, task))
    }

    async fn republish(&self, message_id: &str, payload: Vec<u8>) -> Result<()> {
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id(ShortString::from(message_id.to_owned()));
        self.publisher.publish(&self.queue, &payload, props).await?;
        tracing::info!(queue = %self.queue, message_id, "parked message republished");
        Ok(())
    }
}

fn describe_parked(d: &lapin::message::Delivery) -> Parked {
    let event = Envelope::decode_one(&d.data).ok();
    let reason = header_text(&d.properties, PARK_REASON)
        .or_else(|| {
            header_text(&d.properties, "x-first-death-reason")
                .map(|r| format!("dead-lettered by the broker: {r}"))
        })
        .unwrap_or_else(|| "dead-lettered by the broker".to_owned());
    let message_id = message_id_of(&d.properties)
        .or_else(|| event.as_ref().map(|e| e.id.to_string()))
        .unwrap_or_default();
    let delivery_count = header_int(&d.properties, DELIVERIES)
        .and_then(|v| u32::try_from(v).ok())
        .unwrap_or(0);
    let death = first_death(&d.properties);
    let parked_at = header_text(&d.properties, PARKED_AT)
        .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
        .map(|t| t.with_timezone(&Utc))
        .or_else(|| {
            death
                .and_then(|(at, _)| i64::try_from(at).ok())
                .and_then(|at| DateTime::from_timestamp(at, 0))
        })
        .unwrap_or_else(Utc::now);
    // Dead-lettered by the broker, the message has no park id of ours: the death's time and
    // count identify this parking just as well, on every redelivery of it.
    let park_id = header_text(&d.properties, PARK_ID).unwrap_or_else(|| match death {
        Some((at, count)) => format!("{message_id}@dead-lettered-{at}-{count}"),
        None => format!("{message_id}@dead-lettered"),
    });
    Parked {
        park_id,
        message_id,
        payload: d.data.clone(),
        event,
        reason,
        delivery_count,
        parked_at,
    }
}

/// The time (unix seconds) and count of the broker's first `x-death` record, if any.
fn first_death(props: &BasicProperties) -> Option<(u64, i64)> {
    let AMQPValue::FieldArray(deaths) = header(props, "x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(first) = deaths.as_slice().first()? else {
        return None;
    };
    let at = match first.inner().get("time")? {
        AMQPValue::Timestamp(t) => *t,
        _ => return None,
    };
    let count = match first.inner().get("count") {
        Some(AMQPValue::LongLongInt(n)) => *n,
        Some(AMQPValue::LongInt(n)) => i64::from(*n),
        _ => 1,
    };
    Some((at, count))
}

struct RabbitParkedAcker(lapin::Acker);

#[async_trait]
impl ParkedAcker for RabbitParkedAcker {
    async fn ack(&self) -> Result<()> {
        settle(self.0.ack(BasicAckOptions::default()))
            .await
            .map_err(MessagingError::Unavailable)
    }
}

/// Hands out the parked queue's messages; re-subscribes with backoff after a connection loss
/// (the broker returns whatever was unanswered to the parked queue).
async fn take_parked_loop(
    connector: Arc<Connector>,
    parked: String,
    prefetch: u16,
    first: (ChannelGuard, lapin::Consumer),
    tx: mpsc::Sender<ParkedMessage>,
) {
    let tx = &tx;
    follow(
        &connector,
        &parked,
        "parked queue consumer",
        prefetch,
        first,
        tx,
        |delivery| {
            let message = ParkedMessage {
                parked: describe_parked(&delivery),
                acker: Box::new(RabbitParkedAcker(delivery.acker.clone())),
            };
            // Fails when the receiver is dropped: closing the channel returns the rest.
            async move { tx.send(message).await.is_ok() }
        },
    )
    .await;
}

/// Hands each delivery of `queue` to `handle`, which returns `false` to re-subscribe (or once
/// the receiver behind `tx` is gone, which ends the loop); re-subscribes with backoff after a
/// connection loss. `what` names the consumer in the logs.
async fn follow<M, F>(
    connector: &Connector,
    queue: &str,
    what: &str,
    prefetch: u16,
    first: (ChannelGuard, lapin::Consumer),
    tx: &mpsc::Sender<M>,
    mut handle: impl FnMut(lapin::message::Delivery) -> F,
) where
    F: Future<Output = bool>,
{
    let mut consumer = Some(first);
    let mut delays = reconnect_delays();
    loop {
        let (_guard, mut current) = match consumer.take() {
            Some(c) => c,
            None => match subscribe(connector, queue, prefetch).await {
                Ok(c) => {
                    tracing::info!(queue = %queue, "{what} resumed");
                    c
                }
                Err(e) => {
                    let wait = delays.next().unwrap_or(std::time::Duration::from_secs(5));
                    tracing::warn!(queue = %queue, error = %e, ?wait, "{what} reconnecting");
                    tokio::select! {
                        () = tokio::time::sleep(wait) => continue,
                        () = tx.closed() => return,
                    }
                }
            },
        };
        while let Some(delivery) = current.next().await {
            let delivery = match delivery {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(queue = %queue, error = %e, "{what} lost");
                    break;
                }
            };
            delays = reconnect_delays();
            if !handle(delivery).await {
                break;
            }
        }
        if tx.is_closed() {
            return;
        }
    }
}

async fn subscribe(
    connector: &Connector,
    queue: &str,
    prefetch: u16,
) -> Result<(ChannelGuard, lapin::Consumer)> {
    let mut guard = connector.guarded_channel().await?;
    let channel = &guard.0;
    channel
        .basic_qos(prefetch.max(1), BasicQosOptions::default())
        .await
        .map_err(unavailable)?;
    let consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(unavailable)?;
    guard.hold(&consumer);
    Ok((guard, consumer))
}

/// Delivers decodable messages to the receiver and parks the rest; re-subscribes with backoff
/// after a connection loss (the broker redelivers whatever was unanswered).
#[allow(clippy::too_many_arguments)]
async fn consume_loop(
    connector: Arc<Connector>,
    publisher: Arc<Publisher>,
    queue: String,
    parked: String,
    limit: u32,
    prefetch: u16,
    first: (ChannelGuard, lapin::Consumer),
    tx: mpsc::Sender<QueueMessage>,
) {
    let (publisher, parked, tx) = (&publisher, &parked, &tx);
    follow(
        &connector,
        &queue,
        "queue consumer",
        prefetch,
        first,
        tx,
        |delivery| async move {
            let count = delivery_count(&delivery.properties);
            match Envelope::decode_one(&delivery.data) {
                Ok(event) => {
                    let message = QueueMessage {
                        event,
                        delivery_count: count,
                        acker: Box::new(RabbitAcker {
                            acker: delivery.acker.clone(),
                            publisher: publisher.clone(),
                            parked: parked.clone(),
                            payload: delivery.data.clone(),
                            limit,
                        }),
                    };
                    // Fails when the receiver is dropped: closing the channel requeues the rest.
                    tx.send(message).await.is_ok()
                }
                Err(poison) => {
                    let id = message_id_of(&delivery.properties)
                        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
                    let parked_ok = park(
                        publisher,
                        parked,
                        &delivery.data,
                        &id,
                        count,
                        &poison.reason,
                    )
                    .await;
                    let outcome = match parked_ok {
                        Ok(()) => settle(delivery.ack(BasicAckOptions::default())).await,
                        Err(_) => {
                            settle(delivery.nack(BasicNackOptions {
                                requeue: true,
                                multiple: false,
                            }))
                            .await
                        }
                    };
                    outcome.is_ok()
                }
            }
        },
    )
    .await;
}
