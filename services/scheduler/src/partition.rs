//! One task per owned partition: take the lease, resume the sagas the previous owner left running,
//! read the partition from its checkpoint, start a saga per booking,
//! hand cancels and reschedules to their sagas as signals, wake parked sagas, and move the
//! checkpoint to the first position not yet durably recorded.
//!
//! The loop itself never waits for a saga slot: when every slot is busy it stops reading the log
//! (backpressure) but keeps renewing its lease, moving its checkpoint and watching for shutdown.
//! Every write is fenced by the lease's epoch; a refused write ends the ownership.

use std::sync::Arc;
use std::time::Duration;

use contracts::{DeliveryRequested, DELIVERY_CANCELLED, DELIVERY_REQUESTED, DELIVERY_RESCHEDULED};
use messaging::{LogRecord, StartAt};
use saga::{JournalError, Lease, Position, Signal};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::booking::{self, BookingInput};
use crate::dispatch::{self, Origin};
use crate::owner::{Offered, Owner};
use crate::Core;

enum Exit {
    Stopped,
    LeaseLost,
}

fn shard_of(partition: u32) -> i32 {
    i32::try_from(partition).unwrap_or(i32::MAX)
}

/// Owns `partition` whenever it can until `stop` turns true.
pub async fn run_partition(core: Arc<Core>, partition: u32, mut stop: watch::Receiver<bool>) {
    let ttl =
        chrono::Duration::milliseconds(i64::try_from(core.settings.lease_ttl_ms).unwrap_or(10_000));
    let label = partition.to_string();
    loop {
        let lease = loop {
            if *stop.borrow() {
                return;
            }
            let now = core.engine.clock().now();
            match core
                .store
                .acquire(shard_of(partition), &core.instance, now, ttl)
                .await
            {
                Ok(Some(l)) => break l,
                Ok(None) => {}
                Err(e) => tracing::warn!(partition, error = %e, "lease acquisition failed"),
            }
            let wait = Duration::from_millis(core.settings.lease_ttl_ms / 4);
            tokio::select! {
                biased;
                _ = stop.changed() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        };
        tracing::info!(
            partition,
            epoch = lease.epoch,
            offset = lease.checkpoint.offset,
            index = lease.checkpoint.index,
            "partition lease taken"
        );
        core.ctx.metrics.owned.with_label_values(&[&label]).set(1);
        let owner = Arc::new(Owner::new(partition, lease));
        core.hold(partition, owner.clone());
        let exit = own(&core, &owner, &mut stop).await;
        core.let_go(partition, &owner);
        core.ctx.metrics.owned.with_label_values(&[&label]).set(0);
        let _ = core.store.release(&lease, core.engine.clock().now()).await;
        match exit {
            Exit::Stopped => {
                tracing::info!(partition, "partition released");
                return;
            }
            Exit::LeaseLost => {
                tracing::warn!(partition, "partition lease lost; stopped processing it");
            }
        }
    }
}

async fn own(core: &Arc<Core>, owner: &Arc<Owner>, stop: &mut watch::Receiver<bool>) -> Exit {
    let partition = owner.partition;
    let lease: Lease = owner.lease;
    let label = partition.to_string();
    let ttl =
        chrono::Duration::milliseconds(i64::try_from(core.settings.lease_ttl_ms).unwrap_or(10_000));
    // Every task of this ownership lives in here: dropping it (any exit) stops them all.
    let mut tasks: JoinSet<()> = JoinSet::new();

    // Sagas the previous owner left running continue from their journal, as slots free up.
    match core.store.orphans(booking::KIND, lease.shard).await {
        Ok(rows) => {
            if !rows.is_empty() {
                tracing::info!(partition, sagas = rows.len(), "resuming unfinished sagas");
            }
            for r in rows {
                if owner.claim(&r.id) {
                    owner.queue(r, false);
                }
            }
        }
        Err(e) => {
            tracing::warn!(partition, error = %e, "cannot list unfinished sagas");
            return Exit::LeaseLost;
        }
    }

    let start = if lease.checkpoint == Position::default() {
        StartAt::First
    } else {
        StartAt::Offset(lease.checkpoint.offset)
    };
    let mut reader = match core.log.read(partition, start).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(partition, error = %e, "cannot read the partition");
            tokio::time::sleep(Duration::from_secs(1)).await;
            return Exit::LeaseLost;
        }
    };
    let mut saved = lease.checkpoint;
    let mut checkpoint_tick =
        tokio::time::interval(Duration::from_millis(core.settings.checkpoint_interval_ms));
    let mut renew_tick =
        tokio::time::interval(Duration::from_millis(core.settings.lease_ttl_ms / 3));
    let mut dispatch_tick =
        tokio::time::interval(Duration::from_millis(core.settings.dispatch_interval_ms));
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => {
                let next = owner.tracker().checkpoint(saved);
                let _ = core.store.checkpoint(&lease, next).await;
                return Exit::Stopped;
            }
            _ = owner.lost_notify.notified() => return Exit::LeaseLost,
            _ = renew_tick.tick() => {
                match core.store.renew(&lease, core.engine.clock().now(), ttl).await {
                    Ok(true) => {}
                    Ok(false) => return Exit::LeaseLost,
                    Err(e) => tracing::warn!(partition, error = %e, "lease renewal failed"),
                }
            }
            _ = checkpoint_tick.tick() => {
                let next = owner.tracker().checkpoint(saved);
                if next != saved {
                    match core.store.checkpoint(&lease, next).await {
                        Ok(true) => {
                            saved = next;
                            core.ctx.metrics.checkpoint.with_label_values(&[&label]).set(i64::try_from(next.offset).unwrap_or(i64::MAX));
                        }
                        Ok(false) => return Exit::LeaseLost,
                        Err(e) => tracing::warn!(partition, error = %e, "checkpoint write failed"),
                    }
                }
                while tasks.try_join_next().is_some() {}
            }
            _ = owner.ended.notified() => dispatch::dispatch(core, owner, &mut tasks, false).await,
            // Timers: on the tick, and at once when this replica made a saga due (a signal, a retry).
            _ = owner.timers.notified() => dispatch::dispatch(core, owner, &mut tasks, true).await,
            _ = dispatch_tick.tick() => dispatch::dispatch(core, owner, &mut tasks, true).await,
            // Backpressure: no free slot, no reading (the loop goes on renewing and stopping).
            record = reader.next(), if core.permits.available_permits() > 0 => {
                let Some(record) = record else {
                    tracing::warn!(partition, "log reader closed");
                    return Exit::LeaseLost;
                };
                core.ctx.metrics.read_offset.with_label_values(&[&label]).set(i64::try_from(record.position.offset).unwrap_or(i64::MAX));
                handle(core, owner, &mut tasks, record);
            }
        }
    }
}

/// Handles one record without waiting for anything: a booking's start and a signal's recording
/// run as tasks, and the tracker holds the checkpoint until they are durable.
fn handle(core: &Arc<Core>, owner: &Arc<Owner>, tasks: &mut JoinSet<()>, record: LogRecord) {
    let at = Position {
        offset: record.position.offset,
        index: record.position.index,
    };
    if at < owner.lease.checkpoint {
        return; // recorded before the checkpoint was written
    }
    let event = match record.event {
        Ok(e) => {
            let lag = (core.engine.clock().now() - e.time).num_milliseconds() as f64 / 1000.0;
            core.ctx
                .metrics
                .lag_seconds
                .with_label_values(&[&record.partition.to_string()])
                .set(lag.max(0.0));
            e
        }
        Err(poison) => {
            tracing::error!(partition = record.partition, offset = at.offset, index = at.index, reason = %poison.reason, "skipping poison record");
            owner.tracker().seen(at);
            return;
        }
    };
    match event.kind.as_str() {
        DELIVERY_REQUESTED => {
            let request: DeliveryRequested = match event.decode() {
                Ok(r) => r,
                Err(reason) => {
                    tracing::error!(
                        offset = at.offset,
                        index = at.index,
                        reason,
                        "skipping undecodable booking"
                    );
                    owner.tracker().seen(at);
                    return;
                }
            };
            owner.tracker().begin(at);
            let id = request.delivery_id.to_string();
            // Claimed before anything is written, so a cancel right behind it in the log finds
            // this task and waits in its slot.
            let claimed = owner.claim(&id);
            let permit = core.permits.clone().try_acquire_owned().ok();
            let traceparent = event.headers.get(telemetry::TRACEPARENT).cloned();
            let span = dispatch::saga_span(&id, owner.partition, traceparent.as_deref());
            let (core, owner) = (core.clone(), owner.clone());
            tasks.spawn(
                booking::with_booking_memo(async move {
                    let deadline = Some(request.pickup_time);
                    // The steps read the booking as it is here, not decoded from the JSON.
                    let booking = Arc::new(BookingInput {
                        request,
                        traceparent,
                        revision: 0,
                    });
                    BookingInput::remember(&id, &booking);
                    let mut failures = 0u32;
                    // Until the start is durable the checkpoint does not pass this record. The
                    // account check (a read) runs first and is written with the start.
                    let started = loop {
                        // Encoded for each try (a retry is rare; a copy kept for it is not).
                        let input = match serde_json::to_value(&*booking) {
                            Ok(v) => v,
                            Err(e) => {
                                tracing::error!(delivery_id = %id, error = %e, "cannot encode a booking");
                                owner.tracker().end(at);
                                return;
                            }
                        };
                        match core
                            .engine
                            .start_checked(&core.ctx, owner.fence(), &id, input, deadline)
                            .await
                        {
                            Ok(r) => break r,
                            Err(JournalError::Refused(why)) => {
                                tracing::warn!(delivery_id = %id, why, "saga start refused; letting the partition go");
                                owner.lose();
                                return;
                            }
                            Err(e) => {
                                failures += 1;
                                tracing::warn!(delivery_id = %id, error = %e, "recording a saga start failed; retrying");
                                core.engine
                                    .clock()
                                    .sleep(Duration::from_millis(50 * 2u64.pow(failures.min(7))))
                                    .await;
                                if owner.is_lost() {
                                    return;
                                }
                            }
                        }
                    };
                    owner.tracker().end(at);
                    if !claimed {
                        return; // another task of this process works on the saga already
                    }
                    match (started, permit) {
                        (Some(record), Some(permit)) => {
                            core.ctx.metrics.started();
                            dispatch::drive(&core, &owner, record, Origin::Fresh).await;
                            drop(permit);
                            owner.ended.notify_one();
                        }
                        (Some(record), None) => {
                            core.ctx.metrics.started();
                            owner.queue(record, true);
                        }
                        // A replay of a booking whose saga exists: record any signal that came
                        // meanwhile, and let the entry go.
                        (None, permit) => {
                            drop(permit);
                            dispatch::record_signals(core.clone(), owner.clone(), id).await;
                        }
                    }
                })
                .instrument(span),
            );
        }
        DELIVERY_CANCELLED | DELIVERY_RESCHEDULED => {
            owner.tracker().begin(at);
            let id = event.key.clone();
            let signal = Signal {
                kind: event.kind.clone(),
                payload: event.body.clone(),
                at: event.time,
                position: Some(at),
            };
            if let Offered::Claimed = owner.offer(&id, signal) {
                let span = tracing::info_span!(
                    "saga_change",
                    otel.name = %event.kind,
                    service = "scheduler",
                    delivery_id = %id,
                    partition = owner.partition,
                );
                telemetry::set_parent(&span, &event.headers);
                tasks.spawn(
                    dispatch::record_signals(core.clone(), owner.clone(), id).instrument(span),
                );
            }
        }
        other => {
            tracing::debug!(kind = other, "ignoring event");
            owner.tracker().seen(at);
        }
    }
}
