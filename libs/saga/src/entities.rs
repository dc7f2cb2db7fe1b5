//! The journal's tables: saga instances, every step attempt, the transactional outbox and the
//! shard leases.

pub mod instance {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "saga_instances")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub kind: String,
        /// Which partition (or other shard) the saga belongs to; owners resume only their own.
        pub shard: i32,
        /// `running`, `completed`, `failed`, `cancelled`, or a state the application sets later.
        pub state: String,
        /// The saga's input (JSON).
        #[sea_orm(column_type = "Text")]
        pub input: String,
        /// Outputs of the succeeded steps, by step name (JSON object).
        #[sea_orm(column_type = "Text")]
        pub outputs: String,
        /// Index of the next step to run.
        pub next_step: i32,
        /// Increases with every change; lifecycle events carry it.
        pub version: i64,
        pub error: Option<String>,
        pub deadline: Option<ChronoDateTimeUtc>,
        pub created_at: ChronoDateTimeUtc,
        pub updated_at: ChronoDateTimeUtc,
        /// A parked saga's wake-up time (Unix ms): a durable timer.
        pub wake_at_ms: Option<i64>,
        /// Signals recorded but not yet applied (JSON array).
        #[sea_orm(column_type = "Text")]
        pub signals: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod attempt {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "saga_attempts")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub saga_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub step_index: i32,
        #[sea_orm(primary_key, auto_increment = false)]
        pub attempt: i32,
        pub step: String,
        /// `succeeded`, `transient` or `permanent`.
        pub outcome: String,
        pub error: Option<String>,
        pub started_at: ChronoDateTimeUtc,
        pub finished_at: ChronoDateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod outbox {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "saga_outbox")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub seq: i64,
        /// Where the relay sends it (a log or queue name the application understands).
        /// The shard whose owner relays it.
        pub shard: i32,
        pub destination: String,
        pub key: String,
        #[sea_orm(column_type = "Text")]
        pub payload: String,
        pub created_at: ChronoDateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod shard {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "saga_shards")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub shard: i32,
        pub owner: String,
        /// Fencing token: grows every time the lease changes hands.
        pub epoch: i64,
        pub expires_at_ms: i64,
        /// The first position not yet durably recorded: (offset, index).
        pub checkpoint_offset: i64,
        pub checkpoint_index: i32,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
