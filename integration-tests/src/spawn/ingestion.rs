use std::sync::Arc;

use messaging::{Broker, MessagingSettings};
use service_kit::auth::ClientTokens;

use crate::proxy::Proxy;
use crate::{
    amqp_host_port, amqp_url, spawn, test_auth, test_http, Backend, TestApp, TestDb, JWT_SECRET,
};

/// Ingestion on a fresh database, talking to RabbitMQ through a [`Proxy`] the test controls,
/// with its own queue prefix. `broker` reaches RabbitMQ directly (not through the proxy) with the
/// same prefix, to read what Ingestion appended.
pub struct IngestionApp {
    pub app: TestApp,
    pub broker: Arc<dyn Broker>,
    pub proxy: Proxy,
    pub settings: ingestion::Settings,
    pub tokens: ClientTokens,
}

impl IngestionApp {
    /// A client token for `account` (with `scopes`).
    pub fn token(&self, account: &str, scopes: &[&str]) -> String {
        let scopes: Vec<String> = scopes.iter().map(|s| (*s).to_owned()).collect();
        self.tokens
            .mint(account, &scopes, chrono::Duration::hours(1))
            .expect("mint")
            .0
    }

    /// Stops the service and removes its logs.
    pub async fn stop(self) {
        self.app.stop().await;
        let p = self.settings.ingestion.partitions;
        let _ = self
            .broker
            .delete_log(contracts::DELIVERY_REQUESTS_LOG, p)
            .await;
        let _ = self
            .broker
            .delete_log(contracts::WORKFLOW_EVENTS_LOG, p)
            .await;
    }
}

pub async fn spawn_ingestion(
    backend: Backend,
    adjust: impl FnOnce(&mut ingestion::Settings),
) -> IngestionApp {
    telemetry::init_for_tests();
    let upstream = amqp_url();
    let proxy = Proxy::start(&amqp_host_port(&upstream)).await;
    let prefix = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let mut messaging = MessagingSettings::new(proxy.amqp_url(&upstream));
    messaging.prefix = prefix.clone();
    messaging.connection_name = prefix.clone();
    messaging.confirm_timeout_ms = 3000;
    let db = TestDb::new(backend, "ingestion").await;
    let mut settings = ingestion::Settings {
        http: test_http(),
        database: db.settings.clone(),
        auth: test_auth(),
        messaging,
        ingestion: ingestion::IngestionSettings {
            partitions: 4,
            ..Default::default()
        },
    };
    adjust(&mut settings);
    let app = spawn::<ingestion::Application>(settings.clone(), Some(db)).await;
    let mut direct = MessagingSettings::new(upstream);
    direct.prefix = prefix;
    let broker = messaging::connect(&direct).await.expect("test broker");
    IngestionApp {
        app,
        broker,
        proxy,
        settings,
        tokens: ClientTokens::new(&JWT_SECRET.to_owned().into()),
    }
}
