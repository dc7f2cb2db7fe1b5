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
use crate::ownership;

pub struct State {
    pub engine: Arc<Engine<Ctx>>,
    pub db: DatabaseConnection,
}

pub fn configure(cfg: &mut web::ServiceConfig, state: web::Data<State>) {
    cfg.app_data(state)
        .route("/api/workflows", web::get().to(list))
        .route("/api/workflows/{deliveryId}", web::get().to(get))
        .route("/api/partitions", web::get().to(partitions));
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Scheduler service", description = "Status of the booking sagas and the partition leases."),
    paths(get, list, partitions),
    components(schemas(Workflow, WorkflowSummary, StepStatus, AttemptView, PartitionLease, Problem)),
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
    /// `running`, `completed` (scheduled), `failed`, `cancelled`.
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
            } else if i == record.next_step && record.state == saga::FAILED {
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
        input: record.input,
        steps,
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
struct ListQuery {
    /// `running`, `completed`, `failed` or `cancelled`.
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
        if ![
            saga::RUNNING,
            saga::COMPLETED,
            saga::FAILED,
            saga::CANCELLED,
        ]
        .contains(&s.as_str())
        {
            return Err(ApiError::field(
                "state",
                "must be running, completed, failed or cancelled",
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
