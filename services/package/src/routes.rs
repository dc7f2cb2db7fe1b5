//! HTTP routes of the Package service. Every route requires the service token.

use actix_web::{web, HttpResponse};
use contracts::{
    Package, PackagePatch, PackageSize, PackageStatus, PackageSummary, PackageUpsert, Problem,
    SizeCounts,
};
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QuerySelect,
};
use service_kit::auth::ServiceCaller;
use service_kit::openapi::BearerSchemes;
use service_kit::{valid_id, ApiError, ApiResult, Json};
use utoipa::OpenApi;

use crate::entity::{self, Column};
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

fn to_wire(m: entity::Model) -> ApiResult<Package> {
    let size = PackageSize::parse(&m.size).ok_or_else(|| {
        ApiError::Internal(anyhow::anyhow!(
            "package {} has unknown size {}",
            m.id,
            m.size
        ))
    })?;
    let status = PackageStatus::parse(&m.status).ok_or_else(|| {
        ApiError::Internal(anyhow::anyhow!(
            "package {} has unknown status {}",
            m.id,
            m.status
        ))
    })?;
    Ok(Package {
        id: m.id,
        owner_id: m.owner_id,
        external_id: m.external_id,
        size,
        weight: m.weight,
        tag: m.tag,
        status,
        created_at: m.created_at,
        updated_at: m.updated_at,
    })
}

/// True when a stored package has exactly the content a PUT asks for (status aside).
fn same_content(m: &entity::Model, body: &PackageUpsert) -> bool {
    m.owner_id == body.owner_id
        && m.external_id == body.external_id
        && m.size == body.size.as_str()
        && m.weight == body.weight
        && m.tag == body.tag
}

async fn find(db: &impl ConnectionTrait, id: &str) -> ApiResult<entity::Model> {
    entity::Entity::find_by_id(id.to_owned())
        .one(db)
        .await?
        .filter(|p| !is_tombstone(p))
        .ok_or_else(|| ApiError::not_found("package", id))
}

/// A tombstone: what cancelling a package that does not exist (yet) leaves behind, so that a
/// registration still on its way (a timed-out attempt of a saga that was since compensated)
/// cannot create it afterwards. It has no owner and is never shown: reads of it answer `404`.
fn is_tombstone(p: &entity::Model) -> bool {
    p.owner_id.is_empty()
}

fn cancelled_before_registered(id: &str) -> ApiError {
    ApiError::conflict(
        "package-cancelled",
        format!(
            "package '{id}' was cancelled before it was registered; it cannot be registered now"
        ),
    )
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
    Ok(HttpResponse::Ok().json(to_wire(find(&state.db, id).await?)?))
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
    let now = service_kit::now();
    // Insert-if-absent decides the one creator among concurrent PUTs of the same id. A new
    // package is one statement (`RETURNING` gives back the row); only a replay reads it.
    let inserted = entity::Entity::insert(entity::ActiveModel {
        id: Set(id.to_owned()),
        owner_id: Set(body.owner_id.clone()),
        external_id: Set(body.external_id.clone()),
        size: Set(body.size.as_str().to_owned()),
        weight: Set(body.weight),
        tag: Set(body.tag.clone()),
        status: Set(PackageStatus::Registered.as_str().to_owned()),
        created_at: Set(now),
        updated_at: Set(now),
    })
    .on_conflict(OnConflict::column(Column::Id).do_nothing().to_owned())
    .exec_with_returning(&state.db)
    .await;
    let current = match inserted {
        Ok(created) => {
            tracing::debug!(package_id = id, owner_id = %created.owner_id, "package registered");
            return Ok(HttpResponse::Created().json(to_wire(created)?));
        }
        // Nothing inserted: the id is taken (PostgreSQL reports no returned row, SQLite no
        // inserted row).
        Err(sea_orm::DbErr::RecordNotFound(_) | sea_orm::DbErr::RecordNotInserted) => {
            match entity::Entity::find_by_id(id.to_owned())
                .one(&state.db)
                .await?
            {
                Some(p) if is_tombstone(&p) => return Err(cancelled_before_registered(id)),
                Some(p) => p,
                None => return Err(ApiError::not_found("package", id)),
            }
        }
        Err(e) => return Err(e.into()),
    };
    // A replay returns what is there as is: it neither resurrects a cancelled package nor fails.
    if same_content(&current, &body) {
        return Ok(HttpResponse::Ok().json(to_wire(current)?));
    }
    Err(ApiError::conflict(
        "package-conflict",
        format!("package '{id}' already exists with different content; use PATCH to change it"),
    ))
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
    let mut update = entity::Entity::update_many()
        .col_expr(Column::UpdatedAt, Expr::value(service_kit::now()))
        .filter(Column::Id.eq(id))
        .filter(Column::Status.eq(PackageStatus::Registered.as_str()));
    if let Some(size) = patch.size {
        update = update.col_expr(Column::Size, Expr::value(size.as_str()));
    }
    if let Some(weight) = patch.weight {
        update = update.col_expr(Column::Weight, Expr::value(weight));
    }
    if let Some(tag) = &patch.tag {
        update = update.col_expr(Column::Tag, Expr::value(tag.as_str()));
    }
    // The status condition makes check and write one statement, so a concurrent cancel wins
    // cleanly instead of being followed by an edit.
    let changed = update.exec(&state.db).await?.rows_affected;
    let current = find(&state.db, id).await?;
    if changed == 0 {
        return Err(ApiError::conflict(
            "package-cancelled",
            format!("package '{id}' is cancelled and cannot be changed"),
        ));
    }
    tracing::info!(package_id = id, "package updated");
    Ok(HttpResponse::Ok().json(to_wire(current)?))
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
    let mut changed = cancel_registered(&state.db, id).await?;
    if changed == 0
        && entity::Entity::find_by_id(id.to_owned())
            .one(&state.db)
            .await?
            .is_none()
    {
        let now = service_kit::now();
        entity::Entity::insert(entity::ActiveModel {
            id: Set(id.to_owned()),
            owner_id: Set(String::new()),
            external_id: Set(String::new()),
            size: Set(PackageSize::Small.as_str().to_owned()),
            weight: Set(0.0),
            tag: Set(None),
            status: Set(PackageStatus::Cancelled.as_str().to_owned()),
            created_at: Set(now),
            updated_at: Set(now),
        })
        .on_conflict(OnConflict::column(Column::Id).do_nothing().to_owned())
        .exec_without_returning(&state.db)
        .await?;
        tracing::info!(
            package_id = id,
            "cancel of an unknown package: tombstone kept"
        );
        // A package registered between the two statements is cancelled like any other.
        changed = cancel_registered(&state.db, id).await?;
    }
    let current = find(&state.db, id).await?;
    if changed > 0 {
        tracing::info!(package_id = id, "package cancelled");
    }
    Ok(HttpResponse::Ok().json(to_wire(current)?))
}

/// Cancels the package if it is registered (one statement, so a concurrent change wins cleanly);
/// how many rows changed.
async fn cancel_registered(db: &impl ConnectionTrait, id: &str) -> Result<u64, sea_orm::DbErr> {
    Ok(entity::Entity::update_many()
        .col_expr(
            Column::Status,
            Expr::value(PackageStatus::Cancelled.as_str()),
        )
        .col_expr(Column::UpdatedAt, Expr::value(service_kit::now()))
        .filter(Column::Id.eq(id))
        .filter(Column::Status.eq(PackageStatus::Registered.as_str()))
        .exec(db)
        .await?
        .rows_affected)
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
    // One grouped query, so every number comes from the same snapshot.
    let groups: Vec<(String, String, i64, Option<f64>)> = entity::Entity::find()
        .select_only()
        .column(Column::Status)
        .column(Column::Size)
        .column_as(Expr::col(Column::Id).count(), "packages")
        .column_as(Expr::col(Column::Weight).sum(), "weight")
        .filter(Column::OwnerId.eq(owner_id))
        .group_by(Column::Status)
        .group_by(Column::Size)
        .into_tuple()
        .all(&state.db)
        .await?;
    let mut out = PackageSummary {
        owner_id: owner_id.to_owned(),
        ..PackageSummary::default()
    };
    for (status, size, count, weight) in groups {
        let count = u64::try_from(count).unwrap_or(0);
        out.total += count;
        match PackageStatus::parse(&status) {
            Some(PackageStatus::Registered) => {
                out.registered += count;
                out.registered_weight += weight.unwrap_or(0.0);
                match PackageSize::parse(&size) {
                    Some(PackageSize::Small) => out.by_size.small += count,
                    Some(PackageSize::Medium) => out.by_size.medium += count,
                    Some(PackageSize::Large) => out.by_size.large += count,
                    None => {
                        return Err(ApiError::Internal(anyhow::anyhow!(
                            "owner {owner_id} has packages of unknown size {size}"
                        )))
                    }
                }
            }
            Some(PackageStatus::Cancelled) => out.cancelled += count,
            None => {
                return Err(ApiError::Internal(anyhow::anyhow!(
                    "owner {owner_id} has packages of unknown status {status}"
                )))
            }
        }
    }
    Ok(HttpResponse::Ok().json(out))
}
