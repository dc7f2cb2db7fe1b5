//! The webhook API of a client account (the token's subject): its endpoints and secret, its
//! delivery log, and redelivery. An account sees and acts on its own deliveries only.

use std::collections::HashSet;
use std::sync::Arc;

use actix_web::{web, HttpRequest, HttpResponse};
use contracts::validation::{FieldError, FromJsonObject, Object};
use contracts::{
    DeliveryStage, Problem, RequestState, TimeWindow, WebhookDelivery, WebhookDeliveryPage,
    WebhookDeliveryStatus, WebhookEvent, WebhookEventData, WebhookEventType, WebhookRegistration,
    WebhookSubscription,
};
use serde::Deserialize;
use serde_json::Value;
use service_kit::{ApiError, ApiResult, Json};
use utoipa::{IntoParams, OpenApi};
use uuid::Uuid;

use super::store::{Cursor, RedeliverError};
use super::Webhooks;
use crate::routes::AppState;

/// Deliveries per page unless `limit` says otherwise, and the most it may say.
const DEFAULT_LIMIT: u64 = 50;
const MAX_LIMIT: u64 = 100;

pub(crate) fn configure(cfg: &mut web::ServiceConfig, hooks: Arc<Webhooks>) {
    cfg.app_data(web::Data::from(hooks))
        .route("/api/webhooks", web::get().to(show))
        .route("/api/webhooks", web::put().to(register))
        .route("/api/webhooks", web::delete().to(remove))
        .route("/api/webhooks/deliveries", web::get().to(deliveries))
        .route(
            "/api/webhooks/deliveries/{id}/redeliver",
            web::post().to(redeliver),
        );
}

#[derive(OpenApi)]
#[openapi(
    paths(show, register, remove, deliveries, redeliver),
    components(schemas(
        WebhookRegistration,
        WebhookSubscription,
        WebhookDelivery,
        WebhookDeliveryPage,
        WebhookDeliveryStatus,
        WebhookEvent,
        WebhookEventData,
        WebhookEventType,
        TimeWindow,
        DeliveryStage,
        RequestState,
        FieldError,
        Problem
    ))
)]
struct WebhooksDoc;

pub(crate) fn openapi() -> utoipa::openapi::OpenApi {
    WebhooksDoc::openapi()
}

/// A registration body as the kit's [`Json`] extractor read it (media type, size, JSON syntax),
/// before its fields are checked: shape and policy are checked together by
/// [`Webhooks::validated`], so every bad URL is named in one answer.
struct RawRegistration(Value);

impl FromJsonObject for RawRegistration {
    fn from_object(_: &mut Object) -> Result<Self, Vec<FieldError>> {
        // Never called: `from_json_value` keeps the whole value.
        Err(vec![FieldError::new("body", "is invalid")])
    }

    fn from_json_value(value: Value) -> Result<Self, Vec<FieldError>> {
        Ok(Self(value))
    }
}

impl Webhooks {
    /// The registration's URLs, or a problem naming every bad one: its shape (contracts) and the
    /// server's policy (scheme, address), checked together.
    async fn validated(&self, value: Value) -> ApiResult<Vec<String>> {
        let (urls, mut errors): (Vec<(usize, String)>, Vec<FieldError>) =
            match WebhookRegistration::from_json_value(value.clone()) {
                Ok(r) => (r.urls.into_iter().enumerate().collect(), Vec::new()),
                Err(errors) => {
                    // Well-formed URLs are still checked, so every bad one is named at once.
                    let named: HashSet<&str> = errors.iter().map(|e| e.field.as_str()).collect();
                    let urls = value
                        .get("urls")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .enumerate()
                        .filter_map(|(i, v)| Some((i, v.as_str()?.trim().to_owned())))
                        .filter(|(i, _)| !named.contains(format!("urls[{i}]").as_str()))
                        .collect();
                    (urls, errors)
                }
            };
        let checks = futures::future::join_all(urls.iter().map(|(_, u)| self.policy.check(u)));
        for ((i, _), checked) in urls.iter().zip(checks.await) {
            if let Err(reason) = checked {
                errors.push(FieldError::new(format!("urls[{i}]"), reason));
            }
        }
        if errors.is_empty() {
            Ok(urls.into_iter().map(|(_, u)| u).collect())
        } else {
            errors.sort_by_key(|e| url_index(&e.field));
            Err(ApiError::Validation(errors))
        }
    }
}

/// `urls` first, then `urls[i]` by `i`.
fn url_index(field: &str) -> Option<usize> {
    field
        .strip_prefix("urls[")
        .and_then(|rest| rest.strip_suffix(']'))
        .and_then(|i| i.parse().ok())
}

/// The account's endpoints and signing secret.
#[utoipa::path(
    get, path = "/api/webhooks", tag = "webhooks",
    responses(
        (status = 200, description = "The account's endpoints and secret", body = WebhookSubscription),
        (status = 401, description = "Missing or invalid client token", body = Problem),
        (status = 404, description = "The account has no endpoints", body = Problem),
        (status = 429, description = "Rate limit of the account; see Retry-After", body = Problem),
        (status = 503, description = "The database is unavailable; see Retry-After", body = Problem),
    )
)]
async fn show(
    req: HttpRequest,
    app: web::Data<AppState>,
    hooks: web::Data<Webhooks>,
) -> ApiResult<HttpResponse> {
    let claims = app.client(&req)?;
    let sub = hooks
        .store
        .subscription(&claims.sub)
        .await?
        .ok_or_else(|| ApiError::not_found("webhook registration of account", &claims.sub))?;
    Ok(HttpResponse::Ok().json(sub))
}

/// Registers the account's endpoints, replacing those it had. Pending deliveries to URLs left
/// out are given up.
///
/// Each change of the account's bookings is POSTed to every endpoint as a JSON
/// [`WebhookEvent`] with `Webhook-Id` (the event id, the same on every retry),
/// `Webhook-Timestamp` (unix seconds) and `Webhook-Signature: v1=<hex>`, where `<hex>` is the
/// lowercase hex of HMAC-SHA256 keyed with `secret` (its UTF-8 bytes) over
/// `"{Webhook-Timestamp}.{raw body}"`. A 2xx answer delivers it; anything else, a timeout or a
/// redirect is retried with exponential back-off for at least a day. Events of one booking
/// arrive in order.
#[utoipa::path(
    put, path = "/api/webhooks", tag = "webhooks",
    request_body = WebhookRegistration,
    responses(
        (status = 200, description = "Endpoints replaced; the secret is unchanged", body = WebhookSubscription),
        (status = 201, description = "First registration: the signing secret was created", body = WebhookSubscription),
        (status = 400, description = "Invalid body; every bad field is named (`urls`, `urls[i]`), e.g. not https, or a host that is or resolves to a loopback, private, link-local or other non-public address", body = Problem),
        (status = 401, description = "Missing or invalid client token", body = Problem),
        (status = 413, description = "The body is larger than the limit", body = Problem),
        (status = 415, description = "The body is not JSON", body = Problem),
        (status = 429, description = "Rate limit of the account; see Retry-After", body = Problem),
        (status = 503, description = "The database is unavailable; see Retry-After", body = Problem),
    )
)]
async fn register(
    req: HttpRequest,
    app: web::Data<AppState>,
    hooks: web::Data<Webhooks>,
    Json(RawRegistration(body)): Json<RawRegistration>,
) -> ApiResult<HttpResponse> {
    let claims = app.client(&req)?;
    let urls = hooks.validated(body).await?;
    let (sub, created) = hooks.store.replace(&claims.sub, &urls).await?;
    tracing::info!(
        account = claims.sub,
        endpoints = urls.len(),
        created,
        "webhooks registered"
    );
    hooks.wake.notify_one();
    Ok(if created {
        HttpResponse::Created().json(sub)
    } else {
        HttpResponse::Ok().json(sub)
    })
}

/// Removes the account's endpoints and its secret (a later registration gets a new one);
/// pending deliveries are given up. Idempotent.
#[utoipa::path(
    delete, path = "/api/webhooks", tag = "webhooks",
    responses(
        (status = 204, description = "Removed (or there was nothing to remove)"),
        (status = 401, description = "Missing or invalid client token", body = Problem),
        (status = 429, description = "Rate limit of the account; see Retry-After", body = Problem),
        (status = 503, description = "The database is unavailable; see Retry-After", body = Problem),
    )
)]
async fn remove(
    req: HttpRequest,
    app: web::Data<AppState>,
    hooks: web::Data<Webhooks>,
) -> ApiResult<HttpResponse> {
    let claims = app.client(&req)?;
    if hooks.store.remove(&claims.sub).await? {
        tracing::info!(account = claims.sub, "webhooks removed");
    }
    Ok(HttpResponse::NoContent().finish())
}

/// Paging of the delivery log.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct DeliveriesQuery {
    /// Deliveries per page (default 50).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 100)]
    limit: Option<String>,
    /// `nextCursor` of the previous page (`<createdMs>.<delivery id>`; empty = the first page).
    #[param(value_type = Option<String>, max_length = 55, pattern = r"^([0-9]{1,18}\.[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})?$")]
    cursor: Option<String>,
}

/// The account's delivery log, newest first: one entry per event and endpoint with its attempts.
#[utoipa::path(
    get, path = "/api/webhooks/deliveries", tag = "webhooks",
    params(DeliveriesQuery),
    responses(
        (status = 200, description = "A page of deliveries; `nextCursor` fetches the next (older) one", body = WebhookDeliveryPage),
        (status = 400, description = "`limit` is not 1 to 100, or `cursor` is not one this API gave", body = Problem),
        (status = 401, description = "Missing or invalid client token", body = Problem),
        (status = 429, description = "Rate limit of the account; see Retry-After", body = Problem),
        (status = 503, description = "The database is unavailable; see Retry-After", body = Problem),
    )
)]
async fn deliveries(
    req: HttpRequest,
    app: web::Data<AppState>,
    hooks: web::Data<Webhooks>,
    query: web::Query<DeliveriesQuery>,
) -> ApiResult<HttpResponse> {
    let claims = app.client(&req)?;
    let mut errors = Vec::new();
    let limit = match query.limit.as_deref().map(str::trim) {
        None => Some(DEFAULT_LIMIT),
        Some(raw) => raw
            .parse::<u64>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n)),
    };
    if limit.is_none() {
        errors.push(FieldError::new(
            "limit",
            format!("must be a whole number from 1 to {MAX_LIMIT}"),
        ));
    }
    let cursor = match query.cursor.as_deref() {
        None | Some("") => None,
        Some(raw) => {
            let parsed = Cursor::parse(raw);
            if parsed.is_none() {
                errors.push(FieldError::new(
                    "cursor",
                    "is not a nextCursor from an earlier page",
                ));
            }
            parsed
        }
    };
    let Some(limit) = limit.filter(|_| errors.is_empty()) else {
        return Err(ApiError::Validation(errors));
    };
    let page = hooks.store.page(&claims.sub, limit, cursor).await?;
    Ok(HttpResponse::Ok().json(page))
}

/// Sends a delivery again now (a new attempt; a delivered or failed one gets a fresh retry
/// period). Later events of the same booking to that endpoint wait for it, as usual.
#[utoipa::path(
    post, path = "/api/webhooks/deliveries/{id}/redeliver", tag = "webhooks",
    params(("id" = Uuid, Path, description = "The delivery's id (from the delivery log)")),
    responses(
        (status = 202, description = "Due now; the delivery as it stands", body = WebhookDelivery),
        (status = 400, description = "`id` is not a UUID", body = Problem),
        (status = 401, description = "Missing or invalid client token", body = Problem),
        (status = 404, description = "No such delivery of this account (another account's is answered alike)", body = Problem),
        (status = 409, description = "Its endpoint is no longer registered", body = Problem),
        (status = 429, description = "Rate limit of the account; see Retry-After", body = Problem),
        (status = 503, description = "The database is unavailable; see Retry-After", body = Problem),
    )
)]
async fn redeliver(
    req: HttpRequest,
    app: web::Data<AppState>,
    hooks: web::Data<Webhooks>,
    id: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let claims = app.client(&req)?;
    let id = Uuid::parse_str(&id)
        .map_err(|_| ApiError::field("id", "must be a webhook delivery id (a UUID)"))?;
    let retry_for = hooks.settings.retry_for_ms();
    match hooks.store.redeliver(&claims.sub, id, retry_for).await {
        Ok(Some(delivery)) => {
            hooks.wake.notify_one();
            Ok(HttpResponse::Accepted().json(delivery))
        }
        Ok(None) => Err(ApiError::not_found("webhook delivery", id.to_string())),
        Err(RedeliverError::EndpointRemoved) => Err(ApiError::conflict(
            "endpoint-removed",
            "the endpoint of this delivery is no longer registered",
        )),
        Err(RedeliverError::Db(e)) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_states_the_constraints() {
        let doc = serde_json::to_value(openapi()).unwrap_or_default();
        let urls = &doc["components"]["schemas"]["WebhookRegistration"]["properties"]["urls"];
        assert_eq!(urls["maxItems"], 5, "{urls}");
        assert_eq!(urls["minItems"], 1);
        assert_eq!(urls["items"]["format"], "uri");
        let params = &doc["paths"]["/api/webhooks/deliveries"]["get"]["parameters"];
        assert_eq!(params[0]["schema"]["maximum"], 100, "{params}");
        let put = &doc["paths"]["/api/webhooks"]["put"]["responses"];
        for status in ["200", "201", "400", "401", "429", "503"] {
            assert!(put.get(status).is_some(), "PUT documents {status}");
        }
    }
}
