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
    /// Limit for one whole request (connect, send, read the answer), in milliseconds.
    pub timeout_ms: u64,
    /// Sent as `Authorization: Bearer` on every call. Never printed.
    pub service_token: SecretString,
}

impl Default for DownstreamSettings {
    fn default() -> Self {
        Self {
            account_url: "http://127.0.0.1:8081".into(),
            package_url: "http://127.0.0.1:8082".into(),
            drone_url: "http://127.0.0.1:8083".into(),
            delivery_url: "http://127.0.0.1:8084".into(),
            timeout_ms: 5000,
            service_token: SecretString::from(String::new()),
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
    }
}
