//! The saga engine on SQLite and PostgreSQL (`DATABASE_URL`), on virtual time.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step should panic

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use saga::{
    Clock, Engine, Hooks, Journal, Lifecycle, ManualClock, OutboxMessage, RetryPolicy, Saga,
    SagaRecord, Step, StepError,
};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection};
use sea_orm_migration::{MigrationTrait, MigratorTrait};
use serde_json::{json, Value};

struct Migrator;
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        saga::migrations()
    }
}

/// A fresh database: SQLite in a temp dir, or a new PostgreSQL database on `DATABASE_URL`.
struct Db {
    conn: DatabaseConnection,
    _dir: Option<tempfile::TempDir>,
    /// (server url, database name) of a PostgreSQL database to drop afterwards.
    drop: Option<(String, String)>,
}

impl Drop for Db {
    fn drop(&mut self) {
        if let Some((url, name)) = self.drop.take() {
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    if let Ok(admin) = Database::connect(url.as_str()).await {
                        let _ = admin
                            .execute_unprepared(&format!(
                                "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                            ))
                            .await;
                    }
                });
            })
            .join();
        }
    }
}

async fn db(postgres: bool) -> Db {
    let mut drop = None;
    let (conn, dir) = if postgres {
        let url = std::env::var("DATABASE_URL").expect(
            "DATABASE_URL must point at PostgreSQL, e.g. postgres://postgres@127.0.0.1:5432/postgres",
        );
        let admin = Database::connect(url.as_str()).await.unwrap();
        let name = format!(
            "test_saga_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        admin
            .execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
            .await
            .unwrap();
        let base = url.rsplit_once('/').map_or(url.as_str(), |(b, _)| b);
        let conn = Database::connect(format!("{base}/{name}")).await.unwrap();
        drop = Some((url.clone(), name));
        (conn, None)
    } else {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/saga.db?mode=rwc", dir.path().display());
        let mut opts = sea_orm::ConnectOptions::new(url);
        opts.max_connections(1);
        (Database::connect(opts).await.unwrap(), Some(dir))
    };
    Migrator::up(&conn, None).await.unwrap();
    Db {
        conn,
        _dir: dir,
        drop,
    }
}

/// Scripted outcomes per step name; records every call.
#[derive(Default)]
struct Script {
    outcomes: Mutex<HashMap<&'static str, Vec<Result<Value, StepError>>>>,
    calls: Mutex<Vec<&'static str>>,
    cancel: Mutex<Option<String>>,
}

impl Script {
    fn will(&self, step: &'static str, outcomes: Vec<Result<Value, StepError>>) {
        self.outcomes.lock().unwrap().insert(step, outcomes);
    }
    fn calls(&self, step: &str) -> usize {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|s| **s == step)
            .count()
    }
}

struct ScriptedStep {
    name: &'static str,
    policy: RetryPolicy,
}

#[async_trait]
impl Step<Script> for ScriptedStep {
    fn name(&self) -> &'static str {
        self.name
    }
    fn policy(&self) -> RetryPolicy {
        self.policy
    }
    async fn run(&self, ctx: &Script, saga: &SagaRecord) -> Result<Value, StepError> {
        ctx.calls.lock().unwrap().push(self.name);
        if self.name == "hang" {
            std::future::pending::<()>().await;
        }
        let mut outcomes = ctx.outcomes.lock().unwrap();
        match outcomes.get_mut(self.name) {
            Some(list) if !list.is_empty() => list.remove(0),
            _ => Ok(json!({"step": self.name, "saga": saga.id, "seen": saga.outputs.len()})),
        }
    }
}

struct Announce;
impl Hooks<Script> for Announce {
    fn announce(&self, _: &Script, saga: &SagaRecord, change: &Lifecycle) -> Vec<OutboxMessage> {
        vec![OutboxMessage {
            destination: "events".into(),
            key: saga.id.clone(),
            payload: json!({"change": format!("{change:?}"), "version": saga.version}),
        }]
    }
    fn cancellation(&self, ctx: &Script, _: &SagaRecord) -> Option<String> {
        ctx.cancel.lock().unwrap().clone()
    }
}

fn policy() -> RetryPolicy {
    RetryPolicy {
        min_delay_ms: 100,
        max_delay_ms: 1000,
        max_attempts: 4,
        budget_ms: 60_000,
        jitter: false,
    }
}

fn engine(journal: Arc<Journal>, clock: &ManualClock, steps: &[&'static str]) -> Engine<Script> {
    Engine::new(
        journal,
        Arc::new(clock.clone()),
        Saga {
            kind: "test",
            steps: steps
                .iter()
                .map(|n| {
                    Arc::new(ScriptedStep {
                        name: n,
                        policy: policy(),
                    }) as Arc<dyn Step<Script>>
                })
                .collect(),
            hooks: Arc::new(Announce),
        },
    )
}

async fn outbox(db: &DatabaseConnection) -> Vec<String> {
    use sea_orm::{EntityTrait, QueryOrder};
    saga::entities::outbox::Entity::find()
        .order_by_asc(saga::entities::outbox::Column::Seq)
        .all(db)
        .await
        .unwrap()
        .into_iter()
        .map(|r| {
            serde_json::from_str::<Value>(&r.payload).unwrap()["change"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

macro_rules! both {
    ($($name:ident),*) => {
        mod sqlite { $( #[tokio::test] async fn $name() { super::$name(false).await } )* }
        mod postgres { $( #[tokio::test] async fn $name() { super::$name(true).await } )* }
    };
}

both!(
    happy_path_journals_every_step,
    transient_failures_are_retried_on_virtual_time,
    permanent_failure_stops_and_announces,
    retries_stop_at_the_attempt_limit_and_the_deadline,
    an_interrupted_saga_resumes_without_repeating_done_steps,
    starting_twice_is_a_no_op,
    cancellation_stops_before_the_next_step,
    many_sagas_share_commits,
    outbox_relay_publishes_in_order_and_retries
);

async fn happy_path_journals_every_step(pg: bool) {
    let db = db(pg).await;
    let journal = Arc::new(Journal::start(db.conn.clone()));
    let clock = ManualClock::starting_at(Utc::now());
    let e = engine(journal.clone(), &clock, &["a", "b", "c"]);
    let script = Script::default();
    let s = e
        .start(&script, "s1", 3, json!({"x": 1}), None)
        .await
        .unwrap()
        .unwrap();
    let done = e.run(&script, s).await.unwrap();
    assert_eq!(done.state, saga::COMPLETED);
    assert_eq!(
        done.outputs["c"]["seen"], 2,
        "later steps see earlier outputs"
    );
    let row = journal.load("s1").await.unwrap().unwrap();
    assert_eq!(
        (row.state.as_str(), row.next_step, row.shard),
        ("completed", 3, 3)
    );
    let attempts = journal.attempts("s1").await.unwrap();
    assert_eq!(
        attempts
            .iter()
            .map(|a| (a.step.as_str(), a.outcome.as_str()))
            .collect::<Vec<_>>(),
        vec![("a", "succeeded"), ("b", "succeeded"), ("c", "succeeded")]
    );
    assert_eq!(
        outbox(&db.conn).await,
        vec![
            "Started",
            "StepSucceeded { step: \"a\" }",
            "StepSucceeded { step: \"b\" }",
            "Completed"
        ]
    );
    assert!(clock.sleeps().is_empty());
}

async fn transient_failures_are_retried_on_virtual_time(pg: bool) {
    let db = db(pg).await;
    let journal = Arc::new(Journal::start(db.conn.clone()));
    let clock = ManualClock::starting_at(Utc::now());
    let e = engine(journal.clone(), &clock, &["a", "b"]);
    let script = Script::default();
    script.will(
        "b",
        vec![
            Err(StepError::transient("503 from drone")),
            Err(StepError::Transient {
                reason: "429".into(),
                retry_after: Some(Duration::from_secs(5)),
            }),
        ],
    );
    let real = std::time::Instant::now();
    let s = e
        .start(&script, "s2", 0, json!({}), None)
        .await
        .unwrap()
        .unwrap();
    let done = e.run(&script, s).await.unwrap();
    assert_eq!(done.state, saga::COMPLETED);
    assert_eq!(script.calls("b"), 3);
    assert_eq!(
        clock.sleeps(),
        vec![Duration::from_millis(100), Duration::from_secs(5)],
        "backoff, then Retry-After honoured"
    );
    assert!(real.elapsed() < Duration::from_secs(3), "no real sleeping");
    let outcomes: Vec<_> = journal
        .attempts("s2")
        .await
        .unwrap()
        .into_iter()
        .filter(|a| a.step == "b")
        .map(|a| (a.attempt, a.outcome))
        .collect();
    assert_eq!(
        outcomes,
        vec![
            (1, "transient".to_owned()),
            (2, "transient".to_owned()),
            (3, "succeeded".to_owned())
        ]
    );
}

async fn permanent_failure_stops_and_announces(pg: bool) {
    let db = db(pg).await;
    let journal = Arc::new(Journal::start(db.conn.clone()));
    let clock = ManualClock::starting_at(Utc::now());
    let e = engine(journal.clone(), &clock, &["a", "b", "c"]);
    let script = Script::default();
    script.will("b", vec![Err(StepError::permanent("account suspended"))]);
    let s = e
        .start(&script, "s3", 0, json!({}), None)
        .await
        .unwrap()
        .unwrap();
    let done = e.run(&script, s).await.unwrap();
    assert_eq!(done.state, saga::FAILED);
    assert_eq!(done.error.as_deref(), Some("b: account suspended"));
    assert_eq!(script.calls("c"), 0);
    assert_eq!(script.calls("b"), 1, "no retries for permanent failures");
    let last = outbox(&db.conn).await.pop().unwrap();
    assert!(last.starts_with("Failed { step: \"b\""), "{last}");
    assert_eq!(journal.load("s3").await.unwrap().unwrap().state, "failed");
}

async fn retries_stop_at_the_attempt_limit_and_the_deadline(pg: bool) {
    let db = db(pg).await;
    let journal = Arc::new(Journal::start(db.conn.clone()));
    let clock = ManualClock::starting_at(Utc::now());
    let e = engine(journal.clone(), &clock, &["a"]);
    let script = Script::default();
    script.will(
        "a",
        (0..10).map(|_| Err(StepError::transient("down"))).collect(),
    );
    let s = e
        .start(&script, "limit", 0, json!({}), None)
        .await
        .unwrap()
        .unwrap();
    let done = e.run(&script, s).await.unwrap();
    assert_eq!(done.state, saga::FAILED);
    assert_eq!(script.calls("a"), 4, "max_attempts");
    assert!(done.error.unwrap().contains("gave up after 4 attempts"));

    // A deadline 250 ms of virtual time away stops retries before it.
    let script = Script::default();
    script.will(
        "a",
        (0..10)
            .map(|_| Err(StepError::transient("no drone free")))
            .collect(),
    );
    let deadline = clock.now() + chrono::Duration::milliseconds(250);
    let s = e
        .start(&script, "deadline", 0, json!({}), Some(deadline))
        .await
        .unwrap()
        .unwrap();
    let done = e.run(&script, s).await.unwrap();
    assert_eq!(done.state, saga::FAILED);
    assert_eq!(
        script.calls("a"),
        2,
        "attempt at 0 ms and 100 ms; the next (300 ms) would pass the deadline"
    );
    // A saga whose deadline already passed fails without calling anything.
    let script = Script::default();
    let s = e
        .start(&script, "late", 0, json!({}), Some(clock.now()))
        .await
        .unwrap()
        .unwrap();
    let done = e.run(&script, s).await.unwrap();
    assert_eq!(done.state, saga::FAILED);
    assert_eq!(script.calls("a"), 0);
}

async fn an_interrupted_saga_resumes_without_repeating_done_steps(pg: bool) {
    let db = db(pg).await;
    let journal = Arc::new(Journal::start(db.conn.clone()));
    let clock = ManualClock::starting_at(Utc::now());
    let script = Arc::new(Script::default());
    // First process: step "hang" never returns; the task is killed while in it.
    let first = Arc::new(engine(journal.clone(), &clock, &["a", "hang"]));
    let s = first
        .start(&script, "r1", 7, json!({"n": 1}), None)
        .await
        .unwrap()
        .unwrap();
    let (e2, sc2) = (first.clone(), script.clone());
    let task = tokio::spawn(async move { e2.run(&sc2, s).await });
    for _ in 0..100 {
        if script.calls("hang") == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    task.abort();
    // Second process: the same saga type, whose second step now works.
    let journal2 = Arc::new(Journal::start(db.conn.clone()));
    let second = Engine::new(
        journal2.clone(),
        Arc::new(clock.clone()),
        Saga {
            kind: "test",
            steps: vec![
                Arc::new(ScriptedStep {
                    name: "a",
                    policy: policy(),
                }) as Arc<dyn Step<Script>>,
                Arc::new(ScriptedStep {
                    name: "b",
                    policy: policy(),
                }),
            ],
            hooks: Arc::new(Announce),
        },
    );
    let unfinished = journal2.unfinished("test", &[7]).await.unwrap();
    assert_eq!(unfinished.len(), 1);
    assert!(
        journal2.unfinished("test", &[8]).await.unwrap().is_empty(),
        "only the owner's shards"
    );
    let record = SagaRecord::from_row(unfinished.into_iter().next().unwrap()).unwrap();
    assert_eq!(record.next_step, 1);
    let done = second.run(&script, record).await.unwrap();
    assert_eq!(done.state, saga::COMPLETED);
    assert_eq!(script.calls("a"), 1, "the finished step did not run again");
    assert_eq!(done.outputs["a"]["saga"], "r1");
}

async fn starting_twice_is_a_no_op(pg: bool) {
    let db = db(pg).await;
    let journal = Arc::new(Journal::start(db.conn.clone()));
    let clock = ManualClock::starting_at(Utc::now());
    let e = engine(journal.clone(), &clock, &["a"]);
    let script = Script::default();
    assert!(e
        .start(&script, "dup", 0, json!({"v": 1}), None)
        .await
        .unwrap()
        .is_some());
    assert!(e
        .start(&script, "dup", 0, json!({"v": 2}), None)
        .await
        .unwrap()
        .is_none());
    let row = journal.load("dup").await.unwrap().unwrap();
    assert_eq!(row.input, json!({"v": 1}).to_string());
    assert_eq!(outbox(&db.conn).await, vec!["Started"], "announced once");
}

async fn cancellation_stops_before_the_next_step(pg: bool) {
    let db = db(pg).await;
    let journal = Arc::new(Journal::start(db.conn.clone()));
    let clock = ManualClock::starting_at(Utc::now());
    let e = engine(journal.clone(), &clock, &["a", "b"]);
    let script = Script::default();
    *script.cancel.lock().unwrap() = Some("client cancelled".into());
    let s = e
        .start(&script, "c1", 0, json!({}), None)
        .await
        .unwrap()
        .unwrap();
    let done = e.run(&script, s).await.unwrap();
    assert_eq!(done.state, saga::CANCELLED);
    assert_eq!(script.calls("a"), 0);
    assert_eq!(
        outbox(&db.conn).await.last().map(String::as_str),
        Some("Cancelled { reason: \"client cancelled\" }")
    );
}

async fn many_sagas_share_commits(pg: bool) {
    let db = db(pg).await;
    let journal = Arc::new(Journal::start(db.conn.clone()));
    let clock = ManualClock::starting_at(Utc::now());
    let e = Arc::new(engine(journal.clone(), &clock, &["a", "b", "c", "d"]));
    let script = Arc::new(Script::default());
    let counter = Arc::new(AtomicU32::new(0));
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let (e, script, counter) = (e.clone(), script.clone(), counter.clone());
            tokio::spawn(async move {
                let s = e
                    .start(&script, &format!("m{i}"), i % 8, json!({"i": i}), None)
                    .await
                    .unwrap()
                    .unwrap();
                let done = e.run(&script, s).await.unwrap();
                if done.state == saga::COMPLETED {
                    counter.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(counter.load(Ordering::SeqCst), 200);
    assert_eq!(outbox(&db.conn).await.len(), 200 * 5);
}

struct Collect {
    got: Mutex<Vec<OutboxMessage>>,
    fail_first: AtomicU32,
}

#[async_trait]
impl saga::outbox::Publisher for Collect {
    async fn publish(&self, messages: &[OutboxMessage]) -> Result<(), String> {
        if self.fail_first.load(Ordering::SeqCst) > 0 {
            self.fail_first.fetch_sub(1, Ordering::SeqCst);
            return Err("broker down".into());
        }
        self.got.lock().unwrap().extend_from_slice(messages);
        Ok(())
    }
}

async fn outbox_relay_publishes_in_order_and_retries(pg: bool) {
    let db = db(pg).await;
    let journal = Arc::new(Journal::start(db.conn.clone()));
    let clock = ManualClock::starting_at(Utc::now());
    let e = engine(journal.clone(), &clock, &["a", "b"]);
    let script = Script::default();
    let s = e
        .start(&script, "o1", 0, json!({}), None)
        .await
        .unwrap()
        .unwrap();
    e.run(&script, s).await.unwrap();
    let publisher = Arc::new(Collect {
        got: Mutex::new(Vec::new()),
        fail_first: AtomicU32::new(1),
    });
    let relay = tokio::spawn(saga::outbox::relay(
        db.conn.clone(),
        publisher.clone(),
        Arc::new(tokio::sync::Notify::new()),
        Duration::from_millis(20),
    ));
    for _ in 0..200 {
        if publisher.got.lock().unwrap().len() == 3
            && saga::outbox::backlog(&db.conn).await.unwrap() == 0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    relay.abort();
    let got = publisher.got.lock().unwrap().clone();
    let versions: Vec<i64> = got
        .iter()
        .map(|m| m.payload["version"].as_i64().unwrap())
        .collect();
    assert_eq!(
        versions,
        vec![1, 2, 3],
        "in commit order, each once after the failed try"
    );
    assert_eq!(saga::outbox::backlog(&db.conn).await.unwrap(), 0);
}

/// Publishes nothing on its first call until released, so a test can commit something while the
/// relay holds a batch it has read.
#[derive(Default)]
struct Gate {
    got: Mutex<Vec<OutboxMessage>>,
    calls: AtomicU32,
    called: tokio::sync::Notify,
    release: tokio::sync::Notify,
}

#[async_trait]
impl saga::outbox::Publisher for Gate {
    async fn publish(&self, messages: &[OutboxMessage]) -> Result<(), String> {
        if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
            self.called.notify_one();
            self.release.notified().await;
        }
        self.got.lock().unwrap().extend_from_slice(messages);
        Ok(())
    }
}

mod postgres_only {
    #[tokio::test]
    async fn outbox_relay_never_drops_a_row_committed_late() {
        super::outbox_relay_never_drops_a_row_committed_late().await;
    }
}

/// PostgreSQL hands out sequence numbers at insert, not at commit: a transaction that drew a
/// lower `seq` can commit after the relay read the rows above it. Its row must still be sent.
async fn outbox_relay_never_drops_a_row_committed_late() {
    use sea_orm::TransactionTrait;

    let db = db(true).await;
    let insert = |name: &str| {
        format!(
            "INSERT INTO saga_outbox (destination, key, payload, created_at) \
             VALUES ('events', 'k', '{{\"name\":\"{name}\"}}', now())"
        )
    };
    let slow = db.conn.begin().await.unwrap();
    slow.execute_unprepared(&insert("late")).await.unwrap();
    db.conn.execute_unprepared(&insert("early")).await.unwrap();

    let publisher = Arc::new(Gate::default());
    let relay = tokio::spawn(saga::outbox::relay(
        db.conn.clone(),
        publisher.clone(),
        Arc::new(tokio::sync::Notify::new()),
        Duration::from_millis(20),
    ));
    // The relay has read "early" (the only row it can see) and is publishing it.
    tokio::time::timeout(Duration::from_secs(10), publisher.called.notified())
        .await
        .expect("the relay publishes");
    slow.commit().await.unwrap();
    publisher.release.notify_one();

    let names = || -> Vec<String> {
        publisher
            .got
            .lock()
            .unwrap()
            .iter()
            .map(|m| m.payload["name"].as_str().unwrap().to_owned())
            .collect()
    };
    for _ in 0..200 {
        if names().len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    relay.abort();
    assert_eq!(
        names(),
        vec!["early".to_owned(), "late".to_owned()],
        "the row committed late is published, not deleted with the batch before it"
    );
    assert_eq!(saga::outbox::backlog(&db.conn).await.unwrap(), 0);
}
