//! Operator actions (retry, compensate now, redrive) and the overview numbers, shared by the
//! dashboard and the JSON API. Every action is written to the audit log with its outcome.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use contracts::Outcome;
use serde::Serialize;
use utoipa::ToSchema;

use crate::audit::{self, Entry};
use crate::compensation;
use crate::scheduler_client::SchedulerError;
use crate::{readmodel, AppState};

/// Who acts.
pub struct Actor<'a> {
    pub name: &'a str,
    pub role: &'a str,
}

/// How an action went, for the person who asked.
pub struct Done {
    pub ok: bool,
    pub message: String,
}

async fn audited(
    state: &AppState,
    actor: &Actor<'_>,
    action: &str,
    target: &str,
    reason: &str,
    done: Done,
) -> anyhow::Result<Done> {
    audit::record(
        &state.db,
        Entry {
            actor: actor.name,
            role: actor.role,
            action,
            target,
            reason,
            outcome: &done.message,
        },
    )
    .await?;
    Ok(done)
}

fn scheduler_says(e: &SchedulerError) -> String {
    match e {
        SchedulerError::NotFound(_) => "the scheduler does not know this saga".into(),
        SchedulerError::Conflict(d) => format!("refused: {d}"),
        SchedulerError::Misdirected(d) => format!("refused by this scheduler instance: {d}"),
        SchedulerError::Transient(d) => format!("the scheduler is unavailable, try again: {d}"),
        SchedulerError::Permanent(d) => format!("failed: {d}"),
    }
}

/// Runs a failed saga again from its failed step.
pub async fn retry(
    state: &AppState,
    actor: &Actor<'_>,
    id: &str,
    reason: &str,
) -> anyhow::Result<Done> {
    let done = match state.scheduler.workflow(id).await {
        Ok(w) => match state
            .scheduler
            .retry(
                id,
                w.partition,
                &format!("{} ({}): {reason}", actor.name, actor.role),
            )
            .await
        {
            Ok(s) => Done {
                ok: true,
                message: format!("running again from step {}", s.next_step + 1),
            },
            Err(e) => Done {
                ok: false,
                message: scheduler_says(&e),
            },
        },
        Err(e) => Done {
            ok: false,
            message: scheduler_says(&e),
        },
    };
    audited(state, actor, "retry", id, reason, done).await
}

/// Queues a compensation of the steps the Scheduler shows as succeeded.
pub async fn compensate_now(
    state: &AppState,
    actor: &Actor<'_>,
    id: &str,
    reason: &str,
) -> anyhow::Result<Done> {
    let done = match state.scheduler.workflow(id).await {
        // The states a compensation may claim: failed, cancelled, or a compensation not done.
        Ok(w) if !Outcome::Compensating.allowed_from(w.state) => {
            Done {
                ok: false,
                message: format!("refused: the saga is {}; only failed, cancelled or unfinished compensations are compensated", w.state),
            }
        }
        Ok(w) => {
            let why = format!("{} ({}): {reason}", actor.name, actor.role);
            match compensation::request_for(&w, &why) {
                Some(request) => {
                    compensation::enqueue(state.queue.as_ref(), &request, actor.name).await?;
                    Done {
                        ok: true,
                        message: if request.succeeded_steps.is_empty() {
                            "compensation queued (nothing to undo)".to_owned()
                        } else {
                            format!(
                                "compensation queued: undo {}",
                                request.succeeded_steps.join(", ")
                            )
                        },
                    }
                }
                None => Done {
                    ok: false,
                    message: "failed: the saga's input is not a booking".into(),
                },
            }
        }
        Err(e) => Done {
            ok: false,
            message: scheduler_says(&e),
        },
    };
    audited(state, actor, "compensate", id, reason, done).await
}

/// Moves a parked compensation request back to the queue.
pub async fn redrive(
    state: &AppState,
    actor: &Actor<'_>,
    message_id: &str,
    reason: &str,
) -> anyhow::Result<Done> {
    let done = match state.queue.redrive(message_id).await {
        Ok(true) => {
            let n = state.metrics.parked.get();
            state.metrics.parked.set((n - 1).max(0));
            Done {
                ok: true,
                message: "redriven: back in the compensation queue".into(),
            }
        }
        Ok(false) => Done {
            ok: false,
            message: "no parked message with that id (redriven already?)".into(),
        },
        Err(e) => Done {
            ok: false,
            message: format!("the broker is unavailable, try again: {e}"),
        },
    };
    audited(state, actor, "redrive", message_id, reason, done).await
}

/// A partition as the overview shows it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PartitionView {
    pub partition: i32,
    pub owner: String,
    pub checkpoint: i64,
    /// Age of the last record the owner read (seconds), when the Scheduler reports it.
    pub lag_seconds: Option<f64>,
}

/// The live counters.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Overview {
    /// Sagas started per second (bookings accepted by the Scheduler), last 10 s.
    pub accepted_per_second: f64,
    pub scheduled_per_second: f64,
    pub failed_per_second: f64,
    /// Sagas by state.
    pub states: BTreeMap<String, i64>,
    pub failed: i64,
    pub compensating: i64,
    pub compensated: i64,
    pub compensation_failed: i64,
    pub parked: i64,
    pub stuck: i64,
    pub partitions: Vec<PartitionView>,
    /// Why the partitions are missing, if they are.
    pub partitions_error: Option<String>,
    pub at: DateTime<Utc>,
}

pub async fn overview(state: &AppState) -> anyhow::Result<Overview> {
    let states = readmodel::counts(&state.db).await?;
    let [accepted, scheduled, failed_rate] = state.rates.per_second();
    let get = |s: &str| states.get(s).copied().unwrap_or(0);
    let (partitions, partitions_error) = match state.scheduler.partitions().await {
        Ok(leases) => {
            let lag = state.scheduler.lag_seconds().await.unwrap_or_default();
            let mut v: Vec<PartitionView> = leases
                .into_iter()
                .map(|l| PartitionView {
                    lag_seconds: u32::try_from(l.partition)
                        .ok()
                        .and_then(|p| lag.get(&p).copied()),
                    partition: l.partition,
                    owner: l.owner,
                    checkpoint: l.next_offset,
                })
                .collect();
            v.sort_by_key(|p| p.partition);
            (v, None)
        }
        Err(e) => (Vec::new(), Some(e.to_string())),
    };
    Ok(Overview {
        accepted_per_second: accepted,
        scheduled_per_second: scheduled,
        failed_per_second: failed_rate,
        failed: get("failed"),
        compensating: get("compensating"),
        compensated: get("compensated"),
        compensation_failed: get("compensation-failed"),
        parked: state.metrics.parked.get(),
        stuck: state.metrics.stuck.get(),
        states,
        partitions,
        partitions_error,
        at: Utc::now(),
    })
}
