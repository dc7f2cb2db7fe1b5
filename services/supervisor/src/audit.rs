//! The audit log: every operator action with who, what, why, when and how it went.

use sea_orm::{ActiveValue::Set, DatabaseConnection, DbErr, EntityTrait, QueryOrder, QuerySelect};

use crate::entities::audit;

pub struct Entry<'a> {
    pub actor: &'a str,
    pub role: &'a str,
    pub action: &'a str,
    pub target: &'a str,
    pub reason: &'a str,
    pub outcome: &'a str,
}

pub async fn record(db: &DatabaseConnection, e: Entry<'_>) -> Result<(), DbErr> {
    tracing::info!(
        actor = e.actor,
        action = e.action,
        target = e.target,
        reason = e.reason,
        outcome = e.outcome,
        "operator action"
    );
    audit::Entity::insert(audit::ActiveModel {
        at: Set(service_kit::now()),
        actor: Set(e.actor.to_owned()),
        role: Set(e.role.to_owned()),
        action: Set(e.action.to_owned()),
        target: Set(e.target.to_owned()),
        reason: Set(e.reason.to_owned()),
        outcome: Set(e.outcome.to_owned()),
        ..Default::default()
    })
    .exec_without_returning(db)
    .await
    .map(|_| ())
}

/// The latest entries, newest first.
pub async fn recent(db: &DatabaseConnection, limit: u64) -> Result<Vec<audit::Model>, DbErr> {
    audit::Entity::find()
        .order_by_desc(audit::Column::Id)
        .limit(limit)
        .all(db)
        .await
}
