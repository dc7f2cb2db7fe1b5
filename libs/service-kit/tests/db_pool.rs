//! The PostgreSQL pool of `service_kit::db::connect` (`DATABASE_URL`, required): it does not ping
//! a connection before every query, so a connection that broke while idle fails the one query
//! that meets it; the pool drops it and the next query runs on a new one.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step should panic

use sea_orm::{ConnectionTrait, Database, DbBackend, Statement};
use service_kit::DatabaseSettings;

#[tokio::test]
async fn a_connection_broken_while_idle_fails_one_query_and_is_replaced() {
    let url = test_support::postgres_url();
    let mut settings = DatabaseSettings::new(url.clone());
    settings.max_connections = 1;
    let db = service_kit::db::connect(&settings).await.unwrap();
    let pid_of = |row: sea_orm::QueryResult| row.try_get::<i32>("", "pid").unwrap();
    let pid = db
        .query_one(Statement::from_string(
            DbBackend::Postgres,
            "SELECT pg_backend_pid() AS pid",
        ))
        .await
        .unwrap()
        .map(pid_of)
        .unwrap();

    // The server ends that session while the pool holds it idle (a restart, a failover).
    let admin = Database::connect(url).await.unwrap();
    admin
        .execute(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT pg_terminate_backend($1)",
            [pid.into()],
        ))
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;

    let select = || {
        db.query_one(Statement::from_string(
            DbBackend::Postgres,
            "SELECT pg_backend_pid() AS pid",
        ))
    };
    let first = select().await;
    let second = select()
        .await
        .expect("the pool replaced the broken connection");
    let new_pid = second.map(pid_of).unwrap();
    assert_ne!(new_pid, pid, "the broken session was dropped");
    if let Ok(row) = first {
        // The first query may already have found the connection closed and opened another.
        assert_ne!(row.map(pid_of), Some(pid));
    }
    for _ in 0..3 {
        select().await.expect("every later query runs");
    }
}
