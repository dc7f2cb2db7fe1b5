//! The Scheduler's copy of account statuses (`account-events`, published by the Account service):
//! a booking's account check is answered by the copy without a call while the copy is fresh, a
//! suspension stops bookings within the stated bound, and a copy older than the bound is not
//! trusted (the check calls Account). Real PostgreSQL/SQLite and RabbitMQ.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step should panic

mod common;

use std::time::{Duration, Instant};

use common::{metrics, stop, suite_with_scheduler};
use integration_tests::{
    both_backends, done_if, eventually, metric_sample, Backend, Suite, SuiteFaults, TestApp,
};

both_backends!(
    the_copy_answers_account_checks_and_a_suspension_stops_bookings_within_the_bound,
    a_copy_older_than_the_bound_is_not_trusted,
);

const WAIT: Duration = Duration::from_secs(30);

/// The Scheduler's default bound on how stale its copy may be (`max_staleness_ms`).
const BOUND: Duration = Duration::from_millis(2000);

/// Account checks the scheduler answered from `source` (`copy` or `call`).
async fn checks(scheduler: &TestApp, source: &str) -> f64 {
    let text = metrics(scheduler).await;
    metric_sample(
        &text,
        &format!("scheduler_account_checks_total{{source=\"{source}\"}}"),
    )
    .unwrap_or(0.0)
}

/// `GET /api/accounts/{id}` requests the Account service answered.
async fn account_reads(suite: &Suite) -> f64 {
    let text = metrics(&suite.account).await;
    text.lines()
        .filter(|l| {
            l.starts_with("http_requests_total{")
                && l.contains("endpoint=\"/api/accounts/{id}\"")
                && l.contains("method=\"GET\"")
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Waits until the scheduler's copy holds at least `accounts` accounts and is complete as of
/// less than the bound ago.
async fn copy_is_fresh(scheduler: &TestApp, accounts: f64) {
    eventually(
        WAIT,
        "the scheduler's account copy to be fresh",
        async || {
            let text = metrics(scheduler).await;
            let held = metric_sample(&text, "scheduler_account_copy_accounts").unwrap_or(0.0);
            let as_of = metric_sample(&text, "scheduler_account_copy_complete_as_of_seconds")
                .unwrap_or(0.0);
            let now = chrono::Utc::now().timestamp_millis() as f64 / 1000.0;
            done_if(held >= accounts && now - as_of < 1.0, text)
        },
    )
    .await;
}

async fn the_copy_answers_account_checks_and_a_suspension_stops_bookings_within_the_bound(
    backend: Backend,
) {
    let (suite, scheduler) =
        suite_with_scheduler(backend, SuiteFaults::default(), ("acc-c", "active")).await;
    copy_is_fresh(&scheduler, 1.0).await;
    let reads = account_reads(&suite).await;

    let id = suite.book(&Suite::booking("acc-c", 24, "Small")).await;
    suite.workflow(&scheduler, id, "completed", WAIT).await;
    assert_eq!(checks(&scheduler, "copy").await, 1.0);
    assert_eq!(checks(&scheduler, "call").await, 0.0);
    assert_eq!(account_reads(&suite).await, reads, "Account was not asked");

    // A suspension stops every booking whose check runs later than the bound after it.
    let suspended = Instant::now();
    suite.account("acc-c", "suspended").await;
    tokio::time::sleep(BOUND.saturating_sub(suspended.elapsed())).await;
    let id = suite.book(&Suite::booking("acc-c", 24, "Small")).await;
    let wf = suite.workflow(&scheduler, id, "failed", WAIT).await;
    assert!(wf["error"].as_str().unwrap().contains("suspended"), "{wf}");
    assert_eq!(
        checks(&scheduler, "copy").await,
        2.0,
        "the copy knew of the suspension"
    );
    assert_eq!(account_reads(&suite).await, reads, "Account was not asked");

    // Made active again: bookings go through again, still without a call.
    suite.account("acc-c", "active").await;
    tokio::time::sleep(BOUND).await;
    let id = suite.book(&Suite::booking("acc-c", 24, "Small")).await;
    suite.workflow(&scheduler, id, "completed", WAIT).await;
    assert_eq!(checks(&scheduler, "call").await, 0.0);
    stop(suite, scheduler).await;
}

async fn a_copy_older_than_the_bound_is_not_trusted(backend: Backend) {
    let suite = integration_tests::spawn_suite(backend, SuiteFaults::default()).await;
    suite.account("acc-o", "active").await;
    // Marks come every 500 ms; a bound of 1 ms is always exceeded by the time a check runs.
    let scheduler = suite
        .start_scheduler(|s| s.scheduler.accounts.max_staleness_ms = 1)
        .await;
    eventually(WAIT, "the scheduler's copy to hold acc-o", async || {
        let text = metrics(&scheduler).await;
        let held = metric_sample(&text, "scheduler_account_copy_accounts").unwrap_or(0.0);
        done_if(held >= 1.0, text)
    })
    .await;
    let reads = account_reads(&suite).await;
    let id = suite.book(&Suite::booking("acc-o", 24, "Small")).await;
    suite.workflow(&scheduler, id, "completed", WAIT).await;
    assert_eq!(checks(&scheduler, "call").await, 1.0);
    assert_eq!(checks(&scheduler, "copy").await, 0.0);
    assert_eq!(
        account_reads(&suite).await,
        reads + 1.0,
        "Account was asked"
    );
    stop(suite, scheduler).await;
}
