//! The short chaos case of `make test`: one Scheduler `kill -9` under load, then the invariant
//! checker (see `integration_tests::harness::chaos` for the long cases that `make chaos` runs).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step should panic

use std::time::Duration;

use integration_tests::harness::chaos::{begin, finish, kill_scheduler, load_options};
use integration_tests::harness::{LoadOptions, StackOptions};

/// The short chaos case of `make test`: one Scheduler `kill -9` under load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_kill_under_load() {
    // With client cancels (every 5th booking): a cancel that reaches a saga whose step was in
    // flight at the kill must still end with nothing held.
    let load_options = LoadOptions {
        cancel_every: 5,
        ..load_options()
    };
    let (mut stack, load) = begin(StackOptions::default(), load_options).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    println!(
        "killing the scheduler after {} accepted bookings",
        load.accepted()
    );
    kill_scheduler(&mut stack, "scheduler kill", Duration::from_millis(500)).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    finish("scheduler kill", stack, load).await;
}
