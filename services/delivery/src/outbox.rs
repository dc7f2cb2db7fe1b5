//! Publishes tracking events on `workflow-events` (key = deliveryId), so Ingestion can show clients
//! their delivery's progress and call their webhooks without ever calling this service.
//!
//! Every appended event except `Created` (the saga's own `scheduled` says as much, and creation is
//! on the booking's hot path) gets a `tracking_outbox` row in the transaction that appends it. The
//! relay publishes the oldest rows in order and deletes them once the log confirmed them; it is
//! woken by each append and looks again every second (a crash between the two leaves rows that
//! the next pass publishes). A row may so be published twice (crash after the append, or two
//! replicas' relays at once): readers recognise an event by `(deliveryId, sequence)`, and its
//! envelope id is derived from them, so it is the same on every copy.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use contracts::{DeliveryStage, DeliveryTracked, DELIVERY_TRACKED};
use messaging::{Envelope, PartitionedLog};
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, DatabaseConnection, DbErr, EntityTrait,
    PaginatorTrait, QueryFilter, QueryOrder, QuerySelect,
};
use service_kit::StopSignal;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::entity::{delivery, tracking_event, tracking_outbox};

/// Namespace of the envelope ids of published tracking events (`v5(deliveryId/sequence)`).
const EVENT_NAMESPACE: Uuid = Uuid::from_u128(0x3c1e_5a7d_92b4_4f0e_8d61_7a2c_b9e0_41f5);

/// Rows published per pass.
const BATCH: u64 = 200;

/// The envelope id of a tracking event: the same on every publication of it.
pub fn event_id(delivery_id: &str, sequence: i64) -> Uuid {
    Uuid::new_v5(
        &EVENT_NAMESPACE,
        format!("{delivery_id}/{sequence}").as_bytes(),
    )
}

/// Records, in the caller's transaction, that an appended event is to be published.
pub(crate) async fn enqueue(
    conn: &impl ConnectionTrait,
    delivery_id: &str,
    sequence: i64,
    stage: DeliveryStage,
    at: chrono::DateTime<chrono::Utc>,
) -> Result<(), DbErr> {
    if stage == DeliveryStage::Created {
        return Ok(());
    }
    tracking_outbox::Entity::insert(tracking_outbox::ActiveModel {
        delivery_id: sea_orm::ActiveValue::Set(delivery_id.to_owned()),
        sequence: sea_orm::ActiveValue::Set(sequence),
        created_at: sea_orm::ActiveValue::Set(at),
    })
    .exec_without_returning(conn)
    .await
    .map(|_| ())
}

/// What the relay shows operators.
#[derive(Clone)]
pub(crate) struct RelayMetrics {
    published: prometheus::IntCounter,
    failures: prometheus::IntCounter,
    /// Rows waiting, as of the last pass.
    waiting: prometheus::IntGauge,
}

impl RelayMetrics {
    pub(crate) fn register(registry: &prometheus::Registry) -> prometheus::Result<Self> {
        let m = Self {
            published: prometheus::IntCounter::new(
                "delivery_tracking_events_published_total",
                "Tracking events published on workflow-events",
            )?,
            failures: prometheus::IntCounter::new(
                "delivery_tracking_publish_failures_total",
                "Passes of the tracking outbox relay that failed (retried)",
            )?,
            waiting: prometheus::IntGauge::new(
                "delivery_tracking_outbox_waiting",
                "Tracking events not yet published (at the relay's last pass)",
            )?,
        };
        registry.register(Box::new(m.published.clone()))?;
        registry.register(Box::new(m.failures.clone()))?;
        registry.register(Box::new(m.waiting.clone()))?;
        Ok(m)
    }
}

/// Publishes outbox rows until `stop`.
pub(crate) async fn relay(
    db: DatabaseConnection,
    log: Arc<dyn PartitionedLog>,
    wake: Arc<Notify>,
    metrics: RelayMetrics,
    mut stop: StopSignal,
) {
    let mut failures = 0u32;
    loop {
        let pass = publish_some(&db, log.as_ref()).await;
        if let Ok(waiting) = tracking_outbox::Entity::find().count(&db).await {
            metrics
                .waiting
                .set(i64::try_from(waiting).unwrap_or(i64::MAX));
        }
        match pass {
            Ok(n) => {
                metrics.published.inc_by(n as u64);
                failures = 0;
                if n as u64 == BATCH {
                    continue;
                }
            }
            Err(e) => {
                metrics.failures.inc();
                failures += 1;
                tracing::warn!(error = %e, failures, "publishing tracking events failed; will retry");
            }
        }
        let pause = if failures == 0 {
            Duration::from_secs(1)
        } else {
            Duration::from_millis(200 * u64::from(failures.min(25)))
        };
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => return,
            () = wake.notified(), if failures == 0 => {}
            () = tokio::time::sleep(pause) => {}
        }
    }
}

/// Publishes the oldest outbox rows; returns how many.
async fn publish_some(db: &DatabaseConnection, log: &dyn PartitionedLog) -> anyhow::Result<usize> {
    let rows = tracking_outbox::Entity::find()
        .order_by_asc(tracking_outbox::Column::CreatedAt)
        .order_by_asc(tracking_outbox::Column::DeliveryId)
        .order_by_asc(tracking_outbox::Column::Sequence)
        .limit(BATCH)
        .all(db)
        .await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let keys = rows.iter().fold(Condition::any(), |c, r| {
        c.add(
            Condition::all()
                .add(tracking_event::Column::DeliveryId.eq(r.delivery_id.clone()))
                .add(tracking_event::Column::Sequence.eq(r.sequence)),
        )
    });
    let events: HashMap<(String, i64), tracking_event::Model> = tracking_event::Entity::find()
        .filter(keys)
        .all(db)
        .await?
        .into_iter()
        .map(|e| ((e.delivery_id.clone(), e.sequence), e))
        .collect();
    let ids: Vec<String> = rows.iter().map(|r| r.delivery_id.clone()).collect();
    let deliveries: HashMap<String, delivery::Model> = delivery::Entity::find()
        .filter(delivery::Column::Id.is_in(ids))
        .all(db)
        .await?
        .into_iter()
        .map(|d| (d.id.clone(), d))
        .collect();
    let mut envelopes = Vec::with_capacity(rows.len());
    for row in &rows {
        let key = (row.delivery_id.clone(), row.sequence);
        let (Some(event), Some(delivery)) = (events.get(&key), deliveries.get(&row.delivery_id))
        else {
            // The delivery is gone (nothing deletes one today): nothing to tell.
            tracing::warn!(delivery_id = %row.delivery_id, sequence = row.sequence, "outbox row without its event");
            continue;
        };
        let Some(stage) = DeliveryStage::parse(&event.stage) else {
            tracing::warn!(delivery_id = %row.delivery_id, stage = %event.stage, "unknown stage; not published");
            continue;
        };
        let body = DeliveryTracked {
            delivery_id: row.delivery_id.clone(),
            owner_id: delivery.owner_id.clone(),
            drone_id: delivery.drone_id.clone(),
            sequence: row.sequence,
            stage,
            location: event.location.clone(),
            detail: event.detail.clone(),
            at: event.at,
        };
        let mut envelope = Envelope::new(DELIVERY_TRACKED, 1, &row.delivery_id, &body)?;
        envelope.id = event_id(&row.delivery_id, row.sequence);
        envelopes.push(envelope);
    }
    if !envelopes.is_empty() {
        log.append_batch(envelopes).await?;
    }
    tracking_outbox::Entity::delete_many()
        .filter(rows.iter().fold(Condition::any(), |c, r| {
            c.add(
                Condition::all()
                    .add(tracking_outbox::Column::DeliveryId.eq(r.delivery_id.clone()))
                    .add(tracking_outbox::Column::Sequence.eq(r.sequence)),
            )
        }))
        .exec(db)
        .await?;
    tracing::debug!(events = rows.len(), "tracking events published");
    Ok(rows.len())
}
