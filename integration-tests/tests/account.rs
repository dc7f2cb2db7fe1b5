//! Account service against PostgreSQL and SQLite.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step should panic

mod common;

use common::{assert_ready_with_docs, assert_unauthorized, metrics, put_20_at_once, raw_json};
use contracts::{Account, AccountStatus, TokenResponse};
use integration_tests::{both_backends, spawn_account, Backend, JWT_SECRET};
use reqwest::Method;
use serde_json::json;

both_backends!(
    put_creates_then_is_idempotent,
    concurrent_puts_create_exactly_once,
    suspended_account_gets_no_token,
    minted_token_verifies_with_the_shared_key,
    client_errors_are_problems,
    service_endpoints_answer,
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
