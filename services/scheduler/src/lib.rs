//! Scheduler: a durable, idempotent saga per booking, over the partitioned `delivery-requests`
//! log. Pod `scheduler-<i>` of `R` replicas owns partitions `p % R == i`, each guarded by a lease
//! with a fencing token; it reads each partition from its checkpoint, runs many sagas at once,
//! and hands failures to the Supervisor through the transactional outbox.

pub mod accounts;
mod booking;
mod control;
mod dispatch;
mod metrics;
mod migration;
mod owner;
pub mod ownership;
mod partition;
mod publisher;
pub(crate) mod routes;
mod tracker;
mod waiting;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use downstream::{Domain, Downstream, DownstreamSettings};
use messaging::{BrokerCheck, MessagingSettings, PartitionedLog, QueueOptions};
use saga::outbox::Publisher;
use saga::{
    Clock, Engine, EngineSettings, RetryOverrides, RetryPolicy, Saga, SqlStore, Store, SystemClock,
};
use serde::Deserialize;
use service_kit::{
    AuthSettings, DatabaseSettings, HttpSettings, RunningService, Service, ServiceBuilder,
};
use tokio::sync::{watch, Semaphore};

pub use booking::{BookingInput, LegNeed, CARRIER_PREFIX, NO_DRONE_AVAILABLE};
pub use migration::Migrator;
pub use publisher::BrokerPublisher;

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
    /// How often each partition looks for sagas whose timer is due (a saga this replica makes
    /// due at once, by a signal or a retry, is looked for at once).
    pub dispatch_interval_ms: u64,
    /// A retry delay at least this long parks the saga in the journal and frees its slot.
    pub park_after_ms: u64,
    /// How often an idle outbox relay looks for rows (it is also woken by every commit).
    pub relay_poll_ms: u64,
    /// How long the outbox relay, woken by a commit, waits before it reads
    /// (`saga::outbox::Pace::linger`): events reach `workflow-events` that much later, in fewer,
    /// fuller broker messages. No saga waits for it.
    pub relay_linger_ms: u64,
    pub steps: StepPolicies,
    /// When a booking needs a carrier leg (ArrangeThirdParty).
    pub third_party: ThirdPartyRules,
    /// Whether RegisterPackage asks for a first booking's drone at the same time as its package
    /// when no carrier leg is needed (default true): the saga then waits for the slower of the
    /// two calls rather than for both in turn, and ReserveDrone takes that answer. `false` asks
    /// for the drone only in ReserveDrone, after the package (one booking holding a drone window
    /// a little earlier, or after its package was refused, until compensation releases it).
    pub reserve_drone_with_package: bool,
    /// Deliveries of a compensation request before it is parked.
    pub compensation_delivery_limit: u32,
    /// The copy of account statuses that answers the account check
    /// (`APP_SCHEDULER__ACCOUNTS__MAX_STALENESS_MS`; see [`accounts`]).
    pub accounts: accounts::AccountCopySettings,
}

/// What the drone fleet can do alone; beyond it, ArrangeThirdParty books a carrier leg
/// (`APP_SCHEDULER__THIRD_PARTY__DRONE_RANGE_KM`, `..__MAX_DRONE_PAYLOAD_KG`).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(default)]
pub struct ThirdPartyRules {
    /// Furthest a drone flies from pickup to drop-off, in kilometres. A drop-off further away
    /// gets a carrier leg to a hand-over point within this range of it.
    pub drone_range_km: f64,
    /// Heaviest package any drone carries, in kilograms. A heavier one goes by carrier all the way.
    pub max_drone_payload_kg: f64,
}

impl Default for ThirdPartyRules {
    fn default() -> Self {
        Self {
            drone_range_km: 20.0,
            max_drone_payload_kg: 25.0,
        }
    }
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
            dispatch_interval_ms: 1000,
            park_after_ms: 1000,
            relay_poll_ms: 500,
            relay_linger_ms: 25,
            steps: StepPolicies::default(),
            third_party: ThirdPartyRules::default(),
            reserve_drone_with_package: true,
            compensation_delivery_limit: 10,
            accounts: accounts::AccountCopySettings::default(),
        }
    }
}

/// Retry policy per step.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(default)]
pub struct StepPolicies {
    pub account: RetryPolicy,
    pub package: RetryPolicy,
    /// No carrier with capacity left is waited for like a drone (parked between attempts, at most
    /// `third_party.budget_ms`, never past the pickup time).
    #[serde(deserialize_with = "capacity_wait")]
    pub third_party: RetryPolicy,
    /// No drone free is retried, parked between attempts, for at most `drone.budget_ms` (the
    /// capacity wait, 10 minutes by default) and never past the pickup time; then the booking
    /// fails with `no-drone-available`. A field set alone overrides only itself: the others keep
    /// these capacity-wait defaults, not the generic ones.
    #[serde(deserialize_with = "capacity_wait")]
    pub drone: RetryPolicy,
    pub delivery: RetryPolicy,
}

/// The drone step's defaults: waiting for a free drone, parked between attempts, for 10 minutes.
fn drone_capacity_wait() -> RetryPolicy {
    RetryPolicy {
        min_delay_ms: 200,
        max_delay_ms: 60_000,
        max_attempts: 10_000,
        budget_ms: 10 * 60 * 1000,
        jitter: true,
    }
}

fn capacity_wait<'de, D: serde::Deserializer<'de>>(d: D) -> Result<RetryPolicy, D::Error> {
    RetryOverrides::deserialize(d).map(|o| o.over(drone_capacity_wait()))
}

impl Default for StepPolicies {
    fn default() -> Self {
        let drone = drone_capacity_wait();
        Self {
            account: RetryPolicy::default(),
            package: RetryPolicy::default(),
            third_party: drone,
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

/// The Scheduler's working parts, without HTTP: what a simulation drives with its own store, log,
/// publisher, domain services and clock, and what [`Application`] builds from the real ones.
pub struct Core {
    engine: Arc<Engine<booking::Ctx>>,
    ctx: Arc<booking::Ctx>,
    store: Arc<dyn Store>,
    log: Arc<dyn PartitionedLog>,
    publisher: Arc<dyn Publisher>,
    settings: SchedulerSettings,
    instance: String,
    permits: Arc<Semaphore>,
    owners: Mutex<BTreeMap<u32, Arc<owner::Owner>>>,
}

/// What a [`Core`] is built from.
pub struct CoreParts {
    pub store: Arc<dyn Store>,
    /// The `delivery-requests` log.
    pub log: Arc<dyn PartitionedLog>,
    /// Where outbox rows go (`workflow-events`, the compensation queue).
    pub publisher: Arc<dyn Publisher>,
    pub domain: Arc<dyn Domain>,
    /// The account copy the account check reads (fed by [`accounts::follow`], or by a test).
    pub accounts: Arc<accounts::AccountCopy>,
    pub clock: Arc<dyn Clock>,
    pub settings: SchedulerSettings,
    /// The lease owner name.
    pub instance: String,
    /// Where the metrics go.
    pub registry: prometheus::Registry,
}

impl Core {
    pub fn new(parts: CoreParts) -> anyhow::Result<Arc<Self>> {
        let s = &parts.settings;
        if s.partitions == 0 || s.replicas == 0 || s.max_concurrent_sagas == 0 {
            anyhow::bail!(
                "scheduler partitions, replicas and max_concurrent_sagas must be positive"
            );
        }
        let metrics = Arc::new(metrics::Metrics::register(&parts.registry)?);
        let permits = Arc::new(Semaphore::new(s.max_concurrent_sagas));
        metrics::SlotsInUse::register(&parts.registry, permits.clone(), s.max_concurrent_sagas)?;
        let rules = s.third_party;
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if !positive(rules.drone_range_km) || !positive(rules.max_drone_payload_kg) {
            anyhow::bail!(
                "scheduler third_party.drone_range_km and third_party.max_drone_payload_kg must be positive numbers"
            );
        }
        let ctx = Arc::new(booking::Ctx {
            domain: parts.domain,
            accounts: parts.accounts,
            metrics: metrics.clone(),
            third_party: rules,
            drone_with_package: s.reserve_drone_with_package,
        });
        let engine = Arc::new(Engine::new(
            parts.store.clone(),
            parts.clock,
            Saga {
                kind: booking::KIND,
                steps: booking::steps(&s.steps, &metrics),
                hooks: Arc::new(booking::BookingHooks),
            },
            EngineSettings {
                park_after: Duration::from_millis(s.park_after_ms),
            },
        ));
        Ok(Arc::new(Self {
            engine,
            ctx,
            store: parts.store,
            log: parts.log,
            publisher: parts.publisher,
            permits: permits.clone(),
            settings: parts.settings,
            instance: parts.instance,
            owners: Mutex::new(BTreeMap::new()),
        }))
    }

    /// Starts one ownership loop per partition this replica owns; they stop when `stop` turns
    /// true (or when their tasks are aborted: a crash).
    pub fn spawn(
        self: &Arc<Self>,
        stop: watch::Receiver<bool>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks: Vec<_> = self
            .settings
            .owned_partitions()
            .into_iter()
            .map(|p| tokio::spawn(partition::run_partition(self.clone(), p, stop.clone())))
            .collect();
        // One outbox relay for the partitions this replica holds, fenced by their leases.
        let core = self.clone();
        let mut stopped = stop;
        tasks.push(tokio::spawn(async move {
            let held: saga::outbox::Held = {
                let core = core.clone();
                Arc::new(move || core.fences())
            };
            tokio::select! {
                biased;
                _ = stopped.wait_for(|s| *s) => {}
                () = saga::outbox::relay_held(
                    core.store.clone(),
                    held,
                    core.publisher.clone(),
                    core.engine.outbox_written(),
                    saga::outbox::Pace {
                        poll: Duration::from_millis(core.settings.relay_poll_ms),
                        linger: Duration::from_millis(core.settings.relay_linger_ms),
                    },
                ) => {}
            }
        }));
        tasks
    }

    /// The fences of the partitions this replica holds.
    fn fences(&self) -> Vec<saga::Fence> {
        self.lock_owners()
            .values()
            .filter(|o| !o.is_lost())
            .map(|o| o.fence())
            .collect()
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Partitions this replica holds right now.
    pub fn held(&self) -> Vec<u32> {
        self.lock_owners().keys().copied().collect()
    }

    fn lock_owners(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, Arc<owner::Owner>>> {
        self.owners
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn owner(&self, partition: u32) -> Option<Arc<owner::Owner>> {
        self.lock_owners()
            .get(&partition)
            .filter(|o| !o.is_lost())
            .cloned()
    }

    fn hold(&self, partition: u32, owner: Arc<owner::Owner>) {
        self.lock_owners().insert(partition, owner);
    }

    fn let_go(&self, partition: u32, owner: &Arc<owner::Owner>) {
        let mut owners = self.lock_owners();
        if owners
            .get(&partition)
            .is_some_and(|o| Arc::ptr_eq(o, owner))
        {
            owners.remove(&partition);
        }
    }
}

/// The running Scheduler.
pub struct Application {
    service: RunningService,
    store: Arc<dyn Store>,
}

impl Service for Application {
    type Settings = Settings;
    const NAME: &'static str = "scheduler";

    async fn build(settings: Settings) -> anyhow::Result<Self> {
        settings.auth.require_service_token()?;
        let s = &settings.scheduler;
        if s.ordinal() >= s.replicas.max(1) {
            anyhow::bail!(
                "ordinal {} is not below replicas {}",
                s.ordinal(),
                s.replicas
            );
        }
        tracing::info!(
            instance = %s.instance(),
            ordinal = s.ordinal(),
            replicas = s.replicas,
            partitions = ?s.owned_partitions(),
            max_concurrent_sagas = s.max_concurrent_sagas,
            "starting scheduler"
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
            .await?;
        let events = broker
            .log(contracts::WORKFLOW_EVENTS_LOG, s.partitions)
            .await?;
        let compensations = broker
            .queue(
                contracts::COMPENSATIONS_QUEUE,
                QueueOptions {
                    delivery_limit: s.compensation_delivery_limit,
                },
            )
            .await?;

        let account_events = broker
            .log(
                contracts::ACCOUNT_EVENTS_LOG,
                contracts::ACCOUNT_EVENTS_PARTITIONS,
            )
            .await?;

        let mut downstream_settings = settings.downstream.clone();
        downstream_settings.service_token = settings.auth.service_token.clone();
        let store: Arc<dyn Store> = Arc::new(SqlStore::start(db.clone()));
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let accounts = Arc::new(accounts::AccountCopy::new(s.accounts, clock.clone()));
        let core = Core::new(CoreParts {
            store: store.clone(),
            log: requests,
            publisher: Arc::new(BrokerPublisher {
                events,
                compensations,
            }),
            domain: Arc::new(
                Downstream::new(&downstream_settings)?.with_metrics(builder.registry())?,
            ),
            accounts: accounts.clone(),
            clock,
            settings: s.clone(),
            instance: s.instance(),
            registry: builder.registry().clone(),
        })?;
        // Every replica keeps its own copy (and its own place in the log): account changes are
        // few, and a replica's copy must not depend on another replica being up.
        let follow = accounts::follow(
            db.clone(),
            accounts,
            account_events,
            s.instance(),
            core.ctx.metrics.clone(),
            builder.stop_signal(),
        );
        builder.spawn(follow);

        {
            let store = store.clone();
            let gauge = core.ctx.metrics.outbox_backlog.clone();
            builder.spawn_until_stopped(async move {
                loop {
                    if let Ok(n) = store.outbox_backlog().await {
                        gauge.set(i64::try_from(n).unwrap_or(i64::MAX));
                    }
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            });
        }

        builder.adopt(core.spawn(builder.stop_signal()));
        let state = actix_web::web::Data::new(routes::State { core, db });
        let service = builder
            .openapi(routes::openapi())
            .readiness(BrokerCheck(broker))
            .build(move |cfg| routes::configure(cfg, state.clone()))?;
        Ok(Self { service, store })
    }

    fn port(&self) -> u16 {
        self.service.port()
    }

    /// Serves until `shutdown` resolves, then saves checkpoints and releases the leases.
    /// Stops early, with an error, when the saga journal's writer dies (a restart resumes every
    /// saga from the journal, which beats a process that accepts work it can no longer record).
    async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let store = self.store.clone();
        let journal_died = std::sync::atomic::AtomicBool::new(false);
        let stop_on = async {
            tokio::select! {
                () = shutdown => {}
                () = store.stopped() => {
                    tracing::error!("the saga journal's writer stopped; shutting down so that a restart resumes the sagas");
                    journal_died.store(true, std::sync::atomic::Ordering::SeqCst);
                }
            }
        };
        let result = self.service.run_until(stop_on).await;
        if journal_died.load(std::sync::atomic::Ordering::SeqCst) && result.is_ok() {
            return Err(std::io::Error::other("the saga journal's writer stopped"));
        }
        result
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed test step should panic
mod tests {
    use super::*;

    /// Found while testing the stall display: `APP_SCHEDULER__STEPS__DRONE__MAX_DELAY_MS` alone
    /// turned the drone step's 10-minute capacity wait into the generic 8 attempts.
    #[test]
    fn one_drone_setting_keeps_the_capacity_wait_of_the_others() {
        let steps: StepPolicies =
            serde_json::from_str(r#"{"drone": {"max_delay_ms": 5000}}"#).unwrap();
        let wait = StepPolicies::default().drone;
        assert_eq!(steps.drone.max_delay_ms, 5000);
        assert_eq!(steps.drone.budget_ms, wait.budget_ms);
        assert_eq!(steps.drone.max_attempts, wait.max_attempts);
        assert_eq!(steps.drone.min_delay_ms, wait.min_delay_ms);
        // The other steps keep the generic defaults.
        assert_eq!(steps.account, RetryPolicy::default());
    }
}
