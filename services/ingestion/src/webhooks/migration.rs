//! The webhook tables: accounts' secrets and endpoints, one row per (endpoint, event) with its
//! attempts and schedule, and the follower's checkpoints. Times the dispatcher compares are unix
//! milliseconds (integers compare alike on PostgreSQL and SQLite).

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{
    big_integer, big_integer_null, integer, integer_null, string_len, string_len_null, text,
    text_null, timestamp_with_time_zone,
};

#[derive(DeriveIden)]
enum WebhookAccounts {
    Table,
    AccountId,
    Secret,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum WebhookEndpoints {
    Table,
    AccountId,
    Url,
    Position,
    CreatedAt,
}

#[derive(DeriveIden)]
enum WebhookDeliveries {
    Table,
    Id,
    AccountId,
    Url,
    EventId,
    EventType,
    DeliveryId,
    LogOffset,
    LogIndex,
    Payload,
    Status,
    Attempts,
    LastStatusCode,
    LastError,
    NextAttemptMs,
    GiveUpMs,
    LeaseUntilMs,
    LeaseToken,
    CreatedMs,
    DeliveredMs,
}

#[derive(DeriveIden)]
enum WebhookCheckpoints {
    Table,
    Partition,
    ResumeOffset,
}

pub(crate) struct CreateWebhooks;

impl MigrationName for CreateWebhooks {
    fn name(&self) -> &str {
        "m20261206_000003_create_webhooks"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for CreateWebhooks {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(WebhookAccounts::Table)
                    .if_not_exists()
                    .col(string_len(WebhookAccounts::AccountId, 128).primary_key())
                    .col(string_len(WebhookAccounts::Secret, 128))
                    .col(timestamp_with_time_zone(WebhookAccounts::CreatedAt))
                    .col(timestamp_with_time_zone(WebhookAccounts::UpdatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(WebhookEndpoints::Table)
                    .if_not_exists()
                    .col(string_len(WebhookEndpoints::AccountId, 128))
                    .col(string_len(WebhookEndpoints::Url, 2048))
                    .col(integer(WebhookEndpoints::Position))
                    .col(timestamp_with_time_zone(WebhookEndpoints::CreatedAt))
                    .primary_key(
                        Index::create()
                            .col(WebhookEndpoints::AccountId)
                            .col(WebhookEndpoints::Url),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(WebhookDeliveries::Table)
                    .if_not_exists()
                    // Derived from (account, url, event id): every replica inserts the same row.
                    .col(string_len(WebhookDeliveries::Id, 36).primary_key())
                    .col(string_len(WebhookDeliveries::AccountId, 128))
                    .col(string_len(WebhookDeliveries::Url, 2048))
                    .col(string_len(WebhookDeliveries::EventId, 36))
                    .col(string_len(WebhookDeliveries::EventType, 32))
                    .col(string_len(WebhookDeliveries::DeliveryId, 36))
                    .col(big_integer(WebhookDeliveries::LogOffset))
                    .col(integer(WebhookDeliveries::LogIndex))
                    .col(text(WebhookDeliveries::Payload))
                    .col(string_len(WebhookDeliveries::Status, 16))
                    .col(integer(WebhookDeliveries::Attempts))
                    .col(integer_null(WebhookDeliveries::LastStatusCode))
                    .col(text_null(WebhookDeliveries::LastError))
                    .col(big_integer_null(WebhookDeliveries::NextAttemptMs))
                    .col(big_integer(WebhookDeliveries::GiveUpMs))
                    .col(big_integer_null(WebhookDeliveries::LeaseUntilMs))
                    .col(string_len_null(WebhookDeliveries::LeaseToken, 36))
                    .col(big_integer(WebhookDeliveries::CreatedMs))
                    .col(big_integer_null(WebhookDeliveries::DeliveredMs))
                    .to_owned(),
            )
            .await?;
        for index in [
            Index::create()
                .name("ux_webhook_deliveries_url_event")
                .table(WebhookDeliveries::Table)
                .col(WebhookDeliveries::AccountId)
                .col(WebhookDeliveries::Url)
                .col(WebhookDeliveries::EventId)
                .unique()
                .if_not_exists()
                .to_owned(),
            // What is due.
            Index::create()
                .name("ix_webhook_deliveries_due")
                .table(WebhookDeliveries::Table)
                .col(WebhookDeliveries::Status)
                .col(WebhookDeliveries::NextAttemptMs)
                .if_not_exists()
                .to_owned(),
            // The earlier events of one booking to one endpoint (order per booking).
            Index::create()
                .name("ix_webhook_deliveries_booking")
                .table(WebhookDeliveries::Table)
                .col(WebhookDeliveries::DeliveryId)
                .col(WebhookDeliveries::Status)
                .if_not_exists()
                .to_owned(),
            // An account's log, newest first.
            Index::create()
                .name("ix_webhook_deliveries_account")
                .table(WebhookDeliveries::Table)
                .col(WebhookDeliveries::AccountId)
                .col(WebhookDeliveries::CreatedMs)
                .col(WebhookDeliveries::Id)
                .if_not_exists()
                .to_owned(),
        ] {
            manager.create_index(index).await?;
        }
        manager
            .create_table(
                Table::create()
                    .table(WebhookCheckpoints::Table)
                    .if_not_exists()
                    .col(integer(WebhookCheckpoints::Partition).primary_key())
                    .col(big_integer(WebhookCheckpoints::ResumeOffset))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            WebhookCheckpoints::Table.into_iden(),
            WebhookDeliveries::Table.into_iden(),
            WebhookEndpoints::Table.into_iden(),
            WebhookAccounts::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(table).if_exists().to_owned())
                .await?;
        }
        Ok(())
    }
}
