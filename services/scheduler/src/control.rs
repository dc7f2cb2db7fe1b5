//! Steering a finished saga from outside, for the Supervisor: recording the outcome of its
//! compensation, and running a failed saga again from the step that failed.
//!
//! The Scheduler stays the owner of saga state, so both go through here. Each change is one
//! transaction that moves the saga's version by one — only if nobody else moved it meanwhile
//! (compare-and-set on the version) — and writes the lifecycle event announcing it to the outbox,
//! so Ingestion's and the Supervisor's read models see it.

use std::sync::Arc;

use chrono::Utc;
use contracts::RequestState;
use saga::entities::{instance, outbox};
use saga::{Engine, SagaRecord};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, DatabaseConnection, DbErr, EntityTrait, QueryFilter,
    TransactionTrait,
};

use contracts::validation::{text, FieldError, FromJsonObject, Object};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::booking::{self, Ctx};
use crate::ownership;

/// `POST /api/workflows/{deliveryId}/compensation` body: the Supervisor's report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CompensationReport {
    /// `compensating`, `compensated` or `compensation-failed`.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl FromJsonObject for CompensationReport {
    fn from_object(o: &mut Object) -> Result<Self, Vec<FieldError>> {
        let state = o.required_with("state", |v| match v.as_str().and_then(Outcome::parse) {
            Some(s) => Ok(s.state().to_owned()),
            None => Err("must be compensating, compensated or compensation-failed".to_owned()),
        });
        let detail = o.optional_with("detail", text(2000));
        o.finish(|| {
            Some(CompensationReport {
                state: state?,
                detail,
            })
        })
    }
}

/// `POST /api/workflows/{deliveryId}/retry` body (optional): why.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryRequest {
    #[serde(default)]
    pub reason: Option<String>,
}

impl FromJsonObject for RetryRequest {
    fn from_object(o: &mut Object) -> Result<Self, Vec<FieldError>> {
        let reason = o.optional_with("reason", text(2000));
        o.finish(|| Some(RetryRequest { reason }))
    }
}

/// Saga states after a failure or cancellation, set by the Supervisor's reports.
pub const COMPENSATING: &str = "compensating";
pub const COMPENSATED: &str = "compensated";
pub const COMPENSATION_FAILED: &str = "compensation-failed";

/// Every state a saga can be in (for list filters).
pub const ALL_STATES: [&str; 7] = [
    saga::RUNNING,
    saga::COMPLETED,
    saga::FAILED,
    saga::CANCELLED,
    COMPENSATING,
    COMPENSATED,
    COMPENSATION_FAILED,
];

pub fn is_compensation_state(state: &str) -> bool {
    [COMPENSATING, COMPENSATED, COMPENSATION_FAILED].contains(&state)
}

/// A compensation outcome the Supervisor may report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Compensating,
    Compensated,
    CompensationFailed,
}

impl Outcome {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            COMPENSATING => Some(Self::Compensating),
            COMPENSATED => Some(Self::Compensated),
            COMPENSATION_FAILED => Some(Self::CompensationFailed),
            _ => None,
        }
    }

    pub fn state(self) -> &'static str {
        match self {
            Self::Compensating => COMPENSATING,
            Self::Compensated => COMPENSATED,
            Self::CompensationFailed => COMPENSATION_FAILED,
        }
    }

    fn request_state(self) -> RequestState {
        match self {
            Self::Compensating => RequestState::Compensating,
            Self::Compensated => RequestState::Compensated,
            Self::CompensationFailed => RequestState::CompensationFailed,
        }
    }

    /// Whether a saga in `from` may move to this outcome. A compensated saga stays compensated.
    fn allowed_from(self, from: &str) -> bool {
        match from {
            saga::FAILED | saga::CANCELLED | COMPENSATING | COMPENSATION_FAILED => true,
            COMPENSATED => false,
            _ => false, // running or completed: nothing to compensate
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no saga for {0}")]
    NotFound(String),
    #[error("saga {id} is {state}: {why}")]
    Conflict {
        id: String,
        state: String,
        why: &'static str,
    },
    #[error("partition {partition} of saga {id} is not owned by this scheduler instance")]
    NotOwner { id: String, partition: i32 },
    #[error("saga {0} kept changing while it was updated; try again")]
    Busy(String),
    #[error(transparent)]
    Database(#[from] DbErr),
    #[error("corrupt saga: {0}")]
    Corrupt(String),
}

/// The saga after a change, and whether the call changed anything.
#[derive(Debug)]
pub struct Changed {
    pub saga: SagaRecord,
    pub changed: bool,
}

async fn load(db: &DatabaseConnection, id: &str) -> Result<SagaRecord, ControlError> {
    let row = instance::Entity::find_by_id(id.to_owned())
        .one(db)
        .await?
        .ok_or_else(|| ControlError::NotFound(id.to_owned()))?;
    SagaRecord::from_row(row).map_err(|e| ControlError::Corrupt(e.to_string()))
}

/// Moves `saga` to `state` (version + 1) with its lifecycle event, unless another writer moved the
/// version first (then `false`, and nothing is written).
async fn compare_and_set(
    db: &DatabaseConnection,
    saga: &SagaRecord,
    state: &str,
    error: Option<Option<String>>,
    event: RequestState,
    detail: Option<String>,
) -> Result<Option<SagaRecord>, ControlError> {
    let mut next = saga.clone();
    next.version += 1;
    next.state = state.to_owned();
    if let Some(e) = &error {
        next.error = e.clone();
    }
    let message = booking::state_event(&next, event, detail)
        .ok_or_else(|| ControlError::Corrupt(format!("saga {} input is not a booking", saga.id)))?;
    let now = Utc::now();
    let txn = db.begin().await?;
    let mut update = instance::Entity::update_many()
        .col_expr(instance::Column::State, Expr::value(state.to_owned()))
        .col_expr(instance::Column::Version, Expr::value(next.version))
        .col_expr(instance::Column::UpdatedAt, Expr::value(now));
    if let Some(e) = error {
        update = update.col_expr(instance::Column::Error, Expr::value(e));
    }
    let moved = update
        .filter(instance::Column::Id.eq(saga.id.clone()))
        .filter(instance::Column::Version.eq(saga.version))
        .exec(&txn)
        .await?;
    if moved.rows_affected != 1 {
        txn.rollback().await?;
        return Ok(None);
    }
    outbox::Entity::insert(outbox::ActiveModel {
        destination: Set(message.destination),
        key: Set(message.key),
        payload: Set(message.payload.to_string()),
        created_at: Set(now),
        ..Default::default()
    })
    .exec_without_returning(&txn)
    .await?;
    txn.commit().await?;
    Ok(Some(next))
}

/// Records a compensation outcome. Reporting the state the saga is already in changes nothing.
pub async fn record_compensation(
    db: &DatabaseConnection,
    id: &str,
    outcome: Outcome,
    detail: Option<String>,
) -> Result<Changed, ControlError> {
    for _ in 0..5 {
        let saga = load(db, id).await?;
        if saga.state == outcome.state() {
            return Ok(Changed {
                saga,
                changed: false,
            });
        }
        if !outcome.allowed_from(&saga.state) {
            return Err(ControlError::Conflict {
                id: id.to_owned(),
                why: if saga.state == COMPENSATED {
                    "it is compensated already"
                } else {
                    "only failed or cancelled sagas are compensated"
                },
                state: saga.state,
            });
        }
        if let Some(saga) = compare_and_set(
            db,
            &saga,
            outcome.state(),
            None,
            outcome.request_state(),
            detail.clone(),
        )
        .await?
        {
            tracing::info!(delivery_id = %id, state = outcome.state(), version = saga.version, "compensation outcome recorded");
            return Ok(Changed {
                saga,
                changed: true,
            });
        }
    }
    Err(ControlError::Busy(id.to_owned()))
}

/// What a retry needs besides the database: the engine, the steps' context and who we are.
pub struct Runner {
    pub engine: Arc<Engine<Ctx>>,
    pub ctx: Arc<Ctx>,
    pub instance: String,
}

/// Runs a failed saga again from the step that failed, on the instance that owns its partition.
/// Returns once the saga is marked running again; the steps then run in the background.
pub async fn retry(
    db: &DatabaseConnection,
    runner: &Runner,
    id: &str,
    reason: &str,
) -> Result<SagaRecord, ControlError> {
    let saga = load(db, id).await?;
    if saga.state != saga::FAILED {
        return Err(ControlError::Conflict {
            id: id.to_owned(),
            why: "only a failed saga that is not being compensated can be retried",
            state: saga.state,
        });
    }
    let owned = ownership::all(db).await?.into_iter().any(|l| {
        l.partition == saga.shard && l.owner == runner.instance && l.expires_at > Utc::now()
    });
    if !owned {
        return Err(ControlError::NotOwner {
            id: id.to_owned(),
            partition: saga.shard,
        });
    }
    let detail = format!("retried: {reason}");
    let Some(running) = compare_and_set(
        db,
        &saga,
        saga::RUNNING,
        Some(None),
        RequestState::Scheduling,
        Some(detail),
    )
    .await?
    else {
        return Err(ControlError::Busy(id.to_owned()));
    };
    tracing::info!(delivery_id = %id, step = running.next_step, reason, "saga retried");
    let (engine, ctx, record) = (runner.engine.clone(), runner.ctx.clone(), running.clone());
    tokio::spawn(async move {
        let id = record.id.clone();
        match engine.run(&ctx, record).await {
            Ok(done) => {
                tracing::info!(delivery_id = %id, state = %done.state, "retried saga finished")
            }
            // Still `running` in the journal: the partition's owner resumes it at its next start.
            Err(e) => {
                tracing::error!(delivery_id = %id, error = %e, "retried saga stopped on a journal error")
            }
        }
    });
    Ok(running)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compensation_transitions() {
        for o in [
            Outcome::Compensating,
            Outcome::Compensated,
            Outcome::CompensationFailed,
        ] {
            assert!(o.allowed_from(saga::FAILED));
            assert!(o.allowed_from(saga::CANCELLED));
            assert!(!o.allowed_from(saga::RUNNING));
            assert!(!o.allowed_from(saga::COMPLETED));
            assert!(!o.allowed_from(COMPENSATED));
            assert_eq!(Outcome::parse(o.state()), Some(o));
        }
        assert_eq!(Outcome::parse("running"), None);
    }
}
