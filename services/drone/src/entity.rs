//! The `drones` and `reservations` tables. Windows are stored as epoch milliseconds so that the
//! overlap rule compares integers on both databases (`int8range` on PostgreSQL).

pub mod drone {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "drones")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        /// `Small`, `Medium` or `Large`.
        pub max_package_size: String,
        /// 1, 2, 3 for Small, Medium, Large: a drone carries packages up to its rank.
        pub size_rank: i32,
        /// False once the drone is no longer in the configured fleet.
        pub active: bool,
        pub created_at: ChronoDateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod reservation {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "reservations")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub delivery_id: String,
        pub drone_id: String,
        /// Window start, epoch milliseconds (inclusive).
        pub window_start_ms: i64,
        /// Window end, epoch milliseconds (exclusive).
        pub window_end_ms: i64,
        /// `active` or `released`.
        pub status: String,
        pub package_id: String,
        pub size: String,
        pub owner_id: Option<String>,
        pub pickup_location: String,
        pub drop_off_location: String,
        pub expedited: bool,
        pub created_at: ChronoDateTimeUtc,
        pub updated_at: ChronoDateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod flight {
    use sea_orm::entity::prelude::*;

    /// A delivery's flight as its drone reported it (one row per delivery).
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "flights")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub delivery_id: String,
        pub drone_id: String,
        /// A `FlightStage` spelling.
        pub stage: String,
        pub last_location: Option<String>,
        pub reports: i64,
        pub started_at: ChronoDateTimeUtc,
        pub updated_at: ChronoDateTimeUtc,
        pub delivered_at: Option<ChronoDateTimeUtc>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
