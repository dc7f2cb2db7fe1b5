//! Is each partition of `delivery-requests` being worked on? Measured from outside the
//! Scheduler, so that it still answers when the Scheduler is stalled (paused, hung, cut off from
//! its database or broker, every replica down) — a stalled Scheduler reports nothing, least of all
//! its own lag:
//! - each partition's lease (owner, expiry, checkpoint) from the Scheduler's `/api/partitions`
//!   (any replica answers for every partition); when it stops answering, the last answer is kept,
//!   and a lease not renewed in time has expired: its owner counts as dead;
//! - the age of the oldest booking not yet started: the first record of the log at or after the
//!   partition's checkpoint, read by the Supervisor itself ([`PartitionedLog::peek`]) — the lag
//!   against the log's head, not against what the owner last read;
//! - the running sagas that wait (parked until a wake-up time) by reason, from `/api/waiting`.
//!
//! A partition is flagged stalled when its lease has expired (or no Scheduler holds one) or its
//! oldest unstarted booking is older than `stall_after_secs`. One task refreshes a snapshot and
//! the metrics; the overview reads the snapshot, with ages computed at the moment it is read.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use contracts::{PartitionLease, WaitingSagas};
use messaging::{PartitionedLog, Position};
use serde::Serialize;
use tokio::sync::watch;
use utoipa::ToSchema;

use crate::metrics::Metrics;
use crate::scheduler_client::{SchedulerClient, SchedulerError};

/// Where a partition no Scheduler ever held resumes: its first record.
const LOG_START: Position = Position {
    offset: 0,
    index: 0,
};

/// A partition as the overview shows it.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PartitionView {
    pub partition: i32,
    /// The lease holder; empty when no Scheduler ever took the partition (or none answered yet).
    pub owner: String,
    /// When the lease runs out unless its owner renews it.
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// The lease has not expired: its owner renewed it in time.
    pub owner_alive: bool,
    /// The checkpoint: the next offset (broker message) to read after a restart.
    pub checkpoint: i64,
    pub checkpoint_index: i64,
    /// Age of the oldest record (booking, cancel, reschedule) at or after the checkpoint: not yet
    /// started. `null` while unknown (the log could not be read, or the checkpoint moved since).
    pub oldest_unstarted_age_seconds: Option<f64>,
    /// The partition's lag against the log's head: the oldest unstarted age, 0 when nothing
    /// waits.
    pub lag_seconds: Option<f64>,
    /// Lease expired or missing, or the oldest unstarted booking is older than the setting.
    pub stalled: bool,
    /// Why it is flagged, for a person.
    pub stall_reasons: Vec<String>,
}

/// The last answer about the leases.
struct Leases {
    by_partition: BTreeMap<u32, PartitionLease>,
    read_at: DateTime<Utc>,
}

/// The first record at or after `from` when the log was last looked at.
struct Probe {
    from: Position,
    /// Its position and its event's time; `None`: nothing there.
    first: Option<(Position, DateTime<Utc>)>,
}

#[derive(Default)]
struct Snapshot {
    /// Refreshes done (nothing is judged before the first).
    rounds: u64,
    leases: Option<Leases>,
    /// Why the last lease read failed (the last good one is kept).
    scheduler_error: Option<String>,
    probes: BTreeMap<u32, Probe>,
    log_error: Option<String>,
    waiting: Option<WaitingSagas>,
    waiting_error: Option<String>,
}

/// What the overview shows of the partitions and the waiting sagas.
pub struct Seen {
    pub partitions: Vec<PartitionView>,
    /// Why the partitions may be out of date or incomplete.
    pub partitions_error: Option<String>,
    /// When the Scheduler last told the leases.
    pub leases_as_of: Option<DateTime<Utc>>,
    pub waiting: Option<WaitingSagas>,
    pub waiting_error: Option<String>,
}

/// The partition watch: a snapshot refreshed by [`run`].
pub struct Watch {
    partitions: u32,
    stall_after: chrono::Duration,
    snapshot: Mutex<Snapshot>,
}

impl Watch {
    pub fn new(partitions: u32, stall_after: Duration) -> Self {
        Self {
            partitions,
            stall_after: chrono::Duration::from_std(stall_after).unwrap_or(chrono::Duration::MAX),
            snapshot: Mutex::new(Snapshot::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Snapshot> {
        self.snapshot.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Where to look in each partition's log: its checkpoint, or the start when no Scheduler
    /// ever held it. Nothing before the Scheduler first told the checkpoints.
    fn probe_positions(&self) -> Vec<(u32, Position)> {
        let s = self.lock();
        let Some(leases) = &s.leases else {
            return Vec::new();
        };
        (0..self.partitions)
            .map(|p| {
                let from = leases.by_partition.get(&p).map_or(LOG_START, checkpoint);
                (p, from)
            })
            .collect()
    }

    /// Takes what the Scheduler told (or why it did not) at `now`.
    fn record_scheduler(
        &self,
        leases: Result<Vec<PartitionLease>, SchedulerError>,
        waiting: Result<WaitingSagas, SchedulerError>,
        now: DateTime<Utc>,
    ) {
        let mut s = self.lock();
        s.rounds += 1;
        match leases {
            Ok(rows) => {
                s.leases = Some(Leases {
                    by_partition: rows
                        .into_iter()
                        .filter_map(|l| u32::try_from(l.partition).ok().map(|p| (p, l)))
                        .collect(),
                    read_at: now,
                });
                s.scheduler_error = None;
            }
            Err(e) => s.scheduler_error = Some(e.to_string()),
        }
        match waiting {
            Ok(w) => {
                s.waiting = Some(w);
                s.waiting_error = None;
            }
            // An older Scheduler (during a rolling upgrade) has no `/api/waiting`.
            Err(SchedulerError::NotFound(_)) => {
                s.waiting_error = Some("this Scheduler does not tell its waiting sagas".into())
            }
            Err(e) => s.waiting_error = Some(format!("the waiting sagas are not known: {e}")),
        }
    }

    /// Takes what the log showed at and after each checkpoint at `now`.
    fn record_probes(
        &self,
        probes: Vec<(
            u32,
            Position,
            messaging::Result<Option<messaging::LogRecord>>,
        )>,
        now: DateTime<Utc>,
    ) {
        let mut s = self.lock();
        s.log_error = None;
        for (partition, from, found) in probes {
            match found {
                Ok(record) => {
                    let first = record.map(|r| {
                        // An undecodable record has no time of its own: aged from now on.
                        let at = r.event.as_ref().map_or(now, |e| e.time);
                        (r.position, at)
                    });
                    s.probes.insert(partition, Probe { from, first });
                }
                Err(e) => {
                    s.probes.remove(&partition);
                    s.log_error = Some(format!("reading partition {partition} of the log: {e}"));
                }
            }
        }
    }

    /// Every partition as of `now`.
    pub fn seen(&self, now: DateTime<Utc>) -> Seen {
        let s = self.lock();
        let partitions = (0..self.partitions)
            .map(|p| self.partition_view(&s, p, now))
            .collect();
        let mut errors = Vec::new();
        if let Some(e) = &s.scheduler_error {
            match &s.leases {
                Some(l) => errors.push(format!(
                    "the Scheduler does not answer ({e}); leases as last told at {}",
                    l.read_at.format("%H:%M:%S UTC")
                )),
                None => errors.push(format!("the Scheduler has not told the leases yet: {e}")),
            }
        }
        if let Some(e) = &s.log_error {
            errors.push(e.clone());
        }
        Seen {
            partitions,
            partitions_error: (!errors.is_empty()).then(|| errors.join("; ")),
            leases_as_of: s.leases.as_ref().map(|l| l.read_at),
            waiting: s.waiting.clone(),
            waiting_error: s.waiting_error.clone(),
        }
    }

    fn partition_view(&self, s: &Snapshot, partition: u32, now: DateTime<Utc>) -> PartitionView {
        let lease = s
            .leases
            .as_ref()
            .and_then(|l| l.by_partition.get(&partition));
        let here = lease.map_or(LOG_START, checkpoint);
        // While the Scheduler answers, its leases and what the log held at their checkpoints are
        // judged as of that answer: the next one says whether they were renewed and moved. Judged
        // against the clock, a healthy lease would seem to run out and a booking started since
        // would seem to age between two looks. Once it stops answering, the clock runs for real.
        let judged_at = match &s.leases {
            Some(l) if s.scheduler_error.is_none() => l.read_at,
            _ => now,
        };
        // A probe from before the checkpoint moved past what it found says nothing any more.
        let age = s
            .probes
            .get(&partition)
            .and_then(|probe| match probe.first {
                None if probe.from >= here => Some(0.0),
                Some((at, time)) if at >= here => {
                    Some(((judged_at - time).num_milliseconds() as f64 / 1000.0).max(0.0))
                }
                _ => None,
            });
        let owner_alive = lease.is_some_and(|l| l.expires_at > judged_at);
        let mut reasons = Vec::new();
        if s.rounds > 0 {
            match (lease, &s.leases) {
                (Some(l), _) if !owner_alive => reasons.push(format!(
                    "lease of {} expired {} s ago",
                    l.owner,
                    (judged_at - l.expires_at).num_seconds()
                )),
                (Some(_), _) => {}
                (None, Some(_)) => reasons.push("no Scheduler holds a lease".to_owned()),
                (None, None) => {
                    reasons.push("no lease known: the Scheduler has not answered".to_owned())
                }
            }
            let limit = self.stall_after.num_milliseconds() as f64 / 1000.0;
            if let Some(a) = age.filter(|a| *a > limit) {
                reasons.push(format!(
                    "oldest unstarted booking {a:.0} s old (over {limit:.0} s)"
                ));
            }
        }
        PartitionView {
            partition: i32::try_from(partition).unwrap_or(i32::MAX),
            owner: lease.map(|l| l.owner.clone()).unwrap_or_default(),
            lease_expires_at: lease.map(|l| l.expires_at),
            owner_alive,
            checkpoint: lease.map_or(0, |l| l.next_offset),
            checkpoint_index: lease.map_or(0, |l| l.next_index),
            oldest_unstarted_age_seconds: age,
            lag_seconds: age,
            stalled: !reasons.is_empty(),
            stall_reasons: reasons,
        }
    }

    /// Sets the partition and waiting-saga gauges from the snapshot.
    fn export(&self, metrics: &Metrics, now: DateTime<Utc>) {
        let seen = self.seen(now);
        for p in &seen.partitions {
            let label = p.partition.to_string();
            let labels = [label.as_str()];
            metrics
                .partition_stalled
                .with_label_values(&labels)
                .set(i64::from(p.stalled));
            metrics
                .partition_owner_alive
                .with_label_values(&labels)
                .set(i64::from(p.owner_alive));
            metrics
                .partition_oldest_unstarted_age
                .with_label_values(&labels)
                .set(p.oldest_unstarted_age_seconds.unwrap_or(0.0));
        }
        metrics
            .scheduler_up
            .set(i64::from(self.lock().scheduler_error.is_none()));
        if let Some(w) = &seen.waiting {
            metrics.sagas_progressing.set(w.progressing);
            // Groups that emptied must not linger with their last count.
            metrics.sagas_waiting.reset();
            for r in &w.reasons {
                metrics
                    .sagas_waiting
                    .with_label_values(&[r.step.as_str(), r.reason.as_str()])
                    .set(r.count);
            }
        }
    }
}

fn checkpoint(l: &PartitionLease) -> Position {
    Position {
        offset: u64::try_from(l.next_offset).unwrap_or(0),
        index: u32::try_from(l.next_index).unwrap_or(0),
    }
}

/// Refreshes the watch every `every` until `stop`: what the Scheduler tells (leases, waiting
/// sagas), then the log at each partition's checkpoint.
pub async fn run(
    watch: Arc<Watch>,
    scheduler: SchedulerClient,
    log: Arc<dyn PartitionedLog>,
    metrics: Arc<Metrics>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let told = async { tokio::join!(scheduler.partitions(), scheduler.waiting()) };
        let (leases, waiting) = tokio::select! {
            _ = stop.changed() => return,
            r = told => r,
        };
        watch.record_scheduler(leases, waiting, Utc::now());
        // From the checkpoints just told (or the last ones, when the Scheduler did not answer),
        // so what a probe finds is judged against the checkpoint it was looked for at.
        let probes = futures::future::join_all(watch.probe_positions().into_iter().map(
            |(partition, from)| {
                let log = log.clone();
                async move { (partition, from, log.peek(partition, from).await) }
            },
        ));
        let probes = tokio::select! {
            _ = stop.changed() => return,
            p = probes => p,
        };
        let now = Utc::now();
        watch.record_probes(probes, now);
        watch.export(&metrics, now);
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use messaging::{Envelope, LogRecord};

    fn lease(partition: i32, expires_at: DateTime<Utc>, offset: i64) -> PartitionLease {
        PartitionLease {
            partition,
            owner: "scheduler-0".into(),
            token: 1,
            expires_at,
            next_offset: offset,
            next_index: 0,
        }
    }

    fn record(partition: u32, offset: u64, time: DateTime<Utc>) -> LogRecord {
        let mut e = Envelope::new("delivery.requested", 1, "k", &serde_json::json!({}))
            .unwrap_or_else(|e| panic!("{e}"));
        e.time = time;
        LogRecord {
            partition,
            position: Position { offset, index: 0 },
            event: Ok(e),
        }
    }

    fn at(offset: u64) -> Position {
        Position { offset, index: 0 }
    }

    impl Watch {
        /// One round: what the Scheduler told, then what the log showed at its checkpoints.
        fn record(
            &self,
            leases: Result<Vec<PartitionLease>, SchedulerError>,
            waiting: Result<WaitingSagas, SchedulerError>,
            probes: Vec<(u32, Position, messaging::Result<Option<LogRecord>>)>,
            now: DateTime<Utc>,
        ) {
            self.record_scheduler(leases, waiting, now);
            self.record_probes(probes, now);
        }
    }

    /// A live lease and an empty log beyond the checkpoint are fine; an expired lease, a
    /// partition no Scheduler holds and an old unstarted booking are flagged, each with its reason;
    /// a Scheduler that stops answering leaves the last leases to expire.
    #[test]
    fn stalls_are_flagged_with_their_reason() {
        let watch = Watch::new(4, Duration::from_secs(60));
        let now = Utc::now();
        let soon = now + chrono::Duration::seconds(3);
        let long_ago = now - chrono::Duration::seconds(30);
        let before = watch.seen(now);
        assert!(
            before.partitions.iter().all(|p| !p.stalled),
            "nothing is judged before the first look"
        );
        watch.record(
            Ok(vec![
                lease(0, soon, 5),
                lease(1, long_ago, 2),
                lease(2, soon, 7),
            ]),
            Err(SchedulerError::Transient("down".into())),
            vec![
                (0, at(5), Ok(None)),
                (
                    1,
                    at(2),
                    Ok(Some(record(1, 2, now - chrono::Duration::seconds(5)))),
                ),
                (
                    2,
                    at(7),
                    Ok(Some(record(2, 8, now - chrono::Duration::seconds(90)))),
                ),
                (3, at(0), Ok(None)),
            ],
            now,
        );
        let seen = watch.seen(now);
        let v = &seen.partitions;
        // Seen later, while the Scheduler answers: as of its answer (the next one says more).
        let between = watch.seen(now + chrono::Duration::seconds(10));
        assert!(between.partitions[0].owner_alive && !between.partitions[0].stalled);
        assert_eq!(
            between.partitions[2].oldest_unstarted_age_seconds,
            Some(90.0)
        );
        assert!(!v[0].stalled && v[0].owner_alive, "{:?}", v[0]);
        assert_eq!(v[0].lag_seconds, Some(0.0));
        assert!(v[1].stalled && !v[1].owner_alive, "{:?}", v[1]);
        assert!(v[1].stall_reasons[0].starts_with("lease of scheduler-0 expired 30 s ago"));
        assert_eq!(v[1].oldest_unstarted_age_seconds, Some(5.0));
        assert!(v[2].stalled && v[2].owner_alive, "{:?}", v[2]);
        assert_eq!(
            v[2].stall_reasons,
            ["oldest unstarted booking 90 s old (over 60 s)"]
        );
        assert!(v[3].stalled && v[3].owner.is_empty());
        assert_eq!(v[3].stall_reasons, ["no Scheduler holds a lease"]);

        // The Scheduler stops answering: its last leases stay, and run out.
        watch.record(
            Err(SchedulerError::Transient("timed out".into())),
            Err(SchedulerError::Transient("timed out".into())),
            Vec::new(),
            now,
        );
        let later = watch.seen(now + chrono::Duration::seconds(10));
        assert!(later.partitions[0].stalled && !later.partitions[0].owner_alive);
        assert_eq!(
            later.partitions[2].oldest_unstarted_age_seconds,
            Some(100.0),
            "unanswered, the unstarted booking ages with the clock"
        );
        assert_eq!(later.partitions[0].owner, "scheduler-0");
        assert!(later
            .partitions_error
            .is_some_and(|e| e.contains("does not answer")));

        // The checkpoint moved past what a probe found: that age is no longer known.
        watch.record(
            Ok(vec![
                lease(0, soon, 5),
                lease(1, soon, 3),
                lease(2, soon, 9),
            ]),
            Err(SchedulerError::Transient("down".into())),
            Vec::new(),
            now,
        );
        let moved = watch.seen(now);
        assert_eq!(moved.partitions[1].oldest_unstarted_age_seconds, None);
        assert!(!moved.partitions[1].stalled);
        assert!(!moved.partitions[2].stalled);
    }
}
