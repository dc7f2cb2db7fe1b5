//! Package service against PostgreSQL and SQLite.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step should panic

mod common;

use common::{assert_ready_with_docs, assert_unauthorized, put_20_at_once, raw_json};
use contracts::{Package, PackageSize, PackageStatus, PackageSummary, SizeCounts};
use integration_tests::{both_backends, spawn_package, Backend, TestApp};
use reqwest::Method;
use serde_json::{json, Value};

both_backends!(
    put_creates_then_is_idempotent,
    concurrent_puts_create_exactly_once,
    put_with_different_content_conflicts,
    patch_and_cancel,
    put_replay_after_cancel_returns_it_as_is,
    summary_has_real_numbers,
    client_errors_are_problems,
    service_endpoints_answer,
);

fn body(owner: &str, external: &str, size: &str, weight: f64) -> Value {
    json!({"ownerId": owner, "externalId": external, "size": size, "weight": weight, "tag": "fragile"})
}

async fn summary_of(app: &TestApp, owner: &str) -> PackageSummary {
    let r = app.get(&format!("/api/packages/summary/{owner}")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

async fn put_creates_then_is_idempotent(backend: Backend) {
    let app = spawn_package(backend).await;
    let b = body("owner-1", "ext-1", "Medium", 2.5);
    let first = app.put("/api/packages/pkg-1", &b).await;
    assert_eq!(first.status, 201, "{}", first.body);
    let second = app.put("/api/packages/pkg-1", &b).await;
    assert_eq!(second.status, 200, "{}", second.body);
    assert_eq!(first.body, second.body, "same body for the same PUT");

    let got = app.get("/api/packages/pkg-1").await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body, first.body);
    let p = got.json::<Package>();
    assert_eq!(p.id, "pkg-1");
    assert_eq!(p.owner_id, "owner-1");
    assert_eq!(p.external_id, "ext-1");
    assert_eq!(p.size, PackageSize::Medium);
    assert_eq!(p.weight, 2.5);
    assert_eq!(p.tag.as_deref(), Some("fragile"));
    assert_eq!(p.status, PackageStatus::Registered);
    assert_eq!(p.created_at, p.updated_at);

    assert_eq!(summary_of(&app, "owner-1").await.total, 1, "one row");
    app.stop().await;
}

async fn concurrent_puts_create_exactly_once(backend: Backend) {
    let app = spawn_package(backend).await;
    let b = body("owner-race", "ext-race", "Small", 1.0);
    let replies = put_20_at_once(&app, "/api/packages/pkg-race", &b, 200).await;
    let first = &replies[0].body;
    assert!(replies.iter().all(|r| &r.body == first), "all bodies equal");
    assert_eq!(summary_of(&app, "owner-race").await.total, 1, "one row");
    app.stop().await;
}

async fn put_with_different_content_conflicts(backend: Backend) {
    let app = spawn_package(backend).await;
    let original = app
        .put("/api/packages/p1", &body("o1", "e1", "Small", 1.0))
        .await;
    assert_eq!(original.status, 201);
    for other in [
        body("o2", "e1", "Small", 1.0),
        body("o1", "e2", "Small", 1.0),
        body("o1", "e1", "Large", 1.0),
        body("o1", "e1", "Small", 1.5),
        json!({"ownerId": "o1", "externalId": "e1", "size": "Small", "weight": 1.0}),
    ] {
        let p = app.put("/api/packages/p1", &other).await.problem(409);
        assert_eq!(p.code, "package-conflict", "{other}");
        assert!(p.detail.unwrap_or_default().contains("PATCH"));
    }
    // Nothing changed.
    assert_eq!(app.get("/api/packages/p1").await.body, original.body);
    app.stop().await;
}

async fn patch_and_cancel(backend: Backend) {
    let app = spawn_package(backend).await;
    let created = app
        .put("/api/packages/p1", &body("o1", "e1", "Small", 1.0))
        .await
        .json::<Package>();

    let patched = app
        .patch(
            "/api/packages/p1",
            &json!({"size": "Large", "weight": "4.25"}),
        )
        .await;
    assert_eq!(patched.status, 200, "{}", patched.body);
    let got = app.get("/api/packages/p1").await;
    assert_eq!(got.body, patched.body);
    let got = got.json::<Package>();
    assert_eq!(got.size, PackageSize::Large);
    assert_eq!(got.weight, 4.25);
    assert_eq!(got.tag.as_deref(), Some("fragile"), "untouched fields stay");
    assert_eq!(got.created_at, created.created_at);
    assert!(got.updated_at >= created.updated_at);
    let tagged = app
        .patch("/api/packages/p1", &json!({"tag": "keep upright"}))
        .await
        .json::<Package>();
    assert_eq!(tagged.tag.as_deref(), Some("keep upright"));
    assert_eq!(tagged.size, PackageSize::Large);

    let first = app.delete("/api/packages/p1").await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.json::<Package>().status, PackageStatus::Cancelled);
    let second = app.delete("/api/packages/p1").await;
    assert_eq!(second.status, 200);
    assert_eq!(second.body, first.body, "cancelling again changes nothing");
    assert_eq!(app.get("/api/packages/p1").await.body, first.body);

    let p = app
        .patch("/api/packages/p1", &json!({"weight": 9}))
        .await
        .problem(409);
    assert_eq!(p.code, "package-cancelled");
    assert_eq!(
        app.get("/api/packages/p1").await.body,
        first.body,
        "not edited"
    );

    assert_eq!(
        app.delete("/api/packages/nope").await.problem(404).code,
        "not-found"
    );
    assert_eq!(
        app.patch("/api/packages/nope", &json!({"weight": 1}))
            .await
            .problem(404)
            .code,
        "not-found"
    );
    app.stop().await;
}

async fn put_replay_after_cancel_returns_it_as_is(backend: Backend) {
    let app = spawn_package(backend).await;
    let b = body("o1", "e1", "Medium", 3.0);
    assert_eq!(app.put("/api/packages/p1", &b).await.status, 201);
    let cancelled = app.delete("/api/packages/p1").await;
    assert_eq!(cancelled.status, 200);
    let replay = app.put("/api/packages/p1", &b).await;
    assert_eq!(replay.status, 200, "{}", replay.body);
    assert_eq!(replay.body, cancelled.body, "not resurrected");
    assert_eq!(replay.json::<Package>().status, PackageStatus::Cancelled);

    // A registration that arrives after the cancel of a package it had not made yet (a
    // compensated saga's timed-out attempt) does not create it.
    assert_eq!(
        app.delete("/api/packages/late").await.problem(404).code,
        "not-found"
    );
    assert_eq!(
        app.put("/api/packages/late", &b).await.problem(409).code,
        "package-cancelled"
    );
    assert_eq!(app.get("/api/packages/late").await.status, 404);
    assert_eq!(
        app.delete("/api/packages/late").await.problem(404).code,
        "not-found",
        "cancelling it again changes nothing"
    );
    assert_eq!(
        summary_of(&app, "o1").await.total,
        1,
        "the tombstone is no package of anyone's"
    );
    app.stop().await;
}

async fn summary_has_real_numbers(backend: Backend) {
    let app = spawn_package(backend).await;
    let packages = [
        ("a1", "Small", 1.5),
        ("a2", "Small", 0.5),
        ("a3", "Medium", 2.25),
        ("a4", "Large", 10.0),
        ("a5", "Large", 7.0),
    ];
    for (id, size, weight) in packages {
        let r = app
            .put(
                &format!("/api/packages/{id}"),
                &body("owner-a", id, size, weight),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
    }
    // Another owner's packages do not count.
    app.put("/api/packages/b1", &body("owner-b", "b1", "Small", 100.0))
        .await;
    assert_eq!(app.delete("/api/packages/a5").await.status, 200);

    let s = summary_of(&app, "owner-a").await;
    assert_eq!(
        s,
        PackageSummary {
            owner_id: "owner-a".into(),
            total: 5,
            registered: 4,
            cancelled: 1,
            registered_weight: 14.25,
            by_size: SizeCounts {
                small: 2,
                medium: 1,
                large: 1,
            },
        }
    );

    let empty = summary_of(&app, "nobody").await;
    assert_eq!(
        empty,
        PackageSummary {
            owner_id: "nobody".into(),
            ..PackageSummary::default()
        }
    );
    app.stop().await;
}

async fn client_errors_are_problems(backend: Backend) {
    let app = spawn_package(backend).await;
    // Missing token, wrong token.
    assert_unauthorized(&app, Method::GET, "/api/packages/x", None, None).await;
    assert_unauthorized(
        &app,
        Method::PUT,
        "/api/packages/x",
        Some(&body("o", "e", "Small", 1.0)),
        None,
    )
    .await;
    assert_unauthorized(
        &app,
        Method::GET,
        "/api/packages/summary/o",
        None,
        Some("wrong-token"),
    )
    .await;
    // Unknown id.
    assert_eq!(
        app.get("/api/packages/missing").await.problem(404).code,
        "not-found"
    );
    // Missing fields, every one named.
    let r = app.put("/api/packages/x", &json!({})).await;
    assert_eq!(r.problem(400).code, "validation-failed");
    assert_eq!(
        r.bad_fields(),
        vec!["ownerId", "externalId", "size", "weight"]
    );
    // Wrong enum value and negative weight.
    let r = app
        .put(
            "/api/packages/x",
            &json!({"ownerId": "o", "externalId": "e", "size": "Huge", "weight": -1}),
        )
        .await;
    assert_eq!(r.bad_fields(), vec!["size", "weight"]);
    let p = r.problem(400);
    assert!(
        p.errors[0].reason.contains("unknown variant"),
        "{:?}",
        p.errors
    );
    let r = app
        .put(
            "/api/packages/x",
            &json!({"ownerId": "", "externalId": 7, "size": "Small", "weight": "heavy", "tag": ""}),
        )
        .await;
    assert_eq!(
        r.bad_fields(),
        vec!["ownerId", "externalId", "weight", "tag"]
    );
    // A numeric string weight is accepted (existing clients send it); unknown fields are ignored.
    let r = app
        .put(
            "/api/packages/num",
            &json!({"ownerId": "o", "externalId": "e", "size": "Large", "weight": "2.5", "extra": true}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let p = r.json::<Package>();
    assert_eq!(p.weight, 2.5);
    assert_eq!(p.tag, None);
    // Malformed JSON, non-object body, wrong media type.
    let r = raw_json(&app, Method::PUT, "/api/packages/x", b"{\"ownerId\":").await;
    assert_eq!(r.problem(400).code, "malformed-json");
    let r = raw_json(&app, Method::PUT, "/api/packages/x", b"[1,2]").await;
    assert_eq!(r.bad_fields(), vec!["body"]);
    let r = app
        .call_raw(Method::PUT, "/api/packages/x", "text/plain", b"{}".to_vec())
        .await;
    assert_eq!(r.problem(415).code, "unsupported-media-type");
    // PATCH: an empty body, an empty object, bad values.
    let r = app.patch("/api/packages/num", &json!({})).await;
    assert_eq!(r.bad_fields(), vec!["body"]);
    let r = raw_json(&app, Method::PATCH, "/api/packages/num", b"").await;
    assert_eq!(r.bad_fields(), vec!["body"]);
    let r = app
        .patch("/api/packages/num", &json!({"size": "Huge", "weight": -2}))
        .await;
    assert_eq!(r.bad_fields(), vec!["size", "weight"]);
    // Bad ids in the path.
    let r = app.get("/api/packages/has%20space").await;
    assert_eq!(r.bad_fields(), vec!["id"]);
    let r = app.get("/api/packages/summary/bad%20owner").await;
    assert_eq!(r.bad_fields(), vec!["ownerId"]);
    // Nothing was stored by the failed writes.
    assert_eq!(summary_of(&app, "o").await.total, 1);
    app.stop().await;
}

async fn service_endpoints_answer(backend: Backend) {
    let app = spawn_package(backend).await;
    let doc = assert_ready_with_docs(&app).await;
    let paths = &doc.body["paths"];
    for method in ["get", "put", "patch", "delete"] {
        assert!(
            paths["/api/packages/{id}"][method].is_object(),
            "{method} documented"
        );
    }
    assert!(paths["/api/packages/summary/{ownerId}"]["get"].is_object());
    assert!(doc.body["components"]["schemas"]["PackageSummary"].is_object());
    app.stop().await;
}
