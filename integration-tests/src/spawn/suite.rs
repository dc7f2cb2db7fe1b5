use std::time::Duration;

use downstream::DownstreamSettings;
use messaging::MessagingSettings;
use saga::RetryPolicy;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::faults::{Fault, FaultProxy};
use crate::{
    amqp_url, done_if, eventually, eventually_every, spawn, spawn_account_on, spawn_delivery_on,
    spawn_drone_with, spawn_ingestion, spawn_package, spawn_thirdparty, test_auth, test_http,
    Backend, IngestionApp, TestApp, TestDb,
};

/// Faults to put in front of the domain services the Scheduler calls.
#[derive(Debug, Clone, Default)]
pub struct SuiteFaults {
    pub account: Vec<Fault>,
    pub package: Vec<Fault>,
    pub thirdparty: Vec<Fault>,
    pub drone: Vec<Fault>,
    pub delivery: Vec<Fault>,
}

/// Every service so far, wired as in production: Ingestion → RabbitMQ → Scheduler → the five
/// domain services over HTTP (through fault injectors when asked), each on its own database.
pub struct Suite {
    pub account: TestApp,
    pub package: TestApp,
    /// The carriers' legs (ArrangeThirdParty), with the default carriers.
    pub thirdparty: TestApp,
    pub drone: TestApp,
    pub delivery: TestApp,
    pub ingestion: IngestionApp,
    /// Kept by the suite so a scheduler can be restarted on it.
    pub scheduler_db: TestDb,
    pub scheduler_settings: scheduler::Settings,
    pub faults: Vec<FaultProxy>,
}

fn fast(p: RetryPolicy) -> RetryPolicy {
    RetryPolicy {
        min_delay_ms: 20,
        max_delay_ms: 200,
        ..p
    }
}

pub async fn spawn_suite(backend: Backend, faults: SuiteFaults) -> Suite {
    spawn_suite_with(backend, faults, |_| {}, |_| {}).await
}

/// [`spawn_suite`] with Ingestion's and Drone's settings adjusted by the test first (webhooks to
/// local receivers, the fleet simulator, ...).
pub async fn spawn_suite_with(
    backend: Backend,
    faults: SuiteFaults,
    adjust_ingestion: impl FnOnce(&mut ingestion::Settings),
    adjust_drone: impl FnOnce(&mut drone::Settings),
) -> Suite {
    let ingestion = spawn_ingestion(backend, |s| {
        s.ingestion.rate_per_second = 100_000;
        s.ingestion.rate_burst = 100_000;
        adjust_ingestion(s);
    })
    .await;
    // Its changes go where this suite's Scheduler reads (directly, not through Ingestion's proxy).
    let mut account_messaging = MessagingSettings::new(amqp_url());
    account_messaging.prefix = ingestion.settings.messaging.prefix.clone();
    account_messaging.connection_name = format!("{}-account", account_messaging.prefix);
    let account = spawn_account_on(backend, account_messaging).await;
    let package = spawn_package(backend).await;
    let thirdparty = spawn_thirdparty(backend).await;
    // Its tracking events go where this Ingestion reads (directly, not through its proxy).
    let mut delivery_messaging = MessagingSettings::new(amqp_url());
    delivery_messaging.prefix = ingestion.settings.messaging.prefix.clone();
    delivery_messaging.connection_name = format!("{}-delivery", delivery_messaging.prefix);
    let delivery = spawn_delivery_on(
        backend,
        delivery_messaging,
        ingestion.settings.ingestion.partitions,
    )
    .await;
    // Drone telemetry becomes the Delivery service's tracking events.
    let delivery_base = delivery.url("");
    let drone = spawn_drone_with(backend, |s| {
        s.fleet.small = 30;
        s.fleet.medium = 10;
        s.fleet.large = 10;
        s.reservations.window_minutes = 30;
        s.reservations.retry_after_secs = 1;
        s.downstream.delivery_url = delivery_base;
        adjust_drone(s);
    })
    .await;
    let mut proxies = Vec::new();
    let account_url = through(&account, faults.account, &mut proxies).await;
    let package_url = through(&package, faults.package, &mut proxies).await;
    let thirdparty_url = through(&thirdparty, faults.thirdparty, &mut proxies).await;
    let drone_url = through(&drone, faults.drone, &mut proxies).await;
    let delivery_url = through(&delivery, faults.delivery, &mut proxies).await;

    let scheduler_db = TestDb::new(backend, "scheduler").await;
    let mut messaging = MessagingSettings::new(amqp_url());
    messaging.prefix = ingestion.settings.messaging.prefix.clone();
    messaging.connection_name = format!("{}-scheduler", messaging.prefix);
    let default_steps = scheduler::StepPolicies::default();
    let scheduler_settings = scheduler::Settings {
        http: test_http(),
        database: scheduler_db.settings.clone(),
        auth: test_auth(),
        messaging,
        downstream: DownstreamSettings {
            account_url,
            package_url,
            drone_url,
            delivery_url,
            thirdparty_url,
            timeout_ms: 1000,
            ..DownstreamSettings::default()
        },
        scheduler: scheduler::SchedulerSettings {
            partitions: ingestion.settings.ingestion.partitions,
            replicas: 1,
            ordinal: Some(0),
            instance_id: Some("scheduler-test-a".into()),
            lease_ttl_ms: 2000,
            checkpoint_interval_ms: 100,
            steps: scheduler::StepPolicies {
                account: fast(default_steps.account),
                package: fast(default_steps.package),
                third_party: fast(default_steps.third_party),
                drone: fast(default_steps.drone),
                delivery: fast(default_steps.delivery),
            },
            ..Default::default()
        },
    };
    Suite {
        account,
        package,
        thirdparty,
        drone,
        delivery,
        ingestion,
        scheduler_db,
        scheduler_settings,
        faults: proxies,
    }
}

/// The URL the scheduler should use for `app`: the app itself, or a fault injector before it.
async fn through(app: &TestApp, faults: Vec<Fault>, proxies: &mut Vec<FaultProxy>) -> String {
    if faults.is_empty() {
        return app.address.clone();
    }
    let proxy = FaultProxy::start(&app.address, faults).await;
    let url = proxy.url.clone();
    proxies.push(proxy);
    url
}

impl Suite {
    /// Starts a scheduler in this process on the suite's scheduler database.
    pub async fn start_scheduler(&self, adjust: impl FnOnce(&mut scheduler::Settings)) -> TestApp {
        let mut settings = self.scheduler_settings.clone();
        adjust(&mut settings);
        spawn::<scheduler::Application>(settings, None).await
    }

    /// Creates (or updates) an account with `status` (`active` or `suspended`).
    pub async fn account(&self, id: &str, status: &str) {
        let r = self
            .account
            .put(
                &format!("/api/accounts/{id}"),
                &json!({"name": id, "status": status}),
            )
            .await;
        assert!(r.status.is_success(), "account: {}", r.body);
    }

    /// A booking body for `owner`, picked up `hours` from now.
    pub fn booking(owner: &str, hours: i64, size: &str) -> Value {
        json!({
            "ownerId": owner,
            "pickupLocation": "1 Main St",
            "dropOffLocation": "2 Side St",
            "pickupTime": (chrono::Utc::now() + chrono::Duration::hours(hours)).to_rfc3339(),
            "deadline": "",
            "expedited": false,
            "confirmationRequired": "None",
            "packageInfo": {"packageId": "client-pkg", "size": size, "weight": 1.5}
        })
    }

    /// Books through Ingestion; returns the deliveryId.
    pub async fn book(&self, body: &Value) -> Uuid {
        let owner = body["ownerId"].as_str().unwrap_or_default();
        let token = self.ingestion.token(owner, &[]);
        let r = self
            .ingestion
            .app
            .call_with(
                reqwest::Method::POST,
                "/api/deliveryrequests",
                Some(body),
                Some(&token),
            )
            .await;
        assert_eq!(r.status, 202, "{}", r.body);
        r.body["deliveryId"]
            .as_str()
            .and_then(|s| Uuid::parse_str(s).ok())
            .expect("deliveryId")
    }

    /// Waits until the scheduler reports the workflow in `state`; returns it.
    pub async fn workflow(
        &self,
        scheduler: &TestApp,
        id: Uuid,
        state: &str,
        within: Duration,
    ) -> Value {
        let what = format!("workflow {id} to reach {state}");
        eventually_every(within, Duration::from_millis(50), what, async || {
            let r = scheduler.get(&format!("/api/workflows/{id}")).await;
            done_if(r.status == 200 && r.body["state"] == state, r.body)
        })
        .await
    }

    /// Waits until the client `owner` sees booking `id` in `state` through Ingestion's read model;
    /// returns what it sees.
    pub async fn client_state(
        &self,
        owner: &str,
        id: Uuid,
        state: &str,
        within: Duration,
    ) -> Value {
        let token = self.ingestion.token(owner, &[]);
        let what = format!("the client to see {id} as {state}");
        eventually(within, what, async || {
            let r = self
                .ingestion
                .app
                .call_with(
                    reqwest::Method::GET,
                    &format!("/api/deliveryrequests/{id}"),
                    None,
                    Some(&token),
                )
                .await;
            done_if(r.body["state"] == state, r.body)
        })
        .await
    }

    pub async fn stop(self) {
        self.ingestion.stop().await;
        let prefix = self.scheduler_settings.messaging.prefix.clone();
        let mut direct = MessagingSettings::new(amqp_url());
        direct.prefix = prefix;
        let broker = messaging::connect(&direct).await.ok();
        if let Some(b) = &broker {
            let _ = b.delete_queue(contracts::COMPENSATIONS_QUEUE).await;
        }
        self.account.stop().await;
        if let Some(b) = &broker {
            let _ = b
                .delete_log(
                    contracts::ACCOUNT_EVENTS_LOG,
                    contracts::ACCOUNT_EVENTS_PARTITIONS,
                )
                .await;
        }
        self.package.stop().await;
        self.thirdparty.stop().await;
        self.drone.stop().await;
        self.delivery.stop().await;
    }
}
