//! HTTP routes of the Drone service. Every route requires the service token.

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use chrono::{TimeZone, Utc};
use contracts::{
    BatchAnswer, BatchItem, BatchRequest, BatchResult, Drone, DroneKey, DroneReservation,
    DroneReservationRequest, Fleet, Flight, FlightStage, PackageSize, Problem, ReservationStatus,
    TelemetryKind, TelemetryReport, TimeWindow, Utilization,
};
use serde::Deserialize;
use service_kit::auth::ServiceCaller;
use service_kit::openapi::BearerSchemes;
use service_kit::{valid_id, ApiError, ApiResult, Batch, Json};
use utoipa::{IntoParams, OpenApi};

use crate::store::{self, Outcome, StoreError};
use crate::AppState;

pub(crate) fn configure(cfg: &mut web::ServiceConfig, state: web::Data<AppState>) {
    cfg.app_data(state)
        // Only POST: GET, PUT and DELETE of `/api/dronedeliveries/batch` still mean the delivery
        // "batch".
        .route("/api/dronedeliveries/batch", web::post().to(post_batch))
        .route(
            "/api/dronedeliveries/{deliveryId}",
            web::put().to(put_reservation),
        )
        .route(
            "/api/dronedeliveries/{deliveryId}",
            web::get().to(get_reservation),
        )
        .route(
            "/api/dronedeliveries/{deliveryId}",
            web::delete().to(delete_reservation),
        )
        .route("/api/drones", web::get().to(get_fleet))
        .route(
            "/api/drones/{id}/reservations",
            web::get().to(drone_reservations),
        )
        .route("/api/utilization", web::get().to(utilization))
        .route("/api/telemetry/{id}", web::post().to(post_telemetry))
        .route("/api/drones/{id}/key", web::get().to(get_drone_key));
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Drone service", description = "The drone fleet and its time-window reservations."),
    paths(put_reservation, post_batch, get_reservation, delete_reservation, get_fleet, drone_reservations, utilization, post_telemetry, get_drone_key),
    components(schemas(
        DroneReservationRequest, DroneReservation, BatchRequest<DroneReservationRequest>,
        BatchItem<DroneReservationRequest>, BatchAnswer, BatchResult, TimeWindow, ReservationStatus, PackageSize,
        Drone, Fleet, Utilization, Problem, TelemetryReport, TelemetryKind, Flight, FlightStage,
        DroneKey
    )),
    modifiers(&BearerSchemes),
    security(("serviceToken" = []))
)]
struct ApiDoc;

pub(crate) fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The one place store errors become HTTP answers.
impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::ReservationNotFound(id) => ApiError::not_found("reservation", id),
            StoreError::DroneNotFound(id) => ApiError::not_found("drone", id),
            StoreError::Released(_) => ApiError::conflict("reservation-released", err.to_string()),
            StoreError::NoDroneFree {
                retry_after_secs, ..
            } => ApiError::unavailable("no-drone-available", err.to_string(), retry_after_secs),
            StoreError::Unexpected(_) => ApiError::Internal(err.into()),
            StoreError::Db(e) => e.into(),
        }
    }
}

/// Reserves a drone for a delivery's window. The same request again returns the same drone; a
/// different pickup time moves the reservation (keeping the drone when it is free).
#[utoipa::path(
    put, path = "/api/dronedeliveries/{deliveryId}", tag = "reservations",
    params(("deliveryId" = String, Path, description = "Delivery id")),
    request_body = DroneReservationRequest,
    responses(
        (status = 201, description = "Reserved", body = DroneReservation),
        (status = 200, description = "Already reserved (same drone) or moved to the new window", body = DroneReservation),
        (status = 400, description = "Invalid body (every bad field is named)", body = Problem),
        (status = 409, description = "The reservation was released (code `reservation-released`): a released reservation is not taken again", body = Problem),
        (status = 503, description = "No drone free for the window: retry after `Retry-After` (code `no-drone-available`)", body = Problem),
    )
)]
async fn put_reservation(
    _: ServiceCaller,
    state: web::Data<AppState>,
    id: web::Path<String>,
    Json(body): Json<DroneReservationRequest>,
) -> ApiResult<HttpResponse> {
    let id = valid_id("deliveryId", &id)?;
    let outcome = store::reserve(&state.db, &state.drones, &state.reservations, id, &body).await?;
    let (status, reservation) = answered(outcome);
    Ok(HttpResponse::build(status).json(reservation))
}

fn answered(outcome: Outcome) -> (StatusCode, DroneReservation) {
    match outcome {
        Outcome::Created(r) => (StatusCode::CREATED, r),
        Outcome::Existing(r) => (StatusCode::OK, r),
    }
}

/// Reserves drones for many deliveries at once: each item is answered exactly as `PUT
/// /api/dronedeliveries/{deliveryId}` with its body would answer it (`201`, `200`, `400`, `409`,
/// `503` with `retryAfter`), in order; the same delivery twice is answered as two PUTs one after
/// the other. One refused item never fails the others, and no drone is ever double-booked.
#[utoipa::path(
    post, path = "/api/dronedeliveries/batch", tag = "reservations",
    request_body = BatchRequest<DroneReservationRequest>,
    responses(
        (status = 200, description = "One result per item, in order, each with the status, `retryAfter` and body (the reservation, or a problem with its `code`) that `PUT /api/dronedeliveries/{deliveryId}` would have answered", body = BatchAnswer),
        (status = 400, description = "Malformed envelope: not `{items: [...]}` with 1 to 64 items, each with a string `id` and a `body` (the field is named)", body = Problem),
        (status = 401, description = "Missing or wrong service token", body = Problem),
        (status = 503, description = "The database is unavailable (code `database-unavailable`): retry the whole batch after `Retry-After`", body = Problem),
    )
)]
async fn post_batch(
    _: ServiceCaller,
    state: web::Data<AppState>,
    batch: Batch<DroneReservationRequest>,
) -> ApiResult<HttpResponse> {
    let answers = store::reserve_batch(
        &state.db,
        &state.drones,
        &state.reservations,
        &batch.valid(),
    )
    .await?;
    Ok(batch.reply(answers.into_iter().map(|answer| {
        answer
            .map(|outcome| {
                let (status, reservation) = answered(outcome);
                (status, Some(reservation))
            })
            .map_err(ApiError::from)
    })))
}

/// Reads a delivery's reservation.
#[utoipa::path(
    get, path = "/api/dronedeliveries/{deliveryId}", tag = "reservations",
    params(("deliveryId" = String, Path, description = "Delivery id")),
    responses(
        (status = 200, description = "The reservation", body = DroneReservation),
        (status = 404, description = "No reservation for this delivery", body = Problem),
    )
)]
async fn get_reservation(
    _: ServiceCaller,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let id = valid_id("deliveryId", &id)?;
    Ok(HttpResponse::Ok().json(store::get(&state.db, id).await?))
}

/// Releases the drone (compensation). Idempotent: releasing a released reservation succeeds.
#[utoipa::path(
    delete, path = "/api/dronedeliveries/{deliveryId}", tag = "reservations",
    params(("deliveryId" = String, Path, description = "Delivery id")),
    responses(
        (status = 200, description = "Released", body = DroneReservation),
        (status = 404, description = "No reservation for this delivery (none can be made for it afterwards)", body = Problem),
    )
)]
async fn delete_reservation(
    _: ServiceCaller,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let id = valid_id("deliveryId", &id)?;
    Ok(HttpResponse::Ok().json(store::release(&state.db, id).await?))
}

/// The fleet: every active drone, what it is doing now and how many reservations it still has.
#[utoipa::path(
    get, path = "/api/drones", tag = "fleet",
    responses((status = 200, description = "The fleet", body = Fleet))
)]
async fn get_fleet(_: ServiceCaller, state: web::Data<AppState>) -> ApiResult<HttpResponse> {
    Ok(HttpResponse::Ok().json(store::fleet(&state.db).await?))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
struct ReservationQuery {
    /// `active` or `released`; both when absent.
    status: Option<ReservationStatus>,
    /// At most this many, earliest window first (default 100, at most 1000).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u64>,
}

/// A drone's reservations, earliest window first.
#[utoipa::path(
    get, path = "/api/drones/{id}/reservations", tag = "fleet",
    params(("id" = String, Path, description = "Drone id"), ReservationQuery),
    responses(
        (status = 200, description = "Reservations", body = [DroneReservation]),
        (status = 404, description = "No such drone", body = Problem),
    )
)]
async fn drone_reservations(
    _: ServiceCaller,
    state: web::Data<AppState>,
    id: web::Path<String>,
    query: web::Query<ReservationQuery>,
) -> ApiResult<HttpResponse> {
    let id = valid_id("id", &id)?;
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::field("limit", "must be between 1 and 1000"));
    }
    let out = store::drone_reservations(&state.db, id, query.status, limit).await?;
    Ok(HttpResponse::Ok().json(out))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
struct UtilizationQuery {
    #[param(inline, value_type = contracts::schema::Identifier)]
    owner_id: String,
    #[param(minimum = 2000, maximum = 2200)]
    year: i32,
    /// 1 to 12.
    #[param(minimum = 1, maximum = 12)]
    month: u32,
}

/// What one owner's bookings held of the fleet in a calendar month (UTC): active reservations whose
/// window starts in the month.
#[utoipa::path(
    get, path = "/api/utilization", tag = "fleet",
    params(UtilizationQuery),
    responses(
        (status = 200, description = "Utilization", body = Utilization),
        (status = 400, description = "Missing or invalid query parameters", body = Problem),
    )
)]
async fn utilization(
    _: ServiceCaller,
    state: web::Data<AppState>,
    query: web::Query<UtilizationQuery>,
) -> ApiResult<HttpResponse> {
    let owner = valid_id("ownerId", &query.owner_id)?;
    if !(1..=12).contains(&query.month) {
        return Err(ApiError::field("month", "must be between 1 and 12"));
    }
    if !(2000..=2200).contains(&query.year) {
        return Err(ApiError::field("year", "must be between 2000 and 2200"));
    }
    let month_start = |y: i32, m: u32| {
        Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0)
            .single()
            .map(|t| t.timestamp_millis())
            .ok_or_else(|| ApiError::field("month", "is not a valid month"))
    };
    let from = month_start(query.year, query.month)?;
    let (ny, nm) = if query.month == 12 {
        (query.year + 1, 1)
    } else {
        (query.year, query.month + 1)
    };
    let to = month_start(ny, nm)?;
    let out = store::utilization(&state.db, owner, (query.year, query.month), from..to).await?;
    Ok(HttpResponse::Ok().json(out))
}

/// A drone reports on the delivery it flies (authenticated with its own key, see `GET
/// /api/drones/{id}/key`): `position` and `picked-up` become the delivery's `HeadedToPickup` /
/// `HeadedToDropoff` tracking events, `delivered` completes the delivery and ends the drone's
/// window now. A repeated `delivered` answers the flight again.
#[utoipa::path(
    post, path = "/api/telemetry/{id}", tag = "telemetry",
    params(("id" = String, Path, description = "Drone id")),
    request_body = TelemetryReport,
    security(("droneKey" = [])),
    responses(
        (status = 200, description = "Recorded; the flight as it stands", body = Flight),
        (status = 400, description = "Invalid body (every bad field is named)", body = Problem),
        (status = 401, description = "Missing key, or not this drone's key", body = Problem),
        (status = 404, description = "This drone holds no reservation for the delivery, or the delivery does not exist", body = Problem),
        (status = 409, description = "The reservation was released (`reservation-released`), the delivery was cancelled (`delivery-closed`), or it was delivered already (`flight-completed`): stop flying it", body = Problem),
        (status = 503, description = "The delivery service did not record it (`delivery-unavailable`): send it again after `Retry-After`", body = Problem),
    )
)]
async fn post_telemetry(
    req: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
    Json(report): Json<TelemetryReport>,
) -> ApiResult<HttpResponse> {
    let drone_id = valid_id("id", &id)?;
    crate::telemetry::authenticate(&req, &state.service_token, drone_id)?;
    let recorded = crate::telemetry::report(&state.db, &state.deliveries, drone_id, &report).await;
    let outcome = match &recorded {
        Ok(_) => "recorded",
        Err(ApiError::Unavailable { .. }) => "retry",
        Err(_) => "refused",
    };
    state
        .telemetry_reports
        .with_label_values(&[report.kind.as_str(), outcome])
        .inc();
    Ok(HttpResponse::Ok().json(recorded?))
}

/// The key a drone presents on its telemetry (for provisioning the drone; service token only).
#[utoipa::path(
    get, path = "/api/drones/{id}/key", tag = "telemetry",
    params(("id" = String, Path, description = "Drone id")),
    responses(
        (status = 200, description = "The drone's key", body = DroneKey),
        (status = 400, description = "Invalid drone id", body = Problem),
        (status = 401, description = "Missing or wrong service token", body = Problem),
        (status = 404, description = "No such drone", body = Problem),
    )
)]
async fn get_drone_key(
    _: ServiceCaller,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let drone_id = valid_id("id", &id)?;
    store::drone_exists(&state.db, drone_id).await?;
    Ok(HttpResponse::Ok().json(DroneKey {
        drone_id: drone_id.to_owned(),
        key: crate::telemetry::drone_key(&state.service_token, drone_id),
    }))
}
