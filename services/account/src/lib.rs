//! Account service: client accounts (`active` / `suspended`) and the client tokens (JWT, subject =
//! account id) that Ingestion verifies. Every change of an account is published on the
//! `account-events` log through a transactional outbox (module `feed`).

mod cache;
mod entity;
mod feed;
mod migration;
mod routes;
mod store;

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use messaging::MessagingSettings;
use serde::Deserialize;
use service_kit::auth::ClientTokens;
use service_kit::{
    AuthSettings, DatabaseSettings, HttpSettings, RunningService, Service, ServiceBuilder,
};

pub use feed::{event_id, FeedSettings};
pub use migration::Migrator;

/// Account settings (`APP_` environment variables with `__` for nesting).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub http: HttpSettings,
    pub database: DatabaseSettings,
    pub auth: AuthSettings,
    pub tokens: TokenSettings,
    /// The broker of the `account-events` log (`APP_MESSAGING__URL`, `APP_MESSAGING__PREFIX`, ...).
    /// Reachable at start; later outages only delay the feed (no readiness check: a PUT never
    /// waits for the broker).
    pub messaging: MessagingSettings,
    /// Publishing account changes (`APP_FEED__POLL_MS`, `APP_FEED__MARK_INTERVAL_MS`).
    pub feed: FeedSettings,
    /// How long `GET /api/accounts/{id}` may answer from memory (milliseconds; 0 = always read
    /// the database). Every saga checks its owner's account, so most checks are repeats; a
    /// change made through another instance shows after at most this long (through this one,
    /// at once).
    pub read_cache_ttl_ms: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            http: HttpSettings::with_port(8081),
            database: DatabaseSettings::new("sqlite://data/account.db?mode=rwc"),
            auth: AuthSettings::default(),
            tokens: TokenSettings::default(),
            messaging: MessagingSettings::default(),
            feed: FeedSettings::default(),
            read_cache_ttl_ms: 1000,
        }
    }
}

/// Lifetimes of minted client tokens.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct TokenSettings {
    pub default_ttl_secs: u64,
    pub max_ttl_secs: u64,
}

impl Default for TokenSettings {
    fn default() -> Self {
        Self {
            default_ttl_secs: 24 * 3600,
            max_ttl_secs: 30 * 24 * 3600,
        }
    }
}

pub(crate) struct AppState {
    pub db: sea_orm::DatabaseConnection,
    pub tokens: ClientTokens,
    pub token_settings: TokenSettings,
    pub cache: cache::AccountCache,
    /// Wakes the feed relay after a change was committed.
    pub wake: Arc<tokio::sync::Notify>,
}

/// The running Account service.
pub struct Application {
    service: RunningService,
}

impl Service for Application {
    type Settings = Settings;
    const NAME: &'static str = "account";

    async fn build(settings: Settings) -> anyhow::Result<Self> {
        settings.auth.require_service_token()?;
        settings.auth.require_jwt_secret()?;
        if settings.feed.poll_ms == 0 {
            anyhow::bail!("feed.poll_ms must be positive");
        }
        tracing::info!(
            port = settings.http.port,
            sqlite = settings.database.is_sqlite(),
            default_ttl_secs = settings.tokens.default_ttl_secs,
            read_cache_ttl_ms = settings.read_cache_ttl_ms,
            messaging_prefix = %settings.messaging.prefix,
            feed_poll_ms = settings.feed.poll_ms,
            feed_mark_interval_ms = settings.feed.mark_interval_ms,
            "starting account service"
        );
        let (mut builder, db) = ServiceBuilder::start::<Migrator>(
            Self::NAME,
            &settings.http,
            &settings.database,
            &settings.auth,
        )
        .await?;
        let broker = messaging::connect(&settings.messaging)
            .await
            .context("connecting to the message broker")?;
        let log = broker
            .log(
                contracts::ACCOUNT_EVENTS_LOG,
                contracts::ACCOUNT_EVENTS_PARTITIONS,
            )
            .await
            .context("declaring the account-events log")?;
        let wake = Arc::new(tokio::sync::Notify::new());
        let relay = feed::Relay {
            db: db.clone(),
            log,
            wake: wake.clone(),
            metrics: feed::FeedMetrics::register(builder.registry())?,
            settings: settings.feed.clone(),
        };
        let stop = builder.stop_signal();
        builder.spawn(async move {
            relay.run(stop).await;
            // The broker's connection lives as long as the relay needs it.
            drop(broker);
        });
        let state = actix_web::web::Data::new(AppState {
            db,
            tokens: ClientTokens::new(&settings.auth.jwt_secret),
            token_settings: settings.tokens.clone(),
            cache: cache::AccountCache::new(std::time::Duration::from_millis(
                settings.read_cache_ttl_ms,
            )),
            wake,
        });
        let service = builder
            .openapi(routes::openapi())
            .build(move |cfg| routes::configure(cfg, state.clone()))?;
        Ok(Self { service })
    }

    fn port(&self) -> u16 {
        self.service.port()
    }

    async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        self.service.run_until(shutdown).await
    }
}
