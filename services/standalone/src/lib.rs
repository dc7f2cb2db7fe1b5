//! `make run`: every service in one process on embedded defaults (SQLite under `./data`, the
//! embedded message broker in `data/messaging.db`), each on its own port, talking over HTTP on
//! 127.0.0.1 exactly as in production.
//!
//! The first start generates the service token and the JWT key and keeps them in
//! `data/credentials.env`; later starts reuse them, so data and tokens survive restarts.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;
use service_kit::{AuthSettings, DatabaseSettings, HttpSettings, Service};
use tokio::sync::watch;

/// Standalone settings (`APP_DATA_DIR`, `APP_HOST`, `APP_PORTS__DRONE`, ...).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub data_dir: PathBuf,
    pub host: String,
    pub ports: Ports,
    /// Drones per size class (small, medium, large).
    pub fleet: drone::FleetSettings,
    /// The fleet simulator flies scheduled deliveries when their pickup time comes (on here;
    /// `APP_SIMULATOR__ENABLED=false` turns it off, `APP_SIMULATOR__LEG_SECS` sets its pace).
    pub simulator: drone::SimulatorSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("data"),
            host: "127.0.0.1".into(),
            ports: Ports::default(),
            fleet: drone::FleetSettings::default(),
            simulator: drone::SimulatorSettings {
                enabled: true,
                ..Default::default()
            },
        }
    }
}

/// Ports of the services (DESIGN §3).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Ports {
    pub ingestion: u16,
    pub account: u16,
    pub package: u16,
    pub drone: u16,
    pub delivery: u16,
    pub scheduler: u16,
    pub supervisor: u16,
    pub thirdparty: u16,
}

impl Default for Ports {
    fn default() -> Self {
        Self {
            ingestion: 8080,
            account: 8081,
            package: 8082,
            drone: 8083,
            delivery: 8084,
            scheduler: 8085,
            supervisor: 8086,
            thirdparty: 8087,
        }
    }
}

/// The demo account that may book.
pub const DEMO_ACCOUNT: &str = "demo-account";

/// Where each service listens once started.
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub ingestion: u16,
    pub scheduler: u16,
    pub account: u16,
    pub package: u16,
    pub drone: u16,
    pub delivery: u16,
    pub supervisor: u16,
    pub thirdparty: u16,
}

/// Dashboard logins written to `credentials.env`.
pub const OPERATOR_USER: &str = "operator";
pub const VIEWER_USER: &str = "viewer";

/// Starts every service, writes `credentials.env`, and serves until `shutdown` resolves.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    run_with(settings, shutdown, |_| {}).await
}

/// Like [`run`], calling `started` with the bound ports once everything is up (tests use port 0).
pub async fn run_with(
    settings: Settings,
    shutdown: impl Future<Output = ()>,
    started: impl FnOnce(&Endpoints),
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&settings.data_dir)
        .with_context(|| format!("creating {}", settings.data_dir.display()))?;
    let credentials_path = settings.data_dir.join("credentials.env");
    let mut creds = read_env_file(&credentials_path);
    let service_token = creds
        .entry("SERVICE_TOKEN".into())
        .or_insert_with(|| random_hex(24))
        .clone();
    let jwt_secret = creds
        .entry("JWT_SECRET".into())
        .or_insert_with(|| random_hex(32))
        .clone();
    let auth = AuthSettings::new(service_token.clone(), jwt_secret);
    creds.insert("OPERATOR_USER".into(), OPERATOR_USER.into());
    creds.insert("VIEWER_USER".into(), VIEWER_USER.into());
    let operator_password = creds
        .entry("OPERATOR_PASSWORD".into())
        .or_insert_with(|| random_hex(12))
        .clone();
    let viewer_password = creds
        .entry("VIEWER_PASSWORD".into())
        .or_insert_with(|| random_hex(12))
        .clone();
    let http = |port| HttpSettings {
        host: settings.host.clone(),
        port,
        workers: 2,
        ..HttpSettings::default()
    };
    let db = |name: &str| {
        DatabaseSettings::new(format!(
            "sqlite://{}?mode=rwc",
            settings.data_dir.join(format!("{name}.db")).display()
        ))
    };

    // One embedded broker file for every service (several brokers on one file are fine within
    // a process), so the Scheduler reads the account changes Account publishes.
    let mut messaging = messaging::MessagingSettings::new(format!(
        "sqlite://{}?mode=rwc",
        settings.data_dir.join("messaging.db").display()
    ));
    messaging.connection_name = "standalone".into();
    let account = account::Application::build(account::Settings {
        http: http(settings.ports.account),
        database: db("account"),
        auth: auth.clone(),
        messaging: messaging.clone(),
        ..Default::default()
    })
    .await
    .context("starting account")?;
    let package = package::Application::build(package::Settings {
        http: http(settings.ports.package),
        database: db("package"),
        auth: auth.clone(),
    })
    .await
    .context("starting package")?;
    let thirdparty = thirdparty::Application::build(thirdparty::Settings {
        http: http(settings.ports.thirdparty),
        database: db("thirdparty"),
        auth: auth.clone(),
        ..Default::default()
    })
    .await
    .context("starting thirdparty")?;
    let delivery = delivery::Application::build(delivery::Settings {
        http: http(settings.ports.delivery),
        database: db("delivery"),
        auth: auth.clone(),
        messaging: messaging.clone(),
        ..Default::default()
    })
    .await
    .context("starting delivery")?;
    let drone = drone::Application::build(drone::Settings {
        http: http(settings.ports.drone),
        database: db("drone"),
        auth: auth.clone(),
        fleet: settings.fleet.clone(),
        downstream: downstream::DownstreamSettings {
            delivery_url: format!("http://{}:{}", settings.host, delivery.port()),
            ..Default::default()
        },
        simulator: settings.simulator.clone(),
        ..Default::default()
    })
    .await
    .context("starting drone")?;
    let ingestion = ingestion::Application::build(ingestion::Settings {
        http: http(settings.ports.ingestion),
        database: db("ingestion"),
        auth: auth.clone(),
        messaging: messaging.clone(),
        ingestion: ingestion::IngestionSettings {
            // Webhook receivers on this machine (http://127.0.0.1:...) are what local runs use.
            webhooks: ingestion::WebhookSettings::local(),
            ..Default::default()
        },
    })
    .await
    .context("starting ingestion")?;
    let local = |port: u16| format!("http://{}:{port}", settings.host);
    let scheduler = scheduler::Application::build(scheduler::Settings {
        http: http(settings.ports.scheduler),
        database: db("scheduler"),
        auth: auth.clone(),
        messaging: messaging.clone(),
        downstream: downstream::DownstreamSettings {
            account_url: local(account.port()),
            package_url: local(package.port()),
            drone_url: local(drone.port()),
            delivery_url: local(delivery.port()),
            thirdparty_url: local(thirdparty.port()),
            ..Default::default()
        },
        scheduler: scheduler::SchedulerSettings {
            instance_id: Some("standalone".into()),
            ordinal: Some(0),
            replicas: 1,
            ..Default::default()
        },
    })
    .await
    .context("starting scheduler")?;
    let user = |role: &str, password: &str| supervisor::UserSettings {
        role: role.to_owned(),
        password: Some(secrecy::SecretString::from(password.to_owned())),
        password_hash: None,
    };
    let supervisor = supervisor::Application::build(supervisor::Settings {
        http: http(settings.ports.supervisor),
        database: db("supervisor"),
        auth: auth.clone(),
        messaging,
        downstream: downstream::DownstreamSettings {
            account_url: local(account.port()),
            package_url: local(package.port()),
            drone_url: local(drone.port()),
            delivery_url: local(delivery.port()),
            thirdparty_url: local(thirdparty.port()),
            ..Default::default()
        },
        scheduler: supervisor::SchedulerLink {
            url: local(scheduler.port()),
            ..Default::default()
        },
        users: [
            (
                OPERATOR_USER.to_owned(),
                user("operator", &operator_password),
            ),
            (VIEWER_USER.to_owned(), user("viewer", &viewer_password)),
        ]
        .into(),
        ..Default::default()
    })
    .await
    .context("starting supervisor")?;
    let endpoints = Endpoints {
        supervisor: supervisor.port(),
        ingestion: ingestion.port(),
        scheduler: scheduler.port(),
        account: account.port(),
        package: package.port(),
        drone: drone.port(),
        delivery: delivery.port(),
        thirdparty: thirdparty.port(),
    };

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let servers = tokio::spawn({
        let rx = stop_rx.clone();
        async move {
            tokio::try_join!(
                ingestion.run_until(stopped(rx.clone())),
                scheduler.run_until(stopped(rx.clone())),
                supervisor.run_until(stopped(rx.clone())),
                account.run_until(stopped(rx.clone())),
                package.run_until(stopped(rx.clone())),
                drone.run_until(stopped(rx.clone())),
                thirdparty.run_until(stopped(rx.clone())),
                delivery.run_until(stopped(rx)),
            )
        }
    });

    // A demo account and a client token for it, minted through the real Account API.
    let base = format!("http://{}:{}", settings.host, endpoints.account);
    let client_token = demo_client_token(&base, &service_token)
        .await
        .context("creating the demo account")?;
    creds.insert("CLIENT_ACCOUNT_ID".into(), DEMO_ACCOUNT.into());
    creds.insert("CLIENT_TOKEN".into(), client_token);
    write_env_file(&credentials_path, &creds)?;
    print_banner(&settings, &endpoints, &creds, &credentials_path);
    started(&endpoints);

    let mut servers = servers;
    tokio::select! {
        () = shutdown => {
            tracing::info!("shutting down every service");
            let _ = stop_tx.send(true);
            servers.await??;
        }
        result = &mut servers => {
            result??;
            anyhow::bail!("a service stopped unexpectedly");
        }
    }
    Ok(())
}

async fn demo_client_token(account_base: &str, service_token: &str) -> anyhow::Result<String> {
    let client = reqwest::Client::new();
    let put = client
        .put(format!("{account_base}/api/accounts/{DEMO_ACCOUNT}"))
        .bearer_auth(service_token)
        .json(&serde_json::json!({"name": "Demo account", "status": "active"}))
        .send()
        .await?;
    anyhow::ensure!(
        put.status().is_success(),
        "PUT demo account answered {}",
        put.status()
    );
    let minted = client
        .post(format!("{account_base}/api/accounts/{DEMO_ACCOUNT}/tokens"))
        .bearer_auth(service_token)
        .json(&serde_json::json!({"ttlSeconds": 30 * 24 * 3600}))
        .send()
        .await?;
    anyhow::ensure!(
        minted.status().is_success(),
        "minting the demo token answered {}",
        minted.status()
    );
    Ok(minted.json::<contracts::TokenResponse>().await?.token)
}

fn print_banner(settings: &Settings, e: &Endpoints, creds: &BTreeMap<String, String>, path: &Path) {
    let h = &settings.host;
    let get = |k: &str| creds.get(k).map(String::as_str).unwrap_or("");
    println!();
    println!(
        "drone delivery suite is running (data in {})",
        settings.data_dir.display()
    );
    println!(
        "  ingestion http://{h}:{}   (API page: /docs; book with CLIENT_TOKEN)",
        e.ingestion
    );
    println!("  account   http://{h}:{}", e.account);
    println!("  package   http://{h}:{}", e.package);
    println!("  drone     http://{h}:{}", e.drone);
    println!("  delivery  http://{h}:{}", e.delivery);
    println!(
        "  thirdparty http://{h}:{}   (carrier legs; GET /api/carriers)",
        e.thirdparty
    );
    println!(
        "  scheduler http://{h}:{}   (GET /api/workflows/{{deliveryId}})",
        e.scheduler
    );
    println!(
        "  supervisor http://{h}:{}/dashboard   (sign in as OPERATOR_USER or VIEWER_USER)",
        e.supervisor
    );
    println!();
    println!("  SERVICE_TOKEN={}", get("SERVICE_TOKEN"));
    println!("  CLIENT_ACCOUNT_ID={}", get("CLIENT_ACCOUNT_ID"));
    println!("  CLIENT_TOKEN={}", get("CLIENT_TOKEN"));
    println!(
        "  OPERATOR_USER={} OPERATOR_PASSWORD={}",
        get("OPERATOR_USER"),
        get("OPERATOR_PASSWORD")
    );
    println!(
        "  VIEWER_USER={} VIEWER_PASSWORD={}",
        get("VIEWER_USER"),
        get("VIEWER_PASSWORD")
    );
    println!();
    println!(
        "  these are saved in {} (source it in a shell)",
        path.display()
    );
    println!("  Ctrl-C stops everything; the next start continues with the same data");
    println!();
}

fn random_hex(bytes: usize) -> String {
    use rand::RngCore;
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

/// Reads `KEY=value` lines; a missing or unreadable file is empty.
fn read_env_file(path: &Path) -> BTreeMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().trim_matches('\'').to_owned()))
        .filter(|(k, v)| !k.is_empty() && !v.is_empty())
        .collect()
}

fn write_env_file(path: &Path, values: &BTreeMap<String, String>) -> anyhow::Result<()> {
    let mut text = String::from(
        "# written by `make run`: credentials of the local suite (shell KEY=value lines)\n",
    );
    for (k, v) in values {
        text.push_str(&format!("{k}='{v}'\n"));
    }
    let tmp = path.with_extension("env.tmp");
    write_private(&tmp, text.as_bytes()).with_context(|| format!("writing {}", tmp.display()))?;
    // The rename replaces any older file (and its looser mode) with the private one.
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Writes a new file that only its owner may read: created with mode 0600 (the umask can only
/// narrow it), never created wider and narrowed after, so the secrets are never readable by
/// others, not even for a moment. A leftover of an interrupted write is removed first, because
/// opening an existing file would keep its mode.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;

    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_file_round_trips() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("c.env");
        let mut m = BTreeMap::new();
        m.insert("SERVICE_TOKEN".to_owned(), "abc".to_owned());
        m.insert("CLIENT_TOKEN".to_owned(), "x.y.z".to_owned());
        write_env_file(&path, &m).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read_env_file(&path), m);
        assert!(read_env_file(&dir.path().join("missing")).is_empty());
    }

    /// The file holds the service token, the JWT key and the dashboard passwords: only its
    /// owner may read it, whatever the umask, also when it replaces a file (or a leftover
    /// temporary file) that others could read.
    #[cfg(unix)]
    #[test]
    fn credentials_file_is_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;

        let mode = |p: &Path| {
            let mode = std::fs::metadata(p)
                .unwrap_or_else(|e| panic!("{e}"))
                .permissions()
                .mode();
            format!("{:o}", mode & 0o777)
        };
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("credentials.env");
        let mut m = BTreeMap::new();
        m.insert("SERVICE_TOKEN".to_owned(), "abc".to_owned());
        write_env_file(&path, &m).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(mode(&path), "600", "a new credentials file");

        // An older, world-readable file and a world-readable leftover of an interrupted write.
        let loose = std::fs::Permissions::from_mode(0o644);
        std::fs::set_permissions(&path, loose.clone()).unwrap_or_else(|e| panic!("{e}"));
        let tmp = path.with_extension("env.tmp");
        std::fs::write(&tmp, "stale").unwrap_or_else(|e| panic!("{e}"));
        std::fs::set_permissions(&tmp, loose).unwrap_or_else(|e| panic!("{e}"));
        m.insert("CLIENT_TOKEN".to_owned(), "x.y.z".to_owned());
        write_env_file(&path, &m).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(mode(&path), "600", "a rewritten credentials file");
        assert_eq!(read_env_file(&path), m);
        assert!(!tmp.exists(), "no temporary file left behind");
    }
}
