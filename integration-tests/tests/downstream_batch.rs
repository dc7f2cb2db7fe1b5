//! Batching across callers in the `downstream` client: calls of one kind made while a request of
//! that kind is under way leave together as one batch request, each caller still gets its own
//! item's answer classified as a single call's would be, and a service without the batch route
//! gets single calls. Against small local servers that record what they are sent; the batch
//! routes of the real services are tested with them (package.rs, drone.rs, delivery.rs) and
//! through the client below.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step should panic

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{TimeZone, Utc};
use common::pickup;
use contracts::{
    ConfirmationType, DeliveryUpsert, DroneReservationRequest, PackageSize, PackageUpsert,
};
use downstream::{BatchSettings, CallError, Downstream, DownstreamSettings};
use integration_tests::{
    both_backends, spawn_delivery, spawn_drone_with, spawn_package, Backend, SERVICE_TOKEN,
};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

both_backends!(concurrent_calls_to_the_real_services_each_get_their_own_answer);

/// One request a recording server was sent.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    body: Value,
}

/// How a recording server answers: status line, extra headers, body.
type Answer = (String, Vec<(String, String)>, String);

/// A server that records every request and answers it with `answer` after `delay`.
async fn recording_server(
    delay: Duration,
    answer: fn(&Seen) -> Answer,
) -> (String, Arc<Mutex<Vec<Seen>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 8192];
                let head_end = loop {
                    if let Some(at) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                        break at + 4;
                    }
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&request[..head_end]).to_string();
                let length = head
                    .lines()
                    .find_map(|l| {
                        let (name, value) = l.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                while request.len() < head_end + length {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let mut words = head.split_whitespace();
                let seen = Seen {
                    method: words.next().unwrap_or_default().to_owned(),
                    path: words.next().unwrap_or_default().to_owned(),
                    body: serde_json::from_slice(&request[head_end..]).unwrap_or(Value::Null),
                };
                record.lock().unwrap().push(seen.clone());
                tokio::time::sleep(delay).await;
                let (status, headers, body) = answer(&seen);
                let mut out = format!("HTTP/1.1 {status}\r\nconnection: close\r\n");
                for (name, value) in headers {
                    out.push_str(&format!("{name}: {value}\r\n"));
                }
                out.push_str(&format!("content-length: {}\r\n\r\n{body}", body.len()));
                let _ = socket.write_all(out.as_bytes()).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    (address, seen)
}

fn client(url: &str, batch: BatchSettings) -> Downstream {
    Downstream::new(&DownstreamSettings {
        account_url: url.to_owned(),
        package_url: url.to_owned(),
        drone_url: url.to_owned(),
        delivery_url: url.to_owned(),
        thirdparty_url: url.to_owned(),
        service_token: SERVICE_TOKEN.to_owned().into(),
        batch,
        ..DownstreamSettings::default()
    })
    .expect("downstream client")
}

fn package(external: &str) -> PackageUpsert {
    PackageUpsert {
        owner_id: "owner-1".into(),
        external_id: external.into(),
        size: PackageSize::Small,
        weight: 1.0,
        tag: None,
    }
}

/// The Package service's answer for package `id`, registered now.
fn package_json(id: &str) -> Value {
    let now = Utc.timestamp_opt(1_800_000_000, 0).single().unwrap();
    json!({
        "id": id, "ownerId": "owner-1", "externalId": id, "size": "Small", "weight": 1.0,
        "tag": null, "status": "registered", "createdAt": now, "updatedAt": now
    })
}

/// `put_package` for every id, all at once.
async fn put_all<S: AsRef<str>>(
    d: &Downstream,
    ids: &[S],
) -> Vec<Result<contracts::Package, CallError>> {
    futures::future::join_all(ids.iter().map(|id| async move {
        let id = id.as_ref();
        d.put_package(id, &package(id)).await
    }))
    .await
}

fn problem(status: u16, code: &str) -> Value {
    json!({"type": format!("https://drone-delivery.dev/problems/{code}"), "title": "t",
           "status": status, "detail": format!("{code} happened"), "code": code})
}

/// Answers single PUTs `201` and batches item by item: ids starting `conflict` are refused
/// `409 package-conflict`, `busy` ones `503 database-unavailable` with `retryAfter` 3, the rest
/// registered (`201`).
fn packages(seen: &Seen) -> Answer {
    let json_type = vec![("content-type".to_owned(), "application/json".to_owned())];
    let item = |id: &str| -> (u16, Option<u64>, Value) {
        if id.starts_with("conflict") {
            (409, None, problem(409, "package-conflict"))
        } else if id.starts_with("busy") {
            (503, Some(3), problem(503, "database-unavailable"))
        } else {
            (201, None, package_json(id))
        }
    };
    if seen.method == "POST" && seen.path == "/api/packages/batch" {
        let results: Vec<Value> = seen.body["items"]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .map(|i| {
                        let id = i["id"].as_str().unwrap_or_default();
                        let (status, retry, body) = item(id);
                        let mut r = json!({"id": id, "status": status, "body": body});
                        if let Some(s) = retry {
                            r["retryAfter"] = json!(s);
                        }
                        r
                    })
                    .collect()
            })
            .unwrap_or_default();
        return (
            "200 OK".into(),
            json_type,
            json!({ "results": results }).to_string(),
        );
    }
    let id = seen.path.rsplit('/').next().unwrap_or_default();
    let (status, retry, body) = item(id);
    let mut headers = json_type;
    if let Some(s) = retry {
        headers.push(("retry-after".into(), s.to_string()));
    }
    let reason = match status {
        201 => "201 Created",
        409 => "409 Conflict",
        _ => "503 Service Unavailable",
    };
    (reason.into(), headers, body.to_string())
}

/// Every single call's and every batch item's id, in the order the server saw them.
fn ids_seen(seen: &[Seen]) -> Vec<String> {
    let mut ids = Vec::new();
    for s in seen {
        if s.path.ends_with("/batch") {
            for item in s.body["items"].as_array().into_iter().flatten() {
                ids.push(item["id"].as_str().unwrap_or_default().to_owned());
            }
        } else {
            ids.push(s.path.rsplit('/').next().unwrap_or_default().to_owned());
        }
    }
    ids.sort();
    ids
}

#[tokio::test]
async fn calls_made_while_one_is_under_way_leave_together() {
    telemetry::init_for_tests();
    let (url, seen) = recording_server(Duration::from_millis(200), packages).await;
    let d = client(
        &url,
        BatchSettings {
            max_items: 8,
            in_flight: 1,
        },
    );

    // An idle service: the call goes out at once, alone, as the single call it always was.
    let one = d.put_package("alone", &package("alone")).await;
    assert_eq!(one.map(|p| p.id).ok().as_deref(), Some("alone"));
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(
            (seen[0].method.as_str(), seen[0].path.as_str()),
            ("PUT", "/api/packages/alone")
        );
    }
    seen.lock().unwrap().clear();

    // 20 at once with one request under way at a time: the first request takes what is queued
    // when it leaves, the others leave together when it is answered, 8 at most each.
    let ids: Vec<String> = (0..20).map(|n| format!("p-{n:02}")).collect();
    let results = put_all(&d, &ids).await;
    for (id, result) in ids.iter().zip(results) {
        assert_eq!(result.map(|p| p.id).ok().as_ref(), Some(id));
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(ids_seen(&seen), ids, "every call made exactly once");
    let batches = sizes(&seen);
    assert!(batches.iter().all(|&n| n <= 8), "{batches:?}");
    // At least 20/8 requests, and far fewer than 20: one at a time, each 200 ms.
    assert!((3..=5).contains(&seen.len()), "{batches:?}");
    assert!(seen
        .iter()
        .any(|s| s.method == "POST" && s.path == "/api/packages/batch"));
}

/// The number of items in each request the server saw (a single call counts one).
fn sizes(seen: &[Seen]) -> Vec<usize> {
    seen.iter()
        .map(|s| s.body["items"].as_array().map_or(1, Vec::len))
        .collect()
}

/// `put_package` for every id, each in a task of its own, started now.
fn spawn_all(d: &Downstream, ids: &[String]) -> Vec<tokio::task::JoinHandle<bool>> {
    ids.iter()
        .map(|id| {
            let (d, id) = (d.clone(), id.clone());
            tokio::spawn(async move {
                d.put_package(&id, &package(&id))
                    .await
                    .is_ok_and(|p| p.id == id)
            })
        })
        .collect()
}

#[tokio::test]
async fn a_further_request_leaves_only_for_a_full_batch() {
    telemetry::init_for_tests();
    let (url, seen) = recording_server(Duration::from_millis(300), packages).await;
    let d = client(
        &url,
        BatchSettings {
            max_items: 4,
            in_flight: 2,
        },
    );

    // Less than a full batch made while a request is under way waits for its answer, though a
    // second request may be under way: one request more would cost the service as much as the
    // whole batch.
    let first = spawn_all(&d, &["first".to_owned()]);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let three: Vec<String> = (0..3).map(|n| format!("q-{n}")).collect();
    let queued = spawn_all(&d, &three);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        seen.lock().unwrap().len(),
        1,
        "the three wait for the first's answer"
    );
    for call in first.into_iter().chain(queued) {
        assert!(call.await.unwrap(), "every call gets its own answer");
    }
    assert_eq!(sizes(&seen.lock().unwrap()), vec![1, 3]);
    seen.lock().unwrap().clear();

    // A full batch waiting does not wait: a second request takes it at once.
    let first = spawn_all(&d, &["first-again".to_owned()]);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let ten: Vec<String> = (0..10).map(|n| format!("r-{n}")).collect();
    let queued = spawn_all(&d, &ten);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        sizes(&seen.lock().unwrap()),
        vec![1, 4],
        "a second request with a full batch while the first is under way"
    );
    for call in first.into_iter().chain(queued) {
        assert!(call.await.unwrap(), "every call gets its own answer");
    }
    let seen = seen.lock().unwrap().clone();
    let mut all = ten.clone();
    all.push("first-again".to_owned());
    all.sort();
    assert_eq!(ids_seen(&seen), all, "every call made exactly once");
    // The six left: when the first is answered, four leave (a full batch) and the second
    // sender, finding less than a full batch behind them, leaves the last two to the first.
    let sizes = sizes(&seen);
    assert!(sizes.iter().all(|&n| n <= 4), "{sizes:?}");
    assert_eq!(sizes.len(), 4, "{sizes:?}");
}

#[tokio::test]
async fn each_caller_gets_its_own_items_answer_classified_as_a_single_call() {
    telemetry::init_for_tests();
    let (url, seen) = recording_server(Duration::from_millis(100), packages).await;
    let d = client(
        &url,
        BatchSettings {
            max_items: 32,
            in_flight: 1,
        },
    );
    let ids = [
        "ok-1",
        "conflict-1",
        "busy-1",
        "ok-2",
        "conflict-2",
        "busy-2",
        "ok-3",
    ];
    let results = put_all(&d, &ids).await;
    assert!(
        seen.lock()
            .unwrap()
            .iter()
            .any(|s| s.path == "/api/packages/batch"),
        "some of them went as a batch"
    );
    for (id, result) in ids.iter().zip(results) {
        match (id.split('-').next().unwrap_or_default(), result) {
            ("ok", Ok(p)) => assert_eq!(p.id, *id),
            (
                "conflict",
                Err(CallError::Permanent {
                    status: Some(409),
                    code: Some(code),
                    reason,
                }),
            ) => {
                assert_eq!(code, "package-conflict");
                assert!(reason.contains(id), "the reason names the item: {reason}");
            }
            (
                "busy",
                Err(CallError::Transient {
                    retry_after,
                    reason,
                }),
            ) => {
                assert_eq!(retry_after, Some(Duration::from_secs(3)));
                assert!(reason.contains("database-unavailable"), "{reason}");
            }
            (_, other) => panic!("{id}: unexpected {other:?}"),
        }
    }
}

/// Answers the batch route `404` (no such route, as an older service would) and single PUTs
/// `201`.
fn no_batch_route(seen: &Seen) -> Answer {
    if seen.path.ends_with("/batch") {
        return ("404 Not Found".into(), Vec::new(), String::new());
    }
    packages(seen)
}

#[tokio::test]
async fn a_service_without_the_batch_route_gets_single_calls() {
    telemetry::init_for_tests();
    let (url, seen) = recording_server(Duration::from_millis(100), no_batch_route).await;
    let d = client(
        &url,
        BatchSettings {
            max_items: 32,
            in_flight: 1,
        },
    );
    for round in 0..2 {
        let ids: Vec<String> = (0..6).map(|n| format!("r{round}-{n}")).collect();
        let results = put_all(&d, &ids).await;
        for (id, result) in ids.iter().zip(results) {
            assert_eq!(result.map(|p| p.id).ok().as_ref(), Some(id));
        }
    }
    let seen = seen.lock().unwrap().clone();
    let batches = seen.iter().filter(|s| s.path.ends_with("/batch")).count();
    // Asked once; after the 404 the lane sends single calls for a while.
    assert!(batches <= 1, "{seen:?}");
    assert_eq!(seen.iter().filter(|s| s.method == "PUT").count(), 12);
}

/// Answers every batch `500`.
fn failing_batches(seen: &Seen) -> Answer {
    if seen.path.ends_with("/batch") {
        return (
            "500 Internal Server Error".into(),
            vec![("content-type".into(), "application/problem+json".into())],
            problem(500, "internal").to_string(),
        );
    }
    packages(seen)
}

#[tokio::test]
async fn a_failed_batch_is_a_failure_of_every_item_in_it() {
    telemetry::init_for_tests();
    let (url, seen) = recording_server(Duration::from_millis(100), failing_batches).await;
    let d = client(
        &url,
        BatchSettings {
            max_items: 32,
            in_flight: 1,
        },
    );
    let ids: Vec<String> = (0..6).map(|n| format!("f-{n}")).collect();
    let results = put_all(&d, &ids).await;
    let in_batches: Vec<String> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.path.ends_with("/batch"))
        .flat_map(|s| {
            s.body["items"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|i| i["id"].as_str().unwrap_or_default().to_owned())
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(!in_batches.is_empty());
    for (id, result) in ids.iter().zip(results) {
        if in_batches.contains(id) {
            let error = result.expect_err("a failed batch fails its items");
            assert!(error.is_transient(), "{error:?}");
            assert!(error.to_string().contains("500"), "{error}");
        } else {
            assert!(result.is_ok(), "{id}: {result:?}");
        }
    }
}

#[test]
fn batch_settings_out_of_range_are_refused() {
    for batch in [
        BatchSettings {
            max_items: 0,
            in_flight: 1,
        },
        BatchSettings {
            max_items: 65,
            in_flight: 1,
        },
        BatchSettings {
            max_items: 8,
            in_flight: 0,
        },
    ] {
        let err = Downstream::new(&DownstreamSettings {
            service_token: SERVICE_TOKEN.to_owned().into(),
            batch,
            ..DownstreamSettings::default()
        })
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(err.contains("batch"), "{batch:?}: {err}");
    }
}

/// Through the client, 40 sagas' worth of calls at once against the real Package, Drone and
/// Delivery services: batches form, and every caller gets what its single call would have got
/// (registered once, a replay finds the same package, one drone per overlapping window until
/// the fleet is full and then `no-drone-available` with the service's Retry-After, each delivery
/// created once).
async fn concurrent_calls_to_the_real_services_each_get_their_own_answer(backend: Backend) {
    let package = spawn_package(backend).await;
    let drone = spawn_drone_with(backend, |s| {
        s.fleet.small = 30;
        s.fleet.medium = 0;
        s.fleet.large = 0;
        s.reservations.retry_after_secs = 11;
    })
    .await;
    let delivery = spawn_delivery(backend).await;
    let d = Downstream::new(&DownstreamSettings {
        package_url: package.address.clone(),
        drone_url: drone.address.clone(),
        delivery_url: delivery.address.clone(),
        service_token: SERVICE_TOKEN.to_owned().into(),
        batch: BatchSettings {
            max_items: 16,
            in_flight: 1,
        },
        ..DownstreamSettings::default()
    })
    .expect("client");
    let ids: Vec<String> = (0..40).map(|n| format!("b-{n:02}")).collect();

    let packages = put_all(&d, &ids).await;
    for (id, p) in ids.iter().zip(&packages) {
        assert_eq!(
            p.as_ref().map(|p| p.id.as_str()).ok(),
            Some(id.as_str()),
            "{p:?}"
        );
    }
    let again = put_all(&d, &ids).await;
    assert_eq!(
        again.into_iter().map(Result::ok).collect::<Vec<_>>(),
        packages.into_iter().map(Result::ok).collect::<Vec<_>>(),
        "replays find the same packages"
    );

    // 40 overlapping windows, 30 small drones.
    let at = pickup(24);
    let reservations = futures::future::join_all(ids.iter().map(|id| {
        let d = &d;
        async move {
            d.reserve_drone(
                id,
                &DroneReservationRequest {
                    pickup_time: at,
                    pickup_location: "1 Main St".into(),
                    drop_off_location: "2 Side St".into(),
                    package_id: id.clone(),
                    size: PackageSize::Small,
                    expedited: false,
                    owner_id: Some("owner-1".into()),
                },
            )
            .await
        }
    }))
    .await;
    let mut drones: Vec<String> = reservations
        .iter()
        .filter_map(|r| r.as_ref().ok().map(|r| r.drone_id.clone()))
        .collect();
    assert_eq!(drones.len(), 30, "one reservation per free drone");
    drones.sort();
    drones.dedup();
    assert_eq!(drones.len(), 30, "no drone twice");
    for r in reservations.iter().filter(|r| r.is_err()) {
        match r {
            Err(CallError::Transient {
                retry_after,
                reason,
            }) => {
                assert_eq!(*retry_after, Some(Duration::from_secs(11)));
                assert!(reason.contains("no-drone-available"), "{reason}");
            }
            other => panic!("expected no-drone-available, got {other:?}"),
        }
    }

    let created = futures::future::join_all(ids.iter().zip(&reservations).map(|(id, r)| {
        let d = &d;
        let drone_id = r
            .as_ref()
            .map(|r| r.drone_id.clone())
            .unwrap_or_else(|_| "drone-none".into());
        async move {
            let body = DeliveryUpsert {
                owner_id: "owner-1".into(),
                pickup_location: "1 Main St".into(),
                drop_off_location: "2 Side St".into(),
                pickup_time: at,
                deadline: "LinkedIn".into(),
                expedited: false,
                confirmation_required: ConfirmationType::Picture,
                package_id: id.clone(),
                drone_id,
            };
            d.put_delivery(id, &body).await
        }
    }))
    .await;
    assert!(created.iter().all(Result::is_ok), "{created:?}");
    for id in &ids {
        let r = delivery.get(&format!("/api/deliveries/{id}/events")).await;
        assert_eq!(r.status, 200, "{}", r.body);
        let events: Vec<Value> = r.json();
        assert_eq!(events.len(), 1, "one Created event for {id}: {events:?}");
    }
    package.stop().await;
    drone.stop().await;
    delivery.stop().await;
}
