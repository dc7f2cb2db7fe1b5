//! Services run inside the test process: one generic [`spawn`] over [`Service`], and one
//! function per service that makes its settings (fresh database, migrations run at start, port 0).

mod ingestion;
mod standalone;
mod suite;
mod supervisor;

pub use ingestion::{spawn_ingestion, IngestionApp};
pub use standalone::Standalone;
pub use suite::{spawn_suite, spawn_suite_with, Suite, SuiteFaults};
pub use supervisor::{spawn_supervisor, SupervisorApp, OPERATOR, VIEWER};

use futures::FutureExt;
use service_kit::{AuthSettings, HttpSettings, Service};

use crate::{Backend, TestApp, TestDb, JWT_SECRET, SERVICE_TOKEN};

/// Builds `A` from `settings` and runs it in this process until the [`TestApp`] is stopped; `db`
/// (if any) goes with the app.
pub async fn spawn<A: Service + Send + 'static>(
    settings: A::Settings,
    db: Option<TestDb>,
) -> TestApp {
    let app = A::build(settings)
        .await
        .unwrap_or_else(|e| panic!("{} service starts: {e:?}", A::NAME));
    // The app stops when `stop` fires or its sender is dropped.
    TestApp::start(app.port(), db, |stop| {
        app.run_until(stop.map(drop)).map(drop)
    })
}

/// A service on a fresh database of its own; `settings` makes its settings from the database's.
async fn spawn_on_fresh_db<A: Service + Send + 'static>(
    backend: Backend,
    settings: impl FnOnce(service_kit::DatabaseSettings) -> A::Settings,
) -> TestApp {
    telemetry::init_for_tests();
    let db = TestDb::new(backend, A::NAME).await;
    spawn::<A>(settings(db.settings.clone()), Some(db)).await
}

/// A service on a fresh database that publishes on a log of its own (`log`, `partitions`, under
/// `messaging`'s prefix), deleted again when the service stops.
async fn spawn_with_own_log<A: Service + Send + 'static>(
    backend: Backend,
    messaging: messaging::MessagingSettings,
    (log, partitions): (&'static str, u32),
    settings: impl FnOnce(service_kit::DatabaseSettings) -> A::Settings,
) -> TestApp {
    telemetry::init_for_tests();
    let db = TestDb::new(backend, A::NAME).await;
    let app = A::build(settings(db.settings.clone()))
        .await
        .unwrap_or_else(|e| panic!("{} service starts: {e:?}", A::NAME));
    TestApp::start(app.port(), Some(db), |stop| async move {
        let _ = app.run_until(stop.map(drop)).await;
        if let Ok(broker) = messaging::connect(&messaging).await {
            let _ = broker.delete_log(log, partitions).await;
        }
    })
}

/// An Account service publishing its changes under a queue prefix of its own, removed again when
/// the service stops (a test of the Account service alone reads them, if at all, itself).
pub async fn spawn_account(backend: Backend) -> TestApp {
    let messaging = fresh_messaging("account");
    let log = (
        contracts::ACCOUNT_EVENTS_LOG,
        contracts::ACCOUNT_EVENTS_PARTITIONS,
    );
    spawn_with_own_log::<account::Application>(backend, messaging.clone(), log, |database| {
        account_settings(database, messaging)
    })
    .await
}

/// An Account service publishing its changes on `account-events` with `messaging` (the prefix
/// of the services that should read them, or a proxy the test controls); the caller removes the
/// log.
pub async fn spawn_account_on(
    backend: Backend,
    messaging: messaging::MessagingSettings,
) -> TestApp {
    spawn_on_fresh_db::<account::Application>(backend, |database| {
        account_settings(database, messaging)
    })
    .await
}

fn account_settings(
    database: service_kit::DatabaseSettings,
    messaging: messaging::MessagingSettings,
) -> account::Settings {
    account::Settings {
        http: test_http(),
        database,
        auth: test_auth(),
        messaging,
        ..Default::default()
    }
}

/// Direct RabbitMQ settings under a fresh queue prefix (`t<random>`), named after `service`.
pub fn fresh_messaging(service: &str) -> messaging::MessagingSettings {
    let mut messaging = messaging::MessagingSettings::new(crate::amqp_url());
    messaging.prefix = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    messaging.connection_name = format!("{}-{service}", messaging.prefix);
    messaging
}

pub async fn spawn_package(backend: Backend) -> TestApp {
    spawn_on_fresh_db::<package::Application>(backend, |database| package::Settings {
        http: test_http(),
        database,
        auth: test_auth(),
    })
    .await
}

pub async fn spawn_thirdparty(backend: Backend) -> TestApp {
    spawn_thirdparty_with(backend, |_| {}).await
}

/// A ThirdParty service whose settings the test adjusts first (its carriers, `Retry-After`).
pub async fn spawn_thirdparty_with(
    backend: Backend,
    adjust: impl FnOnce(&mut thirdparty::Settings),
) -> TestApp {
    spawn_on_fresh_db::<thirdparty::Application>(backend, |database| {
        let mut settings = thirdparty::Settings {
            http: test_http(),
            database,
            auth: test_auth(),
            ..Default::default()
        };
        adjust(&mut settings);
        settings
    })
    .await
}

/// A Delivery service publishing its tracking events under a queue prefix of its own, on one
/// partition, removed again when the service stops (a test of the Delivery service alone
/// reads them, if at all, itself).
pub async fn spawn_delivery(backend: Backend) -> TestApp {
    let messaging = fresh_messaging("delivery");
    let log = (contracts::WORKFLOW_EVENTS_LOG, 1);
    spawn_with_own_log::<delivery::Application>(backend, messaging.clone(), log, |database| {
        delivery::Settings {
            http: test_http(),
            database,
            auth: test_auth(),
            messaging,
            tracking: delivery::TrackingSettings { partitions: 1 },
        }
    })
    .await
}

/// A Delivery service publishing its tracking events with `messaging` (the prefix of the
/// Ingestion that should see them) on `partitions` partitions of `workflow-events` (Ingestion's).
pub async fn spawn_delivery_on(
    backend: Backend,
    messaging: messaging::MessagingSettings,
    partitions: u32,
) -> TestApp {
    spawn_on_fresh_db::<delivery::Application>(backend, |database| delivery::Settings {
        http: test_http(),
        database,
        auth: test_auth(),
        messaging,
        tracking: delivery::TrackingSettings { partitions },
    })
    .await
}

pub async fn spawn_drone(backend: Backend) -> TestApp {
    spawn_drone_with(backend, |_| {}).await
}

/// A Drone service whose settings the test adjusts first (fleet size, window length, ...).
pub async fn spawn_drone_with(
    backend: Backend,
    adjust: impl FnOnce(&mut drone::Settings),
) -> TestApp {
    spawn_on_fresh_db::<drone::Application>(backend, |database| {
        let mut settings = drone::Settings {
            http: test_http(),
            database,
            auth: test_auth(),
            ..Default::default()
        };
        adjust(&mut settings);
        settings
    })
    .await
}

/// HTTP settings for tests: localhost, a free port, two workers.
pub fn test_http() -> HttpSettings {
    HttpSettings {
        host: "127.0.0.1".into(),
        port: 0,
        workers: 2,
        ..HttpSettings::default()
    }
}

pub fn test_auth() -> AuthSettings {
    AuthSettings::new(SERVICE_TOKEN, JWT_SECRET)
}
