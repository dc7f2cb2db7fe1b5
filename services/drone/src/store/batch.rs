//! Many reservation requests in one call (`POST /api/dronedeliveries/batch`), each answered as
//! [`reserve`] answers it alone.
//!
//! On PostgreSQL the batch's new deliveries cost two statements whatever their number: one read
//! of the active reservations overlapping the batch's windows (and of which of its deliveries
//! have a row already), then one multi-row insert of a drone chosen for each new one (see
//! [`assign`]). Everything that insert did not settle (a reservation
//! already there, a drone taken concurrently, a moved window, no free drone) goes through the
//! single path, so its answer is exactly the single call's. The database still decides every
//! race: the insert skips a row whose delivery already has one (`ON CONFLICT (delivery_id) DO
//! NOTHING`); should a concurrent writer have taken a picked drone, the no-overlap exclusion
//! constraint fails that statement, and the insert runs again with every constraint as an
//! arbiter (`ON CONFLICT DO NOTHING`), which skips that row without failing the others.

use std::collections::{HashMap, HashSet};

use contracts::DroneReservationRequest;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DbBackend, DbErr, EntityTrait, QueryFilter,
    RuntimeErr, Statement, Value,
};
use service_kit::db::{classify, DbErrorKind};

use super::{reserve, settled, to_wire, window_of, Outcome, StoreError, StoreResult};
use crate::entity::reservation;
use crate::fleet::{size_rank, DroneCache};
use crate::ReservationSettings;

/// Reserves a drone for each `(delivery id, request)`, answering each as [`reserve`] would with
/// the items sent one after another in order: the first occurrence of a delivery acts, a later
/// one finds what it did. The outer error (the database failing) fails the whole batch; the inner
/// ones are the items' own answers.
pub(crate) async fn reserve_batch(
    db: &DatabaseConnection,
    drones: &DroneCache,
    settings: &ReservationSettings,
    items: &[(&str, &DroneReservationRequest)],
) -> StoreResult<Vec<StoreResult<Outcome>>> {
    // SQLite serialises writes anyway: the single path, item after item.
    let mut early = if db.get_database_backend() == DbBackend::Postgres {
        reserve_new(db, drones, settings, items).await?
    } else {
        Vec::new()
    };
    early.resize_with(items.len(), || None);
    let mut answers = Vec::with_capacity(items.len());
    for (&(delivery_id, req), answer) in items.iter().zip(early) {
        answers.push(match answer {
            Some(answer) => answer,
            None => own_answer(reserve(db, drones, settings, delivery_id, req).await)?,
        });
    }
    Ok(answers)
}

/// An item's answer, or the database's failure, which is the whole batch's.
fn own_answer(answer: StoreResult<Outcome>) -> StoreResult<StoreResult<Outcome>> {
    match answer {
        Err(StoreError::Db(e)) => Err(StoreError::Db(e)),
        answer => Ok(answer),
    }
}

/// One first occurrence of a delivery in a batch, as the drone assignment sees it.
#[derive(Debug)]
struct Wanted {
    /// The item's place in the batch.
    item: usize,
    start: i64,
    end: i64,
    /// The drones that can carry it, in the order the single path tries them.
    candidates: Vec<String>,
    /// Candidates holding an active reservation that overlaps `[start, end)`.
    busy: HashSet<String>,
    /// The delivery has a row already (a replay, a move, a release): not one to insert.
    taken: bool,
}

/// The set-wise part of a PostgreSQL batch: the items it settled (created, or found as the single
/// path would find them); `None` for the items left to the single path.
async fn reserve_new(
    db: &DatabaseConnection,
    drones: &DroneCache,
    settings: &ReservationSettings,
    items: &[(&str, &DroneReservationRequest)],
) -> StoreResult<Vec<Option<StoreResult<Outcome>>>> {
    let mut seen = HashSet::with_capacity(items.len());
    let mut wanted = Vec::with_capacity(items.len());
    for (item, &(delivery_id, req)) in items.iter().enumerate() {
        // A later occurrence acts after the first, through the single path.
        if !seen.insert(delivery_id) {
            continue;
        }
        let (start, end) = window_of(req, settings);
        wanted.push(Wanted {
            item,
            start,
            end,
            candidates: drones
                .candidates(db, delivery_id, size_rank(req.size), None)
                .await?,
            busy: HashSet::new(),
            taken: false,
        });
    }
    read_busy(db, items, &mut wanted).await?;
    let picks = assign(&wanted);
    let mut created = insert_picked(db, items, &wanted, &picks).await?;

    let not_created: Vec<&str> = wanted
        .iter()
        .map(|w| items[w.item].0)
        .filter(|id| !created.contains_key(*id))
        .collect();
    let mut existing: HashMap<String, reservation::Model> = HashMap::new();
    if !not_created.is_empty() {
        // A statement of its own, after the insert: it sees a row a concurrent writer committed
        // while the insert waited on it.
        existing = reservation::Entity::find()
            .filter(reservation::Column::DeliveryId.is_in(not_created))
            .all(db)
            .await?
            .into_iter()
            .map(|m| (m.delivery_id.clone(), m))
            .collect();
    }
    tracing::debug!(
        items = items.len(),
        created = created.len(),
        found = existing.len(),
        "drone batch reserved"
    );

    let mut answers: Vec<Option<StoreResult<Outcome>>> =
        std::iter::repeat_with(|| None).take(items.len()).collect();
    for w in &wanted {
        let (delivery_id, req) = items[w.item];
        answers[w.item] = match (created.remove(delivery_id), existing.get(delivery_id)) {
            (Some(row), _) => Some(to_wire(row).map(Outcome::Created)),
            (None, Some(current)) => {
                settled(delivery_id, current, size_rank(req.size), w.start, w.end)
            }
            // A concurrent request took the drone picked for it, or none was free.
            (None, None) => None,
        };
    }
    Ok(answers)
}

/// The drones busy during each wanted window (`ord`, `busy`), and the wanted deliveries that have
/// a row already (`taken`).
///
/// Written so that each window is one probe of the no-overlap index (window first), whatever the
/// table's statistics say. Two plans were measured with `EXPLAIN ANALYZE` on 10,000–20,000
/// reservations and 32 windows, generic plan (as prepared statements get). With a condition on
/// the candidate drones, or with a plain join that a never-analysed table (a fresh database
/// under load) estimates at 15 rows, PostgreSQL read every active reservation once and filtered
/// the join: 90–391 ms per batch, which made Drone's database the suite's bottleneck in
/// bench-e2e. The `LATERAL` subquery with `OFFSET 0` cannot be flattened into such a join, so
/// the window is the index condition: 0.5 ms. The few overlapping reservations of drones that are
/// not candidates are harmless: only candidates are looked up.
///
/// The deliveries that have a row are found the same way, one probe of the primary key each. As
/// `delivery_id = ANY($3)`, the generic plan made while the table was small (the first calls
/// after a start, before autovacuum's first `ANALYZE`) was a sequential scan that compared every
/// row with every id, kept as the table grew: at 1,000 bookings/s, 21 ms per batch after 20 s
/// (`pg_stat_statements`), a third of Drone's database.
const PG_BUSY: &str = "
SELECT w.ord, r.drone_id AS busy, NULL::text AS taken
FROM unnest($1::int8[], $2::int8[]) WITH ORDINALITY AS w(start_ms, end_ms, ord)
CROSS JOIN LATERAL (
    SELECT r.drone_id FROM reservations r
    WHERE r.status = 'active'
      AND int8range(r.window_start_ms, r.window_end_ms, '[)') && int8range(w.start_ms, w.end_ms, '[)')
    OFFSET 0
) r
UNION ALL
SELECT NULL, NULL, r.delivery_id
FROM unnest($3::text[]) AS t(id)
CROSS JOIN LATERAL (
    SELECT r.delivery_id FROM reservations r WHERE r.delivery_id = t.id OFFSET 0
) r";

/// Fills in each window's busy candidates, and which deliveries have a row already, in one
/// statement for the whole batch. It asks the question of `free_drones` and
/// `PG_INSERT_FIRST_FREE` the other way round: one probe of the exclusion constraint's GiST
/// index (window first) per window, returning the (few) overlapping reservations, rather than
/// one probe per window and candidate.
async fn read_busy(
    db: &DatabaseConnection,
    items: &[(&str, &DroneReservationRequest)],
    wanted: &mut [Wanted],
) -> Result<(), DbErr> {
    if wanted.is_empty() {
        return Ok(());
    }
    let starts: Vec<i64> = wanted.iter().map(|w| w.start).collect();
    let ends: Vec<i64> = wanted.iter().map(|w| w.end).collect();
    let ids: Vec<String> = wanted.iter().map(|w| items[w.item].0.to_owned()).collect();
    let values: Vec<Value> = vec![starts.into(), ends.into(), ids.into()];
    let rows = db
        .query_all(Statement::from_sql_and_values(
            DbBackend::Postgres,
            PG_BUSY,
            values,
        ))
        .await?;
    for row in rows {
        if let Some(taken) = row.try_get::<Option<String>>("", "taken")? {
            for w in wanted.iter_mut().filter(|w| items[w.item].0 == taken) {
                w.taken = true;
            }
            continue;
        }
        let ord: Option<i64> = row.try_get("", "ord")?;
        let drone_id: String = row.try_get("", "busy")?;
        let w = ord
            .and_then(|ord| usize::try_from(ord - 1).ok())
            .and_then(|i| wanted.get_mut(i))
            .ok_or_else(|| DbErr::Custom(format!("busy drone for unknown window {ord:?}")))?;
        w.busy.insert(drone_id);
    }
    Ok(())
}

/// For each wanted window, in the batch's order, the first of its candidates that is neither busy
/// in the database nor given to an earlier window of the batch that overlaps it: what the single
/// path would pick with the items sent one after another. `None` when no candidate is left, or
/// the delivery has a row already.
fn assign(wanted: &[Wanted]) -> Vec<Option<&str>> {
    let mut given: HashMap<&str, Vec<(i64, i64)>> = HashMap::new();
    wanted
        .iter()
        .map(|w| {
            if w.taken {
                return None;
            }
            let pick = w.candidates.iter().map(String::as_str).find(|drone| {
                !w.busy.contains(*drone)
                    && given.get(drone).is_none_or(|windows| {
                        windows.iter().all(|&(s, e)| e <= w.start || w.end <= s)
                    })
            })?;
            given.entry(pick).or_default().push((w.start, w.end));
            Some(pick)
        })
        .collect()
}

/// The multi-row insert of picked reservations, with its `ON CONFLICT` clause.
macro_rules! insert_picked {
    ($on_conflict:literal) => {
        concat!("
INSERT INTO reservations (delivery_id, drone_id, window_start_ms, window_end_ms, status, package_id,
    size, owner_id, pickup_location, drop_off_location, expedited, created_at, updated_at)
SELECT i.delivery_id, i.drone_id, i.start_ms, i.end_ms, 'active', i.package_id, i.size,
    NULLIF(i.owner_id, ''), i.pickup_location, i.drop_off_location, i.expedited, $11, $11
FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[], $5::text[], $6::text[], $7::text[],
    $8::text[], $9::text[], $10::bool[])
    AS i(delivery_id, drone_id, start_ms, end_ms, package_id, size, owner_id, pickup_location,
         drop_off_location, expedited)
", $on_conflict, "\nRETURNING *")
    };
}

/// Skips a delivery that has a row already; a drone a concurrent writer took fails the statement.
const PG_INSERT_PICKED: &str = insert_picked!("ON CONFLICT (delivery_id) DO NOTHING");

/// [`PG_INSERT_PICKED`] with every constraint as an arbiter, the no-overlap exclusion constraint
/// among them: a row whose drone a concurrent writer took is skipped instead of failing the
/// statement. PostgreSQL then checks each arbiter before and again after a row goes in, which
/// made the insert about 40 % dearer a row (the 16,000 rows of a bench run into a copy of the
/// table: 83–87 µs a row against 50–62), so it runs only after the cheaper statement met such a
/// conflict.
const PG_INSERT_PICKED_ANY_CONFLICT: &str = insert_picked!("ON CONFLICT DO NOTHING");

/// Inserts the picked reservations in one statement (two when a concurrent writer took a picked
/// drone: [`PG_INSERT_PICKED_ANY_CONFLICT`]); the rows it created, by delivery id.
///
/// Rows go in drone then window order: two concurrent batches then wait on each other's rows in
/// one order on the exclusion constraint. They can still wait on each other through the primary
/// key (the same delivery in both, on different drones), which PostgreSQL breaks by failing one
/// statement as a deadlock; nothing of that statement was written, so its items then take the
/// single path like any item this insert did not create.
async fn insert_picked(
    db: &DatabaseConnection,
    items: &[(&str, &DroneReservationRequest)],
    wanted: &[Wanted],
    picks: &[Option<&str>],
) -> Result<HashMap<String, reservation::Model>, DbErr> {
    let mut rows: Vec<(&str, &Wanted)> = picks
        .iter()
        .zip(wanted)
        .filter_map(|(pick, w)| pick.map(|drone| (drone, w)))
        .collect();
    if rows.is_empty() {
        return Ok(HashMap::new());
    }
    rows.sort_unstable_by_key(|&(drone, w)| (drone, w.start));
    let column = |f: &dyn Fn(&str, &Wanted, &DroneReservationRequest) -> String| -> Value {
        rows.iter()
            .map(|&(drone, w)| f(drone, w, items[w.item].1))
            .collect::<Vec<String>>()
            .into()
    };
    let values: Vec<Value> = vec![
        column(&|_, w, _| items[w.item].0.to_owned()),
        column(&|drone, _, _| drone.to_owned()),
        rows.iter()
            .map(|(_, w)| w.start)
            .collect::<Vec<i64>>()
            .into(),
        rows.iter().map(|(_, w)| w.end).collect::<Vec<i64>>().into(),
        column(&|_, _, req| req.package_id.clone()),
        column(&|_, _, req| req.size.as_str().to_owned()),
        // Arrays cannot carry NULL here; an owner id is never empty.
        column(&|_, _, req| req.owner_id.clone().unwrap_or_default()),
        column(&|_, _, req| req.pickup_location.clone()),
        column(&|_, _, req| req.drop_off_location.clone()),
        rows.iter()
            .map(|(_, w)| items[w.item].1.expedited)
            .collect::<Vec<bool>>()
            .into(),
        service_kit::now().into(),
    ];
    let insert = |sql: &'static str, values: Vec<Value>| {
        reservation::Entity::find()
            .from_raw_sql(Statement::from_sql_and_values(
                DbBackend::Postgres,
                sql,
                values,
            ))
            .all(db)
    };
    let inserted = match insert(PG_INSERT_PICKED, values.clone()).await {
        // Nothing of the failed statement was written: the same rows again, skipping the taken.
        Err(e) if is_overlap(&e) => insert(PG_INSERT_PICKED_ANY_CONFLICT, values).await,
        inserted => inserted,
    };
    match inserted {
        Ok(created) => Ok(created
            .into_iter()
            .map(|m| (m.delivery_id.clone(), m))
            .collect()),
        Err(e) if is_deadlock(&e) || classify(&e) == DbErrorKind::ConstraintConflict => {
            tracing::info!(error = %e, rows = rows.len(), "drone batch insert gave way, items go one by one");
            Ok(HashMap::new())
        }
        Err(e) => Err(e),
    }
}

/// PostgreSQL's `deadlock_detected` (`40P01`).
fn is_deadlock(e: &DbErr) -> bool {
    sqlstate(e).as_deref() == Some("40P01")
}

/// PostgreSQL's `exclusion_violation` (`23P01`): the no-overlap constraint refused a row.
fn is_overlap(e: &DbErr) -> bool {
    sqlstate(e).as_deref() == Some("23P01")
}

fn sqlstate(e: &DbErr) -> Option<std::borrow::Cow<'_, str>> {
    match e {
        DbErr::Query(RuntimeErr::SqlxError(sea_orm::sqlx::Error::Database(db)))
        | DbErr::Exec(RuntimeErr::SqlxError(sea_orm::sqlx::Error::Database(db))) => db.code(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The batch read's generic plan (what a prepared statement ends up with, and keeps while the
    /// table grows), made on a fresh database whose tables were never analysed: the batch's
    /// deliveries must be probes of the primary key, never a scan of `reservations`.
    #[tokio::test]
    async fn the_busy_read_probes_indexes_on_a_fresh_table() {
        let plan = test_support::generic_plan::<crate::Migrator>(
            "int8[], int8[], text[]",
            PG_BUSY,
            "'{0}', '{60000}', '{d1}'",
        )
        .await;
        assert!(
            plan.contains("using reservations_pkey on reservations")
                && !plan.contains("Seq Scan on reservations"),
            "{plan}"
        );
    }

    fn wanted(start: i64, end: i64, candidates: &[&str], busy: &[&str]) -> Wanted {
        Wanted {
            item: 0,
            start,
            end,
            candidates: candidates.iter().map(|c| (*c).to_owned()).collect(),
            busy: busy.iter().map(|c| (*c).to_owned()).collect(),
            taken: false,
        }
    }

    #[test]
    fn overlapping_windows_of_a_batch_get_different_drones_in_preference_order() {
        let fleet = ["d1", "d2", "d3"];
        let batch = [
            wanted(0, 60, &fleet, &[]),
            wanted(30, 90, &fleet, &[]),
            wanted(40, 50, &fleet, &[]),
            wanted(45, 55, &fleet, &[]),
            // Overlaps the first only: the second's drone is free for it.
            wanted(10, 20, &fleet, &[]),
        ];
        // The fourth overlaps the first three, which hold every drone.
        assert_eq!(
            assign(&batch),
            [Some("d1"), Some("d2"), Some("d3"), None, Some("d2")]
        );
    }

    #[test]
    fn windows_that_only_touch_share_a_drone() {
        let batch = [
            wanted(0, 60, &["d1", "d2"], &[]),
            wanted(60, 120, &["d1", "d2"], &[]),
            wanted(-60, 0, &["d1", "d2"], &[]),
        ];
        assert_eq!(assign(&batch), [Some("d1"), Some("d1"), Some("d1")]);
    }

    #[test]
    fn busy_drones_are_skipped_and_each_window_keeps_its_own_order() {
        let batch = [
            wanted(0, 60, &["d2", "d1", "d3"], &["d2"]),
            // Another size: only d3 carries it, and the first item did not need it.
            wanted(0, 60, &["d3"], &[]),
            // d2's reservation in the database ends at 30.
            wanted(30, 90, &["d1", "d2", "d3"], &["d3"]),
            wanted(100, 160, &["d2", "d1"], &["d2"]),
        ];
        assert_eq!(
            assign(&batch),
            [Some("d1"), Some("d3"), Some("d2"), Some("d1")]
        );
        assert_eq!(assign(&[wanted(0, 60, &[], &[])]), [None]);
        // A delivery with a row already takes no drone from the others.
        let mut replay = wanted(0, 60, &["d1"], &[]);
        replay.taken = true;
        assert_eq!(
            assign(&[replay, wanted(0, 60, &["d1"], &[])]),
            [None, Some("d1")]
        );
    }

    /// A drone that a concurrent writer took after the batch read it as free: the cheap insert
    /// (only the primary key an arbiter) fails on the no-overlap constraint, and the insert with
    /// every constraint an arbiter then creates the batch's other rows and skips that one alone.
    #[tokio::test]
    #[allow(clippy::expect_used)] // a failed step fails the test
    async fn a_drone_taken_meanwhile_skips_its_row_and_the_others_are_created() {
        let fresh = test_support::MigratedDatabase::new::<crate::Migrator>().await;
        // The concurrent writer's reservation, committed: d1 during [0, 60000).
        fresh
            .db
            .execute_unprepared(
                "INSERT INTO reservations (delivery_id, drone_id, window_start_ms, window_end_ms, \
                 status, package_id, size, owner_id, pickup_location, drop_off_location, \
                 expedited, created_at, updated_at) VALUES ('other', 'd1', 0, 60000, 'active', \
                 'p', 'Small', NULL, 'a', 'b', false, now(), now())",
            )
            .await
            .expect("the other writer's reservation");
        let request = |package: &str| DroneReservationRequest {
            pickup_time: chrono::DateTime::UNIX_EPOCH,
            pickup_location: "a".into(),
            drop_off_location: "b".into(),
            package_id: package.into(),
            size: contracts::PackageSize::Small,
            expedited: false,
            owner_id: Some("owner".into()),
        };
        let (x, y) = (request("px"), request("py"));
        let items = [("x", &x), ("y", &y)];
        let mut taken = wanted(30_000, 90_000, &["d1"], &[]);
        let mut free = wanted(60_000, 120_000, &["d2"], &[]);
        (taken.item, free.item) = (0, 1);
        let created = insert_picked(&fresh.db, &items, &[taken, free], &[Some("d1"), Some("d2")])
            .await
            .expect("the batch insert");
        assert_eq!(created.keys().collect::<Vec<_>>(), ["y"]);
        assert_eq!(created["y"].drone_id, "d2");
        fresh.drop().await;
    }
}
