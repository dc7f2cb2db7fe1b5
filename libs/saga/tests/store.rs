//! The `Store` conformance suite: every test runs against `MemoryStore`, `SqlStore` on SQLite and
//! `SqlStore` on PostgreSQL (`DATABASE_URL`, a fresh database per test).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step should panic

mod common;

use std::sync::Arc;

use chrono::{DateTime, TimeZone, Utc};
use common::{Backend, Fixture};
use saga::store::{Change, OutboxRow, Write, Written};
use saga::{
    Attempt, Fence, InstanceUpdate, JournalError, Lease, ListFilter, OutboxMessage, Position,
    SagaRecord, Signal, Store,
};
use serde_json::{json, Map};

/// Expands each test for the three backends: `memory::name`, `sqlite::name`, `postgres::name`.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $( #[tokio::test] async fn $name() { super::run(super::Backend::Memory, super::$name).await } )*
        }
        mod sqlite {
            $( #[tokio::test] async fn $name() { super::run(super::Backend::Sqlite, super::$name).await } )*
        }
        mod postgres {
            $( #[tokio::test] async fn $name() { super::run(super::Backend::Postgres, super::$name).await } )*
        }
    };
}

conformance!(
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
        payload: json!({"n": n}),
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
        change: Change::Start(Box::new(r)),
        attempts: Vec::new(),
        outbox,
    }
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

/// A plain step: the next step index, nothing else.
fn step(n: i32) -> InstanceUpdate {
    InstanceUpdate {
        next_step: Some(n),
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

async fn load(s: &Arc<dyn Store>, id: &str) -> SagaRecord {
    s.load(id)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("saga {id}"))
}

fn refused<T: std::fmt::Debug>(r: Result<T, JournalError>) {
    assert!(matches!(r, Err(JournalError::Refused(_))), "{r:?}");
}

fn ns(rows: &[OutboxRow]) -> Vec<i64> {
    rows.iter()
        .map(|r| r.message.payload["n"].as_i64().unwrap())
        .collect()
}

fn ids(sagas: &[SagaRecord]) -> Vec<&str> {
    sagas.iter().map(|s| s.id.as_str()).collect()
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
    assert!(
        s.acquire(1, "b", t(5_000), ttl()).await.unwrap().is_none(),
        "held by a"
    );
    assert!(
        s.acquire(1, "b", t(10_000), ttl()).await.unwrap().is_none(),
        "still held at the instant it expires"
    );

    // The same owner re-acquires, with a new epoch: its old fence no longer holds.
    let a2 = take(&s, 1, "a", 5_000).await;
    assert!(a2.epoch > a.epoch, "{a2:?} after {a:?}");
    assert!(!s.renew(&a, t(5_000), ttl()).await.unwrap());
    assert!(s.renew(&a2, t(5_000), ttl()).await.unwrap());

    // Expired (a2 ran until 15 s): another owner takes it.
    let b = take(&s, 1, "b", 15_001).await;
    assert!(b.epoch > a2.epoch);
    assert!(!s.renew(&a2, t(15_001), ttl()).await.unwrap());

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
    assert!(s.renew(&a, t(8_000), ttl()).await.unwrap());
    assert!(
        s.acquire(1, "b", t(15_000), ttl()).await.unwrap().is_none(),
        "renewed until 18 s"
    );
    let at = Position {
        offset: 10,
        index: 2,
    };
    assert!(s.checkpoint(&a, at).await.unwrap());

    let b = take(&s, 1, "b", 18_001).await;
    assert_eq!(b.checkpoint, at, "the new owner resumes at the checkpoint");
    // The stale owner can do nothing any more.
    assert!(!s.renew(&a, t(18_002), ttl()).await.unwrap());
    assert!(!s
        .checkpoint(
            &a,
            Position {
                offset: 99,
                index: 0
            }
        )
        .await
        .unwrap());
    s.release(&a, t(18_002)).await.unwrap();
    assert!(
        s.acquire(1, "c", t(18_003), ttl()).await.unwrap().is_none(),
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
    assert!(!s.renew(&b, t(19_000), ttl()).await.unwrap());
}

async fn the_checkpoint_is_a_position(s: Arc<dyn Store>) {
    let a = take(&s, 4, "a", 0).await;
    // An offset past u32 and an index inside a batch both round-trip.
    let at = Position {
        offset: 5_000_000_000,
        index: 7,
    };
    assert!(s.checkpoint(&a, at).await.unwrap());
    assert_eq!(s.leases().await.unwrap()[0].checkpoint, at);
    let again = take(&s, 4, "a", 1_000).await;
    assert_eq!(again.checkpoint, at);
    // Moving within the same offset keeps the offset.
    let next = Position {
        offset: 5_000_000_000,
        index: 8,
    };
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
    assert_eq!(
        s.write(start(f, r.clone(), vec![msg("s1", 1)]))
            .await
            .unwrap(),
        Written::Created
    );
    assert_eq!(load(&s, "s1").await, r, "loads as written");

    // A replay: nothing of it is written, not even its announcement.
    let mut again = record("s1", 1, 1_000);
    again.input = json!({"other": true});
    let mut w = start(f, again, vec![msg("s1", 2)]);
    w.attempts.push(attempt("s1", 0, 1));
    assert_eq!(s.write(w).await.unwrap(), Written::Existed);
    assert_eq!(load(&s, "s1").await, r);
    assert_eq!(ns(&s.outbox(f, 100).await.unwrap()), vec![1]);
    assert!(s.attempts("s1").await.unwrap().is_empty());
    assert!(s.load("nope").await.unwrap().is_none());
}

async fn a_start_with_a_stale_fence_is_refused(s: Arc<dyn Store>) {
    let a = take(&s, 1, "a", 0).await;
    let b = take(&s, 1, "b", LATER).await;
    refused(
        s.write(start(a.fence(), record("s1", 1, 0), vec![msg("s1", 1)]))
            .await,
    );
    assert!(s.load("s1").await.unwrap().is_none());
    assert!(s.outbox(b.fence(), 100).await.unwrap().is_empty());
    // Nor with a fence no one ever held.
    refused(
        s.write(start(
            Fence { shard: 9, epoch: 1 },
            record("s2", 9, 0),
            vec![msg("s2", 1)],
        ))
        .await,
    );
    assert!(s.load("s2").await.unwrap().is_none());
    assert_eq!(s.outbox_backlog().await.unwrap(), 0);
    // A replay of an existing saga by the stale owner is refused too, not "existed".
    created(&s, b.fence(), record("s3", 1, 0)).await;
    refused(
        s.write(start(a.fence(), record("s3", 1, 0), Vec::new()))
            .await,
    );
}

/// A lease on one shard gives no right to write sagas of another, even when the epochs match.
async fn a_start_fenced_by_another_shard_is_refused(s: Arc<dyn Store>) {
    let one = take(&s, 1, "a", 0).await.fence();
    let two = take(&s, 2, "b", 0).await.fence();
    assert_eq!(one.epoch, two.epoch, "the same epoch on both shards");
    refused(
        s.write(start(one, record("x", 2, 0), vec![msg("x", 1)]))
            .await,
    );
    assert!(s.load("x").await.unwrap().is_none());
    assert_eq!(s.outbox_backlog().await.unwrap(), 0);
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
        outputs: Some(json!({"a": {"x": 1}})),
        next_step: Some(2),
        error: Some(Some("boom".into())),
        deadline: Some(Some(t(90_000))),
        signals: Some(vec![signal.clone()]),
        wake_at: Some(t(3_000)),
    };
    assert_eq!(
        s.write(update(
            f,
            "u1",
            1,
            change,
            1_000,
            vec![attempt("u1", 0, 1)],
            vec![msg("u1", 1)]
        ))
        .await
        .unwrap(),
        Written::Updated
    );
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
    refused(
        s.write(update(
            f,
            "u1",
            1,
            step(7),
            2_000,
            vec![attempt("u1", 0, 2)],
            vec![msg("u1", 2)],
        ))
        .await,
    );
    // Nor one it has not reached.
    refused(
        s.write(update(
            f,
            "u1",
            3,
            step(8),
            2_000,
            vec![attempt("u1", 0, 3)],
            vec![msg("u1", 3)],
        ))
        .await,
    );
    assert_eq!(load(&s, "u1").await, expected);
    assert_eq!(s.attempts("u1").await.unwrap(), vec![attempt("u1", 0, 1)]);
    assert_eq!(ns(&s.outbox(f, 100).await.unwrap()), vec![1]);

    // Fields left out stay; the timer, the error and the deadline can be cleared.
    let clear = InstanceUpdate {
        error: Some(None),
        deadline: Some(None),
        ..Default::default()
    };
    assert_eq!(
        s.write(update(f, "u1", 2, clear, 3_000, Vec::new(), Vec::new()))
            .await
            .unwrap(),
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
    refused(
        s.write(update(
            a.fence(),
            "u1",
            1,
            step(1),
            1_000,
            vec![attempt("u1", 0, 1)],
            vec![msg("u1", 1)],
        ))
        .await,
    );
    let r = load(&s, "u1").await;
    assert_eq!((r.version, r.next_step), (1, 0));
    assert!(s.attempts("u1").await.unwrap().is_empty());
    assert!(s.outbox(b.fence(), 100).await.unwrap().is_empty());
    // Also after the same owner re-acquired: each acquisition is a new epoch.
    let b2 = take(&s, 1, "b", LATER + 1).await;
    refused(
        s.write(update(
            b.fence(),
            "u1",
            1,
            step(1),
            1_000,
            Vec::new(),
            Vec::new(),
        ))
        .await,
    );
    // The current owner writes.
    assert_eq!(
        s.write(update(
            b2.fence(),
            "u1",
            1,
            step(1),
            1_000,
            vec![attempt("u1", 0, 1)],
            vec![msg("u1", 1)]
        ))
        .await
        .unwrap(),
        Written::Updated
    );
    assert_eq!(load(&s, "u1").await.version, 2);
    assert_eq!(ns(&s.outbox(b2.fence(), 100).await.unwrap()), vec![1]);
}

async fn an_update_fenced_by_another_shard_is_refused(s: Arc<dyn Store>) {
    let one = take(&s, 1, "a", 0).await.fence();
    let two = take(&s, 2, "b", 0).await.fence();
    assert_eq!(one.epoch, two.epoch, "the same epoch on both shards");
    created(&s, two, record("x", 2, 0)).await;
    refused(
        s.write(update(
            one,
            "x",
            1,
            step(1),
            1_000,
            vec![attempt("x", 0, 1)],
            vec![msg("x", 1)],
        ))
        .await,
    );
    let r = load(&s, "x").await;
    assert_eq!((r.version, r.next_step), (1, 0));
    assert!(s.attempts("x").await.unwrap().is_empty());
    assert_eq!(s.outbox_backlog().await.unwrap(), 0);
}

async fn an_update_of_a_missing_saga_is_refused(s: Arc<dyn Store>) {
    let f = take(&s, 1, "a", 0).await.fence();
    refused(
        s.write(update(
            f,
            "ghost",
            1,
            step(1),
            0,
            vec![attempt("ghost", 0, 1)],
            vec![msg("ghost", 1)],
        ))
        .await,
    );
    assert!(s.load("ghost").await.unwrap().is_none());
    assert!(s.attempts("ghost").await.unwrap().is_empty());
    assert_eq!(s.outbox_backlog().await.unwrap(), 0);
}

/// Many writes at once go in one group commit (the store's writer cannot run before all of them
/// are queued on this single-threaded runtime); the refused ones take only themselves out.
async fn a_refused_write_does_not_fail_its_group(s: Arc<dyn Store>) {
    let f = take(&s, 1, "a", 0).await.fence();
    let old2 = take(&s, 2, "a", 0).await.fence();
    let f2 = take(&s, 2, "b", LATER).await.fence();
    for i in 0..20 {
        created(&s, f, record(&format!("g{i}"), 1, i)).await;
    }
    created(&s, f, record("r", 1, 0)).await;
    created(&s, f2, record("h", 2, 0)).await;

    let mut writes = Vec::new();
    let mut expect: Vec<Result<Written, ()>> = Vec::new();
    for i in 0..20 {
        let id = format!("g{i}");
        writes.push(update(
            f,
            &id,
            1,
            step(1),
            1_000,
            vec![attempt(&id, 0, 1)],
            vec![msg(&id, i)],
        ));
        expect.push(Ok(Written::Updated));
    }
    // The same saga at the same version twice: the first lands, the second is refused.
    writes.push(update(
        f,
        "g0",
        1,
        step(5),
        1_000,
        vec![attempt("g0", 0, 9)],
        vec![msg("g0", 100)],
    ));
    expect.push(Err(()));
    // The next version of a saga updated earlier in the same group lands.
    writes.push(update(
        f,
        "g1",
        2,
        step(2),
        1_001,
        vec![attempt("g1", 1, 1)],
        vec![msg("g1", 101)],
    ));
    expect.push(Ok(Written::Updated));
    // A version the saga never had.
    writes.push(update(
        f,
        "g2",
        5,
        step(5),
        1_000,
        vec![attempt("g2", 0, 9)],
        vec![msg("g2", 102)],
    ));
    expect.push(Err(()));
    // A stale epoch.
    writes.push(update(
        old2,
        "h",
        1,
        step(1),
        1_000,
        vec![attempt("h", 0, 1)],
        vec![msg("h", 103)],
    ));
    expect.push(Err(()));
    writes.push(start(old2, record("h2", 2, 0), vec![msg("h2", 104)]));
    expect.push(Err(()));
    // A missing saga.
    writes.push(update(
        f,
        "ghost",
        1,
        step(1),
        1_000,
        vec![attempt("ghost", 0, 1)],
        vec![msg("ghost", 105)],
    ));
    expect.push(Err(()));
    // A new saga, and a replay of an old one.
    writes.push(start(f, record("new", 1, 1_000), vec![msg("new", 106)]));
    expect.push(Ok(Written::Created));
    let mut w = start(f, record("g3", 1, 1_000), vec![msg("g3", 107)]);
    w.attempts.push(attempt("g3", 0, 9));
    writes.push(w);
    expect.push(Ok(Written::Existed));
    // A saga's replayed start and its own next step in the same group.
    writes.push(start(f, record("r", 1, 1_000), vec![msg("r", 110)]));
    expect.push(Ok(Written::Existed));
    writes.push(update(
        f,
        "r",
        1,
        step(1),
        1_000,
        vec![attempt("r", 0, 1)],
        vec![msg("r", 109)],
    ));
    expect.push(Ok(Written::Updated));
    // The current owner of shard 2, in the same group as the stale one.
    writes.push(update(
        f2,
        "h",
        1,
        step(1),
        1_000,
        vec![attempt("h", 0, 1)],
        vec![msg("h", 108)],
    ));
    expect.push(Ok(Written::Updated));

    let results = futures::future::join_all(writes.into_iter().map(|w| s.write(w))).await;
    assert_eq!(results.len(), expect.len());
    for (i, (got, want)) in results.iter().zip(&expect).enumerate() {
        match want {
            Ok(w) => assert_eq!(got.as_ref().ok(), Some(w), "write {i}: {got:?}"),
            Err(()) => assert!(
                matches!(got, Err(JournalError::Refused(_))),
                "write {i}: {got:?}"
            ),
        }
    }

    let g0 = load(&s, "g0").await;
    assert_eq!((g0.version, g0.next_step), (2, 1));
    let g1 = load(&s, "g1").await;
    assert_eq!((g1.version, g1.next_step), (3, 2));
    for i in 2..20 {
        let g = load(&s, &format!("g{i}")).await;
        assert_eq!((g.version, g.next_step), (2, 1), "g{i}");
    }
    assert_eq!(load(&s, "h").await.version, 2);
    assert!(s.load("h2").await.unwrap().is_none());
    assert_eq!(load(&s, "new").await.version, 1);
    assert_eq!(
        s.attempts("g0").await.unwrap(),
        vec![attempt("g0", 0, 1)],
        "the refused write's attempt is absent"
    );
    assert_eq!(
        s.attempts("g1").await.unwrap(),
        vec![attempt("g1", 0, 1), attempt("g1", 1, 1)]
    );
    assert_eq!(s.attempts("g2").await.unwrap(), vec![attempt("g2", 0, 1)]);
    assert_eq!(
        s.attempts("g3").await.unwrap(),
        vec![attempt("g3", 0, 1)],
        "the replayed start's attempt is absent"
    );
    assert_eq!(load(&s, "r").await.version, 2);
    assert_eq!(s.attempts("r").await.unwrap(), vec![attempt("r", 0, 1)]);
    assert!(s.attempts("ghost").await.unwrap().is_empty());
    // Shard 1's outbox: the accepted writes' messages, each saga's in the order it wrote them
    // (the writes of different sagas in one group are concurrent: no order between them).
    let got = ns(&s.outbox(f, 1_000).await.unwrap());
    let mut want: Vec<i64> = (0..20).collect();
    want.extend([101, 106, 109]);
    let mut sorted = got.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, want, "{got:?}");
    let at = |n: i64| got.iter().position(|&m| m == n);
    assert!(at(1) < at(101), "g1's messages in its order: {got:?}");
    assert_eq!(ns(&s.outbox(f2, 1_000).await.unwrap()), vec![108]);
}

/// A group in which every write is to a different saga (PostgreSQL writes it as one statement):
/// each write lands or is refused on its own, with its attempts and messages.
async fn a_group_of_different_sagas_keeps_each_outcome_apart(s: Arc<dyn Store>) {
    let f = take(&s, 1, "a", 0).await.fence();
    let old2 = take(&s, 2, "a", 0).await.fence();
    let f2 = take(&s, 2, "b", LATER).await.fence();
    for i in 0..10 {
        created(&s, f, record(&format!("g{i}"), 1, i)).await;
    }
    created(&s, f2, record("h", 2, 0)).await;
    created(&s, f2, record("k", 2, 0)).await;

    let mut writes = Vec::new();
    let mut expect: Vec<Result<Written, &str>> = Vec::new();
    for i in 0..8 {
        let id = format!("g{i}");
        writes.push(update(
            f,
            &id,
            1,
            step(1),
            1_000,
            vec![attempt(&id, 0, 1)],
            vec![msg(&id, i)],
        ));
        expect.push(Ok(Written::Updated));
    }
    // A version the saga does not have.
    writes.push(update(
        f,
        "g8",
        5,
        step(5),
        1_000,
        vec![attempt("g8", 0, 9)],
        vec![msg("g8", 100)],
    ));
    expect.push(Err("version"));
    // A stale epoch: an update and a start.
    writes.push(update(
        old2,
        "h",
        1,
        step(1),
        1_000,
        vec![attempt("h", 0, 1)],
        vec![msg("h", 101)],
    ));
    expect.push(Err("no longer held at epoch"));
    writes.push(start(old2, record("h2", 2, 0), vec![msg("h2", 102)]));
    expect.push(Err("no longer held at epoch"));
    // A saga fenced by another shard's lease.
    writes.push(start(f, record("x", 2, 0), vec![msg("x", 103)]));
    expect.push(Err("does not fence"));
    // A missing saga.
    writes.push(update(
        f,
        "ghost",
        1,
        step(1),
        1_000,
        vec![attempt("ghost", 0, 1)],
        vec![msg("ghost", 104)],
    ));
    expect.push(Err("ghost"));
    // A new saga, and a replay of an old one (its attempt and message are dropped).
    writes.push(start(f, record("new", 1, 1_000), vec![msg("new", 105)]));
    expect.push(Ok(Written::Created));
    let mut w = start(f, record("g9", 1, 1_000), vec![msg("g9", 106)]);
    w.attempts.push(attempt("g9", 0, 9));
    writes.push(w);
    expect.push(Ok(Written::Existed));
    // The current owner of shard 2, in the same group as the stale one.
    writes.push(update(
        f2,
        "k",
        1,
        step(1),
        1_000,
        vec![attempt("k", 0, 1)],
        vec![msg("k", 107)],
    ));
    expect.push(Ok(Written::Updated));

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
    for i in 0..8 {
        let g = load(&s, &format!("g{i}")).await;
        assert_eq!((g.version, g.next_step), (2, 1), "g{i}");
        assert_eq!(s.attempts(&g.id).await.unwrap(), vec![attempt(&g.id, 0, 1)]);
    }
    assert_eq!(load(&s, "g8").await.version, 1);
    assert!(s.attempts("g8").await.unwrap().is_empty());
    assert_eq!(load(&s, "g9").await.version, 1);
    assert!(s.attempts("g9").await.unwrap().is_empty());
    assert_eq!(load(&s, "h").await.version, 1);
    assert!(s.attempts("h").await.unwrap().is_empty());
    assert!(s.load("h2").await.unwrap().is_none());
    assert!(s.load("x").await.unwrap().is_none());
    assert!(s.attempts("ghost").await.unwrap().is_empty());
    assert_eq!(load(&s, "new").await.version, 1);
    assert_eq!(load(&s, "k").await.version, 2);
    let mut want: Vec<i64> = (0..8).collect();
    want.push(105);
    assert_eq!(ns(&s.outbox(f, 1_000).await.unwrap()), want);
    assert_eq!(ns(&s.outbox(f2, 1_000).await.unwrap()), vec![107]);
}

/// After a restart, the log can replay a booking's start while its saga, resumed from the
/// journal, writes its next step: both in one group.
async fn a_replayed_start_and_the_next_step_of_its_saga_in_one_group(s: Arc<dyn Store>) {
    let f = take(&s, 1, "a", 0).await.fence();
    created(&s, f, record("r", 1, 0)).await;
    created(&s, f, record("o", 1, 0)).await;
    let writes = vec![
        start(f, record("r", 1, 1_000), vec![msg("r", 1)]),
        update(
            f,
            "r",
            1,
            step(1),
            1_000,
            vec![attempt("r", 0, 1)],
            vec![msg("r", 2)],
        ),
        update(
            f,
            "o",
            1,
            step(1),
            1_000,
            vec![attempt("o", 0, 1)],
            vec![msg("o", 3)],
        ),
    ];
    let results = futures::future::join_all(writes.into_iter().map(|w| s.write(w))).await;
    let results: Vec<Written> = results.into_iter().map(Result::unwrap).collect();
    assert_eq!(
        results,
        [Written::Existed, Written::Updated, Written::Updated]
    );
    assert_eq!(load(&s, "r").await.version, 2);
    assert_eq!(s.attempts("r").await.unwrap(), vec![attempt("r", 0, 1)]);
    assert_eq!(load(&s, "o").await.version, 2);
    // Concurrent writes of different sagas: no order between their messages.
    let mut got = ns(&s.outbox(f, 100).await.unwrap());
    got.sort_unstable();
    assert_eq!(got, vec![2, 3]);
}

async fn versions_never_go_backwards(s: Arc<dyn Store>) {
    let f = take(&s, 1, "a", 0).await.fence();
    created(&s, f, record("v", 1, 0)).await;
    let mut seen = vec![load(&s, "v").await.version];
    for v in 1..=5 {
        s.write(update(
            f,
            "v",
            v,
            step(v as i32),
            v * 10,
            Vec::new(),
            Vec::new(),
        ))
        .await
        .unwrap();
        seen.push(load(&s, "v").await.version);
        // Neither a replayed start nor an old version's write moves it back.
        assert_eq!(
            s.write(start(f, record("v", 1, 0), Vec::new()))
                .await
                .unwrap(),
            Written::Existed
        );
        for old in 1..=v {
            refused(
                s.write(update(f, "v", old, step(0), 0, Vec::new(), Vec::new()))
                    .await,
            );
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
    s.write(update(
        f,
        "a1",
        1,
        step(1),
        1,
        vec![
            attempt("a1", 1, 2),
            attempt("a1", 0, 1),
            attempt("a1", 1, 1),
        ],
        Vec::new(),
    ))
    .await
    .unwrap();
    // The same attempt journaled again (a replay after a crash) keeps the first record.
    let mut again = attempt("a1", 0, 1);
    again.outcome = "succeeded".into();
    again.error = None;
    s.write(update(
        f,
        "a1",
        2,
        step(2),
        2,
        vec![again, attempt("a1", 0, 2)],
        Vec::new(),
    ))
    .await
    .unwrap();
    s.write(update(
        f,
        "a2",
        1,
        step(1),
        3,
        vec![attempt("a2", 0, 1)],
        Vec::new(),
    ))
    .await
    .unwrap();
    assert_eq!(
        s.attempts("a1").await.unwrap(),
        vec![
            attempt("a1", 0, 1),
            attempt("a1", 0, 2),
            attempt("a1", 1, 1),
            attempt("a1", 1, 2)
        ]
    );
    assert_eq!(s.attempts("a2").await.unwrap(), vec![attempt("a2", 0, 1)]);
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
        ids(&s.due(1, t(3_000), 10).await.unwrap()),
        vec!["d1", "e1", "d2", "d3"],
        "due at now, earliest first, then by id"
    );
    assert_eq!(ids(&s.due(1, t(3_000), 2).await.unwrap()), vec!["d1", "e1"]);
    assert!(s.due(1, t(999), 10).await.unwrap().is_empty());
    assert_eq!(ids(&s.due(2, t(3_000), 10).await.unwrap()), vec!["x0"]);

    // A write that does not park clears the timer; one that does moves it.
    s.write(update(f, "d1", 1, step(1), 1, Vec::new(), Vec::new()))
        .await
        .unwrap();
    let park = InstanceUpdate {
        wake_at: Some(t(20_000)),
        ..Default::default()
    };
    s.write(update(f, "d2", 1, park, 1, Vec::new(), Vec::new()))
        .await
        .unwrap();
    assert_eq!(
        ids(&s.due(1, t(3_000), 10).await.unwrap()),
        vec!["e1", "d3"]
    );
    assert_eq!(
        ids(&s.due(1, t(20_000), 10).await.unwrap()),
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
        ids(&s.orphans("k", 1).await.unwrap()),
        vec!["o1", "o2", "o3"],
        "oldest first"
    );
    assert_eq!(
        ids(&s.orphans("other", 1).await.unwrap()),
        vec!["other-kind"]
    );
    assert_eq!(ids(&s.orphans("k", 2).await.unwrap()), vec!["other-shard"]);
    // Parking one takes it out; finishing one too.
    let park = InstanceUpdate {
        wake_at: Some(t(9_000)),
        ..Default::default()
    };
    s.write(update(f, "o1", 1, park, 1, Vec::new(), Vec::new()))
        .await
        .unwrap();
    let finish = InstanceUpdate {
        state: Some(saga::CANCELLED.into()),
        ..Default::default()
    };
    s.write(update(f, "o3", 1, finish, 1, Vec::new(), Vec::new()))
        .await
        .unwrap();
    assert_eq!(ids(&s.orphans("k", 1).await.unwrap()), vec!["o2"]);
}

async fn signals_round_trip_through_a_write(s: Arc<dyn Store>) {
    let f = take(&s, 1, "a", 0).await.fence();
    let signal = |kind: &str, at: i64, position: Option<Position>| Signal {
        kind: kind.to_owned(),
        payload: json!({"kind": kind, "nested": {"list": [1, 2, 3]}}),
        at: t(at),
        position,
    };
    let from_input = Some(Position {
        offset: 12,
        index: 3,
    });

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
    s.write(update(f, "sig", 1, both, 20, Vec::new(), Vec::new()))
        .await
        .unwrap();
    assert_eq!(
        load(&s, "sig").await.signals,
        vec![signal("first", 10, None), signal("cancel", 20, None)]
    );
    // A write that leaves the signals alone keeps them.
    s.write(update(f, "sig", 2, step(1), 30, Vec::new(), Vec::new()))
        .await
        .unwrap();
    assert_eq!(load(&s, "sig").await.signals.len(), 2);
    // Applied: cleared.
    let applied = InstanceUpdate {
        signals: Some(Vec::new()),
        ..Default::default()
    };
    s.write(update(f, "sig", 3, applied, 40, Vec::new(), Vec::new()))
        .await
        .unwrap();
    assert!(load(&s, "sig").await.signals.is_empty());
}

async fn the_outbox_is_per_shard_in_write_order_and_fenced(s: Arc<dyn Store>) {
    let a1 = take(&s, 1, "a", 0).await;
    let f1 = a1.fence();
    let f2 = take(&s, 2, "a", 0).await.fence();
    s.write(start(
        f1,
        record("s1a", 1, 0),
        vec![msg("s1a", 1), msg("s1a", 2)],
    ))
    .await
    .unwrap();
    s.write(start(f2, record("s2a", 2, 0), vec![msg("s2a", 3)]))
        .await
        .unwrap();
    s.write(start(f1, record("s1b", 1, 0), vec![msg("s1b", 4)]))
        .await
        .unwrap();
    s.write(update(
        f1,
        "s1a",
        1,
        step(1),
        1,
        Vec::new(),
        vec![msg("s1a", 5)],
    ))
    .await
    .unwrap();

    let rows = s.outbox(f1, 100).await.unwrap();
    assert_eq!(ns(&rows), vec![1, 2, 4, 5]);
    assert!(rows.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(rows[0].message, msg("s1a", 1), "the message round-trips");
    assert_eq!(ns(&s.outbox(f1, 2).await.unwrap()), vec![1, 2], "limited");
    assert_eq!(ns(&s.outbox(f2, 100).await.unwrap()), vec![3]);
    assert_eq!(s.outbox_backlog().await.unwrap(), 5);

    // Another owner takes shard 1: the stale fence reads nothing.
    let b1 = take(&s, 1, "b", LATER).await.fence();
    refused(s.outbox(f1, 100).await);
    assert_eq!(ns(&s.outbox(b1, 100).await.unwrap()), vec![1, 2, 4, 5]);
}

async fn outbox_done_is_fenced(s: Arc<dyn Store>) {
    let f1 = take(&s, 1, "a", 0).await.fence();
    let f2 = take(&s, 2, "a", 0).await.fence();
    s.write(start(
        f1,
        record("s1", 1, 0),
        vec![msg("s1", 1), msg("s1", 2), msg("s1", 3)],
    ))
    .await
    .unwrap();
    s.write(start(f2, record("s2", 2, 0), vec![msg("s2", 4)]))
        .await
        .unwrap();
    let rows1: Vec<i64> = s
        .outbox(f1, 100)
        .await
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect();
    let rows2: Vec<i64> = s
        .outbox(f2, 100)
        .await
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect();

    // A stale relay deletes nothing, and hears that it is stale.
    let b1 = take(&s, 1, "b", LATER).await.fence();
    refused(s.outbox_done(f1, &rows1).await);
    assert_eq!(ns(&s.outbox(b1, 100).await.unwrap()), vec![1, 2, 3]);

    // A relay deletes only its own shard's rows.
    s.outbox_done(b1, &rows2).await.ok();
    assert_eq!(ns(&s.outbox(f2, 100).await.unwrap()), vec![4]);

    // The owner deletes exactly what it names.
    s.outbox_done(b1, &rows1[..2]).await.unwrap();
    assert_eq!(ns(&s.outbox(b1, 100).await.unwrap()), vec![3]);
    assert_eq!(s.outbox_backlog().await.unwrap(), 2);
    s.outbox_done(b1, &rows1).await.unwrap();
    s.outbox_done(f2, &rows2).await.unwrap();
    assert_eq!(s.outbox_backlog().await.unwrap(), 0);
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
    s.write(update(f1, "a", 1, step(1), 6_000, Vec::new(), Vec::new()))
        .await
        .unwrap();
    assert_eq!(list(Some("running"), None, 10).await, ["a", "d", "c"]);
}

/// PostgreSQL only: a takeover waits for a group commit in flight under the old epoch (which holds
/// its shards' lease rows `FOR KEY SHARE` until it commits), so no write checked against the old
/// epoch can commit after the new owner has taken the shard and started reading.
#[tokio::test]
async fn postgres_a_takeover_waits_for_writes_in_flight() {
    use sea_orm::{ConnectionTrait, Statement, TransactionTrait};
    let db = common::db(true).await;
    let store: Arc<dyn Store> = Arc::new(saga::SqlStore::start(db.conn.clone()));
    let t0 = Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 0).unwrap();
    let ttl = chrono::Duration::seconds(5);
    store.acquire(3, "a", t0, ttl).await.unwrap().unwrap();
    // A write of the old owner, checked and not yet committed.
    let in_flight = db.conn.begin().await.unwrap();
    in_flight
        .execute(Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT epoch FROM saga_shards WHERE shard = 3 FOR KEY SHARE",
        ))
        .await
        .unwrap();
    // The lease has expired: another owner takes the shard, and must wait for that write.
    let later = t0 + chrono::Duration::seconds(10);
    let taker = {
        let store = store.clone();
        tokio::spawn(async move { store.acquire(3, "b", later, ttl).await })
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
    use sea_orm::{ConnectionTrait, Statement, TransactionTrait};
    let db = common::db(true).await;
    let store: Arc<dyn Store> = Arc::new(saga::SqlStore::start(db.conn.clone()));
    let t0 = Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 0).unwrap();
    let ttl = chrono::Duration::seconds(5);
    let old = store.acquire(3, "a", t0, ttl).await.unwrap().unwrap();
    created(&store, old.fence(), record("s", 3, 0)).await;
    // A takeover that has locked the lease row and raised the epoch, not yet committed.
    let takeover = db.conn.begin().await.unwrap();
    for sql in [
        "SELECT 1 FROM saga_shards WHERE shard = 3 FOR UPDATE",
        "UPDATE saga_shards SET epoch = epoch + 1, owner = 'b' WHERE shard = 3",
    ] {
        takeover
            .execute(Statement::from_string(sea_orm::DbBackend::Postgres, sql))
            .await
            .unwrap();
    }
    let writes = {
        let store = store.clone();
        let fence = old.fence();
        tokio::spawn(async move {
            let a = store.write(update(
                fence,
                "s",
                1,
                step(1),
                1_000,
                vec![attempt("s", 0, 1)],
                vec![msg("s", 1)],
            ));
            let b = store.write(start(fence, record("s2", 3, 0), vec![msg("s2", 2)]));
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
    assert!(store.attempts("s").await.unwrap().is_empty());
    assert!(store.load("s2").await.unwrap().is_none());
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
    use sea_orm::{ConnectionTrait, Statement, TransactionTrait};
    let db = common::db(true).await;
    let store: Arc<dyn Store> = Arc::new(saga::SqlStore::start(db.conn.clone()));
    let t0 = Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 0).unwrap();
    let ttl = chrono::Duration::seconds(5);
    let lease = store.acquire(3, "a", t0, ttl).await.unwrap().unwrap();
    let in_flight = db.conn.begin().await.unwrap();
    in_flight
        .execute(Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT epoch FROM saga_shards WHERE shard = 3 FOR KEY SHARE",
        ))
        .await
        .unwrap();
    let quick = std::time::Duration::from_secs(5);
    let renewed = tokio::time::timeout(quick, store.renew(&lease, t0, ttl)).await;
    assert!(matches!(renewed, Ok(Ok(true))), "{renewed:?}");
    let at = Position {
        offset: 7,
        index: 1,
    };
    let moved = tokio::time::timeout(quick, store.checkpoint(&lease, at)).await;
    assert!(matches!(moved, Ok(Ok(true))), "{moved:?}");
    in_flight.commit().await.unwrap();
}
