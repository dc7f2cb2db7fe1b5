//! The Scheduler's contract with the Supervisor and the tools: saga states, the booking saga's
//! steps, the compensation hand-off on `supervisor.compensations`, and the bodies of the
//! Scheduler's status and control API (`/api/workflows`, `/api/partitions`, `/api/waiting`).
//!
//! States and step names keep the spellings they always had on the wire and in the journal, so
//! stored rows, queued messages and older clients still read the same.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::validation::{text, FieldError, FromJsonObject, Object};
use crate::RequestState;

/// Queue of compensation requests for the Supervisor.
pub const COMPENSATIONS_QUEUE: &str = "supervisor.compensations";
/// Event type of [`CompensationRequest`].
pub const COMPENSATION_REQUESTED: &str = "saga.compensation-requested";

/// The state of a saga in the Scheduler's journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum SagaState {
    /// Steps are running (or waiting, parked in the journal, for their next attempt).
    Running,
    /// Every step succeeded: the booking is scheduled.
    Completed,
    Failed,
    Cancelled,
    /// The Supervisor is undoing the steps of a failed or cancelled saga.
    Compensating,
    Compensated,
    /// Compensation stopped for good; a person must look at it.
    CompensationFailed,
}

impl SagaState {
    pub const ALL: [SagaState; 7] = [
        SagaState::Running,
        SagaState::Completed,
        SagaState::Failed,
        SagaState::Cancelled,
        SagaState::Compensating,
        SagaState::Compensated,
        SagaState::CompensationFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SagaState::Running => "running",
            SagaState::Completed => "completed",
            SagaState::Failed => "failed",
            SagaState::Cancelled => "cancelled",
            SagaState::Compensating => "compensating",
            SagaState::Compensated => "compensated",
            SagaState::CompensationFailed => "compensation-failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// Whether the saga engine is done with it: every state but `running`. (A finished saga may
    /// still be compensated, or retried by an operator, which makes it `running` again.)
    pub fn is_finished(self) -> bool {
        self != SagaState::Running
    }

    /// The states the Supervisor's compensation reports set.
    pub fn is_compensation_state(self) -> bool {
        matches!(
            self,
            SagaState::Compensating | SagaState::Compensated | SagaState::CompensationFailed
        )
    }
}

impl fmt::Display for SagaState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The steps of the booking saga. The names are the journal's and the metrics' step labels.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
pub enum BookingStep {
    CheckAccount,
    RegisterPackage,
    /// Books a carrier leg when the drones cannot do the delivery alone (a drop-off beyond their
    /// range, a package heavier than any of them carries); otherwise it decides so and books none.
    ArrangeThirdParty,
    ReserveDrone,
    CreateDelivery,
}

impl BookingStep {
    /// Every step, in the order the saga runs them.
    pub const ALL: [BookingStep; 5] = [
        BookingStep::CheckAccount,
        BookingStep::RegisterPackage,
        BookingStep::ArrangeThirdParty,
        BookingStep::ReserveDrone,
        BookingStep::CreateDelivery,
    ];

    /// The steps with an effect, the last first: the order in which compensation undoes them.
    const UNDO_ORDER: [BookingStep; 4] = [
        BookingStep::CreateDelivery,
        BookingStep::ReserveDrone,
        BookingStep::ArrangeThirdParty,
        BookingStep::RegisterPackage,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BookingStep::CheckAccount => "CheckAccount",
            BookingStep::RegisterPackage => "RegisterPackage",
            BookingStep::ArrangeThirdParty => "ArrangeThirdParty",
            BookingStep::ReserveDrone => "ReserveDrone",
            BookingStep::CreateDelivery => "CreateDelivery",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// Whether the step changes something a compensation must undo (checking the account does not).
    pub fn has_effect(self) -> bool {
        self != BookingStep::CheckAccount
    }

    /// Whether the Scheduler may write this step's success with the next step's instead of with
    /// a write of its own (when the step says so for its answer): running it again after a crash
    /// has no second effect and gets the same answer (an idempotent call keyed by the delivery, or
    /// a decision that nothing is needed). Until that write, a journal that names an earlier step
    /// as the next one cannot tell whether this one ran: see [`BookingStep::under_way_from`].
    pub fn may_write_with_next(self) -> bool {
        matches!(
            self,
            BookingStep::RegisterPackage
                | BookingStep::ArrangeThirdParty
                | BookingStep::ReserveDrone
        )
    }

    /// The steps a saga whose journal names `next` as its next step may have started (an
    /// attempt may have reached the service, before a crash or without an answer): `next`, and
    /// past it every step whose success may have been waiting for the next step's write, up to
    /// and including the first that writes its own. A compensation counts them in doubt; undoing
    /// what never happened is a no-op. The Scheduler relies on it to ask for a first booking's
    /// drone already in RegisterPackage: from there on, ReserveDrone is always in doubt.
    pub fn under_way_from(next: BookingStep) -> &'static [BookingStep] {
        let from = Self::ALL.iter().position(|s| *s == next).unwrap_or(0);
        let to = Self::ALL[from..]
            .iter()
            .position(|s| !s.may_write_with_next())
            .map_or(Self::ALL.len(), |n| from + n + 1);
        &Self::ALL[from..to]
    }

    /// The steps with an effect in reverse run order (Delivery → Drone → ThirdParty → Package): the order in
    /// which compensation undoes them.
    pub fn undo_order() -> &'static [BookingStep] {
        &Self::UNDO_ORDER
    }
}

impl fmt::Display for BookingStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the Supervisor must undo, in the order the steps succeeded. Message of type
/// [`COMPENSATION_REQUESTED`] on [`COMPENSATIONS_QUEUE`], keyed by deliveryId.
///
/// Step names stay strings here, so that a request naming a step this build does not know is
/// still read (and its known steps undone) rather than parked as undecodable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CompensationRequest {
    pub delivery_id: Uuid,
    pub owner_id: String,
    /// Steps that succeeded and have an effect to undo (CheckAccount has none).
    pub succeeded_steps: Vec<String>,
    /// The step that was under way when the saga stopped, if it has an effect to undo: an attempt
    /// may have reached the service (a timeout, a crash before the result was journaled) even
    /// though it is not recorded as succeeded. Undoing it is safe: an undo of nothing is a no-op.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub in_doubt_steps: Vec<String>,
    /// The carrier legs to cancel when ArrangeThirdParty is undone: every revision's leg id (a
    /// rescheduled booking re-plans its leg under a new id). Empty in requests of older
    /// Schedulers: then the leg id is the deliveryId.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub carrier_legs: Vec<String>,
    pub reason: String,
    pub saga_version: i64,
}

impl CompensationRequest {
    /// The steps to undo (succeeded or in doubt), in [`BookingStep::undo_order`].
    pub fn steps_to_undo(&self) -> Vec<BookingStep> {
        let named = |step: &BookingStep| {
            self.succeeded_steps
                .iter()
                .chain(&self.in_doubt_steps)
                .any(|s| s == step.as_str())
        };
        BookingStep::undo_order()
            .iter()
            .copied()
            .filter(named)
            .collect()
    }
}

/// One attempt of one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AttemptView {
    pub attempt: i32,
    /// `succeeded`, `transient`, `permanent`, or `deferred` (not tried: the service's circuit
    /// breaker was open, and the saga waited as a timer; not counted as an attempt).
    pub outcome: String,
    pub error: Option<String>,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub duration_ms: i64,
}

/// One step of a saga, with its attempts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StepStatus {
    /// The step's name, e.g. `ReserveDrone` (see [`BookingStep`]).
    pub name: String,
    /// `succeeded`, `failed`, `running` or `pending`.
    pub status: String,
    #[schema(value_type = Option<Object>)]
    pub output: Option<serde_json::Value>,
    pub attempts: Vec<AttemptView>,
}

/// `GET /api/workflows/{deliveryId}`: one saga's state, steps, attempts, errors and timings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Workflow {
    pub delivery_id: String,
    pub state: SagaState,
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

/// One saga in `GET /api/workflows`, and the answer to the control calls.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkflowSummary {
    pub delivery_id: String,
    pub state: SagaState,
    pub partition: i32,
    pub next_step: i32,
    pub error: Option<String>,
    pub updated_at: DateTime<Utc>,
}

/// `GET /api/partitions`: who owns a partition, its fencing token, and its checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PartitionLease {
    pub partition: i32,
    pub owner: String,
    pub token: i64,
    pub expires_at: DateTime<Utc>,
    /// The checkpoint is a position (`nextOffset`, `nextIndex`): one message may carry a batch of
    /// events, and the partition resumes at event `nextIndex` of message `nextOffset`.
    pub next_offset: i64,
    #[serde(default)]
    pub next_index: i64,
}

/// `GET /api/waiting`: the running sagas of every partition, those that wait (parked in the
/// journal until a wake-up time: no drone free yet, a long back-off, later an open breaker) apart
/// from those that make progress, with why they wait.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WaitingSagas {
    /// Running sagas working on a step or due to run now.
    pub progressing: i64,
    /// Running sagas parked until a wake-up time in the future.
    pub waiting: i64,
    /// The waiting ones by the step they run again when they wake and why, largest group first.
    pub reasons: Vec<WaitReason>,
    pub at: DateTime<Utc>,
}

/// Sagas that wait to run the same step again for the same reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WaitReason {
    /// The step that runs again at the wake-up.
    pub step: String,
    /// Stable: the problem code of the last failed attempt (`no-drone-available`), else
    /// `timeout`, `unreachable`, `http-<status>` or `transient-error`; `timer` when no attempt
    /// failed (a saga started parked).
    pub reason: String,
    pub count: i64,
    /// The group's earliest wake-up.
    pub next_wake_at: Option<DateTime<Utc>>,
    /// One saga of the group (the first to wake) and its last error, to look at.
    pub example_delivery_id: String,
    pub last_error: Option<String>,
}

/// A compensation outcome the Supervisor may report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Compensating,
    Compensated,
    CompensationFailed,
}

impl Outcome {
    pub const ALL: [Outcome; 3] = [
        Outcome::Compensating,
        Outcome::Compensated,
        Outcome::CompensationFailed,
    ];

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        self.state().as_str()
    }

    /// The saga state this outcome sets.
    pub fn state(self) -> SagaState {
        match self {
            Outcome::Compensating => SagaState::Compensating,
            Outcome::Compensated => SagaState::Compensated,
            Outcome::CompensationFailed => SagaState::CompensationFailed,
        }
    }

    /// The state the client sees once this outcome is recorded.
    pub fn request_state(self) -> RequestState {
        match self {
            Outcome::Compensating => RequestState::Compensating,
            Outcome::Compensated => RequestState::Compensated,
            Outcome::CompensationFailed => RequestState::CompensationFailed,
        }
    }

    /// Whether a saga in `from` may move to this outcome: only failed or cancelled sagas, and
    /// compensations not finished yet, are compensated. A compensated saga stays compensated; a
    /// running or completed one has nothing to compensate.
    pub fn allowed_from(self, from: SagaState) -> bool {
        match from {
            SagaState::Failed
            | SagaState::Cancelled
            | SagaState::Compensating
            | SagaState::CompensationFailed => true,
            SagaState::Running | SagaState::Completed | SagaState::Compensated => false,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Longest free text the Scheduler's control endpoints accept (a retry's `reason`, a compensation
/// report's `detail`), counted in characters as sent. The Supervisor bounds what operators
/// type by it, so an action never fails with a `400` from the Scheduler.
pub const REASON_MAX_CHARS: usize = 2000;

/// `POST /api/workflows/{deliveryId}/compensation` body: the Supervisor's report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CompensationReport {
    /// `compensating`, `compensated` or `compensation-failed`.
    pub state: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = crate::schema::optional_reason)]
    pub detail: Option<String>,
}

impl FromJsonObject for CompensationReport {
    fn from_object(o: &mut Object) -> Result<Self, Vec<FieldError>> {
        let state = o.required_with("state", |v| {
            v.as_str().and_then(Outcome::parse).ok_or_else(|| {
                "must be compensating, compensated or compensation-failed".to_owned()
            })
        });
        let detail = o.optional_with("detail", text(REASON_MAX_CHARS));
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
    #[schema(schema_with = crate::schema::optional_reason)]
    pub reason: Option<String>,
}

impl FromJsonObject for RetryRequest {
    fn from_object(o: &mut Object) -> Result<Self, Vec<FieldError>> {
        let reason = o.optional_with("reason", text(REASON_MAX_CHARS));
        o.finish(|| Some(RetryRequest { reason }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::round_trip;
    use serde_json::json;

    fn spelled<T: Serialize>(v: &T) -> String {
        serde_json::to_value(v)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    #[test]
    fn saga_states_keep_their_spelling() {
        let expected = [
            "running",
            "completed",
            "failed",
            "cancelled",
            "compensating",
            "compensated",
            "compensation-failed",
        ];
        for (s, want) in SagaState::ALL.into_iter().zip(expected) {
            assert_eq!(s.as_str(), want);
            assert_eq!(spelled(&s), want);
            assert_eq!(s.to_string(), want);
            assert_eq!(SagaState::parse(want), Some(s));
            round_trip(&s);
        }
        assert_eq!(SagaState::parse("scheduled"), None);
        assert!(!SagaState::Running.is_finished());
        assert!(SagaState::ALL[1..].iter().all(|s| s.is_finished()));
        let compensation: Vec<_> = SagaState::ALL
            .into_iter()
            .filter(|s| s.is_compensation_state())
            .collect();
        assert_eq!(
            compensation,
            [
                SagaState::Compensating,
                SagaState::Compensated,
                SagaState::CompensationFailed
            ]
        );
    }

    #[test]
    fn booking_steps_keep_their_names_and_undo_in_reverse() {
        let expected = [
            "CheckAccount",
            "RegisterPackage",
            "ArrangeThirdParty",
            "ReserveDrone",
            "CreateDelivery",
        ];
        assert_eq!(BookingStep::ALL.len(), expected.len());
        for (s, want) in BookingStep::ALL.into_iter().zip(expected) {
            assert_eq!(s.as_str(), want);
            assert_eq!(spelled(&s), want);
            assert_eq!(BookingStep::parse(want), Some(s));
            round_trip(&s);
        }
        assert!(!BookingStep::CheckAccount.has_effect());
        assert_eq!(
            BookingStep::undo_order(),
            [
                BookingStep::CreateDelivery,
                BookingStep::ReserveDrone,
                BookingStep::ArrangeThirdParty,
                BookingStep::RegisterPackage
            ]
        );
        let mut effects: Vec<_> = BookingStep::ALL
            .into_iter()
            .filter(|s| s.has_effect())
            .collect();
        effects.reverse();
        assert_eq!(BookingStep::undo_order(), effects.as_slice());
    }

    #[test]
    fn the_steps_under_way_reach_past_those_written_with_the_next() {
        use BookingStep::*;
        assert_eq!(BookingStep::under_way_from(CheckAccount), [CheckAccount]);
        assert_eq!(
            BookingStep::under_way_from(RegisterPackage),
            [
                RegisterPackage,
                ArrangeThirdParty,
                ReserveDrone,
                CreateDelivery
            ]
        );
        assert_eq!(
            BookingStep::under_way_from(ReserveDrone),
            [ReserveDrone, CreateDelivery]
        );
        assert_eq!(
            BookingStep::under_way_from(CreateDelivery),
            [CreateDelivery]
        );
        assert!(
            !CreateDelivery.may_write_with_next(),
            "the last step completes the saga"
        );
    }

    #[test]
    fn a_compensation_request_keeps_its_wire_form() {
        let id = Uuid::new_v4();
        let request = CompensationRequest {
            delivery_id: id,
            owner_id: "o".into(),
            succeeded_steps: vec!["RegisterPackage".into(), "ReserveDrone".into()],
            in_doubt_steps: vec!["CreateDelivery".into()],
            carrier_legs: Vec::new(),
            reason: "CreateDelivery: 422".into(),
            saga_version: 4,
        };
        assert_eq!(
            serde_json::to_value(&request).ok(),
            Some(json!({
                "deliveryId": id,
                "ownerId": "o",
                "succeededSteps": ["RegisterPackage", "ReserveDrone"],
                "inDoubtSteps": ["CreateDelivery"],
                "reason": "CreateDelivery: 422",
                "sagaVersion": 4,
            }))
        );
        round_trip(&request);
        assert_eq!(
            request.steps_to_undo(),
            [
                BookingStep::CreateDelivery,
                BookingStep::ReserveDrone,
                BookingStep::RegisterPackage
            ]
        );
        // Written before `inDoubtSteps` existed; unknown and effect-free steps are not undone.
        let old: Option<CompensationRequest> = serde_json::from_value(json!({
            "deliveryId": id,
            "ownerId": "o",
            "succeededSteps": ["CheckAccount", "RegisterPackage", "SendCarrierPigeon"],
            "reason": "r",
            "sagaVersion": 2,
        }))
        .ok();
        assert_eq!(
            old.map(|r| r.steps_to_undo()),
            Some(vec![BookingStep::RegisterPackage])
        );
    }

    #[test]
    fn compensation_outcomes() {
        for o in Outcome::ALL {
            assert_eq!(Outcome::parse(o.as_str()), Some(o));
            assert_eq!(spelled(&o), o.state().as_str());
            assert_eq!(o.request_state().as_str(), o.as_str());
            assert!(o.state().is_compensation_state());
            assert!(o.allowed_from(SagaState::Failed));
            assert!(o.allowed_from(SagaState::Cancelled));
            assert!(o.allowed_from(SagaState::Compensating));
            assert!(o.allowed_from(SagaState::CompensationFailed));
            assert!(!o.allowed_from(SagaState::Running));
            assert!(!o.allowed_from(SagaState::Completed));
            assert!(!o.allowed_from(SagaState::Compensated));
        }
        assert_eq!(Outcome::parse("running"), None);
    }

    #[test]
    fn reports_name_every_bad_field() {
        let ok =
            CompensationReport::from_json_value(json!({"state": "compensated", "detail": "d"}));
        assert_eq!(
            ok,
            Ok(CompensationReport {
                state: Outcome::Compensated,
                detail: Some("d".into())
            })
        );
        let report = CompensationReport {
            state: Outcome::CompensationFailed,
            detail: None,
        };
        assert_eq!(
            serde_json::to_value(&report).ok(),
            Some(json!({"state": "compensation-failed"}))
        );
        round_trip(&report);
        let bad = CompensationReport::from_json_value(json!({"state": "failed", "detail": 3}))
            .err()
            .unwrap_or_default();
        let fields: Vec<_> = bad.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["state", "detail"]);
        assert_eq!(
            RetryRequest::from_json_value(json!({})),
            Ok(RetryRequest::default())
        );
    }

    #[test]
    fn status_bodies_read_as_before() {
        let now = Utc::now();
        // A lease from before the checkpoint had an index.
        let lease: Option<PartitionLease> = serde_json::from_value(json!({
            "partition": 3, "owner": "scheduler-0", "token": 7,
            "expiresAt": now, "nextOffset": 42,
        }))
        .ok();
        assert_eq!(lease.map(|l| (l.next_offset, l.next_index)), Some((42, 0)));
        round_trip(&WorkflowSummary {
            delivery_id: "d".into(),
            state: SagaState::CompensationFailed,
            partition: 1,
            next_step: 2,
            error: None,
            updated_at: now,
        });
        let workflow: Option<Workflow> = serde_json::from_value(json!({
            "deliveryId": "d", "state": "failed", "partition": 0, "version": 5,
            "error": "CreateDelivery: 422", "deadline": null, "createdAt": now, "updatedAt": now,
            "input": {"ownerId": "o"}, "traceId": null,
            "steps": [{"name": "CheckAccount", "status": "succeeded", "output": null, "attempts": [
                {"attempt": 1, "outcome": "succeeded", "error": null,
                 "startedAt": now, "finishedAt": now, "durationMs": 0}
            ]}],
        }))
        .ok();
        assert_eq!(workflow.map(|w| w.state), Some(SagaState::Failed));
    }
}
