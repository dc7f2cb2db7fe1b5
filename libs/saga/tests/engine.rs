//! The saga engine on `MemoryStore`, SQLite and PostgreSQL (`DATABASE_URL`), on virtual time.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step should panic

#[macro_use]
mod common;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use common::{load, Backend, Fixture};
use saga::{
    Clock, Engine, EngineSettings, Fence, Hooks, Inbox, JournalError, Lifecycle, ManualClock,
    NoInbox, OutboxMessage, RawJson, RetryPolicy, Saga, SagaRecord, Signal, SignalAction, Step,
    StepError, Store,
};
use sea_orm::ConnectionTrait;
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

per_backend!(
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
    a_deferred_step_parks_at_once_and_spends_no_attempt,
    a_rewind_signal_runs_a_completed_saga_again,
    a_rewound_step_gets_its_retries_again,
    a_run_whose_shard_was_taken_is_refused_and_writes_nothing_more,
    a_final_write_refused_by_a_fence_is_never_told_as_durable,
    a_waiting_success_is_written_with_the_next_step,
    a_waiting_success_is_written_before_a_failure_or_a_wait,
    a_waiting_success_lost_with_its_run_is_run_again,
    leading_checks_are_written_with_the_start,
    a_check_that_did_not_pass_before_the_start_is_the_steps_first_attempt,
    a_relay_whose_fence_went_stale_returns_the_refusal,
);

mod postgres_only {
    #[tokio::test]
    async fn outbox_relay_never_drops_a_row_committed_late() {
        super::outbox_relay_never_drops_a_row_committed_late().await;
    }
}

async fn run<F, Fut>(backend: Backend, scenario: F)
where
    F: FnOnce(Fixture) -> Fut,
    Fut: Future<Output = ()>,
{
    scenario(Fixture::new(backend).await).await;
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
    /// The changes the hooks were told are durable, in order.
    committed: Mutex<Vec<String>>,
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
    /// Steps named `read...` change nothing.
    fn written_with_next(&self, _saga: &SagaRecord, _output: &Value) -> bool {
        self.name.starts_with("read")
    }
    /// Steps named `check...` only read, whatever their outcome.
    fn reads_only(&self) -> bool {
        self.name.starts_with("check")
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
            acquire(&store, saga.shard, "other", at).await;
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
            payload: RawJson::encode(
                &json!({"change": format!("{change:?}"), "version": saga.version}),
            )
            .unwrap(),
        }]
    }

    fn committed(&self, ctx: &Script, saga: &SagaRecord, change: &Lifecycle) {
        let name = format!("{change:?}");
        let name = name.split([' ', '{']).next().unwrap_or_default();
        ctx.committed
            .lock()
            .unwrap()
            .push(format!("{} {name} v{}", saga.id, saga.version));
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

/// `owner` takes a ten-minute lease on `shard` at `at`: the shard is free, or its lease expired.
async fn acquire(store: &Arc<dyn Store>, shard: i32, owner: &str, at: DateTime<Utc>) -> Fence {
    store
        .acquire(shard, owner, at, chrono::Duration::minutes(10))
        .await
        .unwrap()
        .expect("the shard is free or its lease expired")
        .fence()
}

/// This process's lease on `shard`.
async fn lease(store: &Arc<dyn Store>, shard: i32, clock: &ManualClock) -> Fence {
    acquire(store, shard, "me", clock.now()).await
}

/// The usual start of a scenario: the fixture's store, virtual time, this process's lease on
/// `shard`, an engine of `steps` and a fresh script.
async fn setup(
    fx: &Fixture,
    shard: i32,
    steps: &[&'static str],
) -> (Arc<dyn Store>, ManualClock, Fence, Engine<Script>, Script) {
    let store = fx.store.clone();
    let clock = clock();
    let fence = lease(&store, shard, &clock).await;
    let e = engine(store.clone(), &clock, steps);
    (store, clock, fence, e, Script::default())
}

/// Starts the new saga `id`.
async fn started(e: &Engine<Script>, sc: &Script, f: Fence, id: &str, v: Value) -> SagaRecord {
    e.start(sc, f, id, v, None, None)
        .await
        .unwrap()
        .expect("a new saga")
}

/// Starts the new saga `id` and runs it, with no inbox, until it finishes or parks.
async fn run_new(e: &Engine<Script>, sc: &Script, f: Fence, id: &str, v: Value) -> SagaRecord {
    let s = started(e, sc, f, id, v).await;
    e.run_started(sc, f, s, &NoInbox).await.unwrap()
}

/// Starts the new saga `id` (no input) with a deadline and a timer.
async fn started_with(
    e: &Engine<Script>,
    script: &Script,
    fence: Fence,
    id: &str,
    deadline: Option<DateTime<Utc>>,
    wake_at: Option<DateTime<Utc>>,
) -> SagaRecord {
    let s = e.start(script, fence, id, json!({}), deadline, wake_at);
    s.await.unwrap().expect("a new saga")
}

/// The one saga of `shard` due at `at`.
async fn the_one_due(store: &Arc<dyn Store>, shard: i32, at: DateTime<Utc>) -> SagaRecord {
    let due = store.due(shard, at, 10).await.unwrap();
    assert_eq!(due.len(), 1);
    due.into_iter().next().unwrap()
}

/// `n` transient failures.
fn transient(n: usize, reason: &str) -> Vec<Result<Value, StepError>> {
    (0..n).map(|_| Err(StepError::transient(reason))).collect()
}

/// Checks `done` up to 500 times, `every` apart, until it holds.
async fn poll<F, Fut>(every: Duration, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    for _ in 0..500 {
        if done().await {
            break;
        }
        tokio::time::sleep(every).await;
    }
}

/// A relay of the fence's shard, polling every 20 ms, lingering 5 ms after a wake.
fn spawn_relay(
    store: &Arc<dyn Store>,
    fence: Fence,
    publisher: Arc<dyn saga::outbox::Publisher>,
    wake: Arc<Notify>,
) -> JoinHandle<JournalError> {
    let pace = saga::outbox::Pace {
        poll: Duration::from_millis(20),
        linger: Duration::from_millis(5),
    };
    tokio::spawn(saga::outbox::relay(
        store.clone(),
        fence,
        publisher,
        wake,
        pace,
    ))
}

/// The relay stops soon, refused.
async fn stops_refused(relay: JoinHandle<JournalError>) {
    let refusal = tokio::time::timeout(Duration::from_secs(10), relay)
        .await
        .expect("the relay stops")
        .unwrap();
    assert!(matches!(refusal, JournalError::Refused(_)), "{refusal:?}");
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
        .map(|r| {
            r.message.payload.value()["change"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

/// What a saga of steps "a", "b" and "c" announces as it runs through.
const RAN_ABC: [&str; 4] = [
    "Started",
    "StepSucceeded { step: \"a\" }",
    "StepSucceeded { step: \"b\" }",
    "Completed",
];

fn ms(t: Option<DateTime<Utc>>) -> Option<i64> {
    t.map(|t| t.timestamp_millis())
}

/// The attempts of the saga's step: (number, outcome).
async fn attempts_of(store: &Arc<dyn Store>, id: &str, step: &str) -> Vec<(i32, String)> {
    store
        .attempts(id)
        .await
        .unwrap()
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

async fn happy_path_journals_every_step(fx: Fixture) {
    let (store, clock, fence, e, script) = setup(&fx, 3, &["a", "b", "c"]).await;
    let s = started(&e, &script, fence, "s1", json!({"x": 1})).await;
    assert_eq!((s.shard, s.version), (3, 1));
    let done = e.run_started(&script, fence, s, &NoInbox).await.unwrap();
    assert_eq!(done.state, saga::COMPLETED);
    assert_eq!(
        done.outputs["c"]["seen"], 2,
        "later steps see earlier outputs"
    );
    let row = load(&store, "s1").await;
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
    assert_eq!(changes(&store, fence).await, RAN_ABC);
    let versions: Vec<i64> = store
        .outbox(fence, 100)
        .await
        .unwrap()
        .iter()
        .map(|r| r.message.payload.value()["version"].as_i64().unwrap())
        .collect();
    assert_eq!(versions, vec![1, 2, 3, 4], "each event carries its version");
    assert!(clock.sleeps().is_empty());
}

async fn transient_failures_are_retried_on_virtual_time(fx: Fixture) {
    let (store, clock, fence, e, script) = setup(&fx, 0, &["a", "b"]).await;
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
    let done = run_new(&e, &script, fence, "s2", json!({})).await;
    assert_eq!(done.state, saga::COMPLETED);
    assert_eq!(script.calls("b"), 3);
    assert_eq!(
        clock.sleeps(),
        vec![Duration::from_millis(100), Duration::from_secs(5)],
        "backoff, then Retry-After honoured"
    );
    assert!(real.elapsed() < Duration::from_secs(3), "no real sleeping");
    assert_eq!(
        attempts_of(&store, "s2", "b").await,
        outcomes(&[(1, "transient"), (2, "transient"), (3, "succeeded")])
    );
    assert_eq!(load(&store, "s2").await.wake_at, None);
}

async fn permanent_failure_stops_and_announces(fx: Fixture) {
    let (store, _clock, fence, e, script) = setup(&fx, 0, &["a", "b", "c"]).await;
    script.will("b", vec![Err(StepError::permanent("account suspended"))]);
    let done = run_new(&e, &script, fence, "s3", json!({})).await;
    assert_eq!(done.state, saga::FAILED);
    assert_eq!(done.error.as_deref(), Some("b: account suspended"));
    assert_eq!(script.calls("c"), 0);
    assert_eq!(script.calls("b"), 1, "no retries for permanent failures");
    let last = changes(&store, fence).await.pop().unwrap();
    assert!(last.starts_with("Failed { step: \"b\""), "{last}");
    let row = load(&store, "s3").await;
    assert_eq!(
        (row.state.as_str(), row.error.as_deref()),
        ("failed", Some("b: account suspended"))
    );
    assert_eq!(
        attempts_of(&store, "s3", "b").await,
        outcomes(&[(1, "permanent")])
    );
}

async fn retries_stop_at_the_attempt_limit_and_the_deadline(fx: Fixture) {
    let (_store, clock, fence, e, script) = setup(&fx, 0, &["a"]).await;
    script.will("a", transient(10, "down"));
    let done = run_new(&e, &script, fence, "limit", json!({})).await;
    assert_eq!(done.state, saga::FAILED);
    assert_eq!(script.calls("a"), 4, "max_attempts");
    assert!(done.error.unwrap().contains("gave up after 4 attempts"));

    // A deadline 250 ms of virtual time away stops retries before it.
    let script = Script::default();
    script.will("a", transient(10, "no drone free"));
    let deadline = clock.now() + chrono::Duration::milliseconds(250);
    let s = started_with(&e, &script, fence, "deadline", Some(deadline), None).await;
    let done = e.run_started(&script, fence, s, &NoInbox).await.unwrap();
    assert_eq!(done.state, saga::FAILED);
    assert_eq!(
        script.calls("a"),
        2,
        "attempt at 0 ms and 100 ms; the next (300 ms) would pass the deadline"
    );
    // A saga whose deadline already passed fails without calling anything.
    let script = Script::default();
    let s = started_with(&e, &script, fence, "late", Some(clock.now()), None).await;
    let done = e.run_started(&script, fence, s, &NoInbox).await.unwrap();
    assert_eq!(done.state, saga::FAILED);
    assert_eq!(script.calls("a"), 0);
}

async fn an_interrupted_saga_resumes_without_repeating_done_steps(fx: Fixture) {
    let store = fx.store.clone();
    let clock = clock();
    let script = Arc::new(Script::default());
    // First process: step "hang" never returns; the task is killed while in it.
    let first_fence = lease(&store, 7, &clock).await;
    let first = Arc::new(engine(store.clone(), &clock, &["a", "hang"]));
    let s = started(&first, &script, first_fence, "r1", json!({"n": 1})).await;
    let (e2, sc2) = (first.clone(), script.clone());
    let task = tokio::spawn(async move { e2.run_started(&sc2, first_fence, s, &NoInbox).await });
    poll(Duration::from_millis(10), || async {
        script.calls("hang") == 1
    })
    .await;
    assert_eq!(script.calls("hang"), 1);
    task.abort();

    // Second process, once the first one's lease has expired: the same saga type, whose second
    // step now works.
    let store2 = fx.reopen();
    let at = clock.now() + chrono::Duration::hours(1);
    let fence = acquire(&store2, 7, "second", at).await;
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

async fn starting_twice_is_a_no_op(fx: Fixture) {
    let (store, _clock, fence, e, script) = setup(&fx, 0, &["a"]).await;
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
    let row = load(&store, "dup").await;
    assert_eq!((row.input, row.version), (json!({"v": 1}), 1));
    assert_eq!(
        changes(&store, fence).await,
        vec!["Started"],
        "announced once"
    );
}

async fn a_cancel_signal_stops_before_the_next_step(fx: Fixture) {
    let (store, clock, fence, e, script) = setup(&fx, 0, &["a", "b"]).await;

    // Waiting in the inbox before the first step.
    let s = started(&e, &script, fence, "c1", json!({})).await;
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
    let row = load(&store, "c1").await;
    assert_eq!(row.state, saga::CANCELLED);
    assert!(row.signals.is_empty(), "applied, so not kept");

    // Arriving while the first step runs: the second does not start.
    let script = Script::default();
    script
        .arrive
        .lock()
        .unwrap()
        .insert("a", cancel("changed my mind", clock.now()));
    let s = started(&e, &script, fence, "c2", json!({})).await;
    let done = e
        .run_started(&script, fence, s, &script.inbox)
        .await
        .unwrap();
    assert_eq!(done.state, saga::CANCELLED);
    assert_eq!((script.calls("a"), script.calls("b")), (1, 0));
    assert!(done.outputs.contains_key("a"));

    // Recorded in the journal for a saga no task runs (parked): it is due at once and applies it.
    let script = Script::default();
    let wake = clock.now() + chrono::Duration::hours(1);
    let mut s = started_with(&e, &script, fence, "c3", None, Some(wake)).await;
    assert!(store.due(0, clock.now(), 10).await.unwrap().is_empty());
    e.signal(fence, &mut s, vec![cancel("by phone", clock.now())])
        .await
        .unwrap();
    let due = the_one_due(&store, 0, clock.now()).await;
    assert_eq!(due.signals.len(), 1, "the signal waits in the journal");
    let done = e.run(&script, fence, due, &NoInbox).await.unwrap();
    assert_eq!(done.state, saga::CANCELLED);
    assert_eq!(script.calls("a"), 0);
    let row = load(&store, "c3").await;
    assert_eq!(
        (row.state.as_str(), row.wake_at, row.signals.len()),
        ("cancelled", None, 0)
    );
}

async fn many_sagas_share_commits(fx: Fixture) {
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
                let id = format!("m{i}");
                let done = run_new(&e, &script, fence, &id, json!({"i": i})).await;
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

async fn outbox_relay_publishes_in_order_and_retries(fx: Fixture) {
    let (store, clock, fence, e, script) = setup(&fx, 0, &["a", "b"]).await;
    let other = lease(&store, 1, &clock).await;
    run_new(&e, &script, fence, "o1", json!({})).await;
    // Another shard's rows are not this relay's.
    started(&e, &script, other, "o2", json!({})).await;
    let publisher = Arc::new(Collect {
        got: Mutex::new(Vec::new()),
        fail_first: AtomicU32::new(1),
    });
    let relay = spawn_relay(&store, fence, publisher.clone(), e.outbox_written());
    poll(Duration::from_millis(20), || async {
        publisher.got.lock().unwrap().len() == 3 && store.outbox_backlog().await.unwrap() == 1
    })
    .await;
    relay.abort();
    let got = publisher.got.lock().unwrap().clone();
    let versions: Vec<(String, i64)> = got
        .iter()
        .map(|m| {
            (
                m.key.clone(),
                m.payload.value()["version"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        versions,
        vec![("o1".into(), 1), ("o1".into(), 2), ("o1".into(), 3)],
        "in commit order, each once after the failed try"
    );
    assert!(store.outbox(fence, 10).await.unwrap().is_empty());
    assert_eq!(changes(&store, other).await, vec!["Started"]);
}

async fn a_long_retry_delay_parks_the_saga(fx: Fixture) {
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
    script.will("b", transient(4, "no drone free"));

    // Delays 100 ms and 200 ms are slept in place; 400 ms parks. (Back-off delays are exact to
    // the millisecond, and timers are kept to the millisecond.)
    let parked = run_new(&e, &script, fence, "p1", json!({})).await;
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
    let row = load(&store, "p1").await;
    assert_eq!(ms(row.wake_at), ms(Some(wake)), "the timer is durable");
    assert_eq!(row.version, parked.version);
    assert!(
        store.orphans("test", 2).await.unwrap().is_empty(),
        "a parked saga is no orphan"
    );
    let before = wake - chrono::Duration::milliseconds(1);
    assert!(store.due(2, before, 10).await.unwrap().is_empty());
    let due = the_one_due(&store, 2, wake).await;
    assert_eq!(due, row);

    // At its time it runs on: attempt 4, and the back-off goes on from 400 ms to 800 ms.
    clock.advance((wake - clock.now()).to_std().unwrap());
    let parked = e.run(&script, fence, due, &NoInbox).await.unwrap();
    assert_eq!(parked.state, saga::RUNNING);
    assert_eq!(
        ms(parked.wake_at),
        ms(Some(clock.now() + chrono::Duration::milliseconds(800)))
    );
    assert_eq!(clock.sleeps().len(), 2, "parked again, not slept");
    assert_eq!(
        attempts_of(&store, "p1", "b").await,
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
    let due = the_one_due(&store, 2, clock.now()).await;
    let done = e.run(&script, fence, due, &NoInbox).await.unwrap();
    assert_eq!(done.state, saga::COMPLETED);
    assert_eq!(script.calls("b"), 5);
    assert_eq!(
        attempts_of(&store, "p1", "b").await.last(),
        Some(&(5, "succeeded".to_owned()))
    );
    let row = load(&store, "p1").await;
    assert_eq!((row.state.as_str(), row.wake_at), ("completed", None));
    assert!(store.due(2, clock.now(), 10).await.unwrap().is_empty());
}

/// A step whose service's breaker is open is deferred: the saga parks at once (even for a wait
/// shorter than `park_after`, and with the engine set never to park), holding no slot, and the
/// deferral spends none of the step's attempts: the try after it has them all again.
async fn a_deferred_step_parks_at_once_and_spends_no_attempt(fx: Fixture) {
    let (store, clock, fence, e, script) = setup(&fx, 0, &["a", "b"]).await;
    let deferred = || {
        Err(StepError::Deferred {
            reason: "package circuit breaker is open".into(),
            wait: Duration::from_millis(200),
        })
    };
    // Three transient failures (of four attempts), a deferral, then four more attempts.
    let mut outcomes_b = transient(3, "503");
    outcomes_b.push(deferred());
    outcomes_b.extend(transient(3, "503"));
    script.will("b", outcomes_b);
    let parked = run_new(&e, &script, fence, "d1", json!({})).await;
    assert_eq!(parked.state, saga::RUNNING);
    assert_eq!(
        ms(parked.wake_at),
        ms(Some(clock.now() + chrono::Duration::milliseconds(200))),
        "parked for the breaker's wait"
    );
    assert_eq!(script.calls("b"), 4);
    let row = load(&store, "d1").await;
    assert_eq!(ms(row.wake_at), ms(parked.wake_at), "the timer is durable");

    clock.advance(Duration::from_millis(200));
    let due = the_one_due(&store, 0, clock.now()).await;
    let done = e.run(&script, fence, due, &NoInbox).await.unwrap();
    assert_eq!(done.state, saga::COMPLETED, "{:?}", done.error);
    assert_eq!(
        script.calls("b"),
        8,
        "4 attempts, the deferral, 3 more + success"
    );
    assert_eq!(
        attempts_of(&store, "d1", "b").await,
        outcomes(&[
            (1, "transient"),
            (2, "transient"),
            (3, "transient"),
            (4, saga::DEFERRED),
            (5, "transient"),
            (6, "transient"),
            (7, "transient"),
            (8, "succeeded"),
        ])
    );

    // A deferral past the deadline fails the saga at once instead of parking.
    let script = Script::default();
    script.will(
        "a",
        vec![Err(StepError::Deferred {
            reason: "account circuit breaker is open".into(),
            wait: Duration::from_secs(60),
        })],
    );
    let deadline = clock.now() + chrono::Duration::seconds(30);
    let s = started_with(&e, &script, fence, "d2", Some(deadline), None).await;
    let done = e.run_started(&script, fence, s, &NoInbox).await.unwrap();
    assert_eq!(done.state, saga::FAILED);
    assert!(
        done.error
            .as_deref()
            .unwrap_or("")
            .contains("deadline passes"),
        "{:?}",
        done.error
    );
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

async fn a_rewind_signal_runs_a_completed_saga_again(fx: Fixture) {
    let (store, clock, fence, e, script) = setup(&fx, 0, &["a", "b", "c"]).await;
    let mut done = run_new(&e, &script, fence, "w1", json!({"v": 1})).await;
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
    let due = the_one_due(&store, 0, clock.now()).await;
    let again = e.run(&script, fence, due, &NoInbox).await.unwrap();
    assert_eq!(again.state, saga::COMPLETED);
    assert_eq!(
        (script.calls("a"), script.calls("b"), script.calls("c")),
        (1, 2, 2),
        "from the rewound step on"
    );
    assert_eq!(again.outputs["a"]["input"], json!({"v": 1}));
    assert_eq!(again.outputs["b"]["input"], json!({"v": 2}));
    assert_eq!(again.outputs["c"]["input"], json!({"v": 2}));
    let row = load(&store, "w1").await;
    assert_eq!(row.input, json!({"v": 2}));
    assert_eq!(row.deadline, Some(deadline));
    assert_eq!((row.next_step, row.wake_at), (3, None));
    assert!(row.signals.is_empty());
    assert_eq!(row.version, again.version);
    assert_eq!(
        changes(&store, fence).await,
        [
            &RAN_ABC[..],
            &[
                "Rewound { detail: \"rescheduled\" }",
                "StepSucceeded { step: \"b\" }",
                "Completed",
            ]
        ]
        .concat()
    );
    assert_eq!(
        attempts_of(&store, "w1", "b").await,
        outcomes(&[(1, "succeeded"), (2, "succeeded")]),
        "the rewound step's attempts continue their numbers"
    );
    assert_eq!(
        attempts_of(&store, "w1", "a").await,
        outcomes(&[(1, "succeeded")])
    );
}

/// A step that needed all its attempts the first time gets them again after a rewind.
async fn a_rewound_step_gets_its_retries_again(fx: Fixture) {
    let (store, clock, fence, e, script) = setup(&fx, 0, &["a", "b"]).await;
    script.will("b", transient(3, "busy"));
    let done = run_new(&e, &script, fence, "w2", json!({"v": 1})).await;
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
        attempts_of(&store, "w2", "b").await,
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

async fn a_run_whose_shard_was_taken_is_refused_and_writes_nothing_more(fx: Fixture) {
    let (store, clock, fence, e, script) = setup(&fx, 5, &["takeover", "b"]).await;
    // While the first step runs, the lease expires and another replica takes the shard.
    *script.takeover.lock().unwrap() =
        Some((store.clone(), clock.now() + chrono::Duration::hours(1)));
    let s = started(&e, &script, fence, "t1", json!({})).await;
    let r = e.run_started(&script, fence, s, &NoInbox).await;
    assert!(matches!(r, Err(JournalError::Refused(_))), "{r:?}");
    assert_eq!(script.calls("b"), 0, "the stale run stopped");
    *script.takeover.lock().unwrap() = None;

    let now = current(&store, 5).await;
    assert!(now.epoch > fence.epoch);
    let row = load(&store, "t1").await;
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
    assert_eq!(load(&store, "t1").await, row);
    assert_eq!(store.outbox_backlog().await.unwrap(), 1);

    // The new owner carries on.
    let done = e.run(&script, now, row, &NoInbox).await.unwrap();
    assert_eq!(done.state, saga::COMPLETED);
}

async fn a_final_write_refused_by_a_fence_is_never_told_as_durable(fx: Fixture) {
    let (store, clock, fence, e, script) = setup(&fx, 6, &["a", "takeover"]).await;
    // The last step's success would complete the saga, but the shard changed hands meanwhile.
    *script.takeover.lock().unwrap() =
        Some((store.clone(), clock.now() + chrono::Duration::hours(1)));
    let s = started(&e, &script, fence, "f1", json!({})).await;
    let r = e.run_started(&script, fence, s, &NoInbox).await;
    assert!(matches!(r, Err(JournalError::Refused(_))), "{r:?}");
    assert_eq!(
        *script.committed.lock().unwrap(),
        ["f1 StepSucceeded v2"],
        "the refused completion is not told"
    );
    *script.takeover.lock().unwrap() = None;

    // The new owner's completion is, once.
    let now = current(&store, 6).await;
    let row = load(&store, "f1").await;
    let done = e.run(&script, now, row, &NoInbox).await.unwrap();
    assert_eq!(done.state, saga::COMPLETED);
    assert_eq!(
        *script.committed.lock().unwrap(),
        ["f1 StepSucceeded v2", "f1 Completed v3"]
    );
}

/// (step, outcome) of every attempt of the saga, in order.
async fn all_attempts(store: &Arc<dyn Store>, id: &str) -> Vec<(String, String)> {
    store
        .attempts(id)
        .await
        .unwrap()
        .iter()
        .map(|a| (a.step.clone(), a.outcome.clone()))
        .collect()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect()
}

async fn a_waiting_success_is_written_with_the_next_step(fx: Fixture) {
    let (store, _clock, fence, e, script) =
        setup(&fx, 7, &["read-1", "b", "read-2", "c", "read-3"]).await;
    let done = run_new(&e, &script, fence, "e1", json!({})).await;
    assert_eq!(done.state, saga::COMPLETED);
    let row = load(&store, "e1").await;
    // Started, b (with read-1), c (with read-2), read-3 (the last step always writes).
    assert_eq!((row.version, row.next_step), (4, 5));
    assert_eq!(row.outputs, done.outputs);
    assert_eq!(row.outputs.len(), 5, "every step's output is kept");
    assert_eq!(
        all_attempts(&store, "e1").await,
        pairs(&[
            ("read-1", "succeeded"),
            ("b", "succeeded"),
            ("read-2", "succeeded"),
            ("c", "succeeded"),
            ("read-3", "succeeded"),
        ])
    );
    assert_eq!(
        changes(&store, fence).await,
        [
            "Started",
            "StepSucceeded { step: \"b\" }",
            "StepSucceeded { step: \"c\" }",
            "Completed"
        ]
    );
}

async fn a_waiting_success_is_written_before_a_failure_or_a_wait(fx: Fixture) {
    let (store, clock, fence, e, script) = setup(&fx, 8, &["read", "b", "c"]).await;
    script.will("b", vec![Err(StepError::permanent("refused"))]);
    let done = run_new(&e, &script, fence, "e2", json!({})).await;
    assert_eq!(done.state, saga::FAILED);
    let row = load(&store, "e2").await;
    assert_eq!(
        (
            row.state.as_str(),
            row.next_step,
            row.outputs.contains_key("read")
        ),
        ("failed", 1, true),
        "the read's success is on record before the failure"
    );
    assert_eq!(
        all_attempts(&store, "e2").await,
        pairs(&[("read", "succeeded"), ("b", "permanent")])
    );

    // A retry that parks: the read is on record, so the timer resumes at b.
    script.will(
        "c",
        vec![Err(StepError::Transient {
            reason: "busy".into(),
            retry_after: Some(Duration::from_secs(5)),
        })],
    );
    let parks = EngineSettings {
        park_after: Duration::from_millis(300),
    };
    let e = engine_with(store.clone(), &clock, &["read", "c"], policy(), parks);
    let parked = run_new(&e, &script, fence, "e3", json!({})).await;
    assert_eq!(parked.state, saga::RUNNING);
    let row = load(&store, "e3").await;
    assert_eq!((row.next_step, row.outputs.contains_key("read")), (1, true));
    assert!(row.wake_at.is_some(), "parked");
    let reads = script.calls("read");
    let resumed = e.run(&script, fence, row, &NoInbox).await.unwrap();
    assert_eq!(resumed.state, saga::COMPLETED);
    assert_eq!(
        script.calls("read"),
        reads,
        "not run again after the wake-up"
    );
}

async fn a_waiting_success_lost_with_its_run_is_run_again(fx: Fixture) {
    let (store, clock, fence, e, script) = setup(&fx, 9, &["read", "takeover", "c"]).await;
    *script.takeover.lock().unwrap() =
        Some((store.clone(), clock.now() + chrono::Duration::hours(1)));
    let s = started(&e, &script, fence, "e4", json!({})).await;
    let r = e.run_started(&script, fence, s, &NoInbox).await;
    assert!(matches!(r, Err(JournalError::Refused(_))), "{r:?}");
    *script.takeover.lock().unwrap() = None;
    let row = load(&store, "e4").await;
    assert_eq!(
        (row.version, row.next_step),
        (1, 0),
        "nothing of the run stands"
    );
    assert!(store.attempts("e4").await.unwrap().is_empty());

    let now = current(&store, 9).await;
    let done = e.run(&script, now, row, &NoInbox).await.unwrap();
    assert_eq!(done.state, saga::COMPLETED);
    assert_eq!(script.calls("read"), 2, "the new owner runs the read again");
}

/// Publishes nothing on its first call until released, so a test can act while the relay holds a
/// batch it has read.
#[derive(Default)]
struct Gate {
    got: Mutex<Vec<OutboxMessage>>,
    calls: AtomicU32,
    called: Notify,
    release: Notify,
}

impl Gate {
    /// Waits until the relay calls the publisher.
    async fn publishing(&self) {
        tokio::time::timeout(Duration::from_secs(10), self.called.notified())
            .await
            .expect("the relay publishes");
    }
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

async fn a_relay_whose_fence_went_stale_returns_the_refusal(fx: Fixture) {
    let store = fx.store.clone();
    let clock = clock();
    let later = || clock.now() + chrono::Duration::hours(1);

    // An idle relay: it notices at its next poll.
    let fence = lease(&store, 0, &clock).await;
    let relay = spawn_relay(&store, fence, Arc::new(Gate::default()), Arc::default());
    acquire(&store, 0, "other", later()).await;
    stops_refused(relay).await;

    // A relay that lost the shard while publishing: it deletes nothing, so the new owner
    // publishes the rows again (at least once).
    let fence = lease(&store, 1, &clock).await;
    let e = engine(store.clone(), &clock, &["a"]);
    run_new(&e, &Script::default(), fence, "x", json!({})).await;
    let publisher = Arc::new(Gate::default());
    let relay = spawn_relay(&store, fence, publisher.clone(), Arc::default());
    publisher.publishing().await;
    let new = acquire(&store, 1, "other", later()).await;
    publisher.release.notify_one();
    stops_refused(relay).await;
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
    let relay = spawn_relay(&store, fence, publisher.clone(), Arc::default());
    // The relay has read "early" (the only row it can see) and is publishing it.
    publisher.publishing().await;
    slow.commit().await.unwrap();
    publisher.release.notify_one();

    let names = || -> Vec<String> {
        publisher
            .got
            .lock()
            .unwrap()
            .iter()
            .map(|m| m.payload.value()["name"].as_str().unwrap().to_owned())
            .collect()
    };
    poll(Duration::from_millis(20), || async {
        names().len() == 2 && store.outbox_backlog().await.unwrap() == 0
    })
    .await;
    relay.abort();
    assert_eq!(
        names(),
        vec!["early".to_owned(), "late".to_owned()],
        "the row committed late is published, not deleted with the batch before it"
    );
    assert_eq!(store.outbox_backlog().await.unwrap(), 0);
}

/// Starts the new saga `id` (no input) with its leading checks run first.
async fn checked(e: &Engine<Script>, sc: &Script, f: Fence, id: &str) -> saga::Started {
    e.start_checked(sc, f, id, json!({}), None)
        .await
        .unwrap()
        .expect("a new saga")
}

async fn leading_checks_are_written_with_the_start(fx: Fixture) {
    let (store, _clock, fence, e, script) =
        setup(&fx, 10, &["check-1", "check-2", "b", "check-3"]).await;
    let started = checked(&e, &script, fence, "k1").await;
    assert_eq!(
        (
            script.calls("check-1"),
            script.calls("check-2"),
            script.calls("b")
        ),
        (1, 1, 0),
        "the leading checks ran before the start, nothing else"
    );
    let row = load(&store, "k1").await;
    assert_eq!((row.version, row.next_step), (1, 2), "one write: the start");
    assert_eq!(row.outputs.len(), 2, "both checks' outputs are in it");
    assert_eq!(row.outputs, started.record.outputs);
    assert_eq!(
        all_attempts(&store, "k1").await,
        pairs(&[("check-1", "succeeded"), ("check-2", "succeeded")])
    );

    let done = e
        .run_started(&script, fence, started, &NoInbox)
        .await
        .unwrap();
    assert_eq!(done.state, saga::COMPLETED);
    assert_eq!(
        (script.calls("check-1"), script.calls("check-3")),
        (1, 1),
        "the checks ran once; a check after an effect runs in its place"
    );
    let row = load(&store, "k1").await;
    // The start (with both checks), b, check-3 (the last step always writes).
    assert_eq!((row.version, row.next_step), (3, 4));
    assert_eq!(
        changes(&store, fence).await,
        ["Started", "StepSucceeded { step: \"b\" }", "Completed"]
    );

    // A replay of the start writes nothing, whatever the checks find.
    script.will("check-1", vec![Err(StepError::permanent("refused"))]);
    assert!(e
        .start_checked(&script, fence, "k1", json!({}), None)
        .await
        .unwrap()
        .is_none());
    assert_eq!(load(&store, "k1").await.version, 3);
}

async fn a_check_that_did_not_pass_before_the_start_is_the_steps_first_attempt(fx: Fixture) {
    let (store, clock, fence, e, script) = setup(&fx, 11, &["check", "b"]).await;
    script.will("check", vec![Err(StepError::transient("503 from account"))]);
    let started = checked(&e, &script, fence, "k2").await;
    let row = load(&store, "k2").await;
    assert_eq!((row.version, row.next_step), (1, 0));
    assert!(all_attempts(&store, "k2").await.is_empty());
    let done = e
        .run_started(&script, fence, started, &NoInbox)
        .await
        .unwrap();
    assert_eq!(done.state, saga::COMPLETED);
    assert_eq!(
        script.calls("check"),
        2,
        "the failed check is not repeated at once"
    );
    assert_eq!(
        clock.sleeps(),
        vec![Duration::from_millis(100)],
        "the policy's first delay"
    );
    assert_eq!(
        attempts_of(&store, "k2", "check").await,
        outcomes(&[(1, "transient"), (2, "succeeded")])
    );

    // Refused: the saga fails at the check, which ran once.
    script.will(
        "check",
        vec![Err(StepError::permanent("account suspended"))],
    );
    let started = checked(&e, &script, fence, "k3").await;
    let done = e
        .run_started(&script, fence, started, &NoInbox)
        .await
        .unwrap();
    assert_eq!(done.state, saga::FAILED);
    assert_eq!(done.error.as_deref(), Some("check: account suspended"));
    assert_eq!(script.calls("check"), 3);
    assert_eq!(script.calls("b"), 1, "only k2 reached b");
    assert_eq!(
        attempts_of(&store, "k3", "check").await,
        outcomes(&[(1, "permanent")])
    );

    // A signal before the run: the check's answer was about the saga as it was, so it runs again.
    script.will(
        "check",
        vec![Err(StepError::permanent("account suspended"))],
    );
    let started = checked(&e, &script, fence, "k4").await;
    script.inbox.send(
        "k4",
        Signal {
            kind: "reschedule".into(),
            payload: json!({"input": {"v": 2}, "to_step": 0}),
            at: clock.now(),
            position: None,
        },
    );
    let done = e
        .run_started(&script, fence, started, &script.inbox)
        .await
        .unwrap();
    assert_eq!(done.state, saga::COMPLETED);
    assert_eq!(script.calls("check"), 5);
}
