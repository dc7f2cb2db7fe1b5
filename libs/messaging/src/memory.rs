//! An in-memory partitioned log for deterministic simulations and tests.
//!
//! It keeps the addressing of the real backends — per partition, broker messages numbered from 0,
//! each carrying one or more events at `Position { offset, index }` — but nothing survives the
//! process, and it uses no threads, no wall clock and no randomness of its own: on a
//! current-thread runtime with paused tokio time, the same calls give the same run.
//!
//! Unlike the real backends it does not micro-batch concurrent appends: [`PartitionedLog::append`]
//! is always one message with one event, and [`PartitionedLog::append_batch`] is one message per
//! partition it touches, so a test decides exactly which events share an offset.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, Notify};

use crate::envelope::{Encoded, Envelope, Poison};
use crate::error::{MessagingError, Result};
use crate::traits::{Appended, LogReader, LogRecord, PartitionedLog, Position, StartAt};

/// Records buffered between a reader's task and its consumer. Small, so a slow consumer holds the
/// forwarder back as a broker's prefetch would.
const READER_BUFFER: usize = 16;

/// How long the forwarder waits before handing out each record.
pub type DeliveryDelay = Arc<dyn Fn() -> Duration + Send + Sync>;

/// An in-memory [`PartitionedLog`]. Clones share the stored messages (and each keeps its own
/// delivery delay), so a test can keep one handle for inspection and give another to the code
/// under test.
#[derive(Clone)]
pub struct MemoryLog {
    name: String,
    inner: Arc<Inner>,
    delay: Option<DeliveryDelay>,
}

impl std::fmt::Debug for MemoryLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryLog")
            .field("name", &self.name)
            .field("partitions", &self.inner.partitions.len())
            .field("delayed", &self.delay.is_some())
            .finish()
    }
}

struct Inner {
    partitions: Vec<Partition>,
}

#[derive(Default)]
struct Partition {
    messages: Mutex<Vec<Arc<Message>>>,
    /// Wakes this partition's readers after an append.
    appended: Notify,
}

impl Partition {
    fn lock(&self) -> MutexGuard<'_, Vec<Arc<Message>>> {
        // Nothing panics while holding the lock; should a test thread do so anyway, the data
        // is still a valid list of messages.
        self.messages.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push(&self, message: Message) {
        self.lock().push(Arc::new(message));
        self.appended.notify_waiters();
    }
}

/// One stored broker message.
enum Message {
    Events(Vec<Envelope>),
    /// Raw bytes that do not decode as a batch: read as one poison record at index 0.
    Poison(Poison),
}

impl Message {
    fn records(&self, partition: u32, offset: u64) -> Vec<LogRecord> {
        let batch = match self {
            Message::Events(events) => Ok(events.clone()),
            Message::Poison(poison) => Err(poison.clone()),
        };
        LogRecord::batch(partition, offset, batch)
    }
}

impl MemoryLog {
    /// An empty log with `partitions` partitions (at least 1) that hands out records as soon as
    /// they are stored.
    pub fn new(name: impl Into<String>, partitions: u32) -> Self {
        let partitions = (0..partitions.max(1))
            .map(|_| Partition::default())
            .collect();
        Self {
            name: name.into(),
            inner: Arc::new(Inner { partitions }),
            delay: None,
        }
    }

    /// Readers opened from the returned log sleep `delay()` (tokio time) before handing out each
    /// record, so the records of one message may reach a reader at different (virtual) times.
    /// `delay` is called once per record, in reading order; seed any randomness it uses.
    pub fn with_delivery_delay(mut self, delay: DeliveryDelay) -> Self {
        self.delay = Some(delay);
        self
    }

    /// The events of every message stored in `partition`, by offset. A poison message (raw bytes
    /// that do not decode) shows as an empty list; an unknown partition as no messages.
    pub fn messages(&self, partition: u32) -> Vec<Vec<Envelope>> {
        let Some(p) = self.partition(partition) else {
            return Vec::new();
        };
        p.lock()
            .iter()
            .map(|m| match m.as_ref() {
                Message::Events(events) => events.clone(),
                Message::Poison(_) => Vec::new(),
            })
            .collect()
    }

    /// How many messages `partition` holds (the next offset); 0 for an unknown partition.
    pub fn len(&self, partition: u32) -> usize {
        self.partition(partition).map_or(0, |p| p.lock().len())
    }

    /// True when no partition holds a message.
    pub fn is_empty(&self) -> bool {
        self.inner.partitions.iter().all(|p| p.lock().is_empty())
    }

    fn partition(&self, partition: u32) -> Option<&Partition> {
        self.inner.partitions.get(partition as usize)
    }

    fn checked(&self, partition: u32) -> Result<&Partition> {
        self.partition(partition).ok_or_else(|| {
            MessagingError::Config(format!(
                "log {} has {} partitions, no partition {partition}",
                self.name,
                self.inner.partitions.len()
            ))
        })
    }
}

#[async_trait]
impl PartitionedLog for MemoryLog {
    fn name(&self) -> &str {
        &self.name
    }

    fn partitions(&self) -> u32 {
        u32::try_from(self.inner.partitions.len()).unwrap_or(u32::MAX)
    }

    async fn append(&self, event: Envelope) -> Result<Appended> {
        let partition = self.partition_of(&event.key);
        self.checked(partition)?.push(Message::Events(vec![event]));
        Ok(Appended { partition })
    }

    /// Decoded back into the event it was encoded from (this log keeps events, not bytes).
    async fn append_encoded(&self, record: Encoded) -> Result<Appended> {
        let event = Envelope::decode_one(&record.bytes)
            .map_err(|poison| MessagingError::Encode(poison.reason))?;
        self.append(event).await
    }

    /// One message per partition touched, carrying that partition's events in call order.
    async fn append_batch(&self, events: Vec<Envelope>) -> Result<Vec<Appended>> {
        let mut appended = Vec::with_capacity(events.len());
        let mut by_partition: BTreeMap<u32, Vec<Envelope>> = BTreeMap::new();
        for event in events {
            let partition = self.partition_of(&event.key);
            self.checked(partition)?;
            appended.push(Appended { partition });
            by_partition.entry(partition).or_default().push(event);
        }
        for (partition, events) in by_partition {
            self.checked(partition)?.push(Message::Events(events));
        }
        Ok(appended)
    }

    /// Stored as the other backends store it: bytes that decode as a batch (a JSON array of
    /// envelopes) are read as its events, anything else as one poison record.
    async fn append_raw(&self, partition: u32, bytes: Vec<u8>) -> Result<()> {
        let p = self.checked(partition)?;
        p.push(match Envelope::decode_batch(&bytes) {
            Ok(events) => Message::Events(events),
            Err(poison) => Message::Poison(poison),
        });
        Ok(())
    }

    async fn read(&self, partition: u32, from: StartAt) -> Result<LogReader> {
        self.checked(partition)?;
        // `Next` is fixed now, so everything appended after `read` returns is seen.
        let next = match from {
            StartAt::First => 0,
            StartAt::Offset(offset) => offset,
            StartAt::Next => self.len(partition) as u64,
        };
        let (tx, rx) = mpsc::channel(READER_BUFFER);
        let task = tokio::spawn(forward(
            self.inner.clone(),
            partition,
            next,
            self.delay.clone(),
            tx,
        ));
        Ok(LogReader::new(rx, task))
    }

    /// Exact, and without the delivery delay (a probe is not a reader).
    async fn peek(&self, partition: u32, from: Position) -> Result<Option<LogRecord>> {
        let p = self.checked(partition)?;
        let messages = p.lock();
        let start = usize::try_from(from.offset).unwrap_or(usize::MAX);
        Ok(messages
            .iter()
            .enumerate()
            .skip(start)
            .flat_map(|(offset, m)| m.records(partition, offset as u64))
            .find(|r| r.position >= from))
    }
}

/// Hands out every record from offset `next` on, in order, then follows new appends. Ends when
/// the [`LogReader`] is dropped.
async fn forward(
    inner: Arc<Inner>,
    partition: u32,
    mut next: u64,
    delay: Option<DeliveryDelay>,
    tx: mpsc::Sender<LogRecord>,
) {
    let Some(p) = inner.partitions.get(partition as usize) else {
        return;
    };
    loop {
        // Registered before looking, so an append right after the look still wakes us.
        let appended = p.appended.notified();
        tokio::pin!(appended);
        appended.as_mut().enable();
        let message = usize::try_from(next)
            .ok()
            .and_then(|i| p.lock().get(i).cloned());
        let Some(message) = message else {
            tokio::select! {
                biased;
                _ = &mut appended => {}
                _ = tx.closed() => return,
            }
            continue;
        };
        for record in message.records(partition, next) {
            if let Some(delay) = &delay {
                let pause = delay();
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
            }
            if tx.send(record).await.is_err() {
                return;
            }
        }
        next += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn event(key: &str, n: u64) -> Envelope {
        Envelope::new("test.event", 1, key, &serde_json::json!({ "n": n }))
            .unwrap_or_else(|e| panic!("event: {e}"))
    }

    fn n_of(record: &LogRecord) -> u64 {
        match &record.event {
            Ok(e) => e.body["n"].as_u64().unwrap_or(u64::MAX),
            Err(p) => panic!("poison at {:?}: {}", record.position, p.reason),
        }
    }

    async fn next(reader: &mut LogReader) -> LogRecord {
        tokio::time::timeout(Duration::from_secs(60), reader.next())
            .await
            .unwrap_or_else(|_| panic!("no record within a virtual minute"))
            .unwrap_or_else(|| panic!("reader ended"))
    }

    async fn read(log: &MemoryLog, partition: u32, from: StartAt) -> LogReader {
        log.read(partition, from)
            .await
            .unwrap_or_else(|e| panic!("read: {e}"))
    }

    /// Keys that map to partition `p` of `partitions`.
    fn key_on(log: &MemoryLog, p: u32, skip: usize) -> String {
        (0..)
            .map(|i| format!("key-{i}"))
            .filter(|k| log.partition_of(k) == p)
            .nth(skip)
            .unwrap_or_default()
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_is_one_message_per_partition_with_increasing_index() {
        let log = MemoryLog::new("events", 2);
        let (a, b) = (key_on(&log, 0, 0), key_on(&log, 1, 0));
        let a2 = key_on(&log, 0, 1);
        log.append(event(&a, 0))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let appended = log
            .append_batch(vec![
                event(&a, 1),
                event(&b, 2),
                event(&a2, 3),
                event(&a, 4),
            ])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let partitions: Vec<u32> = appended.iter().map(|x| x.partition).collect();
        assert_eq!(partitions, vec![0, 1, 0, 0]);
        assert_eq!((log.len(0), log.len(1)), (2, 1));
        assert_eq!(log.messages(0)[1].len(), 3);

        let mut reader = read(&log, 0, StartAt::First).await;
        let mut got = Vec::new();
        for _ in 0..4 {
            let r = next(&mut reader).await;
            got.push((r.position.offset, r.position.index, n_of(&r)));
        }
        assert_eq!(got, vec![(0, 0, 0), (1, 0, 1), (1, 1, 3), (1, 2, 4)]);
        let r = next(&mut read(&log, 1, StartAt::First).await).await;
        assert_eq!(
            (r.position, n_of(&r)),
            (
                Position {
                    offset: 0,
                    index: 0
                },
                2
            )
        );
    }

    #[tokio::test(start_paused = true)]
    async fn reading_from_an_offset_and_from_next() {
        let log = MemoryLog::new("events", 1);
        for n in 0..5 {
            log.append(event("k", n))
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let mut from_3 = read(&log, 0, StartAt::Offset(3)).await;
        let mut from_next = read(&log, 0, StartAt::Next).await;
        let mut ahead = read(&log, 0, StartAt::Offset(6)).await;
        assert_eq!(n_of(&next(&mut from_3).await), 3);
        assert_eq!(n_of(&next(&mut from_3).await), 4);
        for n in 5..7 {
            log.append(event("k", n))
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
        assert_eq!(n_of(&next(&mut from_next).await), 5);
        assert_eq!(n_of(&next(&mut ahead).await), 6);
        assert_eq!(n_of(&next(&mut from_3).await), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_sees_later_appends_and_poison() {
        let log = MemoryLog::new("events", 1);
        let mut reader = read(&log, 0, StartAt::First).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(reader.try_next().is_none());
        log.append(event("k", 1))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        log.append_raw(0, b"garbage".to_vec())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(n_of(&next(&mut reader).await), 1);
        let poison = next(&mut reader).await;
        assert_eq!(
            poison.position,
            Position {
                offset: 1,
                index: 0
            }
        );
        assert!(matches!(&poison.event, Err(p) if p.raw == b"garbage" && !p.reason.is_empty()));
        let typed = Envelope::typed("test.event", 1, "k", serde_json::json!({ "n": 2 }));
        let appended = log
            .append_encoded(typed.encoded().unwrap_or_else(|e| panic!("{e}")))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(appended.partition, 0);
        assert_eq!(
            n_of(&next(&mut reader).await),
            2,
            "an encoded event is read as itself"
        );
        let stored: Vec<usize> = log.messages(0).iter().map(Vec::len).collect();
        assert_eq!(stored, vec![1, 0, 1], "the poison message holds no events");
        assert!(log.append_raw(1, Vec::new()).await.is_err());
        assert!(log.read(1, StartAt::First).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn the_delivery_delay_applies_to_each_record() {
        let calls = Arc::new(AtomicU64::new(0));
        let counter = calls.clone();
        // 1 s, 2 s, 3 s, ...: the records of one message arrive at different times.
        let log = MemoryLog::new("events", 1).with_delivery_delay(Arc::new(move || {
            Duration::from_secs(counter.fetch_add(1, Ordering::SeqCst) + 1)
        }));
        log.append_batch(vec![event("k", 0), event("k", 1), event("k", 2)])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let start = tokio::time::Instant::now();
        let mut reader = read(&log, 0, StartAt::First).await;
        let mut arrivals = Vec::new();
        for _ in 0..3 {
            let r = next(&mut reader).await;
            arrivals.push((r.position.index, start.elapsed().as_secs()));
        }
        assert_eq!(arrivals, vec![(0, 1), (1, 3), (2, 6)]);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        // A clone without the delay reads the same messages at once.
        let plain = MemoryLog {
            delay: None,
            ..log.clone()
        };
        let mut fast = read(&plain, 0, StartAt::First).await;
        let before = tokio::time::Instant::now();
        assert_eq!(n_of(&next(&mut fast).await), 0);
        assert_eq!(before.elapsed(), Duration::ZERO);
    }
}
