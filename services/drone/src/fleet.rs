//! The fleet: seeding from settings and the reservation rules.

use chrono::{DateTime, TimeZone, Utc};
use contracts::{
    DroneReservation, DroneReservationRequest, PackageSize, ReservationStatus, TimeWindow,
};
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, DatabaseConnection, DbErr, EntityTrait, QueryFilter, QueryOrder,
};
use service_kit::db::{classify, DbErrorKind};
use service_kit::{ApiError, ApiResult};

use crate::entity::{drone, reservation};
use crate::{FleetSettings, ReservationSettings};

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

pub(crate) fn ms_to_time(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

pub(crate) fn to_wire(m: reservation::Model) -> ApiResult<DroneReservation> {
    let internal = |what: &str| {
        ApiError::Internal(anyhow::anyhow!(
            "reservation {} has an invalid {what}",
            m.delivery_id
        ))
    };
    let status = ReservationStatus::parse(&m.status).ok_or_else(|| internal("status"))?;
    let size = PackageSize::parse(&m.size).ok_or_else(|| internal("size"))?;
    Ok(DroneReservation {
        window: TimeWindow {
            start: ms_to_time(m.window_start_ms),
            end: ms_to_time(m.window_end_ms),
        },
        status,
        size,
        delivery_id: m.delivery_id,
        drone_id: m.drone_id,
        package_id: m.package_id,
        owner_id: m.owner_id,
        pickup_location: m.pickup_location,
        drop_off_location: m.drop_off_location,
        expedited: m.expedited,
        created_at: m.created_at,
        updated_at: m.updated_at,
    })
}

/// What a reservation request did.
pub(crate) enum Outcome {
    /// A new (or reactivated) reservation.
    Created(reservation::Model),
    /// The same request again, or a moved window: the stored reservation.
    Existing(reservation::Model),
}

/// The window a request asks for, at millisecond precision.
fn window_of(req: &DroneReservationRequest, settings: &ReservationSettings) -> (i64, i64) {
    let start = req.pickup_time.timestamp_millis();
    let minutes = if req.expedited {
        settings.expedited_window_minutes
    } else {
        settings.window_minutes
    };
    (start, start.saturating_add(minutes.saturating_mul(60_000)))
}

/// Reserves a drone for `delivery_id`, or returns the reservation it already has.
///
/// The database decides every race: the primary key picks one creator among concurrent requests
/// for one delivery, and the no-overlap constraint refuses a second window on a busy drone, in
/// which case the next free drone is tried.
pub(crate) async fn reserve(
    db: &DatabaseConnection,
    settings: &ReservationSettings,
    delivery_id: &str,
    req: &DroneReservationRequest,
) -> ApiResult<Outcome> {
    let (start, end) = window_of(req, settings);
    let rank = size_rank(req.size);
    // A few rounds: a concurrent request for the same delivery may insert between our read and
    // our write; the next round then finds its row.
    for _ in 0..3 {
        let existing = reservation::Entity::find_by_id(delivery_id.to_owned())
            .one(db)
            .await?;
        if let Some(current) = &existing {
            let fits = PackageSize::parse(&current.size).map(size_rank) == Some(rank);
            if current.status == ReservationStatus::Active.as_str()
                && current.window_start_ms == start
                && current.window_end_ms == end
                && fits
            {
                return Ok(Outcome::Existing(current.clone()));
            }
        }
        let preferred = existing.as_ref().map(|r| r.drone_id.as_str());
        let candidates = free_drones(db, delivery_id, rank, start, end, preferred).await?;
        for drone_id in candidates {
            let now = service_kit::now();
            let row = reservation::ActiveModel {
                delivery_id: Set(delivery_id.to_owned()),
                drone_id: Set(drone_id.clone()),
                window_start_ms: Set(start),
                window_end_ms: Set(end),
                status: Set(ReservationStatus::Active.as_str().to_owned()),
                package_id: Set(req.package_id.clone()),
                size: Set(req.size.as_str().to_owned()),
                owner_id: Set(req.owner_id.clone()),
                pickup_location: Set(req.pickup_location.clone()),
                drop_off_location: Set(req.drop_off_location.clone()),
                expedited: Set(req.expedited),
                created_at: Set(now),
                updated_at: Set(now),
            };
            let written = match &existing {
                None => reservation::Entity::insert(row)
                    .on_conflict(
                        OnConflict::column(reservation::Column::DeliveryId)
                            .do_nothing()
                            .to_owned(),
                    )
                    .exec_without_returning(db)
                    .await
                    .map(|n| n == 1),
                // Moving (reschedule) or reactivating: only from the state we read.
                Some(current) => reservation::Entity::update_many()
                    .col_expr(reservation::Column::DroneId, Expr::value(drone_id.clone()))
                    .col_expr(reservation::Column::WindowStartMs, Expr::value(start))
                    .col_expr(reservation::Column::WindowEndMs, Expr::value(end))
                    .col_expr(
                        reservation::Column::Status,
                        Expr::value(ReservationStatus::Active.as_str()),
                    )
                    .col_expr(
                        reservation::Column::PackageId,
                        Expr::value(req.package_id.clone()),
                    )
                    .col_expr(reservation::Column::Size, Expr::value(req.size.as_str()))
                    .col_expr(
                        reservation::Column::OwnerId,
                        Expr::value(req.owner_id.clone()),
                    )
                    .col_expr(
                        reservation::Column::PickupLocation,
                        Expr::value(req.pickup_location.clone()),
                    )
                    .col_expr(
                        reservation::Column::DropOffLocation,
                        Expr::value(req.drop_off_location.clone()),
                    )
                    .col_expr(reservation::Column::Expedited, Expr::value(req.expedited))
                    .col_expr(reservation::Column::UpdatedAt, Expr::value(now))
                    .filter(reservation::Column::DeliveryId.eq(delivery_id))
                    .filter(reservation::Column::Status.eq(current.status.clone()))
                    .filter(reservation::Column::WindowStartMs.eq(current.window_start_ms))
                    .filter(reservation::Column::DroneId.eq(current.drone_id.clone()))
                    .exec(db)
                    .await
                    .map(|r| r.rows_affected == 1),
            };
            match written {
                Ok(true) => {
                    let stored = reservation::Entity::find_by_id(delivery_id.to_owned())
                        .one(db)
                        .await?
                        .ok_or_else(|| {
                            ApiError::Internal(anyhow::anyhow!("reservation vanished after write"))
                        })?;
                    let reactivated_or_new = existing
                        .as_ref()
                        .is_none_or(|c| c.status != ReservationStatus::Active.as_str());
                    tracing::info!(
                        delivery_id,
                        drone_id = %stored.drone_id,
                        moved = existing.is_some(),
                        "drone reserved"
                    );
                    return Ok(if reactivated_or_new {
                        Outcome::Created(stored)
                    } else {
                        Outcome::Existing(stored)
                    });
                }
                // Someone else wrote this delivery's row first: read it in the next round.
                Ok(false) => break,
                Err(e) if classify(&e) == DbErrorKind::ConstraintConflict => {
                    tracing::debug!(
                        delivery_id,
                        drone_id,
                        "drone taken concurrently, trying next"
                    );
                }
                Err(e) => return Err(e.into()),
            }
        }
        let again = reservation::Entity::find_by_id(delivery_id.to_owned())
            .one(db)
            .await?;
        if again == existing {
            // Nothing changed underneath us and no candidate worked: the fleet is full.
            return Err(no_drone(settings, req));
        }
    }
    Err(no_drone(settings, req))
}

fn no_drone(settings: &ReservationSettings, req: &DroneReservationRequest) -> ApiError {
    ApiError::unavailable(
        "no-drone-available",
        format!(
            "no {} drone is free for the window starting {}",
            req.size.as_str(),
            req.pickup_time.to_rfc3339()
        ),
        settings.retry_after_secs,
    )
}

/// Active drones that can carry `rank` and have no active reservation overlapping `[start, end)`
/// (other than `delivery_id`'s own). The smallest fitting drones come first, so large drones stay
/// free for large packages; within a size the order is rotated by the delivery id, so concurrent
/// requests spread over the fleet instead of all racing for the first drone.
async fn free_drones(
    db: &DatabaseConnection,
    delivery_id: &str,
    rank: i32,
    start: i64,
    end: i64,
    preferred: Option<&str>,
) -> Result<Vec<String>, DbErr> {
    let drones = drone::Entity::find()
        .filter(drone::Column::Active.eq(true))
        .filter(drone::Column::SizeRank.gte(rank))
        .order_by_asc(drone::Column::SizeRank)
        .order_by_asc(drone::Column::Id)
        .all(db)
        .await?;
    let busy: std::collections::HashSet<String> = reservation::Entity::find()
        .filter(reservation::Column::Status.eq(ReservationStatus::Active.as_str()))
        .filter(reservation::Column::DeliveryId.ne(delivery_id))
        .filter(reservation::Column::WindowStartMs.lt(end))
        .filter(reservation::Column::WindowEndMs.gt(start))
        .all(db)
        .await?
        .into_iter()
        .map(|r| r.drone_id)
        .collect();
    let spread = fnv(delivery_id);
    let mut by_rank: std::collections::BTreeMap<i32, Vec<String>> = Default::default();
    for d in drones.into_iter().filter(|d| !busy.contains(&d.id)) {
        by_rank.entry(d.size_rank).or_default().push(d.id);
    }
    let mut out = Vec::new();
    if let Some(p) = preferred {
        if by_rank.values().flatten().any(|id| id == p) {
            out.push(p.to_owned());
        }
    }
    for ids in by_rank.values_mut() {
        let n = ids.len();
        if n > 0 {
            ids.rotate_left((spread % n as u64) as usize);
        }
        out.extend(
            ids.iter()
                .filter(|id| Some(id.as_str()) != preferred)
                .cloned(),
        );
    }
    Ok(out)
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Releases the reservation; releasing a released one returns it unchanged.
pub(crate) async fn release(
    db: &DatabaseConnection,
    delivery_id: &str,
) -> ApiResult<reservation::Model> {
    let current = reservation::Entity::find_by_id(delivery_id.to_owned())
        .one(db)
        .await?
        .ok_or_else(|| ApiError::not_found("reservation", delivery_id))?;
    if current.status == ReservationStatus::Released.as_str() {
        return Ok(current);
    }
    reservation::Entity::update_many()
        .col_expr(
            reservation::Column::Status,
            Expr::value(ReservationStatus::Released.as_str()),
        )
        .col_expr(
            reservation::Column::UpdatedAt,
            Expr::value(service_kit::now()),
        )
        .filter(reservation::Column::DeliveryId.eq(delivery_id))
        .exec(db)
        .await?;
    tracing::info!(delivery_id, drone_id = %current.drone_id, "drone released");
    reservation::Entity::find_by_id(delivery_id.to_owned())
        .one(db)
        .await?
        .ok_or_else(|| ApiError::not_found("reservation", delivery_id))
}
