//! Typed, layered settings: struct defaults → optional file → `APP_`-prefixed environment variables,
//! with `__` separating nested keys (`APP_DATABASE__URL`, `APP_HTTP__PORT`), which is what Kubernetes
//! ConfigMaps and Secrets provide.

use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde::Deserialize;

/// Loads settings for `service`. The file is `$APP_CONFIG_FILE` when set (then it must exist),
/// else `config/<service>.{toml,json,yaml}` if present. Fields missing everywhere keep the struct's
/// `Default` (every settings struct is `#[serde(default)]`).
pub fn load<S: DeserializeOwned>(service: &str) -> Result<S, config::ConfigError> {
    let file = std::env::var("APP_CONFIG_FILE").ok();
    let builder = config::Config::builder();
    let builder = match &file {
        Some(path) => builder.add_source(config::File::with_name(path).required(true)),
        None => builder
            .add_source(config::File::with_name(&format!("config/{service}")).required(false)),
    };
    builder
        .add_source(
            config::Environment::with_prefix("APP")
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true),
        )
        .build()?
        .try_deserialize()
}

/// Where and how the HTTP server listens.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct HttpSettings {
    pub host: String,
    /// `0` picks a free port (tests); the bound port is reported by `RunningService::port`.
    pub port: u16,
    /// Worker threads; `0` means one per core.
    pub workers: usize,
    /// Largest request body accepted, in bytes.
    pub body_limit: usize,
    /// How long in-flight requests may take to finish at shutdown.
    pub shutdown_timeout_secs: u64,
    /// New connections the kernel queues until a worker accepts them (capped by the kernel's
    /// `net.core.somaxconn`); one arriving when the queue is full is dropped, and its client
    /// tries again only a second later.
    pub backlog: u32,
    /// Share (0–1) of requests arriving without a caller's trace context whose server span is
    /// recorded, with all the work it leads to downstream (parent-based head sampling). A caller's
    /// `traceparent` decides by its sampled flag instead. Unsampled requests cost no span work
    /// and still pass an unsampled trace context on, so no service records part of their trace.
    pub trace_sample_ratio: f64,
}

impl HttpSettings {
    pub fn with_port(port: u16) -> Self {
        Self {
            port,
            ..Self::default()
        }
    }
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            host: "0.0.0.0".into(),
            port: 8080,
            workers: 0,
            body_limit: 64 * 1024,
            shutdown_timeout_secs: 10,
            backlog: 4096,
            trace_sample_ratio: 1.0,
        }
    }
}

/// The service's own database. `postgres://...` in production, `sqlite://path?mode=rwc` embedded.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct DatabaseSettings {
    pub url: SecretString,
    /// Pool size for PostgreSQL. SQLite always uses one connection (see `db::connect`).
    pub max_connections: u32,
    pub connect_timeout_secs: u64,
    /// Run pending migrations at start (behind a lock). Off when a migration Job does it.
    pub migrate_on_start: bool,
}

impl DatabaseSettings {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: SecretString::from(url.into()),
            ..Self::default()
        }
    }

    pub fn is_sqlite(&self) -> bool {
        self.url.expose_secret().starts_with("sqlite:")
    }
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: SecretString::from(String::new()),
            max_connections: 16,
            connect_timeout_secs: 5,
            migrate_on_start: true,
        }
    }
}

/// Credentials for internal calls and client tokens.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct AuthSettings {
    /// Bearer token every internal (service-to-service) call must carry.
    pub service_token: SecretString,
    /// HS256 key for client JWTs (minted by Account, verified by Ingestion).
    pub jwt_secret: SecretString,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            service_token: SecretString::from(String::new()),
            jwt_secret: SecretString::from(String::new()),
        }
    }
}

impl AuthSettings {
    pub fn new(service_token: impl Into<String>, jwt_secret: impl Into<String>) -> Self {
        Self {
            service_token: SecretString::from(service_token.into()),
            jwt_secret: SecretString::from(jwt_secret.into()),
        }
    }

    /// Fails with a message naming the setting when the service token is unusable.
    pub fn require_service_token(&self) -> anyhow::Result<()> {
        if self.service_token.expose_secret().len() < 16 {
            anyhow::bail!("APP_AUTH__SERVICE_TOKEN must be set to at least 16 characters");
        }
        Ok(())
    }

    /// Fails with a message naming the setting when the JWT key is unusable.
    pub fn require_jwt_secret(&self) -> anyhow::Result<()> {
        if self.jwt_secret.expose_secret().len() < 32 {
            anyhow::bail!("APP_AUTH__JWT_SECRET must be set to at least 32 characters");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, Deserialize)]
    #[serde(default)]
    struct Sample {
        http: HttpSettings,
        database: DatabaseSettings,
        auth: AuthSettings,
    }

    #[test]
    fn layers_file_then_environment_over_defaults() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let path = dir.path().join("sample.toml");
        std::fs::write(&path, "[http]\nport = 9000\nhost = \"127.0.0.1\"\n")
            .unwrap_or_else(|e| panic!("write: {e}"));
        // Environment variables are process-wide: this is the only test in the crate that sets them.
        std::env::set_var("APP_CONFIG_FILE", &path);
        std::env::set_var("APP_HTTP__PORT", "9100");
        std::env::set_var("APP_DATABASE__URL", "postgres://u@h/db");
        std::env::set_var("APP_AUTH__SERVICE_TOKEN", "123456789012345678");
        let s: Result<Sample, _> = load("sample");
        std::env::remove_var("APP_CONFIG_FILE");
        std::env::remove_var("APP_HTTP__PORT");
        std::env::remove_var("APP_DATABASE__URL");
        std::env::remove_var("APP_AUTH__SERVICE_TOKEN");
        let s = s.unwrap_or_else(|e| panic!("load: {e}"));
        assert_eq!(s.http.port, 9100, "environment beats file");
        assert_eq!(s.http.host, "127.0.0.1", "file beats default");
        assert_eq!(s.http.body_limit, 64 * 1024, "default kept");
        assert_eq!(s.database.url.expose_secret(), "postgres://u@h/db");
        assert_eq!(s.auth.service_token.expose_secret(), "123456789012345678");
        assert!(s.auth.require_service_token().is_ok());
        assert!(s.auth.require_jwt_secret().is_err());
        assert!(
            !format!("{s:?}").contains("123456789012345678"),
            "secrets never print"
        );
    }
}
