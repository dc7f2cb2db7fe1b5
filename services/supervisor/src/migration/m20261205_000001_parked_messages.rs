//! Parked compensation requests move out of the broker's parked queue into this table, where
//! listing them changes nothing; a redrive republishes the stored bytes and marks the row.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{
    integer, string_len, string_len_null, text, timestamp_with_time_zone,
    timestamp_with_time_zone_null,
};

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261205_000001_parked_messages"
    }
}

#[derive(DeriveIden)]
enum ParkedMessages {
    Table,
    ParkId,
    MessageId,
    DeliveryId,
    Payload,
    Reason,
    DeliveryCount,
    ParkedAt,
    StoredAt,
    RedrivenAt,
    RedrivenBy,
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(ParkedMessages::Table)
                    .if_not_exists()
                    // One row per parking of a message: a parked message handed out again after
                    // a crash finds its row instead of adding a second one.
                    .col(string_len(ParkedMessages::ParkId, 256).primary_key())
                    .col(string_len(ParkedMessages::MessageId, 128))
                    .col(string_len_null(ParkedMessages::DeliveryId, 128))
                    // The bytes as published, also when they do not decode.
                    .col(ColumnDef::new(ParkedMessages::Payload).blob().not_null())
                    .col(text(ParkedMessages::Reason))
                    .col(integer(ParkedMessages::DeliveryCount))
                    .col(timestamp_with_time_zone(ParkedMessages::ParkedAt))
                    .col(timestamp_with_time_zone(ParkedMessages::StoredAt))
                    .col(timestamp_with_time_zone_null(ParkedMessages::RedrivenAt))
                    .col(string_len_null(ParkedMessages::RedrivenBy, 128))
                    .to_owned(),
            )
            .await?;
        for (name, col) in [
            ("idx_parked_messages_message", ParkedMessages::MessageId),
            ("idx_parked_messages_delivery", ParkedMessages::DeliveryId),
            ("idx_parked_messages_parked_at", ParkedMessages::ParkedAt),
        ] {
            manager
                .create_index(
                    Index::create()
                        .name(name)
                        .table(ParkedMessages::Table)
                        .col(col)
                        .if_not_exists()
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(ParkedMessages::Table).to_owned())
            .await
    }
}
