//! Database connection, migrations behind a lock, and classification of database errors.
//!
//! The same code runs on PostgreSQL (production) and SQLite (embedded `make run`).

use std::time::Duration;

use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbErr, RuntimeErr};
use sea_orm_migration::MigratorTrait;
use secrecy::ExposeSecret;

use crate::settings::DatabaseSettings;

/// Opens the pool. SQLite gets one connection: SQLite has a single writer anyway, and a lone
/// connection rules out `SQLITE_BUSY` on lock upgrades under concurrent requests. Its file's
/// folder is created and the file is put in WAL mode.
pub async fn connect(settings: &DatabaseSettings) -> Result<DatabaseConnection, DbErr> {
    let url = settings.url.expose_secret();
    if url.is_empty() {
        return Err(DbErr::Custom(
            "database url is empty: set APP_DATABASE__URL".into(),
        ));
    }
    let mut options = ConnectOptions::new(url.to_owned());
    options
        .connect_timeout(Duration::from_secs(settings.connect_timeout_secs))
        .acquire_timeout(Duration::from_secs(settings.connect_timeout_secs.max(5)))
        // No ping before every query: the pool already pings each connection when it comes back
        // (and drops a broken one), so a ping on the way out too only doubled the round trips of
        // every single-statement query. A connection that broke while idle (a database restart)
        // fails the one query that meets it, which callers retry like any transient error.
        .test_before_acquire(false)
        .sqlx_logging(false);
    if settings.is_sqlite() {
        if let Some(dir) = sqlite_dir(url) {
            std::fs::create_dir_all(&dir)
                .map_err(|e| DbErr::Custom(format!("cannot create {}: {e}", dir.display())))?;
        }
        options.max_connections(1).min_connections(1);
    } else {
        options.max_connections(settings.max_connections.max(1));
    }
    let db = Database::connect(options).await?;
    if settings.is_sqlite() {
        db.execute_unprepared("PRAGMA journal_mode=WAL").await?;
        db.execute_unprepared("PRAGMA busy_timeout=5000").await?;
    }
    Ok(db)
}

fn sqlite_dir(url: &str) -> Option<std::path::PathBuf> {
    let path = url
        .trim_start_matches("sqlite://")
        .trim_start_matches("sqlite:");
    let path = path.split('?').next()?;
    if path.is_empty() || path == ":memory:" {
        return None;
    }
    std::path::Path::new(path)
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(|p| p.to_path_buf())
}

/// Applies pending migrations. On PostgreSQL, replicas starting together serialise on an advisory
/// lock held by a dedicated one-connection pool (so lock, migrations and unlock share a session).
pub async fn migrate<M: MigratorTrait>(
    settings: &DatabaseSettings,
    db: &DatabaseConnection,
    lock_name: &str,
) -> Result<(), DbErr> {
    if settings.is_sqlite() {
        return M::up(db, None).await;
    }
    let mut options = ConnectOptions::new(settings.url.expose_secret().to_owned());
    options
        .max_connections(1)
        .min_connections(1)
        .connect_timeout(Duration::from_secs(settings.connect_timeout_secs))
        .sqlx_logging(false);
    let conn = Database::connect(options).await?;
    let key = lock_key(lock_name);
    conn.execute_unprepared(&format!("SELECT pg_advisory_lock({key})"))
        .await?;
    let result = M::up(&conn, None).await;
    let unlock = conn
        .execute_unprepared(&format!("SELECT pg_advisory_unlock({key})"))
        .await;
    let _ = conn.close().await;
    result?;
    unlock.map(|_| ())
}

/// A stable 63-bit key for `pg_advisory_lock` (FNV-1a; `DefaultHasher` is not stable across builds).
fn lock_key(name: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h >> 1) as i64
}

/// What a database error means for the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DbErrorKind {
    /// A unique or primary key constraint: the row already exists.
    UniqueViolation,
    /// An exclusion constraint (PostgreSQL `23P01`) or a trigger that raised `conflict: ...`
    /// (SQLite): the write would break an invariant such as overlapping reservations.
    ConstraintConflict,
    /// Connection trouble, pool exhaustion, lock timeouts, serialization failures: try again.
    Unavailable,
    Other,
}

pub fn classify(err: &DbErr) -> DbErrorKind {
    if let Some(sea_orm::SqlErr::UniqueConstraintViolation(_)) = err.sql_err() {
        return DbErrorKind::UniqueViolation;
    }
    match err {
        DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => DbErrorKind::Unavailable,
        DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e)) => {
            classify_sqlx(e)
        }
        _ => DbErrorKind::Other,
    }
}

fn classify_sqlx(e: &sea_orm::sqlx::Error) -> DbErrorKind {
    use sea_orm::sqlx::Error;
    match e {
        Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            match code.as_str() {
                // exclusion_violation
                "23P01" => DbErrorKind::ConstraintConflict,
                // serialization_failure, deadlock_detected, lock_not_available, too_many_connections
                "40001" | "40P01" | "55P03" | "53300" => DbErrorKind::Unavailable,
                // SQLITE_BUSY, SQLITE_LOCKED
                "5" | "6" | "517" | "261" => DbErrorKind::Unavailable,
                _ if db.message().starts_with("conflict:") => DbErrorKind::ConstraintConflict,
                _ => DbErrorKind::Other,
            }
        }
        Error::Io(_) | Error::PoolTimedOut | Error::PoolClosed | Error::WorkerCrashed => {
            DbErrorKind::Unavailable
        }
        _ => DbErrorKind::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_folder_is_derived_from_url() {
        assert_eq!(
            sqlite_dir("sqlite://data/account.db?mode=rwc"),
            Some(std::path::PathBuf::from("data"))
        );
        assert_eq!(sqlite_dir("sqlite::memory:"), None);
        assert_eq!(sqlite_dir("sqlite://x.db"), None);
    }

    #[test]
    fn lock_keys_are_stable_and_positive() {
        assert_eq!(lock_key("account"), lock_key("account"));
        assert_ne!(lock_key("account"), lock_key("drone"));
        assert!(lock_key("drone") >= 0);
    }
}
