//! Drone telemetry and the fleet simulator: a drone's reports become the Delivery service's
//! tracking events (published on `workflow-events` for Ingestion), `delivered` completes the
//! delivery and frees the drone's window; `make run`'s simulator flies a booking to `delivered`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step should panic

mod common;

use std::time::Duration;

use common::{stop, suite_with_scheduler, ACTIVE};
use contracts::{DeliveryTracked, DELIVERY_TRACKED};
use integration_tests::{
    both_backends, done_if, eventually, Backend, Standalone, Suite, SuiteFaults,
};
use messaging::StartAt;
use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(30);

/// Books a Small delivery picked up in a few seconds and waits until it is scheduled; returns its id and drone.
async fn scheduled_now(suite: &Suite, scheduler: &integration_tests::TestApp) -> (Uuid, String) {
    // The saga must finish before the pickup time (its deadline): a few seconds ahead.
    let mut body = Suite::booking(ACTIVE.0, 0, "Small");
    body["pickupTime"] = json!((chrono::Utc::now() + chrono::Duration::seconds(5)).to_rfc3339());
    body["pickupLocation"] = json!("0,47.6097,-122.3331");
    body["dropOffLocation"] = json!("0,47.6205,-122.3493");
    let id = suite.book(&body).await;
    let workflow = suite.workflow(scheduler, id, "completed", WAIT).await;
    let reservation = suite.drone.get(&format!("/api/dronedeliveries/{id}")).await;
    assert_eq!(reservation.status, 200, "{}", reservation.body);
    let drone = reservation.body["droneId"]
        .as_str()
        .expect("droneId")
        .to_owned();
    assert_eq!(workflow["state"], "completed");
    // A drone flies when its window begins.
    let start: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(reservation.body["window"]["start"].clone()).expect("start");
    if let Ok(wait) = (start - chrono::Utc::now()).to_std() {
        tokio::time::sleep(wait + Duration::from_millis(50)).await;
    }
    (id, drone)
}

async fn key_of(suite: &Suite, drone: &str) -> String {
    let r = suite.drone.get(&format!("/api/drones/{drone}/key")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["droneId"], drone);
    r.body["key"].as_str().expect("key").to_owned()
}

async fn report(suite: &Suite, drone: &str, key: &str, body: &Value) -> integration_tests::Reply {
    suite
        .drone
        .call_with(
            Method::POST,
            &format!("/api/telemetry/{drone}"),
            Some(body),
            Some(key),
        )
        .await
}

async fn telemetry_becomes_tracking_and_delivered_frees_the_drone(backend: Backend) {
    let (suite, scheduler) = suite_with_scheduler(backend, SuiteFaults::default(), ACTIVE).await;
    let (id, drone) = scheduled_now(&suite, &scheduler).await;
    let key = key_of(&suite, &drone).await;
    let other = if drone == "drone-001" {
        "drone-002"
    } else {
        "drone-001"
    };
    let other_key = key_of(&suite, other).await;
    let position = json!({"deliveryId": id, "kind": "position", "location": "0,47.61,-122.34"});

    // Only this drone's key opens this drone's reports; the service token is no drone key.
    let r = report(&suite, &drone, &other_key, &position).await;
    assert_eq!(r.status, 401, "{}", r.body);
    let r = report(&suite, &drone, integration_tests::SERVICE_TOKEN, &position).await;
    assert_eq!(r.status, 401, "{}", r.body);
    // Another drone holds no reservation for this delivery.
    let r = report(&suite, other, &other_key, &position).await;
    assert_eq!(r.status, 404, "{}", r.body);
    // Every bad field is named.
    let r = report(
        &suite,
        &drone,
        &key,
        &json!({"deliveryId": "", "kind": "landed"}),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    let mut bad = r.bad_fields();
    bad.sort();
    assert_eq!(bad, ["deliveryId", "kind"]);

    // Read what the Delivery service publishes on workflow-events (the partition of this id).
    let log = suite
        .ingestion
        .broker
        .log(
            contracts::WORKFLOW_EVENTS_LOG,
            suite.ingestion.settings.ingestion.partitions,
        )
        .await
        .expect("workflow-events");
    let partition = log.partition_of(&id.to_string());
    let mut reader = log.read(partition, StartAt::First).await.expect("reader");

    let r = report(&suite, &drone, &key, &position).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["stage"], "to-pickup");
    let r = report(
        &suite,
        &drone,
        &key,
        &json!({"deliveryId": id, "kind": "picked-up", "location": "0,47.6097,-122.3331"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["stage"], "to-drop-off");
    let delivered =
        json!({"deliveryId": id, "kind": "delivered", "location": "0,47.6205,-122.3493"});
    let r = report(&suite, &drone, &key, &delivered).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["stage"], "delivered");
    assert_eq!(r.body["reports"], 3);
    // A repeated `delivered` (a lost answer) is answered again; anything else is refused.
    let again = report(&suite, &drone, &key, &delivered).await;
    assert_eq!((again.status.as_u16(), &again.body), (200, &r.body));
    let late = report(&suite, &drone, &key, &position).await;
    assert_eq!(late.status, 409, "{}", late.body);
    assert_eq!(late.problem(409).code, "flight-completed");

    // The Delivery service has the history...
    let events = suite
        .delivery
        .get(&format!("/api/deliveries/{id}/events"))
        .await;
    let stages: Vec<&str> = events
        .body
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["stage"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        stages,
        ["Created", "HeadedToPickup", "HeadedToDropoff", "Completed"]
    );
    // ... and published every event after `Created`, in order, once each.
    let mut published = Vec::new();
    eventually(WAIT, "the tracking events on workflow-events", async || {
        while let Some(record) = reader.try_next() {
            let Ok(e) = record.event else { continue };
            if e.kind == DELIVERY_TRACKED && e.key == id.to_string() {
                published.push(e.decode::<DeliveryTracked>().expect("DeliveryTracked"));
            }
        }
        done_if(published.len() >= 3, published.len())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    while let Some(record) = reader.try_next() {
        if let Ok(e) = record.event {
            if e.kind == DELIVERY_TRACKED && e.key == id.to_string() {
                published.push(e.decode::<DeliveryTracked>().expect("DeliveryTracked"));
            }
        }
    }
    let seen: Vec<(i64, &str, &str)> = published
        .iter()
        .map(|t| (t.sequence, t.stage.as_str(), t.drone_id.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            (2, "HeadedToPickup", drone.as_str()),
            (3, "HeadedToDropoff", drone.as_str()),
            (4, "Completed", drone.as_str())
        ]
    );
    assert!(published.iter().all(|t| t.owner_id == ACTIVE.0));

    // The drone's window ended at the hand-over: it is free from now on.
    let reservation = suite.drone.get(&format!("/api/dronedeliveries/{id}")).await;
    let end: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(reservation.body["window"]["end"].clone()).expect("window end");
    assert!(end <= chrono::Utc::now(), "window still ends at {end}");
    let fleet = suite.drone.get("/api/drones").await;
    let busy = fleet.body["drones"]
        .as_array()
        .expect("drones")
        .iter()
        .find(|d| d["id"] == drone.as_str())
        .map(|d| d["currentReservation"].clone());
    assert_eq!(busy, Some(Value::Null), "{}", fleet.body);
    // Operators see the reports and the publishing.
    let drone_metrics = common::metrics(&suite.drone).await;
    assert!(
        drone_metrics
            .contains(r#"drone_telemetry_reports_total{kind="delivered",outcome="recorded"} 2"#),
        "{drone_metrics}"
    );
    let delivery_metrics = common::metrics(&suite.delivery).await;
    assert!(
        delivery_metrics.contains("delivery_tracking_events_published_total 3"),
        "{delivery_metrics}"
    );
    stop(suite, scheduler).await;
}

both_backends!(telemetry_becomes_tracking_and_delivered_frees_the_drone);

/// `make run`: the simulator flies a booking made now all the way to `delivered`, the client
/// sees it at the Location URL, and the drone is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_simulator_takes_a_booking_to_delivered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let settings = standalone::Settings {
        simulator: drone::SimulatorSettings {
            enabled: true,
            poll_ms: 200,
            leg_secs: 1,
            reports_per_leg: 2,
            ..Default::default()
        },
        ..Standalone::settings(dir.path())
    };
    let suite = Standalone::start(settings).await;
    let ports = suite.ports.clone();
    let creds = Standalone::credentials(dir.path());
    let client_token = creds["CLIENT_TOKEN"].clone();
    let service_token = creds["SERVICE_TOKEN"].clone();
    let http = reqwest::Client::new();
    let booked = http
        .post(format!(
            "http://127.0.0.1:{}/api/deliveryrequests",
            ports.ingestion
        ))
        .bearer_auth(&client_token)
        .json(
            &json!({"ownerId": "demo-account", "pickupLocation": "0,47.6097,-122.3331",
            "dropOffLocation": "0,47.6205,-122.3493",
            "pickupTime": (chrono::Utc::now() + chrono::Duration::seconds(3)).to_rfc3339(),
            "deadline": "", "expedited": false,
            "confirmationRequired": "None",
            "packageInfo": {"packageId": "p-1", "size": "Small", "weight": 1}}),
        )
        .send()
        .await
        .expect("book");
    assert_eq!(booked.status(), 202);
    let location = booked
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .expect("Location")
        .to_owned();
    let accepted: Value = booked.json().await.expect("json");
    let id = accepted["deliveryId"]
        .as_str()
        .expect("deliveryId")
        .to_owned();
    assert_eq!(location, format!("/api/deliveries/{id}"));

    // The Delivery service sees the flight end...
    let delivery = format!("http://127.0.0.1:{}/api/deliveries/{id}", ports.delivery);
    let done = eventually(
        Duration::from_secs(60),
        "the simulator to deliver",
        async || {
            let r = http.get(&delivery).bearer_auth(&service_token).send().await;
            let body = match r {
                Ok(r) => r.json::<Value>().await.unwrap_or(Value::Null),
                Err(_) => Value::Null,
            };
            done_if(body["stage"] == "Completed", body)
        },
    )
    .await;
    let drone = done["droneId"].as_str().expect("droneId").to_owned();
    // ... the client sees `delivered` at the Location URL...
    let view = format!("http://127.0.0.1:{}{location}", ports.ingestion);
    let seen = eventually(WAIT, "the client to see delivered", async || {
        let r = http.get(&view).bearer_auth(&client_token).send().await;
        let body = match r {
            Ok(r) => r.json::<Value>().await.unwrap_or(Value::Null),
            Err(_) => Value::Null,
        };
        done_if(body["stage"] == "delivered", body)
    })
    .await;
    assert_eq!(seen["droneId"], drone.as_str());
    // ... and the drone is free.
    let reservation: Value = http
        .get(format!(
            "http://127.0.0.1:{}/api/dronedeliveries/{id}",
            ports.drone
        ))
        .bearer_auth(&service_token)
        .send()
        .await
        .expect("reservation")
        .json()
        .await
        .expect("json");
    let end: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(reservation["window"]["end"].clone()).expect("window end");
    assert!(end <= chrono::Utc::now(), "window still ends at {end}");
    suite.stop().await;
}
