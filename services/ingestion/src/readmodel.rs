//! The read model behind `GET /api/deliveryrequests/{id}` and `GET /api/deliveries/{id}`: one row
//! per accepted request with the state a client may see and what tracking shows of it. Rows are
//! written through (batched) when requests are accepted and advanced by `workflow.state-changed`
//! and `delivery.tracked` events; each row keeps the saga's event `version` and the tracking
//! `sequence`, so a replayed or out-of-order event never moves a request backwards. The same
//! transaction records each change in the booking's history ([`crate::tracking`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, SubsecRound as _, Utc};
use contracts::{
    DeliveryTracked, RequestState, WorkflowStateChanged, DELIVERY_TRACKED, WORKFLOW_STATE_CHANGED,
};
use messaging::LogRecord;
use sea_orm::sea_query::{Alias, Expr, OnConflict};
use sea_orm::ActiveValue::{NotSet, Set};
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr, EntityTrait,
};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::tracking::{Change, Changes};

pub mod request {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "delivery_requests")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub delivery_id: String,
        pub owner_id: String,
        pub state: String,
        pub detail: Option<String>,
        /// Version of the last applied workflow event (0 = as accepted).
        pub version: i64,
        pub accepted_at: ChronoDateTimeUtc,
        pub updated_at: ChronoDateTimeUtc,
        /// The body (JSON) of a booking made with an Idempotency-Key, as first accepted: what
        /// a replay of the key answers. `None` without a key.
        pub first_request: Option<String>,
        /// The booking as it stands (after any reschedule).
        pub pickup_location: Option<String>,
        pub drop_off_location: Option<String>,
        pub pickup_time: Option<ChronoDateTimeUtc>,
        /// The reserved drone and its window.
        pub window_start: Option<ChronoDateTimeUtc>,
        pub window_end: Option<ChronoDateTimeUtc>,
        pub drone_id: Option<String>,
        /// Stage and sequence of the latest applied tracking event, when it happened, and
        /// the last location tracking reported.
        pub tracking_stage: Option<String>,
        pub tracking_seq: Option<i64>,
        pub tracked_at: Option<ChronoDateTimeUtc>,
        pub last_location: Option<String>,
        /// The saga announced a client cancellation (what follows it, such as a failed undo,
        /// does not make the booking "failed" for the client).
        pub client_cancelled: bool,
        /// The carrier leg the booking holds (JSON of `contracts::CarrierLeg`), when it has one.
        pub carrier_leg: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod checkpoint {
    use sea_orm::entity::prelude::*;

    /// Where the workflow-events projection resumes, per partition.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "projection_checkpoints")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub partition: i32,
        pub next_offset: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// An accepted request, as first recorded.
#[derive(Debug, Clone)]
pub(crate) struct Accepted {
    pub delivery_id: Uuid,
    pub owner_id: String,
    pub at: DateTime<Utc>,
    pub pickup_location: String,
    pub drop_off_location: String,
    pub pickup_time: DateTime<Utc>,
}

impl Accepted {
    /// The pickup time as the database keeps it (microseconds), so a read answers the same
    /// before and after the row is written.
    fn stored_pickup_time(&self) -> DateTime<Utc> {
        self.pickup_time.trunc_subsecs(6)
    }

    fn model(&self) -> request::Model {
        request::Model {
            delivery_id: self.delivery_id.to_string(),
            owner_id: self.owner_id.clone(),
            state: RequestState::Accepted.as_str().to_owned(),
            detail: None,
            version: 0,
            accepted_at: self.at,
            updated_at: self.at,
            first_request: None,
            pickup_location: Some(self.pickup_location.clone()),
            drop_off_location: Some(self.drop_off_location.clone()),
            pickup_time: Some(self.stored_pickup_time()),
            window_start: None,
            window_end: None,
            drone_id: None,
            tracking_stage: None,
            tracking_seq: None,
            tracked_at: None,
            last_location: None,
            client_cancelled: false,
            carrier_leg: None,
        }
    }

    fn row(&self) -> request::ActiveModel {
        request::ActiveModel {
            delivery_id: Set(self.delivery_id.to_string()),
            owner_id: Set(self.owner_id.clone()),
            state: Set(RequestState::Accepted.as_str().to_owned()),
            detail: Set(None),
            version: Set(0),
            accepted_at: Set(self.at),
            updated_at: Set(self.at),
            first_request: NotSet,
            pickup_location: Set(Some(self.pickup_location.clone())),
            drop_off_location: Set(Some(self.drop_off_location.clone())),
            pickup_time: Set(Some(self.stored_pickup_time())),
            ..Default::default()
        }
    }
}

/// Reads and writes of the read model. Accepted rows are written by a background task in batches
/// (one multi-row insert per few milliseconds), so the hot path never waits on the database.
/// Until its batch is written, an accepted request is found in `pending`: a client that reads,
/// reschedules or cancels right after its `202` finds it on this instance.
pub(crate) struct ReadModel {
    db: DatabaseConnection,
    tx: mpsc::UnboundedSender<Accepted>,
    pending: Arc<Mutex<HashMap<Uuid, Accepted>>>,
    changes: Arc<Changes>,
}

const BATCH: usize = 500;

impl ReadModel {
    pub(crate) fn start(db: DatabaseConnection) -> Arc<Self> {
        // Unbounded: a booking never waits for the read model (a checkpoint of SQLite's WAL can
        // take a second). What waits is bounded by the admission limit's throughput, and it is
        // in `pending` meanwhile anyway.
        let (tx, rx) = mpsc::unbounded_channel();
        let pending = Arc::new(Mutex::new(HashMap::new()));
        tokio::spawn(write_batches(db.clone(), rx, pending.clone()));
        Arc::new(Self {
            db,
            tx,
            pending,
            changes: Arc::default(),
        })
    }

    pub(crate) fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    /// Bookings changed by the workflow-events projection (it notifies after each commit).
    pub(crate) fn changes(&self) -> Arc<Changes> {
        self.changes.clone()
    }

    /// Records an accepted request durably before returning, with its body (used with
    /// `Idempotency-Key`, whose replays must find it and answer that body).
    pub(crate) async fn record_now(
        &self,
        accepted: &Accepted,
        first_request: String,
    ) -> Result<(), DbErr> {
        let row = request::ActiveModel {
            first_request: Set(Some(first_request)),
            ..accepted.row()
        };
        // The saga's first workflow event may have created the row already: keep its state and
        // add the body. A body already there stays: it is the first one.
        request::Entity::insert(row)
            .on_conflict(
                OnConflict::column(request::Column::DeliveryId)
                    .update_column(request::Column::FirstRequest)
                    .action_and_where(
                        Expr::col((request::Entity, request::Column::FirstRequest)).is_null(),
                    )
                    .to_owned(),
            )
            .exec_without_returning(&self.db)
            .await
            .map(|_| ())
    }

    /// Records an accepted request soon.
    pub(crate) fn record_later(&self, accepted: Accepted) {
        lock(&self.pending).insert(accepted.delivery_id, accepted.clone());
        if self.tx.send(accepted).is_err() {
            tracing::error!("read-model writer stopped");
        }
    }

    /// The stored row, or the accepted request whose row is still on its way.
    pub(crate) async fn find(&self, id: Uuid) -> Result<Option<request::Model>, DbErr> {
        // Looked at before the read: the writer removes an entry only after its row committed,
        // so whatever is not pending now is found by the read (a stored row wins: it may already
        // be further along than "accepted").
        let pending = lock(&self.pending).get(&id).map(Accepted::model);
        let stored = request::Entity::find_by_id(id.to_string())
            .one(&self.db)
            .await?;
        Ok(stored.or(pending))
    }
}

fn lock(
    pending: &Mutex<HashMap<Uuid, Accepted>>,
) -> std::sync::MutexGuard<'_, HashMap<Uuid, Accepted>> {
    // The map holds plain data: a panic elsewhere cannot leave it half changed.
    pending.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn insert_accepted(db: &DatabaseConnection, accepted: &[Accepted]) -> Result<(), DbErr> {
    if db.get_database_backend() == DbBackend::Postgres {
        let rows: Vec<pg::AcceptedRow> = accepted.iter().map(pg::AcceptedRow::new).collect();
        return pg::execute(db, pg::INSERT_ACCEPTED, &rows).await;
    }
    request::Entity::insert_many(accepted.iter().map(Accepted::row))
        .on_conflict(
            OnConflict::column(request::Column::DeliveryId)
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(db)
        .await
        .map(|_| ())
}

async fn write_batches(
    db: DatabaseConnection,
    mut rx: mpsc::UnboundedReceiver<Accepted>,
    pending: Arc<Mutex<HashMap<Uuid, Accepted>>>,
) {
    while let Some(first) = rx.recv().await {
        let mut rows = vec![first];
        while rows.len() < BATCH {
            match rx.try_recv() {
                Ok(a) => rows.push(a),
                Err(_) => break,
            }
        }
        let ids: Vec<Uuid> = rows.iter().map(|a| a.delivery_id).collect();
        let mut attempt = 0u32;
        loop {
            match insert_accepted(&db, &rows).await {
                Ok(()) => break,
                Err(e) if attempt < 5 => {
                    attempt += 1;
                    tracing::warn!(error = %e, attempt, "read-model batch insert failed, retrying");
                    tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                }
                Err(e) => {
                    // Workflow events will create these rows when the sagas progress.
                    tracing::error!(error = %e, rows = rows.len(), "read-model batch dropped");
                    break;
                }
            }
        }
        let mut pending = lock(&pending);
        for id in &ids {
            pending.remove(id);
        }
    }
}

/// Applies workflow events unless a row already has the event's version or a later one. One
/// statement for the batch: per delivery only the newest event counts (applying the older ones
/// first would end in the same row), which also keeps one statement from touching a row twice.
/// What an event lacks (older Schedulers send no locations or window) keeps its stored value.
pub(crate) async fn apply(
    db: &impl sea_orm::ConnectionTrait,
    events: &[&WorkflowStateChanged],
) -> Result<(), DbErr> {
    // Ordered by id, so concurrent writers lock rows in the same order.
    let mut newest: BTreeMap<Uuid, (&WorkflowStateChanged, bool)> = BTreeMap::new();
    for &e in events {
        let cancelled = e.state == RequestState::Cancelled;
        newest
            .entry(e.delivery_id)
            .and_modify(|(kept, any_cancelled)| {
                *any_cancelled |= cancelled;
                if e.version > kept.version {
                    *kept = e;
                }
            })
            .or_insert((e, cancelled));
    }
    if newest.is_empty() {
        return Ok(());
    }
    if db.get_database_backend() == DbBackend::Postgres {
        let rows: Vec<pg::StateRow> = newest
            .into_values()
            .map(|(e, client_cancelled)| pg::StateRow::new(e, client_cancelled))
            .collect();
        return pg::execute(db, pg::APPLY_STATES, &rows).await;
    }
    let rows = newest
        .into_values()
        .map(|(e, client_cancelled)| request::ActiveModel {
            delivery_id: Set(e.delivery_id.to_string()),
            owner_id: Set(e.owner_id.clone()),
            state: Set(e.state.as_str().to_owned()),
            detail: Set(e.detail.clone()),
            version: Set(e.version),
            accepted_at: Set(e.at),
            updated_at: Set(e.at),
            first_request: NotSet,
            pickup_location: Set(e.pickup_location.clone()),
            drop_off_location: Set(e.drop_off_location.clone()),
            pickup_time: Set(e.pickup_time),
            window_start: Set(e.pickup_window.map(|w| w.start)),
            window_end: Set(e.pickup_window.map(|w| w.end)),
            drone_id: Set(e.drone_id.clone()),
            client_cancelled: Set(client_cancelled),
            carrier_leg: Set(e
                .carrier_leg
                .as_ref()
                .and_then(|l| serde_json::to_string(l).ok())),
            ..Default::default()
        });
    let mut on_conflict = OnConflict::column(request::Column::DeliveryId);
    on_conflict.update_columns([
        request::Column::State,
        request::Column::Detail,
        request::Column::Version,
        request::Column::UpdatedAt,
    ]);
    for column in [
        "pickup_location",
        "drop_off_location",
        "pickup_time",
        "window_start",
        "window_end",
        "drone_id",
    ] {
        on_conflict.value(
            Alias::new(column),
            Expr::cust(format!(
                "COALESCE(excluded.{column}, delivery_requests.{column})"
            )),
        );
    }
    // The carrier leg is what the newest event says: every Scheduler that knows legs sends the
    // one the booking holds, so an event without one means none (a reschedule dropped it).
    on_conflict.update_column(request::Column::CarrierLeg);
    on_conflict.value(
        request::Column::ClientCancelled,
        Expr::cust("delivery_requests.client_cancelled OR excluded.client_cancelled"),
    );
    request::Entity::insert_many(rows)
        .on_conflict(
            on_conflict
                .action_and_where(Expr::col((request::Entity, request::Column::Version)).lt(
                    Expr::col((Alias::new("excluded"), request::Column::Version)),
                ))
                .to_owned(),
        )
        .exec_without_returning(db)
        .await
        .map(|_| ())
}

/// Applies tracking events unless a row already has the event's sequence or a later one: the
/// latest stage, the last reported location and the drone. One statement for the batch, as
/// [`apply`]. A booking not known yet (its row still on its way) gets a row as accepted.
pub(crate) async fn apply_tracking(
    db: &impl sea_orm::ConnectionTrait,
    events: &[(Uuid, &DeliveryTracked)],
) -> Result<(), DbErr> {
    // Per delivery: the newest event, and the last location reported up to it.
    let mut newest: BTreeMap<Uuid, (&DeliveryTracked, Option<&String>)> = BTreeMap::new();
    for &(id, e) in events {
        newest
            .entry(id)
            .and_modify(|(kept, location)| {
                if e.sequence > kept.sequence {
                    *kept = e;
                    *location = e.location.as_ref().or(*location);
                } else if location.is_none() {
                    *location = e.location.as_ref();
                }
            })
            .or_insert((e, e.location.as_ref()));
    }
    if newest.is_empty() {
        return Ok(());
    }
    if db.get_database_backend() == DbBackend::Postgres {
        let rows: Vec<pg::TrackedRow> = newest
            .into_iter()
            .map(|(id, (e, location))| pg::TrackedRow::new(id, e, location))
            .collect();
        return pg::execute(db, pg::APPLY_TRACKING, &rows).await;
    }
    let rows = newest
        .into_iter()
        .map(|(id, (e, location))| request::ActiveModel {
            delivery_id: Set(id.to_string()),
            owner_id: Set(e.owner_id.clone()),
            state: Set(RequestState::Accepted.as_str().to_owned()),
            detail: Set(None),
            version: Set(0),
            accepted_at: Set(e.at),
            updated_at: Set(e.at),
            drone_id: Set(Some(e.drone_id.clone())),
            tracking_stage: Set(Some(e.stage.as_str().to_owned())),
            tracking_seq: Set(Some(e.sequence)),
            tracked_at: Set(Some(e.at)),
            last_location: Set(location.cloned()),
            ..Default::default()
        });
    let mut on_conflict = OnConflict::column(request::Column::DeliveryId);
    on_conflict
        .update_columns([
            request::Column::TrackingStage,
            request::Column::TrackingSeq,
            request::Column::TrackedAt,
        ])
        .value(
            request::Column::LastLocation,
            Expr::cust("COALESCE(excluded.last_location, delivery_requests.last_location)"),
        )
        .value(
            request::Column::DroneId,
            Expr::cust("COALESCE(excluded.drone_id, delivery_requests.drone_id)"),
        );
    let tracked = Expr::col((request::Entity, request::Column::TrackingSeq));
    request::Entity::insert_many(rows)
        .on_conflict(
            on_conflict
                .action_and_where(tracked.clone().is_null().or(tracked.lt(Expr::col((
                    Alias::new("excluded"),
                    request::Column::TrackingSeq,
                )))))
                .to_owned(),
        )
        .exec_without_returning(db)
        .await
        .map(|_| ())
}

/// The read model's projection of `workflow-events` (see [`crate::follow`]): state changes and
/// tracking events into the rows and their history, with the projection's checkpoint.
pub(crate) struct Projection {
    pub(crate) db: DatabaseConnection,
    /// Streams of the bookings a batch touched are woken after its commit.
    pub(crate) changed: Arc<Changes>,
}

impl crate::follow::Follower for Projection {
    type Batch = Vec<Change>;
    type Done = ();

    const NAME: &'static str = "read model";

    async fn resume_at(&self, partition: u32) -> anyhow::Result<Option<u64>> {
        Ok(checkpoint::Entity::find_by_id(i32::try_from(partition)?)
            .one(&self.db)
            .await?
            .map(|c| u64::try_from(c.next_offset).unwrap_or(0)))
    }

    fn prepare(&self, records: &[LogRecord]) -> Vec<Change> {
        let mut changes = Vec::with_capacity(records.len());
        for record in records {
            let partition = record.partition;
            match &record.event {
                Ok(e) if e.kind == WORKFLOW_STATE_CHANGED => {
                    match e.decode::<WorkflowStateChanged>() {
                        Ok(change) => changes.push(Change::State(change)),
                        Err(reason) => {
                            tracing::warn!(partition, reason, "skipping undecodable workflow event")
                        }
                    }
                }
                Ok(e) if e.kind == DELIVERY_TRACKED => match e.decode::<DeliveryTracked>() {
                    Ok(t) => match Uuid::parse_str(&t.delivery_id) {
                        Ok(id) => changes.push(Change::Tracked(id, t)),
                        Err(_) => tracing::warn!(
                            partition,
                            delivery_id = t.delivery_id,
                            "skipping tracking event of a delivery that is no booking"
                        ),
                    },
                    Err(reason) => {
                        tracing::warn!(partition, reason, "skipping undecodable tracking event")
                    }
                },
                Ok(_) => {}
                Err(poison) => {
                    tracing::warn!(partition, reason = %poison.reason, "skipping poison record")
                }
            }
        }
        changes
    }

    async fn apply(
        &self,
        txn: &DatabaseTransaction,
        changes: &Vec<Change>,
        checkpoints: &[(u32, u64)],
    ) -> anyhow::Result<()> {
        Ok(apply_batch(txn, changes, checkpoints).await?)
    }

    /// After the commit: a stream woken now finds what it was woken for.
    fn committed(&self, changes: &Vec<Change>, (): ()) {
        self.changed.notify(changes.iter().map(Change::delivery_id));
    }
}

/// The round's history, then its rows (the history compares with the rows as they were), then
/// the checkpoints (one statement for them all).
async fn apply_batch(
    txn: &DatabaseTransaction,
    changes: &[Change],
    checkpoints: &[(u32, u64)],
) -> Result<(), DbErr> {
    let mut states = Vec::new();
    let mut tracked = Vec::new();
    for change in changes {
        match change {
            Change::State(e) => states.push(e),
            Change::Tracked(id, e) => tracked.push((*id, e)),
        }
    }
    crate::tracking::record(txn, changes).await?;
    apply(txn, &states).await?;
    apply_tracking(txn, &tracked).await?;
    if checkpoints.is_empty() {
        return Ok(());
    }
    let rows = checkpoints
        .iter()
        .map(|&(partition, offset)| checkpoint::ActiveModel {
            partition: Set(i32::try_from(partition).unwrap_or(i32::MAX)),
            next_offset: Set(i64::try_from(offset).unwrap_or(i64::MAX)),
        });
    checkpoint::Entity::insert_many(rows)
        .on_conflict(
            OnConflict::column(checkpoint::Column::Partition)
                .update_column(checkpoint::Column::NextOffset)
                .to_owned(),
        )
        .exec_without_returning(txn)
        .await
        .map(|_| ())
}

/// PostgreSQL's statements of the read model and its history. Each takes its batch as one JSON
/// parameter (`jsonb_to_recordset`), so its text is the same whatever the batch's size: prepared
/// once per connection. A multi-row `VALUES` list is a new statement for every batch size, parsed
/// and planned at each call (bench-e2e at 1,000 bookings/s: 329 statement texts in Ingestion's
/// database, and planning alone a fifth of its CPU). What these statements read is fixed by their
/// shape (the conflict arbiter; the history's one probe of the primary key per change), so a
/// plan made on a fresh table stays right as it grows.
pub(crate) mod pg {
    use chrono::{DateTime, SecondsFormat, Utc};
    use contracts::{DeliveryTracked, RequestState, WorkflowStateChanged};
    use sea_orm::{ConnectionTrait, DbBackend, DbErr, Statement};
    use serde::Serialize;
    use uuid::Uuid;

    use super::Accepted;

    /// Runs `sql` with `rows` as its one parameter (`$1`, a JSON array).
    pub(crate) async fn execute(
        db: &impl ConnectionTrait,
        sql: &str,
        rows: &impl Serialize,
    ) -> Result<(), DbErr> {
        let json = serde_json::to_string(rows)
            .map_err(|e| DbErr::Custom(format!("encoding a read-model batch: {e}")))?;
        db.execute(Statement::from_sql_and_values(
            DbBackend::Postgres,
            sql,
            [json.into()],
        ))
        .await
        .map(|_| ())
    }

    /// Microseconds, what PostgreSQL keeps (truncated, as the driver binds a timestamp).
    pub(crate) fn ts(t: &DateTime<Utc>) -> String {
        t.to_rfc3339_opts(SecondsFormat::Micros, true)
    }

    /// [`ts`] as a field's serializer.
    pub(crate) fn micros<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&ts(t))
    }

    pub(crate) const INSERT_ACCEPTED: &str = "
INSERT INTO delivery_requests (delivery_id, owner_id, state, detail, version, accepted_at,
    updated_at, pickup_location, drop_off_location, pickup_time)
SELECT v.delivery_id, v.owner_id, v.state, NULL, 0, v.at, v.at, v.pickup_location,
    v.drop_off_location, v.pickup_time
FROM jsonb_to_recordset($1::jsonb) AS v(delivery_id text, owner_id text, state text,
    at timestamptz, pickup_location text, drop_off_location text, pickup_time timestamptz)
ON CONFLICT (delivery_id) DO NOTHING";

    #[derive(Serialize)]
    pub(crate) struct AcceptedRow<'a> {
        delivery_id: Uuid,
        owner_id: &'a str,
        state: &'static str,
        at: String,
        pickup_location: &'a str,
        drop_off_location: &'a str,
        pickup_time: String,
    }

    impl<'a> AcceptedRow<'a> {
        pub(crate) fn new(a: &'a Accepted) -> Self {
            Self {
                delivery_id: a.delivery_id,
                owner_id: &a.owner_id,
                state: RequestState::Accepted.as_str(),
                at: ts(&a.at),
                pickup_location: &a.pickup_location,
                drop_off_location: &a.drop_off_location,
                pickup_time: ts(&a.stored_pickup_time()),
            }
        }
    }

    /// [`super::apply`]: rows in id order, so concurrent writers lock them in one order.
    pub(crate) const APPLY_STATES: &str = "
INSERT INTO delivery_requests (delivery_id, owner_id, state, detail, version, accepted_at,
    updated_at, pickup_location, drop_off_location, pickup_time, window_start, window_end,
    drone_id, client_cancelled, carrier_leg)
SELECT v.delivery_id, v.owner_id, v.state, v.detail, v.version, v.at, v.at, v.pickup_location,
    v.drop_off_location, v.pickup_time, v.window_start, v.window_end, v.drone_id,
    v.client_cancelled, v.carrier_leg
FROM jsonb_to_recordset($1::jsonb) AS v(delivery_id text, owner_id text, state text,
    detail text, version bigint, at timestamptz, pickup_location text, drop_off_location text,
    pickup_time timestamptz, window_start timestamptz, window_end timestamptz, drone_id text,
    client_cancelled boolean, carrier_leg text)
ORDER BY v.delivery_id
ON CONFLICT (delivery_id) DO UPDATE SET
    state = excluded.state,
    detail = excluded.detail,
    version = excluded.version,
    updated_at = excluded.updated_at,
    pickup_location = COALESCE(excluded.pickup_location, delivery_requests.pickup_location),
    drop_off_location = COALESCE(excluded.drop_off_location, delivery_requests.drop_off_location),
    pickup_time = COALESCE(excluded.pickup_time, delivery_requests.pickup_time),
    window_start = COALESCE(excluded.window_start, delivery_requests.window_start),
    window_end = COALESCE(excluded.window_end, delivery_requests.window_end),
    drone_id = COALESCE(excluded.drone_id, delivery_requests.drone_id),
    carrier_leg = excluded.carrier_leg,
    client_cancelled = delivery_requests.client_cancelled OR excluded.client_cancelled
WHERE delivery_requests.version < excluded.version";

    #[derive(Serialize)]
    pub(crate) struct StateRow<'a> {
        delivery_id: Uuid,
        owner_id: &'a str,
        state: &'static str,
        detail: Option<&'a str>,
        version: i64,
        at: String,
        pickup_location: Option<&'a str>,
        drop_off_location: Option<&'a str>,
        pickup_time: Option<String>,
        window_start: Option<String>,
        window_end: Option<String>,
        drone_id: Option<&'a str>,
        client_cancelled: bool,
        carrier_leg: Option<String>,
    }

    impl<'a> StateRow<'a> {
        pub(crate) fn new(e: &'a WorkflowStateChanged, client_cancelled: bool) -> Self {
            Self {
                delivery_id: e.delivery_id,
                owner_id: &e.owner_id,
                state: e.state.as_str(),
                detail: e.detail.as_deref(),
                version: e.version,
                at: ts(&e.at),
                pickup_location: e.pickup_location.as_deref(),
                drop_off_location: e.drop_off_location.as_deref(),
                pickup_time: e.pickup_time.as_ref().map(ts),
                window_start: e.pickup_window.as_ref().map(|w| ts(&w.start)),
                window_end: e.pickup_window.as_ref().map(|w| ts(&w.end)),
                drone_id: e.drone_id.as_deref(),
                client_cancelled,
                carrier_leg: e
                    .carrier_leg
                    .as_ref()
                    .and_then(|l| serde_json::to_string(l).ok()),
            }
        }
    }

    /// [`super::apply_tracking`]: a booking not known yet gets a row as accepted.
    pub(crate) const APPLY_TRACKING: &str = "
INSERT INTO delivery_requests (delivery_id, owner_id, state, detail, version, accepted_at,
    updated_at, drone_id, tracking_stage, tracking_seq, tracked_at, last_location)
SELECT v.delivery_id, v.owner_id, v.state, NULL, 0, v.at, v.at, v.drone_id, v.tracking_stage,
    v.tracking_seq, v.at, v.last_location
FROM jsonb_to_recordset($1::jsonb) AS v(delivery_id text, owner_id text, state text,
    at timestamptz, drone_id text, tracking_stage text, tracking_seq bigint, last_location text)
ORDER BY v.delivery_id
ON CONFLICT (delivery_id) DO UPDATE SET
    tracking_stage = excluded.tracking_stage,
    tracking_seq = excluded.tracking_seq,
    tracked_at = excluded.tracked_at,
    last_location = COALESCE(excluded.last_location, delivery_requests.last_location),
    drone_id = COALESCE(excluded.drone_id, delivery_requests.drone_id)
WHERE delivery_requests.tracking_seq IS NULL
    OR delivery_requests.tracking_seq < excluded.tracking_seq";

    #[derive(Serialize)]
    pub(crate) struct TrackedRow<'a> {
        delivery_id: Uuid,
        owner_id: &'a str,
        state: &'static str,
        at: String,
        drone_id: &'a str,
        tracking_stage: &'static str,
        tracking_seq: i64,
        last_location: Option<&'a str>,
    }

    impl<'a> TrackedRow<'a> {
        pub(crate) fn new(id: Uuid, e: &'a DeliveryTracked, location: Option<&'a String>) -> Self {
            Self {
                delivery_id: id,
                owner_id: &e.owner_id,
                state: RequestState::Accepted.as_str(),
                at: ts(&e.at),
                drone_id: &e.drone_id,
                tracking_stage: e.stage.as_str(),
                tracking_seq: e.sequence,
                last_location: location.map(String::as_str),
            }
        }
    }
}
