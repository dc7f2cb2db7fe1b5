//! Two Supervisor processes (the real binary, the same configuration) on one database and one
//! broker, as the Helm chart runs them: each compensation is carried out exactly once and both
//! take a share; a session made on one is valid on the other (and ends on both); their read
//! models and parked lists agree, also while both are looked at at once; and killing one
//! (`kill -9`) loses nothing: its unfinished compensations are redelivered to the other.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step should panic

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{delaying, refusing};
use integration_tests::harness::{
    binary, check, free_port, Bookings, Service, ServiceProcess, Stack, StackClient, StackOptions,
};
use integration_tests::{dashboard_sign_in, done_if, eventually, form, OPERATOR, SERVICE_TOKEN};
use messaging::{MessagingSettings, QueueOptions};
use serde_json::Value;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);
const COMPENSATED: &str = "supervisor_compensations_total{outcome=\"compensated\"}";

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap()
}

/// `GET base+path` with the service token: status and JSON body.
async fn get(base: &str, path: &str) -> (u16, Value) {
    let r = http()
        .get(format!("{base}{path}"))
        .bearer_auth(SERVICE_TOKEN)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {base}{path}: {e}"));
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// One counter of a Supervisor's `/metrics` (0 when not reported yet).
async fn metric(base: &str, line_start: &str) -> f64 {
    let text = http()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// `GET base+path` with a dashboard session: status and the page.
async fn page(base: &str, path: &str, cookie: &str) -> (u16, String) {
    let r = http()
        .get(format!("{base}{path}"))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

/// The value of the first hidden `csrf` input of a page.
fn csrf_of(html: &str) -> String {
    let at = html.find("name=\"csrf\" value=\"").expect("a CSRF field") + 19;
    html[at..].split('"').next().unwrap_or_default().to_owned()
}

/// Every saga of the read model as (deliveryId, state, version).
async fn read_model(base: &str) -> BTreeSet<(String, String, i64)> {
    let (status, body) = get(base, "/api/sagas?limit=500").await;
    assert_eq!(status, 200, "{body}");
    body.as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["deliveryId"].as_str().unwrap_or_default().to_owned(),
                s["state"].as_str().unwrap_or_default().to_owned(),
                s["version"].as_i64().unwrap_or_default(),
            )
        })
        .collect()
}

async fn book(client: &StackClient, owner: &str, n: i64, bookings: &mut Bookings) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for i in 0..n {
        let id = client
            .book_ok(&StackClient::booking(owner, 48 * 60 + i, "Small"))
            .await;
        bookings.add(id, owner);
        ids.push(id);
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_supervisors_share_one_database_and_broker() {
    let mut stack = Stack::start(StackOptions::default()).await;
    let client = stack.client();
    let owner = "pair-owner";
    stack.account(owner, "active").await;

    // B: exactly A's configuration (database, broker, users, downstream), its own port.
    let mut b = ServiceProcess::spawn(
        "supervisor-b",
        &binary("supervisor"),
        stack.service(Service::Supervisor).env().to_vec(),
        stack.log_dir(),
        free_port(),
    );
    b.wait_ready(Duration::from_secs(120)).await;
    let a_url = stack.service(Service::Supervisor).address();
    let b_url = b.address();

    // A session made on A is valid on B; signing out on B ends it on A too.
    let cookie = dashboard_sign_in(&a_url, OPERATOR.0, OPERATOR.1).await;
    let (status, html) = page(&b_url, "/dashboard", &cookie).await;
    assert_eq!(status, 200, "the session of A is valid on B: {html}");
    assert!(html.contains(OPERATOR.0), "{html}");
    let r = http()
        .post(format!("{b_url}/logout"))
        .header("cookie", &cookie)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&[("csrf", &csrf_of(&html))]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303, "signed out on B");
    let (status, _) = page(&a_url, "/dashboard", &cookie).await;
    assert_eq!(status, 303, "the session ended on A as well");

    // Sagas fail after the drone step; every package DELETE the Supervisors send is counted.
    let refuse = refusing("PUT", "/api/deliveries/", 422);
    stack.scheduler_faults.delivery.set_faults(refuse);
    let counted = delaying("DELETE", "/api/packages/", Duration::ZERO);
    stack.supervisor_faults.package.set_faults(counted);
    let mut bookings = Bookings::default();
    let ids = book(&client, owner, 16, &mut bookings).await;
    for id in &ids {
        stack.wait_state(*id, "compensated", WAIT).await;
    }
    // Each compensation carried out exactly once, by one of the two.
    let hits = stack.supervisor_faults.package.hits.lock().unwrap().clone();
    for id in &ids {
        let undone = hits.iter().filter(|h| h.contains(&id.to_string())).count();
        assert_eq!(
            undone, 1,
            "package of {id} deleted {undone} times: {hits:?}"
        );
    }
    let (by_a, by_b) = (
        metric(&a_url, COMPENSATED).await,
        metric(&b_url, COMPENSATED).await,
    );
    assert_eq!(by_a + by_b, 16.0, "A compensated {by_a}, B {by_b}");
    assert!(
        by_a > 0.0 && by_b > 0.0,
        "both took a share: A {by_a}, B {by_b}"
    );
    // Both read models show every saga the same.
    eventually(
        WAIT,
        "both read models show every saga compensated",
        async || {
            let (a, b) = (read_model(&a_url).await, read_model(&b_url).await);
            let done = ids.iter().all(|id| {
                a.iter()
                    .any(|(d, s, _)| *d == id.to_string() && s == "compensated")
            });
            done_if(a == b && done, format!("A {a:?}\nB {b:?}"))
        },
    )
    .await;

    // Kill A while it is in the middle of compensations (drone releases answer slowly).
    let slow = delaying(
        "DELETE",
        "/api/dronedeliveries/",
        Duration::from_millis(1500),
    );
    stack.supervisor_faults.drone.set_faults(slow);
    let more = book(&client, owner, 10, &mut bookings).await;
    eventually(
        WAIT,
        "both supervisors are releasing drones",
        async || match stack.supervisor_faults.drone.hits() {
            n if n >= 6 => Ok(()),
            n => Err(format!("{n} releases started")),
        },
    )
    .await;
    stack.kill9(Service::Supervisor);
    stack.supervisor_faults.drone.set_faults(Vec::new());
    let mut redelivered = 0;
    for id in &more {
        stack.wait_state(*id, "compensated", WAIT).await;
        let (_, detail) = get(&b_url, &format!("/api/sagas/{id}")).await;
        let comps = detail["compensations"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(comps.len(), 1, "one compensation record: {detail}");
        assert_eq!(comps[0]["status"], "compensated", "{detail}");
        if comps[0]["deliveries"].as_i64().unwrap_or(0) >= 2 {
            redelivered += 1;
        }
    }
    assert!(
        redelivered > 0,
        "no compensation of the killed Supervisor was finished by the other"
    );

    // A comes back; nothing was lost or doubled anywhere in the suite.
    stack.restart(Service::Supervisor).await;
    let report = check(&stack, &bookings, WAIT)
        .await
        .unwrap_or_else(|v| panic!("{v}"));
    println!("invariants hold: {report}");

    // A request that can never be carried out is parked once and listed the same by both, also
    // while both are looked at at the same moment.
    let mut direct = MessagingSettings::new(stack.amqp_url.clone());
    direct.prefix = stack.prefix.clone();
    direct.connection_name = format!("{}-test", stack.prefix);
    let broker = messaging::connect(&direct).await.unwrap();
    let queue = broker
        .queue(
            contracts::COMPENSATIONS_QUEUE,
            QueueOptions {
                delivery_limit: stack.options.compensation_delivery_limit,
            },
        )
        .await
        .unwrap();
    queue
        .publish_raw(b"not a compensation request".to_vec())
        .await
        .unwrap();
    let parked = eventually(WAIT, "both list the parked request", async || {
        let (a, b) = (
            get(&a_url, "/api/parked").await.1,
            get(&b_url, "/api/parked").await.1,
        );
        match a.as_array() {
            Some(rows) if rows.len() == 1 && a == b => Ok(a.clone()),
            _ => Err(format!("A {a}\nB {b}")),
        }
    })
    .await;
    for _ in 0..20 {
        let (a, b) = tokio::join!(get(&a_url, "/api/parked"), get(&b_url, "/api/parked"));
        assert_eq!(a.1, parked, "A's list changed");
        assert_eq!(b.1, parked, "B's list changed");
    }
    eventually(WAIT, "both overviews count it", async || {
        let (a, b) = (
            get(&a_url, "/api/overview").await.1,
            get(&b_url, "/api/overview").await.1,
        );
        done_if(
            a["parked"] == 1 && b["parked"] == 1,
            format!("A {} B {}", a["parked"], b["parked"]),
        )
    })
    .await;
    assert_eq!(read_model(&a_url).await, read_model(&b_url).await);

    drop(b);
    stack.stop().await;
}
