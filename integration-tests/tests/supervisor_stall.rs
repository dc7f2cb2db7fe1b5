//! A stalled Scheduler and sagas that wait are visible (issue 15). The whole suite runs as real
//! processes.
//!
//! Waiting: Drone refuses every reservation (503), so a booking's saga is parked in the journal
//! until its next attempt. The Supervisor's overview counts it apart from the sagas in progress,
//! with the step it waits to run and the reason (the problem code), in its JSON, its HTML and its
//! metrics; once Drone reserves again it is scheduled and nothing waits.
//!
//! Stalled: the Scheduler is paused with SIGSTOP — it keeps its sockets and its leases' rows but
//! does nothing: no lease renewed, no booking read, no question answered, as a hung process or one
//! cut off from its database would. A booking offered meanwhile must show, within the configured
//! threshold, on the Supervisor's overview (its JSON API and the dashboard's HTML) and in its
//! metrics: the partition's lease expired (owner not alive), its oldest unstarted booking older
//! than `stall_after_secs` and growing. Resumed, the Scheduler schedules the booking and the flags
//! clear.
//!
//! Before the fix the overview asked the Scheduler for the partitions and their lag: a paused
//! Scheduler answered nothing (no partitions at all, only an error), and a running one reported
//! the age of the last record it had read — 0.00 s while a new booking waited unread; waiting
//! sagas were not told apart at all.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step should panic

mod common;

use std::time::Duration;

use common::refusing;
use integration_tests::harness::{Service, Stack, StackClient, StackOptions};
use integration_tests::{done_if, eventually_every, form, OPERATOR};
use serde_json::Value;

const OWNER: &str = "acc-stall";
/// The Supervisor's `stall_after_secs` in this test.
const STALL_AFTER_SECS: f64 = 3.0;
/// The Scheduler's lease TTL: an unrenewed lease runs out this long after its last renewal.
const LEASE_TTL_MS: u64 = 2000;
/// Longest wait for something that must happen.
const WAIT: Duration = Duration::from_secs(60);
/// How often a wait asks again.
const POLL: Duration = Duration::from_millis(200);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalls_and_waiting_sagas_are_visible_on_the_overview_and_in_the_metrics() {
    let options = StackOptions::default()
        .env(
            Service::Scheduler,
            "APP_SCHEDULER__LEASE_TTL_MS",
            LEASE_TTL_MS,
        )
        // A drone that cannot be reserved is retried every 2 s, parked in the journal meanwhile.
        .env(Service::Scheduler, "APP_SCHEDULER__PARK_AFTER_MS", 50)
        .env(
            Service::Scheduler,
            "APP_SCHEDULER__STEPS__DRONE__MIN_DELAY_MS",
            2000,
        )
        .env(
            Service::Scheduler,
            "APP_SCHEDULER__STEPS__DRONE__MAX_DELAY_MS",
            2000,
        )
        .env(
            Service::Scheduler,
            "APP_SCHEDULER__STEPS__DRONE__JITTER",
            false,
        )
        // Setting any of the drone policy's fields resets the others to the generic defaults
        // (8 attempts): enough attempts to outlast the test's fault.
        .env(
            Service::Scheduler,
            "APP_SCHEDULER__STEPS__DRONE__MAX_ATTEMPTS",
            1000,
        )
        .env(
            Service::Scheduler,
            "APP_SCHEDULER__STEPS__DRONE__BUDGET_MS",
            600_000,
        )
        .env(
            Service::Supervisor,
            "APP_SUPERVISOR__STALL_AFTER_SECS",
            STALL_AFTER_SECS,
        )
        .env(
            Service::Supervisor,
            "APP_SUPERVISOR__PARTITION_REFRESH_MS",
            300,
        )
        // A paused Scheduler accepts connections and never answers: give up on it quickly.
        .env(Service::Supervisor, "APP_SCHEDULER__TIMEOUT_MS", 1000);
    let mut stack = Stack::start(options).await;
    stack.account(OWNER, "active").await;
    let client = stack.client();
    let partitions = usize::try_from(stack.partitions).unwrap();

    // Working: a booking is scheduled; every partition has a live owner and none is flagged.
    let first = client
        .book_ok(&StackClient::booking(OWNER, 120, "Small"))
        .await;
    stack.wait_state(first, "completed", WAIT).await;
    eventually_every(
        WAIT,
        POLL,
        "every partition has an owner and none is stalled",
        async || {
            let o = overview(&stack).await;
            let ps = o["partitions"].as_array().cloned().unwrap_or_default();
            let fine = ps.len() == partitions
                && ps.iter().all(|p| {
                    p["owner"].as_str().is_some_and(|o| !o.is_empty()) && p["stalled"] != true
                });
            done_if(fine, o)
        },
    )
    .await;

    // Waiting: Drone answers 503 to every reservation, so the next booking's saga is parked until
    // its next attempt. It is counted apart from the sagas in progress, with its step and reason,
    // on the overview and in the metrics.
    let no_drone = refusing("PUT", "/api/dronedeliveries", 503);
    stack.scheduler_faults.drone.set_faults(no_drone);
    let waiting = client
        .book_ok(&StackClient::booking(OWNER, 120, "Small"))
        .await;
    let o = eventually_every(
        WAIT,
        POLL,
        "the parked saga is counted as waiting, with its reason",
        async || {
            let o = overview(&stack).await;
            let reason = o["waitingReasons"].as_array().and_then(|rs| {
                rs.iter()
                    .find(|r| r["step"] == "ReserveDrone" && r["reason"] == "injected-fault")
                    .cloned()
            });
            match reason {
                Some(r) if o["waiting"].as_i64() >= Some(1) && r["count"].as_i64() >= Some(1) => {
                    Ok(o)
                }
                _ => Err(o),
            }
        },
    )
    .await;
    assert!(
        o["progressing"].is_i64(),
        "sagas in progress are counted apart: {o}"
    );
    let group = o["waitingReasons"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["reason"] == "injected-fault")
        .unwrap()
        .clone();
    assert_eq!(group["exampleDeliveryId"], waiting.to_string(), "{group}");
    assert!(
        group["lastError"]
            .as_str()
            .is_some_and(|e| e.contains("503")),
        "the last error is shown: {group}"
    );
    let supervisor = stack.service(Service::Supervisor);
    eventually_every(
        WAIT,
        POLL,
        "the waiting saga is in the metrics",
        async || {
            let text = metrics(supervisor).await;
            let n = sample(
                &text,
                "supervisor_sagas_waiting",
                &["step=\"ReserveDrone\"", "reason=\"injected-fault\""],
            );
            done_if(
                n.is_some_and(|n| n >= 1.0)
                    && sample(&text, "supervisor_sagas_progressing", &[]).is_some(),
                format!("supervisor_sagas_waiting {n:?}"),
            )
        },
    )
    .await;
    // Between its attempts (a timer due, then the attempt) a saga is not waiting: look again.
    let dashboard = Dashboard::login(&stack).await;
    eventually_every(
        WAIT,
        POLL,
        "the dashboard lists the waiting saga with its reason",
        async || {
            let html = dashboard.get("/dashboard").await;
            let table = html
                .split("<table id=\"waiting\"")
                .nth(1)
                .and_then(|t| t.split("</table>").next())
                .unwrap_or_default()
                .to_owned();
            done_if(
                table.contains("injected-fault") && table.contains(&waiting.to_string()),
                table,
            )
        },
    )
    .await;
    // The "Downstream services" line names every service the Scheduler and the Supervisor call,
    // from both: a drone service that refuses one saga every 2 s is retried, not cut off (far
    // below the breaker's 20 calls in its window).
    let html = dashboard.get("/dashboard").await;
    let line = downstream_line(&html).unwrap_or_else(|| panic!("no downstream line: {html}"));
    assert!(line.contains("Downstream services"), "{line}");
    for service in ["account", "package", "drone", "delivery"] {
        assert!(
            line.contains(&format!("data-service=\"{service}\" data-state=\"closed\"")),
            "{service} is shown closed: {line}"
        );
    }
    assert!(
        !line.contains("not told by"),
        "the Scheduler told its breakers: {line}"
    );

    // Drones again: it is scheduled and no longer waits.
    stack.scheduler_faults.drone.set_faults(Vec::new());
    stack.wait_state(waiting, "completed", WAIT).await;
    eventually_every(WAIT, POLL, "nothing waits any more", async || {
        let o = overview(&stack).await;
        done_if(o["waiting"] == 0, o)
    })
    .await;

    // Stalled: nothing renews the leases or reads the log; a new booking is still accepted.
    stack.service_mut(Service::Scheduler).pause();
    let second = client
        .book_ok(&StackClient::booking(OWNER, 120, "Small"))
        .await;
    let p = usize::try_from(messaging::partition_for(
        &second.to_string(),
        stack.partitions,
    ))
    .unwrap();

    // The JSON API flags its partition: lease expired, owner not alive, the booking unstarted for
    // longer than the threshold.
    let flagged = eventually_every(
        WAIT,
        POLL,
        &format!(
            "partition {p} is flagged stalled with an expired lease and an old unstarted booking"
        ),
        async || {
            let o = overview(&stack).await;
            let part = o["partitions"][p].clone();
            let age = part["oldestUnstartedAgeSeconds"].as_f64().unwrap_or(0.0);
            if part["stalled"] == true && part["ownerAlive"] == false && age > STALL_AFTER_SECS {
                Ok((o, part))
            } else {
                Err(o)
            }
        },
    )
    .await;
    let (o, part) = flagged;
    let reasons = part["stallReasons"].to_string();
    assert!(
        reasons.contains("expired") && reasons.contains("oldest unstarted booking"),
        "both reasons are given: {part}"
    );
    assert!(
        part["leaseExpiresAt"].is_string(),
        "the lease expiry is shown: {part}"
    );
    assert!(o["stalledPartitions"].as_i64().unwrap() >= 1, "{o}");
    assert!(
        part["lagSeconds"].as_f64().unwrap() > STALL_AFTER_SECS,
        "lag is measured against the log's head: {part}"
    );
    // The age keeps growing while the Scheduler is stalled.
    let age = part["oldestUnstartedAgeSeconds"].as_f64().unwrap();
    eventually_every(WAIT, POLL, "the unstarted age grows", async || {
        let o = overview(&stack).await;
        let now = o["partitions"][p]["oldestUnstartedAgeSeconds"].as_f64();
        done_if(now.is_some_and(|a| a > age + 1.0), o)
    })
    .await;

    // The dashboard shows the same, to a person; its "Downstream services" line still shows the
    // Supervisor's own breakers and says the Scheduler did not tell its own.
    let html = dashboard.get("/dashboard").await;
    let line = downstream_line(&html).unwrap_or_else(|| panic!("no downstream line: {html}"));
    assert!(
        line.contains("not told by scheduler:") && line.contains("data-service=\"package\""),
        "{line}"
    );
    let row = partition_row(&html, p).unwrap_or_else(|| panic!("no row for partition {p}: {html}"));
    assert!(
        row.contains("class=\"stalled\""),
        "the row is flagged: {row}"
    );
    assert!(
        row.contains("STALLED")
            && row.contains("expired")
            && row.contains("oldest unstarted booking"),
        "the row says why: {row}"
    );

    // And the metrics, for the alert rule.
    let supervisor = stack.service(Service::Supervisor);
    eventually_every(WAIT, POLL, "the metrics flag the partition", async || {
        let text = metrics(supervisor).await;
        let stalled = metric(&text, "supervisor_partition_stalled", p);
        let alive = metric(&text, "supervisor_partition_owner_alive", p);
        let age = metric(
            &text,
            "supervisor_partition_oldest_unstarted_age_seconds",
            p,
        );
        if stalled == Some(1.0) && alive == Some(0.0) && age.is_some_and(|a| a > STALL_AFTER_SECS) {
            Ok(())
        } else {
            Err(format!(
                "stalled {stalled:?}, owner alive {alive:?}, age {age:?}"
            ))
        }
    })
    .await;

    // Resumed: the booking is scheduled and the flags clear.
    stack.service_mut(Service::Scheduler).resume();
    stack.wait_state(second, "completed", WAIT).await;
    eventually_every(
        WAIT,
        POLL,
        &format!("partition {p} is no longer flagged"),
        async || {
            let o = overview(&stack).await;
            let part = &o["partitions"][p];
            done_if(part["stalled"] == false && part["ownerAlive"] == true, o)
        },
    )
    .await;
    eventually_every(WAIT, POLL, "the metrics clear", async || {
        let text = metrics(stack.service(Service::Supervisor)).await;
        let stalled = metric(&text, "supervisor_partition_stalled", p);
        done_if(stalled == Some(0.0), format!("stalled {stalled:?}"))
    })
    .await;
    let html = dashboard.get("/dashboard").await;
    let row = partition_row(&html, p).unwrap();
    assert!(
        row.contains("class=\"ok\""),
        "the row is no longer flagged: {row}"
    );

    stack.stop().await;
}

/// `GET /api/overview` of the Supervisor (service token).
async fn overview(stack: &Stack) -> Value {
    let (status, body) = stack
        .service(Service::Supervisor)
        .get("/api/overview")
        .await;
    assert_eq!(status, 200, "overview: {body}");
    body
}

async fn metrics(supervisor: &integration_tests::harness::ServiceProcess) -> String {
    reqwest::get(supervisor.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of metric `name` for `partition` (whatever other labels the sample has).
fn metric(text: &str, name: &str, partition: usize) -> Option<f64> {
    sample(text, name, &[&format!("partition=\"{partition}\"")])
}

/// The value of the first sample of metric `name` that has every one of `labels` (`key="value"`).
fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .find(|l| {
            let set = l
                .split_once('{')
                .and_then(|(_, rest)| rest.split_once('}'))
                .map_or("", |(set, _)| set);
            labels
                .iter()
                .all(|want| set.split(',').any(|have| have == *want))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// The overview's "Downstream services" line (`<p id="downstream">`), in its HTML.
fn downstream_line(html: &str) -> Option<String> {
    let start = html.find(" id=\"downstream\"")?;
    let end = html[start..].find("</p>")? + start;
    Some(html[start..end].to_owned())
}

/// The `<tr>` of partition `p` in the overview's HTML.
fn partition_row(html: &str, p: usize) -> Option<String> {
    let start = html.find(&format!("<tr id=\"partition-{p}\""))?;
    let end = html[start..].find("</tr>")? + start;
    Some(html[start..end].to_owned())
}

/// A signed-in operator's browser, without a browser: the login form, then the session cookie.
struct Dashboard {
    http: reqwest::Client,
    base: String,
    cookies: String,
}

impl Dashboard {
    async fn login(stack: &Stack) -> Self {
        let base = stack.service(Service::Supervisor).address();
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(15))
            .build()
            .unwrap();
        let page = http.get(format!("{base}/login")).send().await.unwrap();
        let form_cookies = cookies(&page);
        let html = page.text().await.unwrap();
        // The form's CSRF token is the value of its hidden `csrf` field.
        let csrf = html
            .split("name=\"csrf\" value=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .expect("the login form has a csrf field")
            .to_owned();
        let signed_in = http
            .post(format!("{base}/login"))
            .header(reqwest::header::COOKIE, &form_cookies)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(form(&[
                ("username", OPERATOR.0),
                ("password", OPERATOR.1),
                ("csrf", csrf.as_str()),
                ("next", "/dashboard"),
            ]))
            .send()
            .await
            .unwrap();
        assert_eq!(signed_in.status(), 303, "signed in");
        let session = cookies(&signed_in);
        assert!(!session.is_empty(), "a session cookie is set");
        Self {
            http,
            base,
            cookies: session,
        }
    }

    async fn get(&self, path: &str) -> String {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .header(reqwest::header::COOKIE, &self.cookies)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "GET {path}");
        r.text().await.unwrap()
    }
}

/// The cookies a response sets (non-empty ones), as a `Cookie` header value.
fn cookies(r: &reqwest::Response) -> String {
    r.headers()
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.split(';').next())
        .filter(|pair| pair.split_once('=').is_some_and(|(_, v)| !v.is_empty()))
        .collect::<Vec<_>>()
        .join("; ")
}
