//! Steps several test files share: a service's standard endpoints and refusals, starting a suite
//! with a scheduler, reading metrics and the fleet, the compensation queue, and a client changing
//! its booking through Ingestion.

#![allow(dead_code)] // each test binary uses only some of these

use std::sync::Arc;
use std::time::Duration;

use contracts::{CompensationRequest, Fleet};
use integration_tests::faults::{Fault, FaultKind};
use integration_tests::{spawn_suite, Backend, Reply, Suite, SuiteFaults, SupervisorApp, TestApp};
use messaging::{QueueMessage, QueueOptions, QueueReceiver, WorkQueue};
use reqwest::Method;
use serde_json::Value;
use uuid::Uuid;

/// The account most scenarios book for.
pub const ACTIVE: (&str, &str) = ("acc-1", "active");

/// `times` answers of `kind` to the `method` calls under `prefix`, then the real service.
pub fn failing(method: &'static str, prefix: &str, times: usize, kind: FaultKind) -> Vec<Fault> {
    vec![Fault {
        method,
        path_prefix: prefix.into(),
        times,
        kind,
    }]
}

/// Every `method` call under `prefix` answered with `status`.
pub fn refusing(method: &'static str, prefix: &str, status: u16) -> Vec<Fault> {
    failing(method, prefix, usize::MAX, FaultKind::Status(status))
}

/// Every `method` call under `prefix` answered `delay` late.
pub fn delaying(method: &'static str, prefix: &str, delay: Duration) -> Vec<Fault> {
    failing(method, prefix, usize::MAX, FaultKind::Delay(delay))
}

/// A suite (behind `faults`) with the account `(id, status)` and a scheduler on it.
pub async fn suite_with_scheduler(
    backend: Backend,
    faults: SuiteFaults,
    (account, status): (&str, &str),
) -> (Suite, TestApp) {
    let suite = spawn_suite(backend, faults).await;
    suite.account(account, status).await;
    let scheduler = suite.start_scheduler(|_| {}).await;
    (suite, scheduler)
}

/// Stops the scheduler, then the suite.
pub async fn stop(suite: Suite, scheduler: TestApp) {
    scheduler.stop().await;
    suite.stop().await;
}

/// Stops the supervisor, the scheduler, then the suite.
pub async fn stop_with_supervisor(suite: Suite, scheduler: TestApp, supervisor: SupervisorApp) {
    supervisor.stop().await;
    stop(suite, scheduler).await;
}

/// The Prometheus text an app serves at `/metrics`.
pub async fn metrics(app: &TestApp) -> String {
    app.client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Upcoming reservations over the whole `fleet`.
pub fn reservations(fleet: &Fleet) -> u64 {
    fleet.drones.iter().map(|d| d.upcoming_reservations).sum()
}

/// Upcoming reservations over the whole fleet of the drone service `drone`.
pub async fn reserved_drones(drone: &TestApp) -> u64 {
    reservations(&drone.get("/api/drones").await.json())
}

/// Asserts the service is live and ready (its database checked ok) and serves its OpenAPI
/// document; returns that document.
pub async fn assert_ready_with_docs(app: &TestApp) -> Reply {
    assert_eq!(app.get("/healthz").await.status, 200);
    let ready = app.get("/readyz").await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    assert_eq!(ready.body["checks"]["database"]["status"], "ok");
    let doc = app.get("/openapi.json").await;
    assert_eq!(doc.status, 200);
    doc
}

/// Asserts `method path` (with `body`), sent with `token` or none, is refused as unauthorized.
pub async fn assert_unauthorized(
    app: &TestApp,
    method: Method,
    path: &str,
    body: Option<&Value>,
    token: Option<&str>,
) {
    let r = app.call_with(method, path, body, token).await;
    assert_eq!(r.problem(401).code, "unauthorized");
}

/// Sends the same PUT 20 times at once; asserts that none failed, exactly one created the
/// resource (201) and every other found it (`found`); the replies.
pub async fn put_20_at_once(app: &TestApp, path: &str, body: &Value, found: u16) -> Vec<Reply> {
    let replies = futures::future::join_all((0..20).map(|_| app.put(path, body))).await;
    let statuses: Vec<u16> = replies.iter().map(|r| r.status.as_u16()).collect();
    assert!(statuses.iter().all(|s| *s < 500), "no 5xx: {statuses:?}");
    let count = |status: u16| statuses.iter().filter(|s| **s == status).count();
    assert_eq!(count(201), 1, "exactly one create: {statuses:?}");
    assert_eq!(count(found), 19, "every other PUT finds it: {statuses:?}");
    replies
}

/// Sends `bytes` as an `application/json` body, as they are (malformed, empty, oversized).
pub async fn raw_json(app: &TestApp, method: Method, path: &str, bytes: &[u8]) -> Reply {
    app.call_raw(method, path, "application/json", bytes.to_vec())
        .await
}

/// The queue the Scheduler asks the Supervisor for compensations on.
pub async fn compensations(suite: &Suite) -> Arc<dyn WorkQueue> {
    suite
        .ingestion
        .broker
        .queue(
            contracts::COMPENSATIONS_QUEUE,
            QueueOptions { delivery_limit: 10 },
        )
        .await
        .unwrap()
}

/// The next compensation request on `rx` (within 10 s), and its message to ack.
pub async fn next_compensation(rx: &mut QueueReceiver) -> (CompensationRequest, QueueMessage) {
    let message = tokio::time::timeout(Duration::from_secs(10), rx.next())
        .await
        .unwrap()
        .unwrap();
    (message.event.decode().unwrap(), message)
}

/// A client (signed in with `token`) calls `method` on its booking `id` through Ingestion.
pub async fn client_call(
    suite: &Suite,
    token: &str,
    method: Method,
    id: Uuid,
    body: Option<&Value>,
) -> Reply {
    let path = format!("/api/deliveryrequests/{id}");
    let app = &suite.ingestion.app;
    app.call_with(method, &path, body, Some(token)).await
}

/// The client `owner` changes (PATCH) or cancels (DELETE) its booking `id` through Ingestion,
/// which accepts it.
pub async fn client_changes(
    suite: &Suite,
    owner: &str,
    method: Method,
    id: Uuid,
    body: Option<&Value>,
) -> Reply {
    let token = suite.ingestion.token(owner, &[]);
    let r = client_call(suite, &token, method, id, body).await;
    assert_eq!(r.status, 202, "{}", r.body);
    r
}

/// A pickup time `hours` from now, in whole minutes (keeps reservation windows easy to reason
/// about).
pub fn pickup(hours: i64) -> chrono::DateTime<chrono::Utc> {
    use chrono::TimeZone;
    let t = chrono::Utc::now() + chrono::Duration::hours(hours);
    chrono::Utc
        .timestamp_opt(t.timestamp() / 60 * 60, 0)
        .single()
        .unwrap_or(t)
}
