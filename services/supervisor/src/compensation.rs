//! Compensation: consumes `supervisor.compensations` and undoes the steps a failed or cancelled
//! saga had done, newest first (Delivery → Drone → Package), with the idempotent `DELETE`s of the
//! domain services, retried with exponential backoff and jitter on transient errors.
//!
//! Every request is keyed by (deliveryId, sagaVersion): a redelivered or duplicated request finds
//! its row and has no second effect. Before undoing anything the saga is claimed at the Scheduler
//! (`compensating`); a saga the Scheduler no longer lets us compensate (running again after a
//! retry, or compensated already) is left alone. The outcome is stored before the message is
//! acked; a request that cannot be completed is nacked, and after the queue's delivery limit it
//! is parked for a person (and the saga reported `compensation-failed`); `parked` then moves it
//! into the Supervisor's table, where the dashboard lists it and a redrive republishes it.

use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

use backon::{ExponentialBuilder, Retryable};
use chrono::Utc;
use contracts::{
    BookingStep, CompensationRequest, Outcome, SagaState, Workflow, COMPENSATION_REQUESTED,
};
use downstream::{CallError, Downstream};
use messaging::{Envelope, QueueMessage, WorkQueue};
use sea_orm::sea_query::OnConflict;
use sea_orm::{ActiveValue::Set, DatabaseConnection, DbErr, EntityTrait};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::entities::compensation;
use crate::metrics::Metrics;
use crate::scheduler_client::{SchedulerClient, SchedulerError};

/// Message header naming who asked for a compensation (an operator's "compensate now").
pub const REQUESTED_BY: &str = "requested-by";

/// Statuses of a stored compensation (the `compensations` table), not saga states.
pub const COMPENSATING: &str = "compensating";
pub const COMPENSATED: &str = "compensated";
pub const FAILED: &str = "failed";
pub const SUPERSEDED: &str = "superseded";

/// Retries of one undo call (and of one report to the Scheduler) within one delivery.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(default)]
pub struct UndoRetry {
    pub min_delay_ms: u64,
    pub max_delay_ms: u64,
    /// Retries after the first attempt.
    pub max_times: usize,
}

impl Default for UndoRetry {
    fn default() -> Self {
        Self {
            min_delay_ms: 200,
            max_delay_ms: 10_000,
            max_times: 6,
        }
    }
}

impl UndoRetry {
    fn backoff(&self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(self.min_delay_ms))
            .with_max_delay(Duration::from_millis(
                self.max_delay_ms.max(self.min_delay_ms),
            ))
            .with_max_times(self.max_times)
            .with_jitter()
    }
}

pub struct Compensator {
    pub db: DatabaseConnection,
    pub downstream: Downstream,
    pub scheduler: SchedulerClient,
    pub metrics: Arc<Metrics>,
    pub retry: UndoRetry,
    /// The queue's delivery limit: the delivery that reaches it is the last before parking.
    pub delivery_limit: u32,
}

/// What to do with the message.
#[derive(Debug, PartialEq)]
enum Verdict {
    Done,
    /// Not finished: deliver again (parked once the delivery limit is reached).
    Again(String),
}

/// Consumes the queue until `stop` turns true; reconnects when the broker goes away.
pub async fn consume(
    c: Arc<Compensator>,
    queue: Arc<dyn WorkQueue>,
    prefetch: u16,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let mut rx = match queue.consume(prefetch).await {
            Ok(rx) => rx,
            Err(e) => {
                tracing::warn!(error = %e, "cannot consume compensation requests; retrying");
                tokio::select! {
                    _ = stop.changed() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        let mut tasks = JoinSet::new();
        loop {
            tokio::select! {
                _ = stop.changed() => {
                    // Unanswered messages go back to the queue when the consumer closes.
                    let _ = tokio::time::timeout(Duration::from_secs(5), async {
                        while tasks.join_next().await.is_some() {}
                    })
                    .await;
                    return;
                }
                message = rx.next() => match message {
                    Some(m) => {
                        let c = c.clone();
                        // The undo joins the booking's trace: the request carries `traceparent`.
                        let span = tracing::info_span!(
                            "compensation",
                            otel.name = "compensate booking",
                            service = "supervisor",
                            delivery_id = %m.event.key,
                            delivery = m.delivery_count,
                        );
                        telemetry::set_parent(&span, &m.event.headers);
                        tasks.spawn(async move { c.handle(m).await }.instrument(span));
                    }
                    None => break,
                },
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        tracing::warn!("compensation consumer closed; reconnecting");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

impl Compensator {
    async fn handle(&self, m: QueueMessage) {
        let request: CompensationRequest = match m.event.decode() {
            Ok(r) => r,
            Err(reason) => {
                tracing::error!(reason, "undecodable compensation request; parking it");
                self.metrics.parked_total.inc();
                if let Err(e) = m.reject(&reason).await {
                    tracing::warn!(error = %e, "reject failed");
                }
                return;
            }
        };
        let requested_by = m
            .event
            .headers
            .get(REQUESTED_BY)
            .cloned()
            .unwrap_or_else(|| "scheduler".into());
        let verdict = self
            .process(&request, m.delivery_count, &requested_by)
            .await;
        let answered = match verdict {
            Verdict::Done => m.ack().await,
            Verdict::Again(reason) => {
                if m.delivery_count >= self.delivery_limit {
                    self.metrics.parked_total.inc();
                    tracing::warn!(reason, "compensation parked: it needs a person");
                }
                m.nack(&reason).await
            }
        };
        if let Err(e) = answered {
            // Unanswered, the message comes back; the stored outcome makes that harmless.
            tracing::warn!(error = %e, "answering the compensation request failed");
        }
    }

    async fn process(
        &self,
        request: &CompensationRequest,
        delivery_count: u32,
        requested_by: &str,
    ) -> Verdict {
        let id = request.delivery_id.to_string();
        let key = (id.clone(), request.saga_version);
        let existing = match compensation::Entity::find_by_id(key).one(&self.db).await {
            Ok(r) => r,
            Err(e) => return Verdict::Again(format!("supervisor database: {e}")),
        };
        let mut row = existing.unwrap_or_else(|| new_row(request, requested_by));
        match row.status.as_str() {
            COMPENSATED if row.reported => {
                self.metrics
                    .compensations
                    .with_label_values(&["duplicate"])
                    .inc();
                tracing::info!(delivery_id = %id, "compensation already done; nothing to do");
                return Verdict::Done;
            }
            COMPENSATED => return self.report_compensated(&mut row).await,
            SUPERSEDED => return Verdict::Done,
            _ => {}
        }

        // Claim the saga first, so a saga that runs again is never undone under its feet.
        match self
            .report(&id, Outcome::Compensating, Some(request.reason.clone()))
            .await
        {
            Ok(()) => {}
            Err(SchedulerError::Conflict(detail)) => {
                let state = self.scheduler.workflow(&id).await.map(|w| w.state);
                let (status, outcome) = if state.ok() == Some(SagaState::Compensated) {
                    (COMPENSATED, "duplicate")
                } else {
                    (SUPERSEDED, "superseded")
                };
                row.status = status.into();
                row.reported = true;
                row.error = Some(detail);
                if let Err(e) = self.store(&row).await {
                    return Verdict::Again(format!("supervisor database: {e}"));
                }
                self.metrics
                    .compensations
                    .with_label_values(&[outcome])
                    .inc();
                tracing::info!(delivery_id = %id, outcome, "saga not compensated: the scheduler refused");
                return Verdict::Done;
            }
            Err(e) => return Verdict::Again(format!("claiming the saga: {e}")),
        }

        row.status = COMPENSATING.into();
        row.deliveries += 1;
        row.error = None;
        if let Err(e) = self.store(&row).await {
            return Verdict::Again(format!("supervisor database: {e}"));
        }

        let mut results: Map<String, Value> =
            serde_json::from_str(&row.step_results).unwrap_or_default();
        let mut failure = None;
        for step in request.steps_to_undo() {
            match self.undo(step, &id, &request.carrier_legs).await {
                Ok(()) => {
                    results.insert(
                        step.as_str().to_owned(),
                        json!({"outcome": "undone", "at": Utc::now()}),
                    );
                }
                Err(e) => {
                    results.insert(
                        step.as_str().to_owned(),
                        json!({"outcome": if e.is_transient() { "transient" } else { "permanent" }, "error": e.to_string(), "at": Utc::now()}),
                    );
                    failure = Some(format!("{step}: {e}"));
                    break;
                }
            }
        }
        row.step_results = Value::Object(results).to_string();

        if let Some(error) = failure {
            row.status = FAILED.into();
            row.error = Some(error.clone());
            if let Err(e) = self.store(&row).await {
                return Verdict::Again(format!("supervisor database: {e}"));
            }
            self.metrics
                .compensations
                .with_label_values(&["failed"])
                .inc();
            tracing::warn!(delivery_id = %id, error, "compensation failed this time");
            if delivery_count >= self.delivery_limit {
                // Parked next: the saga waits for a person.
                let detail = format!("parked after {delivery_count} deliveries: {error}");
                if let Err(e) = self
                    .report(&id, Outcome::CompensationFailed, Some(detail))
                    .await
                {
                    tracing::warn!(delivery_id = %id, error = %e, "reporting compensation-failed failed");
                }
            }
            return Verdict::Again(error);
        }

        row.status = COMPENSATED.into();
        row.reported = false;
        if let Err(e) = self.store(&row).await {
            return Verdict::Again(format!("supervisor database: {e}"));
        }
        self.metrics
            .compensations
            .with_label_values(&["compensated"])
            .inc();
        self.report_compensated(&mut row).await
    }

    async fn report_compensated(&self, row: &mut compensation::Model) -> Verdict {
        let steps: Vec<String> = serde_json::from_str(&row.steps).unwrap_or_default();
        let detail = if steps.is_empty() {
            "nothing to undo".to_owned()
        } else {
            format!("undone: {}", steps.join(", "))
        };
        match self
            .report(&row.delivery_id, Outcome::Compensated, Some(detail))
            .await
        {
            // A conflict here means it is compensated already (or running again): nothing to add.
            Ok(()) | Err(SchedulerError::Conflict(_)) => {}
            Err(e) => return Verdict::Again(format!("reporting the outcome: {e}")),
        }
        row.reported = true;
        match self.store(row).await {
            Ok(()) => {
                tracing::info!(delivery_id = %row.delivery_id, "saga compensated");
                Verdict::Done
            }
            Err(e) => Verdict::Again(format!("supervisor database: {e}")),
        }
    }

    /// Undoes one step. `carrier_legs` are the leg ids ArrangeThirdParty may have booked (every
    /// revision's); none named means the deliveryId (requests of older Schedulers).
    async fn undo(
        &self,
        step: BookingStep,
        id: &str,
        carrier_legs: &[String],
    ) -> Result<(), CallError> {
        let call = || async {
            match step {
                BookingStep::CreateDelivery => self.downstream.cancel_delivery(id).await,
                BookingStep::ReserveDrone => self.downstream.release_drone(id).await,
                BookingStep::ArrangeThirdParty if carrier_legs.is_empty() => {
                    self.downstream.cancel_leg(id).await
                }
                BookingStep::ArrangeThirdParty => {
                    for leg in carrier_legs {
                        self.downstream.cancel_leg(leg).await?;
                    }
                    Ok(())
                }
                BookingStep::RegisterPackage => self.downstream.delete_package(id).await,
                BookingStep::CheckAccount => Ok(()),
            }
        };
        call.retry(self.retry.backoff())
            .sleep(tokio::time::sleep)
            .when(CallError::is_transient)
            // A call not made (the service's breaker is open) waits until it may be tried again.
            .adjust(|e, wait| match e {
                CallError::Rejected { retry_after, .. } => wait.map(|w| w.max(*retry_after)),
                _ => wait,
            })
            .notify(|e, wait| {
                self.metrics
                    .undo_retries
                    .with_label_values(&[step.as_str()])
                    .inc();
                tracing::info!(delivery_id = %id, step = step.as_str(), error = %e, wait_ms = wait.as_millis() as u64, "undo will be retried");
            })
            .await
    }

    async fn report(
        &self,
        id: &str,
        outcome: Outcome,
        detail: Option<String>,
    ) -> Result<(), SchedulerError> {
        let call = || async {
            self.scheduler
                .report(id, outcome, detail.clone())
                .await
                .map(|_| ())
        };
        call.retry(self.retry.backoff())
            .sleep(tokio::time::sleep)
            .when(SchedulerError::is_transient)
            .await
    }

    async fn store(&self, row: &compensation::Model) -> Result<(), DbErr> {
        store(&self.db, row).await
    }
}

fn new_row(request: &CompensationRequest, requested_by: &str) -> compensation::Model {
    let now = service_kit::now();
    compensation::Model {
        delivery_id: request.delivery_id.to_string(),
        saga_version: request.saga_version,
        owner_id: request.owner_id.clone(),
        steps: serde_json::to_string(&request.succeeded_steps).unwrap_or_else(|_| "[]".into()),
        reason: request.reason.clone(),
        status: "received".into(),
        error: None,
        step_results: "{}".into(),
        deliveries: 0,
        reported: false,
        requested_by: requested_by.to_owned(),
        created_at: now,
        updated_at: now,
    }
}

async fn store(db: &DatabaseConnection, row: &compensation::Model) -> Result<(), DbErr> {
    use compensation::Column as C;
    compensation::Entity::insert(compensation::ActiveModel {
        delivery_id: Set(row.delivery_id.clone()),
        saga_version: Set(row.saga_version),
        owner_id: Set(row.owner_id.clone()),
        steps: Set(row.steps.clone()),
        reason: Set(row.reason.clone()),
        status: Set(row.status.clone()),
        error: Set(row.error.clone()),
        step_results: Set(row.step_results.clone()),
        deliveries: Set(row.deliveries),
        reported: Set(row.reported),
        requested_by: Set(row.requested_by.clone()),
        created_at: Set(row.created_at),
        updated_at: Set(service_kit::now()),
    })
    .on_conflict(
        OnConflict::columns([C::DeliveryId, C::SagaVersion])
            .update_columns([
                C::Status,
                C::Error,
                C::StepResults,
                C::Deliveries,
                C::Reported,
                C::UpdatedAt,
            ])
            .to_owned(),
    )
    .exec_without_returning(db)
    .await
    .map(|_| ())
}

/// The request an operator's "compensate now" sends: the steps the Scheduler shows as succeeded,
/// for the saga's current version.
pub fn request_for(workflow: &Workflow, reason: &str) -> Option<CompensationRequest> {
    let owner_id = workflow.input["ownerId"].as_str()?.to_owned();
    let delivery_id = uuid::Uuid::parse_str(&workflow.delivery_id).ok()?;
    let has_effect = |name: &str| BookingStep::parse(name).is_some_and(BookingStep::has_effect);
    // ArrangeThirdParty that decided no carrier leg was needed has nothing to undo.
    let no_leg = |s: &contracts::StepStatus| {
        s.name == BookingStep::ArrangeThirdParty.as_str()
            && s.output
                .as_ref()
                .is_some_and(|o| o["required"].as_bool() == Some(false))
    };
    let succeeded_steps = workflow
        .steps
        .iter()
        .filter(|s| s.status == "succeeded" && has_effect(&s.name) && !no_leg(s))
        .map(|s| s.name.clone())
        .collect();
    // The step a stopped saga was in may have had an effect (see `CompensationRequest`): one
    // with attempts on record, and the steps under way from the first not written as succeeded
    // (a success may wait for the next step's write, so the journal may not show a call made
    // just before a crash: `BookingStep::under_way_from`).
    let under_way = workflow
        .steps
        .iter()
        .find(|s| s.status != "succeeded")
        .and_then(|s| BookingStep::parse(&s.name))
        .filter(|_| workflow.state != SagaState::Completed)
        .map_or(&[][..], BookingStep::under_way_from);
    let in_doubt_steps = workflow
        .steps
        .iter()
        .filter(|s| {
            s.status != "succeeded"
                && has_effect(&s.name)
                && (!s.attempts.is_empty()
                    || BookingStep::parse(&s.name).is_some_and(|b| under_way.contains(&b)))
        })
        .map(|s| s.name.clone())
        .collect();
    Some(CompensationRequest {
        delivery_id,
        owner_id,
        succeeded_steps,
        in_doubt_steps,
        carrier_legs: carrier_legs(workflow),
        reason: reason.to_owned(),
        saga_version: workflow.version,
    })
}

/// The carrier legs a saga may hold: one per revision (`contracts::carrier_leg_ids`).
fn carrier_legs(workflow: &Workflow) -> Vec<String> {
    let revision = workflow.input["revision"]
        .as_u64()
        .and_then(|r| u32::try_from(r).ok())
        .unwrap_or(0);
    contracts::carrier_leg_ids(&workflow.delivery_id, revision)
}

/// Queues a compensation request on behalf of `user`.
pub async fn enqueue(
    queue: &dyn WorkQueue,
    request: &CompensationRequest,
    user: &str,
) -> anyhow::Result<()> {
    let key = request.delivery_id.to_string();
    let envelope =
        Envelope::new(COMPENSATION_REQUESTED, 1, &key, request)?.with_header(REQUESTED_BY, user);
    queue.publish(envelope).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use contracts::{AttemptView, StepStatus};

    fn step(name: &str, status: &str, attempts: i32) -> StepStatus {
        let now = Utc::now();
        StepStatus {
            name: name.to_owned(),
            status: status.to_owned(),
            output: None,
            attempts: (1..=attempts)
                .map(|attempt| AttemptView {
                    attempt,
                    outcome: "transient".into(),
                    error: None,
                    started_at: now,
                    finished_at: now,
                    duration_ms: 0,
                })
                .collect(),
        }
    }

    /// A booking saga of the owner "o" in `state`, at `version`, with `steps` on record.
    fn workflow(state: SagaState, version: i64, steps: Vec<StepStatus>) -> Workflow {
        let now = Utc::now();
        Workflow {
            delivery_id: uuid::Uuid::new_v4().to_string(),
            state,
            partition: 0,
            version,
            error: None,
            deadline: None,
            created_at: now,
            updated_at: now,
            input: json!({"ownerId": "o"}),
            steps,
            trace_id: None,
        }
    }

    #[test]
    fn compensate_now_undoes_what_succeeded_and_the_step_in_doubt() {
        let workflow = workflow(
            SagaState::Failed,
            7,
            vec![
                step("CheckAccount", "succeeded", 1),
                step("RegisterPackage", "succeeded", 1),
                step("ReserveDrone", "failed", 2),
                step("CreateDelivery", "pending", 0),
            ],
        );
        let request = request_for(&workflow, "why");
        assert_eq!(
            request.as_ref().map(|r| (
                r.delivery_id.to_string(),
                r.succeeded_steps.clone(),
                r.in_doubt_steps.clone(),
                r.saga_version
            )),
            Some((
                workflow.delivery_id.clone(),
                vec!["RegisterPackage".to_owned()],
                // CreateDelivery too: ReserveDrone's success may have waited for its write.
                vec!["ReserveDrone".to_owned(), "CreateDelivery".to_owned()],
                7
            ))
        );
        assert_eq!(
            request.map(|r| r.steps_to_undo()),
            Some(vec![
                BookingStep::CreateDelivery,
                BookingStep::ReserveDrone,
                BookingStep::RegisterPackage
            ])
        );
    }

    /// A saga stopped with RegisterPackage next and no attempt on record may still have made
    /// every call up to CreateDelivery's: the successes before it wait for one write.
    #[test]
    fn compensate_now_counts_the_calls_a_journal_may_not_show() {
        let mut workflow = workflow(
            SagaState::Running,
            1,
            vec![
                step("CheckAccount", "succeeded", 1),
                step("RegisterPackage", "pending", 0),
                step("ArrangeThirdParty", "pending", 0),
                step("ReserveDrone", "pending", 0),
                step("CreateDelivery", "pending", 0),
            ],
        );
        let in_doubt = |w: &Workflow| request_for(w, "why").map(|r| r.in_doubt_steps);
        assert_eq!(
            in_doubt(&workflow),
            Some(
                [
                    "RegisterPackage",
                    "ArrangeThirdParty",
                    "ReserveDrone",
                    "CreateDelivery"
                ]
                .map(str::to_owned)
                .to_vec()
            )
        );
        workflow.state = SagaState::Completed;
        for s in &mut workflow.steps {
            s.status = "succeeded".into();
        }
        assert_eq!(
            in_doubt(&workflow),
            Some(Vec::new()),
            "a completed saga has nothing in doubt"
        );
    }
}
