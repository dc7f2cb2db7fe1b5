//! Client tracking at Ingestion: `GET /api/deliveries/{id}` (the `Location` of a booking's 202)
//! and its Server-Sent Events stream, fed by the saga's state changes and the Delivery service's
//! tracking events on `workflow-events`, on PostgreSQL and SQLite.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step should panic

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use contracts::{
    BookingStage, DeliveryAccepted, DeliveryStage, DeliveryTracked, DeliveryTracking,
    HistorySource, RequestState, TimeWindow, TrackingEntry, WorkflowStateChanged, ADMIN_SCOPE,
    DELIVERY_TRACKED, WORKFLOW_EVENTS_LOG, WORKFLOW_STATE_CHANGED,
};
use integration_tests::{both_backends, eventually, spawn_ingestion, Backend, IngestionApp};
use messaging::{Envelope, PartitionedLog};
use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

both_backends!(
    the_location_of_a_booking_answers_its_owner_only,
    state_changes_and_tracking_drive_the_stage_in_order,
    failures_and_cancellations_say_why,
    replayed_events_add_no_history,
    the_event_stream_follows_and_resumes_after_the_last_event_id,
    streams_per_replica_are_capped,
    a_replica_that_does_not_project_streams_what_another_recorded,
    the_carrier_leg_shows_and_goes_when_a_reschedule_drops_it,
);

fn booking(owner: &str, pickup: DateTime<Utc>) -> Value {
    json!({
        "ownerId": owner,
        "pickupLocation": "1 Main St, Redmond",
        "dropOffLocation": "99 Side St, Seattle",
        "pickupTime": pickup.to_rfc3339(),
        "deadline": "LinkedIn",
        "expedited": true,
        "confirmationRequired": "FingerPrint",
        "packageInfo": {"packageId": "pkg-1", "size": "Small", "weight": 2.5, "tag": "fragile"}
    })
}

/// Books for acc-1; the booking's id and the `Location` of the 202.
async fn book(s: &IngestionApp, token: &str) -> (Uuid, String) {
    let pickup = Utc::now() + chrono::Duration::days(2);
    let r = s
        .app
        .call_with(
            Method::POST,
            "/api/deliveryrequests",
            Some(&booking("acc-1", pickup)),
            Some(token),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let location = r.header("location").expect("a Location").to_owned();
    (r.json::<DeliveryAccepted>().delivery_id, location)
}

/// A change a test publishes on `workflow-events`.
enum Ev {
    State(RequestState, i64, Option<&'static str>),
    Track(i64, DeliveryStage, Option<&'static str>),
}

fn window() -> TimeWindow {
    let start = DateTime::parse_from_rfc3339("2030-01-02T10:00:00Z")
        .unwrap()
        .with_timezone(&Utc);
    TimeWindow {
        start,
        end: start + chrono::Duration::minutes(30),
    }
}

fn envelope(id: Uuid, ev: &Ev) -> Envelope {
    let key = id.to_string();
    match *ev {
        Ev::State(state, version, detail) => {
            let reserved = version >= 2;
            Envelope::new(
                WORKFLOW_STATE_CHANGED,
                1,
                &key,
                &WorkflowStateChanged {
                    delivery_id: id,
                    owner_id: "acc-1".into(),
                    state,
                    version,
                    detail: detail.map(str::to_owned),
                    at: Utc::now(),
                    package_id: Some("pkg-1".into()),
                    drone_id: reserved.then(|| "drone-007".into()),
                    pickup_window: reserved.then(window),
                    pickup_location: Some("1 Main St, Redmond".into()),
                    drop_off_location: Some("99 Side St, Seattle".into()),
                    pickup_time: Some(window().start),
                    revision: Some(0),
                    carrier_leg: None,
                },
            )
            .unwrap()
        }
        Ev::Track(sequence, stage, location) => Envelope::new(
            DELIVERY_TRACKED,
            1,
            &key,
            &DeliveryTracked {
                delivery_id: key.clone(),
                owner_id: "acc-1".into(),
                drone_id: "drone-007".into(),
                sequence,
                stage,
                location: location.map(str::to_owned),
                detail: None,
                at: Utc::now(),
            },
        )
        .unwrap(),
    }
}

async fn workflow_log(s: &IngestionApp) -> Arc<dyn PartitionedLog> {
    s.broker
        .log(WORKFLOW_EVENTS_LOG, s.settings.ingestion.partitions)
        .await
        .unwrap()
}

async fn publish(s: &IngestionApp, id: Uuid, events: &[Ev]) {
    let log = workflow_log(s).await;
    for ev in events {
        log.append(envelope(id, ev)).await.unwrap();
    }
}

async fn view(s: &IngestionApp, id: Uuid, token: &str) -> DeliveryTracking {
    let r = s
        .app
        .call_with(
            Method::GET,
            &format!("/api/deliveries/{id}"),
            None,
            Some(token),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

/// The view once its history has `len` entries (the acceptance included).
async fn view_with(s: &IngestionApp, id: Uuid, token: &str, len: usize) -> DeliveryTracking {
    eventually(
        Duration::from_secs(20),
        format!("{len} history entries of {id}"),
        async || {
            let v = view(s, id, token).await;
            if v.history.len() >= len {
                Ok(v)
            } else {
                Err(json!(v))
            }
        },
    )
    .await
}

/// A history entry as `source:state` or `source:TrackingStage`.
fn step(e: &TrackingEntry) -> String {
    match (e.source, e.state, e.tracking_stage) {
        (HistorySource::Booking, Some(s), _) => format!("booking:{}", s.as_str()),
        (HistorySource::Delivery, _, Some(t)) => format!("delivery:{}", t.as_str()),
        _ => format!("unexpected:{e:?}"),
    }
}

fn steps(v: &DeliveryTracking) -> Vec<String> {
    v.history.iter().map(step).collect()
}

fn assert_ids_increase(entries: &[TrackingEntry]) {
    let ids: Vec<i64> = entries.iter().map(|e| e.id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");
}

async fn the_location_of_a_booking_answers_its_owner_only(backend: Backend) {
    let s = spawn_ingestion(backend, |_| {}).await;
    let owner = s.token("acc-1", &[]);
    let pickup = Utc::now() + chrono::Duration::days(2);
    let r = s
        .app
        .call_with(
            Method::POST,
            "/api/deliveryrequests",
            Some(&booking("acc-1", pickup)),
            Some(&owner),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.json::<DeliveryAccepted>().delivery_id;
    let location = r.header("location").unwrap().to_owned();
    assert_eq!(location, format!("/api/deliveries/{id}"));

    // Right after the 202: complete, from the request.
    let got = s
        .app
        .call_with(Method::GET, &location, None, Some(&owner))
        .await;
    assert_eq!(got.status, 200, "{}", got.body);
    let v: DeliveryTracking = got.json();
    assert_eq!(v.delivery_id, id);
    assert_eq!(v.owner_id, "acc-1");
    assert_eq!(v.state, RequestState::Accepted);
    assert_eq!(v.stage, BookingStage::Accepted);
    assert_eq!(v.reason, None);
    assert_eq!(v.pickup_location.as_deref(), Some("1 Main St, Redmond"));
    assert_eq!(v.drop_off_location.as_deref(), Some("99 Side St, Seattle"));
    assert_eq!(
        v.pickup_time.map(|t| t.timestamp_millis()),
        Some(pickup.timestamp_millis())
    );
    assert_eq!((v.pickup_window, v.drone_id.as_deref()), (None, None));
    assert_eq!(steps(&v), vec!["booking:accepted"]);
    assert_eq!(v.history[0].id, 0);
    assert_eq!(v.history[0].at, v.accepted_at);
    assert_eq!(got.body["stage"], "accepted", "camelCase, kebab-case stage");
    assert!(got.body.get("pickupLocation").is_some(), "{}", got.body);
    // Still so once the batched row is in the database.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stored = view(&s, id, &owner).await;
    assert_eq!(stored.pickup_location, v.pickup_location);
    assert_eq!(stored.pickup_time, v.pickup_time);

    // Another account is told what an unknown id tells: 404, same code, on both routes.
    let other = s.token("acc-2", &[]);
    let unknown = Uuid::new_v4();
    for path in [location.clone(), format!("{location}/events")] {
        let r = s
            .app
            .call_with(Method::GET, &path, None, Some(&other))
            .await;
        assert_eq!(r.problem(404).code, "not-found", "{path}");
    }
    for path in [
        format!("/api/deliveries/{unknown}"),
        format!("/api/deliveries/{unknown}/events"),
    ] {
        let r = s
            .app
            .call_with(Method::GET, &path, None, Some(&owner))
            .await;
        assert_eq!(r.problem(404).code, "not-found", "{path}");
    }
    for path in [
        "/api/deliveries/not-a-uuid",
        "/api/deliveries/not-a-uuid/events",
    ] {
        let r = s.app.call_with(Method::GET, path, None, Some(&owner)).await;
        assert_eq!(r.bad_fields(), vec!["id"], "{path}");
    }
    let r = s.app.call_with(Method::GET, &location, None, None).await;
    assert_eq!(r.problem(401).code, "unauthorized");
    let admin = s.token("ops", &[ADMIN_SCOPE]);
    assert_eq!(view(&s, id, &admin).await.delivery_id, id);

    // The paths are documented.
    let doc = s.app.get("/openapi.json").await.body;
    let events = &doc["paths"]["/api/deliveries/{id}/events"]["get"]["responses"];
    assert!(
        events["200"]["content"]["text/event-stream"].is_object(),
        "{events}"
    );
    for status in ["400", "401", "404", "429", "503"] {
        assert!(events[status].is_object(), "{status} of the stream");
    }
    assert!(doc["paths"]["/api/deliveries/{id}"]["get"]["responses"]["404"].is_object());
    assert!(doc["components"]["schemas"]["DeliveryTracking"].is_object());
    s.stop().await;
}

async fn state_changes_and_tracking_drive_the_stage_in_order(backend: Backend) {
    let s = spawn_ingestion(backend, |_| {}).await;
    let token = s.token("acc-1", &[]);
    let (id, _) = book(&s, &token).await;
    let stages = [
        (
            Ev::State(RequestState::Scheduling, 1, None),
            BookingStage::Scheduling,
        ),
        (
            Ev::State(RequestState::Scheduled, 2, None),
            BookingStage::Scheduled,
        ),
        (
            Ev::Track(1, DeliveryStage::Created, None),
            BookingStage::Scheduled,
        ),
        (
            Ev::Track(2, DeliveryStage::HeadedToPickup, Some("0,47.60,-122.30")),
            BookingStage::InFlight,
        ),
        (
            Ev::Track(3, DeliveryStage::HeadedToDropoff, Some("0,47.65,-122.35")),
            BookingStage::InFlight,
        ),
        (
            Ev::Track(4, DeliveryStage::Completed, None),
            BookingStage::Delivered,
        ),
    ];
    for (n, (ev, want)) in stages.iter().enumerate() {
        publish(&s, id, std::slice::from_ref(ev)).await;
        let v = view_with(&s, id, &token, n + 2).await;
        assert_eq!(v.stage, *want, "after change {}: {}", n + 1, json!(v));
        assert_eq!(v.history.len(), n + 2);
    }
    let v = view(&s, id, &token).await;
    assert_eq!(
        steps(&v),
        vec![
            "booking:accepted",
            "booking:scheduling",
            "booking:scheduled",
            "delivery:Created",
            "delivery:HeadedToPickup",
            "delivery:HeadedToDropoff",
            "delivery:Completed",
        ]
    );
    assert_ids_increase(&v.history);
    assert_eq!(v.state, RequestState::Scheduled);
    assert_eq!(v.stage, BookingStage::Delivered);
    assert_eq!(v.drone_id.as_deref(), Some("drone-007"));
    assert_eq!(v.pickup_window, Some(window()));
    assert_eq!(
        v.pickup_time,
        Some(window().start),
        "as the saga now has it"
    );
    // The last location reported stays, also after an event without one.
    assert_eq!(v.last_location.as_deref(), Some("0,47.65,-122.35"));
    assert_eq!(v.history[4].location.as_deref(), Some("0,47.60,-122.30"));
    assert_eq!(v.history[4].source, HistorySource::Delivery);
    assert!(v.updated_at >= v.history[6].at);
    s.stop().await;
}

async fn failures_and_cancellations_say_why(backend: Backend) {
    let s = spawn_ingestion(backend, |_| {}).await;
    let token = s.token("acc-1", &[]);

    // A saga that fails, then is undone: failed, with the reason, throughout.
    let (failed, _) = book(&s, &token).await;
    let why = "ReserveDrone: no-drone-available: every drone is booked";
    publish(
        &s,
        failed,
        &[
            Ev::State(RequestState::Scheduling, 1, None),
            Ev::State(RequestState::Failed, 2, Some(why)),
        ],
    )
    .await;
    let v = view_with(&s, failed, &token, 3).await;
    assert_eq!(
        (v.state, v.stage),
        (RequestState::Failed, BookingStage::Failed)
    );
    assert_eq!(v.reason.as_deref(), Some(why));
    let undone = "ReserveDrone: no-drone-available: every drone is booked; compensated";
    publish(
        &s,
        failed,
        &[Ev::State(RequestState::Compensated, 3, Some(undone))],
    )
    .await;
    let v = view_with(&s, failed, &token, 4).await;
    assert_eq!(
        (v.state, v.stage, v.reason.as_deref()),
        (
            RequestState::Compensated,
            BookingStage::Failed,
            Some(undone)
        )
    );

    // The client cancels: cancelled, and still so when undoing it needs a person.
    let (cancelled, _) = book(&s, &token).await;
    publish(
        &s,
        cancelled,
        &[
            Ev::State(RequestState::Scheduling, 1, None),
            Ev::State(RequestState::Scheduled, 2, None),
            Ev::State(RequestState::Cancelled, 3, Some("cancelled by the client")),
        ],
    )
    .await;
    let v = view_with(&s, cancelled, &token, 4).await;
    assert_eq!(
        (v.state, v.stage),
        (RequestState::Cancelled, BookingStage::Cancelled)
    );
    assert_eq!(v.reason.as_deref(), Some("cancelled by the client"));
    let stuck = "cancelled by the client; Drone: compensation failed";
    publish(
        &s,
        cancelled,
        &[Ev::State(RequestState::CompensationFailed, 4, Some(stuck))],
    )
    .await;
    let v = view_with(&s, cancelled, &token, 5).await;
    assert_eq!(
        (v.state, v.stage, v.reason.as_deref()),
        (
            RequestState::CompensationFailed,
            BookingStage::Cancelled,
            Some(stuck)
        )
    );
    assert_eq!(
        steps(&v),
        vec![
            "booking:accepted",
            "booking:scheduling",
            "booking:scheduled",
            "booking:cancelled",
            "booking:compensation-failed",
        ]
    );

    // The delivery itself is cancelled: cancelled, even though the saga had scheduled it.
    let (dropped, _) = book(&s, &token).await;
    publish(
        &s,
        dropped,
        &[
            Ev::State(RequestState::Scheduling, 1, None),
            Ev::State(RequestState::Scheduled, 2, None),
            Ev::Track(1, DeliveryStage::Created, None),
            Ev::Track(2, DeliveryStage::Cancelled, None),
        ],
    )
    .await;
    let v = view_with(&s, dropped, &token, 5).await;
    assert_eq!(
        (v.state, v.stage),
        (RequestState::Scheduled, BookingStage::Cancelled)
    );
    s.stop().await;
}

async fn replayed_events_add_no_history(backend: Backend) {
    let s = spawn_ingestion(backend, |_| {}).await;
    let token = s.token("acc-1", &[]);
    let (id, _) = book(&s, &token).await;
    let first = [
        Ev::State(RequestState::Scheduling, 1, None),
        Ev::State(RequestState::Scheduled, 2, None),
        Ev::Track(1, DeliveryStage::Created, None),
        Ev::Track(2, DeliveryStage::HeadedToPickup, Some("0,1,2")),
    ];
    publish(&s, id, &first).await;
    let before = view_with(&s, id, &token, 5).await;
    // The same events again (a replay, another replica's relay), a stale one, then one new
    // tracking event: once that is in, everything before it on the partition has been applied.
    publish(&s, id, &first).await;
    publish(
        &s,
        id,
        &[
            Ev::State(RequestState::Scheduling, 1, Some("stale")),
            Ev::Track(1, DeliveryStage::Created, None),
            Ev::Track(3, DeliveryStage::HeadedToDropoff, Some("0,3,4")),
        ],
    )
    .await;
    let after = view_with(&s, id, &token, 6).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after_all = view(&s, id, &token).await;
    assert_eq!(after_all.history, after.history, "nothing more arrives");
    assert_eq!(after.history[..5], before.history[..], "no entry changed");
    assert_eq!(
        steps(&after),
        vec![
            "booking:accepted",
            "booking:scheduling",
            "booking:scheduled",
            "delivery:Created",
            "delivery:HeadedToPickup",
            "delivery:HeadedToDropoff",
        ]
    );
    assert_eq!(after.stage, BookingStage::InFlight);
    assert_eq!(after.last_location.as_deref(), Some("0,3,4"));
    s.stop().await;
}

/// One Server-Sent Event.
#[derive(Debug, Clone, PartialEq)]
struct SseEvent {
    id: i64,
    event: String,
    entry: TrackingEntry,
}

/// A client of a booking's event stream, parsing what arrives.
struct Sse {
    res: reqwest::Response,
    buf: String,
    /// Comment lines seen (heartbeats).
    comments: usize,
    retry: Option<u64>,
}

enum Resume {
    Header(i64),
    Query(i64),
    Both { header: i64, query: i64 },
}

async fn open_stream(
    s: &IngestionApp,
    id: Uuid,
    token: &str,
    resume: Option<Resume>,
) -> reqwest::Response {
    let mut url = s.app.url(&format!("/api/deliveries/{id}/events"));
    let mut req = s.app.client.get(&url).bearer_auth(token);
    match resume {
        None => {}
        Some(Resume::Header(h)) => req = req.header("Last-Event-ID", h.to_string()),
        Some(Resume::Query(q)) => {
            url = format!("{url}?lastEventId={q}");
            req = s.app.client.get(&url).bearer_auth(token);
        }
        Some(Resume::Both { header, query }) => {
            url = format!("{url}?lastEventId={query}");
            req = s
                .app
                .client
                .get(&url)
                .bearer_auth(token)
                .header("Last-Event-ID", header.to_string());
        }
    }
    req.send().await.unwrap()
}

impl Sse {
    async fn open(s: &IngestionApp, id: Uuid, token: &str, resume: Option<Resume>) -> Sse {
        let res = open_stream(s, id, token, resume).await;
        assert_eq!(res.status(), 200);
        assert_eq!(
            res.headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some("text/event-stream")
        );
        Sse {
            res,
            buf: String::new(),
            comments: 0,
            retry: None,
        }
    }

    /// The next event, or `None` if none comes within `within`.
    async fn next(&mut self, within: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            while let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                if let Some(event) = self.parse(&block) {
                    return Some(event);
                }
            }
            let chunk = tokio::time::timeout_at(deadline, self.res.chunk()).await;
            match chunk {
                Ok(Ok(Some(bytes))) => self.buf.push_str(std::str::from_utf8(&bytes).unwrap()),
                Ok(Ok(None)) => panic!("the stream ended"),
                Ok(Err(e)) => panic!("the stream failed: {e}"),
                Err(_) => return None,
            }
        }
    }

    fn parse(&mut self, block: &str) -> Option<SseEvent> {
        let (mut id, mut event, mut data) = (None, None, None);
        for line in block.lines() {
            if line.starts_with(':') {
                self.comments += 1;
            } else if let Some(v) = line.strip_prefix("retry: ") {
                self.retry = v.parse().ok();
            } else if let Some(v) = line.strip_prefix("id: ") {
                id = Some(v.parse::<i64>().unwrap());
            } else if let Some(v) = line.strip_prefix("event: ") {
                event = Some(v.to_owned());
            } else if let Some(v) = line.strip_prefix("data: ") {
                assert!(data.is_none(), "one data line per event: {block}");
                data = Some(serde_json::from_str::<TrackingEntry>(v).unwrap());
            } else if !line.is_empty() {
                panic!("unexpected line {line:?}");
            }
        }
        let entry = data?;
        let (id, event) = (id.expect("an id"), event.expect("an event type"));
        assert_eq!(id, entry.id, "the event id is the entry's");
        let want = match entry.source {
            HistorySource::Booking => "booking",
            HistorySource::Delivery => "tracking",
        };
        assert_eq!(event, want);
        Some(SseEvent { id, event, entry })
    }

    /// Exactly `n` more events (each within 20 s).
    async fn take(&mut self, n: usize) -> Vec<SseEvent> {
        let mut out = Vec::new();
        while out.len() < n {
            match self.next(Duration::from_secs(20)).await {
                Some(e) => out.push(e),
                None => panic!("only {} of {n} events arrived: {out:?}", out.len()),
            }
        }
        out
    }

    /// Asserts that no event arrives for a while (heartbeats may).
    async fn quiet(&mut self) {
        let extra = self.next(Duration::from_millis(1800)).await;
        assert_eq!(extra, None, "no further event");
    }
}

fn sse_steps(events: &[SseEvent]) -> Vec<String> {
    events.iter().map(|e| step(&e.entry)).collect()
}

async fn the_event_stream_follows_and_resumes_after_the_last_event_id(backend: Backend) {
    let s = spawn_ingestion(backend, |st| st.ingestion.tracking.heartbeat_secs = 1).await;
    let token = s.token("acc-1", &[]);
    let (id, _) = book(&s, &token).await;

    let mut sse = Sse::open(&s, id, &token, None).await;
    let mut seen = sse.take(1).await;
    assert_eq!(sse_steps(&seen), vec!["booking:accepted"]);
    assert_eq!(seen[0].id, 0);
    assert_eq!(sse.retry, Some(2000));
    // Each change shows as it happens.
    publish(&s, id, &[Ev::State(RequestState::Scheduling, 1, None)]).await;
    seen.extend(sse.take(1).await);
    publish(
        &s,
        id,
        &[
            Ev::State(RequestState::Scheduled, 2, None),
            Ev::Track(1, DeliveryStage::Created, None),
        ],
    )
    .await;
    seen.extend(sse.take(2).await);
    assert_eq!(
        sse_steps(&seen),
        vec![
            "booking:accepted",
            "booking:scheduling",
            "booking:scheduled",
            "delivery:Created"
        ]
    );
    sse.quiet().await;
    assert!(sse.comments > 0, "a heartbeat within the quiet second");
    // The client goes away; two changes happen meanwhile.
    drop(sse);
    let last = seen.last().unwrap().id;
    publish(
        &s,
        id,
        &[
            Ev::Track(2, DeliveryStage::HeadedToPickup, Some("0,47.6,-122.3")),
            Ev::Track(3, DeliveryStage::HeadedToDropoff, Some("0,47.7,-122.4")),
        ],
    )
    .await;
    view_with(&s, id, &token, 6).await;
    // It comes back: exactly what it missed, then what happens next.
    let mut sse = Sse::open(&s, id, &token, Some(Resume::Header(last))).await;
    let missed = sse.take(2).await;
    assert_eq!(
        sse_steps(&missed),
        vec!["delivery:HeadedToPickup", "delivery:HeadedToDropoff"]
    );
    assert_eq!(missed[0].entry.location.as_deref(), Some("0,47.6,-122.3"));
    seen.extend(missed);
    publish(&s, id, &[Ev::Track(4, DeliveryStage::Completed, None)]).await;
    seen.extend(sse.take(1).await);
    sse.quiet().await;
    drop(sse);

    // Across both connections: the view's history, each entry once, in order.
    let v = view(&s, id, &token).await;
    let entries: Vec<TrackingEntry> = seen.iter().map(|e| e.entry.clone()).collect();
    assert_eq!(entries, v.history);
    assert_eq!(v.stage, BookingStage::Delivered);

    // From the query parameter (for clients that cannot set headers); the header wins.
    let after_scheduled = v.history[2].id;
    let mut sse = Sse::open(&s, id, &token, Some(Resume::Query(after_scheduled))).await;
    let rest = sse.take(4).await;
    let want: Vec<TrackingEntry> = v.history[3..].to_vec();
    assert_eq!(rest.into_iter().map(|e| e.entry).collect::<Vec<_>>(), want);
    sse.quiet().await;
    drop(sse);
    let newest = v.history.last().unwrap().id;
    let mut sse = Sse::open(
        &s,
        id,
        &token,
        Some(Resume::Both {
            header: newest,
            query: 0,
        }),
    )
    .await;
    sse.quiet().await;
    drop(sse);

    let r = open_stream(&s, id, &token, Some(Resume::Query(-1))).await;
    assert_eq!(r.status(), 400);
    let r = s
        .app
        .client
        .get(s.app.url(&format!("/api/deliveries/{id}/events")))
        .bearer_auth(&token)
        .header("Last-Event-ID", "abc")
        .send()
        .await
        .unwrap();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["field"], "Last-Event-ID", "{body}");
    s.stop().await;
}

async fn streams_per_replica_are_capped(backend: Backend) {
    let s = spawn_ingestion(backend, |st| {
        st.ingestion.tracking.max_streams = 1;
        st.ingestion.tracking.heartbeat_secs = 1;
    })
    .await;
    let token = s.token("acc-1", &[]);
    let (id, _) = book(&s, &token).await;
    let mut sse = Sse::open(&s, id, &token, None).await;
    sse.take(1).await;
    let r = open_stream(&s, id, &token, None).await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().get("retry-after").is_some());
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "too-many-streams", "{body}");
    // The place is given back once the client has gone.
    drop(sse);
    let mut again = eventually(
        Duration::from_secs(15),
        "a stream once the other closed",
        async || {
            let r = open_stream(&s, id, &token, Some(Resume::Header(0))).await;
            if r.status() == 200 {
                Ok(r)
            } else {
                Err(r.status())
            }
        },
    )
    .await;
    let first = again.chunk().await.unwrap().unwrap_or_default();
    assert!(String::from_utf8_lossy(&first).starts_with("retry: "));
    drop(again);
    s.stop().await;
}

async fn a_replica_that_does_not_project_streams_what_another_recorded(backend: Backend) {
    // Quick heartbeats: the server notices a client gone when it next writes.
    let s = spawn_ingestion(backend, |st| st.ingestion.tracking.heartbeat_secs = 1).await;
    let token = s.token("acc-1", &[]);
    // A second replica on the same database and broker that does not follow the log itself:
    // its streams see only what the first replica's projection records.
    let mut settings = s.settings.clone();
    settings.ingestion.follow_workflow_events = false;
    let reader = integration_tests::spawn::<ingestion::Application>(settings, None).await;
    let (id, _) = book(&s, &token).await;
    // The other replica finds the booking once the first has written its row (batched).
    let what = "the booking on the other replica";
    let res = eventually(Duration::from_secs(10), what, async || {
        let res = reader
            .client
            .get(reader.url(&format!("/api/deliveries/{id}/events")))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        if res.status() == 200 {
            Ok(res)
        } else {
            Err(res.status())
        }
    })
    .await;
    let mut sse = Sse {
        res,
        buf: String::new(),
        comments: 0,
        retry: None,
    };
    assert_eq!(sse_steps(&sse.take(1).await), vec!["booking:accepted"]);
    publish(&s, id, &[Ev::State(RequestState::Scheduling, 1, None)]).await;
    assert_eq!(sse_steps(&sse.take(1).await), vec!["booking:scheduling"]);
    publish(&s, id, &[Ev::State(RequestState::Scheduled, 2, None)]).await;
    assert_eq!(sse_steps(&sse.take(1).await), vec!["booking:scheduled"]);
    drop(sse);
    reader.stop().await;
    s.stop().await;
}

/// The booking's carrier leg is what the latest state change says: shown while the booking holds
/// one, gone once a reschedule made the carrier unnecessary (the fields the Scheduler always
/// sends are not kept from older events).
async fn the_carrier_leg_shows_and_goes_when_a_reschedule_drops_it(backend: Backend) {
    let s = spawn_ingestion(backend, |_| {}).await;
    let token = s.token("acc-1", &[]);
    let (id, _) = book(&s, &token).await;
    let leg = contracts::CarrierLeg {
        carrier_id: "cascade".into(),
        carrier_name: "Cascade Freight".into(),
        from_location: "0,47.6062,-122.3321".into(),
        to_location: "0,47.3,-122.4".into(),
        whole_route: false,
        handover_time: window().start,
    };
    let change = |version: i64, revision: u32, carrier_leg: Option<contracts::CarrierLeg>| {
        let envelope = envelope(id, &Ev::State(RequestState::Scheduled, version, None));
        let mut body: WorkflowStateChanged = envelope.decode().unwrap();
        body.revision = Some(revision);
        body.carrier_leg = carrier_leg;
        Envelope::new(WORKFLOW_STATE_CHANGED, 1, &id.to_string(), &body).unwrap()
    };
    let log = workflow_log(&s).await;
    log.append(change(3, 0, Some(leg.clone()))).await.unwrap();
    let v = view_with(&s, id, &token, 2).await;
    assert_eq!(v.carrier_leg, Some(leg));
    // Rescheduled to a drop-off the drones reach alone: the leg was cancelled.
    log.append(change(5, 1, None)).await.unwrap();
    let v = view_with(&s, id, &token, 3).await;
    assert_eq!(v.carrier_leg, None, "{v:?}");
    s.stop().await;
}
