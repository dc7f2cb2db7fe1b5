//! Drone service against PostgreSQL and SQLite: reservations, double-booking, fleet and utilization.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step should panic

mod common;

use chrono::{DateTime, Duration, TimeZone, Utc};
use common::{assert_unauthorized, pickup, put_20_at_once, raw_json, reservations};
use contracts::{
    BatchAnswer, BatchResult, DroneReservation, Fleet, ReservationStatus, Utilization,
};
use futures::future::join_all;
use integration_tests::wait::{done_if, eventually};
use integration_tests::{both_backends, spawn, spawn_drone_with, Backend, Reply, TestApp};
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
    batch_answers_each_item_as_its_put_would,
    duplicate_ids_in_a_batch_answer_as_repeats,
    batch_of_overlapping_windows_takes_only_the_free_drones,
    concurrent_batches_and_puts_create_each_reservation_once,
    concurrent_batches_and_puts_never_double_book,
    batch_envelope_is_checked_and_batch_stays_an_id,
    a_batch_sees_a_reservation_longer_than_its_windows,
);

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
    let sql = insert_sql("sneaky", &r.drone_id, start, start + 600_000);
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

/// Posts `items` as one batch; asserts the batch as a whole answered `200` with one result per
/// item, in order; the results.
async fn batch(app: &TestApp, items: &[(&str, Value)]) -> Vec<BatchResult> {
    let body = json!({
        "items": items
            .iter()
            .map(|(id, body)| json!({"id": id, "body": body}))
            .collect::<Vec<_>>()
    });
    let reply = app.post("/api/dronedeliveries/batch", &body).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let results = reply.json::<BatchAnswer>().results;
    let ids: Vec<&str> = results.iter().map(|r| r.id.as_str()).collect();
    let sent: Vec<&str> = items.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, sent, "one result per item, in order");
    results
}

/// The reservation a batch result carries, asserting its status.
fn reserved(result: &BatchResult, status: u16) -> DroneReservation {
    assert_eq!(result.status, status, "{}: {}", result.id, result.body);
    assert_eq!(result.retry_after, None);
    serde_json::from_value(result.body.clone())
        .unwrap_or_else(|e| panic!("{}: {e}: {}", result.id, result.body))
}

/// Asserts a batch result refused its item as the single call `single` did: the same status,
/// `Retry-After`, and problem (code, detail, the fields named).
fn same_refusal(result: &BatchResult, single: &Reply) {
    let problem = single.problem(single.status.as_u16());
    assert_eq!(
        result.status,
        single.status.as_u16(),
        "{}: {}",
        result.id,
        result.body
    );
    assert_eq!(
        result.retry_after.map(|s| s.to_string()).as_deref(),
        single.header("retry-after"),
        "{}",
        result.id
    );
    let body: contracts::Problem = serde_json::from_value(result.body.clone())
        .unwrap_or_else(|e| panic!("{}: {e}: {}", result.id, result.body));
    assert_eq!(
        (&body.code, &body.detail, &body.errors, body.status),
        (
            &problem.code,
            &problem.detail,
            &problem.errors,
            problem.status
        ),
        "{}",
        result.id
    );
}

/// Asserts no drone of `drones` holds two overlapping active windows.
async fn assert_never_double_booked(app: &TestApp, drones: impl IntoIterator<Item = String>) {
    for drone in drones {
        let list: Vec<DroneReservation> = app
            .get(&format!(
                "/api/drones/{drone}/reservations?status=active&limit=1000"
            ))
            .await
            .json();
        for (i, a) in list.iter().enumerate() {
            for b in &list[i + 1..] {
                assert!(
                    !a.window.overlaps(&b.window),
                    "{drone} double-booked: {} and {}",
                    a.delivery_id,
                    b.delivery_id
                );
            }
        }
    }
}

fn drone_ids(n: usize) -> impl Iterator<Item = String> {
    (1..=n).map(|i| format!("drone-{i:03}"))
}

async fn batch_answers_each_item_as_its_put_would(backend: Backend) {
    let app = fleet_of(backend, 2, 0, 1).await;
    let at = pickup(24);
    let known = reserve(&app, "known", at + Duration::hours(5), "Small").await;
    assert_eq!(known.status, 201);
    let moved_from = reserve(&app, "moved", at + Duration::hours(10), "Small")
        .await
        .json::<DroneReservation>();
    assert_eq!(
        reserve(&app, "released", at + Duration::hours(20), "Small")
            .await
            .status,
        201
    );
    assert_eq!(
        app.delete("/api/dronedeliveries/released").await.status,
        200
    );
    // Released before it was ever reserved: a tombstone.
    assert_eq!(app.delete("/api/dronedeliveries/tomb").await.status, 404);
    // The only large drone is busy at `at`.
    assert_eq!(reserve(&app, "big", at, "Large").await.status, 201);

    let bad = json!({"pickupTime": "tomorrow", "size": "Huge", "expedited": "yes"});
    let items = [
        ("new", request(at, "Small")),
        ("known", request(at + Duration::hours(5), "Small")),
        ("moved", request(at + Duration::hours(12), "Small")),
        ("released", request(at + Duration::hours(20), "Small")),
        ("tomb", request(at, "Small")),
        ("big2", request(at, "Large")),
        ("bad", bad.clone()),
        ("bad id", request(at, "Small")),
        ("new2", request(at, "Small")),
    ];
    let results = batch(&app, &items).await;

    let new = reserved(&results[0], 201);
    assert_eq!(
        app.get("/api/dronedeliveries/new").await.body,
        results[0].body
    );
    assert_eq!(reserved(&results[1], 200), known.json::<DroneReservation>());
    let moved = reserved(&results[2], 200);
    assert_eq!(moved.window.start, at + Duration::hours(12));
    assert_eq!(
        moved.drone_id, moved_from.drone_id,
        "kept its drone, which was free"
    );
    for (i, code) in [
        (3, "reservation-released"),
        (4, "reservation-released"),
        (5, "no-drone-available"),
        (6, "validation-failed"),
    ] {
        let (id, body) = &items[i];
        let single = app.put(&format!("/api/dronedeliveries/{id}"), body).await;
        same_refusal(&results[i], &single);
        assert_eq!(results[i].body["code"], code, "{id}");
    }
    assert_eq!(results[5].retry_after, Some(7));
    assert_eq!(results[7].status, 400);
    assert_eq!(results[7].body["errors"][0]["field"], "id");
    let new2 = reserved(&results[8], 201);
    assert_ne!(
        new.drone_id, new2.drone_id,
        "two windows at once, two drones"
    );
    assert!(
        ![new.drone_id.as_str(), new2.drone_id.as_str()].contains(&"drone-003"),
        "small packages leave the large drone alone"
    );

    // The valid items are applied, the refused ones are not; a replay finds what the batch made.
    assert_eq!(
        app.get("/api/dronedeliveries/released")
            .await
            .json::<DroneReservation>()
            .status,
        ReservationStatus::Released
    );
    for id in ["bad", "big2", "tomb"] {
        assert_eq!(
            app.get(&format!("/api/dronedeliveries/{id}")).await.status,
            404,
            "{id}"
        );
    }
    let again = reserve(&app, "new", at, "Small").await;
    assert_eq!(again.status, 200);
    assert_eq!(again.body, results[0].body);
    let fleet = app.get("/api/drones").await.json::<Fleet>();
    assert_eq!(reservations(&fleet), 5, "known, moved, big, new, new2");
    // The whole batch again: every item answered as a replay would be.
    let replay = batch(&app, &items).await;
    let statuses: Vec<u16> = replay.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 200, 200, 409, 409, 503, 400, 400, 200]);
    for i in [0, 1, 2, 8] {
        assert_eq!(replay[i].body, results[i].body, "{}", items[i].0);
    }
    assert_never_double_booked(&app, drone_ids(3)).await;
    app.stop().await;
}

async fn duplicate_ids_in_a_batch_answer_as_repeats(backend: Backend) {
    let app = fleet_of(backend, 3, 0, 0).await;
    let at = pickup(24);
    let results = batch(
        &app,
        &[
            ("d", request(at, "Small")),
            ("d", request(at, "Small")),
            ("e", request(at, "Small")),
            ("e", request(at + Duration::hours(3), "Small")),
            ("d", request(at, "Small")),
            ("f", json!({"size": "Small"})),
            ("f", request(at, "Small")),
        ],
    )
    .await;
    let d = reserved(&results[0], 201);
    assert_eq!(reserved(&results[1], 200), d, "a repeat finds the first");
    assert_eq!(reserved(&results[4], 200), d);
    let e = reserved(&results[2], 201);
    let e_moved = reserved(&results[3], 200);
    assert_eq!(
        e_moved.window.start,
        at + Duration::hours(3),
        "acts after the first"
    );
    assert_eq!(e_moved.drone_id, e.drone_id);
    assert_eq!(results[5].status, 400, "an invalid occurrence does not act");
    reserved(&results[6], 201);
    assert_eq!(
        app.get("/api/dronedeliveries/e")
            .await
            .json::<DroneReservation>(),
        e_moved
    );
    let fleet = app.get("/api/drones").await.json::<Fleet>();
    assert_eq!(reservations(&fleet), 3, "d, e and f, once each");
    app.stop().await;
}

async fn batch_of_overlapping_windows_takes_only_the_free_drones(backend: Backend) {
    // Two small drones (which cannot carry a Medium package) and three medium ones.
    let app = fleet_of(backend, 2, 3, 0).await;
    let at = pickup(24);
    let held = reserve(&app, "held", at, "Medium")
        .await
        .json::<DroneReservation>();
    let items: Vec<(String, Value)> = (0..5)
        .map(|i| {
            let mut body = request(at + Duration::minutes(5 * i), "Medium");
            body["packageId"] = json!(format!("pkg-{i}"));
            (format!("m{i}"), body)
        })
        .collect();
    let items: Vec<(&str, Value)> = items
        .iter()
        .map(|(id, b)| (id.as_str(), b.clone()))
        .collect();
    let results = batch(&app, &items).await;
    let statuses: Vec<u16> = results.iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        [201, 201, 503, 503, 503],
        "as the same PUTs one after another"
    );
    let a = reserved(&results[0], 201);
    let b = reserved(&results[1], 201);
    let mut drones = vec![held.drone_id, a.drone_id, b.drone_id];
    drones.sort();
    assert_eq!(
        drones,
        ["drone-003", "drone-004", "drone-005"],
        "one each, medium only"
    );
    for r in &results[2..] {
        assert_eq!(r.retry_after, Some(7));
        assert_eq!(r.body["code"], "no-drone-available");
    }
    for r in &results[2..] {
        let single = app
            .put(
                &format!("/api/dronedeliveries/{}", r.id),
                &items
                    .iter()
                    .find(|(id, _)| *id == r.id)
                    .map(|(_, b)| b.clone()),
            )
            .await;
        same_refusal(r, &single);
    }
    assert_never_double_booked(&app, drone_ids(5)).await;
    let fleet = app.get("/api/drones").await.json::<Fleet>();
    assert_eq!(reservations(&fleet), 3);
    app.stop().await;
}

/// Every answer of `replies` (batch results and single PUTs) per delivery id: `(status, body)`.
type AnswersById = std::collections::BTreeMap<String, Vec<(u16, Value)>>;

/// Sends `batches` (each a list of `(id, body)`) and a single PUT for each of `singles`, all at
/// once; every answer, by delivery id. No request as a whole fails.
async fn batches_and_puts_at_once(
    app: &TestApp,
    batches: &[Vec<(String, Value)>],
    singles: &[(String, Value)],
) -> AnswersById {
    let batch_calls = join_all(batches.iter().map(|items| {
        let items: Vec<(&str, Value)> = items
            .iter()
            .map(|(id, b)| (id.as_str(), b.clone()))
            .collect();
        async move { batch(app, &items).await }
    }));
    let single_calls = join_all(singles.iter().map(|(id, body)| async move {
        (
            id.clone(),
            app.put(&format!("/api/dronedeliveries/{id}"), body).await,
        )
    }));
    let (batch_results, single_replies) = futures::join!(batch_calls, single_calls);
    let mut by_id = AnswersById::new();
    for r in batch_results.into_iter().flatten() {
        by_id.entry(r.id).or_default().push((r.status, r.body));
    }
    for (id, reply) in single_replies {
        by_id
            .entry(id)
            .or_default()
            .push((reply.status.as_u16(), reply.body));
    }
    by_id
}

/// `items` rotated left by `by`.
fn rotated<T: Clone>(items: &[T], by: usize) -> Vec<T> {
    let mut out = items.to_vec();
    out.rotate_left(by % items.len().max(1));
    out
}

async fn concurrent_batches_and_puts_create_each_reservation_once(backend: Backend) {
    let app = fleet_of(backend, 3, 0, 0).await;
    let at = pickup(24);
    // Twenty deliveries two hours apart: each is made once, whoever asks first.
    let items: Vec<(String, Value)> = (0..20)
        .map(|i| {
            (
                format!("c{i}"),
                request(at + Duration::hours(2 * i), "Small"),
            )
        })
        .collect();
    let mut reversed = items.clone();
    reversed.reverse();
    let batches = [
        items.clone(),
        reversed,
        rotated(&items, 7),
        rotated(&items, 13),
    ];
    let by_id = batches_and_puts_at_once(&app, &batches, &items).await;
    assert_eq!(by_id.len(), 20);
    for (id, answers) in &by_id {
        assert_eq!(answers.len(), 5, "{id}");
        let created: Vec<&Value> = answers
            .iter()
            .filter(|(s, _)| *s == 201)
            .map(|(_, b)| b)
            .collect();
        assert_eq!(created.len(), 1, "{id} made exactly once: {answers:?}");
        for (status, body) in answers.iter().filter(|(s, _)| *s != 201) {
            assert_eq!(*status, 200, "{id}: {body}");
            assert_eq!(body, created[0], "{id}: every other call finds it");
        }
    }
    let fleet = app.get("/api/drones").await.json::<Fleet>();
    assert_eq!(reservations(&fleet), 20);
    assert_never_double_booked(&app, drone_ids(3)).await;
    app.stop().await;
}

async fn concurrent_batches_and_puts_never_double_book(backend: Backend) {
    let app = fleet_of(backend, 3, 0, 0).await;
    let at = pickup(48);
    // 12 deliveries want overlapping windows on a fleet of 3.
    let items: Vec<(String, Value)> = (0..12)
        .map(|i| {
            let mut body = request(at + Duration::minutes(i % 3 * 10), "Small");
            body["packageId"] = json!(format!("pkg-{i}"));
            (format!("dd-{i}"), body)
        })
        .collect();
    let batches = [
        rotated(&items, 0)[..8].to_vec(),
        rotated(&items, 4)[..8].to_vec(),
        rotated(&items, 8)[..8].to_vec(),
    ];
    let by_id = batches_and_puts_at_once(&app, &batches, &items).await;
    let mut made = 0;
    for (id, answers) in &by_id {
        let created: Vec<&Value> = answers
            .iter()
            .filter(|(s, _)| *s == 201)
            .map(|(_, b)| b)
            .collect();
        assert!(created.len() <= 1, "{id} made more than once: {answers:?}");
        made += created.len();
        for (status, body) in answers.iter().filter(|(s, _)| *s != 201) {
            if let Some(first) = created.first() {
                assert_eq!(
                    (*status, body),
                    (200, *first),
                    "{id}: a later call finds it"
                );
            } else {
                assert_eq!(*status, 503, "{id}: {body}");
                assert_eq!(body["code"], "no-drone-available", "{id}");
            }
        }
    }
    assert_eq!(made, 3, "exactly one reservation per drone");
    assert_never_double_booked(&app, drone_ids(3)).await;
    app.stop().await;
}

async fn batch_envelope_is_checked_and_batch_stays_an_id(backend: Backend) {
    let app = fleet_of(backend, 1, 0, 0).await;
    let at = pickup(24);
    for (body, field) in [
        (json!({}), "items"),
        (json!({"items": []}), "items"),
        (json!({"items": [{"id": "a"}]}), "items[0].body"),
    ] {
        let r = app.post("/api/dronedeliveries/batch", &body).await;
        assert_eq!(r.bad_fields(), vec![field], "{body}");
    }
    let r = raw_json(&app, Method::POST, "/api/dronedeliveries/batch", b"[").await;
    assert_eq!(r.problem(400).code, "malformed-json");
    let one = json!({"items": [{"id": "a", "body": request(at, "Small")}]});
    assert_unauthorized(
        &app,
        Method::POST,
        "/api/dronedeliveries/batch",
        Some(&one),
        None,
    )
    .await;
    assert_eq!(
        app.get("/api/dronedeliveries/a").await.status,
        404,
        "nothing applied"
    );
    // Only POST is the batch: the delivery "batch" is reserved, read and released as any other.
    assert_eq!(app.get("/api/dronedeliveries/batch").await.status, 404);
    let put = reserve(&app, "batch", at, "Small").await;
    assert_eq!(put.status, 201, "{}", put.body);
    assert_eq!(app.get("/api/dronedeliveries/batch").await.body, put.body);
    assert_eq!(app.delete("/api/dronedeliveries/batch").await.status, 200);
    let doc = app.get("/openapi.json").await;
    let post = &doc.body["paths"]["/api/dronedeliveries/batch"]["post"];
    assert!(post["responses"]["200"].is_object(), "{post}");
    app.stop().await;
}

/// An active reservation written straight into the database, bypassing the service.
fn insert_sql(delivery_id: &str, drone_id: &str, start_ms: i64, end_ms: i64) -> String {
    format!(
        "INSERT INTO reservations (delivery_id, drone_id, window_start_ms, window_end_ms, status, \
         package_id, size, owner_id, pickup_location, drop_off_location, expedited, created_at, updated_at) \
         VALUES ('{delivery_id}', '{drone_id}', {start_ms}, {end_ms}, 'active', 'p', 'Small', NULL, 'a', 'b', false, \
         '2030-01-01T00:00:00Z', '2030-01-01T00:00:00Z')"
    )
}

/// Two writers that each wait on the other's uncommitted reservation: PostgreSQL fails one of
/// them as deadlocked. When that is the batch's multi-row insert, nothing of it was written, and
/// its items are answered through the single path instead of the batch failing. (PostgreSQL
/// only: SQLite has one writer and no multi-row path.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadlocked_batch_insert_gives_way_to_the_single_path() {
    use sea_orm::{ConnectionTrait as _, TransactionTrait as _};
    let app = fleet_of(Backend::Postgres, 1, 0, 0).await;
    let url =
        secrecy::ExposeSecret::expose_secret(&app.db.as_ref().unwrap().settings.url).to_owned();
    let db = Database::connect(url.as_str()).await.expect("connect");
    let at = pickup(24);
    let (w1, w2) = (at, at + Duration::hours(2));
    let ms = |t: DateTime<Utc>| t.timestamp_millis();
    // Another writer holds, uncommitted, drone-001 during the second window...
    let other = db.begin().await.expect("begin");
    other
        .execute_unprepared(&insert_sql(
            "t1",
            "drone-001",
            ms(w2) + 60_000,
            ms(w2) + 120_000,
        ))
        .await
        .expect("t1");
    let items = [("x", request(w1, "Small")), ("y", request(w2, "Small"))];
    let (results, ()) = futures::join!(batch(&app, &items), async {
        // ...the batch inserts x on drone-001 and waits on that writer for y...
        eventually(Duration::seconds(10).to_std().unwrap(), "the batch insert waiting", async || {
            let waiting = db
                .query_one(sea_orm::Statement::from_string(
                    sea_orm::DbBackend::Postgres,
                    "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() \
                     AND wait_event_type = 'Lock' AND query LIKE '%FROM unnest($1::text[], $2::text[]%'",
                ))
                .await
                .expect("pg_stat_activity")
                .map(|row| row.try_get::<i64>("", "n").unwrap_or(0))
                .unwrap_or(0);
            done_if(waiting > 0, waiting)
        })
        .await;
        // ...and the writer then wants drone-001 during the first window: each waits on the
        // other. The batch waited first, so its deadlock check runs first and fails it.
        let second = other
            .execute_unprepared(&insert_sql(
                "t2",
                "drone-001",
                ms(w1) + 60_000,
                ms(w1) + 120_000,
            ))
            .await;
        assert!(
            second.is_ok(),
            "the batch's insert was the victim: {second:?}"
        );
        // The writer gives up; the batch's items, now one by one, find drone-001 free.
        other.rollback().await.expect("rollback");
    });
    let x = reserved(&results[0], 201);
    let y = reserved(&results[1], 201);
    assert_eq!(
        (x.drone_id.as_str(), y.drone_id.as_str()),
        ("drone-001", "drone-001")
    );
    assert_never_double_booked(&app, drone_ids(1)).await;
    let _ = db.close().await;
    app.stop().await;
}

/// A reservation made under longer windows (the setting was lowered since) still holds its
/// drone against a batch, whose windows are shorter: the batch answers as the same PUTs one
/// after another.
async fn a_batch_sees_a_reservation_longer_than_its_windows(backend: Backend) {
    let long = spawn_drone_with(backend, |s| {
        s.fleet.small = 2;
        s.fleet.medium = 0;
        s.fleet.large = 0;
        s.reservations.window_minutes = 600;
        s.reservations.retry_after_secs = 7;
    })
    .await;
    let at = pickup(24);
    let held = reserve(&long, "long", at, "Small")
        .await
        .json::<DroneReservation>();
    assert_eq!(held.window.end - held.window.start, Duration::hours(10));
    // The same database, now with one-hour windows.
    let database = long.db.as_ref().expect("a database").settings.clone();
    let short = spawn::<drone::Application>(
        drone::Settings {
            http: integration_tests::test_http(),
            database,
            auth: integration_tests::test_auth(),
            fleet: drone::FleetSettings {
                small: 2,
                medium: 0,
                large: 0,
            },
            reservations: drone::ReservationSettings {
                window_minutes: 60,
                retry_after_secs: 7,
                ..Default::default()
            },
            ..Default::default()
        },
        None,
    )
    .await;
    let inside = at + Duration::hours(5);
    let items = [
        ("b1", request(inside, "Small")),
        ("b2", request(inside, "Small")),
    ];
    let results = batch(&short, &items).await;
    let b1 = reserved(&results[0], 201);
    assert_ne!(
        b1.drone_id, held.drone_id,
        "the long reservation holds its drone"
    );
    assert_eq!(results[1].status, 503, "{}", results[1].body);
    assert_eq!(results[1].body["code"], "no-drone-available");
    let single = short.put("/api/dronedeliveries/b2", &items[1].1).await;
    same_refusal(&results[1], &single);
    assert_never_double_booked(&short, drone_ids(2)).await;
    short.stop().await;
    long.stop().await;
}
