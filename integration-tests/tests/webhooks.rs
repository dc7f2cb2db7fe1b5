//! Signed webhooks of client accounts, on PostgreSQL and SQLite: a local receiver checks every
//! signature and records what arrives; the tests publish the saga's and the Delivery service's
//! events on `workflow-events` themselves, so each booking's history is exactly known.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step should panic

use std::net::TcpListener;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use chrono::Utc;
use contracts::{
    DeliveryStage, DeliveryTracked, RequestState, WebhookDelivery, WebhookDeliveryPage,
    WebhookDeliveryStatus, WebhookEvent, WebhookEventType, WebhookSubscription,
    WorkflowStateChanged, DELIVERY_TRACKED, WORKFLOW_EVENTS_LOG, WORKFLOW_STATE_CHANGED,
};
use hmac::{Hmac, Mac};
use integration_tests::{
    both_backends, done_if, eventually, spawn_ingestion, Backend, IngestionApp, Reply,
};
use messaging::{Envelope, PartitionedLog};
use reqwest::Method;
use serde_json::{json, Value};
use sha2::Sha256;
use uuid::Uuid;

both_backends!(
    every_change_of_a_booking_arrives_signed_and_in_order,
    a_receiver_that_was_down_gets_everything_afterwards_in_order,
    private_and_http_urls_are_refused_by_default,
    deliveries_are_the_accounts_own_and_redeliver_sends_again,
    a_delivery_given_up_lets_the_next_event_of_its_booking_proceed,
    two_replicas_on_one_database_send_each_event_once_in_order,
    a_restart_continues_the_retry_schedule,
    real_bookings_reach_their_receiver_from_scheduled_to_delivered,
);

/// What the receiver saw of one POST.
#[derive(Debug, Clone)]
struct Received {
    /// What it answered.
    answered: u16,
    webhook_id: String,
    timestamp: String,
    signature: String,
    content_type: String,
    user_agent: String,
    body: Vec<u8>,
}

impl Received {
    fn event(&self) -> WebhookEvent {
        serde_json::from_slice(&self.body).expect("a webhook event body")
    }

    /// Asserts the signature is `v1=` hex HMAC-SHA256(secret, "{timestamp}.{body}").
    fn verify(&self, secret: &str) {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(format!("{}.", self.timestamp).as_bytes());
        mac.update(&self.body);
        let expected: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            self.signature,
            format!("v1={expected}"),
            "signature of {}",
            self.webhook_id
        );
        let ts: i64 = self.timestamp.parse().expect("unix seconds");
        assert!(
            (Utc::now().timestamp() - ts).abs() < 120,
            "timestamp {ts} is recent"
        );
        assert_eq!(
            self.webhook_id,
            self.event().id.to_string(),
            "Webhook-Id is the event id"
        );
        assert!(self.content_type.starts_with("application/json"));
        assert!(!self.user_agent.is_empty(), "a User-Agent");
    }
}

/// A webhook receiver on 127.0.0.1 that answers `answer` (settable) and records every POST.
struct Receiver {
    port: u16,
    answer: Arc<AtomicU16>,
    /// Events of this type are answered 503 whatever `answer` says.
    refuse: Arc<Mutex<Option<WebhookEventType>>>,
    seen: Arc<Mutex<Vec<Received>>>,
    server: actix_web::dev::ServerHandle,
}

impl Receiver {
    /// On `port` (0: any free one).
    async fn start(port: u16, answer: u16) -> Receiver {
        let answer = Arc::new(AtomicU16::new(answer));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let refuse = Arc::new(Mutex::new(None));
        let (a, s, no) = (answer.clone(), seen.clone(), refuse.clone());
        let server = HttpServer::new(move || {
            let (a, s, no) = (a.clone(), s.clone(), no.clone());
            App::new().default_service(web::to(move |req: HttpRequest, body: web::Bytes| {
                let (a, s, no) = (a.clone(), s.clone(), no.clone());
                async move {
                    let header = |n: &str| {
                        req.headers()
                            .get(n)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned()
                    };
                    let kind = serde_json::from_slice::<WebhookEvent>(&body)
                        .ok()
                        .map(|e| e.kind);
                    let refused = kind.is_some() && kind == *no.lock().unwrap();
                    let answered = if refused {
                        503
                    } else {
                        a.load(Ordering::SeqCst)
                    };
                    s.lock().unwrap().push(Received {
                        answered,
                        webhook_id: header("webhook-id"),
                        timestamp: header("webhook-timestamp"),
                        signature: header("webhook-signature"),
                        content_type: header("content-type"),
                        user_agent: header("user-agent"),
                        body: body.to_vec(),
                    });
                    HttpResponse::build(actix_web::http::StatusCode::from_u16(answered).unwrap())
                        .finish()
                }
            }))
        })
        .workers(1)
        .disable_signals()
        .bind(("127.0.0.1", port))
        .expect("receiver binds");
        let port = server.addrs()[0].port();
        let server = server.run();
        let handle = server.handle();
        tokio::spawn(server);
        Receiver {
            port,
            answer,
            refuse,
            seen,
            server: handle,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hooks/drone", self.port)
    }

    fn seen(&self) -> Vec<Received> {
        self.seen.lock().unwrap().clone()
    }

    /// The POSTs it answered with a 2xx, as (type, deliveryId).
    fn accepted(&self) -> Vec<(WebhookEventType, Uuid)> {
        self.seen()
            .iter()
            .filter(|r| (200..300).contains(&r.answered))
            .map(|r| {
                let e = r.event();
                (e.kind, e.delivery_id)
            })
            .collect()
    }

    async fn stop(self) {
        self.server.stop(false).await;
    }
}

/// A port nothing listens on (right now).
fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Ingestion that may call receivers on this machine, retrying within a fraction of a second.
async fn spawn_fast(backend: Backend) -> IngestionApp {
    spawn_ingestion(backend, fast).await
}

fn fast(s: &mut ingestion::Settings) {
    let w = &mut s.ingestion.webhooks;
    w.allow_http = true;
    w.allow_private_addresses = true;
    w.min_delay_ms = 100;
    w.max_delay_ms = 300;
    w.poll_interval_ms = 50;
    w.timeout_ms = 2_000;
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

async fn register(s: &IngestionApp, token: &str, urls: &[String]) -> Reply {
    call(
        s,
        Method::PUT,
        "/api/webhooks",
        token,
        Some(&json!({ "urls": urls })),
    )
    .await
}

async fn deliveries(s: &IngestionApp, token: &str, query: &str) -> WebhookDeliveryPage {
    let r = call(
        s,
        Method::GET,
        &format!("/api/webhooks/deliveries{query}"),
        token,
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

async fn events_log(s: &IngestionApp) -> Arc<dyn PartitionedLog> {
    s.broker
        .log(WORKFLOW_EVENTS_LOG, s.settings.ingestion.partitions)
        .await
        .unwrap()
}

/// Appends a saga state change of booking `id` (of `owner`).
async fn change(
    log: &Arc<dyn PartitionedLog>,
    owner: &str,
    id: Uuid,
    state: RequestState,
    version: i64,
    revision: Option<u32>,
) {
    let body = WorkflowStateChanged {
        delivery_id: id,
        owner_id: owner.into(),
        state,
        version,
        detail: (state == RequestState::Cancelled).then(|| "cancelled by the client".into()),
        at: Utc::now(),
        package_id: Some("pkg-1".into()),
        drone_id: Some("drone-007".into()),
        pickup_window: None,
        pickup_location: Some("1 Main St".into()),
        drop_off_location: Some("2 Side St".into()),
        pickup_time: Some(Utc::now() + chrono::Duration::days(1)),
        revision,
        carrier_leg: None,
    };
    let e = Envelope::new(WORKFLOW_STATE_CHANGED, 1, &id.to_string(), &body).unwrap();
    log.append(e).await.unwrap();
}

/// Appends a tracking event of booking `id`.
async fn tracked(
    log: &Arc<dyn PartitionedLog>,
    owner: &str,
    id: Uuid,
    sequence: i64,
    stage: DeliveryStage,
) {
    let body = DeliveryTracked {
        delivery_id: id.to_string(),
        owner_id: owner.into(),
        drone_id: "drone-007".into(),
        sequence,
        stage,
        location: Some("47.6,-122.3".into()),
        detail: None,
        at: Utc::now(),
    };
    let e = Envelope::new(DELIVERY_TRACKED, 1, &id.to_string(), &body).unwrap();
    log.append(e).await.unwrap();
}

/// Waits until the receiver accepted `n` POSTs, then a little longer to catch any extra one.
async fn accepted(r: &Receiver, n: usize) -> Vec<(WebhookEventType, Uuid)> {
    eventually(
        Duration::from_secs(30),
        format!("{n} webhooks accepted"),
        async || {
            let got = r.accepted();
            done_if(got.len() >= n, format!("{got:?}"))
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    r.accepted()
}

async fn every_change_of_a_booking_arrives_signed_and_in_order(backend: Backend) {
    let s = spawn_fast(backend).await;
    let token = s.token("acc-1", &[]);
    let receiver = Receiver::start(0, 200).await;

    let r = register(&s, &token, &[receiver.url()]).await;
    assert_eq!(
        r.status, 201,
        "first registration creates the secret: {}",
        r.body
    );
    let sub: WebhookSubscription = r.json();
    assert!(sub.secret.len() >= 32, "a real secret");
    assert_eq!(sub.urls, vec![receiver.url()]);
    // Registering again keeps the secret; GET shows it.
    let again = register(&s, &token, &[receiver.url()]).await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.json::<WebhookSubscription>().secret, sub.secret);
    let shown = call(&s, Method::GET, "/api/webhooks", &token, None).await;
    assert_eq!(shown.json::<WebhookSubscription>().secret, sub.secret);

    let log = events_log(&s).await;
    let (a, b, other) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    // Booking a: scheduled, rescheduled, cancelled; with what clients are not told about, and
    // a duplicate announcement of "scheduled" (a re-relayed outbox row).
    change(&log, "acc-1", a, RequestState::Scheduling, 1, Some(0)).await;
    change(&log, "acc-1", a, RequestState::Scheduled, 2, Some(0)).await;
    change(&log, "acc-1", a, RequestState::Scheduled, 2, Some(0)).await;
    change(&log, "acc-1", a, RequestState::Scheduling, 3, Some(1)).await;
    change(&log, "acc-1", a, RequestState::Scheduled, 4, Some(1)).await;
    change(&log, "acc-1", a, RequestState::Cancelled, 5, Some(1)).await;
    // Booking b: scheduled, then delivered (tracking stage Completed).
    change(&log, "acc-1", b, RequestState::Scheduled, 2, None).await;
    tracked(&log, "acc-1", b, 1, DeliveryStage::Created).await;
    tracked(&log, "acc-1", b, 2, DeliveryStage::HeadedToDropoff).await;
    tracked(&log, "acc-1", b, 3, DeliveryStage::Completed).await;
    // Another account's booking never reaches acc-1's endpoint.
    change(&log, "acc-2", other, RequestState::Scheduled, 2, None).await;

    let got = accepted(&receiver, 5).await;
    let of = |id: Uuid| -> Vec<WebhookEventType> {
        got.iter()
            .filter(|(_, d)| *d == id)
            .map(|(k, _)| *k)
            .collect()
    };
    assert_eq!(
        of(a),
        vec![
            WebhookEventType::Scheduled,
            WebhookEventType::Rescheduled,
            WebhookEventType::Cancelled
        ]
    );
    assert_eq!(
        of(b),
        vec![WebhookEventType::Scheduled, WebhookEventType::Delivered]
    );
    assert_eq!(got.len(), 5, "nothing else: {got:?}");
    let seen = receiver.seen();
    assert_eq!(seen.len(), 5, "one POST each");
    for r in &seen {
        r.verify(&sub.secret);
    }
    // What the body carries.
    let events: Vec<WebhookEvent> = seen.iter().map(Received::event).collect();
    let rescheduled = events
        .iter()
        .find(|e| e.kind == WebhookEventType::Rescheduled)
        .unwrap();
    assert_eq!(rescheduled.data.revision, Some(1));
    assert_eq!(rescheduled.data.state, Some(RequestState::Scheduled));
    assert_eq!(rescheduled.data.drone_id.as_deref(), Some("drone-007"));
    let body: Value = serde_json::from_slice(&seen[0].body).unwrap();
    for key in ["id", "type", "deliveryId", "occurredAt", "data"] {
        assert!(body.get(key).is_some(), "body has {key}: {body}");
    }
    let delivered = events
        .iter()
        .find(|e| e.kind == WebhookEventType::Delivered)
        .unwrap();
    assert_eq!(delivered.data.stage, Some(DeliveryStage::Completed));

    // The delivery log: newest first, in pages, each delivered at the first attempt.
    let all = deliveries(&s, &token, "").await;
    assert_eq!(all.items.len(), 5, "{:?}", all.items);
    assert!(all.next_cursor.is_none());
    for d in &all.items {
        assert_eq!(d.status, WebhookDeliveryStatus::Delivered, "{d:?}");
        assert_eq!((d.attempts, d.last_status_code), (1, Some(200)), "{d:?}");
        assert_eq!(d.url, receiver.url());
        assert!(
            d.delivered_at.is_some() && d.next_attempt_at.is_none(),
            "{d:?}"
        );
    }
    assert!(all
        .items
        .windows(2)
        .all(|w| w[0].created_at >= w[1].created_at));
    let first = deliveries(&s, &token, "?limit=2").await;
    let cursor = first.next_cursor.clone().expect("a next page");
    let second = deliveries(&s, &token, &format!("?limit=2&cursor={cursor}")).await;
    let third = deliveries(
        &s,
        &token,
        &format!("?limit=2&cursor={}", second.next_cursor.clone().unwrap()),
    )
    .await;
    assert!(third.next_cursor.is_none());
    let paged: Vec<Uuid> = [first.items, second.items, third.items]
        .concat()
        .iter()
        .map(|d| d.id)
        .collect();
    let listed: Vec<Uuid> = all.items.iter().map(|d| d.id).collect();
    assert_eq!(paged, listed);
    for bad in ["?limit=0", "?limit=101", "?limit=x"] {
        let r = call(
            &s,
            Method::GET,
            &format!("/api/webhooks/deliveries{bad}"),
            &token,
            None,
        )
        .await;
        assert_eq!(r.bad_fields(), vec!["limit"], "{bad}");
    }
    let r = call(
        &s,
        Method::GET,
        "/api/webhooks/deliveries?cursor=nope",
        &token,
        None,
    )
    .await;
    assert_eq!(r.bad_fields(), vec!["cursor"]);

    // Removing the endpoints: nothing registered any more; removing again is fine.
    let r = call(&s, Method::DELETE, "/api/webhooks", &token, None).await;
    assert_eq!(r.status, 204);
    let r = call(&s, Method::DELETE, "/api/webhooks", &token, None).await;
    assert_eq!(r.status, 204);
    let r = call(&s, Method::GET, "/api/webhooks", &token, None).await;
    assert_eq!(r.problem(404).code, "not-found");
    receiver.stop().await;
    s.stop().await;
}

async fn a_receiver_that_was_down_gets_everything_afterwards_in_order(backend: Backend) {
    let s = spawn_fast(backend).await;
    let token = s.token("acc-1", &[]);
    // Nothing listens there yet.
    let port = closed_port();
    let url = format!("http://127.0.0.1:{port}/hooks/drone");
    let r = register(&s, &token, std::slice::from_ref(&url)).await;
    let secret = r.json::<WebhookSubscription>().secret;

    let log = events_log(&s).await;
    let id = Uuid::new_v4();
    change(&log, "acc-1", id, RequestState::Scheduled, 2, Some(0)).await;
    change(&log, "acc-1", id, RequestState::Scheduled, 4, Some(1)).await;
    change(&log, "acc-1", id, RequestState::Scheduled, 6, Some(2)).await;
    change(&log, "acc-1", id, RequestState::Cancelled, 7, Some(2)).await;

    // Unreachable: the first event is retried (and logged so); the later ones wait their turn.
    eventually(
        Duration::from_secs(30),
        "retries of the first event",
        async || {
            let page = deliveries(&s, &token, "").await;
            let retried = page.items.iter().find(|d| d.attempts >= 2);
            done_if(
                retried.is_some() && page.items.len() == 4,
                format!("{:?}", page.items),
            )
        },
    )
    .await;
    let page = deliveries(&s, &token, "").await;
    for d in &page.items {
        assert_eq!(d.status, WebhookDeliveryStatus::Pending, "{d:?}");
        if d.kind == WebhookEventType::Scheduled {
            assert!(d.attempts >= 2, "{d:?}");
            assert!(
                d.last_error.is_some() && d.last_status_code.is_none(),
                "{d:?}"
            );
            assert!(d.next_attempt_at.is_some(), "{d:?}");
        } else {
            assert_eq!(d.attempts, 0, "a later event waits for the first: {d:?}");
        }
    }

    // Up but failing: 503s, still only the first event.
    let receiver = Receiver::start(port, 503).await;
    eventually(Duration::from_secs(30), "3 answers of 503", async || {
        let n = receiver.seen().len();
        done_if(n >= 3, n)
    })
    .await;
    let failing = receiver.seen();
    let first_id = failing[0].webhook_id.clone();
    assert!(
        failing
            .iter()
            .all(|r| r.webhook_id == first_id && r.body == failing[0].body),
        "only the first event is tried, with the same id and body every time"
    );
    assert_eq!(failing[0].event().kind, WebhookEventType::Scheduled);
    let page = deliveries(&s, &token, "").await;
    let first = page
        .items
        .iter()
        .find(|d| d.kind == WebhookEventType::Scheduled)
        .unwrap();
    assert_eq!(first.last_status_code, Some(503), "{first:?}");

    // Back: everything arrives, in order, each signed.
    receiver.answer.store(200, Ordering::SeqCst);
    let got = accepted(&receiver, 4).await;
    assert_eq!(
        got,
        vec![
            (WebhookEventType::Scheduled, id),
            (WebhookEventType::Rescheduled, id),
            (WebhookEventType::Rescheduled, id),
            (WebhookEventType::Cancelled, id),
        ]
    );
    let revisions: Vec<Option<u32>> = receiver
        .seen()
        .iter()
        .filter(|r| r.answered == 200)
        .map(|r| r.event().data.revision)
        .collect();
    assert_eq!(revisions, vec![Some(0), Some(1), Some(2), Some(2)]);
    for r in receiver.seen() {
        r.verify(&secret);
    }
    let page = deliveries(&s, &token, "").await;
    for d in &page.items {
        assert_eq!(d.status, WebhookDeliveryStatus::Delivered, "{d:?}");
        assert_eq!(d.last_status_code, Some(200));
    }
    let first = page
        .items
        .iter()
        .find(|d| d.kind == WebhookEventType::Scheduled)
        .unwrap();
    assert!(
        first.attempts >= 5,
        "2+ unreachable, 3+ refused, 1 delivered: {first:?}"
    );
    receiver.stop().await;
    s.stop().await;
}

async fn private_and_http_urls_are_refused_by_default(backend: Backend) {
    // Production settings: https only, public addresses only.
    let s = spawn_ingestion(backend, |_| {}).await;
    let token = s.token("acc-1", &[]);
    let fields = |r: &Reply| -> Vec<(String, String)> {
        r.problem(400)
            .errors
            .into_iter()
            .map(|e| (e.field, e.reason))
            .collect()
    };
    for (url, why) in [
        ("https://127.0.0.1:8443/hooks", "loopback"),
        ("https://localhost/hooks", "localhost"),
        ("https://[::1]/hooks", "loopback"),
        ("https://10.1.2.3/hooks", "private"),
        ("https://192.168.0.10/hooks", "private"),
        ("https://169.254.169.254/latest", "link-local"),
        ("https://[fd00::1]/hooks", "private"),
        ("https://0.0.0.0/hooks", "unspecified"),
        ("http://93.184.216.34/hooks", "https"),
    ] {
        let r = register(&s, &token, &[url.to_owned()]).await;
        let f = fields(&r);
        assert_eq!(f.len(), 1, "{url}: {f:?}");
        assert_eq!(f[0].0, "urls[0]", "{url}");
        assert!(f[0].1.contains(why), "{url}: {}", f[0].1);
    }
    // Every bad field at once, shape and policy alike.
    let r = call(
        &s,
        Method::PUT,
        "/api/webhooks",
        &token,
        Some(&json!({"urls": ["https://93.184.216.34/ok", "ftp://example.com/x", 7, "https://10.0.0.1/x", "https://93.184.216.34/ok"]})),
    )
    .await;
    let named: Vec<String> = fields(&r).into_iter().map(|(f, _)| f).collect();
    assert_eq!(named, vec!["urls[1]", "urls[2]", "urls[3]", "urls[4]"]);
    for body in [
        json!({}),
        json!({"urls": []}),
        json!({"urls": "https://a.example"}),
    ] {
        let r = call(&s, Method::PUT, "/api/webhooks", &token, Some(&body)).await;
        assert_eq!(r.bad_fields(), vec!["urls"], "{body}");
    }
    let six: Vec<String> = (0..6)
        .map(|i| format!("https://93.184.216.{i}/h"))
        .collect();
    assert_eq!(register(&s, &token, &six).await.bad_fields(), vec!["urls"]);
    // Nothing was registered by any of that.
    let r = call(&s, Method::GET, "/api/webhooks", &token, None).await;
    assert_eq!(r.status, 404);
    // A public https endpoint is accepted; without a token nothing is.
    let r = register(&s, &token, &["https://93.184.216.34/hooks".to_owned()]).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let r = s
        .app
        .call_with(Method::GET, "/api/webhooks", None, None)
        .await;
    assert_eq!(r.problem(401).code, "unauthorized");
    let r = s
        .app
        .client
        .put(s.app.url("/api/webhooks"))
        .bearer_auth(&token)
        .header("content-type", "text/plain")
        .body("urls=https://93.184.216.34/hooks")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    // (The body is read before the token is checked, as on every JSON route.)
    let r = s
        .app
        .call_raw(
            Method::PUT,
            "/api/webhooks",
            "application/json",
            b"{\"urls\": [".to_vec(),
        )
        .await;
    assert_eq!(r.problem(400).code, "malformed-json");
    // The routes are in Ingestion's OpenAPI document.
    let doc = s.app.get("/openapi.json").await;
    for path in [
        "/api/webhooks",
        "/api/webhooks/deliveries",
        "/api/webhooks/deliveries/{id}/redeliver",
    ] {
        assert!(
            doc.body["paths"].get(path).is_some(),
            "{path} is documented"
        );
    }
    s.stop().await;
}

async fn deliveries_are_the_accounts_own_and_redeliver_sends_again(backend: Backend) {
    let s = spawn_fast(backend).await;
    let (mine, theirs) = (s.token("acc-1", &[]), s.token("acc-2", &[]));
    let receiver = Receiver::start(0, 200).await;
    let secret = register(&s, &mine, &[receiver.url()])
        .await
        .json::<WebhookSubscription>()
        .secret;
    let log = events_log(&s).await;
    let id = Uuid::new_v4();
    change(&log, "acc-1", id, RequestState::Scheduled, 2, None).await;
    assert_eq!(
        accepted(&receiver, 1).await,
        vec![(WebhookEventType::Scheduled, id)]
    );
    let delivery: WebhookDelivery = deliveries(&s, &mine, "").await.items.remove(0);

    // Another account sees none of it and cannot redeliver it (answered as unknown).
    assert!(deliveries(&s, &theirs, "").await.items.is_empty());
    let path = format!("/api/webhooks/deliveries/{}/redeliver", delivery.id);
    let r = call(&s, Method::POST, &path, &theirs, None).await;
    assert_eq!(r.problem(404).code, "not-found");
    let r = call(&s, Method::GET, "/api/webhooks", &theirs, None).await;
    assert_eq!(r.status, 404);
    let r = call(
        &s,
        Method::POST,
        "/api/webhooks/deliveries/not-a-uuid/redeliver",
        &mine,
        None,
    )
    .await;
    assert_eq!(r.bad_fields(), vec!["id"]);

    // The owner redelivers it: the same event again, signed again.
    let r = call(&s, Method::POST, &path, &mine, None).await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(
        r.json::<WebhookDelivery>().status,
        WebhookDeliveryStatus::Pending
    );
    assert_eq!(
        accepted(&receiver, 2).await,
        vec![
            (WebhookEventType::Scheduled, id),
            (WebhookEventType::Scheduled, id)
        ]
    );
    let seen = receiver.seen();
    assert_eq!(seen[0].webhook_id, seen[1].webhook_id, "the same event id");
    assert_eq!(seen[0].body, seen[1].body, "the same body");
    for r in &seen {
        r.verify(&secret);
    }
    let after = eventually(
        Duration::from_secs(10),
        "the redelivery in the log",
        async || {
            let d = deliveries(&s, &mine, "").await.items.remove(0);
            done_if(
                d.status == WebhookDeliveryStatus::Delivered && d.attempts == 2,
                format!("{d:?}"),
            )
        },
    )
    .await;
    assert!(after.contains("Delivered"));

    // After the endpoint is removed, its deliveries can no longer be redelivered.
    let other = Receiver::start(0, 200).await;
    register(&s, &mine, &[other.url()]).await;
    let r = call(&s, Method::POST, &path, &mine, None).await;
    assert_eq!(r.problem(409).code, "endpoint-removed");
    other.stop().await;
    receiver.stop().await;
    s.stop().await;
}

async fn a_delivery_given_up_lets_the_next_event_of_its_booking_proceed(backend: Backend) {
    let s = spawn_ingestion(backend, |s| {
        let w = &mut s.ingestion.webhooks;
        w.allow_http = true;
        w.allow_private_addresses = true;
        w.min_delay_ms = 100;
        w.max_delay_ms = 200;
        w.poll_interval_ms = 50;
        w.retry_for_secs = 1;
    })
    .await;
    let token = s.token("acc-1", &[]);
    let receiver = Receiver::start(0, 200).await;
    *receiver.refuse.lock().unwrap() = Some(WebhookEventType::Scheduled);
    register(&s, &token, &[receiver.url()]).await;
    let log = events_log(&s).await;
    let id = Uuid::new_v4();
    change(&log, "acc-1", id, RequestState::Scheduled, 2, None).await;
    change(&log, "acc-1", id, RequestState::Scheduled, 4, Some(1)).await;

    // The first is refused until its retry period is over, then given up; the next proceeds.
    assert_eq!(
        accepted(&receiver, 1).await,
        vec![(WebhookEventType::Rescheduled, id)]
    );
    let kinds: Vec<WebhookEventType> = receiver.seen().iter().map(|r| r.event().kind).collect();
    let first_next = kinds
        .iter()
        .position(|k| *k == WebhookEventType::Rescheduled)
        .unwrap();
    assert!(first_next >= 2, "retried before giving up: {kinds:?}");
    assert!(
        kinds[..first_next]
            .iter()
            .all(|k| *k == WebhookEventType::Scheduled),
        "nothing later was sent before the first was given up: {kinds:?}"
    );
    let page = deliveries(&s, &token, "").await;
    let first = page
        .items
        .iter()
        .find(|d| d.kind == WebhookEventType::Scheduled)
        .unwrap();
    assert_eq!(first.status, WebhookDeliveryStatus::Failed, "{first:?}");
    assert_eq!(first.last_status_code, Some(503));
    assert_eq!(first.attempts as usize, first_next, "{first:?}");
    assert!(first.next_attempt_at.is_none() && first.delivered_at.is_none());
    let next = page
        .items
        .iter()
        .find(|d| d.kind == WebhookEventType::Rescheduled)
        .unwrap();
    assert_eq!(
        (next.status, next.attempts),
        (WebhookDeliveryStatus::Delivered, 1)
    );
    receiver.stop().await;
    s.stop().await;
}

async fn two_replicas_on_one_database_send_each_event_once_in_order(backend: Backend) {
    let s = spawn_fast(backend).await;
    // A second replica: the same database and log, its own port.
    let replica =
        integration_tests::spawn::<ingestion::Application>(s.settings.clone(), None).await;
    let token = s.token("acc-1", &[]);
    let receiver = Receiver::start(0, 200).await;
    let r = replica
        .call_with(
            Method::PUT,
            "/api/webhooks",
            Some(&json!({"urls": [receiver.url()]})),
            Some(&token),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let log = events_log(&s).await;
    let bookings: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
    for id in &bookings {
        change(&log, "acc-1", *id, RequestState::Scheduled, 2, None).await;
    }
    for id in &bookings {
        change(&log, "acc-1", *id, RequestState::Scheduled, 4, Some(1)).await;
        change(&log, "acc-1", *id, RequestState::Cancelled, 5, Some(1)).await;
    }
    let got = accepted(&receiver, 12).await;
    assert_eq!(got.len(), 12, "each event once: {got:?}");
    for id in &bookings {
        let of: Vec<WebhookEventType> = got
            .iter()
            .filter(|(_, d)| d == id)
            .map(|(k, _)| *k)
            .collect();
        assert_eq!(
            of,
            vec![
                WebhookEventType::Scheduled,
                WebhookEventType::Rescheduled,
                WebhookEventType::Cancelled
            ],
            "booking {id}"
        );
    }
    assert_eq!(receiver.seen().len(), 12, "no attempt was sent twice");
    let page = deliveries(&s, &token, "").await;
    assert_eq!(
        page.items.len(),
        12,
        "one delivery per event, whichever replica read it"
    );
    assert!(page.items.iter().all(|d| d.attempts == 1));
    replica.stop().await;
    receiver.stop().await;
    s.stop().await;
}

async fn a_restart_continues_the_retry_schedule(backend: Backend) {
    // `s` keeps the database and serves the API only; replicas on it follow and send.
    let s = spawn_ingestion(backend, |s| {
        fast(s);
        s.ingestion.webhooks.enabled = false;
    })
    .await;
    let mut sending = s.settings.clone();
    sending.ingestion.webhooks.enabled = true;
    let first = integration_tests::spawn::<ingestion::Application>(sending.clone(), None).await;
    let token = s.token("acc-1", &[]);
    let port = closed_port();
    let url = format!("http://127.0.0.1:{port}/hooks/drone");
    register(&s, &token, std::slice::from_ref(&url)).await;
    let log = events_log(&s).await;
    let id = Uuid::new_v4();
    change(&log, "acc-1", id, RequestState::Scheduled, 2, None).await;
    change(&log, "acc-1", id, RequestState::Cancelled, 3, None).await;
    let before = eventually(
        Duration::from_secs(30),
        "attempts while unreachable",
        async || {
            let items = deliveries(&s, &token, "").await.items;
            let attempts: u32 = items.iter().map(|d| d.attempts).sum();
            done_if(items.len() == 2 && attempts >= 2, attempts)
        },
    )
    .await;
    first.stop().await;

    // Stopped: nothing sends. Then the receiver is up and another replica starts.
    let receiver = Receiver::start(port, 200).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        receiver.seen().is_empty(),
        "nothing sends while no replica runs"
    );
    let second = integration_tests::spawn::<ingestion::Application>(sending, None).await;
    assert_eq!(
        accepted(&receiver, 2).await,
        vec![
            (WebhookEventType::Scheduled, id),
            (WebhookEventType::Cancelled, id)
        ]
    );
    let page = deliveries(&s, &token, "").await;
    let scheduled = page
        .items
        .iter()
        .find(|d| d.kind == WebhookEventType::Scheduled)
        .unwrap();
    assert_eq!(scheduled.status, WebhookDeliveryStatus::Delivered);
    assert!(
        scheduled.attempts > before,
        "the count goes on from the attempts before the restart: {scheduled:?}"
    );
    second.stop().await;
    receiver.stop().await;
    s.stop().await;
}

/// The whole client journey on real sagas: the Scheduler, the four domain services, the Delivery
/// service's published tracking events and the fleet simulator flying the drone. One booking is
/// told to its receiver scheduled → delivered (and its drone is free again); another is
/// rescheduled and cancelled by its client: scheduled → rescheduled → cancelled. Every POST is
/// signed with the account's secret.
async fn real_bookings_reach_their_receiver_from_scheduled_to_delivered(backend: Backend) {
    let suite = integration_tests::spawn_suite_with(
        backend,
        integration_tests::SuiteFaults::default(),
        fast,
        |d| {
            d.simulator = drone::SimulatorSettings {
                enabled: true,
                poll_ms: 200,
                leg_secs: 1,
                reports_per_leg: 2,
                ..Default::default()
            };
        },
    )
    .await;
    suite.account("acc-1", "active").await;
    let scheduler = suite.start_scheduler(|_| {}).await;
    let s = &suite.ingestion;
    let token = s.token("acc-1", &[]);
    let receiver = Receiver::start(0, 200).await;
    let r = register(s, &token, &[receiver.url()]).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let secret = r.json::<WebhookSubscription>().secret;

    // Flown by the simulator a few seconds from now.
    let mut soon = integration_tests::Suite::booking("acc-1", 0, "Small");
    soon["pickupLocation"] = json!("0,47.6097,-122.3331");
    soon["dropOffLocation"] = json!("0,47.6205,-122.3493");
    soon["pickupTime"] = json!((chrono::Utc::now() + chrono::Duration::seconds(3)).to_rfc3339());
    let flown = suite.book(&soon).await;
    // Changed by its client, then cancelled.
    let later = suite
        .book(&integration_tests::Suite::booking("acc-1", 48, "Small"))
        .await;
    suite
        .client_state("acc-1", later, "scheduled", Duration::from_secs(30))
        .await;
    let moved = (chrono::Utc::now() + chrono::Duration::hours(50)).to_rfc3339();
    let r = call(
        s,
        Method::PATCH,
        &format!("/api/deliveryrequests/{later}"),
        &token,
        Some(&json!({ "pickupTime": moved })),
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.body);
    eventually(
        Duration::from_secs(30),
        "the reschedule to be told",
        async || {
            let got = receiver.accepted();
            done_if(
                got.contains(&(WebhookEventType::Rescheduled, later)),
                format!("{got:?}"),
            )
        },
    )
    .await;
    let r = call(
        s,
        Method::DELETE,
        &format!("/api/deliveryrequests/{later}"),
        &token,
        None,
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.body);

    let what = "the delivered and the cancelled booking to be told";
    eventually(Duration::from_secs(60), what, async || {
        let got = receiver.accepted();
        done_if(
            got.contains(&(WebhookEventType::Delivered, flown))
                && got.contains(&(WebhookEventType::Cancelled, later)),
            format!("{got:?}"),
        )
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let of = |id: Uuid| -> Vec<WebhookEventType> {
        receiver
            .accepted()
            .into_iter()
            .filter(|(_, d)| *d == id)
            .map(|(kind, _)| kind)
            .collect()
    };
    assert_eq!(
        of(flown),
        [WebhookEventType::Scheduled, WebhookEventType::Delivered]
    );
    assert_eq!(
        of(later),
        [
            WebhookEventType::Scheduled,
            WebhookEventType::Rescheduled,
            WebhookEventType::Cancelled
        ]
    );
    for r in receiver.seen() {
        r.verify(&secret);
    }

    // The client sees the flight at the Location URL, and the drone is free again.
    let view = call(
        s,
        Method::GET,
        &format!("/api/deliveries/{flown}"),
        &token,
        None,
    )
    .await;
    assert_eq!(view.body["stage"], "delivered", "{}", view.body);
    let reservation = suite
        .drone
        .get(&format!("/api/dronedeliveries/{flown}"))
        .await;
    let end: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(reservation.body["window"]["end"].clone()).expect("window end");
    assert!(end <= chrono::Utc::now(), "the window still ends at {end}");
    receiver.stop().await;
    scheduler.stop().await;
    suite.stop().await;
}
