//! The Supervisor end to end on real PostgreSQL and RabbitMQ: compensation of failed and cancelled
//! sagas (through fault injectors where downstream services must fail), parking and redrive, and
//! the dashboard driven in headless Chromium.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step should panic

mod common;

use std::time::Duration;

use common::{
    client_changes, compensations, failing, metrics, refusing, reserved_drones,
    stop_with_supervisor, suite_with_scheduler,
};
use contracts::TrackingEvent;
use integration_tests::faults::{Fault, FaultKind};
use integration_tests::wait::poll;
use integration_tests::{
    both_backends, done_if, eventually, eventually_every, spawn_suite, spawn_supervisor, Backend,
    Suite, SuiteFaults, SupervisorApp, TestApp, OPERATOR, VIEWER,
};
use serde_json::{json, Value};
use uuid::Uuid;

both_backends!(failure_after_the_drone_step_ends_compensated);

mod postgres_only {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn downstream_down_is_retried_then_compensated() {
        super::downstream_down_is_retried_then_compensated(Backend::Postgres).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failing_compensation_is_parked_and_redriven() {
        super::failing_compensation_is_parked_and_redriven(Backend::Postgres).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn duplicate_request_has_no_second_effect() {
        super::duplicate_request_has_no_second_effect(Backend::Postgres).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dashboard_in_headless_chromium() {
        super::browser::dashboard_in_headless_chromium(Backend::Postgres).await
    }
}

const WAIT: Duration = Duration::from_secs(30);

/// A suite whose CreateDelivery always fails permanently (sagas fail after the drone step), with
/// acc-1, a scheduler and a supervisor; with `limit`, both park a compensation after that many
/// deliveries.
async fn failing_delivery(backend: Backend, limit: Option<u32>) -> (Suite, TestApp, SupervisorApp) {
    let faults = SuiteFaults {
        delivery: refusing("PUT", "/api/deliveries/", 422),
        ..Default::default()
    };
    let suite = spawn_suite(backend, faults).await;
    suite.account("acc-1", "active").await;
    let scheduler = suite
        .start_scheduler(|s| {
            if let Some(n) = limit {
                s.scheduler.compensation_delivery_limit = n;
            }
        })
        .await;
    let supervisor = spawn_supervisor(backend, &suite, &scheduler, |s| {
        if let Some(n) = limit {
            s.supervisor.compensation_delivery_limit = n;
        }
    })
    .await;
    (suite, scheduler, supervisor)
}

fn unavailable(method: &'static str, prefix: &str, times: usize) -> Vec<Fault> {
    failing(method, prefix, times, FaultKind::Status(503))
}

async fn package_status(suite: &Suite, id: Uuid) -> Value {
    suite.package.get(&format!("/api/packages/{id}")).await.body["status"].clone()
}

async fn metric(app: &TestApp, line_start: &str) -> Option<f64> {
    metrics(app)
        .await
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn failure_after_the_drone_step_ends_compensated(backend: Backend) {
    let (suite, scheduler, supervisor) = failing_delivery(backend, None).await;

    let id = suite.book(&Suite::booking("acc-1", 24, "Small")).await;
    let wf = suite.workflow(&scheduler, id, "compensated", WAIT).await;
    let steps: Vec<(&str, &str)> = wf["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["name"].as_str().unwrap(), s["status"].as_str().unwrap()))
        .collect();
    assert_eq!(
        steps,
        vec![
            ("CheckAccount", "succeeded"),
            ("RegisterPackage", "succeeded"),
            ("ArrangeThirdParty", "succeeded"),
            ("ReserveDrone", "succeeded"),
            ("CreateDelivery", "failed"),
        ],
        "{wf}"
    );
    // The drone is free again, the package cancelled, no delivery exists.
    assert_eq!(reserved_drones(&suite.drone).await, 0);
    assert_eq!(package_status(&suite, id).await, "cancelled");
    assert_eq!(
        suite
            .delivery
            .get(&format!("/api/deliveries/{id}"))
            .await
            .status,
        404
    );
    // Reporting the same outcome again changes nothing.
    let again = scheduler_endpoint(&scheduler, id, "compensated").await;
    assert_eq!(again.status, 200, "{}", again.body);
    let after = suite.workflow(&scheduler, id, "compensated", WAIT).await;
    assert_eq!(after["version"], wf["version"]);
    let seen = suite.client_state("acc-1", id, "compensated", WAIT).await;
    assert!(
        seen["detail"].as_str().unwrap().contains("RegisterPackage"),
        "{seen}"
    );
    let detail = supervisor.saga(id, "compensated", WAIT).await;
    let c = &detail["compensations"][0];
    assert_eq!(c["status"], "compensated", "{detail}");
    assert_eq!(c["steps"], json!(["RegisterPackage", "ReserveDrone"]));
    assert_eq!(c["reported"], true);
    assert_eq!(c["stepResults"]["ReserveDrone"]["outcome"], "undone");

    // A booking cancelled after it was scheduled: all three steps are undone, newest first.
    suite.faults[0].set_faults(Vec::new()); // the Delivery service works again
    let id2 = suite.book(&Suite::booking("acc-1", 30, "Small")).await;
    suite.workflow(&scheduler, id2, "completed", WAIT).await;
    // The Scheduler refuses to record a compensation of a scheduled saga, or of an unknown one.
    let r = scheduler_endpoint(&scheduler, id2, "compensated").await;
    assert_eq!(r.problem(409).code, "saga-state-conflict");
    let r = scheduler_endpoint(&scheduler, Uuid::new_v4(), "compensated").await;
    assert_eq!(r.status, 404);
    let r = scheduler_endpoint(&scheduler, id2, "undone").await;
    assert_eq!(r.bad_fields(), vec!["state"]);
    let r = scheduler
        .post(&format!("/api/workflows/{id2}/retry"), &json!({}))
        .await;
    assert_eq!(r.problem(409).code, "saga-state-conflict");
    client_changes(&suite, "acc-1", reqwest::Method::DELETE, id2, None).await;
    suite.workflow(&scheduler, id2, "compensated", WAIT).await;
    assert_eq!(reserved_drones(&suite.drone).await, 0);
    assert_eq!(package_status(&suite, id2).await, "cancelled");
    let events: Vec<TrackingEvent> = suite
        .delivery
        .get(&format!("/api/deliveries/{id2}/events"))
        .await
        .json();
    assert_eq!(
        events.last().map(|e| e.stage),
        Some(contracts::DeliveryStage::Cancelled)
    );
    // Cancelled by its client: the booking reads `cancelled` while and after it is undone.
    suite.client_state("acc-1", id2, "cancelled", WAIT).await;
    assert_eq!(
        metric(
            &supervisor.app,
            "supervisor_compensations_total{outcome=\"compensated\""
        )
        .await,
        Some(2.0)
    );

    stop_with_supervisor(suite, scheduler, supervisor).await;
}

async fn downstream_down_is_retried_then_compensated(backend: Backend) {
    let (suite, scheduler, supervisor) = failing_delivery(backend, None).await;
    // The drone service answers 503 to the first two releases.
    supervisor
        .drone
        .set_faults(unavailable("DELETE", "/api/dronedeliveries/", 2));

    let id = suite.book(&Suite::booking("acc-1", 24, "Medium")).await;
    suite.workflow(&scheduler, id, "compensated", WAIT).await;
    assert_eq!(supervisor.drone.hits(), 2, "both faults were hit");
    assert_eq!(reserved_drones(&suite.drone).await, 0);
    let detail = supervisor.saga(id, "compensated", WAIT).await;
    assert_eq!(
        detail["compensations"][0]["deliveries"], 1,
        "retried within one delivery: {detail}"
    );
    assert_eq!(
        metric(
            &supervisor.app,
            "supervisor_undo_retries_total{step=\"ReserveDrone\"}"
        )
        .await,
        Some(2.0)
    );

    stop_with_supervisor(suite, scheduler, supervisor).await;
}

async fn failing_compensation_is_parked_and_redriven(backend: Backend) {
    let (suite, scheduler, supervisor) = failing_delivery(backend, Some(2)).await;
    // The package service is down for good (for now).
    supervisor
        .package
        .set_faults(unavailable("DELETE", "/api/packages/", usize::MAX));

    let id = suite.book(&Suite::booking("acc-1", 24, "Small")).await;
    let wf = suite
        .workflow(&scheduler, id, "compensation-failed", WAIT)
        .await;
    assert!(
        wf["steps"][1]["status"] == "succeeded",
        "the package is still registered: {wf}"
    );
    let parked = supervisor.parked_of(id, WAIT).await;
    assert_eq!(parked.len(), 1, "{parked:?}");
    assert!(parked[0]["reason"]
        .as_str()
        .unwrap()
        .contains("RegisterPackage"));
    suite
        .client_state("acc-1", id, "compensation-failed", WAIT)
        .await;
    // The drone was released before the package failed; the package is still there.
    assert_eq!(reserved_drones(&suite.drone).await, 0);
    assert_eq!(package_status(&suite, id).await, "registered");
    let overview = supervisor.app.get("/api/overview").await;
    assert!(overview.body["parked"].as_i64().unwrap() >= 0);

    // The package service is back: a person redrives the request.
    supervisor.package.set_faults(Vec::new());
    let mid = parked[0]["messageId"].as_str().unwrap();
    let r = supervisor
        .app
        .post(
            &format!("/api/parked/{mid}/redrive"),
            &json!({"reason": "package service restored"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["ok"], true);
    suite.workflow(&scheduler, id, "compensated", WAIT).await;
    assert_eq!(package_status(&suite, id).await, "cancelled");
    suite.client_state("acc-1", id, "compensated", WAIT).await;
    assert!(supervisor.parked_of(id, Duration::ZERO).await.is_empty());
    let audit = supervisor.app.get("/api/audit").await;
    assert_eq!(audit.body[0]["action"], "redrive", "{}", audit.body);
    assert_eq!(audit.body[0]["reason"], "package service restored");
    // Redriving it again finds nothing.
    let again = supervisor
        .app
        .post(
            &format!("/api/parked/{mid}/redrive"),
            &json!({"reason": "twice"}),
        )
        .await;
    assert_eq!(again.status, 404);

    stop_with_supervisor(suite, scheduler, supervisor).await;
}

async fn duplicate_request_has_no_second_effect(backend: Backend) {
    let (suite, scheduler, supervisor) = failing_delivery(backend, None).await;

    let id = suite.book(&Suite::booking("acc-1", 24, "Small")).await;
    let before = suite.workflow(&scheduler, id, "compensated", WAIT).await;
    let detail = supervisor.saga(id, "compensated", WAIT).await;
    let c = &detail["compensations"][0];

    // Any further call to the services would now fail and show up as a hit.
    for proxy in [&supervisor.package, &supervisor.drone, &supervisor.delivery] {
        proxy.set_faults(vec![Fault {
            method: "DELETE",
            path_prefix: "/".into(),
            times: usize::MAX,
            kind: FaultKind::Status(500),
        }]);
    }
    let queue = compensations(&suite).await;
    let request = contracts::CompensationRequest {
        delivery_id: id,
        owner_id: "acc-1".into(),
        succeeded_steps: vec!["RegisterPackage".into(), "ReserveDrone".into()],
        in_doubt_steps: vec!["CreateDelivery".into()],
        carrier_legs: Vec::new(),
        reason: c["reason"].as_str().unwrap().to_owned(),
        saga_version: c["sagaVersion"].as_i64().unwrap(),
    };
    let envelope = messaging::Envelope::new(
        contracts::COMPENSATION_REQUESTED,
        1,
        &id.to_string(),
        &request,
    )
    .unwrap();
    queue.publish(envelope.clone()).await.unwrap();
    queue.publish(envelope).await.unwrap();

    eventually(WAIT, "both duplicates to be counted", async || {
        let n = metric(
            &supervisor.app,
            "supervisor_compensations_total{outcome=\"duplicate\"",
        )
        .await;
        done_if(n == Some(2.0), format!("{n:?}"))
    })
    .await;
    for proxy in [&supervisor.package, &supervisor.drone, &supervisor.delivery] {
        assert_eq!(proxy.hits(), 0, "a duplicate called a service again");
    }
    let after = suite.workflow(&scheduler, id, "compensated", WAIT).await;
    assert_eq!(after["version"], before["version"], "no new saga version");
    let detail = supervisor.saga(id, "compensated", WAIT).await;
    assert_eq!(detail["compensations"].as_array().unwrap().len(), 1);
    assert_eq!(detail["compensations"][0]["deliveries"], 1);
    assert_eq!(depth(&queue).await, 0);

    stop_with_supervisor(suite, scheduler, supervisor).await;
}

async fn depth(queue: &std::sync::Arc<dyn messaging::WorkQueue>) -> u64 {
    let every = Duration::from_millis(100);
    poll(Duration::from_secs(10), every, async || {
        match queue.depth().await.unwrap() {
            0 => Ok(0),
            n => Err(n),
        }
    })
    .await
    .unwrap_or_else(|n| n)
}

/// The Scheduler's compensation endpoint, as the Supervisor uses it.
async fn scheduler_endpoint(
    scheduler: &TestApp,
    id: Uuid,
    state: &str,
) -> integration_tests::Reply {
    scheduler
        .post(
            &format!("/api/workflows/{id}/compensation"),
            &json!({"state": state}),
        )
        .await
}

mod browser {
    use std::net::TcpListener;
    use std::path::PathBuf;
    use std::process::{Child, Command, Stdio};

    use fantoccini::{Client, ClientBuilder, Locator};

    use super::*;

    /// chromedriver for one test, stopped when dropped.
    struct Driver {
        child: Child,
        url: String,
    }

    impl Drop for Driver {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    async fn chromedriver() -> Driver {
        let bin = std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(&bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {bin}: {e}. Install Chromium and its driver \
                     (apt-get install chromium chromium-driver; `make up` does it) or set CHROMEDRIVER"
                )
            });
        // Owned by the guard from here on, so a panic below still kills and reaps it.
        let driver = Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let what = format!("chromedriver to listen on {port}");
        eventually(Duration::from_secs(20), what, async || {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await
        })
        .await;
        driver
    }

    async fn browser(driver: &Driver) -> Client {
        let mut caps = serde_json::Map::new();
        let mut args = vec![
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--window-size=1400,1100",
        ];
        if let Ok(bin) = std::env::var("CHROME_BIN") {
            caps.insert(
                "goog:chromeOptions".into(),
                json!({"args": args.clone(), "binary": bin}),
            );
        } else {
            args.push("--disable-extensions");
            caps.insert("goog:chromeOptions".into(), json!({ "args": args }));
        }
        // chromedriver is plain HTTP on localhost: no TLS stack needed.
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&driver.url)
            .await
            .expect("a Chromium session")
    }

    fn screenshots() -> PathBuf {
        let dir = std::env::var("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
            .join("screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Types `text` into the element `css` names.
    async fn type_into(c: &Client, css: &str, text: &str) {
        let field = c.find(Locator::Css(css)).await.unwrap();
        field.send_keys(text).await.unwrap();
    }

    /// Clicks the element `css` names.
    async fn click(c: &Client, css: &str) {
        c.find(Locator::Css(css))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
    }

    /// Waits up to 10 s for the element `css` names; panics saying `expected` if it never shows.
    async fn wait_for(c: &Client, css: &str, expected: &str) -> fantoccini::elements::Element {
        c.wait()
            .at_most(Duration::from_secs(10))
            .for_element(Locator::Css(css))
            .await
            .expect(expected)
    }

    /// Saves a screenshot of the page as `name` in `dir`.
    async fn screenshot(c: &Client, dir: &std::path::Path, name: &str) {
        std::fs::write(dir.join(name), c.screenshot().await.unwrap()).unwrap();
    }

    /// Fills in and sends the login form.
    async fn submit_login(c: &Client, base: &str, user: &str, password: &str) {
        c.goto(&format!("{base}/login")).await.unwrap();
        type_into(c, "#username", user).await;
        type_into(c, "#password", password).await;
        click(c, "#sign-in").await;
    }

    async fn login(c: &Client, base: &str, (user, password): (&str, &str)) {
        submit_login(c, base, user, password).await;
        wait_for(c, "#who", "signed in").await;
    }

    /// Clicks the element `css` names, finding it again if the page's live refresh replaced it
    /// between finding and clicking (a stale element reference).
    async fn click_fresh(c: &Client, css: &str) {
        eventually(
            Duration::from_secs(10),
            format!("a click on {css}"),
            async || c.find(Locator::Css(css)).await?.click().await,
        )
        .await;
    }

    /// The text of the element `css` names (found again if a live refresh replaced it).
    async fn text(c: &Client, css: &str) -> String {
        eventually(
            Duration::from_secs(10),
            format!("the text of {css}"),
            async || c.find(Locator::Css(css)).await?.text().await,
        )
        .await
    }

    pub async fn dashboard_in_headless_chromium(backend: Backend) {
        // A suspended account fails the saga at once: a failed saga waiting for a person.
        let suspended = ("acc-suspended", "suspended");
        let (suite, scheduler) =
            suite_with_scheduler(backend, SuiteFaults::default(), suspended).await;
        let supervisor: SupervisorApp = spawn_supervisor(backend, &suite, &scheduler, |_| {}).await;
        let id = suite
            .book(&Suite::booking("acc-suspended", 24, "Small"))
            .await;
        suite.workflow(&scheduler, id, "failed", WAIT).await;
        supervisor.saga(id, "failed", WAIT).await;

        let driver = chromedriver().await;
        let c = browser(&driver).await;
        let base = supervisor.app.address.clone();
        let shots = screenshots();

        // No session: the login page.
        c.goto(&format!("{base}/dashboard/sagas/{id}"))
            .await
            .unwrap();
        assert_eq!(c.current_url().await.unwrap().path(), "/login");
        c.find(Locator::Css("form#login"))
            .await
            .expect("login form");

        // The operator finds the failed saga by its delivery id and opens its timeline.
        login(&c, &base, OPERATOR).await;
        assert!(text(&c, "#counters").await.contains("parked"));
        wait_for(&c, "#partitions tbody tr", "partitions with lag").await;
        screenshot(&c, &shots, "overview.png").await;
        c.goto(&format!("{base}/dashboard/sagas")).await.unwrap();
        type_into(&c, "#q", &id.to_string()).await;
        click(&c, "#search-button").await;
        let row = format!("tr[data-delivery-id='{id}'] a");
        wait_for(&c, &row, "the saga in the search results").await;
        assert!(text(&c, "table.sagas").await.contains("failed"));
        click_fresh(&c, &row).await;
        wait_for(&c, "#timeline", "timeline").await;
        assert_eq!(text(&c, "#saga-state").await, "failed");
        let timeline = text(&c, "#timeline").await;
        assert!(
            timeline.contains("CheckAccount") && timeline.contains("suspended"),
            "{timeline}"
        );
        let trace_id = text(&c, "#trace-id").await;
        assert!(
            trace_id.trim().len() == 32 && trace_id.trim().bytes().all(|b| b.is_ascii_hexdigit()),
            "the timeline shows the booking's trace id: {trace_id:?}"
        );
        screenshot(&c, &shots, "timeline.png").await;

        // Compensate now, with a reason.
        let reason = "customer called, booking abandoned";
        type_into(&c, "#compensate-reason", reason).await;
        click(&c, "#compensate-button").await;
        wait_for(&c, ".flash.ok", "compensation queued").await;
        let (what, every) = (
            "the saga page to show compensated",
            Duration::from_millis(200),
        );
        eventually_every(Duration::from_secs(40), every, what, async || {
            c.goto(&format!("{base}/dashboard/sagas/{id}"))
                .await
                .unwrap();
            let state = text(&c, "#saga-state").await;
            done_if(state == "compensated", state)
        })
        .await;
        screenshot(&c, &shots, "timeline-compensated.png").await;
        c.goto(&format!("{base}/dashboard/audit")).await.unwrap();
        let audit = text(&c, "#audit").await;
        assert!(
            audit.contains(OPERATOR.0) && audit.contains("compensate") && audit.contains(reason),
            "{audit}"
        );

        // A viewer sees no actions, and posting one anyway is refused.
        c.delete_all_cookies().await.unwrap();
        login(&c, &base, VIEWER).await;
        c.goto(&format!("{base}/dashboard/sagas/{id}"))
            .await
            .unwrap();
        c.find(Locator::Css("#timeline")).await.expect("timeline");
        assert!(
            c.find(Locator::Css("#actions")).await.is_err(),
            "viewer sees actions"
        );
        assert!(c.find(Locator::Css("#compensate-button")).await.is_err());
        let status = c
            .execute_async(
                r#"const done = arguments[arguments.length - 1];
                   const csrf = document.querySelector("input[name=csrf]").value;
                   fetch(arguments[0], {method: "POST", credentials: "same-origin",
                     headers: {"content-type": "application/x-www-form-urlencoded"},
                     body: new URLSearchParams({csrf: csrf, reason: "viewer tries"})})
                     .then(r => done(r.status), e => done(String(e)));"#,
                vec![json!(format!("/dashboard/sagas/{id}/compensate"))],
            )
            .await
            .unwrap();
        assert_eq!(status, json!(403));
        // One compensation done, by the operator; the viewer's attempt recorded as refused; both
        // logins recorded.
        let audit = supervisor.app.get("/api/audit").await;
        let rows = audit.body.as_array().unwrap();
        let of = |actor: &str, action: &str| -> Vec<String> {
            rows.iter()
                .filter(|r| r["actor"] == actor && r["action"] == action)
                .map(|r| r["outcome"].as_str().unwrap_or_default().to_owned())
                .collect()
        };
        let done = of(OPERATOR.0, "compensate");
        assert_eq!(done.len(), 1, "{}", audit.body);
        assert!(done[0].starts_with("compensation queued"), "{done:?}");
        let refused = of(VIEWER.0, "compensate");
        assert_eq!(refused.len(), 1, "{}", audit.body);
        assert!(
            refused[0].starts_with("refused: only operators"),
            "{refused:?}"
        );
        assert_eq!(of(OPERATOR.0, "login"), ["ok"]);
        assert_eq!(of(VIEWER.0, "login"), ["ok"]);

        // Wrong passwords, again and again: the login page says to wait, and for how long.
        c.delete_all_cookies().await.unwrap();
        let mut throttled = None;
        for _ in 0..10 {
            submit_login(&c, &base, VIEWER.0, "not-the-password").await;
            let notice = wait_for(&c, ".flash.err", "a message above the login form").await;
            if c.find(Locator::Css("#throttled")).await.is_ok() {
                throttled = Some(notice.text().await.unwrap());
                break;
            }
        }
        let throttled = throttled.expect("the login was throttled after a few wrong passwords");
        assert!(
            throttled.contains("Too many failed sign-ins") && throttled.contains("Wait "),
            "{throttled}"
        );
        screenshot(&c, &shots, "login-throttled.png").await;

        c.close().await.unwrap();
        drop(driver);
        stop_with_supervisor(suite, scheduler, supervisor).await;
    }
}
