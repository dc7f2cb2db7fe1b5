//! Chaos cases: the services as their own processes under a steady booking load, while
//! something breaks — a Scheduler `kill -9`ed and restarted, the Supervisor killed in the middle
//! of compensations, a domain service restarted, RabbitMQ restarted, downstream errors and slow
//! answers, Package down for 30 s behind the Scheduler's circuit breaker. After each, the invariant checker must pass: every booking that got a `202` ended
//! in exactly one terminal state, nothing lost, nothing doubled, nothing half-done.
//!
//! The short case (one Scheduler kill) is a test in `tests/chaos.rs` and runs in `make test`. The
//! long cases below run with `make chaos` through the `chaos` binary (`src/bin/chaos.rs`), which
//! the script points at a private RabbitMQ node (`RABBITMQ_NODE`), so restarting it disturbs
//! nothing else. `CHAOS_SECS` (default 30) is the load's length per case, `CHAOS_RATE` (default
//! 20) its bookings per second. Recovery times are printed (lines starting with `RECOVERY`), not
//! asserted: speed is measured, not tested. A case that finds a violation panics with it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed chaos step should panic

use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use crate::faults::{Fault, FaultKind};
use crate::harness::{check, Load, LoadOptions, Service, Stack, StackOptions};
use crate::wait::eventually_every;
use serde_json::Value;

/// How often a case asks whether what it waits for has happened.
const POLL: Duration = Duration::from_millis(50);

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn chaos_secs() -> Duration {
    Duration::from_secs(env_u64("CHAOS_SECS", 30))
}

pub fn load_options() -> LoadOptions {
    LoadOptions {
        rate_per_second: u32::try_from(env_u64("CHAOS_RATE", 20)).unwrap_or(20),
        ..LoadOptions::default()
    }
}

/// A stack with the load's accounts, and the load running.
pub async fn begin(options: StackOptions, load: LoadOptions) -> (Stack, Load) {
    let stack = Stack::start(options).await;
    for owner in &load.owners {
        stack.account(owner, "active").await;
    }
    let load = Load::start(stack.client(), load);
    (stack, load)
}

/// Stops the load, checks every invariant, stops the stack.
pub async fn finish(case: &str, stack: Stack, load: Load) {
    let outcome = load.stop().await;
    assert!(
        !outcome.bookings.accepted.is_empty(),
        "{case}: no booking was accepted at all"
    );
    let report = check(&stack, &outcome.bookings, Duration::from_secs(180))
        .await
        .unwrap_or_else(|v| panic!("{case}: {v}"));
    println!("{case}: invariants hold — {report}");
    stack.stop().await;
}

/// `kill -9` the Scheduler, start it again after `down`; prints and returns the recovery time
/// (restart → first saga completed by the new process).
pub async fn kill_scheduler(stack: &mut Stack, case: &str, down: Duration) -> Duration {
    let status = stack
        .service_mut(Service::Scheduler)
        .kill9()
        .expect("the scheduler ran");
    assert_eq!(status.signal(), Some(9), "killed by SIGKILL: {status:?}");
    tokio::time::sleep(down).await;
    let restarted_at = chrono::Utc::now();
    let ready = stack.restart(Service::Scheduler).await;
    let first = stack
        .first_completion_after(restarted_at, Duration::from_secs(60))
        .await
        .unwrap_or_else(|| {
            panic!(
                "{case}: no saga completed within 60 s of the restart; log:\n{}",
                stack.service(Service::Scheduler).log_tail(30)
            )
        });
    println!(
        "RECOVERY {case}: scheduler ready {} ms after its restart, first saga completed after {} ms",
        ready.as_millis(),
        first.as_millis()
    );
    first
}

/// Two Scheduler kills during a longer load, and a pause (SIGSTOP) longer than its lease.
pub async fn chaos_scheduler_kill_and_pause() {
    let third = chaos_secs() / 3;
    let (mut stack, load) = begin(StackOptions::default(), load_options()).await;
    tokio::time::sleep(third).await;
    kill_scheduler(&mut stack, "scheduler kill 1", Duration::from_secs(1)).await;
    tokio::time::sleep(third).await;
    kill_scheduler(&mut stack, "scheduler kill 2", Duration::ZERO).await;
    tokio::time::sleep(third / 2).await;
    // Paused for longer than the lease (2 s): it must find its leases again, not double-run.
    stack.service_mut(Service::Scheduler).pause();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let resumed_at = chrono::Utc::now();
    stack.service_mut(Service::Scheduler).resume();
    let first = stack
        .first_completion_after(resumed_at, Duration::from_secs(60))
        .await
        .expect("sagas complete after the pause");
    println!(
        "RECOVERY scheduler pause 5 s: first saga completed {} ms after SIGCONT",
        first.as_millis()
    );
    tokio::time::sleep(third / 2).await;
    finish("scheduler kill and pause", stack, load).await;
}

/// The Supervisor `kill -9`ed while compensations are in flight (its undo calls answer slowly).
pub async fn chaos_supervisor_kill_mid_compensation() {
    let load_options = LoadOptions {
        cancel_every: 3,
        cancel_after: Duration::from_secs(1),
        ..load_options()
    };
    let (mut stack, load) = begin(StackOptions::default(), load_options).await;
    stack.supervisor_faults.delivery.set_faults(vec![Fault {
        method: "DELETE",
        path_prefix: "/api/deliveries/".into(),
        times: usize::MAX,
        kind: FaultKind::Delay(Duration::from_millis(800)),
    }]);
    tokio::time::sleep(chaos_secs() / 3).await;
    let what = "a compensation in flight";
    let compensating = eventually_every(Duration::from_secs(60), POLL, what, async || {
        let (_, list) = stack
            .service(Service::Scheduler)
            .get("/api/workflows?state=compensating&limit=500")
            .await;
        match list.as_array().map_or(0, Vec::len) {
            0 => Err(list),
            n => Ok(n),
        }
    })
    .await;
    stack.kill9(Service::Supervisor);
    println!("killed the supervisor with {compensating} sagas compensating");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ready = stack.restart(Service::Supervisor).await;
    let restarted = Instant::now();
    // Those sagas are finished by the new process (redelivered, idempotent DELETEs).
    let what = "a compensation completed after the supervisor restart";
    eventually_every(Duration::from_secs(60), POLL, what, async || {
        let (_, list) = stack
            .service(Service::Scheduler)
            .get("/api/workflows?state=compensated&limit=1")
            .await;
        let recent = list
            .as_array()
            .and_then(|l| l.first())
            .and_then(|w| w["updatedAt"].as_str())
            .and_then(|t| t.parse::<chrono::DateTime<chrono::Utc>>().ok());
        if recent.is_some_and(|t| {
            t > chrono::Utc::now() - chrono::Duration::from_std(restarted.elapsed()).unwrap()
        }) {
            Ok(())
        } else {
            Err(list)
        }
    })
    .await;
    println!(
        "RECOVERY supervisor kill: ready {} ms after its restart, first compensation completed after {} ms",
        ready.as_millis(),
        restarted.elapsed().as_millis() + ready.as_millis()
    );
    tokio::time::sleep(chaos_secs() / 3).await;
    stack.supervisor_faults.clear();
    tokio::time::sleep(chaos_secs() / 3).await;
    finish("supervisor kill mid-compensation", stack, load).await;
}

/// Each domain service `kill -9`ed and restarted in turn under load.
pub async fn chaos_domain_service_restart() {
    let (mut stack, load) = begin(StackOptions::default(), load_options()).await;
    let step = chaos_secs() / 5;
    tokio::time::sleep(step).await;
    for s in [
        Service::Account,
        Service::Package,
        Service::Drone,
        Service::Delivery,
    ] {
        stack.kill9(s);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let ready = stack.restart(s).await;
        println!(
            "RECOVERY {} restart: down 1 s, ready {} ms after its restart",
            s.name(),
            ready.as_millis()
        );
        tokio::time::sleep(step).await;
    }
    finish("domain service restarts", stack, load).await;
}

/// RabbitMQ stopped for a few seconds and started again under load (Ingestion answers 503
/// meanwhile; the Scheduler, Supervisor and Ingestion's readers reconnect by themselves).
pub async fn chaos_rabbitmq_restart() {
    let (stack, load) = begin(StackOptions::default(), load_options()).await;
    tokio::time::sleep(chaos_secs() / 3).await;
    let before = load.accepted();
    println!(
        "restarting RabbitMQ node {:?} after {before} accepted bookings",
        stack.rabbit.node()
    );
    let outage = stack
        .rabbit
        .restart(Duration::from_secs(3))
        .await
        .expect("rabbitmqctl restarts the node");
    let back = Instant::now();
    // Bookings are accepted again once Ingestion has reconnected.
    let what = "bookings accepted again after the restart";
    eventually_every(Duration::from_secs(120), POLL, what, async || {
        let n = load.accepted();
        if n == before {
            return Err(format!("{n} accepted, as before the restart"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        match load.accepted() {
            now if now == n => Err(format!("{n} accepted, none in the last 100 ms")),
            _ => Ok(()),
        }
    })
    .await;
    println!(
        "RECOVERY rabbitmq restart: broker unavailable {} ms, bookings accepted again {} ms after it was up",
        outage.as_millis(),
        back.elapsed().as_millis()
    );
    tokio::time::sleep(chaos_secs() * 2 / 3).await;
    for s in Service::ALL {
        let (status, body): (u16, Value) = stack.service(s).get("/readyz").await;
        assert_eq!(
            status,
            200,
            "{} ready after the broker restart: {body}",
            s.name()
        );
    }
    finish("rabbitmq restart", stack, load).await;
}

/// Downstream errors (503, 500, connection-level timeouts) and slow answers for the Scheduler's
/// steps and the Supervisor's undo calls; then they heal.
pub async fn chaos_downstream_faults() {
    let load_options = LoadOptions {
        cancel_every: 5,
        ..load_options()
    };
    let (stack, load) = begin(StackOptions::default(), load_options).await;
    tokio::time::sleep(chaos_secs() / 4).await;
    let fault = |method, prefix: &str, times, kind| Fault {
        method,
        path_prefix: prefix.into(),
        times,
        kind,
    };
    let slow = |ms| FaultKind::Delay(Duration::from_millis(ms));
    let f = &stack.scheduler_faults;
    f.account.as_ref().unwrap().set_faults(vec![fault(
        "GET",
        "/api/accounts/",
        40,
        FaultKind::Status(500),
    )]);
    f.package.set_faults(vec![fault(
        "PUT",
        "/api/packages/",
        60,
        FaultKind::Status(503),
    )]);
    // Longer than the Scheduler's 2 s timeout: the call times out, the PUT still lands later.
    f.drone
        .set_faults(vec![fault("PUT", "/api/dronedeliveries/", 30, slow(2500))]);
    f.delivery
        .set_faults(vec![fault("PUT", "/api/deliveries/", 200, slow(400))]);
    let g = &stack.supervisor_faults;
    g.package.set_faults(vec![fault(
        "DELETE",
        "/api/packages/",
        20,
        FaultKind::Status(503),
    )]);
    g.drone.set_faults(vec![fault(
        "DELETE",
        "/api/dronedeliveries/",
        20,
        slow(2500),
    )]);
    tokio::time::sleep(chaos_secs() / 2).await;
    println!(
        "faults hit: account {}, package {}, drone {}, delivery {}; supervisor package {}, drone {}",
        f.account.as_ref().unwrap().hits(),
        f.package.hits(),
        f.drone.hits(),
        f.delivery.hits(),
        g.package.hits(),
        g.drone.hits()
    );
    f.clear();
    g.clear();
    tokio::time::sleep(chaos_secs() / 4).await;
    finish("downstream faults", stack, load).await;
}

/// One sample of the Scheduler's `/metrics` during an outage: the breaker state of `service`
/// (0 closed, 1 half-open, 2 open) and the sagas holding a slot.
async fn breaker_sample(stack: &Stack, service: &str) -> Option<(i64, i64)> {
    let text = reqwest::Client::new()
        .get(stack.service(Service::Scheduler).url("/metrics"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let value = |series: &str| crate::metric_sample(&text, series).map(|v| v as i64);
    let state = value(&format!("downstream_breaker_state{{target=\"{service}\"}}"))?;
    let slots = value("scheduler_saga_slots_in_use")?;
    Some((state, slots))
}

/// Package fails (every call answered 503) for `CHAOS_OUTAGE_SECS` (default 30) under the steady
/// load. The Scheduler's circuit breaker for Package opens; while it is open Package receives
/// at most the half-open probes (counted at the fault injector), no saga holds a slot waiting for
/// it (they wait as durable timers), and once Package is back every booking completes: none
/// fails for Package.
pub async fn chaos_package_outage_behind_the_breaker() {
    const OPEN_MS: u64 = 5_000;
    const PROBES: u64 = 1;
    let outage = Duration::from_secs(env_u64("CHAOS_OUTAGE_SECS", 30));
    let options = StackOptions::default()
        .env(
            Service::Scheduler,
            "APP_DOWNSTREAM__BREAKER__OPEN_MS",
            OPEN_MS,
        )
        .env(
            Service::Scheduler,
            "APP_DOWNSTREAM__BREAKER__HALF_OPEN_PROBES",
            PROBES,
        );
    let (stack, load) = begin(options, load_options()).await;
    tokio::time::sleep(chaos_secs() / 4).await;
    let all = |method| Fault {
        method,
        path_prefix: "/api/packages/".into(),
        times: usize::MAX,
        kind: FaultKind::Status(503),
    };
    let package = &stack.scheduler_faults.package;
    stack
        .supervisor_faults
        .package
        .set_faults(vec![all("DELETE")]);
    package.set_faults(vec![all("PUT")]);
    let started = Instant::now();
    let mut opened: Option<(Instant, usize)> = None;
    let mut open_samples = Vec::new();
    while started.elapsed() < outage {
        if let Some((state, slots)) = breaker_sample(&stack, "package").await {
            if state == 2 {
                let (at, _) = *opened.get_or_insert((Instant::now(), package.hits()));
                // Sagas already sleeping a short back-off in their slot when the breaker opened
                // finish it first (at most `park_after`, 1 s), then are deferred: the slots count
                // from 2 s after the opening.
                if at.elapsed() >= Duration::from_secs(2) {
                    open_samples.push(slots);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let hits_total = package.hits();
    stack.scheduler_faults.clear();
    stack.supervisor_faults.clear();
    let (opened_at, hits_before_open) = opened.unwrap_or_else(|| {
        panic!(
            "package outage: the breaker never opened in {} s ({hits_total} calls reached Package); scheduler log:\n{}",
            outage.as_secs(),
            stack.service(Service::Scheduler).log_tail(30)
        )
    });
    let open_for = started.elapsed().saturating_sub(opened_at - started);
    let probes = hits_total - hits_before_open;
    // One probe window per OPEN_MS (plus the one in progress), PROBES calls each.
    let allowed =
        usize::try_from((open_for.as_millis() as u64 / OPEN_MS + 2) * PROBES).unwrap_or(usize::MAX);
    open_samples.sort_unstable();
    let most = open_samples.last().copied().unwrap_or(0);
    let quantile = |q: usize| {
        open_samples
            .get(open_samples.len() * q / 100)
            .copied()
            .unwrap_or(0)
    };
    let (median, p90) = (quantile(50), quantile(90));
    println!(
        "RECOVERY package outage: breaker open after {} ms ({hits_before_open} calls reached Package first); \
         {probes} calls reached Package in the {} ms it was open or half-open (allowed {allowed}); \
         sagas holding a slot from 2 s after it opened: median {median}, 90th percentile {p90}, \
         most {most} ({} samples; the highest: {:?})",
        (opened_at - started).as_millis(),
        open_for.as_millis(),
        open_samples.len(),
        &open_samples[open_samples.len().saturating_sub(8)..]
    );
    assert!(
        probes <= allowed,
        "package outage: {probes} calls reached Package while its breaker was open (allowed {allowed})"
    );
    // No saga waits for Package in a slot: new bookings pass through one for their first step,
    // then park; parked sagas come back once per open period to find the breaker still open (a
    // journal write each, on the partition's timer tick), a short wave the samples sometimes
    // catch. Waiting in slots would hold them all (64 here) in every sample.
    assert!(
        p90 <= 10,
        "package outage: sagas held slots while the breaker was open: 90th percentile {p90} ({open_samples:?})"
    );

    let outcome = load.stop().await;
    let report = check(&stack, &outcome.bookings, Duration::from_secs(180))
        .await
        .unwrap_or_else(|v| panic!("package outage: {v}"));
    println!("package outage: invariants hold — {report}");
    let mut failed_for_package = Vec::new();
    for id in outcome.bookings.accepted.keys() {
        if let Some(wf) = stack.workflow(*id).await {
            let error = wf["error"].as_str().unwrap_or_default();
            if wf["state"] != "completed"
                && !outcome.bookings.cancelled.contains(id)
                && error.contains("RegisterPackage")
            {
                failed_for_package.push(format!("{id}: {error}"));
            }
        }
    }
    assert!(
        failed_for_package.is_empty(),
        "package outage: bookings failed for Package instead of waiting for it: {failed_for_package:?}"
    );
    stack.stop().await;
}
