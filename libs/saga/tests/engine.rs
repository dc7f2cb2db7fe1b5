//! The saga engine on `MemoryStore`, SQLite and PostgreSQL (`DATABASE_URL`), on virtual time.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step should panic

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use common::{Backend, Fixture};
use saga::{
    Clock, Engine, EngineSettings, Fence, Hooks, Inbox, JournalError, Lifecycle, ManualClock,
    NoInbox, OutboxMessage, RetryPolicy, Saga, SagaRecord, Signal, SignalAction, Step, StepError,
    Store,
};
use sea_orm::ConnectionTrait;
use serde_json::{json, Value};

/// Expands each scenario for the three backends: `memory::name`, `sqlite::name`,
/// `postgres::name`.
macro_rules! backends {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $( #[tokio::test] async fn $name() { super::$name(super::Backend::Memory).await } )*
        }
        mod sqlite {
            $( #[tokio::test] async fn $name() { super::$name(super::Backend::Sqlite).await } )*
        }
        mod postgres {
            $( #[tokio::test] async fn $name() { super::$name(super::Backend::Postgres).await } )*
        }
    };
}

backends!(
    happy_path_journals_every_step,
    transient_failures_are_retried_on_virtual_time,
    permanent_failure_stops_and_announces,
    retries_stop_at_the_attempt_limit_and_the_deadline,
    an_interrupted_saga_resumes_without_repeating_done_steps,
    starting_twice_is_a_no_op,
    a_cancel_signal_stops_before_the_next_step,
    many_sagas_share_commits,
    outbox_relay_publishes_in_order_and_retries,
    a_long_retry_delay_parks_the_saga,
    a_rewind_signal_runs_a_completed_saga_again,
    a_rewound_step_gets_its_retries_again,
    a_run_whose_shard_was_taken_is_refused_and_writes_nothing_more,
    a_relay_whose_fence_went_stale_returns_the_refusal,
);

mod postgres_only {
    #[tokio::test]
    async fn outbox_relay_never_drops_a_row_committed_late() {
        super::outbox_relay_never_drops_a_row_committed_late().await;
    }
}

// ---------------------------------------------------------------------------------------------
// The test saga: scripted steps, an inbox, hooks that announce every change.

/// Signals for sagas, as a reader of the shard's input would hand them over.
#[derive(Default)]
struct TestInbox {
    waiting: Mutex<HashMap<String, Vec<Signal>>>,
    recorded: Mutex<Vec<Signal>>,
}

impl TestInbox {
    fn send(&self, id: &str, signal: Signal) {
        self.waiting
            .lock()
            .unwrap()
            .entry(id.to_owned())
            .or_default()
            .push(signal);
    }
}

impl Inbox for TestInbox {
    fn has(&self, id: &str) -> bool {
        self.waiting
            .lock()
            .unwrap()
            .get(id)
            .is_some_and(|v| !v.is_empty())
    }
    fn take(&self, id: &str) -> Vec<Signal> {
        self.waiting.lock().unwrap().remove(id).unwrap_or_default()
    }
    fn recorded(&self, signals: &[Signal]) {
        self.recorded.lock().unwrap().extend_from_slice(signals);
    }
}

/// Scripted outcomes per step name; records every call. Also the context steps can act on: the
/// inbox (a signal arrives while a step runs) and a store on which step "takeover" hands the
/// saga's shard to another owner.
#[derive(Default)]
struct Script {
    outcomes: Mutex<HashMap<&'static str, Vec<Result<Value, StepError>>>>,
    calls: Mutex<Vec<&'static str>>,
    inbox: TestInbox,
    /// When the step of this name runs, the signal arrives in the inbox.
    arrive: Mutex<HashMap<&'static str, Signal>>,
    takeover: Mutex<Option<Takeover>>,
}

/// The store on which, and the time at which, another owner takes the running saga's shard.
type Takeover = (Arc<dyn Store>, DateTime<Utc>);

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
        let arriving = ctx.arrive.lock().unwrap().remove(self.name);
        if let Some(signal) = arriving {
            ctx.inbox.send(&saga.id, signal);
        }
        let takeover = ctx.takeover.lock().unwrap().clone();
        if let (Some((store, at)), "takeover") = (takeover, self.name) {
            store
                .acquire(saga.shard, "other", at, chrono::Duration::minutes(10))
                .await
                .unwrap()
                .expect("the other owner takes the expired lease");
        }
        let next = {
            let mut outcomes = ctx.outcomes.lock().unwrap();
            match outcomes.get_mut(self.name) {
                Some(list) if !list.is_empty() => Some(list.remove(0)),
                _ => None,
            }
        };
        next.unwrap_or_else(|| {
            Ok(json!({
                "step": self.name,
                "saga": saga.id,
                "seen": saga.outputs.len(),
                "input": saga.input,
            }))
        })
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

    fn on_signal(&self, _: &Script, _: &SagaRecord, signal: &Signal) -> SignalAction {
        match signal.kind.as_str() {
            "cancel" => SignalAction::Cancel {
                reason: signal.payload["reason"].as_str().unwrap().to_owned(),
            },
            "reschedule" => SignalAction::Rewind {
                input: signal.payload["input"].clone(),
                to_step: usize::try_from(signal.payload["to_step"].as_u64().unwrap()).unwrap(),
                deadline: signal.payload["deadline"]
                    .as_str()
                    .map(|d| DateTime::parse_from_rfc3339(d).unwrap().with_timezone(&Utc)),
                detail: "rescheduled".into(),
            },
            other => SignalAction::Ignore {
                why: format!("unknown signal {other}"),
            },
        }
    }
}

fn cancel(reason: &str, at: DateTime<Utc>) -> Signal {
    Signal {
        kind: "cancel".into(),
        payload: json!({ "reason": reason }),
        at,
        position: None,
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

/// Waits in place (never parks) unless a test says otherwise.
fn no_parking() -> EngineSettings {
    EngineSettings {
        park_after: Duration::from_secs(3600),
    }
}

fn engine_with(
    store: Arc<dyn Store>,
    clock: &ManualClock,
    steps: &[&'static str],
    policy: RetryPolicy,
    settings: EngineSettings,
) -> Engine<Script> {
    Engine::new(
        store,
        Arc::new(clock.clone()),
        Saga {
            kind: "test",
            steps: steps
                .iter()
                .map(|n| Arc::new(ScriptedStep { name: n, policy }) as Arc<dyn Step<Script>>)
                .collect(),
            hooks: Arc::new(Announce),
        },
        settings,
    )
}

fn engine(store: Arc<dyn Store>, clock: &ManualClock, steps: &[&'static str]) -> Engine<Script> {
    engine_with(store, clock, steps, policy(), no_parking())
}

/// Virtual time from now, in whole milliseconds (what every store keeps of a timer).
fn clock() -> ManualClock {
    ManualClock::starting_at(
        Utc.timestamp_millis_opt(Utc::now().timestamp_millis())
            .unwrap(),
    )
}

/// This process's lease on `shard`.
async fn lease(store: &Arc<dyn Store>, shard: i32, clock: &ManualClock) -> Fence {
    store
        .acquire(shard, "me", clock.now(), chrono::Duration::minutes(10))
        .await
        .unwrap()
        .expect("the shard is free")
        .fence()
}

/// The fence of whoever holds `shard` now.
async fn current(store: &Arc<dyn Store>, shard: i32) -> Fence {
    let row = store
        .leases()
        .await
        .unwrap()
        .into_iter()
        .find(|l| l.shard == shard)
        .unwrap();
    Fence {
        shard,
        epoch: row.epoch,
    }
}

/// The shard's outbox as the lifecycle changes it announces, in order.
async fn changes(store: &Arc<dyn Store>, fence: Fence) -> Vec<String> {
    store
        .outbox(fence, 10_000)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.message.payload["change"].as_str().unwrap().to_owned())
        .collect()
}

fn ms(t: Option<DateTime<Utc>>) -> Option<i64> {
    t.map(|t| t.timestamp_millis())
}

fn attempts_of(attempts: &[saga::Attempt], step: &str) -> Vec<(i32, String)> {
    attempts
        .iter()
        .filter(|a| a.step == step)
        .map(|a| (a.attempt, a.outcome.clone()))
        .collect()
}

fn outcomes(list: &[(i32, &str)]) -> Vec<(i32, String)> {
    list.iter().map(|(n, o)| (*n, (*o).to_owned())).collect()
}

// ---------------------------------------------------------------------------------------------
// Scenarios.

async fn happy_path_journals_every_step(b: Backend) {
    let fx = Fixture::new(b).await;
    let store = fx.store.clone();
    let clock = clock();
    let fence = lease(&store, 3, &clock).await;
    let e = engine(store.clone(), &clock, &["a", "b", "c"]);
    let script = Script::default();
    let s = e
        .start(&script, fence, "s1", json!({"x": 1}), None, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((s.shard, s.version), (3, 1));
    let done = e.run_started(&script, fence, s, &NoInbox).await.unwrap();
    assert_eq!(done.state, saga::COMPLETED);
    assert_eq!(
        done.outputs["c"]["seen"], 2,
        "later steps see earlier outputs"
    );
    let row = store.load("s1").await.unwrap().unwrap();
    assert_eq!(
        (row.state.as_str(), row.next_step, row.shard, row.version),
        ("completed", 3, 3, 4)
    );
    assert_eq!(row.outputs, done.outputs);
    assert_eq!(row.version, done.version, "the run's view is the journal's");
    let attempts = store.attempts("s1").await.unwrap();
    assert_eq!(
        attempts
            .iter()
            .map(|a| (a.step.as_str(), a.outcome.as_str()))
            .collect::<Vec<_>>(),
        vec![("a", "succeeded"), ("b", "succeeded"), ("c", "succeeded")]
    );
    assert_eq!(
        changes(&store, fence).await,
        vec![
            "Started",
            "StepSucceeded { step: \"a\" }",
            "StepSucceeded { step: \"b\" }",
            "Completed"
        ]
    );
    let versions: Vec<i64> = store
        .outbox(fence, 100)
        .await
        .unwrap()
        .iter()
        .map(|r| r.message.payload["version"].as_i64().unwrap())
        .collect();
    assert_eq!(versions, vec![1, 2, 3, 4], "each event carries its version");
    assert!(clock.sleeps().is_empty());
}

async fn transient_failures_are_retried_on_virtual_time(b: Backend) {
    let fx = Fixture::new(b).await;
    let store = fx.store.clone();
    let clock = clock();
    let fence = lease(&store, 0, &clock).await;
    let e = engine(store.clone(), &clock, &["a", "b"]);
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
        .start(&script, fence, "s2", json!({}), None, None)
        .await
        .unwrap()
        .unwrap();
    let done = e.run_started(&script, fence, s, &NoInbox).await.unwrap();
    assert_eq!(done.state, saga::COMPLETED);
    assert_eq!(script.calls("b"), 3);
    assert_eq!(
        clock.sleeps(),
        vec![Duration::from_millis(100), Duration::from_secs(5)],
        "backoff, then Retry-After honoured"
    );
    assert!(real.elapsed() < Duration::from_secs(3), "no real sleeping");
    assert_eq!(
        attempts_of(&store.attempts("s2").await.unwrap(), "b"),
        outcomes(&[(1, "transient"), (2, "transient"), (3, "succeeded")])
    );
    assert_eq!(store.load("s2").await.unwrap().unwrap().wake_at, None);
}

async fn permanent_failure_stops_and_announces(b: Backend) {
    let fx = Fixture::new(b).await;
    let store = fx.store.clone();
    let clock = clock();
    let fence = lease(&store, 0, &clock).await;
    let e = engine(store.clone(), &clock, &["a", "b", "c"]);
    let script = Script::default();
    script.will("b", vec![Err(StepError::permanent("account suspended"))]);
    let s = e
        .start(&script, fence, "s3", json!({}), None, None)
        .await
        .unwrap()
        .unwrap();
    let done = e.run_started(&script, fence, s, &NoInbox).await.unwrap();
    assert_eq!(done.state, saga::FAILED);
    assert_eq!(done.error.as_deref(), Some("b: account suspended"));
    assert_eq!(script.calls("c"), 0);
    assert_eq!(script.calls("b"), 1, "no retries for permanent failures");
    let last = changes(&store, fence).await.pop().unwrap();
    assert!(last.starts_with("Failed { step: \"b\""), "{last}");
    let row = store.load("s3").await.unwrap().unwrap();
    assert_eq!(
        (row.state.as_str(), row.error.as_deref()),
        ("failed", Some("b: account suspended"))
    );
    assert_eq!(
        attempts_of(&store.attempts("s3").await.unwrap(), "b"),
        outcomes(&[(1, "permanent")])
    );
}

async fn retries_stop_at_the_attempt_limit_and_the_deadline(b: Backend) {
    let fx = Fixture::new(b).await;
    let store = fx.store.clone();
    let clock = clock();
    let fence = lease(&store, 0, &clock).await;
    let e = engine(store.clone(), &clock, &["a"]);
    let script = Script::default();
    script.will(
        "a",
        (0..10).map(|_| Err(StepError::transient("down"))).collect(),
    );
    let s = e
        .start(&script, fence, "limit", json!({}), None, None)
        .await
        .unwrap()
        .unwrap();
    let done = e.run_started(&script, fence, s, &NoInbox).await.unwrap();
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
        .start(&script, fence, "deadline", json!({}), Some(deadline), None)
        .await
        .unwrap()
        .unwrap();
    let done = e.run_started(&script, fence, s, &NoInbox).await.unwrap();
    assert_eq!(done.state, saga::FAILED);
    assert_eq!(
        script.calls("a"),
        2,
        "attempt at 0 ms and 100 ms; the next (300 ms) would pass the deadline"
    );
    // A saga whose deadline already passed fails without calling anything.
    let script = Script::default();
    let s = e
        .start(&script, fence, "late", json!({}), Some(clock.now()), None)
        .await
        .unwrap()
        .unwrap();
    let done = e.run_started(&script, fence, s, &NoInbox).await.unwrap();
    assert_eq!(done.state, saga::FAILED);
    assert_eq!(script.calls("a"), 0);
}

async fn an_interrupted_saga_resumes_without_repeating_done_steps(b: Backend) {
    let fx = Fixture::new(b).await;
    let store = fx.store.clone();
    let clock = clock();
    let script = Arc::new(Script::default());
    // First process: step "hang" never returns; the task is killed while in it.
    let first_fence = lease(&store, 7, &clock).await;
    let first = Arc::new(engine(store.clone(), &clock, &["a", "hang"]));
    let s = first
        .start(&script, first_fence, "r1", json!({"n": 1}), None, None)
        .await
        .unwrap()
        .unwrap();
    let (e2, sc2) = (first.clone(), script.clone());
    let task = tokio::spawn(async move { e2.run_started(&sc2, first_fence, s, &NoInbox).await });
    for _ in 0..500 {
        if script.calls("hang") == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(script.calls("hang"), 1);
    task.abort();

    // Second process, once the first one's lease has expired: the same saga type, whose second
    // step now works.
    let store2 = fx.reopen();
    let fence = store2
        .acquire(
            7,
            "second",
            clock.now() + chrono::Duration::hours(1),
            chrono::Duration::minutes(10),
        )
        .await
        .unwrap()
        .unwrap()
        .fence();
    let second = engine(store2.clone(), &clock, &["a", "b"]);
    let orphans = store2.orphans("test", 7).await.unwrap();
    assert_eq!(orphans.len(), 1);
    assert!(
        store2.orphans("test", 8).await.unwrap().is_empty(),
        "only the owner's shards"
    );
    let record = orphans.into_iter().next().unwrap();
    assert_eq!((record.id.as_str(), record.next_step), ("r1", 1));
    let done = second.run(&script, fence, record, &NoInbox).await.unwrap();
    assert_eq!(done.state, saga::COMPLETED);
    assert_eq!(script.calls("a"), 1, "the finished step did not run again");
    assert_eq!(done.outputs["a"]["saga"], "r1");
    // The first process, were it still alive, could write nothing more.
    assert!(matches!(
        first
            .start(&script, first_fence, "r2", json!({}), None, None)
            .await,
        Err(JournalError::Refused(_))
    ));
}

async fn starting_twice_is_a_no_op(b: Backend) {
    let fx = Fixture::new(b).await;
    let store = fx.store.clone();
    let clock = clock();
    let fence = lease(&store, 0, &clock).await;
    let e = engine(store.clone(), &clock, &["a"]);
    let script = Script::default();
    assert!(e
        .start(&script, fence, "dup", json!({"v": 1}), None, None)
        .await
        .unwrap()
        .is_some());
    assert!(e
        .start(&script, fence, "dup", json!({"v": 2}), None, None)
        .await
        .unwrap()
        .is_none());
    let row = store.load("dup").await.unwrap().unwrap();
    assert_eq!((row.input, row.version), (json!({"v": 1}), 1));
    assert_eq!(
        changes(&store, fence).await,
        vec!["Started"],
        "announced once"
    );
}

async fn a_cancel_signal_stops_before_the_next_step(b: Backend) {
    let fx = Fixture::new(b).await;
    let store = fx.store.clone();
    let clock = clock();
    let fence = lease(&store, 0, &clock).await;
    let e = engine(store.clone(), &clock, &["a", "b"]);

    // Waiting in the inbox before the first step.
    let script = Script::default();
    let s = e
        .start(&script, fence, "c1", json!({}), None, None)
        .await
        .unwrap()
        .unwrap();
    let signal = cancel("client cancelled", clock.now());
    script.inbox.send("c1", signal.clone());
    let done = e
        .run_started(&script, fence, s, &script.inbox)
        .await
        .unwrap();
    assert_eq!(done.state, saga::CANCELLED);
    assert_eq!(done.error.as_deref(), Some("client cancelled"));
    assert_eq!(script.calls("a"), 0);
    assert_eq!(
        changes(&store, fence).await.last().map(String::as_str),
        Some("Cancelled { reason: \"client cancelled\" }")
    );
    assert_eq!(
        *script.inbox.recorded.lock().unwrap(),
        vec![signal],
        "the inbox hears the signal is durable"
    );
    let row = store.load("c1").await.unwrap().unwrap();
    assert_eq!(row.state, saga::CANCELLED);
    assert!(row.signals.is_empty(), "applied, so not kept");

    // Arriving while the first step runs: the second does not start.
    let script = Script::default();
    script
        .arrive
        .lock()
        .unwrap()
        .insert("a", cancel("changed my mind", clock.now()));
    let s = e
        .start(&script, fence, "c2", json!({}), None, None)
        .await
        .unwrap()
        .unwrap();
    let done = e
        .run_started(&script, fence, s, &script.inbox)
        .await
        .unwrap();
    assert_eq!(done.state, saga::CANCELLED);
    assert_eq!((script.calls("a"), script.calls("b")), (1, 0));
    assert!(done.outputs.contains_key("a"));

    // Recorded in the journal for a saga no task runs (parked): it is due at once and applies it.
    let script = Script::default();
    let mut s = e
        .start(
            &script,
            fence,
            "c3",
            json!({}),
            None,
            Some(clock.now() + chrono::Duration::hours(1)),
        )
        .await
        .unwrap()
        .unwrap();
    assert!(store.due(0, clock.now(), 10).await.unwrap().is_empty());
    e.signal(fence, &mut s, vec![cancel("by phone", clock.now())])
        .await
        .unwrap();
    let due = store.due(0, clock.now(), 10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].signals.len(), 1, "the signal waits in the journal");
    let done = e
        .run(&script, fence, due.into_iter().next().unwrap(), &NoInbox)
        .await
        .unwrap();
    assert_eq!(done.state, saga::CANCELLED);
    assert_eq!(script.calls("a"), 0);
    let row = store.load("c3").await.unwrap().unwrap();
    assert_eq!(
        (row.state.as_str(), row.wake_at, row.signals.len()),
        ("cancelled", None, 0)
    );
}

async fn many_sagas_share_commits(b: Backend) {
    let fx = Fixture::new(b).await;
    let store = fx.store.clone();
    let clock = clock();
    let mut fences = HashMap::new();
    for shard in 0..8 {
        fences.insert(shard, lease(&store, shard, &clock).await);
    }
    let e = Arc::new(engine(store.clone(), &clock, &["a", "b", "c", "d"]));
    let script = Arc::new(Script::default());
    let counter = Arc::new(AtomicU32::new(0));
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let (e, script, counter) = (e.clone(), script.clone(), counter.clone());
            let fence = fences[&(i % 8)];
            tokio::spawn(async move {
                let s = e
                    .start(
                        &script,
                        fence,
                        &format!("m{i}"),
                        json!({"i": i}),
                        None,
                        None,
                    )
                    .await
                    .unwrap()
                    .unwrap();
                let done = e.run_started(&script, fence, s, &NoInbox).await.unwrap();
                if done.state == saga::COMPLETED && done.version == 5 {
                    counter.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(counter.load(Ordering::SeqCst), 200);
    assert_eq!(store.outbox_backlog().await.unwrap(), 200 * 5);
    assert_eq!(changes(&store, fences[&3]).await.len(), 25 * 5);
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

async fn outbox_relay_publishes_in_order_and_retries(b: Backend) {
    let fx = Fixture::new(b).await;
    let store = fx.store.clone();
    let clock = clock();
    let fence = lease(&store, 0, &clock).await;
    let other = lease(&store, 1, &clock).await;
    let e = engine(store.clone(), &clock, &["a", "b"]);
    let script = Script::default();
    let s = e
        .start(&script, fence, "o1", json!({}), None, None)
        .await
        .unwrap()
        .unwrap();
    e.run_started(&script, fence, s, &NoInbox).await.unwrap();
    // Another shard's rows are not this relay's.
    e.start(&script, other, "o2", json!({}), None, None)
        .await
        .unwrap()
        .unwrap();
    let publisher = Arc::new(Collect {
        got: Mutex::new(Vec::new()),
        fail_first: AtomicU32::new(1),
    });
    let relay = tokio::spawn(saga::outbox::relay(
        store.clone(),
        fence,
        publisher.clone(),
        e.outbox_written(),
        Duration::from_millis(20),
    ));
    for _ in 0..500 {
        if publisher.got.lock().unwrap().len() == 3 && store.outbox_backlog().await.unwrap() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    relay.abort();
    let got = publisher.got.lock().unwrap().clone();
    let versions: Vec<(String, i64)> = got
        .iter()
        .map(|m| (m.key.clone(), m.payload["version"].as_i64().unwrap()))
        .collect();
    assert_eq!(
        versions,
        vec![("o1".into(), 1), ("o1".into(), 2), ("o1".into(), 3)],
        "in commit order, each once after the failed try"
    );
    assert!(store.outbox(fence, 10).await.unwrap().is_empty());
    assert_eq!(changes(&store, other).await, vec!["Started"]);
}

async fn a_long_retry_delay_parks_the_saga(b: Backend) {
    let fx = Fixture::new(b).await;
    let store = fx.store.clone();
    let clock = clock();
    let fence = lease(&store, 2, &clock).await;
    let policy = RetryPolicy {
        min_delay_ms: 100,
        max_delay_ms: 10_000,
        max_attempts: 6,
        budget_ms: 60_000,
        jitter: false,
    };
    let settings = EngineSettings {
        park_after: Duration::from_millis(300),
    };
    let e = engine_with(store.clone(), &clock, &["a", "b"], policy, settings);
    let script = Script::default();
    script.will(
        "b",
        (0..4)
            .map(|_| Err(StepError::transient("no drone free")))
            .collect(),
    );
    let s = e
        .start(&script, fence, "p1", json!({}), None, None)
        .await
        .unwrap()
        .unwrap();

    // Delays 100 ms and 200 ms are slept in place; 400 ms parks. (Back-off delays are exact to
    // the millisecond, and timers are kept to the millisecond.)
    let parked = e.run_started(&script, fence, s, &NoInbox).await.unwrap();
    assert_eq!(parked.state, saga::RUNNING);
    assert_eq!(
        ms(parked.wake_at),
        ms(Some(clock.now() + chrono::Duration::milliseconds(400)))
    );
    let wake = parked.wake_at.unwrap();
    assert_eq!(
        clock
            .sleeps()
            .iter()
            .map(Duration::as_millis)
            .collect::<Vec<_>>(),
        vec![100, 200]
    );
    assert_eq!(script.calls("b"), 3);
    let row = store.load("p1").await.unwrap().unwrap();
    assert_eq!(ms(row.wake_at), ms(Some(wake)), "the timer is durable");
    assert_eq!(row.version, parked.version);
    assert!(
        store.orphans("test", 2).await.unwrap().is_empty(),
        "a parked saga is no orphan"
    );
    let before = wake - chrono::Duration::milliseconds(1);
    assert!(store.due(2, before, 10).await.unwrap().is_empty());
    let due = store.due(2, wake, 10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0], row);

    // At its time it runs on: attempt 4, and the back-off goes on from 400 ms to 800 ms.
    clock.advance((wake - clock.now()).to_std().unwrap());
    let parked = e
        .run(&script, fence, due.into_iter().next().unwrap(), &NoInbox)
        .await
        .unwrap();
    assert_eq!(parked.state, saga::RUNNING);
    assert_eq!(
        ms(parked.wake_at),
        ms(Some(clock.now() + chrono::Duration::milliseconds(800)))
    );
    assert_eq!(clock.sleeps().len(), 2, "parked again, not slept");
    assert_eq!(
        attempts_of(&store.attempts("p1").await.unwrap(), "b"),
        outcomes(&[
            (1, "transient"),
            (2, "transient"),
            (3, "transient"),
            (4, "transient")
        ])
    );
    assert!(store.due(2, wake, 10).await.unwrap().is_empty());

    let wake = parked.wake_at.unwrap();
    clock.advance((wake - clock.now()).to_std().unwrap());
    let due = store.due(2, clock.now(), 10).await.unwrap();
    assert_eq!(due.len(), 1);
    let done = e
        .run(&script, fence, due.into_iter().next().unwrap(), &NoInbox)
        .await
        .unwrap();
    assert_eq!(done.state, saga::COMPLETED);
    assert_eq!(script.calls("b"), 5);
    assert_eq!(
        attempts_of(&store.attempts("p1").await.unwrap(), "b").last(),
        Some(&(5, "succeeded".to_owned()))
    );
    let row = store.load("p1").await.unwrap().unwrap();
    assert_eq!((row.state.as_str(), row.wake_at), ("completed", None));
    assert!(store.due(2, clock.now(), 10).await.unwrap().is_empty());
}

fn reschedule(input: Value, to_step: usize, deadline: DateTime<Utc>, at: DateTime<Utc>) -> Signal {
    Signal {
        kind: "reschedule".into(),
        payload: json!({
            "input": input,
            "to_step": to_step,
            "deadline": deadline.to_rfc3339(),
        }),
        at,
        position: None,
    }
}

async fn a_rewind_signal_runs_a_completed_saga_again(b: Backend) {
    let fx = Fixture::new(b).await;
    let store = fx.store.clone();
    let clock = clock();
    let fence = lease(&store, 0, &clock).await;
    let e = engine(store.clone(), &clock, &["a", "b", "c"]);
    let script = Script::default();
    let s = e
        .start(&script, fence, "w1", json!({"v": 1}), None, None)
        .await
        .unwrap()
        .unwrap();
    let mut done = e.run_started(&script, fence, s, &NoInbox).await.unwrap();
    assert_eq!(done.state, saga::COMPLETED);

    // The signal is recorded for the finished saga, which is due at once.
    let deadline = clock.now() + chrono::Duration::hours(2);
    e.signal(
        fence,
        &mut done,
        vec![reschedule(json!({"v": 2}), 1, deadline, clock.now())],
    )
    .await
    .unwrap();
    let due = store.due(0, clock.now(), 10).await.unwrap();
    assert_eq!(due.len(), 1);
    let again = e
        .run(&script, fence, due.into_iter().next().unwrap(), &NoInbox)
        .await
        .unwrap();
    assert_eq!(again.state, saga::COMPLETED);
    assert_eq!(
        (script.calls("a"), script.calls("b"), script.calls("c")),
        (1, 2, 2),
        "from the rewound step on"
    );
    assert_eq!(again.outputs["a"]["input"], json!({"v": 1}));
    assert_eq!(again.outputs["b"]["input"], json!({"v": 2}));
    assert_eq!(again.outputs["c"]["input"], json!({"v": 2}));
    let row = store.load("w1").await.unwrap().unwrap();
    assert_eq!(row.input, json!({"v": 2}));
    assert_eq!(row.deadline, Some(deadline));
    assert_eq!((row.next_step, row.wake_at), (3, None));
    assert!(row.signals.is_empty());
    assert_eq!(row.version, again.version);
    assert_eq!(
        changes(&store, fence).await,
        vec![
            "Started",
            "StepSucceeded { step: \"a\" }",
            "StepSucceeded { step: \"b\" }",
            "Completed",
            "Rewound { detail: \"rescheduled\" }",
            "StepSucceeded { step: \"b\" }",
            "Completed",
        ]
    );
    let attempts = store.attempts("w1").await.unwrap();
    assert_eq!(
        attempts_of(&attempts, "b"),
        outcomes(&[(1, "succeeded"), (2, "succeeded")]),
        "the rewound step's attempts continue their numbers"
    );
    assert_eq!(attempts_of(&attempts, "a"), outcomes(&[(1, "succeeded")]));
}

/// A step that needed all its attempts the first time gets them again after a rewind.
async fn a_rewound_step_gets_its_retries_again(b: Backend) {
    let fx = Fixture::new(b).await;
    let store = fx.store.clone();
    let clock = clock();
    let fence = lease(&store, 0, &clock).await;
    let e = engine(store.clone(), &clock, &["a", "b"]);
    let script = Script::default();
    script.will(
        "b",
        (0..3).map(|_| Err(StepError::transient("busy"))).collect(),
    );
    let s = e
        .start(&script, fence, "w2", json!({"v": 1}), None, None)
        .await
        .unwrap()
        .unwrap();
    let done = e.run_started(&script, fence, s, &NoInbox).await.unwrap();
    assert_eq!(done.state, saga::COMPLETED, "on the 4th and last attempt");
    assert_eq!(clock.sleeps().len(), 3);

    // Rescheduled through the inbox; the step fails once more, then works.
    script.will("b", vec![Err(StepError::transient("busy again"))]);
    let deadline = clock.now() + chrono::Duration::hours(1);
    script
        .inbox
        .send("w2", reschedule(json!({"v": 2}), 1, deadline, clock.now()));
    let again = e.run(&script, fence, done, &script.inbox).await.unwrap();
    assert_eq!(again.state, saga::COMPLETED, "{:?}", again.error);
    assert_eq!(again.outputs["b"]["input"], json!({"v": 2}));
    assert_eq!(
        clock.sleeps()[3..],
        [Duration::from_millis(100)],
        "the back-off starts over"
    );
    assert_eq!(
        attempts_of(&store.attempts("w2").await.unwrap(), "b"),
        outcomes(&[
            (1, "transient"),
            (2, "transient"),
            (3, "transient"),
            (4, "succeeded"),
            (5, "transient"),
            (6, "succeeded")
        ])
    );
}

async fn a_run_whose_shard_was_taken_is_refused_and_writes_nothing_more(b: Backend) {
    let fx = Fixture::new(b).await;
    let store = fx.store.clone();
    let clock = clock();
    let fence = lease(&store, 5, &clock).await;
    let e = engine(store.clone(), &clock, &["takeover", "b"]);
    let script = Script::default();
    // While the first step runs, the lease expires and another replica takes the shard.
    *script.takeover.lock().unwrap() =
        Some((store.clone(), clock.now() + chrono::Duration::hours(1)));
    let s = e
        .start(&script, fence, "t1", json!({}), None, None)
        .await
        .unwrap()
        .unwrap();
    let r = e.run_started(&script, fence, s, &NoInbox).await;
    assert!(matches!(r, Err(JournalError::Refused(_))), "{r:?}");
    assert_eq!(script.calls("b"), 0, "the stale run stopped");
    *script.takeover.lock().unwrap() = None;

    let now = current(&store, 5).await;
    assert!(now.epoch > fence.epoch);
    let row = store.load("t1").await.unwrap().unwrap();
    assert_eq!(
        (row.version, row.next_step, row.state.as_str()),
        (1, 0, "running")
    );
    assert!(row.outputs.is_empty());
    assert!(store.attempts("t1").await.unwrap().is_empty());
    assert_eq!(changes(&store, now).await, vec!["Started"]);

    // Nor can the stale owner sneak in anything else.
    let mut stale = row.clone();
    assert!(matches!(
        e.signal(fence, &mut stale, vec![cancel("late", clock.now())])
            .await,
        Err(JournalError::Refused(_))
    ));
    assert_eq!(stale, row, "a refused write leaves the caller's copy alone");
    let r = e.run(&script, fence, row.clone(), &NoInbox).await;
    assert!(matches!(r, Err(JournalError::Refused(_))), "{r:?}");
    assert_eq!(store.load("t1").await.unwrap().unwrap(), row);
    assert_eq!(store.outbox_backlog().await.unwrap(), 1);

    // The new owner carries on.
    let done = e.run(&script, now, row, &NoInbox).await.unwrap();
    assert_eq!(done.state, saga::COMPLETED);
}

/// Publishes nothing on its first call until released, so a test can act while the relay holds a
/// batch it has read.
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

async fn a_relay_whose_fence_went_stale_returns_the_refusal(b: Backend) {
    let fx = Fixture::new(b).await;
    let store = fx.store.clone();
    let clock = clock();
    let later = || clock.now() + chrono::Duration::hours(1);
    let ttl = chrono::Duration::minutes(10);

    // An idle relay: it notices at its next poll.
    let fence = lease(&store, 0, &clock).await;
    let relay = tokio::spawn(saga::outbox::relay(
        store.clone(),
        fence,
        Arc::new(Gate::default()),
        Arc::new(tokio::sync::Notify::new()),
        Duration::from_millis(20),
    ));
    store
        .acquire(0, "other", later(), ttl)
        .await
        .unwrap()
        .unwrap();
    let refusal = tokio::time::timeout(Duration::from_secs(10), relay)
        .await
        .expect("the relay stops")
        .unwrap();
    assert!(matches!(refusal, JournalError::Refused(_)), "{refusal:?}");

    // A relay that lost the shard while publishing: it deletes nothing, so the new owner
    // publishes the rows again (at least once).
    let fence = lease(&store, 1, &clock).await;
    let e = engine(store.clone(), &clock, &["a"]);
    let script = Script::default();
    let s = e
        .start(&script, fence, "x", json!({}), None, None)
        .await
        .unwrap()
        .unwrap();
    e.run_started(&script, fence, s, &NoInbox).await.unwrap();
    let publisher = Arc::new(Gate::default());
    let relay = tokio::spawn(saga::outbox::relay(
        store.clone(),
        fence,
        publisher.clone(),
        Arc::new(tokio::sync::Notify::new()),
        Duration::from_millis(20),
    ));
    tokio::time::timeout(Duration::from_secs(10), publisher.called.notified())
        .await
        .expect("the relay publishes");
    let new = store
        .acquire(1, "other", later(), ttl)
        .await
        .unwrap()
        .unwrap()
        .fence();
    publisher.release.notify_one();
    let refusal = tokio::time::timeout(Duration::from_secs(10), relay)
        .await
        .expect("the relay stops")
        .unwrap();
    assert!(matches!(refusal, JournalError::Refused(_)), "{refusal:?}");
    assert_eq!(publisher.got.lock().unwrap().len(), 2);
    assert_eq!(
        changes(&store, new).await,
        vec!["Started", "Completed"],
        "the rows stay for the new owner"
    );
}

/// PostgreSQL hands out sequence numbers at insert, not at commit: a transaction that drew a
/// lower `seq` can commit after the relay read the rows above it. Its row must still be sent.
async fn outbox_relay_never_drops_a_row_committed_late() {
    use sea_orm::TransactionTrait;

    let fx = Fixture::new(Backend::Postgres).await;
    let store = fx.store.clone();
    let conn = &fx.db.as_ref().unwrap().conn;
    let clock = clock();
    let fence = lease(&store, 0, &clock).await;
    let insert = |name: &str| {
        format!(
            "INSERT INTO saga_outbox (shard, destination, key, payload, created_at) \
             VALUES (0, 'events', 'k', '{{\"name\":\"{name}\"}}', now())"
        )
    };
    let slow = conn.begin().await.unwrap();
    slow.execute_unprepared(&insert("late")).await.unwrap();
    conn.execute_unprepared(&insert("early")).await.unwrap();

    let publisher = Arc::new(Gate::default());
    let relay = tokio::spawn(saga::outbox::relay(
        store.clone(),
        fence,
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
    for _ in 0..500 {
        if names().len() == 2 && store.outbox_backlog().await.unwrap() == 0 {
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
    assert_eq!(store.outbox_backlog().await.unwrap(), 0);
}
