//! The booking saga: CheckAccount → RegisterPackage → ReserveDrone → CreateDelivery against the
//! real services. Every resource id is the deliveryId, so a retried or replayed step finds what
//! an earlier attempt made instead of making a second one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use contracts::{
    AccountStatus, DeliveryRequested, DeliveryUpsert, DroneReservationRequest, PackageUpsert,
    RequestState, WorkflowStateChanged, WORKFLOW_EVENTS_LOG, WORKFLOW_STATE_CHANGED,
};
use downstream::{CallError, Downstream};
use messaging::Envelope;
use saga::{Hooks, Lifecycle, OutboxMessage, RetryPolicy, SagaRecord, Step, StepError};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::metrics::Metrics;
use crate::StepPolicies;

pub const KIND: &str = "booking";
pub const CHECK_ACCOUNT: &str = "CheckAccount";
pub const REGISTER_PACKAGE: &str = "RegisterPackage";
pub const RESERVE_DRONE: &str = "ReserveDrone";
pub const CREATE_DELIVERY: &str = "CreateDelivery";
/// Queue of compensation requests for the Supervisor.
pub const COMPENSATIONS_QUEUE: &str = "supervisor.compensations";
/// Event type of [`CompensationRequest`].
pub const COMPENSATION_REQUESTED: &str = "saga.compensation-requested";

/// What the Supervisor must undo, in the order the steps succeeded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CompensationRequest {
    pub delivery_id: uuid::Uuid,
    pub owner_id: String,
    /// Steps that succeeded and have an effect to undo (CheckAccount has none).
    pub succeeded_steps: Vec<String>,
    /// The step that was under way when the saga stopped, if it has an effect to undo: an attempt
    /// may have reached the service (a timeout, a crash before the result was journaled) even
    /// though it is not recorded as succeeded. Undoing it is safe: an undo of nothing is a no-op.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub in_doubt_steps: Vec<String>,
    pub reason: String,
    pub saga_version: i64,
}

/// What steps share: the downstream clients, cancellations, metrics.
pub struct Ctx {
    pub downstream: Downstream,
    /// Cancellations received while sagas run, by deliveryId.
    pub cancellations: Mutex<HashMap<String, String>>,
    pub metrics: Arc<Metrics>,
}

fn booking(saga: &SagaRecord) -> Result<DeliveryRequested, StepError> {
    serde_json::from_value(saga.input.clone())
        .map_err(|e| StepError::permanent(format!("saga input is not a booking: {e}")))
}

fn step_error(e: CallError) -> StepError {
    match e {
        CallError::Transient {
            reason,
            retry_after,
        } => StepError::Transient {
            reason,
            retry_after,
        },
        CallError::Permanent { reason, .. } => StepError::Permanent { reason },
    }
}

/// Wraps a step's action with its metrics.
struct Metered<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

#[async_trait]
impl<S: Step<Ctx>> Step<Ctx> for Metered<S> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn policy(&self) -> RetryPolicy {
        self.inner.policy()
    }
    async fn run(&self, ctx: &Ctx, saga: &SagaRecord) -> Result<Value, StepError> {
        let started = std::time::Instant::now();
        let result = self.inner.run(ctx, saga).await;
        let outcome = match &result {
            Ok(_) => "succeeded",
            Err(StepError::Transient { .. }) => "transient",
            Err(StepError::Permanent { .. }) => "permanent",
        };
        self.metrics.step(self.name(), outcome, started.elapsed());
        result
    }
}

struct CheckAccount(RetryPolicy);
struct RegisterPackage(RetryPolicy);
struct ReserveDrone(RetryPolicy);
struct CreateDelivery(RetryPolicy);

#[async_trait]
impl Step<Ctx> for CheckAccount {
    fn name(&self) -> &'static str {
        CHECK_ACCOUNT
    }
    fn policy(&self) -> RetryPolicy {
        self.0
    }
    async fn run(&self, ctx: &Ctx, saga: &SagaRecord) -> Result<Value, StepError> {
        let b = booking(saga)?;
        let account = ctx
            .downstream
            .account(&b.owner_id)
            .await
            .map_err(step_error)?;
        if account.status != AccountStatus::Active {
            return Err(StepError::permanent(format!(
                "account '{}' is {}",
                account.id,
                account.status.as_str()
            )));
        }
        Ok(json!({"accountId": account.id, "status": account.status}))
    }
}

#[async_trait]
impl Step<Ctx> for RegisterPackage {
    fn name(&self) -> &'static str {
        REGISTER_PACKAGE
    }
    fn policy(&self) -> RetryPolicy {
        self.0
    }
    async fn run(&self, ctx: &Ctx, saga: &SagaRecord) -> Result<Value, StepError> {
        let b = booking(saga)?;
        let id = b.delivery_id.to_string();
        let body = PackageUpsert {
            owner_id: b.owner_id.clone(),
            external_id: b.package_info.package_id.clone(),
            size: b.package_info.size,
            weight: b.package_info.weight,
            tag: b.package_info.tag.clone(),
        };
        let p = ctx
            .downstream
            .put_package(&id, &body)
            .await
            .map_err(step_error)?;
        Ok(json!({"packageId": p.id}))
    }
}

#[async_trait]
impl Step<Ctx> for ReserveDrone {
    fn name(&self) -> &'static str {
        RESERVE_DRONE
    }
    fn policy(&self) -> RetryPolicy {
        self.0
    }
    async fn run(&self, ctx: &Ctx, saga: &SagaRecord) -> Result<Value, StepError> {
        let b = booking(saga)?;
        let id = b.delivery_id.to_string();
        let body = DroneReservationRequest {
            pickup_time: b.pickup_time,
            pickup_location: b.pickup_location.clone(),
            drop_off_location: b.drop_off_location.clone(),
            package_id: id.clone(),
            size: b.package_info.size,
            expedited: b.expedited,
            owner_id: Some(b.owner_id.clone()),
        };
        let r = ctx
            .downstream
            .reserve_drone(&id, &body)
            .await
            .map_err(step_error)?;
        Ok(json!({"droneId": r.drone_id, "window": r.window}))
    }
}

#[async_trait]
impl Step<Ctx> for CreateDelivery {
    fn name(&self) -> &'static str {
        CREATE_DELIVERY
    }
    fn policy(&self) -> RetryPolicy {
        self.0
    }
    async fn run(&self, ctx: &Ctx, saga: &SagaRecord) -> Result<Value, StepError> {
        let b = booking(saga)?;
        let id = b.delivery_id.to_string();
        let drone_id = saga.outputs[RESERVE_DRONE]["droneId"]
            .as_str()
            .ok_or_else(|| StepError::permanent("no drone in the ReserveDrone output"))?
            .to_owned();
        let body = DeliveryUpsert {
            owner_id: b.owner_id.clone(),
            pickup_location: b.pickup_location.clone(),
            drop_off_location: b.drop_off_location.clone(),
            pickup_time: b.pickup_time,
            deadline: b.deadline.clone(),
            expedited: b.expedited,
            confirmation_required: b.confirmation_required,
            package_id: id.clone(),
            drone_id: drone_id.clone(),
        };
        ctx.downstream
            .put_delivery(&id, &body)
            .await
            .map_err(step_error)?;
        Ok(json!({"deliveryId": id, "droneId": drone_id}))
    }
}

/// The steps, in order, with their policies and metrics.
pub fn steps(policies: &StepPolicies, metrics: &Arc<Metrics>) -> Vec<Arc<dyn Step<Ctx>>> {
    let m = |s: Arc<dyn Step<Ctx>>| s;
    vec![
        m(Arc::new(Metered {
            inner: CheckAccount(policies.account),
            metrics: metrics.clone(),
        })),
        m(Arc::new(Metered {
            inner: RegisterPackage(policies.package),
            metrics: metrics.clone(),
        })),
        m(Arc::new(Metered {
            inner: ReserveDrone(policies.drone),
            metrics: metrics.clone(),
        })),
        m(Arc::new(Metered {
            inner: CreateDelivery(policies.delivery),
            metrics: metrics.clone(),
        })),
    ]
}

/// Steps with something to undo, among the first `done` steps.
pub fn undoable(done: usize) -> Vec<String> {
    [REGISTER_PACKAGE, RESERVE_DRONE, CREATE_DELIVERY]
        .iter()
        .enumerate()
        .filter(|(i, _)| i + 1 < done)
        .map(|(_, s)| (*s).to_owned())
        .collect()
}

/// The step at `next` (the one a stopped saga was in), if it has something to undo.
pub fn in_doubt(next: usize) -> Vec<String> {
    undoable(next + 1)
        .into_iter()
        .filter(|s| !undoable(next).contains(s))
        .collect()
}

/// A lifecycle event for the `workflow-events` log, as an outbox row.
pub fn state_event(
    saga: &SagaRecord,
    state: RequestState,
    detail: Option<String>,
) -> Option<OutboxMessage> {
    let b = booking(saga).ok()?;
    let body = WorkflowStateChanged {
        delivery_id: b.delivery_id,
        owner_id: b.owner_id,
        state,
        version: saga.version,
        detail,
        at: chrono::Utc::now(),
    };
    envelope_message(WORKFLOW_EVENTS_LOG, WORKFLOW_STATE_CHANGED, &saga.id, &body)
}

/// A compensation request for the Supervisor, as an outbox row.
pub fn compensation(saga: &SagaRecord, reason: &str) -> Option<OutboxMessage> {
    let b = booking(saga).ok()?;
    let body = CompensationRequest {
        delivery_id: b.delivery_id,
        owner_id: b.owner_id,
        succeeded_steps: undoable(saga.next_step),
        in_doubt_steps: in_doubt(saga.next_step),
        reason: reason.to_owned(),
        saga_version: saga.version,
    };
    if body.succeeded_steps.is_empty() && body.in_doubt_steps.is_empty() {
        return None;
    }
    envelope_message(COMPENSATIONS_QUEUE, COMPENSATION_REQUESTED, &saga.id, &body)
}

fn envelope_message(
    destination: &str,
    kind: &str,
    key: &str,
    body: &impl Serialize,
) -> Option<OutboxMessage> {
    // The envelope (and its id) is fixed when the row is written, so a re-sent row is recognisable.
    let envelope = Envelope::new(kind, 1, key, body).ok()?;
    Some(OutboxMessage {
        destination: destination.to_owned(),
        key: key.to_owned(),
        payload: serde_json::to_value(envelope).ok()?,
    })
}

/// Lifecycle → workflow events and compensation requests, committed with each change.
pub struct BookingHooks;

impl Hooks<Ctx> for BookingHooks {
    fn announce(&self, ctx: &Ctx, saga: &SagaRecord, change: &Lifecycle) -> Vec<OutboxMessage> {
        let mut out = Vec::new();
        match change {
            // Counted by the worker once the start proved new: this runs before it is known.
            Lifecycle::Started => {
                out.extend(state_event(saga, RequestState::Scheduling, None));
            }
            Lifecycle::StepSucceeded { .. } => {}
            Lifecycle::Completed => {
                ctx.metrics.finished("scheduled");
                out.extend(state_event(saga, RequestState::Scheduled, None));
            }
            Lifecycle::Failed { step, reason } => {
                ctx.metrics.finished("failed");
                let detail = format!("{step}: {reason}");
                out.extend(state_event(
                    saga,
                    RequestState::Failed,
                    Some(detail.clone()),
                ));
                out.extend(compensation(saga, &detail));
            }
            Lifecycle::Cancelled { reason } => {
                ctx.metrics.finished("cancelled");
                out.extend(state_event(
                    saga,
                    RequestState::Cancelled,
                    Some(reason.clone()),
                ));
                out.extend(compensation(saga, reason));
            }
        }
        out
    }

    fn cancellation(&self, ctx: &Ctx, saga: &SagaRecord) -> Option<String> {
        if let Some(reason) = saga.input.get("cancelRequested").and_then(Value::as_str) {
            return Some(reason.to_owned());
        }
        ctx.cancellations.lock().ok()?.get(&saga.id).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn undoable_steps_follow_progress() {
        assert!(undoable(0).is_empty());
        assert!(undoable(1).is_empty(), "CheckAccount has nothing to undo");
        assert_eq!(undoable(3), vec![REGISTER_PACKAGE, RESERVE_DRONE]);
        assert_eq!(
            undoable(4),
            vec![REGISTER_PACKAGE, RESERVE_DRONE, CREATE_DELIVERY]
        );
    }

    #[test]
    fn the_step_under_way_is_in_doubt() {
        assert!(in_doubt(0).is_empty());
        assert_eq!(in_doubt(1), vec![REGISTER_PACKAGE]);
        assert_eq!(in_doubt(2), vec![RESERVE_DRONE]);
        assert_eq!(in_doubt(3), vec![CREATE_DELIVERY]);
        assert!(
            in_doubt(4).is_empty(),
            "a completed saga has nothing in doubt"
        );
    }
}
