//! Micro-batching of log appends: concurrent appends to one partition are sealed into one broker
//! message by count, size or a linger that adapts to load, published in order, and confirmed
//! concurrently (up to `max_in_flight` unconfirmed messages per partition). Each caller waits for
//! its batch's confirm.
//!
//! The linger: a batch waits for more (up to `batch_linger_us` after its first append) only while
//! the partition's appends arrive faster than that, judged by a moving average of the gaps between
//! them. Under load a broker message carries many appends (RabbitMQ's cost is mostly per message);
//! an append that arrives alone goes at once instead of waiting for company that will not come.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::envelope::{Encoded, Envelope};
use crate::error::{MessagingError, Result};
use crate::hash::partition_for;
use crate::settings::MessagingSettings;
use crate::traits::Appended;

/// Where sealed batches go.
#[async_trait]
pub(crate) trait BatchSink: Send + Sync + 'static {
    /// Sends one batch to `partition`. Calls are made in order per partition, and a backend must
    /// store batches in the order of these calls. The returned future resolves once the batch is
    /// durably stored (the broker's confirm).
    async fn publish(
        &self,
        partition: u32,
        payload: Vec<u8>,
    ) -> Result<BoxFuture<'static, Result<()>>>;
}

struct Item {
    encoded: Vec<u8>,
    done: oneshot::Sender<Result<()>>,
}

/// One batching task per partition.
pub(crate) struct Batcher {
    partitions: Vec<mpsc::Sender<Item>>,
}

impl Batcher {
    pub(crate) fn spawn(
        sink: Arc<dyn BatchSink>,
        partitions: u32,
        settings: &MessagingSettings,
    ) -> Self {
        let limits = Limits {
            max_events: settings.batch_max_events.max(1),
            max_bytes: settings.batch_max_bytes.max(1024),
            linger: Duration::from_micros(settings.batch_linger_us),
            confirm_timeout: Duration::from_millis(settings.confirm_timeout_ms.max(1)),
            max_in_flight: settings.max_in_flight.max(1),
        };
        let partitions = (0..partitions)
            .map(|p| {
                let (tx, rx) = mpsc::channel(limits.max_events * 8);
                tokio::spawn(run(p, rx, sink.clone(), limits));
                tx
            })
            .collect();
        Self { partitions }
    }

    /// Queues an already-encoded envelope for `partition` and waits for its batch's confirm.
    pub(crate) async fn append(&self, partition: u32, encoded: Vec<u8>) -> Result<()> {
        let tx = self
            .partitions
            .get(partition as usize)
            .ok_or_else(|| MessagingError::Config(format!("no partition {partition}")))?;
        let (done, wait) = oneshot::channel();
        tx.send(Item { encoded, done })
            .await
            .map_err(|_| MessagingError::Closed)?;
        wait.await.map_err(|_| MessagingError::Closed)?
    }

    /// Appends `event` to the partition (of `partitions`) its key hashes to.
    pub(crate) async fn append_event(&self, partitions: u32, event: Envelope) -> Result<Appended> {
        self.append_encoded(partitions, event.encoded()?).await
    }

    /// Appends an encoded event to the partition (of `partitions`) its key hashes to.
    pub(crate) async fn append_encoded(
        &self,
        partitions: u32,
        record: Encoded,
    ) -> Result<Appended> {
        let partition = partition_for(&record.key, partitions);
        self.append(partition, record.bytes).await?;
        Ok(Appended { partition })
    }

    /// Appends `events` as [`Self::append_event`] does each.
    pub(crate) async fn append_events(
        &self,
        partitions: u32,
        events: Vec<Envelope>,
    ) -> Result<Vec<Appended>> {
        // join_all polls the appends in input order, so each reaches its partition's batcher in
        // that order and events of one key keep their order.
        let appends = events
            .into_iter()
            .map(|event| self.append_event(partitions, event));
        futures::future::join_all(appends)
            .await
            .into_iter()
            .collect()
    }
}

#[derive(Clone, Copy)]
struct Limits {
    max_events: usize,
    max_bytes: usize,
    linger: Duration,
    confirm_timeout: Duration,
    max_in_flight: usize,
}

async fn run(
    partition: u32,
    mut rx: mpsc::Receiver<Item>,
    sink: Arc<dyn BatchSink>,
    limits: Limits,
) {
    let in_flight = Arc::new(Semaphore::new(limits.max_in_flight));
    let mut arrivals = Arrivals::new(limits.linger);
    while let Some(first) = rx.recv().await {
        arrivals.record();
        let mut bytes = first.encoded.len();
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + limits.linger;
        while batch.len() < limits.max_events && bytes < limits.max_bytes {
            // Take what is already waiting; linger for more only when more is due soon.
            let next = match rx.try_recv() {
                Ok(item) => Some(item),
                Err(mpsc::error::TryRecvError::Disconnected) => None,
                Err(mpsc::error::TryRecvError::Empty) if arrivals.busy() => {
                    tokio::time::timeout_at(deadline, rx.recv())
                        .await
                        .unwrap_or_default()
                }
                Err(mpsc::error::TryRecvError::Empty) => None,
            };
            match next {
                Some(item) => {
                    arrivals.record();
                    bytes += item.encoded.len() + 1;
                    batch.push(item);
                }
                None => break,
            }
        }
        let mut payload = Vec::with_capacity(bytes + 2);
        payload.push(b'[');
        let mut waiters = Vec::with_capacity(batch.len());
        for (i, item) in batch.into_iter().enumerate() {
            if i > 0 {
                payload.push(b',');
            }
            payload.extend_from_slice(&item.encoded);
            waiters.push(item.done);
        }
        payload.push(b']');
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        // One deadline covers handing the batch to the broker and its confirm, so an append
        // always answers within `confirm_timeout`, even when the connection hangs rather than
        // fails (a caller then answers 503 instead of waiting for ever).
        let deadline = tokio::time::Instant::now() + limits.confirm_timeout;
        match tokio::time::timeout_at(deadline, sink.publish(partition, payload)).await {
            Ok(Ok(confirm)) => {
                tokio::spawn(async move {
                    let outcome = match tokio::time::timeout_at(deadline, confirm).await {
                        Ok(r) => r,
                        Err(_) => Err(MessagingError::Timeout),
                    };
                    drop(permit);
                    notify(waiters, outcome);
                });
            }
            Ok(Err(e)) => {
                drop(permit);
                notify(waiters, Err(e));
            }
            Err(_) => {
                drop(permit);
                notify(waiters, Err(MessagingError::Timeout));
            }
        }
    }
}

/// A moving average of the gaps between one partition's appends.
struct Arrivals {
    linger: Duration,
    last: Option<tokio::time::Instant>,
    /// Exponentially weighted, each new gap counting an eighth.
    mean_gap: Duration,
}

impl Arrivals {
    fn new(linger: Duration) -> Self {
        Self {
            linger,
            last: None,
            // Start as idle: the first appends go at once.
            mean_gap: linger * 2,
        }
    }

    fn record(&mut self) {
        let now = tokio::time::Instant::now();
        if let Some(last) = self.last.replace(now) {
            // Long idle gaps count as twice the linger, so one busy second recovers quickly.
            let gap = (now - last).min(self.linger * 2);
            self.mean_gap = (self.mean_gap * 7 + gap) / 8;
        }
    }

    /// Whether appends come often enough that lingering is likely to gather another one.
    fn busy(&self) -> bool {
        self.mean_gap < self.linger
    }
}

fn notify(waiters: Vec<oneshot::Sender<Result<()>>>, outcome: Result<()>) {
    match outcome {
        Ok(()) => {
            for w in waiters {
                let _ = w.send(Ok(()));
            }
        }
        Err(e) => {
            let text = e.to_string();
            for w in waiters {
                let err = match &e {
                    MessagingError::Timeout => MessagingError::Timeout,
                    MessagingError::Nacked(_) => MessagingError::Nacked(text.clone()),
                    MessagingError::Closed => MessagingError::Closed,
                    _ => MessagingError::Unavailable(text.clone()),
                };
                let _ = w.send(Err(err));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder {
        batches: Mutex<Vec<(u32, Vec<u8>)>>,
    }

    #[async_trait]
    impl BatchSink for Recorder {
        async fn publish(
            &self,
            partition: u32,
            payload: Vec<u8>,
        ) -> Result<BoxFuture<'static, Result<()>>> {
            if let Ok(mut b) = self.batches.lock() {
                b.push((partition, payload));
            }
            Ok(Box::pin(async { Ok(()) }))
        }
    }

    #[tokio::test]
    async fn concurrent_appends_share_batches_in_order() {
        let sink = Arc::new(Recorder::default());
        let settings = MessagingSettings {
            batch_max_events: 10,
            batch_linger_us: 20_000,
            ..MessagingSettings::default()
        };
        let batcher = Arc::new(Batcher::spawn(sink.clone(), 2, &settings));
        let appends = (0..25).map(|i| {
            let b = batcher.clone();
            async move { b.append(1, format!("{i}").into_bytes()).await }
        });
        let results = futures::future::join_all(appends).await;
        assert!(results.iter().all(|r| r.is_ok()));
        let batches = sink.batches.lock().map(|b| b.clone()).unwrap_or_default();
        assert!(
            batches.len() >= 3 && batches.len() < 25,
            "{} batches",
            batches.len()
        );
        let mut seen = Vec::new();
        for (p, payload) in batches {
            assert_eq!(p, 1);
            let v: Vec<u32> = serde_json::from_slice(&payload).unwrap_or_default();
            assert!(v.len() <= 10);
            seen.extend(v);
        }
        assert_eq!(seen, (0..25).collect::<Vec<_>>(), "order kept");
        assert!(
            batcher.append(2, b"1".to_vec()).await.is_err(),
            "unknown partition"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_append_goes_at_once_and_a_busy_partition_lingers_for_company() {
        let sink = Arc::new(Recorder::default());
        let settings = MessagingSettings {
            batch_linger_us: 10_000,
            ..MessagingSettings::default()
        };
        let batcher = Arc::new(Batcher::spawn(sink.clone(), 1, &settings));
        // Appends 50 ms apart: no linger, one batch each, each confirmed at once.
        for i in 0..3 {
            let started = tokio::time::Instant::now();
            batcher
                .append(0, format!("{i}").into_bytes())
                .await
                .unwrap_or_default();
            assert!(
                started.elapsed() < Duration::from_millis(1),
                "no linger when idle"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Appends every 2 ms (faster than the 10 ms linger): after a few, batches gather several.
        let appends: Vec<_> = (3..40u64)
            .map(|i| {
                let b = batcher.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(2 * (i - 3))).await;
                    b.append(0, format!("{i}").into_bytes()).await
                })
            })
            .collect();
        for a in appends {
            assert!(matches!(a.await, Ok(Ok(()))));
        }
        let batches = sink.batches.lock().map(|b| b.clone()).unwrap_or_default();
        let sizes: Vec<usize> = batches
            .iter()
            .map(|(_, p)| {
                serde_json::from_slice::<Vec<u32>>(p)
                    .unwrap_or_default()
                    .len()
            })
            .collect();
        assert_eq!(&sizes[..3], [1, 1, 1], "{sizes:?}");
        assert!(
            sizes.iter().any(|&n| n >= 4),
            "busy batches gather: {sizes:?}"
        );
        assert_eq!(sizes.iter().sum::<usize>(), 40);
    }
}
