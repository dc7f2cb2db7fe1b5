//! Following every partition of `workflow-events` from a checkpoint of one's own, in batches:
//! what the read model's projection ([`crate::readmodel`]) and the webhooks' follower
//! ([`crate::webhooks`]) share. Whatever has arrived (up to [`BATCH`] records) is prepared once and
//! applied in one transaction together with the checkpoint when one is due, so a busy log costs
//! one commit per batch instead of one per event; a failed apply is retried (the same batch) until
//! it holds or the service stops. Checkpoints are for restart speed only: every follower applies
//! idempotently, so re-reading records after a restart is harmless.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use messaging::{LogRecord, PartitionedLog, StartAt};
use service_kit::StopSignal;
use tokio::task::JoinHandle;

/// Log records handled in one batch at most.
pub(crate) const BATCH: usize = 500;

/// What a follower does with the records of one partition.
pub(crate) trait Follower: Send + Sync + 'static {
    /// A batch as the follower applies it (decoded once, applied as often as it takes).
    type Batch: Send + Sync;

    /// The name in logs.
    const NAME: &'static str;

    /// The offset `partition` resumes at (`None`: the first record).
    fn resume_at(&self, partition: u32)
        -> impl Future<Output = anyhow::Result<Option<u64>>> + Send;

    /// What `records` mean to this follower.
    fn prepare(&self, partition: u32, records: &[LogRecord]) -> Self::Batch;

    /// Whether `batch` saves its checkpoint whatever the cadence (one per 100 records or second).
    fn checkpoint_now(&self, _batch: &Self::Batch) -> bool {
        false
    }

    /// Applies `batch`, with `checkpoint` (the offset to resume at) when given, atomically.
    fn apply(
        &self,
        partition: u32,
        batch: &Self::Batch,
        checkpoint: Option<u64>,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// Starts one task per partition of `log`, each from its checkpoint, until `stop` (a batch being
/// applied is finished first).
pub(crate) async fn start<F: Follower>(
    follower: Arc<F>,
    log: Arc<dyn PartitionedLog>,
    stop: StopSignal,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let mut tasks = Vec::new();
    for partition in 0..log.partitions() {
        let start = follower
            .resume_at(partition)
            .await?
            .map_or(StartAt::First, StartAt::Offset);
        let reader = log.read(partition, start).await?;
        tasks.push(tokio::spawn(run(
            follower.clone(),
            partition,
            reader,
            stop.clone(),
        )));
    }
    Ok(tasks)
}

async fn run<F: Follower>(
    follower: Arc<F>,
    partition: u32,
    mut reader: messaging::LogReader,
    mut stop: StopSignal,
) {
    let mut unsaved = 0usize;
    let mut last_saved = tokio::time::Instant::now();
    while let Some(records) = tokio::select! {
        biased;
        _ = stop.wait_for(|s| *s) => None,
        records = reader.next_batch(BATCH) => records,
    } {
        let batch = follower.prepare(partition, &records);
        unsaved += records.len();
        let due = follower.checkpoint_now(&batch)
            || unsaved >= 100
            || last_saved.elapsed() > Duration::from_secs(1);
        let checkpoint = due
            .then(|| records.last().map(|r| r.position.offset))
            .flatten();
        let mut attempt = 0u32;
        while let Err(e) = follower.apply(partition, &batch, checkpoint).await {
            attempt += 1;
            tracing::warn!(follower = F::NAME, partition, attempt, error = %e, "applying workflow events failed; retrying");
            tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => return,
                () = tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt.min(25)))) => {}
            }
        }
        if checkpoint.is_some() {
            unsaved = 0;
            last_saved = tokio::time::Instant::now();
        }
    }
}

/// Two followers on one reader of each partition: every record is fetched from the broker and
/// decoded once (a second reader would have the broker send the whole log twice), and each
/// follower applies it as it would alone, on its own checkpoint. The reader resumes at the
/// earlier of the two checkpoints; what the other follower had applied already it applies again,
/// idempotently. A batch one follower failed to apply is retried for that follower only; until it
/// holds, the other waits with it (they share the reader).
pub(crate) struct Both<A, B> {
    first: Arc<A>,
    second: Arc<B>,
}

impl<A, B> Both<A, B> {
    pub(crate) fn new(first: Arc<A>, second: Arc<B>) -> Self {
        Self { first, second }
    }
}

/// A batch of [`Both`]: what each follower makes of it, and whether the first has applied it.
pub(crate) struct BothBatch<A, B> {
    first: A,
    second: B,
    first_applied: AtomicBool,
}

impl<A: Follower, B: Follower> Follower for Both<A, B> {
    type Batch = BothBatch<A::Batch, B::Batch>;

    const NAME: &'static str = "workflow-events followers";

    async fn resume_at(&self, partition: u32) -> anyhow::Result<Option<u64>> {
        // `None` (from the first record) is the earliest.
        Ok(std::cmp::min(
            self.first.resume_at(partition).await?,
            self.second.resume_at(partition).await?,
        ))
    }

    fn prepare(&self, partition: u32, records: &[LogRecord]) -> Self::Batch {
        BothBatch {
            first: self.first.prepare(partition, records),
            second: self.second.prepare(partition, records),
            first_applied: AtomicBool::new(false),
        }
    }

    fn checkpoint_now(&self, batch: &Self::Batch) -> bool {
        self.first.checkpoint_now(&batch.first) || self.second.checkpoint_now(&batch.second)
    }

    async fn apply(
        &self,
        partition: u32,
        batch: &Self::Batch,
        checkpoint: Option<u64>,
    ) -> anyhow::Result<()> {
        if !batch.first_applied.load(Ordering::Acquire) {
            self.first
                .apply(partition, &batch.first, checkpoint)
                .await
                .context(A::NAME)?;
            batch.first_applied.store(true, Ordering::Release);
        }
        self.second
            .apply(partition, &batch.second, checkpoint)
            .await
            .context(B::NAME)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use messaging::{Envelope, Position};

    use super::*;

    /// Records what it was asked to apply; fails the applies it is told to.
    struct Recorder {
        checkpoint: Option<u64>,
        failures: Mutex<u32>,
        applied: Mutex<Vec<(Vec<u64>, Option<u64>)>>,
    }

    impl Recorder {
        fn at(checkpoint: Option<u64>) -> Arc<Self> {
            Arc::new(Self {
                checkpoint,
                failures: Mutex::new(0),
                applied: Mutex::new(Vec::new()),
            })
        }
        fn applied(&self) -> Vec<(Vec<u64>, Option<u64>)> {
            self.applied
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
        }
    }

    impl Follower for Recorder {
        type Batch = Vec<u64>;
        const NAME: &'static str = "recorder";
        async fn resume_at(&self, _: u32) -> anyhow::Result<Option<u64>> {
            Ok(self.checkpoint)
        }
        fn prepare(&self, _: u32, records: &[LogRecord]) -> Vec<u64> {
            records.iter().map(|r| r.position.offset).collect()
        }
        async fn apply(&self, _: u32, batch: &Vec<u64>, cp: Option<u64>) -> anyhow::Result<()> {
            let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
            if *failures > 0 {
                *failures -= 1;
                anyhow::bail!("database unavailable");
            }
            self.applied
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((batch.clone(), cp));
            Ok(())
        }
    }

    fn records(offsets: &[u64]) -> Vec<LogRecord> {
        offsets
            .iter()
            .map(|&offset| LogRecord {
                partition: 0,
                position: Position { offset, index: 0 },
                event: Ok(Envelope::typed("t", 1, "k", serde_json::json!({}))),
            })
            .collect()
    }

    #[tokio::test]
    async fn both_resume_at_the_earlier_checkpoint() {
        let both = Both::new(Recorder::at(Some(40)), Recorder::at(Some(7)));
        assert_eq!(both.resume_at(0).await.ok(), Some(Some(7)));
        let both = Both::new(Recorder::at(Some(40)), Recorder::at(None));
        assert_eq!(
            both.resume_at(0).await.ok(),
            Some(None),
            "None is the first record"
        );
    }

    #[tokio::test]
    async fn a_retried_batch_is_applied_again_only_by_the_follower_that_failed() {
        let (first, second) = (Recorder::at(None), Recorder::at(None));
        *second.failures.lock().unwrap_or_else(|e| e.into_inner()) = 2;
        let both = Both::new(first.clone(), second.clone());
        let batch = both.prepare(0, &records(&[3, 4]));
        let e = both.apply(0, &batch, Some(5)).await.err();
        assert_eq!(e.map(|e| e.to_string()).as_deref(), Some("recorder"));
        assert!(both.apply(0, &batch, Some(5)).await.is_err());
        assert!(both.apply(0, &batch, Some(5)).await.is_ok());
        assert_eq!(first.applied(), [(vec![3, 4], Some(5))], "applied once");
        assert_eq!(second.applied(), [(vec![3, 4], Some(5))]);
    }
}
