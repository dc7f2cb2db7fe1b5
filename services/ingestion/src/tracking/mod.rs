//! Client tracking: `GET /api/deliveries/{id}` (where the `Location` of a `202` points) answers
//! the booking as it stands with its history, and `GET /api/deliveries/{id}/events` streams that
//! history as Server-Sent Events, resuming after `Last-Event-ID`.
//!
//! Both read Ingestion's read model only. The history is written by the workflow-events
//! projection ([`crate::readmodel`]) in the transaction that updates the booking's row; every
//! replica follows the whole log into the shared database, and a change is recorded once
//! (unique per source and sequence). A stream is woken by this replica's projection after its
//! commit, and re-reads the database every `poll_ms` for what another replica recorded first.

mod migration;
mod sse;
mod store;

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header;
use actix_web::web::{self, Bytes};
use actix_web::{HttpRequest, HttpResponse};
use contracts::{
    BookingStage, DeliveryStage, DeliveryTracking, HistorySource, Problem, RequestState,
    TimeWindow, TrackingEntry,
};
use serde::Deserialize;
use service_kit::{ApiError, ApiResult};
use utoipa::OpenApi;

use crate::readmodel::{request, ReadModel};
use crate::routes::{delivery_id, known, AppState};

pub(crate) use migration::AddTracking;
pub(crate) use store::{record, Change, Changes};

/// Limits of the tracking endpoints.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct TrackingSettings {
    /// Event streams open at once on one replica; beyond, `503` with `Retry-After`.
    pub max_streams: usize,
    /// A comment line this often keeps idle streams open through proxies.
    pub heartbeat_secs: u64,
    /// How often an open stream re-reads the database even when not woken (changes recorded
    /// by another replica first).
    pub poll_ms: u64,
    /// The reconnection delay a stream asks clients to wait (the SSE `retry` field).
    pub retry_ms: u64,
    /// History entries `GET /api/deliveries/{id}` answers at most (the newest).
    pub max_history: u64,
}

impl Default for TrackingSettings {
    fn default() -> Self {
        Self {
            max_streams: 10_000,
            heartbeat_secs: 15,
            poll_ms: 1000,
            retry_ms: 2000,
            max_history: 1000,
        }
    }
}

/// What the tracking handlers share.
pub(crate) struct Tracking {
    store: Arc<ReadModel>,
    settings: TrackingSettings,
    retry_after_secs: u64,
    open: Arc<AtomicUsize>,
}

impl Tracking {
    pub(crate) fn new(
        store: Arc<ReadModel>,
        settings: &TrackingSettings,
        retry_after_secs: u64,
    ) -> Self {
        Self {
            store,
            settings: settings.clone(),
            retry_after_secs,
            open: Arc::default(),
        }
    }
}

pub(crate) fn configure(cfg: &mut web::ServiceConfig, tracking: web::Data<Tracking>) {
    cfg.app_data(tracking)
        .route("/api/deliveries/{id}", web::get().to(view))
        .route("/api/deliveries/{id}/events", web::get().to(events));
}

#[derive(OpenApi)]
#[openapi(
    paths(view, events),
    components(schemas(
        DeliveryTracking,
        TrackingEntry,
        BookingStage,
        HistorySource,
        DeliveryStage,
        TimeWindow,
        RequestState,
        Problem
    ))
)]
struct ApiDoc;

/// The tracking paths and schemas, merged into the service's document.
pub(crate) fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// A booking as its client follows it: state, stage, where and when, the drone, its history.
#[utoipa::path(
    get, path = "/api/deliveries/{id}", tag = "deliveries",
    params(("id" = Uuid, Path, description = "deliveryId (the `Location` of the booking's 202)")),
    responses(
        (status = 200, description = "The booking with its history, oldest first", body = DeliveryTracking),
        (status = 400, description = "The id is not a deliveryId (a UUID)", body = Problem),
        (status = 401, description = "Missing or invalid client token", body = Problem),
        (status = 404, description = "Unknown deliveryId, or not this account's booking (answered alike)", body = Problem),
        (status = 429, description = "Rate limit of the account; see Retry-After", body = Problem),
        (status = 503, description = "The read model's database is unavailable; see Retry-After", body = Problem),
    )
)]
async fn view(
    req: HttpRequest,
    app: web::Data<AppState>,
    tracking: web::Data<Tracking>,
    id: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let claims = app.client(&req)?;
    let id = delivery_id(&id)?;
    // May still be on its way to the database (then it has no history yet).
    let accepted = known(&app, &claims, id).await?;
    let limit = tracking.settings.max_history.max(1);
    let (row, history) = store::snapshot(tracking.store.db(), id, limit).await?;
    Ok(HttpResponse::Ok().json(view_of(row.unwrap_or(accepted), history)?))
}

/// The view of a booking's row and its stored history (oldest first).
fn view_of(row: request::Model, stored: Vec<TrackingEntry>) -> ApiResult<DeliveryTracking> {
    let state = RequestState::parse(&row.state).ok_or_else(|| {
        ApiError::Internal(anyhow::anyhow!("unknown request state {}", row.state))
    })?;
    let tracking = row.tracking_stage.as_deref().and_then(DeliveryStage::parse);
    let client_cancelled = row.client_cancelled
        || stored
            .iter()
            .any(|e| e.state == Some(RequestState::Cancelled));
    let stage = BookingStage::derive(state, tracking, client_cancelled);
    let saga_ended = matches!(
        state,
        RequestState::Cancelled
            | RequestState::Failed
            | RequestState::Compensating
            | RequestState::Compensated
            | RequestState::CompensationFailed
    );
    let tracking_reason = || {
        stored
            .iter()
            .rev()
            .find(|e| e.tracking_stage == Some(DeliveryStage::Cancelled))
            .and_then(|e| e.detail.clone())
    };
    let reason = match stage {
        BookingStage::Failed | BookingStage::Cancelled if saga_ended => {
            row.detail.clone().or_else(tracking_reason)
        }
        BookingStage::Cancelled => tracking_reason(),
        _ => None,
    };
    let pickup_window = match (row.window_start, row.window_end) {
        (Some(start), Some(end)) => Some(TimeWindow { start, end }),
        _ => None,
    };
    let updated_at = row
        .tracked_at
        .map_or(row.updated_at, |t| t.max(row.updated_at));
    let mut history = Vec::with_capacity(stored.len() + 1);
    history.push(store::accepted_entry(row.accepted_at));
    history.extend(stored);
    Ok(DeliveryTracking {
        delivery_id: delivery_id(&row.delivery_id)?,
        owner_id: row.owner_id,
        state,
        stage,
        reason,
        pickup_location: row.pickup_location,
        drop_off_location: row.drop_off_location,
        pickup_time: row.pickup_time,
        pickup_window,
        drone_id: row.drone_id,
        carrier_leg: row
            .carrier_leg
            .as_deref()
            .and_then(|l| serde_json::from_str(l).ok()),
        last_location: row.last_location,
        accepted_at: row.accepted_at,
        updated_at,
        history,
    })
}

#[derive(Debug, Deserialize)]
struct EventsQuery {
    /// For clients that cannot set headers; the `Last-Event-ID` header wins.
    #[serde(rename = "lastEventId")]
    last_event_id: Option<String>,
}

/// Where a stream resumes: after the entry the client saw last, or (`None`) from the start.
fn last_event_id(req: &HttpRequest, query: &EventsQuery) -> ApiResult<Option<i64>> {
    let (field, raw) = match req.headers().get("Last-Event-ID") {
        Some(v) => ("Last-Event-ID", v.to_str().ok().unwrap_or("-").trim()),
        None => match query.last_event_id.as_deref() {
            Some(v) => ("lastEventId", v),
            None => return Ok(None),
        },
    };
    // Digits only, as the document states it (`integer`, `minimum: 0`): no sign, no spaces.
    let digits = !raw.is_empty() && raw.bytes().all(|b| b.is_ascii_digit());
    match raw.parse::<i64>() {
        Ok(id) if digits => Ok(Some(id)),
        _ => Err(ApiError::field(
            field,
            "must be the id of an event of this stream (a non-negative integer)",
        )),
    }
}

/// The booking's history as Server-Sent Events: the entries after `Last-Event-ID` (all without
/// it), then each new one as it happens. Each event is `id: <entry id>`, `event: booking` (the
/// saga's state) or `event: tracking` (the drone's progress), `data: <the entry as JSON>`; a
/// comment line now and then keeps an idle stream open.
#[utoipa::path(
    get, path = "/api/deliveries/{id}/events", tag = "deliveries",
    params(
        ("id" = Uuid, Path, description = "deliveryId"),
        ("Last-Event-ID" = Option<i64>, Header, nullable = false, minimum = 0, description = "Resume after this entry (what the stream sent last); without it, from the start"),
        ("lastEventId" = Option<i64>, Query, minimum = 0, description = "The same, for clients that cannot set headers; the header wins"),
    ),
    responses(
        (status = 200, description = "The event stream; each event's data is a TrackingEntry", content_type = "text/event-stream", body = String),
        (status = 400, description = "The id is not a deliveryId, or Last-Event-ID is not an event id", body = Problem),
        (status = 401, description = "Missing or invalid client token", body = Problem),
        (status = 404, description = "Unknown deliveryId, or not this account's booking (answered alike)", body = Problem),
        (status = 429, description = "Rate limit of the account; see Retry-After", body = Problem),
        (status = 503, description = "As many streams open on this replica as it keeps, or the database is unavailable; see Retry-After", body = Problem),
    )
)]
async fn events(
    req: HttpRequest,
    app: web::Data<AppState>,
    tracking: web::Data<Tracking>,
    id: web::Path<String>,
    query: web::Query<EventsQuery>,
) -> ApiResult<HttpResponse> {
    let claims = app.client(&req)?;
    let id = delivery_id(&id)?;
    let cursor = last_event_id(&req, &query)?;
    let row = known(&app, &claims, id).await?;
    let settings = &tracking.settings;
    let slot = sse::Slot::take(&tracking.open, settings.max_streams).ok_or_else(|| {
        ApiError::unavailable(
            "too-many-streams",
            "this replica has as many event streams open as it keeps; retry shortly",
            tracking.retry_after_secs,
        )
    })?;
    let mut first = vec![Bytes::from(format!("retry: {}\n\n", settings.retry_ms))];
    if cursor.is_none() {
        first.push(sse::frame(&store::accepted_entry(row.accepted_at)));
    }
    // Watched before the first read, so no change between the two goes unnoticed.
    let watch = tracking.store.changes().watch(id);
    let follow = sse::Follow {
        db: tracking.store.db().clone(),
        id,
        cursor: cursor.unwrap_or(0),
        first,
        watch,
        slot,
        poll: Duration::from_millis(settings.poll_ms),
        heartbeat: Duration::from_secs(settings.heartbeat_secs),
    };
    tracing::debug!(delivery_id = %id, ?cursor, "event stream opened");
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        // Proxies such as nginx would otherwise hold the events back.
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(sse::stream(follow)))
}
