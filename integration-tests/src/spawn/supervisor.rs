use std::collections::BTreeMap;
use std::time::Duration;

use downstream::DownstreamSettings;
use messaging::MessagingSettings;
use secrecy::SecretString;
use serde_json::Value;

use crate::faults::FaultProxy;
use crate::wait::{done_if, eventually, poll};
use crate::{amqp_url, spawn, test_auth, test_http, Backend, Suite, TestApp, TestDb};

/// Dashboard logins of the test supervisor: (user, password).
pub const OPERATOR: (&str, &str) = ("olivia", "operator-password-1");
pub const VIEWER: (&str, &str) = ("victor", "viewer-password-1");

/// A Supervisor wired to a [`Suite`] and its Scheduler. Its calls to Package, ThirdParty, Drone
/// and Delivery pass through fault injectors the test can switch (`set_faults`), separate from the
/// Scheduler's.
pub struct SupervisorApp {
    pub app: TestApp,
    pub settings: supervisor::Settings,
    pub package: FaultProxy,
    pub thirdparty: FaultProxy,
    pub drone: FaultProxy,
    pub delivery: FaultProxy,
}

/// Starts a Supervisor on a fresh database, with fast undo retries, one operator and one viewer.
/// `adjust` sees the settings last (e.g. the delivery limit, which must match the Scheduler's).
pub async fn spawn_supervisor(
    backend: Backend,
    suite: &Suite,
    scheduler: &TestApp,
    adjust: impl FnOnce(&mut supervisor::Settings),
) -> SupervisorApp {
    let db = TestDb::new(backend, "supervisor").await;
    let package = FaultProxy::start(&suite.package.address, Vec::new()).await;
    let thirdparty = FaultProxy::start(&suite.thirdparty.address, Vec::new()).await;
    let drone = FaultProxy::start(&suite.drone.address, Vec::new()).await;
    let delivery = FaultProxy::start(&suite.delivery.address, Vec::new()).await;
    let mut messaging = MessagingSettings::new(amqp_url());
    messaging.prefix = suite.scheduler_settings.messaging.prefix.clone();
    messaging.connection_name = format!("{}-supervisor", messaging.prefix);
    let user = |role: &str, password: &str| supervisor::UserSettings {
        role: role.to_owned(),
        password: Some(SecretString::from(password.to_owned())),
        password_hash: None,
    };
    let mut settings = supervisor::Settings {
        http: test_http(),
        database: db.settings.clone(),
        auth: test_auth(),
        messaging,
        downstream: DownstreamSettings {
            package_url: package.url.clone(),
            thirdparty_url: thirdparty.url.clone(),
            drone_url: drone.url.clone(),
            delivery_url: delivery.url.clone(),
            timeout_ms: 1000,
            ..DownstreamSettings::default()
        },
        scheduler: supervisor::SchedulerLink {
            url: scheduler.address.clone(),
            ..Default::default()
        },
        supervisor: supervisor::SupervisorSettings {
            partitions: suite.scheduler_settings.scheduler.partitions,
            compensation_delivery_limit: suite
                .scheduler_settings
                .scheduler
                .compensation_delivery_limit,
            retry: supervisor::UndoRetry {
                min_delay_ms: 20,
                max_delay_ms: 100,
                max_times: 3,
            },
            stuck_check_interval_ms: 200,
            parked_refresh_ms: 300,
            refresh_ms: 500,
            ..Default::default()
        },
        users: BTreeMap::from([
            (OPERATOR.0.to_owned(), user("operator", OPERATOR.1)),
            (VIEWER.0.to_owned(), user("viewer", VIEWER.1)),
        ]),
    };
    adjust(&mut settings);
    let app = spawn::<supervisor::Application>(settings.clone(), Some(db)).await;
    SupervisorApp {
        app,
        settings,
        package,
        thirdparty,
        drone,
        delivery,
    }
}

impl SupervisorApp {
    /// Waits until the Supervisor's read model shows the saga in `state`; returns its detail.
    pub async fn saga(&self, id: uuid::Uuid, state: &str, within: Duration) -> Value {
        eventually(
            within,
            format!("the supervisor to see saga {id} in {state}"),
            async || {
                let r = self.app.get(&format!("/api/sagas/{id}")).await;
                done_if(r.status == 200 && r.body["saga"]["state"] == state, r.body)
            },
        )
        .await
    }

    /// Parked compensation requests of saga `id`, waiting up to `within` for at least one.
    pub async fn parked_of(&self, id: uuid::Uuid, within: Duration) -> Vec<Value> {
        poll(within, Duration::from_millis(200), async || {
            let r = self.app.get("/api/parked").await;
            let mine: Vec<Value> = r
                .body
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter(|p| p["deliveryId"] == id.to_string())
                .collect();
            if mine.is_empty() {
                Err(())
            } else {
                Ok(mine)
            }
        })
        .await
        .unwrap_or_default()
    }

    pub async fn stop(self) {
        self.app.stop().await;
    }
}
