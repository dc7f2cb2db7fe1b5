//! The Scheduler's copy of every account's status, kept from `account-events` (see
//! [`contracts::AccountChanged`]), so the common booking checks its owner without a call.
//!
//! **How stale it may be.** The Account service appends a mark ([`contracts::AccountFeedMark`])
//! while its outbox is empty: every change committed before the mark's `completeAsOf` is earlier
//! in the log. The copy is used only while the last mark it read is at most `max_staleness_ms`
//! old (by this process's clock); otherwise (the feed is behind, Account or the broker is down,
//! the replica just started) the step calls Account as before, and so it does for an account the
//! copy does not know (created a moment ago). So a suspension committed at time `t` stops every
//! booking whose account check runs after `t + max_staleness_ms` (2 s by default), give or take
//! the clock difference between the Account and Scheduler hosts; a check that falls back to a
//! call sees what Account answers (its own read cache: at most `read_cache_ttl_ms` more).
//!
//! The copy is kept in memory for the checks and in the Scheduler's database (`account_copies`,
//! with each replica's place in the log in `account_feed`), so a restarted replica starts from
//! what it knew rather than from the start of the log; until it reads a fresh mark it calls.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use contracts::{
    AccountChanged, AccountFeedMark, AccountStatus, ACCOUNT_CHANGED, ACCOUNT_FEED_MARK,
};
use messaging::{LogRecord, PartitionedLog, StartAt};
use saga::Clock;
use sea_orm::sea_query::{Alias, Expr, OnConflict, Query};
use sea_orm::{ConnectionTrait, DatabaseConnection, TransactionTrait};
use serde::Deserialize;
use service_kit::StopSignal;

/// How the copy of accounts is used.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(default)]
pub struct AccountCopySettings {
    /// The copy answers an account check only while it is complete as of at most this long ago
    /// (milliseconds); otherwise the check calls Account. `0`: always call.
    pub max_staleness_ms: u64,
}

impl Default for AccountCopySettings {
    fn default() -> Self {
        Self {
            max_staleness_ms: 2000,
        }
    }
}

/// What the copy says of an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// Its status as of at most `max_staleness` ago.
    Known(AccountStatus),
    /// The copy is fresh and has no such account: it may have been created since (call).
    Unknown,
    /// The copy is not known to be fresh enough (call).
    Stale,
}

/// The statuses and versions of the accounts read so far, and how complete they are.
pub struct AccountCopy {
    accounts: RwLock<HashMap<String, (AccountStatus, i64)>>,
    /// `completeAsOf` of the newest mark read, in milliseconds since the epoch (`i64::MIN`: none).
    complete_as_of_ms: AtomicI64,
    max_staleness: Duration,
    clock: Arc<dyn Clock>,
}

impl AccountCopy {
    pub fn new(settings: AccountCopySettings, clock: Arc<dyn Clock>) -> Self {
        Self {
            accounts: RwLock::new(HashMap::new()),
            complete_as_of_ms: AtomicI64::new(i64::MIN),
            max_staleness: Duration::from_millis(settings.max_staleness_ms),
            clock,
        }
    }

    /// What the copy says of account `id` now.
    pub fn lookup(&self, id: &str) -> Lookup {
        if self.max_staleness.is_zero() {
            return Lookup::Stale;
        }
        let Some(age) = self.staleness() else {
            return Lookup::Stale;
        };
        if age > self.max_staleness {
            return Lookup::Stale;
        }
        match self.read().get(id) {
            Some((status, _)) => Lookup::Known(*status),
            None => Lookup::Unknown,
        }
    }

    /// How long ago the copy was known complete (`None`: no mark read yet). Zero if the mark's
    /// time is ahead of this clock.
    pub fn staleness(&self) -> Option<Duration> {
        let at = self.complete_as_of_ms.load(Ordering::Acquire);
        if at == i64::MIN {
            return None;
        }
        let age = self.clock.now().timestamp_millis().saturating_sub(at);
        Some(Duration::from_millis(u64::try_from(age).unwrap_or(0)))
    }

    /// The time of the newest mark read.
    pub fn complete_as_of(&self) -> Option<DateTime<Utc>> {
        let at = self.complete_as_of_ms.load(Ordering::Acquire);
        (at != i64::MIN)
            .then(|| DateTime::from_timestamp_millis(at))
            .flatten()
    }

    /// Takes an account as changed, unless the copy has it at this version or a later one (an
    /// event delivered twice or late). True when it changed the copy.
    pub fn apply(&self, id: &str, status: AccountStatus, version: i64) -> bool {
        let mut accounts = self.write();
        match accounts.get_mut(id) {
            Some(known) if known.1 >= version => false,
            Some(known) => {
                *known = (status, version);
                true
            }
            None => {
                accounts.insert(id.to_owned(), (status, version));
                true
            }
        }
    }

    /// Every change committed before `at` has been applied (marks only move forward).
    pub fn complete_as_of_mark(&self, at: DateTime<Utc>) {
        self.complete_as_of_ms
            .fetch_max(at.timestamp_millis(), Ordering::AcqRel);
    }

    /// Accounts in the copy.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, (AccountStatus, i64)>> {
        // A map of plain values is never left half changed by a panic.
        self.accounts
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, (AccountStatus, i64)>> {
        self.accounts
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// What one batch of `account-events` records says.
#[derive(Debug, Default)]
struct Batch {
    /// The newest version of each account changed in the batch.
    changes: HashMap<String, (AccountStatus, i64)>,
    /// The newest mark of the batch.
    mark: Option<DateTime<Utc>>,
    /// Records that are neither (logged and skipped: a log cannot dead-letter one record).
    skipped: usize,
}

fn decode(records: &[LogRecord]) -> Batch {
    let mut batch = Batch::default();
    for record in records {
        let event = match &record.event {
            Ok(event) => event,
            Err(poison) => {
                tracing::warn!(offset = record.position.offset, reason = %poison.reason, "skipping an account-events record that does not decode");
                batch.skipped += 1;
                continue;
            }
        };
        match event.kind.as_str() {
            ACCOUNT_CHANGED => match AccountChanged::deserialize(&event.body) {
                Ok(c) => {
                    let newest = batch
                        .changes
                        .get(&c.account.id)
                        .is_some_and(|(_, v)| *v >= c.version);
                    if !newest {
                        batch
                            .changes
                            .insert(c.account.id, (c.account.status, c.version));
                    }
                }
                Err(e) => {
                    tracing::warn!(offset = record.position.offset, error = %e, "skipping an account.changed event that does not decode");
                    batch.skipped += 1;
                }
            },
            ACCOUNT_FEED_MARK => match AccountFeedMark::deserialize(&event.body) {
                Ok(m) => batch.mark = batch.mark.max(Some(m.complete_as_of)),
                Err(e) => {
                    tracing::warn!(offset = record.position.offset, error = %e, "skipping an account.feed-mark that does not decode");
                    batch.skipped += 1;
                }
            },
            other => {
                tracing::warn!(
                    offset = record.position.offset,
                    event_type = other,
                    "skipping an unknown event on account-events"
                );
                batch.skipped += 1;
            }
        }
    }
    batch
}

/// How often a replica that reads only marks saves its place in the log.
const MARKS_CHECKPOINT: Duration = Duration::from_secs(10);

const COPIES: &str = "account_copies";
const FEED: &str = "account_feed";

/// Loads the copy kept in the database and the offset `consumer` resumes `account-events` at.
pub async fn load(
    db: &DatabaseConnection,
    copy: &AccountCopy,
    consumer: &str,
) -> anyhow::Result<Option<u64>> {
    let backend = db.get_database_backend();
    let select = Query::select()
        .columns([
            Alias::new("id"),
            Alias::new("status"),
            Alias::new("version"),
        ])
        .from(Alias::new(COPIES))
        .to_owned();
    for row in db.query_all(backend.build(&select)).await? {
        let id: String = row.try_get("", "id")?;
        let status: String = row.try_get("", "status")?;
        let version: i64 = row.try_get("", "version")?;
        match AccountStatus::parse(&status) {
            Some(status) => {
                copy.apply(&id, status, version);
            }
            None => tracing::warn!(
                account = id,
                status,
                "skipping a copied account with an unknown status"
            ),
        }
    }
    let offset = Query::select()
        .column(Alias::new("next_offset"))
        .from(Alias::new(FEED))
        .and_where(Expr::col(Alias::new("consumer")).eq(consumer))
        .to_owned();
    let next = match db.query_one(backend.build(&offset)).await? {
        Some(row) => Some(u64::try_from(row.try_get::<i64>("", "next_offset")?)?),
        None => None,
    };
    Ok(next)
}

/// Stores `batch`'s changes (keeping the higher version of each account) and `consumer`'s next
/// offset, in one transaction.
async fn store(
    db: &DatabaseConnection,
    consumer: &str,
    batch: &Batch,
    next_offset: u64,
) -> anyhow::Result<()> {
    let backend = db.get_database_backend();
    let tx = db.begin().await?;
    if !batch.changes.is_empty() {
        let mut insert = Query::insert()
            .into_table(Alias::new(COPIES))
            .columns([
                Alias::new("id"),
                Alias::new("status"),
                Alias::new("version"),
            ])
            .to_owned();
        for (id, (status, version)) in &batch.changes {
            insert.values_panic([
                id.as_str().into(),
                status.as_str().into(),
                (*version).into(),
            ]);
        }
        insert.on_conflict(
            OnConflict::column(Alias::new("id"))
                .update_columns([Alias::new("status"), Alias::new("version")])
                .action_and_where(
                    Expr::col((Alias::new(COPIES), Alias::new("version")))
                        .lt(Expr::col((Alias::new("excluded"), Alias::new("version")))),
                )
                .to_owned(),
        );
        tx.execute(backend.build(&insert)).await?;
    }
    let offset = i64::try_from(next_offset)?;
    let checkpoint = Query::insert()
        .into_table(Alias::new(FEED))
        .columns([Alias::new("consumer"), Alias::new("next_offset")])
        .values_panic([consumer.into(), offset.into()])
        .on_conflict(
            OnConflict::column(Alias::new("consumer"))
                .update_column(Alias::new("next_offset"))
                .to_owned(),
        )
        .to_owned();
    tx.execute(backend.build(&checkpoint)).await?;
    tx.commit().await?;
    Ok(())
}

/// Follows `account-events` from `consumer`'s offset into `copy` (and the database) until `stop`.
pub async fn follow(
    db: DatabaseConnection,
    copy: Arc<AccountCopy>,
    log: Arc<dyn PartitionedLog>,
    consumer: String,
    metrics: Arc<crate::metrics::Metrics>,
    mut stop: StopSignal,
) {
    let Some(start) = until_done("loading the account copy", &mut stop, || {
        load(&db, &copy, &consumer)
    })
    .await
    else {
        return;
    };
    metrics
        .account_copy_size
        .set(i64::try_from(copy.len()).unwrap_or(i64::MAX));
    let from = start.map_or(StartAt::First, StartAt::Offset);
    let Some(mut reader) =
        until_done("reading account-events", &mut stop, || log.read(0, from)).await
    else {
        return;
    };
    let mut last_saved = tokio::time::Instant::now();
    while let Some(records) = tokio::select! {
        biased;
        _ = stop.wait_for(|s| *s) => None,
        records = reader.next_batch(500) => records,
    } {
        let batch = decode(&records);
        metrics.account_feed_skipped.inc_by(batch.skipped as u64);
        // Resuming at the last record's offset re-reads at most that batch: applying is
        // idempotent. Changes are stored at once; a batch of marks alone only moves the place in
        // the log now and then (a restart re-reads the marks since, which change nothing).
        let next = records.last().map_or(0, |r| r.position.offset);
        let due = !batch.changes.is_empty() || last_saved.elapsed() >= MARKS_CHECKPOINT;
        if due {
            let stored = until_done("storing account changes", &mut stop, || {
                store(&db, &consumer, &batch, next)
            });
            if stored.await.is_none() {
                return;
            }
            last_saved = tokio::time::Instant::now();
        }
        // Changes first, then the mark that says they are all there.
        for (id, (status, version)) in &batch.changes {
            copy.apply(id, *status, *version);
        }
        if let Some(mark) = batch.mark {
            copy.complete_as_of_mark(mark);
            metrics
                .account_copy_complete_as_of
                .set(mark.timestamp_millis() as f64 / 1000.0);
        }
        metrics
            .account_copy_size
            .set(i64::try_from(copy.len()).unwrap_or(i64::MAX));
    }
    if !*stop.borrow() {
        tracing::error!(
            "the account-events reader ended (the broker is gone for good): account checks call \
             Account until this replica restarts"
        );
    }
}

/// Runs `op` until it succeeds, waiting between failures (exponential backoff with jitter,
/// 200 ms to 5 s). An attempt under way is finished; `None` once `stop` turns true while waiting.
async fn until_done<T, E: std::fmt::Display, F: std::future::Future<Output = Result<T, E>>>(
    what: &str,
    stop: &mut StopSignal,
    mut op: impl FnMut() -> F,
) -> Option<T> {
    use backon::BackoffBuilder;
    let mut delays = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build();
    loop {
        match op().await {
            Ok(done) => return Some(done),
            Err(e) => {
                let wait = delays.next().unwrap_or(Duration::from_secs(5));
                let retry_in_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
                tracing::warn!(error = %e, retry_in_ms, "{what} failed; retrying");
                tokio::select! {
                    biased;
                    _ = stop.wait_for(|s| *s) => return None,
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    struct Fixed(std::sync::Mutex<DateTime<Utc>>);

    impl Clock for Fixed {
        fn now(&self) -> DateTime<Utc> {
            *self.0.lock().unwrap()
        }
        fn sleep(&self, _: Duration) -> futures::future::BoxFuture<'static, ()> {
            Box::pin(async {})
        }
    }

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(1_800_000_000_000 + ms).unwrap()
    }

    #[test]
    fn the_copy_answers_only_while_a_mark_is_fresh_and_keeps_the_highest_version() {
        let clock = Arc::new(Fixed(std::sync::Mutex::new(at(0))));
        let copy = AccountCopy::new(
            AccountCopySettings {
                max_staleness_ms: 2000,
            },
            clock.clone(),
        );
        assert!(copy.apply("a", AccountStatus::Active, 1));
        assert_eq!(copy.lookup("a"), Lookup::Stale, "no mark read yet");
        copy.complete_as_of_mark(at(-500));
        assert_eq!(copy.lookup("a"), Lookup::Known(AccountStatus::Active));
        assert_eq!(copy.lookup("b"), Lookup::Unknown, "maybe created since");

        assert!(copy.apply("a", AccountStatus::Suspended, 3));
        assert!(
            !copy.apply("a", AccountStatus::Active, 2),
            "an older change delivered late changes nothing"
        );
        assert!(!copy.apply("a", AccountStatus::Active, 3), "nor a repeat");
        assert_eq!(copy.lookup("a"), Lookup::Known(AccountStatus::Suspended));

        copy.complete_as_of_mark(at(-3000));
        assert_eq!(
            copy.staleness(),
            Some(Duration::from_millis(500)),
            "marks only move forward"
        );
        *clock.0.lock().unwrap() = at(1501);
        assert_eq!(
            copy.lookup("a"),
            Lookup::Stale,
            "2,001 ms since the copy was complete"
        );
        copy.complete_as_of_mark(at(1400));
        assert_eq!(copy.lookup("a"), Lookup::Known(AccountStatus::Suspended));

        let never = AccountCopy::new(
            AccountCopySettings {
                max_staleness_ms: 0,
            },
            clock,
        );
        never.apply("a", AccountStatus::Active, 1);
        never.complete_as_of_mark(at(1501));
        assert_eq!(never.lookup("a"), Lookup::Stale, "0: always call");
    }

    #[test]
    fn a_batch_keeps_each_accounts_newest_change_and_its_newest_mark() {
        use messaging::{Envelope, Position};
        let account = |id: &str, status, version| {
            let changed = AccountChanged {
                account: contracts::Account {
                    id: id.into(),
                    name: id.into(),
                    status,
                    created_at: at(0),
                    updated_at: at(0),
                },
                version,
            };
            Envelope::new(ACCOUNT_CHANGED, 1, id, &changed).unwrap()
        };
        let mark = |ms| {
            let m = AccountFeedMark {
                complete_as_of: at(ms),
            };
            Envelope::new(ACCOUNT_FEED_MARK, 1, "feed-mark", &m).unwrap()
        };
        let events = [
            account("a", AccountStatus::Active, 1),
            mark(10),
            account("a", AccountStatus::Suspended, 2),
            account("b", AccountStatus::Active, 5),
            account("b", AccountStatus::Suspended, 4),
            mark(5),
            Envelope::new("something.else", 1, "x", &serde_json::json!({})).unwrap(),
            Envelope::new(
                ACCOUNT_FEED_MARK,
                1,
                "feed-mark",
                &serde_json::json!({"no": 1}),
            )
            .unwrap(),
        ];
        let records: Vec<LogRecord> = events
            .into_iter()
            .enumerate()
            .map(|(i, event)| LogRecord {
                partition: 0,
                position: Position {
                    offset: i as u64,
                    index: 0,
                },
                event: Ok(event),
            })
            .collect();
        let batch = decode(&records);
        assert_eq!(batch.changes["a"], (AccountStatus::Suspended, 2));
        assert_eq!(batch.changes["b"], (AccountStatus::Active, 5));
        assert_eq!(batch.mark, Some(at(10)));
        assert_eq!(batch.skipped, 2);
    }
}
