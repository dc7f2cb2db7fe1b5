//! Drone service: the fleet and its reservations. A reservation holds one drone for a time window
//! starting at the pickup time. A drone is never double-booked: the database itself refuses two
//! overlapping active windows on one drone (an exclusion constraint on PostgreSQL, a trigger on
//! SQLite), so concurrent requests cannot race past the application's own check.

mod entity;
mod fleet;
mod migration;
mod routes;
mod simulator;
mod store;
pub mod telemetry;

use std::future::Future;
use std::sync::{Arc, OnceLock};

use anyhow::Context;
use downstream::{Downstream, DownstreamSettings};
use secrecy::SecretString;
use serde::Deserialize;
use service_kit::{
    AuthSettings, DatabaseSettings, HttpSettings, RunningService, Service, ServiceBuilder,
};

pub use migration::Migrator;
pub use simulator::SimulatorSettings;

/// Drone settings (`APP_` environment variables with `__` for nesting).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub http: HttpSettings,
    pub database: DatabaseSettings,
    pub auth: AuthSettings,
    pub fleet: FleetSettings,
    pub reservations: ReservationSettings,
    /// Where the Delivery service is (`APP_DOWNSTREAM__DELIVERY_URL`): telemetry becomes its
    /// tracking events. The other URLs are not used here.
    pub downstream: DownstreamSettings,
    /// The fleet simulator (off unless `APP_SIMULATOR__ENABLED=true`; `make run` turns it on).
    pub simulator: SimulatorSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            http: HttpSettings::with_port(8083),
            database: DatabaseSettings::new("sqlite://data/drone.db?mode=rwc"),
            auth: AuthSettings::default(),
            fleet: FleetSettings::default(),
            reservations: ReservationSettings::default(),
            downstream: DownstreamSettings::default(),
            simulator: SimulatorSettings::default(),
        }
    }
}

/// The fleet, seeded at start: drones `drone-001`, `drone-002`, ... first those that carry up to
/// Small packages, then Medium, then Large. Drones no longer configured are retired (kept for
/// history, never reserved again).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct FleetSettings {
    pub small: u32,
    pub medium: u32,
    pub large: u32,
}

impl Default for FleetSettings {
    fn default() -> Self {
        Self {
            small: 10,
            medium: 6,
            large: 4,
        }
    }
}

/// How long a reservation holds its drone.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ReservationSettings {
    pub window_minutes: i64,
    pub expedited_window_minutes: i64,
    /// `Retry-After` when no drone is free.
    pub retry_after_secs: u64,
}

impl Default for ReservationSettings {
    fn default() -> Self {
        Self {
            window_minutes: 60,
            expedited_window_minutes: 30,
            retry_after_secs: 30,
        }
    }
}

pub(crate) struct AppState {
    pub db: sea_orm::DatabaseConnection,
    pub reservations: ReservationSettings,
    pub drones: fleet::DroneCache,
    /// Drone keys are derived from it (see [`telemetry`]).
    pub service_token: SecretString,
    /// The Delivery service, for telemetry.
    pub deliveries: Downstream,
    /// `drone_telemetry_reports_total{kind, outcome}`.
    pub telemetry_reports: prometheus::IntCounterVec,
}

/// The running Drone service.
pub struct Application {
    service: RunningService,
}

impl Service for Application {
    type Settings = Settings;
    const NAME: &'static str = "drone";

    /// Connects and migrates the database, seeds the fleet, then binds the HTTP listener.
    async fn build(settings: Settings) -> anyhow::Result<Self> {
        settings.auth.require_service_token()?;
        if settings.reservations.window_minutes <= 0
            || settings.reservations.expedited_window_minutes <= 0
        {
            anyhow::bail!("reservation window lengths must be positive");
        }
        tracing::info!(
            port = settings.http.port,
            sqlite = settings.database.is_sqlite(),
            fleet = ?settings.fleet,
            reservations = ?settings.reservations,
            "starting drone service"
        );
        let (mut builder, db) = ServiceBuilder::start::<Migrator>(
            Self::NAME,
            &settings.http,
            &settings.database,
            &settings.auth,
        )
        .await?;
        fleet::seed(&db, &settings.fleet)
            .await
            .context("seeding the fleet")?;
        let mut downstream = settings.downstream.clone();
        if secrecy::ExposeSecret::expose_secret(&downstream.service_token).is_empty() {
            downstream.service_token = settings.auth.service_token.clone();
        }
        let deliveries = Downstream::new(&downstream).context("the delivery service client")?;
        deliveries.register_metrics(builder.registry())?;
        let own_url = Arc::new(OnceLock::new());
        if settings.simulator.enabled {
            builder.spawn(simulator::run(
                db.clone(),
                settings.simulator.clone(),
                settings.auth.service_token.clone(),
                own_url.clone(),
                builder.stop_signal(),
            ));
        }
        let telemetry_reports = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "drone_telemetry_reports_total",
                "Drone telemetry reports by kind and outcome (recorded, retry, refused)",
            ),
            &["kind", "outcome"],
        )?;
        builder
            .registry()
            .register(Box::new(telemetry_reports.clone()))?;
        let state = actix_web::web::Data::new(AppState {
            db,
            reservations: settings.reservations.clone(),
            drones: fleet::DroneCache::new(),
            service_token: settings.auth.service_token.clone(),
            deliveries,
            telemetry_reports,
        });
        let service = builder
            .openapi(routes::openapi())
            .build(move |cfg| routes::configure(cfg, state.clone()))?;
        let host = match settings.http.host.as_str() {
            "0.0.0.0" | "::" | "" => "127.0.0.1",
            h => h,
        };
        let _ = own_url.set(format!("http://{host}:{}", service.port()));
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
