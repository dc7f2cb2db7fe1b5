use secrecy::SecretString;
use serde::Deserialize;

/// Where the domain services listen and how to call them. Nested in the caller's settings, e.g.
/// `APP_DOWNSTREAM__ACCOUNT_URL`, `APP_DOWNSTREAM__SERVICE_TOKEN`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct DownstreamSettings {
    /// Base URL of the Account service (default `http://127.0.0.1:8081`).
    pub account_url: String,
    /// Base URL of the Package service (default `http://127.0.0.1:8082`).
    pub package_url: String,
    /// Base URL of the Drone service (default `http://127.0.0.1:8083`).
    pub drone_url: String,
    /// Base URL of the Delivery service (default `http://127.0.0.1:8084`).
    pub delivery_url: String,
    /// Base URL of the ThirdParty service (default `http://127.0.0.1:8087`).
    pub thirdparty_url: String,
    /// Limit for one whole request (connect, send, read the answer), in milliseconds.
    pub timeout_ms: u64,
    /// Sent as `Authorization: Bearer` on every call. Never printed.
    pub service_token: SecretString,
    /// The circuit breaker in front of each service (`APP_DOWNSTREAM__BREAKER__OPEN_MS`, ...).
    pub breaker: BreakerSettings,
    /// Calls in flight to one service from this process at most (default 64); one more waits
    /// for a free slot.
    pub max_concurrent_calls: usize,
    /// How long a call waits for a free slot before it is rejected without being made, in
    /// milliseconds (default 1000; 0 = never wait).
    pub cap_wait_ms: u64,
    /// How concurrent calls of one kind are coalesced into batch requests
    /// (`APP_DOWNSTREAM__BATCH__MAX_ITEMS`, ...).
    pub batch: BatchSettings,
}

/// Batching across callers (see the `batch` module): a call to an idle service goes out at once,
/// alone; calls made while requests of their kind are under way leave together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct BatchSettings {
    /// Items in one batch request at most, 1 to 64 (default 32; 1 = every call alone).
    pub max_items: usize,
    /// Requests of one kind (package registrations, drone reservations, delivery creations) under
    /// way at once from this process, 1 to 64 (default 2). Calls made while one is under way wait
    /// for it to be answered and leave together; a further request starts only for a full batch
    /// (`max_items` calls waiting).
    pub in_flight: usize,
}

impl Default for BatchSettings {
    fn default() -> Self {
        Self {
            max_items: 32,
            in_flight: 2,
        }
    }
}

/// When a service counts as failing and how it is given time to recover. One breaker per target
/// service per client: see the `protection` module for what counts as a failure.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(default)]
pub struct BreakerSettings {
    /// `false` lets every call through whatever the service answers (the concurrency cap stays).
    pub enabled: bool,
    /// The rolling window the outcomes are counted in, in milliseconds (default 10 s).
    pub window_ms: u64,
    /// Calls that must have finished within the window before the breaker may open (default 20).
    pub min_calls: u32,
    /// The breaker opens when at least this share of the window's calls failed: in (0, 1]
    /// (default 0.5).
    pub failure_ratio: f64,
    /// How long an open breaker refuses every call before it lets probes through, in
    /// milliseconds (default 5 s).
    pub open_ms: u64,
    /// The longest an open breaker waits before probing again: every failed probe doubles the
    /// wait from `open_ms`, up to this (milliseconds, default 30 s; never less than `open_ms`).
    pub max_open_ms: u64,
    /// Probe calls let through at once when half-open; that many successes close the breaker,
    /// one failure opens it again (default 2).
    pub half_open_probes: u32,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            window_ms: 10_000,
            min_calls: 20,
            failure_ratio: 0.5,
            open_ms: 5_000,
            max_open_ms: 30_000,
            half_open_probes: 2,
        }
    }
}

impl Default for DownstreamSettings {
    fn default() -> Self {
        Self {
            account_url: "http://127.0.0.1:8081".into(),
            package_url: "http://127.0.0.1:8082".into(),
            drone_url: "http://127.0.0.1:8083".into(),
            delivery_url: "http://127.0.0.1:8084".into(),
            thirdparty_url: "http://127.0.0.1:8087".into(),
            timeout_ms: 5000,
            service_token: SecretString::from(String::new()),
            breaker: BreakerSettings::default(),
            max_concurrent_calls: 64,
            cap_wait_ms: 1000,
            batch: BatchSettings::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn missing_fields_keep_their_defaults_and_the_token_never_prints() {
        let s: DownstreamSettings = serde_json::from_value(serde_json::json!({
            "drone_url": "http://drone:8080",
            "service_token": "a-very-secret-token-value"
        }))
        .unwrap_or_else(|e| panic!("settings: {e}"));
        assert_eq!(s.drone_url, "http://drone:8080");
        assert_eq!(s.account_url, "http://127.0.0.1:8081");
        assert_eq!(s.delivery_url, "http://127.0.0.1:8084");
        assert_eq!(s.timeout_ms, 5000);
        assert_eq!(s.service_token.expose_secret(), "a-very-secret-token-value");
        assert!(!format!("{s:?}").contains("a-very-secret"));
        assert_eq!(s.breaker, BreakerSettings::default());
        assert_eq!(s.max_concurrent_calls, 64);
    }

    #[test]
    fn one_breaker_field_set_alone_keeps_the_other_defaults() {
        let s: DownstreamSettings = serde_json::from_value(serde_json::json!({
            "breaker": {"open_ms": 250},
            "cap_wait_ms": 0
        }))
        .unwrap_or_else(|e| panic!("settings: {e}"));
        assert_eq!(
            s.breaker,
            BreakerSettings {
                open_ms: 250,
                ..BreakerSettings::default()
            }
        );
        assert_eq!(s.cap_wait_ms, 0);
        assert_eq!(s.max_concurrent_calls, 64);
    }
}
