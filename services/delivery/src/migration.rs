//! Schema migrations. Never edit one that has shipped; add a new one.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{
    big_integer, boolean, string_len, text, text_null, timestamp_with_time_zone,
};

pub struct Migrator;

#[sea_orm_migration::async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![Box::new(CreateDeliveries), Box::new(CreateTrackingOutbox)]
    }
}

#[derive(DeriveIden)]
enum Deliveries {
    Table,
    Id,
    OwnerId,
    PickupLocation,
    DropOffLocation,
    PickupTime,
    Deadline,
    Expedited,
    ConfirmationRequired,
    PackageId,
    DroneId,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum TrackingEvents {
    Table,
    DeliveryId,
    Sequence,
    Stage,
    Location,
    Detail,
    At,
}

struct CreateDeliveries;

impl MigrationName for CreateDeliveries {
    fn name(&self) -> &str {
        "m20261123_000001_create_deliveries_and_tracking_events"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for CreateDeliveries {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Deliveries::Table)
                    .if_not_exists()
                    .col(string_len(Deliveries::Id, 128).primary_key())
                    .col(string_len(Deliveries::OwnerId, 128))
                    .col(text(Deliveries::PickupLocation))
                    .col(text(Deliveries::DropOffLocation))
                    .col(timestamp_with_time_zone(Deliveries::PickupTime))
                    .col(text(Deliveries::Deadline))
                    .col(boolean(Deliveries::Expedited))
                    .col(string_len(Deliveries::ConfirmationRequired, 16))
                    .col(string_len(Deliveries::PackageId, 128))
                    .col(string_len(Deliveries::DroneId, 128))
                    .col(timestamp_with_time_zone(Deliveries::CreatedAt))
                    .col(timestamp_with_time_zone(Deliveries::UpdatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(TrackingEvents::Table)
                    .if_not_exists()
                    .col(string_len(TrackingEvents::DeliveryId, 128))
                    .col(big_integer(TrackingEvents::Sequence))
                    .col(string_len(TrackingEvents::Stage, 32))
                    .col(text_null(TrackingEvents::Location))
                    .col(text_null(TrackingEvents::Detail))
                    .col(timestamp_with_time_zone(TrackingEvents::At))
                    // Concurrent appends that pick the same sequence collide here.
                    .primary_key(
                        Index::create()
                            .name("pk_tracking_events")
                            .col(TrackingEvents::DeliveryId)
                            .col(TrackingEvents::Sequence),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_tracking_events_delivery")
                            .from(TrackingEvents::Table, TrackingEvents::DeliveryId)
                            .to(Deliveries::Table, Deliveries::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(TrackingEvents::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(Deliveries::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum TrackingOutbox {
    Table,
    DeliveryId,
    Sequence,
    CreatedAt,
}

/// Tracking events still to be published on `workflow-events`, written in the transaction that
/// appends the event (`Created` is not published: the saga's own `scheduled` says as much).
struct CreateTrackingOutbox;

impl MigrationName for CreateTrackingOutbox {
    fn name(&self) -> &str {
        "m20261206_000001_create_tracking_outbox"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for CreateTrackingOutbox {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(TrackingOutbox::Table)
                    .if_not_exists()
                    .col(string_len(TrackingOutbox::DeliveryId, 128))
                    .col(big_integer(TrackingOutbox::Sequence))
                    .col(timestamp_with_time_zone(TrackingOutbox::CreatedAt))
                    .primary_key(
                        Index::create()
                            .name("pk_tracking_outbox")
                            .col(TrackingOutbox::DeliveryId)
                            .col(TrackingOutbox::Sequence),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ix_tracking_outbox_created_at")
                    .table(TrackingOutbox::Table)
                    .col(TrackingOutbox::CreatedAt)
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(TrackingOutbox::Table).to_owned())
            .await
    }
}
