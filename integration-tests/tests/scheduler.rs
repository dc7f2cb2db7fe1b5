//! The Scheduler end to end: bookings through Ingestion and RabbitMQ, sagas against the real
//! domain services (through fault injectors where a test needs failures), journal on PostgreSQL
//! and SQLite.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step should panic

mod common;

use std::time::Duration;

use common::{
    client_changes, compensations, failing, metrics, next_compensation, refusing, reserved_drones,
    stop, suite_with_scheduler, ACTIVE,
};
use contracts::{DroneReservation, PackageSummary, TrackingEvent};
use integration_tests::faults::FaultKind;
use integration_tests::wait::poll;
use integration_tests::{both_backends, done_if, eventually, Backend, Suite, SuiteFaults, TestApp};
use reqwest::Method;
use serde_json::Value;
use uuid::Uuid;

both_backends!(
    booking_ends_scheduled_with_one_of_everything,
    transient_faults_are_retried_without_duplicates,
    suspended_account_fails_with_nothing_to_undo,
    permanent_failure_after_drone_asks_for_compensation,
    two_schedulers_never_share_a_partition,
    replaying_from_offset_zero_changes_nothing,
    no_drone_before_pickup_fails_and_compensates,
    cancel_and_reschedule_reach_the_saga,
);

const WAIT: Duration = Duration::from_secs(30);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn attempts(workflow: &Value) -> Vec<(String, Vec<String>)> {
    workflow["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_owned(),
                s["attempts"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|a| a["outcome"].as_str().unwrap().to_owned())
                    .collect(),
            )
        })
        .collect()
}

async fn downstream_effects(suite: &Suite, owner: &str, id: Uuid) -> (u64, bool, usize) {
    let summary: PackageSummary = suite
        .package
        .get(&format!("/api/packages/summary/{owner}"))
        .await
        .json();
    let reserved = suite
        .drone
        .get(&format!("/api/dronedeliveries/{id}"))
        .await
        .status
        == 200;
    let events = suite
        .delivery
        .get(&format!("/api/deliveries/{id}/events"))
        .await;
    let created = if events.status == 200 {
        events
            .json::<Vec<TrackingEvent>>()
            .iter()
            .filter(|e| e.stage == contracts::DeliveryStage::Created)
            .count()
    } else {
        0
    };
    (summary.total, reserved, created)
}

async fn booking_ends_scheduled_with_one_of_everything(backend: Backend) {
    let (suite, scheduler) = suite_with_scheduler(backend, SuiteFaults::default(), ACTIVE).await;
    let id = suite.book(&Suite::booking("acc-1", 24, "Small")).await;
    let wf = suite.workflow(&scheduler, id, "completed", WAIT).await;
    let one = vec!["succeeded".to_owned()];
    assert_eq!(
        attempts(&wf),
        vec![
            ("CheckAccount".to_owned(), one.clone()),
            ("RegisterPackage".to_owned(), one.clone()),
            ("ArrangeThirdParty".to_owned(), one.clone()),
            ("ReserveDrone".to_owned(), one.clone()),
            ("CreateDelivery".to_owned(), one.clone()),
        ]
    );
    assert_eq!(downstream_effects(&suite, "acc-1", id).await, (1, true, 1));
    let r: DroneReservation = suite
        .drone
        .get(&format!("/api/dronedeliveries/{id}"))
        .await
        .json();
    let delivery = suite.delivery.get(&format!("/api/deliveries/{id}")).await;
    assert_eq!(delivery.body["droneId"], r.drone_id.as_str());
    assert_eq!(reserved_drones(&suite.drone).await, 1);
    // The client sees it scheduled through Ingestion's read model (fed by workflow events).
    suite.client_state("acc-1", id, "scheduled", WAIT).await;
    let metrics = metrics(&scheduler).await;
    assert!(
        metrics.contains("saga_finished_total{state=\"scheduled\"} 1"),
        "{metrics}"
    );
    stop(suite, scheduler).await;
}

async fn transient_faults_are_retried_without_duplicates(backend: Backend) {
    let faults = SuiteFaults {
        package: failing("PUT", "/api/packages/", 2, FaultKind::Status(503)),
        delivery: failing("PUT", "/api/deliveries/", 1, FaultKind::Delay(ms(1500))),
        ..Default::default()
    };
    let (suite, scheduler) = suite_with_scheduler(backend, faults, ACTIVE).await;
    let id = suite.book(&Suite::booking("acc-1", 24, "Medium")).await;
    let wf = suite.workflow(&scheduler, id, "completed", WAIT).await;
    let steps = attempts(&wf);
    assert_eq!(
        steps[1].1,
        vec!["transient", "transient", "succeeded"],
        "503 twice"
    );
    assert_eq!(steps[4].1, vec!["transient", "succeeded"], "timed out once");
    // The timed-out PUT still reached the service; the retry found it: one of each.
    tokio::time::sleep(ms(1600)).await;
    assert_eq!(downstream_effects(&suite, "acc-1", id).await, (1, true, 1));
    assert_eq!(suite.faults.iter().map(|f| f.hits()).sum::<usize>(), 3);
    stop(suite, scheduler).await;
}

async fn suspended_account_fails_with_nothing_to_undo(backend: Backend) {
    let suspended = ("acc-s", "suspended");
    let (suite, scheduler) = suite_with_scheduler(backend, SuiteFaults::default(), suspended).await;
    let id = suite.book(&Suite::booking("acc-s", 24, "Small")).await;
    let wf = suite.workflow(&scheduler, id, "failed", WAIT).await;
    assert!(wf["error"].as_str().unwrap().contains("suspended"), "{wf}");
    assert_eq!(attempts(&wf)[0].1, vec!["permanent"], "not retried");
    assert_eq!(downstream_effects(&suite, "acc-s", id).await, (0, false, 0));
    let queue = compensations(&suite).await;
    tokio::time::sleep(ms(500)).await;
    assert_eq!(queue.depth().await.unwrap(), 0, "nothing to compensate");
    stop(suite, scheduler).await;
}

async fn permanent_failure_after_drone_asks_for_compensation(backend: Backend) {
    let faults = SuiteFaults {
        delivery: refusing("PUT", "/api/deliveries/", 422),
        ..Default::default()
    };
    let (suite, scheduler) = suite_with_scheduler(backend, faults, ACTIVE).await;
    let queue = compensations(&suite).await;
    let mut rx = queue.consume(10).await.unwrap();
    let id = suite.book(&Suite::booking("acc-1", 24, "Large")).await;
    let wf = suite.workflow(&scheduler, id, "failed", WAIT).await;
    assert!(
        wf["error"].as_str().unwrap().contains("CreateDelivery")
            || wf["steps"][4]["status"] == "failed",
        "{wf}"
    );
    let (request, message) = next_compensation(&mut rx).await;
    assert_eq!(message.event.kind, contracts::COMPENSATION_REQUESTED);
    assert_eq!(request.delivery_id, id);
    assert_eq!(
        request.succeeded_steps,
        vec!["RegisterPackage", "ReserveDrone"]
    );
    assert!(
        request.reason.contains("CreateDelivery"),
        "{}",
        request.reason
    );
    message.ack().await.unwrap();
    stop(suite, scheduler).await;
}

async fn partitions(scheduler: &TestApp) -> Vec<Value> {
    scheduler
        .get("/api/partitions")
        .await
        .body
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Who holds each partition `scheduler` reports.
async fn partition_owners(scheduler: &TestApp) -> Vec<String> {
    partitions(scheduler)
        .await
        .iter()
        .map(|p| p["owner"].as_str().unwrap().to_owned())
        .collect()
}

async fn two_schedulers_never_share_a_partition(backend: Backend) {
    let (suite, a) = suite_with_scheduler(backend, SuiteFaults::default(), ACTIVE).await;
    // Wait (up to 10 s) until A holds every partition, then start B for the same partitions.
    let every = Duration::from_millis(50);
    let _ = poll(Duration::from_secs(10), every, async || {
        match partitions(&a).await.len() {
            4 => Ok(()),
            n => Err(n),
        }
    })
    .await;
    let b = suite
        .start_scheduler(|s| s.scheduler.instance_id = Some("scheduler-test-b".into()))
        .await;
    let ids: Vec<Uuid> = futures::future::join_all((0..20).map(|i| suite.book_owned(i))).await;
    for id in &ids {
        let wf = suite.workflow(&a, *id, "completed", WAIT).await;
        for (step, outcomes) in attempts(&wf) {
            assert_eq!(outcomes, vec!["succeeded"], "{step} ran once");
        }
    }
    let owners = partition_owners(&a).await;
    assert!(owners.iter().all(|o| o == "scheduler-test-a"), "{owners:?}");
    let metrics_b = metrics(&b).await;
    assert!(
        !metrics_b.contains("saga_started_total 1"),
        "B started no saga"
    );
    // Only the owner relays a partition's outbox: every lifecycle event is on the log once
    // (with both replicas relaying the whole outbox, B published A's rows as well).
    tokio::time::sleep(ms(500)).await;
    let partitions_n = suite.scheduler_settings.scheduler.partitions;
    let events = suite
        .ingestion
        .broker
        .log(contracts::WORKFLOW_EVENTS_LOG, partitions_n)
        .await
        .unwrap();
    let mut seen = std::collections::HashMap::new();
    for p in 0..partitions_n {
        let mut reader = events.read(p, messaging::StartAt::First).await.unwrap();
        while let Ok(Some(record)) =
            tokio::time::timeout(Duration::from_secs(1), reader.next()).await
        {
            let e = record.event.unwrap();
            *seen.entry(e.id).or_insert(0) += 1;
        }
    }
    assert!(seen.len() >= 2 * ids.len(), "{} events", seen.len());
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "events published more than once: {twice:?}"
    );

    // A stops: B takes over and schedules new bookings. B takes each partition as it finds it
    // free, so the late booking's may be taken (and the booking scheduled) before the others:
    // every partition is B's within a while, not at once.
    a.stop().await;
    let late = suite.book(&Suite::booking("acc-1", 30, "Small")).await;
    suite.workflow(&b, late, "completed", WAIT).await;
    let taken_over = poll(WAIT, every, async || {
        let owners = partition_owners(&b).await;
        if owners.len() == 4 && owners.iter().all(|o| o == "scheduler-test-b") {
            Ok(())
        } else {
            Err(owners)
        }
    })
    .await;
    assert!(taken_over.is_ok(), "{taken_over:?}");
    stop(suite, b).await;
}

async fn replaying_from_offset_zero_changes_nothing(backend: Backend) {
    use sea_orm::ConnectionTrait;
    let (suite, scheduler) = suite_with_scheduler(backend, SuiteFaults::default(), ACTIVE).await;
    let ids: Vec<Uuid> = futures::future::join_all((0..10).map(|i| suite.book_owned(i))).await;
    for id in &ids {
        suite.workflow(&scheduler, *id, "completed", WAIT).await;
    }
    let before_summary = suite.package.get("/api/packages/summary/acc-1").await.body;
    let before_fleet = reserved_drones(&suite.drone).await;
    // Checkpoints are positions (offset, index): one message may carry several bookings.
    let checkpoints = |parts: Vec<Value>| -> Vec<(i64, i64)> {
        let mut v: Vec<(i64, (i64, i64))> = parts
            .iter()
            .map(|p| {
                (
                    p["partition"].as_i64().unwrap(),
                    (
                        p["nextOffset"].as_i64().unwrap(),
                        p["nextIndex"].as_i64().unwrap_or(0),
                    ),
                )
            })
            .collect();
        v.sort_unstable();
        v.into_iter().map(|(_, o)| o).collect()
    };
    // Wait for the checkpoints to cover everything read, then remember them.
    tokio::time::sleep(ms(500)).await;
    scheduler.stop().await;

    // Rewind every partition to offset 0 and start again: the whole log is read once more.
    let url = secrecy::ExposeSecret::expose_secret(&suite.scheduler_db.settings.url).to_owned();
    let db = sea_orm::Database::connect(url.as_str()).await.unwrap();
    let before = checkpoints(
        sea_orm::ConnectionTrait::query_all(
            &db,
            sea_orm::Statement::from_string(
                db.get_database_backend(),
                "SELECT shard, checkpoint_offset, checkpoint_index FROM saga_shards".to_owned(),
            ),
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            serde_json::json!({
                "partition": r.try_get::<i32>("", "shard").unwrap(),
                "nextOffset": r.try_get::<i64>("", "checkpoint_offset").unwrap(),
                "nextIndex": r.try_get::<i32>("", "checkpoint_index").unwrap(),
            })
        })
        .collect(),
    );
    assert!(
        before.iter().map(|(o, i)| o + i).sum::<i64>() > 0,
        "checkpoints moved: {before:?}"
    );
    db.execute_unprepared("UPDATE saga_shards SET checkpoint_offset = 0, checkpoint_index = 0")
        .await
        .unwrap();
    let attempts_before: i64 = count(&db, "SELECT COUNT(*) AS n FROM saga_attempts").await;
    let scheduler = suite.start_scheduler(|_| {}).await;
    // Wait until every checkpoint is back where it was: the whole log was read again.
    let what = format!("the scheduler to read the partitions again, up to {before:?}");
    eventually(Duration::from_secs(30), what, async || {
        let now = checkpoints(partitions(&scheduler).await);
        done_if(
            now.len() == before.len() && now.iter().zip(&before).all(|(n, b)| n >= b),
            format!("{now:?}"),
        )
    })
    .await;
    tokio::time::sleep(ms(300)).await;
    assert_eq!(
        count(&db, "SELECT COUNT(*) AS n FROM saga_attempts").await,
        attempts_before,
        "no step ran again"
    );
    assert_eq!(
        suite.package.get("/api/packages/summary/acc-1").await.body,
        before_summary
    );
    assert_eq!(reserved_drones(&suite.drone).await, before_fleet);
    for id in &ids {
        assert_eq!(downstream_effects(&suite, "acc-1", *id).await.2, 1);
    }
    let _ = db.close().await;
    stop(suite, scheduler).await;
}

async fn count(db: &sea_orm::DatabaseConnection, sql: &str) -> i64 {
    use sea_orm::{ConnectionTrait, Statement};
    let row = db
        .query_one(Statement::from_string(
            db.get_database_backend(),
            sql.to_owned(),
        ))
        .await
        .unwrap()
        .unwrap();
    row.try_get::<i64>("", "n").unwrap()
}

trait BookOwned {
    async fn book_owned(&self, i: i64) -> Uuid;
}

impl BookOwned for Suite {
    /// A booking for acc-1, spread over the coming days.
    async fn book_owned(&self, i: i64) -> Uuid {
        self.book(&Suite::booking("acc-1", 24 + i, "Small")).await
    }
}

async fn no_drone_before_pickup_fails_and_compensates(backend: Backend) {
    // The drone service answers "no drone free" (503) to every reservation.
    let faults = SuiteFaults {
        drone: refusing("PUT", "/api/dronedeliveries/", 503),
        ..Default::default()
    };
    let (suite, scheduler) = suite_with_scheduler(backend, faults, ACTIVE).await;
    let queue = compensations(&suite).await;
    let mut rx = queue.consume(10).await.unwrap();
    let mut body = Suite::booking("acc-1", 0, "Small");
    body["pickupTime"] =
        serde_json::json!((chrono::Utc::now() + chrono::Duration::seconds(3)).to_rfc3339());
    let id = suite.book(&body).await;
    let wf = suite.workflow(&scheduler, id, "failed", WAIT).await;
    let drone_attempts = &attempts(&wf)[3].1;
    assert!(
        drone_attempts.len() > 2,
        "retried until the pickup time: {drone_attempts:?}"
    );
    assert!(
        wf["error"].as_str().unwrap().contains("ReserveDrone"),
        "{wf}"
    );
    let (request, message) = next_compensation(&mut rx).await;
    assert_eq!(request.succeeded_steps, vec!["RegisterPackage"]);
    message.ack().await.unwrap();
    stop(suite, scheduler).await;
}

async fn cancel_and_reschedule_reach_the_saga(backend: Backend) {
    let (suite, scheduler) = suite_with_scheduler(backend, SuiteFaults::default(), ACTIVE).await;
    let moved = suite.book(&Suite::booking("acc-1", 24, "Small")).await;
    let cancelled = suite.book(&Suite::booking("acc-1", 25, "Small")).await;
    suite.workflow(&scheduler, moved, "completed", WAIT).await;
    suite
        .workflow(&scheduler, cancelled, "completed", WAIT)
        .await;

    // Reschedule a scheduled booking: the drone window and the delivery move.
    let later = chrono::Utc::now() + chrono::Duration::hours(48);
    let body = serde_json::json!({"pickupTime": later.to_rfc3339()});
    client_changes(&suite, "acc-1", Method::PATCH, moved, Some(&body)).await;
    // The saga moves the drone window first, then the delivery: wait for both.
    let what = "the drone reservation to move to the new pickup time, then a Rescheduled event";
    eventually(Duration::from_secs(20), what, async || {
        let r: DroneReservation = suite
            .drone
            .get(&format!("/api/dronedeliveries/{moved}"))
            .await
            .json();
        let window_moved = (r.window.start - later).num_seconds().abs() < 2;
        let events: Vec<TrackingEvent> = suite
            .delivery
            .get(&format!("/api/deliveries/{moved}/events"))
            .await
            .json();
        let last_stage = events.last().map(|e| e.stage);
        done_if(
            window_moved && last_stage == Some(contracts::DeliveryStage::Rescheduled),
            format!("window {:?}, last stage {last_stage:?}", r.window),
        )
    })
    .await;

    // Cancel a scheduled booking: the saga ends cancelled and asks to undo all three steps.
    let queue = compensations(&suite).await;
    let mut rx = queue.consume(10).await.unwrap();
    client_changes(&suite, "acc-1", Method::DELETE, cancelled, None).await;
    suite
        .workflow(&scheduler, cancelled, "cancelled", WAIT)
        .await;
    let (request, message) = next_compensation(&mut rx).await;
    assert_eq!(request.delivery_id, cancelled);
    assert_eq!(
        request.succeeded_steps,
        vec!["RegisterPackage", "ReserveDrone", "CreateDelivery"]
    );
    message.ack().await.unwrap();
    // The client sees it cancelled.
    suite
        .client_state("acc-1", cancelled, "cancelled", WAIT)
        .await;
    stop(suite, scheduler).await;
}
