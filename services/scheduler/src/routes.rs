//! Status API: one saga's state, steps, attempts, errors and timings; a filtered list; the
//! partition leases. Internal (service token).

use std::sync::Arc;

use actix_web::{web, HttpResponse};
use chrono::{DateTime, Utc};
use contracts::Problem;
use saga::entities::instance;
use saga::{Engine, SagaRecord};
use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
use serde::{Deserialize, Serialize};
use service_kit::auth::ServiceCaller;
use service_kit::openapi::BearerSchemes;
use service_kit::{valid_id, ApiError, ApiResult};
use utoipa::{IntoParams, OpenApi, ToSchema};

use crate::booking::Ctx;
use crate::control::{self, CompensationReport, ControlError, RetryRequest};
use crate::ownership;

pub struct State {
    pub engine: Arc<Engine<Ctx>>,
    pub db: DatabaseConnection,
    /// Runs retried sagas (operator actions through the Supervisor).
    pub runner: Arc<control::Runner>,
}

pub fn configure(cfg: &mut web::ServiceConfig, state: web::Data<State>) {
    cfg.app_data(state)
        .route("/api/workflows", web::get().to(list))
        .route("/api/workflows/{deliveryId}", web::get().to(get))
        .route(
            "/api/workflows/{deliveryId}/compensation",
            web::post().to(compensation),
        )
        .route("/api/workflows/{deliveryId}/retry", web::post().to(retry))
        .route("/api/partitions", web::get().to(partitions));
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Scheduler service", description = "Status of the booking sagas and the partition leases."),
    paths(get, list, partitions, compensation, retry),
    components(schemas(Workflow, WorkflowSummary, StepStatus, AttemptView, PartitionLease, Problem, CompensationReport, RetryRequest)),
    modifiers(&BearerSchemes),
    security(("serviceToken" = []))
)]
struct ApiDoc;

pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AttemptView {
    pub attempt: i32,
    /// `succeeded`, `transient` or `permanent`.
    pub outcome: String,
    pub error: Option<String>,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub duration_ms: i64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StepStatus {
    pub name: String,
    /// `succeeded`, `failed`, `running` or `pending`.
    pub status: String,
    #[schema(value_type = Object)]
    pub output: Option<serde_json::Value>,
    pub attempts: Vec<AttemptView>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Workflow {
    pub delivery_id: String,
    /// `running`, `completed` (scheduled), `failed`, `cancelled`, `compensating`, `compensated`,
    /// `compensation-failed`.
    pub state: String,
    pub partition: i32,
    pub version: i64,
    pub error: Option<String>,
    pub deadline: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    #[schema(value_type = Object)]
    pub input: serde_json::Value,
    pub steps: Vec<StepStatus>,
    /// The booking's W3C trace id (32 hex digits), when the booking event carried one.
    pub trace_id: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkflowSummary {
    pub delivery_id: String,
    pub state: String,
    pub partition: i32,
    pub next_step: i32,
    pub error: Option<String>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PartitionLease {
    pub partition: i32,
    pub owner: String,
    pub token: i64,
    pub expires_at: DateTime<Utc>,
    pub next_offset: i64,
}

/// One saga: state, steps, every attempt with its error and timing.
#[utoipa::path(
    get, path = "/api/workflows/{deliveryId}", tag = "workflows",
    params(("deliveryId" = String, Path, description = "deliveryId")),
    responses((status = 200, body = Workflow), (status = 404, body = Problem))
)]
async fn get(
    _: ServiceCaller,
    state: web::Data<State>,
    id: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let id = valid_id("deliveryId", &id)?;
    let journal = state.engine.journal();
    let row = journal
        .load(id)
        .await
        .map_err(|e| ApiError::Internal(e.into()))?
        .ok_or_else(|| ApiError::not_found("workflow", id))?;
    let updated_at = row.updated_at;
    let record = SagaRecord::from_row(row).map_err(|e| ApiError::Internal(e.into()))?;
    let attempts = journal
        .attempts(id)
        .await
        .map_err(|e| ApiError::Internal(e.into()))?;
    let steps = state
        .engine
        .step_names()
        .into_iter()
        .enumerate()
        .map(|(i, name)| {
            let status = if i < record.next_step {
                "succeeded"
            } else if i == record.next_step
                && (record.state == saga::FAILED
                    || (control::is_compensation_state(&record.state)
                        && last_attempt_failed(&attempts, i)))
            {
                "failed"
            } else if i == record.next_step && record.state == saga::RUNNING {
                "running"
            } else {
                "pending"
            };
            StepStatus {
                name: name.to_owned(),
                status: status.to_owned(),
                output: record.outputs.get(name).cloned(),
                attempts: attempts
                    .iter()
                    .filter(|a| usize::try_from(a.step_index).ok() == Some(i))
                    .map(|a| AttemptView {
                        attempt: a.attempt,
                        outcome: a.outcome.clone(),
                        error: a.error.clone(),
                        started_at: a.started_at,
                        finished_at: a.finished_at,
                        duration_ms: (a.finished_at - a.started_at).num_milliseconds(),
                    })
                    .collect(),
            }
        })
        .collect();
    Ok(HttpResponse::Ok().json(Workflow {
        delivery_id: record.id,
        state: record.state,
        partition: record.shard,
        version: record.version,
        error: record.error,
        deadline: record.deadline,
        created_at: record.created_at,
        updated_at,
        trace_id: crate::worker::trace_id_of(&record.input),
        input: record.input,
        steps,
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
struct ListQuery {
    /// `running`, `completed`, `failed`, `cancelled`, `compensating`, `compensated` or
    /// `compensation-failed`.
    state: Option<String>,
    partition: Option<i32>,
    /// Most recently updated first; default 50, at most 500.
    limit: Option<u64>,
}

/// Sagas, most recently updated first.
#[utoipa::path(
    get, path = "/api/workflows", tag = "workflows", params(ListQuery),
    responses((status = 200, body = [WorkflowSummary]), (status = 400, body = Problem))
)]
async fn list(
    _: ServiceCaller,
    state: web::Data<State>,
    q: web::Query<ListQuery>,
) -> ApiResult<HttpResponse> {
    let limit = q.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::field("limit", "must be between 1 and 500"));
    }
    let mut select = instance::Entity::find();
    if let Some(s) = &q.state {
        if !control::ALL_STATES.contains(&s.as_str()) {
            return Err(ApiError::field(
                "state",
                "must be running, completed, failed, cancelled, compensating, compensated or compensation-failed",
            ));
        }
        select = select.filter(instance::Column::State.eq(s.clone()));
    }
    if let Some(p) = q.partition {
        select = select.filter(instance::Column::Shard.eq(p));
    }
    let rows = select
        .order_by_desc(instance::Column::UpdatedAt)
        .limit(limit)
        .all(&state.db)
        .await?;
    let out: Vec<WorkflowSummary> = rows
        .into_iter()
        .map(|r| WorkflowSummary {
            delivery_id: r.id,
            state: r.state,
            partition: r.shard,
            next_step: r.next_step,
            error: r.error,
            updated_at: r.updated_at,
        })
        .collect();
    Ok(HttpResponse::Ok().json(out))
}

/// Partition leases: owner, fencing token, expiry and checkpoint.
#[utoipa::path(get, path = "/api/partitions", tag = "partitions", responses((status = 200, body = [PartitionLease])))]
async fn partitions(_: ServiceCaller, state: web::Data<State>) -> ApiResult<HttpResponse> {
    let rows = ownership::all(&state.db).await?;
    let out: Vec<PartitionLease> = rows
        .into_iter()
        .map(|r| PartitionLease {
            partition: r.partition,
            owner: r.owner,
            token: r.token,
            expires_at: r.expires_at,
            next_offset: r.next_offset,
        })
        .collect();
    Ok(HttpResponse::Ok().json(out))
}

fn last_attempt_failed(attempts: &[saga::entities::attempt::Model], step: usize) -> bool {
    attempts
        .iter()
        .rev()
        .find(|a| usize::try_from(a.step_index).ok() == Some(step))
        .is_some_and(|a| a.outcome == "permanent")
}

fn control_error(e: ControlError) -> ApiError {
    match e {
        ControlError::NotFound(id) => ApiError::not_found("workflow", id),
        e @ ControlError::Conflict { .. } => {
            ApiError::conflict("saga-state-conflict", e.to_string())
        }
        e @ ControlError::Busy(_) => ApiError::unavailable("saga-busy", e.to_string(), 1),
        e @ ControlError::NotOwner { .. } => {
            ApiError::conflict("partition-not-owned", e.to_string())
        }
        ControlError::Database(e) => ApiError::from(e),
        e @ ControlError::Corrupt(_) => ApiError::Internal(e.into()),
    }
}

/// `421 Misdirected Request`: another instance owns the saga's partition (ask that one).
fn misdirected(e: ControlError) -> HttpResponse {
    let mut problem = control_error(e).problem();
    problem.status = 421;
    HttpResponse::build(actix_web::http::StatusCode::MISDIRECTED_REQUEST)
        .insert_header((
            actix_web::http::header::CONTENT_TYPE,
            "application/problem+json",
        ))
        .body(serde_json::to_string(&problem).unwrap_or_default())
}

/// Records the Supervisor's compensation outcome (new saga state, version + 1, announced on
/// `workflow-events`). Reporting the current state again changes nothing.
#[utoipa::path(
    post, path = "/api/workflows/{deliveryId}/compensation", tag = "workflows",
    params(("deliveryId" = String, Path, description = "deliveryId")),
    request_body = CompensationReport,
    responses(
        (status = 200, body = WorkflowSummary, description = "recorded, or already in that state"),
        (status = 400, body = Problem), (status = 404, body = Problem),
        (status = 409, body = Problem, description = "the saga is running, scheduled or compensated already")
    )
)]
async fn compensation(
    _: ServiceCaller,
    state: web::Data<State>,
    id: web::Path<String>,
    body: service_kit::Json<CompensationReport>,
) -> ApiResult<HttpResponse> {
    let id = valid_id("deliveryId", &id)?;
    let report = body.0;
    let outcome = control::Outcome::parse(&report.state).ok_or_else(|| {
        ApiError::field(
            "state",
            "must be compensating, compensated or compensation-failed",
        )
    })?;
    let changed = control::record_compensation(&state.db, id, outcome, report.detail)
        .await
        .map_err(control_error)?;
    Ok(HttpResponse::Ok().json(summary(&changed.saga)))
}

/// Runs a failed saga again from the step that failed. Only the instance owning the saga's
/// partition does it (`421` otherwise).
#[utoipa::path(
    post, path = "/api/workflows/{deliveryId}/retry", tag = "workflows",
    params(("deliveryId" = String, Path, description = "deliveryId")),
    request_body(content = RetryRequest, description = "optional"),
    responses(
        (status = 202, body = WorkflowSummary, description = "running again"),
        (status = 404, body = Problem),
        (status = 409, body = Problem, description = "the saga is not failed"),
        (status = 421, body = Problem, description = "another instance owns the saga's partition")
    )
)]
async fn retry(
    _: ServiceCaller,
    state: web::Data<State>,
    id: web::Path<String>,
    body: web::Bytes,
) -> ApiResult<HttpResponse> {
    let id = valid_id("deliveryId", &id)?;
    let request: RetryRequest = if body.iter().all(u8::is_ascii_whitespace) {
        RetryRequest::default()
    } else {
        service_kit::parse_json(&body)?
    };
    let reason = request
        .reason
        .unwrap_or_else(|| "retried by an operator".into());
    match control::retry(&state.db, &state.runner, id, &reason).await {
        Ok(saga) => Ok(HttpResponse::Accepted().json(summary(&saga))),
        Err(e @ ControlError::NotOwner { .. }) => Ok(misdirected(e)),
        Err(e) => Err(control_error(e)),
    }
}

fn summary(saga: &SagaRecord) -> WorkflowSummary {
    WorkflowSummary {
        delivery_id: saga.id.clone(),
        state: saga.state.clone(),
        partition: saga.shard,
        next_step: i32::try_from(saga.next_step).unwrap_or(i32::MAX),
        error: saga.error.clone(),
        updated_at: chrono::Utc::now(),
    }
}
