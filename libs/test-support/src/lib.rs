//! Where the tests find PostgreSQL and RabbitMQ.
//!
//! `DATABASE_URL` / `AMQP_URL` name a server when they are set (as `make test` sets them for the
//! servers on this machine). When one is not set and a Docker engine answers, the server is
//! started in a container with [`testcontainers`](https://docs.rs/testcontainers) — the
//! `testcontainers-modules` images, `postgres:15-alpine` and `rabbitmq:3.13-management` unless
//! `TEST_POSTGRES_IMAGE` / `TEST_RABBITMQ_IMAGE` name others (`name:tag`, e.g. from a registry
//! mirror, or the local stand-ins that `make test-containers` builds).
//!
//! One container per server serves the whole test binary under `cargo test`, and the whole run
//! under `cargo nextest` (which starts a process per test): the first test to ask starts it while
//! holding a file lock, the others find it by its labels. A small reaper process removes it when
//! the run ends (the owning process — this test binary, or nextest — exits), so nothing is left
//! behind; every test still creates its own database or queue prefix, as against a shared server.
//! When neither the variable nor an engine is there, the test fails and names both options.

use std::{
    collections::HashMap,
    fs::File,
    path::Path,
    process::{Command, Stdio},
    sync::{Mutex, OnceLock},
    time::Duration,
};

use testcontainers::{runners::AsyncRunner, ContainerAsync, Image, ImageExt, ReuseDirective};
use testcontainers_modules::{postgres::Postgres, rabbitmq::RabbitMq};

/// The label every container started here carries, with the owner as its value.
pub const OWNER_LABEL: &str = "drone-delivery.tests.owner";

/// The PostgreSQL server the tests use: `DATABASE_URL`, else a container (see the crate docs).
/// The URL names the database `postgres`; tests create their own databases on it.
pub fn postgres_url() -> String {
    Server::Postgres.url()
}

/// The RabbitMQ server the tests use: `AMQP_URL`, else a container (see the crate docs).
pub fn amqp_url() -> String {
    Server::RabbitMq.url()
}

/// The command (program and leading arguments) that runs `rabbitmqctl` against the broker of
/// [`amqp_url`]: `RABBITMQCTL` when set (e.g. `sudo rabbitmqctl`), `docker exec <container>
/// rabbitmqctl` when the broker is the tests' container, else this machine's `rabbitmqctl`.
pub fn rabbitmqctl() -> Vec<String> {
    if let Some(command) = std::env::var("RABBITMQCTL")
        .ok()
        .filter(|v| !v.trim().is_empty())
    {
        return command.split_whitespace().map(str::to_owned).collect();
    }
    amqp_url();
    match Server::RabbitMq.container() {
        Some(id) => ["docker", "exec", id.as_str(), "rabbitmqctl"]
            .map(str::to_owned)
            .to_vec(),
        None => vec!["rabbitmqctl".to_owned()],
    }
}

/// What this process found for a server.
#[derive(Debug, Clone)]
struct Found {
    url: String,
    /// The container, when it is one.
    container: Option<String>,
}

fn found() -> std::sync::MutexGuard<'static, HashMap<Server, Found>> {
    static FOUND: OnceLock<Mutex<HashMap<Server, Found>>> = OnceLock::new();
    FOUND
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Server {
    Postgres,
    RabbitMq,
}

impl Server {
    fn env_var(self) -> &'static str {
        match self {
            Server::Postgres => "DATABASE_URL",
            Server::RabbitMq => "AMQP_URL",
        }
    }

    fn image_var(self) -> &'static str {
        match self {
            Server::Postgres => "TEST_POSTGRES_IMAGE",
            Server::RabbitMq => "TEST_RABBITMQ_IMAGE",
        }
    }

    fn default_image(self) -> &'static str {
        match self {
            // 13+ for `DROP DATABASE … WITH (FORCE)`; 15 is what Debian 12 ships.
            Server::Postgres => "postgres:15-alpine",
            // 3.9+ for stream queues; the module waits for the management image's 4 plugins.
            Server::RabbitMq => "rabbitmq:3.13-management",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Server::Postgres => "postgres",
            Server::RabbitMq => "rabbitmq",
        }
    }

    fn example(self) -> &'static str {
        match self {
            Server::Postgres => "DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres",
            Server::RabbitMq => "AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f",
        }
    }

    fn image(self) -> String {
        std::env::var(self.image_var())
            .ok()
            .filter(|v| !v.trim().is_empty())
            .unwrap_or_else(|| self.default_image().to_owned())
    }

    fn container(self) -> Option<String> {
        found().get(&self).and_then(|f| f.container.clone())
    }

    fn url(self) -> String {
        if let Some(url) = std::env::var(self.env_var()).ok().filter(|v| !v.is_empty()) {
            return url;
        }
        // One lookup per process and server; the container itself is shared wider (crate docs).
        let mut found = found();
        if let Some(known) = found.get(&self) {
            return known.url.clone();
        }
        let image = self.image();
        // Own thread and runtime: callers may be inside a Tokio runtime or not.
        let started = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?
                .block_on(shared_container(self, &image))
        })
        .join()
        .unwrap_or_else(|_| Err("the container start panicked".to_owned()));
        match started {
            Ok(known) => {
                let url = known.url.clone();
                found.insert(self, known);
                url
            }
            Err(reason) => panic!(
                "{var} is not set and the {server} container could not be started: {reason}.\n\
                 Either point {var} at a server the tests may create {what} on, e.g. {example} \
                 (`make up` starts PostgreSQL and RabbitMQ on this machine), or start a Docker \
                 engine: the tests then run {image} with testcontainers ({image_var}=name:tag \
                 picks another image, e.g. from a registry mirror).",
                var = self.env_var(),
                server = self.key(),
                what = if self == Server::Postgres {
                    "databases"
                } else {
                    "queues"
                },
                example = self.example(),
                image = self.image(),
                image_var = self.image_var(),
            ),
        }
    }
}

/// The process whose end ends the run: nextest (the parent of every test process) or this test
/// binary under `cargo test`.
fn owner_pid() -> u32 {
    if std::env::var_os("NEXTEST_RUN_ID").is_some() {
        std::os::unix::process::parent_id()
    } else {
        std::process::id()
    }
}

/// `name:tag`, where a `:` before the last `/` belongs to a registry's port.
fn split_image(image: &str) -> (String, String) {
    match image.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => (name.to_owned(), tag.to_owned()),
        _ => (image.to_owned(), "latest".to_owned()),
    }
}

/// Starts (or finds) the run's container for `server` and returns its URL.
async fn shared_container(server: Server, image: &str) -> Result<Found, String> {
    let owner = owner_pid();
    let dir = std::env::temp_dir().join("drone-delivery-testcontainers");
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let lock_path = dir.join(format!("{owner}-{}.lock", server.key()));
    let lock = File::create(&lock_path)
        .map_err(|e| format!("cannot create {}: {e}", lock_path.display()))?;
    // Held while the container starts, so the other test processes of the run wait for it
    // instead of starting their own; released when `lock` is dropped.
    lock.lock()
        .map_err(|e| format!("cannot lock {}: {e}", lock_path.display()))?;
    let owner_label = format!("{owner}-{}", server.key());
    let (name, tag) = split_image(image);
    let run = Run {
        owner,
        label: &owner_label,
        lock_path: &lock_path,
    };
    match server {
        Server::Postgres => {
            let container = start(Postgres::default(), &name, &tag, &run).await?;
            let (host, port) = address(&container, 5432).await?;
            Ok(Found {
                url: format!("postgres://postgres:postgres@{host}:{port}/postgres"),
                container: Some(container.id().to_owned()),
            })
        }
        Server::RabbitMq => {
            let container = start(RabbitMq::default(), &name, &tag, &run).await?;
            let (host, port) = address(&container, 5672).await?;
            Ok(Found {
                url: format!("amqp://guest:guest@{host}:{port}/%2f"),
                container: Some(container.id().to_owned()),
            })
        }
    }
}

/// The test run a container belongs to.
struct Run<'a> {
    /// The process whose exit ends the run (see [`owner_pid`]).
    owner: u32,
    /// The value of [`OWNER_LABEL`] on the run's container.
    label: &'a str,
    /// The lock held while the container starts.
    lock_path: &'a Path,
}

async fn start<I: Image>(
    image: I,
    name: &str,
    tag: &str,
    run: &Run<'_>,
) -> Result<ContainerAsync<I>, String> {
    // `Always` reuse: a container with this owner label is found again by the run's other
    // processes, and dropping the handle leaves it running; the reaper removes it.
    let container = image
        .with_name(name)
        .with_tag(tag)
        .with_label(OWNER_LABEL, run.label)
        .with_reuse(ReuseDirective::Always)
        .with_startup_timeout(Duration::from_secs(120))
        .start()
        .await
        .map_err(|e| format!("{name}:{tag}: {e}"))?;
    // The first process of the run to get here started it: that one leaves a reaper behind. (A
    // marker naming another container is a leftover of an earlier owner with the same pid.)
    let started_marker = run.lock_path.with_extension("started");
    if std::fs::read_to_string(&started_marker).ok().as_deref() != Some(container.id()) {
        spawn_reaper(run.owner, container.id(), run.lock_path, &started_marker);
        std::fs::write(&started_marker, container.id())
            .map_err(|e| format!("cannot write {}: {e}", started_marker.display()))?;
    }
    Ok(container)
}

async fn address<I: Image>(
    container: &ContainerAsync<I>,
    port: u16,
) -> Result<(String, u16), String> {
    let host = container.get_host().await.map_err(|e| e.to_string())?;
    let port = container
        .get_host_port_ipv4(port)
        .await
        .map_err(|e| e.to_string())?;
    Ok((host.to_string(), port))
}

/// Removes the container once `owner` has exited: a detached shell in its own process group
/// (so a Ctrl-C to the test run does not stop it before it has cleaned up).
fn spawn_reaper(owner: u32, container_id: &str, lock_path: &Path, marker: &Path) {
    use std::os::unix::process::CommandExt;
    let script = r#"while kill -0 "$0" 2>/dev/null; do sleep 1; done
docker rm -f -v "$1" >/dev/null 2>&1
rm -f "$2" "$3""#;
    let spawned = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg(owner.to_string())
        .arg(container_id)
        .arg(lock_path)
        .arg(marker)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn();
    if let Err(e) = spawned {
        eprintln!(
            "test-support: cannot start the reaper of container {container_id} ({e}); \
             remove it with `docker rm -f {container_id}`"
        );
    }
}

/// A fresh database of [`postgres_url`]'s server, migrated by a crate's migrator and never
/// analysed; [`MigratedDatabase::drop`] removes it.
pub struct MigratedDatabase {
    /// A connection to it.
    pub db: sea_orm::DatabaseConnection,
    name: String,
    admin: sea_orm::DatabaseConnection,
}

impl MigratedDatabase {
    /// Creates the database and runs `M`'s migrations on it.
    ///
    /// # Panics
    /// When the server cannot be reached or a step fails (this is for tests).
    #[allow(clippy::expect_used)] // a failed step fails the test
    pub async fn new<M: sea_orm_migration::MigratorTrait>() -> Self {
        use sea_orm::{ConnectionTrait, Database};

        let admin_url = postgres_url();
        let name = format!(
            "test_db_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let admin = Database::connect(admin_url.as_str())
            .await
            .expect("PostgreSQL");
        admin
            .execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
            .await
            .expect("create database");
        let (base, _) = admin_url.rsplit_once('/').expect("a database in the URL");
        let db = Database::connect(format!("{base}/{name}"))
            .await
            .expect("test database");
        M::up(&db, None).await.expect("migrations");
        Self { db, name, admin }
    }

    /// Closes the connection and drops the database.
    ///
    /// # Panics
    /// When a step fails (this is for tests).
    #[allow(clippy::expect_used)] // a failed step fails the test
    pub async fn drop(self) {
        use sea_orm::ConnectionTrait;

        self.db.close().await.expect("close");
        self.admin
            .execute_unprepared(&format!("DROP DATABASE \"{}\" WITH (FORCE)", self.name))
            .await
            .expect("drop database");
    }
}

/// The generic plan PostgreSQL makes for `statement` (what a prepared statement ends up with, and
/// keeps while its tables grow) on a fresh database of [`postgres_url`]'s server, migrated by `M`
/// and never analysed: `PREPARE` with the parameter types `params`, then `EXPLAIN EXECUTE` with
/// the literal arguments `args`. The database is dropped afterwards.
///
/// # Panics
/// When the server cannot be reached or a step fails (this is for tests).
#[allow(clippy::expect_used)] // a failed step fails the test
pub async fn generic_plan<M: sea_orm_migration::MigratorTrait>(
    params: &str,
    statement: &str,
    args: &str,
) -> String {
    use sea_orm::{ConnectionTrait, DbBackend, Statement, TransactionTrait};

    let fresh = MigratedDatabase::new::<M>().await;
    let txn = fresh.db.begin().await.expect("transaction");
    txn.execute_unprepared("SET LOCAL plan_cache_mode = force_generic_plan")
        .await
        .expect("set");
    txn.execute_unprepared(&format!("PREPARE under_test({params}) AS {statement}"))
        .await
        .expect("prepare");
    let plan: Vec<String> = txn
        .query_all(Statement::from_string(
            DbBackend::Postgres,
            format!("EXPLAIN EXECUTE under_test({args})"),
        ))
        .await
        .expect("explain")
        .iter()
        .filter_map(|row| row.try_get_by_index::<String>(0).ok())
        .collect();
    txn.rollback().await.expect("rollback");
    fresh.drop().await;
    plan.join("\n")
}

#[cfg(test)]
#[allow(clippy::expect_used)] // a failed test step should panic
mod tests {
    use super::*;

    #[test]
    fn without_a_url_or_an_engine_the_failure_names_both_options() {
        // An empty variable counts as unset; the engine's socket leads nowhere.
        std::env::set_var("DATABASE_URL", "");
        std::env::set_var("DOCKER_HOST", "unix:///nonexistent/docker.sock");
        let failure = std::panic::catch_unwind(postgres_url).expect_err("no server to be found");
        let message = failure
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_default();
        for expected in [
            "DATABASE_URL is not set",
            "DATABASE_URL=postgres://",
            "start a Docker engine",
            "TEST_POSTGRES_IMAGE",
        ] {
            assert!(
                message.contains(expected),
                "{expected:?} missing from: {message}"
            );
        }
    }

    #[test]
    fn image_names_split_at_the_tag_not_at_a_registry_port() {
        assert_eq!(
            split_image("postgres:15-alpine"),
            ("postgres".to_owned(), "15-alpine".to_owned())
        );
        assert_eq!(
            split_image("mirror.local:5000/library/rabbitmq:3.13-management"),
            (
                "mirror.local:5000/library/rabbitmq".to_owned(),
                "3.13-management".to_owned()
            )
        );
        assert_eq!(
            split_image("mirror.local:5000/postgres"),
            ("mirror.local:5000/postgres".to_owned(), "latest".to_owned())
        );
    }
}
