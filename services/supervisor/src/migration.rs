//! The Supervisor's schema: compensation outcomes, the saga read model and its checkpoints, the
//! audit log, dashboard users and sessions. Never edit a shipped migration; add a new one.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{
    big_integer, boolean, integer, pk_auto, string_len, string_len_null, text, text_null,
    timestamp_with_time_zone,
};

mod m20261205_000001_parked_messages;
mod m20261205_000002_login_failures;

pub struct Migrator;

#[sea_orm_migration::async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(CreateSupervisor),
            Box::new(m20261205_000001_parked_messages::Migration),
            Box::new(m20261205_000002_login_failures::Migration),
        ]
    }
}

#[derive(DeriveIden)]
enum Compensations {
    Table,
    DeliveryId,
    SagaVersion,
    OwnerId,
    Steps,
    Reason,
    Status,
    Error,
    StepResults,
    Deliveries,
    Reported,
    RequestedBy,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Sagas {
    Table,
    DeliveryId,
    OwnerId,
    State,
    Detail,
    Version,
    Stuck,
    PackageId,
    DroneId,
    Enriched,
    FirstSeenAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum ProjectionCheckpoints {
    Table,
    Partition,
    NextOffset,
}

#[derive(DeriveIden)]
enum AuditLog {
    Table,
    Id,
    At,
    Actor,
    Role,
    Action,
    Target,
    Reason,
    Outcome,
}

#[derive(DeriveIden)]
enum Users {
    Table,
    Name,
    Role,
    PasswordHash,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Sessions {
    Table,
    Id,
    UserName,
    Role,
    Csrf,
    CreatedAt,
    ExpiresAt,
}

struct CreateSupervisor;

impl MigrationName for CreateSupervisor {
    fn name(&self) -> &str {
        "m20261201_000001_create_supervisor"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for CreateSupervisor {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Compensations::Table)
                    .if_not_exists()
                    .col(string_len(Compensations::DeliveryId, 36))
                    .col(big_integer(Compensations::SagaVersion))
                    .col(string_len(Compensations::OwnerId, 128))
                    .col(text(Compensations::Steps))
                    .col(text(Compensations::Reason))
                    .col(string_len(Compensations::Status, 32))
                    .col(text_null(Compensations::Error))
                    .col(text(Compensations::StepResults))
                    .col(integer(Compensations::Deliveries))
                    .col(boolean(Compensations::Reported))
                    .col(string_len(Compensations::RequestedBy, 128))
                    .col(timestamp_with_time_zone(Compensations::CreatedAt))
                    .col(timestamp_with_time_zone(Compensations::UpdatedAt))
                    .primary_key(
                        Index::create()
                            .col(Compensations::DeliveryId)
                            .col(Compensations::SagaVersion),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Sagas::Table)
                    .if_not_exists()
                    .col(string_len(Sagas::DeliveryId, 36).primary_key())
                    .col(string_len(Sagas::OwnerId, 128))
                    .col(string_len(Sagas::State, 32))
                    .col(text_null(Sagas::Detail))
                    .col(big_integer(Sagas::Version))
                    .col(boolean(Sagas::Stuck))
                    .col(string_len_null(Sagas::PackageId, 128))
                    .col(string_len_null(Sagas::DroneId, 128))
                    .col(boolean(Sagas::Enriched))
                    .col(timestamp_with_time_zone(Sagas::FirstSeenAt))
                    .col(timestamp_with_time_zone(Sagas::UpdatedAt))
                    .to_owned(),
            )
            .await?;
        for (name, col) in [
            ("idx_sagas_state_updated", Sagas::State),
            ("idx_sagas_owner", Sagas::OwnerId),
            ("idx_sagas_drone", Sagas::DroneId),
            ("idx_sagas_package", Sagas::PackageId),
        ] {
            manager
                .create_index(
                    Index::create()
                        .name(name)
                        .table(Sagas::Table)
                        .col(col)
                        .if_not_exists()
                        .to_owned(),
                )
                .await?;
        }
        manager
            .create_table(
                Table::create()
                    .table(ProjectionCheckpoints::Table)
                    .if_not_exists()
                    .col(integer(ProjectionCheckpoints::Partition).primary_key())
                    .col(big_integer(ProjectionCheckpoints::NextOffset))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(AuditLog::Table)
                    .if_not_exists()
                    .col(pk_auto(AuditLog::Id).big_integer())
                    .col(timestamp_with_time_zone(AuditLog::At))
                    .col(string_len(AuditLog::Actor, 128))
                    .col(string_len(AuditLog::Role, 32))
                    .col(string_len(AuditLog::Action, 64))
                    .col(string_len(AuditLog::Target, 256))
                    .col(text(AuditLog::Reason))
                    .col(text(AuditLog::Outcome))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Users::Table)
                    .if_not_exists()
                    .col(string_len(Users::Name, 128).primary_key())
                    .col(string_len(Users::Role, 32))
                    .col(text(Users::PasswordHash))
                    .col(timestamp_with_time_zone(Users::UpdatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Sessions::Table)
                    .if_not_exists()
                    .col(string_len(Sessions::Id, 64).primary_key())
                    .col(string_len(Sessions::UserName, 128))
                    .col(string_len(Sessions::Role, 32))
                    .col(string_len(Sessions::Csrf, 64))
                    .col(timestamp_with_time_zone(Sessions::CreatedAt))
                    .col(timestamp_with_time_zone(Sessions::ExpiresAt))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Sessions::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(Users::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(AuditLog::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(ProjectionCheckpoints::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(Sagas::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(Compensations::Table).to_owned())
            .await
    }
}
