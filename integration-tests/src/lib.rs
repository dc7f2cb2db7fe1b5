//! Test harness for the suite: fresh databases (PostgreSQL with a random name, or a SQLite file in a
//! temporary folder), services bound to port 0, and typed HTTP helpers. Later issues extend it with
//! the broker, the Scheduler and the Supervisor.
//!
//! PostgreSQL comes from `DATABASE_URL` (any database on the server; the tests create their own)
//! and RabbitMQ from `AMQP_URL`; where one is not set and a Docker engine answers, from a container
//! that `test_support` starts with testcontainers. No test skips silently: with neither, the tests
//! that need the server fail and name both options.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test support: a failed setup should panic

mod app;
pub mod bench;
mod db;
pub mod faults;
pub mod harness;
pub mod proxy;
mod spawn;
pub mod wait;

pub use app::{Reply, TestApp};
pub use db::{Backend, TestDb};
pub use wait::{done_if, eventually, eventually_every};

/// Reads one sample (`name{labels} value`) from Prometheus text; labels must match exactly.
pub fn metric_sample(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (key, value) = l.rsplit_once(' ')?;
        (key == name_and_labels).then(|| value.parse().ok())?
    })
}

/// An `application/x-www-form-urlencoded` body of `fields`, as a browser posts a form.
pub fn form(fields: &[(&str, &str)]) -> String {
    serde_urlencoded::to_string(fields).expect("string pairs always encode")
}

/// Signs `user` in on the Supervisor dashboard at `base` (its login form, as a browser posts
/// it); the session cookie (`name=value`).
pub async fn dashboard_sign_in(base: &str, user: &str, password: &str) -> String {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(std::time::Duration::from_secs(15))
        .build()
        .expect("an HTTP client");
    // The login form's CSRF token is a double-submit cookie: any value the two agree on.
    let token = uuid::Uuid::new_v4().simple().to_string();
    let r = client
        .post(format!("{base}/login"))
        .header("cookie", format!("sv_login={token}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&[
            ("username", user),
            ("password", password),
            ("csrf", token.as_str()),
            ("next", "/dashboard"),
        ]))
        .send()
        .await
        .expect("the login form answers");
    assert_eq!(r.status(), 303, "signed in on {base}");
    r.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with("sv_session=") && !c.starts_with("sv_session=;"))
        .and_then(|c| c.split(';').next())
        .expect("a session cookie")
        .to_owned()
}

/// The RabbitMQ server the tests use: `AMQP_URL`, else a container started with
/// testcontainers when a Docker engine answers (see `test_support`).
pub fn amqp_url() -> String {
    test_support::amqp_url()
}

/// The `host:port` of an AMQP URL.
pub fn amqp_host_port(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let hostpath = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    hostpath.split('/').next().unwrap_or(hostpath).to_owned()
}
pub use spawn::*;

/// A service token long enough for `AuthSettings::require_service_token`.
pub const SERVICE_TOKEN: &str = "test-service-token-0123456789";
/// A JWT key long enough for `AuthSettings::require_jwt_secret`.
pub const JWT_SECRET: &str = "test-jwt-secret-0123456789-0123456789-abcdef";

/// Runs an async test body once per backend:
/// `both_backends!(my_test);` expects `async fn my_test(backend: Backend)` in the same module and
/// generates `postgres::my_test` and `sqlite::my_test`.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::Backend::Postgres).await
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::Backend::Sqlite).await
                }
            )*
        }
    };
}
