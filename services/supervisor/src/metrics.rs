//! Supervisor metrics, registered in the service's `/metrics` registry.

use prometheus::{GaugeVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

pub struct Metrics {
    /// Compensation requests handled, by outcome (`compensated`, `failed`, `duplicate`,
    /// `superseded`).
    pub compensations: IntCounterVec,
    /// Undo calls that failed transiently and were retried, by step.
    pub undo_retries: IntCounterVec,
    /// Messages sent to the parked queue by this Supervisor (delivery limit reached or rejected).
    pub parked_total: prometheus::IntCounter,
    /// Messages waiting in the parked queue for a person.
    pub parked: IntGauge,
    /// Compensation requests waiting in `supervisor.compensations` (ready, not yet delivered).
    pub queue_depth: IntGauge,
    /// Sagas flagged stuck (no progress within the configured time, not finished).
    pub stuck: IntGauge,
    /// Sagas in the read model by state.
    pub sagas: IntGaugeVec,
    /// 1 while a partition is flagged stalled (lease expired or missing, or its oldest unstarted
    /// booking older than `stall_after_secs`), by partition.
    pub partition_stalled: IntGaugeVec,
    /// 1 while a partition's lease is unexpired, by partition.
    pub partition_owner_alive: IntGaugeVec,
    /// Age of the oldest record at or after a partition's checkpoint (not yet started), by
    /// partition: its lag against the log's head.
    pub partition_oldest_unstarted_age: GaugeVec,
    /// 1 while the Scheduler answers the Supervisor's status calls.
    pub scheduler_up: IntGauge,
    /// Running sagas making progress (not parked until a wake-up time).
    pub sagas_progressing: IntGauge,
    /// Running sagas parked until a wake-up time, by the step they wait to run and why.
    pub sagas_waiting: IntGaugeVec,
}

impl Metrics {
    pub fn register(registry: &Registry) -> anyhow::Result<Self> {
        let m = Self {
            compensations: IntCounterVec::new(
                Opts::new(
                    "supervisor_compensations_total",
                    "Compensation requests handled, by outcome",
                ),
                &["outcome"],
            )?,
            undo_retries: IntCounterVec::new(
                Opts::new(
                    "supervisor_undo_retries_total",
                    "Undo calls retried after a transient failure, by step",
                ),
                &["step"],
            )?,
            parked_total: prometheus::IntCounter::new(
                "supervisor_parked_total",
                "Compensation requests parked (delivery limit reached or rejected)",
            )?,
            parked: IntGauge::new(
                "supervisor_parked_messages",
                "Compensation requests waiting in the parked queue for a person",
            )?,
            queue_depth: IntGauge::new(
                "supervisor_compensation_queue_depth",
                "Compensation requests waiting in the queue, not yet delivered to a consumer",
            )?,
            stuck: IntGauge::new(
                "supervisor_stuck_sagas",
                "Sagas without progress for longer than the configured time",
            )?,
            sagas: IntGaugeVec::new(
                Opts::new("supervisor_sagas", "Sagas in the read model, by state"),
                &["state"],
            )?,
            partition_stalled: IntGaugeVec::new(
                Opts::new(
                    "supervisor_partition_stalled",
                    "1 while the partition's lease has expired (or none is held) or its oldest unstarted booking is older than stall_after_secs",
                ),
                &["partition"],
            )?,
            partition_owner_alive: IntGaugeVec::new(
                Opts::new(
                    "supervisor_partition_owner_alive",
                    "1 while the partition's lease is unexpired (its owner renews it)",
                ),
                &["partition"],
            )?,
            partition_oldest_unstarted_age: GaugeVec::new(
                Opts::new(
                    "supervisor_partition_oldest_unstarted_age_seconds",
                    "Age of the oldest record at or after the partition's checkpoint, read from the log (lag against its head)",
                ),
                &["partition"],
            )?,
            scheduler_up: IntGauge::new(
                "supervisor_scheduler_up",
                "1 while the Scheduler answers the Supervisor's status calls",
            )?,
            sagas_progressing: IntGauge::new(
                "supervisor_sagas_progressing",
                "Running sagas making progress (not parked until a wake-up time)",
            )?,
            sagas_waiting: IntGaugeVec::new(
                Opts::new(
                    "supervisor_sagas_waiting",
                    "Running sagas parked until a wake-up time, by the step they wait to run and the reason",
                ),
                &["step", "reason"],
            )?,
        };
        registry.register(Box::new(m.compensations.clone()))?;
        registry.register(Box::new(m.undo_retries.clone()))?;
        registry.register(Box::new(m.parked_total.clone()))?;
        registry.register(Box::new(m.parked.clone()))?;
        registry.register(Box::new(m.queue_depth.clone()))?;
        registry.register(Box::new(m.stuck.clone()))?;
        registry.register(Box::new(m.sagas.clone()))?;
        registry.register(Box::new(m.partition_stalled.clone()))?;
        registry.register(Box::new(m.partition_owner_alive.clone()))?;
        registry.register(Box::new(m.partition_oldest_unstarted_age.clone()))?;
        registry.register(Box::new(m.scheduler_up.clone()))?;
        registry.register(Box::new(m.sagas_progressing.clone()))?;
        registry.register(Box::new(m.sagas_waiting.clone()))?;
        Ok(m)
    }
}
