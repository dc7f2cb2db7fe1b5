//! The booking API (Fabrikam-compatible). Every route needs a client token (JWT from the Account
//! service) whose subject owns the booking, or the admin scope.

use std::collections::HashSet;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use actix_web::{web, HttpMessage as _, HttpRequest, HttpResponse};
use chrono::{DateTime, Duration, Utc};
use contracts::{
    ClientClaims, DeliveryAccepted, DeliveryCancelled, DeliveryRequest, DeliveryRequestStatus,
    DeliveryRequested, DeliveryRescheduled, Problem, RequestState, RescheduleRequest, ADMIN_SCOPE,
    DELIVERY_CANCELLED, DELIVERY_REQUESTED, DELIVERY_RESCHEDULED,
};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use messaging::{Envelope, PartitionedLog};
use serde::{Deserialize, Serialize};
use service_kit::auth::{bearer, ClientTokens};
use service_kit::openapi::BearerSchemes;
use service_kit::{ApiError, ApiResult, AuthSettings, CannedResponse, Json, RequestId};
use utoipa::{OpenApi, ToSchema};
use uuid::Uuid;

use crate::admission::Admission;
use crate::readmodel::{Accepted, ReadModel};
use crate::IngestionSettings;

/// Namespace of deliveryIds derived from `(owner, Idempotency-Key)`.
const IDEMPOTENCY_NAMESPACE: Uuid = Uuid::from_u128(0x6d0c_5e0b_8f43_4a8e_9c57_2b1f_0e7a_d3c1);

pub(crate) struct AppState {
    log: Arc<dyn PartitionedLog>,
    store: Arc<ReadModel>,
    tokens: ClientTokens,
    limiter: DefaultKeyedRateLimiter<String>,
    admission: Arc<Admission>,
    /// Idempotent requests being appended right now in this process.
    in_progress: Mutex<HashSet<Uuid>>,
    settings: IngestionSettings,
}

impl AppState {
    pub(crate) fn new(
        log: Arc<dyn PartitionedLog>,
        store: Arc<ReadModel>,
        admission: Arc<Admission>,
        auth: &AuthSettings,
        settings: &IngestionSettings,
    ) -> Self {
        let per_second = NonZeroU32::new(settings.rate_per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(settings.rate_burst.max(settings.rate_per_second))
            .unwrap_or(per_second);
        Self {
            log,
            store,
            tokens: ClientTokens::new(&auth.jwt_secret),
            limiter: RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst)),
            admission,
            in_progress: Mutex::new(HashSet::new()),
            settings: settings.clone(),
        }
    }

    /// The caller's verified claims, within its rate limit.
    pub(crate) fn client(&self, req: &HttpRequest) -> ApiResult<ClientClaims> {
        let claims = self.tokens.verify(bearer(req)?)?;
        if let Err(not_until) = self.limiter.check_key(&claims.sub) {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            return Err(ApiError::RateLimited {
                retry_after: wait.as_secs().max(1),
            });
        }
        Ok(claims)
    }

    fn unavailable(&self, e: messaging::MessagingError) -> ApiError {
        tracing::warn!(error = %e, "append failed; request not accepted");
        ApiError::unavailable(
            "log-unavailable",
            "the booking log is unavailable right now; nothing was accepted, please retry",
            self.settings.retry_after_secs,
        )
    }

    fn check_pickup(&self, pickup: DateTime<Utc>) -> ApiResult<()> {
        if pickup < Utc::now() - Duration::seconds(self.settings.pickup_skew_secs) {
            return Err(ApiError::rule("pickupTime", "must not be in the past"));
        }
        Ok(())
    }
}

fn may_act_for(claims: &ClientClaims, owner: &str) -> bool {
    claims.sub == owner || claims.has_scope(ADMIN_SCOPE)
}

/// A new booking names its owner itself: booking for another account is refused as such (the
/// caller already knows both names, nothing is revealed).
fn owns(claims: &ClientClaims, owner: &str) -> ApiResult<()> {
    if may_act_for(claims, owner) {
        Ok(())
    } else {
        Err(ApiError::Forbidden(format!(
            "this token is for account '{}', not '{owner}'",
            claims.sub
        )))
    }
}

/// A deliveryId as the document states it (`format: uuid`): the hyphenated form only.
pub(crate) fn delivery_id(raw: &str) -> ApiResult<Uuid> {
    Some(raw)
        .filter(|raw| raw.len() == 36)
        .and_then(|raw| Uuid::try_parse(raw).ok())
        .ok_or_else(|| ApiError::field("id", "must be a deliveryId (a UUID)"))
}

fn request_id(req: &HttpRequest) -> Option<String> {
    req.extensions().get::<RequestId>().map(|r| r.0.clone())
}

/// Load shedding on the booking path (see [`service_kit::ServiceBuilder::shed`]): a booking that
/// finds every place under the admission limit taken is refused before anything else is done for
/// it (no request id, span, metrics, routing, token check or body), with an answer encoded once.
pub(crate) fn shed(
    admission: Arc<Admission>,
    retry_after: u64,
) -> impl Fn(&actix_web::dev::ServiceRequest) -> Option<HttpResponse> {
    let refusal = CannedResponse::of(&ApiError::Overloaded { retry_after });
    move |req| {
        let booking =
            req.method() == actix_web::http::Method::POST && req.path() == "/api/deliveryrequests";
        (booking && admission.full()).then(|| refusal.response())
    }
}

pub(crate) fn configure(cfg: &mut web::ServiceConfig, state: web::Data<AppState>) {
    cfg.app_data(state)
        .route("/api/deliveryrequests", web::post().to(create))
        .route("/api/deliveryrequests/{id}", web::get().to(status))
        .route("/api/deliveryrequests/{id}", web::patch().to(reschedule))
        .route("/api/deliveryrequests/{id}", web::delete().to(cancel));
}

/// `202` answer to a reschedule or cancel: appended to the booking's partition for its saga.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChangeAccepted {
    pub delivery_id: Uuid,
    /// `delivery.rescheduled` or `delivery.cancelled`.
    pub change: String,
    pub requested_at: DateTime<Utc>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Ingestion service",
        description = "Book, reschedule and cancel drone deliveries (Fabrikam-compatible). A 202 means the request is durably in the delivery-requests log."
    ),
    paths(create, status, reschedule, cancel),
    components(schemas(
        DeliveryRequest, DeliveryAccepted, contracts::PackageInfo, contracts::PackageSize,
        contracts::ConfirmationType, RescheduleRequest, ChangeAccepted, DeliveryRequestStatus,
        RequestState, Problem
    )),
    modifiers(&BearerSchemes),
    security(("clientToken" = []))
)]
struct ApiDoc;

pub(crate) fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.merge(crate::tracking::openapi());
    doc.merge(crate::webhooks::openapi());
    doc
}

/// Books a delivery. `202` only once the request is durably in the log.
#[utoipa::path(
    post, path = "/api/deliveryrequests", tag = "deliveryrequests",
    request_body = DeliveryRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "Same key from the same owner: same deliveryId, appended once", pattern = "^[!-~]{1,255}$")),
    responses(
        (status = 202, description = "Accepted; `Location: /api/deliveries/{deliveryId}`. A replayed Idempotency-Key answers the booking as first accepted (`Idempotent-Replayed: true`)", body = DeliveryAccepted,
            links(
                ("GetStatus" = (operation_id = "status", parameters(("id" = "$response.body#/deliveryId")))),
                ("Reschedule" = (operation_id = "reschedule", parameters(("id" = "$response.body#/deliveryId")))),
                ("Cancel" = (operation_id = "cancel", parameters(("id" = "$response.body#/deliveryId")))),
            )),
        (status = 400, description = "Invalid body (every bad field is named)", body = Problem),
        (status = 401, description = "Missing or invalid client token", body = Problem),
        (status = 403, description = "ownerId is not the token's account", body = Problem),
        (status = 409, description = "A request with this Idempotency-Key is being processed", body = Problem),
        (status = 422, description = "pickupTime is in the past (beyond the clock-skew tolerance)", body = Problem),
        (status = 429, description = "Rate limit of the account; see Retry-After", body = Problem),
        (status = 503, description = "Overloaded or the log is unavailable; nothing was accepted; see Retry-After", body = Problem),
    )
)]
async fn create(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Bytes,
) -> ApiResult<HttpResponse> {
    // First, so that a refusal costs little (most are made earlier still, by `shed`).
    let Some(mut admitted) = state.admission.try_admit() else {
        return Err(ApiError::Overloaded {
            retry_after: state.settings.retry_after_secs,
        });
    };
    let claims = state.client(&req)?;
    let request: DeliveryRequest = service_kit::parse_json(&body)?;
    owns(&claims, &request.owner_id)?;
    let key = idempotency_key(&req)?;

    let (id, _claim) = match &key {
        Some(key) => {
            let id = Uuid::new_v5(
                &IDEMPOTENCY_NAMESPACE,
                format!("{}\n{key}", request.owner_id).as_bytes(),
            );
            if let Some(row) = state.store.find(id).await? {
                // A replay answers what the key booked, not this body (which may differ, or
                // have a pickup time that has passed since): it is checked only for a new key.
                let first = first_accepted(&row)?.unwrap_or(request);
                return Ok(accepted(id, first, true));
            }
            (id, Some(InProgress::claim(&state.in_progress, id)?))
        }
        // Time-ordered: every store keyed by deliveryId (this read model, the Scheduler's sagas)
        // appends to the end of its index instead of touching a random page per booking.
        None => (Uuid::now_v7(), None),
    };
    state.check_pickup(request.pickup_time)?;

    let now = service_kit::now();
    let event = DeliveryRequested {
        delivery_id: id,
        owner_id: request.owner_id.clone(),
        pickup_location: request.pickup_location.clone(),
        drop_off_location: request.drop_off_location.clone(),
        pickup_time: request.pickup_time,
        deadline: request.deadline.clone(),
        expedited: request.expedited,
        confirmation_required: request.confirmation_required,
        package_info: request.package_info.clone(),
        accepted_at: now,
    };
    // Typed: encoded straight from the event, without building its JSON value first.
    let mut envelope = Envelope::typed(DELIVERY_REQUESTED, 1, &id.to_string(), &event);
    if let Some(rid) = request_id(&req) {
        envelope = envelope.with_header("x-request-id", &rid);
    }
    let record = envelope
        .encoded()
        .map_err(|e| ApiError::Internal(e.into()))?;
    let appended = state.log.append_encoded(record).await;
    admitted.appended(appended.is_ok());
    appended.map_err(|e| state.unavailable(e))?;
    let row = Accepted {
        delivery_id: id,
        owner_id: request.owner_id.clone(),
        at: now,
        pickup_location: request.pickup_location.clone(),
        drop_off_location: request.drop_off_location.clone(),
        pickup_time: request.pickup_time,
    };
    if key.is_some() {
        // A replay of this key must find it, with the body it answers: record before answering.
        let first = serde_json::to_string(&request).map_err(|e| ApiError::Internal(e.into()))?;
        state.store.record_now(&row, first).await?;
    } else {
        state.store.record_later(row);
    }
    tracing::debug!(delivery_id = %id, "booking accepted");
    Ok(accepted(id, request, false))
}

/// The body a key first booked; `None` for a row recorded before bodies were kept.
fn first_accepted(row: &crate::readmodel::request::Model) -> ApiResult<Option<DeliveryRequest>> {
    row.first_request
        .as_deref()
        .map(serde_json::from_str)
        .transpose()
        .map_err(|e| {
            ApiError::Internal(anyhow::Error::new(e).context(format!(
                "stored first request of {} does not decode",
                row.delivery_id
            )))
        })
}

fn accepted(id: Uuid, request: DeliveryRequest, replayed: bool) -> HttpResponse {
    let mut res = HttpResponse::Accepted();
    res.insert_header(("Location", format!("/api/deliveries/{id}")));
    if replayed {
        res.insert_header(("Idempotent-Replayed", "true"));
    }
    res.json(DeliveryAccepted {
        delivery_id: id,
        request,
    })
}

fn idempotency_key(req: &HttpRequest) -> ApiResult<Option<String>> {
    let Some(value) = req.headers().get("Idempotency-Key") else {
        return Ok(None);
    };
    let key = value.to_str().ok().map(str::trim).unwrap_or_default();
    if key.is_empty() || key.len() > 255 || !key.chars().all(|c| c.is_ascii_graphic()) {
        return Err(ApiError::field(
            "Idempotency-Key",
            "must be 1-255 visible ASCII characters",
        ));
    }
    Ok(Some(key.to_owned()))
}

/// Marks an idempotent request as being appended in this process until dropped.
struct InProgress<'a> {
    set: &'a Mutex<HashSet<Uuid>>,
    id: Uuid,
}

impl<'a> InProgress<'a> {
    fn claim(set: &'a Mutex<HashSet<Uuid>>, id: Uuid) -> ApiResult<Self> {
        let mut guard = set
            .lock()
            .map_err(|_| ApiError::Internal(anyhow::anyhow!("idempotency set poisoned")))?;
        if !guard.insert(id) {
            return Err(ApiError::conflict(
                "idempotency-key-in-use",
                "a request with this Idempotency-Key is being processed; retry shortly",
            ));
        }
        Ok(Self { set, id })
    }
}

impl Drop for InProgress<'_> {
    fn drop(&mut self) {
        if let Ok(mut guard) = self.set.lock() {
            guard.remove(&self.id);
        }
    }
}

/// The request's state as the client may see it.
#[utoipa::path(
    get, path = "/api/deliveryrequests/{id}", tag = "deliveryrequests",
    params(("id" = Uuid, Path, description = "deliveryId")),
    responses(
        (status = 200, description = "State", body = DeliveryRequestStatus),
        (status = 404, description = "Unknown deliveryId, or not this account's booking (answered alike)", body = Problem),
        (status = 429, description = "Rate limit of the account; see Retry-After", body = Problem),
    )
)]
async fn status(
    req: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let claims = state.client(&req)?;
    let id = delivery_id(&id)?;
    let row = known(&state, &claims, id).await?;
    Ok(HttpResponse::Ok().json(to_status(row)?))
}

/// The booking if the caller may see it. Another account's booking is answered exactly as an
/// unknown one (same error, same body): a client must not learn that it exists or whose it is.
pub(crate) async fn known(
    state: &AppState,
    claims: &ClientClaims,
    id: Uuid,
) -> ApiResult<crate::readmodel::request::Model> {
    state
        .store
        .find(id)
        .await?
        .filter(|row| may_act_for(claims, &row.owner_id))
        .ok_or_else(|| ApiError::not_found("delivery request", id.to_string()))
}

fn to_status(row: crate::readmodel::request::Model) -> ApiResult<DeliveryRequestStatus> {
    Ok(DeliveryRequestStatus {
        delivery_id: delivery_id(&row.delivery_id)?,
        state: RequestState::parse(&row.state).ok_or_else(|| {
            ApiError::Internal(anyhow::anyhow!("unknown request state {}", row.state))
        })?,
        owner_id: row.owner_id,
        detail: row.detail,
        accepted_at: row.accepted_at,
        updated_at: row.updated_at,
    })
}

fn closed(state: RequestState) -> bool {
    matches!(
        state,
        RequestState::Cancelled
            | RequestState::Failed
            | RequestState::Compensated
            | RequestState::CompensationFailed
    )
}

/// Reschedules a booking: appended to its partition for its saga.
#[utoipa::path(
    patch, path = "/api/deliveryrequests/{id}", tag = "deliveryrequests",
    params(("id" = Uuid, Path, description = "deliveryId")),
    request_body = RescheduleRequest,
    responses(
        (status = 202, description = "Reschedule accepted", body = ChangeAccepted),
        (status = 400, description = "Invalid body", body = Problem),
        (status = 404, description = "Unknown deliveryId, or not this account's booking (answered alike)", body = Problem),
        (status = 409, description = "The booking is already closed", body = Problem),
        (status = 422, description = "pickupTime is in the past (beyond the clock-skew tolerance)", body = Problem),
        (status = 429, description = "Rate limit of the account; see Retry-After", body = Problem),
        (status = 503, description = "The log is unavailable; nothing was accepted", body = Problem),
    )
)]
async fn reschedule(
    req: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
    Json(change): Json<RescheduleRequest>,
) -> ApiResult<HttpResponse> {
    let claims = state.client(&req)?;
    let id = delivery_id(&id)?;
    if let Some(t) = change.pickup_time {
        state.check_pickup(t)?;
    }
    let row = to_status(known(&state, &claims, id).await?)?;
    if closed(row.state) {
        return Err(ApiError::conflict(
            "request-closed",
            format!(
                "the booking is {} and cannot be rescheduled",
                row.state.as_str()
            ),
        ));
    }
    let now = service_kit::now();
    let event = DeliveryRescheduled {
        delivery_id: id,
        owner_id: row.owner_id,
        pickup_time: change.pickup_time,
        pickup_location: change.pickup_location,
        drop_off_location: change.drop_off_location,
        deadline: change.deadline,
        requested_at: now,
    };
    append_change(&state, &req, id, DELIVERY_RESCHEDULED, &event, now).await
}

/// Cancels a booking: appended to its partition for its saga. Cancelling a cancelled booking is
/// accepted again (idempotent).
#[utoipa::path(
    delete, path = "/api/deliveryrequests/{id}", tag = "deliveryrequests",
    params(("id" = Uuid, Path, description = "deliveryId")),
    responses(
        (status = 202, description = "Cancellation accepted", body = ChangeAccepted),
        (status = 404, description = "Unknown deliveryId, or not this account's booking (answered alike)", body = Problem),
        (status = 409, description = "The booking already ended otherwise", body = Problem),
        (status = 429, description = "Rate limit of the account; see Retry-After", body = Problem),
        (status = 503, description = "The log is unavailable; nothing was accepted", body = Problem),
    )
)]
async fn cancel(
    req: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let claims = state.client(&req)?;
    let id = delivery_id(&id)?;
    let row = to_status(known(&state, &claims, id).await?)?;
    if closed(row.state) && row.state != RequestState::Cancelled {
        return Err(ApiError::conflict(
            "request-closed",
            format!(
                "the booking is {} and cannot be cancelled",
                row.state.as_str()
            ),
        ));
    }
    let now = service_kit::now();
    let event = DeliveryCancelled {
        delivery_id: id,
        owner_id: row.owner_id,
        requested_at: now,
    };
    append_change(&state, &req, id, DELIVERY_CANCELLED, &event, now).await
}

async fn append_change(
    state: &AppState,
    req: &HttpRequest,
    id: Uuid,
    kind: &str,
    body: &impl Serialize,
    now: DateTime<Utc>,
) -> ApiResult<HttpResponse> {
    let mut envelope =
        Envelope::new(kind, 1, &id.to_string(), body).map_err(|e| ApiError::Internal(e.into()))?;
    if let Some(rid) = request_id(req) {
        envelope = envelope.with_header("x-request-id", &rid);
    }
    state
        .log
        .append(envelope)
        .await
        .map_err(|e| state.unavailable(e))?;
    tracing::info!(delivery_id = %id, change = kind, "change accepted");
    Ok(HttpResponse::Accepted().json(ChangeAccepted {
        delivery_id: id,
        change: kind.to_owned(),
        requested_at: now,
    }))
}
