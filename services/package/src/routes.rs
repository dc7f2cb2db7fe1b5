//! HTTP routes of the Package service. Every route requires the service token.

use actix_web::{web, HttpResponse};
use contracts::{
    Package, PackagePatch, PackageSize, PackageStatus, PackageSummary, PackageUpsert, Problem,
    SizeCounts,
};
use service_kit::auth::ServiceCaller;
use service_kit::openapi::BearerSchemes;
use service_kit::{valid_id, ApiError, ApiResult, Json};
use utoipa::OpenApi;

use crate::store::{self, Registration, StoreError};
use crate::AppState;

pub(crate) fn configure(cfg: &mut web::ServiceConfig, state: web::Data<AppState>) {
    cfg.app_data(state)
        .route("/api/packages/summary/{ownerId}", web::get().to(summary))
        .route("/api/packages/{id}", web::get().to(get_package))
        .route("/api/packages/{id}", web::put().to(put_package))
        .route("/api/packages/{id}", web::patch().to(patch_package))
        .route("/api/packages/{id}", web::delete().to(delete_package));
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Package service",
        description = "Packages registered for deliveries, and per-owner summaries."
    ),
    paths(get_package, put_package, patch_package, delete_package, summary),
    components(schemas(
        Package,
        PackageUpsert,
        PackagePatch,
        PackageSize,
        PackageStatus,
        PackageSummary,
        SizeCounts,
        Problem
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
        let code = match err {
            StoreError::NotFound(id) => return ApiError::not_found("package", id),
            StoreError::Db(e) => return e.into(),
            StoreError::Unexpected(_) => return ApiError::Internal(err.into()),
            StoreError::CancelledBeforeRegistered(_) | StoreError::Cancelled(_) => {
                "package-cancelled"
            }
            StoreError::DifferentContent(_) => "package-conflict",
        };
        ApiError::conflict(code, err.to_string())
    }
}

/// Reads a package.
#[utoipa::path(
    get, path = "/api/packages/{id}", tag = "packages",
    params(("id" = String, Path, description = "Package id")),
    responses(
        (status = 200, description = "The package", body = Package),
        (status = 400, description = "Invalid id", body = Problem),
        (status = 401, description = "Missing or wrong service token", body = Problem),
        (status = 404, description = "No such package", body = Problem),
    )
)]
async fn get_package(
    _: ServiceCaller,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let id = valid_id("id", &id)?;
    Ok(HttpResponse::Ok().json(store::get(&state.db, id).await?))
}

/// Registers a package (`201`), or finds the same one already there (`200`, same body, even when
/// it has since been cancelled). Idempotent; different content for an existing id is a `409`.
#[utoipa::path(
    put, path = "/api/packages/{id}", tag = "packages",
    params(("id" = String, Path, description = "Package id (assigned by the caller)")),
    request_body = PackageUpsert,
    responses(
        (status = 201, description = "Registered", body = Package),
        (status = 200, description = "Already there with the same content", body = Package),
        (status = 400, description = "Invalid body (every bad field is named)", body = Problem),
        (status = 401, description = "Missing or wrong service token", body = Problem),
        (status = 409, description = "Already there with different content (`package-conflict`), or cancelled before it was registered (`package-cancelled`)", body = Problem),
    )
)]
async fn put_package(
    _: ServiceCaller,
    state: web::Data<AppState>,
    id: web::Path<String>,
    Json(body): Json<PackageUpsert>,
) -> ApiResult<HttpResponse> {
    let id = valid_id("id", &id)?;
    Ok(match store::register(&state.db, id, &body).await? {
        Registration::Created(package) => HttpResponse::Created().json(package),
        Registration::Replayed(package) => HttpResponse::Ok().json(package),
    })
}

/// Changes the size, weight or tag of a registered package.
#[utoipa::path(
    patch, path = "/api/packages/{id}", tag = "packages",
    params(("id" = String, Path, description = "Package id")),
    request_body = PackagePatch,
    responses(
        (status = 200, description = "Updated", body = Package),
        (status = 400, description = "Invalid or empty body (every bad field is named)", body = Problem),
        (status = 401, description = "Missing or wrong service token", body = Problem),
        (status = 404, description = "No such package", body = Problem),
        (status = 409, description = "The package is cancelled (`package-cancelled`)", body = Problem),
    )
)]
async fn patch_package(
    _: ServiceCaller,
    state: web::Data<AppState>,
    id: web::Path<String>,
    Json(patch): Json<PackagePatch>,
) -> ApiResult<HttpResponse> {
    let id = valid_id("id", &id)?;
    Ok(HttpResponse::Ok().json(store::update(&state.db, id, &patch).await?))
}

/// Cancels a package. Idempotent: cancelling a cancelled package returns it unchanged.
#[utoipa::path(
    delete, path = "/api/packages/{id}", tag = "packages",
    params(("id" = String, Path, description = "Package id")),
    responses(
        (status = 200, description = "Cancelled (now or before)", body = Package),
        (status = 400, description = "Invalid id", body = Problem),
        (status = 401, description = "Missing or wrong service token", body = Problem),
        (status = 404, description = "No such package (none can be registered under this id afterwards)", body = Problem),
    )
)]
async fn delete_package(
    _: ServiceCaller,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let id = valid_id("id", &id)?;
    Ok(HttpResponse::Ok().json(store::cancel(&state.db, id).await?))
}

/// Counts and weighs one owner's packages. An owner without packages gets zeros.
#[utoipa::path(
    get, path = "/api/packages/summary/{ownerId}", tag = "packages",
    params(("ownerId" = String, Path, description = "Owner (account) id")),
    responses(
        (status = 200, description = "The owner's package summary", body = PackageSummary),
        (status = 400, description = "Invalid owner id", body = Problem),
        (status = 401, description = "Missing or wrong service token", body = Problem),
    )
)]
async fn summary(
    _: ServiceCaller,
    state: web::Data<AppState>,
    owner_id: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let owner_id = valid_id("ownerId", &owner_id)?;
    Ok(HttpResponse::Ok().json(store::summary(&state.db, owner_id).await?))
}
