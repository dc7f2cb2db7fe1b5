//! Delivery service against PostgreSQL and SQLite.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step should panic

mod common;

use common::{assert_ready_with_docs, assert_unauthorized, metrics, put_20_at_once, raw_json};
use contracts::{BatchAnswer, BatchResult, Delivery, DeliveryStage, DeliveryStatus, TrackingEvent};
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
    a_batch_answers_each_item_as_its_single_put,
    duplicate_ids_in_a_batch_act_once,
    concurrent_batches_and_puts_create_each_delivery_once,
    a_batch_creates_as_single_puts_do_and_changes_nothing_else,
    batch_envelope_errors_and_the_delivery_named_batch,
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
        ("/api/deliveries/batch", "post"),
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

/// `upsert()` with another drone, so that a body that acted can be told from one that did not.
fn upsert_with_drone(drone: &str) -> Value {
    let mut body = upsert();
    body["droneId"] = json!(drone);
    body
}

/// Sends `items` as one batch; asserts the request as a whole was answered `200` with one result
/// per item, for the items' ids in order.
async fn batch(app: &TestApp, items: &[(&str, Value)]) -> Vec<BatchResult> {
    let items: Vec<Value> = items
        .iter()
        .map(|(id, body)| json!({"id": id, "body": body}))
        .collect();
    let r = app
        .post("/api/deliveries/batch", &json!({"items": items}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let results = r.json::<BatchAnswer>().results;
    assert_eq!(
        results.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        items
            .iter()
            .map(|i| i["id"].as_str().unwrap())
            .collect::<Vec<_>>(),
        "one result per item, in order"
    );
    results
}

fn statuses(results: &[BatchResult]) -> Vec<u16> {
    results.iter().map(|r| r.status).collect()
}

/// A result's problem `code` (empty when its body is no problem).
fn code(result: &BatchResult) -> &str {
    result.body["code"].as_str().unwrap_or_default()
}

/// An answer body with what differs between two creations of equal bodies left out: the id
/// (`twin` is written as `id`), the times, the request id.
fn comparable(body: &Value, twin: &str, id: &str) -> Value {
    let text = body.to_string().replace(twin, id);
    let mut body: Value = serde_json::from_str(&text).unwrap();
    if let Some(fields) = body.as_object_mut() {
        for field in ["createdAt", "updatedAt", "requestId", "instance"] {
            fields.remove(field);
        }
    }
    body
}

async fn a_batch_answers_each_item_as_its_single_put(backend: Backend) {
    let app = spawn_delivery(backend).await;
    // Every item has a twin, `s-<id>`, in the same state, that a single PUT is sent for.
    for id in ["old", "s-old"] {
        create(&app, id).await;
    }
    for id in ["gone", "s-gone"] {
        assert_eq!(
            app.delete(&format!("/api/deliveries/{id}"))
                .await
                .problem(404)
                .code,
            "not-found"
        );
    }
    let mut bad_values = upsert();
    bad_values["confirmationRequired"] = json!("Retina");
    bad_values["pickupTime"] = json!("next tuesday");
    let items = [
        ("new-1", upsert()),
        ("old", upsert_with_drone("drone-999")),
        ("gone", upsert()),
        ("missing-fields", json!({"ownerId": "o"})),
        ("has space", upsert()),
        ("bad-values", bad_values),
        ("new-2", upsert_with_drone("drone-002")),
    ];
    let results = batch(&app, &items).await;
    assert_eq!(statuses(&results), [201, 204, 409, 400, 400, 400, 201]);

    for ((id, body), result) in items.iter().zip(&results) {
        let twin = format!("s-{id}");
        let single = app
            .put(
                &format!("/api/deliveries/{}", twin.replace(' ', "%20")),
                body,
            )
            .await;
        assert_eq!(
            result.status,
            single.status.as_u16(),
            "{id}: {}",
            single.body
        );
        assert_eq!(
            comparable(&result.body, &twin, id),
            comparable(&single.body, &twin, id),
            "{id}: the single PUT's body"
        );
        assert_eq!(result.retry_after, None, "{id}");
    }
    assert_eq!(code(&results[2]), "delivery-cancelled");
    let fields = |result: &BatchResult| -> Vec<String> {
        serde_json::from_value::<contracts::Problem>(result.body.clone())
            .unwrap()
            .errors
            .into_iter()
            .map(|e| e.field)
            .collect()
    };
    assert_eq!(
        fields(&results[3]),
        [
            "pickupLocation",
            "dropOffLocation",
            "pickupTime",
            "confirmationRequired",
            "packageId",
            "droneId"
        ]
    );
    assert_eq!(fields(&results[4]), ["id"]);
    assert_eq!(fields(&results[5]), ["pickupTime", "confirmationRequired"]);

    // The valid items are applied, the refused ones are not.
    for (id, result) in [("new-1", &results[0]), ("new-2", &results[6])] {
        let got = app.get(&format!("/api/deliveries/{id}")).await;
        assert_eq!(got.status, 200, "{id}");
        assert_eq!(got.body, result.body, "{id}: GET equals the 201 body");
    }
    assert_eq!(
        app.get("/api/deliveries/new-2")
            .await
            .json::<Delivery>()
            .drone_id,
        "drone-002"
    );
    assert_eq!(
        app.get("/api/deliveries/old")
            .await
            .json::<Delivery>()
            .drone_id,
        "drone-001",
        "a replay changes nothing"
    );
    assert_unknown(&app, "gone", "x").await;
    for id in ["missing-fields", "bad-values"] {
        assert_unknown(&app, id, "x").await;
    }
    app.stop().await;
}

async fn duplicate_ids_in_a_batch_act_once(backend: Backend) {
    let app = spawn_delivery(backend).await;
    assert_eq!(
        app.delete("/api/deliveries/dup-gone")
            .await
            .problem(404)
            .code,
        "not-found"
    );
    let results = batch(
        &app,
        &[
            ("dup", upsert_with_drone("drone-A")),
            ("dup", upsert_with_drone("drone-B")),
            ("other", upsert()),
            ("dup-gone", upsert()),
            ("dup", upsert_with_drone("drone-C")),
            ("dup-gone", upsert()),
            // A refused item does not act, so the next item of its id is the first that does.
            ("late", json!({"ownerId": "o"})),
            ("late", upsert_with_drone("drone-L")),
            ("late", upsert_with_drone("drone-M")),
        ],
    )
    .await;
    assert_eq!(
        statuses(&results),
        [201, 204, 201, 409, 204, 409, 400, 201, 204]
    );
    assert_eq!(results[1].body, Value::Null);
    assert_eq!(code(&results[3]), "delivery-cancelled");
    assert_eq!(code(&results[5]), "delivery-cancelled");
    for (id, drone) in [("dup", "drone-A"), ("late", "drone-L")] {
        let got = app.get(&format!("/api/deliveries/{id}")).await;
        assert_eq!(
            got.json::<Delivery>().drone_id,
            drone,
            "{id}: the first acted"
        );
        assert_eq!(
            stages(&events(&app, id).await),
            [DeliveryStage::Created],
            "{id}: created once"
        );
    }
    assert_unknown(&app, "dup-gone", "x").await;
    app.stop().await;
}

async fn concurrent_batches_and_puts_create_each_delivery_once(backend: Backend) {
    let app = spawn_delivery(backend).await;
    for round in 0..4 {
        let ids: Vec<String> = (0..contracts::MAX_BATCH_ITEMS)
            .map(|i| format!("c{round}-{i:02}"))
            .collect();
        // Eight batches of every id, each in another order (rotated, half of them reversed, so
        // that two batches meet from both ends), and a single PUT of every id, all at once.
        let orders: Vec<Vec<(&str, Value)>> = (0..8)
            .map(|b| {
                let mut order: Vec<(&str, Value)> = ids
                    .iter()
                    .map(|id| (id.as_str(), upsert_with_drone(&format!("drone-b{b}"))))
                    .collect();
                order.rotate_left(b * 8 % ids.len());
                if b % 2 == 1 {
                    order.reverse();
                }
                order
            })
            .collect();
        let batches = join_all(orders.iter().map(|items| batch(&app, items)));
        let singles = join_all(ids.iter().map(|id| {
            let app = &app;
            async move {
                let path = format!("/api/deliveries/{id}");
                let r = app.put(&path, &upsert_with_drone("drone-single")).await;
                (id.as_str(), r.status.as_u16())
            }
        }));
        let (batches, singles) = tokio::join!(batches, singles);
        let answers: Vec<(&str, u16)> = batches
            .iter()
            .flatten()
            .map(|r| (r.id.as_str(), r.status))
            .chain(singles)
            .collect();
        for id in &ids {
            let of_id: Vec<u16> = answers
                .iter()
                .filter(|(i, _)| i == id)
                .map(|(_, s)| *s)
                .collect();
            assert_eq!(of_id.len(), 9, "{id}");
            assert_eq!(
                of_id.iter().filter(|s| **s == 201).count(),
                1,
                "{id}: exactly one creation: {of_id:?}"
            );
            assert_eq!(
                of_id.iter().filter(|s| **s == 204).count(),
                8,
                "{id}: every other call found it: {of_id:?}"
            );
            assert_eq!(
                stages(&events(&app, id).await),
                [DeliveryStage::Created],
                "{id}: one Created event"
            );
        }
    }
    app.stop().await;
}

async fn a_batch_creates_as_single_puts_do_and_changes_nothing_else(backend: Backend) {
    let app = spawn_delivery(backend).await;
    // One delivery already on its way (two events), one cancelled before it was created.
    create(&app, "on-way").await;
    let r = app
        .post(
            "/api/deliveries/on-way/events",
            &json!({"stage": "HeadedToPickup", "location": "47.62,-122.20"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let before = app.get("/api/deliveries/on-way").await;
    let history_before = events(&app, "on-way").await;
    assert_eq!(
        app.delete("/api/deliveries/tomb").await.problem(404).code,
        "not-found"
    );

    let items = [
        ("b-1", upsert_with_drone("drone-1")),
        ("on-way", upsert_with_drone("drone-999")),
        ("tomb", upsert()),
        ("b-2", upsert_with_drone("drone-2")),
        ("b-3", upsert_with_drone("drone-3")),
    ];
    let results = batch(&app, &items).await;
    assert_eq!(statuses(&results), [201, 204, 409, 201, 201]);
    assert_eq!(code(&results[2]), "delivery-cancelled");
    for (id, result) in [
        ("b-1", &results[0]),
        ("b-2", &results[3]),
        ("b-3", &results[4]),
    ] {
        let created: Delivery = serde_json::from_value(result.body.clone()).unwrap();
        assert_eq!(created.stage, DeliveryStage::Created, "{id}");
        let history = events(&app, id).await;
        assert_eq!(history.len(), 1, "{id}: exactly one event");
        assert_eq!(
            (history[0].sequence, history[0].stage, history[0].at),
            (1, DeliveryStage::Created, created.created_at),
            "{id}: its Created event, at its creation"
        );
        let status = app
            .get(&format!("/api/deliveries/{id}/status"))
            .await
            .json::<DeliveryStatus>();
        assert_eq!((status.stage, status.events), (DeliveryStage::Created, 1));
    }
    let unchanged = |what: &str| format!("the replayed delivery's {what} is unchanged");
    assert_eq!(
        app.get("/api/deliveries/on-way").await.body,
        before.body,
        "{}",
        unchanged("body")
    );
    assert_eq!(
        events(&app, "on-way").await,
        history_before,
        "{}",
        unchanged("history")
    );
    assert_unknown(&app, "tomb", "x").await;

    // The whole batch again: every item a replay, nothing changes.
    let created: Vec<Value> = ["b-1", "b-2", "b-3"]
        .iter()
        .map(|id| {
            results[items.iter().position(|(i, _)| i == id).unwrap()]
                .body
                .clone()
        })
        .collect();
    let again = batch(&app, &items).await;
    assert_eq!(statuses(&again), [204, 204, 409, 204, 204]);
    assert_eq!(code(&again[2]), "delivery-cancelled");
    for (id, body) in ["b-1", "b-2", "b-3"].iter().zip(&created) {
        assert_eq!(
            &app.get(&format!("/api/deliveries/{id}")).await.body,
            body,
            "{id}"
        );
        assert_eq!(events(&app, id).await.len(), 1, "{id}");
    }
    assert_eq!(events(&app, "on-way").await, history_before);
    app.stop().await;
}

async fn batch_envelope_errors_and_the_delivery_named_batch(backend: Backend) {
    let app = spawn_delivery(backend).await;
    let one = json!({"items": [{"id": "e-1", "body": upsert()}]});
    assert_unauthorized(
        &app,
        Method::POST,
        "/api/deliveries/batch",
        Some(&one),
        None,
    )
    .await;
    assert_unauthorized(
        &app,
        Method::POST,
        "/api/deliveries/batch",
        Some(&one),
        Some("wrong-token"),
    )
    .await;
    for (body, field) in [
        (json!({}), "items"),
        (json!({"items": []}), "items"),
        (json!({"items": [{"id": "e-1"}]}), "items[0].body"),
        (
            json!({"items": [{"id": 7, "body": upsert()}]}),
            "items[0].id",
        ),
    ] {
        let r = app.post("/api/deliveries/batch", &body).await;
        assert_eq!(r.bad_fields(), [field], "{body}");
    }
    let too_many: Vec<Value> = (0..=contracts::MAX_BATCH_ITEMS)
        .map(|i| json!({"id": format!("e-{i}"), "body": upsert()}))
        .collect();
    let r = app
        .post("/api/deliveries/batch", &json!({"items": too_many}))
        .await;
    assert_eq!(r.bad_fields(), ["items"]);
    let r = raw_json(&app, Method::POST, "/api/deliveries/batch", b"{\"items\":").await;
    assert_eq!(r.problem(400).code, "malformed-json");
    assert_unknown(&app, "e-1", "x").await;
    assert_unknown(&app, "e-0", "x").await;

    // Any other method on `/api/deliveries/batch` means the delivery with id "batch".
    assert_eq!(
        app.get("/api/deliveries/batch").await.problem(404).code,
        "not-found"
    );
    let r = app.put("/api/deliveries/batch", &upsert()).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json::<Delivery>().id, "batch");
    assert_eq!(app.get("/api/deliveries/batch").await.body, r.body);
    assert_eq!(
        app.put("/api/deliveries/batch", &upsert()).await.status,
        204
    );
    assert_eq!(
        stages(&events(&app, "batch").await),
        [DeliveryStage::Created]
    );
    // ... and a batch may hold it like any other.
    let results = batch(&app, &[("batch", upsert()), ("e-2", upsert())]).await;
    assert_eq!(statuses(&results), [204, 201]);
    // POST on a delivery is still no route.
    let r = app.post("/api/deliveries/e-2", &upsert()).await;
    assert_eq!(r.problem(405).code, "method-not-allowed");
    app.stop().await;
}
