//! Delivery service: deliveries and their tracking history (Created, Rescheduled, HeadedToPickup,
//! HeadedToDropoff, Completed, Cancelled). A delivery's status is derived from its stored events,
//! and every event after `Created` is published on `workflow-events` (see [`outbox`]).

mod entity;
mod migration;
pub mod outbox;
mod routes;
mod store;

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use messaging::{BrokerCheck, MessagingSettings};
use serde::Deserialize;
use service_kit::{
    AuthSettings, DatabaseSettings, HttpSettings, RunningService, Service, ServiceBuilder,
};

pub use migration::Migrator;

/// Delivery settings (`APP_` environment variables with `__` for nesting).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub http: HttpSettings,
    pub database: DatabaseSettings,
    pub auth: AuthSettings,
    pub messaging: MessagingSettings,
    pub tracking: TrackingSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            http: HttpSettings::with_port(8084),
            database: DatabaseSettings::new("sqlite://data/delivery.db?mode=rwc"),
            auth: AuthSettings::default(),
            messaging: MessagingSettings::default(),
            tracking: TrackingSettings::default(),
        }
    }
}

/// Publishing tracking events.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct TrackingSettings {
    /// Partitions of the `workflow-events` log (the same everywhere).
    pub partitions: u32,
}

impl Default for TrackingSettings {
    fn default() -> Self {
        Self { partitions: 8 }
    }
}

pub(crate) struct AppState {
    pub db: sea_orm::DatabaseConnection,
    /// Wakes the outbox relay after an event was appended.
    pub wake: Arc<tokio::sync::Notify>,
}

impl AppState {
    /// `value`, after waking the relay: an event was appended with it.
    pub(crate) fn published<T>(&self, value: T) -> T {
        self.wake.notify_one();
        value
    }
}

/// The running Delivery service.
pub struct Application {
    service: RunningService,
}

impl Service for Application {
    type Settings = Settings;
    const NAME: &'static str = "delivery";

    async fn build(settings: Settings) -> anyhow::Result<Self> {
        settings.auth.require_service_token()?;
        tracing::info!(
            port = settings.http.port,
            sqlite = settings.database.is_sqlite(),
            "starting delivery service"
        );
        if settings.tracking.partitions == 0 {
            anyhow::bail!("tracking.partitions must be positive");
        }
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
        let events = broker
            .log(contracts::WORKFLOW_EVENTS_LOG, settings.tracking.partitions)
            .await
            .context("declaring the workflow-events log")?;
        let wake = Arc::new(tokio::sync::Notify::new());
        let metrics = outbox::RelayMetrics::register(builder.registry())?;
        builder.spawn(outbox::relay(
            db.clone(),
            events,
            wake.clone(),
            metrics,
            builder.stop_signal(),
        ));
        let state = actix_web::web::Data::new(AppState { db, wake });
        let service = builder
            .openapi(routes::openapi())
            .readiness(BrokerCheck(broker))
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
