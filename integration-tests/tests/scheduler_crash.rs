//! Crash recovery of the Scheduler as it runs in production: the real `scheduler` binary in a child
//! process, `kill -9` while 500 bookings are in flight, then started again on the same database
//! under the same instance name. Every booking must end scheduled with exactly one package, one
//! drone reservation and one delivery; every saga step must have succeeded exactly once; and the
//! checkpoint must be past every record of the log. The recovery time (restart → first saga
//! completed) is printed, not asserted: speed is measured by benchmarks, not by tests.
//!
//! The other services run in the test process (`spawn_suite`); the scheduler is configured only
//! through `APP_*` environment variables, as a Kubernetes pod would be, and handled by the
//! process harness (`integration_tests::harness::ServiceProcess`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step should panic

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::{client_call, reserved_drones};
use contracts::{DeliveryRequested, DroneReservation, PackageSummary, TrackingEvent};
use futures::StreamExt;
use integration_tests::harness::{binary, free_port, ServiceProcess};
use integration_tests::wait::poll;
use integration_tests::{
    both_backends, eventually, eventually_every, spawn_suite, Backend, Suite, SuiteFaults,
};
use messaging::StartAt;
use sea_orm::{ConnectionTrait, Statement};
use secrecy::ExposeSecret;
use serde_json::Value;
use uuid::Uuid;

both_backends!(killed_scheduler_resumes_without_loss_or_duplicates);

const BOOKINGS: usize = 500;
const OWNER: &str = "acc-crash";
const INSTANCE: &str = "scheduler-crash-0";
/// Sagas the scheduler runs at once (see `scheduler_env`).
const MAX_CONCURRENT_SAGAS: usize = 50;
/// The kill comes once this many sagas completed.
const KILL_AFTER: usize = BOOKINGS / 5;
/// Checks run this many HTTP calls at once.
const FAN_OUT: usize = 16;

async fn killed_scheduler_resumes_without_loss_or_duplicates(backend: Backend) {
    let binary = binary("scheduler");
    let suite = spawn_suite(backend, SuiteFaults::default()).await;
    suite.account(OWNER, "active").await;
    let workdir = tempfile::tempdir().unwrap();
    let env = scheduler_env(&suite.scheduler_settings);

    // 500 bookings wait in the log; pickups an hour apart, so the 30-drone Small fleet is never
    // what limits them.
    let ids: Vec<Uuid> = futures::stream::iter(0..BOOKINGS)
        .map(|i| {
            let suite = &suite;
            async move {
                let hours = 24 + i64::try_from(i).unwrap();
                suite.book(&Suite::booking(OWNER, hours, "Small")).await
            }
        })
        .buffer_unordered(FAN_OUT)
        .collect()
        .await;
    let expected: HashSet<Uuid> = ids.iter().copied().collect();
    assert_eq!(
        expected.len(),
        BOOKINGS,
        "Ingestion handed out distinct ids"
    );

    // First run: killed with SIGKILL once a fifth of the sagas completed.
    let mut first = ServiceProcess::spawn(
        "scheduler-first",
        &binary,
        env.clone(),
        workdir.path(),
        free_port(),
    );
    first.wait_ready(Duration::from_secs(60)).await;
    let started = Instant::now();
    let every = Duration::from_millis(10);
    let seen_before_kill = poll(Duration::from_secs(60), every, async || {
        match completed(&first).await.len() {
            n if n >= KILL_AFTER => Ok(n),
            n => Err(n),
        }
    })
    .await
    .unwrap_or_else(|n| {
        panic!(
            "only {n} (fewer than {KILL_AFTER}) sagas completed within 60 s; scheduler log:\n{}",
            first.log_tail(30)
        )
    });
    let status = first.kill9().expect("the scheduler ran");
    assert_eq!(
        status.signal(),
        Some(9),
        "the scheduler died of SIGKILL: {status:?}"
    );
    assert!(
        reqwest::get(first.url("/healthz")).await.is_err(),
        "nothing answers on the killed scheduler's port"
    );
    let at_kill = journal_state(&suite).await;
    println!(
        "killed after {:.2} s of work: {seen_before_kill} completed seen by the poll; journal at the \
         kill: {} sagas started of {BOOKINGS} — by state/next step {:?}; {} attempts; checkpoints \
         {:?}",
        started.elapsed().as_secs_f64(),
        at_kill.started,
        at_kill.by_state_step,
        at_kill.attempts,
        at_kill.checkpoints,
    );
    assert!(
        at_kill.completed < BOOKINGS,
        "the kill came after every saga had completed, so it proves nothing: {:?}",
        at_kill.by_state_step
    );

    // Second run, same settings and instance name: it takes its leases back at once.
    let restarted_at = Utc::now();
    let restart = Instant::now();
    let mut second = ServiceProcess::spawn(
        "scheduler-second",
        &binary,
        env.clone(),
        workdir.path(),
        free_port(),
    );
    second.wait_ready(Duration::from_secs(60)).await;
    let ready_after = restart.elapsed();
    let within = Duration::from_secs(90).saturating_sub(ready_after); // 90 s from the restart
    let completed = poll(within, Duration::from_millis(50), async || {
        let completed = completed(&second).await;
        if completed.len() == BOOKINGS {
            return Ok(completed);
        }
        let failed = workflows(&second, "failed").await;
        assert!(failed.is_empty(), "sagas failed: {failed:?}");
        Err(completed.len())
    })
    .await
    .unwrap_or_else(|n| {
        panic!(
            "only {n} of {BOOKINGS} sagas completed within 90 s of the restart; scheduler log:\n{}",
            second.log_tail(30)
        )
    });
    let all_done_after = restart.elapsed();
    let completed_ids: HashSet<Uuid> = completed.keys().map(|id| id.parse().unwrap()).collect();
    assert_eq!(
        completed_ids, expected,
        "every booking has a completed saga"
    );
    let after_restart: Vec<DateTime<Utc>> = completed
        .values()
        .copied()
        .filter(|t| *t >= restarted_at)
        .collect();
    let first_completion = after_restart.iter().min().copied().unwrap();
    let first_attempt = journal_state(&suite)
        .await
        .attempt_times
        .into_iter()
        .filter(|t| *t >= restarted_at)
        .min()
        .unwrap();
    println!(
        "recovery: ready {:.0} ms after the restart, first step attempt journaled after {} ms, \
         first saga completed after {} ms; {} sagas completed after the restart, all {BOOKINGS} \
         after {:.2} s",
        ready_after.as_secs_f64() * 1000.0,
        (first_attempt - restarted_at).num_milliseconds(),
        (first_completion - restarted_at).num_milliseconds(),
        after_restart.len(),
        all_done_after.as_secs_f64(),
    );

    // Exactly one of everything, and every step succeeded exactly once.
    let mut transient: BTreeMap<String, usize> = BTreeMap::new();
    let drones: HashMap<Uuid, String> = futures::stream::iter(ids.iter().copied())
        .map(|id| {
            let second = &second;
            async move {
                let (status, wf) = second.get(&format!("/api/workflows/{id}")).await;
                assert_eq!(status, 200, "{wf}");
                (id, wf)
            }
        })
        .buffer_unordered(FAN_OUT)
        .map(|(id, wf)| {
            assert_eq!(wf["state"], "completed", "{wf}");
            let steps = wf["steps"].as_array().unwrap();
            assert_eq!(steps.len(), contracts::BookingStep::ALL.len(), "{wf}");
            for step in steps {
                let name = step["name"].as_str().unwrap();
                let attempts = step["attempts"].as_array().unwrap();
                let outcomes: Vec<&str> = attempts
                    .iter()
                    .map(|a| a["outcome"].as_str().unwrap())
                    .collect();
                for a in attempts.iter().filter(|a| a["outcome"] == "transient") {
                    let error = generalize(a["error"].as_str().unwrap_or_default());
                    let when: DateTime<Utc> = a["finishedAt"].as_str().unwrap().parse().unwrap();
                    let phase = if when < restarted_at {
                        "before the kill"
                    } else {
                        "after the restart"
                    };
                    *transient
                        .entry(format!("{name} {phase}: {error}"))
                        .or_default() += 1;
                }
                assert_eq!(step["status"], "succeeded", "{id}: {wf}");
                assert_eq!(
                    outcomes.iter().filter(|o| **o == "succeeded").count(),
                    1,
                    "{id} {name}: one successful attempt, got {outcomes:?}"
                );
                assert!(
                    !outcomes.contains(&"permanent"),
                    "{id} {name}: {outcomes:?}"
                );
            }
            let drone = wf["steps"][3]["output"]["droneId"]
                .as_str()
                .unwrap()
                .to_owned();
            (id, drone)
        })
        .collect()
        .await;
    if transient.is_empty() {
        println!("no transient attempt in any saga");
    } else {
        println!("NOTE: transient attempts (a kill alone causes none):");
        for (what, n) in &transient {
            println!("  {n} × {what}");
        }
    }

    let summary: PackageSummary = suite
        .package
        .get(&format!("/api/packages/summary/{OWNER}"))
        .await
        .json();
    assert_eq!(summary.total, BOOKINGS as u64, "one package per booking");
    assert_eq!(
        reserved_drones(&suite.drone).await,
        BOOKINGS as u64,
        "one drone reservation per booking"
    );
    futures::stream::iter(ids.iter().copied())
        .for_each_concurrent(FAN_OUT, |id| {
            let (suite, drones) = (&suite, &drones);
            async move {
                let package = suite.package.get(&format!("/api/packages/{id}")).await;
                assert_eq!(package.status, 200, "package {id}: {}", package.body);
                let reservation = suite.drone.get(&format!("/api/dronedeliveries/{id}")).await;
                assert_eq!(
                    reservation.status, 200,
                    "reservation {id}: {}",
                    reservation.body
                );
                let r: DroneReservation = reservation.json();
                assert_eq!(
                    r.drone_id, drones[&id],
                    "the journaled drone is the reserved one"
                );
                let delivery = suite.delivery.get(&format!("/api/deliveries/{id}")).await;
                assert_eq!(delivery.status, 200, "delivery {id}: {}", delivery.body);
                assert_eq!(delivery.body["droneId"], r.drone_id.as_str());
                let events: Vec<TrackingEvent> = suite
                    .delivery
                    .get(&format!("/api/deliveries/{id}/events"))
                    .await
                    .json();
                let created = events
                    .iter()
                    .filter(|e| e.stage == contracts::DeliveryStage::Created)
                    .count();
                assert_eq!(
                    created, 1,
                    "delivery {id}: one Created event, got {events:?}"
                );
            }
        })
        .await;

    // The checkpoint of every partition is past its last record.
    let last = last_offsets(&suite, &expected).await;
    let what = format!("the checkpoints to pass the last offsets {last:?}");
    let checkpoints = eventually(Duration::from_secs(10), what, async || {
        let (status, body) = second.get("/api/partitions").await;
        assert_eq!(status, 200, "{body}");
        let checkpoints: BTreeMap<u32, ((i64, i64), String)> = body
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    u32::try_from(p["partition"].as_i64().unwrap()).unwrap(),
                    (
                        (
                            p["nextOffset"].as_i64().unwrap(),
                            p["nextIndex"].as_i64().unwrap_or(0),
                        ),
                        p["owner"].as_str().unwrap().to_owned(),
                    ),
                )
            })
            .collect();
        // The checkpoint is a position (offset, index): past the last event of the last message.
        let past = last.iter().all(|(p, (offset, index))| {
            checkpoints.get(p).is_some_and(|((next, next_index), _)| {
                (
                    u64::try_from(*next).unwrap_or(0),
                    u64::try_from(*next_index).unwrap_or(0),
                ) > (*offset, u64::from(*index))
            })
        });
        if past {
            Ok(checkpoints)
        } else {
            Err(format!("{checkpoints:?}"))
        }
    })
    .await;
    assert!(
        checkpoints.values().all(|(_, owner)| owner == INSTANCE),
        "{checkpoints:?}"
    );
    let behind: u64 = last
        .iter()
        .map(|(p, (offset, _))| {
            let at_kill = at_kill
                .checkpoints
                .get(&i32::try_from(*p).unwrap())
                .map_or(0, |o| u64::try_from(*o).unwrap_or(0));
            (offset + 1).saturating_sub(at_kill)
        })
        .sum();
    println!(
        "last offsets {last:?}; checkpoints (next offset, owner) {checkpoints:?}; at the kill the \
         checkpoints were {behind} log records (batches) short of the end"
    );

    // The client sees every booking scheduled (the workflow events left the outbox).
    let token = suite.ingestion.token(OWNER, &[]);
    let mut pending: Vec<Uuid> = ids.clone();
    let what = "the client to see every booking scheduled";
    let every = Duration::from_millis(200);
    eventually_every(Duration::from_secs(30), every, what, async || {
        let states: Vec<(Uuid, Value)> = futures::stream::iter(pending.iter().copied())
            .map(|id| {
                let (suite, token) = (&suite, &token);
                async move {
                    let r = client_call(suite, token, reqwest::Method::GET, id, None).await;
                    (id, r.body["state"].clone())
                }
            })
            .buffer_unordered(FAN_OUT)
            .collect()
            .await;
        pending = states
            .iter()
            .filter(|(_, s)| *s != "scheduled")
            .map(|(id, _)| *id)
            .collect();
        match states.iter().find(|(_, s)| *s != "scheduled") {
            None => Ok(()),
            Some(e) => Err(format!(
                "{} bookings not scheduled, e.g. {e:?}",
                pending.len()
            )),
        }
    })
    .await;

    drop(second);
    drop(first);
    suite.stop().await;
}

/// The suite's scheduler settings as the environment of a scheduler process.
fn scheduler_env(s: &scheduler::Settings) -> Vec<(String, String)> {
    let sc = &s.scheduler;
    let d = &s.downstream;
    let env: Vec<(&str, String)> = vec![
        ("APP_HTTP__HOST", "127.0.0.1".into()),
        ("APP_HTTP__WORKERS", s.http.workers.to_string()),
        ("APP_DATABASE__URL", s.database.url.expose_secret().into()),
        (
            "APP_AUTH__SERVICE_TOKEN",
            s.auth.service_token.expose_secret().into(),
        ),
        (
            "APP_AUTH__JWT_SECRET",
            s.auth.jwt_secret.expose_secret().into(),
        ),
        ("APP_MESSAGING__URL", s.messaging.url.expose_secret().into()),
        ("APP_MESSAGING__PREFIX", s.messaging.prefix.clone()),
        (
            "APP_MESSAGING__CONNECTION_NAME",
            s.messaging.connection_name.clone(),
        ),
        ("APP_DOWNSTREAM__ACCOUNT_URL", d.account_url.clone()),
        ("APP_DOWNSTREAM__PACKAGE_URL", d.package_url.clone()),
        ("APP_DOWNSTREAM__DRONE_URL", d.drone_url.clone()),
        ("APP_DOWNSTREAM__DELIVERY_URL", d.delivery_url.clone()),
        ("APP_DOWNSTREAM__TIMEOUT_MS", d.timeout_ms.to_string()),
        ("APP_SCHEDULER__PARTITIONS", sc.partitions.to_string()),
        ("APP_SCHEDULER__REPLICAS", "1".into()),
        ("APP_SCHEDULER__ORDINAL", "0".into()),
        ("APP_SCHEDULER__INSTANCE_ID", INSTANCE.into()),
        ("APP_SCHEDULER__LEASE_TTL_MS", sc.lease_ttl_ms.to_string()),
        (
            "APP_SCHEDULER__CHECKPOINT_INTERVAL_MS",
            sc.checkpoint_interval_ms.to_string(),
        ),
        // Not the suite's 2,000: this test is about recovery, not load. 500 sagas at once against
        // the debug-build services of the test process time out by the hundred (1 s timeout),
        // and a step that times out 8 times fails its saga. Bounded, the kill also finds bookings
        // in every phase: scheduled, mid-saga, and not yet read past the checkpoint.
        (
            "APP_SCHEDULER__MAX_CONCURRENT_SAGAS",
            MAX_CONCURRENT_SAGAS.to_string(),
        ),
        ("RUST_LOG", "info".into()),
    ];
    let steps = [
        ("ACCOUNT", sc.steps.account),
        ("PACKAGE", sc.steps.package),
        ("DRONE", sc.steps.drone),
        ("DELIVERY", sc.steps.delivery),
    ];
    let mut owned: Vec<(String, String)> =
        env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    for (step, p) in steps {
        owned.push((
            format!("APP_SCHEDULER__STEPS__{step}__MIN_DELAY_MS"),
            p.min_delay_ms.to_string(),
        ));
        owned.push((
            format!("APP_SCHEDULER__STEPS__{step}__MAX_DELAY_MS"),
            p.max_delay_ms.to_string(),
        ));
    }
    owned
}

async fn workflows(scheduler: &ServiceProcess, state: &str) -> Vec<Value> {
    let (status, body) = scheduler
        .get(&format!("/api/workflows?state={state}&limit={BOOKINGS}"))
        .await;
    assert_eq!(status, 200, "{body}");
    body.as_array().cloned().unwrap()
}

/// Completed sagas: deliveryId → when it completed.
async fn completed(scheduler: &ServiceProcess) -> HashMap<String, DateTime<Utc>> {
    workflows(scheduler, "completed")
        .await
        .iter()
        .map(|w| {
            (
                w["deliveryId"].as_str().unwrap().to_owned(),
                w["updatedAt"].as_str().unwrap().parse().unwrap(),
            )
        })
        .collect()
}

/// The scheduler's journal, read directly from its database.
struct JournalState {
    started: usize,
    completed: usize,
    by_state_step: BTreeMap<(String, i32), usize>,
    attempts: usize,
    attempt_times: Vec<DateTime<Utc>>,
    checkpoints: BTreeMap<i32, i64>,
}

async fn journal_state(suite: &Suite) -> JournalState {
    let db = service_kit::db::connect(&suite.scheduler_db.settings)
        .await
        .unwrap();
    let rows = |sql: &str| {
        db.query_all(Statement::from_string(
            db.get_database_backend(),
            sql.to_owned(),
        ))
    };
    let sagas: Vec<(String, i32)> = rows("SELECT state, next_step FROM saga_instances")
        .await
        .unwrap()
        .iter()
        .map(|r| {
            (
                r.try_get("", "state").unwrap(),
                r.try_get("", "next_step").unwrap(),
            )
        })
        .collect();
    let attempt_times: Vec<DateTime<Utc>> = rows("SELECT finished_at FROM saga_attempts")
        .await
        .unwrap()
        .iter()
        .map(|r| r.try_get("", "finished_at").unwrap())
        .collect();
    let checkpoints: BTreeMap<i32, i64> = rows("SELECT shard, checkpoint_offset FROM saga_shards")
        .await
        .unwrap()
        .iter()
        .map(|r| {
            (
                r.try_get("", "shard").unwrap(),
                r.try_get("", "checkpoint_offset").unwrap(),
            )
        })
        .collect();
    let _ = db.close().await;
    let mut by_state_step = BTreeMap::new();
    for s in &sagas {
        *by_state_step.entry(s.clone()).or_default() += 1;
    }
    JournalState {
        started: sagas.len(),
        completed: sagas.iter().filter(|s| s.0 == "completed").count(),
        by_state_step,
        attempts: attempt_times.len(),
        attempt_times,
        checkpoints,
    }
}

/// The position (offset, index) of the last record of each partition of `delivery-requests`, checking on the way
/// that the log holds every booking exactly once.
async fn last_offsets(suite: &Suite, expected: &HashSet<Uuid>) -> BTreeMap<u32, (u64, u32)> {
    let partitions = suite.scheduler_settings.scheduler.partitions;
    let log = suite
        .ingestion
        .broker
        .log(contracts::DELIVERY_REQUESTS_LOG, partitions)
        .await
        .unwrap();
    let mut last = BTreeMap::new();
    let mut seen: Vec<Uuid> = Vec::new();
    for p in 0..partitions {
        let mut reader = log.read(p, StartAt::First).await.unwrap();
        // The log is complete (every booking was acknowledged long ago): quiet means the end.
        while let Ok(Some(record)) =
            tokio::time::timeout(Duration::from_secs(2), reader.next()).await
        {
            last.insert(p, (record.position.offset, record.position.index));
            let request: DeliveryRequested = record.event.unwrap().decode().unwrap();
            seen.push(request.delivery_id);
        }
    }
    let distinct: HashSet<Uuid> = seen.iter().copied().collect();
    assert_eq!(seen.len(), BOOKINGS, "the log holds each booking once");
    assert_eq!(&distinct, expected);
    last
}

/// An error message with its ids replaced by `{id}` and cut short, so alike errors count together.
fn generalize(error: &str) -> String {
    let mut out = String::new();
    let mut rest = error;
    while !rest.is_empty() {
        if rest.len() >= 36 && rest.is_char_boundary(36) && Uuid::parse_str(&rest[..36]).is_ok() {
            out.push_str("{id}");
            rest = &rest[36..];
        } else {
            let c = rest.chars().next().unwrap();
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out.chars().take(160).collect()
}
