#![allow(clippy::unwrap_used, clippy::expect_used)]
//! One conformance suite, run unchanged against both backends (`embedded::*` and `rabbitmq::*`):
//! whatever a service relies on — partitioning, ordering, replay, redelivery, the delivery limit,
//! parking, taking parked messages out and republishing them, poison messages, restarts — must
//! behave the same on SQLite and on RabbitMQ.
//! The log tests also run against the simulations' in-memory log (`memory::*`).
//!
//! The RabbitMQ half needs `AMQP_URL` (e.g. `AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f`) and
//! `rabbitmqctl` on this machine (override the command with `RABBITMQCTL`, e.g. `sudo rabbitmqctl`)
//! to cut the test's connections; without `AMQP_URL` and with a Docker engine, a RabbitMQ
//! container and `docker exec … rabbitmqctl` (see `test_support`).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use messaging::memory::MemoryLog;
use messaging::{
    partition_for, Broker, Envelope, LogReader, LogRecord, MessagingSettings, ParkedMessage,
    ParkedReceiver, PartitionedLog, QueueMessage, QueueOptions, QueueReceiver, StartAt, WorkQueue,
};
use tokio::sync::watch;
use tokio::time::{timeout, Instant};
use uuid::Uuid;

/// Longest wait for something that must happen; a bug fails the test instead of hanging it.
const WAIT: Duration = Duration::from_secs(15);
/// How long to watch for something that must not happen.
const QUIET: Duration = Duration::from_millis(500);

// ---------------------------------------------------------------------------------------------
// Harnesses

#[async_trait]
trait Harness: Send {
    async fn broker(&self) -> Arc<dyn Broker>;

    /// Simulates a crash or an outage and returns a working broker.
    async fn restart(&mut self) -> Arc<dyn Broker>;
}

fn random_prefix() -> String {
    format!("t{}", &Uuid::new_v4().simple().to_string()[..8])
}

/// SQLite in a temporary folder; a restart drops the broker and opens the file again.
struct EmbeddedHarness {
    _dir: tempfile::TempDir,
    settings: MessagingSettings,
    broker: Option<Arc<dyn Broker>>,
}

impl EmbeddedHarness {
    async fn start() -> Self {
        let dir = tempfile::tempdir().expect("temporary folder");
        let settings = MessagingSettings {
            prefix: random_prefix(),
            ..MessagingSettings::new(format!("sqlite://{}/m.db?mode=rwc", dir.path().display()))
        };
        let broker = messaging::embedded::open(&settings)
            .await
            .expect("open the embedded broker");
        Self {
            _dir: dir,
            settings,
            broker: Some(broker),
        }
    }
}

#[async_trait]
impl Harness for EmbeddedHarness {
    async fn broker(&self) -> Arc<dyn Broker> {
        self.broker.clone().expect("broker open")
    }

    async fn restart(&mut self) -> Arc<dyn Broker> {
        self.broker = None;
        let broker = messaging::embedded::open(&self.settings)
            .await
            .expect("reopen the embedded broker");
        self.broker = Some(broker.clone());
        broker
    }
}

/// The RabbitMQ at `AMQP_URL`; a restart closes this test's connections on the broker side and
/// expects the client to reconnect by itself.
struct RabbitHarness {
    settings: MessagingSettings,
    broker: Arc<dyn Broker>,
}

impl RabbitHarness {
    async fn start() -> Self {
        let url = test_support::amqp_url();
        let prefix = random_prefix();
        let settings = MessagingSettings {
            prefix: prefix.clone(),
            connection_name: prefix,
            ..MessagingSettings::new(url)
        };
        let broker = messaging::connect(&settings)
            .await
            .expect("connect to RabbitMQ at AMQP_URL");
        Self { settings, broker }
    }
}

#[async_trait]
impl Harness for RabbitHarness {
    async fn broker(&self) -> Arc<dyn Broker> {
        self.broker.clone()
    }

    async fn restart(&mut self) -> Arc<dyn Broker> {
        let prefix = self.settings.prefix.clone();
        let closed = tokio::task::spawn_blocking(move || close_connections(&prefix))
            .await
            .expect("rabbitmqctl task");
        assert!(
            closed > 0,
            "no RabbitMQ connection named after {} to close",
            self.settings.prefix
        );
        self.broker.clone()
    }
}

/// Hands out [`MemoryLog`]s by name; only the log tests run against it.
#[derive(Default)]
struct MemoryHarness {
    broker: Arc<MemoryBroker>,
}

#[async_trait]
impl Harness for MemoryHarness {
    async fn broker(&self) -> Arc<dyn Broker> {
        self.broker.clone()
    }

    async fn restart(&mut self) -> Arc<dyn Broker> {
        panic!("the in-memory log does not survive a restart; restart tests do not run on it")
    }
}

#[derive(Default)]
struct MemoryBroker {
    logs: std::sync::Mutex<HashMap<String, MemoryLog>>,
}

#[async_trait]
impl Broker for MemoryBroker {
    async fn log(&self, name: &str, partitions: u32) -> messaging::Result<Arc<dyn PartitionedLog>> {
        let mut logs = self.logs.lock().expect("memory broker lock");
        let log = logs
            .entry(name.to_owned())
            .or_insert_with(|| MemoryLog::new(name, partitions));
        Ok(Arc::new(log.clone()))
    }

    async fn queue(
        &self,
        name: &str,
        _options: QueueOptions,
    ) -> messaging::Result<Arc<dyn WorkQueue>> {
        Err(messaging::MessagingError::Config(format!(
            "the memory broker has no queues ({name})"
        )))
    }

    async fn check(&self) -> messaging::Result<()> {
        Ok(())
    }

    async fn delete_log(&self, name: &str, _partitions: u32) -> messaging::Result<()> {
        self.logs.lock().expect("memory broker lock").remove(name);
        Ok(())
    }

    async fn delete_queue(&self, _name: &str) -> messaging::Result<()> {
        Ok(())
    }
}

fn rabbitmqctl(args: &[&str]) -> std::process::Output {
    let command = test_support::rabbitmqctl();
    let (program, leading) = command.split_first().expect("a rabbitmqctl command");
    std::process::Command::new(program)
        .args(leading)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} (set RABBITMQCTL): {e}", command.join(" ")))
}

/// Closes every connection whose client-provided name contains `prefix`; returns how many.
/// The name is read from `client_properties`, which every RabbitMQ version lists (the
/// `user_provided_name` column only exists from 3.11 on).
fn close_connections(prefix: &str) -> usize {
    let listed = rabbitmqctl(&["list_connections", "-q", "pid", "client_properties"]);
    assert!(
        listed.status.success(),
        "rabbitmqctl list_connections failed: {}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let mut closed = 0;
    for line in String::from_utf8_lossy(&listed.stdout).lines() {
        let Some((pid, properties)) = line.split_once('\t') else {
            continue;
        };
        // Header lines ("pid\tclient_properties", "Listing connections ...") are not pids.
        if !pid.starts_with('<') || !properties.contains(prefix) {
            continue;
        }
        let out = rabbitmqctl(&["close_connection", pid, "conformance test"]);
        if out.status.success() {
            closed += 1;
        }
    }
    closed
}

macro_rules! conformance_suite {
    ($($test:ident),+ $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    super::$test(super::EmbeddedHarness::start().await).await;
                }
            )+
        }

        mod rabbitmq {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    super::$test(super::RabbitHarness::start().await).await;
                }
            )+
        }
    };
}

conformance_suite!(
    partition_stability,
    ordering_per_partition,
    replay_from_an_offset,
    concurrent_producers,
    poison_in_the_log,
    unacked_messages_are_redelivered,
    nack_requeues_until_the_delivery_limit_parks,
    reject_parks_and_redrive_delivers_again,
    poison_message_is_parked_never_delivered,
    parked_messages_stay_parked_until_taken_and_acked,
    an_undecodable_parked_message_is_republished_byte_for_byte,
    prefetch_is_respected,
    competing_consumers_share_the_work,
    restart_loses_nothing,
    reader_survives_a_restart,
    peek_finds_the_first_record_at_or_after_a_position,
    a_reader_reads_past_its_prefetch,
);

/// The in-memory log of the simulations (`messaging::memory`) against the log half of the suite;
/// it has no queues and nothing that could restart.
mod memory {
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn partition_stability() {
        super::partition_stability(super::MemoryHarness::default()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn ordering_per_partition() {
        super::ordering_per_partition(super::MemoryHarness::default()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn replay_from_an_offset() {
        super::replay_from_an_offset(super::MemoryHarness::default()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_producers() {
        super::concurrent_producers(super::MemoryHarness::default()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn poison_in_the_log() {
        super::poison_in_the_log(super::MemoryHarness::default()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn peek_finds_the_first_record_at_or_after_a_position() {
        super::peek_finds_the_first_record_at_or_after_a_position(super::MemoryHarness::default())
            .await;
    }
}

/// RabbitMQ only: the embedded backend has no broker that could drop a message, nor queue
/// arguments a broker version could default.
mod rabbitmq_only {
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_message_that_reaches_no_queue_is_an_error() {
        super::a_message_that_reaches_no_queue_is_an_error(super::RabbitHarness::start().await)
            .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn every_quorum_queue_declares_its_delivery_limit() {
        super::every_quorum_queue_declares_its_delivery_limit(super::RabbitHarness::start().await)
            .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn consumers_that_go_away_leave_the_connection_working() {
        super::consumers_that_go_away_leave_the_connection_working(
            super::RabbitHarness::start().await,
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_parked_queue_an_earlier_version_declared_is_kept() {
        super::a_parked_queue_an_earlier_version_declared_is_kept(
            super::RabbitHarness::start().await,
        )
        .await;
    }
}

/// A consumer or parked taker dropped (its task aborted) closes its channel; that must not
/// break the connection the process's other consumers and publishers share. (lapin cancels a
/// dropped consumer on its own; when that cancel met the channel already closing, lapin took the
/// error for the connection's and closed it: the next subscribe failed with "invalid channel
/// state: Closing (basic.cancel)".)
async fn consumers_that_go_away_leave_the_connection_working(h: impl Harness) {
    let broker = h.broker().await;
    let name = unique("go-away");
    let queue = broker
        .queue(&name, QueueOptions { delivery_limit: 5 })
        .await
        .unwrap();
    for round in 0..200 {
        let parked = queue
            .take_parked(10)
            .await
            .unwrap_or_else(|e| panic!("take_parked, round {round}: {e}"));
        let consumer = queue
            .consume(10)
            .await
            .unwrap_or_else(|e| panic!("consume, round {round}: {e}"));
        drop((parked, consumer));
    }
    queue.publish(event("k", 1)).await.unwrap();
    let mut rx = queue.consume(1).await.unwrap();
    next_message(&mut rx).await.ack().await.unwrap();
    cleanup(&broker, &[], &[&name]).await;
}

/// A message that reaches no queue (its stream or queue is gone, or, right after a broker
/// restart, not running yet) is confirmed by RabbitMQ all the same. Appending or publishing it
/// must fail, never report success for a message nobody stored.
async fn a_message_that_reaches_no_queue_is_an_error(h: impl Harness) {
    let broker = h.broker().await;
    let name = unique("gone");
    let log = broker.log(&name, 1).await.unwrap();
    log.append(event("k", 1)).await.unwrap();
    broker.delete_log(&name, 1).await.unwrap();
    let r = log.append(event("k", 2)).await;
    assert!(r.is_err(), "append to a deleted stream succeeded: {r:?}");

    let qname = unique("gone-q");
    let queue = broker
        .queue(&qname, QueueOptions { delivery_limit: 5 })
        .await
        .unwrap();
    queue.publish(event("k", 1)).await.unwrap();
    broker.delete_queue(&qname).await.unwrap();
    let r = queue.publish(event("k", 2)).await;
    assert!(r.is_err(), "publish to a deleted queue succeeded: {r:?}");
}

/// RabbitMQ 4 gives a quorum queue without `x-delivery-limit` a limit of 20 (and 3.x none): both
/// the queue and its parked queue say theirs, so no broker version's default applies. Read back
/// from the broker itself.
async fn every_quorum_queue_declares_its_delivery_limit(h: RabbitHarness) {
    let broker = h.broker().await;
    let name = unique("limits");
    broker
        .queue(&name, QueueOptions { delivery_limit: 7 })
        .await
        .unwrap();
    let queue = h.settings.qualified(&name);
    let listed = tokio::task::spawn_blocking(|| {
        rabbitmqctl(&[
            "list_queues",
            "-q",
            "name",
            "arguments",
            "--formatter",
            "json",
        ])
    })
    .await
    .expect("rabbitmqctl task");
    assert!(
        listed.status.success(),
        "rabbitmqctl list_queues failed: {}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let queues: serde_json::Value =
        serde_json::from_slice(&listed.stdout).expect("rabbitmqctl lists queues as JSON");
    let limit_of = |q: &str| {
        let args = queues
            .as_array()
            .into_iter()
            .flatten()
            .find(|row| row["name"] == q)
            .unwrap_or_else(|| panic!("{q} is not declared: {queues}"))["arguments"]
            .clone();
        args.as_array()
            .into_iter()
            .flatten()
            .find(|a| a[0] == "x-delivery-limit")
            .map(|a| a[2].clone())
            .unwrap_or_else(|| panic!("{q} has no x-delivery-limit: {args}"))
    };
    assert_eq!(limit_of(&queue), 7);
    assert_eq!(
        limit_of(&format!("{queue}.parked")),
        h.settings.parked_delivery_limit
    );

    cleanup(&broker, &[], &[&name]).await;
}

/// Upgrading from a version that declared the parked queue without a delivery limit: RabbitMQ
/// refuses to redeclare it with one, and the queue is kept as it is (and still works) instead of
/// the service refusing to start.
async fn a_parked_queue_an_earlier_version_declared_is_kept(h: RabbitHarness) {
    use lapin::options::QueueDeclareOptions;
    use lapin::types::{AMQPValue, FieldTable};
    let name = unique("upgraded");
    let parked = format!("{}.parked", h.settings.qualified(&name));
    let url = secrecy::ExposeSecret::expose_secret(&h.settings.url).to_owned();
    let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    channel
        .queue_declare(
            parked.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .unwrap();
    let _ = conn.close(200, "declared".into()).await;

    let broker = h.broker().await;
    let queue = broker
        .queue(&name, QueueOptions { delivery_limit: 5 })
        .await
        .expect("an old parked queue does not stop the service");
    let mut rx = queue.consume(1).await.unwrap();
    let sent = event("k", 1);
    queue.publish(sent.clone()).await.unwrap();
    next_message(&mut rx).await.reject("cannot").await.unwrap();
    let (_parked_rx, taken) = take_parked(&queue, 1).await;
    assert_eq!(taken[0].parked.event.as_ref(), Some(&sent));

    cleanup(&broker, &[], &[&name]).await;
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn unique(what: &str) -> String {
    format!("{what}-{}", &Uuid::new_v4().simple().to_string()[..8])
}

fn event(key: &str, n: u64) -> Envelope {
    Envelope::new("test.event", 1, key, &serde_json::json!({ "n": n })).expect("event")
}

fn n_of(event: &Envelope) -> u64 {
    event.body["n"].as_u64().expect("n in body")
}

/// `count` distinct keys that map to `partition`.
fn keys_on(partition: u32, partitions: u32, count: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("key-{i}"))
        .filter(|k| partition_for(k, partitions) == partition)
        .take(count)
        .collect()
}

fn good(record: &LogRecord) -> &Envelope {
    match &record.event {
        Ok(event) => event,
        Err(poison) => panic!(
            "unexpected poison at {:?}: {}",
            record.position, poison.reason
        ),
    }
}

async fn next_record(reader: &mut LogReader) -> LogRecord {
    timeout(WAIT, reader.next())
        .await
        .expect("timed out waiting for a log record")
        .expect("log reader ended")
}

async fn take(reader: &mut LogReader, n: usize) -> Vec<LogRecord> {
    let mut records = Vec::with_capacity(n);
    for _ in 0..n {
        records.push(next_record(reader).await);
    }
    records
}

async fn assert_no_more_records(reader: &mut LogReader) {
    if let Ok(record) = timeout(QUIET, reader.next()).await {
        panic!("unexpected record: {record:?}");
    }
}

async fn next_message(rx: &mut QueueReceiver) -> QueueMessage {
    timeout(WAIT, rx.next())
        .await
        .expect("timed out waiting for a queue message")
        .expect("queue receiver ended")
}

async fn assert_no_message(rx: &mut QueueReceiver) {
    if let Ok(message) = timeout(QUIET, rx.next()).await {
        panic!("unexpected message: {message:?}");
    }
}

/// Waits until `check` holds.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_for_depth(queue: &Arc<dyn WorkQueue>, depth: u64) {
    eventually(&format!("the queue depth is {depth}"), || {
        let queue = queue.clone();
        async move { queue.depth().await.ok() == Some(depth) }
    })
    .await;
}

/// Takes `count` parked messages out of the parked queue (unanswered: they stay parked until
/// acked, and go back when the receiver is dropped) and checks no more are there.
async fn take_parked(
    queue: &Arc<dyn WorkQueue>,
    count: usize,
) -> (ParkedReceiver, Vec<ParkedMessage>) {
    let mut rx = queue.take_parked(100).await.unwrap();
    let mut taken = Vec::with_capacity(count);
    for _ in 0..count {
        let m = timeout(WAIT, rx.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "timed out waiting for parked message {} of {count}",
                    taken.len() + 1
                )
            })
            .expect("parked receiver ended");
        taken.push(m);
    }
    assert_no_parked(&mut rx).await;
    (rx, taken)
}

async fn assert_no_parked(rx: &mut ParkedReceiver) {
    if let Ok(m) = timeout(QUIET, rx.next()).await {
        panic!("unexpected parked message: {m:?}");
    }
}

/// Appends, retrying while the broker recovers; `log` is re-read on every try so a restarted
/// broker's log is used as soon as it is there.
async fn append_until_ok(log: &watch::Receiver<Arc<dyn PartitionedLog>>, event: Envelope) {
    let deadline = Instant::now() + WAIT;
    loop {
        let current = log.borrow().clone();
        match current.append(event.clone()).await {
            Ok(_) => return,
            Err(e) => {
                assert!(Instant::now() < deadline, "append kept failing: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn cleanup(broker: &Arc<dyn Broker>, logs: &[(&str, u32)], queues: &[&str]) {
    for (name, partitions) in logs {
        let _ = broker.delete_log(name, *partitions).await;
    }
    for name in queues {
        let _ = broker.delete_queue(name).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The log

/// A key always maps to the same partition, and its events are read from exactly that one.
async fn partition_stability(h: impl Harness) {
    let broker = h.broker().await;
    let name = unique("stable");
    let partitions = 4;
    let log = broker.log(&name, partitions).await.unwrap();
    assert_eq!(log.partitions(), partitions);

    let keys: Vec<String> = (0..50)
        .map(|i| format!("delivery-{i}-{}", Uuid::new_v4()))
        .collect();
    for (n, key) in keys.iter().enumerate() {
        let expected = partition_for(key, partitions);
        assert_eq!(log.partition_of(key), expected);
        let appended = log.append(event(key, n as u64)).await.unwrap();
        assert_eq!(
            appended.partition, expected,
            "append reports the key's partition"
        );
    }

    let mut seen = HashSet::new();
    for p in 0..partitions {
        let on_p = keys
            .iter()
            .filter(|k| partition_for(k, partitions) == p)
            .count();
        let mut reader = log.read(p, StartAt::First).await.unwrap();
        for record in take(&mut reader, on_p).await {
            assert_eq!(record.partition, p);
            let e = good(&record);
            assert_eq!(
                partition_for(&e.key, partitions),
                p,
                "{} read from partition {p}",
                e.key
            );
            assert!(seen.insert(e.key.clone()), "{} read twice", e.key);
        }
        assert_no_more_records(&mut reader).await;
    }
    assert_eq!(seen.len(), keys.len());

    cleanup(&broker, &[(&name, partitions)], &[]).await;
}

/// Events of one partition come back in append order with strictly increasing positions, whether
/// appended one by one or as a batch.
async fn ordering_per_partition(h: impl Harness) {
    let broker = h.broker().await;
    let name = unique("order");
    let partitions = 3;
    let log = broker.log(&name, partitions).await.unwrap();
    let keys = keys_on(1, partitions, 4);

    for n in 0..100u64 {
        log.append(event(&keys[n as usize % 4], n)).await.unwrap();
    }
    let batch: Vec<Envelope> = (100..200u64)
        .map(|n| event(&keys[n as usize % 4], n))
        .collect();
    let appended = log.append_batch(batch).await.unwrap();
    assert_eq!(appended.len(), 100);
    assert!(appended.iter().all(|a| a.partition == 1));
    // Typed envelopes, encoded without a JSON value, land the same way.
    #[derive(serde::Serialize)]
    struct Numbered {
        n: u64,
    }
    for n in 200..300u64 {
        let typed = Envelope::typed("test.event", 1, &keys[n as usize % 4], Numbered { n });
        let appended = log.append_encoded(typed.encoded().unwrap()).await.unwrap();
        assert_eq!(appended.partition, 1);
    }

    let mut reader = log.read(1, StartAt::First).await.unwrap();
    let records = take(&mut reader, 300).await;
    let ns: Vec<u64> = records.iter().map(|r| n_of(good(r))).collect();
    assert_eq!(ns, (0..300).collect::<Vec<_>>(), "append order kept");
    for pair in records.windows(2) {
        assert!(
            pair[0].position < pair[1].position,
            "positions increase: {pair:?}"
        );
    }
    assert_no_more_records(&mut reader).await;

    cleanup(&broker, &[(&name, partitions)], &[]).await;
}

/// A reader opened at a record's offset gets the same records again from that batch on.
async fn replay_from_an_offset(h: impl Harness) {
    let broker = h.broker().await;
    let name = unique("replay");
    let partitions = 2;
    let log = broker.log(&name, partitions).await.unwrap();
    let key = &keys_on(0, partitions, 1)[0];

    // Batches of several events and single ones, so the 10th record may sit inside a batch.
    let first: Vec<Envelope> = (0..15).map(|n| event(key, n)).collect();
    log.append_batch(first).await.unwrap();
    for n in 15..25 {
        log.append(event(key, n)).await.unwrap();
    }
    let rest: Vec<Envelope> = (25..40).map(|n| event(key, n)).collect();
    log.append_batch(rest).await.unwrap();

    let mut reader = log.read(0, StartAt::First).await.unwrap();
    let all = take(&mut reader, 40).await;
    assert_no_more_records(&mut reader).await;
    let tenth = all[9].position;

    let expected: Vec<_> = all
        .iter()
        .filter(|r| r.position.offset >= tenth.offset)
        .map(|r| (r.position, good(r).id))
        .collect();
    assert!(expected.iter().any(|(p, _)| *p == tenth));
    let mut replay = log.read(0, StartAt::Offset(tenth.offset)).await.unwrap();
    let again: Vec<_> = take(&mut replay, expected.len())
        .await
        .iter()
        .map(|r| (r.position, good(r).id))
        .collect();
    assert_eq!(again, expected, "replay from offset {}", tenth.offset);
    assert_no_more_records(&mut replay).await;

    cleanup(&broker, &[(&name, partitions)], &[]).await;
}

/// A peek answers the first record at or after a position (inside a batch too) and `None` past
/// the end, without waiting for appends: what a lag probe needs to age the oldest record a
/// stalled reader has not handled.
async fn peek_finds_the_first_record_at_or_after_a_position(h: impl Harness) {
    let broker = h.broker().await;
    let name = unique("peek");
    let partitions = 2;
    let log = broker.log(&name, partitions).await.unwrap();
    let key = &keys_on(0, partitions, 1)[0];
    let start = messaging::Position {
        offset: 0,
        index: 0,
    };
    assert!(
        log.peek(0, start).await.unwrap().is_none(),
        "an empty partition has nothing to peek at"
    );

    // A batch of several events (so a position may sit inside a message), then single ones.
    log.append_batch((0..4).map(|n| event(key, n)).collect())
        .await
        .unwrap();
    for n in 4..6 {
        log.append(event(key, n)).await.unwrap();
    }
    let mut reader = log.read(0, StartAt::First).await.unwrap();
    let all = take(&mut reader, 6).await;
    for record in &all {
        let peeked = log
            .peek(0, record.position)
            .await
            .unwrap()
            .expect("a record at that position");
        assert_eq!(peeked.position, record.position);
        assert_eq!(good(&peeked).id, good(record).id);
        assert_eq!(
            good(&peeked).time,
            good(record).time,
            "the event's time is kept"
        );
    }
    let last = all.last().unwrap().position;
    for past in [
        messaging::Position {
            offset: last.offset,
            index: last.index + 1,
        },
        messaging::Position {
            offset: last.offset + 1,
            index: 0,
        },
    ] {
        assert!(
            log.peek(0, past).await.unwrap().is_none(),
            "nothing at or after {past:?}"
        );
    }
    // Past the end of a batch that is not the last message: the next message answers.
    let first_batch_end = all
        .iter()
        .filter(|r| r.position.offset == all[0].position.offset)
        .map(|r| r.position)
        .max()
        .unwrap();
    let after_batch = messaging::Position {
        offset: first_batch_end.offset,
        index: first_batch_end.index + 1,
    };
    let next = all.iter().find(|r| r.position > first_batch_end).unwrap();
    assert_eq!(
        log.peek(0, after_batch).await.unwrap().map(|r| r.position),
        Some(next.position)
    );
    assert!(
        log.peek(1, start).await.unwrap().is_none(),
        "partition 1 is empty"
    );

    // An undecodable record is peeked as the poison it is.
    log.append_raw(1, b"not a batch".to_vec()).await.unwrap();
    let poison = log
        .peek(1, start)
        .await
        .unwrap()
        .expect("the poison record");
    assert!(poison.event.is_err());

    cleanup(&broker, &[(&name, partitions)], &[]).await;
}

/// A reader is handed many more broker messages than its prefetch (each append below waits for
/// its confirm, so each is a message of its own): its acks (flow control, for a stream) keep the
/// broker sending.
async fn a_reader_reads_past_its_prefetch(h: impl Harness) {
    let broker = h.broker().await;
    let name = unique("past-prefetch");
    let log = broker.log(&name, 1).await.unwrap();
    let n = 3 * u64::from(MessagingSettings::default().log_prefetch) + 5;
    for i in 0..n {
        log.append(event("k", i)).await.unwrap();
    }
    let mut reader = log.read(0, StartAt::First).await.unwrap();
    let got: Vec<u64> = take(&mut reader, usize::try_from(n).unwrap())
        .await
        .iter()
        .map(|r| n_of(good(r)))
        .collect();
    assert_eq!(got, (0..n).collect::<Vec<u64>>(), "every record, in order");
    assert_no_more_records(&mut reader).await;

    cleanup(&broker, &[(&name, 1)], &[]).await;
}

/// Many producers at once: every event is stored exactly once and each key keeps its order.
async fn concurrent_producers(h: impl Harness) {
    let broker = h.broker().await;
    let name = unique("producers");
    let partitions = 4;
    let log = broker.log(&name, partitions).await.unwrap();

    let producers: Vec<_> = (0..8)
        .map(|t| {
            let log = log.clone();
            tokio::spawn(async move {
                let key = format!("producer-{t}-{}", Uuid::new_v4());
                let mut ids = Vec::new();
                for n in 0..100 {
                    let e = event(&key, n);
                    ids.push(e.id);
                    log.append(e).await.unwrap();
                }
                (key, ids)
            })
        })
        .collect();
    let mut sent: HashMap<String, Vec<Uuid>> = HashMap::new();
    for producer in producers {
        let (key, ids) = producer.await.unwrap();
        sent.insert(key, ids);
    }

    let mut read: HashMap<String, Vec<Uuid>> = HashMap::new();
    for p in 0..partitions {
        let on_p: usize = sent
            .iter()
            .filter(|(k, _)| partition_for(k, partitions) == p)
            .map(|(_, ids)| ids.len())
            .sum();
        let mut reader = log.read(p, StartAt::First).await.unwrap();
        for record in take(&mut reader, on_p).await {
            let e = good(&record);
            read.entry(e.key.clone()).or_default().push(e.id);
        }
        assert_no_more_records(&mut reader).await;
    }
    assert_eq!(read, sent, "every event exactly once, in order per key");

    cleanup(&broker, &[(&name, partitions)], &[]).await;
}

/// An undecodable record is handed out once, as poison with a reason, between its neighbours.
async fn poison_in_the_log(h: impl Harness) {
    let broker = h.broker().await;
    let name = unique("poison-log");
    let partitions = 2;
    let log = broker.log(&name, partitions).await.unwrap();
    let key = &keys_on(0, partitions, 1)[0];

    log.append(event(key, 1)).await.unwrap();
    log.append_raw(0, b"garbage".to_vec()).await.unwrap();
    log.append(event(key, 2)).await.unwrap();

    let mut reader = log.read(0, StartAt::First).await.unwrap();
    let records = take(&mut reader, 3).await;
    assert_eq!(n_of(good(&records[0])), 1);
    match &records[1].event {
        Err(poison) => {
            assert!(!poison.reason.is_empty(), "poison carries a reason");
            assert_eq!(poison.raw, b"garbage");
            assert_eq!(records[1].position.index, 0);
        }
        Ok(e) => panic!("garbage decoded as {e:?}"),
    }
    assert_eq!(n_of(good(&records[2])), 2);
    assert!(records[0].position < records[1].position && records[1].position < records[2].position);
    assert_no_more_records(&mut reader).await;

    cleanup(&broker, &[(&name, partitions)], &[]).await;
}

// ---------------------------------------------------------------------------------------------
// Work queues

/// A message taken by a consumer that goes away without answering is delivered again.
async fn unacked_messages_are_redelivered(h: impl Harness) {
    let broker = h.broker().await;
    let name = unique("redeliver");
    let queue = broker
        .queue(&name, QueueOptions { delivery_limit: 5 })
        .await
        .unwrap();
    let sent = event("k", 1);
    queue.publish(sent.clone()).await.unwrap();

    let mut rx = queue.consume(1).await.unwrap();
    let first = next_message(&mut rx).await;
    assert_eq!(first.event, sent);
    assert_eq!(first.delivery_count, 1);
    drop(first);
    drop(rx);

    let mut rx = queue.consume(1).await.unwrap();
    let again = next_message(&mut rx).await;
    assert_eq!(again.event.id, sent.id);
    assert_eq!(again.delivery_count, 2);
    again.ack().await.unwrap();
    assert_no_message(&mut rx).await;
    wait_for_depth(&queue, 0).await;
    take_parked(&queue, 0).await;

    cleanup(&broker, &[], &[&name]).await;
}

/// Nack requeues; after `delivery_limit` deliveries a nack parks the message with its reason.
async fn nack_requeues_until_the_delivery_limit_parks(h: impl Harness) {
    let broker = h.broker().await;
    let name = unique("limit");
    let limit = 3;
    let queue = broker
        .queue(
            &name,
            QueueOptions {
                delivery_limit: limit,
            },
        )
        .await
        .unwrap();
    let mut rx = queue.consume(1).await.unwrap();

    // Nack once, then ack: gone for good.
    let retried = event("k", 1);
    queue.publish(retried.clone()).await.unwrap();
    let m = next_message(&mut rx).await;
    assert_eq!((m.event.id, m.delivery_count), (retried.id, 1));
    m.nack("drone service busy").await.unwrap();
    let m = next_message(&mut rx).await;
    assert_eq!((m.event.id, m.delivery_count), (retried.id, 2));
    m.ack().await.unwrap();

    // Nacked on every delivery: parked after the limit.
    let failing = event("k", 2);
    queue.publish(failing.clone()).await.unwrap();
    for delivery in 1..=limit {
        let m = next_message(&mut rx).await;
        assert_eq!((m.event.id, m.delivery_count), (failing.id, delivery));
        m.nack(&format!("downstream timeout #{delivery}"))
            .await
            .unwrap();
    }
    assert_no_message(&mut rx).await;
    wait_for_depth(&queue, 0).await;
    let (_parked_rx, taken) = take_parked(&queue, 1).await;
    let parked = &taken[0].parked;
    assert_eq!(parked.message_id, failing.id.to_string());
    assert_eq!(parked.event.as_ref(), Some(&failing));
    assert!(
        parked
            .reason
            .contains(&format!("downstream timeout #{limit}")),
        "reason names the last failure: {}",
        parked.reason
    );
    assert_eq!(parked.delivery_count, limit);

    cleanup(&broker, &[], &[&name]).await;
}

/// Reject parks at once with the reason; republishing the parked bytes (a redrive) delivers it
/// again with a fresh count.
async fn reject_parks_and_redrive_delivers_again(h: impl Harness) {
    let broker = h.broker().await;
    let name = unique("reject");
    let queue = broker
        .queue(&name, QueueOptions { delivery_limit: 5 })
        .await
        .unwrap();
    let mut rx = queue.consume(1).await.unwrap();
    let sent = event("k", 1);
    queue.publish(sent.clone()).await.unwrap();

    let m = next_message(&mut rx).await;
    m.reject("package size not supported").await.unwrap();
    assert_no_message(&mut rx).await;
    let (mut parked_rx, mut taken) = take_parked(&queue, 1).await;
    let parked = taken.remove(0);
    assert_eq!(parked.parked.message_id, sent.id.to_string());
    assert!(
        parked.parked.reason.contains("package size not supported"),
        "{}",
        parked.parked.reason
    );
    assert_eq!(parked.parked.event.as_ref(), Some(&sent));
    wait_for_depth(&queue, 0).await;

    queue
        .republish(&parked.parked.message_id, parked.parked.payload.clone())
        .await
        .unwrap();
    parked.ack().await.unwrap();
    let m = next_message(&mut rx).await;
    assert_eq!(m.event, sent);
    assert_eq!(
        m.delivery_count, 1,
        "a redriven message starts a fresh count"
    );
    m.ack().await.unwrap();
    assert_no_parked(&mut parked_rx).await;
    drop(parked_rx);
    take_parked(&queue, 0).await;

    cleanup(&broker, &[], &[&name]).await;
}

/// An undecodable message never reaches a consumer: it is parked with the reason.
async fn poison_message_is_parked_never_delivered(h: impl Harness) {
    let broker = h.broker().await;
    let name = unique("poison-queue");
    let queue = broker
        .queue(&name, QueueOptions { delivery_limit: 5 })
        .await
        .unwrap();
    queue.publish_raw(b"{not json".to_vec()).await.unwrap();
    let sent = event("k", 1);
    queue.publish(sent.clone()).await.unwrap();

    let mut rx = queue.consume(5).await.unwrap();
    let m = next_message(&mut rx).await;
    assert_eq!(m.event, sent, "only the good message is delivered");
    m.ack().await.unwrap();
    assert_no_message(&mut rx).await;

    let (_parked_rx, taken) = take_parked(&queue, 1).await;
    let parked = &taken[0].parked;
    assert!(
        parked.reason.starts_with("undecodable"),
        "{}",
        parked.reason
    );
    assert!(parked.event.is_none());
    assert!(!parked.message_id.is_empty());
    assert_eq!(parked.payload, b"{not json", "the bytes as published");
    wait_for_depth(&queue, 0).await;

    cleanup(&broker, &[], &[&name]).await;
}

/// No more than `prefetch` messages are unanswered at once.
async fn prefetch_is_respected(h: impl Harness) {
    let broker = h.broker().await;
    let name = unique("prefetch");
    let queue = broker
        .queue(&name, QueueOptions { delivery_limit: 5 })
        .await
        .unwrap();
    let sent: Vec<Envelope> = (0..5).map(|n| event("k", n)).collect();
    for e in &sent {
        queue.publish(e.clone()).await.unwrap();
    }

    let mut rx = queue.consume(2).await.unwrap();
    let a = next_message(&mut rx).await;
    let b = next_message(&mut rx).await;
    assert_no_message(&mut rx).await;
    wait_for_depth(&queue, 3).await;

    a.ack().await.unwrap();
    let c = next_message(&mut rx).await;
    assert_no_message(&mut rx).await;
    let got: Vec<u64> = [&b, &c].iter().map(|m| n_of(&m.event)).collect();
    assert_eq!(got, vec![1, 2], "oldest first");
    b.ack().await.unwrap();
    c.ack().await.unwrap();
    for _ in 0..2 {
        next_message(&mut rx).await.ack().await.unwrap();
    }
    wait_for_depth(&queue, 0).await;

    cleanup(&broker, &[], &[&name]).await;
}

/// Consumers of one queue split its messages: none is handed to two of them.
async fn competing_consumers_share_the_work(h: impl Harness) {
    let broker = h.broker().await;
    let name = unique("compete");
    let queue = broker
        .queue(&name, QueueOptions { delivery_limit: 5 })
        .await
        .unwrap();
    let total = 150;
    let delivered = Arc::new(std::sync::Mutex::new(Vec::new()));
    let consumers: Vec<_> = (0..3)
        .map(|_| {
            let queue = queue.clone();
            let delivered = delivered.clone();
            tokio::spawn(async move {
                let mut rx = queue.consume(4).await.unwrap();
                while let Ok(Some(m)) = timeout(Duration::from_secs(2), rx.next()).await {
                    delivered.lock().unwrap().push(m.event.id);
                    // Hold it a moment, so the others must take the next ones meanwhile.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    m.ack().await.unwrap();
                }
            })
        })
        .collect();
    let mut published = HashSet::new();
    for n in 0..total {
        let e = event("k", n);
        published.insert(e.id);
        queue.publish(e).await.unwrap();
    }
    for consumer in consumers {
        consumer.await.unwrap();
    }
    let delivered = delivered.lock().unwrap().clone();
    let unique_ids: HashSet<Uuid> = delivered.iter().copied().collect();
    assert_eq!(
        unique_ids.len(),
        delivered.len(),
        "a message was delivered twice"
    );
    assert_eq!(unique_ids, published, "every message delivered");
    wait_for_depth(&queue, 0).await;

    cleanup(&broker, &[], &[&name]).await;
}

/// Parked messages stay in the parked queue until a taker acks them: handed out unanswered and
/// the taker gone, they come back unchanged (the same park id, reason, count and bytes, in the
/// same order), so whoever stores them can do it idempotently; acked, they are gone.
async fn parked_messages_stay_parked_until_taken_and_acked(h: impl Harness) {
    let broker = h.broker().await;
    let name = unique("keep-parked");
    let queue = broker
        .queue(&name, QueueOptions { delivery_limit: 5 })
        .await
        .unwrap();
    let mut rx = queue.consume(1).await.unwrap();
    let sent: Vec<Envelope> = (0..3).map(|n| event("k", n)).collect();
    for (n, e) in sent.iter().enumerate() {
        queue.publish(e.clone()).await.unwrap();
        let m = next_message(&mut rx).await;
        m.reject(&format!("cannot do #{n}")).await.unwrap();
    }

    let (parked_rx, taken) = take_parked(&queue, 3).await;
    let first: Vec<messaging::Parked> = taken.iter().map(|m| m.parked.clone()).collect();
    assert_eq!(
        first
            .iter()
            .map(|p| p.message_id.clone())
            .collect::<Vec<_>>(),
        sent.iter().map(|e| e.id.to_string()).collect::<Vec<_>>(),
        "oldest first"
    );
    for (n, p) in first.iter().enumerate() {
        assert!(
            p.reason.contains(&format!("cannot do #{n}")),
            "{}",
            p.reason
        );
        assert_eq!(p.payload, serde_json::to_vec(&sent[n]).unwrap());
    }
    let ids: HashSet<&str> = first.iter().map(|p| p.park_id.as_str()).collect();
    assert_eq!(ids.len(), 3, "one park id per parking");
    drop((taken, parked_rx));

    // The taker went away without acking (a crash before its store committed).
    let (parked_rx, again) = wait_take_parked(&queue, 3).await;
    let mut second: Vec<messaging::Parked> = again.iter().map(|m| m.parked.clone()).collect();
    let mut first = first;
    // A broker may hand back what a consumer returned in another order; the store keys on ids.
    second.sort_by(|a, b| a.park_id.cmp(&b.park_id));
    first.sort_by(|a, b| a.park_id.cmp(&b.park_id));
    assert_eq!(second, first, "handed out again unchanged");
    drop((again, parked_rx));

    let (parked_rx, taken) = wait_take_parked(&queue, 3).await;
    for m in taken {
        m.ack().await.unwrap();
    }
    drop(parked_rx);
    take_parked(&queue, 0).await;
    wait_for_depth(&queue, 0).await;

    cleanup(&broker, &[], &[&name]).await;
}

/// Whatever parked messages are there now (waiting briefly for the first).
async fn take_parked_some(queue: &Arc<dyn WorkQueue>) -> (ParkedReceiver, Vec<ParkedMessage>) {
    let mut rx = queue.take_parked(100).await.unwrap();
    let mut taken = Vec::new();
    while let Ok(Some(m)) = timeout(QUIET, rx.next()).await {
        taken.push(m);
    }
    (rx, taken)
}

/// `count` parked messages, waiting for ones an earlier taker just gave back.
async fn wait_take_parked(
    queue: &Arc<dyn WorkQueue>,
    count: usize,
) -> (ParkedReceiver, Vec<ParkedMessage>) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (rx, taken) = take_parked_some(queue).await;
        if taken.len() == count {
            return (rx, taken);
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {count} parked messages, got {}",
            taken.len()
        );
        drop((taken, rx));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A message that does not decode is parked with its bytes; republished under its id, the same
/// bytes are parked again — a new parking of the same message.
async fn an_undecodable_parked_message_is_republished_byte_for_byte(h: impl Harness) {
    let broker = h.broker().await;
    let name = unique("raw-parked");
    let queue = broker
        .queue(&name, QueueOptions { delivery_limit: 5 })
        .await
        .unwrap();
    let bytes = b"\x00\xffnot an envelope".to_vec();
    queue.publish_raw(bytes.clone()).await.unwrap();
    let mut rx = queue.consume(1).await.unwrap();
    assert_no_message(&mut rx).await;

    let (parked_rx, mut taken) = take_parked(&queue, 1).await;
    let first = taken.remove(0);
    assert_eq!(first.parked.payload, bytes);
    assert!(first.parked.event.is_none());
    assert!(
        first.parked.reason.starts_with("undecodable"),
        "{}",
        first.parked.reason
    );
    queue
        .republish(&first.parked.message_id, first.parked.payload.clone())
        .await
        .unwrap();
    let first = {
        let p = first.parked.clone();
        first.ack().await.unwrap();
        p
    };
    drop(parked_rx);
    assert_no_message(&mut rx).await;

    let (_parked_rx, taken) = wait_take_parked(&queue, 1).await;
    let second = &taken[0].parked;
    assert_eq!(second.payload, bytes);
    assert_eq!(second.message_id, first.message_id, "redriven under its id");
    assert_ne!(second.park_id, first.park_id, "a new parking");

    cleanup(&broker, &[], &[&name]).await;
}

// ---------------------------------------------------------------------------------------------
// Restarts

/// A crash (embedded: the file reopened; RabbitMQ: connections cut) in the middle of appends and
/// with messages in flight loses no confirmed event and no unacked message.
async fn restart_loses_nothing(mut h: impl Harness) {
    let broker = h.broker().await;
    let log_name = unique("restart-log");
    let queue_name = unique("restart-queue");
    let partitions = 4;

    // The log: 10 producers × 30 appends, the restart in the middle.
    let (current, log) = watch::channel(broker.log(&log_name, partitions).await.unwrap());
    let confirmed = Arc::new(AtomicUsize::new(0));
    let producers: Vec<_> = (0..10)
        .map(|t| {
            let log = log.clone();
            let confirmed = confirmed.clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for n in 0..30 {
                    let e = event(&format!("restart-{t}-{n}"), n);
                    ids.push((e.key.clone(), e.id));
                    append_until_ok(&log, e).await;
                    confirmed.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                ids
            })
        })
        .collect();
    eventually("100 appends are confirmed", || {
        let confirmed = confirmed.clone();
        async move { confirmed.load(Ordering::SeqCst) >= 100 }
    })
    .await;
    drop(broker);
    let broker = h.restart().await;
    current.send_replace(broker.log(&log_name, partitions).await.unwrap());
    let mut expected: HashMap<u32, HashSet<Uuid>> = HashMap::new();
    for producer in producers {
        for (key, id) in producer.await.unwrap() {
            expected
                .entry(partition_for(&key, partitions))
                .or_default()
                .insert(id);
        }
    }
    assert_eq!(expected.values().map(HashSet::len).sum::<usize>(), 300);
    drop(current);

    let log = broker.log(&log_name, partitions).await.unwrap();
    for p in 0..partitions {
        let mut missing = expected.remove(&p).unwrap_or_default();
        let mut reader = log.read(p, StartAt::First).await.unwrap();
        let mut last = None;
        while !missing.is_empty() {
            let record = timeout(WAIT, reader.next())
                .await
                .unwrap_or_else(|_| {
                    panic!("partition {p}: {} confirmed events missing", missing.len())
                })
                .expect("log reader ended");
            assert!(Some(record.position) > last, "positions increase");
            last = Some(record.position);
            missing.remove(&good(&record).id);
        }
    }

    // The queue: 20 published, 5 acked, 2 taken and left unanswered, then the restart.
    let queue = broker
        .queue(&queue_name, QueueOptions { delivery_limit: 5 })
        .await
        .unwrap();
    let sent: Vec<Envelope> = (0..20).map(|n| event("k", n)).collect();
    for e in &sent {
        queue.publish(e.clone()).await.unwrap();
    }
    let mut rx = queue.consume(10).await.unwrap();
    let mut acked = HashSet::new();
    for _ in 0..5 {
        let m = next_message(&mut rx).await;
        acked.insert(m.event.id);
        m.ack().await.unwrap();
    }
    let held: Vec<QueueMessage> = vec![next_message(&mut rx).await, next_message(&mut rx).await];
    let held_ids: HashSet<Uuid> = held.iter().map(|m| m.event.id).collect();
    // Acks carry no confirm in AMQP: let them reach the broker before cutting the connection.
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop((queue, log, broker));
    let broker = h.restart().await;
    drop(held);
    drop(rx);

    // An operation started while the client is still learning that its connection was closed
    // fails (`Unavailable`) rather than hangs; a caller tries again, as the services' consumer
    // loops do, and the reconnected client serves it.
    let mut attempts = 0;
    let (queue, mut rx) = loop {
        attempts += 1;
        let opened = match broker
            .queue(&queue_name, QueueOptions { delivery_limit: 5 })
            .await
        {
            Ok(queue) => queue.consume(20).await.map(|rx| (queue, rx)),
            Err(e) => Err(e),
        };
        match opened {
            Ok(opened) => break opened,
            Err(e) if attempts < 50 => {
                eprintln!("consume after the restart, attempt {attempts}: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("no consumer 10 s after the restart: {e}"),
        }
    };
    let mut remaining: HashSet<Uuid> = sent
        .iter()
        .map(|e| e.id)
        .filter(|id| !acked.contains(id))
        .collect();
    assert_eq!(remaining.len(), 15);
    while !remaining.is_empty() {
        let m = timeout(WAIT, rx.next())
            .await
            .unwrap_or_else(|_| panic!("{} unacked messages never came back", remaining.len()))
            .expect("queue receiver ended");
        assert!(!acked.contains(&m.event.id), "an acked message came back");
        assert!(
            remaining.remove(&m.event.id),
            "delivered twice: {:?}",
            m.event.id
        );
        if held_ids.contains(&m.event.id) {
            assert!(
                m.delivery_count >= 2,
                "a redelivery counts: {}",
                m.delivery_count
            );
        }
        m.ack().await.unwrap();
    }
    assert_no_message(&mut rx).await;
    wait_for_depth(&queue, 0).await;

    cleanup(&broker, &[(&log_name, partitions)], &[&queue_name]).await;
}

/// A reader open across a restart keeps delivering new appends, resuming after its last record.
async fn reader_survives_a_restart(mut h: impl Harness) {
    let broker = h.broker().await;
    let name = unique("follow");
    let partitions = 2;
    let log = broker.log(&name, partitions).await.unwrap();
    let key = &keys_on(0, partitions, 1)[0];

    for n in 0..5 {
        log.append(event(key, n)).await.unwrap();
    }
    let mut reader = log.read(0, StartAt::First).await.unwrap();
    let before = take(&mut reader, 5).await;
    let last = before[4].position;
    assert_eq!(
        before.iter().map(|r| n_of(good(r))).collect::<Vec<_>>(),
        vec![0, 1, 2, 3, 4]
    );

    drop((log, broker));
    let broker = h.restart().await;
    let (_current, log) = watch::channel(broker.log(&name, partitions).await.unwrap());
    let after: Vec<Envelope> = (5..10).map(|n| event(key, n)).collect();
    for e in &after {
        append_until_ok(&log, e.clone()).await;
    }

    // Retried appends may be stored twice; only the first copy of each counts.
    let mut seen = HashSet::new();
    let mut got = Vec::new();
    while got.len() < after.len() {
        let record = next_record(&mut reader).await;
        if record.position <= last {
            assert_eq!(
                record.position.offset, last.offset,
                "replayed from before its last record"
            );
            continue;
        }
        let e = good(&record).clone();
        if seen.insert(e.id) {
            got.push(e.id);
        }
    }
    assert_eq!(got, after.iter().map(|e| e.id).collect::<Vec<_>>());

    cleanup(&broker, &[(&name, partitions)], &[]).await;
}
