//! HTTP routes of the Delivery service. Every route requires the service token.

use actix_web::http::{header, StatusCode};
use actix_web::{guard, web, HttpResponse};
use contracts::{
    BatchAnswer, BatchRequest, BatchResult, Confirmation, ConfirmationType, Delivery,
    DeliveryPatch, DeliveryStage, DeliveryStatus, DeliveryUpsert, Problem, TrackingEvent,
    TrackingUpdate,
};
use service_kit::auth::ServiceCaller;
use service_kit::openapi::BearerSchemes;
use service_kit::{valid_id, ApiResult, Batch, Json};
use utoipa::OpenApi;

use crate::store;
use crate::AppState;

pub(crate) fn configure(cfg: &mut web::ServiceConfig, state: web::Data<AppState>) {
    cfg.app_data(state)
        // Before `{id}`, and for POST only: every other method on `/api/deliveries/batch` goes on
        // to `{id}`, where "batch" is an id like any other.
        .service(
            web::resource("/api/deliveries/batch")
                .guard(guard::Post())
                .route(web::post().to(put_delivery_batch)),
        )
        .route("/api/deliveries/{id}", web::get().to(get_delivery))
        .route("/api/deliveries/{id}", web::put().to(put_delivery))
        .route("/api/deliveries/{id}", web::patch().to(patch_delivery))
        .route("/api/deliveries/{id}", web::delete().to(cancel_delivery))
        .route("/api/deliveries/{id}/status", web::get().to(get_status))
        .route("/api/deliveries/{id}/events", web::get().to(get_events))
        .route("/api/deliveries/{id}/events", web::post().to(post_event))
        .route(
            "/api/deliveries/{id}/confirmations",
            web::post().to(post_confirmation),
        );
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Delivery service",
        description = "Deliveries and their tracking history; status is derived from the history."
    ),
    paths(
        put_delivery,
        put_delivery_batch,
        get_delivery,
        patch_delivery,
        cancel_delivery,
        get_status,
        get_events,
        post_event,
        post_confirmation
    ),
    components(schemas(
        BatchAnswer,
        BatchResult,
        Delivery,
        DeliveryUpsert,
        DeliveryPatch,
        DeliveryStage,
        DeliveryStatus,
        TrackingEvent,
        TrackingUpdate,
        Confirmation,
        ConfirmationType,
        Problem
    )),
    modifiers(&BearerSchemes),
    security(("serviceToken" = []))
)]
struct ApiDoc;

pub(crate) fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// Creates a delivery (`201`) or finds it already there (`204`, the body is ignored). Idempotent.
#[utoipa::path(
    put, path = "/api/deliveries/{id}", tag = "deliveries",
    params(("id" = String, Path, description = "Delivery id")),
    request_body = DeliveryUpsert,
    responses(
        (status = 201, description = "Created, with its `Created` event", body = Delivery,
            links(
                ("Track" = (operation_id = "post_event", parameters(("id" = "$request.path.id")))),
                ("Confirm" = (operation_id = "post_confirmation", parameters(("id" = "$request.path.id")))),
                ("Status" = (operation_id = "get_status", parameters(("id" = "$request.path.id")))),
            )),
        (status = 204, description = "Already there; nothing changed"),
        (status = 400, description = "Invalid body (every bad field is named)", body = Problem),
        (status = 401, description = "Missing or wrong service token", body = Problem),
        (status = 409, description = "Cancelled before it was created (`delivery-cancelled`)", body = Problem),
    )
)]
async fn put_delivery(
    _: ServiceCaller,
    state: web::Data<AppState>,
    id: web::Path<String>,
    Json(body): Json<DeliveryUpsert>,
) -> ApiResult<HttpResponse> {
    let id = valid_id("id", &id)?;
    Ok(match store::create(&state.db, id, &body).await? {
        Some(created) => HttpResponse::Created()
            .insert_header((header::LOCATION, format!("/api/deliveries/{id}")))
            .json(created),
        None => HttpResponse::NoContent().finish(),
    })
}

/// Creates many deliveries at once: a batch of `PUT /api/deliveries/{id}` calls, in one transaction.
///
/// Each item is answered as its single call would answer it: `201` with the created delivery,
/// `204` (body `null`) when it was there already, `409 delivery-cancelled`, `400` for an invalid
/// id or body (the others go ahead). An id given twice is created by its first item; the later
/// ones answer as a repeat would.
#[utoipa::path(
    post, path = "/api/deliveries/batch", tag = "deliveries",
    request_body = BatchRequest<DeliveryUpsert>,
    responses(
        (status = 200, description = "One result per item, in the items' order", body = BatchAnswer),
        (status = 400, description = "Invalid envelope (the field is named, e.g. `items[2].id`); each item's own refusals are among the results", body = Problem),
        (status = 401, description = "Missing or wrong service token", body = Problem),
    )
)]
async fn put_delivery_batch(
    _: ServiceCaller,
    state: web::Data<AppState>,
    batch: Batch<DeliveryUpsert>,
) -> ApiResult<HttpResponse> {
    let answers = store::create_many(&state.db, &batch.valid()).await?;
    Ok(batch.reply(answers.into_iter().map(|answer| {
        answer.map(|created| match created {
            Some(delivery) => (StatusCode::CREATED, Some(delivery)),
            None => (StatusCode::NO_CONTENT, None),
        })
    })))
}

/// Reads a delivery; `stage` is the stage of its latest tracking event.
#[utoipa::path(
    get, path = "/api/deliveries/{id}", tag = "deliveries",
    params(("id" = String, Path, description = "Delivery id")),
    responses(
        (status = 200, description = "The delivery", body = Delivery),
        (status = 401, description = "Missing or wrong service token", body = Problem),
        (status = 404, description = "No such delivery", body = Problem),
    )
)]
async fn get_delivery(
    _: ServiceCaller,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let id = valid_id("id", &id)?;
    Ok(HttpResponse::Ok().json(store::get(&state.db, id).await?))
}

/// Reschedules: changes the given fields and records a `Rescheduled` event naming them. A patch
/// that changes nothing records nothing.
#[utoipa::path(
    patch, path = "/api/deliveries/{id}", tag = "deliveries",
    params(("id" = String, Path, description = "Delivery id")),
    request_body = DeliveryPatch,
    responses(
        (status = 200, description = "The rescheduled delivery", body = Delivery),
        (status = 400, description = "Invalid body (every bad field is named)", body = Problem),
        (status = 401, description = "Missing or wrong service token", body = Problem),
        (status = 404, description = "No such delivery", body = Problem),
        (status = 409, description = "Completed or cancelled (`delivery-closed`)", body = Problem),
    )
)]
async fn patch_delivery(
    _: ServiceCaller,
    state: web::Data<AppState>,
    id: web::Path<String>,
    Json(patch): Json<DeliveryPatch>,
) -> ApiResult<HttpResponse> {
    let id = valid_id("id", &id)?;
    Ok(HttpResponse::Ok().json(state.published(store::reschedule(&state.db, id, &patch).await?)))
}

/// Cancels a delivery (records `Cancelled`). Idempotent: cancelling a cancelled delivery returns it
/// unchanged. Cancelling one that does not exist answers `404`, and no delivery can be created under
/// that id afterwards (a late creation of a compensated saga gets `409 delivery-cancelled`).
#[utoipa::path(
    delete, path = "/api/deliveries/{id}", tag = "deliveries",
    params(("id" = String, Path, description = "Delivery id")),
    responses(
        (status = 200, description = "The cancelled delivery", body = Delivery),
        (status = 401, description = "Missing or wrong service token", body = Problem),
        (status = 404, description = "No such delivery (none can be created under this id afterwards)", body = Problem),
        (status = 409, description = "Already completed (`delivery-closed`)", body = Problem),
    )
)]
async fn cancel_delivery(
    _: ServiceCaller,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let id = valid_id("id", &id)?;
    Ok(HttpResponse::Ok().json(state.published(store::cancel(&state.db, id).await?)))
}

/// The delivery's status, derived from its tracking events.
#[utoipa::path(
    get, path = "/api/deliveries/{id}/status", tag = "deliveries",
    params(("id" = String, Path, description = "Delivery id")),
    responses(
        (status = 200, description = "Stage, last known location, latest event time, event count", body = DeliveryStatus),
        (status = 401, description = "Missing or wrong service token", body = Problem),
        (status = 404, description = "No such delivery", body = Problem),
    )
)]
async fn get_status(
    _: ServiceCaller,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let id = valid_id("id", &id)?;
    Ok(HttpResponse::Ok().json(store::status(&state.db, id).await?))
}

/// The delivery's tracking history, oldest first.
#[utoipa::path(
    get, path = "/api/deliveries/{id}/events", tag = "deliveries",
    params(("id" = String, Path, description = "Delivery id")),
    responses(
        (status = 200, description = "Every event, by sequence", body = Vec<TrackingEvent>),
        (status = 401, description = "Missing or wrong service token", body = Problem),
        (status = 404, description = "No such delivery", body = Problem),
    )
)]
async fn get_events(
    _: ServiceCaller,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let id = valid_id("id", &id)?;
    Ok(HttpResponse::Ok().json(store::events(&state.db, id).await?))
}

/// Records the drone's progress (`HeadedToPickup` or `HeadedToDropoff`, with its position).
#[utoipa::path(
    post, path = "/api/deliveries/{id}/events", tag = "deliveries",
    params(("id" = String, Path, description = "Delivery id")),
    request_body = TrackingUpdate,
    responses(
        (status = 201, description = "The recorded event", body = TrackingEvent),
        (status = 400, description = "Invalid body (every bad field is named)", body = Problem),
        (status = 401, description = "Missing or wrong service token", body = Problem),
        (status = 404, description = "No such delivery", body = Problem),
        (status = 409, description = "Completed or cancelled (`delivery-closed`)", body = Problem),
    )
)]
async fn post_event(
    _: ServiceCaller,
    state: web::Data<AppState>,
    id: web::Path<String>,
    Json(update): Json<TrackingUpdate>,
) -> ApiResult<HttpResponse> {
    let id = valid_id("id", &id)?;
    Ok(HttpResponse::Created().json(state.published(store::track(&state.db, id, &update).await?)))
}

/// Records the hand-over: the delivery is `Completed`.
#[utoipa::path(
    post, path = "/api/deliveries/{id}/confirmations", tag = "deliveries",
    params(("id" = String, Path, description = "Delivery id")),
    request_body = Confirmation,
    responses(
        (status = 201, description = "The `Completed` event", body = TrackingEvent),
        (status = 400, description = "Invalid body (every bad field is named)", body = Problem),
        (status = 401, description = "Missing or wrong service token", body = Problem),
        (status = 404, description = "No such delivery", body = Problem),
        (status = 409, description = "Already completed (`already-completed`) or cancelled (`delivery-closed`)", body = Problem),
    )
)]
async fn post_confirmation(
    _: ServiceCaller,
    state: web::Data<AppState>,
    id: web::Path<String>,
    Json(confirmation): Json<Confirmation>,
) -> ApiResult<HttpResponse> {
    let id = valid_id("id", &id)?;
    Ok(HttpResponse::Created()
        .json(state.published(store::complete(&state.db, id, &confirmation).await?)))
}
