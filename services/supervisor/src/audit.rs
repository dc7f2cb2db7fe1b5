//! The audit log: who did what, why, when and how it went — operator actions (written before the
//! action takes effect, outcome `pending` until it is known), actions refused, logins, failed
//! logins and logouts.

use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, DatabaseConnection, DbErr, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect,
};

use crate::entities::audit;

/// The outcome of an action whose effect is not known yet (or never became known: the process
/// stopped in between).
pub const PENDING: &str = "pending";

pub struct Entry<'a> {
    pub actor: &'a str,
    pub role: &'a str,
    pub action: &'a str,
    pub target: &'a str,
    pub reason: &'a str,
    pub outcome: &'a str,
}

/// At most `max` characters: the columns are bounded, and what is logged may come from anyone
/// (a user name typed at the login form).
fn bounded(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// Writes an entry; its id, for [`finish`].
pub async fn record(db: &DatabaseConnection, e: Entry<'_>) -> Result<i64, DbErr> {
    tracing::info!(
        actor = e.actor,
        action = e.action,
        target = e.target,
        reason = e.reason,
        outcome = e.outcome,
        "audit"
    );
    let row = audit::Entity::insert(audit::ActiveModel {
        at: Set(service_kit::now()),
        actor: Set(bounded(e.actor, 128)),
        role: Set(bounded(e.role, 32)),
        action: Set(bounded(e.action, 64)),
        target: Set(bounded(e.target, 256)),
        reason: Set(e.reason.to_owned()),
        outcome: Set(e.outcome.to_owned()),
        ..Default::default()
    })
    .exec(db)
    .await?;
    Ok(row.last_insert_id)
}

/// Sets the outcome of the entry [`record`] wrote as [`PENDING`].
pub async fn finish(db: &DatabaseConnection, id: i64, outcome: &str) -> Result<(), DbErr> {
    tracing::info!(id, outcome, "audit outcome");
    audit::Entity::update_many()
        .col_expr(audit::Column::Outcome, Expr::value(outcome.to_owned()))
        .filter(audit::Column::Id.eq(id))
        .exec(db)
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

#[cfg(test)]
mod tests {
    #[test]
    fn fields_are_bounded_by_characters() {
        assert_eq!(super::bounded("ééé", 2), "éé");
        assert_eq!(super::bounded("ab", 64), "ab");
    }
}
