//! Ingestion against RabbitMQ (through a proxy the tests can cut) with its read model on
//! PostgreSQL and SQLite.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step should panic

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::Utc;
use contracts::{
    DeliveryAccepted, DeliveryRequestStatus, DeliveryRequested, RequestState, WorkflowStateChanged,
    ADMIN_SCOPE, DELIVERY_CANCELLED, DELIVERY_REQUESTED, DELIVERY_REQUESTS_LOG,
    DELIVERY_RESCHEDULED, WORKFLOW_EVENTS_LOG, WORKFLOW_STATE_CHANGED,
};
use integration_tests::proxy::Mode;
use integration_tests::{
    both_backends, done_if, eventually, eventually_every, spawn_ingestion, Backend, IngestionApp,
    Reply,
};
use messaging::{partition_for, Envelope, LogRecord, StartAt};
use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

both_backends!(
    fabrikam_booking_is_accepted_and_in_the_log,
    bad_input_is_a_problem_naming_the_field,
    authentication_and_ownership,
    idempotency_key_gives_one_booking,
    rate_limit_per_account,
    reschedule_and_cancel_reach_the_same_partition,
    workflow_events_drive_the_request_state,
    broker_outage_gives_503_and_nothing_half_accepted,
    full_budget_answers_503_at_once,
    slow_confirms_shrink_the_limit_and_the_excess_is_refused_not_lost,
    a_booking_is_found_right_after_its_202,
    another_accounts_booking_is_answered_as_unknown,
    idempotent_replay_answers_the_booking_as_first_accepted,
);

fn booking(owner: &str) -> Value {
    json!({
        "deliveryId": "ignored-client-value",
        "ownerId": owner,
        "pickupLocation": "1 Main St, Redmond",
        "dropOffLocation": "99 Side St, Seattle",
        "pickupTime": (Utc::now() + chrono::Duration::days(2)).to_rfc3339(),
        "deadline": "LinkedIn",
        "expedited": true,
        "confirmationRequired": "FingerPrint",
        "packageInfo": {"packageId": "pkg-1", "size": "Small", "weight": "2.5", "tag": "fragile"},
        "someNewField": {"clients": "send extra things"}
    })
}

/// A reschedule body: pickup in three days.
fn later() -> Value {
    json!({"pickupTime": (Utc::now() + chrono::Duration::days(3)).to_rfc3339()})
}

/// The events on the delivery requests log keyed by booking `id` (on `partition` or, without
/// one, on any).
async fn requests_of(s: &IngestionApp, id: Uuid, partition: Option<u32>) -> Vec<Envelope> {
    let events = match partition {
        Some(p) => records(s, DELIVERY_REQUESTS_LOG, p)
            .await
            .into_iter()
            .filter_map(|r| r.event.ok())
            .collect(),
        None => all_requests(s).await,
    };
    events
        .into_iter()
        .filter(|e| e.key == id.to_string())
        .collect()
}

/// The kinds of [`requests_of`] booking `id`, in log order.
async fn kinds_of(s: &IngestionApp, id: Uuid, partition: Option<u32>) -> Vec<String> {
    let events = requests_of(s, id, partition).await;
    events.into_iter().map(|e| e.kind).collect()
}

/// Books for acc-1 under the Idempotency-Key `key`; the new booking's id.
async fn book(s: &IngestionApp, token: &str, key: &str) -> Uuid {
    let r = post(s, Some(token), &booking("acc-1"), Some(key)).await;
    r.json::<DeliveryAccepted>().delivery_id
}

async fn post(s: &IngestionApp, token: Option<&str>, body: &Value, key: Option<&str>) -> Reply {
    let mut req = s
        .app
        .client
        .post(s.app.url("/api/deliveryrequests"))
        .json(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(k) = key {
        req = req.header("Idempotency-Key", k);
    }
    let res = req.send().await.expect("post");
    let status = res.status();
    let headers = res.headers().clone();
    let body = res.json::<Value>().await.unwrap_or(Value::Null);
    Reply {
        status,
        headers,
        body,
    }
}

async fn call(
    s: &IngestionApp,
    method: Method,
    path: &str,
    token: &str,
    body: Option<&Value>,
) -> Reply {
    s.app.call_with(method, path, body, Some(token)).await
}

/// A call on one booking (`/api/deliveryrequests/{id}`).
async fn on_request(
    s: &IngestionApp,
    method: Method,
    id: Uuid,
    token: &str,
    body: Option<&Value>,
) -> Reply {
    call(
        s,
        method,
        &format!("/api/deliveryrequests/{id}"),
        token,
        body,
    )
    .await
}

/// Every record of one partition of `log`, reading until it has been quiet for a moment.
async fn records(s: &IngestionApp, log: &str, partition: u32) -> Vec<LogRecord> {
    let log = s
        .broker
        .log(log, s.settings.ingestion.partitions)
        .await
        .unwrap();
    let mut reader = log.read(partition, StartAt::First).await.unwrap();
    let mut out = Vec::new();
    while let Ok(Some(r)) = tokio::time::timeout(Duration::from_millis(700), reader.next()).await {
        out.push(r);
    }
    out
}

async fn all_requests(s: &IngestionApp) -> Vec<Envelope> {
    let mut out = Vec::new();
    for p in 0..s.settings.ingestion.partitions {
        out.extend(
            records(s, DELIVERY_REQUESTS_LOG, p)
                .await
                .into_iter()
                .filter_map(|r| r.event.ok()),
        );
    }
    out
}

async fn eventually_state(
    s: &IngestionApp,
    id: Uuid,
    token: &str,
    want: RequestState,
) -> DeliveryRequestStatus {
    let what = format!("request {id} to reach {want:?}");
    eventually(Duration::from_secs(20), what, async || {
        let r = on_request(s, Method::GET, id, token, None).await;
        if r.status == 200 && r.json::<DeliveryRequestStatus>().state == want {
            Ok(r.json())
        } else {
            Err(r.body)
        }
    })
    .await
}

async fn fabrikam_booking_is_accepted_and_in_the_log(backend: Backend) {
    let s = spawn_ingestion(backend, |_| {}).await;
    let token = s.token("acc-1", &[]);
    let r = post(&s, Some(&token), &booking("acc-1"), None).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let accepted: DeliveryAccepted = r.json();
    let id = accepted.delivery_id;
    assert_eq!(
        r.header("location"),
        Some(format!("/api/deliveries/{id}").as_str())
    );
    assert_eq!(accepted.request.package_info.weight, 2.5);

    let partition = partition_for(&id.to_string(), s.settings.ingestion.partitions);
    let found = requests_of(&s, id, Some(partition)).await;
    assert_eq!(found.len(), 1, "exactly once, on the partition of its id");
    assert_eq!(found[0].kind, DELIVERY_REQUESTED);
    let event: DeliveryRequested = found[0].decode().unwrap();
    assert_eq!(event.delivery_id, id);
    assert_eq!(event.owner_id, "acc-1");
    assert_eq!(event.package_info.package_id, "pkg-1");
    assert_eq!(event.pickup_location, "1 Main St, Redmond");

    let st = eventually_state(&s, id, &token, RequestState::Accepted).await;
    assert_eq!(st.owner_id, "acc-1");
    s.stop().await;
}

async fn bad_input_is_a_problem_naming_the_field(backend: Backend) {
    let s = spawn_ingestion(backend, |_| {}).await;
    let token = s.token("acc-1", &[]);
    let mut body = booking("acc-1");
    body["packageInfo"]["size"] = json!("Huge");
    body["packageInfo"]["weight"] = json!("heavy");
    body["confirmationRequired"] = json!("Retina");
    body.as_object_mut().unwrap().remove("dropOffLocation");
    let r = post(&s, Some(&token), &body, None).await;
    assert_eq!(
        r.bad_fields(),
        vec![
            "dropOffLocation",
            "confirmationRequired",
            "packageInfo.size",
            "packageInfo.weight"
        ]
    );
    // Well-formed, refused by a business rule: 422, naming the field.
    let mut past = booking("acc-1");
    past["pickupTime"] = json!((Utc::now() - chrono::Duration::hours(2)).to_rfc3339());
    let refused = post(&s, Some(&token), &past, None).await.problem(422);
    assert_eq!(refused.code, "rule-violated");
    let fields: Vec<_> = refused.errors.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(fields, vec!["pickupTime"]);
    let mut bad_time = booking("acc-1");
    bad_time["pickupTime"] = json!("next tuesday");
    assert_eq!(
        post(&s, Some(&token), &bad_time, None).await.bad_fields(),
        vec!["pickupTime"]
    );
    let mut no_package = booking("acc-1");
    no_package["packageInfo"] = json!("box");
    assert_eq!(
        post(&s, Some(&token), &no_package, None).await.bad_fields(),
        vec!["packageInfo"]
    );
    assert_eq!(
        post(&s, Some(&token), &json!([1]), None).await.bad_fields(),
        vec!["body"]
    );
    let raw = s
        .app
        .client
        .post(s.app.url("/api/deliveryrequests"))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body("{\"ownerId\":")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), 400);
    let r = call(
        &s,
        Method::GET,
        "/api/deliveryrequests/not-a-uuid",
        &token,
        None,
    )
    .await;
    assert_eq!(r.bad_fields(), vec!["id"]);
    let r = post(
        &s,
        Some(&token),
        &booking("acc-1"),
        Some("has spaces in it"),
    )
    .await;
    assert_eq!(r.bad_fields(), vec!["Idempotency-Key"]);
    let unknown = Uuid::new_v4();
    let r = on_request(&s, Method::GET, unknown, &token, None).await;
    assert_eq!(r.problem(404).code, "not-found");
    let r = on_request(&s, Method::PATCH, unknown, &token, Some(&json!({}))).await;
    assert_eq!(r.bad_fields(), vec!["body"]);
    // Nothing above reached the log.
    assert!(all_requests(&s).await.is_empty());
    s.stop().await;
}

async fn authentication_and_ownership(backend: Backend) {
    let s = spawn_ingestion(backend, |_| {}).await;
    let r = post(&s, None, &booking("acc-1"), None).await;
    assert_eq!(r.problem(401).code, "unauthorized");
    let r = post(&s, Some("garbage"), &booking("acc-1"), None).await;
    assert_eq!(r.problem(401).code, "unauthorized");
    let expired = s
        .tokens
        .mint("acc-1", &[], chrono::Duration::hours(-1))
        .unwrap()
        .0;
    assert_eq!(
        post(&s, Some(&expired), &booking("acc-1"), None)
            .await
            .problem(401)
            .code,
        "unauthorized"
    );
    let other = s.token("acc-2", &[]);
    let r = post(&s, Some(&other), &booking("acc-1"), None).await;
    assert_eq!(r.problem(403).code, "forbidden");
    let admin = s.token("ops", &[ADMIN_SCOPE]);
    let r = post(&s, Some(&admin), &booking("acc-1"), None).await;
    assert_eq!(r.status, 202, "admin may book for any owner");
    let id = r.json::<DeliveryAccepted>().delivery_id;
    // The owner sees it; to another account it does not exist.
    let owner = s.token("acc-1", &[]);
    eventually_state(&s, id, &owner, RequestState::Accepted).await;
    let r = on_request(&s, Method::GET, id, &other, None).await;
    assert_eq!(r.problem(404).code, "not-found");
    let r = on_request(&s, Method::DELETE, id, &other, None).await;
    assert_eq!(r.problem(404).code, "not-found");
    s.stop().await;
}

async fn idempotency_key_gives_one_booking(backend: Backend) {
    let s = spawn_ingestion(backend, |_| {}).await;
    let token = s.token("acc-1", &[]);
    let first = post(&s, Some(&token), &booking("acc-1"), Some("order-42")).await;
    assert_eq!(first.status, 202, "{}", first.body);
    let second = post(&s, Some(&token), &booking("acc-1"), Some("order-42")).await;
    assert_eq!(second.status, 202);
    assert_eq!(second.header("idempotent-replayed"), Some("true"));
    let id = first.json::<DeliveryAccepted>().delivery_id;
    assert_eq!(second.json::<DeliveryAccepted>().delivery_id, id);
    // Another owner using the same key gets its own booking.
    let token2 = s.token("acc-2", &[]);
    let other = post(&s, Some(&token2), &booking("acc-2"), Some("order-42")).await;
    assert_ne!(other.json::<DeliveryAccepted>().delivery_id, id);

    let events = all_requests(&s).await;
    let copies = events.iter().filter(|e| e.key == id.to_string()).count();
    assert_eq!(copies, 1, "appended once");
    assert_eq!(events.len(), 2);
    s.stop().await;
}

async fn rate_limit_per_account(backend: Backend) {
    let s = spawn_ingestion(backend, |st| {
        st.ingestion.rate_per_second = 1;
        st.ingestion.rate_burst = 2;
    })
    .await;
    let token = s.token("acc-1", &[]);
    let body = booking("acc-1");
    let statuses: Vec<u16> =
        futures::future::join_all((0..4).map(|_| post(&s, Some(&token), &body, None)))
            .await
            .iter()
            .map(|r| r.status.as_u16())
            .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 202).count(),
        2,
        "{statuses:?}"
    );
    let limited = post(&s, Some(&token), &booking("acc-1"), None).await;
    assert_eq!(limited.problem(429).code, "rate-limited");
    assert!(limited.header("retry-after").is_some());
    // Other accounts have their own budget.
    let other = s.token("acc-2", &[]);
    assert_eq!(
        post(&s, Some(&other), &booking("acc-2"), None).await.status,
        202
    );
    s.stop().await;
}

async fn reschedule_and_cancel_reach_the_same_partition(backend: Backend) {
    let s = spawn_ingestion(backend, |_| {}).await;
    let token = s.token("acc-1", &[]);
    let id = book(&s, &token, "k1").await;
    let later = later();
    let r = on_request(&s, Method::PATCH, id, &token, Some(&later)).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let r = on_request(&s, Method::DELETE, id, &token, None).await;
    assert_eq!(r.status, 202, "{}", r.body);

    let partition = partition_for(&id.to_string(), s.settings.ingestion.partitions);
    let kinds = kinds_of(&s, id, Some(partition)).await;
    assert_eq!(
        kinds,
        vec![DELIVERY_REQUESTED, DELIVERY_RESCHEDULED, DELIVERY_CANCELLED]
    );
    s.stop().await;
}

async fn workflow_events_drive_the_request_state(backend: Backend) {
    let s = spawn_ingestion(backend, |_| {}).await;
    let token = s.token("acc-1", &[]);
    let id = book(&s, &token, "k2").await;
    let events = s
        .broker
        .log(WORKFLOW_EVENTS_LOG, s.settings.ingestion.partitions)
        .await
        .unwrap();
    let change = |state, version| {
        Envelope::new(
            WORKFLOW_STATE_CHANGED,
            1,
            &id.to_string(),
            &WorkflowStateChanged {
                delivery_id: id,
                owner_id: "acc-1".into(),
                state,
                version,
                detail: None,
                at: Utc::now(),
                package_id: None,
                drone_id: None,
                pickup_window: None,
                pickup_location: None,
                drop_off_location: None,
                pickup_time: None,
                revision: None,
                carrier_leg: None,
            },
        )
        .unwrap()
    };
    // The last is stale (a lower version arriving late): it never moves the state backwards.
    for (state, version) in [
        (RequestState::Scheduling, 1),
        (RequestState::Failed, 3),
        (RequestState::Scheduled, 2),
    ] {
        events.append(change(state, version)).await.unwrap();
    }
    eventually_state(&s, id, &token, RequestState::Failed).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let st = eventually_state(&s, id, &token, RequestState::Failed).await;
    assert_eq!(st.state, RequestState::Failed);
    // A failed booking can no longer be rescheduled.
    let later = later();
    let r = on_request(&s, Method::PATCH, id, &token, Some(&later)).await;
    assert_eq!(r.problem(409).code, "request-closed");
    s.stop().await;
}

async fn broker_outage_gives_503_and_nothing_half_accepted(backend: Backend) {
    let s = spawn_ingestion(backend, |_| {}).await;
    let token = s.token("acc-1", &[]);
    let before = post(&s, Some(&token), &booking("acc-1"), None).await;
    assert_eq!(before.status, 202);
    let accepted_before = before.json::<DeliveryAccepted>().delivery_id;

    s.proxy.set(Mode::Down);
    let mut refused = Vec::new();
    for _ in 0..5 {
        let started = std::time::Instant::now();
        let r = post(&s, Some(&token), &booking("acc-1"), None).await;
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "answered promptly"
        );
        refused.push(r);
    }
    for r in &refused {
        let p = r.problem(503);
        assert!(p.code == "log-unavailable", "{p:?}");
        assert!(r.header("retry-after").is_some());
    }
    let ready = s.app.get("/readyz").await;
    assert_eq!(
        ready.status, 503,
        "not ready while the broker is unreachable"
    );

    // The broker comes back: accepted again without a restart.
    s.proxy.set(Mode::Forward);
    let what = "a booking accepted again once the broker is back";
    let every = Duration::from_millis(200);
    let after = eventually_every(Duration::from_secs(20), every, what, async || {
        let r = post(&s, Some(&token), &booking("acc-1"), None).await;
        if r.status == 202 {
            Ok(r.json::<DeliveryAccepted>().delivery_id)
        } else {
            Err(r.body)
        }
    })
    .await;

    let ids: Vec<String> = all_requests(&s).await.into_iter().map(|e| e.key).collect();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for id in &ids {
        *counts.entry(id.clone()).or_default() += 1;
    }
    assert_eq!(counts.get(&accepted_before.to_string()), Some(&1));
    assert_eq!(counts.get(&after.to_string()), Some(&1));
    assert_eq!(
        ids.len(),
        2,
        "none of the refused requests is in the log: {ids:?}"
    );
    s.stop().await;
}

async fn full_budget_answers_503_at_once(backend: Backend) {
    let s = spawn_ingestion(backend, |st| st.ingestion.max_in_flight = 1).await;
    let token = s.token("acc-1", &[]);
    // Warm up the connection, then stall the broker so the next append waits for its confirm.
    assert_eq!(
        post(&s, Some(&token), &booking("acc-1"), None).await.status,
        202
    );
    s.proxy.set(Mode::Stall);
    let slow = {
        let client = s.app.client.clone();
        let url = s.app.url("/api/deliveryrequests");
        let token = token.clone();
        let body = booking("acc-1");
        tokio::spawn(async move {
            client
                .post(url)
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .map(|r| r.status().as_u16())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    let r = post(&s, Some(&token), &booking("acc-1"), None).await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refused at once"
    );
    assert_eq!(r.problem(503).code, "overloaded");
    s.proxy.set(Mode::Forward);
    assert_eq!(
        slow.await.unwrap().unwrap(),
        202,
        "the stalled booking completes"
    );
    s.stop().await;
}

/// `n` bookings of acc-1 at once, with the broker stalled for `stall` meanwhile; the answers.
async fn bookings_through_a_stall(
    s: &IngestionApp,
    token: &str,
    n: usize,
    stall: Duration,
) -> Vec<Reply> {
    s.proxy.set(Mode::Stall);
    let body = booking("acc-1");
    let all = futures::future::join_all((0..n).map(|_| post(s, Some(token), &body, None)));
    let forward = async {
        tokio::time::sleep(stall).await;
        s.proxy.set(Mode::Forward);
    };
    tokio::join!(all, forward).0
}

async fn slow_confirms_shrink_the_limit_and_the_excess_is_refused_not_lost(backend: Backend) {
    let s = spawn_ingestion(backend, |st| {
        st.ingestion.max_in_flight = 4;
        st.ingestion.admission = ingestion::AdmissionSettings {
            min_in_flight: 2,
            initial_in_flight: 4,
            latency_target_ms: 100,
            // What this test shows is the latency signal alone (a busy test machine must not
            // cut the limit too).
            worker_busy_target: 1.0,
        };
    })
    .await;
    let token = s.token("acc-1", &[]);
    let limit = async || {
        let metrics = common::metrics(&s.app).await;
        let line = metrics
            .lines()
            .find(|l| l.starts_with("ingestion_admission_limit "));
        line.and_then(|l| l.split(' ').nth(1)?.parse::<f64>().ok())
    };
    assert_eq!(limit().await, Some(4.0));
    // Four bookings whose confirms take ~400 ms, four times the target: one stall, one cut of a
    // tenth (4 × 0.9 = 3.6).
    let first = bookings_through_a_stall(&s, &token, 4, Duration::from_millis(400)).await;
    assert!(first.iter().all(|r| r.status == 202), "all four admitted");
    assert_eq!(limit().await, Some(3.0));
    // Now only three fit: the other seven are refused at once, while the three wait.
    let started = std::time::Instant::now();
    let second = bookings_through_a_stall(&s, &token, 10, Duration::from_millis(400)).await;
    let refused: Vec<_> = second.iter().filter(|r| r.status == 503).collect();
    assert_eq!(
        refused.len(),
        7,
        "{:?}",
        second.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    for r in &refused {
        assert_eq!(r.problem(503).code, "overloaded");
        assert!(r.header("retry-after").is_some());
    }
    assert!(started.elapsed() < Duration::from_secs(3));
    // Every 202 is in the log once; no refused booking is.
    let accepted: HashSet<String> = first
        .iter()
        .chain(&second)
        .filter(|r| r.status == 202)
        .map(|r| r.json::<DeliveryAccepted>().delivery_id.to_string())
        .collect();
    assert_eq!(accepted.len(), 7);
    let mut in_log: Vec<String> = all_requests(&s).await.into_iter().map(|e| e.key).collect();
    in_log.sort();
    let mut expected: Vec<String> = accepted.into_iter().collect();
    expected.sort();
    assert_eq!(
        in_log, expected,
        "exactly the 202s are in the log, once each"
    );
    s.stop().await;
}

async fn a_booking_is_found_right_after_its_202(backend: Backend) {
    use sea_orm::{ConnectionTrait, TransactionTrait};
    use secrecy::ExposeSecret;

    let s = spawn_ingestion(backend, |_| {}).await;
    let token = s.token("acc-1", &[]);
    // On PostgreSQL, hold off the batched read-model write (a lock that lets reads through but
    // not inserts), so every request below meets its booking before its row is written.
    let db = sea_orm::Database::connect(s.settings.database.url.expose_secret())
        .await
        .expect("connect");
    let lock = if backend == Backend::Postgres {
        let txn = db.begin().await.expect("begin");
        txn.execute_unprepared("LOCK TABLE delivery_requests IN SHARE MODE")
            .await
            .expect("lock");
        Some(txn)
    } else {
        None
    };
    let mut ids = Vec::new();
    for _ in 0..10 {
        let r = post(&s, Some(&token), &booking("acc-1"), None).await;
        assert_eq!(r.status, 202, "{}", r.body);
        let id = r.json::<DeliveryAccepted>().delivery_id;
        let got = on_request(&s, Method::GET, id, &token, None).await;
        assert_eq!(got.status, 200, "GET right after the 202: {}", got.body);
        assert_eq!(
            got.json::<DeliveryRequestStatus>().state,
            RequestState::Accepted
        );
        ids.push(id);
    }
    let later = later();
    for &id in &ids[..5] {
        let r = on_request(&s, Method::PATCH, id, &token, Some(&later)).await;
        assert_eq!(r.status, 202, "PATCH right after the 202: {}", r.body);
    }
    for &id in &ids[5..] {
        let r = on_request(&s, Method::DELETE, id, &token, None).await;
        assert_eq!(r.status, 202, "DELETE right after the 202: {}", r.body);
    }
    let other = s.token("acc-2", &[]);
    let r = on_request(&s, Method::GET, ids[0], &other, None).await;
    assert_eq!(r.problem(404).code, "not-found", "still only its owner's");

    // Once the write goes through, the rows are there, stored.
    if let Some(txn) = lock {
        txn.rollback().await.expect("unlock");
    }
    let (what, every) = ("10 stored rows", Duration::from_millis(50));
    eventually_every(Duration::from_secs(10), every, what, async || {
        let stored = db
            .query_one(sea_orm::Statement::from_string(
                db.get_database_backend(),
                "SELECT count(*) AS n FROM delivery_requests",
            ))
            .await
            .expect("count")
            .expect("a row");
        let stored: i64 = stored.try_get("", "n").expect("n");
        done_if(stored == 10, stored)
    })
    .await;
    for &id in &ids {
        let got = on_request(&s, Method::GET, id, &token, None).await;
        assert_eq!(got.status, 200, "{}", got.body);
    }
    db.close().await.ok();
    s.stop().await;
}

/// A problem body with what legitimately differs between two requests taken out: the id the
/// caller asked about (echoed in `detail`) and the request id.
fn problem_shape(r: &Reply, asked: Uuid) -> Value {
    let mut body = r.body.clone();
    let obj = body.as_object_mut().expect("a problem object");
    obj.remove("requestId");
    obj.remove("instance");
    if let Some(Value::String(detail)) = obj.get_mut("detail") {
        *detail = detail.replace(&asked.to_string(), "{id}");
    }
    body
}

/// Another account's booking is answered exactly as an unknown one (same status, problem type
/// and body), so a client learns nothing about bookings that are not its own, not even that
/// they exist or whose they are; nothing it sends about them reaches the log.
async fn another_accounts_booking_is_answered_as_unknown(backend: Backend) {
    let s = spawn_ingestion(backend, |_| {}).await;
    let owner = s.token("acc-owner-1", &[]);
    let r = post(&s, Some(&owner), &booking("acc-owner-1"), None).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.json::<DeliveryAccepted>().delivery_id;
    eventually_state(&s, id, &owner, RequestState::Accepted).await;

    let stranger = s.token("acc-stranger", &[]);
    let unknown = Uuid::new_v4();
    let later = later();
    for (method, body) in [
        (Method::GET, None),
        (Method::PATCH, Some(&later)),
        (Method::DELETE, None),
    ] {
        let theirs = on_request(&s, method.clone(), id, &stranger, body).await;
        let missing = on_request(&s, method.clone(), unknown, &stranger, body).await;
        let p = theirs.problem(404);
        assert_eq!(p.code, "not-found", "{method} of another account's booking");
        assert_eq!(
            (theirs.status, theirs.header("content-type")),
            (missing.status, missing.header("content-type")),
            "{method}: same status and media type as an unknown booking"
        );
        assert_eq!(
            problem_shape(&theirs, id),
            problem_shape(&missing, unknown),
            "{method}: the same problem as an unknown booking"
        );
        assert!(
            !theirs.body.to_string().contains("acc-owner-1"),
            "{method}: the owner is never named: {}",
            theirs.body
        );
    }
    // Its owner and an admin still reach it; the stranger's attempts changed nothing.
    assert_eq!(
        on_request(&s, Method::GET, id, &owner, None).await.status,
        200
    );
    let admin = s.token("ops", &[ADMIN_SCOPE]);
    assert_eq!(
        on_request(&s, Method::GET, id, &admin, None).await.status,
        200
    );
    let kinds = kinds_of(&s, id, None).await;
    assert_eq!(
        kinds,
        vec![DELIVERY_REQUESTED],
        "only the owner's booking is in the log"
    );
    s.stop().await;
}

/// A replay of an Idempotency-Key answers the booking the key first booked (same id, same
/// body), whatever the replay's body says; the log holds the first body once.
async fn idempotent_replay_answers_the_booking_as_first_accepted(backend: Backend) {
    let s = spawn_ingestion(backend, |_| {}).await;
    let token = s.token("acc-1", &[]);
    let first_body = booking("acc-1");
    let first = post(&s, Some(&token), &first_body, Some("order-77")).await;
    assert_eq!(first.status, 202, "{}", first.body);
    let accepted: DeliveryAccepted = first.json();

    let mut changed = booking("acc-1");
    changed["pickupLocation"] = json!("42 Elsewhere Ave, Tacoma");
    changed["pickupTime"] = json!((Utc::now() + chrono::Duration::days(9)).to_rfc3339());
    changed["packageInfo"]["packageId"] = json!("pkg-other");
    changed["expedited"] = json!(false);
    let mut past = booking("acc-1");
    past["pickupTime"] = json!((Utc::now() - chrono::Duration::hours(3)).to_rfc3339());
    for replay_body in [&first_body, &changed, &past] {
        let replay = post(&s, Some(&token), replay_body, Some("order-77")).await;
        assert_eq!(replay.status, 202, "{}", replay.body);
        assert_eq!(replay.header("idempotent-replayed"), Some("true"));
        assert_eq!(replay.header("location"), first.header("location"));
        assert_eq!(
            replay.json::<DeliveryAccepted>(),
            accepted,
            "the replay answers the booking as first accepted"
        );
        assert_eq!(replay.body, first.body);
    }

    let events = requests_of(&s, accepted.delivery_id, None).await;
    assert_eq!(events.len(), 1, "appended once");
    let event: DeliveryRequested = events[0].decode().unwrap();
    assert_eq!(event.pickup_location, "1 Main St, Redmond");
    assert_eq!(event.package_info.package_id, "pkg-1");
    s.stop().await;
}
