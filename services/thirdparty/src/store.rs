//! Legs and carrier capacity in the database. Every function takes the connection and answers a
//! [`StoreError`]; the routes turn those into HTTP answers.
//!
//! Who gets a carrier's last slot of a day is decided by one statement: the counter row of
//! (carrier, day) is raised only while it is below the carrier's capacity (an upsert whose update
//! is conditional), in the transaction that also inserts the leg. On PostgreSQL a concurrent
//! booking waits for the row lock and then sees the raised count; on SQLite transactions run one
//! at a time. Either way a slot is taken at most once, and a leg that is not inserted (its id was
//! taken meanwhile) rolls its slot back with it.

use std::collections::HashMap;

use chrono::SubsecRound;
use contracts::{GeoPoint, LegRequest, LegStatus, PackageSize, ThirdPartyLeg};
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseConnection, DbBackend, DbErr,
    EntityTrait, QueryFilter, Statement, TransactionTrait,
};

use crate::entity::{carrier_day, leg};
use crate::plan::{self, CarrierSpec, NoRoute};
use crate::{carriers, LegSettings};

#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    #[error("leg '{0}' does not exist")]
    NotFound(String),
    #[error(
        "the leg for delivery '{0}' was cancelled before it was booked; it cannot be booked now"
    )]
    CancelledBeforeBooked(String),
    #[error("the leg for delivery '{0}' is cancelled; a cancelled leg is not booked again")]
    Cancelled(String),
    #[error("the leg for delivery '{0}' already exists with different content")]
    DifferentContent(String),
    #[error("{}", .0.detail)]
    NoRoute(NoRoute),
    #[error(
        "every carrier serving this route is fully booked on {day} ({carriers}); try again later"
    )]
    NoCapacity {
        day: String,
        carriers: String,
        retry_after_secs: u64,
    },
    /// A stored value this code does not expect.
    #[error("{0}")]
    Unexpected(String),
    #[error(transparent)]
    Db(#[from] DbErr),
}

pub(crate) type StoreResult<T> = Result<T, StoreError>;

/// What a booking did.
pub(crate) enum Booking {
    Created(ThirdPartyLeg),
    /// The same request again: the leg booked the first time, as it is.
    Replayed(ThirdPartyLeg),
}

/// A tombstone: what cancelling an unknown leg leaves behind, so that a booking still on its way
/// (a timed-out attempt of a saga that was since compensated) cannot take a slot afterwards. It
/// has no carrier and no owner and is never shown: reads of it find nothing.
fn is_tombstone(m: &leg::Model) -> bool {
    m.carrier_id.is_none()
}

fn to_wire(m: leg::Model) -> StoreResult<ThirdPartyLeg> {
    let status = LegStatus::parse(&m.status).ok_or_else(|| {
        StoreError::Unexpected(format!(
            "leg {} has unknown status {}",
            m.delivery_id, m.status
        ))
    })?;
    let carrier_id = m
        .carrier_id
        .ok_or_else(|| StoreError::Unexpected(format!("leg {} has no carrier", m.delivery_id)))?;
    Ok(ThirdPartyLeg {
        delivery_id: m.delivery_id,
        owner_id: m.owner_id,
        carrier_id,
        carrier_name: m.carrier_name,
        from_location: m.pickup_location,
        to_location: m.to_location,
        whole_route: m.whole_route,
        pickup_time: m.pickup_time,
        handover_time: m.handover_time,
        distance_km: m.distance_km,
        status,
        created_at: m.created_at,
        updated_at: m.updated_at,
    })
}

/// The request as it is stored: times at the microsecond, the precision both databases keep, so
/// a replay compares equal to what the first request stored.
fn normalised(req: &LegRequest) -> LegRequest {
    LegRequest {
        pickup_time: req.pickup_time.trunc_subsecs(6),
        ..req.clone()
    }
}

/// True when a stored leg was booked for exactly this request.
fn same_request(m: &leg::Model, req: &LegRequest) -> bool {
    m.owner_id == req.owner_id
        && m.pickup_location == req.pickup_location
        && m.drop_off_location == req.drop_off_location
        && m.pickup_time == req.pickup_time
        && m.size == req.size.as_str()
        && m.weight == req.weight
        && m.handover_within_km == req.handover_within_km
}

async fn find_any(db: &impl ConnectionTrait, id: &str) -> Result<Option<leg::Model>, DbErr> {
    leg::Entity::find_by_id(id.to_owned()).one(db).await
}

async fn find(db: &impl ConnectionTrait, id: &str) -> StoreResult<leg::Model> {
    find_any(db, id)
        .await?
        .filter(|m| !is_tombstone(m))
        .ok_or_else(|| StoreError::NotFound(id.to_owned()))
}

pub(crate) async fn get(db: &DatabaseConnection, id: &str) -> StoreResult<ThirdPartyLeg> {
    to_wire(find(db, id).await?)
}

/// A second request for an id that has a row: the same leg, or why not.
fn replay(current: leg::Model, req: &LegRequest) -> StoreResult<Booking> {
    let id = current.delivery_id.clone();
    if is_tombstone(&current) {
        return Err(StoreError::CancelledBeforeBooked(id));
    }
    if current.status != LegStatus::Booked.as_str() {
        return Err(StoreError::Cancelled(id));
    }
    if same_request(&current, req) {
        return Ok(Booking::Replayed(to_wire(current)?));
    }
    Err(StoreError::DifferentContent(id))
}

fn point(field: &str, location: &str) -> StoreResult<GeoPoint> {
    // The request body was validated: a location that is no point cannot get here.
    GeoPoint::parse(location)
        .ok_or_else(|| StoreError::Unexpected(format!("{field} '{location}' is not a point")))
}

/// Books a leg for `id`, or finds the one booked for the same request; see the module
/// documentation for who gets the last slot.
pub(crate) async fn book(
    db: &DatabaseConnection,
    settings: &LegSettings,
    id: &str,
    req: &LegRequest,
) -> StoreResult<Booking> {
    let req = normalised(req);
    let pickup = point("pickupLocation", &req.pickup_location)?;
    let drop_off = point("dropOffLocation", &req.drop_off_location)?;
    let day = plan::day_of(req.pickup_time);
    let stored = carriers::active(db).await?;
    let specs: Vec<CarrierSpec> = stored.iter().filter_map(carriers::spec).collect();
    // Rounds: a concurrent request may take the slot we counted on (that carrier is full in the
    // next count) or insert this very id (the next round finds it). Each round's transaction
    // holds at most one slot row locked, so concurrent bookings never wait on each other in a
    // cycle (PostgreSQL keeps the lock of a row whose conditional update refused).
    for _ in 0..specs.len() + 3 {
        if let Some(current) = find_any(db, id).await? {
            return replay(current, &req);
        }
        let serving =
            plan::serving(&specs, pickup, drop_off, req.weight).map_err(StoreError::NoRoute)?;
        let booked = booked_on(db, &day, &serving).await?;
        let left: Vec<(&CarrierSpec, u32)> = serving
            .iter()
            .map(|c| {
                let taken = booked.get(&c.id).copied().unwrap_or(0);
                (*c, c.daily_capacity.saturating_sub(taken))
            })
            .collect();
        let Some(carrier) = plan::by_capacity_left(&left).first().copied() else {
            return Err(no_capacity(settings, day, &serving));
        };
        let txn = db.begin().await?;
        if !take_slot(&txn, &carrier.id, &day).await? {
            // Taken since we counted: count again.
            txn.rollback().await?;
            continue;
        }
        match insert_leg(&txn, id, &req, carrier, &day, pickup, drop_off).await {
            Ok(created) => {
                txn.commit().await?;
                tracing::info!(
                    delivery_id = id,
                    carrier_id = %carrier.id,
                    day,
                    distance_km = created.distance_km,
                    "carrier leg booked"
                );
                return Ok(Booking::Created(to_wire(created)?));
            }
            // The id was taken meanwhile (PostgreSQL reports no returned row, SQLite no inserted
            // row): give the slot back and answer from what is there.
            Err(DbErr::RecordNotFound(_) | DbErr::RecordNotInserted) => {
                txn.rollback().await?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    // Slots kept going to others between our count and our claim: as busy as full.
    if let Some(current) = find_any(db, id).await? {
        return replay(current, &req);
    }
    let serving =
        plan::serving(&specs, pickup, drop_off, req.weight).map_err(StoreError::NoRoute)?;
    Err(no_capacity(settings, day, &serving))
}

fn no_capacity(settings: &LegSettings, day: String, serving: &[&CarrierSpec]) -> StoreError {
    StoreError::NoCapacity {
        day,
        carriers: serving
            .iter()
            .map(|c| c.id.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        retry_after_secs: settings.retry_after_secs,
    }
}

/// How many legs each of `carriers` holds on `day` (absent: none).
async fn booked_on(
    db: &impl ConnectionTrait,
    day: &str,
    carriers: &[&CarrierSpec],
) -> Result<HashMap<String, u32>, DbErr> {
    let ids: Vec<String> = carriers.iter().map(|c| c.id.clone()).collect();
    Ok(carrier_day::Entity::find()
        .filter(carrier_day::Column::Day.eq(day))
        .filter(carrier_day::Column::CarrierId.is_in(ids))
        .all(db)
        .await?
        .into_iter()
        .map(|r| (r.carrier_id, u32::try_from(r.booked).unwrap_or(0)))
        .collect())
}

const PG_TAKE_SLOT: &str = "
INSERT INTO carrier_days (carrier_id, day, booked)
SELECT c.id, $2, 1 FROM carriers c WHERE c.id = $1 AND c.daily_capacity > 0
ON CONFLICT (carrier_id, day) DO UPDATE SET booked = carrier_days.booked + 1
WHERE carrier_days.booked < (SELECT daily_capacity FROM carriers WHERE id = $1)";

// SQLite needs the WHERE of the SELECT to tell its upsert clause from a join constraint.
const SQLITE_TAKE_SLOT: &str = "
INSERT INTO carrier_days (carrier_id, day, booked)
SELECT c.id, ?2, 1 FROM carriers c WHERE c.id = ?1 AND c.daily_capacity > 0
ON CONFLICT (carrier_id, day) DO UPDATE SET booked = carrier_days.booked + 1
WHERE carrier_days.booked < (SELECT daily_capacity FROM carriers WHERE id = ?1)";

/// Takes one of the carrier's slots on `day` if it has one left: one statement that raises the
/// count only below the capacity. True when a slot was taken.
async fn take_slot(db: &impl ConnectionTrait, carrier_id: &str, day: &str) -> Result<bool, DbErr> {
    let backend = db.get_database_backend();
    let sql = match backend {
        DbBackend::Postgres => PG_TAKE_SLOT,
        _ => SQLITE_TAKE_SLOT,
    };
    let changed = db
        .execute(Statement::from_sql_and_values(
            backend,
            sql,
            [carrier_id.into(), day.into()],
        ))
        .await?
        .rows_affected();
    Ok(changed == 1)
}

/// Gives a slot back (a cancelled leg).
async fn release_slot(db: &impl ConnectionTrait, carrier_id: &str, day: &str) -> Result<(), DbErr> {
    carrier_day::Entity::update_many()
        .col_expr(
            carrier_day::Column::Booked,
            Expr::col(carrier_day::Column::Booked).sub(1),
        )
        .filter(carrier_day::Column::CarrierId.eq(carrier_id))
        .filter(carrier_day::Column::Day.eq(day))
        .filter(carrier_day::Column::Booked.gt(0))
        .exec(db)
        .await?;
    Ok(())
}

/// Inserts the leg unless the id is taken (then `RecordNotFound`/`RecordNotInserted`).
async fn insert_leg(
    db: &impl ConnectionTrait,
    id: &str,
    req: &LegRequest,
    carrier: &CarrierSpec,
    day: &str,
    pickup: GeoPoint,
    drop_off: GeoPoint,
) -> Result<leg::Model, DbErr> {
    let handover = plan::handover(pickup, drop_off, req.handover_within_km);
    let (to_location, whole_route) = match handover.point {
        Some(p) => (p.location(), false),
        None => (req.drop_off_location.clone(), true),
    };
    let handover_time =
        plan::handover_time(req.pickup_time, handover.distance_km, carrier.speed_kmh);
    let now = service_kit::now();
    leg::Entity::insert(leg::ActiveModel {
        delivery_id: Set(id.to_owned()),
        owner_id: Set(req.owner_id.clone()),
        pickup_location: Set(req.pickup_location.clone()),
        drop_off_location: Set(req.drop_off_location.clone()),
        pickup_time: Set(req.pickup_time),
        size: Set(req.size.as_str().to_owned()),
        weight: Set(req.weight),
        handover_within_km: Set(req.handover_within_km),
        carrier_id: Set(Some(carrier.id.clone())),
        carrier_name: Set(carrier.name.clone()),
        day: Set(day.to_owned()),
        to_location: Set(to_location),
        whole_route: Set(whole_route),
        handover_time: Set(handover_time),
        distance_km: Set(handover.distance_km),
        status: Set(LegStatus::Booked.as_str().to_owned()),
        created_at: Set(now),
        updated_at: Set(now),
    })
    .on_conflict(
        OnConflict::column(leg::Column::DeliveryId)
            .do_nothing()
            .to_owned(),
    )
    .exec_with_returning(db)
    .await
}

/// Cancels the leg and gives its slot back; cancelling a cancelled leg returns it unchanged.
/// Cancelling one that does not exist leaves a tombstone and answers [`StoreError::NotFound`].
/// With the leg, whether this call cancelled it.
pub(crate) async fn cancel(
    db: &DatabaseConnection,
    id: &str,
) -> StoreResult<(ThirdPartyLeg, bool)> {
    let mut changed = cancel_booked(db, id).await?;
    if !changed && find_any(db, id).await?.is_none() {
        let now = service_kit::now();
        leg::Entity::insert(leg::ActiveModel {
            delivery_id: Set(id.to_owned()),
            owner_id: Set(String::new()),
            pickup_location: Set(String::new()),
            drop_off_location: Set(String::new()),
            pickup_time: Set(now),
            size: Set(PackageSize::Small.as_str().to_owned()),
            weight: Set(0.0),
            handover_within_km: Set(None),
            carrier_id: Set(None),
            carrier_name: Set(String::new()),
            day: Set(String::new()),
            to_location: Set(String::new()),
            whole_route: Set(false),
            handover_time: Set(now),
            distance_km: Set(0.0),
            status: Set(LegStatus::Cancelled.as_str().to_owned()),
            created_at: Set(now),
            updated_at: Set(now),
        })
        .on_conflict(
            OnConflict::column(leg::Column::DeliveryId)
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(db)
        .await?;
        tracing::info!(delivery_id = id, "cancel of an unknown leg: tombstone kept");
        // A leg booked between the two statements is cancelled like any other.
        changed = cancel_booked(db, id).await?;
    }
    let current = find(db, id).await?;
    Ok((to_wire(current)?, changed))
}

/// Cancels the leg if it is booked and releases its slot, in one transaction; the status
/// condition makes a concurrent cancel a no-op, so a slot is released once. True when this call
/// cancelled it.
async fn cancel_booked(db: &DatabaseConnection, id: &str) -> Result<bool, DbErr> {
    let txn = db.begin().await?;
    let Some(current) = find_any(&txn, id).await? else {
        txn.rollback().await?;
        return Ok(false);
    };
    let (Some(carrier_id), true) = (
        current.carrier_id.as_deref(),
        current.status == LegStatus::Booked.as_str(),
    ) else {
        txn.rollback().await?;
        return Ok(false);
    };
    let changed = leg::Entity::update_many()
        .col_expr(
            leg::Column::Status,
            Expr::value(LegStatus::Cancelled.as_str()),
        )
        .col_expr(leg::Column::UpdatedAt, Expr::value(service_kit::now()))
        .filter(leg::Column::DeliveryId.eq(id))
        .filter(leg::Column::Status.eq(LegStatus::Booked.as_str()))
        .exec(&txn)
        .await?
        .rows_affected;
    if changed == 1 {
        release_slot(&txn, carrier_id, &current.day).await?;
    }
    txn.commit().await?;
    if changed == 1 {
        tracing::info!(delivery_id = id, carrier_id, day = %current.day, "carrier leg cancelled");
    }
    Ok(changed == 1)
}

/// The active carriers.
pub(crate) async fn carriers(db: &DatabaseConnection) -> StoreResult<Vec<contracts::Carrier>> {
    Ok(carriers::active(db)
        .await?
        .into_iter()
        .map(carriers::to_wire)
        .collect())
}
