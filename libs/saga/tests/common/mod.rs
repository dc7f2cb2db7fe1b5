//! Fresh stores for the tests: in memory, SQLite in a temp dir, or a new PostgreSQL database on
//! `DATABASE_URL` (a random name, dropped afterwards), migrated with `saga::migrations()`.

#![allow(dead_code)] // each test crate uses part of it

use std::sync::Arc;

use saga::{MemoryStore, SagaRecord, SqlStore, Store};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection};
use sea_orm_migration::{MigrationTrait, MigratorTrait};

/// Expands each test for the three backends: `memory::name`, `sqlite::name`, `postgres::name`,
/// each calling `super::run(backend, super::name)` of the test crate.
macro_rules! per_backend {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $( #[tokio::test] async fn $name() { super::run(super::Backend::Memory, super::$name).await } )*
        }
        mod sqlite {
            $( #[tokio::test] async fn $name() { super::run(super::Backend::Sqlite, super::$name).await } )*
        }
        mod postgres {
            $( #[tokio::test] async fn $name() { super::run(super::Backend::Postgres, super::$name).await } )*
        }
    };
}

pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        saga::migrations()
    }
}

/// A fresh database: SQLite in a temp dir, or a new PostgreSQL database on `DATABASE_URL`.
pub struct Db {
    pub conn: DatabaseConnection,
    _dir: Option<tempfile::TempDir>,
    /// (server url, database name) of a PostgreSQL database to drop afterwards.
    drop: Option<(String, String)>,
}

impl Drop for Db {
    fn drop(&mut self) {
        if let Some((url, name)) = self.drop.take() {
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    if let Ok(admin) = Database::connect(url.as_str()).await {
                        let _ = admin
                            .execute_unprepared(&format!(
                                "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                            ))
                            .await;
                    }
                });
            })
            .join();
        }
    }
}

pub async fn db(postgres: bool) -> Db {
    let mut drop = None;
    let (conn, dir) = if postgres {
        let url = test_support::postgres_url();
        let admin = Database::connect(url.as_str()).await.unwrap();
        let name = format!(
            "test_saga_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        admin
            .execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
            .await
            .unwrap();
        let base = url.rsplit_once('/').map_or(url.as_str(), |(b, _)| b);
        let conn = Database::connect(format!("{base}/{name}")).await.unwrap();
        drop = Some((url.clone(), name));
        (conn, None)
    } else {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/saga.db?mode=rwc", dir.path().display());
        let mut opts = sea_orm::ConnectOptions::new(url);
        opts.max_connections(1);
        (Database::connect(opts).await.unwrap(), Some(dir))
    };
    Migrator::up(&conn, None).await.unwrap();
    Db {
        conn,
        _dir: dir,
        drop,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Memory,
    Sqlite,
    Postgres,
}

/// A store on a fresh backend. Fields drop in order: the store before its database.
pub struct Fixture {
    pub store: Arc<dyn Store>,
    memory: Option<MemoryStore>,
    pub db: Option<Db>,
}

impl Fixture {
    pub async fn new(backend: Backend) -> Self {
        match backend {
            Backend::Memory => {
                let m = MemoryStore::new();
                Self {
                    store: Arc::new(m.clone()),
                    memory: Some(m),
                    db: None,
                }
            }
            Backend::Sqlite | Backend::Postgres => {
                let db = db(backend == Backend::Postgres).await;
                Self {
                    store: Arc::new(SqlStore::start(db.conn.clone())),
                    memory: None,
                    db: Some(db),
                }
            }
        }
    }

    /// Another store on the same data, as a restarted process opens it.
    pub fn reopen(&self) -> Arc<dyn Store> {
        match (&self.memory, &self.db) {
            (Some(m), _) => Arc::new(m.clone()),
            (None, Some(db)) => Arc::new(SqlStore::start(db.conn.clone())),
            (None, None) => unreachable!("a fixture has a memory store or a database"),
        }
    }
}

/// The saga `id`, which must exist.
pub async fn load(s: &Arc<dyn Store>, id: &str) -> SagaRecord {
    s.load(id)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("saga {id}"))
}
