//! HTTP routes of the Account service. Every route requires the service token.

use actix_web::{web, HttpResponse};
use contracts::{Account, AccountStatus, AccountUpsert, Problem, TokenRequest, TokenResponse};
use sea_orm::sea_query::OnConflict;
use sea_orm::{ActiveModelTrait, ActiveValue::Set, EntityTrait};
use service_kit::auth::ServiceCaller;
use service_kit::openapi::BearerSchemes;
use service_kit::{parse_json, valid_id, ApiError, ApiResult, Json};
use utoipa::OpenApi;

use crate::entity;
use crate::AppState;

pub(crate) fn configure(cfg: &mut web::ServiceConfig, state: web::Data<AppState>) {
    cfg.app_data(state)
        .route("/api/accounts/{id}", web::get().to(get_account))
        .route("/api/accounts/{id}", web::put().to(put_account))
        .route("/api/accounts/{id}/tokens", web::post().to(mint_token));
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Account service", description = "Client accounts and client tokens."),
    paths(get_account, put_account, mint_token),
    components(schemas(Account, AccountUpsert, AccountStatus, TokenRequest, TokenResponse, Problem)),
    modifiers(&BearerSchemes),
    security(("serviceToken" = []))
)]
struct ApiDoc;

pub(crate) fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

fn to_wire(m: entity::Model) -> ApiResult<Account> {
    let status = AccountStatus::parse(&m.status).ok_or_else(|| {
        ApiError::Internal(anyhow::anyhow!(
            "account {} has unknown status {}",
            m.id,
            m.status
        ))
    })?;
    Ok(Account {
        id: m.id,
        name: m.name,
        status,
        created_at: m.created_at,
        updated_at: m.updated_at,
    })
}

async fn find(state: &AppState, id: &str) -> ApiResult<entity::Model> {
    entity::Entity::find_by_id(id.to_owned())
        .one(&state.db)
        .await?
        .ok_or_else(|| ApiError::not_found("account", id))
}

/// Reads an account.
#[utoipa::path(
    get, path = "/api/accounts/{id}", tag = "accounts",
    params(("id" = String, Path, description = "Account id")),
    responses(
        (status = 200, description = "The account", body = Account),
        (status = 401, description = "Missing or wrong service token", body = Problem),
        (status = 404, description = "No such account", body = Problem),
    )
)]
async fn get_account(
    _: ServiceCaller,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let id = valid_id("id", &id)?;
    if let Some(cached) = state.cache.get(id) {
        return Ok(HttpResponse::Ok().json(to_wire(cached)?));
    }
    let account = find(&state, id).await?;
    state.cache.put(&account);
    Ok(HttpResponse::Ok().json(to_wire(account)?))
}

/// Creates an account (`201`) or updates its name and status (`200`). Idempotent.
#[utoipa::path(
    put, path = "/api/accounts/{id}", tag = "accounts",
    params(("id" = String, Path, description = "Account id")),
    request_body = AccountUpsert,
    responses(
        (status = 201, description = "Created", body = Account),
        (status = 200, description = "Already there; updated if the body differs", body = Account),
        (status = 400, description = "Invalid body (every bad field is named)", body = Problem),
        (status = 401, description = "Missing or wrong service token", body = Problem),
    )
)]
async fn put_account(
    _: ServiceCaller,
    state: web::Data<AppState>,
    id: web::Path<String>,
    Json(body): Json<AccountUpsert>,
) -> ApiResult<HttpResponse> {
    let id = valid_id("id", &id)?;
    let now = service_kit::now();
    state.cache.forget(id);
    // Insert-if-absent decides the one creator among concurrent PUTs of the same id.
    let inserted = entity::Entity::insert(entity::ActiveModel {
        id: Set(id.to_owned()),
        name: Set(body.name.clone()),
        status: Set(body.status.as_str().to_owned()),
        created_at: Set(now),
        updated_at: Set(now),
    })
    .on_conflict(
        OnConflict::column(entity::Column::Id)
            .do_nothing()
            .to_owned(),
    )
    .exec_without_returning(&state.db)
    .await?;
    let current = find(&state, id).await?;
    if inserted == 1 {
        tracing::info!(account_id = id, "account created");
        return Ok(HttpResponse::Created().json(to_wire(current)?));
    }
    if current.name == body.name && current.status == body.status.as_str() {
        return Ok(HttpResponse::Ok().json(to_wire(current)?));
    }
    let mut active: entity::ActiveModel = current.into();
    active.name = Set(body.name);
    active.status = Set(body.status.as_str().to_owned());
    active.updated_at = Set(now);
    let updated = active.update(&state.db).await?;
    state.cache.forget(id);
    tracing::info!(account_id = id, status = %updated.status, "account updated");
    Ok(HttpResponse::Ok().json(to_wire(updated)?))
}

/// Mints a client token (JWT, subject = account id) for an active account.
#[utoipa::path(
    post, path = "/api/accounts/{id}/tokens", tag = "accounts",
    params(("id" = String, Path, description = "Account id")),
    request_body = TokenRequest,
    responses(
        (status = 201, description = "Minted", body = TokenResponse),
        (status = 400, description = "Invalid body", body = Problem),
        (status = 404, description = "No such account", body = Problem),
        (status = 409, description = "The account is suspended", body = Problem),
    )
)]
async fn mint_token(
    _: ServiceCaller,
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: web::Bytes,
) -> ApiResult<HttpResponse> {
    let id = valid_id("id", &id)?;
    // The body is optional: an empty one asks for a default token.
    let request: TokenRequest = if body.iter().all(u8::is_ascii_whitespace) {
        TokenRequest::default()
    } else {
        parse_json(&body)?
    };
    let settings = &state.token_settings;
    let ttl = request.ttl_seconds.unwrap_or(settings.default_ttl_secs);
    if ttl > settings.max_ttl_secs {
        return Err(ApiError::field(
            "ttlSeconds",
            format!("must be at most {}", settings.max_ttl_secs),
        ));
    }
    let account = to_wire(find(&state, id).await?)?;
    if account.status != AccountStatus::Active {
        return Err(ApiError::conflict(
            "account-suspended",
            format!("account '{id}' is suspended and cannot get tokens"),
        ));
    }
    let ttl = chrono::Duration::seconds(i64::try_from(ttl).unwrap_or(i64::MAX));
    let (token, expires_at) = state.tokens.mint(id, &request.scopes, ttl)?;
    tracing::info!(account_id = id, scopes = ?request.scopes, "client token minted");
    Ok(HttpResponse::Created().json(TokenResponse {
        account_id: account.id,
        token,
        token_type: "Bearer".into(),
        expires_at,
        scopes: request.scopes,
    }))
}
