//! Supervisor: compensates failed and cancelled sagas, keeps a read model of every saga, flags the
//! stuck ones, and gives on-call staff a dashboard (DESIGN §7).
//!
//! - `compensation`: consumes `supervisor.compensations`, undoes the succeeded steps in reverse
//!   order, stores the outcome, reports it to the Scheduler (the owner of saga state), acks; what
//!   cannot be done is parked after the delivery limit and waits for a person.
//! - `parked`: moves parked requests out of the broker into the Supervisor's table, where they
//!   are listed and redriven from.
//! - `readmodel`: every saga from `workflow-events`, stuck detection, rates.
//! - `dashboard` (login, roles, CSRF, audit log) and `api` (the same data as JSON for tools).

mod actions;
mod api;
mod audit;
pub mod auth;
mod compensation;
mod dashboard;
mod entities;
mod metrics;
mod migration;
mod parked;
mod readmodel;
mod scheduler_client;
mod stall;
mod throttle;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use downstream::{Downstream, DownstreamSettings};
use messaging::{BrokerCheck, MessagingSettings, QueueOptions, WorkQueue};
use serde::Deserialize;
use service_kit::{
    AuthSettings, DatabaseSettings, HttpSettings, RunningService, Service, ServiceBuilder,
    StopSignal,
};

pub use auth::UserSettings;
pub use compensation::UndoRetry;
pub use migration::Migrator;
pub use scheduler_client::SchedulerLink;
pub use throttle::LoginSettings;

/// Supervisor settings (`APP_` environment variables with `__` for nesting).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub http: HttpSettings,
    pub database: DatabaseSettings,
    pub auth: AuthSettings,
    pub messaging: MessagingSettings,
    /// Package, Drone and Delivery (Account has nothing to undo).
    pub downstream: DownstreamSettings,
    pub scheduler: SchedulerLink,
    pub supervisor: SupervisorSettings,
    /// Dashboard users by name: `APP_USERS__ALICE__ROLE=operator`,
    /// `APP_USERS__ALICE__PASSWORD_HASH='$argon2id$...'`.
    pub users: BTreeMap<String, UserSettings>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            http: HttpSettings::with_port(8086),
            database: DatabaseSettings::new("sqlite://data/supervisor.db?mode=rwc"),
            auth: AuthSettings::default(),
            messaging: MessagingSettings::default(),
            downstream: DownstreamSettings::default(),
            scheduler: SchedulerLink::default(),
            supervisor: SupervisorSettings::default(),
            users: BTreeMap::new(),
        }
    }
}

/// Compensation, stuck detection and dashboard settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct SupervisorSettings {
    /// Partitions of `workflow-events` and `delivery-requests` (the same number everywhere).
    pub partitions: u32,
    /// Deliveries of a compensation request before it is parked; must equal the Scheduler's
    /// `compensation_delivery_limit` (both declare the queue).
    pub compensation_delivery_limit: u32,
    /// Compensation requests worked on at once.
    pub prefetch: u16,
    /// Backoff of one undo call within one delivery.
    pub retry: UndoRetry,
    /// An unfinished saga without progress for this long is flagged stuck.
    pub stuck_after_secs: u64,
    pub stuck_check_interval_ms: u64,
    /// How often the parked queue is counted.
    pub parked_refresh_ms: u64,
    pub session_ttl_secs: u64,
    /// Mark cookies `Secure` (behind TLS).
    pub secure_cookies: bool,
    /// Dashboard refresh period of the live counters.
    pub refresh_ms: u64,
    /// A partition whose oldest unstarted booking is older than this is flagged stalled (as is
    /// one whose lease has expired).
    pub stall_after_secs: u64,
    /// How often the partition leases, the log's unstarted bookings and the waiting sagas are
    /// looked at.
    pub partition_refresh_ms: u64,
    /// Failed-login delays and the password-check pool.
    pub login: LoginSettings,
}

impl Default for SupervisorSettings {
    fn default() -> Self {
        Self {
            partitions: 8,
            compensation_delivery_limit: 10,
            prefetch: 16,
            retry: UndoRetry::default(),
            stuck_after_secs: 600,
            stuck_check_interval_ms: 5000,
            parked_refresh_ms: 5000,
            session_ttl_secs: 8 * 3600,
            secure_cookies: false,
            refresh_ms: 2000,
            stall_after_secs: 60,
            partition_refresh_ms: 5000,
            login: LoginSettings::default(),
        }
    }
}

/// What the HTTP handlers share.
pub(crate) struct AppState {
    pub db: sea_orm::DatabaseConnection,
    pub scheduler: scheduler_client::SchedulerClient,
    pub queue: Arc<dyn WorkQueue>,
    pub rates: Arc<readmodel::Rates>,
    pub metrics: Arc<metrics::Metrics>,
    pub settings: SupervisorSettings,
    /// Partition leases, unstarted bookings and waiting sagas, as last looked at.
    pub stall: Arc<stall::Watch>,
    /// The Supervisor's own client of the domain services (its compensations' calls), for the
    /// state of its circuit breakers.
    pub downstream: Downstream,
}

/// The running Supervisor.
pub struct Application {
    service: RunningService,
}

impl Service for Application {
    type Settings = Settings;
    const NAME: &'static str = "supervisor";

    async fn build(settings: Settings) -> anyhow::Result<Self> {
        settings.auth.require_service_token()?;
        let s = settings.supervisor.clone();
        if s.partitions == 0 || s.compensation_delivery_limit == 0 || s.prefetch == 0 {
            anyhow::bail!(
                "supervisor partitions, compensation_delivery_limit and prefetch must be positive"
            );
        }
        if settings.users.is_empty() {
            tracing::warn!(
                "no dashboard users configured (APP_USERS__<name>__ROLE and __PASSWORD_HASH)"
            );
        }
        tracing::info!(
            scheduler = %settings.scheduler.url,
            partitions = s.partitions,
            delivery_limit = s.compensation_delivery_limit,
            stuck_after_secs = s.stuck_after_secs,
            stall_after_secs = s.stall_after_secs,
            users = ?settings.users.keys().collect::<Vec<_>>(),
            "starting supervisor"
        );
        let (builder, db) = ServiceBuilder::start::<Migrator>(
            Self::NAME,
            &settings.http,
            &settings.database,
            &settings.auth,
        )
        .await?;
        // In-flight compensations finish or go back to the queue within this.
        let mut builder = builder.stop_within(Duration::from_secs(6));
        auth::seed_users(&db, &settings.users).await?;
        let broker = messaging::connect(&settings.messaging)
            .await
            .context("connecting to the message broker")?;
        let queue = broker
            .queue(
                contracts::COMPENSATIONS_QUEUE,
                QueueOptions {
                    delivery_limit: s.compensation_delivery_limit,
                },
            )
            .await?;
        let events = broker
            .log(contracts::WORKFLOW_EVENTS_LOG, s.partitions)
            .await?;
        // Read only, to age the bookings no Scheduler has started (see `stall`).
        let requests = broker
            .log(contracts::DELIVERY_REQUESTS_LOG, s.partitions)
            .await?;

        let metrics = Arc::new(metrics::Metrics::register(builder.registry())?);
        let scheduler = scheduler_client::SchedulerClient::new(
            &settings.scheduler,
            settings.auth.service_token.clone(),
        )?;
        let mut downstream_settings = settings.downstream.clone();
        downstream_settings.service_token = settings.auth.service_token.clone();
        let downstream = Downstream::new(&downstream_settings)?.with_metrics(builder.registry())?;
        let compensator = Arc::new(compensation::Compensator {
            db: db.clone(),
            downstream: downstream.clone(),
            scheduler: scheduler.clone(),
            metrics: metrics.clone(),
            retry: s.retry,
            delivery_limit: s.compensation_delivery_limit,
        });

        let rates = Arc::new(readmodel::Rates::default());
        let stop = builder.stop_signal();
        builder.adopt(readmodel::follow(db.clone(), events, rates.clone(), stop.clone()).await?);
        builder.spawn(compensation::consume(
            compensator,
            queue.clone(),
            s.prefetch,
            stop.clone(),
        ));
        builder.spawn(readmodel::watch_stuck(
            db.clone(),
            metrics.clone(),
            chrono::Duration::seconds(i64::try_from(s.stuck_after_secs).unwrap_or(i64::MAX / 1000)),
            Duration::from_millis(s.stuck_check_interval_ms.max(100)),
            stop.clone(),
        ));
        builder.spawn(parked::keep(db.clone(), queue.clone(), stop.clone()));
        builder.spawn(count_parked(
            db.clone(),
            queue.clone(),
            metrics.clone(),
            Duration::from_millis(s.parked_refresh_ms.max(100)),
            stop.clone(),
        ));

        let stall = Arc::new(stall::Watch::new(
            s.partitions,
            Duration::from_secs(s.stall_after_secs),
        ));
        builder.spawn(stall::run(
            stall.clone(),
            scheduler.clone(),
            requests,
            metrics.clone(),
            Duration::from_millis(s.partition_refresh_ms.max(100)),
            stop,
        ));
        let state = actix_web::web::Data::new(AppState {
            db: db.clone(),
            scheduler,
            queue,
            rates,
            metrics,
            settings: s.clone(),
            stall,
            downstream,
        });
        let sessions = actix_web::web::Data::new(auth::Sessions::new(db, &s));
        let service = builder
            .openapi(api::openapi())
            .readiness(BrokerCheck(broker))
            .build(move |cfg| {
                cfg.app_data(state.clone()).app_data(sessions.clone());
                api::configure(cfg);
                dashboard::configure(cfg);
            })?;
        Ok(Self { service })
    }

    fn port(&self) -> u16 {
        self.service.port()
    }

    /// Serves until `shutdown` resolves; in-flight compensations finish or go back to the queue.
    async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        self.service.run_until(shutdown).await
    }
}

async fn count_parked(
    db: sea_orm::DatabaseConnection,
    queue: Arc<dyn WorkQueue>,
    metrics: Arc<metrics::Metrics>,
    every: Duration,
    mut stop: StopSignal,
) {
    loop {
        match parked::count_waiting(&db).await {
            Ok(n) => metrics.parked.set(i64::try_from(n).unwrap_or(i64::MAX)),
            Err(e) => tracing::warn!(error = %e, "counting parked messages failed"),
        }
        match queue.depth().await {
            Ok(n) => metrics
                .queue_depth
                .set(i64::try_from(n).unwrap_or(i64::MAX)),
            Err(e) => tracing::warn!(error = %e, "reading the compensation queue depth failed"),
        }
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}
