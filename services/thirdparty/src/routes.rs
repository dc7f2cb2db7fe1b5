//! HTTP routes of the ThirdParty service. Every route requires the service token.

use actix_web::{web, HttpResponse};
use contracts::{Carrier, LegRequest, LegStatus, PackageSize, Problem, ThirdPartyLeg};
use service_kit::auth::ServiceCaller;
use service_kit::openapi::BearerSchemes;
use service_kit::{valid_id, ApiError, ApiResult, Json};
use utoipa::OpenApi;

use crate::store::{self, Booking, StoreError};
use crate::AppState;

pub(crate) fn configure(cfg: &mut web::ServiceConfig, state: web::Data<AppState>) {
    cfg.app_data(state)
        .route("/api/thirdparty/{deliveryId}", web::get().to(get_leg))
        .route("/api/thirdparty/{deliveryId}", web::put().to(put_leg))
        .route("/api/thirdparty/{deliveryId}", web::delete().to(delete_leg))
        .route("/api/carriers", web::get().to(get_carriers));
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "ThirdParty service",
        description = "Legs booked with contracted carriers when the drones cannot do a delivery alone."
    ),
    paths(put_leg, get_leg, delete_leg, get_carriers),
    components(schemas(LegRequest, ThirdPartyLeg, LegStatus, PackageSize, Carrier, Problem)),
    modifiers(&BearerSchemes),
    security(("serviceToken" = []))
)]
struct ApiDoc;

pub(crate) fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

const NO_ROUTE: &str = "no-carrier-serves-route";

/// The one place store errors become HTTP answers.
impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        let code = match err {
            StoreError::NotFound(id) => return ApiError::not_found("leg", id),
            StoreError::Db(e) => return e.into(),
            StoreError::Unexpected(_) => return ApiError::Internal(err.into()),
            // Permanent: with why and the fields that stand in the way.
            StoreError::NoRoute(refusal) => {
                return ApiError::refused(
                    NO_ROUTE,
                    "No carrier serves this route",
                    refusal.detail,
                    refusal.fields,
                )
            }
            StoreError::NoCapacity {
                retry_after_secs, ..
            } => {
                return ApiError::unavailable(
                    "no-carrier-available",
                    err.to_string(),
                    retry_after_secs,
                )
            }
            StoreError::CancelledBeforeBooked(_) | StoreError::Cancelled(_) => "leg-cancelled",
            StoreError::DifferentContent(_) => "leg-conflict",
        };
        ApiError::conflict(code, err.to_string())
    }
}

/// Books a carrier leg for the delivery (`201`), or finds the one booked for the same request
/// (`200`, same leg and carrier, whatever capacity is left now). Idempotent.
#[utoipa::path(
    put, path = "/api/thirdparty/{deliveryId}", tag = "legs",
    params(("deliveryId" = String, Path, description = "Delivery id (assigned by the caller)")),
    request_body = LegRequest,
    responses(
        (status = 201, description = "Booked", body = ThirdPartyLeg),
        (status = 200, description = "Already booked for the same request: the same leg", body = ThirdPartyLeg),
        (status = 400, description = "Invalid body (every bad field is named)", body = Problem),
        (status = 401, description = "Missing or wrong service token", body = Problem),
        (status = 409, description = "Booked with different content (`leg-conflict`), or cancelled, also before it was booked (`leg-cancelled`)", body = Problem),
        (status = 422, description = "No contracted carrier serves the route and weight (`no-carrier-serves-route`, permanent; the detail says why)", body = Problem),
        (status = 503, description = "Every carrier serving the route is fully booked that day: retry after `Retry-After` (`no-carrier-available`)", body = Problem),
    )
)]
async fn put_leg(
    _: ServiceCaller,
    state: web::Data<AppState>,
    id: web::Path<String>,
    Json(body): Json<LegRequest>,
) -> ApiResult<HttpResponse> {
    let id = valid_id("deliveryId", &id)?;
    let count = |outcome: &str| state.outcomes.with_label_values(&[outcome]).inc();
    match store::book(&state.db, &state.legs, id, &body).await {
        Ok(Booking::Created(leg)) => {
            count("booked");
            Ok(HttpResponse::Created().json(leg))
        }
        Ok(Booking::Replayed(leg)) => {
            count("replayed");
            Ok(HttpResponse::Ok().json(leg))
        }
        Err(StoreError::NoRoute(refusal)) => {
            count("no_route");
            tracing::info!(delivery_id = id, detail = %refusal.detail, "no carrier serves the route");
            Err(StoreError::NoRoute(refusal).into())
        }
        Err(e @ StoreError::NoCapacity { .. }) => {
            count("no_capacity");
            Err(e.into())
        }
        Err(
            e @ (StoreError::Cancelled(_)
            | StoreError::CancelledBeforeBooked(_)
            | StoreError::DifferentContent(_)),
        ) => {
            count("refused");
            Err(e.into())
        }
        Err(e) => Err(e.into()),
    }
}

/// Reads a delivery's leg.
#[utoipa::path(
    get, path = "/api/thirdparty/{deliveryId}", tag = "legs",
    params(("deliveryId" = String, Path, description = "Delivery id")),
    responses(
        (status = 200, description = "The leg", body = ThirdPartyLeg),
        (status = 400, description = "Invalid id", body = Problem),
        (status = 401, description = "Missing or wrong service token", body = Problem),
        (status = 404, description = "No leg for this delivery", body = Problem),
    )
)]
async fn get_leg(
    _: ServiceCaller,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let id = valid_id("deliveryId", &id)?;
    Ok(HttpResponse::Ok().json(store::get(&state.db, id).await?))
}

/// Cancels the leg (compensation) and gives the carrier's slot back. Idempotent: cancelling a
/// cancelled leg returns it unchanged.
#[utoipa::path(
    delete, path = "/api/thirdparty/{deliveryId}", tag = "legs",
    params(("deliveryId" = String, Path, description = "Delivery id")),
    responses(
        (status = 200, description = "Cancelled (now or before)", body = ThirdPartyLeg),
        (status = 400, description = "Invalid id", body = Problem),
        (status = 401, description = "Missing or wrong service token", body = Problem),
        (status = 404, description = "No leg for this delivery (none can be booked for it afterwards)", body = Problem),
    )
)]
async fn delete_leg(
    _: ServiceCaller,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let id = valid_id("deliveryId", &id)?;
    let (leg, cancelled_now) = store::cancel(&state.db, id).await?;
    if cancelled_now {
        state.outcomes.with_label_values(&["cancelled"]).inc();
    }
    Ok(HttpResponse::Ok().json(leg))
}

/// The contracted carriers: their service areas, daily capacities, weights and speeds.
#[utoipa::path(
    get, path = "/api/carriers", tag = "carriers",
    responses(
        (status = 200, description = "The active carriers, by id", body = Vec<Carrier>),
        (status = 401, description = "Missing or wrong service token", body = Problem),
    )
)]
async fn get_carriers(_: ServiceCaller, state: web::Data<AppState>) -> ApiResult<HttpResponse> {
    Ok(HttpResponse::Ok().json(store::carriers(&state.db).await?))
}
