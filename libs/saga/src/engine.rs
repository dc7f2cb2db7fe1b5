//! Runs sagas: each step's action retried by its policy, every attempt journaled, the saga's state
//! and the messages announcing it committed together, and a resumed saga continuing at the first
//! step its journal does not show as done.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::clock::Clock;
use crate::entities::{attempt, instance};
use crate::journal::{InstanceUpdate, Journal, JournalError, Op, OutboxMessage};
use crate::retry::{RetryPolicy, StepError};
use crate::{CANCELLED, COMPLETED, FAILED, RUNNING};
use tracing::Instrument;

/// A saga as the engine and its steps see it.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaRecord {
    pub id: String,
    pub kind: String,
    pub shard: i32,
    pub state: String,
    pub input: Value,
    /// Outputs of succeeded steps, by step name.
    pub outputs: Map<String, Value>,
    pub next_step: usize,
    pub version: i64,
    pub error: Option<String>,
    /// No step starts after this instant; the saga fails instead.
    pub deadline: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

impl SagaRecord {
    pub fn from_row(row: instance::Model) -> Result<Self, JournalError> {
        let input = serde_json::from_str(&row.input)
            .map_err(|e| JournalError::Corrupt(format!("saga {} input: {e}", row.id)))?;
        let outputs = match serde_json::from_str(&row.outputs) {
            Ok(Value::Object(m)) => m,
            _ => return Err(JournalError::Corrupt(format!("saga {} outputs", row.id))),
        };
        Ok(Self {
            next_step: usize::try_from(row.next_step).unwrap_or(0),
            id: row.id,
            kind: row.kind,
            shard: row.shard,
            state: row.state,
            input,
            outputs,
            version: row.version,
            error: row.error,
            deadline: row.deadline,
            created_at: row.created_at,
        })
    }

    pub fn is_finished(&self) -> bool {
        self.state != RUNNING
    }
}

/// One step: an idempotent action (a retry or a replay has no second effect downstream).
#[async_trait]
pub trait Step<C>: Send + Sync {
    fn name(&self) -> &'static str;
    fn policy(&self) -> RetryPolicy;
    /// Runs one attempt; the output is kept under the step's name for later steps.
    async fn run(&self, ctx: &C, saga: &SagaRecord) -> Result<Value, StepError>;
}

/// A lifecycle change, offered to [`Hooks::announce`] so the messages announcing it commit with it.
#[derive(Debug, Clone, PartialEq)]
pub enum Lifecycle {
    Started,
    StepSucceeded {
        step: &'static str,
    },
    Completed,
    Failed {
        step: &'static str,
        reason: String,
    },
    /// Stopped on request before completing.
    Cancelled {
        reason: String,
    },
}

/// Application hooks.
pub trait Hooks<C>: Send + Sync {
    /// Messages to commit with this change (lifecycle events, compensation requests).
    fn announce(&self, ctx: &C, saga: &SagaRecord, change: &Lifecycle) -> Vec<OutboxMessage>;
    /// Checked before every attempt: `Some(reason)` stops the saga as cancelled.
    fn cancellation(&self, _ctx: &C, _saga: &SagaRecord) -> Option<String> {
        None
    }
}

/// A saga type: its steps in order and its hooks.
pub struct Saga<C> {
    pub kind: &'static str,
    pub steps: Vec<Arc<dyn Step<C>>>,
    pub hooks: Arc<dyn Hooks<C>>,
}

pub struct Engine<C> {
    journal: Arc<Journal>,
    clock: Arc<dyn Clock>,
    saga: Saga<C>,
}

impl<C: Send + Sync> Engine<C> {
    pub fn new(journal: Arc<Journal>, clock: Arc<dyn Clock>, saga: Saga<C>) -> Self {
        Self {
            journal,
            clock,
            saga,
        }
    }

    pub fn journal(&self) -> &Arc<Journal> {
        &self.journal
    }

    pub fn kind(&self) -> &'static str {
        self.saga.kind
    }

    /// Step names in order.
    pub fn step_names(&self) -> Vec<&'static str> {
        self.saga.steps.iter().map(|s| s.name()).collect()
    }

    /// Records a new saga, idempotently. `None` when a saga with this id already exists (a replay):
    /// nothing is written and nothing should run twice.
    pub async fn start(
        &self,
        ctx: &C,
        id: &str,
        shard: i32,
        input: Value,
        deadline: Option<DateTime<Utc>>,
    ) -> Result<Option<SagaRecord>, JournalError> {
        let now = self.clock.now();
        let record = SagaRecord {
            id: id.to_owned(),
            kind: self.saga.kind.to_owned(),
            shard,
            state: RUNNING.to_owned(),
            input,
            outputs: Map::new(),
            next_step: 0,
            version: 1,
            error: None,
            deadline,
            created_at: now,
        };
        // The announcement commits with the start, and only if the start is new (a replay writes
        // nothing): one journal write, so one group commit to wait for.
        let announce = self.saga.hooks.announce(ctx, &record, &Lifecycle::Started);
        let ops = vec![Op::Start(
            Box::new(instance::Model {
                id: record.id.clone(),
                kind: record.kind.clone(),
                shard,
                state: record.state.clone(),
                input: record.input.to_string(),
                outputs: "{}".into(),
                next_step: 0,
                version: 1,
                error: None,
                deadline,
                created_at: now,
                updated_at: now,
            }),
            announce,
        )];
        let created = self.journal.write(ops).await?;
        if created.first().copied() != Some(true) {
            return Ok(None);
        }
        Ok(Some(record))
    }

    fn announce(&self, ctx: &C, saga: &SagaRecord, change: &Lifecycle) -> Vec<Op> {
        self.saga
            .hooks
            .announce(ctx, saga, change)
            .into_iter()
            .map(Op::Outbox)
            .collect()
    }

    /// Writes an application-level change (new state, input, deadline) with its messages.
    pub async fn update(
        &self,
        saga: &mut SagaRecord,
        mut update: InstanceUpdate,
        messages: Vec<OutboxMessage>,
    ) -> Result<(), JournalError> {
        saga.version += 1;
        update.version = saga.version;
        update.at = self.clock.now();
        if let Some(s) = &update.state {
            saga.state = s.clone();
        }
        if let Some(i) = &update.input {
            saga.input = i.clone();
        }
        if let Some(d) = update.deadline {
            saga.deadline = d;
        }
        if let Some(e) = &update.error {
            saga.error = e.clone();
        }
        let mut ops = vec![Op::Update {
            id: saga.id.clone(),
            update,
        }];
        ops.extend(messages.into_iter().map(Op::Outbox));
        self.journal.write(ops).await.map(|_| ())
    }

    /// Runs `saga` from its next step to the end (completed, failed or cancelled). For a saga
    /// loaded from the journal (a resume): the step it stopped in continues its attempt count from
    /// the journal.
    pub async fn run(&self, ctx: &C, saga: SagaRecord) -> Result<SagaRecord, JournalError> {
        self.drive(ctx, saga, true).await
    }

    /// [`Engine::run`] for a saga that [`Engine::start`] has just recorded: its journal has no
    /// attempts yet, so none is read.
    pub async fn run_started(&self, ctx: &C, saga: SagaRecord) -> Result<SagaRecord, JournalError> {
        self.drive(ctx, saga, false).await
    }

    async fn drive(
        &self,
        ctx: &C,
        mut saga: SagaRecord,
        mut journaled_attempts: bool,
    ) -> Result<SagaRecord, JournalError> {
        while !saga.is_finished() {
            let Some(step) = self.saga.steps.get(saga.next_step).cloned() else {
                self.finish(ctx, &mut saga, COMPLETED, None, Lifecycle::Completed)
                    .await?;
                break;
            };
            let index = i32::try_from(saga.next_step).unwrap_or(i32::MAX);
            let policy = step.policy();
            let first_attempt_at = self.clock.now();
            let mut delays = policy.delays();
            // Only the step a resumed saga stopped in can have attempts in the journal: every later
            // step starts here, in this run (one owner per partition, fenced by the lease).
            let mut attempt_no = if journaled_attempts {
                self.attempts_so_far(&saga.id, index).await?
            } else {
                0
            };
            journaled_attempts = false;
            // One span per step: its attempts' downstream calls are its children, retries are
            // events in it, and it ends with the last attempt's number and outcome.
            let step_span = tracing::info_span!(
                "saga_step",
                otel.name = step.name(),
                saga_kind = %saga.kind,
                delivery_id = %saga.id,
                step = step.name(),
                attempt = tracing::field::Empty,
                outcome = tracing::field::Empty,
            );
            loop {
                if let Some(reason) = self.saga.hooks.cancellation(ctx, &saga) {
                    self.finish(
                        ctx,
                        &mut saga,
                        CANCELLED,
                        Some(reason.clone()),
                        Lifecycle::Cancelled { reason },
                    )
                    .await?;
                    return Ok(saga);
                }
                let started = self.clock.now();
                if saga.deadline.is_some_and(|d| started >= d) {
                    let reason = format!(
                        "{}: deadline passed before the step could complete",
                        step.name()
                    );
                    self.fail(
                        ctx,
                        &mut saga,
                        step.name(),
                        index,
                        attempt_no + 1,
                        started,
                        reason,
                    )
                    .await?;
                    return Ok(saga);
                }
                attempt_no += 1;
                step_span.record("attempt", attempt_no);
                let outcome = step.run(ctx, &saga).instrument(step_span.clone()).await;
                step_span.record(
                    "outcome",
                    match &outcome {
                        Ok(_) => "succeeded",
                        Err(StepError::Transient { .. }) => "transient",
                        Err(_) => "permanent",
                    },
                );
                let finished = self.clock.now();
                match outcome {
                    Ok(output) => {
                        saga.outputs.insert(step.name().to_owned(), output);
                        saga.next_step += 1;
                        saga.version += 1;
                        let last = saga.next_step >= self.saga.steps.len();
                        let change = if last {
                            saga.state = COMPLETED.to_owned();
                            Lifecycle::Completed
                        } else {
                            Lifecycle::StepSucceeded { step: step.name() }
                        };
                        let mut ops = vec![
                            attempt_op(
                                &saga.id,
                                index,
                                attempt_no,
                                step.name(),
                                "succeeded",
                                None,
                                started,
                                finished,
                            ),
                            Op::Update {
                                id: saga.id.clone(),
                                update: InstanceUpdate {
                                    state: last.then(|| COMPLETED.to_owned()),
                                    outputs: Some(Value::Object(saga.outputs.clone())),
                                    next_step: Some(
                                        i32::try_from(saga.next_step).unwrap_or(i32::MAX),
                                    ),
                                    version: saga.version,
                                    at: finished,
                                    ..Default::default()
                                },
                            },
                        ];
                        ops.extend(self.announce(ctx, &saga, &change));
                        self.journal.write(ops).await?;
                        tracing::debug!(saga_id = %saga.id, step = step.name(), attempt = attempt_no, "step succeeded");
                        break;
                    }
                    Err(StepError::Permanent { reason }) => {
                        self.fail(
                            ctx,
                            &mut saga,
                            step.name(),
                            index,
                            attempt_no,
                            started,
                            reason,
                        )
                        .await?;
                        return Ok(saga);
                    }
                    Err(StepError::Transient {
                        reason,
                        retry_after,
                    }) => {
                        let delay = delays
                            .next()
                            .map(|d| d.max(retry_after.unwrap_or_default()));
                        let resume = delay.map(|d| {
                            finished
                                + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
                        });
                        let budget = chrono::Duration::from_std(policy.budget())
                            .unwrap_or(chrono::Duration::MAX);
                        let why_stop = match resume {
                            None => Some("no attempts left"),
                            Some(r) if saga.deadline.is_some_and(|dl| r >= dl) => {
                                Some("the deadline passes before another attempt")
                            }
                            Some(r) if r - first_attempt_at > budget => {
                                Some("the step's time budget is spent")
                            }
                            Some(_) => None,
                        };
                        if let Some(why) = why_stop {
                            let reason =
                                format!("{reason} (gave up after {attempt_no} attempts: {why})");
                            self.fail(
                                ctx,
                                &mut saga,
                                step.name(),
                                index,
                                attempt_no,
                                started,
                                reason,
                            )
                            .await?;
                            return Ok(saga);
                        }
                        self.journal
                            .write(vec![attempt_op(
                                &saga.id,
                                index,
                                attempt_no,
                                step.name(),
                                "transient",
                                Some(reason.clone()),
                                started,
                                finished,
                            )])
                            .await?;
                        step_span.in_scope(|| {
                            tracing::info!(saga_id = %saga.id, step = step.name(), attempt = attempt_no, reason, "step will be retried");
                        });
                        if let Some(d) = delay {
                            self.clock.sleep(d).await;
                        }
                    }
                }
            }
        }
        Ok(saga)
    }

    async fn attempts_so_far(&self, id: &str, index: i32) -> Result<i32, JournalError> {
        // After a restart, attempt numbers continue where the journal stopped.
        Ok(self
            .journal
            .attempts(id)
            .await?
            .iter()
            .filter(|a: &&attempt::Model| a.step_index == index)
            .map(|a| a.attempt)
            .max()
            .unwrap_or(0))
    }

    #[allow(clippy::too_many_arguments)]
    async fn fail(
        &self,
        ctx: &C,
        saga: &mut SagaRecord,
        step: &'static str,
        index: i32,
        attempt_no: i32,
        started: DateTime<Utc>,
        reason: String,
    ) -> Result<(), JournalError> {
        let finished = self.clock.now();
        saga.state = FAILED.to_owned();
        saga.error = Some(format!("{step}: {reason}"));
        saga.version += 1;
        let mut ops = vec![
            attempt_op(
                &saga.id,
                index,
                attempt_no,
                step,
                "permanent",
                Some(reason.clone()),
                started,
                finished,
            ),
            Op::Update {
                id: saga.id.clone(),
                update: InstanceUpdate {
                    state: Some(FAILED.to_owned()),
                    error: Some(saga.error.clone()),
                    version: saga.version,
                    at: finished,
                    ..Default::default()
                },
            },
        ];
        ops.extend(self.announce(
            ctx,
            saga,
            &Lifecycle::Failed {
                step,
                reason: reason.clone(),
            },
        ));
        self.journal.write(ops).await?;
        tracing::warn!(saga_id = %saga.id, step, reason, "saga failed");
        Ok(())
    }

    async fn finish(
        &self,
        ctx: &C,
        saga: &mut SagaRecord,
        state: &str,
        error: Option<String>,
        change: Lifecycle,
    ) -> Result<(), JournalError> {
        saga.state = state.to_owned();
        saga.error = error.clone();
        saga.version += 1;
        let mut ops = vec![Op::Update {
            id: saga.id.clone(),
            update: InstanceUpdate {
                state: Some(state.to_owned()),
                error: Some(error),
                version: saga.version,
                at: self.clock.now(),
                ..Default::default()
            },
        }];
        ops.extend(self.announce(ctx, saga, &change));
        self.journal.write(ops).await.map(|_| ())
    }
}

#[allow(clippy::too_many_arguments)]
fn attempt_op(
    saga_id: &str,
    index: i32,
    attempt_no: i32,
    step: &str,
    outcome: &str,
    error: Option<String>,
    started: DateTime<Utc>,
    finished: DateTime<Utc>,
) -> Op {
    Op::Attempt(attempt::Model {
        saga_id: saga_id.to_owned(),
        step_index: index,
        attempt: attempt_no,
        step: step.to_owned(),
        outcome: outcome.to_owned(),
        error,
        started_at: started,
        finished_at: finished,
    })
}
