//! The journal's schema, for inclusion in the owning service's migrator.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{
    big_integer, integer, string_len, text, text_null, timestamp_with_time_zone,
    timestamp_with_time_zone_null,
};

/// The journal migrations, in order. Never edit one that has shipped; add a new one.
pub fn migrations() -> Vec<Box<dyn MigrationTrait>> {
    vec![Box::new(CreateJournal)]
}

#[derive(DeriveIden)]
enum SagaInstances {
    Table,
    Id,
    Kind,
    Shard,
    State,
    Input,
    Outputs,
    NextStep,
    Version,
    Error,
    Deadline,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum SagaAttempts {
    Table,
    SagaId,
    StepIndex,
    Attempt,
    Step,
    Outcome,
    Error,
    StartedAt,
    FinishedAt,
}

#[derive(DeriveIden)]
enum SagaOutbox {
    Table,
    Seq,
    Destination,
    Key,
    Payload,
    CreatedAt,
}

struct CreateJournal;

impl MigrationName for CreateJournal {
    fn name(&self) -> &str {
        "m20261122_100001_create_saga_journal"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for CreateJournal {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(SagaInstances::Table)
                    .if_not_exists()
                    .col(string_len(SagaInstances::Id, 128).primary_key())
                    .col(string_len(SagaInstances::Kind, 64))
                    .col(integer(SagaInstances::Shard))
                    .col(string_len(SagaInstances::State, 32))
                    .col(text(SagaInstances::Input))
                    .col(text(SagaInstances::Outputs))
                    .col(integer(SagaInstances::NextStep))
                    .col(big_integer(SagaInstances::Version))
                    .col(text_null(SagaInstances::Error))
                    .col(timestamp_with_time_zone_null(SagaInstances::Deadline))
                    .col(timestamp_with_time_zone(SagaInstances::CreatedAt))
                    .col(timestamp_with_time_zone(SagaInstances::UpdatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("saga_instances_shard_state")
                    .table(SagaInstances::Table)
                    .col(SagaInstances::Shard)
                    .col(SagaInstances::State)
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(SagaAttempts::Table)
                    .if_not_exists()
                    .col(string_len(SagaAttempts::SagaId, 128))
                    .col(integer(SagaAttempts::StepIndex))
                    .col(integer(SagaAttempts::Attempt))
                    .col(string_len(SagaAttempts::Step, 64))
                    .col(string_len(SagaAttempts::Outcome, 16))
                    .col(text_null(SagaAttempts::Error))
                    .col(timestamp_with_time_zone(SagaAttempts::StartedAt))
                    .col(timestamp_with_time_zone(SagaAttempts::FinishedAt))
                    .primary_key(
                        Index::create()
                            .col(SagaAttempts::SagaId)
                            .col(SagaAttempts::StepIndex)
                            .col(SagaAttempts::Attempt),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(SagaOutbox::Table)
                    .if_not_exists()
                    .col(big_integer(SagaOutbox::Seq).auto_increment().primary_key())
                    .col(string_len(SagaOutbox::Destination, 128))
                    .col(string_len(SagaOutbox::Key, 128))
                    .col(text(SagaOutbox::Payload))
                    .col(timestamp_with_time_zone(SagaOutbox::CreatedAt))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for t in [
            SagaOutbox::Table.into_iden(),
            SagaAttempts::Table.into_iden(),
            SagaInstances::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(t).to_owned())
                .await?;
        }
        Ok(())
    }
}
