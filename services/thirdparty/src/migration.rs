//! Schema migrations. Never edit one that has shipped; add a new one.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{
    boolean, double, double_null, integer, string_len, string_len_null, timestamp_with_time_zone,
};

pub struct Migrator;

#[sea_orm_migration::async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![Box::new(CreateCarriersAndLegs)]
    }
}

#[derive(DeriveIden)]
enum Carriers {
    Table,
    Id,
    Name,
    AreaCenter,
    AreaRadiusKm,
    DailyCapacity,
    MaxWeightKg,
    SpeedKmh,
    Active,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum CarrierDays {
    Table,
    CarrierId,
    Day,
    Booked,
}

#[derive(DeriveIden)]
enum Legs {
    Table,
    DeliveryId,
    OwnerId,
    PickupLocation,
    DropOffLocation,
    PickupTime,
    Size,
    Weight,
    HandoverWithinKm,
    CarrierId,
    CarrierName,
    Day,
    ToLocation,
    WholeRoute,
    HandoverTime,
    DistanceKm,
    Status,
    CreatedAt,
    UpdatedAt,
}

struct CreateCarriersAndLegs;

impl MigrationName for CreateCarriersAndLegs {
    fn name(&self) -> &str {
        "m20261206_000001_create_carriers_and_legs"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for CreateCarriersAndLegs {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Carriers::Table)
                    .if_not_exists()
                    .col(string_len(Carriers::Id, 128).primary_key())
                    .col(string_len(Carriers::Name, 200))
                    .col(string_len(Carriers::AreaCenter, 200))
                    .col(double(Carriers::AreaRadiusKm))
                    .col(integer(Carriers::DailyCapacity))
                    .col(double(Carriers::MaxWeightKg))
                    .col(double(Carriers::SpeedKmh))
                    .col(boolean(Carriers::Active))
                    .col(timestamp_with_time_zone(Carriers::UpdatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(CarrierDays::Table)
                    .if_not_exists()
                    .col(string_len(CarrierDays::CarrierId, 128))
                    .col(string_len(CarrierDays::Day, 10))
                    .col(integer(CarrierDays::Booked))
                    .primary_key(
                        Index::create()
                            .col(CarrierDays::CarrierId)
                            .col(CarrierDays::Day),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_carrier_days_carrier")
                            .from(CarrierDays::Table, CarrierDays::CarrierId)
                            .to(Carriers::Table, Carriers::Id),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Legs::Table)
                    .if_not_exists()
                    .col(string_len(Legs::DeliveryId, 128).primary_key())
                    .col(string_len(Legs::OwnerId, 128))
                    .col(string_len(Legs::PickupLocation, 500))
                    .col(string_len(Legs::DropOffLocation, 500))
                    .col(timestamp_with_time_zone(Legs::PickupTime))
                    .col(string_len(Legs::Size, 16))
                    .col(double(Legs::Weight))
                    .col(double_null(Legs::HandoverWithinKm))
                    .col(string_len_null(Legs::CarrierId, 128))
                    .col(string_len(Legs::CarrierName, 200))
                    .col(string_len(Legs::Day, 10))
                    .col(string_len(Legs::ToLocation, 500))
                    .col(boolean(Legs::WholeRoute))
                    .col(timestamp_with_time_zone(Legs::HandoverTime))
                    .col(double(Legs::DistanceKm))
                    .col(string_len(Legs::Status, 16))
                    .col(timestamp_with_time_zone(Legs::CreatedAt))
                    .col(timestamp_with_time_zone(Legs::UpdatedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_legs_carrier")
                            .from(Legs::Table, Legs::CarrierId)
                            .to(Carriers::Table, Carriers::Id),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Legs::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(CarrierDays::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(Carriers::Table).to_owned())
            .await
    }
}
