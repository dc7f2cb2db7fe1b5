//! The `carriers`, `carrier_days` and `legs` tables.

/// The contracted carriers, synced from the settings at start. Never deleted: a carrier no longer
/// configured is retired (`active = false`) and keeps the legs that name it.
pub(crate) mod carrier {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "carriers")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub name: String,
        /// `"0,lat,lon"`.
        pub area_center: String,
        pub area_radius_km: f64,
        pub daily_capacity: i32,
        pub max_weight_kg: f64,
        pub speed_kmh: f64,
        pub active: bool,
        pub updated_at: ChronoDateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// How many legs a carrier has taken on one UTC pickup day: the counter that the conditional
/// booking statement raises (never past the carrier's capacity) and a cancel lowers.
pub(crate) mod carrier_day {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "carrier_days")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub carrier_id: String,
        /// `YYYY-MM-DD` (UTC).
        #[sea_orm(primary_key, auto_increment = false)]
        pub day: String,
        pub booked: i32,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// One leg per delivery id. A tombstone (what cancelling an unknown id leaves) has no carrier
/// and no owner, and is never shown.
pub(crate) mod leg {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "legs")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub delivery_id: String,
        pub owner_id: String,
        /// As the request sent it (it is also the leg's `fromLocation`).
        pub pickup_location: String,
        /// As the request sent it.
        pub drop_off_location: String,
        pub pickup_time: ChronoDateTimeUtc,
        /// `Small`, `Medium` or `Large` (Fabrikam spelling).
        pub size: String,
        /// Kilograms.
        pub weight: f64,
        pub handover_within_km: Option<f64>,
        /// `None` only for a tombstone.
        pub carrier_id: Option<String>,
        /// The carrier's name when the leg was booked.
        pub carrier_name: String,
        /// The pickup day whose capacity the leg holds (`YYYY-MM-DD`, UTC).
        pub day: String,
        pub to_location: String,
        pub whole_route: bool,
        pub handover_time: ChronoDateTimeUtc,
        pub distance_km: f64,
        /// `booked` or `cancelled`.
        pub status: String,
        pub created_at: ChronoDateTimeUtc,
        pub updated_at: ChronoDateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
