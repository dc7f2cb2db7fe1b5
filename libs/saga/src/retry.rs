//! How a step fails and how it is retried.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use serde::Deserialize;

/// Why a step attempt failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    /// May succeed if tried again (connect errors, timeouts, 5xx, 408, 429). `retry_after` is the
    /// downstream's own hint and is honoured as a minimum delay.
    #[error("{reason}")]
    Transient {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// Will not succeed however often it is tried (4xx, a suspended account).
    #[error("{reason}")]
    Permanent { reason: String },
    /// Not tried at all: the service is known to be failing (its circuit breaker is open). The
    /// saga parks as a durable timer for `wait` (holding no slot) and tries again then; this is
    /// not an attempt, so it spends none of the step's attempts, and the try after it starts a
    /// fresh back-off and time budget. Only the saga's deadline bounds the waiting.
    #[error("{reason}")]
    Deferred { reason: String, wait: Duration },
}

impl StepError {
    pub fn transient(reason: impl Into<String>) -> Self {
        StepError::Transient {
            reason: reason.into(),
            retry_after: None,
        }
    }

    pub fn permanent(reason: impl Into<String>) -> Self {
        StepError::Permanent {
            reason: reason.into(),
        }
    }

    pub fn reason(&self) -> &str {
        match self {
            StepError::Transient { reason, .. }
            | StepError::Permanent { reason }
            | StepError::Deferred { reason, .. } => reason,
        }
    }
}

/// A step's retry policy: exponential backoff with jitter, bounded by attempts and by time.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(default)]
pub struct RetryPolicy {
    pub min_delay_ms: u64,
    pub max_delay_ms: u64,
    /// Attempts in all (the first one included).
    pub max_attempts: u32,
    /// Time allowed from the step's first attempt; no retry starts after it.
    pub budget_ms: u64,
    pub jitter: bool,
}

/// Some fields of a [`RetryPolicy`], as a setting gives them: the rest come from a base policy
/// that need not be [`RetryPolicy::default`] (a step with its own defaults keeps them when one
/// field is set).
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(default)]
pub struct RetryOverrides {
    pub min_delay_ms: Option<u64>,
    pub max_delay_ms: Option<u64>,
    pub max_attempts: Option<u32>,
    pub budget_ms: Option<u64>,
    pub jitter: Option<bool>,
}

impl RetryOverrides {
    pub fn over(self, base: RetryPolicy) -> RetryPolicy {
        RetryPolicy {
            min_delay_ms: self.min_delay_ms.unwrap_or(base.min_delay_ms),
            max_delay_ms: self.max_delay_ms.unwrap_or(base.max_delay_ms),
            max_attempts: self.max_attempts.unwrap_or(base.max_attempts),
            budget_ms: self.budget_ms.unwrap_or(base.budget_ms),
            jitter: self.jitter.unwrap_or(base.jitter),
        }
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            min_delay_ms: 100,
            max_delay_ms: 10_000,
            max_attempts: 8,
            budget_ms: 120_000,
            jitter: true,
        }
    }
}

impl RetryPolicy {
    /// The delays before attempts 2, 3, ...
    pub fn delays(&self) -> impl Iterator<Item = Duration> {
        self.delays_seeded(None)
    }

    /// [`RetryPolicy::delays`] with the jitter drawn from `seed` (the engine seeds it per saga
    /// and step: different sagas still spread out, and a replayed run waits the same).
    pub fn delays_seeded(&self, seed: Option<u64>) -> impl Iterator<Item = Duration> {
        let mut builder = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(self.min_delay_ms))
            .with_max_delay(Duration::from_millis(
                self.max_delay_ms.max(self.min_delay_ms),
            ))
            .with_max_times(self.max_attempts.saturating_sub(1) as usize);
        if self.jitter {
            builder = builder.with_jitter();
            if let Some(seed) = seed {
                builder = builder.with_jitter_seed(seed);
            }
        }
        builder.build()
    }

    pub fn budget(&self) -> Duration {
        Duration::from_millis(self.budget_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_stop_at_the_attempt_limit() {
        let p = RetryPolicy {
            min_delay_ms: 100,
            max_delay_ms: 1000,
            max_attempts: 5,
            budget_ms: 60_000,
            jitter: false,
        };
        let d: Vec<u64> = p.delays().map(|d| d.as_millis() as u64).collect();
        assert_eq!(d, vec![100, 200, 400, 800]);
    }
}
