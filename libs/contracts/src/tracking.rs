//! Client tracking of a booking at Ingestion: `GET /api/deliveries/{id}` (the booking as it stands
//! with its history) and `GET /api/deliveries/{id}/events` (the same history as Server-Sent
//! Events). The history merges the saga's lifecycle (`workflow.state-changed`) with the Delivery
//! service's tracking events (`delivery.tracked`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{DeliveryStage, RequestState, TimeWindow};

/// Where a booking stands, as a client follows it: derived from the saga's state and the latest
/// tracking stage of its delivery (see [`BookingStage::derive`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum BookingStage {
    Accepted,
    Scheduling,
    Scheduled,
    InFlight,
    Delivered,
    Cancelled,
    Failed,
}

impl BookingStage {
    pub const ALL: [BookingStage; 7] = [
        BookingStage::Accepted,
        BookingStage::Scheduling,
        BookingStage::Scheduled,
        BookingStage::InFlight,
        BookingStage::Delivered,
        BookingStage::Cancelled,
        BookingStage::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BookingStage::Accepted => "accepted",
            BookingStage::Scheduling => "scheduling",
            BookingStage::Scheduled => "scheduled",
            BookingStage::InFlight => "in-flight",
            BookingStage::Delivered => "delivered",
            BookingStage::Cancelled => "cancelled",
            BookingStage::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// The stage from the saga's `state`, the delivery's latest `tracking` stage (if any) and
    /// whether the client cancelled the booking. What the drone did wins over the saga: a
    /// completed delivery is delivered, a cancelled one cancelled. A booking that fails or is
    /// being undone is `failed`, unless its client cancelled it: then nothing failed.
    pub fn derive(
        state: RequestState,
        tracking: Option<DeliveryStage>,
        client_cancelled: bool,
    ) -> Self {
        match (tracking, state) {
            (Some(DeliveryStage::Cancelled), _) => BookingStage::Cancelled,
            (Some(DeliveryStage::Completed), _) => BookingStage::Delivered,
            (_, RequestState::Cancelled) => BookingStage::Cancelled,
            (
                _,
                RequestState::Failed
                | RequestState::Compensating
                | RequestState::Compensated
                | RequestState::CompensationFailed,
            ) if client_cancelled => BookingStage::Cancelled,
            (
                _,
                RequestState::Failed
                | RequestState::Compensating
                | RequestState::Compensated
                | RequestState::CompensationFailed,
            ) => BookingStage::Failed,
            (
                Some(DeliveryStage::HeadedToPickup | DeliveryStage::HeadedToDropoff),
                RequestState::Scheduled,
            ) => BookingStage::InFlight,
            (_, RequestState::Scheduled) => BookingStage::Scheduled,
            (_, RequestState::Scheduling) => BookingStage::Scheduling,
            (_, RequestState::Accepted) => BookingStage::Accepted,
        }
    }
}

/// Where a history entry comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum HistorySource {
    /// The saga's lifecycle (`workflow.state-changed`): the entry has a `state`.
    Booking,
    /// The Delivery service's tracking (`delivery.tracked`): the entry has a `trackingStage`.
    Delivery,
}

impl HistorySource {
    pub fn as_str(self) -> &'static str {
        match self {
            HistorySource::Booking => "booking",
            HistorySource::Delivery => "delivery",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [HistorySource::Booking, HistorySource::Delivery]
            .into_iter()
            .find(|v| v.as_str() == s)
    }
}

/// One change of a booking. `id` orders a booking's entries (newest last) and is the SSE event
/// id; the booking's acceptance is entry `0`, always first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrackingEntry {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub source: HistorySource,
    /// The booking's state after this change (source `booking`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<RequestState>,
    /// The delivery's stage after this change (source `delivery`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking_stage: Option<DeliveryStage>,
    /// Where the drone was (`"0,lat,lon"`), when tracking said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// `GET /api/deliveries/{id}`: a booking as its client follows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryTracking {
    pub delivery_id: Uuid,
    pub owner_id: String,
    /// The saga's state (as `GET /api/deliveryrequests/{id}` answers it).
    pub state: RequestState,
    pub stage: BookingStage,
    /// Why the booking failed or was cancelled (only at those stages).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pickup_location: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_off_location: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pickup_time: Option<DateTime<Utc>>,
    /// The reserved drone's window, once it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pickup_window: Option<TimeWindow>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drone_id: Option<String>,
    /// The carrier that takes the package part (or all) of the way, when the drones cannot alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub carrier_leg: Option<crate::CarrierLeg>,
    /// The drone's last reported location (`"0,lat,lon"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_location: Option<String>,
    pub accepted_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Every change, oldest first.
    pub history: Vec<TrackingEntry>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::round_trip;

    #[test]
    fn stages_follow_state_and_tracking() {
        use BookingStage as B;
        use DeliveryStage as D;
        use RequestState as R;
        let cases = [
            (R::Accepted, None, false, B::Accepted),
            (R::Scheduling, None, false, B::Scheduling),
            (R::Scheduled, None, false, B::Scheduled),
            (R::Scheduled, Some(D::Created), false, B::Scheduled),
            (R::Scheduled, Some(D::Rescheduled), false, B::Scheduled),
            (R::Scheduled, Some(D::HeadedToPickup), false, B::InFlight),
            (R::Scheduled, Some(D::HeadedToDropoff), false, B::InFlight),
            (R::Scheduled, Some(D::Completed), false, B::Delivered),
            (R::Scheduling, Some(D::HeadedToPickup), false, B::Scheduling),
            (R::Failed, None, false, B::Failed),
            (R::Compensating, Some(D::Created), false, B::Failed),
            (R::Compensated, None, false, B::Failed),
            (R::CompensationFailed, None, false, B::Failed),
            (R::CompensationFailed, None, true, B::Cancelled),
            (R::Compensated, None, true, B::Cancelled),
            (R::Cancelled, None, true, B::Cancelled),
            (R::Scheduled, Some(D::Cancelled), false, B::Cancelled),
        ];
        for (state, tracking, cancelled, want) in cases {
            assert_eq!(
                BookingStage::derive(state, tracking, cancelled),
                want,
                "{state:?} {tracking:?} {cancelled}"
            );
        }
        for s in BookingStage::ALL {
            assert_eq!(BookingStage::parse(s.as_str()), Some(s));
            assert_eq!(
                serde_json::to_value(s).ok(),
                Some(serde_json::Value::from(s.as_str()))
            );
        }
    }

    #[test]
    fn tracking_round_trips() {
        let now = Utc::now();
        round_trip(&DeliveryTracking {
            delivery_id: Uuid::new_v4(),
            owner_id: "o".into(),
            state: RequestState::Scheduled,
            stage: BookingStage::InFlight,
            reason: None,
            pickup_location: Some("a".into()),
            drop_off_location: Some("b".into()),
            pickup_time: Some(now),
            pickup_window: Some(TimeWindow {
                start: now,
                end: now,
            }),
            drone_id: Some("drone-001".into()),
            carrier_leg: None,
            last_location: Some("0,47.6,-122.3".into()),
            accepted_at: now,
            updated_at: now,
            history: vec![
                TrackingEntry {
                    id: 0,
                    at: now,
                    source: HistorySource::Booking,
                    state: Some(RequestState::Accepted),
                    tracking_stage: None,
                    location: None,
                    detail: None,
                },
                TrackingEntry {
                    id: 7,
                    at: now,
                    source: HistorySource::Delivery,
                    state: None,
                    tracking_stage: Some(DeliveryStage::HeadedToPickup),
                    location: Some("0,47.6,-122.3".into()),
                    detail: Some("on its way".into()),
                },
            ],
        });
        assert_eq!(
            serde_json::to_value(HistorySource::Delivery).ok(),
            Some(serde_json::Value::from("delivery"))
        );
    }
}
