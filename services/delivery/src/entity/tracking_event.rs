//! The `tracking_events` table: one row per stage change, numbered from 1 per delivery. The primary
//! key `(delivery_id, sequence)` makes two writers that picked the same number collide instead of
//! both succeeding.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "tracking_events")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub delivery_id: String,
    #[sea_orm(primary_key, auto_increment = false)]
    pub sequence: i64,
    /// A `DeliveryStage` spelling.
    pub stage: String,
    pub location: Option<String>,
    pub detail: Option<String>,
    pub at: ChronoDateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
