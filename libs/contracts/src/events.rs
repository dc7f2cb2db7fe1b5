//! Events on the logs. `delivery-requests` (key = deliveryId) carries what clients asked for;
//! `workflow-events` carries each saga's lifecycle for read models (Ingestion, Supervisor).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{ConfirmationType, DeliveryStage, PackageInfo, TimeWindow};

/// Log of client requests, partitioned by deliveryId.
pub const DELIVERY_REQUESTS_LOG: &str = "delivery-requests";
/// Log of saga lifecycle changes, partitioned by deliveryId.
pub const WORKFLOW_EVENTS_LOG: &str = "workflow-events";

/// Event type of [`DeliveryRequested`].
pub const DELIVERY_REQUESTED: &str = "delivery.requested";
/// Event type of [`DeliveryRescheduled`].
pub const DELIVERY_RESCHEDULED: &str = "delivery.rescheduled";
/// Event type of [`DeliveryCancelled`].
pub const DELIVERY_CANCELLED: &str = "delivery.cancelled";
/// Event type of [`WorkflowStateChanged`].
pub const WORKFLOW_STATE_CHANGED: &str = "workflow.state-changed";
/// Event type of [`DeliveryTracked`] (on `workflow-events`, published by the Delivery service).
pub const DELIVERY_TRACKED: &str = "delivery.tracked";

/// A booking accepted by Ingestion: everything the saga needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryRequested {
    pub delivery_id: Uuid,
    pub owner_id: String,
    pub pickup_location: String,
    pub drop_off_location: String,
    pub pickup_time: DateTime<Utc>,
    pub deadline: String,
    pub expedited: bool,
    pub confirmation_required: ConfirmationType,
    pub package_info: PackageInfo,
    pub accepted_at: DateTime<Utc>,
}

/// A client asked to move a booking.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryRescheduled {
    pub delivery_id: Uuid,
    pub owner_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pickup_time: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pickup_location: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_off_location: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<String>,
    pub requested_at: DateTime<Utc>,
}

/// A client cancelled a booking.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryCancelled {
    pub delivery_id: Uuid,
    pub owner_id: String,
    pub requested_at: DateTime<Utc>,
}

/// A booking's state as the client sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RequestState {
    Accepted,
    Scheduling,
    Scheduled,
    Failed,
    Compensating,
    Compensated,
    CompensationFailed,
    Cancelled,
}

impl RequestState {
    pub const ALL: [RequestState; 8] = [
        RequestState::Accepted,
        RequestState::Scheduling,
        RequestState::Scheduled,
        RequestState::Failed,
        RequestState::Compensating,
        RequestState::Compensated,
        RequestState::CompensationFailed,
        RequestState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RequestState::Accepted => "accepted",
            RequestState::Scheduling => "scheduling",
            RequestState::Scheduled => "scheduled",
            RequestState::Failed => "failed",
            RequestState::Compensating => "compensating",
            RequestState::Compensated => "compensated",
            RequestState::CompensationFailed => "compensation-failed",
            RequestState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// A saga's lifecycle change, on `workflow-events`. `version` increases with every change of one
/// saga, so read models apply each change once and in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkflowStateChanged {
    pub delivery_id: Uuid,
    pub owner_id: String,
    pub state: RequestState,
    pub version: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    pub at: DateTime<Utc>,
    /// The client's package id, once the saga knows it (read models search by it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package_id: Option<String>,
    /// The reserved drone, once the saga has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drone_id: Option<String>,
    /// The reserved drone's window, once the saga has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pickup_window: Option<TimeWindow>,
    /// The booking as it stands (after any reschedule): where and when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pickup_location: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_off_location: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pickup_time: Option<DateTime<Utc>>,
    /// Reschedules applied so far (0 = as booked; absent in events of older Schedulers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u32>,
    /// The carrier leg the booking holds, once it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub carrier_leg: Option<crate::CarrierLeg>,
}

/// One tracking event of a delivery as the Delivery service recorded it, on `workflow-events`
/// (key = deliveryId), so read models follow a delivery's progress without calling the service.
/// `sequence` is the event's position in the delivery's history (from 1): a replayed event is
/// recognised by it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryTracked {
    pub delivery_id: String,
    pub owner_id: String,
    pub drone_id: String,
    pub sequence: i64,
    pub stage: DeliveryStage,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    pub at: DateTime<Utc>,
}

/// `GET /api/deliveryrequests/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryRequestStatus {
    pub delivery_id: Uuid,
    pub owner_id: String,
    pub state: RequestState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    pub accepted_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{round_trip, PackageSize};

    #[test]
    fn events_round_trip() {
        let now = Utc::now();
        let id = Uuid::new_v4();
        round_trip(&DeliveryRequested {
            delivery_id: id,
            owner_id: "o".into(),
            pickup_location: "a".into(),
            drop_off_location: "b".into(),
            pickup_time: now,
            deadline: String::new(),
            expedited: true,
            confirmation_required: ConfirmationType::Voice,
            package_info: PackageInfo {
                package_id: "p".into(),
                size: PackageSize::Medium,
                weight: 1.0,
                tag: None,
            },
            accepted_at: now,
        });
        round_trip(&DeliveryRescheduled {
            delivery_id: id,
            owner_id: "o".into(),
            pickup_time: Some(now),
            pickup_location: None,
            drop_off_location: None,
            deadline: None,
            requested_at: now,
        });
        round_trip(&WorkflowStateChanged {
            delivery_id: id,
            owner_id: "o".into(),
            state: RequestState::CompensationFailed,
            version: 3,
            detail: Some("drone service down".into()),
            at: now,
            package_id: Some("p".into()),
            drone_id: None,
            pickup_window: Some(TimeWindow {
                start: now,
                end: now,
            }),
            pickup_location: Some("0,47.6,-122.3".into()),
            drop_off_location: None,
            pickup_time: Some(now),
            revision: Some(1),
            carrier_leg: None,
        });
        round_trip(&DeliveryTracked {
            delivery_id: id.to_string(),
            owner_id: "o".into(),
            drone_id: "drone-001".into(),
            sequence: 2,
            stage: DeliveryStage::HeadedToDropoff,
            location: Some("0,47.6,-122.3".into()),
            detail: None,
            at: now,
        });
        for s in RequestState::ALL {
            assert_eq!(RequestState::parse(s.as_str()), Some(s));
            round_trip(&s);
        }
    }

    #[test]
    fn state_changes_without_ids_read_and_write_as_before() {
        let id = Uuid::new_v4();
        let now = Utc::now();
        let old = serde_json::json!({
            "deliveryId": id, "ownerId": "o", "state": "scheduling", "version": 1, "at": now,
        });
        let change: Option<WorkflowStateChanged> = serde_json::from_value(old.clone()).ok();
        assert_eq!(
            change
                .as_ref()
                .map(|c| (&c.package_id, &c.drone_id, &c.pickup_window, c.revision)),
            Some((&None, &None, &None, None))
        );
        assert_eq!(change.and_then(|c| serde_json::to_value(c).ok()), Some(old));
    }
}
