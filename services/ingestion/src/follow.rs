//! Following every partition of `workflow-events` from checkpoints of one's own, in rounds: what
//! the read model's projection ([`crate::readmodel`]) and the webhooks' follower
//! ([`crate::webhooks`]) share.
//!
//! One task reads every partition. A round is what has arrived when it looks: it waits for a
//! record on any partition, then takes what every partition already holds (up to [`ROUND`]
//! records). Each follower prepares the round once, and they all apply it in one transaction,
//! with the checkpoints of the partitions read when one is due. A busy log costs one commit per
//! round, whatever the number of partitions and followers (one per partition and follower
//! before: sixteen transactions where there is now one, each with its fixed cost in round trips
//! and a WAL flush). A failed round is rolled back and retried whole until it holds or the
//! service stops. Checkpoints are for restart speed only: every follower applies idempotently, so
//! re-reading records after a restart is harmless.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use anyhow::Context;

use messaging::{LogReader, LogRecord, PartitionedLog, StartAt};
use sea_orm::{DatabaseConnection, DatabaseTransaction, TransactionTrait};
use service_kit::StopSignal;
use tokio::task::JoinHandle;

/// Log records handled in one round at most (all partitions together).
pub(crate) const ROUND: usize = 1000;

/// Records applied since the last checkpoint after which the next round saves one.
const CHECKPOINT_EVERY: usize = 100;

/// Time since the last checkpoint after which the next round saves one.
const CHECKPOINT_AFTER: Duration = Duration::from_secs(1);

/// What a follower does with the records of a round.
pub(crate) trait Follower: Send + Sync + 'static {
    /// A round as the follower applies it (decoded once, applied as often as it takes).
    type Batch: Send + Sync;

    /// What applying a round tells [`Follower::committed`] once it is durable.
    type Done: Send;

    /// The name in logs.
    const NAME: &'static str;

    /// The offset `partition` resumes at (`None`: the first record).
    fn resume_at(&self, partition: u32)
        -> impl Future<Output = anyhow::Result<Option<u64>>> + Send;

    /// What `records` (of any partitions, each partition's in log order) mean to this follower.
    fn prepare(&self, records: &[LogRecord]) -> Self::Batch;

    /// Whether `batch` saves the checkpoints whatever the cadence (every [`CHECKPOINT_EVERY`]
    /// records or [`CHECKPOINT_AFTER`]).
    fn checkpoint_now(&self, _batch: &Self::Batch) -> bool {
        false
    }

    /// Applies `batch` in `txn`, with `checkpoints` (each partition read since the last one, and
    /// the offset to resume it at). The round's other followers write in the same transaction.
    fn apply(
        &self,
        txn: &DatabaseTransaction,
        batch: &Self::Batch,
        checkpoints: &[(u32, u64)],
    ) -> impl Future<Output = anyhow::Result<Self::Done>> + Send;

    /// Called once the round's transaction has committed (to wake what waits for it).
    fn committed(&self, _batch: &Self::Batch, _done: Self::Done) {}
}

/// Reads every partition of `log`, each from its checkpoint, in one task that applies rounds in
/// `db` until `stop` (a round being applied is finished first).
pub(crate) async fn start<F: Follower>(
    follower: Arc<F>,
    db: DatabaseConnection,
    log: Arc<dyn PartitionedLog>,
    stop: StopSignal,
) -> anyhow::Result<JoinHandle<()>> {
    let mut readers = Vec::new();
    for partition in 0..log.partitions() {
        let start = follower
            .resume_at(partition)
            .await?
            .map_or(StartAt::First, StartAt::Offset);
        readers.push(Some(log.read(partition, start).await?));
    }
    Ok(tokio::spawn(run(follower, db, readers, stop)))
}

async fn run<F: Follower>(
    follower: Arc<F>,
    db: DatabaseConnection,
    mut readers: Vec<Option<LogReader>>,
    mut stop: StopSignal,
) {
    // Per partition read since the last checkpoint: the offset to resume it at.
    let mut unsaved: BTreeMap<u32, u64> = BTreeMap::new();
    let mut unsaved_records = 0usize;
    let mut last_saved = tokio::time::Instant::now();
    let mut first = 0usize;
    while let Some(records) = tokio::select! {
        biased;
        _ = stop.wait_for(|s| *s) => None,
        records = next_round(&mut readers, ROUND, &mut first) => records,
    } {
        let batch = follower.prepare(&records);
        for r in &records {
            unsaved.insert(r.partition, r.position.offset);
        }
        unsaved_records += records.len();
        let due = follower.checkpoint_now(&batch)
            || unsaved_records >= CHECKPOINT_EVERY
            || last_saved.elapsed() > CHECKPOINT_AFTER;
        let checkpoints: Vec<(u32, u64)> = if due {
            unsaved.iter().map(|(&p, &o)| (p, o)).collect()
        } else {
            Vec::new()
        };
        let mut attempt = 0u32;
        let done = loop {
            match apply_round(&*follower, &db, &batch, &checkpoints).await {
                Ok(done) => break done,
                Err(e) => {
                    attempt += 1;
                    tracing::warn!(follower = F::NAME, records = records.len(), attempt, error = %format!("{e:#}"), "applying workflow events failed; retrying");
                    tokio::select! {
                        biased;
                        _ = stop.wait_for(|s| *s) => return,
                        () = tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt.min(25)))) => {}
                    }
                }
            }
        };
        follower.committed(&batch, done);
        if due {
            unsaved.clear();
            unsaved_records = 0;
            last_saved = tokio::time::Instant::now();
        }
    }
}

/// One round in one transaction.
async fn apply_round<F: Follower>(
    follower: &F,
    db: &DatabaseConnection,
    batch: &F::Batch,
    checkpoints: &[(u32, u64)],
) -> anyhow::Result<F::Done> {
    let txn = db.begin().await?;
    let done = follower.apply(&txn, batch, checkpoints).await?;
    txn.commit().await?;
    Ok(done)
}

/// The next round: waits for a record on any partition, then takes what every partition already
/// holds, `max` records at most (at least one), each partition's in log order. Partitions are
/// visited from `first` on, which moves one on at every round, so a busy partition does not
/// keep the others' records out of full rounds. A reader whose broker is gone for good is
/// dropped; `None` once every reader is.
async fn next_round(
    readers: &mut [Option<LogReader>],
    max: usize,
    first: &mut usize,
) -> Option<Vec<LogRecord>> {
    let n = readers.len();
    let start = *first % n.max(1);
    let one = std::future::poll_fn(|cx| {
        let mut open = false;
        for k in 0..n {
            let i = (start + k) % n;
            let Some(reader) = readers[i].as_mut() else {
                continue;
            };
            match reader.poll_next(cx) {
                Poll::Ready(Some(record)) => return Poll::Ready(Some(record)),
                Poll::Ready(None) => {
                    tracing::warn!(partition = i, "workflow-events reader ended");
                    readers[i] = None;
                }
                Poll::Pending => open = true,
            }
        }
        if open {
            Poll::Pending
        } else {
            Poll::Ready(None)
        }
    })
    .await?;
    let mut records = vec![one];
    for k in 0..n {
        let Some(reader) = readers[(start + k) % n].as_mut() else {
            continue;
        };
        while records.len() < max.max(1) {
            match reader.try_next() {
                Some(record) => records.push(record),
                None => break,
            }
        }
    }
    *first = (start + 1) % n.max(1);
    Some(records)
}

/// Two followers on one reader of each partition and one transaction per round: every record is
/// fetched from the broker and decoded once (a second reader would have the broker send the
/// whole log twice), and each follower applies it as it would alone, on its own checkpoints,
/// which move together. The readers resume at the earlier of the two checkpoints; what the
/// other follower had applied already it applies again, idempotently.
pub(crate) struct Both<A, B> {
    first: Arc<A>,
    second: Arc<B>,
}

impl<A, B> Both<A, B> {
    pub(crate) fn new(first: Arc<A>, second: Arc<B>) -> Self {
        Self { first, second }
    }
}

impl<A: Follower, B: Follower> Follower for Both<A, B> {
    type Batch = (A::Batch, B::Batch);
    type Done = (A::Done, B::Done);

    const NAME: &'static str = "workflow-events followers";

    async fn resume_at(&self, partition: u32) -> anyhow::Result<Option<u64>> {
        // `None` (from the first record) is the earliest.
        Ok(std::cmp::min(
            self.first.resume_at(partition).await?,
            self.second.resume_at(partition).await?,
        ))
    }

    fn prepare(&self, records: &[LogRecord]) -> Self::Batch {
        (self.first.prepare(records), self.second.prepare(records))
    }

    fn checkpoint_now(&self, batch: &Self::Batch) -> bool {
        self.first.checkpoint_now(&batch.0) || self.second.checkpoint_now(&batch.1)
    }

    async fn apply(
        &self,
        txn: &DatabaseTransaction,
        batch: &Self::Batch,
        checkpoints: &[(u32, u64)],
    ) -> anyhow::Result<Self::Done> {
        let first = self
            .first
            .apply(txn, &batch.0, checkpoints)
            .await
            .context(A::NAME)?;
        let second = self
            .second
            .apply(txn, &batch.1, checkpoints)
            .await
            .context(B::NAME)?;
        Ok((first, second))
    }

    fn committed(&self, batch: &Self::Batch, done: Self::Done) {
        self.first.committed(&batch.0, done.0);
        self.second.committed(&batch.1, done.1);
    }
}

#[cfg(test)]
#[allow(clippy::expect_used)] // a failed test step should panic
mod tests {
    use std::sync::Mutex;

    use messaging::memory::MemoryLog;
    use messaging::Envelope;

    use super::*;

    /// One applied round as a recorder saw it: (partition, offset) of each record, and the
    /// checkpoints.
    type Round = (Vec<(u32, u64)>, Vec<(u32, u64)>);

    /// Records the rounds it applied; fails the applies it is told to.
    struct Recorder {
        checkpoint: Option<u64>,
        /// Saves the checkpoints with every round it has records in.
        eager: bool,
        failures: Mutex<u32>,
        applied: Mutex<Vec<Round>>,
        committed: Mutex<usize>,
    }

    impl Recorder {
        fn at(checkpoint: Option<u64>) -> Arc<Self> {
            Self::new(checkpoint, false)
        }
        fn new(checkpoint: Option<u64>, eager: bool) -> Arc<Self> {
            Arc::new(Self {
                checkpoint,
                eager,
                failures: Mutex::new(0),
                applied: Mutex::new(Vec::new()),
                committed: Mutex::new(0),
            })
        }
        fn applied(&self) -> Vec<Round> {
            self.applied
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
        }
    }

    impl Follower for Recorder {
        type Batch = Vec<(u32, u64)>;
        type Done = ();
        const NAME: &'static str = "recorder";
        async fn resume_at(&self, _: u32) -> anyhow::Result<Option<u64>> {
            Ok(self.checkpoint)
        }
        fn prepare(&self, records: &[LogRecord]) -> Self::Batch {
            records
                .iter()
                .map(|r| (r.partition, r.position.offset))
                .collect()
        }
        fn checkpoint_now(&self, batch: &Self::Batch) -> bool {
            self.eager && !batch.is_empty()
        }
        async fn apply(
            &self,
            _: &DatabaseTransaction,
            batch: &Self::Batch,
            checkpoints: &[(u32, u64)],
        ) -> anyhow::Result<()> {
            let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
            if *failures > 0 {
                *failures -= 1;
                anyhow::bail!("database unavailable");
            }
            self.applied
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((batch.clone(), checkpoints.to_vec()));
            Ok(())
        }
        fn committed(&self, _: &Self::Batch, (): ()) {
            *self.committed.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        }
    }

    /// Appends `count` one-event messages to each of the log's partitions.
    async fn fill(log: &MemoryLog, count: usize) {
        for partition in 0..log.partitions() {
            for i in 0..count {
                let event = Envelope::typed("t", 1, &format!("k-{partition}-{i}"), &i);
                let bytes = serde_json::to_vec(&vec![event]).expect("encodes");
                log.append_raw(partition, bytes).await.expect("appended");
            }
        }
    }

    async fn readers(log: &MemoryLog) -> Vec<Option<LogReader>> {
        let mut readers = Vec::new();
        for partition in 0..log.partitions() {
            readers.push(Some(
                log.read(partition, StartAt::First).await.expect("reader"),
            ));
        }
        readers
    }

    /// The (partition, offset) of each record of the next round.
    async fn round(
        readers: &mut [Option<LogReader>],
        max: usize,
        first: &mut usize,
    ) -> Vec<(u32, u64)> {
        next_round(readers, max, first)
            .await
            .expect("a round")
            .iter()
            .map(|r| (r.partition, r.position.offset))
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
    async fn a_round_takes_what_every_partition_holds_in_log_order() {
        let log = MemoryLog::new("events", 3);
        fill(&log, 4).await;
        let mut readers = readers(&log).await;
        // The readers' tasks forward what the log holds while this one sleeps.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut first = 0;
        let seen = round(&mut readers, 100, &mut first).await;
        let expected: Vec<(u32, u64)> = (0..3).flat_map(|p| (0..4).map(move |o| (p, o))).collect();
        assert_eq!(seen, expected, "every partition's records, in log order");
        assert_eq!(first, 1, "the next round starts at the next partition");

        // At most `max` records, and the next round starts where this one did not.
        fill(&log, 2).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            round(&mut readers, 3, &mut first).await,
            [(1, 4), (1, 5), (2, 4)]
        );
        assert_eq!(
            round(&mut readers, 3, &mut first).await,
            [(2, 5), (0, 4), (0, 5)]
        );
    }

    #[tokio::test]
    async fn a_failed_round_is_retried_whole_with_every_partitions_checkpoint() {
        let log = Arc::new(MemoryLog::new("events", 3));
        fill(&log, 2).await;
        let (first, second) = (Recorder::at(None), Recorder::new(None, true));
        // The second fails twice: the first's writes of those attempts are rolled back with the
        // transaction, so both apply the round again.
        *second.failures.lock().unwrap_or_else(|e| e.into_inner()) = 2;
        let db = sea_orm::Database::connect("sqlite::memory:")
            .await
            .expect("sqlite");
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let both = Arc::new(Both::new(first.clone(), second.clone()));
        let task = start(both, db, log.clone(), stop).await.expect("started");
        let all = |r: &Recorder| r.applied().iter().map(|(b, _)| b.len()).sum::<usize>();
        for _ in 0..100 {
            if all(&second) == 6 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = stop_tx.send(true);
        task.await.expect("stopped");
        assert_eq!(
            all(&second),
            6,
            "every record applied once: {:?}",
            second.applied()
        );
        assert_eq!(
            all(&first),
            6 + 2 * first.applied()[0].0.len(),
            "the first applied the failed round with each attempt"
        );
        let (_, checkpoints) = second.applied()[0].clone();
        let round: BTreeMap<u32, u64> = second.applied()[0].0.iter().copied().collect();
        assert_eq!(
            checkpoints,
            round.into_iter().collect::<Vec<_>>(),
            "a round that must save them saves the checkpoint of each partition it read"
        );
        assert_eq!(
            *second.committed.lock().unwrap_or_else(|e| e.into_inner()),
            second.applied().len(),
            "told of each commit once"
        );
    }
}
