//! Schema migrations. Never edit one that has shipped; add a new one.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{double, string_len, string_len_null, timestamp_with_time_zone};

pub struct Migrator;

#[sea_orm_migration::async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![Box::new(CreatePackages)]
    }
}

#[derive(DeriveIden)]
enum Packages {
    Table,
    Id,
    OwnerId,
    ExternalId,
    Size,
    Weight,
    Tag,
    Status,
    CreatedAt,
    UpdatedAt,
}

const OWNER_INDEX: &str = "idx_packages_owner_id";

struct CreatePackages;

impl MigrationName for CreatePackages {
    fn name(&self) -> &str {
        "m20261122_000001_create_packages"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for CreatePackages {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Packages::Table)
                    .if_not_exists()
                    .col(string_len(Packages::Id, 128).primary_key())
                    .col(string_len(Packages::OwnerId, 128))
                    .col(string_len(Packages::ExternalId, 128))
                    .col(string_len(Packages::Size, 16))
                    .col(double(Packages::Weight))
                    .col(string_len_null(Packages::Tag, 500))
                    .col(string_len(Packages::Status, 16))
                    .col(timestamp_with_time_zone(Packages::CreatedAt))
                    .col(timestamp_with_time_zone(Packages::UpdatedAt))
                    .to_owned(),
            )
            .await?;
        // The summary aggregates one owner's packages.
        manager
            .create_index(
                Index::create()
                    .name(OWNER_INDEX)
                    .table(Packages::Table)
                    .col(Packages::OwnerId)
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Packages::Table).to_owned())
            .await
    }
}
