//! The third-party leg end to end: bookings through Ingestion, the saga's ArrangeThirdParty step
//! against the real ThirdParty service (and the real Drone, Delivery, Package services), the
//! Supervisor's compensation cancelling the leg, and the client's tracking showing it, on
//! PostgreSQL and SQLite.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step should panic

mod common;

use std::time::Duration;

use common::{refusing, stop, stop_with_supervisor, suite_with_scheduler, ACTIVE};
use contracts::{DroneReservation, ThirdPartyLeg};
use integration_tests::{
    both_backends, eventually, spawn_supervisor, Backend, Suite, SuiteFaults, TestApp,
};
use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

both_backends!(
    a_long_distance_booking_books_one_leg_and_ends_scheduled,
    a_failure_after_the_leg_cancels_it_and_a_late_put_is_refused,
    a_short_booking_books_no_leg,
    a_package_too_heavy_for_any_drone_goes_by_carrier_all_the_way,
);

const WAIT: Duration = Duration::from_secs(30);

/// Seattle.
const PICKUP: &str = "0,47.6062,-122.3321";
/// Tacoma, about 40 km away: beyond the drones' 20 km range.
const FAR: &str = "0,47.2529,-122.4443";
/// 2 km away.
const NEAR: &str = "0,47.6200,-122.3500";

fn booking(drop_off: &str, weight: f64) -> Value {
    let mut b = Suite::booking("acc-1", 24, "Small");
    b["pickupLocation"] = json!(PICKUP);
    b["dropOffLocation"] = json!(drop_off);
    b["packageInfo"]["weight"] = json!(weight);
    b
}

fn step<'a>(wf: &'a Value, name: &str) -> &'a Value {
    wf["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no step {name} in {wf}"))
}

/// The leg the ThirdParty service holds under `id`, if any.
async fn leg(suite: &Suite, id: &str) -> Option<ThirdPartyLeg> {
    let r = suite.thirdparty.get(&format!("/api/thirdparty/{id}")).await;
    match r.status.as_u16() {
        200 => Some(r.json()),
        404 => None,
        other => panic!("GET leg {id}: {other} {}", r.body),
    }
}

/// What the client sees at the booking's `Location`, once it shows `stage`.
async fn tracking(suite: &Suite, id: Uuid, stage: &str) -> Value {
    let token = suite.ingestion.token("acc-1", &[]);
    eventually(WAIT, format!("tracking of {id} at {stage}"), async || {
        let r = suite
            .ingestion
            .app
            .call_with(
                Method::GET,
                &format!("/api/deliveries/{id}"),
                None,
                Some(&token),
            )
            .await;
        integration_tests::done_if(r.status == 200 && r.body["stage"] == stage, r.body)
    })
    .await
}

async fn reservation(drone: &TestApp, id: Uuid) -> Option<DroneReservation> {
    let r = drone.get(&format!("/api/dronedeliveries/{id}")).await;
    (r.status == 200).then(|| r.json())
}

async fn a_long_distance_booking_books_one_leg_and_ends_scheduled(backend: Backend) {
    let (suite, scheduler) = suite_with_scheduler(backend, SuiteFaults::default(), ACTIVE).await;
    let id = suite.book(&booking(FAR, 2.0)).await;
    let wf = suite.workflow(&scheduler, id, "completed", WAIT).await;
    let arranged = step(&wf, "ArrangeThirdParty");
    assert_eq!(arranged["output"]["required"], true, "{wf}");
    assert_eq!(arranged["output"]["legId"], id.to_string());
    assert!(
        arranged["output"]["reason"]
            .as_str()
            .unwrap()
            .contains("beyond the drones' 20 km range"),
        "{arranged}"
    );
    assert_eq!(arranged["attempts"].as_array().unwrap().len(), 1);

    // Exactly one leg, booked, to a hand-over point within the drones' range of the drop-off.
    let leg = leg(&suite, &id.to_string()).await.expect("a leg");
    assert_eq!(leg.status, contracts::LegStatus::Booked);
    assert!(!leg.whole_route);
    assert_eq!(leg.from_location, PICKUP);
    let handover = contracts::GeoPoint::parse(&leg.to_location).unwrap();
    let drop_off = contracts::GeoPoint::parse(FAR).unwrap();
    assert!(handover.distance_km(drop_off) <= 20.0, "{leg:?}");
    assert!(leg.handover_time > leg.pickup_time, "{leg:?}");
    let carriers = suite.thirdparty.get("/api/carriers").await;
    assert_eq!(carriers.status, 200, "{}", carriers.body);

    // The drone flies the rest: from the hand-over point, when the carrier is there.
    let r = reservation(&suite.drone, id).await.expect("a drone");
    assert_eq!(r.window.start, leg.handover_time);
    assert_eq!(r.pickup_location, leg.to_location);
    let delivery = suite.delivery.get(&format!("/api/deliveries/{id}")).await;
    assert_eq!(delivery.body["droneId"], r.drone_id.as_str());

    // The client sees the leg.
    let seen = tracking(&suite, id, "scheduled").await;
    assert_eq!(
        seen["carrierLeg"]["carrierId"],
        leg.carrier_id.as_str(),
        "{seen}"
    );
    assert_eq!(seen["carrierLeg"]["toLocation"], leg.to_location.as_str());
    stop(suite, scheduler).await;
}

async fn a_failure_after_the_leg_cancels_it_and_a_late_put_is_refused(backend: Backend) {
    let faults = SuiteFaults {
        delivery: refusing("PUT", "/api/deliveries/", 422),
        ..Default::default()
    };
    let (suite, scheduler) = suite_with_scheduler(backend, faults, ACTIVE).await;
    let supervisor = spawn_supervisor(backend, &suite, &scheduler, |_| {}).await;
    let body = booking(FAR, 2.0);
    let id = suite.book(&body).await;
    suite.workflow(&scheduler, id, "compensated", WAIT).await;
    let leg = leg(&suite, &id.to_string()).await.expect("the leg");
    assert_eq!(leg.status, contracts::LegStatus::Cancelled, "{leg:?}");
    let r = reservation(&suite.drone, id)
        .await
        .expect("the reservation");
    assert_eq!(r.status, contracts::ReservationStatus::Released);

    // A late PUT of the same leg (a retry that arrives after the cancel) is refused.
    let late = suite
        .thirdparty
        .call(
            Method::PUT,
            &format!("/api/thirdparty/{id}"),
            Some(&json!({
                "ownerId": "acc-1",
                "pickupLocation": PICKUP,
                "dropOffLocation": FAR,
                "pickupTime": body["pickupTime"],
                "size": "Small",
                "weight": 2.0,
                "handoverWithinKm": 20.0
            })),
        )
        .await;
    assert_eq!(late.status, 409, "{}", late.body);
    assert_eq!(late.body["code"], "leg-cancelled", "{}", late.body);
    stop_with_supervisor(suite, scheduler, supervisor).await;
}

async fn a_short_booking_books_no_leg(backend: Backend) {
    let (suite, scheduler) = suite_with_scheduler(backend, SuiteFaults::default(), ACTIVE).await;
    let id = suite.book(&booking(NEAR, 2.0)).await;
    let wf = suite.workflow(&scheduler, id, "completed", WAIT).await;
    let arranged = step(&wf, "ArrangeThirdParty");
    assert_eq!(arranged["output"]["required"], false, "{wf}");
    assert!(
        arranged["output"]["reason"]
            .as_str()
            .unwrap()
            .contains("within the drones' 20 km range"),
        "{arranged}"
    );
    assert_eq!(leg(&suite, &id.to_string()).await, None, "no leg booked");
    let r = reservation(&suite.drone, id).await.expect("a drone");
    let pickup: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(wf["input"]["pickupTime"].clone()).unwrap();
    assert_eq!(
        r.window.start.timestamp_millis(),
        pickup.timestamp_millis(),
        "the drone starts at the pickup (kept to the millisecond)"
    );
    let seen = tracking(&suite, id, "scheduled").await;
    assert!(seen.get("carrierLeg").is_none(), "{seen}");
    stop(suite, scheduler).await;
}

async fn a_package_too_heavy_for_any_drone_goes_by_carrier_all_the_way(backend: Backend) {
    let (suite, scheduler) = suite_with_scheduler(backend, SuiteFaults::default(), ACTIVE).await;
    let id = suite.book(&booking(NEAR, 40.0)).await;
    let wf = suite.workflow(&scheduler, id, "completed", WAIT).await;
    let leg = leg(&suite, &id.to_string()).await.expect("a leg");
    assert!(leg.whole_route, "{leg:?}");
    assert_eq!(leg.to_location, NEAR);
    assert_eq!(reservation(&suite.drone, id).await, None, "no drone flies");
    let drone = step(&wf, "ReserveDrone")["output"]["droneId"].clone();
    assert_eq!(drone, format!("carrier:{}", leg.carrier_id), "{wf}");
    let delivery = suite.delivery.get(&format!("/api/deliveries/{id}")).await;
    assert_eq!(delivery.body["droneId"], drone);
    stop(suite, scheduler).await;
}
