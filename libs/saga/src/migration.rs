//! The journal's schema, for inclusion in the owning service's migrator.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{
    big_integer, integer, string_len, text, text_null, timestamp_with_time_zone,
    timestamp_with_time_zone_null,
};

/// The journal migrations, in order. Never edit one that has shipped; add a new one.
pub fn migrations() -> Vec<Box<dyn MigrationTrait>> {
    vec![
        Box::new(CreateJournal),
        Box::new(FencedJournal),
        Box::new(RoomForUpdates),
    ]
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

/// Durable timers and signals on the instance, the outbox row's shard (its owner relays it), and
/// the shard leases whose epoch fences every write.
struct FencedJournal;

impl MigrationName for FencedJournal {
    fn name(&self) -> &str {
        "m20261205_100001_fenced_journal"
    }
}

#[derive(DeriveIden)]
enum SagaShards {
    Table,
    Shard,
    Owner,
    Epoch,
    ExpiresAtMs,
    CheckpointOffset,
    CheckpointIndex,
}

#[derive(DeriveIden)]
enum Added {
    WakeAtMs,
    Signals,
    Shard,
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for FencedJournal {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(SagaInstances::Table)
                    .add_column(ColumnDef::new(Added::WakeAtMs).big_integer().null())
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(SagaInstances::Table)
                    .add_column(
                        ColumnDef::new(Added::Signals)
                            .text()
                            .not_null()
                            .default("[]"),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("saga_instances_shard_wake")
                    .table(SagaInstances::Table)
                    .col(SagaInstances::Shard)
                    .col(Added::WakeAtMs)
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(SagaOutbox::Table)
                    .add_column(
                        ColumnDef::new(Added::Shard)
                            .integer()
                            .not_null()
                            .default(-1),
                    )
                    .to_owned(),
            )
            .await?;
        // Rows written before this migration go to the owner of their saga's shard.
        manager
            .get_connection()
            .execute_unprepared(
                "UPDATE saga_outbox SET shard = COALESCE((SELECT i.shard FROM saga_instances i \
                 WHERE i.id = saga_outbox.key), 0) WHERE shard = -1",
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("saga_outbox_shard_seq")
                    .table(SagaOutbox::Table)
                    .col(Added::Shard)
                    .col(SagaOutbox::Seq)
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(SagaShards::Table)
                    .if_not_exists()
                    .col(integer(SagaShards::Shard).primary_key())
                    .col(string_len(SagaShards::Owner, 128))
                    .col(big_integer(SagaShards::Epoch))
                    .col(big_integer(SagaShards::ExpiresAtMs))
                    .col(big_integer(SagaShards::CheckpointOffset))
                    .col(integer(SagaShards::CheckpointIndex))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(SagaShards::Table).to_owned())
            .await?;
        manager
            .drop_index(
                Index::drop()
                    .name("saga_outbox_shard_seq")
                    .table(SagaOutbox::Table)
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(SagaOutbox::Table)
                    .drop_column(Added::Shard)
                    .to_owned(),
            )
            .await?;
        manager
            .drop_index(
                Index::drop()
                    .name("saga_instances_shard_wake")
                    .table(SagaInstances::Table)
                    .to_owned(),
            )
            .await?;
        for c in [Added::Signals, Added::WakeAtMs] {
            manager
                .alter_table(
                    Table::alter()
                        .table(SagaInstances::Table)
                        .drop_column(c)
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }
}

/// PostgreSQL: room on each page of `saga_instances` for the versions of its rows. A saga's row is
/// written once and then updated at every step (three times for a common booking); with full
/// pages (the default fillfactor of 100), almost none of those updates could stay on the row's
/// page, so each one put a new entry in every index of the table (measured in `make bench-e2e`:
/// 12 % of the updates were HOT). At half fill, a row's updates fit beside it and leave the
/// indexes alone, except the one that changes its state. The outbox, whose rows live for
/// milliseconds, is vacuumed after every 10,000 dead rows instead of a fifth of the table, so its
/// index does not fill with entries of relayed rows between vacuums. SQLite: nothing to do.
struct RoomForUpdates;

impl MigrationName for RoomForUpdates {
    fn name(&self) -> &str {
        "m20261206_100001_room_for_updates"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for RoomForUpdates {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() == sea_orm::DbBackend::Postgres {
            manager
                .get_connection()
                .execute_unprepared(
                    "ALTER TABLE saga_instances SET (fillfactor = 50);
                     ALTER TABLE saga_outbox SET (autovacuum_vacuum_scale_factor = 0,
                         autovacuum_vacuum_threshold = 10000);",
                )
                .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() == sea_orm::DbBackend::Postgres {
            manager
                .get_connection()
                .execute_unprepared(
                    "ALTER TABLE saga_instances RESET (fillfactor);
                     ALTER TABLE saga_outbox RESET (autovacuum_vacuum_scale_factor,
                         autovacuum_vacuum_threshold);",
                )
                .await?;
        }
        Ok(())
    }
}
