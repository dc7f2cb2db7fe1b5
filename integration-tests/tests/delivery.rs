//! Delivery service against PostgreSQL and SQLite.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step should panic

mod common;

use common::{assert_ready_with_docs, assert_unauthorized, metrics, put_20_at_once, raw_json};
use contracts::{Delivery, DeliveryStage, DeliveryStatus, TrackingEvent};
use futures::future::join_all;
use integration_tests::{both_backends, spawn_delivery, Backend, TestApp};
use reqwest::Method;
use serde_json::{json, Value};

both_backends!(
    put_creates_then_is_idempotent,
    concurrent_puts_create_exactly_once,
    full_lifecycle_is_recorded_as_events,
    cancel_is_idempotent,
    a_cancel_before_the_create_wins,
    concurrent_changes_never_fail_or_skip_a_sequence,
    client_errors_are_problems,
    service_endpoints_answer,
);

fn upsert() -> Value {
    json!({
        "ownerId": "owner-1",
        "pickupLocation": "47.64,-122.13",
        "dropOffLocation": "47.61,-122.33",
        "pickupTime": "2026-12-01T09:30:00.123456789Z",
        "deadline": "LinkedIn",
        "expedited": true,
        "confirmationRequired": "FingerPrint",
        "packageId": "pkg-1",
        "droneId": "drone-001",
    })
}

async fn create(app: &TestApp, id: &str) -> Delivery {
    let r = app.put(&format!("/api/deliveries/{id}"), &upsert()).await;
    assert_eq!(r.status, 201, "{}", r.body);
    r.json()
}

async fn events(app: &TestApp, id: &str) -> Vec<TrackingEvent> {
    let r = app.get(&format!("/api/deliveries/{id}/events")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

/// Asserts delivery `id` is not found: not its status, its events, a change of its `deadline`,
/// nor a new event.
async fn assert_unknown(app: &TestApp, id: &str, deadline: &str) {
    for path in [
        format!("/api/deliveries/{id}"),
        format!("/api/deliveries/{id}/status"),
        format!("/api/deliveries/{id}/events"),
    ] {
        assert_eq!(
            app.get(&path).await.problem(404).code,
            "not-found",
            "{path}"
        );
    }
    let r = app
        .patch(
            &format!("/api/deliveries/{id}"),
            &json!({"deadline": deadline}),
        )
        .await;
    assert_eq!(r.problem(404).code, "not-found");
    let stage = json!({"stage": "HeadedToPickup"});
    let r = app
        .post(&format!("/api/deliveries/{id}/events"), &stage)
        .await;
    assert_eq!(r.problem(404).code, "not-found");
}

fn stages(events: &[TrackingEvent]) -> Vec<DeliveryStage> {
    events.iter().map(|e| e.stage).collect()
}

async fn put_creates_then_is_idempotent(backend: Backend) {
    let app = spawn_delivery(backend).await;
    let first = app.put("/api/deliveries/d-1", &upsert()).await;
    assert_eq!(first.status, 201, "{}", first.body);
    assert_eq!(first.header("location"), Some("/api/deliveries/d-1"));
    let created = first.json::<Delivery>();
    assert_eq!(created.id, "d-1");
    assert_eq!(created.stage, DeliveryStage::Created);
    assert_eq!(created.drone_id, "drone-001");
    assert!(created.expedited);
    assert_eq!(
        created
            .pickup_time
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "2026-12-01T09:30:00.123456Z",
        "stored at the precision both databases keep"
    );

    // A replay, even with a different body, finds it and changes nothing.
    let mut other = upsert();
    other["droneId"] = json!("drone-999");
    let second = app.put("/api/deliveries/d-1", &other).await;
    assert_eq!(second.status, 204);
    assert_eq!(second.body, Value::Null, "204 has an empty body");

    let got = app.get("/api/deliveries/d-1").await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body, first.body, "GET equals the 201 body");

    let history = events(&app, "d-1").await;
    assert_eq!(stages(&history), vec![DeliveryStage::Created]);
    assert_eq!(history[0].sequence, 1);
    assert_eq!(history[0].delivery_id, "d-1");

    let status = app
        .get("/api/deliveries/d-1/status")
        .await
        .json::<DeliveryStatus>();
    assert_eq!(status.stage, DeliveryStage::Created);
    assert_eq!(status.events, 1);
    assert_eq!(status.last_location, None);
    assert_eq!(status.last_event_at, history[0].at);
    app.stop().await;
}

async fn concurrent_puts_create_exactly_once(backend: Backend) {
    let app = spawn_delivery(backend).await;
    let body = upsert();
    put_20_at_once(&app, "/api/deliveries/d-race", &body, 204).await;
    assert_eq!(
        stages(&events(&app, "d-race").await),
        vec![DeliveryStage::Created],
        "exactly one Created event"
    );
    app.stop().await;
}

async fn full_lifecycle_is_recorded_as_events(backend: Backend) {
    let app = spawn_delivery(backend).await;
    create(&app, "d-life").await;

    let patched = app
        .patch(
            "/api/deliveries/d-life",
            &json!({"pickupTime": "2026-12-02T10:00:00Z", "deadline": "Tomorrow", "droneId": "drone-001"}),
        )
        .await;
    assert_eq!(patched.status, 200, "{}", patched.body);
    let patched = patched.json::<Delivery>();
    assert_eq!(patched.stage, DeliveryStage::Rescheduled);
    assert_eq!(patched.deadline, "Tomorrow");
    assert_eq!(
        patched.pickup_time.to_rfc3339(),
        "2026-12-02T10:00:00+00:00"
    );
    assert_eq!(
        app.get("/api/deliveries/d-life").await.json::<Delivery>(),
        patched,
        "the reschedule is stored"
    );
    // Repeating the same reschedule changes nothing and records nothing.
    let again = app
        .patch("/api/deliveries/d-life", &json!({"deadline": "Tomorrow"}))
        .await;
    assert_eq!(again.json::<Delivery>(), patched);

    let to_pickup = app
        .post(
            "/api/deliveries/d-life/events",
            &json!({"stage": "HeadedToPickup", "location": "47.62,-122.20"}),
        )
        .await;
    assert_eq!(to_pickup.status, 201, "{}", to_pickup.body);
    let to_pickup = to_pickup.json::<TrackingEvent>();
    assert_eq!(to_pickup.sequence, 3);
    assert_eq!(to_pickup.stage, DeliveryStage::HeadedToPickup);
    assert_eq!(to_pickup.location.as_deref(), Some("47.62,-122.20"));

    let r = app
        .post(
            "/api/deliveries/d-life/events",
            &json!({"stage": "HeadedToDropoff", "location": "47.63,-122.25"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(
        app.get("/api/deliveries/d-life")
            .await
            .json::<Delivery>()
            .stage,
        DeliveryStage::HeadedToDropoff
    );

    let done = app
        .post(
            "/api/deliveries/d-life/confirmations",
            &json!({"confirmationType": "FingerPrint", "confirmationBlob": "hash-1", "location": "47.61,-122.33"}),
        )
        .await;
    assert_eq!(done.status, 201, "{}", done.body);
    let done = done.json::<TrackingEvent>();
    assert_eq!(done.stage, DeliveryStage::Completed);
    assert_eq!(done.sequence, 5);
    assert_eq!(done.detail.as_deref(), Some("FingerPrint"));

    let status = app
        .get("/api/deliveries/d-life/status")
        .await
        .json::<DeliveryStatus>();
    assert_eq!(status.stage, DeliveryStage::Completed);
    assert_eq!(status.events, 5);
    assert_eq!(status.last_location.as_deref(), Some("47.61,-122.33"));
    assert_eq!(status.last_event_at, done.at);

    let history = events(&app, "d-life").await;
    assert_eq!(
        stages(&history),
        vec![
            DeliveryStage::Created,
            DeliveryStage::Rescheduled,
            DeliveryStage::HeadedToPickup,
            DeliveryStage::HeadedToDropoff,
            DeliveryStage::Completed,
        ]
    );
    assert_eq!(
        history.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    let detail = history[1].detail.clone().unwrap_or_default();
    assert!(
        detail.contains("pickupTime") && detail.contains("deadline") && !detail.contains("droneId"),
        "detail names the changed fields only: {detail}"
    );
    assert_eq!(history[4], done, "the 201 body is what was stored");

    // A completed delivery is closed.
    let r = app
        .post(
            "/api/deliveries/d-life/events",
            &json!({"stage": "HeadedToPickup"}),
        )
        .await;
    assert_eq!(r.problem(409).code, "delivery-closed");
    let r = app
        .patch("/api/deliveries/d-life", &json!({"deadline": "Later"}))
        .await;
    assert_eq!(r.problem(409).code, "delivery-closed");
    let r = app.delete("/api/deliveries/d-life").await;
    assert_eq!(r.problem(409).code, "delivery-closed");
    let r = app
        .post(
            "/api/deliveries/d-life/confirmations",
            &json!({"confirmationType": "FingerPrint"}),
        )
        .await;
    assert_eq!(r.problem(409).code, "already-completed");
    assert_eq!(
        events(&app, "d-life").await.len(),
        5,
        "refusals record nothing"
    );
    app.stop().await;
}

async fn cancel_is_idempotent(backend: Backend) {
    let app = spawn_delivery(backend).await;
    create(&app, "d-cancel").await;
    app.post(
        "/api/deliveries/d-cancel/events",
        &json!({"stage": "HeadedToPickup", "location": "here"}),
    )
    .await;
    let first = app.delete("/api/deliveries/d-cancel").await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.json::<Delivery>().stage, DeliveryStage::Cancelled);
    let second = app.delete("/api/deliveries/d-cancel").await;
    assert_eq!(second.status, 200, "{}", second.body);
    assert_eq!(second.body, first.body, "same body");

    let history = events(&app, "d-cancel").await;
    assert_eq!(
        stages(&history),
        vec![
            DeliveryStage::Created,
            DeliveryStage::HeadedToPickup,
            DeliveryStage::Cancelled
        ],
        "one Cancelled event"
    );
    let status = app
        .get("/api/deliveries/d-cancel/status")
        .await
        .json::<DeliveryStatus>();
    assert_eq!(status.stage, DeliveryStage::Cancelled);
    assert_eq!(status.events, 3);
    assert_eq!(
        status.last_location.as_deref(),
        Some("here"),
        "last known position kept"
    );

    // A cancelled delivery is closed.
    let r = app
        .post(
            "/api/deliveries/d-cancel/confirmations",
            &json!({"confirmationType": "Picture"}),
        )
        .await;
    assert_eq!(r.problem(409).code, "delivery-closed");
    let r = app
        .patch("/api/deliveries/d-cancel", &json!({"deadline": "Later"}))
        .await;
    assert_eq!(r.problem(409).code, "delivery-closed");
    let r = app
        .post(
            "/api/deliveries/d-cancel/events",
            &json!({"stage": "HeadedToDropoff"}),
        )
        .await;
    assert_eq!(r.problem(409).code, "delivery-closed");

    assert_eq!(
        app.delete("/api/deliveries/nobody").await.problem(404).code,
        "not-found"
    );
    app.stop().await;
}

async fn a_cancel_before_the_create_wins(backend: Backend) {
    let app = spawn_delivery(backend).await;
    // A compensation cancels a delivery whose creation (a timed-out attempt) is still on its way:
    // the creation that arrives afterwards must not create it.
    assert_eq!(
        app.delete("/api/deliveries/late").await.problem(404).code,
        "not-found"
    );
    let r = app.put("/api/deliveries/late", &upsert()).await;
    assert_eq!(r.problem(409).code, "delivery-cancelled");
    assert_unknown(&app, "late", "Later").await;
    assert_eq!(
        app.delete("/api/deliveries/late").await.problem(404).code,
        "not-found",
        "cancelling it again changes nothing"
    );

    // Cancel and create racing: whichever order the database picks, the delivery ends cancelled
    // or was never created; never created and live.
    for i in 0..20 {
        let id = format!("race-{i}");
        let path = format!("/api/deliveries/{id}");
        let body = upsert();
        let (put, del) = tokio::join!(app.put(&path, &body), app.delete(&path));
        assert!(
            matches!(put.status.as_u16(), 201 | 409),
            "PUT {i}: {} {}",
            put.status,
            put.body
        );
        assert!(
            matches!(del.status.as_u16(), 200 | 404),
            "DELETE {i}: {} {}",
            del.status,
            del.body
        );
        let after = app.get(&path).await;
        if after.status == 200 {
            assert_eq!(
                after.json::<Delivery>().stage,
                DeliveryStage::Cancelled,
                "race {i}: created and cancelled"
            );
        } else {
            assert_eq!(after.problem(404).code, "not-found", "race {i}");
            assert_eq!(put.status, 409, "race {i}: created but not readable");
        }
        let again = app.put(&path, &body).await;
        assert!(
            matches!(again.status.as_u16(), 204 | 409),
            "race {i}: a replay never creates it: {} {}",
            again.status,
            again.body
        );
    }
    app.stop().await;
}

async fn concurrent_changes_never_fail_or_skip_a_sequence(backend: Backend) {
    let app = spawn_delivery(backend).await;
    create(&app, "d-busy").await;
    let update = json!({"stage": "HeadedToDropoff", "location": "somewhere"});
    // Twenty progress reports with a cancel among them: whatever runs after the cancel is refused,
    // nothing is lost or recorded twice.
    let calls = (0..21).map(|i| {
        let (app, update) = (&app, &update);
        async move {
            if i == 10 {
                app.delete("/api/deliveries/d-busy").await
            } else {
                app.post("/api/deliveries/d-busy/events", update).await
            }
        }
    });
    let replies = join_all(calls).await;
    let statuses: Vec<u16> = replies.iter().map(|r| r.status.as_u16()).collect();
    assert!(
        statuses.iter().all(|s| [200, 201, 409].contains(s)),
        "only successes and closed refusals: {statuses:?}"
    );
    let accepted = statuses.iter().filter(|s| **s == 201).count();
    let history = events(&app, "d-busy").await;
    assert_eq!(
        history.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        (1..=history.len() as i64).collect::<Vec<_>>(),
        "sequences have no gaps or repeats"
    );
    assert_eq!(
        history.len(),
        accepted + 2,
        "Created + accepted updates + Cancelled"
    );
    assert_eq!(
        history.last().map(|e| e.stage),
        Some(DeliveryStage::Cancelled)
    );
    app.stop().await;
}

async fn client_errors_are_problems(backend: Backend) {
    let app = spawn_delivery(backend).await;
    // Missing and wrong tokens.
    assert_unauthorized(&app, Method::GET, "/api/deliveries/x", None, None).await;
    assert_unauthorized(
        &app,
        Method::PUT,
        "/api/deliveries/x",
        Some(&upsert()),
        Some("wrong-token"),
    )
    .await;
    // Unknown ids.
    assert_unknown(&app, "missing", "x").await;
    let r = app
        .post(
            "/api/deliveries/missing/confirmations",
            &json!({"confirmationType": "Voice"}),
        )
        .await;
    assert_eq!(r.problem(404).code, "not-found");
    // Missing fields, an unknown enum value, a bad timestamp: every one is named.
    let r = app.put("/api/deliveries/x", &json!({"ownerId": "o"})).await;
    assert_eq!(
        r.bad_fields(),
        vec![
            "pickupLocation",
            "dropOffLocation",
            "pickupTime",
            "confirmationRequired",
            "packageId",
            "droneId"
        ]
    );
    let mut body = upsert();
    body["confirmationRequired"] = json!("Retina");
    body["pickupTime"] = json!("next tuesday");
    let r = app.put("/api/deliveries/x", &body).await;
    assert_eq!(r.bad_fields(), vec!["pickupTime", "confirmationRequired"]);
    assert_eq!(
        app.get("/api/deliveries/x").await.status,
        404,
        "nothing stored"
    );
    // Final stages have their own endpoints.
    create(&app, "d-err").await;
    let r = app
        .post(
            "/api/deliveries/d-err/events",
            &json!({"stage": "Completed"}),
        )
        .await;
    assert_eq!(r.bad_fields(), vec!["stage"]);
    let r = app
        .post("/api/deliveries/d-err/events", &json!({"stage": "Lost"}))
        .await;
    assert_eq!(r.bad_fields(), vec!["stage"]);
    let r = app
        .post(
            "/api/deliveries/d-err/confirmations",
            &json!({"confirmationType": "Retina"}),
        )
        .await;
    assert_eq!(r.bad_fields(), vec!["confirmationType"]);
    let r = app.patch("/api/deliveries/d-err", &json!({})).await;
    assert_eq!(r.bad_fields(), vec!["body"]);
    let r = app
        .patch("/api/deliveries/d-err", &json!({"pickupTime": 5}))
        .await;
    assert_eq!(r.bad_fields(), vec!["pickupTime"]);
    assert_eq!(
        events(&app, "d-err").await.len(),
        1,
        "rejected requests record nothing"
    );
    // Malformed JSON, wrong media type, bad ids.
    let r = raw_json(&app, Method::PUT, "/api/deliveries/x", b"{\"ownerId\":").await;
    assert_eq!(r.problem(400).code, "malformed-json");
    let r = app
        .call_raw(
            Method::POST,
            "/api/deliveries/d-err/events",
            "text/plain",
            b"{}".to_vec(),
        )
        .await;
    assert_eq!(r.problem(415).code, "unsupported-media-type");
    let r = app.put("/api/deliveries/has%20space", &upsert()).await;
    assert_eq!(r.bad_fields(), vec!["id"]);
    let r = app
        .get(&format!("/api/deliveries/{}", "x".repeat(129)))
        .await;
    assert_eq!(r.bad_fields(), vec!["id"]);
    // Wrong method.
    let r = app
        .call(Method::PUT, "/api/deliveries/d-err/status", None)
        .await;
    assert_eq!(r.problem(405).code, "method-not-allowed");
    app.stop().await;
}

async fn service_endpoints_answer(backend: Backend) {
    let app = spawn_delivery(backend).await;
    let doc = assert_ready_with_docs(&app).await;
    let paths = &doc.body["paths"];
    for (path, method) in [
        ("/api/deliveries/{id}", "put"),
        ("/api/deliveries/{id}", "get"),
        ("/api/deliveries/{id}", "patch"),
        ("/api/deliveries/{id}", "delete"),
        ("/api/deliveries/{id}/status", "get"),
        ("/api/deliveries/{id}/events", "get"),
        ("/api/deliveries/{id}/events", "post"),
        ("/api/deliveries/{id}/confirmations", "post"),
    ] {
        assert!(
            paths[path][method].is_object(),
            "{method} {path} documented"
        );
    }
    assert!(doc.body["components"]["schemas"]["DeliveryStatus"].is_object());
    create(&app, "m1").await;
    let text = metrics(&app).await;
    assert!(
        text.contains("http_requests_total{endpoint=\"/api/deliveries/{id}\",method=\"PUT\",service=\"delivery\",status=\"201\"} 1"),
        "{text}"
    );
    app.stop().await;
}
