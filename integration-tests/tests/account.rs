//! Account service against PostgreSQL and SQLite.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step should panic

mod common;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::{assert_ready_with_docs, assert_unauthorized, metrics, put_20_at_once, raw_json};
use contracts::{
    Account, AccountChanged, AccountFeedMark, AccountStatus, TokenResponse, ACCOUNT_CHANGED,
    ACCOUNT_EVENTS_LOG, ACCOUNT_EVENTS_PARTITIONS, ACCOUNT_FEED_MARK,
};
use integration_tests::proxy::{Mode, Proxy};
use integration_tests::{
    amqp_host_port, amqp_url, both_backends, done_if, eventually, fresh_messaging, metric_sample,
    spawn_account, spawn_account_on, Backend, TestApp, JWT_SECRET,
};
use messaging::{Broker, Envelope, LogReader, StartAt};
use reqwest::Method;
use serde_json::json;

both_backends!(
    put_creates_then_is_idempotent,
    concurrent_puts_create_exactly_once,
    suspended_account_gets_no_token,
    minted_token_verifies_with_the_shared_key,
    client_errors_are_problems,
    service_endpoints_answer,
    every_change_is_published_once_with_the_next_version,
    idle_feed_appends_marks_complete_as_of_after_the_changes_before_them,
    a_put_succeeds_while_the_broker_is_down_and_is_published_once_it_is_back,
);

async fn put_creates_then_is_idempotent(backend: Backend) {
    let app = spawn_account(backend).await;
    let first = app
        .put("/api/accounts/acc-1", &json!({"name": "Contoso"}))
        .await;
    assert_eq!(first.status, 201, "{}", first.body);
    let second = app
        .put("/api/accounts/acc-1", &json!({"name": "Contoso"}))
        .await;
    assert_eq!(second.status, 200);
    assert_eq!(first.body, second.body, "same body for the same PUT");
    let got = app.get("/api/accounts/acc-1").await.json::<Account>();
    assert_eq!(got.status, AccountStatus::Active);

    let suspended = app
        .put(
            "/api/accounts/acc-1",
            &json!({"name": "Contoso", "status": "suspended"}),
        )
        .await;
    assert_eq!(suspended.status, 200);
    assert_eq!(suspended.json::<Account>().status, AccountStatus::Suspended);
    app.stop().await;
}

async fn concurrent_puts_create_exactly_once(backend: Backend) {
    let app = spawn_account(backend).await;
    let body = json!({"name": "Fabrikam"});
    let replies = put_20_at_once(&app, "/api/accounts/acc-race", &body, 200).await;
    let first = &replies[0].body;
    assert!(replies.iter().all(|r| &r.body == first), "all bodies equal");
    app.stop().await;
}

async fn suspended_account_gets_no_token(backend: Backend) {
    let app = spawn_account(backend).await;
    app.put(
        "/api/accounts/s1",
        &json!({"name": "S", "status": "suspended"}),
    )
    .await;
    let p = app
        .post("/api/accounts/s1/tokens", &json!({}))
        .await
        .problem(409);
    assert_eq!(p.code, "account-suspended");
    let p = app
        .post("/api/accounts/nobody/tokens", &json!({}))
        .await
        .problem(404);
    assert_eq!(p.code, "not-found");
    app.stop().await;
}

async fn minted_token_verifies_with_the_shared_key(backend: Backend) {
    let app = spawn_account(backend).await;
    app.put("/api/accounts/a1", &json!({"name": "A"})).await;
    // An empty body asks for a default token.
    let reply = raw_json(&app, Method::POST, "/api/accounts/a1/tokens", b"").await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    let token = reply.json::<TokenResponse>();
    assert_eq!(token.token_type, "Bearer");
    let verifier = service_kit::auth::ClientTokens::new(&JWT_SECRET.to_owned().into());
    let claims = verifier.verify(&token.token).expect("token verifies");
    assert_eq!(claims.sub, "a1");

    let admin = app
        .post(
            "/api/accounts/a1/tokens",
            &json!({"scopes": [contracts::ADMIN_SCOPE], "ttlSeconds": 60}),
        )
        .await
        .json::<TokenResponse>();
    let claims = verifier.verify(&admin.token).expect("token verifies");
    assert!(claims.has_scope(contracts::ADMIN_SCOPE));
    assert!(claims.exp - claims.iat <= 60);
    app.stop().await;
}

async fn client_errors_are_problems(backend: Backend) {
    let app = spawn_account(backend).await;
    // Missing and wrong tokens.
    assert_unauthorized(&app, Method::GET, "/api/accounts/x", None, None).await;
    assert_unauthorized(
        &app,
        Method::GET,
        "/api/accounts/x",
        None,
        Some("wrong-token"),
    )
    .await;
    // Unknown id.
    assert_eq!(
        app.get("/api/accounts/missing").await.problem(404).code,
        "not-found"
    );
    // Malformed JSON, wrong media type, wrong types, unknown enum values, bad ids.
    let r = raw_json(&app, Method::PUT, "/api/accounts/x", b"{\"name\":").await;
    assert_eq!(r.problem(400).code, "malformed-json");
    let r = app
        .call_raw(Method::PUT, "/api/accounts/x", "text/plain", b"{}".to_vec())
        .await;
    assert_eq!(r.problem(415).code, "unsupported-media-type");
    let r = app
        .put("/api/accounts/x", &json!({"name": 5, "status": "closed"}))
        .await;
    assert_eq!(r.bad_fields(), vec!["name", "status"]);
    let r = app
        .post("/api/accounts/x/tokens", &json!({"ttlSeconds": -3}))
        .await;
    assert_eq!(r.bad_fields(), vec!["ttlSeconds"]);
    let r = app.get("/api/accounts/has%20space").await;
    assert_eq!(r.bad_fields(), vec!["id"]);
    // A body over the limit.
    let big = format!("{{\"name\":\"{}\"}}", "x".repeat(200 * 1024));
    let r = raw_json(&app, Method::PUT, "/api/accounts/x", big.as_bytes()).await;
    assert_eq!(r.problem(413).code, "payload-too-large");
    // Unknown routes and methods.
    assert_eq!(app.get("/nope").await.problem(404).code, "route-not-found");
    let r = app.delete("/api/accounts/x").await;
    assert_eq!(r.problem(405).code, "method-not-allowed");
    app.stop().await;
}

async fn service_endpoints_answer(backend: Backend) {
    let app = spawn_account(backend).await;
    let doc = assert_ready_with_docs(&app).await;
    assert!(doc.body["paths"]["/api/accounts/{id}"]["put"].is_object());
    let page = app.client.get(app.url("/docs")).send().await.expect("docs");
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap_or_default();
    assert!(
        html.contains("openapi.json") && !html.contains("https://"),
        "offline page"
    );
    app.put("/api/accounts/m1", &json!({"name": "M"})).await;
    let text = metrics(&app).await;
    assert!(
        text.contains("http_requests_total{endpoint=\"/api/accounts/{id}\",method=\"PUT\",service=\"account\",status=\"201\"} 1"),
        "{text}"
    );
    assert!(text.contains("http_requests_duration_seconds_bucket"));
    let r = app.get("/api/accounts/m1").await;
    assert!(r.header("x-request-id").is_some());
    app.stop().await;
}

/// Account publishing on `account-events` through a [`Proxy`] the test controls, and a reader of
/// that log straight from RabbitMQ.
struct Feed {
    app: TestApp,
    proxy: Proxy,
    broker: Arc<dyn Broker>,
    reader: LogReader,
}

impl Feed {
    async fn start(backend: Backend) -> Feed {
        let direct = fresh_messaging("account-test");
        let upstream = amqp_url();
        let proxy = Proxy::start(&amqp_host_port(&upstream)).await;
        let mut through = direct.clone();
        through.url = proxy.amqp_url(&upstream).into();
        through.connection_name = format!("{}-account", direct.prefix);
        through.confirm_timeout_ms = 3000;
        let app = spawn_account_on(backend, through).await;
        let broker = messaging::connect(&direct).await.unwrap();
        let reader = broker
            .log(ACCOUNT_EVENTS_LOG, ACCOUNT_EVENTS_PARTITIONS)
            .await
            .unwrap()
            .read(0, StartAt::First)
            .await
            .unwrap();
        Feed {
            app,
            proxy,
            broker,
            reader,
        }
    }

    /// The next event on the log.
    async fn next(&mut self) -> Envelope {
        let record = tokio::time::timeout(Duration::from_secs(30), self.reader.next())
            .await
            .expect("an event on account-events within 30 s")
            .expect("the reader is open");
        record.event.expect("a decodable event")
    }

    /// The account changes read until the first mark complete as of after `t` (so every change
    /// committed before `t` is among them), with that mark.
    async fn changes_until_mark_after(
        &mut self,
        t: DateTime<Utc>,
    ) -> (Vec<(Envelope, AccountChanged)>, AccountFeedMark) {
        let mut changes = Vec::new();
        loop {
            let event = self.next().await;
            match event.kind.as_str() {
                ACCOUNT_CHANGED => {
                    let change = event.decode::<AccountChanged>().unwrap();
                    changes.push((event, change));
                }
                ACCOUNT_FEED_MARK => {
                    let mark = event.decode::<AccountFeedMark>().unwrap();
                    if mark.complete_as_of > t {
                        return (changes, mark);
                    }
                }
                other => panic!("unexpected event type {other} on account-events"),
            }
        }
    }

    async fn put(&self, id: &str, status: &str) -> Account {
        let r = self
            .app
            .put(
                &format!("/api/accounts/{id}"),
                &json!({"name": format!("name of {id}"), "status": status}),
            )
            .await;
        assert!(r.status.is_success(), "PUT {id}: {} {}", r.status, r.body);
        r.json()
    }

    async fn metric(&self, name: &str) -> f64 {
        metric_sample(&metrics(&self.app).await, name).unwrap_or(0.0)
    }

    async fn stop(self) {
        self.app.stop().await;
        drop(self.reader);
        let _ = self
            .broker
            .delete_log(ACCOUNT_EVENTS_LOG, ACCOUNT_EVENTS_PARTITIONS)
            .await;
    }
}

/// What a change says, to compare with what the PUTs answered.
fn said(changes: &[(Envelope, AccountChanged)]) -> Vec<(Account, i64)> {
    changes
        .iter()
        .map(|(_, c)| (c.account.clone(), c.version))
        .collect()
}

async fn every_change_is_published_once_with_the_next_version(backend: Backend) {
    let mut feed = Feed::start(backend).await;
    let created = feed.put("acc-feed", "active").await;
    let again = feed.put("acc-feed", "active").await;
    assert_eq!(again, created, "the same PUT changes nothing");
    let suspended = feed.put("acc-feed", "suspended").await;
    let other = feed.put("acc-other", "active").await;
    let done = Utc::now();

    let (changes, _) = feed.changes_until_mark_after(done).await;
    assert_eq!(
        said(&changes),
        vec![(created, 1), (suspended.clone(), 2), (other, 1)],
        "one event per creation or change, none for the repeated PUT"
    );
    for (event, change) in &changes {
        assert_eq!(event.key, change.account.id, "keyed by account");
        assert_eq!(
            event.id,
            account::event_id(&change.account.id, change.version)
        );
    }
    assert_eq!(suspended.status, AccountStatus::Suspended);

    // A change after a quiet while is published too, and nothing else came in between.
    let active = feed.put("acc-feed", "active").await;
    let (changes, _) = feed.changes_until_mark_after(Utc::now()).await;
    assert_eq!(said(&changes), vec![(active, 3)]);
    assert_eq!(feed.metric("account_feed_published_total").await, 4.0);
    assert_eq!(feed.metric("account_feed_outbox_rows").await, 0.0);
    feed.stop().await;
}

async fn idle_feed_appends_marks_complete_as_of_after_the_changes_before_them(backend: Backend) {
    let mut feed = Feed::start(backend).await;
    // Nothing changes: marks still come, each complete as of a later time.
    let first = feed
        .changes_until_mark_after(DateTime::<Utc>::MIN_UTC)
        .await;
    let second = feed.changes_until_mark_after(first.1.complete_as_of).await;
    assert!(first.0.is_empty() && second.0.is_empty(), "no changes yet");
    assert!(second.1.complete_as_of <= Utc::now());

    let created = feed.put("acc-marks", "active").await;
    // The first mark behind the change in the log is complete as of a time after the change.
    let change = loop {
        let event = feed.next().await;
        if event.kind == ACCOUNT_CHANGED {
            break event.decode::<AccountChanged>().unwrap();
        }
    };
    assert_eq!(change.account, created);
    let event = feed.next().await;
    assert_eq!(event.kind, ACCOUNT_FEED_MARK, "nothing else changed");
    let mark = event.decode::<AccountFeedMark>().unwrap();
    assert!(
        mark.complete_as_of > change.account.updated_at,
        "mark {} after change {}",
        mark.complete_as_of,
        change.account.updated_at
    );
    // Counted once the broker confirmed them, which may come just after they can be read.
    eventually(Duration::from_secs(10), "three marks counted", async || {
        let marks = feed.metric("account_feed_marks_total").await;
        done_if(marks >= 3.0, marks)
    })
    .await;
    feed.stop().await;
}

async fn a_put_succeeds_while_the_broker_is_down_and_is_published_once_it_is_back(
    backend: Backend,
) {
    let mut feed = Feed::start(backend).await;
    let before = feed.put("acc-before", "active").await;
    let (changes, _) = feed.changes_until_mark_after(Utc::now()).await;
    assert_eq!(said(&changes), vec![(before, 1)]);

    feed.proxy.set(Mode::Down);
    let during = feed.put("acc-during", "active").await;
    let ready = feed.app.get("/readyz").await;
    assert_eq!(ready.status, 200, "the broker is no readiness condition");
    // The relay tried, failed, and kept the row.
    let what = "the relay to fail with the row kept";
    eventually(Duration::from_secs(30), what, async || {
        let text = metrics(&feed.app).await;
        let failures = metric_sample(&text, "account_feed_failures_total").unwrap_or(0.0);
        let waiting = metric_sample(&text, "account_feed_outbox_rows").unwrap_or(0.0);
        done_if(failures >= 1.0 && waiting == 1.0, text)
    })
    .await;

    feed.proxy.set(Mode::Forward);
    let back = Utc::now();
    let (changes, _) = feed.changes_until_mark_after(back).await;
    assert_eq!(
        said(&changes),
        vec![(during, 1)],
        "published once the broker is back"
    );
    assert_eq!(feed.metric("account_feed_outbox_rows").await, 0.0);
    feed.stop().await;
}
