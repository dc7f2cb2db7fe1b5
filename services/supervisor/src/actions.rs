//! Operator actions (retry, compensate now, redrive) and the overview numbers, shared by the
//! dashboard and the JSON API. Every action is in the audit log before it takes effect: its row
//! is written first (outcome `pending`), the action runs only if that write succeeded, and the
//! outcome is filled in after.

use std::collections::BTreeMap;
use std::future::Future;

use chrono::{DateTime, Utc};
use contracts::{Outcome, WaitReason};
use serde::Serialize;
use service_kit::ApiError;
use utoipa::ToSchema;

use crate::audit::{self, Entry};
use crate::auth::USER_NAME_MAX_CHARS;
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

/// What the Scheduler is told about who asked and why: `<name> (<role>): <reason>`.
fn on_behalf(actor: &Actor<'_>, reason: &str) -> String {
    format!("{} ({}): {reason}", actor.name, actor.role)
}

/// Longest reason an operator may give (characters, after trimming): what the Scheduler accepts
/// ([`contracts::REASON_MAX_CHARS`]) less the longest [`on_behalf`] prefix, so an action never
/// fails with a `400` from the Scheduler.
pub const REASON_MAX_CHARS: usize =
    contracts::REASON_MAX_CHARS - USER_NAME_MAX_CHARS - " (operator): ".len();

/// Runs `work` only once its audit row is written; records how it went after. When the audit log
/// cannot be written the action is refused (`503 audit-unavailable`) and `work` never runs.
async fn audited(
    state: &AppState,
    actor: &Actor<'_>,
    action: &str,
    target: &str,
    reason: &str,
    work: impl Future<Output = anyhow::Result<Done>>,
) -> Result<Done, ApiError> {
    let entry = audit::record(
        &state.db,
        Entry {
            actor: actor.name,
            role: actor.role,
            action,
            target,
            reason,
            outcome: audit::PENDING,
        },
    )
    .await
    .map_err(|e| {
        tracing::error!(error = %e, action, target, "audit log not writable: action refused");
        ApiError::unavailable(
            "audit-unavailable",
            "the audit log cannot be written, so the action was not done; try again later",
            5,
        )
    })?;
    let done = work.await;
    let outcome = match &done {
        Ok(d) => d.message.clone(),
        Err(e) => format!("error: {e:#}"),
    };
    // The action has taken effect by now: a failure here leaves its row `pending`, which says
    // exactly that the outcome was not recorded; the person who asked still learns it.
    if let Err(e) = audit::finish(&state.db, entry, &outcome).await {
        tracing::error!(error = %e, action, target, outcome, "recording an action's outcome failed");
    }
    done.map_err(ApiError::Internal)
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
) -> Result<Done, ApiError> {
    let work = async {
        Ok::<Done, anyhow::Error>(match state.scheduler.workflow(id).await {
            Ok(w) => match state
                .scheduler
                .retry(id, w.partition, &on_behalf(actor, reason))
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
        })
    };
    audited(state, actor, "retry", id, reason, work).await
}

/// Queues a compensation of the steps the Scheduler shows as succeeded.
pub async fn compensate_now(
    state: &AppState,
    actor: &Actor<'_>,
    id: &str,
    reason: &str,
) -> Result<Done, ApiError> {
    let work = async {
        Ok::<Done, anyhow::Error>(match state.scheduler.workflow(id).await {
        // The states a compensation may claim: failed, cancelled, or a compensation not done.
        Ok(w) if !Outcome::Compensating.allowed_from(w.state) => {
            Done {
                ok: false,
                message: format!("refused: the saga is {}; only failed, cancelled or unfinished compensations are compensated", w.state),
            }
        }
        Ok(w) => {
            let why = on_behalf(actor, reason);
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
        })
    };
    audited(state, actor, "compensate", id, reason, work).await
}

/// Moves a parked compensation request back to the queue.
pub async fn redrive(
    state: &AppState,
    actor: &Actor<'_>,
    message_id: &str,
    reason: &str,
) -> Result<Done, ApiError> {
    audited(
        state,
        actor,
        "redrive",
        message_id,
        reason,
        redrive_now(state, actor, message_id),
    )
    .await
}

/// The redrive itself, run once its audit row is written: republishes the parked bytes to the
/// compensation queue (confirmed by the broker), then marks the row. Crashing in between leaves
/// the row listed, so at worst it is redriven twice; the compensation consumer finds a request
/// it has finished (keyed by deliveryId and saga version) done and does nothing more.
async fn redrive_now(
    state: &AppState,
    actor: &Actor<'_>,
    message_id: &str,
) -> anyhow::Result<Done> {
    let row = match crate::parked::waiting_by_message(&state.db, message_id).await {
        Ok(Some(row)) => row,
        Ok(None) => {
            return Ok(Done {
                ok: false,
                message: "no parked message with that id (redriven already?)".into(),
            })
        }
        Err(e) => {
            return Ok(Done {
                ok: false,
                message: format!("the supervisor database is unavailable, try again: {e}"),
            })
        }
    };
    if let Err(e) = state
        .queue
        .republish(&row.message_id, row.payload.clone())
        .await
    {
        return Ok(Done {
            ok: false,
            message: format!("the broker is unavailable, try again: {e}"),
        });
    }
    let done = match crate::parked::mark_redriven(&state.db, &row.park_id, actor.name).await {
        Ok(_) => {
            let n = state.metrics.parked.get();
            state.metrics.parked.set((n - 1).max(0));
            Done {
                ok: true,
                message: "redriven: back in the compensation queue".into(),
            }
        }
        // Republished all the same: it still shows as parked, and redriving it again is harmless.
        Err(e) => Done {
            ok: true,
            message: format!(
                "redriven: back in the compensation queue, but still listed as parked ({e})"
            ),
        },
    };
    Ok(done)
}

pub use crate::stall::PartitionView;

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
    /// Running sagas making progress; `null` until the Scheduler told.
    pub progressing: Option<i64>,
    /// Running sagas parked until a wake-up time (for a drone, a back-off); `null` until the
    /// Scheduler told.
    pub waiting: Option<i64>,
    /// Why they wait: by step and reason, largest group first.
    pub waiting_reasons: Vec<WaitReason>,
    /// When the Scheduler last told the waiting sagas.
    pub waiting_as_of: Option<DateTime<Utc>>,
    /// Why the waiting sagas may be out of date, if they may.
    pub waiting_error: Option<String>,
    /// Every partition of `delivery-requests`: lease, owner liveness, lag against the log's head.
    pub partitions: Vec<PartitionView>,
    /// Partitions flagged stalled.
    pub stalled_partitions: i64,
    /// The unstarted age above which a partition is flagged.
    pub stall_after_secs: u64,
    /// When the Scheduler last told the leases.
    pub leases_as_of: Option<DateTime<Utc>>,
    /// Why the partitions may be out of date or incomplete, if they may.
    pub partitions_error: Option<String>,
    pub at: DateTime<Utc>,
}

pub async fn overview(state: &AppState) -> anyhow::Result<Overview> {
    let states = readmodel::counts(&state.db).await?;
    let [accepted, scheduled, failed_rate] = state.rates.per_second();
    let get = |s: &str| states.get(s).copied().unwrap_or(0);
    let at = Utc::now();
    // From the partition watch, not from the Scheduler now: a stalled Scheduler would not answer.
    let seen = state.stall.seen(at);
    let stalled = seen.partitions.iter().filter(|p| p.stalled).count();
    let (progressing, waiting, waiting_reasons, waiting_as_of) = match seen.waiting {
        Some(w) => (Some(w.progressing), Some(w.waiting), w.reasons, Some(w.at)),
        None => (None, None, Vec::new(), None),
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
        progressing,
        waiting,
        waiting_reasons,
        waiting_as_of,
        waiting_error: seen.waiting_error,
        partitions: seen.partitions,
        stalled_partitions: i64::try_from(stalled).unwrap_or(i64::MAX),
        stall_after_secs: state.settings.stall_after_secs,
        leases_as_of: seen.leases_as_of,
        partitions_error: seen.partitions_error,
        at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scheduler_accepts(reason: &str) -> bool {
        let body = serde_json::json!({ "reason": reason }).to_string();
        service_kit::parse_json::<contracts::RetryRequest>(body.as_bytes()).is_ok()
            && service_kit::parse_json::<contracts::CompensationReport>(
                serde_json::json!({ "state": "compensating", "detail": reason })
                    .to_string()
                    .as_bytes(),
            )
            .is_ok()
    }

    #[test]
    fn the_longest_reason_of_the_longest_name_fits_the_scheduler() {
        let name = "n".repeat(USER_NAME_MAX_CHARS);
        let actor = Actor {
            name: &name,
            role: "operator",
        };
        // Multi-byte characters: the limits count characters, not bytes.
        let longest = "é".repeat(REASON_MAX_CHARS);
        assert!(scheduler_accepts(&on_behalf(&actor, &longest)));
        let over = "é".repeat(contracts::REASON_MAX_CHARS + 1);
        assert!(!scheduler_accepts(&on_behalf(&actor, &over)));
    }
}
