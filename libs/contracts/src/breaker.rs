//! The circuit breakers a process keeps in front of each downstream service (`libs/downstream`),
//! as the Scheduler's `GET /api/breakers` reports them and the Supervisor's dashboard shows them.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Whether calls to a service are let through. Ordered by severity: closed < half-open < open.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum BreakerState {
    /// Calls go through; their outcomes are counted in a rolling window.
    Closed,
    /// The open time is over: a few probe calls go through, the others are refused until the
    /// probes tell whether the service is back.
    HalfOpen,
    /// The service failed too often: every call is refused at once until the next probe.
    Open,
}

impl BreakerState {
    pub const ALL: [BreakerState; 3] = [
        BreakerState::Closed,
        BreakerState::HalfOpen,
        BreakerState::Open,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::HalfOpen => "half-open",
            BreakerState::Open => "open",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// One downstream service's breaker and concurrency cap in one process, at one moment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BreakerStatus {
    /// The service called: `account`, `package`, `thirdparty`, `drone` or `delivery`.
    pub service: String,
    pub state: BreakerState,
    /// Calls finished within the rolling window (none are made while the breaker is open).
    pub calls_in_window: u64,
    /// Of those, the ones that count as failures (transport errors, timeouts, `5xx`, `408`,
    /// `429`; not `4xx` answers, not a `503` that only says "no capacity").
    pub failures_in_window: u64,
    /// Why it opened last (e.g. "31 of 40 calls failed in 10 s"), while it is not closed.
    pub reason: Option<String>,
    /// When it opened last, while it is not closed.
    pub opened_at: Option<DateTime<Utc>>,
    /// When the next probe call will be let through, while it is open.
    pub next_probe_at: Option<DateTime<Utc>>,
    /// Calls refused without being made since the process started (open, half-open or the
    /// concurrency cap).
    pub rejected_total: u64,
    /// Calls to the service in flight from this process now.
    pub in_flight: u64,
    /// The cap on calls in flight to the service from this process.
    pub max_concurrent_calls: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_and_fields_have_their_wire_spelling() {
        assert!(BreakerState::Closed < BreakerState::HalfOpen);
        assert!(BreakerState::HalfOpen < BreakerState::Open);
        for s in BreakerState::ALL {
            assert_eq!(BreakerState::parse(s.as_str()), Some(s));
            assert_eq!(
                serde_json::to_string(&s).ok(),
                Some(format!("\"{}\"", s.as_str()))
            );
        }
        let status = BreakerStatus {
            service: "package".into(),
            state: BreakerState::HalfOpen,
            calls_in_window: 40,
            failures_in_window: 31,
            reason: Some("31 of 40 calls failed in 10 s".into()),
            opened_at: Some(Utc::now()),
            next_probe_at: None,
            rejected_total: 7,
            in_flight: 1,
            max_concurrent_calls: 64,
        };
        let json = serde_json::to_value(&status).unwrap_or_default();
        assert_eq!(json["state"], "half-open");
        assert_eq!(json["failuresInWindow"], 31);
        assert_eq!(json["nextProbeAt"], serde_json::Value::Null);
        crate::round_trip(&status);
    }
}
