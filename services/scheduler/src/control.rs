//! Steering a saga from outside, for the Supervisor: recording the outcome of its compensation,
//! and running a failed saga again from the step that failed.
//!
//! Both go through the engine, like every other write of saga state: on the replica that holds
//! the saga's partition (another one answers `421`), after taking the saga's entry so that no task
//! of this replica writes it at the same time, fenced by the lease epoch and the saga's version.

use std::sync::Arc;
use std::time::Duration;

use contracts::{Outcome, RequestState, SagaState};
use saga::{InstanceUpdate, JournalError, SagaRecord};

use crate::booking;
use crate::dispatch;
use crate::owner::Owner;
use crate::Core;

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
    Journal(JournalError),
    #[error("corrupt saga: {0}")]
    Corrupt(String),
}

async fn load(core: &Core, id: &str) -> Result<SagaRecord, ControlError> {
    core.store
        .load(id)
        .await
        .map_err(ControlError::Journal)?
        .ok_or_else(|| ControlError::NotFound(id.to_owned()))
}

fn state_of(saga: &SagaRecord) -> Result<SagaState, ControlError> {
    SagaState::parse(&saga.state)
        .ok_or_else(|| ControlError::Corrupt(format!("saga {} state {}", saga.id, saga.state)))
}

/// Takes the saga's entry on the replica holding its partition, waiting a little for a task that
/// is working on it.
async fn claim(core: &Core, saga: &SagaRecord) -> Result<Arc<Owner>, ControlError> {
    let partition = u32::try_from(saga.shard).unwrap_or(u32::MAX);
    for _ in 0..20 {
        let Some(owner) = core.owner(partition) else {
            return Err(ControlError::NotOwner {
                id: saga.id.clone(),
                partition: saga.shard,
            });
        };
        if owner.claim(&saga.id) {
            return Ok(owner);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Err(ControlError::Busy(saga.id.clone()))
}

/// Lets the entry go, recording any signal that arrived while it was held.
fn release(core: &Arc<Core>, owner: &Arc<Owner>, id: &str) {
    if !owner.release_if_idle(id) {
        tokio::spawn(dispatch::record_signals(
            core.clone(),
            owner.clone(),
            id.to_owned(),
        ));
    }
}

/// One fenced change with its lifecycle event; `Ok(None)` when the saga moved meanwhile.
async fn change(
    core: &Arc<Core>,
    saga: &SagaRecord,
    update: InstanceUpdate,
    event: RequestState,
    detail: Option<String>,
    wake: bool,
) -> Result<Option<SagaRecord>, ControlError> {
    let owner = claim(core, saga).await?;
    // Read again under the entry: what we decided on may have changed before we took it.
    let result = async {
        let mut current = load(core, &saga.id).await?;
        if current.version != saga.version {
            return Ok(None);
        }
        let mut next = current.clone();
        next.version += 1;
        if let Some(s) = &update.state {
            next.state = s.clone();
        }
        if let Some(e) = &update.error {
            next.error = e.clone();
        }
        let message = booking::state_event(&next, event, detail).ok_or_else(|| {
            ControlError::Corrupt(format!("saga {} input is not a booking", saga.id))
        })?;
        match core
            .engine
            .update(owner.fence(), &mut current, update, vec![message], wake)
            .await
        {
            Ok(()) => Ok(Some(current)),
            Err(JournalError::Refused(_)) => Ok(None),
            Err(e) => Err(ControlError::Journal(e)),
        }
    }
    .await;
    release(core, &owner, &saga.id);
    if wake {
        owner.timers.notify_one();
    }
    result
}

/// Records a compensation outcome. Reporting the state the saga is already in changes nothing.
pub async fn record_compensation(
    core: &Arc<Core>,
    id: &str,
    outcome: Outcome,
    detail: Option<String>,
) -> Result<SagaRecord, ControlError> {
    for _ in 0..5 {
        let saga = load(core, id).await?;
        let state = state_of(&saga)?;
        if state == outcome.state() {
            return Ok(saga);
        }
        if !outcome.allowed_from(state) {
            return Err(ControlError::Conflict {
                id: id.to_owned(),
                why: if state == SagaState::Compensated {
                    "it is compensated already"
                } else {
                    "only failed or cancelled sagas are compensated"
                },
                state: saga.state,
            });
        }
        let update = InstanceUpdate {
            state: Some(outcome.state().as_str().to_owned()),
            ..Default::default()
        };
        // The client keeps seeing why the booking stopped (a stable reason first), then what
        // the compensation did. A booking its client cancelled stays `cancelled` for the client
        // while it is undone: nothing failed (unless the undo needs a person).
        let why = saga.error.as_deref().map(booking::client_reason);
        let shown = match (why, &detail) {
            (Some(w), Some(d)) => Some(format!("{w}; {d}")),
            (Some(w), None) => Some(w),
            (None, d) => d.clone(),
        };
        let client_cancel = saga.error.as_deref() == Some(booking::CLIENT_CANCEL);
        let event = match outcome {
            Outcome::Compensating | Outcome::Compensated if client_cancel => {
                RequestState::Cancelled
            }
            _ => outcome.request_state(),
        };
        if let Some(saga) = change(core, &saga, update, event, shown, false).await? {
            tracing::info!(delivery_id = %id, state = %outcome.state(), version = saga.version, "compensation outcome recorded");
            return Ok(saga);
        }
    }
    Err(ControlError::Busy(id.to_owned()))
}

/// Runs a failed saga again from the step that failed, on the replica that owns its partition.
/// Returns once the saga is marked running again and due; a slot then runs it.
pub async fn retry(core: &Arc<Core>, id: &str, reason: &str) -> Result<SagaRecord, ControlError> {
    let saga = load(core, id).await?;
    if saga.state != saga::FAILED {
        return Err(ControlError::Conflict {
            id: id.to_owned(),
            why: "only a failed saga that is not being compensated can be retried",
            state: saga.state,
        });
    }
    let update = InstanceUpdate {
        state: Some(saga::RUNNING.to_owned()),
        error: Some(None),
        ..Default::default()
    };
    let detail = format!("retried: {reason}");
    let Some(running) = change(
        core,
        &saga,
        update,
        RequestState::Scheduling,
        Some(detail),
        true,
    )
    .await?
    else {
        return Err(ControlError::Busy(id.to_owned()));
    };
    tracing::info!(delivery_id = %id, step = running.next_step, reason, "saga retried");
    Ok(running)
}
