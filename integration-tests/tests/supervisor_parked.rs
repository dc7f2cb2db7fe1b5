//! Parked compensation requests are kept by the Supervisor, where looking at them changes
//! nothing: each is moved out of the broker's parked queue into the Supervisor's table, keeps its
//! bytes and reason even when it does not decode, survives a restart, shows in `/api/parked` and
//! on the dashboard, and a redrive republishes exactly those bytes. On both messaging backends
//! (RabbitMQ with PostgreSQL, as in production; the embedded broker with SQLite, as `make run`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step should panic

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use integration_tests::{
    amqp_url, dashboard_sign_in, done_if, eventually, spawn, test_auth, test_http, Backend,
    TestApp, TestDb, OPERATOR,
};
use messaging::{Envelope, MessagingSettings, QueueOptions, WorkQueue};
use serde_json::{json, Value};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(30);
const LIMIT: u32 = 3;
/// Not a message envelope at all, not even UTF-8.
const RAW: &[u8] = b"\x00\xff{not a compensation request";

mod rabbitmq {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn parked_requests_are_kept_by_the_supervisor() {
        super::parked_requests_are_kept_by_the_supervisor(super::Backing::RabbitMq).await
    }
}

mod embedded {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn parked_requests_are_kept_by_the_supervisor() {
        super::parked_requests_are_kept_by_the_supervisor(super::Backing::Embedded).await
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Backing {
    /// RabbitMQ and PostgreSQL.
    RabbitMq,
    /// The embedded broker and SQLite.
    Embedded,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A Supervisor on `db` and `messaging` with one operator; its Scheduler is nowhere (nothing
/// here gets as far as calling it).
async fn start(db: &TestDb, messaging: &MessagingSettings) -> TestApp {
    let operator: supervisor::UserSettings =
        serde_json::from_value(json!({"role": "operator", "password": OPERATOR.1})).unwrap();
    let settings = supervisor::Settings {
        http: test_http(),
        database: db.settings.clone(),
        auth: test_auth(),
        messaging: messaging.clone(),
        scheduler: supervisor::SchedulerLink {
            url: "http://127.0.0.1:9".into(),
            ..Default::default()
        },
        supervisor: supervisor::SupervisorSettings {
            compensation_delivery_limit: LIMIT,
            parked_refresh_ms: 200,
            ..Default::default()
        },
        users: BTreeMap::from([(OPERATOR.0.to_owned(), operator)]),
        ..Default::default()
    };
    spawn::<supervisor::Application>(settings, None).await
}

/// Messages still in the broker's parked queue (not yet moved into the Supervisor's table).
async fn left_in_the_broker(backing: Backing, messaging: &MessagingSettings) -> u64 {
    let parked = format!(
        "{}.parked",
        messaging.qualified(contracts::COMPENSATIONS_QUEUE)
    );
    match backing {
        Backing::RabbitMq => {
            let out = tokio::task::spawn_blocking(|| {
                let command = test_support::rabbitmqctl();
                let (program, leading) = command.split_first().expect("a rabbitmqctl command");
                std::process::Command::new(program)
                    .args(leading)
                    .args(["list_queues", "-q", "name", "messages"])
                    .output()
                    .expect("rabbitmqctl runs (set RABBITMQCTL)")
            })
            .await
            .unwrap();
            assert!(out.status.success(), "rabbitmqctl list_queues failed");
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| l.split_once('\t'))
                .find(|(name, _)| *name == parked)
                .and_then(|(_, n)| n.trim().parse().ok())
                .unwrap_or_else(|| panic!("{parked} is not declared"))
        }
        Backing::Embedded => {
            use sea_orm::{ConnectionTrait, Statement};
            let url = secrecy::ExposeSecret::expose_secret(&messaging.url).to_owned();
            let db = sea_orm::Database::connect(url).await.unwrap();
            let row = db
                .query_one(Statement::from_sql_and_values(
                    sea_orm::DbBackend::Sqlite,
                    "SELECT COUNT(*) AS n FROM messaging_queue_messages
                     WHERE queue = ? AND state = 'parked'",
                    [messaging.qualified(contracts::COMPENSATIONS_QUEUE).into()],
                ))
                .await
                .unwrap()
                .unwrap();
            let n: i64 = row.try_get("", "n").unwrap();
            let _ = db.close().await;
            u64::try_from(n).unwrap()
        }
    }
}

async fn parked_requests_are_kept_by_the_supervisor(backing: Backing) {
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("tp{}", &Uuid::new_v4().simple().to_string()[..8]);
    let (db, mut messaging) = match backing {
        Backing::RabbitMq => (
            TestDb::new(Backend::Postgres, "supervisor").await,
            MessagingSettings::new(amqp_url()),
        ),
        Backing::Embedded => (
            TestDb::new(Backend::Sqlite, "supervisor").await,
            MessagingSettings::new(format!(
                "sqlite://{}/messaging.db?mode=rwc",
                dir.path().display()
            )),
        ),
    };
    messaging.prefix = prefix.clone();
    messaging.connection_name = prefix.clone();
    let app = start(&db, &messaging).await;

    // What the Scheduler would publish, and two requests that can never be carried out.
    let broker = messaging::connect(&messaging).await.unwrap();
    let queue: Arc<dyn WorkQueue> = broker
        .queue(
            contracts::COMPENSATIONS_QUEUE,
            QueueOptions {
                delivery_limit: LIMIT,
            },
        )
        .await
        .unwrap();
    queue.publish_raw(RAW.to_vec()).await.unwrap();
    let key = Uuid::new_v4().to_string();
    let misshapen = Envelope::new(
        contracts::COMPENSATION_REQUESTED,
        1,
        &key,
        &json!({"nonsense": true}),
    )
    .unwrap();
    queue.publish(misshapen.clone()).await.unwrap();

    let listed: Vec<Value> = eventually(WAIT, "both requests are listed as parked", async || {
        let r = app.get("/api/parked").await;
        match r.body.as_array() {
            Some(rows) if r.status == 200 && rows.len() == 2 => Ok(rows.clone()),
            _ => Err(format!("{} {}", r.status, r.body)),
        }
    })
    .await;
    let undecodable = listed
        .iter()
        .find(|p| p["deliveryId"].is_null())
        .unwrap_or_else(|| panic!("the undecodable one: {listed:?}"))
        .clone();
    assert!(
        undecodable["reason"]
            .as_str()
            .unwrap()
            .starts_with("undecodable"),
        "{undecodable}"
    );
    assert_eq!(undecodable["payloadHex"], hex(RAW), "its bytes exactly");
    assert!(undecodable["payload"]
        .as_str()
        .unwrap()
        .contains("not a compensation request"));
    assert!(undecodable["request"].is_null());
    let wrong = listed
        .iter()
        .find(|p| p["deliveryId"] == key.as_str())
        .unwrap_or_else(|| panic!("the misshapen one: {listed:?}"));
    assert_eq!(wrong["messageId"], misshapen.id.to_string());
    assert_eq!(wrong["request"], json!({"nonsense": true}));
    assert!(
        wrong["reason"]
            .as_str()
            .unwrap()
            .contains(contracts::COMPENSATION_REQUESTED),
        "the reason says why it does not fit: {wrong}"
    );

    // Moved out of the broker: nothing is left where a look would be a delivery.
    eventually(
        WAIT,
        "the broker's parked queue is empty",
        async || match left_in_the_broker(backing, &messaging).await {
            0 => Ok(()),
            n => Err(format!("{n} messages")),
        },
    )
    .await;
    // Looking changes nothing: the same list, in the same order, every time.
    for _ in 0..5 {
        let again = app.get("/api/parked").await;
        assert_eq!(again.body, Value::Array(listed.clone()));
    }
    eventually(WAIT, "the overview counts both", async || {
        let o = app.get("/api/overview").await;
        done_if(o.body["parked"] == 2, o.body.to_string())
    })
    .await;

    // Kept across a restart of the Supervisor, once each.
    app.stop().await;
    let app = start(&db, &messaging).await;
    let after = app.get("/api/parked").await;
    assert_eq!(after.body, Value::Array(listed.clone()));

    // The dashboard lists them from the same table, the undecodable bytes included.
    let cookie = dashboard_sign_in(&app.url(""), OPERATOR.0, OPERATOR.1).await;
    let page = app
        .client
        .get(app.url("/dashboard/parked"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(
        html.contains("undecodable") && html.contains("not a compensation request"),
        "{html}"
    );
    assert!(html.contains(&format!("/dashboard/parked/{}/redrive", misshapen.id)));

    // A redrive republishes exactly the stored bytes: undecodable still, it is parked again, as
    // a new parking of the same message; the old one is no longer waiting.
    let mid = undecodable["messageId"].as_str().unwrap();
    let r = app
        .post(
            &format!("/api/parked/{mid}/redrive"),
            &json!({"reason": "see whether it decodes now"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["ok"], true, "{}", r.body);
    let reparked = eventually(WAIT, "the redriven message is parked again", async || {
        let r = app.get("/api/parked").await;
        r.body
            .as_array()
            .and_then(|rows| {
                rows.iter()
                    .find(|p| p["messageId"] == mid && p["parkId"] != undecodable["parkId"])
                    .cloned()
            })
            .ok_or_else(|| r.body.to_string())
    })
    .await;
    assert_eq!(reparked["payloadHex"], hex(RAW));
    let now = app.get("/api/parked").await;
    assert_eq!(now.body.as_array().unwrap().len(), 2, "{}", now.body);
    let audit = app.get("/api/audit").await;
    let rows = audit.body.as_array().unwrap();
    assert!(
        rows.iter().any(|a| a["action"] == "redrive"
            && a["target"] == mid
            && a["reason"] == "see whether it decodes now"),
        "{}",
        audit.body
    );
    let unknown = app
        .post(
            &format!("/api/parked/{}/redrive", Uuid::new_v4()),
            &json!({"reason": "nothing there"}),
        )
        .await;
    assert_eq!(unknown.status, 404, "{}", unknown.body);

    app.stop().await;
    broker
        .delete_queue(contracts::COMPENSATIONS_QUEUE)
        .await
        .unwrap();
    // The logs the Supervisor declared (it follows workflow-events): left behind, every run added
    // streams to the shared RabbitMQ.
    let partitions = supervisor::SupervisorSettings::default().partitions;
    for log in [
        contracts::WORKFLOW_EVENTS_LOG,
        contracts::DELIVERY_REQUESTS_LOG,
    ] {
        broker.delete_log(log, partitions).await.unwrap();
    }
    drop(db);
}
