//! The Supervisor's logins, users, audit log and action reasons as an attacker and an on-call
//! person meet them (issue 15): a flood of bad logins is throttled and cannot exhaust memory,
//! `next` never leaves the site, users and roles follow the settings at once, the audit log holds
//! logins, logouts and refusals and is written before an action (no audit, no action), and a
//! reason the form allows never fails at the Scheduler.
//!
//! The Supervisor runs on PostgreSQL. Where no saga is needed it runs alone, with the embedded
//! messaging backend in a temporary folder (logins never touch the broker); where a failed saga is
//! needed it runs with the whole suite on RabbitMQ.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step should panic

use std::collections::BTreeMap;
use std::time::Duration;

mod common;

use common::{stop_with_supervisor, suite_with_scheduler};
use integration_tests::harness::{binary, free_port, ServiceProcess};
use integration_tests::{
    done_if, eventually, spawn, spawn_supervisor, test_auth, test_http, Backend, Suite,
    SuiteFaults, SupervisorApp, TestApp, TestDb, OPERATOR, SERVICE_TOKEN, VIEWER,
};
use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(30);

/// One HTTP answer, read whole.
struct Page {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Page {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn location(&self) -> &str {
        self.header("location").unwrap_or_default()
    }

    fn assert_location_starts_with(&self, prefix: &str) {
        assert!(self.location().starts_with(prefix), "{}", self.location());
    }

    /// The session cookie this answer sets.
    fn session(&self) -> Option<String> {
        self.headers
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|c| c.strip_prefix("sv_session="))
            .and_then(|c| c.split(';').next())
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    /// The value of the first `name="csrf"` input on the page.
    fn csrf(&self) -> String {
        self.body
            .split("name=\"csrf\" value=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap_or_else(|| panic!("no CSRF token on the page: {}", self.body))
            .to_owned()
    }
}

/// The dashboard as a browser without JavaScript uses it: forms, cookies, no redirects followed.
#[derive(Clone)]
struct Web {
    base: String,
    http: reqwest::Client,
}

impl Web {
    fn new(base: &str) -> Self {
        Web {
            base: base.to_owned(),
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Page {
        let res = req.send().await.expect("the supervisor answers");
        Page {
            status: res.status(),
            headers: res.headers().clone(),
            body: res.text().await.unwrap_or_default(),
        }
    }

    /// Posts the login form. The form token is a double-submit cookie, so any value sent as both
    /// cookie and field passes. `headers`: e.g. `accept` or `x-forwarded-for`.
    async fn login_with(
        &self,
        user: &str,
        password: &str,
        next: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Page {
        let mut form = vec![
            ("username", user),
            ("password", password),
            ("csrf", "form-token"),
        ];
        if let Some(n) = next {
            form.push(("next", n));
        }
        let mut req = self
            .http
            .post(format!("{}/login", self.base))
            .header("cookie", "sv_login=form-token")
            .header("content-type", "application/x-www-form-urlencoded")
            .body(integration_tests::form(&form));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.send(req).await
    }

    /// Signs in and returns the session cookie's value.
    async fn login(&self, (user, password): (&str, &str)) -> String {
        let p = self.login_with(user, password, None, &[]).await;
        assert_eq!(p.status, 303, "login of {user}: {}", p.body);
        p.session()
            .unwrap_or_else(|| panic!("login of {user} set no session: {:?}", p.headers))
    }

    async fn get(&self, path: &str, session: Option<&str>) -> Page {
        let mut req = self.http.get(format!("{}{path}", self.base));
        if let Some(s) = session {
            req = req.header("cookie", format!("sv_session={s}"));
        }
        self.send(req).await
    }

    /// Posts the dashboard's form for `action` (retry, compensate) on saga `id` with `reason`.
    async fn act(&self, action: &str, id: Uuid, session: &str, csrf: &str, reason: &str) -> Page {
        let path = format!("/dashboard/sagas/{id}/{action}");
        self.post(&path, session, &[("csrf", csrf), ("reason", reason)])
            .await
    }

    async fn post(&self, path: &str, session: &str, form: &[(&str, &str)]) -> Page {
        let req = self
            .http
            .post(format!("{}{path}", self.base))
            .header("cookie", format!("sv_session={session}"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(integration_tests::form(form));
        self.send(req).await
    }
}

/// Every byte but ASCII letters and digits percent-encoded.
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn user(role: &str, password: &str) -> supervisor::UserSettings {
    supervisor::UserSettings {
        role: role.to_owned(),
        password: Some(SecretString::from(password.to_owned())),
        password_hash: None,
    }
}

fn users(list: &[(&str, &str, &str)]) -> BTreeMap<String, supervisor::UserSettings> {
    list.iter()
        .map(|(name, role, password)| ((*name).to_owned(), user(role, password)))
        .collect()
}

/// A fresh Supervisor database on PostgreSQL and a temporary folder.
async fn scratch() -> (TestDb, tempfile::TempDir) {
    let db = TestDb::new(Backend::Postgres, "supervisor").await;
    (db, tempfile::tempdir().unwrap())
}

/// A Supervisor alone on `db` (kept by the caller, so it can be started again on the same
/// database), with the embedded messaging backend in `dir` and no Scheduler behind it.
async fn lone_supervisor(
    db: &TestDb,
    dir: &tempfile::TempDir,
    users: BTreeMap<String, supervisor::UserSettings>,
) -> TestApp {
    let messaging = messaging::MessagingSettings::new(format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("messaging.db").display()
    ));
    let settings = supervisor::Settings {
        http: test_http(),
        database: db.settings.clone(),
        auth: test_auth(),
        messaging,
        scheduler: supervisor::SchedulerLink {
            url: format!("http://127.0.0.1:{}", free_port()),
            ..Default::default()
        },
        users,
        ..Default::default()
    };
    spawn::<supervisor::Application>(settings, None).await
}

/// Resident memory of a process in KiB: (now, peak) from /proc/<pid>/status.
fn resident_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Peak resident memory (VmHWM of the Supervisor process) allowed while 300 bad logins arrive at
/// once: about 60 MiB at rest (measured), plus the two password checks running at a time, 19 MiB
/// each (argon2id defaults), plus slack. Unbounded, the checks ran on up to 256 blocking threads
/// at once: several GiB.
const FLOOD_PEAK_RSS_MIB: u64 = 160;

/// 300 concurrent bad logins for one user from one address against a Supervisor process: but for
/// the first few, every answer is `429` (throttled) or `503` (password checks busy) with
/// `Retry-After` and a stable problem code; its resident memory stays under
/// [`FLOOD_PEAK_RSS_MIB`]; guessing on is throttled after the free failures; a second replica on
/// the same database refuses that user too; another user logs in from elsewhere meanwhile, and
/// the attacked user after the wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn login_flood_is_throttled_within_bounded_memory() {
    let (db, dir) = scratch().await;
    let bin = binary("supervisor");
    let env = |replica: &str| -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = [
            (
                "APP_DATABASE__URL",
                db.settings.url.expose_secret().to_owned(),
            ),
            (
                "APP_MESSAGING__URL",
                format!(
                    "sqlite://{}?mode=rwc",
                    dir.path().join(format!("messaging-{replica}.db")).display()
                ),
            ),
            ("APP_AUTH__SERVICE_TOKEN", SERVICE_TOKEN.to_owned()),
            (
                "APP_SCHEDULER__URL",
                format!("http://127.0.0.1:{}", free_port()),
            ),
            // Behind a proxy (the Ingress) that appends the client's address.
            (
                "APP_SUPERVISOR__LOGIN__CLIENT_ADDRESS_HEADER",
                "x-forwarded-for".to_owned(),
            ),
            // One wait of 5 s from the fourth failure on: longer than the flood lasts, short
            // enough to sit out. (Growing waits are the unit tests' business.)
            ("APP_SUPERVISOR__LOGIN__FIRST_DELAY_MS", "5000".to_owned()),
            ("APP_SUPERVISOR__LOGIN__MAX_DELAY_SECS", "5".to_owned()),
            ("RUST_LOG", "warn".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        for (name, role, password) in [
            (OPERATOR.0, "operator", OPERATOR.1),
            (VIEWER.0, "viewer", VIEWER.1),
        ] {
            let name = name.to_uppercase();
            env.push((format!("APP_USERS__{name}__ROLE"), role.to_owned()));
            env.push((format!("APP_USERS__{name}__PASSWORD"), password.to_owned()));
        }
        env
    };
    let mut a = ServiceProcess::spawn("supervisor-a", &bin, env("a"), dir.path(), free_port());
    a.wait_ready(WAIT).await;
    let mut b = ServiceProcess::spawn("supervisor-b", &bin, env("b"), dir.path(), free_port());
    b.wait_ready(WAIT).await;
    let pid = a.pid().unwrap();
    let (at_rest, _) = resident_kib(pid);

    let web = Web::new(&a.address());
    let attacker = [
        ("accept", "application/json"),
        ("x-forwarded-for", "203.0.113.7"),
    ];
    let attempts = (0..300).map(|i| {
        let web = web.clone();
        async move {
            web.login_with(OPERATOR.0, &format!("guess-{i}"), None, &attacker)
                .await
        }
    });
    let answers = futures::future::join_all(attempts).await;

    let (now, peak) = resident_kib(pid);
    println!(
        "supervisor VmRSS: {} MiB at rest, {} MiB after the flood, peak {} MiB",
        at_rest / 1024,
        now / 1024,
        peak / 1024
    );
    let mut by_status = BTreeMap::<u16, usize>::new();
    for p in &answers {
        *by_status.entry(p.status.as_u16()).or_default() += 1;
    }
    println!("answers to 300 bad logins: {by_status:?}");
    assert!(
        peak < FLOOD_PEAK_RSS_MIB * 1024,
        "peak resident memory {} MiB, over {FLOOD_PEAK_RSS_MIB} MiB",
        peak / 1024
    );
    for p in &answers {
        match p.status.as_u16() {
            401 => assert_eq!(p.json()["code"], "unauthorized", "{}", p.body),
            429 => assert_eq!(p.json()["code"], "rate-limited", "{}", p.body),
            503 => assert_eq!(p.json()["code"], "login-busy", "{}", p.body),
            other => panic!("unexpected answer {other} to a bad login: {}", p.body),
        }
        if p.status != 401 {
            let wait: u64 = p.header("retry-after").unwrap().parse().unwrap();
            assert!((1..=5).contains(&wait), "Retry-After {wait}");
        }
    }
    // Two checks at a time, each some tens of milliseconds: the rest of the flood is refused.
    let mut checked = by_status.get(&401).copied().unwrap_or(0);
    assert!(
        (1..=5).contains(&checked),
        "{checked} of 300 guesses were checked: {by_status:?}"
    );
    // The attacker keeps guessing, one at a time now: after the free failures every guess waits.
    let mut refused = None;
    for i in 0..10 {
        let p = web
            .login_with(OPERATOR.0, &format!("again-{i}"), None, &attacker)
            .await;
        match p.status.as_u16() {
            401 => checked += 1,
            429 => {
                assert_eq!(p.json()["code"], "rate-limited", "{}", p.body);
                refused = Some(p);
                break;
            }
            other => panic!("unexpected answer {other} to a bad login: {}", p.body),
        }
    }
    assert!(
        refused.is_some(),
        "never throttled; {checked} guesses checked"
    );
    // 3 free failures, then the fourth starts the wait; 2 checks may have been under way.
    assert!(checked <= 5, "{checked} guesses checked before the wait");

    // A second replica on the same database knows the attacked user is waiting.
    let from_elsewhere = ("x-forwarded-for", "198.51.100.2");
    let elsewhere = [("accept", "application/json"), from_elsewhere];
    let on_b = Web::new(&b.address())
        .login_with(OPERATOR.0, OPERATOR.1, None, &elsewhere)
        .await;
    assert_eq!(on_b.status, 429, "{}", on_b.body);

    // Another user from another address is not affected.
    let viewer = web
        .login_with(VIEWER.0, VIEWER.1, None, &[from_elsewhere])
        .await;
    assert_eq!(viewer.status, 303, "{}", viewer.body);
    assert!(viewer.session().is_some());
    // The attacked user, after the wait, with the right password.
    let wait: u64 = on_b.header("retry-after").unwrap().parse().unwrap();
    tokio::time::sleep(Duration::from_secs(wait)).await;
    let operator = eventually(WAIT, "the operator's login after the wait", async || {
        let p = web
            .login_with(OPERATOR.0, OPERATOR.1, None, &[from_elsewhere])
            .await;
        match p.status.as_u16() {
            303 => Ok(p),
            429 => Err(p.status),
            other => panic!("unexpected {other}: {}", p.body),
        }
    })
    .await;
    assert!(operator.session().is_some());

    // The failures that started a wait are in the audit log; the flood did not write 300 rows.
    let audit: Vec<Value> = reqwest::Client::new()
        .get(a.url("/api/audit"))
        .bearer_auth(SERVICE_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let failed = audit
        .iter()
        .filter(|r| r["action"] == "login" && r["actor"] == OPERATOR.0)
        .filter(|r| r["outcome"].as_str().unwrap().starts_with("failed"))
        .count();
    assert_eq!(failed, checked, "{audit:?}");

    a.terminate(Duration::from_secs(10)).await;
    b.terminate(Duration::from_secs(10)).await;
}

/// A person who signs in too often with a wrong password reads why and how long to wait, on the
/// login page (the refused attempt is sent back to it with `Retry-After`: the service answers
/// every error status with problem+json, which a browser would show raw).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_login_page_says_how_long_to_wait() {
    let (db, dir) = scratch().await;
    let app = lone_supervisor(&db, &dir, users(&[("olivia", "operator", "right-1")])).await;
    let web = Web::new(&app.address);
    let mut throttled = None;
    for _ in 0..8 {
        let p = web
            .login_with(
                "olivia",
                "wrong",
                Some("/dashboard/parked"),
                &[("accept", "text/html")],
            )
            .await;
        assert_eq!(p.status, 303, "{}", p.body);
        if p.location().starts_with("/login?throttled=") {
            throttled = Some(p);
            break;
        }
        p.assert_location_starts_with("/login?failed=1");
    }
    let p = throttled.expect("the login was throttled after a few failures");
    let wait: u64 = p.header("retry-after").unwrap().parse().unwrap();
    assert!(wait >= 1);
    assert!(
        p.location().ends_with("next=/dashboard/parked"),
        "{}",
        p.location()
    );
    let page = web.get(p.location(), None).await;
    assert_eq!(page.status, 200);
    assert!(
        page.body.contains("id=\"throttled\"")
            && page.body.contains("Too many failed sign-ins")
            && page.body.contains(&format!("Wait {wait} second")),
        "{}",
        page.body
    );
    // The page is a working login form again, still going where the person meant to.
    assert!(page.body.contains("id=\"sign-in\""));
    assert!(page
        .body
        .contains("name=\"next\" value=\"/dashboard/parked\""));
    // Until the wait is over even the right password is not checked.
    let p = web.login_with("olivia", "right-1", None, &[]).await;
    p.assert_location_starts_with("/login?throttled=");
    assert!(p.session().is_none());
    app.stop().await;
}

/// `next` after login only ever names a path on this site.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_after_login_stays_on_the_site() {
    let (db, dir) = scratch().await;
    let app = lone_supervisor(&db, &dir, users(&[("olivia", "operator", "right-1")])).await;
    let web = Web::new(&app.address);
    for evil in [
        "/%09/evil.example",
        "//evil.example",
        "/\\evil.example",
        "https://evil.example",
    ] {
        let p = web.login_with("olivia", "right-1", Some(evil), &[]).await;
        assert_eq!(p.status, 303, "{evil}: {}", p.body);
        assert_eq!(p.location(), "/dashboard", "next={evil:?}");
        // Nor does the login page carry it into its form.
        let page = web
            .get(&format!("/login?next={}", urlencode(evil)), None)
            .await;
        assert!(
            page.body.contains("name=\"next\" value=\"/dashboard\""),
            "next={evil:?}: {}",
            page.body
        );
    }
    let good = "/dashboard/sagas?state=failed";
    let p = web.login_with("olivia", "right-1", Some(good), &[]).await;
    assert_eq!(p.location(), good);
    app.stop().await;
}

/// Users follow the settings: restarted without a user, that user's sessions end and it cannot
/// sign in; restarted with a role changed, a session opened before acts with the new role.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_and_roles_follow_the_settings() {
    let (db, dir) = scratch().await;
    let before = users(&[
        ("olivia", "operator", "right-1"),
        ("oscar", "operator", "right-2"),
    ]);
    let app = lone_supervisor(&db, &dir, before).await;
    let web = Web::new(&app.address);
    let olivia = web.login(("olivia", "right-1")).await;
    let oscar = web.login(("oscar", "right-2")).await;
    app.stop().await;

    // Oscar is gone from the settings; Olivia is a viewer now.
    let after = users(&[("olivia", "viewer", "right-1")]);
    let app = lone_supervisor(&db, &dir, after).await;
    let web = Web::new(&app.address);

    let p = web.get("/dashboard/sagas", Some(&oscar)).await;
    assert_eq!(p.status, 303, "a removed user's session still works");
    assert!(p.location().starts_with("/login"), "{}", p.location());
    let p = web.login_with("oscar", "right-2", None, &[]).await;
    p.assert_location_starts_with("/login?failed=1");
    assert!(p.session().is_none());

    let p = web.get("/dashboard/sagas", Some(&olivia)).await;
    assert_eq!(p.status, 200);
    assert!(p.body.contains("olivia · viewer"), "{}", p.body);
    let csrf = p.csrf();
    let id = Uuid::new_v4();
    let p = web
        .act("retry", id, &olivia, &csrf, "still an operator?")
        .await;
    assert_eq!(p.status, 403, "{}", p.body);
    assert_eq!(p.json()["code"], "forbidden");
    app.stop().await;
}

/// Logins, failed logins, logouts and refused actions are in the audit log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_log_records_logins_logouts_and_refusals() {
    let (db, dir) = scratch().await;
    let app = lone_supervisor(
        &db,
        &dir,
        users(&[
            ("olivia", "operator", "right-1"),
            ("victor", "viewer", "right-2"),
        ]),
    )
    .await;
    let web = Web::new(&app.address);
    let p = web.login_with("olivia", "wrong", None, &[]).await;
    assert!(p.location().starts_with("/login?failed=1"));
    let olivia = web.login(("olivia", "right-1")).await;
    let csrf = web.get("/dashboard/sagas", Some(&olivia)).await.csrf();
    let p = web.post("/logout", &olivia, &[("csrf", &csrf)]).await;
    assert_eq!(p.status, 303);
    assert_eq!(web.get("/dashboard/sagas", Some(&olivia)).await.status, 303);

    let victor = web.login(("victor", "right-2")).await;
    let csrf = web.get("/dashboard/sagas", Some(&victor)).await.csrf();
    let id = Uuid::new_v4();
    let p = web
        .act("compensate", id, &victor, &csrf, "let me try")
        .await;
    assert_eq!(p.status, 403);

    let audit = app.get("/api/audit").await;
    let rows: Vec<(String, String, String, String)> = audit
        .body
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
            (s("actor"), s("action"), s("target"), s("outcome"))
        })
        .collect();
    let expected = [
        ("olivia", "login", "127.0.0.1", "failed"),
        ("olivia", "login", "127.0.0.1", "ok"),
        ("olivia", "logout", "127.0.0.1", "ok"),
        ("victor", "login", "127.0.0.1", "ok"),
    ];
    for (i, (actor, action, target, outcome)) in expected.iter().enumerate() {
        let r = &rows[i];
        assert_eq!(
            (r.0.as_str(), r.1.as_str(), r.2.as_str(), r.3.as_str()),
            (*actor, *action, *target, *outcome),
            "{rows:?}"
        );
    }
    let refused = &rows[4];
    assert_eq!(
        (refused.0.as_str(), refused.1.as_str()),
        ("victor", "compensate")
    );
    assert_eq!(refused.2, id.to_string());
    assert!(refused.3.starts_with("refused: only operators"), "{rows:?}");
    assert_eq!(audit.body[0]["reason"], "let me try");
    app.stop().await;
}

/// A Suite with a Scheduler and a Supervisor, and a saga that failed (suspended account).
async fn failed_saga() -> (Suite, TestApp, SupervisorApp, Uuid) {
    let suspended = ("acc-suspended", "suspended");
    let (suite, scheduler) =
        suite_with_scheduler(Backend::Postgres, SuiteFaults::default(), suspended).await;
    let supervisor = spawn_supervisor(Backend::Postgres, &suite, &scheduler, |_| {}).await;
    let id = suite
        .book(&Suite::booking("acc-suspended", 24, "Small"))
        .await;
    suite.workflow(&scheduler, id, "failed", WAIT).await;
    supervisor.saga(id, "failed", WAIT).await;
    (suite, scheduler, supervisor, id)
}

/// When the audit log cannot be written, an operator's action is refused and not done; once it
/// can, the action's row is there with its outcome (not left pending).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn action_is_refused_when_the_audit_log_cannot_be_written() {
    let (suite, scheduler, supervisor, id) = failed_saga().await;
    let web = Web::new(&supervisor.app.address);
    let olivia = web.login(OPERATOR).await;
    let csrf = web
        .get(&format!("/dashboard/sagas/{id}"), Some(&olivia))
        .await
        .csrf();
    let before = suite.workflow(&scheduler, id, "failed", WAIT).await;

    // Every insert into the audit log fails from now on.
    let db = sea_orm::Database::connect(supervisor.settings.database.url.expose_secret())
        .await
        .unwrap();
    use sea_orm::ConnectionTrait;
    db.execute_unprepared(
        "CREATE FUNCTION refuse_audit() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'the audit log refuses writes (test)'; END $$; \
         CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_log \
         FOR EACH ROW EXECUTE FUNCTION refuse_audit();",
    )
    .await
    .unwrap();

    for action in ["retry", "compensate"] {
        let p = web.act(action, id, &olivia, &csrf, "audit is down").await;
        assert_eq!(p.status, 503, "{action}: {}", p.body);
        assert_eq!(p.json()["code"], "audit-unavailable", "{}", p.body);
        assert!(p.header("retry-after").is_some());
    }
    // Not done: the saga is where it was, same version (a retry would have moved it at once),
    // and nothing was queued for compensation.
    let now = suite.workflow(&scheduler, id, "failed", WAIT).await;
    assert_eq!(now["version"], before["version"], "{now}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let now = suite.workflow(&scheduler, id, "failed", WAIT).await;
    assert_eq!(now["version"], before["version"], "{now}");
    let detail = supervisor.app.get(&format!("/api/sagas/{id}")).await;
    assert_eq!(
        detail.body["compensations"],
        serde_json::json!([]),
        "{}",
        detail.body
    );

    // The audit log works again: the action is done, and its row carries the outcome.
    db.execute_unprepared("DROP TRIGGER refuse_audit ON audit_log")
        .await
        .unwrap();
    let p = web.act("retry", id, &olivia, &csrf, "audit is back").await;
    assert_eq!(p.status, 303, "{}", p.body);
    assert!(p.location().contains("done="), "{}", p.location());
    let audit = supervisor.app.get("/api/audit").await;
    let rows = audit.body.as_array().unwrap();
    let retry = rows.iter().find(|r| r["action"] == "retry").unwrap();
    assert_eq!(retry["reason"], "audit is back");
    assert!(
        retry["outcome"]
            .as_str()
            .unwrap()
            .starts_with("running again"),
        "{retry}"
    );
    assert!(
        rows.iter().all(|r| r["reason"] != "audit is down"),
        "{}",
        audit.body
    );

    stop_with_supervisor(suite, scheduler, supervisor).await;
}

/// The longest reason the dashboard's form allows is accepted by the Scheduler (the action is
/// done, not failed with a `400` downstream); one character more is refused by the Supervisor
/// itself with a `400` naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_longest_reason_the_form_allows_reaches_the_scheduler() {
    let (suite, scheduler, supervisor, id) = failed_saga().await;
    let web = Web::new(&supervisor.app.address);
    let olivia = web.login(OPERATOR).await;
    let page = web
        .get(&format!("/dashboard/sagas/{id}"), Some(&olivia))
        .await;
    let csrf = page.csrf();
    let max: usize = page
        .body
        .split("id=\"retry-reason\"")
        .nth(1)
        .and_then(|rest| rest.split("maxlength=\"").nth(1))
        .and_then(|rest| rest.split('"').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no maxlength on the retry reason: {}", page.body));
    let before = suite.workflow(&scheduler, id, "failed", WAIT).await;

    // Four bytes each in UTF-8, twelve once form-encoded: the form body must still fit.
    let too_long = "🛸".repeat(max + 1);
    let p = web.act("retry", id, &olivia, &csrf, &too_long).await;
    assert_eq!(p.status, 400, "{}", p.body);
    let problem = p.json();
    assert_eq!(problem["errors"][0]["field"], "reason", "{problem}");
    assert_eq!(
        problem["errors"][0]["reason"],
        format!("must be at most {max} characters")
    );

    // As a browser sends a textarea filled to `maxlength`: multi-byte characters, and a line
    // break counted as one character but sent as CRLF.
    let longest = format!("{}\r\n{}", "🛸".repeat(max - 2), "z");
    let p = web.act("retry", id, &olivia, &csrf, &longest).await;
    assert_eq!(p.status, 303, "{}", p.body);
    assert!(
        p.location().contains("done="),
        "the retry was not done: {}",
        p.location()
    );
    let after = eventually(WAIT, "the retried saga to move on", async || {
        let r = scheduler.get(&format!("/api/workflows/{id}")).await;
        done_if(r.body["version"] != before["version"], r.body)
    })
    .await;
    assert_ne!(after["version"], before["version"]);

    stop_with_supervisor(suite, scheduler, supervisor).await;
}
