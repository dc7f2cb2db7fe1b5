//! The SQLite file behind the embedded backend: one connection, the schema, and the process-wide
//! hub that lets every broker opened on the same file in this process wake each other's readers
//! and consumers at once (other processes are still seen, through the readers' fallback poll).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, DbErr, QueryResult,
    Statement, Value,
};
use secrecy::ExposeSecret;
use tokio::sync::Notify;

use crate::error::{MessagingError, Result};
use crate::settings::MessagingSettings;

/// How often readers and consumers look for rows written by another process, whose appends do
/// not signal this process's [`Notify`]s.
pub(super) const FALLBACK_POLL: Duration = Duration::from_millis(100);

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS messaging_logs (
        name TEXT PRIMARY KEY,
        partitions INTEGER NOT NULL,
        created_at TEXT NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS messaging_log_batches (
        log TEXT NOT NULL,
        \"partition\" INTEGER NOT NULL,
        \"offset\" INTEGER NOT NULL,
        payload BLOB NOT NULL,
        appended_at TEXT NOT NULL,
        PRIMARY KEY (log, \"partition\", \"offset\")
    )",
    // `owner` is the store instance (one per open) and `consumer` the consumer inside it that
    // holds an in-flight message: together they tell which claims died with their process.
    "CREATE TABLE IF NOT EXISTS messaging_queue_messages (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        queue TEXT NOT NULL,
        message_id TEXT NOT NULL,
        payload BLOB NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('ready', 'inflight', 'parked')),
        delivery_count INTEGER NOT NULL DEFAULT 0,
        reason TEXT,
        owner TEXT,
        consumer TEXT,
        enqueued_at TEXT NOT NULL,
        parked_at TEXT
    )",
    "CREATE INDEX IF NOT EXISTS messaging_queue_messages_by_state
        ON messaging_queue_messages (queue, state, seq)",
    "CREATE INDEX IF NOT EXISTS messaging_queue_messages_by_id
        ON messaging_queue_messages (queue, message_id)",
];

/// Process-wide state shared by every store opened in this process.
#[derive(Default)]
struct Hub {
    /// Store instances alive in this process: their in-flight claims must not be requeued when
    /// another broker opens the same file.
    live: Mutex<HashSet<String>>,
    /// One wake-up signal per (file, log partition) and (file, queue).
    signals: Mutex<HashMap<String, Arc<Notify>>>,
}

static HUB: LazyLock<Hub> = LazyLock::new(Hub::default);

/// One open SQLite file. Kept alive by everything handed out from it (logs, readers, consumers,
/// unanswered messages), so a dropped broker does not pull the file from under them.
pub(super) struct Store {
    db: DatabaseConnection,
    /// Distinguishes this open from earlier ones (and from other brokers on the same file).
    pub(super) instance: String,
    /// The url, naming the file in signal keys.
    url: String,
    pub(super) settings: MessagingSettings,
}

impl Store {
    pub(super) async fn open(settings: &MessagingSettings) -> Result<Arc<Self>> {
        let url = settings.url.expose_secret().to_owned();
        if !url.starts_with("sqlite:") {
            return Err(MessagingError::Config(
                "the embedded broker needs a sqlite: url".into(),
            ));
        }
        if let Some(dir) = sqlite_dir(&url) {
            std::fs::create_dir_all(&dir).map_err(|e| {
                MessagingError::Storage(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        // One connection: SQLite has a single writer anyway, and a lone connection rules out
        // SQLITE_BUSY on lock upgrades between our own statements.
        let mut options = ConnectOptions::new(url.clone());
        options
            .max_connections(1)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .sqlx_logging(false);
        let db = Database::connect(options).await.map_err(storage)?;
        for pragma in ["PRAGMA journal_mode=WAL", "PRAGMA busy_timeout=5000"] {
            db.execute_unprepared(pragma).await.map_err(storage)?;
        }
        for ddl in SCHEMA {
            db.execute_unprepared(ddl).await.map_err(storage)?;
        }
        let store = Arc::new(Self {
            db,
            instance: uuid::Uuid::new_v4().simple().to_string(),
            url,
            settings: settings.clone(),
        });
        let live: Vec<String> = {
            let mut live = HUB.live.lock().unwrap_or_else(|e| e.into_inner());
            live.insert(store.instance.clone());
            live.iter().cloned().collect()
        };
        store.requeue_orphans(&live).await?;
        Ok(store)
    }

    /// Messages in flight when their process stopped go back to their queue (their delivery
    /// count already counts that delivery). Claims of brokers still open in this process stay.
    async fn requeue_orphans(&self, live: &[String]) -> Result<()> {
        let marks = vec!["?"; live.len()].join(", ");
        let sql = format!(
            "UPDATE messaging_queue_messages SET state = 'ready', owner = NULL, consumer = NULL
             WHERE state = 'inflight' AND (owner IS NULL OR owner NOT IN ({marks}))"
        );
        let values = live.iter().map(|s| Value::from(s.clone()));
        let done = self.execute(&sql, values).await?;
        if done > 0 {
            tracing::info!(
                messages = done,
                "requeued messages left in flight by a stopped process"
            );
        }
        // Parked messages a stopped process had taken but not stored stay parked, for the next.
        let sql = format!(
            "UPDATE messaging_queue_messages SET owner = NULL, consumer = NULL
             WHERE state = 'parked' AND consumer IS NOT NULL
               AND (owner IS NULL OR owner NOT IN ({marks}))"
        );
        let values = live.iter().map(|s| Value::from(s.clone()));
        self.execute(&sql, values).await?;
        Ok(())
    }

    /// Runs a statement; returns the number of rows it changed.
    pub(super) async fn execute(
        &self,
        sql: &str,
        values: impl IntoIterator<Item = Value>,
    ) -> Result<u64> {
        let stmt = Statement::from_sql_and_values(DbBackend::Sqlite, sql, values);
        Ok(self
            .db
            .execute(stmt)
            .await
            .map_err(storage)?
            .rows_affected())
    }

    pub(super) async fn query(
        &self,
        sql: &str,
        values: impl IntoIterator<Item = Value>,
    ) -> Result<Vec<QueryResult>> {
        let stmt = Statement::from_sql_and_values(DbBackend::Sqlite, sql, values);
        self.db.query_all(stmt).await.map_err(storage)
    }

    /// The wake-up signal of `channel` in this file, shared by all brokers of this process.
    pub(super) fn signal(&self, channel: &str) -> Arc<Notify> {
        let key = format!("{}\u{0}{channel}", self.url);
        let mut signals = HUB.signals.lock().unwrap_or_else(|e| e.into_inner());
        signals.entry(key).or_default().clone()
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let mut live = HUB.live.lock().unwrap_or_else(|e| e.into_inner());
        live.remove(&self.instance);
    }
}

pub(super) fn storage(e: DbErr) -> MessagingError {
    MessagingError::Storage(e.to_string())
}

/// A column of a row, as a storage error when it is missing or of the wrong type.
pub(super) fn column<T: sea_orm::TryGetable>(row: &QueryResult, name: &str) -> Result<T> {
    row.try_get("", name).map_err(storage)
}

/// Timestamps are stored as fixed-width RFC 3339 text so they sort as text and read well.
pub(super) fn timestamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

pub(super) fn parse_timestamp(text: &str) -> Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| MessagingError::Storage(format!("bad timestamp {text:?}: {e}")))
}

/// The folder of the database file, if the url names one.
fn sqlite_dir(url: &str) -> Option<PathBuf> {
    let path = url
        .trim_start_matches("sqlite://")
        .trim_start_matches("sqlite:");
    let path = path.split('?').next()?;
    if path.is_empty() || path.starts_with(":memory:") {
        return None;
    }
    std::path::Path::new(path)
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(|p| p.to_path_buf())
}
