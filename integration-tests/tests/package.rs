//! Package service against PostgreSQL and SQLite.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step should panic

mod common;

use common::{assert_ready_with_docs, assert_unauthorized, put_20_at_once, raw_json};
use contracts::{
    BatchAnswer, BatchResult, Package, PackageSize, PackageStatus, PackageSummary, SizeCounts,
    MAX_BATCH_ITEMS,
};
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
    batch_answers_as_single_puts_item_by_item,
    batch_with_duplicate_ids_answers_as_puts_in_order,
    concurrent_batches_and_puts_create_each_package_once,
    batch_route_leaves_the_package_named_batch_alone,
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
    let batch = &paths["/api/packages/batch"];
    assert!(batch["post"]["requestBody"].is_object(), "batch documented");
    assert!(batch["post"]["responses"]["200"].is_object());
    assert!(batch["get"].is_null() && batch["put"].is_null());
    assert!(doc.body["components"]["schemas"]["BatchAnswer"].is_object());
    assert!(doc.body["components"]["schemas"]["PackageSummary"].is_object());
    app.stop().await;
}

/// `POST /api/packages/batch` with `items` (`(id, body)`); asserts the `200` and one result per
/// item, in order, and returns the results.
async fn batch(app: &TestApp, items: &[(&str, &Value)]) -> Vec<BatchResult> {
    let items: Vec<Value> = items
        .iter()
        .map(|(id, body)| json!({"id": id, "body": body}))
        .collect();
    let r = app
        .post("/api/packages/batch", &json!({ "items": items }))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let results = r.json::<BatchAnswer>().results;
    let ids: Vec<&str> = results.iter().map(|r| r.id.as_str()).collect();
    let sent: Vec<&str> = items.iter().filter_map(|i| i["id"].as_str()).collect();
    assert_eq!(ids, sent, "one result per item, in order");
    assert!(results.iter().all(|r| r.retry_after.is_none()));
    results
}

/// `PUT /api/packages/{id}` of each item, one after the other: `(status, body)` of each.
async fn single_puts(app: &TestApp, items: &[(&str, &Value)]) -> Vec<(u16, Value)> {
    let mut answers = Vec::new();
    for (id, body) in items {
        let path = format!("/api/packages/{}", id.replace(' ', "%20"));
        let r = app.put(&path, body).await;
        answers.push((r.status.as_u16(), r.body));
    }
    answers
}

/// An answer without the timestamps, which differ between two apps given the same calls.
fn without_times((status, mut body): (u16, Value)) -> (u16, Value) {
    if let Some(object) = body.as_object_mut() {
        object.remove("createdAt");
        object.remove("updatedAt");
    }
    (status, body)
}

/// Asserts that the batch's results are, item by item, what the single PUTs answered (on another
/// app given the same calls before).
fn assert_same_answers(results: &[BatchResult], singles: Vec<(u16, Value)>) {
    assert_eq!(results.len(), singles.len());
    for (result, single) in results.iter().zip(singles) {
        assert_eq!(
            without_times((result.status, result.body.clone())),
            without_times(single),
            "item {}",
            result.id
        );
    }
}

/// A registered package `old`, a cancelled one `gone`, and a tombstone `late` (cancelled before
/// it was registered), all of owner `o1`.
async fn packages_before_the_batch(app: &TestApp) -> Value {
    let b = body("o1", "e1", "Medium", 3.0);
    let old = app.put("/api/packages/old", &b).await;
    assert_eq!(old.status, 201, "{}", old.body);
    assert_eq!(app.put("/api/packages/gone", &b).await.status, 201);
    assert_eq!(app.delete("/api/packages/gone").await.status, 200);
    assert_eq!(app.delete("/api/packages/late").await.status, 404);
    old.body
}

async fn batch_answers_as_single_puts_item_by_item(backend: Backend) {
    let app = spawn_package(backend).await;
    let singles_app = spawn_package(backend).await;
    let old = packages_before_the_batch(&app).await;
    packages_before_the_batch(&singles_app).await;

    let same = body("o1", "e1", "Medium", 3.0);
    let heavier = body("o1", "e1", "Medium", 3.5);
    let invalid = json!({"ownerId": "", "size": "Huge", "weight": -1});
    let large = body("o1", "e9", "Large", 7.0);
    let items: [(&str, &Value); 8] = [
        ("new", &same),
        ("old", &same),
        ("old", &heavier),
        ("late", &same),
        ("bad", &invalid),
        ("gone", &same),
        ("has space", &same),
        ("new2", &large),
    ];
    let results = batch(&app, &items).await;
    let statuses: Vec<u16> = results.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [201, 200, 409, 409, 400, 200, 400, 201]);
    let code = |i: usize| {
        results[i].body["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(code(2), "package-conflict");
    assert_eq!(code(3), "package-cancelled");
    let fields = |i: usize| -> Vec<String> {
        let errors = results[i].body["errors"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        errors
            .iter()
            .filter_map(|e| e["field"].as_str().map(str::to_owned))
            .collect()
    };
    assert_eq!(fields(4), ["ownerId", "externalId", "size", "weight"]);
    assert_eq!(fields(6), ["id"]);
    assert_eq!(
        results[1].body, old,
        "a replay returns the package as it is"
    );
    assert_eq!(results[5].body["status"], "cancelled", "not resurrected");
    assert_same_answers(&results, single_puts(&singles_app, &items).await);

    // The valid items are applied, the refused ones are not.
    for i in [0, 1, 5, 7] {
        let got = app.get(&format!("/api/packages/{}", results[i].id)).await;
        assert_eq!(got.status, 200);
        assert_eq!(got.body, results[i].body, "{}", results[i].id);
    }
    assert_eq!(app.get("/api/packages/late").await.status, 404);
    assert_eq!(app.get("/api/packages/bad").await.status, 404);
    // Only the created packages count: old, gone (cancelled), new, new2.
    let summary = summary_of(&app, "o1").await;
    assert_eq!(
        summary,
        PackageSummary {
            owner_id: "o1".into(),
            total: 4,
            registered: 3,
            cancelled: 1,
            registered_weight: 13.0,
            by_size: SizeCounts {
                small: 0,
                medium: 2,
                large: 1,
            },
        }
    );
    assert_eq!(summary, summary_of(&singles_app, "o1").await);

    // The same batch again: every id is taken now, so it creates nothing and finds everything.
    let again = batch(&app, &items).await;
    let statuses: Vec<u16> = again.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 200, 409, 409, 400, 200, 400, 200]);
    for i in [0, 1, 5, 7] {
        assert_eq!(again[i].body, results[i].body, "{}", results[i].id);
    }
    assert_same_answers(&again, single_puts(&singles_app, &items).await);
    assert_eq!(summary_of(&app, "o1").await, summary);
    app.stop().await;
    singles_app.stop().await;
}

async fn batch_with_duplicate_ids_answers_as_puts_in_order(backend: Backend) {
    let app = spawn_package(backend).await;
    let singles_app = spawn_package(backend).await;
    let first = body("o1", "e1", "Small", 1.0);
    let second = body("o1", "e2", "Small", 1.0);
    let invalid = json!({"ownerId": "o1", "externalId": "e1", "size": "Small"});
    // `b`'s first occurrence is refused, so its second one creates it.
    let items: [(&str, &Value); 7] = [
        ("a", &first),
        ("a", &first),
        ("a", &second),
        ("b", &invalid),
        ("b", &second),
        ("b", &first),
        ("b", &second),
    ];
    let results = batch(&app, &items).await;
    let statuses: Vec<u16> = results.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [201, 200, 409, 400, 201, 409, 200]);
    assert_eq!(results[1].body, results[0].body, "a repeat finds the first");
    assert_eq!(results[6].body, results[4].body);
    assert_eq!(results[4].body["externalId"], "e2");
    assert_eq!(results[2].body["code"], "package-conflict");
    assert_eq!(results[5].body["code"], "package-conflict");
    assert_same_answers(&results, single_puts(&singles_app, &items).await);
    assert_eq!(app.get("/api/packages/a").await.body, results[0].body);
    assert_eq!(app.get("/api/packages/b").await.body, results[4].body);
    assert_eq!(summary_of(&app, "o1").await.total, 2);
    app.stop().await;
    singles_app.stop().await;
}

async fn concurrent_batches_and_puts_create_each_package_once(backend: Backend) {
    const BATCHES: usize = 10;
    let app = spawn_package(backend).await;
    let ids: Vec<String> = (0..MAX_BATCH_ITEMS).map(|i| format!("p{i:02}")).collect();
    let bodies: Vec<Value> = ids
        .iter()
        .map(|id| body("o-race", id, "Small", 1.0))
        .collect();
    let items: Vec<(&str, &Value)> = ids.iter().map(String::as_str).zip(&bodies).collect();
    // Every batch holds every id, each batch in another order (rotated, every other one
    // reversed): overlapping batches must neither deadlock nor create anything twice.
    let batches: Vec<Vec<(&str, &Value)>> = (0..BATCHES)
        .map(|k| {
            let mut order = items.clone();
            order.rotate_left(k * 7);
            if k % 2 == 1 {
                order.reverse();
            }
            order
        })
        .collect();
    let paths: Vec<String> = ids.iter().map(|id| format!("/api/packages/{id}")).collect();
    let (batch_results, single_results) = tokio::join!(
        futures::future::join_all(batches.iter().map(|b| batch(&app, b))),
        futures::future::join_all(paths.iter().zip(&bodies).map(|(p, b)| app.put(p, b))),
    );
    let mut answers: Vec<(String, u16, Value)> = batch_results
        .into_iter()
        .flatten()
        .map(|r| (r.id, r.status, r.body))
        .collect();
    answers.extend(
        items
            .iter()
            .zip(single_results)
            .map(|((id, _), r)| ((*id).to_owned(), r.status.as_u16(), r.body)),
    );
    for id in &ids {
        let of_id: Vec<&(String, u16, Value)> = answers.iter().filter(|a| &a.0 == id).collect();
        let statuses: Vec<u16> = of_id.iter().map(|a| a.1).collect();
        assert_eq!(statuses.len(), BATCHES + 1, "{id}");
        assert_eq!(
            statuses.iter().filter(|s| **s == 201).count(),
            1,
            "{id} created exactly once: {statuses:?}"
        );
        assert!(
            statuses.iter().all(|s| *s == 201 || *s == 200),
            "{id}: {statuses:?}"
        );
        assert!(
            of_id.iter().all(|a| a.2 == of_id[0].2),
            "{id}: every answer holds the same package"
        );
        assert_eq!(
            app.get(&format!("/api/packages/{id}")).await.body,
            of_id[0].2
        );
    }
    assert_eq!(summary_of(&app, "o-race").await.total, ids.len() as u64);
    app.stop().await;
}

async fn batch_route_leaves_the_package_named_batch_alone(backend: Backend) {
    let app = spawn_package(backend).await;
    let b = body("o1", "e1", "Small", 1.0);
    // GET and PUT of /api/packages/batch still mean the package with id "batch".
    assert_eq!(
        app.get("/api/packages/batch").await.problem(404).code,
        "not-found"
    );
    let created = app.put("/api/packages/batch", &b).await;
    assert_eq!(created.status, 201, "{}", created.body);
    assert_eq!(app.get("/api/packages/batch").await.body, created.body);
    let results = batch(&app, &[("batch", &b)]).await;
    assert_eq!(results[0].status, 200);
    assert_eq!(results[0].body, created.body);

    // A refused envelope refuses the whole batch, and nothing is stored.
    assert_unauthorized(
        &app,
        Method::POST,
        "/api/packages/batch",
        Some(&json!({"items": [{"id": "x", "body": b}]})),
        None,
    )
    .await;
    for (envelope, field) in [
        (json!({"items": []}), "items"),
        (
            json!({"items": [{"id": "x", "body": b}, {"body": b}]}),
            "items[1].id",
        ),
        (json!({"items": [{"id": "x"}]}), "items[0].body"),
        (json!([{"id": "x", "body": b}]), "body"),
    ] {
        let r = app.post("/api/packages/batch", &envelope).await;
        assert_eq!(r.bad_fields(), vec![field], "{envelope}");
    }
    let r = raw_json(&app, Method::POST, "/api/packages/batch", b"{\"items\":[").await;
    assert_eq!(r.problem(400).code, "malformed-json");
    assert_eq!(app.get("/api/packages/x").await.status, 404);
    assert_eq!(summary_of(&app, "o1").await.total, 1);
    app.stop().await;
}
