//! ThirdParty service: legs booked with contracted carriers when the drone fleet cannot do a
//! delivery alone (seed step 3, the saga's ArrangeThirdParty). A carrier takes the package from
//! the pickup to a hand-over point within the drones' range of the drop-off, or all the way.
//!
//! Carriers come from the settings and are kept in the `carriers` table (synced at start), so
//! legs reference them. Each carrier takes a number of legs per (UTC) pickup day: a counter row
//! per carrier and day is raised by one conditional statement in the transaction that inserts the
//! leg, so two requests racing for a carrier's last slot cannot both take it, on PostgreSQL and
//! on SQLite alike. A cancelled leg gives its slot back.

mod carriers;
mod entity;
mod migration;
mod plan;
mod routes;
mod store;

use std::collections::BTreeMap;
use std::future::Future;

use anyhow::Context;
use serde::Deserialize;
use service_kit::{
    AuthSettings, DatabaseSettings, HttpSettings, RunningService, Service, ServiceBuilder,
};

pub use migration::Migrator;

/// ThirdParty settings (`APP_` environment variables with `__` for nesting).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub http: HttpSettings,
    pub database: DatabaseSettings,
    pub auth: AuthSettings,
    /// The contracted carriers, by id (`APP_CARRIERS__<ID>__NAME`, `..__AREA_CENTER`, ...).
    /// Configuring any replaces the defaults as a whole, and each configured carrier needs every
    /// field. Carriers no longer configured are retired: kept for the legs that name them,
    /// never chosen again.
    pub carriers: BTreeMap<String, CarrierSettings>,
    pub legs: LegSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            http: HttpSettings::with_port(8087),
            database: DatabaseSettings::new("sqlite://data/thirdparty.db?mode=rwc"),
            auth: AuthSettings::default(),
            carriers: default_carriers(),
            legs: LegSettings::default(),
        }
    }
}

/// One contracted carrier (every field is required when carriers are configured).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CarrierSettings {
    pub name: String,
    /// Centre of its service area, `"0,lat,lon"`.
    pub area_center: String,
    /// It serves a route when both the pickup and the drop-off are within this many kilometres
    /// of the centre.
    pub area_radius_km: f64,
    /// Legs it takes per UTC day (by the pickup day).
    pub daily_capacity: u32,
    /// Heaviest package it takes, in kilograms.
    pub max_weight_kg: f64,
    /// Average speed on the road: the hand-over time is the pickup time plus distance / speed.
    pub speed_kmh: f64,
}

/// Three fictional carriers around Seattle (Fabrikam's test locations are there): a fast local
/// courier for light parcels, a regional freight line, and a slow heavy hauler with a wide area.
pub fn default_carriers() -> BTreeMap<String, CarrierSettings> {
    let carrier = |name: &str, center: &str, radius, capacity, max_weight, speed| CarrierSettings {
        name: name.to_owned(),
        area_center: center.to_owned(),
        area_radius_km: radius,
        daily_capacity: capacity,
        max_weight_kg: max_weight,
        speed_kmh: speed,
    };
    BTreeMap::from([
        (
            "cascade".to_owned(),
            carrier(
                "Cascade Courier Co.",
                "0,47.6062,-122.3321",
                150.0,
                200,
                50.0,
                70.0,
            ),
        ),
        (
            "rainier".to_owned(),
            carrier(
                "Rainier Regional Freight",
                "0,47.2529,-122.4443",
                250.0,
                100,
                200.0,
                55.0,
            ),
        ),
        (
            "olympic".to_owned(),
            carrier(
                "Olympic Heavy Haul",
                "0,47.6101,-122.2015",
                400.0,
                50,
                1000.0,
                40.0,
            ),
        ),
    ])
}

/// How leg requests are answered.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct LegSettings {
    /// `Retry-After` (seconds) when every carrier serving a route is fully booked that day.
    pub retry_after_secs: u64,
}

impl Default for LegSettings {
    fn default() -> Self {
        Self {
            retry_after_secs: 60,
        }
    }
}

pub(crate) struct AppState {
    pub db: sea_orm::DatabaseConnection,
    pub legs: LegSettings,
    /// `thirdparty_legs_total{outcome}`.
    pub outcomes: prometheus::IntCounterVec,
}

/// The outcomes counted by `thirdparty_legs_total`.
pub(crate) const OUTCOMES: [&str; 6] = [
    "booked",
    "replayed",
    "refused",
    "no_capacity",
    "no_route",
    "cancelled",
];

/// The running ThirdParty service.
pub struct Application {
    service: RunningService,
}

impl Service for Application {
    type Settings = Settings;
    const NAME: &'static str = "thirdparty";

    /// Checks the carriers, connects and migrates the database, syncs the carriers into it, then
    /// binds the HTTP listener.
    async fn build(settings: Settings) -> anyhow::Result<Self> {
        settings.auth.require_service_token()?;
        let carriers = carriers::validate(&settings.carriers)?;
        if carriers.is_empty() {
            tracing::warn!("no carriers configured: every leg request will be refused");
        }
        tracing::info!(
            port = settings.http.port,
            sqlite = settings.database.is_sqlite(),
            migrate_on_start = settings.database.migrate_on_start,
            carriers = ?settings.carriers,
            legs = ?settings.legs,
            "starting thirdparty service"
        );
        let (builder, db) = ServiceBuilder::start::<Migrator>(
            Self::NAME,
            &settings.http,
            &settings.database,
            &settings.auth,
        )
        .await?;
        carriers::sync(&db, &carriers)
            .await
            .context("syncing the carriers")?;
        let outcomes = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "thirdparty_legs_total",
                "Leg requests by outcome (booked, replayed, refused, no_capacity, no_route, cancelled)",
            ),
            &["outcome"],
        )?;
        for outcome in OUTCOMES {
            outcomes.with_label_values(&[outcome]);
        }
        builder.registry().register(Box::new(outcomes.clone()))?;
        let state = actix_web::web::Data::new(AppState {
            db,
            legs: settings.legs.clone(),
            outcomes,
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
