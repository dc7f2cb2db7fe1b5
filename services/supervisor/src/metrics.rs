//! Supervisor metrics, registered in the service's `/metrics` registry.

use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

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
        };
        registry.register(Box::new(m.compensations.clone()))?;
        registry.register(Box::new(m.undo_retries.clone()))?;
        registry.register(Box::new(m.parked_total.clone()))?;
        registry.register(Box::new(m.parked.clone()))?;
        registry.register(Box::new(m.queue_depth.clone()))?;
        registry.register(Box::new(m.stuck.clone()))?;
        registry.register(Box::new(m.sagas.clone()))?;
        Ok(m)
    }
}
