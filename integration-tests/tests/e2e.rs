//! End to end: the eight services as their own processes (the real binaries) on PostgreSQL and
//! RabbitMQ, driven only through their public APIs as a client app and the on-call staff would.
//! Every scenario ends with the invariant checker over every service's data.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step should panic

mod common;

use std::time::Duration;

use common::{failing, refusing};
use integration_tests::faults::{FaultKind, FaultProxy};
use integration_tests::harness::{check, Bookings, Service, Stack, StackClient, StackOptions};
use integration_tests::{done_if, eventually, eventually_every};
use serde_json::{json, Value};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

/// One Large drone, so a second Large booking in the same window finds none free.
fn options() -> StackOptions {
    StackOptions {
        fleet: (10, 5, 1),
        ..StackOptions::default()
    }
}

async fn settle(stack: &Stack, bookings: &Bookings) {
    println!("checking the invariants");
    let report = check(stack, bookings, WAIT)
        .await
        .unwrap_or_else(|v| panic!("{v}"));
    println!("invariants hold: {report}");
}

/// The client's view, once it reaches `state`.
async fn client_state(client: &StackClient, owner: &str, id: Uuid, state: &str) -> Value {
    let what = format!("the client to see {id} as {state}");
    eventually(Duration::from_secs(60), what, async || {
        let a = client.status(owner, id).await;
        done_if(a.body["state"] == state, a.body)
    })
    .await
}

async fn service_json(stack: &Stack, s: Service, path: &str) -> (u16, Value) {
    stack.service(s).get(path).await
}

/// The Drone service's reservation for booking `id`: status and body.
async fn drone_reservation(stack: &Stack, id: Uuid) -> (u16, Value) {
    let path = format!("/api/dronedeliveries/{id}");
    service_json(stack, Service::Drone, &path).await
}

/// The Package service's package of booking `id`.
async fn package_of(stack: &Stack, id: Uuid) -> Value {
    service_json(stack, Service::Package, &format!("/api/packages/{id}"))
        .await
        .1
}

/// Book → scheduled; reschedule → the drone window and the delivery move; cancel before
/// (Scheduler paused), during (drone step slow) and after scheduling → compensated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn booking_lifecycle() {
    let mut stack = Stack::start(options()).await;
    let client = stack.client();
    let owner = "e2e-owner";
    stack.account(owner, "active").await;
    let mut bookings = Bookings::default();

    // Book: scheduled, with one package, one drone and one delivery.
    let id = client
        .book_ok(&StackClient::booking(owner, 48 * 60, "Small"))
        .await;
    bookings.add(id, owner);
    let wf = stack.wait_state(id, "completed", WAIT).await;
    let drone = wf["steps"][3]["output"]["droneId"]
        .as_str()
        .unwrap()
        .to_owned();
    client_state(&client, owner, id, "scheduled").await;
    let (status, reservation) = drone_reservation(&stack, id).await;
    assert_eq!(status, 200, "{reservation}");
    assert_eq!(reservation["droneId"], drone.as_str());
    let window_before = reservation["window"]["start"].clone();

    // Reschedule: two hours later; the reservation's window and the delivery follow.
    let later = (chrono::Utc::now() + chrono::Duration::hours(50)).to_rfc3339();
    let a = client
        .reschedule(owner, id, &json!({"pickupTime": later}))
        .await;
    assert_eq!(a.status, 202, "{}", a.body);
    let what = "the reschedule to move the drone window";
    eventually(Duration::from_secs(60), what, async || {
        let path = format!("/api/dronedeliveries/{id}");
        let (_, r) = service_json(&stack, Service::Drone, &path).await;
        done_if(r["window"]["start"] != window_before, r)
    })
    .await;
    // The saga moves the drone window first, then updates the delivery (its next step).
    let what = "a Rescheduled event of the delivery";
    eventually(Duration::from_secs(20), what, async || {
        let path = format!("/api/deliveries/{id}/events");
        let (_, events) = service_json(&stack, Service::Delivery, &path).await;
        done_if(
            events
                .as_array()
                .is_some_and(|a| a.iter().any(|e| e["stage"] == "Rescheduled")),
            events,
        )
    })
    .await;
    assert_eq!(
        stack.wait_state(id, "completed", WAIT).await["state"],
        "completed"
    );

    // Cancel after scheduling: the Supervisor undoes Delivery → Drone → Package.
    let a = client.cancel(owner, id).await;
    assert_eq!(a.status, 202, "{}", a.body);
    stack.wait_state(id, "compensated", WAIT).await;
    // The client asked for it: the booking reads `cancelled`, with what was undone.
    let seen = client_state(&client, owner, id, "cancelled").await;
    assert!(
        seen.to_string().contains("cancelled by the client"),
        "{seen}"
    );
    let package = package_of(&stack, id).await;
    assert_eq!(package["status"], "cancelled", "{package}");
    let (_, reservation) = drone_reservation(&stack, id).await;
    assert_eq!(reservation["status"], "released", "{reservation}");
    let sup = stack.supervisor_saga(id).await;
    assert!(
        sup.to_string().contains("compensated"),
        "the Supervisor shows the compensation: {sup}"
    );

    // Cancel before scheduling: the Scheduler is paused (SIGSTOP) while booking and cancel
    // reach the log; it resumes and must apply both in order.
    stack.service_mut(Service::Scheduler).pause();
    let early = client
        .book_ok(&StackClient::booking(owner, 52 * 60, "Small"))
        .await;
    bookings.add(early, owner);
    // The client sees its booking as accepted before anything else happens to it.
    client_state(&client, owner, early, "accepted").await;
    let a = client.cancel(owner, early).await;
    assert_eq!(a.status, 202, "{}", a.body);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stack.service_mut(Service::Scheduler).resume();
    let ended = wait_any(&stack, early, &["cancelled", "compensated"]).await;
    println!("cancelled before scheduling ended {ended}");

    // Cancel during scheduling: the drone step answers slowly, the cancel lands meanwhile.
    let slow = (&stack.scheduler_faults.drone, "/api/dronedeliveries/");
    let (_, wf) = cancel_in_slow_step(&stack, &client, &mut bookings, owner, 56 * 60, slow).await;
    assert!(
        wf["steps"][1]["status"] == "succeeded",
        "the package was registered before the cancel: {wf}"
    );
    stack.scheduler_faults.clear();

    // Cancel during the last step: the saga cannot stop at a step boundary any more and
    // completes; the cancel still wins (cancelled, everything undone), it is never lost.
    let slow = (&stack.scheduler_faults.delivery, "/api/deliveries/");
    let (last, wf) =
        cancel_in_slow_step(&stack, &client, &mut bookings, owner, 57 * 60, slow).await;
    assert!(
        wf["steps"][4]["status"] == "succeeded",
        "the delivery was created before the cancel took effect: {wf}"
    );
    client_state(&client, owner, last, "cancelled").await;
    stack.scheduler_faults.clear();

    settle(&stack, &bookings).await;
    stack.stop().await;
}

/// Books (pickup in `minutes`), makes the step behind `faults` answer its `PUT` 1.5 s late,
/// cancels once that call is under way (the cancel must be accepted) and waits for the saga to
/// end compensated: the booking and its workflow.
async fn cancel_in_slow_step(
    stack: &Stack,
    client: &StackClient,
    bookings: &mut Bookings,
    owner: &str,
    minutes: i64,
    (faults, path_prefix): (&FaultProxy, &str),
) -> (Uuid, Value) {
    let slow = FaultKind::Delay(Duration::from_millis(1500));
    faults.set_faults(failing("PUT", path_prefix, 1, slow));
    let id = client
        .book_ok(&StackClient::booking(owner, minutes, "Small"))
        .await;
    let what = format!("the slow step ({path_prefix}) to be reached");
    let every = Duration::from_millis(20);
    eventually_every(Duration::from_secs(8), every, what, async || {
        match faults.hits() {
            0 => Err(0),
            n => Ok(n),
        }
    })
    .await;
    assert_eq!(
        faults.hits(),
        1,
        "the slow step ({path_prefix}) was reached"
    );
    let a = client.cancel(owner, id).await;
    assert_eq!(a.status, 202, "{}", a.body);
    bookings.add(id, owner);
    (id, stack.wait_state(id, "compensated", WAIT).await)
}

async fn wait_any(stack: &Stack, id: Uuid, states: &[&str]) -> String {
    let what = format!("saga {id} to reach any of {states:?}");
    eventually(Duration::from_secs(120), what, async || {
        let w = stack.workflow(id).await;
        match w.as_ref().and_then(|w| w["state"].as_str()) {
            Some(s) if states.contains(&s) => Ok(s.to_owned()),
            _ => Err(format!("{w:?}")),
        }
    })
    .await
}

/// A suspended account fails with nothing held; no drone free until the pickup time fails and
/// is compensated; a downstream that always refuses (422) fails the saga and is compensated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_end_cleanly() {
    let stack = Stack::start(options()).await;
    let client = stack.client();
    let mut bookings = Bookings::default();

    // Suspended account: fails at CheckAccount, without retries, nothing to undo.
    stack.account("e2e-suspended", "suspended").await;
    let id = client
        .book_ok(&StackClient::booking("e2e-suspended", 24 * 60, "Small"))
        .await;
    bookings.add(id, "e2e-suspended");
    let wf = stack.wait_state(id, "failed", WAIT).await;
    assert_eq!(wf["steps"][0]["status"], "failed", "{wf}");
    assert_eq!(
        wf["steps"][0]["attempts"].as_array().unwrap().len(),
        1,
        "{wf}"
    );
    client_state(&client, "e2e-suspended", id, "failed").await;

    // No free drone until the deadline: the only Large drone is taken for that window; the
    // second booking waits for one until its pickup time passes, then fails and is compensated.
    let owner = "e2e-owner";
    stack.account(owner, "active").await;
    let mut soon = StackClient::booking(owner, 0, "Large");
    soon["pickupTime"] = json!((chrono::Utc::now() + chrono::Duration::seconds(20)).to_rfc3339());
    let first = client.book_ok(&soon).await;
    bookings.add(first, owner);
    stack.wait_state(first, "completed", WAIT).await;
    let second = client.book_ok(&soon).await;
    bookings.add(second, owner);
    let wf = stack.wait_state(second, "compensated", WAIT).await;
    let drone_attempts = wf["steps"][3]["attempts"].as_array().unwrap();
    assert!(
        drone_attempts.len() > 1 && drone_attempts.iter().all(|a| a["outcome"] != "succeeded"),
        "the drone step was retried until the deadline: {wf}"
    );
    let package = package_of(&stack, second).await;
    assert_eq!(package["status"], "cancelled", "{package}");

    // A downstream permanently failing: Delivery refuses every new delivery (422).
    let refuse = refusing("PUT", "/api/deliveries/", 422);
    stack.scheduler_faults.delivery.set_faults(refuse);
    let id = client
        .book_ok(&StackClient::booking(owner, 30 * 60, "Small"))
        .await;
    bookings.add(id, owner);
    let wf = stack.wait_state(id, "compensated", WAIT).await;
    assert_eq!(wf["steps"][4]["status"], "failed", "{wf}");
    client_state(&client, owner, id, "compensated").await;
    let (_, reservation) = drone_reservation(&stack, id).await;
    assert_eq!(reservation["status"], "released", "{reservation}");
    stack.scheduler_faults.clear();

    settle(&stack, &bookings).await;
    stack.stop().await;
}
