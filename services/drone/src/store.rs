//! Reservations and the fleet's view of them, in the database. Every function takes the
//! connection and answers a [`StoreError`]; the routes turn those into HTTP answers.

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;

use chrono::{DateTime, TimeZone, Utc};
use contracts::{
    Drone, DroneReservation, DroneReservationRequest, Fleet, PackageSize, ReservationStatus,
    TimeWindow, Utilization,
};
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseConnection, DbBackend, DbErr,
    EntityTrait, QueryFilter, QueryOrder, QuerySelect, Statement, Value,
};
use service_kit::db::{classify, DbErrorKind};

use crate::entity::{drone, reservation};
use crate::fleet::{size_rank, DroneCache};
use crate::ReservationSettings;

mod batch;

pub(crate) use batch::reserve_batch;

#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    #[error("reservation '{0}' does not exist")]
    ReservationNotFound(String),
    #[error("drone '{0}' does not exist")]
    DroneNotFound(String),
    /// A released reservation is final: a later `PUT` for the same delivery (a retry that was
    /// still on its way when the saga was compensated) must not take a drone again.
    #[error(
        "the reservation for delivery '{0}' was released; a released reservation is not taken again"
    )]
    Released(String),
    #[error(
        "no {} drone is free for the window starting {}",
        .size.as_str(),
        .start.to_rfc3339()
    )]
    NoDroneFree {
        size: PackageSize,
        start: DateTime<Utc>,
        retry_after_secs: u64,
    },
    /// Something stored or done that this code does not expect.
    #[error("{0}")]
    Unexpected(String),
    #[error(transparent)]
    Db(#[from] DbErr),
}

pub(crate) type StoreResult<T> = Result<T, StoreError>;

/// A delivery's reservation; a tombstone is not shown.
pub(crate) async fn get(
    db: &DatabaseConnection,
    delivery_id: &str,
) -> StoreResult<DroneReservation> {
    let r = reservation::Entity::find_by_id(delivery_id.to_owned())
        .one(db)
        .await?
        .filter(|r| !is_tombstone(r))
        .ok_or_else(|| StoreError::ReservationNotFound(delivery_id.to_owned()))?;
    to_wire(r)
}

/// `Ok` when the drone is in the fleet (active or retired).
pub(crate) async fn drone_exists(db: &DatabaseConnection, drone_id: &str) -> StoreResult<()> {
    drone::Entity::find_by_id(drone_id.to_owned())
        .one(db)
        .await?
        .map(drop)
        .ok_or_else(|| StoreError::DroneNotFound(drone_id.to_owned()))
}

/// Every active drone, what it is doing now and how many reservations it still has.
pub(crate) async fn fleet(db: &DatabaseConnection) -> StoreResult<Fleet> {
    let now_ms = Utc::now().timestamp_millis();
    let drones = drone::Entity::find()
        .filter(drone::Column::Active.eq(true))
        .order_by_asc(drone::Column::Id)
        .all(db)
        .await?;
    let pending = reservation::Entity::find()
        .filter(reservation::Column::Status.eq(ReservationStatus::Active.as_str()))
        .filter(reservation::Column::WindowEndMs.gt(now_ms))
        .order_by_asc(reservation::Column::WindowStartMs)
        .all(db)
        .await?;
    let mut by_drone: BTreeMap<String, Vec<reservation::Model>> = BTreeMap::new();
    for r in pending {
        by_drone.entry(r.drone_id.clone()).or_default().push(r);
    }
    let mut busy_now = 0;
    let mut out = Vec::with_capacity(drones.len());
    for d in drones {
        let rs = by_drone.remove(&d.id).unwrap_or_default();
        let current = rs
            .iter()
            .find(|r| r.window_start_ms <= now_ms && now_ms < r.window_end_ms)
            .cloned()
            .map(to_wire)
            .transpose()?;
        if current.is_some() {
            busy_now += 1;
        }
        out.push(Drone {
            max_package_size: PackageSize::parse(&d.max_package_size).ok_or_else(|| {
                StoreError::Unexpected(format!("drone {} has an invalid size", d.id))
            })?,
            id: d.id,
            current_reservation: current,
            upcoming_reservations: rs.len() as u64,
        });
    }
    Ok(Fleet {
        size: out.len() as u64,
        busy_now,
        drones: out,
    })
}

/// Up to `limit` of a drone's reservations (of one status, when given), earliest window first.
pub(crate) async fn drone_reservations(
    db: &DatabaseConnection,
    drone_id: &str,
    status: Option<ReservationStatus>,
    limit: u64,
) -> StoreResult<Vec<DroneReservation>> {
    drone_exists(db, drone_id).await?;
    let mut select = reservation::Entity::find().filter(reservation::Column::DroneId.eq(drone_id));
    if let Some(status) = status {
        select = select.filter(reservation::Column::Status.eq(status.as_str()));
    }
    select
        .order_by_asc(reservation::Column::WindowStartMs)
        .limit(limit)
        .all(db)
        .await?
        .into_iter()
        .map(to_wire)
        .collect()
}

/// What one owner's active reservations whose window starts in `window` (epoch milliseconds, one
/// calendar month) held of the fleet.
pub(crate) async fn utilization(
    db: &DatabaseConnection,
    owner_id: &str,
    (year, month): (i32, u32),
    window: Range<i64>,
) -> StoreResult<Utilization> {
    let rows = reservation::Entity::find()
        .filter(reservation::Column::OwnerId.eq(owner_id))
        .filter(reservation::Column::Status.eq(ReservationStatus::Active.as_str()))
        .filter(reservation::Column::WindowStartMs.gte(window.start))
        .filter(reservation::Column::WindowStartMs.lt(window.end))
        .all(db)
        .await?;
    let minutes: i64 = rows
        .iter()
        .map(|r| (r.window_end_ms - r.window_start_ms) / 60_000)
        .sum();
    let drones: HashSet<&str> = rows.iter().map(|r| r.drone_id.as_str()).collect();
    Ok(Utilization {
        owner_id: owner_id.to_owned(),
        year,
        month,
        reservations: rows.len() as u64,
        reserved_minutes: u64::try_from(minutes).unwrap_or(0),
        drones_used: drones.len() as u64,
    })
}

fn ms_to_time(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

fn to_wire(m: reservation::Model) -> StoreResult<DroneReservation> {
    let internal = |what: &str| {
        StoreError::Unexpected(format!(
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
    Created(DroneReservation),
    /// The same request again, or a moved window: the stored reservation.
    Existing(DroneReservation),
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
/// A new reservation is one statement (see [`insert_first_free`]). The database decides every
/// race: the primary key picks one creator among concurrent requests for one delivery, and the
/// no-overlap constraint refuses a second window on a busy drone, in which case the statement
/// inserts nothing and the next round tries again.
pub(crate) async fn reserve(
    db: &DatabaseConnection,
    drones: &DroneCache,
    settings: &ReservationSettings,
    delivery_id: &str,
    req: &DroneReservationRequest,
) -> StoreResult<Outcome> {
    let (start, end) = window_of(req, settings);
    let rank = size_rank(req.size);
    // A few rounds: a concurrent request may take the drone we picked, or insert this delivery's
    // row, between our statements; the next round then sees it.
    for _ in 0..3 {
        let candidates = drones.candidates(db, delivery_id, rank, None).await?;
        match insert_first_free(db, delivery_id, req, start, end, &candidates).await {
            Ok(Some(created)) => {
                tracing::debug!(delivery_id, drone_id = %created.drone_id, "drone reserved");
                return Ok(Outcome::Created(to_wire(created)?));
            }
            Ok(None) => {}
            // SQLite's no-overlap trigger aborts the statement instead.
            Err(e) if classify(&e) == DbErrorKind::ConstraintConflict => continue,
            Err(e) => return Err(e.into()),
        }
        // Nothing inserted: this delivery has a reservation already, a concurrent request took
        // the drone we picked, or no drone is free.
        let existing = reservation::Entity::find_by_id(delivery_id.to_owned())
            .one(db)
            .await?;
        match existing {
            Some(current) => {
                if let Some(answer) = settled(delivery_id, &current, rank, start, end) {
                    return answer;
                }
                if let Some(outcome) = rewrite(
                    db,
                    drones,
                    settings,
                    delivery_id,
                    req,
                    rank,
                    start,
                    end,
                    &current,
                )
                .await?
                {
                    return Ok(outcome);
                }
            }
            None => {
                if free_drones(db, delivery_id, start, end, &candidates)
                    .await?
                    .is_empty()
                {
                    return Err(no_drone(settings, req));
                }
            }
        }
    }
    Err(no_drone(settings, req))
}

/// What [`reserve`] answers, without writing, for a delivery whose row is `current`: a released
/// reservation is final, and the same window for the same size finds the reservation as it is.
/// `None` when the request moves (or reactivates) it instead.
fn settled(
    delivery_id: &str,
    current: &reservation::Model,
    rank: i32,
    start: i64,
    end: i64,
) -> Option<StoreResult<Outcome>> {
    if current.status == ReservationStatus::Released.as_str() {
        return Some(Err(StoreError::Released(delivery_id.to_owned())));
    }
    let fits = PackageSize::parse(&current.size).map(size_rank) == Some(rank);
    (current.status == ReservationStatus::Active.as_str()
        && current.window_start_ms == start
        && current.window_end_ms == end
        && fits)
        .then(|| to_wire(current.clone()).map(Outcome::Existing))
}

/// Moves (reschedule) or reactivates `current` to `[start, end)`, keeping its drone when it is
/// free. `None` when the row changed underneath us (the caller reads it again); a fleet with no
/// free drone is [`StoreError::NoDroneFree`].
#[allow(clippy::too_many_arguments)]
async fn rewrite(
    db: &DatabaseConnection,
    drones: &DroneCache,
    settings: &ReservationSettings,
    delivery_id: &str,
    req: &DroneReservationRequest,
    rank: i32,
    start: i64,
    end: i64,
    current: &reservation::Model,
) -> StoreResult<Option<Outcome>> {
    let candidates = drones
        .candidates(db, delivery_id, rank, Some(current.drone_id.as_str()))
        .await?;
    let free = free_drones(db, delivery_id, start, end, &candidates).await?;
    for drone_id in free {
        let now = service_kit::now();
        // Only from the state we read: a concurrent writer makes this a no-op.
        let written = reservation::Entity::update_many()
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
            .map(|r| r.rows_affected == 1);
        match written {
            Ok(true) => {
                let stored = reservation::Entity::find_by_id(delivery_id.to_owned())
                    .one(db)
                    .await?
                    .ok_or_else(|| {
                        StoreError::Unexpected("reservation vanished after write".into())
                    })?;
                tracing::info!(delivery_id, drone_id = %stored.drone_id, "drone reservation moved");
                let stored = to_wire(stored)?;
                return Ok(Some(
                    if current.status != ReservationStatus::Active.as_str() {
                        Outcome::Created(stored)
                    } else {
                        Outcome::Existing(stored)
                    },
                ));
            }
            // Someone else rewrote this delivery's row first: read it in the next round.
            Ok(false) => return Ok(None),
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
    if again.as_ref() == Some(current) {
        // Nothing changed underneath us and no candidate worked: the fleet is full.
        return Err(no_drone(settings, req));
    }
    Ok(None)
}

fn no_drone(settings: &ReservationSettings, req: &DroneReservationRequest) -> StoreError {
    StoreError::NoDroneFree {
        size: req.size,
        start: req.pickup_time,
        retry_after_secs: settings.retry_after_secs,
    }
}

const PG_INSERT_FIRST_FREE: &str = "
INSERT INTO reservations (delivery_id, drone_id, window_start_ms, window_end_ms, status, package_id,
    size, owner_id, pickup_location, drop_off_location, expedited, created_at, updated_at)
SELECT $1, c.id, $2, $3, 'active', $4, $5, $6, $7, $8, $9, $10, $10
FROM unnest($11::text[]) AS c(id)
WHERE NOT EXISTS (
    SELECT 1 FROM reservations r
    WHERE r.drone_id = c.id AND r.status = 'active'
      AND int8range(r.window_start_ms, r.window_end_ms, '[)') && int8range($2, $3, '[)'))
LIMIT 1
ON CONFLICT DO NOTHING
RETURNING *";

const SQLITE_INSERT_FIRST_FREE: &str = "
INSERT INTO reservations (delivery_id, drone_id, window_start_ms, window_end_ms, status, package_id,
    size, owner_id, pickup_location, drop_off_location, expedited, created_at, updated_at)
SELECT ?1, c.value, ?2, ?3, 'active', ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?10
FROM json_each(?11) AS c
WHERE NOT EXISTS (
    SELECT 1 FROM reservations r
    WHERE r.drone_id = c.value AND r.status = 'active'
      AND r.window_start_ms < ?3 AND r.window_end_ms > ?2)
ORDER BY c.key
LIMIT 1
ON CONFLICT DO NOTHING
RETURNING *";

/// Inserts `delivery_id`'s reservation on the first of `candidates` that is free for
/// `[start, end)`, in one statement (one round trip, one commit). `None` when nothing was
/// inserted: the delivery has a row already, no candidate is free, or a concurrent request took
/// the chosen drone (`ON CONFLICT DO NOTHING` covers the primary key and, on PostgreSQL, the
/// no-overlap exclusion constraint).
///
/// On PostgreSQL each candidate costs one probe of the exclusion constraint's GiST index
/// (`int8range &&`, `drone_id =`), and the probes stop at the first free drone: the plan is a
/// nested-loop anti join over the candidate list, which keeps the list's order (no `ORDER BY`,
/// which would make a generic plan probe every candidate before sorting). Correctness never
/// depends on that order, only the preference for small drones does.
async fn insert_first_free(
    db: &DatabaseConnection,
    delivery_id: &str,
    req: &DroneReservationRequest,
    start: i64,
    end: i64,
    candidates: &[String],
) -> Result<Option<reservation::Model>, DbErr> {
    if candidates.is_empty() {
        return Ok(None);
    }
    let backend = db.get_database_backend();
    let (sql, list) = match backend {
        DbBackend::Postgres => (PG_INSERT_FIRST_FREE, Value::from(candidates.to_vec())),
        _ => (SQLITE_INSERT_FIRST_FREE, json_list(candidates)),
    };
    let values: Vec<Value> = vec![
        delivery_id.into(),
        start.into(),
        end.into(),
        req.package_id.clone().into(),
        req.size.as_str().into(),
        req.owner_id.clone().into(),
        req.pickup_location.clone().into(),
        req.drop_off_location.clone().into(),
        req.expedited.into(),
        service_kit::now().into(),
        list,
    ];
    reservation::Entity::find()
        .from_raw_sql(Statement::from_sql_and_values(backend, sql, values))
        .one(db)
        .await
}

const PG_FREE: &str = "
SELECT c.id FROM unnest($1::text[]) WITH ORDINALITY AS c(id, ord)
WHERE NOT EXISTS (
    SELECT 1 FROM reservations r
    WHERE r.drone_id = c.id AND r.status = 'active' AND r.delivery_id <> $2
      AND int8range(r.window_start_ms, r.window_end_ms, '[)') && int8range($3, $4, '[)'))
ORDER BY c.ord";

const SQLITE_FREE: &str = "
SELECT c.value AS id FROM json_each(?1) AS c
WHERE NOT EXISTS (
    SELECT 1 FROM reservations r
    WHERE r.drone_id = c.value AND r.status = 'active' AND r.delivery_id <> ?2
      AND r.window_start_ms < ?4 AND r.window_end_ms > ?3)
ORDER BY c.key";

/// Those of `candidates` (in their order) with no active reservation overlapping `[start, end)`
/// other than `delivery_id`'s own.
async fn free_drones(
    db: &DatabaseConnection,
    delivery_id: &str,
    start: i64,
    end: i64,
    candidates: &[String],
) -> Result<Vec<String>, DbErr> {
    if candidates.is_empty() {
        return Ok(Vec::new());
    }
    let backend = db.get_database_backend();
    let (sql, list) = match backend {
        DbBackend::Postgres => (PG_FREE, Value::from(candidates.to_vec())),
        _ => (SQLITE_FREE, json_list(candidates)),
    };
    let values: Vec<Value> = vec![list, delivery_id.into(), start.into(), end.into()];
    db.query_all(Statement::from_sql_and_values(backend, sql, values))
        .await?
        .iter()
        .map(|row| row.try_get::<String>("", "id"))
        .collect()
}

fn json_list(ids: &[String]) -> Value {
    serde_json::to_string(ids).unwrap_or_default().into()
}

/// A tombstone: what releasing a reservation that does not exist (yet) leaves behind, so that a
/// reservation request still on its way cannot create it afterwards. It holds no drone and is
/// never shown: reads of it find nothing.
fn is_tombstone(m: &reservation::Model) -> bool {
    m.drone_id.is_empty()
}

/// Releases the reservation; releasing a released one returns it unchanged. Releasing one that
/// does not exist records a tombstone (see [`is_tombstone`]) and answers
/// [`StoreError::ReservationNotFound`].
pub(crate) async fn release(
    db: &DatabaseConnection,
    delivery_id: &str,
) -> StoreResult<DroneReservation> {
    let current = reservation::Entity::find_by_id(delivery_id.to_owned())
        .one(db)
        .await?;
    let Some(current) = current else {
        let now = service_kit::now();
        reservation::Entity::insert(reservation::ActiveModel {
            delivery_id: Set(delivery_id.to_owned()),
            drone_id: Set(String::new()),
            window_start_ms: Set(0),
            window_end_ms: Set(0),
            status: Set(ReservationStatus::Released.as_str().to_owned()),
            package_id: Set(String::new()),
            size: Set(PackageSize::Small.as_str().to_owned()),
            owner_id: Set(None),
            pickup_location: Set(String::new()),
            drop_off_location: Set(String::new()),
            expedited: Set(false),
            created_at: Set(now),
            updated_at: Set(now),
        })
        .on_conflict(
            OnConflict::column(reservation::Column::DeliveryId)
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(db)
        .await?;
        // A reservation created between the read and the insert is released like any other.
        let now_there = reservation::Entity::find_by_id(delivery_id.to_owned())
            .one(db)
            .await?;
        return match now_there {
            Some(r) if !is_tombstone(&r) => Box::pin(release(db, delivery_id)).await,
            _ => {
                tracing::info!(
                    delivery_id,
                    "release of an unknown reservation: tombstone kept"
                );
                Err(StoreError::ReservationNotFound(delivery_id.to_owned()))
            }
        };
    };
    if is_tombstone(&current) {
        return Err(StoreError::ReservationNotFound(delivery_id.to_owned()));
    }
    if current.status == ReservationStatus::Released.as_str() {
        return to_wire(current);
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
    let released = reservation::Entity::find_by_id(delivery_id.to_owned())
        .one(db)
        .await?
        .ok_or_else(|| StoreError::ReservationNotFound(delivery_id.to_owned()))?;
    to_wire(released)
}
