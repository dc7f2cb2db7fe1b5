//! Failed dashboard logins per user name and per client address, shared by every Supervisor
//! replica on the database (see `throttle`).

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{
    integer, string_len, timestamp_with_time_zone, timestamp_with_time_zone_null,
};

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261205_000002_login_failures"
    }
}

#[derive(DeriveIden)]
enum LoginFailures {
    Table,
    Key,
    Failures,
    LastFailureAt,
    BlockedUntil,
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(LoginFailures::Table)
                    .if_not_exists()
                    // `user:<name>` or `address:<ip>`.
                    .col(string_len(LoginFailures::Key, 200).primary_key())
                    .col(integer(LoginFailures::Failures))
                    .col(timestamp_with_time_zone(LoginFailures::LastFailureAt))
                    .col(timestamp_with_time_zone_null(LoginFailures::BlockedUntil))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(LoginFailures::Table).to_owned())
            .await
    }
}
