//! HTTP routes of the Account service. Every route requires the service token.

use actix_web::{web, HttpResponse};
use contracts::{Account, AccountStatus, AccountUpsert, Problem, TokenRequest, TokenResponse};
use service_kit::auth::ServiceCaller;
use service_kit::openapi::BearerSchemes;
use service_kit::{is_absent, parse_json, valid_id, ApiError, ApiResult, Json};
use utoipa::OpenApi;

use crate::store::{self, Saved, StoreError};
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

/// The one place store errors become HTTP answers.
impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::NotFound(id) => ApiError::not_found("account", id),
            StoreError::Db(e) => e.into(),
            StoreError::Unexpected(_) => ApiError::Internal(err.into()),
        }
    }
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
    Ok(HttpResponse::Ok().json(store::get_cached(&state.db, &state.cache, id).await?))
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
    let saved = store::upsert(&state.db, &state.cache, id, &body).await?;
    if saved.changed() {
        state.wake.notify_one();
    }
    Ok(match saved {
        Saved::Created(account) => HttpResponse::Created().json(account),
        Saved::Updated(account) | Saved::Unchanged(account) => HttpResponse::Ok().json(account),
    })
}

/// Mints a client token (JWT, subject = account id) for an active account.
#[utoipa::path(
    post, path = "/api/accounts/{id}/tokens", tag = "accounts",
    params(("id" = String, Path, description = "Account id")),
    request_body(content = Option<TokenRequest>, description = "optional: an empty or `null` body asks for a default token"),
    responses(
        (status = 201, description = "Minted", body = TokenResponse),
        (status = 400, description = "Invalid body", body = Problem),
        (status = 404, description = "No such account", body = Problem),
        (status = 409, description = "The account is suspended", body = Problem),
        (status = 422, description = "ttlSeconds is over the service's maximum token lifetime", body = Problem),
    )
)]
async fn mint_token(
    _: ServiceCaller,
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: web::Bytes,
) -> ApiResult<HttpResponse> {
    let id = valid_id("id", &id)?;
    // The body is optional: an empty one (or `null`) asks for a default token.
    let request: TokenRequest = if is_absent(&body) {
        TokenRequest::default()
    } else {
        parse_json(&body)?
    };
    let settings = &state.token_settings;
    let ttl = request.ttl_seconds.unwrap_or(settings.default_ttl_secs);
    if ttl > settings.max_ttl_secs {
        return Err(ApiError::rule(
            "ttlSeconds",
            format!("must be at most {}", settings.max_ttl_secs),
        ));
    }
    let account = store::get(&state.db, id).await?;
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
