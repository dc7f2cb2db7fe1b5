//! The account feed: every change of an account is published on the `account-events` log, so
//! the Scheduler keeps a copy of every account's status and the common booking makes no call here.
//!
//! A change and its `account_outbox` row commit together (`store::upsert`). The relay publishes
//! the oldest rows (in `seq` order), waits for the broker's confirms, and only then deletes
//! exactly those rows; it is woken at once by a write through this replica and otherwise looks
//! every `poll_ms` (writes through other replicas). Several replicas may relay the same rows at
//! once, and a crash between the confirm and the delete publishes rows again: the copy keeps the
//! highest version of each account, and the envelope id is derived from account and version, so
//! a duplicate is recognisable.
//!
//! While the outbox is empty the relay appends an `account.feed-mark` at most every
//! `mark_interval_ms`, whose `complete_as_of` is the time taken *before* the query that found the
//! outbox empty: a change committed before that time was either deleted from the outbox (so its
//! append was confirmed, earlier in the log than this mark) or would have been found. A copy
//! that has read the mark knows every account as of that time.
//!
//! A broker that is down or a failing publish costs nothing but delay: the rows stay, the relay
//! retries with exponential backoff and jitter, and the HTTP API goes on answering.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use contracts::{AccountChanged, AccountFeedMark, ACCOUNT_CHANGED, ACCOUNT_FEED_MARK};
use messaging::{Envelope, PartitionedLog};
use sea_orm::{
    ColumnTrait, DatabaseConnection, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder,
    QuerySelect,
};
use serde::Deserialize;
use service_kit::StopSignal;
use tokio::sync::Notify;
use tokio::time::Instant;
use uuid::Uuid;

use crate::entity::outbox;

/// Outbox rows published per pass.
const BATCH: u64 = 500;

/// Partitioning key of the marks (one partition: every change and mark in one order).
const MARK_KEY: &str = "feed-mark";

/// Namespace of the envelope ids of `account.changed` events (`v5(accountId/version)`).
const EVENT_NAMESPACE: Uuid = Uuid::from_u128(0x6f0d_2b8e_41a7_4c3d_9e25_b8d1_07a4_c2f9);

/// Publishing account changes (`APP_FEED__POLL_MS`, ...).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct FeedSettings {
    /// How often the relay looks for changes written through other replicas (milliseconds; a
    /// write through this replica wakes it at once). Also how often an idle replica looks whether
    /// a mark is due.
    pub poll_ms: u64,
    /// The least time between two `account.feed-mark`s of this replica while its outbox is empty
    /// (milliseconds): how stale the Scheduler's copy may look while nothing changes.
    pub mark_interval_ms: u64,
}

impl Default for FeedSettings {
    fn default() -> Self {
        Self {
            poll_ms: 200,
            mark_interval_ms: 500,
        }
    }
}

/// The envelope id of an `account.changed` event: the same on every publication of it.
pub fn event_id(account_id: &str, version: i64) -> Uuid {
    Uuid::new_v5(
        &EVENT_NAMESPACE,
        format!("{account_id}/{version}").as_bytes(),
    )
}

/// What the relay shows operators.
#[derive(Clone)]
pub(crate) struct FeedMetrics {
    outbox_rows: prometheus::IntGauge,
    published: prometheus::IntCounter,
    marks: prometheus::IntCounter,
    failures: prometheus::IntCounter,
}

impl FeedMetrics {
    pub(crate) fn register(registry: &prometheus::Registry) -> prometheus::Result<Self> {
        let m = Self {
            outbox_rows: prometheus::IntGauge::new(
                "account_feed_outbox_rows",
                "Account changes not yet published on account-events (at the relay's last pass)",
            )?,
            published: prometheus::IntCounter::new(
                "account_feed_published_total",
                "Account changes published on account-events (confirmed)",
            )?,
            marks: prometheus::IntCounter::new(
                "account_feed_marks_total",
                "Feed marks published on account-events (confirmed)",
            )?,
            failures: prometheus::IntCounter::new(
                "account_feed_failures_total",
                "Passes of the account feed relay that failed (the rows stay and are retried)",
            )?,
        };
        registry.register(Box::new(m.outbox_rows.clone()))?;
        registry.register(Box::new(m.published.clone()))?;
        registry.register(Box::new(m.marks.clone()))?;
        registry.register(Box::new(m.failures.clone()))?;
        Ok(m)
    }
}

/// The relay of one replica.
pub(crate) struct Relay {
    pub db: DatabaseConnection,
    pub log: Arc<dyn PartitionedLog>,
    /// Notified (`notify_one`) after a change committed through this replica.
    pub wake: Arc<Notify>,
    pub metrics: FeedMetrics,
    pub settings: FeedSettings,
}

/// What one pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// Published (and deleted) this many rows; there may be more.
    Published(usize),
    /// Found the outbox empty (and appended a mark if one was due).
    Empty,
}

impl Relay {
    /// Publishes outbox rows and marks until `stop`; the pass under way when it comes is finished
    /// first (its confirmed rows deleted).
    pub(crate) async fn run(self, mut stop: StopSignal) {
        let poll = Duration::from_millis(self.settings.poll_ms.max(1));
        let mark_every = Duration::from_millis(self.settings.mark_interval_ms);
        let mut last_mark: Option<Instant> = None;
        let mut backoff: Option<ExponentialBackoff> = None;
        loop {
            if *stop.borrow() {
                return;
            }
            match self.pass(&mut last_mark).await {
                Ok(Pass::Published(_)) => {
                    backoff = None;
                    // More rows may be waiting; and once there are none, a mark may be due.
                    continue;
                }
                Ok(Pass::Empty) => backoff = None,
                Err(e) => {
                    self.metrics.failures.inc();
                    let delay = backoff
                        .get_or_insert_with(retry_delays)
                        .next()
                        .unwrap_or(MAX_RETRY_DELAY);
                    let retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
                    tracing::warn!(error = %format!("{e:#}"), retry_in_ms, "account feed: pass failed; outbox rows kept, will retry");
                    tokio::select! {
                        biased;
                        _ = stop.wait_for(|s| *s) => return,
                        () = tokio::time::sleep(delay) => {}
                    }
                    continue;
                }
            }
            // Idle: until a local write, the next poll, or the next mark, whichever comes first.
            let until_mark = last_mark.map_or(Duration::ZERO, |at| {
                (at + mark_every).saturating_duration_since(Instant::now())
            });
            let wait = poll.min(until_mark.max(Duration::from_millis(1)));
            tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => return,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Publishes the oldest outbox rows and deletes them once confirmed; on an empty outbox,
    /// appends a mark when the last one is `mark_interval_ms` old.
    async fn pass(&self, last_mark: &mut Option<Instant>) -> anyhow::Result<Pass> {
        // Taken before the query: whatever committed before now is either in the rows read, or
        // was deleted after its publish was confirmed.
        let as_of = chrono::Utc::now();
        let rows = outbox::Entity::find()
            .order_by_asc(outbox::Column::Seq)
            .limit(BATCH)
            .all(&self.db)
            .await;
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) => {
                self.refresh_gauge().await;
                return Err(e.into());
            }
        };
        if rows.is_empty() {
            self.metrics.outbox_rows.set(0);
            let due = last_mark.is_none_or(|at| {
                at.elapsed() >= Duration::from_millis(self.settings.mark_interval_ms)
            });
            if due {
                let mark = AccountFeedMark {
                    complete_as_of: as_of,
                };
                self.log
                    .append(Envelope::new(ACCOUNT_FEED_MARK, 1, MARK_KEY, &mark)?)
                    .await?;
                *last_mark = Some(Instant::now());
                self.metrics.marks.inc();
            }
            return Ok(Pass::Empty);
        }
        let published = self.publish(&rows).await;
        self.refresh_gauge().await;
        published
    }

    async fn publish(&self, rows: &[outbox::Model]) -> anyhow::Result<Pass> {
        let mut events = Vec::with_capacity(rows.len());
        for row in rows {
            match serde_json::from_str::<AccountChanged>(&row.payload) {
                Ok(change) => {
                    let mut event = Envelope::new(ACCOUNT_CHANGED, 1, &change.account.id, &change)?;
                    event.id = event_id(&change.account.id, change.version);
                    events.push(event);
                }
                // Only this service writes the rows, from the contract type: never expected. Kept
                // out of the log (no reader could use it) and out of the outbox (it would stop the
                // feed, and its marks, for good); the account's next change is published again.
                Err(e) => tracing::error!(
                    account_id = %row.account_id,
                    seq = row.seq,
                    error = %e,
                    "account feed: undecodable outbox row dropped"
                ),
            }
        }
        let count = events.len();
        if !events.is_empty() {
            self.log.append_batch(events).await?;
        }
        let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
        outbox::Entity::delete_many()
            .filter(outbox::Column::Seq.is_in(seqs))
            .exec(&self.db)
            .await?;
        self.metrics.published.inc_by(count as u64);
        tracing::debug!(events = count, "account changes published");
        Ok(Pass::Published(rows.len()))
    }

    async fn refresh_gauge(&self) {
        if let Ok(waiting) = outbox::Entity::find().count(&self.db).await {
            self.metrics
                .outbox_rows
                .set(i64::try_from(waiting).unwrap_or(i64::MAX));
        }
    }
}

/// The longest wait between two attempts while the broker is unavailable.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

/// Waits between failed passes: exponential from 100 ms to 5 s, with jitter, forever.
fn retry_delays() -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(MAX_RETRY_DELAY)
        .with_jitter()
        .without_max_times()
        .build()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step should panic

    use std::sync::atomic::{AtomicBool, Ordering};

    use async_trait::async_trait;
    use contracts::{AccountStatus, AccountUpsert, ACCOUNT_EVENTS_LOG};
    use messaging::memory::MemoryLog;
    use messaging::{Appended, Encoded, LogReader, LogRecord, MessagingError, Position, StartAt};
    use sea_orm_migration::MigratorTrait;

    use super::*;
    use crate::cache::AccountCache;
    use crate::store::{self, Saved};

    async fn database() -> DatabaseConnection {
        let settings = service_kit::DatabaseSettings::new("sqlite::memory:");
        let db = service_kit::db::connect(&settings).await.unwrap();
        crate::Migrator::up(&db, None).await.unwrap();
        db
    }

    fn relay(db: &DatabaseConnection, log: Arc<dyn PartitionedLog>) -> Relay {
        Relay {
            db: db.clone(),
            log,
            wake: Arc::new(Notify::new()),
            metrics: FeedMetrics::register(&prometheus::Registry::new()).unwrap(),
            settings: FeedSettings {
                poll_ms: 20,
                mark_interval_ms: 60_000,
            },
        }
    }

    async fn put(db: &DatabaseConnection, id: &str, status: AccountStatus) -> Saved {
        let cache = AccountCache::new(Duration::ZERO);
        let body = AccountUpsert {
            name: format!("name of {id}"),
            status,
        };
        store::upsert(db, &cache, id, &body).await.unwrap()
    }

    async fn outbox_rows(db: &DatabaseConnection) -> Vec<AccountChanged> {
        outbox::Entity::find()
            .order_by_asc(outbox::Column::Seq)
            .all(db)
            .await
            .unwrap()
            .iter()
            .map(|r| serde_json::from_str(&r.payload).unwrap())
            .collect()
    }

    fn events(log: &MemoryLog) -> Vec<Envelope> {
        log.messages(0).into_iter().flatten().collect()
    }

    #[tokio::test]
    async fn accounts_made_before_the_feed_have_version_one_and_change_to_two() {
        let settings = service_kit::DatabaseSettings::new("sqlite::memory:");
        let db = service_kit::db::connect(&settings).await.unwrap();
        crate::Migrator::up(&db, Some(1)).await.unwrap();
        sea_orm::ConnectionTrait::execute_unprepared(
            &db,
            "INSERT INTO accounts (id, name, status, created_at, updated_at) \
             VALUES ('old', 'name of old', 'active', '2026-01-01 00:00:00+00:00', \
             '2026-01-01 00:00:00+00:00')",
        )
        .await
        .unwrap();
        crate::Migrator::up(&db, None).await.unwrap();
        assert!(!put(&db, "old", AccountStatus::Active).await.changed());
        assert!(outbox_rows(&db).await.is_empty());
        put(&db, "old", AccountStatus::Suspended).await;
        let rows = outbox_rows(&db).await;
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].version, 2);
    }

    #[tokio::test]
    async fn only_a_creation_or_a_change_writes_an_outbox_row_with_the_next_version() {
        let db = database().await;
        assert!(put(&db, "a1", AccountStatus::Active).await.changed());
        assert!(!put(&db, "a1", AccountStatus::Active).await.changed());
        assert!(put(&db, "a1", AccountStatus::Suspended).await.changed());
        assert!(!put(&db, "a1", AccountStatus::Suspended).await.changed());
        let rows = outbox_rows(&db).await;
        let seen: Vec<_> = rows
            .iter()
            .map(|c| (c.account.id.as_str(), c.version, c.account.status))
            .collect();
        assert_eq!(
            seen,
            vec![
                ("a1", 1, AccountStatus::Active),
                ("a1", 2, AccountStatus::Suspended)
            ]
        );
        // The row announces the account exactly as the PUT answered it.
        let Saved::Unchanged(now) = put(&db, "a1", AccountStatus::Suspended).await else {
            panic!("unchanged");
        };
        assert_eq!(rows[1].account, now);
    }

    #[tokio::test]
    async fn a_pass_publishes_in_order_deletes_what_was_confirmed_then_marks() {
        let db = database().await;
        put(&db, "a1", AccountStatus::Active).await;
        put(&db, "a2", AccountStatus::Active).await;
        put(&db, "a1", AccountStatus::Suspended).await;
        let log = MemoryLog::new(ACCOUNT_EVENTS_LOG, 1);
        let relay = relay(&db, Arc::new(log.clone()));
        let mut last_mark = None;

        assert_eq!(
            relay.pass(&mut last_mark).await.unwrap(),
            Pass::Published(3)
        );
        assert!(outbox_rows(&db).await.is_empty(), "confirmed rows deleted");
        let published: Vec<(String, i64)> = events(&log)
            .iter()
            .map(|e| {
                assert_eq!(e.kind, ACCOUNT_CHANGED);
                let c: AccountChanged = e.decode().unwrap();
                assert_eq!(e.key, c.account.id);
                assert_eq!(e.id, event_id(&c.account.id, c.version));
                (c.account.id, c.version)
            })
            .collect();
        assert_eq!(
            published,
            vec![("a1".into(), 1), ("a2".into(), 1), ("a1".into(), 2)]
        );
        assert_eq!(relay.metrics.published.get(), 3);

        // Empty now: a mark, as of a time before the pass looked.
        let before = chrono::Utc::now();
        assert_eq!(relay.pass(&mut last_mark).await.unwrap(), Pass::Empty);
        let all = events(&log);
        let mark = all.last().unwrap();
        assert_eq!(mark.kind, ACCOUNT_FEED_MARK);
        let mark: AccountFeedMark = mark.decode().unwrap();
        assert!(mark.complete_as_of >= before);
        assert!(mark.complete_as_of <= chrono::Utc::now());
        // Not again before the interval has passed.
        assert_eq!(relay.pass(&mut last_mark).await.unwrap(), Pass::Empty);
        assert_eq!(events(&log).len(), 4);
        assert_eq!(relay.metrics.marks.get(), 1);
    }

    /// A log that refuses every append while `down`.
    struct Flaky {
        down: AtomicBool,
        log: MemoryLog,
    }

    impl Flaky {
        fn check(&self) -> messaging::Result<()> {
            if self.down.load(Ordering::SeqCst) {
                return Err(MessagingError::Unavailable("broker down".into()));
            }
            Ok(())
        }
    }

    #[async_trait]
    impl PartitionedLog for Flaky {
        fn name(&self) -> &str {
            self.log.name()
        }
        fn partitions(&self) -> u32 {
            self.log.partitions()
        }
        async fn append(&self, event: Envelope) -> messaging::Result<Appended> {
            self.check()?;
            self.log.append(event).await
        }
        async fn append_encoded(&self, record: Encoded) -> messaging::Result<Appended> {
            self.check()?;
            self.log.append_encoded(record).await
        }
        async fn append_batch(&self, events: Vec<Envelope>) -> messaging::Result<Vec<Appended>> {
            self.check()?;
            self.log.append_batch(events).await
        }
        async fn append_raw(&self, partition: u32, bytes: Vec<u8>) -> messaging::Result<()> {
            self.check()?;
            self.log.append_raw(partition, bytes).await
        }
        async fn read(&self, partition: u32, from: StartAt) -> messaging::Result<LogReader> {
            self.log.read(partition, from).await
        }
        async fn peek(
            &self,
            partition: u32,
            from: Position,
        ) -> messaging::Result<Option<LogRecord>> {
            self.log.peek(partition, from).await
        }
    }

    #[tokio::test]
    async fn a_failed_publish_keeps_the_rows_and_the_relay_retries_until_it_succeeds() {
        let db = database().await;
        put(&db, "a1", AccountStatus::Active).await;
        let memory = MemoryLog::new(ACCOUNT_EVENTS_LOG, 1);
        let flaky = Arc::new(Flaky {
            down: AtomicBool::new(true),
            log: memory.clone(),
        });
        let relay = relay(&db, flaky.clone());
        let metrics = relay.metrics.clone();
        let mut last_mark = None;
        assert!(relay.pass(&mut last_mark).await.is_err());
        assert_eq!(outbox_rows(&db).await.len(), 1, "kept");
        assert_eq!(metrics.outbox_rows.get(), 1);

        // The loop retries by itself; once the broker is back the row goes out, then a mark.
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(relay.run(stop));
        let deadline = Instant::now() + Duration::from_secs(10);
        while metrics.failures.get() < 3 {
            assert!(Instant::now() < deadline, "retried while down");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(memory.is_empty());
        assert_eq!(outbox_rows(&db).await.len(), 1, "still kept");
        flaky.down.store(false, Ordering::SeqCst);
        while events(&memory).len() < 2 {
            assert!(Instant::now() < deadline, "published once the log is back");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let kinds: Vec<_> = events(&memory).iter().map(|e| e.kind.clone()).collect();
        assert_eq!(kinds[..2], [ACCOUNT_CHANGED, ACCOUNT_FEED_MARK]);
        assert!(outbox_rows(&db).await.is_empty());
        assert_eq!(metrics.outbox_rows.get(), 0);

        // A later change goes out too, and the loop stops when asked.
        put(&db, "a2", AccountStatus::Active).await;
        while !events(&memory).iter().any(|e| e.key == "a2") {
            assert!(Instant::now() < deadline, "the second change published");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("stops when asked")
            .unwrap();
    }
}
