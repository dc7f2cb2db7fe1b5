//! Ingestion: the client-facing booking API. A booking is answered `202` only after the
//! partitioned log has confirmed it; when the log is unavailable or the adaptive limit on bookings
//! under way is reached (see [`admission`]) the answer is an immediate `503` with `Retry-After`, and nothing is half-accepted.
//!
//! `GET` answers from a read model in Ingestion's own database: written through when a request is
//! accepted, and advanced by the saga's lifecycle events from the `workflow-events` log, so reads
//! never call the Scheduler.

mod admission;
mod follow;
mod migration;
mod readmodel;
mod routes;
mod tracking;
mod webhooks;

use std::future::Future;
use std::sync::Arc;

use admission::Admission;
use anyhow::Context;
use messaging::{BrokerCheck, MessagingSettings};
use serde::Deserialize;
use service_kit::{
    AuthSettings, DatabaseSettings, HttpSettings, RunningService, Service, ServiceBuilder,
};

pub use admission::AdmissionSettings;
pub use migration::Migrator;
pub use tracking::TrackingSettings;
pub use webhooks::WebhookSettings;

/// Ingestion settings (`APP_` environment variables with `__` for nesting).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub http: HttpSettings,
    pub database: DatabaseSettings,
    pub auth: AuthSettings,
    pub messaging: MessagingSettings,
    pub ingestion: IngestionSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            http: HttpSettings::with_port(8080),
            database: DatabaseSettings::new("sqlite://data/ingestion.db?mode=rwc"),
            auth: AuthSettings::default(),
            messaging: MessagingSettings::default(),
            ingestion: IngestionSettings::default(),
        }
    }
}

/// Limits and rules of the booking API.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct IngestionSettings {
    /// Partitions of the `delivery-requests` and `workflow-events` logs (same everywhere).
    pub partitions: u32,
    /// The most bookings under way at once: the ceiling of the adaptive limit (`admission`),
    /// above which clients get `503` at once.
    pub max_in_flight: usize,
    /// The adaptive limit on bookings under way.
    pub admission: AdmissionSettings,
    /// Sustained requests per second allowed per account (per replica).
    pub rate_per_second: u32,
    /// Requests an account may burst above the sustained rate.
    pub rate_burst: u32,
    /// How far in the past a pickup time may be (clock skew between clients and us).
    pub pickup_skew_secs: i64,
    /// `Retry-After` for overload and broker outages.
    pub retry_after_secs: u64,
    /// Follow `workflow-events` to advance request states (off only in tests of other parts).
    pub follow_workflow_events: bool,
    /// `GET /api/deliveries/{id}` and its event stream.
    pub tracking: TrackingSettings,
    /// Signed webhooks of client accounts (`webhooks` module).
    pub webhooks: WebhookSettings,
}

impl Default for IngestionSettings {
    fn default() -> Self {
        Self {
            partitions: 8,
            max_in_flight: 20_000,
            admission: AdmissionSettings::default(),
            rate_per_second: 50,
            rate_burst: 100,
            pickup_skew_secs: 300,
            retry_after_secs: 1,
            follow_workflow_events: true,
            tracking: TrackingSettings::default(),
            webhooks: WebhookSettings::default(),
        }
    }
}

/// The running Ingestion service.
pub struct Application {
    service: RunningService,
}

impl Service for Application {
    type Settings = Settings;
    const NAME: &'static str = "ingestion";

    /// Connects the database and the broker, declares the logs, then binds the HTTP listener.
    async fn build(settings: Settings) -> anyhow::Result<Self> {
        settings.auth.require_jwt_secret()?;
        let s = &settings.ingestion;
        if s.partitions == 0 || s.max_in_flight == 0 || s.rate_per_second == 0 {
            anyhow::bail!(
                "ingestion partitions, max_in_flight and rate_per_second must be positive"
            );
        }
        tracing::info!(
            port = settings.http.port,
            partitions = s.partitions,
            max_in_flight = s.max_in_flight,
            rate_per_second = s.rate_per_second,
            rate_burst = s.rate_burst,
            "starting ingestion service"
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
        let requests = broker
            .log(contracts::DELIVERY_REQUESTS_LOG, s.partitions)
            .await
            .context("declaring the delivery-requests log")?;
        let store = readmodel::ReadModel::start(db.clone());
        let webhooks = webhooks::Webhooks::start(&mut builder, db.clone(), &s.webhooks)?;
        // The read model and the webhooks follow `workflow-events` on one reader.
        let projection = s.follow_workflow_events.then(|| {
            Arc::new(readmodel::Projection {
                db: db.clone(),
                changed: store.changes(),
            })
        });
        let hooks = webhooks.follower();
        if projection.is_some() || hooks.is_some() {
            let events = broker
                .log(contracts::WORKFLOW_EVENTS_LOG, s.partitions)
                .await
                .context("declaring the workflow-events log")?;
            let stop = builder.stop_signal();
            let task = match (projection, hooks) {
                (Some(p), Some(w)) => {
                    Some(follow::start(Arc::new(follow::Both::new(p, w)), db, events, stop).await?)
                }
                (Some(p), None) => Some(follow::start(p, db, events, stop).await?),
                (None, Some(w)) => Some(follow::start(w, db, events, stop).await?),
                (None, None) => None,
            };
            builder.adopt(task);
        }
        let admission = Arc::new(Admission::new(&s.admission, s.max_in_flight)?);
        admission.register(builder.registry())?;
        let tracking = actix_web::web::Data::new(tracking::Tracking::new(
            store.clone(),
            &s.tracking,
            s.retry_after_secs,
        ));
        let shed = routes::shed(admission.clone(), s.retry_after_secs);
        let state = actix_web::web::Data::new(routes::AppState::new(
            requests,
            store,
            admission,
            &settings.auth,
            &settings.ingestion,
        ));
        let service = builder
            .openapi(routes::openapi())
            .readiness(BrokerCheck(broker))
            .shed(shed)
            .build(move |cfg| {
                routes::configure(cfg, state.clone());
                tracking::configure(cfg, tracking.clone());
                webhooks::configure(cfg, webhooks.clone());
            })?;
        Ok(Self { service })
    }

    fn port(&self) -> u16 {
        self.service.port()
    }

    /// Serves until `shutdown` resolves; in-flight requests finish first, then the followers of
    /// `workflow-events` finish the batch they are applying.
    async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        self.service.run_until(shutdown).await
    }
}
