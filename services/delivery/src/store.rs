//! Deliveries and their tracking history. Every function takes the connection; handlers stay thin.
//!
//! A delivery's stage is never stored on the delivery: it is the stage of its latest tracking event.
//! Each state change locks the delivery row (PostgreSQL `FOR UPDATE`; SQLite has a single writer),
//! reads the latest event, decides, and appends the next event in the same transaction. Should two
//! writers still pick the same sequence, the primary key on `(delivery_id, sequence)` rejects one of
//! them and that one starts over, seeing the other's event.

use std::collections::{HashMap, HashSet};

use chrono::SubsecRound;
use contracts::{
    Confirmation, ConfirmationType, Delivery, DeliveryPatch, DeliveryStage, DeliveryStatus,
    DeliveryUpsert, TrackingEvent, TrackingUpdate,
};
use sea_orm::sea_query::OnConflict;
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseConnection,
    DbBackend, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, Statement,
    TransactionTrait,
};
use service_kit::db::{classify, DbErrorKind};
use service_kit::{ApiError, ApiResult};

use crate::entity::{delivery, tracking_event};

/// How many times a state change starts over after colliding with a concurrent one.
const MAX_ATTEMPTS: usize = 5;

/// Creates the delivery and its `Created` event, or finds it already there (`None`; the body is then
/// ignored, so a replayed saga step has no second effect). `409 delivery-cancelled` when a cancel
/// came first (see [`is_tombstone`]).
#[tracing::instrument(skip_all, fields(delivery_id = %id))]
pub(crate) async fn create(
    db: &DatabaseConnection,
    id: &str,
    body: &DeliveryUpsert,
) -> ApiResult<Option<Delivery>> {
    let mut answers = create_many(db, &[(id, body)]).await?;
    answers.pop().unwrap_or_else(|| Err(unanswered(id)))
}

/// [`create`] for many items at once (a batch): one answer per item, in the items' order, each the
/// one [`create`] would give it alone. The items are applied in one transaction: on PostgreSQL one
/// statement for the inserts and, when some ids were there already, one read to tell tombstones
/// from deliveries; on SQLite (one writer anyway) the single inserts in one transaction. An id
/// given more than once acts once, with its first item; the later ones answer as a repeat would.
/// The outer error is a failure of the whole (the database unavailable); as after a failed single
/// call, what a retry finds was either created by the failed attempt or not at all.
#[tracing::instrument(skip_all, fields(items = items.len()))]
pub(crate) async fn create_many(
    db: &DatabaseConnection,
    items: &[(&str, &DeliveryUpsert)],
) -> ApiResult<Vec<ApiResult<Option<Delivery>>>> {
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let firsts = first_of_each_id(items);
    let now = service_kit::now();
    let outcomes = if db.get_database_backend() == DbBackend::Postgres {
        create_in_one_statement(db, &firsts, now).await?
    } else {
        create_in_one_transaction(db, &firsts, now).await?
    };
    let ids = items.iter().map(|(id, _)| *id);
    Ok(in_item_order(ids.clone(), outcomes)
        .into_iter()
        .zip(ids)
        .map(|(outcome, id)| outcome.map_or_else(|| Err(unanswered(id)), |o| o.answer(id)))
        .collect())
}

/// What creating one delivery found.
#[derive(Debug, PartialEq)]
enum Creation {
    /// Inserted now, with its `Created` event.
    Created(Box<delivery::Model>),
    /// There already (or a repeat of the creation): nothing changed.
    Found,
    /// A tombstone holds the id: cancelled before it was created.
    Cancelled,
}

impl Creation {
    /// What a repeat of the same creation answers after this one.
    fn repeated(&self) -> Self {
        match self {
            Creation::Created(_) | Creation::Found => Creation::Found,
            Creation::Cancelled => Creation::Cancelled,
        }
    }

    /// The answer of `PUT /api/deliveries/{id}`: the created delivery, `None` for "already there",
    /// or the refusal.
    fn answer(self, id: &str) -> ApiResult<Option<Delivery>> {
        match self {
            Creation::Created(row) => {
                tracing::debug!(delivery_id = id, drone_id = %row.drone_id, "delivery created");
                to_wire(*row, DeliveryStage::Created).map(Some)
            }
            Creation::Found => Ok(None),
            Creation::Cancelled => Err(ApiError::conflict(
                "delivery-cancelled",
                format!(
                    "delivery '{id}' was cancelled before it was created; it cannot be created now"
                ),
            )),
        }
    }
}

/// An item the store was given and did not answer (a bug, kept to its item).
fn unanswered(id: &str) -> ApiError {
    ApiError::Internal(anyhow::anyhow!(
        "the creation of delivery {id} was not answered"
    ))
}

/// The first item of each id, in order: the only ones that act.
fn first_of_each_id<'a, 'b>(
    items: &[(&'a str, &'b DeliveryUpsert)],
) -> Vec<(&'a str, &'b DeliveryUpsert)> {
    let mut seen = HashSet::with_capacity(items.len());
    items
        .iter()
        .filter(|(id, _)| seen.insert(*id))
        .copied()
        .collect()
}

/// One outcome per id of `ids`, in order: the first occurrence of an id takes what happened to
/// it, a later one what a repeat of that creation would find. `None` for an id without an outcome.
fn in_item_order<'a>(
    ids: impl Iterator<Item = &'a str>,
    mut outcomes: HashMap<&'a str, Creation>,
) -> Vec<Option<Creation>> {
    ids.map(|id| {
        outcomes.get_mut(id).map(|outcome| {
            let repeat = outcome.repeated();
            std::mem::replace(outcome, repeat)
        })
    })
    .collect()
}

/// PostgreSQL: the deliveries and their `Created` events in one statement (data-modifying CTEs),
/// one round trip and one implicit transaction for the whole batch. The rows are inserted in `id`
/// order, so that two batches with common ids wait for each other's inserts in the same order
/// instead of deadlocking.
const PG_CREATE: &str = "
WITH d AS (
    INSERT INTO deliveries (id, owner_id, pickup_location, drop_off_location, pickup_time, deadline,
        expedited, confirmation_required, package_id, drone_id, created_at, updated_at)
    SELECT i.id, i.owner_id, i.pickup_location, i.drop_off_location, i.pickup_time, i.deadline,
        i.expedited, i.confirmation_required, i.package_id, i.drone_id, $11, $11
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::text[],
        $7::boolean[], $8::text[], $9::text[], $10::text[])
        AS i(id, owner_id, pickup_location, drop_off_location, pickup_time, deadline, expedited,
            confirmation_required, package_id, drone_id)
    ORDER BY i.id
    ON CONFLICT (id) DO NOTHING
    RETURNING *
), e AS (
    INSERT INTO tracking_events (delivery_id, sequence, stage, location, detail, at)
    SELECT id, 1, $12, NULL, NULL, $11 FROM d
)
SELECT * FROM d";

/// `items` (distinct ids) created with [`PG_CREATE`]; then, for the ids already there, one read
/// (a later statement: it sees what a concurrent creation committed while the insert waited).
async fn create_in_one_statement<'a>(
    db: &DatabaseConnection,
    items: &[(&'a str, &DeliveryUpsert)],
    now: chrono::DateTime<chrono::Utc>,
) -> Result<HashMap<&'a str, Creation>, sea_orm::DbErr> {
    let texts = |field: fn(&DeliveryUpsert) -> &str| {
        sea_orm::Value::from(
            items
                .iter()
                .map(|(_, body)| field(body).to_owned())
                .collect::<Vec<String>>(),
        )
    };
    let values: Vec<sea_orm::Value> = vec![
        items
            .iter()
            .map(|(id, _)| (*id).to_owned())
            .collect::<Vec<String>>()
            .into(),
        texts(|b| &b.owner_id),
        texts(|b| &b.pickup_location),
        texts(|b| &b.drop_off_location),
        // Stored with the precision both databases keep, so the 201 body equals later reads.
        items
            .iter()
            .map(|(_, b)| b.pickup_time.trunc_subsecs(6))
            .collect::<Vec<_>>()
            .into(),
        texts(|b| &b.deadline),
        items
            .iter()
            .map(|(_, b)| b.expedited)
            .collect::<Vec<bool>>()
            .into(),
        texts(|b| b.confirmation_required.as_str()),
        texts(|b| &b.package_id),
        texts(|b| &b.drone_id),
        now.into(),
        DeliveryStage::Created.as_str().into(),
    ];
    let created = delivery::Entity::find()
        .from_raw_sql(Statement::from_sql_and_values(
            DbBackend::Postgres,
            PG_CREATE,
            values,
        ))
        .all(db)
        .await?;
    let mut outcomes: HashMap<&str, Creation> =
        items.iter().map(|(id, _)| (*id, Creation::Found)).collect();
    for row in created {
        if let Some(outcome) = outcomes.get_mut(row.id.as_str()) {
            *outcome = Creation::Created(Box::new(row));
        }
    }
    mark_tombstones(db, &mut outcomes).await?;
    Ok(outcomes)
}

/// SQLite: `items` (distinct ids) inserted one by one, all in one transaction.
async fn create_in_one_transaction<'a>(
    db: &DatabaseConnection,
    items: &[(&'a str, &DeliveryUpsert)],
    now: chrono::DateTime<chrono::Utc>,
) -> Result<HashMap<&'a str, Creation>, sea_orm::DbErr> {
    // On SQLite the pool has one connection: from here on use only `txn`.
    let txn = db.begin().await?;
    let mut outcomes = HashMap::with_capacity(items.len());
    for (id, body) in items {
        let outcome = match insert_if_absent(&txn, id, body, now).await? {
            Some(row) => Creation::Created(Box::new(row)),
            None => Creation::Found,
        };
        outcomes.insert(*id, outcome);
    }
    mark_tombstones(&txn, &mut outcomes).await?;
    txn.commit().await?;
    Ok(outcomes)
}

/// Inserts the delivery and its `Created` event unless its id is taken (`None`).
async fn insert_if_absent(
    conn: &impl ConnectionTrait,
    id: &str,
    body: &DeliveryUpsert,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Option<delivery::Model>, sea_orm::DbErr> {
    let inserted = delivery::Entity::insert(delivery::ActiveModel {
        id: Set(id.to_owned()),
        owner_id: Set(body.owner_id.clone()),
        pickup_location: Set(body.pickup_location.clone()),
        drop_off_location: Set(body.drop_off_location.clone()),
        // Stored with the precision both databases keep, so the 201 body equals later reads.
        pickup_time: Set(body.pickup_time.trunc_subsecs(6)),
        deadline: Set(body.deadline.clone()),
        expedited: Set(body.expedited),
        confirmation_required: Set(body.confirmation_required.as_str().to_owned()),
        package_id: Set(body.package_id.clone()),
        drone_id: Set(body.drone_id.clone()),
        created_at: Set(now),
        updated_at: Set(now),
    })
    .on_conflict(
        OnConflict::column(delivery::Column::Id)
            .do_nothing()
            .to_owned(),
    )
    .exec_with_returning(conn)
    .await;
    let row = match inserted {
        Ok(row) => row,
        // Nothing inserted (PostgreSQL reports no returned row, SQLite no inserted row).
        Err(sea_orm::DbErr::RecordNotFound(_) | sea_orm::DbErr::RecordNotInserted) => {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    let created = NewEvent {
        stage: DeliveryStage::Created,
        location: None,
        detail: None,
    };
    insert_event(conn, id, 1, &created, now).await?;
    Ok(Some(row))
}

/// A tombstone: what cancelling a delivery that does not exist (yet) leaves behind, so that a
/// creation still on its way (a timed-out attempt of a saga that was since compensated) cannot
/// create it afterwards. It has no owner and no events and is never shown: reads answer `404`.
fn is_tombstone(row: &delivery::Model) -> bool {
    row.owner_id.is_empty()
}

/// After an insert found ids taken: those a tombstone holds are [`Creation::Cancelled`].
async fn mark_tombstones(
    conn: &impl ConnectionTrait,
    outcomes: &mut HashMap<&str, Creation>,
) -> Result<(), sea_orm::DbErr> {
    let taken: Vec<String> = outcomes
        .iter()
        .filter(|(_, outcome)| **outcome == Creation::Found)
        .map(|(id, _)| (*id).to_owned())
        .collect();
    if taken.is_empty() {
        return Ok(());
    }
    let rows = delivery::Entity::find()
        .filter(delivery::Column::Id.is_in(taken))
        .all(conn)
        .await?;
    for row in rows.iter().filter(|row| is_tombstone(row)) {
        if let Some(outcome) = outcomes.get_mut(row.id.as_str()) {
            *outcome = Creation::Cancelled;
        }
    }
    Ok(())
}

/// The delivery with the stage of its latest event.
pub(crate) async fn get(db: &DatabaseConnection, id: &str) -> ApiResult<Delivery> {
    let row = find_row(db, id).await?;
    let latest = latest_event(db, id).await?;
    to_wire(row, parse_stage(&latest)?)
}

/// Stage, last known location, time of the latest event and number of events, all from the events.
pub(crate) async fn status(db: &DatabaseConnection, id: &str) -> ApiResult<DeliveryStatus> {
    let latest = latest_event(db, id).await?;
    // Events are immutable and append-only: bounding by the latest sequence read above keeps the
    // three reads consistent even while other events are appended.
    let upto = tracking_event::Column::Sequence.lte(latest.sequence);
    let events = tracking_event::Entity::find()
        .filter(tracking_event::Column::DeliveryId.eq(id))
        .filter(upto.clone())
        .count(db)
        .await?;
    let last_location = if latest.location.is_some() {
        latest.location.clone()
    } else {
        // Events without a position (reschedules, cancellations) keep the last one reported.
        tracking_event::Entity::find()
            .filter(tracking_event::Column::DeliveryId.eq(id))
            .filter(upto)
            .filter(tracking_event::Column::Location.is_not_null())
            .order_by_desc(tracking_event::Column::Sequence)
            .one(db)
            .await?
            .and_then(|e| e.location)
    };
    Ok(DeliveryStatus {
        delivery_id: id.to_owned(),
        stage: parse_stage(&latest)?,
        last_location,
        last_event_at: latest.at,
        events,
    })
}

/// The whole history, oldest first.
pub(crate) async fn events(db: &DatabaseConnection, id: &str) -> ApiResult<Vec<TrackingEvent>> {
    let rows = tracking_event::Entity::find()
        .filter(tracking_event::Column::DeliveryId.eq(id))
        .order_by_asc(tracking_event::Column::Sequence)
        .all(db)
        .await?;
    // A delivery is created together with its first event, so no events means no delivery.
    if rows.is_empty() {
        return Err(ApiError::not_found("delivery", id));
    }
    rows.into_iter().map(event_to_wire).collect()
}

/// Applies a reschedule. Fields equal to the stored ones are not changes; a patch that changes
/// nothing (a retry) appends no event.
#[tracing::instrument(skip_all, fields(delivery_id = %id))]
pub(crate) async fn reschedule(
    db: &DatabaseConnection,
    id: &str,
    patch: &DeliveryPatch,
) -> ApiResult<Delivery> {
    let outcome = transition(db, id, |row, stage| {
        if stage.is_final() {
            return Err(closed(id, stage, "rescheduled"));
        }
        let changed = apply_patch(row, patch);
        if changed.is_empty() {
            return Ok(None);
        }
        Ok(Some(NewEvent {
            stage: DeliveryStage::Rescheduled,
            location: None,
            detail: Some(changed.join(", ")),
        }))
    })
    .await?;
    Ok(outcome.delivery)
}

/// Cancels; cancelling a cancelled delivery succeeds without a second event. Cancelling a delivery
/// that does not exist answers `404` and leaves a tombstone, so it cannot be created afterwards.
#[tracing::instrument(skip_all, fields(delivery_id = %id))]
pub(crate) async fn cancel(db: &DatabaseConnection, id: &str) -> ApiResult<Delivery> {
    match cancel_existing(db, id).await {
        Err(ApiError::NotFound { .. }) => {}
        other => return other,
    }
    let now = service_kit::now();
    delivery::Entity::insert(delivery::ActiveModel {
        id: Set(id.to_owned()),
        owner_id: Set(String::new()),
        pickup_location: Set(String::new()),
        drop_off_location: Set(String::new()),
        pickup_time: Set(now.trunc_subsecs(6)),
        deadline: Set(String::new()),
        expedited: Set(false),
        confirmation_required: Set(ConfirmationType::None.as_str().to_owned()),
        package_id: Set(String::new()),
        drone_id: Set(String::new()),
        created_at: Set(now),
        updated_at: Set(now),
    })
    .on_conflict(
        OnConflict::column(delivery::Column::Id)
            .do_nothing()
            .to_owned(),
    )
    .exec_without_returning(db)
    .await?;
    tracing::info!(
        delivery_id = id,
        "cancel of an unknown delivery: tombstone kept"
    );
    // A delivery created between the two statements is cancelled like any other; otherwise the
    // tombstone answers 404.
    cancel_existing(db, id).await
}

async fn cancel_existing(db: &DatabaseConnection, id: &str) -> ApiResult<Delivery> {
    let outcome = transition(db, id, |_, stage| match stage {
        DeliveryStage::Cancelled => Ok(None),
        DeliveryStage::Completed => Err(closed(id, stage, "cancelled")),
        _ => Ok(Some(NewEvent {
            stage: DeliveryStage::Cancelled,
            location: None,
            detail: None,
        })),
    })
    .await?;
    Ok(outcome.delivery)
}

/// Records the drone's progress (`HeadedToPickup` / `HeadedToDropoff`).
#[tracing::instrument(skip_all, fields(delivery_id = %id))]
pub(crate) async fn track(
    db: &DatabaseConnection,
    id: &str,
    update: &TrackingUpdate,
) -> ApiResult<TrackingEvent> {
    if !matches!(
        update.stage,
        DeliveryStage::HeadedToPickup | DeliveryStage::HeadedToDropoff
    ) {
        return Err(ApiError::field(
            "stage",
            "must be HeadedToPickup or HeadedToDropoff",
        ));
    }
    let outcome = transition(db, id, |_, stage| {
        if stage.is_final() {
            return Err(closed(id, stage, "tracked"));
        }
        Ok(Some(NewEvent {
            stage: update.stage,
            location: update.location.clone(),
            detail: None,
        }))
    })
    .await?;
    appended(id, outcome)
}

/// Records the hand-over: the delivery is completed.
#[tracing::instrument(skip_all, fields(delivery_id = %id))]
pub(crate) async fn complete(
    db: &DatabaseConnection,
    id: &str,
    confirmation: &Confirmation,
) -> ApiResult<TrackingEvent> {
    let outcome = transition(db, id, |_, stage| match stage {
        DeliveryStage::Completed => Err(ApiError::conflict(
            "already-completed",
            format!("delivery '{id}' is already completed"),
        )),
        DeliveryStage::Cancelled => Err(closed(id, stage, "confirmed")),
        _ => Ok(Some(NewEvent {
            stage: DeliveryStage::Completed,
            location: confirmation.location.clone(),
            detail: Some(confirmation.confirmation_type.as_str().to_owned()),
        })),
    })
    .await?;
    appended(id, outcome)
}

/// An event to append, decided by a state change.
struct NewEvent {
    stage: DeliveryStage,
    location: Option<String>,
    detail: Option<String>,
}

struct Outcome {
    delivery: Delivery,
    /// `None` when the change was a no-op (a repeated cancel, an empty reschedule).
    event: Option<TrackingEvent>,
}

/// Runs one state change: `decide` sees the locked delivery (which it may edit) and its current
/// stage, and returns the event to append, `None` for "nothing to do", or the refusal.
async fn transition<F>(db: &DatabaseConnection, id: &str, mut decide: F) -> ApiResult<Outcome>
where
    F: FnMut(&mut delivery::Model, DeliveryStage) -> ApiResult<Option<NewEvent>>,
{
    for attempt in 1..=MAX_ATTEMPTS {
        if let Some(outcome) = try_transition(db, id, &mut decide).await? {
            return Ok(outcome);
        }
        tracing::debug!(
            delivery_id = id,
            attempt,
            "concurrent tracking event, starting over"
        );
    }
    Err(ApiError::unavailable(
        "delivery-busy",
        format!("delivery '{id}' is being changed by other requests; try again"),
        1,
    ))
}

/// One attempt; `Ok(None)` when a concurrent writer took the sequence number first.
async fn try_transition<F>(
    db: &DatabaseConnection,
    id: &str,
    decide: &mut F,
) -> ApiResult<Option<Outcome>>
where
    F: FnMut(&mut delivery::Model, DeliveryStage) -> ApiResult<Option<NewEvent>>,
{
    // On SQLite the pool has one connection: from here on use only `txn`.
    let txn = db.begin().await?;
    let row = delivery::Entity::find_by_id(id.to_owned())
        .lock_exclusive()
        .one(&txn)
        .await?
        .filter(|row| !is_tombstone(row))
        .ok_or_else(|| ApiError::not_found("delivery", id))?;
    let latest = latest_event(&txn, id).await?;
    let stage = parse_stage(&latest)?;
    let mut edited = row.clone();
    let Some(new) = decide(&mut edited, stage)? else {
        txn.rollback().await?;
        return Ok(Some(Outcome {
            delivery: to_wire(row, stage)?,
            event: None,
        }));
    };
    let now = service_kit::now();
    edited.updated_at = now;
    let saved = delivery::ActiveModel::from(edited)
        .reset_all()
        .update(&txn)
        .await?;
    let sequence = latest.sequence + 1;
    match insert_event(&txn, id, sequence, &new, now).await {
        Ok(()) => crate::outbox::enqueue(&txn, id, sequence, new.stage, now).await?,
        Err(e) if classify(&e) == DbErrorKind::UniqueViolation => {
            txn.rollback().await?;
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    }
    txn.commit().await?;
    tracing::info!(
        delivery_id = id,
        stage = new.stage.as_str(),
        sequence,
        "tracking event appended"
    );
    Ok(Some(Outcome {
        delivery: to_wire(saved, new.stage)?,
        event: Some(TrackingEvent {
            delivery_id: id.to_owned(),
            sequence,
            stage: new.stage,
            location: new.location,
            detail: new.detail,
            at: now,
        }),
    }))
}

/// Copies the patch's fields that differ into `row`; returns their wire names.
fn apply_patch(row: &mut delivery::Model, patch: &DeliveryPatch) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if let Some(t) = patch.pickup_time.map(|t| t.trunc_subsecs(6)) {
        if row.pickup_time != t {
            row.pickup_time = t;
            changed.push("pickupTime");
        }
    }
    let texts = [
        ("deadline", &patch.deadline, &mut row.deadline),
        (
            "pickupLocation",
            &patch.pickup_location,
            &mut row.pickup_location,
        ),
        (
            "dropOffLocation",
            &patch.drop_off_location,
            &mut row.drop_off_location,
        ),
        ("droneId", &patch.drone_id, &mut row.drone_id),
    ];
    for (name, new, stored) in texts {
        if let Some(new) = new {
            if stored.as_str() != new.as_str() {
                stored.clone_from(new);
                changed.push(name);
            }
        }
    }
    changed
}

fn closed(id: &str, stage: DeliveryStage, verb: &str) -> ApiError {
    ApiError::conflict(
        "delivery-closed",
        format!(
            "delivery '{id}' is {} and cannot be {verb}",
            stage.as_str().to_lowercase()
        ),
    )
}

fn appended(id: &str, outcome: Outcome) -> ApiResult<TrackingEvent> {
    outcome.event.ok_or_else(|| {
        ApiError::Internal(anyhow::anyhow!(
            "state change of delivery {id} appended no event"
        ))
    })
}

async fn insert_event(
    conn: &impl ConnectionTrait,
    id: &str,
    sequence: i64,
    event: &NewEvent,
    at: chrono::DateTime<chrono::Utc>,
) -> Result<(), sea_orm::DbErr> {
    tracking_event::Entity::insert(tracking_event::ActiveModel {
        delivery_id: Set(id.to_owned()),
        sequence: Set(sequence),
        stage: Set(event.stage.as_str().to_owned()),
        location: Set(event.location.clone()),
        detail: Set(event.detail.clone()),
        at: Set(at),
    })
    .exec_without_returning(conn)
    .await
    .map(|_| ())
}

async fn find_row(conn: &impl ConnectionTrait, id: &str) -> ApiResult<delivery::Model> {
    delivery::Entity::find_by_id(id.to_owned())
        .one(conn)
        .await?
        .filter(|row| !is_tombstone(row))
        .ok_or_else(|| ApiError::not_found("delivery", id))
}

/// The latest event; a delivery without one does not exist (both are written together).
async fn latest_event(conn: &impl ConnectionTrait, id: &str) -> ApiResult<tracking_event::Model> {
    tracking_event::Entity::find()
        .filter(tracking_event::Column::DeliveryId.eq(id))
        .order_by_desc(tracking_event::Column::Sequence)
        .one(conn)
        .await?
        .ok_or_else(|| ApiError::not_found("delivery", id))
}

fn parse_stage(e: &tracking_event::Model) -> ApiResult<DeliveryStage> {
    DeliveryStage::parse(&e.stage).ok_or_else(|| {
        ApiError::Internal(anyhow::anyhow!(
            "event {} of delivery {} has unknown stage {}",
            e.sequence,
            e.delivery_id,
            e.stage
        ))
    })
}

fn event_to_wire(e: tracking_event::Model) -> ApiResult<TrackingEvent> {
    let stage = parse_stage(&e)?;
    Ok(TrackingEvent {
        delivery_id: e.delivery_id,
        sequence: e.sequence,
        stage,
        location: e.location,
        detail: e.detail,
        at: e.at,
    })
}

fn to_wire(m: delivery::Model, stage: DeliveryStage) -> ApiResult<Delivery> {
    let confirmation_required =
        ConfirmationType::parse(&m.confirmation_required).ok_or_else(|| {
            ApiError::Internal(anyhow::anyhow!(
                "delivery {} has unknown confirmation type {}",
                m.id,
                m.confirmation_required
            ))
        })?;
    Ok(Delivery {
        id: m.id,
        owner_id: m.owner_id,
        pickup_location: m.pickup_location,
        drop_off_location: m.drop_off_location,
        pickup_time: m.pickup_time,
        deadline: m.deadline,
        expedited: m.expedited,
        confirmation_required,
        package_id: m.package_id,
        drone_id: m.drone_id,
        stage,
        created_at: m.created_at,
        updated_at: m.updated_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upsert(drone: &str) -> DeliveryUpsert {
        DeliveryUpsert {
            owner_id: "owner-1".into(),
            pickup_location: "here".into(),
            drop_off_location: "there".into(),
            pickup_time: chrono::DateTime::UNIX_EPOCH,
            deadline: String::new(),
            expedited: false,
            confirmation_required: ConfirmationType::None,
            package_id: "pkg-1".into(),
            drone_id: drone.into(),
        }
    }

    fn row(id: &str) -> Box<delivery::Model> {
        let at = chrono::DateTime::UNIX_EPOCH;
        Box::new(delivery::Model {
            id: id.into(),
            owner_id: "owner-1".into(),
            pickup_location: "here".into(),
            drop_off_location: "there".into(),
            pickup_time: at,
            deadline: String::new(),
            expedited: false,
            confirmation_required: "None".into(),
            package_id: "pkg-1".into(),
            drone_id: "drone-1".into(),
            created_at: at,
            updated_at: at,
        })
    }

    #[test]
    fn only_the_first_item_of_an_id_acts() {
        let (one, two, three) = (upsert("d-1"), upsert("d-2"), upsert("d-3"));
        let items = [("a", &one), ("b", &two), ("a", &three), ("b", &one)];
        let firsts = first_of_each_id(&items);
        let got: Vec<(&str, &str)> = firsts
            .iter()
            .map(|(id, body)| (*id, body.drone_id.as_str()))
            .collect();
        assert_eq!(got, [("a", "d-1"), ("b", "d-2")]);
    }

    #[test]
    fn later_items_of_an_id_answer_as_a_repeat() {
        let outcomes = HashMap::from([
            ("new", Creation::Created(row("new"))),
            ("old", Creation::Found),
            ("gone", Creation::Cancelled),
        ]);
        let ids = ["new", "old", "new", "gone", "new", "gone", "old", "unknown"];
        assert_eq!(
            in_item_order(ids.into_iter(), outcomes),
            [
                Some(Creation::Created(row("new"))),
                Some(Creation::Found),
                Some(Creation::Found),
                Some(Creation::Cancelled),
                Some(Creation::Found),
                Some(Creation::Cancelled),
                Some(Creation::Found),
                None,
            ]
        );
    }

    #[test]
    fn each_outcome_answers_as_the_single_put() {
        let created = Creation::Created(row("a")).answer("a");
        assert_eq!(
            created.ok().flatten().map(|d| (d.id, d.stage)),
            Some(("a".to_owned(), DeliveryStage::Created))
        );
        assert!(matches!(Creation::Found.answer("a"), Ok(None)));
        let refused = Creation::Cancelled.answer("a").err();
        assert_eq!(
            refused.map(|e| (e.problem().status, e.problem().code)),
            Some((409, "delivery-cancelled".into()))
        );
    }
}
