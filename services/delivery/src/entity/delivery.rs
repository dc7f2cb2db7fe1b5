//! The `deliveries` table. It holds no stage column: the stage is derived from `tracking_events`, so
//! the two can never disagree.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "deliveries")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub owner_id: String,
    pub pickup_location: String,
    pub drop_off_location: String,
    pub pickup_time: ChronoDateTimeUtc,
    pub deadline: String,
    pub expedited: bool,
    /// A `ConfirmationType` spelling (`FingerPrint`, `Picture`, `Voice`, `None`).
    pub confirmation_required: String,
    pub package_id: String,
    pub drone_id: String,
    pub created_at: ChronoDateTimeUtc,
    /// Last change of the delivery's fields or stage.
    pub updated_at: ChronoDateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
