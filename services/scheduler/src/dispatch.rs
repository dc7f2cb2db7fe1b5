//! Running sagas on this replica's slots: a task per saga that drives it through the engine until
//! it finishes or parks, the dispatcher that gives free slots to queued and due sagas (durable
//! timers), and the writer that records signals for sagas no task is working on.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use saga::{Inbox, JournalError, SagaRecord, Signal, Started};
use serde_json::Value;
use tokio::sync::OwnedSemaphorePermit;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::owner::Owner;
use crate::Core;

/// How a task came to run a saga.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Just started from the log: its journal has no attempts yet.
    Fresh,
    /// Resumed after a takeover or queued for a slot.
    Resumed,
    /// Its timer was due.
    Timer,
}

/// The span a booking's saga runs in: a child of the trace context the booking carried.
pub fn saga_span(delivery_id: &str, partition: u32, traceparent: Option<&str>) -> tracing::Span {
    let span = tracing::info_span!(
        "saga",
        otel.name = "booking saga",
        service = "scheduler",
        delivery_id,
        partition,
    );
    if let Some(tp) = traceparent {
        let mut headers = std::collections::BTreeMap::new();
        headers.insert(telemetry::TRACEPARENT.to_owned(), tp.to_owned());
        telemetry::set_parent(&span, &headers);
    }
    span
}

fn span_of(record: &SagaRecord, partition: u32) -> tracing::Span {
    // Only the trace context: the booking itself is read by the steps.
    let tp = record.input.get("traceparent").and_then(Value::as_str);
    saga_span(&record.id, partition, tp)
}

/// Runs a claimed saga on a slot, in the partition's task set.
pub fn spawn_saga(
    core: &Arc<Core>,
    owner: &Arc<Owner>,
    tasks: &mut JoinSet<()>,
    saga: impl Into<Started>,
    permit: OwnedSemaphorePermit,
    origin: Origin,
) {
    let saga = saga.into();
    let span = span_of(&saga.record, owner.partition);
    let (core, owner) = (core.clone(), owner.clone());
    tasks.spawn(
        crate::booking::with_booking_memo(async move {
            drive(&core, &owner, saga, origin).await;
            if origin == Origin::Timer {
                owner.from_timer.fetch_sub(1, Ordering::SeqCst);
            }
            drop(permit);
            owner.ended.notify_one();
        })
        .instrument(span),
    );
}

/// Drives the saga until it finishes or parks, then releases its entry (or goes on with the
/// signals that arrived meanwhile).
pub async fn drive(core: &Arc<Core>, owner: &Arc<Owner>, saga: Started, origin: Origin) {
    let fence = owner.fence();
    let id = saga.record.id.clone();
    // What the next run starts from: the saga as just started, or as the journal has it (never a
    // copy kept from before a run: after an error the journal is read again).
    let mut next = if origin == Origin::Fresh {
        Next::Started(saga)
    } else {
        Next::Record(saga.record)
    };
    let mut failures = 0u32;
    loop {
        let run = match next {
            Next::Started(started) => {
                core.engine
                    .run_started(&core.ctx, fence, started, owner.as_ref())
                    .await
            }
            Next::Record(record) => {
                core.engine
                    .run(&core.ctx, fence, record, owner.as_ref())
                    .await
            }
        };
        match run {
            Ok(done) => {
                if done.is_finished() {
                    finished(&id, &done.state);
                }
                if owner.release_if_idle(&id) {
                    return;
                }
                // A signal arrived after the engine's last look (say, during the last step): go
                // on, the engine applies it first.
                next = Next::Record(done);
            }
            Err(JournalError::Refused(why)) => {
                tracing::warn!(delivery_id = %id, why, partition = owner.partition, "saga write refused; letting the partition go");
                owner.lose();
                return;
            }
            Err(e) => {
                tracing::error!(delivery_id = %id, error = %e, "saga stopped on a journal error; resuming it from the journal");
                next = loop {
                    failures += 1;
                    let wait = Duration::from_millis(100 * 2u64.pow(failures.min(6)));
                    core.engine.clock().sleep(wait).await;
                    if owner.is_lost() {
                        return;
                    }
                    match core.store.load(&id).await {
                        Ok(Some(r)) => break Next::Record(r),
                        Ok(None) => {
                            owner.finish(&id);
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(delivery_id = %id, error = %e, ?wait, "cannot reload the saga; trying again");
                        }
                    }
                };
            }
        }
    }
}

enum Next {
    Started(Started),
    Record(SagaRecord),
}

/// A finished saga in the log: at INFO when it did not complete (an operator may want to look),
/// at DEBUG when it did (thousands a second; the journal, the metrics and the workflow event
/// record each one already).
fn finished(id: &str, state: &str) {
    if state == saga::COMPLETED {
        tracing::debug!(delivery_id = %id, state, "saga finished");
    } else {
        tracing::info!(delivery_id = %id, state, "saga finished");
    }
}

/// Records the signals waiting in a claimed saga's slot, until none is left, then releases the
/// entry. The saga becomes due, so a slot runs it and it applies them.
pub async fn record_signals(core: Arc<Core>, owner: Arc<Owner>, id: String) {
    let fence = owner.fence();
    let mut failures = 0u32;
    let mut pending: Vec<Signal> = Vec::new();
    loop {
        if pending.is_empty() {
            match owner.finish(&id) {
                None => return,
                Some(s) => pending = s,
            }
        }
        let outcome = match core.store.load(&id).await {
            Ok(Some(mut saga)) => core
                .engine
                .signal(fence, &mut saga, pending.clone())
                .await
                .map(|()| true),
            Ok(None) => Ok(false),
            Err(e) => Err(e),
        };
        match outcome {
            Ok(found) => {
                if !found {
                    tracing::warn!(delivery_id = %id, signals = pending.len(), "signal for an unknown booking; ignored");
                }
                owner.recorded(&pending);
                pending.clear();
                failures = 0;
                owner.timers.notify_one();
            }
            Err(JournalError::Refused(why)) => {
                tracing::warn!(delivery_id = %id, why, "signal write refused; letting the partition go");
                owner.lose();
                return;
            }
            Err(e) => {
                failures += 1;
                tracing::warn!(delivery_id = %id, error = %e, "recording a signal failed; retrying");
                core.engine
                    .clock()
                    .sleep(Duration::from_millis(100 * 2u64.pow(failures.min(6))))
                    .await;
                if owner.is_lost() {
                    return;
                }
            }
        }
    }
}

/// Gives free slots to queued sagas, then (with `timers`: on the dispatch tick, not at every
/// saga's end) to sagas whose timer is due.
pub async fn dispatch(core: &Arc<Core>, owner: &Arc<Owner>, tasks: &mut JoinSet<()>, timers: bool) {
    while owner.queued() > 0 {
        let Ok(permit) = core.permits.clone().try_acquire_owned() else {
            return;
        };
        let Some((record, fresh)) = owner.dequeue() else {
            break;
        };
        let origin = if fresh {
            Origin::Fresh
        } else {
            Origin::Resumed
        };
        spawn_saga(core, owner, tasks, record, permit, origin);
    }
    let free = core.permits.available_permits();
    if free == 0 || !timers {
        return;
    }
    // A saga dispatched from its timer looks due until its first write: ask for that many more.
    let limit = free + owner.from_timer.load(Ordering::SeqCst);
    let now = core.engine.clock().now();
    let due = match core
        .store
        .due(
            i32::try_from(owner.partition).unwrap_or(i32::MAX),
            now,
            limit,
        )
        .await
    {
        Ok(due) => due,
        Err(e) => {
            tracing::warn!(partition = owner.partition, error = %e, "cannot read due sagas");
            return;
        }
    };
    for record in due {
        if !owner.claim(&record.id) {
            continue;
        }
        let Ok(permit) = core.permits.clone().try_acquire_owned() else {
            owner.queue(record, false);
            continue;
        };
        owner.from_timer.fetch_add(1, Ordering::SeqCst);
        spawn_saga(core, owner, tasks, record, permit, Origin::Timer);
    }
}
