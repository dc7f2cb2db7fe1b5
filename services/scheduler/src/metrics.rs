//! Scheduler metrics, registered in the service's `/metrics` registry.

use std::time::Duration;

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
};

pub struct Metrics {
    started: IntCounter,
    finished: IntCounterVec,
    step_seconds: HistogramVec,
    step_retries: IntCounterVec,
    pub checkpoint: IntGaugeVec,
    pub read_offset: IntGaugeVec,
    pub owned: IntGaugeVec,
    /// Age of the last record read, as this replica saw it. Self-reported: it stands still when
    /// the replica stalls, so stalls are judged by the Supervisor against the log's head
    /// (`supervisor_partition_oldest_unstarted_age_seconds`, `supervisor_partition_stalled`).
    pub lag_seconds: prometheus::GaugeVec,
    pub outbox_backlog: prometheus::IntGauge,
    /// Account checks, by how they were answered: `copy` (the account copy) or `call` (Account).
    account_checks: IntCounterVec,
    /// Drone reservations ReserveDrone used, by when they were asked for: `with-package`
    /// (RegisterPackage asked at the same time) or `by-step` (ReserveDrone asked itself).
    pub(crate) drone_reservations: IntCounterVec,
    /// Accounts in this replica's copy.
    pub account_copy_size: prometheus::IntGauge,
    /// `completeAsOf` of the newest account-feed mark read (Unix seconds; 0: none yet).
    pub account_copy_complete_as_of: prometheus::Gauge,
    /// `account-events` records skipped because they do not decode.
    pub account_feed_skipped: IntCounter,
}

impl Metrics {
    pub fn register(registry: &Registry) -> anyhow::Result<Self> {
        let m = Self {
            started: IntCounter::new("saga_started_total", "Sagas started")?,
            finished: IntCounterVec::new(
                Opts::new("saga_finished_total", "Sagas finished, by final state"),
                &["state"],
            )?,
            step_seconds: HistogramVec::new(
                HistogramOpts::new("saga_step_duration_seconds", "Duration of one step attempt")
                    .buckets(vec![
                        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    ]),
                &["step", "outcome"],
            )?,
            step_retries: IntCounterVec::new(
                Opts::new(
                    "saga_step_retries_total",
                    "Step attempts that failed transiently and were retried",
                ),
                &["step"],
            )?,
            checkpoint: IntGaugeVec::new(
                Opts::new(
                    "scheduler_partition_checkpoint",
                    "Next offset to read after a restart",
                ),
                &["partition"],
            )?,
            read_offset: IntGaugeVec::new(
                Opts::new(
                    "scheduler_partition_read_offset",
                    "Offset of the last record read",
                ),
                &["partition"],
            )?,
            owned: IntGaugeVec::new(
                Opts::new(
                    "scheduler_partition_owned",
                    "1 while this replica holds the partition's lease",
                ),
                &["partition"],
            )?,
            lag_seconds: prometheus::GaugeVec::new(
                Opts::new(
                    "scheduler_partition_lag_seconds",
                    "Age of the last record read from the partition when it was read (self-reported; see supervisor_partition_oldest_unstarted_age_seconds for the lag against the log's head)",
                ),
                &["partition"],
            )?,
            outbox_backlog: prometheus::IntGauge::new(
                "saga_outbox_backlog",
                "Outbox rows not yet published",
            )?,
            account_checks: IntCounterVec::new(
                Opts::new(
                    "scheduler_account_checks_total",
                    "Account checks of bookings, by source: the account copy, or a call to Account",
                ),
                &["source"],
            )?,
            drone_reservations: IntCounterVec::new(
                Opts::new(
                    "scheduler_drone_reservations_total",
                    "Drone reservations ReserveDrone used, by when they were asked for: with-package (alongside RegisterPackage) or by-step",
                ),
                &["asked"],
            )?,
            account_copy_size: prometheus::IntGauge::new(
                "scheduler_account_copy_accounts",
                "Accounts in this replica's copy of account statuses",
            )?,
            account_copy_complete_as_of: prometheus::Gauge::new(
                "scheduler_account_copy_complete_as_of_seconds",
                "Time (Unix seconds) as of which the account copy holds every change: the newest account-feed mark read (0: none yet)",
            )?,
            account_feed_skipped: IntCounter::new(
                "scheduler_account_feed_skipped_total",
                "account-events records skipped because they do not decode",
            )?,
        };
        registry.register(Box::new(m.started.clone()))?;
        registry.register(Box::new(m.finished.clone()))?;
        registry.register(Box::new(m.step_seconds.clone()))?;
        registry.register(Box::new(m.step_retries.clone()))?;
        registry.register(Box::new(m.checkpoint.clone()))?;
        registry.register(Box::new(m.read_offset.clone()))?;
        registry.register(Box::new(m.owned.clone()))?;
        registry.register(Box::new(m.lag_seconds.clone()))?;
        registry.register(Box::new(m.outbox_backlog.clone()))?;
        registry.register(Box::new(m.account_checks.clone()))?;
        registry.register(Box::new(m.drone_reservations.clone()))?;
        registry.register(Box::new(m.account_copy_size.clone()))?;
        registry.register(Box::new(m.account_copy_complete_as_of.clone()))?;
        registry.register(Box::new(m.account_feed_skipped.clone()))?;
        Ok(m)
    }

    pub fn started(&self) {
        self.started.inc();
    }

    pub fn finished(&self, state: &str) {
        self.finished.with_label_values(&[state]).inc();
    }

    /// An account check answered by `source` (`copy` or `call`).
    pub fn account_checked(&self, source: &str) {
        self.account_checks.with_label_values(&[source]).inc();
    }

    /// A reservation ReserveDrone used, asked for `with-package` or `by-step`.
    pub fn drone_reserved(&self, asked: &str) {
        self.drone_reservations.with_label_values(&[asked]).inc();
    }

    pub fn step(&self, step: &str, outcome: &str, took: Duration) {
        self.step_seconds
            .with_label_values(&[step, outcome])
            .observe(took.as_secs_f64());
        if outcome == "transient" {
            self.step_retries.with_label_values(&[step]).inc();
        }
    }
}

/// `scheduler_saga_slots_in_use`: sagas holding one of this replica's slots right now, read from
/// the slot semaphore when scraped (a saga parked on a timer, or deferred by an open circuit
/// breaker, holds none).
pub struct SlotsInUse {
    gauge: prometheus::IntGauge,
    permits: std::sync::Arc<tokio::sync::Semaphore>,
    slots: usize,
}

impl SlotsInUse {
    pub fn register(
        registry: &Registry,
        permits: std::sync::Arc<tokio::sync::Semaphore>,
        slots: usize,
    ) -> anyhow::Result<()> {
        let gauge = prometheus::IntGauge::new(
            "scheduler_saga_slots_in_use",
            "Sagas running on one of this replica's slots now (parked and deferred sagas hold none)",
        )?;
        registry.register(Box::new(SlotsInUse {
            gauge,
            permits,
            slots,
        }))?;
        Ok(())
    }
}

impl prometheus::core::Collector for SlotsInUse {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.gauge.desc()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let in_use = self.slots.saturating_sub(self.permits.available_permits());
        self.gauge.set(i64::try_from(in_use).unwrap_or(i64::MAX));
        self.gauge.collect()
    }
}
