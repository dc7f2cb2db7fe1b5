//! Following every partition of `workflow-events` from a checkpoint of one's own, in batches:
//! what the read model's projection ([`crate::readmodel`]) and the webhooks' follower
//! ([`crate::webhooks`]) share. Whatever has arrived (up to [`BATCH`] records) is prepared once and
//! applied in one transaction together with the checkpoint when one is due, so a busy log costs
//! one commit per batch instead of one per event; a failed apply is retried (the same batch) until
//! it holds or the service stops. Checkpoints are for restart speed only: every follower applies
//! idempotently, so re-reading records after a restart is harmless.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

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
