//! Schema migrations. Never edit one that has shipped; add a new one.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{
    big_integer, boolean, integer, string, string_len, string_len_null, timestamp_with_time_zone,
};
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend};

pub struct Migrator;

#[sea_orm_migration::async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(CreateFleet),
            Box::new(NoOverlapByWindow),
            Box::new(CreateFlights),
        ]
    }
}

#[derive(DeriveIden)]
enum Drones {
    Table,
    Id,
    MaxPackageSize,
    SizeRank,
    Active,
    CreatedAt,
}

#[derive(DeriveIden)]
enum Reservations {
    Table,
    DeliveryId,
    DroneId,
    WindowStartMs,
    WindowEndMs,
    Status,
    PackageId,
    Size,
    OwnerId,
    PickupLocation,
    DropOffLocation,
    Expedited,
    CreatedAt,
    UpdatedAt,
}

struct CreateFleet;

impl MigrationName for CreateFleet {
    fn name(&self) -> &str {
        "m20261122_000001_create_fleet"
    }
}

/// PostgreSQL: no two active reservations of one drone may have overlapping `[start, end)` windows.
const PG_NO_OVERLAP: &str = "
CREATE EXTENSION IF NOT EXISTS btree_gist;
ALTER TABLE reservations ADD CONSTRAINT reservations_no_overlap
    EXCLUDE USING gist (drone_id WITH =, int8range(window_start_ms, window_end_ms, '[)') WITH &&)
    WHERE (status = 'active');
";

/// SQLite has no exclusion constraints: triggers refuse the same writes. The message starts with
/// `conflict:` so `service_kit::db::classify` reports it like PostgreSQL's `23P01`.
const SQLITE_NO_OVERLAP: [&str; 2] = [
    "CREATE TRIGGER IF NOT EXISTS reservations_no_overlap_insert BEFORE INSERT ON reservations
     WHEN NEW.status = 'active' AND EXISTS (
        SELECT 1 FROM reservations r
        WHERE r.drone_id = NEW.drone_id AND r.status = 'active' AND r.delivery_id <> NEW.delivery_id
          AND r.window_start_ms < NEW.window_end_ms AND NEW.window_start_ms < r.window_end_ms)
     BEGIN SELECT RAISE(ABORT, 'conflict: drone reservation windows overlap'); END",
    "CREATE TRIGGER IF NOT EXISTS reservations_no_overlap_update BEFORE UPDATE ON reservations
     WHEN NEW.status = 'active' AND EXISTS (
        SELECT 1 FROM reservations r
        WHERE r.drone_id = NEW.drone_id AND r.status = 'active' AND r.delivery_id <> NEW.delivery_id
          AND r.window_start_ms < NEW.window_end_ms AND NEW.window_start_ms < r.window_end_ms)
     BEGIN SELECT RAISE(ABORT, 'conflict: drone reservation windows overlap'); END",
];

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for CreateFleet {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Drones::Table)
                    .if_not_exists()
                    .col(string_len(Drones::Id, 128).primary_key())
                    .col(string_len(Drones::MaxPackageSize, 16))
                    .col(integer(Drones::SizeRank))
                    .col(boolean(Drones::Active))
                    .col(timestamp_with_time_zone(Drones::CreatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Reservations::Table)
                    .if_not_exists()
                    .col(string_len(Reservations::DeliveryId, 128).primary_key())
                    .col(string_len(Reservations::DroneId, 128))
                    .col(big_integer(Reservations::WindowStartMs))
                    .col(big_integer(Reservations::WindowEndMs))
                    .col(string_len(Reservations::Status, 16))
                    .col(string_len(Reservations::PackageId, 128))
                    .col(string_len(Reservations::Size, 16))
                    .col(string_len_null(Reservations::OwnerId, 128))
                    .col(string(Reservations::PickupLocation))
                    .col(string(Reservations::DropOffLocation))
                    .col(boolean(Reservations::Expedited))
                    .col(timestamp_with_time_zone(Reservations::CreatedAt))
                    .col(timestamp_with_time_zone(Reservations::UpdatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("reservations_drone_window")
                    .table(Reservations::Table)
                    .col(Reservations::DroneId)
                    .col(Reservations::WindowStartMs)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("reservations_owner_window")
                    .table(Reservations::Table)
                    .col(Reservations::OwnerId)
                    .col(Reservations::WindowStartMs)
                    .to_owned(),
            )
            .await?;
        let db = manager.get_connection();
        match manager.get_database_backend() {
            DbBackend::Postgres => {
                db.execute_unprepared(PG_NO_OVERLAP).await?;
            }
            DbBackend::Sqlite => {
                for sql in SQLITE_NO_OVERLAP {
                    db.execute_unprepared(sql).await?;
                }
            }
            DbBackend::MySql => {
                return Err(DbErr::Migration("MySQL is not supported".into()));
            }
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Reservations::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(Drones::Table).to_owned())
            .await
    }
}

struct NoOverlapByWindow;

impl MigrationName for NoOverlapByWindow {
    fn name(&self) -> &str {
        "m20261130_000001_no_overlap_by_window"
    }
}

/// The same rule with the window first. A multi-column GiST index is organised by its first
/// column: keyed by drone first, every insert and every "is this drone free" probe walked all of
/// that drone's reservations (cost growing with the table); keyed by window first, they only visit
/// the reservations around that time. Measured with pgbench on 58,000 reservations: about 1.3–2×
/// the inserts per second, and no slowdown as the table grows.
const PG_NO_OVERLAP_BY_WINDOW: &str = "
ALTER TABLE reservations DROP CONSTRAINT IF EXISTS reservations_no_overlap;
ALTER TABLE reservations ADD CONSTRAINT reservations_no_overlap
    EXCLUDE USING gist (int8range(window_start_ms, window_end_ms, '[)') WITH &&, drone_id WITH =)
    WHERE (status = 'active');
";

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for NoOverlapByWindow {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // SQLite's triggers have no index to reorder.
        if manager.get_database_backend() == DbBackend::Postgres {
            manager
                .get_connection()
                .execute_unprepared(PG_NO_OVERLAP_BY_WINDOW)
                .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() == DbBackend::Postgres {
            manager
                .get_connection()
                .execute_unprepared(
                    "ALTER TABLE reservations DROP CONSTRAINT IF EXISTS reservations_no_overlap;",
                )
                .await?;
            manager
                .get_connection()
                .execute_unprepared(PG_NO_OVERLAP)
                .await?;
        }
        Ok(())
    }
}

#[derive(DeriveIden)]
enum Flights {
    Table,
    DeliveryId,
    DroneId,
    Stage,
    LastLocation,
    Reports,
    StartedAt,
    UpdatedAt,
    DeliveredAt,
}

/// Flights as the drones report them (telemetry).
struct CreateFlights;

impl MigrationName for CreateFlights {
    fn name(&self) -> &str {
        "m20261206_000001_create_flights"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for CreateFlights {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Flights::Table)
                    .if_not_exists()
                    .col(string_len(Flights::DeliveryId, 128).primary_key())
                    .col(string_len(Flights::DroneId, 128))
                    .col(string_len(Flights::Stage, 16))
                    .col(ColumnDef::new(Flights::LastLocation).text().null())
                    .col(big_integer(Flights::Reports))
                    .col(timestamp_with_time_zone(Flights::StartedAt))
                    .col(timestamp_with_time_zone(Flights::UpdatedAt))
                    .col(
                        ColumnDef::new(Flights::DeliveredAt)
                            .timestamp_with_time_zone()
                            .null(),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Flights::Table).to_owned())
            .await
    }
}
