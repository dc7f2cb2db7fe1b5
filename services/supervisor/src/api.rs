//! The Supervisor's JSON API for tools and tests (service token): the overview, sagas from the
//! read model, compensation records, parked requests and their redrive, the audit log.

use actix_web::{web, HttpResponse};
use chrono::{DateTime, Utc};
use contracts::validation::{non_empty, FieldError, FromJsonObject, Object};
use contracts::Problem;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder};
use serde::{Deserialize, Serialize};
use service_kit::auth::ServiceCaller;
use service_kit::openapi::BearerSchemes;
use service_kit::{valid_id, ApiError, ApiResult};
use utoipa::{IntoParams, OpenApi, ToSchema};

use crate::actions::{self, Actor, Overview, PartitionView};
use crate::entities::{compensation, parked_message, saga};
use crate::{audit, parked, readmodel, AppState};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/api/overview", web::get().to(overview))
        .route("/api/sagas", web::get().to(sagas))
        .route("/api/sagas/{deliveryId}", web::get().to(saga_one))
        .route("/api/parked", web::get().to(parked))
        .route("/api/parked/{messageId}/redrive", web::post().to(redrive))
        .route("/api/audit", web::get().to(audit_log));
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Supervisor service", description = "Compensation of failed sagas, the saga read model, parked requests and the audit log. The dashboard is at /dashboard."),
    paths(overview, sagas, saga_one, parked, redrive, audit_log),
    components(schemas(Overview, PartitionView, SagaView, CompensationView, SagaDetail, ParkedView, RedriveRequest, ActionResult, AuditView, Problem)),
    modifiers(&BearerSchemes),
    security(("serviceToken" = []))
)]
struct ApiDoc;

pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// A saga in the read model.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SagaView {
    pub delivery_id: String,
    pub owner_id: String,
    pub state: String,
    pub detail: Option<String>,
    pub version: i64,
    pub stuck: bool,
    pub package_id: Option<String>,
    pub drone_id: Option<String>,
    pub updated_at: DateTime<Utc>,
}

impl From<saga::Model> for SagaView {
    fn from(m: saga::Model) -> Self {
        Self {
            delivery_id: m.delivery_id,
            owner_id: m.owner_id,
            state: m.state,
            detail: m.detail,
            version: m.version,
            stuck: m.stuck,
            package_id: m.package_id,
            drone_id: m.drone_id,
            updated_at: m.updated_at,
        }
    }
}

/// One compensation request and what became of it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CompensationView {
    pub delivery_id: String,
    pub saga_version: i64,
    pub steps: Vec<String>,
    pub reason: String,
    /// `compensating`, `compensated`, `failed` or `superseded`.
    pub status: String,
    pub error: Option<String>,
    #[schema(value_type = Object)]
    pub step_results: serde_json::Value,
    pub deliveries: i32,
    pub reported: bool,
    pub requested_by: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<compensation::Model> for CompensationView {
    fn from(m: compensation::Model) -> Self {
        Self {
            steps: serde_json::from_str(&m.steps).unwrap_or_default(),
            step_results: serde_json::from_str(&m.step_results).unwrap_or_default(),
            delivery_id: m.delivery_id,
            saga_version: m.saga_version,
            reason: m.reason,
            status: m.status,
            error: m.error,
            deliveries: m.deliveries,
            reported: m.reported,
            requested_by: m.requested_by,
            created_at: m.created_at,
            updated_at: m.updated_at,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SagaDetail {
    /// `null` until the saga's first event reached the read model.
    pub saga: Option<SagaView>,
    pub compensations: Vec<CompensationView>,
}

/// A compensation request waiting for a person, as the Supervisor keeps it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ParkedView {
    /// Redrive by this id.
    pub message_id: String,
    /// This parking of the message (a message redriven and parked again gets a new one).
    pub park_id: String,
    /// `null` when the message does not decode.
    pub delivery_id: Option<String>,
    pub reason: String,
    pub delivery_count: i32,
    pub parked_at: DateTime<Utc>,
    /// The compensation request, when the message decodes.
    #[schema(value_type = Object)]
    pub request: Option<serde_json::Value>,
    /// The message as published, as text (invalid UTF-8 shown as U+FFFD), also when it does not
    /// decode.
    pub payload: String,
    /// The same bytes exactly, in hex.
    pub payload_hex: String,
}

impl From<parked_message::Model> for ParkedView {
    fn from(m: parked_message::Model) -> Self {
        let event = parked::event_of(&m);
        Self {
            payload: String::from_utf8_lossy(&m.payload).into_owned(),
            payload_hex: hex::encode(&m.payload),
            message_id: m.message_id,
            park_id: m.park_id,
            delivery_id: m.delivery_id,
            reason: m.reason,
            delivery_count: m.delivery_count,
            parked_at: m.parked_at,
            request: event.map(|e| e.body),
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedriveRequest {
    #[schema(schema_with = contracts::schema::reason)]
    pub reason: String,
}

impl FromJsonObject for RedriveRequest {
    fn from_object(o: &mut Object) -> Result<Self, Vec<FieldError>> {
        let reason = o.required_with("reason", non_empty(contracts::REASON_MAX_CHARS));
        o.finish(|| Some(RedriveRequest { reason: reason? }))
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ActionResult {
    pub ok: bool,
    pub message: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditView {
    pub at: DateTime<Utc>,
    pub actor: String,
    pub role: String,
    pub action: String,
    pub target: String,
    pub reason: String,
    pub outcome: String,
}

impl From<crate::entities::audit::Model> for AuditView {
    fn from(m: crate::entities::audit::Model) -> Self {
        Self {
            at: m.at,
            actor: m.actor,
            role: m.role,
            action: m.action,
            target: m.target,
            reason: m.reason,
            outcome: m.outcome,
        }
    }
}

/// The live counters: rates, sagas by state, parked, stuck, partitions with lag.
#[utoipa::path(get, path = "/api/overview", tag = "supervisor", responses((status = 200, body = Overview)))]
async fn overview(_: ServiceCaller, state: web::Data<AppState>) -> ApiResult<HttpResponse> {
    Ok(HttpResponse::Ok().json(actions::overview(&state).await?))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct SagaQuery {
    /// A state, e.g. `failed`; empty for any.
    #[param(schema_with = state_filter)]
    pub state: Option<String>,
    /// A delivery, account, package or drone id.
    pub q: Option<String>,
    /// Only stuck sagas.
    #[serde(default)]
    pub stuck: bool,
    /// Default 50, at most 500.
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u64>,
}

/// A saga state, or empty for any (what the dashboard's filter form sends).
fn state_filter() -> utoipa::openapi::schema::Schema {
    let states = contracts::RequestState::ALL.map(|s| s.as_str());
    utoipa::openapi::schema::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .enum_values(Some(states.into_iter().chain([""])))
        .into()
}

pub fn search_of(q: &SagaQuery) -> Result<readmodel::Search, ApiError> {
    let state = q.state.clone().filter(|s| !s.is_empty());
    if let Some(s) = &state {
        if contracts::RequestState::parse(s).is_none() {
            return Err(ApiError::field("state", "is not a saga state"));
        }
    }
    let limit = q.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::field("limit", "must be between 1 and 500"));
    }
    Ok(readmodel::Search {
        state,
        q: q.q
            .as_ref()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty()),
        stuck: q.stuck,
        limit,
    })
}

/// Sagas from the read model, most recently changed first.
#[utoipa::path(get, path = "/api/sagas", tag = "supervisor", params(SagaQuery),
    responses((status = 200, body = [SagaView]), (status = 400, body = Problem)))]
async fn sagas(
    _: ServiceCaller,
    state: web::Data<AppState>,
    q: web::Query<SagaQuery>,
) -> ApiResult<HttpResponse> {
    let rows = readmodel::search(&state.db, &search_of(&q)?).await?;
    let out: Vec<SagaView> = rows.into_iter().map(SagaView::from).collect();
    Ok(HttpResponse::Ok().json(out))
}

pub async fn detail(state: &AppState, id: &str) -> Result<SagaDetail, sea_orm::DbErr> {
    let saga = saga::Entity::find_by_id(id.to_owned())
        .one(&state.db)
        .await?
        .map(SagaView::from);
    let compensations = compensation::Entity::find()
        .filter(compensation::Column::DeliveryId.eq(id))
        .order_by_asc(compensation::Column::SagaVersion)
        .all(&state.db)
        .await?
        .into_iter()
        .map(CompensationView::from)
        .collect();
    Ok(SagaDetail {
        saga,
        compensations,
    })
}

/// One saga from the read model, with every compensation request made for it.
#[utoipa::path(get, path = "/api/sagas/{deliveryId}", tag = "supervisor",
    params(("deliveryId" = String, Path, description = "deliveryId")),
    responses((status = 200, body = SagaDetail), (status = 404, body = Problem)))]
async fn saga_one(
    _: ServiceCaller,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let id = valid_id("deliveryId", &id)?;
    let d = detail(&state, id).await?;
    if d.saga.is_none() && d.compensations.is_empty() {
        return Err(ApiError::not_found("saga", id));
    }
    Ok(HttpResponse::Ok().json(d))
}

/// Compensation requests parked after the delivery limit (or undecodable): they need a person.
/// Read from the Supervisor's table; looking changes nothing.
#[utoipa::path(get, path = "/api/parked", tag = "supervisor", responses((status = 200, body = [ParkedView])))]
async fn parked(_: ServiceCaller, state: web::Data<AppState>) -> ApiResult<HttpResponse> {
    let rows = parked::waiting(&state.db, 500).await?;
    let out: Vec<ParkedView> = rows.into_iter().map(ParkedView::from).collect();
    Ok(HttpResponse::Ok().json(out))
}

/// Republishes a parked request to the compensation queue (audited as the service caller).
#[utoipa::path(post, path = "/api/parked/{messageId}/redrive", tag = "supervisor",
    params(("messageId" = String, Path, description = "id from /api/parked")),
    request_body = RedriveRequest,
    responses((status = 200, body = ActionResult), (status = 404, body = Problem)))]
async fn redrive(
    _: ServiceCaller,
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: service_kit::Json<RedriveRequest>,
) -> ApiResult<HttpResponse> {
    let id = valid_id("messageId", &id)?;
    let actor = Actor {
        name: "service-token",
        role: "service",
    };
    let done = actions::redrive(&state, &actor, id, &body.0.reason).await?;
    if !done.ok && done.message.starts_with("no parked message") {
        return Err(ApiError::not_found("parked message", id));
    }
    Ok(HttpResponse::Ok().json(ActionResult {
        ok: done.ok,
        message: done.message,
    }))
}

/// The latest operator actions, newest first.
#[utoipa::path(get, path = "/api/audit", tag = "supervisor", responses((status = 200, body = [AuditView])))]
async fn audit_log(_: ServiceCaller, state: web::Data<AppState>) -> ApiResult<HttpResponse> {
    let rows = audit::recent(&state.db, 200).await?;
    let out: Vec<AuditView> = rows.into_iter().map(AuditView::from).collect();
    Ok(HttpResponse::Ok().json(out))
}
