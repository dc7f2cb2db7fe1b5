//! Which partitions a replica owns, and the lease that makes that ownership exclusive.
//!
//! Pod `scheduler-<i>` of `R` replicas owns partitions `p` with `p % R == i`. Ownership is then
//! taken as a lease row in the scheduler's database: one owner at a time, a fencing token that
//! grows with every change of owner, and the partition's checkpoint kept in the same row, so a
//! checkpoint write by an owner that lost its lease matches no row and tells it to stop.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{ActiveValue::Set, ColumnTrait, DatabaseConnection, DbErr, EntityTrait, QueryFilter};

/// The ordinal of a StatefulSet pod from its hostname (`scheduler-3` → 3).
pub fn ordinal_from_hostname(hostname: &str) -> Option<u32> {
    hostname.rsplit_once('-')?.1.parse().ok()
}

/// The partitions replica `ordinal` of `replicas` owns.
pub fn owned_partitions(ordinal: u32, replicas: u32, partitions: u32) -> Vec<u32> {
    let replicas = replicas.max(1);
    (0..partitions)
        .filter(|p| p % replicas == ordinal)
        .collect()
}

pub mod lease {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "partition_leases")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub partition: i32,
        pub owner: String,
        /// Fencing token: grows every time the lease changes hands.
        pub token: i64,
        pub expires_at: ChronoDateTimeUtc,
        /// Where reading resumes: every record before this offset is durably recorded.
        pub next_offset: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// A held lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    pub partition: u32,
    pub token: i64,
    pub next_offset: u64,
}

/// Takes the lease of `partition` if it is free, expired, or already `owner`'s (a restarted pod
/// keeps its name). `None` while another live owner holds it.
pub async fn acquire(
    db: &DatabaseConnection,
    partition: u32,
    owner: &str,
    now: DateTime<Utc>,
    ttl: chrono::Duration,
) -> Result<Option<Held>, DbErr> {
    let p = i32::try_from(partition).unwrap_or(i32::MAX);
    lease::Entity::insert(lease::ActiveModel {
        partition: Set(p),
        owner: Set(owner.to_owned()),
        token: Set(0),
        expires_at: Set(now - chrono::Duration::seconds(1)),
        next_offset: Set(0),
    })
    .on_conflict(
        OnConflict::column(lease::Column::Partition)
            .do_nothing()
            .to_owned(),
    )
    .exec_without_returning(db)
    .await?;
    let taken = lease::Entity::update_many()
        .col_expr(lease::Column::Owner, Expr::value(owner.to_owned()))
        .col_expr(lease::Column::Token, Expr::col(lease::Column::Token).add(1))
        .col_expr(lease::Column::ExpiresAt, Expr::value(now + ttl))
        .filter(lease::Column::Partition.eq(p))
        .filter(
            lease::Column::ExpiresAt
                .lt(now)
                .or(lease::Column::Owner.eq(owner)),
        )
        .exec(db)
        .await?;
    if taken.rows_affected != 1 {
        return Ok(None);
    }
    let row = lease::Entity::find_by_id(p).one(db).await?;
    Ok(row.filter(|r| r.owner == owner).map(|r| Held {
        partition,
        token: r.token,
        next_offset: u64::try_from(r.next_offset).unwrap_or(0),
    }))
}

/// Extends the lease; false when it is no longer ours (another owner took it).
pub async fn renew(
    db: &DatabaseConnection,
    held: &Held,
    now: DateTime<Utc>,
    ttl: chrono::Duration,
) -> Result<bool, DbErr> {
    let r = lease::Entity::update_many()
        .col_expr(lease::Column::ExpiresAt, Expr::value(now + ttl))
        .filter(lease::Column::Partition.eq(i32::try_from(held.partition).unwrap_or(i32::MAX)))
        .filter(lease::Column::Token.eq(held.token))
        .exec(db)
        .await?;
    Ok(r.rows_affected == 1)
}

/// Moves the checkpoint, fenced by the token; false when the lease was lost.
pub async fn checkpoint(
    db: &DatabaseConnection,
    held: &Held,
    next_offset: u64,
) -> Result<bool, DbErr> {
    let r = lease::Entity::update_many()
        .col_expr(
            lease::Column::NextOffset,
            Expr::value(i64::try_from(next_offset).unwrap_or(i64::MAX)),
        )
        .filter(lease::Column::Partition.eq(i32::try_from(held.partition).unwrap_or(i32::MAX)))
        .filter(lease::Column::Token.eq(held.token))
        .exec(db)
        .await?;
    Ok(r.rows_affected == 1)
}

/// Gives the lease up at shutdown so a successor need not wait for it to expire.
pub async fn release(
    db: &DatabaseConnection,
    held: &Held,
    now: DateTime<Utc>,
) -> Result<(), DbErr> {
    lease::Entity::update_many()
        .col_expr(
            lease::Column::ExpiresAt,
            Expr::value(now - chrono::Duration::seconds(1)),
        )
        .filter(lease::Column::Partition.eq(i32::try_from(held.partition).unwrap_or(i32::MAX)))
        .filter(lease::Column::Token.eq(held.token))
        .exec(db)
        .await?;
    Ok(())
}

/// Every lease row (status API, tests).
pub async fn all(db: &DatabaseConnection) -> Result<Vec<lease::Model>, DbErr> {
    lease::Entity::find().all(db).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinals_and_partitions() {
        assert_eq!(ordinal_from_hostname("scheduler-0"), Some(0));
        assert_eq!(ordinal_from_hostname("my-scheduler-12"), Some(12));
        assert_eq!(ordinal_from_hostname("scheduler"), None);
        assert_eq!(owned_partitions(1, 3, 8), vec![1, 4, 7]);
        assert_eq!(owned_partitions(0, 1, 4), vec![0, 1, 2, 3]);
        // Every partition has exactly one owner.
        let mut all: Vec<u32> = (0..3).flat_map(|i| owned_partitions(i, 3, 8)).collect();
        all.sort_unstable();
        assert_eq!(all, (0..8).collect::<Vec<_>>());
    }
}
