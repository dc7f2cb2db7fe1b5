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
