//! ThirdParty service (carrier legs) against PostgreSQL and SQLite.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step should panic

mod common;

use std::collections::BTreeMap;

use common::{assert_ready_with_docs, assert_unauthorized, metrics, put_20_at_once, raw_json};
use contracts::{Carrier, GeoPoint, LegStatus, ThirdPartyLeg};
use integration_tests::{both_backends, spawn_thirdparty, spawn_thirdparty_with, Backend, TestApp};
use reqwest::Method;
use serde_json::{json, Value};
use thirdparty::CarrierSettings;

both_backends!(
    put_books_then_is_idempotent,
    a_hand_over_leaves_the_drone_four_fifths_of_its_range,
    a_replay_keeps_its_carrier_whatever_capacity_is_left,
    put_with_different_content_conflicts,
    cancel_then_a_late_put_is_refused,
    delete_of_an_unknown_leg_refuses_a_later_put,
    a_full_day_is_503_with_retry_after_and_a_cancel_frees_a_slot,
    concurrent_puts_take_the_last_slots_exactly_once,
    concurrent_puts_of_one_leg_take_one_slot,
    a_route_no_carrier_serves_is_422,
    client_errors_are_problems,
    carriers_metrics_and_service_endpoints,
);

const SEATTLE: &str = "0,47.6062,-122.3321";
const TACOMA: &str = "0,47.2529,-122.4443";
const BELLEVUE: &str = "0,47.6101,-122.2015";
const NEW_YORK: &str = "0,40.7128,-74.0060";
const DAY_1: &str = "2031-03-01T10:00:00Z";
const DAY_2: &str = "2031-03-02T10:00:00Z";

fn leg_request(owner: &str, from: &str, to: &str, pickup: &str, weight: f64) -> Value {
    json!({
        "ownerId": owner,
        "pickupLocation": from,
        "dropOffLocation": to,
        "pickupTime": pickup,
        "size": "Medium",
        "weight": weight
    })
}

/// A local Seattle → Tacoma leg, the carrier going all the way.
fn local(owner: &str, pickup: &str) -> Value {
    leg_request(owner, SEATTLE, TACOMA, pickup, 5.0)
}

fn carrier(name: &str, capacity: u32, max_weight_kg: f64) -> CarrierSettings {
    CarrierSettings {
        name: name.into(),
        area_center: SEATTLE.into(),
        area_radius_km: 100.0,
        daily_capacity: capacity,
        max_weight_kg,
        speed_kmh: 60.0,
    }
}

/// A ThirdParty service with exactly these carriers and a `Retry-After` of 7 s.
async fn with_carriers(backend: Backend, carriers: &[(&str, CarrierSettings)]) -> TestApp {
    let carriers: BTreeMap<String, CarrierSettings> = carriers
        .iter()
        .map(|(id, c)| ((*id).to_owned(), c.clone()))
        .collect();
    spawn_thirdparty_with(backend, move |s| {
        s.carriers = carriers;
        s.legs.retry_after_secs = 7;
    })
    .await
}

fn path(id: &str) -> String {
    format!("/api/thirdparty/{id}")
}

async fn book(app: &TestApp, id: &str, body: &Value) -> ThirdPartyLeg {
    let r = app.put(&path(id), body).await;
    assert_eq!(r.status, 201, "{}", r.body);
    r.json()
}

async fn put_books_then_is_idempotent(backend: Backend) {
    let app = spawn_thirdparty(backend).await;
    let body = local("owner-1", DAY_1);
    let first = app.put(&path("del-1"), &body).await;
    assert_eq!(first.status, 201, "{}", first.body);
    let second = app.put(&path("del-1"), &body).await;
    assert_eq!(second.status, 200, "{}", second.body);
    assert_eq!(first.body, second.body, "the same leg for the same request");
    let got = app.get(&path("del-1")).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body, first.body);

    let leg = first.json::<ThirdPartyLeg>();
    assert_eq!(leg.delivery_id, "del-1");
    assert_eq!(leg.owner_id, "owner-1");
    // Of the default carriers, the one with the most capacity left (Cascade, 200 a day).
    assert_eq!(
        (leg.carrier_id.as_str(), leg.carrier_name.as_str()),
        ("cascade", "Cascade Courier Co.")
    );
    assert_eq!(leg.from_location, SEATTLE);
    assert_eq!(leg.to_location, TACOMA, "all the way: the drop-off as sent");
    assert!(leg.whole_route);
    let d = GeoPoint::parse(SEATTLE)
        .unwrap()
        .distance_km(GeoPoint::parse(TACOMA).unwrap());
    assert!((leg.distance_km - d).abs() < 0.001, "{}", leg.distance_km);
    assert_eq!(leg.pickup_time.to_rfc3339(), "2031-03-01T10:00:00+00:00");
    // The leg's 40 km at Cascade's 70 km/h, to the second.
    let secs = (leg.handover_time - leg.pickup_time).num_seconds();
    assert_eq!(secs, (leg.distance_km / 70.0 * 3600.0).round() as i64);
    assert_eq!(leg.status, LegStatus::Booked);
    assert_eq!(leg.created_at, leg.updated_at);
    app.stop().await;
}

async fn a_hand_over_leaves_the_drone_four_fifths_of_its_range(backend: Backend) {
    let app = spawn_thirdparty(backend).await;
    let mut body = local("owner-1", DAY_1);
    body["handoverWithinKm"] = json!(20);
    let leg = book(&app, "del-h", &body).await;
    assert!(!leg.whole_route);
    let (from, to, drop_off) = (
        GeoPoint::parse(SEATTLE).unwrap(),
        GeoPoint::parse(&leg.to_location).expect("a hand-over point"),
        GeoPoint::parse(TACOMA).unwrap(),
    );
    let d = from.distance_km(drop_off);
    assert!((leg.distance_km - (d - 16.0)).abs() < 0.001, "{leg:?}");
    assert!((to.distance_km(drop_off) - 16.0).abs() < 0.1, "{leg:?}");
    assert!((from.distance_km(to) - leg.distance_km).abs() < 0.1);
    assert_eq!(app.put(&path("del-h"), &body).await.status, 200);

    // The drones reach the drop-off from the pickup: the carrier hands over where it collects.
    let mut near = leg_request("owner-1", SEATTLE, BELLEVUE, DAY_1, 5.0);
    near["handoverWithinKm"] = json!(25);
    let leg = book(&app, "del-near", &near).await;
    assert_eq!(leg.distance_km, 0.0);
    assert_eq!(leg.handover_time, leg.pickup_time);
    assert_eq!(
        GeoPoint::parse(&leg.to_location),
        GeoPoint::parse(SEATTLE),
        "{leg:?}"
    );
    app.stop().await;
}

async fn a_replay_keeps_its_carrier_whatever_capacity_is_left(backend: Backend) {
    let app = with_carriers(
        backend,
        &[
            ("a-trucks", carrier("A", 3, 50.0)),
            ("b-vans", carrier("B", 2, 50.0)),
        ],
    )
    .await;
    // Most capacity left first (A: 3), then by id (A and B both at 2).
    let first = book(&app, "d1", &local("o", DAY_1)).await;
    assert_eq!(first.carrier_id, "a-trucks");
    let second = book(&app, "d2", &local("o", DAY_1)).await;
    assert_eq!(second.carrier_id, "a-trucks");
    // A has 1 left, B 2: B now.
    let third = book(&app, "d3", &local("o", DAY_1)).await;
    assert_eq!(third.carrier_id, "b-vans");
    // A replay is the leg as booked, even though B has more left now than A.
    let replay = app.put(&path("d1"), &local("o", DAY_1)).await;
    assert_eq!(replay.status, 200);
    assert_eq!(replay.json::<ThirdPartyLeg>(), first);
    app.stop().await;
}

async fn put_with_different_content_conflicts(backend: Backend) {
    let app = spawn_thirdparty(backend).await;
    let original = local("o1", DAY_1);
    let booked = app.put(&path("d1"), &original).await;
    assert_eq!(booked.status, 201);
    let changed = |field: &str, value: Value| {
        let mut b = original.clone();
        b[field] = value;
        b
    };
    for other in [
        changed("ownerId", json!("o2")),
        changed("pickupLocation", json!(BELLEVUE)),
        changed("dropOffLocation", json!(BELLEVUE)),
        changed("pickupTime", json!(DAY_2)),
        changed("size", json!("Large")),
        changed("weight", json!(5.5)),
        changed("handoverWithinKm", json!(10)),
    ] {
        let p = app.put(&path("d1"), &other).await.problem(409);
        assert_eq!(p.code, "leg-conflict", "{other}");
    }
    // The same instant written another way is the same request.
    let same = changed("pickupTime", json!("2031-03-01T12:00:00+02:00"));
    assert_eq!(app.put(&path("d1"), &same).await.status, 200);
    assert_eq!(app.get(&path("d1")).await.body, booked.body, "unchanged");
    app.stop().await;
}

async fn cancel_then_a_late_put_is_refused(backend: Backend) {
    let app = spawn_thirdparty(backend).await;
    let body = local("o1", DAY_1);
    let booked = book(&app, "d1", &body).await;
    let first = app.delete(&path("d1")).await;
    assert_eq!(first.status, 200, "{}", first.body);
    let cancelled = first.json::<ThirdPartyLeg>();
    assert_eq!(cancelled.status, LegStatus::Cancelled);
    assert_eq!(cancelled.carrier_id, booked.carrier_id);
    assert_eq!(cancelled.created_at, booked.created_at);
    assert!(cancelled.updated_at >= booked.updated_at);
    let second = app.delete(&path("d1")).await;
    assert_eq!(second.status, 200);
    assert_eq!(second.body, first.body, "cancelling again changes nothing");
    // A booking still on its way after the cancel (a retried saga step) books nothing.
    let p = app.put(&path("d1"), &body).await.problem(409);
    assert_eq!(p.code, "leg-cancelled");
    assert_eq!(app.get(&path("d1")).await.body, first.body);
    app.stop().await;
}

async fn delete_of_an_unknown_leg_refuses_a_later_put(backend: Backend) {
    let app = spawn_thirdparty(backend).await;
    // As Package answers: the unknown id is not found, and can never be booked afterwards.
    assert_eq!(
        app.delete(&path("late")).await.problem(404).code,
        "not-found"
    );
    let p = app
        .put(&path("late"), &local("o1", DAY_1))
        .await
        .problem(409);
    assert_eq!(p.code, "leg-cancelled");
    assert!(p
        .detail
        .unwrap_or_default()
        .contains("before it was booked"));
    assert_eq!(app.get(&path("late")).await.problem(404).code, "not-found");
    assert_eq!(
        app.delete(&path("late")).await.problem(404).code,
        "not-found",
        "cancelling it again changes nothing"
    );
    app.stop().await;
}

async fn a_full_day_is_503_with_retry_after_and_a_cancel_frees_a_slot(backend: Backend) {
    let app = with_carriers(backend, &[("solo", carrier("Solo", 2, 50.0))]).await;
    book(&app, "d1", &local("o", DAY_1)).await;
    book(&app, "d2", &local("o", DAY_1)).await;
    let full = app.put(&path("d3"), &local("o", DAY_1)).await;
    let p = full.problem(503);
    assert_eq!(p.code, "no-carrier-available");
    assert_eq!(full.header("retry-after"), Some("7"));
    assert!(p.detail.unwrap_or_default().contains("2031-03-01"));
    assert_eq!(
        app.get(&path("d3")).await.status,
        404,
        "a refusal keeps nothing"
    );
    // Capacity is per pickup day (UTC).
    book(&app, "d4", &local("o", DAY_2)).await;
    // A cancelled leg gives its slot back; cancelling it again does not give a second one.
    assert_eq!(app.delete(&path("d1")).await.status, 200);
    assert_eq!(app.delete(&path("d1")).await.status, 200);
    let retried = book(&app, "d3", &local("o", DAY_1)).await;
    assert_eq!(retried.carrier_id, "solo");
    assert_eq!(
        app.put(&path("d5"), &local("o", DAY_1))
            .await
            .problem(503)
            .code,
        "no-carrier-available"
    );
    app.stop().await;
}

async fn concurrent_puts_take_the_last_slots_exactly_once(backend: Backend) {
    let app = with_carriers(
        backend,
        &[
            ("one", carrier("One", 2, 50.0)),
            ("two", carrier("Two", 1, 50.0)),
        ],
    )
    .await;
    // Three slots on the day; twenty different deliveries race for them.
    let body = local("o", DAY_1);
    let replies = futures::future::join_all((0..20).map(|i| {
        let body = body.clone();
        let app = &app;
        async move { app.put(&path(&format!("race-{i}")), &body).await }
    }))
    .await;
    let statuses: Vec<u16> = replies.iter().map(|r| r.status.as_u16()).collect();
    let count = |s: u16| statuses.iter().filter(|x| **x == s).count();
    assert_eq!(count(201), 3, "exactly the three slots: {statuses:?}");
    assert_eq!(
        count(503),
        17,
        "every other one is told to retry: {statuses:?}"
    );
    let mut carriers: Vec<String> = replies
        .iter()
        .filter(|r| r.status == 201)
        .map(|r| r.json::<ThirdPartyLeg>().carrier_id)
        .collect();
    carriers.sort();
    assert_eq!(carriers, ["one", "one", "two"]);
    // A cancel frees one slot; two racing for it: exactly one wins.
    let winner = replies.iter().position(|r| r.status == 201).unwrap();
    assert_eq!(
        app.delete(&path(&format!("race-{winner}"))).await.status,
        200
    );
    let (last_a, last_b) = (path("last-a"), path("last-b"));
    let (a, b) = tokio::join!(app.put(&last_a, &body), app.put(&last_b, &body));
    let mut pair = [a.status.as_u16(), b.status.as_u16()];
    pair.sort();
    assert_eq!(pair, [201, 503], "{} / {}", a.body, b.body);
    app.stop().await;
}

async fn concurrent_puts_of_one_leg_take_one_slot(backend: Backend) {
    let app = with_carriers(backend, &[("solo", carrier("Solo", 2, 50.0))]).await;
    let body = local("o", DAY_1);
    let replies = put_20_at_once(&app, &path("same"), &body, 200).await;
    assert!(replies.iter().all(|r| r.body == replies[0].body), "one leg");
    // The other slot is still there, and only it.
    book(&app, "other", &body).await;
    assert_eq!(
        app.put(&path("third"), &body).await.problem(503).code,
        "no-carrier-available"
    );
    app.stop().await;
}

async fn a_route_no_carrier_serves_is_422(backend: Backend) {
    let app = spawn_thirdparty(backend).await;
    let far = leg_request("o", SEATTLE, NEW_YORK, DAY_1, 5.0);
    let r = app.put(&path("far"), &far).await;
    let p = r.problem(422);
    assert_eq!(p.code, "no-carrier-serves-route");
    let detail = p.detail.unwrap_or_default();
    assert!(
        detail.contains("cascade (Cascade Courier Co.): the drop-off is"),
        "{detail}"
    );
    assert!(detail.contains("olympic"), "{detail}");
    let fields: Vec<&str> = p.errors.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(fields, ["dropOffLocation"]);
    assert_eq!(app.get(&path("far")).await.status, 404, "nothing booked");
    // Heavier than any carrier takes (the heaviest takes 1000 kg).
    let heavy = leg_request("o", SEATTLE, TACOMA, DAY_1, 1500.0);
    let p = app.put(&path("heavy"), &heavy).await.problem(422);
    assert_eq!(p.code, "no-carrier-serves-route");
    assert_eq!(p.errors[0].field, "weight");
    assert!(p.errors[0].reason.contains("1000 kg"), "{:?}", p.errors);
    // A heavy package goes with the carrier that takes it, even with less capacity left.
    let leg = book(
        &app,
        "heavy-ok",
        &leg_request("o", SEATTLE, TACOMA, DAY_1, 600.0),
    )
    .await;
    assert_eq!(leg.carrier_id, "olympic");
    // Permanent: asking again gives the same answer.
    assert_eq!(app.put(&path("far"), &far).await.status, 422);
    app.stop().await;
}

async fn client_errors_are_problems(backend: Backend) {
    let app = spawn_thirdparty(backend).await;
    let body = local("o", DAY_1);
    // Missing token, wrong token.
    assert_unauthorized(&app, Method::GET, &path("x"), None, None).await;
    assert_unauthorized(&app, Method::PUT, &path("x"), Some(&body), None).await;
    assert_unauthorized(&app, Method::DELETE, &path("x"), None, Some("wrong-token")).await;
    assert_unauthorized(&app, Method::GET, "/api/carriers", None, None).await;
    assert_eq!(app.get(&path("x")).await.status, 404, "nothing was booked");
    // Missing fields, every one named.
    let r = app.put(&path("x"), &json!({})).await;
    assert_eq!(r.problem(400).code, "validation-failed");
    assert_eq!(
        r.bad_fields(),
        [
            "ownerId",
            "pickupLocation",
            "dropOffLocation",
            "pickupTime",
            "size",
            "weight"
        ]
    );
    // Bad values, every one named.
    let r = app
        .put(
            &path("x"),
            &json!({"ownerId": "a b", "pickupLocation": "1 Main St", "dropOffLocation": "0,95,0",
                "pickupTime": "tomorrow", "size": "Huge", "weight": -1, "handoverWithinKm": 0}),
        )
        .await;
    assert_eq!(
        r.bad_fields(),
        [
            "ownerId",
            "pickupLocation",
            "dropOffLocation",
            "pickupTime",
            "size",
            "weight",
            "handoverWithinKm"
        ]
    );
    // A numeric string weight is accepted; unknown fields are ignored.
    let mut lenient = body.clone();
    lenient["weight"] = json!("2.5");
    lenient["extra"] = json!(true);
    assert_eq!(app.put(&path("num"), &lenient).await.status, 201);
    // Malformed JSON, non-object body, wrong media type, bad id.
    let r = raw_json(&app, Method::PUT, &path("x"), b"{\"ownerId\":").await;
    assert_eq!(r.problem(400).code, "malformed-json");
    let r = raw_json(&app, Method::PUT, &path("x"), b"[1,2]").await;
    assert_eq!(r.bad_fields(), ["body"]);
    let r = app
        .call_raw(Method::PUT, &path("x"), "text/plain", b"{}".to_vec())
        .await;
    assert_eq!(r.problem(415).code, "unsupported-media-type");
    let r = app.put(&path("has%20space"), &body).await;
    assert_eq!(r.bad_fields(), ["deliveryId"]);
    assert_eq!(app.get(&path("x")).await.status, 404, "nothing was booked");
    app.stop().await;
}

async fn carriers_metrics_and_service_endpoints(backend: Backend) {
    let app = spawn_thirdparty(backend).await;
    let carriers: Vec<Carrier> = app.get("/api/carriers").await.json();
    let ids: Vec<&str> = carriers.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["cascade", "olympic", "rainier"]);
    let capacities: Vec<u32> = carriers.iter().map(|c| c.daily_capacity).collect();
    assert_eq!(capacities, [200, 50, 100]);
    let seattle = GeoPoint::parse("0,47.6,-122.3").unwrap();
    for c in &carriers {
        let center = GeoPoint::parse(&c.area_center).expect("a point");
        assert!(center.distance_km(seattle) < c.area_radius_km, "{c:?}");
        assert!(c.max_weight_kg > 0.0 && c.speed_kmh > 0.0, "{c:?}");
    }

    book(&app, "m1", &local("o", DAY_1)).await;
    assert_eq!(app.put(&path("m1"), &local("o", DAY_1)).await.status, 200);
    assert_eq!(app.delete(&path("m1")).await.status, 200);
    assert_eq!(app.put(&path("m1"), &local("o", DAY_1)).await.status, 409);
    let far = leg_request("o", SEATTLE, NEW_YORK, DAY_1, 5.0);
    assert_eq!(app.put(&path("m2"), &far).await.status, 422);
    let text = metrics(&app).await;
    let value = |outcome: &str| -> f64 {
        text.lines()
            .find(|l| {
                l.starts_with("thirdparty_legs_total{")
                    && l.contains(&format!("outcome=\"{outcome}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {outcome} in\n{text}"))
    };
    assert_eq!(value("booked"), 1.0);
    assert_eq!(value("replayed"), 1.0);
    assert_eq!(value("cancelled"), 1.0);
    assert_eq!(value("refused"), 1.0);
    assert_eq!(value("no_route"), 1.0);
    assert_eq!(value("no_capacity"), 0.0);

    let doc = assert_ready_with_docs(&app).await;
    let paths = &doc.body["paths"];
    for method in ["get", "put", "delete"] {
        assert!(
            paths["/api/thirdparty/{deliveryId}"][method].is_object(),
            "{method} documented"
        );
    }
    assert!(paths["/api/carriers"]["get"].is_object());
    for schema in ["LegRequest", "ThirdPartyLeg", "Carrier"] {
        assert!(
            doc.body["components"]["schemas"][schema].is_object(),
            "{schema}"
        );
    }
    app.stop().await;
}
