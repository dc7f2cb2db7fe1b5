//! The Scheduler's typed clients (`downstream`) against the real domain services, and against tiny
//! local servers that misbehave (silent, overloaded, failing) to check how failures are classified;
//! then the protection in front of every service: its circuit breaker, against a real service
//! behind a fault injector (calls refused without reaching it while open, one probe after the open
//! time, closed again once it answers), never opened by a full fleet, and its cap on concurrent
//! calls.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step should panic

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::pickup;
use contracts::{
    AccountStatus, BreakerState, BreakerStatus, ConfirmationType, DeliveryPatch, DeliveryStage,
    DeliveryUpsert, DroneReservationRequest, PackageSize, PackageStatus, PackageUpsert,
};
use downstream::{BreakerSettings, CallError, Downstream, DownstreamSettings};
use integration_tests::faults::{Fault, FaultKind, FaultProxy};
use integration_tests::{
    both_backends, spawn_account, spawn_delivery, spawn_drone_with, spawn_package, Backend,
    SERVICE_TOKEN,
};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

both_backends!(
    accounts_are_data_and_unknown_ones_are_permanent,
    packages_are_put_idempotently_and_conflicts_are_permanent,
    drone_reservations_are_idempotent_and_a_full_fleet_is_transient,
    deliveries_are_created_rescheduled_and_cancelled_idempotently,
    a_wrong_service_token_is_permanent,
    a_misrouted_compensation_is_not_taken_as_done,
    a_failing_service_is_cut_off_by_its_breaker_until_a_probe_finds_it_back,
    a_full_fleet_never_opens_the_drone_breaker,
);

/// Settings whose services all live at `url` (most tests start only the one they need).
fn settings(url: &str) -> DownstreamSettings {
    DownstreamSettings {
        account_url: url.to_owned(),
        package_url: url.to_owned(),
        drone_url: url.to_owned(),
        delivery_url: url.to_owned(),
        thirdparty_url: url.to_owned(),
        timeout_ms: 5000,
        service_token: SERVICE_TOKEN.to_owned().into(),
        ..DownstreamSettings::default()
    }
}

fn client_for(url: &str) -> Downstream {
    Downstream::new(&settings(url)).expect("downstream client")
}

#[track_caller]
fn assert_permanent(result: Result<impl std::fmt::Debug, CallError>, status: u16, code: &str) {
    match result {
        Err(CallError::Permanent {
            status: s, code: c, ..
        }) if s == Some(status) && c.as_deref() == Some(code) => {}
        other => panic!("expected Permanent {status} {code}, got {other:?}"),
    }
}

#[track_caller]
fn assert_transient(result: Result<impl std::fmt::Debug, CallError>) -> Option<Duration> {
    match result {
        Err(CallError::Transient { retry_after, .. }) => retry_after,
        other => panic!("expected Transient, got {other:?}"),
    }
}

async fn accounts_are_data_and_unknown_ones_are_permanent(backend: Backend) {
    let app = spawn_account(backend).await;
    let created = app
        .put("/api/accounts/acc-active", &json!({"name": "Contoso"}))
        .await;
    assert_eq!(created.status, 201, "{}", created.body);
    let created = app
        .put(
            "/api/accounts/acc-suspended",
            &json!({"name": "Fabrikam", "status": "suspended"}),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.body);
    let client = client_for(&app.address);

    let active = client.account("acc-active").await.expect("active account");
    assert_eq!(active.id, "acc-active");
    assert_eq!(active.name, "Contoso");
    assert_eq!(active.status, AccountStatus::Active);

    let suspended = client
        .account("acc-suspended")
        .await
        .expect("data, not an error");
    assert_eq!(suspended.status, AccountStatus::Suspended);

    assert_permanent(client.account("nobody").await, 404, "not-found");
    app.stop().await;
}

fn package(weight: f64) -> PackageUpsert {
    PackageUpsert {
        owner_id: "owner-1".into(),
        external_id: "client-pkg-7".into(),
        size: PackageSize::Small,
        weight,
        tag: Some("fragile".into()),
    }
}

async fn packages_are_put_idempotently_and_conflicts_are_permanent(backend: Backend) {
    let app = spawn_package(backend).await;
    let client = client_for(&app.address);

    let first = client
        .put_package("pkg-d1", &package(2.5))
        .await
        .expect("201");
    let again = client
        .put_package("pkg-d1", &package(2.5))
        .await
        .expect("200");
    assert_eq!(first, again, "a replayed PUT returns the same package");
    assert_eq!(first.status, PackageStatus::Registered);
    assert_eq!(first.weight, 2.5);

    assert_permanent(
        client.put_package("pkg-d1", &package(9.0)).await,
        409,
        "package-conflict",
    );

    client.delete_package("pkg-d1").await.expect("cancelled");
    client
        .delete_package("pkg-d1")
        .await
        .expect("cancelled again");
    let stored = app.get("/api/packages/pkg-d1").await;
    assert_eq!(stored.body["status"], "cancelled");
    client
        .delete_package("never-registered")
        .await
        .expect("nothing to undo");
    app.stop().await;
}

fn reservation(at: DateTime<Utc>, package_id: &str) -> DroneReservationRequest {
    DroneReservationRequest {
        pickup_time: at,
        pickup_location: "1 Main St".into(),
        drop_off_location: "2 Side St".into(),
        package_id: package_id.into(),
        size: PackageSize::Small,
        expedited: false,
        owner_id: Some("owner-1".into()),
    }
}

async fn drone_reservations_are_idempotent_and_a_full_fleet_is_transient(backend: Backend) {
    let app = spawn_drone_with(backend, |s| {
        s.fleet.small = 1;
        s.fleet.medium = 0;
        s.fleet.large = 0;
        s.reservations.retry_after_secs = 17;
    })
    .await;
    let client = client_for(&app.address);
    let at = pickup(24);

    let first = client
        .reserve_drone("d1", &reservation(at, "pkg-d1"))
        .await
        .expect("reserved");
    let again = client
        .reserve_drone("d1", &reservation(at, "pkg-d1"))
        .await
        .expect("same reservation");
    assert_eq!(first.delivery_id, "d1");
    assert_eq!(again.drone_id, first.drone_id, "same delivery, same drone");
    assert_eq!(again.window, first.window);

    // The only drone is taken for that window: retry later, when the service says.
    let full = client.reserve_drone("d2", &reservation(at, "pkg-d2")).await;
    let reason = match &full {
        Err(e) => e.to_string(),
        Ok(r) => panic!("the only drone was booked twice: {r:?}"),
    };
    assert_eq!(assert_transient(full), Some(Duration::from_secs(17)));
    assert!(reason.contains("no-drone-available"), "{reason}");

    client.release_drone("d1").await.expect("released");
    client.release_drone("d1").await.expect("released again");
    client
        .release_drone("never-reserved")
        .await
        .expect("nothing to undo");
    let freed = client
        .reserve_drone("d2", &reservation(at, "pkg-d2"))
        .await
        .expect("the released drone is free again");
    assert_eq!(freed.drone_id, first.drone_id);
    app.stop().await;
}

fn delivery(at: DateTime<Utc>) -> DeliveryUpsert {
    DeliveryUpsert {
        owner_id: "owner-1".into(),
        pickup_location: "1 Main St".into(),
        drop_off_location: "2 Side St".into(),
        pickup_time: at,
        deadline: "LinkedIn".into(),
        expedited: false,
        confirmation_required: ConfirmationType::Picture,
        package_id: "pkg-d1".into(),
        drone_id: "drone-001".into(),
    }
}

async fn deliveries_are_created_rescheduled_and_cancelled_idempotently(backend: Backend) {
    let app = spawn_delivery(backend).await;
    let client = client_for(&app.address);
    let at = pickup(24);

    client.put_delivery("d1", &delivery(at)).await.expect("201");
    client.put_delivery("d1", &delivery(at)).await.expect("204");

    let later = pickup(26);
    let moved = client
        .reschedule_delivery(
            "d1",
            &DeliveryPatch {
                pickup_time: Some(later),
                ..DeliveryPatch::default()
            },
        )
        .await
        .expect("rescheduled");
    assert_eq!(moved.pickup_time, later);
    assert_eq!(moved.stage, DeliveryStage::Rescheduled);

    client.cancel_delivery("d1").await.expect("cancelled");
    client.cancel_delivery("d1").await.expect("cancelled again");
    client
        .cancel_delivery("never-created")
        .await
        .expect("nothing to undo");
    assert_permanent(
        client
            .reschedule_delivery(
                "d1",
                &DeliveryPatch {
                    deadline: Some("tomorrow".into()),
                    ..DeliveryPatch::default()
                },
            )
            .await,
        409,
        "delivery-closed",
    );

    // A delivery that already happened cannot be undone, and retrying will not change that.
    client.put_delivery("d2", &delivery(at)).await.expect("201");
    let confirmed = app
        .post(
            "/api/deliveries/d2/confirmations",
            &json!({"confirmationType": "Picture"}),
        )
        .await;
    assert_eq!(confirmed.status, 201, "{}", confirmed.body);
    assert_permanent(client.cancel_delivery("d2").await, 409, "delivery-closed");
    app.stop().await;
}

async fn a_wrong_service_token_is_permanent(backend: Backend) {
    let account = spawn_account(backend).await;
    let package = spawn_package(backend).await;
    let client = Downstream::new(&DownstreamSettings {
        package_url: package.address.clone(),
        service_token: "not-the-service-token-at-all".to_owned().into(),
        ..settings(&account.address)
    })
    .expect("downstream client");
    assert_permanent(client.account("acc-1").await, 401, "unauthorized");
    // A compensation refused for the token is not "nothing to undo".
    assert_permanent(client.delete_package("pkg-1").await, 401, "unauthorized");
    account.stop().await;
    package.stop().await;
}

async fn a_misrouted_compensation_is_not_taken_as_done(backend: Backend) {
    // The Package URL points at the Account service: the 404 means "no such route", not "no such
    // package", and must not let the Supervisor believe the package was cancelled.
    let app = spawn_account(backend).await;
    let client = client_for(&app.address);
    assert_permanent(client.delete_package("pkg-1").await, 404, "route-not-found");
    app.stop().await;
}

#[tokio::test]
async fn nothing_listening_is_transient() {
    telemetry::init_for_tests();
    // Port 1 (tcpmux) is privileged and unused on the test machines: the connection is refused.
    let client = client_for("http://127.0.0.1:1");
    assert_eq!(assert_transient(client.account("acc-1").await), None);
    // A compensation that could not reach its service is retried, not taken as done.
    assert_transient(client.cancel_delivery("d1").await);
}

#[tokio::test]
async fn a_silent_server_is_transient_after_the_timeout() {
    telemetry::init_for_tests();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    // Accepts connections and keeps them open without ever answering.
    let server = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let client = Downstream::new(&DownstreamSettings {
        timeout_ms: 400,
        ..settings(&address)
    })
    .unwrap();
    let started = Instant::now();
    let result = client.account("acc-1").await;
    let elapsed = started.elapsed();
    let reason = match &result {
        Err(e) => e.to_string(),
        Ok(a) => panic!("a silent server produced {a:?}"),
    };
    assert_eq!(assert_transient(result), None);
    assert!(reason.contains("within 400 ms"), "{reason}");
    // Bounded by the client's own timeout, not by the server.
    assert!(
        elapsed >= Duration::from_millis(400) && elapsed < Duration::from_secs(4),
        "{elapsed:?}"
    );
    server.abort();
}

/// A server that answers every request with `response`, then closes the connection.
async fn canned_server(response: String) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let response = response.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = socket.write_all(response.as_bytes()).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    address
}

/// A client whose services all answer like [`canned_server`] with this response.
async fn canned_client(status: &str, headers: &[(&str, &str)], body: &str) -> Downstream {
    client_for(&canned_server(http_response(status, headers, body)).await)
}

/// What a failed call says (empty for a success).
fn reason_of<T>(result: &Result<T, CallError>) -> String {
    result
        .as_ref()
        .err()
        .map(ToString::to_string)
        .unwrap_or_default()
}

fn http_response(status: &str, headers: &[(&str, &str)], body: &str) -> String {
    let mut out = format!("HTTP/1.1 {status}\r\nconnection: close\r\n");
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str(&format!("content-length: {}\r\n\r\n{body}", body.len()));
    out
}

#[tokio::test]
async fn overload_with_retry_after_is_transient_with_that_delay() {
    telemetry::init_for_tests();
    let body = json!({
        "type": "https://drone-delivery.dev/problems/overloaded",
        "title": "Temporarily unavailable",
        "status": 503,
        "detail": "too busy right now",
        "code": "overloaded"
    })
    .to_string();
    let client = canned_client(
        "503 Service Unavailable",
        &[
            ("content-type", "application/problem+json"),
            ("retry-after", "2"),
        ],
        &body,
    )
    .await;
    let result = client.account("acc-1").await;
    let reason = reason_of(&result);
    assert_eq!(assert_transient(result), Some(Duration::from_secs(2)));
    assert!(
        reason.contains("overloaded") && reason.contains("too busy"),
        "{reason}"
    );
}

#[tokio::test]
async fn a_server_error_with_a_non_json_body_is_transient() {
    telemetry::init_for_tests();
    let client = canned_client(
        "500 Internal Server Error",
        &[("content-type", "text/html")],
        "<html><body>upstream exploded</body></html>",
    )
    .await;
    let result = client.release_drone("d1").await;
    let reason = reason_of(&result);
    assert_eq!(assert_transient(result), None);
    assert!(reason.contains("upstream exploded"), "{reason}");
}

#[tokio::test]
async fn a_success_that_does_not_decode_is_permanent() {
    telemetry::init_for_tests();
    let client = canned_client(
        "200 OK",
        &[("content-type", "application/json")],
        r#"{"id": "acc-1"}"#,
    )
    .await;
    match client.account("acc-1").await {
        Err(CallError::Permanent {
            reason,
            status: Some(200),
            code: None,
        }) => assert!(reason.contains("not Account"), "{reason}"),
        other => panic!("expected Permanent, got {other:?}"),
    }
}

/// The breaker of `service` in `client`.
fn breaker(client: &Downstream, service: &str) -> BreakerStatus {
    client
        .breakers()
        .into_iter()
        .find(|b| b.service == service)
        .unwrap_or_else(|| panic!("no breaker for {service}"))
}

#[track_caller]
fn assert_rejected(result: Result<impl std::fmt::Debug, CallError>) -> (String, Duration) {
    match result {
        Err(CallError::Rejected {
            reason,
            retry_after,
        }) => (reason, retry_after),
        other => panic!("expected Rejected, got {other:?}"),
    }
}

async fn a_failing_service_is_cut_off_by_its_breaker_until_a_probe_finds_it_back(backend: Backend) {
    telemetry::init_for_tests();
    let app = spawn_account(backend).await;
    let created = app
        .put("/api/accounts/acc-breaker", &json!({"name": "Contoso"}))
        .await;
    assert_eq!(created.status, 201, "{}", created.body);
    // The Account service answers 503 to every read, through the injector (its problem code is
    // `injected-fault`: a failure, not a capacity answer).
    let failing = vec![Fault {
        method: "GET",
        path_prefix: "/api/accounts/".into(),
        times: usize::MAX,
        kind: FaultKind::Status(503),
    }];
    let proxy = FaultProxy::start(&app.address, failing.clone()).await;
    let open_ms = 1500;
    let client = Downstream::new(&DownstreamSettings {
        breaker: BreakerSettings {
            min_calls: 6,
            open_ms,
            ..BreakerSettings::default()
        },
        ..settings(&proxy.url)
    })
    .unwrap();

    // Six failures in the window, all of them: the sixth opens the breaker.
    for _ in 0..6 {
        assert_transient(client.account("acc-breaker").await);
    }
    assert_eq!(proxy.hits(), 6, "every call so far reached the service");
    let status = breaker(&client, "account");
    assert_eq!(status.state, BreakerState::Open, "{status:?}");
    assert_eq!((status.calls_in_window, status.failures_in_window), (6, 6));
    assert!(status.next_probe_at.is_some(), "{status:?}");
    assert_eq!(breaker(&client, "package").state, BreakerState::Closed);

    // Open: refused at once, without reaching the service, with the time until the probe.
    let mut last_wait = Duration::ZERO;
    for _ in 0..10 {
        let started = Instant::now();
        let (reason, retry_after) = assert_rejected(client.account("acc-breaker").await);
        assert!(started.elapsed() < Duration::from_millis(100), "at once");
        assert!(
            reason.starts_with(
                "account circuit breaker is open (6 of 6 calls failed in 10 s); next probe in "
            ),
            "{reason}"
        );
        // Up to the open time, plus at most 150 ms of jitter (a tenth of it).
        assert!(
            retry_after <= Duration::from_millis(open_ms + 150),
            "{retry_after:?}"
        );
        last_wait = retry_after;
    }
    assert_eq!(proxy.hits(), 6, "no refused call reached the service");
    assert_eq!(breaker(&client, "account").rejected_total, 10);
    // Other services are not affected.
    let other = client.delete_package("pkg-1").await;
    assert!(
        !matches!(other, Err(CallError::Rejected { .. })),
        "{other:?}"
    );

    // After the open time one probe reaches the service; it still fails: open again.
    tokio::time::sleep(last_wait).await;
    assert_transient(client.account("acc-breaker").await);
    assert_eq!(proxy.hits(), 7, "exactly one probe reached the service");
    let (reason, retry_after) = assert_rejected(client.account("acc-breaker").await);
    assert!(reason.contains("(a probe call failed)"), "{reason}");
    assert!(
        retry_after > Duration::from_millis(open_ms / 2),
        "the whole open time again: {retry_after:?}"
    );
    assert_eq!(proxy.hits(), 7);

    // The service is back: after the open time the probes succeed and the breaker closes.
    proxy.set_faults(Vec::new());
    tokio::time::sleep(retry_after).await;
    for _ in 0..2 {
        let account = client.account("acc-breaker").await.expect("a probe");
        assert_eq!(account.id, "acc-breaker");
    }
    let status = breaker(&client, "account");
    assert_eq!(status.state, BreakerState::Closed, "{status:?}");
    assert_eq!(status.calls_in_window, 0, "closed with an empty window");
    for _ in 0..5 {
        client.account("acc-breaker").await.expect("closed again");
    }

    // A second outage opens it again, at the ratio: after the five successes above, five
    // failures (the fault injector's 500 counts as well) are half of the window's ten calls.
    proxy.set_faults(vec![Fault {
        kind: FaultKind::Status(500),
        ..failing[0].clone()
    }]);
    for _ in 0..5 {
        assert_transient(client.account("acc-breaker").await);
    }
    let (reason, _) = assert_rejected(client.account("acc-breaker").await);
    assert!(
        reason.contains("(5 of 10 calls failed in 10 s)"),
        "{reason}"
    );
    assert_eq!(breaker(&client, "account").rejected_total, 12);
    app.stop().await;
}

async fn a_full_fleet_never_opens_the_drone_breaker(backend: Backend) {
    let app = spawn_drone_with(backend, |s| {
        s.fleet.small = 1;
        s.fleet.medium = 0;
        s.fleet.large = 0;
        s.reservations.retry_after_secs = 17;
    })
    .await;
    let client = Downstream::new(&DownstreamSettings {
        breaker: BreakerSettings {
            min_calls: 5,
            ..BreakerSettings::default()
        },
        ..settings(&app.address)
    })
    .unwrap();
    let at = pickup(24);
    client
        .reserve_drone("d0", &reservation(at, "pkg-d0"))
        .await
        .expect("the only drone");
    // Overbooking: a healthy service says "full" (503 no-drone-available) again and again.
    for i in 1..=30 {
        let id = format!("d{i}");
        let full = client
            .reserve_drone(&id, &reservation(at, &format!("pkg-{id}")))
            .await;
        assert_eq!(
            assert_transient(full),
            Some(Duration::from_secs(17)),
            "call {i} is the service's answer, not refused by a breaker"
        );
    }
    let status = breaker(&client, "drone");
    assert_eq!(status.state, BreakerState::Closed, "{status:?}");
    assert_eq!((status.calls_in_window, status.failures_in_window), (31, 0));
    assert_eq!(status.rejected_total, 0);
    app.stop().await;
}

#[tokio::test]
async fn calls_beyond_the_cap_wait_then_are_refused_without_being_made() {
    telemetry::init_for_tests();
    // A server that accepts and never answers: every call holds its slot until its timeout.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    let server = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(socket);
        }
    });
    let client = Downstream::new(&DownstreamSettings {
        timeout_ms: 2000,
        max_concurrent_calls: 2,
        cap_wait_ms: 300,
        ..settings(&address)
    })
    .unwrap();
    let slow = |id: &'static str| {
        let client = client.clone();
        tokio::spawn(async move { client.account(id).await })
    };
    let (a, b) = (slow("a"), slow("b"));
    // Both slots taken (the two calls are in flight).
    integration_tests::eventually(Duration::from_secs(5), "two calls in flight", async || {
        let in_flight = breaker(&client, "account").in_flight;
        integration_tests::done_if(in_flight == 2, in_flight)
    })
    .await;
    let started = Instant::now();
    let (reason, retry_after) = assert_rejected(client.account("c").await);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_millis(1500),
        "waited the cap_wait_ms for a slot: {waited:?}"
    );
    assert!(
        reason.contains("account already has 2 calls in flight"),
        "{reason}"
    );
    assert!(
        retry_after >= Duration::from_millis(250) && retry_after <= Duration::from_secs(1),
        "{retry_after:?}"
    );
    // Another service has its own slots; its call is made (and times out like the others).
    assert_transient(client.delete_package("p").await);
    assert_transient(a.await.unwrap());
    assert_transient(b.await.unwrap());
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        3,
        "the refused call never reached the server"
    );
    let status = breaker(&client, "account");
    assert_eq!((status.in_flight, status.rejected_total), (0, 1));
    server.abort();
}
