//! Follows `workflow-events` on its own checkpoints (independent of the read model) and turns
//! each change a client is told about into a delivery per endpoint of the booking's owner.
//!
//! An event's id is derived from what it says (`booking.rescheduled` of revision 2 of booking X),
//! so a change the Scheduler announced twice, or that several replicas read, is one event.

use std::sync::Arc;

use contracts::{
    DeliveryStage, DeliveryTracked, RequestState, WebhookEvent, WebhookEventData, WebhookEventType,
    WorkflowStateChanged, DELIVERY_TRACKED, WORKFLOW_STATE_CHANGED,
};
use messaging::LogRecord;
use sea_orm::DatabaseTransaction;
use tokio::sync::Notify;
use uuid::Uuid;

use super::store::{NewEvent, Store};

/// Namespace of event ids derived from (booking, type, revision).
const EVENT_NAMESPACE: Uuid = Uuid::from_u128(0x8e1f_2a6c_4b3d_4c07_9f52_d6a1_03b8_7e45);
/// The webhooks' follower of `workflow-events` (see [`crate::follow`]): each change a client is
/// told about becomes a delivery per endpoint of the booking's owner, with the webhook
/// checkpoint, in one transaction.
pub(crate) struct WebhookFollower {
    pub(crate) store: Arc<Store>,
    /// Wakes the dispatcher when deliveries were recorded.
    pub(crate) wake: Arc<Notify>,
    pub(crate) retry_for_ms: i64,
}

impl crate::follow::Follower for WebhookFollower {
    type Batch = Vec<NewEvent>;
    /// Deliveries created.
    type Done = u64;

    const NAME: &'static str = "webhooks";

    async fn resume_at(&self, partition: u32) -> anyhow::Result<Option<u64>> {
        Ok(self.store.checkpoint(partition).await?)
    }

    fn prepare(&self, records: &[LogRecord]) -> Vec<NewEvent> {
        records.iter().filter_map(client_event).collect()
    }

    /// A round with events saves its checkpoints at once: an event's deliveries and the position
    /// after it are then always recorded together.
    fn checkpoint_now(&self, events: &Vec<NewEvent>) -> bool {
        !events.is_empty()
    }

    async fn apply(
        &self,
        txn: &DatabaseTransaction,
        events: &Vec<NewEvent>,
        checkpoints: &[(u32, u64)],
    ) -> anyhow::Result<u64> {
        Ok(Store::record(txn, events, checkpoints, self.retry_for_ms).await?)
    }

    fn committed(&self, _events: &Vec<NewEvent>, inserted: u64) {
        if inserted > 0 {
            self.wake.notify_one();
        }
    }
}

/// The client event a log record means, if any.
fn client_event(record: &LogRecord) -> Option<NewEvent> {
    let envelope = match &record.event {
        Ok(e) => e,
        Err(poison) => {
            tracing::warn!(partition = record.partition, reason = %poison.reason, "webhooks: skipping poison record");
            return None;
        }
    };
    let (kind, delivery_id, owner_id, occurred_at, data) = if envelope.kind
        == WORKFLOW_STATE_CHANGED
    {
        let e: WorkflowStateChanged = decoded(envelope)?;
        let kind = match e.state {
            RequestState::Scheduled if e.revision.unwrap_or(0) > 0 => WebhookEventType::Rescheduled,
            RequestState::Scheduled => WebhookEventType::Scheduled,
            RequestState::Cancelled => WebhookEventType::Cancelled,
            RequestState::Failed => WebhookEventType::Failed,
            RequestState::Compensated => WebhookEventType::Compensated,
            _ => return None,
        };
        let data = WebhookEventData {
            state: Some(e.state),
            stage: None,
            detail: e.detail,
            revision: e.revision,
            drone_id: e.drone_id,
            pickup_window: e.pickup_window,
            pickup_location: e.pickup_location,
            drop_off_location: e.drop_off_location,
            pickup_time: e.pickup_time,
            location: None,
            carrier_leg: e.carrier_leg,
        };
        (kind, e.delivery_id, e.owner_id, e.at, data)
    } else if envelope.kind == DELIVERY_TRACKED {
        let e: DeliveryTracked = decoded(envelope)?;
        if e.stage != DeliveryStage::Completed {
            return None;
        }
        let Ok(delivery_id) = Uuid::parse_str(&e.delivery_id) else {
            tracing::warn!(
                delivery_id = e.delivery_id,
                "webhooks: tracking event of a delivery id that is not a UUID"
            );
            return None;
        };
        let data = WebhookEventData {
            stage: Some(e.stage),
            detail: e.detail,
            drone_id: Some(e.drone_id),
            location: e.location,
            ..Default::default()
        };
        (
            WebhookEventType::Delivered,
            delivery_id,
            e.owner_id,
            e.at,
            data,
        )
    } else {
        return None;
    };
    // One event per change the client sees: a booking is scheduled once, rescheduled once per
    // revision, and ends once in each way.
    let name = match kind {
        WebhookEventType::Rescheduled => {
            format!(
                "{delivery_id}\n{}\n{}",
                kind.as_str(),
                data.revision.unwrap_or(0)
            )
        }
        _ => format!("{delivery_id}\n{}", kind.as_str()),
    };
    let event = WebhookEvent {
        id: Uuid::new_v5(&EVENT_NAMESPACE, name.as_bytes()),
        kind,
        delivery_id,
        occurred_at,
        data,
    };
    let payload = match serde_json::to_string(&event) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "webhooks: event does not encode");
            return None;
        }
    };
    Some(NewEvent {
        event_id: event.id,
        kind,
        delivery_id,
        owner_id,
        log_offset: record.position.offset,
        log_index: record.position.index,
        payload,
    })
}

fn decoded<T: serde::de::DeserializeOwned>(envelope: &messaging::Envelope) -> Option<T> {
    envelope
        .decode::<T>()
        .map_err(|reason| {
            tracing::warn!(
                kind = envelope.kind,
                reason,
                "webhooks: skipping undecodable event"
            );
        })
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use messaging::{Envelope, Position};

    fn record(kind: &str, body: &impl serde::Serialize, offset: u64) -> LogRecord {
        LogRecord {
            partition: 0,
            position: Position { offset, index: 0 },
            event: Envelope::new(kind, 1, "k", body)
                .map_err(|e| messaging::Poison::new(b"", e.to_string())),
        }
    }

    fn change(
        id: Uuid,
        state: RequestState,
        version: i64,
        revision: Option<u32>,
    ) -> WorkflowStateChanged {
        WorkflowStateChanged {
            delivery_id: id,
            owner_id: "acc-1".into(),
            state,
            version,
            detail: None,
            at: Utc::now(),
            package_id: None,
            drone_id: Some("drone-001".into()),
            pickup_window: None,
            pickup_location: None,
            drop_off_location: None,
            pickup_time: None,
            revision,
            carrier_leg: None,
        }
    }

    #[test]
    fn only_client_visible_changes_become_events_with_stable_ids() {
        let id = Uuid::new_v4();
        let kinds: Vec<Option<WebhookEventType>> = [
            (RequestState::Scheduling, None),
            (RequestState::Scheduled, None),
            (RequestState::Scheduled, Some(0)),
            (RequestState::Scheduled, Some(2)),
            (RequestState::Compensating, Some(2)),
            (RequestState::Cancelled, Some(2)),
            (RequestState::CompensationFailed, Some(2)),
        ]
        .into_iter()
        .enumerate()
        .map(|(v, (state, rev))| {
            let r = record(
                WORKFLOW_STATE_CHANGED,
                &change(id, state, v as i64, rev),
                v as u64,
            );
            client_event(&r).map(|e| e.kind)
        })
        .collect();
        assert_eq!(
            kinds,
            vec![
                None,
                Some(WebhookEventType::Scheduled),
                Some(WebhookEventType::Scheduled),
                Some(WebhookEventType::Rescheduled),
                None,
                Some(WebhookEventType::Cancelled),
                None
            ]
        );
        // The same change announced twice (another version, another offset) is one event.
        let a = client_event(&record(
            WORKFLOW_STATE_CHANGED,
            &change(id, RequestState::Scheduled, 2, None),
            1,
        ));
        let b = client_event(&record(
            WORKFLOW_STATE_CHANGED,
            &change(id, RequestState::Scheduled, 3, Some(0)),
            9,
        ));
        assert_eq!(a.map(|e| e.event_id), b.map(|e| e.event_id));
        let tracked = |stage| DeliveryTracked {
            delivery_id: id.to_string(),
            owner_id: "acc-1".into(),
            drone_id: "drone-001".into(),
            sequence: 3,
            stage,
            location: None,
            detail: None,
            at: Utc::now(),
        };
        assert!(client_event(&record(
            DELIVERY_TRACKED,
            &tracked(DeliveryStage::HeadedToDropoff),
            1
        ))
        .is_none());
        assert_eq!(
            client_event(&record(
                DELIVERY_TRACKED,
                &tracked(DeliveryStage::Completed),
                1
            ))
            .map(|e| e.kind),
            Some(WebhookEventType::Delivered)
        );
    }
}
