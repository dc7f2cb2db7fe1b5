//! The `Store` conformance suite: every test runs against `MemoryStore`, `SqlStore` on SQLite and
//! `SqlStore` on PostgreSQL (`DATABASE_URL`, a fresh database per test).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step should panic

#[macro_use]
mod common;

use std::sync::Arc;

use chrono::{DateTime, TimeZone, Utc};
use common::{load, Backend, Fixture};
use saga::store::{Change, OutboxRow, Write, Written};
use saga::{
    Attempt, Fence, InstanceUpdate, JournalError, Lease, ListFilter, OutboxMessage, Position,
    RawJson, SagaRecord, Signal, Store,
};
use sea_orm::{ConnectionTrait, DatabaseTransaction, DbBackend, Statement, TransactionTrait};
use serde_json::{json, Map};

per_backend!(
    acquire_takes_a_free_or_expired_lease_and_raises_the_epoch,
    renew_checkpoint_and_release_are_fenced,
    the_checkpoint_is_a_position,
    a_start_creates_once,
    a_start_with_a_stale_fence_is_refused,
    a_start_fenced_by_another_shard_is_refused,
    an_update_needs_the_fence_and_the_expected_version,
    an_update_with_a_stale_epoch_writes_nothing,
    an_update_fenced_by_another_shard_is_refused,
    an_update_of_a_missing_saga_is_refused,
    a_refused_write_does_not_fail_its_group,
    a_group_of_different_sagas_keeps_each_outcome_apart,
    a_replayed_start_and_the_next_step_of_its_saga_in_one_group,
    versions_never_go_backwards,
    attempts_come_in_order_and_are_kept_once,
    due_returns_the_timers_that_are_due_in_order,
    orphans_are_the_running_sagas_without_a_timer,
    signals_round_trip_through_a_write,
    the_outbox_is_per_shard_in_write_order_and_fenced,
    the_outbox_is_read_past_a_seq,
    outbox_done_is_fenced,
    list_filters_by_state_and_shard_with_a_limit,
);

async fn run<F, Fut>(backend: Backend, test: F)
where
    F: FnOnce(Arc<dyn Store>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let fixture = Fixture::new(backend).await;
    test(fixture.store.clone()).await;
}

// ---------------------------------------------------------------------------------------------
// Helpers. Times are whole milliseconds, which every backend keeps exactly.

fn t(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(1_800_000_000_000 + ms).unwrap()
}

fn ttl() -> chrono::Duration {
    chrono::Duration::seconds(10)
}

/// Long after any lease taken at `t(0..60_000)` has expired.
const LATER: i64 = 3_600_000;

async fn take(s: &Arc<dyn Store>, shard: i32, owner: &str, at: i64) -> Lease {
    s.acquire(shard, owner, t(at), ttl())
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("{owner} takes shard {shard}"))
}

/// Whether `owner` fails to take `shard` at `at` (someone else holds it).
async fn held(s: &Arc<dyn Store>, shard: i32, owner: &str, at: i64) -> bool {
    s.acquire(shard, owner, t(at), ttl())
        .await
        .unwrap()
        .is_none()
}

async fn renews(s: &Arc<dyn Store>, lease: &Lease, at: i64) -> bool {
    s.renew(lease, t(at), ttl()).await.unwrap()
}

fn pos(offset: u64, index: u32) -> Position {
    Position { offset, index }
}

fn record(id: &str, shard: i32, at: i64) -> SagaRecord {
    SagaRecord {
        id: id.to_owned(),
        kind: "k".to_owned(),
        shard,
        state: saga::RUNNING.to_owned(),
        input: json!({"id": id}),
        outputs: Map::new(),
        next_step: 0,
        version: 1,
        error: None,
        deadline: None,
        wake_at: None,
        signals: Vec::new(),
        created_at: t(at),
        updated_at: t(at),
    }
}

fn msg(key: &str, n: i64) -> OutboxMessage {
    OutboxMessage {
        destination: "events".to_owned(),
        key: key.to_owned(),
        payload: RawJson::encode(&json!({"n": n})).unwrap(),
    }
}

fn attempt(id: &str, step_index: i32, n: i32) -> Attempt {
    Attempt {
        saga_id: id.to_owned(),
        step_index,
        attempt: n,
        step: format!("step{step_index}"),
        outcome: "transient".to_owned(),
        error: Some(format!("try {n}")),
        started_at: t(i64::from(n) * 10),
        finished_at: t(i64::from(n) * 10 + 5),
    }
}

fn start(fence: Fence, r: SagaRecord, outbox: Vec<OutboxMessage>) -> Write {
    Write {
        fence,
        change: Change::Start(Arc::new(r)),
        attempts: Vec::new(),
        outbox,
    }
}

/// The start of a new saga `id` on `shard` (at `at`), announced by message `m`.
fn start_msg(fence: Fence, id: &str, shard: i32, at: i64, m: i64) -> Write {
    start(fence, record(id, shard, at), vec![msg(id, m)])
}

/// `w` journaling `a` as well.
fn with_attempt(mut w: Write, a: Attempt) -> Write {
    w.attempts.push(a);
    w
}

fn update(
    fence: Fence,
    id: &str,
    expected_version: i64,
    update: InstanceUpdate,
    at: i64,
    attempts: Vec<Attempt>,
    outbox: Vec<OutboxMessage>,
) -> Write {
    Write {
        fence,
        change: Change::Update {
            id: id.to_owned(),
            expected_version,
            update,
            at: t(at),
        },
        attempts,
        outbox,
    }
}

/// An update with neither attempts nor messages.
fn bare(fence: Fence, id: &str, expected_version: i64, change: InstanceUpdate, at: i64) -> Write {
    update(
        fence,
        id,
        expected_version,
        change,
        at,
        Vec::new(),
        Vec::new(),
    )
}

/// A plain step: the next step index, nothing else.
fn step(n: i32) -> InstanceUpdate {
    InstanceUpdate {
        next_step: Some(n),
        ..Default::default()
    }
}

/// A plain step of `id` from `version` to step `next`, journaling its attempt `(step_index, n)`
/// and announcing message `m`.
fn step_write(
    fence: Fence,
    id: &str,
    version: i64,
    next: i32,
    at: i64,
    (step_index, n): (i32, i32),
    m: i64,
) -> Write {
    let attempts = vec![attempt(id, step_index, n)];
    update(
        fence,
        id,
        version,
        step(next),
        at,
        attempts,
        vec![msg(id, m)],
    )
}

/// The timer alone: parks the saga until `at`.
fn park(at: i64) -> InstanceUpdate {
    InstanceUpdate {
        wake_at: Some(t(at)),
        ..Default::default()
    }
}

async fn created(s: &Arc<dyn Store>, fence: Fence, r: SagaRecord) {
    let id = r.id.clone();
    assert_eq!(
        s.write(start(fence, r, Vec::new())).await.unwrap(),
        Written::Created,
        "start {id}"
    );
}

async fn written(s: &Arc<dyn Store>, w: Write) -> Written {
    s.write(w).await.unwrap()
}

fn refused<T: std::fmt::Debug>(r: Result<T, JournalError>) {
    assert!(matches!(r, Err(JournalError::Refused(_))), "{r:?}");
}

async fn write_refused(s: &Arc<dyn Store>, w: Write) {
    refused(s.write(w).await);
}

/// Writes all of `writes` at once, so that they go in one group commit (the store's writer
/// cannot run before all of them are queued on this single-threaded runtime), and checks each
/// outcome.
async fn write_group(s: &Arc<dyn Store>, writes: Vec<(Write, Outcome)>) {
    let (writes, expect): (Vec<_>, Vec<_>) = writes.into_iter().unzip();
    let results = futures::future::join_all(writes.into_iter().map(|w| s.write(w))).await;
    assert_eq!(results.len(), expect.len());
    for (i, (got, want)) in results.iter().zip(&expect).enumerate() {
        match want {
            Ok(w) => assert_eq!(got.as_ref().ok(), Some(w), "write {i}: {got:?}"),
            Err(why) => assert!(
                matches!(got, Err(JournalError::Refused(r)) if r.contains(why)),
                "write {i}: {got:?}, expected a refusal saying {why:?}"
            ),
        }
    }
}

/// Shard 1 leased (`f`), shard 2 leased and taken over (`old2`, then `f2`), and `n` sagas `g0`,
/// `g1`... on shard 1.
async fn group_fixture(s: &Arc<dyn Store>, n: i64) -> (Fence, Fence, Fence) {
    let f = take(s, 1, "a", 0).await.fence();
    let old2 = take(s, 2, "a", 0).await.fence();
    let f2 = take(s, 2, "b", LATER).await.fence();
    for i in 0..n {
        created(s, f, record(&format!("g{i}"), 1, i)).await;
    }
    (f, old2, f2)
}

/// The first plain step of each of the `n` sagas `g0`, `g1`..., announcing its number: each lands.
fn first_steps(f: Fence, n: i64) -> Vec<(Write, Outcome)> {
    let first = |i| step_write(f, &format!("g{i}"), 1, 1, 1_000, (0, 1), i);
    (0..n).map(|i| (first(i), UPDATED)).collect()
}

/// What a write of a group comes to: `Ok(written)`, or `Err(why)` for a refusal saying `why`.
type Outcome = Result<Written, &'static str>;
const CREATED: Outcome = Ok(Written::Created);
const EXISTED: Outcome = Ok(Written::Existed);
const UPDATED: Outcome = Ok(Written::Updated);
/// Any refusal, whatever its reason.
const REFUSED: Outcome = Err("");

async fn missing(s: &Arc<dyn Store>, id: &str) -> bool {
    s.load(id).await.unwrap().is_none()
}

async fn version_and_step(s: &Arc<dyn Store>, id: &str) -> (i64, usize) {
    let r = load(s, id).await;
    (r.version, r.next_step)
}

async fn attempts(s: &Arc<dyn Store>, id: &str) -> Vec<Attempt> {
    s.attempts(id).await.unwrap()
}

async fn backlog(s: &Arc<dyn Store>) -> u64 {
    s.outbox_backlog().await.unwrap()
}

/// The `n` of the messages in the fence's outbox, at most `limit`.
async fn sent(s: &Arc<dyn Store>, fence: Fence, limit: usize) -> Vec<i64> {
    ns(&s.outbox(fence, limit).await.unwrap())
}

fn ns(rows: &[OutboxRow]) -> Vec<i64> {
    rows.iter()
        .map(|r| r.message.payload.value()["n"].as_i64().unwrap())
        .collect()
}

async fn due_ids(s: &Arc<dyn Store>, shard: i32, at: i64, limit: usize) -> Vec<String> {
    let due = s.due(shard, t(at), limit).await.unwrap();
    due.into_iter().map(|r| r.id).collect()
}

async fn orphan_ids(s: &Arc<dyn Store>, kind: &str, shard: i32) -> Vec<String> {
    let orphans = s.orphans(kind, shard).await.unwrap();
    orphans.into_iter().map(|r| r.id).collect()
}

// ---------------------------------------------------------------------------------------------
// Leases.

async fn acquire_takes_a_free_or_expired_lease_and_raises_the_epoch(s: Arc<dyn Store>) {
    let a = take(&s, 1, "a", 0).await;
    assert_eq!(a.shard, 1);
    assert_eq!(
        a.checkpoint,
        Position::default(),
        "a new shard starts at the beginning"
    );
    assert!(held(&s, 1, "b", 5_000).await, "held by a");
    assert!(
        held(&s, 1, "b", 10_000).await,
        "still held at the instant it expires"
    );

    // The same owner re-acquires, with a new epoch: its old fence no longer holds.
    let a2 = take(&s, 1, "a", 5_000).await;
    assert!(a2.epoch > a.epoch, "{a2:?} after {a:?}");
    assert!(!renews(&s, &a, 5_000).await);
    assert!(renews(&s, &a2, 5_000).await);

    // Expired (a2 ran until 15 s): another owner takes it.
    let b = take(&s, 1, "b", 15_001).await;
    assert!(b.epoch > a2.epoch);
    assert!(!renews(&s, &a2, 15_001).await);

    // Another shard is a lease of its own.
    let other = take(&s, 2, "a", 15_001).await;
    assert_eq!(other.shard, 2);

    let leases = s.leases().await.unwrap();
    assert_eq!(
        leases
            .iter()
            .map(|l| (l.shard, l.owner.as_str(), l.epoch, l.expires_at))
            .collect::<Vec<_>>(),
        vec![
            (1, "b", b.epoch, t(25_001)),
            (2, "a", other.epoch, t(25_001))
        ]
    );
}

async fn renew_checkpoint_and_release_are_fenced(s: Arc<dyn Store>) {
    let a = take(&s, 1, "a", 0).await;
    assert!(renews(&s, &a, 8_000).await);
    assert!(held(&s, 1, "b", 15_000).await, "renewed until 18 s");
    let at = pos(10, 2);
    assert!(s.checkpoint(&a, at).await.unwrap());

    let b = take(&s, 1, "b", 18_001).await;
    assert_eq!(b.checkpoint, at, "the new owner resumes at the checkpoint");
    // The stale owner can do nothing any more.
    assert!(!renews(&s, &a, 18_002).await);
    assert!(!s.checkpoint(&a, pos(99, 0)).await.unwrap());
    s.release(&a, t(18_002)).await.unwrap();
    assert!(
        held(&s, 1, "c", 18_003).await,
        "a stale release does not free b's lease"
    );
    let row = &s.leases().await.unwrap()[0];
    assert_eq!(
        (row.owner.as_str(), row.epoch, row.checkpoint),
        ("b", b.epoch, at)
    );

    // The holder's release frees it at once.
    s.release(&b, t(19_000)).await.unwrap();
    let c = take(&s, 1, "c", 19_000).await;
    assert!(c.epoch > b.epoch);
    assert!(!renews(&s, &b, 19_000).await);
}

async fn the_checkpoint_is_a_position(s: Arc<dyn Store>) {
    let a = take(&s, 4, "a", 0).await;
    // An offset past u32 and an index inside a batch both round-trip.
    let at = pos(5_000_000_000, 7);
    assert!(s.checkpoint(&a, at).await.unwrap());
    assert_eq!(s.leases().await.unwrap()[0].checkpoint, at);
    let again = take(&s, 4, "a", 1_000).await;
    assert_eq!(again.checkpoint, at);
    // Moving within the same offset keeps the offset.
    let next = pos(5_000_000_000, 8);
    assert!(s.checkpoint(&again, next).await.unwrap());
    let b = take(&s, 4, "b", LATER).await;
    assert_eq!(b.checkpoint, next);
    assert!(next > at, "positions order by offset, then index");
}

// ---------------------------------------------------------------------------------------------
// Starts.

async fn a_start_creates_once(s: Arc<dyn Store>) {
    let f = take(&s, 1, "a", 0).await.fence();
    let mut r = record("s1", 1, 0);
    r.deadline = Some(t(60_000));
    r.wake_at = Some(t(2_000));
    r.outputs.insert("pre".into(), json!(1));
    let first = start(f, r.clone(), vec![msg("s1", 1)]);
    assert_eq!(written(&s, first).await, Written::Created);
    assert_eq!(load(&s, "s1").await, r, "loads as written");

    // A replay: nothing of it is written, not even its announcement.
    let mut again = record("s1", 1, 1_000);
    again.input = json!({"other": true});
    let w = with_attempt(start(f, again, vec![msg("s1", 2)]), attempt("s1", 0, 1));
    assert_eq!(written(&s, w).await, Written::Existed);
    assert_eq!(load(&s, "s1").await, r);
    assert_eq!(sent(&s, f, 100).await, vec![1]);
    assert!(attempts(&s, "s1").await.is_empty());
    assert!(missing(&s, "nope").await);
}

async fn a_start_with_a_stale_fence_is_refused(s: Arc<dyn Store>) {
    let a = take(&s, 1, "a", 0).await;
    let b = take(&s, 1, "b", LATER).await;
    write_refused(&s, start_msg(a.fence(), "s1", 1, 0, 1)).await;
    assert!(missing(&s, "s1").await);
    assert!(sent(&s, b.fence(), 100).await.is_empty());
    // Nor with a fence no one ever held.
    let never = Fence { shard: 9, epoch: 1 };
    write_refused(&s, start_msg(never, "s2", 9, 0, 1)).await;
    assert!(missing(&s, "s2").await);
    assert_eq!(backlog(&s).await, 0);
    // A replay of an existing saga by the stale owner is refused too, not "existed".
    created(&s, b.fence(), record("s3", 1, 0)).await;
    write_refused(&s, start(a.fence(), record("s3", 1, 0), Vec::new())).await;
}

/// A lease on one shard gives no right to write sagas of another, even when the epochs match.
async fn a_start_fenced_by_another_shard_is_refused(s: Arc<dyn Store>) {
    let one = take(&s, 1, "a", 0).await.fence();
    let two = take(&s, 2, "b", 0).await.fence();
    assert_eq!(one.epoch, two.epoch, "the same epoch on both shards");
    write_refused(&s, start_msg(one, "x", 2, 0, 1)).await;
    assert!(missing(&s, "x").await);
    assert_eq!(backlog(&s).await, 0);
}

// ---------------------------------------------------------------------------------------------
// Updates.

async fn an_update_needs_the_fence_and_the_expected_version(s: Arc<dyn Store>) {
    let f = take(&s, 1, "a", 0).await.fence();
    let r = record("u1", 1, 0);
    created(&s, f, r.clone()).await;

    let signal = Signal {
        kind: "cancel".into(),
        payload: json!({"reason": "client"}),
        at: t(500),
        position: None,
    };
    let change = InstanceUpdate {
        state: Some(saga::COMPLETED.into()),
        input: Some(json!({"new": 1})),
        outputs: Some(RawJson::encode(&json!({"a": {"x": 1}})).unwrap()),
        next_step: Some(2),
        error: Some(Some("boom".into())),
        deadline: Some(Some(t(90_000))),
        signals: Some(vec![signal.clone()]),
        wake_at: Some(t(3_000)),
    };
    let (tried, sends) = (vec![attempt("u1", 0, 1)], vec![msg("u1", 1)]);
    let w = update(f, "u1", 1, change, 1_000, tried, sends);
    assert_eq!(written(&s, w).await, Written::Updated);
    let mut expected = r.clone();
    expected.state = saga::COMPLETED.into();
    expected.input = json!({"new": 1});
    expected.outputs = json!({"a": {"x": 1}}).as_object().unwrap().clone();
    expected.next_step = 2;
    expected.error = Some("boom".into());
    expected.deadline = Some(t(90_000));
    expected.signals = vec![signal];
    expected.wake_at = Some(t(3_000));
    expected.version = 2;
    expected.updated_at = t(1_000);
    assert_eq!(load(&s, "u1").await, expected);

    // Expecting a version the saga has left: refused, and nothing of the write lands.
    write_refused(&s, step_write(f, "u1", 1, 7, 2_000, (0, 2), 2)).await;
    // Nor one it has not reached.
    write_refused(&s, step_write(f, "u1", 3, 8, 2_000, (0, 3), 3)).await;
    assert_eq!(load(&s, "u1").await, expected);
    assert_eq!(attempts(&s, "u1").await, vec![attempt("u1", 0, 1)]);
    assert_eq!(sent(&s, f, 100).await, vec![1]);

    // Fields left out stay; the timer, the error and the deadline can be cleared.
    let clear = InstanceUpdate {
        error: Some(None),
        deadline: Some(None),
        ..Default::default()
    };
    assert_eq!(
        written(&s, bare(f, "u1", 2, clear, 3_000)).await,
        Written::Updated
    );
    expected.error = None;
    expected.deadline = None;
    expected.wake_at = None;
    expected.version = 3;
    expected.updated_at = t(3_000);
    assert_eq!(load(&s, "u1").await, expected);
}

async fn an_update_with_a_stale_epoch_writes_nothing(s: Arc<dyn Store>) {
    let a = take(&s, 1, "a", 0).await;
    created(&s, a.fence(), record("u1", 1, 0)).await;
    let b = take(&s, 1, "b", LATER).await;
    // The right version, but the shard has a new owner.
    write_refused(&s, step_write(a.fence(), "u1", 1, 1, 1_000, (0, 1), 1)).await;
    assert_eq!(version_and_step(&s, "u1").await, (1, 0));
    assert!(attempts(&s, "u1").await.is_empty());
    assert!(sent(&s, b.fence(), 100).await.is_empty());
    // Also after the same owner re-acquired: each acquisition is a new epoch.
    let b2 = take(&s, 1, "b", LATER + 1).await;
    write_refused(&s, bare(b.fence(), "u1", 1, step(1), 1_000)).await;
    // The current owner writes.
    let w = step_write(b2.fence(), "u1", 1, 1, 1_000, (0, 1), 1);
    assert_eq!(written(&s, w).await, Written::Updated);
    assert_eq!(load(&s, "u1").await.version, 2);
    assert_eq!(sent(&s, b2.fence(), 100).await, vec![1]);
}

async fn an_update_fenced_by_another_shard_is_refused(s: Arc<dyn Store>) {
    let one = take(&s, 1, "a", 0).await.fence();
    let two = take(&s, 2, "b", 0).await.fence();
    assert_eq!(one.epoch, two.epoch, "the same epoch on both shards");
    created(&s, two, record("x", 2, 0)).await;
    write_refused(&s, step_write(one, "x", 1, 1, 1_000, (0, 1), 1)).await;
    assert_eq!(version_and_step(&s, "x").await, (1, 0));
    assert!(attempts(&s, "x").await.is_empty());
    assert_eq!(backlog(&s).await, 0);
}

async fn an_update_of_a_missing_saga_is_refused(s: Arc<dyn Store>) {
    let f = take(&s, 1, "a", 0).await.fence();
    write_refused(&s, step_write(f, "ghost", 1, 1, 0, (0, 1), 1)).await;
    assert!(missing(&s, "ghost").await);
    assert!(attempts(&s, "ghost").await.is_empty());
    assert_eq!(backlog(&s).await, 0);
}

/// Many writes at once go in one group commit; the refused ones take only themselves out.
async fn a_refused_write_does_not_fail_its_group(s: Arc<dyn Store>) {
    let (f, old2, f2) = group_fixture(&s, 20).await;
    created(&s, f, record("r", 1, 0)).await;
    created(&s, f2, record("h", 2, 0)).await;

    let mut writes = first_steps(f, 20);
    let replay = start_msg(f, "g3", 1, 1_000, 107);
    writes.extend([
        // The same saga at the same version twice: the first lands, the second is refused.
        (step_write(f, "g0", 1, 5, 1_000, (0, 9), 100), REFUSED),
        // The next version of a saga updated earlier in the same group lands.
        (step_write(f, "g1", 2, 2, 1_001, (1, 1), 101), UPDATED),
        // A version the saga never had.
        (step_write(f, "g2", 5, 5, 1_000, (0, 9), 102), REFUSED),
        // A stale epoch.
        (step_write(old2, "h", 1, 1, 1_000, (0, 1), 103), REFUSED),
        (start_msg(old2, "h2", 2, 0, 104), REFUSED),
        // A missing saga.
        (step_write(f, "ghost", 1, 1, 1_000, (0, 1), 105), REFUSED),
        // A new saga, and a replay of an old one.
        (start_msg(f, "new", 1, 1_000, 106), CREATED),
        (with_attempt(replay, attempt("g3", 0, 9)), EXISTED),
        // A saga's replayed start and its own next step in the same group.
        (start_msg(f, "r", 1, 1_000, 110), EXISTED),
        (step_write(f, "r", 1, 1, 1_000, (0, 1), 109), UPDATED),
        // The current owner of shard 2, in the same group as the stale one.
        (step_write(f2, "h", 1, 1, 1_000, (0, 1), 108), UPDATED),
    ]);
    write_group(&s, writes).await;

    assert_eq!(version_and_step(&s, "g0").await, (2, 1));
    assert_eq!(version_and_step(&s, "g1").await, (3, 2));
    for i in 2..20 {
        assert_eq!(version_and_step(&s, &format!("g{i}")).await, (2, 1), "g{i}");
    }
    assert_eq!(load(&s, "h").await.version, 2);
    assert!(missing(&s, "h2").await);
    assert_eq!(load(&s, "new").await.version, 1);
    assert_eq!(
        attempts(&s, "g0").await,
        vec![attempt("g0", 0, 1)],
        "the refused write's attempt is absent"
    );
    assert_eq!(
        attempts(&s, "g1").await,
        vec![attempt("g1", 0, 1), attempt("g1", 1, 1)]
    );
    assert_eq!(attempts(&s, "g2").await, vec![attempt("g2", 0, 1)]);
    assert_eq!(
        attempts(&s, "g3").await,
        vec![attempt("g3", 0, 1)],
        "the replayed start's attempt is absent"
    );
    assert_eq!(load(&s, "r").await.version, 2);
    assert_eq!(attempts(&s, "r").await, vec![attempt("r", 0, 1)]);
    assert!(attempts(&s, "ghost").await.is_empty());
    // Shard 1's outbox: the accepted writes' messages, each saga's in the order it wrote them
    // (the writes of different sagas in one group are concurrent: no order between them).
    let got = sent(&s, f, 1_000).await;
    let mut want: Vec<i64> = (0..20).collect();
    want.extend([101, 106, 109]);
    let mut sorted = got.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, want, "{got:?}");
    let at = |n: i64| got.iter().position(|&m| m == n);
    assert!(at(1) < at(101), "g1's messages in its order: {got:?}");
    assert_eq!(sent(&s, f2, 1_000).await, vec![108]);
}

/// A group in which every write is to a different saga (PostgreSQL writes it as one statement):
/// each write lands or is refused on its own, with its attempts and messages.
async fn a_group_of_different_sagas_keeps_each_outcome_apart(s: Arc<dyn Store>) {
    let (f, old2, f2) = group_fixture(&s, 10).await;
    created(&s, f2, record("h", 2, 0)).await;
    created(&s, f2, record("k", 2, 0)).await;

    let mut writes = first_steps(f, 8);
    let stale = "no longer held at epoch";
    let replay = start_msg(f, "g9", 1, 1_000, 106);
    writes.extend([
        // A version the saga does not have.
        (
            step_write(f, "g8", 5, 5, 1_000, (0, 9), 100),
            Err("version"),
        ),
        // A stale epoch: an update and a start.
        (step_write(old2, "h", 1, 1, 1_000, (0, 1), 101), Err(stale)),
        (start_msg(old2, "h2", 2, 0, 102), Err(stale)),
        // A saga fenced by another shard's lease.
        (start_msg(f, "x", 2, 0, 103), Err("does not fence")),
        // A missing saga.
        (
            step_write(f, "ghost", 1, 1, 1_000, (0, 1), 104),
            Err("ghost"),
        ),
        // A new saga, and a replay of an old one (its attempt and message are dropped).
        (start_msg(f, "new", 1, 1_000, 105), CREATED),
        (with_attempt(replay, attempt("g9", 0, 9)), EXISTED),
        // The current owner of shard 2, in the same group as the stale one.
        (step_write(f2, "k", 1, 1, 1_000, (0, 1), 107), UPDATED),
    ]);
    write_group(&s, writes).await;

    for i in 0..8 {
        let id = format!("g{i}");
        assert_eq!(version_and_step(&s, &id).await, (2, 1), "{id}");
        assert_eq!(attempts(&s, &id).await, vec![attempt(&id, 0, 1)]);
    }
    for id in ["g8", "g9", "h"] {
        assert_eq!(load(&s, id).await.version, 1);
        assert!(attempts(&s, id).await.is_empty());
    }
    assert!(missing(&s, "h2").await);
    assert!(missing(&s, "x").await);
    assert!(attempts(&s, "ghost").await.is_empty());
    assert_eq!(load(&s, "new").await.version, 1);
    assert_eq!(load(&s, "k").await.version, 2);
    let mut want: Vec<i64> = (0..8).collect();
    want.push(105);
    assert_eq!(sent(&s, f, 1_000).await, want);
    assert_eq!(sent(&s, f2, 1_000).await, vec![107]);
}

/// After a restart, the log can replay a booking's start while its saga, resumed from the
/// journal, writes its next step: both in one group.
async fn a_replayed_start_and_the_next_step_of_its_saga_in_one_group(s: Arc<dyn Store>) {
    let f = take(&s, 1, "a", 0).await.fence();
    created(&s, f, record("r", 1, 0)).await;
    created(&s, f, record("o", 1, 0)).await;
    let writes = vec![
        (start_msg(f, "r", 1, 1_000, 1), EXISTED),
        (step_write(f, "r", 1, 1, 1_000, (0, 1), 2), UPDATED),
        (step_write(f, "o", 1, 1, 1_000, (0, 1), 3), UPDATED),
    ];
    write_group(&s, writes).await;
    assert_eq!(load(&s, "r").await.version, 2);
    assert_eq!(attempts(&s, "r").await, vec![attempt("r", 0, 1)]);
    assert_eq!(load(&s, "o").await.version, 2);
    // Concurrent writes of different sagas: no order between their messages.
    let mut got = sent(&s, f, 100).await;
    got.sort_unstable();
    assert_eq!(got, vec![2, 3]);
}

async fn versions_never_go_backwards(s: Arc<dyn Store>) {
    let f = take(&s, 1, "a", 0).await.fence();
    created(&s, f, record("v", 1, 0)).await;
    let mut seen = vec![load(&s, "v").await.version];
    for v in 1..=5 {
        written(&s, bare(f, "v", v, step(v as i32), v * 10)).await;
        seen.push(load(&s, "v").await.version);
        // Neither a replayed start nor an old version's write moves it back.
        let replay = start(f, record("v", 1, 0), Vec::new());
        assert_eq!(written(&s, replay).await, Written::Existed);
        for old in 1..=v {
            write_refused(&s, bare(f, "v", old, step(0), 0)).await;
        }
        seen.push(load(&s, "v").await.version);
    }
    assert_eq!(seen, vec![1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]);
    let r = load(&s, "v").await;
    assert_eq!((r.next_step, r.updated_at), (5, t(50)));
}

async fn attempts_come_in_order_and_are_kept_once(s: Arc<dyn Store>) {
    let f = take(&s, 1, "a", 0).await.fence();
    created(&s, f, record("a1", 1, 0)).await;
    created(&s, f, record("a2", 1, 0)).await;
    let tried = vec![
        attempt("a1", 1, 2),
        attempt("a1", 0, 1),
        attempt("a1", 1, 1),
    ];
    written(&s, update(f, "a1", 1, step(1), 1, tried, Vec::new())).await;
    // The same attempt journaled again (a replay after a crash) keeps the first record.
    let mut again = attempt("a1", 0, 1);
    again.outcome = "succeeded".into();
    again.error = None;
    let tried = vec![again, attempt("a1", 0, 2)];
    written(&s, update(f, "a1", 2, step(2), 2, tried, Vec::new())).await;
    let tried = vec![attempt("a2", 0, 1)];
    written(&s, update(f, "a2", 1, step(1), 3, tried, Vec::new())).await;
    assert_eq!(
        attempts(&s, "a1").await,
        vec![
            attempt("a1", 0, 1),
            attempt("a1", 0, 2),
            attempt("a1", 1, 1),
            attempt("a1", 1, 2)
        ]
    );
    assert_eq!(attempts(&s, "a2").await, vec![attempt("a2", 0, 1)]);
}

// ---------------------------------------------------------------------------------------------
// Reads.

async fn due_returns_the_timers_that_are_due_in_order(s: Arc<dyn Store>) {
    let f = take(&s, 1, "a", 0).await.fence();
    let f2 = take(&s, 2, "a", 0).await.fence();
    for (id, wake) in [
        ("d3", Some(3_000)),
        ("d1", Some(1_000)),
        ("e1", Some(1_000)),
        ("d2", Some(2_000)),
        ("none", None),
        ("d10", Some(10_000)),
    ] {
        let mut r = record(id, 1, 0);
        r.wake_at = wake.map(t);
        created(&s, f, r).await;
    }
    let mut other = record("x0", 2, 0);
    other.wake_at = Some(t(0));
    created(&s, f2, other).await;

    assert_eq!(
        due_ids(&s, 1, 3_000, 10).await,
        vec!["d1", "e1", "d2", "d3"],
        "due at now, earliest first, then by id"
    );
    assert_eq!(due_ids(&s, 1, 3_000, 2).await, vec!["d1", "e1"]);
    assert!(due_ids(&s, 1, 999, 10).await.is_empty());
    assert_eq!(due_ids(&s, 2, 3_000, 10).await, vec!["x0"]);

    // A write that does not park clears the timer; one that does moves it.
    written(&s, bare(f, "d1", 1, step(1), 1)).await;
    written(&s, bare(f, "d2", 1, park(20_000), 1)).await;
    assert_eq!(due_ids(&s, 1, 3_000, 10).await, vec!["e1", "d3"]);
    assert_eq!(
        due_ids(&s, 1, 20_000, 10).await,
        vec!["e1", "d3", "d10", "d2"]
    );
}

async fn orphans_are_the_running_sagas_without_a_timer(s: Arc<dyn Store>) {
    let f = take(&s, 1, "a", 0).await.fence();
    let f2 = take(&s, 2, "a", 0).await.fence();
    created(&s, f, record("o2", 1, 2_000)).await;
    created(&s, f, record("o1", 1, 1_000)).await;
    created(&s, f, record("o3", 1, 3_000)).await;
    let mut parked = record("parked", 1, 0);
    parked.wake_at = Some(t(5_000));
    created(&s, f, parked).await;
    let mut done = record("done", 1, 0);
    done.state = saga::COMPLETED.into();
    created(&s, f, done).await;
    let mut failed = record("failed", 1, 0);
    failed.state = saga::FAILED.into();
    created(&s, f, failed).await;
    let mut other_kind = record("other-kind", 1, 0);
    other_kind.kind = "other".into();
    created(&s, f, other_kind).await;
    created(&s, f2, record("other-shard", 2, 0)).await;

    assert_eq!(
        orphan_ids(&s, "k", 1).await,
        vec!["o1", "o2", "o3"],
        "oldest first"
    );
    assert_eq!(orphan_ids(&s, "other", 1).await, vec!["other-kind"]);
    assert_eq!(orphan_ids(&s, "k", 2).await, vec!["other-shard"]);
    // Parking one takes it out; finishing one too.
    written(&s, bare(f, "o1", 1, park(9_000), 1)).await;
    let finish = InstanceUpdate {
        state: Some(saga::CANCELLED.into()),
        ..Default::default()
    };
    written(&s, bare(f, "o3", 1, finish, 1)).await;
    assert_eq!(orphan_ids(&s, "k", 1).await, vec!["o2"]);
}

async fn signals_round_trip_through_a_write(s: Arc<dyn Store>) {
    let f = take(&s, 1, "a", 0).await.fence();
    let signal = |kind: &str, at: i64, position: Option<Position>| Signal {
        kind: kind.to_owned(),
        payload: json!({"kind": kind, "nested": {"list": [1, 2, 3]}}),
        at: t(at),
        position,
    };
    let from_input = Some(pos(12, 3));

    // The position is where the signal came from in the input; it is not stored.
    let mut r = record("sig", 1, 0);
    r.signals = vec![signal("first", 10, from_input)];
    created(&s, f, r).await;
    assert_eq!(
        load(&s, "sig").await.signals,
        vec![signal("first", 10, None)]
    );

    let both = InstanceUpdate {
        signals: Some(vec![
            signal("first", 10, None),
            signal("cancel", 20, from_input),
        ]),
        wake_at: Some(t(20)),
        ..Default::default()
    };
    written(&s, bare(f, "sig", 1, both, 20)).await;
    assert_eq!(
        load(&s, "sig").await.signals,
        vec![signal("first", 10, None), signal("cancel", 20, None)]
    );
    // A write that leaves the signals alone keeps them.
    written(&s, bare(f, "sig", 2, step(1), 30)).await;
    assert_eq!(load(&s, "sig").await.signals.len(), 2);
    // Applied: cleared.
    let applied = InstanceUpdate {
        signals: Some(Vec::new()),
        ..Default::default()
    };
    written(&s, bare(f, "sig", 3, applied, 40)).await;
    assert!(load(&s, "sig").await.signals.is_empty());
}

async fn the_outbox_is_per_shard_in_write_order_and_fenced(s: Arc<dyn Store>) {
    let f1 = take(&s, 1, "a", 0).await.fence();
    let f2 = take(&s, 2, "a", 0).await.fence();
    let two = vec![msg("s1a", 1), msg("s1a", 2)];
    written(&s, start(f1, record("s1a", 1, 0), two)).await;
    written(&s, start_msg(f2, "s2a", 2, 0, 3)).await;
    written(&s, start_msg(f1, "s1b", 1, 0, 4)).await;
    let then = vec![msg("s1a", 5)];
    written(&s, update(f1, "s1a", 1, step(1), 1, Vec::new(), then)).await;

    let rows = s.outbox(f1, 100).await.unwrap();
    assert_eq!(ns(&rows), vec![1, 2, 4, 5]);
    assert!(rows.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(rows[0].message, msg("s1a", 1), "the message round-trips");
    assert_eq!(sent(&s, f1, 2).await, vec![1, 2], "limited");
    assert_eq!(sent(&s, f2, 100).await, vec![3]);
    assert_eq!(backlog(&s).await, 5);

    // Another owner takes shard 1: the stale fence reads nothing.
    let b1 = take(&s, 1, "b", LATER).await.fence();
    refused(s.outbox(f1, 100).await);
    assert_eq!(sent(&s, b1, 100).await, vec![1, 2, 4, 5]);
}

/// The relay's read past what it published: only the rows with a greater seq, of the shards
/// held, in write order; from 0 it is every row.
async fn the_outbox_is_read_past_a_seq(s: Arc<dyn Store>) {
    let f1 = take(&s, 1, "a", 0).await.fence();
    let f2 = take(&s, 2, "a", 0).await.fence();
    written(&s, start_msg(f1, "s1a", 1, 0, 1)).await;
    written(&s, start_msg(f2, "s2a", 2, 0, 2)).await;
    written(&s, start_msg(f1, "s1b", 1, 0, 3)).await;
    written(&s, start_msg(f2, "s2b", 2, 0, 4)).await;
    let both = [f1, f2];
    let all = s.outbox_of(&both, 100).await.unwrap();
    assert_eq!(ns(&all), vec![1, 2, 3, 4]);
    let seq = |n: usize| all[n - 1].seq;

    let past = |after: i64, limit: usize| {
        let s = s.clone();
        async move { ns(&s.outbox_after(&both, after, limit).await.unwrap()) }
    };
    assert_eq!(past(0, 100).await, vec![1, 2, 3, 4]);
    assert_eq!(past(seq(2), 100).await, vec![3, 4]);
    assert_eq!(past(seq(1), 2).await, vec![2, 3], "limited");
    assert_eq!(past(seq(4), 100).await, Vec::<i64>::new());
    assert_eq!(
        ns(&s.outbox_after(&[f1], seq(1), 100).await.unwrap()),
        vec![3]
    );

    // Another owner takes shard 1: the stale fence reads nothing, alone or beside a held one.
    let b1 = take(&s, 1, "b", LATER).await.fence();
    refused(s.outbox_after(&[f1], 0, 100).await);
    assert_eq!(
        ns(&s.outbox_after(&[f1, f2], 0, 100).await.unwrap()),
        vec![2, 4]
    );
    assert_eq!(
        ns(&s.outbox_after(&[b1], seq(1), 100).await.unwrap()),
        vec![3]
    );
}

async fn outbox_done_is_fenced(s: Arc<dyn Store>) {
    let f1 = take(&s, 1, "a", 0).await.fence();
    let f2 = take(&s, 2, "a", 0).await.fence();
    let three = vec![msg("s1", 1), msg("s1", 2), msg("s1", 3)];
    written(&s, start(f1, record("s1", 1, 0), three)).await;
    written(&s, start_msg(f2, "s2", 2, 0, 4)).await;
    let seqs = |rows: Vec<OutboxRow>| rows.iter().map(|r| r.seq).collect::<Vec<i64>>();
    let rows1 = seqs(s.outbox(f1, 100).await.unwrap());
    let rows2 = seqs(s.outbox(f2, 100).await.unwrap());

    // A stale relay deletes nothing, and hears that it is stale.
    let b1 = take(&s, 1, "b", LATER).await.fence();
    refused(s.outbox_done(f1, &rows1).await);
    assert_eq!(sent(&s, b1, 100).await, vec![1, 2, 3]);

    // A relay deletes only its own shard's rows.
    s.outbox_done(b1, &rows2).await.ok();
    assert_eq!(sent(&s, f2, 100).await, vec![4]);

    // The owner deletes exactly what it names, not the rows between.
    s.outbox_done_of(&[b1, f2], &[rows1[0], rows1[2]])
        .await
        .unwrap();
    assert_eq!(sent(&s, b1, 100).await, vec![2]);
    assert_eq!(sent(&s, f2, 100).await, vec![4]);
    s.outbox_done(b1, &rows1[..2]).await.unwrap();
    assert_eq!(sent(&s, b1, 100).await, Vec::<i64>::new());
    assert_eq!(backlog(&s).await, 1);
    s.outbox_done(b1, &rows1).await.unwrap();
    s.outbox_done(f2, &rows2).await.unwrap();
    assert_eq!(backlog(&s).await, 0);
}

async fn list_filters_by_state_and_shard_with_a_limit(s: Arc<dyn Store>) {
    let f1 = take(&s, 1, "a", 0).await.fence();
    let f2 = take(&s, 2, "a", 0).await.fence();
    for (id, state, fence, at) in [
        ("a", saga::RUNNING, f1, 1_000),
        ("b", saga::COMPLETED, f1, 2_000),
        ("c", saga::RUNNING, f2, 3_000),
        ("d", saga::RUNNING, f1, 4_000),
        ("e", saga::FAILED, f2, 5_000),
    ] {
        let mut r = record(id, fence.shard, at);
        r.state = state.to_owned();
        created(&s, fence, r).await;
    }
    let list = |state: Option<&str>, shard: Option<i32>, limit: u64| {
        let s = s.clone();
        let filter = ListFilter {
            state: state.map(str::to_owned),
            shard,
            limit,
        };
        async move {
            s.list(&filter)
                .await
                .unwrap()
                .into_iter()
                .map(|r| r.id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(list(None, None, 10).await, ["e", "d", "c", "b", "a"]);
    assert_eq!(list(None, None, 2).await, ["e", "d"]);
    assert_eq!(list(Some("running"), None, 10).await, ["d", "c", "a"]);
    assert_eq!(list(None, Some(1), 10).await, ["d", "b", "a"]);
    assert_eq!(list(Some("running"), Some(1), 10).await, ["d", "a"]);
    assert_eq!(list(Some("running"), Some(1), 1).await, ["d"]);
    assert!(list(Some("cancelled"), None, 10).await.is_empty());
    // An update makes a saga the most recent.
    written(&s, bare(f1, "a", 1, step(1), 6_000)).await;
    assert_eq!(list(Some("running"), None, 10).await, ["a", "d", "c"]);
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL only: shard 3 leased to "a" at `t0()` for `pg_ttl()`, and transactions of another
// replica held open on the same database.

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 0).unwrap()
}

fn pg_ttl() -> chrono::Duration {
    chrono::Duration::seconds(5)
}

async fn pg_leased() -> (Fixture, Lease) {
    let fx = Fixture::new(Backend::Postgres).await;
    let lease = fx.store.acquire(3, "a", t0(), pg_ttl()).await.unwrap();
    (fx, lease.unwrap())
}

/// A transaction on the fixture's database that has run `sql` and is not yet committed.
async fn open_transaction(fx: &Fixture, sql: &[&str]) -> DatabaseTransaction {
    let tx = fx.db.as_ref().unwrap().conn.begin().await.unwrap();
    for q in sql {
        let q = Statement::from_string(DbBackend::Postgres, *q);
        tx.execute(q).await.unwrap();
    }
    tx
}

/// The lock a group commit holds on its shards' lease rows until it commits.
const KEY_SHARE: &str = "SELECT epoch FROM saga_shards WHERE shard = 3 FOR KEY SHARE";

/// PostgreSQL only: a takeover waits for a group commit in flight under the old epoch (which holds
/// its shards' lease rows `FOR KEY SHARE` until it commits), so no write checked against the old
/// epoch can commit after the new owner has taken the shard and started reading.
#[tokio::test]
async fn postgres_a_takeover_waits_for_writes_in_flight() {
    let (fx, _) = pg_leased().await;
    // A write of the old owner, checked and not yet committed.
    let in_flight = open_transaction(&fx, &[KEY_SHARE]).await;
    // The lease has expired: another owner takes the shard, and must wait for that write.
    let later = t0() + chrono::Duration::seconds(10);
    let taker = {
        let store = fx.store.clone();
        tokio::spawn(async move { store.acquire(3, "b", later, pg_ttl()).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        !taker.is_finished(),
        "the takeover did not wait for the write in flight"
    );
    in_flight.commit().await.unwrap();
    let lease = taker
        .await
        .unwrap()
        .unwrap()
        .expect("taken after the write committed");
    assert_eq!(lease.epoch, 2);
}

/// PostgreSQL only: a group commit that meets a takeover in flight waits for it, then finds the
/// new epoch and writes nothing (its statement re-reads the lease row the takeover changed).
#[tokio::test]
async fn postgres_a_write_behind_a_takeover_in_flight_is_refused() {
    let (fx, old) = pg_leased().await;
    let store = fx.store.clone();
    created(&store, old.fence(), record("s", 3, 0)).await;
    // A takeover that has locked the lease row and raised the epoch, not yet committed.
    let takeover = open_transaction(
        &fx,
        &[
            "SELECT 1 FROM saga_shards WHERE shard = 3 FOR UPDATE",
            "UPDATE saga_shards SET epoch = epoch + 1, owner = 'b' WHERE shard = 3",
        ],
    )
    .await;
    let writes = {
        let store = store.clone();
        let fence = old.fence();
        tokio::spawn(async move {
            let a = store.write(step_write(fence, "s", 1, 1, 1_000, (0, 1), 1));
            let b = store.write(start_msg(fence, "s2", 3, 0, 2));
            futures::future::join(a, b).await
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        !writes.is_finished(),
        "the writes did not wait for the takeover in flight"
    );
    takeover.commit().await.unwrap();
    let (a, b) = writes.await.unwrap();
    refused(a);
    refused(b);
    assert_eq!(load(&store, "s").await.version, 1);
    assert!(attempts(&store, "s").await.is_empty());
    assert!(missing(&store, "s2").await);
    let new = Fence {
        shard: 3,
        epoch: old.epoch + 1,
    };
    assert!(store.outbox(new, 100).await.unwrap().is_empty());
}

/// PostgreSQL only: lease renewals and checkpoints do not wait for a group commit in flight (the
/// group's lock conflicts with a takeover only).
#[tokio::test]
async fn postgres_renewals_and_checkpoints_do_not_wait_for_writes_in_flight() {
    let (fx, lease) = pg_leased().await;
    let in_flight = open_transaction(&fx, &[KEY_SHARE]).await;
    let quick = std::time::Duration::from_secs(5);
    let renewed = tokio::time::timeout(quick, fx.store.renew(&lease, t0(), pg_ttl())).await;
    assert!(matches!(renewed, Ok(Ok(true))), "{renewed:?}");
    let moved = tokio::time::timeout(quick, fx.store.checkpoint(&lease, pos(7, 1))).await;
    assert!(matches!(moved, Ok(Ok(true))), "{moved:?}");
    in_flight.commit().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// The PostgreSQL writer's session.

/// The name of the database `conn` is connected to.
async fn database_name(conn: &sea_orm::DatabaseConnection) -> String {
    conn.query_one(Statement::from_string(
        DbBackend::Postgres,
        "SELECT current_database() AS name",
    ))
    .await
    .unwrap()
    .unwrap()
    .try_get("", "name")
    .unwrap()
}

/// The backends of database `name` whose last statement was a group commit.
async fn group_sessions(admin: &sea_orm::DatabaseConnection, name: &str) -> Vec<i32> {
    admin
        .query_all(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND query LIKE '%WITH fence AS MATERIALIZED%'",
            [name.into()],
        ))
        .await
        .unwrap()
        .iter()
        .map(|row| row.try_get::<i32>("", "pid").unwrap())
        .collect()
}

/// On PostgreSQL the group-commit writer commits every group on one session of its pool, and
/// takes another when the server ends that one, losing no write.
#[tokio::test]
async fn postgres_writer_commits_on_one_session_and_replaces_it_when_it_ends() {
    let fixture = Fixture::new(Backend::Postgres).await;
    let s = fixture.store.clone();
    let name = database_name(&fixture.db.as_ref().unwrap().conn).await;
    let admin = sea_orm::Database::connect(test_support::postgres_url())
        .await
        .unwrap();
    let f = take(&s, 1, "a", 0).await.fence();

    // One group after another, as sagas that wait for each write do.
    for i in 0..20 {
        created(&s, f, record(&format!("one-{i}"), 1, i)).await;
    }
    let first = group_sessions(&admin, &name).await;
    assert_eq!(first.len(), 1, "every group on one session: {first:?}");

    // The server ends that session (a restart, a failover, an administrator).
    admin
        .execute(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT pg_terminate_backend($1)",
            [first[0].into()],
        ))
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;

    for i in 0..20 {
        created(&s, f, record(&format!("two-{i}"), 1, 100 + i)).await;
    }
    let second = group_sessions(&admin, &name).await;
    assert_eq!(second.len(), 1, "again one session: {second:?}");
    assert_ne!(second, first, "a new session replaced the one that ended");
    for i in 0..20 {
        assert!(!missing(&s, &format!("one-{i}")).await);
        assert!(!missing(&s, &format!("two-{i}")).await);
    }
}

/// A pool of one connection is not held by the writer between commits: the store's reads need
/// it too.
#[tokio::test]
async fn postgres_writer_leaves_a_pool_of_one_to_the_other_queries() {
    let db = common::db(true).await;
    let name = database_name(&db.conn).await;
    let url = test_support::postgres_url();
    let base = url.rsplit_once('/').map_or(url.as_str(), |(b, _)| b);
    let mut options = sea_orm::ConnectOptions::new(format!("{base}/{name}"));
    options
        .max_connections(1)
        .acquire_timeout(std::time::Duration::from_secs(2));
    let one = sea_orm::Database::connect(options).await.unwrap();
    let s: Arc<dyn Store> = Arc::new(saga::SqlStore::start(one));
    let f = take(&s, 1, "a", 0).await.fence();
    for i in 0..5 {
        created(&s, f, record(&format!("p-{i}"), 1, i)).await;
        assert!(
            !missing(&s, &format!("p-{i}")).await,
            "read after commit {i}"
        );
    }
}
