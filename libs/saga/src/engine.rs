//! Runs sagas: each step's action retried by its policy, every attempt journaled, the saga's state
//! and the messages announcing it committed together, a saga that must wait parked in the journal
//! with a wake-up time, signals applied between steps, and a resumed saga continuing at the first
//! step its journal does not show as done.
//!
//! The engine is the only writer of saga state, and every write it makes is fenced: it names the
//! shard epoch its caller holds and the version it read. A refused write ([`JournalError::Refused`])
//! ends the run at once; the caller must let the shard go.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use tokio::sync::Notify;
use tracing::Instrument;

use crate::clock::Clock;
use crate::retry::{RetryPolicy, StepError};
use crate::store::{
    Attempt, Change, Fence, InstanceUpdate, JournalError, OutboxMessage, RawJson, SagaRecord,
    Signal, Store, Write, Written,
};
use crate::{CANCELLED, COMPLETED, FAILED, RUNNING};

/// The journal's outcome for a step that was not tried (its service's breaker was open): the saga
/// waited as a timer. Not an attempt of the step's retry policy.
pub const DEFERRED: &str = "deferred";

/// One step: an idempotent action (a retry or a replay has no second effect downstream).
#[async_trait]
pub trait Step<C>: Send + Sync {
    fn name(&self) -> &'static str;
    fn policy(&self) -> RetryPolicy;
    /// Runs one attempt; the output is kept under the step's name for later steps.
    async fn run(&self, ctx: &C, saga: &SagaRecord) -> Result<Value, StepError>;
    /// True when this success may wait for the saga's next write instead of a write of its own:
    /// running the step again finds the same answer and has no second effect (a read, a decision
    /// that nothing is needed, or an idempotent call keyed by the saga). A crash before that
    /// write only runs the step again; until then a journal naming an earlier step as the next
    /// one cannot tell whether this one ran, so whatever undoes the saga must count it in doubt.
    /// Any other write (a failure, a wait, a signal) first writes the successes waiting. Asked
    /// before `output` joins the saga's outputs; never asked of the last step, whose write
    /// completes the saga.
    fn written_with_next(&self, _saga: &SagaRecord, _output: &Value) -> bool {
        false
    }
    /// True when the step only ever reads (whatever its outcome, nothing changes anywhere), so it
    /// may run before the saga is recorded: [`Engine::start_checked`] runs the saga's leading
    /// such steps once and writes their successes with the start. A crash before the start is
    /// durable loses nothing (the caller records the start again, and the check runs again).
    /// Not asked of the last step, whose write completes the saga.
    fn reads_only(&self) -> bool {
        false
    }
}

/// A saga that [`Engine::start_checked`] (or [`Engine::start`]) has just recorded, for
/// [`Engine::run_started`].
#[derive(Debug)]
pub struct Started {
    pub record: SagaRecord,
    /// A check that ran before the start and did not pass: the first attempt of the step the
    /// saga stands at, which the run takes as it is instead of trying the step again.
    check: Option<Tried>,
}

impl From<SagaRecord> for Started {
    fn from(record: SagaRecord) -> Self {
        Self {
            record,
            check: None,
        }
    }
}

/// One attempt of a step made before the start was written, and its failure.
#[derive(Debug)]
struct Tried {
    index: usize,
    started: DateTime<Utc>,
    finished: DateTime<Utc>,
    error: StepError,
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
    /// Stopped on request (a running saga before completing, or a completed one to be undone).
    Cancelled {
        reason: String,
    },
    /// A signal changed the input and sent the saga back to an earlier step.
    Rewound {
        detail: String,
    },
}

/// What a signal does to a saga, decided by the application.
#[derive(Debug, Clone, PartialEq)]
pub enum SignalAction {
    /// Stop and undo: a running or completed saga becomes cancelled.
    Cancel { reason: String },
    /// New input; the saga runs again from `to_step` (or from where it is, if that is earlier).
    /// A completed saga runs again.
    Rewind {
        input: Value,
        to_step: usize,
        /// A new deadline, when the change moves it.
        deadline: Option<DateTime<Utc>>,
        detail: String,
    },
    /// Nothing to do (logged with the reason).
    Ignore { why: String },
}

/// Application hooks.
pub trait Hooks<C>: Send + Sync {
    /// Messages to commit with this change (lifecycle events, compensation requests).
    fn announce(&self, ctx: &C, saga: &SagaRecord, change: &Lifecycle) -> Vec<OutboxMessage>;
    /// `change` is durable: the write that recorded it (and its announcements) committed. For
    /// what must count only what happened (metrics): a write refused by a fence never gets here.
    fn committed(&self, _ctx: &C, _saga: &SagaRecord, _change: &Lifecycle) {}
    /// What `signal` does to `saga` as it is now.
    fn on_signal(&self, _ctx: &C, _saga: &SagaRecord, signal: &Signal) -> SignalAction {
        SignalAction::Ignore {
            why: format!("no handler for signal {}", signal.kind),
        }
    }
}

/// Signals that reach a running saga from outside, taken at its step boundaries.
pub trait Inbox: Send + Sync {
    /// Whether signals wait for `id` (checked before every attempt).
    fn has(&self, id: &str) -> bool;
    /// The signals waiting for `id`, taken.
    fn take(&self, id: &str) -> Vec<Signal>;
    /// These signals are durable now (the write that recorded them committed).
    fn recorded(&self, signals: &[Signal]);
}

/// An inbox that never has anything.
pub struct NoInbox;

impl Inbox for NoInbox {
    fn has(&self, _: &str) -> bool {
        false
    }
    fn take(&self, _: &str) -> Vec<Signal> {
        Vec::new()
    }
    fn recorded(&self, _: &[Signal]) {}
}

/// A saga type: its steps in order and its hooks.
pub struct Saga<C> {
    pub kind: &'static str,
    pub steps: Vec<Arc<dyn Step<C>>>,
    pub hooks: Arc<dyn Hooks<C>>,
}

/// How the engine waits.
#[derive(Debug, Clone, Copy)]
pub struct EngineSettings {
    /// A retry delay at least this long parks the saga in the journal (a durable timer) and ends
    /// the run, so its slot is free for others; shorter ones are slept in place.
    pub park_after: Duration,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            park_after: Duration::from_secs(1),
        }
    }
}

pub struct Engine<C> {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    saga: Saga<C>,
    settings: EngineSettings,
    /// Notified (`notify_one`, so a busy relay finds a permit) after a write that put rows in the
    /// outbox.
    outbox_written: Arc<Notify>,
}

impl<C: Send + Sync> Engine<C> {
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        saga: Saga<C>,
        settings: EngineSettings,
    ) -> Self {
        Self {
            store,
            clock,
            saga,
            settings,
            outbox_written: Arc::new(Notify::new()),
        }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    pub fn kind(&self) -> &'static str {
        self.saga.kind
    }

    /// Notified after every write that put rows in the outbox (the relay waits on it).
    pub fn outbox_written(&self) -> Arc<Notify> {
        self.outbox_written.clone()
    }

    /// Step names in order.
    pub fn step_names(&self) -> Vec<&'static str> {
        self.saga.steps.iter().map(|s| s.name()).collect()
    }

    async fn write(&self, write: Write) -> Result<Written, JournalError> {
        let announces = !write.outbox.is_empty();
        let r = self.store.write(write).await?;
        if announces {
            self.outbox_written.notify_one();
        }
        Ok(r)
    }

    /// The fenced update every change goes through: the saga moves to version + 1 with `update`, the
    /// attempts and the messages, or nothing is written. The caller has already made the change in
    /// `saga` (in place: a saga record is not copied per write); on an error that record no longer
    /// matches the journal, and the caller drops it (the engine's callers reload from the journal).
    async fn commit(
        &self,
        fence: Fence,
        saga: &mut SagaRecord,
        update: InstanceUpdate,
        attempts: Vec<Attempt>,
        outbox: Vec<OutboxMessage>,
    ) -> Result<(), JournalError> {
        let at = self.clock.now();
        self.write(Write {
            fence,
            change: Change::Update {
                id: saga.id.clone(),
                expected_version: saga.version,
                update,
                at,
            },
            attempts,
            outbox,
        })
        .await?;
        saga.version += 1;
        saga.updated_at = at;
        Ok(())
    }

    /// Records a new saga, idempotently. `None` when a saga with this id already exists (a replay):
    /// nothing is written and nothing should run twice. With `wake_at` the saga starts parked (it
    /// runs when a timer loop finds it due).
    pub async fn start(
        &self,
        ctx: &C,
        fence: Fence,
        id: &str,
        input: Value,
        deadline: Option<DateTime<Utc>>,
        wake_at: Option<DateTime<Utc>>,
    ) -> Result<Option<SagaRecord>, JournalError> {
        let record = self.new_record(fence, id, input, deadline, wake_at);
        let started = self
            .record_start(ctx, fence, record, Vec::new(), None)
            .await?;
        Ok(started.map(|s| s.record))
    }

    /// [`Engine::start`] for a saga that runs at once, with its leading read-only steps
    /// ([`Step::reads_only`]) run first, one attempt each: their successes are written with the
    /// start, so the saga's first write already has them behind it. The first that does not pass
    /// stops there; [`Engine::run_started`] takes its outcome as that step's first attempt.
    pub async fn start_checked(
        &self,
        ctx: &C,
        fence: Fence,
        id: &str,
        input: Value,
        deadline: Option<DateTime<Utc>>,
    ) -> Result<Option<Started>, JournalError> {
        let mut record = self.new_record(fence, id, input, deadline, None);
        let mut attempts = Vec::new();
        let mut check = None;
        while record.next_step + 1 < self.saga.steps.len() {
            let step = self.saga.steps[record.next_step].clone();
            let started = self.clock.now();
            if !step.reads_only() || deadline.is_some_and(|d| started >= d) {
                break;
            }
            let index = record.next_step;
            let outcome = attempt(
                step.as_ref(),
                ctx,
                &record,
                &step_span(step.as_ref(), &record),
                1,
            )
            .await;
            let finished = self.clock.now();
            match outcome {
                Ok(output) => {
                    record.outputs.insert(step.name().to_owned(), output);
                    record.next_step += 1;
                    attempts.push(attempt_row(
                        &record.id,
                        i32::try_from(index).unwrap_or(i32::MAX),
                        1,
                        step.name(),
                        "succeeded",
                        None,
                        started,
                        finished,
                    ));
                }
                Err(error) => {
                    check = Some(Tried {
                        index,
                        started,
                        finished,
                        error,
                    });
                    break;
                }
            }
        }
        self.record_start(ctx, fence, record, attempts, check).await
    }

    fn new_record(
        &self,
        fence: Fence,
        id: &str,
        input: Value,
        deadline: Option<DateTime<Utc>>,
        wake_at: Option<DateTime<Utc>>,
    ) -> SagaRecord {
        let now = self.clock.now();
        SagaRecord {
            id: id.to_owned(),
            kind: self.saga.kind.to_owned(),
            shard: fence.shard,
            state: RUNNING.to_owned(),
            input,
            outputs: Map::new(),
            next_step: 0,
            version: 1,
            error: None,
            deadline,
            wake_at,
            signals: Vec::new(),
            created_at: now,
            updated_at: now,
        }
    }

    async fn record_start(
        &self,
        ctx: &C,
        fence: Fence,
        record: SagaRecord,
        attempts: Vec<Attempt>,
        check: Option<Tried>,
    ) -> Result<Option<Started>, JournalError> {
        // The announcement commits with the start, and only if the start is new.
        let outbox = self.saga.hooks.announce(ctx, &record, &Lifecycle::Started);
        let record = Arc::new(record);
        let written = self
            .write(Write {
                fence,
                change: Change::Start(record.clone()),
                attempts,
                outbox,
            })
            .await?;
        // The store has let go of its share by now (a copy only if one did not).
        let record = Arc::unwrap_or_clone(record);
        Ok((written == Written::Created).then_some(Started { record, check }))
    }

    /// Records signals for a saga that no task is running: they wait in the journal and the saga
    /// is due at once, so the timer loop runs it and it applies them.
    pub async fn signal(
        &self,
        fence: Fence,
        saga: &mut SagaRecord,
        signals: Vec<Signal>,
    ) -> Result<(), JournalError> {
        let mut next = saga.clone();
        next.signals.extend(signals);
        next.wake_at = Some(self.clock.now());
        let update = InstanceUpdate {
            signals: Some(next.signals.clone()),
            wake_at: next.wake_at,
            ..Default::default()
        };
        self.commit(fence, &mut next, update, Vec::new(), Vec::new())
            .await?;
        *saga = next;
        Ok(())
    }

    /// An application-level change (control actions: a compensation outcome, a retry) with its
    /// messages, fenced like every other write. `wake` makes the saga due at once.
    pub async fn update(
        &self,
        fence: Fence,
        saga: &mut SagaRecord,
        mut update: InstanceUpdate,
        messages: Vec<OutboxMessage>,
        wake: bool,
    ) -> Result<(), JournalError> {
        let mut next = saga.clone();
        if let Some(s) = &update.state {
            next.state = s.clone();
        }
        if let Some(i) = &update.input {
            next.input = i.clone();
        }
        if let Some(d) = update.deadline {
            next.deadline = d;
        }
        if let Some(e) = &update.error {
            next.error = e.clone();
        }
        update.wake_at = if wake {
            Some(self.clock.now())
        } else {
            saga.wake_at
        };
        next.wake_at = update.wake_at;
        self.commit(fence, &mut next, update, Vec::new(), messages)
            .await?;
        *saga = next;
        Ok(())
    }

    /// Runs `saga` until it finishes (completed, failed, cancelled) or parks on a timer, applying
    /// its signals between steps. For a saga loaded from the journal (a resume, a timer): the step
    /// it stopped in continues its attempt count and time budget from the journal.
    pub async fn run(
        &self,
        ctx: &C,
        fence: Fence,
        saga: SagaRecord,
        inbox: &dyn Inbox,
    ) -> Result<SagaRecord, JournalError> {
        self.drive(ctx, fence, saga, inbox, true, None).await
    }

    /// [`Engine::run`] for a saga that [`Engine::start`] or [`Engine::start_checked`] has just
    /// recorded: its journal has no attempts but those written with the start, so none is read.
    pub async fn run_started(
        &self,
        ctx: &C,
        fence: Fence,
        saga: impl Into<Started>,
        inbox: &dyn Inbox,
    ) -> Result<SagaRecord, JournalError> {
        let Started { record, check } = saga.into();
        self.drive(ctx, fence, record, inbox, false, check).await
    }

    async fn drive(
        &self,
        ctx: &C,
        fence: Fence,
        mut saga: SagaRecord,
        inbox: &dyn Inbox,
        mut journaled_attempts: bool,
        mut check: Option<Tried>,
    ) -> Result<SagaRecord, JournalError> {
        // Successes not written yet (see `Step::written_with_next`): their outputs
        // and `next_step` are in `saga`, their attempts here; the next step's success writes them
        // with its own, any other write is preceded by one that settles them.
        let mut unsaved: Vec<Attempt> = Vec::new();
        'steps: loop {
            if !saga.signals.is_empty() || inbox.has(&saga.id) {
                self.settle(fence, &mut saga, &mut unsaved).await?;
                self.apply_signals(ctx, fence, &mut saga, inbox).await?;
                // A rewound step may have attempts from its earlier run: continue their numbers.
                journaled_attempts = true;
                // A check made before the start is not an answer about the changed saga.
                check = None;
            }
            if saga.is_finished() {
                return Ok(saga);
            }
            let Some(step) = self.saga.steps.get(saga.next_step).cloned() else {
                self.finish(ctx, fence, &mut saga, COMPLETED, None, Lifecycle::Completed)
                    .await?;
                continue 'steps;
            };
            let index = i32::try_from(saga.next_step).unwrap_or(i32::MAX);
            let policy = step.policy();
            let (mut attempt_no, this_try, first) = if journaled_attempts {
                self.attempts_so_far(&saga.id, index).await?
            } else {
                (0, 0, None)
            };
            journaled_attempts = false;
            // The check made before the start is this step's first attempt.
            let mut check = check.take().filter(|t| t.index == saga.next_step);
            let first_attempt_at = first
                .or(check.as_ref().map(|t| t.started))
                .unwrap_or_else(|| self.clock.now());
            // The back-off continues where the journal stopped, across parks and restarts.
            let mut delays = policy
                .delays_seeded(Some(jitter_seed(&saga.id, index)))
                .skip(usize::try_from(this_try).unwrap_or(0));
            let step_span = step_span(step.as_ref(), &saga);
            loop {
                if inbox.has(&saga.id) {
                    continue 'steps;
                }
                let started = self.clock.now();
                if saga.deadline.is_some_and(|d| started >= d) {
                    self.settle(fence, &mut saga, &mut unsaved).await?;
                    let reason = format!(
                        "{}: deadline passed before the step could complete",
                        step.name()
                    );
                    self.fail(
                        ctx,
                        fence,
                        &mut saga,
                        step.name(),
                        index,
                        attempt_no + 1,
                        started,
                        reason,
                    )
                    .await?;
                    continue 'steps;
                }
                attempt_no += 1;
                let (started, outcome, finished) = match check.take() {
                    Some(t) => {
                        record_attempt(&step_span, attempt_no, Err(&t.error));
                        (t.started, Err(t.error), t.finished)
                    }
                    None => {
                        let outcome =
                            attempt(step.as_ref(), ctx, &saga, &step_span, attempt_no).await;
                        (started, outcome, self.clock.now())
                    }
                };
                if outcome.is_err() {
                    self.settle(fence, &mut saga, &mut unsaved).await?;
                }
                match outcome {
                    Ok(output) => {
                        let last = saga.next_step + 1 >= self.saga.steps.len();
                        let fold = !last && step.written_with_next(&saga, &output);
                        saga.outputs.insert(step.name().to_owned(), output);
                        saga.next_step += 1;
                        saga.wake_at = None;
                        let attempt = attempt_row(
                            &saga.id,
                            index,
                            attempt_no,
                            step.name(),
                            "succeeded",
                            None,
                            started,
                            finished,
                        );
                        unsaved.push(attempt);
                        if fold {
                            tracing::debug!(saga_id = %saga.id, step = step.name(), attempt = attempt_no, "step succeeded; written with the next step");
                            continue 'steps;
                        }
                        let change = if last {
                            saga.state = COMPLETED.to_owned();
                            Lifecycle::Completed
                        } else {
                            Lifecycle::StepSucceeded { step: step.name() }
                        };
                        let update = InstanceUpdate {
                            state: last.then(|| COMPLETED.to_owned()),
                            outputs: Some(outputs_of(&saga)?),
                            next_step: Some(i32::try_from(saga.next_step).unwrap_or(i32::MAX)),
                            ..Default::default()
                        };
                        self.commit_announced(
                            ctx,
                            fence,
                            &mut saga,
                            update,
                            std::mem::take(&mut unsaved),
                            Some(&change),
                        )
                        .await?;
                        tracing::debug!(saga_id = %saga.id, step = step.name(), attempt = attempt_no, "step succeeded");
                        continue 'steps;
                    }
                    Err(StepError::Permanent { reason }) => {
                        self.fail(
                            ctx,
                            fence,
                            &mut saga,
                            step.name(),
                            index,
                            attempt_no,
                            started,
                            reason,
                        )
                        .await?;
                        continue 'steps;
                    }
                    Err(StepError::Deferred { reason, wait }) => {
                        let resume = finished
                            + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::MAX);
                        if saga.deadline.is_some_and(|dl| resume >= dl) {
                            let reason = format!(
                                "{reason} (gave up: the deadline passes before it can be tried again)"
                            );
                            self.fail(
                                ctx,
                                fence,
                                &mut saga,
                                step.name(),
                                index,
                                attempt_no,
                                started,
                                reason,
                            )
                            .await?;
                            continue 'steps;
                        }
                        // Always parked, however short the wait: a step whose service is known
                        // to be down holds no slot.
                        let attempt = attempt_row(
                            &saga.id,
                            index,
                            attempt_no,
                            step.name(),
                            DEFERRED,
                            Some(reason.clone()),
                            started,
                            finished,
                        );
                        self.wait(fence, &mut saga, attempt, Some(resume)).await?;
                        step_span.in_scope(|| {
                            tracing::info!(saga_id = %saga.id, step = step.name(), reason, wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX), "step deferred");
                        });
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
                                fence,
                                &mut saga,
                                step.name(),
                                index,
                                attempt_no,
                                started,
                                reason,
                            )
                            .await?;
                            continue 'steps;
                        }
                        let delay = delay.unwrap_or_default();
                        // A long wait parks the saga: durable, and its slot goes to others.
                        let park = delay >= self.settings.park_after;
                        let attempt = attempt_row(
                            &saga.id,
                            index,
                            attempt_no,
                            step.name(),
                            "transient",
                            Some(reason.clone()),
                            started,
                            finished,
                        );
                        self.wait(fence, &mut saga, attempt, resume.filter(|_| park))
                            .await?;
                        step_span.in_scope(|| {
                            tracing::info!(saga_id = %saga.id, step = step.name(), attempt = attempt_no, reason, parked = park, "step will be retried");
                        });
                        if park {
                            return Ok(saga);
                        }
                        self.clock.sleep(delay).await;
                    }
                }
            }
        }
    }

    /// Writes the successes that wait for a write (`unsaved`), before a write
    /// that would not carry them (a signal, a failure, a retry's wait).
    async fn settle(
        &self,
        fence: Fence,
        saga: &mut SagaRecord,
        unsaved: &mut Vec<Attempt>,
    ) -> Result<(), JournalError> {
        if unsaved.is_empty() {
            return Ok(());
        }
        let update = InstanceUpdate {
            outputs: Some(outputs_of(saga)?),
            next_step: Some(i32::try_from(saga.next_step).unwrap_or(i32::MAX)),
            ..Default::default()
        };
        self.commit(fence, saga, update, std::mem::take(unsaved), Vec::new())
            .await
    }

    /// Journals an attempt that did not finish the step and the saga's timer: parked until
    /// `wake_at`, or (`None`) waiting in place.
    async fn wait(
        &self,
        fence: Fence,
        saga: &mut SagaRecord,
        attempt: Attempt,
        wake_at: Option<DateTime<Utc>>,
    ) -> Result<(), JournalError> {
        saga.wake_at = wake_at;
        let update = InstanceUpdate {
            wake_at,
            ..Default::default()
        };
        self.commit(fence, saga, update, vec![attempt], Vec::new())
            .await
    }

    /// Applies the saga's recorded signals and those waiting in `inbox`, in order, in one write.
    async fn apply_signals(
        &self,
        ctx: &C,
        fence: Fence,
        saga: &mut SagaRecord,
        inbox: &dyn Inbox,
    ) -> Result<(), JournalError> {
        let incoming = inbox.take(&saga.id);
        let signals: Vec<Signal> = std::mem::take(&mut saga.signals)
            .into_iter()
            .chain(incoming.iter().cloned())
            .collect();
        let mut update = InstanceUpdate {
            signals: Some(Vec::new()),
            ..Default::default()
        };
        let mut change = None;
        for signal in &signals {
            match self.saga.hooks.on_signal(ctx, saga, signal) {
                SignalAction::Cancel { reason }
                    if saga.state == RUNNING || saga.state == COMPLETED =>
                {
                    saga.state = CANCELLED.to_owned();
                    saga.error = Some(reason.clone());
                    update.state = Some(CANCELLED.to_owned());
                    update.error = Some(Some(reason.clone()));
                    change = Some(Lifecycle::Cancelled { reason });
                }
                SignalAction::Rewind {
                    input,
                    to_step,
                    deadline,
                    detail,
                } if saga.state == RUNNING || saga.state == COMPLETED => {
                    if saga.state == COMPLETED {
                        saga.state = RUNNING.to_owned();
                        saga.next_step = to_step;
                        update.state = Some(RUNNING.to_owned());
                    } else {
                        saga.next_step = saga.next_step.min(to_step);
                    }
                    saga.input = input;
                    update.input = Some(saga.input.clone());
                    if let Some(d) = deadline {
                        saga.deadline = Some(d);
                        update.deadline = Some(Some(d));
                    }
                    update.next_step = Some(i32::try_from(saga.next_step).unwrap_or(i32::MAX));
                    change = Some(Lifecycle::Rewound { detail });
                }
                SignalAction::Cancel { .. } | SignalAction::Rewind { .. } => {
                    tracing::info!(saga_id = %saga.id, kind = %signal.kind, state = %saga.state, "signal has nothing to act on");
                }
                SignalAction::Ignore { why } => {
                    tracing::info!(saga_id = %saga.id, kind = %signal.kind, why, "signal ignored");
                }
            }
        }
        saga.wake_at = None;
        // One write, so one version: only the last change is announced.
        self.commit_announced(ctx, fence, saga, update, Vec::new(), change.as_ref())
            .await?;
        inbox.recorded(&incoming);
        Ok(())
    }

    /// The messages announcing `change`, as they will read once `next` is written at `version`.
    fn announced(
        &self,
        ctx: &C,
        next: &mut SagaRecord,
        version: i64,
        change: &Lifecycle,
    ) -> Vec<OutboxMessage> {
        let kept = std::mem::replace(&mut next.version, version);
        let out = self.saga.hooks.announce(ctx, next, change);
        next.version = kept;
        out
    }

    /// After a restart or a park, attempt numbers continue where the journal stopped. Returns the
    /// last attempt number of the step, how many attempts the current try has made (since the step
    /// last succeeded, failed for good or was deferred: a rewound, retried or deferred step starts
    /// a new try) and when the
    /// current try's first attempt started (its time budget counts from there).
    async fn attempts_so_far(
        &self,
        id: &str,
        index: i32,
    ) -> Result<(i32, i32, Option<DateTime<Utc>>), JournalError> {
        let attempts = self.store.attempts(id).await?;
        let mut last = 0;
        let mut current = 0;
        let mut first = None;
        for a in attempts.iter().filter(|a| a.step_index == index) {
            last = last.max(a.attempt);
            if a.outcome == "transient" {
                current += 1;
                first = first.or(Some(a.started_at));
            } else if a.outcome == DEFERRED {
                // Waiting out an open breaker is not the step failing: the try after it starts
                // with a fresh back-off and budget (the journal keeps the earlier attempts).
                current = 0;
                first = None;
            } else {
                current = 0;
                first = None;
            }
        }
        Ok((last, current, first))
    }

    #[allow(clippy::too_many_arguments)]
    async fn fail(
        &self,
        ctx: &C,
        fence: Fence,
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
        saga.wake_at = None;
        let update = InstanceUpdate {
            state: Some(FAILED.to_owned()),
            error: Some(saga.error.clone()),
            ..Default::default()
        };
        let attempt = attempt_row(
            &saga.id,
            index,
            attempt_no,
            step,
            "permanent",
            Some(reason.clone()),
            started,
            finished,
        );
        let change = Lifecycle::Failed {
            step,
            reason: reason.clone(),
        };
        self.commit_announced(ctx, fence, saga, update, vec![attempt], Some(&change))
            .await?;
        tracing::warn!(saga_id = %saga.id, step, reason, "saga failed");
        Ok(())
    }

    async fn finish(
        &self,
        ctx: &C,
        fence: Fence,
        saga: &mut SagaRecord,
        state: &str,
        error: Option<String>,
        change: Lifecycle,
    ) -> Result<(), JournalError> {
        saga.state = state.to_owned();
        saga.error = error.clone();
        saga.wake_at = None;
        let update = InstanceUpdate {
            state: Some(state.to_owned()),
            error: Some(error),
            ..Default::default()
        };
        self.commit_announced(ctx, fence, saga, update, Vec::new(), Some(&change))
            .await
    }

    /// [`commit`](Self::commit) with `change` announced in the same write, and told to the hooks
    /// once it is durable.
    async fn commit_announced(
        &self,
        ctx: &C,
        fence: Fence,
        saga: &mut SagaRecord,
        update: InstanceUpdate,
        attempts: Vec<Attempt>,
        change: Option<&Lifecycle>,
    ) -> Result<(), JournalError> {
        let version = saga.version + 1;
        let outbox = change
            .map(|c| self.announced(ctx, saga, version, c))
            .unwrap_or_default();
        self.commit(fence, saga, update, attempts, outbox).await?;
        if let Some(change) = change {
            self.saga.hooks.committed(ctx, saga, change);
        }
        Ok(())
    }
}

/// The saga's outputs encoded for a write (once, from the record's map: no copy of it).
fn outputs_of(saga: &SagaRecord) -> Result<RawJson, JournalError> {
    RawJson::encode(&saga.outputs)
        .map_err(|e| JournalError::Corrupt(format!("saga {} outputs: {e}", saga.id)))
}

/// The span of a step: its attempts' downstream calls are its children, retries are events in
/// it, and it ends with the last attempt's number and outcome.
fn step_span<C>(step: &dyn Step<C>, saga: &SagaRecord) -> tracing::Span {
    tracing::info_span!(
        "saga_step",
        otel.name = step.name(),
        saga_kind = %saga.kind,
        delivery_id = %saga.id,
        step = step.name(),
        attempt = tracing::field::Empty,
        outcome = tracing::field::Empty,
    )
}

/// Runs attempt `attempt_no` of `step` in `span`.
async fn attempt<C>(
    step: &dyn Step<C>,
    ctx: &C,
    saga: &SagaRecord,
    span: &tracing::Span,
    attempt_no: i32,
) -> Result<Value, StepError> {
    let outcome = step.run(ctx, saga).instrument(span.clone()).await;
    record_attempt(span, attempt_no, outcome.as_ref().map(|_| ()));
    outcome
}

fn record_attempt(span: &tracing::Span, attempt_no: i32, outcome: Result<(), &StepError>) {
    span.record("attempt", attempt_no);
    span.record(
        "outcome",
        match outcome {
            Ok(()) => "succeeded",
            Err(StepError::Transient { .. }) => "transient",
            Err(StepError::Deferred { .. }) => DEFERRED,
            Err(_) => "permanent",
        },
    );
}

#[allow(clippy::too_many_arguments)]
fn attempt_row(
    saga_id: &str,
    index: i32,
    attempt_no: i32,
    step: &str,
    outcome: &str,
    error: Option<String>,
    started: DateTime<Utc>,
    finished: DateTime<Utc>,
) -> Attempt {
    Attempt {
        saga_id: saga_id.to_owned(),
        step_index: index,
        attempt: attempt_no,
        step: step.to_owned(),
        outcome: outcome.to_owned(),
        error,
        started_at: started,
        finished_at: finished,
    }
}

/// The seed of a step's back-off jitter: stable per saga and step (FNV-1a).
fn jitter_seed(id: &str, index: i32) -> u64 {
    id.bytes()
        .chain(index.to_le_bytes())
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
}
