#![allow(clippy::unwrap_used, clippy::expect_used)]
//! What only the embedded backend has to get right on its own: a process that died with
//! messages in flight, several brokers on one file, and its configuration checks. The shared
//! semantics are in `tests/conformance.rs`.

use std::time::Duration;

use sea_orm::Value;

use super::*;
use crate::envelope::Envelope;
use crate::traits::StartAt;

const WAIT: Duration = Duration::from_secs(10);

fn settings(dir: &tempfile::TempDir) -> MessagingSettings {
    MessagingSettings::new(format!(
        "sqlite://{}/nested/folder/m.db?mode=rwc",
        dir.path().display()
    ))
}

fn event(n: u64) -> Envelope {
    Envelope::new("test.event", 1, "k", &serde_json::json!({ "n": n })).unwrap()
}

async fn next(rx: &mut crate::traits::QueueReceiver) -> crate::traits::QueueMessage {
    tokio::time::timeout(WAIT, rx.next())
        .await
        .expect("timed out waiting for a message")
        .expect("receiver ended")
}

async fn quiet(rx: &mut crate::traits::QueueReceiver) {
    let got = tokio::time::timeout(Duration::from_millis(400), rx.next()).await;
    assert!(got.is_err(), "unexpected message: {got:?}");
}

async fn next_parked(rx: &mut crate::traits::ParkedReceiver) -> crate::traits::ParkedMessage {
    tokio::time::timeout(WAIT, rx.next())
        .await
        .expect("timed out waiting for a parked message")
        .expect("receiver ended")
}

/// A broker on the file in `dir`, and its queue `q` with the default options.
async fn open_queue(dir: &tempfile::TempDir) -> (EmbeddedBroker, Arc<dyn WorkQueue>) {
    let broker = open_broker(&settings(dir)).await.unwrap();
    let queue = broker.queue("q", QueueOptions::default()).await.unwrap();
    (broker, queue)
}

/// Rows of `queue` in `state`, read straight from the file.
async fn rows_in(broker: &EmbeddedBroker, state: &str) -> i64 {
    let rows = broker
        .store
        .query(
            "SELECT COUNT(*) AS n FROM messaging_queue_messages WHERE state = ?",
            [Value::from(state.to_owned())],
        )
        .await
        .unwrap();
    column::<i64>(&rows[0], "n").unwrap()
}

#[tokio::test]
async fn messages_in_flight_when_the_process_died_are_redelivered_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, queue) = open_queue(&dir).await;
    let sent = event(1);
    queue.publish(sent.clone()).await.unwrap();
    // What a process that crashed after a delivery leaves behind: a claim by an instance that no
    // longer exists.
    let claimed = broker
        .store
        .execute(
            "UPDATE messaging_queue_messages
             SET state = 'inflight', delivery_count = 1, owner = 'gone', consumer = 'gone'",
            Vec::<Value>::new(),
        )
        .await
        .unwrap();
    assert_eq!(claimed, 1);
    drop((queue, broker));

    let (_broker, queue) = open_queue(&dir).await;
    assert_eq!(queue.depth().await.unwrap(), 1);
    let mut rx = queue.consume(1).await.unwrap();
    let m = next(&mut rx).await;
    assert_eq!((m.event.id, m.delivery_count), (sent.id, 2));
    m.ack().await.unwrap();
}

#[tokio::test]
async fn a_second_broker_on_the_file_leaves_live_consumers_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (_first, queue) = open_queue(&dir).await;
    queue.publish(event(1)).await.unwrap();
    let mut rx = queue.consume(1).await.unwrap();
    let held = next(&mut rx).await;

    let (_second, other) = open_queue(&dir).await;
    assert_eq!(
        other.depth().await.unwrap(),
        0,
        "still in flight with its consumer"
    );
    let mut other_rx = other.consume(1).await.unwrap();
    quiet(&mut other_rx).await;

    held.ack().await.unwrap();
    assert_eq!(other.depth().await.unwrap(), 0);
}

#[tokio::test]
async fn a_message_whose_consumers_keep_dying_is_parked_at_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let broker = open_broker(&settings(&dir)).await.unwrap();
    let queue = broker
        .queue("q", QueueOptions { delivery_limit: 2 })
        .await
        .unwrap();
    let sent = event(1);
    queue.publish(sent.clone()).await.unwrap();
    for delivery in 1..=2 {
        let mut rx = queue.consume(1).await.unwrap();
        let m = next(&mut rx).await;
        assert_eq!(m.delivery_count, delivery);
        // The consumer "crashes": neither answer nor receiver survive.
        drop((m, rx));
    }
    let mut rx = queue.consume(1).await.unwrap();
    quiet(&mut rx).await;
    let mut taken = queue.take_parked(10).await.unwrap();
    let parked = next_parked(&mut taken).await.parked;
    assert_eq!(parked.message_id, sent.id.to_string());
    assert_eq!(parked.delivery_count, 2);
    assert!(
        parked.reason.starts_with("delivery limit 2 reached"),
        "{}",
        parked.reason
    );
}

#[tokio::test]
async fn an_answer_after_the_consumer_went_away_does_not_touch_the_redelivery() {
    let dir = tempfile::tempdir().unwrap();
    let (_broker, queue) = open_queue(&dir).await;
    queue.publish(event(1)).await.unwrap();
    let mut rx = queue.consume(1).await.unwrap();
    let stale = next(&mut rx).await;
    drop(rx);

    let mut rx = queue.consume(1).await.unwrap();
    let fresh = next(&mut rx).await;
    assert_eq!(fresh.delivery_count, 2);
    assert!(matches!(stale.ack().await, Err(MessagingError::Closed)));
    fresh.ack().await.unwrap();
    assert_eq!(queue.depth().await.unwrap(), 0);
}

#[tokio::test]
async fn parked_messages_and_log_batches_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, queue) = open_queue(&dir).await;
    queue.publish_raw(b"nope".to_vec()).await.unwrap();
    let mut rx = queue.consume(1).await.unwrap();
    quiet(&mut rx).await;
    assert_eq!(rows_in(&broker, "parked").await, 1);
    let log = broker.log("l", 2).await.unwrap();
    log.append(event(7)).await.unwrap();
    drop((rx, queue, log, broker));

    let (broker, queue) = open_queue(&dir).await;
    let mut taken = queue.take_parked(10).await.unwrap();
    let parked = next_parked(&mut taken).await.parked;
    assert_eq!(parked.payload, b"nope");
    assert!(
        parked.reason.starts_with("undecodable"),
        "{}",
        parked.reason
    );
    let log = broker.log("l", 2).await.unwrap();
    let p = log.partition_of("k");
    let mut reader = log.read(p, StartAt::First).await.unwrap();
    let record = tokio::time::timeout(WAIT, reader.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        record.event.ok().map(|e| e.body["n"].clone()),
        Some(7.into())
    );
}

#[tokio::test]
async fn partition_counts_and_delivery_limits_must_agree() {
    let dir = tempfile::tempdir().unwrap();
    let broker = open_broker(&settings(&dir)).await.unwrap();
    broker.log("l", 4).await.unwrap();
    assert!(matches!(
        broker.log("l", 3).await,
        Err(MessagingError::Config(_))
    ));
    assert!(matches!(
        broker.log("zero", 0).await,
        Err(MessagingError::Config(_))
    ));
    broker
        .queue("q", QueueOptions { delivery_limit: 3 })
        .await
        .unwrap();
    assert!(matches!(
        broker.queue("q", QueueOptions { delivery_limit: 4 }).await,
        Err(MessagingError::Config(_))
    ));
    drop(broker);

    // Recorded in the file: another process cannot silently repartition.
    let broker = open_broker(&settings(&dir)).await.unwrap();
    assert!(matches!(
        broker.log("l", 8).await,
        Err(MessagingError::Config(_))
    ));
    let log = broker.log("l", 4).await.unwrap();
    assert!(log.read(4, StartAt::First).await.is_err(), "no partition 4");
    broker.delete_log("l", 4).await.unwrap();
    broker.log("l", 8).await.unwrap();
}

#[tokio::test]
async fn only_sqlite_urls_open() {
    let settings = MessagingSettings::new("amqp://localhost");
    assert!(matches!(
        open_broker(&settings).await,
        Err(MessagingError::Config(_))
    ));
}

#[tokio::test]
async fn parked_messages_taken_by_a_process_that_died_are_handed_out_again_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, queue) = open_queue(&dir).await;
    queue.publish_raw(b"nope".to_vec()).await.unwrap();
    let mut rx = queue.consume(1).await.unwrap();
    quiet(&mut rx).await;
    let mut taken = queue.take_parked(1).await.unwrap();
    let first = next_parked(&mut taken).await.parked;
    // What a process that crashed before storing it leaves behind: a claim by a gone instance.
    broker
        .store
        .execute(
            "UPDATE messaging_queue_messages SET owner = 'gone', consumer = 'gone'",
            Vec::<Value>::new(),
        )
        .await
        .unwrap();
    // Its release on drop no longer matches the claim: as if the process had died.
    drop((taken, rx, queue, broker));

    let (broker, queue) = open_queue(&dir).await;
    let mut taken = queue.take_parked(1).await.unwrap();
    let again = next_parked(&mut taken).await;
    assert_eq!(again.parked, first, "the same parking, the same park id");
    again.ack().await.unwrap();
    assert_eq!(rows_in(&broker, "parked").await, 0);
}
