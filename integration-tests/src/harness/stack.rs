//! The eight services as separate processes (the real binaries) on PostgreSQL and RabbitMQ, each
//! with a fresh database, all with one fresh queue prefix. The Scheduler reaches the domain
//! services, and the Supervisor the ones it undoes, through [`FaultProxy`]s in the test process,
//! so a test can make them fail or answer slowly; everything else talks directly, as in
//! production.
//!
//! Cleanup always happens, also when the test panics: dropping the [`Stack`] kills every process,
//! deletes the streams and queues of its prefix and drops its databases. Service logs are kept
//! under `target/stack-logs/<prefix>/` when the test failed (and removed after [`Stack::stop`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use messaging::MessagingSettings;
use serde_json::{json, Value};
use service_kit::auth::ClientTokens;
use uuid::Uuid;

use super::process::{binaries, reserve_port, workspace_dir, ServiceProcess};
use super::rabbit::RabbitNode;
use crate::faults::FaultProxy;
use crate::wait::{eventually_every, poll};
use crate::{amqp_url, Backend, TestDb, JWT_SECRET, OPERATOR, SERVICE_TOKEN, VIEWER};

/// The services of the suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Service {
    Account,
    Package,
    ThirdParty,
    Drone,
    Delivery,
    Ingestion,
    Scheduler,
    Supervisor,
}

impl Service {
    pub const ALL: [Service; 8] = [
        Service::Account,
        Service::Package,
        Service::ThirdParty,
        Service::Drone,
        Service::Delivery,
        Service::Ingestion,
        Service::Scheduler,
        Service::Supervisor,
    ];

    /// The crate, binary and database name.
    pub fn name(self) -> &'static str {
        match self {
            Service::Account => "account",
            Service::Package => "package",
            Service::ThirdParty => "thirdparty",
            Service::Drone => "drone",
            Service::Delivery => "delivery",
            Service::Ingestion => "ingestion",
            Service::Scheduler => "scheduler",
            Service::Supervisor => "supervisor",
        }
    }
}

/// How the stack is configured. Extra environment per service comes last and wins.
#[derive(Debug, Clone)]
pub struct StackOptions {
    pub partitions: u32,
    /// Drones carrying up to Small, Medium and Large packages.
    pub fleet: (u32, u32, u32),
    pub window_minutes: u32,
    pub max_concurrent_sagas: usize,
    /// Deliveries of a compensation request before it is parked (Scheduler and Supervisor).
    pub compensation_delivery_limit: u32,
    /// Database pool size of every service (the Scheduler gets twice as many).
    pub pool: u32,
    pub extra_env: BTreeMap<Service, Vec<(String, String)>>,
}

impl Default for StackOptions {
    fn default() -> Self {
        StackOptions {
            partitions: 4,
            fleet: (40, 20, 20),
            window_minutes: 30,
            max_concurrent_sagas: 64,
            compensation_delivery_limit: 10,
            pool: 3,
            extra_env: BTreeMap::new(),
        }
    }
}

impl StackOptions {
    /// Adds `key=value` to `service`'s environment.
    pub fn env(mut self, service: Service, key: &str, value: impl ToString) -> Self {
        self.extra_env
            .entry(service)
            .or_default()
            .push((key.to_owned(), value.to_string()));
        self
    }
}

/// Fault injectors in front of the domain services, as one caller sees them.
pub struct DownstreamFaults {
    pub account: Option<FaultProxy>,
    pub package: FaultProxy,
    pub thirdparty: FaultProxy,
    pub drone: FaultProxy,
    pub delivery: FaultProxy,
}

impl DownstreamFaults {
    /// Removes every fault: all requests are forwarded again.
    pub fn clear(&self) {
        if let Some(a) = &self.account {
            a.set_faults(Vec::new());
        }
        self.package.set_faults(Vec::new());
        self.thirdparty.set_faults(Vec::new());
        self.drone.set_faults(Vec::new());
        self.delivery.set_faults(Vec::new());
    }
}

/// Deletes the streams and queues of a prefix when dropped (last thing before the databases).
struct BrokerCleanup {
    url: String,
    prefix: String,
    partitions: u32,
}

impl Drop for BrokerCleanup {
    fn drop(&mut self) {
        let mut settings = MessagingSettings::new(self.url.clone());
        settings.prefix = self.prefix.clone();
        settings.connection_name = format!("{}-cleanup", self.prefix);
        let partitions = self.partitions;
        // Drop may run inside the test's runtime: do the async cleanup on a thread of its own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let connect =
                    tokio::time::timeout(Duration::from_secs(20), messaging::connect(&settings))
                        .await;
                if let Ok(Ok(b)) = connect {
                    let _ = b
                        .delete_log(contracts::DELIVERY_REQUESTS_LOG, partitions)
                        .await;
                    let _ = b
                        .delete_log(contracts::WORKFLOW_EVENTS_LOG, partitions)
                        .await;
                    let _ = b
                        .delete_log(
                            contracts::ACCOUNT_EVENTS_LOG,
                            contracts::ACCOUNT_EVENTS_PARTITIONS,
                        )
                        .await;
                    let _ = b.delete_queue(contracts::COMPENSATIONS_QUEUE).await;
                }
            });
        })
        .join();
    }
}

/// Keeps the log folder when the test failed, removes it otherwise.
struct LogDir(PathBuf);

impl Drop for LogDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("service logs kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// The running suite; see the module documentation.
pub struct Stack {
    // Dropped by `Drop for Stack`: processes, then streams and queues, then databases; the log
    // folder last (kept when the test failed).
    procs: BTreeMap<Service, ServiceProcess>,
    broker_cleanup: Option<BrokerCleanup>,
    dbs: BTreeMap<Service, TestDb>,
    logs: LogDir,
    pub prefix: String,
    pub amqp_url: String,
    pub partitions: u32,
    pub options: StackOptions,
    /// What the Scheduler calls.
    pub scheduler_faults: DownstreamFaults,
    /// What the Supervisor calls.
    pub supervisor_faults: DownstreamFaults,
    pub rabbit: RabbitNode,
    client: StackClient,
}

fn env(pairs: &[(&str, String)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

impl Stack {
    /// Starts all eight services and waits until each is ready.
    pub async fn start(options: StackOptions) -> Stack {
        telemetry::init_for_tests();
        let amqp = amqp_url();
        let prefix = format!("e2e{}", &Uuid::new_v4().simple().to_string()[..10]);
        let logs = workspace_dir().join("target/stack-logs").join(&prefix);
        std::fs::create_dir_all(&logs).expect("log folder");
        let logs = LogDir(logs);
        let broker_cleanup = BrokerCleanup {
            url: amqp.clone(),
            prefix: prefix.clone(),
            partitions: options.partitions,
        };
        let mut dbs = BTreeMap::new();
        for s in Service::ALL {
            dbs.insert(s, TestDb::new(Backend::Postgres, s.name()).await);
        }
        // Held until the services start: the fault proxies below bind ports too, and one given a
        // service's port made that service fail to start ("Address already in use", seen in
        // `make chaos`) while the proxy answered its readiness probe.
        let reserved: BTreeMap<Service, _> =
            Service::ALL.iter().map(|s| (*s, reserve_port())).collect();
        let ports: BTreeMap<Service, u16> = reserved.iter().map(|(s, r)| (*s, r.port())).collect();
        let address = |s: Service| format!("http://127.0.0.1:{}", ports[&s]);

        let scheduler_faults = DownstreamFaults {
            account: Some(FaultProxy::start(&address(Service::Account), Vec::new()).await),
            package: FaultProxy::start(&address(Service::Package), Vec::new()).await,
            thirdparty: FaultProxy::start(&address(Service::ThirdParty), Vec::new()).await,
            drone: FaultProxy::start(&address(Service::Drone), Vec::new()).await,
            delivery: FaultProxy::start(&address(Service::Delivery), Vec::new()).await,
        };
        let supervisor_faults = DownstreamFaults {
            account: None,
            package: FaultProxy::start(&address(Service::Package), Vec::new()).await,
            thirdparty: FaultProxy::start(&address(Service::ThirdParty), Vec::new()).await,
            drone: FaultProxy::start(&address(Service::Drone), Vec::new()).await,
            delivery: FaultProxy::start(&address(Service::Delivery), Vec::new()).await,
        };

        let log_level = std::env::var("STACK_LOG").unwrap_or_else(|_| "info".into());
        let p = options.partitions.to_string();
        let limit = options.compensation_delivery_limit.to_string();
        let messaging = |s: Service| {
            env(&[
                ("APP_MESSAGING__URL", amqp.clone()),
                ("APP_MESSAGING__PREFIX", prefix.clone()),
                (
                    "APP_MESSAGING__CONNECTION_NAME",
                    format!("{prefix}-{}", s.name()),
                ),
            ])
        };
        let mut envs: BTreeMap<Service, Vec<(String, String)>> = BTreeMap::new();
        for s in Service::ALL {
            let pool = if s == Service::Scheduler {
                options.pool * 2
            } else {
                options.pool
            };
            envs.insert(
                s,
                env(&[
                    ("APP_DATABASE__URL", dbs[&s].url()),
                    ("APP_DATABASE__MAX_CONNECTIONS", pool.to_string()),
                    ("APP_AUTH__SERVICE_TOKEN", SERVICE_TOKEN.into()),
                    ("APP_AUTH__JWT_SECRET", JWT_SECRET.into()),
                    ("APP_HTTP__WORKERS", "2".into()),
                    ("RUST_LOG", log_level.clone()),
                ]),
            );
        }
        let add = |envs: &mut BTreeMap<Service, Vec<(String, String)>>,
                   s,
                   more: Vec<(String, String)>| {
            envs.entry(s).or_default().extend(more);
        };
        add(
            &mut envs,
            Service::Drone,
            env(&[
                ("APP_FLEET__SMALL", options.fleet.0.to_string()),
                ("APP_FLEET__MEDIUM", options.fleet.1.to_string()),
                ("APP_FLEET__LARGE", options.fleet.2.to_string()),
                (
                    "APP_RESERVATIONS__WINDOW_MINUTES",
                    options.window_minutes.to_string(),
                ),
                ("APP_RESERVATIONS__RETRY_AFTER_SECS", "1".into()),
            ]),
        );
        add(&mut envs, Service::Account, messaging(Service::Account));
        add(&mut envs, Service::Ingestion, messaging(Service::Ingestion));
        add(
            &mut envs,
            Service::Ingestion,
            env(&[
                ("APP_INGESTION__PARTITIONS", p.clone()),
                ("APP_INGESTION__RATE_PER_SECOND", "100000".into()),
                ("APP_INGESTION__RATE_BURST", "100000".into()),
                ("APP_MESSAGING__CONFIRM_TIMEOUT_MS", "3000".into()),
            ]),
        );
        add(&mut envs, Service::Scheduler, messaging(Service::Scheduler));
        add(&mut envs, Service::Delivery, messaging(Service::Delivery));
        add(
            &mut envs,
            Service::Delivery,
            env(&[("APP_TRACKING__PARTITIONS", p.clone())]),
        );
        let sf = &scheduler_faults;
        let mut scheduler_env = env(&[
            (
                "APP_DOWNSTREAM__ACCOUNT_URL",
                sf.account
                    .as_ref()
                    .map(|a| a.url.clone())
                    .unwrap_or_default(),
            ),
            ("APP_DOWNSTREAM__PACKAGE_URL", sf.package.url.clone()),
            ("APP_DOWNSTREAM__THIRDPARTY_URL", sf.thirdparty.url.clone()),
            ("APP_DOWNSTREAM__DRONE_URL", sf.drone.url.clone()),
            ("APP_DOWNSTREAM__DELIVERY_URL", sf.delivery.url.clone()),
            ("APP_DOWNSTREAM__TIMEOUT_MS", "2000".into()),
            ("APP_SCHEDULER__PARTITIONS", p.clone()),
            ("APP_SCHEDULER__REPLICAS", "1".into()),
            ("APP_SCHEDULER__ORDINAL", "0".into()),
            ("APP_SCHEDULER__INSTANCE_ID", "scheduler-0".into()),
            ("APP_SCHEDULER__LEASE_TTL_MS", "2000".into()),
            ("APP_SCHEDULER__CHECKPOINT_INTERVAL_MS", "100".into()),
            (
                "APP_SCHEDULER__MAX_CONCURRENT_SAGAS",
                options.max_concurrent_sagas.to_string(),
            ),
            ("APP_SCHEDULER__COMPENSATION_DELIVERY_LIMIT", limit.clone()),
        ]);
        // Fast retries, so outages of seconds are ridden out within a test's time.
        for step in ["ACCOUNT", "PACKAGE", "THIRD_PARTY", "DRONE", "DELIVERY"] {
            scheduler_env.push((
                format!("APP_SCHEDULER__STEPS__{step}__MIN_DELAY_MS"),
                "20".into(),
            ));
            scheduler_env.push((
                format!("APP_SCHEDULER__STEPS__{step}__MAX_DELAY_MS"),
                "500".into(),
            ));
        }
        for step in ["ACCOUNT", "PACKAGE", "DELIVERY"] {
            // Enough budget to outlast a restarted domain service or RabbitMQ (≈ 30 s).
            scheduler_env.push((
                format!("APP_SCHEDULER__STEPS__{step}__MAX_ATTEMPTS"),
                "100".into(),
            ));
            scheduler_env.push((
                format!("APP_SCHEDULER__STEPS__{step}__BUDGET_MS"),
                "60000".into(),
            ));
        }
        add(&mut envs, Service::Scheduler, scheduler_env);
        add(
            &mut envs,
            Service::Supervisor,
            messaging(Service::Supervisor),
        );
        let vf = &supervisor_faults;
        add(
            &mut envs,
            Service::Supervisor,
            env(&[
                ("APP_DOWNSTREAM__PACKAGE_URL", vf.package.url.clone()),
                ("APP_DOWNSTREAM__THIRDPARTY_URL", vf.thirdparty.url.clone()),
                ("APP_DOWNSTREAM__DRONE_URL", vf.drone.url.clone()),
                ("APP_DOWNSTREAM__DELIVERY_URL", vf.delivery.url.clone()),
                ("APP_DOWNSTREAM__TIMEOUT_MS", "2000".into()),
                ("APP_SCHEDULER__URL", address(Service::Scheduler)),
                ("APP_SUPERVISOR__PARTITIONS", p.clone()),
                ("APP_SUPERVISOR__COMPENSATION_DELIVERY_LIMIT", limit.clone()),
                ("APP_SUPERVISOR__RETRY__MIN_DELAY_MS", "50".into()),
                ("APP_SUPERVISOR__RETRY__MAX_DELAY_MS", "500".into()),
                ("APP_SUPERVISOR__RETRY__MAX_TIMES", "5".into()),
                ("APP_SUPERVISOR__STUCK_CHECK_INTERVAL_MS", "500".into()),
                ("APP_SUPERVISOR__PARKED_REFRESH_MS", "500".into()),
                (
                    &format!("APP_USERS__{}__ROLE", OPERATOR.0.to_uppercase()),
                    "operator".into(),
                ),
                (
                    &format!("APP_USERS__{}__PASSWORD", OPERATOR.0.to_uppercase()),
                    OPERATOR.1.into(),
                ),
                (
                    &format!("APP_USERS__{}__ROLE", VIEWER.0.to_uppercase()),
                    "viewer".into(),
                ),
                (
                    &format!("APP_USERS__{}__PASSWORD", VIEWER.0.to_uppercase()),
                    VIEWER.1.into(),
                ),
            ]),
        );
        for (s, more) in &options.extra_env {
            add(&mut envs, *s, more.clone());
        }

        let names: Vec<&str> = Service::ALL.iter().map(|s| s.name()).collect();
        let bins = binaries(&names);
        drop(reserved);
        let mut procs = BTreeMap::new();
        for (s, bin) in Service::ALL.into_iter().zip(bins) {
            let e = envs.remove(&s).unwrap_or_default();
            procs.insert(
                s,
                ServiceProcess::spawn(s.name(), &bin, e, &logs.0, ports[&s]),
            );
        }
        let booted = Instant::now();
        for p in procs.values_mut() {
            p.wait_ready(Duration::from_secs(120)).await;
        }
        println!(
            "stack {prefix}: eight services ready {:.1} s after their start (logs in {})",
            booted.elapsed().as_secs_f64(),
            logs.0.display()
        );
        let client = StackClient {
            ingestion: address(Service::Ingestion),
            tokens: ClientTokens::new(&JWT_SECRET.to_owned().into()),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(15))
                .pool_max_idle_per_host(64)
                .build()
                .expect("http client"),
        };
        Stack {
            procs,
            broker_cleanup: Some(broker_cleanup),
            dbs,
            logs,
            partitions: options.partitions,
            prefix,
            amqp_url: amqp,
            options,
            scheduler_faults,
            supervisor_faults,
            rabbit: RabbitNode::from_env(),
            client,
        }
    }

    /// Where the service logs go (`target/stack-logs/<prefix>/<service>-<generation>.log`).
    pub fn log_dir(&self) -> &std::path::Path {
        &self.logs.0
    }

    /// How long after `since` the first saga completed (polled for up to `within`): the time a
    /// restarted Scheduler needed to do useful work again.
    pub async fn first_completion_after(
        &self,
        since: chrono::DateTime<chrono::Utc>,
        within: Duration,
    ) -> Option<Duration> {
        use sea_orm::{ConnectionTrait, Database, DbBackend, Statement};
        let db = Database::connect(self.database_url(Service::Scheduler))
            .await
            .ok()?;
        let sql = format!(
            "SELECT min(updated_at) AS t FROM saga_instances WHERE state = 'completed' \
             AND updated_at >= '{}'",
            since.to_rfc3339()
        );
        let found = poll(within, Duration::from_millis(20), async || {
            let row = db
                .query_one(Statement::from_string(DbBackend::Postgres, sql.clone()))
                .await
                .ok()
                .flatten();
            let t: Option<chrono::DateTime<chrono::Utc>> =
                row.and_then(|r| r.try_get("", "t").ok()).flatten();
            t.ok_or(())
        })
        .await;
        let _ = db.close().await;
        found.ok().and_then(|t| (t - since).to_std().ok())
    }

    pub fn service(&self, s: Service) -> &ServiceProcess {
        &self.procs[&s]
    }

    pub fn service_mut(&mut self, s: Service) -> &mut ServiceProcess {
        self.procs
            .get_mut(&s)
            .expect("every service is in the stack")
    }

    /// The database URL of a service (for reading its tables directly).
    pub fn database_url(&self, s: Service) -> String {
        self.dbs[&s].url()
    }

    /// A client of Ingestion, as booking apps use it.
    pub fn client(&self) -> StackClient {
        self.client.clone()
    }

    /// `kill -9` a service.
    pub fn kill9(&mut self, s: Service) {
        self.service_mut(s).kill9();
    }

    /// Starts a service again (killing it first if it runs) and waits until it is ready;
    /// returns how long that took.
    pub async fn restart(&mut self, s: Service) -> Duration {
        let started = Instant::now();
        let p = self.service_mut(s);
        p.restart();
        p.wait_ready(Duration::from_secs(120)).await;
        started.elapsed()
    }

    /// Creates (or updates) an account with `status` (`active` or `suspended`), retrying for a
    /// while when Account is briefly unavailable (a busy shared PostgreSQL answers 503).
    pub async fn account(&self, id: &str, status: &str) {
        let what = format!("account {id} to be {status}");
        let every = Duration::from_millis(200);
        eventually_every(Duration::from_secs(30), every, what, async || {
            let r = self
                .client
                .http
                .put(
                    self.service(Service::Account)
                        .url(&format!("/api/accounts/{id}")),
                )
                .bearer_auth(SERVICE_TOKEN)
                .json(&json!({"name": id, "status": status}))
                .send()
                .await;
            match r {
                Ok(r) if r.status().is_success() => Ok(()),
                Ok(r) => Err(r.status().to_string()),
                Err(e) => Err(e.to_string()),
            }
        })
        .await;
    }

    /// The saga of `id` from the Scheduler's status API (`None` on 404 or no answer).
    pub async fn workflow(&self, id: Uuid) -> Option<Value> {
        let r = self
            .client
            .http
            .get(
                self.service(Service::Scheduler)
                    .url(&format!("/api/workflows/{id}")),
            )
            .bearer_auth(SERVICE_TOKEN)
            .send()
            .await
            .ok()?;
        if r.status() != 200 {
            return None;
        }
        r.json().await.ok()
    }

    /// Waits until the saga of `id` is in `state`; returns it. Panics with the last state seen.
    pub async fn wait_state(&self, id: Uuid, state: &str, within: Duration) -> Value {
        let seen = poll(within, Duration::from_millis(100), async || {
            match self.workflow(id).await {
                Some(w) if w["state"] == state => Ok(w),
                w => Err(w.unwrap_or_default()),
            }
        })
        .await;
        seen.unwrap_or_else(|last| {
            panic!(
                "saga {id} did not reach {state} within {within:?}; last seen: {last}\nscheduler log:\n{}",
                self.service(Service::Scheduler).log_tail(20)
            )
        })
    }

    /// The Supervisor's view of a saga (`GET /api/sagas/{id}`), with its compensations.
    pub async fn supervisor_saga(&self, id: Uuid) -> Value {
        self.service(Service::Supervisor)
            .get(&format!("/api/sagas/{id}"))
            .await
            .1
    }

    /// Stops every service gracefully (SIGTERM to all at once, SIGKILL after 10 s), then cleans
    /// up like a drop does.
    pub async fn stop(mut self) {
        let started = Instant::now();
        let stopping = self
            .procs
            .values_mut()
            .map(|p| p.terminate(Duration::from_secs(10)));
        let statuses = futures::future::join_all(stopping).await;
        let killed = statuses
            .iter()
            .filter(|s| {
                s.is_some_and(|s| std::os::unix::process::ExitStatusExt::signal(&s) == Some(9))
            })
            .count();
        let cleanup = Instant::now();
        drop(self);
        println!(
            "stack stopped in {:.1} s ({killed} needed SIGKILL), cleaned up in {:.1} s",
            (cleanup - started).as_secs_f64(),
            cleanup.elapsed().as_secs_f64()
        );
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for p in self.procs.values_mut() {
            p.kill9();
        }
        drop(self.broker_cleanup.take());
        // Each DROP DATABASE waits for a checkpoint: eight at once, not one after the other.
        let drops: Vec<_> = std::mem::take(&mut self.dbs)
            .into_values()
            .map(|db| std::thread::spawn(move || drop(db)))
            .collect();
        for d in drops {
            let _ = d.join();
        }
    }
}

impl TestDb {
    /// The database URL (with its secret exposed, for a child process's environment).
    pub fn url(&self) -> String {
        use secrecy::ExposeSecret;
        self.settings.url.expose_secret().to_owned()
    }
}

/// What a booking app sees of Ingestion. Cheap to clone.
#[derive(Clone)]
pub struct StackClient {
    pub ingestion: String,
    pub tokens: ClientTokens,
    pub http: reqwest::Client,
}

/// The answer to one client call: status (0 when no answer came) and body.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

impl StackClient {
    /// A client token for `owner`.
    pub fn token(&self, owner: &str) -> String {
        self.tokens
            .mint(owner, &[], chrono::Duration::hours(1))
            .expect("mint")
            .0
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        owner: &str,
        body: Option<&Value>,
    ) -> Answer {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.ingestion))
            .bearer_auth(self.token(owner));
        if let Some(b) = body {
            req = req.json(b);
        }
        match req.send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                Answer {
                    status,
                    body: r.json().await.unwrap_or(Value::Null),
                }
            }
            Err(e) => Answer {
                status: 0,
                body: Value::String(e.to_string()),
            },
        }
    }

    /// `POST /api/deliveryrequests`.
    pub async fn book(&self, body: &Value) -> Answer {
        let owner = body["ownerId"].as_str().unwrap_or_default().to_owned();
        self.call(
            reqwest::Method::POST,
            "/api/deliveryrequests",
            &owner,
            Some(body),
        )
        .await
    }

    /// Books and expects a `202`; returns the deliveryId.
    pub async fn book_ok(&self, body: &Value) -> Uuid {
        let a = self.book(body).await;
        assert_eq!(a.status, 202, "booking: {}", a.body);
        a.body["deliveryId"]
            .as_str()
            .and_then(|s| Uuid::parse_str(s).ok())
            .expect("deliveryId")
    }

    /// `DELETE /api/deliveryrequests/{id}` (cancel).
    pub async fn cancel(&self, owner: &str, id: Uuid) -> Answer {
        self.call(
            reqwest::Method::DELETE,
            &format!("/api/deliveryrequests/{id}"),
            owner,
            None,
        )
        .await
    }

    /// `PATCH /api/deliveryrequests/{id}` (reschedule).
    pub async fn reschedule(&self, owner: &str, id: Uuid, change: &Value) -> Answer {
        self.call(
            reqwest::Method::PATCH,
            &format!("/api/deliveryrequests/{id}"),
            owner,
            Some(change),
        )
        .await
    }

    /// `GET /api/deliveryrequests/{id}`: the state the client sees.
    pub async fn status(&self, owner: &str, id: Uuid) -> Answer {
        self.call(
            reqwest::Method::GET,
            &format!("/api/deliveryrequests/{id}"),
            owner,
            None,
        )
        .await
    }

    /// A booking body for `owner`, picked up `minutes` from now.
    pub fn booking(owner: &str, minutes: i64, size: &str) -> Value {
        json!({
            "ownerId": owner,
            "pickupLocation": "1 Main St",
            "dropOffLocation": "2 Side St",
            "pickupTime": (chrono::Utc::now() + chrono::Duration::minutes(minutes)).to_rfc3339(),
            "deadline": "",
            "expedited": false,
            "confirmationRequired": "None",
            "packageInfo": {"packageId": "client-pkg", "size": size, "weight": 1.5}
        })
    }
}
