//! The booking history behind the tracking view and its event stream: written by the
//! workflow-events projection (batched, in the projection's transaction), read per booking, and
//! the in-process signal that wakes the streams of a booking once a batch touching it committed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use chrono::{DateTime, Utc};
use contracts::{
    DeliveryStage, DeliveryTracked, HistorySource, RequestState, TrackingEntry,
    WorkflowStateChanged,
};
use sea_orm::{
    AccessMode, ColumnTrait, ConnectionTrait, DatabaseConnection, DbBackend, DbErr, EntityTrait,
    IsolationLevel, QueryFilter, QueryOrder, QuerySelect, Statement, TransactionTrait, Value,
};
use tokio::sync::watch;
use uuid::Uuid;

use crate::readmodel::request;

pub mod history {
    use sea_orm::entity::prelude::*;

    /// One change of a booking; `id` is its SSE event id.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "booking_history")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub delivery_id: String,
        /// `booking` (a `workflow.state-changed`) or `delivery` (a `delivery.tracked`).
        pub source: String,
        /// The saga's `version` or the tracking `sequence`: with the source, what makes a
        /// replayed change recognisable.
        pub source_seq: i64,
        pub state: Option<String>,
        pub tracking_stage: Option<String>,
        pub detail: Option<String>,
        pub location: Option<String>,
        pub at: ChronoDateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// A change read from `workflow-events`, in log order.
#[derive(Debug, Clone)]
pub(crate) enum Change {
    State(WorkflowStateChanged),
    Tracked(Uuid, DeliveryTracked),
}

impl Change {
    pub(crate) fn delivery_id(&self) -> Uuid {
        match self {
            Change::State(e) => e.delivery_id,
            Change::Tracked(id, _) => *id,
        }
    }

    fn source(&self) -> HistorySource {
        match self {
            Change::State(_) => HistorySource::Booking,
            Change::Tracked(..) => HistorySource::Delivery,
        }
    }

    fn seq(&self) -> i64 {
        match self {
            Change::State(e) => e.version,
            Change::Tracked(_, t) => t.sequence,
        }
    }
}

/// Records the batch's changes in the history, in log order, each at most once. A change older
/// than one already applied to the booking (a saga version or tracking sequence below the row's,
/// or below one earlier in the batch) is stale and left out, so the history only moves forward
/// and its ids follow the booking's changes. Must run before the batch updates the rows (it
/// compares with the rows as they were). One statement for the batch.
pub(crate) async fn record(db: &impl ConnectionTrait, changes: &[Change]) -> Result<(), DbErr> {
    let mut newest: HashMap<(Uuid, HistorySource), i64> = HashMap::new();
    let mut rows: Vec<HistoryRow> = Vec::with_capacity(changes.len());
    for change in changes {
        let key = (change.delivery_id(), change.source());
        let seq = change.seq();
        match newest.get(&key) {
            Some(seen) if *seen >= seq => continue,
            _ => {
                newest.insert(key, seq);
            }
        }
        rows.push(match change {
            Change::State(e) => HistoryRow {
                delivery_id: e.delivery_id,
                source: change.source().as_str(),
                source_seq: seq,
                state: Some(e.state.as_str()),
                tracking_stage: None,
                detail: e.detail.as_deref(),
                location: None,
                at: e.at,
            },
            Change::Tracked(id, t) => HistoryRow {
                delivery_id: *id,
                source: change.source().as_str(),
                source_seq: seq,
                state: None,
                tracking_stage: Some(t.stage.as_str()),
                detail: t.detail.as_deref(),
                location: t.location.as_deref(),
                at: t.at,
            },
        });
    }
    if rows.is_empty() {
        return Ok(());
    }
    let backend = db.get_database_backend();
    if backend == DbBackend::Postgres {
        return crate::readmodel::pg::execute(db, PG_RECORD, &rows).await;
    }
    let mut values = Vec::with_capacity(rows.len() * 8);
    let mut tuples = Vec::with_capacity(rows.len());
    for row in rows {
        let row: [Value; 8] = [
            row.delivery_id.to_string().into(),
            row.source.into(),
            row.source_seq.into(),
            row.state.map(str::to_owned).into(),
            row.tracking_stage.map(str::to_owned).into(),
            row.detail.map(str::to_owned).into(),
            row.location.map(str::to_owned).into(),
            row.at.into(),
        ];
        let mut marks = Vec::with_capacity(8);
        for v in row {
            values.push(v);
            marks.push("?");
        }
        tuples.push(format!("({})", marks.join(", ")));
    }
    // `VALUES` columns are named column1.. by SQLite. The WHERE also keeps it from reading
    // `ON CONFLICT` as a join constraint.
    let sql = format!(
        r#"INSERT INTO "booking_history"
             ("delivery_id", "source", "source_seq", "state", "tracking_stage", "detail", "location", "at")
           SELECT v.column1, v.column2, v.column3, v.column4, v.column5, v.column6, v.column7, v.column8
           FROM (VALUES {}) AS v
           WHERE NOT EXISTS (
             SELECT 1 FROM "delivery_requests" r
             WHERE r."delivery_id" = v.column1
               AND ((v.column2 = 'booking' AND r."version" > v.column3)
                 OR (v.column2 = 'delivery' AND r."tracking_seq" > v.column3)))
           ON CONFLICT DO NOTHING"#,
        tuples.join(", ")
    );
    db.execute(Statement::from_sql_and_values(backend, sql, values))
        .await
        .map(|_| ())
}

/// One change to record, as both backends' statements take it.
#[derive(serde::Serialize)]
struct HistoryRow<'a> {
    delivery_id: Uuid,
    source: &'static str,
    source_seq: i64,
    state: Option<&'static str>,
    tracking_stage: Option<&'static str>,
    detail: Option<&'a str>,
    location: Option<&'a str>,
    #[serde(serialize_with = "crate::readmodel::pg::micros")]
    at: DateTime<Utc>,
}

/// [`record`] on PostgreSQL: the batch as one JSON parameter (see [`crate::readmodel::pg`]), in
/// log order. The staleness check is a subquery that `OFFSET 0` keeps from being flattened into a
/// join: for each change it is one probe of `delivery_requests`' primary key, whatever the table's
/// statistics say when the plan is made (a join planned on a fresh, unanalysed table could read
/// the whole table for every batch once it has grown).
const PG_RECORD: &str = "
INSERT INTO booking_history (delivery_id, source, source_seq, state, tracking_stage, detail,
    location, at)
SELECT v.delivery_id, v.source, v.source_seq, v.state, v.tracking_stage, v.detail, v.location,
    v.at
FROM ROWS FROM (jsonb_to_recordset($1::jsonb) AS (delivery_id text, source text,
    source_seq bigint, state text, tracking_stage text, detail text, location text,
    at timestamptz)) WITH ORDINALITY AS v(delivery_id, source, source_seq, state,
    tracking_stage, detail, location, at, ord)
WHERE NOT EXISTS (
    SELECT 1 FROM delivery_requests r
    WHERE r.delivery_id = v.delivery_id
      AND ((v.source = 'booking' AND r.version > v.source_seq)
        OR (v.source = 'delivery' AND r.tracking_seq > v.source_seq))
    OFFSET 0)
ORDER BY v.ord
ON CONFLICT DO NOTHING";

/// Entries of booking `id` after entry `after`, oldest first, at most `limit`.
pub(crate) async fn entries_after(
    db: &impl ConnectionTrait,
    id: Uuid,
    after: i64,
    limit: u64,
) -> Result<Vec<TrackingEntry>, DbErr> {
    let rows = history::Entity::find()
        .filter(history::Column::DeliveryId.eq(id.to_string()))
        .filter(history::Column::Id.gt(after))
        .order_by_asc(history::Column::Id)
        .limit(limit)
        .all(db)
        .await?;
    Ok(rows.into_iter().filter_map(entry).collect())
}

/// The newest `limit` entries of booking `id`, oldest first.
pub(crate) async fn latest_entries(
    db: &impl ConnectionTrait,
    id: Uuid,
    limit: u64,
) -> Result<Vec<TrackingEntry>, DbErr> {
    let rows = history::Entity::find()
        .filter(history::Column::DeliveryId.eq(id.to_string()))
        .order_by_desc(history::Column::Id)
        .limit(limit)
        .all(db)
        .await?;
    Ok(rows.into_iter().rev().filter_map(entry).collect())
}

/// Booking `id`'s row and its newest `limit` history entries (oldest first), read from one
/// snapshot: the row never lags the history or runs ahead of it.
pub(crate) async fn snapshot(
    db: &DatabaseConnection,
    id: Uuid,
    limit: u64,
) -> Result<(Option<request::Model>, Vec<TrackingEntry>), DbErr> {
    let txn = match db.get_database_backend() {
        // SQLite's read transactions are snapshots already (and it takes no isolation level).
        DbBackend::Sqlite => db.begin().await?,
        _ => {
            db.begin_with_config(
                Some(IsolationLevel::RepeatableRead),
                Some(AccessMode::ReadOnly),
            )
            .await?
        }
    };
    let row = request::Entity::find_by_id(id.to_string())
        .one(&txn)
        .await?;
    let entries = latest_entries(&txn, id, limit).await?;
    txn.commit().await?;
    Ok((row, entries))
}

/// The entry the history starts with: the booking's acceptance (id 0, before every stored one).
pub(crate) fn accepted_entry(at: DateTime<Utc>) -> TrackingEntry {
    TrackingEntry {
        id: 0,
        at,
        source: HistorySource::Booking,
        state: Some(RequestState::Accepted),
        tracking_stage: None,
        location: None,
        detail: None,
    }
}

fn entry(row: history::Model) -> Option<TrackingEntry> {
    let Some(source) = HistorySource::parse(&row.source) else {
        // Written by a newer version of this service: skipped rather than failing the view.
        tracing::warn!(id = row.id, delivery_id = %row.delivery_id, "unreadable history entry skipped");
        return None;
    };
    Some(TrackingEntry {
        id: row.id,
        at: row.at,
        source,
        state: row.state.as_deref().and_then(RequestState::parse),
        tracking_stage: row.tracking_stage.as_deref().and_then(DeliveryStage::parse),
        location: row.location,
        detail: row.detail,
    })
}

/// Which bookings' streams to wake: a channel per booking someone follows on this replica.
/// The projection calls [`Changes::notify`] after each commit.
#[derive(Default)]
pub(crate) struct Changes {
    watched: Mutex<HashMap<Uuid, watch::Sender<u64>>>,
}

impl Changes {
    /// Wakes the followers of every booking in `ids`.
    pub(crate) fn notify(&self, ids: impl IntoIterator<Item = Uuid>) {
        let watched = self.lock();
        if watched.is_empty() {
            return;
        }
        for id in ids {
            if let Some(tx) = watched.get(&id) {
                tx.send_modify(|n| *n = n.wrapping_add(1));
            }
        }
    }

    /// Follows booking `id` until the returned handle is dropped.
    pub(crate) fn watch(self: &Arc<Self>, id: Uuid) -> Watch {
        let rx = self
            .lock()
            .entry(id)
            .or_insert_with(|| watch::channel(0).0)
            .subscribe();
        Watch {
            changes: self.clone(),
            id,
            rx: Some(rx),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, watch::Sender<u64>>> {
        // Plain data: a panic elsewhere cannot leave it half changed.
        self.watched.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A follower of one booking's changes.
pub(crate) struct Watch {
    changes: Arc<Changes>,
    id: Uuid,
    rx: Option<watch::Receiver<u64>>,
}

impl Watch {
    /// Resolves once a batch touching the booking committed since the last call.
    pub(crate) async fn changed(&mut self) {
        let woken = match self.rx.as_mut() {
            Some(rx) => rx.changed().await.is_ok(),
            None => false,
        };
        if !woken {
            // Unreachable while the map holds the sender; then only the poll wakes the stream.
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut watched = self.changes.lock();
        // Dropped under the lock, so a new follower cannot subscribe in between.
        self.rx = None;
        if watched
            .get(&self.id)
            .is_some_and(|tx| tx.receiver_count() == 0)
        {
            watched.remove(&self.id);
        }
    }
}

#[cfg(test)]
#[allow(clippy::expect_used)] // a failed test step should panic
mod tests {
    use super::*;

    /// The history statement's generic plan (what a prepared statement ends up with), made on a
    /// fresh database whose tables were never analysed: each change must be one probe of
    /// `delivery_requests`' primary key, never a scan of the table (which grows under that plan).
    #[tokio::test]
    async fn the_history_statement_probes_the_primary_key_on_a_fresh_table() {
        let sample = r#"[{"delivery_id":"d","source":"booking","source_seq":1,"state":"scheduled",
            "tracking_stage":null,"detail":null,"location":null,"at":"2026-12-06T10:00:00Z"}]"#;
        let plan = test_support::generic_plan::<crate::Migrator>(
            "jsonb",
            PG_RECORD,
            &format!("'{sample}'"),
        )
        .await;
        assert!(
            plan.contains("Index Scan using delivery_requests_pkey on delivery_requests")
                && !plan.contains("Seq Scan on delivery_requests"),
            "{plan}"
        );
    }

    #[tokio::test]
    async fn followers_are_woken_and_forgotten() {
        let changes = Arc::new(Changes::default());
        let id = Uuid::new_v4();
        let mut a = changes.watch(id);
        let b = changes.watch(id);
        changes.notify([Uuid::new_v4(), id]);
        tokio::time::timeout(std::time::Duration::from_secs(1), a.changed())
            .await
            .unwrap_or_else(|_| panic!("woken"));
        drop(a);
        assert_eq!(changes.lock().len(), 1);
        drop(b);
        assert!(changes.lock().is_empty());
    }
}
