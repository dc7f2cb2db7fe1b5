//! Scheduler: a durable, idempotent saga per booking, over the partitioned `delivery-requests`
//! log. Pod `scheduler-<i>` of `R` replicas owns partitions `p % R == i`, each guarded by a lease
//! with a fencing token; it reads each partition from its checkpoint, runs many sagas at once,
//! and hands failures to the Supervisor through the transactional outbox.

mod booking;
pub mod control;
mod metrics;
mod migration;
pub mod ownership;
mod publisher;
pub(crate) mod routes;
mod worker;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use downstream::{Downstream, DownstreamSettings};
use futures::future::BoxFuture;
use messaging::{Broker, MessagingSettings, QueueOptions};
use saga::{Engine, Journal, RetryPolicy, Saga, SystemClock};
use serde::Deserialize;
use service_kit::{
    AuthSettings, DatabaseCheck, DatabaseSettings, HttpSettings, ReadinessCheck, RunningService,
};
use tokio::sync::{watch, Semaphore};

pub use booking::{
    CompensationRequest, CHECK_ACCOUNT, COMPENSATIONS_QUEUE, COMPENSATION_REQUESTED,
    CREATE_DELIVERY, REGISTER_PACKAGE, RESERVE_DRONE,
};
pub use control::{CompensationReport, RetryRequest};
pub use migration::Migrator;
pub use routes::{AttemptView, PartitionLease, StepStatus, Workflow, WorkflowSummary};

/// Scheduler settings (`APP_` environment variables with `__` for nesting).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub http: HttpSettings,
    pub database: DatabaseSettings,
    pub auth: AuthSettings,
    pub messaging: MessagingSettings,
    pub downstream: DownstreamSettings,
    pub scheduler: SchedulerSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            http: HttpSettings::with_port(8085),
            database: DatabaseSettings::new("sqlite://data/scheduler.db?mode=rwc"),
            auth: AuthSettings::default(),
            messaging: MessagingSettings::default(),
            downstream: DownstreamSettings::default(),
            scheduler: SchedulerSettings::default(),
        }
    }
}

/// Partitioning, concurrency and retry settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct SchedulerSettings {
    /// Partitions of the logs (the same number everywhere).
    pub partitions: u32,
    /// Replicas of the StatefulSet.
    pub replicas: u32,
    /// This replica's ordinal; taken from `HOSTNAME` (`scheduler-<i>`) when unset.
    pub ordinal: Option<u32>,
    /// Lease owner name; `HOSTNAME` when unset (stable per StatefulSet pod, so a restarted pod
    /// takes its partitions back at once).
    pub instance_id: Option<String>,
    /// Sagas running at once in this replica.
    pub max_concurrent_sagas: usize,
    pub lease_ttl_ms: u64,
    pub checkpoint_interval_ms: u64,
    pub steps: StepPolicies,
    /// Deliveries of a compensation request before it is parked.
    pub compensation_delivery_limit: u32,
}

impl Default for SchedulerSettings {
    fn default() -> Self {
        Self {
            partitions: 8,
            replicas: 1,
            ordinal: None,
            instance_id: None,
            max_concurrent_sagas: 2000,
            lease_ttl_ms: 4000,
            checkpoint_interval_ms: 200,
            steps: StepPolicies::default(),
            compensation_delivery_limit: 10,
        }
    }
}

/// Retry policy per step.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(default)]
pub struct StepPolicies {
    pub account: RetryPolicy,
    pub package: RetryPolicy,
    /// No drone free is retried until the pickup time (the saga's deadline).
    pub drone: RetryPolicy,
    pub delivery: RetryPolicy,
}

impl Default for StepPolicies {
    fn default() -> Self {
        let drone = RetryPolicy {
            min_delay_ms: 200,
            max_delay_ms: 60_000,
            max_attempts: 10_000,
            budget_ms: 365 * 24 * 3600 * 1000,
            jitter: true,
        };
        Self {
            account: RetryPolicy::default(),
            package: RetryPolicy::default(),
            drone,
            delivery: RetryPolicy::default(),
        }
    }
}

impl SchedulerSettings {
    fn hostname() -> String {
        std::env::var("HOSTNAME").unwrap_or_else(|_| "scheduler-0".into())
    }

    pub fn ordinal(&self) -> u32 {
        self.ordinal
            .or_else(|| ownership::ordinal_from_hostname(&Self::hostname()))
            .unwrap_or(0)
    }

    pub fn instance(&self) -> String {
        self.instance_id.clone().unwrap_or_else(Self::hostname)
    }

    /// The partitions this replica owns.
    pub fn owned_partitions(&self) -> Vec<u32> {
        ownership::owned_partitions(self.ordinal(), self.replicas, self.partitions)
    }
}

struct BrokerCheck(Arc<dyn Broker>);

impl ReadinessCheck for BrokerCheck {
    fn name(&self) -> &'static str {
        "broker"
    }

    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move { self.0.check().await.map_err(|e| e.to_string()) })
    }
}

/// The running Scheduler.
pub struct Application {
    service: RunningService,
    stop: watch::Sender<bool>,
    workers: Vec<tokio::task::JoinHandle<()>>,
    background: Vec<tokio::task::JoinHandle<()>>,
    journal: Arc<Journal>,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        settings.auth.require_service_token()?;
        let s = &settings.scheduler;
        if s.partitions == 0 || s.replicas == 0 || s.max_concurrent_sagas == 0 {
            anyhow::bail!(
                "scheduler partitions, replicas and max_concurrent_sagas must be positive"
            );
        }
        if s.ordinal() >= s.replicas {
            anyhow::bail!(
                "ordinal {} is not below replicas {}",
                s.ordinal(),
                s.replicas
            );
        }
        let owned = s.owned_partitions();
        tracing::info!(
            instance = %s.instance(),
            ordinal = s.ordinal(),
            replicas = s.replicas,
            partitions = ?owned,
            max_concurrent_sagas = s.max_concurrent_sagas,
            "starting scheduler"
        );
        let db = service_kit::db::connect(&settings.database)
            .await
            .context("connecting to the scheduler database")?;
        if settings.database.migrate_on_start {
            service_kit::db::migrate::<Migrator>(&settings.database, &db, "scheduler")
                .await
                .context("migrating the scheduler database")?;
        }
        let broker = messaging::connect(&settings.messaging)
            .await
            .context("connecting to the message broker")?;
        let requests = broker
            .log(contracts::DELIVERY_REQUESTS_LOG, s.partitions)
            .await?;
        let events = broker
            .log(contracts::WORKFLOW_EVENTS_LOG, s.partitions)
            .await?;
        let compensations = broker
            .queue(
                COMPENSATIONS_QUEUE,
                QueueOptions {
                    delivery_limit: s.compensation_delivery_limit,
                },
            )
            .await?;

        let mut downstream_settings = settings.downstream.clone();
        downstream_settings.service_token = settings.auth.service_token.clone();
        let builder = service_kit::ServiceBuilder::new("scheduler", settings.http.clone());
        let metrics = Arc::new(metrics::Metrics::register(builder.registry())?);
        let ctx = Arc::new(booking::Ctx {
            downstream: Downstream::new(&downstream_settings)?,
            cancellations: Mutex::new(Default::default()),
            metrics: metrics.clone(),
        });
        let journal = Arc::new(Journal::start(db.clone()));
        let engine = Arc::new(Engine::new(
            journal.clone(),
            Arc::new(SystemClock),
            Saga {
                kind: booking::KIND,
                steps: booking::steps(&s.steps, &metrics),
                hooks: Arc::new(booking::BookingHooks),
            },
        ));

        let mut background = Vec::new();
        let wake = Arc::new(tokio::sync::Notify::new());
        background.push(tokio::spawn(saga::outbox::relay(
            db.clone(),
            Arc::new(publisher::BrokerPublisher {
                events,
                compensations,
            }),
            wake,
            Duration::from_millis(50),
        )));
        {
            let db = db.clone();
            let gauge = metrics.outbox_backlog.clone();
            background.push(tokio::spawn(async move {
                loop {
                    if let Ok(n) = saga::outbox::backlog(&db).await {
                        gauge.set(i64::try_from(n).unwrap_or(i64::MAX));
                    }
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }));
        }

        let (stop, stop_rx) = watch::channel(false);
        let runner = Arc::new(control::Runner {
            engine: engine.clone(),
            ctx: ctx.clone(),
            instance: s.instance(),
        });
        let shared = Arc::new(worker::Shared {
            engine: engine.clone(),
            ctx,
            db: db.clone(),
            log: requests,
            settings: s.clone(),
            instance: s.instance(),
            permits: Arc::new(Semaphore::new(s.max_concurrent_sagas)),
        });
        let workers = owned
            .iter()
            .map(|p| tokio::spawn(worker::run_partition(shared.clone(), *p, stop_rx.clone())))
            .collect();

        let state = actix_web::web::Data::new(routes::State {
            engine,
            db: db.clone(),
            runner,
        });
        let service = builder
            .service_token(settings.auth.service_token.clone())
            .openapi(routes::openapi())
            .readiness(DatabaseCheck(db))
            .readiness(BrokerCheck(broker))
            .build(move |cfg| routes::configure(cfg, state.clone()))?;
        Ok(Self {
            service,
            stop,
            workers,
            background,
            journal,
        })
    }

    pub fn port(&self) -> u16 {
        self.service.port()
    }

    /// Serves until `shutdown` resolves, then saves checkpoints and releases the leases.
    /// Stops early, with an error, when the saga journal's writer dies (a restart resumes every
    /// saga from the journal, which beats a process that accepts work it can no longer record).
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
        let journal = self.journal.clone();
        let journal_died = std::sync::atomic::AtomicBool::new(false);
        let stop_on = async {
            tokio::select! {
                () = shutdown => {}
                () = journal.stopped() => {
                    tracing::error!("the saga journal's writer stopped; shutting down so that a restart resumes the sagas");
                    journal_died.store(true, std::sync::atomic::Ordering::SeqCst);
                }
            }
        };
        let mut result = self.service.run_until(stop_on).await;
        if journal_died.load(std::sync::atomic::Ordering::SeqCst) && result.is_ok() {
            result = Err(std::io::Error::other("the saga journal's writer stopped"));
        }
        let _ = self.stop.send(true);
        for w in self.workers {
            let _ = tokio::time::timeout(Duration::from_secs(5), w).await;
        }
        for b in self.background {
            b.abort();
        }
        result
    }
}
