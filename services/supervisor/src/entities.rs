//! The Supervisor's tables (see `migration`).

pub mod compensation {
    use sea_orm::entity::prelude::*;

    /// One compensation request, keyed by the saga version it was made for: a redelivered or
    /// duplicated request finds its row and has no second effect.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "compensations")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub delivery_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub saga_version: i64,
        pub owner_id: String,
        /// Steps to undo, as requested (JSON array).
        #[sea_orm(column_type = "Text")]
        pub steps: String,
        #[sea_orm(column_type = "Text")]
        pub reason: String,
        /// `compensating`, `compensated`, `failed` or `superseded`.
        pub status: String,
        pub error: Option<String>,
        /// What each undo did (JSON object by step).
        #[sea_orm(column_type = "Text")]
        pub step_results: String,
        /// Times the request was delivered and worked on.
        pub deliveries: i32,
        /// The outcome reached the Scheduler.
        pub reported: bool,
        /// `scheduler`, or the operator who asked.
        pub requested_by: String,
        pub created_at: ChronoDateTimeUtc,
        pub updated_at: ChronoDateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod saga {
    use sea_orm::entity::prelude::*;

    /// The read model: every saga as its `workflow-events` announce it.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "sagas")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub delivery_id: String,
        pub owner_id: String,
        pub state: String,
        pub detail: Option<String>,
        /// Version of the last applied event.
        pub version: i64,
        /// No progress for longer than the configured time while not finished.
        pub stuck: bool,
        /// The client's package id and the reserved drone, as the workflow events announce them.
        pub package_id: Option<String>,
        pub drone_id: Option<String>,
        /// Unused: set when the ids were looked up at the Scheduler, which is no longer done.
        /// Kept rather than dropped by a migration of its own.
        pub enriched: bool,
        pub first_seen_at: ChronoDateTimeUtc,
        /// Time of the last applied event.
        pub updated_at: ChronoDateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod checkpoint {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "projection_checkpoints")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub partition: i32,
        pub next_offset: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod audit {
    use sea_orm::entity::prelude::*;

    /// Who did what, why and when, and how it went.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "audit_log")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub at: ChronoDateTimeUtc,
        pub actor: String,
        pub role: String,
        pub action: String,
        pub target: String,
        #[sea_orm(column_type = "Text")]
        pub reason: String,
        #[sea_orm(column_type = "Text")]
        pub outcome: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod user {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "users")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub name: String,
        pub role: String,
        /// Argon2id PHC string.
        #[sea_orm(column_type = "Text")]
        pub password_hash: String,
        pub updated_at: ChronoDateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod session {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "sessions")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub user_name: String,
        pub role: String,
        pub csrf: String,
        pub created_at: ChronoDateTimeUtc,
        pub expires_at: ChronoDateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod parked_message {
    use sea_orm::entity::prelude::*;

    /// A parked compensation request, moved out of the broker's parked queue (where looking at
    /// it would be a delivery) into the Supervisor's keeping. Keyed by the parking, so a message
    /// handed out again after a crash finds its row.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "parked_messages")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub park_id: String,
        /// The event id; a redrive republishes under it.
        pub message_id: String,
        /// The event's key, when the message decodes.
        pub delivery_id: Option<String>,
        /// The bytes as published, also when they do not decode.
        #[sea_orm(column_type = "Blob")]
        pub payload: Vec<u8>,
        #[sea_orm(column_type = "Text")]
        pub reason: String,
        pub delivery_count: i32,
        pub parked_at: ChronoDateTimeUtc,
        pub stored_at: ChronoDateTimeUtc,
        /// Set once a redrive republished it: no longer waiting for a person.
        pub redriven_at: Option<ChronoDateTimeUtc>,
        pub redriven_by: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
