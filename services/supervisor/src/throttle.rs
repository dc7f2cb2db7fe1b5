//! Growing delays after failed dashboard logins, per user name and per client address.
//!
//! The counters live in the database, not in memory: every Supervisor replica on the same
//! database sees the same failures, so a second replica gives an attacker no second budget of
//! guesses. (An in-memory limiter such as `governor` would be per process; the only arithmetic
//! left here is the doubling delay.) A few failures are free (typos); after that each failure
//! doubles the wait before the next attempt is even checked, up to a ceiling. Failures are
//! forgotten after a quiet period, and a successful login forgets its user name's failures (not
//! its address's: an attacker with one valid account must not be able to reset its address
//! between guesses at other accounts).

use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, Condition, DatabaseConnection, DbErr, EntityTrait, QueryFilter,
};
use serde::Deserialize;

/// Login throttling and the bound on concurrent password checks
/// (`APP_SUPERVISOR__LOGIN__<FIELD>`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct LoginSettings {
    /// Failed logins per user name and per client address allowed before delays start.
    pub free_failures: u32,
    /// Delay after the first failure beyond the free ones; each further failure doubles it.
    pub first_delay_ms: u64,
    /// The delay never grows beyond this.
    pub max_delay_secs: u64,
    /// Failures older than this are forgotten.
    pub forget_after_secs: u64,
    /// Password checks (argon2) running at once. Each holds the hash's memory (19 MiB with the
    /// default parameters) and a core for tens of milliseconds; attempts beyond this get `503`
    /// at once instead of queueing, so a flood of logins cannot exhaust memory.
    pub verify_concurrency: usize,
    /// Header in which the trusted proxy in front (the Ingress) puts the client address, e.g.
    /// `x-forwarded-for`; its rightmost entry is used, the one that proxy appended (entries to
    /// its left come from the client and could be forged). Unset: the TCP peer address.
    pub client_address_header: Option<String>,
}

impl Default for LoginSettings {
    fn default() -> Self {
        Self {
            free_failures: 3,
            first_delay_ms: 1000,
            max_delay_secs: 900,
            forget_after_secs: 3600,
            verify_concurrency: 2,
            client_address_header: None,
        }
    }
}

impl LoginSettings {
    /// The wait imposed after `failures` failures in a row.
    pub fn delay(&self, failures: u32) -> Duration {
        let Some(beyond) = failures.checked_sub(self.free_failures.saturating_add(1)) else {
            return Duration::ZERO;
        };
        let max = Duration::from_secs(self.max_delay_secs);
        let first = Duration::from_millis(self.first_delay_ms).min(max);
        // 2^beyond without overflow: past 2^31 the ceiling has long been reached.
        first
            .checked_mul(1u32.checked_shl(beyond).unwrap_or(u32::MAX))
            .map_or(max, |d| d.min(max))
    }
}

mod failure {
    use sea_orm::entity::prelude::*;

    /// Failed logins of one key (`user:<name>` or `address:<ip>`) since the last quiet period.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "login_failures")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub key: String,
        pub failures: i32,
        pub last_failure_at: ChronoDateTimeUtc,
        /// No attempt of this key is checked before this time.
        pub blocked_until: Option<ChronoDateTimeUtc>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// What a login attempt is counted against.
#[derive(Debug, Clone)]
pub struct Keys {
    pub user: String,
    pub address: String,
}

impl Keys {
    pub fn new(user: &str, address: &str) -> Self {
        // User names are case-insensitive here so `Olivia` and `olivia` share one budget; both
        // are bounded (the column holds 200 characters) without letting a long name bypass it.
        let user: String = user.trim().to_lowercase().chars().take(128).collect();
        let address: String = address.chars().take(64).collect();
        Self {
            user: format!("user:{user}"),
            address: format!("address:{address}"),
        }
    }

    fn both(&self) -> [String; 2] {
        [self.user.clone(), self.address.clone()]
    }
}

fn seconds_until(until: DateTime<Utc>, now: DateTime<Utc>) -> u64 {
    let ms = (until - now).num_milliseconds().max(0);
    // Round up: a client told 0 would retry at once and be refused again.
    u64::try_from(ms).unwrap_or(0).div_ceil(1000).max(1)
}

/// Whole seconds to wait before `keys` may try again, if they must wait.
pub async fn wait(db: &DatabaseConnection, keys: &Keys) -> Result<Option<u64>, DbErr> {
    let now = service_kit::now();
    let blocked = failure::Entity::find()
        .filter(failure::Column::Key.is_in(keys.both()))
        .filter(failure::Column::BlockedUntil.gt(now))
        .all(db)
        .await?;
    Ok(blocked
        .into_iter()
        .filter_map(|f| f.blocked_until)
        .max()
        .map(|until| seconds_until(until, now)))
}

/// Counts a failed login against both keys; the wait it imposes now (seconds), if any.
pub async fn failed(
    db: &DatabaseConnection,
    settings: &LoginSettings,
    keys: &Keys,
) -> Result<Option<u64>, DbErr> {
    let now = service_kit::now();
    let forget = chrono::Duration::seconds(i64::try_from(settings.forget_after_secs).unwrap_or(0));
    // Old failures are forgotten first, so the increment below starts again from one.
    failure::Entity::delete_many()
        .filter(failure::Column::Key.is_in(keys.both()))
        .filter(failure::Column::LastFailureAt.lt(now - forget))
        .exec(db)
        .await?;
    // One atomic increment per key, so concurrent failures on several replicas all count.
    failure::Entity::insert_many(keys.both().map(|key| failure::ActiveModel {
        key: Set(key),
        failures: Set(1),
        last_failure_at: Set(now),
        blocked_until: Set(None),
    }))
    .on_conflict(
        OnConflict::column(failure::Column::Key)
            .value(
                failure::Column::Failures,
                Expr::col((failure::Entity, failure::Column::Failures)).add(1),
            )
            .update_column(failure::Column::LastFailureAt)
            .to_owned(),
    )
    .exec_without_returning(db)
    .await?;
    let counted = failure::Entity::find()
        .filter(failure::Column::Key.is_in(keys.both()))
        .all(db)
        .await?;
    let mut longest = None;
    for f in counted {
        let delay = settings.delay(u32::try_from(f.failures).unwrap_or(u32::MAX));
        if delay.is_zero() {
            continue;
        }
        let until = now
            + chrono::Duration::from_std(delay).unwrap_or_else(|_| chrono::Duration::seconds(1));
        // Never shortens a wait another replica set meanwhile.
        failure::Entity::update_many()
            .col_expr(failure::Column::BlockedUntil, Expr::value(until))
            .filter(failure::Column::Key.eq(f.key.as_str()))
            .filter(
                Condition::any()
                    .add(failure::Column::BlockedUntil.is_null())
                    .add(failure::Column::BlockedUntil.lt(until)),
            )
            .exec(db)
            .await?;
        longest = longest.max(Some(seconds_until(until, now)));
    }
    Ok(longest)
}

/// A successful login forgets its user name's failures; stale rows of anyone go too.
pub async fn succeeded(
    db: &DatabaseConnection,
    settings: &LoginSettings,
    keys: &Keys,
) -> Result<(), DbErr> {
    let now = service_kit::now();
    let forget = chrono::Duration::seconds(i64::try_from(settings.forget_after_secs).unwrap_or(0));
    failure::Entity::delete_many()
        .filter(
            Condition::any()
                .add(failure::Column::Key.eq(keys.user.as_str()))
                .add(
                    Condition::all()
                        .add(failure::Column::LastFailureAt.lt(now - forget))
                        .add(
                            Condition::any()
                                .add(failure::Column::BlockedUntil.is_null())
                                .add(failure::Column::BlockedUntil.lt(now)),
                        ),
                ),
        )
        .exec(db)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_after_the_free_failures_and_stop_at_the_ceiling() {
        let s = LoginSettings {
            free_failures: 3,
            first_delay_ms: 1000,
            max_delay_secs: 60,
            ..LoginSettings::default()
        };
        let secs: Vec<u64> = (0..12).map(|n| s.delay(n).as_secs()).collect();
        assert_eq!(secs, [0, 0, 0, 0, 1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(s.delay(u32::MAX), Duration::from_secs(60));
    }

    #[test]
    fn waits_round_up_to_whole_seconds() {
        let now = Utc::now();
        assert_eq!(
            seconds_until(now + chrono::Duration::milliseconds(10), now),
            1
        );
        assert_eq!(
            seconds_until(now + chrono::Duration::milliseconds(2001), now),
            3
        );
        assert_eq!(seconds_until(now, now), 1);
    }

    #[test]
    fn keys_are_bounded_and_case_insensitive() {
        let k = Keys::new(" Olivia ", "203.0.113.7");
        assert_eq!(k.user, "user:olivia");
        assert_eq!(k.address, "address:203.0.113.7");
        assert!(Keys::new(&"x".repeat(10_000), "a").user.len() <= 200);
    }
}
