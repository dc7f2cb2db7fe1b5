//! The scheduler's schema: the saga journal (which now holds the partition leases as its shard
//! leases). Never edit a shipped
//! migration; add a new one.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{big_integer, integer, string_len, timestamp_with_time_zone};

pub struct Migrator;

#[sea_orm_migration::async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        let mut all = saga::migrations();
        all.push(Box::new(CreateLeases));
        all.push(Box::new(LeasesToSagaShards));
        all.push(Box::new(MakeRoomForArrangeThirdParty));
        all.push(Box::new(CreateAccountCopies));
        all
    }
}

#[derive(DeriveIden)]
enum PartitionLeases {
    Table,
    Partition,
    Owner,
    Token,
    ExpiresAt,
    NextOffset,
}

struct CreateLeases;

impl MigrationName for CreateLeases {
    fn name(&self) -> &str {
        "m20261122_200001_create_partition_leases"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for CreateLeases {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(PartitionLeases::Table)
                    .if_not_exists()
                    .col(integer(PartitionLeases::Partition).primary_key())
                    .col(string_len(PartitionLeases::Owner, 128))
                    .col(big_integer(PartitionLeases::Token))
                    .col(timestamp_with_time_zone(PartitionLeases::ExpiresAt))
                    .col(big_integer(PartitionLeases::NextOffset))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(PartitionLeases::Table).to_owned())
            .await
    }
}

/// The partition leases move into the saga store's shard leases (whose epoch fences every saga
/// write); a checkpoint offset becomes the position (offset, 0).
struct LeasesToSagaShards;

impl MigrationName for LeasesToSagaShards {
    fn name(&self) -> &str {
        "m20261205_200001_leases_to_saga_shards"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for LeasesToSagaShards {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        db.execute_unprepared(
            "INSERT INTO saga_shards (shard, owner, epoch, expires_at_ms, checkpoint_offset, \
             checkpoint_index) SELECT partition, owner, token, 0, next_offset, 0 \
             FROM partition_leases WHERE true ON CONFLICT (shard) DO NOTHING",
        )
        .await?;
        manager
            .drop_table(Table::drop().table(PartitionLeases::Table).to_owned())
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        CreateLeases.up(manager).await?;
        manager
            .get_connection()
            .execute_unprepared(
                "INSERT INTO partition_leases (partition, owner, token, expires_at, next_offset) \
                 SELECT shard, owner, epoch, CURRENT_TIMESTAMP, checkpoint_offset FROM saga_shards",
            )
            .await?;
        Ok(())
    }
}

/// The booking saga gained a step at index 2 (ArrangeThirdParty, before ReserveDrone): sagas
/// journaled by an older Scheduler point at step indexes that now name the step after. Their
/// `next_step` and their attempts' `step_index` from ReserveDrone on move up by one, so a saga
/// that was waiting in ReserveDrone resumes there (outputs are keyed by step name and need
/// nothing). Attempts move in two passes so no row ever collides with another's key.
struct MakeRoomForArrangeThirdParty;

impl MigrationName for MakeRoomForArrangeThirdParty {
    fn name(&self) -> &str {
        "m20261206_200001_make_room_for_arrange_third_party"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for MakeRoomForArrangeThirdParty {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        shift_booking_steps(manager, 1).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        shift_booking_steps(manager, -1).await
    }
}

/// Moves booking step indexes 2 and up (`by` = 1) or 3 and up (`by` = -1) by `by`.
async fn shift_booking_steps(manager: &SchemaManager<'_>, by: i32) -> Result<(), DbErr> {
    let from = if by > 0 { 2 } else { 3 };
    let db = manager.get_connection();
    db.execute_unprepared(&format!(
        "UPDATE saga_instances SET next_step = next_step + ({by}) \
         WHERE kind = 'booking' AND next_step >= {from}"
    ))
    .await?;
    let bookings = "SELECT id FROM saga_instances WHERE kind = 'booking'";
    db.execute_unprepared(&format!(
        "UPDATE saga_attempts SET step_index = step_index + 1000 \
         WHERE step_index >= {from} AND saga_id IN ({bookings})"
    ))
    .await?;
    db.execute_unprepared(&format!(
        "UPDATE saga_attempts SET step_index = step_index - 1000 + ({by}) \
         WHERE step_index >= 1000 AND saga_id IN ({bookings})"
    ))
    .await?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step should panic
mod tests {
    use super::*;
    use sea_orm::{ConnectionTrait, Database, Statement};

    async fn ints(db: &sea_orm::DatabaseConnection, sql: &str) -> Vec<i64> {
        db.query_all(Statement::from_string(db.get_database_backend(), sql))
            .await
            .unwrap()
            .iter()
            .map(|r| r.try_get_by_index::<i64>(0).unwrap())
            .collect()
    }

    /// A booking journaled by a four-step Scheduler, waiting in ReserveDrone (index 2), resumes in
    /// ReserveDrone (index 3) after the migration; its attempts keep naming their steps.
    #[tokio::test]
    async fn old_bookings_keep_their_place_when_arrange_third_party_is_added() {
        let db = Database::connect("sqlite::memory:").await.unwrap();
        // Every migration before the one under test (later ones may follow it).
        let before = Migrator::migrations()
            .iter()
            .position(|m| {
                MigrationName::name(m.as_ref())
                    == MigrationName::name(&MakeRoomForArrangeThirdParty)
            })
            .unwrap();
        Migrator::up(
            &db,
            Some(<u32 as TryFrom<usize>>::try_from(before).unwrap()),
        )
        .await
        .unwrap();
        let now = "2026-12-01T00:00:00+00:00";
        for (id, kind, next) in [
            ("b1", "booking", 2),
            ("b2", "booking", 1),
            ("o1", "other", 2),
        ] {
            db.execute_unprepared(&format!(
                "INSERT INTO saga_instances (id, kind, shard, state, input, outputs, next_step, \
                 version, created_at, updated_at) VALUES ('{id}', '{kind}', 0, 'running', '{{}}', \
                 '{{}}', {next}, 3, '{now}', '{now}')"
            ))
            .await
            .unwrap();
        }
        for (index, attempt, step) in [
            (1, 1, "RegisterPackage"),
            (2, 1, "ReserveDrone"),
            (2, 2, "ReserveDrone"),
            (3, 1, "CreateDelivery"),
        ] {
            db.execute_unprepared(&format!(
                "INSERT INTO saga_attempts (saga_id, step_index, attempt, step, outcome, \
                 started_at, finished_at) VALUES ('b1', {index}, {attempt}, '{step}', \
                 'transient', '{now}', '{now}')"
            ))
            .await
            .unwrap();
        }
        Migrator::up(&db, None).await.unwrap();
        assert_eq!(
            ints(&db, "SELECT next_step FROM saga_instances ORDER BY id").await,
            vec![3, 1, 2],
            "b1 moves to ReserveDrone's new index; b2 (before it) and other kinds stay"
        );
        assert_eq!(
            ints(
                &db,
                "SELECT step_index FROM saga_attempts ORDER BY step_index, attempt"
            )
            .await,
            vec![1, 3, 3, 4]
        );
        // Down to before it again (undoing the later ones too).
        let undo = Migrator::migrations().len() - before;
        Migrator::down(&db, Some(<u32 as TryFrom<usize>>::try_from(undo).unwrap()))
            .await
            .unwrap();
        assert_eq!(
            ints(&db, "SELECT next_step FROM saga_instances ORDER BY id").await,
            vec![2, 1, 2]
        );
        assert_eq!(
            ints(
                &db,
                "SELECT step_index FROM saga_attempts ORDER BY step_index, attempt"
            )
            .await,
            vec![1, 2, 2, 3]
        );
    }
}

#[derive(DeriveIden)]
enum AccountCopies {
    Table,
    Id,
    Status,
    Version,
}

#[derive(DeriveIden)]
enum AccountFeed {
    Table,
    Consumer,
    NextOffset,
}

/// The copy of account statuses read from `account-events` (see `crate::accounts`), and each
/// replica's place in that log.
struct CreateAccountCopies;

impl MigrationName for CreateAccountCopies {
    fn name(&self) -> &str {
        "m20261206_300001_create_account_copies"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for CreateAccountCopies {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(AccountCopies::Table)
                    .if_not_exists()
                    .col(string_len(AccountCopies::Id, 128).primary_key())
                    .col(string_len(AccountCopies::Status, 16))
                    .col(big_integer(AccountCopies::Version))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(AccountFeed::Table)
                    .if_not_exists()
                    .col(string_len(AccountFeed::Consumer, 128).primary_key())
                    .col(big_integer(AccountFeed::NextOffset))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(AccountFeed::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(AccountCopies::Table).to_owned())
            .await
    }
}
