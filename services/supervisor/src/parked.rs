//! Parked compensation requests, kept in the Supervisor's own table.
//!
//! On RabbitMQ a look at a parked message is a delivery: listing them in place reordered them,
//! counted towards the parked queue's delivery limit and hid them from a redrive meanwhile. So
//! every Supervisor moves parked messages out of the broker's parked queue into `parked_messages`
//! (acking each only after its row committed), and the dashboard and `/api/parked` list from the
//! table, where a look changes nothing. The same holds on both messaging backends.
//!
//! - Moving is idempotent: a row is keyed by the parking (`park_id`), so a message handed out
//!   again after a crash between commit and ack finds its row.
//! - A redrive republishes the stored bytes (with publisher confirm), then marks the row. A crash
//!   in between leaves the row listed, so at worst the request is redriven twice; the compensation
//!   consumer keys every request by (deliveryId, sagaVersion) and finds a finished one done.
//! - Several Supervisors share the work: each parked message goes to one of them.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use messaging::{Envelope, Parked, WorkQueue};
use sea_orm::sea_query::OnConflict;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, DatabaseConnection, DbErr, EntityTrait, PaginatorTrait,
    QueryFilter, QueryOrder, QuerySelect,
};
use tokio::sync::watch;

use crate::entities::parked_message;

/// Parked messages taken from the broker at once (each is stored, then acked).
const TAKE_PREFETCH: u16 = 16;

/// Stores a parked message unless its parking is stored already; true if it was new.
pub async fn store(db: &DatabaseConnection, p: &Parked) -> Result<bool, DbErr> {
    use parked_message::Column as C;
    let row = parked_message::ActiveModel {
        park_id: Set(p.park_id.clone()),
        message_id: Set(p.message_id.clone()),
        delivery_id: Set(p.event.as_ref().map(|e| e.key.clone())),
        payload: Set(p.payload.clone()),
        reason: Set(p.reason.clone()),
        delivery_count: Set(i32::try_from(p.delivery_count).unwrap_or(i32::MAX)),
        parked_at: Set(p.parked_at),
        stored_at: Set(Utc::now()),
        redriven_at: Set(None),
        redriven_by: Set(None),
    };
    let inserted = parked_message::Entity::insert(row)
        .on_conflict(OnConflict::column(C::ParkId).do_nothing().to_owned())
        .exec_without_returning(db)
        .await?;
    Ok(inserted > 0)
}

/// Parked messages waiting for a person, oldest first.
pub async fn waiting(
    db: &DatabaseConnection,
    limit: u64,
) -> Result<Vec<parked_message::Model>, DbErr> {
    parked_message::Entity::find()
        .filter(parked_message::Column::RedrivenAt.is_null())
        .order_by_asc(parked_message::Column::ParkedAt)
        .order_by_asc(parked_message::Column::ParkId)
        .limit(limit)
        .all(db)
        .await
}

/// Parked messages of one saga waiting for a person, oldest first.
pub async fn waiting_of(
    db: &DatabaseConnection,
    delivery_id: &str,
) -> Result<Vec<parked_message::Model>, DbErr> {
    parked_message::Entity::find()
        .filter(parked_message::Column::RedrivenAt.is_null())
        .filter(parked_message::Column::DeliveryId.eq(delivery_id))
        .order_by_asc(parked_message::Column::ParkedAt)
        .all(db)
        .await
}

pub async fn count_waiting(db: &DatabaseConnection) -> Result<u64, DbErr> {
    parked_message::Entity::find()
        .filter(parked_message::Column::RedrivenAt.is_null())
        .count(db)
        .await
}

/// The oldest waiting parking of `message_id` (a message parked twice is redriven once per
/// parking).
pub async fn waiting_by_message(
    db: &DatabaseConnection,
    message_id: &str,
) -> Result<Option<parked_message::Model>, DbErr> {
    parked_message::Entity::find()
        .filter(parked_message::Column::RedrivenAt.is_null())
        .filter(parked_message::Column::MessageId.eq(message_id))
        .order_by_asc(parked_message::Column::ParkedAt)
        .one(db)
        .await
}

/// Marks a parking redriven by `by`; false if it was marked already (a concurrent redrive).
pub async fn mark_redriven(
    db: &DatabaseConnection,
    park_id: &str,
    by: &str,
) -> Result<bool, DbErr> {
    let done = parked_message::Entity::update_many()
        .col_expr(
            parked_message::Column::RedrivenAt,
            sea_orm::sea_query::Expr::value(Utc::now()),
        )
        .col_expr(
            parked_message::Column::RedrivenBy,
            sea_orm::sea_query::Expr::value(by.to_owned()),
        )
        .filter(parked_message::Column::ParkId.eq(park_id))
        .filter(parked_message::Column::RedrivenAt.is_null())
        .exec(db)
        .await?;
    Ok(done.rows_affected > 0)
}

/// The event a stored payload carries, when it decodes.
pub fn event_of(row: &parked_message::Model) -> Option<Envelope> {
    serde_json::from_slice(&row.payload).ok()
}

/// Moves parked messages from the broker into the table until `stop`: each is acked only once
/// its row committed; a store that fails is retried while the message is held, so it is never
/// returned to the broker (which would count as a delivery) unless this process stops.
pub async fn keep(
    db: DatabaseConnection,
    queue: Arc<dyn WorkQueue>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let mut rx = match queue.take_parked(TAKE_PREFETCH).await {
            Ok(rx) => rx,
            Err(e) => {
                tracing::warn!(error = %e, "cannot take parked compensation requests; retrying");
                tokio::select! {
                    _ = stop.changed() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            let m = tokio::select! {
                _ = stop.changed() => return,
                m = rx.next() => m,
            };
            let Some(m) = m else { break };
            let mut attempt = 0u32;
            loop {
                match store(&db, &m.parked).await {
                    Ok(new) => {
                        if new {
                            tracing::warn!(
                                message_id = %m.parked.message_id,
                                reason = %m.parked.reason,
                                "compensation request parked: it needs a person"
                            );
                        }
                        break;
                    }
                    Err(e) => {
                        attempt += 1;
                        tracing::warn!(error = %e, attempt, "storing a parked compensation request failed; retrying");
                        let wait = Duration::from_millis(200 * u64::from(attempt.min(25)));
                        tokio::select! {
                            // Unacked, it stays in the broker's parked queue for the next taker.
                            _ = stop.changed() => return,
                            () = tokio::time::sleep(wait) => {}
                        }
                    }
                }
            }
            if let Err(e) = m.ack().await {
                // Handed out again later, it finds its row.
                tracing::warn!(error = %e, "acking a stored parked compensation request failed");
            }
        }
        tracing::warn!("parked compensation requests consumer closed; reconnecting");
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sea_orm_migration::MigratorTrait;

    fn parked(park_id: &str, message_id: &str, payload: &[u8]) -> Parked {
        Parked {
            park_id: park_id.to_owned(),
            message_id: message_id.to_owned(),
            payload: payload.to_vec(),
            event: serde_json::from_slice(payload).ok(),
            reason: "undecodable message: expected value".to_owned(),
            delivery_count: 1,
            parked_at: Utc::now(),
        }
    }

    #[tokio::test]
    async fn a_parking_is_stored_once_and_leaves_the_list_when_redriven() -> anyhow::Result<()> {
        let db = sea_orm::Database::connect("sqlite::memory:").await?;
        crate::Migrator::up(&db, None).await?;
        let raw = b"\x00\xffnot json";
        let first = parked("p1", "m1", raw);
        assert!(store(&db, &first).await?);
        // Handed out again after a crash between commit and ack: no second row.
        assert!(!store(&db, &first).await?);
        let rows = waiting(&db, 10).await?;
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].payload, raw, "the bytes as parked");
        assert_eq!(rows[0].delivery_id, None);
        assert_eq!(count_waiting(&db).await?, 1);

        let found = waiting_by_message(&db, "m1").await?;
        assert_eq!(found.map(|r| r.park_id), Some("p1".to_owned()));
        assert!(mark_redriven(&db, "p1", "olivia").await?);
        assert!(!mark_redriven(&db, "p1", "olivia").await?, "once");
        assert!(waiting(&db, 10).await?.is_empty());
        assert!(waiting_by_message(&db, "m1").await?.is_none());
        // The same parking handed out once more still finds its (redriven) row.
        assert!(!store(&db, &first).await?);
        assert!(waiting(&db, 10).await?.is_empty());

        // Redriven and parked again: a new parking, listed again.
        assert!(store(&db, &parked("p2", "m1", raw)).await?);
        let rows = waiting(&db, 10).await?;
        assert_eq!(
            rows.iter().map(|r| r.park_id.as_str()).collect::<Vec<_>>(),
            ["p2"]
        );
        Ok(())
    }
}
