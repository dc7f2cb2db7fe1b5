//! The scheduler's schema: the saga journal plus partition leases. Never edit a shipped
//! migration; add a new one.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{big_integer, integer, string_len, timestamp_with_time_zone};

pub struct Migrator;

#[sea_orm_migration::async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        let mut all = saga::migrations();
        all.push(Box::new(CreateLeases));
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
