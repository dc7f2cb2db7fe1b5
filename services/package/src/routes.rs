//! HTTP routes of the Package service. Every route requires the service token.

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use contracts::{
    BatchAnswer, BatchItem, BatchRequest, BatchResult, Package, PackagePatch, PackageSize,
    PackageStatus, PackageSummary, PackageUpsert, Problem, SizeCounts,
};
use service_kit::auth::ServiceCaller;
use service_kit::openapi::BearerSchemes;
use service_kit::{valid_id, ApiError, ApiResult, Batch, Json};
use utoipa::OpenApi;

use crate::store::{self, Registration, StoreError};
use crate::AppState;

pub(crate) fn configure(cfg: &mut web::ServiceConfig, state: web::Data<AppState>) {
    cfg.app_data(state)
        .route("/api/packages/summary/{ownerId}", web::get().to(summary))
        // Only POST: GET and PUT of `/api/packages/batch` still mean the package "batch".
        .route("/api/packages/batch", web::post().to(post_batch))
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
    paths(get_package, put_package, post_batch, patch_package, delete_package, summary),
    components(schemas(
        Package,
        PackageUpsert,
        BatchRequest<PackageUpsert>,
        BatchItem<PackageUpsert>,
        BatchAnswer,
        BatchResult,
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
    let (status, package) = registered(store::register(&state.db, id, &body).await?);
    Ok(HttpResponse::build(status).json(package))
}

/// The status and body a registration answers.
fn registered(registration: Registration) -> (StatusCode, Package) {
    match registration {
        Registration::Created(package) => (StatusCode::CREATED, package),
        Registration::Replayed(package) => (StatusCode::OK, package),
    }
}

/// Registers many packages at once: each item is answered exactly as `PUT /api/packages/{id}`
/// with its body would answer it (`201`, `200`, `400`, `409`), in order; the same id twice is
/// answered as two PUTs one after the other. One refused item never fails the others.
#[utoipa::path(
    post, path = "/api/packages/batch", tag = "packages",
    request_body = BatchRequest<PackageUpsert>,
    responses(
        (status = 200, description = "One result per item, in order, each with the status and body (the package, or a problem with its `code`) that `PUT /api/packages/{id}` would have answered", body = BatchAnswer),
        (status = 400, description = "Malformed envelope: not `{items: [...]}` with 1 to 64 items, each with a string `id` and a `body` (the field is named)", body = Problem),
        (status = 401, description = "Missing or wrong service token", body = Problem),
    )
)]
async fn post_batch(
    _: ServiceCaller,
    state: web::Data<AppState>,
    batch: Batch<PackageUpsert>,
) -> ApiResult<HttpResponse> {
    let answers = store::register_batch(&state.db, &batch.valid()).await?;
    Ok(batch.reply(answers.into_iter().map(|answer| {
        answer
            .map(|r| {
                let (status, package) = registered(r);
                (status, Some(package))
            })
            .map_err(ApiError::from)
    })))
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
