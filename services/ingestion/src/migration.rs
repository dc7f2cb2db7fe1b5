//! Schema migrations of the read model. Never edit one that has shipped; add a new one.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{
    big_integer, integer, string_len, text_null, timestamp_with_time_zone,
};

pub struct Migrator;

#[sea_orm_migration::async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(CreateReadModel),
            Box::new(KeepFirstRequest),
            Box::new(crate::tracking::AddTracking),
            Box::new(crate::webhooks::CreateWebhooks),
            Box::new(KeepCarrierLeg),
        ]
    }
}

#[derive(DeriveIden)]
enum DeliveryRequests {
    Table,
    DeliveryId,
    OwnerId,
    State,
    Detail,
    Version,
    AcceptedAt,
    UpdatedAt,
    FirstRequest,
    CarrierLeg,
}

#[derive(DeriveIden)]
enum ProjectionCheckpoints {
    Table,
    Partition,
    NextOffset,
}

struct CreateReadModel;

impl MigrationName for CreateReadModel {
    fn name(&self) -> &str {
        "m20261122_000001_create_read_model"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for CreateReadModel {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(DeliveryRequests::Table)
                    .if_not_exists()
                    .col(string_len(DeliveryRequests::DeliveryId, 36).primary_key())
                    .col(string_len(DeliveryRequests::OwnerId, 128))
                    .col(string_len(DeliveryRequests::State, 32))
                    .col(text_null(DeliveryRequests::Detail))
                    .col(big_integer(DeliveryRequests::Version))
                    .col(timestamp_with_time_zone(DeliveryRequests::AcceptedAt))
                    .col(timestamp_with_time_zone(DeliveryRequests::UpdatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(ProjectionCheckpoints::Table)
                    .if_not_exists()
                    .col(integer(ProjectionCheckpoints::Partition).primary_key())
                    .col(big_integer(ProjectionCheckpoints::NextOffset))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(ProjectionCheckpoints::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(DeliveryRequests::Table).to_owned())
            .await
    }
}

/// The body a booking with an Idempotency-Key was first accepted with, so a replay answers it.
struct KeepFirstRequest;

impl MigrationName for KeepFirstRequest {
    fn name(&self) -> &str {
        "m20261205_000001_keep_first_request"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for KeepFirstRequest {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(DeliveryRequests::Table)
                    .add_column(text_null(DeliveryRequests::FirstRequest))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(DeliveryRequests::Table)
                    .drop_column(DeliveryRequests::FirstRequest)
                    .to_owned(),
            )
            .await
    }
}

/// The carrier leg a booking holds (JSON of `contracts::CarrierLeg`), for its tracking view.
struct KeepCarrierLeg;

impl MigrationName for KeepCarrierLeg {
    fn name(&self) -> &str {
        "m20261206_000001_keep_carrier_leg"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for KeepCarrierLeg {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(DeliveryRequests::Table)
                    .add_column(text_null(DeliveryRequests::CarrierLeg))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(DeliveryRequests::Table)
                    .drop_column(DeliveryRequests::CarrierLeg)
                    .to_owned(),
            )
            .await
    }
}
