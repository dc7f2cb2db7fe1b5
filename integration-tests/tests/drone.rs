//! Drone service against PostgreSQL and SQLite: reservations, double-booking, fleet and utilization.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step should panic

mod common;

use chrono::{DateTime, Duration, TimeZone, Utc};
use common::{assert_unauthorized, put_20_at_once, raw_json, reservations};
use contracts::{DroneReservation, Fleet, ReservationStatus, Utilization};
use futures::future::join_all;
use integration_tests::{both_backends, spawn_drone_with, Backend, Reply, TestApp};
use reqwest::Method;
use sea_orm::Database;
use serde_json::{json, Value};

both_backends!(
    same_delivery_gets_the_same_drone,
    concurrent_puts_of_one_delivery_create_once,
    concurrent_reservations_never_double_book,
    database_refuses_overlapping_windows,
    delete_frees_the_window,
    package_size_limits_the_drones,
    new_pickup_time_moves_the_reservation,
    fleet_and_utilization_report_the_truth,
    client_errors_are_problems,
);

fn pickup(hours_from_now: i64) -> DateTime<Utc> {
    // Whole minutes keep the windows easy to reason about.
    let t = Utc::now() + Duration::hours(hours_from_now);
    Utc.timestamp_opt(t.timestamp() / 60 * 60, 0)
        .single()
        .unwrap_or(t)
}

fn request(at: DateTime<Utc>, size: &str) -> Value {
    json!({
        "pickupTime": at.to_rfc3339(),
        "pickupLocation": "1 Main St",
        "dropOffLocation": "2 Side St",
        "packageId": "pkg-1",
        "size": size,
        "expedited": false,
        "ownerId": "owner-1"
    })
}

/// Reserves a drone for a `size` package of delivery `id`, picked up `at`.
async fn reserve(app: &TestApp, id: &str, at: DateTime<Utc>, size: &str) -> Reply {
    let path = format!("/api/dronedeliveries/{id}");
    app.put(&path, &request(at, size)).await
}

async fn fleet_of(backend: Backend, small: u32, medium: u32, large: u32) -> TestApp {
    spawn_drone_with(backend, |s| {
        s.fleet.small = small;
        s.fleet.medium = medium;
        s.fleet.large = large;
        s.reservations.window_minutes = 60;
        s.reservations.retry_after_secs = 7;
    })
    .await
}

async fn same_delivery_gets_the_same_drone(backend: Backend) {
    let app = fleet_of(backend, 5, 0, 0).await;
    let body = request(pickup(24), "Small");
    let first = app.put("/api/dronedeliveries/d1", &body).await;
    assert_eq!(first.status, 201, "{}", first.body);
    let second = app.put("/api/dronedeliveries/d1", &body).await;
    assert_eq!(second.status, 200);
    assert_eq!(first.body, second.body, "same body, same drone");
    let r = first.json::<DroneReservation>();
    assert_eq!(r.window.end - r.window.start, Duration::minutes(60));
    assert_eq!(app.get("/api/dronedeliveries/d1").await.body, first.body);
    app.stop().await;
}

async fn concurrent_puts_of_one_delivery_create_once(backend: Backend) {
    let app = fleet_of(backend, 10, 0, 0).await;
    let body = request(pickup(24), "Small");
    let replies = put_20_at_once(&app, "/api/dronedeliveries/race", &body, 200).await;
    let drones: std::collections::HashSet<String> = replies
        .iter()
        .map(|r| r.json::<DroneReservation>().drone_id)
        .collect();
    assert_eq!(drones.len(), 1, "one drone for one delivery");
    // Only one drone is held.
    let fleet = app.get("/api/drones").await.json::<Fleet>();
    assert_eq!(reservations(&fleet), 1);
    app.stop().await;
}

async fn concurrent_reservations_never_double_book(backend: Backend) {
    let app = fleet_of(backend, 3, 0, 0).await;
    let at = pickup(48);
    // 12 deliveries want overlapping windows on a fleet of 3.
    let replies = join_all((0..12).map(|i| {
        let mut body = request(at + Duration::minutes(i % 3 * 10), "Small");
        body["packageId"] = json!(format!("pkg-{i}"));
        let app = &app;
        async move {
            app.put(&format!("/api/dronedeliveries/dd-{i}"), &body)
                .await
        }
    }))
    .await;
    let ok: Vec<DroneReservation> = replies
        .iter()
        .filter(|r| r.status == 201)
        .map(|r| r.json())
        .collect();
    assert_eq!(ok.len(), 3, "exactly one reservation per drone");
    for r in replies.iter().filter(|r| r.status != 201) {
        let p = r.problem(503);
        assert_eq!(p.code, "no-drone-available");
        assert_eq!(r.header("retry-after"), Some("7"));
    }
    for drone in ["drone-001", "drone-002", "drone-003"] {
        let list: Vec<DroneReservation> = app
            .get(&format!("/api/drones/{drone}/reservations?status=active"))
            .await
            .json();
        for (i, a) in list.iter().enumerate() {
            for b in &list[i + 1..] {
                assert!(!a.window.overlaps(&b.window), "{drone} double-booked");
            }
        }
    }
    app.stop().await;
}

async fn database_refuses_overlapping_windows(backend: Backend) {
    use sea_orm::ConnectionTrait as _;
    let app = fleet_of(backend, 1, 0, 0).await;
    let r = reserve(&app, "first", pickup(24), "Small")
        .await
        .json::<DroneReservation>();
    // Bypass the service: write an overlapping active window for the same drone straight into
    // the database. The database itself must refuse it.
    let url =
        secrecy::ExposeSecret::expose_secret(&app.db.as_ref().unwrap().settings.url).to_owned();
    let db = Database::connect(url.as_str()).await.expect("connect");
    let start = r.window.start.timestamp_millis() + 60_000;
    let sql = format!(
        "INSERT INTO reservations (delivery_id, drone_id, window_start_ms, window_end_ms, status, \
         package_id, size, owner_id, pickup_location, drop_off_location, expedited, created_at, updated_at) \
         VALUES ('sneaky', '{}', {start}, {}, 'active', 'p', 'Small', NULL, 'a', 'b', false, \
         '2030-01-01T00:00:00Z', '2030-01-01T00:00:00Z')",
        r.drone_id,
        start + 600_000
    );
    let refused = db.execute_unprepared(&sql).await;
    assert!(refused.is_err(), "overlapping window was stored");
    // A released window may overlap; so may another drone's.
    let released = sql.replace("'active'", "'released'");
    db.execute_unprepared(&released)
        .await
        .expect("released rows may overlap");
    let _ = db.close().await;
    app.stop().await;
}

async fn delete_frees_the_window(backend: Backend) {
    let app = fleet_of(backend, 1, 0, 0).await;
    let at = pickup(24);
    assert_eq!(reserve(&app, "a", at, "Small").await.status, 201);
    let busy = reserve(&app, "b", at, "Small").await;
    assert_eq!(busy.problem(503).code, "no-drone-available");
    let released = app.delete("/api/dronedeliveries/a").await;
    assert_eq!(released.status, 200);
    assert_eq!(
        released.json::<DroneReservation>().status,
        ReservationStatus::Released
    );
    let again = app.delete("/api/dronedeliveries/a").await;
    assert_eq!(again.status, 200, "idempotent");
    assert_eq!(again.body, released.body);
    assert_eq!(reserve(&app, "b", at, "Small").await.status, 201);
    assert_eq!(
        app.delete("/api/dronedeliveries/nope")
            .await
            .problem(404)
            .code,
        "not-found"
    );

    // A released reservation is final: a late request for it (a retry that was still on its way
    // when the saga was compensated) does not take a drone again...
    app.delete("/api/dronedeliveries/b").await;
    assert_eq!(
        reserve(&app, "a", at, "Small").await.problem(409).code,
        "reservation-released"
    );
    // ...nor does one that arrives after the release of a reservation it had not made yet.
    assert_eq!(
        reserve(&app, "nope", at, "Small").await.problem(409).code,
        "reservation-released"
    );
    assert_eq!(app.get("/api/dronedeliveries/nope").await.status, 404);
    assert_eq!(
        app.delete("/api/dronedeliveries/nope")
            .await
            .problem(404)
            .code,
        "not-found",
        "releasing it again changes nothing"
    );
    // The drone is free for others all along.
    assert_eq!(reserve(&app, "c", at, "Small").await.status, 201);
    app.stop().await;
}

async fn package_size_limits_the_drones(backend: Backend) {
    let app = fleet_of(backend, 2, 0, 1).await;
    let at = pickup(24);
    let big = reserve(&app, "l1", at, "Large").await;
    assert_eq!(
        big.json::<DroneReservation>().drone_id,
        "drone-003",
        "only the large drone fits"
    );
    let big2 = reserve(&app, "l2", at, "Large").await;
    assert_eq!(big2.problem(503).code, "no-drone-available");
    // Small packages take small drones first, keeping large ones free.
    let small = reserve(&app, "s1", at + Duration::hours(5), "Small").await;
    assert_ne!(small.json::<DroneReservation>().drone_id, "drone-003");
    app.stop().await;
}

async fn new_pickup_time_moves_the_reservation(backend: Backend) {
    let app = fleet_of(backend, 2, 0, 0).await;
    let at = pickup(24);
    let first = reserve(&app, "m", at, "Small")
        .await
        .json::<DroneReservation>();
    let later = at + Duration::hours(3);
    let moved = reserve(&app, "m", later, "Small").await;
    assert_eq!(moved.status, 200);
    let moved = moved.json::<DroneReservation>();
    assert_eq!(moved.window.start, later);
    assert_eq!(
        moved.drone_id, first.drone_id,
        "kept its drone, which was free"
    );
    // The old window is free again for that drone: two more reservations at `at` fit.
    assert_eq!(reserve(&app, "x1", at, "Small").await.status, 201);
    assert_eq!(reserve(&app, "x2", at, "Small").await.status, 201);
    app.stop().await;
}

async fn fleet_and_utilization_report_the_truth(backend: Backend) {
    let app = fleet_of(backend, 2, 1, 1).await;
    // One reservation covering now, two in the future for the same owner and month.
    let now_window = Utc::now() - Duration::minutes(10);
    let mut current = request(now_window, "Small");
    current["ownerId"] = json!("owner-now");
    assert_eq!(
        app.put("/api/dronedeliveries/now", &current).await.status,
        201
    );
    let base = Utc
        .with_ymd_and_hms(2031, 3, 10, 9, 0, 0)
        .single()
        .unwrap_or_default();
    for (i, size) in ["Small", "Large"].iter().enumerate() {
        let mut body = request(base + Duration::days(i as i64), size);
        body["ownerId"] = json!("owner-u");
        assert_eq!(
            app.put(&format!("/api/dronedeliveries/u{i}"), &body)
                .await
                .status,
            201
        );
    }
    // A released one does not count.
    let mut released = request(base + Duration::days(5), "Small");
    released["ownerId"] = json!("owner-u");
    app.put("/api/dronedeliveries/u-released", &released).await;
    app.delete("/api/dronedeliveries/u-released").await;

    let fleet = app.get("/api/drones").await.json::<Fleet>();
    assert_eq!(fleet.size, 4);
    assert_eq!(fleet.busy_now, 1);
    let busy: Vec<_> = fleet
        .drones
        .iter()
        .filter(|d| d.current_reservation.is_some())
        .collect();
    assert_eq!(busy.len(), 1);
    assert_eq!(
        busy[0]
            .current_reservation
            .as_ref()
            .map(|r| r.delivery_id.as_str()),
        Some("now")
    );
    assert_eq!(reservations(&fleet), 3);

    let u = app
        .get("/api/utilization?ownerId=owner-u&year=2031&month=3")
        .await
        .json::<Utilization>();
    assert_eq!(
        (u.reservations, u.reserved_minutes, u.drones_used),
        (2, 120, 2)
    );
    let none = app
        .get("/api/utilization?ownerId=owner-u&year=2031&month=4")
        .await
        .json::<Utilization>();
    assert_eq!(none.reservations, 0);
    app.stop().await;
}

async fn client_errors_are_problems(backend: Backend) {
    let app = fleet_of(backend, 1, 0, 0).await;
    let r = app
        .put(
            "/api/dronedeliveries/e",
            &json!({"pickupTime": "tomorrow", "size": "Huge", "expedited": "yes"}),
        )
        .await;
    assert_eq!(
        r.bad_fields(),
        vec![
            "pickupTime",
            "pickupLocation",
            "dropOffLocation",
            "packageId",
            "size",
            "expedited"
        ]
    );
    assert_unauthorized(&app, Method::GET, "/api/drones", None, None).await;
    assert_eq!(
        app.get("/api/dronedeliveries/none").await.problem(404).code,
        "not-found"
    );
    assert_eq!(
        app.get("/api/drones/drone-999/reservations")
            .await
            .problem(404)
            .code,
        "not-found"
    );
    let r = app.get("/api/drones/drone-001/reservations?limit=0").await;
    assert_eq!(r.bad_fields(), vec!["limit"]);
    let r = app
        .get("/api/utilization?ownerId=o&year=2031&month=13")
        .await;
    assert_eq!(r.bad_fields(), vec!["month"]);
    let r = app.get("/api/utilization?year=2031").await;
    assert_eq!(r.problem(400).code, "invalid-query");
    let r = raw_json(&app, Method::PUT, "/api/dronedeliveries/e", b"[").await;
    assert_eq!(r.problem(400).code, "malformed-json");
    let doc = app.get("/openapi.json").await;
    assert!(doc.body["paths"]["/api/dronedeliveries/{deliveryId}"]["put"].is_object());
    app.stop().await;
}
