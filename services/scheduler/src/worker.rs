//! One task per owned partition: take the lease, resume the partition's unfinished sagas, read
//! the partition from its checkpoint, start a saga per booking (bounded concurrency), apply cancels
//! and reschedules in log order, and move the checkpoint to the highest offset below which every
//! record is durably recorded — fenced by the lease, so an owner that lost it stops.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::Instrument;

use contracts::{
    DeliveryCancelled, DeliveryRequested, DeliveryRescheduled, RequestState, DELIVERY_CANCELLED,
    DELIVERY_REQUESTED, DELIVERY_RESCHEDULED,
};
use messaging::{LogRecord, PartitionedLog, StartAt};
use saga::{Engine, InstanceUpdate, SagaRecord};
use sea_orm::DatabaseConnection;
use serde_json::Value;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::booking::{self, Ctx};
use crate::ownership::{self, Held};
use crate::SchedulerSettings;

pub struct Shared {
    pub engine: Arc<Engine<Ctx>>,
    pub ctx: Arc<Ctx>,
    pub db: DatabaseConnection,
    pub log: Arc<dyn PartitionedLog>,
    pub settings: SchedulerSettings,
    pub instance: String,
    pub permits: Arc<Semaphore>,
}

/// Offsets whose records are not yet durably recorded.
#[derive(Default)]
struct Tracker {
    pending: BTreeMap<u64, u32>,
    next_after_seen: Option<u64>,
}

impl Tracker {
    fn seen(&mut self, offset: u64) {
        self.next_after_seen = Some(
            self.next_after_seen
                .map_or(offset + 1, |n| n.max(offset + 1)),
        );
    }
    fn begin(&mut self, offset: u64) {
        self.seen(offset);
        *self.pending.entry(offset).or_default() += 1;
    }
    fn end(&mut self, offset: u64) {
        if let Some(n) = self.pending.get_mut(&offset) {
            *n -= 1;
            if *n == 0 {
                self.pending.remove(&offset);
            }
        }
    }
    /// Where reading would resume: the first offset with unrecorded records, else after the last seen.
    fn checkpoint(&self, start: u64) -> u64 {
        self.pending
            .keys()
            .next()
            .copied()
            .or(self.next_after_seen)
            .unwrap_or(start)
    }
    fn pending_below(&self, offset: u64) -> bool {
        self.pending
            .keys()
            .next()
            .is_some_and(|first| *first < offset)
    }
}

enum Exit {
    Stopped,
    LeaseLost,
}

/// Owns `partition` whenever it can until `stop` turns true.
pub async fn run_partition(shared: Arc<Shared>, partition: u32, mut stop: watch::Receiver<bool>) {
    let ttl = chrono::Duration::milliseconds(
        i64::try_from(shared.settings.lease_ttl_ms).unwrap_or(10_000),
    );
    let label = partition.to_string();
    loop {
        let held = loop {
            if *stop.borrow() {
                return;
            }
            match ownership::acquire(
                &shared.db,
                partition,
                &shared.instance,
                chrono::Utc::now(),
                ttl,
            )
            .await
            {
                Ok(Some(h)) => break h,
                Ok(None) => {}
                Err(e) => tracing::warn!(partition, error = %e, "lease acquisition failed"),
            }
            let wait = Duration::from_millis(shared.settings.lease_ttl_ms / 4);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => {}
            }
        };
        tracing::info!(
            partition,
            token = held.token,
            next_offset = held.next_offset,
            "partition lease taken"
        );
        shared.ctx.metrics.owned.with_label_values(&[&label]).set(1);
        let exit = own(&shared, held, &mut stop).await;
        shared.ctx.metrics.owned.with_label_values(&[&label]).set(0);
        match exit {
            Exit::Stopped => {
                let _ = ownership::release(&shared.db, &held, chrono::Utc::now()).await;
                tracing::info!(partition, "partition released");
                return;
            }
            Exit::LeaseLost => {
                tracing::warn!(partition, "partition lease lost; stopped processing it")
            }
        }
    }
}

async fn own(shared: &Arc<Shared>, held: Held, stop: &mut watch::Receiver<bool>) -> Exit {
    let partition = held.partition;
    let label = partition.to_string();
    let ttl = chrono::Duration::milliseconds(
        i64::try_from(shared.settings.lease_ttl_ms).unwrap_or(10_000),
    );
    let mut sagas = JoinSet::new();
    let tracker = Arc::new(Mutex::new(Tracker::default()));

    // Sagas this partition left unfinished (a crash, a lost lease) continue from their journal.
    let shard = i32::try_from(partition).unwrap_or(i32::MAX);
    match shared
        .engine
        .journal()
        .unfinished(booking::KIND, &[shard])
        .await
    {
        Ok(rows) => {
            if !rows.is_empty() {
                tracing::info!(partition, sagas = rows.len(), "resuming unfinished sagas");
            }
            for row in rows {
                match SagaRecord::from_row(row) {
                    Ok(record) => {
                        let Ok(permit) = shared.permits.clone().acquire_owned().await else {
                            return Exit::Stopped;
                        };
                        let s = shared.clone();
                        let span = resumed_saga_span(&record, partition);
                        sagas.spawn(
                            async move {
                                run_saga(&s, record, false).await;
                                drop(permit);
                            }
                            .instrument(span),
                        );
                    }
                    Err(e) => tracing::error!(partition, error = %e, "cannot resume a saga"),
                }
            }
        }
        Err(e) => {
            tracing::warn!(partition, error = %e, "cannot list unfinished sagas");
            return Exit::LeaseLost;
        }
    }

    let start = if held.next_offset == 0 {
        StartAt::First
    } else {
        StartAt::Offset(held.next_offset)
    };
    let mut reader = match shared.log.read(partition, start).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(partition, error = %e, "cannot read the partition");
            tokio::time::sleep(Duration::from_secs(1)).await;
            return Exit::LeaseLost;
        }
    };
    let mut saved = held.next_offset;
    let mut checkpoint_tick = tokio::time::interval(Duration::from_millis(
        shared.settings.checkpoint_interval_ms,
    ));
    let mut renew_tick =
        tokio::time::interval(Duration::from_millis(shared.settings.lease_ttl_ms / 3));
    loop {
        tokio::select! {
            _ = stop.changed() => {
                let next = lock(&tracker).checkpoint(saved);
                let _ = ownership::checkpoint(&shared.db, &held, next).await;
                return Exit::Stopped;
            }
            _ = renew_tick.tick() => {
                match ownership::renew(&shared.db, &held, chrono::Utc::now(), ttl).await {
                    Ok(true) => {}
                    Ok(false) => return Exit::LeaseLost,
                    Err(e) => tracing::warn!(partition, error = %e, "lease renewal failed"),
                }
            }
            _ = checkpoint_tick.tick() => {
                let next = lock(&tracker).checkpoint(saved);
                if next != saved {
                    match ownership::checkpoint(&shared.db, &held, next).await {
                        Ok(true) => {
                            saved = next;
                            shared.ctx.metrics.checkpoint.with_label_values(&[&label]).set(i64::try_from(next).unwrap_or(i64::MAX));
                        }
                        Ok(false) => return Exit::LeaseLost,
                        Err(e) => tracing::warn!(partition, error = %e, "checkpoint write failed"),
                    }
                }
                // Reap finished saga tasks.
                while sagas.try_join_next().is_some() {}
            }
            record = reader.next() => {
                let Some(record) = record else {
                    tracing::warn!(partition, "log reader closed");
                    return Exit::LeaseLost;
                };
                shared.ctx.metrics.read_offset.with_label_values(&[&label]).set(i64::try_from(record.position.offset).unwrap_or(i64::MAX));
                if !handle(shared, &tracker, &mut sagas, record).await {
                    return Exit::Stopped;
                }
            }
        }
    }
}

/// Where a saga keeps its booking's `traceparent` in its input.
pub(crate) const TRACEPARENT_KEY: &str = "traceparent";

/// The trace id kept in a saga's input (`00-<trace id>-<span id>-<flags>`).
pub(crate) fn trace_id_of(input: &serde_json::Value) -> Option<String> {
    let tp = input.get(TRACEPARENT_KEY)?.as_str()?;
    let id = tp.split('-').nth(1)?;
    (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_owned())
}

/// The span a booking's saga runs in: a child of the trace context the booking event carried.
fn saga_span(
    delivery_id: &str,
    partition: u32,
    headers: &std::collections::BTreeMap<String, String>,
) -> tracing::Span {
    let span = tracing::info_span!(
        "saga",
        otel.name = "booking saga",
        service = "scheduler",
        delivery_id,
        partition,
    );
    telemetry::set_parent(&span, headers);
    span
}

/// The span of a saga resumed from its journal: back in its booking's trace if it kept one.
fn resumed_saga_span(record: &SagaRecord, partition: u32) -> tracing::Span {
    let mut headers = std::collections::BTreeMap::new();
    if let Some(tp) = record.input.get(TRACEPARENT_KEY).and_then(|v| v.as_str()) {
        headers.insert(telemetry::TRACEPARENT.to_owned(), tp.to_owned());
    }
    let span = saga_span(&record.id, partition, &headers);
    span.record("otel.name", "booking saga (resumed)");
    span
}

fn lock(t: &Mutex<Tracker>) -> std::sync::MutexGuard<'_, Tracker> {
    t.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Handles one record; false when the scheduler is shutting down.
async fn handle(
    shared: &Arc<Shared>,
    tracker: &Arc<Mutex<Tracker>>,
    sagas: &mut JoinSet<()>,
    record: LogRecord,
) -> bool {
    let offset = record.position.offset;
    let event = match record.event {
        Ok(e) => {
            let lag = (chrono::Utc::now() - e.time).num_milliseconds() as f64 / 1000.0;
            shared
                .ctx
                .metrics
                .lag_seconds
                .with_label_values(&[&record.partition.to_string()])
                .set(lag.max(0.0));
            e
        }
        Err(poison) => {
            tracing::error!(partition = record.partition, offset, reason = %poison.reason, "skipping poison record");
            lock(tracker).seen(offset);
            return true;
        }
    };
    match event.kind.as_str() {
        DELIVERY_REQUESTED => {
            let request: DeliveryRequested = match event.decode() {
                Ok(r) => r,
                Err(reason) => {
                    tracing::error!(offset, reason, "skipping undecodable booking");
                    lock(tracker).seen(offset);
                    return true;
                }
            };
            lock(tracker).begin(offset);
            let Ok(permit) = shared.permits.clone().acquire_owned().await else {
                return false;
            };
            let s = shared.clone();
            let t = tracker.clone();
            let partition = record.partition;
            // The saga joins the booking's trace (Ingestion put `traceparent` in the event).
            let span = saga_span(&request.delivery_id.to_string(), partition, &event.headers);
            sagas.spawn(async move {
                let id = request.delivery_id.to_string();
                let deadline = Some(request.pickup_time);
                let mut input = match serde_json::to_value(&request) {
                    Ok(v) => v,
                    Err(_) => {
                        lock(&t).end(offset);
                        return;
                    }
                };
                // Kept with the saga, so a resumed saga stays in the booking's trace and the
                // status API can show the trace id.
                if let (Some(obj), Some(tp)) = (
                    input.as_object_mut(),
                    event.headers.get(telemetry::TRACEPARENT),
                ) {
                    obj.insert(TRACEPARENT_KEY.into(), tp.clone().into());
                }
                let shard = i32::try_from(partition).unwrap_or(i32::MAX);
                let mut delay = Duration::from_millis(50);
                // Until the start is durable the checkpoint must not pass this record.
                let started = loop {
                    match s.engine.start(&s.ctx, &id, shard, input.clone(), deadline).await {
                        Ok(r) => break r,
                        Err(e) => {
                            tracing::warn!(delivery_id = %id, error = %e, "recording a saga start failed; retrying");
                            tokio::time::sleep(delay).await;
                            delay = (delay * 2).min(Duration::from_secs(5));
                        }
                    }
                };
                lock(&t).end(offset);
                if let Some(record) = started {
                    s.ctx.metrics.started();
                    run_saga(&s, record, true).await;
                }
                drop(permit);
            }.instrument(span));
        }
        DELIVERY_CANCELLED | DELIVERY_RESCHEDULED => {
            // Apply after everything before it in the partition is recorded (its booking included).
            while lock(tracker).pending_below(offset) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            lock(tracker).begin(offset);
            let span = tracing::info_span!(
                "saga_change",
                otel.name = %event.kind,
                service = "scheduler",
                delivery_id = %event.key,
                partition = record.partition,
            );
            telemetry::set_parent(&span, &event.headers);
            // Instrumented, never entered across an await: an entered span stays current on the
            // worker thread while this task is parked, other tasks polled there pick it up, and
            // once it closes the tracing registry panics in them (it killed the journal writer).
            async {
                let outcome = if event.kind == DELIVERY_CANCELLED {
                    match event.decode::<DeliveryCancelled>() {
                        Ok(c) => cancel(shared, &c.delivery_id.to_string()).await,
                        Err(reason) => Err(reason),
                    }
                } else {
                    match event.decode::<DeliveryRescheduled>() {
                        Ok(r) => reschedule(shared, &r).await,
                        Err(reason) => Err(reason),
                    }
                };
                if let Err(reason) = outcome {
                    tracing::warn!(offset, kind = %event.kind, reason, "change not applied");
                }
            }
            .instrument(span)
            .await;
            lock(tracker).end(offset);
        }
        other => {
            tracing::debug!(kind = other, "ignoring event");
            lock(tracker).seen(offset);
        }
    }
    true
}

/// Runs a saga to its end; `fresh` when [`Engine::start`] has just recorded it (so the engine
/// need not read its journal for earlier attempts).
async fn run_saga(shared: &Arc<Shared>, record: SagaRecord, fresh: bool) {
    let id = record.id.clone();
    let run = if fresh {
        shared.engine.run_started(&shared.ctx, record).await
    } else {
        shared.engine.run(&shared.ctx, record).await
    };
    match run {
        Ok(done) => {
            tracing::info!(delivery_id = %id, state = %done.state, "saga finished");
            // A cancel that arrived while the last step ran found the saga still running and left
            // its request here; the saga completed anyway, so the request is acted on now.
            if let Some(reason) = take_cancellation(shared, &id) {
                if done.state == saga::COMPLETED {
                    if let Err(e) = cancel_completed(shared, done, reason).await {
                        tracing::error!(delivery_id = %id, error = %e, "cancel after completion not recorded");
                    }
                }
            }
        }
        Err(e) => {
            tracing::error!(delivery_id = %id, error = %e, "saga stopped on a journal error; it resumes at the next start")
        }
    }
}

/// Takes a pending cancel request out of the shared map: whoever takes it acts on it.
fn take_cancellation(shared: &Shared, id: &str) -> Option<String> {
    shared
        .ctx
        .cancellations
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .remove(id)
}

async fn load(shared: &Shared, id: &str) -> Result<Option<SagaRecord>, String> {
    match shared
        .engine
        .journal()
        .load(id)
        .await
        .map_err(|e| e.to_string())?
    {
        Some(row) => SagaRecord::from_row(row)
            .map(Some)
            .map_err(|e| e.to_string()),
        None => Ok(None),
    }
}

/// Persists a changed input of a running saga without moving its version (the running task owns
/// that); `false` when the saga has stopped running in the meantime.
async fn set_running_input(shared: &Shared, id: &str, input: &Value) -> Result<bool, String> {
    shared
        .engine
        .journal()
        .set_input_while_running(id, input, chrono::Utc::now())
        .await
        .map_err(|e| e.to_string())
}

async fn cancel(shared: &Shared, id: &str) -> Result<(), String> {
    let Some(saga) = load(shared, id).await? else {
        return Err(format!("no saga for {id}"));
    };
    let reason = "cancelled by the client".to_owned();
    match saga.state.as_str() {
        saga::RUNNING => {
            // The running task stops at its next step boundary; should it complete first, it
            // finds the request in the map when it ends (see `run_saga`).
            shared
                .ctx
                .cancellations
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(id.to_owned(), reason.clone());
            let mut input = saga.input.clone();
            input["cancelRequested"] = Value::String(reason.clone());
            if set_running_input(shared, id, &input).await? {
                return Ok(());
            }
            // It ended between the read and the flag. Exactly one of this handler and the
            // task's end takes the request back out of the map and acts on it.
            if take_cancellation(shared, id).is_none() {
                return Ok(());
            }
            match load(shared, id).await? {
                Some(done) if done.state == saga::COMPLETED => {
                    cancel_completed(shared, done, reason).await
                }
                _ => Ok(()), // failed or cancelled: nothing more to do
            }
        }
        saga::COMPLETED => cancel_completed(shared, saga, reason).await,
        _ => Ok(()), // failed or cancelled already: nothing more to do
    }
}

/// Scheduled already: everything it did is handed to the Supervisor to undo.
async fn cancel_completed(
    shared: &Shared,
    mut saga: SagaRecord,
    reason: String,
) -> Result<(), String> {
    shared.ctx.metrics.finished("cancelled");
    let mut messages = Vec::new();
    let mut next = saga.clone();
    next.version += 1;
    messages.extend(booking::state_event(
        &next,
        RequestState::Cancelled,
        Some(reason.clone()),
    ));
    messages.extend(booking::compensation(&next, &reason));
    shared
        .engine
        .update(
            &mut saga,
            InstanceUpdate {
                state: Some(saga::CANCELLED.to_owned()),
                error: Some(Some(reason)),
                ..Default::default()
            },
            messages,
        )
        .await
        .map_err(|e| e.to_string())
}

async fn reschedule(shared: &Shared, change: &DeliveryRescheduled) -> Result<(), String> {
    let id = change.delivery_id.to_string();
    let Some(mut saga) = load(shared, &id).await? else {
        return Err(format!("no saga for {id}"));
    };
    let mut input = saga.input.clone();
    if let Some(t) = change.pickup_time {
        input["pickupTime"] = serde_json::to_value(t).map_err(|e| e.to_string())?;
    }
    if let Some(v) = &change.pickup_location {
        input["pickupLocation"] = Value::String(v.clone());
    }
    if let Some(v) = &change.drop_off_location {
        input["dropOffLocation"] = Value::String(v.clone());
    }
    if let Some(v) = &change.deadline {
        input["deadline"] = Value::String(v.clone());
    }
    match saga.state.as_str() {
        saga::RUNNING => {
            // Steps not yet run use the new values after a restart; the running task keeps the
            // values it started with.
            if set_running_input(shared, &id, &input).await? {
                return Ok(());
            }
            // It ended between the read and the write: apply the change to how it ended.
            Box::pin(reschedule(shared, change)).await
        }
        saga::COMPLETED => {
            let booking: DeliveryRequested =
                serde_json::from_value(input.clone()).map_err(|e| e.to_string())?;
            let body = contracts::DroneReservationRequest {
                pickup_time: booking.pickup_time,
                pickup_location: booking.pickup_location.clone(),
                drop_off_location: booking.drop_off_location.clone(),
                package_id: id.clone(),
                size: booking.package_info.size,
                expedited: booking.expedited,
                owner_id: Some(booking.owner_id.clone()),
            };
            let reservation = retry(|| shared.ctx.downstream.reserve_drone(&id, &body)).await?;
            let patch = contracts::DeliveryPatch {
                pickup_time: change.pickup_time,
                deadline: change.deadline.clone(),
                pickup_location: change.pickup_location.clone(),
                drop_off_location: change.drop_off_location.clone(),
                drone_id: Some(reservation.drone_id.clone()),
            };
            retry(|| shared.ctx.downstream.reschedule_delivery(&id, &patch)).await?;
            let mut next = saga.clone();
            next.version += 1;
            next.input = input.clone();
            let messages: Vec<_> =
                booking::state_event(&next, RequestState::Scheduled, Some("rescheduled".into()))
                    .into_iter()
                    .collect();
            shared
                .engine
                .update(
                    &mut saga,
                    InstanceUpdate {
                        input: Some(input),
                        ..Default::default()
                    },
                    messages,
                )
                .await
                .map_err(|e| e.to_string())
        }
        _ => Err(format!(
            "saga {id} is {}; nothing to reschedule",
            saga.state
        )),
    }
}

async fn retry<T, F, Fut>(mut call: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, downstream::CallError>>,
{
    let mut delay = Duration::from_millis(100);
    for _ in 0..5 {
        match call().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_transient() => {
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    call().await.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::Tracker;

    #[test]
    fn checkpoint_stops_at_the_first_unrecorded_offset() {
        let mut t = Tracker::default();
        assert_eq!(t.checkpoint(7), 7, "nothing read: stay");
        t.begin(7);
        t.begin(7);
        t.begin(8);
        t.seen(9);
        assert_eq!(t.checkpoint(7), 7);
        t.end(8);
        assert_eq!(t.checkpoint(7), 7, "7 still has a pending record");
        t.end(7);
        t.end(7);
        assert_eq!(t.checkpoint(7), 10, "all recorded: after the last seen");
        assert!(!t.pending_below(10));
        t.begin(10);
        assert!(t.pending_below(11));
    }
}
