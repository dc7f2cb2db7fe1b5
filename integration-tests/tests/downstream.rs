//! The Scheduler's typed clients (`downstream`) against the real domain services, and against tiny
//! local servers that misbehave (silent, overloaded, failing) to check how failures are classified.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step should panic

use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use contracts::{
    AccountStatus, ConfirmationType, DeliveryPatch, DeliveryStage, DeliveryUpsert,
    DroneReservationRequest, PackageSize, PackageStatus, PackageUpsert,
};
use downstream::{CallError, Downstream, DownstreamSettings};
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
);

/// Settings whose four services all live at `url` (most tests start only the one they need).
fn settings(url: &str) -> DownstreamSettings {
    DownstreamSettings {
        account_url: url.to_owned(),
        package_url: url.to_owned(),
        drone_url: url.to_owned(),
        delivery_url: url.to_owned(),
        timeout_ms: 5000,
        service_token: SERVICE_TOKEN.to_owned().into(),
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

/// A pickup time in whole minutes, `hours` from now.
fn pickup(hours: i64) -> DateTime<Utc> {
    let t = Utc::now() + chrono::Duration::hours(hours);
    Utc.timestamp_opt(t.timestamp() / 60 * 60, 0)
        .single()
        .unwrap_or(t)
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
