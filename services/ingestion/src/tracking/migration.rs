//! The read model's tracking schema: what the booking's row needs for `GET /api/deliveries/{id}`
//! and the history behind it and its event stream.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{
    big_integer, boolean, pk_auto, string_len, string_len_null, text_null,
    timestamp_with_time_zone, timestamp_with_time_zone_null,
};

#[derive(DeriveIden)]
enum DeliveryRequests {
    Table,
    PickupLocation,
    DropOffLocation,
    PickupTime,
    WindowStart,
    WindowEnd,
    DroneId,
    TrackingStage,
    TrackingSeq,
    LastLocation,
    TrackedAt,
    ClientCancelled,
}

#[derive(DeriveIden)]
enum BookingHistory {
    Table,
    Id,
    DeliveryId,
    Source,
    SourceSeq,
    State,
    TrackingStage,
    Detail,
    Location,
    At,
}

const HISTORY_UNIQUE: &str = "ux_booking_history_source";

/// Adds the tracking columns to `delivery_requests` and creates `booking_history`.
pub(crate) struct AddTracking;

impl MigrationName for AddTracking {
    fn name(&self) -> &str {
        "m20261206_000002_add_tracking"
    }
}

fn added_columns() -> Vec<ColumnDef> {
    use sea_orm_migration::schema::big_integer_null;
    vec![
        text_null(DeliveryRequests::PickupLocation),
        text_null(DeliveryRequests::DropOffLocation),
        timestamp_with_time_zone_null(DeliveryRequests::PickupTime),
        timestamp_with_time_zone_null(DeliveryRequests::WindowStart),
        timestamp_with_time_zone_null(DeliveryRequests::WindowEnd),
        string_len_null(DeliveryRequests::DroneId, 128),
        string_len_null(DeliveryRequests::TrackingStage, 32),
        big_integer_null(DeliveryRequests::TrackingSeq),
        text_null(DeliveryRequests::LastLocation),
        timestamp_with_time_zone_null(DeliveryRequests::TrackedAt),
        boolean(DeliveryRequests::ClientCancelled)
            .default(false)
            .to_owned(),
    ]
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for AddTracking {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // One column per statement: SQLite alters one thing at a time.
        for mut col in added_columns() {
            manager
                .alter_table(
                    Table::alter()
                        .table(DeliveryRequests::Table)
                        .add_column(&mut col)
                        .to_owned(),
                )
                .await?;
        }
        manager
            .create_table(
                Table::create()
                    .table(BookingHistory::Table)
                    .if_not_exists()
                    .col(pk_auto(BookingHistory::Id).big_integer())
                    .col(string_len(BookingHistory::DeliveryId, 36))
                    .col(string_len(BookingHistory::Source, 16))
                    .col(big_integer(BookingHistory::SourceSeq))
                    .col(string_len_null(BookingHistory::State, 32))
                    .col(string_len_null(BookingHistory::TrackingStage, 32))
                    .col(text_null(BookingHistory::Detail))
                    .col(text_null(BookingHistory::Location))
                    .col(timestamp_with_time_zone(BookingHistory::At))
                    .to_owned(),
            )
            .await?;
        // Replays and every replica apply the same log: each change is recorded once. The index
        // also serves the reads of one booking's history.
        manager
            .create_index(
                Index::create()
                    .name(HISTORY_UNIQUE)
                    .table(BookingHistory::Table)
                    .col(BookingHistory::DeliveryId)
                    .col(BookingHistory::Source)
                    .col(BookingHistory::SourceSeq)
                    .unique()
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(BookingHistory::Table).to_owned())
            .await?;
        for col in added_columns() {
            manager
                .alter_table(
                    Table::alter()
                        .table(DeliveryRequests::Table)
                        .drop_column(Alias::new(col.get_column_name()))
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }
}
