//! Package service: the packages a delivery carries (`registered` / `cancelled`), written
//! idempotently on the id the saga assigns, and per-owner summaries computed by the database.

mod entity;
mod migration;
mod routes;
mod store;

use std::future::Future;

use serde::Deserialize;
use service_kit::{
    AuthSettings, DatabaseSettings, HttpSettings, RunningService, Service, ServiceBuilder,
};

pub use migration::Migrator;

/// Package settings (`APP_` environment variables with `__` for nesting).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub http: HttpSettings,
    pub database: DatabaseSettings,
    pub auth: AuthSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            http: HttpSettings::with_port(8082),
            database: DatabaseSettings::new("sqlite://data/package.db?mode=rwc"),
            auth: AuthSettings::default(),
        }
    }
}

pub(crate) struct AppState {
    pub db: sea_orm::DatabaseConnection,
}

/// The running Package service.
pub struct Application {
    service: RunningService,
}

impl Service for Application {
    type Settings = Settings;
    const NAME: &'static str = "package";

    async fn build(settings: Settings) -> anyhow::Result<Self> {
        settings.auth.require_service_token()?;
        tracing::info!(
            port = settings.http.port,
            sqlite = settings.database.is_sqlite(),
            migrate_on_start = settings.database.migrate_on_start,
            "starting package service"
        );
        let (builder, db) = ServiceBuilder::start::<Migrator>(
            Self::NAME,
            &settings.http,
            &settings.database,
            &settings.auth,
        )
        .await?;
        let state = actix_web::web::Data::new(AppState { db });
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
