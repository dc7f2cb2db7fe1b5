//! Schema migrations. Never edit one that has shipped; add a new one.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{pk_auto, string, string_len, text, timestamp_with_time_zone};

pub struct Migrator;

#[sea_orm_migration::async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![Box::new(CreateAccounts), Box::new(AddAccountFeed)]
    }
}

#[derive(DeriveIden)]
enum Accounts {
    Table,
    Id,
    Name,
    Status,
    CreatedAt,
    UpdatedAt,
}

struct CreateAccounts;

impl MigrationName for CreateAccounts {
    fn name(&self) -> &str {
        "m20261122_000001_create_accounts"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for CreateAccounts {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Accounts::Table)
                    .if_not_exists()
                    .col(string_len(Accounts::Id, 128).primary_key())
                    .col(string(Accounts::Name))
                    .col(string_len(Accounts::Status, 16))
                    .col(timestamp_with_time_zone(Accounts::CreatedAt))
                    .col(timestamp_with_time_zone(Accounts::UpdatedAt))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Accounts::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum Added {
    Version,
}

#[derive(DeriveIden)]
enum AccountOutbox {
    Table,
    Seq,
    AccountId,
    Payload,
    CreatedAt,
}

/// The account feed (`account-events`): a version per account, raised with every change, and the
/// outbox of changes not yet published, written in the transaction that makes the change. Rows of
/// accounts created before this migration get version 1 and no outbox row: the Scheduler asks
/// Account about an account it has not seen.
struct AddAccountFeed;

impl MigrationName for AddAccountFeed {
    fn name(&self) -> &str {
        "m20261207_000001_add_account_feed"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for AddAccountFeed {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Accounts::Table)
                    .add_column(
                        ColumnDef::new(Added::Version)
                            .big_integer()
                            .not_null()
                            .default(1),
                    )
                    .to_owned(),
            )
            .await?;
        // The sequence never hands out a number twice (AUTOINCREMENT on SQLite), so a relay that
        // deletes the rows it published by number never deletes a newer row.
        manager
            .create_table(
                Table::create()
                    .table(AccountOutbox::Table)
                    .if_not_exists()
                    .col(pk_auto(AccountOutbox::Seq).big_integer())
                    .col(string_len(AccountOutbox::AccountId, 128))
                    .col(text(AccountOutbox::Payload))
                    .col(timestamp_with_time_zone(AccountOutbox::CreatedAt))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(AccountOutbox::Table).to_owned())
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Accounts::Table)
                    .drop_column(Added::Version)
                    .to_owned(),
            )
            .await
    }
}
