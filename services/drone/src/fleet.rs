//! The fleet: seeding from settings, and the cache of active drones reservations choose from.

use std::sync::Arc;

use contracts::PackageSize;
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, DatabaseConnection, DbErr, EntityTrait, QueryFilter, QueryOrder,
};

use crate::entity::drone;
use crate::FleetSettings;

pub(crate) fn size_rank(size: PackageSize) -> i32 {
    match size {
        PackageSize::Small => 1,
        PackageSize::Medium => 2,
        PackageSize::Large => 3,
    }
}

/// Inserts the configured drones (idempotently), reactivates them, and retires the rest.
pub(crate) async fn seed(db: &DatabaseConnection, fleet: &FleetSettings) -> Result<(), DbErr> {
    let sizes = std::iter::repeat_n(PackageSize::Small, fleet.small as usize)
        .chain(std::iter::repeat_n(
            PackageSize::Medium,
            fleet.medium as usize,
        ))
        .chain(std::iter::repeat_n(
            PackageSize::Large,
            fleet.large as usize,
        ));
    let now = service_kit::now();
    let mut ids = Vec::new();
    let models: Vec<drone::ActiveModel> = sizes
        .enumerate()
        .map(|(i, size)| {
            let id = format!("drone-{:03}", i + 1);
            ids.push(id.clone());
            drone::ActiveModel {
                id: Set(id),
                max_package_size: Set(size.as_str().to_owned()),
                size_rank: Set(size_rank(size)),
                active: Set(true),
                created_at: Set(now),
            }
        })
        .collect();
    for chunk in models.chunks(500) {
        drone::Entity::insert_many(chunk.to_vec())
            .on_conflict(
                OnConflict::column(drone::Column::Id)
                    .update_columns([
                        drone::Column::MaxPackageSize,
                        drone::Column::SizeRank,
                        drone::Column::Active,
                    ])
                    .to_owned(),
            )
            .exec_without_returning(db)
            .await?;
    }
    drone::Entity::update_many()
        .col_expr(drone::Column::Active, Expr::value(false))
        .filter(drone::Column::Id.is_not_in(ids.clone()))
        .exec(db)
        .await?;
    tracing::info!(drones = ids.len(), "fleet seeded");
    Ok(())
}

/// Active drones as `(size_rank, id)`, smallest first, read from the database at most every
/// [`DroneCache::REFRESH`]. The fleet only changes when a Drone instance starts with another fleet
/// setting, so a reservation does not need to read the `drones` table: it takes its candidates
/// from here. A drone retired by another instance may be offered until the next refresh, as it
/// could be by a reservation that read the table just before the retirement.
pub(crate) struct DroneCache {
    cached: std::sync::Mutex<Option<(std::time::Instant, Drones)>>,
}

/// `(size_rank, id)` of the active drones, smallest first.
type Drones = Arc<Vec<(i32, String)>>;

impl DroneCache {
    const REFRESH: std::time::Duration = std::time::Duration::from_secs(5);

    pub(crate) fn new() -> Self {
        Self {
            cached: std::sync::Mutex::new(None),
        }
    }

    async fn drones(&self, db: &DatabaseConnection) -> Result<Drones, DbErr> {
        if let Some((at, drones)) = &*self.lock() {
            if at.elapsed() < Self::REFRESH {
                return Ok(drones.clone());
            }
        }
        let drones: Drones = Arc::new(
            drone::Entity::find()
                .filter(drone::Column::Active.eq(true))
                .order_by_asc(drone::Column::SizeRank)
                .order_by_asc(drone::Column::Id)
                .all(db)
                .await?
                .into_iter()
                .map(|d| (d.size_rank, d.id))
                .collect(),
        );
        *self.lock() = Some((std::time::Instant::now(), drones.clone()));
        Ok(drones)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(std::time::Instant, Drones)>> {
        self.cached
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The drones that can carry `rank`, in the order a reservation should try them: `preferred`
    /// first, then the smallest fitting drones, so large drones stay free for large packages;
    /// within a size rotated by the delivery id, so concurrent requests spread over the fleet
    /// instead of all racing for the first drone.
    pub(crate) async fn candidates(
        &self,
        db: &DatabaseConnection,
        delivery_id: &str,
        rank: i32,
        preferred: Option<&str>,
    ) -> Result<Vec<String>, DbErr> {
        let drones = self.drones(db).await?;
        let spread = fnv(delivery_id);
        let mut out = Vec::with_capacity(drones.len());
        if let Some(p) = preferred {
            if drones.iter().any(|(r, id)| *r >= rank && id == p) {
                out.push(p.to_owned());
            }
        }
        let fitting = &drones[drones.partition_point(|(r, _)| *r < rank)..];
        for group in fitting.chunk_by(|a, b| a.0 == b.0) {
            let n = group.len();
            let first = (spread % n as u64) as usize;
            out.extend(
                group[first..]
                    .iter()
                    .chain(&group[..first])
                    .map(|(_, id)| id)
                    .filter(|id| Some(id.as_str()) != preferred)
                    .cloned(),
            );
        }
        Ok(out)
    }
}

/// Reserves a drone for `delivery_id`, or returns the reservation it already has.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
