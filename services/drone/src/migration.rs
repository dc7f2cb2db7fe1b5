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
            Box::new(NoOverlapAsBox),
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

struct NoOverlapAsBox;

impl MigrationName for NoOverlapAsBox {
    fn name(&self) -> &str {
        "m20261207_000001_no_overlap_as_box"
    }
}

/// The same rule on a cheaper key (PostgreSQL). The GiST index of `(int8range, drone_id)` spent
/// most of a reservation's insert on the range type (each key detoasted and deserialised at every
/// comparison) and on the second column: at 2,500 bookings/s it made Drone's database the
/// suite's second-largest CPU user, and inserting 50,000 reservations took 70 µs a row against
/// 5 µs without the constraint. `drone_window` turns a reservation into a box: the window
/// `[start, end)` as the closed interval `[start, end - 1]` of whole milliseconds along x (exact
/// in float8 far beyond any date), and along y the drone's lane, a number taken from its id's
/// MD5 (stable across PostgreSQL versions, unlike `hashtext`). Two boxes of one drone overlap
/// exactly when their windows do; two drones sharing a lane are told apart by `drone_id WITH =`.
/// Boxes are fixed-size and compared as floats, and the lanes spread the drones over y, so a
/// probe visits only the reservations of the same drone around that time: the same 50,000
/// inserts took 18 µs a row.
///
/// The function is `IMMUTABLE` SQL, inlined by the planner both in the index and in the queries
/// that probe it (`store.rs`, `store/batch.rs`), which must call it exactly this way. An active
/// window is never empty (now checked; a tombstone's is, and it is never active): an empty one
/// would be a box reaching one millisecond back.
const PG_NO_OVERLAP_AS_BOX: &str = "
CREATE OR REPLACE FUNCTION drone_window(drone_id text, start_ms bigint, end_ms bigint)
    RETURNS box LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ SELECT box(point(start_ms, ('x' || left(md5(drone_id), 8))::bit(32)::int),
                     point(end_ms - 1, ('x' || left(md5(drone_id), 8))::bit(32)::int)) $$;
ALTER TABLE reservations ADD CONSTRAINT reservations_window_not_empty
    CHECK (status <> 'active' OR window_end_ms > window_start_ms);
ALTER TABLE reservations DROP CONSTRAINT IF EXISTS reservations_no_overlap;
ALTER TABLE reservations ADD CONSTRAINT reservations_no_overlap
    EXCLUDE USING gist (drone_window(drone_id, window_start_ms, window_end_ms) WITH &&,
                        drone_id WITH =)
    WHERE (status = 'active');
";

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for NoOverlapAsBox {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // SQLite keeps its triggers.
        if manager.get_database_backend() == DbBackend::Postgres {
            manager
                .get_connection()
                .execute_unprepared(PG_NO_OVERLAP_AS_BOX)
                .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() == DbBackend::Postgres {
            manager
                .get_connection()
                .execute_unprepared(PG_NO_OVERLAP_BY_WINDOW)
                .await?;
            manager
                .get_connection()
                .execute_unprepared(
                    "ALTER TABLE reservations DROP CONSTRAINT IF EXISTS \
                     reservations_window_not_empty;
                     DROP FUNCTION IF EXISTS drone_window(text, bigint, bigint);",
                )
                .await?;
        }
        Ok(())
    }
}
