//! Status API: one saga's state, steps, attempts, errors and timings; a filtered list; the
//! partition leases; the sagas that wait and why; this replica's circuit breakers. Internal
//! (service token).

use std::sync::Arc;

use actix_web::{web, HttpResponse};
use contracts::{
    AttemptView, BreakerState, BreakerStatus, CompensationReport, PartitionLease, Problem,
    RetryRequest, SagaState, StepStatus, WaitReason, WaitingSagas, Workflow, WorkflowSummary,
};
use saga::{Attempt, ListFilter, SagaRecord};
use serde::Deserialize;
use service_kit::auth::ServiceCaller;
use service_kit::openapi::BearerSchemes;
use service_kit::{valid_id, ApiError, ApiResult};
use utoipa::{IntoParams, OpenApi};

use crate::booking::BookingInput;
use crate::control::{self, ControlError};
use crate::Core;

pub struct State {
    pub core: Arc<Core>,
    /// The journal's database, for the read of `/api/waiting`.
    pub db: sea_orm::DatabaseConnection,
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
        .route("/api/partitions", web::get().to(partitions))
        .route("/api/waiting", web::get().to(waiting))
        .route("/api/breakers", web::get().to(breakers));
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Scheduler service", description = "Status of the booking sagas and the partition leases."),
    paths(get, list, partitions, waiting, breakers, compensation, retry),
    components(schemas(Workflow, WorkflowSummary, StepStatus, AttemptView, PartitionLease, WaitingSagas, WaitReason, BreakerStatus, BreakerState, Problem, CompensationReport, RetryRequest)),
    modifiers(&BearerSchemes),
    security(("serviceToken" = []))
)]
struct ApiDoc;

pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

fn internal(e: impl std::error::Error + Send + Sync + 'static) -> ApiError {
    ApiError::Internal(anyhow::Error::new(e))
}

fn saga_state(s: &str) -> ApiResult<SagaState> {
    SagaState::parse(s).ok_or_else(|| ApiError::Internal(anyhow::anyhow!("unknown saga state {s}")))
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
    let store = &state.core.store;
    let record = store
        .load(id)
        .await
        .map_err(internal)?
        .ok_or_else(|| ApiError::not_found("workflow", id))?;
    let attempts = store.attempts(id).await.map_err(internal)?;
    let record_state = saga_state(&record.state)?;
    let steps = state
        .core
        .engine
        .step_names()
        .into_iter()
        .enumerate()
        .map(|(i, name)| {
            let status = if i < record.next_step {
                "succeeded"
            } else if i == record.next_step
                && (record_state == SagaState::Failed
                    || (record_state.is_compensation_state() && last_attempt_failed(&attempts, i)))
            {
                "failed"
            } else if i == record.next_step && record_state == SagaState::Running {
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
    let trace_id = BookingInput::of(&record).ok().and_then(|b| b.trace_id());
    Ok(HttpResponse::Ok().json(Workflow {
        delivery_id: record.id,
        state: record_state,
        partition: record.shard,
        version: record.version,
        error: record.error,
        deadline: record.deadline,
        created_at: record.created_at,
        updated_at: record.updated_at,
        trace_id,
        input: record.input,
        steps,
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
struct ListQuery {
    /// `running`, `completed`, `failed`, `cancelled`, `compensating`, `compensated` or
    /// `compensation-failed`.
    #[param(value_type = Option<SagaState>)]
    state: Option<String>,
    partition: Option<i32>,
    /// Most recently updated first; default 50, at most 500.
    #[param(minimum = 1, maximum = 500)]
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
    let state_filter = match &q.state {
        Some(s) => Some(
            SagaState::parse(s)
                .ok_or_else(|| {
                    ApiError::field(
                        "state",
                        "must be running, completed, failed, cancelled, compensating, compensated or compensation-failed",
                    )
                })?
                .as_str()
                .to_owned(),
        ),
        None => None,
    };
    let rows = state
        .core
        .store
        .list(&ListFilter {
            state: state_filter,
            shard: q.partition,
            limit,
        })
        .await
        .map_err(internal)?;
    let out = rows
        .iter()
        .map(summary)
        .collect::<ApiResult<Vec<WorkflowSummary>>>()?;
    Ok(HttpResponse::Ok().json(out))
}

/// Partition leases: owner, fencing token, expiry and checkpoint.
#[utoipa::path(get, path = "/api/partitions", tag = "partitions", responses((status = 200, body = [PartitionLease])))]
async fn partitions(_: ServiceCaller, state: web::Data<State>) -> ApiResult<HttpResponse> {
    let rows = state.core.store.leases().await.map_err(internal)?;
    let out: Vec<PartitionLease> = rows
        .into_iter()
        .map(|r| PartitionLease {
            partition: r.shard,
            owner: r.owner,
            token: r.epoch,
            expires_at: r.expires_at,
            next_offset: i64::try_from(r.checkpoint.offset).unwrap_or(i64::MAX),
            next_index: i64::from(r.checkpoint.index),
        })
        .collect();
    Ok(HttpResponse::Ok().json(out))
}

/// Running sagas of every partition: those parked until a wake-up time (waiting for a drone, a
/// back-off) apart from those making progress, grouped by step and reason.
#[utoipa::path(get, path = "/api/waiting", tag = "partitions", responses((status = 200, body = WaitingSagas)))]
async fn waiting(_: ServiceCaller, state: web::Data<State>) -> ApiResult<HttpResponse> {
    let now = state.core.engine.clock().now();
    let steps = state.core.engine.step_names();
    let out = crate::waiting::waiting(&state.db, &steps, now)
        .await
        .map_err(internal)?;
    Ok(HttpResponse::Ok().json(out))
}

/// This replica's circuit breaker and concurrency cap in front of each downstream service
/// (each replica has its own: ask each for the whole picture).
#[utoipa::path(get, path = "/api/breakers", tag = "partitions", responses((status = 200, body = [BreakerStatus])))]
async fn breakers(_: ServiceCaller, state: web::Data<State>) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((actix_web::http::header::CACHE_CONTROL, "no-store"))
        .json(state.core.ctx.domain.breakers())
}

fn last_attempt_failed(attempts: &[Attempt], step: usize) -> bool {
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
        e @ ControlError::Journal(_) => ApiError::Internal(e.into()),
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
        (status = 409, body = Problem, description = "the saga is running, scheduled or compensated already"),
        (status = 421, body = Problem, description = "another instance owns the saga's partition")
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
    match control::record_compensation(&state.core, id, report.state, report.detail).await {
        Ok(changed) => Ok(HttpResponse::Ok().json(summary(&changed)?)),
        Err(e @ ControlError::NotOwner { .. }) => Ok(misdirected(e)),
        Err(e) => Err(control_error(e)),
    }
}

/// Runs a failed saga again from the step that failed. Only the instance owning the saga's
/// partition does it (`421` otherwise).
#[utoipa::path(
    post, path = "/api/workflows/{deliveryId}/retry", tag = "workflows",
    params(("deliveryId" = String, Path, description = "deliveryId")),
    request_body(content = Option<RetryRequest>, description = "optional"),
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
    let request: RetryRequest = if service_kit::is_absent(&body) {
        RetryRequest::default()
    } else {
        service_kit::parse_json(&body)?
    };
    let reason = request
        .reason
        .unwrap_or_else(|| "retried by an operator".into());
    match control::retry(&state.core, id, &reason).await {
        Ok(saga) => Ok(HttpResponse::Accepted().json(summary(&saga)?)),
        Err(e @ ControlError::NotOwner { .. }) => Ok(misdirected(e)),
        Err(e) => Err(control_error(e)),
    }
}

fn summary(saga: &SagaRecord) -> ApiResult<WorkflowSummary> {
    Ok(WorkflowSummary {
        delivery_id: saga.id.clone(),
        state: saga_state(&saga.state)?,
        partition: saga.shard,
        next_step: i32::try_from(saga.next_step).unwrap_or(i32::MAX),
        error: saga.error.clone(),
        updated_at: saga.updated_at,
    })
}
