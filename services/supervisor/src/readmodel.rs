//! The Supervisor's read model of every saga, fed by `workflow-events`: one row per saga with its
//! last announced state, applied by version (a replayed or late event never moves a saga back).
//! Beside it: rates of recent changes for the dashboard, stuck detection (a saga that is not
//! finished and has not moved for longer than the configured time). The package and drone ids
//! the events carry are kept, so operators can search by them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use contracts::{WorkflowStateChanged, WORKFLOW_STATE_CHANGED};
use messaging::{PartitionedLog, StartAt};
use sea_orm::sea_query::{Alias, Expr, OnConflict};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, DatabaseConnection, DbErr, EntityTrait, PaginatorTrait,
    QueryFilter, QueryOrder, QuerySelect,
};
use tokio::sync::watch;

use crate::entities::{checkpoint, saga};
use crate::metrics::Metrics;

/// States in which a saga is expected to move on by itself.
pub const UNFINISHED: [&str; 3] = ["accepted", "scheduling", "compensating"];

/// Changes per second over the last few seconds, from event times.
#[derive(Default)]
pub struct Rates {
    /// Per second (unix time): sagas started, scheduled, failed.
    buckets: Mutex<BTreeMap<i64, [u64; 3]>>,
}

/// Seconds the rates average over.
const RATE_WINDOW: i64 = 10;

impl Rates {
    fn record(&self, state: &str, at: DateTime<Utc>) {
        let i = match state {
            "scheduling" => 0,
            "scheduled" => 1,
            "failed" => 2,
            _ => return,
        };
        let now = Utc::now().timestamp();
        let second = at.timestamp();
        // Replays of old events (a restart from the first offset) are not current activity.
        if second <= now - RATE_WINDOW * 2 || second > now + 5 {
            return;
        }
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        b.entry(second).or_default()[i] += 1;
        let keep_from = now - RATE_WINDOW * 2;
        while b.first_key_value().is_some_and(|(k, _)| *k < keep_from) {
            b.pop_first();
        }
    }

    /// (started/s, scheduled/s, failed/s) over the last complete seconds.
    pub fn per_second(&self) -> [f64; 3] {
        let now = Utc::now().timestamp();
        let b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let mut sum = [0u64; 3];
        for (_, v) in b.range(now - RATE_WINDOW..now) {
            for (s, x) in sum.iter_mut().zip(v) {
                *s += x;
            }
        }
        sum.map(|s| s as f64 / RATE_WINDOW as f64)
    }
}

/// Applies a workflow event unless the row already has this version or a later one. A newer
/// event clears the stuck flag: the saga moved. The package and drone ids are set when the event
/// carries them and kept when it does not (most events do not repeat them).
pub async fn apply(db: &DatabaseConnection, e: &WorkflowStateChanged) -> Result<(), DbErr> {
    use saga::Column as C;
    let row = saga::ActiveModel {
        delivery_id: Set(e.delivery_id.to_string()),
        owner_id: Set(e.owner_id.clone()),
        state: Set(e.state.as_str().to_owned()),
        detail: Set(e.detail.clone()),
        version: Set(e.version),
        stuck: Set(false),
        package_id: Set(e.package_id.clone()),
        drone_id: Set(e.drone_id.clone()),
        enriched: Set(false),
        first_seen_at: Set(e.at),
        updated_at: Set(e.at),
    };
    let mut update = vec![C::State, C::Detail, C::Version, C::Stuck, C::UpdatedAt];
    if e.package_id.is_some() {
        update.push(C::PackageId);
    }
    if e.drone_id.is_some() {
        update.push(C::DroneId);
    }
    saga::Entity::insert(row)
        .on_conflict(
            OnConflict::column(C::DeliveryId)
                .update_columns(update)
                .action_and_where(
                    Expr::col((saga::Entity, C::Version))
                        .lt(Expr::col((Alias::new("excluded"), C::Version))),
                )
                .to_owned(),
        )
        .exec_without_returning(db)
        .await
        .map(|_| ())
}

/// Follows every partition of `workflow-events` from its checkpoint until `stop`.
pub async fn follow(
    db: DatabaseConnection,
    log: Arc<dyn PartitionedLog>,
    rates: Arc<Rates>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut tasks = Vec::new();
    for partition in 0..log.partitions() {
        let start = checkpoint::Entity::find_by_id(i32::try_from(partition)?)
            .one(&db)
            .await?
            .map_or(StartAt::First, |c| {
                StartAt::Offset(u64::try_from(c.next_offset).unwrap_or(0))
            });
        let reader = log.read(partition, start).await?;
        tasks.push(tokio::spawn(project(
            db.clone(),
            partition,
            reader,
            rates.clone(),
            stop.clone(),
        )));
    }
    Ok(tasks)
}

async fn project(
    db: DatabaseConnection,
    partition: u32,
    mut reader: messaging::LogReader,
    rates: Arc<Rates>,
    mut stop: watch::Receiver<bool>,
) {
    let mut unsaved = 0u32;
    let mut last_saved = tokio::time::Instant::now();
    loop {
        let record = tokio::select! {
            _ = stop.changed() => return,
            r = reader.next() => match r { Some(r) => r, None => return },
        };
        match &record.event {
            Ok(e) if e.kind == WORKFLOW_STATE_CHANGED => match e.decode::<WorkflowStateChanged>() {
                Ok(change) => {
                    let mut attempt = 0u32;
                    while let Err(err) = apply(&db, &change).await {
                        attempt += 1;
                        tracing::warn!(error = %err, attempt, "applying a workflow event failed");
                        tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt.min(25))))
                            .await;
                    }
                    rates.record(change.state.as_str(), change.at);
                }
                Err(reason) => {
                    tracing::warn!(partition, reason, "skipping undecodable workflow event")
                }
            },
            Ok(_) => {}
            Err(poison) => {
                tracing::warn!(partition, reason = %poison.reason, "skipping poison record")
            }
        }
        unsaved += 1;
        // Checkpoints only shorten restarts: applying an event again is harmless.
        if unsaved >= 100 || last_saved.elapsed() > Duration::from_secs(1) {
            let row = checkpoint::ActiveModel {
                partition: Set(i32::try_from(partition).unwrap_or(i32::MAX)),
                next_offset: Set(i64::try_from(record.position.offset).unwrap_or(i64::MAX)),
            };
            let saved = checkpoint::Entity::insert(row)
                .on_conflict(
                    OnConflict::column(checkpoint::Column::Partition)
                        .update_column(checkpoint::Column::NextOffset)
                        .to_owned(),
                )
                .exec_without_returning(&db)
                .await;
            if let Err(e) = saved {
                tracing::warn!(error = %e, "saving the projection checkpoint failed");
            }
            unsaved = 0;
            last_saved = tokio::time::Instant::now();
        }
    }
}

/// Flags unfinished sagas without progress for longer than `after`; returns how many are stuck.
pub async fn flag_stuck(db: &DatabaseConnection, after: chrono::Duration) -> Result<u64, DbErr> {
    let before = Utc::now() - after;
    saga::Entity::update_many()
        .col_expr(saga::Column::Stuck, Expr::value(true))
        .filter(saga::Column::State.is_in(UNFINISHED))
        .filter(saga::Column::UpdatedAt.lt(before))
        .filter(saga::Column::Stuck.eq(false))
        .exec(db)
        .await?;
    saga::Entity::find()
        .filter(saga::Column::Stuck.eq(true))
        .filter(saga::Column::State.is_in(UNFINISHED))
        .count(db)
        .await
}

/// Sagas by state.
pub async fn counts(db: &DatabaseConnection) -> Result<BTreeMap<String, i64>, DbErr> {
    let rows: Vec<(String, i64)> = saga::Entity::find()
        .select_only()
        .column(saga::Column::State)
        .column_as(saga::Column::DeliveryId.count(), "n")
        .group_by(saga::Column::State)
        .into_tuple()
        .all(db)
        .await?;
    Ok(rows.into_iter().collect())
}

/// Periodic upkeep: stuck flags and the saga gauges.
pub async fn watch_stuck(
    db: DatabaseConnection,
    metrics: Arc<Metrics>,
    after: chrono::Duration,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        match flag_stuck(&db, after).await {
            Ok(n) => metrics.stuck.set(i64::try_from(n).unwrap_or(i64::MAX)),
            Err(e) => tracing::warn!(error = %e, "stuck detection failed"),
        }
        if let Ok(c) = counts(&db).await {
            for state in contracts::RequestState::ALL {
                metrics
                    .sagas
                    .with_label_values(&[state.as_str()])
                    .set(c.get(state.as_str()).copied().unwrap_or(0));
            }
        }
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}

/// Search filters for the saga list.
#[derive(Debug, Default, Clone)]
pub struct Search {
    pub state: Option<String>,
    /// A delivery, account, package or drone id (exact).
    pub q: Option<String>,
    pub stuck: bool,
    pub limit: u64,
}

pub async fn search(db: &DatabaseConnection, s: &Search) -> Result<Vec<saga::Model>, DbErr> {
    let mut select = saga::Entity::find();
    if let Some(state) = &s.state {
        select = select.filter(saga::Column::State.eq(state.clone()));
    }
    if let Some(q) = &s.q {
        select = select.filter(
            saga::Column::DeliveryId
                .eq(q.clone())
                .or(saga::Column::OwnerId.eq(q.clone()))
                .or(saga::Column::PackageId.eq(q.clone()))
                .or(saga::Column::DroneId.eq(q.clone())),
        );
    }
    if s.stuck {
        select = select
            .filter(saga::Column::Stuck.eq(true))
            .filter(saga::Column::State.is_in(UNFINISHED));
    }
    select
        .order_by_desc(saga::Column::UpdatedAt)
        .limit(s.limit.clamp(1, 500))
        .all(db)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use contracts::RequestState;
    use sea_orm_migration::MigratorTrait;

    fn change(version: i64, package: Option<&str>, drone: Option<&str>) -> WorkflowStateChanged {
        WorkflowStateChanged {
            delivery_id: uuid::Uuid::nil(),
            owner_id: "o".into(),
            state: RequestState::Scheduling,
            version,
            detail: None,
            at: Utc::now(),
            package_id: package.map(str::to_owned),
            drone_id: drone.map(str::to_owned),
            pickup_window: None,
            pickup_location: None,
            drop_off_location: None,
            pickup_time: None,
            revision: None,
            carrier_leg: None,
        }
    }

    #[tokio::test]
    async fn ids_come_from_the_events_and_are_never_cleared() -> anyhow::Result<()> {
        let db = sea_orm::Database::connect("sqlite::memory:").await?;
        crate::Migrator::up(&db, None).await?;
        let ids = || async {
            let row = saga::Entity::find_by_id(uuid::Uuid::nil().to_string())
                .one(&db)
                .await?;
            anyhow::Ok(row.map(|r| (r.version, r.package_id, r.drone_id)))
        };
        let some = |s: &str| Some(s.to_owned());

        apply(&db, &change(1, None, None)).await?;
        assert_eq!(ids().await?, Some((1, None, None)));
        apply(&db, &change(2, Some("pkg"), None)).await?;
        assert_eq!(ids().await?, Some((2, some("pkg"), None)));
        apply(&db, &change(3, None, Some("drone-1"))).await?;
        assert_eq!(ids().await?, Some((3, some("pkg"), some("drone-1"))));
        apply(&db, &change(4, None, None)).await?;
        assert_eq!(ids().await?, Some((4, some("pkg"), some("drone-1"))));
        // A replayed older event changes nothing, its ids included.
        apply(&db, &change(3, None, Some("drone-2"))).await?;
        assert_eq!(ids().await?, Some((4, some("pkg"), some("drone-1"))));
        apply(&db, &change(5, None, Some("drone-2"))).await?;
        assert_eq!(ids().await?, Some((5, some("pkg"), some("drone-2"))));
        Ok(())
    }

    #[test]
    fn rates_count_recent_events_only() {
        let r = Rates::default();
        let now = Utc::now();
        r.record("scheduled", now - chrono::Duration::seconds(2));
        r.record("scheduled", now - chrono::Duration::seconds(3));
        r.record("scheduling", now - chrono::Duration::seconds(1));
        r.record("scheduled", now - chrono::Duration::hours(1));
        r.record("compensated", now - chrono::Duration::seconds(1));
        let [started, scheduled, failed] = r.per_second();
        assert!((scheduled - 0.2).abs() < 1e-9, "{scheduled}");
        assert!((started - 0.1).abs() < 1e-9, "{started}");
        assert_eq!(failed, 0.0);
    }
}
