//! The `packages` table.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "packages")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub owner_id: String,
    /// The client's own package id: data, never a key.
    pub external_id: String,
    /// `Small`, `Medium` or `Large` (Fabrikam spelling).
    pub size: String,
    /// Kilograms.
    pub weight: f64,
    pub tag: Option<String>,
    /// `registered` or `cancelled`.
    pub status: String,
    pub created_at: ChronoDateTimeUtc,
    pub updated_at: ChronoDateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
